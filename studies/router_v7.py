"""router-v7: router-v6's recipe over capability-v4 (static table and MiniLM encoder).

As :mod:`studies.router_v6`, one version on: both routers are the profile head
(:func:`router.training.fit_gap_routing`) over a standalone capability model, v6 over
``models/capability-v3`` and v7 over ``models/capability-v4``; each prompt set of the routing
files allowed for shipped models is held out in turn, read against its weak model's
cross-fitted profile; per file, APGR and CPT(50%) of both with 95% paired bootstrap intervals
of v7 minus v6. AlpacaEval (evaluation only) is scored by both shipped routers with the
default profile.

v7 may ship as the default only when no labelled file's APGR interval lies wholly below zero.
``--train`` writes ``models/router-v7`` (:func:`router.training.train_profile_router`) first.
Capability probabilities are kept in ``studies/.cache`` (:func:`studies.router_v5.cached_reader`),
so a rerun does not pay the encoder again::

    python -m studies.router_v7 [--train]

Needs the encoder's weights (``make model``). Writes ``studies/results/router_v7.json``.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence

from router.training import train_profile_router
from studies.router_v5 import MODELS, cached_reader, compare
from studies.score_v4 import DATA, ROUTING_FILES

RESULTS = MODELS.parent / "studies" / "results" / "router_v7.json"
BASELINE, CANDIDATE = "router-v6", "router-v7"
CAPABILITIES = {BASELINE: "capability-v3", CANDIDATE: "capability-v4"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m studies.router_v7")
    parser.add_argument("--train", action="store_true", help="write models/router-v7 first")
    args = parser.parse_args(argv)
    if args.train:
        out = MODELS / CANDIDATE
        shutil.rmtree(out, ignore_errors=True)
        reader = cached_reader(MODELS / CAPABILITIES[CANDIDATE])
        train_profile_router(
            [DATA / f for f in ROUTING_FILES], MODELS / CAPABILITIES[CANDIDATE], out, reader=reader
        )
        reader.save()
    compare(CAPABILITIES, RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
