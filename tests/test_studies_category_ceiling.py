"""The category-ceiling study's arithmetic: group means, split halves, the committed results."""

from __future__ import annotations

import json

import numpy as np

from router.training import RoutingRow
from studies.category_ceiling import RESULTS, ceiling, group_means, split_half


def _rows(gaps: list[float], groups: list[str]) -> list[RoutingRow]:
    # weak 0.5 - gap/2, strong 0.5 + gap/2: the gap is what the group means read
    return [
        RoutingRow(f"r{i}", "p", 0.5 - g / 2, 0.5 + g / 2, category=c)
        for i, (g, c) in enumerate(zip(gaps, groups, strict=True))
    ]


def test_a_group_mean_reads_only_the_fitted_rows_and_falls_back_to_their_mean() -> None:
    groups = np.array(["a", "a", "b", "c"])
    gap = np.array([1.0, 0.0, 0.4, 0.9])
    fit = np.array([True, True, True, False])
    # c has no fitted row: it takes the fitted rows' mean (1.4 / 3)
    assert group_means(groups, gap, fit).tolist() == [0.5, 0.5, 0.4, 1.4 / 3]


def test_groups_that_separate_the_gap_reach_the_item_oracle_and_one_group_is_random() -> None:
    rng = np.random.default_rng(0)
    n = 400
    high = rng.random(n) < 0.5
    gaps = np.where(high, 0.8, 0.0) + rng.random(n) * 0.01
    rows = _rows(gaps.tolist(), ["x"] * n)
    found = ceiling(rows, ["hard" if h else "easy" for h in high], seed=0)
    # by capability the groups split the gap: within 0.02 of the per-row oracle
    assert abs(found["capability"]["in_sample"] - found["item"]) < 0.02
    assert found["capability"]["split_half"] > 0.7
    # one category holds every row: no better than random
    assert abs(found["category"]["in_sample"] - 0.5) < 0.05
    assert abs(found["category"]["split_half"] - 0.5) < 0.05


def test_split_half_gives_two_figures_a_split() -> None:
    weak = np.zeros(50)
    strong = np.linspace(0.0, 1.0, 50)
    assert len(split_half(np.array(["a"] * 25 + ["b"] * 25), weak, strong, seed=1)) == 20


def test_the_committed_results_cover_every_file_and_sit_under_the_item_oracle() -> None:
    found = json.loads(RESULTS.read_text())
    assert len(found["files"]) == 6
    for v in found["files"].values():
        for kind in ("capability", "category"):
            assert 0.4 < v[kind]["split_half"] <= v[kind]["in_sample"] + 0.05 <= v["item"] + 0.05
