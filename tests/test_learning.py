"""Quality signals end to end: feedback (tenant-isolated), shadow judging, escalation."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from router.auth import hash_key
from router.backends.closed import ANTHROPIC_MAX_TOKENS
from router.dashboard import _usd
from router.learning import JUDGE_TOKENS, LearningLoop, closed_better, parse_verdict
from router.outcomes import SQLiteOutcomeStore
from router.outcomes_redis import RedisOutcomeStore
from router.signals import estimate_tokens
from tests.conftest import ErasingStore, LiveServer, SlowReserve, live, policy_yaml, wait_for
from tests.fake_provider import Behaviour, FakeProvider

TENANTS = ("acme", "globex", "t", "default")


def _key(tenant: str) -> str:
    return f"tg-test-key-{tenant}"


@contextmanager
def serve(
    tmp_path: Path, policy: str, outcomes: Any = None, **settings: Any
) -> Iterator[LiveServer]:
    """A live app with one API key per test tenant (real auth: the key names the tenant);
    ``settings`` as :func:`~tests.conftest.live` takes them."""
    keys = tmp_path / "keys.yaml"
    entries = [
        {"sha256": hash_key(_key(t)), "tenant": t, "permissions": ["pin_closed"]} for t in TENANTS
    ]
    entries.append({"sha256": hash_key(_key("ops")), "tenant": "ops", "permissions": ["admin"]})
    keys.write_text(yaml.safe_dump({"keys": entries}))
    with live(tmp_path, policy, outcomes=outcomes, api_keys_file=keys, **settings) as server:
        yield server


def _outcomes(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Any:
    """The outcome store a ``backend``-parametrized test serves with: None (the app's own
    SQLite store), or a Redis store on a real redis-server."""
    if backend != "redis":
        return None
    server = request.getfixturevalue("redis_server")
    return RedisOutcomeStore(server.url, journal=tmp_path / "journal.jsonl")


def chat(
    srv: LiveServer, tenant: str, text: str, model: str = "auto", **extra: Any
) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "max_tokens": 4,
        **extra,
    }
    return srv.http.post(
        "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {_key(tenant)}"}
    )


def feedback(srv: LiveServer, tenant: str, **body: Any) -> httpx.Response:
    return srv.http.post(
        "/v1/feedback", json=body, headers={"authorization": f"Bearer {_key(tenant)}"}
    )


def labels(srv: LiveServer, source: str) -> list[dict[str, Any]]:
    store = srv.gateway.outcomes
    store.flush(10)
    return [x for x in store.labels() if x["source"] == source]


def judge_calls(fake: FakeProvider) -> list[Any]:
    return [r for r in fake.received if "impartial judge" in str(r.body.get("messages"))]


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_feedback_is_tenant_isolated(
    tmp_path: Path, fake: FakeProvider, backend: str, request: pytest.FixtureRequest
) -> None:
    fake.reset()
    outcomes = _outcomes(backend, tmp_path, request)
    with serve(tmp_path, policy_yaml(fake), outcomes) as srv:
        local = chat(srv, "acme", "say hi")
        assert local.headers["x-tiergate-tier"] == "local"
        rid = local.headers["x-request-id"]
        closed = chat(srv, "acme", "HARD question")
        assert closed.headers["x-tiergate-tier"] == "closed"

        other = feedback(srv, "globex", request_id=rid, thumbs="down")
        unknown = feedback(srv, "globex", request_id="req_doesnotexist", thumbs="down")
        assert other.status_code == unknown.status_code == 404
        # Another tenant's request and a request that never existed look exactly alike.
        assert other.json()["error"]["code"] == unknown.json()["error"]["code"]

        ok = feedback(srv, "acme", request_id=rid, thumbs="down", comment="wrong")
        assert ok.status_code == 200
        assert ok.json()["value"] == 1.0 and ok.json()["quality"] == 0.0
        scored = feedback(srv, "acme", request_id=closed.headers["x-request-id"], score=0.9)
        assert scored.json()["value"] is None and scored.json()["quality"] == 0.9
        assert feedback(srv, "acme", request_id=rid).status_code == 400
        assert feedback(srv, "acme", request_id=rid, score=1.5).status_code == 400
        assert feedback(srv, "acme", request_id=rid, score="0.5").status_code == 400  # a number
        both = feedback(srv, "acme", request_id=rid, score=0.2, thumbs="up")
        assert both.status_code == 400 and both.json()["error"]["param"] == "thumbs"
        # A request answered with an error served nothing to rate.
        refused = chat(srv, "acme", "say hi", max_tokens=-1)
        assert refused.status_code == 400
        srv.gateway.outcomes.flush(10)
        nothing = feedback(srv, "acme", request_id=refused.headers["x-request-id"], thumbs="up")
        assert nothing.status_code == 400 and "served no answer" in nothing.text

        stored = labels(srv, "feedback")
        assert {(x["request_id"], x["tenant"], x["value"]) for x in stored} == {
            (rid, "acme", 1.0),
            (closed.headers["x-request-id"], "acme", None),
        }
        # an admin key may label any tenant's request (router.auth.check_record_access);
        # the label stays acme's
        admin = feedback(srv, "ops", request_id=rid, score=1.0)
        assert admin.status_code == 200, admin.text
        assert feedback(srv, "ops", request_id="req_doesnotexist", score=1.0).status_code == 404
        assert any(x["tenant"] == "acme" and x["quality"] == 1.0 for x in labels(srv, "feedback"))


def test_shadow_judging_runs_in_the_background_and_labels(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # The closed provider stalls until told: the user's local answer must not wait for the shadow.
    fake.reset(Behaviour(mode="stall", stall_s=60.0, judge="closed"))
    policy = policy_yaml(fake, shadow="{sample_rate: 1.0}")
    with serve(tmp_path, policy) as srv:
        resp = chat(srv, "acme", "tell me a joke")
        assert resp.headers["x-tiergate-tier"] == "local"
        assert wait_for(lambda: len(fake.received) == 1)  # the shadow asked the closed model
        assert labels(srv, "shadow") == [] and fake.stalls_ended == 0  # answered meanwhile
        fake.behaviour = Behaviour(judge="closed")  # the judge calls do not stall
        fake.unstall()
        assert wait_for(lambda: labels(srv, "shadow"), 30)
        (label,) = labels(srv, "shadow")
        assert label["request_id"] == resp.headers["x-request-id"]
        assert label["value"] == 1.0 and label["tenant"] == "acme"
        assert [v["verdict"] for v in label["detail"]["verdicts"]] == ["A", "B"]  # both orders
        assert label["cost_usd"] > 0
        assert srv.gateway.outcomes.spend_today("acme") >= label["cost_usd"]
        # The closed model saw the user's request; the judge saw both answers, both ways round.
        asked = [r for r in fake.received if r not in judge_calls(fake)]
        assert asked[0].body["messages"] == [{"role": "user", "content": "tell me a joke"}]
        assert len(judge_calls(fake)) == 2

        fake.reset(Behaviour(judge="local"))
        streamed = chat(srv, "acme", "another joke", stream=True)
        assert streamed.headers["x-tiergate-tier"] == "local"
        assert wait_for(lambda: len(labels(srv, "shadow")) == 2, 20)
        second = next(
            x for x in labels(srv, "shadow") if x["request_id"] == streamed.headers["x-request-id"]
        )
        assert second["value"] == 0.0

        # Cost watchers see the judging: its spend on the dashboard (apart from serving's) and
        # in /metrics, with the judgements by outcome.
        ops = {"authorization": f"Bearer {_key('ops')}"}
        spent = label["cost_usd"] + second["cost_usd"]
        data = srv.http.get("/dashboard/data?window_s=900", headers=ops).json()
        assert data["judging"] == {
            "judgements": 2,
            "cost_usd": pytest.approx(spent),
            "erased_usd": 0.0,
        }
        assert data["summary"]["totals"]["cost_usd"] == 0.0  # both answers were local
        page = srv.http.get("/dashboard?window_s=900", headers=ops).text
        assert 'data-kpi="judging"' in page
        families = {
            f.name: [(x.labels, x.value) for x in f.samples if x.name.endswith("_total")]
            for f in text_string_to_metric_families(srv.http.get("/metrics", headers=ops).text)
        }
        ((cost_labels, cost),) = families["tiergate_shadow_cost_usd"]
        assert cost_labels["tenant"] == "acme" and cost == pytest.approx(spent)
        judged = {x["outcome"]: v for x, v in families["tiergate_shadow_judgements"]}
        assert judged == {"labelled": 2, "failed": 0, "skipped": 0}


def test_the_dashboards_total_spend_is_what_the_budget_counts(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """The dashboard's spend left out shadow judging, which the budget's ``spend_today``
    counts: the page said less than the tenant had spent against its budget. It now shows
    serving and judging apart and their sum, which is the budget's figure."""
    fake.reset(Behaviour(judge="closed"))
    with serve(tmp_path, policy_yaml(fake, shadow="{sample_rate: 1.0}")) as srv:
        for i in range(3):
            assert chat(srv, "acme", f"tell me joke {i}").headers["x-tiergate-tier"] == "local"
        assert chat(srv, "acme", "a HARD question").headers["x-tiergate-tier"] == "closed"
        assert chat(srv, "globex", "a HARD one").headers["x-tiergate-tier"] == "closed"
        learning = srv.gateway.learning
        assert wait_for(lambda: learning.pending == 0 and len(labels(srv, "shadow")) == 3, 30)
        ops = {"authorization": f"Bearer {_key('ops')}"}
        every = srv.http.get("/dashboard/data?window_s=900", headers=ops).json()
        acme = srv.http.get("/dashboard/data?window_s=900&tenant=acme", headers=ops).json()
        page = srv.http.get("/dashboard?window_s=900", headers=ops).text
        store = srv.gateway.outcomes
        today = {t: store.spend_today(t) for t in ("acme", "globex")}
        judged = sum(x["cost_usd"] for x in labels(srv, "shadow"))
    assert every["summary"]["totals"]["cost_usd"] < sum(today.values())  # judging left out
    assert every["spend"]["total_usd"] == pytest.approx(sum(today.values()))
    assert acme["spend"]["total_usd"] == pytest.approx(today["acme"])
    assert acme["spend"] == {
        "requests_usd": pytest.approx(acme["summary"]["totals"]["cost_usd"]),
        "judging_usd": pytest.approx(judged),
        "total_usd": pytest.approx(today["acme"]),
    }
    assert judged > 0 and acme["spend"]["requests_usd"] > 0
    # The page shows the three apart: serving, judging, and the sum.
    for kpi, usd in (
        ("cost", every["spend"]["requests_usd"]),
        ("judging", judged),
        ("total_spend", sum(today.values())),
    ):
        assert f'data-kpi="{kpi}"><div class="v">{_usd(usd)}</div>' in page


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_shadow_judging_stays_within_the_tenant_budget(
    tmp_path: Path, fake: FakeProvider, backend: str, request: pytest.FixtureRequest
) -> None:
    # Shadow calls held nothing against the budget: 20 local answers, each shadowed while
    # the closed model was slow, spent $0.0059 of shadow calls against a $0.0003 budget.
    fake.reset(Behaviour(mode="stall", stall_s=60.0, judge="closed"))
    outcomes = _outcomes(backend, tmp_path, request)
    policy = policy_yaml(
        fake,
        shadow="{sample_rate: 1.0}",
        queue_full="reject",  # a local answer holds nothing: only the shadow spends
        on_failure="error",
        extra="tenants:\n  acme: {daily_budget_usd: 0.0003, over_budget: reject}\n",
    )
    with serve(tmp_path, policy, outcomes) as srv:
        for i in range(20):
            assert chat(srv, "acme", f"tell me joke {i}").headers["x-tiergate-tier"] == "local"
        learning = srv.gateway.learning
        assert learning.shadow_started >= 1
        fake.behaviour = Behaviour(judge="closed")
        fake.unstall()
        assert wait_for(lambda: learning.pending == 0, 30)
        shadows = labels(srv, "shadow")
        spent = sum(x["cost_usd"] for x in shadows)
        # Each judgement held its estimate: once one was held, the budget was spent.
        assert 0 < spent <= 0.0003 + max(x["cost_usd"] for x in shadows), (spent, len(shadows))
        # The holds are gone: what is left counts against the budget is what was spent.
        assert srv.gateway.outcomes.spend_today("acme") == pytest.approx(spent)
        if spent < 0.0003:  # and no hold is left over (in Redis too) to refuse the next request
            assert chat(srv, "acme", "a HARD question").headers["x-tiergate-tier"] == "closed"


def test_shadow_judging_of_text_no_tokenizer_merges_stays_within_the_budget(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # The judge's prompt, which repeats the question, was held at Tiergate's estimate: a
    # question of "a\n" repeated is billed a token a byte, 3.5 times that, and concurrent
    # judgements spent past the budget by more than one of them.
    fake.reset(Behaviour(mode="stall", stall_s=60.0, judge="closed", bill_bytes=True))
    budget = 0.3  # each judgement about $0.14 at gpt-4o's prices
    policy = policy_yaml(
        fake,
        shadow="{sample_rate: 1.0}",
        queue_full="reject",
        on_failure="error",
        extra=f"tenants:\n  acme: {{daily_budget_usd: {budget}, over_budget: reject}}\n",
    ).replace("context_window: 2048", "context_window: 32768")  # the local model takes it
    with serve(tmp_path, policy) as srv:
        for i in range(12):
            asked = chat(srv, "acme", f"{i} " + "a\n" * 9000)
            assert asked.headers["x-tiergate-tier"] == "local"
        learning = srv.gateway.learning
        fake.behaviour = Behaviour(judge="closed", bill_bytes=True)
        fake.unstall()
        assert wait_for(lambda: learning.pending == 0, 60)
        costs = [x["cost_usd"] for x in labels(srv, "shadow")]
    assert len(costs) >= 2
    assert sum(costs) <= budget + max(costs), (sum(costs), len(costs))


def test_a_failed_judgement_is_logged_with_personal_data_redacted(
    tmp_path: Path, fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    # The provider's error text was logged whole: one that repeats the prompt put it there.
    caplog.set_level(logging.WARNING, logger="tiergate.learning")
    echo = {"error": {"message": "no answer for jane.doe@example.com"}}
    fake.reset(Behaviour(mode="status", status=500, error_body=echo))
    with serve(tmp_path, policy_yaml(fake, shadow="{sample_rate: 1.0}")) as srv:
        assert chat(srv, "acme", "tell me a joke").headers["x-tiergate-tier"] == "local"
        learning = srv.gateway.learning
        assert wait_for(lambda: learning.pending == 0, 30)
        assert learning.shadow_failed == 1
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "jane.doe" not in logged
    assert "shadow judgement of" in logged and "[EMAIL]" in logged


def test_a_feedback_comment_is_stored_with_personal_data_redacted(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # The prompt was kept local and not stored (a local_only rule's default); the comment on
    # its answer, stored as sent, held the same phone number.
    fake.reset()
    with serve(tmp_path, policy_yaml(fake, store_prompts="full")) as srv:
        asked = chat(srv, "acme", "Call me on +33 6 12 34 56 78 about my order")
        assert asked.headers["x-tiergate-rule"] == "pii-stays-local"
        rid = asked.headers["x-request-id"]
        srv.gateway.outcomes.flush(10)
        comment = "it got my number +33 6 12 34 56 78 wrong"
        answered = feedback(srv, "acme", request_id=rid, thumbs="down", comment=comment)
        assert answered.status_code == 200
        (stored,) = labels(srv, "feedback")
        record = srv.gateway.outcomes.get(rid)
    assert record is not None and record["prompt"] is None
    assert stored["comment"] == "it got my number [PHONE] wrong"
    assert fake.received == []


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_shadow_stopped_while_its_hold_is_made_leaves_no_hold(
    tmp_path: Path,
    fake: FakeProvider,
    backend: str,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A shadow judgement holds its estimate against the budget in a worker thread. Stopped
    meanwhile (at shutdown, ``LearningLoop.drain``), it ended at once and the thread then made
    the hold: one of no judgement, counted in the tenant's spend until the process ended (in
    Redis until it lapsed). It now waits for the hold and releases it."""
    fake.reset(Behaviour(judge="closed"))
    outcomes = _outcomes(backend, tmp_path, request)
    policy = policy_yaml(
        fake,
        shadow="{sample_rate: 1.0}",
        extra="tenants:\n  acme: {daily_budget_usd: 5, over_budget: reject}\n",
    )
    with serve(tmp_path, policy, outcomes) as srv:
        store, learning = srv.gateway.outcomes, srv.gateway.learning
        held = SlowReserve(store, lambda request_id, budget: request_id.endswith(":shadow"))
        monkeypatch.setattr(store, "reserve_spend", held)
        assert chat(srv, "acme", "tell me a joke").headers["x-tiergate-tier"] == "local"
        assert held.writing.wait(10)  # the shadow holds its estimate

        async def stop() -> None:  # as drain does at shutdown
            for task in set(learning._tasks):
                task.cancel()

        srv.run(stop)
        held.let_write.set()
        assert held.written.wait(10)
        assert wait_for(lambda: learning.pending == 0)
        assert judge_calls(fake) == [] and fake.received == []
        assert wait_for(lambda: store.spend_today("acme") == 0.0, 3), store.spend_today("acme")


def _judge_down(question: str, answer_a: str, answer_b: str) -> str:
    raise RuntimeError("the judge is down")  # the fake drops the connection: a failed call


def test_a_failed_judgement_still_counts_what_it_spent(tmp_path: Path, fake: FakeProvider) -> None:
    # The closed model answered and the judge failed: the answer was paid for, but nothing
    # was stored, so five shadowed requests cost $0 against the budget.
    fake.reset(Behaviour(judge_fn=_judge_down))
    with serve(tmp_path, policy_yaml(fake, shadow="{sample_rate: 1.0}")) as srv:
        for i in range(5):
            assert chat(srv, "acme", f"tell me joke {i}").headers["x-tiergate-tier"] == "local"
        learning = srv.gateway.learning
        assert wait_for(lambda: learning.pending == 0, 30)
        assert learning.shadow_failed == 5 and learning.shadow_labelled == 0
        asked = [r for r in fake.received if r not in judge_calls(fake)]
        assert len(asked) == 5  # five closed answers the provider billed
        shadows = labels(srv, "shadow")
        assert len(shadows) == 5 and all(x["value"] is None for x in shadows)
        assert all(x["detail"]["error"] for x in shadows)
        one = srv.gateway.costs.closed_cost("openai/gpt-4o", 11, 7)
        assert srv.gateway.outcomes.spend_today("acme") == pytest.approx(5 * one)


def test_a_shadowed_anthropic_request_goes_without_what_the_closed_model_refuses(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # A /v1/messages request served locally was shadowed to gpt-4o with top_k and thinking
    # (as reasoning_effort), which OpenAI refuses: every such judgement failed.
    fake.reset(Behaviour(strict=True, judge="closed"))
    with serve(tmp_path, policy_yaml(fake, shadow="{sample_rate: 1.0}")) as srv:
        answer = srv.http.post(
            "/v1/messages",
            json={
                "model": "auto",
                "max_tokens": 4,
                "messages": [{"role": "user", "content": "tell me a joke"}],
                "top_k": 5,
                "thinking": {"type": "enabled", "budget_tokens": 1024},
            },
            headers={"authorization": f"Bearer {_key('acme')}"},
        )
        assert answer.headers["x-tiergate-tier"] == "local"
        assert wait_for(lambda: labels(srv, "shadow"), 30)
        (label,) = labels(srv, "shadow")
        assert label["value"] == 1.0 and "error" not in label["detail"]
        asked = next(r for r in fake.received if r not in judge_calls(fake))
        assert "top_k" not in asked.body and "reasoning_effort" not in asked.body


#: About 1,430 tokens by Tiergate's estimate (1,250 by the fake provider's): within the local
#: model's window (2048).
LONG = "word " * 1000
CLAUDE = "claude-3-5-sonnet-20241022"


def _windowed(fake: FakeProvider, windows: dict[str, int], first: str = "gpt-4o") -> str:
    """The shadowing test policy with ``first`` as the default closed model, and the context
    windows ``windows`` gives (by model name) in the policy."""
    others = ", ".join(n for n in ("gpt-4o", "claude") if n != first)
    policy = policy_yaml(fake, shadow="{sample_rate: 1.0}").replace(
        "closed_models: [gpt-4o, claude]", f"closed_models: [{first}, {others}]"
    )
    for name, window in windows.items():
        policy = policy.replace(f"  {name}:\n", f"  {name}:\n    context_window: {window}\n", 1)
    return policy


def _ask_long(srv: LiveServer) -> httpx.Response:
    body = {"model": "auto", "messages": [{"role": "user", "content": LONG}]}
    return srv.http.post(
        "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {_key('acme')}"}
    )


def test_a_shadowed_claude_is_sent_no_more_max_tokens_than_its_window_leaves(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """The shadow asked the closed model as no served call is asked: a Claude was sent its
    whole output limit (4096 here) on a request without ``max_tokens``, not cut to what its window
    leaves after the prompt as the gateway cuts it, and Anthropic refused (400): every
    judgement of a long request failed. It is sent what a served call would be."""
    fake.reset(Behaviour(judge="closed", context_windows={CLAUDE: 5000}))
    policy = _windowed(fake, {"claude": 5000}, first="claude")
    with serve(tmp_path, policy, judge_model="gpt-4o") as srv:
        assert _ask_long(srv).headers["x-tiergate-tier"] == "local"
        learning = srv.gateway.learning
        assert wait_for(lambda: learning.pending == 0 and learning.shadow_started == 1, 30)
        assert learning.shadow_failed == 0
        (label,) = labels(srv, "shadow")
        assert label["value"] == 1.0 and "error" not in label["detail"]
    asked = next(r for r in fake.received if r not in judge_calls(fake))
    assert asked.path == "/v1/messages"
    sent = [{"role": "user", "content": LONG}]
    assert asked.body["max_tokens"] == 5000 - estimate_tokens(sent) < ANTHROPIC_MAX_TOKENS
    # gpt-4o, an OpenAI model on the direct path, takes the limit as max_completion_tokens.
    judged = [r.body["max_completion_tokens"] for r in judge_calls(fake)]
    assert judged == [JUDGE_TOKENS, JUDGE_TOKENS]


def test_a_judge_that_refuses_temperature_is_sent_none(tmp_path: Path, fake: FakeProvider) -> None:
    """The judge was sent temperature 0 whatever model judged: OpenAI's reasoning models (o3,
    gpt-5) refuse any but 1 with a 400, so with one as the judge every judgement failed, the
    closed answer it judged paid for. Such a judge is sent none (its default, 1)."""
    fake.reset(Behaviour(judge="closed", strict=True))
    o3 = f"  o3:\n    tier: closed\n    litellm_model: openai/o3\n    api_base: {fake.base_url}\n"
    policy = _windowed(fake, {}).replace("  gpt-4o:\n", o3 + "  gpt-4o:\n", 1)
    with serve(tmp_path, policy, judge_model="o3") as srv:
        assert _ask_long(srv).headers["x-tiergate-tier"] == "local"
        learning = srv.gateway.learning
        assert wait_for(lambda: learning.pending == 0 and learning.shadow_started == 1, 30)
        (label,) = labels(srv, "shadow")
        assert (label["value"], label["detail"].get("error")) == (1.0, None), label
    assert [(r.body["model"], r.body.get("temperature")) for r in judge_calls(fake)] == [
        ("o3", None),
        ("o3", None),
    ]


@pytest.mark.parametrize("window", [None, 2050], ids=["unwindowed", "windowed"])
def test_a_judge_that_writes_less_is_sent_its_own_output_limit(
    tmp_path: Path, fake: FakeProvider, window: int | None
) -> None:
    """A judge whose policy ``max_output_tokens`` is under 512 was sent ``max_tokens: 512``
    all the same (its provider refuses that), and its window was checked for 512: a request
    it could judge with its own limit (1,668 + 256 tokens in 2,050) was skipped. It is sent,
    and checked for, its limit."""
    windows = {} if window is None else {"gpt-4o": window}
    fake.reset(Behaviour(judge="closed", context_windows=windows))
    policy = _windowed(fake, windows).replace(
        "  gpt-4o:\n", "  gpt-4o:\n    max_output_tokens: 256\n", 1
    )
    with serve(tmp_path, policy) as srv:  # gpt-4o answers and judges
        assert _ask_long(srv).headers["x-tiergate-tier"] == "local"
        learning = srv.gateway.learning
        assert wait_for(lambda: learning.pending == 0 and learning.shadow_started == 1, 30)
        assert (learning.shadow_skipped, learning.shadow_failed) == (0, 0)
        (label,) = labels(srv, "shadow")
        assert label["value"] == 1.0 and "error" not in label["detail"]
    assert [r.body["max_completion_tokens"] for r in judge_calls(fake)] == [256, 256]


@pytest.mark.parametrize(
    ("windows", "judge"),
    [({"gpt-4o": 1000}, None), ({"claude": 1500}, "claude")],
    ids=["closed-model", "judge"],
)
def test_no_shadow_for_a_request_the_closed_model_or_judge_cannot_take(
    tmp_path: Path, fake: FakeProvider, windows: dict[str, int], judge: str | None
) -> None:
    """A request over the closed model's window was shadowed all the same (its 400 failed the
    judgement), and one the judge could not read with the local answer had the closed model
    answer it (billed to the tenant) and then the judge refuse it. Neither is judged: it is
    skipped, before anything is sent or spent."""
    provider_windows = {("gpt-4o" if n == "gpt-4o" else CLAUDE): w for n, w in windows.items()}
    fake.reset(Behaviour(judge="closed", context_windows=provider_windows))
    with serve(tmp_path, _windowed(fake, windows), judge_model=judge) as srv:
        assert _ask_long(srv).headers["x-tiergate-tier"] == "local"
        learning = srv.gateway.learning
        assert wait_for(lambda: learning.pending == 0, 30)
        assert labels(srv, "shadow") == []
        assert srv.gateway.outcomes.spend_today("acme") == 0
        assert (learning.shadow_skipped, learning.shadow_failed) == (1, 0)
    assert fake.received == []


def test_a_closed_answer_the_judge_cannot_read_is_not_sent_to_it(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """The closed answer, added to the question and the local answer, was over the judge's
    window: the judge was asked all the same and refused (400). It is not asked: the label
    keeps what the closed answer cost and says why there is no verdict."""
    long_answer = "word " * 600
    fake.reset(Behaviour(judge="closed", text=long_answer, context_windows={"gpt-4o": 2700}))
    with serve(tmp_path, _windowed(fake, {"gpt-4o": 2700})) as srv:
        assert _ask_long(srv).headers["x-tiergate-tier"] == "local"
        learning = srv.gateway.learning
        assert wait_for(lambda: learning.pending == 0 and labels(srv, "shadow"), 30)
        (label,) = labels(srv, "shadow")
    assert judge_calls(fake) == []
    assert label["value"] is None and label["detail"]["error"] == "context_length_exceeded"
    assert label["cost_usd"] > 0  # the closed answer was paid for


def test_no_shadow_for_local_only_traffic(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()
    policy = policy_yaml(fake, shadow="{sample_rate: 1.0}")
    with serve(tmp_path, policy) as srv:
        resp = chat(srv, "acme", "my PII is here")
        assert resp.headers["x-tiergate-rule"] == "pii-stays-local"
        time.sleep(0.5)
        assert fake.received == [] and srv.gateway.learning.shadow_started == 0


def test_code_guard_refuses_shadow_for_local_only() -> None:
    """Even if a decision claimed a shadow rate, local_only traffic is never shadowed."""

    async def go() -> int:
        loop = LearningLoop(SimpleNamespace(), rng=lambda: 0.0)
        ctx = SimpleNamespace(
            request_id="r1",
            tenant="t",
            served=SimpleNamespace(model=SimpleNamespace(tier="local")),
            decision=SimpleNamespace(local_only=True, shadow_rate=1.0),
        )
        loop.after_response(ctx, {"messages": []}, "answer")
        return loop.shadow_started

    assert asyncio.run(go()) == 0


def test_escalation_labels_the_earlier_local_answer(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()
    with serve(tmp_path, policy_yaml(fake)) as srv:
        first = chat(srv, "acme", "what is a monad")
        assert first.headers["x-tiergate-tier"] == "local"
        chat(srv, "globex", "what is a monad", model="gpt-4o")  # another tenant: not an escalation
        assert labels(srv, "escalation") == []
        chat(srv, "acme", "what is a monad", model="gpt-4o")
        (label,) = labels(srv, "escalation")
        assert label["request_id"] == first.headers["x-request-id"]
        assert label["value"] == 1.0 and label["tenant"] == "acme"


@pytest.mark.parametrize(
    ("verdicts", "value"),
    [
        ([("A", "A"), ("B", "B")], 1.0),
        ([("A", "B"), ("B", "A")], 0.0),
        ([("A", "A"), ("B", "A")], 0.5),  # position bias: the orders disagree, a tie
        ([("A", "C"), ("B", None)], 0.5),
        ([("A", None), ("B", None)], None),
    ],
)
def test_verdicts_average_over_both_orders(
    verdicts: list[tuple[str, str | None]], value: float | None
) -> None:
    assert closed_better(verdicts) == value


def test_parse_verdict_takes_the_last_one() -> None:
    assert parse_verdict("A is [[A]]-like, but final: [[B]]") == "B"
    assert parse_verdict("no verdict") is None


def test_the_judging_spend_of_an_erased_request_stays_on_the_dashboard(
    tmp_path: Path, fake: FakeProvider, erasing: ErasingStore
) -> None:
    """After `tiergate outcomes delete`, the erased request's shadow judgement dropped off the
    dashboard's judging spend while the budget still counted it: money spent is spent. The
    dashboard keeps it, as a sum per 30 s and tenant hash that names no request or tenant."""
    fake.reset(Behaviour(judge="closed"))
    ops = {"authorization": f"Bearer {_key('ops')}"}
    policy = policy_yaml(fake, shadow="{sample_rate: 1.0}")
    with serve(tmp_path, policy, erasing.make()) as srv:
        answers = [chat(srv, "acme", "tell me a joke"), chat(srv, "globex", "another joke")]
        assert [a.headers["x-tiergate-tier"] for a in answers] == ["local", "local"]
        assert wait_for(lambda: len(labels(srv, "shadow")) == 2, 30)
        store = srv.gateway.outcomes

        def judging(query: str = "") -> dict[str, Any]:
            url = f"/dashboard/data?window_s=900{query}"
            data: dict[str, Any] = srv.http.get(url, headers=ops).json()["judging"]
            return data

        before, acme_before = judging(), judging("&tenant=acme")
        spent = {t: store.spend_today(t) for t in ("acme", "globex")}
        erased = answers[0].headers["x-request-id"]
        (erased_cost,) = [x["cost_usd"] for x in labels(srv, "shadow") if x["request_id"] == erased]
        assert erased_cost > 0
        assert erasing.delete("--request-id", erased) == 0
        assert store.get(erased) is None and store.labels_of(erased) == []
        after, acme_after, globex = judging(), judging("&tenant=acme"), judging("&tenant=globex")
        assert {t: store.spend_today(t) for t in ("acme", "globex")} == spent
    assert after["judgements"] == before["judgements"] - 1  # the verdict went with the record
    assert after["cost_usd"] == pytest.approx(before["cost_usd"])
    assert after["erased_usd"] == pytest.approx(erased_cost)
    assert acme_after["cost_usd"] == pytest.approx(acme_before["cost_usd"])
    assert acme_after == {"judgements": 0, "cost_usd": pytest.approx(erased_cost),
                          "erased_usd": pytest.approx(erased_cost)}  # fmt: skip
    assert globex["erased_usd"] == 0.0
    if erasing.backend == "sqlite":  # what stays of it names neither the request nor the tenant
        with sqlite3.connect(tmp_path / "outcomes.db") as db:
            kept = db.execute("SELECT * FROM erased_spend").fetchall()
        assert len(kept) == 1 and "acme" not in str(kept) and erased not in str(kept)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_stream_answered_across_its_tenant_s_erasure_is_not_recorded(
    tmp_path: Path, fake: FakeProvider, backend: str, request: pytest.FixtureRequest
) -> None:
    """`tiergate outcomes delete --tenant acme` while a stream of acme's from the closed model
    was still being answered: its record, made when it ended, was written under acme's name
    with its prompt. A request acme makes after the erasure is recorded."""
    fake.reset(Behaviour(mode="stall", stall_s=60.0))
    outcomes: Any = None
    if backend == "redis":
        server = request.getfixturevalue("redis_server")
        outcomes = RedisOutcomeStore(server.url, journal=tmp_path / "journal.jsonl")
    with (
        serve(tmp_path, policy_yaml(fake), outcomes) as srv,
        ThreadPoolExecutor(1) as pool,
    ):
        store = srv.gateway.outcomes
        asked = pool.submit(chat, srv, "acme", "Dana White asks", model="gpt-4o", stream=True)
        assert wait_for(lambda: len(fake.received) == 1)  # the provider holds the answer back
        if backend == "redis":  # what `tiergate outcomes delete --tenant` opens, beside it
            cli: Any = RedisOutcomeStore(server.url, journal=tmp_path / "journal.jsonl")
            cli.connect()
        else:
            cli = SQLiteOutcomeStore(tmp_path / "outcomes.db")
        try:
            cli.erase(tenant="acme")
        finally:
            cli.close()
        fake.unstall()
        answered = asked.result(30)
        assert answered.status_code == 200 and "[DONE]" in answered.text
        assert store.flush(10)
        assert store.get(answered.headers["x-request-id"]) is None
        assert store.count("acme") == 0 and store.health()["refused_erased"] == 1
        fake.reset(Behaviour())
        later = chat(srv, "acme", "Erin Black asks", model="gpt-4o")
        assert store.flush(10)
        assert store.get(later.headers["x-request-id"]) is not None
        assert store.count("acme") == 1


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_label_that_comes_after_an_erasure_is_not_written(
    tmp_path: Path, fake: FakeProvider, backend: str, request: pytest.FixtureRequest
) -> None:
    """`tiergate outcomes delete` while a shadow judgement of the request ran, or before the
    same conversation escalated: the judgement's label and the escalation's were written
    after the erasure, and the erased request id was back in the store with its tenant."""
    fake.reset(Behaviour(mode="stall", stall_s=60.0, judge="closed"))
    outcomes: Any = None
    if backend == "redis":
        server = request.getfixturevalue("redis_server")
        outcomes = RedisOutcomeStore(server.url, journal=tmp_path / "journal.jsonl")
    with serve(tmp_path, policy_yaml(fake, shadow="{sample_rate: 1.0}"), outcomes) as srv:
        store = srv.gateway.outcomes
        first = chat(srv, "acme", "what is a monad")
        assert first.headers["x-tiergate-tier"] == "local"
        rid = first.headers["x-request-id"]
        assert wait_for(lambda: len(fake.received) == 1)  # the shadow waits on the closed model
        assert store.flush(10) and store.get(rid) is not None
        # What `tiergate outcomes delete --request-id` opens, beside the server.
        if backend == "redis":
            cli: Any = RedisOutcomeStore(server.url, journal=tmp_path / "journal.jsonl")
            cli.connect()
        else:
            cli = SQLiteOutcomeStore(tmp_path / "outcomes.db")
        try:
            assert cli.erase([rid]).records == 1
        finally:
            cli.close()
        fake.behaviour = Behaviour(judge="closed")
        fake.unstall()
        assert wait_for(lambda: srv.gateway.learning.pending == 0, 30)
        chat(srv, "acme", "what is a monad", model="gpt-4o")  # escalates the erased answer
        assert srv.gateway.learning.escalations == 1
        assert store.flush(10)
        assert store.get(rid) is None
        assert store.labels_of(rid) == [] and store.labels() == []
