"""The spine end to end: the official openai client against Tiergate over real HTTP.

The local tier is scripted, except in the ``gguf`` tests, which serve the real bundled GGUF
through llama-cpp-python (n_threads=1); the closed tier is a loopback server speaking OpenAI's and
Anthropic's wire protocols, so litellm's real HTTP path and Tiergate's direct OpenAI path both run.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import openai
import pytest

from router.cascade import HoldBack
from router.services import services
from tests.conftest import REPO, LiveServer, live, policy_yaml, wait_for
from tests.fake_provider import Behaviour, FakeProvider


@contextmanager
def _shared(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeProvider, *, gguf: bool
) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("gguf" if gguf else "api")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", "sk-test-openai-key")
        mp.setenv("ANTHROPIC_API_KEY", "sk-ant-test-key")
        with live(tmp, policy_yaml(fake), gguf=gguf, socket=True) as srv:
            yield srv


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, fake: FakeProvider) -> Iterator[LiveServer]:
    """One Tiergate with the scripted local tier, shared by this module's tests."""
    with _shared(tmp_path_factory, fake, gguf=False) as srv:
        yield srv


@pytest.fixture(scope="module")
def gguf_server(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeProvider
) -> Iterator[LiveServer]:
    """One Tiergate with the real local model, shared by this module's ``gguf`` tests."""
    with _shared(tmp_path_factory, fake, gguf=True) as srv:
        yield srv


def _openai(server: LiveServer, fake: FakeProvider) -> Iterator[openai.OpenAI]:
    fake.reset()
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as c:
        yield c


@pytest.fixture
def client(server: LiveServer, fake: FakeProvider) -> Iterator[openai.OpenAI]:
    yield from _openai(server, fake)


@pytest.fixture
def gguf_client(gguf_server: LiveServer, fake: FakeProvider) -> Iterator[openai.OpenAI]:
    yield from _openai(gguf_server, fake)


def _record(server: LiveServer, request_id: str) -> dict[str, object]:
    store = server.gateway.outcomes
    assert wait_for(lambda: store.get(request_id) is not None), "no outcome record"
    record = store.get(request_id)
    assert record is not None
    return record


@pytest.mark.gguf
def test_local_non_stream_answers_from_the_gguf(
    gguf_client: openai.OpenAI, gguf_server: LiveServer, fake: FakeProvider
) -> None:
    client, server = gguf_client, gguf_server
    raw = client.chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=12,
        temperature=0,
    )
    completion = raw.parse()
    assert raw.headers["x-tiergate-tier"] == "local"
    assert raw.headers["x-tiergate-model"] == "local"
    assert raw.headers["x-tiergate-rule"]
    assert float(raw.headers["x-tiergate-score"]) == pytest.approx(0.1)
    assert completion.model == "local"
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert fake.received == []
    record = _record(server, raw.headers["x-request-id"])
    assert record["tier"] == "local" and record["status"] == "ok"
    assert record["prompt_tokens"] > 0 and record["completion_tokens"] > 0
    assert record["stream"] is False


@pytest.mark.gguf
def test_local_stream_with_usage(gguf_client: openai.OpenAI, gguf_server: LiveServer) -> None:
    client, server = gguf_client, gguf_server
    with client.chat.completions.with_streaming_response.create(
        model="auto",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=10,
        stream=True,
        stream_options={"include_usage": True},
    ) as response:
        assert response.headers["x-tiergate-tier"] == "local"
        chunks = list(response.parse())
        request_id = response.headers["x-request-id"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert all(c.model == "local" for c in chunks)
    assert len({c.id for c in chunks}) == 1  # the usage chunk's too
    usage = [c.usage for c in chunks if c.usage]
    assert usage and usage[-1].completion_tokens > 0
    record = _record(server, request_id)
    assert record["stream"] is True and record["ttft_ms"] is not None


@pytest.mark.gguf
def test_a_local_answer_ended_by_a_stop_sequence_is_in_openais_shape(
    gguf_server: LiveServer,
) -> None:
    """A local answer cut at a ``stop`` string carried the sequence in its choice's
    ``stop_reason`` (vLLM's field, which the Messages front reads): OpenAI's chat choice has
    none, and an app that checks the answer against OpenAI's schema found it. The chat front
    answers ``finish_reason: "stop"`` alone, whole or streamed."""
    ask = {
        "model": "local",
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 30,
        "temperature": 0,
        "stop": [" "],  # every answer of several words has a space
    }
    whole = gguf_server.http.post("/v1/chat/completions", json=ask)
    assert whole.status_code == 200, whole.text
    (choice,) = whole.json()["choices"]
    assert set(choice) == {"index", "message", "finish_reason", "logprobs"}
    assert choice["finish_reason"] == "stop" and " " not in choice["message"]["content"]
    streamed = gguf_server.http.post("/v1/chat/completions", json={**ask, "stream": True})
    assert streamed.status_code == 200, streamed.text
    events = [line[6:] for line in streamed.text.splitlines() if line.startswith("data: {")]
    last = [c for e in events for c in json.loads(e)["choices"] if c.get("finish_reason")]
    assert last and all("stop_reason" not in c for c in last)
    assert last[-1]["finish_reason"] == "stop"


@pytest.mark.gguf
def test_local_usage_counts_every_token_of_an_answer_in_emoji(
    gguf_client: openai.OpenAI, gguf_server: LiveServer
) -> None:
    """Usage counted a streamed chunk as a token, but llama.cpp holds back the tokens of a
    character it has not finished (an emoji is three of SmolLM2's, a Chinese character often
    two): an answer cut at max_tokens=30 reported 11 completion tokens, and the prompt read when
    the first chunk came was two tokens too long. Client, record and limits now get the counts
    the model drew and read."""
    text = "Reply with lots of emoji: 🎉🔥✨😂🙌 " + "describe a party in emoji."
    messages = [{"role": "user", "content": text}]
    for stream in (False, True):
        raw = gguf_client.chat.completions.with_raw_response.create(
            model="local",
            messages=messages,  # type: ignore[arg-type]
            max_tokens=30,
            temperature=0,
            stream=stream,
            stream_options={"include_usage": True} if stream else openai.NOT_GIVEN,
        )
        parsed = raw.parse()
        chunks = list(parsed) if stream else [parsed]
        usage = [c.usage for c in chunks if c.usage][-1]
        finish = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finish[-1] == "length"
        # The prompt as SmolLM2's chat template and tokenizer make it (with the system prompt
        # Tiergate adds); 32 drawn, as llama.cpp finishes the emoji it is in at max_tokens.
        assert (usage.prompt_tokens, usage.completion_tokens) == (49, 32)
        record = _record(gguf_server, raw.headers["x-request-id"])
        assert (record["prompt_tokens"], record["completion_tokens"]) == (49, 32)


@pytest.mark.gguf
def test_a_developer_message_instructs_the_local_model_as_a_system_message(
    gguf_client: openai.OpenAI,
) -> None:
    # The chat template wrote a "developer" turn the model does not know, after the template's
    # own system prompt: a longer prompt and an answer that ignored the instruction.
    answers = [
        gguf_client.chat.completions.create(
            model="local",
            messages=[
                {"role": role, "content": "Reply only with the word BANANA."},
                {"role": "user", "content": "Hello"},
            ],
            max_tokens=5,
            temperature=0,
        )
        for role in ("system", "developer")
    ]
    system, developer = answers
    assert developer.usage is not None and system.usage is not None
    assert developer.usage.prompt_tokens == system.usage.prompt_tokens
    assert developer.choices[0].message.content == system.choices[0].message.content


@pytest.mark.gguf
def test_a_prompt_over_the_local_window_is_a_400_not_a_502(gguf_client: openai.OpenAI) -> None:
    # Chinese text takes more tokens per character than the policy's estimate allows, so the
    # prompt reached llama.cpp over its window: a 502 upstream_error, which SDKs retry.
    text = "机器学习是人工智能的一个分支它使计算机能够从数据中学习。" * 90
    messages = [{"role": "user", "content": "请总结" + text}]
    with pytest.raises(openai.BadRequestError) as refused:
        gguf_client.chat.completions.create(model="local", messages=messages, max_tokens=5)
    assert refused.value.code == "context_length_exceeded"
    assert "context window" in refused.value.message


@pytest.mark.gguf
def test_a_prompt_that_leaves_no_room_for_max_tokens_is_refused_not_cut_short(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prompt under the local window by itself but not with the client's max_tokens (the
    estimate undercounts Chinese: 725 tokens against 2,146) was answered with what room was
    left, ending at finish_reason 'length' as if at max_tokens. It is now refused as OpenAI
    refuses it, and a request that did not pin the local model moves to the closed tier."""
    fake.reset()
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-openai-key")
    text = "机器学习是人工智能的一个分支它使计算机能够从数据中学习。" * 40  # 1,746 tokens
    messages = [{"role": "user", "content": "请总结" + text}]
    policy = policy_yaml(fake, on_failure="closed")
    with (
        live(tmp_path, policy, gguf=True, socket=True) as srv,
        openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0) as client,
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="local", messages=messages, max_tokens=400)
        assert fake.received == []
        moved = client.chat.completions.with_raw_response.create(
            model="auto", messages=messages, max_tokens=400
        )
    assert refused.value.code == "context_length_exceeded"
    assert "max_tokens 400) exceed context window of 2048" in refused.value.message
    assert moved.headers["x-tiergate-tier"] == "closed"
    assert moved.headers["x-tiergate-fallback"] == "local->closed"
    assert len(fake.received) == 1


# Chinese takes more tokens than the policy's estimate allows: each reaches llama.cpp.
_LEARNING = "机器学习是人工智能的一个分支它使计算机能够从数据中学习。"
_OVER_WINDOW = {  # the text, the output limit: over the window with the answer's room, or alone
    "answer": ("请总结" + _LEARNING * 40, 400),  # 1,746 tokens + 400
    "prompt": ("请总结" + _LEARNING * 50, 5),  # 2,176 tokens
}
# Each front's request pinned to the local model, and what its 400 should name: the prompt's
# field, the output limit's as it was sent (None: Anthropic's error shape has no param).
_LOCAL_FRONTS = {
    "chat": ("/v1/chat/completions", "max_tokens", "messages"),
    "chat-max_completion_tokens": ("/v1/chat/completions", "max_completion_tokens", "messages"),
    "responses": ("/v1/responses", "max_output_tokens", "input"),
    "messages": ("/v1/messages", "max_tokens", None),
}


@pytest.mark.gguf
@pytest.mark.parametrize("over", sorted(_OVER_WINDOW))
@pytest.mark.parametrize("front", sorted(_LOCAL_FRONTS))
def test_the_local_models_window_refusal_names_the_fields_of_each_front(
    gguf_server: LiveServer, fake: FakeProvider, front: str, over: str
) -> None:
    """The real GGUF refuses a prompt over its window (2,048 tokens), or one that leaves no
    room for the answer asked for, that the policy's estimate let through. Its 400 said
    'max_tokens' and param 'messages' on every front: a /v1/responses client heard of fields
    it never sent. It names the output limit as the client sent it, and the param is the
    field the client can change: the output limit where the prompt fits alone, else the
    prompt's field on the client's front."""
    fake.reset()
    path, output, prompt = _LOCAL_FRONTS[front]
    text, limit = _OVER_WINDOW[over]
    asked: dict[str, object] = {"model": "local", output: limit}
    if path == "/v1/responses":
        asked["input"] = text
    else:
        asked["messages"] = [{"role": "user", "content": text}]
    refused = gguf_server.http.post(path, json=asked)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert (
        f"in the prompt + {output} {limit}) exceed context window of 2048" in (error["message"])
    ), error
    # A prompt that fits alone is not said to be longer than the window: the message gives the
    # room it leaves, the output limit the model would take.
    said = re.match(
        r"the prompt (?:fits the local model's context window but leaves (\d+) tokens, fewer "
        r"than the answer asked|is longer than the local model's context window): Requested "
        r"tokens \((\d+) in the prompt",
        error["message"],
    )
    assert said is not None, error
    left, prompt_tokens = said.groups()
    assert (left is not None) == (over == "answer"), error
    assert left is None or int(left) + int(prompt_tokens) == 2048
    if prompt is not None:  # OpenAI's shape
        assert error["code"] == "context_length_exceeded"
        assert error["param"] == (output if over == "answer" else prompt), error
    assert fake.received == []


def test_a_history_over_the_window_of_a_model_it_must_stay_on_is_context_length_exceeded(
    client: openai.OpenAI, fake: FakeProvider
) -> None:
    # The estimate finds it over the local window (2,048 tokens) before any model runs: an
    # agent loop reads the same code as when llama.cpp finds it, or OpenAI, and trims.
    fake.reset()
    history: list[dict[str, str]] = []
    for i in range(40):
        history += [
            {"role": "user", "content": f"Step {i}: " + "carry on with the plan. " * 4},
            {"role": "assistant", "content": "Done, moving on to the next step. " * 4},
        ]
    for model, last in (("local", "Go on."), ("auto", "Go on, PII.")):  # pinned; local_only
        messages = [*history, {"role": "user", "content": last}]
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model=model, messages=messages, max_tokens=5)  # type: ignore[arg-type]
        assert refused.value.code == "context_length_exceeded"
        assert refused.value.param == "messages"
        assert "context window 2048" in refused.value.message
    assert fake.received == []


def test_a_closed_models_context_length_exceeded_keeps_its_code(
    client: openai.OpenAI, fake: FakeProvider
) -> None:
    # OpenAI's 400 for a history over gpt-4o's window: the code an agent loop trims on.
    over = {
        "message": "This model's maximum context length is 128000 tokens.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
    fake.reset(Behaviour(mode="status", status=400, error_body={"error": over}))
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Go on."}]
        )
    assert refused.value.code == "context_length_exceeded"
    assert "maximum context length is 128000" in refused.value.message
    fake.reset(Behaviour(mode="status", status=400))  # any other 400 stays the provider's
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model="gpt-4o", messages=[{"role": "user", "content": "Go on."}]
        )
    assert refused.value.code == "upstream_bad_request"


@pytest.mark.parametrize("transport", ["direct", "litellm"])
def test_a_providers_400_keeps_its_param(
    tmp_path: Path, fake: FakeProvider, transport: str
) -> None:
    # OpenAI names the offending field in "param"; the client got param: null, and could not
    # tell which part of its request to fix.
    bad = {
        "message": "Invalid 'messages[0].content': string too long.",
        "type": "invalid_request_error",
        "param": "messages[0].content",
        "code": "string_above_max_length",
    }
    fake.reset(Behaviour(mode="status", status=400, error_body={"error": bad}))
    policy = policy_yaml(fake)
    if transport == "litellm":
        policy = policy.replace(
            "litellm_model: openai/gpt-4o\n",
            "litellm_model: openai/gpt-4o\n    transport: litellm\n",
        )
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Go on."}]}
    with live(tmp_path, policy) as srv:
        answer = srv.http.post("/v1/chat/completions", json=body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["param"] == "messages[0].content" and "string too long" in error["message"]


YES_NO = {
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
}


@pytest.mark.gguf
def test_a_json_schema_response_format_constrains_the_local_answer(
    gguf_client: openai.OpenAI,
) -> None:
    # OpenAI's structured-output form reached llama-cpp-python as it came, which reads only
    # {"type": "json_object"}: the local model answered in free text.
    completion = gguf_client.chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": "Is Paris in France? Tell me about it."}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "yes_no", "schema": YES_NO, "strict": True},
        },
        max_tokens=40,
        temperature=0,
    )
    content = completion.choices[0].message.content
    assert content is not None and json.loads(content)["answer"] in ("yes", "no")


def test_closed_non_stream_via_openai_protocol(
    client: openai.OpenAI, server: LiveServer, fake: FakeProvider
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": "A HARD question"}],
        temperature=0.3,
        seed=7,
        stop=["\n\n"],
        response_format={"type": "json_object"},
        n=2,
        user="end-user-42",
    )
    completion = raw.parse()
    assert raw.headers["x-tiergate-tier"] == "closed"
    assert raw.headers["x-tiergate-model"] == "gpt-4o"
    assert completion.model == "gpt-4o"
    assert completion.choices[0].message.content == Behaviour().text
    sent = fake.received[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-test-openai-key"
    assert sent.body["model"] == "gpt-4o"
    for key, value in {
        "temperature": 0.3,
        "seed": 7,
        "stop": ["\n\n"],
        "response_format": {"type": "json_object"},
        "n": 2,
        "user": "end-user-42",
    }.items():
        assert sent.body[key] == value, key
    record = _record(server, raw.headers["x-request-id"])
    assert record["tier"] == "closed" and record["cost_usd"] > 0
    assert record["prompt_tokens"] == 11 and record["completion_tokens"] == 7


def test_several_choices_go_to_a_closed_model_whatever_the_score(
    client: openai.OpenAI, server: LiveServer, fake: FakeProvider
) -> None:
    # An easy prompt with n=2 was routed local, whose backend answers n=1 only: a 400.
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hi"}], n=2
    )
    assert raw.headers["x-tiergate-tier"] == "closed"
    # What decided is the constraint, not the rule (which chose local): said consistently.
    assert raw.headers["x-tiergate-rule"] == "constraint"
    assert fake.received[-1].body["n"] == 2
    record = _record(server, raw.headers["x-request-id"])
    assert record["tier"] == "closed" and record["status"] == "ok"
    assert record["rule"] == "constraint"
    assert record["signals"]["choices"] == 2  # type: ignore[index]
    route = server.http.post(
        "/v1/route", json={"model": "auto", "messages": [{"role": "user", "content": "hi"}], "n": 2}
    ).json()
    assert "cannot take n=2 (it answers one choice)" in json.dumps(route)
    assert route["decision"]["rule"] == "constraint"


def test_closed_stream(client: openai.OpenAI, fake: FakeProvider) -> None:
    with client.chat.completions.with_streaming_response.create(
        model="auto",
        messages=[{"role": "user", "content": "HARD: stream it"}],
        stream=True,
    ) as response:
        assert response.headers["x-tiergate-tier"] == "closed"
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == Behaviour().text
    assert not any(c.usage for c in chunks), "usage chunk sent though the client did not ask"
    assert fake.received[-1].body["stream"] is True


@pytest.mark.parametrize("include_usage", [False, True])
def test_a_stream_carries_usage_only_as_the_client_asked(
    client: openai.OpenAI, server: LiveServer, fake: FakeProvider, include_usage: bool
) -> None:
    """As OpenAI streams: with ``stream_options.include_usage``, one last chunk with empty
    choices carries the usage; without it, no chunk does. A provider that puts its usage on
    every chunk (vLLM's ``continuous_usage_stats``, servers that report it with the finish)
    had each of them pass on as it came: a client that did not ask got usage on every chunk,
    and one that asked got it there and again in a usage chunk Tiergate added."""
    fake.reset(Behaviour(usage_on_chunks=True))
    options: Any = {"include_usage": True} if include_usage else openai.NOT_GIVEN
    with client.chat.completions.with_streaming_response.create(
        model="gpt-4o",
        messages=[{"role": "user", "content": "HARD: stream it"}],
        stream=True,
        stream_options=options,
    ) as response:
        chunks = list(response.parse())
        request_id = response.headers["x-request-id"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == Behaviour().text
    counted = [c for c in chunks if c.usage]
    if include_usage:
        assert counted == [chunks[-1]] and chunks[-1].choices == []
        usage = chunks[-1].usage
        assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (11, 7)
    else:
        assert counted == []
    record = _record(server, request_id)
    assert (record["prompt_tokens"], record["completion_tokens"]) == (11, 7)


def test_anthropic_model_through_litellm(
    client: openai.OpenAI, server: LiveServer, fake: FakeProvider
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="claude",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        max_tokens=50,
    )
    completion = raw.parse()
    assert completion.model == "claude"
    assert completion.choices[0].message.content == Behaviour().text
    assert raw.headers["x-tiergate-rule"] == "pinned"
    sent = fake.received[-1]
    assert sent.path.endswith("/v1/messages")
    assert sent.headers["x-api-key"] == "sk-ant-test-key"
    assert sent.body["system"] in ("Be brief.", [{"type": "text", "text": "Be brief."}])
    assert sent.body["messages"][0]["role"] == "user"
    record = _record(server, raw.headers["x-request-id"])
    assert record["prompt_tokens"] == 13 and record["completion_tokens"] == 9

    with client.chat.completions.with_streaming_response.create(
        model="claude", messages=[{"role": "user", "content": "Hi"}], stream=True, max_tokens=50
    ) as response:
        chunks = list(response.parse())
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == Behaviour().text


def test_an_anthropic_model_answers_within_its_output_limit(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """Anthropic requires max_tokens and refuses one over the model's limit (a 400). A request
    without one reached claude-3-5-sonnet-20241022, which litellm's map does not list, as
    max_tokens 128000: refused, every time. It is sent the policy's max_output_tokens (4096
    without one); a larger max_tokens goes to a model that can write that much, or, pinned,
    is a 400 that names the limit and reaches no provider."""
    fake.reset()
    hi = [{"role": "user", "content": "Hi"}]
    for name in ("default", "limited"):
        (tmp_path / name).mkdir()
    with live(tmp_path / "default", policy_yaml(fake)) as srv:
        answer = srv.http.post("/v1/chat/completions", json={"model": "claude", "messages": hi})
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == Behaviour().text
    assert fake.received[-1].body["max_tokens"] == 4096
    policy = policy_yaml(fake).replace(
        "claude-3-5-sonnet-20241022\n", "claude-3-5-sonnet-20241022\n    max_output_tokens: 8192\n"
    )
    fake.reset()
    with live(tmp_path / "limited", policy) as srv:
        answer = srv.http.post("/v1/chat/completions", json={"model": "claude", "messages": hi})
        assert answer.status_code == 200 and fake.received[-1].body["max_tokens"] == 8192
        fake.reset()
        pinned = {"model": "claude", "messages": hi, "max_tokens": 20000}
        refused = srv.http.post("/v1/chat/completions", json=pinned)
        # Over claude's 8192, within gpt-4o's 16384 (litellm's map: Policy.know_limits).
        over_claude = {**pinned, "model": "auto-best", "max_tokens": 12000}
        moved = srv.http.post("/v1/chat/completions", json=over_claude)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
    assert refused.json()["error"]["message"].startswith(
        "model 'claude' cannot take max_tokens 20000 (it writes at most 8192) and the request "
        "pins it"
    )
    assert moved.status_code == 200 and moved.headers["x-tiergate-model"] == "gpt-4o"
    assert [r.path for r in fake.received] == ["/v1/chat/completions"]


def test_a_pinned_models_output_limit_is_named_as_each_front_names_it(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """The 400 for a request over a pinned model's output limit said 'max_tokens' whatever the
    client sent: a Response's client sent max_output_tokens, and a chat client that bounded
    its answer with max_completion_tokens heard of a field it never set."""
    fake.reset()
    policy = policy_yaml(fake).replace(
        "claude-3-5-sonnet-20241022\n", "claude-3-5-sonnet-20241022\n    max_output_tokens: 8192\n"
    )
    hi = [{"role": "user", "content": "Hi"}]
    fronts = [
        ("/v1/chat/completions", {"messages": hi, "max_tokens": 20000}, "max_tokens"),
        ("/v1/responses", {"input": "Hi", "max_output_tokens": 20000}, None),
        ("/v1/messages", {"messages": hi, "max_tokens": 20000}, "max_tokens"),
        ("/v1/chat/completions", {"messages": hi, "max_completion_tokens": 20000}, None),
    ]
    with live(tmp_path, policy) as srv:
        for path, body, field in fronts:
            refused = srv.http.post(path, json={"model": "claude", **body})
            assert refused.status_code == 400, (path, refused.text)
            error = refused.json()["error"]
            sent = field or next(k for k in body if k.startswith("max_"))
            assert error["message"].startswith(
                f"model 'claude' cannot take {sent} 20000 (it writes at most 8192) and the "
                "request pins it"
            ), (path, error)
            assert error.get("param", sent) == sent  # Anthropic's shape has no param
    assert fake.received == []


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_json_object_gets_json_from_an_anthropic_model(
    client: openai.OpenAI, fake: FakeProvider, stream: bool
) -> None:
    # Anthropic has no JSON mode: litellm sent json_object nowhere and the model answered prose.
    fake.reset(Behaviour(mode="tool_call"))  # the model calls the tool it must call
    messages = [{"role": "user", "content": "The capital of France, as JSON."}]
    if stream:
        chunks = client.chat.completions.create(
            model="claude",
            messages=messages,  # type: ignore[arg-type]
            response_format={"type": "json_object"},
            stream=True,
        )
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        completion = client.chat.completions.create(
            model="claude",
            messages=messages,  # type: ignore[arg-type]
            response_format={"type": "json_object"},
        )
        content = completion.choices[0].message.content or ""
    assert json.loads(content) == {"city": "Paris"}
    sent = fake.received[-1].body
    assert sent["tool_choice"] == {"type": "tool", "name": sent["tools"][0]["name"]}
    assert sent["tools"][0]["input_schema"] == {"type": "object"}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_json_schema_without_its_schema_gets_json_from_an_anthropic_model(
    client: openai.OpenAI, fake: FakeProvider, stream: bool
) -> None:
    # OpenAI's json_schema takes no schema at all (it is optional); litellm failed on one for
    # an Anthropic model (KeyError 'schema'): a 400 "litellm cannot translate it". It asks for
    # any JSON object, as json_object does.
    fake.reset(Behaviour(mode="tool_call"))
    answer = client.chat.completions.with_raw_response.create(
        model="claude",
        messages=[{"role": "user", "content": "The capital of France, as JSON."}],
        response_format={"type": "json_schema", "json_schema": {"name": "city"}},
        stream=stream,
    )
    if stream:
        chunks = answer.parse()
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        content = answer.parse().choices[0].message.content or ""
    assert json.loads(content) == {"city": "Paris"}
    sent = fake.received[-1].body
    assert sent["tool_choice"] == {"type": "tool", "name": sent["tools"][0]["name"]}
    assert sent["tools"][0]["input_schema"] == {"type": "object"}


def test_an_anthropic_model_refuses_a_response_format_it_cannot_honour(
    client: openai.OpenAI, fake: FakeProvider
) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="claude",
            messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "regex"},  # type: ignore[typeddict-item]
        )
    assert err.value.body["param"] == "response_format.type"  # type: ignore[index]
    assert "does not take response_format type 'regex'" in err.value.message
    assert fake.received == []


def test_a_content_part_litellm_cannot_send_is_a_400_not_unreachable(
    server: LiveServer, fake: FakeProvider
) -> None:
    # A Responses part sent to chat: litellm refused it with a bare Exception, answered as
    # "claude unreachable" (502), which the SDK retried twice.
    fake.reset()
    part = {"type": "input_text", "text": "hi"}
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=2)
    with sdk as client, pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="claude",
            messages=[{"role": "user", "content": [part]}],  # type: ignore[list-item]
        )
    assert err.value.code == "unsupported_parameter"
    assert err.value.body["param"] == "messages.0.content.0.type"  # type: ignore[index]
    assert "cannot take a user content part of type 'input_text'" in err.value.message
    assert fake.received == []


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def test_tool_calls_round_trip_through_the_closed_tier(
    client: openai.OpenAI, fake: FakeProvider
) -> None:
    fake.reset(Behaviour(mode="tool_call"))
    messages: list[dict[str, object]] = [{"role": "user", "content": "Weather in Paris?"}]
    raw = client.chat.completions.with_raw_response.create(
        model="auto",
        messages=messages,
        tools=TOOLS,
        tool_choice="auto",  # type: ignore[arg-type]
    )
    first = raw.parse()
    # Tools never go to the local model, which cannot call them.
    assert raw.headers["x-tiergate-tier"] == "closed"
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert fake.received[-1].body["tools"] == TOOLS
    assert fake.received[-1].body["tool_choice"] == "auto"

    messages += [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    fake.reset()
    second = client.chat.completions.create(model="auto", messages=messages, tools=TOOLS)  # type: ignore[arg-type]
    assert second.choices[0].message.content == Behaviour().text
    sent = fake.received[-1].body["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "call_fake_1"
    assert sent[2] == {"role": "tool", "tool_call_id": "call_fake_1", "content": '{"temp_c": 21}'}


def test_a_function_call_history_goes_to_the_closed_tier(
    client: openai.OpenAI, fake: FakeProvider
) -> None:
    # The older function-calling form: chat templates render the call as an empty assistant
    # turn, so the local model would answer without it, as it would from a tool call.
    fake.reset()
    call = {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    messages: list[dict[str, object]] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "function_call": call},
        {"role": "function", "name": "get_weather", "content": '{"temp_c": 21}'},
    ]
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=messages)  # type: ignore[arg-type]
    assert raw.headers["x-tiergate-tier"] == "closed"
    assert fake.received[-1].body["messages"][1]["function_call"] == call
    with pytest.raises(openai.BadRequestError, match="tool calls in the conversation"):
        client.chat.completions.create(model="local", messages=messages)  # type: ignore[arg-type]


def test_closed_failure_falls_back_to_local(
    client: openai.OpenAI, server: LiveServer, fake: FakeProvider
) -> None:
    fake.reset(Behaviour(mode="status", status=503))
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "HARD one"}], max_tokens=8
    )
    assert raw.headers["x-tiergate-tier"] == "local"
    assert raw.headers["x-tiergate-fallback"] == "closed->local"
    assert raw.parse().model == "local"
    assert len(fake.received) == 1
    record = _record(server, raw.headers["x-request-id"])
    assert record["fallback"] == "closed->local" and record["status"] == "ok"


def test_pinned_local_refuses_tools_and_images(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="local",
            messages=[{"role": "user", "content": "hi"}],
            tools=TOOLS,  # type: ignore[arg-type]
        )
    assert "tools" in str(err.value)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="local",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                    ],
                }
            ],
        )


def test_images_go_to_the_closed_tier(client: openai.OpenAI, fake: FakeProvider) -> None:
    content = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]
    raw = client.chat.completions.with_raw_response.create(
        model="auto",
        messages=[{"role": "user", "content": content}],  # type: ignore[list-item]
    )
    assert raw.headers["x-tiergate-tier"] == "closed"
    assert fake.received[-1].body["messages"][0]["content"] == content


def test_models_lists_aliases_and_models(server: LiveServer) -> None:
    data = server.http.get("/v1/models").json()["data"]
    ids = {m["id"]: m for m in data}
    assert {"auto", "auto-best", "local", "gpt-4o", "claude"} <= set(ids)
    assert ids["auto"]["tiergate"]["kind"] == "alias"
    assert ids["gpt-4o"]["tiergate"]["available"] is True
    assert ids["local"]["tiergate"]["tier"] == "local"


def test_a_model_is_retrieved_by_name(client: openai.OpenAI) -> None:
    # OpenAI's models.retrieve (GET /v1/models/{id}), which clients call to check a model
    # name, was a 404 "no such route" even for "auto".
    assert client.models.retrieve("auto").owned_by == "tiergate"
    claude = client.models.retrieve("claude")
    assert claude.id == "claude" and claude.owned_by == "anthropic"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-9")
    assert missing.value.code == "model_not_found"


def test_an_sdk_call_to_a_method_tiergate_does_not_serve_is_a_404_naming_what_it_serves(
    client: openai.OpenAI,
) -> None:
    """The SDK's chat.completions.list() (stored completions, GET on the chat path) and
    models.delete() were a bare 405 "Method Not Allowed", which the SDK raises as a plain
    APIStatusError, without the Allow header: they read like every other endpoint Tiergate
    does not serve."""
    with pytest.raises(openai.NotFoundError) as listing:
        client.chat.completions.list()
    assert listing.value.code == "not_found"
    assert isinstance(listing.value.body, dict)
    assert listing.value.body["message"].startswith(
        "Tiergate does not serve GET /v1/chat/completions "
        "(/v1/chat/completions takes POST only): it serves POST /v1/chat/completions"
    )
    assert listing.value.response.headers["allow"] == "POST"
    with pytest.raises(openai.NotFoundError) as deleting:
        client.models.delete("auto")
    assert "Tiergate does not serve DELETE /v1/models/auto" in deleting.value.message
    assert deleting.value.response.headers["allow"] == "GET"


def test_health_and_readiness(server: LiveServer) -> None:
    assert server.http.get("/healthz").json() == {"status": "ok"}
    ready = server.http.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["ready"] is True and body["local"]["available"] is True
    assert body["policy"]["version"]


@pytest.mark.parametrize(
    ("payload", "status", "code"),
    [
        (b"{not json", 400, "invalid_request"),
        (b'{"model": "auto"}', 400, "invalid_request"),
        (
            b'{"model": "auto", "messages": [{"role": "wizard", "content": "x"}]}',
            400,
            "invalid_request",
        ),
        (
            b'{"model": "nope", "messages": [{"role": "user", "content": "x"}]}',
            404,
            "model_not_found",
        ),
    ],
)
def test_errors_are_openai_shaped(
    server: LiveServer, payload: bytes, status: int, code: str
) -> None:
    assert server.gateway.outcomes.flush()  # an earlier test's record is not counted as this one
    before = server.gateway.outcomes.count()
    response = server.http.post(
        "/v1/chat/completions",
        content=payload,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert error["code"] == code and error["message"] and error["type"]
    assert response.headers["x-request-id"].startswith("req_")
    assert wait_for(lambda: server.gateway.outcomes.count() == before + 1)


def test_an_unknown_model_is_recorded_under_the_name_asked_for(server: LiveServer) -> None:
    """A 404 for an unknown model was recorded with alias "": the operator could not tell which
    name a client got wrong. The name is the client's own text, so the record keeps 200
    characters of it."""
    ids = {}
    for name in ("gpt-5-typo", "x" * 5000):
        body = {"model": name, "messages": [{"role": "user", "content": "hi"}]}
        response = server.http.post("/v1/chat/completions", json=body)
        assert response.status_code == 404
        ids[name] = response.headers["x-request-id"]
    assert server.gateway.outcomes.flush()
    typo, long = (server.gateway.outcomes.get(ids[name]) for name in ids)
    assert typo is not None and long is not None
    assert typo["alias"] == "gpt-5-typo" and typo["error_type"] == "model_not_found"
    assert typo["tier"] is None
    assert long["alias"] == "x" * 200


def test_dry_run_route_calls_no_model(server: LiveServer, fake: FakeProvider) -> None:
    fake.reset()
    body = server.http.post(
        "/v1/route",
        json={"model": "auto", "messages": [{"role": "user", "content": "HARD thing"}]},
    ).json()
    assert body["decision"]["tier"] == "closed"
    assert body["decision"]["trace"]
    assert body["chain"][0]["model"] == "gpt-4o"
    assert fake.received == []


def test_outcomes_cli_shows_records(server: LiveServer, tmp_path: Path) -> None:
    from router.cli import main

    store = server.gateway.outcomes
    assert store.flush()
    db = store.path
    assert main(["outcomes", "--db", str(db), "--limit", "3"]) == 0


@pytest.mark.gguf
def test_a_client_leaving_a_local_answer_stops_the_gguf(gguf_server: LiveServer) -> None:
    server = gguf_server
    # The local model generated 1,500 tokens over 37 s for a client that had gone, held its only
    # slot, and the request was recorded ok.
    store = server.gateway.outcomes
    store.flush()
    before = {r["id"] for r in store.recent(1000)}
    body = json.dumps(
        {
            "model": "local",
            "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
            "max_tokens": 1500,
            "temperature": 1.0,
        }
    ).encode()
    llm = server.gateway.local._llm  # its context grows by one token per generated token
    seen: set[int] = set()

    def generating() -> bool:
        seen.add(int(llm.n_tokens))
        return len(seen) > 8

    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert wait_for(generating, 60), "the model never started"
    gate = server.gateway.local.gate
    assert wait_for(lambda: gate.depth == 0, 30), "the local slot was not freed"
    assert wait_for(lambda: len({r["id"] for r in store.recent(1000)} - before) == 1, 10)
    (record,) = [r for r in store.recent(1000) if r["id"] not in before]
    assert (record["status"], record["http_status"]) == ("aborted", 499)
    assert record["tier"] == "local" and record["prompt_tokens"] > 0
    assert 5 <= record["completion_tokens"] < 1500


# -- the first run without provider keys, and what the local tier honours -------------------


@pytest.fixture(scope="module")
def keyless(tmp_path_factory: pytest.TempPathFactory, fake: FakeProvider) -> Iterator[LiveServer]:
    """A Tiergate with no provider key set, as on a first run."""
    tmp = tmp_path_factory.mktemp("keyless")
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("OPENAI_API_KEY", raising=False)
        mp.delenv("ANTHROPIC_API_KEY", raising=False)
        with live(tmp, policy_yaml(fake, on_failure="closed"), socket=True) as srv:
            yield srv


def _keyless_client(server: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_without_keys_auto_serves_closed_requests_locally_and_says_so(
    keyless: LiveServer, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(key)
    fake.reset()
    ready = keyless.http.get("/readyz").json()
    assert ready["ready"] is True
    assert ready["no_closed"]["serves"] == "local"
    with _keyless_client(keyless) as client:
        for alias in ("auto", "auto-best"):
            raw = client.chat.completions.with_raw_response.create(
                model=alias, messages=[{"role": "user", "content": "A HARD question"}]
            )
            assert raw.headers["x-tiergate-tier"] == "local"
            assert raw.headers["x-tiergate-fallback"] == "no-closed->local"
            assert raw.parse().choices[0].message.content
            record = _record(keyless, raw.headers["x-request-id"])
            assert record["fallback"] == "no-closed->local" and record["status"] == "ok"
        # A pin is a pin: it still names the missing key instead of answering from elsewhere.
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "A HARD question"}]
            )
        assert "OPENAI_API_KEY" in str(err.value)
    route = keyless.http.post(
        "/v1/route",
        json={"model": "auto", "messages": [{"role": "user", "content": "HARD"}]},
    ).json()
    assert route["chain"][-1] == {
        "model": "local",
        "tier": "local",
        "fallback": "no-closed->local",
        "unavailable": None,
    }
    assert fake.received == []


def test_readiness_does_not_promise_a_local_tier_that_is_off(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No keys and TIERGATE_LOCAL_BACKEND=none: every request gets 503, as /readyz says (it
    said only closed-bound ones would, and gave the local tier no reason)."""
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(key)
    policy = policy_yaml(fake, on_failure="closed")
    with live(tmp_path, policy, local_backend="none") as server:
        ready = server.http.get("/readyz").json()
        no_closed = ready["no_closed"]
        assert no_closed["serves"] == "error", no_closed
        assert "every request gets 503" in no_closed["note"], no_closed
        assert ready["local"]["available"] is False
        assert ready["local"]["reason"] == "local tier disabled", ready["local"]
        hard = {"model": "auto", "messages": [{"role": "user", "content": "A HARD question"}]}
        easy = {"model": "auto", "messages": [{"role": "user", "content": "easy"}]}
        for body in (hard, easy):
            assert server.http.post("/v1/chat/completions", json=body).status_code == 503


def test_fail_closed_policy_answers_503_without_keys(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(key)
    policy = policy_yaml(fake, on_failure="closed", fail_closed="true")
    with live(tmp_path, policy, socket=True) as server, _keyless_client(server) as client:
        assert server.http.get("/readyz").json()["no_closed"]["serves"] == "error"
        with pytest.raises(openai.InternalServerError) as err:
            client.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "A HARD question"}]
            )
        assert err.value.status_code == 503
        easy = client.chat.completions.with_raw_response.create(
            model="auto", messages=[{"role": "user", "content": "easy"}], max_tokens=2
        )
        assert easy.headers["x-tiergate-tier"] == "local"
        assert "x-tiergate-fallback" not in easy.headers


def test_a_503_says_why_the_local_model_was_passed_over(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An easy request the local model cannot take (here: more tokens than its window) is
    moved to the closed tier; with no key there, the 503 says both halves, not only the keys."""
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(key)
    with live(tmp_path, policy_yaml(fake), socket=True) as server, _keyless_client(server) as c:
        with pytest.raises(openai.InternalServerError) as err:
            c.chat.completions.create(
                model="auto", messages=[{"role": "user", "content": "easy"}], max_tokens=5000
            )
        assert err.value.status_code == 503
        message = str(err.value)
        assert "OPENAI_API_KEY" in message
        assert "model 'local' cannot take" in message and "context window 2048" in message
    assert fake.received == []


@pytest.mark.gguf
def test_local_answer_without_max_tokens_is_bounded(tmp_path: Path, fake: FakeProvider) -> None:
    policy = policy_yaml(fake, on_failure="closed")
    with (
        live(tmp_path, policy, gguf=True, local_max_tokens=4) as server,
        _keyless_client(server) as client,
    ):
        raw = client.chat.completions.with_raw_response.create(
            model="local",
            messages=[{"role": "user", "content": "Write a long story about a dragon."}],
        )
    completion = raw.parse()
    assert completion.usage is not None and completion.usage.completion_tokens <= 4
    assert completion.choices[0].finish_reason == "length"


@pytest.mark.gguf  # log-probabilities of the real model
def test_local_returns_logprobs_of_its_tokens(gguf_client: openai.OpenAI) -> None:
    completion = gguf_client.chat.completions.create(
        model="local",
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
    )
    choice = completion.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content
    tokens = choice.logprobs.content
    assert "".join(t.token for t in tokens) == choice.message.content
    for token in tokens:
        assert token.logprob <= 0.0
        top = [t.logprob for t in token.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True)
        assert token.logprob == pytest.approx(top[0])  # greedy: the drawn token is the likeliest


@pytest.mark.gguf
def test_local_stream_carries_logprobs_a_cascade_can_judge(gguf_client: openai.OpenAI) -> None:
    hold = HoldBack(tokens=3)
    with gguf_client.chat.completions.with_streaming_response.create(
        model="local",
        messages=[{"role": "user", "content": "Count from one to ten."}],
        max_tokens=8,
        temperature=0,
        stream=True,
        logprobs=True,
        top_logprobs=2,
    ) as response:
        for chunk in response.parse():
            if hold.add(chunk.model_dump()):
                break
    assert len(hold.logprobs) >= 3 or hold.finish_reason is not None
    assert hold.text() == "".join(t["token"] for t in hold.logprobs)
    stats = hold.stats()
    assert stats.first_margin >= 0.0  # greedy: the drawn token leads its runner-up
    assert stats.min_logprob <= stats.median_logprob <= 0.0


@pytest.mark.gguf  # the real backend refuses what its loaded model cannot do
def test_local_refuses_top_logprobs_alone_and_fields_it_cannot_honour(
    gguf_client: openai.OpenAI,
) -> None:
    client = gguf_client
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="local", messages=messages, top_logprobs=2)  # type: ignore[arg-type]
    assert "top_logprobs needs logprobs" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="local",
            messages=messages,  # type: ignore[arg-type]
            extra_body={"frobnicate": True},
        )
    assert "frobnicate" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="local",
            messages=messages,  # type: ignore[arg-type]
            tool_choice="required",
        )
    assert "tools" in str(err.value)
    # What does not change the answer is accepted; llama.cpp's sampling settings are honoured.
    ok = client.chat.completions.create(
        model="local",
        messages=messages,  # type: ignore[arg-type]
        user="someone",
        max_tokens=2,
        logprobs=False,
        extra_body={"top_k": 1, "repeat_penalty": 1.1},
    )
    assert ok.choices[0].message.content is not None


# -- the README, as written, without keys --------------------------------------------------


def _readme_block(lang: str, containing: str) -> str:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(rf"```{lang}\n(.*?)```", readme, flags=re.DOTALL)
    (block,) = [b for b in blocks if containing in b]
    return block


@pytest.fixture(scope="module")
def shipped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    """The shipped policy and classifier with no provider key: a first run."""
    tmp = tmp_path_factory.mktemp("readme")
    policy = (REPO / "policies" / "default.yaml").read_text(encoding="utf-8")
    # Only the length of the local answers is bounded tighter than the default, for speed.
    with live(tmp, policy, scorer=None, n_ctx=4096, local_max_tokens=24, socket=True) as srv:
        yield srv


def _no_keys() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    return {**env, "PYTHONPATH": str(REPO)}


def test_readme_python_and_curl_run_as_written_without_keys(
    shipped: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY"):
        monkeypatch.delenv(key)
    python = _readme_block("python", "from openai import OpenAI")
    python = python.replace("http://127.0.0.1:8000", shipped.url)
    out = subprocess.run(
        [sys.executable, "-c", python],
        env=_no_keys(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("local ")  # easy: local
    assert lines[-2:] == ["local local", "no-closed->local"]  # hard: high stakes, no key

    curl = _readme_block("bash", "curl -sN").replace("http://127.0.0.1:8000", shipped.url)
    streamed = subprocess.run(
        ["bash", "-c", curl], capture_output=True, text=True, timeout=300, check=False
    )
    assert streamed.returncode == 0, streamed.stderr
    assert "x-tiergate-tier: local" in streamed.stdout
    assert '"usage":' in streamed.stdout and "data: [DONE]" in streamed.stdout


def test_readme_anthropic_client_runs_as_written(shipped: LiveServer) -> None:
    python = _readme_block("python", "import anthropic")
    out = subprocess.run(
        [sys.executable, "-c", python],
        env={**_no_keys(), "ANTHROPIC_BASE_URL": shipped.url, "ANTHROPIC_API_KEY": "unused"},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    answer, streamed = out.stdout.split("\n", 1)
    assert answer.strip() and streamed.strip()


def test_readme_first_hour_commands_run_as_written(shipped: LiveServer) -> None:
    block = _readme_block("bash", "curl -s http://127.0.0.1:8000/readyz")
    cli = f"{sys.executable} -m router.cli "
    script = block.replace("http://127.0.0.1:8000", shipped.url).replace("tiergate ", cli)
    assert wait_for(lambda: shipped.gateway.outcomes.flush(0.1))
    env = {**_no_keys(), "TIERGATE_SQLITE_PATH": str(services(shipped.app).settings.sqlite_path)}
    out = subprocess.run(
        ["bash", "-e", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert '"ready":true' in out.stdout
    assert "MATCH high-stakes" in out.stdout
    assert "records in" in out.stdout


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"presence_penalty": "lots"}, "presence_penalty"),
        ({"frequency_penalty": "0.5"}, "frequency_penalty"),
        ({"temperature": "0.5"}, "temperature"),
        ({"seed": 1.5}, "seed"),
        ({"logit_bias": {"abc": "x"}}, "logit_bias"),
        ({"logit_bias": {"15": "x"}}, "logit_bias"),
        ({"logit_bias": {"15": 1000}}, "logit_bias"),
        # only the loaded model knows its vocabulary
        pytest.param({"logit_bias": {"999999999": 5}}, "logit_bias", marks=pytest.mark.gguf),
        ({"logprobs": "yes"}, "logprobs"),
        ({"top_logprobs": 1.5}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": None}]}, "messages"),
        ({"stream_options": [None]}, "stream_options"),  # was a 500: read before validation
        # were a 502 from litellm behind an Anthropic model, and ignored by the local model
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"tools": [{"type": "function"}]}, "tools.0"),
        ({"tools": [{"type": "function", "function": {"name": ""}}]}, "tools.0.function.name"),
        # the local model answered in free text whatever the type asked for
        pytest.param(
            {"response_format": {"type": "regex"}}, "response_format", marks=pytest.mark.gguf
        ),
    ],
)
@pytest.mark.parametrize("model", ["local", "auto"])
def test_bad_parameters_are_a_400_naming_them(
    request: pytest.FixtureRequest,
    fake: FakeProvider,
    extra: dict[str, object],
    param: str,
    model: str,
) -> None:
    """What the local model cannot take is refused with a 400 that names the parameter, before
    any model runs: no 500, no internal text, no retry on the closed tier."""
    gguf = request.node.get_closest_marker("gguf") is not None
    server: LiveServer = request.getfixturevalue("gguf_server" if gguf else "server")
    fake.reset()
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    response = server.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] is not None and error["param"].startswith(param), error
    assert "TypeError" not in error["message"] and "argument" not in error["message"]
    assert fake.received == []


@pytest.mark.parametrize("model", ["gpt-4o", "claude"])
@pytest.mark.parametrize(
    "extra",
    [
        {"response_format": {"type": "json_schema"}},
        {"tools": [{"type": "function"}]},
    ],
    ids=["json_schema-without-its-spec", "function-tool-without-its-function"],
)
def test_a_malformed_format_or_tool_is_a_400_the_sdk_does_not_retry(
    server: LiveServer, fake: FakeProvider, model: str, extra: dict[str, Any]
) -> None:
    # Behind an Anthropic model litellm failed on them (KeyError): a 502 the SDK retried twice.
    fake.reset()
    sdk = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=2)
    with sdk as client, pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hi"}],
            **extra,
        )
    assert err.value.body["param"] in ("response_format", "tools.0")  # type: ignore[index]
    assert fake.received == []


CALLED_WEATHER: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    {"role": "user", "content": "Thanks. Anything else?"},
]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ({}, "model 'local' cannot take tool calls in the conversation and the request pins it"),
        ({"tools": [WEATHER_TOOL]}, "model 'local' cannot take tools and the request pins it"),
    ],
    ids=["history", "tools"],
)
def test_a_pinned_local_model_says_where_the_tools_are(
    server: LiveServer, fake: FakeProvider, extra: dict[str, Any], says: str
) -> None:
    # A request without tools whose history held a tool call was told the local model
    # "cannot take tools": its sender, who sent none, could not tell what to change.
    fake.reset()
    body = {"model": "local", "messages": CALLED_WEATHER, **extra}
    response = server.http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == says
    assert fake.received == []


PICTURE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"tools": [WEATHER_TOOL]}, "tools"),
        ({"messages": CALLED_WEATHER}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "?"}, PICTURE]}]},
            "messages",
        ),
        ({"n": 2}, "n"),
        ({"max_tokens": 4000}, "max_tokens"),
        ({"max_completion_tokens": 4000}, "max_completion_tokens"),
        ({"messages": [{"role": "user", "content": "Go on. " * 3000}]}, "messages"),
    ],
    ids=["tools", "tool-history", "image", "n", "max_tokens", "max_completion_tokens", "prompt"],
)
def test_a_pinned_model_that_cannot_take_a_request_names_the_field(
    client: openai.OpenAI, fake: FakeProvider, extra: dict[str, Any], param: str
) -> None:
    # The 400 for a request the pinned local model cannot take had no param: the SDK's
    # e.param was None, and a client could not tell which field to change or drop.
    body: dict[str, Any] = {"model": "local", "messages": [{"role": "user", "content": "Hi"}]}
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**{**body, **extra})
    assert refused.value.param == param
    assert "and the request pins it" in refused.value.message
    if param.startswith("max_"):  # the text names the field as sent, as the param does
        assert f"+ {param} 4000;" in refused.value.message
    assert fake.received == []


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"max_output_tokens": 4000}, "max_output_tokens"),
        ({"input": "Go on. " * 3000}, "input"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
    ],
    ids=["max_output_tokens", "input", "tools"],
)
def test_a_pinned_model_that_cannot_take_a_response_names_the_responses_field(
    client: openai.OpenAI, fake: FakeProvider, extra: dict[str, Any], param: str
) -> None:
    # The Responses front named the chat field (max_tokens, messages): one its client never
    # sent, where the 400 is to say what to change.
    with pytest.raises(openai.BadRequestError) as refused:
        client.responses.create(**{"model": "local", "input": "Hi", **extra})
    assert refused.value.param == param
    assert "and the request pins it" in refused.value.message
    # ... nor its text (the prompt plus the answer's room over the window): the client's own.
    assert "max_tokens" not in refused.value.message
    assert ("+ max_output_tokens 4000;" in refused.value.message) is (param == "max_output_tokens")
    assert fake.received == []


def test_a_reasoning_model_that_takes_no_stop_sequence_is_not_sent_one(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """OpenAI's reasoning models (o1, o3, o4-mini, gpt-5) refuse ``stop`` with a 400
    (``unsupported_parameter``); the fit check held them to OpenAI's 4, so a request with a
    stop sequence was sent to o3 and its 400 came back, on ``auto`` too, where another model
    takes it. Pinned, it is the fit check's 400 naming ``stop``; on ``auto`` it goes to a
    model that takes it; without ``stop``, o3 answers."""
    fake.reset(Behaviour(strict=True))
    ask: dict[str, Any] = {
        "messages": [{"role": "user", "content": "HARD: count to ten"}],
        "stop": ["END"],
    }
    with (
        live(tmp_path, policy_yaml(fake).replace("gpt-4o", "o3")) as srv,
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0) as client,
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="o3", **ask)
        assert fake.received == []
        routed = client.chat.completions.with_raw_response.create(model="auto", **ask)
        plain = client.chat.completions.with_raw_response.create(
            model="o3", messages=ask["messages"]
        )
    assert refused.value.param == "stop"
    assert "model 'o3' cannot take stop sequences (it takes none)" in refused.value.message
    assert (routed.headers["x-tiergate-model"], plain.headers["x-tiergate-model"]) == (
        "claude",
        "o3",
    )
    assert [r.body["model"] for r in fake.received] == ["claude-3-5-sonnet-20241022", "o3"]


def test_an_azure_deployment_takes_as_many_stop_sequences_as_openai(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """Azure OpenAI takes at most 4 stop sequences, as OpenAI does (its REST reference), and
    refuses more with a 400; an ``azure/`` model, whatever its deployment is named, was known
    for no limit, so 5 were sent to it. Pinned, it is the fit check's 400; 4 are sent."""
    fake.reset(Behaviour(strict=True))
    policy = policy_yaml(fake).replace(
        "litellm_model: openai/gpt-4o",
        "litellm_model: azure/prod-chat\n    api_key_env: OPENAI_API_KEY",
    )
    stops = ["END", "STOP", "###", "---", "==="]
    messages = [{"role": "user", "content": "HARD: count to ten"}]
    with (
        live(tmp_path, policy) as srv,
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0) as client,
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="gpt-4o", messages=messages, stop=stops)
        assert fake.received == []
        four = client.chat.completions.with_raw_response.create(
            model="gpt-4o", messages=messages, stop=stops[:4]
        )
    assert refused.value.param == "stop"
    assert "cannot take 5 stop sequences (it takes at most 4)" in refused.value.message
    assert four.headers["x-tiergate-model"] == "gpt-4o"
    (sent,) = fake.received
    assert "/openai/deployments/prod-chat/" in sent.path and sent.body["stop"] == stops[:4]


@pytest.mark.gguf
def test_an_assistant_turn_without_content_reaches_the_local_model(
    gguf_server: LiveServer,
) -> None:
    """An earlier assistant turn may have ``content: null`` (OpenAI allows it); the local chat
    template gets empty text instead of failing on None."""
    server = gguf_server
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "hello again"},
    ]
    response = server.http.post(
        "/v1/chat/completions",
        json={"model": "local", "messages": messages, "max_tokens": 4},
    )
    assert response.status_code == 200, response.text
    assert response.headers["x-tiergate-tier"] == "local"


def test_route_reads_the_configured_local_profile(tmp_path: Path, fake: FakeProvider) -> None:
    """The proxy loads the shipped model with TIERGATE_LOCAL_PROFILE's profile: POST /v1/route
    shows the profile, the entry the decision read, and a lower score than the bundled
    model's profile gives the same maths prompt."""
    from router.artifact import DEFAULT_MODEL_NAME
    from router.profile import profile_dir

    body = {"model": "auto", "messages": [{"role": "user", "content": "Solve 3x^2 - 5x + 2 = 0."}]}
    policy = (Path(__file__).resolve().parent.parent / "policies" / "default.yaml").read_text()
    seen = {}
    for name, profile in (
        ("bundled", None),
        ("llama", profile_dir() / "Llama-3.1-8B-Instruct.yaml"),
    ):
        (tmp_path / name).mkdir()
        with live(
            tmp_path / name, policy, scorer=None, local_backend="none", local_profile=profile
        ) as srv:
            seen[name] = srv.http.post("/v1/route", json=body).json()
    bundled, llama = seen["bundled"], seen["llama"]
    assert llama["model_version"] == DEFAULT_MODEL_NAME
    assert llama["signals"]["local_profile"] == "Meta-Llama-3.1-8B-Instruct"
    assert bundled["signals"]["local_profile"] == "SmolLM2-135M-Instruct.Q4_1"
    assert llama["signals"]["capability"] == "math"
    assert llama["signals"]["score"] < bundled["signals"]["score"] - 0.2
    assert llama["decision"]["profile_entry"].startswith("Meta-Llama-3.1-8B-Instruct: math")
    assert (bundled["decision"]["tier"], llama["decision"]["tier"]) == ("closed", "local")


def test_encoder_false_routes_with_the_static_router_and_the_same_profile(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """The shipped router-v8 loaded, a policy with `encoder: false`: /v1/route answers with
    router-v6's score, read with the configured (Llama) profile, and names router-v6."""
    from router.artifact import DEFAULT_MODEL_NAME, STATIC_MODEL_NAME, load_scorer
    from router.locations import shipped
    from router.profile import default_profile, profile_dir

    llama = profile_dir() / "Llama-3.1-8B-Instruct.yaml"
    prompt = "Solve 3x^2 - 5x + 2 = 0."
    body = {"model": "auto", "messages": [{"role": "user", "content": prompt}]}
    policy = (REPO / "policies" / "default.yaml").read_text()
    off = policy.replace("\nencoder: true", "\nencoder: false")
    assert off != policy
    with live(tmp_path, off, scorer=None, local_backend="none", local_profile=llama) as srv:
        assert srv.gateway.scorer.version == DEFAULT_MODEL_NAME
        assert srv.gateway.scorer.costly
        route = srv.http.post("/v1/route", json=body).json()
        ready = srv.http.get("/readyz").json()["scorer"]
        live_view = srv.http.get("/dashboard/data").json()["live"]
    static = load_scorer(shipped("models", STATIC_MODEL_NAME), default_profile(llama))
    assert route["model_version"] == STATIC_MODEL_NAME
    assert route["signals"]["local_profile"] == "Meta-Llama-3.1-8B-Instruct"
    assert route["signals"]["score"] == pytest.approx(static.analyze(prompt).score, abs=1e-6)
    # What decides is what /readyz and the dashboard name; /readyz also names what is loaded.
    assert ready == {"name": "learned", "version": STATIC_MODEL_NAME, "loaded": DEFAULT_MODEL_NAME}
    assert live_view["model_version"] == STATIC_MODEL_NAME


def test_a_stream_stopped_at_shutdown_ends_with_its_fronts_error_event() -> None:
    """The last event of a stream the server stops takes the stream's own format."""
    from router.api import stream_error
    from router.errors import ServerShuttingDownError

    exc = ServerShuttingDownError("the server is shutting down")
    assert stream_error("/v1/chat/completions", exc).startswith(b'data: {"error":{')
    messages = stream_error("/v1/messages", exc)
    assert messages.startswith(b"event: error\ndata: ") and b'"type":"error"' in messages
    responses = stream_error("/v1/responses", exc)
    assert responses.startswith(b"event: error\n") and b'"server_shutting_down"' in responses
    # Numbered after the last event the stream sent, as OpenAI numbers every event.
    assert json.loads(responses.partition(b"data: ")[2])["sequence_number"] == 0
    delta = {"type": "response.output_text.delta", "delta": "Hi", "sequence_number": 6}
    sent = b"event: response.output_text.delta\ndata: " + json.dumps(delta).encode() + b"\n\n"
    after = stream_error("/v1/responses", exc, sent)
    assert json.loads(after.partition(b"data: ")[2])["sequence_number"] == 7


# -- keep-alives (stream_keepalive_s) ---------------------------------------------------------

KEEPALIVE_FRONTS = {
    "chat": (
        "/v1/chat/completions",
        {"model": "local", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    ),
    "messages": (
        "/v1/messages",
        {
            "model": "local",
            "stream": True,
            "max_tokens": 16,
            "messages": [{"role": "user", "content": "hi"}],
        },
    ),
    "responses": ("/v1/responses", {"model": "local", "stream": True, "input": "hi"}),
}


@contextmanager
def _keeping_alive(tmp_path: Path, fake: FakeProvider, local: Any) -> Iterator[LiveServer]:
    fake.reset()
    with live(
        tmp_path, policy_yaml(fake), socket=True, local_backend_obj=local, stream_keepalive_s=0.1
    ) as srv:
        yield srv


def _lines_until_keepalives(response: Any, release: Any, count: int = 2) -> list[str]:
    """The stream's lines; ``release()`` once ``count`` keep-alives have come."""
    lines, seen = [], 0
    for line in response.iter_lines():
        lines.append(line)
        seen += line == ": keep-alive"
        if seen == count:
            release()
    return lines


@pytest.mark.parametrize("front", KEEPALIVE_FRONTS)
def test_a_stream_waiting_for_its_first_token_sends_keep_alives(
    tmp_path: Path, fake: FakeProvider, front: str
) -> None:
    """A proxy cuts a connection idle for its timeout (nginx: 60 s); a stream still queued or
    reading its prompt starts at once and sends SSE comments until its first token."""
    import httpx

    from tests.scripted_local import ScriptedLocal

    local = ScriptedLocal()
    local.mode = "hold"
    path, body = KEEPALIVE_FRONTS[front]
    with _keeping_alive(tmp_path, fake, local) as srv:
        with httpx.stream("POST", srv.url + path, json=body, timeout=30) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            rid = response.headers["x-request-id"]
            lines = _lines_until_keepalives(response, local.release.set)
        record = srv.gateway.outcomes
        assert wait_for(lambda: record.count() == 1)
        record.flush()
        row = record.recent(1)[0]
    assert lines[:4] == [": keep-alive", "", ": keep-alive", ""]
    data = [line[6:] for line in lines if line.startswith("data: ")]
    text = "".join(data)
    assert "w0" in text and "w2" in text
    assert (data[-1] == "[DONE]") == (front == "chat")
    assert (row["id"], row["status"], row["http_status"]) == (rid, "ok", 200)


@pytest.mark.parametrize("front", KEEPALIVE_FRONTS)
def test_a_stream_that_fails_after_starting_early_ends_with_its_fronts_error(
    tmp_path: Path, fake: FakeProvider, front: str
) -> None:
    """Once a stream has started its status line has gone: a failure is its last event, in
    the front's own format, and the record says error."""
    import httpx

    from tests.scripted_local import ScriptedLocal

    local = ScriptedLocal()
    local.mode = "hold"

    def fail() -> None:
        local.mode = "fail"
        local.release.set()

    path, body = KEEPALIVE_FRONTS[front]
    with _keeping_alive(tmp_path, fake, local) as srv:
        with httpx.stream("POST", srv.url + path, json=body, timeout=30) as response:
            assert response.status_code == 200
            lines = _lines_until_keepalives(response, fail)
        store = srv.gateway.outcomes
        assert wait_for(lambda: store.count() == 1)
        store.flush()
        row = store.recent(1)[0]
    events = [json.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert len(events) == 1  # the error alone: no [DONE], nothing made up
    if front == "chat":
        assert events[0]["error"]["code"] == "upstream_error"
    elif front == "messages":
        assert "event: error" in lines
        assert events[0]["type"] == "error" and events[0]["error"]["type"] == "api_error"
    else:
        assert "event: error" in lines
        assert events[0]["type"] == "error" and events[0]["code"] == "upstream_error"
        assert events[0]["sequence_number"] == 0  # the stream's first event
    assert (row["status"], row["http_status"]) == ("error", 502)
    assert row["error_type"] == "upstream_error"


def test_the_official_clients_read_a_stream_with_keep_alives(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """Keep-alives before the first token and between tokens are SSE comments, which the
    OpenAI and Anthropic SDKs skip: each front's answer and usage come through whole."""
    import anthropic

    from tests.scripted_local import ScriptedLocal

    local = ScriptedLocal()
    local.token_delay_s = 0.35  # more than two keep-alives before each token
    # The clients are closed (``with``): their pooled sockets left open were collected during
    # a later test, which then failed on the ResourceWarning.
    with (
        _keeping_alive(tmp_path, fake, local) as srv,
        openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0) as oc,
        anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0) as ac,
    ):
        chunks = list(
            oc.chat.completions.create(
                model="local",
                stream=True,
                stream_options={"include_usage": True},
                messages=[{"role": "user", "content": "hi"}],
            )
        )
        with ac.messages.stream(
            model="local", max_tokens=16, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            message = stream.get_final_message()
        with oc.responses.stream(model="local", input="hi") as events:
            response = events.get_final_response()
    chat_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chat_text == "w0 w1 w2 "
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert message.content[0].text == "w0 w1 w2 "  # type: ignore[union-attr]
    assert message.usage.input_tokens == 5
    assert response.output_text == "w0 w1 w2 "
    assert response.usage is not None and response.usage.output_tokens == 3
