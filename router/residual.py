"""A routing classifier adapted to logged traffic: the base model, a traffic head, a domain gate.

Refitting one linear model on base data plus a few hundred outcomes moves the base prompts'
scores too (docs/learning-loop.md). :class:`ResidualRouting` keeps the base model and adds a
correction only where the traffic lives, all three rows linear in the base model's view of the
prompt (:meth:`~router.classifier.PromptClassifier.view`)::

    z(x) = z0 + sigmoid(gate) * (head - shift - z0)

``z0`` is the base logit; the **gate** separates logged prompts from base prompts (no labels);
the **head** is fitted on the labelled outcomes (soft targets, L2 strength and word weight by
cross-validation); ``shift`` keeps the traffic's level against base prompts, so the calibrated
threshold stays valid. Its serving form is the base model's with three routing rows
(:func:`router.serving.residual_logit`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.utils.validation import check_is_fitted

from router.classifier import LinearView, PromptClassifier
from router.errors import ConfigError
from router.serving import logistic, residual_logit

FloatArray = NDArray[np.float64]

#: L2 strengths (1/C) tried for the traffic head; the inner cross-validation picks one.
HEAD_LAMBDAS: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)
#: Multipliers on the head's word (TF-IDF) block, tried jointly with the L2 strength: 0 leaves
#: words out; larger values regularise words less relative to the structure features.
WORD_SCALES: tuple[float, ...] = (0.0, 3.0, 10.0)
#: Inverse L2 strength of the domain gate (traffic vs base prompts).
GATE_C = 10.0


class ResidualRouting(PromptClassifier):
    """The base routing classifier plus a traffic head mixed in by a domain gate.

    Built by :func:`fit_residual`, not by ``fit``. Fitted state: ``base_`` (the base
    :class:`PromptClassifier` or :class:`~router.classifier.CapabilityRouting`, whose fitted
    parts this one shares), ``coef3_``/``intercept3_`` (base, gate and head rows over the base's
    :meth:`~router.classifier.PromptClassifier.view`), ``cap3_`` (their coefficients on the
    capability probabilities, or None when the base reads none), ``shift_``, ``head_lambda_``.
    Its score is not one linear row: its serving form has three routing rows
    (:meth:`serving_head`); tests/test_residual.py pins the scorers, the proxy's included, to
    ``predict_proba``.

    base: the base model (set by :func:`fit_residual`).
    """

    base: PromptClassifier | None = None  # what a model pickled before this parameter reads
    cap3_: FloatArray | None = None  # likewise: models pickled before had no capability rows

    def __init__(self, *, base: PromptClassifier | None = None) -> None:
        self.base = base

    def fit(
        self,
        X: Sequence[str],
        y: Sequence[Any] | NDArray[Any],
        sample_weight: Sequence[float] | NDArray[np.float64] | None = None,
    ) -> ResidualRouting:
        """Not supported: a residual model is built from a base model by :func:`fit_residual`."""
        raise TypeError("ResidualRouting is built by router.residual.fit_residual")

    def _combine(self, z3: FloatArray) -> FloatArray:
        return residual_logit(z3, self.shift_)

    def serving_head(self) -> tuple[str, float]:
        """Served as three rows (base, gate, head) combined by
        :func:`router.serving.residual_logit` with ``shift_``."""
        return "residual", float(self.shift_)

    def parts(self, X: Sequence[str]) -> FloatArray:
        """``(n, 3)``: base logit, gate logit, head logit per prompt (for inspection)."""
        check_is_fitted(self, "coef3_")
        feats, probs = self.view(X)
        out: FloatArray = np.asarray(feats @ self.coef3_.T) + self.intercept3_
        if self.cap3_ is not None and probs is not None:
            out += probs @ self.cap3_.T
        return out

    def linear_view(self) -> LinearView:
        """Not defined: a residual model is three rows; adapt its ``base_`` instead."""
        raise TypeError("a ResidualRouting has three rows; use .base_.linear_view()")

    def view(self, X: Sequence[str]) -> tuple[Any, FloatArray | None]:
        """The base model's view (the features of :attr:`coef3_`)."""
        result: tuple[Any, FloatArray | None] = self.base_.view(X)
        return result

    def capability_model(self) -> PromptClassifier:
        """The base model's capability model (when it reads one)."""
        model: PromptClassifier = self.base_.capability_model()
        return model

    def vectorizer(self) -> TfidfVectorizer:
        """The base model's vectorizer."""
        return self.base_.vectorizer()

    def describe(self) -> str:
        """One line on the estimator, for the artifact's sidecar."""
        return f"ResidualRouting(base, domain gate, traffic head; base: {self.base_.describe()})"

    def decision_function(self, X: Sequence[str]) -> FloatArray:
        """The combined logit per prompt."""
        return self._combine(self.parts(X))

    def predict_proba(self, X: Sequence[str]) -> FloatArray:
        """``[P(0), P(1)]`` per prompt, from the combined logit."""
        p = logistic(self.decision_function(X))
        return np.column_stack([1.0 - p, p])

    def predict(self, X: Sequence[str]) -> NDArray[Any]:
        """The more probable class per prompt."""
        result: NDArray[Any] = self.classes_[(self.decision_function(X) > 0).astype(np.intp)]
        return result


@dataclass(frozen=True)
class ResidualFit:
    """What :func:`fit_residual` chose, for the retrain report and the lineage."""

    head_lambda: float
    head_word_scale: float
    cv_log_loss: dict[str, float]
    shift: float
    n_outcomes: int
    n_base_prompts: int
    gate_on_outcomes: float
    gate_on_base: float


def _soft_logistic(features: Any, v: FloatArray, lam: float) -> LogisticRegression:
    n = len(v)
    model = LogisticRegression(C=1.0 / lam, max_iter=1000)
    return model.fit(
        sp.vstack([features, features]).tocsr(),
        np.r_[np.ones(n, np.int64), np.zeros(n, np.int64)],
        sample_weight=np.r_[v, 1.0 - v],
    )


def _soft_log_loss(model: LogisticRegression, features: Any, v: FloatArray) -> float:
    p = np.clip(model.predict_proba(features)[:, 1], 1e-9, 1.0 - 1e-9)
    return float(-np.mean(v * np.log(p) + (1.0 - v) * np.log(1.0 - p)))


def _head_features(structure: Any, z0: FloatArray, words: Any, scale: float) -> sp.csr_matrix:
    blocks = [sp.csr_matrix(structure), sp.csr_matrix(z0[:, None])]
    if scale:
        blocks.append(sp.csr_matrix(words) * scale)
    return sp.hstack(blocks).tocsr()


def choose_head(
    structure: Any, z0: FloatArray, words: Any, v: FloatArray, *, folds: int = 5, seed: int = 0
) -> tuple[tuple[float, float], dict[str, float]]:
    """``(lambda, word scale)`` of the head by K-fold cross-validated soft log-loss on the
    outcomes alone (the gate's held-out slice is never seen here)."""
    fold = np.random.default_rng(seed).permutation(len(v)) % folds
    losses: dict[str, float] = {}
    for scale in WORD_SCALES:
        x = _head_features(structure, z0, words, scale)
        for lam in HEAD_LAMBDAS:
            total = 0.0
            for k in range(folds):
                train, test = fold != k, fold == k
                model = _soft_logistic(x[train], v[train], lam)
                total += _soft_log_loss(model, x[test], v[test]) * int(test.sum())
            losses[f"lambda={lam:g},words={scale:g}"] = total / len(v)
    best = min(
        ((lam, scale) for scale in WORD_SCALES for lam in HEAD_LAMBDAS),
        key=lambda c: losses[f"lambda={c[0]:g},words={c[1]:g}"],
    )
    return best, losses


def fit_residual(
    base: PromptClassifier,
    prompts: Sequence[str],
    values: Sequence[float],
    base_prompts: Sequence[str],
    *,
    folds: int = 5,
    seed: int = 0,
) -> tuple[ResidualRouting, ResidualFit]:
    """Fit gate and head on labelled outcomes (``prompts``, label ``values`` in [0, 1]) over
    ``base``'s features; ``base_prompts`` is the base-data sample the gate tells traffic from.

    ``base`` must be a plain :class:`PromptClassifier` with structure features or a
    :class:`~router.classifier.CapabilityRouting` (pass ``ResidualRouting.base_`` to adapt
    again from the same base). Nothing of it is modified.
    """
    check_is_fitted(base, "pipeline_")
    if isinstance(base, ResidualRouting):
        raise ConfigError("fit_residual needs the plain base model (use .base_)")
    if not base.use_structure:
        raise ConfigError("the residual head needs a base model with structure features")
    if len(values) < folds * 2 or not base_prompts:
        raise ConfigError(f"fit_residual needs at least {folds * 2} outcomes and base prompts")
    x_out, p_out = base.view(prompts)
    x_base, _ = base.view(base_prompts)
    return fit_residual_features(
        base,
        sp.csr_matrix(x_out),
        values,
        sp.csr_matrix(x_base),
        probs=p_out,
        folds=folds,
        seed=seed,
    )


def fit_residual_features(
    base: PromptClassifier,
    x_out: sp.csr_matrix,
    values: Sequence[float],
    x_base: sp.csr_matrix,
    *,
    probs: FloatArray | None = None,
    folds: int = 5,
    seed: int = 0,
) -> tuple[ResidualRouting, ResidualFit]:
    """:func:`fit_residual` on prompts already turned into ``base``'s
    :meth:`~router.classifier.PromptClassifier.view` (``probs``: the outcomes' capability
    probabilities, when the view has them), for studies that refit many times on the same base
    sample."""
    v = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    lv = base.linear_view()
    if (lv.cap_coef is None) != (probs is None):
        raise ConfigError("the outcomes' capability probabilities are needed for this base model")
    coef0, b0, n_words = lv.coef, lv.intercept, lv.n_words
    # The base row's capability term per outcome (zero for a base that reads none).
    cap0 = probs @ lv.cap_coef if lv.cap_coef is not None and probs is not None else 0.0
    z0 = np.asarray(x_out @ coef0) + b0 + cap0

    domain = LogisticRegression(C=GATE_C, solver="liblinear", class_weight="balanced")
    domain.fit(
        sp.vstack([x_base, x_out]),
        np.r_[np.zeros(x_base.shape[0], np.int64), np.ones(x_out.shape[0], np.int64)],
    )
    gate_coef = np.asarray(domain.coef_, dtype=np.float64)[0]
    gate_b = float(domain.intercept_[0])

    structure, words = x_out[:, n_words:], x_out[:, :n_words]
    (lam, scale), losses = choose_head(structure, z0, words, v, folds=folds, seed=seed)
    head = _soft_logistic(_head_features(structure, z0, words, scale), v, lam)
    beta = np.asarray(head.coef_, dtype=np.float64)[0]
    n_struct = structure.shape[1]
    head_coef = beta[n_struct] * coef0  # the base logit's coefficient, unfolded
    head_coef[n_words:] += beta[:n_struct]
    if scale:
        head_coef[:n_words] += scale * beta[n_struct + 1 :]
    head_b = float(head.intercept_[0]) + float(beta[n_struct]) * b0
    # The head row carries the base row's capability term scaled by its base-logit coefficient.
    head_z = np.asarray(x_out @ head_coef) + head_b + beta[n_struct] * cap0
    shift = float(np.mean(head_z - z0))
    cap3: FloatArray | None = None
    if lv.cap_coef is not None:
        cap3 = np.vstack([lv.cap_coef, np.zeros_like(lv.cap_coef), beta[n_struct] * lv.cap_coef])

    model = ResidualRouting(base=base)
    params = model.__dict__.copy()
    model.__dict__.update(base.__dict__)  # shares the fitted pipeline and vocabulary...
    model.__dict__.update(params)  # ...but keeps its own parameters (``base``)
    model.base_ = base
    model.use_structure = True  # its rows always weigh the structure features
    model.coef3_ = np.vstack([coef0, gate_coef, head_coef])
    model.intercept3_ = np.array([b0, gate_b, head_b])
    model.cap3_ = cap3
    model.shift_ = shift
    model.head_lambda_ = lam
    model.head_word_scale_ = scale
    # The rows the serving form reads: the structure scaler folded as PromptClassifier._fold does.
    struct = model.coef3_[:, n_words:] * lv.weight / lv.scaler.scale_
    model.word_coef_ = np.ascontiguousarray(model.coef3_[:, :n_words])
    model.struct_coef_ = np.ascontiguousarray(struct)
    model.intercept_ = model.intercept3_ - struct @ lv.scaler.mean_
    model.cap_coef_ = cap3

    gate_p = logistic(np.asarray(sp.vstack([x_out, x_base]) @ gate_coef) + gate_b)
    info = ResidualFit(
        head_lambda=lam,
        head_word_scale=scale,
        cv_log_loss=losses,
        shift=shift,
        n_outcomes=len(v),
        n_base_prompts=x_base.shape[0],
        gate_on_outcomes=float(gate_p[: len(v)].mean()),
        gate_on_base=float(gate_p[len(v) :].mean()),
    )
    return model, info
