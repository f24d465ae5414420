"""The learned routing decision: scikit-learn estimators, their features, and the learned scorer.

* :class:`StructureFeatures` turns prompts into a few transparent numbers (length, code, maths,
  question form, constraints, multiple choice).
* :class:`PromptClassifier` is a real scikit-learn classifier over raw prompt strings: word
  uni/bi-gram TF-IDF plus scaled structure features into a logistic regression, composed from
  stock ``Pipeline``/``FeatureUnion`` parts. It is used twice: for the routing score (binary:
  "is the strong model's answer materially better?") and for the 9 capabilities.
  :meth:`PromptClassifier.predict_proba_one` is a fast single-prompt path (vocabulary lookups and
  one sparse dot product) that equals ``predict_proba`` to 1e-9 but skips sklearn's per-call
  validation, so a decision costs tens of microseconds rather than milliseconds.
* :func:`assess_stakes` is a documented keyword/regex rule set, not a learned model.
* :class:`LearnedScorer` implements :class:`router.scoring.Scorer` on top of these.

This module is pure: it imports no web code and no litellm, and nothing happens at import.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sklearn.base import BaseEstimator, ClassifierMixin, TransformerMixin
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import FeatureUnion, Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from router.pii import pii_kinds
from router.scoring import CAPABILITIES, Analysis

FloatArray = NDArray[np.float64]

#: Only a bounded window of a prompt is tokenised and scanned by the regex features: its first
#: HEAD_CHARS and last TAIL_CHARS characters (the instruction is usually at the start or the end
#: of a long pasted document). The length and line-count features still see the full text, and
#: fit and predict clip identically (:func:`clip`), so the per-decision cost is bounded.
HEAD_CHARS = 2000
TAIL_CHARS = 500
MAX_CHARS = HEAD_CHARS + TAIL_CHARS

STRUCTURE_FEATURES: tuple[str, ...] = (
    "log_chars",
    "log_words",
    "log_lines",
    "code_fence",
    "code_tokens",
    "math_symbols",
    "digit_ratio",
    "log_numbers",
    "questions",
    "multiple_choice",
    "constraints",
    "reasoning_cues",
    "non_ascii_ratio",
)

_WORD = re.compile(r"\w+")
_DIGIT = re.compile(r"\d")
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
_CODE_TOKENS = re.compile(
    r"\b(?:def|class|return|import|function|const|var|let|public|void|SELECT|print|lambda)\b"
    r"|[{};]|==|!=|->|=>|\(\)"
)
_MATH_SYMBOLS = re.compile(
    "[=+*/^<>\u2264\u2265\u2211\u222b\u221a\u03c0]|\\\\[a-z]+|\\d\\s*[-x\u00d7]\\s*\\d"
)
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_CHOICE = re.compile(r"^\s*\(?[A-D][.)]\s", re.MULTILINE)
#: Constraint words and reasoning cues, one pass: each match is counted by its group name.
_CUES = re.compile(
    r"\b(?:(?P<constraints>must|should|exactly|at least|at most|no more than|without|only|do not|"
    r"don't|make sure|ensure|format|words?|sentences?|json|table|bullet)"
    r"|(?P<reasoning>why|explain|prove|derive|compare|analy[sz]e|step[- ]by[- ]step|trade-?offs?|"
    r"evaluate|optimi[sz]e|design|implement|debug|calculate))\b",
    re.IGNORECASE,
)


def clip(text: str) -> str:
    """The bounded window the text features see: the whole text up to :data:`MAX_CHARS`
    characters, else its first :data:`HEAD_CHARS` and last :data:`TAIL_CHARS` joined by a
    newline."""
    if len(text) <= MAX_CHARS:
        return text
    return text[:HEAD_CHARS] + "\n" + text[-TAIL_CHARS:]


def structure_vector(text: str) -> list[float]:
    """The :data:`STRUCTURE_FEATURES` of one prompt (cheap: a few compiled regexes)."""
    head = clip(text)
    n_chars = len(text)
    n_head = max(len(head), 1)
    constraints = reasoning = 0
    for m in _CUES.finditer(head):
        if m.lastgroup == "constraints":
            constraints += 1
        else:
            reasoning += 1
    return [
        math.log1p(n_chars),
        math.log1p(len(_WORD.findall(head))),
        math.log1p(text.count("\n")),
        1.0 if "```" in head else 0.0,
        math.log1p(len(_CODE_TOKENS.findall(head))),
        math.log1p(len(_MATH_SYMBOLS.findall(head))),
        len(_DIGIT.findall(head)) / n_head,
        math.log1p(len(_NUMBER.findall(head))),
        math.log1p(head.count("?")),
        1.0 if len(_CHOICE.findall(head)) >= 3 else 0.0,
        math.log1p(constraints),
        math.log1p(reasoning),
        len(_NON_ASCII.findall(head)) / n_head,
    ]


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
    ``Pipeline``) and compiles the fast single-prompt path. ``predict_proba`` columns follow
    ``classes_``.

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
                (
                    "clf",
                    LogisticRegression(
                        C=self.C,
                        solver=self.solver,
                        max_iter=2000,
                        class_weight=self.class_weight,
                        random_state=0,
                    ),
                ),
            ]
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
        self._compile()
        return self

    def _compile(self) -> None:
        union: FeatureUnion = self.pipeline_.named_steps["features"]
        clf: LogisticRegression = self.pipeline_.named_steps["clf"]
        vec: TfidfVectorizer = union.transformer_list[0][1]
        n_words = len(vec.vocabulary_)
        coef = np.asarray(clf.coef_, dtype=np.float64)
        self.analyzer_ = vec.build_analyzer()
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

    def decision_one(
        self,
        text: str,
        *,
        tokens: list[str] | None = None,
        structure: list[float] | None = None,
    ) -> FloatArray:
        """Decision values for a single prompt without sklearn's per-call overhead.

        ``tokens`` (this model's ``analyzer_(text)``) and ``structure`` (``structure_vector``)
        may be passed in when already computed for another model with the same preprocessing.
        """
        counts: dict[int, int] = {}
        vocab = self.vocabulary_
        for token in self.analyzer_(text) if tokens is None else tokens:
            j = vocab.get(token)
            if j is not None:
                counts[j] = counts.get(j, 0) + 1
        z = self.intercept_.copy()
        if counts:
            idx = np.fromiter(counts.keys(), dtype=np.intp, count=len(counts))
            tf = np.fromiter(counts.values(), dtype=np.float64, count=len(counts))
            w = (np.log(tf) + 1.0) * self.idf_[idx]
            norm = math.sqrt(float(w @ w))
            z += self.word_coef_[:, idx] @ (w / norm)
        if self.use_structure:
            vector = structure_vector(text) if structure is None else structure
            z += self.struct_coef_ @ np.asarray(vector)
        return z

    def predict_proba_one(
        self,
        text: str,
        *,
        tokens: list[str] | None = None,
        structure: list[float] | None = None,
    ) -> FloatArray:
        """``predict_proba([text])[0]``, computed by the fast single-prompt path."""
        z = self.decision_one(text, tokens=tokens, structure=structure)
        if z.shape[0] == 1:
            p = 1.0 / (1.0 + math.exp(-float(z[0])))
            return np.array([1.0 - p, p])
        e = np.exp(z - z.max())
        out: FloatArray = e / e.sum()
        return out


# --- stakes: a transparent rule set -------------------------------------------------------------

_STAKES_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "medical",
        re.compile(
            r"\b(?:diagnos\w*|symptoms?|dosage|dose|medication|medicine|prescri\w+|overdose|"
            r"chest pain|tumou?r|cancer|pregnan\w+|allerg\w+|side effects?|disease|insulin|"
            r"antibiotics?|surgery|blood pressure|mg\b|treatment for)\b",
            re.IGNORECASE,
        ),
    ),
    (
        "legal",
        re.compile(
            r"\b(?:lawsuit|sue|court|attorney|lawyer|legal advice|legally|contract|custody|"
            r"divorce|visa|immigration|tenant|landlord|liabilit\w+|copyright infringement|"
            r"criminal|arrest\w*|gdpr|compliance)\b",
            re.IGNORECASE,
        ),
    ),
    (
        "financial",
        re.compile(
            r"\b(?:invest\w*|mortgage|loan|tax(?:es)?|retirement|401k|pension|stocks?|crypto\w*|"
            r"bitcoin|bank account|wire transfer|credit score|debt|bankrupt\w*|insurance|"
            r"portfolio|trading)\b",
            re.IGNORECASE,
        ),
    ),
    (
        "safety",
        re.compile(
            r"\b(?:suicid\w*|self[- ]harm|kill myself|weapons?|explosives?|poison\w*|"
            r"emergency|overdos\w+|abuse|firearms?|gas leak|electrocut\w+)\b",
            re.IGNORECASE,
        ),
    ),
)
#: The four domain rules as one alternation (one regex pass); the match's group names the domain.
_STAKES = re.compile(
    "|".join(f"(?P<{domain}>{pattern.pattern})" for domain, pattern in _STAKES_RULES),
    re.IGNORECASE,
)
_DESTRUCTIVE = re.compile(
    r"\b(?:delete|drop table|rm -rf|transfer|payment|pay|purchase|deploy|send (?:an )?email|"
    r"wire|refund|shut ?down|production)\b",
    re.IGNORECASE,
)


def assess_stakes(text: str, *, has_tools: bool = False, pii: bool = False) -> tuple[str, str]:
    """How much is at stake in a prompt: ``(level, reason)`` with level low/medium/high.

    Rules (documented in docs/model-card.md): a medical, legal, financial or safety keyword makes
    the prompt *high*; an agent workflow (``has_tools``) is *high* when it also asks for a
    destructive or money-moving action and otherwise *medium*; personal data alone is *medium*.
    """
    head = clip(text)
    m = _STAKES.search(head)
    if m:
        return "high", f"{m.lastgroup} domain ({m.group(0).lower()!r})"
    if has_tools:
        m = _DESTRUCTIVE.search(head)
        if m:
            return "high", f"agent workflow with tools and action {m.group(0).lower()!r}"
        return "medium", "agent workflow with tools"
    if pii:
        return "medium", "contains personal data"
    return "low", "no high-stakes domain, tools or personal data"


class LearnedScorer:
    """The shipped :class:`router.scoring.Scorer`: learned score and capability, rule stakes, PII.

    ``routing`` is a binary :class:`PromptClassifier` whose positive class means "the strong
    model's answer is materially better"; the score is that class's probability. ``capability``
    is a 9-class :class:`PromptClassifier` over :data:`router.scoring.CAPABILITIES`.
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
        self.routing = routing
        self.capability = capability
        self.version = version
        self._capabilities = [str(c) for c in capability.classes_]
        # Both models tokenise identically (same TF-IDF settings), so one pass can serve both.
        shared = routing.get_params() | {"C": 0, "class_weight": None, "solver": ""}
        self._share = shared == capability.get_params() | {
            "C": 0,
            "class_weight": None,
            "solver": "",
        }

    def score(self, text: str) -> float:
        """The routing score alone (probability the strong model is materially better)."""
        return float(self.routing.predict_proba_one(text)[1])

    def analyze(self, text: str, *, has_tools: bool = False) -> Analysis:
        """Score, capability, stakes and PII for one prompt (the proxy calls this per request)."""
        tokens = self.routing.analyzer_(text)
        structure = structure_vector(text)
        score = float(self.routing.predict_proba_one(text, tokens=tokens, structure=structure)[1])
        if self._share:
            cap_proba = self.capability.predict_proba_one(text, tokens=tokens, structure=structure)
        else:
            cap_proba = self.capability.predict_proba_one(text)
        kinds = pii_kinds(text)
        stakes, reason = assess_stakes(text, has_tools=has_tools, pii=bool(kinds))
        return Analysis(
            score=score,
            capability=self._capabilities[int(np.argmax(cap_proba))],
            stakes=stakes,
            stakes_reason=reason,
            pii=bool(kinds),
            pii_kinds=kinds,
        )
