"""The Redis outcome store, shared by several Tiergate replicas; it loses no record in an outage.

Structures (``P`` is the key prefix, ``tiergate`` by default; for Redis Cluster use a hash tag
such as ``{tiergate}`` so one Lua script can touch every key):

==============================  =============================================================
``P:outcome:<request id>``      string, the record as JSON, expiring after the policy's
                                ``retention_days`` (none when it is null).
                                Written with ``SET NX``: the idempotency key that makes a
                                replayed record (after a retry or a journal replay) a no-op.
``P:outcomes``                  stream, one entry per new record (``id``, ``record``), trimmed
                                to about 1M entries and by ``purge``: the change feed that other
                                consumers (retrain jobs, exporters) read with ``XREAD``.
``P:outcomes:ts``               sorted set, request id by timestamp: ``recent``, ``count``,
                                ``purge``. ``P:outcomes:ts:<tenant>`` the same per tenant;
                                ``P:tenants`` the set of tenants seen.
``P:spend:<UTC day>``           hash, tenant -> USD spent that day (``HINCRBYFLOAT``), expiring
                                after two days: budgets shared by every replica.
``P:scores`` / ``P:scores:<a>`` capped lists (``LPUSH`` + ``LTRIM``) of recent routing scores,
                                overall and per alias: online threshold calibration.
``P:hold:<tenant>``             hash, request id -> USD held for a request in flight, and
``P:holds:<tenant>``            sorted set of the same ids by expiry: budget reservations
                                (``reserve_spend``), dropped when the request's record is written
                                or, if it never is, after :data:`HOLD_TTL_S`.
``P:label:<request id>``        hash, label source -> label JSON (feedback, shadow, escalation).
``P:labels``                    sorted set of ``<request id>|<source>`` by time: ``labels``.
==============================  =============================================================

Every write is one Lua script per record or label, so it is atomic and idempotent. Records
submitted while Redis is unreachable wait in a bounded in-memory buffer; past that bound they
are appended to an on-disk journal (JSON lines). The writer thread retries with backoff, then
writes the buffer and replays the journal when Redis returns. ``close`` drains everything it can
and, if Redis is still down when its time is up, moves what is left to the journal, which the
next start replays. Redis itself must persist (AOF with ``appendfsync everysec`` or ``always``),
or a Redis restart loses what it held, which no client can prevent.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

from router.errors import MissingExtraError, StoreUnavailableError
from router.outcomes import (
    Label,
    OutcomeRecord,
    WriterWatch,
    log_unwritable,
    quality_from_labels,
    summarize_records,
    valid_json,
    valid_text,
)

log = logging.getLogger("tiergate.outcomes")

_SCORES_CAP = 2000
#: With the journal unwritable, the buffer may grow to this many times its bound before
#: outcomes are dropped (counted and logged).
_MEMORY_FACTOR = 4
_STREAM_MAXLEN = 1_000_000
#: A budget hold whose request never wrote a record (its replica died) lapses after this long.
HOLD_TTL_S = 900

# KEYS: spend hash, hold hash, holds zset. ARGV: tenant, id, usd, budget (<0: none), now,
# expiry. Returns 1 when the hold was taken, 0 when spend + holds had reached the budget.
_RESERVE_LUA = (
    """
for _, gone in ipairs(redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', ARGV[5])) do
  redis.call('HDEL', KEYS[2], gone)
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', ARGV[5])
local budget = tonumber(ARGV[4])
if budget >= 0 then
  local used = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
  for _, held in ipairs(redis.call('HVALS', KEYS[2])) do used = used + tonumber(held) end
  if used >= budget then return 0 end
end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('ZADD', KEYS[3], ARGV[6], ARGV[2])
redis.call('EXPIRE', KEYS[2], """
    + str(HOLD_TTL_S)
    + """)
redis.call('EXPIRE', KEYS[3], """
    + str(HOLD_TTL_S)
    + """)
return 1
"""
)

# KEYS: record, stream, ts zset, tenant zset, tenants set, spend hash, scores, alias scores,
#       hold hash, holds zset
# ARGV: json, id, ts, tenant, cost, ttl_s (0: none), score or '', scores cap, spend ttl,
#       stream maxlen
_RECORD_LUA = """
redis.call('HDEL', KEYS[9], ARGV[2])
redis.call('ZREM', KEYS[10], ARGV[2])
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

# KEYS: label hash, labels zset, spend hash.
# ARGV: source, json, member, ts, tenant, cost, ttl (0: none)
_LABEL_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return 0 end
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

Item = OutcomeRecord | Label


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


class RedisOutcomeStore:
    """Outcome records and labels in Redis; see the module docstring for structures and outages.

    ``url`` is a ``redis://`` URL. ``settings`` (a :class:`~router.config.Settings`) supplies
    the journal path and buffer size when given; keyword arguments override it.
    """

    def __init__(
        self,
        url: str,
        *,
        settings: Any = None,
        journal: Path | None = None,
        buffer_size: int | None = None,
        retention_s: float | None = 30 * 86400,
        prefix: str = "tiergate",
        batch: int = 200,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.retention_s = retention_s
        self.journal = journal or (
            Path(settings.outcome_journal_path) if settings is not None else None
        )
        if self.journal is None:
            self.journal = Path("var/outcomes-journal.jsonl")
        self.buffer_size = buffer_size or (
            int(settings.outcome_queue_size) if settings is not None else 100_000
        )
        self._batch = batch
        self._buffer: deque[Item] = deque()
        self._inflight: dict[str, OutcomeRecord] = {}
        self._journal_lines = 0
        self._unflushed: dict[str, float] = defaultdict(float)
        self._spend: dict[str, float] = {}
        self._spend_day = _day(time.time())
        self._cond = threading.Condition()
        self._stop = False
        self._deadline = 0.0
        self._writer = WriterWatch("redis-outcome-writer", self._run, lambda: None)
        self._client: Any = None
        self._record_script: Any = None
        self._reserve_script: Any = None
        self._holds: dict[str, tuple[str, float]] = {}  # this replica's requests in flight
        self._label_script: Any = None
        self.written = 0
        self.duplicates = 0
        self.write_errors = 0
        self.spilled = 0
        self.journal_errors = 0  # journal writes that failed (unwritable path, full disk)
        self.dropped = 0  # outcomes lost: Redis down, buffer over its memory bound, no journal
        self.unwritable = 0  # records and labels Redis refused or that could not be encoded
        self.connected = False

    # -- keys ------------------------------------------------------------------------------

    def key(self, *parts: str) -> str:
        """A key under this store's prefix."""
        return ":".join((self.prefix, *parts))

    def _spend_key(self, ts: float) -> str:
        return self.key("spend", str(_day(ts)))

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
        self._record_script = self._client.register_script(_RECORD_LUA)
        self._label_script = self._client.register_script(_LABEL_LUA)
        self._reserve_script = self._client.register_script(_RESERVE_LUA)

    def start(self) -> None:
        """Connect (lazily: an unreachable Redis is not a start-up failure) and start writing."""
        self.connect()
        assert self.journal is not None
        try:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # serve anyway: only an outage needs the journal (then see _spill)
            log.error("outcome journal directory %s unusable: %s", self.journal.parent, exc)
        for path in self._journal_files():
            for item in _read_journal(path):
                self._journal_lines += 1
                self._unflushed[item.tenant] += item.cost_usd
                if isinstance(item, OutcomeRecord):
                    self._inflight[item.id] = item
        if self._journal_lines:
            log.warning("replaying %d journalled outcome items", self._journal_lines)
        self._stop = False
        self._writer.start()

    def close(self, timeout_s: float = 30.0) -> None:
        """Write everything buffered; whatever Redis cannot take in time goes to the journal."""
        if self._writer.thread is None:
            if self._client is not None:
                self._client.close()
            return
        self._writer.check()
        with self._cond:
            self._stop = True
            self._deadline = time.monotonic() + timeout_s
            self._cond.notify_all()
        self._writer.stop(timeout_s + 10)
        if self._client is not None:
            self._client.close()

    def check_writer(self) -> str | None:
        """Start the writer again if it died; why it had to, or None."""
        return self._writer.check()

    def health(self) -> dict[str, Any]:
        """Whether the writer runs and Redis answers, and the writer's counters."""
        return {
            "store": "redis",
            "writer_alive": self._writer.alive,
            "restarts": self._writer.restarts,
            "last_error": self._writer.last_error,
            "connected": self.connected,
            "written": self.written,
            "write_errors": self.write_errors,
            "unwritable": self.unwritable,
            "dropped": self.dropped,
            "buffered": len(self._buffer),
            "journal_lines": self._journal_lines,
        }

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything submitted so far is in Redis (or was dropped, see ``dropped``);
        True if nothing is left waiting."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._buffer and self._journal_lines == 0, timeout=timeout_s
            )

    # -- writing ---------------------------------------------------------------------------

    def submit(self, record: OutcomeRecord) -> None:
        """Buffer a record for writing. Never blocks on Redis, never raises."""
        self._writer.check()
        self._put(record)

    def label(self, label: Label) -> None:
        """Buffer a label for writing, as :meth:`submit`."""
        self._put(label)

    def _put(self, item: Item) -> None:
        with self._cond:
            self._unflushed[item.tenant] += item.cost_usd
            if isinstance(item, OutcomeRecord):
                self._inflight[item.id] = item
                self._holds.pop(item.id, None)  # in Redis, writing the record drops the hold
            if len(self._buffer) < self.buffer_size:
                self._buffer.append(item)
            elif not self._spill([item]):  # the journal cannot be written: hold it in memory
                if len(self._buffer) < _MEMORY_FACTOR * self.buffer_size:
                    self._buffer.append(item)
                else:
                    self._drop([item])
            self._cond.notify_all()

    def _journal_files(self) -> list[Path]:
        assert self.journal is not None
        draining = self.journal.with_suffix(self.journal.suffix + ".draining")
        return [p for p in (draining, self.journal) if p.exists()]

    def _spill(self, items: list[Item]) -> bool:
        """Append items to the journal (caller holds the lock); False, logged and counted in
        ``journal_errors``, when the journal cannot be written."""
        assert self.journal is not None
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

    def _drop(self, items: list[Item]) -> None:
        """Give up on items neither Redis, the buffer nor the journal can take (lock held)."""
        self.dropped += len(items)
        self._forget(items)
        if self.dropped == len(items) or self.dropped % 1000 < len(items):
            log.error(
                "outcome store: %d outcomes lost (Redis down, journal unwritable)", self.dropped
            )

    def _run(self) -> None:
        from redis import RedisError

        backoff = 0.05
        last_refresh = 0.0
        while True:
            with self._cond:
                if not self._buffer and not self._journal_lines:
                    if self._stop:
                        break
                    self._cond.wait(timeout=1.0)
                stopping, batch = self._stop, list(self._take())
            try:
                if batch:
                    spend = self._write(batch)
                    with self._cond:
                        self._spend, self._spend_day = spend, _day(time.time())
                        self._done(batch)
                elif self._journal_lines:
                    self._replay_journal()
                if time.monotonic() - last_refresh > 1.0:
                    self._refresh_spend()
                    last_refresh = time.monotonic()
                self.connected, backoff = True, 0.05
            except (RedisError, OSError) as exc:  # Redis down or failing: retried, never lost
                self.write_errors += 1
                if self.connected:
                    log.warning("redis outcome store unreachable, buffering: %s", exc)
                self.connected = False
                if stopping and time.monotonic() > self._deadline:
                    with self._cond:
                        left = list(self._buffer)
                        kept = self._spill(left)
                        if not kept:
                            self._drop(left)
                        self._buffer.clear()
                        self._cond.notify_all()
                    if kept:
                        log.error("redis still down at shutdown; outcomes kept in %s", self.journal)
                    break
                time.sleep(backoff)
                backoff = min(backoff * 2, 1.0)

    def _take(self) -> list[Item]:
        return [self._buffer[i] for i in range(min(self._batch, len(self._buffer)))]

    def _done(self, batch: list[Item]) -> None:
        """Drop a written batch from the buffer (caller holds the lock)."""
        for _ in batch:
            self._buffer.popleft()
        self._forget(batch)

    def _forget(self, batch: list[Item]) -> None:
        for item in batch:
            self._unflushed[item.tenant] -= item.cost_usd
            if isinstance(item, OutcomeRecord):
                self._inflight.pop(item.id, None)
        self._cond.notify_all()

    def _write(self, batch: list[Item]) -> dict[str, float]:
        """Write a batch; returns today's shared spend, read in the same round trip so the
        caller can swap it in as it forgets the batch's unflushed costs (no double count).

        An item that cannot be encoded, or that Redis refuses (a script error rather than an
        outage), is counted in ``unwritable``, logged and skipped; retrying it would hold up
        every item behind it for good.
        """
        from redis import ConnectionError as RedisConnectionError
        from redis import RedisError
        from redis import TimeoutError as RedisTimeoutError

        try:
            return self._write_batch(batch)
        except (RedisConnectionError, RedisTimeoutError, OSError):
            raise
        except (RedisError, ValueError, TypeError, UnicodeError):
            pass
        spend: dict[str, float] = {}
        for item in batch:
            try:
                spend = self._write_batch([item])
            except (RedisConnectionError, RedisTimeoutError, OSError):
                raise
            except (RedisError, ValueError, TypeError, UnicodeError) as exc:
                self.unwritable += 1
                log_unwritable(item, exc)
        return spend

    def _write_batch(self, batch: list[Item]) -> dict[str, float]:
        pipe = self._client.pipeline(transaction=False)
        for item in batch:
            if isinstance(item, OutcomeRecord):
                self._queue_record(pipe, item)
            else:
                self._queue_label(pipe, item)
        pipe.hgetall(self._spend_key(time.time()))
        *results, spend = pipe.execute()
        new = sum(int(r) for r in results)
        self.written += new
        self.duplicates += len(batch) - new
        return {k: float(v) for k, v in spend.items()}

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
            ],
            client=pipe,
        )

    def _queue_label(self, pipe: Any, label: Label) -> None:
        ttl = self._ttl(label.ts)
        rid = valid_text(label.request_id)
        self._label_script(
            keys=[
                self.key("label", rid),
                self.key("labels"),
                self._spend_key(label.ts),
            ],
            args=[
                valid_text(label.source),
                valid_json(label.as_dict()),
                valid_text(f"{rid}|{label.source}"),
                repr(label.ts),
                valid_text(label.tenant),
                repr(float(label.cost_usd)),
                ttl,
            ],
            client=pipe,
        )

    def _replay_journal(self) -> None:
        """Write the journal to Redis, oldest file first, then delete it."""
        assert self.journal is not None
        draining = self.journal.with_suffix(self.journal.suffix + ".draining")
        with self._cond:
            if not draining.exists() and self.journal.exists():
                self.journal.replace(draining)
        if not draining.exists():
            return
        items = _read_journal(draining)
        spend = self._spend
        for i in range(0, len(items), self._batch):
            spend = self._write(items[i : i + self._batch])
        with self._cond:
            self._spend, self._spend_day = spend, _day(time.time())
            draining.unlink()
            self._journal_lines -= len(items)
            self._forget(items)
        log.info("replayed %d journalled outcome items into redis", len(items))

    def _refresh_spend(self) -> None:
        spend = self._client.hgetall(self._spend_key(time.time()))
        with self._cond:
            self._spend = {k: float(v) for k, v in spend.items()}
            self._spend_day = _day(time.time())

    # -- reading ---------------------------------------------------------------------------

    def _read(self, fn: Any, *args: Any) -> Any:
        import redis

        try:
            return fn(*args)
        except redis.RedisError as exc:
            raise StoreUnavailableError(f"outcome store (redis) unavailable: {exc}") from exc

    def spend_today(self, tenant: str) -> float:
        """Today's spend from Redis (refreshed every second) plus what is still buffered here
        and this replica's holds. Kept in memory so the request path never waits for Redis;
        :meth:`reserve_spend` is the check that sees every replica's holds."""
        with self._cond:
            stored = self._spend.get(tenant, 0.0) if self._spend_day == _day(time.time()) else 0.0
            held = sum(usd for t, usd in self._holds.values() if t == tenant)
            return stored + max(self._unflushed.get(tenant, 0.0), 0.0) + held

    def reserve_spend(self, tenant: str, request_id: str, usd: float, budget: float | None) -> bool:
        """Hold ``usd`` in Redis unless the tenant's spend plus every replica's holds has
        reached ``budget`` (one Lua script). With Redis unreachable, the check runs on this
        replica's view (:meth:`spend_today`), as the rate limits do."""
        from redis import RedisError

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
                        repr(now),
                        repr(now + HOLD_TTL_S),
                    ],
                )
            )
        except (RedisError, OSError) as exc:
            log.warning("budget hold: redis unavailable (%s); checking this replica's view", exc)
            held = budget is None or self.spend_today(tenant) < budget
        if held:
            with self._cond:
                self._holds[request_id] = (tenant, usd)
        return held

    def release_spend(self, request_id: str) -> None:
        """Forget a request's hold here; in Redis it lapses after :data:`HOLD_TTL_S`."""
        with self._cond:
            self._holds.pop(request_id, None)

    def get(self, record_id: str) -> dict[str, Any] | None:
        """One record by request id, including one still buffered here."""
        with self._cond:
            queued = self._inflight.get(record_id)
        if queued is not None:
            return queued.as_dict()
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

    def _records_since(self, since_ts: float) -> list[dict[str, Any]]:
        ids = self._read(self._client.zrangebyscore, self.key("outcomes", "ts"), since_ts, "+inf")
        if not ids:
            return []
        raws = self._read(self._client.mget, [self.key("outcome", i) for i in ids])
        return [json.loads(r) for r in raws if r]

    def summary(
        self,
        since_ts: float,
        bucket_s: float,
        *,
        until_ts: float | None = None,
        problems: int = 20,
    ) -> dict[str, Any]:
        """The dashboard's aggregates (same shape as the SQLite store's), over the window."""
        return summarize_records(
            self._records_since(since_ts),
            since_ts=since_ts,
            bucket_s=bucket_s,
            until_ts=until_ts,
            problems=problems,
        )

    def quality_by_tier(self, since_ts: float) -> dict[str, dict[str, dict[str, float]]]:
        """Mean served-answer quality per tier and label source since ``since_ts``."""
        labels = self.labels(since_ts)
        ids = sorted({str(label["request_id"]) for label in labels})
        if not ids:
            return {}
        raws = self._read(self._client.mget, [self.key("outcome", i) for i in ids])
        tier_of = {i: json.loads(r).get("tier") for i, r in zip(ids, raws, strict=True) if r}
        return quality_from_labels(labels, tier_of)

    def purge(self, before_ts: float) -> int:
        """Delete records and labels older than ``before_ts`` (keys also expire by TTL)."""
        client = self._client
        old_ids = self._read(client.zrangebyscore, self.key("outcomes", "ts"), "-inf", before_ts)
        tenants = self._read(client.smembers, self.key("tenants"))
        old_labels = self._read(client.zrangebyscore, self.key("labels"), "-inf", before_ts)
        pipe = client.pipeline(transaction=False)
        for i in range(0, len(old_ids), 500):
            pipe.delete(*[self.key("outcome", x) for x in old_ids[i : i + 500]])
        pipe.zremrangebyscore(self.key("outcomes", "ts"), "-inf", before_ts)
        for tenant in tenants:
            pipe.zremrangebyscore(self.key("outcomes", "ts", tenant), "-inf", before_ts)
        for member in old_labels:
            request_id, source = member.rsplit("|", 1)
            pipe.hdel(self.key("label", request_id), source)
        pipe.zremrangebyscore(self.key("labels"), "-inf", before_ts)
        pipe.xtrim(self.key("outcomes"), minid=f"{int(before_ts * 1000)}-0")
        self._read(pipe.execute)
        return len(old_ids)


def _read_journal(path: Path) -> list[Item]:
    with path.open(encoding="utf-8") as fh:
        return [_decode(line) for line in fh if line.strip()]
