"""The cascade: the local model answers first, and the request escalates when it doubts itself.

A prompt-only router must guess before anything is answered; the local model's own token
log-probabilities come free with its answer. The pieces here are pure (numpy only, no web code):

* :func:`answer_stats`: what an answer's first tokens say about it (the first token's margin over
  the runner-up, log-probability quantiles, entropy, length, whether it stopped), read from the
  OpenAI-shaped ``logprobs.content`` entries the local backend returns.
* :func:`features`: the confidence model's input, the answer's statistics beside the prompt's
  routing score and length; the one definition training and serving share.
* :class:`CascadeModel`: the fitted confidence model's serving form (a standardised logistic
  regression as plain arrays, fitted by :mod:`router.cascade_training`), and
  :func:`load_cascade`, which loads only an artifact whose sidecar and hashes check out.
* :func:`judge`: keep or escalate, with the confidence and the reason; a request that must stay
  local (privacy) is kept whatever the confidence.
* :class:`HoldBack`: a stream's first N tokens (or all of a short answer), held until the
  judgement, then released or discarded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import astuple, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from router.artifact import read_checked_npz, read_sidecar
from router.errors import ArtifactError, UpstreamBadResponseError
from router.locations import shipped

CASCADE_FORMAT = "tiergate-cascade"
CASCADE_FORMAT_VERSION = 1
CASCADE_FILE = "confidence.npz"
DEFAULT_CASCADE_NAME = "cascade-v1"
#: Tokens a stream holds back before the judgement: the statistics read at most this many.
DEFAULT_HOLD_BACK = 16
DEFAULT_THRESHOLD = 0.5
#: The confidence model's inputs, in :func:`features`' order.
PROMPT_FEATURES: tuple[str, ...] = ("routing_score", "log_prompt_chars")
ANSWER_FEATURES: tuple[str, ...] = (
    "first_margin",
    "first_logprob",
    "first_entropy",
    "min_logprob",
    "q25_logprob",
    "median_logprob",
    "mean_logprob",
    "mean_entropy",
    "log_tokens",
    "stopped",
)

Decision = Literal["kept", "escalated"]
#: A cascade's decision when it escalated, every closed model failed, and the local answer it
#: had discarded was served after all (header ``x-tiergate-cascade`` and the record).
ESCALATION_FAILED = "escalation-failed"
#: The recorded decisions of a cascade that judged its local answer doubtful.
ESCALATED = frozenset({"escalated", ESCALATION_FAILED})
FloatArray = NDArray[np.float64]


@dataclass(frozen=True, slots=True)
class AnswerStats:
    """What an answer's tokens say about it (log-probabilities in nats)."""

    first_margin: float
    first_logprob: float
    first_entropy: float
    min_logprob: float
    q25_logprob: float
    median_logprob: float
    mean_logprob: float
    mean_entropy: float
    log_tokens: float
    stopped: float

    def vector(self) -> list[float]:
        """The values in :data:`ANSWER_FEATURES` order."""
        return [float(v) for v in astuple(self)]


def _entropy(entry: Mapping[str, Any]) -> float:
    # The entropy of the next-token distribution as far as the top alternatives show it: their
    # probabilities plus the rest of the mass as one more outcome (a lower bound).
    top = [math.exp(float(t["logprob"])) for t in entry.get("top_logprobs") or []]
    if not top:
        p = math.exp(float(entry["logprob"]))
        top = [p]
    rest = max(0.0, 1.0 - sum(top))
    return -sum(p * math.log(p) for p in (*top, rest) if p > 0.0)


def _margin(entry: Mapping[str, Any]) -> float:
    # The chosen token's lead over the best other token (its whole log-probability when no
    # alternative is known: a margin over nothing).
    chosen = float(entry["logprob"])
    others = [
        float(t["logprob"]) for t in entry.get("top_logprobs") or [] if t["token"] != entry["token"]
    ]
    return chosen - max(others) if others else -chosen


def read_logprobs(choice: Mapping[str, Any]) -> list[dict[str, Any]]:
    """A choice's ``logprobs.content`` entries, checked so that :func:`answer_stats` can read
    them: each a token with a finite log-probability, and its alternatives alike.

    An external local server can send anything (log-probabilities that are not a list, a null
    for one): :class:`UpstreamBadResponseError`, a failure of the local model that the cascade
    escalates, not a 500 from reading them."""
    logprobs = choice.get("logprobs")
    if logprobs is None:
        return []
    content = logprobs.get("content") if isinstance(logprobs, Mapping) else logprobs
    if content is None:
        return []
    if not (isinstance(content, list) and all(_readable(e) for e in content)):
        raise UpstreamBadResponseError("the local model sent log-probabilities that cannot be read")
    return content


def _readable(entry: Any) -> bool:
    # A token and its finite log-probability, and the alternatives (``top_logprobs``) alike.
    if not isinstance(entry, dict) or not isinstance(entry.get("token"), str):
        return False
    logprob = entry.get("logprob")
    if isinstance(logprob, bool) or not isinstance(logprob, int | float):
        return False
    top = entry.get("top_logprobs")
    return math.isfinite(logprob) and (
        top is None or (isinstance(top, list) and all(_readable(t) for t in top))
    )


def answer_stats(
    logprobs: Sequence[Mapping[str, Any]],
    finish_reason: str | None,
    *,
    limit: int = DEFAULT_HOLD_BACK,
) -> AnswerStats:
    """The statistics of an answer's first ``limit`` tokens (``logprobs``: OpenAI's
    ``choices[0].logprobs.content``); ``finish_reason`` is ``stop`` when the model ended the
    answer itself within them. An empty answer reads as no confidence at all."""
    entries = list(logprobs)[:limit]
    if not entries:
        return AnswerStats(0.0, -20.0, 0.0, -20.0, -20.0, -20.0, -20.0, 0.0, 0.0, 0.0)
    lp = np.array([float(e["logprob"]) for e in entries])
    entropies = [_entropy(e) for e in entries]
    return AnswerStats(
        first_margin=_margin(entries[0]),
        first_logprob=float(lp[0]),
        first_entropy=entropies[0],
        min_logprob=float(lp.min()),
        q25_logprob=float(np.quantile(lp, 0.25)),
        median_logprob=float(np.median(lp)),
        mean_logprob=float(lp.mean()),
        mean_entropy=float(np.mean(entropies)),
        log_tokens=math.log1p(len(entries)),
        stopped=float(finish_reason == "stop"),
    )


def features(stats: AnswerStats | None, routing_score: float, prompt_chars: int) -> list[float]:
    """The confidence model's input: the prompt's routing score and length, then the answer's
    statistics (none for the prompt-only model the evaluation compares against)."""
    prompt = [float(routing_score), math.log1p(prompt_chars)]
    return prompt if stats is None else [*prompt, *stats.vector()]


def feature_names(with_answer: bool = True) -> tuple[str, ...]:
    """The names of :func:`features`' values."""
    return PROMPT_FEATURES + ANSWER_FEATURES if with_answer else PROMPT_FEATURES


#: The arrays of ``confidence.npz``: standardisation, then a logistic regression.
CASCADE_ARRAYS = ("mean", "scale", "coef", "intercept", "features")


class CascadeModel:
    """The confidence model as served: P(the local answer is right) from :func:`features`."""

    def __init__(self, arrays: Mapping[str, NDArray[Any]], version: str = "cascade") -> None:
        missing = [k for k in CASCADE_ARRAYS if k not in arrays]
        if missing:
            raise ValueError(f"missing arrays {missing}")
        self.features = tuple(str(f) for f in np.asarray(arrays["features"]).tolist())
        if self.features not in (feature_names(True), feature_names(False)):
            raise ValueError(f"features {self.features} are not this Tiergate's")
        n = len(self.features)
        self._mean = np.asarray(arrays["mean"], dtype=np.float64).reshape(n)
        self._scale = np.asarray(arrays["scale"], dtype=np.float64).reshape(n)
        self._coef = np.asarray(arrays["coef"], dtype=np.float64).reshape(n)
        self._intercept = float(np.asarray(arrays["intercept"], dtype=np.float64).reshape(()))
        self.version = version
        #: Quality and closed share against the threshold, from the model's evaluation (sidecar).
        self.curve: list[dict[str, float]] = []
        #: The scorer whose routing score it was fitted on (sidecar); None when unknown.
        self.scorer: str | None = None

    @property
    def reads_answer(self) -> bool:
        """Whether the model reads the answer's statistics (the cascade's) or the prompt only."""
        return len(self.features) > len(PROMPT_FEATURES)

    def arrays(self) -> dict[str, NDArray[Any]]:
        """The form's arrays, as ``confidence.npz`` holds them."""
        return {
            "mean": self._mean,
            "scale": self._scale,
            "coef": self._coef,
            "intercept": np.asarray(self._intercept),
            "features": np.asarray(self.features),
        }

    def confidence_of(self, x: Sequence[float] | FloatArray) -> FloatArray:
        """Confidence for rows of :func:`features` values (one row or a matrix)."""
        z = (np.asarray(x, dtype=np.float64) - self._mean) / self._scale
        return 1.0 / (1.0 + np.exp(-(z @ self._coef + self._intercept)))

    def confidence(
        self, stats: AnswerStats | None, routing_score: float, prompt_chars: int
    ) -> float:
        """P(the local answer is right) for one answer."""
        x = features(stats if self.reads_answer else None, routing_score, prompt_chars)
        return float(self.confidence_of(x))


def default_cascade_path() -> Path:
    """The shipped confidence model, ``models/cascade-v1``."""
    return shipped("models", DEFAULT_CASCADE_NAME)


def load_cascade(directory: str | Path | None = None) -> tuple[CascadeModel, dict[str, Any]]:
    """A confidence model artifact and its sidecar, refused (:class:`ArtifactError`) unless its
    format, its arrays' sha256 and its feature names are this Tiergate's."""
    d = Path(directory) if directory is not None else default_cascade_path()
    meta = read_sidecar(d, CASCADE_FILE, kind=CASCADE_FORMAT, version=CASCADE_FORMAT_VERSION)
    arrays = read_checked_npz(d / CASCADE_FILE, meta.get("sha256"), "confidence model")
    try:
        model = CascadeModel(arrays, str(meta.get("version", d.name)))
    except ValueError as exc:
        raise ArtifactError(f"{d / CASCADE_FILE}: unusable confidence model ({exc})") from exc
    curve = (meta.get("metrics") or {}).get("threshold_curve")
    if isinstance(curve, list):
        model.curve = [dict(p) for p in curve if isinstance(p, dict)]
    scorer = meta.get("scorer")
    model.scorer = str(scorer) if scorer else None
    return model, meta


@dataclass(frozen=True, slots=True)
class Judgement:
    """Keep the local answer or escalate, and why (for headers, the record and the trace)."""

    decision: Decision
    confidence: float
    threshold: float
    reason: str

    def as_record(self) -> dict[str, Any]:
        """The judgement as the outcome record's ``cascade`` entry holds it."""
        return {
            "decision": self.decision,
            "confidence": round(self.confidence, 4),
            "threshold": self.threshold,
            "reason": self.reason,
        }


def judge(confidence: float, threshold: float, *, may_escalate: bool = True) -> Judgement:
    """Escalate when ``confidence`` is below ``threshold``, unless the request may not leave the
    local model (``may_escalate`` false: a privacy rule), which keeps the local answer."""
    if confidence >= threshold:
        return Judgement("kept", confidence, threshold, "confident")
    if not may_escalate:
        return Judgement("kept", confidence, threshold, "local_only")
    return Judgement("escalated", confidence, threshold, "low_confidence")


@dataclass
class HoldBack:
    """A local stream's first ``tokens`` tokens, held until the judgement.

    :meth:`add` takes OpenAI chunk dicts as the local backend yields them and says when enough
    is held to judge: ``tokens`` log-probability entries, or the end of the answer.
    """

    tokens: int = DEFAULT_HOLD_BACK
    chunks: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, chunk: Mapping[str, Any]) -> bool:
        """Hold ``chunk``; True once the judgement can be made. Log-probabilities it cannot
        read are :class:`UpstreamBadResponseError` (:func:`read_logprobs`)."""
        self.chunks.append(dict(chunk))
        for choice in chunk.get("choices") or []:
            self.logprobs.extend(read_logprobs(choice))
            self.finish_reason = choice.get("finish_reason") or self.finish_reason
        return self.ready

    @property
    def ready(self) -> bool:
        """Enough is held: ``tokens`` tokens, or the whole (short) answer."""
        return self.finish_reason is not None or len(self.logprobs) >= self.tokens

    def stats(self) -> AnswerStats:
        """The held tokens' statistics (the answer is ``stopped`` only if it ended in them)."""
        return answer_stats(self.logprobs, self.finish_reason, limit=self.tokens)

    def text(self) -> str:
        """The held answer text."""
        return "".join(
            (choice.get("delta") or {}).get("content") or ""
            for chunk in self.chunks
            for choice in chunk.get("choices") or []
        )
