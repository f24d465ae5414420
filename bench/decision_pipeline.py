"""Decision latency: signals + scorer + policy for the prompts in the shared data, on one core.

What is timed per prompt is what ``Gateway.decide`` runs on the request path:
``router.signals.extract_signals`` (which calls the scorer: ``--model DIR``, else the one the
server would load, the shipped router when present, else the heuristic) and
``router.policy.evaluate`` with ``policies/default.yaml``. The process is pinned to one CPU and
BLAS/OpenMP to one thread. A warm-up over the first prompts comes first (caches, lazy imports).

A cheap scorer (the static table: microseconds) is timed on every prompt in each of three
passes, and each prompt's fastest time is taken (see ``run``). A costly one (``costly``: its
capability model runs the encoder, milliseconds) would take half an hour so: it is timed on
an evenly spaced sample of ``--sample`` prompts (every prompt's index ``i * N // n``, the same
prompts every run), one pass, and the result says ``sampled: n of N``; its figures are also
given by prompt length in WordPiece tokens (:data:`BANDS`), which is what its cost grows with.
``evaluate_p50`` / ``evaluate_p99`` are the policy step's own share, timed inside the same calls.

Run: ``python -m bench.decision_pipeline [--model DIR] [--data DIR] [--limit N] [--sample N]
[--json] [--out FILE]``.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Any, TypeVar  # noqa: E402

if TYPE_CHECKING:
    from router.scoring import Scorer

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
#: How many prompts a costly scorer is timed on (about 1,500 x a few ms: under a minute).
SAMPLE = 1500
#: Prompt-length bands, in WordPiece tokens of the clipped prompt: (label, most tokens). Past
#: 126 tokens (the encoder's 128-token head window less [CLS] and [SEP]) a second forward pass
#: reads the 64-token tail.
BANDS: tuple[tuple[str, float], ...] = (("<=32", 32), ("33-126", 126), (">126", float("inf")))
T = TypeVar("T")


def prompts(data: Path, limit: int | None) -> list[str]:
    """Every ``prompt`` in the data directory's JSON Lines files, in file order."""
    out: list[str] = []
    for path in sorted(data.glob("*.jsonl")):
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                if isinstance(row.get("prompt"), str):
                    out.append(row["prompt"])
    return out[:limit] if limit else out


def evenly_spaced(items: Sequence[T], n: int) -> list[T]:
    """``n`` of ``items`` at indices ``i * len(items) // n`` (all of them when there are no
    more than ``n``): the same sample every run, spread over every data file in proportion."""
    total = len(items)
    if n <= 0 or total <= n:
        return list(items)
    return [items[i * total // n] for i in range(n)]


def length_bands(
    ms: Sequence[float], tokens: Sequence[int], bands: Sequence[tuple[str, float]] = BANDS
) -> dict[str, dict[str, Any]]:
    """p50 / p99 of the timings ``ms`` per band of ``tokens`` (each prompt's token count, in the
    same order); a band no prompt falls in has ``prompts: 0`` and no figures."""
    out: dict[str, dict[str, Any]] = {}
    low = -1.0
    for label, high in bands:
        out[label] = _band([m for m, t in zip(ms, tokens, strict=True) if low < t <= high])
        low = high
    return out


def _pct(ordered: Sequence[float], pct: float) -> float:
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100.0))]


def _token_counter(scorer: Scorer) -> Callable[[str], int] | None:
    """How many WordPiece tokens of a prompt the scorer's encoder reads (None: no encoder)."""
    from router.capability import CapabilityModel, GatedCapability, SplitCapability
    from router.features import clip
    from router.serving import ProfileScorer

    if not isinstance(scorer, ProfileScorer):
        return None
    model = scorer.capability
    if isinstance(model, SplitCapability):
        model = model.score
    if isinstance(model, GatedCapability):
        model = model.then
    if not isinstance(model, CapabilityModel):
        return None
    tokenizer = model.embedding.tokenizer
    return lambda text: len(tokenizer.ids(clip(text)))


def _gate_split(scorer: Scorer) -> Callable[[str], bool] | None:
    """Whether a prompt is read by the encoder, for a scorer over a capability gate or a split
    of gates (None for any other scorer): a gate's first model is unsure of it."""
    from router.capability import GatedCapability, SplitCapability
    from router.serving import ProfileScorer

    gate = scorer.capability if isinstance(scorer, ProfileScorer) else None
    if not isinstance(gate, GatedCapability | SplitCapability) or not gate.costly:
        return None  # no gate, or a split of static heads: nothing runs the encoder
    return gate.reads_second


def gate_bands(ms: Sequence[float], encoded: Sequence[bool]) -> dict[str, dict[str, Any]]:
    """p50 / p99 of the timings ``ms`` of the prompts the gate decided from its first model
    (``table``) and of those it read through the encoder (``encoder``)."""
    out: dict[str, dict[str, Any]] = {}
    for label, want in (("table", False), ("encoder", True)):
        out[label] = _band([m for m, e in zip(ms, encoded, strict=True) if e is want])
    return out


def _band(ms: Sequence[float]) -> dict[str, Any]:
    # A band's prompt count, and its p50 / p99 when it has any.
    got = sorted(ms)
    out: dict[str, Any] = {"prompts": len(got)}
    if got:
        out |= {"p50": round(statistics.median(got), 4), "p99": round(_pct(got, 99), 4)}
    return out


def load(model: Path | None) -> Scorer:
    """The scorer at ``model`` (an error when it cannot be loaded), else the one the server
    loads (``router.app.configured_scorer``)."""
    from router.app import configured_scorer
    from router.artifact import load_scorer
    from router.config import Settings
    from router.profile import default_profile

    settings = Settings(local_backend="none")
    if model is None:
        return configured_scorer(settings)
    return load_scorer(model, default_profile(settings.local_profile))


def run(
    data: Path = DATA,
    limit: int | None = None,
    passes_n: int | None = None,
    *,
    model: Path | None = None,
    sample: int = SAMPLE,
) -> dict[str, Any]:
    """Time the full decision for each prompt (module docstring); ms figures. ``passes_n``:
    3 for a cheap scorer, 1 for a costly one unless given; ``sample``: 0 times every prompt.
    The caller pins the process to one CPU (:func:`main` does)."""
    from router.gateway import load_serving_policy
    from router.policy import evaluate
    from router.signals import extract_signals

    scorer = load(model)
    costly = bool(getattr(scorer, "costly", False))
    policy = load_serving_policy(ROOT / "policies" / "default.yaml")
    texts = prompts(data, limit)
    total = len(texts)
    if costly:
        texts = evenly_spaced(texts, sample)
    if passes_n is None:
        passes_n = 1 if costly else 3
    sampled = f"{len(texts)} of {total}" if len(texts) < total else None
    bodies = [{"model": "auto", "messages": [{"role": "user", "content": t}]} for t in texts]
    thresholds: dict[str, float] = {}
    for body in bodies[:200]:
        evaluate(policy, extract_signals(body, scorer), thresholds=thresholds, spend_today_usd=0.0)
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    clock = time.perf_counter
    passes: list[list[float]] = []
    policy_passes: list[list[float]] = []  # evaluate alone, its share of each decision
    routes: dict[str, int] = {}
    for _ in range(passes_n):
        times, policy_times = [], []
        routes = {}
        for body in bodies:
            start = clock()
            signals = extract_signals(body, scorer)
            scored = clock()
            decision = evaluate(policy, signals, thresholds=thresholds, spend_today_usd=0.0)
            end = clock()
            times.append(end - start)
            policy_times.append(end - scored)
            routes[decision.tier] = routes.get(decision.tier, 0) + 1
        passes.append(times)
        policy_passes.append(policy_times)
    # The cost of deciding one prompt is deterministic; on a shared machine a single timing
    # also holds whatever preemption hit it. The headline figures take each prompt's fastest of
    # the passes; the first pass's raw figures are kept beside them.
    per_prompt = [min(ts) * 1000.0 for ts in zip(*passes, strict=True)]
    ms = sorted(per_prompt)
    raw = sorted(t * 1000.0 for t in passes[0])
    policy_ms = sorted(min(ts) * 1000.0 for ts in zip(*policy_passes, strict=True))
    count = _token_counter(scorer) if costly else None
    bands = length_bands(per_prompt, [count(t) for t in texts]) if count is not None else None
    reads = _gate_split(scorer)
    gate = gate_bands(per_prompt, [reads(t) for t in texts]) if reads is not None else None
    return {
        "p50": round(statistics.median(ms), 4),
        "p90": round(_pct(ms, 90), 4),
        "p99": round(_pct(ms, 99), 4),
        "max": round(ms[-1], 4),
        "mean": round(statistics.fmean(ms), 4),
        "single_pass_p50": round(statistics.median(raw), 4),
        "single_pass_p99": round(_pct(raw, 99), 4),
        "single_pass_max": round(raw[-1], 4),
        "evaluate_p50": round(statistics.median(policy_ms), 4),
        "evaluate_p99": round(_pct(policy_ms, 99), 4),
        "passes": passes_n,
        "prompts": len(ms),
        "data_prompts": total,
        "sampled": sampled,
        "scorer": f"{scorer.name} {scorer.version}",
        "model": None if model is None else str(model),
        "costly": costly,
        "length_bands": bands,
        "gate": gate,
        "routes": routes,
        "mean_prompt_chars": round(statistics.fmean(len(t) for t in texts), 1),
        "loadavg_start": loadavg_start,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--model", type=Path, help="the router artifact to time (default: the server's)"
    )
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--limit", type=int, help="the first N prompts only")
    parser.add_argument(
        "--sample",
        type=int,
        default=SAMPLE,
        help=f"prompts a costly scorer is timed on, evenly spaced ({SAMPLE}; 0: all)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", type=Path, help="also write the result here (JSON)")
    args = parser.parse_args(argv)
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    result = run(args.data, args.limit, model=args.model, sample=args.sample)
    if result["sampled"]:
        print(
            f"sampled: {result['sampled']} prompts, evenly spaced, "
            f"{result['passes']} pass{'' if result['passes'] == 1 else 'es'} "
            f"({result['scorer']} runs the encoder)",
            file=sys.stderr,
        )
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
