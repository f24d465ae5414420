"""Measuring a local model: every probe is asked greedily and graded, the profile holds the
share right per capability with its Wilson interval, and a failed call stops the run."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from router.errors import BackendError
from router.probes import probe_set
from router.profile import wilson_interval
from router.profiler import ProbeResult, ProfiledModel, build_profile, run_probes
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
