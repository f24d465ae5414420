"""A loopback HTTP server that plays a closed provider, speaking the real wire protocols.

* OpenAI: ``POST .../chat/completions`` (JSON, or SSE chunks ending in ``data: [DONE]``).
* Anthropic: ``POST .../v1/messages`` (JSON, or Anthropic's named SSE events).
* OpenAI Responses: ``POST .../responses`` (JSON, or the named ``response.*`` SSE events).
* Bedrock's InvokeModel for a Claude model: ``POST .../model/MODEL_ID/invoke`` (Anthropic's
  Messages JSON, with the model in the path; with an ``api_key`` litellm sends it as a bearer
  token rather than signing the request); its stream, ``.../invoke-with-response-stream``,
  Anthropic's events each in a frame of AWS's binary event stream (:func:`bedrock_frame`).

It records every request it receives (path, headers, JSON body) so tests can assert what left the
machine, and it can be told to misbehave: fail with a status, rate-limit with ``Retry-After``,
stall past a timeout (until ``unstall()``), reset the connection mid-stream, or answer with a
tool call. It also plays the shadow judge: a request carrying Tiergate's pairwise judge prompt
is answered with a verdict (``[[A]]``/``[[B]]``/``[[C]]``) that prefers the side
``Behaviour.judge`` names, where the "closed" answer is the one equal to ``Behaviour.text`` (what
this provider answers itself). As Anthropic, it refuses a Messages request without ``max_tokens``
or with more than the model's output limit (:data:`ANTHROPIC_OUTPUT_LIMITS`), with its 400;
so does Bedrock for a Claude model; told a model's context window (``context_windows``),
either protocol refuses a request to it that does not fit.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import struct
import threading
import time
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Received:
    """One request the fake provider got."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Behaviour:
    """How to answer the next requests. ``mode`` is one of:
    ok, status, rate_limit, stall, reset_mid_stream, tool_call (see ``calls``), echo_auth (a
    500 whose message repeats the Authorization header it got, as careless providers do),
    echo_key (a 500 that repeats the bare key, with no header name beside it), bad_usage
    (``usage`` is a string), array_body (a 200 whose JSON body, or each streamed chunk, is an
    array), no_stream_usage (a stream without a usage chunk even when asked, as llama-cpp-python's
    server sends it), interrupted (a stream that ends with ``data: [DONE]`` after two words and
    no finish_reason, as llama-cpp-python's server ends one it interrupts for a newer request),
    done_after_open (OpenAI chat: a stream that ends with ``data: [DONE]`` right after its
    role-only chunk, with no token and no finish_reason; the other protocols end after their
    opening), reset_at_once (the connection reset before any answer), reset_after_open (a
    stream whose connection is reset right after its opening: OpenAI's role-only chunk,
    Anthropic's ``message_start``, the Responses ``response.created``), overloaded_after_open
    (Anthropic: ``message_start``, then an ``overloaded_error`` event, as Anthropic ends a stream it
    cannot go on with; Responses: ``response.created``, then OpenAI's ``server_is_overloaded``
    ``error`` event; OpenAI chat: the role chunk, then :data:`OPENAI_CHAT_OVERLOADED`; each with
    ``error_body`` as the event instead), error_mid_stream (two words, then the protocol's
    error event for a rate limit, :data:`ANTHROPIC_RATE_LIMITED`, :data:`OPENAI_RATE_LIMITED`
    or, OpenAI chat, the chunk :data:`OPENAI_CHAT_RATE_LIMITED`, or ``error_body``, as a
    provider ends a stream it rate-limits once open), error_line_mid_stream (OpenAI chat: two
    words, then an SSE ``error:`` line holding :data:`LLAMA_CPP_CONTEXT_EXCEEDED`, or
    ``error_body``, and ``data: [DONE]``, as llama.cpp's server ended a stream that failed
    before ggml-org/llama.cpp#16109), unfinished_response
    (Responses: a 200 whose Response has status ``response_status`` and no output, with
    ``error_body`` as its ``error``; a ``failed`` one without it has
    :data:`RESPONSE_SERVER_ERROR`, as OpenAI reports a model that failed to generate one;
    streamed, that Response ends the stream after ``words_sent`` words, in a
    ``response.incomplete`` event for status ``incomplete``, else ``response.completed``).
    ``chunk_delay_s`` paces streamed chunks."""

    mode: str = "ok"
    status: int = 500
    retry_after: int | str = 7  # seconds, or any text (an HTTP-date) sent as it is
    stall_s: float = 5.0
    text: str = "Hello from the closed model, streamed word by word."
    chunk_delay_s: float = 0.0
    judge: str = "closed"  # closed | local | tie | garbage: the verdict given to judge prompts
    # When set, decides judge prompts instead: (question, answer A, answer B) -> "A" | "B" | "C".
    judge_fn: Callable[[str, str, str], str] | None = None
    # When set, the OpenAI JSON answer to each request body (a scripted model) instead of text.
    reply_fn: Callable[[dict[str, Any]], str] | None = None
    # Bill each of the request's ``n`` choices, as OpenAI does (usage grows with ``n``).
    bill_choices: bool = False
    # When set, the completion tokens billed per choice (else 7): at most the request's
    # ``max_completion_tokens`` or ``max_tokens``, as a provider stops there; without either,
    # all of them (a long answer, up to the model's own limit).
    completion_tokens: int | None = None
    # Bill a prompt token a UTF-8 byte of the text of its ``system`` and ``messages`` (else 11),
    # as a byte-level tokenizer reads text none of whose bytes merge (``"a\n"`` repeated).
    bill_bytes: bool = False
    # The output limits the server reads, in its order: an OpenAI-compatible server that
    # predates ``max_completion_tokens`` (older vLLM, Ollama) reads ``max_tokens`` alone.
    output_fields: tuple[str, ...] = ("max_completion_tokens", "max_tokens")
    # Refuse a chat request field OpenAI's API does not take, a message field its schema does not
    # have, a tool of a type other than function or custom, an output limit over the model's
    # (OPENAI_OUTPUT_LIMITS), more than 4 stop sequences, ``stop`` for a reasoning model that
    # takes none, and ``reasoning_effort`` for a model that does not reason, with OpenAI's 400s
    # (the fake otherwise takes anything); on ``/responses``, a reasoning model's ``top_p`` or
    # ``temperature`` other than 1 alone.
    strict: bool = False
    # In ``status`` mode, the JSON body of the error instead of a generic one (in
    # ``overloaded_after_open`` mode, the event sent in place of the overloaded ``error``).
    error_body: dict[str, Any] | None = None
    # In ``status`` mode, headers sent with the error (a 503's or 529's ``retry-after``).
    error_headers: dict[str, str] = field(default_factory=dict)
    # In ``status`` mode, an error body that goes on and on (a proxy's page, a log): its message
    # padded with this many bytes, sent, then its end held back until the stall ends
    # (``stall_s`` or ``unstall()``).
    error_pad: int = 0
    # In ``status`` mode, answer a stream 200 and end it before its first chunk instead, then
    # drop the connection, as llama_cpp.server does with a prompt over its context (it finds
    # that only once streaming).
    stream_opens: bool = False
    # Prompt tokens read from (and, Anthropic only, written to) the provider's prompt cache,
    # reported in each protocol's own shape: OpenAI's ``prompt_tokens_details.cached_tokens``
    # and ``input_tokens_details.cached_tokens`` (within the prompt count), Anthropic's
    # ``cache_read_input_tokens`` and ``cache_creation_input_tokens`` (beside ``input_tokens``).
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    # Of ``cache_write_tokens``, those written to Anthropic's one-hour cache. Set (0 too), the
    # usage breaks the writes down by lifetime as Anthropic's has since that cache came
    # (``cache_creation``: ``ephemeral_5m_input_tokens``, ``ephemeral_1h_input_tokens``);
    # None: the older usage, with ``cache_creation_input_tokens`` alone.
    cache_write_1h_tokens: int | None = None
    # Anthropic: the web searches the model made, reported in
    # ``usage.server_tool_use.web_search_requests``; their results, which the model reads,
    # count :data:`SEARCH_RESULT_TOKENS` each in ``input_tokens``. Streamed, as Anthropic sends
    # them: ``message_start``'s usage counts the prompt alone, ``message_delta``'s the whole.
    web_searches: int = 0
    # In ``status`` mode (and ``stall`` and the ``*_after_open`` ones), fail (stall) only the
    # requests to paths ending so (``/chat/completions``: the OpenAI model), answer the others.
    failing_path: str | None = None
    # In ``tool_call`` mode, the calls to make, ``(tool name, arguments)`` each, in parallel, in
    # place of one call of the first tool offered. Streamed, each call's arguments come in two
    # pieces; ``interleave`` sends the calls' pieces alternately (OpenAI chat: by ``index``).
    calls: list[tuple[str, dict[str, Any]]] | None = None
    interleave: bool = False
    # Answer one request a connection and drop the next one on it unanswered, as a server
    # that closed an idle keep-alive connection just as the client sent on it.
    drop_reused: bool = False
    # OpenAI chat streams: the opening role-only chunk carries the usage known then (the
    # prompt's tokens, none generated), as servers that report usage early or on every chunk
    # (vLLM's ``continuous_usage_stats``) send it.
    usage_in_opening: bool = False
    # OpenAI chat streams: every chunk with choices carries the usage (the finish chunk the
    # whole), and no usage-only chunk follows, as servers that report usage on every chunk do.
    usage_on_chunks: bool = False
    # In ``unfinished_response`` mode, the Response's status, and (streamed) how many words of
    # ``text`` go before the event that ends the stream with it.
    response_status: str = "failed"
    words_sent: int = 0
    # Streams send ``text`` in pieces of this many characters, not word by word: a long answer
    # in few deltas. A whole long answer rides in one event anyway where the protocol puts it
    # there (the Responses ``.done`` events and ``response.completed``), or as one long word.
    piece_chars: int = 0
    # The context window of each model named here (by the name the provider is sent): a chat
    # or Messages request to it whose prompt (:func:`prompt_tokens`) plus its ``max_tokens`` is
    # over it is refused with the provider's 400 (:func:`window_refusal`), as providers do.
    context_windows: dict[str, int] = field(default_factory=dict)
    # OpenAI chat streams asked for ``logprobs``: each word carries this log-probability, as
    # OpenAI and llama.cpp's server send it (None: none sent, whatever the request asks).
    logprob: float | None = None
    # The model every answer names (a provider's dated snapshot: OpenAI answers a request for
    # gpt-4o with gpt-4o-2024-08-06), else the model the request asked for.
    answered_model: str | None = None
    # OpenAI chat answers and streams asked for ``logprobs``: the answer's (each streamed
    # word's) ``logprobs`` field is this instead (a server that sends one that cannot be read).
    bad_logprobs: Any = None
    # Streamed, the place of the first word whose ``logprobs`` is ``bad_logprobs``: the words
    # before it carry ``logprob`` (a server whose log-probabilities go bad past the first few).
    bad_logprobs_from: int = 0
    # OpenAI chat streams: this SSE ``data:`` sent in place of the second word (a server that
    # sends a chunk that is not JSON, or not a chat chunk).
    bad_chunk: bytes | None = None


def endless_error(status: int) -> Behaviour:
    """Answer ``status`` with a body that goes on and on (a proxy's page, a log it streams):
    1 MiB of it sent, its end held back for a minute (or until ``unstall()``), and a
    ``Retry-After`` of 12 s."""
    return Behaviour(
        mode="status",
        status=status,
        error_pad=1024 * 1024,
        stall_s=60,
        error_headers={"retry-after": "12"},
    )


#: The input tokens the results of one web search add to an Anthropic answer's usage.
SEARCH_RESULT_TOKENS = 1000

#: Anthropic's error body when it is overloaded (with HTTP 529, or as a stream's error event).
ANTHROPIC_OVERLOADED = {
    "type": "error",
    "error": {"type": "overloaded_error", "message": "Overloaded"},
}

#: Anthropic's stream event when it rate-limits a stream it has opened (its 429).
ANTHROPIC_RATE_LIMITED = {
    "type": "error",
    "error": {"type": "rate_limit_error", "message": "Number of request tokens has exceeded"},
}

#: OpenAI's Responses stream event when it rate-limits a stream it has opened (its 429).
OPENAI_RATE_LIMITED = {
    "type": "error",
    "code": "rate_limit_exceeded",
    "message": "Rate limit reached for requests",
    "param": None,
}

#: OpenAI's Responses stream event when it is overloaded once the stream is open (its 503).
OPENAI_OVERLOADED = {
    "type": "error",
    "code": "server_is_overloaded",
    "message": "Our servers are currently overloaded. Please try again later.",
    "param": None,
}

#: An OpenAI chat stream's chunk when it rate-limits a stream it has opened: the error body of
#: its 429, as a ``data:`` chunk (OpenAI-compatible servers, vLLM, send one so).
OPENAI_CHAT_RATE_LIMITED = {
    "error": {
        "message": "Rate limit reached for gpt-4o on requests per min (RPM): Limit 500.",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
}

#: An OpenAI chat stream's chunk when it is overloaded once the stream is open (its 503).
OPENAI_CHAT_OVERLOADED = {
    "error": {
        "message": "The server is overloaded. Please try again later.",
        "type": "service_unavailable_error",
        "param": None,
        "code": "server_is_overloaded",
    }
}

#: What llama.cpp's server put on an SSE ``error:`` line (the error object itself, not wrapped)
#: for a prompt over its context size, before ggml-org/llama.cpp#16109.
LLAMA_CPP_CONTEXT_EXCEEDED = {
    "code": 400,
    "message": "the request exceeds the available context size. try increasing the context size "
    "or enable context shift",
    "type": "invalid_request_error",
}

#: The ``error`` of a Response whose model failed to generate it (OpenAI's status ``failed``).
RESPONSE_SERVER_ERROR = {"code": "server_error", "message": "The model failed to respond."}

#: The fields of a chat request OpenAI's API takes; it refuses any other with a 400.
OPENAI_CHAT_FIELDS = frozenset(
    {"model", "messages", "audio", "frequency_penalty", "function_call", "functions"}
    | {"logit_bias", "logprobs", "max_completion_tokens", "max_tokens", "metadata", "modalities"}
    | {"n", "parallel_tool_calls", "prediction", "presence_penalty", "prompt_cache_key"}
    | {"reasoning_effort", "response_format", "safety_identifier", "seed", "service_tier"}
    | {"stop", "store", "stream", "stream_options", "temperature", "tool_choice", "tools"}
    | {"top_logprobs", "top_p", "user", "verbosity", "web_search_options"}
)
#: The fields of a chat message OpenAI's schema has; it refuses a message with any other.
OPENAI_MESSAGE_FIELDS = frozenset(
    {"role", "content", "name", "tool_calls", "tool_call_id", "function_call", "refusal", "audio"}
)
#: The most tokens Anthropic lets each of these models write in one answer (its output limit);
#: it refuses a request whose ``max_tokens`` is larger with a 400, and one without any.
ANTHROPIC_OUTPUT_LIMITS = {
    "claude-3-haiku-20240307": 4096,
    "claude-3-5-haiku-20241022": 8192,
    "claude-3-5-sonnet-20241022": 8192,
    "claude-opus-4-1": 32000,
    "claude-sonnet-4-20250514": 64000,
    "claude-sonnet-4-5-20250929": 64000,
    "anthropic.claude-3-haiku-20240307-v1:0": 4096,  # on Bedrock, named by its model id
}
#: Bedrock's InvokeModel path, ``.../model/MODEL_ID/invoke``, and its stream's
#: (``.../invoke-with-response-stream``).
BEDROCK_INVOKE = re.compile(r"/model/([^/]+)/invoke(-with-response-stream)?$")


def bedrock_frame(event: Any) -> bytes:
    """One frame of AWS's binary event stream, as Bedrock's InvokeModelWithResponseStream
    sends an Anthropic event: a ``chunk`` event whose JSON payload holds the event's JSON in
    base64 (``bytes``), between the frame's lengths and CRC32 checksums."""
    payload = json.dumps({"bytes": base64.b64encode(json.dumps(event).encode()).decode()})
    headers = b"".join(
        bytes([len(name)]) + name + b"\x07" + len(value).to_bytes(2, "big") + value
        for name, value in (
            (b":event-type", b"chunk"),
            (b":content-type", b"application/json"),
            (b":message-type", b"event"),
        )
    )
    prelude = struct.pack(">II", 16 + len(headers) + len(payload), len(headers))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + headers + payload.encode()
    return message + struct.pack(">I", zlib.crc32(message))


#: Model name prefixes of OpenAI's reasoning models, the only ones that take reasoning_effort.
OPENAI_REASONING = ("o1", "o3", "o4", "gpt-5")
#: Of those, the ones that take ``stop``; the others refuse it with a 400 ``unsupported_parameter``
#: (as reported of o1-preview, o1-mini, o3, o4-mini and gpt-5; not checked against the live API).
OPENAI_REASONING_TAKING_STOP = ("o3-mini", "gpt-5-chat")


def openai_refusal(body: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's 400 body for a chat request it would refuse for its fields, else None."""
    for key in body:
        if key not in OPENAI_CHAT_FIELDS:
            message = f"Unrecognized request argument supplied: {key}"
            return {"message": message, "type": "invalid_request_error", "param": None}
    for index, chat_message in enumerate(body.get("messages") or ()):
        extra = sorted(set(chat_message) - OPENAI_MESSAGE_FIELDS)
        if extra:
            names = ", ".join(repr(name) for name in extra)
            message = (
                f"Additional properties are not allowed ({names} "
                f"{'was' if len(extra) == 1 else 'were'} unexpected) - 'messages.{index}'"
            )
            return {"message": message, "type": "invalid_request_error", "param": None}
    for index, tool in enumerate(body.get("tools") or ()):
        if tool.get("type") not in ("function", "custom"):
            message = (
                f"Invalid value: '{tool.get('type')}'. Supported values are: 'function' and "
                "'custom'."
            )
            return {
                "message": message,
                "type": "invalid_request_error",
                "param": f"tools[{index}].type",
            }
    limits = _limit_refusal(body)
    if limits is not None:
        return limits
    decoding = _stop_refusal(body) or _sampling_refusal(body)
    if decoding is not None:
        return decoding
    reasoning = str(body.get("model", "")).startswith(OPENAI_REASONING)
    if "max_tokens" in body and reasoning:
        return {
            "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
            "Use 'max_completion_tokens' instead.",
            "type": "invalid_request_error",
            "param": "max_tokens",
            "code": "unsupported_parameter",
        }
    if "reasoning_effort" in body and not reasoning:
        return {
            "message": (
                "Unsupported parameter: 'reasoning_effort' is not supported with this model."
            ),
            "type": "invalid_request_error",
            "param": "reasoning_effort",
            "code": "unsupported_parameter",
        }
    return None


def _limit_refusal(body: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's 400 body for a chat request's output limit it would refuse (both fields at
    once, ``max_completion_tokens`` with a ``prediction``, over the model's limit), else None."""
    with_it = [f for f in ("max_tokens", "prediction") if body.get(f) is not None]
    if with_it and body.get("max_completion_tokens") is not None:
        # OpenAI's Predicted Outputs guide: "max_completion_tokens: not supported" (the
        # message for a prediction is not checked against the live API).
        both = with_it[0] == "max_tokens"
        said = (
            "Setting 'max_tokens' and 'max_completion_tokens' at the same time is not supported."
            if both
            else "Unsupported parameter: 'max_completion_tokens' is not supported with "
            "predicted outputs."
        )
        return {
            "message": said,
            "type": "invalid_request_error",
            "param": "max_tokens" if both else "max_completion_tokens",
            "code": "invalid_parameter_combination" if both else "unsupported_parameter",
        }
    return _over_output_limit(body)


def _stop_refusal(body: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's 400 body for a chat request's ``stop`` it would refuse (more than
    :data:`OPENAI_STOP_SEQUENCES`, any to a reasoning model that takes none), else None."""
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > OPENAI_STOP_SEQUENCES:
        return {
            "message": "Invalid 'stop': array too long. Expected an array with maximum length "
            f"{OPENAI_STOP_SEQUENCES}, but got an array with length {len(stop)} instead.",
            "type": "invalid_request_error",
            "param": "stop",
            "code": "array_above_max_length",
        }
    model = str(body.get("model", ""))
    if (
        stop
        and model.startswith(OPENAI_REASONING)
        and not model.startswith(OPENAI_REASONING_TAKING_STOP)
    ):
        return {
            "message": "Unsupported parameter: 'stop' is not supported with this model.",
            "type": "invalid_request_error",
            "param": "stop",
            "code": "unsupported_parameter",
        }
    return None


def _sampling_refusal(body: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's 400 body for a chat or Responses request to an o-series model, or to gpt-5
    (not its chat model), that sets ``temperature`` other than 1, or ``top_p``, else None (as
    reported of o3, o3-mini, o4-mini and gpt-5; not checked against the live API)."""
    model = str(body.get("model", ""))
    if not model.startswith(OPENAI_REASONING) or model.startswith("gpt-5-chat"):
        return None
    temperature = body.get("temperature")
    if temperature is not None and temperature != 1:
        return {
            "message": f"Unsupported value: 'temperature' does not support {temperature} with "
            "this model. Only the default (1) value is supported.",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": "unsupported_value",
        }
    if body.get("top_p") is not None:
        return {
            "message": "Unsupported parameter: 'top_p' is not supported with this model.",
            "type": "invalid_request_error",
            "param": "top_p",
            "code": "unsupported_parameter",
        }
    return None


#: The output limits of OpenAI's models, as its API enforces them (and litellm's map lists them).
OPENAI_OUTPUT_LIMITS = {"gpt-4o": 16384, "gpt-4o-mini": 16384}
#: How many stop sequences OpenAI's chat API takes ("Up to 4 sequences", its reference says).
OPENAI_STOP_SEQUENCES = 4


def _over_output_limit(body: dict[str, Any]) -> dict[str, Any] | None:
    """OpenAI's 400 body for a chat request whose output limit is over its model's
    (:data:`OPENAI_OUTPUT_LIMITS`), else None."""
    limit = OPENAI_OUTPUT_LIMITS.get(str(body.get("model")))
    field = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    asked = body.get(field)
    if limit is None or not isinstance(asked, int) or asked <= limit:
        return None
    return {
        "message": f"{field} is too large: {asked}. This model supports at most {limit} "
        f"completion tokens, whereas you provided {asked}.",
        "type": "invalid_request_error",
        "param": field,
        "code": "invalid_value",
    }


def anthropic_refusal(body: dict[str, Any], model: str | None = None) -> dict[str, Any] | None:
    """Anthropic's 400 body for a Messages request it would refuse for its ``max_tokens`` (none,
    or more than the model's output limit in :data:`ANTHROPIC_OUTPUT_LIMITS`), else None.
    ``model``: the model the request is for, where the path names it (Bedrock), not the body."""
    model = model if model is not None else str(body.get("model", ""))
    asked = body.get("max_tokens")
    limit = ANTHROPIC_OUTPUT_LIMITS.get(model)
    if asked is None:
        message = "max_tokens: Field required"
    elif limit is not None and isinstance(asked, int) and asked > limit:
        message = (
            f"max_tokens: {asked} > {limit}, which is the maximum allowed number of output "
            f"tokens for {model}"
        )
    else:
        return None
    return {"type": "error", "error": {"type": "invalid_request_error", "message": message}}


#: Characters a token of the fake's own tokenizer stands for (Tiergate's estimate counts 3.5).
CHARS_PER_TOKEN = 4


def prompt_tokens(body: dict[str, Any]) -> int:
    """The prompt's tokens as this provider counts them: the characters of every string in the
    request's ``system`` and ``messages``, :data:`CHARS_PER_TOKEN` a token."""

    return -(-_strings_size([body.get("system"), body.get("messages")], len) // CHARS_PER_TOKEN)


def _strings_size(value: Any, size: Callable[[str], int]) -> int:
    """The ``size`` of every string in ``value``, summed (keys not counted)."""
    if isinstance(value, str):
        return size(value)
    if isinstance(value, dict):
        return sum(_strings_size(v, size) for v in value.values())
    if isinstance(value, list):
        return sum(_strings_size(v, size) for v in value)
    return 0


def window_refusal(body: dict[str, Any], window: int, *, anthropic: bool) -> dict[str, Any] | None:
    """The provider's 400 body for a request whose prompt plus ``max_tokens`` is over
    ``window`` (OpenAI's ``context_length_exceeded``, Anthropic's own words), else None."""
    prompt = prompt_tokens(body)
    asked = body.get("max_completion_tokens") or body.get("max_tokens") or 0
    if prompt + asked <= window:
        return None
    if not anthropic:
        message = (
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"{prompt + asked} tokens ({prompt} in the messages, {asked} in the completion). "
            "Please reduce the length of the messages or completion."
        )
        return {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        }
    if prompt > window:
        message = f"prompt is too long: {prompt} tokens > {window} maximum"
    else:
        message = (
            f"input length and `max_tokens` exceed context limit: {prompt} + {asked} > "
            f"{window}, decrease input length or `max_tokens` and try again"
        )
    return {"type": "error", "error": {"type": "invalid_request_error", "message": message}}


@dataclass
class FakeProvider:
    """Run with ``with FakeProvider() as fake:``; ``fake.base_url`` ends in ``/v1``."""

    received: list[Received] = field(default_factory=list)
    behaviour: Behaviour = field(default_factory=Behaviour)
    sent_chunks: int = 0  # streamed chunks written so far (all streams)
    broken_streams: int = 0  # streams whose reader went away before the end
    stalls_ended: int = 0  # stalls that ran their course (or were ended by unstall)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._unstalled = threading.Event()
        self._generation = 0  # bumped by reset: a stall from before it is not counted after
        provider = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            # Set once the server has "closed" this connection (see ``stream_opens``): the
            # next request on it gets no answer, as a pooled connection the server closed.
            closed = False

            def do_POST(self) -> None:
                if self.closed:
                    self.close_connection = True
                    return
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw or b"{}")
                except json.JSONDecodeError:
                    body = {"_raw": raw.decode(errors="replace")}
                with provider._lock:
                    provider.received.append(
                        Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                    )
                provider._answer(self, body)
                self.closed = provider.behaviour.drop_reused

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        """The provider's base URL, ``http://127.0.0.1:PORT/v1``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> FakeProvider:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self, behaviour: Behaviour | None = None) -> None:
        """Forget what was received and answer normally (or as told)."""
        with self._lock:
            self.received.clear()
            self.sent_chunks = 0
            self.broken_streams = 0
            self.stalls_ended = 0
            self._generation += 1
        self.unstall()
        self.behaviour = behaviour or Behaviour()

    def unstall(self) -> None:
        """End the stalls in progress now; later ones stall again."""
        self._unstalled.set()
        self._unstalled = threading.Event()

    # -- answering ---------------------------------------------------------------------------

    def _answer(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        b = self.behaviour
        bedrock = BEDROCK_INVOKE.search(h.path.rstrip("/"))
        anthropic = h.path.rstrip("/").endswith("/messages") or bedrock is not None
        responses = h.path.rstrip("/").endswith("/responses")
        failing = self._failing(h)
        if self._dropped(h, body, failing):
            return
        if b.mode == "status" and failing:
            self._status(h)
            return
        if b.mode == "echo_auth":
            leak = (
                f"bad request from {h.headers.get('authorization')} "
                f"x-api-key: {h.headers.get('x-api-key')}"
            )
            self._json(h, 500, {"error": {"message": leak, "type": "server_error"}})
            return
        if b.mode == "echo_key":
            bearer = (h.headers.get("authorization") or "").removeprefix("Bearer ")
            leak = f"unknown key {h.headers.get('x-api-key') or bearer}"
            self._json(h, 500, {"error": {"message": leak, "type": "server_error"}})
            return
        if b.mode == "rate_limit":
            self._json(
                h,
                429,
                {"error": {"message": "slow down", "type": "rate_limit_error"}},
                extra={"retry-after": str(b.retry_after)},
            )
            return
        model = urllib.parse.unquote(bedrock.group(1)) if bedrock else None
        refusal = self._refusal(body, anthropic, responses, model)
        if refusal is not None:
            self._json(h, 400, refusal)
            return
        if b.mode == "array_body":
            if body.get("stream"):
                self._sse_start(h)
                h.wfile.write(b'data: ["not", "a", "chunk"]\n\ndata: [DONE]\n\n')
                h.wfile.flush()
            else:
                self._json(h, 200, [{"choices": []}])
            return
        if b.mode == "stall" and failing:
            generation = self._generation
            self._unstalled.wait(b.stall_s)
            with self._lock:
                self.stalls_ended += generation == self._generation
        if body.get("stream") or (bedrock is not None and bedrock.group(2)):
            self._stream(h, body, anthropic=anthropic, responses=responses)
        elif responses:
            self._responses_json(h, body)
        else:
            (self._anthropic_json if anthropic else self._openai_json)(h, body)

    def _refusal(
        self, body: dict[str, Any], anthropic: bool, responses: bool, model: str | None = None
    ) -> dict[str, Any] | None:
        """The 400 body the provider would answer ``body`` with, or None: Anthropic's always
        (:func:`anthropic_refusal`), OpenAI chat's when ``strict`` (:func:`openai_refusal`; a
        Response's: :func:`_sampling_refusal`),
        either's for a request over its model's ``context_windows`` (:func:`window_refusal`)."""
        if anthropic:
            refusal = anthropic_refusal(body, model)
        else:
            fields = None
            if self.behaviour.strict:
                fields = _sampling_refusal(body) if responses else openai_refusal(body)
            refusal = None if fields is None else {"error": fields}
        window = self.behaviour.context_windows.get(str(body.get("model")))
        if refusal is None and window is not None and not responses:
            refusal = window_refusal(body, window, anthropic=anthropic)
        return refusal

    def _stream(
        self, h: BaseHTTPRequestHandler, body: dict[str, Any], *, anthropic: bool, responses: bool
    ) -> None:
        """Stream the answer in the request's protocol; a reader that goes away before the end
        is counted (``broken_streams``)."""
        stream = (
            self._responses_stream
            if responses
            else self._anthropic_stream
            if anthropic
            else self._openai_stream
        )
        try:
            stream(h, body)
        except (BrokenPipeError, ConnectionResetError):
            with self._lock:
                self.broken_streams += 1

    def _send(self, h: BaseHTTPRequestHandler, event: bytes) -> None:
        """Write one streamed event, after ``chunk_delay_s``, and count it."""
        if self.behaviour.chunk_delay_s:
            time.sleep(self.behaviour.chunk_delay_s)
        h.wfile.write(event)
        h.wfile.flush()
        with self._lock:
            self.sent_chunks += 1

    def _failing(self, h: BaseHTTPRequestHandler) -> bool:
        """Whether this request is one to fail (see ``Behaviour.failing_path``)."""
        path = self.behaviour.failing_path
        return path is None or h.path.rstrip("/").endswith(path)

    def _cut_after_open(self, h: BaseHTTPRequestHandler, done: bytes = b"") -> bool:
        """End this stream after its opening if told to: reset the connection
        (``reset_after_open``), or send ``done`` and close it (``done_after_open``); True when
        cut."""
        mode = self.behaviour.mode
        if mode not in ("reset_after_open", "done_after_open") or not self._failing(h):
            return False
        if mode == "reset_after_open":
            _reset(h)
        else:
            h.wfile.write(done)
            h.wfile.flush()
        return True

    def _dropped(self, h: BaseHTTPRequestHandler, body: dict[str, Any], failing: bool) -> bool:
        """Drop the request as a server that fails it without an answer (``reset_at_once``,
        ``stream_opens``); True when it did."""
        b = self.behaviour
        if b.mode == "reset_at_once":
            h.close_connection = True
            _reset(h)
            return True
        if b.mode == "status" and failing and b.stream_opens and body.get("stream"):
            # uvicorn's way: a whole (empty) chunked body on a keep-alive connection, then the
            # connection closed; the client has pooled it by then.
            h.send_response(200)
            h.send_header("content-type", "text/event-stream")
            h.send_header("transfer-encoding", "chunked")
            h.end_headers()
            h.wfile.write(b"0\r\n\r\n")
            h.wfile.flush()
            h.closed = True  # type: ignore[attr-defined]
            return True
        return False

    def _status(self, h: BaseHTTPRequestHandler) -> None:
        """Answer ``status`` with its error body; with ``error_pad``, a body of that many bytes
        and more, whose end is held back until the stall ends."""
        b = self.behaviour
        if not b.error_pad:
            generic = {"error": {"message": "upstream exploded", "type": "server_error"}}
            self._json(h, b.status, b.error_body or generic, extra=b.error_headers)
            return
        head = b'{"error": {"type": "server_error", "message": "upstream exploded '
        head += b"x" * b.error_pad
        tail = b'"}}'
        h.send_response(b.status)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(head) + len(tail)))
        for k, v in b.error_headers.items():
            h.send_header(k, v)
        h.end_headers()
        try:
            h.wfile.write(head)
            h.wfile.flush()
            self._unstalled.wait(b.stall_s)
            h.wfile.write(tail)
            h.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            h.close_connection = True

    @staticmethod
    def _json(
        h: BaseHTTPRequestHandler, status: int, payload: Any, extra: dict[str, str] | None = None
    ) -> None:
        data = json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("content-type", "application/json")
        h.send_header("content-length", str(len(data)))
        for k, v in (extra or {}).items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    def judge_verdict(self, body: dict[str, Any]) -> str | None:
        """The verdict for a judge prompt, or None when ``body`` is not one."""
        messages = body.get("messages") or []
        if not messages or "impartial judge" not in str(messages[0].get("content")):
            return None
        b = self.behaviour
        if b.judge_fn is not None:
            return f"[[{b.judge_fn(*_judge_parts(str(messages[-1].get('content'))))}]]"
        if b.judge == "garbage":
            return "I cannot decide."
        if b.judge == "tie":
            return "Both are fine. [[C]]"
        user = str(messages[-1].get("content"))
        closed_is_a = f"[The Start of Assistant A's Answer]\n{b.text}\n" in user
        closed, local = ("A", "B") if closed_is_a else ("B", "A")
        return f"Verdict: [[{closed if b.judge == 'closed' else local}]]"

    def _openai_json(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        b = self.behaviour
        verdict = self.judge_verdict(body)
        if verdict is not None:
            message: dict[str, Any] = {"role": "assistant", "content": verdict}
            finish = "stop"
        elif b.mode == "tool_call" and body.get("tools"):
            calls = [
                {
                    "id": f"call_fake_{n}",
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(args)},
                }
                for n, name, args in self._calls(body)
            ]
            message = {"role": "assistant", "content": None, "tool_calls": calls}
            finish = "tool_calls"
        else:
            text = b.reply_fn(body) if b.reply_fn is not None else b.text
            message = {"role": "assistant", "content": text}
            finish = "stop"
        odd = {"logprobs": b.bad_logprobs} if b.bad_logprobs and body.get("logprobs") else {}
        self._json(
            h,
            200,
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": self._answered(body, "fake"),
                "choices": [{"index": 0, "message": message, "finish_reason": finish, **odd}],
                "usage": self._usage(body),
            },
        )

    def _answered(self, body: dict[str, Any], default: str) -> str:
        """The model an answer names: ``answered_model``, else the one asked for."""
        return self.behaviour.answered_model or str(body.get("model", default))

    def _billed_prompt(self, body: dict[str, Any]) -> int:
        if not self.behaviour.bill_bytes:
            return 11
        return _strings_size([body.get("system"), body.get("messages")], lambda s: len(s.encode()))

    def _usage(self, body: dict[str, Any]) -> Any:
        if self.behaviour.mode == "bad_usage":
            return "lots"
        each = 7
        if self.behaviour.completion_tokens is not None:
            cap = next((body[f] for f in self.behaviour.output_fields if body.get(f)), None)
            each = min(self.behaviour.completion_tokens, int(cap) if cap else 10**9)
        completion = each * (int(body.get("n") or 1) if self.behaviour.bill_choices else 1)
        prompt = self._billed_prompt(body) + self.behaviour.cached_tokens
        usage: dict[str, Any] = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if self.behaviour.cached_tokens:
            usage["prompt_tokens_details"] = {"cached_tokens": self.behaviour.cached_tokens}
        return usage

    def _anthropic_usage(
        self, output_tokens: int, *, start: bool = False, delta: bool = False
    ) -> dict[str, Any]:
        # The usage of a whole answer; ``start``, of a stream's ``message_start`` (before any
        # search); ``delta``, of its ``message_delta``: cumulative, as Anthropic sends it, and
        # without the writes' breakdown by lifetime, which that event does not carry.
        b = self.behaviour
        searches = 0 if start else b.web_searches
        usage: dict[str, Any] = {
            "input_tokens": 13 + searches * SEARCH_RESULT_TOKENS,
            "output_tokens": output_tokens,
        }
        if b.cached_tokens or b.cache_write_tokens:
            usage["cache_read_input_tokens"] = b.cached_tokens
            usage["cache_creation_input_tokens"] = b.cache_write_tokens
        if b.cache_write_1h_tokens is not None and not delta:
            usage["cache_creation"] = {
                "ephemeral_5m_input_tokens": b.cache_write_tokens - b.cache_write_1h_tokens,
                "ephemeral_1h_input_tokens": b.cache_write_1h_tokens,
            }
        if searches:
            usage["server_tool_use"] = {"web_search_requests": searches, "web_fetch_requests": 0}
        return usage

    def _sse_start(self, h: BaseHTTPRequestHandler) -> None:
        h.send_response(200)
        h.send_header("content-type", "text/event-stream")
        h.send_header("connection", "close")
        h.end_headers()
        h.close_connection = True

    def _openai_stream(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        b = self.behaviour
        self._sse_start(h)
        pieces = self._text_pieces()

        def send(obj: Any) -> None:
            if b.usage_on_chunks and obj.get("choices"):
                obj = {**obj, "usage": self._usage(body)}
            self._send(h, b"data: " + json.dumps(obj).encode() + b"\n\n")

        base = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": self._answered(body, "fake"),
        }
        self._openai_chunks(h, body, base, pieces, send)

    def _openai_chunks(
        self,
        h: BaseHTTPRequestHandler,
        body: dict[str, Any],
        base: dict[str, Any],
        pieces: list[str],
        send: Any,
    ) -> None:
        b = self.behaviour
        opening = {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        if b.usage_in_opening:
            opening["usage"] = {"prompt_tokens": 11, "completion_tokens": 0, "total_tokens": 11}
        send(opening)
        if self._cut_after_open(h, b"data: [DONE]\n\n"):
            return
        if b.mode == "overloaded_after_open" and self._failing(h):
            send(b.error_body or OPENAI_CHAT_OVERLOADED)
            return
        for i, piece in enumerate(pieces):
            if b.mode == "reset_mid_stream" and i == 2:
                _reset(h)
                return
            if b.mode == "error_mid_stream" and i == 2:
                send(b.error_body or OPENAI_CHAT_RATE_LIMITED)
                return
            if b.mode == "error_line_mid_stream" and i == 2:  # llama.cpp's server until 2025
                error = json.dumps(b.error_body or LLAMA_CPP_CONTEXT_EXCEEDED).encode()
                self._send(h, b"error: " + error + b"\n\ndata: [DONE]\n\n")
                return
            if b.mode == "interrupted" and i == 2:
                h.wfile.write(b"data: [DONE]\n\n")
                h.wfile.flush()
                return
            self._word(h, body, base, (i, piece), send)
        calls = self._calls(body)
        opened: set[int] = set()
        for place, part in self._pieces(body):
            call: dict[str, Any] = {"index": place, "function": {"arguments": part}}
            if place not in opened:  # a call's first chunk names it
                opened.add(place)
                n, name, _ = calls[place]
                call = {**call, "id": f"call_fake_{n}", "type": "function"}
                call["function"] = {"name": name, "arguments": part}
            send({**base, "choices": [{"index": 0, "delta": {"tool_calls": [call]}}]})
        finish = "tool_calls" if calls else "stop"
        send({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
        if (body.get("stream_options") or {}).get("include_usage") and not (
            b.mode == "no_stream_usage" or b.usage_on_chunks
        ):
            send({**base, "choices": [], "usage": self._usage(body)})
        h.wfile.write(b"data: [DONE]\n\n")
        h.wfile.flush()

    def _word(
        self,
        h: BaseHTTPRequestHandler,
        body: dict[str, Any],
        base: dict[str, Any],
        word: tuple[int, str],
        send: Any,
    ) -> None:
        """Stream ``word`` (its place, its text; OpenAI chat), or ``bad_chunk`` in place of the
        second."""
        i, piece = word
        if self.behaviour.bad_chunk is not None and i == 1:
            self._send(h, b"data: " + self.behaviour.bad_chunk + b"\n\n")
            return
        choice = {"index": 0, "delta": {"content": piece}, **self._logprobs(body, piece, i)}
        send({**base, "choices": [choice]})

    def _logprobs(self, body: dict[str, Any], token: str, place: int) -> dict[str, Any]:
        """A streamed word's ``logprobs`` field, where ``logprob`` (or ``bad_logprobs``, from
        the word at ``bad_logprobs_from``) is set and ``body`` asks."""
        b = self.behaviour
        if b.bad_logprobs is not None and body.get("logprobs") and place >= b.bad_logprobs_from:
            return {"logprobs": b.bad_logprobs}
        if self.behaviour.logprob is None or not body.get("logprobs"):
            return {}
        entry = {"token": token, "logprob": self.behaviour.logprob, "bytes": None}
        return {"logprobs": {"content": [{**entry, "top_logprobs": []}]}}

    def _text_pieces(self) -> list[str]:
        """The streamed text's pieces: word by word, or ``piece_chars`` characters each."""
        n = self.behaviour.piece_chars
        if n:
            return [self.behaviour.text[i : i + n] for i in range(0, len(self.behaviour.text), n)]
        return [word + " " for word in self.behaviour.text.split(" ")]

    def _calls(self, body: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
        """The calls to make, ``(id suffix, name, arguments)`` each, in ``tool_call`` mode."""
        tool = self._tool_called(body)
        if tool is None:
            return []
        planned = self.behaviour.calls or [(tool, {"city": "Paris"})]
        return [(str(i + 1), name, args) for i, (name, args) in enumerate(planned)]

    def _pieces(self, body: dict[str, Any]) -> list[tuple[int, str]]:
        """The streamed argument pieces, ``(call's place, piece)``, in the order sent."""
        each = []
        for place, (_, _, args) in enumerate(self._calls(body)):
            text = json.dumps(args)
            cut = len(text) // 2
            each.append([(place, text[:cut]), (place, text[cut:])])
        if self.behaviour.interleave:
            return [piece for pair in zip(*each, strict=True) for piece in pair]
        return [piece for pieces in each for piece in pieces]

    def _tool_called(self, body: dict[str, Any]) -> str | None:
        """The tool to call (the first one offered), in ``tool_call`` mode."""
        tools = body.get("tools") or []
        if self.behaviour.mode != "tool_call" or not tools:
            return None
        first = tools[0]
        return str(first.get("name") or (first.get("function") or {}).get("name"))

    def _anthropic_json(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        calls = self._calls(body)
        content: list[dict[str, Any]] = [{"type": "text", "text": self.behaviour.text}]
        content += [
            {"type": "tool_use", "id": f"toolu_fake_{n}", "name": name, "input": args}
            for n, name, args in calls
        ]
        self._json(
            h,
            200,
            {
                "id": "msg_fake",
                "type": "message",
                "role": "assistant",
                "model": self._answered(body, "claude"),
                "content": content,
                "stop_reason": "tool_use" if calls else "end_turn",
                "stop_sequence": None,
                "usage": self._anthropic_usage(9),
            },
        )

    def _anthropic_stream(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        frames = h.path.rstrip("/").endswith("/invoke-with-response-stream")  # Bedrock's
        if frames:
            h.send_response(200)
            h.send_header("content-type", "application/vnd.amazon.eventstream")
            h.send_header("connection", "close")
            h.end_headers()
            h.close_connection = True
        else:
            self._sse_start(h)

        def event(name: str, obj: Any) -> None:
            if frames:
                self._send(h, bedrock_frame(obj))
                return
            self._send(h, f"event: {name}\ndata: ".encode() + json.dumps(obj).encode() + b"\n\n")

        event(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": "msg_fake",
                    "type": "message",
                    "role": "assistant",
                    "content": [],
                    "model": self._answered(body, "claude"),
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": self._anthropic_usage(1, start=True),
                },
            },
        )
        if self._cut_after_open(h):
            return
        if self.behaviour.mode == "overloaded_after_open" and self._failing(h):
            event("error", self.behaviour.error_body or ANTHROPIC_OVERLOADED)
            return
        event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
        for i, piece in enumerate(self._text_pieces()):
            if self.behaviour.mode == "reset_mid_stream" and i == 2:
                _reset(h)
                return
            if self.behaviour.mode == "error_mid_stream" and i == 2:
                event("error", self.behaviour.error_body or ANTHROPIC_RATE_LIMITED)
                return
            event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": piece},
                },
            )
        event("content_block_stop", {"type": "content_block_stop", "index": 0})
        calls = self._calls(body)
        for place, (n, name, args) in enumerate(calls, start=1):
            # Anthropic streams one block at a time: a call's pieces are never interleaved.
            block = {"type": "tool_use", "id": f"toolu_fake_{n}", "name": name, "input": {}}
            event(
                "content_block_start",
                {"type": "content_block_start", "index": place, "content_block": block},
            )
            text = json.dumps(args)
            for part in (text[: len(text) // 2], text[len(text) // 2 :]):
                delta = {"type": "input_json_delta", "partial_json": part}
                event(
                    "content_block_delta",
                    {"type": "content_block_delta", "index": place, "delta": delta},
                )
            event("content_block_stop", {"type": "content_block_stop", "index": place})
        event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {
                    "stop_reason": "tool_use" if calls else "end_turn",
                    "stop_sequence": None,
                },
                "usage": self._anthropic_usage(9, delta=True),
            },
        )
        event("message_stop", {"type": "message_stop"})

    # -- OpenAI Responses ----------------------------------------------------------------------

    def _response(self, body: dict[str, Any], status: str) -> dict[str, Any]:
        """A Response object; complete (text, a function call in tool_call mode) when done."""
        output: list[dict[str, Any]] = []
        if status == "completed":
            text = {"type": "output_text", "text": self.behaviour.text, "annotations": []}
            output.append(
                {
                    "type": "message",
                    "id": "msg_fake",
                    "status": "completed",
                    "role": "assistant",
                    "content": [text],
                }
            )
            output += [
                self._function_call(n, name, args, "completed")
                for n, name, args in self._calls(body)
            ]
        return {
            "id": "resp_fake",
            "object": "response",
            "created_at": int(time.time()),
            "model": self._answered(body, "fake"),
            "status": status,
            "output": output,
            "parallel_tool_calls": True,
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools") or [],
            "store": body.get("store"),
            "usage": {
                "input_tokens": 11 + self.behaviour.cached_tokens,
                "output_tokens": 7,
                "total_tokens": 18 + self.behaviour.cached_tokens,
                "input_tokens_details": {"cached_tokens": self.behaviour.cached_tokens},
                "output_tokens_details": {"reasoning_tokens": 0},
            }
            if status == "completed"
            else None,
        }

    @staticmethod
    def _function_call(n: str, name: str, args: dict[str, Any], status: str) -> dict[str, Any]:
        return {
            "type": "function_call",
            "id": f"fc_fake_{n}",
            "call_id": f"call_fake_{n}",
            "name": name,
            "arguments": json.dumps(args) if status == "completed" else "",
            "status": status,
        }

    def _responses_json(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        if self.behaviour.mode == "unfinished_response" and self._failing(h):
            self._json(h, 200, self._unfinished(body))
            return
        self._json(h, 200, self._response(body, "completed"))

    def _unfinished(self, body: dict[str, Any]) -> dict[str, Any]:
        """The Response of ``unfinished_response`` mode: its status and error as told."""
        b = self.behaviour
        response = self._response(body, b.response_status)
        failed = b.response_status == "failed"
        response["error"] = b.error_body or (RESPONSE_SERVER_ERROR if failed else None)
        return response

    def _responses_stream(self, h: BaseHTTPRequestHandler, body: dict[str, Any]) -> None:
        self._sse_start(h)
        seq = 0

        def event(obj: dict[str, Any]) -> None:
            nonlocal seq
            obj["sequence_number"] = seq
            seq += 1
            self._send(
                h, f"event: {obj['type']}\ndata: ".encode() + json.dumps(obj).encode() + b"\n\n"
            )

        event({"type": "response.created", "response": self._response(body, "in_progress")})
        if self._cut_after_open(h):
            return
        if self.behaviour.mode == "overloaded_after_open" and self._failing(h):
            event(json.loads(json.dumps(self.behaviour.error_body or OPENAI_OVERLOADED)))
            return
        message = {
            "type": "message",
            "id": "msg_fake",
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        event({"type": "response.output_item.added", "output_index": 0, "item": message})
        where = {"item_id": "msg_fake", "output_index": 0, "content_index": 0}
        part = {"type": "output_text", "text": "", "annotations": []}
        event({"type": "response.content_part.added", **where, "part": part})
        unfinished = self.behaviour.mode == "unfinished_response" and self._failing(h)
        for i, piece in enumerate(self._text_pieces()):
            if self.behaviour.mode == "reset_mid_stream" and i == 2:
                _reset(h)
                return
            if self.behaviour.mode == "error_mid_stream" and i == 2:
                event(json.loads(json.dumps(self.behaviour.error_body or OPENAI_RATE_LIMITED)))
                return
            if unfinished and i == self.behaviour.words_sent:
                incomplete = self.behaviour.response_status == "incomplete"
                kind = "response.incomplete" if incomplete else "response.completed"
                event({"type": kind, "response": self._unfinished(body)})
                return
            event({"type": "response.output_text.delta", **where, "delta": piece})
        event({"type": "response.output_text.done", **where, "text": self.behaviour.text})
        part = {**part, "text": self.behaviour.text}
        event({"type": "response.content_part.done", **where, "part": part})
        done = {**message, "status": "completed", "content": [part]}
        event({"type": "response.output_item.done", "output_index": 0, "item": done})
        for place, (n, name, args) in enumerate(self._calls(body), start=1):
            call = self._function_call(n, name, args, "in_progress")
            event({"type": "response.output_item.added", "output_index": place, "item": call})
            text = json.dumps(args)
            for part in (text[: len(text) // 2], text[len(text) // 2 :]):
                event(
                    {
                        "type": "response.function_call_arguments.delta",
                        "item_id": f"fc_fake_{n}",
                        "output_index": place,
                        "delta": part,
                    }
                )
            done = self._function_call(n, name, args, "completed")
            event({"type": "response.output_item.done", "output_index": place, "item": done})
        event({"type": "response.completed", "response": self._response(body, "completed")})


def _reset(h: BaseHTTPRequestHandler) -> None:
    """Cut the connection with a TCP reset, as a provider that fails mid-stream does."""
    h.connection.setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
    )
    h.connection.close()


def _judge_parts(user: str) -> tuple[str, str, str]:
    """(question, answer A, answer B) out of Tiergate's pairwise judge prompt."""
    question = user.split("[User Question]\n", 1)[1].split("\n\n[The Start of Assistant A", 1)[0]
    a = user.split("[The Start of Assistant A's Answer]\n", 1)[1].split("\n[The End of", 1)[0]
    b = user.split("[The Start of Assistant B's Answer]\n", 1)[1].split("\n[The End of", 1)[0]
    return question, a, b
