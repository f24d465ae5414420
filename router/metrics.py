"""Routing quality metrics: the cost/quality curve, APGR and CPT, as RouteLLM's evals define them.

Definitions follow ``routellm/evals/benchmarks.py`` and ``routellm/evals/evaluate.py``
(lm-sys/RouteLLM):

* **Thresholds**: the 11 quantile edges of the router's scores (``pd.qcut(scores, 10,
  retbins=True)``, linear interpolation, duplicates kept). At edge ``i`` a prompt goes to the
  strong model when ``score >= t``; at the last edge (the maximum) when ``score > t`` (so none).
* **Curve**: for each threshold, the share of strong calls and the mean quality, where a prompt
  routed strong is credited ``strong_score`` and otherwise ``weak_score``.
* **APGR**: points sorted by strong share; ``np.trapz`` area under the curve minus the all-weak
  area, over the all-strong minus all-weak area (both areas over the same x range).
* **CPT(x%)**: ``np.interp(weak + x * (strong - weak), quality, strong_share)`` with the points
  sorted by strong share, exactly as RouteLLM computes it (``np.interp`` assumes the quality
  column is increasing; for a non-monotone curve that is RouteLLM's behaviour too).

Beyond RouteLLM: a fine-grained APGR over every distinct score threshold, percentile bootstrap
95% confidence intervals (rows resampled with replacement) and random / oracle references.
Qualities stay on the data's own scale (RouteLLM multiplies by 100; APGR and CPT do not change).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class CurvePoint:
    """One point of the routing curve: at ``threshold``, this share goes strong, at this quality."""

    threshold: float
    strong_share: float
    quality: float


@dataclass(frozen=True, slots=True)
class Interval:
    """A point estimate with a percentile bootstrap 95% confidence interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class EvalReport:
    """Everything ``tiergate eval`` reports for one scored data set."""

    n: int
    weak_quality: float
    strong_quality: float
    curve: list[CurvePoint]
    apgr: Interval
    apgr_fine: Interval
    cpt50: Interval
    cpt80: Interval
    random: dict[str, float]
    oracle: dict[str, float]
    threshold: float | None = None
    threshold_point: dict[str, float] | None = None
    n_bootstrap: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (``tiergate eval --json``)."""
        return asdict(self)


def _arrays(scores: ArrayLike, weak: ArrayLike, strong: ArrayLike) -> tuple[FloatArray, ...]:
    s = np.asarray(scores, dtype=np.float64)
    w = np.asarray(weak, dtype=np.float64)
    g = np.asarray(strong, dtype=np.float64)
    if not (s.shape == w.shape == g.shape) or s.ndim != 1 or s.size == 0:
        raise ValueError("scores, weak and strong must be equal-length non-empty 1-D arrays")
    return s, w, g


def routing_curve(
    scores: ArrayLike, weak: ArrayLike, strong: ArrayLike, num_results: int = 10
) -> list[CurvePoint]:
    """The RouteLLM curve at the ``num_results + 1`` quantile thresholds of ``scores``."""
    s, w, g = _arrays(scores, weak, strong)
    thresholds = np.quantile(s, np.linspace(0.0, 1.0, num_results + 1))
    points = []
    for i, t in enumerate(thresholds):
        sel = s >= t if i != len(thresholds) - 1 else s > t
        quality = float(np.where(sel, g, w).mean())
        points.append(CurvePoint(float(t), float(sel.mean()), quality))
    return points


def _sorted_xy(points: list[CurvePoint]) -> tuple[FloatArray, FloatArray]:
    pts = sorted(points, key=lambda p: p.strong_share)  # stable, as a pandas sort by one column
    x = np.array([p.strong_share for p in pts])
    y = np.array([p.quality for p in pts])
    return x, y


def apgr_from_curve(points: list[CurvePoint], weak_quality: float, strong_quality: float) -> float:
    """APGR of a curve: (router area - all-weak area) / (all-strong area - all-weak area)."""
    x, y = _sorted_xy(points)
    auc = float(np.trapezoid(y, x))
    span = float(x[-1] - x[0])
    weak_auc, strong_auc = weak_quality * span, strong_quality * span
    if strong_auc == weak_auc:
        return float("nan")
    return (auc - weak_auc) / (strong_auc - weak_auc)


def cpt_from_curve(
    points: list[CurvePoint], weak_quality: float, strong_quality: float, pct: float
) -> float:
    """CPT(pct): the strong-call share needed to recover ``pct`` of the quality gap (0..1)."""
    x, y = _sorted_xy(points)
    target = pct * (strong_quality - weak_quality) + weak_quality
    return float(np.interp(target, y, x))


def fine_curve(scores: ArrayLike, weak: ArrayLike, strong: ArrayLike) -> tuple[FloatArray, ...]:
    """Strong share and quality at every distinct threshold (``score >= t``), plus the 0% point."""
    s, w, g = _arrays(scores, weak, strong)
    n = s.size
    order = np.argsort(-s, kind="stable")
    s_sorted = s[order]
    gain = np.cumsum((g - w)[order])
    # The last index of each run of equal scores: everything up to it is >= that score.
    ends = np.flatnonzero(np.r_[s_sorted[1:] != s_sorted[:-1], True])
    x = np.r_[0.0, (ends + 1) / n]
    y = w.mean() + np.r_[0.0, gain[ends]] / n
    return x, y


def fine_apgr(scores: ArrayLike, weak: ArrayLike, strong: ArrayLike) -> float:
    """APGR with every distinct score as a threshold instead of 11 quantiles."""
    _, w, g = _arrays(scores, weak, strong)
    x, y = fine_curve(scores, weak, strong)
    wq, sq = float(w.mean()), float(g.mean())
    if sq == wq:
        return float("nan")
    return (float(np.trapezoid(y, x)) - wq) / (sq - wq)


def _point_metrics(s: FloatArray, w: FloatArray, g: FloatArray) -> tuple[float, ...]:
    wq, sq = float(w.mean()), float(g.mean())
    curve = routing_curve(s, w, g)
    return (
        apgr_from_curve(curve, wq, sq),
        fine_apgr(s, w, g),
        cpt_from_curve(curve, wq, sq, 0.5),
        cpt_from_curve(curve, wq, sq, 0.8),
    )


def paired(
    a: ArrayLike,
    b: ArrayLike,
    weak: ArrayLike,
    strong: ArrayLike,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """APGR and CPT(50%) of routers ``a`` and ``b`` (scores of the same rows), with the 95%
    percentile bootstrap interval of ``a - b`` from the same resampled rows for both."""
    s_a, w, g = _arrays(a, weak, strong)
    s_b, _, _ = _arrays(b, weak, strong)
    rng = np.random.default_rng(seed)
    diffs = np.zeros((n_bootstrap, 2))
    for k in range(n_bootstrap):
        idx = rng.integers(0, w.size, w.size)
        pa = _point_metrics(s_a[idx], w[idx], g[idx])
        pb = _point_metrics(s_b[idx], w[idx], g[idx])
        diffs[k] = (pa[0] - pb[0], pa[2] - pb[2])
    ma, mb = _point_metrics(s_a, w, g), _point_metrics(s_b, w, g)
    lo, hi = np.nanpercentile(diffs, [2.5, 97.5], axis=0)
    return {
        "apgr": ma[0],
        "apgr_baseline": mb[0],
        "apgr_diff_ci": [float(lo[0]), float(hi[0])],
        "cpt50": ma[2],
        "cpt50_baseline": mb[2],
        "cpt50_diff_ci": [float(lo[1]), float(hi[1])],
    }


def _summary(s: FloatArray, w: FloatArray, g: FloatArray) -> dict[str, float]:
    apgr, fine, c50, c80 = _point_metrics(s, w, g)
    return {"apgr": apgr, "apgr_fine": fine, "cpt50": c50, "cpt80": c80}


def random_reference(
    weak: ArrayLike, strong: ArrayLike, *, draws: int = 50, seed: int = 0
) -> dict[str, float]:
    """Mean metrics of a router with uniform random scores (APGR ≈ 0.5, CPT(x) ≈ x)."""
    w = np.asarray(weak, dtype=np.float64)
    g = np.asarray(strong, dtype=np.float64)
    rng = np.random.default_rng(seed)
    rows = [_summary(rng.random(w.size), w, g) for _ in range(draws)]
    return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}


def oracle_reference(weak: ArrayLike, strong: ArrayLike) -> dict[str, float]:
    """Metrics of the oracle router, whose score is the true gain ``strong - weak``. Its APGR
    is over 1 where the weak model sometimes answers better: sending only the prompts the strong
    one wins lifts the curve above the all-strong quality."""
    w = np.asarray(weak, dtype=np.float64)
    g = np.asarray(strong, dtype=np.float64)
    return _summary(g - w, w, g)


def evaluate(
    scores: ArrayLike,
    weak: ArrayLike,
    strong: ArrayLike,
    *,
    n_bootstrap: int = 1000,
    seed: int = 0,
    threshold: float | None = None,
) -> EvalReport:
    """The full report for router ``scores`` against per-prompt ``weak``/``strong`` qualities.

    Point estimates use all rows; the 95% intervals are percentiles of ``n_bootstrap`` row
    resamples. ``threshold`` (the policy's score cut-off), when given, adds the strong share and
    quality that this one threshold produces.
    """
    s, w, g = _arrays(scores, weak, strong)
    point = _point_metrics(s, w, g)
    boot = np.full((n_bootstrap, 4), np.nan)
    rng = np.random.default_rng(seed)
    for b in range(n_bootstrap):
        idx = rng.integers(0, s.size, s.size)
        boot[b] = _point_metrics(s[idx], w[idx], g[idx])
    intervals = []
    for j, value in enumerate(point):
        col = boot[:, j][np.isfinite(boot[:, j])]
        if col.size:
            low, high = np.percentile(col, [2.5, 97.5])
        else:
            low = high = float("nan")
        intervals.append(Interval(float(value), float(low), float(high)))
    threshold_point = None
    if threshold is not None:
        sel = s >= threshold
        threshold_point = {
            "strong_share": float(sel.mean()),
            "quality": float(np.where(sel, g, w).mean()),
        }
    return EvalReport(
        n=int(s.size),
        weak_quality=float(w.mean()),
        strong_quality=float(g.mean()),
        curve=routing_curve(s, w, g),
        apgr=intervals[0],
        apgr_fine=intervals[1],
        cpt50=intervals[2],
        cpt80=intervals[3],
        random=random_reference(w, g),
        oracle=oracle_reference(w, g),
        threshold=threshold,
        threshold_point=threshold_point,
        n_bootstrap=n_bootstrap,
    )


def summary(report: EvalReport) -> dict[str, Any]:
    """The headline numbers of a report (no curve), for sidecars and the model card."""
    out: dict[str, Any] = {"n": report.n}
    for name in ("apgr", "apgr_fine", "cpt50", "cpt80"):
        iv: Interval = getattr(report, name)
        out[name] = {"value": iv.value, "low": iv.low, "high": iv.high}
    out["random"] = report.random
    out["oracle"] = report.oracle
    return out


def plot_report(report: EvalReport, path: str, *, title: str = "") -> None:
    """Draw the routing curve (with random, oracle and the policy threshold) to ``path``.

    Needs matplotlib (the ``plot`` extra); raises :class:`router.errors.ConfigError` without it.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        from router.errors import MissingExtraError

        raise MissingExtraError("plotting (matplotlib)", "plot") from exc
    pts = sorted(report.curve, key=lambda p: p.strong_share)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(
        [100 * p.strong_share for p in pts],
        [p.quality for p in pts],
        marker=".",
        label=f"router (APGR {report.apgr.value:.3f})",
    )
    ax.plot(
        [0, 100],
        [report.weak_quality, report.strong_quality],
        linestyle=":",
        color="grey",
        label="random",
    )
    ax.axhline(report.weak_quality, color="grey", linestyle="--", label="all weak")
    ax.axhline(report.strong_quality, color="red", linestyle="--", label="all strong")
    if report.threshold_point is not None:
        tp = report.threshold_point
        ax.axvline(100 * tp["strong_share"], color="green", linestyle="-.")
        ax.plot(
            [100 * tp["strong_share"]],
            [tp["quality"]],
            marker="o",
            color="green",
            label=f"policy threshold {report.threshold}",
        )
    ax.set_xlabel("Strong model calls (%)")
    ax.set_ylabel("Mean quality")
    ax.set_title(title or "Routing curve")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
