"""Does ``tiergate retrain`` learn a profile router's local profile from feedback, behind its gate?

A replay through the real loop (:func:`router.retrain.retrain`, a real SQLite outcome store and a
real model store in a temporary folder): MMLU-Pro with Llama-3.1-8B-Instruct as the local model
and GPT-4o as the closed one (``mmlupro_llama31_8b_vs_gpt4o.jsonl``), the shipped router-v5
reading Llama's declared profile (``models/profiles/Llama-3.1-8B-Instruct.yaml``) as the
configured one. Per seed, the file's rows are shuffled and split:

* **feedback**, 1,000 requests served locally, each rated by its user: the local answer's
  quality is its correctness (``weak_score``); *adversarial* feedback rates it right where it
  was wrong and wrong where it was right;
* **gate**, 500 requests with a trusted shadow verdict: 1 where GPT-4o was right and Llama
  wrong (the closed answer materially better), else 0;
* **report**, the other 2,571 rows, never labelled: the served router before and after, scored
  on the file's own labels with a paired bootstrap of the APGR difference.

The retrain holds out a share of labelled requests chosen by a hash of the request id; the
replay draws its request ids so that the feedback requests fall in the training share and the
shadow-judged ones in the held-out share (on live traffic the two sources mix). The gate is
``tiergate retrain``'s default. Nothing fitted here is kept.

    PYTHONPATH=. python -m studies.profile_loop   # writes studies/results/profile_loop.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from router.artifact import DEFAULT_MODEL_NAME, load_scorer
from router.locations import shipped
from router.outcomes import Label, OutcomeRecord, SQLiteOutcomeStore
from router.profile import LocalProfile, load_profile
from router.registry import ModelStore
from router.retrain import BASE_FILES, GateConfig, bucket, compare, retrain
from router.training import RoutingRow, load_routing_rows

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
FILE = "mmlupro_llama31_8b_vs_gpt4o.jsonl"
PROFILE = ROOT / "models" / "profiles" / "Llama-3.1-8B-Instruct.yaml"
RESULTS = ROOT / "studies" / "results" / "profile_loop.json"
MODES = ("honest", "adversarial")


def request_id(stem: str, *, held_out: bool, config: GateConfig) -> str:
    """The first ``stem-k`` whose hash puts it in the retrain's held-out share (or not)."""
    k = 0
    while (bucket(f"{stem}-{k}", "holdout") < config.holdout) != held_out:
        k += 1
    return f"{stem}-{k}"


def record(rid: str, prompt: str) -> OutcomeRecord:
    """A locally served request whose prompt was stored."""
    return OutcomeRecord(
        id=rid,
        ts=time.time(),
        tenant="replay",
        alias="auto",
        tier="local",
        model="local",
        rule="default",
        score=0.5,
        threshold=0.5,
        policy_version="replay",
        model_version="v0001",
        status="ok",
        http_status=200,
        stream=False,
        latency_ms=1.0,
        prompt=prompt,
    )


def fill(
    store: SQLiteOutcomeStore,
    rows: Sequence[RoutingRow],
    feedback: Sequence[int],
    gate: Sequence[int],
    *,
    mode: str,
    seed: int,
    config: GateConfig,
) -> None:
    """Write the replay's records and labels (see the module docstring) into ``store``."""
    now = time.time()
    for i in feedback:
        r = rows[i]
        rid = request_id(f"fb-{seed}-{i}", held_out=False, config=config)
        quality = r.weak_score if mode == "honest" else 1.0 - r.weak_score
        store.submit(record(rid, r.prompt))
        store.label(Label(rid, "replay", "feedback", 1.0 - quality, now, quality=quality))
    for i in gate:
        r = rows[i]
        rid = request_id(f"sh-{seed}-{i}", held_out=True, config=config)
        verdict = float(r.strong_score > r.weak_score)
        store.submit(record(rid, r.prompt))
        store.label(Label(rid, "replay", "shadow", verdict, now))
    store.flush()


def one_run(
    rows: list[RoutingRow],
    prior: LocalProfile,
    seed: int,
    mode: str,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One replay: fill a fresh outcome store, retrain once, score the report rows."""
    order = np.random.default_rng(seed).permutation(len(rows))
    feedback, gate = order[: args.feedback], order[args.feedback : args.feedback + args.gate]
    report_rows = [rows[i] for i in order[args.feedback + args.gate :]]
    config = GateConfig(n_bootstrap=args.bootstrap, seed=seed)
    with tempfile.TemporaryDirectory(prefix="profile-loop-") as tmp:
        store = SQLiteOutcomeStore(Path(tmp) / "outcomes.db")
        store.start()
        try:
            fill(store, rows, feedback, gate, mode=mode, seed=seed, config=config)
            models = ModelStore(Path(tmp) / "models")
            models.adopt(shipped("models", DEFAULT_MODEL_NAME))
            started = time.monotonic()
            report = retrain(store, models, [DATA / f for f in BASE_FILES], config, profile=prior)
            seconds = time.monotonic() - started
        finally:
            store.close()
        start = load_scorer(models.path("v0001"), prior)
        candidate = load_scorer(models.path(report.version), prior)
        served = load_scorer(models.path(models.current() or "v0001"), prior)
        n = args.bootstrap
        held, base = report.comparisons
        out = {
            "seed": seed,
            "mode": mode,
            "promoted": report.promoted,
            "reasons": report.reasons,
            "retrain_seconds": round(seconds, 1),
            "labels": report.labels,
            "gate_held_out": asdict(held),
            "gate_base_slice": asdict(base),
            "report_candidate": asdict(
                compare("report", report_rows, start, candidate, n_bootstrap=n, seed=seed)
            ),
            "report_served": asdict(
                compare("report", report_rows, start, served, n_bootstrap=n, seed=seed)
            ),
            "profile": report.extra["candidate"]["profile"],
        }
    return out


def _fmt(c: dict[str, Any]) -> str:
    return (
        f"{c['current']:.3f} -> {c['candidate']:.3f}  {c['diff']:+.3f} "
        f"[{c['diff_low']:+.3f}, {c['diff_high']:+.3f}]"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the replay; print a table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--feedback", type=int, default=1000)
    parser.add_argument("--gate", type=int, default=500)
    parser.add_argument("--bootstrap", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    started = time.monotonic()
    rows = load_routing_rows(DATA / FILE)
    prior = load_profile(PROFILE)
    runs = []
    head = f"{'seed':>4} {'mode':12} {'gate held-out (trusted)':38} "
    print(head + f"{'report rows (file labels), candidate':40} promoted")
    for seed in args.seeds:
        for mode in MODES:
            run = one_run(rows, prior, seed, mode, args)
            runs.append(run)
            print(
                f"{seed:>4} {mode:12} {_fmt(run['gate_held_out']):38} "
                f"{_fmt(run['report_candidate']):40} {run['promoted']}",
                flush=True,
            )
    summary = {
        mode: {
            "promoted": sum(r["promoted"] for r in runs if r["mode"] == mode),
            "runs": sum(r["mode"] == mode for r in runs),
            "report_served_diff_mean": round(
                float(np.mean([r["report_served"]["diff"] for r in runs if r["mode"] == mode])), 4
            ),
        }
        for mode in MODES
    }
    result = {
        "data": FILE,
        "configured_profile": str(PROFILE.relative_to(ROOT)),
        "model": DEFAULT_MODEL_NAME,
        "feedback_rows": args.feedback,
        "gate_rows": args.gate,
        "report_rows": len(rows) - args.feedback - args.gate,
        "bootstrap": args.bootstrap,
        "gate": asdict(GateConfig()),
        "summary": summary,
        "runs": runs,
        "seconds": round(time.monotonic() - started, 1),
        "cpu": os.cpu_count(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"summary {summary}")
    print(f"wrote {args.out} in {result['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
