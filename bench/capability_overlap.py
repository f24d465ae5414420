"""Does router-v3's routing score owe its leave-one-dataset-out gains to the capability model
having seen the held-out data set's format?

The shipped capability model trains on the ``commercial_use: true`` rows of capabilities.jsonl,
which include ``gsm8k-train`` (other GSM8K questions) and ``mmlu-dev`` (other MMLU questions),
though never a routing label. For each routing file held out as a whole, this fits the routing
model (router-v3's recipe) on the other two files three ways and scores the held-out file:

* ``full_capability``: reading the shipped capability model (the model card's LODO numbers);
* ``capability_without_overlap``: reading a capability model refitted without the source that
  shares the held-out file's format (``mmlu-dev`` for MMLU, ``gsm8k-train`` for GSM8K; Arena-Bench
  has none, so it repeats the first);
* ``words_v2``: router-v2's word + structure recipe, which reads no capability model.

    .venv/bin/python bench/capability_overlap.py     # ~2 min; bench/results/capability_overlap.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from router.metrics import evaluate, summary  # noqa: E402
from router.training import (  # noqa: E402
    fit_capability,
    fit_routing,
    load_capability_rows,
    load_routing_rows,
)

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
        "--out", type=Path, default=ROOT / "bench" / "results" / "capability_overlap.json"
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
