"""The direct OpenAI-compatible client: answers and streams over loopback, upstream statuses
and transport failures become Tiergate errors, and a key an upstream echoes is scrubbed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from router.backends import Usage
from router.backends.openai_http import (
    OpenAIHTTP,
    _lines,
    error_for_status,
    map_transport_error,
    stream_failure,
)
from router.errors import (
    BackendError,
    UpstreamAuthError,
    UpstreamBadRequestError,
    UpstreamBadResponseError,
    UpstreamNotFoundError,
    UpstreamOverloadedError,
    UpstreamRateLimitedError,
    UpstreamTimeoutError,
)
from tests.conftest import run
from tests.fake_provider import (
    LLAMA_CPP_CONTEXT_EXCEEDED,
    OPENAI_CHAT_OVERLOADED,
    OPENAI_CHAT_RATE_LIMITED,
    Behaviour,
    FakeProvider,
)

BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
KEY = "sk-test-openai-key"


@pytest.fixture
def provider(fake: FakeProvider) -> Iterator[FakeProvider]:
    fake.reset()
    yield fake


async def _call(base_url: str, *, stream: bool = False) -> tuple[Any, Usage]:
    http = OpenAIHTTP(timeout_s=10)
    usage = Usage()
    try:
        if stream:
            chunks = http.stream(base_url, BODY, usage, api_key=KEY, label="gpt-4o")
            return [c async for c in chunks], usage
        return await http.complete(base_url, BODY, api_key=KEY, label="gpt-4o"), usage
    finally:
        await http.aclose()


def test_an_answer_carries_its_body_and_usage(provider: FakeProvider) -> None:
    completion, _ = run(_call(provider.base_url))
    assert completion.body["choices"][0]["message"]["content"]
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    sent = provider.received[-1]
    assert sent.path.endswith("/chat/completions") and sent.body["stream"] is False
    assert sent.headers["authorization"] == f"Bearer {KEY}"


def test_a_stream_yields_chunks_and_fills_in_its_usage(provider: FakeProvider) -> None:
    chunks, usage = run(_call(provider.base_url, stream=True))
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip() == Behaviour().text
    assert usage.completion_tokens > 0


@pytest.mark.parametrize(
    ("chunk", "error"),
    [
        ({"code": 429, "message": "Too many requests"}, UpstreamRateLimitedError),
        ({"code": 503, "message": "Service unavailable"}, UpstreamOverloadedError),
        ({"code": 500, "message": "Internal error"}, BackendError),
        ({"code": True, "type": "BadRequestError", "message": "Bad"}, BackendError),
        ({"code": "rate_limit_exceeded", "message": f"key {KEY} over"}, UpstreamRateLimitedError),
        ({"code": 400, "type": "BadRequestError", "message": "Bad"}, UpstreamBadRequestError),
        ({"type": "invalid_request_error", "message": "Bad"}, UpstreamBadRequestError),
        ({"code": 401, "message": "Who are you"}, UpstreamAuthError),
        ({"code": 504, "message": "Too slow"}, UpstreamTimeoutError),
        ("a bare string", BackendError),
    ],
)
def test_an_error_chunk_mid_stream_fails_as_its_kind_says(
    provider: FakeProvider, chunk: Any, error: type[BackendError]
) -> None:
    """An OpenAI-compatible server's ``{"error": ...}`` chunk after the first words fails the
    stream by its kind: by its code or type, or by the HTTP status vLLM puts in ``code``
    (a boolean is none); the provider's message is kept, with a key it repeats scrubbed. A
    request the server calls bad (vLLM's ``code: 400``, the type ``invalid_request_error``)
    failed as a 502 ``BackendError``, as a refused key and a timeout did."""
    provider.reset(Behaviour(mode="error_mid_stream", error_body={"error": chunk}))
    with pytest.raises(error) as raised:
        run(_call(provider.base_url, stream=True))
    assert type(raised.value) is error
    said = chunk.get("message") if isinstance(chunk, dict) else chunk
    assert raised.value.message.startswith("gpt-4o sent an error event: ")
    assert KEY not in raised.value.message
    assert said.replace(KEY, "[redacted]") in raised.value.message


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (None, UpstreamBadRequestError),  # LLAMA_CPP_CONTEXT_EXCEEDED: code 400
        (
            {"code": 503, "message": "Loading model", "type": "unavailable_error"},
            UpstreamOverloadedError,
        ),
        ({"code": 429, "message": f"key {KEY} over", "type": "x"}, UpstreamRateLimitedError),
        (
            {"error": {"code": "rate_limit_exceeded", "message": "Slow down"}},
            UpstreamRateLimitedError,
        ),
    ],
)
def test_an_error_line_in_the_stream_fails_as_its_kind_says(
    provider: FakeProvider, line: dict[str, Any] | None, error: type[BackendError]
) -> None:
    """llama.cpp's server (an external local model, ``local_backend=openai_http``) ended a
    stream that failed once open with an SSE ``error: {...}`` line, not ``data:``, then
    ``data: [DONE]``: the line was passed over and the call failed as a cut stream (502
    upstream_unreachable, the server's message lost). It fails as the error says, as an
    ``{"error"}`` chunk does."""
    provider.reset(Behaviour(mode="error_line_mid_stream", error_body=line))
    with pytest.raises(error) as raised:
        run(_call(provider.base_url, stream=True))
    assert type(raised.value) is error and raised.value.code != "upstream_unreachable"
    said = (line or {}).get("error", line or LLAMA_CPP_CONTEXT_EXCEEDED)["message"]
    assert raised.value.message == f"gpt-4o sent an error event: {said.replace(KEY, '[redacted]')}"


@pytest.mark.parametrize(
    ("behaviour", "error"),
    [
        (Behaviour(mode="rate_limit"), UpstreamRateLimitedError),
        (Behaviour(mode="status", status=400), UpstreamBadRequestError),
        (Behaviour(mode="status", status=500), BackendError),
        (Behaviour(mode="status", status=503), UpstreamOverloadedError),
        (Behaviour(mode="array_body"), UpstreamBadResponseError),
    ],
)
def test_an_upstream_failure_is_a_tiergate_error(
    provider: FakeProvider, behaviour: Behaviour, error: type[BackendError]
) -> None:
    provider.reset(behaviour)
    with pytest.raises(error) as raised:
        run(_call(provider.base_url))
    assert type(raised.value) is error


#: Failures as a provider answers them with an HTTP status (the error object its body holds)
#: and as it reports them in a stream it has opened (the same object as a chat chunk's
#: ``error``): the status, the object, and the code the client is answered with either way.
AS_STATUS_AND_EVENT: dict[str, tuple[int, dict[str, Any], str]] = {
    "llama-server, a prompt over its context": (
        400,
        {
            "code": 400,
            "message": "request (4200 tokens) exceeds the available context size (4096 tokens), "
            "try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 4200,
            "n_ctx": 4096,
        },
        "context_length_exceeded",
    ),
    "llama-server before its type, a prompt over its context": (
        400,
        LLAMA_CPP_CONTEXT_EXCEEDED,
        "context_length_exceeded",
    ),
    "vLLM, a bad request": (
        400,
        {
            "object": "error",
            "message": "temperature must be non-negative, got -1.0.",
            "type": "BadRequestError",
            "param": "temperature",
            "code": 400,
        },
        "upstream_bad_request",
    ),
    "OpenAI, a prompt over the window": (
        400,
        {
            "message": "This model's maximum context length is 128000 tokens.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        },
        "context_length_exceeded",
    ),
    "Anthropic's words for a prompt over the window": (
        400,
        {
            "type": "invalid_request_error",
            "message": "prompt is too long: 215000 tokens > 200000 maximum",
        },
        "context_length_exceeded",
    ),
    "Gemini, a prompt over the window": (
        400,
        {
            "code": 400,
            "message": "The input token count (1200000) exceeds the maximum number of tokens "
            "allowed (1048576).",
            "status": "INVALID_ARGUMENT",
        },
        "context_length_exceeded",
    ),
    "OpenAI, a bad request": (
        400,
        {
            "message": "Invalid 'temperature'",
            "type": "invalid_request_error",
            "param": "temperature",
        },
        "upstream_bad_request",
    ),
    "OpenAI, a refused key": (
        401,
        {
            "message": "Incorrect API key",
            "type": "invalid_request_error",
            "code": "invalid_api_key",
        },
        "upstream_error",
    ),
    "OpenAI, a model that does not exist": (
        404,
        {
            "message": "The model `gpt-5x` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        },
        "upstream_error",
    ),
    "Anthropic, a model that does not exist": (
        404,
        {"type": "not_found_error", "message": "model: claude-x"},
        "upstream_error",
    ),
    "a refused key by its status": (403, {"code": 403, "message": "Forbidden"}, "upstream_error"),
    "a gateway timeout": (504, {"code": 504, "message": "Gateway timeout"}, "upstream_timeout"),
    "a request timeout": (408, {"code": 408, "message": "Request timeout"}, "upstream_timeout"),
    "a rate limit": (429, OPENAI_CHAT_RATE_LIMITED["error"], "upstream_rate_limited"),
    "an overload": (503, OPENAI_CHAT_OVERLOADED["error"], "upstream_overloaded"),
    "a server error": (500, {"code": 500, "message": "Internal error"}, "upstream_error"),
}


def _as_seen(error: BackendError) -> tuple[Any, ...]:
    """What a client, the fallback chain and the cooldown see of a failure."""
    return (
        type(error),
        error.status_code,
        error.code,
        error.param,
        error.should_retry,
        error.retryable,
        error.cools,
    )


@pytest.mark.parametrize("case", sorted(AS_STATUS_AND_EVENT))
def test_an_error_event_fails_as_the_same_failure_answered_with_its_status(
    provider: FakeProvider, case: str
) -> None:
    """A provider's error event in a stream it has opened fails the call exactly as the same
    error answered with its HTTP status does: class, status, code, ``param``, whether the
    chain goes on and whether the model cools. A request the provider calls bad (vLLM's and
    llama-server's ``code: 400``, OpenAI's ``invalid_request_error``, its
    ``context_length_exceeded``), a refused key and a timeout were a 502 ``BackendError``
    that the chain went past and that cooled the model; llama-server's
    ``exceed_context_size_error`` is ``context_length_exceeded`` either way, as OpenAI's
    code is."""
    status, error, code = AS_STATUS_AND_EVENT[case]
    provider.reset(Behaviour(mode="status", status=status, error_body={"error": error}))
    with pytest.raises(BackendError) as answered:
        run(_call(provider.base_url))
    provider.reset(Behaviour(mode="error_mid_stream", error_body={"error": error}))
    with pytest.raises(BackendError) as sent:
        run(_call(provider.base_url, stream=True))
    assert _as_seen(sent.value) == _as_seen(answered.value)
    assert answered.value.code == code
    assert answered.value.message.startswith(f"gpt-4o answered {status}: ")
    assert sent.value.message == f"gpt-4o sent an error event: {error['message']}"


#: Error bodies that are the error object itself, without OpenAI's ``{"error": ...}``, for a
#: prompt over the window, which they say only in words.
OVER_WINDOW_BODIES = {
    "Mistral": {
        "object": "error",
        "message": "Prompt contains 40960 tokens and 0 draft tokens, too large for model with "
        "32768 maximum context length",
        "type": "invalid_request_message_error",
        "param": None,
        "code": "3051",
    },
    "Bedrock": {"message": "Input is too long for requested model."},
}


@pytest.mark.parametrize("provider_name", sorted(OVER_WINDOW_BODIES))
def test_a_prompt_over_the_window_is_one_by_the_providers_words(
    provider: FakeProvider, provider_name: str
) -> None:
    """Mistral and Bedrock answer a prompt over the window with a 400 whose body is the error
    object itself and whose code names no window: it is ``context_length_exceeded`` by its
    message, which the error repeats. It was ``upstream_bad_request``, with the HTTP reason
    ("Bad Request") for the provider's message."""
    body = OVER_WINDOW_BODIES[provider_name]
    provider.reset(Behaviour(mode="status", status=400, error_body=body))
    with pytest.raises(BackendError) as answered:
        run(_call(provider.base_url))
    assert (answered.value.status_code, answered.value.code) == (400, "context_length_exceeded")
    assert answered.value.message == f"gpt-4o answered 400: {body['message']}"


def test_a_model_that_does_not_exist_is_configuration_the_chain_goes_past() -> None:
    """A 404 (or the same named in an event) is the model's configuration: 502, the chain
    goes on and the model cools, and a client's retry cannot fix it. The event was a 400 that
    ended the chain, the 404 a plain 502 that SDKs retried."""
    error = error_for_status(404, b'{"error": {"code": "model_not_found"}}', "gpt-4o")
    assert (error.status_code, error.retryable, error.cools) == (502, True, True)
    assert error.headers["x-should-retry"] == "false"


#: 404s as providers answer them, by whose they are: the model's configuration (a model that
#: does not exist; a path the provider does not serve, a wrong api_base), or the request's own
#: (OpenAI's Responses, for an input item it does not hold: its param names the field).
NOT_FOUND: dict[str, tuple[bytes, bool]] = {
    "OpenAI, a model that does not exist": (
        b'{"error": {"message": "The model `gpt-5x` does not exist or you do not have access '
        b'to it.", "type": "invalid_request_error", "param": null, "code": "model_not_found"}}',
        False,
    ),
    "Anthropic, a model that does not exist": (
        b'{"type": "error", "error": {"type": "not_found_error", "message": "model: claude-x"}}',
        False,
    ),
    "vLLM, a model it does not serve": (
        b'{"object": "error", "message": "The model `gpt-4o` does not exist.", "type": '
        b'"NotFoundError", "param": null, "code": 404}',
        False,
    ),
    "OpenAI, a wrong path": (
        b'{"error": {"message": "Invalid URL (POST /v1/chat/completion)", "type": '
        b'"invalid_request_error", "param": null, "code": null}}',
        False,
    ),
    "llama.cpp's server, a wrong path": (
        b'{"error": {"code": 404, "message": "File Not Found", "type": "not_found_error"}}',
        False,
    ),
    "an empty body": (b"", False),
    "a LiteLLM proxy, a model it does not have (param the string None)": (
        b'{"error": {"message": "litellm.NotFoundError: OpenAIException - The model `gpt-5x` '
        b'does not exist or you do not have access to it.", "type": "None", "param": "None", '
        b'"code": "404"}}',
        False,
    ),
    "OpenAI's Responses, an input item it does not hold": (
        b'{"error": {"message": "Item with id \'rs_123\' not found. Items are not persisted '
        b"when `store` is set to false. Try again with `store` set to true, or remove this "
        b'item from your input.", "type": "invalid_request_error", "param": "input", '
        b'"code": null}}',
        True,
    ),
}


@pytest.mark.parametrize("case", sorted(NOT_FOUND))
def test_a_404_is_the_models_configuration_unless_it_names_the_requests_field(
    case: str,
) -> None:
    """A 404 is the model's configuration (502, ``x-should-retry: false``, the chain goes on)
    where the model does not exist or the path is wrong. One that names the field of the
    request holding what was not found is the request's own 400, final: a client's Responses
    history that holds item ids, sent with ``store: false``, is answered 404 by OpenAI; it
    was a 502 that the chain went past."""
    raw, requests = NOT_FOUND[case]
    error = error_for_status(404, raw, "gpt-4o")
    if requests:
        assert type(error) is UpstreamBadRequestError
        assert (error.status_code, error.code, error.param) == (
            400,
            "upstream_bad_request",
            "input",
        )
        assert not error.retryable  # final: no fallback
        assert "x-should-retry" not in error.headers
    else:
        assert type(error) is UpstreamNotFoundError
        assert (error.status_code, error.retryable) == (502, True)
        assert error.headers["x-should-retry"] == "false"
    assert error.upstream_status == 404


#: A /v1/messages request that names ids of Anthropic's: a code execution container, and a
#: file of its Files API for the container.
CONTAINER_ID = "container_011CPR5CNjB747bTd36fQLFk"
FILE_ID = "file_011CNha8iCJcU1wXNR6q4V8w"
SENT_IDS: dict[str, Any] = {
    "model": "claude-sonnet-4-5",
    "container": CONTAINER_ID,
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Chart this file."},
                {"type": "container_upload", "file_id": FILE_ID},
            ],
        }
    ],
}


def _anthropic_404(message: str, kind: str = "not_found_error") -> bytes:
    return json.dumps({"type": "error", "error": {"type": kind, "message": message}}).encode()


#: Anthropic's 404s to SENT_IDS, and the field Tiergate's 400 names (None: configuration).
ANTHROPIC_404S: dict[str, tuple[bytes, str | None]] = {
    # Anthropic's Files API docs ("Error handling"), as its type and as not_found_error.
    "a file it does not hold": (
        _anthropic_404(f"File not found: {FILE_ID}", "invalid_request_error"),
        "messages",
    ),
    "a file it does not hold (not_found_error)": (
        _anthropic_404(f"File not found: {FILE_ID}"),
        "messages",
    ),
    # Its wording is not known here: one that names the id.
    "a container it does not hold": (
        _anthropic_404(f"container: {CONTAINER_ID} not found"),
        "container",
    ),
    "a model that does not exist": (_anthropic_404("model: claude-sonnet-4-5"), None),
    "a wrong path": (_anthropic_404("Not Found"), None),
}


@pytest.mark.parametrize("case", sorted(ANTHROPIC_404S))
def test_a_404_naming_an_id_the_request_sent_is_its_400(case: str) -> None:
    """Anthropic's 404s name no field: one for a container or file id the client sent was a
    missing model's (502, the chain went on, the model cooled for every client). One that
    names an id of the request is the request's 400, naming the field that holds it; the
    model's and a wrong path's name none, and stay configuration."""
    raw, field = ANTHROPIC_404S[case]
    error = error_for_status(404, raw, "claude", sent=SENT_IDS)
    if field is None:
        assert type(error) is UpstreamNotFoundError
        assert (error.status_code, error.retryable, error.cools) == (502, True, True)
    else:
        assert type(error) is UpstreamBadRequestError
        assert (error.status_code, error.code, error.param) == (400, "upstream_bad_request", field)
        assert not error.retryable  # final: no fallback, and no cooldown (Cooldowns.failed)
    # Without the request, no id is read: configuration.
    assert type(error_for_status(404, raw, "claude")) is UpstreamNotFoundError


#: A chat request that names a file of the provider's by its id, and the provider's 404 for it
#: as a stream's error event, with the status in ``code`` (vLLM, llama.cpp's server).
FILE_ASKED: dict[str, Any] = {
    "model": "gpt-4o",
    "messages": [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Sum this file up."},
                {"type": "file", "file": {"file_id": FILE_ID}},
            ],
        }
    ],
}
FILE_NOT_FOUND = {"code": 404, "message": f"File not found: {FILE_ID}", "type": "not_found_error"}


@pytest.mark.parametrize("mode", ["error_mid_stream", "error_line_mid_stream"])
def test_a_404_event_naming_an_id_the_request_sent_is_its_400(
    provider: FakeProvider, mode: str
) -> None:
    """A stream's 404 event (an ``{"error"}`` chunk, or llama.cpp's server's ``error:`` line)
    that names an id the request sent is the request's 400, as the same 404 answered with a
    status is: it was read without the request, as the model's configuration (502, the chain
    went on and the model cooled)."""
    line = mode == "error_line_mid_stream"
    provider.reset(
        Behaviour(mode, error_body=FILE_NOT_FOUND if line else {"error": FILE_NOT_FOUND})
    )

    async def stream() -> None:
        http = OpenAIHTTP(timeout_s=10)
        try:
            async for _ in http.stream(
                provider.base_url, FILE_ASKED, Usage(), api_key=KEY, label="gpt-4o"
            ):
                pass
        finally:
            await http.aclose()

    with pytest.raises(BackendError) as raised:
        run(stream())
    assert type(raised.value) is UpstreamBadRequestError
    assert (raised.value.status_code, raised.value.param) == (400, "messages")


#: Data a request holds under keys ending in ``_id`` that names no id the provider holds: a tool
#: call's arguments (an orchestrator's, naming the model a subtask goes to) and ``metadata``,
#: which no provider is sent (the litellm path's request still holds it).
DATA_NAMING_THE_MODEL: dict[str, dict[str, Any]] = {
    "a tool call's input": {
        "role": "assistant",
        "content": [
            {
                "type": "tool_use",
                "id": "toolu_01A09q90qw90lq917835lq9",
                "name": "delegate",
                "input": {"model_id": "claude-3-5-sonnet-20241022", "task": "sum it up"},
            }
        ],
    },
    "metadata": {"user_id": "claude-3-5-sonnet-20241022"},
}


@pytest.mark.parametrize("where", sorted(DATA_NAMING_THE_MODEL))
def test_a_404_for_the_model_stays_the_models_whatever_the_requests_data_names(
    where: str,
) -> None:
    """Anthropic's 404 for a model it no longer serves ("model: claude-3-5-sonnet-20241022")
    was read as the client's own 400 (final: no fallback, the model never cooled) when the
    request held that name under a key ending in ``_id`` anywhere: in a tool call's input, or
    in ``metadata``. Neither holds an id the provider was asked to find."""
    sent: dict[str, Any] = {
        "model": "claude-3-5-sonnet-20241022",
        "messages": [{"role": "user", "content": "Plan it."}],
    }
    held = DATA_NAMING_THE_MODEL[where]
    if where == "metadata":
        sent["metadata"] = held
    else:
        sent["messages"] += [held, {"role": "user", "content": "Go on."}]
    raw = _anthropic_404("model: claude-3-5-sonnet-20241022")
    error = error_for_status(404, raw, "claude", sent=sent)
    assert type(error) is UpstreamNotFoundError, error.param
    assert (error.status_code, error.retryable, error.cools) == (502, True, True)


#: Some of a Response's error codes (``response.failed``, OpenAI's ResponseError) for a request
#: it cannot take: a 400; the provider's failures stay a 502.
RESPONSE_CLIENT_CODES = [
    "invalid_prompt",
    "invalid_image",
    "invalid_image_format",
    "image_too_large",
    "image_content_policy_violation",
]


@pytest.mark.parametrize("code", [*RESPONSE_CLIENT_CODES, "server_error", "vector_store_timeout"])
def test_a_failed_responses_code_is_a_bad_request_or_the_providers_failure(code: str) -> None:
    """A ``response.failed`` that names a bad request (an image it cannot read, a prompt it
    refuses) fails as a 400 does: no fallback, no cooldown. Each was a 502 that the chain went
    past and that cooled the model. ``server_error`` and ``vector_store_timeout`` stay 502."""
    error = stream_failure("gpt-4o", {"code": code, "message": "no"})
    client = code in RESPONSE_CLIENT_CODES
    assert type(error) is (UpstreamBadRequestError if client else BackendError)
    assert (error.status_code, error.retryable) == ((400, False) if client else (502, True))


def test_a_key_the_upstream_repeats_is_scrubbed(provider: FakeProvider) -> None:
    provider.reset(Behaviour(mode="echo_auth"))
    with pytest.raises(BackendError) as raised:
        run(_call(provider.base_url))
    assert KEY not in str(raised.value)


def test_an_error_body_cut_at_its_bound_frees_its_connection(provider: FakeProvider) -> None:
    """An error whose body goes on past the bound closes its connection: with one connection
    allowed, the next call gets one at once and fails the same way, from its status. Its
    unread body held the only connection (or came back as the next answer) if it was kept."""
    provider.reset(Behaviour(mode="status", status=500, error_pad=1024 * 1024, stall_s=60))

    async def twice() -> list[BaseException]:
        http = OpenAIHTTP(timeout_s=10, max_connections=1)
        call = http.complete(provider.base_url, BODY, api_key=KEY, label="gpt-4o")
        try:
            first = await asyncio.gather(asyncio.wait_for(call, 5), return_exceptions=True)
            call = http.complete(provider.base_url, BODY, api_key=KEY, label="gpt-4o")
            second = await asyncio.gather(asyncio.wait_for(call, 5), return_exceptions=True)
            return [*first, *second]
        finally:
            await http.aclose()

    try:
        errors = run(twice())
    finally:
        provider.unstall()
    assert [(type(e), getattr(e, "upstream_status", None)) for e in errors] == [
        (BackendError, 500),
        (BackendError, 500),
    ]
    assert len(provider.received) == 2


def test_statuses_map_to_the_error_a_client_and_the_fallback_see() -> None:
    limited = error_for_status(429, b"{}", "m", retry_after="3")
    assert isinstance(limited, UpstreamRateLimitedError) and limited.retry_after == 3.0
    assert isinstance(error_for_status(504, b"", "m"), UpstreamTimeoutError)
    message = b'{"error": {"message": "context too long"}}'
    bad = error_for_status(413, message, "m")
    assert isinstance(bad, UpstreamBadRequestError) and "context too long" in str(bad)


def test_transport_failures_are_timeouts_or_unreachable() -> None:
    assert isinstance(map_transport_error(TimeoutError(), "m"), UpstreamTimeoutError)
    refused = map_transport_error(ConnectionRefusedError(), "m")
    assert type(refused) is BackendError and refused.code == "upstream_unreachable"


def test_a_closed_port_is_unreachable() -> None:
    with pytest.raises(BackendError) as raised:
        run(_call("http://127.0.0.1:9/v1"))
    assert raised.value.code == "upstream_unreachable"


@contextlib.asynccontextmanager
async def _sse_server(pieces: list[bytes]) -> AsyncIterator[str]:
    """A loopback server that answers any POST 200 with ``pieces``, each written and flushed
    alone a moment after the last (each its own read on the client), then closes the
    connection: an SSE body byte for byte as a server sends it. Yields its base URL."""
    answering: list[asyncio.Task[Any]] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answering.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
            writer.write(b"connection: close\r\n\r\n")
            for n, piece in enumerate(pieces):
                if n:
                    await asyncio.sleep(0.05)
                writer.write(piece)
                await writer.drain()
        finally:
            writer.close()
            await writer.wait_closed()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
        await asyncio.gather(*answering)


def _sse_chunk(text: str, finish: str | None = None) -> bytes:
    delta = {"content": text} if text else {}
    chunk = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    return json.dumps(chunk).encode()


def _reads_hello_there(body: list[bytes]) -> None:
    """A stream answered with ``body`` is read as "Hello", " there" and the end."""

    async def stream() -> list[dict[str, Any]]:
        async with _sse_server(body) as base_url:
            chunks, _ = await _call(base_url, stream=True)
            return chunks  # type: ignore[no-any-return]

    chunks = run(stream())
    assert [c["choices"][0]["delta"].get("content") for c in chunks] == ["Hello", " there", None]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_stream_whose_lines_end_in_a_lone_cr_is_read() -> None:
    """SSE lets a line end in CR, LF or CRLF. A server that ends its lines in a lone CR was
    read as one long line: the stream failed as a chunk that is not JSON (502
    ``upstream_bad_response``) instead of yielding its chunks."""
    body = [
        b"data: " + _sse_chunk("Hello") + b"\r\r",
        b"data: " + _sse_chunk(" there") + b"\r\rdata: " + _sse_chunk("", "stop") + b"\r\r",
        b"data: [DONE]\r\r",
    ]

    _reads_hello_there(body)


def _data_lines(chunk: bytes, *, indent: int | None) -> bytes:
    """``chunk`` as the ``data:`` lines of one SSE event, without the blank line that ends it:
    one line, or (``indent``) a line for each line of its JSON written indented, as a server
    that indents its JSON sends it (the SSE spec joins an event's data lines with LF)."""
    text = json.dumps(json.loads(chunk), indent=indent)
    return b"".join(b"data: " + line.encode() + b"\n" for line in text.splitlines())


@pytest.mark.parametrize(
    ("indent", "end"),
    [(2, b"\n"), (None, b"\n"), (None, b"")],
    ids=["indented", "one line", "one line, no blank line"],
)
def test_an_event_over_several_data_lines_is_one_chunk(indent: int | None, end: bytes) -> None:
    """SSE joins the ``data:`` lines of one event, up to the blank line that ends it: a server
    that writes its JSON indented sends an event over several. Each line was read as a chunk
    of its own, and the stream failed as one that is not JSON (502 ``upstream_bad_response``).
    An event in one line is read as it comes, as is one that no blank line ends (each line
    an event, as some servers send them)."""
    chunks = [_sse_chunk("Hello"), _sse_chunk(" there"), _sse_chunk("", "stop")]
    body = [_data_lines(chunk, indent=indent) + end for chunk in chunks]
    body.append(b"data: [DONE]\n" + end)

    _reads_hello_there(body)


def test_an_event_over_several_data_lines_is_bounded_as_one_line_is() -> None:
    """An event's data lines are held until the blank line that ends it: together they are
    bounded by ``max_event_bytes``, as one line is, so that a server cannot make Tiergate hold
    an endless event a line at a time."""
    lines = [b'data: {"choices": [\n', *[b'data: "' + b"x" * 100 + b'",\n'] * 100]
    body = [b"".join(lines) + b"data: null]}\n\n"]

    async def stream() -> None:
        http = OpenAIHTTP(timeout_s=10, max_event_bytes=4096)
        try:
            async with _sse_server(body) as base_url:
                chunks = http.stream(base_url, BODY, Usage(), api_key=KEY, label="gpt-4o")
                _ = [c async for c in chunks]
        finally:
            await http.aclose()

    with pytest.raises(UpstreamBadResponseError, match="sent a stream event over 4096 bytes"):
        run(stream())


@pytest.mark.parametrize(
    ("pieces", "lines"),
    [
        # A CRLF split across two reads: the CR ends one, the LF starts the next. Read as two
        # line ends, it made an empty line, which in SSE ends an event.
        ([b"data: a\r", b"\ndata: b\r\n\r", b"\n"], [b"data: a", b"data: b", b""]),
        (
            [b"data: a\rdata: b\r", b"\r", b"data: c\n\n"],
            [b"data: a", b"data: b", b"", b"data: c", b""],
        ),
        ([b"data: a\n\n", b"data: b\r\n\r\n"], [b"data: a", b"", b"data: b", b""]),
        ([b"data: a\r", b"\r\n"], [b"data: a", b""]),
    ],
    ids=["a CRLF split between reads", "lone CRs", "LF and CRLF", "a CR, then a CRLF"],
)
def test_an_sse_line_ends_at_lf_crlf_or_a_lone_cr_whatever_the_reads(
    pieces: list[bytes], lines: list[bytes]
) -> None:
    """The stream reader's lines, for line ends of each kind the SSE spec allows, as a server
    sends them over loopback in separate reads: an empty line only where the server sent one."""

    async def read() -> list[bytes]:
        async with (
            _sse_server(pieces) as base_url,
            aiohttp.ClientSession() as session,
            session.post(f"{base_url}/chat/completions", json={}) as response,
        ):
            return [line async for line in _lines(response.content, 1 << 20, "m")]

    assert run(read()) == lines
