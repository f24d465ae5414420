"""Does router-v3's ranking hold when the local model is not the one it was trained against?

router-v3 learnt which prompts Mixtral-8x7B loses to GPT-4-1106; a deployment's local model is
usually another. AlpacaEval and Arena-Bench carry, for the same prompts and judge, the labels of
other open models (``alt_weak_scores``). This scores each of them with the same routing scores:
on AlpacaEval the shipped model (never trained on it), with the weighted and the
chain-of-thought judge; on Arena-Bench a model fitted with router-v3's recipe on MMLU + GSM8K
only, since the shipped one trained on Arena-Bench. Rows without a valid judge score are left
out; where the strong and weak means are too close for APGR to mean anything, the row is
flagged ``meaningful: false``.

    .venv/bin/python -m studies.weak_swap   # writes studies/results/weak_swap.json (not committed)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from router.artifact import load_fitted
from router.classifier import LearnedScorer
from router.metrics import evaluate, summary
from router.training import TFIDF_MODEL_NAME, fit_routing, load_routing_rows

ROOT = Path(__file__).resolve().parent.parent

ALPACA = "alpacaeval2_openhermes7b_vs_gpt4turbo.jsonl"
ARENA = "arenabench_v1_mixtral_vs_gpt4turbo.jsonl"
LODO_TRAIN = (
    "routellm_mmlu_mixtral_vs_gpt4turbo.jsonl",
    "routellm_gsm8k_mixtral_vs_gpt4turbo.jsonl",
)


#: Below this gap between the strong and the weak mean, APGR divides by almost nothing.
MIN_GAP = 0.05


def read(path: Path) -> list[dict[str, Any]]:
    """The raw rows (load_routing_rows keeps only the common schema)."""
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def score_set(
    raw: list[dict[str, Any]],
    scores: np.ndarray[Any, Any],
    field: str,
    pairwise: bool,
    n_bootstrap: int,
    *,
    own: bool,
) -> dict[str, Any]:
    """APGR of ``scores`` against every weak model in ``field``, and the file's own weak model
    when ``own`` (its ``weak_score`` comes from the file's judge, so only with that judge's set)."""
    weak_models: dict[str, tuple[list[int], list[float]]] = {}
    if own:
        weak_models[f"{raw[0]['weak_model']} (the file's)"] = (
            list(range(len(raw))),
            [float(r["weak_score"]) for r in raw],
        )
    for i, row in enumerate(raw):
        for name, value in (row.get(field) or {}).items():
            if value is not None:
                idx, vals = weak_models.setdefault(name, ([], []))
                idx.append(i)
                vals.append(float(value))
    out: dict[str, Any] = {}
    for name, (idx, vals) in weak_models.items():
        weak = np.array(vals)
        strong = 1.0 - weak if pairwise else np.array([float(raw[i]["strong_score"]) for i in idx])
        report = summary(evaluate(scores[idx], weak, strong, n_bootstrap=n_bootstrap))
        out[name] = {
            **report,
            "weak_mean": round(float(weak.mean()), 4),
            "strong_mean": round(float(strong.mean()), 4),
            "meaningful": bool(strong.mean() - weak.mean() >= MIN_GAP),
        }
    return out


def main() -> int:
    """Score both files against every weak model; print a table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "studies" / "results" / "weak_swap.json")
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    shipped = load_fitted(ROOT / "models" / TFIDF_MODEL_NAME)

    alpaca = read(args.data_dir / ALPACA)
    alpaca_scores = np.array([shipped.score(r["prompt"]) for r in alpaca])
    arena = read(args.data_dir / ARENA)
    train = [r for name in LODO_TRAIN for r in load_routing_rows(args.data_dir / name)]
    lodo = LearnedScorer(fit_routing(train, shipped.capability), shipped.capability, "lodo")
    arena_scores = np.array([lodo.score(r["prompt"]) for r in arena])

    sets = {
        "alpacaeval (shipped model), weighted judge": score_set(
            alpaca, alpaca_scores, "alt_weak_scores", True, args.bootstrap, own=True
        ),
        "alpacaeval (shipped model), chain-of-thought judge": score_set(
            alpaca, alpaca_scores, "alt_weak_scores_cot_judge", True, args.bootstrap, own=False
        ),
        "arena-bench (router-v3 recipe on MMLU + GSM8K only)": score_set(
            arena, arena_scores, "alt_weak_scores", False, args.bootstrap, own=True
        ),
    }
    result = {"model": TFIDF_MODEL_NAME, "sets": sets}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for title, table in sets.items():
        print(f"\n{title}")
        print(f"  {'weak model':44} {'n':>4} {'weak':>6} {'strong':>6}  APGR (95% CI)")
        for name, m in table.items():
            apgr = m["apgr"]
            flag = "" if m["meaningful"] else "  (gap under 0.05: APGR meaningless)"
            print(
                f"  {name:44} {m['n']:>4} {m['weak_mean']:6.3f} {m['strong_mean']:6.3f}  "
                f"{apgr['value']:.3f} ({apgr['low']:.3f}-{apgr['high']:.3f}){flag}"
            )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
