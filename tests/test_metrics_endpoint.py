"""GET /metrics: Prometheus text that a Prometheus parser reads, counting the traffic sent."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import live, policy_yaml, wait_for
from tests.fake_provider import Behaviour, FakeProvider
from tests.test_gateway import ScriptedLocal


def _families(text: str) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = [(s.name, dict(s.labels), s.value) for s in family.samples]
    return out


def test_metrics_count_the_traffic_sent(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()
    sent = {("local", "ok"): 4, ("closed", "ok"): 3, ("none", "error"): 2}
    with live(
        tmp_path,
        policy_yaml(fake),
        local_backend_obj=ScriptedLocal(),
        local_price_per_mtok=2.0,
    ) as srv:
        client = srv.http

        def chat(content: str, model: str = "auto") -> int:
            body = {"model": model, "messages": [{"role": "user", "content": content}]}
            return client.post("/v1/chat/completions", json=body).status_code

        assert [chat("easy") for _ in range(4)] == [200] * 4
        assert [chat("HARD") for _ in range(3)] == [200] * 3
        assert [chat("x", model="nope") for _ in range(2)] == [404] * 2
        response = client.get("/metrics")
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/plain")
        store = srv.gateway.outcomes
        assert wait_for(lambda: store.flush(0.1) and store.count() == 9)
        records = store.recent(limit=20)

    families = _families(response.text)
    requests = families["tiergate_requests"]
    counted: dict[tuple[str, str], float] = {}
    for name, labels, value in requests:
        assert name == "tiergate_requests_total"
        key = (labels["tier"], labels["status"])
        counted[key] = counted.get(key, 0) + value
    assert counted == sent
    assert {labels["model"] for _, labels, _ in requests} == {"local", "gpt-4o", "none"}

    cost = sum(v for n, _, v in families["tiergate_cost_usd"] if n.endswith("_total"))
    assert cost == pytest.approx(sum(r["cost_usd"] for r in records))
    counterfactual = sum(v for n, _, v in families["tiergate_counterfactual_cost_usd"])
    assert counterfactual == pytest.approx(sum(r["counterfactual_cost_usd"] for r in records))
    assert counterfactual > cost > 0  # local tokens priced, far cheaper than gpt-4o

    tokens = {
        (labels["tier"], labels["type"]): value for _, labels, value in families["tiergate_tokens"]
    }
    assert tokens == {
        ("local", "input"): 12,
        ("local", "output"): 8,
        ("closed", "input"): 33,
        ("closed", "output"): 21,
    }
    duration = families["tiergate_request_duration_seconds"]
    counts = {
        labels["tier"]: value
        for name, labels, value in duration
        if name == "tiergate_request_duration_seconds_count"
    }
    assert counts == {"local": 4, "closed": 3, "none": 2}
    assert families["tiergate_local_queue_depth"][0][2] == 0
    waits = families["tiergate_local_queue_wait_seconds"]
    assert [v for n, _, v in waits if n == "tiergate_local_queue_wait_seconds_count"] == [4]
    assert "tiergate_fallbacks" not in families or not families["tiergate_fallbacks"]


def test_metrics_off_answers_503(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()
    with live(
        tmp_path, policy_yaml(fake), local_backend_obj=ScriptedLocal(), metrics_enabled=False
    ) as srv:
        response = srv.http.get("/metrics")
    assert response.status_code == 503
    assert "metrics are off" in response.text
    # It names the setting that turned them off, not an extra: /metrics needs none.
    assert "TIERGATE_METRICS_ENABLED=false" in response.text
    assert "tiergate[otel]" not in response.text


def test_metrics_name_the_model_that_failed_before_a_fallback(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # gpt-4o answers 500 and claude answers: the requests are ok and fall back, so the
    # request counters name only claude; the failures counter names the provider that failed.
    # (Cooling off: gpt-4o is called by every request; tests/test_cooldown.py has the rest.)
    fake.reset(Behaviour(mode="status", status=500, failing_path="/chat/completions"))
    with live(
        tmp_path,
        policy_yaml(fake, on_failure="closed"),
        local_backend_obj=ScriptedLocal(),
        cooldown_s=0,
    ) as srv:

        def chat() -> int:
            body = {"model": "auto", "messages": [{"role": "user", "content": "HARD"}]}
            return srv.http.post("/v1/chat/completions", json=body).status_code

        assert [chat() for _ in range(3)] == [200] * 3
        fake.reset(Behaviour(mode="rate_limit"))  # now both providers say "later"
        assert chat() == 429
        families = _families(srv.http.get("/metrics").text)

    failures = {
        (labels["tier"], labels["model"], labels["error_type"]): value
        for name, labels, value in families["tiergate_upstream_failures"]
        if name == "tiergate_upstream_failures_total"
    }
    assert failures == {
        ("closed", "gpt-4o", "upstream_error"): 3,
        ("closed", "gpt-4o", "upstream_rate_limited"): 1,
        ("closed", "claude", "upstream_rate_limited"): 1,
    }
    fallbacks = {labels["model"]: v for _, labels, v in families["tiergate_fallbacks"]}
    assert fallbacks == {"claude": 3}


def test_metrics_name_the_classifier_serving_and_follow_a_promotion(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """Which model decides is what an operator checks after a retrain: /metrics names the
    store version and the model it is built on, and follows a promotion and a rollback."""
    from router.artifact import save_learned_profile
    from router.locations import shipped
    from router.profile import default_profile
    from router.registry import ModelStore

    fake.reset()
    models = ModelStore(tmp_path / "store")
    models.adopt(shipped("models", "router-v6"))  # the static router: no encoder to load
    lineage = {"parent": "v0001", "gate": {"decision": "promoted"}}
    profile = default_profile()
    save_learned_profile(
        models.path("v0001"),
        models.versions_dir / "v0002",
        profile,
        profile,
        metadata={"lineage": lineage},
    )

    def info(srv: Any) -> list[dict[str, str]]:
        families = _families(srv.http.get("/metrics").text)
        series = families["tiergate_classifier_info"]
        return [{k: labels[k] for k in ("version", "model")} for _, labels, v in series if v == 1]

    with live(
        tmp_path,
        policy_yaml(fake),
        scorer=None,
        local_backend="none",
        model_store=models.root,
        model_watch_s=0.05,
    ) as srv:
        assert info(srv) == [{"version": "v0001", "model": "router-v6"}]
        models.promote("v0002")
        assert wait_for(lambda: info(srv) == [{"version": "v0002", "model": "router-v6"}])
        models.rollback()
        assert wait_for(lambda: info(srv) == [{"version": "v0001", "model": "router-v6"}])


def test_the_fallback_labels_and_the_alert_on_them_are_documented(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """tiergate_fallbacks_total also counts a cascade's escalations (``cascade->closed``) and
    requests served locally for want of a closed key (``no-closed->local``): the docs named
    neither, and their TiergateFallbackShareHigh alert fired on a cascade working as meant."""
    from tests.scripted_local import ScriptedLocal as ScriptedStream
    from tests.test_cascade_gateway import CASCADE_POLICY, DOUBTFUL, _confidence_model

    fake.reset()
    local = ScriptedStream()
    local.logprob = DOUBTFUL
    policy = policy_yaml(fake, on_failure="closed", extra=CASCADE_POLICY).replace(
        "  auto-best: {threshold: 0.05}\n",
        "  auto-best: {threshold: 0.05}\n  auto-cascade: {cascade: true}\n",
    )
    with live(
        tmp_path, policy, local_backend_obj=local, cascade_model_path=_confidence_model(tmp_path)
    ) as srv:

        def chat(content: str, model: str = "auto") -> int:
            body = {"model": model, "messages": [{"role": "user", "content": content}]}
            return srv.http.post("/v1/chat/completions", json=body).status_code

        assert chat("easy", model="auto-cascade") == 200  # doubtful: escalated
        local.mode = "fail"
        assert chat("easy") == 200  # the local model failed: gpt-4o answered
        local.mode = "ok"
        for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
            monkeypatch.delenv(key)
        assert chat("HARD") == 200  # routed closed, no key: served locally
        families = _families(srv.http.get("/metrics").text)

    seen = {labels["fallback"] for _, labels, _ in families["tiergate_fallbacks"]}
    assert seen == {"cascade->closed", "local->closed", "no-closed->local"}
    doc = (Path(__file__).resolve().parents[1] / "docs" / "observability.md").read_text()
    (row,) = [line for line in doc.splitlines() if line.startswith("| `tiergate.fallbacks` |")]
    assert sorted(label for label in seen if f"`{label}`" not in row) == []
    alert = doc[doc.index("alert: TiergateFallbackShareHigh") :]
    excluded = re.search(r'fallback!~"([^"]+)"', alert)
    assert excluded is not None
    not_failures = {"cascade->closed", "no-closed->local", "local-full->closed"}
    assert {label for label in seen | not_failures if re.fullmatch(excluded[1], label)} == (
        not_failures
    )
    # The client-errors alert counts an overloaded provider's 503 (no model left) too.
    errors = re.search(r'error_type=~"([^"]+)"', doc[doc.index("alert: TiergateClientErrors") :])
    assert errors is not None and re.fullmatch(errors[1], "upstream_overloaded")
