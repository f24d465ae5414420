"""Profile scale: does a profile estimated from labelled rows route better than a declared one?

The shipped router reads ``local_c`` from the local profile beside ``strong_c``, the strong model's
accuracy per capability fitted on the labelled files. Published figures come from easier
benchmarks than those files, so a declared profile sits on another scale: Mixtral's GSM8K figure
(0.744) makes a maths prompt score lowest of all capabilities, where the gap is largest. This
study keeps the shipped router fixed (its head is not refitted) and compares, per weak model
we hold labels for, three local profiles on each held-out file:

* **estimated**: :func:`router.profiler.profile_from_labels` over rows the file never lends a
  label to. Mixtral (RouteLLM MMLU and GSM8K, Arena-Bench): leave one file out, the profile from
  the other two. Llama-3.1-8B and Mistral-7B (one MMLU-Pro file each): 5-fold cross-fitted, each
  row scored by the profile of the other four folds;
* **declared**: the published figures (``models/profiles/``: Mixtral's ``*.published.yaml``,
  Llama's and Mistral's default files);
* **default**: the bundled SmolLM2-135M's measured profile, what an unconfigured proxy reads.

Per file: APGR and CPT(50%) with 95% paired bootstrap intervals (1,000 resamples) of estimated
minus declared and estimated minus default. Then the "pure" score per capability (``q`` one-hot)
under each model's full estimated profile (all its files), the declared and the default one, so
an inversion (a capability with a large gap scored low) shows. The router was fitted on these
files, so its ``strong_c``, slope and intercept have seen every held-out label: the comparison
is between profiles under one fixed head, not a held-out score of the router. AlpacaEval has no
profile to estimate (its weak model has no other labels) and is not used.

    python -m studies.profile_scale

Writes ``studies/results/profile_scale.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from router import metrics
from router.artifact import DEFAULT_MODEL_NAME, load_scorer
from router.profile import LocalProfile, default_profile, load_profile
from router.profiler import profile_from_labels
from router.serving import ProfileScorer, gap_logit, logistic, profile_vector
from router.training import RoutingRow, load_routing_rows

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
PROFILES = ROOT / "models" / "profiles"
RESULTS = ROOT / "studies" / "results" / "profile_scale.json"
ROUTER = ROOT / "models" / DEFAULT_MODEL_NAME
BOOT = 1000
FOLDS = 5

#: Each weak model: its labelled files and its declared (published) profile.
MODELS: dict[str, tuple[tuple[str, ...], str]] = {
    "Mixtral-8x7B-Instruct-v0.1": (
        (
            "routellm_mmlu_mixtral_vs_gpt4turbo.jsonl",
            "routellm_gsm8k_mixtral_vs_gpt4turbo.jsonl",
            "arenabench_v1_mixtral_vs_gpt4turbo.jsonl",
        ),
        "Mixtral-8x7B-Instruct-v0.1.published.yaml",
    ),
    "Meta-Llama-3.1-8B-Instruct": (
        ("mmlupro_llama31_8b_vs_gpt4o.jsonl",),
        "Llama-3.1-8B-Instruct.yaml",
    ),
    "Mistral-7B-Instruct-v0.2": (
        ("mmlupro_mistral7b_vs_gpt4o.jsonl",),
        "Mistral-7B-Instruct-v0.2.yaml",
    ),
}


#: The estimated profile shipped for each model; the study checks it is the full estimate.
SHIPPED = {
    "Mixtral-8x7B-Instruct-v0.1": "Mixtral-8x7B-Instruct-v0.1.yaml",
    "Meta-Llama-3.1-8B-Instruct": "Llama-3.1-8B-Instruct.estimated.yaml",
    "Mistral-7B-Instruct-v0.2": "Mistral-7B-Instruct-v0.2.estimated.yaml",
}


class Head:
    """The router's score for rows whose probabilities and local profiles are given."""

    def __init__(self, scorer: ProfileScorer) -> None:
        self.capability = scorer.capability
        self.names = tuple(scorer.capability.capabilities)
        self.strong = np.asarray(scorer.head["gap_strong"], dtype=np.float64)
        self.slope = float(scorer.head["gap_slope"])
        self.intercept = float(scorer.head["intercept"])

    def scores(self, q: np.ndarray, local: np.ndarray) -> np.ndarray:
        out: np.ndarray = logistic(self.intercept + self.slope * gap_logit(q, self.strong, local))
        return out

    def vector(self, profile: LocalProfile) -> np.ndarray:
        return profile_vector(profile, self.names)


def estimate(rows: Sequence[RoutingRow], q: np.ndarray, names: Sequence[str]) -> LocalProfile:
    """The profile ``tiergate profile --from-labels`` writes for these rows."""
    return profile_from_labels([r.weak_score for r in rows], q, names, model="estimated")


def held_out_profiles(
    files: dict[str, list[RoutingRow]], q: dict[str, np.ndarray], head: Head
) -> dict[str, np.ndarray]:
    """Per file, each row's estimated local profile, from labels that file's row never lends:
    the other files of the model, or (one file) the other folds."""
    out = {}
    for name, rows in files.items():
        others = [f for f in files if f != name]
        if others:
            train = [r for f in others for r in files[f]]
            prof = estimate(train, np.vstack([q[f] for f in others]), head.names)
            out[name] = np.tile(head.vector(prof), (len(rows), 1))
            continue
        fold = np.random.default_rng(0).integers(0, FOLDS, len(rows))
        local = np.zeros((len(rows), len(head.names)))
        for k in range(FOLDS):
            tr = np.flatnonzero(fold != k)
            prof = estimate([rows[i] for i in tr], q[name][tr], head.names)
            local[fold == k] = head.vector(prof)
        out[name] = local
    return out


def paired(a: np.ndarray, b: np.ndarray, rows: Sequence[RoutingRow]) -> dict[str, Any]:
    """APGR and CPT(50%) of ``a`` and ``b``, with the paired bootstrap interval of ``a - b``."""
    weak = [r.weak_score for r in rows]
    strong = [r.strong_score for r in rows]
    return metrics.paired(a, b, weak, strong, n_bootstrap=BOOT, seed=0)


def pure_scores(head: Head, profiles: dict[str, LocalProfile]) -> dict[str, dict[str, float]]:
    """Each profile's score for a prompt that is wholly one capability."""
    eye = np.eye(len(head.names))
    return {
        label: dict(
            zip(head.names, map(float, head.scores(eye, head.vector(p)[None, :])), strict=True)
        )
        for label, p in profiles.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; see the module docstring."""
    argparse.ArgumentParser(prog="python -m studies.profile_scale").parse_args(argv)
    scorer = load_scorer(ROUTER)
    assert isinstance(scorer, ProfileScorer)
    head = Head(scorer)
    default = default_profile()
    memo: dict[str, np.ndarray] = {}

    def probabilities(rows: Sequence[RoutingRow]) -> np.ndarray:
        for r in rows:
            if r.prompt not in memo:
                memo[r.prompt] = head.capability.probabilities(r.prompt)
        return np.array([memo[r.prompt] for r in rows])

    results: dict[str, Any] = {
        "router": ROUTER.name,
        "capability_model": head.capability.version,
        "default_profile": default.model,
        "bootstrap": BOOT,
        "files": {},
        "profiles": {},
        "pure_scores": {},
        "shipped": {},
    }
    for model, (names, declared_file) in MODELS.items():
        print(f"{model}: profiles and bootstrap ...", file=sys.stderr, flush=True)
        files = {Path(f).stem: load_routing_rows(DATA / f) for f in names}
        q = {f: probabilities(rows) for f, rows in files.items()}
        declared = load_profile(PROFILES / declared_file)
        held = held_out_profiles(files, q, head)
        for name, rows in files.items():
            est = head.scores(q[name], held[name])
            dec = head.scores(q[name], head.vector(declared))
            dft = head.scores(q[name], head.vector(default))
            results["files"][name] = {
                "weak_model": model,
                "n": len(rows),
                "estimated_from": "other files" if len(files) > 1 else f"{FOLDS}-fold cross-fit",
                "vs_declared": paired(est, dec, rows),
                "vs_default": paired(est, dft, rows),
            }
        full = estimate(
            [r for rows in files.values() for r in rows], np.vstack(list(q.values())), head.names
        )
        results["profiles"][model] = {
            "estimated (all files)": {c: full.accuracy(c) for c in head.names},
            "declared": {c: declared.accuracy(c) for c in head.names},
        }
        shipped = load_profile(PROFILES / SHIPPED[model])
        results["shipped"][SHIPPED[model]] = bool(
            np.allclose(head.vector(shipped), head.vector(full), atol=1e-4)
        )
        results["pure_scores"][model] = pure_scores(head, {"estimated": full, "declared": declared})
    results["pure_scores"]["default"] = pure_scores(head, {"default": default})["default"]
    results["strong"] = dict(zip(head.names, map(float, head.strong), strict=True))
    results["no_worse"] = {
        name: f["vs_declared"]["apgr_diff_ci"][1] >= 0.0 for name, f in results["files"].items()
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    return 0


def _ci(pair: Sequence[float]) -> str:
    return f"[{pair[0]:+.3f}, {pair[1]:+.3f}]"


def _metric_table(r: dict[str, Any], key: str, title: str) -> None:
    print(f"| file | n | {title} est. | declared | diff 95% CI | default | diff 95% CI |")
    print("| --- | ---: | ---: | ---: | --- | ---: | --- |")
    for name, f in r["files"].items():
        d, b = f["vs_declared"], f["vs_default"]
        print(
            f"| {name} | {f['n']} | {d[key]:.3f} | {d[key + '_baseline']:.3f} | "
            f"{_ci(d[key + '_diff_ci'])} | {b[key + '_baseline']:.3f} | "
            f"{_ci(b[key + '_diff_ci'])} |"
        )
    print()


def report(r: dict[str, Any]) -> None:
    """The study's tables, as the model card quotes them."""
    _metric_table(r, "apgr", "APGR")
    _metric_table(r, "cpt50", "CPT(50%)")
    names = list(r["strong"])
    print("| profile | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    strong = " | ".join(f"{r['strong'][c]:.2f}" for c in names)
    print(f"| strong_c ({ROUTER.name}) | {strong} |")
    for model, by in r["pure_scores"].items():
        rows = {"default": by} if model == "default" else by
        for label, scores in rows.items():
            where = label if model == "default" else f"{model} {label}"
            print(f"| {where} | " + " | ".join(f"{scores[c]:.3f}" for c in names) + " |")
    print()
    for model, by in r["profiles"].items():
        for label, acc in by.items():
            print(f"{model} {label}: " + ", ".join(f"{c} {acc[c]:.2f}" for c in names))
    print(f"no worse than declared (APGR interval not wholly below zero): {r['no_worse']}")
    print(f"shipped estimated profiles equal the full estimate: {r['shipped']}")


if __name__ == "__main__":
    raise SystemExit(main())
