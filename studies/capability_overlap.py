"""Does router-v3's leave-one-dataset-out score owe its gains to the capability model having seen
the held-out data set's format?

The shipped capability model trains on rows that include ``gsm8k-train`` and ``mmlu-dev`` (other
questions of the same sets, never a routing label). For each routing file held out, the routing
model (router-v3's recipe) is fitted on the other two files three ways and scored on it:
``full_capability`` (the shipped capability model), ``capability_without_overlap`` (refitted
without the source that shares the held-out format) and ``words_v2`` (no capability model).

    .venv/bin/python -m studies.capability_overlap   # studies/results/capability_overlap.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from router.metrics import evaluate, summary
from router.training import (
    fit_capability,
    fit_routing,
    load_capability_rows,
    load_routing_rows,
)

ROOT = Path(__file__).resolve().parent.parent

FILES = {
    "mmlu": "routellm_mmlu_mixtral_vs_gpt4turbo.jsonl",
    "gsm8k": "routellm_gsm8k_mixtral_vs_gpt4turbo.jsonl",
    "arena": "arenabench_v1_mixtral_vs_gpt4turbo.jsonl",
}
OVERLAP = {"mmlu": {"mmlu-dev"}, "gsm8k": {"gsm8k-train"}, "arena": set()}


def main() -> int:
    """Run the three fits per held-out file; print and write the APGRs."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "studies" / "results" / "capability_overlap.json"
    )
    args = parser.parse_args()
    rows = {k: load_routing_rows(args.data_dir / f) for k, f in FILES.items()}
    caps = load_capability_rows(args.data_dir / "capabilities.jsonl")
    shipped = fit_capability(caps)
    out: dict[str, Any] = {}
    for held in FILES:
        train = [r for k, v in rows.items() if k != held for r in v]
        test = rows[held]
        clean = (
            fit_capability([c for c in caps if c.source not in OVERLAP[held]])
            if OVERLAP[held]
            else shipped
        )
        out[held] = {"n": len(test), "excluded_sources": sorted(OVERLAP[held])}
        for name, capability in (
            ("full_capability", shipped),
            ("capability_without_overlap", clean),
            ("words_v2", None),
        ):
            model = fit_routing(train, capability)
            scores = model.predict_proba([r.prompt for r in test])[:, 1]
            report = summary(
                evaluate(
                    scores,
                    [r.weak_score for r in test],
                    [r.strong_score for r in test],
                    n_bootstrap=1000,
                )
            )
            out[held][name] = report["apgr"]
            a = report["apgr"]
            print(f"{held:6} {name:27} {a['value']:.3f} ({a['low']:.3f}-{a['high']:.3f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
