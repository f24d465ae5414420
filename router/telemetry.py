"""Telemetry: OpenTelemetry traces and metrics, the Prometheus view of the metrics, request logs.

**Metrics** are recorded once, in :meth:`Telemetry.on_record` (the gateway's ``on_record`` hook,
called with every :class:`~router.outcomes.OutcomeRecord`), into OpenTelemetry instruments. The
``MeterProvider`` behind them has a Prometheus reader (always, for ``GET /metrics``) and, when
OTLP is configured, a periodic OTLP reader: the same instruments feed both.

**Traces** are off unless configured: ``TIERGATE_OTEL_ENABLED=true``, or (when that setting is
unset) ``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` /
``OTEL_TRACES_EXPORTER`` in the environment; ``OTEL_SDK_DISABLED=true`` wins over all. Off, no
tracer exists at all: the middleware passes requests straight through, the decision span is a
shared no-op object, and backends are not wrapped. On, each chat request gets a SERVER span
(parented on an incoming W3C ``traceparent``) with GenAI semantic-convention and ``tiergate.*``
attributes, a ``tiergate.decide`` child span and one ``chat {model}`` CLIENT span per backend
attempt (so a fallback shows as a failed attempt followed by the one that answered). Exporters,
sampling, batching and the resource come from the standard ``OTEL_*`` variables: those of the
environ an app is given, where it is given one (``create_app(environ=...)``).

Prompt text, completions and secrets never go into spans, metrics or the request log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    MutableMapping,
)
from typing import Any

from router.backends import Addressed, Backend, Completion, ModelLike, Usage
from router.backends.closed import provider_model, provider_of
from router.backends.local import Gate
from router.backends.native import NativeCaller, NativeRequest
from router.errors import ConfigError, MissingExtraError, TiergateError
from router.outcomes import Label, OutcomeRecord

log = logging.getLogger("tiergate.telemetry")
request_log = logging.getLogger("tiergate.request")

# The chat request's SERVER span, set by the middleware for the request's task(s).
_REQUEST_SPAN: contextvars.ContextVar[Any] = contextvars.ContextVar("tiergate_span", default=None)
# The provider of each model the request called, by policy name: its SERVER span names the
# provider of the model its record says served it, not of the last one called (a failed one).
_REQUEST_PROVIDERS: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "tiergate_providers", default=None
)
# The HTTP status the request's response went out with, once it has (the middleware's list).
_REQUEST_SENT: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar(
    "tiergate_sent", default=None
)

CHAT_PATH = "/v1/chat/completions"
#: The paths served through the gateway, each request inside its SERVER span.
SERVED_PATHS = frozenset({CHAT_PATH, "/v1/messages", "/v1/responses"})
_LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_QUEUE_BUCKETS_S = (0.001, 0.01, 0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
#: How long shutdown waits for the last export of spans and metrics (see Telemetry.shutdown).
#: A collector that answers takes them in well under a second.
SHUTDOWN_TIMEOUT_S = 3.0
# litellm's provider prefix -> the GenAI semantic conventions' gen_ai.provider.name, where the
# two differ (the rest, such as openai, anthropic, groq, deepseek, perplexity, are the same).
_PROVIDERS = {
    "gemini": "gcp.gemini",
    "vertex_ai": "gcp.vertex_ai",
    "vertex_ai_beta": "gcp.vertex_ai",
    "bedrock": "aws.bedrock",
    "azure": "azure.ai.openai",
    "azure_text": "azure.ai.openai",
    "azure_ai": "azure.ai.inference",
    "mistral": "mistral_ai",
    "xai": "x_ai",
    "watsonx": "ibm.watsonx.ai",
    "watsonx_text": "ibm.watsonx.ai",
    "cohere_chat": "cohere",
    "anthropic_text": "anthropic",
}


def outside_request() -> contextvars.Context:
    """A copy of the current context without the request's SERVER span, for work a request
    starts that outlives its answer (shadow judging): its calls stay spans in the request's
    trace, but change nothing the request's own span says (its provider, its parameters)."""
    context = contextvars.copy_context()
    context.run(_REQUEST_SPAN.set, None)
    context.run(_REQUEST_PROVIDERS.set, None)
    context.run(_REQUEST_SENT.set, None)
    return context


def tracing_configured(environ: Mapping[str, str], setting: bool | None) -> bool:
    """Whether traces are switched on (see module docstring for the rules)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if setting is not None:
        return setting
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def request_model(model: ModelLike) -> str:
    """``gen_ai.request.model`` for a model: the name its provider is asked for, without
    litellm's provider prefix (``anthropic/claude-...`` -> ``claude-...``: the provider is
    ``gen_ai.provider.name``); the policy name of one without a litellm name (local)."""
    return provider_model(model.litellm_model) if model.litellm_model else model.name


def provider_name(model: ModelLike) -> str:
    """``gen_ai.provider.name`` for a model: the litellm provider prefix, or llama.cpp locally."""
    if model.tier == "local":
        return "llama.cpp"
    prefix = provider_of(model.litellm_model or "")
    return _PROVIDERS.get(prefix, prefix)


# A call stopped from our side (its client left, the server stops, a cascade closes the local
# stream it escalates from): not the model's failure, so not an ERROR span.
_CANCELLED = (GeneratorExit, asyncio.CancelledError)


def _error_type(exc: BaseException) -> str:
    if isinstance(exc, TiergateError):
        return exc.code
    if isinstance(exc, _CANCELLED):
        return "cancelled"
    return type(exc).__qualname__


class _NoSpan:
    """The decision span when tracing is off: one shared object whose methods do nothing."""

    def __enter__(self) -> _NoSpan:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def decided(self, decision: Any, alias: str) -> None:
        """Record nothing."""


_NO_SPAN = _NoSpan()


class _DecideSpan:
    """``tiergate.decide``: the time spent on signals, score and policy, and what they chose."""

    def __init__(self, tracer: Any) -> None:
        self._cm = tracer.start_as_current_span("tiergate.decide")
        self._span: Any = None

    def __enter__(self) -> _DecideSpan:
        self._span = self._cm.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._cm.__exit__(*exc)

    def decided(self, decision: Any, alias: str) -> None:
        """Put the decision's explanation on the span. ``alias`` is the name the request asked
        for, as its record keeps it: a pinned model's name, where the decision's own ``alias``
        says ``auto`` (the alias whose threshold would have applied)."""
        attrs = {
            "tiergate.tier": decision.tier,
            "tiergate.model": decision.model,
            "tiergate.rule": decision.rule,
            "tiergate.score": float(decision.score),
            "tiergate.alias": alias,
        }
        if decision.threshold is not None:
            attrs["tiergate.threshold"] = float(decision.threshold)
        if decision.policy_version:
            attrs["tiergate.policy_version"] = decision.policy_version
        self._span.set_attributes(attrs)


class _SummedCounter:
    """A monotonic counter summed in process and observed by OpenTelemetry when it collects."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sums: dict[tuple[tuple[str, Any], ...], float] = {}

    def add(self, amount: float, attributes: Mapping[str, Any]) -> None:
        """Add ``amount`` to the series named by ``attributes`` (as ``Counter.add``)."""
        key = tuple(sorted(attributes.items()))
        with self._lock:
            self._sums[key] = self._sums.get(key, 0) + amount

    def observe(self, _options: Any) -> Iterable[Any]:
        """The cumulative value of every series (an observable counter's callback)."""
        from opentelemetry.metrics import Observation

        with self._lock:
            items = list(self._sums.items())
        return [Observation(value, dict(key)) for key, value in items]


class Telemetry:
    """Tracer, meter and the Prometheus registry of one app; built by :meth:`from_settings`."""

    def __init__(
        self,
        *,
        tracer_provider: Any = None,
        meter_provider: Any = None,
        prometheus_registry: Any = None,
        span_exporters: Iterable[Any] = (),
    ) -> None:
        self._tracer_provider = tracer_provider
        self._meter_provider = meter_provider
        self.registry = prometheus_registry
        self.tracing = tracer_provider is not None
        self._tracer: Any = tracer_provider.get_tracer("tiergate") if self.tracing else None
        self._propagator: Any = None
        if self.tracing:
            from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

            self._propagator = TraceContextTextMapPropagator()
        self._queue_depth: Callable[[], int] | None = None
        self._policy_failures: Callable[[], int] | None = None
        self._shadow: Callable[[], dict[str, int]] | None = None
        self._classifier: dict[str, str] | None = None
        self._instruments: dict[str, Any] = {}
        # Stopped at shutdown if the collector does not take the last spans in time.
        self._span_exporters = list(span_exporters)
        if meter_provider is not None:
            self._create_instruments(meter_provider.get_meter("tiergate"))

    # -- construction ----------------------------------------------------------------------

    @classmethod
    def off(cls) -> Telemetry:
        """No traces, no metrics."""
        return cls()

    @classmethod
    def from_settings(cls, settings: Any, environ: Mapping[str, str] | None = None) -> Telemetry:
        """Traces per the OTEL_* variables and ``otel_enabled``; metrics per ``metrics_enabled``."""
        env = os.environ if environ is None else environ
        for where in (env, os.environ):  # the SDK reads the process's own, whatever env says
            if where.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
                # The SDK would hand out no-op meters: /metrics would answer 200 with no series.
                log.info("OTEL_SDK_DISABLED=true: no traces and no /metrics")
                return cls.off()
        tracing = tracing_configured(env, settings.otel_enabled)
        if not tracing and not settings.metrics_enabled:
            return cls.off()
        try:
            import opentelemetry.sdk  # noqa: F401
        except ImportError:
            log.warning(
                "opentelemetry-sdk is not installed (a dependency of tiergate: reinstall it): "
                "no traces and no /metrics"
            )
            return cls.off()
        span_exporters = _span_exporters(env) if tracing else []
        readers = _otlp_metric_readers(env) if tracing else []
        return cls.build(
            span_exporters=span_exporters,
            metric_readers=readers,
            tracing=tracing,
            metrics=settings.metrics_enabled,
            environ=None if env is os.environ else env,
        )

    @classmethod
    def build(
        cls,
        *,
        span_exporters: Iterable[Any] = (),
        metric_readers: Iterable[Any] = (),
        tracing: bool = True,
        metrics: bool = True,
        batch: bool = True,
        environ: Mapping[str, str] | None = None,
    ) -> Telemetry:
        """Providers from explicit exporters and readers (tests: in-memory ones, no batching).

        ``metrics`` adds the Prometheus reader behind ``/metrics``; instruments are recorded
        whenever there is any reader (an OTLP one pushes them even with ``metrics`` off).
        The service name, resource, sampler and batching come from ``environ``'s ``OTEL_*``
        variables, or where it is None from the process's, as the SDK reads them."""
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        resource = Resource.create() if environ is None else _resource(environ)
        # None where the process names a service and ``environ`` does not (_resource).
        service = resource.attributes.get("service.name")
        if not service or str(service).startswith("unknown_service"):
            resource = resource.merge(Resource({"service.name": "tiergate"}))
        tracer_provider = None
        exporters = list(span_exporters) if tracing else []
        if tracing:
            sampler = None if environ is None else _sampler(environ)
            tracer_provider = TracerProvider(resource=resource, sampler=sampler)
            batching = {} if environ is None else _batching(environ)
            for exporter in exporters:
                processor = (
                    BatchSpanProcessor(exporter, **batching)
                    if batch
                    else SimpleSpanProcessor(exporter)
                )
                tracer_provider.add_span_processor(processor)
        meter_provider = None
        registry = None
        readers = list(metric_readers)
        if metrics:
            registry, prometheus_reader = _prometheus_reader()
            readers.append(prometheus_reader)
        if readers:
            meter_provider = MeterProvider(resource=resource, metric_readers=readers)
        return cls(
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            prometheus_registry=registry,
            span_exporters=exporters,
        )

    def _create_instruments(self, meter: Any) -> None:
        # Counters are summed here, per request, and handed to OpenTelemetry as observable
        # counters read at collection time: an SDK Counter.add() per request is a measurable
        # share of the closed hot path's CPU (bench/README.md). Histograms stay synchronous
        # (no observable histogram exists); the exported series are the same.
        histogram = meter.create_histogram

        def counter(name: str, *, unit: str, description: str) -> _SummedCounter:
            summed = _SummedCounter()
            meter.create_observable_counter(
                name, callbacks=[summed.observe], unit=unit, description=description
            )
            return summed

        self._instruments = {
            "requests": counter(
                "tiergate.requests", unit="{request}", description="Chat requests, by outcome."
            ),
            "duration": histogram(
                "tiergate.request.duration",
                unit="s",
                description="Chat request latency, until the last byte of the answer.",
                explicit_bucket_boundaries_advisory=_LATENCY_BUCKETS_S,
            ),
            "queue_wait": histogram(
                "tiergate.local.queue_wait",
                unit="s",
                description="Local tier: how long a request waited for the local model's slot.",
                explicit_bucket_boundaries_advisory=_QUEUE_BUCKETS_S,
            ),
            "ttft": histogram(
                "tiergate.time_to_first_token",
                unit="s",
                description="Streaming requests: time until the first content chunk.",
                explicit_bucket_boundaries_advisory=_TTFT_BUCKETS_S,
            ),
            "tokens": counter(
                "tiergate.tokens", unit="{token}", description="Tokens, input and output."
            ),
            # Money has no UCUM unit: the annotation {USD} names the currency to an OTLP
            # backend (``1`` said dimensionless) and leaves the Prometheus names as they are.
            "cost": counter(
                "tiergate.cost.usd", unit="{USD}", description="Spend in USD (closed + local)."
            ),
            "counterfactual": counter(
                "tiergate.counterfactual_cost.usd",
                unit="{USD}",
                description="What the same requests would have cost on the default closed model.",
            ),
            "fallbacks": counter(
                "tiergate.fallbacks", unit="{request}", description="Requests served by a fallback."
            ),
            "upstream_failures": counter(
                "tiergate.upstream.failures",
                unit="{call}",
                description="Model calls that failed before answering, fallen back from or not.",
            ),
            "cooldowns": counter(
                "tiergate.cooldowns",
                unit="{cooldown}",
                description="Cooldowns of models that kept failing (router.cooldown).",
            ),
            "shadow_cost": counter(
                "tiergate.shadow.cost.usd",
                unit="{USD}",
                description="Shadow judging spend in USD (the closed answer and the judge calls).",
            ),
        }
        meter.create_observable_counter(
            "tiergate.shadow.judgements",
            callbacks=[self._observe_shadow],
            unit="{judgement}",
            description="Shadow judgements of local answers, by outcome.",
        )
        meter.create_observable_gauge(
            "tiergate.local.queue_depth",
            callbacks=[self._observe_queue],
            unit="{request}",
            description="Local tier: requests generating plus waiting.",
        )

        meter.create_observable_gauge(
            "tiergate.classifier.info",
            callbacks=[self._observe_classifier],
            unit="",
            description="The classifier serving, always 1: its model store version and model.",
        )
        meter.create_observable_counter(
            "tiergate.policy.reload_failures",
            callbacks=[self._observe_policy_failures],
            unit="{reload}",
            description="Policy edits refused because the new file was invalid.",
        )

    def _observe_policy_failures(self, _options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        if self._policy_failures is None:
            return []
        return [Observation(self._policy_failures())]

    def watch_policy(self, holder: object) -> None:
        """Report ``holder.reload_failures`` (refused policy edits) as a counter."""
        self._policy_failures = lambda: int(getattr(holder, "reload_failures", 0))

    def _observe_shadow(self, _options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        if self._shadow is None:
            return []
        return [Observation(n, {"outcome": k}) for k, n in self._shadow().items()]

    def _observe_classifier(self, _options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        return [] if self._classifier is None else [Observation(1, self._classifier)]

    def set_classifier(self, version: str | None, model: str) -> None:
        """Name the classifier now serving (``tiergate_classifier_info``): the model store
        ``version`` it was loaded from (None: not from a store) and the ``model`` it is built
        on. The proxy sets it at start and on each swap of a promoted or rolled-back version."""
        self._classifier = {"version": version or "", "model": model}

    def watch_learning(self, loop: object) -> None:
        """Report ``loop``'s shadow judgements (labelled, failed, skipped) as a counter."""
        self._shadow = lambda: {
            outcome: int(getattr(loop, f"shadow_{outcome}", 0))
            for outcome in ("labelled", "failed", "skipped")
        }

    def on_label(self, label: Label) -> None:
        """Count what producing ``label`` cost (shadow judging), by tenant."""
        if self._instruments and label.cost_usd:
            self._instruments["shadow_cost"].add(label.cost_usd, {"tenant": label.tenant})

    def _observe_queue(self, _options: Any) -> Iterable[Any]:
        from opentelemetry.metrics import Observation

        if self._queue_depth is None:
            return []
        return [Observation(self._queue_depth())]

    def watch_queue(self, gate: Gate | None) -> None:
        """Report ``gate.depth`` (the local queue) as the queue-depth gauge, and each caller's
        wait for a slot in the queue-wait histogram."""
        if gate is not None:
            self._queue_depth = lambda: gate.depth
            if self._instruments:
                gate.on_wait = self._instruments["queue_wait"].record

    @property
    def metrics(self) -> bool:
        """Whether metrics are recorded (and ``/metrics`` has something to show)."""
        return bool(self._instruments)

    # -- the per-request hook --------------------------------------------------------------

    def on_record(self, record: OutcomeRecord) -> None:
        """Metrics, request-span attributes and the request log line for one outcome record."""
        if self._instruments:
            self._count(record)
        span = _REQUEST_SPAN.get()
        if span is not None:
            _annotate_request_span(span, record, _REQUEST_SENT.get())
        if request_log.isEnabledFor(logging.INFO):
            request_log.info("request", extra=_log_fields(record, span))

    def _count(self, record: OutcomeRecord) -> None:
        ins = self._instruments
        tier, model = record.tier or "none", record.model or "none"
        attrs = {"tier": tier, "model": model}
        outcome = {**attrs, "status": record.status, "tenant": record.tenant}
        if record.error_type:
            outcome["error_type"] = record.error_type
        ins["requests"].add(1, outcome)
        ins["duration"].record(record.latency_ms / 1000.0, {**attrs, "status": record.status})
        if record.ttft_ms is not None:
            ins["ttft"].record(record.ttft_ms / 1000.0, attrs)
        cost = record.cost_usd
        for part, prompt, completion, part_cost in _parts(record):
            if prompt:
                ins["tokens"].add(prompt, {**part, "type": "input"})
            if completion:
                ins["tokens"].add(completion, {**part, "type": "output"})
            if part != attrs:
                ins["cost"].add(part_cost, {**part, "tenant": record.tenant})
                cost -= part_cost
        ins["cost"].add(cost, {**attrs, "tenant": record.tenant})
        ins["counterfactual"].add(record.counterfactual_cost_usd, {"tenant": record.tenant})
        if record.fallback:
            ins["fallbacks"].add(1, {"fallback": record.fallback, "model": model})

    def on_cooldown(self, model: ModelLike, error: TiergateError) -> None:
        """Count a cooldown a model's failures started (router.cooldown)."""
        if self._instruments:
            attrs = {"model": model.name, "error_type": error.code}
            self._instruments["cooldowns"].add(1, attrs)

    def on_attempt_failed(self, model: ModelLike, error: TiergateError) -> None:
        """Count a model call that failed before it answered, by the model that failed.

        A request that a fallback then served is counted by ``on_record`` under the model that
        answered: this is where the one that failed shows, which is what an operator looks for
        when a provider is down."""
        if self._instruments:
            attrs = {"tier": model.tier, "model": model.name, "error_type": error.code}
            self._instruments["upstream_failures"].add(1, attrs)

    # -- spans -----------------------------------------------------------------------------

    def decide_span(self) -> _NoSpan | _DecideSpan:
        """The ``tiergate.decide`` span (a shared no-op when tracing is off)."""
        if self._tracer is None:
            return _NO_SPAN
        return _DecideSpan(self._tracer)

    def wrap_backend(self, backend: Backend) -> Backend:
        """``backend`` with a CLIENT span per call when tracing is on; unchanged when off."""
        if self._tracer is None:
            return backend
        return TracedBackend(backend, self._tracer)

    def wrap_native(self, native: NativeCaller) -> NativeCaller:
        """``native`` (calls in a front's own API) with a CLIENT span per call, as
        :meth:`wrap_backend`; unchanged when tracing is off."""
        if self._tracer is None:
            return native
        return TracedNative(native, self._tracer)

    async def serve_traced(self, app: Any, scope: Any, receive: Any, send: Any) -> None:
        """Run one request, from any front, inside its SERVER span (see
        :class:`RequestSpanMiddleware`)."""
        from opentelemetry import context, trace

        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        parent = self._propagator.extract(carrier)
        span = self._tracer.start_span(
            "chat",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={
                "gen_ai.operation.name": "chat",
                "http.request.method": scope.get("method", ""),
                "http.route": scope.get("path", CHAT_PATH),
                "url.path": scope.get("path", ""),
            },
        )
        token = context.attach(trace.set_span_in_context(span, parent))
        span_token = _REQUEST_SPAN.set(span)
        providers_token = _REQUEST_PROVIDERS.set({})
        sent: list[int] = []
        sent_token = _REQUEST_SENT.set(sent)

        async def sending(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                sent.append(int(message["status"]))
            await send(message)

        try:
            await app(scope, receive, sending)
        except BaseException as exc:
            span.record_exception(exc)
            span.set_status(trace.StatusCode.ERROR, type(exc).__qualname__)
            raise
        finally:
            if sent:
                # The status on the wire: a stream that failed or was left after it started
                # went out as 200, whatever its record's status (502, 499) says went wrong.
                span.set_attribute("http.response.status_code", sent[0])
            span.end()
            _REQUEST_SENT.reset(sent_token)
            _REQUEST_PROVIDERS.reset(providers_token)
            _REQUEST_SPAN.reset(span_token)
            context.detach(token)

    # -- Prometheus and shutdown -----------------------------------------------------------

    def prometheus_text(self) -> tuple[bytes, str]:
        """The metrics in the Prometheus text exposition format, and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), str(CONTENT_TYPE_LATEST)

    def shutdown(self, timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
        """Flush and stop exporters (spans and OTLP metrics still buffered are sent), within
        ``timeout_s``.

        The SDK's own bounds are 30 s per provider, plus an export's timeout (10 s) and its
        retries: with a collector that does not answer, a pod's shutdown overran its grace
        period and was killed. Past ``timeout_s`` what the collector has not taken is dropped,
        said in one warning, and the span exporters are stopped so no retry goes on."""
        deadline = time.monotonic() + timeout_s
        stopping = []
        if self._tracer_provider is not None:
            stopping.append(_stop_in_thread(self._tracer_provider.shutdown))
        meters = self._meter_provider
        if meters is not None:  # it takes a timeout; a thread lets it run beside the tracer's
            stopping.append(_stop_in_thread(lambda: meters.shutdown(timeout_s * 1000)))
        for thread in stopping:
            thread.join(max(deadline - time.monotonic(), 0.0))
        if any(thread.is_alive() for thread in stopping):
            log.warning(
                "telemetry: the OTLP collector took no final export within %.0f s "
                "(unreachable?): spans and metrics not yet sent are dropped",
                timeout_s,
            )
            for exporter in self._span_exporters:  # ends the retries: the rest fail at once
                _stop_in_thread(exporter.shutdown)


def _stop_in_thread(stop: Callable[[], object]) -> threading.Thread:
    """Run ``stop`` on a daemon thread of its own, so shutdown can stop waiting for it."""

    def run() -> None:
        try:
            stop()
        except Exception:  # shutdown must finish; a failed final export is logged
            log.exception("telemetry shutdown failed")

    thread = threading.Thread(target=run, name="tiergate-telemetry-shutdown", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def _otel_extra() -> Iterator[None]:
    """OTLP export needs the ``otel`` extra; without it, one line that says so."""
    try:
        yield
    except ImportError as exc:
        raise MissingExtraError("OTLP export (OTEL_* variables)", "otel") from exc


def _check_protocol(env: Mapping[str, str], signal: str) -> None:
    """The exporters speak OTLP over HTTP/protobuf only. A collector's gRPC port answers them
    with an HTTP/2 frame and every batch is lost, so another protocol stops the start."""
    for name in (f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = env.get(name, "").strip()
        if not value:
            continue
        if value.lower() != "http/protobuf":
            raise ConfigError(
                f"{name}={value}: Tiergate exports OTLP over http/protobuf only; point "
                "OTEL_EXPORTER_OTLP_ENDPOINT at the collector's OTLP/HTTP port (4318 by default) "
                f"and set {name}=http/protobuf"
            )
        return  # the signal's own setting wins over the general one


def _span_exporters(env: Mapping[str, str]) -> list[Any]:
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",") if n.strip()]
    exporters: list[Any] = []
    for name in names:
        if name == "otlp":
            with _otel_extra():
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporters.append(OTLPSpanExporter(**_otlp_options(env, "TRACES")))
        elif name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            exporters.append(ConsoleSpanExporter())
        elif name != "none":
            log.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console, none)", name)
    return exporters


def _otlp_metric_readers(env: Mapping[str, str]) -> list[Any]:
    names = [n.strip() for n in env.get("OTEL_METRICS_EXPORTER", "otlp").split(",") if n.strip()]
    if "otlp" not in names:
        return []
    with _otel_extra():
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    exporter = OTLPMetricExporter(**_otlp_options(env, "METRICS"))
    return [
        PeriodicExportingMetricReader(
            exporter,
            export_interval_millis=_number(env, "OTEL_METRIC_EXPORT_INTERVAL", 60_000),
            export_timeout_millis=_number(env, "OTEL_METRIC_EXPORT_TIMEOUT", 30_000),
        )
    ]


def _otlp_options(env: Mapping[str, str], signal: str) -> dict[str, Any]:
    """The OTLP exporter's settings for ``signal`` (TRACES, METRICS) as ``env`` gives them: the
    signal's own ``OTEL_EXPORTER_OTLP_{signal}_*`` variable, else the general one, else the
    SDK's default. Passed to the exporter explicitly, because it reads what it is not given
    from ``os.environ``: an app built with another environ exported where it did not say, with
    credentials it was not given."""
    from opentelemetry.exporter.otlp.proto.http import Compression

    _check_protocol(env, signal)
    endpoint = env.get(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT", "").strip()
    if not endpoint:
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip() or "http://localhost:4318"
        endpoint = f"{base.rstrip('/')}/v1/{signal.lower()}"
    name, compression = _otlp_setting(env, signal, "COMPRESSION")
    try:
        compressed = Compression((compression or "none").lower())
    except ValueError:
        raise ConfigError(f"{name}={compression}: use gzip, deflate or none") from None
    name = _otlp_setting(env, signal, "TIMEOUT")[0]
    options: dict[str, Any] = {
        "endpoint": endpoint,
        "headers": _otlp_headers(env, signal),
        "timeout": _number(env, name, 10),  # seconds, as the SDK reads it
        "compression": compressed,
        "certificate_file": _otlp_setting(env, signal, "CERTIFICATE")[1] or None,
        "client_key_file": _otlp_setting(env, signal, "CLIENT_KEY")[1] or None,
        "client_certificate_file": _otlp_setting(env, signal, "CLIENT_CERTIFICATE")[1] or None,
    }
    # What the exporter still takes from os.environ where ``env`` names nothing: headers it
    # adds to those given, and TLS files. A session of our own sends neither.
    if env is not os.environ:
        extra = set(_otlp_headers(os.environ, signal)) - set(options["headers"])
        tls = _otlp_tls(env, signal)
        if extra or tls != _otlp_tls(os.environ, signal):
            options["session"] = _governed_session(extra, tls)
    return options


def _otlp_setting(env: Mapping[str, str], signal: str, setting: str) -> tuple[str, str]:
    """The variable that gives ``setting`` for ``signal`` and its value ("" where none does)."""
    for name in (f"OTEL_EXPORTER_OTLP_{signal}_{setting}", f"OTEL_EXPORTER_OTLP_{setting}"):
        value = env.get(name, "").strip()
        if value:
            return name, value
    return f"OTEL_EXPORTER_OTLP_{setting}", ""


def _otlp_headers(env: Mapping[str, str], signal: str) -> dict[str, str]:
    from opentelemetry.util.re import parse_env_headers

    value = _otlp_setting(env, signal, "HEADERS")[1]
    return {k.lower(): v for k, v in parse_env_headers(value, liberal=True).items()}


def _otlp_tls(env: Mapping[str, str], signal: str) -> tuple[str | bool, Any]:
    """``requests``' verify and cert for the collector, as the exporter makes them."""
    ca = _otlp_setting(env, signal, "CERTIFICATE")[1]
    key = _otlp_setting(env, signal, "CLIENT_KEY")[1]
    cert = _otlp_setting(env, signal, "CLIENT_CERTIFICATE")[1]
    return ca or True, ((cert, key) if cert and key else cert or None)


def _governed_session(drop: Iterable[str], tls: tuple[str | bool, Any]) -> Any:
    """A ``requests`` session that sends no header named in ``drop`` and uses ``tls`` (verify,
    cert) whatever the exporter set from ``os.environ``."""
    import requests

    dropped = frozenset(drop)
    verify, cert = tls

    class GovernedSession(requests.Session):
        def prepare_request(self, request: Any) -> Any:
            prepared = super().prepare_request(request)
            for name in dropped:
                prepared.headers.pop(name, None)
            return prepared

        def merge_environment_settings(self, *args: Any, **kwargs: Any) -> Any:
            settings = super().merge_environment_settings(*args, **kwargs)
            settings["verify"], settings["cert"] = verify, cert
            return settings

    return GovernedSession()


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    """The number ``env`` gives ``name``, ``default`` where it gives none."""
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0:
        raise ConfigError(f"{name}={value}: it must be a number above 0")
    return number


# An app given an environ of its own (create_app(environ=...)) reads the SDK's standard
# settings from it here: the SDK reads them from os.environ only, and would configure the
# app's service name, sampling and batching from the process's. Unset, or not understood,
# each takes the SDK's default, with the warning the SDK gives.
_SAMPLERS = ("always_on", "always_off", "traceidratio")
#: OTEL_BSP_* -> BatchSpanProcessor's argument, and the SDK's default.
_BATCHING = {
    "OTEL_BSP_SCHEDULE_DELAY": ("schedule_delay_millis", 5000),
    "OTEL_BSP_MAX_QUEUE_SIZE": ("max_queue_size", 2048),
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": ("max_export_batch_size", 512),
    "OTEL_BSP_EXPORT_TIMEOUT": ("export_timeout_millis", 30000),
}


def _resource(env: Mapping[str, str]) -> Any:
    """The SDK's default resource (its own attributes, the instance id) with ``env``'s
    ``OTEL_RESOURCE_ATTRIBUTES`` and ``OTEL_SERVICE_NAME``, none of the process's: without a
    ``service.name`` where the process names one and ``env`` does not (``build`` names it)."""
    from urllib.parse import unquote

    from opentelemetry.sdk.resources import OTELResourceDetector, Resource

    process = OTELResourceDetector().detect().attributes
    base = {k: v for k, v in Resource.create().attributes.items() if k not in process}
    given: dict[str, str] = {}
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if key.strip() and sep:
            given[key.strip()] = unquote(value.strip())
        elif item.strip():
            log.warning("OTEL_RESOURCE_ATTRIBUTES: %r is not key=value: left out", item)
    service = env.get("OTEL_SERVICE_NAME", "").strip()
    if service:
        given["service.name"] = service
    return Resource({**base, **given})


def _sampler(env: Mapping[str, str]) -> Any:
    """The sampler ``env``'s ``OTEL_TRACES_SAMPLER`` (and ``_ARG``) names, as the SDK reads it."""
    from opentelemetry.sdk.trace import sampling

    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or "parentbased_always_on"
    root = name.removeprefix("parentbased_")
    if root not in _SAMPLERS:
        log.warning("OTEL_TRACES_SAMPLER=%s is not a sampler: parentbased_always_on", name)
        name, root = "parentbased_always_on", "always_on"
    chosen: Any = {"always_on": sampling.ALWAYS_ON, "always_off": sampling.ALWAYS_OFF}.get(root)
    if chosen is None:
        value = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
        try:
            chosen = sampling.TraceIdRatioBased(float(value))
        except ValueError:
            log.warning("OTEL_TRACES_SAMPLER_ARG=%s is not a rate from 0 to 1: 1.0", value)
            chosen = sampling.TraceIdRatioBased(1.0)
    return sampling.ParentBased(chosen) if name != root else chosen


def _batching(env: Mapping[str, str]) -> dict[str, Any]:
    """BatchSpanProcessor's arguments from ``env``'s ``OTEL_BSP_*``."""
    arguments: dict[str, Any] = {}
    for name, (argument, default) in _BATCHING.items():
        value = env.get(name, "").strip()
        try:
            arguments[argument] = int(value) if value else default
        except ValueError:
            log.warning("%s=%s is not a whole number: %d", name, value, default)
            arguments[argument] = default
    return arguments


def _prometheus_reader() -> tuple[Any, Any]:
    """A Prometheus reader on a registry of this app's own, not the process-wide one, so two
    apps in one process (tests, embedding) never mix their metrics."""
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from prometheus_client import REGISTRY, CollectorRegistry

    registry = CollectorRegistry(auto_describe=False)
    try:
        reader = PrometheusMetricReader(registry=registry)
    except TypeError:  # exporters before 0.5x always register on the global REGISTRY
        reader = PrometheusMetricReader()
        REGISTRY.unregister(reader._collector)
        registry.register(reader._collector)
    return registry, reader


class RequestSpanMiddleware:
    """ASGI middleware: a request to a served path (chat, Messages, Responses) runs inside its
    SERVER span when tracing is on.

    A pure ASGI middleware (not ``BaseHTTPMiddleware``) so the span covers a streamed answer to
    its last byte, and so the off path is two attribute reads.
    """

    def __init__(self, app: Any, telemetry: Callable[[], Telemetry | None]) -> None:
        self.app = app
        self.telemetry = telemetry

    async def __call__(self, scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
        """Pass through, or serve inside a span."""
        telemetry = self.telemetry()
        if (
            telemetry is None
            or not telemetry.tracing
            or scope["type"] != "http"
            or scope.get("path") not in SERVED_PATHS
        ):
            await self.app(scope, receive, send)
            return
        await telemetry.serve_traced(self.app, scope, receive, send)


def _parts(record: OutcomeRecord) -> list[tuple[dict[str, str], int, int, float]]:
    """(labels, prompt tokens, completion tokens, cost) of each model call a record charges:
    the answer's, and the local answer an escalated cascade discarded, counted under the local
    model that made it rather than the closed one that answered."""
    attrs = {"tier": record.tier or "none", "model": record.model or "none"}
    parts = [(attrs, record.prompt_tokens, record.completion_tokens, record.cost_usd)]
    cascade = record.cascade or {}
    if "local_cost_usd" in cascade:
        local = {"tier": "local", "model": str(cascade.get("local_model") or "none")}
        prompt, completion = (
            cascade.get("local_prompt_tokens"),
            cascade.get("local_completion_tokens"),
        )
        parts.append((local, int(prompt or 0), int(completion or 0), cascade["local_cost_usd"]))
    return parts


def _annotate_request_span(span: Any, record: OutcomeRecord, sent: list[int] | None) -> None:
    attrs: dict[str, Any] = {
        "gen_ai.request.model": record.alias or "",
        "gen_ai.usage.input_tokens": record.prompt_tokens,
        "gen_ai.usage.output_tokens": record.completion_tokens,
        "http.response.status_code": record.http_status,
        # The record's own status, kept when the middleware sets the one sent (a stream that
        # failed after it started went out as 200): the trace says 502 where the record does.
        "tiergate.http_status": record.http_status,
        "tiergate.request_id": record.id,
        "tiergate.tenant": record.tenant,
        "tiergate.status": record.status,
        "tiergate.stream": record.stream,
        "tiergate.cost_usd": record.cost_usd,
        "tiergate.counterfactual_cost_usd": record.counterfactual_cost_usd,
    }
    provider = (_REQUEST_PROVIDERS.get() or {}).get(record.model or "")
    # A response model only where one answered: not the model a request every model failed
    # was routed to, nor one its client left before a token came.
    answered = record.status == "ok" or record.completion_tokens > 0
    optional = {
        "gen_ai.provider.name": provider,
        "gen_ai.system": provider,
        "gen_ai.response.model": record.model if answered else None,
        "tiergate.tier": record.tier,
        "tiergate.model": record.model,
        "tiergate.rule": record.rule,
        "tiergate.score": record.score,
        "tiergate.threshold": record.threshold,
        "tiergate.policy_version": record.policy_version,
        "tiergate.model_version": record.model_version,
        "tiergate.fallback": record.fallback,
        "tiergate.ttft_ms": record.ttft_ms,
        "error.type": record.error_type,
    }
    attrs.update({k: v for k, v in optional.items() if v is not None})
    span.set_attributes(attrs)
    # Named by the alias once decided: a refused name (an unknown model) is the client's own
    # text, kept in gen_ai.request.model, not in the span's name.
    span.update_name(f"chat {record.alias}" if record.alias and record.rule else "chat")
    # ERROR for a server's failure (5xx), and for a response that went out as a success but
    # could not be sent whole (a stream cut or rate-limited after it started: the client got
    # 200 and an error event, whatever the record's status): the HTTP conventions' "another
    # error". A 4xx answered as one is the client's, and a client that left is not a failure.
    started = bool(sent and sent[0] < 400)
    if (record.status != "ok" and record.http_status >= 500) or (
        record.status == "error" and started
    ):
        from opentelemetry.trace import StatusCode

        span.set_status(StatusCode.ERROR, record.error_type or record.status)


def _log_fields(record: OutcomeRecord, span: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "request_id": record.id,
        "tenant": record.tenant,
        "alias": record.alias,
        "tier": record.tier,
        "model": record.model,
        "rule": record.rule,
        "status": record.status,
        "http_status": record.http_status,
        "latency_ms": round(record.latency_ms, 2),
        "prompt_tokens": record.prompt_tokens,
        "completion_tokens": record.completion_tokens,
        "cost_usd": record.cost_usd,
    }
    if record.ttft_ms is not None:
        fields["ttft_ms"] = round(record.ttft_ms, 2)
    if record.fallback:
        fields["fallback"] = record.fallback
    if record.error_type:
        fields["error_type"] = record.error_type
    if span is not None:
        context = span.get_span_context()
        fields["trace_id"] = f"{context.trace_id:032x}"
        fields["span_id"] = f"{context.span_id:016x}"
    return fields


class TracedBackend:
    """A backend whose calls each get a ``chat {model}`` CLIENT span (tracing on only)."""

    def __init__(self, inner: Backend, tracer: Any) -> None:
        self.inner = inner
        self._tracer = tracer
        self._where = _server_of(inner)

    def __getattr__(self, name: str) -> Any:
        # Everything else (the local queue's gate, load state...) is the wrapped backend's.
        return getattr(self.inner, name)

    def unavailable_reason(self, model: ModelLike) -> str | None:
        """The wrapped backend's answer."""
        return self.inner.unavailable_reason(model)

    async def aclose(self) -> None:
        """Close the wrapped backend."""
        await self.inner.aclose()

    async def complete(
        self, model: ModelLike, body: dict[str, Any], usage: Usage | None = None
    ) -> Completion:
        """Call the wrapped backend inside a CLIENT span."""
        span = _client_span(self._tracer, model, body, self._where, stream=False)
        return await _traced_complete(span, self.inner.complete(model, body, usage))

    def stream(
        self, model: ModelLike, body: dict[str, Any], usage: Usage
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream from the wrapped backend; the span ends with the stream."""
        return _traced_stream(
            lambda: _client_span(self._tracer, model, body, self._where, stream=True),
            lambda: self.inner.stream(model, body, usage),
            usage,
        )


class TracedNative:
    """The native backend (a front's own API, :mod:`router.backends.native`) with a
    ``chat {model}`` CLIENT span per call, as :class:`TracedBackend` (tracing on only)."""

    def __init__(self, inner: NativeCaller, tracer: Any) -> None:
        self.inner = inner
        self._tracer = tracer
        self._where = _server_of(inner)

    async def complete(self, model: ModelLike, native: NativeRequest, usage: Usage) -> Completion:
        """Call the wrapped backend inside a CLIENT span."""
        span = _client_span(self._tracer, model, native.body, self._where, stream=False)
        return await _traced_complete(span, self.inner.complete(model, native, usage))

    def stream(
        self, model: ModelLike, native: NativeRequest, usage: Usage
    ) -> AsyncIterator[dict[str, Any]]:
        """Stream from the wrapped backend; the span ends with the stream."""
        return _traced_stream(
            lambda: _client_span(self._tracer, model, native.body, self._where, stream=True),
            lambda: self.inner.stream(model, native, usage),
            usage,
        )


#: The port of a URL that names none, by scheme.
_DEFAULT_PORTS = {"http": 80, "https": 443}

_Where = Callable[[ModelLike], str | None] | None


def _server_of(backend: object) -> _Where:
    """How to find the URL a backend calls for a model, where it can say (:class:`Addressed`)."""
    return backend.server_url if isinstance(backend, Addressed) else None


@functools.lru_cache(maxsize=256)
def _server_attributes(url: str) -> tuple[tuple[str, str | int], ...]:
    """``server.address`` and ``server.port`` of ``url``: its host and port, never its user
    info (credentials), path or query (a key some gateways carry there); () where it has no
    host or its port is not a number."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        host, port = parts.hostname, parts.port
    except ValueError:
        return ()
    if not host:
        return ()
    port = port or _DEFAULT_PORTS.get(parts.scheme.lower())
    return (("server.address", host),) + ((("server.port", port),) if port else ())


def _client_span(
    tracer: Any, model: ModelLike, body: Mapping[str, Any], where: _Where, stream: bool
) -> Any:
    """A backend attempt's CLIENT span; its request parameters go on the request span too."""
    from opentelemetry.trace import SpanKind

    provider = provider_name(model)
    asked = request_model(model)
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": "chat",
        "gen_ai.provider.name": provider,
        "gen_ai.system": provider,
        "gen_ai.request.model": asked,
        "tiergate.tier": model.tier,
        "tiergate.model": model.name,
        "tiergate.stream": stream,
    }
    url = where(model) if where is not None else None
    if url:
        attrs.update(_server_attributes(url))
    request_attrs = _request_params(body)
    attrs.update(request_attrs)
    parent = _REQUEST_SPAN.get()
    if parent is not None:
        parent.set_attributes(request_attrs)
        providers = _REQUEST_PROVIDERS.get()
        if providers is not None:
            providers[model.name] = provider
    return tracer.start_span(f"chat {asked}", kind=SpanKind.CLIENT, attributes=attrs)


async def _traced_complete(span: Any, call: Awaitable[Completion]) -> Completion:
    try:
        result = await call
    except BaseException as exc:
        _end_failed(span, exc)
        raise
    reasons = [
        str(c.get("finish_reason"))
        for c in result.body.get("choices") or []
        if c.get("finish_reason")
    ]
    _end_ok(span, result.usage, result.body.get("model"), result.body.get("id"), reasons)
    return result


async def _traced_stream(
    start: Callable[[], Any], open_source: Callable[[], AsyncIterator[dict[str, Any]]], usage: Usage
) -> AsyncIterator[dict[str, Any]]:
    span = start()
    source = open_source()
    reasons: list[str] = []
    response_model = response_id = None
    started = time.perf_counter()
    first = True
    try:
        async for chunk in source:
            if first:
                first = False
                span.set_attribute(
                    "tiergate.time_to_first_chunk_ms", (time.perf_counter() - started) * 1e3
                )
            response_model = chunk.get("model") or response_model
            response_id = chunk.get("id") or response_id
            for choice in chunk.get("choices") or []:
                if choice.get("finish_reason"):
                    reasons.append(str(choice["finish_reason"]))
            yield chunk
    except BaseException as exc:
        _end_failed(span, exc)
        raise
    finally:
        aclose = getattr(source, "aclose", None)
        if aclose is not None:
            await aclose()
    _end_ok(span, usage, response_model, response_id, reasons)


def _request_params(body: Mapping[str, Any]) -> dict[str, Any]:
    attrs: dict[str, Any] = {}
    # Chat's two names, and the Responses API's (a native call's body is the front's own).
    max_tokens = (
        body.get("max_completion_tokens") or body.get("max_tokens") or body.get("max_output_tokens")
    )
    if isinstance(max_tokens, int):
        attrs["gen_ai.request.max_tokens"] = max_tokens
    for key in ("temperature", "top_p", "frequency_penalty", "presence_penalty"):
        value = body.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            attrs[f"gen_ai.request.{key}"] = float(value)
    if isinstance(body.get("seed"), int):
        attrs["gen_ai.request.seed"] = body["seed"]
    choices = body.get("n")
    if isinstance(choices, int) and not isinstance(choices, bool) and choices != 1:
        # Required by the GenAI conventions where the request asks for other than one.
        attrs["gen_ai.request.choice.count"] = choices
    return attrs


def _end_ok(
    span: Any, usage: Usage, response_model: Any, response_id: Any, reasons: list[str]
) -> None:
    attrs: dict[str, Any] = {
        "gen_ai.usage.input_tokens": usage.prompt_tokens,
        "gen_ai.usage.output_tokens": usage.completion_tokens,
    }
    # The provider's name for the model, kept by the backend (the answer names the policy's to
    # the client); the answer's own where none was kept (the in-process model's: the policy's).
    response_model = usage.response_model or response_model
    if response_model:
        attrs["gen_ai.response.model"] = str(response_model)
    if response_id:
        attrs["gen_ai.response.id"] = str(response_id)
    if reasons:
        attrs["gen_ai.response.finish_reasons"] = reasons
        parent = _REQUEST_SPAN.get()
        if parent is not None:
            parent.set_attribute("gen_ai.response.finish_reasons", reasons)
    span.set_attributes(attrs)
    span.end()


def _end_failed(span: Any, exc: BaseException) -> None:
    from opentelemetry.trace import StatusCode

    kind = _error_type(exc)
    span.set_attribute("error.type", kind)
    if not isinstance(exc, _CANCELLED):
        span.set_status(StatusCode.ERROR, kind)
    span.end()
