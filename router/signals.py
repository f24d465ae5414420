"""Cheap signals read from a chat request, before any model runs.

:func:`extract_signals` turns an OpenAI chat request (a plain dict) plus the scorer's
:class:`~router.scoring.Analysis` into a :class:`Signals` value, the only input the policy sees.
It is pure and fast: no tokenizer, no network. Token counts are estimated from characters
(about four per token for English, rounded up), which is what the long-context rule needs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from router.scoring import Analysis, Scorer

CHARS_PER_TOKEN = 3.5
# Per-message framing a chat template adds (role markers, separators).
TOKENS_PER_MESSAGE = 4


@dataclass(frozen=True, slots=True)
class Signals:
    """Everything the policy may match on for one request. Never holds the prompt text."""

    alias: str
    tenant: str = "default"
    prompt_tokens: int = 0
    max_tokens: int | None = None
    has_images: bool = False
    has_tools: bool = False
    turns: int = 1
    score: float = 0.0
    capability: str | None = None
    stakes: str | None = None
    stakes_reason: str | None = None
    pii: bool = False
    pii_kinds: tuple[str, ...] = ()
    local_accuracy: float | None = None
    local_profile: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view for records, headers and explanations."""
        return {
            "alias": self.alias,
            "tenant": self.tenant,
            "prompt_tokens": self.prompt_tokens,
            "max_tokens": self.max_tokens,
            "has_images": self.has_images,
            "has_tools": self.has_tools,
            "turns": self.turns,
            "score": round(self.score, 6),
            "capability": self.capability,
            "stakes": self.stakes,
            "stakes_reason": self.stakes_reason,
            "pii": self.pii,
            "pii_kinds": list(self.pii_kinds),
            "local_accuracy": self.local_accuracy,
            "local_profile": self.local_profile,
            "headers": dict(self.headers),
            "metadata": dict(self.metadata),
        }


def message_text(message: Mapping[str, Any]) -> str:
    """The text parts of one message's ``content`` (string or content-part array)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return ""


def has_image_parts(messages: list[Mapping[str, Any]]) -> bool:
    """True when any message carries an image (or other non-text) content part."""
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and part.get("type") not in (None, "text"):
                    return True
    return False


def scoring_text(messages: list[Mapping[str, Any]]) -> str:
    """The text the scorer reads: the last user turn, which carries the task."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message_text(message)
    return message_text(messages[-1]) if messages else ""


def estimate_tokens(messages: list[Mapping[str, Any]], tools: Any = None) -> int:
    """Conservative prompt-token estimate from characters (see module docstring)."""
    chars = sum(len(message_text(m)) for m in messages)
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            chars += len(str(calls))
    if tools:
        chars += len(str(tools))
    return int(chars / CHARS_PER_TOKEN + 0.999) + TOKENS_PER_MESSAGE * len(messages)


def extract_signals(
    body: Mapping[str, Any],
    scorer: Scorer,
    *,
    tenant: str = "default",
    headers: Mapping[str, str] | None = None,
) -> Signals:
    """Read the request's signals and score it. ``body`` is a validated chat request dict."""
    messages: list[Mapping[str, Any]] = list(body.get("messages") or [])
    tools = body.get("tools") or body.get("functions")
    has_tools = bool(tools) or any(m.get("role") == "tool" for m in messages)
    analysis: Analysis = scorer.analyze(scoring_text(messages), has_tools=has_tools)
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    metadata = body.get("metadata")
    return Signals(
        alias=str(body.get("model", "auto")),
        tenant=tenant,
        prompt_tokens=estimate_tokens(messages, tools),
        max_tokens=int(max_tokens) if isinstance(max_tokens, int) else None,
        has_images=has_image_parts(messages),
        has_tools=has_tools,
        turns=sum(1 for m in messages if m.get("role") == "user"),
        score=analysis.score,
        capability=analysis.capability,
        stakes=analysis.stakes,
        stakes_reason=analysis.stakes_reason,
        pii=analysis.pii,
        pii_kinds=analysis.pii_kinds,
        local_accuracy=analysis.local_accuracy,
        local_profile=analysis.local_profile,
        headers=dict(headers or {}),
        metadata=dict(metadata) if isinstance(metadata, Mapping) else {},
    )
