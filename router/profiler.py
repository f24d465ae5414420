"""Measure a local model's profile: run the probe set through the local backend and grade it,
or estimate it from labelled rows (an operator's evaluation logs).

``tiergate profile`` calls :func:`profile_local_model`. The backend is the one the proxy would
use (:mod:`router.backends.local`): the GGUF in process or an external llama.cpp server, with
the same chat template and system message. Answers are greedy (temperature 0, fixed seed), so
a profile is reproducible for a given model, probe seed and llama.cpp build. Per capability the
result is the share of probes answered right with its Wilson interval
(:func:`router.profile.wilson_interval`), written as a :class:`~router.profile.LocalProfile`.

A probe the backend fails to answer (unreachable server, timeout) stops the run with that
error: a profile never counts a failed call as a wrong answer, nor leaves it out.

``tiergate profile --from-labels`` calls :func:`profile_from_files`: rows that say how well the
local model answered real prompts are read through the router's own capability model and
averaged per capability, as the router's head was fitted against each weak model's labels
(:func:`router.training.crossfit_local_accuracy`), so the profile is on the router's scale.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from router.backends import Backend
from router.config import Settings
from router.errors import BackendError, ConfigError, TiergateError
from router.probes import PROBE_SET_VERSION, Probe
from router.profile import CapabilityAccuracy, LocalProfile, wilson_interval
from router.scoring import CAPABILITIES

if TYPE_CHECKING:
    from router.serving import CapabilityReader

#: Pseudo-rows at the weak model's mean score that each capability's estimate is shrunk by (at
#: most a tenth of the rows): a capability the rows barely touch reads near the model's mean.
LABEL_PRIOR = 20.0


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
    max_output_tokens: int | None = None
    context_window: int | None = None


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

        http = OpenAIHTTP(
            timeout_s=settings.local_timeout_s, max_event_bytes=settings.max_event_bytes
        )
        try:
            yield ExternalLlamaBackend(settings, http), settings.local_slots
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


def _today() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
        created=_today(),
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
        f"probe{'s' if per_capability != 1 else ''} per capability, greedy; {where}; "
        f"took {seconds:.0f} s"
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


def label_accuracy(
    weak: NDArray[np.float64],
    q: NDArray[np.float64],
    shrink: float,
    toward: ArrayLike | None = None,
) -> NDArray[np.float64]:
    """Per capability (``q``'s columns), the ``q``-weighted mean of the scores ``weak``, shrunk
    by ``shrink`` pseudo-rows towards ``toward`` (a prior accuracy per capability) or, by
    default, the scores' mean: the local accuracy the router reads."""
    centre = float(weak.mean()) if toward is None else np.asarray(toward, dtype=np.float64)
    out: NDArray[np.float64] = (q.T @ weak + shrink * centre) / (q.sum(axis=0) + shrink)
    return np.clip(out, 0.0, 1.0)


def profile_from_labels(
    weak: ArrayLike,
    q: ArrayLike,
    capabilities: Sequence[str],
    *,
    model: str,
    prior: float = LABEL_PRIOR,
    notes: str | None = None,
    created: str | None = None,
) -> LocalProfile:
    """A profile from labelled rows: per capability, the mean of the local model's scores
    ``weak`` weighted by the rows' capability probabilities ``q`` (rows x ``capabilities``),
    shrunk towards the overall mean by ``min(prior, rows / 10)`` pseudo-rows. ``n`` is the
    capability's probability mass (rows' worth), and the interval Wilson's at the estimate with
    that n: conservative, as the mass never exceeds the weighted mean's effective sample size
    and a [0, 1] score varies no more than a 0/1 one."""
    w = np.asarray(weak, dtype=np.float64)
    p = np.asarray(q, dtype=np.float64)
    if w.ndim != 1 or p.shape != (w.size, len(capabilities)) or w.size == 0:
        raise ValueError("profile_from_labels: one score and one probability row per row")
    mass = p.sum(axis=0)
    acc = label_accuracy(w, p, min(prior, w.size / 10))
    entries = {}
    for name, a, m in zip(capabilities, acc, mass, strict=True):
        low, high = wilson_interval(float(a * m), float(m))
        entries[str(name)] = CapabilityAccuracy(float(a), low, high, round(float(m)))
    return LocalProfile(
        model=model, source="estimated", capabilities=entries, created=created, notes=notes
    )


def _select(
    files: Sequence[Path], weak_model: str | None
) -> tuple[list[Any], list[tuple[Path, int]], str]:
    # The rows of one weak model across files (the only one, or the one asked for).
    from router.training import distinct_files, load_weak_labels

    distinct_files(files)
    rows, used = [], []
    seen: set[str] = set()
    for path in files:
        labels = load_weak_labels(path)
        seen.update(r.weak_model for r in labels)
        kept = [r for r in labels if weak_model is None or r.weak_model == weak_model]
        rows += kept
        used.append((path, len(kept)))
    if weak_model is not None and not rows:
        raise ConfigError(
            f"no rows of weak model {weak_model!r} (the files hold: "
            f"{', '.join(sorted(repr(m) for m in seen))})"
        )
    if weak_model is None and len(seen) > 1:
        raise ConfigError(
            "the files hold rows of several local models; choose one with --weak-model: "
            + ", ".join(sorted(repr(m) for m in seen))
        )
    return rows, used, weak_model if weak_model is not None else next(iter(seen))


def profile_from_files(
    files: Sequence[str | Path],
    capability: CapabilityReader,
    *,
    name: str | None = None,
    weak_model: str | None = None,
    prior: float = LABEL_PRIOR,
    on_rows: Callable[[int], Callable[[], object]] | None = None,
) -> LocalProfile:
    """Estimate a profile (:func:`profile_from_labels`) from JSONL files of labelled rows
    (``prompt``, ``weak_score``, optionally ``weak_model``; only ``weak_model``'s rows when
    given), read through ``capability``. ``name`` defaults to the rows' weak model; the notes
    name each file with its sha256 and the rows used, so the profile can be traced and rebuilt.
    ``on_rows``: given the number of rows, a callback to call as each one is read (progress)."""
    from router.artifact import sha256_file

    paths = [Path(f) for f in files]
    rows, used, model = _select(paths, weak_model)
    name = name or model
    if not name:
        raise ConfigError("the rows name no weak_model: give the profile a --name")
    tick = on_rows(len(rows)) if on_rows is not None else None
    q = np.empty((len(rows), len(capability.capabilities)))
    for i, r in enumerate(rows):
        q[i] = capability.probabilities(r.prompt)
        if tick is not None:
            tick()
    sources = "; ".join(f"{p.name} ({n} rows, sha256 {sha256_file(p)})" for p, n in used)
    notes = (
        f"tiergate profile --from-labels: {len(rows)} rows"
        + (f" of weak model {weak_model}" if weak_model else "")
        + f" from {sources}; capability model {capability.version}; "
        f"shrunk by min({prior:g}, rows/10) pseudo-rows"
    )
    return profile_from_labels(
        [r.weak_score for r in rows],
        q,
        capability.capabilities,
        model=name,
        prior=prior,
        notes=notes,
        created=_today(),
    )
