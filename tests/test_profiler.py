"""Measuring a local model: every probe is asked greedily and graded, the profile holds the
share right per capability with its Wilson interval, and a failed call stops the run.
Estimating one from labelled rows: the shrunk, probability-weighted mean score per capability."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from router.artifact import sha256_file
from router.errors import BackendError, ConfigError
from router.probes import probe_set
from router.profile import wilson_interval
from router.profiler import (
    ProbeResult,
    ProfiledModel,
    build_profile,
    profile_from_files,
    profile_from_labels,
    run_probes,
)
from router.scoring import CAPABILITIES
from router.training import DataFormatError, load_weak_labels
from tests.scripted_local import ScriptedLocal

PROBES = [p for p in probe_set(4) if p.capability in ("math", "chat")]
BY_PROMPT = {p.prompt: p for p in PROBES}


def _math_right(body: dict[str, Any]) -> str:
    probe = BY_PROMPT[body["messages"][-1]["content"]]
    assert body["temperature"] == 0.0 and body["max_tokens"] == probe.max_tokens
    return probe.reference if probe.capability == "math" else "I am not sure."


def test_each_probe_is_graded_and_the_profile_counts_per_capability() -> None:
    seen: list[ProbeResult] = []
    backend = ScriptedLocal(queue_size=8, reply=_math_right)
    results = asyncio.run(
        run_probes(backend, ProfiledModel("m"), PROBES, concurrency=2, on_result=seen.append)
    )
    assert len(results) == len(seen) == len(PROBES) == backend.calls
    assert all(r.correct == (r.probe.capability == "math") for r in results)
    profile = build_profile(results, model="m", notes="scripted")
    assert set(profile.capabilities) == {"math", "chat"}
    chat = profile.capabilities["chat"]
    assert (chat.accuracy, chat.n) == (0.0, 4)
    assert (chat.low, chat.high) == pytest.approx(wilson_interval(0, 4), abs=1e-4)
    assert profile.capabilities["math"].accuracy == 1.0 and profile.source == "measured"


def test_a_failed_call_stops_the_run_instead_of_counting_as_wrong() -> None:
    backend = ScriptedLocal(queue_size=8)
    backend.mode = "fail"
    with pytest.raises(BackendError, match="probe "):
        asyncio.run(run_probes(backend, ProfiledModel("m"), PROBES))


# -- estimated from labelled rows ----------------------------------------------------------------


class _PrefixCapability:
    """A capability reader that is certain of the capability a prompt names before its colon,
    and splits 'either:' prompts evenly between math and chat."""

    capabilities = CAPABILITIES
    version = "prefix-test"

    def probabilities(self, text: str) -> np.ndarray:
        head = text.split(":", 1)[0]
        names = ("math", "chat") if head == "either" else (head,)
        return np.array([1 / len(names) if c in names else 0.0 for c in CAPABILITIES])


def _rows(capability: str, right: int, wrong: int, model: str = "") -> list[dict[str, Any]]:
    return [
        {"prompt": f"{capability}: item {i}", "weak_score": float(i < right), "weak_model": model}
        for i in range(right + wrong)
    ]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_an_estimated_profile_is_the_shrunk_weighted_mean_per_capability() -> None:
    """30 maths rows, 6 right; 30 chat rows, 24 right: 60 rows give 6 pseudo-rows at the mean
    (0.5), so maths reads (6 + 3) / 36 and chat (24 + 3) / 36; a capability no row touches
    reads the mean, with n 0 and the whole [0, 1] as its interval."""
    reader = _PrefixCapability()
    rows = _rows("math", 6, 24) + _rows("chat", 24, 6)
    q = np.array([reader.probabilities(r["prompt"]) for r in rows])
    profile = profile_from_labels([r["weak_score"] for r in rows], q, CAPABILITIES, model="m")
    assert profile.source == "estimated" and set(profile.capabilities) == set(CAPABILITIES)
    math, chat, coding = (profile.capabilities[c] for c in ("math", "chat", "coding"))
    assert (math.accuracy, math.n) == (pytest.approx(9 / 36), 30)
    assert (chat.accuracy, chat.n) == (pytest.approx(27 / 36), 30)
    assert (math.low, math.high) == pytest.approx(wilson_interval(30 * 9 / 36, 30))
    assert (coding.accuracy, coding.n, coding.low, coding.high) == (0.5, 0, 0.0, 1.0)
    # a large log is shrunk by at most 20 pseudo-rows
    big = _rows("math", 100, 300) + _rows("chat", 300, 100)
    q = np.array([reader.probabilities(r["prompt"]) for r in big])
    wide = profile_from_labels([r["weak_score"] for r in big], q, CAPABILITIES, model="m")
    assert wide.capabilities["math"].accuracy == pytest.approx((100 + 10) / 420)


def test_a_split_prompt_counts_half_a_row_for_each_capability() -> None:
    reader = _PrefixCapability()
    rows = _rows("either", 10, 10) + _rows("math", 0, 20)
    q = np.array([reader.probabilities(r["prompt"]) for r in rows])
    profile = profile_from_labels([r["weak_score"] for r in rows], q, CAPABILITIES, model="m")
    assert profile.capabilities["math"].n == 30 and profile.capabilities["chat"].n == 10
    mean = 10 / 40
    assert profile.capabilities["chat"].accuracy == pytest.approx((5 + 4 * mean) / (10 + 4))


def test_profile_from_files_takes_one_weak_model_and_names_its_files(tmp_path: Path) -> None:
    """Files holding two local models need a choice; the chosen model's rows alone count, and
    the notes name each file with its sha256 and the rows used from it."""
    a = _jsonl(tmp_path / "a.jsonl", _rows("math", 2, 18, "small") + _rows("math", 18, 2, "big"))
    b = _jsonl(tmp_path / "b.jsonl", _rows("chat", 20, 0, "big"))
    with pytest.raises(ConfigError, match=r"several local models.*'big', 'small'"):
        profile_from_files([a, b], _PrefixCapability())
    with pytest.raises(ConfigError, match="no rows of weak model 'huge'"):
        profile_from_files([a, b], _PrefixCapability(), weak_model="huge")
    profile = profile_from_files([a, b], _PrefixCapability(), weak_model="big")
    assert profile.model == "big" and profile.source == "estimated"
    assert profile.capabilities["math"].accuracy == pytest.approx((18 + 4 * 38 / 40) / 24)
    notes = profile.notes or ""
    assert f"a.jsonl (20 rows, sha256 {sha256_file(a)})" in notes
    assert f"b.jsonl (20 rows, sha256 {sha256_file(b)})" in notes
    assert "capability model prefix-test" in notes


def test_labelled_rows_must_hold_a_prompt_and_a_rate(tmp_path: Path) -> None:
    bad = _jsonl(tmp_path / "bad.jsonl", [{"prompt": "x", "weak_score": 0.5}, {"prompt": "y"}])
    with pytest.raises(DataFormatError, match=r"bad.jsonl:2: missing field 'weak_score'"):
        load_weak_labels(bad)
    judge = _jsonl(tmp_path / "judge.jsonl", [{"prompt": "x", "weak_score": 8}])
    with pytest.raises(DataFormatError, match=r"judge.jsonl:1: weak_score must be .* \[0, 1\]"):
        load_weak_labels(judge)
    unnamed = _jsonl(tmp_path / "unnamed.jsonl", [{"prompt": "math: x", "weak_score": 1}])
    with pytest.raises(ConfigError, match="give the profile a --name"):
        profile_from_files([unnamed], _PrefixCapability())
    assert profile_from_files([unnamed], _PrefixCapability(), name="mine").model == "mine"
