"""Measure a local model's profile: run the probe set through the local backend and grade it.

``tiergate profile`` calls :func:`profile_local_model`. The backend is the one the proxy would
use (:mod:`router.backends.local`): the GGUF in process or an external llama.cpp server, with
the same chat template and system message. Answers are greedy (temperature 0, fixed seed), so
a profile is reproducible for a given model, probe seed and llama.cpp build. Per capability the
result is the share of probes answered right with its Wilson interval
(:func:`router.profile.wilson_interval`), written as a :class:`~router.profile.LocalProfile`.

A probe the backend fails to answer (unreachable server, timeout) stops the run with that
error: a profile never counts a failed call as a wrong answer, nor leaves it out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from router.backends import Backend
from router.config import Settings
from router.errors import BackendError, ConfigError, TiergateError
from router.probes import PROBE_SET_VERSION, Probe
from router.profile import CapabilityAccuracy, LocalProfile, wilson_interval
from router.scoring import CAPABILITIES


@dataclass(frozen=True, slots=True)
class ProfiledModel:
    """The ``ModelLike`` the backends are called with; ``name`` goes to an external server."""

    name: str
    tier: str = "local"
    litellm_model: str | None = None
    api_base: str | None = None
    api_key_env: str | None = None
    timeout_s: float | None = None
    transport: str = "auto"


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe, what the model answered, whether that is right, and how long it took."""

    probe: Probe
    answer: str
    correct: bool
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready line for ``--details``."""
        return {
            "id": self.probe.id,
            "capability": self.probe.capability,
            "correct": self.correct,
            "seconds": round(self.seconds, 3),
            "prompt": self.probe.prompt,
            "answer": self.answer,
        }


@asynccontextmanager
async def open_local_backend(settings: Settings) -> AsyncIterator[tuple[Backend, int]]:
    """The configured local backend, ready to answer, and how many probes may run at once."""
    if settings.local_backend == "llama_cpp":
        from router.backends.local import LlamaCppBackend

        llama = LlamaCppBackend(settings)
        await asyncio.to_thread(llama.load)
        try:
            yield llama, 1
        finally:
            await llama.aclose()
    elif settings.local_backend == "openai_http":
        from router.backends.local import ExternalLlamaBackend
        from router.backends.openai_http import OpenAIHTTP

        http = OpenAIHTTP(timeout_s=settings.local_timeout_s)
        try:
            yield ExternalLlamaBackend(settings, http), 4
        finally:
            await http.aclose()
    else:
        raise ConfigError("no local model to profile: TIERGATE_LOCAL_BACKEND is 'none'")


async def run_probes(
    backend: Backend,
    model: ProfiledModel,
    probes: Sequence[Probe],
    *,
    concurrency: int = 1,
    on_result: Callable[[ProbeResult], None] | None = None,
) -> list[ProbeResult]:
    """Ask ``backend`` every probe (greedy, at most ``concurrency`` at once) and grade each."""
    gate = asyncio.Semaphore(concurrency)

    async def one(probe: Probe) -> ProbeResult:
        body = {
            "messages": probe.messages(),
            "max_tokens": probe.max_tokens,
            "temperature": 0.0,
            "seed": 0,
        }
        if probe.stop:
            body["stop"] = list(probe.stop)
        async with gate:
            started = time.perf_counter()
            try:
                completion = await backend.complete(model, body)
            except TiergateError as exc:
                raise BackendError(f"probe {probe.id}: {exc.message}") from exc
            seconds = time.perf_counter() - started
        answer = str(completion.body["choices"][0]["message"].get("content") or "")
        correct = await asyncio.to_thread(probe.grade, answer)  # the coding grader runs code
        result = ProbeResult(probe, answer, correct, seconds)
        if on_result is not None:
            on_result(result)
        return result

    tasks = [asyncio.ensure_future(one(p)) for p in probes]
    try:
        return list(await asyncio.gather(*tasks))
    finally:  # after a failure, the other probes stop before the backend closes
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def build_profile(
    results: Sequence[ProbeResult], *, model: str, notes: str | None = None
) -> LocalProfile:
    """Per capability: the share of probes answered right, its Wilson interval and n."""
    entries = {}
    for capability in CAPABILITIES:
        graded = [r.correct for r in results if r.probe.capability == capability]
        if not graded:
            continue
        right, n = sum(graded), len(graded)
        low, high = wilson_interval(right, n)
        entries[capability] = CapabilityAccuracy(right / n, low, high, n)
    return LocalProfile(
        model=model,
        source="measured",
        capabilities=entries,
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        notes=notes,
    )


def describe_run(settings: Settings, per_capability: int, seed: int, seconds: float) -> str:
    """The profile's ``notes``: how it was measured, so two profiles can be compared."""
    if settings.local_backend == "llama_cpp":
        where = f"in-process llama.cpp, n_threads={settings.n_threads or 'default'}"
    else:
        where = "external llama.cpp server"
    return (
        f"tiergate profile: probe set v{PROBE_SET_VERSION}, seed {seed}, {per_capability} "
        f"probes per capability, greedy; {where}; took {seconds:.0f} s"
    )


async def profile_local_model(
    settings: Settings,
    *,
    model: str,
    per_capability: int,
    seed: int = 0,
    probes: Sequence[Probe],
    on_result: Callable[[ProbeResult], None] | None = None,
) -> tuple[LocalProfile, list[ProbeResult]]:
    """Run ``probes`` through the configured local backend and build the measured profile."""
    started = time.perf_counter()
    async with open_local_backend(settings) as (backend, concurrency):
        results = await run_probes(
            backend,
            ProfiledModel(model),
            probes,
            concurrency=concurrency,
            on_result=on_result,
        )
    notes = describe_run(settings, per_capability, seed, time.perf_counter() - started)
    return build_profile(results, model=model, notes=notes), results
