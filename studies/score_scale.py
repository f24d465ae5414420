"""Where a model's scores sit: the policy thresholds' closed share, and the score by class.

A policy threshold is a point on the model's score scale, and each model has its own scale. This
scores every prompt of the shared data with the shipped model, loaded as the proxy loads it (and
with ``--compare DIR``, another artifact), and gives the share of prompts at or above each
threshold the default policy uses, the score quantiles by predicted capability, and the scores
of a few example prompts (the README's among them).

    .venv/bin/python -m studies.score_scale [--compare DIR]   # studies/results/score_scale.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from router.artifact import default_model_path, load_scorer

ROOT = Path(__file__).resolve().parent.parent

THRESHOLDS = (0.2, 0.25, 0.3, 0.8, 0.9)
EXAMPLES = (
    "Hello",
    "hi, how are you?",
    "What is the capital of France?",
    "Write a Python function that reverses a string.",
    "Write a haiku about autumn.",
    "Prove that the square root of 2 is irrational.",
)


def describe(path: Path, prompts: list[str]) -> dict[str, Any]:
    """Threshold shares, per-capability score quantiles and example scores of one model."""
    scorer = load_scorer(path)
    analyses = [scorer.analyze(p) for p in prompts]
    scores = np.array([a.score for a in analyses])
    caps = np.array([a.capability for a in analyses])
    by_class = {}
    for cap in sorted(set(caps.tolist())):
        q = np.quantile(scores[caps == cap], [0.1, 0.5, 0.9])
        by_class[cap] = {"n": int((caps == cap).sum()), "q10": q[0], "median": q[1], "q90": q[2]}
    return {
        "model": scorer.version,
        "mean": float(scores.mean()),
        "share_at_or_above": {str(t): float((scores >= t).mean()) for t in THRESHOLDS},
        "by_capability": by_class,
        "examples": {p: scorer.analyze(p).score for p in EXAMPLES},
    }


def main() -> int:
    """Score the shared prompts with the shipped model (and --compare); write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--compare", type=Path, help="another artifact directory")
    parser.add_argument("--out", type=Path, default=ROOT / "studies/results/score_scale.json")
    args = parser.parse_args()
    prompts = [
        json.loads(line)["prompt"]
        for f in sorted(args.data_dir.glob("*.jsonl"))
        for line in f.read_text().split("\n")  # not splitlines(): prompts hold U+2028
        if line.strip()
    ]
    models = [default_model_path(), *([args.compare] if args.compare else [])]
    out = {"prompts": len(prompts), "models": [describe(m, prompts) for m in models]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(json.dumps(out, indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
