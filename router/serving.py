"""The learned classifier as the proxy serves it: its features and one linear map, numpy only.

A model artifact (:mod:`router.artifact`) holds the fitted scikit-learn estimators
(:mod:`router.classifier`) and, beside them, their **serving form**: the plain arrays that this
module evaluates, so the proxy scores requests without importing scikit-learn or scipy (about
100 MB of resident memory) and without unpickling anything.

* :func:`structure_vector` / :class:`_Window`: the transparent structure features (length, code,
  maths, question form, constraints, multiple choice) over a bounded window of the prompt
  (:func:`clip`). The estimators' :class:`~router.classifier.StructureFeatures` uses these same
  functions, so training and serving compute every feature by one definition.
* stakes: :mod:`router.stakes` (a documented keyword/regex rule set) reads the same window.
* :class:`JointLinear`: the routing and capability models as one linear map over their joint
  vocabulary, built from the serving form's arrays. A routing row may also weigh the capability
  model's class probabilities (``cap_coef``, router-v3), added after the map.
* :class:`ServingScorer`: the :class:`router.scoring.Scorer` the proxy uses. Per request it reads
  the prompt once, evaluates both models with one lookup per n-gram and one small matrix product,
  and adds the stakes rules (:mod:`router.stakes`) and the PII detectors (:mod:`router.pii`).

This module is pure: it imports no web code, no litellm, no scikit-learn and no scipy, and
nothing happens at import beyond compiling its regexes. tests/test_serving.py pins its scores to
scikit-learn's ``predict_proba`` and checks, in a fresh interpreter, that the proxy's loader
imports neither library.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain, pairwise, repeat
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from router.pii import pii_kinds
from router.profile import LocalProfile
from router.scoring import CAPABILITIES, Analysis
from router.stakes import assess

FloatArray = NDArray[np.float64]

#: Only a bounded window of a prompt is tokenised and scanned by the regex features: its first
#: HEAD_CHARS and last TAIL_CHARS characters (the instruction is usually at the start or the end
#: of a long pasted document). The length and line-count features still see the full text, and
#: fit and predict clip identically (:func:`clip`), so the per-decision cost is bounded. Models
#: record the window they were fitted with, and loading refuses another. 1,000 + 250 halves the
#: cost of a long prompt against the first shipped model's 2,000 + 500 at no loss in grouped-CV
#: APGR (``bench/window_study.py``; docs/model-card.md).
HEAD_CHARS = 1000
TAIL_CHARS = 250
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


def window_mismatch(head: int, tail: int) -> str | None:
    """Why a model fitted on a ``head`` + ``tail`` window cannot be served here, or None when
    that is this module's window."""
    if (head, tail) == (HEAD_CHARS, TAIL_CHARS):
        return None
    return (
        f"fitted on a {head} + {tail} character prompt window, this Tiergate uses "
        f"{HEAD_CHARS} + {TAIL_CHARS}; retrain with `tiergate train`"
    )


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


def _sigmoid(x: float) -> float:
    """The logistic function, without overflow for large ``|x|``."""
    if x >= 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


# --- the linear map and the scorer ---------------------------------------------------------------


def logistic(z: FloatArray) -> FloatArray:
    """The logistic function of an array (by ``tanh``, which cannot overflow)."""
    out: FloatArray = 0.5 * (1.0 + np.tanh(0.5 * z))
    return out


def _softmax(logits: FloatArray) -> FloatArray:
    """Class probabilities from a multinomial model's logits, as ``LogisticRegression`` gives
    them; one logit is a binary model's, for its second class."""
    if len(logits) == 1:
        p = _sigmoid(float(logits[0]))
        return np.array([1.0 - p, p])
    e = np.exp(logits - logits.max())
    out: FloatArray = e / e.sum()
    return out


def residual_logit(z3: FloatArray, shift: float) -> FloatArray:
    """The routing logit of a residual model (:mod:`router.residual`) from its three rows
    ``[base, gate, head]`` (last axis): ``base + logistic(gate) * (head - shift - base)``."""
    base, gate, head = z3[..., 0], z3[..., 1], z3[..., 2]
    out: FloatArray = base + logistic(gate) * (head - shift - base)
    return out


#: How the routing model's decision rows become the routing score: ``logistic`` is one row (a
#: plain logistic regression); ``residual`` is three, combined by :func:`residual_logit`;
#: ``profile`` (router-v4) is one row plus the gap term of :func:`gap_logit`, which reads the
#: local model's profile.
ROUTING_ROWS: dict[str, int] = {"logistic": 1, "residual": 3, "profile": 1}

#: The gap term is clipped to [GAP_EPS, 1 - GAP_EPS] before its logit (a profile may say 0 or 1).
GAP_EPS = 1e-3


def profile_vector(profile: LocalProfile, capabilities: Sequence[str]) -> FloatArray:
    """The profile's accuracy per capability, in ``capabilities`` order (its default where it
    says nothing)."""
    return np.array([profile.accuracy(c) for c in capabilities], dtype=np.float64)


def gap_logit(q: FloatArray, strong: FloatArray, local: FloatArray) -> FloatArray:
    """The logit of the strong model's expected advantage on a prompt: ``sum_c q_c *
    strong_c * (1 - local_c)`` (last axis), where ``q`` are the capability probabilities,
    ``strong`` the strong model's accuracy and ``local`` the local profile's per capability.
    It falls as any ``local_c`` rises, so a better local model never raises a score."""
    g = np.clip((q * (strong * (1.0 - local))).sum(axis=-1), GAP_EPS, 1.0 - GAP_EPS)
    out: FloatArray = np.log(g / (1.0 - g))
    return out


#: The arrays of a serving form, by name: (dtype kind, number of dimensions). ``vocabulary`` is
#: the joint vocabulary in row order (row ``u`` of ``table`` is token ``u - 1``; row 0 stands
#: for unknown tokens); ``widths`` the routing and capability models' decision rows;
#: ``capabilities`` the capability rows' class names; ``structure_features`` and ``clip``
#: (:data:`HEAD_CHARS`, :data:`TAIL_CHARS`) the features the coefficients were fitted on, which
#: must be this module's; ``shift`` the residual model's (0 for a logistic one); ``cap_coef``
#: (routing rows x capabilities) what the routing rows add per unit of each capability's
#: probability (:class:`~router.classifier.CapabilityRouting`; all zero for a model without).
FORM_ARRAYS: dict[str, tuple[str, int]] = {
    "vocabulary": ("U", 1),
    "table": ("f", 2),
    "intercept": ("f", 1),
    "struct": ("f", 2),
    "widths": ("i", 1),
    "capabilities": ("U", 1),
    "routing": ("U", 0),
    "shift": ("f", 0),
    "cap_coef": ("f", 2),
    "token_pattern": ("U", 0),
    "ngram_range": ("i", 1),
    "structure_features": ("U", 1),
    "clip": ("i", 1),
    "gap_strong": ("f", 1),
    "gap_slope": ("f", 0),
}


#: Arrays that serving forms written before them lack; such a form reads as all zeros there.
#: ``gap_strong`` (the strong model's accuracy per capability) and ``gap_slope`` (the gap
#: term's weight) are required by, and only by, the ``profile`` routing kind (format 3).
OPTIONAL_FORM_ARRAYS = frozenset({"cap_coef", "gap_strong", "gap_slope"})


class JointLinear:
    """The routing and capability models, which tokenise alike, evaluated as one linear map.

    Each model's decision values are ``b + S @ s + (C * idf) @ l / sqrt((idf**2) @ l**2)`` with
    ``l = 1 + log(tf)`` over the prompt's n-grams in that model's vocabulary (sublinear TF-IDF, l2
    norm) and ``S`` the folded structure coefficients. Over the union of the vocabularies, row
    ``u`` of ``table`` holds every model's ``C * idf`` columns for token ``u`` and then each
    model's ``idf**2``, zero where a model does not know the token; row 0 is all zeros and stands
    for tokens that no model knows. So a prompt costs one tokenisation, one dictionary lookup per
    n-gram and one small matrix product, however many models there are.

    Built from a serving form's arrays (:data:`FORM_ARRAYS`), which
    :func:`router.classifier.serving_form` derives from the fitted models; :meth:`decision`
    equals each model's ``decision_function`` to rounding (the tests pin it to sklearn).
    """

    def __init__(
        self,
        vocabulary: Iterable[str],
        table: FloatArray,
        intercept: FloatArray,
        struct: FloatArray,
        widths: Sequence[int],
        *,
        token_pattern: str,
        ngram_range: tuple[int, int],
    ) -> None:
        # What scikit-learn's TfidfVectorizer.build_tokenizer() returns for a token pattern.
        self.tokenize: Callable[[str], list[str]] = re.compile(token_pattern).findall
        self.token_pattern = token_pattern
        self.ngram_range = ngram_range
        self.vocabulary: dict[str, int] = {}
        self.pairs: dict[tuple[str, ...], int] | None = None
        if self.ngram_range != (1, 2):
            self.vocabulary = {token: row for row, token in enumerate(vocabulary, 1)}
        else:
            # Bigrams keyed by their two tokens only, so the hot path looks a pair up without
            # building and hashing the joined string (tokens have no spaces, so the split is
            # unique); their tokens are shared string objects, which keeps the map small.
            self.pairs = {}
            words: dict[str, str] = {}
            for row, token in enumerate(vocabulary, 1):
                if " " in token:
                    pair = tuple(words.setdefault(t, t) for t in token.split(" "))
                    self.pairs[pair] = row
                else:
                    self.vocabulary[words.setdefault(token, token)] = row
        self.width = int(sum(widths))
        self.table: FloatArray = table
        self.intercept: FloatArray = intercept
        self.struct: FloatArray = struct
        self.owner = np.repeat(np.arange(len(widths)), widths)
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


def _form_array(form: Mapping[str, NDArray[Any]], key: str) -> NDArray[Any]:
    return _checked(form, key, *FORM_ARRAYS[key], what="serving form")


class ServingScorer:
    """The shipped :class:`router.scoring.Scorer` as the proxy serves it, from a serving form.

    ``form`` maps the names of :data:`FORM_ARRAYS` to arrays (as :func:`numpy.load` reads them
    from ``serving.npz``); they are checked for names, kinds, shapes and consistency with this
    module's features, and a :class:`ValueError` says what does not fit. Scores and capabilities
    equal those of the :class:`~router.classifier.LearnedScorer` the form was derived from.

    ``profile``: the local model's profile (:mod:`router.profile`). A ``profile`` routing kind
    (router-v4) reads it in its score and needs one; every analysis also reports the profile's
    accuracy for the prompt's capability (the policy's ``local_accuracy`` signal).
    """

    name = "learned"

    def __init__(
        self,
        form: Mapping[str, NDArray[Any]],
        version: str,
        profile: LocalProfile | None = None,
    ) -> None:
        if not set(FORM_ARRAYS) - OPTIONAL_FORM_ARRAYS <= set(form) <= set(FORM_ARRAYS):
            raise ValueError(f"serving form: arrays {sorted(form)}, expected {sorted(FORM_ARRAYS)}")
        a = {key: _form_array(form, key) for key in FORM_ARRAYS if key in form}
        if a["structure_features"].tolist() != list(STRUCTURE_FEATURES):
            raise ValueError("serving form: fitted on other structure features than these")
        if (mismatch := window_mismatch(*a["clip"].tolist())) is not None:
            raise ValueError(f"serving form: {mismatch}")
        routing = str(a["routing"])
        widths = [int(x) for x in a["widths"]]
        capabilities = [str(c) for c in a["capabilities"]]
        vocabulary, table = a["vocabulary"], a["table"]
        width = sum(widths)
        # A capability model with two classes has one row, for its second class (as sklearn's).
        n_capabilities = widths[1] if widths[1] > 1 else 2
        if (
            routing not in ROUTING_ROWS
            or len(widths) != 2
            or widths[0] != ROUTING_ROWS[routing]
            or min(widths) < 1
            or len(capabilities) != n_capabilities
            or not set(capabilities) <= set(CAPABILITIES)
            or table.shape != (len(vocabulary) + 1, width + len(widths))
            or a["intercept"].shape != (width,)
            or a["struct"].shape != (width, len(STRUCTURE_FEATURES))
            or a["ngram_range"].shape != (2,)
        ):
            raise ValueError("serving form: inconsistent routing kind, widths or array shapes")
        cap_coef = a.get("cap_coef")
        if cap_coef is not None and cap_coef.shape != (widths[0], n_capabilities):
            raise ValueError("serving form: cap_coef is not (routing rows, capabilities)")
        gap_strong, gap_slope = a.get("gap_strong"), a.get("gap_slope")
        if (routing == "profile") != (gap_strong is not None and gap_slope is not None):
            raise ValueError("serving form: gap_strong/gap_slope go with, and only with, 'profile'")
        if gap_strong is not None and gap_strong.shape != (n_capabilities,):
            raise ValueError("serving form: gap_strong is not one value per capability")
        if routing == "profile" and profile is None:
            raise ValueError("serving form: a 'profile' routing score needs a local profile")
        lo, hi = (int(n) for n in a["ngram_range"])
        self.version = version
        self._joint = JointLinear(
            vocabulary.tolist(),
            np.asarray(table, dtype=np.float64),
            np.asarray(a["intercept"], dtype=np.float64),
            np.asarray(a["struct"], dtype=np.float64),
            widths,
            token_pattern=str(a["token_pattern"]),
            ngram_range=(lo, hi),
        )
        self._capabilities = capabilities
        self._shift = float(a["shift"]) if routing == "residual" else None
        self._rows = widths[0]
        self._cap_coef: FloatArray | None = None
        if cap_coef is not None and cap_coef.any():
            self._cap_coef = np.asarray(cap_coef, dtype=np.float64)
        self.form = form
        self.profile = profile
        self._local = None if profile is None else profile_vector(profile, capabilities)
        self._gap: tuple[FloatArray, float] | None = None
        if gap_strong is not None and gap_slope is not None:
            self._gap = (np.asarray(gap_strong, dtype=np.float64), float(gap_slope))

    def with_profile(self, profile: LocalProfile) -> ServingScorer:
        """The same model reading another local profile (the form's arrays are shared)."""
        return ServingScorer(self.form, self.version, profile)

    def _routing_score(self, z: FloatArray) -> float:
        rows = z[: self._rows]
        if self._gap is not None and self._local is not None:
            strong, slope = self._gap
            q = _softmax(z[self._rows :])
            return _sigmoid(float(rows[0]) + slope * float(gap_logit(q, strong, self._local)))
        if self._cap_coef is not None:
            rows = rows + self._cap_coef @ _softmax(z[self._rows :])
        if self._shift is None:
            return _sigmoid(float(rows[0]))
        return _sigmoid(float(residual_logit(rows, self._shift)))

    def _capability(self, z: FloatArray) -> str:
        # The softmax is monotone, so the capability is the arg-max of its logits; with one
        # logit (two classes) the second class when it is positive, as sklearn predicts.
        logits = z[self._joint.splits[0] :]
        index = int(np.argmax(logits)) if len(logits) > 1 else int(logits[0] > 0.0)
        return self._capabilities[index]

    def score(self, text: str) -> float:
        """The routing score alone (probability the strong model is materially better)."""
        w = _Window(text)
        return self._routing_score(self._joint.decision(w, _structure(w)))

    def analyze(self, text: str, *, has_tools: bool = False) -> Analysis:
        """Score, capability, stakes and PII for one prompt (the proxy calls this per request)."""
        w = _Window(text)
        z = self._joint.decision(w, _structure(w))  # [routing rows, capability logits]
        kinds = pii_kinds(text)  # always the whole text: personal data anywhere counts
        stakes, reason = assess(w, has_tools=has_tools, pii=bool(kinds))
        capability = self._capability(z)
        profile = self.profile
        return Analysis(
            score=self._routing_score(z),
            capability=capability,
            stakes=stakes,
            stakes_reason=reason,
            pii=bool(kinds),
            pii_kinds=kinds,
            local_accuracy=None if profile is None else profile.accuracy(capability),
            local_profile=None if profile is None else profile.model,
        )


class CapabilityReader(Protocol):
    """A capability model as the proxy serves it (numpy only): probabilities over its
    ``capabilities`` for one prompt."""

    capabilities: tuple[str, ...]
    version: str

    def probabilities(self, text: str) -> FloatArray:
        """P(capability | text), in :attr:`capabilities` order."""
        ...


#: The arrays of a profile head (serving form 4): the gap term's strong-model accuracy per
#: capability, its slope, the intercept, and the capabilities they are ordered by.
HEAD_ARRAYS: dict[str, tuple[str, int]] = {
    "capabilities": ("U", 1),
    "gap_strong": ("f", 1),
    "gap_slope": ("f", 0),
    "intercept": ("f", 0),
}


class ProfileScorer:
    """router-v4 over a standalone capability model: the score is
    ``logistic(intercept + slope * gap_logit(q, gap_strong, local))`` with ``q`` the capability
    model's probabilities and ``local`` the profile's accuracies; stakes and PII as
    :class:`ServingScorer`'s. ``head`` holds :data:`HEAD_ARRAYS`."""

    name = "learned"

    def __init__(
        self,
        capability: CapabilityReader,
        head: Mapping[str, NDArray[Any]],
        version: str,
        profile: LocalProfile,
    ) -> None:
        a = {
            key: _checked(head, key, kind, ndim, what="profile head")
            for key, (kind, ndim) in HEAD_ARRAYS.items()
        }
        names = tuple(str(c) for c in a["capabilities"])
        if names != tuple(capability.capabilities) or a["gap_strong"].shape != (len(names),):
            raise ValueError("profile head: capabilities do not match the capability model")
        if float(a["gap_slope"]) < 0.0:
            raise ValueError("profile head: a negative gap slope would invert the score")
        self.head = head
        self.capability = capability
        self.version = version
        self.profile = profile
        self._names = names
        self._strong = np.asarray(a["gap_strong"], dtype=np.float64)
        self._slope = float(a["gap_slope"])
        self._intercept = float(a["intercept"])
        self._local = profile_vector(profile, names)

    def with_profile(self, profile: LocalProfile) -> ProfileScorer:
        """The same model reading another local profile."""
        return ProfileScorer(self.capability, self.head, self.version, profile)

    def _score(self, q: FloatArray) -> float:
        return _sigmoid(
            self._intercept + self._slope * float(gap_logit(q, self._strong, self._local))
        )

    def score(self, text: str) -> float:
        """The routing score alone."""
        return self._score(self.capability.probabilities(text))

    def analyze(self, text: str, *, has_tools: bool = False) -> Analysis:
        """Score, capability, stakes and PII for one prompt."""
        q = self.capability.probabilities(text)
        capability = self._names[int(np.argmax(q))]
        kinds = pii_kinds(text)
        stakes, reason = assess(_Window(text), has_tools=has_tools, pii=bool(kinds))
        return Analysis(
            score=self._score(q),
            capability=capability,
            stakes=stakes,
            stakes_reason=reason,
            pii=bool(kinds),
            pii_kinds=kinds,
            local_accuracy=self.profile.accuracy(capability),
            local_profile=self.profile.model,
        )


def _checked(
    arrays: Mapping[str, NDArray[Any]], key: str, kind: str, ndim: int, *, what: str
) -> NDArray[Any]:
    # One named array of a serving form or head, checked for kind, rank and finiteness.
    arr = arrays.get(key)
    if not isinstance(arr, np.ndarray) or arr.dtype.kind != kind or arr.ndim != ndim:
        raise ValueError(f"{what}: {key!r} must be a {ndim}-d array of kind {kind!r}")
    if kind == "f" and not np.isfinite(arr).all():
        raise ValueError(f"{what}: {key!r} holds NaN or infinite values")
    return arr
