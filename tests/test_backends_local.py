"""The local tier's pieces: the bounded gate, request checks, the external llama.cpp backend."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from router.backends import Usage
from router.backends.local import (
    Gate,
    LlamaCppBackend,
    TokenLogprobs,
    check_in_process_fields,
    check_local_request,
    local_timeout,
    with_system_prompt,
)
from router.config import Settings
from router.errors import BadRequestError, LocalOverloadedError, UpstreamTimeoutError
from router.signals import estimate_tokens
from tests.conftest import GGUF, live, policy_yaml, wait_for
from tests.fake_provider import LLAMA_CPP_CONTEXT_EXCEEDED, Behaviour, FakeProvider
from tests.scripted_local import ScriptedLocal


def test_gate_bounds_waiting_and_reports_depth() -> None:
    async def scenario() -> None:
        gate = Gate(slots=1, queue_size=1)
        await gate.acquire()
        waiter = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        assert gate.depth == 2
        with pytest.raises(LocalOverloadedError) as err:
            await gate.acquire()
        assert err.value.headers["retry-after"] == "1"
        gate.release()
        await waiter
        assert gate.running == 1 and gate.waiting == 0
        gate.release()
        assert gate.depth == 0

    asyncio.run(scenario())


def test_a_full_gate_says_to_come_back_when_a_slot_is_likely_to_free(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from router.backends import local

    now = [100.0]
    monkeypatch.setattr(local.time, "monotonic", lambda: now[0])

    async def retry_after() -> str:
        with pytest.raises(LocalOverloadedError) as err:
            await gate.acquire()
        return err.value.headers["retry-after"]

    async def scenario() -> None:
        await gate.acquire()
        assert await retry_after() == "1"  # nothing given back yet: nothing known
        now[0] += 12.0
        gate.release()  # a generation held the slot 12 s
        await gate.acquire()
        now[0] += 3.0
        assert await retry_after() == "9"  # the running one, 3 s in, has about 9 s to go
        now[0] += 20.0
        assert await retry_after() == "1"  # past its expected end: any moment now

    gate = Gate(slots=1, queue_size=0)
    asyncio.run(scenario())


def test_an_external_server_gets_as_many_requests_at_once_as_local_slots_says() -> None:
    """One router sends an external server TIERGATE_LOCAL_SLOTS requests at once (default 4),
    so a server with more decoding slots (llama-server --parallel, several replicas) is used
    before the queue fills and spills to the closed tier."""
    from router.backends.local import ExternalLlamaBackend
    from router.backends.openai_http import OpenAIHTTP

    def running_at_once(**settings: Any) -> int:
        backend = ExternalLlamaBackend(
            Settings(local_base_url="http://gpu-box:8080/v1", **settings), OpenAIHTTP(timeout_s=1)
        )

        async def scenario() -> int:
            taken = 0
            while taken < 64:
                try:
                    await asyncio.wait_for(backend.gate.acquire(), 0.05)
                except TimeoutError:
                    return taken
                taken += 1
            return taken

        return asyncio.run(scenario())

    assert running_at_once() == 4
    assert running_at_once(local_slots=16) == 16


def test_system_prompt_added_only_when_missing() -> None:
    user = [{"role": "user", "content": "hi"}]
    assert with_system_prompt(user, "Be nice.")[0] == {"role": "system", "content": "Be nice."}
    own = [{"role": "system", "content": "Mine."}, *user]
    assert with_system_prompt(own, "Be nice.") == own


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
        ({"n": 2}, "n"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages",
        ),
    ],
)
def test_local_refuses_what_it_cannot_honour(body: dict[str, object], param: str) -> None:
    with pytest.raises(BadRequestError) as err:
        check_local_request({"messages": [{"role": "user", "content": "x"}], **body})
    assert err.value.param == param


def test_external_llama_server_backend(tmp_path: Path, fake: FakeProvider) -> None:
    """local_backend=openai_http: the local tier is an OpenAI-compatible llama.cpp server."""
    fake.reset()
    policy = policy_yaml(fake, on_failure="error")
    with live(tmp_path, policy, local_backend="openai_http", local_base_url=fake.base_url) as srv:
        response = srv.http.post(
            "/v1/chat/completions",
            json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert response.status_code == 200
        assert response.headers["x-tiergate-tier"] == "local"
        assert response.json()["model"] == "local"
        sent = fake.received[-1].body
        assert sent["messages"][0]["role"] == "system"  # the default system prompt
        with srv.http.stream(
            "POST",
            "/v1/chat/completions",
            json={"model": "local", "stream": True, "messages": [{"role": "user", "content": "x"}]},
        ) as stream:
            lines = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert lines[-1] == "data: [DONE]"
        assert srv.http.get("/readyz").json()["local"]["backend"] == "openai_http"


def _sent_to_external_server(tmp_path: Path, fake: FakeProvider, **body: Any) -> dict[str, Any]:
    """The body an external llama.cpp server gets for a request that pins the local model."""
    fake.reset()
    policy = policy_yaml(fake, on_failure="error")
    with live(tmp_path, policy, local_backend="openai_http", local_base_url=fake.base_url) as srv:
        response = srv.http.post("/v1/chat/completions", json={"model": "local", **body})
    assert response.status_code == 200, response.text
    return fake.received[-1].body


def test_structured_output_reaches_the_external_server_in_the_form_llama_cpp_reads(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """OpenAI's ``json_schema`` response_format reaches a llama.cpp server as ``json_object``
    with the schema: llama-cpp-python's server refuses ``json_schema`` (500), and llama-server
    reads the schema in either form."""
    schema = {"type": "object", "properties": {"age": {"type": "integer"}}, "required": ["age"]}
    sent = _sent_to_external_server(
        tmp_path,
        fake,
        messages=[{"role": "user", "content": "Give an age as JSON"}],
        response_format={"type": "json_schema", "json_schema": {"name": "age", "schema": schema}},
    )
    assert sent["response_format"] == {"type": "json_object", "schema": schema}


def test_the_external_server_gets_messages_every_chat_template_reads(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """As in process: text content arrays (the Anthropic front's blocks) become strings and a
    ``developer`` message a ``system`` one. llama-cpp-python's server answered 500 to both."""
    sent = _sent_to_external_server(
        tmp_path,
        fake,
        messages=[
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hello"}]},
        ],
    )
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hello"},
    ]


def test_text_parts_reach_the_local_model_on_separate_lines(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A message's text parts (an app's instruction, then its document) were glued end to end
    for the local model: it read ``Translate to English:Bonjour``. They go on separate lines,
    in process and to an external server, as llama-server and vLLM join them."""
    parts = [{"type": "text", "text": "Translate to English:"}, {"type": "text", "text": "Bonjour"}]
    messages = [{"role": "user", "content": parts}]
    joined = {"role": "user", "content": "Translate to English:\nBonjour"}
    sent = _sent_to_external_server(tmp_path, fake, messages=messages)
    assert sent["messages"][-1] == joined
    in_process = LlamaCppBackend(Settings(home=tmp_path, local_model_path=GGUF))
    assert in_process._kwargs({"messages": messages})["messages"][-1] == joined


def _streamed_from_external_server(
    tmp_path: Path, fake: FakeProvider, **body: Any
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The JSON events of a stream that pins the local model (an external server played by
    ``fake``, as it was told to behave), and the request's outcome record."""
    policy = policy_yaml(fake, on_failure="error")
    with live(tmp_path, policy, local_backend="openai_http", local_base_url=fake.base_url) as srv:
        with srv.http.stream(
            "POST", "/v1/chat/completions", json={"model": "local", "stream": True, **body}
        ) as stream:
            events = [json.loads(line[6:]) for line in stream.iter_lines() if line[6:7] == "{"]
        store = srv.gateway.outcomes
        store.flush()
        assert wait_for(lambda: store.recent(1), 10)
        (record,) = store.recent(1)
    return events, record


def test_a_stream_without_upstream_usage_gives_the_client_the_recorded_counts(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """llama-cpp-python's server sends no usage chunk: the one Tiergate adds for a client that
    asked for usage carries the counts the record holds (estimated), not zeros."""
    fake.reset(Behaviour(mode="no_stream_usage"))
    chunks, record = _streamed_from_external_server(
        tmp_path,
        fake,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Say hello to the whole team."}],
    )
    usage = chunks[-1]["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
        record["prompt_tokens"],
        record["completion_tokens"],
    )
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def test_a_stream_without_upstream_usage_counts_what_the_server_streamed(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A llama.cpp server streams a token a chunk: without its usage the record counts the
    chunks that carried text, not an estimate from their text (a real llama_cpp.server: 7
    chunks, 7 tokens by its own count, 9 by the estimate), and the prompt as sent, with the
    system prompt Tiergate added (there: 27 tokens by its count, 13 estimated without it)."""
    fake.reset(Behaviour(mode="no_stream_usage"))
    chunks, record = _streamed_from_external_server(
        tmp_path, fake, messages=[{"role": "user", "content": "What is the capital of France?"}]
    )
    sent = fake.received[-1].body["messages"]
    texts = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    assert sent[0]["role"] == "system"
    assert record["completion_tokens"] == sum(map(bool, texts)) == len(Behaviour().text.split())
    assert record["prompt_tokens"] == estimate_tokens(sent)


def test_a_streamed_answers_estimated_tokens_stay_within_its_max_tokens(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """Without the server's usage the completion is estimated from the streamed text, which
    can read as more tokens than the model drew (digits count extra): the record never holds
    more than the request's ``max_tokens`` allowed. The server here streams its four tokens
    one a chunk, as llama_cpp.server does with ``max_tokens`` 4."""
    fake.reset(Behaviour(mode="no_stream_usage", text="3.14159 2.71828 1.41421 1.73205"))
    chunks, record = _streamed_from_external_server(
        tmp_path,
        fake,
        max_tokens=4,
        stream_options={"include_usage": True},
        messages=[{"role": "user", "content": "Four constants, please."}],
    )
    assert sum(bool(c["choices"] and c["choices"][0]["delta"].get("content")) for c in chunks) == 4
    assert record["completion_tokens"] == chunks[-1]["usage"]["completion_tokens"] == 4


def test_a_stream_the_external_server_interrupts_is_an_error_not_an_answer(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """llama_cpp.server (--interrupt_requests, on by default) ends a stream it drops for a
    newer request with ``data: [DONE]`` and no finish_reason: the client gets the stream's
    error event and the record says error, not an answer cut short that reads as complete."""
    fake.reset(Behaviour(mode="interrupted"))
    events, record = _streamed_from_external_server(
        tmp_path, fake, messages=[{"role": "user", "content": "x"}]
    )
    assert events[-1]["error"]["code"] == "upstream_unreachable"
    assert record["status"] == "error" and record["error_type"] == "upstream_unreachable"


# How each llama.cpp server says a prompt does not fit its context (HTTP 400).
_CONTEXT_ERRORS = {
    "llama-server": {
        "error": {
            "code": 400,
            "message": "the request exceeds the available context size, try increasing it",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 4200,
            "n_ctx": 4096,
        }
    },
    "llama_cpp.server": {
        "error": {
            "message": "This model's maximum context length is 4096 tokens. However, you "
            "requested 4210 tokens (4200 in the messages, 10 in the completion).",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    },
    # llama-server's other wording of the same error (its type is what stays the same).
    "llama-server, in other words": {
        "error": {
            "code": 400,
            "message": "input (4200 tokens) is larger than the max context size (4096 tokens)",
            "type": "exceed_context_size_error",
            "n_prompt_tokens": 4200,
            "n_ctx": 4096,
        }
    },
    # llama-server before it had that type: its words alone say it.
    "llama-server, before its type": {"error": LLAMA_CPP_CONTEXT_EXCEEDED},
}


@pytest.mark.parametrize("server", sorted(_CONTEXT_ERRORS))
def test_a_prompt_over_the_external_servers_context_moves_closed_as_in_process(
    tmp_path: Path, fake: FakeProvider, server: str
) -> None:
    """The policy's token estimate can undercount a prompt: when the server says it does not
    fit, a request that did not pin the local model is answered by the closed tier (as with
    the GGUF in process), and one that pinned it gets 400 ``context_length_exceeded``."""
    fake.reset()
    policy = policy_yaml(fake, on_failure="closed")
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
    with FakeProvider() as local:
        local.reset(Behaviour(mode="status", status=400, error_body=_CONTEXT_ERRORS[server]))
        with live(
            tmp_path, policy, local_backend="openai_http", local_base_url=local.base_url
        ) as srv:
            routed = srv.http.post("/v1/chat/completions", json={"model": "auto", **body})
            pinned = srv.http.post("/v1/chat/completions", json={"model": "local", **body})
            streamed = srv.http.post(
                "/v1/chat/completions", json={"model": "auto", "stream": True, **body}
            )
        assert len(local.received) == 3  # each was tried on the local server first
    assert routed.status_code == 200, routed.text
    assert routed.headers["x-tiergate-tier"] == "closed"
    assert streamed.status_code == 200 and streamed.headers["x-tiergate-tier"] == "closed"
    assert pinned.status_code == 400
    assert pinned.json()["error"]["code"] == "context_length_exceeded"


def _said(message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": "BadRequestError", "param": None, "code": 400}}


#: An external server's 400 for a request over its context, and how Tiergate words it.
_CONTEXT_WORDS = {
    # vLLM: the prompt fits, the answer asked does not.
    "vLLM, max_tokens": (
        _said(
            "'max_tokens' or 'max_completion_tokens' is too large: 512. This model's maximum "
            "context length is 2048 tokens and your request has 1800 input tokens "
            "(512 > 2048 - 1800)."
        ),
        "the prompt fits the local server's context window but leaves 248 tokens, fewer than "
        "the answer asked: Requested tokens (1800 in the prompt + max_tokens 512) exceed "
        "context window of 2048",
        "max_tokens",
    ),
    # OpenAI's words (vLLM before, llama_cpp.server): the prompt fits, with the answer not.
    "OpenAI's words, the answer over": (
        _said(
            "This model's maximum context length is 4096 tokens. However, you requested 4296 "
            "tokens (4000 in the messages, 296 in the completion)."
        ),
        "the prompt fits the local server's context window but leaves 96 tokens, fewer than "
        "the answer asked: Requested tokens (4000 in the prompt + max_tokens 296) exceed "
        "context window of 4096",
        "max_tokens",
    ),
    # ... and the prompt over alone.
    "OpenAI's words, the prompt over": (
        _CONTEXT_ERRORS["llama_cpp.server"],
        "the prompt is longer than the local server's context window: Requested tokens (4200 "
        "in the prompt + max_tokens 10) exceed context window of 4096",
        "messages",
    ),
}


@pytest.mark.parametrize(
    ("refused", "says", "param"), list(_CONTEXT_WORDS.values()), ids=list(_CONTEXT_WORDS)
)
def test_a_context_error_from_the_external_server_says_what_is_over(
    tmp_path: Path, fake: FakeProvider, refused: dict[str, Any], says: str, param: str
) -> None:
    """The 400 a request pinned to the external server gets says what the server said: a
    prompt that fits, with an answer asked that does not (vLLM's ``'max_tokens' ... is too
    large``), was told its prompt is longer than the server's context window, with the
    prompt to change (``param: messages``), not the output limit."""
    body = {"model": "local", "messages": [{"role": "user", "content": "Capital of France?"}]}
    with FakeProvider() as local:
        local.reset(Behaviour(mode="status", status=400, error_body=refused))
        with live(
            tmp_path, policy_yaml(fake), local_backend="openai_http", local_base_url=local.base_url
        ) as srv:
            pinned = srv.http.post("/v1/chat/completions", json=body)
    assert pinned.status_code == 400, pinned.text
    error = pinned.json()["error"]
    assert (error["code"], error["message"], error["param"]) == (
        "context_length_exceeded",
        says,
        param,
    )


@pytest.mark.parametrize(
    "server", ["llama-server", "llama-server, in other words", "llama-server, before its type"]
)
def test_a_context_error_event_from_the_external_server_moves_closed(
    tmp_path: Path, fake: FakeProvider, server: str
) -> None:
    """llama-server reports a prompt over its context in a stream it has opened as an error
    chunk (``data: {"error": {"code": 400, "type": "exceed_context_size_error", ...}}``): as
    its HTTP 400, a request that did not pin the local model is answered by the closed tier,
    one that pinned it gets 400 ``context_length_exceeded``, and the server does not cool
    down (the prompt was at fault). The chunk was a 502 ``upstream_error``: the pinned
    request got that, and the server cooled for every request after it."""
    fake.reset()
    policy = policy_yaml(fake, on_failure="closed")
    body = {"stream": True, "messages": [{"role": "user", "content": "Capital of France?"}]}
    with FakeProvider() as local:
        local.reset(Behaviour(mode="overloaded_after_open", error_body=_CONTEXT_ERRORS[server]))
        with live(
            tmp_path,
            policy,
            local_backend="openai_http",
            local_base_url=local.base_url,
            cooldown_after_fails=1,
        ) as srv:
            pinned = srv.http.post("/v1/chat/completions", json={"model": "local", **body})
            routed = srv.http.post("/v1/chat/completions", json={"model": "auto", **body})
            cooling = srv.gateway.cooldowns.status()
        tried = len(local.received)
    assert pinned.status_code == 400, pinned.text
    assert pinned.json()["error"]["code"] == "context_length_exceeded"
    assert routed.status_code == 200 and routed.headers["x-tiergate-tier"] == "closed"
    assert "local" not in cooling, cooling
    assert tried == 2  # each was tried on the local server first


# 400s that call the request bad and quote it (an OpenAI-compatible server's validator,
# vLLM's, with ``input_value``), where the user's text holds each llama.cpp server's words.
_QUOTING_400S = {
    words: {
        "error": {
            "object": "error",
            "message": "1 validation error for ChatCompletionRequest\nmessages.0\n  Value "
            "error, the message is not one the chat template takes [type=value_error, "
            f"input_value={{'role': 'user', 'content': \"{words}, said the log\"}}]",
            "type": "BadRequestError",
            "param": None,
            "code": 400,
        }
    }
    for words in (
        "the request exceeds the available context size",  # llama-server's
        "This model's maximum context length is 8 tokens",  # llama_cpp.server's
    )
}


@pytest.mark.parametrize("quoted", sorted(_QUOTING_400S))
def test_a_bad_request_quoting_context_words_stays_the_external_servers_400(
    tmp_path: Path, fake: FakeProvider, quoted: str
) -> None:
    """A 400 from the external server that quotes the request, whose text holds a llama.cpp
    server's words for a prompt over its context, is the request's own 400, as a closed
    provider's is: the client gets it whether it pinned the local model or not, answered or
    in a stream's error event, and nothing goes to the closed tier. The words counted anywhere
    in the message: the routed requests were served by the closed tier and the pinned one was
    told its prompt is over the context."""
    fake.reset()
    policy = policy_yaml(fake, on_failure="closed")
    body = {"messages": [{"role": "user", "content": f"{quoted}, said the log"}]}
    refused = _QUOTING_400S[quoted]
    with (
        FakeProvider() as local,
        live(tmp_path, policy, local_backend="openai_http", local_base_url=local.base_url) as srv,
    ):
        local.reset(Behaviour(mode="status", status=400, error_body=refused))
        answers = [
            srv.http.post("/v1/chat/completions", json={"model": model, **body, **extra})
            for model in ("auto", "local")
            for extra in ({}, {"stream": True})
        ]
        local.reset(Behaviour(mode="overloaded_after_open", error_body=refused))
        answers += [
            srv.http.post("/v1/chat/completions", json={"model": model, "stream": True, **body})
            for model in ("auto", "local")
        ]
    assert [a.status_code for a in answers] == [400] * 6, answers[0].text
    assert {a.json()["error"]["code"] for a in answers} == {"upstream_bad_request"}
    assert fake.received == []  # the closed tier was never asked


def test_a_stream_llama_cpp_server_drops_for_its_context_is_a_context_error(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """llama_cpp.server answers a stream whose prompt is over its context 200, then ends it
    with nothing: as without streaming, a request that pinned the local model gets 400
    ``context_length_exceeded`` (not a 502 that says the server is unreachable), and one that
    did not is answered by the closed tier."""
    fake.reset()
    policy = policy_yaml(fake, on_failure="closed")
    over = _CONTEXT_ERRORS["llama_cpp.server"]
    body = {"stream": True, "messages": [{"role": "user", "content": "Capital of France?"}]}
    with FakeProvider() as local:
        local.reset(Behaviour(mode="status", status=400, error_body=over, stream_opens=True))
        with live(
            tmp_path, policy, local_backend="openai_http", local_base_url=local.base_url
        ) as srv:
            pinned = srv.http.post("/v1/chat/completions", json={"model": "local", **body})
            routed = srv.http.post("/v1/chat/completions", json={"model": "auto", **body})
        asked = [(r.body["stream"], r.body["max_tokens"]) for r in local.received[:2]]
    assert pinned.status_code == 400, pinned.text
    assert pinned.json()["error"]["code"] == "context_length_exceeded"
    assert routed.status_code == 200 and routed.headers["x-tiergate-tier"] == "closed"
    assert asked == [(True, 512), (False, 1)]  # the stream, then once without streaming


def test_a_stream_the_server_never_answered_is_not_asked_again(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """Only a stream the server answered 200 and then ended empty is asked about again
    without streaming: one whose connection failed before any answer is sent once more on a
    fresh connection (as a stale pooled connection fails), then falls back, with no probe."""
    fake.reset()
    policy = policy_yaml(fake, on_failure="closed")
    body = {"stream": True, "messages": [{"role": "user", "content": "Capital of France?"}]}
    with FakeProvider() as local:
        local.reset(Behaviour(mode="reset_at_once"))
        with live(
            tmp_path, policy, local_backend="openai_http", local_base_url=local.base_url
        ) as srv:
            routed = srv.http.post("/v1/chat/completions", json={"model": "auto", **body})
        assert [r.body["stream"] for r in local.received] == [True, True]
    assert routed.status_code == 200 and routed.headers["x-tiergate-tier"] == "closed"


def test_a_request_on_a_connection_the_server_closed_is_sent_again(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A pooled keep-alive connection that the server closed as idle just as the next request
    went out fails that request before any answer (aiohttp: ServerDisconnectedError): it was a
    502 for a request pinned to the local model, or a needless fallback. It is sent once more,
    on a fresh connection, without streaming and with it."""
    fake.reset(Behaviour(drop_reused=True))
    policy = policy_yaml(fake, on_failure="error")
    body = {"model": "local", "messages": [{"role": "user", "content": "hi"}]}
    with live(tmp_path, policy, local_backend="openai_http", local_base_url=fake.base_url) as srv:
        codes = [
            srv.http.post("/v1/chat/completions", json={**body, **extra}).status_code
            for extra in ({}, {"stream": True}, {}, {})
        ]
    assert codes == [200] * 4
    assert [r.body["stream"] for r in fake.received] == [False, True, False, False]


def test_another_400_from_the_external_server_stands(tmp_path: Path, fake: FakeProvider) -> None:
    """A 400 that is not about the context (a bad grammar, say) is the request's fault: no
    closed call is made for it."""
    fake.reset()
    policy = policy_yaml(fake, on_failure="closed")
    body = {"messages": [{"role": "user", "content": "What is the capital of France?"}]}
    with FakeProvider() as local:
        local.reset(Behaviour(mode="status", status=400))
        with live(
            tmp_path, policy, local_backend="openai_http", local_base_url=local.base_url
        ) as srv:
            routed = srv.http.post("/v1/chat/completions", json={"model": "auto", **body})
    assert routed.status_code == 400
    assert routed.json()["error"]["code"] == "upstream_bad_request"
    assert fake.received == []


def test_a_local_models_policy_timeout_wins_over_the_setting(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """``timeout_s`` on the policy's local model bounds a local call, as it does a closed one;
    TIERGATE_LOCAL_TIMEOUT_S (300 s here) is only the default."""
    fake.reset(Behaviour(mode="stall", stall_s=60.0))
    policy = policy_yaml(fake, on_failure="error").replace(
        "    context_window: 2048\n", "    context_window: 2048\n    timeout_s: 0.3\n", 1
    )
    assert "timeout_s: 0.3" in policy
    with live(
        tmp_path,
        policy,
        local_backend="openai_http",
        local_base_url=fake.base_url,
        local_timeout_s=300,
    ) as srv:
        response = srv.http.post(
            "/v1/chat/completions",
            json={"model": "local", "messages": [{"role": "user", "content": "hi"}]},
        )
        # Stopped at the policy's 0.3 s while the server still stalled: not at the end of the
        # stall, and not at the setting's 300 s (which outlasts the stall: that gives a 200).
        assert fake.stalls_ended == 0
        fake.unstall()
    assert response.status_code == 504, response.text  # on_failure: error, nothing else to try
    assert "timed out" in response.json()["error"]["message"]


def test_local_timeout_prefers_the_model() -> None:
    settings = Settings(local_timeout_s=300)
    model = SimpleNamespace(timeout_s=None)
    assert local_timeout(model, settings) == 300  # type: ignore[arg-type]
    model.timeout_s = 7.5
    assert local_timeout(model, settings) == 7.5  # type: ignore[arg-type]


@pytest.mark.gguf
def test_a_generation_stopped_while_it_reads_a_long_prompt_stops_reading_it(
    tmp_path: Path,
) -> None:
    """Past its timeout (or when its client leaves) a generation still reading its prompt frees
    the model at the next n_batch tokens of it, not once the whole prompt is read."""
    settings = Settings(home=tmp_path, local_model_path=GGUF, n_threads=1, n_batch=32)
    backend = LlamaCppBackend(settings)
    backend.load()
    model = SimpleNamespace(name="local", timeout_s=0.2)
    text = " ".join(["The river runs past the old mill, and the mill wheel turns."] * 150)
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 4}  # ~2,300 tokens

    async def scenario() -> Usage:
        usage = Usage()
        with pytest.raises(UpstreamTimeoutError):
            async for _ in backend.stream(model, body, usage):  # type: ignore[arg-type]
                pass
        for _ in range(1200):  # the worker stops, then gives the slot back
            if backend.gate.depth == 0:
                break
            await asyncio.sleep(0.1)
        await backend.aclose()
        return usage

    usage = asyncio.run(scenario())
    assert 0 < usage.prompt_tokens < 1000  # the prompt tokens it read before it stopped


@pytest.mark.gguf
def test_the_scripted_local_counts_its_answer_as_the_gguf_does(tmp_path: Path) -> None:
    """ScriptedLocal stands in for the GGUF in most gateway tests, so it counts as the GGUF
    does: no answer tokens at the first chunk of a long answer, and, stopped there by its
    reader, the tokens drawn once it has stopped. It counted each token as it streamed, which
    hid a record of 0 completion tokens (4977456)."""
    real = LlamaCppBackend(Settings(home=tmp_path, local_model_path=GGUF, n_threads=1))
    real.load()
    body = {"messages": [{"role": "user", "content": "Count from one to a hundred."}]}
    model = SimpleNamespace(name="local", timeout_s=60)

    async def counts(backend: Any) -> tuple[int, int]:
        usage = Usage()
        stream = backend.stream(model, {**body, "max_tokens": 200}, usage)
        await anext(stream)
        at_first = usage.completion_tokens
        await stream.aclose()
        for _ in range(200):  # the worker stops at its next token, then counts
            if usage.completion_tokens:
                break
            await asyncio.sleep(0.05)
        await backend.aclose()
        return at_first, usage.completion_tokens

    scripted = asyncio.run(counts(ScriptedLocal(words=200)))
    gguf = asyncio.run(counts(real))
    assert gguf[0] == 0 and gguf[1] > 0, gguf
    assert scripted == (0, 1)


def test_a_gate_tells_how_long_each_caller_waited_for_its_slot() -> None:
    # The queue depth said how many waited, nothing how long; TTFT mixes the wait with the
    # prompt's reading. The wait is what tiergate_local_queue_wait_seconds shows.
    waits: list[float] = []

    async def scenario() -> None:
        gate = Gate(slots=1, queue_size=4)
        gate.on_wait = waits.append
        await gate.acquire()
        second = asyncio.ensure_future(gate.acquire())
        await asyncio.sleep(0.2)
        gate.release()
        await second
        gate.release()

    asyncio.run(scenario())
    assert len(waits) == 2
    assert waits[0] < 0.05 and waits[1] >= 0.19


@pytest.mark.gguf
def test_a_context_past_what_the_model_was_trained_on_is_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """TIERGATE_N_CTX over the GGUF's training context started in silence (only llama.cpp's own
    stderr said so): the start now warns, naming both."""
    import router.backends.local as local_module

    backend = LlamaCppBackend(Settings(home=tmp_path, local_model_path=GGUF, n_threads=1))
    backend.load()
    assert local_module._trained_context(backend._llm) == 8192  # SmolLM2's GGUF says so
    monkeypatch.setattr(local_module, "_trained_context", lambda llm: 1024)
    caplog.set_level("WARNING", logger="tiergate.local")
    backend.load()
    assert "TIERGATE_N_CTX=4096 is over the 1024 tokens SmolLM2" in caplog.text


@pytest.mark.gguf
def test_n_threads_bounds_reading_a_prompt_as_well_as_generating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TIERGATE_N_THREADS=1 bounded only generation: llama.cpp read prompts with every core
    the machine has (a node's, in a pod with a CPU limit of one)."""
    import multiprocessing

    monkeypatch.setattr(multiprocessing, "cpu_count", lambda: 16)  # a bigger machine
    backend = LlamaCppBackend(Settings(home=tmp_path, local_model_path=GGUF, n_threads=1))
    backend.load()
    assert backend._llm is not None
    params = backend._llm.context_params
    assert (params.n_threads, params.n_threads_batch) == (1, 1)


class _Vocab:
    """Detokenizes token ``i`` to the letter ``chr(97 + i)``."""

    def detokenize(self, tokens: list[int]) -> bytes:
        return bytes(97 + t for t in tokens)


def test_token_logprobs_read_the_model_before_the_bias_and_pair_each_drawn_token() -> None:
    recorder = TokenLogprobs(_Vocab(), top=2, bias={3: 50.0})
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    biased = recorder.process(np.array([7]), logits)
    assert int(np.argmax(biased)) == 3  # the request's logit_bias still steers sampling
    recorder.sampled(3, end=False)
    recorder.process(np.array([7, 3]), logits)
    recorder.sampled(0, end=True)  # end of generation: not part of the answer
    [entry] = recorder.take()
    assert entry["token"] == "d" and entry["bytes"] == [100]
    assert entry["logprob"] == pytest.approx(np.log(0.05), abs=1e-6)  # the model's, unbiased
    assert [t["token"] for t in entry["top_logprobs"]] == ["a", "b"]
    assert entry["top_logprobs"][0]["logprob"] == pytest.approx(np.log(0.5), abs=1e-6)
    assert recorder.take() == []


def test_top_logprobs_without_logprobs_is_refused() -> None:
    body = {"messages": [], "top_logprobs": 2}
    with pytest.raises(BadRequestError) as err:
        check_in_process_fields(body)
    assert err.value.param == "top_logprobs"
    check_in_process_fields({**body, "logprobs": True})


def test_the_refusal_of_an_unknown_field_names_every_field_it_honours() -> None:
    from router.backends.local import _PASSTHROUGH

    with pytest.raises(BadRequestError) as err:
        check_in_process_fields({"messages": [], "foo_bar": 1})
    assert err.value.param == "foo_bar"
    listed = err.value.message.split("(it honours ", 1)[1]
    for field in (*_PASSTHROUGH, "max_tokens", "max_completion_tokens", "logit_bias"):
        assert field in listed, field
    honoured = {"logprobs": True, "top_logprobs": 2, "stream_options": {"include_usage": True}}
    for field in honoured:
        assert field in listed, field
    check_in_process_fields({"messages": [], **honoured})  # and it does take them
