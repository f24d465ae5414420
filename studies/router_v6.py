"""router-v6: router-v5's recipe over capability-v3, and whether it may ship.

As :mod:`studies.router_v5`, one version on: both routers are the profile head
(:func:`router.training.fit_gap_routing`) over a standalone capability model, v5 over
``models/capability-v2`` and v6 over ``models/capability-v3``; each prompt set of the routing
files allowed for shipped models is held out in turn, read against its weak model's
cross-fitted profile; per file, APGR and CPT(50%) of both with 95% paired bootstrap intervals of
v6 minus v5. AlpacaEval (evaluation only) is scored by both shipped routers with the default
profile.

v6 may ship as the default only when no labelled file's APGR interval lies wholly below zero.
``--train`` writes ``models/router-v6`` (:func:`router.training.train_profile_router`) first::

    python -m studies.router_v6 [--train]

Writes ``studies/results/router_v6.json``.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence

from router.training import train_profile_router
from studies.router_v5 import MODELS, compare
from studies.score_v4 import DATA, ROUTING_FILES

RESULTS = MODELS.parent / "studies" / "results" / "router_v6.json"
BASELINE, CANDIDATE = "router-v5", "router-v6"
CAPABILITIES = {BASELINE: "capability-v2", CANDIDATE: "capability-v3"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m studies.router_v6")
    parser.add_argument("--train", action="store_true", help="write models/router-v6 first")
    args = parser.parse_args(argv)
    if args.train:
        out = MODELS / CANDIDATE
        shutil.rmtree(out, ignore_errors=True)
        train_profile_router(
            [DATA / f for f in ROUTING_FILES], MODELS / CAPABILITIES[CANDIDATE], out
        )
    compare(CAPABILITIES, RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
