"""capability-v4: capability-v3's head over the static table *and* the MiniLM encoder.

The static table (:mod:`router.embedding`) reads every token alone; the contextual encoder
(:mod:`router.encoder`, all-MiniLM-L6-v2 in numpy) reads them in context. Every option here
reads :class:`router.encoder.ContextualEmbedding`: the static prompt vector side by side with
the encoder's unit mean over the prompt's first ``head_tokens`` and last ``tail_tokens``
tokens. The protocol is :mod:`studies.capability_v3`'s: leave-one-source-out on the
``commercial_use: true`` rows of ``capabilities.jsonl`` (descriptions and both seed sets in
every fold's training, authored weight 30), Auto-J (research-only) only predicted by a fit on
all commercial rows; the option with the best pooled macro-F1 is chosen and its gain over
capability-v3 given with paired bootstrap intervals. The options (two windows, two
regularisation strengths) were fixed before this study ran; no row of a held-out source
chooses anything in its own fold. With ``--train`` the chosen option is fitted on all
commercial rows and written as ``models/capability-v4``, sharing capability-v1's table::

    python -m studies.capability_v4 [--train]

Needs the encoder's weights (``make model``). Writes ``studies/results/capability_v4.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from router.capability import load_capability
from router.capability_training import train_capability
from router.encoder import ContextualEmbedding, load_encoder
from router.scoring import CAPABILITIES
from router.training import load_capability_rows
from studies.capability_loso import Memo, licence_split
from studies.capability_v2 import paired_gain, score_option
from studies.capability_v3 import EMBEDDING_DIR, SEED_FILES
from studies.capability_v3 import OPTIONS as V3_OPTIONS

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "capabilities.jsonl"
OUT = ROOT / "studies" / "results" / "capability_v4.json"
MODEL = ROOT / "models" / "capability-v4"
BASELINE = "v3"
_SEEDS = ("seeds", "seeds_2")

#: Encoder window per option (``None``: the static table alone) and estimator settings.
OPTIONS: dict[str, dict[str, Any]] = {
    BASELINE: {"window": None, **V3_OPTIONS["v2_seeds2_C1_w30"]},
    **{
        f"encoder_{h}_{t}_C{c:g}": {
            "window": (h, t),
            "head": "logistic",
            "C": c,
            "seeds": _SEEDS,
            "authored_weight": 30.0,
        }
        for h, t in ((128, 64), (64, 32))
        for c in (1.0, 0.3)
    },
}


def embedding_for(window: tuple[int, int] | None) -> Any:
    """The shipped static table, alone or under the encoder with a (head, tail) window."""
    static = load_capability(EMBEDDING_DIR).embedding
    if window is None:
        return static
    return ContextualEmbedding(static, load_encoder(), head_tokens=window[0], tail_tokens=window[1])


def head_settings(option: dict[str, Any]) -> dict[str, Any]:
    """An option's estimator settings: all but its seed-set names and encoder window."""
    return {k: v for k, v in option.items() if k not in ("seeds", "window")}


def estimator_params(option: dict[str, Any], files: dict[str, Path] = SEED_FILES) -> dict[str, Any]:
    """The :class:`CapabilityClassifier` parameters of an option (seeds as pairs, the seed
    sets it names read from ``files``)."""
    out = head_settings(option)
    out["seeds"] = tuple(
        (r.prompt, r.capability)
        for name in option["seeds"]
        for r in load_capability_rows(files[name])
    )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Run every option, choose by leave-one-source-out macro-F1, optionally write the model."""
    parser = argparse.ArgumentParser(prog="python -m studies.capability_v4")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--train", action="store_true", help="write models/capability-v4")
    args = parser.parse_args(argv)
    commercial, research = licence_split(args.data)
    memos: dict[Any, Memo] = {}
    results: dict[str, Any] = {}
    predictions: dict[str, list[str]] = {}
    for name, option in OPTIONS.items():
        window = option["window"]
        if window not in memos:
            memos[window] = Memo(embedding_for(window))
        res, oof = score_option(name, estimator_params(option), commercial, research, memos[window])
        predictions[name] = [oof[r.id] for r in [*commercial, *research]]
        res["settings"] = {**option, "seeds": list(option["seeds"])}
        results[name] = res
    chosen = max(results, key=lambda n: (results[n]["pooled"]["macro_f1"], n != BASELINE))
    n = len(commercial)
    truth = [r.capability for r in [*commercial, *research]]
    gains = {
        part: paired_gain(truth[sl], predictions[chosen][sl], predictions[BASELINE][sl])
        for part, sl in (("loso", slice(0, n)), ("auto_j", slice(n, None)))
    }
    print(f"chosen {chosen}: against {BASELINE} {json.dumps(gains)}")
    summary = {
        "data": args.data.name,
        "protocol": (
            "train on commercial_use=true rows minus one source (plus descriptions and both seed "
            "sets), score that source; Auto-J (research-only) scored by a model fitted on all "
            "commercial rows; choose by pooled macro-F1"
        ),
        "labels": list(CAPABILITIES),
        "chosen": chosen,
        "gain_over_v3": gains,
        "options": results,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")
    if args.train:
        shutil.rmtree(MODEL, ignore_errors=True)
        option = OPTIONS[chosen]
        params = head_settings(option)
        train_capability(
            args.data,
            embedding_for(option["window"]),
            MODEL,
            params=params,
            seeds=[SEED_FILES[s] for s in option["seeds"]],
            share=EMBEDDING_DIR,
        )
        print(f"wrote {MODEL.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
