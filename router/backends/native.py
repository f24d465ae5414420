"""Pass a front's request on natively when the closed target speaks that front's API.

An Anthropic model behind ``/v1/messages``, or an OpenAI model behind ``/v1/responses``, gets
the client's own request (the model id and Tiergate's ``metadata`` aside), and the client gets
the provider's own answer: no field is lost to a round trip through the chat format.

The rest of Tiergate still sees a chat view of each answer (text, tool calls, finish reason,
usage), so metering, learning and the outcome record work as for any request. The provider's
body, or each of its stream events, rides along under :data:`NATIVE`, and the front sends that.
The chat view is written here rather than taken from litellm: it is Tiergate's internal view of
a few fields, not a translation a client reads.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from router.backends import (
    Completion,
    ModelLike,
    Usage,
    answered_as,
    one_hour_writes,
    token_count,
    web_searches,
)
from router.backends.closed import key_for, provider_model, provider_of
from router.backends.openai_http import OpenAIHTTP, stream_cut, stream_failure
from router.errors import BackendError, UpstreamBadResponseError

#: The key, in a chat answer or chunk, that holds the provider's native body or event.
NATIVE = "tiergate_native"
#: What a front's chunk stream (a request's life: router.gateway) yields after its last chunk,
#: told by identity and never sent: it waits there until the front's last events, made after
#: the chat stream, are framed. Read on past it once they went out (the request is recorded
#: as served), throw in their failure (recorded as it) or close the stream (a client that left).
CHUNKS_END: dict[str, Any] = {}
#: The Anthropic API version sent when the client names none.
ANTHROPIC_VERSION = "2023-06-01"
_ANTHROPIC_BASE = "https://api.anthropic.com"
_OPENAI_BASE = "https://api.openai.com/v1"
# Request headers of a client's that a native call passes on.
_PASSED_HEADERS = ("anthropic-version", "anthropic-beta")
_ANTHROPIC_FINISH = {"max_tokens": "length", "tool_use": "tool_calls", "refusal": "content_filter"}

Api = Literal["messages", "responses"]


@dataclass(frozen=True, slots=True)
class NativeRequest:
    """A front's request as its client sent it (validated), for a target that speaks its API.

    ``headers`` holds the client's ``anthropic-version`` and ``anthropic-beta``, if sent.
    """

    api: Api
    body: Mapping[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)


#: The native stream events that open a stream and carry nothing of the answer yet.
_OPENING_EVENTS = frozenset({"message_start", "ping", "response.created", "response.in_progress"})


def opening_event(chunk: Mapping[str, Any]) -> bool:
    """Whether a native chunk's event only opens the stream: Anthropic's ``message_start``,
    a ``ping``, an empty text block's start; the Responses ``response.created``, an output
    message or text part being added. Any other event (a thinking delta, a server tool's
    block) is part of the answer, sent on as it comes."""
    event = chunk.get(NATIVE)
    if not isinstance(event, Mapping):
        return False
    kind = event.get("type")
    if kind in _OPENING_EVENTS:
        return True
    block = event.get("content_block") or event.get("item") or event.get("part") or {}
    if not isinstance(block, Mapping):
        return False
    if kind == "content_block_start":
        return block.get("type") == "text" and not block.get("text")
    if kind == "response.output_item.added":
        return block.get("type") == "message" and not block.get("content")
    if kind == "response.content_part.added":
        return block.get("type") == "output_text" and not block.get("text")
    return False


def passed_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The request headers a native call passes on to the provider."""
    return {k: headers[k] for k in _PASSED_HEADERS if k in headers}


def speaks(model: ModelLike, api: Api) -> bool:
    """Whether ``model`` is a closed model reached directly over ``api``'s own protocol."""
    if model.tier != "closed" or not model.litellm_model:
        return False
    if model.transport == "litellm":
        return False
    provider = provider_of(model.litellm_model)
    return (api, provider) in (("messages", "anthropic"), ("responses", "openai"))


class NativeCaller(Protocol):
    """What the gateway calls for a native request: :class:`NativeBackend`, or that backend
    inside telemetry's CLIENT spans."""

    async def complete(self, model: ModelLike, native: NativeRequest, usage: Usage) -> Completion:
        """The provider's answer, as a chat view carrying the native body."""
        ...

    def stream(
        self, model: ModelLike, native: NativeRequest, usage: Usage
    ) -> AsyncIterator[dict[str, Any]]:
        """Chat chunks, each carrying one native event."""
        ...


class NativeBackend:
    """Calls Anthropic's ``/v1/messages`` and OpenAI's ``/v1/responses`` over the pooled client."""

    def __init__(
        self, http: OpenAIHTTP, *, timeout_s: float, environ: Mapping[str, str] | None = None
    ) -> None:
        self._http = http
        self._timeout_s = timeout_s
        self._environ = environ if environ is not None else os.environ

    def server_url(self, model: ModelLike) -> str:
        """The URL called for ``model``: Anthropic's Messages or OpenAI's Responses endpoint,
        at its ``api_base`` when it has one."""
        anthropic = provider_of(model.litellm_model or "") == "anthropic"
        return _url(model.api_base, "messages" if anthropic else "responses")

    def _call(
        self, model: ModelLike, native: NativeRequest, stream: bool
    ) -> tuple[str, dict[str, Any], dict[str, str], str | None]:
        """(url, body, headers, key) of the provider call."""
        key = key_for(model, self._environ)
        body = {k: v for k, v in native.body.items() if k != "metadata"}
        body["model"] = provider_model(model.litellm_model or "")
        body["stream"] = stream
        headers = {"content-type": "application/json"}
        if native.api == "messages":
            user = (native.body.get("metadata") or {}).get("user_id")
            if user is not None:
                body["metadata"] = {"user_id": user}
            headers["anthropic-version"] = ANTHROPIC_VERSION
            headers.update(native.headers)
            if key:
                headers["x-api-key"] = key
            return _url(model.api_base, native.api), body, headers, key
        body["store"] = False  # Tiergate's Responses front is stateless; so is the call
        if body.get("max_output_tokens") is None and model.max_output_tokens is not None:
            # The operator's cap, which the budget holds a call without one at.
            body["max_output_tokens"] = model.max_output_tokens
        if key:
            headers["authorization"] = f"Bearer {key}"
        return _url(model.api_base, native.api), body, headers, key

    async def complete(self, model: ModelLike, native: NativeRequest, usage: Usage) -> Completion:
        """The provider's answer, as a chat view carrying the native body under :data:`NATIVE`."""
        url, body, headers, key = self._call(model, native, stream=False)
        payload = await self._http.post_json(
            url,
            body,
            headers=headers,
            api_key=key,
            label=model.name,
            timeout_s=model.timeout_s or self._timeout_s,
        )
        if not isinstance(payload, dict):
            raise UpstreamBadResponseError(f"{model.name} sent a body that is not an object")
        answered_as(payload, model.name, usage)
        if native.api == "responses":
            _check_response(payload, model.name)
        view = _message_view(payload) if native.api == "messages" else _response_view(payload)
        got = _usage_of(payload.get("usage"), native.api, model.name)
        usage.take(got)
        view["usage"] = {
            "prompt_tokens": got.prompt_tokens,
            "completion_tokens": got.completion_tokens,
            "total_tokens": got.prompt_tokens + got.completion_tokens,
        }
        view[NATIVE] = payload
        return Completion(body=view, usage=usage)

    async def stream(
        self, model: ModelLike, native: NativeRequest, usage: Usage
    ) -> AsyncIterator[dict[str, Any]]:
        """Chat chunks, each carrying one native event under :data:`NATIVE`."""
        url, body, headers, key = self._call(model, native, stream=True)
        events = self._http.post_sse(
            url,
            body,
            headers=headers,
            api_key=key,
            label=model.name,
            timeout_s=model.timeout_s or self._timeout_s,
        )
        view = (
            _AnthropicEvents(model.name, body)
            if native.api == "messages"
            else _ResponseEvents(body)
        )
        try:
            async for data in events:
                event = _event(data, model.name)
                chunk = view.chunk(event, usage, model.name)
                chunk.update(id=view.id, object="chat.completion.chunk", model=model.name)
                chunk[NATIVE] = event
                yield chunk
                if view.done:
                    return
        finally:
            await events.aclose()
        raise stream_cut(model.name)


async def native_or(
    chunks: AsyncGenerator[dict[str, Any], None],
    translate: Callable[
        [dict[str, Any] | None, AsyncIterator[dict[str, Any]]], AsyncIterator[dict[str, Any]]
    ],
) -> AsyncGenerator[dict[str, Any], None]:
    """A front's events for a chat chunk stream: the provider's own when the chunks carry them
    (a native call), else ``translate(first chunk, the rest up to CHUNKS_END)``, whose last
    events come after the chat stream's end: ``chunks`` ends once they went out. Closing this
    closes ``chunks``; a failure of ``translate`` is thrown into ``chunks`` first, so that the
    stream's owner records it as the error it is (a failure of ``chunks`` itself has ended
    them already)."""
    try:
        first = await anext(chunks, None)
        if first is not None and NATIVE in first:
            yield first[NATIVE]
            async for chunk in chunks:
                if NATIVE in chunk:  # not the gateway's closing usage chunk, nor CHUNKS_END
                    yield chunk[NATIVE]
            return
        async for event in translate(first, _until_end(chunks)):
            yield event
        await anext(chunks, None)  # past CHUNKS_END: the stream ends, recorded as served
    except Exception as exc:
        with contextlib.suppress(Exception):
            await chunks.athrow(exc)
        raise
    finally:
        await chunks.aclose()


async def _until_end(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    # ``chunks`` up to CHUNKS_END, left unread (``async for`` does not close ``chunks``).
    async for chunk in chunks:
        if chunk is CHUNKS_END:
            return
        yield chunk


def _url(api_base: str | None, api: Api) -> str:
    """The endpoint of ``api`` at ``api_base``, or at the provider's own host."""
    if api == "messages":
        return _anthropic_url(api_base)
    return (api_base or _OPENAI_BASE).rstrip("/") + "/responses"


def _anthropic_url(api_base: str | None) -> str:
    base = (api_base or _ANTHROPIC_BASE).rstrip("/")
    if base.endswith("/v1/messages"):
        return base
    return base + ("/messages" if base.endswith("/v1") else "/v1/messages")


def _event(data: bytes, label: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UpstreamBadResponseError(f"{label} sent an event that is not JSON") from exc
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise UpstreamBadResponseError(f"{label} sent an event without a type")
    return event


def _usage_of(raw: Any, api: Api, label: str) -> Usage:
    """A native ``usage`` as a chat view's: the prompt tokens include those read from and
    written to the prompt cache, which are also counted apart (they are billed apart)."""
    if raw is None:
        return Usage()
    if not isinstance(raw, dict):
        raise UpstreamBadResponseError(f"{label} sent a 'usage' that is not an object")
    prompt = token_count(raw.get("input_tokens"))
    hour = searches = 0
    if api == "messages":  # Anthropic counts cached prompt tokens apart from input_tokens
        cached = token_count(raw.get("cache_read_input_tokens"))
        written = token_count(raw.get("cache_creation_input_tokens"))
        hour = one_hour_writes(raw.get("cache_creation"))
        searches = web_searches(raw.get("server_tool_use"))
        prompt += cached + written
    else:  # OpenAI's input_tokens include the cached ones
        details = raw.get("input_tokens_details")
        cached = token_count(details.get("cached_tokens")) if isinstance(details, dict) else 0
        written = 0
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=token_count(raw.get("output_tokens")),
        cached_tokens=cached,
        cache_write_tokens=written,
        cache_write_1h_tokens=hour,
        web_searches=searches,
    )


def _tool_call(call_id: str, name: str, arguments: str, index: int | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": arguments},
    }
    if index is not None:
        call["index"] = index
    return call


def _chat(message: dict[str, Any], finish: str, rid: str, model: str) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": 0,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish}],
    }


def _message_view(payload: dict[str, Any]) -> dict[str, Any]:
    """An Anthropic message as a chat completion: its text, tool calls and finish reason."""
    content = payload.get("content")
    if not isinstance(content, list):
        raise UpstreamBadResponseError(f"{payload.get('model')} sent a message without content")
    blocks = [b for b in content if isinstance(b, dict)]
    text = "".join(str(b.get("text", "")) for b in blocks if b.get("type") == "text")
    calls = [
        _tool_call(str(b.get("id")), str(b.get("name")), json.dumps(b.get("input") or {}))
        for b in blocks
        if b.get("type") == "tool_use"
    ]
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    finish = _ANTHROPIC_FINISH.get(str(payload.get("stop_reason")), "stop")
    return _chat(message, finish, str(payload.get("id", "")), str(payload["model"]))


def _response_view(payload: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI response as a chat completion: its text, function calls and finish reason."""
    output = payload.get("output")
    if not isinstance(output, list):
        raise UpstreamBadResponseError(f"{payload.get('model')} sent a response without output")
    items = [item for item in output if isinstance(item, dict)]
    text = "".join(
        str(part.get("text", ""))
        for item in items
        if item.get("type") == "message"
        for part in item.get("content") or ()
        if isinstance(part, dict) and part.get("type") == "output_text"
    )
    calls = [
        _tool_call(str(i.get("call_id")), str(i.get("name")), str(i.get("arguments", "")))
        for i in items
        if i.get("type") == "function_call"
    ]
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    finish = "tool_calls" if calls else "stop"
    if payload.get("status") == "incomplete":
        finish = "length"
    return _chat(message, finish, str(payload.get("id", "")), str(payload["model"]))


def _delta(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


class _AnthropicEvents:
    """Anthropic's stream events as chat chunks, counting usage as they pass; ``sent``, the
    request, whose ids an error event's 404 may name (:func:`stream_failure`).

    ``message_start`` counts the prompt as sent; ``message_delta``'s counts are cumulative and,
    where they give the input (as Anthropic's do), count the prompt as the model read it, the
    results of its server tools (a web search's pages) included, which it bills as input."""

    def __init__(self, model: str, sent: Mapping[str, Any]) -> None:
        self.id = ""
        self.model = model
        self.sent = sent
        self.done = False
        self._tools: dict[int, int] = {}  # content block index -> tool call index
        self._usage: dict[str, Any] = {}  # the stream's usage so far, Anthropic's fields

    def _count(self, raw: Any, label: str) -> Usage:
        # The stream's usage with an event's fields over the earlier ones (those it leaves out,
        # or sends null, keep theirs: message_delta has no cache_creation breakdown).
        if raw is not None and not isinstance(raw, dict):
            raise UpstreamBadResponseError(f"{label} sent a 'usage' that is not an object")
        self._usage.update((k, v) for k, v in (raw or {}).items() if v is not None)
        return _usage_of(self._usage, "messages", label)

    def chunk(self, event: dict[str, Any], usage: Usage, label: str) -> dict[str, Any]:
        kind = event["type"]
        if kind == "error":
            error = event.get("error")
            raise stream_failure(label, error if isinstance(error, dict) else {}, sent=self.sent)
        if kind == "message_start":
            message = event.get("message") or {}
            self.id = str(message.get("id", ""))
            answered_as(message, self.model, usage)
            got = self._count(message.get("usage"), label)
            got.completion_tokens = usage.completion_tokens  # none written yet
            usage.take(got)
            return _delta({"role": "assistant", "content": ""})
        block = event.get("content_block") or {}
        if kind == "content_block_start" and block.get("type") == "tool_use":
            tool = self._tools[event.get("index", 0)] = len(self._tools)
            return _delta(
                {"tool_calls": [_tool_call(block.get("id", ""), block.get("name", ""), "", tool)]}
            )
        delta = event.get("delta") or {}
        if kind == "content_block_delta" and delta.get("type") == "text_delta":
            return _delta({"content": delta.get("text", "")})
        if kind == "content_block_delta" and delta.get("type") == "input_json_delta":
            tool = self._tools.get(event.get("index", 0), 0)
            partial = {"index": tool, "function": {"arguments": delta.get("partial_json", "")}}
            return _delta({"tool_calls": [partial]})
        if kind == "message_delta":
            usage.take(self._count(event.get("usage"), label))
            return _delta({}, _ANTHROPIC_FINISH.get(str(delta.get("stop_reason")), "stop"))
        self.done = kind == "message_stop"
        return {"choices": []}


def _response_failure(
    label: str,
    error: Any,
    *,
    what: str = "sent an error event",
    sent: Mapping[str, Any] | None = None,
) -> BackendError:
    """The failure an OpenAI Response's ``error`` (or a Responses stream's ``error`` event)
    reports, by its code or type, as the same failure answered with a status
    (:func:`~router.backends.openai_http.stream_failure`); ``sent``, the request."""
    return stream_failure(label, error if isinstance(error, dict) else {}, what=what, sent=sent)


#: The statuses of a Response that answered: ``incomplete`` is a cut answer (its
#: ``incomplete_details`` say why: ``max_output_tokens``, ``content_filter``), as a chat
#: answer's ``length``. None is a server's that sends no status.
_ANSWERED = (None, "completed", "incomplete")


def _check_response(payload: Mapping[str, Any], label: str, *, what: str = "failed") -> None:
    """Raise the failure a Response answered with HTTP 200 reports: status ``failed`` with
    the ``error`` OpenAI documents for a model that failed to generate one (its codes those
    of a stream's ``response.failed`` event), any Response with an ``error``, and one that
    did not finish (``cancelled``, ``queued``, ``in_progress``). Its output is empty or
    partial: read as an answer, it was an empty success, with no fallback tried. The same
    holds for the Response that ends a stream (``response.completed``,
    ``response.incomplete``); ``what`` says how it came, in the message."""
    error, status = payload.get("error"), payload.get("status")
    if not error and status in _ANSWERED:
        return
    error = error or {"message": f"the response is {status}"}
    raise _response_failure(label, error, what=what)


class _ResponseEvents:
    """OpenAI's Responses stream events as chat chunks, counting usage at the end; ``sent``,
    the request, as for :class:`_AnthropicEvents`."""

    def __init__(self, sent: Mapping[str, Any]) -> None:
        self.sent = sent
        self.id = ""
        self.done = False
        self._tools: dict[int, int] = {}  # output index -> tool call index

    def chunk(self, event: dict[str, Any], usage: Usage, label: str) -> dict[str, Any]:
        kind = event["type"]
        response = event.get("response") if isinstance(event.get("response"), dict) else None
        if response is not None:
            self.id = str(response.get("id", self.id))
            answered_as(response, label, usage)
        if kind in ("error", "response.failed"):
            error = (response or event).get("error") or event
            raise _response_failure(label, error, sent=self.sent)
        if kind == "response.created":
            return _delta({"role": "assistant", "content": ""})
        if kind == "response.output_text.delta":
            return _delta({"content": str(event.get("delta", ""))})
        item = event.get("item") or {}
        if kind == "response.output_item.added" and item.get("type") == "function_call":
            tool = self._tools[event.get("output_index", 0)] = len(self._tools)
            call = _tool_call(item.get("call_id", ""), item.get("name", ""), "", tool)
            return _delta({"tool_calls": [call]})
        if kind == "response.function_call_arguments.delta":
            tool = self._tools.get(event.get("output_index", 0), 0)
            partial = {"index": tool, "function": {"arguments": str(event.get("delta", ""))}}
            return _delta({"tool_calls": [partial]})
        if kind in ("response.completed", "response.incomplete") and response is not None:
            _check_response(response, label, what="ended its stream with a failed response")
            self.done = True
            usage.take(_usage_of(response.get("usage"), "responses", label))
            finish = "tool_calls" if self._tools else "stop"
            return _delta({}, "length" if kind == "response.incomplete" else finish)
        return {"choices": []}
