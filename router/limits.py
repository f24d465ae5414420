"""Per-tenant request and token rate limits, and per-request size limits.

Rates are counted in a *sliding window counter* over one minute (the current minute's count plus
the previous minute's, weighted by how much of it still overlaps the last 60 s): O(1) memory per
tenant and accurate to a few percent. In-process on the embedded default; with
``TIERGATE_REDIS_URL`` the counters live in Redis and one Lua script reads and bumps them
atomically, so every replica enforces the same limit. Redis keeps them under a hash of the
tenant (``tiergate:rl:<tenant hash>:req|tok:<minute>``, :func:`~router.outcomes.tenant_hash`),
never its name: an erasure leaves no name there, and the windows count on across it. If Redis
fails, the in-process counters take over until Redis answers again (a limiter outage must not
become a gateway outage): each replica then enforces its share of the limit, the limit divided
by the replicas alive when the outcome store last heard from Redis, so N replicas do not admit
N times the limit.

Tokens are reserved before a request is served and settled after it: :meth:`RateLimiter.reserve`
checks the tenant's window and adds an estimate (the prompt plus ``max_tokens``, or the
deployment's default reservation) in one atomic step, and :meth:`TokenHold.settle` swaps the
estimate for what was used (prompt + completion; for a client that left, what had been generated
by then). A request is admitted while the window, reservations included, is under the limit, so
concurrent requests overshoot it by at most one request's reservation, plus the top-ups
(:meth:`TokenHold.top_up`) of those that went on to a model that may use more. A request
cancelled while its reservation is on its way to Redis has it released as it lands.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from router.auth import Principal
from router.config import Settings
from router.errors import BadRequestError, RateLimitError
from router.outcomes import tenant_hash
from router.outcomes_redis import refused_credentials
from router.schemas import CHAT_FIELDS, OUTPUT_FIELDS, FrontFields

log = logging.getLogger("tiergate.limits")
WINDOW_S = 60
REDIS_RETRY_S = 1.0  # after a Redis failure, skip Redis for this long (no timeout per request)

# KEYS[1..4]: req current, req previous, tok current, tok previous.
# ARGV: weight of the previous window, rpm (0 = none), tpm (0 = none), ttl.
# Returns {allowed (1/0), which limit refused ("rpm"/"tpm"/""), and that limit's current and
# previous counts (for Retry-After)}.
_LUA_ADMIT = """
local w = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
if tpm > 0 then
  local cur = tonumber(redis.call('GET', KEYS[3]) or '0')
  local prev = tonumber(redis.call('GET', KEYS[4]) or '0')
  if cur + w * prev >= tpm then return {0, 'tpm', tostring(cur), tostring(prev)} end
end
if rpm > 0 then
  local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
  local prev = tonumber(redis.call('GET', KEYS[2]) or '0')
  if cur + w * prev + 1 > rpm then return {0, 'rpm', tostring(cur), tostring(prev)} end
end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {1, '', '0', '0'}
"""


# KEYS[1..2]: tok current, tok previous. ARGV: weight, tpm, tokens to reserve, ttl.
# Returns {1} when the tokens were reserved, {0, current, previous} when the window is already
# at the limit.
_LUA_RESERVE = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local prev = tonumber(redis.call('GET', KEYS[2]) or '0')
if cur + tonumber(ARGV[1]) * prev >= tonumber(ARGV[2]) then
  return {0, tostring(cur), tostring(prev)}
end
redis.call('INCRBY', KEYS[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {1}
"""

# KEYS[1]: the window the tokens were reserved in. ARGV: the change (actual - reserved).
# A window that has expired meanwhile is left alone.
_LUA_SETTLE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local left = redis.call('INCRBY', KEYS[1], ARGV[1])
if left < 0 then redis.call('SET', KEYS[1], 0, 'KEEPTTL') end
return 1
"""

# KEYS: pairs of (a window named by its tenant, as releases before hashing kept it; the same
# window under the tenant's hash). ARGV: the expiry (ms) of a window that had none. Each count
# is added to its hashed twin, which keeps the later expiry, and the named one goes.
_LUA_UNNAME = """
for i = 1, #KEYS, 2 do
  local n = redis.call('GET', KEYS[i])
  if n then
    local ttl = redis.call('PTTL', KEYS[i])
    if ttl < 0 then ttl = tonumber(ARGV[1]) end
    redis.call('INCRBY', KEYS[i + 1], n)
    if redis.call('PTTL', KEYS[i + 1]) < ttl then redis.call('PEXPIRE', KEYS[i + 1], ttl) end
    redis.call('DEL', KEYS[i])
  end
end
return #KEYS / 2
"""
_NAMED_WINDOW = re.compile(r"(req|tok):-?[0-9]+")


def _redis_base(tenant: str) -> str:
    """The stem of ``tenant``'s window keys in Redis: its hash, not its name."""
    return f"tiergate:rl:{tenant_hash(tenant)}"


def unname_windows(client: Any, tenant: str) -> int:
    """Move ``tenant``'s windows kept under its name (``tiergate:rl:<tenant>:*``, as releases
    before hashing wrote them, and as one still running in a rolling upgrade does) to the keys
    under its hash, where the limits go on counting them: an erasure leaves no key that names
    the tenant, and gives it no fresh minute. ``client``: a synchronous Redis client that
    decodes responses. How many windows moved."""
    named = f"tiergate:rl:{tenant}:"
    pattern = re.sub(r"([*?\[\]\\])", r"\\\1", named) + "*"
    found = sorted(client.scan_iter(match=pattern, count=1000))
    windows = [k.removeprefix(named) for k in found if _NAMED_WINDOW.fullmatch(k[len(named) :])]
    if not windows:
        return 0
    keys = [key for w in windows for key in (named + w, f"{_redis_base(tenant)}:{w}")]
    return int(client.eval(_LUA_UNNAME, len(keys), *keys, 2 * WINDOW_S * 1000))


#: Which limit refused a request ("rpm", "tpm"; "" when admitted), with that limit's count in
#: the current and the previous window.
_Refusal = tuple[str, float, float]
_ADMITTED: _Refusal = ("", 0.0, 0.0)


@dataclass(slots=True)
class TokenHold:
    """Tokens reserved for one request in its tenant's window; settle it once, when it ends."""

    limiter: RateLimiter | None
    tenant: str
    start: int
    tokens: int
    in_redis: bool = False
    settled: bool = field(default=False)
    # The last change sent to Redis for this hold: the next waits for it (RateLimiter.adjust).
    sent: asyncio.Task[None] | None = field(default=None, repr=False)

    def settle(self, used: int) -> None:
        """Replace the reservation by ``used`` tokens (never raises, never waits)."""
        if self.settled or self.limiter is None:
            return
        self.settled = True
        self.limiter.adjust(self, max(0, used) - self.tokens)

    def top_up(self, tokens: int) -> None:
        """Add ``tokens`` to the reservation, with no limit check: a request that goes on to a
        model that may use more (a fallback, an escalation) is not refused mid-flight."""
        if self.settled or self.limiter is None or tokens <= 0:
            return
        self.tokens += tokens
        self.limiter.adjust(self, tokens)


@dataclass(slots=True)
class _Window:
    start: int = 0
    current: int = 0
    previous: int = 0

    def roll(self, start: int) -> None:
        if start != self.start:
            self.previous = self.current if start - self.start == WINDOW_S else 0
            self.current = 0
            self.start = start

    def estimate(self, weight: float) -> float:
        return self.current + weight * self.previous


def _window(now: float) -> tuple[int, float]:
    """(window start, weight of the previous window)."""
    start = int(now // WINDOW_S) * WINDOW_S
    return start, 1.0 - (now - start) / WINDOW_S


def _until_room(now: float, current: float, previous: float, room: float) -> float:
    """Whole seconds from ``now`` until the sliding count of a window holding ``current`` (and
    ``previous`` in the minute before it) is down to ``room``, if nothing more is admitted: the
    ``Retry-After`` of a refusal. The end of the window alone is too soon: the minute counted
    there still weighs in the next one, so a client that came back then was refused again."""
    elapsed = now % WINDOW_S
    if current <= room:  # within this window, as the previous minute slides out
        wait = WINDOW_S * (previous - room + current) / previous - elapsed if previous else 0.0
    else:  # in the next one, where this window's count is the previous minute's
        wait = WINDOW_S - elapsed + WINDOW_S * (current - room) / current
    return float(max(1, math.ceil(wait)))


class RateLimiter:
    """Requests and tokens per minute per tenant; Redis-backed when ``redis_url`` is set.

    ``replicas``: how many replicas share the limits (the Redis outcome store's count of live
    replicas); while Redis is down each enforces ``ceil(limit / replicas)`` in process."""

    def __init__(
        self,
        *,
        rpm: int | None,
        tpm: int | None,
        redis_url: str | None = None,
        replicas: Callable[[], int] | None = None,
    ) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self._replicas = replicas
        self._requests: dict[str, _Window] = {}
        self._tokens: dict[str, _Window] = {}
        self._redis_url = redis_url
        self._redis: Any = None
        self._script: Any = None
        self._redis_down_until = 0.0
        self._redis_refused: str | None = None  # the refusal logged; None once Redis works
        self._redis_outage: float | None = None  # when the outage logged began; None: none
        self._reserve_script: Any = None
        self._settle_script: Any = None
        self._pending: set[asyncio.Future[Any]] = set()  # changes (and reserves) on their way

    def limits_for(self, principal: Principal) -> tuple[int | None, int | None]:
        """The key's own limits, else the deployment's defaults."""
        return principal.rpm or self.rpm, principal.tpm or self.tpm

    async def admit(self, principal: Principal, *, tokens: bool = True) -> None:
        """Count one request; raise :class:`RateLimitError` (429 + Retry-After) when over.

        ``tokens=False`` for a request that spends no tokens (``/v1/models``, ``/v1/feedback``):
        only the request count applies, so a tenant out of tokens can still list and label."""
        rpm, tpm = self.limits_for(principal)
        if not tokens:
            tpm = None
        if rpm is None and tpm is None:
            return
        now = time.time()
        start, weight = _window(now)
        refused = None
        if self._use_redis(now):
            refused = await self._admit_redis(principal.tenant, start, weight, rpm, tpm)
        shared = refused is None and self._redis_url is not None
        if refused is None:
            rpm, tpm = self._share(rpm), self._share(tpm)
            refused = self._admit_local(principal.tenant, start, weight, rpm, tpm)
        which, current, previous = refused
        if which:
            limit = (rpm if which == "rpm" else tpm) or 0
            what = "requests" if which == "rpm" else "tokens"
            room = limit - 1 if which == "rpm" else limit  # a request needs room for itself
            raise RateLimitError(
                f"tenant '{principal.tenant}' is over its limit of {limit} {what} per minute"
                + (self._share_note() if shared else ""),
                retry_after=_until_room(now, current, previous, room),
                code=f"{which}_limit_exceeded",
            )

    def _admit_local(
        self, tenant: str, start: int, weight: float, rpm: int | None, tpm: int | None
    ) -> _Refusal:
        requests = self._requests.setdefault(tenant, _Window(start))
        tokens = self._tokens.setdefault(tenant, _Window(start))
        requests.roll(start)
        tokens.roll(start)
        if tpm is not None and tokens.estimate(weight) >= tpm:
            return "tpm", tokens.current, tokens.previous
        if rpm is not None and requests.estimate(weight) + 1 > rpm:
            return "rpm", requests.current, requests.previous
        requests.current += 1
        return _ADMITTED

    async def reserve(self, principal: Principal, tokens: int) -> TokenHold:
        """Reserve ``tokens`` in the tenant's window, or raise 429 ``tpm_limit_exceeded`` when the
        window (reservations included) is already at the limit. Atomic across replicas."""
        _, tpm = self.limits_for(principal)
        if tpm is None:
            return TokenHold(None, principal.tenant, 0, 0)
        now = time.time()
        start, weight = _window(now)
        tenant = principal.tenant
        refused: _Refusal | None = None
        if self._use_redis(now):
            refused = await self._reserve_redis(tenant, start, weight, tpm, tokens)
        in_redis = refused is not None
        shared = not in_redis and self._redis_url is not None
        if refused is None:
            tpm = self._share(tpm) or tpm
            window = self._tokens.setdefault(tenant, _Window(start))
            window.roll(start)
            refused = _ADMITTED
            if window.estimate(weight) >= tpm:
                refused = "tpm", window.current, window.previous
            else:
                window.current += tokens
        if refused[0]:
            raise RateLimitError(
                f"tenant '{tenant}' is over its limit of {tpm} tokens per minute"
                + (self._share_note() if shared else ""),
                retry_after=_until_room(now, refused[1], refused[2], tpm),
                code="tpm_limit_exceeded",
            )
        return TokenHold(self, tenant, start, tokens, in_redis=in_redis)

    def adjust(self, hold: TokenHold, delta: int) -> None:
        """Add ``delta`` tokens to the window ``hold`` was reserved in (see TokenHold.settle).

        In Redis a hold's changes arrive in the order they were made, each sent once the one
        before it is done: sent at once, on the pool's connections, a top-up could arrive after
        its settle, which the script had stopped at 0, and add tokens no request used."""
        if delta == 0:
            return
        if hold.in_redis and self._redis is not None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (shutting down): the window expires on its own
                return
            task = loop.create_task(self._settle_redis(hold, delta, hold.sent))
            hold.sent = task
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
            return
        window = self._tokens.get(hold.tenant)
        if window is None:
            return
        if window.start == hold.start:
            window.current = max(0, window.current + delta)
        elif window.start == hold.start + WINDOW_S:
            window.previous = max(0, window.previous + delta)

    def _sharing(self) -> int:
        """How many replicas share the limits while Redis is down: 1 without Redis or without a
        replica count."""
        if self._redis_url is None or self._replicas is None:
            return 1
        return max(1, self._replicas())

    def _share(self, limit: int | None) -> int | None:
        """The part of ``limit`` this replica enforces in process while Redis is down:
        ``ceil(limit / replicas)``."""
        return None if limit is None else math.ceil(limit / self._sharing())

    def _share_note(self) -> str:
        n = self._sharing()
        if n == 1:
            return " (counted by this replica while Redis is unreachable)"
        return f" (this replica's share of it while Redis is unreachable, 1/{n})"

    # -- Redis -------------------------------------------------------------------------------

    def _use_redis(self, now: float) -> bool:
        if not self._redis_url or now < self._redis_down_until:
            return False
        if self._redis is None:
            import redis.asyncio as aioredis

            self._redis = aioredis.Redis.from_url(
                self._redis_url, socket_timeout=0.25, socket_connect_timeout=0.25
            )
            self._script = self._redis.register_script(_LUA_ADMIT)
            self._reserve_script = self._redis.register_script(_LUA_RESERVE)
            self._settle_script = self._redis.register_script(_LUA_SETTLE)
        return True

    async def _reserve_redis(
        self, tenant: str, start: int, weight: float, tpm: int, tokens: int
    ) -> _Refusal | None:
        base = f"{_redis_base(tenant)}:tok"
        sent = asyncio.ensure_future(
            self._reserve_script(
                keys=[f"{base}:{start}", f"{base}:{start - WINDOW_S}"],
                args=[weight, tpm, tokens, 2 * WINDOW_S],
            )
        )
        try:
            done = await asyncio.shield(sent)
        except asyncio.CancelledError:
            # Its request was cancelled (its client left) with the script on its way: what it
            # reserves is no request's, released as it lands (the cancellation is not held up).
            self._pending.add(sent)
            sent.add_done_callback(self._pending.discard)
            sent.add_done_callback(functools.partial(self._release_landed, tenant, start, tokens))
            raise
        except Exception as exc:  # Redis down: reserve in-process instead
            self._redis_failed(exc)
            return None
        self._redis_worked()
        if int(done[0]):
            return _ADMITTED
        return "tpm", float(done[1]), float(done[2])

    def _release_landed(
        self, tenant: str, start: int, tokens: int, sent: asyncio.Future[Any]
    ) -> None:
        # The reservation of a request cancelled as it was made (_reserve_redis), once its
        # script has answered: taken back out of the window if it was made.
        if sent.cancelled() or sent.exception() is not None or not int(sent.result()[0]):
            return
        TokenHold(self, tenant, start, tokens, in_redis=True).settle(0)

    async def _settle_redis(
        self, hold: TokenHold, delta: int, after: asyncio.Task[None] | None
    ) -> None:
        if after is not None:
            await asyncio.wait([after])  # it never raises (below)
        try:
            await self._settle_script(
                keys=[f"{_redis_base(hold.tenant)}:tok:{hold.start}"], args=[delta]
            )
        except Exception as exc:  # the window keeps the estimate; it expires with the window
            self._redis_failed(exc)

    async def _admit_redis(
        self, tenant: str, start: int, weight: float, rpm: int | None, tpm: int | None
    ) -> _Refusal | None:
        base = _redis_base(tenant)
        keys = [
            f"{base}:req:{start}",
            f"{base}:req:{start - WINDOW_S}",
            f"{base}:tok:{start}",
            f"{base}:tok:{start - WINDOW_S}",
        ]
        try:
            allowed, which, current, previous = await self._script(
                keys=keys, args=[weight, rpm or 0, tpm or 0, 2 * WINDOW_S]
            )
        except Exception as exc:  # Redis down: fall back to the in-process counters
            self._redis_failed(exc)
            return None
        self._redis_worked()
        if int(allowed):
            return _ADMITTED
        name = which.decode() if isinstance(which, bytes) else str(which)
        return name, float(current), float(previous)

    def _redis_failed(self, exc: Exception) -> None:
        # Redis refusing the password or a command is no outage, but the limits are counted
        # as in one: the outcome store fails readiness for it (router.outcomes_redis), so the
        # replica leaves its load balancer; refusing every request meanwhile would make a
        # half-done password rotation an outage for every tenant. Said once, as what to fix.
        # An outage is said once as it begins and once as it ends (:meth:`_redis_worked`), not
        # at each retry (every REDIS_RETRY_S while requests come in).
        refused = refused_credentials(exc)
        if refused is not None and refused != self._redis_refused:
            log.error("rate limits: %s; counting in-process meanwhile, as in an outage", refused)
        elif refused is None and self._redis_outage is None:
            self._redis_outage = time.monotonic()
            log.warning(
                "rate limits: Redis unavailable (%s); counting in-process until it answers",
                type(exc).__name__,
            )
        self._redis_refused = refused
        self._redis_down_until = time.time() + REDIS_RETRY_S

    def _redis_worked(self) -> None:
        """Redis answered: an outage logged ends (said once), and a refusal again is said
        again."""
        self._redis_refused = None
        if self._redis_outage is not None:
            log.warning(
                "rate limits: Redis available again after %.1f s; counting in Redis",
                time.monotonic() - self._redis_outage,
            )
            self._redis_outage = None

    async def aclose(self) -> None:
        """Finish pending settlements and close the Redis connection, if one was opened."""
        while self._pending:  # a reservation that lands sends its release
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self._redis is not None:
            await self._redis.aclose()


def build_rate_limiter(
    settings: Settings, replicas: Callable[[], int] | None = None
) -> RateLimiter:
    """The limiter for ``settings`` (Redis-backed when ``redis_url`` is set); ``replicas``
    counts the replicas that share its limits in a Redis outage."""
    return RateLimiter(
        rpm=settings.rpm_limit,
        tpm=settings.tpm_limit,
        redis_url=settings.redis_url,
        replicas=replicas,
    )


def check_request_size(
    body: Mapping[str, Any], settings: Settings, fields: FrontFields = CHAT_FIELDS
) -> None:
    """Refuse (400) too many messages or a ``max_tokens`` over the cap; see SECURITY.md.

    ``body`` is a chat request; ``fields`` are the names of its client's front (Responses:
    ``max_output_tokens``, ``input``), so the error points at what was sent."""
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > settings.max_messages:
        raise BadRequestError(
            f"too many messages: {len(messages)} > {settings.max_messages}",
            param=fields.name("messages"),
        )
    for name in OUTPUT_FIELDS:
        value = body.get(name)
        if isinstance(value, int) and value > settings.max_tokens_cap:
            sent = fields.name(name)
            raise BadRequestError(
                f"{sent} {value} is over this deployment's cap of {settings.max_tokens_cap}",
                param=sent,
            )
