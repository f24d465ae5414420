"""router-v5: router-v4's recipe over capability-v2, and whether it may ship.

Both routers are router-v4's profile head (:func:`router.training.fit_gap_routing`) over a
standalone capability model: v4 over ``models/capability-v1``, v5 over
``models/capability-v2``. Each prompt set of the routing files allowed for shipped models
(RouteLLM MMLU and GSM8K, Arena-Bench v1, both MMLU-Pro files) is held out in turn, as in
``studies.score_v4``; each held-out file's rows are read against its weak model's profile,
cross-fitted from that file's labels. Per file: APGR and CPT(50%) of both, with 95% paired
bootstrap intervals of v5 minus v4. AlpacaEval (CC BY-NC: evaluation only) is scored by both
routers fitted on all the allowed files, with the default profile, as ``tiergate score`` would.

v5 may ship only when it is no worse than v4 on any labelled file: no file's APGR interval lies
wholly below zero. ``--train`` writes ``models/router-v5``
(:func:`router.training.train_profile_router`) first::

    python -m studies.router_v5 [--train]

Writes ``studies/results/router_v5.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from router.artifact import load_capability_model, load_scorer, sha256_file
from router.classifier import ServedCapability
from router.profile import default_profile
from router.training import load_routing_rows, train_profile_router
from studies.score_v4 import (
    DATA,
    OOD_FILE,
    ROUTING_FILES,
    gap_loso_scores,
    paired,
    paired_per_file,
)

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"
RESULTS = ROOT / "studies" / "results" / "router_v5.json"
CAPABILITIES = {"router-v4": "capability-v1", "router-v5": "capability-v2"}
#: Capability probabilities kept between study runs (not committed).
CACHE = ROOT / "studies" / ".cache"


class MemoReader:
    """A capability reader whose probabilities are memoised (every fold reads the same rows);
    with ``cache``, also kept on disk between runs (:func:`cached_reader`)."""

    def __init__(self, reader: Any, cache: Path | None = None) -> None:
        self.reader = reader
        self.capabilities, self.version = reader.capabilities, reader.version
        self.memo: dict[str, np.ndarray] = {}
        self.cache, self._stored = cache, 0
        if cache is not None and cache.is_file():
            with np.load(cache) as f:
                self._disk = dict(zip(f["keys"].tolist(), f["probabilities"], strict=True))
        else:
            self._disk = {}
        self._stored = len(self._disk)

    def probabilities(self, text: str) -> np.ndarray:
        if text not in self.memo:
            key = hashlib.sha256(text.encode()).hexdigest()
            if key not in self._disk:
                self._disk[key] = self.reader.probabilities(text)
            self.memo[text] = self._disk[key]
        return self.memo[text]

    def save(self) -> None:
        """Write the disk cache, when there is one and it grew."""
        if self.cache is None or len(self._disk) == self._stored:
            return
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self._disk)
        partial = self.cache.with_suffix(".part.npz")
        np.savez(
            partial, keys=np.array(keys), probabilities=np.vstack([self._disk[k] for k in keys])
        )
        partial.replace(self.cache)
        self._stored = len(self._disk)


def cached_reader(directory: Path) -> MemoReader:
    """The capability model in ``directory``, memoised on disk under ``studies/.cache`` keyed
    by its sidecar's sha256 (which pins its head, table and encoder): the encoder costs
    milliseconds a prompt, and the studies read the same 25,000 prompts again and again."""
    key = sha256_file(directory / "metadata.json")[:16]
    return MemoReader(load_capability_model(directory), CACHE / f"{directory.name}-{key}.npz")


def ships(per_file: dict[str, dict[str, Any]]) -> bool:
    """No labelled file's APGR interval (candidate minus baseline) lies wholly below zero."""
    return all(m["apgr_diff_ci"][1] >= 0.0 for m in per_file.values())


def compare(
    capabilities: dict[str, str],
    results_path: Path,
    readers: dict[str, Any] | None = None,
    routers: dict[str, Path] | None = None,
) -> dict[str, Any]:
    """Compare two routers, each router-v4's profile head over a capability model
    (``capabilities``: router name to capability artifact name, the baseline first, the
    candidate second): leave-one-source-out APGR and CPT(50%) per file with paired intervals of
    candidate minus baseline, AlpacaEval with the shipped artifacts; print, write
    ``results_path`` and return the results. ``readers``: capability readers by artifact name
    to use in place of :func:`cached_reader`'s (the caller saves them); ``routers``: a
    router's artifact directory by name, for AlpacaEval, where it is not ``models/NAME``."""
    baseline, candidate = capabilities
    rows = [r for f in ROUTING_FILES for r in load_routing_rows(DATA / f)]
    scores = {}
    for router, cap in capabilities.items():
        print(f"{router} over {cap}: leave-one-source-out ...", file=sys.stderr, flush=True)
        given = (readers or {}).get(cap)
        reader = given if given is not None else cached_reader(MODELS / cap)
        scores[router] = gap_loso_scores(rows, ServedCapability(reader).fit())
        if given is None:
            reader.save()
    per_file = paired_per_file(scores[candidate], scores[baseline], rows)
    ood = load_routing_rows(DATA / OOD_FILE)
    where = {name: MODELS / name for name in capabilities} | (routers or {})
    served = {name: load_scorer(where[name]) for name in capabilities}
    alpaca = paired(
        [served[candidate].score(r.prompt) for r in ood],
        [served[baseline].score(r.prompt) for r in ood],
        ood,
    )
    results = {
        "baseline": baseline,
        "candidate": candidate,
        "capability_models": capabilities,
        "leave_one_source_out": per_file,
        "alpacaeval_default_profile": alpaca,
        "default_profile": default_profile().model,
        "ships": ships(per_file),
    }
    results_path.parent.mkdir(parents=True, exist_ok=True)
    results_path.write_text(json.dumps(results, indent=2) + "\n")
    new, old = candidate.removeprefix("router-"), baseline.removeprefix("router-")
    for d, m in {**per_file, "alpacaeval (eval only)": alpaca}.items():
        lo, hi = m["apgr_diff_ci"]
        print(
            f"{d:44s} n {m['n']:5d} APGR {new} {m['apgr']:.3f} {old} {m['apgr_baseline']:.3f} "
            f"diff [{lo:+.3f}, {hi:+.3f}]  CPT50 {new} {m['cpt50']:.3f} "
            f"{old} {m['cpt50_baseline']:.3f}"
        )
    print(f"ships: {results['ships']}")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m studies.router_v5")
    parser.add_argument("--train", action="store_true", help="write models/router-v5 first")
    args = parser.parse_args(argv)
    if args.train:
        out = MODELS / "router-v5"
        shutil.rmtree(out, ignore_errors=True)
        train_profile_router([DATA / f for f in ROUTING_FILES], MODELS / "capability-v2", out)
    compare(CAPABILITIES, RESULTS)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
