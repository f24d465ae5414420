"""The fault suite: each scenario asserts what the client got, which fallback was taken, and that
exactly one outcome record was written per request.

Tiergate answers in process (a real socket where disconnects and buffers are under test); the
closed tier is the fake provider told to misbehave; the local tier is :class:`ScriptedLocal`
(the real queue gate, scripted generation).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from router.artifact import default_model_path
from tests.conftest import KEYS, LiveServer, free_port, live, policy_yaml, wait_for
from tests.fake_provider import (
    ANTHROPIC_OVERLOADED,
    ANTHROPIC_RATE_LIMITED,
    OPENAI_CHAT_OVERLOADED,
    OPENAI_CHAT_RATE_LIMITED,
    OPENAI_OVERLOADED,
    OPENAI_RATE_LIMITED,
    RESPONSE_SERVER_ERROR,
    Behaviour,
    FakeProvider,
    endless_error,
)
from tests.redis_server import RedisServer, redis_binary
from tests.scripted_local import ScriptedLocal

EASY = {"model": "auto", "messages": [{"role": "user", "content": "hello"}]}
HARD = {"model": "auto", "messages": [{"role": "user", "content": "HARD proof please"}]}
PII = {"model": "auto", "messages": [{"role": "user", "content": "my PII is here"}]}
PINNED = {**HARD, "model": "gpt-4o"}


def _post(server: LiveServer, body: object) -> httpx.Response:
    return server.http.post("/v1/chat/completions", json=body)


def _hard(server: LiveServer, stream: bool) -> httpx.Response:
    """HARD asked of ``server``: whole, or streamed to its ``[DONE]``."""
    if not stream:
        return _post(server, HARD)
    with server.http.stream(
        "POST", "/v1/chat/completions", json={**HARD, "stream": True}
    ) as response:
        events = _sse(response)
    assert events[-1] == "[DONE]"
    return response


def _records(server: LiveServer, expected: int) -> list[dict[str, Any]]:
    """Wait for ``expected`` records, check no more arrive, return them newest first."""
    store = server.gateway.outcomes
    assert wait_for(lambda: store.count() >= expected), (store.count(), expected)
    store.flush()
    time.sleep(0.1)
    assert store.count() == expected
    rows: list[dict[str, Any]] = store.recent(expected + 10)
    assert len({row["id"] for row in rows}) == expected
    return rows


def _record(server: LiveServer, response: httpx.Response) -> dict[str, Any]:
    rows = _records(server, 1)
    assert rows[0]["id"] == response.headers["x-request-id"]
    return rows[0]


def _final_error(
    server: LiveServer, response: httpx.Response, status: int, kind: tuple[str, str]
) -> None:
    """``response`` is the error ``status`` with ``kind`` (type, code), recorded as such."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == kind
    record = _record(server, response)
    assert (record["status"], record["http_status"], record["error_type"]) == (
        "error",
        status,
        kind[1],
    )


def _sse(response: httpx.Response) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[6:]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.fixture
def local() -> ScriptedLocal:
    return ScriptedLocal()


@pytest.fixture
def server(tmp_path: Path, fake: FakeProvider, local: ScriptedLocal) -> Iterator[LiveServer]:
    """A fresh Tiergate per test (on_failure: local, queue_full: spill)."""
    fake.reset()
    with live(tmp_path, policy_yaml(fake), local_backend_obj=local) as srv:
        yield srv


# -- closed provider faults --------------------------------------------------------------------


def test_a_spilled_request_calls_each_closed_model_once(
    tmp_path: Path, fake: FakeProvider, local: ScriptedLocal
) -> None:
    """With on_failure: closed a local decision's fallbacks are the closed models already;
    spilling from a full queue must not queue them a second time."""
    fake.reset(Behaviour(mode="status", status=500))
    with live(tmp_path, policy_yaml(fake, on_failure="closed"), local_backend_obj=local) as srv:
        local.mode = "hold"
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(_post, srv, EASY)
            assert wait_for(lambda: local.gate.running == 1)
            spilled = _post(srv, EASY)
            local.release.set()
            held.result()
    assert spilled.status_code == 502, spilled.text
    assert len(fake.received) == 2, [r.path for r in fake.received]  # gpt-4o, then claude


@pytest.mark.parametrize("stream", [False, True])
def test_closed_500_falls_back_to_local(
    server: LiveServer, fake: FakeProvider, stream: bool
) -> None:
    fake.reset(Behaviour(mode="status", status=500))
    response = _hard(server, stream)
    if not stream:
        assert response.json()["choices"][0]["message"]["content"] == "w0 w1 w2 "
    assert response.status_code == 200
    assert response.headers["x-tiergate-fallback"] == "closed->local"
    assert len(fake.received) == 1
    record = _record(server, response)
    assert (record["status"], record["tier"], record["fallback"]) == (
        "ok",
        "local",
        "closed->local",
    )


@pytest.mark.parametrize("model", ["gpt-4o", "claude"])  # direct HTTP, litellm
def test_closed_429_passes_retry_after_through_when_no_fallback(
    server: LiveServer, fake: FakeProvider, model: str
) -> None:
    fake.reset(Behaviour(mode="rate_limit", retry_after=7))
    response = _post(server, {**PINNED, "model": model})  # a pinned model has no fallback
    _final_error(server, response, 429, ("rate_limit_error", "upstream_rate_limited"))
    assert response.headers["retry-after"] == "7"
    fallback = _post(server, HARD)  # with a fallback the client never sees the 429
    assert fallback.status_code == 200
    assert fallback.headers["x-tiergate-fallback"] == "closed->local"
    assert "retry-after" not in fallback.headers
    _records(server, 2)


@pytest.mark.parametrize("model", ["gpt-4o", "claude"])  # direct HTTP, litellm
def test_a_retry_after_date_is_passed_on_and_a_garbled_one_is_ignored(
    server: LiveServer, fake: FakeProvider, model: str
) -> None:
    """RFC 9110 allows Retry-After as an HTTP-date: passed on as the seconds until then. One
    that is neither (``inf``, ``nan``, a word) is ignored: the 429 is still a 429, and a
    request with a fallback still falls back, rather than failing as an internal error."""
    in_30_s = email.utils.formatdate(time.time() + 30, usegmt=True)
    fake.reset(Behaviour(mode="rate_limit", retry_after=in_30_s))
    dated = _post(server, {**PINNED, "model": model})
    assert dated.status_code == 429
    assert 25 <= int(dated.headers["retry-after"]) <= 31
    for garbled in ("inf", "nan", "soon"):
        fake.reset(Behaviour(mode="rate_limit", retry_after=garbled))
        pinned = _post(server, {**PINNED, "model": model})
        assert pinned.status_code == 429, pinned.text
        assert pinned.json()["error"]["code"] == "upstream_rate_limited"
        assert "retry-after" not in pinned.headers
        fallback = _post(server, HARD)
        assert fallback.status_code == 200, fallback.text
        assert fallback.headers["x-tiergate-fallback"] == "closed->local"
    _records(server, 7)


@pytest.mark.parametrize("model", ["gpt-4o", "claude"])  # direct HTTP, litellm
def test_a_providers_retry_after_is_passed_on_at_most_120_s(
    server: LiveServer, fake: FakeProvider, model: str
) -> None:
    """A provider that asks for a day (``Retry-After: 86400``, or a date a day ahead: a spent
    quota) had Tiergate tell its clients to wait a day, though the model cools for 120 s at
    most and is tried again then: the client is told 120 s. Junk that ``float`` reads
    (``1_0``, ``1e3``) is no number of seconds: left out, as any garbled value."""
    in_a_day = email.utils.formatdate(time.time() + 86400, usegmt=True)
    for asked in ("86400", in_a_day):
        fake.reset(Behaviour(mode="rate_limit", retry_after=asked))
        pinned = _post(server, {**PINNED, "model": model})
        assert pinned.status_code == 429, pinned.text
        assert pinned.headers["retry-after"] == "120"
        assert server.gateway.cooldowns.left(model) <= 120
    for garbled in ("1_0", "1e3"):
        fake.reset(Behaviour(mode="rate_limit", retry_after=garbled))
        pinned = _post(server, {**PINNED, "model": model})
        assert pinned.status_code == 429, pinned.text
        assert "retry-after" not in pinned.headers
    _records(server, 4)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "upstream",
    [("gpt-4o", 503, None), ("claude", 529, ANTHROPIC_OVERLOADED), ("claude", 503, None)],
)  # direct HTTP, litellm (which calls Anthropic's 529 an InternalServerError 500)
def test_an_overloaded_provider_is_a_503_with_its_retry_after_when_no_fallback(
    server: LiveServer,
    fake: FakeProvider,
    upstream: tuple[str, int, dict[str, Any] | None],
    stream: bool,
) -> None:
    """A provider that says it is overloaded (503, Anthropic's 529) was a 502 upstream_error
    without its Retry-After: the client gets 503 upstream_overloaded and when to come back."""
    model, status, body = upstream
    fake.reset(
        Behaviour(
            mode="status", status=status, error_body=body, error_headers={"retry-after": "12"}
        )
    )
    response = _post(server, {**PINNED, "model": model, "stream": stream})
    _final_error(server, response, 503, ("service_unavailable", "upstream_overloaded"))
    assert response.headers["retry-after"] == "12"
    # It asked to be spared for 12 s: its model cools for that long at once (router.cooldown).
    assert 11 < server.gateway.cooldowns.left(model) <= 12
    fallback = _post(server, HARD)  # with a fallback the client never sees the 503
    assert fallback.status_code == 200, fallback.text
    assert "retry-after" not in fallback.headers
    _records(server, 2)


@pytest.mark.parametrize("overloaded_last", [True, False])
def test_a_chain_failing_in_mixed_ways_answers_with_its_last_failure(
    tmp_path: Path, fake: FakeProvider, overloaded_last: bool
) -> None:
    """gpt-4o cannot be reached and claude is overloaded: 503 with claude's Retry-After. The
    other way round, the last failure (unreachable, a 502) is the answer, and no Retry-After
    of an earlier model's is passed on."""
    dead = f"http://127.0.0.1:{free_port()}/v1"
    policy = policy_yaml(fake, on_failure="closed")
    if overloaded_last:
        policy = policy.replace(f"api_base: {fake.base_url}\n", f"api_base: {dead}\n", 1)
        failing = "/messages"
    else:
        policy = policy.replace(
            f"api_base: {fake.base_url.removesuffix('/v1')}\n", f"api_base: {dead}\n", 1
        )
        failing = "/chat/completions"
    fake.reset(
        Behaviour(
            mode="status",
            status=529 if overloaded_last else 503,
            error_body=ANTHROPIC_OVERLOADED if overloaded_last else None,
            error_headers={"retry-after": "12"},
            failing_path=failing,
        )
    )
    with live(tmp_path, policy, local_backend_obj=ScriptedLocal()) as srv:
        response = _post(srv, HARD)
        record = _record(srv, response)
    assert [r.path for r in fake.received] == ["/v1" + failing]
    error = response.json()["error"]
    assert "gpt-4o" in error["message"] and "claude" in error["message"]
    if overloaded_last:
        assert response.status_code == 503, response.text
        assert error["code"] == "upstream_overloaded"
        assert response.headers["retry-after"] == "12"
    else:
        assert response.status_code == 502, response.text
        assert error["code"] == "upstream_unreachable"
        assert "retry-after" not in response.headers
    assert record["http_status"] == response.status_code


def test_closed_timeout_uses_the_models_timeout(tmp_path: Path, fake: FakeProvider) -> None:
    policy = policy_yaml(fake).replace(
        "litellm_model: openai/gpt-4o\n", "litellm_model: openai/gpt-4o\n    timeout_s: 0.5\n"
    )
    fake.reset(Behaviour(mode="stall", stall_s=60))
    with live(tmp_path, policy, local_backend_obj=ScriptedLocal()) as srv:
        response = _post(srv, HARD)
        assert response.status_code == 200
        assert response.headers["x-tiergate-fallback"] == "closed->local"
        pinned = _post(srv, PINNED)
        assert pinned.status_code == 504  # a gateway timeout, as the README says
        assert pinned.json()["error"]["code"] == "upstream_timeout"
        assert "timed out" in pinned.json()["error"]["message"]
        # Both gave up at the model's 0.5 s while the provider still stalled, not at the
        # default closed timeout (which outlasts the stall).
        assert fake.stalls_ended == 0
        fake.unstall()
        rows = _records(srv, 2)
        assert [r["http_status"] for r in rows] == [504, 200]
        assert rows[1]["fallback"] == "closed->local"


def test_closed_connection_reset_mid_stream(server: LiveServer, fake: FakeProvider) -> None:
    """After the first chunk no fallback is possible: the stream ends with an error event."""
    fake.reset(Behaviour(mode="reset_mid_stream"))
    with server.http.stream(
        "POST", "/v1/chat/completions", json={**HARD, "stream": True}
    ) as response:
        assert response.status_code == 200
        events = _sse(response)
    assert response.headers["x-tiergate-model"] == "gpt-4o"
    assert "[DONE]" not in events
    assert events[-1]["error"]["code"] == "upstream_unreachable"
    record = _record(server, response)
    assert (record["status"], record["http_status"], record["fallback"]) == ("error", 502, None)


#: gpt-4o's policy lines for a closed model whose stream litellm reads: a provider with an
#: OpenAI-like protocol (``mistral/``), and an ``openai/`` model told ``transport: litellm``.
LITELLM_PATH = {
    "mistral": "litellm_model: mistral/mistral-large-latest\n    api_key_env: OPENAI_API_KEY",
    "openai-via-litellm": "litellm_model: openai/gpt-4o\n    transport: litellm",
}


def _through_litellm(fake: FakeProvider, via: str) -> str:
    """The test policy (on_failure: closed) with gpt-4o called through litellm as ``via``."""
    policy = policy_yaml(fake, on_failure="closed")
    return policy.replace("litellm_model: openai/gpt-4o", LITELLM_PATH[via])


def _stream_hard(tmp_path: Path, policy: str) -> tuple[httpx.Response, list[Any], dict[str, Any]]:
    """(the response, its events, its record) of a chat stream for HARD under ``policy``;
    the response is a 200."""
    with live(tmp_path, policy) as srv:
        with srv.http.stream(
            "POST", "/v1/chat/completions", json={**HARD, "stream": True}
        ) as response:
            events = _sse(response)
        record = _record(srv, response)
    assert response.status_code == 200
    return response, events, record


def _unbuildable(fake: FakeProvider) -> str:
    """The test policy (on_failure: closed) with gpt-4o called through litellm at an
    ``api_base`` whose port was never filled in: its SDK client cannot be built."""
    policy = _through_litellm(fake, "openai-via-litellm")
    return policy.replace(f"api_base: {fake.base_url}", "api_base: http://127.0.0.1:${PORT}/v1")


@pytest.mark.parametrize("stream", [False, True])
def test_a_model_whose_client_cannot_be_built_falls_back(
    tmp_path: Path, fake: FakeProvider, stream: bool
) -> None:
    """A model whose settings cannot make its client (httpx's InvalidURL from the SDK client
    built for its api_base) fails as its provider would: the chain's next model answers."""
    fake.reset()
    with live(tmp_path, _unbuildable(fake)) as srv:
        response = _hard(srv, stream)
        record = _record(srv, response)
    assert response.status_code == 200, response.text
    assert response.headers["x-tiergate-fallback"] == "closed->closed"
    assert (record["status"], record["model"]) == ("ok", "claude")
    assert [r.path for r in fake.received] == ["/v1/messages"]  # gpt-4o sent nothing


def test_a_model_whose_client_cannot_be_built_names_its_setting_not_its_key(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """Alone on its chain, it is a 502 its SDK is told not to retry, naming the model and the
    setting to fix, never the key."""
    fake.reset()
    with live(tmp_path, _unbuildable(fake)) as srv:
        response = _post(srv, PINNED)
        _final_error(srv, response, 502, ("api_error", "model_misconfigured"))
    message = response.json()["error"]["message"]
    assert "gpt-4o" in message and "api_base" in message and "${PORT}" in message, message
    assert KEYS["OPENAI_API_KEY"] not in message
    assert response.headers["x-should-retry"] == "false"


def test_a_direct_model_at_an_unusable_api_base_is_misconfigured_as_through_litellm(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """The direct path, at an ``api_base`` whose port was never filled in, fails as litellm's
    path does: a 502 ``model_misconfigured`` naming the setting, not told to retry, not a
    retryable ``upstream_unreachable`` that cools the model."""
    fake.reset()
    policy = policy_yaml(fake, on_failure="closed")
    policy = policy.replace(f"api_base: {fake.base_url}", "api_base: http://127.0.0.1:${PORT}/v1")
    with live(tmp_path, policy) as srv:
        response = _post(srv, PINNED)
        _final_error(srv, response, 502, ("api_error", "model_misconfigured"))
    message = response.json()["error"]["message"]
    assert "gpt-4o" in message and "api_base" in message, message
    assert response.headers["x-should-retry"] == "false"


def test_a_defect_translating_a_litellm_request_stays_a_defect(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug in Tiergate's own translation of the body for litellm (simulated here) is a 500,
    not a ``model_misconfigured`` that blames the model's settings and lets the chain pass
    over it: only building the model's client is its settings' failure."""
    from router.backends import closed

    def broken(messages: object, name: str) -> None:
        raise RuntimeError("a defect in check_user_parts")

    monkeypatch.setattr(closed, "check_user_parts", broken)
    fake.reset()
    with live(tmp_path, _through_litellm(fake, "openai-via-litellm")) as srv:
        response = _post(srv, PINNED)
    assert response.status_code == 500, response.text
    assert fake.received == []


@pytest.mark.parametrize("via", sorted(LITELLM_PATH))
def test_a_litellm_stream_cut_after_its_opening_falls_back(
    tmp_path: Path, fake: FakeProvider, via: str
) -> None:
    """A provider litellm streams from (its role chunk, then the connection reset) has
    answered nothing: the next model answers the whole request, as on the direct path."""
    fake.reset(Behaviour(mode="reset_after_open", failing_path="/chat/completions"))
    response, events, record = _stream_hard(tmp_path, _through_litellm(fake, via))
    _fell_back(response, events, record, ("claude", "closed->closed"), fake.behaviour.text)


@pytest.mark.parametrize("via", sorted(LITELLM_PATH))
def test_a_litellm_stream_ended_by_done_after_its_opening_falls_back(
    tmp_path: Path, fake: FakeProvider, via: str
) -> None:
    """A provider litellm streams from that sends its role chunk and then ``data: [DONE]``,
    with no token and no finish_reason (a server that gives up on a request it has opened),
    has answered nothing: litellm makes up a ``stop`` for the [DONE], and that made-up end
    must not pass for an empty answer. The next model answers the whole request."""
    fake.reset(Behaviour(mode="done_after_open", failing_path="/chat/completions"))
    response, events, record = _stream_hard(tmp_path, _through_litellm(fake, via))
    _fell_back(response, events, record, ("claude", "closed->closed"), fake.behaviour.text)
    assert [r.path for r in fake.received] == ["/v1/chat/completions", "/v1/messages"]


@pytest.mark.parametrize("mode", ["reset_mid_stream", "interrupted"])
@pytest.mark.parametrize("via", sorted(LITELLM_PATH))
def test_a_litellm_stream_cut_mid_answer_ends_in_an_error(
    tmp_path: Path, fake: FakeProvider, via: str, mode: str
) -> None:
    """A stream litellm reads that stops mid-answer without its finish_reason (the connection
    reset, or ``data: [DONE]`` with none, as llama_cpp.server ends a stream it interrupts)
    was cut off: the client gets the words sent and an error event, never ``[DONE]``, and the
    record says error, as on the direct path. litellm made up a ``stop`` for the [DONE]: the
    client read two words as the whole answer, and the record said ok."""
    fake.reset(Behaviour(mode=mode))
    response, events, record = _stream_hard(tmp_path, _through_litellm(fake, via))
    assert response.headers["x-tiergate-model"] == "gpt-4o"
    assert "[DONE]" not in events, events[-3:]
    assert not any(c["choices"][0].get("finish_reason") for c in events[:-1] if c["choices"])
    assert events[-1]["error"]["code"] == "upstream_unreachable"
    assert (record["status"], record["http_status"]) == ("error", 502)


#: Per front: the streamed request, the path a cut provider serves natively, and how to read
#: the answer's opening events and text out of the stream's events.
CUT_FRONTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "chat": ("/v1/chat/completions", {**HARD, "stream": True}, "/chat/completions"),
    "messages": (
        "/v1/messages",
        {"model": "auto", "max_tokens": 64, "messages": HARD["messages"], "stream": True},
        "/messages",
    ),
    "responses": (
        "/v1/responses",
        {"model": "auto", "input": "HARD proof please", "stream": True},
        "/responses",
    ),
}


def _opening_and_text(front: str, events: list[Any]) -> tuple[list[int], str]:
    """Where the stream's opening events are (the role chunk, ``message_start``,
    ``response.created``), and the answer's text."""
    data = [e for e in events if e != "[DONE]"]
    if front == "chat":
        deltas = [(c["choices"] or [{}])[0].get("delta") or {} for c in data]
        return [i for i, d in enumerate(deltas) if "role" in d], "".join(
            d.get("content") or "" for d in deltas
        )
    opening = "message_start" if front == "messages" else "response.created"
    if front == "messages":
        text = "".join(
            e["delta"].get("text", "") for e in data if e["type"] == "content_block_delta"
        )
    else:
        text = "".join(e["delta"] for e in data if e["type"] == "response.output_text.delta")
    return [i for i, e in enumerate(data) if e["type"] == opening], text


@pytest.mark.parametrize("front", sorted(CUT_FRONTS))
def test_a_stream_cut_after_its_opening_falls_back(
    tmp_path: Path, fake: FakeProvider, front: str
) -> None:
    """A provider that sends a stream's opening (OpenAI's role-only chunk, Anthropic's
    message_start, response.created) and then drops it has answered nothing: the request falls
    back like any failed call, and the client gets the fallback's whole answer, opened once.
    It got the opening, then an error event, and the record said error."""
    path, body, cut = CUT_FRONTS[front]
    policy = policy_yaml(fake, on_failure="closed")
    if cut == "/messages":  # claude first, natively
        policy = policy.replace(
            "closed_models: [gpt-4o, claude]", "closed_models: [claude, gpt-4o]"
        )
    fake.reset(Behaviour(mode="reset_after_open", failing_path=cut))
    with live(tmp_path, policy, local_backend_obj=ScriptedLocal()) as srv:
        with srv.http.stream("POST", path, json=body) as response:
            events = _sse(response)
        record = _record(srv, response)
    answered = "gpt-4o" if cut == "/messages" else "claude"
    answered_path = "chat/completions" if answered == "gpt-4o" else "messages"
    assert response.status_code == 200
    assert (response.headers["x-tiergate-model"], response.headers["x-tiergate-fallback"]) == (
        answered,
        "closed->closed",
    )
    opening, text = _opening_and_text(front, events)
    assert opening == [0], events[:3]
    assert text.strip() == fake.behaviour.text
    assert [r.path for r in fake.received] == ["/v1" + cut, f"/v1/{answered_path}"]
    assert (record["status"], record["model"], record["fallback"]) == (
        "ok",
        answered,
        "closed->closed",
    )
    assert record["ttft_ms"] is not None and record["completion_tokens"] > 0


def _fell_back(
    response: httpx.Response,
    events: list[Any],
    record: dict[str, Any],
    to: tuple[str, str],
    text: str,
) -> None:
    """A chat stream answered whole by the fallback ``to`` (model, fallback), opened once, and
    recorded so."""
    headers = response.headers
    assert (headers["x-tiergate-model"], headers["x-tiergate-fallback"]) == to, events[:3]
    opening, said = _opening_and_text("chat", events)
    assert (opening, said.strip(), events[-1]) == ([0], text, "[DONE]")
    assert (record["status"], record["model"], record["fallback"]) == ("ok", *to)


def test_a_stream_cut_after_an_opening_that_carries_usage_falls_back(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A provider may send the prompt's usage with its opening role chunk (vLLM's
    ``continuous_usage_stats``, servers that report usage early). That chunk was taken for
    one that carries the answer: the response began with it, and a cut right after it gave
    the client a 200, the role chunk and an error event, recorded as an error, where the same
    cut without the usage falls back. Usage is no part of the answer: it is held back too."""
    fake.reset(
        Behaviour(mode="reset_after_open", failing_path="/chat/completions", usage_in_opening=True)
    )
    response, events, record = _stream_hard(tmp_path, policy_yaml(fake, on_failure="closed"))
    _fell_back(response, events, record, ("claude", "closed->closed"), fake.behaviour.text)


def test_an_external_local_stream_cut_after_its_opening_falls_back(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """The same for an external llama.cpp server (the local tier's openai_http backend): its
    role chunk, then the connection cut, and the closed fallback answers the whole request."""
    fake.reset()
    with FakeProvider() as server:
        server.reset(Behaviour(mode="reset_after_open", text="from the local server"))
        with live(
            tmp_path,
            policy_yaml(fake, on_failure="closed"),
            local_backend="openai_http",
            local_base_url=server.base_url,
        ) as srv:
            with srv.http.stream(
                "POST", "/v1/chat/completions", json={**EASY, "stream": True}
            ) as response:
                events = _sse(response)
            record = _record(srv, response)
    assert len(server.received) == 1
    _fell_back(response, events, record, ("gpt-4o", "local->closed"), fake.behaviour.text)


def test_anthropics_overloaded_error_after_message_start_is_a_529_or_a_fallback(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """Anthropic ends a stream it cannot go on with by an overloaded_error event (its 529 once
    a stream is open): before any token, the chain goes on, and with no model left the client
    gets what an overloaded provider gets on this front, Anthropic's 529 in its words, not a
    200 and an error event."""
    policy = policy_yaml(fake, on_failure="closed").replace(
        "closed_models: [gpt-4o, claude]", "closed_models: [claude, gpt-4o]"
    )
    fake.reset(Behaviour(mode="overloaded_after_open", failing_path="/messages"))
    with live(tmp_path, policy, local_backend_obj=ScriptedLocal()) as srv:
        pinned, fallback, text = _overloaded_then_fallback(
            srv, "messages", "claude", (529, "upstream_overloaded")
        )
    assert pinned.json()["error"]["type"] == "overloaded_error"
    assert fallback.headers["x-tiergate-model"] == "gpt-4o"
    assert text.strip() == fake.behaviour.text


def _overloaded_then_fallback(
    srv: LiveServer,
    front: str,
    model: str,
    failure: tuple[int, str] = (503, "upstream_overloaded"),
) -> tuple[httpx.Response, httpx.Response, str]:
    """A stream on ``front`` pinned to ``model``, whose provider says it is overloaded (or
    another ``failure``: status, code) after the stream's opening, then one routed (its
    fallback answers): both responses, the second one's text; the records say so."""
    path, body, _ = CUT_FRONTS[front]
    pinned = srv.http.post(path, json={**body, "model": model})
    assert pinned.status_code == failure[0], pinned.text
    with srv.http.stream("POST", path, json=body) as response:
        events = _sse(response)
    rows = _records(srv, 2)
    assert [(r["status"], r["http_status"], r["error_type"]) for r in rows] == [
        ("ok", 200, None),
        ("error", *failure),
    ]
    return pinned, response, _opening_and_text(front, events)[1]


def _response_failed(code: str, message: str) -> dict[str, Any]:
    """OpenAI's ``response.failed`` event (the other way it ends a Responses stream)."""
    return {
        "type": "response.failed",
        "response": {
            "id": "resp_fake",
            "object": "response",
            "status": "failed",
            "output": [],
            "error": {"code": code, "message": message},
        },
    }


RESPONSE_FAILED_OVERLOADED = _response_failed(
    "server_is_overloaded", "Our servers are currently overloaded. Please try again later."
)
OVERLOADED_503 = (503, "upstream_overloaded")


@pytest.mark.parametrize("event", [None, RESPONSE_FAILED_OVERLOADED], ids=["error", "failed"])
def test_openais_overload_event_after_response_created_is_a_503_or_a_fallback(
    tmp_path: Path, fake: FakeProvider, event: dict[str, Any] | None
) -> None:
    """OpenAI ends a Responses stream it cannot go on with by an ``error`` (or
    ``response.failed``) event with code ``server_is_overloaded``, its 503 once a stream is
    open. The native path took it for a plain failure: 502 ``upstream_error`` for a pinned
    gpt-4o. It is an overload, as on the other paths: 503 ``upstream_overloaded``, and with a
    fallback the chain goes on."""
    fake.reset(Behaviour(mode="overloaded_after_open", failing_path="/responses", error_body=event))
    with live(tmp_path, policy_yaml(fake, on_failure="closed")) as srv:
        pinned, fallback, text = _overloaded_then_fallback(srv, "responses", "gpt-4o")
    error = pinned.json()["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "upstream_overloaded")
    assert "overloaded" in error["message"]
    assert fallback.headers["x-tiergate-model"] == "claude"
    assert text.strip() == fake.behaviour.text


@pytest.mark.parametrize(
    ("status", "error", "failure"),
    [
        ("failed", None, (502, "upstream_error")),
        ("incomplete", RESPONSE_SERVER_ERROR, (502, "upstream_error")),
        ("failed", RESPONSE_FAILED_OVERLOADED["response"]["error"], OVERLOADED_503),
    ],
    ids=["failed", "incomplete", "overloaded"],
)
def test_a_response_answered_200_with_an_error_is_a_failure_or_a_fallback(
    tmp_path: Path,
    fake: FakeProvider,
    status: str,
    error: dict[str, Any] | None,
    failure: tuple[int, str],
) -> None:
    """OpenAI answers a Response its model failed to generate with HTTP 200, status
    ``failed`` (or ``incomplete``) and an ``error``. The native path read it as an empty
    answer: a 200 with no output for a pinned gpt-4o, recorded ok, and no fallback tried. It
    fails as the same error does in a stream's ``response.failed`` event: a 502 (a 503 for
    ``server_is_overloaded``), and with a fallback the chain goes on."""
    fake.reset(
        Behaviour(
            mode="unfinished_response",
            failing_path="/responses",
            response_status=status,
            error_body=error,
        )
    )
    body = {"model": "auto", "input": "HARD proof please"}
    with live(tmp_path, policy_yaml(fake, on_failure="closed")) as srv:
        pinned = srv.http.post("/v1/responses", json={**body, "model": "gpt-4o"})
        routed = srv.http.post("/v1/responses", json=body)
        rows = _records(srv, 2)
    assert pinned.status_code == failure[0], pinned.text
    assert pinned.json()["error"]["code"] == failure[1]
    assert (error or RESPONSE_SERVER_ERROR)["message"] in pinned.json()["error"]["message"]
    assert routed.status_code == 200, routed.text
    assert routed.headers["x-tiergate-model"] == "claude"
    text = routed.json()["output"][0]["content"][0]["text"]
    assert text == fake.behaviour.text
    assert [(r["status"], r["http_status"], r["error_type"]) for r in rows] == [
        ("ok", 200, None),
        ("error", *failure),
    ]


@pytest.mark.parametrize("status", ["completed", "incomplete"])
def test_a_responses_stream_ended_by_a_response_with_an_error_is_a_failure(
    tmp_path: Path, fake: FakeProvider, status: str
) -> None:
    """A Responses stream whose last event (``response.completed``, ``response.incomplete``)
    carries a Response with an ``error`` has failed, as the same Response answered whole
    does: before any token, a pinned request is a 502 and a routed one falls back; after the
    first tokens, the client gets them and an ``error`` event in place of the provider's
    last one, and the record says error. The native stream passed that event on as the
    answer's end: a 200, recorded ok, with no fallback tried."""
    behaviour = Behaviour(
        mode="unfinished_response",
        failing_path="/responses",
        response_status=status,
        error_body=RESPONSE_SERVER_ERROR,
    )
    fake.reset(behaviour)
    with live(tmp_path, policy_yaml(fake, on_failure="closed")) as srv:
        pinned, fallback, text = _overloaded_then_fallback(
            srv, "responses", "gpt-4o", (502, "upstream_error")
        )
        assert RESPONSE_SERVER_ERROR["message"] in pinned.json()["error"]["message"]
        assert fallback.headers["x-tiergate-model"] == "claude"
        assert text.strip() == fake.behaviour.text
        fake.reset(replace(behaviour, words_sent=2))
        path, body, _ = CUT_FRONTS["responses"]
        with srv.http.stream("POST", path, json=body) as response:
            events = _sse(response)
        record = _records(srv, 3)[0]
    assert (response.status_code, response.headers["x-tiergate-model"]) == (200, "gpt-4o")
    said = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert said == "Hello from "
    assert events[-1]["type"] == "error", events[-2:]
    assert RESPONSE_SERVER_ERROR["message"] in events[-1]["message"]
    assert not any(e["type"] in ("response.completed", "response.incomplete") for e in events)
    assert (record["status"], record["http_status"], record["fallback"]) == ("error", 502, None)


#: How each provider says, after a stream's opening, that it is rate-limited (its 429 then).
RATE_LIMITED_EVENTS: dict[str, dict[str, Any]] = {
    "responses-error": {
        "type": "error",
        "code": "rate_limit_exceeded",
        "message": "Rate limit reached for gpt-4o on requests per min (RPM): Limit 500.",
        "param": None,
    },
    "responses-failed": _response_failed("rate_limit_exceeded", "Rate limit reached."),
    "messages-error": {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Number of requests has exceeded."},
    },
}


@pytest.mark.parametrize("case", sorted(RATE_LIMITED_EVENTS))
def test_a_rate_limit_event_after_a_native_streams_opening_is_a_429_or_a_fallback(
    tmp_path: Path, fake: FakeProvider, case: str
) -> None:
    """OpenAI ends a Responses stream it rate-limits by an ``error`` (or ``response.failed``)
    event with code ``rate_limit_exceeded``, Anthropic a Messages stream by a
    ``rate_limit_error`` event: their 429 once a stream is open. The native path took it for
    a plain failure, a 502 ``upstream_error`` for a pinned model, where the same 429 answered
    as a status is a 429 on every front. It is a 429 ``upstream_rate_limited`` too now (in
    Anthropic's words on its front), and with a fallback the chain goes on."""
    front = case.partition("-")[0]
    model, other = ("claude", "gpt-4o") if front == "messages" else ("gpt-4o", "claude")
    policy = policy_yaml(fake, on_failure="closed")
    if front == "messages":  # claude first, natively
        policy = policy.replace(
            "closed_models: [gpt-4o, claude]", "closed_models: [claude, gpt-4o]"
        )
    fake.reset(
        Behaviour(
            mode="overloaded_after_open",
            failing_path="/" + front,
            error_body=RATE_LIMITED_EVENTS[case],
        )
    )
    # No cooldown: the routed request calls the rate-limited model again, and falls back.
    with live(tmp_path, policy, cooldown_s=0) as srv:
        pinned, fallback, text = _overloaded_then_fallback(
            srv, front, model, (429, "upstream_rate_limited")
        )
    error = pinned.json()["error"]
    if front == "messages":
        assert error["type"] == "rate_limit_error"
    else:
        assert (error["type"], error["code"]) == ("rate_limit_error", "upstream_rate_limited")
    assert "Rate limit" in error["message"] or "exceeded" in error["message"]
    assert fallback.headers["x-tiergate-model"] == other
    assert fallback.headers["x-tiergate-fallback"] == "closed->closed"
    assert text.strip() == fake.behaviour.text


#: How each protocol's provider ends a stream it has opened, per kind of failure: Anthropic's
#: ``error`` event, the Responses ``error`` event, an OpenAI chat (or compatible) ``{"error"}``
#: chunk.
ERROR_EVENTS: dict[str, dict[str, dict[str, Any]]] = {
    "anthropic": {
        "rate_limit": ANTHROPIC_RATE_LIMITED,
        "overloaded": ANTHROPIC_OVERLOADED,
        "other": {"type": "error", "error": {"type": "api_error", "message": "Internal error"}},
    },
    "responses": {
        "rate_limit": OPENAI_RATE_LIMITED,
        "overloaded": OPENAI_OVERLOADED,
        "other": {"type": "error", "code": "server_error", "message": "Internal error"},
    },
    "openai": {
        "rate_limit": OPENAI_CHAT_RATE_LIMITED,
        "overloaded": OPENAI_CHAT_OVERLOADED,
        "other": {"error": {"message": "Internal error", "type": "server_error", "code": None}},
    },
}
#: Each kind as the same failure answered with a status is: (HTTP status, error code, the
#: type Anthropic's ``error`` event names it by).
ERROR_KINDS = {
    "rate_limit": (429, "upstream_rate_limited", "rate_limit_error"),
    "overloaded": (503, "upstream_overloaded", "overloaded_error"),
    "other": (502, "upstream_error", "api_error"),
}
#: Each way a front's stream reaches a closed model: (front, the closed model, how it is
#: reached through litellm (a key of LITELLM_PATH, or ``claude-via-litellm``) or None, the
#: protocol its provider speaks).
ERROR_EVENT_PATHS: dict[str, tuple[str, str, str | None, str]] = {
    "chat-openai-direct": ("chat", "gpt-4o", None, "openai"),
    "messages-openai-direct": ("messages", "gpt-4o", None, "openai"),
    "messages-anthropic-native": ("messages", "claude", None, "anthropic"),
    "responses-openai-native": ("responses", "gpt-4o", None, "responses"),
    "chat-anthropic-litellm": ("chat", "claude", None, "anthropic"),
    "messages-anthropic-litellm": ("messages", "claude", "claude-via-litellm", "anthropic"),
    "responses-anthropic-litellm": ("responses", "claude", None, "anthropic"),
    **{
        f"{front}-{via}": (front, "gpt-4o", via, "openai")
        for front in ("chat", "messages", "responses")
        for via in LITELLM_PATH
    },
}


def _error_event_policy(fake: FakeProvider, first: str, via: str | None) -> str:
    """The test policy (on_failure: closed) with ``first`` first in the closed chain, reached
    as ``via`` says."""
    policy = policy_yaml(fake, on_failure="closed")
    if via == "claude-via-litellm":
        claude = "litellm_model: anthropic/claude-3-5-sonnet-20241022"
        policy = policy.replace(claude, claude + "\n    transport: litellm")
    elif via is not None:
        policy = policy.replace("litellm_model: openai/gpt-4o", LITELLM_PATH[via])
    if first == "claude":
        policy = policy.replace(
            "closed_models: [gpt-4o, claude]", "closed_models: [claude, gpt-4o]"
        )
    return policy


def _error_events(front: str, events: list[Any]) -> list[Any]:
    """The events of a stream on ``front`` that report an error."""
    if front == "chat":
        return [e for e in events if isinstance(e, dict) and "error" in e]
    return [e for e in events if e["type"] in ("error", "response.failed")]


@pytest.mark.parametrize("kind", sorted(ERROR_KINDS))
@pytest.mark.parametrize("way", sorted(ERROR_EVENT_PATHS))
def test_a_providers_error_event_mid_stream_is_mapped_alike_on_every_path(
    tmp_path: Path, fake: FakeProvider, way: str, kind: str
) -> None:
    """A provider that ends a stream after its first words with its error event (a rate
    limit, an overload, any other failure) gives the client the words and the front's own
    error event (chat: Tiergate's error chunk; messages: Anthropic's ``error`` event;
    responses: the Responses ``error`` event), once, and a record that names the failure
    as the same failure answered with a status is: 429, 503 (529 on the messages front),
    else 502. The direct OpenAI path passed an OpenAI-compatible server's ``{"error": ...}``
    chunk on as a chunk of the answer, then cut the stream as unreachable (502
    ``upstream_unreachable``) whatever it said. A failure after the stream started is a failed
    call for the model's cooldown too (a rate limit cools it at once, as a 429 does): it was
    not counted at all."""
    front, model, via, protocol = ERROR_EVENT_PATHS[way]
    status, code, anthropic_type = ERROR_KINDS[kind]
    if (front, kind) == ("messages", "overloaded"):
        status = 529  # as the messages front answers an overload, Anthropic's status for it
    event = ERROR_EVENTS[protocol][kind]
    said = (event.get("error") or event)["message"]
    fake.reset(Behaviour(mode="error_mid_stream", error_body=event))
    path, body, _ = CUT_FRONTS[front]
    policy = _error_event_policy(fake, model, via)
    with live(tmp_path, policy, cooldown_after_fails=1) as srv:
        with srv.http.stream("POST", path, json={**body, "model": model}) as response:
            events = _sse(response)
        record = _record(srv, response)
        cooling = srv.gateway.cooldowns.status()
    assert (response.status_code, response.headers["x-tiergate-model"]) == (200, model)
    errors = _error_events(front, events)
    assert errors == [events[-1]], events[-3:]
    assert _opening_and_text(front, events[:-1])[1] == "Hello from "
    if front == "chat":
        assert events[-1]["error"]["code"] == code
        message = events[-1]["error"]["message"]
    elif front == "messages":
        assert events[-1]["error"]["type"] == anthropic_type
        message = events[-1]["error"]["message"]
    else:
        assert (events[-1]["type"], events[-1]["code"]) == ("error", code)
        message = events[-1]["message"]
    assert f"{model} sent an error event: {said}" in message, message
    assert (record["status"], record["http_status"], record["error_type"]) == (
        "error",
        status,
        code,
    )
    # A failed call for the model's cooldown, as the same failure before the first token.
    assert cooling[model]["reason"] == code, cooling


@pytest.mark.parametrize("kind", sorted(ERROR_KINDS))
@pytest.mark.parametrize("way", sorted(ERROR_EVENT_PATHS))
def test_a_providers_error_event_before_the_first_token_falls_back(
    tmp_path: Path, fake: FakeProvider, caplog: pytest.LogCaptureFixture, way: str, kind: str
) -> None:
    """The same error event right after the stream's opening, before any token: the chain
    goes on as after any failed call (the other closed model answers whole), and the model
    that failed is counted as failing so (a rate limit cools it at once, as a 429 does). On
    the direct OpenAI path its ``{"error": ...}`` chunk was held as part of the opening and the
    stream taken for one cut: every kind counted as ``upstream_unreachable``. The failure
    logged says the provider sent an error event; it said the model "failed mid-stream",
    though no token had come."""
    front, model, via, protocol = ERROR_EVENT_PATHS[way]
    _, code, _ = ERROR_KINDS[kind]
    path, body, _ = CUT_FRONTS[front]
    failing = {"anthropic": "/messages", "responses": "/responses"}.get(
        protocol, "/chat/completions"
    )
    event = ERROR_EVENTS[protocol][kind]
    said = (event.get("error") or event)["message"]
    fake.reset(Behaviour(mode="overloaded_after_open", failing_path=failing, error_body=event))
    policy = _error_event_policy(fake, model, via)
    with (
        caplog.at_level(logging.WARNING, logger="tiergate.gateway"),
        live(tmp_path, policy, cooldown_after_fails=1) as srv,
    ):
        with srv.http.stream("POST", path, json=body) as response:
            events = _sse(response)
        record = _record(srv, response)
        cooling = srv.gateway.cooldowns.status()
    other = "gpt-4o" if model == "claude" else "claude"
    assert response.status_code == 200
    assert (response.headers["x-tiergate-model"], response.headers["x-tiergate-fallback"]) == (
        other,
        "closed->closed",
    )
    assert _opening_and_text(front, events)[1].strip() == fake.behaviour.text
    assert not _error_events(front, events)
    assert (record["status"], record["model"], record["fallback"]) == (
        "ok",
        other,
        "closed->closed",
    )
    assert cooling[model]["reason"] == code, cooling
    (failed,) = [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith(f"{model} failed for {record['id']}: ")
    ]
    assert failed.endswith(f": {model} sent an error event: {said}"), failed


#: How each protocol's provider refuses a request it calls bad: (the error event in a stream
#: it has opened, the body of its HTTP 400, the code a client is answered with): Anthropic's
#: ``invalid_request_error``, a Responses ``error`` event for a prompt over the window, an
#: OpenAI-compatible server's chunk with the HTTP status in ``code`` (vLLM).
BAD_REQUESTS: dict[str, tuple[dict[str, Any], dict[str, Any], str]] = {
    "anthropic": (
        {"type": "error", "error": {"type": "invalid_request_error", "message": "Bad field"}},
        {"type": "error", "error": {"type": "invalid_request_error", "message": "Bad field"}},
        "upstream_bad_request",
    ),
    "responses": (
        {
            "type": "error",
            "code": "context_length_exceeded",
            "message": "Too long",
            "param": "input",
        },
        {"error": {"code": "context_length_exceeded", "message": "Too long", "param": "input"}},
        "context_length_exceeded",
    ),
    "openai": (
        {"error": {"object": "error", "type": "BadRequestError", "message": "Bad", "code": 400}},
        {"error": {"object": "error", "type": "BadRequestError", "message": "Bad", "code": 400}},
        "upstream_bad_request",
    ),
}


def _error_of(front: str, response: httpx.Response) -> tuple[int, str]:
    """An error answered with a status: the status, and its code (Anthropic's type on the
    Messages front)."""
    error = response.json()["error"]
    return response.status_code, error["type"] if front == "messages" else error["code"]


@pytest.mark.parametrize("way", sorted(ERROR_EVENT_PATHS))
def test_a_providers_bad_request_event_fails_as_its_400_does(
    tmp_path: Path, fake: FakeProvider, way: str
) -> None:
    """A provider's error event that calls the request bad fails it as the same 400 answered
    with its status does: before the first token the client gets that 400 and its code (or
    Anthropic's type), the chain stops there as it does after a 400 (a bad request is bad on
    every model), and the record says so; after the first words the client gets the front's
    error event with that code and the record says error, 400. Neither counts toward the
    model's cooldown: the request was at fault, not the provider. The event was a 502
    ``upstream_error``: the chain went on to the next model, and the model cooled."""
    front, model, via, protocol = ERROR_EVENT_PATHS[way]
    event, body, code = BAD_REQUESTS[protocol]
    path, request, _ = CUT_FRONTS[front]
    policy = _error_event_policy(fake, model, via)
    with live(tmp_path, policy, cooldown_after_fails=1) as srv:
        fake.reset(Behaviour(mode="status", status=400, error_body=body))
        answered = srv.http.post(path, json={**request, "stream": False})
        fake.reset(Behaviour(mode="overloaded_after_open", error_body=event))
        before = srv.http.post(path, json=request)
        called_before = len(fake.received)
        fake.reset(Behaviour(mode="error_mid_stream", error_body=event))
        with srv.http.stream("POST", path, json=request) as response:
            events = _sse(response)
        records = {r["id"]: r for r in _records(srv, 3)}
        cooling = srv.gateway.cooldowns.status()
    expected = (400, "invalid_request_error" if front == "messages" else code)
    assert _error_of(front, answered) == expected, answered.text
    assert _error_of(front, before) == expected, before.text
    assert called_before == 1  # no other model was tried
    assert response.status_code == 200
    assert _error_events(front, events) == [events[-1]], events[-3:]
    assert _opening_and_text(front, events[:-1])[1] == "Hello from "
    error = events[-1]
    if front == "messages":
        assert error["error"]["type"] == "invalid_request_error"
    else:
        assert (error["error"] if front == "chat" else error)["code"] == code
    for sent in (answered, before, response):
        record = records[sent.headers["x-request-id"]]
        assert (record["status"], record["http_status"], record["error_type"]) == (
            "error",
            400,
            code,
        )
    assert model not in cooling, cooling


#: Anthropic's 400 for a prompt over the model's window, in its own words (the fake provider's
#: too, tests/fake_provider.py's window_refusal): its type names any bad request, only its
#: message says the window.
PROMPT_TOO_LONG = {
    "type": "error",
    "error": {
        "type": "invalid_request_error",
        "message": "prompt is too long: 215000 tokens > 200000 maximum",
    },
}
#: The ways a front reaches a Claude model (native, through litellm).
CLAUDE_WAYS = sorted(
    way for way, (_, model, _, _) in ERROR_EVENT_PATHS.items() if model == "claude"
)


def _windowed(policy: str, **windows: int) -> str:
    """``policy`` with a ``context_window`` for each closed model named (``gpt_4o``)."""
    for name, window in windows.items():
        head = f"  {name.replace('_', '-')}:\n    tier: closed\n"
        policy = policy.replace(head, f"{head}    context_window: {window}\n")
    return policy


@pytest.mark.parametrize("way", CLAUDE_WAYS)
def test_anthropics_prompt_too_long_is_over_the_window_on_every_path(
    tmp_path: Path, fake: FakeProvider, way: str
) -> None:
    """Anthropic's "prompt is too long" (a 400, or its error event before the first token) is
    a prompt over the window as OpenAI's ``context_length_exceeded`` is, on every path to a
    Claude model: the client gets that code (Anthropic's ``invalid_request_error`` on the
    Messages front) and the record says it; the chain goes on to a model with a larger
    ``context_window`` (docs/policy.md), else the 400 is the answer; the model does not cool.
    On the native path it was ``upstream_bad_request``, final, with gpt-4o's larger window
    never tried."""
    front, model, via, _ = ERROR_EVENT_PATHS[way]
    path, request, _ = CUT_FRONTS[front]
    policy = _error_event_policy(fake, model, via)
    refused = (400, "invalid_request_error" if front == "messages" else "context_length_exceeded")
    for larger in (False, True):
        windowed = _windowed(policy, claude=200000, gpt_4o=400000 if larger else 100000)
        home = tmp_path / ("larger" if larger else "smaller")
        home.mkdir()
        with live(home, windowed, cooldown_after_fails=1) as srv:
            answers = []
            for mode in ("status", "overloaded_after_open"):
                fake.reset(
                    Behaviour(
                        mode=mode, status=400, error_body=PROMPT_TOO_LONG, failing_path="/messages"
                    )
                )
                answers.append(srv.http.post(path, json={**request, "stream": mode != "status"}))
            records = {r["id"]: r for r in _records(srv, 2)}
            cooling = srv.gateway.cooldowns.status()
        for answer in answers:
            record = records[answer.headers["x-request-id"]]
            if larger:
                assert answer.status_code == 200, answer.text
                assert (record["model"], record["fallback"]) == ("gpt-4o", "closed->closed")
            else:
                assert _error_of(front, answer) == refused, answer.text
                assert (record["http_status"], record["error_type"]) == (
                    400,
                    "context_length_exceeded",
                )
        assert model not in cooling, cooling


#: 400s that call the request bad and quote it (a validator's ``input_value``, an echoed
#: field), where the quoted text holds a provider's words for a prompt over the window: by
#: Anthropic's type (no code), and an OpenAI-compatible server's (vLLM's ``code: 400``).
QUOTING_400S = {
    "claude": {
        "type": "error",
        "error": {
            "type": "invalid_request_error",
            "message": "messages.0.content.0.text: unexpected value 'Summarise this: the "
            "prompt is too long: 9 tokens > 8 maximum, said the old model'",
        },
    },
    "gpt-4o": {
        "error": {
            "object": "error",
            "message": "1 validation error for ChatCompletionRequest\nmessages.0.role\n  Input "
            "should be 'system', 'user' or 'assistant' [type=literal_error, input_value={'role':"
            " 'critic', 'content': \"This model's maximum context length is 8 tokens, it "
            'said"}]',
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    },
}
#: The paths such a 400 comes back on: (model, front, how the model is reached). Claude on
#: the Messages front is its native path, on the chat front litellm's (whose own class reads
#: "prompt is too long" anywhere in its text); gpt-4o the direct path, or litellm's.
QUOTING_WAYS: dict[str, tuple[str, str, str | None]] = {
    "claude": ("claude", "messages", None),
    "claude-via-litellm": ("claude", "chat", None),
    "gpt-4o": ("gpt-4o", "chat", None),
    "gpt-4o-via-litellm": ("gpt-4o", "chat", "openai-via-litellm"),
}


@pytest.mark.parametrize("way", sorted(QUOTING_WAYS))
def test_a_bad_request_that_quotes_window_words_stays_the_clients_400(
    tmp_path: Path, fake: FakeProvider, way: str
) -> None:
    """A provider's 400 whose message quotes the request (here a user's words that read like a
    refusal for the window) is the request's own 400: the client gets it, and the chain does
    not go on to a model with a larger window. The words are the provider's only where its
    message begins with them, through litellm too; anywhere in it, the quote made it
    ``context_length_exceeded`` and the request was served by the next model."""
    model, front, via = QUOTING_WAYS[way]
    policy = _error_event_policy(fake, model, via)
    windows = {"claude": 100000, "gpt_4o": 400000}
    if model == "gpt-4o":
        windows = {"claude": 400000, "gpt_4o": 100000}
    path, request, failing = CUT_FRONTS[front]
    failing = "/messages" if model == "claude" else "/chat/completions"
    with live(tmp_path, _windowed(policy, **windows), cooldown_after_fails=1) as srv:
        fake.reset(
            Behaviour(
                mode="status", status=400, error_body=QUOTING_400S[model], failing_path=failing
            )
        )
        answer = srv.http.post(path, json={**request, "stream": False})
        record = _record(srv, answer)
    refused = "invalid_request_error" if front == "messages" else "upstream_bad_request"
    assert _error_of(front, answer) == (400, refused), answer.text
    assert (record["model"], record["error_type"]) == (model, "upstream_bad_request")


#: OpenAI's 404s on the Responses API: for a model it does not have, and for an input item it
#: does not hold (an id from an earlier Response, sent with ``store: false``, which the
#: Responses front always sends), which names the request's field.
NOT_FOUND_404S = {
    "a model that does not exist": {
        "error": {
            "message": "The model `gpt-4o` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        }
    },
    "an input item it does not hold": {
        "error": {
            "message": "Item with id 'rs_123' not found. Items are not persisted when `store` "
            "is set to false. Try again with `store` set to true, or remove this item from "
            "your input.",
            "type": "invalid_request_error",
            "param": "input",
            "code": None,
        }
    },
}


@pytest.mark.parametrize("case", sorted(NOT_FOUND_404S))
def test_a_404_for_the_requests_own_item_is_its_400_not_the_models(
    tmp_path: Path, fake: FakeProvider, case: str
) -> None:
    """A 404 for a model that does not exist is the model's configuration: the chain goes on
    and claude answers. A 404 for an input item of the client's history is the request's: the
    client gets a 400 naming ``input`` and nothing else is called; it was taken for a missing
    model, a 502 that the chain went past (claude, through the chat translation, served the
    request without the item), or that told a pinned client its model does not exist."""
    policy = _error_event_policy(fake, "gpt-4o", None)
    request = {
        "model": "auto",
        "input": [
            {"role": "user", "content": "HARD proof please"},
            {"type": "reasoning", "id": "rs_123", "summary": []},
            {"role": "assistant", "content": "Here is a start."},
            {"role": "user", "content": "HARD: go on"},
        ],
    }
    with live(tmp_path, policy, cooldown_after_fails=1) as srv:
        fake.reset(
            Behaviour(
                mode="status",
                status=404,
                error_body=NOT_FOUND_404S[case],
                failing_path="/responses",
            )
        )
        answer = srv.http.post("/v1/responses", json=request)
        record = _record(srv, answer)
        cooling = srv.gateway.cooldowns.status()
    called = [r.path for r in fake.received]
    if case == "a model that does not exist":
        assert answer.status_code == 200, answer.text
        assert (record["model"], record["fallback"]) == ("claude", "closed->closed")
        assert called == ["/v1/responses", "/v1/messages"]
        assert cooling["gpt-4o"]["reason"] == "upstream_error", cooling  # not tried meanwhile
    else:
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert (error["code"], error["param"]) == ("upstream_bad_request", "input")
        assert (record["model"], record["error_type"]) == ("gpt-4o", "upstream_bad_request")
        assert called == ["/v1/responses"] and "gpt-4o" not in cooling, cooling


#: Anthropic's 404s to a /v1/messages request that names a code execution container and a file
#: of its Files API: for the file, which it does not hold (its Files API docs), for the model,
#: and for a wrong path. None names a field.
CONTAINER_ID = "container_011CPR5CNjB747bTd36fQLFk"
FILE_ID = "file_011CNha8iCJcU1wXNR6q4V8w"
ANTHROPIC_404S = {
    "an id the client sent": f"File not found: {FILE_ID}",
    "a model that does not exist": "model: claude-3-5-sonnet-20241022",
    "a wrong path": "Not Found",
}


def _claude_404(
    tmp_path: Path,
    fake: FakeProvider,
    said: str,
    request: dict[str, Any],
    via: str | None,
    *,
    how: str = "status",
) -> tuple[httpx.Response, dict[str, Any], dict[str, Any]]:
    """``request`` on /v1/messages, claude first (reached as ``via`` says) answering 404
    ``not_found_error`` ``said``, with its status or as the event right after its stream's
    opening (``how``): (the answer, its record, the cooldowns after it)."""
    body = {"type": "error", "error": {"type": "not_found_error", "message": said}}
    policy = _error_event_policy(fake, "claude", via)
    with live(tmp_path, policy, cooldown_after_fails=1) as srv:
        if how == "status":
            fake.reset(Behaviour("status", status=404, error_body=body, failing_path="/messages"))
        else:
            fake.reset(
                Behaviour("overloaded_after_open", error_body=body, failing_path="/messages")
            )
        answer = srv.http.post("/v1/messages", json=request)
        return answer, _record(srv, answer), srv.gateway.cooldowns.status()


@pytest.mark.parametrize("how", ["status", "event"])
@pytest.mark.parametrize("via", [None, "claude-via-litellm"])
@pytest.mark.parametrize("case", sorted(ANTHROPIC_404S))
def test_a_404_for_the_clients_own_id_cools_no_claude(
    tmp_path: Path, fake: FakeProvider, case: str, via: str | None, how: str
) -> None:
    """A client's container or file id that Anthropic does not hold is answered 404
    ``not_found_error``, as a missing model is: it was a 502 and claude cooled, refused to
    every client for one client's bad id. Now it is that client's 400 and claude does not
    cool; a missing model or a wrong path still cools it. So too where the 404 comes as the
    ``not_found_error`` event of a stream (``how``), which was read without the request: a
    502 that cooled claude whatever it named."""
    content: list[dict[str, Any]] = [{"type": "text", "text": "Chart the figures in this file."}]
    if via is None:  # the block needs the native path; container goes through litellm too
        content.append({"type": "container_upload", "file_id": FILE_ID})
    request = {
        "model": "auto",
        "max_tokens": 20,
        "container": CONTAINER_ID,
        "messages": [{"role": "user", "content": content}],
        "stream": how == "event",
    }
    said = ANTHROPIC_404S[case]
    if via is not None and case == "an id the client sent":
        said = f"container: {CONTAINER_ID} not found"  # a 404 that names the container id
    answer, record, cooling = _claude_404(tmp_path, fake, said, request, via, how=how)
    assert [r.path for r in fake.received] == ["/v1/messages"]  # no other model takes it
    assert record["model"] == "claude"
    if case == "an id the client sent":
        assert _error_of("messages", answer) == (400, "invalid_request_error"), answer.text
        assert record["error_type"] == "upstream_bad_request"
        assert "claude" not in cooling, cooling
    else:
        assert answer.status_code == 502, answer.text
        assert cooling["claude"]["reason"] == "upstream_error", cooling


@pytest.mark.parametrize("how", ["status", "event"])
def test_a_404_for_a_retired_model_falls_back_though_a_tool_call_names_it(
    tmp_path: Path, fake: FakeProvider, how: str
) -> None:
    """An orchestrating agent's history holds a tool call that names the model a subtask went
    to (``model_id``). When Anthropic retired that model and answered claude's call "model:
    claude-3-5-sonnet-20241022", the 404 was read as naming the client's own id: a final 400
    to the client, no fallback to gpt-4o, and claude never cooled, so every such request met
    the retired model first. So too where the 404 comes as its stream's event (``how``)."""
    retired = "claude-3-5-sonnet-20241022"
    request = {
        "model": "auto",
        "max_tokens": 20,
        "stream": how == "event",
        "tools": [{"name": "delegate", "input_schema": {"type": "object"}}],
        "messages": [
            {"role": "user", "content": "HARD: plan the report"},
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "toolu_01A09q90qw90lq917835lq9",
                        "name": "delegate",
                        "input": {"model_id": retired, "task": "sum up the figures"},
                    }
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "toolu_01A09q90qw90lq917835lq9"},
                    {"type": "text", "text": "HARD: go on"},
                ],
            },
        ],
    }
    said = f"model: {retired}"
    answer, record, cooling = _claude_404(tmp_path, fake, said, request, None, how=how)
    assert answer.status_code == 200, answer.text
    assert (record["model"], record["fallback"]) == ("gpt-4o", "closed->closed")
    assert [r.path for r in fake.received] == ["/v1/messages", "/v1/chat/completions"]
    assert cooling["claude"]["reason"] == "upstream_error", cooling


# -- local tier faults -------------------------------------------------------------------------


@pytest.mark.parametrize("front", ["/v1/chat/completions", "/v1/messages"])
def test_an_internal_error_still_names_its_request(
    server: LiveServer, local: ScriptedLocal, front: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A defect (not a Tiergate error) answers 500 with the request's x-request-id, as every
    error of the chat endpoints does, so the client's report leads to the record and to the
    traceback's log line."""
    local.mode = "defect"
    body = {**EASY, "max_tokens": 16}
    with caplog.at_level(logging.ERROR):
        response = server.http.post(front, json=body)
    assert response.status_code == 500
    request_id = response.headers["x-request-id"]
    assert response.headers["x-tiergate-rule"]
    record = _record(server, response)
    assert (record["status"], record["http_status"], record["error_type"]) == (
        "error",
        500,
        "internal_error",
    )
    (line,) = [r for r in caplog.records if r.exc_info]
    assert getattr(line, "request_id", None) == request_id


def test_local_overloaded_spills_or_refuses(
    server: LiveServer, fake: FakeProvider, local: ScriptedLocal
) -> None:
    local.mode = "hold"
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(_post, server, EASY)
        assert wait_for(lambda: local.gate.running == 1)
        spilled = _post(server, EASY)
        assert spilled.status_code == 200
        assert spilled.headers["x-tiergate-fallback"] == "local-full->closed"
        private = _post(server, PII)  # local-only: never spilled to a closed provider
        assert private.status_code == 429
        assert private.json()["error"]["code"] == "local_queue_full"
        assert private.headers["retry-after"] == "1"
        local.release.set()
        assert held.result().status_code == 200
    assert all("PII" not in json.dumps(r.body) for r in fake.received)
    assert len(fake.received) == 1
    rows = {r["id"]: r for r in _records(server, 3)}
    assert rows[spilled.headers["x-request-id"]]["fallback"] == "local-full->closed"
    assert rows[private.headers["x-request-id"]]["http_status"] == 429


def test_a_request_pinning_the_local_model_is_not_spilled(
    server: LiveServer, fake: FakeProvider, local: ScriptedLocal
) -> None:
    """docs/policy.md: a pinned model is never swapped. A full local queue answers a request
    that pins the local model 429 with Retry-After; its prompt does not go to a closed
    provider."""
    local.mode = "hold"
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(_post, server, EASY)
        assert wait_for(lambda: local.gate.running == 1)
        pinned = _post(server, {**EASY, "model": "local"})
        local.release.set()
        assert held.result().status_code == 200
    assert pinned.status_code == 429
    assert pinned.json()["error"]["code"] == "local_queue_full"
    assert pinned.headers["retry-after"] == "1"
    assert "x-tiergate-tier" not in pinned.headers
    assert fake.received == []
    rows = {r["id"]: r for r in _records(server, 2)}
    assert rows[pinned.headers["x-request-id"]]["http_status"] == 429


@pytest.mark.parametrize("stream", [False, True])
def test_local_failing_falls_back_to_closed(
    tmp_path: Path, fake: FakeProvider, stream: bool
) -> None:
    fake.reset()
    local = ScriptedLocal()
    local.mode = "fail"
    with live(tmp_path, policy_yaml(fake, on_failure="closed"), local_backend_obj=local) as srv:
        response = _post(srv, {**EASY, "stream": stream})
        assert response.status_code == 200
        assert response.headers["x-tiergate-fallback"] == "local->closed"
        assert response.headers["x-tiergate-model"] == "gpt-4o"
        record = _record(srv, response)
        assert (record["status"], record["fallback"]) == ("ok", "local->closed")


# -- infrastructure faults ---------------------------------------------------------------------


def _traffic(server: LiveServer, stop: threading.Event, statuses: list[int]) -> None:
    while not stop.is_set():
        statuses.append(server.http.post("/v1/chat/completions", json=EASY).status_code)


@pytest.mark.skipif(redis_binary() is None, reason="no redis-server binary")
def test_redis_stopped_and_restarted_during_traffic(tmp_path: Path, fake: FakeProvider) -> None:
    """Rate limits and outcome records both live in Redis; a Redis outage fails no request and
    loses no record (limits count in process meanwhile, records buffer and journal)."""
    from router.outcomes_redis import RedisOutcomeStore

    with (
        RedisServer(tmp_path / "redis") as redis_server,
        live(
            tmp_path,
            policy_yaml(fake),
            local_backend_obj=ScriptedLocal(queue_size=8),
            outcomes=RedisOutcomeStore(redis_server.url, journal=tmp_path / "journal.jsonl"),
            redis_url=redis_server.url,
            rpm_limit=1_000_000,
            api_keys_file=_key_file(tmp_path),
        ) as srv,
    ):
        stop, statuses = threading.Event(), []
        with ThreadPoolExecutor(2) as pool:
            workers = [pool.submit(_keyed_traffic, srv, stop, statuses) for _ in range(2)]
            assert wait_for(lambda: len(statuses) > 20)
            assert redis_server.client().keys("tiergate:rl:*")
            redis_server.stop()
            down = len(statuses)
            assert wait_for(lambda: len(statuses) > down + 30)
            redis_server.start()  # empty: the counters must be written again
            assert wait_for(lambda: bool(redis_server.client().keys("tiergate:rl:*")), 10)
            up = len(statuses)
            assert wait_for(lambda: len(statuses) > up + 20)
            stop.set()
            for worker in workers:
                worker.result()
        assert set(statuses) == {200}
        _records(srv, len(statuses))


def _key_file(tmp_path: Path) -> Path:
    from router.auth import hash_key

    path = tmp_path / "keys.yaml"
    path.write_text(f"keys:\n  - {{sha256: {hash_key('tg-k')}, tenant: t}}\n")
    return path


def _keyed_traffic(server: LiveServer, stop: threading.Event, statuses: list[int]) -> None:
    headers = {"authorization": "Bearer tg-k"}
    while not stop.is_set():
        response = server.http.post("/v1/chat/completions", json=EASY, headers=headers)
        statuses.append(response.status_code)


def test_invalid_policy_during_traffic_keeps_the_last_good_one(
    server: LiveServer, tmp_path: Path
) -> None:
    holder = server.gateway.policies
    good_text = holder.path.read_text()
    good = holder.policy.digest
    stop, statuses = threading.Event(), []
    with ThreadPoolExecutor(2) as pool:
        workers = [pool.submit(_traffic, server, stop, statuses) for _ in range(2)]
        assert wait_for(lambda: len(statuses) > 10)
        holder.path.write_text(good_text + "rules: [{name: broken, when: {nope: 1}}]\n")
        assert wait_for(lambda: holder.last_error is not None)
        seen = len(statuses)
        assert wait_for(lambda: len(statuses) > seen + 20)
        stop.set()
        for worker in workers:
            worker.result()
    assert set(statuses) == {200}
    assert holder.policy.digest == good
    ready = server.http.get("/readyz").json()
    assert ready["policy"]["version"] == good and ready["policy"]["last_reload_error"]
    _records(server, len(statuses))


# -- client faults -----------------------------------------------------------------------------


#: Each way a closed model's stream is read: (front, closed model called first, how gpt-4o is
#: reached through litellm or None). claude on the chat front is read through litellm.
STREAM_PATHS: dict[str, tuple[str, str, str | None]] = {
    "openai-direct": ("chat", "gpt-4o", None),
    "mistral-litellm": ("chat", "gpt-4o", "mistral"),
    "openai-litellm": ("chat", "gpt-4o", "openai-via-litellm"),
    "anthropic-litellm": ("chat", "claude", None),
    "messages-native": ("messages", "claude", None),
    "responses-native": ("responses", "gpt-4o", None),
}


@pytest.mark.parametrize("way", sorted(STREAM_PATHS))
def test_client_disconnecting_mid_stream_cancels_upstream(
    tmp_path: Path, fake: FakeProvider, way: str
) -> None:
    """A client that leaves mid-stream, while the provider generates its answer, closes the
    provider's connection at once on every path (direct, through litellm, native), so a
    provider that stops on a closed stream (OpenAI, Anthropic) stops generating, and billing,
    tokens nobody reads; the request is recorded aborted."""
    front, first, via = STREAM_PATHS[way]
    words = " ".join(f"w{i}" for i in range(40))
    fake.reset(Behaviour(text=words, chunk_delay_s=0.1))
    policy = _through_litellm(fake, via) if via else policy_yaml(fake, on_failure="closed")
    if first == "claude":
        policy = policy.replace(
            "closed_models: [gpt-4o, claude]", "closed_models: [claude, gpt-4o]"
        )
    path, body, _ = CUT_FRONTS[front]
    with live(tmp_path, policy) as srv:
        with httpx.stream(  # a real socket: the client's disconnect is what is under test
            "POST", srv.url + path, json=body
        ) as response:
            rid = response.headers["x-request-id"]
            for line in response.iter_lines():
                if line.startswith("data: "):
                    break  # the client goes away after the first event
        record = _records(srv, 1)[0]
        # the upstream stream was closed while the server runs (not by its shutdown): the
        # provider's next write failed, long before the end
        assert wait_for(lambda: fake.broken_streams == 1, 5)
        assert fake.sent_chunks < 20, fake.sent_chunks
    assert response.headers["x-tiergate-model"] == first
    assert record["id"] == rid
    assert (record["status"], record["http_status"]) == ("aborted", 499)


@pytest.mark.parametrize(
    ("way", "keepalive_s"),
    [
        *((way, 0.0) for way in sorted(STREAM_PATHS)),
        pytest.param("openai-direct", 5.0, id="openai-direct-kept-alive"),
    ],
)
def test_client_leaving_a_fast_stream_cancels_upstream(
    tmp_path: Path, fake: FakeProvider, way: str, keepalive_s: float
) -> None:
    """A client that leaves a stream the provider sends as fast as it can (every read is ready
    at once, so the loop that relays it never waits) closes the provider's connection too,
    long before the end, and the request is recorded aborted: it was read to the end, billed,
    and recorded ok."""
    front, first, via = STREAM_PATHS[way]
    parts, size = 2000, 32 * 1024
    fake.reset(Behaviour(text=" ".join("x" * size for _ in range(parts))))
    policy = _through_litellm(fake, via) if via else policy_yaml(fake, on_failure="closed")
    if first == "claude":
        policy = policy.replace(
            "closed_models: [gpt-4o, claude]", "closed_models: [claude, gpt-4o]"
        )
    path, body, _ = CUT_FRONTS[front]
    with live(tmp_path, policy, stream_keepalive_s=keepalive_s) as srv:
        with httpx.stream(  # a real socket: the client's disconnect is what is under test
            "POST", srv.url + path, json=body, timeout=30
        ) as response:
            rid = response.headers["x-request-id"]
            next(response.iter_raw(64 * 1024))  # the client reads 64 KiB and goes
        assert wait_for(lambda: fake.broken_streams == 1, 5), fake.sent_chunks
        record = _records(srv, 1)[0]
        assert fake.sent_chunks < parts // 2, fake.sent_chunks
    assert response.headers["x-tiergate-model"] == first
    assert record["id"] == rid
    assert (record["status"], record["http_status"]) == ("aborted", 499)


#: A chat request's ASGI scope as uvicorn's HTTP protocols make it (ASGI 2.3).
_CHAT_SCOPE: dict[str, Any] = {
    "type": "http",
    "asgi": {"version": "3.0", "spec_version": "2.3"},
    "http_version": "1.1",
    "method": "POST",
    "scheme": "http",
    "path": "/v1/chat/completions",
    "raw_path": b"/v1/chat/completions",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")],
    "client": ("127.0.0.1", 50000),
    "server": ("127.0.0.1", 8000),
}


async def _to_a_client_that_leaves(
    app: Any, body: dict[str, Any], leave: str, opened: Callable[[], bool]
) -> list[bytes]:
    """Serve ``body`` on /v1/chat/completions through the ASGI app as uvicorn calls it (ASGI
    2.3: Starlette listens for the client's disconnect beside the loop that sends the parts,
    and cancels that loop), to a client that leaves as the response begins (``begins``), in
    the send of the first keep-alive once ``opened()`` (``keep-alive``), or at once in the send
    of the first event (``event``); the parts it was sent."""
    raw = json.dumps(body).encode()
    gone = asyncio.Event()
    sent: list[bytes] = []
    read = False

    async def receive() -> dict[str, Any]:
        nonlocal read
        if not read:
            read = True
            return {"type": "http.request", "body": raw, "more_body": False}
        if leave == "begins" and anyio.current_effective_deadline() != -math.inf:
            gone.set()  # Starlette's listener (not the gateway's probe, in a cancelled scope)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await asyncio.sleep(0)  # a send may wait: uvicorn's does while the socket's buffer is full
        part = message.get("body") if message["type"] == "http.response.body" else None
        if not part:
            return
        sent.append(part)
        if leave == ("keep-alive" if part.startswith(b":") else "event"):
            while leave == "keep-alive" and not opened():
                await asyncio.sleep(0.01)
            gone.set()
            await asyncio.Event().wait()  # a client that stopped reading, then left

    await app(dict(_CHAT_SCOPE), receive, send)
    return sent


@pytest.mark.parametrize(
    ("keepalive_s", "leave"),
    [(0.0, "begins"), (0.0, "event"), (0.05, "begins"), (0.05, "keep-alive"), (0.05, "event")],
)
def test_a_client_leaving_as_its_stream_begins_or_in_a_send_ends_it_at_once(
    tmp_path: Path, fake: FakeProvider, keepalive_s: float, leave: str
) -> None:
    """Starlette cancels the loop that sends a stream's parts when its client leaves: before
    the first part (the client left as the response began), or in a send (the client stopped
    reading). It closes no parts: the provider streamed on, billing tokens nobody reads, and
    the request was recorded only when the garbage collector got to its generators (a body
    closed before its first step runs none of its code). With keep-alives, a call whose stream
    had not opened went on, and one that had (left in a keep-alive's send) was never closed.
    The stream ends, and is recorded, as the response ends."""
    fake.reset(Behaviour(text=" ".join(["word"] * 40), chunk_delay_s=0.05))
    with live(tmp_path, policy_yaml(fake), stream_keepalive_s=keepalive_s) as srv:
        store = srv.gateway.outcomes

        async def scenario() -> tuple[int, list[bytes]]:
            body = {**HARD, "stream": True}
            sent = await _to_a_client_that_leaves(
                srv.app, body, leave, lambda: fake.sent_chunks >= 3
            )
            return (store.count() if store.flush(5) else -1), sent  # nothing else ran first

        recorded, sent = srv.run(scenario)
        cut = wait_for(lambda: fake.broken_streams == 1, 2)  # the provider saw it go
        store.flush()
        rows = store.recent(5)
    if leave == "begins":
        assert sent == []
    else:  # it left in the send of its last part
        assert sent[-1].startswith(b": keep-alive" if leave == "keep-alive" else b"data: "), sent
    assert recorded == 1
    assert [(r["status"], r["http_status"]) for r in rows] == [("aborted", 499)]
    assert cut and fake.sent_chunks < 20, fake.sent_chunks


@pytest.mark.parametrize("keepalive_s", [0.0, 0.05])
@pytest.mark.parametrize(
    ("front", "last"), [("messages", b"message_stop"), ("responses", b"response.completed")]
)
def test_a_client_leaving_in_the_send_of_a_front_s_last_event_is_recorded_aborted(
    tmp_path: Path, fake: FakeProvider, front: str, last: bytes, keepalive_s: float
) -> None:
    """A front's last event is framed after the chat stream ended; its request is recorded
    once that event went out, and ``aborted`` where its client left first. With keep-alives,
    the part pump read one part ahead of the client: it read on past the last event as soon
    as it was queued, and the request was recorded ``ok``, 200, though its client left in that
    event's send. It reads a part only once the one before it was sent."""
    fake.reset(Behaviour(text="a short answer"))
    path, body, _ = CUT_FRONTS[front]
    with live(tmp_path, policy_yaml(fake), stream_keepalive_s=keepalive_s) as srv:
        store = srv.gateway.outcomes

        async def scenario() -> list[bytes]:
            raw = json.dumps(body).encode()
            gone, sent, read = asyncio.Event(), [], False

            async def receive() -> dict[str, Any]:
                nonlocal read
                if not read:
                    read = True
                    return {"type": "http.request", "body": raw, "more_body": False}
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                await asyncio.sleep(0)
                part = message.get("body") if message["type"] == "http.response.body" else None
                if part:
                    sent.append(part)
                if part and last in part:  # the client stops reading here, then leaves
                    gone.set()
                    await asyncio.Event().wait()

            scope = {**_CHAT_SCOPE, "path": path, "raw_path": path.encode()}
            await srv.app(scope, receive, send)
            return sent

        sent = srv.run(scenario)
        assert store.flush(5)
        rows = store.recent(5)
    assert last in sent[-1], sent
    assert [(r["status"], r["http_status"], r["front"]) for r in rows] == [("aborted", 499, front)]


def test_a_request_stopped_as_its_stream_opens_is_recorded_and_closed_at_once(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """With keep-alives the call runs as a task the handler waits on for a keep-alive's time.
    Stopped by the server at shutdown (``tiergate serve`` cancels the requests still running)
    just as that task opened its stream, the handler's wait was cancelled and only a call
    still opening was stopped: the stream it had opened stayed open, the provider streaming
    on, and the request was not recorded until the garbage collector got to it, though the
    503 said the server stopped it. It is closed and recorded as stopped, at once."""
    fake.reset(Behaviour(text=" ".join(["word"] * 40), chunk_delay_s=0.05))
    with live(tmp_path, policy_yaml(fake), stream_keepalive_s=5.0) as srv:
        gateway, store = srv.gateway, srv.gateway.outcomes
        serve = gateway.serve
        raw = json.dumps({**HARD, "stream": True}).encode()
        sent: list[dict[str, Any]] = []

        async def scenario() -> int:
            handling: asyncio.Future[None] | None = None

            async def opened_as_the_server_stops(call: Any) -> Any:
                answer = await serve(call)
                gateway.stopping = True  # as tiergate serve does, then cancels the request
                assert handling is not None
                asyncio.get_running_loop().call_soon(handling.cancel)
                return answer

            bodies = [{"type": "http.request", "body": raw, "more_body": False}]

            async def receive() -> dict[str, Any]:
                if bodies:
                    return bodies.pop()
                await asyncio.Event().wait()  # a client that waits for its answer
                return {"type": "http.disconnect"}

            async def send(message: dict[str, Any]) -> None:
                sent.append(message)

            gateway.serve = opened_as_the_server_stops  # type: ignore[method-assign]
            handling = asyncio.ensure_future(srv.app(dict(_CHAT_SCOPE), receive, send))
            await asyncio.wait({handling})  # the handler (kept: it holds what it left open)
            return store.count() if store.flush(5) else -1  # nothing else ran first

        try:
            recorded = srv.run(scenario)
        finally:
            gateway.stopping = False
        cut = wait_for(lambda: fake.broken_streams == 1, 2)
        store.flush()
        rows = store.recent(5)
    assert sent[0]["status"] == 503
    assert recorded == 1
    assert [(r["status"], r["http_status"]) for r in rows] == [("error", 503)]
    assert cut and fake.sent_chunks < 20, fake.sent_chunks


def test_client_disconnecting_mid_stream_stops_local_generation(
    server: LiveServer, local: ScriptedLocal
) -> None:
    local.words, local.token_delay_s = 100, 0.05
    with httpx.stream(  # a real socket: the client's disconnect is what is under test
        "POST", server.url + "/v1/chat/completions", json={**EASY, "stream": True}
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                break
    assert wait_for(lambda: local.cancelled == 1, 5)
    assert local.gate.depth == 0
    assert _records(server, 1)[0]["status"] == "aborted"


def test_slow_client_gets_backpressure_not_buffering(
    server: LiveServer, fake: FakeProvider
) -> None:
    """A client that stops reading a 64 MB stream holds the upstream back (bounded memory),
    and other clients are served meanwhile."""
    chunk_words, size = 2000, 32 * 1024
    fake.reset(Behaviour(text=" ".join(["x" * size] * chunk_words)))
    total = chunk_words * size
    with httpx.stream(  # a real socket: its buffers are what is under test
        "POST", server.url + "/v1/chat/completions", json={**HARD, "stream": True}, timeout=60
    ) as response:
        assert response.status_code == 200
        parts = response.iter_raw(64 * 1024)
        received = len(next(parts))
        time.sleep(2.0)  # the client stalls
        buffered = fake.sent_chunks * size
        assert buffered < total / 2, f"{buffered} of {total} bytes left the provider"
        url = server.url + "/v1/chat/completions"
        others = [httpx.post(url, json=EASY, timeout=30).status_code for _ in range(10)]
        assert others == [200] * 10
        assert fake.sent_chunks * size < total / 2  # the stalled stream still held back
        received += sum(len(part) for part in parts)
    assert received > total
    assert fake.sent_chunks >= chunk_words
    _records(server, 11)


def test_oversized_body_is_refused_and_recorded(server: LiveServer) -> None:
    body = {"model": "auto", "messages": [{"role": "user", "content": "x" * (9 * 1024 * 1024)}]}
    response = _post(server, body)
    assert response.status_code == 413
    assert response.json()["error"]["type"] == "invalid_request_error"
    record = _record(server, response)
    assert (record["status"], record["http_status"]) == ("error", 413)


# -- outcome writer faults ---------------------------------------------------------------------


def test_a_lone_surrogate_in_a_prompt_does_not_stop_recording(
    tmp_path: Path, fake: FakeProvider
) -> None:
    fake.reset()
    with live(
        tmp_path, policy_yaml(fake, store_prompts="full"), local_backend_obj=ScriptedLocal()
    ) as server:
        raw = b'{"model": "auto", "messages": [{"role": "user", "content": "Hi \\ud800"}]}'
        first = server.http.post(
            "/v1/chat/completions",
            content=raw,
            headers={"content-type": "application/json"},
        )
        assert first.status_code == 200, first.text
        later = [_post(server, EASY).status_code for _ in range(3)]
        assert later == [200] * 3
        rows = _records(server, 4)
        assert rows[-1]["prompt"] == "Hi \ufffd"
        ready = server.http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["outcomes"]["writer_alive"] is True


def test_a_dead_outcome_writer_fails_readiness_and_is_restarted(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = server.gateway.outcomes
    real = store._write
    failures = [SystemExit("injected: the writer thread dies")]

    def write(*args: Any) -> Any:
        if failures:
            raise failures.pop()
        return real(*args)

    monkeypatch.setattr(store, "_write", write)
    first = _post(server, EASY)  # its record is held by the writer as it dies
    assert first.status_code == 200
    assert wait_for(lambda: not store.health()["writer_alive"])
    ready = server.http.get("/readyz")
    assert ready.status_code == 503
    assert "outcome-writer died" in ready.json()["outcomes"]["restarted"]
    again = server.http.get("/readyz")
    assert again.status_code == 200 and again.json()["outcomes"]["restarts"] == 1
    response = _post(server, EASY)
    assert response.status_code == 200
    assert wait_for(lambda: store.get(response.headers["x-request-id"]) is not None)
    assert store.flush() and store.health()["dropped"] == 0
    assert store.get(first.headers["x-request-id"]) is not None  # taken back by the restart


def test_client_leaving_a_non_streaming_request_stops_local_generation(
    server: LiveServer, local: ScriptedLocal
) -> None:
    # The local model used to generate the whole answer for a client that had gone, holding its
    # only slot, and the request was recorded ok.
    local.words, local.token_delay_s = 400, 0.02
    with pytest.raises(httpx.ReadTimeout):  # a real socket: the client hangs up after 1 s
        httpx.post(server.url + "/v1/chat/completions", json=EASY, timeout=1.0)
    assert wait_for(lambda: local.cancelled == 1, 5)
    assert local.gate.depth == 0
    record = _records(server, 1)[0]
    assert (record["status"], record["http_status"]) == ("aborted", 499)
    assert 0 < record["completion_tokens"] < 400 and record["prompt_tokens"] > 0
    assert _post(server, EASY).status_code == 200  # the slot is free again


def test_a_client_leaving_a_closed_call_is_charged_the_whole_answer(
    server: LiveServer, fake: FakeProvider, local: ScriptedLocal
) -> None:
    """A provider does not stop a non-streamed answer whose caller hung up, and bills all of
    it. Cancelling the call when the client left recorded the prompt alone, so a client could
    have answers written at the operator's cost while its tenant's budget saw only prompts.
    The call runs to its end and the request is recorded aborted with the provider's usage."""
    fake.reset(Behaviour(mode="stall", stall_s=30, completion_tokens=900))
    with pytest.raises(httpx.ReadTimeout):  # a real socket: the client hangs up after 1 s
        httpx.post(server.url + "/v1/chat/completions", json=HARD, timeout=1.0)
    time.sleep(1.0)  # Tiergate has seen it go (it looks every 0.25 s)
    fake.unstall()  # the provider ends the answer it was writing
    record = _records(server, 1)[0]
    assert (record["status"], record["http_status"], record["model"]) == ("aborted", 499, "gpt-4o")
    assert record["completion_tokens"] == 900
    assert record["cost_usd"] > 900 * 10.0 / 1e6  # gpt-4o's output price, $10 per million
    assert len(fake.received) == 1 and local.calls == 0


def test_a_closed_call_failing_after_its_client_left_is_not_tried_again(
    server: LiveServer, fake: FakeProvider, local: ScriptedLocal
) -> None:
    """A closed call that its client left runs to its end; if it fails then, no other model
    is called (the policy's ``on_failure: local`` would have asked the local one): nobody is
    there to answer."""
    fake.reset(Behaviour(mode="status", status=500, error_pad=10, stall_s=30))
    with pytest.raises(httpx.ReadTimeout):  # a real socket: the client hangs up after 1 s
        httpx.post(server.url + "/v1/chat/completions", json=HARD, timeout=1.0)
    time.sleep(1.0)
    fake.unstall()  # the provider's 500 ends
    record = _records(server, 1)[0]
    assert (record["status"], record["http_status"], record["cost_usd"]) == ("aborted", 499, 0.0)
    assert len(fake.received) == 1 and local.calls == 0


# -- hostile input -----------------------------------------------------------------------------

_SURROGATE_BODY = (
    b'{"model": "auto", "messages": [{"role": "user", "content": "Hi \\ud800 there"},'
    b' {"role": "user", "content": [{"type": "text", "text": "HARD \\udfff"}]}],'
    b' "metadata": {"k\\udc00": {"deep": ["\\ud83d"]}}}'
)


@pytest.mark.parametrize("stream", [False, True])
def test_lone_surrogates_are_replaced_and_recording_goes_on(
    server: LiveServer, fake: FakeProvider, stream: bool
) -> None:
    """A lone surrogate cannot be encoded as UTF-8: it is replaced by U+FFFD when the body is
    read, so the provider, the store and every later request see valid text."""
    body = _SURROGATE_BODY[:-1] + (b', "stream": true}' if stream else b"}")
    response = server.http.post(
        "/v1/chat/completions",
        content=body,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200, response.text
    sent = fake.received[0].body
    assert sent["messages"][0]["content"] == "Hi \ufffd there"
    assert sent["messages"][1]["content"][0]["text"] == "HARD \ufffd"
    after = [_post(server, EASY) for _ in range(3)]
    assert [r.status_code for r in after] == [200] * 3
    rows = _records(server, 4)
    assert {r["status"] for r in rows} == {"ok"}


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-32"])
def test_a_lone_surrogate_in_a_utf16_or_utf32_body_is_replaced_too(
    server: LiveServer, fake: FakeProvider, encoding: str
) -> None:
    """JSON in UTF-16 or UTF-32 is read as JSON (``json.loads`` takes all three), and its lone
    surrogates went through: the check for one looked only for its UTF-8 and escaped forms.
    A closed model's call could not encode the prompt: a 500 ``internal_error``."""
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi \ud800 there"}]}
    raw = json.dumps(body, ensure_ascii=False).encode(encoding, "surrogatepass")
    response = server.http.post(
        "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert response.status_code == 200, response.text
    assert fake.received[0].body["messages"][0]["content"] == "Hi \ufffd there"


_FRONT_BODIES = {
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 20},
    "/v1/messages": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 20},
    "/v1/responses": {"input": "x", "max_output_tokens": 20},
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", list(_FRONT_BODIES))
def test_a_lone_surrogate_in_an_answer_is_replaced_and_recorded_as_answered(
    server: LiveServer, fake: FakeProvider, path: str, stream: bool
) -> None:
    """A provider may escape half an emoji, ``"\\ud83d"`` (JavaScript's JSON.stringify does for
    a string cut between the halves). It cannot be encoded as UTF-8: a whole answer was a 500
    recorded ``ok``, a stream ended in an error event recorded as a client that left (499).
    It reaches the client as U+FFFD, as a lone surrogate in a request is read."""
    fake.reset(Behaviour(text="Hello \ud83d there"))
    body = {"model": "gpt-4o", "stream": stream, **_FRONT_BODIES[path]}
    response = server.http.post(path, json=body)
    assert response.status_code == 200, response.text
    assert "\ufffd" in response.text and "internal" not in response.text, response.text[-300:]
    (row,) = _records(server, 1)
    assert (row["status"], row["http_status"], row["error_type"]) == ("ok", 200, None)


CHAT_PATH = "/v1/chat/completions"


def _strict_json(text: str) -> Any:
    """``text`` read as JSON is (RFC 8259, a browser's ``JSON.parse``): no ``NaN``, no
    ``Infinity``, which Python's json reads and writes by default."""

    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


@pytest.mark.parametrize("stream", [False, True])
def test_a_providers_nan_reaches_the_client_as_json_it_can_read(
    server: LiveServer, fake: FakeProvider, stream: bool
) -> None:
    """A provider (an OpenAI-compatible server, Python's json) may write a log-probability as
    ``NaN``, which Python reads: the answer passed it on as ``NaN``, which is not JSON, and a
    browser's or a strict client's parser refused the whole answer. It is written as null."""
    entry = {"token": "w", "logprob": float("nan"), "top_logprobs": []}
    fake.reset(Behaviour(bad_logprobs={"content": [entry]}))
    body = {"model": "gpt-4o", "stream": stream, "logprobs": True, **_FRONT_BODIES[CHAT_PATH]}
    response = server.http.post(CHAT_PATH, json=body)
    assert response.status_code == 200, response.text
    if stream:
        lines = [x.removeprefix("data: ") for x in response.text.splitlines() if x[:7] == "data: {"]
        chunks = [_strict_json(line) for line in lines]
        logprobs = [c["choices"][0].get("logprobs") for c in chunks if c.get("choices")]
        assert {"content": [{**entry, "logprob": None}]} in logprobs, logprobs
    else:
        choice = _strict_json(response.text)["choices"][0]
        assert choice["logprobs"]["content"][0]["logprob"] is None
    (row,) = _records(server, 1)
    assert row["status"] == "ok"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("path", list(_FRONT_BODIES))
def test_a_lone_surrogate_in_a_providers_error_is_replaced_not_a_500(
    server: LiveServer, fake: FakeProvider, path: str, stream: bool
) -> None:
    """A provider's error message may hold half an emoji, ``"\\ud83d"``: the error response's
    JSON could not be encoded, and the client got a 500 ``internal_error`` where the record
    said the provider's 400. It gets the 400, with U+FFFD, on every front."""
    error = {"message": "no \ud83d here", "type": "invalid_request_error", "code": None}
    fake.reset(Behaviour(mode="status", status=400, error_body={"error": error}))
    body = {"model": "gpt-4o", "stream": stream, **_FRONT_BODIES[path]}
    response = server.http.post(path, json=body)
    assert response.status_code == 400, response.text
    assert "no \ufffd here" in response.text, response.text
    (row,) = _records(server, 1)
    assert (row["status"], row["http_status"], row["error_type"]) == (
        "error",
        400,
        "upstream_bad_request",
    )


def test_a_lone_surrogate_in_a_native_events_type_is_replaced(
    server: LiveServer, fake: FakeProvider
) -> None:
    """A native stream passes the provider's events on, each named by its ``type``, which may
    hold a lone surrogate: the ``event:`` line could not be encoded, the stream ended in an
    ``internal error`` event, recorded as a client that left (499). The type is written with
    U+FFFD; here the stream then ends without ``message_stop``, as cut short (502)."""
    fake.reset(Behaviour(mode="error_mid_stream", error_body={"type": "ping\ud83d"}))
    body = {"model": "claude", "stream": True, **_FRONT_BODIES["/v1/messages"]}
    response = server.http.post("/v1/messages", json=body)
    assert "event: ping\ufffd\ndata: " in response.text, response.text[-400:]
    assert "internal error" not in response.text
    (row,) = _records(server, 1)
    assert (row["status"], row["http_status"], row["error_type"]) == (
        "error",
        502,
        "upstream_unreachable",
    )


def test_a_lone_surrogate_in_a_path_reaches_readyz_and_the_dashboard_as_u_fffd(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A file name that is not UTF-8 (``ops-\\xe9``, Latin-1) is a lone surrogate in Python
    (``surrogateescape``): the policy's path in ``/readyz`` and the evaluation report's in
    ``/dashboard/data``. Starlette's JSONResponse could not encode either: a 500 for the
    operator. They are written with U+FFFD, as a client's answers are."""
    odd = tmp_path / os.fsdecode(b"ops-\xe9")
    odd.mkdir()
    report = odd / "eval.json"
    report.write_text((default_model_path() / "eval.json").read_text())
    with live(odd, policy_yaml(fake), eval_report=report) as server:
        ready = server.http.get("/readyz")
        assert ready.status_code == 200, ready.text
        shown = str(odd / "policy.yaml").replace("\udce9", "\ufffd")
        assert ready.json()["policy"]["path"] == shown
        data = server.http.get("/dashboard/data")
        assert data.status_code == 200, data.text
        assert data.json()["evaluation"]["path"] == str(report).replace("\udce9", "\ufffd")
        page = server.http.get("/dashboard")
        assert page.status_code == 200, page.text
        assert "ops-\ufffd" in page.text


def test_a_native_events_type_cannot_add_lines_to_the_clients_stream(
    server: LiveServer, fake: FakeProvider
) -> None:
    """A native stream names each event by the provider's ``type``, written into the
    ``event:`` line as it came: a type holding a line break wrote lines of its own into the
    client's stream, here a whole ``message_stop`` event the provider never sent. The name is
    written without its CR and LF, so it stays one field of one event."""
    forged = "ping\nevent: message_stop\ndata: {}\r\n\r"
    fake.reset(Behaviour(mode="error_mid_stream", error_body={"type": forged}))
    body = {"model": "claude", "stream": True, **_FRONT_BODIES["/v1/messages"]}
    response = server.http.post("/v1/messages", json=body)
    assert "\nevent: message_stop" not in response.text, response.text[-400:]
    assert "event: pingevent: message_stopdata: {}\ndata: " in response.text


def test_deep_nesting_is_a_400_not_a_crash(server: LiveServer) -> None:
    for depth in (100_000, 1_000, 200):
        body = '{"model": "auto", "messages": [{"role": "user", "content": "hi"}], "metadata": '
        body += '{"a": ' * depth + "1" + "}" * depth + "}"
        response = server.http.post(
            "/v1/chat/completions",
            content=body.encode(),
            headers={"content-type": "application/json"},
        )
        assert response.status_code == 400, (depth, response.text[:300])
        error = response.json()["error"]
        assert "nested" in error["message"] and "Recursion" not in error["message"]
    assert _post(server, EASY).status_code == 200
    rows = _records(server, 4)
    assert sorted(r["http_status"] for r in rows) == [200, 400, 400, 400]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/route"])
def test_a_client_leaving_mid_upload_is_aborted_not_a_server_error(
    server: LiveServer, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that closes its connection before its body has all arrived is recorded
    ``aborted`` (499, ``client_disconnected``), as one that leaves mid-answer is: no 500
    ``internal_error``, and no traceback in the log."""
    head = (
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        "content-length: 1000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(head.encode() + b'{"model": "auto", ')
        time.sleep(0.3)
    if path != "/v1/route":  # a dry run is not recorded
        row = _records(server, 1)[0]
        assert (row["status"], row["http_status"], row["error_type"]) == (
            "aborted",
            499,
            "client_disconnected",
        )
    time.sleep(0.2)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    assert _post(server, EASY).status_code == 200


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages", "/v1/route"])
def test_a_compressed_body_is_refused_with_415(server: LiveServer, path: str) -> None:
    """A gzip body got a 400 about byte 0x8b not being UTF-8: it is a 415 that names the
    encoding (decoding it would let a small request expand past the size cap)."""
    import gzip
    import json

    raw = gzip.compress(json.dumps(EASY).encode())
    got = server.http.post(
        path, content=raw, headers={"content-type": "application/json", "content-encoding": "gzip"}
    )
    assert got.status_code == 415, got.text
    error = got.json()["error"]
    message = error["message"]
    assert message == "Content-Encoding 'gzip' is not supported: send the body uncompressed"
    if path != "/v1/messages":
        assert error["code"] == "unsupported_content_encoding"
    assert _post(server, EASY).status_code == 200


@pytest.mark.parametrize(
    ("path", "work"),
    [
        ("/v1/chat/completions", "router.api._clean"),
        ("/v1/messages", "router.api._clean"),
        ("/v1/feedback", "router.api._clean"),
        # Parsed off the loop, then translated and counted on it: 7.6 MiB of text held the
        # loop, and /healthz with it, for 2.5 s.
        ("/v1/messages/count_tokens", "router.messages.prompt_estimate"),
    ],
)
def test_a_large_body_is_read_off_the_event_loop(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch, path: str, work: str
) -> None:
    """Reading a body near the size cap can take seconds (eight MiB of ``[1,1,...]`` took 7 s
    on the event loop): it is read on a worker thread, so while it is, /healthz and other
    requests are answered."""
    import importlib

    entered, release = threading.Event(), threading.Event()
    module, name = work.rsplit(".", 1)
    real = getattr(importlib.import_module(module), name)
    pad = "pad " * 25_000

    def slow(*args: Any, **kwargs: Any) -> Any:
        if pad in repr(args[0]):
            entered.set()
            release.wait(30)
        return real(*args, **kwargs)

    def answered(url: str) -> int | None:
        try:
            return httpx.get(url, timeout=3).status_code
        except httpx.TimeoutException:
            return None

    monkeypatch.setattr(work, slow)
    asked = [{"role": "user", "content": pad}]
    large = {**EASY, "max_tokens": 8, "messages": asked, "metadata": {"pad": pad}}
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(httpx.post, server.url + path, json=large, timeout=60)
        try:
            assert wait_for(entered.is_set, 10)
            assert answered(server.url + "/healthz") == 200
            assert _post(server, EASY).status_code == 200
            assert not pending.done()
        finally:
            release.set()
        assert pending.result().status_code in (200, 400)  # feedback: no such request


@pytest.mark.parametrize("stream", [False, True])
def test_a_failing_upstream_without_fallback_is_a_502(
    server: LiveServer, fake: FakeProvider, stream: bool
) -> None:
    fake.reset(Behaviour(mode="status", status=500))
    response = _post(server, {**PINNED, "stream": stream})
    assert response.status_code == 502, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("api_error", "upstream_error")
    assert "x-should-retry" not in response.headers  # a transient failure may be retried
    assert _record(server, response)["http_status"] == 502


def test_a_failed_upstream_stays_a_502_when_the_local_fallback_refuses(
    server: LiveServer, fake: FakeProvider
) -> None:
    """The closed model fails (500), and the local fallback cannot take ``n=2``: the client
    hears of the transient failure (502, may retry), not a 503 that says never retry."""
    fake.reset(Behaviour(mode="status", status=500))
    response = _post(server, {**HARD, "n": 2})
    assert response.status_code == 502, response.text
    assert "x-should-retry" not in response.headers


def test_a_missing_provider_key_is_not_worth_retrying(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A configuration failure says ``x-should-retry: false``: the openai SDK then gives up at
    once instead of trying three times."""
    import openai

    fake.reset()
    monkeypatch.delenv("OPENAI_API_KEY")
    with live(tmp_path, policy_yaml(fake), local_backend_obj=ScriptedLocal()) as srv:
        response = _post(srv, PINNED)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "tier_unavailable"
        assert "OPENAI_API_KEY" in response.json()["error"]["message"]
        assert response.headers["x-should-retry"] == "false"
        with (
            openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=2) as client,
            pytest.raises(openai.APIStatusError) as err,
        ):
            client.chat.completions.create(**PINNED)  # type: ignore[call-overload]
        assert err.value.status_code == 503
        _records(srv, 2)  # one request each: the SDK did not retry
    assert fake.received == []


@pytest.mark.parametrize(
    ("mode", "stream"), [("bad_usage", False), ("array_body", False), ("array_body", True)]
)
def test_a_malformed_upstream_answer_is_an_upstream_failure(
    server: LiveServer, fake: FakeProvider, mode: str, stream: bool
) -> None:
    """A provider answering nonsense fails like a provider answering 500: fall back where the
    policy allows, else 502; never a 500 or a stream cut without an error. (A stream's usage
    comes after the answer, when no fallback is possible: see the next test.)"""
    fake.reset(Behaviour(mode=mode))
    body = {**HARD, "stream": stream, "stream_options": {"include_usage": True}} if stream else HARD
    fallback = _post(server, body)
    assert fallback.status_code == 200, fallback.text
    assert fallback.headers["x-tiergate-fallback"] == "closed->local"
    pinned = _post(server, {**body, "model": "gpt-4o"})
    assert pinned.status_code == 502, pinned.text
    assert pinned.json()["error"]["code"] == "upstream_bad_response"
    rows = _records(server, 2)
    assert sorted(r["http_status"] for r in rows) == [200, 502]


def test_a_malformed_usage_after_the_answer_ends_the_stream_with_an_error(
    server: LiveServer, fake: FakeProvider
) -> None:
    """The answer has streamed (no fallback is possible any more): the client gets an error
    event, not a cut connection, and the record says what happened."""
    fake.reset(Behaviour(mode="bad_usage"))
    body = {**PINNED, "stream": True}
    with server.http.stream("POST", "/v1/chat/completions", json=body) as response:
        events = _sse(response)
    assert response.status_code == 200
    assert events[-1]["error"]["code"] == "upstream_bad_response"
    record = _record(server, response)
    assert (record["status"], record["http_status"]) == ("error", 502)


#: Per front, the model a stream is pinned to, whose provider path reads that front's events:
#: OpenAI chat chunks, Anthropic's Messages events, the Responses events.
PINNED_ON = {"chat": "gpt-4o", "messages": "claude", "responses": "gpt-4o"}


@pytest.mark.parametrize("size", [1_000_000, 8_000_000])
@pytest.mark.parametrize("front", sorted(CUT_FRONTS))
def test_a_long_answer_in_one_stream_event_is_read_whole(
    tmp_path: Path, fake: FakeProvider, front: str, size: int
) -> None:
    """A Responses stream ends with ``response.completed``, which holds the whole answer in one
    SSE line (a long document or program: hundreds of KB), and any provider may send a long
    delta. aiohttp read lines of at most 512 KiB: past that it raised ``LineTooLong``, which
    no handler took for a transport failure, so the client got the first tokens, then an
    ``internal_error`` event, recorded as a 500. Each path reads such an event whole now."""
    # Chat and Messages: the answer in one delta. Responses: small deltas, as OpenAI sends
    # them, and the long events that end the stream.
    fake.reset(Behaviour(text="x" * size, piece_chars=size if front != "responses" else 65536))
    path, body, _ = CUT_FRONTS[front]
    with live(tmp_path, policy_yaml(fake)) as srv:
        with srv.http.stream("POST", path, json={**body, "model": PINNED_ON[front]}) as response:
            events = _sse(response)
        record = _record(srv, response)
    assert (response.status_code, response.headers["x-tiergate-model"]) == (
        200,
        PINNED_ON[front],
    )
    assert _opening_and_text(front, events)[1] == fake.behaviour.text
    last = events[-1]
    if front == "responses":
        assert last["type"] == "response.completed", str(last)[:300]
        assert last["response"]["output"][0]["content"][0]["text"] == fake.behaviour.text
    else:
        assert last == ("[DONE]" if front == "chat" else {"type": "message_stop"}), str(last)[:300]
    assert (record["status"], record["http_status"], record["fallback"]) == ("ok", 200, None)


@pytest.mark.parametrize("front", sorted(CUT_FRONTS))
def test_a_stream_event_over_the_limit_is_a_bad_upstream_answer(
    tmp_path: Path, fake: FakeProvider, front: str
) -> None:
    """An event longer than ``max_event_bytes`` is not read on: the call fails as a provider
    answering nonsense does, a 502 ``upstream_bad_response``. Before the first token a pinned
    request is that 502 and a routed one falls back; after it the client gets the tokens and
    an error event; the records say so. It was an ``internal_error`` 500 (aiohttp's
    ``LineTooLong``) past 512 KiB, and unbounded nowhere: only aiohttp's buffer limited it."""
    limit = 1024 * 1024
    path, body, _ = CUT_FRONTS[front]
    pinned = {**body, "model": PINNED_ON[front]}
    fake.reset(Behaviour(text="x" * (limit + 1)))
    with live(tmp_path, policy_yaml(fake), max_event_bytes=limit) as srv:
        refused = srv.http.post(path, json=pinned)
        routed = srv.http.post(path, json=body)
        fake.reset(Behaviour(text="Hello " + "x" * (limit + 1)))
        with srv.http.stream("POST", path, json=pinned) as response:
            events = _sse(response)
        rows = _records(srv, 3)
    assert refused.status_code == 502, refused.text[:300]
    if front != "messages":  # on its front, Anthropic's error shape: a type, no code
        assert refused.json()["error"]["code"] == "upstream_bad_response"
    assert "sent a stream event over 1048576 bytes" in refused.text
    assert (routed.status_code, routed.headers["x-tiergate-fallback"]) == (200, "closed->local")
    assert response.status_code == 200
    assert _opening_and_text(front, events[:-1])[1] == "Hello "
    last = json.dumps(events[-1])
    assert "sent a stream event over 1048576 bytes" in last
    if front != "messages":  # Anthropic's error events carry its type, not Tiergate's code
        assert "upstream_bad_response" in last
    assert [(r["status"], r["http_status"], r["error_type"]) for r in rows] == [
        ("error", 502, "upstream_bad_response"),
        ("ok", 200, None),
        ("error", 502, "upstream_bad_response"),
    ]


@pytest.mark.parametrize("front", sorted(CUT_FRONTS))
def test_an_answer_body_over_the_limit_is_a_bad_upstream_answer(
    tmp_path: Path, fake: FakeProvider, front: str
) -> None:
    """A whole (not streamed) answer longer than ``max_event_bytes`` fails the call as a stream
    event over it does: a 502 ``upstream_bad_response`` pinned, a fallback routed. It was read
    whole, however long, so a provider (or anything on its path) could make Tiergate hold an
    endless body; an answer under the limit is read as before."""
    limit = 1024 * 1024
    path, body, _ = CUT_FRONTS[front]
    whole = {**body, "stream": False}
    fake.reset(Behaviour(text="x" * (limit + 1)))
    with live(tmp_path, policy_yaml(fake), max_event_bytes=limit) as srv:
        refused = srv.http.post(path, json={**whole, "model": PINNED_ON[front]})
        routed = srv.http.post(path, json=whole)
        fake.reset(Behaviour(text="x" * (limit // 2)))
        taken = srv.http.post(path, json={**whole, "model": PINNED_ON[front]})
        rows = _records(srv, 3)
    assert refused.status_code == 502, refused.text[:300]
    assert f"sent a body over {limit} bytes" in refused.text
    assert (routed.status_code, routed.headers["x-tiergate-fallback"]) == (200, "closed->local")
    assert taken.status_code == 200 and str(limit // 2 * "x") in taken.text
    assert sorted((r["status"], r["http_status"], r["error_type"] or "") for r in rows) == [
        ("error", 502, "upstream_bad_response"),
        ("ok", 200, ""),
        ("ok", 200, ""),
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_an_answer_over_the_limit_through_litellm_is_a_bad_upstream_answer(
    tmp_path: Path, fake: FakeProvider, stream: bool
) -> None:
    """Through litellm (claude on the chat front) an answer, or a stream event, longer than
    ``max_event_bytes`` fails the call as on the direct path: a 502 ``upstream_bad_response``
    before the first token, an error event after it; an answer under the limit is read as
    before. litellm's own client read either whole, however long."""
    limit = 1024 * 1024
    claude = {**HARD, "model": "claude", "stream": stream}
    fake.reset(Behaviour(text="x" * (limit + 1)))
    with live(tmp_path, policy_yaml(fake), max_event_bytes=limit) as srv:
        refused = _post(srv, claude)
        fake.reset(Behaviour(text="Hello " + "x" * (limit + 1)))
        with srv.http.stream("POST", "/v1/chat/completions", json=claude) as cut:
            events = _sse(cut) if stream else [cut.read()]
        fake.reset(Behaviour(text="x" * (limit // 2)))
        taken = _post(srv, claude)
        rows = _records(srv, 3)
    over = f"sent a {'stream event' if stream else 'body'} over {limit} bytes"
    assert refused.status_code == 502, refused.text[:300]
    assert refused.json()["error"]["code"] == "upstream_bad_response"
    assert f"claude {over}" in refused.text
    assert fake.received[-1].headers["accept-encoding"] == "identity"
    assert taken.status_code == 200 and "x" * (limit // 2) in taken.text.replace('"', "")
    if stream:  # the tokens before it, then an error event
        assert cut.status_code == 200
        assert events[0]["choices"][0]["delta"]["content"].startswith("Hello")
        assert over in json.dumps(events[-1]) and "upstream_bad_response" in json.dumps(events)
    else:
        assert cut.status_code == 502
    assert [(r["status"], r["http_status"], r["error_type"]) for r in reversed(rows)] == [
        ("error", 502, "upstream_bad_response"),
        ("error", 502, "upstream_bad_response"),
        ("ok", 200, None),
    ]


@pytest.mark.parametrize("model", ["gpt-4o", "claude"])  # direct HTTP, litellm
@pytest.mark.parametrize(
    ("status", "stream", "failure"),
    [
        (500, False, (502, ("api_error", "upstream_error"))),
        (500, True, (502, ("api_error", "upstream_error"))),
        (503, False, (503, ("service_unavailable", "upstream_overloaded"))),
        (503, True, (503, ("service_unavailable", "upstream_overloaded"))),
    ],
)
def test_an_error_body_that_goes_on_is_answered_from_its_status(
    tmp_path: Path,
    fake: FakeProvider,
    status: int,
    stream: bool,
    failure: tuple[int, tuple[str, str]],
    *,
    model: str,
) -> None:
    """An error answer whose body goes on and on (a proxy's page, a log it streams) is read to
    64 KiB and no further, directly and through litellm alike: the call fails at once from its
    status, as a short error's does (a 500 a 502, a 503 an overload with its Retry-After), and
    a routed request falls back. Its body was read whole: Tiergate held all of it and waited
    for its end, here until the read timed out (a 504), as the provider never sent it."""
    fake.reset(endless_error(status))
    try:
        with live(tmp_path, policy_yaml(fake), closed_timeout_s=5) as srv:
            pinned = _post(srv, {**HARD, "model": model, "stream": stream})
            _final_error(srv, pinned, *failure)
            routed = _post(srv, {**HARD, "stream": stream})
    finally:
        fake.unstall()
    error = pinned.json()["error"]["message"]
    assert f"{model} answered {status}: " in error
    assert "an error body over 65536 bytes, not read" in error and "xxx" not in error
    assert (status != 503) == ("retry-after" not in pinned.headers)
    assert (routed.status_code, routed.headers["x-tiergate-fallback"]) == (200, "closed->local")


def test_a_slow_policy_reload_does_not_stall_the_server(
    server: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reload parses on a worker thread: while a parse is stuck, requests are answered."""
    import router.gateway

    entered, release = threading.Event(), threading.Event()
    real = router.gateway.load_policy

    def stuck(path: Any) -> Any:
        entered.set()
        release.wait(30)
        return real(path)

    monkeypatch.setattr(router.gateway, "load_policy", stuck)
    holder = server.gateway.policies
    holder.path.write_text(holder.path.read_text() + "\n# touched\n")
    try:
        assert wait_for(entered.is_set, 10)
        assert server.http.get("/healthz").status_code == 200
        assert _post(server, EASY).status_code == 200
        assert holder.reloads == 0  # answered while the parse was still stuck
    finally:
        release.set()
    assert wait_for(lambda: holder.reloads == 1, 10)


#: The chat stream paths that read a closed model's OpenAI or Anthropic stream: direct HTTP,
#: and through litellm.
CHAT_STREAM_PATHS = sorted(way for way, (front, _, _) in STREAM_PATHS.items() if front == "chat")


@pytest.mark.parametrize("way", CHAT_STREAM_PATHS)
def test_a_repetitive_answer_is_served_on_every_path(
    tmp_path: Path, fake: FakeProvider, way: str
) -> None:
    """An answer whose stream repeats one chunk (``say 'hello world' 200 times``, a table of
    equal rows, a provider that streams fixed-size pieces of a repetitive text) is served
    whole on every path. Through litellm its guard against a model looping ended the stream
    after 100 equal chunks: the client got part of the answer and a 502 ``error`` event, where
    the direct path served it. Tiergate bounds an answer itself (``max_tokens``, output limits,
    ``max_event_bytes``)."""
    _, first, via = STREAM_PATHS[way]
    fake.reset(Behaviour(text="hello world " * 200, piece_chars=len("hello world ")))
    policy = _through_litellm(fake, via) if via else policy_yaml(fake, on_failure="closed")
    with live(tmp_path, policy) as srv:
        with srv.http.stream(
            "POST", "/v1/chat/completions", json={**HARD, "model": first, "stream": True}
        ) as response:
            events = _sse(response)
        record = _record(srv, response)
    assert response.status_code == 200
    assert events[-1] == "[DONE]", events[-1]
    assert _opening_and_text("chat", events)[1] == fake.behaviour.text
    assert (record["status"], record["http_status"], record["model"]) == ("ok", 200, first)
