"""The capability model's scikit-learn side: the estimator, its validation and its training.

* :class:`CapabilityClassifier`: a scikit-learn classifier over raw prompt strings. It embeds
  each prompt with a :class:`~router.embedding.StaticEmbedding`, centres the vectors on the
  training mean and scores them with a linear head: ``prototype`` (shipped: cosine to the mean
  of each capability's :data:`router.capability.DESCRIPTIONS`, temperature fitted on the rows)
  or ``logistic`` (multinomial logistic regression on the rows, and the descriptions when
  ``descriptions`` is true, and any ``seeds``: prompts written for the project, weighted by
  ``authored_weight`` with the descriptions). ``classes_`` is always
  :data:`router.scoring.CAPABILITIES` in that order (a capability with no prototype or row gets
  a logit far below the others), so ``predict_proba`` columns never move.
  :meth:`CapabilityClassifier.serving` is its numpy serving form
  (:class:`router.capability.CapabilityModel`).
* :func:`leave_one_source_out`: every source held out in turn, the model refitted on the others
  (per-source accuracy and macro-F1, the pooled confusion matrix). Model selection for the
  capability model uses this, never random rows.
* :func:`train_capability` / ``python -m router.capability_training``: fit on the
  ``commercial_use: true`` rows of a capabilities file and write a capability artifact::

      python -m router.capability_training --data ../shared/data/capabilities.jsonl \\
          --embedding models/capability-v1 --out models/capability-v2

  ``--embedding`` is a directory with an ``embedding.npz`` and its sidecar: one that
  :mod:`router.distill` wrote, or an existing capability artifact (whose table is reused).

Nothing happens at import.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import sklearn
from numpy.typing import NDArray
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score
from sklearn.utils.validation import check_is_fitted

from router.artifact import read_sidecar
from router.capability import (
    CAPABILITY_FORMAT,
    CAPABILITY_FORMAT_VERSION,
    DESCRIPTIONS,
    CapabilityModel,
    load_capability,
    save_capability,
    softmax,
    unit,
)
from router.embedding import (
    EMBEDDING_FORMAT,
    EMBEDDING_FORMAT_VERSION,
    StaticEmbedding,
    read_embedding,
)
from router.errors import ArtifactError
from router.scoring import CAPABILITIES
from router.training import CapabilityRow, data_file_info, load_capability_rows

FloatArray = NDArray[np.float64]
#: The logit of a capability that no training row had: far below any fitted one.
_ABSENT = -1e4
DEFAULT_C = 1.0
#: Softmax temperatures the prototype head chooses from (by log-loss on the training rows).
TEMPERATURES = tuple(float(t) for t in np.geomspace(0.01, 1.0, 41))


class CapabilityClassifier(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """A capability classifier over prompt strings (see the module docstring).

    ``embedding``: the :class:`StaticEmbedding` to read prompts with (None: the shipped
    model's). ``head``: ``"prototype"`` (cosine to one prototype per capability, a softmax
    temperature fitted on the training rows) or ``"logistic"`` (multinomial logistic regression,
    balanced class weights, inverse regularisation ``C``). ``descriptions``: add
    :data:`~router.capability.DESCRIPTIONS` to the training rows; for the prototype head they
    *are* the prototypes (the rows then only set the centre and the temperature), otherwise the
    prototypes are the rows' class means. ``seeds``: (prompt, capability) pairs written for the
    project, used as the descriptions are (prototypes, or rows of the logistic head).
    ``authored_weight``: the sample weight of descriptions and seeds in the logistic head (rows
    weigh 1): authored prompts vary the phrasing that the sources' own formats do not.
    """

    def __init__(
        self,
        embedding: StaticEmbedding | None = None,
        head: str = "prototype",
        descriptions: bool = True,
        C: float = DEFAULT_C,
        max_iter: int = 5000,
        *,
        seeds: tuple[tuple[str, str], ...] = (),
        authored_weight: float = 1.0,
    ) -> None:
        self.embedding = embedding
        self.head = head
        self.descriptions = descriptions
        self.C = C
        self.max_iter = max_iter
        self.seeds = seeds
        self.authored_weight = authored_weight

    def fit(self, X: Sequence[str], y: Sequence[str]) -> CapabilityClassifier:
        """Fit on prompts ``X`` labelled ``y`` (names in CAPABILITIES); returns self."""
        if self.head not in ("prototype", "logistic"):
            raise ValueError(f"head must be 'prototype' or 'logistic', not {self.head!r}")
        embedding = self.embedding if self.embedding is not None else load_capability().embedding
        labels = np.array([str(c) for c in y])
        if len(X) != len(labels):
            raise ValueError("X and y differ in length")
        if unknown := set(labels.tolist()) - set(CAPABILITIES):
            raise ValueError(f"unknown capabilities: {sorted(unknown)}")
        rows = embedding.embed_many(X)
        authored = (
            [(t, c) for c in CAPABILITIES for t in DESCRIPTIONS[c]] if self.descriptions else []
        )
        authored += [(str(t), str(c)) for t, c in self.seeds]
        if unknown := {c for _, c in authored} - set(CAPABILITIES):
            raise ValueError(f"unknown capabilities in seeds: {sorted(unknown)}")
        desc_labels = np.array([c for _, c in authored])
        desc = (
            embedding.embed_many([t for t, _ in authored])
            if authored
            else np.zeros((0, embedding.width))
        )
        center = np.vstack([rows, desc]).mean(axis=0)
        rows, desc = unit(rows - center), unit(desc - center)
        coef = np.zeros((len(CAPABILITIES), embedding.width))
        intercept = np.full(len(CAPABILITIES), _ABSENT)
        if self.head == "prototype":
            proto_x, proto_y = (desc, desc_labels) if authored else (rows, labels)
            for i, cap in enumerate(CAPABILITIES):
                if (proto_y == cap).any():
                    coef[i] = unit(proto_x[proto_y == cap].mean(axis=0))
                    intercept[i] = 0.0
            coef /= _temperature(rows, labels, coef, intercept)
        else:
            x, t = np.vstack([rows, desc]), np.concatenate([labels, desc_labels])
            weight = np.r_[np.ones(len(rows)), np.full(len(desc), float(self.authored_weight))]
            if len(set(t.tolist())) < 2:
                raise ValueError("a logistic head needs rows of two capabilities or more")
            lr = LogisticRegression(C=self.C, class_weight="balanced", max_iter=self.max_iter)
            lr.fit(x, t, sample_weight=weight)
            at = [CAPABILITIES.index(str(c)) for c in lr.classes_]
            if len(at) == 2:  # sklearn's binary form: one row, for the second class
                coef[at[1]], intercept[at[0]], intercept[at[1]] = lr.coef_[0], 0.0, lr.intercept_[0]
            else:
                coef[at], intercept[at] = lr.coef_, lr.intercept_
        self.embedding_ = embedding
        self.center_: FloatArray = center
        self.coef_: FloatArray = coef
        self.intercept_: FloatArray = intercept
        self.classes_ = np.array(CAPABILITIES)
        return self

    def decision_function(self, X: Sequence[str]) -> FloatArray:
        """One logit per capability and prompt."""
        check_is_fitted(self, "coef_")
        x = unit(self.embedding_.embed_many(X) - self.center_)
        out: FloatArray = x @ self.coef_.T + self.intercept_
        return out

    def predict_proba(self, X: Sequence[str]) -> FloatArray:
        """P(capability | prompt), columns in ``classes_`` (CAPABILITIES) order."""
        return softmax(self.decision_function(X))

    def predict(self, X: Sequence[str]) -> NDArray[Any]:
        """The most probable capability of each prompt."""
        out: NDArray[Any] = self.classes_[self.decision_function(X).argmax(axis=1)]
        return out

    def serving(self, version: str = "capability") -> CapabilityModel:
        """The numpy serving form (what the proxy loads): same probabilities, no scikit-learn."""
        check_is_fitted(self, "coef_")
        return CapabilityModel(
            self.embedding_, self.center_, self.coef_, self.intercept_, CAPABILITIES, version
        )


def _temperature(
    rows: FloatArray, labels: NDArray[Any], coef: FloatArray, intercept: FloatArray
) -> float:
    """The softmax temperature (from :data:`TEMPERATURES`) with the least log-loss on ``rows``,
    over the capabilities they have (cosines are fixed; only their scale is fitted)."""
    if not len(rows):
        return 0.05
    truth = np.array([CAPABILITIES.index(str(c)) for c in labels])
    cos = rows @ coef.T + intercept
    best, best_loss = TEMPERATURES[0], np.inf
    for t in TEMPERATURES:
        z = cos / t
        z = z - z.max(axis=1, keepdims=True)
        loss = float((np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(z)), truth]).mean())
        if loss < best_loss:
            best, best_loss = t, loss
    return best


class _Predicts(Protocol):
    def predict(self, X: Sequence[str]) -> Any: ...


def leave_one_source_out(
    rows: Sequence[CapabilityRow],
    fit: Callable[[list[str], list[str]], _Predicts],
    *,
    test_only: Sequence[CapabilityRow] = (),
    keep_predictions: bool = False,
) -> dict[str, Any]:
    """Hold each source of ``rows`` out in turn, ``fit(prompts, labels)`` on the others and
    predict it; ``test_only`` rows (sources never trained on, e.g. research-only licences) are
    predicted by a model fitted on all of ``rows``.

    Returns, per held-out source, rows, accuracy and macro-F1 (over the capabilities that source
    has), and pooled over ``rows`` and over ``test_only``: accuracy, macro-F1 (over the
    capabilities present in the truth) and the confusion matrix (truth rows x predicted columns,
    CAPABILITIES order); with ``keep_predictions``, every row's out-of-fold prediction by id
    (for paired comparisons of two models).
    """
    sources = sorted({r.source for r in rows})
    pred: dict[str, str] = {}
    folds = [
        (s, [r for r in rows if r.source != s], [r for r in rows if r.source == s]) for s in sources
    ]
    if test_only:
        folds.append(("", list(rows), list(test_only)))
    for _, train, test in folds:
        model = fit([r.prompt for r in train], [r.capability for r in train])
        for r, p in zip(test, model.predict([r.prompt for r in test]), strict=True):
            pred[r.id] = str(p)

    out = prediction_report(rows, pred, test_only=test_only)
    if keep_predictions:
        out["predictions"] = pred
    return out


def prediction_report(
    rows: Sequence[CapabilityRow],
    pred: Mapping[str, str],
    *,
    test_only: Sequence[CapabilityRow] = (),
) -> dict[str, Any]:
    """:func:`leave_one_source_out`'s figures for the predictions ``pred`` (by row id) of
    ``rows`` and ``test_only``: per source; pooled over ``rows`` and over ``test_only``, each
    with its confusion matrix; the labels. Also for predictions adjusted after the fact, such
    as the served label's (:func:`router.persona.persona_label`)."""

    def report(subset: Sequence[CapabilityRow]) -> dict[str, Any]:
        truth = [r.capability for r in subset]
        guess = [pred[r.id] for r in subset]
        labels = [c for c in CAPABILITIES if c in truth]
        return {
            "rows": len(subset),
            "accuracy": round(float(accuracy_score(truth, guess)), 4),
            "macro_f1": round(
                float(f1_score(truth, guess, labels=labels, average="macro", zero_division=0)), 4
            ),
        }

    def confusion(subset: Sequence[CapabilityRow]) -> list[list[int]]:
        cm = confusion_matrix(
            [r.capability for r in subset], [pred[r.id] for r in subset], labels=list(CAPABILITIES)
        )
        out: list[list[int]] = cm.tolist()
        return out

    every = [*rows, *test_only]
    out: dict[str, Any] = {
        "per_source": {
            s: report([r for r in every if r.source == s])
            for s in sorted({r.source for r in every})
        },
        "pooled": {**report(rows), "confusion": confusion(rows)},
    }
    if test_only:
        out["test_only"] = {**report(test_only), "confusion": confusion(test_only)}
    out["labels"] = list(CAPABILITIES)
    return out


def load_embedding_dir(directory: str | Path) -> StaticEmbedding:
    """The static embedding of a directory :mod:`router.distill` wrote or of a capability
    artifact, checked against its sidecar."""
    d = Path(directory)
    for kind, version in (
        (EMBEDDING_FORMAT, EMBEDDING_FORMAT_VERSION),
        (CAPABILITY_FORMAT, CAPABILITY_FORMAT_VERSION),
    ):
        try:
            meta = read_sidecar(d, kind=kind, version=version)
        except ArtifactError:
            continue
        return read_embedding(d, meta.get("embedding"))
    raise ArtifactError(f"{d}: neither a static embedding nor a capability artifact")


def train_capability(
    data: str | Path,
    embedding: StaticEmbedding,
    out: str | Path,
    *,
    params: Mapping[str, Any] | None = None,
    cv: bool = False,
    seeds: str | Path | Sequence[str | Path] | None = None,
    share: str | Path | None = None,
) -> Path:
    """Fit :class:`CapabilityClassifier` on the ``commercial_use: true`` rows of ``data`` (and
    the prompts of one or more ``seeds`` files, same schema, as the estimator's ``seeds``) and
    write its serving form as a capability artifact at ``out`` (with, if ``cv``, the
    leave-one-source-out figures in the sidecar; seeds stay in every fold's training); with
    ``share``, reading that sibling artifact's embedding file
    (:func:`router.capability.save_capability`). Returns ``out``."""
    rows = load_capability_rows(data, commercial_only=True)
    seed_files = [Path(seeds)] if isinstance(seeds, (str, Path)) else [Path(s) for s in seeds or ()]
    authored = [r for f in seed_files for r in load_capability_rows(f)]
    settings = {"head": "prototype", "descriptions": True, **(params or {})}
    pairs = tuple((r.prompt, r.capability) for r in authored)

    def fit(texts: list[str], labels: list[str]) -> CapabilityClassifier:
        return CapabilityClassifier(embedding, seeds=pairs, **settings).fit(texts, labels)

    model = fit([r.prompt for r in rows], [r.capability for r in rows])
    files = [data_file_info(Path(data), len(rows))]
    files += [data_file_info(f, len(load_capability_rows(f))) for f in seed_files]
    metadata: dict[str, Any] = {
        "data_files": files,
        "rows": len(rows) + len(authored),
        "training": "commercial_use: true rows only, plus router.capability.DESCRIPTIONS"
        + (" and the seed prompts" if seed_files else ""),
        "estimator": {"class": "router.capability_training.CapabilityClassifier", **settings},
        "sklearn": sklearn.__version__,
    }
    if cv:
        metadata["leave_one_source_out"] = leave_one_source_out(rows, fit)
    return save_capability(model.serving(Path(out).name), out, metadata, share=share)


def main(argv: list[str] | None = None) -> int:
    """``python -m router.capability_training``: see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m router.capability_training")
    parser.add_argument("--data", type=Path, required=True, help="a capabilities .jsonl file")
    parser.add_argument("--embedding", type=Path, required=True, help="static embedding directory")
    parser.add_argument("--out", type=Path, required=True, help="new artifact directory")
    parser.add_argument("--cv", action="store_true", help="add leave-one-source-out figures")
    parser.add_argument(
        "--seeds", type=Path, action="append", help="a .jsonl of seed prompts (same schema)"
    )
    parser.add_argument(
        "--share", action="store_true", help="read --embedding's file instead of copying it"
    )
    args = parser.parse_args(argv)
    path = train_capability(
        args.data,
        load_embedding_dir(args.embedding),
        args.out,
        cv=args.cv,
        seeds=args.seeds,
        share=args.embedding if args.share else None,
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
