"""The routing engine: decide, serve with fallbacks, record. No HTTP here.

:class:`Gateway` owns the live parts built by ``create_app``: the policy (hot-reloaded), the
scorer, the two tiers' backends, the cost book and the outcome store. For each request it runs
one pipeline, ``signals -> score -> policy -> decision`` (:meth:`Gateway.decide`), then serves the
decision along its fallback chain (:meth:`Gateway.complete`, :meth:`Gateway.stream`) and writes
exactly one :class:`~router.outcomes.OutcomeRecord`, whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from router.backends import Backend, Completion, Usage
from router.calibration import AliasThreshold, calibrate, calibrated_values
from router.costs import CostBook
from router.errors import (
    BackendError,
    BadRequestError,
    LocalOverloadedError,
    NotFoundError,
    PolicyError,
    TiergateError,
    TierUnavailableError,
    UpstreamRateLimitedError,
)
from router.outcomes import OutcomeRecord, OutcomeStore
from router.policy import Decision, ModelSpec, Policy, evaluate, load_policy
from router.scoring import Scorer
from router.signals import Signals, extract_signals, message_text
from router.telemetry import Telemetry

log = logging.getLogger("tiergate.gateway")
_T = TypeVar("_T")

# Prompts longer than this (in characters) are scored on a worker thread (see decide_async).
OFFLOAD_SCORING_CHARS = 4000


def _prompt_chars(body: Mapping[str, Any]) -> int:
    return sum(len(message_text(m)) for m in body.get("messages") or () if isinstance(m, Mapping))


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
    prompt: str | None = None


class PolicyHolder:
    """The live policy and its hot reload: a bad edit is refused and the last good one serves.

    A change is loaded only once the file has looked the same on two checks in a row, and a
    file that changes while it is read is read again at a later check. An editor or ``kubectl
    cp`` that truncates and then writes the file would otherwise be caught half written, and
    the half would be refused (and counted) as a bad edit.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.policy: Policy = load_policy(path)
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
            policy = load_policy(self.path)
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
        return True


class Gateway:
    """Decides and serves requests; see the module docstring."""

    def __init__(
        self,
        *,
        policy: PolicyHolder,
        scorer: Scorer,
        local: Backend | None,
        closed: Backend,
        costs: CostBook,
        outcomes: OutcomeStore,
        on_record: Callable[[OutcomeRecord], None] | None = None,
        telemetry: Telemetry | None = None,
    ) -> None:
        self.policies = policy
        self.scorer = scorer
        self.local = local
        self.closed = closed
        self.costs = costs
        self.outcomes = outcomes
        self.thresholds: dict[str, float] = {}
        self.last_scores: list[float] = []
        self.alias_thresholds: dict[str, AliasThreshold] = calibrate(self.policy, [])
        self._on_record = on_record
        self.telemetry = telemetry if telemetry is not None else Telemetry.off()

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

    def backend(self, model: ModelSpec) -> Backend | None:
        """The backend for a model's tier (None when the local tier is switched off)."""
        return self.local if model.tier == "local" else self.closed

    def unavailable_reason(self, model: ModelSpec) -> str | None:
        """Why ``model`` cannot serve now, or None."""
        backend = self.backend(model)
        if backend is None:
            return "local tier disabled"
        return backend.unavailable_reason(model)

    def decide(
        self, body: Mapping[str, Any], *, tenant: str, headers: Mapping[str, str]
    ) -> tuple[Signals, Decision]:
        """Run signals -> score -> policy for one request. Raises 404 for an unknown model."""
        policy = self.policy
        alias = str(body.get("model", "auto"))
        if not policy.is_known_model(alias, tenant):
            raise NotFoundError(
                f"model '{alias}' is not an alias or a configured model; see GET /v1/models",
                param="model",
            )
        with self.telemetry.decide_span() as span:
            signals = extract_signals(body, self.scorer, tenant=tenant, headers=headers)
            decision = evaluate(
                policy,
                signals,
                thresholds=self.thresholds,
                spend_today_usd=self.outcomes.spend_today(tenant),
            )
            span.decided(decision)
        return signals, decision

    async def decide_async(
        self, body: Mapping[str, Any], *, tenant: str, headers: Mapping[str, str]
    ) -> tuple[Signals, Decision]:
        """:meth:`decide`, moved off the event loop when the prompt is long.

        Scoring a short prompt takes a fraction of a millisecond, less than a thread hop; a long
        one can take several milliseconds, which would stall every other request on the loop.
        """
        if _prompt_chars(body) > OFFLOAD_SCORING_CHARS:
            return await asyncio.to_thread(self.decide, body, tenant=tenant, headers=headers)
        return self.decide(body, tenant=tenant, headers=headers)

    def chain(self, decision: Decision) -> list[tuple[ModelSpec, str | None]]:
        """The models to try in order, each with the fallback label it would be recorded under."""
        models = self.policy.models
        primary = models[decision.model]
        chain: list[tuple[ModelSpec, str | None]] = [(primary, None)]
        for name in decision.fallbacks:
            spec = models[name]
            chain.append((spec, f"{primary.tier}->{spec.tier}"))
        return chain

    def spill_chain(self, decision: Decision) -> list[tuple[ModelSpec, str | None]]:
        """Where a request goes when the local queue is full and the policy says spill."""
        policy = self.policy
        if decision.local_only or policy.queue_full != "spill":
            return []
        return [(policy.models[name], "local-full->closed") for name in policy.closed_models]

    # -- serving ---------------------------------------------------------------------------

    async def complete(self, ctx: RequestContext, body: dict[str, Any]) -> Completion:
        """Serve a non-streaming request along the fallback chain."""

        async def attempt(backend: Backend, model: ModelSpec) -> Completion:
            result = await backend.complete(model, body)
            ctx.usage = result.usage
            return result

        return await self._along_chain(ctx, attempt)

    async def stream(
        self, ctx: RequestContext, body: dict[str, Any]
    ) -> AsyncIterator[dict[str, Any]]:
        """Open a stream along the fallback chain.

        Fallback is possible only until the first chunk arrives; this coroutine returns once a
        backend has produced its first chunk (so headers can name who answered), and the
        returned iterator yields that chunk first.
        """

        async def attempt(backend: Backend, model: ModelSpec) -> AsyncIterator[dict[str, Any]]:
            usage = Usage()
            source = backend.stream(model, body, usage)
            try:
                first: dict[str, Any] | None = await anext(source)
            except StopAsyncIteration:
                first = None
            ctx.usage = usage
            return _prepend(first, source)

        return await self._along_chain(ctx, attempt)

    async def _along_chain(
        self, ctx: RequestContext, attempt: Callable[[Backend, ModelSpec], Awaitable[_T]]
    ) -> _T:
        """Try the decision's models in order until one answers; spill on a full local queue."""
        assert ctx.decision is not None
        errors: list[str] = []
        queue = self.chain(ctx.decision)
        i = 0
        last: TiergateError | None = None
        while i < len(queue):
            model, fallback = queue[i]
            i += 1
            backend = self.backend(model)
            reason = self.unavailable_reason(model)
            if backend is None or reason:
                errors.append(f"{model.name}: {reason}")
                continue
            try:
                result = await attempt(backend, model)
            except LocalOverloadedError as exc:
                last = exc
                spill = self.spill_chain(ctx.decision)
                if not spill:
                    raise
                queue[i:i] = spill
                errors.append(f"{model.name}: queue full")
                continue
            except BadRequestError as exc:
                # The tier cannot honour the request (tools, images); try the next, else 400.
                last = exc
                errors.append(f"{model.name}: {exc.message}")
                continue
            except BackendError as exc:
                last = exc
                errors.append(f"{model.name}: {exc.message}")
                log.warning("%s failed for %s: %s", model.name, ctx.request_id, exc.message)
                if not exc.retryable:
                    raise
                continue
            ctx.served = Served(model, fallback)
            return result
        raise self._exhausted(ctx, errors, last)

    def _exhausted(
        self, ctx: RequestContext, errors: list[str], last: TiergateError | None
    ) -> TiergateError:
        """The one error for a request no model could answer.

        A model that was tried and failed gives its own status (502; 504 for a timeout; 429
        when it said "later"), as the README documents. When no model could even be tried
        (no provider key, local model not loaded or off, or a tier that cannot honour the
        request) the answer is 503 with ``x-should-retry: false``: a retry cannot fix it.
        """
        if isinstance(last, BadRequestError) and len(errors) == 1:
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
        if isinstance(last, BackendError):
            return last.restated(message)
        transient = isinstance(last, LocalOverloadedError)
        error = TierUnavailableError(message, should_retry=None if transient else False)
        if last is not None and "retry-after" in last.headers:
            error.headers["retry-after"] = last.headers["retry-after"]
        return error

    # -- recording -------------------------------------------------------------------------

    def record(
        self, ctx: RequestContext, *, status: str, http_status: int, error: str | None
    ) -> None:
        """Write the one outcome record for this request. Never raises."""
        try:
            self.outcomes.submit(self._build_record(ctx, status, http_status, error))
        except Exception:  # a failed record must not fail the request; it is logged
            log.exception("could not build outcome record for %s", ctx.request_id)

    def _build_record(
        self, ctx: RequestContext, status: str, http_status: int, error: str | None
    ) -> OutcomeRecord:
        decision, signals, served, usage = ctx.decision, ctx.signals, ctx.served, ctx.usage
        model = served.model if served else None
        prompt, completion = usage.prompt_tokens, usage.completion_tokens
        if model is None:
            cost = 0.0
        elif model.tier == "closed":
            cost = self.costs.closed_cost(model.litellm_model, prompt, completion)
        else:
            cost = self.costs.local_cost(prompt, completion, usage.generation_s)
        policy = self.policy
        default_closed = policy.models[policy.closed_models[0]] if policy.closed_models else None
        counterfactual = (
            self.costs.closed_cost(default_closed.litellm_model, prompt, completion)
            if default_closed
            else 0.0
        )
        record = OutcomeRecord(
            id=ctx.request_id,
            ts=time.time(),
            tenant=ctx.tenant,
            alias=signals.alias if signals else "",
            tier=model.tier if model else (decision.tier if decision else None),
            model=model.name if model else (decision.model if decision else None),
            rule=decision.rule if decision else None,
            score=signals.score if signals else None,
            threshold=decision.threshold if decision else None,
            policy_version=ctx.policy_version,
            model_version=self.scorer.version,
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
        )
        if self._on_record is not None:
            self._on_record(record)
        return record

    async def aclose(self) -> None:
        """Close both tiers."""
        for backend in (self.local, self.closed):
            if backend is not None:
                with contextlib.suppress(Exception):
                    await backend.aclose()


def _record_signals(signals: Signals | None) -> dict[str, Any]:
    if signals is None:
        return {}
    data = signals.as_dict()
    data.pop("headers", None)  # may carry tenant-set values; the record keeps only the signals
    return data


async def _prepend(
    first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]]
) -> AsyncIterator[dict[str, Any]]:
    try:
        if first is not None:
            yield first
        async for chunk in rest:
            yield chunk
    finally:
        aclose = getattr(rest, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()
