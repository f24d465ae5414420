"""Fallbacks, the local queue, disconnects and exactly-once records, over real HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import socket
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

import router.api as api_module
import router.gateway as gateway_module
from router import messages, responses
from router.api import _event_sse, _sse
from router.auth import Principal
from router.backends import Completion, ModelLike, Usage, closed
from router.backends.closed import ANTHROPIC_MAX_TOKENS, ClosedBackend, quiet_litellm
from router.backends.local import Gate
from router.backends.native import NativeRequest, native_or
from router.backends.openai_http import OpenAIHTTP
from router.costs import CostBook
from router.errors import (
    BackendError,
    BadRequestError,
    ClientDisconnected,
    PermissionDeniedError,
    RateLimitError,
    TiergateError,
    UpstreamBadResponseError,
)
from router.gateway import (
    Answer,
    Call,
    Gateway,
    PolicyHolder,
    StreamAnswer,
    load_serving_policy,
)
from router.limits import RateLimiter
from router.outcomes import OutcomeRecord, SQLiteOutcomeStore
from router.policy import MIN_ANSWER_TOKENS, parse_policy
from router.signals import SAMPLING_DEFAULTS, estimate_tokens
from tests.conftest import KeywordScorer, free_port, live, policy_yaml, wait_for
from tests.fake_provider import Behaviour, FakeProvider, prompt_tokens
from tests.scripted_local import ScriptedLocal as ScriptedStream


class ScriptedLocal:
    """A local tier that fails, or holds each request until released."""

    def __init__(self, *, fail: bool = False, queue_size: int = 0) -> None:
        self.fail = fail
        self.gate = Gate(slots=1, queue_size=queue_size)
        self.release = asyncio.Event()
        self.hold = False
        self.calls = 0

    def unavailable_reason(self, model: ModelLike) -> str | None:
        return None

    async def complete(
        self, model: ModelLike, body: dict[str, Any], usage: Usage | None = None
    ) -> Completion:
        self.calls += 1
        await self.gate.acquire()
        try:
            if self.fail:
                raise BackendError("local generation failed: boom")
            if self.hold:
                await self.release.wait()
            return Completion(
                body={
                    "id": "x",
                    "object": "chat.completion",
                    "created": 0,
                    "model": model.name,
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": "local!"},
                            "finish_reason": "stop",
                        }
                    ],
                },
                usage=Usage(3, 2),
            )
        finally:
            self.gate.release()

    async def stream(
        self, model: ModelLike, body: dict[str, Any], usage: Usage
    ) -> AsyncIterator[dict[str, Any]]:
        result = await self.complete(model, body)
        yield {
            "id": "x",
            "object": "chat.completion.chunk",
            "model": model.name,
            "choices": [{"index": 0, "delta": {"content": "local!"}}],
        }
        del result

    async def aclose(self) -> None:
        return None


_OPEN: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def _client(url: str) -> openai.OpenAI:
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    _OPEN.append(client)
    return client


def test_local_failure_falls_back_to_closed(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()
    local = ScriptedLocal(fail=True)
    with live(tmp_path, policy_yaml(fake, on_failure="closed"), local_backend_obj=local) as srv:
        raw = _client(srv.url).chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "easy"}]
        )
        assert raw.headers["x-tiergate-tier"] == "closed"
        assert raw.headers["x-tiergate-fallback"] == "local->closed"
        assert local.calls == 1 and len(fake.received) == 1
        record = srv.gateway.outcomes
        assert wait_for(lambda: record.get(raw.headers["x-request-id"]) is not None)
        assert record.get(raw.headers["x-request-id"])["fallback"] == "local->closed"


def test_local_failure_without_fallback_is_a_clear_error(
    tmp_path: Path, fake: FakeProvider
) -> None:
    fake.reset()
    local = ScriptedLocal(fail=True)
    with live(tmp_path, policy_yaml(fake, on_failure="error"), local_backend_obj=local) as srv:
        with pytest.raises(openai.APIStatusError) as err:
            _client(srv.url).chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "easy"}]
            )
        assert err.value.status_code == 502  # a tried model failed: bad gateway
        assert "local generation failed" in str(err.value)
        assert fake.received == []


#: OpenAI's 400 for a prompt over gpt-4o's window.
OVER_WINDOW = {
    "message": "This model's maximum context length is 128000 tokens.",
    "type": "invalid_request_error",
    "param": "messages",
    "code": "context_length_exceeded",
}


def _windows(fake: FakeProvider, claude_window: int) -> str:
    """The test policy with gpt-4o's window (128,000 tokens) and claude's, falling back closed."""
    return (
        policy_yaml(fake, on_failure="closed")
        .replace(
            "litellm_model: openai/gpt-4o\n",
            "litellm_model: openai/gpt-4o\n    context_window: 128000\n",
        )
        .replace(
            "litellm_model: anthropic/claude-3-5-sonnet-20241022\n",
            "litellm_model: anthropic/claude-3-5-sonnet-20241022\n"
            f"    context_window: {claude_window}\n",
        )
    )


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_prompt_over_a_closed_window_goes_to_a_larger_one(
    tmp_path: Path, fake: FakeProvider, stream: bool
) -> None:
    # The estimate fit gpt-4o's 128k window and OpenAI counted more: its 400 was final while
    # claude, next on the chain with 200k, was never tried.
    fake.reset(
        Behaviour(
            mode="status",
            status=400,
            error_body={"error": OVER_WINDOW},
            failing_path="/completions",
        )
    )
    body = {"model": "auto", "messages": [{"role": "user", "content": "HARD"}], "stream": stream}
    with live(tmp_path, _windows(fake, 200000)) as srv:
        answer = srv.http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-tiergate-model"] == "claude"
        assert answer.headers["x-tiergate-fallback"] == "closed->closed"
        assert [r.path for r in fake.received] == ["/v1/chat/completions", "/v1/messages"]
        request_id = answer.headers["x-request-id"]
        assert wait_for(lambda: srv.gateway.outcomes.get(request_id) is not None)
        record = srv.gateway.outcomes.get(request_id)
        assert (record["model"], record["fallback"], record["status"]) == (
            "claude",
            "closed->closed",
            "ok",
        )


@pytest.mark.parametrize(
    ("error", "claude_window"),
    [(OVER_WINDOW, 128000), ({**OVER_WINDOW, "code": "invalid_value"}, 200000)],
    ids=["no-larger-window", "another-400"],
)
def test_a_closed_400_stays_final_without_a_larger_window(
    tmp_path: Path, fake: FakeProvider, error: dict[str, Any], claude_window: int
) -> None:
    fake.reset(Behaviour(mode="status", status=400, error_body={"error": error}))
    body = {"model": "auto", "messages": [{"role": "user", "content": "HARD"}]}
    with live(tmp_path, _windows(fake, claude_window)) as srv:
        answer = srv.http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 400
    assert [r.path for r in fake.received] == ["/v1/chat/completions"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_an_anthropic_model_is_sent_no_more_max_tokens_than_its_window_leaves(
    tmp_path: Path, fake: FakeProvider, stream: bool
) -> None:
    """A request without ``max_tokens`` fit claude's window, and claude was sent its output
    limit (4096) on top of a prompt of nearly the whole window: Anthropic refused it (400). It
    is sent what the window leaves, as another provider's model answers up to its window."""
    fake.reset(Behaviour(context_windows={"claude-3-5-sonnet-20241022": 10000}))
    sent = _sent_long_then_short(tmp_path, fake, _windows(fake, 10000), "claude", stream)
    assert sent["max_tokens"] == ANTHROPIC_MAX_TOKENS  # a short prompt: the limit, as before


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_policy_output_limit_is_sent_no_larger_than_the_window_leaves(
    tmp_path: Path, fake: FakeProvider, stream: bool
) -> None:
    """gpt-4o with ``max_output_tokens: 2000`` is sent that limit on a request without one; on
    a prompt of nearly its whole window, 2,000 more tokens are over it, and OpenAI refuses the
    request (400) that it answers, to the window's end, without one. It is sent the rest, in
    the field OpenAI's models all take."""
    fake.reset(Behaviour(context_windows={"gpt-4o": 10000}))
    policy = _windows(fake, 200000).replace(
        "context_window: 128000\n", "context_window: 10000\n    max_output_tokens: 2000\n"
    )
    sent = _sent_long_then_short(tmp_path, fake, policy, "gpt-4o", stream)
    assert "max_tokens" not in sent
    assert sent["max_completion_tokens"] == 2000  # a short prompt: the policy's limit


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_response_is_sent_no_larger_an_output_limit_than_the_window_leaves(
    tmp_path: Path, fake: FakeProvider, stream: bool
) -> None:
    """On ``/v1/responses`` gpt-4o, spoken to natively, is sent its policy limit as the
    Response's ``max_output_tokens``: all 2,000 on a prompt of nearly its whole window, where
    the chat front sends what the window leaves (docs/policy.md: cut likewise on every path)."""
    fake.reset()
    policy = _windows(fake, 200000).replace(
        "context_window: 128000\n", "context_window: 10000\n    max_output_tokens: 2000\n"
    )
    long = "word " * 6900  # about 9,860 tokens by Tiergate's estimate, 8,625 by the provider's
    with live(tmp_path, policy) as srv:
        for text, most in ((long, 10000 - len(long) // 4), ("hi", 2000)):
            body = {"model": "gpt-4o", "input": text, "stream": stream}
            answer = srv.http.post("/v1/responses", json=body)
            assert answer.status_code == 200, answer.text
            sent = fake.received[-1]
            assert sent.path == "/v1/responses"
            assert 0 < sent.body["max_output_tokens"] <= most
    assert sent.body["max_output_tokens"] == 2000  # a short prompt: the policy's limit


def _sent_long_then_short(
    tmp_path: Path, fake: FakeProvider, policy: str, model: str, stream: bool
) -> dict[str, Any]:
    # Ask ``model`` (window 10,000) with a prompt of nearly the window, then a short one, with
    # no max_tokens: each is answered, sent a limit within what the window leaves. The last
    # request the provider received, as it was sent.
    long = "word " * 6900  # about 9,860 tokens by Tiergate's estimate, 8,627 by the provider's
    with live(tmp_path, policy) as srv:
        for content in (long, "hi"):
            body = {"model": model, "messages": [{"role": "user", "content": content}]}
            answer = srv.http.post("/v1/chat/completions", json={**body, "stream": stream})
            assert answer.status_code == 200, answer.text
            assert "Hello" in answer.text  # the closed model's answer, whole or streamed
            sent = fake.received[-1].body
            limit = sent.get("max_completion_tokens") or sent["max_tokens"]
            assert 0 < limit <= 10000 - prompt_tokens(sent)
    return sent


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_request_with_both_output_limits_is_sent_the_one_it_was_fitted_by(
    tmp_path: Path, fake: FakeProvider, stream: bool
) -> None:
    """A request with ``max_tokens`` and ``max_completion_tokens`` is fitted and held by the
    second (as vLLM and the local model read it, and litellm sends Claude). The direct OpenAI
    path sent both, and OpenAI refuses both at once (400 invalid_parameter_combination): the
    same request was answered when routed to claude or the local model and refused on gpt-4o.
    Each model is sent the one limit it was fitted by."""
    fake.reset(Behaviour(strict=True))
    limits = {"max_tokens": 3000, "max_completion_tokens": 50}
    with live(tmp_path, _windows(fake, 200000)) as srv:
        for model in ("gpt-4o", "claude"):
            body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **limits}
            answer = srv.http.post("/v1/chat/completions", json={**body, "stream": stream})
            assert answer.status_code == 200, answer.text
            assert "Hello" in answer.text  # the closed model's answer, whole or streamed
            sent = fake.received[-1].body
            assert [sent.get(k) for k in limits if k in sent] == [50], model


@pytest.mark.parametrize("served", ["my-llama-70b", "deepseek-chat"])
@pytest.mark.parametrize(
    "limits",
    [{"max_tokens": 3000, "max_completion_tokens": 50}, {"max_completion_tokens": 50}],
    ids=["both", "max_completion_tokens"],
)
def test_an_openai_compatible_server_is_sent_the_limit_as_max_tokens(
    tmp_path: Path, fake: FakeProvider, limits: dict[str, int], served: str
) -> None:
    """An OpenAI-compatible server (``openai/`` with ``api_base``: a model litellm's map does
    not list, or another provider's it lists, as DeepSeek's API serves ``deepseek-chat``) is
    sent the limit as ``max_tokens``, the one every such server reads and older ones (vLLM
    before max_completion_tokens, Ollama) read alone: sent ``max_completion_tokens`` only, such
    a server wrote past the limit the request was fitted and held by."""
    fake.reset(Behaviour(completion_tokens=500, output_fields=("max_tokens",)))
    policy = policy_yaml(fake).replace("openai/gpt-4o\n", f"openai/{served}\n")
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **limits}
    with live(tmp_path, policy) as srv:
        answer = srv.http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 50
    sent = fake.received[-1].body
    assert {k: v for k, v in sent.items() if k.startswith("max_")} == {"max_tokens": 50}


@pytest.mark.parametrize(
    ("limits", "said"),
    [
        ({"max_tokens": 0, "max_completion_tokens": 50}, "max_tokens: Input should be"),
        ({"max_tokens": 40000, "max_completion_tokens": 50}, "max_tokens 40000 is over"),
    ],
    ids=["invalid", "over-the-cap"],
)
def test_a_refusal_of_the_requests_own_field_keeps_its_name(
    tmp_path: Path, fake: FakeProvider, limits: dict[str, int], said: str
) -> None:
    """A request refused before it is served (its schema, the size caps) is named in the
    client's own fields already: the gateway's naming of a backend's chat fields for the front
    (Gateway._explained) renamed a chat request's ``max_tokens`` to the
    ``max_completion_tokens`` it also sent, a field the error was not about."""
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi"}], **limits}
    with live(tmp_path, policy_yaml(fake)) as srv:
        answer = srv.http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert said in error["message"]
    assert error["param"] == "max_tokens"


def test_a_refusal_of_a_translated_request_names_the_fronts_field(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A front's request refused as the chat request it becomes names the front's field:
    a Responses request with no input is refused for its ``input``, not chat's ``messages``."""
    with live(tmp_path, policy_yaml(fake)) as srv:
        answer = srv.http.post("/v1/responses", json={"model": "auto", "input": []})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "input"


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_an_openai_reasoning_model_is_sent_the_limit_as_max_completion_tokens(
    tmp_path: Path, fake: FakeProvider, stream: bool
) -> None:
    """OpenAI's reasoning models refuse ``max_tokens`` (400 unsupported_parameter). The direct
    path sent a request's ``max_tokens`` as it came: every Messages request (the front requires
    ``max_tokens``) and every chat one that set it failed on o3-mini, a model the client may
    not have chosen. An OpenAI model is sent the limit as ``max_completion_tokens``, the field
    each of them takes, as the limit Tiergate fills already is."""
    fake.reset(Behaviour(strict=True))
    policy = policy_yaml(fake).replace("openai/gpt-4o\n", "openai/o3-mini\n")
    message = {"messages": [{"role": "user", "content": "hi"}], "stream": stream}
    with live(tmp_path, policy) as srv:
        for path in ("/v1/chat/completions", "/v1/messages"):
            body = {"model": "gpt-4o", "max_tokens": 100, **message}
            answer = srv.http.post(path, json=body)
            assert answer.status_code == 200, answer.text
            sent = fake.received[-1].body
            assert {k: v for k, v in sent.items() if k.startswith("max_")} == {
                "max_completion_tokens": 100
            }


@pytest.mark.parametrize("room", [0, 1, 15, MIN_ANSWER_TOKENS])
def test_a_prompt_that_leaves_no_room_for_an_answer_is_refused_with_the_numbers(
    tmp_path: Path, fake: FakeProvider, room: int
) -> None:
    """A prompt at (or a few tokens under) claude's window fit it, by the prompt alone: claude
    was sent ``max_tokens: 1`` (what the window left, at least 1) and wrote one token, or
    nothing worth the call. A model fits a request without ``max_tokens`` only when its
    window leaves the least answer (``MIN_ANSWER_TOKENS``) after the prompt; else a pinned
    request is a 400 ``context_length_exceeded`` that names the numbers, and nothing is sent."""
    fake.reset()
    messages = [{"role": "user", "content": "word " * 2000}]
    prompt = estimate_tokens(messages)
    with live(tmp_path, _windows(fake, prompt + room)) as srv:
        answer = srv.http.post(
            "/v1/chat/completions", json={"model": "claude", "messages": messages}
        )
    if room >= MIN_ANSWER_TOKENS:
        assert answer.status_code == 200, answer.text
        assert fake.received[-1].body["max_tokens"] == room
        return
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert (
        f"model 'claude' cannot take {prompt} tokens in the prompt, which leave {room} of its "
        f"context window {prompt + room} for the answer (at least {MIN_ANSWER_TOKENS})"
    ) in error["message"]
    assert fake.received == []


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_fallback_that_cannot_take_a_field_keeps_the_failure_before_it(
    tmp_path: Path, fake: FakeProvider, stream: bool
) -> None:
    # gpt-4o failed (500) and claude, next on the chain, cannot take ``seed``: the client got
    # litellm's 400 about claude, which its SDK does not retry, for a request OpenAI takes.
    fake.reset(Behaviour(mode="status", status=500, failing_path="/completions"))
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": "HARD"}],
        "seed": 7,
        "stream": stream,
    }
    with live(tmp_path, policy_yaml(fake, on_failure="closed")) as srv:
        answer = srv.http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 502, answer.text
        error = answer.json()["error"]
        assert error["code"] == "upstream_error"
        assert "gpt-4o answered 500" in error["message"]
        assert "claude (anthropic) does not take 'seed'" in error["message"]
        assert [r.path for r in fake.received] == ["/v1/chat/completions"]  # claude: not called
        pinned = srv.http.post("/v1/chat/completions", json={**body, "model": "claude"})
    assert pinned.status_code == 400
    assert pinned.json()["error"]["param"] == "seed"
    assert pinned.json()["error"]["code"] == "unsupported_parameter"


@pytest.mark.parametrize("model", ["gpt-4o", "claude"])
def test_a_provider_refusing_its_key_is_not_retried_by_the_client(
    tmp_path: Path, fake: FakeProvider, model: str
) -> None:
    # A provider's 401 (a wrong or revoked key in Tiergate's environment) was a plain 502: the
    # OpenAI SDK sent the request three times, each one failing the same way.
    fake.reset(Behaviour(mode="status", status=401))
    body = {"model": model, "messages": [{"role": "user", "content": "HARD"}]}
    with live(tmp_path, policy_yaml(fake, on_failure="closed")) as srv:
        answer = srv.http.post("/v1/chat/completions", json=body)
        assert answer.status_code == 502, answer.text
        assert answer.headers["x-should-retry"] == "false"
        assert "answered 401" in answer.text or "AuthenticationError" in answer.text
        # The next model on the chain may have a key that works: it is still tried.
        fake.reset(Behaviour(mode="status", status=401, failing_path="/completions"))
        auto = srv.http.post("/v1/chat/completions", json={**body, "model": "auto"})
    assert auto.status_code == 200
    assert (auto.headers["x-tiergate-model"], auto.headers["x-tiergate-fallback"]) == (
        "claude",
        "closed->closed",
    )


def test_a_refused_key_after_a_failure_a_retry_may_fix_leaves_the_retry(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # gpt-4o cannot be reached (a retry may find it), then claude refuses its key: the answer
    # is gpt-4o's 502, which the client may retry, not claude's x-should-retry: false.
    fake.reset(Behaviour(mode="status", status=401, failing_path="/messages"))
    policy = policy_yaml(fake, on_failure="closed").replace(
        f"api_base: {fake.base_url}\n", f"api_base: http://127.0.0.1:{free_port()}/v1\n", 1
    )
    body = {"model": "auto", "messages": [{"role": "user", "content": "HARD"}]}
    with live(tmp_path, policy) as srv:
        answer = srv.http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 502, answer.text
    assert answer.json()["error"]["code"] == "upstream_unreachable"
    assert "x-should-retry" not in answer.headers
    assert [r.path for r in fake.received] == ["/v1/messages"]


async def _burst_hold(url: str, local: ScriptedLocal, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        body = {"model": "auto", "messages": [{"role": "user", "content": "easy"}]}
        first = asyncio.create_task(client.post("/v1/chat/completions", json=body))
        while local.gate.running == 0:
            await asyncio.sleep(0.01)
        rest = await asyncio.gather(
            *[client.post("/v1/chat/completions", json=body) for _ in range(n - 1)]
        )
        local.release.set()
        return [await first, *rest]


def test_full_queue_spills_to_closed(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()
    local = ScriptedLocal(queue_size=0)
    local.hold = True
    with live(tmp_path, policy_yaml(fake, queue_full="spill"), local_backend_obj=local) as srv:
        responses = asyncio.run(_burst_hold(srv.url, local, 3))
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert responses[0].headers["x-tiergate-tier"] == "local"
    for r in responses[1:]:
        assert r.headers["x-tiergate-tier"] == "closed"
        assert r.headers["x-tiergate-fallback"] == "local-full->closed"


async def _burst_long(url: str, local: ScriptedLocal, content: str) -> httpx.Response:
    # The local model's one slot held by a short request, then one of ``content``.
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        easy = {"model": "auto", "messages": [{"role": "user", "content": "easy"}]}
        first = asyncio.create_task(client.post("/v1/chat/completions", json=easy))
        while local.gate.running == 0:
            assert not first.done(), (await first).text
            await asyncio.sleep(0.01)
        body = {"model": "auto", "messages": [{"role": "user", "content": content}]}
        second = await client.post("/v1/chat/completions", json=body)
        local.release.set()
        assert (await first).status_code == 200
        return second


def test_a_full_queue_spills_only_to_a_closed_model_that_can_take_the_request(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A prompt within the local model's window (2048) and over gpt-4o's (1000) spilled to
    gpt-4o when the local queue was full, and gpt-4o's 400 context_length_exceeded reached the
    client: the spill skipped the hard constraints that every other chain is filtered by.
    It spills to the closed model that can take it (claude); with none, it is the full
    queue's 429, which a retry may get past, and nothing is sent."""
    long = "word " * 1000  # about 1,430 tokens by Tiergate's estimate, 1,250 by the fake's
    for claude_window in (200000, 1000):
        fake.reset(Behaviour(context_windows={"gpt-4o": 1000}))
        local = ScriptedLocal(queue_size=0)
        local.hold = True
        policy = _windows(fake, claude_window).replace(
            "context_window: 128000\n", "context_window: 1000\n"
        )
        with live(tmp_path, policy, local_backend_obj=local) as srv:
            answer = asyncio.run(_burst_long(srv.url, local, long))
        if claude_window > 1000:
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-tiergate-model"] == "claude"
            assert answer.headers["x-tiergate-fallback"] == "local-full->closed"
            assert [r.path for r in fake.received] == ["/v1/messages"]
        else:
            assert answer.status_code == 429, answer.text
            assert fake.received == []


def test_full_queue_rejects_with_retry_after(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()
    local = ScriptedLocal(queue_size=0)
    local.hold = True
    with live(tmp_path, policy_yaml(fake, queue_full="reject"), local_backend_obj=local) as srv:
        responses = asyncio.run(_burst_hold(srv.url, local, 2))
    assert responses[0].status_code == 200
    assert responses[1].status_code == 429
    assert responses[1].headers["retry-after"] == "1"
    assert responses[1].json()["error"]["code"] == "local_queue_full"
    assert fake.received == []


def test_closed_without_key_is_unavailable_and_policy_fallback_applies(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake.reset()
    monkeypatch.delenv("OPENAI_API_KEY")
    monkeypatch.delenv("ANTHROPIC_API_KEY")
    local = ScriptedLocal()
    with live(tmp_path, policy_yaml(fake), local_backend_obj=local) as srv:
        models = {m["id"]: m for m in srv.http.get("/v1/models").json()["data"]}
        assert models["gpt-4o"]["tiergate"]["available"] is False
        assert "OPENAI_API_KEY" in models["gpt-4o"]["tiergate"]["reason"]
        ready = srv.http.get("/readyz").json()
        assert ready["closed"]["gpt-4o"]["available"] is False
        raw = _client(srv.url).chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "HARD"}]
        )
        assert raw.headers["x-tiergate-tier"] == "local"
        assert raw.headers["x-tiergate-fallback"] == "closed->local"
    with live(tmp_path, policy_yaml(fake, on_failure="error"), local_backend_obj=local) as srv:
        with pytest.raises(openai.APIStatusError) as err:
            _client(srv.url).chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}]
            )
        assert err.value.status_code == 503
        assert err.value.body["code"] == "tier_unavailable"  # type: ignore[index]
        assert "OPENAI_API_KEY" in str(err.value)
    assert fake.received == []


def test_local_only_never_leaves_the_machine(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()
    local = ScriptedLocal(fail=True)
    with live(tmp_path, policy_yaml(fake, on_failure="closed"), local_backend_obj=local) as srv:
        with pytest.raises(openai.APIStatusError) as err:
            _client(srv.url).chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "HARD PII here"}]
            )
        assert err.value.status_code == 502
        assert "local-only" in str(err.value)
    assert fake.received == []


async def _mixed_burst(url: str, n: int) -> list[int]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        bodies: list[Any] = []
        for i in range(n):
            kind = i % 4
            if kind == 0:
                bodies.append({"model": "auto", "messages": [{"role": "user", "content": "HARD"}]})
            elif kind == 1:
                bodies.append({"model": "auto", "messages": [{"role": "user", "content": "hi"}]})
            elif kind == 2:
                bodies.append({"model": "missing", "messages": [{"role": "user", "content": "x"}]})
            else:
                bodies.append({"model": "auto"})
        responses = await asyncio.gather(
            *[client.post("/v1/chat/completions", json=b) for b in bodies]
        )
        return [r.status_code for r in responses]


def test_burst_gives_one_record_per_request(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()
    with live(tmp_path, policy_yaml(fake), local_backend_obj=ScriptedLocal(queue_size=64)) as srv:
        statuses = asyncio.run(_mixed_burst(srv.url, 40))
        store = srv.gateway.outcomes
        assert store.flush()
        assert sorted(set(statuses)) == [200, 400, 404]
        assert store.count() == 40
    assert len(fake.received) == 10


@pytest.mark.gguf
def test_client_disconnect_mid_stream_stops_local_generation(
    tmp_path: Path, fake: FakeProvider
) -> None:
    with live(tmp_path, policy_yaml(fake), gguf=True, socket=True) as srv:
        local = srv.gateway.local
        sock = socket.create_connection(("127.0.0.1", srv.port))
        body = (
            b'{"model": "local", "stream": true, "max_tokens": 400, "temperature": 0.8,'
            b' "messages": [{"role": "user", "content": "Write a very long story about a cat."}]}'
        )
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        received = b""
        while received.count(b"data: ") < 3:
            received += sock.recv(4096)
        sock.close()
        assert wait_for(lambda: local.gate.running == 0, timeout_s=30)
        store = srv.gateway.outcomes
        assert wait_for(lambda: store.count() == 1 and store.flush(), timeout_s=10)
        record = store.recent(1)[0]
        assert record["status"] == "aborted"
        assert record["completion_tokens"] < 400
        # The local model is free again: its slot is back and it answers the next request.
        assert local.gate.depth == 0
        reply = _client(srv.url).chat.completions.create(
            model="local", messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert reply.choices[0].message.content is not None


def test_closed_error_mid_stream_is_reported_and_recorded(
    tmp_path: Path, fake: FakeProvider
) -> None:
    fake.reset(Behaviour(mode="reset_mid_stream"))
    with live(tmp_path, policy_yaml(fake), local_backend_obj=ScriptedLocal()) as srv:
        with srv.http.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": "gpt-4o",
                "stream": True,
                "messages": [{"role": "user", "content": "x"}],
            },
        ) as response:
            lines = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert response.status_code == 200
        assert '"error"' in lines[-1]
        store = srv.gateway.outcomes
        assert wait_for(lambda: store.count() == 1 and store.flush())
        assert store.recent(1)[0]["status"] == "error"


async def _traffic_while_editing(url: str, holder: PolicyHolder, versions: list[str]) -> list[Any]:
    """Eight clients send requests while each of ``versions`` is written over the policy file in
    turn, and until the proxy has taken the last one (reloaded or refused it)."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        body = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}
        results: list[Any] = []
        done = asyncio.Event()

        async def worker() -> None:
            while not done.is_set() or len(results) < 200:
                results.append(await client.post("/v1/chat/completions", json=body))

        async def editor() -> None:
            try:
                for text in versions:
                    await asyncio.sleep(0.25)
                    seen = (holder.reloads, holder.reload_failures)
                    holder.path.write_text(text)
                    deadline = time.monotonic() + 10
                    while (holder.reloads, holder.reload_failures) == seen:
                        assert time.monotonic() < deadline, "the edit was never taken"
                        await asyncio.sleep(0.01)
                await asyncio.sleep(0.1)  # some traffic after the last edit
            finally:
                done.set()

        await asyncio.gather(editor(), *[worker() for _ in range(8)])
        return results


def test_hot_reload_under_traffic_keeps_serving(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()
    local = ScriptedLocal(queue_size=64)
    closed_everything = policy_yaml(fake, extra="# all closed\n").replace(
        "auto: {threshold: 0.5}", "auto: {threshold: 0.01}"
    )
    broken = policy_yaml(fake) + "rules: not-a-list\n"
    with live(tmp_path, policy_yaml(fake), local_backend_obj=local, policy_reload_s=0.05) as srv:
        holder = srv.gateway.policies
        first = holder.policy.digest
        responses = asyncio.run(
            _traffic_while_editing(srv.url, holder, [closed_everything, broken])
        )
        assert len(responses) >= 200
        assert {r.status_code for r in responses} == {200}
        versions = {r.headers["x-tiergate-policy-version"] for r in responses}
        tiers = {r.headers["x-tiergate-tier"] for r in responses}
        assert first in versions and len(versions) == 2
        assert tiers == {"local", "closed"}
        ready = srv.http.get("/readyz").json()
        assert ready["policy"]["version"] != first  # the last good edit still serves
        assert "rules" in ready["policy"]["last_reload_error"]
        assert holder.reload_failures == 1 and holder.reloads == 1
        metrics = srv.http.get("/metrics").text.splitlines()
        failures = [m for m in metrics if m.startswith("tiergate_policy_reload_failures_total")]
        assert len(failures) == 1 and failures[0].endswith(" 1.0")
        store = srv.gateway.outcomes
        assert store.flush() and store.count() == len(responses)


def test_policy_reload_waits_for_a_half_written_file(tmp_path: Path, fake: FakeProvider) -> None:
    """An editor that truncates and then writes is not caught half way and counted as a bad edit."""
    path = tmp_path / "policy.yaml"
    path.write_text(policy_yaml(fake))
    holder = PolicyHolder(path)
    first = holder.policy.digest
    edited = policy_yaml(fake).replace("auto: {threshold: 0.5}", "auto: {threshold: 0.01}")
    path.write_text("")  # truncated, the new text not written yet
    assert holder.check() is False
    with path.open("a") as handle:
        handle.write(edited[:40])  # half written
    assert holder.check() is False
    path.write_text(edited)
    assert holder.check() is False  # changed since the last look: wait for it to settle
    assert holder.check() is True and holder.policy.digest != first
    assert holder.reload_failures == 0 and holder.last_error is None
    assert holder.check() is False and holder.reloads == 1


def test_policy_reload_rereads_a_file_written_while_it_was_read(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_yaml(fake))
    holder = PolicyHolder(path)
    edited = policy_yaml(fake).replace("auto: {threshold: 0.5}", "auto: {threshold: 0.01}")
    path.write_text(edited[:40])  # an editor's first write, seen on two checks in a row
    assert holder.check() is False
    real = gateway_module.load_policy

    def read_then_written(p: Path) -> object:
        try:
            return real(p)  # refused: half a policy
        finally:
            path.write_text(edited)  # the rest lands while the proxy was reading

    monkeypatch.setattr(gateway_module, "load_policy", read_then_written)
    assert holder.check() is False
    monkeypatch.setattr(gateway_module, "load_policy", real)
    assert holder.reload_failures == 0 and holder.last_error is None  # not counted as bad
    assert holder.check() is True and holder.reloads == 1


def test_policy_reload_follows_the_kubelet_updating_a_configmap(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """The kubelet updates a mounted ConfigMap by writing its files into a new folder and
    swapping the ``..data`` link to it; each key is a link through ``..data``. An edit to the
    chart's ``policy.existingConfigMap``, which rolls no pod, reaches the routers this way."""

    def publish(folder: str, text: str) -> None:
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "policy.yaml").write_text(text)
        (tmp_path / "..data_tmp").symlink_to(folder)
        (tmp_path / "..data_tmp").replace(tmp_path / "..data")

    publish("..2026_12_07_01", policy_yaml(fake))
    (tmp_path / "policy.yaml").symlink_to("..data/policy.yaml")
    holder = PolicyHolder(tmp_path / "policy.yaml")
    first = holder.policy.digest
    edited = policy_yaml(fake).replace("auto: {threshold: 0.5}", "auto: {threshold: 0.01}")
    publish("..2026_12_07_02", edited)
    shutil.rmtree(tmp_path / "..2026_12_07_01")
    assert holder.check() is False and holder.check() is True
    assert holder.policy.digest != first and holder.last_error is None


def test_policy_reload_refuses_a_settled_bad_edit_and_a_missing_file(
    tmp_path: Path, fake: FakeProvider
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(policy_yaml(fake))
    holder = PolicyHolder(path)
    good = holder.policy.digest
    path.write_text(policy_yaml(fake) + "rules: not-a-list\n")
    assert holder.check() is False and holder.reload_failures == 0
    assert holder.check() is False and holder.reload_failures == 1
    assert holder.last_error is not None and "rules" in holder.last_error
    assert holder.check() is False and holder.reload_failures == 1  # counted once, not per check
    path.unlink()
    assert holder.check() is False and holder.check() is False
    assert holder.reload_failures == 2 and "cannot read" in (holder.last_error or "")
    assert holder.policy.digest == good  # the last good policy serves throughout
    replacement = tmp_path / "policy.yaml.new"  # an atomic replace, as kubectl and editors do
    replacement.write_text(policy_yaml(fake))
    replacement.replace(path)
    assert holder.check() is False and holder.check() is True
    assert holder.last_error is None and holder.policy.digest == good


def test_privacy_fail_closed_end_to_end(tmp_path: Path, fake: FakeProvider) -> None:
    """PII is local-only: served locally, never sent out, not stored (store_prompts: none)."""
    fake.reset()
    local = ScriptedLocal()
    with live(
        tmp_path,
        policy_yaml(fake, on_failure="closed", store_prompts="full"),
        local_backend_obj=local,
    ) as srv:
        raw = _client(srv.url).chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "HARD PII: call me"}]
        )
        assert raw.headers["x-tiergate-tier"] == "local"
        assert raw.headers["x-tiergate-rule"] == "pii-stays-local"
        # Pinning a closed model does not beat the privacy rule.
        pinned = _client(srv.url).chat.completions.with_raw_response.create(
            model="gpt-4o", messages=[{"role": "user", "content": "PII again"}]
        )
        assert pinned.headers["x-tiergate-tier"] == "local"
        # Local down: a clear 502, still nothing sent out.
        local.fail = True
        with pytest.raises(openai.APIStatusError) as err:
            _client(srv.url).chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "PII once more"}]
            )
        assert err.value.status_code == 502
        store = srv.gateway.outcomes
        assert store.flush()
        rows = store.recent(10)
        assert len(rows) == 3 and all(r["tier"] == "local" for r in rows)
        # The policy stores prompts ('full'), but a local_only rule keeps them only when it
        # says so explicitly, and the test policy's PII rule does not.
        assert [r["prompt"] for r in rows] == [None, None, None]
    assert fake.received == []


class _ThreadRecordingScorer:
    """A scorer that notes the thread each request is scored on."""

    name, version = "thread-recorder", "t1"

    def __init__(self) -> None:
        self.threads: list[str] = []

    def analyze(self, text: str, *, has_tools: bool = False) -> Any:
        import threading

        from router.scoring import Analysis

        self.threads.append(threading.current_thread().name)
        return Analysis(score=0.1)


def test_long_prompts_are_scored_off_the_event_loop(tmp_path: Path, fake: FakeProvider) -> None:
    from router.gateway import OFFLOAD_SCORING_CHARS

    scorer = _ThreadRecordingScorer()
    fake.reset()
    with live(tmp_path, policy_yaml(fake), scorer=scorer, local_backend_obj=ScriptedLocal()) as srv:
        for text in ("short", "x " * OFFLOAD_SCORING_CHARS):
            response = srv.http.post(
                "/v1/chat/completions",
                json={"model": "auto", "messages": [{"role": "user", "content": text}]},
            )
            assert response.status_code == 200
        loop_thread = srv.thread.name
    assert scorer.threads[0] == loop_thread
    assert scorer.threads[1] != loop_thread


@pytest.mark.parametrize("front", ["chat", "messages"])
def test_a_large_image_is_scored_off_the_event_loop(
    tmp_path: Path, fake: FakeProvider, front: str
) -> None:
    """An image's base64 yields no text to the scan (ded5851), so a request holding one
    looked short: its decision (three passes over the payload: the window check, the PII
    scan, each front's body) ran on the event loop, about 65 ms for 8 MB, every other request
    waiting. What a payload costs to pass over counts toward offloading, as text does."""
    import base64

    from router.gateway import OFFLOAD_SCORING_CHARS

    data = base64.b64encode(bytes(range(256)) * (OFFLOAD_SCORING_CHARS // 64)).decode()
    if front == "chat":
        url = "/v1/chat/completions"
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + data}}
    else:
        url = "/v1/messages"
        source = {"type": "base64", "media_type": "image/png", "data": data}
        image = {"type": "image", "source": source}
    content = [image, {"type": "text", "text": "What is this?"}]
    scorer = _ThreadRecordingScorer()
    fake.reset()
    with live(tmp_path, policy_yaml(fake), scorer=scorer, local_backend_obj=ScriptedLocal()) as srv:
        response = srv.http.post(
            url,
            json={
                "model": "auto",
                "max_tokens": 16,
                "messages": [{"role": "user", "content": content}],
            },
        )
        assert response.status_code < 500, response.text
        loop_thread = srv.thread.name
    assert scorer.threads and loop_thread not in scorer.threads


def test_text_no_model_can_take_is_refused_before_it_is_read(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A body near the size cap costs one pass of len, not a scan: with every window declared,
    text beyond the largest one is a 400 before any signal is read; nothing is sent."""
    from router.gateway import MAX_CHARS_PER_TOKEN
    from router.scoring import Analysis

    class CountingScorer:
        name, version = "counter", "c1"
        calls = 0

        def analyze(self, text: str, *, has_tools: bool = False) -> Analysis:
            CountingScorer.calls += 1
            return Analysis(score=0.9)

    fake.reset()
    policy = policy_yaml(fake)
    for model in ("openai/gpt-4o", "anthropic/claude-3-5-sonnet-20241022"):
        policy = policy.replace(
            f"litellm_model: {model}\n", f"litellm_model: {model}\n    context_window: 4000\n"
        )
    with live(tmp_path, policy, scorer=CountingScorer(), local_backend_obj=ScriptedLocal()) as srv:
        fits = "word " * 2000  # 10,000 characters: about 2,900 tokens, within 4,000
        too_long = "x" * (4000 * MAX_CHARS_PER_TOKEN + 1)
        ok = srv.http.post(
            "/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": fits}]},
        )
        assert CountingScorer.calls == 1
        refused = srv.http.post(
            "/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": too_long}]},
        )
        # A Response's prompt is its input: the 400 named messages, a field it never sent.
        response = srv.http.post("/v1/responses", json={"model": "auto", "input": too_long})
    assert ok.status_code == 200
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "context_length_exceeded"
    assert refused.json()["error"]["param"] == "messages"
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"
    assert CountingScorer.calls == 1  # the long ones were never read
    assert len(fake.received) == 1


def _fetched(page: str) -> list[dict[str, Any]]:
    """A /v1/messages history in which Claude fetched ``page`` with its web_fetch tool."""
    use = {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_fetch", "input": {}}
    source = {"type": "text", "media_type": "text/plain", "data": page}
    fetched = {"type": "web_fetch_result", "content": {"type": "document", "source": source}}
    result = {"type": "web_fetch_tool_result", "tool_use_id": use["id"], "content": fetched}
    return [
        {"role": "user", "content": "Fetch it."},
        {"role": "assistant", "content": [use, result, {"type": "text", "text": "Fetched."}]},
        {"role": "user", "content": "Summarise it."},
    ]


def test_server_tool_blocks_no_model_can_take_are_refused_as_text_is(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A /v1/messages history whose server-tool blocks (which the chat translation drops, and
    the prompt estimate counts) hold more text than any window can take is refused before it is
    read, as the same text in a plain turn is. It passed that check, was read, and on ``auto``
    was refused for its blocks (\"no closed model can either\"), not for its size."""
    from router.gateway import MAX_CHARS_PER_TOKEN

    fake.reset()
    claude_api = fake.base_url.removesuffix("/v1") + "\n"  # a Claude on Anthropic's own API
    policy = _windows(fake, 100000).replace(claude_api, "https://api.anthropic.com\n")
    page = "word " * (128000 * MAX_CHARS_PER_TOKEN // 5 + 1)
    plain = [{"role": "user", "content": "Fetch it."}, {"role": "assistant", "content": page}]
    with live(tmp_path, policy) as srv:
        said = [
            srv.http.post(
                "/v1/messages", json={"model": model, "max_tokens": 10, "messages": history}
            )
            for history in ([*plain, {"role": "user", "content": "Go."}], _fetched(page))
            for model in ("auto", "claude")
        ]
    assert all(answer.status_code == 400 for answer in said)
    beyond = "more than any model's context window (128000 tokens) can take"
    assert [beyond in answer.json()["error"]["message"] for answer in said] == [True] * 4, said[
        2
    ].text
    assert fake.received == []


def test_closing_a_metered_stream_closes_the_backend_at_once() -> None:
    """When the client goes, the backend's stream is closed before the request is recorded
    (the local model frees its slot, the provider connection is released), not whenever the
    garbage collector finalises a generator."""
    from router.gateway import RequestContext, _Metered

    closed: list[bool] = []

    async def backend() -> AsyncIterator[dict[str, Any]]:
        try:
            for i in range(100):
                yield {"choices": [{"delta": {"content": f"w{i} "}}]}
        finally:
            closed.append(True)

    async def scenario() -> None:
        ctx = RequestContext(request_id="r", tenant="t", started=0.0, stream=True)
        source = backend()
        first = await anext(source)
        metered = _Metered(ctx, [first], source)
        await anext(metered)
        await anext(metered)
        await metered.aclose()
        assert closed == [True]
        assert ctx.streamed_chunks == 2
        unread = backend()
        await anext(unread)  # opened, as the gateway opens it, and closed before it is read
        await _Metered(ctx, [], unread).aclose()
        assert closed == [True, True]

    asyncio.run(scenario())


@pytest.mark.parametrize("tier", [pytest.param("local", marks=pytest.mark.gguf), "closed"])
def test_a_stream_closed_unread_stops_its_model_and_is_recorded_at_once(
    tmp_path: Path, fake: FakeProvider, tier: str
) -> None:
    """A front may close a stream before reading a chunk of it (its client left as it opened).
    Closing an async generator before its first step runs none of its body: the request was
    not recorded and the model went on (the real model generating in its slot, the provider
    streaming and billing) until the garbage collector finalised the generators. It stops
    and is recorded as the stream is closed, before anything else runs."""
    fake.reset(Behaviour(chunk_delay_s=0.05, text=" ".join(["word"] * 40)))
    content = "Write a long story about a cat." if tier == "local" else "HARD one"
    with live(tmp_path, policy_yaml(fake), gguf=tier == "local") as srv:
        gateway, store = srv.gateway, srv.gateway.outcomes

        async def scenario() -> tuple[bool, int, StreamAnswer]:
            body = {"model": "auto", "stream": True, "max_tokens": 300}
            body["messages"] = [{"role": "user", "content": content}]
            answer = await gateway.serve(Call(body=body, principal=CALLER, tenant="acme"))
            assert isinstance(answer, StreamAnswer)
            await answer.chunks.aclose()
            llm = getattr(gateway.local, "_llm", None)  # the real model, told to stop
            stopped = tier == "closed" or llm.cancel is None or llm.cancel.is_set()
            recorded = store.count() if store.flush(5) else -1  # blocks: nothing else runs
            await asyncio.sleep(0.5)  # while the answer is still held
            return stopped, recorded, answer

        stopped, recorded, _ = srv.run(scenario)
        assert recorded == 1
        (record,) = store.recent(1)
        assert (record["status"], record["http_status"], record["tier"]) == (
            "aborted",
            499,
            tier,
        )
        assert stopped
        if tier == "local":
            assert wait_for(lambda: gateway.local.gate.running == 0, timeout_s=5)
        else:
            assert fake.broken_streams == 1 and fake.sent_chunks < 40


# -- Gateway.serve, driven directly ------------------------------------------------------------

PRICES = {"gpt-4o": {"input_cost_per_token": 2.5e-6, "output_cost_per_token": 1e-5}}
CALLER = Principal(tenant="acme", permissions=frozenset(), key_id="test")


class Serving:
    """A gateway built from real parts (policy file, SQLite store, the fake provider over HTTP,
    the scripted local tier), and every outcome record it built."""

    def __init__(self, gateway: Gateway, store: SQLiteOutcomeStore, http: OpenAIHTTP) -> None:
        self.gateway = gateway
        self.store = store
        self.http = http
        self.records: list[OutcomeRecord] = []

    def call(self, content: str, front: str = "chat", **body: Any) -> Call:
        """A chat call (through ``front``) from a tenant key without ``pin_closed``."""
        body = {"model": "auto", "messages": [{"role": "user", "content": content}], **body}
        return Call(body=body, principal=CALLER, tenant="acme", front=front)

    async def stored(self) -> list[dict[str, Any]]:
        """The records as the outcome store holds them."""
        assert await asyncio.to_thread(self.store.flush, 10)
        return self.store.recent(50)


@asynccontextmanager
async def serving(
    tmp_path: Path, fake: FakeProvider, local: ScriptedStream, **policy: Any
) -> AsyncIterator[Serving]:
    text = policy_yaml(fake, **policy).replace(
        "  auto-best: {threshold: 0.05}\n",
        "  auto-best: {threshold: 0.05}\n  auto-cascade: {cascade: true}\n",
    )
    (tmp_path / "policy.yaml").write_text(text)
    store = SQLiteOutcomeStore(tmp_path / "outcomes.db")
    store.start()
    http = OpenAIHTTP(timeout_s=5)
    holder: list[OutcomeRecord] = []
    gateway = Gateway(
        policy=PolicyHolder(tmp_path / "policy.yaml"),
        scorer=KeywordScorer(),
        local=local,
        closed=ClosedBackend(http, timeout_s=5),
        costs=CostBook(PRICES),
        outcomes=store,
        limiter=RateLimiter(rpm=None, tpm=None),
        reserve_tokens=256,
        local_gate=local.gate,
        on_record=holder.append,
    )
    served = Serving(gateway, store, http)
    served.records = holder
    try:
        yield served
    finally:
        await gateway.aclose()
        await http.aclose()
        await asyncio.to_thread(store.close)


async def _drain(answer: StreamAnswer) -> list[dict[str, Any]]:
    return [chunk async for chunk in answer.chunks]


def test_serve_answers_and_records_once(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()

    async def scenario() -> None:
        async with serving(tmp_path, fake, ScriptedStream()) as srv:
            easy = await srv.gateway.serve(srv.call("easy"))
            hard = await srv.gateway.serve(srv.call("HARD one"))
            assert isinstance(easy, Answer) and isinstance(hard, Answer)
            assert easy.body["choices"][0]["message"]["content"] == "w0 w1 w2 "
            assert easy.headers["x-tiergate-tier"] == "local"
            assert hard.headers["x-tiergate-model"] == "gpt-4o"
            assert [r.status for r in srv.records] == ["ok", "ok"]
            assert [r.id for r in srv.records] == [
                easy.headers["x-request-id"],
                hard.headers["x-request-id"],
            ]
            assert srv.records[0].front == "chat"
            assert srv.records[1].cost_usd > 0  # the closed answer is charged
            assert len(await srv.stored()) == 2

    asyncio.run(scenario())


def test_a_stream_ends_with_its_usage_and_is_recorded_once(
    tmp_path: Path, fake: FakeProvider
) -> None:
    fake.reset()

    async def scenario() -> None:
        async with serving(tmp_path, fake, ScriptedStream()) as srv:
            for content in ("easy", "HARD one"):
                answer = await srv.gateway.serve(srv.call(content, stream=True))
                assert isinstance(answer, StreamAnswer)
                assert srv.records == []  # recorded when the stream ends, not before
                chunks = await _drain(answer)
                assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"]
                # One stream, one id and model, the usage chunk included (as OpenAI's).
                assert len({(c["id"], c["model"]) for c in chunks}) == 1, chunks
                assert len(srv.records) == 1 and srv.records[0].status == "ok"
                assert srv.records[0].stream and srv.records[0].ttft_ms is not None
                srv.records.clear()

    asyncio.run(scenario())


async def _left_after(srv: Serving, content: str, words: int) -> OutcomeRecord:
    """The record of a closed stream whose client read ``words`` chunks past its opening and
    left, before the provider's usage."""
    answer = await srv.gateway.serve(srv.call(content, stream=True))
    assert isinstance(answer, StreamAnswer) and answer.headers["x-tiergate-tier"] == "closed"
    for _ in range(words + 1):
        await anext(answer.chunks)
    await answer.chunks.aclose()
    assert len(srv.records) == 1 and srv.records[0].status == "aborted"
    return srv.records.pop()


def test_a_stream_left_before_its_usage_is_charged_the_prompt_as_its_provider_bills(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """OpenAI reports a stream's usage in its last chunk: a client that left before it was
    charged Tiergate's estimate of the prompt (3.5 characters a token), and a prompt of text no
    tokenizer merges ("a\\n" repeated) a third of what the provider billed. Counted with the
    model's tokenizer, it is charged what a stream read to its end is (the fake bills a byte
    a token, as tiktoken counts that text); and the answer text streamed, likewise."""
    content = "HARD " + "a\n" * 3000
    fake.reset(Behaviour(bill_bytes=True, text="a\n" * 300, piece_chars=200))

    async def scenario() -> None:
        async with serving(tmp_path, fake, ScriptedStream()) as srv:
            await _drain(await srv.gateway.serve(srv.call(content, stream=True)))
            billed = srv.records.pop().prompt_tokens  # the provider's own count
            assert billed > 6000
            left = await _left_after(srv, content, words=3)
            assert abs(left.prompt_tokens - billed) <= billed * 0.01, (left.prompt_tokens, billed)
            assert left.completion_tokens == 600  # tiktoken's count of the 600 characters read
            assert left.cost_usd > 0.9 * srv.gateway.costs.call_cost(
                srv.gateway.policy.models["gpt-4o"], Usage(prompt_tokens=billed)
            )

    asyncio.run(scenario())


def test_a_prompt_that_takes_too_long_to_count_is_charged_at_its_bound(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Counting a prompt of megabytes takes a second or more: past ``COUNT_TIMEOUT_S`` the
    request is recorded with its prompt at the most it can be (``Signals.prompt_held``), not
    at the estimate, which would reopen the gap the count closes."""
    monkeypatch.setattr(gateway_module, "COUNT_TIMEOUT_S", 0.0, raising=False)
    content = "HARD " + "hello world " * 500  # 1,000 tokens counted, 6,000 at its bound
    fake.reset(Behaviour(bill_bytes=True))

    async def scenario() -> None:
        async with serving(tmp_path, fake, ScriptedStream()) as srv:
            left = await _left_after(srv, content, words=1)
            assert left.prompt_tokens == left.signals["prompt_held"] > 6000

    asyncio.run(scenario())


def test_time_to_first_token_waits_for_a_token_not_the_opening_chunk(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream's first chunk that only names the role (OpenAI's opening chunk, and what a
    native stream's response.created or message_start become, sent before any token) set
    ttft_ms: the record said 0 ms where the first token came 5 s later."""
    fake.reset()
    now = [0.0]

    class Clock:  # the gateway's clock, moved by the test between two chunks
        def __getattr__(self, name: str) -> Any:
            return getattr(time, name)

        def perf_counter(self) -> float:
            return now[0]

    monkeypatch.setattr(gateway_module, "time", Clock())

    async def scenario() -> None:
        async with serving(tmp_path, fake, ScriptedStream()) as srv:
            call = srv.call("HARD one", stream=True)
            now[0] = call.started
            answer = await srv.gateway.serve(call)
            assert isinstance(answer, StreamAnswer)
            opening = await anext(answer.chunks)
            assert opening["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            now[0] += 5.0  # the first token comes 5 s after the opening chunk
            rest = await _drain(answer)
            assert rest[0]["choices"][0]["delta"]["content"]
            (record,) = srv.records
            assert record.ttft_ms is not None and record.ttft_ms >= 5000

    asyncio.run(scenario())


def test_a_refused_request_is_recorded_once(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()

    async def scenario() -> None:
        async with serving(tmp_path, fake, ScriptedStream()) as srv:
            pinned = srv.call("easy", model="gpt-4o")  # this key may not pin a closed model
            with pytest.raises(PermissionDeniedError) as err:
                await srv.gateway.serve(pinned)
            assert err.value.headers["x-request-id"] == pinned.request_id
            unread = Call(body={}, principal=CALLER, tenant="acme", refused=BadRequestError("x"))
            with pytest.raises(BadRequestError):
                await srv.gateway.serve(unread)
            assert [(r.status, r.http_status) for r in srv.records] == [
                ("error", 403),
                ("error", 400),
            ]
            assert fake.received == []

    asyncio.run(scenario())


def test_a_failed_local_answer_falls_back_and_is_recorded_once(
    tmp_path: Path, fake: FakeProvider
) -> None:
    fake.reset()
    local = ScriptedStream()
    local.mode = "fail"

    async def scenario() -> None:
        async with serving(tmp_path, fake, local, on_failure="closed") as srv:
            answer = await srv.gateway.serve(srv.call("easy"))
            assert isinstance(answer, Answer)
            assert answer.headers["x-tiergate-fallback"] == "local->closed"
            assert len(srv.records) == 1
            assert (srv.records[0].model, srv.records[0].fallback) == ("gpt-4o", "local->closed")

    asyncio.run(scenario())


def test_a_client_that_leaves_is_recorded_once_as_aborted(
    tmp_path: Path, fake: FakeProvider
) -> None:
    fake.reset()
    local = ScriptedStream()
    local.mode = "hold"

    async def gone() -> bool:
        return True

    async def scenario() -> None:
        async with serving(tmp_path, fake, local) as srv:
            call = Call(
                body=srv.call("easy").body, principal=CALLER, tenant="acme", disconnected=gone
            )
            with pytest.raises(ClientDisconnected):
                await srv.gateway.serve(call)
            assert local.cancelled == 1  # the generation was stopped
            assert [(r.status, r.http_status) for r in srv.records] == [("aborted", 499)]

    asyncio.run(scenario())


def test_a_stream_whose_client_leaves_while_queued_gives_up_its_place(
    tmp_path: Path, fake: FakeProvider
) -> None:
    fake.reset()
    local = ScriptedStream(queue_size=1)

    async def gone() -> bool:
        return True

    async def scenario() -> None:
        async with serving(tmp_path, fake, local) as srv:
            await local.gate.acquire()  # a long generation holds the local slot
            call = Call(
                body=srv.call("easy", stream=True).body,
                principal=CALLER,
                tenant="acme",
                disconnected=gone,
            )
            with pytest.raises(ClientDisconnected):
                await asyncio.wait_for(srv.gateway.serve(call), timeout=5)
            # Its place in the queue is free at once, not when the slot comes round to it.
            assert (local.gate.waiting, local.calls) == (0, 1)
            assert [(r.status, r.http_status) for r in srv.records] == [("aborted", 499)]
            local.gate.release()

    asyncio.run(scenario())


def test_an_aborted_stream_is_recorded_once_and_charged(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()
    local = ScriptedStream(words=50)

    async def scenario() -> None:
        async with serving(tmp_path, fake, local) as srv:
            answer = await srv.gateway.serve(srv.call("easy", stream=True))
            assert isinstance(answer, StreamAnswer)
            await anext(answer.chunks)
            await anext(answer.chunks)
            await answer.chunks.aclose()
            assert local.cancelled == 1 and local.gate.depth == 0
            assert len(srv.records) == 1
            record = srv.records[0]
            assert (record.status, record.http_status) == ("aborted", 499)
            # Estimated from the two pieces streamed ("w0 w1 "): the local model counts its
            # tokens once it has stopped, after the record is written (ScriptedLocal).
            assert 2 <= record.completion_tokens <= 3

    asyncio.run(scenario())


def test_an_exhausted_chain_is_one_error_and_one_record(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset(Behaviour(mode="status", status=500))
    local = ScriptedStream()
    local.mode = "fail"

    async def scenario() -> None:
        async with serving(tmp_path, fake, local, on_failure="closed") as srv:
            for stream in (False, True):
                with pytest.raises(BackendError) as err:
                    await srv.gateway.serve(srv.call("easy", stream=stream))
                assert err.value.status_code == 502
                assert "x-request-id" in err.value.headers
            assert [(r.status, r.http_status) for r in srv.records] == [("error", 502)] * 2

    asyncio.run(scenario())


def test_a_front_whose_translation_fails_mid_stream_is_recorded_as_an_error(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # A front's translation that fails after its first event is the server's error (500), not
    # a client that left (499); the client gets the front's error event.
    fake.reset()

    def failing(
        chunks: AsyncGenerator[dict[str, Any], None], _: object
    ) -> AsyncGenerator[dict[str, Any], None]:
        async def translate(
            first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]]
        ) -> AsyncIterator[dict[str, Any]]:
            yield {"type": "message_start"}
            await anext(rest)
            raise RuntimeError("cannot translate this chunk")

        return native_or(chunks, translate)

    async def scenario() -> None:
        async with serving(tmp_path, fake, ScriptedStream(words=5)) as srv:
            answer = await srv.gateway.serve(srv.call("easy", "messages", stream=True))
            assert isinstance(answer, StreamAnswer)
            framed = [
                part
                async for part in _event_sse(
                    failing(answer.chunks, None), messages.error_event, answer.request_id
                )
            ]
            assert framed[0].startswith(b"event: message_start")
            assert framed[-1].startswith(b"event: error")
            assert b'"api_error"' in framed[-1]
            assert [(r.status, r.http_status, r.front) for r in srv.records] == [
                ("error", 500, "messages")
            ]

    asyncio.run(scenario())


def test_a_chat_stream_that_fails_with_a_defect_ends_in_an_error_event(
    tmp_path: Path, fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    # Not a Tiergate error (a bug, say) after the first chunk: the status line has gone, so
    # the client gets an error envelope as the last event and no [DONE]; the record is a 500.
    # It is logged once (the gateway and the framing each logged it).
    fake.reset()
    local = ScriptedStream(words=5)
    local.mode = "defect"

    async def scenario() -> None:
        async with serving(tmp_path, fake, local) as srv:
            answer = await srv.gateway.serve(srv.call("easy", stream=True))
            assert isinstance(answer, StreamAnswer)
            framed = [part async for part in _sse(answer, include_usage=False)]
            assert b'"content":"w0 "' in framed[0]
            assert json.loads(framed[-1].removeprefix(b"data: "))["error"]["type"] == (
                "server_error"
            )
            assert b"[DONE]" not in b"".join(framed)
            assert [(r.status, r.http_status) for r in srv.records] == [("error", 500)]
            logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert logged == [f"request {answer.request_id} failed"]

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())


class UnframeableStream(ScriptedStream):
    """A local tier whose second chunk holds a value JSON has no form for: a chunk Tiergate
    cannot frame, as a defect of its own would leave one."""

    async def stream(
        self, model: ModelLike, body: dict[str, Any], usage: Usage
    ) -> AsyncIterator[dict[str, Any]]:
        chunks = super().stream(model, body, usage)
        try:
            async for chunk in chunks:
                if chunk["choices"][0]["delta"].get("content") == "w1 ":
                    chunk["choices"][0]["note"] = b"\x00"
                yield chunk
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]


@pytest.mark.parametrize("front", ["chat", "messages"])
def test_a_stream_tiergate_cannot_frame_is_recorded_as_its_error(
    tmp_path: Path, fake: FakeProvider, front: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A chunk, or a front's event, that cannot be written as SSE is Tiergate's failure, not
    the client's: the client got the error event, and the record said a client that left
    (aborted, 499). The framing passes the error to the stream, as a failed translation
    does, and the record says the 500 it is. It is logged once, with the request's id, by
    the request's life that records it (the framing logged it a second time, without)."""
    fake.reset()

    async def translate(
        first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        yield {"type": "message_start", "message": {"id": b"\x00"}}

    async def scenario() -> None:
        async with serving(tmp_path, fake, UnframeableStream(words=5)) as srv:
            answer = await srv.gateway.serve(srv.call("easy", front, stream=True))
            assert isinstance(answer, StreamAnswer)
            if front == "chat":
                framed = [part async for part in _sse(answer, include_usage=False)]
                assert b'"content":"w0 "' in framed[0] and b"server_error" in framed[-1]
            else:
                events = native_or(answer.chunks, translate)
                framed = [
                    part
                    async for part in _event_sse(events, messages.error_event, answer.request_id)
                ]
                assert framed == [framed[-1]] and framed[-1].startswith(b"event: error")
            assert [(r.status, r.http_status, r.front) for r in srv.records] == [
                ("error", 500, front)
            ]
            logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            assert logged == [f"request {answer.request_id} failed"]

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())


@pytest.mark.parametrize("front", ["messages", "responses"])
@pytest.mark.parametrize(
    ("fails", "recorded"),
    [
        ("not", ("ok", 200)),
        ("translation", ("error", 500)),
        ("tiergate", ("error", 502)),
        ("framing", ("error", 500)),
        ("client", ("aborted", 499)),
    ],
)
def test_a_front_s_last_events_are_recorded_as_the_client_saw_them(
    tmp_path: Path,
    fake: FakeProvider,
    caplog: pytest.LogCaptureFixture,
    *,
    front: str,
    fails: str,
    recorded: tuple[str, int],
) -> None:
    """A front's last events are made after the chat stream has ended (litellm's adapters
    write ``message_stop``, ``response.completed`` then). A failure to translate or frame them
    gave the client an error event, but the request's life had ended and recorded it ``ok``,
    200. The life now waits at the end of its chunks until the front's events are framed: one
    record, of the error the client got (a defect logged once, by the framing), or of a
    client that left before them."""
    fake.reset()
    error_event = messages.error_event if front == "messages" else responses.error_event
    ended = asyncio.Event()

    async def translate(
        first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        yield {"type": "message_start", "message": {"id": "msg_1"}}
        async for _ in rest:
            pass
        ended.set()
        if fails == "client":
            await asyncio.sleep(60)  # the client leaves here: the server cancels the response
        if fails == "translation":
            raise RuntimeError("the translation broke at the end")
        if fails == "tiergate":
            raise UpstreamBadResponseError("the last chunk made no sense")
        yield {"type": "message_stop", "note": b"\x00" if fails == "framing" else "end"}

    async def scenario() -> None:
        async with serving(tmp_path, fake, ScriptedStream(words=5)) as srv:
            answer = await srv.gateway.serve(srv.call("easy", front, stream=True))
            assert isinstance(answer, StreamAnswer)
            sse = _event_sse(native_or(answer.chunks, translate), error_event, answer.request_id)
            framed = [await anext(sse)]
            if fails == "client":  # it leaves once the chat stream has ended
                reading = asyncio.ensure_future(anext(sse))
                await ended.wait()
                reading.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await reading
            else:
                framed += [part async for part in sse]
            assert framed[0].startswith(b"event: message_start")
            if fails == "not":
                assert framed[-1].startswith(b"event: message_stop")
            elif fails != "client":
                assert framed[-1].startswith(b"event: error")
            assert [(r.status, r.http_status, r.front) for r in srv.records] == [(*recorded, front)]
            logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
            defect = fails in ("translation", "framing")
            assert logged == ([f"request {answer.request_id} failed"] if defect else [])

    with caplog.at_level(logging.ERROR):
        asyncio.run(scenario())


@pytest.mark.parametrize("front", ["messages", "responses"])
def test_a_last_event_of_litellm_s_adapters_that_cannot_be_framed_is_an_error(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch, front: str
) -> None:
    """As the fronts serve a stream: litellm's adapters make ``message_stop`` and
    ``response.completed`` once the chat stream has ended. One that cannot be framed ended the
    client's stream in an error event, and the request was recorded ``ok``, 200."""
    fake.reset()
    last = "message_stop" if front == "messages" else "response.completed"
    framing = api_module._event

    def event(value: dict[str, Any]) -> bytes:
        if value.get("type") == last:
            raise ValueError(f"cannot frame {last}")
        return framing(value)

    monkeypatch.setattr(api_module, "_event", event)
    module = messages if front == "messages" else responses
    asked = {"model": "auto", "max_tokens": 16, "messages": [{"role": "user", "content": "easy"}]}
    _, translation = (
        messages.to_chat(asked, "req_1")
        if front == "messages"
        else responses.to_chat({"model": "auto", "input": "easy"}, "req_1")
    )

    async def scenario() -> None:
        async with serving(tmp_path, fake, ScriptedStream(words=5)) as srv:
            answer = await srv.gateway.serve(srv.call("easy", front, stream=True))
            assert isinstance(answer, StreamAnswer)
            events = module.events(answer.chunks, translation, 0)
            framed = [
                part async for part in _event_sse(events, module.error_event, answer.request_id)
            ]
            assert framed[-1].startswith(b"event: error")
            assert [(r.status, r.http_status, r.front) for r in srv.records] == [
                ("error", 500, front)
            ]

    asyncio.run(scenario())


@pytest.mark.parametrize("ends", ["cancelled", "timed_out"])
def test_a_stream_whose_close_hangs_is_still_recorded(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch, ends: str
) -> None:
    """The life closes the model's stream before it records the request. A close that hung
    held the record, and the request's token and budget holds, for as long; cancelled (the
    server stopping its requests, say), it skipped them. The close is given
    ``STREAM_CLOSE_TIMEOUT_S``, and the record is written however it ends."""
    fake.reset()
    limit = 0.2 if ends == "timed_out" else 60.0
    monkeypatch.setattr(gateway_module, "STREAM_CLOSE_TIMEOUT_S", limit, raising=False)
    local = ScriptedStream(words=5, mode="hang_close")

    async def scenario() -> None:
        async with serving(tmp_path, fake, local) as srv:
            answer = await srv.gateway.serve(srv.call("easy", stream=True))
            assert isinstance(answer, StreamAnswer)
            await anext(answer.chunks)
            closing = asyncio.ensure_future(answer.chunks.aclose())
            if ends == "cancelled":
                await asyncio.sleep(0.2)
                assert not closing.done()  # the model's stream is still closing
                closing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(closing, 5)
            assert [(r.status, r.http_status) for r in srv.records] == [("aborted", 499)]

    asyncio.run(scenario())


def test_personal_data_only_in_a_native_request_keeps_it_local(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # A Responses ``prompt``'s variables are dropped by the chat translation but passed on to
    # an OpenAI model as sent: the privacy rule must see them.
    fake.reset()
    sent = {
        "model": "gpt-4o",
        "input": "Summarise the customer's case.",
        "prompt": {"id": "pmpt_1", "variables": {"ssn": "123-45-6789"}},
    }
    chat, _ = responses.to_chat(sent, "req_x")
    pinner = Principal(tenant="acme", permissions=frozenset({"pin_closed"}), key_id="test")

    async def scenario() -> None:
        async with serving(tmp_path, fake, ScriptedStream()) as srv:
            call = Call(
                body=chat,
                principal=pinner,
                tenant="acme",
                front="responses",
                native=NativeRequest("responses", sent),
            )
            plan = await srv.gateway.route(call)
            assert plan.signals.pii and "ssn" in plan.signals.pii_kinds
            assert plan.decision.rule == "pii-stays-local" and plan.decision.local_only
            assert [spec.tier for spec, _, _ in plan.chain] == ["local"]

    asyncio.run(scenario())


@asynccontextmanager
async def _doubting(
    tmp_path: Path, fake: FakeProvider, extra: str = ""
) -> AsyncIterator[tuple[Serving, ScriptedStream]]:
    """A gateway whose cascades all escalate (the local answer doubted), their local calls held
    until released, with the closed models reached only by escalation (no spill)."""
    local = ScriptedStream(queue_size=4)
    local.logprob = -4.0
    local.mode = "hold"
    extra = "cascade: {threshold: 0.5, hold_back_tokens: 2}\n" + extra
    async with serving(tmp_path, fake, local, queue_full="reject", extra=extra) as srv:
        yield srv, local


async def _together(srv: Serving, local: ScriptedStream, calls: list[Call]) -> list[Any]:
    """``calls`` served at once, their local calls released once each is at the local model
    (or refused before it): their answers, or errors."""
    tasks = [asyncio.create_task(srv.gateway.serve(c)) for c in calls]
    while local.calls + sum(t.done() for t in tasks) < len(tasks):
        await asyncio.sleep(0.01)
    local.release.set()
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_a_cascade_reserves_its_escalation_against_the_budget(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # A cascade may escalate to a closed model, so its spend hold is priced at that model: of
    # concurrent cascades under a budget one reservation can pay for, one may escalate and the
    # others are served locally (over budget), rather than all escalating on a $0 hold.
    fake.reset()

    async def scenario() -> None:
        budget = "tenants:\n  acme: {daily_budget_usd: 0.001, over_budget: local}\n"
        async with _doubting(tmp_path, fake, budget) as (srv, local):
            calls = [srv.call("HARD one", model="auto-cascade", max_tokens=200) for _ in range(3)]
            answers = await _together(srv, local, calls)
            assert local.calls == 3  # all three admitted
            tiers = sorted(a.headers["x-tiergate-tier"] for a in answers)
            assert tiers == ["closed", "local", "local"]
            assert len(fake.received) == 1
            assert len(srv.records) == 3

    asyncio.run(scenario())


def test_a_cascade_reserves_its_escalation_against_the_token_limit(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # A cascade reserved its local answer's tokens and, as it escalated, topped them up with
    # no limit check: of concurrent cascades under a token limit that fits two cascades' calls,
    # all four were admitted and all escalated past it. As for the budget, it reserves its
    # escalation up front, checked: the excess are refused (429) at admission.
    fake.reset()

    async def scenario() -> None:
        async with _doubting(tmp_path, fake) as (srv, local):
            asked = srv.call("HARD one", model="auto-cascade", max_tokens=200)
            one_call = (await srv.gateway.route(asked)).signals.prompt_tokens + 200
            limited = replace(CALLER, tpm=4 * one_call)  # two cascades: local, then closed
            calls = [Call(body=asked.body, principal=limited, tenant="acme") for _ in range(4)]
            got = await _together(srv, local, calls)
            answered = [a.headers["x-tiergate-cascade"] for a in got if isinstance(a, Answer)]
            refused = [e.code for e in got if isinstance(e, RateLimitError)]
            assert (answered, refused) == (["escalated"] * 2, ["tpm_limit_exceeded"] * 2), got
            assert len(fake.received) == 2
            assert len(srv.records) == 4

    asyncio.run(scenario())


@pytest.mark.parametrize("litellm_model", ["openai/o3", "azure/o4-mini", "azure/gpt-5"])
def test_sampling_fields_at_their_defaults_are_not_sent_to_a_model_that_refuses_them(
    tmp_path: Path, fake: FakeProvider, litellm_model: str
) -> None:
    # OpenAI's reasoning models refuse top_p, the penalties, logprobs (gpt-5: logit_bias too)
    # whatever their value: litellm raised UnsupportedParamsError for top_p 1 or
    # presence_penalty 0, which ask for nothing, so the policy let the request reach them.
    from litellm.utils import get_optional_params

    quiet_litellm()
    path = tmp_path / "policy.yaml"
    path.write_text(policy_yaml(fake).replace("openai/gpt-4o", litellm_model))
    spec = load_serving_policy(path).models["gpt-4o"]
    body = {"messages": [{"role": "user", "content": "hi"}], **SAMPLING_DEFAULTS}
    sampling = {k: v for k, v in Gateway.fitted(spec, body, frozenset()).items() if k != "messages"}
    provider, name = litellm_model.split("/")
    get_optional_params(model=name, custom_llm_provider=provider, **sampling)  # raises if refused
    assert sampling.get("temperature", 1) == 1  # the one field it takes at its default, or none


def test_a_front_whose_answer_cannot_be_shaped_is_recorded_as_an_error(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # The front's answer is made before the record: when it cannot be made (litellm refuses a
    # tool call cut short by max_tokens, say) the record says so, not "ok".
    fake.reset()

    def shape(chat: dict[str, Any]) -> dict[str, Any]:
        raise ValueError("Failed to parse tool call arguments")

    async def scenario() -> None:
        async with serving(tmp_path, fake, ScriptedStream()) as srv:
            call = Call(
                body=srv.call("easy").body,
                principal=CALLER,
                tenant="acme",
                front="messages",
                shape=shape,
            )
            with pytest.raises(TiergateError) as err:
                await srv.gateway.serve(call)
            assert err.value.status_code == 500 and "tool call arguments" in err.value.message
            assert err.value.headers["x-tiergate-tier"] == "local"
            assert [(r.status, r.http_status, r.front) for r in srv.records] == [
                ("error", 500, "messages")
            ]

    asyncio.run(scenario())


class CostlyScorer:
    """Stands in for a scorer with an encoder (router-v8): ``costly``, reading the bundled
    local profile; it scores as :class:`KeywordScorer` and counts its calls."""

    name, version, costly = "learned", "costly-test", True

    def __init__(self) -> None:
        from router.profile import default_profile

        self.calls = 0
        self.profile = default_profile()

    def analyze(self, text: str, *, has_tools: bool = False) -> Any:
        self.calls += 1
        return KeywordScorer().analyze(text, has_tools=has_tools)


HELLO = {"model": "auto", "messages": [{"role": "user", "content": "Hello there"}]}


def _stored_versions(srv: Any) -> list[str]:
    store = srv.gateway.outcomes
    assert store.flush()
    return [r["model_version"] for r in reversed(store.recent(50))]


def test_encoder_false_scores_with_the_static_router_until_a_reload_turns_it_on(
    tmp_path: Path, fake: FakeProvider
) -> None:
    from router.artifact import STATIC_MODEL_NAME

    fake.reset()
    costly = CostlyScorer()
    with live(
        tmp_path,
        policy_yaml(fake, encoder="false"),
        scorer=costly,
        local_backend_obj=ScriptedLocal(),
        policy_reload_s=0.05,
    ) as srv:
        off = srv.http.post("/v1/chat/completions", json=HELLO)
        assert off.status_code == 200, off.text
        assert off.headers["x-tiergate-model-version"] == STATIC_MODEL_NAME
        plan = srv.http.post("/v1/route", json=HELLO).json()
        assert plan["model_version"] == STATIC_MODEL_NAME
        assert plan["signals"]["local_profile"] == costly.profile.label  # the same profile
        assert costly.calls == 0  # the costly scorer never ran
        # The policy's hot reload turns the encoder back on: no restart.
        (tmp_path / "policy.yaml").write_text(policy_yaml(fake, encoder="true"))
        assert wait_for(lambda: srv.gateway.policy.encoder)
        on = srv.http.post("/v1/chat/completions", json=HELLO)
        assert on.status_code == 200, on.text
        assert on.headers["x-tiergate-model-version"] == "costly-test"
        assert costly.calls == 1
        assert _stored_versions(srv) == [STATIC_MODEL_NAME, "costly-test"]


class BarrierScorer(CostlyScorer):
    """A costly scorer that answers only once ``parties`` prompts are being scored at once."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.barrier = threading.Barrier(parties, timeout=20)
        self.threads: set[str] = set()

    def analyze(self, text: str, *, has_tools: bool = False) -> Any:
        self.threads.add(threading.current_thread().name)
        self.barrier.wait()  # BrokenBarrierError (a 500) unless all parties arrive together
        return super().analyze(text, has_tools=has_tools)


def test_a_costly_scorer_scores_many_prompts_at_once_off_the_loop(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """Prompts that wait for the encoder together are batched (router.encoder): the gateway
    scores them on its own threads, more than asyncio's default pool holds on a small machine."""
    from concurrent.futures import ThreadPoolExecutor

    from router.gateway import SCORING_THREADS

    parties = 12
    assert parties <= SCORING_THREADS
    scorer = BarrierScorer(parties)
    with live(tmp_path, policy_yaml(fake), scorer=scorer, local_backend="none") as srv:
        with ThreadPoolExecutor(parties) as clients:
            answers = list(
                clients.map(lambda _: srv.http.post("/v1/route", json=HELLO), range(parties))
            )
        loop_thread = srv.thread.name
    assert [a.status_code for a in answers] == [200] * parties
    assert scorer.calls == parties and len(scorer.threads) == parties
    assert all(name.startswith("tiergate-score") for name in scorer.threads)
    assert loop_thread not in scorer.threads


def test_encoder_false_changes_nothing_for_a_scorer_without_an_encoder(
    tmp_path: Path, fake: FakeProvider
) -> None:
    fake.reset()
    text = policy_yaml(fake, encoder="false")
    with live(tmp_path, text, local_backend_obj=ScriptedLocal()) as srv:
        answer = srv.http.post("/v1/chat/completions", json=HELLO)
        assert answer.headers["x-tiergate-model-version"] == KeywordScorer.version
        plan = srv.http.post("/v1/route", json=HELLO).json()
        assert plan["model_version"] == KeywordScorer.version
        assert plan["signals"]["score"] == pytest.approx(0.1)  # the keyword scorer's
        assert _stored_versions(srv) == [KeywordScorer.version]


def test_a_static_router_that_cannot_load_leaves_the_costly_scorer_deciding(
    tmp_path: Path,
    fake: FakeProvider,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    import router.artifact

    fake.reset()
    monkeypatch.setattr(router.artifact, "STATIC_MODEL_NAME", "no-such-router")
    costly = CostlyScorer()
    with (
        caplog.at_level(logging.WARNING, logger="tiergate.app"),
        live(
            tmp_path,
            policy_yaml(fake, encoder="false"),
            scorer=costly,
            local_backend_obj=ScriptedLocal(),
        ) as srv,
    ):
        answer = srv.http.post("/v1/chat/completions", json=HELLO)
        assert answer.status_code == 200, answer.text
        assert answer.headers["x-tiergate-model-version"] == "costly-test"  # not the heuristic
        assert costly.calls == 1
    assert "no-such-router" in caplog.text and "costly-test keeps scoring" in caplog.text


def test_a_global_rule_every_tenant_hides_is_logged_at_start_and_reload(
    tmp_path: Path, fake: FakeProvider, caplog: pytest.LogCaptureFixture
) -> None:
    """`policy check` warns of a global rule that every listed tenant's own rules hide; so does
    the proxy, once at start and once per reload that still has one: said nowhere before."""
    hidden = policy_yaml(fake, extra="tenants:\n  acme:\n    rules: [{name: all, route: claude}]\n")
    hidden = hidden.replace(
        "rules:\n", "rules:\n  - {name: pics, when: {has_images: true}, route: gpt-4o}\n", 1
    )
    caplog.set_level("WARNING")
    with live(tmp_path, hidden):
        pass
    said = "rule 'pics' decides no request of a tenant under `tenants`"
    assert [r.name for r in caplog.records if said in r.getMessage()] == ["tiergate.app"]
    caplog.clear()
    path = tmp_path / "edited.yaml"
    path.write_text(policy_yaml(fake))
    holder = PolicyHolder(path)
    path.write_text(hidden + "# edited\n")
    assert holder.check() is False and holder.check() is True
    assert [r.name for r in caplog.records if said in r.getMessage()] == ["tiergate.gateway"]


def test_the_last_guard_keeps_anthropics_own_tools_from_any_other_model() -> None:
    """The policy's fit check reads Anthropic's own tools in the Messages request as sent; behind
    it, ``Gateway.fitted`` reads the chat request litellm's translation made (a web search
    becomes ``web_search_options``) and refuses it for any model but an ``anthropic/`` one."""
    asked = {"role": "user", "content": "list the files"}
    tools = [
        {"type": "web_search_20250305", "name": "web_search"},
        {"type": "bash_20250124", "name": "bash"},
    ]
    chat, _ = messages.to_chat(
        {"model": "auto", "max_tokens": 9, "messages": [asked], "tools": tools}, "req_1"
    )
    models = parse_policy(
        "version: 1\nmodels:\n  local: {tier: local}\n"
        "  gpt: {tier: closed, litellm_model: openai/gpt-4o}\n"
        "  bedrock: {tier: closed, litellm_model: bedrock/anthropic.claude-3-haiku-20240307-v1:0}\n"
        "  claude: {tier: closed, litellm_model: anthropic/claude-sonnet-4-5, transport: litellm}\n"
        "local_model: local\nclosed_models: [gpt, bedrock, claude]\n"
    ).models
    for name in ("local", "gpt", "bedrock"):
        with pytest.raises(BadRequestError) as refused:
            Gateway.fitted(models[name], chat, messages.OPTIONAL, messages.NATIVE_ONLY)
        assert refused.value.message == (
            f"{name} cannot serve bash_20250124, the web_search tool: only an Anthropic model does"
        )
        assert refused.value.param == "tools"  # the client's field, as the policy names it
    sent = Gateway.fitted(models["claude"], chat, messages.OPTIONAL, messages.NATIVE_ONLY)
    assert sent["web_search_options"] == {} and sent["tools"] == [tools[1]]


def test_the_last_guard_names_a_web_search_as_the_client_sent_it() -> None:
    """The client sent a web search tool; the guard named the chat field litellm's translation
    made of it (``local cannot serve web_search_options``, ``param: web_search_options``),
    which the client never sent (the Messages schema refuses it)."""
    search = {"type": "web_search_20250305", "name": "web_search"}
    chat, _ = messages.to_chat(
        {
            "model": "auto",
            "max_tokens": 9,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [search],
        },
        "req_1",
    )
    local = parse_policy("version: 1\nmodels:\n  local: {tier: local}\nlocal_model: local\n")
    with pytest.raises(BadRequestError) as refused:
        Gateway.fitted(local.models["local"], chat, messages.OPTIONAL, messages.NATIVE_ONLY)
    assert (refused.value.message, refused.value.param) == (
        "local cannot serve the web_search tool: only an Anthropic model does",
        "tools",
    )


def test_the_last_guard_reads_a_null_server_field_as_absent() -> None:
    """A server field sent as null asks for nothing, as the policy's fit check reads it: the
    guard refused it for any model but an ``anthropic/`` one, a 400 the policy did not foresee
    (``local cannot serve container, context_management, mcp_servers: only an Anthropic
    model does``)."""
    chat = {
        "model": "auto",
        "max_tokens": 9,
        "messages": [{"role": "user", "content": "hi"}],
        "container": None,
        "mcp_servers": None,
        "context_management": None,
    }
    models = parse_policy(
        "version: 1\nmodels:\n  local: {tier: local}\n"
        "  gpt: {tier: closed, litellm_model: openai/gpt-4o}\n"
        "local_model: local\nclosed_models: [gpt]\n"
    ).models
    for name in ("local", "gpt"):
        assert Gateway.fitted(models[name], chat, messages.OPTIONAL, messages.NATIVE_ONLY) == chat


def test_a_messages_request_over_a_models_stop_limit_names_stop_sequences(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A /v1/messages request pinned to gpt-4o with more stop sequences than OpenAI takes is
    refused naming the field its client sent, ``stop_sequences`` (as its ``max_tokens`` is
    named as that front calls it): it named the chat translation's ``stop``."""
    fake.reset()
    sent = {
        "model": "gpt-4o",
        "max_tokens": 20,
        "messages": [{"role": "user", "content": "Count to ten."}],
        "stop_sequences": ["1", "2", "3", "4", "5"],
    }
    chat, _ = messages.to_chat(sent, "req_x")
    pinner = Principal(tenant="acme", permissions=frozenset({"pin_closed"}), key_id="test")

    async def scenario() -> None:
        async with serving(tmp_path, fake, ScriptedStream()) as srv:
            call = Call(body=chat, principal=pinner, tenant="acme", front="messages")
            with pytest.raises(BadRequestError) as refused:
                await srv.gateway.serve(call)
            assert "cannot take 5 stop sequences (it takes at most 4)" in refused.value.message
            assert refused.value.param == "stop_sequences"
            assert fake.received == []

    asyncio.run(scenario())


@pytest.mark.parametrize("counted", [True, False])
def test_a_tool_call_stream_left_before_its_usage_is_charged_its_arguments(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch, counted: bool
) -> None:
    """A stream's answer counted only its ``delta.content``: a client that left a tool call's
    stream before the provider's usage was charged nothing for the arguments streamed to it,
    which the provider bills as answer tokens (a long call's hundreds). They are counted as
    the answer text is, with the model's tokenizer, or, where counting takes too long
    (``counted`` False), estimated as that text is as it passes."""
    if not counted:
        monkeypatch.setattr(gateway_module, "COUNT_TIMEOUT_S", 0.0, raising=False)
    first = {"q": "a\n" * 150}
    calls = [("lookup", first), ("lookup", {"q": "b\n" * 150})]
    fake.reset(Behaviour(mode="tool_call", text="ok", calls=calls))
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]

    async def scenario() -> None:
        async with serving(tmp_path, fake, ScriptedStream()) as srv:
            answer = await srv.gateway.serve(srv.call("HARD", stream=True, tools=tools))
            assert isinstance(answer, StreamAnswer)
            for _ in range(4):  # the opening, "ok ", then the first call's two pieces
                await anext(answer.chunks)
            await answer.chunks.aclose()
            left = srv.records.pop()
            model = srv.gateway.policy.models["gpt-4o"]
            _, read = closed.counted_tokens(model, {}, "ok lookup" + json.dumps(first))
            assert left.status == "aborted" and read > 300
            if counted:
                assert left.completion_tokens == read, (left.completion_tokens, read)
            else:  # estimated at 3.5 characters a token
                streamed = len("ok lookup" + json.dumps(first))
                assert streamed / 4 < left.completion_tokens < read, left.completion_tokens

    asyncio.run(scenario())
