"""The learned classifier as the proxy serves it: one linear map over plain arrays, numpy only.

A model artifact (:mod:`router.artifact`) carries, beside the fitted scikit-learn estimators
(:mod:`router.classifier`), their **serving form**: plain arrays that :class:`ServingScorer`
evaluates as one :class:`JointLinear` map (or, for a profile head over a standalone capability
model, :class:`ProfileScorer`). The proxy, the CLI and training all score through these, so a
decision needs neither scikit-learn, scipy nor unpickling; both add the stakes rules
(:mod:`router.stakes`), PII (:mod:`router.pii`) and the persona rule on the capability
(:mod:`router.persona`). Pure: no web code, no litellm, nothing at import.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import chain, pairwise, repeat
from typing import Any, Protocol, runtime_checkable

import numpy as np
from numpy.typing import NDArray

from router.features import STRUCTURE_FEATURES, Window, structure, window_mismatch
from router.persona import served_label
from router.pii import pii_kinds
from router.profile import LocalProfile
from router.scoring import CAPABILITIES, Analysis
from router.stakes import assess

FloatArray = NDArray[np.float64]

_DEFAULT_TOKEN_PATTERN = r"(?u)\b\w\w+\b"  # scikit-learn's


def sigmoid(x: float) -> float:
    """The logistic function, without overflow for large ``|x|``."""
    if x >= 0.0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def logistic(z: FloatArray) -> FloatArray:
    """The logistic function of an array (by ``tanh``, which cannot overflow)."""
    out: FloatArray = 0.5 * (1.0 + np.tanh(0.5 * z))
    return out


def softmax(logits: FloatArray) -> FloatArray:
    """Class probabilities from a multinomial model's logits, as ``LogisticRegression`` gives
    them; one logit is a binary model's, for its second class."""
    if len(logits) == 1:
        p = sigmoid(float(logits[0]))
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
#: (the window of :mod:`router.features`) the features the coefficients were fitted on, which
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

    def tokens(self, w: Window) -> list[str]:
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

    def ids(self, w: Window) -> Counter[int]:
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

    def decision(self, w: Window, features: list[float]) -> FloatArray:
        """All models' decision values for one prompt, side by side; :attr:`splits` separates
        them."""
        counts = self.ids(w)
        counts.pop(0, None)
        z = self.intercept + self.struct @ np.array(features)
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
            q = softmax(z[self._rows :])
            return sigmoid(float(rows[0]) + slope * float(gap_logit(q, strong, self._local)))
        if self._cap_coef is not None:
            rows = rows + self._cap_coef @ softmax(z[self._rows :])
        if self._shift is None:
            return sigmoid(float(rows[0]))
        return sigmoid(float(residual_logit(rows, self._shift)))

    def _capability(self, z: FloatArray) -> str:
        # The softmax is monotone, so the capability is the arg-max of its logits; with one
        # logit (two classes) the second class when it is positive, as sklearn predicts.
        logits = z[self._joint.splits[0] :]
        index = int(np.argmax(logits)) if len(logits) > 1 else int(logits[0] > 0.0)
        return self._capabilities[index]

    def score(self, text: str) -> float:
        """The routing score alone (probability the strong model is materially better)."""
        w = Window(text)
        return self._routing_score(self._joint.decision(w, structure(w)))

    def analyze(self, text: str, *, has_tools: bool = False) -> Analysis:
        """Score, capability, stakes and PII for one prompt (the proxy calls this per request)."""
        w = Window(text)
        z = self._joint.decision(w, structure(w))  # [routing rows, capability logits]
        kinds = pii_kinds(text)  # always the whole text: personal data anywhere counts
        stakes, reason = assess(w, has_tools=has_tools, pii=bool(kinds))
        capability, capability_reason = served_label(self._capability(z), text)
        profile = self.profile
        return Analysis(
            score=self._routing_score(z),
            capability=capability,
            capability_reason=capability_reason,
            stakes=stakes,
            stakes_reason=reason,
            pii=bool(kinds),
            pii_kinds=kinds,
            local_accuracy=None if profile is None else profile.accuracy(capability),
            local_profile=None if profile is None else profile.label,
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


@runtime_checkable
class LabellingReader(CapabilityReader, Protocol):
    """A capability reader whose label may come from another model than its probabilities
    (:class:`router.capability.SplitCapability`): :meth:`read` gives both at once."""

    def read(self, text: str) -> tuple[FloatArray, FloatArray]:
        """The probabilities the score reads and those the label is the arg-max of."""
        ...


class ProfileScorer:
    """router-v4 over a standalone capability model: the score is
    ``logistic(intercept + slope * gap_logit(q, gap_strong, local))`` with ``q`` the capability
    model's probabilities and ``local`` the profile's accuracies; the capability is the arg-max
    of ``q``, or of the label's probabilities for a :class:`LabellingReader`, through
    :func:`router.persona.served_label`; stakes and PII as :class:`ServingScorer`'s. ``head``
    holds :data:`HEAD_ARRAYS`."""

    name = "learned"

    def __init__(
        self,
        capability: CapabilityReader,
        head: Mapping[str, NDArray[Any]],
        version: str,
        profile: LocalProfile,
        score_of: str | None = None,
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
        #: The router whose routing score this one's is (its sidecar's ``score_of``: the same
        #: head over the same capability probabilities), so a model fitted on that score, such
        #: as the cascade's confidence model, reads this one's too; None when it is its own.
        self.score_of = score_of
        self.profile = profile
        self._names = names
        self._strong = np.asarray(a["gap_strong"], dtype=np.float64)
        self._slope = float(a["gap_slope"])
        self._intercept = float(a["intercept"])
        self._local = profile_vector(profile, names)
        #: Whether a decision costs milliseconds (a capability model with an encoder), so the
        #: gateway scores every request off the event loop.
        self.costly = bool(getattr(capability, "costly", False))
        self._read = capability.read if isinstance(capability, LabellingReader) else None

    def with_profile(self, profile: LocalProfile) -> ProfileScorer:
        """The same model reading another local profile."""
        return ProfileScorer(self.capability, self.head, self.version, profile, self.score_of)

    def _score(self, q: FloatArray) -> float:
        return sigmoid(
            self._intercept + self._slope * float(gap_logit(q, self._strong, self._local))
        )

    def score(self, text: str) -> float:
        """The routing score alone."""
        return self._score(self.capability.probabilities(text))

    def analyze(self, text: str, *, has_tools: bool = False) -> Analysis:
        """Score, capability, stakes and PII for one prompt."""
        if self._read is not None:
            q, labelled = self._read(text)
        else:
            q = labelled = self.capability.probabilities(text)
        capability, capability_reason = served_label(self._names[int(np.argmax(labelled))], text)
        kinds = pii_kinds(text)
        stakes, reason = assess(Window(text), has_tools=has_tools, pii=bool(kinds))
        return Analysis(
            score=self._score(q),
            capability=capability,
            capability_reason=capability_reason,
            stakes=stakes,
            stakes_reason=reason,
            pii=bool(kinds),
            pii_kinds=kinds,
            local_accuracy=self.profile.accuracy(capability),
            local_profile=self.profile.label,
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
