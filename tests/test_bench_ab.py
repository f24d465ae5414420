"""``python -m bench.ab``: the two sides alternate which goes first, and the summary is each
side's median per concurrency with head minus base."""

from __future__ import annotations

from typing import Any

import pytest

from bench.ab import orders, summarise


def test_the_sides_take_turns_going_first() -> None:
    assert orders(4) == [("base", "head"), ("head", "base"), ("base", "head"), ("head", "base")]


def test_the_summary_is_each_sides_median_and_the_difference() -> None:
    def run(side: str, c: int, rps: float, p50: float) -> dict[str, Any]:
        return {"side": side, "connections": c, "rps": rps, "p50": p50}

    runs = [
        run("base", 1, 500.0, 1.8),
        run("base", 1, 600.0, 1.6),
        run("base", 1, 900.0, 1.0),  # one outlier round does not move a median of three
        run("head", 1, 550.0, 1.7),
        run("head", 1, 560.0, 1.7),
        run("head", 1, 100.0, 9.0),
        run("base", 16, 700.0, 22.0),
        run("head", 16, 650.0, 24.0),
    ]
    summary = summarise(runs)
    assert summary["c1"]["base"] == {"rps": 600.0, "p50_ms": 1.6, "rounds": 3}
    assert summary["c1"]["head"] == {"rps": 550.0, "p50_ms": 1.7, "rounds": 3}
    assert summary["c1"]["head_minus_base"] == {
        "rps": -50.0,
        "p50_ms": pytest.approx(0.1),
    }
    assert summary["c16"]["head_minus_base"] == {"rps": -50.0, "p50_ms": 2.0}
