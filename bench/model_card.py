"""Reproduce the shipped model and every number in docs/model-card.md with one command.

    .venv/bin/python bench/model_card.py --replace

1. Trains ``models/router-v1`` exactly as ``tiergate train`` does (same ``train_artifact``) on
   the licence-permitted files: RouteLLM MMLU, RouteLLM GSM8K, Arena-Bench v1, and the
   ``commercial_use: true`` rows of capabilities.jsonl. Its sidecar holds the grouped CV metrics
   (leave-one-dataset-out; MMLU grouped by subject; capability leave-one-source-out).
2. Adds an in-distribution check (5-fold CV over the pooled training rows, scored per file).
3. Evaluates the shipped model out of distribution, never training on them: AlpacaEval 2.0
   (OOD chat prompts, CC BY-NC labels) and the ``commercial_use: false`` Auto-J capability rows.
4. Writes ``bench/results/model_card.json`` and prints the markdown tables of the model card.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from router.metrics import evaluate, summary  # noqa: E402
from router.training import (  # noqa: E402
    _read_jsonl,
    fit_routing,
    load_routing_rows,
    load_scorer,
    train_artifact,
)

TRAIN_FILES = (
    "routellm_mmlu_mixtral_vs_gpt4turbo.jsonl",
    "routellm_gsm8k_mixtral_vs_gpt4turbo.jsonl",
    "arenabench_v1_mixtral_vs_gpt4turbo.jsonl",
    "capabilities.jsonl",
)
OOD_ROUTING = "alpacaeval2_openhermes7b_vs_gpt4turbo.jsonl"


def in_distribution_cv(data_dir: Path, n_splits: int = 5) -> dict[str, Any]:
    """Random K-fold over the pooled routing rows; out-of-fold scores reported per file."""
    from sklearn.model_selection import KFold

    rows = [r for f in TRAIN_FILES[:3] for r in load_routing_rows(data_dir / f)]
    oof = np.zeros(len(rows))
    for tr, te in KFold(n_splits, shuffle=True, random_state=0).split(rows):
        model = fit_routing([rows[i] for i in tr])
        oof[te] = model.predict_proba([rows[i].prompt for i in te])[:, 1]
    out = {}
    for d in sorted({r.dataset for r in rows}):
        idx = [i for i, r in enumerate(rows) if r.dataset == d]
        report = evaluate(
            oof[idx],
            [rows[i].weak_score for i in idx],
            [rows[i].strong_score for i in idx],
            n_bootstrap=1000,
        )
        out[d] = summary(report)
    return out


def main() -> int:
    """Train, evaluate, write the JSON and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=ROOT / "models" / "router-v1")
    parser.add_argument("--replace", action="store_true", help="replace an existing --out")
    parser.add_argument("--results", type=Path, default=ROOT / "bench/results/model_card.json")
    args = parser.parse_args()

    if args.out.exists() and args.replace:
        shutil.rmtree(args.out)
    print("training", args.out, file=sys.stderr)
    train_artifact([args.data_dir / f for f in TRAIN_FILES], args.out)
    meta = json.loads((args.out / "metadata.json").read_text())
    scorer = load_scorer(args.out)

    ood = load_routing_rows(args.data_dir / OOD_ROUTING)
    report = evaluate(
        [scorer.score(r.prompt) for r in ood],
        [r.weak_score for r in ood],
        [r.strong_score for r in ood],
        n_bootstrap=1000,
    )
    autoj = [row for _, row in _read_jsonl(args.data_dir / "capabilities.jsonl")]
    autoj = [r for r in autoj if r.get("commercial_use") is False]
    predicted = [scorer.analyze(r["prompt"]).capability for r in autoj]
    pairs = list(zip(predicted, autoj, strict=True))
    autoj_acc = float(np.mean([p == r["capability"] for p, r in pairs]))
    per_class: dict[str, float] = {}
    for cap in sorted({r["capability"] for r in autoj}):
        hits = [p == cap for p, r in zip(predicted, autoj, strict=True) if r["capability"] == cap]
        per_class[cap] = float(np.mean(hits))

    print("in-distribution CV", file=sys.stderr)
    results = {
        "model": args.out.name,
        "cv_metrics": meta["cv_metrics"],
        "in_distribution_cv": in_distribution_cv(args.data_dir),
        "ood": {
            f"alpacaeval/{OOD_ROUTING}": summary(report),
            "capability/auto-j (commercial_use=false, eval only)": {
                "n": len(autoj),
                "accuracy": autoj_acc,
                "recall": per_class,
            },
        },
        "data_files": meta["data_files"],
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=2) + "\n")
    print(render(results))
    return 0


def _fmt(m: dict[str, Any]) -> str:
    def ci(key: str, pct: bool) -> str:
        v = m[key]
        f = "{:.0%}" if pct else "{:.3f}"
        return f"{f.format(v['value'])} ({f.format(v['low'])}-{f.format(v['high'])})"

    return (
        f"| {m['n']} | {ci('apgr', False)} | {ci('apgr_fine', False)} | {ci('cpt50', True)} "
        f"| {ci('cpt80', True)} | {m['random']['apgr']:.3f} | {m['oracle']['apgr']:.3f} |"
    )


def render(results: dict[str, Any]) -> str:
    """The model card's tables as markdown."""
    head = (
        "| held-out set | n | APGR (95% CI) | fine APGR | CPT(50%) | CPT(80%) | random | oracle |\n"
        "| --- | ---: | --- | --- | --- | --- | ---: | ---: |"
    )
    lines = [head]
    for name, m in results["cv_metrics"]["routing"].items():
        lines.append(f"| {name} " + _fmt(m))
    for name, m in results["in_distribution_cv"].items():
        lines.append(f"| in_distribution_5fold/{name} " + _fmt(m))
    for name, m in results["ood"].items():
        if "apgr" in m:
            lines.append(f"| ood/{name} " + _fmt(m))
    cap = results["cv_metrics"].get("capability", {})
    ext = results["ood"]["capability/auto-j (commercial_use=false, eval only)"]
    lines += [
        "",
        f"Capability, leave-one-source-out ({cap.get('n')} rows): accuracy "
        f"{cap.get('accuracy', float('nan')):.3f}, "
        f"macro-F1 {cap.get('macro_f1', float('nan')):.3f}",
        f"recall: {json.dumps({k: round(v, 2) for k, v in cap.get('recall', {}).items()})}",
        f"Capability on Auto-J (never trained on, {ext['n']} rows): accuracy {ext['accuracy']:.3f}",
        f"recall: {json.dumps({k: round(v, 2) for k, v in ext['recall'].items()})}",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
