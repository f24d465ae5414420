"""The routing engine: one entry point owns a request's life. No HTTP here.

:meth:`Gateway.serve` takes a :class:`Call` (one request, whichever API front it came through)
and checks the pin, decides (``signals -> score -> policy``), refuses, reserves spend and tokens,
runs the learning hooks, walks the fallback chain, charges, and writes exactly one
:class:`~router.outcomes.OutcomeRecord`, in one ``try/finally``. :meth:`Gateway.route` is the dry
run behind ``/v1/route``: the same admission, no model called.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import math
import time
import uuid
from collections.abc import (
    AsyncGenerator,
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Mapping,
)
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from router.backends import MESSAGE_FIELD, Backend, Completion, Usage, closed, local
from router.backends.local import ExternalLlamaBackend, Gate
from router.backends.native import (
    CHUNKS_END,
    NATIVE,
    NativeCaller,
    NativeRequest,
    opening_event,
    speaks,
)
from router.calibration import AliasThreshold, calibrate, calibrated_values
from router.cascade import (
    ESCALATION_FAILED,
    CascadeModel,
    HoldBack,
    Judgement,
    answer_stats,
    judge,
    read_logprobs,
)
from router.cooldown import Cooldowns
from router.costs import CostBook
from router.errors import (
    BackendError,
    BadRequestError,
    BudgetExceededError,
    ClientDisconnected,
    LocalOverloadedError,
    NotFoundError,
    PermissionDeniedError,
    PolicyError,
    ServerShuttingDownError,
    TiergateError,
    TierUnavailableError,
    UpstreamRateLimitedError,
    error_status,
)
from router.learning import answer_text
from router.outcomes import OutcomeRecord, OutcomeStore, reserve_in_thread
from router.policy import Decision, ModelSpec, Policy, evaluate, load_policy, why_unfit
from router.schemas import CHAT_FIELDS, FrontFields, front_fields
from router.scoring import Scorer
from router.signals import (
    SAMPLING_DEFAULTS,
    Signals,
    cache_lifetime,
    extract_signals,
    native_blocks,
    policy_metadata,
    redacted,
    request_strings,
    requested_choices,
    scoring_text,
    server_block_parts,
    text_tokens,
)
from router.telemetry import Telemetry

if TYPE_CHECKING:
    from router.auth import Principal
    from router.learning import LearningLoop
    from router.limits import RateLimiter, TokenHold

log = logging.getLogger("tiergate.gateway")
#: Threads that score with a costly (encoder) scorer: prompts that wait together share one
#: encoder pass (router.encoder.EncoderBatcher), so more waiting threads make larger batches.
SCORING_THREADS = 16
_T = TypeVar("_T")
_N = TypeVar("_N", int, float)

#: The ``x-tiergate-fallback`` of a request served locally because no closed model is available.
NO_CLOSED_FALLBACK = "no-closed->local"

# Requests longer than this (in characters) are scored on a worker thread (see decide_async).
OFFLOAD_SCORING_CHARS = 4000
# A metadata value in an outcome record: at most this many characters, personal data redacted.
RECORD_METADATA_CHARS = 256
# The model name a request asked for, as the record of one refused before routing keeps it (an
# unknown model's name is the client's own text): at most this many characters, redacted.
RECORD_ASKED_CHARS = 200


def _is_large(body: Mapping[str, Any]) -> bool:
    """Whether the request holds over ``OFFLOAD_SCORING_CHARS`` characters (or strings): read
    only until that is known, so a short answer for any body. A file's payload counts as sent:
    the scan yields none of an image's, but each pass over it costs its length."""
    chars = 0
    for count, text in enumerate(request_strings(body, as_sent=True)):
        chars += len(text)
        if chars > OFFLOAD_SCORING_CHARS or count > OFFLOAD_SCORING_CHARS // 8:
            return True
    return False


#: The most characters one token can stand for in any text a tokenizer meets in practice (about
#: 4 for English prose, 1 for Chinese): a request with more text than this many characters per
#: token of the largest context window fits no model, whatever its tokenizer.
MAX_CHARS_PER_TOKEN = 6


def unknown_model(name: str) -> NotFoundError:
    """The 404 for a model name that is neither an alias nor a configured model."""
    return NotFoundError(
        f"model '{name}' is not an alias or a configured model; see GET /v1/models",
        param="model",
    )


def refuse_unknown_model(policy: Policy, name: str, tenant: str) -> None:
    """Refuse (404) a model name that ``tenant`` cannot ask for under ``policy``."""
    if not policy.is_known_model(name, tenant):
        raise unknown_model(name)


def refuse_beyond_every_window(
    body: Mapping[str, Any],
    policy: Policy,
    fields: FrontFields = CHAT_FIELDS,
    sent: Mapping[str, Any] | None = None,
) -> None:
    """Refuse (400) a request whose text cannot fit any model's context window, before any of it
    is read for signals: nothing would be sent, and a body at the size cap then costs one pass
    of ``len`` rather than a full scan. Skipped when a model does not declare its window.
    ``fields``: the names of the request's front, whose prompt field the 400 names. ``sent``:
    the front's native request, whose server-tool blocks (dropped from ``body``, counted by the
    prompt estimate) count too, so a history of them is refused here as the same text is."""
    windows = [spec.context_window for spec in policy.models.values()]
    if not windows or None in windows:
        return
    largest = max(w for w in windows if w is not None)
    chars = sum(len(text) for text in request_strings(body))
    if sent is not None:
        parts = server_block_parts(native_blocks(sent))
        chars += sum(len(part) for part in parts if isinstance(part, str))
    if chars > largest * MAX_CHARS_PER_TOKEN:
        raise BadRequestError(
            f"the request holds {chars} characters of text, more than any model's context window "
            f"({largest} tokens) can take",
            code="context_length_exceeded",
            param=fields.prompt,
        )


@dataclass(slots=True)
class Served:
    """Who actually answered, after any fallback."""

    model: ModelSpec
    fallback: str | None = None


@dataclass(slots=True)
class RequestContext:
    """One request's identity and timing, filled in as it is served and then recorded."""

    request_id: str
    tenant: str
    started: float
    stream: bool
    headers: Mapping[str, str] = field(default_factory=dict)
    signals: Signals | None = None
    decision: Decision | None = None
    served: Served | None = None
    usage: Usage = field(default_factory=Usage)
    ttft_ms: float | None = None
    policy_version: str | None = None
    model_version: str | None = None  # the scorer that scored it (see Gateway.scorer_for)
    prompt: str | None = None
    streamed_chunks: int = 0  # chunks that carried answer text, counted as they passed
    streamed_tokens: float = 0.0  # estimated (text_tokens) from the answer text streamed
    front: str = "chat"
    cascade: dict[str, Any] | None = None  # a cascade's local part (record and headers)
    cascade_usage: Usage | None = None  # the local answer an escalated cascade discarded
    choices: int = 1  # the request's ``n``: a provider bills each choice's completion
    optional: frozenset[str] = frozenset()  # see Call.optional
    native_only: frozenset[str] = frozenset()  # see Call.native_only
    admitted: bool = False  # past admission: a model was to be called (else no tier recorded)
    asked: str = ""  # the model name asked for, the record's alias when there are no signals
    probe: float = 0.0  # the cooldown probe its model's call holds (Cooldowns.calling), or 0
    since: int = 0  # its model's call's stamp (Cooldowns.changes as it began)
    left: bool = False  # its client left a closed call, which ends; no other model is called
    hold: TokenHold | None = None  # its tokens reserved (Gateway._admit), topped up per call
    held_usd: float | None = None  # its budget hold (Gateway.hold_spend), topped up per call
    cache_ttl: str | None = None  # its prompt cache's lifetime, read only under a budget (_admit)
    hold_outage_s: float | None = None  # its refused hold's wait in a store outage (hold_spend)

    def tokens_used(self) -> int:
        """The tokens this request used (the rate limiter's charge): its answer's, and those of
        the local answer an escalated cascade discarded."""
        used = self.usage.prompt_tokens + self.usage.completion_tokens
        if self.cascade_usage is not None:
            used += self.cascade_usage.prompt_tokens + self.cascade_usage.completion_tokens
        return used


def new_request_id() -> str:
    """A fresh request id, as ``x-request-id`` and the outcome record carry it."""
    return f"req_{uuid.uuid4().hex}"


@dataclass(frozen=True, slots=True)
class Call:
    """One API request as the gateway serves it, whichever front it came through.

    ``body`` is a chat-completions body, validated unless ``refused`` is set: the error of a
    request turned away while it was read (rate limit, size cap, malformed JSON), which is
    answered with that error and recorded like any other request. ``disconnected`` tells
    whether the client has gone; ``native`` is the front's own body, kept for a target that
    speaks the same API. ``shape`` makes the front's answer from a whole chat answer, before
    the request is recorded: an answer the front cannot give is the request's error.
    ``optional``: the chat fields the front made from parameters of its own API, which a model
    that cannot take them goes without (:meth:`Gateway.fitted`); what a chat client sent goes
    on as it sent it. ``native_only``: the front's own fields that only a model of its API's
    provider serves (Anthropic's ``mcp_servers``): the policy chooses no other model for them,
    and one that is chosen still refuses the request (400, :meth:`Gateway.fitted`).
    """

    body: dict[str, Any]
    principal: Principal
    tenant: str
    front: str = "chat"
    policy_headers: Mapping[str, str] = field(default_factory=dict)
    metadata_keys: frozenset[str] | None = None
    sent_policy_headers: Mapping[str, str] | None = None  # all x-tiergate-* sent (None: as above)
    disconnected: Callable[[], Awaitable[bool]] | None = None
    native: NativeRequest | None = None
    refused: BaseException | None = None
    shape: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    optional: frozenset[str] = frozenset()
    native_only: frozenset[str] = frozenset()
    request_id: str = field(default_factory=new_request_id)
    started: float = field(default_factory=time.perf_counter)

    @property
    def stream(self) -> bool:
        """Whether the caller asked for a stream."""
        return bool(self.body.get("stream"))


@dataclass(frozen=True, slots=True)
class Answer:
    """A whole answer: the chat completion body and the headers that explain the route."""

    body: dict[str, Any]
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class StreamAnswer:
    """A streamed answer: chat completion chunks, the last one carrying the usage.

    The request is recorded when ``chunks`` ends, fails or is closed (``aclose``), read or
    not; a client that leaves is recorded as aborted and charged for what was generated. An
    exception thrown in (``athrow``: a front failed to translate or frame a chunk) is
    recorded as that error rather than as a client that left. On a front other than chat the
    chunks end with ``CHUNKS_END`` (router.backends.native), where the request is not yet
    recorded: the front's last events come after it. ``prompt_tokens``:
    the prompt's tokens as known when the stream opened, before the closing usage: the model's
    own count where it gives one by its first chunk (the in-process local model), else the
    estimate the request was routed and reserved with.
    """

    chunks: AsyncGenerator[dict[str, Any], None]
    headers: dict[str, str]
    request_id: str
    prompt_tokens: int = 0


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """How a request would be routed: its signals, the decision and the chain to try."""

    signals: Signals
    decision: Decision
    chain: list[tuple[ModelSpec, str | None, str | None]]  # (model, fallback, unavailable)
    policy_version: str
    model_version: str

    def as_dict(self) -> dict[str, Any]:
        """The JSON ``/v1/route`` answers with."""
        return {
            "policy_version": self.policy_version,
            "model_version": self.model_version,
            "signals": self.signals.as_dict(),
            "decision": self.decision.as_dict(),
            "chain": [
                {"model": spec.name, "tier": spec.tier, "fallback": label, "unavailable": reason}
                for spec, label, reason in self.chain
            ],
        }


@dataclass(frozen=True, slots=True)
class _Opened:
    """A stream's head: a model has produced its first chunk past its opening (see
    :meth:`Gateway.stream`), so the headers can name it, and the prompt's tokens as known
    then (see :class:`StreamAnswer`)."""

    headers: dict[str, str]
    prompt_tokens: int


def load_serving_policy(path: str | Path) -> Policy:
    """The policy at ``path`` as the gateway serves it: its closed models know what their
    provider takes at most where the policy says nothing (their output limit in litellm's
    map, OpenAI's 4 stop sequences, the sampling fields OpenAI's reasoning models refuse:
    :meth:`Policy.know_limits`)."""
    return load_policy(path).know_limits(
        closed.mapped_output_limit, closed.stop_sequence_limit, closed.refused_sampling
    )


class PolicyHolder:
    """The live policy and its hot reload: a bad edit is refused and the last good one serves.

    A change is loaded only once the file has looked the same on two checks in a row, and a
    file that changes while it is read is read again at a later check. An editor or ``kubectl
    cp`` that truncates and then writes the file would otherwise be caught half written, and
    the half would be refused (and counted) as a bad edit.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.policy: Policy = load_serving_policy(path)
        self._loaded = self._stat()
        # A change seen on the last check and not loaded yet: (seen, stamp); a missing file's
        # stamp is None, so "nothing pending" needs its own flag.
        self._pending: tuple[bool, tuple[int, int, int] | None] = (False, None)
        self.last_error: str | None = None
        self.reload_failures = 0
        self.reloads = 0

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def check(self) -> bool:
        """Reload if the file changed and has settled; True when a new policy was installed."""
        stamp = self._stat()
        if stamp == self._loaded:
            self._pending = (False, None)
            return False
        if self._pending != (True, stamp):
            self._pending = (True, stamp)  # changed since the last check: wait until it settles
            return False
        error: PolicyError | None = None
        try:
            policy = load_serving_policy(self.path)
        except PolicyError as exc:
            error = exc
        after = self._stat()
        if after != stamp:  # written to while it was read: read it again once it settles
            self._pending = (True, after)
            return False
        self._loaded, self._pending = stamp, (False, None)
        if error is not None:
            self.last_error = str(error)
            self.reload_failures += 1
            log.error("policy reload refused, keeping %s: %s", self.policy.digest, error)
            return False
        self.policy = policy
        self.last_error = None
        self.reloads += 1
        log.info("policy reloaded: %s", policy.digest)
        for issue in policy.warnings:
            log.warning("policy: %s", issue)
        return True


#: How often a non-streaming request checks that its client is still there.
DISCONNECT_POLL_S = 0.25


class Gateway:
    """Decides and serves requests; see the module docstring.

    ``limiter`` reserves each request's tokens (``reserve_tokens`` when it sets no
    ``max_tokens``); ``local_gate`` is the local tier's queue, for readiness. ``learning`` is
    attached once built (it reads the gateway): its hooks see every request served.
    ``native`` serves a call's own request (``Call.native``) on a model that speaks its front's
    API (:mod:`router.backends.native`). ``companion`` loads the static scorer that decides in
    place of a costly one under a policy with ``encoder: false`` (:meth:`scorer_for`), or
    returns None where there is none.
    """

    def __init__(
        self,
        *,
        policy: PolicyHolder,
        scorer: Scorer,
        local: Backend | None,
        closed: Backend,
        costs: CostBook,
        outcomes: OutcomeStore,
        limiter: RateLimiter,
        reserve_tokens: int,
        local_gate: Gate | None = None,
        native: NativeCaller | None = None,
        on_record: Callable[[OutcomeRecord], None] | None = None,
        telemetry: Telemetry | None = None,
        cascade: CascadeModel | None = None,
        companion: Callable[[Scorer], Scorer | None] | None = None,
        cooldowns: Cooldowns | None = None,
        call_timeouts: Mapping[str, float] | None = None,
    ) -> None:
        self.policies = policy
        self.cooldowns = cooldowns if cooldowns is not None else Cooldowns()
        # A call's timeout by tier, where its model sets none: what bounds a cooldown's probe.
        self.call_timeouts = dict(call_timeouts or {})
        self.cascade = cascade
        self.scorer = scorer
        self._companion = companion
        # (main scorer, its companion): loaded once per main scorer, so a hot swap reloads it.
        self._static: tuple[Scorer, Scorer | None] | None = None
        # Costly scorers score here, not in asyncio's default pool (a handful of threads on a
        # small machine): the encoder batches the prompts of the threads that wait together.
        self._scoring: ThreadPoolExecutor | None = None
        reads = (None, scorer.version, getattr(scorer, "score_of", None))
        if cascade is not None and cascade.scorer not in reads:
            # The confidence model reads the routing score: another scorer's is not its input.
            log.warning(
                "cascade model %s was fitted on %s's score, the scorer is %s: its confidence "
                "is uncalibrated here (python -m studies.cascade refits it)",
                cascade.version,
                cascade.scorer,
                scorer.version,
            )
        self.local = local
        self.closed = closed
        self.costs = costs
        self.outcomes = outcomes
        self.limiter = limiter
        self.reserve_tokens = reserve_tokens
        self.local_gate = local_gate
        self.native = native
        self.learning: LearningLoop | None = None
        self.thresholds: dict[str, float] = {}
        self.last_scores: list[float] = []
        self.alias_thresholds: dict[str, AliasThreshold] = calibrate(self.policy, [])
        self._on_record = on_record
        self.warn_unpriced()
        self.warn_output_limits()
        self.telemetry = telemetry if telemetry is not None else Telemetry.off()
        # Set by ``tiergate serve`` just before it cancels the requests still running at
        # shutdown: each is then recorded as stopped by the server (``server_shutting_down``).
        self.stopping = False
        self.cooldowns.watch(self.cooling_names)  # read from the store's thread: set up last

    # -- a request's life ------------------------------------------------------------------

    async def serve(self, call: Call) -> Answer | StreamAnswer:
        """Serve ``call`` and write its one outcome record (see :meth:`_life`).

        Raises the request's error (already recorded, with the explanation headers set on
        it); :class:`ClientDisconnected` when the client left before a whole answer.
        """
        life = self._life(call)
        head = await anext(life)
        if isinstance(head, Answer):
            await anext(life, None)  # the rest of its life: the record, the learning hooks
            return head
        assert isinstance(head, _Opened)
        # Past its head a life yields only chunks: it is the stream itself, so that closing
        # the stream, read or not, closes the life (an async generator wrapped around it
        # would run none of its body if closed before its first step).
        chunks = cast("AsyncGenerator[dict[str, Any], None]", life)
        return StreamAnswer(chunks, head.headers, call.request_id, head.prompt_tokens)

    async def route(self, call: Call) -> RoutePlan:
        """How ``call`` would be routed, after the same admission as :meth:`serve`; no model
        is called and nothing is reserved or recorded."""
        if call.refused is not None:
            raise call.refused
        self._check_pin(call)
        signals, decision, model_version = await self._decide(call)
        return RoutePlan(
            signals=signals,
            decision=decision,
            chain=[
                (spec, label, self.unavailable_reason(spec))
                for spec, label in self._planned(decision)
            ],
            policy_version=self.policy.digest,
            model_version=model_version,
        )

    async def _life(self, call: Call) -> AsyncGenerator[Answer | _Opened | dict[str, Any], None]:
        """One request from admission to its record, in one ``try/finally``.

        Yields the :class:`Answer`, or, for a stream, :class:`_Opened` once a model produced
        its first chunk that carries something (:meth:`stream`), then the chunks and a closing
        usage chunk. The backend's stream is
        closed before the record is written (given ``STREAM_CLOSE_TIMEOUT_S``; the record is
        written however the close ends); the token hold is settled after it, with the
        usage the record settled on (a client that left pays for what was generated).
        """
        ctx = RequestContext(
            request_id=call.request_id,
            tenant=call.tenant,
            started=call.started,
            stream=call.stream,
            policy_version=self.policy.digest,
            front=call.front,
            optional=call.optional,
            native_only=call.native_only,
            asked=_asked_model(call.body),
        )
        status, http_status, error = "ok", 200, None
        hold: TokenHold | None = None
        source: _Metered | None = None
        relay = _Relay(ctx)
        answer: str | None = None
        try:
            if call.refused is not None:
                raise call.refused
            hold = await self._admit(call, ctx)
            ctx.admitted = True
            if self.learning is not None:
                self.learning.observe(ctx, call.body)
            if not ctx.stream:
                result = await _unless_disconnected(
                    call, self.complete(ctx, call.body, call.native), ctx
                )
                if call.shape is None:
                    _unnamed_stop(ctx, result.body)
                body = result.body if call.shape is None else _shaped(call.shape, result.body)
                answer = answer_text(result.body)
                yield Answer(body, self.explain(ctx))
            else:
                # Until the first chunk (queued for the local slot, or reading the prompt) no
                # response has started to notice a client that leaves: watch for it here.
                source = await _unless_disconnected(call, self.stream(ctx, call.body, call.native))
                estimate = ctx.signals.prompt_tokens if ctx.signals is not None else 0
                yield _Opened(self.explain(ctx), ctx.usage.prompt_tokens or estimate)
                async for chunk in source:
                    relay.passing(chunk)
                    yield chunk
                self._stream_ended(ctx, None, started=True)
                answer = "".join(relay.text)
                async for chunk in _closing_chunks(ctx, relay, call):
                    yield chunk
        except (Exception, asyncio.CancelledError, GeneratorExit) as exc:
            # A chat client's refusal on the way in (its schema, the caps) names its own fields.
            named = None if exc is call.refused and call.front == "chat" else call.body
            internal = self._explained(ctx, exc, named, opened=source is not None)
            status, http_status, error = _outcome(exc, self.stopping, ctx.front)
            self._stream_ended(ctx, exc, started=source is not None)
            if internal is not None:
                raise internal from exc
            raise
        finally:
            try:
                await _wound_up(ctx, source, call.body, relay)
            finally:  # a close cancelled (or failing otherwise) still records
                self.record(ctx, status=status, http_status=http_status, error=error)
                if hold is not None:
                    hold.settle(ctx.tokens_used())
        if answer is not None and self.learning is not None:
            self.learning.after_response(ctx, call.body, answer)

    def _stream_ended(
        self, ctx: RequestContext, exc: BaseException | None, *, started: bool
    ) -> None:
        """A request's end, for the cooldown of the model whose stream ``started``: whole, a
        success (not its opening: a provider that cuts every stream after its first words
        fails calls in a row); a :class:`BackendError` (a provider's rate-limit event, a
        stream cut), a failed call, as the same failure before it."""
        if not started or ctx.served is None:
            return
        if exc is None:
            self.cooldowns.succeeded(ctx.served.model.name, ctx.since)
        elif isinstance(exc, BackendError):
            self._cool(ctx, ctx.served.model, exc)
        self.cooldowns.released(ctx.served.model.name, ctx.probe)  # a client that left

    def _explained(
        self,
        ctx: RequestContext,
        exc: BaseException,
        body: Mapping[str, Any] | None,
        *,
        opened: bool,
    ) -> TiergateError | None:
        """Give a failed request's error its headers (``x-request-id``, the decision) and the
        names of the client's front for the fields of ``body``, the chat request, that it names
        (a backend knows no front); ``body`` None: it names the client's fields already (a
        chat client's ``max_tokens`` must not become the ``max_completion_tokens`` it also
        sent). A defect (any other exception), unless a stream has started, is logged with the
        request id and answered as a 500 that carries those headers too: returned for the
        caller to raise. One in a stream is logged where it is framed (router.api), once."""
        if isinstance(exc, TiergateError):
            if body is not None:
                exc.name_fields(functools.partial(front_fields(ctx.front).named, body=body))
            exc.headers.update(self.explain(ctx))
            return None
        if not isinstance(exc, Exception) or opened:  # cancelled (a client left, shutdown)
            return None
        log.exception("request %s failed", ctx.request_id, extra={"request_id": ctx.request_id})
        return TiergateError("internal error", headers=self.explain(ctx))

    async def _admit(self, call: Call, ctx: RequestContext) -> TokenHold:
        """Check the pin, decide, choose what to store, reserve spend, refuse (budget,
        unsatisfiable), and reserve the tokens (or refuse: 429)."""
        self._check_pin(call)
        ctx.choices = requested_choices(call.body)
        ctx.signals, ctx.decision, ctx.model_version = await self._decide(call)
        ctx.prompt = _prompt_to_store(ctx.decision, call.body)
        if ctx.decision.budget_usd is not None:  # what its hold is priced at (_call_usd)
            sent = () if call.native is None else (call.native.body,)
            ctx.cache_ttl = cache_lifetime(call.body, *sent)
        await self.hold_spend(ctx, self.reserve_tokens)
        if ctx.decision.rejected:
            held, outage_s = ctx.decision.rejected_held, ctx.hold_outage_s
            raise BudgetExceededError(ctx.decision.rejected, held=held, outage_s=outage_s)
        if ctx.decision.unsatisfiable:
            code = "context_length_exceeded" if ctx.decision.context_exceeded else None
            param = ctx.decision.unsatisfiable_param  # named as the client's front names it
            raise BadRequestError(ctx.decision.unsatisfiable, code=code, param=param)
        tokens = 0
        if self.limiter.limits_for(call.principal)[1] is not None:  # else nothing is reserved
            tokens = self.reserved_tokens(ctx, self.reserve_tokens)
        ctx.hold = await self.limiter.reserve(call.principal, tokens)
        return ctx.hold

    def _check_pin(self, call: Call) -> None:
        spec = self.policy.models.get(str(call.body.get("model")))
        if spec is not None and spec.tier == "closed" and not call.principal.can("pin_closed"):
            raise PermissionDeniedError(
                f"this API key may not pin the closed model '{spec.name}'; use a routing alias",
                param="model",
            )

    async def _decide(self, call: Call) -> tuple[Signals, Decision, str]:
        return await self.decide_async(
            call.body,
            tenant=call.tenant,
            headers=call.policy_headers,
            metadata_keys=call.metadata_keys,
            sent=call.native.body if call.native is not None else None,
            sent_headers=call.sent_policy_headers,
            fields=front_fields(call.front),
        )

    def explain(self, ctx: RequestContext) -> dict[str, str]:
        """The decision's explanation as response headers."""
        headers = {"x-request-id": ctx.request_id}
        if ctx.policy_version:
            headers["x-tiergate-policy-version"] = ctx.policy_version
        headers["x-tiergate-model-version"] = ctx.model_version or self.scorer.version
        if ctx.decision is not None:
            headers["x-tiergate-rule"] = ctx.decision.rule
            headers["x-tiergate-score"] = f"{ctx.decision.score:.4f}"
            if ctx.decision.threshold is not None:
                headers["x-tiergate-threshold"] = f"{ctx.decision.threshold:.4f}"
        if ctx.served is not None:
            headers["x-tiergate-tier"] = ctx.served.model.tier
            headers["x-tiergate-model"] = ctx.served.model.name
            if ctx.served.fallback:
                headers["x-tiergate-fallback"] = ctx.served.fallback
        if ctx.cascade is not None:
            headers["x-tiergate-cascade"] = ctx.cascade["decision"]
            headers["x-tiergate-confidence"] = f"{ctx.cascade['confidence']:.4f}"
        elif ctx.decision is not None and ctx.decision.cascade_skipped is not None:
            headers["x-tiergate-cascade"] = "skipped"  # why: /v1/route, policy explain
        return headers

    # -- deciding --------------------------------------------------------------------------

    def recalibrate(self, scores: list[float]) -> None:
        """Recompute the thresholds of aliases with a target closed share from recent scores."""
        self.last_scores = scores
        self.alias_thresholds = calibrate(self.policy, scores)
        self.thresholds = calibrated_values(self.alias_thresholds)

    @property
    def policy(self) -> Policy:
        """The policy serving right now."""
        return self.policies.policy

    def warn_unpriced(self) -> list[str]:
        """Log the policy's closed models that no price covers (their calls would count $0 in
        costs and budgets: litellm's table lacks them and the policy gives no ``price``), and
        those that may search the web with no price per search (``CostBook.unpriced_searches``),
        and return their names."""
        models = self.policy.models.values()
        names = self.costs.unpriced(models)
        if names:
            log.warning(
                "no price for closed model(s) %s: litellm's table does not list their "
                "litellm_model, so their calls count $0 in costs and budgets; give each a "
                "price in the policy (price: {input_per_mtok, output_per_mtok})",
                ", ".join(names),
            )
        searching = self.costs.unpriced_searches(models)
        if searching:
            log.warning(
                "no web search price for closed model(s) %s: neither the policy's price nor "
                "litellm's table names one, so their web searches count $0 in costs and "
                "budgets; give each a price with web_search_per_1k (Anthropic's: 10)",
                ", ".join(searching),
            )
        return names + searching

    def warn_output_limits(self) -> list[str]:
        """Log the policy's closed models whose output limit neither the policy
        (``max_output_tokens``) nor litellm's model map gives, as ``tiergate policy check``
        warns of them (:func:`~router.backends.closed.output_limit_warnings`: Anthropic models
        sent :data:`~router.backends.closed.ANTHROPIC_MAX_TOKENS`, Bedrock application
        inference profiles no one can tell the model of), and return their names."""
        names: list[str] = []
        for warning in closed.output_limit_warnings(self.policy.models.values()):
            log.warning("%s", warning.together())
            names += warning.names
        return names

    def backend(self, model: ModelSpec) -> Backend | None:
        """The backend for a model's tier (None when the local tier is switched off)."""
        return self.local if model.tier == "local" else self.closed

    def unavailable_reason(self, model: ModelSpec) -> str | None:
        """Why ``model`` cannot serve now, or None."""
        backend = self.backend(model)
        if backend is None:
            return "local tier disabled"
        return backend.unavailable_reason(model)

    def closed_available(self) -> bool:
        """Whether any of the policy's closed models can serve now (has its API key)."""
        policy = self.policy
        return any(self.unavailable_reason(policy.models[n]) is None for n in policy.closed_models)

    def scorer_for(self, policy: Policy) -> Scorer:
        """The scorer that decides under ``policy``: the main one, or its static companion
        where the policy turns the encoder off (``encoder: false``) and the main one has one.

        The companion is loaded here on first need, once per main scorer (a hot swap brings a
        new one); a main scorer without an encoder has none, and one whose companion failed to
        load (logged by the loader) keeps deciding itself.
        """
        main = self.scorer
        if policy.encoder or self._companion is None:
            return main
        known = self._static
        if known is None or known[0] is not main:
            known = self._static = (main, self._companion(main))
        return main if known[1] is None else known[1]

    def deciding(self) -> Scorer:
        """The scorer that decides now, as far as it is loaded: what ``/readyz`` and the
        dashboard name. It never loads the companion (the next request does, off the loop), so
        right after a reload to ``encoder: false`` it names the main scorer until then."""
        known = self._static
        if self.policy.encoder or known is None or known[0] is not self.scorer:
            return self.scorer
        return self.scorer if known[1] is None else known[1]

    def _companion_unloaded(self, policy: Policy) -> bool:
        # Whether scorer_for would load the companion now (it reads files: off the loop).
        known = self._static
        return (
            not policy.encoder
            and self._companion is not None
            and (known is None or known[0] is not self.scorer)
        )

    def decide(
        self,
        body: Mapping[str, Any],
        *,
        tenant: str,
        headers: Mapping[str, str],
        metadata_keys: Collection[str] | None = None,
        sent: Mapping[str, Any] | None = None,
        scorer: Scorer | None = None,
        sent_headers: Mapping[str, str] | None = None,
        fields: FrontFields = CHAT_FIELDS,
    ) -> tuple[Signals, Decision]:
        """Run signals -> score -> policy for one request. Raises 404 for an unknown model.

        ``metadata_keys``: the ``metadata`` keys the caller may steer the policy with (None: all);
        the signals keep only those the policy reads. ``sent``: a front's native request, read
        for personal data too (see :func:`~router.signals.extract_signals`). ``scorer``: the
        one that scores it (default: :meth:`scorer_for` the serving policy). ``fields``: the
        names of the front it came in on, which its refusals and explanations use.

        ``sent_headers``: every ``x-tiergate-*`` header the caller sent. A caller may always
        make its request more private: when the policy, reading every header and ``metadata``
        field sent, would keep the request local_only, it does, though the caller may not
        steer the policy otherwise (a plain key's ``x-tiergate-private: true`` stays local).
        """
        policy = self.policy
        refuse_unknown_model(policy, str(body.get("model", "auto")), tenant)
        refuse_beyond_every_window(body, policy, fields, sent)
        with self.telemetry.decide_span() as span:
            read = policy.metadata_fields
            signals = extract_signals(
                body,
                self.scorer_for(policy) if scorer is None else scorer,
                tenant=tenant,
                headers=headers,
                metadata_keys=read if metadata_keys is None else read & set(metadata_keys),
                sent=sent,
                fields=fields,
            )
            decide = functools.partial(
                evaluate,
                policy,
                thresholds=self.thresholds,
                spend_today_usd=self.outcomes.spend_today(tenant),
                held_usd=self.outcomes.held_today(tenant),
                closed_available=self.closed_available(),
            )
            decision = decide(signals)
            wider = _as_sent(signals, body, read, sent_headers)
            # A spent budget makes a decision local_only too, but not private: the rule the
            # caller asked for still decides (its store_prompts, say).
            if not decision.private and wider is not None:
                private = decide(wider)
                if private.private:
                    decision = private
            span.decided(decision, signals.alias)
        return signals, decision

    async def decide_async(
        self,
        body: Mapping[str, Any],
        *,
        tenant: str,
        headers: Mapping[str, str],
        metadata_keys: Collection[str] | None = None,
        sent: Mapping[str, Any] | None = None,
        sent_headers: Mapping[str, str] | None = None,
        fields: FrontFields = CHAT_FIELDS,
    ) -> tuple[Signals, Decision, str]:
        """:meth:`decide`, moved off the event loop when the request is large; also returns the
        version of the scorer that scored it (:meth:`scorer_for`), for headers and the record.

        Scoring a short prompt costs less than a thread hop; a long one (or a large request,
        all of which is read for personal data), or any prompt read by a scorer with an encoder
        (``costly``), would stall every other request on the loop.
        """
        policy = self.policy
        if self._companion_unloaded(policy):
            scorer = await asyncio.to_thread(self.scorer_for, policy)
        else:
            scorer = self.scorer_for(policy)
        decide = functools.partial(
            self.decide,
            body,
            tenant=tenant,
            headers=headers,
            metadata_keys=metadata_keys,
            sent=sent,
            scorer=scorer,
            sent_headers=sent_headers,
            fields=fields,
        )
        costly = getattr(scorer, "costly", False)
        if costly:
            if self._scoring is None:
                self._scoring = ThreadPoolExecutor(SCORING_THREADS, "tiergate-score")
            loop = asyncio.get_running_loop()
            # In this request's context (its trace span, as asyncio.to_thread would carry), so
            # the decide span is the request's child, not a trace of its own.
            in_context = functools.partial(contextvars.copy_context().run, decide)
            signals, decision = await loop.run_in_executor(self._scoring, in_context)
        elif _is_large(body) or (sent is not None and _is_large(sent)):
            signals, decision = await asyncio.to_thread(decide)
        else:
            signals, decision = decide()
        return signals, decision, scorer.version

    # -- reserving -------------------------------------------------------------------------

    def call_tokens(
        self, ctx: RequestContext, default_completion: int, model: ModelSpec | None = None
    ) -> tuple[int, int]:
        """(prompt, completion) tokens one model call for ``ctx`` may use: the most its prompt
        can be (``Signals.prompt_bound``: the estimate let text no tokenizer merges be held at
        a third of what it is billed), and ``max_tokens`` or else ``default_completion`` for
        each of the ``n`` choices.

        Priced for a budget, a call to the closed ``model`` without ``max_tokens`` may write as
        much as that model can (``closed.output_limit``: its policy ``max_output_tokens``, else
        litellm's map's limit, else what an Anthropic model is sent), else what its context
        window leaves, where that exceeds the default. Holding less let concurrent requests that
        wrote long answers spend several times past the budget.

        A predicted output's tokens count as completion, not prompt: the part of it the answer
        does not use is billed as completion tokens, at the output price.
        """
        assert ctx.signals is not None
        prompt = ctx.signals.prompt_held  # the most it can be, not the estimate
        completion = ctx.signals.max_tokens or default_completion
        if not ctx.signals.max_tokens and model is not None and model.tier == "closed":
            limit = closed.output_limit(model)
            if limit is None and model.context_window is not None:
                limit = model.context_window - ctx.signals.prompt_tokens
            completion = max(completion, limit or 0)
        predicted = min(ctx.signals.prediction_tokens, prompt)
        return prompt - predicted, (completion + predicted) * ctx.choices

    def reserved_tokens(self, ctx: RequestContext, default_completion: int) -> int:
        """Tokens to reserve for ``ctx`` as it is admitted (:meth:`_admitted`): what its first
        call may use, on the decided model, and for a cascade what its escalation may use too. A
        call to another model (a fallback, a spill, an escalation's fallback) tops the
        reservation up (:meth:`_top_up`): reserving what the most any model it may reach can
        write (128,000 for gpt-5) let one local request fill a tenant's minute."""
        assert ctx.decision is not None
        call = functools.partial(self.call_tokens, ctx, default_completion)
        return self._admitted(ctx.decision, lambda model: sum(call(model)))

    def _admitted(self, decision: Decision, need: Callable[[ModelSpec], _N]) -> _N:
        """``need`` (tokens, cost) of the calls a request is admitted for: its first call, on
        the decided model, and for a cascade its escalation, on the closed model it escalates
        to. Escalating is a cascade's plan, not a failure: reserved and held only as it
        escalated, unchecked, concurrent cascades under a small budget or a tight token limit
        all escalated past it. The escalation's fallbacks are failures, topped up as they are
        called, as any request's: reserved up front, the most of every closed model (64,000
        for claude-sonnet-4-5 behind gpt-4o's 16,384) filled a minute for one cascade."""
        first = need(self.policy.models[decision.model])
        if decision.cascade is None:
            return first
        return first + need(self.policy.models[decision.cascade.escalate_to])

    def _top_up(self, ctx: RequestContext, model: ModelSpec) -> None:
        """``model`` is called for ``ctx``: grow its token reservation to what the call may use,
        plus a discarded cascade answer's tokens (charged too), with no limit check. A
        cascade's escalation, reserved at admission, grows it only where the answer it
        discarded used more than estimated, or where it falls back to a model that may use
        more."""
        hold = ctx.hold
        if hold is None or hold.limiter is None:  # no token limit
            return
        need = sum(self.call_tokens(ctx, self.reserve_tokens, model))
        if ctx.cascade_usage is not None:
            need += ctx.cascade_usage.prompt_tokens + ctx.cascade_usage.completion_tokens
        hold.top_up(need - hold.tokens)

    def _reserved_usd(self, ctx: RequestContext, default_completion: int) -> float:
        """USD to hold for ``ctx`` as it is admitted (:meth:`_admitted`): what its first call
        may cost, on the decided model, and for a cascade what its escalation may cost, checked
        here. A fallback or spill to a dearer model tops the hold up
        (:meth:`_top_up_spend`): holding the dearest model it may reach ($1.28 for a local
        request that may fall back to gpt-5) let two such requests refuse a $2 tenant."""
        assert ctx.decision is not None
        return self._admitted(
            ctx.decision, functools.partial(self._call_usd, ctx, default_completion)
        )

    def _call_usd(self, ctx: RequestContext, default_completion: int, model: ModelSpec) -> float:
        """What one call to ``model`` for ``ctx`` may cost (:meth:`call_tokens`).

        A prompt that marks ``cache_control`` may be billed as written to the provider's
        prompt cache (Anthropic: 1.25 times the input price, twice for ``ttl: 1h``), so it is
        held at that price where it is dearer: held at input, such requests spent past the
        budget by more than one reservation (``ctx.cache_ttl``, read as it is admitted)."""
        ttl = ctx.cache_ttl
        prompt, completion = self.call_tokens(ctx, default_completion, model)
        held = self.costs.call_cost(model, Usage(prompt, completion))
        if ttl is None:
            return held
        hour = prompt if ttl == "1h" else 0
        written = Usage(prompt, completion, cache_write_tokens=prompt, cache_write_1h_tokens=hour)
        return max(held, self.costs.call_cost(model, written))

    async def _top_up_spend(self, ctx: RequestContext, model: ModelSpec) -> None:
        """``model`` is called for ``ctx``: grow its budget hold to what the call may cost, plus
        a discarded cascade answer's cost (charged too), with no budget check: a request under
        way is not refused. The record settles the hold as before."""
        held, decision = ctx.held_usd, ctx.decision
        if held is None or decision is None:  # no budget, or nothing held
            return
        need = self._call_usd(ctx, self.reserve_tokens, model)
        if ctx.cascade_usage is not None:
            local = self.policy.models[decision.model]
            need += self.costs.call_cost(local, ctx.cascade_usage)
        if need <= held:
            return
        ctx.held_usd = need
        await reserve_in_thread(self.outcomes, ctx.tenant, ctx.request_id, need, None)

    async def hold_spend(self, ctx: RequestContext, default_completion: int) -> None:
        """Reserve the request's estimated cost against its tenant's daily budget.

        The check and the reservation are one atomic step in the outcome store (a Lua script
        with Redis), so concurrent requests overshoot a budget by at most one reservation (plus
        the top-ups of those that go on to a dearer model, :meth:`_top_up_spend`). If
        the budget ran out after this request was decided, it is decided again as over budget
        (served locally, or refused, as ``over_budget`` says). The record settles the hold.
        """
        decision = ctx.decision
        assert decision is not None and ctx.signals is not None
        if decision.budget_usd is None or decision.rejected or decision.unsatisfiable:
            return
        usd = self._reserved_usd(ctx, default_completion)
        held = await reserve_in_thread(
            self.outcomes, ctx.tenant, ctx.request_id, usd, decision.budget_usd
        )
        if held:
            ctx.held_usd = usd
            return
        if decision.local_only:
            # Over budget or not, it stays local: decided again from ctx.signals, which lack
            # the headers a caller may always make its request private with, it could lose the
            # rule it asked for (private, Gateway.decide). Its hold needs no budget check.
            await reserve_in_thread(self.outcomes, ctx.tenant, ctx.request_id, usd, None)
            ctx.held_usd = usd
            return
        spend = self.outcomes.spend_today(ctx.tenant)
        ctx.decision = evaluate(
            self.policy,
            ctx.signals,
            thresholds=self.thresholds,
            spend_today_usd=spend,
            held_usd=self.outcomes.held_today(ctx.tenant),
            closed_available=self.closed_available(),
            hold_refused=self.outcomes.hold_refusal(ctx.tenant, decision.budget_usd),
        )
        ctx.hold_outage_s = self.outcomes.hold_retry_s(ctx.tenant, decision.budget_usd)
        if not ctx.decision.rejected and not ctx.decision.unsatisfiable:
            usd = self._reserved_usd(ctx, default_completion)
            await reserve_in_thread(self.outcomes, ctx.tenant, ctx.request_id, usd, None)
            ctx.held_usd = usd

    def chain(self, decision: Decision) -> list[tuple[ModelSpec, str | None]]:
        """The models to try in order, each with the fallback label it would be recorded under."""
        models = self.policy.models
        primary = models[decision.model]
        chain: list[tuple[ModelSpec, str | None]] = [(primary, None)]
        for name in decision.fallbacks:
            spec = models[name]
            keyless = decision.no_closed_local and spec.tier == "local"
            chain.append((spec, NO_CLOSED_FALLBACK if keyless else f"{primary.tier}->{spec.tier}"))
        return chain

    def spill_chain(
        self, decision: Decision, signals: Signals | None
    ) -> list[tuple[ModelSpec, str | None]]:
        """Where a request goes when the local queue is full and the policy says spill: the
        closed models that can take it (``signals``, the hard constraints every chain is
        filtered by: a prompt over a model's window was sent to it and refused); never for a
        ``local_only`` decision, nor for one that pins the local model (a pinned model is
        never swapped, docs/policy.md)."""
        policy = self.policy
        if decision.local_only or decision.rule == "pinned" or policy.queue_full != "spill":
            return []
        closed_models = [policy.models[name] for name in policy.closed_models]
        return [
            (spec, "local-full->closed")
            for spec in closed_models
            if signals is None or why_unfit(spec, signals) is None
        ]

    # -- serving ---------------------------------------------------------------------------

    @staticmethod
    def fitted(
        model: ModelSpec,
        body: dict[str, Any],
        optional: frozenset[str],
        native_only: frozenset[str] = frozenset(),
    ) -> dict[str, Any]:
        """``body`` for ``model``: without the fields a front made (``Call.optional``) that the
        model cannot take, such as an Anthropic request's ``top_k`` for an OpenAI model, which
        OpenAI would refuse with a 400 the client, who did not choose the model, cannot avoid,
        or an assistant turn's ``thinking_blocks`` (``messages.thinking_blocks``) for any model
        but a Claude (``closed.claude``).

        A request with fields only its front's own provider serves (``Call.native_only``) is
        refused (400) for a model of another provider. This is the last guard: the policy's fit
        check (``policy.why_unfit``, ``Signals.anthropic_tools``) reads them in the request as
        the client sent it, and chooses no such model; this reads what the model would be
        sent after litellm's translation, so a translation that changed still cannot hand
        them to a model that may drop them without a word (an OpenAI-compatible server). A
        field sent as null asks for nothing, as the fit check reads it.

        A sampling field the model refuses (``ModelSpec.refused_sampling``) sent asking for
        nothing, null or at its default (``top_p: 1``, ``presence_penalty: 0``, ``logprobs:
        false``, as clients that send every field send them), is left out too: the fit check
        lets such a request reach the model (``signals.sampling``), which refuses the field
        whatever its value (a 400; through litellm its UnsupportedParamsError) and samples so
        without it.
        """
        idle = _idle_sampling(model, body)
        if idle:
            body = {k: v for k, v in body.items() if k not in idle}
        kept = {k for k in native_only.intersection(body) if body[k] is not None}
        kept |= native_only.intersection(_tool_types(body))
        if kept and (
            model.tier != "closed" or closed.provider_of(model.litellm_model or "") != "anthropic"
        ):
            refused = sorted(kept)  # param: the client's field, as the policy's refusal names it
            names_kept = ", ".join(refused).replace(PROVIDER_TOOLS, _provider_tools(body))
            raise BadRequestError(
                f"{model.name} cannot serve "
                f"{names_kept.replace(WEB_SEARCH, 'the web_search tool')}: "
                "only an Anthropic model does",
                param="tools" if refused[0] in (PROVIDER_TOOLS, WEB_SEARCH) else refused[0],
            )
        names = optional.intersection(_field_names(body)) if optional else None
        if not names:
            return body
        if model.tier == "closed":
            dropped = closed.cannot_take(model, names)
        else:
            dropped = local.cannot_take(names)
        if not dropped:
            return body
        log.debug("%s goes without %s", model.name, ", ".join(sorted(dropped)))
        fitted = {k: v for k, v in body.items() if k not in dropped}
        fields = {n.removeprefix(MESSAGE_FIELD) for n in dropped if n.startswith(MESSAGE_FIELD)}
        if fields:
            fitted["messages"] = [
                {k: v for k, v in message.items() if k not in fields}
                for message in body["messages"]
            ]
        return fitted

    def sent(self, ctx: RequestContext, model: ModelSpec, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` as ``model`` is sent it (served, or shadowed by router.learning):
        :meth:`fitted`, and for a request that sets no
        ``max_tokens``, the limit the model is sent (a Claude model's, the policy's
        ``max_output_tokens``), at most what its context window leaves after the prompt (the
        fit check counts the prompt and the least answer then, policy.MIN_ANSWER_TOKENS)."""
        fitted = self.fitted(model, body, ctx.optional, ctx.native_only)
        if closed.sets_output_limit(fitted):
            return fitted
        filled = self._filled_limit(ctx, model)
        return fitted if filled is None else {**fitted, closed.output_field(model, fitted): filled}

    def _native_sent(
        self, ctx: RequestContext, model: ModelSpec, native: NativeRequest
    ) -> NativeRequest:
        """``native`` as ``model`` is sent it: a Response that sets no ``max_output_tokens`` gets
        the limit :meth:`sent` fills, cut to the window alike, and goes without the sampling
        fields the model refuses that ask for nothing (``top_p: 1``: OpenAI's reasoning
        models, as :meth:`fitted`). A Messages request carries its own ``max_tokens``
        (Anthropic's API, and the front, require one) and goes to a Claude, which refuses none."""
        if native.api != "responses":
            return native
        body = native.body
        idle = _idle_sampling(model, body)
        if idle:
            body = {k: v for k, v in body.items() if k not in idle}
        if body.get("max_output_tokens") is None:
            filled = self._filled_limit(ctx, model)
            if filled is not None:
                body = {**body, "max_output_tokens": filled}
        return native if body is native.body else replace(native, body=body)

    def _filled_limit(self, ctx: RequestContext, model: ModelSpec) -> int | None:
        # The output limit a request that sets none is sent (closed.default_max_tokens), at
        # most what the context window leaves after the prompt; None where the model has no
        # window or there is no prompt estimate (the backend fills its own, uncut) or none is sent.
        window = model.context_window
        if model.tier != "closed" or window is None or ctx.signals is None:
            return None
        return closed.default_max_tokens(model, window - ctx.signals.prompt_tokens)

    def _native_for(self, model: ModelSpec, native: NativeRequest | None) -> NativeCaller | None:
        """The native backend when ``model`` speaks the front's own API, else None."""
        if native is None or self.native is None or not speaks(model, native.api):
            return None
        return self.native

    async def complete(
        self, ctx: RequestContext, body: dict[str, Any], native: NativeRequest | None = None
    ) -> Completion:
        """Serve a non-streaming request along the fallback chain; a model that speaks the
        front's own API gets ``native``, the client's request as sent. A cascade first asks
        the local model and keeps its answer, or escalates (:meth:`_cascade_complete`)."""

        async def attempt(backend: Backend, model: ModelSpec) -> Completion:
            ctx.usage = Usage()  # filled as the answer is made, so a cancelled call tells too
            passing = self._native_for(model, native)
            if passing is not None and native is not None:
                result = await passing.complete(
                    model, self._native_sent(ctx, model, native), ctx.usage
                )
            else:
                result = await backend.complete(model, self.sent(ctx, model, body), ctx.usage)
            ctx.usage = result.usage
            return result

        return await self._local_first(ctx, attempt, lambda: self._cascade_complete(ctx, body))

    async def stream(
        self, ctx: RequestContext, body: dict[str, Any], native: NativeRequest | None = None
    ) -> _Metered:
        """Open a stream along the fallback chain (``native`` as for :meth:`complete`).

        Fallback is possible only until the first chunk that carries something (a token, a
        tool call, the end) arrives; this coroutine returns once a backend has produced it (so
        headers can name who answered), and the returned iterator yields the chunks before it,
        then it. Opening chunks that carry nothing of the answer (OpenAI's role-only chunk, with
        the prompt's usage where a server sends it early; what Anthropic's ``message_start``
        becomes) are held back until then, so that a stream cut
        right after its opening falls back like any failed call, rather than ending in an
        error event after the client has been told a model answers.
        """

        async def attempt(backend: Backend, model: ModelSpec) -> _Metered:
            usage = Usage()
            passing = self._native_for(model, native)
            if passing is not None and native is not None:
                source = passing.stream(model, self._native_sent(ctx, model, native), usage)
            else:
                source = backend.stream(model, self.sent(ctx, model, body), usage)
            held: list[dict[str, Any]] = []
            with contextlib.suppress(StopAsyncIteration):
                while not held or _opening(held[-1]):
                    held.append(await anext(source))
            ctx.usage = usage
            return _Metered(ctx, held, source)

        return await self._local_first(ctx, attempt, lambda: self._cascade_stream(ctx, body))

    # -- the cascade: the local model answers first ------------------------------------------

    async def _local_first(
        self,
        ctx: RequestContext,
        attempt: Callable[[Backend, ModelSpec], Awaitable[_T]],
        cascade: Callable[[], Awaitable[tuple[_T | None, _T | None]]],
    ) -> _T:
        """Along the chain; for a cascade, the local answer it keeps, else the closed models,
        and if every one of those fails, the whole local answer it discarded (if it has one):
        a doubtful answer serves the client better than an error."""
        assert ctx.decision is not None
        if ctx.decision.cascade is None:
            return await self._along_chain(ctx, attempt)
        kept, discarded = await cascade()
        if kept is not None:
            return kept
        try:
            return await self._along_chain(ctx, attempt, self._escalation(ctx.decision))
        except TiergateError as exc:
            self._escalation_failed(ctx, exc, serving_local=discarded is not None)
            if discarded is None:
                raise
            return discarded

    def _escalation_failed(
        self, ctx: RequestContext, exc: TiergateError, *, serving_local: bool
    ) -> None:
        # Recorded (and told in the headers) as failed, not as answered by the closed model;
        # where the discarded local answer is served after all, it is charged as the answer.
        assert ctx.decision is not None and ctx.cascade is not None
        if serving_local:
            ctx.served = Served(self.policy.models[ctx.decision.model], "closed->local")
            ctx.usage, ctx.cascade_usage = ctx.cascade_usage or Usage(), None
        ctx.cascade = {
            **ctx.cascade,
            "decision": ESCALATION_FAILED,
            "escalation_error": _told(ctx, exc),
        }
        log.warning("cascade: escalation failed for %s: %s", ctx.request_id, _told(ctx, exc))

    def _planned(self, decision: Decision) -> list[tuple[ModelSpec, str | None]]:
        """The models serving would try: the chain, or a cascade's local model and then the
        closed models it escalates to."""
        if decision.cascade is None:
            return self.chain(decision)
        return [self.chain(decision)[0], *self._escalation(decision)]

    def _escalation(self, decision: Decision) -> list[tuple[ModelSpec, str | None]]:
        """Where an escalated cascade goes: its closed model, then the other closed models."""
        assert decision.cascade is not None
        names = [decision.cascade.escalate_to]
        names += [n for n in decision.fallbacks if n not in names]
        models = [self.policy.models[n] for n in names]
        return [(m, "cascade->closed") for m in models if m.tier == "closed"]

    def _cascade_judge(
        self,
        ctx: RequestContext,
        body: Mapping[str, Any],
        logprobs: list[dict[str, Any]],
        finish: str | None,
    ) -> Judgement:
        decision, signals = ctx.decision, ctx.signals
        assert decision is not None and decision.cascade is not None and signals is not None
        plan = decision.cascade
        if self.cascade is None:
            return Judgement("escalated", 0.0, plan.threshold, "no_confidence_model")
        stats = answer_stats(logprobs, finish, limit=plan.hold_back_tokens)
        chars = len(scoring_text(list(body.get("messages") or [])))
        confidence = self.cascade.confidence(stats, signals.score, chars)
        return judge(confidence, plan.threshold, may_escalate=not decision.local_only)

    def _cascade_note(
        self, ctx: RequestContext, judgement: Judgement, usage: Usage, hold_back_ms: float | None
    ) -> None:
        # The cascade's local part, as the record and the headers tell it. ``usage`` is the
        # local call's own, still counting: a kept stream goes on generating after the
        # judgement, and a closed one ends on the worker thread; the record reads it at the end.
        ctx.cascade = {
            **judgement.as_record(),
            "hold_back_ms": None if hold_back_ms is None else round(hold_back_ms, 1),
        }
        if judgement.decision == "escalated":
            ctx.cascade_usage, ctx.usage = usage, Usage()

    def _cascade_local(
        self, ctx: RequestContext, body: dict[str, Any]
    ) -> tuple[Backend, ModelSpec, dict[str, Any]] | None:
        """The local model, its backend and ``body`` as it is sent (:meth:`fitted`), or None:
        escalate. Its probe (:meth:`_calling`) is for the caller to take, right before the
        ``try`` that releases it: a request it cannot take (:meth:`fitted`) never takes it."""
        assert ctx.decision is not None
        model = self.policy.models[ctx.decision.model]
        backend = self.backend(model)
        cooling = self._passed_over(model, self._escalation(ctx.decision))
        if backend is None or self.unavailable_reason(model) or cooling:
            plan = ctx.decision.cascade
            assert plan is not None
            unavailable = Judgement("escalated", 0.0, plan.threshold, "local_unavailable")
            self._cascade_note(ctx, unavailable, Usage(), None)
            return None
        try:
            sent = _with_logprobs(self.fitted(model, body, ctx.optional, ctx.native_only))
        except BadRequestError as exc:  # a field only the front's own provider serves
            # The fit check reads each such field first, so none reaches here now; kept for a
            # translation that makes one the check did not read.
            self._cascade_note(ctx, _failed(ctx), Usage(), None)
            self._cascade_failed(ctx, model, exc)
            return None
        return backend, model, sent

    async def _cascade_complete(
        self, ctx: RequestContext, body: dict[str, Any]
    ) -> tuple[Completion | None, Completion | None]:
        """(the local answer if the cascade keeps it, else None: escalate; the answer it
        discarded, served if the escalation fails). A local failure escalates too."""
        local = self._cascade_local(ctx, body)
        if local is None:
            return None, None
        backend, model, sent = local
        usage = Usage()
        # A client that leaves meanwhile is charged for the local work done so far.
        ctx.served, ctx.usage = Served(model), usage
        self._calling(ctx, model)
        try:
            result = await backend.complete(model, sent, usage)
            usage = result.usage  # an answer it cannot read is charged, too
            choice = (result.body.get("choices") or [{}])[0]
            logprobs = read_logprobs(choice)
        except TiergateError as exc:
            ctx.served = None
            self._cascade_note(ctx, _failed(ctx), usage, None)
            self._cascade_failed(ctx, model, exc)
            return None, None
        except BaseException:  # cancelled (a client that left): it says nothing of the model
            self.cooldowns.released(model.name, ctx.probe)
            raise
        self.cooldowns.succeeded(model.name, ctx.since)
        judgement = self._cascade_judge(ctx, body, logprobs, choice.get("finish_reason"))
        ctx.usage = result.usage
        self._cascade_note(ctx, judgement, result.usage, None)
        for c in result.body.get("choices") or []:
            _client_logprobs(c, body)
        if judgement.decision == "escalated":
            ctx.served = None
            return None, result
        return result, None

    async def _cascade_stream(
        self, ctx: RequestContext, body: dict[str, Any]
    ) -> tuple[_Metered | None, _Metered | None]:
        """Hold back the local stream's first tokens, judge them, then stream on (the held
        chunks first) or close the local stream and escalate: (the kept stream or None; the
        held chunks when they are the whole answer, served if the escalation fails; a part
        of an answer is never served as if it were all of it)."""
        local = self._cascade_local(ctx, body)
        if local is None:
            return None, None
        backend, model, sent = local
        assert ctx.decision is not None and ctx.decision.cascade is not None
        usage = Usage()
        hold = HoldBack(ctx.decision.cascade.hold_back_tokens)
        started = time.perf_counter()
        ctx.served, ctx.usage = Served(model), usage  # a client that leaves is charged, too
        source = backend.stream(model, sent, usage)
        ended = False
        self._calling(ctx, model)
        try:
            while not hold.ready:
                try:
                    hold.add(await anext(source))
                except StopAsyncIteration:
                    ended = True
                    break
        except TiergateError as exc:
            await _close(source, ctx.request_id)
            ctx.served = None
            self._cascade_note(ctx, _failed(ctx), _held_usage(usage, hold, ctx), None)
            self._cascade_failed(ctx, model, exc)
            return None, None
        except BaseException:  # cancelled in the hold-back (a client that left), as above
            # A cancellation closed the local stream where it waited; a chunk the hold-back
            # cannot read left it open, generating in its slot: closed here. A model that counts
            # its tokens as it stops (the GGUF, on its worker thread) has not yet: charge those
            # held.
            await _close(source, ctx.request_id)
            _held_usage(usage, hold, ctx)
            self.cooldowns.released(model.name, ctx.probe)
            raise
        # The held-back tokens are when a cascade's local stream answers (router.cooldown): a
        # probe it held is freed then, not at the first of them (a check per held chunk). A
        # kept stream succeeds once it ended whole (_stream_ended), as a chain's does: a cut
        # after them is a failure in a row; an escalated one ends here, closed by the cascade.
        self._answered(ctx, model)
        held_ms = (time.perf_counter() - started) * 1000.0
        try:
            judgement = self._cascade_judge(ctx, body, hold.logprobs, hold.finish_reason)
        except BaseException:  # a judgement that fails: the local model stops all the same
            await _close(source, ctx.request_id)
            raise
        if judgement.decision == "escalated":
            self.cooldowns.succeeded(model.name, ctx.since)
            await _close(source, ctx.request_id)  # the local model stops generating
            ctx.served = None
            self._cascade_note(ctx, judgement, _held_usage(usage, hold, ctx), held_ms)
            whole = ended or hold.finish_reason is not None
            return None, _Metered(ctx, hold.chunks, None, body) if whole else None
        self._cascade_note(ctx, judgement, usage, held_ms)
        return _Metered(ctx, hold.chunks, source, body), None

    def _cascade_failed(self, ctx: RequestContext, model: ModelSpec, exc: TiergateError) -> None:
        # The cascade's local model failed and the request escalates; a failure of the model
        # (not a full queue) counts, and cools an external server, as on a chain. The record
        # says why (``local_error``), redacted as its log line is (:func:`_told`).
        if ctx.cascade is not None:
            ctx.cascade["local_error"] = _told(ctx, exc)
        if isinstance(exc, BackendError):
            self._failed(ctx, model, exc)
        else:
            log.warning("cascade: local model failed for %s: %s", ctx.request_id, _told(ctx, exc))
        self.cooldowns.released(model.name, ctx.probe)

    async def _along_chain(
        self,
        ctx: RequestContext,
        attempt: Callable[[Backend, ModelSpec], Awaitable[_T]],
        queue: list[tuple[ModelSpec, str | None]] | None = None,
    ) -> _T:
        """Try the decision's models (or ``queue``) in order until one answers; spill on a full
        local queue."""
        assert ctx.decision is not None
        errors: list[str] = []
        queue = self.chain(ctx.decision) if queue is None else queue
        i = 0
        last: TiergateError | None = None
        failure: BackendError | None = None  # the last model that failed (not refused)
        tried = 0  # models that were called
        cooled: list[tuple[ModelSpec, str | None]] = []  # passed over while cooling down
        while _goes_on(queue, i, cooled, failed=failure is not None):
            model, fallback = queue[i]
            i += 1
            backend = self.backend(model)
            reason = self._skipped(model, fallback, queue[i:], cooled)
            if backend is None or reason:
                errors.append(f"{model.name}: {reason}")
                continue
            tried += 1
            try:
                result = await self._attempt_on(ctx, attempt, backend, model, fallback)
            except LocalOverloadedError as exc:
                last = exc
                spill = self.spill_chain(ctx.decision, ctx.signals)
                if not spill:
                    raise
                # The spill goes first; a fallback it already holds is not tried twice.
                spilled = {spec.name for spec, _ in spill}
                queue[i:] = [*spill, *(m for m in queue[i:] if m[0].name not in spilled)]
                errors.append(f"{model.name}: queue full")
                continue
            except BadRequestError as exc:
                # The tier cannot honour the request (tools, images); try the next, else 400.
                last = exc
                errors.append(f"{model.name}: {exc.message}")
                continue
            except BackendError as exc:
                last = exc
                # The failure answered is the last, unless it is one a retry cannot fix (a
                # provider refusing its key) after one a retry may (a 500): that one stands.
                if failure is None or failure.should_retry is not None or exc.should_retry is None:
                    failure = exc
                errors.append(f"{model.name}: {exc.message}")
                self._failed(ctx, model, exc)
                if not exc.retryable:
                    wider = (
                        _wider(model, queue[i:]) if exc.code == "context_length_exceeded" else []
                    )
                    if not wider:
                        raise
                    queue[i:] = wider
                continue
            ctx.served = Served(model, fallback)
            self._answered(ctx, model)
            return result
        raise self._exhausted(ctx, errors, last, failure, tried)

    async def _attempt_on(
        self,
        ctx: RequestContext,
        attempt: Callable[[Backend, ModelSpec], Awaitable[_T]],
        backend: Backend,
        model: ModelSpec,
        fallback: str | None,
    ) -> _T:
        """Call ``model``, its token reservation and budget hold topped up to what it may use
        (:meth:`_top_up`, :meth:`_top_up_spend`):
        the probe after its cooldown lapsed, if this call is (:meth:`_calling`);
        one that ends saying nothing of the model (not a failure that counts: the request's
        fault, a full queue, a client that left) lets the next call probe. None once the client
        left a closed call (``ctx.left``): :class:`ClientDisconnected`."""
        if ctx.left:  # a closed call its client left has failed: nobody to answer now
            raise ClientDisconnected("the client closed the connection")
        self._top_up(ctx, model)
        await self._top_up_spend(ctx, model)
        # ``served`` is set while the model works, so a request cancelled meanwhile (its client
        # left) is recorded, and charged, against the model that was working on it.
        ctx.served = Served(model, fallback)
        self._calling(ctx, model)
        try:
            return await attempt(backend, model)
        except BaseException as exc:
            if isinstance(exc, TiergateError):
                ctx.served = None
            self.cooldowns.released(model.name, ctx.probe)
            raise

    def _calling(self, ctx: RequestContext, model: ModelSpec) -> None:
        """``model`` is called now: after its cooldown lapsed the call may be the one probe
        (router.cooldown), bound by the call's own timeout (``ctx.probe``); the call's stamp,
        which dates its failure or answer against the model's changes, is ``ctx.since``."""
        if not self._cools(model):
            ctx.probe = 0.0
            return
        timeout = model.timeout_s or self.call_timeouts.get(model.tier, self.cooldowns.cooldown_s)
        ctx.probe = self.cooldowns.calling(model.name, timeout)
        ctx.since = self.cooldowns.changes

    def _answered(self, ctx: RequestContext, model: ModelSpec) -> None:
        """``model`` answered a call, for its cooldown (router.cooldown): a whole answer is a
        success; a stream has its first token, which frees a probe it holds for the other
        calls, and it succeeds once it ended whole (:meth:`_stream_ended`)."""
        if not ctx.stream:
            self.cooldowns.succeeded(model.name, ctx.since)
            return
        self.cooldowns.answering(model.name, ctx.probe)
        ctx.probe = 0.0

    def _cools(self, model: ModelSpec) -> bool:
        """Whether ``model`` cools down after failing (router.cooldown): a closed model, or the
        local one when an external llama.cpp server serves it, which hangs and dies as a
        provider does. Not the GGUF in process: it cannot be unreachable, its timeout bounds one
        long generation rather than a server that stopped answering, and a full queue spills."""
        return model.tier == "closed" or isinstance(self.local, ExternalLlamaBackend)

    def cooling_names(self) -> list[str]:
        """The policy's models that cool down when they fail (:meth:`_cools`): those whose
        shared cooldowns this replica reads (router.cooldown)."""
        return [name for name, spec in self.policy.models.items() if self._cools(spec)]

    def _cooling(self, model: ModelSpec) -> str | None:
        """Why ``model`` is passed over now (router.cooldown), or None."""
        if not self._cools(model):
            return None
        left = self.cooldowns.left(model.name)
        if not left:
            return None
        if self.cooldowns.probing(model.name):
            return f"probed by another request after cooling down (for {left:.0f} s at most)"
        return f"cooling down for {left:.0f} s more after failing"

    def _passed_over(
        self, model: ModelSpec, rest: list[tuple[ModelSpec, str | None]]
    ) -> str | None:
        """Why ``model`` is passed over for the rest of its chain: it is cooling down and a model
        after it can be called. None: call it (a cooldown alone never fails a request)."""
        cooling = self._cooling(model)
        return cooling if cooling and any(self._callable(m) for m, _ in rest) else None

    def _skipped(
        self,
        model: ModelSpec,
        fallback: str | None,
        rest: list[tuple[ModelSpec, str | None]],
        cooled: list[tuple[ModelSpec, str | None]],
    ) -> str | None:
        """Why ``model`` is not called now, or None; one passed over only because it is cooling
        down joins ``cooled`` (see :func:`_goes_on`)."""
        unavailable = self.unavailable_reason(model)
        if unavailable:
            return unavailable
        cooling = self._passed_over(model, rest)
        if cooling:
            cooled.append((model, fallback))
        return cooling

    def _callable(self, model: ModelSpec) -> bool:
        """Whether ``model`` could be called now: served, available and not cooling."""
        return (
            self.backend(model) is not None
            and self.unavailable_reason(model) is None
            and self._cooling(model) is None
        )

    def _failed(self, ctx: RequestContext, model: ModelSpec, exc: BackendError) -> None:
        """Log a model's failed call (:func:`_told`); count it, and the cooldown it starts
        (:meth:`_cools`), unless it is the request's fault (a 400, not the provider's)."""
        log.warning(
            "%s failed for %s: %s",
            model.name,
            ctx.request_id,
            _told(ctx, exc),
            extra={
                "request_id": ctx.request_id,
                "tier": model.tier,
                "model": model.name,
                "error_type": exc.code,
                "upstream_status": exc.upstream_status,
            },
        )
        if not exc.retryable:
            return
        self.telemetry.on_attempt_failed(model, exc)
        self._cool(ctx, model, exc)

    def _cool(self, ctx: RequestContext, model: ModelSpec, exc: BackendError) -> None:
        """Count ``model``'s failed call toward its cooldown (:meth:`_cools`), and log and count
        the cooldown it starts; a call made before the model's last change does not count
        (router.cooldown)."""
        if not exc.retryable or not self._cools(model):
            return
        seconds = self.cooldowns.failed(model.name, exc, ctx.since)
        if seconds:
            self.telemetry.on_cooldown(model, exc)
            log.warning(
                "%s cools down for %.0f s (%s): requests go to the next model of their chain",
                model.name,
                seconds,
                exc.code,
                extra={"model": model.name, "error_type": exc.code},
            )

    def _exhausted(
        self,
        ctx: RequestContext,
        errors: list[str],
        last: TiergateError | None,
        failure: BackendError | None = None,
        tried: int = 0,
    ) -> TiergateError:
        """The one error for a request no model could answer.

        A model that was tried and failed gives its own status (502; 504 for a timeout; 429
        when it said "later"; 503 when it said it is overloaded), as the README documents:
        where models failed in different ways, the last one's (a 500 then a 503 is a 503
        with that provider's Retry-After, a 503 then a 500 a 502). When no model could even be tried
        (no provider key, local model not loaded or off, or a tier that cannot honour the
        request) the answer is 503 with ``x-should-retry: false``: a retry cannot fix it. A
        model that failed outranks one that refused later in the chain (a transient 502 stays
        a 502), and a 400 stands when it came from the only model that was called.
        """
        if isinstance(last, BadRequestError) and failure is None and tried == 1:
            return last
        if isinstance(last, LocalOverloadedError | UpstreamRateLimitedError) and len(errors) == 1:
            return last  # one model tried and it said "later": 429 with its Retry-After
        detail = "; ".join(errors) or "no model to try"
        if ctx.decision is not None and ctx.decision.local_only:
            message = (
                f"request is local-only (rule '{ctx.decision.rule}') and the local tier "
                f"cannot serve it: {detail}"
            )
        else:
            message = f"no tier could serve the request: {detail}"
        if tried == 0 and ctx.decision is not None:  # say how the chain came to be these
            message += f" (decision: {ctx.decision.reason})"
        if failure is not None:
            return failure.restated(message)
        transient = isinstance(last, LocalOverloadedError)
        error = TierUnavailableError(message, should_retry=None if transient else False)
        if last is not None and "retry-after" in last.headers:
            error.headers["retry-after"] = last.headers["retry-after"]
        return error

    # -- recording -------------------------------------------------------------------------

    def record(
        self, ctx: RequestContext, *, status: str, http_status: int, error: str | None
    ) -> None:
        """Write the one outcome record for this request (it settles the request's spend hold).
        Never raises."""
        try:
            settle_usage(ctx)
            self.outcomes.submit(self._build_record(ctx, status, http_status, error))
        except Exception:  # a failed record must not fail the request; it is logged
            log.exception("could not build outcome record for %s", ctx.request_id)
            self.outcomes.release_spend(ctx.request_id)

    def _build_record(
        self, ctx: RequestContext, status: str, http_status: int, error: str | None
    ) -> OutcomeRecord:
        decision, signals, served, usage = ctx.decision, ctx.signals, ctx.served, ctx.usage
        model = served.model if served else None
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
        cost = 0.0 if model is None else self.costs.call_cost(model, usage)
        policy = self.policy
        cascade = dict(ctx.cascade) if ctx.cascade is not None else None
        discarded = ctx.cascade_usage
        if cascade is not None:
            # The local answer as it ended: the one discarded, else the one served.
            local = discarded if discarded is not None else usage
            cascade["local_model"] = decision.model if decision is not None else None
            cascade["local_prompt_tokens"] = local.prompt_tokens
            cascade["local_completion_tokens"] = local.completion_tokens
            cascade["local_generation_s"] = round(local.generation_s, 4)
        if cascade is not None and discarded is not None and decision is not None:
            # An escalated cascade pays for the local answer it discarded, too.
            local_cost = self.costs.call_cost(policy.models[decision.model], discarded)
            cascade["local_cost_usd"] = local_cost
            cost += local_cost
        default_closed = policy.models[policy.closed_models[0]] if policy.closed_models else None
        counterfactual = self.costs.call_cost(default_closed, usage) if default_closed else 0.0
        # A request refused at admission (over budget, unsatisfiable, over a token limit) called
        # no model: it has no tier, as one refused before routing, though its decision is kept.
        routed = decision if ctx.admitted else None
        record = OutcomeRecord(
            id=ctx.request_id,
            ts=time.time(),
            tenant=ctx.tenant,
            # Refused before routing, the record names the model as asked: the client's own
            # text, kept as a redacted prompt is.
            alias=signals.alias if signals else _asked_alias(ctx.asked),
            tier=model.tier if model else (routed.tier if routed else None),
            model=model.name if model else (routed.model if routed else None),
            rule=decision.rule if decision else None,
            score=signals.score if signals else None,
            threshold=decision.threshold if decision else None,
            policy_version=ctx.policy_version,
            model_version=ctx.model_version or self.scorer.version,
            status=status,
            http_status=http_status,
            stream=ctx.stream,
            latency_ms=(time.perf_counter() - ctx.started) * 1000.0,
            ttft_ms=ctx.ttft_ms,
            prompt_tokens=prompt,
            completion_tokens=completion,
            cost_usd=cost,
            counterfactual_cost_usd=counterfactual,
            error_type=error,
            fallback=served.fallback if served else None,
            capability=signals.capability if signals else None,
            stakes=signals.stakes if signals else None,
            signals=_record_signals(signals),
            prompt=ctx.prompt,
            front=ctx.front,
            cascade=cascade,
        )
        if self._on_record is not None:
            self._on_record(record)
        return record

    @property
    def local_queue_depth(self) -> int:
        """Local requests generating plus waiting (0 without a local queue)."""
        return self.local_gate.depth if self.local_gate is not None else 0

    async def aclose(self) -> None:
        """Close both tiers and the scoring threads."""
        if self._scoring is not None:
            self._scoring.shutdown(wait=False, cancel_futures=True)
        for backend in (self.local, self.closed):
            if backend is not None:
                with contextlib.suppress(Exception):
                    await backend.aclose()


def _as_sent(
    signals: Signals,
    body: Mapping[str, Any],
    read: Collection[str],
    sent_headers: Mapping[str, str] | None,
) -> Signals | None:
    """``signals`` with every policy header and read ``metadata`` field the caller sent, or None
    when the caller was allowed them all already."""
    sent_metadata = policy_metadata(body, read)
    headers = signals.headers if sent_headers is None else sent_headers
    if headers == signals.headers and sent_metadata == signals.metadata:
        return None
    return replace(signals, headers=dict(headers), metadata=sent_metadata)


def _prompt_to_store(decision: Decision, body: Mapping[str, Any]) -> str | None:
    """The prompt as the decision says to keep it: not at all, redacted, or in full."""
    if decision.store_prompts == "none":
        return None
    text = scoring_text(list(body.get("messages") or []))
    return text if decision.store_prompts == "full" else redacted(text)


def _idle_sampling(model: ModelSpec, body: Mapping[str, Any]) -> list[str]:
    # The sampling fields ``model`` refuses that ``body`` sends null or at their default
    # (Gateway.fitted): most models refuse none, and most requests send none of them.
    refused = model.refused_sampling
    if not refused:
        return []
    return [n for n in refused.intersection(body) if body[n] in (None, SAMPLING_DEFAULTS[n])]


async def _unless_disconnected(
    call: Call, work: Awaitable[_T], ctx: RequestContext | None = None
) -> _T:
    """``work``'s result, or :class:`ClientDisconnected` once the client has gone, with
    ``work`` cancelled (the local backend then stops generating, or leaves its queue, and frees
    its place). ``work`` is a whole answer, or a stream up to its first chunk.

    A whole answer a closed model is writing (``ctx`` given) is not cancelled: a provider goes
    on with a non-streamed answer whose caller hung up and bills all of it, so the call runs to
    its end (its model's timeout bounds it, and no other model is called after it,
    ``ctx.left``) and the request is recorded aborted with the provider's usage."""
    if call.disconnected is None:
        return await work
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await call.disconnected():
                if task.done():  # it finished while we asked: what is made is answered
                    return task.result()
                if ctx is not None and _billed_whole(ctx):
                    ctx.left = True
                    with contextlib.suppress(TiergateError):  # a failed call bills nothing
                        await task
                raise ClientDisconnected("the client closed the connection")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _billed_whole(ctx: RequestContext) -> bool:
    """Whether the call in flight is billed whole though its client left: a closed model's
    non-streamed answer. Closing a stream stops OpenAI's and Anthropic's generation (not every
    provider's: SECURITY.md), and the local model stops at its next token."""
    return not ctx.stream and ctx.served is not None and ctx.served.model.tier == "closed"


def _shaped(
    shape: Callable[[dict[str, Any]], dict[str, Any]], body: dict[str, Any]
) -> dict[str, Any]:
    """The front's answer for a chat answer; a 500 naming why it cannot be made."""
    try:
        return shape(body)
    except TiergateError:
        raise
    except Exception as exc:  # the translation library's own errors
        log.exception("cannot shape the answer")
        raise TiergateError(f"cannot give the answer in this API's format: {exc}") from exc


def _outcome(
    exc: BaseException, stopping: bool = False, front: str = "chat"
) -> tuple[str, int, str | None]:
    """(status, HTTP status, error code) of a request that ended with ``exc``; ``stopping``:
    the server is cancelling the requests still running at shutdown, so a cancellation is its
    doing, not a client that left. The HTTP status is the one ``front`` answers with
    (:func:`~router.errors.error_status`: Anthropic's 529 for an overload)."""
    if stopping and isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "error", ServerShuttingDownError.status_code, ServerShuttingDownError.code
    if isinstance(exc, ClientDisconnected):  # nobody to answer: recorded, and charged, aborted
        return "aborted", 499, exc.code
    if isinstance(exc, TiergateError):
        return "error", error_status(exc, front == "messages"), exc.code
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "aborted", 499, "client_disconnected"
    return "error", 500, "internal_error"


class _Relay:
    """What a stream's life notes of the chunks passing: the first token's time, the answer
    text (for the learning hooks), whether the backend sent its usage, and the stream's id and
    model, which a usage chunk Tiergate adds carries too.

    The usage reaches the client as OpenAI sends it, in one last chunk with empty choices
    (the front sends it only to a client that asked, ``stream_options.include_usage``): a
    chunk that carries choices loses the usage a provider puts on every chunk (vLLM's
    ``continuous_usage_stats``) or on its finish; the backend has counted it, and when no
    usage chunk follows, Tiergate adds one with the counts the record holds."""

    def __init__(self, ctx: RequestContext) -> None:
        self.ctx = ctx
        self.text: list[str] = []
        self.calls: list[str] = []  # the tool calls' names and arguments, as streamed
        self.saw_usage = False
        self.id: str | None = None
        self.model: str | None = None

    def passing(self, chunk: dict[str, Any]) -> None:
        if self.id is None and isinstance(chunk.get("id"), str):
            self.id = chunk["id"]
            self.model = chunk.get("model") if isinstance(chunk.get("model"), str) else None
        choices = chunk.get("choices")
        if choices:
            chunk.pop("usage", None)
            _unnamed_stop(self.ctx, chunk)
            if self.ctx.ttft_ms is None and _produced(choices):
                self.ctx.ttft_ms = (time.perf_counter() - self.ctx.started) * 1000.0
            delta = choices[0].get("delta") or {}
            self.text.append(str(delta.get("content") or ""))
            if "tool_calls" in delta or "function_call" in delta:
                self.calls.append(_called(delta))
        elif chunk.get("usage"):
            self.saw_usage = True


def _called(delta: Mapping[str, Any]) -> str:
    """The names and argument text of the tool calls (or legacy function call) in a stream
    chunk's ``delta``: generated, and billed, as the answer's text is, so a stream left before
    its usage is charged for them too."""
    calls = delta.get("tool_calls")
    functions = (
        [c.get("function") for c in calls if isinstance(c, Mapping)]
        if isinstance(calls, list)
        else []
    )
    functions.append(delta.get("function_call"))
    return "".join(
        part
        for function in functions
        if isinstance(function, Mapping)
        for part in (function.get("name"), function.get("arguments"))
        if isinstance(part, str)
    )


def _unnamed_stop(ctx: RequestContext, payload: dict[str, Any]) -> None:
    """A local answer (or chunk) for the chat front without its choices' ``stop_reason``.

    The in-process local model names the stop sequence that ended its answer there, as vLLM
    does, for the Messages front, which reports it (``stop_sequence``). OpenAI's chat choice
    has no such field, and the chat front answers in OpenAI's shape. A closed model's answer
    is left as its provider sent it."""
    if ctx.front != "chat" or ctx.served is None or ctx.served.model.tier != "local":
        return
    for choice in payload.get("choices") or ():
        if isinstance(choice, dict):
            choice.pop("stop_reason", None)


#: The delta fields that carry what a model generated (a role alone is not a token).
_OUTPUT_FIELDS = (
    "content", "tool_calls", "function_call", "refusal", "audio", "reasoning_content",
    "thinking_blocks",
)  # fmt: skip


def _produced(choices: list[Any]) -> bool:
    """Whether a chunk's ``choices`` hold a token, or end the answer: the time to first token
    is not that of an opening chunk naming only the role (OpenAI's first, and what a native
    stream's ``message_start`` or ``response.created`` becomes), sent before any token."""
    for choice in choices:
        if not isinstance(choice, Mapping):
            continue
        delta = choice.get("delta")
        if choice.get("finish_reason") or (
            isinstance(delta, Mapping) and any(delta.get(k) for k in _OUTPUT_FIELDS)
        ):
            return True
    return False


def _opening(chunk: Mapping[str, Any]) -> bool:
    """Whether a stream's chunk only opens it, carrying nothing a client reads as the
    answer: no token, no end (:func:`_produced`), as OpenAI's role-only chunk; for a native
    stream, an opening event (:func:`~router.backends.native.opening_event`). Such chunks are
    held back until one that carries something (:meth:`Gateway.stream`). Usage is no part of
    the answer: a server that sends the prompt's with its opening chunk (vLLM's
    ``continuous_usage_stats``), as Anthropic's ``message_start`` always does, has still
    answered nothing, and a cut after it falls back."""
    if NATIVE in chunk:
        return opening_event(chunk)
    choices = chunk.get("choices")
    return not (isinstance(choices, list) and _produced(choices))


#: The longest a model's stream may take to close (a close takes milliseconds, as a rule)
#: before its request is recorded all the same: a close that hangs (a connection that never
#: closes) held the record, and the token and budget holds settled with it, for as long.
STREAM_CLOSE_TIMEOUT_S = 10.0


async def _close(source: AsyncIterator[dict[str, Any]] | None, request_id: str) -> None:
    aclose = getattr(source, "aclose", None)
    if aclose is None:
        return
    try:
        async with asyncio.timeout(STREAM_CLOSE_TIMEOUT_S):
            await aclose()
    except TimeoutError:
        log.warning(
            "closing stream %s took over %gs: stopped, and the request recorded",
            request_id,
            STREAM_CLOSE_TIMEOUT_S,
            extra={"request_id": request_id},
        )
    except Exception:  # closing a broken upstream must not mask the outcome
        log.debug("closing stream %s failed", request_id, exc_info=True)


async def _closing_chunks(
    ctx: RequestContext, relay: _Relay, call: Call
) -> AsyncGenerator[dict[str, Any], None]:
    """What a stream yields after its model's last chunk: a usage chunk, where the model sent
    none; then, on a front other than chat, CHUNKS_END, where its life waits until the front's
    last events (made after the chat stream) are framed, so that its record says whether
    they went out (router.backends.native.native_or)."""
    if not relay.saw_usage:
        yield await _usage_chunk(ctx, relay, call.body)
    if call.front != "chat":
        yield CHUNKS_END


async def _wound_up(
    ctx: RequestContext, source: _Metered | None, body: Mapping[str, Any], relay: _Relay
) -> None:
    # A request's end, before its record: its model's stream closed (None: none was opened),
    # then what a closed model's provider did not report counted (_count_unreported).
    await _close(source, ctx.request_id)
    await _count_unreported(ctx, body, relay)


async def _usage_chunk(
    ctx: RequestContext, relay: _Relay, body: Mapping[str, Any]
) -> dict[str, Any]:
    # The last chunk of a stream whose backend sent no usage: the stream's own id and model
    # (an OpenAI stream's chunks all share them), else the request's, and the counts the
    # record will hold (counted or estimated, as the backend reported none: llama_cpp.server
    # sends none).
    await _count_unreported(ctx, body, relay)
    settle_usage(ctx)
    usage, model = ctx.usage, relay.model
    return {
        "id": relay.id or ctx.request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model or (ctx.served.model.name if ctx.served else ""),
        "choices": [],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        },
    }


#: The longest counting a closed call's unreported usage may take (seconds) before the
#: request is recorded with its prompt at the most it can be (``Signals.prompt_held``).
COUNT_TIMEOUT_S = 5.0


async def _count_unreported(ctx: RequestContext, body: Mapping[str, Any], relay: _Relay) -> None:
    """Count, with the model's tokenizer, what a closed model's provider billed but did not
    report (a client that left, or a stream cut, before the usage that ends it): the prompt,
    and the answer text and tool calls streamed where there is one choice. Estimated (3.5
    characters a token), a prompt of text no tokenizer merges ("a\\n" repeated) was charged a
    third of its bill. Off the event loop and bounded (:data:`COUNT_TIMEOUT_S`); raises only when
    cancelled: :func:`settle_usage` estimates what is still missing."""
    usage, served, signals = ctx.usage, ctx.served, ctx.signals
    if served is None or served.model.tier != "closed" or signals is None:
        return
    if usage.prompt_tokens and usage.completion_tokens:  # reported, as it nearly always is
        return
    whole = ctx.choices == 1 and not usage.completion_tokens
    text = "".join(relay.text) + "".join(relay.calls) if whole else ""
    if usage.prompt_tokens and not text:
        return
    try:
        async with asyncio.timeout(COUNT_TIMEOUT_S):
            prompt, answer = await asyncio.to_thread(
                closed.counted_tokens, served.model, {} if usage.prompt_tokens else body, text
            )
    except TimeoutError:
        log.warning(
            "counting the prompt of %s took over %gs: charged at its bound",
            ctx.request_id,
            COUNT_TIMEOUT_S,
            extra={"request_id": ctx.request_id},
        )
        prompt, answer = signals.prompt_held, 0
    except Exception:  # a message litellm cannot read: the estimate stands
        log.warning("could not count the prompt of %s", ctx.request_id, exc_info=True)
        return
    usage.prompt_tokens = usage.prompt_tokens or prompt
    if answer:
        ctx.streamed_tokens = float(answer)


def settle_usage(ctx: RequestContext) -> None:
    """Fill in what the backend did not report before the request ended (a client that left
    before the usage chunk, a cancelled call): completion tokens estimated from the answer
    text that was streamed, and the prompt estimate once a model has worked on the request.
    The completion estimate is at most what the request's ``max_tokens`` let each choice use:
    text with many digits or symbols estimates more tokens than the model drew."""
    usage = ctx.usage
    if ctx.served is None or (usage.prompt_tokens and usage.completion_tokens):
        return
    completion = usage.completion_tokens or max(
        ctx.streamed_chunks, math.ceil(ctx.streamed_tokens - 1e-9)
    )
    if not usage.completion_tokens and ctx.signals is not None and ctx.signals.max_tokens:
        completion = min(completion, ctx.signals.max_tokens * ctx.choices)
    prompt = usage.prompt_tokens or (ctx.signals.prompt_tokens if ctx.signals else 0)
    ctx.usage = replace(usage, prompt_tokens=prompt, completion_tokens=completion)


def _wider(
    model: ModelSpec, rest: list[tuple[ModelSpec, str | None]]
) -> list[tuple[ModelSpec, str | None]]:
    """Of the chain's ``rest``, the models with a larger declared context window than
    ``model``'s: where a prompt ``model`` found over its window goes next (litellm's
    context-window fallbacks). Other failures that a retry cannot fix end the chain."""
    window = model.context_window
    if window is None:
        return []
    return [entry for entry in rest if (entry[0].context_window or 0) > window]


#: What :func:`_tool_types` names a request with a tool of its provider's own type (Anthropic's
#: ``bash_20250124``, ``text_editor_20250124``...): a chat tool is a ``function`` (or OpenAI's
#: ``custom``), and no other provider takes another's built-in tools.
PROVIDER_TOOLS = "tools.provider"
#: The chat field litellm's translation makes of Anthropic's web search tool (``tools``); the
#: Messages schema refuses it sent as it is, so a refusal names the tool the client sent.
WEB_SEARCH = "web_search_options"


def _tool_types(body: Mapping[str, Any]) -> set[str]:
    return {PROVIDER_TOOLS} if _provider_tools(body) else set()


def _provider_tools(body: Mapping[str, Any]) -> str:
    """The request's tools of a provider's own type, as ``TYPE`` names, or ''."""
    tools = body.get("tools")
    return ", ".join(
        str(tool.get("type"))
        for tool in (tools if isinstance(tools, list) else ())
        if isinstance(tool, Mapping) and tool.get("type") not in ("function", "custom")
    )


def _field_names(body: dict[str, Any]) -> set[str]:
    """The request's fields, and each field of its messages as ``messages.NAME``."""
    names = set(body)
    for message in body.get("messages") or ():
        names.update(MESSAGE_FIELD + key for key in message)
    return names


def _with_logprobs(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` asking for the log-probabilities a cascade judges (two alternatives at least,
    for the first token's margin)."""
    top = max(2, int(body.get("top_logprobs") or 0))
    return {**body, "logprobs": True, "top_logprobs": top}


def _client_logprobs(choice: dict[str, Any], body: Mapping[str, Any]) -> None:
    # Give the client the log-probabilities it asked for, not those the cascade asked for.
    # Past a stream's hold-back they are read here first (read_logprobs): ones that cannot be
    # read end the stream as a bad chunk does (UpstreamBadResponseError), not as a 500.
    logprobs = choice.get("logprobs")
    if not logprobs:
        return
    if not body.get("logprobs"):
        choice["logprobs"] = None
        return
    top = int(body.get("top_logprobs") or 0)
    for entry in read_logprobs(choice):
        entry["top_logprobs"] = (entry.get("top_logprobs") or [])[:top]


def _failed(ctx: RequestContext) -> Judgement:
    # The local model failed (busy, error, timeout): the cascade escalates.
    plan = ctx.decision.cascade if ctx.decision is not None else None
    return Judgement("escalated", 0.0, plan.threshold if plan else 0.0, "local_failed")


def _held_usage(usage: Usage, hold: HoldBack, ctx: RequestContext) -> Usage:
    # A local stream closed early may not have reported its usage yet: count what was held,
    # in the stream's own usage, which its end (on the worker thread) may still make exact.
    usage.prompt_tokens = usage.prompt_tokens or (ctx.signals.prompt_tokens if ctx.signals else 0)
    usage.completion_tokens = usage.completion_tokens or len(hold.logprobs)
    return usage


def _record_signals(signals: Signals | None) -> dict[str, Any]:
    if signals is None:
        return {}
    data = signals.as_dict()
    data.pop("headers", None)  # may carry tenant-set values; the record keeps only the signals
    data["metadata"] = {k: _record_value(v) for k, v in signals.metadata.items()}
    return data


def _goes_on(
    queue: list[tuple[ModelSpec, str | None]],
    i: int,
    cooled: list[tuple[ModelSpec, str | None]],
    *,
    failed: bool,
) -> bool:
    """Whether the walk along ``queue`` goes on at ``queue[i]``. At its end the models passed
    over while cooling down (``cooled``) join it, unless a model that was called failed: every
    model after them refused the request (``n``, tools, a field its provider does not take) or
    could not be tried, so none could serve it in their stead. A cooldown alone never fails a
    request, and a transient one must not answer as a 400, which clients do not retry."""
    if i == len(queue) and not failed:
        queue += cooled
        cooled.clear()
    return i < len(queue)


class _Metered:
    """A stream as a model answers it: ``held`` (the chunks read while it opened, or that a
    cascade held back), then ``rest``, counting the answer text that passes (see
    ``settle_usage``); for a cascade's, with the log-probabilities its client asked for
    (``body``).

    Closing it closes ``rest`` at once, read or not, before the request is recorded: the local
    model stops and frees its slot, the provider's connection is released. (An async
    generator closed before its first step runs none of its body, so it could not.)"""

    __slots__ = ("_body", "_ctx", "_held", "_rest")

    def __init__(
        self,
        ctx: RequestContext,
        held: Iterable[dict[str, Any]],
        rest: AsyncIterator[dict[str, Any]] | None,
        body: Mapping[str, Any] | None = None,
    ) -> None:
        self._ctx = ctx
        self._held = iter(held)
        self._rest = rest
        self._body = body

    def __aiter__(self) -> _Metered:
        return self

    async def __anext__(self) -> dict[str, Any]:
        chunk = next(self._held, None)
        if chunk is None:
            if self._rest is None:
                raise StopAsyncIteration
            chunk = await anext(self._rest)
        ctx, body = self._ctx, self._body
        for choice in chunk.get("choices") or ():
            if body is not None:
                _client_logprobs(choice, body)
            delta = choice.get("delta") if isinstance(choice, Mapping) else None
            if not isinstance(delta, Mapping):
                continue
            text = delta.get("content")
            text = text if isinstance(text, str) else ""
            if "tool_calls" in delta or "function_call" in delta:
                text += _called(delta)  # billed as the answer is
            if text:
                ctx.streamed_chunks += 1
                ctx.streamed_tokens += text_tokens(text)
        return chunk

    async def aclose(self) -> None:
        """Close the model's stream (once; a stream that ended or failed is closed already)."""
        rest, self._rest, self._held = self._rest, None, iter(())
        aclose = getattr(rest, "aclose", None)
        if aclose is not None:
            await aclose()


def _told(ctx: RequestContext, exc: TiergateError) -> str:
    """A failed call's message as logs and records keep it. A provider (or an external
    llama.cpp server) may repeat the prompt in its error, so where the request held personal
    data it is redacted; elsewhere it is kept whole (an unreachable server's address)."""
    return redacted(exc.message) if ctx.signals is not None and ctx.signals.pii else exc.message


def _asked_model(body: Mapping[str, Any]) -> str:
    """The model name ``body`` asks for, cut to twice ``RECORD_ASKED_CHARS`` (room for what
    the record's cut would split, :func:`_asked_alias`); "" when it names none (a body that
    could not be read)."""
    model = body.get("model")
    return model[: 2 * RECORD_ASKED_CHARS] if isinstance(model, str) else ""


def _asked_alias(asked: str) -> str:
    """The model name asked for as the record of a request refused before routing keeps it:
    the client's own text, redacted as a prompt is, then cut to ``RECORD_ASKED_CHARS``. Cut
    first, an address across the cut was kept in part, which no detector reads as one."""
    return redacted(asked)[:RECORD_ASKED_CHARS]


def _record_value(value: Any) -> Any:
    """A metadata value as a record keeps it: numbers and flags as they are unless they read as
    personal data, anything else as text of at most ``RECORD_METADATA_CHARS`` characters, with
    personal data redacted (read a little past the cut, so no item is cut in half)."""
    if value is None or isinstance(value, bool):
        return value
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    cap = RECORD_METADATA_CHARS
    clean = redacted(text[: 2 * cap])
    if isinstance(value, int | float) and clean == text:
        return value
    if len(clean) > cap or len(text) > 2 * cap:
        return clean[:cap] + f"... [{len(text)} chars]"
    return clean
