"""Fitting the cascade's confidence model (scikit-learn), and writing its artifact.

:class:`CascadeConfidence` is a scikit-learn classifier (``fit`` returns ``self``, fitted state
ends in ``_``, ``predict_proba`` follows ``classes_``): a ``StandardScaler`` and a
``LogisticRegression`` over :func:`router.cascade.features`, predicting whether the local
model's answer is right. :meth:`CascadeConfidence.serving` gives the numpy-only
:class:`~router.cascade.CascadeModel` the proxy serves, and :func:`save_cascade` writes it as an
artifact directory::

    confidence.npz  the serving form's arrays (router.cascade.CASCADE_ARRAYS)
    metadata.json   format and version, the arrays' sha256, the features, library versions,
                    the training data and local model it was fitted on, and its metrics

:func:`grouped_out_of_fold` scores every row by a model that never saw the row's group (an
MMLU subject, a source), which is how ``python -m studies.cascade`` evaluates it.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
from numpy.typing import ArrayLike, NDArray
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler

from router.artifact import write_npz, write_sidecar
from router.cascade import (
    CASCADE_FILE,
    CASCADE_FORMAT,
    CASCADE_FORMAT_VERSION,
    AnswerStats,
    CascadeModel,
    feature_names,
    features,
)
from router.errors import ArtifactError

FloatArray = NDArray[np.float64]


def cascade_features(
    stats: Sequence[AnswerStats] | None, prompts: Sequence[tuple[float, int]]
) -> FloatArray:
    """The feature matrix: one row per answer (``stats``; None for the prompt-only model) and
    its prompt's ``(routing score, characters)``."""
    if stats is None:
        return np.array([features(None, s, n) for s, n in prompts], dtype=np.float64)
    return np.array(
        [features(a, s, n) for a, (s, n) in zip(stats, prompts, strict=True)], dtype=np.float64
    )


class CascadeConfidence(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """P(the local answer is right) from :func:`router.cascade.features` (module docstring).

    ``C``: the logistic regression's inverse regularisation strength.
    """

    def __init__(self, C: float = 1.0) -> None:
        self.C = C

    def fit(self, X: ArrayLike, y: ArrayLike) -> CascadeConfidence:
        """Fit on feature rows ``X`` and labels ``y`` (1: the local answer was right)."""
        x = np.asarray(X, dtype=np.float64)
        labels = np.asarray(y).astype(int)
        if x.shape[1] not in (len(feature_names(False)), len(feature_names(True))):
            raise ValueError(f"expected router.cascade.features rows, got {x.shape[1]} columns")
        self.pipeline_ = Pipeline(
            [
                ("scale", StandardScaler()),
                ("logistic", LogisticRegression(C=self.C, max_iter=1000)),
            ]
        ).fit(x, labels)
        self.classes_ = self.pipeline_.classes_
        self.n_features_in_ = x.shape[1]
        return self

    def predict_proba(self, X: ArrayLike) -> FloatArray:
        """Columns follow ``classes_`` (0: wrong, 1: right)."""
        return np.asarray(self.pipeline_.predict_proba(np.asarray(X, dtype=np.float64)))

    def predict(self, X: ArrayLike) -> NDArray[Any]:
        """The likelier label."""
        return np.asarray(self.pipeline_.predict(np.asarray(X, dtype=np.float64)))

    def confidence(self, X: ArrayLike) -> FloatArray:
        """P(right) for each row."""
        proba = self.predict_proba(X)
        return proba[:, list(self.classes_).index(1)] if 1 in self.classes_ else proba[:, 0] * 0

    def serving(self, version: str = "cascade") -> CascadeModel:
        """The numpy-only serving form; it equals :meth:`confidence` (tested)."""
        scale: StandardScaler = self.pipeline_.named_steps["scale"]
        logistic: LogisticRegression = self.pipeline_.named_steps["logistic"]
        if list(self.classes_) != [0, 1]:
            raise ValueError("a serving form needs both right and wrong answers in training")
        return CascadeModel(
            {
                "mean": np.asarray(scale.mean_),
                "scale": np.asarray(scale.scale_),
                "coef": np.asarray(logistic.coef_[0]),
                "intercept": np.asarray(logistic.intercept_[0]),
                "features": np.asarray(feature_names(self.n_features_in_ > 2)),
            },
            version,
        )


def grouped_out_of_fold(
    estimator: CascadeConfidence, X: ArrayLike, y: ArrayLike, groups: ArrayLike
) -> FloatArray:
    """Each row's confidence from a clone of ``estimator`` fitted without the row's group."""
    x, labels, g = np.asarray(X, dtype=np.float64), np.asarray(y), np.asarray(groups)
    out = np.zeros(len(x))
    for group in np.unique(g):
        test = g == group
        model = clone(estimator).fit(x[~test], labels[~test])
        out[test] = model.confidence(x[test])
    return out


def save_cascade(
    model: CascadeConfidence, directory: str | Path, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write ``model`` as a new confidence-model artifact (module docstring); ``directory``
    must not exist yet (a new version is a new directory, a live one is never edited)."""
    estimator = {"estimator": {"kind": "StandardScaler + LogisticRegression", "C": model.C}}
    return save_cascade_form(
        model.serving(Path(directory).name), directory, {**(metadata or {}), **estimator}
    )


def save_cascade_form(
    form: CascadeModel, directory: str | Path, metadata: Mapping[str, Any] | None = None
) -> Path:
    """Write a serving form as a new confidence-model artifact (see :func:`save_cascade`)."""
    d = Path(directory)
    if d.exists():
        raise ArtifactError(f"{d} already exists; write a new version instead of editing one")
    d.mkdir(parents=True)
    meta = {
        **(metadata or {}),
        "format": CASCADE_FORMAT,
        "format_version": CASCADE_FORMAT_VERSION,
        "version": d.name,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "sha256": write_npz(d / CASCADE_FILE, form.arrays()),
        "features": list(form.features),
        "libraries": {
            "scikit-learn": sklearn.__version__,
            "numpy": np.__version__,
            "python": ".".join(map(str, sys.version_info[:2])),
        },
    }
    write_sidecar(d, meta)
    return d
