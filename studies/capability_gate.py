"""A confidence gate: capability-v3's probabilities when it is sure, capability-v4's otherwise.

capability-v4 (:mod:`studies.capability_v4`) reads every prompt through the MiniLM encoder
(~22 ms p50 on one core); capability-v3 reads only the static table (~0.25 ms) and is worse
leave-one-source-out. The gate reads v3's probabilities P3 first and uses them when
``max(P3) >= tau``, else v4's P4, so only the prompts v3 is unsure of pay for the encoder.
Pre-registered grid: ``tau`` in :data:`TAUS`, fixed before any result was seen.

Protocol. Capability: :mod:`studies.capability_v4`'s, unchanged: v3 (``OPTIONS["v3"]``) and
the chosen v4 option (``encoder_128_64_C0.3``) scored leave-one-source-out on the
``commercial_use: true`` rows of ``capabilities.jsonl`` (descriptions and both seed sets in
every fold), Auto-J (research-only) by a fit on all commercial rows; both models' out-of-fold
probabilities are kept and the gate applied row by row, each fold's v3 gating its own v4.
Per variant: pooled LOSO and Auto-J accuracy and macro-F1, the fraction of rows that run the
encoder, and paired bootstrap 95% intervals against v4 (:func:`studies.capability_v2.paired_gain`).
Routing: :func:`studies.router_v5.compare`'s: the profile head refitted leave-one-prompt-set-out
(:func:`studies.score_v4.gap_loso_scores`) over the shipped capability-v3 and capability-v4
(router-v6, router-v7) and over the gate between them; per routing file, APGR and CPT(50%)
of each gated router against router-v7 with paired intervals, and the fraction of that file's
prompts that run the encoder. Capability probabilities of routing prompts come from
``studies/.cache`` (:func:`studies.router_v5.cached_reader`).

Decision rule (fixed before running): the chosen ``tau`` is the one with the smallest encoded
fraction (pooled over the commercial LOSO rows; the fraction grows with ``tau`` on any row
set, so this is the smallest qualifying ``tau``) such that (a) the paired LOSO macro-F1
interval against v4 has lower bound >= -0.01 and (b) no routing file's APGR interval against
router-v7 lies wholly below zero. None qualifying is a valid outcome::

    python -m studies.capability_gate

Needs the encoder's weights (``make model``). Writes ``studies/results/capability_gate.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.metrics import accuracy_score, f1_score

from router.classifier import ServedCapability
from router.scoring import CAPABILITIES
from router.training import load_routing_rows
from studies.capability_loso import Memo, licence_split
from studies.capability_v2 import paired_gain, score_option
from studies.capability_v4 import OPTIONS, embedding_for, estimator_params
from studies.router_v5 import MODELS, MemoReader, cached_reader
from studies.score_v4 import DATA, ROUTING_FILES, gap_loso_scores, paired_per_file

FloatArray = NDArray[np.float64]

ROOT = Path(__file__).resolve().parent.parent
CAPABILITY_DATA = DATA / "capabilities.jsonl"
OUT = ROOT / "studies" / "results" / "capability_gate.json"
STATIC, ENCODER = "v3", "encoder_128_64_C0.3"
#: The pre-registered gate thresholds on max(P3).
TAUS = (0.6, 0.7, 0.8, 0.9)
F1_MARGIN = -0.01


def gate(p3: FloatArray, p4: FloatArray, tau: float) -> tuple[FloatArray, NDArray[np.bool_]]:
    """The gated probabilities (rows of ``p3`` where v3 is sure, else of ``p4``) and which rows
    ran the encoder."""
    encoded = p3.max(axis=1) < tau
    return np.where(encoded[:, None], p4, p3), encoded


class GatedReader:
    """A capability reader that reads v3 first and v4 only when ``max(P3) < tau`` (as the
    readers :class:`router.classifier.ServedCapability` wraps)."""

    def __init__(self, static: MemoReader, encoder: MemoReader, tau: float) -> None:
        if list(static.capabilities) != list(encoder.capabilities):
            raise ValueError("the two capability models order their capabilities differently")
        self.static, self.encoder, self.tau = static, encoder, tau
        self.capabilities = static.capabilities
        self.version = f"gate({static.version},{encoder.version},{tau:g})"

    def probabilities(self, text: str) -> FloatArray:
        p3 = self.static.probabilities(text)
        out: FloatArray = p3 if p3.max() >= self.tau else self.encoder.probabilities(text)
        return out

    def save(self) -> None:
        """Write both members' disk caches (:meth:`studies.router_v5.MemoReader.save`)."""
        self.static.save()
        self.encoder.save()


def _figures(truth: Sequence[str], guess: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over the capabilities in the truth (as leave_one_source_out)."""
    labels = [c for c in CAPABILITIES if c in truth]
    f1 = f1_score(truth, guess, labels=labels, average="macro", zero_division=0)
    return {
        "accuracy": round(float(accuracy_score(truth, guess)), 4),
        "macro_f1": round(float(f1), 4),
    }


def capability_part(data: Path) -> dict[str, Any]:
    """Out-of-fold probabilities of v3 and v4 on the capability rows, and every variant's
    figures (see the module docstring)."""
    commercial, research = licence_split(data)
    every = [*commercial, *research]
    if len({r.prompt for r in every}) != len(every):
        raise ValueError("probabilities are filed by prompt: the prompts must be unique")
    probs: dict[str, FloatArray] = {}
    for name in (STATIC, ENCODER):
        option = OPTIONS[name]
        filed: dict[str, np.ndarray] = {}
        memo = Memo(embedding_for(option["window"]))
        params = estimator_params(option)
        score_option(name, params, commercial, research, memo, probabilities=filed)
        probs[name] = np.vstack([filed[r.prompt] for r in every])
    labels = np.array(CAPABILITIES)
    truth = [r.capability for r in every]
    n = len(commercial)
    parts = {"loso": slice(0, n), "auto_j": slice(n, None)}
    variants: dict[str, tuple[FloatArray, NDArray[np.bool_]]] = {
        STATIC: (probs[STATIC], np.zeros(len(every), dtype=bool)),
        ENCODER: (probs[ENCODER], np.ones(len(every), dtype=bool)),
        **{f"gate_{tau:g}": gate(probs[STATIC], probs[ENCODER], tau) for tau in TAUS},
    }
    guesses = {k: labels[p.argmax(axis=1)].tolist() for k, (p, _) in variants.items()}
    out: dict[str, Any] = {}
    for name, (_, encoded) in variants.items():
        out[name] = {
            part: {
                **_figures(truth[sl], guesses[name][sl]),
                "encoded_fraction": round(float(encoded[sl].mean()), 4),
            }
            for part, sl in parts.items()
        }
        if name != ENCODER:
            out[name]["against_v4"] = {
                part: paired_gain(truth[sl], guesses[name][sl], guesses[ENCODER][sl])
                for part, sl in parts.items()
            }
    return out


def routing_part() -> dict[str, Any]:
    """router-v6, router-v7 and each gated router leave-one-prompt-set-out per routing file,
    against router-v7, with each file's encoded fraction (see the module docstring)."""
    rows = [r for f in ROUTING_FILES for r in load_routing_rows(DATA / f)]
    static = cached_reader(MODELS / "capability-v3")
    encoder = cached_reader(MODELS / "capability-v4")
    readers: dict[str, Any] = {"router-v6": static, "router-v7": encoder}
    readers.update({f"gate_{tau:g}": GatedReader(static, encoder, tau) for tau in TAUS})
    scores = {}
    for name, reader in readers.items():
        print(f"{name}: leave-one-prompt-set-out ...", file=sys.stderr, flush=True)
        scores[name] = gap_loso_scores(rows, ServedCapability(reader).fit())
    static.save()
    encoder.save()
    sure = np.array([static.probabilities(r.prompt).max() for r in rows])
    files = sorted({r.dataset for r in rows})
    out: dict[str, Any] = {}
    for name in readers:
        if name == "router-v7":
            continue
        per_file = paired_per_file(scores[name], scores["router-v7"], rows)
        for d in files:
            in_file = np.array([r.dataset == d for r in rows])
            tau = float(name.removeprefix("gate_")) if name.startswith("gate_") else 0.0
            per_file[d]["encoded_fraction"] = round(float((sure[in_file] < tau).mean()), 4)
        out[name] = per_file
    return out


def decide(capability: dict[str, Any], routing: dict[str, Any]) -> str | None:
    """The decision rule of the module docstring: the qualifying gate with the smallest
    encoded fraction, or None."""
    qualifying = [
        name
        for name in (f"gate_{tau:g}" for tau in TAUS)
        if capability[name]["against_v4"]["loso"]["macro_f1_diff_ci"][0] >= F1_MARGIN
        and all(m["apgr_diff_ci"][1] >= 0.0 for m in routing[name].values())
    ]
    return min(qualifying, key=lambda n: capability[n]["loso"]["encoded_fraction"], default=None)


def _print(capability: dict[str, Any], routing: dict[str, Any]) -> None:
    print(
        f"{'variant':20s} {'encoded':>7s} {'LOSO acc':>8s} {'F1':>6s} {'Auto-J acc':>10s} "
        f"{'F1':>6s}  LOSO F1 - v4 [95%]        Auto-J F1 - v4 [95%]"
    )
    for name, c in capability.items():
        lo, aj = c["loso"], c["auto_j"]
        line = (
            f"{name:20s} {lo['encoded_fraction']:7.3f} {lo['accuracy']:8.3f} {lo['macro_f1']:6.3f}"
            f" {aj['accuracy']:10.3f} {aj['macro_f1']:6.3f}"
        )
        if "against_v4" in c:
            for part in ("loso", "auto_j"):
                g = c["against_v4"][part]
                d, (a, b) = g["macro_f1_diff"], g["macro_f1_diff_ci"]
                line += f"  {d:+.3f} [{a:+.3f}, {b:+.3f}]"
        print(line)
    for name, per_file in routing.items():
        for d, m in per_file.items():
            lo_, hi_ = m["apgr_diff_ci"]
            print(
                f"{name:10s} {d:40s} n {m['n']:5d} encoded {m['encoded_fraction']:.3f} "
                f"APGR {m['apgr']:.3f} v7 {m['apgr_baseline']:.3f} diff [{lo_:+.3f}, {hi_:+.3f}]"
                f"  CPT50 {m['cpt50']:.3f} v7 {m['cpt50_baseline']:.3f}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m studies.capability_gate")
    parser.add_argument("--data", type=Path, default=CAPABILITY_DATA)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    capability = capability_part(args.data)
    routing = routing_part()
    chosen = decide(capability, routing)
    _print(capability, routing)
    seconds = round(time.perf_counter() - start, 1)
    print(f"chosen: {chosen} ({seconds:.0f} s)")
    summary = {
        "data": args.data.name,
        "taus": list(TAUS),
        "static": STATIC,
        "encoder": ENCODER,
        "decision_rule": (
            "smallest encoded fraction (commercial LOSO rows) such that the paired LOSO "
            f"macro-F1 interval against v4 has lower bound >= {F1_MARGIN} and no routing file's "
            "APGR interval against router-v7 lies wholly below zero"
        ),
        "chosen": chosen,
        "capability": capability,
        "routing_against_router_v7": routing,
        "seconds": seconds,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(summary, indent=1) + "\n")
    print(f"wrote {OUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
