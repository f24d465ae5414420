"""The operator's view: ``GET /dashboard`` (an HTML page), ``/dashboard/data`` (its JSON) and
``GET /metrics`` (Prometheus text).

The page is rendered on the server as plain HTML with inline SVG charts drawn here: no
JavaScript, no CDN, works offline, and every chart element carries ``data-*`` attributes with the
numbers it draws. :func:`summarize` is the one aggregate, over the records the store returns for
the window (``window``), the cascade's escalations included; quality per tier comes from its
``tiered_labels``; the evaluation curve
from a JSON report (``tiergate eval --json``) at ``eval_report``, else ``eval.json`` beside the
classifier.

``?tenant=`` narrows the page and its JSON to one tenant's requests, labels and spend (the
name as keys, the policy, ``/metrics``' ``tenant`` label and ``tiergate outcomes --tenant``
spell it). All three routes depend on :func:`operator_access`, the single access check for
them: the ``dashboard`` permission of the caller's key (see SECURITY.md).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import json
import math
import time
from collections import defaultdict
from collections.abc import Iterable
from html import escape
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, Response

from router.api import ClientJSON, client_utf8
from router.auth import require
from router.cascade import ESCALATED, CascadeModel
from router.errors import TiergateError
from router.outcomes import ErasedSpend, OutcomeStore, TieredLabel, WindowRow
from router.services import services

_dashboard_permission = require("dashboard")


async def operator_access(request: Request) -> None:
    """Who may see /metrics and /dashboard: keys with the ``dashboard`` permission (or ``admin``);
    403 otherwise. The pages show every tenant (``?tenant=`` is a view, not a boundary), so
    tenants' own keys do not get it."""
    await _dashboard_permission(request)


router = APIRouter(dependencies=[Depends(operator_access)])

#: ``failed``: routed to a tier that did not answer (an error); ``none``: no model was called.
TIER_COLOURS = {"local": "#2e8b57", "closed": "#3b6fd4", "failed": "#c0392b", "none": "#9a9a9a"}
#: The windows the page offers, each with its bucket width. Buckets start on multiples of their
#: width since the epoch (whole minutes, quarter hours, hours, 6-hour blocks in UTC), so a refresh
#: moves them only when a boundary passes.
BUCKETS_S = {900: 30, 3600: 120, 6 * 3600: 900, 24 * 3600: 3600, 7 * 86400: 6 * 3600}
WINDOWS_S = tuple(BUCKETS_S)


# -- data ------------------------------------------------------------------------------------


#: The fields of each recent fallback or error the page lists.
PROBLEM_FIELDS = (
    "id", "ts", "tenant", "alias", "tier", "model", "rule", "status", "http_status",
    "error_type", "fallback",
)  # fmt: skip


def summary_tier(row: WindowRow) -> str:
    """Where a record counts: its tier, ``failed`` when that tier did not answer (an error),
    ``none`` when no model was called (refused before routing, or at admission: over budget)."""
    if row.tier is None:
        return "none"
    return "failed" if row.status == "error" else row.tier


def _served_share(tiers: dict[str, int], tier: str) -> float:
    served = tiers.get("local", 0) + tiers.get("closed", 0)
    return tiers.get(tier, 0) / served if served else 0.0


def _in_view(
    records: Iterable[WindowRow], since_ts: float, tenant: str | None
) -> tuple[list[WindowRow], dict[str, int]]:
    """The records since ``since_ts`` (``tenant``'s only, when given), and how many each tenant
    has since then."""
    rows = [r for r in records if r.ts >= since_ts]
    seen: dict[str, int] = defaultdict(int)
    for r in rows:
        seen[r.tenant] += 1
    return [r for r in rows if tenant is None or r.tenant == tenant], seen


def summarize(
    records: Iterable[WindowRow],
    *,
    since_ts: float,
    bucket_s: float,
    until_ts: float | None = None,
    problems: int = 20,
    tenant: str | None = None,
    erased: Iterable[ErasedSpend] = (),
) -> dict[str, Any]:
    """The dashboard's aggregates over ``records`` (a store's ``window``), whichever the store.

    ``erased`` (the store's ``erased_spend_buckets``, ``tenant``'s when given) is what erased
    requests cost: paid for all the same, so the spend and the all-closed cost count it, in its
    bucket, and ``totals.erased_usd`` says how much of the spend it is. It has no tier or front.

    With ``tenant``, only that tenant's records are aggregated; ``tenants`` counts the requests
    of every tenant in the window either way (what a view may narrow to).

    ``buckets`` are ``bucket_s`` wide from ``since_ts`` to ``until_ts`` (default: now), empty
    ones included so a chart's x axis is time; a record newer than ``until_ts`` joins the last.
    Requests count under :func:`summary_tier`; ``local_share`` (and each front's
    ``closed_share``) is of the requests a tier served; ``cascade`` counts the requests that
    cascaded, those escalated, and the median hold-back of streams.
    """
    bucket_s = max(1.0, float(bucket_s))
    until = time.time() if until_ts is None else until_ts
    n_buckets = max(1, math.ceil((until - since_ts) / bucket_s))
    tiers: list[dict[str, int]] = [defaultdict(int) for _ in range(n_buckets)]
    costs, counterfactuals = [0.0] * n_buckets, [0.0] * n_buckets
    fronts: dict[str, dict[str, Any]] = {}
    versions: dict[tuple[Any, Any], list[Any]] = {}
    bad: list[WindowRow] = []
    errors = aborted = fallbacks = cascaded = escalated = 0
    held: list[float] = []
    rows, seen = _in_view(records, since_ts, tenant)
    for r in rows:
        if r.cascade_decision is not None:
            cascaded += 1
            escalated += r.cascade_decision in ESCALATED
            if r.hold_back_ms is not None:
                held.append(r.hold_back_ms)
        i, tier = min(int((r.ts - since_ts) // bucket_s), n_buckets - 1), summary_tier(r)
        cost = r.cost_usd or 0.0
        tiers[i][tier] += 1
        costs[i] += cost
        counterfactuals[i] += r.counterfactual_cost_usd or 0.0
        # A client that left is not an error (as in /metrics' status label): counted apart.
        failed, left = r.status == "error", r.status == "aborted"
        fell_back = r.fallback is not None
        errors += failed
        aborted += left
        fallbacks += fell_back
        if r.status != "ok" or fell_back:
            bad.append(r)
        front = fronts.get(r.front)
        if front is None:
            front = fronts[r.front] = {"tiers": defaultdict(int), "cost": 0.0}
            front["errors"] = front["aborted"] = 0
        front["tiers"][tier] += 1
        front["cost"] += cost
        front["errors"] += failed
        front["aborted"] += left
        version = versions.get((r.policy_version, r.model_version))
        if version is None:
            version = versions[(r.policy_version, r.model_version)] = [0, r.ts]
        version[0] += 1
        version[1] = max(version[1], r.ts)
    erased_usd = _add_erased(erased, since_ts, bucket_s, costs, counterfactuals)
    by_tier: dict[str, int] = defaultdict(int)
    for bucket in tiers:
        for tier, n in bucket.items():
            by_tier[tier] += n
    total_cost, total_cf = sum(costs), sum(counterfactuals)
    newest = heapq.nlargest(problems, bad, key=lambda r: r.ts)
    latest = heapq.nlargest(10, versions.items(), key=lambda kv: kv[1][1])
    held.sort()
    return {
        "since": since_ts,
        "bucket_s": bucket_s,
        "tenant": tenant,
        "tenants": dict(sorted(seen.items())),
        "buckets": [
            {
                "start": since_ts + i * bucket_s,
                "tiers": dict(t),
                "cost_usd": c,
                "counterfactual_usd": f,
            }
            for i, (t, c, f) in enumerate(zip(tiers, costs, counterfactuals, strict=True))
        ],
        "totals": {
            "requests": sum(by_tier.values()),
            "errors": errors,
            "aborted": aborted,
            "fallbacks": fallbacks,
            "by_tier": dict(by_tier),
            "cost_usd": total_cost,
            "erased_usd": erased_usd,
            "counterfactual_usd": total_cf,
            "saved_usd": total_cf - total_cost,
            "local_share": _served_share(by_tier, "local"),
        },
        "by_front": {
            name: {
                "requests": sum(f["tiers"].values()),
                "closed_share": _served_share(f["tiers"], "closed"),
                "cost_usd": f["cost"],
                "errors": f["errors"],
                "aborted": f["aborted"],
            }
            for name, f in sorted(fronts.items())
        },
        "problems": [{k: getattr(r, k) for k in PROBLEM_FIELDS} for r in newest],
        "versions": [
            {"policy_version": p, "model_version": m, "requests": n, "last_ts": t}
            for (p, m), (n, t) in latest
        ],
        "cascade": {
            "requests": cascaded,
            "escalated": escalated,
            "escalation_rate": escalated / cascaded if cascaded else None,
            "hold_back_ms_p50": held[len(held) // 2] if held else None,
        },
    }


def _add_erased(
    erased: Iterable[ErasedSpend],
    since_ts: float,
    bucket_s: float,
    costs: list[float],
    counterfactuals: list[float],
) -> float:
    """Add what erased requests cost to the buckets they were made in; their cost in all."""
    spent = 0.0
    for kept in erased:
        if kept.ts >= since_ts:
            i = min(int((kept.ts - since_ts) // bucket_s), len(costs) - 1)
            costs[i] += kept.requests_usd
            counterfactuals[i] += kept.counterfactual_usd
            spent += kept.requests_usd
    return spent


def label_quality(labels: Iterable[TieredLabel]) -> dict[str, Any]:
    """Mean quality of the answers served, per tier and source (feedback, shadow judge).

    Feedback carries the served answer's quality; a shadow verdict says how likely the closed
    answer was materially better, so the served answer's quality is ``1 - value``.
    """
    sums: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0, 0.0])
    for label in labels:
        quality = label.quality
        if quality is None and label.value is not None:
            quality = 1.0 - float(label.value)
        if label.source in ("feedback", "shadow") and label.tier and quality is not None:
            entry = sums[(label.tier, label.source)]
            entry[0] += 1
            entry[1] += float(quality)
    tiers: dict[str, dict[str, dict[str, float]]] = {}
    for (tier, source), (n, total) in sums.items():
        tiers.setdefault(tier, {})[source] = {"n": int(n), "mean": total / n}
    note = None if tiers else "no feedback or shadow labels in this window"
    return {"available": bool(tiers), "tiers": tiers, "note": note}


def judging_spend(labels: Iterable[TieredLabel], erased_usd: float = 0.0) -> dict[str, Any]:
    """Shadow judging in the window: the verdicts stored and what their calls to the closed
    model and the judge cost, with ``erased_usd``, what those of erased records cost (spent
    all the same: budgets count it). That spend counts against budgets but not in the request
    totals, which say what serving the requests cost."""
    shadow = [label for label in labels if label.source == "shadow"]
    stored = sum(label.cost_usd for label in shadow)
    return {"judgements": len(shadow), "cost_usd": stored + erased_usd, "erased_usd": erased_usd}


def total_spend(summary: dict[str, Any], judging: dict[str, Any]) -> dict[str, float]:
    """What the window cost in all: serving its requests plus shadow judging, the two a
    tenant's budget counts (``spend_today``, over today's records and labels)."""
    requests, judged = summary["totals"]["cost_usd"], judging["cost_usd"]
    return {"requests_usd": requests, "judging_usd": judged, "total_usd": requests + judged}


def store_summary(
    store: OutcomeStore,
    since_ts: float,
    bucket_s: float,
    until_ts: float | None = None,
    tenant: str | None = None,
    *,
    erased: Iterable[ErasedSpend] | None = None,
) -> dict[str, Any]:
    """:func:`summarize` over ``store``'s window and erased spend (read here unless given;
    blocking: call it off the event loop)."""
    return summarize(
        store.window(since_ts),
        since_ts=since_ts,
        bucket_s=bucket_s,
        until_ts=until_ts,
        tenant=tenant,
        erased=store.erased_spend_buckets(since_ts, tenant) if erased is None else erased,
    )


#: The evaluation report beside a classifier (the shipped one has one; see docs/model-card.md).
EVAL_FILE = "eval.json"


def load_eval_report(settings: Any) -> dict[str, Any] | None:
    """The evaluation report (a dict with a ``curve``): ``eval_report``, else the one beside the
    classifier (``classifier_path``, else the shipped model); None when there is none."""
    from router.artifact import default_model_path

    candidates: list[Path] = []
    if settings.eval_report is not None:
        candidates.append(Path(settings.eval_report))
    model = settings.classifier_path or default_model_path()
    candidates.append(Path(model) / EVAL_FILE)
    for path in candidates:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        for report in (data, data.get("eval") if isinstance(data, dict) else None):
            if isinstance(report, dict) and isinstance(report.get("curve"), list):
                return {**report, "path": str(path)}
    return None


def alias_thresholds(gateway: Any) -> dict[str, float]:
    """Each alias's threshold now (calibrated where the alias targets a closed share)."""
    return {name: float(t.threshold) for name, t in gateway.alias_thresholds.items()}


def cascade_summary(summary: dict[str, Any], model: CascadeModel | None) -> dict[str, Any]:
    """The cascade panel's data: the window's cascades as :func:`summarize` counted them
    (requests that cascaded, the share escalated, the median hold-back of streams) and the
    confidence model's quality-vs-closed-share curve (from its evaluation, in its sidecar)."""
    return {
        **summary["cascade"],
        "model_version": model.version if model is not None else None,
        "curve": (model.curve or []) if model is not None else [],
    }


def cascade_block(cascade: dict[str, Any]) -> str:
    """The cascade panel: escalation rate, hold-back, and the evaluated threshold curve."""
    if not cascade["requests"] and not cascade["curve"]:
        return '<p class="empty">No cascaded requests in this window.</p>'
    rate = cascade["escalation_rate"]
    lines = [
        f'<p data-kpi="cascade_escalation">{cascade["requests"]} cascaded, '
        f"{cascade['escalated']} escalated"
        + (f" ({rate * 100:.1f}%)" if rate is not None else "")
        + (
            f", median hold-back {cascade['hold_back_ms_p50']:.0f} ms"
            if cascade["hold_back_ms_p50"] is not None
            else ""
        )
        + "</p>"
    ]
    if cascade["curve"]:
        rows = "".join(
            f"<tr><td>{p['threshold']:.1f}</td><td>{p['closed_share'] * 100:.0f}%</td>"
            f"<td>{p['quality']:.3f}</td></tr>"
            for p in cascade["curve"]
        )
        lines.append(
            f"<table><tr><th>threshold</th><th>closed share</th><th>quality</th></tr>{rows}"
            f'</table><p class="note">{escape(str(cascade["model_version"]))}: evaluation '
            "of the confidence model (models/README.md)</p>"
        )
    return "".join(lines)


async def dashboard_data(
    request: Request, window_s: int, tenant: str | None = None
) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready data: ``tenant``'s requests, labels and spend
    when given, every tenant's otherwise (the live versions and the evaluation are global)."""
    svc = services(request)
    gateway = svc.gateway
    store: OutcomeStore = gateway.outcomes
    now = time.time()
    bucket_s = BUCKETS_S[window_s]
    until = math.ceil(now / bucket_s) * bucket_s  # the end of the bucket that holds now
    since = until - window_s
    erased = await asyncio.to_thread(store.erased_spend_buckets, since, tenant)
    summary = await asyncio.to_thread(
        store_summary, store, since, bucket_s, until, tenant, erased=erased
    )
    labels = await asyncio.to_thread(store.tiered_labels, since, tenant)
    cascade = cascade_summary(summary, gateway.cascade)
    judging = judging_spend(labels, sum(kept.judging_usd for kept in erased))
    return {
        "generated_at": now,
        "window_s": window_s,
        "tenant": tenant,
        "live": {
            "policy_version": gateway.policy.digest,
            "model_version": gateway.deciding().version,
            "scorer": gateway.deciding().name,
            "thresholds": alias_thresholds(gateway),
        },
        "summary": summary,
        "quality": label_quality(labels),
        "judging": judging,
        "spend": total_spend(summary, judging),
        "cascade": cascade,
        "evaluation": load_eval_report(svc.settings),
    }


def _window(window_s: int) -> int:
    if window_s not in WINDOWS_S:
        allowed = ", ".join(str(w) for w in WINDOWS_S)
        err = TiergateError(f"window_s must be one of {allowed}", code="invalid_window")
        err.status_code = 400
        err.error_type = "invalid_request_error"
        raise err
    return window_s


#: ``?tenant=``: one tenant's view (its exact name); absent or empty, every tenant's.
TENANT_QUERY = Query(None, description="only this tenant's requests, labels and spend")


@router.get("/dashboard/data")
async def dashboard_json(
    request: Request, window_s: int = Query(3600), tenant: str | None = TENANT_QUERY
) -> ClientJSON:
    """The dashboard's numbers as JSON."""
    return ClientJSON(await dashboard_data(request, _window(window_s), tenant or None))


@router.get("/dashboard")
async def dashboard_page(
    request: Request, window_s: int = Query(3600), tenant: str | None = TENANT_QUERY
) -> HTMLResponse:
    """The dashboard: HTML with inline SVG charts; refreshes itself every 30 s."""
    data = await dashboard_data(request, _window(window_s), tenant or None)
    return HTMLResponse(client_utf8(render_page(data)))  # a lone surrogate as U+FFFD


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition of the request metrics (the same OTel instruments as OTLP)."""
    telemetry = services(request).telemetry
    if telemetry.registry is None:
        return Response(
            "# metrics are off: TIERGATE_METRICS_ENABLED=false or OTEL_SDK_DISABLED=true (or "
            "opentelemetry-sdk, a dependency of tiergate, is missing: see the log)\n",
            status_code=503,
            media_type="text/plain",
        )
    body, content_type = telemetry.prometheus_text()
    return Response(body, media_type=content_type)


# -- rendering -------------------------------------------------------------------------------


def _usd(value: float) -> str:
    # Cents from $10, else four decimals, and two significant digits for an amount under a
    # tenth of a cent: a few cheap (local) requests must not read as $0.0000, nor saving
    # nothing as "$-0.0000".
    amount = abs(value)
    if amount >= 10:
        decimals = 2
    elif 0 < amount < 0.001:
        decimals = min(10, 1 - math.floor(math.log10(amount)))
    else:
        decimals = 4
    return f"{'-' if value < 0 else ''}${amount:,.{decimals}f}"


def _hhmm(ts: float) -> str:
    return time.strftime("%H:%M", time.gmtime(ts))


def _span_label(seconds: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds // 60}m"


def _tile(label: str, value: str, key: str) -> str:
    return (
        f'<div class="tile" data-kpi="{key}"><div class="v">{escape(value)}</div>'
        f'<div class="l">{escape(label)}</div></div>'
    )


def requests_chart(summary: dict[str, Any], width: int = 560, height: int = 220) -> str:
    """Stacked bars: requests per time bucket, by tier."""
    buckets = summary["buckets"]
    if not buckets:
        return '<p class="empty">no requests recorded</p>'
    pad_l, pad_b, pad_t = 36, 22, 8
    plot_w, plot_h = width - pad_l - 8, height - pad_b - pad_t
    peak = max([sum(b["tiers"].values()) for b in buckets] + [1])
    slot = plot_w / len(buckets)
    parts = [
        f'<svg class="chart" id="requests-chart" viewBox="0 0 {width} {height}" '
        f'data-total="{summary["totals"]["requests"]}" role="img" '
        'aria-label="requests by tier over time">',
        f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{width - 8}" y2="{pad_t + plot_h}" '
        'class="axis"/>',
        f'<text x="{pad_l - 4}" y="{pad_t + 10}" class="tick" text-anchor="end">{peak}</text>',
        f'<text x="{pad_l - 4}" y="{pad_t + plot_h}" class="tick" text-anchor="end">0</text>',
    ]
    for i, bucket in enumerate(buckets):
        y = pad_t + plot_h
        for tier, colour in TIER_COLOURS.items():
            n = bucket["tiers"].get(tier, 0)
            if not n:
                continue
            h = plot_h * n / peak
            y -= h
            parts.append(
                f'<rect class="bar" x="{pad_l + i * slot + 1:.1f}" y="{y:.1f}" '
                f'width="{max(slot - 2, 1):.1f}" height="{h:.1f}" fill="{colour}" '
                f'data-tier="{tier}" data-count="{n}" data-start="{bucket["start"]:.0f}">'
                f"<title>{_hhmm(bucket['start'])} {tier}: {n}</title></rect>"
            )
    first, last = buckets[0]["start"], buckets[-1]["start"]
    parts.append(f'<text x="{pad_l}" y="{height - 6}" class="tick">{_hhmm(first)} UTC</text>')
    parts.append(
        f'<text x="{width - 8}" y="{height - 6}" class="tick" text-anchor="end">'
        f"{_hhmm(last)}</text></svg>"
    )
    legend = "".join(
        f'<span class="key" data-tier="{tier}" data-total="{n}">'
        f'<i style="background:{TIER_COLOURS.get(tier, "#999")}"></i>{escape(tier)}: {n}</span>'
        for tier, n in sorted(summary["totals"]["by_tier"].items())
    )
    return "".join(parts) + f'<div class="legend">{legend}</div>'


def spend_chart(summary: dict[str, Any], width: int = 560, height: int = 220) -> str:
    """Cumulative spend against the all-closed counterfactual, and the share served locally."""
    buckets, totals = summary["buckets"], summary["totals"]
    if not buckets:
        return '<p class="empty">no requests recorded</p>'
    pad_l, pad_b, pad_t = 60, 22, 8
    plot_w, plot_h = width - pad_l - 8, height - pad_b - pad_t
    cost, cf = [], []
    run_cost = run_cf = 0.0
    for b in buckets:
        run_cost += b["cost_usd"]
        run_cf += b["counterfactual_usd"]
        cost.append(run_cost)
        cf.append(run_cf)
    top = max([*cf, *cost, 1e-9])
    step = plot_w / max(len(buckets) - 1, 1)

    def line(values: list[float], cls: str, total: float) -> str:
        pts = " ".join(
            f"{pad_l + i * step:.1f},{pad_t + plot_h - plot_h * v / top:.1f}"
            for i, v in enumerate(values)
        )
        return f'<polyline class="{cls}" points="{pts}" data-total="{total:.10f}"/>'

    share = totals["local_share"]
    return (
        f'<svg class="chart" id="spend-chart" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="spend versus all-closed counterfactual">'
        f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{width - 8}" y2="{pad_t + plot_h}" '
        'class="axis"/>'
        f'<text x="{pad_l - 4}" y="{pad_t + 10}" class="tick" text-anchor="end">{_usd(top)}</text>'
        f'<text x="{pad_l - 4}" y="{pad_t + plot_h}" class="tick" text-anchor="end">$0</text>'
        + line(cf, "counterfactual", totals["counterfactual_usd"])
        + line(cost, "spend", totals["cost_usd"])
        + f'<text x="{pad_l}" y="{height - 6}" class="tick">{_hhmm(buckets[0]["start"])} UTC'
        "</text></svg>"
        '<div class="legend"><span class="key"><i class="cf"></i>all-closed: '
        f"{_usd(totals['counterfactual_usd'])}</span>"
        f'<span class="key"><i class="sp"></i>spent: {_usd(totals["cost_usd"])}</span>'
        f'<span class="key" id="saved" data-saved="{totals["saved_usd"]:.10f}">saved: '
        f"{_usd(totals['saved_usd'])}</span></div>"
        f'<div class="share" id="local-share" data-share="{share:.4f}">'
        f'<div class="fill" style="width:{share * 100:.1f}%"></div>'
        f"<span>{share * 100:.1f}% served locally</span></div>"
    )


def quality_block(quality: dict[str, Any]) -> str:
    """Mean label per tier (feedback and shadow judge), or why there is none."""
    if not quality["available"]:
        note = escape(quality["note"])
        return f'<p class="empty" id="quality-empty">No quality labels yet: {note}.</p>'
    rows = []
    for tier, kinds in sorted(quality["tiers"].items()):
        for kind in ("feedback", "shadow"):
            entry = kinds.get(kind) or {}
            if not entry.get("n"):
                continue
            mean = float(entry["mean"])
            rows.append(
                f'<tr data-tier="{escape(tier)}" data-kind="{kind}" data-mean="{mean:.4f}" '
                f'data-n="{int(entry["n"])}"><td>{escape(tier)}</td><td>{kind}</td>'
                f'<td><div class="meter"><div style="width:{mean * 100:.0f}%;background:'
                f'{TIER_COLOURS.get(tier, "#999")}"></div></div></td>'
                f"<td>{mean:.2f}</td><td>{int(entry['n'])}</td></tr>"
            )
    return (
        '<table id="quality"><tr><th>tier</th><th>source</th><th></th><th>mean</th><th>n</th></tr>'
        + "".join(rows)
        + "</table>"
    )


def _interpolate(curve: list[dict[str, float]], threshold: float) -> tuple[float, float]:
    """Closed share and quality at ``threshold``, linearly between the curve's points."""
    pts = sorted(curve, key=lambda p: p["threshold"])
    if threshold <= pts[0]["threshold"]:
        return pts[0]["strong_share"], pts[0]["quality"]
    for a, b in itertools.pairwise(pts):
        if a["threshold"] <= threshold <= b["threshold"]:
            span = b["threshold"] - a["threshold"]
            f = (threshold - a["threshold"]) / span if span else 0.0
            return (
                a["strong_share"] + f * (b["strong_share"] - a["strong_share"]),
                a["quality"] + f * (b["quality"] - a["quality"]),
            )
    return pts[-1]["strong_share"], pts[-1]["quality"]


def eval_chart(
    report: dict[str, Any] | None, thresholds: dict[str, float], width: int = 560, height: int = 240
) -> str:
    """The evaluation's quality against closed share, with each alias's threshold marked."""
    if not report or not report.get("curve"):
        return (
            '<p class="empty" id="eval-empty">No evaluation yet: set TIERGATE_EVAL_REPORT to a '
            "report written by <code>tiergate eval --json</code>.</p>"
        )
    curve = [p for p in report["curve"] if isinstance(p, dict)]
    pad_l, pad_b, pad_t = 44, 30, 10
    plot_w, plot_h = width - pad_l - 10, height - pad_b - pad_t
    qs = [p["quality"] for p in curve]
    lo, hi = min(qs), max(qs)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.05, hi + 0.05

    def xy(share: float, quality: float) -> tuple[float, float]:
        return pad_l + plot_w * share, pad_t + plot_h - plot_h * (quality - lo) / (hi - lo)

    ordered = sorted(curve, key=lambda p: p["strong_share"])
    pts = " ".join("{:.1f},{:.1f}".format(*xy(p["strong_share"], p["quality"])) for p in ordered)
    parts = [
        f'<svg class="chart" id="eval-chart" viewBox="0 0 {width} {height}" role="img" '
        f'data-points="{len(curve)}" aria-label="quality versus closed share">',
        f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{pad_l + plot_w}" y2="{pad_t + plot_h}" '
        'class="axis"/>',
        f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + plot_h}" class="axis"/>',
        f'<polyline class="curve" points="{pts}"/>',
        f'<text x="{pad_l - 4}" y="{pad_t + 10}" class="tick" text-anchor="end">{hi:.2f}</text>',
        f'<text x="{pad_l - 4}" y="{pad_t + plot_h}" class="tick" text-anchor="end">'
        f"{lo:.2f}</text>",
        f'<text x="{pad_l}" y="{height - 14}" class="tick">0%</text>',
        f'<text x="{pad_l + plot_w}" y="{height - 14}" class="tick" text-anchor="end">100%</text>',
        f'<text x="{pad_l + plot_w / 2}" y="{height - 2}" class="tick" text-anchor="middle">'
        "share sent to the closed tier</text>",
    ]
    for i, (alias, t) in enumerate(sorted(thresholds.items())):
        share, quality = _interpolate(curve, t)
        x, y = xy(share, quality)
        parts.append(
            f'<g class="marker" data-alias="{escape(alias)}" data-threshold="{t:.4f}" '
            f'data-closed-share="{share:.4f}"><line x1="{x:.1f}" y1="{pad_t}" x2="{x:.1f}" '
            f'y2="{pad_t + plot_h}"/><circle cx="{x:.1f}" cy="{y:.1f}" r="4"/>'
            f'<text x="{x + (-4 if share > 0.6 else 4):.1f}" y="{pad_t + 12 + 12 * i}" '
            f'class="tick" text-anchor="{"end" if share > 0.6 else "start"}">{escape(alias)} '
            f"t={t:.2f} ({share * 100:.0f}%)</text></g>"
        )
    parts.append("</svg>")
    apgr = report.get("apgr")
    value = apgr.get("value") if isinstance(apgr, dict) else None
    # null (or NaN, from an older report) where the evaluation could not tell it: not drawn.
    told = isinstance(value, int | float) and math.isfinite(value)
    apgr_text = f"APGR {value:.3f}" if told else ""
    parts.append(
        f'<p class="note">{escape(apgr_text)} n={report.get("n", "?")} '
        f"· {escape(str(report.get('path', '')))}</p>"
    )
    return "".join(parts)


def problems_table(problems: list[dict[str, Any]]) -> str:
    """Recent fallbacks, errors and requests whose client left, newest first."""
    if not problems:
        return '<p class="empty">No fallbacks or errors in this window.</p>'
    rows = "".join(
        f'<tr data-status="{escape(str(p["status"]))}" '
        f'data-fallback="{escape(str(p["fallback"] or ""))}">'
        f"<td>{time.strftime('%H:%M:%S', time.gmtime(p['ts']))}</td>"
        f"<td>{escape(str(p['tier'] or '-'))}/{escape(str(p['model'] or '-'))}</td>"
        f"<td>{escape(str(p['status']))} {p['http_status']}</td>"
        f"<td>{escape(str(p['fallback'] or p['error_type'] or ''))}</td>"
        f"<td><code>{escape(str(p['id']))}</code></td></tr>"
        for p in problems
    )
    return (
        '<table id="problems"><tr><th>time (UTC)</th><th>tier/model</th><th>status</th>'
        f"<th>fallback / error</th><th>request id</th></tr>{rows}</table>"
    )


def fronts_table(by_front: dict[str, dict[str, Any]]) -> str:
    """Requests, closed share, spend, errors and clients that left per front (the API the
    clients spoke)."""
    if not by_front:
        return '<p class="empty">no requests recorded</p>'
    rows = "".join(
        f'<tr data-front="{escape(name)}" data-requests="{f["requests"]}" '
        f'data-closed-share="{f["closed_share"]:.4f}" data-cost="{f["cost_usd"]:.10f}" '
        f'data-errors="{f["errors"]}" data-aborted="{f["aborted"]}"><td>{escape(name)}</td>'
        f"<td>{f['requests']}</td><td>{f['closed_share'] * 100:.1f}%</td>"
        f"<td>{_usd(f['cost_usd'])}</td><td>{f['errors']}</td><td>{f['aborted']}</td></tr>"
        for name, f in by_front.items()
    )
    return (
        '<table id="fronts"><tr><th>front</th><th>requests</th><th>closed share</th>'
        f"<th>spent</th><th>errors</th><th>clients left</th></tr>{rows}</table>"
    )


def versions_block(live: dict[str, Any], versions: list[dict[str, Any]]) -> str:
    """The policy and model versions serving now, and those seen in the window."""
    seen = "".join(
        f"<tr><td><code>{escape(str(v['policy_version']))}</code></td>"
        f"<td><code>{escape(str(v['model_version']))}</code></td><td>{v['requests']}</td></tr>"
        for v in versions
    )
    thresholds = ", ".join(f"{escape(a)}={t:.2f}" for a, t in sorted(live["thresholds"].items()))
    return (
        f'<p id="live-versions" data-policy="{escape(live["policy_version"])}" '
        f'data-model="{escape(live["model_version"])}">policy <code>'
        f"{escape(live['policy_version'])}</code> · scorer <code>{escape(live['scorer'])} "
        f"{escape(live['model_version'])}</code> · thresholds {thresholds}</p>"
        "<table><tr><th>policy version</th><th>model version</th><th>requests</th></tr>"
        f"{seen}</table>"
    )


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;
background:#f4f5f7;color:#1d1d1f}
header{background:#1d2330;color:#fff;padding:10px 20px;display:flex;gap:16px;align-items:baseline}
header h1{font-size:18px;margin:0}header a{color:#cfd8ff;margin-right:8px}
main{max-width:1240px;margin:0 auto;padding:12px 16px;display:grid;
grid-template-columns:repeat(auto-fit,minmax(520px,1fr));gap:12px}
section{background:#fff;border-radius:8px;padding:10px 14px;box-shadow:0 1px 2px #0002}
section h2{font-size:15px;margin:0 0 6px}.wide{grid-column:1/-1}
.tiles{display:flex;flex-wrap:wrap;gap:10px}.tile{background:#f4f5f7;border-radius:6px;
padding:6px 12px;min-width:110px}.tile .v{font-size:20px;font-weight:600}.tile .l{color:#555}
.chart{width:100%;height:auto}.axis{stroke:#999}.tick{font-size:11px;fill:#555}
.spend{fill:none;stroke:#2e8b57;stroke-width:2.5}.counterfactual{fill:none;stroke:#c0392b;
stroke-width:2;stroke-dasharray:6 4}.curve{fill:none;stroke:#3b6fd4;stroke-width:2.5}
.marker line{stroke:#c0392b;stroke-dasharray:4 3}.marker circle{fill:#c0392b}
.legend{display:flex;gap:14px;flex-wrap:wrap;margin-top:4px}.key i{display:inline-block;
width:11px;height:11px;margin-right:4px;vertical-align:-1px;border-radius:2px}
.key i.cf{background:#c0392b}.key i.sp{background:#2e8b57}
.share{position:relative;background:#e6e8ec;border-radius:4px;height:22px;margin-top:8px}
.share .fill{background:#2e8b57;height:100%;border-radius:4px}.share span{position:absolute;
left:8px;top:2px;font-weight:600}
table{border-collapse:collapse;width:100%;font-size:13px}td,th{text-align:left;padding:3px 6px;
border-bottom:1px solid #eee}code{font-size:12px}
.meter{background:#e6e8ec;width:160px;height:10px;border-radius:3px}.meter div{height:100%;
border-radius:3px}.empty,.note{color:#666}
"""


def _query(window_s: int, tenant: str | None) -> str:
    """A link's query: the window, and the tenant a view is narrowed to (escaped for HTML)."""
    params: dict[str, Any] = {"window_s": window_s}
    if tenant is not None:
        params["tenant"] = tenant
    return escape(urlencode(params))


def tenants_nav(window_s: int, tenant: str | None, seen: dict[str, int]) -> str:
    """Links to every tenant's view and to each tenant with requests in the window."""
    names = sorted({*seen, *([tenant] if tenant is not None else [])})
    links = [
        f'<a href="?{_query(window_s, None)}" data-tenant=""'
        + (' aria-current="page"' if tenant is None else "")
        + ">all tenants</a>"
    ]
    for name in names:
        current = ' aria-current="page"' if name == tenant else ""
        links.append(
            f'<a href="?{_query(window_s, name)}" data-tenant="{escape(name)}"{current}>'
            f"{escape(name)} ({seen.get(name, 0)})</a>"
        )
    return f'<nav id="tenants">{" ".join(links)}</nav>'


def render_page(data: dict[str, Any]) -> str:
    """The whole dashboard page."""
    summary, totals = data["summary"], data["summary"]["totals"]
    window, tenant = data["window_s"], data["tenant"]
    windows = "".join(f'<a href="?{_query(w, tenant)}">{_span_label(w)}</a>' for w in WINDOWS_S)
    scope = "every tenant" if tenant is None else f"tenant {tenant}"
    tiles = "".join(
        (
            _tile("requests", str(totals["requests"]), "requests"),
            _tile("served locally", f"{totals['local_share'] * 100:.1f}%", "local_share"),
            _tile("spent serving", _usd(totals["cost_usd"]), "cost"),
            _tile("all-closed would be", _usd(totals["counterfactual_usd"]), "counterfactual"),
            _tile("saved", _usd(totals["saved_usd"]), "saved"),
            _tile("shadow judging", _usd(data["judging"]["cost_usd"]), "judging"),
            _tile("spent in all", _usd(data["spend"]["total_usd"]), "total_spend"),
            _tile("fallbacks", str(totals["fallbacks"]), "fallbacks"),
            _tile("errors", str(totals["errors"]), "errors"),
            _tile("clients left", str(totals["aborted"]), "aborted"),
        )
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Tiergate dashboard</title>
<meta name="viewport" content="width=device-width,initial-scale=1">
<meta http-equiv="refresh" content="30"><style>{_CSS}</style></head>
<body><header><h1>Tiergate</h1><span id="scope" data-tenant="{escape(tenant or "")}">
{escape(scope)}, last {_span_label(window)}, updated
{time.strftime("%H:%M:%S", time.gmtime(data["generated_at"]))} UTC</span>
<nav>{windows}<a href="dashboard/data?{_query(window, tenant)}">JSON</a></nav></header>
<main>
<section class="wide">{tenants_nav(window, tenant, summary["tenants"])}</section>
<section class="wide"><div class="tiles">{tiles}</div></section>
<section><h2>Requests by tier</h2>{requests_chart(summary)}</section>
<section><h2>Spend vs all-closed</h2>{spend_chart(summary)}</section>
<section class="wide"><h2>By front</h2>{fronts_table(summary["by_front"])}</section>
<section><h2>Quality per tier (feedback, shadow judge)</h2>
{quality_block(data["quality"])}</section>
<section><h2>Cascade: escalations</h2>{cascade_block(data["cascade"])}</section>
<section><h2>Evaluation: quality vs closed share</h2>
{eval_chart(data["evaluation"], data["live"]["thresholds"])}</section>
<section class="wide"><h2>Recent fallbacks and errors</h2>
{problems_table(summary["problems"])}</section>
<section class="wide"><h2>Versions</h2>{versions_block(data["live"], summary["versions"])}</section>
</main></body></html>"""
