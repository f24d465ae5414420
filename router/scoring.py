"""The ``Scorer`` interface between a request's text and the routing policy.

A scorer turns the prompt into an :class:`Analysis`: the routing **score** (how likely the closed
model's answer is materially better than the local one; higher means "send to closed"), the task's
capability, its stakes and whether it carries PII. The policy reads these as signals.

Two implementations exist:

* :class:`HeuristicScorer`, a plainly named rule of thumb used only when no trained model is
  available (length, code, maths and question-form cues). It is documented as a heuristic.
* the learned scorer of a model artifact: :mod:`router.serving` (numpy only), loaded by
  :func:`router.artifact.load_scorer`; :mod:`router.classifier` fits the models it serves.

This module is pure: it imports no web code and no litellm.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

CAPABILITIES: tuple[str, ...] = (
    "coding",
    "math",
    "reasoning",
    "extraction",
    "summarization",
    "knowledge_qa",
    "creative_writing",
    "roleplay",
    "chat",
)
STAKES: tuple[str, ...] = ("low", "medium", "high")


@dataclass(frozen=True, slots=True)
class Analysis:
    """What a scorer says about one prompt."""

    score: float
    capability: str | None = None
    #: Why the capability is not the capability model's own label (:mod:`router.persona`).
    capability_reason: str | None = None
    stakes: str | None = None
    stakes_reason: str | None = None
    pii: bool = False
    pii_kinds: tuple[str, ...] = field(default_factory=tuple)
    #: The local model's profile: its accuracy on this prompt's capability, and its name.
    local_accuracy: float | None = None
    local_profile: str | None = None


@runtime_checkable
class Scorer(Protocol):
    """Anything that scores prompts for routing. ``name``/``version`` go into every record."""

    name: str
    version: str

    def analyze(self, text: str, *, has_tools: bool = False) -> Analysis:
        """Score one prompt (the conversation's text as the model would see it)."""
        ...


_CODE = re.compile(r"```|\bdef |\bclass |#include|\bfunction\b|;\s*$|\{\s*$", re.MULTILINE)
_MATH = re.compile(r"\d+\s*[-+*/^=]\s*\d+|\\frac|\\sum|\bprove\b|\bintegral\b|\bequation\b", re.I)
_REASON = re.compile(r"\b(why|explain|compare|analy[sz]e|step by step|trade-?offs?)\b", re.I)


class HeuristicScorer:
    """A rule-of-thumb scorer, used only when no trained model artifact is configured.

    It is not learned: longer prompts, code, maths and analysis requests score higher. It exists
    so that the proxy routes sensibly before ``tiergate train`` has produced a model. PII comes
    from the same deterministic detectors the learned scorer uses (:mod:`router.pii`).
    """

    name = "heuristic"
    version = "heuristic-1"

    def analyze(self, text: str, *, has_tools: bool = False) -> Analysis:
        """Score ``text`` from surface cues; see the class docstring."""
        length = min(len(text) / 4000.0, 1.0)
        score = 0.15 + 0.35 * length
        capability = "chat"
        if _CODE.search(text):
            score += 0.2
            capability = "coding"
        if _MATH.search(text):
            score += 0.2
            capability = "math"
        if _REASON.search(text):
            score += 0.1
            if capability == "chat":
                capability = "reasoning"
        if has_tools:
            score += 0.1
        from router.pii import pii_kinds

        kinds = pii_kinds(text)
        return Analysis(
            score=min(score, 1.0),
            capability=capability,
            stakes="low",
            pii=bool(kinds),
            pii_kinds=kinds,
        )
