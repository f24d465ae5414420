"""capability-v2: a logistic head over capability-v1's embedding, with seed prompts we wrote.

Every option reads the same static MiniLM embedding (``models/capability-v1``) and is scored
leave-one-source-out on the ``commercial_use: true`` rows of ``capabilities.jsonl``: one
source held out, the head fitted on the others, the held-out source predicted. Auto-J
(research-only licence) is only ever predicted, by a model fitted on all commercial rows.
The seed prompts (``studies/data/capability_seeds.jsonl``: written for Tiergate, varied in
capability and style, not taken from any data source) and
:data:`router.capability.DESCRIPTIONS` are in every fold's training and never scored.

Options: capability-v1 (prototype head; the baseline), a logistic head on rows and
descriptions, and the logistic head with the seeds at several weights and regularisations.
The option with the best pooled leave-one-source-out macro-F1 is chosen; its gain over v1 is
given with a paired bootstrap interval (rows resampled together for both models). With
``--train`` the chosen option is fitted on all commercial rows and the seeds and written as
``models/capability-v2`` (:func:`router.capability_training.train_capability`)::

    python -m studies.capability_v2 [--train]

Writes ``studies/results/capability_v2.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from router.capability import load_capability
from router.capability_training import (
    CapabilityClassifier,
    leave_one_source_out,
    train_capability,
)
from router.scoring import CAPABILITIES
from router.training import CapabilityRow, load_capability_rows
from studies.capability_loso import Memo, licence_split

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "capabilities.jsonl"
SEEDS = ROOT / "studies" / "data" / "capability_seeds.jsonl"
OUT = ROOT / "studies" / "results" / "capability_v2.json"
MODEL = ROOT / "models" / "capability-v2"
BASELINE = "v1_prototypes"
BOOT = 1000

#: Estimator settings per option (:class:`CapabilityClassifier` parameters; ``seeds`` means
#: the seed file's prompts are passed as the estimator's seeds).
OPTIONS: dict[str, dict[str, Any]] = {
    BASELINE: {"head": "prototype"},
    "logistic_C3": {"head": "logistic", "C": 3.0},
    "logistic_seeds_C3_w1": {"head": "logistic", "C": 3.0, "seeds": True},
    "logistic_seeds_C3_w10": {"head": "logistic", "C": 3.0, "seeds": True, "authored_weight": 10.0},
    "logistic_seeds_C3_w30": {"head": "logistic", "C": 3.0, "seeds": True, "authored_weight": 30.0},
    "logistic_seeds_C1_w10": {"head": "logistic", "C": 1.0, "seeds": True, "authored_weight": 10.0},
}


def settings(option: dict[str, Any], seeds: Sequence[CapabilityRow]) -> dict[str, Any]:
    """The estimator parameters of an option (its seeds as (prompt, capability) pairs)."""
    out = {k: v for k, v in option.items() if k != "seeds"}
    if option.get("seeds"):
        out["seeds"] = tuple((r.prompt, r.capability) for r in seeds)
    return out


def paired_gain(
    truth: Sequence[str], a: Sequence[str], b: Sequence[str], seed: int = 0
) -> dict[str, Any]:
    """Accuracy and macro-F1 of predictions ``a`` minus ``b``, with 95% paired bootstrap
    intervals (the same resampled rows for both)."""
    from sklearn.metrics import f1_score

    t, pa, pb = np.array(truth), np.array(a), np.array(b)
    labels = [c for c in CAPABILITIES if c in set(truth)]

    def both(idx: np.ndarray) -> tuple[float, float]:
        acc = float((pa[idx] == t[idx]).mean() - (pb[idx] == t[idx]).mean())
        f1a = f1_score(t[idx], pa[idx], labels=labels, average="macro", zero_division=0)
        f1b = f1_score(t[idx], pb[idx], labels=labels, average="macro", zero_division=0)
        return acc, float(f1a - f1b)

    rng = np.random.default_rng(seed)
    diffs = np.array([both(rng.integers(0, len(t), len(t))) for _ in range(BOOT)])
    point = both(np.arange(len(t)))
    lo, hi = np.percentile(diffs, [2.5, 97.5], axis=0)
    return {
        "accuracy_diff": point[0],
        "accuracy_diff_ci": [float(lo[0]), float(hi[0])],
        "macro_f1_diff": point[1],
        "macro_f1_diff_ci": [float(lo[1]), float(hi[1])],
    }


class _Filing:
    """A fitted capability classifier whose predictions also file each prompt's probabilities
    (its label is the most probable capability, as :meth:`CapabilityClassifier.predict`)."""

    def __init__(self, model: CapabilityClassifier, into: dict[str, np.ndarray]) -> None:
        self.model, self.into = model, into

    def predict(self, texts: Sequence[str]) -> np.ndarray:
        p = self.model.predict_proba(texts)
        self.into.update(zip(texts, p, strict=True))
        out: np.ndarray = self.model.classes_[p.argmax(axis=1)]
        return out


def score_option(
    name: str,
    params: dict[str, Any],
    commercial: Sequence[CapabilityRow],
    research: Sequence[CapabilityRow],
    memo: Memo,
    *,
    probabilities: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Leave-one-source-out figures of one option (estimator ``params``) on the commercial
    rows, Auto-J (``research``) predicted by a fit on all of them; printed on one line.
    Returns the figures (with the seconds taken) and every row's prediction by id; with
    ``probabilities``, also fills it with every row's out-of-fold probabilities (CAPABILITIES
    order) by prompt, for studies that need more than the label (prompts must be unique)."""
    start = time.perf_counter()

    def fit(texts: list[str], labels: list[str]) -> Any:
        model = CapabilityClassifier(memo, **params).fit(texts, labels)
        return model if probabilities is None else _Filing(model, probabilities)

    res = leave_one_source_out(commercial, fit, test_only=research, keep_predictions=True)
    oof: dict[str, str] = res.pop("predictions")
    res["seconds"] = round(time.perf_counter() - start, 1)
    p, a = res["pooled"], res["test_only"]
    print(
        f"{name:24s} LOSO acc {p['accuracy']:.3f} F1 {p['macro_f1']:.3f}"
        f" | Auto-J acc {a['accuracy']:.3f} F1 {a['macro_f1']:.3f} ({res['seconds']:.0f} s)",
        flush=True,
    )
    return res, oof


def main(argv: Sequence[str] | None = None) -> int:
    """Run every option, choose by leave-one-source-out macro-F1, optionally write the model."""
    parser = argparse.ArgumentParser(prog="python -m studies.capability_v2")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train", action="store_true", help="write models/capability-v2")
    args = parser.parse_args(argv)
    commercial, research = licence_split(args.data)
    seeds = load_capability_rows(SEEDS)
    # The static table (capability-v1's file), which every option here reads.
    embedding = load_capability(ROOT / "models" / "capability-v1").embedding
    memo = Memo(embedding)
    results: dict[str, Any] = {}
    predictions: dict[str, list[str]] = {}
    for name, option in OPTIONS.items():
        res, oof = score_option(name, settings(option, seeds), commercial, research, memo)
        predictions[name] = [oof[r.id] for r in commercial]
        res["settings"] = option
        results[name] = res
    chosen = max(results, key=lambda n: (results[n]["pooled"]["macro_f1"], n != BASELINE))
    truth = [r.capability for r in commercial]
    gain = paired_gain(truth, predictions[chosen], predictions[BASELINE])
    print(f"chosen {chosen}: against {BASELINE} {json.dumps(gain)}")
    summary = {
        "data": args.data.name,
        "seeds": {"file": SEEDS.name, "rows": len(seeds)},
        "protocol": (
            "train on commercial_use=true rows minus one source (plus descriptions and seeds), "
            "score that source; Auto-J (research-only) scored by a model fitted on all "
            "commercial rows; choose by pooled macro-F1"
        ),
        "labels": list(CAPABILITIES),
        "chosen": chosen,
        "gain_over_v1": gain,
        "bootstrap": BOOT,
        "options": results,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")
    if args.train:
        shutil.rmtree(MODEL, ignore_errors=True)
        params = {k: v for k, v in OPTIONS[chosen].items() if k != "seeds"}
        seed_file = SEEDS if OPTIONS[chosen].get("seeds") else None
        train_capability(args.data, embedding, MODEL, params=params, seeds=seed_file)
        print(f"wrote {MODEL.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
