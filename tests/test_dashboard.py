"""The dashboard: the one aggregate over a store's window, the JSON endpoint, and the page in
headless Chromium."""

from __future__ import annotations

import json
import math
import re
import shutil
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from router.artifact import DEFAULT_MODEL_NAME
from router.auth import hash_key
from router.dashboard import (
    BUCKETS_S,
    eval_chart,
    fronts_table,
    label_quality,
    quality_block,
    store_summary,
    summarize,
)
from router.outcomes import OutcomeRecord, SQLiteOutcomeStore, TieredLabel, WindowRow
from tests.conftest import REPO, ErasingStore, live, policy_yaml, wait_for
from tests.fake_provider import FakeProvider
from tests.records import outcome
from tests.test_gateway import ScriptedLocal

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = REPO / "test-artifacts"


def _record(i: int, ts: float, tier: str | None, **kw: Any) -> OutcomeRecord:
    return outcome(f"r{i}", ts=ts, tier=tier, score=0.5, **kw)


def test_summary_buckets_tiers_spend_and_problems(tmp_path: Path) -> None:
    store = SQLiteOutcomeStore(tmp_path / "o.db")
    store.start()
    now = time.time()
    since = now - 3600
    records = [
        _record(0, since + 10, "local", cost_usd=0.001, counterfactual_cost_usd=0.01),
        _record(1, since + 20, "local", cost_usd=0.001, counterfactual_cost_usd=0.01),
        _record(2, since + 130, "closed", cost_usd=0.02, counterfactual_cost_usd=0.02),
        _record(
            3,
            now - 5,
            "closed",
            fallback="local->closed",
            cost_usd=0.03,
            counterfactual_cost_usd=0.03,
        ),
        _record(4, now - 4, None, status="error", http_status=404, error_type="model_not_found"),
        _record(5, since - 100, "local"),  # before the window: not counted
    ]
    for r in records:
        store.submit(r)
    assert store.flush()
    summary = store_summary(store, since, 120, until_ts=now)
    store.close()
    totals = summary["totals"]
    assert totals["requests"] == 5
    assert totals["by_tier"] == {"local": 2, "closed": 2, "none": 1}
    assert totals["cost_usd"] == pytest.approx(0.052)
    assert totals["counterfactual_usd"] == pytest.approx(0.07)
    assert totals["saved_usd"] == pytest.approx(0.018)
    assert totals["local_share"] == pytest.approx(0.5)
    assert (totals["errors"], totals["fallbacks"]) == (1, 1)
    buckets = summary["buckets"]
    assert len(buckets) == 30  # 3600 s in 120 s buckets
    assert buckets[0]["tiers"] == {"local": 2}
    assert buckets[1]["tiers"] == {"closed": 1}
    assert buckets[-1]["tiers"] == {"closed": 1, "none": 1}
    assert [p["id"] for p in summary["problems"]] == ["r4", "r3"]
    assert summary["versions"][0]["policy_version"] == "p1"
    assert summary["versions"][0]["requests"] == 5


def test_the_cascade_panel_counts_the_whole_window_not_the_newest_records(
    tmp_path: Path,
) -> None:
    # One cascaded request, then more plain ones than any "newest records" read would hold.
    store = SQLiteOutcomeStore(tmp_path / "o.db")
    store.start()
    now = time.time()
    store.submit(_record(0, now - 60, "closed", cascade={"decision": "escalated"}))
    for i in range(1, 2502):
        store.submit(_record(i, now - 50 + i / 100, "local"))
    assert store.flush(30)
    summary = store_summary(store, now - 3600, 120, until_ts=now + 1)
    store.close()
    assert summary["totals"]["requests"] == 2502
    assert summary["cascade"] == {
        "requests": 1,
        "escalated": 1,
        "escalation_rate": 1.0,
        "hold_back_ms_p50": None,
    }


def test_failed_closed_requests_count_as_failures_not_as_closed(tmp_path: Path) -> None:
    now = time.time()
    records = [
        _record(0, now - 50, "local"),
        _record(1, now - 40, "closed"),
        _record(2, now - 30, "closed", status="error", http_status=503, error_type="x"),
        _record(3, now - 20, "closed", status="error", http_status=502, error_type="x"),
        _record(4, now - 10, None, status="error", http_status=404, error_type="x"),
    ]
    store = SQLiteOutcomeStore(tmp_path / "o.db")
    store.start()
    for r in records:
        store.submit(r)
    assert store.flush()
    summary = store_summary(store, now - 60, 120, until_ts=now)
    store.close()
    totals = summary["totals"]
    assert totals["by_tier"] == {"local": 1, "closed": 1, "failed": 2, "none": 1}
    assert totals["local_share"] == pytest.approx(0.5)  # of the requests that were served
    assert totals["errors"] == 3


def test_a_client_that_left_is_not_counted_as_an_error() -> None:
    """Two clients that left mid-stream showed as 2 errors on the page and in each front's
    row, beside no failed bars and no ``status="error"`` in /metrics: they are counted apart,
    as ``aborted``, and still listed among the recent problems."""
    now = time.time()
    records = [
        _record(0, now - 50, "local"),
        _record(1, now - 40, "local", status="aborted", http_status=499),
        _record(2, now - 30, "closed", status="aborted", http_status=499),
        _record(3, now - 20, "closed", status="error", http_status=502, error_type="x"),
    ]
    rows = [WindowRow.of(r.as_dict()) for r in records]
    summary = summarize(rows, since_ts=now - 60, bucket_s=120, until_ts=now)
    totals = summary["totals"]
    assert (totals["errors"], totals["aborted"]) == (1, 2)
    assert totals["by_tier"] == {"local": 2, "closed": 1, "failed": 1}
    assert summary["by_front"]["chat"]["errors"] == 1
    assert summary["by_front"]["chat"]["aborted"] == 2
    assert [p["id"] for p in summary["problems"]] == ["r3", "r2", "r1"]


def test_each_front_gets_its_requests_closed_share_spend_and_errors() -> None:
    now = time.time()
    records = [
        _record(0, now - 50, "local", cost_usd=0.001),
        _record(1, now - 40, "closed", cost_usd=0.02, front="messages"),
        _record(2, now - 30, "local", front="messages"),
        _record(3, now - 25, "closed", status="error", http_status=502, front="messages"),
        _record(4, now - 20, None, status="error", http_status=404, front="responses"),
    ]
    dicts = [r.as_dict() for r in records]
    del dicts[0]["front"]  # a record written before fronts were recorded: the chat front's
    rows = [WindowRow.of(d) for d in dicts]
    summary = summarize(rows, since_ts=now - 60, bucket_s=120, until_ts=now)
    assert summary["by_front"] == {
        "chat": {"requests": 1, "closed_share": 0.0, "cost_usd": 0.001, "errors": 0, "aborted": 0},
        "messages": {
            "requests": 3,
            "closed_share": 0.5,
            "cost_usd": 0.02,
            "errors": 1,
            "aborted": 0,
        },
        "responses": {
            "requests": 1,
            "closed_share": 0.0,
            "cost_usd": 0.0,
            "errors": 1,
            "aborted": 0,
        },
    }
    assert sum(f["requests"] for f in summary["by_front"].values()) == 5
    html = fronts_table(summary["by_front"])
    assert 'data-front="messages" data-requests="3" data-closed-share="0.5000"' in html
    assert 'data-front="responses"' in html and 'data-errors="1"' in html


def test_quality_is_the_served_answers_mean_per_tier_and_source() -> None:
    assert label_quality([])["available"] is False
    quality = label_quality(
        [
            TieredLabel("local", "feedback", None, 0.5),
            TieredLabel("local", "feedback", None, 1.0),
            TieredLabel("local", "shadow", 0.75, None),  # closed better: served quality 0.25
            TieredLabel("closed", "escalation", 1.0, None),  # not a quality source
            TieredLabel(None, "feedback", None, 0.1),  # refused before routing: no tier
            TieredLabel("closed", "shadow", None, None),  # a verdict without a value
        ]
    )
    assert quality["available"]
    assert quality["tiers"] == {
        "local": {"feedback": {"n": 2, "mean": 0.75}, "shadow": {"n": 1, "mean": 0.25}}
    }
    html = quality_block(quality)
    assert 'data-tier="local" data-kind="feedback" data-mean="0.7500" data-n="2"' in html
    assert 'data-tier="closed"' not in html


def test_dashboard_buckets_start_on_wall_clock_boundaries(
    tmp_path: Path, fake: FakeProvider
) -> None:
    fake.reset()  # the session's fake, as the test before left it (failing, perhaps)
    local = ScriptedLocal()
    with live(tmp_path, policy_yaml(fake, on_failure="closed"), local_backend_obj=local) as srv:
        _traffic(srv.http, local)
        assert wait_for(lambda: srv.gateway.outcomes.flush(0.1))
        for window_s, bucket_s in BUCKETS_S.items():
            url = f"/dashboard/data?window_s={window_s}"
            first, again = srv.http.get(url).json(), srv.http.get(url).json()
            starts = [b["start"] for b in first["summary"]["buckets"]]
            assert first["summary"]["bucket_s"] == bucket_s
            assert all(s % bucket_s == 0 for s in starts)  # whole minutes, hours, ...
            assert len(starts) == window_s // bucket_s
            assert starts[-1] <= first["generated_at"] <= starts[-1] + bucket_s  # holds now
            # A refresh within the same bucket draws the same x axis.
            if again["summary"]["buckets"][-1]["start"] == starts[-1]:
                assert [b["start"] for b in again["summary"]["buckets"]] == starts
            assert sum(first["summary"]["totals"]["by_tier"].values()) == 12


def test_shipped_evaluation_curve_shows_without_settings(
    tmp_path: Path, fake: FakeProvider
) -> None:
    local = ScriptedLocal()
    with live(tmp_path, policy_yaml(fake), local_backend_obj=local) as srv:
        data = srv.http.get("/dashboard/data").json()
        page = srv.http.get("/dashboard").text
    evaluation = data["evaluation"]
    assert Path(evaluation["path"]).parent.name == DEFAULT_MODEL_NAME
    assert evaluation["model_version"] == DEFAULT_MODEL_NAME
    assert len(evaluation["curve"]) == 11 and evaluation["n"] > 0
    assert 'id="eval-chart"' in page and "eval-empty" not in page
    assert "TIERGATE_EVAL_REPORT" in eval_chart(None, {})


def _eval_report(path: Path) -> Path:
    # The shape `tiergate eval --json` writes: the quantile curve with quality per closed share.
    curve = [
        {"threshold": t / 10, "strong_share": 1 - t / 10, "quality": 0.6 + 0.3 * (1 - t / 10)}
        for t in range(11)
    ]
    report = {
        "n": 500,
        "weak_quality": 0.6,
        "strong_quality": 0.9,
        "curve": curve,
        "apgr": {"value": 0.5, "low": 0.45, "high": 0.55},
    }
    path.write_text(json.dumps(report))
    return path


def _traffic(client: httpx.Client, local: ScriptedLocal) -> dict[str, int]:
    """A burst of mixed traffic: local, closed, local-failure fallbacks and unknown models."""

    def chat(content: str, model: str = "auto") -> int:
        body = {"model": model, "messages": [{"role": "user", "content": content}]}
        return client.post("/v1/chat/completions", json=body).status_code

    statuses = [chat("easy") for _ in range(6)]
    statuses += [chat("HARD") for _ in range(3)]
    local.fail = True
    statuses += [chat("easy") for _ in range(2)]
    local.fail = False
    statuses += [chat("x", model="no-such-model")]
    assert statuses == [200] * 11 + [404]
    return {"local": 6, "closed": 5, "none": 1}


def test_dashboard_data_endpoint(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()
    local = ScriptedLocal()
    report = _eval_report(tmp_path / "eval.json")
    with live(
        tmp_path,
        policy_yaml(fake, on_failure="closed"),
        local_backend_obj=local,
        eval_report=report,
    ) as srv:
        sent = _traffic(srv.http, local)
        assert wait_for(lambda: srv.gateway.outcomes.flush(0.1))
        data = srv.http.get("/dashboard/data").json()
        page = srv.http.get("/dashboard").text
        bad = srv.http.get("/dashboard/data?window_s=7")
    assert bad.status_code == 400
    totals = data["summary"]["totals"]
    assert totals["by_tier"] == sent
    chat = data["summary"]["by_front"]["chat"]
    assert list(data["summary"]["by_front"]) == ["chat"]
    assert (chat["requests"], chat["errors"]) == (12, 1)
    assert chat["closed_share"] == pytest.approx(5 / 11)
    assert chat["cost_usd"] == pytest.approx(totals["cost_usd"])
    assert 'data-front="chat" data-requests="12"' in page
    assert totals["fallbacks"] == 2 and totals["errors"] == 1
    assert totals["local_share"] == pytest.approx(6 / 11)
    assert data["live"]["thresholds"] == {"auto": 0.5, "auto-best": 0.05}
    assert data["evaluation"]["n"] == 500
    assert data["quality"]["available"] is False


def test_an_evaluation_with_nan_is_served_as_json_a_browser_reads(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """``tiergate eval --json`` writes an APGR it cannot tell (strong and weak of equal
    quality) as ``NaN``, as Python's json does: ``/dashboard/data`` passed it on, which is not
    JSON, and the page's ``fetch().json()`` refused the whole refresh. It is served as null."""
    fake.reset()
    report = _eval_report(tmp_path / "eval.json")
    data = json.loads(report.read_text())
    data["apgr"] = {"value": math.nan, "low": -math.inf, "high": math.inf}
    report.write_text(json.dumps(data))

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    with live(tmp_path, policy_yaml(fake), eval_report=report) as srv:
        served = srv.http.get("/dashboard/data")
    assert served.status_code == 200
    apgr = json.loads(served.text, parse_constant=refuse)["evaluation"]["apgr"]
    assert apgr == {"value": None, "low": None, "high": None}


def test_an_evaluation_that_tells_no_apgr_is_drawn_without_it(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """``tiergate eval --json`` writes an APGR it cannot tell as null (it wrote NaN, not
    JSON): the page drew ``APGR nan`` from that, and failed (500) on the null."""
    fake.reset()
    report = _eval_report(tmp_path / "eval.json")
    data = json.loads(report.read_text())
    data["apgr"] = {"value": None, "low": None, "high": None}
    report.write_text(json.dumps(data))
    with live(tmp_path, policy_yaml(fake), eval_report=report) as srv:
        page = srv.http.get("/dashboard")
    assert page.status_code == 200
    assert 'id="eval-chart"' in page.text and "APGR" not in page.text


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="Chromium is not installed (apt-get install chromium); the browser check is skipped",
)
def test_dashboard_renders_in_headless_chromium(tmp_path: Path, fake: FakeProvider) -> None:
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    fake.reset()
    local = ScriptedLocal()
    report = _eval_report(tmp_path / "eval.json")
    with live(
        tmp_path,
        policy_yaml(fake, on_failure="closed"),
        local_backend_obj=local,
        eval_report=report,
        local_price_per_mtok=1.0,
        socket=True,  # the browser needs a real socket
    ) as srv:
        sent = _traffic(srv.http, local)
        assert wait_for(lambda: srv.gateway.outcomes.flush(0.1))
        data = srv.http.get("/dashboard/data").json()
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1366, "height": 900})
                response = page.goto(f"{srv.url}/dashboard")
                assert response is not None and response.status == 200
                bars = page.eval_on_selector_all(
                    "#requests-chart rect.bar",
                    "els => els.map(e => [e.dataset.tier, +e.dataset.count,"
                    " e.getBoundingClientRect().height])",
                )
                legend = page.eval_on_selector_all(
                    ".legend .key[data-tier]",
                    "els => els.map(e => [e.dataset.tier, +e.dataset.total])",
                )
                share = float(page.get_attribute("#local-share", "data-share") or "nan")
                saved = float(page.get_attribute("#saved", "data-saved") or "nan")
                markers = page.eval_on_selector_all(
                    "#eval-chart g.marker",
                    "els => els.map(e => [e.dataset.alias, +e.dataset.closedShare])",
                )
                problems = page.eval_on_selector_all(
                    "#problems tr[data-status]", "els => els.length"
                )
                quality_note = page.text_content("#quality-empty")
                requests_tile = page.text_content('[data-kpi="requests"] .v')
                ARTIFACTS.mkdir(exist_ok=True)
                page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            finally:
                browser.close()
    counted: dict[str, int] = {}
    for tier, count, height in bars:
        counted[tier] = counted.get(tier, 0) + count
        assert height > 0  # drawn, not just present
    assert counted == sent
    assert dict(legend) == sent
    assert requests_tile == "12"
    assert share == pytest.approx(6 / 11, abs=1e-4)
    assert saved == pytest.approx(data["summary"]["totals"]["saved_usd"])
    assert saved > 0  # local answers cost $1 per 1M tokens instead of gpt-4o's price
    assert dict(markers) == pytest.approx({"auto": 0.5, "auto-best": 0.95})
    assert problems == 3  # two fallbacks and one unknown model
    assert quality_note is not None and "No quality labels yet" in quality_note
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def _keys(path: Path) -> Path:
    """Two tenants' keys (no permission), an operator's (``dashboard``) and an admin's."""
    entries = [
        {"sha256": hash_key(f"tg-{name}"), "tenant": name, "permissions": perms}
        for name, perms in (
            ("acme", []),
            ("globex", []),
            ("ops", ["dashboard"]),
            ("root", ["admin"]),
        )
    ]
    path.write_text(yaml.safe_dump({"keys": entries}))
    return path


def test_small_spend_reads_as_it_is_not_as_zero(tmp_path: Path, fake: FakeProvider) -> None:
    """A local request at $10 per 1M tokens cost $0.00005 (and $0.0000275 all-closed): the
    tiles said "$0.0001" spent, "$0.0000" all-closed and "$-0.0000" saved, while /metrics and
    /dashboard/data had the figures. Each tile now reads back as its figure."""
    fake.reset()
    with live(
        tmp_path, policy_yaml(fake), local_backend_obj=ScriptedLocal(), local_price_per_mtok=10.0
    ) as srv:
        body = {"model": "auto", "messages": [{"role": "user", "content": "easy"}]}
        assert srv.http.post("/v1/chat/completions", json=body).status_code == 200
        assert wait_for(lambda: srv.gateway.outcomes.flush(0.1))
        totals = srv.http.get("/dashboard/data").json()["summary"]["totals"]
        page = srv.http.get("/dashboard").text

    def tile(key: str) -> float:
        shown = re.search(rf'data-kpi="{key}"><div class="v">([^<]+)</div>', page)
        assert shown is not None, key
        return float(shown[1].replace("$", "").replace(",", ""))

    assert totals["cost_usd"] == pytest.approx(5e-5)
    for key, figure in (("cost", "cost_usd"), ("counterfactual", "counterfactual_usd")):
        assert tile(key) == pytest.approx(totals[figure], rel=0.05)
    assert totals["saved_usd"] < 0 and tile("saved") == pytest.approx(totals["saved_usd"], rel=0.05)


def test_the_dashboard_narrows_to_one_tenant(tmp_path: Path, fake: FakeProvider) -> None:
    """/metrics has a tenant label and ``tiergate outcomes`` a ``--tenant``; the dashboard had
    no way to see one tenant's requests, labels and spend apart from the others'."""
    fake.reset()
    with live(tmp_path, policy_yaml(fake), api_keys_file=_keys(tmp_path / "keys.yaml")) as srv:

        def chat(tenant: str, content: str, model: str = "auto") -> httpx.Response:
            body = {"model": model, "messages": [{"role": "user", "content": content}]}
            auth = {"authorization": f"Bearer tg-{tenant}"}
            return srv.http.post("/v1/chat/completions", json=body, headers=auth)

        acme = [chat("acme", "easy") for _ in range(3)] + [chat("acme", "HARD")]
        globex = [chat("globex", "easy"), chat("globex", "x", model="no-such-model")]
        assert [r.status_code for r in acme + globex] == [200] * 5 + [404]
        rated = srv.http.post(
            "/v1/feedback",
            json={"request_id": acme[0].headers["x-request-id"], "score": 0.8},
            headers={"authorization": "Bearer tg-acme"},
        )
        assert rated.status_code == 200
        assert wait_for(lambda: srv.gateway.outcomes.flush(0.1))

        def view(key: str, query: str = "") -> httpx.Response:
            url = f"/dashboard/data?window_s=900{query}"
            return srv.http.get(url, headers={"authorization": f"Bearer tg-{key}"})

        everyone, only_acme = view("ops").json(), view("ops", "&tenant=acme").json()
        only_globex, nobody = view("root", "&tenant=globex").json(), view("ops", "&tenant=x")
        page = srv.http.get(
            "/dashboard?tenant=acme", headers={"authorization": "Bearer tg-ops"}
        ).text
        # A tenant's own key gets no dashboard, its own tenant's view included.
        assert view("acme", "&tenant=acme").status_code == 403
        acme_cost = sum(
            srv.gateway.outcomes.get(r.headers["x-request-id"])["cost_usd"] for r in acme
        )
    totals = only_acme["summary"]["totals"]
    assert totals["by_tier"] == {"local": 3, "closed": 1}
    assert everyone["tenant"] is None and everyone["summary"]["totals"]["requests"] == 6
    assert everyone["summary"]["tenants"] == {"acme": 4, "globex": 2}
    assert only_acme["tenant"] == "acme"
    assert only_acme["summary"]["tenants"] == everyone["summary"]["tenants"]
    assert totals["cost_usd"] == pytest.approx(acme_cost) and acme_cost > 0
    assert totals["errors"] == 0 and only_acme["summary"]["problems"] == []
    assert only_acme["quality"]["tiers"] == {"local": {"feedback": {"n": 1, "mean": 0.8}}}
    assert only_globex["summary"]["totals"]["by_tier"] == {"local": 1, "none": 1}
    assert [p["tenant"] for p in only_globex["summary"]["problems"]] == ["globex"]
    assert only_globex["quality"]["available"] is False  # acme's feedback is not globex's
    assert nobody.status_code == 200 and nobody.json()["summary"]["totals"]["requests"] == 0
    # The page says whose view it is, and its links keep to that tenant.
    assert 'id="scope" data-tenant="acme"' in page
    assert '<div class="v">4</div><div class="l">requests</div>' in page
    assert 'href="?window_s=3600&amp;tenant=acme"' in page
    assert 'href="dashboard/data?window_s=3600&amp;tenant=acme"' in page
    assert 'data-tenant="globex">globex (2)</a>' in page


def test_an_erased_request_s_spend_stays_in_the_spend_totals(
    tmp_path: Path, fake: FakeProvider, erasing: ErasingStore
) -> None:
    """After `tiergate outcomes delete`, what an erased request cost the closed model left the
    request totals and `spend`, while the budget and the provider's bill still held it. It
    stays, as a sum per 30 s and tenant hash that names no request or tenant."""
    fake.reset()
    ops = {"authorization": "Bearer tg-ops"}
    with live(
        tmp_path,
        policy_yaml(fake),
        outcomes=erasing.make(),
        api_keys_file=_keys(tmp_path / "k.yaml"),
    ) as srv:

        def chat(tenant: str, content: str) -> httpx.Response:
            body = {"model": "auto", "messages": [{"role": "user", "content": content}]}
            auth = {"authorization": f"Bearer tg-{tenant}"}
            return srv.http.post("/v1/chat/completions", json=body, headers=auth)

        def view(query: str = "") -> dict[str, Any]:
            url = f"/dashboard/data?window_s=900{query}"
            data: dict[str, Any] = srv.http.get(url, headers=ops).json()
            return data

        sent = [chat("acme", "HARD"), chat("acme", "HARD"), chat("acme", "easy")]
        sent.append(chat("globex", "HARD"))
        assert [r.headers["x-tiergate-tier"] for r in sent] == ["closed"] * 2 + ["local", "closed"]
        store = srv.gateway.outcomes
        assert wait_for(lambda: store.flush(0.1) and store.count() == 4)
        before, acme_before = view(), view("&tenant=acme")
        erased = [r.headers["x-request-id"] for r in sent[:2]]
        cost = sum(store.get(x)["cost_usd"] for x in erased)
        assert cost > 0
        assert erasing.delete(*[arg for x in erased for arg in ("--request-id", x)]) == 0
        assert store.count() == 2
        after, acme, globex = view(), view("&tenant=acme"), view("&tenant=globex")
        spent_today = store.spend_today("acme")
    totals, old = after["summary"]["totals"], before["summary"]["totals"]
    assert totals["requests"] == old["requests"] - 2  # the records went
    for name in ("cost_usd", "counterfactual_usd", "saved_usd"):  # what they cost did not
        assert totals[name] == pytest.approx(old[name])
    assert totals["erased_usd"] == pytest.approx(cost)
    assert after["spend"] == pytest.approx(before["spend"])
    assert sum(b["cost_usd"] for b in after["summary"]["buckets"]) == pytest.approx(
        totals["cost_usd"]
    )
    assert acme["spend"] == pytest.approx(acme_before["spend"])
    assert acme["spend"]["total_usd"] == pytest.approx(spent_today)  # the budget's spend
    assert acme["summary"]["totals"]["erased_usd"] == pytest.approx(cost)
    assert globex["summary"]["totals"]["erased_usd"] == 0.0
    if erasing.backend == "sqlite":  # what stays of them names neither the requests nor the tenant
        with sqlite3.connect(tmp_path / "outcomes.db") as db:
            kept = db.execute("SELECT * FROM erased_spend").fetchall()
        assert kept and "acme" not in str(kept) and not any(x in str(kept) for x in erased)
        assert sum(row[3] for row in kept) == pytest.approx(cost)
