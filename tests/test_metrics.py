"""APGR / CPT as RouteLLM defines them, checked against hand-computed examples."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from router.metrics import (
    apgr_from_curve,
    cpt_from_curve,
    evaluate,
    fine_apgr,
    oracle_reference,
    random_reference,
    routing_curve,
)

# Ten prompts with distinct scores 1..10; only the two highest-scored gain from the strong model.
SCORES = np.arange(1.0, 11.0)
WEAK = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0, 0], dtype=float)
STRONG = np.ones(10)


def test_curve_uses_quantile_thresholds_and_strict_last_edge() -> None:
    curve = routing_curve(SCORES, WEAK, STRONG)
    assert len(curve) == 11
    assert [round(p.strong_share, 10) for p in curve] == [round(1 - i / 10, 10) for i in range(11)]
    assert curve[0].threshold == 1.0 and curve[-1].threshold == 10.0
    assert curve[-1].strong_share == 0.0  # score > max selects nothing
    assert curve[-1].quality == pytest.approx(0.8)


def test_apgr_and_cpt_match_hand_computation() -> None:
    # Curve: (0, .8), (.1, .9), (.2, 1.0) ... (1, 1.0). Area = .085 + .095 + .8 = .98.
    curve = routing_curve(SCORES, WEAK, STRONG)
    assert apgr_from_curve(curve, 0.8, 1.0) == pytest.approx(0.9)
    assert fine_apgr(SCORES, WEAK, STRONG) == pytest.approx(0.9)
    assert cpt_from_curve(curve, 0.8, 1.0, 0.5) == pytest.approx(0.10)
    assert cpt_from_curve(curve, 0.8, 1.0, 0.8) == pytest.approx(0.16)


def test_reversed_router_is_worse_than_random() -> None:
    # Reversed: the gains arrive last. Area = .8 * .8 + .1 * .85 + .1 * .95 = .82 -> APGR .1
    assert fine_apgr(-SCORES, WEAK, STRONG) == pytest.approx(0.1)


def test_fine_apgr_hand_example_with_a_loss() -> None:
    s = np.array([4.0, 3.0, 2.0, 1.0])
    w = np.array([0.0, 0.0, 1.0, 1.0])
    g = np.array([1.0, 1.0, 1.0, 0.0])
    # x: 0 .25 .5 .75 1 ; y: .5 .75 1 1 .75 ; area .84375 ; (.84375-.5)/.25
    assert fine_apgr(s, w, g) == pytest.approx(1.375)


def test_oracle_is_the_best_ordering() -> None:
    w = np.array([0, 1, 1, 1, 0, 0, 1], dtype=float)
    g = np.array([1, 0, 1, 1, 1, 0, 1], dtype=float)  # two gains, one loss
    best = max(fine_apgr(np.array(p, dtype=float), w, g) for p in itertools.permutations(range(7)))
    assert oracle_reference(w, g)["apgr_fine"] == pytest.approx(best)


def test_random_reference_is_about_one_half() -> None:
    rng = np.random.default_rng(0)
    w = rng.integers(0, 2, 3000).astype(float)
    g = np.clip(w + rng.integers(0, 2, 3000), 0, 1)
    ref = random_reference(w, g, draws=20)
    assert ref["apgr"] == pytest.approx(0.5, abs=0.03)
    assert ref["cpt50"] == pytest.approx(0.5, abs=0.05)


def test_evaluate_reports_intervals_around_the_point() -> None:
    rng = np.random.default_rng(2)
    w = rng.integers(0, 2, 400).astype(float)
    g = np.clip(w + rng.integers(0, 2, 400), 0, 1)
    s = (g - w) + rng.normal(0, 0.8, 400)
    report = evaluate(s, w, g, n_bootstrap=200, threshold=0.5)
    assert report.apgr.low <= report.apgr.value <= report.apgr.high
    assert 0.5 < report.apgr.value < report.oracle["apgr"]
    assert report.threshold_point is not None
    assert report.threshold_point["strong_share"] == pytest.approx(float(np.mean(s >= 0.5)))
    again = evaluate(s, w, g, n_bootstrap=200, threshold=0.5)
    assert again.apgr == report.apgr  # seeded bootstrap is reproducible


def test_mismatched_lengths_are_rejected() -> None:
    with pytest.raises(ValueError, match="equal-length"):
        routing_curve([1.0, 2.0], [0.0], [1.0, 1.0])
