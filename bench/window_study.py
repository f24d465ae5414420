"""How long a window of each prompt must the text features read? Grouped-CV APGR per window.

    taskset -c 1 .venv/bin/python bench/window_study.py        # ~5 min on one core

The shipped recipe (word 1-2 TF-IDF + the structure features, logistic regression) is measured
with ``bench/feature_study.py``'s protocol (every fold refits vocabulary, idf, scaling and model
on its own training rows; all MMLU rows) once per prompt window: the first HEAD and the last TAIL
characters of a long prompt (``router.features.clip``). Each window's held-out scores are compared
with the first shipped model's window (2,000 + 500) on the same rows by a paired bootstrap (1,000
resamples) of the APGR difference. The per-decision cost of a long prompt grows with the window;
``bench/decision_pipeline.py`` measures it for the shipped one.

Writes ``bench/results/window_study.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import feature_study as study  # noqa: E402

from router import features  # noqa: E402

REFERENCE = (2000, 500)
WINDOWS = ((1000, 250), (1200, 300), (800, 200))


def _set_window(head: int, tail: int) -> None:
    # clip() reads these module globals at each call; the study's features all go through it.
    features.HEAD_CHARS, features.TAIL_CHARS, features.MAX_CHARS = head, tail, head + tail


def run(data_dir: Path, n_boot: int) -> dict[str, Any]:
    """APGR per held-out set for each window, with paired differences to :data:`REFERENCE`."""
    shipped = (features.HEAD_CHARS, features.TAIL_CHARS)
    out: dict[str, Any] = {"reference": list(REFERENCE), "shipped": list(shipped), "windows": {}}
    base: dict[str, Any] | None = None
    try:
        for head, tail in (REFERENCE, *WINDOWS):
            _set_window(head, tail)
            data = study.load(data_dir, 0)
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
    finally:
        _set_window(*shipped)
    return out


def main() -> int:
    """Run the study and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/window_study.json")
    args = parser.parse_args()
    result = run(args.data_dir, args.bootstrap)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
