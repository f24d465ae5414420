"""``create_app(settings)``: build the FastAPI app and everything it holds, in its lifespan.

Nothing is built at import. The lifespan loads the policy, the scorer and the local model (in a
thread), opens the outcome store and the HTTP pool, puts the typed
:class:`~router.services.Services` on ``app.state``, starts the background loops
(:func:`start_loops`) and, at shutdown, stops them and drains the outcome store.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.api import ClientJSON, stream_error
from router.api import router as api_router
from router.artifact import release_freed_memory
from router.auth import AuthMiddleware, build_authenticator
from router.backends import Backend
from router.backends.closed import ClosedBackend
from router.backends.local import ExternalLlamaBackend, LlamaCppBackend, Queued
from router.backends.native import NativeBackend
from router.backends.openai_http import OpenAIHTTP
from router.cascade import CascadeModel
from router.config import BUNDLED_GGUF, Settings
from router.cooldown import Cooldowns
from router.costs import CostBook, load_litellm_cost_map
from router.dashboard import router as observability_router
from router.errors import (
    BadRequestError,
    ConfigError,
    NotFoundError,
    ServerShuttingDownError,
    StoreUnavailableError,
    TiergateError,
    error_body,
    error_status,
    on_messages_front,
)
from router.gateway import Gateway, PolicyHolder, new_request_id
from router.learning import LearningLoop, purge_loop
from router.limits import build_rate_limiter
from router.outcomes import OutcomeStore, SQLiteOutcomeStore
from router.policy import Policy
from router.registry import built_on, restart_advice, store_version, watch_model_store
from router.scoring import HeuristicScorer, Scorer
from router.services import Services, running
from router.telemetry import RequestSpanMiddleware, Telemetry

if TYPE_CHECKING:
    from router.outcomes_redis import RedisOutcomeStore

log = logging.getLogger("tiergate.app")


def configured_scorer(settings: Settings) -> Scorer:
    """The learned scorer: the model store's current version when ``model_store`` is set, else
    ``classifier_path``, else the shipped model; the heuristic when none loads."""
    from router.artifact import default_model_path, load_scorer
    from router.profile import default_profile
    from router.registry import configured_model_path

    path = settings.classifier_path or default_model_path()
    # A configured profile that cannot be read stops the start: routing for another local
    # model than the one running is a wrong route that looks like success.
    profile = default_profile(settings.local_profile)
    if (gaps := profile.gaps_warning()) is not None:
        log.warning("%s", gaps)
    if settings.local_profile is None and (other := _unbundled_local(settings)) is not None:
        log.warning(
            "the local model is %s, but routing reads the bundled %s's profile "
            "(TIERGATE_LOCAL_PROFILE is not set): point TIERGATE_LOCAL_PROFILE at its profile "
            "(tiergate profile, or models/profiles/; docs/profile.md)",
            other,
            profile.model,
        )
    try:
        path = configured_model_path(settings)
        return load_scorer(path, profile)
    except (ConfigError, OSError) as exc:
        hint = ""
        store = settings.model_store
        if store is not None and (version := store_version(settings)) is not None:
            hint = (
                f"; it is the current version {version} of the model store: "
                f"{restart_advice(store)}, or promote an earlier version"
            )
        log.warning(
            "no usable classifier at %s (%s); using the heuristic scorer%s", path, exc, hint
        )
        return HeuristicScorer()


def _warn_at_start(
    policy: Policy, settings: Settings, authenticator: Any, *, in_process: bool
) -> None:
    """What a start can tell an operator is likely wrong but still serves: keys whose tenant
    the policy does not name, an in-process model whose context the policy misreads, and what
    the policy check found sound but likely not meant."""
    for issue in policy.warnings:
        log.warning("policy: %s", issue)
    _warn_unknown_tenants(policy, authenticator.keys.values())
    if in_process:
        _warn_window(policy, settings.n_ctx)


def _warn_unknown_tenants(policy: Policy, keys: Iterable[Any]) -> None:
    # A key's tenant the policy names nowhere (a typo, "Acme" for "acme") gets the global rules
    # and no budget, silently; said once at start, where the policy has tenants at all.
    if not policy.tenants:
        return
    unknown = sorted({k.tenant for k in keys} - set(policy.tenants) - {"admin"})
    if unknown:
        log.warning(
            "API keys act for tenant(s) the policy does not name: %s (policy tenants: %s); "
            "their requests get the global rules and no budget",
            ", ".join(map(repr, unknown)),
            ", ".join(sorted(policy.tenants)),
        )


def _warn_window(policy: Policy, n_ctx: int) -> None:
    # The policy decides what fits the local model by its context_window; the in-process model
    # holds TIERGATE_N_CTX tokens. Larger, and a request the policy sends local overflows it
    # (400 context_length_exceeded); smaller, and one that would fit goes closed.
    for name, spec in policy.models.items():
        if spec.tier == "local" and spec.context_window not in (None, n_ctx):
            log.warning(
                "policy model '%s' has context_window %d, but the local model holds "
                "TIERGATE_N_CTX=%d tokens: set the two equal",
                name,
                spec.context_window,
                n_ctx,
            )


def _unbundled_local(settings: Settings) -> str | None:
    # The local model when it is not the bundled GGUF, whose profile is the default one.
    if settings.local_backend == "openai_http":
        return "an external llama.cpp server (TIERGATE_LOCAL_BASE_URL)"
    if settings.local_backend == "llama_cpp" and settings.local_model_path.name != BUNDLED_GGUF:
        return f"the GGUF {settings.local_model_path.name}"
    return None


def static_companion(scorer: Scorer) -> Scorer | None:
    """The scorer that decides in place of ``scorer`` under a policy with ``encoder: false``:
    the shipped static router (``router-v6``, sub-millisecond) read with ``scorer``'s local
    profile. None when ``scorer`` runs no encoder (nothing to turn off), or when the companion
    cannot load: that is logged and ``scorer`` keeps deciding, never the heuristic."""
    if not getattr(scorer, "costly", False):
        return None
    from router.artifact import STATIC_MODEL_NAME, load_scorer
    from router.locations import shipped

    path = shipped("models", STATIC_MODEL_NAME)
    try:
        return load_scorer(path, getattr(scorer, "profile", None))
    except (ConfigError, OSError) as exc:
        log.warning(
            "the policy turns the encoder off, but %s cannot load (%s): %s keeps scoring",
            path,
            exc,
            scorer.version,
        )
        return None


def load_cascade_model(settings: Settings) -> CascadeModel | None:
    """The cascade's confidence model (``cascade_model_path``, else the shipped one), or None
    when it cannot be loaded: cascades then escalate every request (logged)."""
    from router.cascade import default_cascade_path, load_cascade

    path = settings.cascade_model_path or default_cascade_path()
    try:
        model, meta = load_cascade(path)
    except (ConfigError, OSError) as exc:
        log.warning("no cascade model at %s (%s): cascades escalate every request", path, exc)
        return None
    fitted_on = (meta.get("local_model") or {}).get("file")
    if fitted_on and fitted_on != settings.local_model_path.name:
        # Its confidence reads another model's log-probabilities: refit it for this one.
        log.warning(
            "cascade model %s was fitted on %s, the local model is %s: its confidence is "
            "uncalibrated here (python -m studies.cascade refits it)",
            path,
            fitted_on,
            settings.local_model_path.name,
        )
    return model


def profile_loader(settings: Settings) -> Callable[[Path], Scorer]:
    """The model store watcher's loader: the trusted-only loader, reading the configured local
    profile (the same one :func:`configured_scorer` reads)."""
    from router.artifact import load_scorer
    from router.profile import default_profile

    def load(path: Path) -> Scorer:
        return load_scorer(path, default_profile(settings.local_profile))

    return load


def build_outcome_store(settings: Settings) -> OutcomeStore:
    """SQLite by default; Redis when ``redis_url`` is set."""
    if settings.redis_url:
        from router.outcomes_redis import RedisOutcomeStore

        store: OutcomeStore = RedisOutcomeStore(settings.redis_url, settings=settings)
        return store
    return SQLiteOutcomeStore(settings.sqlite_path, queue_size=settings.outcome_queue_size)


def replica_count(store: OutcomeStore) -> Callable[[], int] | None:
    """How many replicas share the rate limits in a Redis outage: the Redis outcome store's
    count of live replicas (its heartbeat), or None for a store that does not keep one."""
    from router.outcomes_redis import RedisOutcomeStore

    if not isinstance(store, RedisOutcomeStore):
        return None
    return lambda: store.replicas


def shared_cooldowns(store: OutcomeStore) -> RedisOutcomeStore | None:
    """Where the replicas share their cooldowns (router.cooldown): the Redis outcome store, or
    None (SQLite: one replica, which cools on its own)."""
    from router.outcomes_redis import RedisOutcomeStore

    return store if isinstance(store, RedisOutcomeStore) else None


def start_outcome_store(store: OutcomeStore, retention_days: int | None) -> None:
    """Start ``store``, told the policy's retention first: a Redis store's TTLs follow it, and
    so does a journal it replays at start."""
    store.set_retention_days(retention_days)
    store.start()


def create_app(
    settings: Settings,
    *,
    scorer: Scorer | None = None,
    outcomes: OutcomeStore | None = None,
    environ: Mapping[str, str] | None = None,
    local_backend: Backend | None = None,
    telemetry: Telemetry | None = None,
    cascade_model: CascadeModel | None = None,
) -> FastAPI:
    """Build the app. Keyword arguments replace parts (tests, embedding) and are optional."""
    authenticator = build_authenticator(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        http = OpenAIHTTP(
            timeout_s=settings.closed_timeout_s, max_event_bytes=settings.max_event_bytes
        )
        policy = PolicyHolder(settings.policy)
        store = outcomes if outcomes is not None else build_outcome_store(settings)
        start_outcome_store(store, policy.policy.retention_days)
        limiter = build_rate_limiter(settings, replica_count(store))
        local = local_backend
        if local is None and settings.local_backend == "llama_cpp":
            llama = LlamaCppBackend(settings)
            try:
                await asyncio.to_thread(llama.load)
            except ConfigError as exc:
                log.error("local model not loaded: %s", exc)
            local = llama
        elif local is None and settings.local_backend == "openai_http":
            local = ExternalLlamaBackend(settings, http)
        gate = local.gate if isinstance(local, Queued) else None
        _warn_at_start(
            policy.policy,
            settings,
            authenticator,
            in_process=local_backend is None and isinstance(local, LlamaCppBackend),
        )
        tel = telemetry if telemetry is not None else Telemetry.from_settings(settings, environ)
        tel.watch_queue(gate)
        tel.watch_policy(policy)
        # The store version the scorer loads from, read before it loads: a promotion in between
        # is then loaded by the watcher, never missed; one that did not load is tried again.
        from_store = None if scorer is not None else store_version(settings)
        gateway = Gateway(
            policy=policy,
            scorer=scorer
            if scorer is not None
            else await asyncio.to_thread(configured_scorer, settings),
            local=None if local is None else tel.wrap_backend(local),
            closed=tel.wrap_backend(
                ClosedBackend(
                    http,
                    timeout_s=settings.closed_timeout_s,
                    environ=environ,
                    max_event_bytes=settings.max_event_bytes,
                )
            ),
            costs=CostBook(
                load_litellm_cost_map(),
                local_price_per_mtok=settings.local_price_per_mtok,
                local_price_per_gpu_hour=settings.local_price_per_gpu_hour,
            ),
            outcomes=store,
            limiter=limiter,
            reserve_tokens=settings.reserve_tokens,
            local_gate=gate,
            native=tel.wrap_native(
                NativeBackend(http, timeout_s=settings.closed_timeout_s, environ=environ)
            ),
            on_record=tel.on_record,
            telemetry=tel,
            cascade=(
                cascade_model
                if cascade_model is not None
                else await asyncio.to_thread(load_cascade_model, settings)
            ),
            companion=static_companion,
            cooldowns=Cooldowns(
                after_fails=settings.cooldown_after_fails,
                cooldown_s=settings.cooldown_s,
                shared=shared_cooldowns(store),
            ),
            call_timeouts={"closed": settings.closed_timeout_s, "local": settings.local_timeout_s},
        )
        # A policy that starts with `encoder: false` loads the static companion now, not on
        # the first request.
        deciding = await asyncio.to_thread(gateway.scorer_for, policy.policy)
        release_freed_memory()  # what loading freed, before the proxy idles
        learning = LearningLoop(
            gateway,
            judge_model=settings.judge_model,
            concurrency=settings.shadow_concurrency,
            escalation_window_s=settings.escalation_window_s,
            telemetry=tel,
        )
        gateway.learning = learning
        app.state.services = Services(
            settings=settings, gateway=gateway, learning=learning, telemetry=tel, limiter=limiter
        )
        tasks = start_loops(gateway, settings, from_store)
        log.info(
            "tiergate ready: policy %s, scorer %s, local %s",
            policy.policy.digest,
            deciding.version,
            settings.local_backend,
        )
        try:
            yield
        finally:
            await learning.drain()
            await stop_loops(tasks)
            await gateway.aclose()
            await http.aclose()
            await limiter.aclose()
            await authenticator.aclose()
            await asyncio.to_thread(store.close)
            await asyncio.to_thread(tel.shutdown)

    app = FastAPI(
        title="Tiergate",
        summary="Routes each OpenAI chat request to a local open model or a closed API.",
        version="0.1.0",
        lifespan=lifespan,
        # No /docs or /redoc: their pages load assets from a CDN, which a proxy on a closed
        # network cannot reach. /openapi.json stays (README, Endpoints).
        docs_url=None,
        redoc_url=None,
    )
    # The last added runs first: a caller without a valid key is refused before any span is
    # started, so anonymous traffic cannot add spans to the operator's traces, or to a trace
    # of its choosing through traceparent.
    app.add_middleware(RequestSpanMiddleware, telemetry=lambda: _telemetry(app))
    app.add_middleware(
        AuthMiddleware, authenticator=authenticator, max_body_bytes=settings.max_body_bytes
    )
    app.include_router(api_router)
    app.include_router(observability_router)
    install_error_handlers(app)
    return app


# The ASGI messages that start an answer with headers: an HTTP response's, and a websocket
# handshake's refusal or acceptance.
_ANSWER_STARTS = frozenset(
    {"http.response.start", "websocket.http.response.start", "websocket.accept"}
)


class RequestIds:
    """ASGI middleware: every HTTP answer carries an ``x-request-id``, and on the Messages front
    also as ``request-id``; so does the answer to a websocket handshake.

    The id is made here, before the key check, and kept as ``request.state.request_id``: the
    gateway serves and records the request under it (:func:`router.api.call_of`), and an answer
    sent without one (the key check's 401, /v1/models, /v1/feedback, an unknown path) gets it on
    the way out, so a client has an id to quote for every answer. Anthropic names its request id
    ``request-id``, and its SDK reads that header alone (a message's ``_request_id``, an
    ``APIStatusError``'s ``request_id``): without it both were None.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        """Pass through, giving the request its id and the response its headers."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        made = str(scope.setdefault("state", {}).setdefault("request_id", new_request_id()))
        anthropic = on_messages_front(str(scope.get("path", "")))

        async def sending(message: MutableMapping[str, Any]) -> None:
            # A websocket handshake's answer: its refusal (websocket.http.response.start) or
            # its acceptance (websocket.accept), each with headers.
            if message["type"] in _ANSWER_STARTS:
                headers = list(message.get("headers", ()))
                ids = [v for k, v in headers if k.lower() == b"x-request-id"]
                if not ids:
                    ids = [made.encode()]
                    headers.append((b"x-request-id", ids[0]))
                if anthropic and not any(k.lower() == b"request-id" for k, _ in headers):
                    headers.append((b"request-id", ids[0]))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, sending)


def _telemetry(app: FastAPI) -> Telemetry | None:
    svc = running(app)
    return svc.telemetry if svc is not None else None


def _stopping(app: FastAPI) -> bool:
    svc = running(app)
    return svc is not None and svc.gateway.stopping


class StoppedAtShutdown:
    """ASGI middleware: how a request the server stops at shutdown is answered.

    ``tiergate serve`` cancels the requests still running when ``TIERGATE_SHUTDOWN_TIMEOUT_S``
    is up (``stopping()`` is then true). uvicorn would log each cancellation as a traceback
    and answer a bare 500; here one whose response had not begun gets a retryable 503
    (:class:`ServerShuttingDownError`) and a stream already under way ends with that error as
    its last event. The gateway has recorded the request by then, as stopped by the server.
    """

    def __init__(self, app: Any, stopping: Callable[[], bool]) -> None:
        self.app = app
        self.stopping = stopping

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        """Pass through; answer a request cancelled at shutdown."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # The response's start, once sent, whether it ended, and the last part of its body that
        # was not a keep-alive (a stream's last event, which its error event is numbered after).
        sent: dict[str, Any] = {}

        async def sending(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                sent["start"] = message
            elif message["type"] == "http.response.body":
                body = message.get("body")
                if body and not body.startswith(b":"):
                    sent["last"] = body
                if not message.get("more_body"):
                    sent["ended"] = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except asyncio.CancelledError:
            start = sent.get("start")
            stream = start is not None and any(
                k.lower() == b"content-type" and v.startswith(b"text/event-stream")
                for k, v in start.get("headers", ())
            )
            if not self.stopping() or sent.get("ended") or (start is not None and not stream):
                raise
            task = asyncio.current_task()
            if task is not None:  # cancelled once, on purpose: what follows is the answer
                task.uncancel()
            exc = ServerShuttingDownError("the server is shutting down; retry the request")
            path = str(scope.get("path", ""))
            if start is None:
                await JSONResponse(
                    error_body(exc, path),
                    status_code=error_status(exc, on_messages_front(path)),
                    headers=exc.headers,
                )(scope, receive, send)
            else:
                body = stream_error(path, exc, sent.get("last", b""))
                await send({"type": "http.response.body", "body": body, "more_body": False})


def start_loops(
    gateway: Gateway, settings: Settings, from_store: str | None = None
) -> list[asyncio.Task[None]]:
    """Start every background loop the app runs: policy hot reload, threshold calibration,
    the retention purge and the model store watcher (``from_store``: the store version the
    scorer was loaded from, unless it did not load). The lifespan stops them at shutdown."""
    if isinstance(gateway.scorer, HeuristicScorer):
        from_store = None  # the watcher tries it again

    def serving(version: str | None, scorer: Scorer) -> None:
        gateway.telemetry.set_classifier(version, built_on(settings, version, scorer))

    serving(from_store, gateway.scorer)
    loops = [
        _watch_policy(gateway, settings.policy_reload_s),
        _calibrate(gateway, settings.calibrate_every_s),
        purge_loop(gateway.outcomes, lambda: gateway.policy.retention_days, settings.purge_every_s),
        watch_model_store(gateway, settings, profile_loader(settings), from_store, serving),
    ]
    return [asyncio.create_task(loop) for loop in loops]


async def stop_loops(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the loops :func:`start_loops` started and wait until each has ended."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _watch_policy(gateway: Gateway, every_s: float) -> None:
    if every_s <= 0:
        return
    while True:
        await asyncio.sleep(every_s)
        try:
            # Reading, parsing and checking a policy is CPU work: off the event loop.
            if await asyncio.to_thread(gateway.policies.check):
                gateway.recalibrate(gateway.last_scores)
                gateway.warn_unpriced()
                gateway.warn_output_limits()
        except Exception:  # the watcher must survive anything; the error is logged
            log.exception("policy watcher failed")


async def _calibrate(gateway: Gateway, every_s: float) -> None:
    if every_s <= 0:
        return
    while True:
        try:
            scores = await asyncio.to_thread(gateway.outcomes.recent_scores, None, 2000)
            gateway.recalibrate(scores)
        except StoreUnavailableError as exc:  # an outage the store reports itself: one line
            log.warning("threshold calibration skipped: %s", exc.message)
        except Exception:  # calibration must survive a store hiccup; the error is logged
            log.exception("threshold calibration failed")
        await asyncio.sleep(every_s)


def _error_response(request: Request, exc: TiergateError) -> JSONResponse:
    # Its own id here too: a 500 for an unexpected error is sent from outside RequestIds.
    made = getattr(request.state, "request_id", None)
    headers = exc.headers if made is None else {"x-request-id": str(made), **exc.headers}
    return ClientJSON(
        error_body(exc, request.url.path),
        status_code=error_status(exc, on_messages_front(request.url.path)),
        headers=headers,
    )


def install_error_handlers(app: FastAPI) -> None:
    """One place where every error becomes JSON: OpenAI's shape, or Anthropic's on its front
    (a request stopped at shutdown too: :class:`StoppedAtShutdown`), whose answers, errors
    included, also carry their id as Anthropic's ``request-id`` (:class:`RequestIds`)."""
    app.add_middleware(StoppedAtShutdown, stopping=lambda: _stopping(app))
    app.add_middleware(RequestIds)

    async def on_tiergate(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, TiergateError)
        return _error_response(request, exc)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        first: dict[str, Any] = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        return _error_response(request, BadRequestError(f"{where}: {first.get('msg', 'invalid')}"))

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        route = f"{request.method} {request.url.path[:200]}"  # the client's own, cut short
        if exc.status_code in (404, 405):  # an OpenAI endpoint Tiergate does not serve, say
            # A method the path does not take is one too: the SDK's chat.completions.list()
            # (GET /v1/chat/completions, stored completions) or models.delete(). As a 404 the
            # SDK raises NotFoundError for it, as for every other endpoint Tiergate lacks;
            # ``Allow`` still names the methods the path takes.
            allow = (exc.headers or {}).get("Allow")
            takes = f" ({request.url.path[:200]} takes {allow} only)" if allow else ""
            err: TiergateError = NotFoundError(
                f"Tiergate does not serve {route}{takes}: it serves POST "
                "/v1/chat/completions, /v1/messages and /v1/responses (GET /openapi.json "
                "lists every endpoint)",
                code="not_found",
                headers={"allow": allow} if allow else None,
            )
        else:
            err = TiergateError(f"{route}: {exc.detail}", code=f"http_{exc.status_code}")
            err.status_code = exc.status_code
            err.error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return _error_response(request, err)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        return _error_response(request, TiergateError("internal error"))

    app.add_exception_handler(TiergateError, on_tiergate)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
