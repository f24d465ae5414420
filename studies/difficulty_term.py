"""A per-prompt difficulty term over the encoder's vectors, on top of router-v9's score.

router-v9's score reads only the capability gap (:class:`router.classifier.GapRouting`), so
within a capability every prompt scores alike; issue #16 asks for learned per-prompt terms
"where the data supports it". Word terms lowered held-out APGR (docs/model-card.md, router-v4);
this study asks the same of the vectors the proxy already computes: the static table's three
pools (``static``), the MiniLM encoder's head and tail pools (``encoder``), or both (``all``).

Each candidate is an L2-penalised logistic head over the standardised vectors, fitted with
router-v9's in-fold gap logit as a fixed offset and one unpenalised intercept per prompt set
(the materially-better target and weights of :func:`router.training.routing_target`). Each
prompt set is held out in turn, as in the model card; within a fold the penalty is chosen from
:data:`PENALTIES` (``inf``: no term, router-v9 itself) by the mean APGR of the other sets,
each held out in turn (nested). Per file: APGR and CPT(50%) with 95% paired bootstrap
intervals against router-v9's leave-one-source-out score, which this study rebuilds first
(its figures must equal the card's).

The rule, written down with the study: a term ships only if no file's APGR interval lies wholly
below zero and at least one lies wholly above. As a diagnostic of whether the vectors carry
the signal at all, ``in_distribution`` repeats the ``all`` head with each file's own prompts
in training (5 folds by prompt, so the two MMLU-Pro files' shared prompts leave together) at
every penalty: a gain there and none held out says the signal does not transfer::

    python -m studies.difficulty_term

Needs the encoder's weights (``make model``); the vectors come from ``studies/.cache`` (shared
with :mod:`studies.router_v9`, about 7 minutes to fill). Writes
``studies/results/difficulty_term.json``; about 7 minutes with a full cache.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize

from router.classifier import ServedCapability, gap_logit
from router.training import (
    DataFormatError,
    crossfit_local_accuracy,
    fit_gap_routing,
    load_routing_rows,
    routing_target,
)
from studies.router_v5 import MODELS
from studies.router_v9 import _encoder_head, readers, store_for
from studies.score_v4 import DATA, ROUTING_FILES, _metrics, paired_per_file

RESULTS = MODELS.parent / "studies" / "results" / "difficulty_term.json"
PENALTIES = (300.0, 3000.0, 30000.0, 300000.0, math.inf)
SCORE = "capability-v5"  # the capability model router-v9's score reads
ENCODER = "capability-v4"  # the encoder head whose vectors (static + encoder pools) are read
FOLDS = 5

F = NDArray[np.float64]


def fit_offset_logistic(
    x: F, offset: F, y: F, w: F, groups: Sequence[str], *, penalty: float
) -> tuple[F, dict[str, float]]:
    """Weighted logistic regression of ``y`` on ``x`` with ``offset`` fixed in the logit,
    ``penalty`` times half the squared norm on the slopes and one free intercept per group."""
    names = sorted(set(groups))
    g = np.array([[grp == n for n in names] for grp in groups], dtype=np.float64)
    a = np.hstack([x, g])
    p = x.shape[1]

    def loss(b: F) -> tuple[float, F]:
        t = offset + a @ b
        value = float((w * (np.logaddexp(0.0, t) - y * t)).sum() + 0.5 * penalty * b[:p] @ b[:p])
        grad = a.T @ (w * (1.0 / (1.0 + np.exp(-t)) - y))
        grad[:p] += penalty * b[:p]
        return value, grad

    b = minimize(loss, np.zeros(a.shape[1]), jac=True, method="L-BFGS-B").x
    return b[:p], dict(zip(names, b[p:].tolist(), strict=True))


class Study:
    """The routing rows, router-v9's capability probabilities and the prompt vectors."""

    def __init__(self) -> None:
        self.rows = [r for f in ROUTING_FILES for r in load_routing_rows(DATA / f)]
        reader = readers()[SCORE]
        self.capability = ServedCapability(reader).fit()
        prompts = [r.prompt for r in self.rows]
        self.q = self.capability.predict_proba(prompts)
        reader.save()
        encoder = _encoder_head(MODELS / ENCODER)
        store = store_for(encoder, {})
        vectors = np.vstack([store.vector(p) for p in prompts]).astype(np.float64)
        store.save()
        d = 3 * encoder.embedding.dims
        self.parts = {"static": vectors[:, :d], "encoder": vectors[:, d:], "all": vectors}
        y, w = routing_target(self.rows)
        self.y, self.w = y.astype(np.float64), w
        self.sets = np.array([r.prompt_set for r in self.rows])
        self.files = np.array([r.dataset for r in self.rows])
        self.local = crossfit_local_accuracy(self.rows, self.q)

    def gap_logits(self, train: NDArray[np.bool_]) -> F:
        """router-v9's gap logit for every row, its head fitted on the ``train`` rows (zero when
        those rows cannot back a score: the head refuses an inverted gap)."""
        try:
            model = fit_gap_routing(
                [r for r, m in zip(self.rows, train, strict=True) if m], self.capability
            )
        except DataFormatError:
            return np.zeros(len(self.rows))
        out: F = model.slope_ * gap_logit(self.q, model.strong_, self.local)
        return out

    def with_term(self, x: F, z: F, train: NDArray[np.bool_], penalty: float) -> F:
        """``z`` plus the head fitted on the ``train`` rows, for every row."""
        if math.isinf(penalty):
            return z
        beta, _ = fit_offset_logistic(
            x[train],
            z[train],
            self.y[train],
            self.w[train],
            self.sets[train].tolist(),
            penalty=penalty,
        )
        out: F = z + x @ beta
        return out

    def apgr(self, s: F, mask: NDArray[np.bool_]) -> list[float]:
        """APGR of ``s`` within each labelled file among the ``mask`` rows."""
        out = []
        for name in sorted(set(self.files[mask].tolist())):
            idx = np.flatnonzero(mask & (self.files == name))
            out.append(_metrics(s[idx], [self.rows[i] for i in idx])[0])
        return out


def standardise(x: F, train: NDArray[np.bool_]) -> F:
    """``x`` centred and scaled by the ``train`` rows' mean and deviation."""
    out: F = (x - x[train].mean(0)) / (x[train].std(0) + 1e-6)
    return out


def held_out(study: Study) -> tuple[F, dict[str, F], dict[str, Any]]:
    """Leave-one-prompt-set-out scores: router-v9's and each candidate's (penalty nested)."""
    n = len(study.rows)
    base = np.zeros(n)
    cand = {name: np.zeros(n) for name in study.parts}
    chosen: dict[str, Any] = {}
    for held in sorted(set(study.sets.tolist())):
        test = study.sets == held
        train = ~test
        z = study.gap_logits(train)
        base[test] = z[test]
        inner_z = {h: study.gap_logits(train & (study.sets != h)) for h in set(study.sets[train])}
        for name, raw in study.parts.items():
            x = standardise(raw, train)
            inner = {}
            for penalty in PENALTIES:
                values: list[float] = []
                for h, zh in sorted(inner_z.items()):
                    fit_rows = train & (study.sets != h)
                    s = study.with_term(x, zh, fit_rows, penalty)
                    values += study.apgr(s, study.sets == h)
                inner[penalty] = float(np.mean(values))
            best = max(inner, key=lambda k: inner[k])
            cand[name][test] = study.with_term(x, z, train, best)[test]
            chosen[f"{held}/{name}"] = {
                "penalty": best,
                "inner_apgr": {str(k): v for k, v in inner.items()},
            }
            print(
                f"{held:12s} {name:8s} penalty {best:g}  inner {inner}", file=sys.stderr, flush=True
            )
    return base, cand, chosen


def in_distribution(study: Study) -> dict[str, Any]:
    """The ``all`` head with every file's own prompts in training: 5 folds by prompt text,
    router-v9's head refitted per fold too; per file the APGR of each penalty against none."""
    x_raw = study.parts["all"]
    prompts = sorted({r.prompt for r in study.rows})
    fold_of = dict(
        zip(
            prompts, np.random.default_rng(0).integers(0, FOLDS, len(prompts)).tolist(), strict=True
        )
    )
    fold = np.array([fold_of[r.prompt] for r in study.rows])
    scores = {p: np.zeros(len(study.rows)) for p in PENALTIES}
    for k in range(FOLDS):
        test = fold == k
        z = study.gap_logits(~test)
        x = standardise(x_raw, ~test)
        for penalty in PENALTIES:
            scores[penalty][test] = study.with_term(x, z, ~test, penalty)[test]
        print(f"in distribution: fold {k + 1} of {FOLDS}", file=sys.stderr, flush=True)
    return {
        str(p): paired_per_file(s, scores[math.inf], study.rows)
        for p, s in scores.items()
        if not math.isinf(p)
    }


def ships(per_file: dict[str, Any]) -> bool:
    """No APGR interval wholly below zero, at least one wholly above."""
    cis = [m["apgr_diff_ci"] for m in per_file.values()]
    return all(hi >= 0.0 for _, hi in cis) and any(lo > 0.0 for lo, _ in cis)


def _print(label: str, per_file: dict[str, Any]) -> None:
    for d, m in per_file.items():
        lo, hi = m["apgr_diff_ci"]
        print(
            f"{label} {d:40s} n {m['n']:5d} APGR {m['apgr']:.3f} against "
            f"{m['apgr_baseline']:.3f} diff [{lo:+.3f}, {hi:+.3f}]"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study; see the module docstring."""
    argparse.ArgumentParser(prog="python -m studies.difficulty_term").parse_args(argv)
    study = Study()
    base, cand, chosen = held_out(study)
    per_candidate = {name: paired_per_file(s, base, study.rows) for name, s in cand.items()}
    results: dict[str, Any] = {
        "baseline": "router-v9 (its gap head refitted without each held-out prompt set)",
        "penalties": [str(p) for p in PENALTIES],
        "leave_one_source_out": per_candidate,
        "ships": {name: ships(pf) for name, pf in per_candidate.items()},
        "chosen": chosen,
        "in_distribution": in_distribution(study),
    }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    for name, pf in per_candidate.items():
        _print(name, pf)
        print(f"{name}: ships {results['ships'][name]}")
    for p, pf in results["in_distribution"].items():
        _print(f"in distribution, penalty {p}:", pf)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
