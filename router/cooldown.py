"""Models cooling down after failures, so that requests stop waiting on them.

A provider that answers 429, or that fails ``after_fails`` calls in a row (timeouts, refused
connections, 5xx), is cooled down (closed models, and the local model when an external
llama.cpp server serves it; the gateway says which): while it cools, requests go straight to
the next model of their chain instead of each one waiting on the failing provider first (a
hanging provider otherwise costs every request its ``timeout_s``, and a rate-limited one gets
the calls it asked to be spared). A 429 cools for its ``Retry-After`` (at most
:data:`MAX_COOLDOWN_S`), else for ``cooldown_s``; the failures in a row for ``cooldown_s``. An
overloaded provider (503, Anthropic's 529) that sends a ``Retry-After`` has asked to be spared
too: it cools at once for it, as a 429 does; without one it counts as a failure in a row.
A stream that fails after its first tokens (cut, or ended by the provider's error event: a
rate limit there is its 429) is a failed call as the same failure before them is, and a
stream is a success once it ended whole, not when it opened: a provider that cuts every stream
after its first words fails calls in a row.

A cooling model is still called when nothing after it in the chain can be (a pinned model, the
last fallback): a cooldown never turns an answer into an error by itself.

Once a cooldown lapses, one call at a time probes the model (a circuit breaker's half-open
state: :meth:`Cooldowns.calling`); while it is out, the other requests pass the model over as
if it still cooled, so a provider that still hangs costs one call its ``timeout_s``, not every
request in flight. The probe's success ends the cooling; its failure (any failure after a
cooldown) starts the next one at once. A stream probe frees the model at its first token
(:meth:`Cooldowns.answering`: the provider answers again), not at its end, which may be a
minute away: the other calls go to the model again, while the success that ends the failures
in a row still waits for the stream to end whole, and a failure before it (the stream cut, or
any other call's) still cools at once. A probe that ends saying nothing of the provider (the
request's fault, a full queue, a client gone) lets the next call probe, and one that never ends
nor answers holds the model no longer than the call's own timeout.

A failure counts only if its call began after the model's last change: a cooldown that began
(here, or another replica's once seen here), or the answer that ended one, dated from the
start of the call that gave it (the probe's first token, or a success). A call in flight
before then says nothing the change did not: ten calls to a hanging provider that time out
one after another start one cooldown, and the late ones do not push its end on; one that
times out after the probe answered neither cools the model again nor costs the probe its
answer. The provider's own ask to be spared (a 429, a ``Retry-After``) still cools whenever
it comes: it speaks of now, not of when its call began. Nor does such a call's answer end a
cooldown: a long stream that began before a 429 and ends whole says nothing of the 429. The
gateway stamps each call with :attr:`Cooldowns.changes` as it makes it.

The failures in a row are counted per replica, in memory. With :class:`SharedCooldowns` (the
Redis outcome store, ``TIERGATE_REDIS_URL``) the cooldowns themselves are shared: one a replica
starts is published (without waiting), and each replica reads the others' from a copy its
store refreshes every second, so a provider that asked one replica to wait is spared by all of
them, and a hanging one costs a ``timeout_s`` to the requests of one replica, not of each.
After a shared cooldown each replica probes on its own, one call at a time, as after its own:
coordinating the probe through Redis would put a round trip (and its outage) on the request
path to save at most one call per replica per lapse, and a failed probe's new cooldown reaches
the other replicas within their next refresh (a second). A success ends the cooling on the
replica that saw it only: the others keep the cooldown until it lapses (it never outlasts what
the provider asked, or ``cooldown_s``), as a success is often a call that began before the
failure, and one stale success must not lift a fresh 429 for every replica. With Redis
unreachable, or SQLite, each replica cools on its own; a restart forgets its own cooldowns and
reads the shared ones again.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Protocol

from router.errors import MAX_RETRY_AFTER_S, BackendError, UpstreamRateLimitedError

#: The longest a provider's Retry-After cools its model: the longest Tiergate passes it on.
MAX_COOLDOWN_S = MAX_RETRY_AFTER_S


class SharedCooldowns(Protocol):
    """Where replicas share their cooldowns (:class:`~router.outcomes_redis.RedisOutcomeStore`).

    A cooldown is named by a ``mark``: ``<error code>|<unique id>``, new for each one started
    or extended, so that a replica can tell one it has seen end from a later one."""

    def publish_cooldown(self, name: str, seconds: float, mark: str) -> None:
        """Tell the other replicas that ``name`` cools for ``seconds``; never waits on the
        store, never raises (an outage leaves each replica on its own)."""

    def share_cooldowns(self, names: Callable[[], Collection[str]]) -> None:
        """Read the shared cooldowns of the models ``names()`` gives from now on."""

    def shared_cooldowns(self) -> Mapping[str, tuple[str, float]]:
        """The cooldowns read at the last refresh, this replica's included: model name ->
        (mark, seconds left now)."""

    def shared_cooldown(self, name: str) -> tuple[str, float] | None:
        """``name``'s entry of :meth:`shared_cooldowns`, or None: what a request's chain reads,
        one model at a time."""


@dataclass(slots=True)
class _State:
    failures: int = 0  # calls failed in a row
    until: float = 0.0  # monotonic time the cooldown ends
    reason: str = ""  # the error code that started it
    mark: str = ""  # the mark it was published under (SharedCooldowns)
    probe: float = 0.0  # monotonic time the probe out since it lapsed is bound by (0: none)
    answered: bool = False  # the probe has its first token: no call probes until the next cooling
    began: int = 0  # Cooldowns.changes when the probe out began: its answer dates from then


class Cooldowns:
    """Which models cool down, and until when (see the module docstring).

    ``cooldown_s`` 0 turns cooling off. ``clock`` is monotonic seconds (tests pass their own).
    ``shared``: the cooldowns of the other replicas, and where this one's go.
    """

    def __init__(
        self,
        *,
        after_fails: int = 3,
        cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedCooldowns | None = None,
    ) -> None:
        self.after_fails = max(1, after_fails)
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._states: dict[str, _State] = {}
        self.shared = shared
        # The marks of the cooldowns a success ended here, by model (replaced by the next one).
        self._ended: dict[str, frozenset[str]] = {}
        # Models another replica's cooldown cooled here since they last answered here, with
        # its mark (its reason, the error code, a probe after it shows): the first failure
        # here after it is a probe's, and cools at once.
        self._probing: dict[str, str] = {}
        #: The changes of state so far, of any model: a call's stamp (see :meth:`failed`).
        self.changes = 0
        # Each model's last change (a ``changes`` value): a failure of a call stamped before
        # it does not count.
        self._changed: dict[str, int] = {}

    def watch(self, names: Callable[[], Collection[str]]) -> None:
        """The models that may cool (the gateway's policy's, which may change): those whose
        shared cooldowns this replica reads."""
        if self.shared is not None:
            self.shared.share_cooldowns(names)

    def failed(self, name: str, error: BackendError, since: int | None = None) -> float | None:
        """Count a failed call to ``name``; the seconds of the cooldown it starts, if it starts
        one (a failure while it cools, here or shared, a pinned request's, extends the
        cooldown and returns None). Only the provider's failures count: a 429, a timeout, a
        refused connection, a 5xx, a model it says it does not have (not a 400, not a refused
        key, not one request too large, not litellm failing in this process: ``error.cools``).
        A failure with the provider's ``Retry-After`` cools at once, and so does any after a
        cooldown, here or shared, until the model answers (a probe's). A cooldown started or
        extended is published to the other replicas (``shared``). ``since``: the call's stamp
        (:attr:`changes` when it began); from before ``name``'s last change, the failure does
        not count, unless the provider asks to be spared (the module docstring)."""
        if self.cooldown_s <= 0 or not error.retryable or not error.cools:
            return None
        asked = error.retry_after
        spare = isinstance(error, UpstreamRateLimitedError) or bool(asked)
        if not spare and since is not None and since < self._changed.get(name, 0):
            return None  # in flight before the last change: it says nothing new
        state = self._states.setdefault(name, _State())
        state.failures += 1
        if spare:
            seconds = min(asked, MAX_COOLDOWN_S) if asked else self.cooldown_s
        elif state.failures >= self.after_fails or state.until or name in self._probing:
            seconds = self.cooldown_s
        else:
            return None
        now = self._clock()
        seen = self._seen(name)
        started = state.until <= now and (seen is None or seen[0] == state.mark)
        state.until = max(state.until, now + seconds)
        state.reason, state.probe, state.answered = error.code, 0.0, False
        if self.shared is not None:
            state.mark = f"{error.code}|{uuid.uuid4().hex}"
            self.shared.publish_cooldown(name, state.until - now, state.mark)
        if not started:
            return None
        self._change(name)
        return seconds

    def succeeded(self, name: str, since: int | None = None) -> None:
        """``name`` answered: its failures in a row and any cooldown end here (a shared one
        too, on this replica; the others keep it until it lapses). ``since``: the call's stamp
        (:attr:`changes` when it began, else the latest): an answer that ends a cooldown is a
        change from then on, and failures of calls made before it no longer count. An answer to
        a call made before ``name``'s last change ends nothing: it says nothing of a cooldown
        that began while it ran (a 429's, whose provider asked to be spared from then on)."""
        if since is not None and since < self._changed.get(name, 0):
            return
        state = self._states.pop(name, None) if self._states else None
        stamp = self.changes if since is None else since
        if state is not None and state.until:
            self._dated(name, stamp)
        if self.shared is None:
            return
        if self._probing.pop(name, None) is not None:
            self._dated(name, stamp)
        seen = self._seen(name)
        # This replica's own mark too: the refresh may not have read it back yet.
        ended = {mark for mark in (seen and seen[0], state and state.mark) if mark}
        if ended:
            self._ended[name] = frozenset(ended)

    def calling(self, name: str, timeout_s: float) -> float:
        """``name`` is called now. Where its cooldown lapsed (here, or another replica's) and it
        has not answered since, this call is the probe: until it ends, or ``timeout_s`` (the
        call's own timeout) passes, :meth:`left` has the other calls pass ``name`` over as if it
        still cooled. Returns the probe's token for :meth:`released`; 0 when this call is no
        probe (no cooldown, or a call made while it cools: pinned, the last fallback)."""
        if not self._states and not self._probing:
            return 0.0
        now = self._clock()
        state = self._states.get(name)
        if state is not None and (state.answered or max(state.until, state.probe) > now):
            return 0.0  # cooling, or another call probes (made anyway), or it answered one
        if name in self._probing:
            if self._seen(name) is not None:
                return 0.0  # another replica's cooldown lasts
        elif state is None or not state.until:
            return 0.0  # it has not cooled since it last answered
        if state is None:
            state = self._states[name] = _State()
        shared = self._probing.get(name)
        if shared is not None:  # another replica's cooldown's
            state.reason = shared.partition("|")[0]
        self.changes += 1  # the probe's stamp: the calls made before it are older than its answer
        state.began = self.changes
        state.probe = now + timeout_s
        return state.probe

    def released(self, name: str, probe: float) -> None:
        """The call that holds ``probe`` (:meth:`calling`) ended saying nothing of ``name``: not
        an answer, not a failure that counts (the request's fault, a full queue, a client that
        left). The next call probes. A no-op once the probe's success or failure was told, or
        after its bound, when another call may hold the next one."""
        state = self._states.get(name)
        if probe and state is not None and state.probe == probe:
            state.probe = 0.0

    def answering(self, name: str, probe: float) -> None:
        """The call that holds ``probe`` (:meth:`calling`) has its first token, a stream's
        long before its end: the provider answers again, and the other calls go to ``name``
        (none probes). The success that ends the failures in a row is :meth:`succeeded`'s, at
        the stream's end; until then a failure cools at once, as after any cooldown. A no-op
        for a call that holds no probe (0), or no longer (past its bound)."""
        state = self._states.get(name)
        if probe and state is not None and state.probe == probe:
            state.probe, state.answered = 0.0, True
            self._dated(name, state.began)

    def probing(self, name: str) -> bool:
        """Whether a probe of ``name`` is out (:meth:`calling`): why :meth:`left` is not 0
        after its cooldown lapsed."""
        state = self._states.get(name)
        return state is not None and state.probe > self._clock()

    def left(self, name: str) -> float:
        """Seconds of cooldown ``name`` has left (0: not cooling), here or shared; after it
        lapsed, while a probe is out (:meth:`calling`), the seconds its bound has left."""
        state = self._states.get(name)
        here = 0.0
        if state is not None:
            here = max(
                0.0, (state.until if state.until > state.probe else state.probe) - self._clock()
            )
        seen = self._seen(name)
        if seen is None or seen[1] <= here:
            return here
        if state is None or seen[0] != state.mark:
            if self._probing.get(name) != seen[0]:  # a cooldown not seen here before
                self._probing[name] = seen[0]
                self._change(name)
            if state is not None:
                state.answered = False  # another replica's cooldown since: probe after it
        return seen[1]

    def status(self) -> dict[str, dict[str, float | int | str | bool]]:
        """The models cooling now: seconds left, the error that started it, failures in a row
        here, whether this replica started it (else another did: ``started_here``), and
        whether a probe is out after it lapsed (``probing``, the seconds left its bound's);
        for ``/readyz``."""
        now = self._clock()
        cooling: dict[str, dict[str, float | int | str | bool]] = {
            name: {
                "seconds_left": round(max(state.until, state.probe) - now, 1),
                "reason": state.reason,
                "failures": state.failures,
                "started_here": state.until > 0,
                "probing": state.until <= now,
            }
            for name, state in self._states.items()
            if max(state.until, state.probe) > now
        }
        for name, (mark, seconds) in self._shared().items():
            known = cooling.get(name)
            if known is not None and float(known["seconds_left"]) >= round(seconds, 1):
                continue
            state = self._states.get(name)
            cooling[name] = {
                "seconds_left": round(seconds, 1),
                "reason": mark.partition("|")[0],
                "failures": state.failures if state is not None else 0,
                "started_here": state is not None and mark == state.mark,
                "probing": False,
            }
        return cooling

    def _change(self, name: str) -> None:
        # ``name`` changes state now: the calls already made are older than the change.
        self.changes += 1
        self._changed[name] = self.changes

    def _dated(self, name: str, stamp: int) -> None:
        # ``name`` answered a call stamped ``stamp``: the calls made before it no longer count.
        if stamp > self._changed.get(name, 0):
            self._changed[name] = stamp

    def _seen(self, name: str) -> tuple[str, float] | None:
        """:meth:`_shared`'s entry for ``name``, read alone: ``left`` runs for each model of
        every request's chain, and the whole table is not built for it."""
        if self.shared is None or self.cooldown_s <= 0:
            return None
        seen = self.shared.shared_cooldown(name)
        if seen is None or seen[1] <= 0 or seen[0] in self._ended.get(name, ()):
            return None
        return seen

    def _shared(self) -> dict[str, tuple[str, float]]:
        """The other replicas' cooldowns now (and this one's, as published), less those that
        ended here; none while cooling is off."""
        if self.shared is None or self.cooldown_s <= 0:
            return {}
        seen = self.shared.shared_cooldowns()
        if not seen:
            return {}
        ended = self._ended
        return {
            name: (mark, seconds)
            for name, (mark, seconds) in seen.items()
            if seconds > 0 and mark not in ended.get(name, ())
        }
