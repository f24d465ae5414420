"""The HTTP surface: OpenAI-compatible ``/v1/*`` endpoints plus health and readiness.

Handlers stay thin: parse and validate, ask the :class:`~router.gateway.Gateway` to decide and
serve, put the decision's explanation into headers, and make sure exactly one outcome record is
written per chat request whatever happens (success, error, client gone).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from router.auth import Principal, check_record_access, principal_of
from router.errors import (
    BadRequestError,
    BudgetExceededError,
    ClientDisconnected,
    PermissionDeniedError,
    TiergateError,
)
from router.gateway import NO_CLOSED_FALLBACK, Gateway, RequestContext
from router.learning import LearningLoop, answer_text
from router.limits import RateLimiter, TokenHold, check_request_size
from router.policy import POLICY_HEADER_PREFIX
from router.schemas import ChatCompletionRequest, FeedbackRequest, json_request_body

_Model = TypeVar("_Model", bound=BaseModel)
_T = TypeVar("_T")
log = logging.getLogger("tiergate.api")
router = APIRouter()


def _gateway(request: Request) -> Gateway:
    gateway: Gateway = request.app.state.gateway
    return gateway


def _dumps(data: Any) -> bytes:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()


# Deeper JSON is refused: no chat request needs it, and deeper structures would meet Python's
# recursion limit in whatever walks them next (validation, PII scanning, the encoder).
MAX_JSON_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 naming what is wrong with it.

    Lone surrogates (``"\\ud800"``, in values and keys, at any depth) are replaced by U+FFFD
    rather than refused. Such a string cannot be encoded as UTF-8, so it would fail at the
    provider, in the outcome store or in a log; replacing it keeps the request (a client that
    cut a UTF-16 string between the two halves of an emoji still gets its answer), as a UTF-8
    decoder, WHATWG's ``TextEncoder`` and Go's ``encoding/json`` do. Nesting deeper than
    :data:`MAX_JSON_DEPTH` is a 400.
    """
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise BadRequestError(_too_deep()) from exc
    if not isinstance(body, dict):
        raise BadRequestError("request body must be a JSON object")
    cleaned: dict[str, Any] = _clean(body)
    return cleaned


def _too_deep() -> str:
    return f"request body is nested more than {MAX_JSON_DEPTH} levels deep"


def _clean_text(text: str) -> str:
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def _clean(body: Any) -> Any:
    """``body`` with lone surrogates replaced, or a 400 when it is nested too deep.

    Iterative, so that the depth check itself cannot overflow the stack.
    """
    root: list[Any] = [body]
    stack: list[tuple[list[Any] | dict[str, Any], Any, int]] = [(root, 0, 0)]
    while stack:
        parent, key, depth = stack.pop()
        value = parent[key]
        if isinstance(value, str):
            parent[key] = _clean_text(value)
        elif isinstance(value, list | dict):
            if depth >= MAX_JSON_DEPTH:
                raise BadRequestError(_too_deep())
            if isinstance(value, dict):
                if not all(k.isascii() for k in value):
                    value = {_clean_text(k): v for k, v in value.items()}
                    parent[key] = value
                stack.extend((value, k, depth + 1) for k in value)
            else:
                stack.extend((value, i, depth + 1) for i in range(len(value)))
    return root[0]


def validate_chat(body: dict[str, Any]) -> None:
    """Check the chat request's shape; the dict itself is passed on unchanged."""
    validated(ChatCompletionRequest, body)


def validated(model: type[_Model], body: dict[str, Any]) -> _Model:
    """``body`` parsed as ``model``, or a 400 naming the first invalid field."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BadRequestError(f"{where}: {first['msg']}", param=where or None) from exc


def _policy_headers(request: Request) -> dict[str, str]:
    allowed = getattr(request.state, "policy_headers", None)
    out = {}
    for key, value in request.headers.items():
        if key.startswith(POLICY_HEADER_PREFIX) and (allowed is None or key in allowed):
            out[key] = value
    return out


def _policy_metadata(request: Request) -> frozenset[str] | None:
    """The ``metadata`` keys this caller may steer the policy with (None: all), gated like
    ``x-tiergate-*`` headers (``set_policy_headers``, else the key's ``policy_metadata``)."""
    allowed: frozenset[str] | None = getattr(request.state, "policy_metadata", None)
    return allowed


def _learning(request: Request) -> LearningLoop | None:
    return getattr(request.app.state, "learning", None)


def _tenant(request: Request) -> str:
    return str(getattr(request.state, "tenant", "default"))


def explain_headers(ctx: RequestContext, gateway: Gateway) -> dict[str, str]:
    """The decision's explanation as response headers."""
    headers = {"x-request-id": ctx.request_id}
    if ctx.policy_version:
        headers["x-tiergate-policy-version"] = ctx.policy_version
    headers["x-tiergate-model-version"] = gateway.scorer.version
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
    return headers


def _prompt_to_store(ctx: RequestContext, body: dict[str, Any]) -> str | None:
    decision = ctx.decision
    if decision is None or decision.store_prompts == "none":
        return None
    from router.signals import scoring_text

    text = scoring_text(list(body.get("messages") or []))
    if decision.store_prompts == "full":
        return text
    from router.pii import redact

    return redact(text)


@router.post("/v1/chat/completions", openapi_extra=json_request_body(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    """OpenAI chat completions, routed. Streams as SSE when ``stream`` is true."""
    gateway = _gateway(request)
    ctx = RequestContext(
        request_id=f"req_{uuid.uuid4().hex}",
        tenant=_tenant(request),
        started=time.perf_counter(),
        stream=False,
        policy_version=gateway.policy.digest,
    )
    streaming_handed_off = False
    principal = principal_of(request)
    limiter: RateLimiter = request.app.state.limiter
    hold: TokenHold | None = None
    try:
        await limiter.admit(principal)
        body = await read_json(request)
        ctx.stream = bool(body.get("stream"))
        validate_chat(body)
        check_request_size(body, request.app.state.settings)
        _check_pin(principal, gateway, body)
        hold = await _decide_and_reserve(request, ctx, principal, body)
        learning = _learning(request)
        if learning is not None:
            learning.observe(ctx, body)
        if ctx.stream:
            source = await gateway.stream(ctx, body)
            if learning is not None:
                source = learning.tap(ctx, body, source)
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            response = StreamingResponse(
                _sse(ctx, gateway, source, include_usage, hold),
                media_type="text/event-stream",
                headers={**explain_headers(ctx, gateway), "cache-control": "no-cache"},
            )
            streaming_handed_off = True
            return response
        result = await _unless_disconnected(request, gateway.complete(ctx, body))
        gateway.record(ctx, status="ok", http_status=200, error=None)
        if learning is not None:
            learning.after_response(ctx, body, answer_text(result.body))
        return Response(
            _dumps(result.body),
            media_type="application/json",
            headers=explain_headers(ctx, gateway),
        )
    except ClientDisconnected as exc:  # nobody to answer: recorded, and charged, as aborted
        gateway.record(ctx, status="aborted", http_status=499, error=exc.code)
        return Response(status_code=499)
    except TiergateError as exc:
        exc.headers.update(explain_headers(ctx, gateway))
        gateway.record(ctx, status="error", http_status=exc.status_code, error=exc.code)
        raise
    except asyncio.CancelledError:
        gateway.record(ctx, status="aborted", http_status=499, error="client_disconnected")
        raise
    except Exception:
        if not streaming_handed_off:
            gateway.record(ctx, status="error", http_status=500, error="internal_error")
        raise
    finally:
        if hold is not None and not streaming_handed_off:
            hold.settle(ctx.usage.prompt_tokens + ctx.usage.completion_tokens)


async def _decide_and_reserve(
    request: Request, ctx: RequestContext, principal: Principal, body: dict[str, Any]
) -> TokenHold:
    """Decide the route, then reserve its estimated spend and tokens (or refuse: 429)."""
    gateway = _gateway(request)
    reserve_tokens: int = request.app.state.settings.reserve_tokens
    ctx.signals, ctx.decision = await gateway.decide_async(
        body,
        tenant=ctx.tenant,
        headers=_policy_headers(request),
        metadata_keys=_policy_metadata(request),
    )
    ctx.prompt = _prompt_to_store(ctx, body)
    await gateway.hold_spend(ctx, reserve_tokens)
    _refuse_if_needed(ctx)
    limiter: RateLimiter = request.app.state.limiter
    return await limiter.reserve(principal, sum(gateway.reserved_tokens(ctx, reserve_tokens)))


#: How often a non-streaming request checks that its client is still there.
DISCONNECT_POLL_S = 0.25


async def _unless_disconnected(request: Request, work: Awaitable[_T]) -> _T:
    """``work``'s result, or :class:`ClientDisconnected` once the client has gone, with
    ``work`` cancelled (the local backend then stops generating and frees its slot)."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected("the client closed the connection")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _check_pin(principal: Principal, gateway: Gateway, body: dict[str, Any]) -> None:
    spec = gateway.policy.models.get(str(body.get("model")))
    if spec is not None and spec.tier == "closed" and not principal.can("pin_closed"):
        raise PermissionDeniedError(
            f"this API key may not pin the closed model '{spec.name}'; use a routing alias",
            param="model",
        )


def _refuse_if_needed(ctx: RequestContext) -> None:
    decision = ctx.decision
    assert decision is not None
    rejected = getattr(decision, "rejected", None)
    if rejected:
        raise BudgetExceededError(rejected)
    unsatisfiable = getattr(decision, "unsatisfiable", None)
    if unsatisfiable:
        raise BadRequestError(unsatisfiable)


async def _sse(
    ctx: RequestContext,
    gateway: Gateway,
    source: AsyncIterator[dict[str, Any]],
    include_usage: bool,
    hold: TokenHold,
) -> AsyncIterator[bytes]:
    """Frame chunks as SSE, time the first token, and record the outcome once at the end; the
    tokens are settled whatever the ending (a client that left pays for what was generated)."""
    status, http_status, error = "ok", 200, None
    saw_usage = False
    try:
        async for chunk in source:
            if ctx.ttft_ms is None and chunk.get("choices"):
                ctx.ttft_ms = (time.perf_counter() - ctx.started) * 1000.0
            if not chunk.get("choices") and chunk.get("usage"):
                if not include_usage:
                    continue
                saw_usage = True
            yield b"data: " + _dumps(chunk) + b"\n\n"
        if include_usage and not saw_usage:
            yield b"data: " + _dumps(_usage_chunk(ctx)) + b"\n\n"
        yield b"data: [DONE]\n\n"
    except TiergateError as exc:
        status, http_status, error = "error", exc.status_code, exc.code
        yield b"data: " + _dumps(exc.to_body()) + b"\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        status, http_status, error = "aborted", 499, "client_disconnected"
        raise
    except Exception:
        status, http_status, error = "error", 500, "internal_error"
        log.exception("stream %s failed", ctx.request_id)
        raise
    finally:
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            try:
                await aclose()
            except Exception:  # closing a broken upstream must not mask the outcome
                log.debug("closing stream %s failed", ctx.request_id, exc_info=True)
        gateway.record(ctx, status=status, http_status=http_status, error=error)
        hold.settle(ctx.usage.prompt_tokens + ctx.usage.completion_tokens)


def _usage_chunk(ctx: RequestContext) -> dict[str, Any]:
    usage = ctx.usage
    return {
        "id": ctx.request_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": ctx.served.model.name if ctx.served else "",
        "choices": [],
        "usage": {
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        },
    }


@router.post("/v1/feedback")
async def feedback(request: Request) -> dict[str, Any]:
    """A quality signal about one of the caller's own earlier requests, or any request for an
    ``admin`` key (404 for any other)."""
    principal = principal_of(request)
    await request.app.state.limiter.admit(principal, tokens=False)
    req = validated(FeedbackRequest, await read_json(request))
    learning = _learning(request)
    if learning is None:
        raise TiergateError("the learning loop is not running")
    label = await learning.feedback(
        req, lambda record: check_record_access(principal, record, req.request_id)
    )
    return {
        "object": "feedback",
        "request_id": label.request_id,
        "source": label.source,
        "quality": label.quality,
        "value": label.value,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """Routing aliases and configured models, each with its availability."""
    await request.app.state.limiter.admit(principal_of(request), tokens=False)
    gateway = _gateway(request)
    policy = gateway.policy
    tenant = _tenant(request)
    data: list[dict[str, Any]] = []
    for name in policy.alias_names(tenant):
        info: dict[str, Any] = {"kind": "alias"}
        calibrated = gateway.alias_thresholds.get(name)
        if calibrated is not None:
            info.update(calibrated.as_dict())
        data.append(
            {"id": name, "object": "model", "created": 0, "owned_by": "tiergate", "tiergate": info}
        )
    for name, spec in policy.models.items():
        reason = gateway.unavailable_reason(spec)
        data.append(
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": (spec.litellm_model or "local").split("/", 1)[0],
                "tiergate": {
                    "kind": "model",
                    "tier": spec.tier,
                    "available": reason is None,
                    "reason": reason,
                },
            }
        )
    return {"object": "list", "data": data}


@router.post("/v1/route", openapi_extra=json_request_body(ChatCompletionRequest))
async def dry_run(request: Request) -> dict[str, Any]:
    """Explain how a chat request would be routed, without calling any model. The request gets
    chat's checks up to the decision (rate limit, shape, size caps, pin permission); the
    backend's own checks (e.g. ``n > 1`` for the local model) are not run."""
    gateway = _gateway(request)
    principal = principal_of(request)
    await request.app.state.limiter.admit(principal)
    body = await read_json(request)
    validate_chat(body)
    check_request_size(body, request.app.state.settings)
    _check_pin(principal, gateway, body)
    signals, decision = await gateway.decide_async(
        body,
        tenant=_tenant(request),
        headers=_policy_headers(request),
        metadata_keys=_policy_metadata(request),
    )
    chain = [
        {
            "model": spec.name,
            "tier": spec.tier,
            "fallback": label,
            "unavailable": gateway.unavailable_reason(spec),
        }
        for spec, label in gateway.chain(decision)
    ]
    return {
        "policy_version": gateway.policy.digest,
        "model_version": gateway.scorer.version,
        "signals": signals.as_dict(),
        "decision": decision.as_dict(),
        "chain": chain,
    }


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONResponse:
    """Readiness: the policy is parsed and the local model (if any) is loaded.

    Anyone may ask (probes send no key) and gets ``{"ready": ...}``; the details (policy path,
    reload error, models, missing key variables, calibration) go only to a caller whose key
    has ``dashboard`` or ``admin``: they map the deployment for an attacker.
    """
    report = readiness(request.app.state)
    principal = getattr(request.state, "principal", None)
    if not (isinstance(principal, Principal) and principal.can("dashboard")):
        report = {"ready": report["ready"]}
    return JSONResponse(report, status_code=200 if report["ready"] else 503)


def readiness(state: Any) -> dict[str, Any]:
    """The readiness report: policy, local tier, closed models, scorer, outcome writer."""
    gateway: Gateway = state.gateway
    holder = gateway.policies
    policy = gateway.policy
    local_reason = None
    local_depth = 0
    if gateway.local is not None and policy.local_model:
        local_reason = gateway.unavailable_reason(policy.models[policy.local_model])
        gate = getattr(gateway.local, "gate", None)
        local_depth = gate.depth if gate is not None else 0
    closed = {
        name: {
            "available": (reason := gateway.unavailable_reason(policy.models[name])) is None,
            "reason": reason,
        }
        for name in policy.closed_models
    }
    local_ok = gateway.local is None or local_reason is None
    no_closed = None
    if policy.closed_models and not gateway.closed_available():
        no_closed = {
            "serves": "error" if policy.fail_closed else "local",
            "note": "no closed model is available (no API key): "
            + (
                "the policy says fail_closed, so requests routed closed get 503"
                if policy.fail_closed
                else "requests routed closed are served by the local model "
                f"(x-tiergate-fallback: {NO_CLOSED_FALLBACK})"
            ),
        }
    # A dead outcome writer is started again here, and this one probe says it was dead.
    restarted = gateway.outcomes.check_writer()
    return {
        "ready": local_ok and restarted is None,
        "no_closed": no_closed,
        "outcomes": {**gateway.outcomes.health(), "restarted": restarted},
        "policy": {
            "path": str(holder.path),
            "version": policy.digest,
            "last_reload_error": holder.last_error,
        },
        "local": {
            "backend": state.settings.local_backend,
            "available": gateway.local is not None and local_reason is None,
            "reason": local_reason,
            "queue_depth": local_depth,
        },
        "closed": closed,
        "scorer": {"name": gateway.scorer.name, "version": gateway.scorer.version},
        "aliases": {name: t.as_dict() for name, t in gateway.alias_thresholds.items()},
    }
