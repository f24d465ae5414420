"""The learned routing decision's scikit-learn side: the estimators and their serving form.

The estimators are fitted with stock scikit-learn parts (``Pipeline``, ``FeatureUnion``,
``TfidfVectorizer``, ``LogisticRegression``) over the features of :mod:`router.features`;
:func:`serving_form` folds the fitted routing and capability models into the arrays that
:mod:`router.serving` evaluates, and :class:`LearnedScorer` scores through that form only, so
training, the CLI and the proxy compute every decision one way. Pure: no web code, no litellm,
nothing at import.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin, clone
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from router.features import HEAD_CHARS, STRUCTURE_FEATURES, TAIL_CHARS, clip, structure_vector
from router.profile import LocalProfile, default_profile
from router.scoring import CAPABILITIES, Analysis
from router.serving import (
    CapabilityReader,
    FloatArray,
    ServingScorer,
    gap_logit,
    logistic,
    profile_vector,
)


@dataclass(frozen=True)
class LinearView:
    """A routing model's first decision row as a linear function of a fixed feature view:
    ``coef @ [word TF-IDF, scaled structure] + intercept + cap_coef @ capability probabilities``.

    The retrain loop's residual model (:mod:`router.residual`) fits its gate and head over this
    view, whatever the base model's own pipeline is. ``n_words`` columns of words come first;
    the structure columns are ``weight * scaler.transform(structure)``.
    """

    n_words: int
    scaler: StandardScaler
    weight: float
    coef: FloatArray
    intercept: float
    cap_coef: FloatArray | None


def truncate_lower(text: str) -> str:
    """The text preprocessor of the TF-IDF features: the lower-cased :func:`clip` of the text."""
    return clip(text).lower()


class StructureFeatures(TransformerMixin, BaseEstimator):  # type: ignore[misc]
    """Transform an iterable of prompts into their :data:`STRUCTURE_FEATURES` (stateless)."""

    def fit(self, X: Iterable[str], y: Any = None) -> StructureFeatures:
        """Nothing to learn; records the output width. Returns ``self``."""
        self.n_features_out_ = len(STRUCTURE_FEATURES)
        return self

    def transform(self, X: Iterable[str]) -> FloatArray:
        """One row of structure features per prompt."""
        return np.array([structure_vector(t) for t in X], dtype=np.float64).reshape(
            -1, len(STRUCTURE_FEATURES)
        )

    def get_feature_names_out(self, input_features: Any = None) -> NDArray[np.object_]:
        """The feature names, for ``Pipeline.get_feature_names_out``."""
        return np.array(STRUCTURE_FEATURES, dtype=object)


class PromptClassifier(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """A linear classifier over raw prompt strings (word TF-IDF + structure features).

    Parameters are only stored by ``__init__``; ``fit`` builds ``pipeline_`` (a stock sklearn
    ``Pipeline``) and folds its scalers into coefficients on raw features (``word_coef_``,
    ``struct_coef_``, ``intercept_``: what :func:`serving_form` reads). ``predict_proba``
    columns follow ``classes_``.

    C: inverse L2 strength of the logistic regression.
    ngram_max: longest word n-gram.
    min_df, max_features: TF-IDF vocabulary pruning (keeps the artifact small).
    use_structure: add the scaled :class:`StructureFeatures`.
    structure_weight: multiplier on the scaled structure block (its share of the regulariser).
    class_weight, solver: passed to ``LogisticRegression`` (``liblinear`` is several times faster
    than ``lbfgs`` for the binary routing problem on sparse text; multiclass needs ``lbfgs``).
    """

    def __init__(
        self,
        *,
        C: float = 1.0,
        ngram_max: int = 2,
        min_df: int = 2,
        max_features: int | None = 30000,
        use_structure: bool = True,
        structure_weight: float = 1.0,
        class_weight: str | None = None,
        solver: str = "lbfgs",
    ) -> None:
        self.C = C
        self.ngram_max = ngram_max
        self.min_df = min_df
        self.max_features = max_features
        self.use_structure = use_structure
        self.structure_weight = structure_weight
        self.class_weight = class_weight
        self.solver = solver

    def _make_pipeline(self) -> Pipeline:
        words = TfidfVectorizer(
            preprocessor=truncate_lower,
            ngram_range=(1, self.ngram_max),
            min_df=self.min_df,
            max_features=self.max_features,
            sublinear_tf=True,
            dtype=np.float64,
        )
        parts: list[tuple[str, Any]] = [("words", words)]
        if self.use_structure:
            parts.append(
                (
                    "structure",
                    Pipeline([("feats", StructureFeatures()), ("scale", StandardScaler())]),
                )
            )
        weights = {"words": 1.0}
        if self.use_structure:
            weights["structure"] = self.structure_weight
        return Pipeline(
            [
                ("features", FeatureUnion(parts, transformer_weights=weights)),
                ("clf", self._logistic_regression()),
            ]
        )

    def _logistic_regression(self) -> LogisticRegression:
        return LogisticRegression(
            C=self.C,
            solver=self.solver,
            max_iter=2000,
            class_weight=self.class_weight,
            random_state=0,
        )

    def fit(
        self,
        X: Sequence[str],
        y: Sequence[Any] | NDArray[Any],
        sample_weight: Sequence[float] | NDArray[np.float64] | None = None,
    ) -> PromptClassifier:
        """Fit the pipeline on prompts ``X`` and labels ``y``; returns ``self``."""
        pipeline = self._make_pipeline()
        pipeline.fit(list(X), np.asarray(y), clf__sample_weight=sample_weight)
        vec: TfidfVectorizer = pipeline.named_steps["features"].transformer_list[0][1]
        # The pruned-terms set is only for introspection and would bloat the artifact.
        if hasattr(vec, "stop_words_"):
            del vec.stop_words_
        self.pipeline_ = pipeline
        self.classes_ = pipeline.classes_
        self._fold()
        return self

    def _fold(self) -> None:
        union: FeatureUnion = self.pipeline_.named_steps["features"]
        clf: LogisticRegression = self.pipeline_.named_steps["clf"]
        vec: TfidfVectorizer = union.transformer_list[0][1]
        n_words = len(vec.vocabulary_)
        coef = np.asarray(clf.coef_, dtype=np.float64)
        self.vocabulary_: dict[str, int] = vec.vocabulary_  # shared, so pickled once
        self.idf_: FloatArray = np.asarray(vec.idf_, dtype=np.float64)
        self.word_coef_: FloatArray = np.ascontiguousarray(coef[:, :n_words])
        self.intercept_: FloatArray = np.asarray(clf.intercept_, dtype=np.float64)
        if self.use_structure:
            scaler: StandardScaler = union.transformer_list[1][1].named_steps["scale"]
            w = self.structure_weight
            # Fold the scaler and union weight into the coefficients: coef·(w·(s-mean)/scale).
            struct = coef[:, n_words:] * w / scaler.scale_
            self.struct_coef_: FloatArray = np.ascontiguousarray(struct)
            self.intercept_ = self.intercept_ - struct @ scaler.mean_

    def predict_proba(self, X: Sequence[str]) -> FloatArray:
        """Class probabilities per prompt, columns in ``classes_`` order."""
        check_is_fitted(self, "pipeline_")
        result: FloatArray = self.pipeline_.predict_proba(list(X))
        return result

    def decision_function(self, X: Sequence[str]) -> FloatArray:
        """The logistic regression's decision values per prompt."""
        check_is_fitted(self, "pipeline_")
        result: FloatArray = self.pipeline_.decision_function(list(X))
        return result

    def predict(self, X: Sequence[str]) -> NDArray[Any]:
        """The most probable class per prompt."""
        check_is_fitted(self, "pipeline_")
        result: NDArray[Any] = self.pipeline_.predict(list(X))
        return result

    def serving_head(self) -> tuple[str, float] | None:
        """How the serving form makes this model's routing score from its decision rows: a
        plain model's one row goes through the logistic function (``("logistic", 0.0)``, see
        :data:`router.serving.ROUTING_ROWS`). None for a subclass that does not say, which is
        then served through this class's own path."""
        return ("logistic", 0.0) if type(self) is PromptClassifier else None

    def capability_coef(self) -> FloatArray | None:
        """The decision rows' coefficients on the capability model's class probabilities
        (``(rows, classes)``), or None when the rows do not read them (a plain model)."""
        coef: FloatArray | None = getattr(self, "cap_coef_", None)
        return coef

    def capability_model(self) -> PromptClassifier:
        """The capability model whose probabilities :meth:`capability_coef` weighs."""
        raise TypeError(f"{type(self).__name__} reads no capability probabilities")

    def vectorizer(self) -> TfidfVectorizer:
        """The fitted word TF-IDF vectorizer whose vocabulary the word coefficients index."""
        vec: TfidfVectorizer = self.pipeline_.named_steps["features"].transformer_list[0][1]
        return vec

    def describe(self) -> str:
        """One line on the estimator, for the artifact's sidecar."""
        return "PromptClassifier(word 1-n-gram TF-IDF + structure -> LogisticRegression)"

    def linear_view(self) -> LinearView:
        """The first decision row over :meth:`view`'s features."""
        check_is_fitted(self, "pipeline_")
        if not self.use_structure:
            raise ValueError("the linear view needs a model with structure features")
        union: FeatureUnion = self.pipeline_.named_steps["features"]
        clf: LogisticRegression = self.pipeline_.named_steps["clf"]
        return LinearView(
            n_words=len(self.vocabulary_),
            scaler=union.transformer_list[1][1].named_steps["scale"],
            weight=self.structure_weight,
            coef=np.asarray(clf.coef_, dtype=np.float64)[0],
            intercept=float(clf.intercept_[0]),
            cap_coef=None,
        )

    def view(self, X: Sequence[str]) -> tuple[Any, FloatArray | None]:
        """The features of :meth:`linear_view` per prompt (a sparse matrix), and the capability
        probabilities when the view reads them (else None)."""
        return self.pipeline_.named_steps["features"].transform(list(X)), None


class CapabilityProbabilities(TransformerMixin, BaseEstimator):  # type: ignore[misc]
    """Transform prompts into a fitted capability model's class probabilities (a prefit
    transformer: ``fit`` learns nothing and leaves ``model`` as it is)."""

    def __init__(self, model: PromptClassifier | None = None) -> None:
        self.model = model

    def fit(self, X: Iterable[str], y: Any = None) -> CapabilityProbabilities:
        """Check that ``model`` is fitted; returns ``self``."""
        if self.model is None:
            raise ValueError("CapabilityProbabilities needs a fitted capability model")
        check_is_fitted(self.model, "pipeline_")
        self.n_features_out_ = len(self.model.classes_)
        return self

    def transform(self, X: Iterable[str]) -> FloatArray:
        """One row of class probabilities per prompt, columns in the model's ``classes_``."""
        check_is_fitted(self, "n_features_out_")
        assert self.model is not None
        return self.model.predict_proba(list(X))

    def get_feature_names_out(self, input_features: Any = None) -> NDArray[np.object_]:
        """``p_<class>`` per capability class."""
        assert self.model is not None
        return np.array([f"p_{c}" for c in self.model.classes_], dtype=object)


class _ReadsCapability(PromptClassifier):
    """A routing model that reads prompts through a fitted capability model (its
    ``capability`` parameter) instead of a vectorizer of its own."""

    capability: PromptClassifier | None

    def capability_model(self) -> PromptClassifier:
        """The capability model given as ``capability``."""
        if self.capability is None:
            raise ValueError(f"{type(self).__name__} has no capability model")
        return self.capability

    def vectorizer(self) -> TfidfVectorizer:
        """The capability model's vectorizer (this model has no word block of its own)."""
        return self.capability_model().vectorizer()


class CapabilityRouting(_ReadsCapability):
    """The routing classifier over the structure features and a capability model's class
    probabilities (no word block of its own): scaled structure features and scaled
    probabilities into a logistic regression, composed from stock ``Pipeline``/``FeatureUnion``
    parts and :class:`CapabilityProbabilities`.

    Why: the words learn the training sets' topics, the class probabilities only the task type,
    so it transfers better to unseen prompt sets (docs/model-card.md).

    ``capability``: the fitted capability :class:`PromptClassifier` (kept, not refitted).
    C, class_weight, solver, structure_weight: as for :class:`PromptClassifier`.

    It tokenises with the capability model's vectorizer (its word coefficients are all zero), so
    its serving form is one routing row that also weighs the capability probabilities
    (:data:`router.serving.FORM_ARRAYS`' ``cap_coef``).
    """

    use_structure = True

    def __init__(
        self,
        *,
        capability: PromptClassifier | None = None,
        C: float = 1.0,
        structure_weight: float = 1.0,
        class_weight: str | None = None,
        solver: str = "liblinear",
    ) -> None:
        self.capability = capability
        self.C = C
        self.structure_weight = structure_weight
        self.class_weight = class_weight
        self.solver = solver

    def _make_pipeline(self) -> Pipeline:
        structure = Pipeline([("feats", StructureFeatures()), ("scale", StandardScaler())])
        probabilities = Pipeline(
            [("probs", CapabilityProbabilities(self.capability)), ("scale", StandardScaler())]
        )
        return Pipeline(
            [
                (
                    "features",
                    FeatureUnion(
                        [("structure", structure), ("capability", probabilities)],
                        transformer_weights={"structure": self.structure_weight},
                    ),
                ),
                ("clf", self._logistic_regression()),
            ]
        )

    def fit(
        self,
        X: Sequence[str],
        y: Sequence[Any] | NDArray[Any],
        sample_weight: Sequence[float] | NDArray[np.float64] | None = None,
    ) -> CapabilityRouting:
        """Fit on prompts ``X`` and labels ``y`` (the capability model stays as it is)."""
        if self.capability is None:
            raise ValueError("CapabilityRouting needs a fitted capability model")
        check_is_fitted(self.capability, "pipeline_")
        if self.capability.capability_coef() is not None:
            raise ValueError("the capability model must be a plain PromptClassifier")
        pipeline = self._make_pipeline()
        pipeline.fit(list(X), np.asarray(y), clf__sample_weight=sample_weight)
        self.pipeline_ = pipeline
        self.classes_ = pipeline.classes_
        self._fold()
        return self

    def _fold(self) -> None:
        union: FeatureUnion = self.pipeline_.named_steps["features"]
        clf: LogisticRegression = self.pipeline_.named_steps["clf"]
        coef = np.asarray(clf.coef_, dtype=np.float64)
        n_struct = len(STRUCTURE_FEATURES)
        struct_scaler: StandardScaler = union.transformer_list[0][1].named_steps["scale"]
        prob_scaler: StandardScaler = union.transformer_list[1][1].named_steps["scale"]
        # Fold the scalers and the union weight into the coefficients on raw values.
        struct = coef[:, :n_struct] * self.structure_weight / struct_scaler.scale_
        probs = coef[:, n_struct:] / prob_scaler.scale_
        self.struct_coef_: FloatArray = np.ascontiguousarray(struct)
        self.cap_coef_: FloatArray = np.ascontiguousarray(probs)
        self.intercept_ = (
            np.asarray(clf.intercept_, dtype=np.float64)
            - struct @ struct_scaler.mean_
            - probs @ prob_scaler.mean_
        )
        # The capability model's tokens, with no weight: they let one tokenisation serve both
        # models and give the retrain loop's residual head (router.residual) its words.
        capability = self.capability_model()
        self.vocabulary_ = capability.vocabulary_
        self.idf_ = capability.idf_
        self.word_coef_ = np.zeros((coef.shape[0], len(self.vocabulary_)))

    def __sklearn_clone__(self) -> CapabilityRouting:
        """A clone that reads the same fitted capability model: it is an input, not a part this
        estimator fits (``sklearn.base.clone`` would otherwise hand it an unfitted copy)."""
        params = self.get_params(deep=False)
        capability = params.pop("capability")
        return type(self)(
            capability=capability, **{k: clone(v, safe=False) for k, v in params.items()}
        )

    def serving_head(self) -> tuple[str, float] | None:
        """One logistic row, as a plain model (its capability term is ``cap_coef``)."""
        return ("logistic", 0.0) if type(self) is CapabilityRouting else None

    def describe(self) -> str:
        """One line on the estimator, for the artifact's sidecar."""
        return "CapabilityRouting(structure + capability probabilities -> LogisticRegression)"

    def linear_view(self) -> LinearView:
        """The routing row over the capability model's words (all zero here), this model's
        scaled structure, and the raw capability probabilities."""
        check_is_fitted(self, "pipeline_")
        union: FeatureUnion = self.pipeline_.named_steps["features"]
        clf: LogisticRegression = self.pipeline_.named_steps["clf"]
        coef = np.asarray(clf.coef_, dtype=np.float64)[0]
        n_struct = len(STRUCTURE_FEATURES)
        prob_scaler: StandardScaler = union.transformer_list[1][1].named_steps["scale"]
        cap = self.cap_coef_[0]  # folded by _fold; the structure columns stay scaled here
        return LinearView(
            n_words=len(self.vocabulary_),
            scaler=union.transformer_list[0][1].named_steps["scale"],
            weight=self.structure_weight,
            coef=np.concatenate([np.zeros(len(self.vocabulary_)), coef[:n_struct]]),
            intercept=float(clf.intercept_[0]) - float(cap @ prob_scaler.mean_),
            cap_coef=cap,
        )

    def view(self, X: Sequence[str]) -> tuple[Any, FloatArray | None]:
        """The capability model's word TF-IDF, this model's scaled structure features (times
        ``structure_weight``) and the capability probabilities, per prompt."""
        prompts = list(X)
        union: FeatureUnion = self.pipeline_.named_steps["features"]
        words = self.vectorizer().transform(prompts)
        structure = union.transformer_list[0][1].transform(prompts) * self.structure_weight
        probs = self.capability_model().predict_proba(prompts)
        return sp.hstack([words, sp.csr_matrix(structure)]).tocsr(), probs


class GapRouting(_ReadsCapability):
    """router-v4's routing classifier: P(closed materially better | prompt, local profile).

    ``logit(score) = intercept_ + slope_ * logit(sum_c q_c * strong_[c] * (1 - local_c))`` with
    ``q`` the capability model's class probabilities, ``strong_`` the strong model's accuracy per
    capability (q-weighted mean of ``strong`` over the training rows, shrunk towards its overall
    mean by ``prior`` pseudo-rows) and ``local`` the local model's accuracy per capability
    (:mod:`router.profile`). A negative slope is refused (zero: the data shows no capability
    gap, and the score is constant), so the score never rises when the local model gets better
    and never inverts the capability gap.

    Why so few terms: in leave-one-source-out validation (``python -m studies.score_v4``) the
    structure features, the raw class probabilities and word terms each lowered held-out APGR on
    most sources; the gap term alone transfers best.

    ``fit(X, y, local_accuracy=..., strong=..., groups=...)``: ``local_accuracy`` is each row's
    local profile over ``capability.classes_`` (the weak model that answered that row), ``strong``
    each row's strong-model score, ``groups`` (optional) each row's prompt set. With groups, every
    set gets its own intercept during the fit (label scales differ: judge scores rarely tie,
    correctness often does) and the served intercept is their mean, so a set's base rate is not
    learned as a capability's gap. ``profile`` is the :class:`~router.profile.LocalProfile` that
    :meth:`predict_proba` reads (default: the bundled model's, as the proxy).
    """

    use_structure = False

    def __init__(
        self,
        *,
        capability: Any = None,  # a fitted PromptClassifier, or any predict_proba classifier
        C: float = 1.0,
        prior: float = 20.0,
        profile: LocalProfile | None = None,
    ) -> None:
        self.capability = capability
        self.C = C
        self.prior = prior
        self.profile = profile

    def fit(  # type: ignore[override]
        self,
        X: Sequence[str],
        y: Sequence[Any] | NDArray[Any],
        sample_weight: Sequence[float] | NDArray[np.float64] | None = None,
        *,
        local_accuracy: NDArray[np.float64],
        strong: Sequence[float] | NDArray[np.float64],
        groups: Sequence[str] | None = None,
    ) -> GapRouting:
        """Fit on prompts ``X`` and labels ``y``; see the class docstring for the rest."""
        capability = self.capability_model()
        check_is_fitted(capability)
        q = capability.predict_proba(list(X))
        y_arr = np.asarray(y)
        local = np.asarray(local_accuracy, dtype=np.float64)
        if local.shape != q.shape:
            raise ValueError("local_accuracy must give one accuracy per row and capability class")
        s = np.asarray(strong, dtype=np.float64)
        self.strong_: FloatArray = (q.T @ s + self.prior * s.mean()) / (q.sum(0) + self.prior)
        feature = gap_logit(q, self.strong_, local)[:, None]
        names = sorted(set(groups)) if groups is not None else []
        if len(names) < 2:
            names = []
        if names:
            g = np.asarray(groups)
            design = np.hstack([feature, (g[:, None] == np.array(names)[None, :]) * 1.0])
        else:
            design = feature
        clf = LogisticRegression(C=self.C, max_iter=2000, fit_intercept=not names)
        clf.fit(design, y_arr, sample_weight=sample_weight)
        self.slope_ = float(clf.coef_[0, 0])
        if self.slope_ < 0.0:
            raise ValueError(
                f"the gap term's slope came out {self.slope_:.3f}: these labels do not rise "
                "with the capability gap, refusing to fit an inverted score"
            )
        self.group_intercepts_: dict[str, float] = {
            name: float(c) for name, c in zip(names, clf.coef_[0, 1:], strict=True)
        }
        base = (
            float(np.mean(list(self.group_intercepts_.values())))
            if names
            else float(clf.intercept_[0])
        )
        self.classes_ = clf.classes_
        self.intercept_ = np.array([base])
        if isinstance(capability, PromptClassifier):
            # Its word view, so the serving form can share the capability model's tokens.
            self.vocabulary_ = capability.vocabulary_
            self.idf_ = capability.idf_
            self.word_coef_ = np.zeros((1, len(self.vocabulary_)))
            self.struct_coef_ = np.zeros((1, len(STRUCTURE_FEATURES)))
            self.pipeline_ = capability.pipeline_  # fitted-ness marker; its prompts' reader
        return self

    def head(self) -> dict[str, NDArray[Any]]:
        """The fitted score as plain arrays (:data:`router.serving.HEAD_ARRAYS`), for a
        :class:`~router.serving.ProfileScorer` over any capability model."""
        check_is_fitted(self, "slope_")
        return {
            "capabilities": np.array([str(c) for c in self.capability_model().classes_]),
            "gap_strong": np.asarray(self.strong_, dtype=np.float64),
            "gap_slope": np.array(self.slope_, dtype=np.float64),
            "intercept": np.array(float(self.intercept_[0]), dtype=np.float64),
        }

    def _local(self) -> FloatArray:
        # No profile set: the bundled model's, as the proxy reads by default.
        profile = self.profile if self.profile is not None else default_profile()
        return profile_vector(profile, [str(c) for c in self.capability_model().classes_])

    def decision_function(self, X: Sequence[str]) -> FloatArray:
        """The score's logit per prompt, for :attr:`profile`."""
        check_is_fitted(self, "slope_")
        q = self.capability_model().predict_proba(list(X))
        out: FloatArray = self.intercept_[0] + self.slope_ * gap_logit(
            q, self.strong_, self._local()
        )
        return out

    def predict_proba(self, X: Sequence[str]) -> FloatArray:
        """``[P(not materially better), P(materially better)]`` per prompt."""
        p = logistic(self.decision_function(X))
        return np.column_stack([1.0 - p, p])

    def predict(self, X: Sequence[str]) -> NDArray[Any]:
        """1 where the strong model is more likely than not materially better."""
        return (self.decision_function(X) > 0).astype(np.int64)

    def __sklearn_clone__(self) -> GapRouting:
        """A clone reading the same fitted capability model (see CapabilityRouting's)."""
        return type(self)(
            capability=self.capability, C=self.C, prior=self.prior, profile=self.profile
        )

    def serving_head(self) -> tuple[str, float] | None:
        """The ``profile`` routing kind of :data:`router.serving.ROUTING_ROWS`."""
        return ("profile", 0.0) if type(self) is GapRouting else None

    def describe(self) -> str:
        """One line on the estimator, for the artifact's sidecar."""
        return "GapRouting(logit of capability-weighted strong-vs-local-profile gap)"

    def linear_view(self) -> LinearView:
        """Not linear in any fixed feature view: the gap term reads the profile."""
        raise TypeError("GapRouting has no linear view (its gap term reads the local profile)")


class ServedCapability(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """A served capability model (:class:`router.serving.CapabilityReader`, numpy only) as a
    prefit scikit-learn classifier, so :class:`GapRouting` fits on exactly the probabilities
    the proxy will compute. ``fit`` learns nothing."""

    def __init__(self, model: CapabilityReader | None = None) -> None:
        self.model = model

    def fit(self, X: Any = None, y: Any = None) -> ServedCapability:
        """Nothing to learn (the model is prefit); records ``classes_``."""
        if self.model is None:
            raise ValueError("ServedCapability needs a capability model")
        self.classes_ = np.array(self.model.capabilities)
        return self

    def predict_proba(self, X: Sequence[str]) -> FloatArray:
        """P(capability | prompt) per prompt, columns in ``classes_`` order."""
        check_is_fitted(self, "classes_")
        assert self.model is not None
        out: FloatArray = np.vstack([self.model.probabilities(t) for t in X])
        return out

    def predict(self, X: Sequence[str]) -> NDArray[Any]:
        """The most probable capability per prompt."""
        result: NDArray[Any] = self.classes_[np.argmax(self.predict_proba(X), axis=1)]
        return result


def serving_form(
    routing: PromptClassifier, capability: PromptClassifier
) -> dict[str, NDArray[Any]] | None:
    """The serving form of a routing and a capability model: the arrays of
    :data:`router.serving.FORM_ARRAYS`, which :class:`~router.serving.ServingScorer` evaluates
    without scikit-learn. None when the models have none: a routing model that does not say how
    its rows make its score (:meth:`PromptClassifier.serving_head`), a capability model that is
    not a plain :class:`PromptClassifier`, or models that do not tokenise alike.

    Deterministic: the joint vocabulary lists the routing model's tokens in its vocabulary's
    order, then the capability model's new ones.
    """
    head = routing.serving_head()
    if (
        head is None
        or type(capability) is not PromptClassifier
        or not _tokenises_alike([routing, capability])
    ):
        return None
    kind, shift = head
    models = (routing, capability)
    vocab: dict[str, int] = {}
    for model in models:
        for token in model.vocabulary_:
            vocab.setdefault(token, len(vocab) + 1)
    widths = [model.word_coef_.shape[0] for model in models]
    width = sum(widths)
    table = np.zeros((len(vocab) + 1, width + len(models)))
    structs: list[FloatArray] = []
    col = 0
    for k, model in enumerate(models):
        n = len(model.vocabulary_)
        rows = np.fromiter(map(vocab.__getitem__, model.vocabulary_), np.intp, n)
        cols = np.fromiter(model.vocabulary_.values(), np.intp, n)
        idf = model.idf_[cols]
        table[rows, col : col + widths[k]] = (model.word_coef_[:, cols] * idf).T
        table[rows, width + k] = idf * idf
        col += widths[k]
        structs.append(
            model.struct_coef_
            if model.use_structure
            else np.zeros((widths[k], len(STRUCTURE_FEATURES)))
        )
    vec = routing.vectorizer()
    cap_coef = routing.capability_coef()
    if cap_coef is None:
        cap_coef = np.zeros((widths[0], len(capability.classes_)))
    gap: dict[str, NDArray[Any]] = {}
    if isinstance(routing, GapRouting):
        gap = {
            "gap_strong": np.asarray(routing.strong_, dtype=np.float64),
            "gap_slope": np.array(routing.slope_, dtype=np.float64),
        }
    return {
        **gap,
        "vocabulary": np.array(list(vocab), dtype=np.str_),
        "table": table,
        "intercept": np.concatenate([model.intercept_ for model in models]),
        "struct": np.vstack(structs),
        "widths": np.array(widths, dtype=np.int64),
        "capabilities": np.array([str(c) for c in capability.classes_], dtype=np.str_),
        "routing": np.array(kind, dtype=np.str_),
        "shift": np.array(shift, dtype=np.float64),
        "cap_coef": np.asarray(cap_coef, dtype=np.float64),
        "token_pattern": np.array(vec.token_pattern, dtype=np.str_),
        "ngram_range": np.array(vec.ngram_range, dtype=np.int64),
        "structure_features": np.array(STRUCTURE_FEATURES, dtype=np.str_),
        "clip": np.array([HEAD_CHARS, TAIL_CHARS], dtype=np.int64),
    }


def _tokenises_alike(models: Sequence[PromptClassifier]) -> bool:
    """True when :class:`~router.serving.JointLinear` reproduces these models' analyzers and
    weighting."""

    def spec(vec: TfidfVectorizer) -> tuple[Any, ...]:
        return (
            vec.analyzer,
            vec.preprocessor,
            vec.tokenizer,
            vec.token_pattern,
            vec.ngram_range,
            vec.stop_words,
            vec.input,
            vec.sublinear_tf,
            vec.use_idf,
            vec.norm,
        )

    specs = {spec(m.vectorizer()) for m in models}
    if len(specs) != 1:
        return False
    analyzer, preprocessor, tokenizer, _, _, stop_words, source, sublinear, idf, norm = specs.pop()
    return (
        analyzer == "word"
        and preprocessor is truncate_lower
        and tokenizer is None
        and stop_words is None
        and source == "content"
        and sublinear
        and idf
        and norm == "l2"
    )


class LearnedScorer:
    """The fitted models as a :class:`router.scoring.Scorer`, scored through their serving form.

    ``routing`` is a binary :class:`PromptClassifier` whose positive class means "the strong
    model's answer is materially better"; ``capability`` a :class:`PromptClassifier` over
    :data:`router.scoring.CAPABILITIES`. Training, evaluation and retraining hold the estimators
    here; every score goes through :attr:`serving`, the :class:`~router.serving.ServingScorer`
    of :func:`serving_form`, exactly as the proxy serves the saved artifact. Models without a
    serving form (they do not tokenise alike) are refused.
    """

    name = "learned"

    def __init__(
        self, routing: PromptClassifier, capability: PromptClassifier, version: str
    ) -> None:
        check_is_fitted(routing, "pipeline_")
        check_is_fitted(capability, "pipeline_")
        if list(routing.classes_) != [0, 1]:
            raise ValueError("the routing classifier must be binary with classes [0, 1]")
        if not set(capability.classes_) <= set(CAPABILITIES):
            raise ValueError("the capability classifier has classes outside CAPABILITIES")
        if routing.capability_coef() is not None and routing.capability_model() is not capability:
            raise ValueError("the routing classifier reads another capability model's output")
        form = serving_form(routing, capability)
        if form is None:
            raise ValueError(
                "these models have no serving form (they do not tokenise alike, or the routing "
                "model does not say how its rows make its score)"
            )
        self.routing = routing
        self.capability = capability
        self.version = version
        self.form = form
        # The local profile the score (router-v4) and the local_accuracy signal read.
        self.profile: LocalProfile = getattr(routing, "profile", None) or default_profile()
        self.serving = ServingScorer(form, version, self.profile)

    def score(self, text: str) -> float:
        """The routing score alone (probability the strong model is materially better)."""
        return self.serving.score(text)

    def analyze(self, text: str, *, has_tools: bool = False) -> Analysis:
        """Score, capability, stakes and PII for one prompt, as the proxy computes them."""
        return self.serving.analyze(text, has_tools=has_tools)
