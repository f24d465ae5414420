"""The closed tier: keys by provider, the direct OpenAI path and litellm for other providers,
and litellm's errors mapped into Tiergate's hierarchy."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, replace
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest

from router.backends import Completion, Usage
from router.backends.closed import (
    BOUNDED_PROVIDERS,
    PROVIDER_KEY_ENV,
    ClosedBackend,
    _Frames,
    cannot_take,
    key_for,
    map_litellm_error,
    provider_of,
    quiet_litellm,
    refused_sampling,
    stop_sequence_limit,
    unknown_output_limits,
)
from router.backends.openai_http import OpenAIHTTP, error_for_status
from router.config import MAX_EVENT_BYTES
from router.errors import (
    BackendError,
    BadRequestError,
    TiergateError,
    UpstreamBadRequestError,
    UpstreamBadResponseError,
    UpstreamOverloadedError,
    UpstreamRateLimitedError,
    UpstreamRequestTooLargeError,
    UpstreamTimeoutError,
)
from router.signals import SAMPLING_DEFAULTS
from tests.conftest import KEYS, free_port, run
from tests.fake_provider import (
    ANTHROPIC_OVERLOADED,
    Behaviour,
    FakeProvider,
    bedrock_frame,
    endless_error,
)

BODY = {
    "model": "auto",
    "messages": [{"role": "user", "content": "Hi"}],
    "metadata": {"team": "search"},
}


@dataclass(frozen=True)
class Model:
    """The parts of a policy model the backend reads."""

    name: str
    litellm_model: str | None
    api_base: str | None = None
    tier: str = "closed"
    api_key_env: str | None = None
    timeout_s: float | None = None
    transport: str = "auto"
    max_output_tokens: int | None = None


@pytest.fixture
def provider(fake: FakeProvider) -> Iterator[FakeProvider]:
    fake.reset()
    yield fake


async def _answer(
    model: Model,
    body: dict[str, Any],
    *,
    stream: bool,
    environ: dict[str, str] = KEYS,
    max_event_bytes: int = MAX_EVENT_BYTES,
) -> None:
    """Ask ``model`` for ``body``, whole or streamed to its end, and drop the answer."""
    http = OpenAIHTTP(timeout_s=10)
    backend = ClosedBackend(http, timeout_s=10, environ=environ, max_event_bytes=max_event_bytes)
    try:
        if stream:
            async for _ in backend.stream(model, body, Usage()):
                pass
        else:
            await backend.complete(model, body)
    finally:
        await backend.aclose()
        await http.aclose()


async def _complete(model: Model) -> Completion:
    http = OpenAIHTTP(timeout_s=10)
    backend = ClosedBackend(http, timeout_s=10, environ=KEYS)
    try:
        return await backend.complete(model, BODY)
    finally:
        await backend.aclose()
        await http.aclose()


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("name", sorted(BOUNDED_PROVIDERS))
def test_each_bounded_provider_is_read_within_the_limit_through_litellm(
    provider: FakeProvider, name: str, stream: bool
) -> None:
    """litellm takes Tiergate's bounded client for every provider in ``BOUNDED_PROVIDERS``:
    an answer over the limit, whole or in one stream event, fails the call as an answer that
    is not one, whatever the provider's protocol (the bound is met before litellm parses it).
    A litellm whose handler for one of them stops taking the client fails here."""
    limit = 100_000
    provider.reset(Behaviour(text="x" * (limit + 1)))
    body = {**BODY, "stream": stream}
    with pytest.raises(UpstreamBadResponseError) as raised:
        run(_answer(_through_litellm(provider, name), body, stream=stream, max_event_bytes=limit))
    # The fake plays no Gemini stream: it answers one with a whole JSON body.
    over = "a stream event" if stream and name != "gemini" else "a body"
    assert raised.value.message == f"m sent {over} over {limit} bytes"
    assert provider.received[-1].headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("version", [None, "2024-10-21"])
@pytest.mark.parametrize("name", ["azure", "openai"])
def test_an_sdk_provider_is_called_as_litellm_calls_it_with_its_own_client(
    provider: FakeProvider, name: str, version: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """litellm calls ``azure/`` and ``openai/`` through the OpenAI SDK: the SDK client
    Tiergate hands it, over the bounded HTTP client, sends the request litellm's own client
    sends (the same path, API version, key), only asked uncompressed."""
    model = _through_litellm(provider, name)
    if version:
        monkeypatch.setenv("AZURE_API_VERSION", version)

    async def litellms_own() -> None:
        litellm = quiet_litellm()
        await litellm.acompletion(
            model=model.litellm_model,
            messages=BODY["messages"],
            api_key=KEYS["OPENAI_API_KEY"],
            api_base=model.api_base,
        )
        await litellm.close_litellm_async_clients()

    run(litellms_own())
    own = provider.received[-1]
    run(_answer(model, BODY, stream=False, environ={**os.environ, **KEYS}))
    ours = provider.received[-1]
    assert ours.path == own.path
    for header in ("api-key", "authorization"):
        assert ours.headers.get(header) == own.headers.get(header)
    assert own.headers["accept-encoding"] != "identity"  # litellm's client: unbounded
    assert ours.headers["accept-encoding"] == "identity"


def test_an_azure_model_takes_litellms_azure_variables_by_default(
    provider: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``azure/`` model with no ``api_key_env`` and no ``api_base`` is configured as
    litellm's users configure one: its key from ``AZURE_API_KEY``, its endpoint and API
    version from ``AZURE_API_BASE`` and ``AZURE_API_VERSION``. Before, without
    ``api_key_env`` it had no key and was counted unavailable."""
    monkeypatch.setenv("AZURE_API_KEY", "az-test-key")
    monkeypatch.setenv("AZURE_API_BASE", provider.base_url)
    monkeypatch.setenv("AZURE_API_VERSION", "2024-10-21")
    model = Model("az", "azure/prod-chat")
    backend = ClosedBackend(OpenAIHTTP(timeout_s=10), timeout_s=10, environ=dict(os.environ))
    assert backend.unavailable_reason(model) is None
    run(_answer(model, BODY, stream=False, environ=dict(os.environ)))
    sent = provider.received[-1]
    assert sent.headers["api-key"] == "az-test-key"
    assert sent.path.endswith("/deployments/prod-chat/chat/completions?api-version=2024-10-21")
    monkeypatch.delenv("AZURE_API_KEY")
    assert ClosedBackend(OpenAIHTTP(timeout_s=1), timeout_s=1, environ={}).unavailable_reason(
        model
    ) == ("no API key: set AZURE_API_KEY")


AZURE = "https://acme.openai.azure.com"


@pytest.mark.parametrize(
    ("environ", "api_base", "reason"),
    [
        ({}, None, "no endpoint: set the model's api_base or AZURE_API_BASE"),
        ({}, AZURE, None),
        ({"AZURE_API_BASE": AZURE}, None, None),
        ({"AZURE_OPENAI_ENDPOINT": AZURE}, None, None),
    ],
)
def test_an_azure_model_without_an_endpoint_is_unavailable(
    environ: dict[str, str], api_base: str | None, reason: str | None
) -> None:
    """An ``azure/`` model with a key but no endpoint (no ``api_base``, ``AZURE_API_BASE`` nor
    the SDK's ``AZURE_OPENAI_ENDPOINT``) was counted available, and every call to it failed
    with the SDK's ``ValueError`` (``Must provide one of the `base_url` or `azure_endpoint`
    arguments``) as it was made."""
    environ = {"AZURE_API_KEY": "k", **environ}
    backend = ClosedBackend(OpenAIHTTP(timeout_s=1), timeout_s=1, environ=environ)
    model = Model("az", "azure/prod-chat", api_base=api_base)
    assert backend.unavailable_reason(model) == reason


def test_a_bedrock_stream_is_read_frame_by_frame_within_the_bound(provider: FakeProvider) -> None:
    """Bedrock streams AWS's binary event frames, not lines: through the bounded client each
    frame is bounded, never the whole stream, so a stream longer than the bound in all, of
    frames each under it, is read whole, however its frames are cut into pieces on the wire."""
    text = "y" * 3000
    provider.reset(Behaviour(text=text, piece_chars=100))
    model = _through_litellm(provider, "bedrock")
    got: list[str] = []

    async def read() -> None:
        backend = ClosedBackend(OpenAIHTTP(timeout_s=10), timeout_s=10, max_event_bytes=2000)
        try:
            async for chunk in backend.stream(model, {**BODY, "stream": True}, Usage()):
                got.extend(c["delta"].get("content") or "" for c in chunk["choices"])
        finally:
            await backend.aclose()

    with pytest.MonkeyPatch.context() as env:
        env.setenv("OPENAI_API_KEY", "sk-test")
        run(read())
    assert "".join(got) == text
    assert provider.received[-1].path.endswith("/invoke-with-response-stream")
    assert provider.received[-1].headers["accept-encoding"] == "identity"


@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_bedrock_frames_are_bounded_however_they_are_cut(piece: int) -> None:
    """The frame bound reads each frame's length where the frame starts, even when a piece of
    the stream ends inside that length: frames under the bound pass whole, one over it fails."""
    frames = b"".join(bedrock_frame({"type": "ping", "n": "z" * n}) for n in (10, 200, 0))
    over = bedrock_frame({"type": "ping", "n": "z" * 1000})

    async def pieces(data: bytes) -> AsyncIterator[bytes]:
        for at in range(0, len(data), piece):
            yield data[at : at + piece]

    async def read(data: bytes) -> bytes:
        bounded = _Frames(_Stream(pieces(data)), 1000)
        return b"".join([part async for part in bounded])

    assert run(read(frames)) == frames
    with pytest.raises(Exception, match="sent a stream event over 1000 bytes"):
        run(read(frames + over))


class _Stream:
    """An httpx byte stream of ``pieces``."""

    def __init__(self, pieces: AsyncIterator[bytes]) -> None:
        self._pieces = pieces

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._pieces

    async def aclose(self) -> None:
        pass


def _through_litellm(provider: FakeProvider, name: str) -> Model:
    """A model of provider ``name`` that litellm calls, on the fake provider (for Bedrock, a
    Claude on InvokeModel, which the fake plays, its stream in AWS's binary frames)."""
    base = provider.base_url.removesuffix("/v1") if name == "anthropic" else provider.base_url
    model = _HAIKU_ON_BEDROCK if name == "bedrock" else f"{name}/some-model"
    return Model("m", model, base, api_key_env="OPENAI_API_KEY", transport="litellm")


_HAIKU_ON_BEDROCK = "bedrock/invoke/anthropic.claude-3-haiku-20240307-v1:0"


@pytest.mark.parametrize(("status", "stream"), [(500, False), (503, True)])
@pytest.mark.parametrize("name", sorted(BOUNDED_PROVIDERS))
def test_each_bounded_providers_error_body_is_read_to_its_bound_through_litellm(
    provider: FakeProvider, name: str, status: int, stream: bool
) -> None:
    """An error answer whose body goes on (a proxy's log) is read to 64 KiB through litellm,
    as on the direct path, for every provider in ``BOUNDED_PROVIDERS``: the call fails at once
    from its status, in the direct path's words (a 503 an overload with its Retry-After). Its
    body was read to the stream bound (64 MiB) and waited for: here until the read timed out."""
    provider.reset(endless_error(status))
    model = _through_litellm(provider, name)
    started = time.monotonic()
    try:
        with pytest.raises(BackendError) as raised:
            run(_answer(model, {**BODY, "stream": stream}, stream=stream))
    finally:
        provider.unstall()
    assert time.monotonic() - started < 5
    reason = f"{HTTPStatus(status).phrase} (an error body over 65536 bytes, not read)"
    assert raised.value.message == error_for_status(status, b"", "m", reason=reason).message
    assert raised.value.upstream_status == status
    if status == 503:
        assert isinstance(raised.value, UpstreamOverloadedError)
        assert raised.value.headers["retry-after"] == "12"


def test_a_model_takes_its_provider_key_unless_it_names_its_own() -> None:
    assert provider_of("anthropic/claude-3-5-sonnet") == "anthropic"
    assert provider_of("gpt-4o") == "openai"
    env = {"OPENAI_API_KEY": "sk-o", "TEAM_KEY": "sk-t"}
    assert key_for(Model("g", "openai/gpt-4o"), env) == "sk-o"
    assert key_for(Model("g", "openai/gpt-4o", api_key_env="TEAM_KEY"), env) == "sk-t"
    assert key_for(Model("c", "anthropic/claude"), env) is None


def test_a_model_without_a_key_says_which_variable_to_set() -> None:
    backend = ClosedBackend(OpenAIHTTP(timeout_s=1), timeout_s=1, environ={})
    assert backend.unavailable_reason(Model("c", "anthropic/claude")) == (
        "no API key: set ANTHROPIC_API_KEY"
    )
    assert backend.unavailable_reason(Model("x", None)) == "closed model has no litellm_model"
    keyed = ClosedBackend(OpenAIHTTP(timeout_s=1), timeout_s=1, environ=KEYS)
    assert keyed.unavailable_reason(Model("g", "openai/gpt-4o")) is None


def test_a_provider_without_a_known_key_variable_points_at_api_key_env() -> None:
    # COHERE_API_KEY is set, but no table says so: "set ?" left the operator guessing.
    backend = ClosedBackend(OpenAIHTTP(timeout_s=1), timeout_s=1, environ={"COHERE_API_KEY": "k"})
    reason = backend.unavailable_reason(Model("c", "cohere/command-r-plus"))
    assert reason == (
        "no API key: no known key variable for provider 'cohere': name the one that holds "
        "its key with the model's api_key_env"
    )
    named = Model("c", "cohere/command-r-plus", api_key_env="COHERE_API_KEY")
    assert backend.unavailable_reason(named) is None


def test_the_readme_names_every_provider_key_variable() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    closed = readme[readme.index("### Closed providers") :]
    for provider, variable in PROVIDER_KEY_ENV.items():
        assert f"`{provider}/` (`{variable}`)" in " ".join(closed.split()), provider


def test_an_openai_model_is_called_directly_with_its_provider_name(
    provider: FakeProvider,
) -> None:
    answer = run(_complete(Model("gpt-4o", "openai/gpt-4o", provider.base_url)))
    assert answer.body["model"] == "gpt-4o" and answer.usage.completion_tokens > 0
    sent = provider.received[-1]
    assert sent.path.endswith("/chat/completions")
    assert sent.body["model"] == "gpt-4o" and "metadata" not in sent.body
    assert sent.headers["authorization"] == f"Bearer {KEYS['OPENAI_API_KEY']}"


def test_another_provider_goes_through_litellm_in_its_own_protocol(
    provider: FakeProvider,
) -> None:
    model = Model("claude", "anthropic/claude-3-5-sonnet-20241022", provider.base_url[:-3])
    answer = run(_complete(model))
    assert answer.body["model"] == "claude"
    assert answer.body["choices"][0]["message"]["content"]
    assert provider.received[-1].path.endswith("/messages")
    # litellm's empty provider_specific_fields ({"citations": null, ...}) would go back to the
    # next model with the message a client appends to its history; a strict one refuses it.
    assert "provider_specific_fields" not in answer.body["choices"][0]["message"]


def _outside(payload: dict[str, Any], model: type[Any], where: str = "") -> list[str]:
    """The keys of ``payload`` that OpenAI's type ``model`` (openai-python's) does not define,
    as paths, looked for in the usage, choices, messages, deltas and tool calls too."""
    from openai.types import CompletionUsage
    from openai.types.chat import ChatCompletion, ChatCompletionChunk
    from openai.types.chat.chat_completion import Choice
    from openai.types.chat.chat_completion_chunk import Choice as ChunkChoice
    from openai.types.chat.chat_completion_chunk import ChoiceDelta, ChoiceDeltaToolCall
    from openai.types.chat.chat_completion_message import ChatCompletionMessage
    from openai.types.chat.chat_completion_message_function_tool_call import (
        ChatCompletionMessageFunctionToolCall,
    )
    from openai.types.completion_usage import CompletionTokensDetails, PromptTokensDetails

    inner: dict[tuple[type[Any], str], type[Any]] = {
        (ChatCompletion, "choices"): Choice,
        (ChatCompletionChunk, "choices"): ChunkChoice,
        (ChatCompletion, "usage"): CompletionUsage,
        (ChatCompletionChunk, "usage"): CompletionUsage,
        (Choice, "message"): ChatCompletionMessage,
        (ChunkChoice, "delta"): ChoiceDelta,
        (ChatCompletionMessage, "tool_calls"): ChatCompletionMessageFunctionToolCall,
        (ChoiceDelta, "tool_calls"): ChoiceDeltaToolCall,
        (CompletionUsage, "prompt_tokens_details"): PromptTokensDetails,
        (CompletionUsage, "completion_tokens_details"): CompletionTokensDetails,
    }
    found = [f"{where}{key}" for key in payload if key not in model.model_fields]
    for key, value in payload.items():
        part = inner.get((model, key))
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for i, item in items:
            if part is not None and isinstance(item, dict):
                at = f"{where}{key}" if i is None else f"{where}{key}[{i}]"
                found += _outside(item, part, f"{at}.")
    return found


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_an_answer_through_litellm_is_in_openais_own_shape(
    provider: FakeProvider, stream: bool
) -> None:
    """A Claude answer through litellm carries only what OpenAI's chat completion (or chunk)
    defines, as a client that sends the message back to another model (``auto`` may route the
    next turn elsewhere) needs: no ``index`` on a whole message's tool call (litellm gave the
    only one 1), no litellm copies of Anthropic's cache counts and no litellm ``cost`` in the
    usage. The prompt cache's reads and writes stay, in OpenAI's ``prompt_tokens_details``,
    and the call's usage still counts the writes."""
    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    provider.reset(Behaviour(mode="tool_call", cached_tokens=5, cache_write_tokens=3))
    model = Model("claude", "anthropic/claude-sonnet-4-5-20250929", provider.base_url[:-3])
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {}}}]
    body = {**BODY, "tools": tools, "stream": stream}

    async def answer() -> tuple[list[dict[str, Any]], Usage]:
        http = OpenAIHTTP(timeout_s=10)
        backend = ClosedBackend(http, timeout_s=10, environ=KEYS)
        usage = Usage()
        try:
            if stream:
                return [c async for c in backend.stream(model, body, usage)], usage
            whole = await backend.complete(model, body)
            return [whole.body], whole.usage
        finally:
            await backend.aclose()
            await http.aclose()

    payloads, usage = run(answer())
    kind = ChatCompletionChunk if stream else ChatCompletion
    assert [path for p in payloads for path in _outside(p, kind)] == []
    last = payloads[-1]
    assert last["usage"]["prompt_tokens_details"] == {
        "cache_write_tokens": 3,
        "cached_tokens": 5,
        "text_tokens": 13,
    }
    assert (usage.cached_tokens, usage.cache_write_tokens) == (5, 3)
    if not stream:
        (call,) = last["choices"][0]["message"]["tool_calls"]
        assert call == {
            "id": "toolu_fake_1",
            "type": "function",
            "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
        }
    else:  # a delta's tool call keeps its index, the place of the call in the answer
        deltas = [choice["delta"] for p in payloads for choice in p["choices"]]
        assert {c["index"] for d in deltas for c in d.get("tool_calls", [])} == {0}


@pytest.mark.parametrize("stream", [False, True])
def test_an_anthropic_model_litellm_does_not_map_is_sent_a_max_tokens_it_takes(
    provider: FakeProvider, stream: bool
) -> None:
    """Anthropic requires ``max_tokens``; for a request without one litellm sent its model map's
    limit, and for a model the map does not list (claude-3-5-sonnet-20241022) 128000, which
    Anthropic refuses for every Claude (a 400 the client could do nothing about). It is sent
    4096, the smallest current Claude's limit; a model the map knows still gets the map's."""
    unmapped = Model("claude", "anthropic/claude-3-5-sonnet-20241022", provider.base_url[:-3])
    run(_answer(unmapped, BODY, stream=stream))
    assert provider.received[-1].body["max_tokens"] == 4096
    mapped = Model("claude", "anthropic/claude-sonnet-4-5-20250929", provider.base_url[:-3])
    run(_answer(mapped, BODY, stream=stream))
    assert provider.received[-1].body["max_tokens"] == 64000
    asked = {**BODY, "max_completion_tokens": 300}
    run(_answer(unmapped, asked, stream=stream))
    assert provider.received[-1].body["max_tokens"] == 300


@pytest.mark.parametrize("stream", [False, True])
def test_an_anthropic_request_without_max_tokens_is_sent_the_policys_limit(
    provider: FakeProvider, stream: bool
) -> None:
    """A policy's ``max_output_tokens`` is the ``max_tokens`` of an Anthropic request that sets
    none (the client's own goes as it is)."""
    claude = Model(
        "claude",
        "anthropic/claude-3-5-sonnet-20241022",
        provider.base_url[:-3],
        max_output_tokens=8192,
    )
    run(_answer(claude, BODY, stream=stream))
    assert provider.received[-1].body["max_tokens"] == 8192
    run(_answer(claude, {**BODY, "max_tokens": 100}, stream=stream))
    assert provider.received[-1].body["max_tokens"] == 100


def _limits(provider: FakeProvider) -> dict[str, Any]:
    """The fields that bound the answer's length in the last request ``provider`` got."""
    sent = provider.received[-1].body
    return {k: v for k, v in sent.items() if k in ("max_tokens", "max_completion_tokens")}


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_without_max_tokens_is_sent_the_policys_limit_on_every_path(
    provider: FakeProvider, stream: bool
) -> None:
    """The budget holds a call that sets no ``max_tokens`` at the model's ``max_output_tokens``,
    but only a Claude was sent it: gpt-4o on the direct path, and any other model through
    litellm, wrote up to its own limit (16,384 for gpt-4o), past what was held. It is sent in
    the field each takes: ``max_completion_tokens`` to an OpenAI model (its reasoning models
    refuse ``max_tokens``), ``max_tokens`` to a model an OpenAI-compatible server serves."""
    gpt = Model("gpt-4o", "openai/gpt-4o", provider.base_url, max_output_tokens=2000)
    run(_answer(gpt, BODY, stream=stream))
    assert _limits(provider) == {"max_completion_tokens": 2000}
    run(_answer(gpt, {**BODY, "max_tokens": 100}, stream=stream))  # the client's own,
    assert _limits(provider) == {"max_completion_tokens": 100}  # in the field OpenAI's all take
    run(_answer(replace(gpt, max_output_tokens=None), BODY, stream=stream))
    assert _limits(provider) == {}  # no cap set: up to the model's own limit
    vllm = Model(
        "qwen", "openai/Qwen/Qwen2.5-7B-Instruct", provider.base_url, max_output_tokens=2000
    )
    run(_answer(vllm, BODY, stream=stream))
    assert _limits(provider) == {"max_tokens": 2000}
    mistral = Model(
        "m", "mistral/mistral-large-latest", provider.base_url, "closed", "OPENAI_API_KEY"
    )
    run(_answer(replace(mistral, max_output_tokens=2000), BODY, stream=stream))
    assert _limits(provider) == {"max_tokens": 2000}


BEDROCK_KEYS = {"BEDROCK_KEY": "bedrock-test-key"}
PROFILE_ARN = "arn:aws:bedrock:us-east-1:123456789012:inference-profile"


def _bedrock_haiku(provider: FakeProvider) -> Model:
    """claude-3-haiku on Bedrock's InvokeModel, played by ``provider``."""
    return Model(
        "claude-bedrock",
        "bedrock/invoke/anthropic.claude-3-haiku-20240307-v1:0",
        provider.base_url,
        api_key_env="BEDROCK_KEY",
    )


def test_a_claude_on_bedrock_is_sent_a_max_tokens_it_takes(provider: FakeProvider) -> None:
    """Claude requires ``max_tokens`` on Bedrock too: for a request without one, litellm sent
    Bedrock's InvokeModel (``bedrock/invoke/...``, and the route of a Claude litellm does not
    list) 128000 for a Claude its map has no limit for, which Bedrock refuses (a 400 the client
    could do nothing about). It is sent what an Anthropic model is: the policy's
    ``max_output_tokens``, else 4096. (Over the wire, whole answers only: the fake does not play
    Bedrock's binary event stream; a stream is sent the same arguments.)"""
    haiku = _bedrock_haiku(provider)
    run(_answer(haiku, BODY, stream=False, environ=BEDROCK_KEYS))
    sent = provider.received[-1]
    assert sent.path == "/v1/model/anthropic.claude-3-haiku-20240307-v1:0/invoke"
    assert sent.body["max_tokens"] == 4096
    run(_answer(replace(haiku, max_output_tokens=2048), BODY, stream=False, environ=BEDROCK_KEYS))
    assert provider.received[-1].body["max_tokens"] == 2048


@pytest.mark.parametrize(
    ("litellm_model", "sent"),
    [
        ("vertex_ai/claude-3-5-sonnet-v2@20241022", 4096),  # not in litellm's map
        ("vertex_ai/claude-3-5-sonnet@20240620", 8192),  # in it, and sent 128000 all the same
        ("bedrock/anthropic.claude-3-5-sonnet-20241022-v2:0", 8192),  # Converse: sent none
        ("bedrock/invoke/anthropic.claude-3-5-sonnet-20241022-v2:0", 8192),
        ("bedrock/us.anthropic.claude-3-haiku-20240307-v1:0", 4096),
        ("bedrock/amazon.nova-pro-v1:0", None),  # not a Claude: up to its own limit
        ("vertex_ai/gemini-2.0-flash", None),
        # A system-defined inference profile's ARN names its model: a Claude like any other.
        (f"bedrock/{PROFILE_ARN}/us.anthropic.claude-3-5-sonnet-20241022-v2:0", 8192),
        (f"bedrock/converse/{PROFILE_ARN}/global.anthropic.claude-sonnet-4-20250514-v1:0", 64000),
        # An application profile's hides it: sent none unless the policy gives a limit
        # (tests/test_cli.py warns of it).
        ("bedrock/arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1", None),
    ],
)
def test_a_claude_on_vertex_or_bedrock_is_sent_what_an_anthropic_one_is(
    litellm_model: str, sent: int | None
) -> None:
    """litellm sends a Claude on Vertex AI without ``max_tokens`` 128000, whether or not its map
    lists the model, which Vertex refuses for every Claude but the largest. Tested at the
    arguments Tiergate gives litellm: Vertex's calls need google-auth to get a token, which the
    test environment does not install, so no request reaches a loopback server."""
    model = Model("claude", litellm_model)
    kwargs = _litellm_kwargs(model, BODY)
    assert kwargs.get("max_tokens") == sent
    assert _litellm_kwargs(model, {**BODY, "max_tokens": 100})["max_tokens"] == 100
    assert unknown_output_limits([model]) == (["claude"] if sent == 4096 else [])


def _litellm_kwargs(model: Model, body: dict[str, Any]) -> dict[str, Any]:
    """The arguments Tiergate gives litellm for ``model`` and ``body``, made within an event
    loop, as the bounded client some providers are handed belongs to one."""

    async def kwargs() -> dict[str, Any]:
        backend = ClosedBackend(OpenAIHTTP(timeout_s=1), timeout_s=1, environ=KEYS)
        try:
            return backend._litellm_kwargs(model, body)
        finally:
            await backend.aclose()

    return run(kwargs())  # type: ignore[no-any-return]


#: The tool litellm makes an Anthropic model call for any JSON object, as it is sent.
ANY_OBJECT_TOOL = {"type": "object"}


@pytest.mark.parametrize(
    "response_format",
    [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "city"}}],
    ids=["json_object", "json_schema-without-schema"],
)
def test_a_claude_on_bedrock_is_made_to_answer_json(
    provider: FakeProvider, response_format: dict[str, Any]
) -> None:
    """Only ``anthropic/`` models had their ``response_format`` made one litellm honours: a
    Claude on Bedrock was sent ``json_object`` as nothing (it answered prose to a client that
    parses JSON), and a ``json_schema`` without its optional schema failed in litellm
    (``KeyError: 'schema'``), a 400 for a valid request. Each is sent as the forced tool call
    an Anthropic model gets."""
    haiku = _bedrock_haiku(provider)
    body = {**BODY, "response_format": response_format}
    run(_answer(haiku, body, stream=False, environ=BEDROCK_KEYS))
    sent = provider.received[-1].body
    assert [t["input_schema"] for t in sent["tools"]] == [ANY_OBJECT_TOOL]
    assert sent["tool_choice"] == {"type": "tool", "name": sent["tools"][0]["name"]}


@pytest.mark.parametrize(
    ("litellm_model", "claude"),
    [
        ("vertex_ai/claude-3-5-sonnet-v2@20241022", True),
        ("bedrock/anthropic.claude-3-5-sonnet-20241022-v2:0", True),  # Converse
        ("bedrock/us.anthropic.claude-3-haiku-20240307-v1:0", True),
        ("bedrock/amazon.nova-pro-v1:0", False),
        ("vertex_ai/gemini-2.0-flash", False),
    ],
)
def test_a_claude_on_vertex_or_bedrock_gets_the_response_format_an_anthropic_one_does(
    litellm_model: str, claude: bool
) -> None:
    """litellm translates ``response_format`` for a Claude on Vertex AI and on Bedrock's
    Converse as for Anthropic's API: ``json_object`` without a schema to nothing, a
    ``json_schema`` without one to a ``KeyError``. Tested at the arguments Tiergate gives
    litellm (Vertex needs google-auth, and the fake provider does not play Converse)."""
    model = Model("m", litellm_model)
    for asked in ({"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "x"}}):
        sent = _litellm_kwargs(model, {**BODY, "response_format": asked})
        if not claude:
            assert sent["response_format"] == asked
            continue
        assert sent["response_format"]["type"] == "json_schema"
        assert sent["response_format"]["json_schema"]["schema"] == ANY_OBJECT_TOOL


def test_litellm_fetches_nothing_from_the_network_on_a_first_call(
    provider: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its first call to an Anthropic model with an anthropic-beta header (as an Anthropic SDK
    # client sends through /v1/messages) fetched the betas' catalog from GitHub: an air-gapped
    # gateway waited on it, and every gateway reached a host it was not given.
    from litellm import anthropic_beta_headers_manager as betas

    fetched: list[str] = []

    def fetch(url: str) -> dict[str, Any]:
        fetched.append(url)
        raise OSError("no network")

    for name in ("LITELLM_OFFLINE_MODE", "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(betas, "_BETA_HEADERS_CONFIG", None)  # as in a fresh process
    monkeypatch.setattr(
        betas.GetAnthropicBetaHeadersConfig, "fetch_remote_beta_headers_config", fetch
    )
    model = Model("claude", "anthropic/claude-3-5-sonnet-20241022", provider.base_url[:-3])
    body = {**BODY, "extra_headers": {"anthropic-beta": "prompt-caching-2024-07-31"}}
    run(_answer(model, body, stream=False))
    assert provider.received[-1].path.endswith("/messages")
    assert fetched == []


@pytest.mark.parametrize("stream", [False, True])
def test_a_field_the_provider_does_not_take_is_named_and_never_sent(
    provider: FakeProvider, stream: bool
) -> None:
    """litellm refuses ``seed`` for an Anthropic model before calling it: the client read a
    cut-off litellm message about its proxy settings, with no ``param``, as an upstream 400
    that ended the fallback chain. It is the model refusing the request, as the local model
    refuses tools: a 400 that names the field, and the chain may go on."""
    model = Model("claude", "anthropic/claude-3-5-sonnet-20241022", provider.base_url[:-3])
    body = {**BODY, "seed": 7, "n": 2}
    with pytest.raises(BadRequestError) as refused:
        run(_answer(model, body, stream=stream))
    error = refused.value
    assert not isinstance(error, BackendError)  # a refusal, not a failed upstream call
    assert error.status_code == 400 and error.code == "unsupported_parameter"
    assert error.param in ("seed", "n")
    assert "'seed'" in error.message and "'n'" in error.message
    assert error.message.startswith("claude (anthropic) does not take ")
    assert "litellm" not in error.message and "drop_params" not in error.message
    assert provider.received == []


class RateLimitError(Exception):
    status_code = 429


class Timeout(Exception):  # noqa: N818 (litellm's own name)
    status_code = None


class APIConnectionError(Exception):
    status_code = None


def test_litellm_errors_map_by_status_and_kind() -> None:
    assert isinstance(map_litellm_error(RateLimitError("slow"), "m"), UpstreamRateLimitedError)
    large = map_litellm_error(RateLimitError("Request too large for gpt-4o in org-x"), "m")
    assert isinstance(large, UpstreamRequestTooLargeError) and large.should_retry is False
    assert isinstance(map_litellm_error(Timeout("late"), "m"), UpstreamTimeoutError)
    bad = type("BadRequestError", (Exception,), {"status_code": 400})("too long")
    assert isinstance(map_litellm_error(bad, "m"), UpstreamBadRequestError)
    assert map_litellm_error(bad, "m").code == "upstream_bad_request"
    over = type("ContextWindowExceededError", (Exception,), {"status_code": 400})("too long")
    assert map_litellm_error(over, "m").code == "context_length_exceeded"
    gone = map_litellm_error(APIConnectionError("refused"), "m")
    assert type(gone) is BackendError and gone.code == "upstream_unreachable"


#: litellm's text for an Anthropic 400 (its ContextWindowExceededError's, which it raises
#: wherever the text holds "prompt is too long"), and for a provider whose words for a prompt
#: over the window the direct paths do not know (Cerebras'), with the code each must map to.
LITELLM_WINDOW_TEXTS = {
    "a 400 quoting the words": (
        'litellm.BadRequestError: AnthropicException - {"type":"error","error":{"type":'
        '"invalid_request_error","message":"messages.0.content.0.text: unexpected value '
        "'Summarise: the prompt is too long: 9 tokens > 8 maximum'\"}}",
        "upstream_bad_request",
    ),
    "Anthropic's refusal": (
        'litellm.BadRequestError: AnthropicException - {"type":"error","error":{"type":'
        '"invalid_request_error","message":"prompt is too long: 215000 tokens > 200000 '
        'maximum"}}',
        "context_length_exceeded",
    ),
    "words only litellm knows": (
        "litellm.BadRequestError: CerebrasException - Current length is 9000 while limit is 8192",
        "context_length_exceeded",
    ),
}


@pytest.mark.parametrize("answered", [True, False], ids=["answered", "status-only"])
@pytest.mark.parametrize("case", sorted(LITELLM_WINDOW_TEXTS))
def test_litellms_window_class_stands_only_for_words_the_direct_paths_do_not_know(
    case: str, answered: bool
) -> None:
    """litellm raises ContextWindowExceededError wherever its text holds its words for a prompt
    over the window, so a 400 that quotes a user's prompt holding them was
    ``context_length_exceeded`` and went on to a model with a larger window. Where the words
    are ones the direct paths read, where they stand decides, as there; litellm's class stands
    for words only it knows. Alike whether litellm names the provider's status or not."""
    text, code = LITELLM_WINDOW_TEXTS[case]
    attrs = {"status_code": 400, "provider_status_code": 400 if answered else None}
    over = type("ContextWindowExceededError", (Exception,), attrs)(text)
    error = map_litellm_error(over, "m")
    assert (type(error), error.code) == (UpstreamBadRequestError, code)


def test_an_overloaded_provider_maps_to_one_error_on_every_path() -> None:
    """A 503, and Anthropic's 529 overloaded_error (which litellm raises as a 500
    InternalServerError naming the 529 in provider_status_code), are one error: 503
    upstream_overloaded, keeping the provider's Retry-After; a plain 500 is not one."""
    unavailable = type("ServiceUnavailableError", (Exception,), {"status_code": 503})("busy")
    unavailable.litellm_response_headers = {"retry-after": "12"}  # type: ignore[attr-defined]
    internal = type("InternalServerError", (Exception,), {"status_code": 500})
    overloaded = internal('AnthropicError - {"type": "overloaded_error"}')
    overloaded.provider_status_code = 529  # type: ignore[attr-defined]
    for exc, upstream in ((unavailable, 503), (overloaded, 529)):
        error = map_litellm_error(exc, "m")
        assert isinstance(error, UpstreamOverloadedError), error
        assert (error.status_code, error.code, error.upstream_status) == (
            503,
            "upstream_overloaded",
            upstream,
        )
    assert map_litellm_error(unavailable, "m").headers["retry-after"] == "12"
    assert type(map_litellm_error(internal("boom"), "m")) is BackendError
    direct = error_for_status(529, json.dumps(ANTHROPIC_OVERLOADED).encode(), "m", retry_after="7")
    assert isinstance(direct, UpstreamOverloadedError)
    assert (direct.message, direct.headers["retry-after"]) == ("m answered 529: Overloaded", "7")
    assert type(error_for_status(500, b"{}", "m")) is BackendError


@pytest.mark.parametrize("stream", [False, True])
def test_a_provider_litellm_cannot_connect_to_is_unreachable(stream: bool) -> None:
    """litellm wraps a refused connection to an Anthropic model as InternalServerError (500);
    the proxy answers it as the direct OpenAI path does, 502 ``upstream_unreachable``."""
    model = Model(
        "claude", "anthropic/claude-3-5-sonnet-20241022", f"http://127.0.0.1:{free_port()}"
    )

    with pytest.raises(BackendError) as raised:
        run(_answer(model, {**BODY, "stream": stream}, stream=stream))
    assert raised.value.code == "upstream_unreachable"


ROLES = {"type": "error", "error": {"type": "invalid_request_error", "message": "roles alternate"}}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "case",
    [
        (Behaviour(mode="rate_limit"), "claude answered 429: slow down", "RateLimitError"),
        (
            Behaviour(mode="status", status=529, error_body=ANTHROPIC_OVERLOADED),
            "claude answered 529: Overloaded",
            "overloaded_error",
        ),
        (
            Behaviour(mode="status", status=400, error_body=ROLES),
            "claude answered 400: roles alternate",
            "invalid_request_error",
        ),
        (
            Behaviour(mode="status", status=500),
            "claude answered 500: upstream exploded",
            "InternalServerError",
        ),
    ],
    ids=["429", "529", "400", "500"],
)
def test_a_litellm_error_reads_as_the_direct_paths_do(
    provider: FakeProvider,
    caplog: pytest.LogCaptureFixture,
    case: tuple[Behaviour, str, str],
    stream: bool,
) -> None:
    """Through litellm (an Anthropic model on the chat or Responses front) a client read
    litellm's words: ``claude: APIConnectionError: litellm.APIConnectionError:
    AnthropicException - Stream ended before a finish_reason was received``, or a 429's whole
    JSON body as a bytes literal. It reads as the direct paths' messages: the model, what
    happened, the provider's status and its own message; the log keeps litellm's text."""
    behaviour, says, raw = case
    provider.reset(behaviour)
    caplog.set_level(logging.INFO, logger="tiergate.closed")
    model = Model("claude", "anthropic/claude-3-5-sonnet-20241022", provider.base_url[:-3])
    with pytest.raises(BackendError) as raised:
        run(_answer(model, BODY, stream=stream))
    assert raised.value.message == says
    assert raw in caplog.text and "litellm" in caplog.text


@pytest.mark.parametrize(
    "litellm_model", ["openai/gpt-4o", "gemini/gemini-1.5-pro", "mistral/mistral-large-latest"]
)
@pytest.mark.parametrize("stream", [False, True])
def test_each_providers_error_through_litellm_reads_the_same(
    provider: FakeProvider, litellm_model: str, stream: bool
) -> None:
    """litellm words each provider's errors its own way (``RateLimitError: MistralException -
    ``, ``GeminiException InternalServerError - b'...'``): all read as the direct path's."""
    provider.reset(Behaviour(mode="status", status=500))
    model = Model("m", litellm_model, provider.base_url, api_key_env="M_KEY", transport="litellm")
    with pytest.raises(BackendError) as raised:
        run(_answer(model, BODY, stream=stream, environ={"M_KEY": "sk-test-key"}))
    assert raised.value.message == "m answered 500: upstream exploded"


#: Errors a provider answers with a status, as (status, body): each must fail a call through
#: litellm as the direct path's mapping (error_for_status) fails it.
ANSWERED: dict[str, tuple[int, dict[str, Any]]] = {
    "Mistral, a prompt over the window": (
        400,
        {
            "object": "error",
            "message": "Prompt contains 40960 tokens and 0 draft tokens, too large for model "
            "with 32768 maximum context length",
            "type": "invalid_request_message_error",
            "param": None,
            "code": "3051",
        },
    ),
    "OpenAI, a prompt over the window": (
        400,
        {
            "error": {
                "message": "This model's maximum context length is 128000 tokens.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        },
    ),
    "a bad field": (
        400,
        {"error": {"message": "Invalid 'temperature'", "type": "invalid_request_error"}},
    ),
    "a refused key": (
        401,
        {"error": {"message": "Incorrect API key", "type": "invalid_request_error"}},
    ),
    "a gateway timeout": (504, {"error": {"message": "Gateway timeout"}}),
    "a server error": (500, {"error": {"message": "Internal error", "type": "server_error"}}),
}


@pytest.mark.parametrize("case", sorted(ANSWERED))
@pytest.mark.parametrize("litellm_model", ["openai/gpt-4o", "mistral/mistral-large-latest"])
def test_an_answered_error_fails_through_litellm_as_on_the_direct_path(
    provider: FakeProvider, litellm_model: str, case: str
) -> None:
    """litellm's error for a provider's answer is mapped from its status and body by the
    direct path's mapping: class, status, code, ``param``, whether the chain goes on, whether
    the model cools, and the message. Mistral's words for a prompt over the window were
    litellm's BadRequestError, ``upstream_bad_request`` (litellm's table does not know them);
    a 504 read "m timed out: ..." where the direct path says "m answered 504: ..."."""
    status, body = ANSWERED[case]
    provider.reset(Behaviour(mode="status", status=status, error_body=body))
    model = Model("m", litellm_model, provider.base_url, api_key_env="M_KEY", transport="litellm")
    with pytest.raises(BackendError) as raised:
        run(_answer(model, BODY, stream=False, environ={"M_KEY": "sk-test-key"}))
    direct = error_for_status(status, json.dumps(body).encode(), "m")
    seen = [
        (
            type(e),
            e.status_code,
            e.code,
            e.param,
            e.should_retry,
            e.retryable,
            e.cools,
            e.message,
        )
        for e in (raised.value, direct)
    ]
    assert seen[0] == seen[1]


def test_a_key_in_a_litellm_error_is_scrubbed() -> None:
    error = map_litellm_error(Exception("bad key sk-ant-abcdefghijklmnopqrstuvwx"), "m")
    assert "abcdefghijklmnopqrstuvwx" not in str(error) and "[redacted]" in str(error)


@pytest.mark.parametrize(
    "messages",
    [
        # litellm's Anthropic translation fails and appends "Received Messages=[...]"
        [{"role": "user", "content": "SECRET-PROMPT"}, {"role": "tool", "content": "x"}],
        # litellm's message check failed (a traceback of its own code appended); now refused
        # before litellm is called
        [{"role": "user", "content": [{"type": "text", "text": "SECRET-PROMPT"}, {"type": "x"}]}],
    ],
)
def test_a_litellm_error_repeats_neither_the_prompt_nor_a_traceback(
    provider: FakeProvider, messages: list[dict[str, Any]]
) -> None:
    """An error's message reaches the client, the log line and a cascade's outcome record: a
    prompt in it broke "logs: no prompts" (and ``store_prompts: none``), and a traceback showed
    the client the server's paths."""
    model = Model("claude", "anthropic/claude-3-5-sonnet-20241022", provider.base_url[:-3])
    with pytest.raises(TiergateError) as raised:  # a 400 either way
        run(_answer(model, {**BODY, "messages": messages}, stream=False))
    message = raised.value.message
    assert raised.value.status_code == 400
    assert message.startswith("claude ")
    assert "SECRET-PROMPT" not in message
    assert "Traceback" not in message and ".py" not in message
    assert provider.received == []


@pytest.mark.parametrize("stream", [False, True])
def test_a_key_a_provider_echoes_is_redacted_whatever_its_shape(
    provider: FakeProvider, stream: bool
) -> None:
    """A provider that repeats the key it got, bare: a key not shaped like ``sk-...`` (Google's
    ``AIza...``, an Azure hex key) passed litellm's pattern scrub into the message that reaches
    the client, the log and the record. The direct OpenAI path already redacted the key it sent."""
    key = "AIzaPlainKey0123456789abcdefXYZ"
    provider.reset(Behaviour(mode="echo_key"))
    model = Model(
        "claude",
        "anthropic/claude-3-5-sonnet-20241022",
        provider.base_url[:-3],
        api_key_env="CLAUDE_KEY",
    )
    with pytest.raises(BackendError) as raised:
        run(_answer(model, BODY, stream=stream, environ={**KEYS, "CLAUDE_KEY": key}))
    assert any(key in str(r.headers) for r in provider.received)  # the fake did get it
    assert key not in raised.value.message and "[redacted]" in raised.value.message


def test_litellm_logs_no_prompt_at_debug(
    provider: FakeProvider, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under ``TIERGATE_LOG_LEVEL=debug`` litellm's debug lines (``litellm.acompletion(messages=
    [...])``, the curl command with the body) put every prompt sent through it in the log."""
    monkeypatch.delenv("LITELLM_LOG", raising=False)
    caplog.set_level(logging.DEBUG)
    model = Model("claude", "anthropic/claude-3-5-sonnet-20241022", provider.base_url[:-3])
    body = {**BODY, "messages": [{"role": "user", "content": "SECRET-PROMPT"}]}
    for stream in (False, True):
        run(_answer(model, body, stream=stream))
    assert len(provider.received) == 2 and "SECRET-PROMPT" in str(provider.received[-1].body)
    assert any(r.name.startswith("LiteLLM") for r in caplog.records)  # it does log at INFO
    assert "SECRET-PROMPT" not in caplog.text


@pytest.mark.parametrize(
    ("litellm_model", "dropped"),
    [
        ("openai/gpt-4o", {"top_k", "reasoning_effort"}),
        ("openai/gpt-4.1", {"top_k", "reasoning_effort"}),
        ("openai/o3-mini", {"top_k"}),  # a reasoning model takes reasoning_effort
        ("openai/my-org/llama-3-70b", set()),  # unknown to litellm: a vLLM may take both
        ("anthropic/claude-3-5-sonnet-20241022", set()),  # litellm translates for Anthropic
    ],
)
def test_what_a_closed_model_cannot_take(litellm_model: str, dropped: set[str]) -> None:
    names = {"top_k", "reasoning_effort", "temperature"}
    assert cannot_take(Model("m", litellm_model), names) == dropped


REPLAYED = {"messages.thinking_blocks", "messages.reasoning_content"}


@pytest.mark.parametrize(
    ("litellm_model", "dropped"),
    [
        ("anthropic/claude-3-5-sonnet-20241022", set()),
        ("bedrock/anthropic.claude-3-5-sonnet-20241022-v2:0", set()),  # Converse replays them
        ("bedrock/invoke/us.anthropic.claude-3-haiku-20240307-v1:0", set()),
        ("vertex_ai/claude-3-5-sonnet-v2@20241022", set()),
        ("bedrock/amazon.nova-pro-v1:0", REPLAYED),
        ("vertex_ai/gemini-2.0-flash", REPLAYED),
        ("openai/gpt-4o", REPLAYED),
    ],
)
def test_every_claude_keeps_the_thinking_it_replays(litellm_model: str, dropped: set[str]) -> None:
    """A Claude's earlier thinking, replayed on an assistant turn, reaches it wherever it is
    served: litellm sends it back to Bedrock (Converse and InvokeModel) and Vertex AI as to
    Anthropic's API, and Claude requires it of a turn that thought with thinking on."""
    assert cannot_take(Model("m", litellm_model), REPLAYED | {"temperature"}) == dropped


@pytest.mark.parametrize(("env", "limit"), [(None, 5.0), ("2", 2.0)])
def test_litellm_downloads_an_image_url_up_to_5_mb_unless_told(
    env: str | None, limit: float
) -> None:
    # litellm fetches an Anthropic model's image URLs itself, up to 50 MB each by default: one
    # small request with ten URLs held hundreds of megabytes. Read when litellm is imported,
    # so a fresh interpreter tells.
    import os
    import subprocess
    import sys

    environ = {k: v for k, v in os.environ.items() if k != "MAX_IMAGE_URL_DOWNLOAD_SIZE_MB"}
    if env is not None:
        environ["MAX_IMAGE_URL_DOWNLOAD_SIZE_MB"] = env
    code = (
        "from router.backends.closed import quiet_litellm; quiet_litellm(); "
        "from litellm.constants import MAX_IMAGE_URL_DOWNLOAD_SIZE_MB as mb; print(mb)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True
    )
    assert float(out.stdout.strip().splitlines()[-1]) == limit


def test_a_stream_litellm_sees_cut_is_unreachable_under_its_own_name(
    provider: FakeProvider,
) -> None:
    """litellm wraps a failure mid-stream as MidStreamFallbackError; the error is the one it
    wraps, as the direct OpenAI path reports it: ``upstream_unreachable``, in its words (not
    litellm's "Stream ended before a finish_reason was received", nor its exceptions' names)."""
    provider.reset(Behaviour(mode="reset_mid_stream"))
    model = Model(
        "claude", "anthropic/claude-3-5-sonnet-20241022", provider.base_url.removesuffix("/v1")
    )
    got: list[dict[str, object]] = []

    async def call() -> None:
        http = OpenAIHTTP(timeout_s=10)
        backend = ClosedBackend(http, timeout_s=10, environ=KEYS)
        try:
            async for chunk in backend.stream(model, {**BODY, "stream": True}, Usage()):
                got.append(chunk)
        finally:
            await backend.aclose()
            await http.aclose()

    with pytest.raises(BackendError) as raised:
        run(call())
    assert got  # it failed after the stream began
    assert raised.value.code == "upstream_unreachable"
    assert raised.value.message == "claude unreachable: the stream ended before it finished"


@pytest.mark.parametrize(
    "model",
    [
        Model("m", "mistral/mistral-large-latest", api_key_env="OPENAI_API_KEY"),
        Model("gpt-4o", "openai/gpt-4o", transport="litellm"),
        Model("claude", "anthropic/claude-3-5-sonnet-20241022"),
    ],
    ids=lambda model: model.litellm_model,
)
def test_a_litellm_stream_left_early_closes_the_providers_connection(
    provider: FakeProvider, model: Model
) -> None:
    """A reader that stops after the first chunk (a client that left) closes the provider's
    connection at once, so the provider stops sending: litellm's stream held it, and the
    provider went on, until it was collected."""
    provider.reset(Behaviour(text=" ".join(f"w{i}" for i in range(400)), chunk_delay_s=0.01))
    base = provider.base_url
    model = replace(model, api_base=base.removesuffix("/v1") if "claude" in model.name else base)
    broken: list[int] = []

    async def call() -> None:
        http = OpenAIHTTP(timeout_s=10)
        backend = ClosedBackend(http, timeout_s=10, environ=KEYS)
        try:
            stream = backend.stream(model, {**BODY, "stream": True}, Usage())
            await anext(stream)
            await stream.aclose()  # what the gateway does when the client leaves
            for _ in range(100):  # while the backend and its clients are still open
                if provider.broken_streams:
                    break
                await asyncio.sleep(0.02)
            broken.append(provider.broken_streams)
        finally:
            await backend.aclose()
            await http.aclose()

    run(call())
    assert broken == [1], provider.sent_chunks
    assert provider.sent_chunks < 200


class _Chunk(dict[str, Any]):
    """A chunk as litellm yields it (it has ``model_dump``)."""

    def model_dump(self, **_: Any) -> dict[str, Any]:
        return dict(self)


class _QuietLitellm:
    """litellm as some versions behave: a stream whose connection is reset mid-answer just
    stops, with neither an error nor a finish_reason."""

    async def acompletion(self, **_: Any) -> Any:
        async def chunks() -> Any:
            for delta in ({"role": "assistant", "content": ""}, {"content": "Hello "}):
                yield _Chunk(id="c", choices=[{"index": 0, "delta": delta}])

        return chunks()


def test_a_litellm_stream_that_stops_without_its_end_was_cut_off() -> None:
    """A stream litellm ends without a finish_reason (and without an error) was cut off, as
    on the direct path: ``upstream_unreachable``, after the chunks that came. It ended
    quietly, and the client read a truncated answer as a whole one."""
    model = Model("m", "mistral/mistral-large-latest", "http://127.0.0.1:9", api_key_env="M_KEY")
    got: list[dict[str, Any]] = []

    async def call() -> None:
        http = OpenAIHTTP(timeout_s=10)
        backend = ClosedBackend(http, timeout_s=10, environ={"M_KEY": "k"})
        backend._litellm = _QuietLitellm()
        try:
            async for chunk in backend.stream(model, {**BODY, "stream": True}, Usage()):
                got.append(chunk)
        finally:
            await http.aclose()

    with pytest.raises(BackendError) as raised:
        run(call())
    assert len(got) == 2
    assert raised.value.code == "upstream_unreachable"
    assert raised.value.message == "m unreachable: the stream ended before it finished"


@pytest.mark.parametrize(
    ("litellm_model", "stops"),
    [
        ("openai/gpt-4o", 4),
        ("openai/gpt-4.1-mini", 4),
        ("openai/o3-mini", 4),
        ("openai/gpt-5-chat-latest", 4),
        ("openai/o1", 0),
        ("openai/o3", 0),
        ("openai/o3-2025-04-16", 0),
        ("openai/o4-mini", 0),
        ("openai/gpt-5", 0),
        ("openai/gpt-5-mini", 0),
        ("openai/gpt-5.1", 0),
        ("azure/gpt-4o", 4),
        ("azure/prod-chat", 4),
        ("azure/gpt-5-chat", 4),
        ("azure/o3", 0),
        ("azure/gpt-5", 0),
        ("gemini/gemini-2.5-pro", 5),
        ("vertex_ai/gemini-2.5-flash", 5),
        ("gpt-4o", 4),
        ("openai/my-org/gpt-4o", None),
        # Other providers' models litellm's map lists, served over an OpenAI-compatible API
        # (DeepSeek's, Google's, Anthropic's compatibility layer) or named bare.
        ("openai/deepseek-chat", None),
        ("openai/gemini-2.5-flash", None),
        ("openai/claude-sonnet-4-5", None),
        ("claude-sonnet-4-5", None),
        ("anthropic/claude-sonnet-4-5", None),
        ("vertex_ai/claude-sonnet-4-5", None),
        ("mistral/mistral-large-latest", None),
    ],
)
def test_a_models_stop_sequences_are_those_its_provider_takes(
    litellm_model: str, stops: int | None
) -> None:
    """OpenAI and Azure OpenAI take 4 stop sequences; OpenAI's reasoning models but o3-mini
    and gpt-5's chat models take none (a 400 ``unsupported_parameter`` for ``stop``), on
    either; Gemini takes 5. A model an OpenAI-compatible server serves, and other providers',
    are not known for a limit (litellm translates their field), though litellm's map lists them
    and the ``openai/`` prefix reaches them: ``openai/deepseek-chat`` was held to OpenAI's 4."""
    assert stop_sequence_limit(litellm_model) == stops


#: A value other than its default for each sampling field (router.signals.SAMPLING_DEFAULTS).
SAMPLED = {
    "frequency_penalty": 0.5,
    "logit_bias": {"50256": -100},
    "logprobs": True,
    "presence_penalty": 0.5,
    "temperature": 0.2,
    "top_p": 0.5,
}


@pytest.mark.parametrize(
    "name",
    [
        *("o1", "o3", "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini", "gpt-5.1", "gpt-5.2"),
        *("gpt-5-chat-latest", "gpt-4o", "gpt-4.1"),
    ],
)
def test_the_sampling_an_openai_model_refuses_is_what_litellm_refuses(name: str) -> None:
    """OpenAI's reasoning models refuse temperature other than 1, top_p, the penalties and
    logprobs (gpt-5 logit_bias too; gpt-5.1, which reasons only when asked, only those three)
    with a 400: the sampling fields Tiergate holds each model to are those litellm's own
    configs refuse for it, on OpenAI's API and Azure's."""
    from litellm.utils import get_optional_params

    litellm = quiet_litellm()
    assert set(SAMPLED) == set(SAMPLING_DEFAULTS)
    refused = set()
    for field, value in SAMPLED.items():
        try:
            get_optional_params(model=name, custom_llm_provider="openai", **{field: value})
        except litellm.UnsupportedParamsError:
            refused.add(field)
    assert refused_sampling(f"openai/{name}") == refused
    assert refused_sampling(f"azure/{name}") == refused
    assert refused_sampling(name) == refused


@pytest.mark.parametrize(
    "litellm_model",
    [
        *("openai/my-org/o3", "openai/deepseek-reasoner", "anthropic/claude-sonnet-4-5"),
        *("azure/prod-chat", "gemini/gemini-2.5-pro"),
    ],
)
def test_other_models_are_not_held_to_openais_sampling(litellm_model: str) -> None:
    assert refused_sampling(litellm_model) == frozenset()


@pytest.mark.parametrize("name", ["azure", "openai"])
def test_a_predicted_output_is_sent_its_limit_as_max_tokens_through_litellm(
    provider: FakeProvider, name: str
) -> None:
    """litellm sends ``max_completion_tokens`` as it is, which OpenAI's Predicted Outputs do
    not take (its guide): a request with a ``prediction`` goes with ``max_tokens``."""
    prediction = {"type": "content", "content": "def f():\n    return 1\n"}
    body = {**BODY, "prediction": prediction, "max_completion_tokens": 60}
    run(_answer(_through_litellm(provider, name), body, stream=False))
    sent = provider.received[-1].body
    assert (sent.get("max_tokens"), sent.get("max_completion_tokens")) == (60, None)
    assert sent["prediction"] == prediction


@pytest.mark.parametrize("name", ["anthropic", "bedrock", "mistral"])
def test_every_stop_sequence_reaches_a_provider_through_litellm(
    provider: FakeProvider, name: str
) -> None:
    """litellm cut a request's ``stop`` to its first 4 for every provider (OpenAI's limit): a
    Claude asked for 6 through the chat front stopped at 4 of them, and an answer that ran past
    a sequence the client stops on looked like the model's fault. Tiergate's fit check holds
    a model to its own limit instead (docs/policy.md), so litellm passes them all on."""
    stops = ["END", "STOP", "###", "---", "===", "~~~"]
    run(_answer(_through_litellm(provider, name), {**BODY, "stop": stops}, stream=False))
    sent = provider.received[-1].body
    assert sent.get("stop_sequences", sent.get("stop")) == stops


#: A fresh interpreter counting prompts for several providers' models with every connection
#: refused (an audit hook): each must count from what is installed, fetching nothing.
_COUNT_OFFLINE = """
import sys
tried = []
def refuse(event, args):
    if event in ("socket.connect", "socket.getaddrinfo"):
        tried.append(f"{event} {args!r}")
        raise RuntimeError("no network")
sys.addaudithook(refuse)
from router.backends.closed import counted_tokens
class M:
    def __init__(self, name): self.name, self.litellm_model = name, name
image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a\\n" * 3000}, image]}]}
for name in sys.argv[1:]:
    print(name, *counted_tokens(M(name), body, "a\\n" * 300))
sys.exit(f"tried the network: {tried}" if tried else 0)
"""


def test_counting_tokens_fetches_nothing() -> None:
    """A closed call whose provider reported no usage is counted with litellm's tokenizers
    (router.gateway): tiktoken's encodings, an older Claude's and DeepSeek's, from the copies
    litellm bundles; a Llama model, whose tokenizer only the Hugging Face Hub holds, with
    tiktoken; an image at its default size, its URL not fetched."""
    import subprocess
    import sys

    unset = ("TIKTOKEN_CACHE_DIR", "LITELLM_OFFLINE_MODE")
    environ = {k: v for k, v in os.environ.items() if k not in unset}
    models = [
        "openai/gpt-4o", "openai/gpt-4.1-mini", "anthropic/claude-sonnet-4-5", "claude-sonnet-4-5",
        "deepseek/deepseek-chat", "groq/llama-3.3-70b-versatile", "cohere_chat/command-r",
        "mistral/mistral-large-latest", "gemini/gemini-2.0-flash", "some/unknown-model",
    ]  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", _COUNT_OFFLINE, *models],
        env=environ,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    counted = {line.split()[0]: line.split()[1:] for line in out.stdout.splitlines()}
    assert set(counted) == set(models)
    for name, (prompt, answer) in counted.items():
        assert int(prompt) > 6000 and int(answer) >= 300, (name, prompt, answer)
