"""CPU cost of Tiergate's telemetry per request, isolated from the rest of the app.

Runs the per-request telemetry path (the request-span middleware, the decision span, a backend
call through ``wrap_backend`` and the ``on_record`` hook) around a no-op request with telemetry
off, metrics only (the default), and metrics plus traces to a dropping exporter, and prints the
best of several repeats of each (on a shared machine the minimum is the least noisy estimate).

    .venv/bin/python -m studies.telemetry_overhead
"""

from __future__ import annotations

import asyncio
import time
import types
from collections.abc import Sequence
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

from router.backends import Completion, Usage
from router.outcomes import OutcomeRecord
from router.telemetry import RequestSpanMiddleware, Telemetry


class _Drop(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


class _Backend:
    def unavailable_reason(self, model: Any) -> str | None:
        return None

    async def complete(self, model: Any, body: dict[str, Any], usage: Any = None) -> Completion:
        answer = {"id": "x", "model": "gpt-4o", "choices": [{"finish_reason": "stop"}]}
        return Completion(answer, Usage(11, 7))

    async def aclose(self) -> None:
        return None


MODEL = types.SimpleNamespace(name="gpt-4o", tier="closed", litellm_model="openai/gpt-4o")
DECISION = types.SimpleNamespace(
    tier="closed",
    model="gpt-4o",
    rule="default",
    score=0.9,
    alias="auto",
    threshold=0.5,
    policy_version="abc",
)
RECORD = OutcomeRecord(
    id="req_1",
    ts=time.time(),
    tenant="default",
    alias="auto",
    tier="closed",
    model="gpt-4o",
    rule="default",
    score=0.9,
    threshold=0.5,
    policy_version="abc",
    model_version="m1",
    status="ok",
    http_status=200,
    stream=False,
    latency_ms=12.0,
    prompt_tokens=11,
    completion_tokens=7,
    cost_usd=1e-4,
    counterfactual_cost_usd=1e-4,
)
BODY = {"model": "auto", "messages": [], "max_tokens": 50, "temperature": 0.3}
SCOPE = {
    "type": "http",
    "method": "POST",
    "path": "/v1/chat/completions",
    "headers": [(b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")],
}


def _request(telemetry: Telemetry) -> RequestSpanMiddleware:
    backend = telemetry.wrap_backend(_Backend())

    async def app(scope: Any, receive: Any, send: Any) -> None:
        with telemetry.decide_span() as span:
            span.decided(DECISION, DECISION.alias)
        await backend.complete(MODEL, BODY)
        telemetry.on_record(RECORD)

    return RequestSpanMiddleware(app, lambda: telemetry)


async def _best(telemetry: Telemetry, n: int) -> float:
    request = _request(telemetry)
    best = float("inf")
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(n):
            await request(SCOPE, None, None)
        best = min(best, (time.perf_counter() - start) / n)
    return best


async def main(n: int = 3000) -> None:
    """Print the per-request cost of each configuration."""
    configs = {
        "off (no metrics, no traces)": Telemetry.off(),
        "metrics only (default)": Telemetry.build(tracing=False),
        "metrics + traces (batched)": Telemetry.build(span_exporters=[_Drop()]),
    }
    base = None
    for name, telemetry in configs.items():
        cost = await _best(telemetry, n)
        base = cost if base is None else base
        print(f"{name:30s} {cost * 1e6:7.1f} us/request  (+{(cost - base) * 1e6:.1f} us vs off)")
        telemetry.shutdown()


if __name__ == "__main__":
    asyncio.run(main())
