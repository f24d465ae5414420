"""Traces, metrics and request logs, with in-memory exporters and a real OTLP receiver (rotel)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from router.app import create_app
from router.config import Settings
from router.errors import ConfigError
from router.logs import JSONFormatter
from router.telemetry import Telemetry, provider_name, tracing_configured
from tests.conftest import (
    KeywordScorer,
    LiveServer,
    free_port,
    make_settings,
    policy_yaml,
    silent_server,
    wait_for,
)
from tests.conftest import live as live_server
from tests.fake_provider import Behaviour, FakeProvider
from tests.test_faults import BAD_REQUESTS, CUT_FRONTS, LITELLM_PATH
from tests.test_gateway import ScriptedLocal

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
SECRET_PROMPT = "HARD question about the launch codes 8472"


class Captured:
    """The in-memory exporter and reader a traced test app writes to."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.reader = InMemoryMetricReader()
        self.telemetry = Telemetry.build(
            span_exporters=[self.spans], metric_readers=[self.reader], batch=False
        )

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def by_name(self, name: str) -> list[ReadableSpan]:
        """The spans named ``name`` under the request's SERVER span (which a request that
        pins a model shares its name with: ``chat gpt-4o``)."""
        return [s for s in self.finished() if s.name == name and s.kind != SpanKind.SERVER]

    def server_span(self) -> ReadableSpan:
        servers = [s for s in self.finished() if s.kind == SpanKind.SERVER]
        assert len(servers) == 1, [s.name for s in self.finished()]
        return servers[0]

    def points(self, metric: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        out = []
        for rm in data.resource_metrics if data else []:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.name == metric:
                        out.extend(m.data.data_points)
        return out


class CostlyKeywordScorer(KeywordScorer):
    """The keyword scorer marked costly, as an encoder router is: the gateway decides with it
    on its scoring thread pool instead of inline."""

    costly = True


@contextmanager
def traced(
    tmp_path: Path, policy: str, local: Any = None, scorer: Any = None, **settings: Any
) -> Iterator[tuple[LiveServer, Captured]]:
    captured = Captured()
    app = create_app(
        make_settings(tmp_path, policy, **settings),
        scorer=scorer or KeywordScorer(),
        local_backend=local,
        telemetry=captured.telemetry,
    )
    with LiveServer(app) as server:
        yield server, captured


def _chat(srv: LiveServer, content: str, **extra: Any) -> httpx.Response:
    headers = extra.pop("headers", {})
    body = {"model": "auto", "messages": [{"role": "user", "content": content}], **extra}
    return srv.http.post("/v1/chat/completions", json=body, headers=headers)


def _no_prompt_text(spans: list[ReadableSpan]) -> None:
    for span in spans:
        for value in (span.attributes or {}).values():
            assert "launch codes" not in str(value), (span.name, value)


@pytest.mark.parametrize("scorer", [KeywordScorer, CostlyKeywordScorer])
def test_closed_request_span_has_genai_and_tiergate_attributes(
    tmp_path: Path, fake: FakeProvider, scorer: type[KeywordScorer]
) -> None:
    """Whether the decision runs inline or on the scoring pool (a costly scorer), its span is
    the request's child, in the request's trace."""
    fake.reset()
    with traced(tmp_path, policy_yaml(fake), local=ScriptedLocal(), scorer=scorer()) as (
        srv,
        cap,
    ):
        r = _chat(
            srv,
            SECRET_PROMPT,
            max_tokens=50,
            temperature=0.3,
            headers={"traceparent": TRACEPARENT},
        )
        assert r.status_code == 200
    server = cap.server_span()
    attrs = dict(server.attributes or {})
    assert server.name == "chat auto"
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert server.parent is not None and f"{server.parent.span_id:016x}" == PARENT_ID
    assert attrs["gen_ai.operation.name"] == "chat"
    assert attrs["gen_ai.request.model"] == "auto"
    assert attrs["gen_ai.response.model"] == "gpt-4o"
    assert attrs["gen_ai.provider.name"] == "openai"
    assert attrs["gen_ai.usage.input_tokens"] == 11
    assert attrs["gen_ai.usage.output_tokens"] == 7
    assert attrs["gen_ai.request.max_tokens"] == 50
    assert attrs["gen_ai.request.temperature"] == pytest.approx(0.3)
    assert tuple(attrs["gen_ai.response.finish_reasons"]) == ("stop",)
    assert attrs["http.response.status_code"] == 200
    assert attrs["tiergate.tier"] == "closed"
    assert attrs["tiergate.rule"] == "default"
    assert attrs["tiergate.score"] == pytest.approx(0.9)
    assert attrs["tiergate.threshold"] == pytest.approx(0.5)
    assert attrs["tiergate.policy_version"] == r.headers["x-tiergate-policy-version"]
    assert attrs["tiergate.model_version"] == "keyword-test-1"
    assert attrs["tiergate.tenant"] == "default"
    assert attrs["tiergate.request_id"] == r.headers["x-request-id"]
    assert attrs["tiergate.cost_usd"] > 0
    assert attrs["tiergate.counterfactual_cost_usd"] == pytest.approx(attrs["tiergate.cost_usd"])
    assert "tiergate.fallback" not in attrs and "error.type" not in attrs
    # Children: the decision, then one client call to the closed model.
    (decide,) = cap.by_name("tiergate.decide")
    (client,) = cap.by_name("chat gpt-4o")
    for child in (decide, client):
        assert child.parent is not None and child.parent.span_id == server.context.span_id
    assert decide.attributes["tiergate.tier"] == "closed"
    assert client.kind == SpanKind.CLIENT
    assert client.attributes["gen_ai.response.id"] == "chatcmpl-fake"
    assert client.attributes["gen_ai.usage.output_tokens"] == 7
    _no_prompt_text(cap.finished())


def test_a_request_for_several_choices_names_their_count_on_its_spans(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """The GenAI conventions require ``gen_ai.request.choice.count`` of a request that asks
    for more than one choice (``n``); the spans said nothing of it, so a trace of an answer
    billed for three choices read as one. A request for one names none."""
    fake.reset()
    with traced(tmp_path, policy_yaml(fake), local=ScriptedLocal()) as (srv, cap):
        assert _chat(srv, "HARD question", n=3).status_code == 200
        (client,) = cap.by_name("chat gpt-4o")
        assert cap.server_span().attributes["gen_ai.request.choice.count"] == 3
        assert client.attributes["gen_ai.request.choice.count"] == 3
        assert _chat(srv, "HARD question", n=1).status_code == 200
    spans = [s for s in cap.finished() if s.kind in (SpanKind.SERVER, SpanKind.CLIENT)]
    assert [s.attributes.get("gen_ai.request.choice.count") for s in spans] == [3, 3, None, None]


def test_every_span_attribute_is_named_in_the_docs(tmp_path: Path, fake: FakeProvider) -> None:
    """docs/observability.md's Traces section names every attribute a request's spans carry: a
    closed call with each request parameter the spans copy, and a local stream."""
    fake.reset()
    params = {"temperature": 0.3, "top_p": 0.9, "frequency_penalty": 0.1}
    params |= {"presence_penalty": 0.2, "seed": 3, "max_tokens": 50}
    with traced(tmp_path, policy_yaml(fake), local=ScriptedLocal()) as (srv, cap):
        assert _chat(srv, "HARD question", **params).status_code == 200
        assert _chat(srv, "easy", stream=True).status_code == 200
    emitted = {key for span in cap.finished() for key in span.attributes or {}}
    assert "gen_ai.request.seed" in emitted and "tiergate.time_to_first_chunk_ms" in emitted
    doc = (Path(__file__).resolve().parents[1] / "docs" / "observability.md").read_text()
    traces = doc[doc.index("## Traces") : doc.index("## Cost accounting")]
    assert sorted(key for key in emitted if f"`{key}`" not in traces) == []


def test_local_request_and_metrics(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()
    local = ScriptedLocal()
    with traced(tmp_path, policy_yaml(fake), local=local, local_price_per_mtok=1_000_000.0) as (
        srv,
        cap,
    ):
        for _ in range(3):
            assert _chat(srv, "easy").status_code == 200
        assert _chat(srv, "HARD").status_code == 200
        assert srv.gateway.local.gate.depth == 0  # the wrapped backend still shows its gate
    servers = [s for s in cap.finished() if s.kind == SpanKind.SERVER]
    local_spans = [s for s in servers if s.attributes["tiergate.tier"] == "local"]
    assert len(local_spans) == 3
    attrs = local_spans[0].attributes
    assert attrs["gen_ai.response.model"] == "local"
    assert attrs["gen_ai.provider.name"] == "llama.cpp"
    assert attrs["tiergate.cost_usd"] == pytest.approx(5.0)  # (3 + 2) tokens at $1 per token
    assert len(cap.by_name("chat local")) == 3
    requests = {
        (p.attributes["tier"], p.attributes["status"]): p.value
        for p in cap.points("tiergate.requests")
    }
    assert requests == {("local", "ok"): 3, ("closed", "ok"): 1}
    tokens = {
        (p.attributes["tier"], p.attributes["type"]): p.value for p in cap.points("tiergate.tokens")
    }
    assert tokens == {
        ("local", "input"): 9,
        ("local", "output"): 6,
        ("closed", "input"): 11,
        ("closed", "output"): 7,
    }
    (local_cost,) = [p for p in cap.points("tiergate.cost.usd") if p.attributes["tier"] == "local"]
    assert local_cost.value == pytest.approx(15.0)
    durations = {p.attributes["tier"]: p.count for p in cap.points("tiergate.request.duration")}
    assert durations == {"local": 3, "closed": 1}
    (depth,) = cap.points("tiergate.local.queue_depth")
    assert depth.value == 0
    (waits,) = cap.points("tiergate.local.queue_wait")  # each local request took the slot
    assert waits.count == 3


def test_money_is_counted_in_usd_over_otlp(tmp_path: Path, fake: FakeProvider) -> None:
    """The cost counters went out over OTLP with unit ``1`` (dimensionless): a backend showed
    spend as a plain ratio. They say ``{USD}``; /metrics keeps its names (the annotation adds
    no suffix), as tests/test_metrics_endpoint.py reads them."""
    fake.reset()
    with traced(tmp_path, policy_yaml(fake), local=ScriptedLocal()) as (srv, cap):
        assert _chat(srv, "HARD").status_code == 200
        families = {
            line.split()[2]
            for line in srv.http.get("/metrics").text.splitlines()
            if line.startswith("# TYPE")
        }
    data = cap.reader.get_metrics_data()
    units = {
        m.name: m.unit
        for rm in (data.resource_metrics if data else [])
        for sm in rm.scope_metrics
        for m in sm.metrics
    }
    assert units["tiergate.cost.usd"] == units["tiergate.counterfactual_cost.usd"] == "{USD}"
    assert units["tiergate.request.duration"] == "s"
    assert {"tiergate_cost_usd_total", "tiergate_counterfactual_cost_usd_total"} <= families


def test_fallback_shows_failed_attempt_then_answer(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()
    local = ScriptedLocal(fail=True)
    with traced(tmp_path, policy_yaml(fake, on_failure="closed"), local=local) as (srv, cap):
        r = _chat(srv, "easy", headers={"traceparent": TRACEPARENT})
        assert r.status_code == 200
    server = cap.server_span()
    assert server.attributes["tiergate.fallback"] == "local->closed"
    assert server.attributes["tiergate.tier"] == "closed"
    (failed,) = cap.by_name("chat local")
    (answered,) = cap.by_name("chat gpt-4o")
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes["error.type"] == "upstream_error"  # BackendError.code
    assert answered.status.status_code == StatusCode.UNSET
    assert failed.end_time <= answered.start_time
    assert all(f"{s.context.trace_id:032x}" == TRACE_ID for s in cap.finished())
    (fallbacks,) = cap.points("tiergate.fallbacks")
    assert fallbacks.value == 1 and fallbacks.attributes["fallback"] == "local->closed"


def test_shadow_calls_do_not_rewrite_the_local_requests_span(
    tmp_path: Path, fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """A locally served request's SERVER span said ``gen_ai.provider.name: openai``: the shadow
    judgement it started (after the answer) copied its closed call's provider onto the span
    that was still open, and its judge calls' parameters onto the span once ended, each a
    "Setting attribute on ended span" warning in the log. The shadow's calls are spans in the
    request's trace, nothing more."""
    fake.reset()
    policy = policy_yaml(fake, shadow="{sample_rate: 1.0}")
    with traced(tmp_path, policy, local=ScriptedLocal()) as (srv, cap):
        r = _chat(srv, "easy", headers={"traceparent": TRACEPARENT})
        assert r.status_code == 200 and r.headers["x-tiergate-tier"] == "local"
        learning = srv.gateway.learning
        assert wait_for(lambda: learning.shadow_labelled == 1, 30)
    server = cap.server_span()
    attrs = dict(server.attributes or {})
    assert attrs["tiergate.tier"] == "local"
    assert (attrs["gen_ai.provider.name"], attrs["gen_ai.system"]) == ("llama.cpp", "llama.cpp")
    assert "gen_ai.request.temperature" not in attrs  # the judge's temperature 0
    ended = [r for r in caplog.records if "ended span" in r.getMessage()]
    assert ended == []
    shadow = cap.by_name("chat gpt-4o")  # the closed answer and the judge, both ways
    assert len(shadow) == 3
    for span in shadow:
        assert f"{span.context.trace_id:032x}" == TRACE_ID
        assert span.parent is not None and span.parent.span_id == server.context.span_id


def test_the_request_span_names_the_provider_that_served_it(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A cascade whose escalation failed served its local answer (tier local, model local),
    yet its SERVER span said ``gen_ai.provider.name: anthropic``: the provider of the last
    model called, claude, which had failed, not of the one that answered."""
    from tests.scripted_local import ScriptedLocal as ScriptedStream
    from tests.test_cascade_gateway import CASCADE_POLICY, DOUBTFUL, _confidence_model

    fake.reset(Behaviour(mode="status", status=500))
    local = ScriptedStream(words=3)
    local.logprob = DOUBTFUL
    policy = policy_yaml(fake, on_failure="closed", extra=CASCADE_POLICY).replace(
        "  auto-best: {threshold: 0.05}\n",
        "  auto-best: {threshold: 0.05}\n  auto-cascade: {cascade: true}\n",
    )
    model = _confidence_model(tmp_path)
    with traced(tmp_path, policy, local=local, cascade_model_path=model) as (srv, cap):
        r = _chat(srv, "easy", model="auto-cascade")
        assert r.status_code == 200 and r.headers["x-tiergate-cascade"] == "escalation-failed"
    attrs = dict(cap.server_span().attributes or {})
    assert (attrs["tiergate.tier"], attrs["gen_ai.response.model"]) == ("local", "local")
    assert (attrs["gen_ai.provider.name"], attrs["gen_ai.system"]) == ("llama.cpp", "llama.cpp")
    assert [s.name for s in cap.finished() if s.kind == SpanKind.CLIENT] == [
        "chat local",
        "chat gpt-4o",
        "chat claude-3-5-sonnet-20241022",
    ]


def test_error_request_sets_error_type(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()
    with traced(tmp_path, policy_yaml(fake), local=ScriptedLocal()) as (srv, cap):
        r = _chat(srv, "easy", model="no-such-model")
        assert r.status_code == 404
    attrs = cap.server_span().attributes
    assert attrs["error.type"] == r.json()["error"]["code"]
    assert attrs["http.response.status_code"] == 404
    # The name the client asked for is an attribute; the span's name stays "chat".
    assert attrs["gen_ai.request.model"] == "no-such-model"
    assert cap.server_span().name == "chat"
    (point,) = cap.points("tiergate.requests")
    assert point.attributes["status"] == "error" and point.attributes["tier"] == "none"


def test_a_request_no_model_answered_names_no_response_model(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A request every model failed had ``gen_ai.response.model: gpt-4o`` on its SERVER span,
    the model it was routed to: grouped by response model, gpt-4o seemed to answer it. A
    stream cut after its first words was answered (in part) and keeps it."""
    fake.reset(Behaviour(mode="reset_mid_stream"))
    policy = policy_yaml(fake, on_failure="closed")
    with traced(tmp_path, policy, local=ScriptedLocal(), cooldown_s=0) as (srv, cap):
        assert _chat(srv, "HARD", model="gpt-4o", stream=True).status_code == 200
        fake.reset(Behaviour(mode="status", status=500))
        assert _chat(srv, "HARD").status_code == 502
    cut, failed = (dict(s.attributes or {}) for s in cap.finished() if s.kind == SpanKind.SERVER)
    assert "gen_ai.response.model" not in failed
    assert (failed["tiergate.model"], failed["gen_ai.provider.name"]) == ("gpt-4o", "openai")
    assert failed["error.type"] == "upstream_error"
    assert cut["gen_ai.response.model"] == "gpt-4o" and cut["gen_ai.usage.output_tokens"] > 0


def test_a_call_its_client_left_is_not_a_failed_call(tmp_path: Path, fake: FakeProvider) -> None:
    """A client that left mid-stream marked the provider's CLIENT span ERROR with
    ``error.type: CancelledError``: a trace backend's error rate per provider counted clients
    that hung up as the provider failing. It is cancelled, as a cascade's closed stream is."""
    fake.reset(Behaviour(text=" ".join(f"w{i}" for i in range(40)), chunk_delay_s=0.1))
    with traced(tmp_path, policy_yaml(fake), local=ScriptedLocal()) as (srv, cap):
        body = {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": "x"}]}
        with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            next(line for line in response.iter_lines() if line.startswith("data: "))
        assert wait_for(lambda: len(cap.by_name("chat gpt-4o")) == 1)
        assert wait_for(lambda: any(s.kind == SpanKind.SERVER for s in cap.finished()))
    (call,) = cap.by_name("chat gpt-4o")
    assert call.attributes["error.type"] == "cancelled"
    assert call.status.status_code == StatusCode.UNSET
    assert cap.server_span().attributes["tiergate.status"] == "aborted"


def test_the_request_span_names_the_status_sent(tmp_path: Path, fake: FakeProvider) -> None:
    """A stream the provider cut after it started went out as HTTP 200 with an error event,
    yet its SERVER span said ``http.response.status_code: 502`` (its record's status): a
    trace search by status disagreed with the proxy's and the client's access logs."""
    fake.reset(Behaviour(mode="reset_mid_stream"))
    with traced(tmp_path, policy_yaml(fake), local=ScriptedLocal()) as (srv, cap):
        r = _chat(srv, "HARD", model="gpt-4o", stream=True)
        assert r.status_code == 200 and "upstream_unreachable" in r.text
        fake.reset(Behaviour(mode="status", status=500))
        assert _chat(srv, "HARD", model="gpt-4o").status_code == 502
    cut, failed = (dict(s.attributes or {}) for s in cap.finished() if s.kind == SpanKind.SERVER)
    assert (cut["http.response.status_code"], cut["tiergate.status"]) == (200, "error")
    assert cut["error.type"] == "upstream_unreachable"
    assert failed["http.response.status_code"] == 502
    statuses = [s.status.status_code for s in cap.finished() if s.kind == SpanKind.SERVER]
    assert statuses == [StatusCode.ERROR, StatusCode.ERROR]  # the server failed both


#: Per provider path of a cut stream: the model pinned, and the policy line that makes gpt-4o
#: a litellm provider (``mistral/``) where it is one.
CUT_PATHS = {
    "openai": ("gpt-4o", None),
    "anthropic": ("claude", None),
    "litellm": ("gpt-4o", "mistral"),
}


@pytest.mark.parametrize("path", sorted(CUT_PATHS))
@pytest.mark.parametrize("front", sorted(CUT_FRONTS))
def test_a_stream_cut_after_it_started_has_its_records_status_on_its_span(
    tmp_path: Path, fake: FakeProvider, front: str, path: str
) -> None:
    """A stream the provider cut after the client had its first words went out as 200 with an
    error event, and its record said error, 502: its SERVER span said 200 and nothing
    carried the 502, so a trace could not be matched to its record by status. On every front
    and provider path (OpenAI direct, Anthropic and Responses natively or through litellm, a
    litellm provider), the span is ERROR with the record's error.type, status and 502."""
    url, body, _ = CUT_FRONTS[front]
    model, via = CUT_PATHS[path]
    policy = policy_yaml(fake)
    if via is not None:
        policy = policy.replace("litellm_model: openai/gpt-4o", LITELLM_PATH[via])
    fake.reset(Behaviour(mode="reset_mid_stream"))
    with traced(tmp_path, policy, local=ScriptedLocal()) as (srv, cap):
        with srv.http.stream("POST", url, json={**body, "model": model}) as response:
            assert response.status_code == 200
            assert b"the stream ended before it finished" in response.read()
        assert srv.gateway.outcomes.flush(5)
        record = srv.gateway.outcomes.get(response.headers["x-request-id"])
    assert record is not None and (record["status"], record["http_status"]) == ("error", 502)
    server = cap.server_span()
    attrs = dict(server.attributes or {})
    assert server.status.status_code == StatusCode.ERROR
    assert server.status.description == record["error_type"] == attrs["error.type"]
    assert (attrs["tiergate.status"], attrs["tiergate.http_status"]) == ("error", 502)
    assert attrs["http.response.status_code"] == 200  # the status sent, as the access log's
    assert attrs["gen_ai.usage.output_tokens"] == record["completion_tokens"] > 0
    (client,) = [s for s in cap.finished() if s.kind == SpanKind.CLIENT]
    assert client.status.status_code == StatusCode.ERROR
    assert client.attributes["error.type"] == record["error_type"]


#: Per front whose provider path reads a stream's error event natively: the model pinned, and
#: the protocol it speaks (a key of BAD_REQUESTS).
NATIVE_EVENTS_ON = {"messages": ("claude", "anthropic"), "responses": ("gpt-4o", "responses")}


def _event_and_answer(kind: str, protocol: str) -> tuple[Behaviour, Behaviour, int, str]:
    """For a kind of failure: the provider ending a stream after its first words with its
    error event for it, answering it with its status instead, that status, and the code."""
    if kind == "rate_limit":
        limited = Behaviour(mode="rate_limit")
        return Behaviour(mode="error_mid_stream"), limited, 429, "upstream_rate_limited"
    event, body, code = BAD_REQUESTS[protocol]
    bad = Behaviour(mode="status", status=400, error_body=body)
    return Behaviour(mode="error_mid_stream", error_body=event), bad, 400, code


@pytest.mark.parametrize("kind", ["rate_limit", "bad_request"])
@pytest.mark.parametrize("front", sorted(NATIVE_EVENTS_ON))
def test_a_stream_failed_by_an_error_event_after_it_started_is_an_error_span(
    tmp_path: Path, fake: FakeProvider, front: str, kind: str
) -> None:
    """A provider that rate-limits a stream after its first words (its error event, a 429)
    leaves the client a 200, the words and an error event, and a record that says error, 429.
    Its SERVER span had ``error.type`` but no ERROR status, the 4xx rule of the HTTP
    conventions applied to the record's 429; the conventions apply it to the status sent,
    and a 200 whose response could not be sent whole is an ``Error``. A 429 answered as one
    (before the stream started) stays a client's error: no ERROR status. An event that calls
    the request bad is so too, with the 400 and code of the same failure answered as a status
    (it was a 502 ``upstream_error``)."""
    url, body, _ = CUT_FRONTS[front]
    model, protocol = NATIVE_EVENTS_ON[front]
    pinned = {**body, "model": model}
    event, answer, status, code = _event_and_answer(kind, protocol)
    fake.reset(event)
    with traced(tmp_path, policy_yaml(fake), local=ScriptedLocal()) as (srv, cap):
        with srv.http.stream("POST", url, json=pinned) as response:
            assert response.status_code == 200
            assert b"sent an error event" in response.read()
        fake.reset(answer)
        refused = srv.http.post(url, json={**pinned, "stream": False})
        assert refused.status_code == status
        assert srv.gateway.outcomes.flush(5)
        record = srv.gateway.outcomes.get(response.headers["x-request-id"])
    assert record is not None
    assert (record["status"], record["http_status"]) == ("error", status)
    cut, answered = (s for s in cap.finished() if s.kind == SpanKind.SERVER)
    attrs = dict(cut.attributes or {})
    assert attrs["error.type"] == record["error_type"] == code
    assert (attrs["http.response.status_code"], attrs["tiergate.http_status"]) == (200, status)
    assert cut.status.status_code == StatusCode.ERROR
    assert cut.status.description == code
    assert answered.attributes["http.response.status_code"] == status
    assert answered.status.status_code == StatusCode.UNSET


@pytest.mark.parametrize("model", ["gpt-4o", "local", "auto-best"])
def test_the_decide_span_names_the_model_the_record_names(
    tmp_path: Path, fake: FakeProvider, model: str
) -> None:
    """A pinned request's decide span said ``tiergate.alias: auto`` (the alias whose threshold
    would apply) while its record, log line and SERVER span named the pinned model."""
    fake.reset()
    with traced(tmp_path, policy_yaml(fake), local=ScriptedLocal()) as (srv, cap):
        r = _chat(srv, "easy", model=model)
        assert r.status_code == 200
        assert srv.gateway.outcomes.flush(5)
        record = srv.gateway.outcomes.get(r.headers["x-request-id"])
    assert record is not None and record["alias"] == model
    (decide,) = cap.by_name("tiergate.decide")
    assert decide.attributes["tiergate.alias"] == model
    assert cap.server_span().attributes["gen_ai.request.model"] == model


@pytest.mark.gguf
def test_real_local_stream_is_charged_by_gpu_time(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()
    with traced(tmp_path, policy_yaml(fake), local_price_per_gpu_hour=3600.0) as (srv, cap):
        with srv.http.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "auto",
                "messages": [{"role": "user", "content": "Say hi"}],
                "max_tokens": 4,
                "stream": True,
            },
        ) as r:
            assert r.status_code == 200
            body = r.read()
        assert b"[DONE]" in body
    server = cap.server_span()
    attrs = server.attributes
    assert attrs["tiergate.tier"] == "local" and attrs["tiergate.stream"] is True
    assert 0 < attrs["gen_ai.usage.output_tokens"] <= 4
    # $3600 per GPU-hour is $1 per second of generation: the cost is the generation time,
    # which is positive and shorter than the whole request.
    latency_s = (server.end_time - server.start_time) / 1e9
    assert 0 < attrs["tiergate.cost_usd"] < latency_s
    (client,) = cap.by_name("chat local")
    assert client.end_time <= server.end_time  # the client span lasts until the stream ends
    (ttft,) = cap.points("tiergate.time_to_first_token")
    assert ttft.count == 1


def test_request_log_line_has_ids_and_no_prompt(
    tmp_path: Path,
    fake: FakeProvider,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake.reset()
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    caplog.set_level(logging.INFO, logger="tiergate.request")
    local = ScriptedLocal()
    with live_server(tmp_path, policy_yaml(fake), local_backend_obj=local) as srv:
        r = _chat(srv, SECRET_PROMPT)
        assert r.status_code == 200
        # Tracing is off by default: nothing wraps the backends, no span is made.
        assert not srv.gateway.telemetry.tracing
        assert srv.gateway.local is local
    (line,) = [rec for rec in caplog.records if rec.name == "tiergate.request"]
    fields = vars(line)
    assert fields["request_id"] == r.headers["x-request-id"]
    assert (fields["tier"], fields["model"], fields["status"]) == ("closed", "gpt-4o", "ok")
    assert fields["latency_ms"] > 0
    assert "launch codes" not in str(fields)
    assert "trace_id" not in fields


def test_a_request_without_a_valid_key_starts_no_span(tmp_path: Path, fake: FakeProvider) -> None:
    """Refused for its key, a chat request ended a SERVER span anyway ("chat", status unset),
    parented on whatever traceparent it sent: anyone who could reach the port could add spans
    to the operator's traces, into a trace of their choosing."""
    from router.auth import hash_key

    keys = tmp_path / "keys.yaml"
    keys.write_text(json.dumps({"keys": [{"sha256": hash_key("tg-good"), "tenant": "acme"}]}))
    fake.reset()
    with traced(tmp_path, policy_yaml(fake), local=ScriptedLocal(), api_keys_file=keys) as (
        srv,
        cap,
    ):
        for key in (None, "tg-wrong"):
            headers = {"traceparent": TRACEPARENT}
            if key:
                headers["authorization"] = f"Bearer {key}"
            assert _chat(srv, "hello", headers=headers).status_code == 401
        assert cap.finished() == []
        ok = _chat(srv, "hello", headers={"traceparent": TRACEPARENT, "x-api-key": "tg-good"})
        assert ok.status_code == 200
    assert f"{cap.server_span().context.trace_id:032x}" == TRACE_ID


def test_tracing_off_unless_configured(tmp_path: Path, fake: FakeProvider) -> None:
    assert not tracing_configured({}, None)
    assert tracing_configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}, None)
    assert tracing_configured({"OTEL_TRACES_EXPORTER": "console"}, None)
    assert not tracing_configured({"OTEL_TRACES_EXPORTER": "none"}, None)
    assert tracing_configured({}, True)
    assert not tracing_configured({"OTEL_SDK_DISABLED": "true"}, True)
    settings = make_settings(tmp_path, policy_yaml(fake))
    telemetry = Telemetry.from_settings(settings, environ={})
    assert not telemetry.tracing and telemetry.metrics
    local = ScriptedLocal()
    assert telemetry.wrap_backend(local) is local  # no wrapper, no per-call cost
    with telemetry.decide_span() as span:
        span.decided(None, "auto")  # the shared no-op
    off = Telemetry.from_settings(
        Settings(**{**settings.model_dump(), "metrics_enabled": False}), environ={}
    )
    assert not off.tracing and not off.metrics and off.registry is None
    # OTEL_SDK_DISABLED wins over metrics_enabled too: /metrics is off (503), not empty.
    disabled = Telemetry.from_settings(settings, environ={"OTEL_SDK_DISABLED": "true"})
    assert not disabled.tracing and not disabled.metrics and disabled.registry is None
    # With traces on, metrics still go out over OTLP, but /metrics stays off as configured.
    pushed = Telemetry.from_settings(
        Settings(**{**settings.model_dump(), "metrics_enabled": False}),
        environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
    )
    try:
        assert pushed.tracing and pushed.metrics and pushed.registry is None
    finally:
        pushed.shutdown()


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
        {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc"},
        # Traces over HTTP, but metrics (pushed with them) still over gRPC.
        {
            "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        },
    ],
)
def test_an_otlp_protocol_other_than_http_protobuf_stops_the_start(
    tmp_path: Path, fake: FakeProvider, environ: dict[str, str]
) -> None:
    """The exporters speak OTLP over HTTP/protobuf only: sent to a gRPC port, every batch fails
    ("BadStatusLine") and the spans are lost, so a gRPC setting is refused, naming itself."""
    settings = make_settings(tmp_path, policy_yaml(fake))
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    with pytest.raises(ConfigError, match=r"OTEL_EXPORTER_OTLP_\w*PROTOCOL=grpc.*http/protobuf"):
        Telemetry.from_settings(settings, environ={**endpoint, **environ})
    # http/protobuf said explicitly, or gRPC only for a signal that is not exported, is fine.
    for fine in (
        {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
        {"OTEL_EXPORTER_OTLP_METRICS_PROTOCOL": "grpc", "OTEL_METRICS_EXPORTER": "none"},
    ):
        Telemetry.from_settings(settings, environ={**endpoint, **fine}).shutdown()


# -- a real OTLP receiver over the network -------------------------------------------------


def _rotel_binary() -> Path | None:
    try:
        import rotel
    except ImportError:
        return None
    path = Path(rotel.__file__).parent / "rotel-agent"
    return path if path.is_file() else None


@contextmanager
def rotel_receiver(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """rotel's collector on loopback, printing every span it receives (detailed debug log)."""
    binary = _rotel_binary()
    if binary is None:
        pytest.skip("the rotel package (dev extra) is not installed")
    http_port, grpc_port = free_port(), free_port()
    out = tmp_path / "rotel.out"
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [
                str(binary),
                "start",
                "--exporter",
                "blackhole",
                "--debug-log",
                "traces",
                "--debug-log-verbosity",
                "detailed",
                "--otlp-http-endpoint",
                f"127.0.0.1:{http_port}",
                "--otlp-grpc-endpoint",
                f"127.0.0.1:{grpc_port}",
                "--pid-file",
                str(tmp_path / "rotel.pid"),
                "--log-file",
                str(tmp_path / "rotel.log"),
            ],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env={**os.environ, "NO_COLOR": "1"},
        )
    try:
        deadline = time.monotonic() + 20
        while "Starting Rotel" not in out.read_text(errors="replace"):
            assert proc.poll() is None, out.read_text(errors="replace")
            assert time.monotonic() < deadline, "rotel did not start"
            time.sleep(0.05)
        yield f"http://127.0.0.1:{http_port}", out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_spans_reach_a_real_otlp_receiver(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.reset()
    with rotel_receiver(tmp_path) as (endpoint, out):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        monkeypatch.setenv("OTEL_SERVICE_NAME", "tiergate-e2e")
        monkeypatch.setenv("OTEL_METRICS_EXPORTER", "none")
        with live_server(tmp_path, policy_yaml(fake), local_backend_obj=ScriptedLocal()) as srv:
            assert srv.gateway.telemetry.tracing
            r = _chat(srv, SECRET_PROMPT, headers={"traceparent": TRACEPARENT})
            assert r.status_code == 200
        # The app's shutdown flushed the batch processor; rotel prints what it received.
        deadline = time.monotonic() + 20
        text = ""
        while "chat gpt-4o" not in text and time.monotonic() < deadline:
            time.sleep(0.1)
            text = re.sub(r"\x1b\[[0-9;]*m", "", out.read_text(errors="replace"))
    assert "service.name: Str(tiergate-e2e)" in text
    names = re.findall(r"Name\s+: (.+)", text)
    assert {"chat auto", "tiergate.decide", "chat gpt-4o"} <= set(names)
    assert re.findall(r"Trace ID\s+: (\w+)", text) == [TRACE_ID] * 3
    assert "-> tiergate.tier: Str(closed)" in text
    assert "-> gen_ai.usage.output_tokens: Int(7)" in text
    assert f"-> tiergate.request_id: Str({r.headers['x-request-id']})" in text
    assert "launch codes" not in text


def test_shutdown_with_an_unreachable_collector_fits_the_grace_period(
    tmp_path: Path,
    fake: FakeProvider,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The last export of spans and of metrics each waited on the SDK's bounds (10 s per
    export and its retries, up to 30 s per provider): about 20 s here with one request's
    spans, past the 15 s a pod has left of the chart's grace period (35 s) after its preStop
    (5 s) and its requests (15 s), so it was killed before its shutdown ended. Now shutdown
    stops waiting, says what it dropped, and leaves no export running."""
    fake.reset()
    with silent_server() as (endpoint, _):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        with live_server(tmp_path, policy_yaml(fake), local_backend_obj=ScriptedLocal()) as srv:
            assert srv.gateway.telemetry.tracing
            assert _chat(srv, "HARD question").status_code == 200
            started = time.monotonic()
        took = time.monotonic() - started
        # An upper bound well above telemetry's (3 s), not a speed goal.
        assert took < 12, f"shutdown took {took:.1f} s"
        assert "spans and metrics not yet sent are dropped" in caplog.text
    ended = wait_for(
        lambda: not [t for t in threading.enumerate() if t.name == "tiergate-telemetry-shutdown"]
    )
    assert ended, "telemetry shutdown threads still running"


@contextmanager
def otlp_receiver() -> Iterator[tuple[str, list[tuple[str, dict[str, str], bytes]]]]:
    """A loopback OTLP/HTTP collector that takes every export (200, an empty protobuf answer)
    and keeps its path, headers and body. Yields its root URL and that list."""
    received: list[tuple[str, dict[str, str], bytes]] = []

    class Collector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", 0)))
            headers = {k.lower(): v for k, v in self.headers.items()}
            received.append((self.path, headers, body))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    with ThreadingHTTPServer(("127.0.0.1", 0), Collector) as server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}", received
        finally:
            server.shutdown()  # returns once serve_forever has


@contextmanager
def embedded(tmp_path: Path, fake: FakeProvider, environ: dict[str, str]) -> Iterator[LiveServer]:
    """A test app built as an app that embeds Tiergate builds it: with an environ of its own."""
    settings = make_settings(tmp_path, policy_yaml(fake))
    app = create_app(
        settings, scorer=KeywordScorer(), local_backend=ScriptedLocal(), environ=environ
    )
    with LiveServer(app) as srv:
        yield srv


def test_the_environ_an_app_is_given_governs_its_otlp_exporters(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``create_app(environ=...)`` built telemetry from the process environment, and
    ``Telemetry.from_settings(environ=...)`` decided from the given one whether to export but
    left the exporters to read ``os.environ``: spans and metrics went to the process's
    collector, with its credentials, and the given endpoint, headers and timeout were unused."""
    with otlp_receiver() as (given, to_given), otlp_receiver() as (process, to_process):
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", process)
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Bearer process-secret")
        monkeypatch.setenv("OTEL_EXPORTER_OTLP_TIMEOUT", "0.000001")  # would fail every export
        environ = {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{given}/custom/traces",
            "OTEL_EXPORTER_OTLP_ENDPOINT": given,
            "OTEL_EXPORTER_OTLP_HEADERS": "x-collector-key=given-key",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "5",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        }
        with embedded(tmp_path, fake, environ) as srv:
            assert srv.gateway.telemetry.tracing
            assert _chat(srv, "hello").status_code == 200
        # The app's shutdown sent the last spans and metrics.
        assert {path for path, _, _ in to_given} == {"/custom/traces", "/v1/metrics"}
        for _, headers, _ in to_given:
            assert headers["x-collector-key"] == "given-key"
            assert "authorization" not in headers
        assert to_process == []
    # A setting the exporter cannot use stops the start, naming it, as the protocol does.
    bad = {"OTEL_EXPORTER_OTLP_ENDPOINT": given, "OTEL_EXPORTER_OTLP_TRACES_COMPRESSION": "zstd"}
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_TRACES_COMPRESSION=zstd"):
        Telemetry.from_settings(make_settings(tmp_path, policy_yaml(fake)), environ=bad)


def test_the_environ_an_app_is_given_names_its_service_sampling_and_batching(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An app given an environ of its own exported where it said, but the SDK took the service
    name, resource attributes, sampler and batching from the process's: its spans were named
    after the process's service, and a process that sampled nothing (or batched every ten
    minutes) left the app with no traces. They come from the environ given now."""
    fake.reset()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "process-service")
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=process,team=process")
    monkeypatch.setenv("OTEL_TRACES_SAMPLER", "always_off")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "600000")
    environ = {
        "OTEL_SERVICE_NAME": "given-service",
        "OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=given%20one",
        "OTEL_BSP_SCHEDULE_DELAY": "50",
    }
    resources = _resource_of_a_chat(tmp_path, fake, environ)
    assert ("service.name", "given-service") in resources
    assert ("deployment.environment", "given one") in resources
    assert not any("process" in value for _, value in resources), resources


def test_an_app_whose_environ_names_no_service_is_tiergate_whatever_the_process_names(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process's OTEL_SERVICE_NAME is left out of an app given an environ of its own; with
    none in that environ, the app's spans carried no service.name at all (not the SDK's
    unknown_service, so not Tiergate's default either): a collector files them under nothing."""
    fake.reset()
    monkeypatch.setenv("OTEL_SERVICE_NAME", "process-service")
    resources = _resource_of_a_chat(tmp_path, fake, {"OTEL_BSP_SCHEDULE_DELAY": "50"})
    assert {value for key, value in resources if key == "service.name"} == {"tiergate"}


def _resource_of_a_chat(
    tmp_path: Path, fake: FakeProvider, environ: dict[str, str]
) -> set[tuple[str, str]]:
    # The resource attributes of the spans of one chat request to an app embedded with
    # ``environ`` (plus a loopback collector's endpoint), exported within its batching delay.
    with otlp_receiver() as (given, received):
        own = {**environ, "OTEL_EXPORTER_OTLP_ENDPOINT": given, "OTEL_METRICS_EXPORTER": "none"}
        with embedded(tmp_path, fake, own) as srv:
            assert _chat(srv, "hello").status_code == 200
            # Sampled, and sent within the given batching delay, before any shutdown flush.
            assert wait_for(lambda: len(_exported_spans(received)) >= 3, 10)
    return {
        (a.key, a.value.string_value)
        for request in _exported(received)
        for spans in request.resource_spans
        for a in spans.resource.attributes
    }


def _exported(received: list[tuple[str, dict[str, str], bytes]]) -> list[Any]:
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    return [
        ExportTraceServiceRequest.FromString(body)
        for path, _, body in list(received)
        if path == "/v1/traces"
    ]


def _exported_spans(received: list[tuple[str, dict[str, str], bytes]]) -> list[Any]:
    return [
        span
        for request in _exported(received)
        for spans in request.resource_spans
        for scope in spans.scope_spans
        for span in scope.spans
    ]


def test_otel_sdk_disabled_in_the_process_turns_an_embedded_apps_metrics_off(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The SDK reads ``OTEL_SDK_DISABLED`` from the process's environment whatever environ an
    app is given: with it set there, the app's meters did nothing and /metrics answered 200
    with no series, as if no request had come. It is off, as documented: a 503."""
    fake.reset()
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    with embedded(tmp_path, fake, {}) as srv:
        assert _chat(srv, "hello").status_code == 200
        assert srv.http.get("/metrics").status_code == 503


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/messages", {"max_tokens": 20, "messages": [{"role": "user", "content": "HARD"}]}),
        ("/v1/responses", {"input": "HARD"}),
    ],
)
def test_the_other_fronts_are_traced_too(
    tmp_path: Path, fake: FakeProvider, path: str, body: dict[str, Any]
) -> None:
    fake.reset()
    with traced(tmp_path, policy_yaml(fake), local=ScriptedLocal()) as (srv, cap):
        r = httpx.post(srv.url + path, json={"model": "auto", **body}, timeout=60)
        assert r.status_code == 200
    server = cap.server_span()
    attrs = dict(server.attributes or {})
    assert attrs["http.route"] == path
    assert attrs["tiergate.request_id"] == r.headers["x-request-id"]
    assert attrs["tiergate.tier"] == "closed" and attrs["gen_ai.usage.output_tokens"] > 0


_NATIVE_CALLS = {
    # front: (request, the CLIENT span of its native call)
    "/v1/messages": (
        {"model": "claude", "max_tokens": 20, "messages": [{"role": "user", "content": "HARD"}]},
        "chat claude-3-5-sonnet-20241022",
    ),
    "/v1/responses": ({"model": "auto", "input": "HARD"}, "chat gpt-4o"),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", sorted(_NATIVE_CALLS))
def test_a_native_call_has_its_client_span(
    tmp_path: Path, fake: FakeProvider, path: str, stream: bool
) -> None:
    """A front's request passed on in the provider's own API (Messages to an Anthropic model,
    Responses to an OpenAI one) is a backend attempt like any other: it has its CLIENT span."""
    body, client_span = _NATIVE_CALLS[path]
    fake.reset()
    with traced(tmp_path, policy_yaml(fake), local=ScriptedLocal()) as (srv, cap):
        r = srv.http.post(
            path, json={**body, "stream": stream}, headers={"traceparent": TRACEPARENT}
        )
        assert r.status_code == 200
        assert fake.received[-1].path.endswith(path.removeprefix("/v1"))  # the native call
    server = cap.server_span()
    (client,) = cap.by_name(client_span)
    assert client.kind == SpanKind.CLIENT
    assert client.parent is not None and client.parent.span_id == server.context.span_id
    assert client.attributes["gen_ai.usage.output_tokens"] > 0
    assert client.attributes["tiergate.stream"] is stream
    assert server.attributes["gen_ai.provider.name"] == client.attributes["gen_ai.provider.name"]


#: Per provider path: the front (as CUT_FRONTS names it), the model the request pins, the
#: litellm provider gpt-4o is made (None: as the test policy has it).
_CALLED = {
    "openai-direct": ("chat", "gpt-4o", None),
    "anthropic-litellm": ("chat", "claude", None),
    "anthropic-native": ("messages", "claude", None),
    "responses-native": ("responses", "gpt-4o", None),
    "litellm-provider": ("chat", "gpt-4o", "mistral"),
}


def _client_span_on(tmp_path: Path, fake: FakeProvider, path: str) -> ReadableSpan:
    """The one CLIENT span of a request answered on the provider ``path`` (:data:`_CALLED`)."""
    front, model, via = _CALLED[path]
    policy = policy_yaml(fake)
    if via is not None:
        policy = policy.replace("litellm_model: openai/gpt-4o", LITELLM_PATH[via])
    url, body, _ = CUT_FRONTS[front]
    fake.reset()
    with traced(tmp_path, policy, local=ScriptedLocal()) as (srv, cap):
        assert srv.http.post(url, json={**body, "model": model}).status_code == 200
    (client,) = [s for s in cap.finished() if s.kind == SpanKind.CLIENT]
    return client


@pytest.mark.parametrize("path", sorted(_CALLED))
def test_a_client_span_names_the_server_it_calls(
    tmp_path: Path, fake: FakeProvider, path: str
) -> None:
    """CLIENT spans named no server: a trace showed which model a call went to but not which
    host (a provider, a regional endpoint, a company gateway), as the GenAI conventions
    recommend (``server.address``, and ``server.port`` with it). Each names its api_base's
    host and port, on every provider path."""
    client = _client_span_on(tmp_path, fake, path)
    port = httpx.URL(fake.base_url).port
    assert (client.attributes["server.address"], client.attributes["server.port"]) == (
        "127.0.0.1",
        port,
    )


@pytest.mark.parametrize("path", sorted(_CALLED))
def test_a_client_span_names_the_model_the_provider_is_asked_for(
    tmp_path: Path, fake: FakeProvider, path: str
) -> None:
    """A CLIENT span's ``gen_ai.request.model`` is the model the request asks the provider for,
    as the GenAI conventions define it, with the provider in ``gen_ai.provider.name``: it was
    litellm's name (``openai/gpt-4o``, ``anthropic/claude-...``), which no provider is asked
    for, so calls to one model grouped apart from other instrumentations' (the OpenAI SDK's
    says ``gpt-4o``). The span is named ``chat {gen_ai.request.model}``, as they name it."""
    client = _client_span_on(tmp_path, fake, path)
    asked = fake.received[-1].body["model"]  # what the provider was asked for
    assert client.attributes["gen_ai.request.model"] == asked
    assert client.name == f"chat {asked}"
    kind = path.partition("-")[0]
    provider = {"responses": "openai", "litellm": "mistral_ai"}.get(kind, kind)
    assert client.attributes["gen_ai.provider.name"] == provider


#: The name each model's answers carry: a dated snapshot, as OpenAI answers a request for gpt-4o.
_SNAPSHOTS = {"gpt-4o": "gpt-4o-2024-08-06", "claude": "claude-3-5-sonnet-v2-20241022"}
#: The provider's id of each protocol's answer (the fake's).
_ANSWER_IDS = {"chat": "chatcmpl-fake", "messages": "msg_fake", "responses": "resp_fake"}


def _models_named(text: str) -> set[str]:
    """Every ``model`` a JSON answer, or each event of a stream, names, at any depth."""
    found: set[str] = set()

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                if key == "model" and isinstance(inner, str):
                    found.add(inner)
                walk(inner)
        elif isinstance(value, list):
            for inner in value:
                walk(inner)

    lines = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
    for data in lines or [text]:
        if data != "[DONE]":
            walk(json.loads(data))
    return found


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", [*sorted(_CALLED), "openai-litellm"])
def test_a_client_span_names_the_model_and_answer_the_provider_returned(
    tmp_path: Path, fake: FakeProvider, path: str, stream: bool
) -> None:
    """A CLIENT span's ``gen_ai.response.model`` is the model the provider says generated the
    answer (its dated snapshot), and ``gen_ai.response.id`` its id, as the GenAI conventions
    define them: it was the policy's name (``gpt-4o``), which every backend writes over the
    answer's ``model`` before the span read it, so a trace could not tell which snapshot
    answered. The client still reads the policy's name, on every path, streamed or not.
    Through litellm an Anthropic answer has an id litellm made (it drops the ``msg_`` one):
    the span has that one, as the client does."""
    front, model, via = _CALLED.get(path, ("chat", "gpt-4o", "openai-via-litellm"))
    policy = policy_yaml(fake)
    if via is not None:
        policy = policy.replace("litellm_model: openai/gpt-4o", LITELLM_PATH[via])
    url, body, _ = CUT_FRONTS[front]
    fake.reset(Behaviour(answered_model=_SNAPSHOTS[model]))
    with traced(tmp_path, policy, local=ScriptedLocal()) as (srv, cap):
        r = srv.http.post(url, json={**body, "model": model, "stream": stream})
        assert r.status_code == 200, r.text
    (client,) = [s for s in cap.finished() if s.kind == SpanKind.CLIENT]
    assert client.attributes["gen_ai.response.model"] == _SNAPSHOTS[model]
    if path == "anthropic-litellm":  # litellm gives an Anthropic answer an id of its own
        first = r.text.split("data: ")[1].split("\n")[0] if stream else r.text
        assert client.attributes["gen_ai.response.id"] == json.loads(first)["id"] != "msg_fake"
    else:
        assert client.attributes["gen_ai.response.id"] == _ANSWER_IDS[front]
    assert _models_named(r.text) == {model}
    assert cap.server_span().attributes["gen_ai.response.model"] == model


def test_an_external_local_servers_client_span_names_the_model_it_returned(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """An external llama.cpp server's name for its model (its alias, or the file it loaded) is
    its CLIENT span's ``gen_ai.response.model``, streamed or not; the client reads the
    policy's name. The in-process model names none of its own: its span says the policy's."""
    with FakeProvider() as server:
        server.reset(Behaviour(answered_model="qwen2.5-0.5b-instruct-q4_k_m.gguf"))
        with traced(
            tmp_path, policy_yaml(fake), local_backend="openai_http", local_base_url=server.base_url
        ) as (srv, cap):
            answers = [_chat(srv, "easy", stream=stream) for stream in (False, True)]
        assert [_models_named(a.text) for a in answers] == [{"local"}, {"local"}]
        spans = cap.by_name("chat local")
        assert [s.attributes["gen_ai.response.model"] for s in spans] == [
            "qwen2.5-0.5b-instruct-q4_k_m.gguf"
        ] * 2
    with traced(tmp_path, policy_yaml(fake), local=ScriptedLocal()) as (srv, cap):
        assert _chat(srv, "easy").status_code == 200
    (in_process,) = cap.by_name("chat local")
    assert in_process.attributes["gen_ai.response.model"] == "local"


@pytest.mark.parametrize(
    ("litellm_model", "asked"),
    [
        ("openai/gpt-4o", "gpt-4o"),
        ("gpt-4o", "gpt-4o"),
        ("openai/my-org/gpt-4o", "my-org/gpt-4o"),  # an OpenAI-compatible server's own name
        ("openrouter/anthropic/claude-3.5-sonnet", "anthropic/claude-3.5-sonnet"),
        ("azure/my-gpt-4o-deployment", "my-gpt-4o-deployment"),
        (
            "bedrock/us.anthropic.claude-3-5-haiku-20241022-v1:0",
            "us.anthropic.claude-3-5-haiku-20241022-v1:0",
        ),
        (
            "bedrock/converse/anthropic.claude-3-haiku-20240307-v1:0",
            "anthropic.claude-3-haiku-20240307-v1:0",
        ),
        (
            "bedrock/arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc",
            "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc",
        ),
    ],
)
def test_a_client_spans_request_model_has_no_litellm_prefix(litellm_model: str, asked: str) -> None:
    """Each provider's name for the model, without litellm's provider prefix and Bedrock
    route: an OpenAI-compatible server's, OpenRouter's and Bedrock's own names keep their
    slashes and colons."""
    import asyncio

    captured = Captured()
    model = SimpleNamespace(name="m", tier="closed", litellm_model=litellm_model)
    backend = captured.telemetry.wrap_backend(_Addressed(None))
    asyncio.run(backend.complete(model, {"messages": []}))
    (span,) = captured.finished()
    assert (span.name, span.attributes["gen_ai.request.model"]) == (f"chat {asked}", asked)


def test_the_local_tier_names_its_server_when_it_has_one(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """An external llama.cpp server (``TIERGATE_LOCAL_BASE_URL``) is named as a provider is;
    the in-process model calls no server and names none."""
    fake.reset()
    with FakeProvider() as server:
        with traced(
            tmp_path,
            policy_yaml(fake),
            local_backend="openai_http",
            local_base_url=server.base_url,
        ) as (srv, cap):
            assert _chat(srv, "easy").status_code == 200
        (external,) = cap.by_name("chat local")
        assert external.attributes["server.address"] == "127.0.0.1"
        assert external.attributes["server.port"] == httpx.URL(server.base_url).port
    with traced(tmp_path, policy_yaml(fake), local=ScriptedLocal()) as (srv, cap):
        assert _chat(srv, "easy").status_code == 200
    (in_process,) = cap.by_name("chat local")
    assert "server.address" not in in_process.attributes
    assert "server.port" not in in_process.attributes


class _Addressed:
    """A backend that calls ``url``, and answers at once."""

    def __init__(self, url: str | None) -> None:
        self.url = url

    def server_url(self, model: Any) -> str | None:
        return self.url

    def unavailable_reason(self, model: Any) -> str | None:
        return None

    async def complete(self, model: Any, body: Any, usage: Any = None) -> Any:
        from router.backends import Completion, Usage

        return Completion(body={"choices": []}, usage=Usage(1, 1))


@pytest.mark.parametrize(
    ("url", "server"),
    [
        (
            "https://tiergate:s3cret@gw.example.com/v1/key/sk-s3cret?api-key=s3cret",
            ("gw.example.com", 443),
        ),
        ("http://10.1.2.80:8080/v1", ("10.1.2.80", 8080)),
        ("http://[fd00::1]:4000", ("fd00::1", 4000)),
        (None, None),  # litellm's own default host, not known here
        ("not a url", None),
    ],
)
def test_a_client_span_names_a_host_and_port_never_credentials(
    url: str | None, server: tuple[str, int] | None
) -> None:
    """Only the host and port of the URL called: never a user and password in it, nor a key in
    its path or query, which some gateways' URLs carry."""
    import asyncio

    captured = Captured()
    model = SimpleNamespace(name="m", tier="closed", litellm_model="openai/m")
    backend = captured.telemetry.wrap_backend(_Addressed(url))
    asyncio.run(backend.complete(model, {"messages": []}))
    (span,) = captured.finished()
    attrs = dict(span.attributes or {})
    named = (attrs.get("server.address"), attrs.get("server.port"))
    assert named == (server or (None, None))
    assert not any("s3cret" in str(v) for v in attrs.values())


def test_a_failed_native_call_shows_before_the_fallback(tmp_path: Path, fake: FakeProvider) -> None:
    # "auto" sends a hard request to gpt-4o in the Responses API; it fails, the local one answers.
    body, client_span = _NATIVE_CALLS["/v1/responses"]
    fake.reset(Behaviour(mode="status", status=500, failing_path="/responses"))
    with traced(tmp_path, policy_yaml(fake, on_failure="local"), local=ScriptedLocal()) as (
        srv,
        cap,
    ):
        r = srv.http.post("/v1/responses", json=body)
        assert r.status_code == 200
    assert cap.server_span().attributes["tiergate.fallback"] == "closed->local"
    (failed,) = cap.by_name(client_span)
    (answered,) = cap.by_name("chat local")
    assert failed.status.status_code == StatusCode.ERROR
    assert failed.attributes["error.type"] == "upstream_error"
    assert failed.end_time <= answered.start_time


@pytest.mark.parametrize(
    ("litellm_model", "provider"),
    [
        ("openai/gpt-4o", "openai"),
        ("gpt-4o", "openai"),
        ("anthropic/claude-3-5-sonnet-20241022", "anthropic"),
        ("gemini/gemini-1.5-pro", "gcp.gemini"),
        ("vertex_ai/gemini-1.5-pro", "gcp.vertex_ai"),
        ("bedrock/anthropic.claude-3-sonnet", "aws.bedrock"),
        ("azure/my-gpt-4o-deployment", "azure.ai.openai"),
        ("azure_ai/mistral-large", "azure.ai.inference"),
        ("mistral/mistral-large-latest", "mistral_ai"),
        ("xai/grok-2", "x_ai"),
        ("watsonx/ibm/granite-13b-chat-v2", "ibm.watsonx.ai"),
        ("cohere_chat/command-r", "cohere"),
        ("groq/llama3-70b-8192", "groq"),
    ],
)
def test_provider_name_is_the_semantic_conventions_value(litellm_model: str, provider: str) -> None:
    """gen_ai.provider.name takes the GenAI semantic conventions' well-known values, not
    litellm's prefixes, so dashboards that group by it find every provider."""
    model = SimpleNamespace(tier="closed", litellm_model=litellm_model)
    assert provider_name(model) == provider


def test_log_lines_in_a_traced_request_carry_its_trace_and_span(
    tmp_path: Path, fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """Every JSON log line written while a traced request runs (here the warning about the
    attempt that failed before the fallback, and the request line) names the request's trace
    and span, so a log search by trace id finds them all."""
    fake.reset(Behaviour(mode="status", status=500))
    caplog.set_level(logging.INFO, logger="tiergate")
    caplog.handler.setFormatter(JSONFormatter())  # formats as each record is written
    with traced(tmp_path, policy_yaml(fake, on_failure="local"), local=ScriptedLocal()) as (
        srv,
        cap,
    ):
        r = _chat(srv, "HARD question", headers={"traceparent": TRACEPARENT})
        assert r.status_code == 200 and r.headers["x-tiergate-fallback"] == "closed->local"
    lines = [json.loads(line) for line in caplog.text.splitlines()]
    failed = [line for line in lines if "gpt-4o failed for" in line["msg"]]
    request = [line for line in lines if line["logger"] == "tiergate.request"]
    assert len(failed) == len(request) == 1, lines
    span_id = f"{cap.server_span().context.span_id:016x}"
    for line in failed + request:
        assert (line.get("trace_id"), line.get("span_id")) == (TRACE_ID, span_id), line
    assert not any("trace_id" in line for line in lines if line not in failed + request)
