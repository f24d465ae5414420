"""Reproduce router-v3 and the numbers of its model card (router-v4's: ``studies.score_v4``).

1. Trains a model (``var/model-card-train``) exactly as ``tiergate train`` does on the
   licence-permitted files; its sidecar holds the grouped CV metrics.
2. Adds an in-distribution check (grouped 5-fold CV over the pooled training rows, per file).
3. Evaluates out of distribution, never training on them: AlpacaEval 2.0 and the
   ``commercial_use: false`` Auto-J capability rows.
4. Writes ``studies/results/model_card.json`` and prints the model card's markdown tables.

    .venv/bin/python -m studies.model_card --replace
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np

from router.artifact import load_fitted
from router.classifier import PromptClassifier
from router.metrics import evaluate, summary
from router.training import (
    RoutingRow,
    fit_routing,
    load_routing_rows,
    train_artifact,
)

ROOT = Path(__file__).resolve().parent.parent

TRAIN_FILES = (
    "routellm_mmlu_mixtral_vs_gpt4turbo.jsonl",
    "routellm_gsm8k_mixtral_vs_gpt4turbo.jsonl",
    "arenabench_v1_mixtral_vs_gpt4turbo.jsonl",
    "capabilities.jsonl",
)
OOD_ROUTING = "alpacaeval2_openhermes7b_vs_gpt4turbo.jsonl"


def in_distribution_cv(
    data_dir: Path, capability: PromptClassifier | None, n_splits: int = 5
) -> tuple[dict[str, Any], list[RoutingRow], np.ndarray[Any, Any]]:
    """K-fold over the pooled routing rows (MMLU grouped by subject, so no subject is in both
    train and test; the other files split at random); out-of-fold scores reported per file.
    ``capability``: the shipped capability model the routing model reads (fixed across folds;
    it never sees routing labels). Returns the per-file reports, the rows and their
    out-of-fold scores."""
    from sklearn.model_selection import GroupKFold

    rows = [r for f in TRAIN_FILES[:3] for r in load_routing_rows(data_dir / f)]
    groups = [
        r.category if r.category and "mmlu" in r.dataset else f"{r.dataset}/{i % 10}"
        for i, r in enumerate(rows)
    ]
    oof = np.zeros(len(rows))
    for tr, te in GroupKFold(n_splits).split(rows, groups=groups):
        model = fit_routing([rows[i] for i in tr], capability)
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
    return out, rows, oof


def pooled_mix(
    rows: list[RoutingRow],
    oof: np.ndarray[Any, Any],
    ood: list[RoutingRow],
    ood_scores: list[float],
) -> dict[str, Any]:
    """Cross-category ranking on mixed traffic: the out-of-fold scores of all three training
    files plus the shipped model's AlpacaEval scores, every file on its own [0, 1] scale, scored
    as one set. ``pooled`` keeps every row (85% MMLU); ``mix`` draws 1,000 MMLU rows (seed 0) so
    multiple-choice trivia, maths word problems, hard chat and open chat weigh alike. Also the
    share sent closed at a few thresholds (the policy's ``threshold``)."""
    rng = np.random.default_rng(0)
    mmlu = [i for i, r in enumerate(rows) if "mmlu" in r.dataset]
    keep = sorted(set(range(len(rows))) - set(mmlu)) + sorted(
        rng.choice(mmlu, 1000, replace=False).tolist()
    )
    out: dict[str, Any] = {}
    for name, idx in (("pooled", list(range(len(rows)))), ("mix", keep)):
        s = np.concatenate([oof[idx], ood_scores])
        weak = [rows[i].weak_score for i in idx] + [r.weak_score for r in ood]
        strong = [rows[i].strong_score for i in idx] + [r.strong_score for r in ood]
        out[name] = summary(evaluate(s, weak, strong, n_bootstrap=1000))
        out[name]["closed_share"] = {
            str(t): float(np.mean(s >= t)) for t in (0.2, 0.25, 0.3, 0.4, 0.5)
        }
    return out


def main() -> int:
    """Train, evaluate, write the JSON and print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    # router-v3's card: `tiergate train` now fits router-v4's gap score, so this writes aside
    # instead of over the shipped router-v3 (router-v4's figures: python -m studies.score_v4).
    parser.add_argument("--out", type=Path, default=ROOT / "var" / "model-card-train")
    parser.add_argument("--replace", action="store_true", help="replace an existing --out")
    parser.add_argument("--results", type=Path, default=ROOT / "studies/results/model_card.json")
    args = parser.parse_args()

    if args.out.exists() and args.replace:
        shutil.rmtree(args.out)
    print("training", args.out, file=sys.stderr)
    train_artifact([args.data_dir / f for f in TRAIN_FILES], args.out)
    meta = json.loads((args.out / "metadata.json").read_text())
    scorer = load_fitted(args.out)

    ood = load_routing_rows(args.data_dir / OOD_ROUTING)
    ood_scores = [scorer.score(r.prompt) for r in ood]
    report = evaluate(
        ood_scores,
        [r.weak_score for r in ood],
        [r.strong_score for r in ood],
        n_bootstrap=1000,
    )
    lines = (args.data_dir / "capabilities.jsonl").read_text(encoding="utf-8").splitlines()
    autoj = [json.loads(line) for line in lines if line.strip()]
    autoj = [r for r in autoj if r.get("commercial_use") is False]
    predicted = [scorer.analyze(r["prompt"]).capability for r in autoj]
    pairs = list(zip(predicted, autoj, strict=True))
    autoj_acc = float(np.mean([p == r["capability"] for p, r in pairs]))
    per_class: dict[str, float] = {}
    for cap in sorted({r["capability"] for r in autoj}):
        hits = [p == cap for p, r in zip(predicted, autoj, strict=True) if r["capability"] == cap]
        per_class[cap] = float(np.mean(hits))

    print("in-distribution CV", file=sys.stderr)
    in_dist, rows, oof = in_distribution_cv(args.data_dir, scorer.capability)
    results = {
        "model": args.out.name,
        "cv_metrics": meta["cv_metrics"],
        "in_distribution_cv": in_dist,
        "pooled_mixed": pooled_mix(rows, oof, ood, ood_scores),
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
    for name, m in results["pooled_mixed"].items():
        lines.append(f"| pooled_mixed/{name} " + _fmt(m))
    shares = {k: m["closed_share"] for k, m in results["pooled_mixed"].items()}
    lines += ["", f"Closed share by threshold on the pooled sets: {json.dumps(shares)}"]
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
