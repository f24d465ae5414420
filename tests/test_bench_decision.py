"""make bench's decision phase: a costly scorer (the encoder) is timed on a deterministic, evenly
spaced sample with its cost by prompt length, a cheap one on every prompt, ``--model`` picks the
artifact, and the static router carries the budget in the results and the README table.

No timed assertions: the speed goals are checked by the benchmark itself, never here."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench.__main__ import goals
from bench.decision_pipeline import BANDS, evenly_spaced, length_bands, run
from bench.report import decision_lines
from router.artifact import STATIC_MODEL_NAME, load_capability_model, save_profile_router
from router.capability import GatedCapability
from router.classifier import ServedCapability
from router.encoder import ENCODER_FILE
from router.training import RoutingRow, fit_gap_routing

REPO = Path(__file__).resolve().parent.parent
STATIC = REPO / "models" / STATIC_MODEL_NAME
#: A capability model that reads prompts through the encoder (its weights: `make model`).
ENCODER_CAPABILITY = REPO / "models" / "capability-v4"
#: WordPiece tokens of each prompt, one per length band and two short: "cat" is one token.
LENGTHS = (10, 80, 200, 10)


def _data(tmp_path: Path, n: int = 40) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    rows = [{"prompt": "cat " * LENGTHS[i % len(LENGTHS)]} for i in range(n)]
    (data / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


@pytest.fixture(scope="module")
def encoder_router(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A profile router over capability-v4, fitted on a few rows: its scorer is ``costly``."""
    if not (REPO / "models" / ENCODER_FILE).is_file():
        pytest.fail(f"models/{ENCODER_FILE} is missing: `make model` fetches it")
    reader = load_capability_model(ENCODER_CAPABILITY)
    rows = [
        RoutingRow(f"s/{i}", f"Prove that {i} is prime" if i % 2 else f"hi {i}", i % 2, 1.0)
        for i in range(20)
    ]
    routing = fit_gap_routing(rows, ServedCapability(reader).fit())
    out = tmp_path_factory.mktemp("models") / "router-enc"
    return save_profile_router(routing, ENCODER_CAPABILITY, out)


def test_the_sample_is_evenly_spaced_the_same_every_run_and_of_the_asked_size() -> None:
    items = list(range(24_930))
    sample = evenly_spaced(items, 1500)
    assert len(sample) == 1500 and len(set(sample)) == 1500
    assert sample == evenly_spaced(items, 1500)
    gaps = {b - a for a, b in itertools.pairwise(sample)}
    assert gaps <= {16, 17}  # 24,930 / 1,500 = 16.6: no stretch of the data is skipped
    assert sample[0] == 0 and sample[-1] >= 24_930 - 17
    assert evenly_spaced(items[:900], 1500) == items[:900]  # fewer than asked: all of them
    assert evenly_spaced(items[:900], 0) == items[:900]


def test_length_bands_split_at_32_and_126_tokens_and_sum_to_the_sample() -> None:
    tokens = [1, 32, 33, 126, 127, 500]
    ms = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    bands = length_bands(ms, tokens)
    assert list(bands) == [label for label, _ in BANDS]
    assert {k: b["prompts"] for k, b in bands.items()} == {"<=32": 2, "33-126": 2, ">126": 2}
    assert bands["<=32"]["p99"] == 2.0 and bands["33-126"]["p50"] == 3.5
    assert bands[">126"] == {"prompts": 2, "p50": 5.5, "p99": 6.0}
    assert length_bands([1.0], [5])[">126"] == {"prompts": 0}  # empty band: no figures


def test_a_costly_scorer_is_timed_once_on_the_sample_with_its_cost_by_length(
    tmp_path: Path, encoder_router: Path
) -> None:
    got = run(_data(tmp_path), model=encoder_router, sample=12)
    assert got["costly"] is True and got["scorer"] == "learned router-enc"
    assert (got["prompts"], got["data_prompts"], got["sampled"]) == (12, 40, "12 of 40")
    assert got["passes"] == 1 and got["single_pass_p50"] == got["p50"]
    assert sum(got["routes"].values()) == 12
    bands = got["length_bands"]
    assert sum(b["prompts"] for b in bands.values()) == 12
    # The sample is prompts 0, 3, 6, 10, ... of 40: six of 10 tokens, two of 80, four of 200.
    assert {k: b["prompts"] for k, b in bands.items()} == {"<=32": 6, "33-126": 2, ">126": 4}
    assert all(b["p50"] <= b["p99"] for b in bands.values())


def test_a_cheap_scorer_is_timed_on_every_prompt_in_three_passes(tmp_path: Path) -> None:
    got = run(_data(tmp_path), model=STATIC)
    assert got["costly"] is False and got["scorer"] == f"learned {STATIC_MODEL_NAME}"
    assert (got["prompts"], got["data_prompts"], got["sampled"], got["passes"]) == (40, 40, None, 3)
    assert got["length_bands"] is None
    assert got["p50"] <= got["p90"] <= got["p99"] <= got["max"]


def test_the_command_line_times_the_given_model_on_the_first_prompts(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "bench.decision_pipeline", "--json", "--limit", "7"]
    argv += ["--model", str(STATIC), "--data", str(_data(tmp_path))]
    argv += ["--out", str(tmp_path / "out.json")]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert printed == json.loads((tmp_path / "out.json").read_text())
    assert printed["prompts"] == 7 and printed["model"] == str(STATIC)


def _figures(p50: float, p99: float, **more: Any) -> dict[str, Any]:
    return {"p50": p50, "p90": p50, "p99": p99, "max": p99, "mean": p50, "passes": 3,
            "prompts": 100, "scorer": "learned x", "evaluate_p50": 0.02, "evaluate_p99": 0.03,
            **more}  # fmt: skip


def test_the_budget_is_the_static_routers_and_the_encoders_cost_is_stated() -> None:
    costly = _figures(
        14.0,
        46.0,
        scorer="learned router-v7",
        costly=True,
        passes=1,
        prompts=1500,
        sampled="1500 of 24930",
        length_bands={"<=32": {"prompts": 700, "p50": 9.0, "p99": 12.0}},
    )
    static = _figures(0.27, 0.84, scorer=f"learned {STATIC_MODEL_NAME}")
    results: dict[str, Any] = {"decision": costly, "decision_static": static}
    results["goals"] = goals(results)
    assert results["goals"]["decision_p50_ms"] == {"value": 0.27, "target": 0.3, "met": True}
    assert results["goals"]["decision_p99_ms"]["met"] is True
    text = "\n".join(decision_lines(results))
    assert "1500 of 24930 (sampled)" in text and f"`learned {STATIC_MODEL_NAME}` | 100 |" in text
    assert f"applied to `learned {STATIC_MODEL_NAME}`: met" in text
    assert "`learned router-v7` reads every prompt through the encoder: p50 14.00 ms" in text
    assert "| <=32 | 700 | 9.000 | 12.000 |" in text


def test_a_run_with_one_router_is_held_to_the_budget_and_still_renders() -> None:
    # A results file from before the static router was timed beside the server's.
    old = {"decision": _figures(0.4, 1.2)}
    old["decision"].pop("p90")
    old["goals"] = goals(old)
    assert old["goals"]["decision_p50_ms"]["met"] is False
    text = "\n".join(decision_lines(old))
    assert "| server's router | `learned x` | 100 | 3 | 0.4000 | - |" in text
    assert "**not met**" in text and "static router" not in text


def test_a_scorer_over_a_gate_is_timed_apart_for_the_prompts_the_encoder_reads(
    tmp_path: Path,
) -> None:
    gate_dir = REPO / "models" / "capability-v5"
    gate = load_capability_model(gate_dir)
    assert isinstance(gate, GatedCapability)
    rows = [
        RoutingRow(f"s/{i}", f"Prove that {i} is prime" if i % 2 else f"hi {i}", i % 2, 1.0)
        for i in range(20)
    ]
    routing = fit_gap_routing(rows, ServedCapability(gate).fit())
    router = save_profile_router(routing, gate_dir, tmp_path / "models" / "router-gate")
    data = tmp_path / "data"
    data.mkdir()
    texts = ["Write a haiku about the sea.", "Give me three ideas for a weekend trip near Lyon."]
    texts = [t for t in texts for _ in range(3)]
    (data / "a.jsonl").write_text("".join(json.dumps({"prompt": t}) + "\n" for t in texts))
    got = run(data, model=router, sample=6)
    split = got["gate"]
    unsure = sum(float(gate.first.probabilities(t).max()) < gate.threshold for t in texts)
    assert unsure == 3  # the second prompt only: the table is sure of the haiku
    assert (split["encoder"]["prompts"], split["table"]["prompts"]) == (3, 3)
    assert sum(b["prompts"] for b in got["length_bands"].values()) == 6
    assert run(data, model=STATIC)["gate"] is None


def test_the_report_says_what_share_of_prompts_a_gate_reads_through_the_encoder() -> None:
    costly = _figures(
        9.0,
        46.0,
        scorer="learned router-v8",
        costly=True,
        passes=1,
        gate={
            "table": {"prompts": 300, "p50": 0.31, "p99": 0.9},
            "encoder": {"prompts": 700, "p50": 21.0, "p99": 47.0},
        },
    )
    static = _figures(0.27, 0.84, scorer=f"learned {STATIC_MODEL_NAME}")
    text = "\n".join(decision_lines({"decision": costly, "decision_static": static}))
    assert "`learned router-v8` reads 70% of the prompts (those its static table is unsure" in text
    assert "Decided from the table alone: 300 prompts, p50 0.310 ms, p99 0.900 ms" in text
    assert "read through the encoder: 700 prompts, p50 21.00 ms, p99 47.00 ms." in text


def test_the_size_cap_table_renders_the_outcome_of_new_and_old_results() -> None:
    from bench.report import _decision_cap_lines

    shape = {"body_bytes": 8388608, "min_ms": 0.1, "median_ms": 0.2, "cpu_min_ms": 0.1}
    cap = {"cap_bytes": 8388608, "scorer": "learned x", "repeats": 5, "shapes": {
        "prose": {**shape, "outcome": "400 context_length_exceeded"},
        "older": {**shape, "tier": "local", "pii": True},
    }}  # fmt: skip
    text = "\n".join(_decision_cap_lines(cap))
    assert "| prose | 8388608 | 0.1 | 0.2 | 0.1 | 400 context_length_exceeded |" in text
    assert "| older | 8388608 | 0.1 | 0.2 | 0.1 | local (pii) |" in text
