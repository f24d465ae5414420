"""Models cooling down after failures, so that requests stop waiting on them.

A provider that answers 429, or that fails ``after_fails`` calls in a row (timeouts, refused
connections, 5xx), is cooled down in this process (closed models, and the local model when an
external llama.cpp server serves it; the gateway says which): while it cools, requests go
straight to the next model of their chain instead of each one waiting on the failing provider
first (a hanging provider otherwise costs every request its ``timeout_s``, and a rate-limited
one gets the calls it asked to be spared). A 429 cools for its ``Retry-After`` (at most
:data:`MAX_COOLDOWN_S`), else for ``cooldown_s``; the failures in a row for ``cooldown_s``. An
overloaded provider (503, Anthropic's 529) that sends a ``Retry-After`` has asked to be spared
too: it cools at once for it, as a 429 does; without one it counts as a failure in a row.

A cooling model is still called when nothing after it in the chain can be (a pinned model, the
last fallback): a cooldown never turns an answer into an error by itself. The first call after
a cooldown is a probe: a success ends the cooling, a failure starts another at once. Per replica
and in memory: replicas learn on their own, and a restart forgets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from router.errors import MAX_RETRY_AFTER_S, BackendError, UpstreamRateLimitedError

#: The longest a provider's Retry-After cools its model: the longest Tiergate passes it on.
MAX_COOLDOWN_S = MAX_RETRY_AFTER_S


@dataclass(slots=True)
class _State:
    failures: int = 0  # calls failed in a row
    until: float = 0.0  # monotonic time the cooldown ends
    reason: str = ""  # the error code that started it


class Cooldowns:
    """Which models cool down, and until when (see the module docstring).

    ``cooldown_s`` 0 turns cooling off. ``clock`` is monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        *,
        after_fails: int = 3,
        cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.after_fails = max(1, after_fails)
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._states: dict[str, _State] = {}

    def failed(self, name: str, error: BackendError) -> float | None:
        """Count a failed call to ``name``; the seconds of the cooldown it starts, if it starts
        one (a failure while it cools, a pinned request's, extends the cooldown and returns
        None). Only failures a later call may not meet count: a 429, a timeout, a refused
        connection, a 5xx (not a 400, not a refused key, not litellm failing in this process:
        ``error.cools``). A failure with the provider's ``Retry-After`` cools at once."""
        if self.cooldown_s <= 0 or not error.retryable or error.should_retry is False:
            return None
        if not error.cools:
            return None
        state = self._states.setdefault(name, _State())
        state.failures += 1
        asked = error.retry_after
        if isinstance(error, UpstreamRateLimitedError) or asked:
            seconds = min(asked, MAX_COOLDOWN_S) if asked else self.cooldown_s
        elif state.failures >= self.after_fails:
            seconds = self.cooldown_s
        else:
            return None
        now = self._clock()
        started = state.until <= now
        state.until = max(state.until, now + seconds)
        state.reason = error.code
        return seconds if started else None

    def succeeded(self, name: str) -> None:
        """``name`` answered: its failures in a row and any cooldown end."""
        if self._states:
            self._states.pop(name, None)

    def left(self, name: str) -> float:
        """Seconds of cooldown ``name`` has left (0: not cooling)."""
        state = self._states.get(name)
        return max(0.0, state.until - self._clock()) if state is not None else 0.0

    def status(self) -> dict[str, dict[str, float | int | str]]:
        """The models cooling now: seconds left, the error that started it, failures in a row
        (for ``/readyz``)."""
        now = self._clock()
        return {
            name: {
                "seconds_left": round(state.until - now, 1),
                "reason": state.reason,
                "failures": state.failures,
            }
            for name, state in self._states.items()
            if state.until > now
        }
