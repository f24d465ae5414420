"""Capability-path cost: ``CapabilityModel.probabilities`` per prompt, its load, its memory.

Pinned to one core with BLAS on one thread, it times ``probabilities(text)`` for every prompt of
the shared data (each prompt's fastest of ``--passes``), and in fresh interpreters the resident
memory of the proxy's scorer with and without the capability model beside it.

    OPENBLAS_NUM_THREADS=1 .venv/bin/python -m studies.capability_speed
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from router.capability import default_capability_path, load_capability
from router.training import load_prompts

ROOT = Path(__file__).resolve().parent.parent

RSS_SNIPPET = """
import json, sys, time
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
from router.artifact import default_model_path, load_scorer
scorer = load_scorer(default_model_path())
scorer.analyze("warm up")
base = rss()
t0 = time.perf_counter()
if sys.argv[1] == "with":
    from router.capability import load_capability
    model = load_capability(sys.argv[2])
    model.probabilities("warm up")
t1 = time.perf_counter()
print(json.dumps({"rss_mb": rss(), "base_mb": base, "load_s": t1 - t0,
                  "sklearn": "sklearn" in sys.modules}))
"""


def fresh(mode: str, model: Path) -> dict[str, float]:
    """RSS and load time in a fresh interpreter (``mode``: "with" or "without" the model)."""
    out = subprocess.run(
        [sys.executable, "-c", RSS_SNIPPET, mode, str(model)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        env={**os.environ, "OPENBLAS_NUM_THREADS": "1"},
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def main() -> int:
    """Run the benchmark and write the JSON results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_capability_path())
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "studies" / "results" / "capability_speed.json"
    )
    parser.add_argument("--passes", type=int, default=3)
    args = parser.parse_args()

    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    memory = {mode: [fresh(mode, args.model) for _ in range(3)] for mode in ("without", "with")}
    model = load_capability(args.model)
    prompts: list[str] = []
    files = sorted(args.data_dir.glob("*.jsonl"))
    for f in files:
        prompts += [p for _, p in load_prompts(f)]
    for p in prompts[:500]:
        model.probabilities(p)
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    times = np.empty((args.passes, len(prompts)))
    clock = time.perf_counter_ns
    for k in range(args.passes):
        for i, p in enumerate(prompts):
            t0 = clock()
            model.probabilities(p)
            times[k, i] = (clock() - t0) / 1e6
    best = times.min(axis=0)
    without = min(m["rss_mb"] for m in memory["without"])
    with_model = min(m["rss_mb"] for m in memory["with"])
    result = {
        "what": "CapabilityModel.probabilities per prompt (tokenise, pool, head), one core",
        "model": args.model.name,
        "prompts": len(prompts),
        "files": [f.name for f in files],
        "passes": args.passes,
        "probabilities": {
            "p50_ms": float(np.percentile(best, 50)),
            "p99_ms": float(np.percentile(best, 99)),
            "max_ms": float(best.max()),
            "mean_ms": float(best.mean()),
        },
        "memory": {
            "proxy_scorer_rss_mb": round(without, 1),
            "with_capability_rss_mb": round(with_model, 1),
            "added_rss_mb": round(with_model - without, 1),
            "load_s": round(min(m["load_s"] for m in memory["with"]), 3),
            "sklearn_imported": any(m["sklearn"] for m in memory["with"]),
        },
        "loadavg": {"start": loadavg_start, "end": [round(x, 2) for x in os.getloadavg()]},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("prompts", "probabilities", "memory")}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
