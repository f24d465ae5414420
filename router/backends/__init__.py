"""Backends serve a chat request on one tier: the local GGUF model or a closed API.

Every backend speaks OpenAI's chat format in and out (plain dicts), so the web layer never
branches on the provider. A backend raises only :mod:`router.errors` exceptions; the mapping from
httpx, litellm or llama.cpp exceptions happens inside the backend, in one place each.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from router.errors import UpstreamBadResponseError

#: How a front's optional fields (``Call.optional``) name a field of the chat messages:
#: ``messages.thinking_blocks`` is that field of any message.
MESSAGE_FIELD = "messages."


class ModelLike(Protocol):
    """The parts of a policy ``ModelSpec`` a backend reads."""

    @property
    def name(self) -> str: ...
    @property
    def tier(self) -> str: ...
    @property
    def litellm_model(self) -> str | None: ...
    @property
    def api_base(self) -> str | None: ...
    @property
    def api_key_env(self) -> str | None: ...
    @property
    def timeout_s(self) -> float | None: ...
    @property
    def transport(self) -> str: ...
    @property
    def max_output_tokens(self) -> int | None: ...
    @property
    def context_window(self) -> int | None: ...


@dataclass(slots=True)
class Usage:
    """Token counts of one call; filled in as a stream goes, complete once it ends.

    ``generation_s`` is the time the local model spent generating (queueing excluded); the local
    tier's per-GPU-hour price is charged on it. ``cached_tokens`` and ``cache_write_tokens`` are
    the prompt tokens (counted in ``prompt_tokens``) the provider read from and wrote to its
    prompt cache, which it bills at other prices; ``cache_write_1h_tokens``, those of the writes
    Anthropic keeps an hour rather than five minutes, which it bills dearer still.
    ``web_searches`` counts the searches a provider's own web search tool made (Anthropic's
    ``server_tool_use.web_search_requests``), which it bills per search. ``response_model`` is
    the provider's own name for the model that answered (:func:`answered_as`), empty where it
    gave none.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    generation_s: float = 0.0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    cache_write_1h_tokens: int = 0
    web_searches: int = 0
    response_model: str = ""

    def take(self, other: Usage) -> None:
        """Copy ``other``'s counts (a stream's closing usage) into this one."""
        self.prompt_tokens, self.completion_tokens = other.prompt_tokens, other.completion_tokens
        self.cached_tokens, self.cache_write_tokens = other.cached_tokens, other.cache_write_tokens
        self.cache_write_1h_tokens, self.web_searches = (
            other.cache_write_1h_tokens,
            other.web_searches,
        )


def answered_as(answer: dict[str, Any], name: str, usage: Usage) -> None:
    """Name ``name``, the policy's model, as the model of ``answer`` (a body or chunk the
    client reads), keeping in ``usage`` the name the provider gave it (a dated snapshot,
    ``gpt-4o-2024-08-06`` for ``gpt-4o``): telemetry's ``gen_ai.response.model``."""
    said = answer.get("model")
    if isinstance(said, str) and said:
        usage.response_model = said
    answer["model"] = name


@dataclass(slots=True)
class Completion:
    """A finished non-streaming answer: the OpenAI ``chat.completion`` body and its usage."""

    body: dict[str, Any]
    usage: Usage


class Backend(Protocol):
    """One tier's way of answering. ``stream`` yields OpenAI ``chat.completion.chunk`` dicts."""

    def unavailable_reason(self, model: ModelLike) -> str | None:
        """None when ``model`` can be served now, else a short reason (no key, not loaded...)."""
        ...

    async def complete(
        self, model: ModelLike, body: dict[str, Any], usage: Usage | None = None
    ) -> Completion:
        """Answer ``body`` (an OpenAI chat request) in one piece. A backend that can fills in
        ``usage`` as it generates, so a call cancelled midway still tells what it used."""
        ...

    def stream(
        self, model: ModelLike, body: dict[str, Any], usage: Usage
    ) -> AsyncIterator[dict[str, Any]]:
        """Answer ``body`` as chunks, updating ``usage`` as they come."""
        ...

    async def aclose(self) -> None:
        """Release connections, threads and models."""
        ...


@runtime_checkable
class Addressed(Protocol):
    """A backend that calls a server and can say which: telemetry's CLIENT spans name it
    (``server.address``, ``server.port``). The in-process llama.cpp backend calls none."""

    def server_url(self, model: ModelLike) -> str | None:
        """The URL this backend calls for ``model`` (a base URL; telemetry keeps its host and
        port only), or None where the backend does not choose it (litellm's own default)."""
        ...


def usage_from_body(body: dict[str, Any], label: str = "the upstream") -> Usage:
    """Read OpenAI's ``usage`` object (absent or partial is fine).

    The prompt tokens read from the prompt cache are ``prompt_tokens_details.cached_tokens``;
    those written to it (litellm reports them for Anthropic models) ``cache_creation_input_tokens``,
    and of these the one-hour cache's ``prompt_tokens_details.cache_creation_token_details``
    ``.ephemeral_1h_input_tokens`` (litellm's copy of Anthropic's ``cache_creation``). The web
    searches are litellm's copy of Anthropic's ``server_tool_use.web_search_requests``.
    A ``usage`` that is not an object of token counts is a malformed answer: raised as
    :class:`UpstreamBadResponseError`, an upstream failure that falls back like any other.
    """
    raw = body.get("usage") or {}
    if not isinstance(raw, dict):
        raise UpstreamBadResponseError(f"{label} sent a 'usage' that is not an object")
    counts = [raw.get("prompt_tokens") or 0, raw.get("completion_tokens") or 0]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts):
        raise UpstreamBadResponseError(f"{label} sent token counts that are not counts")
    details = raw.get("prompt_tokens_details")
    details = details if isinstance(details, dict) else {}
    return Usage(
        prompt_tokens=counts[0],
        completion_tokens=counts[1],
        cached_tokens=token_count(details.get("cached_tokens")),
        cache_write_tokens=token_count(raw.get("cache_creation_input_tokens")),
        cache_write_1h_tokens=one_hour_writes(details.get("cache_creation_token_details")),
        web_searches=web_searches(raw.get("server_tool_use")),
    )


def web_searches(server_tool_use: Any) -> int:
    """The web searches of Anthropic's ``server_tool_use`` (litellm's copy of it too), billed
    per search; its web fetches are not counted, as they are billed as tokens alone."""
    if not isinstance(server_tool_use, dict):
        return 0
    return token_count(server_tool_use.get("web_search_requests"))


def one_hour_writes(by_lifetime: Any) -> int:
    """The prompt-cache writes kept an hour, of Anthropic's writes by lifetime (its
    ``cache_creation``, litellm's ``cache_creation_token_details``); 0 where the usage does not
    break them down (all at the five-minute price, as Anthropic's usage before the one-hour
    cache, and litellm, count them)."""
    if not isinstance(by_lifetime, dict):
        return 0
    return token_count(by_lifetime.get("ephemeral_1h_input_tokens"))


def token_count(value: Any) -> int:
    """A token count of a provider's usage: a non-negative integer, else 0 (absent, null)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0
