"""How long a window of each prompt must the text features read? Grouped-CV APGR per window.

The shipped recipe (word TF-IDF + structure features, logistic regression) is measured with
``studies.feature_study``'s protocol once per window (the first HEAD and last TAIL characters
that ``router.features.clip`` keeps), and each window's held-out scores are compared with the
reference window's by a paired bootstrap of the APGR difference. A longer window costs more per
decision; ``bench/decision_pipeline.py`` measures the shipped one.

    taskset -c 1 .venv/bin/python -m studies.window_study   # studies/results/window_study.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from router import features
from studies import feature_study as study

ROOT = Path(__file__).resolve().parent.parent

REFERENCE = (2000, 500)
WINDOWS = ((1000, 250), (1200, 300), (800, 200))


def run(data_dir: Path, n_boot: int) -> dict[str, Any]:
    """APGR per held-out set for each window, with paired differences to :data:`REFERENCE`."""
    shipped = (features.HEAD_CHARS, features.TAIL_CHARS)
    out: dict[str, Any] = {"reference": list(REFERENCE), "shipped": list(shipped), "windows": {}}
    base: dict[str, Any] | None = None
    for head, tail in (REFERENCE, *WINDOWS):
        data = study.load(data_dir, 0, window=(head, tail))
        study.precompute(data, {"words", "struct"}, data_dir)
        res, _, scores = study.measure(data, study.CANDIDATES[0], base, n_boot)
        if base is None:
            base = scores
        entry = {
            "apgr": {k: round(v["apgr"]["value"], 4) for k, v in res["sets"].items()},
            "gen": round(res["gen"], 4),
            "vs_reference": {
                k: {x: round(v[x], 4) for x in ("value", "low", "high")}
                for k, v in res["vs_baseline"].items()
            },
        }
        out["windows"][f"{head}+{tail}"] = entry
        print(f"{head}+{tail}: {json.dumps(entry)}", file=sys.stderr, flush=True)
    return out


def main() -> int:
    """Run the study and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "studies/results/window_study.json")
    args = parser.parse_args()
    result = run(args.data_dir, args.bootstrap)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
