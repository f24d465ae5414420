"""The Anthropic Messages front: ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

A Messages request becomes Tiergate's chat request (:func:`to_chat`), is routed and served like
any chat request, and its chat answer or chunk stream becomes a Messages answer
(:func:`answer`) or Anthropic's event stream (:func:`events`). Both directions are litellm's
Anthropic adapter, the one LiteLLM's proxy serves this endpoint with, imported on first use.
An answer the provider gave natively (:mod:`router.backends.native`) is sent as it came.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from router.backends.native import NATIVE, NativeRequest, native_or, passed_headers
from router.errors import (
    BadRequestError,
    ThreadUnsupportedError,
    TiergateError,
    anthropic_error_body,
)
from router.schemas import ANTHROPIC_SERVER_FIELDS
from router.signals import native_blocks, prompt_estimate

#: The chat fields the translation makes from Anthropic-only parameters (``top_k``; ``thinking``
#: as ``reasoning_effort``), the ones it passes on that say how a Claude is run, not what it
#: answers (``cache_control``, ``speed``, ``diagnostics``), and the fields it gives an assistant
#: turn from its thinking blocks: a model that cannot take them goes without (``Call.optional``).
OPTIONAL = frozenset(
    {
        "top_k",
        "reasoning_effort",
        "cache_control",
        "speed",
        "diagnostics",
        "messages.thinking_blocks",
        "messages.reasoning_content",
    }
)
#: Anthropic's server-side features, which the translation passes on as they are: only an
#: Anthropic model serves a request with them; dropping them would change what the client
#: asked for, and another model would refuse them. So do Anthropic's own tools: its web search
#: (``web_search_options`` once translated; the schema refuses the field sent as it is, which
#: is OpenAI's, not Anthropic's) and the tools of its own types, such as
#: ``bash_20250124`` (``tools.provider``, router.gateway.PROVIDER_TOOLS). The policy's fit
#: check routes such a request (``Signals.anthropic_tools``); these are the gateway's last
#: guard (``Call.native_only``, ``Gateway.fitted``).
NATIVE_ONLY = frozenset({*ANTHROPIC_SERVER_FIELDS, "web_search_options", "tools.provider"})


STATELESS = (
    "Tiergate's /v1/messages is stateless: send the whole conversation in 'messages', "
    "without 'thread'"
)


@dataclass(frozen=True, slots=True)
class Translation:
    """What turning the chat answer back needs: the id the message is given and litellm's map
    of shortened tool names."""

    message_id: str
    tool_names: dict[str, str] = field(default_factory=dict)


def _litellm() -> Any:
    from router.backends.closed import quiet_litellm

    return quiet_litellm()


def to_chat(body: Mapping[str, Any], request_id: str) -> tuple[dict[str, Any], Translation]:
    """The chat request for a validated Messages request.

    ``metadata`` is kept whole, as on the chat front, so the policy can read it; it is not
    sent to a provider. ``tool_choice.disable_parallel_tool_use`` becomes
    ``parallel_tool_calls: false`` (only with tools: OpenAI refuses it without). A field
    sent as null (``top_k: null``, ``container: null``, as clients that serialise unset
    fields send them) asks for nothing and is left out: litellm's adapter copies some through
    (``top_k``, ``temperature``, ``top_p``, a server field, any field it does not know), and
    a model may refuse a null, or a field it does not know.

    A ``thread`` is refused: its later turns carry only their new messages (and no tools),
    which any model, and the policy, would read as the whole conversation.
    """
    if body.get("thread") is not None:
        raise ThreadUnsupportedError(STATELESS, param="thread")
    _litellm()
    from litellm.llms.anthropic.messages.adapters.transformation import (
        LiteLLMAnthropicMessagesAdapter,
    )

    try:
        chat, tool_names = LiteLLMAnthropicMessagesAdapter().translate_anthropic_to_openai(
            {**body, "messages": [_documents_read(m) for m in body["messages"]]}  # type: ignore[typeddict-item]
        )
    except Exception as exc:  # the library's errors on a request it cannot read: a 400
        raise BadRequestError(f"cannot translate the request: {exc}") from exc
    out: dict[str, Any] = {k: v for k, v in chat.items() if v is not None}
    failed = _failed_tool_uses(body)
    out["messages"] = _images_after_results(
        [_marked_failed(_without_nulls(m), failed) for m in out["messages"]]
    )
    if body.get("metadata") is not None:
        out["metadata"] = body["metadata"]
    choice = body.get("tool_choice")
    if isinstance(choice, Mapping) and choice.get("disable_parallel_tool_use") and out.get("tools"):
        out["parallel_tool_calls"] = False  # litellm's adapter leaves it out
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    return out, Translation("msg_" + request_id.removeprefix("req_"), dict(tool_names))


def _documents_read(message: Mapping[str, Any]) -> Mapping[str, Any]:
    """``message`` with each block of text a chat model has no part for (a document of plain
    text, of a ``text`` or ``content`` source, and a ``search_result``), in it or in one of
    its tool results, as the text it holds led by its title (:func:`_held`): litellm's adapter
    translates only a base64 document (to a chat ``file`` part) and drops these without a
    word. A document's ``context``, which the adapter drops too, leads it as text."""
    content = message.get("content")
    if not isinstance(content, list):
        return message
    blocks = [
        {**block, "content": _read(block["content"])}
        if isinstance(block, Mapping)
        and block.get("type") == "tool_result"
        and isinstance(block.get("content"), list)
        else block
        for block in _read(content)
    ]
    return {**message, "content": blocks}


def _read(content: list[Any]) -> list[Any]:
    blocks: list[Any] = []
    for block in content:
        held = _held(block) if isinstance(block, Mapping) else None
        if held is None:
            blocks += _in_context(block)
            continue
        heading, parts = held
        texts = [p.get("text", "") for p in parts if p.get("type") == "text"]
        blocks.append({"type": "text", "text": "\n\n".join([*heading, *texts])})
        blocks += [p for p in parts if p.get("type") != "text"]
    return blocks


def _held(block: Mapping[str, Any]) -> tuple[list[str], list[Mapping[str, Any]]] | None:
    """(the heading, the blocks) of a plain-text document (its title and context) or a search
    result (its title and source); None for any other block."""
    if block.get("type") == "search_result":
        return [block["title"], block["source"]], list(block["content"])
    source = block.get("source")
    if block.get("type") != "document" or not isinstance(source, Mapping):
        return None
    if source.get("type") not in ("text", "content"):
        return None
    held = source.get("data") if source["type"] == "text" else source.get("content")
    parts = [{"type": "text", "text": held}] if isinstance(held, str) else list(held or ())
    return [block[key] for key in ("title", "context") if block.get(key)], parts


def _in_context(block: Any) -> list[Any]:
    """``block``, led by a text block of its ``context`` (and title) where it is a document
    that has one (a PDF): litellm's adapter drops a document's ``context``."""
    if (
        not isinstance(block, Mapping)
        or block.get("type") != "document"
        or not block.get("context")
    ):
        return [block]
    heading = [block[key] for key in ("title", "context") if block.get(key)]
    return [{"type": "text", "text": "\n\n".join(heading)}, block]


#: What a tool result marked ``is_error`` starts with on the way to a chat model, which has no
#: such field: without it the model reads a failure's text as the tool's answer.
TOOL_ERROR_PREFIX = "Error: "


def _failed_tool_uses(body: Mapping[str, Any]) -> set[str]:
    """The ``tool_use_id`` of every ``tool_result`` block marked ``is_error``."""
    return {
        str(block.get("tool_use_id"))
        for message in body.get("messages") or ()
        if isinstance(message, Mapping) and isinstance(message.get("content"), list)
        for block in message["content"]
        if isinstance(block, Mapping)
        and block.get("type") == "tool_result"
        and block.get("is_error") is True
    }


def _marked_failed(message: dict[str, Any], failed: set[str]) -> dict[str, Any]:
    """A translated tool message whose result was marked ``is_error``, its content prefixed
    with :data:`TOOL_ERROR_PREFIX` (litellm's adapter drops the flag)."""
    if message.get("role") != "tool" or message.get("tool_call_id") not in failed:
        return message
    content = message.get("content")
    if isinstance(content, list):
        parts = [{"type": "text", "text": TOOL_ERROR_PREFIX.strip()}, *content]
        return {**message, "content": parts}
    text = content if isinstance(content, str) else ""
    if text.lower().startswith("error"):
        return message
    return {**message, "content": TOOL_ERROR_PREFIX + (text or "the tool failed")}


def _images_after_results(chat: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages with the images of each tool result moved to a user message after
    the results: OpenAI takes images only from a user (its 400: "Image URLs are only allowed
    for messages with role 'user'"), and litellm's adapter leaves a ``tool_result``'s image
    in the tool message."""
    out: list[dict[str, Any]] = []
    moved: list[dict[str, Any]] = []
    for message in chat:
        content = message.get("content")
        parts: list[dict[str, Any]] = content if isinstance(content, list) else []
        images = [part for part in parts if part.get("type") == "image_url"]
        if message.get("role") == "tool" and images:
            call = message.get("tool_call_id")
            text = [part for part in parts if part not in images]
            out.append({**message, "content": text or f"The images of {call} follow."})
            moved += [
                {"type": "text", "text": f"The images of tool result {call}:"},
                *map(_as_file, images),
            ]
            continue
        if moved and message.get("role") != "tool":
            out.append({"role": "user", "content": moved})
            moved = []
        out.append(message)
    if moved:
        out.append({"role": "user", "content": moved})
    return out


def _as_file(part: dict[str, Any]) -> dict[str, Any]:
    """An ``image_url`` part that holds a PDF (litellm's adapter makes one of a tool result's
    base64 document) as the chat ``file`` part a PDF is sent as; any other part as it is."""
    url = (part.get("image_url") or {}).get("url")
    if not isinstance(url, str) or not url.startswith("data:application/pdf;"):
        return part
    return {"type": "file", "file": {"filename": "document.pdf", "file_data": url}}


def _without_nulls(message: Mapping[str, Any]) -> dict[str, Any]:
    """A translated message without the null fields litellm fills in (``thinking_blocks``),
    which a strict provider refuses; ``content`` stays, null in a tool call."""
    return {k: v for k, v in message.items() if v is not None or k == "content"}


def native(body: Mapping[str, Any], headers: Mapping[str, str]) -> NativeRequest:
    """The request as sent, for an Anthropic model reached over its own API."""
    return NativeRequest("messages", body, passed_headers(headers))


def answer(chat: Mapping[str, Any], translation: Translation) -> dict[str, Any]:
    """The Messages answer for a chat answer (or the provider's own, passed through)."""
    if NATIVE in chat:
        passed: dict[str, Any] = chat[NATIVE]
        return passed
    _litellm()
    from litellm.llms.anthropic.messages.adapters.transformation import (
        LiteLLMAnthropicMessagesAdapter,
    )
    from litellm.types.utils import ModelResponse

    message = LiteLLMAnthropicMessagesAdapter().translate_openai_response_to_anthropic(
        ModelResponse(**chat), translation.tool_names
    )
    out: dict[str, Any] = json.loads(json.dumps(message, default=_plain))
    out["id"] = translation.message_id
    out["model"] = chat.get("model", out.get("model"))
    _stopped_by(out, _stop_sequence(chat))
    return out


def _stop_sequence(chunk: Mapping[str, Any]) -> str | None:
    """The stop sequence that ended a chat answer (or its last chunk), where the backend names
    it as vLLM does (the choice's ``stop_reason``; the local model does): else None, as a chat
    answer's ``finish_reason: "stop"`` does not tell a stop sequence from the model's end."""
    for choice in chunk.get("choices") or ():
        if isinstance(choice, Mapping) and isinstance(choice.get("stop_reason"), str):
            return str(choice["stop_reason"])
    return None


def _stopped_by(message: dict[str, Any], sequence: str | None) -> None:
    # litellm's adapter says end_turn for any "stop"; Anthropic says which sequence it was.
    if sequence is not None and message.get("stop_reason") == "end_turn":
        message["stop_reason"], message["stop_sequence"] = "stop_sequence", sequence


def _plain(value: Any) -> Any:
    dump = getattr(value, "model_dump", None)
    if dump is None:
        raise TypeError(f"{type(value).__name__} is not JSON serializable")
    return dump(exclude_none=True)


def events(
    chunks: AsyncGenerator[dict[str, Any], None], translation: Translation, prompt_tokens: int = 0
) -> AsyncGenerator[dict[str, Any], None]:
    """Anthropic's stream events for a chat chunk stream (or the provider's own events).

    ``message_start`` carries ``prompt_tokens`` as its ``input_tokens``, as Anthropic gives
    them there: a chat stream reports its usage only at its end (in ``message_delta``, which
    then corrects an estimate). Closing this closes ``chunks``.
    """

    async def translate(
        first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        _litellm()
        from litellm.llms.anthropic.messages.adapters.streaming_iterator import (
            AnthropicStreamWrapper,
        )

        stopped: list[str] = []  # the stop sequence the last chunk names, once it has come
        wrapper = AnthropicStreamWrapper(
            completion_stream=_typed(first, rest, stopped),
            model=str((first or {}).get("model", "")),
            tool_name_mapping=translation.tool_names,
        )
        async for event in wrapper:
            out = json.loads(json.dumps(event, default=_plain))
            if out.get("type") == "message_delta" and isinstance(out.get("delta"), dict):
                out["delta"].setdefault("stop_sequence", None)
                _stopped_by(out["delta"], stopped[-1] if stopped else None)
            if out.get("type") == "message_start":
                out["message"]["id"] = translation.message_id
                usage = out["message"].get("usage")
                if isinstance(usage, dict) and not usage.get("input_tokens"):
                    usage["input_tokens"] = prompt_tokens
            yield out

    return native_or(chunks, translate)


async def _typed(
    first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]], stopped: list[str]
) -> Any:
    from litellm.types.utils import ModelResponseStream

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        if first is not None:
            yield first
        async for chunk in rest:
            yield chunk

    async for chunk in _one_call_at_a_time(chunks()):
        stopped.extend(filter(None, [_stop_sequence(chunk)]))
        yield ModelResponseStream(**chunk)


async def _one_call_at_a_time(
    chunks: AsyncIterator[dict[str, Any]],
) -> AsyncIterator[dict[str, Any]]:
    """The chat chunks with their tool calls one after another, as Anthropic's ``tool_use``
    blocks are: a chat stream may interleave its parallel calls' argument pieces by ``index``,
    and litellm's adapter then writes one call's pieces into another's block. The first call
    streams as it comes; a call begun while it streams is held, gathered, and sent whole
    before the first chunk that carries anything else (or at the end)."""
    live: int | None = None
    held: dict[int, dict[str, Any]] = {}  # index -> the call gathered so far
    async for chunk in chunks:
        choices = chunk.get("choices") or []
        delta = (choices[0].get("delta") or {}) if len(choices) == 1 else {}
        passed = []
        for call in delta.get("tool_calls") or ():
            index = call.get("index", 0)
            live = index if live is None else live
            if index == live:
                passed.append(call)
            elif index in held:
                function = held[index].setdefault("function", {})
                more = (call.get("function") or {}).get("arguments") or ""
                function["arguments"] = (function.get("arguments") or "") + more
            else:
                held[index] = json.loads(json.dumps(call))
        if not delta.get("tool_calls"):
            for whole in _released(held, chunk):
                yield whole
            live = None
            yield chunk
        elif passed:
            yield _with_calls(chunk, passed)
        rest = {k: v for k, v in delta.items() if k not in ("tool_calls", "role") and v}
        if delta.get("tool_calls") and (rest or choices[0].get("finish_reason")):
            # What else the chunk carried (its finish), after every call it ends.
            for whole in _released(held, chunk):
                yield whole
            live = None
            yield {**chunk, "choices": [{**choices[0], "delta": rest}]}
    for whole in _released(held, chunk):  # a stream that ended without a finish
        yield whole


def _released(held: dict[int, dict[str, Any]], chunk: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The held calls, each whole in a chunk of its own in index order; ``held`` is emptied."""
    out = [_with_calls(chunk, [held[index]]) for index in sorted(held)]
    held.clear()
    return out


def _with_calls(chunk: Mapping[str, Any], calls: list[dict[str, Any]]) -> dict[str, Any]:
    """``chunk`` with only ``calls`` for its delta, and no finish or usage."""
    choice = {**chunk["choices"][0], "delta": {"tool_calls": calls}, "finish_reason": None}
    return {**chunk, "choices": [choice], "usage": None}


def error_event(exc: TiergateError, previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A failure after the stream began, as Anthropic's ``error`` event (whose events carry no
    number: ``previous``, the last event sent, is not read)."""
    return anthropic_error_body(exc)


def count_tokens(body: Mapping[str, Any]) -> dict[str, int]:
    """``{"input_tokens": n}``: the estimate Tiergate routes and reserves with, made locally
    without calling a model (not a provider tokenizer's exact count). It counts what routing
    counts (:func:`router.signals.prompt_estimate`): the schema an ``output_format`` becomes,
    the server-tool blocks the chat translation drops but a Claude is sent, a PDF by URL."""
    chat, _ = to_chat({**body, "max_tokens": 1, "stream": False}, "req_count")
    return {"input_tokens": prompt_estimate(chat, tuple(native_blocks(body)))}
