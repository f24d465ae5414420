"""capability-v6/v7/v8: the shipped gate's recipe with a third seed set, written for the boundaries.

capability-v5, the shipped gate, confuses capabilities at a few boundaries: writing that is given
material to restyle reads as summarization, long explanatory questions in the humanities as
summarization, persona prompts for tools as coding. A third seed set, 360 prompts written for
Tiergate (40 per capability, checked by :mod:`studies.seed_overlap`), adds authored examples on
both sides of those boundaries. It is kept in two files: ``capability_seeds_3.jsonl`` (240:
coding, extraction, summarization, creative writing, role-play, chat) and
``capability_seeds_3k.jsonl`` (120: knowledge questions, reasoning, maths). This study asks
whether they help on sources the model never saw and on chat prompts written apart from them.

Protocol, fixed before any result was seen. Each head is :mod:`studies.capability_v4`'s
estimator unchanged: the static head (capability-v3's settings) or the encoder head
(capability-v4's, 128 + 64 tokens, C=0.3), with seed sets 1 and 2 (as shipped) or with more.
Leave-one-source-out on the ``commercial_use: true`` rows of ``capabilities.jsonl``
(descriptions and the seeds in every fold's training), Auto-J (research-only) predicted by a fit
on all commercial rows, out-of-fold probabilities kept; the gate at the shipped threshold (0.9,
not re-chosen) composed row by row, each fold's static head gating its own encoder head. Then
each head fitted on all commercial rows reads the authored chat-category sets:
``chat_categories_dev.jsonl`` (160 prompts, looked at while the seeds were planned) and
``chat_categories_test.jsonl`` (160 prompts written by an author who read neither the seeds nor
the dev set, checked for shared 8-word runs against both, and never used to choose anything).

Decision rule (fixed before running): a candidate gate is adopted when (a) its LOSO accuracy and
macro-F1 are not below the shipped recipe's (``gate_12``, capability-v5's) and the paired 95%
interval of the macro-F1 difference has its lower bound at -0.01 or above, and (b) its strict
agreement on the test set is not below capability-v5's. The router over it must then pass
:mod:`studies.router_v9` (no routing file's APGR interval against router-v8 wholly below zero).

Candidates, in the order they were proposed: ``gate_123``, all 360 seeds, passed (a) and (b) but
its router lost on MMLU and on MMLU-Pro (Llama-3.1-8B) in :mod:`studies.router_v9`
(``results/router_v9_gate_123.json``): the seeds for knowledge questions, reasoning and maths
moved the probabilities that carry MMLU's routing signal. ``gate_123b``, the one follow-up,
withholds those 120 seeds and keeps the 240 boundary seeds; it is judged by the same rules.
``--train CANDIDATE`` writes that candidate's heads as ``models/capability-v6`` (static) and
``models/capability-v7`` (encoder) and the gate between them as ``models/capability-v8``::

    python -m studies.capability_v6 [--train gate_123b]

Needs the encoder's weights (``make model``). Writes ``studies/results/capability_v6.json``.
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
from numpy.typing import NDArray

from router.capability import save_gate
from router.capability_training import CapabilityClassifier, train_capability
from router.scoring import CAPABILITIES
from router.training import load_capability_rows
from studies.capability_gate import _figures, gate
from studies.capability_loso import Memo, licence_split
from studies.capability_v2 import paired_gain, score_option
from studies.capability_v3 import EMBEDDING_DIR, SEED_FILES
from studies.capability_v4 import OPTIONS as V4_OPTIONS
from studies.capability_v4 import embedding_for, estimator_params, head_settings
from studies.chat_categories import (
    LOOSE,
    STRICT,
    agreement,
    bootstrap_mean,
    confusion,
    load_rows,
    resamples,
)

FloatArray = NDArray[np.float64]

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "capabilities.jsonl"
OUT = ROOT / "studies" / "results" / "capability_v6.json"
MODELS = ROOT / "models"
SEEDS_3 = ROOT / "studies" / "data" / "capability_seeds_3.jsonl"
SEEDS_3K = ROOT / "studies" / "data" / "capability_seeds_3k.jsonl"
CHAT_SETS = {
    "dev": ROOT / "studies" / "data" / "chat_categories_dev.jsonl",
    "test": ROOT / "studies" / "data" / "chat_categories_test.jsonl",
}
#: The shipped gate's threshold on the static head's largest probability (not re-chosen).
TAU = 0.9
F1_MARGIN = -0.01
_OLD = ("seeds", "seeds_2")
_ALL = ("seeds", "seeds_2", "seeds_3", "seeds_3k")
_BOUNDARY = ("seeds", "seeds_2", "seeds_3")
_FILES = {**SEED_FILES, "seeds_3": SEEDS_3, "seeds_3k": SEEDS_3K}
#: name: (capability-v4 option the head copies, seed sets, the artifact it becomes if chosen).
HEADS: dict[str, tuple[str, tuple[str, ...], str]] = {
    "static_12": ("v3", _OLD, "capability-v3"),
    "encoder_12": ("encoder_128_64_C0.3", _OLD, "capability-v4"),
    "static_123": ("v3", _ALL, "capability-v6"),
    "encoder_123": ("encoder_128_64_C0.3", _ALL, "capability-v7"),
    "static_123b": ("v3", _BOUNDARY, "capability-v6"),
    "encoder_123b": ("encoder_128_64_C0.3", _BOUNDARY, "capability-v7"),
}
GATES = {
    "gate_12": ("static_12", "encoder_12"),
    "gate_123": ("static_123", "encoder_123"),
    "gate_123b": ("static_123b", "encoder_123b"),
}
BASELINE = "gate_12"
#: The candidates in the order they were proposed (see the module docstring).
CANDIDATES = ("gate_123", "gate_123b")
GATE_MODEL = "capability-v8"


def params(head: str) -> dict[str, Any]:
    """The :class:`CapabilityClassifier` parameters of a head (its seed prompts as pairs)."""
    option, seeds, _ = HEADS[head]
    return estimator_params({**V4_OPTIONS[option], "seeds": seeds}, _FILES)


def window(head: str) -> tuple[int, int] | None:
    """The encoder window of a head's option (``None``: the static table alone)."""
    w: tuple[int, int] | None = V4_OPTIONS[HEADS[head][0]]["window"]
    return w


def chat_agreement(
    rows: Sequence[dict[str, Any]], predicted: dict[str, list[str]]
) -> dict[str, Any]:
    """Strict and loose agreement of every gate on one chat set, the confusion of each, and each
    candidate minus the baseline with a stratified paired bootstrap interval."""
    cats = [str(r["category"]) for r in rows]
    out: dict[str, Any] = {}
    for name, guess in predicted.items():
        out[name] = {
            kind: bootstrap_mean(agreement(cats, guess, mapping), cats)
            for kind, mapping in (("strict", STRICT), ("loose", LOOSE))
        }
        out[name]["confusion"] = confusion(cats, guess)
    for cand in CANDIDATES:
        for kind, mapping in (("strict", STRICT), ("loose", LOOSE)):
            diff = agreement(cats, predicted[cand], mapping) - agreement(
                cats, predicted[BASELINE], mapping
            )
            draws = [float(diff[idx].mean()) for idx in resamples(cats)]
            lo, hi = np.percentile(draws, [2.5, 97.5])
            out[cand][f"{kind}_diff"] = {
                "mean": float(diff.mean()),
                "low": float(lo),
                "high": float(hi),
            }
    return out


def run(data: Path) -> dict[str, Any]:
    """Every head leave-one-source-out and on the chat sets, the gates composed; see above."""
    commercial, research = licence_split(data)
    every = [*commercial, *research]
    chats = {k: load_rows(p) for k, p in CHAT_SETS.items()}
    memos: dict[Any, Memo] = {}
    oof: dict[str, FloatArray] = {}
    chat_probs: dict[str, dict[str, FloatArray]] = {k: {} for k in chats}
    heads: dict[str, Any] = {}
    for head in HEADS:
        w = window(head)
        if w not in memos:
            memos[w] = Memo(embedding_for(w))
        filed: dict[str, np.ndarray] = {}
        settings = params(head)
        res, _ = score_option(head, settings, commercial, research, memos[w], probabilities=filed)
        heads[head] = res
        oof[head] = np.vstack([filed[r.prompt] for r in every])
        model = CapabilityClassifier(memos[w], **settings).fit(
            [r.prompt for r in commercial], [r.capability for r in commercial]
        )
        for k, rows in chats.items():
            chat_probs[k][head] = model.predict_proba([str(r["prompt"]) for r in rows])
    labels = np.array(CAPABILITIES)
    truth = [r.capability for r in every]
    n = len(commercial)
    parts = {"loso": slice(0, n), "auto_j": slice(n, None)}
    variants = {h: (oof[h], np.full(len(every), "encoder" in h)) for h in HEADS}
    variants.update({g: gate(oof[s], oof[e], TAU) for g, (s, e) in GATES.items()})
    guesses = {k: labels[p.argmax(axis=1)].tolist() for k, (p, _) in variants.items()}
    capability: dict[str, Any] = {}
    for name, (_, encoded) in variants.items():
        capability[name] = {
            part: {
                **_figures(truth[sl], guesses[name][sl]),
                "encoded_fraction": round(float(np.mean(encoded[sl])), 4),
            }
            for part, sl in parts.items()
        }
    against = {
        cand: {
            part: paired_gain(truth[sl], guesses[cand][sl], guesses[BASELINE][sl])
            for part, sl in parts.items()
        }
        for cand in CANDIDATES
    }
    chat: dict[str, Any] = {}
    for k, rows in chats.items():
        predicted = {}
        for g, (s, e) in GATES.items():
            p, _ = gate(chat_probs[k][s], chat_probs[k][e], TAU)
            predicted[g] = labels[p.argmax(axis=1)].tolist()
        chat[k] = chat_agreement(rows, predicted)
    return {"heads": heads, "capability": capability, "against_baseline": against, "chat": chat}


def adopted(result: dict[str, Any], candidate: str) -> bool:
    """The decision rule of the module docstring, for one candidate gate."""
    cand, base = result["capability"][candidate]["loso"], result["capability"][BASELINE]["loso"]
    test = result["chat"]["test"]
    return bool(
        cand["accuracy"] >= base["accuracy"]
        and cand["macro_f1"] >= base["macro_f1"]
        and result["against_baseline"][candidate]["loso"]["macro_f1_diff_ci"][0] >= F1_MARGIN
        and test[candidate]["strict"]["mean"] >= test[BASELINE]["strict"]["mean"]
    )


def train(data: Path, candidate: str) -> None:
    """Write one candidate's heads as capability-v6 (static) and capability-v7 (encoder), and
    the gate between them as capability-v8."""
    static, encoder = GATES[candidate]
    for head in (static, encoder):
        option, seeds, artifact = HEADS[head]
        out = MODELS / artifact
        shutil.rmtree(out, ignore_errors=True)
        train_capability(
            data,
            embedding_for(window(head)),
            out,
            params=head_settings(V4_OPTIONS[option]),
            seeds=[_FILES[s] for s in seeds],
            share=EMBEDDING_DIR,
        )
        print(f"wrote {out.relative_to(ROOT)}")
    shutil.rmtree(MODELS / GATE_MODEL, ignore_errors=True)
    save_gate(
        MODELS / GATE_MODEL,
        MODELS / HEADS[static][2],
        MODELS / HEADS[encoder][2],
        TAU,
        {"chosen_by": f"python -m studies.capability_v6 ({candidate})", "results": OUT.name},
    )
    print(f"wrote {(MODELS / GATE_MODEL).relative_to(ROOT)}")


def _print(result: dict[str, Any]) -> None:
    for name, c in result["capability"].items():
        lo, aj = c["loso"], c["auto_j"]
        print(
            f"{name:12s} encoded {lo['encoded_fraction']:.3f} LOSO acc {lo['accuracy']:.3f} "
            f"F1 {lo['macro_f1']:.3f} | Auto-J acc {aj['accuracy']:.3f} F1 {aj['macro_f1']:.3f}"
        )
    for cand, against in result["against_baseline"].items():
        for part, g in against.items():
            print(
                f"{cand} - {BASELINE} {part}: acc {g['accuracy_diff']:+.4f} "
                f"{[round(x, 4) for x in g['accuracy_diff_ci']]} F1 {g['macro_f1_diff']:+.4f} "
                f"{[round(x, 4) for x in g['macro_f1_diff_ci']]}"
            )
    for k, c in result["chat"].items():
        for g in GATES:
            s, lo_ = c[g]["strict"], c[g]["loose"]
            print(
                f"chat {k:4s} {g:9s} strict {s['mean']:.3f} [{s['low']:.3f}, {s['high']:.3f}] "
                f"loose {lo_['mean']:.3f}"
            )
        for cand in CANDIDATES:
            d = c[cand]["strict_diff"]
            print(
                f"chat {k:4s} {cand} - {BASELINE} strict {d['mean']:+.3f} "
                f"[{d['low']:+.3f}, {d['high']:+.3f}]"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m studies.capability_v6")
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument(
        "--train",
        choices=CANDIDATES,
        help="write this candidate as models/capability-v6, capability-v7 and the gate "
        "capability-v8",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = run(args.data)
    _print(result)
    decisions = {cand: adopted(result, cand) for cand in CANDIDATES}
    seconds = round(time.perf_counter() - start, 1)
    print(f"adopted by the capability rule: {decisions} ({seconds:.0f} s)")
    summary = {
        "data": args.data.name,
        "seed_sets": {
            name: {"file": _FILES[name].name, "rows": len(load_capability_rows(_FILES[name]))}
            for name in _ALL
        },
        "tau": TAU,
        "decision_rule": (
            "adopt a candidate gate when its LOSO accuracy and macro-F1 are not below "
            f"the shipped recipe's, the paired macro-F1 interval's lower bound is >= {F1_MARGIN}, "
            "and its strict agreement on the chat test set is not below the shipped recipe's"
        ),
        "adopted_by_capability_rule": decisions,
        **result,
        "seconds": seconds,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")
    if args.train:
        train(args.data, args.train)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
