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
* :class:`LearnedScorer` implements :class:`router.scoring.Scorer` on top of these. Per request
  it reads the prompt once (:class:`_Window`) and evaluates both classifiers as one linear map
  over their joint vocabulary (:class:`_JointLinear`, built at load), so signals + classifier +
  policy stay within the decision budget (0.3 ms median, 1 ms p99 on one core). Every fast path
  is pinned by the tests to its plain definition (sklearn's ``predict_proba``, the regexes run
  the obvious way).

This module is pure: it imports no web code and no litellm, and nothing happens at import.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from itertools import chain, pairwise, repeat
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
#: Code tokens: keywords (whole words, so counted from the prompt's word list) and symbols.
_CODE_WORDS = frozenset(
    [
        "def",
        "class",
        "return",
        "import",
        "function",
        "const",
        "var",
        "let",
        "public",
        "void",
        "SELECT",
        "print",
        "lambda",
    ]
)
_CODE_SYMBOLS = re.compile(r"\{|\}|;|==|!=|->|=>|\(\)")
_MATH_SYMBOLS = re.compile(
    "[=+*/^<>\u2264\u2265\u2211\u222b\u221a\u03c0]|\\\\[a-z]+|\\d\\s*[-x\u00d7]\\s*\\d"
)
#: :data:`_MATH_SYMBOLS`' three alternatives apart (each then starts with a literal or a class,
#: which the regex engine scans for fast). Their matches never overlap, so their counts add up.
_MATH_PARTS = tuple(re.compile(part) for part in _MATH_SYMBOLS.pattern.split("|"))
_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
_CHOICE = re.compile(r"^\s*\(?[A-D][.)]\s", re.MULTILINE)
_CHOICE_MARKS = tuple(f"{letter}{mark}" for letter in "ABCD" for mark in ".)")  # one is in each
#: Constraint words and reasoning cues, one pass: each match is counted by its group name.
_CUES = re.compile(
    r"\b(?:(?P<constraints>must|should|exactly|at least|at most|no more than|without|only|do not|"
    r"don't|make sure|ensure|format|words?|sentences?|json|table|bullet)"
    r"|(?P<reasoning>why|explain|prove|derive|compare|analy[sz]e|step[- ]by[- ]step|trade-?offs?|"
    r"evaluate|optimi[sz]e|design|implement|debug|calculate))\b",
    re.IGNORECASE,
)
#: The same cues, counted fast on lower-cased text (see :func:`_lower_equivalent`): the one-word
#: cues by looking the prompt's words up in a set, the multi-word ones by a regex that runs only
#: when one of their literal parts occurs at all. No cue word is part of a cue phrase, so the two
#: counts add up to what :data:`_CUES` counts.
_CONSTRAINT_WORDS = frozenset(
    [
        "must",
        "should",
        "exactly",
        "without",
        "only",
        "ensure",
        "format",
        "word",
        "words",
        "sentence",
        "sentences",
        "json",
        "table",
        "bullet",
    ]
)
_REASONING_WORDS = frozenset(
    [
        "why",
        "explain",
        "prove",
        "derive",
        "compare",
        "analyse",
        "analyze",
        "evaluate",
        "optimise",
        "optimize",
        "design",
        "implement",
        "debug",
        "calculate",
    ]
)
_CUE_PHRASES = re.compile(
    r"\b(?:(?P<constraints>at least|at most|no more than|do not|don't|make sure)"
    r"|(?P<reasoning>step[- ]by[- ]step|trade-?offs?))\b"
)
_CUE_PHRASE_PARTS: tuple[str, ...] = ("at least", "at most", "no more than", "do not", "don't")
_CUE_PHRASE_PARTS += ("make sure", "step", "trade")
_ASCII_DIGITS = "0123456789"


def _ascii(pattern: re.Pattern[str]) -> re.Pattern[str]:
    r"""``pattern`` compiled with ``re.ASCII``, for ASCII-only text: the same matches there for a
    pattern whose only classes are ``\w``, ``\d`` and ``\b`` (not ``\s``: Unicode's also holds
    the ASCII separators U+001C-U+001F), found faster by the engine's ASCII class tests."""
    return re.compile(pattern.pattern, (pattern.flags & ~re.UNICODE) | re.ASCII)


_WORD_ASCII = _ascii(_WORD)
_NUMBER_ASCII = _ascii(_NUMBER)
_CUE_PHRASES_ASCII = _ascii(_CUE_PHRASES)

_DEFAULT_TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's


def clip(text: str) -> str:
    """The bounded window the text features see: the whole text up to :data:`MAX_CHARS`
    characters, else its first :data:`HEAD_CHARS` and last :data:`TAIL_CHARS` joined by a
    newline."""
    if len(text) <= MAX_CHARS:
        return text
    return text[:HEAD_CHARS] + "\n" + text[-TAIL_CHARS:]


def _lower_equivalent(head: str, low: str) -> bool:
    """True when a lower-case ASCII pattern matched case-sensitively on ``low`` (``head.lower()``)
    finds exactly what it finds on ``head`` with ``re.IGNORECASE``.

    That holds for ASCII text, and for any text whose lower-casing keeps every character in place
    (only U+0130 lower-cases to two characters) and that has neither of the two characters the
    regex engine also folds onto an ASCII letter (dotless i onto ``i``, long s onto ``s``).
    """
    return head.isascii() or (len(low) == len(head) and "\u0131" not in low and "\u017f" not in low)


def structure_vector(text: str) -> list[float]:
    """The :data:`STRUCTURE_FEATURES` of one prompt (cheap: a few compiled regexes)."""
    return _structure(_Window(text))


class _Window:
    """One prompt as the per-request features read it, each view computed once.

    ``head`` is :func:`clip` of the text, ``low`` its lower case (the TF-IDF preprocessor's
    output), ``words`` the ``\\w+`` runs of ``head``. ``lowered`` is those runs lower-cased when
    they are exactly the ``\\w+`` runs of ``low`` (see :func:`_lower_equivalent`; a capital
    sigma, which lower-cases by context, also rules it out), else None. ``ascii``: ``head`` (and
    so ``low``) is ASCII, where the ``_ascii`` twins of the regexes may be used. ``same_case``:
    :func:`_lower_equivalent` of ``head`` and ``low``.
    """

    __slots__ = ("ascii", "head", "low", "lowered", "same_case", "text", "words")

    def __init__(self, text: str) -> None:
        self.text = text
        self.head = head = clip(text)
        self.low = low = head.lower()
        self.ascii = head.isascii()
        self.words: list[str] = (_WORD_ASCII if self.ascii else _WORD).findall(head)
        self.same_case = _lower_equivalent(head, low)
        same = self.same_case and (self.ascii or "\u03a3" not in head)
        self.lowered = list(map(str.lower, self.words)) if same else None


def _structure(w: _Window) -> list[float]:
    text, head, low, words = w.text, w.head, w.low, w.words
    n_head = max(len(head), 1)
    if w.same_case:
        lowered = w.lowered if w.lowered is not None else list(map(str.lower, words))
        constraints = sum(map(_CONSTRAINT_WORDS.__contains__, lowered))
        reasoning = sum(map(_REASONING_WORDS.__contains__, lowered))
        phrases_re = _CUE_PHRASES_ASCII if w.ascii else _CUE_PHRASES
        cues = phrases_re.findall(low) if any(p in low for p in _CUE_PHRASE_PARTS) else []
    else:
        constraints = reasoning = 0
        cues = _CUES.findall(head)
    phrases = sum(1 for _, r in cues if r)
    reasoning += phrases
    constraints += len(cues) - phrases
    if w.ascii:  # \d and non-ASCII need a regex only beyond ASCII
        digits = sum(map(head.count, _ASCII_DIGITS))
        non_ascii = 0
    else:
        digits = len(_DIGIT.findall(head))
        non_ascii = len(_NON_ASCII.findall(head))
    symbols, latex, arithmetic = _MATH_PARTS
    math_symbols = len(symbols.findall(head))
    if "\\" in head:
        math_symbols += len(latex.findall(head))
    numbers = 0
    if digits:  # both need a digit
        math_symbols += len(arithmetic.findall(head))
        numbers = len((_NUMBER_ASCII if w.ascii else _NUMBER).findall(head))
    return [
        math.log1p(len(text)),
        math.log1p(len(words)),
        math.log1p(text.count("\n")),
        1.0 if "```" in head else 0.0,
        math.log1p(sum(map(_CODE_WORDS.__contains__, words)) + len(_CODE_SYMBOLS.findall(head))),
        math.log1p(math_symbols),
        digits / n_head,
        math.log1p(numbers),
        math.log1p(head.count("?")),
        1.0 if any(c in head for c in _CHOICE_MARKS) and len(_CHOICE.findall(head)) >= 3 else 0.0,
        math.log1p(constraints),
        math.log1p(reasoning),
        non_ascii / n_head,
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
        return _proba(self.decision_one(text, tokens=tokens, structure=structure))


def _sigmoid(x: float) -> float:
    """The logistic function, without overflow for large ``|x|``."""
    if x >= 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def _proba(z: FloatArray) -> FloatArray:
    """Class probabilities from one prompt's decision values, as ``LogisticRegression`` gives."""
    if z.shape[0] == 1:
        p = _sigmoid(float(z[0]))
        return np.array([1.0 - p, p])
    e = np.exp(z - z.max())
    out: FloatArray = e / e.sum()
    return out


class _JointLinear:
    """Several :class:`PromptClassifier` models that tokenise alike, evaluated as one linear map.

    Each model's decision values are ``b + S @ s + (C * idf) @ l / sqrt((idf**2) @ l**2)`` with
    ``l = 1 + log(tf)`` over the prompt's n-grams in that model's vocabulary (sublinear TF-IDF, l2
    norm) and ``S`` the folded structure coefficients. Over the union of the vocabularies, row
    ``u`` of ``table`` holds every model's ``C * idf`` columns for token ``u`` and then each
    model's ``idf**2``, zero where a model does not know the token; row 0 is all zeros and stands
    for tokens that no model knows. So a prompt costs one tokenisation, one dictionary lookup per
    n-gram and one small matrix product, however many models there are.

    Built from the fitted models at load (nothing new is pickled); :meth:`decision` equals each
    model's :meth:`PromptClassifier.decision_one` to rounding (the tests pin it to sklearn).
    """

    def __init__(self, models: Sequence[PromptClassifier]) -> None:
        vec = _vectorizer(models[0])
        self.tokenize: Callable[[str], list[str]] = vec.build_tokenizer()
        self.token_pattern: str = vec.token_pattern
        self.ngram_range: tuple[int, int] = vec.ngram_range
        vocab: dict[str, int] = {}
        for model in models:
            for token in model.vocabulary_:
                vocab.setdefault(token, len(vocab) + 1)
        self.vocabulary = vocab
        # Bigrams also keyed by their two tokens, so the hot path looks a pair up without building
        # and hashing the joined string (tokens have no spaces, so the split is unique).
        self.pairs: dict[tuple[str, ...], int] | None = (
            {tuple(t.split(" ")): u for t, u in vocab.items() if " " in t}
            if self.ngram_range == (1, 2)
            else None
        )
        widths = [model.word_coef_.shape[0] for model in models]
        self.width = sum(widths)
        table = np.zeros((len(vocab) + 1, self.width + len(models)))
        structs: list[FloatArray] = []
        col = 0
        for k, model in enumerate(models):
            n = len(model.vocabulary_)
            rows = np.fromiter(map(vocab.__getitem__, model.vocabulary_), np.intp, n)
            cols = np.fromiter(model.vocabulary_.values(), np.intp, n)
            idf = model.idf_[cols]
            table[rows, col : col + widths[k]] = (model.word_coef_[:, cols] * idf).T
            table[rows, self.width + k] = idf * idf
            col += widths[k]
            structs.append(
                model.struct_coef_
                if model.use_structure
                else np.zeros((widths[k], len(STRUCTURE_FEATURES)))
            )
        self.table: FloatArray = table
        self.intercept: FloatArray = np.concatenate([model.intercept_ for model in models])
        self.struct: FloatArray = np.vstack(structs)
        self.owner = np.repeat(np.arange(len(models)), widths)
        self.splits = list(np.cumsum(widths)[:-1])

    def tokens(self, w: _Window) -> list[str]:
        """The prompt's word tokens, as the models' analyzer makes them (before n-grams)."""
        if w.lowered is not None and self.token_pattern == _DEFAULT_TOKEN_PATTERN:
            # \b\w\w+\b on ``low`` finds exactly its \w+ runs of two characters or more.
            return [t for t in w.lowered if len(t) > 1]
        return self.tokenize(w.low)

    def grams(self, tokens: list[str]) -> list[str]:
        """The word n-grams of ``tokens``, as the models' analyzer makes them."""
        lo, hi = self.ngram_range
        out = list(tokens) if lo == 1 else []
        for n in range(max(lo, 2), hi + 1):
            out += map(" ".join, zip(*(tokens[i:] for i in range(n)), strict=False))
        return out

    def ids(self, w: _Window) -> Counter[int]:
        """How often each vocabulary row occurs among the prompt's n-grams (row 0: unknown)."""
        tokens = self.tokens(w)
        if self.pairs is None:
            return Counter(map(self.vocabulary.get, self.grams(tokens), repeat(0)))
        return Counter(
            chain(
                map(self.vocabulary.get, tokens, repeat(0)),
                map(self.pairs.get, pairwise(tokens), repeat(0)),
            )
        )

    def decision(self, w: _Window, structure: list[float]) -> FloatArray:
        """All models' decision values for one prompt, side by side; :attr:`splits` separates
        them."""
        counts = self.ids(w)
        counts.pop(0, None)
        z = self.intercept + self.struct @ np.array(structure)
        if counts:
            n = len(counts)
            rows = self.table[np.fromiter(counts.keys(), np.intp, n)]
            if n == counts.total():  # every n-gram once: l = 1
                sums = rows.sum(axis=0)
                num, sq = sums[: self.width], sums[self.width :]
            else:
                sub = np.log(np.fromiter(counts.values(), np.float64, n))
                sub += 1.0
                num = sub @ rows[:, : self.width]
                sub *= sub
                sq = sub @ rows[:, self.width :]
            sq[sq == 0.0] = 1.0  # a model that knows none of the tokens: no word term
            z += num / np.sqrt(sq)[self.owner]
        out: FloatArray = z
        return out


def _vectorizer(model: PromptClassifier) -> TfidfVectorizer:
    vec: TfidfVectorizer = model.pipeline_.named_steps["features"].transformer_list[0][1]
    return vec


def _tokenises_alike(models: Sequence[PromptClassifier]) -> bool:
    """True when :class:`_JointLinear` reproduces these models' analyzers and weighting."""

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

    specs = {spec(_vectorizer(m)) for m in models}
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
#: :data:`_STAKES` and :data:`_DESTRUCTIVE` for lower-cased text (see :func:`_lower_equivalent`),
#: case-sensitive and with the rules' shared ``\b`` taken out of the alternation, which is what
#: lets the regex engine skip most positions quickly. Same matches, same order.
_STAKES_LOWER = re.compile(
    r"\b(?:"
    + "|".join(f"(?P<{domain}>{pattern.pattern[5:-3]})" for domain, pattern in _STAKES_RULES)
    + r")\b"
)
_DESTRUCTIVE_LOWER = re.compile(_DESTRUCTIVE.pattern)
_STAKES_LOWER_ASCII = _ascii(_STAKES_LOWER)
_DESTRUCTIVE_LOWER_ASCII = _ascii(_DESTRUCTIVE_LOWER)


def _alternatives(inner: str) -> list[str]:
    """The top-level branches of a regex alternation (``|`` outside any group)."""
    out, depth, start = [], 0, 0
    for i, c in enumerate(inner):
        if c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
        elif c == "|" and depth == 0:
            out.append(inner[start:i])
            start = i + 1
    out.append(inner[start:])
    return out


def _required_prefix(branch: str) -> str:
    """The literal word characters every match of ``branch`` starts with (a char followed by
    ``?``, ``*`` or ``{`` is optional, so the prefix stops before it)."""
    m = re.match(r"[a-z0-9]+", branch)
    literal = m.group(0) if m else ""
    if branch[len(literal) : len(literal) + 1] in ("?", "*", "{"):
        literal = literal[:-1]
    return literal


def _prefix_table(inners: Iterable[str]) -> dict[str, tuple[str, ...]]:
    table: dict[str, list[str]] = {}
    for inner in inners:
        for branch in _alternatives(inner):
            prefix = _required_prefix(branch)
            if len(prefix) < 2:
                raise ValueError(f"stakes rule {branch!r} needs a literal prefix of 2+ chars")
            table.setdefault(prefix[:2], []).append(prefix)
    return {key: tuple(prefixes) for key, prefixes in table.items()}


#: Every :data:`_STAKES_LOWER` match starts at the start of one of the text's ``\w+`` runs, and
#: that run starts with the literal prefix of the branch that matched (``diagnos``, ``chest``,
#: ``tumo``, ``mg``...). Keyed by a prefix's first two characters. A prompt none of whose words
#: starts with one of them cannot match, so :func:`_stakes` skips the regex scan for it.
_STAKES_PREFIXES = _prefix_table(pattern.pattern[5:-3] for _, pattern in _STAKES_RULES)


def _may_have_stakes(words: Iterable[str]) -> bool:
    """False only when no word starts with a :data:`_STAKES_PREFIXES` prefix (so no match)."""
    table = _STAKES_PREFIXES
    for word in words:
        prefixes = table.get(word[:2])
        if prefixes is not None and word.startswith(prefixes):
            return True
    return False


def assess_stakes(text: str, *, has_tools: bool = False, pii: bool = False) -> tuple[str, str]:
    """How much is at stake in a prompt: ``(level, reason)`` with level low/medium/high.

    Rules (documented in docs/model-card.md): a medical, legal, financial or safety keyword makes
    the prompt *high*; an agent workflow (``has_tools``) is *high* when it also asks for a
    destructive or money-moving action and otherwise *medium*; personal data alone is *medium*.
    """
    return _stakes(_Window(text), has_tools=has_tools, pii=pii)


def _stakes(w: _Window, *, has_tools: bool, pii: bool) -> tuple[str, str]:
    # assess_stakes on the prompt's window (which analyze() already has).
    head, low = w.head, w.low
    if not w.same_case:
        m = _STAKES.search(head)
    elif w.lowered is not None and not _may_have_stakes(w.lowered):
        m = None
    else:
        m = (_STAKES_LOWER_ASCII if w.ascii else _STAKES_LOWER).search(low)
    if m:
        return "high", f"{m.lastgroup} domain ({head[m.start() : m.end()].lower()!r})"
    if has_tools:
        destructive = _DESTRUCTIVE_LOWER_ASCII if w.ascii else _DESTRUCTIVE_LOWER
        m = destructive.search(low) if w.same_case else _DESTRUCTIVE.search(head)
        if m:
            return (
                "high",
                f"agent workflow with tools and action {head[m.start() : m.end()].lower()!r}",
            )
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
        # The decision path: both models as one linear map when they tokenise alike (as shipped).
        # Only plain PromptClassifiers: a subclass (the retrain loop's ResidualRouting) computes
        # its score from several rows, which one linear row cannot stand for.
        plain = type(routing) is PromptClassifier and type(capability) is PromptClassifier
        self._joint = (
            _JointLinear([routing, capability])
            if plain and self._share and _tokenises_alike([routing, capability])
            else None
        )

    def score(self, text: str) -> float:
        """The routing score alone (probability the strong model is materially better)."""
        if self._joint is None:
            return float(self.routing.predict_proba_one(text)[1])
        w = _Window(text)
        z = self._joint.decision(w, _structure(w))
        return _sigmoid(float(z[0]))

    def analyze(self, text: str, *, has_tools: bool = False) -> Analysis:
        """Score, capability, stakes and PII for one prompt (the proxy calls this per request)."""
        w = _Window(text)
        structure = _structure(w)
        if self._joint is not None:
            # Two models: decision values [routing logit, 9 capability logits]. The softmax is
            # monotone, so the capability is the arg-max of its logits; no probabilities needed.
            z = self._joint.decision(w, structure)
            score = _sigmoid(float(z[0]))
            cap_scores = z[self._joint.splits[0] :]
        else:
            tokens = self.routing.analyzer_(text)
            score = float(
                self.routing.predict_proba_one(text, tokens=tokens, structure=structure)[1]
            )
            if self._share:
                cap_scores = self.capability.predict_proba_one(
                    text, tokens=tokens, structure=structure
                )
            else:
                cap_scores = self.capability.predict_proba_one(text)
        kinds = pii_kinds(text)  # always the whole text: personal data anywhere counts
        stakes, reason = _stakes(w, has_tools=has_tools, pii=bool(kinds))
        return Analysis(
            score=score,
            capability=self._capabilities[int(np.argmax(cap_scores))],
            stakes=stakes,
            stakes_reason=reason,
            pii=bool(kinds),
            pii_kinds=kinds,
        )
