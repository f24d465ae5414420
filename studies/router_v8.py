"""router-v8: router-v7's recipe over capability-v5, the confidence gate between v3 and v4.

``python -m studies.capability_gate`` chose, by a pre-registered rule, to read capability-v3's
probabilities (static table) where their largest is at least ``tau`` and capability-v4's
(encoder) elsewhere. This study ships that choice: ``--train`` writes ``models/capability-v5``
(:func:`router.capability.save_gate` over the two shipped models, ``tau`` read from
``studies/results/capability_gate.json``) and ``models/router-v8``
(:func:`router.training.train_profile_router` over it, as ``tiergate train --capability
models/capability-v5`` does). Then, as :mod:`studies.router_v7`, each prompt set of the
routing files is held out in turn and router-v8 is compared with router-v7 (APGR and CPT(50%),
95% paired bootstrap intervals of v8 minus v7), AlpacaEval by the shipped artifacts.

The gate's probabilities are composed from the cached probabilities of its two members
(``studies/.cache``), after checking on a sample of prompts that the shipped gate, loaded as
the proxy loads it, gives the same ones::

    python -m studies.router_v8 [--train]

Needs the encoder's weights (``make model``). Writes ``studies/results/router_v8.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
from collections.abc import Sequence
from typing import Any

import numpy as np

from router.artifact import load_capability_model
from router.capability import save_gate
from router.training import load_routing_rows, train_profile_router
from studies.capability_gate import OUT as GATE_RESULTS
from studies.capability_gate import GatedReader
from studies.router_v5 import MODELS, cached_reader, compare
from studies.score_v4 import DATA, ROUTING_FILES

RESULTS = MODELS.parent / "studies" / "results" / "router_v8.json"
BASELINE, CANDIDATE = "router-v7", "router-v8"
STATIC, ENCODER, GATE = "capability-v3", "capability-v4", "capability-v5"
CAPABILITIES = {BASELINE: ENCODER, CANDIDATE: GATE}
SAMPLE = 200


def chosen_threshold() -> float:
    """The gate study's chosen ``tau`` (refused when it chose none)."""
    chosen = json.loads(GATE_RESULTS.read_text()).get("chosen")
    if not isinstance(chosen, str) or not chosen.startswith("gate_"):
        raise SystemExit(f"{GATE_RESULTS}: the gate study chose no threshold ({chosen!r})")
    return float(chosen.removeprefix("gate_"))


def readers() -> dict[str, Any]:
    """Cached readers per capability artifact; the gate's composed from its members' and
    checked against the shipped gate on :data:`SAMPLE` routing prompts."""
    static, encoder = cached_reader(MODELS / STATIC), cached_reader(MODELS / ENCODER)
    shipped = load_capability_model(MODELS / GATE)
    composed = GatedReader(static, encoder, shipped.threshold)  # type: ignore[union-attr]
    rows = [r for f in ROUTING_FILES for r in load_routing_rows(DATA / f)]
    for r in rows[:: max(1, len(rows) // SAMPLE)]:
        got, want = shipped.probabilities(r.prompt), composed.probabilities(r.prompt)
        if np.abs(got - want).max() > 1e-9:
            raise SystemExit(f"{GATE}: the shipped gate and its members' cache disagree")
    return {STATIC: static, ENCODER: encoder, GATE: composed}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m studies.router_v8")
    parser.add_argument(
        "--train", action="store_true", help="write models/capability-v5 and models/router-v8"
    )
    args = parser.parse_args(argv)
    if args.train:
        for name in (GATE, CANDIDATE):
            shutil.rmtree(MODELS / name, ignore_errors=True)
        tau = chosen_threshold()
        save_gate(
            MODELS / GATE,
            MODELS / STATIC,
            MODELS / ENCODER,
            tau,
            {"chosen_by": "python -m studies.capability_gate", "results": GATE_RESULTS.name},
        )
    found = readers()
    if args.train:
        train_profile_router(
            [DATA / f for f in ROUTING_FILES], MODELS / GATE, MODELS / CANDIDATE, reader=found[GATE]
        )
    try:
        compare(CAPABILITIES, RESULTS, readers=found)
    finally:
        found[GATE].save()  # its members' caches, the encoder's among them
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
