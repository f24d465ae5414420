"""capability-v3: capability-v2's head with a second, independent set of seed prompts.

The protocol is :mod:`studies.capability_v2`'s: every option reads the static MiniLM embedding
of the shipped capability model and is scored leave-one-source-out on the
``commercial_use: true`` rows of ``capabilities.jsonl`` (one source held out, the head fitted on
the others, the held-out source predicted); Auto-J (research-only licence) is only ever
predicted, by a fit on all commercial rows. :data:`router.capability.DESCRIPTIONS` and the seed
files an option names are in every fold's training and never scored. The seeds of
``studies/data/capability_seeds_2.jsonl`` were written, like the first set's, for Tiergate and
knowing the kinds of prompt the sources hold, but before any measurement with them.

Options: capability-v2 (the baseline: logistic, C=3, first seed set, authored weight 30) and
the same head with both seed sets at authored weights 10 and 30 and C 1 and 3. The option with
the best pooled leave-one-source-out macro-F1 is chosen; its gain over capability-v2 is given
with paired bootstrap intervals (rows resampled together for both models), on the commercial
rows and on Auto-J. With ``--train`` the chosen option is fitted on all commercial rows and its
seeds and written as ``models/capability-v3``, sharing capability-v1's embedding file::

    python -m studies.capability_v3 [--train]

Writes ``studies/results/capability_v3.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from router.capability import load_capability
from router.capability_training import (
    train_capability,
)
from router.scoring import CAPABILITIES
from router.training import load_capability_rows
from studies.capability_loso import Memo, licence_split
from studies.capability_v2 import paired_gain, score_option

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "capabilities.jsonl"
SEED_FILES = {
    "seeds": ROOT / "studies" / "data" / "capability_seeds.jsonl",
    "seeds_2": ROOT / "studies" / "data" / "capability_seeds_2.jsonl",
}
OUT = ROOT / "studies" / "results" / "capability_v3.json"
MODEL = ROOT / "models" / "capability-v3"
#: The directory whose embedding file the new artifact shares.
EMBEDDING_DIR = ROOT / "models" / "capability-v1"
BASELINE = "v2"

#: Estimator settings per option (:class:`CapabilityClassifier` parameters; ``seeds`` names
#: the seed files whose prompts are the estimator's seeds).
_BOTH = ("seeds", "seeds_2")
OPTIONS: dict[str, dict[str, Any]] = {
    BASELINE: {"head": "logistic", "C": 3.0, "seeds": ("seeds",), "authored_weight": 30.0},
    "v2_seeds2_C3_w10": {"head": "logistic", "C": 3.0, "seeds": _BOTH, "authored_weight": 10.0},
    "v2_seeds2_C3_w30": {"head": "logistic", "C": 3.0, "seeds": _BOTH, "authored_weight": 30.0},
    "v2_seeds2_C1_w10": {"head": "logistic", "C": 1.0, "seeds": _BOTH, "authored_weight": 10.0},
    "v2_seeds2_C1_w30": {"head": "logistic", "C": 1.0, "seeds": _BOTH, "authored_weight": 30.0},
}


def settings(option: dict[str, Any]) -> dict[str, Any]:
    """The estimator parameters of an option (its seed files' prompts as pairs)."""
    out = {k: v for k, v in option.items() if k != "seeds"}
    out["seeds"] = tuple(
        (r.prompt, r.capability)
        for name in option.get("seeds", ())
        for r in load_capability_rows(SEED_FILES[name])
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run every option, choose by leave-one-source-out macro-F1, optionally write the model."""
    parser = argparse.ArgumentParser(prog="python -m studies.capability_v3")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train", action="store_true", help="write models/capability-v3")
    args = parser.parse_args(argv)
    commercial, research = licence_split(args.data)
    # The static table (capability-v1's file), which every option here reads.
    embedding = load_capability(ROOT / "models" / "capability-v1").embedding
    memo = Memo(embedding)
    results: dict[str, Any] = {}
    predictions: dict[str, list[str]] = {}
    for name, option in OPTIONS.items():
        res, oof = score_option(name, settings(option), commercial, research, memo)
        predictions[name] = [oof[r.id] for r in [*commercial, *research]]
        res["settings"] = {**option, "seeds": list(option.get("seeds", ()))}
        results[name] = res
    chosen = max(results, key=lambda n: (results[n]["pooled"]["macro_f1"], n != BASELINE))
    gains: dict[str, Any] = {}
    if BASELINE in predictions:
        n = len(commercial)
        truth = [r.capability for r in [*commercial, *research]]
        for part, sl in (("loso", slice(0, n)), ("auto_j", slice(n, None))):
            gains[part] = paired_gain(truth[sl], predictions[chosen][sl], predictions[BASELINE][sl])
        print(f"chosen {chosen}: against {BASELINE} {json.dumps(gains)}")
    summary = {
        "data": args.data.name,
        "seeds": {
            k: {"file": p.name, "rows": len(load_capability_rows(p))} for k, p in SEED_FILES.items()
        },
        "protocol": (
            "train on commercial_use=true rows minus one source (plus descriptions and the "
            "option's seeds), score that source; Auto-J (research-only) scored by a model fitted "
            "on all commercial rows; choose by pooled macro-F1"
        ),
        "labels": list(CAPABILITIES),
        "chosen": chosen,
        "gain_over_v2": gains,
        "options": results,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")
    if args.train:
        shutil.rmtree(MODEL, ignore_errors=True)
        params = {k: v for k, v in OPTIONS[chosen].items() if k != "seeds"}
        seed_files = [SEED_FILES[s] for s in OPTIONS[chosen].get("seeds", ())]
        train_capability(
            args.data, embedding, MODEL, params=params, seeds=seed_files, share=EMBEDDING_DIR
        )
        print(f"wrote {MODEL.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
