"""Talk to any OpenAI-compatible ``/chat/completions`` endpoint over one pooled HTTP client.

Used for closed ``openai/...`` models (OpenAI itself or any compatible base URL) and for an
external llama.cpp server on the local tier (``llama-server`` or ``llama_cpp.server``). Calling
the endpoint directly keeps the proxy's added latency far below a litellm round trip; see
``bench/README.md``. Transport failures are mapped to :mod:`router.errors` here, in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import json
import math
import re
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator, Mapping
from typing import Any

import aiohttp

from router.backends import Completion, Usage, usage_from_body
from router.config import MAX_EVENT_BYTES
from router.errors import (
    MAX_RETRY_AFTER_S,
    BackendError,
    ModelSettingsError,
    TiergateError,
    UpstreamAuthError,
    UpstreamBadRequestError,
    UpstreamBadResponseError,
    UpstreamNotFoundError,
    UpstreamOverloadedError,
    UpstreamRateLimitedError,
    UpstreamRequestTooLargeError,
    UpstreamTimeoutError,
    scrub,
)

_JSON = {"content-type": "application/json"}


def retry_after_s(value: Any) -> float | None:
    """The seconds a ``Retry-After`` header asks for: a number of seconds, or an HTTP-date
    (RFC 9110) counted from now, at most :data:`~router.errors.MAX_RETRY_AFTER_S`. None when
    absent, unreadable (``inf``, ``nan``, a word, a negative number, ``1_0``) or past: a garbled
    header must not turn a 429 into an internal error, nor a day's wait into the client's."""
    if not isinstance(value, str):
        return None
    if _SECONDS.fullmatch(value.strip()):
        seconds = float(value)
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, OverflowError):
            return None
        if when.tzinfo is None:  # "-0000": UTC, as the RFC's dates are
            when = when.replace(tzinfo=datetime.UTC)
        seconds = when.timestamp() - time.time()
    if not (math.isfinite(seconds) and seconds > 0):
        return None
    return min(seconds, MAX_RETRY_AFTER_S)


# RFC 9110's delay-seconds (ASCII digits), with a fraction as some providers send it.
_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def upstream_error(raw: bytes | str) -> dict[str, Any]:
    """The ``error`` object of an OpenAI-shaped error body (Anthropic's too), the body itself
    where it is the error object (Mistral's ``{"object": "error", "message", "type"}``), or
    an empty one."""
    try:
        payload = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return {}
    if not isinstance(payload, dict):
        return {}
    error = payload.get("error")
    if isinstance(error, dict):
        return error
    return payload if isinstance(payload.get("message"), str) else {}


def _upstream_message(error: dict[str, Any], reason: str | None) -> str:
    return str(error.get("message") or reason or "error")[:500]


def error_for_status(
    status: int,
    raw: bytes,
    label: str,
    *,
    reason: str | None = None,
    retry_after: str | None = None,
    api_key: str | None = None,
    sent: Mapping[str, Any] | None = None,
) -> BackendError:
    """Map an upstream HTTP error status to the Tiergate error a client and the fallback see
    (:func:`provider_failure`, which a stream's error event goes through too). ``sent``: the
    request as sent, whose ids a 404 may name.

    The upstream's message is repeated with credentials scrubbed (some providers echo keys).
    """
    error = upstream_error(raw)
    message = f"{label} answered {status}: {scrub(_upstream_message(error, reason), [api_key])}"
    return provider_failure(
        status,
        error,
        message,
        upstream_status=status,
        retry_after=retry_after_s(retry_after),
        sent=sent,
    )


def provider_failure(
    status: int,
    error: dict[str, Any],
    message: str,
    *,
    upstream_status: int | None,
    retry_after: float | None = None,
    sent: Mapping[str, Any] | None = None,
) -> BackendError:
    """The failure a provider reports with ``status`` and its ``error`` object, whether it
    answered that status or named it in a stream's error event; ``sent``, the request as sent
    where the caller has it, tells a 404 for the request's own ids (:func:`_not_found`).

    A prompt over the model's window keeps OpenAI's ``context_length_exceeded`` (llama.cpp's
    server names it by its type, ``exceed_context_size_error``; other providers only in their
    message, :data:`_OVER_WINDOW_SAID`): agent loops read that code to shorten their history,
    and a routed request goes on to a model with a larger window. A 400 keeps the field the
    provider named (``param``), so the client knows what to fix. A 503 or 529 (overloaded)
    keeps the upstream's ``Retry-After``, as a 429 does.
    """
    if status == 429:
        if request_too_large(message):
            return UpstreamRequestTooLargeError(message, upstream_status=upstream_status)
        return UpstreamRateLimitedError(
            message, upstream_status=upstream_status, retry_after=retry_after
        )
    if status in (400, 413, 422):
        param = error.get("param")
        return UpstreamBadRequestError(
            message,
            code="context_length_exceeded" if _over_window(error) else None,
            upstream_status=upstream_status,
            param=param if isinstance(param, str) else None,
        )
    if status in OVERLOADED:
        return UpstreamOverloadedError(
            message, upstream_status=upstream_status, retry_after=retry_after
        )
    if status in (408, 504):
        return UpstreamTimeoutError(message, upstream_status=upstream_status)
    if status in (401, 403):
        return UpstreamAuthError(message, upstream_status=upstream_status)
    if status == 404:
        return _not_found(error, message, upstream_status, sent)
    return BackendError(message, upstream_status=upstream_status)


def _not_found(
    error: dict[str, Any], message: str, upstream_status: int | None, sent: Mapping[str, Any] | None
) -> BackendError:
    """A provider's 404: the request's own 400 (final: no fallback, no cooldown) where it
    names the request's field (:func:`_names_the_requests_field`) or one of the ids the
    request sent (:func:`_named_id`), else the model's configuration."""
    if _names_the_requests_field(error):
        return UpstreamBadRequestError(
            message, upstream_status=upstream_status, param=error["param"]
        )
    field = _named_id(error, sent)
    if field is not None:
        return UpstreamBadRequestError(message, upstream_status=upstream_status, param=field)
    return UpstreamNotFoundError(message, upstream_status=upstream_status)


#: The shortest id a 404's message is read for: a shorter value could stand in any text.
_ID_CHARS = 6


def _named_id(error: dict[str, Any], sent: Mapping[str, Any] | None) -> str | None:
    """The top-level field of ``sent`` holding an id that the 404 ``error``'s message names,
    if one does: a client's id of something the provider does not hold. Anthropic's 404s
    name no field (``param``) but name what was not found: a Files API file's says "File not
    found: file_011CNha8..." (a ``container_upload`` block's ``file_id``), its model's "model:
    NAME" (no id), a wrong path "Not Found" (nothing). Any 404 that names an id the request
    sent (a ``container``, a file, a skill, an item) is the request's; one that names none
    stays the model's configuration. The ids are the values of ``container`` and of every key
    ``id`` or ending in ``_id`` in the request, read only when a 404 came, but not in its
    data (:data:`_DATA`): a tool call's input may name the very model whose 404 names it."""
    said = error.get("message")
    if not isinstance(said, str) or sent is None:
        return None
    for field, value in sent.items():
        if field == "metadata":  # never sent to a provider (the litellm path's request has it)
            continue
        ids = [value] if field == "container" and isinstance(value, str) else _ids(value)
        if any(len(i) >= _ID_CHARS and i in said for i in ids):
            return field
    return None


#: The keys under which a request holds data, not ids a provider is asked to find: a tool
#: call's ``input`` (its arguments, the client's or a model's), and ``metadata``, which no
#: provider is sent (at the top level, the Responses API's ``input`` holds its items).
_DATA = frozenset({"input", "metadata"})


def _ids(value: Any) -> Iterator[str]:
    # The string values of every key ``id`` or ending in ``_id`` in ``value``, none under a
    # key in _DATA, iteratively.
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, Mapping):
            for key, inner in item.items():
                if isinstance(inner, str) and (key == "id" or str(key).endswith("_id")):
                    yield inner
                elif isinstance(inner, Mapping | list) and key not in _DATA:
                    stack.append(inner)
        elif isinstance(item, list):
            stack.extend(item)


def _names_the_requests_field(error: dict[str, Any]) -> bool:
    """Whether a provider's 404 ``error`` is the request's own: it names the field of the
    request that holds what was not found (``param``). OpenAI's Responses answers a 404 with
    ``param: input`` for an input item whose id it does not hold ("Item with id 'rs_...' not
    found. Items are not persisted when `store` is set to false"), and the Responses front
    passes a client's items on with their ids and calls with ``store: false``: the client's
    history, for the client to fix (a 400, final), not a model missing from the provider.
    Every other 404 that names no id of the request (:func:`_named_id`) is the model's
    configuration (:class:`UpstreamNotFoundError`): a model that does not exist (OpenAI's
    ``model_not_found``, with no ``param``; Anthropic's ``not_found_error`` "model: NAME";
    vLLM's "The model `NAME` does not exist.", ``code`` 404), or a path the provider does
    not serve (a wrong ``api_base``: OpenAI's "Invalid URL", llama.cpp's server's "File Not
    Found", an empty body); none of them names a field. Anthropic's errors never name one
    (its 404s name the id instead). Nor does a ``param`` of the string ``None``, as a LiteLLM
    proxy wrote a null one (litellm's ``openai_error_payload`` now maps it to null) in its
    404 for a model it does not have."""
    param = error.get("param")
    return (
        isinstance(param, str)
        and param not in ("", "model", "None", "null")
        and error.get("code") != "model_not_found"
    )


#: The statuses of a provider that is overloaded: 503, and Anthropic's 529 ``overloaded_error``.
OVERLOADED = (503, 529)

#: How a 400's ``code`` or ``type`` says the prompt is over the model's window: OpenAI's code,
#: llama.cpp's server's type (llama-server, with ``n_prompt_tokens`` and ``n_ctx`` beside it).
_OVER_WINDOW = ("context_length_exceeded", "exceed_context_size_error")
#: ... and how a provider whose code and type name any bad request says it in the message:
#: Anthropic (its two refusals, and Bedrock's for a Claude model), Gemini (Vertex too),
#: Bedrock, Mistral, llama.cpp's server before it had its own type, and OpenAI's own words
#: (a compatible server that sends them without the code; llama_cpp.server's, with it).
#: Each is matched where the message begins: a 400 that quotes the request (a validator's
#: ``input_value``, an echoed field) may quote a user's text holding the same words, and
#: that 400 is the client's own, not a window another model may have.
_OVER_WINDOW_SAID = re.compile(
    r"prompt is too long"  # Anthropic: "prompt is too long: 215000 tokens > 200000 maximum"
    r"|input length and `max_tokens` exceed context limit"  # Anthropic, with max_tokens
    r"|the input token count \(\d+\) exceeds the maximum number of tokens allowed"  # Gemini
    r"|input is too long for requested model|too many input tokens"  # Bedrock
    r"|prompt contains \d+ tokens.*too large for model with \d+ maximum context length"  # Mistral
    # llama-server: "the request exceeds the available context size. try increasing the
    # context size or enable context shift" (invalid_request_error), and since its type the
    # same with ", try increasing it", then "request (4200 tokens) exceeds ... (4096 tokens)"
    r"|(?:the )?request (?:\(\d+ tokens\) )?exceeds the available context size"
    # OpenAI's words (vLLM, DeepSeek), after vLLM's note on max_tokens where it gives one
    r"|(?:'max_tokens' or 'max_completion_tokens' is too large: \d+\. )?"
    r"this model's maximum context length is \d+ tokens",
    re.IGNORECASE,
)


def _over_window(error: dict[str, Any]) -> bool:
    """Whether a provider's 400 ``error`` object says the prompt is over the model's window:
    by its ``code`` or ``type`` (:data:`_OVER_WINDOW`), else by how its message begins
    (:data:`_OVER_WINDOW_SAID`) unless its ``code`` names another error (OpenAI's
    ``invalid_value``; not a number, as vLLM's 400 and Mistral's ``"3051"``)."""
    code = error.get("code")
    if code in _OVER_WINDOW or error.get("type") in _OVER_WINDOW:
        return True
    if isinstance(code, str) and not code.isdigit():
        return False
    said = error.get("message")
    return isinstance(said, str) and _OVER_WINDOW_SAID.match(said.lstrip()) is not None


def window_words_in(text: str) -> bool:
    """Whether ``text`` holds, anywhere, words a provider says a prompt is over the window in
    that :func:`provider_failure` knows (:data:`_OVER_WINDOW_SAID`). Where it does, where they
    stand tells a refusal from a quote, and litellm, which reads its own list anywhere in its
    text, does not decide (router.backends.closed)."""
    return _OVER_WINDOW_SAID.search(text) is not None


def request_too_large(message: str) -> bool:
    """Whether a provider's 429 ``message`` refuses the request for its own size, not for the
    traffic before it: OpenAI's "Request too large for gpt-4o ... on tokens per min (TPM):
    Limit 30000, Requested 32786", which every retry of that request meets again."""
    return "Request too large for " in message


#: The HTTP status a provider means by the ``code`` or ``type`` of an error event that names
#: none (OpenAI's codes, in chat chunks and Responses events; Anthropic's types, in its
#: ``error`` event; llama.cpp's server's): the status it answers the same failure with.
_STATUS_NAMED = {
    "rate_limit_exceeded": 429,  # OpenAI's code
    "rate_limit_error": 429,  # Anthropic's type
    "overloaded_error": 529,  # Anthropic's type
    "server_is_overloaded": 503,  # OpenAI's code
    "service_unavailable_error": 503,  # OpenAI's type
    "invalid_request_error": 400,  # OpenAI's and Anthropic's type
    "context_length_exceeded": 400,  # OpenAI's code
    "exceed_context_size_error": 400,  # llama.cpp's server's type
    "request_too_large": 413,  # Anthropic's type
    "authentication_error": 401,  # Anthropic's type
    "invalid_api_key": 401,  # OpenAI's code
    "permission_error": 403,  # Anthropic's type
    "model_not_found": 404,  # OpenAI's code (its type is invalid_request_error)
    "not_found_error": 404,  # Anthropic's type
    # A Response's error codes (response.failed) for a request it cannot take; its others,
    # server_error and vector_store_timeout, are the provider's failure (a 502).
    **dict.fromkeys(
        (
            "invalid_prompt",
            "invalid_image",
            "invalid_image_format",
            "invalid_base64_image",
            "invalid_image_url",
            "image_too_large",
            "image_too_small",
            "image_parse_error",
            "image_content_policy_violation",
            "invalid_image_mode",
            "image_file_too_large",
            "unsupported_image_media_type",
            "empty_image_file",
            "failed_to_download_image",
            "image_file_not_found",
        ),
        400,
    ),
}


def _status_of(error: dict[str, Any]) -> tuple[int | None, int | None]:
    """The HTTP status an error event means, and the one it states: an HTTP status in
    ``code`` (vLLM, llama.cpp's server), else the one its ``code`` or ``type`` names
    (:data:`_STATUS_NAMED`), which it does not state."""
    code = error.get("code")
    if type(code) is int and 400 <= code < 600:
        return code, code
    for name in (code, error.get("type")):
        if isinstance(name, str) and name in _STATUS_NAMED:
            return _STATUS_NAMED[name], None
    return None, None


def stream_failure(
    label: str,
    error: Any,
    *,
    what: str = "sent an error event",
    api_key: str | None = None,
    sent: Mapping[str, Any] | None = None,
) -> BackendError:
    """The failure a provider's error event reports once a stream is open (Anthropic's
    ``error`` event, a Responses ``error`` or ``response.failed``, an OpenAI-compatible chat
    chunk ``{"error": {...}}``; or a Response's ``error``), taken as the same failure answered
    with an HTTP status is (:func:`error_for_status`, through the same mapping): that status
    where the event puts one in ``code`` (vLLM, llama.cpp's server), else the one its code or
    type names (a rate limit a 429, an overload a 503, a bad request a 400, a refused key a
    401, a model that does not exist a 404), else a 502. An event has no headers: no
    ``Retry-After``. ``what`` says what the provider did, in the message: an event may come
    before the first token (then the chain goes on) as well as after it, so it does not say
    "mid-stream". ``sent``: the request the stream answers, whose ids a 404 may name, as
    for a status (:func:`_not_found`)."""
    error = error if isinstance(error, dict) else {"message": str(error or "")}
    said = scrub(str(error.get("message") or "error")[:500], [api_key])
    text = f"{label} {what}: {said}"
    status, stated = _status_of(error)
    if status is None:
        return BackendError(text)
    return provider_failure(status, error, text, upstream_status=stated, sent=sent)


#: The most of an error answer's body read for its message. A provider's error is JSON of a
#: few hundred bytes (a validation error naming fields, or a proxy's or CDN's HTML page, a few
#: KiB), and only its first 500 characters are repeated: 64 KiB holds any of these whole, and
#: a 500 whose body goes on and on (a proxy streaming a log) is neither waited for nor held.
ERROR_BODY_BYTES = 64 * 1024


async def _error(
    response: aiohttp.ClientResponse, label: str, api_key: str | None, sent: Mapping[str, Any]
) -> BackendError:
    """The error for an answer with an error status to the request ``sent``, from at most
    :data:`ERROR_BODY_BYTES` of its body. A longer body is not read on: the error is the
    status's, with the reason and the bound in its message, and the connection, whose body is
    unread, is closed, not pooled."""
    raw = bytearray()
    while len(raw) <= ERROR_BODY_BYTES:
        data = await response.content.read(ERROR_BODY_BYTES + 1 - len(raw))
        if not data:
            break
        raw += data
    retry_after = response.headers.get("retry-after")
    if len(raw) > ERROR_BODY_BYTES:
        response.close()
        return unread_error_body(response.status, label, response.reason, retry_after, api_key)
    return error_for_status(
        response.status,
        bytes(raw),
        label,
        reason=response.reason,
        retry_after=retry_after,
        api_key=api_key,
        sent=sent,
    )


def unread_error_body(
    status: int, label: str, reason: str | None, retry_after: str | None, api_key: str | None
) -> BackendError:
    """The error for an answer with an error ``status`` whose body is over
    :data:`ERROR_BODY_BYTES`, on every path (direct, native, through litellm): the status's
    (:func:`error_for_status`), with the reason and the bound in its message. A cut JSON body
    says nothing; its status says what happened."""
    reason = f"{reason or 'error'} (an error body over {ERROR_BODY_BYTES} bytes, not read)"
    return error_for_status(
        status, b"", label, reason=reason, retry_after=retry_after, api_key=api_key
    )


def map_transport_error(exc: Exception, label: str) -> TiergateError:
    """Map a transport failure (timeout, refused, reset) to a Tiergate error. A URL that
    cannot be called (an ``api_base`` whose port is ``${PORT}``) is the model's settings, as
    on litellm's path (:class:`ModelSettingsError`): nothing was sent, and a retry or a
    cooldown fixes nothing. One a provider redirected to is the provider's."""
    if isinstance(exc, asyncio.TimeoutError):  # aiohttp's timeouts subclass it
        return UpstreamTimeoutError(f"{label} timed out ({type(exc).__name__})")
    if isinstance(exc, aiohttp.InvalidURL) and not isinstance(
        exc, aiohttp.InvalidUrlRedirectClientError
    ):
        return ModelSettingsError(
            f"{label} cannot be called as configured (check its api_base): "
            f"{type(exc).__name__}: {exc}"
        )
    return BackendError(f"{label} unreachable: {type(exc).__name__}", code="upstream_unreachable")


#: How every path says a stream stopped before its end.
STREAM_ENDED = "the stream ended before it finished"


def stream_cut(label: str) -> BackendError:
    """The failure of a stream that stopped before its end (OpenAI's ``finish_reason``,
    Anthropic's ``message_stop``, the Responses ``response.completed``), whatever the path:
    a cut answer is a failed call, never a whole one. Before the first token it falls back;
    after it, the client gets an error event and the record says error. The upstream had
    answered 200: ``upstream_status`` says it did."""
    return BackendError(
        f"{label} unreachable: {STREAM_ENDED}", code="upstream_unreachable", upstream_status=200
    )


async def _lines(content: aiohttp.StreamReader, limit: int, label: str) -> AsyncIterator[bytes]:
    """The lines of a streamed body, each at most ``limit`` bytes, else
    :class:`UpstreamBadResponseError`. aiohttp's own (``async for line in content``) refuses
    a line over twice its read buffer (512 KiB in aiohttp 3.14) with an error that is no
    ``ClientError`` (``LineTooLong``): a 500. Its limit can only be raised with that buffer,
    which every connection holds; and it copies a long line whole at each chunk read.

    A line ends at LF, CRLF or a lone CR, as SSE allows (a server that ended its lines in CR
    was read as one long line), and comes without its end. A CRLF split between two reads
    ends one line, not two: an empty line ends an SSE event. A read without a CR is taken as
    it is."""
    buffer = bytearray()
    start = 0  # where the search for the next line's end resumes
    after_cr = False  # the last read ended in CR: an LF that begins this one ends no line
    async for read in content.iter_any():
        data = read
        if after_cr or 13 in read:  # a CR, sought as a byte (memchr): quicker than b"\r"
            data = read[1:] if after_cr and read[:1] == b"\n" else read
            after_cr = read.endswith(b"\r")
            data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        buffer += data
        while (end := buffer.find(b"\n", start)) != -1:
            if end > limit:
                break
            yield bytes(buffer[:end])
            del buffer[: end + 1]
            start = 0
        if len(buffer) > limit:
            raise UpstreamBadResponseError(f"{label} sent a stream event over {limit} bytes")
        start = len(buffer)
    if buffer:
        yield bytes(buffer)


async def _body(response: aiohttp.ClientResponse, limit: int, label: str) -> bytes:
    """The whole body of ``response`` (decoded, as aiohttp decompresses it), at most ``limit``
    bytes, else :class:`UpstreamBadResponseError`: ``read()`` held whatever came."""
    too_long = UpstreamBadResponseError(f"{label} sent a body over {limit} bytes")
    if response.content_length is not None and response.content_length > limit:
        raise too_long
    raw = bytearray()
    async for data in response.content.iter_any():
        raw += data
        if len(raw) > limit:
            raise too_long
    return bytes(raw)


def _dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


class OpenAIHTTP:
    """A pooled client (aiohttp, HTTP/1.1 keep-alive) for OpenAI-compatible base URLs.

    aiohttp rather than httpx: on the proxy's hot path httpx's connection pool dominated
    Tiergate's own CPU per request (it scans and polls every pooled connection per request;
    see bench/README.md), aiohttp's a small fraction of that. Timeouts keep httpx's meaning: the
    limit applies to connecting and to each read, not to a whole (possibly long) stream.
    The session is opened on first use, inside the running event loop.

    A request whose connection fails before any answer (reset, or closed without a byte) is
    sent once more, on a fresh connection: so fails a pooled keep-alive connection that the
    server closed as idle just as the request went out (uvicorn, llama_cpp.server's server,
    closes them after 5 s; aiohttp keeps them 15 s), and the server never answered it. aiohttp
    retries so only the idempotent methods, not a POST.
    """

    def __init__(
        self,
        *,
        timeout_s: float,
        max_connections: int = 512,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        self._timeout_s = timeout_s
        self._max_connections = max_connections
        self._max_event_bytes = max_event_bytes
        self._session: aiohttp.ClientSession | None = None
        self._fresh: aiohttp.ClientSession | None = None  # for the retries: never pooled

    def _client(self, *, fresh: bool = False) -> aiohttp.ClientSession:
        if fresh:
            if self._fresh is None:
                self._fresh = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(force_close=True, ttl_dns_cache=300),
                    timeout=_timeout(self._timeout_s),
                )
            return self._fresh
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(
                    limit=self._max_connections, limit_per_host=0, ttl_dns_cache=300
                ),
                timeout=_timeout(self._timeout_s),
            )
        return self._session

    @contextlib.asynccontextmanager
    async def _post(
        self, url: str, body: dict[str, Any], headers: dict[str, str], timeout_s: float | None
    ) -> AsyncGenerator[aiohttp.ClientResponse, None]:
        """The response to POSTing ``body``, sent a second time on a fresh connection when the
        first one failed before any answer (see the class docstring). A connection refused or
        timed out is not tried again: the server is down or slow, not the connection stale."""
        data = _dumps(body)
        timeout = _timeout(timeout_s) if timeout_s is not None else None
        try:
            response = await self._client().post(url, data=data, headers=headers, timeout=timeout)
        except aiohttp.ClientConnectorError:
            raise
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
            response = await self._client(fresh=True).post(
                url, data=data, headers=headers, timeout=timeout
            )
        async with response:
            yield response

    async def post_json(
        self,
        url: str,
        body: dict[str, Any],
        *,
        headers: dict[str, str],
        api_key: str | None,
        label: str,
        timeout_s: float | None = None,
    ) -> Any:
        """POST ``body`` to ``url`` and return the parsed JSON answer (any provider's API). A
        body over ``max_event_bytes`` is :class:`UpstreamBadResponseError`, as a stream event
        over it is: a provider cannot make Tiergate hold an endless answer."""
        try:
            async with self._post(url, body, headers, timeout_s) as response:
                if response.status >= 400:
                    raise await _error(response, label, api_key, body)
                raw = await _body(response, self._max_event_bytes, label)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise map_transport_error(exc, label) from exc
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise UpstreamBadResponseError(f"{label} sent a body that is not JSON") from exc

    async def post_sse(
        self,
        url: str,
        body: dict[str, Any],
        *,
        headers: dict[str, str],
        api_key: str | None,
        label: str,
        timeout_s: float | None = None,
    ) -> AsyncGenerator[bytes, None]:
        """POST ``body`` to ``url`` and yield the data of each SSE event.

        An event's ``data:`` lines are joined with LF up to the blank line that ends it, as SSE
        joins them (a server that indents its JSON sends one over several). An event's first
        line that is whole (it ends in ``}``, or is ``[DONE]``) goes at once, as it is: the
        event as OpenAI, Anthropic and the OpenAI-compatible servers send it, and each line of
        a server that ends no event with a blank line, an event of its own.
        Event names are not read: OpenAI's and Anthropic's events carry their type in the data.
        An ``error:`` line, which llama.cpp's server sent for a failure once its stream was open
        until it sent ``data: {"error": ...}`` instead (ggml-org/llama.cpp#16109, 2025), fails
        the call as that error says (:func:`stream_failure`), not as a stream cut short.
        Leaving early closes the upstream connection: OpenAI and Anthropic stop generating
        then; not every provider does (SECURITY.md, *A client that leaves still pays*).
        A line or an event over ``max_event_bytes`` (the setting of that name) is
        :class:`UpstreamBadResponseError`: a bounded read, not a 500.
        """
        try:
            async with self._post(url, body, headers, timeout_s) as response:
                if response.status >= 400:
                    raise await _error(response, label, api_key, body)
                limit = self._max_event_bytes
                event: bytearray | None = None  # the data lines so far of an event not yet whole
                async for raw in _lines(response.content, limit, label):
                    line = raw.strip()
                    if line.startswith(b"data:"):
                        data = line[5:].strip()
                        if event is not None:
                            event += b"\n" + data
                            if len(event) > limit:
                                raise UpstreamBadResponseError(
                                    f"{label} sent a stream event over {limit} bytes"
                                )
                        elif data.endswith(b"}") or data == b"[DONE]":
                            yield data
                        else:
                            event = bytearray(data)
                    elif not line:
                        if event is not None:
                            yield bytes(event)
                            event = None
                    elif line.startswith(b"error:"):
                        error = _error_field(line[6:])
                        raise stream_failure(label, error, api_key=api_key, sent=body)
                if event is not None:
                    yield bytes(event)
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise map_transport_error(exc, label) from exc

    async def complete(
        self,
        base_url: str,
        body: dict[str, Any],
        *,
        api_key: str | None,
        label: str,
        timeout_s: float | None = None,
    ) -> Completion:
        """POST a non-streaming request; return the parsed body and its usage."""
        payload = await self.post_json(
            _endpoint(base_url),
            {**body, "stream": False},
            headers=_headers(api_key),
            api_key=api_key,
            label=label,
            timeout_s=timeout_s,
        )
        choices = payload.get("choices") if isinstance(payload, dict) else None
        if not (
            isinstance(choices, list)
            and choices
            and all(isinstance(c, dict) and isinstance(c.get("message"), dict) for c in choices)
        ):
            raise UpstreamBadResponseError(f"{label} sent a body without valid 'choices'")
        return Completion(body=payload, usage=usage_from_body(payload, label))

    async def stream(
        self,
        base_url: str,
        body: dict[str, Any],
        usage: Usage,
        *,
        api_key: str | None,
        label: str,
        timeout_s: float | None = None,
    ) -> AsyncIterator[dict[str, Any]]:
        """POST a streaming request and yield each SSE ``data:`` chunk as a dict.

        Usage is always asked of the upstream (``stream_options.include_usage``) so the record
        has real token counts; the usage-only chunk is passed on only if the client asked for it.
        Leaving early closes the upstream connection: OpenAI and Anthropic stop generating
        then; not every provider does (SECURITY.md, *A client that leaves still pays*).
        """
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        request = {**body, "stream": True, "stream_options": options}
        finished = False
        events = self.post_sse(
            _endpoint(base_url),
            request,
            headers=_headers(api_key),
            api_key=api_key,
            label=label,
            timeout_s=timeout_s,
        )
        try:
            async for data in events:
                if data == b"[DONE]":
                    break
                chunk = _chunk(data, label)
                if chunk.get("error"):  # the server failed once the stream was open
                    raise stream_failure(label, chunk["error"], api_key=api_key, sent=body)
                if chunk.get("usage"):
                    usage.take(usage_from_body(chunk, label))
                finished = finished or any(
                    c.get("finish_reason") for c in chunk.get("choices") or ()
                )
                yield chunk
        finally:
            await events.aclose()
        # A stream that stops without a finish_reason was cut off, not finished: aiohttp ends a
        # read-until-close body quietly even on a reset, and llama_cpp.server ends the stream it
        # interrupts for a newer request (its --interrupt_requests, on by default) with [DONE].
        if not finished:
            raise stream_cut(label)

    async def aclose(self) -> None:
        """Close pooled connections."""
        for session in (self._session, self._fresh):
            if session is not None:
                await session.close()
        self._session = self._fresh = None


def _error_field(raw: bytes) -> Any:
    # llama.cpp's ``error:`` line holds the error object itself ({"code", "message", "type"});
    # one wrapped as an error body is taken too, and text that is not JSON is the message.
    try:
        error = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return raw.decode(errors="replace").strip()
    if isinstance(error, dict) and isinstance(error.get("error"), dict):
        return error["error"]
    return error


def _chunk(data: bytes, label: str) -> dict[str, Any]:
    """One SSE chunk, or :class:`UpstreamBadResponseError` when it is not a chunk."""
    try:
        chunk = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise UpstreamBadResponseError(f"{label} sent a chunk that is not JSON") from exc
    choices = chunk.get("choices", []) if isinstance(chunk, dict) else None
    if not (isinstance(choices, list) and all(isinstance(c, dict) for c in choices)):
        raise UpstreamBadResponseError(f"{label} sent a chunk that is not a chat chunk")
    return chunk  # type: ignore[no-any-return]


def _timeout(seconds: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=None, sock_connect=min(seconds, 10.0), sock_read=seconds)


def _endpoint(base_url: str) -> str:
    return base_url.rstrip("/") + "/chat/completions"


def _headers(api_key: str | None) -> dict[str, str]:
    return {**_JSON, "authorization": f"Bearer {api_key}"} if api_key else _JSON
