"""The Redis outcome store, shared by several Tiergate replicas; an outage loses no record that
reaches the journal (see docs/learning-loop.md for what that does and does not cover).

Structures (``P`` is the key prefix, ``tiergate`` by default). One Redis primary holds them
all: scripts touch keys of several hash slots and the client follows no ``MOVED``, so Redis
Cluster is not supported (docs/kubernetes.md, *External Redis*):

==============================  =============================================================
``P:outcome:<request id>``      string, the record as JSON, expiring after the policy's
                                ``retention_days`` (none when it is null).
                                Written with ``SET NX``: the idempotency key that makes a
                                replayed record (after a retry or a journal replay) a no-op.
``P:outcomes``                  stream, one entry per new record (``id``, ``record``), trimmed
                                to about 1M entries and by ``purge``: the change feed that other
                                consumers (retrain jobs, exporters) read with ``XREAD``. An
                                erasure deletes its entries and then rebuilds the stream, as
                                ``XDEL`` leaves their bytes in place (:meth:`_rebuild_stream`).
``P:outcomes:erasures``         hash: ``deleted`` counts the erasures' ``XDEL`` s, ``rebuilt``
                                the count the stream was last rebuilt at; they differ while the
                                stream may hold erased bytes. ``rebuilt-id`` (Redis 7): the
                                stream's ``max-deleted-entry-id`` then, which any later
                                ``XDEL`` moves.
``P:outcomes:rebuild:<random>`` stream, a rebuild's copy, renamed over ``P:outcomes`` when it
                                is whole; expiring after :data:`REBUILD_TTL_S` if left behind,
                                deleted by the next erasure before then. ``...:marks``, a
                                hash beside it: its consumers' marks and its groups'
                                boundaries (:data:`_PENDING_LUA`).
``P:outcomes:ts``               sorted set, request id by timestamp: ``recent``, ``count``,
                                ``purge``. ``P:outcomes:ts:<tenant>`` the same per tenant;
                                ``P:tenants`` the set of tenants seen.
``P:spend:<UTC day>``           hash, tenant -> USD spent that day (``HINCRBYFLOAT``), expiring
                                after two days: budgets shared by every replica. An erased
                                tenant's field becomes ``erased|<tenant hash>``
                                (:func:`~router.outcomes.tenant_hash`), and what an erasure
                                refuses later is added there: budgets count both.
``P:scores`` / ``P:scores:<a>`` capped lists (``LPUSH`` + ``LTRIM``) of recent routing scores,
                                overall and per alias: online threshold calibration.
``P:hold:<tenant>``             hash, request id -> USD held for a request in flight, and
``P:holds:<tenant>``            sorted set of the same ids by expiry (Redis's clock: the
                                replicas' need not agree): budget reservations
                                (``reserve_spend``), dropped when the request's record is
                                written or, if it never is, after :data:`HOLD_TTL_S`, which
                                the replica serving the request renews while it runs; and by
                                an erasure of the tenant (the records of those requests are
                                refused and counted as the erased tenant's spend).
``P:label:<request id>``        hash, label source -> label JSON (feedback, shadow, escalation).
``P:labels``                    sorted set of ``<request id>|<source>`` by time: ``labels``.
``P:replicas``                  sorted set, replica id by its last heartbeat (every second, in
                                the spend refresh; Redis's clock): how many replicas share the
                                budgets and rate limits, so that in an outage each spends only
                                its share of what is left.
``P:erased:<hash>``             string, when an erasure ran, expiring after
                                :data:`~router.outcomes.ERASURE_KEPT_S`: the tombstone of an
                                erased request id or tenant (hashed,
                                :func:`~router.outcomes.erased_name`). The record and label
                                scripts refuse what comes for them later.
``P:erased-spend:<UTC day>``    hash, ``<30 s bucket>|<tenant hash>`` -> USD the erased shadow
                                labels of that day cost, ``...|requests`` what the erased
                                records cost and ``...|counterfactual`` what they would have
                                cost all-closed (:func:`~router.outcomes.erased_spend`), expiring
                                :data:`~router.outcomes.ERASED_SPEND_KEPT_S` after the day: the
                                dashboard's spend keeps it (budgets read ``P:spend``).
``P:cooldown:<model>``          string, ``<error code>|<random id>``, expiring (``PX``) when
                                the model's cooldown ends (:mod:`router.cooldown`): a model one
                                replica cooled, which every replica passes over. Set when a
                                cooldown starts (never shortened), read with the spend refresh
                                for the policy's models; a model name and an error code, no
                                tenant data.
==============================  =============================================================

Every write is one Lua script per record or label, so it is atomic and idempotent. The writer
is :class:`~router.outcomes.OutcomeWriter`, as for SQLite; this module adds the writes, the reads
and the journal. Records submitted once the store has found Redis unreachable, or when the
writer's bounded buffer is full, are appended to an on-disk journal (JSON lines) at once; only
those submitted before it noticed wait in memory. The writer retries
with backoff, then writes the buffer and replays the journal when Redis returns. ``close``
drains everything it can and, if Redis does not answer, moves what is left to the journal at
once (not at the end of its drain time, which a process manager's SIGKILL may cut short); the
next start replays it. Redis itself must persist (AOF with ``appendfsync
everysec`` or ``always``), or a Redis restart loses what it held, which no client can prevent.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Callable, Collection
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from router.errors import ConfigError, MissingExtraError, StoreUnavailableError
from router.outcomes import (
    ERASED_SPEND_KEPT_S,
    ERASED_TENANT_FIELD,
    ERASURE_KEPT_S,
    Cost,
    DaySpend,
    Erased,
    ErasedSpend,
    Item,
    Label,
    OutcomeRecord,
    OutcomeWriter,
    TieredLabel,
    WindowRow,
    began,
    erased_name,
    erased_spend,
    erased_spend_key,
    lock_beside,
    tenant_hash,
    valid_json,
    valid_text,
)
from router.policy import usd

if TYPE_CHECKING:
    from router.config import Settings

log = logging.getLogger("tiergate.outcomes")

#: How long an erasure waits for an append-only file rewrite that began before it to end, so
#: that it can ask for its own (:meth:`RedisOutcomeStore.rewrite_aof`), and how often it asks.
AOF_WAIT_S = 60.0
AOF_POLL_S = 0.2

_SCORES_CAP = 2000
#: With the journal unwritable, the buffer may grow to this many times its bound before
#: outcomes are dropped (counted and logged).
_MEMORY_FACTOR = 4
_STREAM_MAXLEN = 1_000_000
#: A stream rebuild copies REBUILD_BATCH entries per round trip, then its consumer groups'
#: pending entries REBUILD_PENDING_LAST per script, and its last step (one script, which blocks
#: Redis while it runs) at most REBUILD_LAST entries and REBUILD_PENDING_LAST pending entries;
#: it starts again at most REBUILD_TRIES times when other erasures delete entries meanwhile,
#: and copies pending entries again, or deletes from the copy what other clients deleted from
#: the stream (comparing REBUILD_BATCH entries per script), at most as often. A copy a dead
#: rebuild left expires after REBUILD_TTL_S.
REBUILD_BATCH = 1000
REBUILD_LAST = 100
REBUILD_PENDING_LAST = 500
REBUILD_TRIES = 5
REBUILD_TTL_S = 300
#: The oldest Redis the store works with: the retention purge and an erasure's stream rebuild
#: need XTRIM MINID, the rebuild XGROUP CREATECONSUMER and exclusive XPENDING ranges (6.2).
MIN_REDIS = (6, 2)
#: A budget hold whose request never wrote a record (its replica died) lapses after this long,
#: blocking its tenant's budget until then. A replica renews the holds of its requests in
#: flight every third of it (in the spend refresh, each second), so a request that runs longer
#: (a long stream) keeps its hold, and one lapses only where its replica could not renew it for
#: two thirds of it (200 s: Redis unreachable, the writer stalled).
HOLD_TTL_S = 300
#: After Redis failed a budget hold, holds use this replica's view for this long without asking
#: Redis (as the rate limits do): no connect timeout per request, no warning per request.
HOLD_RETRY_S = 1.0
#: A replica whose heartbeat is older than this no longer counts towards the budget shares.
REPLICA_TTL_S = 15.0

# KEYS: the model's cooldown key. ARGV: its mark, milliseconds. A cooldown is set unless one
# that lasts longer is there: a replica's shorter Retry-After does not cut another's short.
_COOLDOWN_LUA = """
if redis.call('PTTL', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# Lua that reads Redis's clock, in seconds: the times that replicas compare (a budget hold's
# expiry, a replica's heartbeat) are all Redis's, so a replica whose clock is off neither frees
# the others' holds early nor has its own lapse at once. A write may follow TIME when commands
# are replicated as their effects: the default since Redis 5, asked for here as 6.2 can be set
# otherwise (lua-replicate-commands no); Redis 7 always does, and ignores the call.
_CLOCK_LUA = """
redis.replicate_commands()
local function clock()
  local now = redis.call('TIME')
  return tonumber(now[1]) + tonumber(now[2]) / 1000000
end
"""

# KEYS: spend hash, hold hash, holds zset. ARGV: tenant, id, usd, budget (<0: none), the
# tenant's erased spend field, the holds' TTL (s). Returns 1 when the hold was taken, 0 when
# spend (its erased spend included) + holds had reached the budget. A hold expires the TTL
# after it was taken or renewed, on Redis's clock.
_RESERVE_LUA = (
    _CLOCK_LUA
    + """
local now = clock()
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now)) do
  redis.call('HDEL', KEYS[2], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now)
local budget = tonumber(ARGV[4])
if budget >= 0 then
  local used = 0
  for _, spent in ipairs(redis.call('HMGET', KEYS[1], ARGV[1], ARGV[5])) do
    if spent then used = used + tonumber(spent) end
  end
  for _, held in ipairs(redis.call('HVALS', KEYS[2])) do used = used + tonumber(held) end
  if used >= budget then return 0 end
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], now + tonumber(ARGV[6]), ARGV[2])
redis.call('EXPIRE', KEYS[2], ARGV[6])
redis.call('EXPIRE', KEYS[3], ARGV[6])
return 1
"""
)

# KEYS: a tenant's hold hash and holds zset. ARGV: the holds' TTL (s), then the request ids of
# this replica's holds. Moves their expiry to the TTL from now (Redis's clock), and the keys'
# with them; renews only what is there (ZADD XX: RedisOutcomeStore._renew_holds). How many.
_RENEW_LUA = (
    _CLOCK_LUA
    + """
local expiry, renewed = clock() + tonumber(ARGV[1]), 0
for i = 2, #ARGV do
  renewed = renewed + redis.call('ZADD', KEYS[2], 'XX', 'CH', expiry, ARGV[i])
end
if renewed > 0 then
  for _, key in ipairs(KEYS) do redis.call('EXPIRE', key, ARGV[1]) end
end
return renewed
"""
)

# KEYS: the replicas zset. ARGV: this replica's id, how long a heartbeat counts (s). Beats on
# Redis's clock, drops the heartbeats older than that, and returns how many replicas are left.
_HEARTBEAT_LUA = (
    _CLOCK_LUA
    + """
local now = clock()
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
return redis.call('ZCARD', KEYS[1])
"""
)

# Both scripts return 2 for an item an erasure refuses (see router.outcomes.refused): its cost
# is counted all the same (it was spent, and an erasure leaves the day's spend as it was).
# KEYS: record, stream, ts zset, tenant zset, tenants set, spend hash, scores, alias scores,
#       hold hash, holds zset, the request's tombstone, the tenant's tombstone, the day's
#       erased spend hash
# ARGV: json, id, ts, tenant, cost, ttl_s (0: none), score or '', scores cap, spend ttl,
#       stream maxlen, the erased spend fields' prefix, when its hash expires, counterfactual
#       cost (router.outcomes.erased_spend: a refused record's cost), the tenant's erased
#       spend field (a refused record's cost counts there, not under the tenant's name), when
#       the request began (router.outcomes.began: the tenant's tombstone refuses a request
#       begun before it, one still being answered then included)
# The tombstone holds what it held before (when the erasure ran): a replica still running the
# script before this one, which compares the record's ts (when its request ended), loads and
# runs its own script by its own SHA and refuses what it refused before.
_RECORD_LUA = """
redis.call('HDEL', KEYS[9], ARGV[2])
redis.call('ZREM', KEYS[10], ARGV[2])
local erased = redis.call('GET', KEYS[12])
if redis.call('EXISTS', KEYS[11]) == 1 or (erased and tonumber(ARGV[15]) <= tonumber(erased)) then
  if tonumber(ARGV[5]) ~= 0 then
    redis.call('HINCRBYFLOAT', KEYS[6], ARGV[14], ARGV[5])
    redis.call('EXPIRE', KEYS[6], ARGV[9])
    redis.call('HINCRBYFLOAT', KEYS[13], ARGV[11] .. '|requests', ARGV[5])
  end
  if tonumber(ARGV[13]) ~= 0 then
    redis.call('HINCRBYFLOAT', KEYS[13], ARGV[11] .. '|counterfactual', ARGV[13])
  end
  if tonumber(ARGV[5]) ~= 0 or tonumber(ARGV[13]) ~= 0 then
    redis.call('EXPIREAT', KEYS[13], ARGV[12])
  end
  return 2
end
local stored
if tonumber(ARGV[6]) > 0 then
  stored = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[6])
else
  stored = redis.call('SET', KEYS[1], ARGV[1], 'NX')
end
if not stored then return 0 end
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[10], '*', 'id', ARGV[2], 'record', ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[2])
redis.call('SADD', KEYS[5], ARGV[4])
if tonumber(ARGV[5]) ~= 0 then
  redis.call('HINCRBYFLOAT', KEYS[6], ARGV[4], ARGV[5])
  redis.call('EXPIRE', KEYS[6], ARGV[9])
end
if ARGV[7] ~= '' then
  redis.call('LPUSH', KEYS[7], ARGV[7])
  redis.call('LTRIM', KEYS[7], 0, tonumber(ARGV[8]) - 1)
  redis.call('LPUSH', KEYS[8], ARGV[7])
  redis.call('LTRIM', KEYS[8], 0, tonumber(ARGV[8]) - 1)
end
return 1
"""

# KEYS: label hash, labels zset, spend hash, the request's record, the request's tombstone,
#       the tenant's tombstone, the day's erased spend hash.
# ARGV: source, json, member, ts, tenant, cost, ttl (0: none), the erased spend field and
#       when its hash expires (router.outcomes.erased_spend: a refused shadow label's cost),
#       the tenant's erased spend field in the spend hash (a refused label's cost counts there)
# A label older than the one stored for its source is not written: a journal replayed after
# an outage must not put back what a later label (from another replica) replaced. A label's
# request was made when it began: its record's ts less its latency (router.outcomes.began).
_LABEL_LUA = """
local erased = redis.call('GET', KEYS[6])
local made = nil
if erased then
  local record = redis.call('GET', KEYS[4])
  if record then
    local stored = cjson.decode(record)
    local latency = tonumber(stored['latency_ms']) or 0
    made = tonumber(stored['ts'])
    if made and latency > 0 and latency < math.huge then made = made - latency / 1000 end
  end
end
if redis.call('EXISTS', KEYS[5]) == 1 or (erased and (not made or made <= tonumber(erased))) then
  if tonumber(ARGV[6]) ~= 0 then
    redis.call('HINCRBYFLOAT', KEYS[3], ARGV[10], ARGV[6])
    redis.call('EXPIRE', KEYS[3], 172800)
    if ARGV[1] == 'shadow' then
      redis.call('HINCRBYFLOAT', KEYS[7], ARGV[8], ARGV[6])
      redis.call('EXPIREAT', KEYS[7], ARGV[9])
    end
  end
  return 2
end
local stored = redis.call('HGET', KEYS[1], ARGV[1])
if stored == ARGV[2] then return 0 end
local older = stored and tonumber(cjson.decode(stored)['ts'])
if older and older > tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if tonumber(ARGV[7]) > 0 then
  redis.call('EXPIRE', KEYS[1], ARGV[7])
else
  redis.call('PERSIST', KEYS[1])
end
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[3])
if tonumber(ARGV[6]) ~= 0 then
  redis.call('HINCRBYFLOAT', KEYS[3], ARGV[5], ARGV[6])
  redis.call('EXPIRE', KEYS[3], 172800)
end
return 1
"""


# Lua shared by the scripts that finish a stream's rebuild: those that copy its consumer groups
# into the copy (the copy's groups already made), and those that delete from the copy what
# another client deleted from the stream.
#
# A group's pending entries are copied in two parts, split at its boundary (``@<group>`` in the
# marks hash): the entry last delivered to the group when its copy began, or the copy's last
# entry then if that came first. Those up to it are copied before the last script, a batch per
# script, and each consumer's mark says what they were: its count of them, when Redis last
# saw it (ms) and when that was read (XINFO CONSUMERS). Those after it, the entries delivered
# since (an XREADGROUP '>' delivers only entries after the group's last one), the last script
# copies as they are then, and acknowledges in the copy those acknowledged since. Up to the
# boundary, an XACK or a DELCONSUMER takes entries away, a claim moves them between consumers,
# and only a delivery again after XGROUP SETID back or an XCLAIM FORCE of an acknowledged entry
# adds one. So where no consumer's count changed (and the group's last delivered entry is not
# behind its boundary), the group holds the same entries up to it; those of a consumer not seen
# since either (reads and claims name it) are still its own, with the same delivery counts and
# times. A consumer seen within 5 ms of its mark may change within the same millisecond: it
# counts as seen. ``consumers`` reads Redis's clock before the scripts write (see _CLOCK_LUA).
_PENDING_LUA = """
redis.replicate_commands()
local function fields(flat)
  local t = {}
  for i = 1, #flat, 2 do t[flat[i]] = flat[i + 1] end
  return t
end
-- A group's consumers in a stream, name -> {pending count, when Redis last saw it (ms)}, and
-- the time (ms); none when the group is gone.
local function consumers(stream, group)
  local clock = redis.call('TIME')
  local now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
  local out, found = {}, redis.pcall('XINFO', 'CONSUMERS', stream, group)
  if found['err'] then return out, now end
  for _, flat in ipairs(found) do
    local c = fields(flat)
    out[c['name']] = {tonumber(c['pending']), now - tonumber(c['idle'])}
  end
  return out, now
end
local function key(group, consumer) return #group .. ':' .. group .. consumer end
-- A mark's count up to the boundary, when the consumer was last seen and when that was read.
local function marked(mark)
  if not mark then return nil end
  local count, seen, at = string.match(mark, '^(%d+)|(%-?%d+)|(%d+)$')
  return tonumber(count), tonumber(seen), tonumber(at)
end
-- Whether a consumer last seen at ``seen`` was not seen since its mark.
local function unseen(mark, seen)
  local _, was, at = marked(mark)
  return was ~= nil and math.abs(seen - was) <= 2 and at - was >= 5
end
local function claim(copy, group, pending)
  for _, p in ipairs(pending) do
    redis.call('XCLAIM', copy, group, p[2], 0, p[1], 'IDLE', p[3], 'RETRYCOUNT', p[4], 'FORCE',
      'JUSTID')
  end
end
local function after(id)
  if id == '-' then return '-' end
  return '(' .. id
end
-- Whether the stream id ``a`` comes before ``b``.
local function before(a, b)
  local am, as = string.match(a, '^(%d+)%-(%d+)$')
  local bm, bs = string.match(b, '^(%d+)%-(%d+)$')
  am, as, bm, bs = tonumber(am), tonumber(as), tonumber(bm), tonumber(bs)
  return am < bm or (am == bm and as < bs)
end
-- Deletes from a stream's copy those of its entries ``copied`` (newest first, from ``upto``
-- back) that the stream no longer holds; how many.
local function prune(stream, copy, copied, upto)
  if #copied == 0 then return 0 end
  local kept, gone = {}, {}
  for _, entry in ipairs(redis.call('XREVRANGE', stream, upto, copied[#copied][1])) do
    kept[entry[1]] = true
  end
  for _, entry in ipairs(copied) do
    if not kept[entry[1]] then table.insert(gone, entry[1]) end
  end
  if #gone == 0 then return 0 end
  return redis.call('XDEL', copy, unpack(gone))
end
"""

# KEYS: the stream, its copy. ARGV: the id to compare back from (inclusive, or exclusive as
# '(id'), the most entries to compare. Deletes from the copy the entries there that another
# client deleted from the stream since they were copied (XDEL), among the copy's next ARGV[2]
# back from ARGV[1]. Returns {how many went, the oldest id compared ('': none left)}.
_PRUNE_LUA = (
    _PENDING_LUA
    + """
local copied = redis.call('XREVRANGE', KEYS[2], ARGV[1], '-', 'COUNT', tonumber(ARGV[2]))
if #copied == 0 then return {0, ''} end
return {prune(KEYS[1], KEYS[2], copied, ARGV[1]), copied[#copied][1]}
"""
)

# KEYS: the stream, its copy. ARGV: a group, one of its consumers, the id its pending entries
# were copied to ('-': none), the group's boundary, the most to copy, the consumer's mark when
# its copy began ('': it begins here).
# Copies the consumer's next pending entries up to the boundary into the copy, with their idle
# time and delivery count. Returns {mark, how many were copied, the last id copied}:
# {'', 0, ''} when the consumer is gone, {'', -1, ''} when its count up to the boundary is no
# longer its mark's, or more than ARGV[5] entries were delivered to it since (copy it again).
_PENDING_BATCH_LUA = (
    _PENDING_LUA
    + """
local found, now = consumers(KEYS[1], ARGV[1])
local consumer, most = found[ARGV[2]], tonumber(ARGV[5])
if not consumer then return {'', 0, ''} end
local since = #redis.call('XPENDING', KEYS[1], ARGV[1], after(ARGV[4]), '+', most + 1, ARGV[2])
if since > most then return {'', -1, ''} end
local count, mark = consumer[1] - since, ARGV[6]
if mark == '' then
  mark = count .. '|' .. consumer[2] .. '|' .. now
elseif marked(mark) ~= count then
  return {'', -1, ''}
end
local batch = redis.call('XPENDING', KEYS[1], ARGV[1], after(ARGV[3]), ARGV[4], most, ARGV[2])
claim(KEYS[2], ARGV[1], batch)
if #batch == 0 then return {mark, 0, ''} end
return {mark, #batch, batch[#batch][1]}
"""
)

# KEYS: the stream, its copy, the erasures hash, a name for the old stream until it is freed,
# the marks (hash: :func:`_mark_field` -> a consumer's mark, as _PENDING_BATCH_LUA returned it;
# ``@<group>`` -> the group's boundary).
# ARGV: the last entry id copied ('-': none), how many were copied, the most to copy here, the
# erasures' deleted count the copy began at, the most pending entries to copy here.
# Returns {0} when the copy is not whole (an erasure deleted entries since it began, or it
# expired), {-1} when more than ARGV[3] entries are left to copy (copy them first), {-2} when
# more than ARGV[5] pending entries would be (copy them first), {-3, the copy's length, its
# last id, how many entries it holds that the stream no longer does} when another client
# deleted entries (XDEL) that were copied, of which this script deletes from the copy those
# among its last ARGV[3] entries (have the others deleted first, _PRUNE_LUA: the copy, with
# the entries added since, is kept), {1} when the copy, with the entries added since, its head
# trimmed as the stream's was, its consumer groups (their last delivered id, consumers and
# pending entries, less the erased ones) and its last id, has replaced the stream (IDs are
# kept: an XREAD from a last-seen id goes on). Only an XDEL can leave the copy longer than the
# stream once both are trimmed alike: no entry can join a stream before its last one.
# Pending entries (see _PENDING_LUA): those delivered after each group's boundary are copied
# here, and those of its consumers whose count up to it changed, whole. Where no count changed
# in a group, the consumers seen since their mark are copied again too while ARGV[5] allows,
# else kept as copied: a consumer that reads all the while (each XREADGROUP, found or not, has
# Redis see it) holding more than that could otherwise never be copied. What only those keep
# from their copy: the owner, delivery count and idle time of entries they read again or
# claimed from each other in the moment between their copy and this script, never which
# entries are pending.
# Since Redis 7 a stream also counts the entries added and a group those read (its lag): they
# are kept too.
# The old stream is renamed away before the copy takes its name, then freed in the background
# (UNLINK): a script that fails midway (an ACL) leaves the stream as it was.
# It records the deleted count it rebuilt at (``rebuilt``) and, since Redis 7, the stream's
# max-deleted-entry-id (``rebuilt-id``): an XDEL after it moves one or the other.
# Its work is bounded by ARGV[3] entries, ARGV[5] pending entries and the groups' consumers.
_REBUILD_LUA = (
    _PENDING_LUA
    + """
if (redis.call('HGET', KEYS[3], 'deleted') or '0') ~= ARGV[4] then return {0} end
if redis.call('XLEN', KEYS[2]) ~= tonumber(ARGV[2]) then return {0} end
local function rebuilt(stream)
  redis.call('HSET', KEYS[3], 'rebuilt', ARGV[4])
  if stream and stream['max-deleted-entry-id'] then
    redis.call('HSET', KEYS[3], 'rebuilt-id', stream['max-deleted-entry-id'])
  end
  return {1}
end
local tail = redis.call('XRANGE', KEYS[1], after(ARGV[1]), '+', 'COUNT', tonumber(ARGV[3]) + 1)
if #tail > tonumber(ARGV[3]) then return {-1} end
local groups, left = {}, tonumber(ARGV[5])
for _, flat in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local group = fields(flat)
  local name = group['name']
  local bound = redis.call('HGET', KEYS[5], '@' .. name) or '0-0'
  group.since = redis.call('XPENDING', KEYS[1], name, after(bound), '+', left + 1)
  left = left - #group.since
  if left < 0 then return {-2} end
  group.copied = redis.pcall('XPENDING', KEYS[2], name, after(bound), '+', left + 1)
  if group.copied['err'] then group.copied = {} end
  left = left - #group.copied
  if left < 0 then return {-2} end
  local delivered = {}
  for _, p in ipairs(group.since) do delivered[p[2]] = (delivered[p[2]] or 0) + 1 end
  local same = not before(group['last-delivered-id'], bound)
  group.consumers, group.whole, group.seen = consumers(KEYS[1], name), {}, {}
  for consumer, now in pairs(group.consumers) do
    local mark, count = redis.call('HGET', KEYS[5], key(name, consumer)), now[1]
    local held = count - (delivered[consumer] or 0)
    if not mark or marked(mark) ~= held then
      group.whole[consumer] = count
      if mark or held > 0 then same = false end
    elseif not unseen(mark, now[2]) then
      group.seen[consumer] = count
    end
  end
  for consumer, copied in pairs(consumers(KEYS[2], name)) do
    if not group.consumers[consumer] and copied[1] > 0 then same = false end
  end
  if not same then
    for consumer, count in pairs(group.seen) do group.whole[consumer] = count end
    group.seen = {}
  end
  for _, count in pairs(group.whole) do left = left - count end
  if left < 0 then return {-2} end
  table.insert(groups, group)
end
for _, group in ipairs(groups) do
  for consumer, count in pairs(group.seen) do
    if count <= left then group.whole[consumer], left = count, left - count end
  end
end
for _, entry in ipairs(tail) do redis.call('XADD', KEYS[2], entry[1], unpack(entry[2])) end
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if #first == 0 then
  redis.call('DEL', KEYS[2])
  if redis.call('EXISTS', KEYS[1]) == 0 then return rebuilt(nil) end
  return rebuilt(fields(redis.call('XINFO', 'STREAM', KEYS[1])))
end
redis.call('XTRIM', KEYS[2], 'MINID', first[1][1])
local extra = redis.call('XLEN', KEYS[2]) - redis.call('XLEN', KEYS[1])
if extra < 0 then return {0} end
if extra > 0 then
  local copied = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', tonumber(ARGV[3]))
  extra = extra - prune(KEYS[1], KEYS[2], copied, '+')
  if extra > 0 then return {-3, redis.call('XLEN', KEYS[2]), copied[1][1], extra} end
end
local stale = {}
for _, flat in ipairs(redis.call('XINFO', 'GROUPS', KEYS[2])) do stale[fields(flat)['name']] = 1 end
for _, group in ipairs(groups) do
  local name = group['name']
  local read = {}
  if group['entries-read'] then read = {'ENTRIESREAD', group['entries-read']} end
  if stale[name] then
    redis.call('XGROUP', 'SETID', KEYS[2], name, group['last-delivered-id'], unpack(read))
  else
    redis.call('XGROUP', 'CREATE', KEYS[2], name, group['last-delivered-id'], unpack(read))
  end
  stale[name] = nil
  local gone = consumers(KEYS[2], name)
  for consumer in pairs(group.consumers) do
    local count = group.whole[consumer]
    if count and gone[consumer] then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[2], name, consumer)
    end
    if count or not gone[consumer] then
      redis.call('XGROUP', 'CREATECONSUMER', KEYS[2], name, consumer)
    end
    if count and count > 0 then
      claim(KEYS[2], name, redis.call('XPENDING', KEYS[1], name, '-', '+', count, consumer))
    end
    gone[consumer] = nil
  end
  for consumer in pairs(gone) do redis.call('XGROUP', 'DELCONSUMER', KEYS[2], name, consumer) end
  local pending, acked = {}, {}
  for _, p in ipairs(group.since) do pending[p[1]] = true end
  for _, p in ipairs(group.copied) do
    if not pending[p[1]] then table.insert(acked, p[1]) end
  end
  if #acked > 0 then redis.call('XACK', KEYS[2], name, unpack(acked)) end
  claim(KEYS[2], name, group.since)
end
for name in pairs(stale) do redis.call('XGROUP', 'DESTROY', KEYS[2], name) end
local stream = fields(redis.call('XINFO', 'STREAM', KEYS[1]))
if stream['entries-added'] then
  redis.call('XSETID', KEYS[2], stream['last-generated-id'], 'ENTRIESADDED',
    stream['entries-added'], 'MAXDELETEDID', stream['max-deleted-entry-id'])
else
  redis.call('XSETID', KEYS[2], stream['last-generated-id'])
end
redis.call('PERSIST', KEYS[2])
redis.call('RENAME', KEYS[1], KEYS[4])
redis.call('RENAME', KEYS[2], KEYS[1])
redis.call('UNLINK', KEYS[4])
return rebuilt(stream)
"""
)

# KEYS: the tenant's hold hash and holds zset, then the spend hashes. ARGV: tenant, its erased
# spend field. An erasure leaves no tenant name: each day's spend moves to the erased field,
# where budgets still count it, and the holds go (RedisOutcomeStore._unname_spend).
_ERASE_SPEND_LUA = """
redis.call('DEL', KEYS[1], KEYS[2])
for i = 3, #KEYS do
  local spent = redis.call('HGET', KEYS[i], ARGV[1])
  if spent then
    redis.call('HINCRBYFLOAT', KEYS[i], ARGV[2], spent)
    redis.call('HDEL', KEYS[i], ARGV[1])
  end
end
return 1
"""

_ERASED_FIELD = ERASED_TENANT_FIELD


def _erased_field(tenant: str) -> str:
    """The spend hash's field for ``tenant`` once erased (:func:`tenant_hash`, remembered:
    every budget hold names it)."""
    return _ERASED_FIELD + tenant_hash(tenant)


def _day_spend(day: int, spend: dict[str, str]) -> DaySpend:
    """A spend hash as read: per tenant, and per erased tenant's hash."""
    named = {k: float(v) for k, v in spend.items() if not k.startswith(_ERASED_FIELD)}
    erased = {
        k.removeprefix(_ERASED_FIELD): float(v)
        for k, v in spend.items()
        if k.startswith(_ERASED_FIELD)
    }
    return DaySpend(day, named, erased)


def _encode(item: Item) -> str:
    kind = "record" if isinstance(item, OutcomeRecord) else "label"
    return valid_json({"kind": kind, "data": item.as_dict()})


def _decode(line: str) -> Item:
    doc = json.loads(line)
    if doc["kind"] == "record":
        return OutcomeRecord(**doc["data"])
    return Label(**doc["data"])


def _day(ts: float) -> int:
    return int(ts // 86400)


def refused_credentials(exc: BaseException) -> str | None:
    """Why Redis refused Tiergate's credentials (``WRONGPASS``, ``NOAUTH``) or a command its
    ACL withholds (``NOPERM``), or why it takes no writes (``READONLY``: the URL points at a
    replica, as after a failover), naming the setting to fix; None for an outage or anything
    else. Redis's own words, quoted, name no password. The rate limiter and key lookups,
    on the same Redis, log it too (router.limits, router.auth)."""
    from redis.exceptions import (
        AuthenticationError,
        AuthorizationError,
        NoPermissionError,
        ReadOnlyError,
    )

    if isinstance(exc, AuthenticationError | AuthorizationError):
        return (
            f"TIERGATE_REDIS_URL: Redis refused Tiergate's credentials ({exc}): set the user "
            "and password Redis expects in TIERGATE_REDIS_URL or TIERGATE_REDIS_PASSWORD"
        )
    if isinstance(exc, NoPermissionError):
        return (
            f"TIERGATE_REDIS_URL: Redis's ACL refuses Tiergate's user a command it needs "
            f"({exc}): grant it the commands of docs/kubernetes.md (A Redis user for Tiergate)"
        )
    if isinstance(exc, ReadOnlyError):
        return (
            f"TIERGATE_REDIS_URL points at a read-only replica ({exc}): point it at the "
            "primary (after a failover, the new one)"
        )
    return None


#: How Redis 6.2 answers a command a script runs that the user's ACL withholds: a script error,
#: where Redis 7 answers ``NOPERM`` (redis-py's NoPermissionError).
_SCRIPT_DENIED = "can't run this command or subcommand"
#: How Redis 6.2 answers a write a script makes on a read-only replica: a script error quoting
#: the ``READONLY`` error, where a plain command gets it as such (redis-py's ReadOnlyError).
_SCRIPT_READONLY = "-READONLY "


def _denied_as_noperm(execute: Callable[[], list[Any]]) -> list[Any]:
    """``execute()``, a pipeline of Tiergate's scripts; a command the ACL withholds in one
    raised as the NoPermissionError it is on Redis 7, and a write a replica refuses in one
    (Redis 6.2 wraps its ``-READONLY`` in a script error) as ReadOnlyError, so that on 6.2
    too each is the refusal :func:`refused_credentials` names, retried, not each item
    dropped as unwritable."""
    from redis.exceptions import NoPermissionError, ReadOnlyError, ResponseError

    try:
        return execute()
    except (NoPermissionError, ReadOnlyError):
        raise
    except ResponseError as exc:
        if _SCRIPT_DENIED in str(exc):
            raise NoPermissionError(str(exc)) from exc
        if _SCRIPT_READONLY in str(exc):
            raise ReadOnlyError(str(exc)) from exc
        raise


def _hello_version(said: Any) -> str:
    """The version a ``HELLO`` reply says: a map over RESP3 (redis-py's default since 8), a
    list of name, value pairs over RESP2."""
    fields = said if isinstance(said, dict) else dict(zip(said[::2], said[1::2], strict=False))
    return str(fields.get("version", ""))


class RedisOutcomeStore(OutcomeWriter):
    """Outcome records and labels in Redis; see the module docstring for structures and outages.

    ``url`` is a ``redis://`` URL. ``settings`` (a :class:`~router.config.Settings`) supplies
    the journal path and buffer size when given; keyword arguments override it.
    ``hold_ttl_s``: how long a budget hold lasts in Redis unless renewed (:data:`HOLD_TTL_S`).
    """

    memory_factor = _MEMORY_FACTOR
    keep_elsewhere_at_stop = True  # the journal, which the next start replays
    outage_note = " (each replica's budget holds now check its own share of what was left)"

    def __init__(
        self,
        url: str,
        *,
        settings: Settings | None = None,
        journal: Path | None = None,
        buffer_size: int | None = None,
        retention_s: float | None = 30 * 86400,
        prefix: str = "tiergate",
        batch: int = 200,
        hold_ttl_s: int = HOLD_TTL_S,
    ) -> None:
        size = buffer_size or (settings.outcome_queue_size if settings is not None else 100_000)
        super().__init__("redis-outcome-writer", buffer_size=size, batch=batch, linger_s=0.0)
        self.url = url
        self.prefix = prefix
        self.retention_s = retention_s
        self.hold_ttl_s = hold_ttl_s
        self.journal = journal or (
            Path(settings.outcome_journal_path)
            if settings is not None
            else Path("var/outcomes-journal.jsonl")
        )
        self._journal_lines = 0
        self._last_refresh = 0.0
        self._holds_renewed = time.monotonic()  # when this replica's holds were last renewed
        self.replica_id = uuid.uuid4().hex
        #: Replicas that heartbeat within REPLICA_TTL_S at the last refresh, this one included.
        self.replicas = 1
        #: Whether the shared spend was ever read (a replica started during an outage has not).
        self.spend_known = False
        #: Why this replica refuses its Redis, found once Redis answered after an outage at
        #: start (:meth:`_recheck_version`): ``health`` says it, and ``/readyz`` is 503.
        self.refusal: str | None = None
        self._version_known = False  # whether Redis said its version (start or a refresh)
        #: Why Redis refuses this replica (a wrong password, a command its ACL withholds), seen
        #: since Redis last took a refresh: ``health`` says it, and ``/readyz`` is 503.
        self.credentials_refused: str | None = None
        self._client: Any = None
        self._record_script: Any = None
        self._reserve_script: Any = None
        self._renew_script: Any = None
        self._heartbeat_script: Any = None
        self._label_script: Any = None
        self._erase_spend_script: Any = None
        self._cooldown_script: Any = None
        self._rebuild_script: Any = None
        self._pending_script: Any = None
        self._prune_script: Any = None
        # Cooldowns (router.cooldown), as (mark, monotonic end) by model: those started here and
        # not yet written, and those read at the last refresh; the models to read them for.
        self._cooldowns_out: dict[str, tuple[str, float]] = {}
        self._cooldowns_in: dict[str, tuple[str, float]] = {}
        self._cooldown_names: Callable[[], Collection[str]] = tuple
        self.duplicates = 0
        self.journal_errors = 0  # journal writes that failed (unwritable path, full disk)
        self._holds_down_until = 0.0  # budget holds skip Redis until then (monotonic)
        self._claim: IO[bytes] | None = None  # the journal's open lock file while this one runs

    # -- keys ------------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        """A key under this store's prefix."""
        return ":".join((self.prefix, *parts))

    def _under(self, *parts: str) -> str:
        """A SCAN pattern for the keys under ``key(*parts)``, its glob characters escaped."""
        return re.sub(r"([*?\[\]\\])", r"\\\1", self.key(*parts)) + ":*"

    def _spend_key(self, ts: float) -> str:
        return self.key("spend", str(_day(ts)))

    def _erased_spend_key(self, ts: float) -> str:
        return self.key("erased-spend", str(_day(ts)))

    # -- lifecycle -------------------------------------------------------------------------

    def connect(self) -> None:
        """Make the client (connections open lazily; enough for reading, e.g. the CLI)."""
        try:
            import redis
        except ImportError as exc:
            raise MissingExtraError("TIERGATE_REDIS_URL (Redis outcomes)", "redis") from exc

        self._client = redis.Redis.from_url(
            self.url,
            socket_connect_timeout=1.0,
            socket_timeout=5.0,
            decode_responses=True,
        )
        # An outage, retried; any other Redis error is the item's (see OutcomeWriter). A refused
        # password (a ConnectionError), command (NOPERM) or write (READONLY: a replica) is
        # retried too, as every item would fail alike, and is reported as the configuration
        # error it is (:meth:`unavailable`).
        self.transient = (
            redis.ConnectionError,
            redis.TimeoutError,
            OSError,
            redis.exceptions.NoPermissionError,
            redis.exceptions.ReadOnlyError,
        )
        self._record_script = self._client.register_script(_RECORD_LUA)
        self._label_script = self._client.register_script(_LABEL_LUA)
        self._reserve_script = self._client.register_script(_RESERVE_LUA)
        self._renew_script = self._client.register_script(_RENEW_LUA)
        self._heartbeat_script = self._client.register_script(_HEARTBEAT_LUA)
        self._erase_spend_script = self._client.register_script(_ERASE_SPEND_LUA)
        self._cooldown_script = self._client.register_script(_COOLDOWN_LUA)
        self._rebuild_script = self._client.register_script(_REBUILD_LUA)
        self._pending_script = self._client.register_script(_PENDING_BATCH_LUA)
        self._prune_script = self._client.register_script(_PRUNE_LUA)

    def start(self) -> None:
        """Connect, take up the journal an earlier run left, read the day's shared spend, and
        start writing. A journal another process holds (its ``NAME.lock``) is refused: each
        would replay the other's records and count them as their own, forever waiting for a
        backlog the other had written.

        The spend is read before the app takes requests: a replica added while a tenant was
        past its budget decided its first second of requests against $0 (the hold in Redis
        still refused them, but ``/v1/route`` answered closed and a refusal said "spent
        $0.00"). An unreachable Redis is not a start-up failure: the outage is noted (one
        warning) and the replica holds no budget it cannot see until Redis answers."""
        try:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # serve anyway: only an outage needs the journal (then see _spill)
            log.error("outcome journal directory %s unusable: %s", self.journal.parent, exc)
        free, self._claim = lock_beside(self.journal)
        if not free:
            raise ConfigError(
                f"outcome journal {self.journal} is in use by another Tiergate process: give "
                "each replica its own TIERGATE_OUTCOME_JOURNAL_PATH (or TIERGATE_HOME)"
            )
        try:
            self._take_up()
        except BaseException:  # any failure, not only a ConfigError
            if self._client is not None:  # the lifespan does not close us: nor its connections
                with contextlib.suppress(Exception):
                    self._client.close()
                self._client = None
            if self._claim is not None:
                self._claim.close()  # releases the journal: the lifespan does not close us
                self._claim = None
            raise

    def _take_up(self) -> None:
        """:meth:`start`'s work once the journal is this process's."""
        self.connect()
        self._check_version()
        try:
            self._refresh()
        except self.transient as exc:
            refused = refused_credentials(exc)
            if refused is not None:
                raise ConfigError(refused) from exc
            self.unavailable(exc)
        with self._cond:
            for path in self._journal_files():
                items = _set_aside_unreadable(path, self.unreadable_path)
                self._journal_lines += len(items)
                self._adopt(items)
        if self._journal_lines:
            log.warning("replaying %d journalled outcome items", self._journal_lines)
        self._start_writer()

    def _check_version(self) -> None:
        """Refuse a Redis older than :data:`MIN_REDIS`, whose purge and erasures would fail on
        every run, or one that will not say its version (:meth:`_too_old`). An unreachable one
        is checked once it answers (:meth:`_recheck_version`)."""
        try:
            too_old = self._too_old()
        except self.transient as exc:
            refused = refused_credentials(exc)
            if refused is not None:
                raise ConfigError(refused) from exc
            return  # the outage is noted by the first refresh
        self._version_known = True
        if too_old:
            raise ConfigError(f"TIERGATE_REDIS_URL: {too_old}")

    def _recheck_version(self) -> None:
        """The check :meth:`_check_version` could not make at start, made by each refresh
        until Redis says a version it takes. A running replica cannot undo its start: where
        the start would have been refused, it logs why once and refuses readiness
        (:attr:`refusal`), as a refusal at start leaves no replica ready, until Redis (or its
        ACL) is fixed. An outage raises, as in any refresh."""
        too_old = self._too_old()
        if too_old is None:
            self._version_known, self.refusal = True, None
        elif self.refusal is None:
            self.refusal = f"TIERGATE_REDIS_URL: {too_old}"
            log.error("%s; this replica reports itself not ready until then", self.refusal)

    def _too_old(self) -> str | None:
        """Why this Redis is older than :data:`MIN_REDIS` or will not say its version, or None.

        The version is asked with ``HELLO``, which Redis 6.2 and later answer any user
        whatever its ACL (``INFO`` is ``@dangerous``, which an ACL often withholds), else with
        ``INFO server`` (a Redis before 6.2, where ``HELLO`` needs arguments or is missing, or
        a server that does not know it)."""
        from redis import ResponseError

        try:
            said = self._client.execute_command("HELLO")  # no arguments: it changes nothing
        except ResponseError as hello:
            try:
                version = str(self._client.info("server").get("redis_version", ""))
            except ResponseError as info:
                return (
                    f"Redis will not say its version: HELLO: {hello}; INFO server: {info}. "
                    "Tiergate needs Redis 6.2 or later, which answers HELLO; where Redis does "
                    "not, Tiergate's Redis user may not run INFO: grant it (ACL SETUSER ... "
                    "+info) so that Tiergate can check the version"
                )
        else:
            version = _hello_version(said)
        found = tuple(int(n) for n in re.findall(r"\d+", version)[:2])
        if found >= MIN_REDIS:
            return None
        return (
            f"Redis {version or '(no version said)'} is older than 6.2, which Tiergate needs: "
            "the retention purge trims the outcomes stream with XTRIM MINID, and an erasure "
            "rebuilds it with XTRIM MINID and XGROUP CREATECONSUMER; upgrade Redis"
        )

    def close(self, timeout_s: float = 30.0) -> None:
        """Write everything buffered; if Redis does not answer, what is left goes to the
        journal at once."""
        self._stop_writer(timeout_s)
        if self._client is not None:
            with contextlib.suppress(Exception):  # it lapses after REPLICA_TTL_S anyway
                self._client.zrem(self.key("replicas"), self.replica_id)
            self._client.close()
        if self._claim is not None:
            self._claim.close()  # releases the journal for the next process
            self._claim = None

    def unavailable(self, exc: BaseException) -> None:
        """Redis did not answer, or refused this replica's password or a command (its ACL):
        that is no outage but a setting to fix, logged as an error once and in ``refusal``
        (readiness fails) until Redis takes them (:meth:`_refresh`). Either way the outcomes
        wait in the journal and the budgets are held as in an outage."""
        refused = refused_credentials(exc)
        if refused is not None and self.credentials_refused is None:
            log.error("%s; this replica reports itself not ready until then", refused)
        if refused is not None:
            self.credentials_refused = refused
        super().unavailable(exc)

    def health(self) -> dict[str, Any]:
        """Whether the writer runs and Redis answers, why this replica refuses its Redis or
        Redis refuses it (``refusal``: readiness fails), and the writer's counters."""
        return {
            "store": "redis",
            "connected": self.connected,
            "refusal": self.refusal or self.credentials_refused,
            **super().health(),
            "buffered": len(self._buffer),
            "journal_lines": self._journal_lines,
        }

    # -- writing ---------------------------------------------------------------------------

    @property
    def unreadable_path(self) -> Path:
        """Where unreadable journal lines are moved when it is read (``NAME.unreadable``)."""
        return self.journal.with_name(self.journal.name + ".unreadable")

    def _journal_files(self) -> list[Path]:
        draining = self.journal.with_suffix(self.journal.suffix + ".draining")
        return [p for p in (draining, self.journal) if p.exists()]

    def _keep_elsewhere(self, items: list[Item]) -> bool:
        """Append items to the journal (caller holds the lock); False, logged and counted in
        ``journal_errors``, when the journal cannot be written."""
        try:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            with self.journal.open("a", encoding="utf-8") as fh:
                for item in items:
                    fh.write(_encode(item) + "\n")
                fh.flush()
        except OSError as exc:
            self.journal_errors += 1
            if self.journal_errors == 1 or self.journal_errors % 1000 == 0:
                log.error(
                    "cannot write the outcome journal %s (%s): holding up to %d outcomes in "
                    "memory until Redis takes them (TIERGATE_OUTCOME_JOURNAL_PATH must be "
                    "writable)",
                    self.journal,
                    exc,
                    _MEMORY_FACTOR * self.buffer_size,
                )
            return False
        self._journal_lines += len(items)
        self.spilled += len(items)
        return True

    def _has_backlog(self) -> bool:
        return self._journal_lines > 0

    def _tend(self, idle: bool) -> None:
        """Share the cooldowns started here; replay the journal once the buffer is empty; every
        second, refresh the shared spend (other replicas spend too), this replica's heartbeat
        and the shared cooldowns, and count the live replicas."""
        if self._cooldowns_out:
            self._publish_cooldowns()
        if idle and self._journal_lines:
            if not self.connected:  # still down: fail on a PING, not after parsing the journal
                self._client.ping()
            self._replay_journal()
        if time.monotonic() - self._last_refresh > 1.0:
            self._refresh()

    def _refresh(self) -> None:
        """Read today's shared spend into the ledger, beat this replica's heartbeat, count the
        live replicas and read the models' shared cooldowns: one round trip. Every third of
        the holds' TTL it renews the budget holds of this replica's requests in flight in the
        same round trip (:meth:`_renew_holds`); until Redis said its version, it asks
        (:meth:`_recheck_version`)."""
        if not self._version_known:
            self._recheck_version()
        now = time.time()
        names = list(self._cooldown_names())
        pipe = self._client.pipeline(transaction=False)
        pipe.hgetall(self._spend_key(now))
        self._heartbeat_script(
            keys=[self.key("replicas")], args=[self.replica_id, REPLICA_TTL_S], client=pipe
        )
        for name in names:
            pipe.get(self.key("cooldown", valid_text(name)))
            pipe.pttl(self.key("cooldown", valid_text(name)))
        renewing = time.monotonic() - self._holds_renewed >= self.hold_ttl_s / 3
        if renewing:
            self._renew_holds(pipe)
        spend, live, *cooling = _denied_as_noperm(pipe.execute)[: 2 + 2 * len(names)]
        read = time.monotonic()
        if renewing:
            self._holds_renewed = read
        self.ledger.load(*_day_spend(_day(now), spend))
        self.replicas = max(int(live), 1)
        self.credentials_refused = None
        self.spend_known = True
        # Ends on this host's clock, from what Redis says is left: no clock need agree.
        self._cooldowns_in = {
            name: (mark, read + int(ms) / 1000.0)
            for name, mark, ms in zip(names, cooling[::2], cooling[1::2], strict=True)
            if mark and int(ms) > 0
        }
        self._last_refresh = read

    def _renew_holds(self, pipe: Any) -> None:
        """Queue on ``pipe`` the renewal of this replica's budget holds, which would otherwise
        lapse after :data:`HOLD_TTL_S` however long their requests run: one script per tenant
        (:data:`_RENEW_LUA`, Redis's clock). ``ZADD XX`` and ``EXPIRE`` renew only what is
        there: a hold settled by its record, released or erased meanwhile is not put back, nor
        one taken only here while Redis was unreachable."""
        for tenant, ids in self.ledger.holding().items():
            tenant_key = valid_text(tenant)
            self._renew_script(
                keys=[self.key("hold", tenant_key), self.key("holds", tenant_key)],
                args=[self.hold_ttl_s, *(valid_text(i) for i in ids)],
                client=pipe,
            )

    # -- cooldowns (router.cooldown.SharedCooldowns) ---------------------------------------

    def share_cooldowns(self, names: Callable[[], Collection[str]]) -> None:
        """Read the shared cooldowns of the models ``names()`` gives (the policy's models that
        cool) at each refresh, the first at once."""
        with self._cond:
            self._cooldown_names = names
            self._last_refresh = 0.0
            self._cond.notify_all()

    def publish_cooldown(self, name: str, seconds: float, mark: str) -> None:
        """Have the writer set ``name``'s cooldown in Redis (:meth:`_publish_cooldowns`); no
        round trip here. One that Redis does not take lapses here, or waits for the end of
        an outage if it has not lapsed by then."""
        with self._cond:
            self._cooldowns_out[name] = (mark, time.monotonic() + seconds)
            self._cond.notify_all()

    def shared_cooldowns(self) -> dict[str, tuple[str, float]]:
        """The cooldowns read at the last refresh that have not lapsed: model -> (mark,
        seconds left). While Redis is unreachable they lapse as they would have."""
        now = time.monotonic()
        return {
            name: (mark, until - now)
            for name, (mark, until) in self._cooldowns_in.items()
            if until > now
        }

    def shared_cooldown(self, name: str) -> tuple[str, float] | None:
        """``name``'s entry of :meth:`shared_cooldowns`, or None, without building the rest."""
        entry = self._cooldowns_in.get(name)
        if entry is None:
            return None
        left = entry[1] - time.monotonic()
        return (entry[0], left) if left > 0 else None

    def _publish_cooldowns(self) -> None:
        """Set the cooldowns started here in Redis, one round trip; an outage leaves them for
        the next try (the writer's), any other Redis error drops them (logged)."""
        from redis import RedisError

        now = time.monotonic()
        with self._cond:
            out = self._cooldowns_out
            self._cooldowns_out = {}
        pipe = self._client.pipeline(transaction=False)
        for name, (mark, until) in out.items():
            ms = int((until - now) * 1000)
            if ms > 0:
                self._cooldown_script(
                    keys=[self.key("cooldown", valid_text(name))], args=[mark, ms], client=pipe
                )
        try:
            pipe.execute()
        except self.transient:
            with self._cond:  # the newer wins: a cooldown started here meanwhile
                self._cooldowns_out = {**out, **self._cooldowns_out}
            raise
        except RedisError as exc:
            log.warning("could not share the cooldowns of %s: %s", ", ".join(out), exc)

    def write_batch(self, batch: list[Item]) -> DaySpend:
        """Run each item's Lua script in one pipeline, and read today's shared spend in the same
        round trip (so swapping it in as the batch settles counts nothing twice)."""
        pipe = self._client.pipeline(transaction=False)
        for item in batch:
            if isinstance(item, OutcomeRecord):
                self._queue_record(pipe, item)
            else:
                self._queue_label(pipe, item)
        now = time.time()
        pipe.hgetall(self._spend_key(now))
        *results, spend = _denied_as_noperm(pipe.execute)
        self.duplicates += sum(int(r) == 0 for r in results)
        self.refused += sum(int(r) == 2 for r in results)
        return _day_spend(_day(now), spend)

    def set_retention_days(self, days: int | None) -> None:
        """Expire what is written from now on after ``days`` (the policy's ``retention_days``;
        None: never). Records already written keep their TTL; a label hash takes the TTL of its
        latest label."""
        self.retention_s = None if days is None else days * 86400.0

    def _ttl(self, ts: float) -> int:
        """Seconds left of the retention period for an item made at ``ts`` (0: no expiry)."""
        if self.retention_s is None:
            return 0
        return max(int(self.retention_s - (time.time() - ts)), 1)

    def _queue_record(self, pipe: Any, record: OutcomeRecord) -> None:
        ttl = self._ttl(record.ts)
        score = "" if record.score is None else repr(float(record.score))
        rid, tenant = valid_text(record.id), valid_text(record.tenant)
        bucket, hashed = erased_spend_key(record.ts, record.tenant)
        self._record_script(
            keys=[
                self.key("outcome", rid),
                self.key("outcomes"),
                self.key("outcomes", "ts"),
                self.key("outcomes", "ts", tenant),
                self.key("tenants"),
                self._spend_key(record.ts),
                self.key("scores"),
                self.key("scores", valid_text(record.alias) or "-"),
                self.key("hold", tenant),
                self.key("holds", tenant),
                self.key("erased", erased_name("request", rid)),
                self.key("erased", erased_name("tenant", tenant)),
                self._erased_spend_key(bucket),
            ],
            args=[
                valid_json(record.as_dict()),
                rid,
                repr(record.ts),
                tenant,
                repr(float(record.cost_usd)),
                ttl,
                score,
                _SCORES_CAP,
                172800,
                _STREAM_MAXLEN,
                f"{bucket}|{hashed}",
                _erased_spend_expiry(bucket),
                repr(float(record.counterfactual_cost_usd or 0.0)),
                _erased_field(tenant),
                repr(began(record.ts, record.latency_ms)),
            ],
            client=pipe,
        )

    def _queue_label(self, pipe: Any, label: Label) -> None:
        ttl = self._ttl(label.ts)
        rid = valid_text(label.request_id)
        bucket, hashed = erased_spend_key(label.ts, label.tenant)
        self._label_script(
            keys=[
                self.key("label", rid),
                self.key("labels"),
                self._spend_key(label.ts),
                self.key("outcome", rid),
                self.key("erased", erased_name("request", rid)),
                self.key("erased", erased_name("tenant", label.tenant)),
                self._erased_spend_key(bucket),
            ],
            args=[
                valid_text(label.source),
                valid_json(label.as_dict()),
                valid_text(f"{rid}|{label.source}"),
                repr(label.ts),
                valid_text(label.tenant),
                repr(float(label.cost_usd)),
                ttl,
                f"{bucket}|{hashed}",
                _erased_spend_expiry(bucket),
                _erased_field(label.tenant),
            ],
            client=pipe,
        )

    def _replay_journal(self) -> None:
        """Write the journal to Redis, oldest file first, then delete it."""
        draining = self.journal.with_suffix(self.journal.suffix + ".draining")
        with self._cond:
            if not draining.exists() and self.journal.exists():
                self.journal.replace(draining)
        if not draining.exists():
            return
        items = _set_aside_unreadable(draining, self.unreadable_path)
        spend = None
        for i in range(0, len(items), self._batch):
            spend = self._write(items[i : i + self._batch]) or spend
        with self._cond:
            draining.unlink()
            self._journal_lines -= len(items)
            self._settle(items, spend)
            after_outage = self._outage is not None
        if not after_outage:  # after an outage, the line saying it is over counts them
            log.info("replayed %d journalled outcome items into redis", len(items))

    # -- reading ---------------------------------------------------------------------------

    def _read(self, fn: Any, *args: Any) -> Any:
        import redis

        try:
            return fn(*args)
        except redis.RedisError as exc:
            raise StoreUnavailableError(f"outcome store (redis) unavailable: {exc}") from exc

    def reserve_spend(self, tenant: str, request_id: str, usd: float, budget: float | None) -> bool:
        """Hold ``usd`` in Redis unless the tenant's spend plus every replica's holds has
        reached ``budget`` (one Lua script). With Redis unreachable, the check runs on this
        replica's view (:meth:`spend_today`) against its share of the budget
        (:meth:`_outage_budget`). This replica's budget checks see its holds at once; in Redis
        a hold lapses after :data:`HOLD_TTL_S` unless this replica renews it (:meth:`_refresh`)."""
        from redis import RedisError

        if time.monotonic() < self._holds_down_until:
            return self.ledger.reserve(tenant, request_id, usd, self._outage_budget(tenant, budget))
        tenant_key = valid_text(tenant)
        now = time.time()
        try:
            held = bool(
                self._reserve_script(
                    keys=[
                        self._spend_key(now),
                        self.key("hold", tenant_key),
                        self.key("holds", tenant_key),
                    ],
                    args=[
                        tenant_key,
                        valid_text(request_id),
                        repr(float(usd)),
                        -1.0 if budget is None else repr(float(budget)),
                        _erased_field(tenant_key),
                        self.hold_ttl_s,
                    ],
                )
            )
        except (RedisError, OSError) as exc:
            self._holds_down(exc)
            return self.ledger.reserve(tenant, request_id, usd, self._outage_budget(tenant, budget))
        if held:
            self.ledger.hold(tenant, request_id, usd)
        return held

    def hold_refusal(self, tenant: str, budget: float) -> str:
        """Why a hold was refused under the budget: in an outage, this replica's share of what
        was left (:meth:`_outage_budget`) is used, which the spend alone does not show."""
        if time.monotonic() >= self._holds_down_until:
            return super().hold_refusal(tenant, budget)
        if not self.spend_known:
            return (
                "; the outcome store is unreachable and this replica has not read the shared "
                "spend since it started, so it holds no budgeted spend until the store is back"
            )
        share = self._outage_budget(tenant, budget)
        return (
            "; the outcome store is unreachable, and this replica may spend up to "
            f"{usd(share if share is not None else budget)} of it, its share of what was left"
        )

    def hold_retry_s(self, tenant: str, budget: float) -> float | None:
        """In an outage, where this replica's spend alone has reached its share of the budget
        (:meth:`_outage_budget`), no hold it frees lets a retry pass, only Redis's return:
        :data:`HOLD_RETRY_S`, the wait before its holds ask Redis again. Else None."""
        if time.monotonic() >= self._holds_down_until:
            return None
        share = self._outage_budget(tenant, budget)
        paid = self.ledger.get(tenant) - self.ledger.held(tenant)
        return None if share is not None and paid < share else HOLD_RETRY_S

    def _outage_budget(self, tenant: str, budget: float | None) -> float | None:
        """The budget this replica checks while Redis is unreachable: the tenant's shared spend
        at the last refresh plus this replica's share of what was left then (1 / the replicas
        alive then), so that N replicas cannot each spend the whole remainder. None to share
        for a replica that never read the spend (started during the outage): it knows neither
        what was spent nor by how many, and checking the whole budget against $0 let each
        such replica spend the budget again."""
        if budget is None:
            return None
        if not self.spend_known:
            return 0.0
        if self.replicas <= 1:
            return budget
        shared = self.ledger.shared(tenant)
        return shared + max(budget - shared, 0.0) / self.replicas

    def release_spend(self, request_id: str) -> None:
        """Drop a hold taken by :meth:`reserve_spend` here and in Redis, where it would
        otherwise count against the budget until it lapses. Best effort: with Redis
        unreachable (or failed within :data:`HOLD_RETRY_S`) the hold lapses after
        :data:`HOLD_TTL_S`."""
        from redis import RedisError

        tenant = self.ledger.release(request_id)
        if tenant is None or time.monotonic() < self._holds_down_until:
            return
        tenant_key, rid = valid_text(tenant), valid_text(request_id)
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.hdel(self.key("hold", tenant_key), rid)
            pipe.zrem(self.key("holds", tenant_key), rid)
            pipe.execute()
        except (RedisError, OSError) as exc:
            self._holds_down(exc)

    def _holds_down(self, exc: BaseException) -> None:
        # Holds skip Redis for HOLD_RETRY_S; the outage is logged once, shared with the writer.
        self._holds_down_until = time.monotonic() + HOLD_RETRY_S
        self.unavailable(exc)

    def get(self, record_id: str) -> dict[str, Any] | None:
        """One record by request id, including one still buffered here."""
        queued = self.queued(record_id)
        if queued is not None:
            return queued
        raw = self._read(self._client.get, self.key("outcome", record_id))
        return json.loads(raw) if raw else None

    def recent(self, limit: int = 20, tenant: str | None = None) -> list[dict[str, Any]]:
        """The newest records, newest first."""
        index = self.key("outcomes", "ts", tenant) if tenant else self.key("outcomes", "ts")
        ids = self._read(self._client.zrevrange, index, 0, limit - 1)
        if not ids:
            return []
        raws = self._read(self._client.mget, [self.key("outcome", i) for i in ids])
        return [json.loads(r) for r in raws if r]

    def count(self, tenant: str | None = None) -> int:
        """How many records are stored (within the retention period)."""
        index = self.key("outcomes", "ts", tenant) if tenant else self.key("outcomes", "ts")
        return int(self._read(self._client.zcard, index))

    def recent_scores(self, alias: str | None = None, limit: int = 2000) -> list[float]:
        """Scores of recent scored requests, newest first."""
        key = self.key("scores", alias) if alias else self.key("scores")
        return [float(s) for s in self._read(self._client.lrange, key, 0, limit - 1)]

    def labels(self, since: float = 0.0, limit: int | None = None) -> list[dict[str, Any]]:
        """Stored labels newer than ``since``, oldest first."""
        members = self._read(
            self._client.zrangebyscore,
            self.key("labels"),
            f"({since!r}",
            "+inf",
            0,
            -1 if limit is None else limit,
        )
        pipe = self._client.pipeline(transaction=False)
        for member in members:
            request_id, source = member.rsplit("|", 1)
            pipe.hget(self.key("label", request_id), source)
        return [json.loads(r) for r in self._read(pipe.execute) if r]

    def window(self, since_ts: float) -> list[WindowRow]:
        """The records stored since ``since_ts``, oldest first."""
        index = self.key("outcomes", "ts")
        ids = self._read(self._client.zrangebyscore, index, since_ts, "+inf")
        if not ids:
            return []
        raws = self._read(self._client.mget, [self.key("outcome", i) for i in ids])
        return [WindowRow.of(json.loads(r)) for r in raws if r]

    def tiered_labels(self, since_ts: float, tenant: str | None = None) -> list[TieredLabel]:
        """Labels stored since ``since_ts`` on records still stored, with the record's tier;
        only ``tenant``'s when given."""
        labels = [
            label
            for label in self.labels(math.nextafter(since_ts, -math.inf))
            if tenant is None or label.get("tenant") == tenant
        ]
        ids = sorted({str(label["request_id"]) for label in labels})
        if not ids:
            return []
        raws = self._read(self._client.mget, [self.key("outcome", i) for i in ids])
        tier_of = {i: json.loads(r).get("tier") for i, r in zip(ids, raws, strict=True) if r}
        return [
            TieredLabel(
                tier_of[lb["request_id"]],
                lb["source"],
                lb["value"],
                lb.get("quality"),
                float(lb.get("cost_usd") or 0.0),
            )
            for lb in labels
            if lb["request_id"] in tier_of
        ]

    def labels_of(self, request_id: str) -> list[dict[str, Any]]:
        """The stored labels of one request, whatever their age, oldest first."""
        raws = self._read(self._client.hvals, self.key("label", request_id))
        return sorted((json.loads(r) for r in raws), key=lambda lb: float(lb.get("ts") or 0.0))

    def erase(self, request_ids: Collection[str] = (), tenant: str | None = None) -> Erased:
        """Delete the records and labels of ``request_ids``, or all of ``tenant``'s: their keys,
        their places in the time indexes and their entries in the ``outcomes`` stream (read
        whole, as nothing indexes it by request). Their tombstones are set first, so that what
        a replica writes for them from then on is refused, and what it wrote before is found
        and deleted here. Then a tenant's name leaves the spend hashes and the hold keys
        (:meth:`_unname_spend`), the stream is rebuilt without their bytes
        (:meth:`_rebuild_stream`), and Redis rewrites its append-only file
        (:meth:`rewrite_aof`), which held every command that wrote them."""
        client = self._client
        ids = set(request_ids)
        names = [erased_name("request", rid) for rid in ids]
        if tenant is not None:
            names.append(erased_name("tenant", tenant))
        now = time.time()
        pipe = client.pipeline(transaction=True)
        for name in names:
            pipe.set(self.key("erased", name), repr(now), ex=ERASURE_KEPT_S)
        self._read(pipe.execute)
        if tenant is not None:
            from router.limits import unname_windows

            self._read(self._unname_spend, tenant)
            self._read(unname_windows, client, tenant)
            ids.update(self._read(client.zrange, self.key("outcomes", "ts", tenant), 0, -1))
            ids.update(self._label_ids_of(tenant))
        records, labels = self._delete_items(sorted(ids), tenant)
        if tenant is not None:
            self._read(self._forget_tenant, tenant)
        if ids or tenant is not None:
            self._read(self._drop_from_stream, ids, tenant, now)
        files = self._erase_from_files(ids, set(request_ids), tenant)
        stream = self._rebuild_stream()
        return Erased(records, labels, *files, stream=stream, aof=self.rewrite_aof())

    def compact(self) -> Erased:
        """Rebuild the ``outcomes`` stream whatever says it holds erased bytes, and have Redis
        rewrite its append-only file (``tiergate outcomes delete --compact``): for entries that
        an erasure of a release before the rebuild deleted with ``XDEL``, which Redis 6.2 cannot
        tell apart (Redis 7 can: :meth:`_deleted_since_rebuild`, and every erasure checks)."""
        return Erased(0, 0, stream=self._rebuild_stream(force=True), aof=self.rewrite_aof())

    def _delete_items(self, ordered: list[str], tenant: str | None) -> tuple[int, int]:
        """Delete the records and labels of ``ordered`` (request ids) and their places in the
        indexes (``tenant``'s, the erased tenant's, whatever the set of tenants says), 500 to a
        transaction, keeping what they cost (:func:`erased_spend`); how many records and labels
        went."""
        client = self._client
        tenants = set(self._read(client.smembers, self.key("tenants"))) if ordered else set()
        tenants.update([tenant] if tenant is not None and ordered else [])
        records = labels = 0
        for i in range(0, len(ordered), 500):
            chunk = ordered[i : i + 500]
            sources = self._read(self._label_sources, chunk)
            costs = self._read(self._costs, chunk)
            pipe = client.pipeline(transaction=True)
            pipe.delete(*[self.key("outcome", x) for x in chunk])
            pipe.delete(*[self.key("label", x) for x in chunk])
            pipe.zrem(self.key("outcomes", "ts"), *chunk)
            for name in tenants:
                pipe.zrem(self.key("outcomes", "ts", name), *chunk)
            members = [f"{x}|{s}" for x, found in zip(chunk, sources, strict=True) for s in found]
            if members:
                pipe.zrem(self.key("labels"), *members)
            for (bucket, name), sums in erased_spend(costs).items():
                key = self._erased_spend_key(bucket)
                for measure, spent in zip(_ERASED_MEASURES, sums, strict=True):
                    if spent:
                        pipe.hincrbyfloat(key, f"{bucket}|{name}{measure}", spent)
                pipe.expireat(key, _erased_spend_expiry(bucket))
            gone, _, *_ = self._read(pipe.execute)
            records += int(gone)
            labels += len(members)
        return records, labels

    def rewrite_aof(self, wait_s: float = AOF_WAIT_S) -> str | None:
        """Have Redis rewrite its append-only file, if it keeps one, so that the commands that
        wrote what an erasure deleted (prompts included) leave the disk: ``rewriting`` once
        Redis took ``BGREWRITEAOF``, None where it keeps no such file, else why it could not
        be asked (the erasure stands all the same).

        A rewrite already running copies the data as it was when it began, erased items
        included, and Redis refuses a second one meanwhile: this waits up to ``wait_s`` for it
        to end, then asks again. ``CONFIG`` or ``BGREWRITEAOF`` may be refused (an ACL, a
        managed Redis that renames them): that is said, never raised."""
        import redis

        client = self._client
        try:
            setting = client.config_get("appendonly").get("appendonly")
        except redis.RedisError as exc:
            return f"not known: CONFIG GET appendonly: {exc}"
        if setting != "yes":
            return None
        deadline = time.monotonic() + wait_s
        while True:
            try:
                client.bgrewriteaof()
                return "rewriting"
            except redis.ResponseError as exc:
                if "already in progress" not in str(exc) or time.monotonic() > deadline:
                    return f"not rewritten: BGREWRITEAOF: {exc}"
            except redis.RedisError as exc:
                return f"not rewritten: BGREWRITEAOF: {exc}"
            time.sleep(AOF_POLL_S)

    def _forget_tenant(self, tenant: str) -> None:
        # The erasure took the ids it deletes out of the tenant's index one by one: a request
        # the tenant made once it began is its own (recorded, under its name) and keeps its
        # place there, so that the next erasure or export finds it. The tenant leaves the set
        # of tenants only with an empty index, unless a record is written meanwhile (WATCH).
        import redis

        index = self.key("outcomes", "ts", tenant)
        with self._client.pipeline(transaction=True) as pipe, contextlib.suppress(redis.WatchError):
            pipe.watch(index)
            if pipe.zcard(index) == 0:
                pipe.multi()
                pipe.srem(self.key("tenants"), tenant)
                pipe.execute()

    def _unname_spend(self, tenant: str) -> None:
        """Move ``tenant``'s spend in every day's spend hash to its erased field, where budgets
        still count it, and delete its budget holds, in one script: nothing in Redis names it
        after. The record of a request made (begun) before the erasure and written after it,
        one still being answered now included, is refused by the tombstone and its cost
        counted in the erased field; a request the tenant makes later is its own again, under
        its name (SECURITY.md)."""
        name = valid_text(tenant)
        spends = sorted(self._client.scan_iter(match=self._under("spend"), count=1000))
        self._erase_spend_script(
            keys=[self.key("hold", name), self.key("holds", name), *spends],
            args=[name, _erased_field(name)],
        )

    def _erase_from_files(
        self, ids: set[str], named: set[str], tenant: str | None
    ) -> tuple[int | None, int, int]:
        """Erase from the journal (:meth:`_erase_from_journal`), then from the lines of it set
        aside as unreadable (:func:`_erase_unreadable`, by the ids ``named`` and ``tenant``)."""
        journal = self._erase_from_journal(ids, tenant)
        return (journal, *_erase_unreadable(self.unreadable_path, named, tenant))

    def _erase_from_journal(self, ids: set[str], tenant: str | None) -> int | None:
        """Drop the items of ``ids`` and ``tenant`` from the journal an earlier run left (the
        next start would replay them into Redis); how many went, or None when a running
        Tiergate holds a journal that has some of them."""

        def erased(item: Item) -> bool:
            request_id = item.id if isinstance(item, OutcomeRecord) else item.request_id
            return item.tenant == tenant or request_id in ids

        if not self._journal_files():
            return 0
        free, claim = lock_beside(self.journal)
        try:
            gone = 0
            for path in self._journal_files():
                if free:  # no holder: a line that cannot be read was cut short, set it aside
                    items = _set_aside_unreadable(path, self.unreadable_path)
                else:
                    try:
                        items = _read_journal(path)
                    except ValueError:  # a line its holder is writing
                        return None
                kept = [item for item in items if not erased(item)]
                if len(kept) == len(items):
                    continue
                if not free:
                    return None
                spare = path.with_name(path.name + ".erasing")
                with spare.open("w", encoding="utf-8") as fh:
                    fh.writelines(_encode(item) + "\n" for item in kept)
                spare.replace(path)
                gone += len(items) - len(kept)
            return gone
        finally:
            if claim is not None:
                claim.close()

    def _costs(self, ids: list[str]) -> list[Cost]:
        """What the records and shadow labels of ``ids`` cost."""
        pipe = self._client.pipeline(transaction=False)
        for x in ids:
            pipe.get(self.key("outcome", x))
            pipe.hget(self.key("label", x), "shadow")
        costs: list[Cost] = []
        for raw in pipe.execute():
            if not raw:
                continue
            item = json.loads(raw)
            when, tenant = float(item["ts"]), str(item["tenant"])
            spent = float(item.get("cost_usd") or 0.0)
            if "id" in item:  # a record; else the shadow label
                counterfactual = float(item.get("counterfactual_cost_usd") or 0.0)
                costs.append((when, tenant, 0.0, spent, counterfactual))
            else:
                costs.append((when, tenant, spent, 0.0, 0.0))
        return costs

    def erased_spend_buckets(self, since_ts: float, tenant: str | None = None) -> list[ErasedSpend]:
        """What erased items made since ``since_ts`` cost, per bucket (``tenant``'s only)."""
        today = _day(time.time())
        first = max(_day(since_ts), today - ERASED_SPEND_KEPT_S // 86400 - 1)
        pipe = self._client.pipeline(transaction=False)
        for day in range(first, today + 1):
            pipe.hgetall(self._erased_spend_key(day * 86400))
        name = None if tenant is None else erased_name("tenant", tenant)
        sums: dict[float, list[float]] = {}
        for kept in self._read(pipe.execute):
            for field, spent in kept.items():
                bucket, who, *measure = field.split("|")
                if float(bucket) >= since_ts and name in (None, who):
                    at = _ERASED_MEASURES.index("".join("|" + m for m in measure))
                    sums.setdefault(float(bucket), [0.0, 0.0, 0.0])[at] += float(spent)
        return [ErasedSpend(ts, *three) for ts, three in sorted(sums.items())]

    def _label_sources(self, ids: list[str]) -> list[list[str]]:
        pipe = self._client.pipeline(transaction=False)
        for x in ids:
            pipe.hkeys(self.key("label", x))
        return [list(found) for found in pipe.execute()]

    def _label_ids_of(self, tenant: str) -> set[str]:
        """Request ids with a label of ``tenant``'s (its record may be gone already)."""
        members = self._read(self._client.zrange, self.key("labels"), 0, -1)
        ids = sorted({m.rsplit("|", 1)[0] for m in members})
        pipe = self._client.pipeline(transaction=False)
        for x in ids:
            pipe.hvals(self.key("label", x))
        found = self._read(pipe.execute)
        return {
            x
            for x, raws in zip(ids, found, strict=True)
            if any(json.loads(r).get("tenant") == tenant for r in raws)
        }

    def _drop_from_stream(
        self, ids: set[str], tenant: str | None = None, erased_at: float = 0.0
    ) -> None:
        """XDEL the stream entries of ``ids`` and, for a tenant's erasure at ``erased_at``, of
        the tenant's records begun before it (:func:`began`, as its tombstone refuses them): an
        erasure killed once it had deleted the tenant's index left no other way to find them,
        and running it again left them in the stream."""
        # Each XDEL counts in the erasures hash, in the same transaction: a rebuild that began
        # before it sees the count change and starts again (its copy may hold what it deleted).
        stream, start = self.key("outcomes"), "-"
        spelled = [] if tenant is None else [s.decode() for s in _spellings(tenant)]

        def erased(fields: dict[str, str]) -> bool:
            if fields.get("id") in ids:
                return True
            raw = fields.get("record", "")
            if not any(s in raw for s in spelled):
                return False
            record = json.loads(raw)
            made = began(float(record["ts"]), float(record.get("latency_ms") or 0.0))
            return bool(record.get("tenant") == tenant and made <= erased_at)

        while True:
            entries = self._client.xrange(stream, start, "+", count=1000)
            gone = [entry for entry, fields in entries if erased(fields)]
            if gone:
                pipe = self._client.pipeline(transaction=True)
                pipe.xdel(stream, *gone)
                pipe.hincrby(self.key("outcomes", "erasures"), "deleted", 1)
                pipe.execute()
            if len(entries) < 1000:
                return
            start = "(" + entries[-1][0]

    def _rebuild_stream(self, force: bool = False) -> str | None:
        """Copy the ``outcomes`` stream, entry by entry with their IDs, into a new key and
        rename it over the stream, if an erasure deleted entries since it was last rebuilt
        (or, on Redis 7, anything did: :meth:`_deleted_since_rebuild`), or ``force``:
        ``XDEL`` only marks an entry deleted and leaves its bytes (a prompt) in memory, in
        what Redis writes to disk and in what a new replica is sent, until every entry of its
        block is gone. None once no erased bytes are left, else why they may be (the
        erasure stands; the next erasure tries again).

        Entries are copied :data:`REBUILD_BATCH` at a time, so Redis is never blocked for
        long; one script copies the last few and swaps the keys (:data:`_REBUILD_LUA`), so
        that no entry a replica adds meanwhile is lost. An erasure that deletes entries while
        the copy is made has the copy made again. The copies a killed rebuild left are
        deleted first (:meth:`_drop_copies`)."""
        import redis

        client, counts = self._client, self.key("outcomes", "erasures")
        try:
            too_old = self._too_old()
            if too_old:  # it would copy the stream and fail at the end, on every erasure
                return f"not rebuilt: {too_old}, then run `tiergate outcomes delete --compact`"
            self._drop_copies()
            for _ in range(REBUILD_TRIES):
                deleted, rebuilt, rebuilt_id = client.hmget(
                    counts, "deleted", "rebuilt", "rebuilt-id"
                )
                deleted = deleted or "0"
                stale = deleted != (rebuilt or "0") or self._deleted_since_rebuild(rebuilt_id)
                if not (stale or force):
                    return None
                done = self._copy_stream(deleted)
                if isinstance(done, str):
                    return f"not rebuilt: {done}"
                if done:
                    return None
        except redis.RedisError as exc:
            return f"not rebuilt: {exc}"
        return f"not rebuilt: other erasures deleted entries during each of {REBUILD_TRIES} tries"

    def _deleted_since_rebuild(self, rebuilt_id: str | None) -> bool:
        """Whether Redis (7 and later) says an entry was deleted from the stream (``XDEL``)
        since it was last rebuilt: its ``max-deleted-entry-id`` is not the one the rebuild
        left. An erasure of a release before the rebuild counted no deletion, but moved it.
        Redis 6.2 has no such field: False (``--compact`` rebuilds it there)."""
        stream = self.key("outcomes")
        if not self._client.exists(stream):
            return False
        last = self._client.xinfo_stream(stream).get("max-deleted-entry-id")
        return last is not None and last not in ("0-0", rebuilt_id)

    def _drop_copies(self) -> None:
        """Delete every rebuild's copy (``P:outcomes:rebuild:*``). One a killed rebuild left
        holds the entries live when it was made, which a later erasure may have deleted from
        the stream: it would keep them for up to :data:`REBUILD_TTL_S`. A rebuild running
        meanwhile finds its copy short, and makes it again."""
        copies = list(self._client.scan_iter(match=self._under("outcomes", "rebuild"), count=1000))
        if copies:
            self._client.delete(*copies)

    def _copy_stream(self, deleted: str) -> bool | str:
        """One try of :meth:`_rebuild_stream`: True when the copy replaced the stream, False
        when an erasure deleted entries meanwhile (try again), else why it gave up.

        The consumer groups' pending entries are copied before the last script too
        (:meth:`_copy_pending`), which then copies those delivered since and those of the
        consumers whose count changed (:data:`_REBUILD_LUA`): when more than
        :data:`REBUILD_PENDING_LAST` would be, they are all copied again first, up to
        :data:`REBUILD_TRIES` times. Entries another client deletes
        from the stream meanwhile (a consumer's ``XDEL``) are deleted from the copy, by the
        last script among the last :data:`REBUILD_LAST` copied, else first
        (:meth:`_prune_copy`), up to :data:`REBUILD_TRIES` times: the swap gave them back."""
        import redis

        client, stream = self._client, self.key("outcomes")
        copy = self.key("outcomes", "rebuild", uuid.uuid4().hex)
        keys = (stream, copy, copy + ":marks")
        last, copied, upto, rounds, prunes = "-", 0, "", 0, 0
        try:
            while True:
                start = last if last == "-" else "(" + last
                entries = client.xrange(stream, start, "+", count=REBUILD_BATCH)
                if not (len(entries) > REBUILD_LAST or (entries and not upto)):
                    if not upto:  # every entry is in the copy: copy their pending entries
                        self._copy_pending(keys, last)
                        upto = last
                        continue
                    done = self._swap(keys, [last, copied, REBUILD_LAST, deleted])
                    code = int(done[0])
                    if code >= 0:
                        return code == 1
                    if code == -3:  # entries deleted from the stream are still in the copy
                        prunes += 1
                        if prunes == REBUILD_TRIES:
                            return (
                                "another client deleted stream entries (XDEL) faster than they "
                                f"could be deleted from the copy, in each of {REBUILD_TRIES} "
                                "tries (a consumer deleting what it read, far behind the stream's "
                                "end?)"
                            )
                        copied, last = int(done[1]), str(done[2])
                        copied -= self._prune_copy(keys, last, int(done[3]))
                        continue
                    if code == -2:  # more pending entries changed than the script may copy
                        rounds += 1
                        if rounds == REBUILD_TRIES:
                            return (
                                "the consumer groups' pending entries changed faster than they "
                                f"could be copied, in each of {REBUILD_TRIES} tries (a consumer "
                                "acknowledging or claiming entries it was delivered before the "
                                f"copy began, or over {REBUILD_PENDING_LAST} delivered and not "
                                "acknowledged while it was made?)"
                            )
                        upto = ""
                    continue  # more came meanwhile than the script may copy
                pipe = client.pipeline(transaction=False)
                for entry, fields in entries:
                    pipe.xadd(copy, fields, id=entry)
                pipe.expire(copy, REBUILD_TTL_S)
                pipe.execute()
                last, copied = entries[-1][0], copied + len(entries)
        finally:
            with contextlib.suppress(redis.RedisError):
                client.delete(copy, keys[2])  # the copy is gone once renamed

    def _swap(self, keys: tuple[str, str, str], args: list[Any]) -> list[Any]:
        """Run the rebuild's last script (:data:`_REBUILD_LUA`) on ``keys`` (the stream, its
        copy, the consumers' marks) with ``args`` and the most pending entries it may copy;
        what it returned."""
        stream, copy, marks = keys
        erasures = self.key("outcomes", "erasures")
        return list(
            self._rebuild_script(
                keys=[stream, copy, erasures, copy + ":old", marks],
                args=[*args, REBUILD_PENDING_LAST],
            )
        )

    def _prune_copy(self, keys: tuple[str, str, str], last: str, extra: int) -> int:
        """Delete from the copy (``keys``: the stream, its copy, the consumers' marks) the
        entries that another client deleted from the stream since they were copied: compared
        from the copy's ``last`` entry back, :data:`REBUILD_BATCH` per script
        (:data:`_PRUNE_LUA`), until the ``extra`` entries the last script counted are found or
        the copy's first entry is passed. Those deleted near the stream's end (a consumer that
        deletes what it read) are found first. How many went."""
        stream, copy, _ = keys
        start, gone = last, 0
        while gone < extra:
            removed, oldest = self._prune_script(keys=[stream, copy], args=[start, REBUILD_BATCH])
            gone += int(removed)
            if not oldest:
                break
            start = "(" + oldest
        return gone

    def _copy_pending(self, keys: tuple[str, str, str], upto: str) -> None:
        """Copy the pending entries of every consumer of the stream's groups (``keys``: the
        stream, its copy, the marks) into the copy, as far as each group's boundary: the entry
        last delivered to it now, or ``upto`` (the last in the copy) if that comes first.
        :data:`REBUILD_PENDING_LAST` at a time: one script per batch
        (:data:`_PENDING_BATCH_LUA`), so none holds Redis for long, and each keeps the
        entries' consumer, delivery count and idle time. The last script copies the entries
        delivered after the boundary (:data:`_PENDING_LUA`). What an earlier round copied and
        marked is copied again: its boundary is past."""
        import redis

        client, (stream, copy, marks) = self._client, keys
        client.delete(marks)
        for group in client.xinfo_groups(stream):
            name = group["name"]
            try:
                client.xgroup_create(copy, name, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):  # made by an earlier round: that is fine
                    raise
            client.expire(copy, REBUILD_TTL_S)
            in_copy = upto if upto != "-" else "0-0"  # "-": the copy is empty
            bound = min(group["last-delivered-id"], in_copy, key=_entry_id)
            client.hset(marks, "@" + name, bound)  # no consumer's field begins with "@"
            for consumer in client.xinfo_consumers(stream, name):
                self._copy_consumer(keys, name, consumer["name"], bound)
        client.expire(marks, REBUILD_TTL_S)

    def _copy_consumer(
        self, keys: tuple[str, str, str], group: str, consumer: str, bound: str
    ) -> None:
        """One consumer's part of :meth:`_copy_pending`, up to its group's ``bound``. Its mark
        is kept when its copy ends with its count as the mark says, and dropped (the last
        script copies it whole, or has it copied again) when it changed during each of
        :data:`REBUILD_TRIES` tries."""
        client, (stream, copy, marks) = self._client, keys
        field = _mark_field(group, consumer)
        for _ in range(REBUILD_TRIES):
            client.xgroup_delconsumer(copy, group, consumer)  # what a try copied before
            mark, start, count = "", "-", REBUILD_PENDING_LAST
            while count == REBUILD_PENDING_LAST:
                mark, count, last = self._pending_script(
                    keys=[stream, copy],
                    args=[group, consumer, start, bound, REBUILD_PENDING_LAST, mark],
                )
                start = last or start
            if count >= 0:
                if mark:
                    client.hset(marks, field, mark)
                return
        client.xgroup_delconsumer(copy, group, consumer)

    def purge(self, before_ts: float) -> int:
        """Delete records older than ``before_ts`` with all their labels, and labels older than
        it (keys also expire by TTL)."""
        client = self._client
        old_ids = self._read(client.zrangebyscore, self.key("outcomes", "ts"), "-inf", before_ts)
        tenants = self._read(client.smembers, self.key("tenants"))
        old_labels = self._read(client.zrangebyscore, self.key("labels"), "-inf", before_ts)
        sources = self._read(self._label_sources, old_ids)
        pipe = client.pipeline(transaction=False)
        for i in range(0, len(old_ids), 500):
            pipe.delete(*[self.key("outcome", x) for x in old_ids[i : i + 500]])
            pipe.delete(*[self.key("label", x) for x in old_ids[i : i + 500]])
        later = [f"{x}|{s}" for x, found in zip(old_ids, sources, strict=True) for s in found]
        for i in range(0, len(later), 500):  # labels given after their record was made
            pipe.zrem(self.key("labels"), *later[i : i + 500])
        pipe.zremrangebyscore(self.key("outcomes", "ts"), "-inf", before_ts)
        for tenant in tenants:
            pipe.zremrangebyscore(self.key("outcomes", "ts", tenant), "-inf", before_ts)
        for member in old_labels:
            request_id, source = member.rsplit("|", 1)
            pipe.hdel(self.key("label", request_id), source)
        pipe.zremrangebyscore(self.key("labels"), "-inf", before_ts)
        # Exact: an approximate trim (redis-py's default) drops whole blocks of entries only,
        # at most 10,000 entries a call, and left older ones readable past the retention.
        pipe.xtrim(self.key("outcomes"), minid=f"{int(before_ts * 1000)}-0", approximate=False)
        today = _day(time.time())
        for day in range(today - ERASED_SPEND_KEPT_S // 86400 - 1, _day(before_ts) + 1):
            key = self._erased_spend_key(day * 86400)
            fields = self._read(client.hkeys, key)
            old = [f for f in fields if float(f.partition("|")[0]) < before_ts]
            if old:
                pipe.hdel(key, *old)
        self._read(pipe.execute)
        return len(old_ids)


#: The ends of the erased spend fields (``<bucket>|<tenant hash>``) for each measure that
#: :func:`~router.outcomes.erased_spend` sums: judging, requests, counterfactual.
_ERASED_MEASURES = ("", "|requests", "|counterfactual")


def _mark_field(group: str, consumer: str) -> str:
    """A consumer's field in a rebuild's hash of marks (as ``key`` in :data:`_PENDING_LUA`)."""
    return f"{len(group.encode())}:{group}{consumer}"


def _entry_id(entry: str) -> tuple[int, int]:
    """A stream entry id (``<ms>-<seq>``) as numbers, to compare."""
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq)


def _erased_spend_expiry(bucket: int) -> int:
    """When the erased spend hash of ``bucket``'s day expires (:data:`ERASED_SPEND_KEPT_S`)."""
    return (_day(bucket) + 1) * 86400 + ERASED_SPEND_KEPT_S


def _read_journal(path: Path) -> list[Item]:
    with path.open(encoding="utf-8") as fh:
        return [_decode(line) for line in fh if line.strip()]


def _erase_unreadable(path: Path, ids: Collection[str], tenant: str | None) -> tuple[int, int]:
    """Delete the lines of ``path`` (a journal's unreadable lines) that name one of ``ids`` or
    ``tenant``; (lines deleted, lines left). A line is matched on its raw bytes, as it cannot
    be parsed: an id as a JSON string (``"req_..."``) anywhere in it, the tenant as a
    ``"tenant"`` field. A line cut short before its tenant holds no more than a request id and
    a time. Holds the file's lock (``NAME.lock``) while it rewrites it, as a replica does
    while it appends (:func:`_set_aside_unreadable`)."""
    if not path.exists():
        return 0, 0
    quoted = [b'"' + spelled + b'"' for name in ids for spelled in _spellings(name)]
    field = (
        re.compile(rb'"tenant"\s*:\s*"(?:' + b"|".join(map(re.escape, _spellings(tenant))) + b')"')
        if tenant is not None
        else None
    )

    def names(line: bytes) -> bool:
        return any(q in line for q in quoted) or (field is not None and bool(field.search(line)))

    _, claim = lock_beside(path, wait=True)
    try:
        lines = [line for line in path.read_bytes().splitlines(keepends=True) if line.strip()]
        kept = [line for line in lines if not names(line)]
        if not kept:
            path.unlink()
        elif len(kept) < len(lines):
            spare = path.with_name(path.name + ".erasing")
            spare.write_bytes(b"".join(kept))
            spare.replace(path)
        return len(lines) - len(kept), len(kept)
    finally:
        if claim is not None:
            claim.close()


def _spellings(text: str) -> list[bytes]:
    """``text`` as a journal line holds it between its quotes: as written (:func:`valid_json`),
    and ASCII-escaped."""
    return sorted({valid_json(text)[1:-1].encode(), json.dumps(text)[1:-1].encode()})


def _set_aside_unreadable(path: Path, aside: Path) -> list[Item]:
    """The items of the journal file ``path``. Lines that cannot be read are moved to the end
    of ``aside`` (and logged) before the rest is replayed: a line cut short by a SIGKILL or a
    power loss while it was appended, or a full disk, would otherwise stop every start, or kill
    the writer that replays the journal once Redis is back."""
    items: list[Item] = []
    kept: list[bytes] = []
    bad: list[bytes] = []
    for line in path.read_bytes().splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            items.append(_decode(line.decode("utf-8")))
        except (ValueError, KeyError, TypeError):  # not JSON, not UTF-8, not an item
            bad.append(line.rstrip(b"\r\n") + b"\n")
        else:
            kept.append(line.rstrip(b"\r\n") + b"\n")
    if bad:
        _, claim = lock_beside(aside, wait=True)  # an erasure may be rewriting it
        try:
            with aside.open("ab") as fh:
                fh.writelines(bad)
        finally:
            if claim is not None:
                claim.close()
        spare = path.with_name(path.name + ".readable")
        spare.write_bytes(b"".join(kept))
        spare.replace(path)
        log.error(
            "outcome journal %s: %d line%s that cannot be read (cut short by a kill, a power "
            "loss or a full disk?) moved to %s; replaying the other %d items",
            path,
            len(bad),
            "" if len(bad) == 1 else "s",
            aside,
            len(items),
        )
    return items
