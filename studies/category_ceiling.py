"""How far a router that knows only a prompt's group could go on each labelled file.

Issue #16 asks for leave-one-source-out APGR of at least 0.65 on every labelled file. The shipped
score ranks prompts by capability (through the profile) and barely within one. This study bounds
what any such router reaches: per file, the APGR of a score that is each row's group's mean gap
(strong_score - weak_score), with the group being

- ``capability``: the shipped router's served capability (the nine labels the profile reads);
- ``category``: the file's own ``category`` field (57 MMLU subjects, 9 MMLU-Pro subjects, one
  for GSM8K and Arena-Bench, five AlpacaEval sources).

Each is given two ways: **in sample** (the group means from the file's own rows, every row
included: an upper bound that a group-level router cannot beat even knowing the file's labels)
and **split half** (the group means from a random half of the rows, scored on the other half,
both ways over 10 splits, with the lowest and highest half: what a perfect group learner fitted
on half the file's own labels would reach). Ties are broken at random (20 draws in sample).
``item`` is the per-row oracle (score = the row's own gap) and ``random`` a random
ranking, both for scale. The groups' means are read from labels, so nothing here is a router
Tiergate could ship; it says which part of the 0.65 goal a group-level signal can carry::

    python -m studies.category_ceiling [--model DIR] [--out PATH]

Writes ``studies/results/category_ceiling.json``. The served labels are kept under
``studies/.cache``; without them the shipped router reads the 21,000 prompts (528 s on one core).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from router.artifact import default_model_path, load_scorer
from router.metrics import apgr_from_curve, routing_curve
from router.training import RoutingRow, load_routing_rows

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "studies" / "results" / "category_ceiling.json"
CACHE = ROOT / "studies" / ".cache"
FILES = (
    "routellm_mmlu_mixtral_vs_gpt4turbo.jsonl",
    "routellm_gsm8k_mixtral_vs_gpt4turbo.jsonl",
    "arenabench_v1_mixtral_vs_gpt4turbo.jsonl",
    "mmlupro_llama31_8b_vs_gpt4o.jsonl",
    "mmlupro_mistral7b_vs_gpt4o.jsonl",
    "alpacaeval2_openhermes7b_vs_gpt4turbo.jsonl",
)
GOAL = 0.65
TIE_DRAWS = 20
SPLITS = 10


def apgr(score: np.ndarray, weak: np.ndarray, strong: np.ndarray) -> float:
    """APGR on the card's 11-point curve (:mod:`router.metrics`)."""
    curve = routing_curve(score, weak, strong)
    return apgr_from_curve(curve, float(weak.mean()), float(strong.mean()))


def group_means(groups: np.ndarray, gap: np.ndarray, fit: np.ndarray) -> np.ndarray:
    """Each row's group mean of ``gap`` over the rows in ``fit`` (the overall mean of ``fit``
    for a group it lacks)."""
    out = np.full(len(groups), float(gap[fit].mean()))
    for g in np.unique(groups):
        sel = groups == g
        have = sel & fit
        if have.any():
            out[sel] = gap[have].mean()
    return out


def split_half(groups: np.ndarray, weak: np.ndarray, strong: np.ndarray, seed: int) -> list[float]:
    """APGR of each half of a random split, scored by the other half's group means, over
    :data:`SPLITS` splits (one figure per half). Every row a half holds is scored by the same
    means, so no fold's offset enters the ranking, as it would with k-fold means."""
    rng = np.random.default_rng(seed)
    gap = strong - weak
    out = []
    for k in range(SPLITS):
        first = rng.permutation(len(gap)) < len(gap) // 2
        for j, held in enumerate((first, ~first)):
            score = group_means(groups, gap, ~held)[held]
            out.extend(untied(score, weak[held], strong[held], seed * 100 + 2 * k + j, draws=1))
    return out


def untied(
    score: np.ndarray, weak: np.ndarray, strong: np.ndarray, seed: int, draws: int = TIE_DRAWS
) -> list[float]:
    """APGR of ``score`` with its ties broken at random, one figure per draw."""
    rng = np.random.default_rng(seed)
    span = float(np.ptp(score)) or 1.0
    return [apgr(score + rng.random(len(score)) * span * 1e-9, weak, strong) for _ in range(draws)]


def ceiling(rows: Sequence[RoutingRow], capability: Sequence[str], seed: int) -> dict[str, Any]:
    """The figures of one file; see the module docstring."""
    weak = np.array([r.weak_score for r in rows])
    strong = np.array([r.strong_score for r in rows])
    gap = strong - weak
    rng = np.random.default_rng(seed)
    randoms = [apgr(rng.random(len(gap)), weak, strong) for _ in range(200)]
    out: dict[str, Any] = {
        "n": len(rows),
        "weak_mean": round(float(weak.mean()), 3),
        "strong_mean": round(float(strong.mean()), 3),
        "item": round(apgr(gap, weak, strong), 3),
        "random": round(float(np.mean(randoms)), 3),
    }
    kinds = {
        "capability": np.array(capability),
        "category": np.array([r.category or "" for r in rows]),
    }
    for name, groups in kinds.items():
        counts = {str(g): int((groups == g).sum()) for g in np.unique(groups)}
        inside = group_means(groups, gap, np.ones(len(gap), dtype=bool))
        halves = split_half(groups, weak, strong, seed)
        out[name] = {
            "groups": len(counts),
            "largest_group_share": round(max(counts.values()) / len(gap), 3),
            "in_sample": round(float(np.mean(untied(inside, weak, strong, seed))), 3),
            "split_half": round(float(np.mean(halves)), 3),
            "split_half_range": [round(float(min(halves)), 3), round(float(max(halves)), 3)],
        }
    return out


def served_labels(scorer: Any, model: Path, name: str, rows: Sequence[RoutingRow]) -> list[str]:
    """The served capability of each row, kept under ``studies/.cache`` per model and file
    (keyed by the file's bytes) so a rerun does not run the encoder again."""
    key = hashlib.sha256((DATA / name).read_bytes()).hexdigest()[:16]
    cache = CACHE / f"served-labels-{model.name}-{key}.json"
    if cache.is_file():
        labels: list[str] = json.loads(cache.read_text())
        if len(labels) == len(rows):
            return labels
    labels = [str(scorer.analyze(r.prompt).capability) for r in rows]
    CACHE.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(labels))
    return labels


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m studies.category_ceiling")
    parser.add_argument("--model", type=Path, default=None, help="router (default: the shipped)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    model = args.model or default_model_path()
    scorer = load_scorer(model)
    t0 = time.perf_counter()
    report: dict[str, Any] = {"model": model.name, "goal": GOAL, "files": {}}
    for i, name in enumerate(FILES):
        rows = load_routing_rows(DATA / name)
        labels = served_labels(scorer, model, name, rows)
        report["files"][Path(name).stem] = found = ceiling(rows, labels, seed=i)
        print(
            f"{Path(name).stem:45s} n={found['n']:5d} item {found['item']:.3f} "
            f"random {found['random']:.3f} | capability in {found['capability']['in_sample']:.3f} "
            f"half {found['capability']['split_half']:.3f} | category "
            f"({found['category']['groups']}) in {found['category']['in_sample']:.3f} "
            f"half {found['category']['split_half']:.3f}",
            flush=True,
        )
    report["seconds"] = round(time.perf_counter() - t0)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.out} ({report['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
