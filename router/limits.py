"""Per-tenant request and token rate limits, and per-request size limits.

Rates are counted in a *sliding window counter* over one minute (the current minute's count plus
the previous minute's, weighted by how much of it still overlaps the last 60 s): O(1) memory per
tenant and accurate to a few percent. In-process on the embedded default; with
``TIERGATE_REDIS_URL`` the counters live in Redis and one Lua script reads and bumps them
atomically, so every replica enforces the same limit. If Redis fails, the in-process counters
take over (each replica then enforces the limit on its own) until Redis answers again: a limiter
outage must not become a gateway outage.

Tokens are charged after a request finishes (prompt + completion, from the outcome), so a tenant
over its token budget is refused from its next request on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from router.auth import Principal
from router.config import Settings
from router.errors import BadRequestError, RateLimitError

log = logging.getLogger("tiergate.limits")
WINDOW_S = 60
REDIS_RETRY_S = 1.0  # after a Redis failure, skip Redis for this long (no timeout per request)

# KEYS[1..4]: req current, req previous, tok current, tok previous.
# ARGV: weight of the previous window, rpm (0 = none), tpm (0 = none), ttl.
# Returns {allowed (1/0), which limit refused ("rpm"/"tpm"/"")}.
_LUA_ADMIT = """
local w = tonumber(ARGV[1])
local rpm = tonumber(ARGV[2])
local tpm = tonumber(ARGV[3])
if tpm > 0 then
  local used = tonumber(redis.call('GET', KEYS[3]) or '0')
             + w * tonumber(redis.call('GET', KEYS[4]) or '0')
  if used >= tpm then return {0, 'tpm'} end
end
if rpm > 0 then
  local seen = tonumber(redis.call('GET', KEYS[1]) or '0')
             + w * tonumber(redis.call('GET', KEYS[2]) or '0')
  if seen + 1 > rpm then return {0, 'rpm'} end
end
redis.call('INCR', KEYS[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
return {1, ''}
"""


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


def _window(now: float) -> tuple[int, float, float]:
    """(window start, weight of the previous window, seconds until this window ends)."""
    start = int(now // WINDOW_S) * WINDOW_S
    elapsed = now - start
    return start, 1.0 - elapsed / WINDOW_S, WINDOW_S - elapsed


class RateLimiter:
    """Requests and tokens per minute per tenant; Redis-backed when ``redis_url`` is set."""

    def __init__(self, *, rpm: int | None, tpm: int | None, redis_url: str | None = None) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self._requests: dict[str, _Window] = {}
        self._tokens: dict[str, _Window] = {}
        self._redis_url = redis_url
        self._redis: Any = None
        self._script: Any = None
        self._redis_down_until = 0.0

    def limits_for(self, principal: Principal) -> tuple[int | None, int | None]:
        """The key's own limits, else the deployment's defaults."""
        return principal.rpm or self.rpm, principal.tpm or self.tpm

    async def admit(self, principal: Principal) -> None:
        """Count one request; raise :class:`RateLimitError` (429 + Retry-After) when over."""
        rpm, tpm = self.limits_for(principal)
        if rpm is None and tpm is None:
            return
        now = time.time()
        start, weight, retry = _window(now)
        refused = None
        if self._use_redis(now):
            refused = await self._admit_redis(principal.tenant, start, weight, rpm, tpm)
        if refused is None:
            refused = self._admit_local(principal.tenant, start, weight, rpm, tpm)
        if refused:
            limit = rpm if refused == "rpm" else tpm
            what = "requests" if refused == "rpm" else "tokens"
            raise RateLimitError(
                f"tenant '{principal.tenant}' is over its limit of {limit} {what} per minute",
                retry_after=max(1.0, math.ceil(retry)),
                code=f"{refused}_limit_exceeded",
            )

    def _admit_local(
        self, tenant: str, start: int, weight: float, rpm: int | None, tpm: int | None
    ) -> str:
        requests = self._requests.setdefault(tenant, _Window(start))
        tokens = self._tokens.setdefault(tenant, _Window(start))
        requests.roll(start)
        tokens.roll(start)
        if tpm is not None and tokens.estimate(weight) >= tpm:
            return "tpm"
        if rpm is not None and requests.estimate(weight) + 1 > rpm:
            return "rpm"
        requests.current += 1
        return ""

    async def charge(self, principal: Principal, tokens: int) -> None:
        """Add a finished request's tokens to its tenant's window."""
        _, tpm = self.limits_for(principal)
        if tpm is None or tokens <= 0:
            return
        now = time.time()
        start, _, _ = _window(now)
        if self._use_redis(now):
            key = f"tiergate:rl:{principal.tenant}:tok:{start}"
            try:
                pipe = self._redis.pipeline(transaction=True)
                pipe.incrby(key, tokens)
                pipe.expire(key, 2 * WINDOW_S)
                await pipe.execute()
                return
            except Exception as exc:  # Redis down: count locally instead
                self._redis_failed(exc)
        window = self._tokens.setdefault(principal.tenant, _Window(start))
        window.roll(start)
        window.current += tokens

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
        return True

    async def _admit_redis(
        self, tenant: str, start: int, weight: float, rpm: int | None, tpm: int | None
    ) -> str | None:
        base = f"tiergate:rl:{tenant}"
        keys = [
            f"{base}:req:{start}",
            f"{base}:req:{start - WINDOW_S}",
            f"{base}:tok:{start}",
            f"{base}:tok:{start - WINDOW_S}",
        ]
        try:
            allowed, which = await self._script(
                keys=keys, args=[weight, rpm or 0, tpm or 0, 2 * WINDOW_S]
            )
        except Exception as exc:  # Redis down: fall back to the in-process counters
            self._redis_failed(exc)
            return None
        if int(allowed):
            return ""
        return which.decode() if isinstance(which, bytes) else str(which)

    def _redis_failed(self, exc: Exception) -> None:
        if time.time() >= self._redis_down_until:
            log.warning(
                "rate limits: Redis unavailable (%s); counting in-process for now",
                type(exc).__name__,
            )
        self._redis_down_until = time.time() + REDIS_RETRY_S

    async def aclose(self) -> None:
        """Close the Redis connection, if one was opened."""
        if self._redis is not None:
            await self._redis.aclose()


def build_rate_limiter(settings: Settings) -> RateLimiter:
    """The limiter for ``settings`` (Redis-backed when ``redis_url`` is set)."""
    return RateLimiter(rpm=settings.rpm_limit, tpm=settings.tpm_limit, redis_url=settings.redis_url)


def check_request_size(body: Mapping[str, Any], settings: Settings) -> None:
    """Refuse (400) too many messages or a ``max_tokens`` over the cap; see SECURITY.md."""
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > settings.max_messages:
        raise BadRequestError(
            f"too many messages: {len(messages)} > {settings.max_messages}", param="messages"
        )
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if isinstance(value, int) and value > settings.max_tokens_cap:
            raise BadRequestError(
                f"{name} {value} is over this deployment's cap of {settings.max_tokens_cap}",
                param=name,
            )
