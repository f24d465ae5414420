"""The direct OpenAI-compatible client: answers and streams over loopback, upstream statuses
and transport failures become Tiergate errors, and a key an upstream echoes is scrubbed."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from router.backends import Usage
from router.backends.openai_http import OpenAIHTTP, error_for_status, map_transport_error
from router.errors import (
    BackendError,
    UpstreamBadRequestError,
    UpstreamBadResponseError,
    UpstreamOverloadedError,
    UpstreamRateLimitedError,
    UpstreamTimeoutError,
)
from tests.conftest import run
from tests.fake_provider import LLAMA_CPP_CONTEXT_EXCEEDED, Behaviour, FakeProvider

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
        ("a bare string", BackendError),
    ],
)
def test_an_error_chunk_mid_stream_fails_as_its_kind_says(
    provider: FakeProvider, chunk: Any, error: type[BackendError]
) -> None:
    """An OpenAI-compatible server's ``{"error": ...}`` chunk after the first words fails the
    stream by its kind: by its code or type, or by the HTTP status vLLM puts in ``code``
    (a boolean is none); the provider's message is kept, with a key it repeats scrubbed."""
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
        (None, BackendError),  # LLAMA_CPP_CONTEXT_EXCEEDED
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
