"""How much can any learner gain on the AlpacaEval replay from a few hundred labels?

``studies.learning_loop`` replays AlpacaEval as traffic and retrains on its labels. This study
trains instead on the traffic prompts' *true* file labels (noiseless, one per prompt), which
the loop's noisy, partly held-out labels can only teach less: an upper bound on what the loop
could reach. It fits each learner family over a grid of its regularisation knob: the residual
over the base model (what ``tiergate retrain`` fits), logistic heads over dense views of the
prompt (with or without their own TF-IDF), ridge on the label, gradient boosting, and kNN.

Each family is scored by repeated 5-fold CV on the traffic prompts and by one fit scored on the
evaluation slice (paired bootstrap against the base model), at its best grid point chosen after
the fact: that flatters every learner, as an upper bound should. AlpacaEval is CC BY-NC:
nothing fitted here is kept.

    .venv/bin/python -m studies.learning_ceiling   # writes studies/results/learning_ceiling.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.neighbors import KNeighborsRegressor

from router.artifact import load_fitted
from router.metrics import apgr_from_curve, routing_curve
from router.residual import fit_residual
from router.retrain import BASE_FILES, bucket
from router.training import TFIDF_MODEL_NAME, RoutingRow, load_routing_rows

ROOT = Path(__file__).resolve().parent.parent

ALPACA = "alpacaeval2_openhermes7b_vs_gpt4turbo.jsonl"
#: fit(train index, test index) -> scores of the test rows (higher = send closed)
Fitter = Callable[[np.ndarray[Any, Any], np.ndarray[Any, Any]], np.ndarray[Any, Any]]


def soft_logistic(train: Any, v: np.ndarray[Any, Any], c: float) -> LogisticRegression:
    """Logistic regression on a soft target: each row as both classes, weighted v and 1 - v."""
    stacked = sp.vstack([train, train]) if sp.issparse(train) else np.vstack([train, train])
    y = np.r_[np.ones(len(v)), np.zeros(len(v))]
    model = LogisticRegression(C=c, max_iter=3000)
    model.fit(stacked, y, sample_weight=np.r_[v, 1.0 - v])
    return model


class Study:
    """Features of every AlpacaEval row under router-v3, and the learner families over them."""

    def __init__(self, rows: list[RoutingRow], base_prompts: list[str]) -> None:
        self.rows = rows
        self.prompts = np.array([r.prompt for r in rows], dtype=object)
        self.weak = np.array([r.weak_score for r in rows])
        self.strong = np.array([r.strong_score for r in rows])
        self.v = np.clip(self.strong - self.weak, 0.0, 1.0)
        self.scorer = load_fitted(ROOT / "models" / TFIDF_MODEL_NAME)
        self.shipped = np.array([self.scorer.score(p) for p in self.prompts])
        routing = self.scorer.routing
        view = routing.linear_view()
        x, probs = routing.view(list(self.prompts))
        x = sp.csr_matrix(x)
        assert probs is not None and view.cap_coef is not None, "router-v3 reads capabilities"
        z0 = np.asarray(x @ view.coef).ravel() + view.intercept + probs @ view.cap_coef
        structure = x[:, view.n_words :].toarray()
        self.words = x[:, : view.n_words]
        self.dense = {
            "structure + base logit": np.hstack([structure, z0[:, None]]),
            "capability probabilities": probs,
            "structure + capability": np.hstack([structure, probs]),
            "structure + base logit + capability": np.hstack([structure, z0[:, None], probs]),
        }
        self.base_prompts = base_prompts

    def families(self) -> dict[str, dict[str, Fitter]]:
        """{family: {grid point: fitter}}."""
        v, dense = self.v, self.dense
        full = dense["structure + base logit + capability"]
        out: dict[str, dict[str, Fitter]] = {}

        def residual(tr: Any, te: Any) -> Any:
            model, _ = fit_residual(
                self.scorer.routing, list(self.prompts[tr]), list(v[tr]), self.base_prompts
            )
            return model.decision_function(list(self.prompts[te]))

        out["residual (shipped design, inner CV)"] = {"inner CV": residual}
        for name, feats in dense.items():
            out[f"head: {name}"] = {
                f"C={c:g}": (
                    lambda tr, te, f=feats, c=c: soft_logistic(f[tr], v[tr], c).decision_function(
                        f[te]
                    )
                )
                for c in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
            }
        for analyzer, ngrams in (("word", (1, 2)), ("char_wb", (3, 4))):

            def own_tfidf(tr: Any, te: Any, c: float, a: str = analyzer, n: Any = ngrams) -> Any:
                vec = TfidfVectorizer(
                    analyzer=a, ngram_range=n, min_df=2, sublinear_tf=True, max_features=20000
                )
                train = sp.hstack([sp.csr_matrix(full[tr]), vec.fit_transform(self.prompts[tr])])
                test = sp.hstack([sp.csr_matrix(full[te]), vec.transform(self.prompts[te])])
                return soft_logistic(train.tocsr(), v[tr], c).decision_function(test.tocsr())

            out[f"head + own {analyzer} TF-IDF {ngrams}"] = {
                f"C={c:g}": (lambda tr, te, c=c, fn=own_tfidf: fn(tr, te, c))
                for c in (0.1, 0.3, 1.0)
            }
        out["ridge on the label"] = {
            f"alpha={a:g}": (
                lambda tr, te, a=a: -Ridge(alpha=a).fit(full[tr], 1.0 - v[tr]).predict(full[te])
            )
            for a in (1, 10, 100, 1000)
        }
        struct_cap = dense["structure + capability"]
        out["gradient boosting"] = {
            f"depth={d}": (
                lambda tr, te, d=d: (
                    HistGradientBoostingRegressor(
                        max_depth=d, learning_rate=0.05, max_iter=100, min_samples_leaf=20
                    )
                    .fit(struct_cap[tr], v[tr])
                    .predict(struct_cap[te])
                )
            )
            for d in (2, 3)
        }
        out["kNN over words"] = {f"k={k}": self.knn(k) for k in (10, 30, 60)}
        return out

    def knn(self, k: int) -> Fitter:
        """k nearest neighbours (cosine, distance-weighted) over the capability model's words."""

        def fit(tr: Any, te: Any) -> Any:
            model = KNeighborsRegressor(n_neighbors=k, metric="cosine", weights="distance")
            return model.fit(self.words[tr], self.v[tr]).predict(self.words[te])

        return fit

    def apgr(self, scores: np.ndarray[Any, Any], idx: np.ndarray[Any, Any]) -> float:
        """APGR of ``scores`` (one per row of ``idx``, in its order) on the rows ``idx``."""
        weak, strong = self.weak[idx], self.strong[idx]
        curve = routing_curve(scores, weak, strong)
        return apgr_from_curve(curve, float(weak.mean()), float(strong.mean()))

    def cv(
        self, fit: Fitter, idx: np.ndarray[Any, Any], repeats: int, folds: int = 5
    ) -> list[float]:
        """Out-of-fold APGR over ``idx``, once per repeat of a shuffled K-fold split."""
        out = []
        for rep in range(repeats):
            fold = np.random.default_rng(rep).permutation(len(idx)) % folds
            pred = np.zeros(len(idx))
            for k in range(folds):
                pred[fold == k] = fit(idx[fold != k], idx[fold == k])
            out.append(self.apgr(pred, idx))
        return out

    def paired(
        self, scores: np.ndarray[Any, Any], idx: np.ndarray[Any, Any], n_boot: int
    ) -> dict[str, float]:
        """Candidate minus router-v3 APGR on ``idx``, with a paired 95% bootstrap."""
        rng = np.random.default_rng(0)
        diffs = []
        for _ in range(n_boot):
            b = idx[rng.integers(0, len(idx), len(idx))]
            pos = np.searchsorted(idx, b)
            diffs.append(self.apgr(scores[pos], b) - self.apgr(self.shipped[b], b))
        lo, hi = np.nanpercentile(diffs, [2.5, 97.5])
        return {
            "apgr": round(self.apgr(scores, idx), 4),
            "diff": round(self.apgr(scores, idx) - self.apgr(self.shipped[idx], idx), 4),
            "diff_low": round(float(lo), 4),
            "diff_high": round(float(hi), 4),
        }


def other_weak_models(
    study: Study, path: Path, traffic: np.ndarray[Any, Any]
) -> dict[str, dict[str, float]]:
    """The same CV bound for every other weak model the file labels (``alt_weak_scores``, the
    same judge; ``strong = 1 - weak``), with the head over structure + base logit + capability
    at its best C. Models without a label on every row, or not weaker than GPT-4-Turbo by at
    least 0.1 on average, are skipped. Leaves ``study`` on the file's own labels."""
    with path.open(encoding="utf-8") as fh:
        raw = [json.loads(line) for line in fh if line.strip()]
    own = (study.weak, study.strong, study.v)
    feats = study.dense["structure + base logit + capability"]
    out = {}
    for name in raw[0].get("alt_weak_scores") or {}:
        values = [(r.get("alt_weak_scores") or {}).get(name) for r in raw]
        if any(x is None for x in values) or np.mean(values) > 0.45:
            continue
        study.weak = np.array(values, dtype=np.float64)
        study.strong = 1.0 - study.weak
        study.v = np.clip(study.strong - study.weak, 0.0, 1.0)
        base = study.apgr(study.shipped[traffic], traffic)
        best = max(
            float(
                np.mean(
                    study.cv(
                        lambda tr, te, c=c: soft_logistic(
                            feats[tr], study.v[tr], c
                        ).decision_function(feats[te]),
                        traffic,
                        4,
                    )
                )
            )
            for c in (0.01, 0.1, 1.0)
        )
        out[name] = {
            "weak_mean": round(float(study.weak.mean()), 4),
            "router_v3": round(base, 4),
            "best_cv": round(best, 4),
            "gain": round(best - base, 4),
        }
        print(f"  other weak model {name:40} CV gain {best - base:+.3f}", flush=True)
    study.weak, study.strong, study.v = own
    return out


def main() -> int:
    """Run the study; print a table and write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "studies" / "results" / "learning_ceiling.json"
    )
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--bootstrap", type=int, default=1000)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    started = time.monotonic()
    rows = load_routing_rows(args.data_dir / ALPACA)
    # The same split as studies/learning_loop.py.
    traffic = np.array([i for i, r in enumerate(rows) if bucket(r.id, "sim-eval") >= 0.25])
    evaluation = np.array([i for i, r in enumerate(rows) if bucket(r.id, "sim-eval") < 0.25])
    base = [r for name in BASE_FILES for r in load_routing_rows(args.data_dir / name)]
    # The retrain's domain-gate sample (GateConfig.gate_base_sample, the same hash order).
    base_prompts = [r.prompt for r in sorted(base, key=lambda r: bucket(r.id, "gate"))[:3000]]
    study = Study(rows, base_prompts)
    result: dict[str, Any] = {
        "data": ALPACA,
        "labels": "true file labels, noiseless (an upper bound on the loop's labels)",
        "traffic_rows": len(traffic),
        "evaluation_rows": len(evaluation),
        "oracle": {
            "traffic": round(study.apgr(study.v[traffic], traffic), 4),
            "evaluation": round(study.apgr(study.v[evaluation], evaluation), 4),
        },
        "router_v3": {
            "traffic": round(study.apgr(study.shipped[traffic], traffic), 4),
            "evaluation": round(study.apgr(study.shipped[evaluation], evaluation), 4),
        },
        "goal": "+0.05 APGR on the evaluation slice after at most 500 labels",
        "families": {},
    }
    print(
        f"router-v3: traffic {result['router_v3']['traffic']:.3f}, evaluation slice "
        f"{result['router_v3']['evaluation']:.3f}; oracle {result['oracle']['evaluation']:.3f}"
    )
    print(f"{'family':52} {'best CV':>8} {'gain':>7}  {'eval slice':>10} {'gain [95% CI]':>24}")
    for family, grid in study.families().items():
        repeats = max(1, args.repeats // 2) if family.startswith("residual") else args.repeats
        points = {}
        for point, fit in grid.items():
            cv = study.cv(fit, traffic, repeats)
            once = study.paired(fit(traffic, evaluation), evaluation, args.bootstrap)
            points[point] = {"cv_mean": round(float(np.mean(cv)), 4), "cv_runs": cv, **once}
        best_cv = max(points, key=lambda p: points[p]["cv_mean"])
        best_eval = max(points, key=lambda p: points[p]["apgr"])
        result["families"][family] = {
            "points": points,
            "best_cv_point": best_cv,
            "best_eval_point": best_eval,
        }
        b, e = points[best_cv], points[best_eval]
        print(
            f"{family:52} {b['cv_mean']:8.3f} {b['cv_mean'] - result['router_v3']['traffic']:+7.3f}"
            f"  {e['apgr']:10.3f} {e['diff']:+7.3f} [{e['diff_low']:+.3f}, {e['diff_high']:+.3f}]",
            flush=True,
        )
    # Does kNN, the slice's best, gain with more data? CV over the whole file (up to 607 rows).
    everything = np.arange(len(rows))
    result["knn_whole_file"] = {
        "router_v3": round(study.apgr(study.shipped, everything), 4),
        "cv_mean": {
            f"folds={folds},k={k}": round(
                float(np.mean(study.cv(study.knn(k), everything, args.repeats, folds))), 4
            )
            for folds in (5, 20)
            for k in (10, 30)
        },
    }
    print(f"kNN CV over all {len(rows)} rows: {result['knn_whole_file']}")
    result["other_weak_models"] = other_weak_models(study, args.data_dir / ALPACA, traffic)
    result["seconds"] = round(time.monotonic() - started, 1)
    result["cpu"] = os.cpu_count()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out} in {result['seconds']:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
