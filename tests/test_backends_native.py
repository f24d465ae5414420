"""Native pass-through: a front's own request to a provider that speaks its API, over loopback."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest

from router.backends import Usage
from router.backends.native import NATIVE, NativeBackend, NativeRequest, opening_event, speaks
from router.backends.openai_http import OpenAIHTTP
from router.errors import BackendError, UpstreamBadRequestError
from router.policy import parse_policy
from tests.conftest import KEYS, policy_yaml, run
from tests.fake_provider import Behaviour, FakeProvider


@dataclass(frozen=True)
class Model:
    """The parts of a policy model the backend reads."""

    name: str
    litellm_model: str | None
    api_base: str | None
    tier: str = "closed"
    api_key_env: str | None = None
    timeout_s: float | None = None
    transport: str = "auto"
    max_output_tokens: int | None = None


@pytest.fixture
def models(fake: FakeProvider) -> Iterator[dict[str, Model]]:
    """claude and gpt-4o on the fake provider."""
    fake.reset()
    yield {
        "claude": Model("claude", "anthropic/claude-3-5-sonnet-20241022", fake.base_url[:-3]),
        "gpt-4o": Model("gpt-4o", "openai/gpt-4o", fake.base_url),
    }


MESSAGES = {
    "model": "claude",
    "max_tokens": 50,
    "messages": [{"role": "user", "content": "Hi"}],
    "metadata": {"user_id": "u-1", "team": "search"},
    "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
}
RESPONSES = {
    "model": "gpt-4o",
    "input": "Hi",
    "metadata": {"team": "search"},
    "tools": [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}],
}


def test_which_models_speak_which_front() -> None:
    claude = Model("claude", "anthropic/claude-3-5-sonnet", None)
    gpt = Model("gpt", "openai/gpt-4o", None)
    assert speaks(claude, "messages") and not speaks(claude, "responses")
    assert speaks(gpt, "responses") and not speaks(gpt, "messages")
    assert not speaks(Model("c", "anthropic/claude", None, transport="litellm"), "messages")
    assert not speaks(Model("local", None, None, tier="local"), "messages")


def test_a_policy_model_can_ask_for_the_litellm_transport(fake: FakeProvider) -> None:
    # ``transport: litellm`` (documented in router/backends/closed.py) is a policy setting: it
    # turns off the native pass-through and the direct OpenAI path for that model.
    policy = parse_policy(
        policy_yaml(fake).replace(
            "    litellm_model: anthropic/claude-3-5-sonnet-20241022\n",
            "    litellm_model: anthropic/claude-3-5-sonnet-20241022\n    transport: litellm\n",
        )
    )
    assert policy.models["claude"].transport == "litellm"
    assert not speaks(policy.models["claude"], "messages")
    assert speaks(policy.models["gpt-4o"], "responses")


async def _complete(model: Model, native: NativeRequest) -> tuple[Any, Usage]:
    http = OpenAIHTTP(timeout_s=10)
    try:
        usage = Usage()
        return await NativeBackend(http, timeout_s=10).complete(model, native, usage), usage
    finally:
        await http.aclose()


async def _stream(model: Model, native: NativeRequest) -> tuple[list[dict[str, Any]], Usage]:
    http = OpenAIHTTP(timeout_s=10)
    try:
        usage = Usage()
        chunks = [c async for c in NativeBackend(http, timeout_s=10).stream(model, native, usage)]
        return chunks, usage
    finally:
        await http.aclose()


def test_an_anthropic_request_goes_out_as_sent(
    fake: FakeProvider, models: dict[str, Model]
) -> None:
    fake.reset(Behaviour(mode="tool_call"))
    native = NativeRequest("messages", MESSAGES, {"anthropic-beta": "tools-2024"})
    result, usage = run(_complete(models["claude"], native))
    sent = fake.received[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == KEYS["ANTHROPIC_API_KEY"]
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert sent.headers["anthropic-beta"] == "tools-2024"
    assert sent.body["model"] == "claude-3-5-sonnet-20241022"
    assert sent.body["metadata"] == {"user_id": "u-1"}  # Tiergate's keys stay home
    assert sent.body["tools"] == MESSAGES["tools"] and sent.body["stream"] is False
    native_body = result.body[NATIVE]
    assert native_body["id"] == "msg_fake" and native_body["model"] == "claude"
    assert native_body["content"][1]["type"] == "tool_use"
    message = result.body["choices"][0]["message"]
    assert message["content"] == Behaviour().text
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    assert result.body["choices"][0]["finish_reason"] == "tool_calls"
    assert (usage.prompt_tokens, usage.completion_tokens) == (13, 9)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (13, 9)


def test_an_anthropic_stream_carries_each_event(
    fake: FakeProvider, models: dict[str, Model]
) -> None:
    fake.reset(Behaviour(mode="tool_call"))
    chunks, usage = run(_stream(models["claude"], NativeRequest("messages", MESSAGES)))
    assert fake.received[-1].body["stream"] is True
    kinds = [c[NATIVE]["type"] for c in chunks]
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "content_block_delta" in kinds
    assert chunks[0][NATIVE]["message"]["model"] == "claude"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text.strip() == Behaviour().text
    arguments = "".join(
        call["function"]["arguments"]
        for c in chunks
        if c["choices"]
        for call in c["choices"][0]["delta"].get("tool_calls") or ()
    )
    assert arguments == '{"city": "Paris"}'
    assert all(c["object"] == "chat.completion.chunk" and c["model"] == "claude" for c in chunks)
    assert (usage.prompt_tokens, usage.completion_tokens) == (13, 9)


def test_a_responses_request_goes_out_stateless(
    fake: FakeProvider, models: dict[str, Model]
) -> None:
    fake.reset(Behaviour(mode="tool_call"))
    result, usage = run(_complete(models["gpt-4o"], NativeRequest("responses", RESPONSES)))
    sent = fake.received[-1]
    assert sent.path == "/v1/responses"
    assert sent.headers["authorization"] == f"Bearer {KEYS['OPENAI_API_KEY']}"
    assert sent.body["model"] == "gpt-4o" and sent.body["store"] is False
    assert "metadata" not in sent.body
    assert result.body[NATIVE]["output"][1]["type"] == "function_call"
    message = result.body["choices"][0]["message"]
    assert message["content"] == Behaviour().text
    assert message["tool_calls"][0]["id"] == "call_fake_1"
    assert (usage.prompt_tokens, usage.completion_tokens) == (11, 7)


@pytest.mark.parametrize("stream", [False, True])
def test_a_response_without_max_output_tokens_is_sent_the_policys_limit(
    fake: FakeProvider, models: dict[str, Model], stream: bool
) -> None:
    """The budget holds a Response that sets no ``max_output_tokens`` at the model's policy
    ``max_output_tokens``; it went without one, and the model wrote up to its own limit."""
    capped = replace(models["gpt-4o"], max_output_tokens=2000)
    call = _stream if stream else _complete
    run(call(capped, NativeRequest("responses", RESPONSES)))
    assert fake.received[-1].body["max_output_tokens"] == 2000
    run(call(capped, NativeRequest("responses", {**RESPONSES, "max_output_tokens": 50})))
    assert fake.received[-1].body["max_output_tokens"] == 50
    run(call(models["gpt-4o"], NativeRequest("responses", RESPONSES)))
    assert "max_output_tokens" not in fake.received[-1].body


def test_a_responses_stream_carries_each_event(
    fake: FakeProvider, models: dict[str, Model]
) -> None:
    fake.reset(Behaviour(mode="tool_call"))
    chunks, usage = run(_stream(models["gpt-4o"], NativeRequest("responses", RESPONSES)))
    kinds = [c[NATIVE]["type"] for c in chunks]
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert "response.function_call_arguments.delta" in kinds
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"
    assert (usage.prompt_tokens, usage.completion_tokens) == (11, 7)


def test_an_upstream_failure_is_a_backend_error(
    fake: FakeProvider, models: dict[str, Model]
) -> None:
    fake.reset(Behaviour(mode="status", status=500))
    with pytest.raises(BackendError, match="upstream exploded"):
        run(_complete(models["claude"], NativeRequest("messages", MESSAGES)))
    with pytest.raises(BackendError, match="upstream exploded"):
        run(_stream(models["gpt-4o"], NativeRequest("responses", RESPONSES)))


@pytest.mark.parametrize(
    ("event", "opening"),
    [
        ({"type": "message_start", "message": {"id": "msg_1"}}, True),
        ({"type": "ping"}, True),
        ({"type": "content_block_start", "content_block": {"type": "text", "text": ""}}, True),
        ({"type": "response.created", "response": {"id": "resp_1"}}, True),
        ({"type": "response.output_item.added", "item": {"type": "message", "content": []}}, True),
        ({"type": "response.content_part.added", "part": {"type": "output_text"}}, True),
        # What the answer is made of, thinking included, goes on as it comes: a stream of
        # extended thinking is not held back until its text starts.
        ({"type": "content_block_start", "content_block": {"type": "thinking"}}, False),
        ({"type": "content_block_delta", "delta": {"type": "thinking_delta"}}, False),
        ({"type": "content_block_start", "content_block": {"type": "server_tool_use"}}, False),
        ({"type": "response.reasoning_summary_text.delta", "delta": "hm"}, False),
        ({"type": "response.output_item.added", "item": {"type": "function_call"}}, False),
    ],
)
def test_only_a_native_streams_opening_events_may_be_held_back(
    event: dict[str, Any], opening: bool
) -> None:
    assert opening_event({"choices": [], NATIVE: event}) is opening
    assert opening_event({"choices": []}) is False  # not a native chunk


@pytest.mark.parametrize(
    ("status", "error", "says"),
    [
        ("completed", None, None),
        ("incomplete", None, None),  # cut at max_output_tokens: an answer, finish "length"
        ("cancelled", None, "gpt-4o failed: the response is cancelled"),
        ("in_progress", None, "gpt-4o failed: the response is in_progress"),
        ("incomplete", {"code": "server_error", "message": "oops"}, "gpt-4o failed: oops"),
    ],
    ids=["completed", "incomplete", "cancelled", "in_progress", "incomplete-with-error"],
)
@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
def test_only_a_finished_response_without_an_error_is_an_answer(
    fake: FakeProvider,
    models: dict[str, Model],
    *,
    status: str,
    error: dict[str, Any] | None,
    says: str | None,
    stream: bool,
) -> None:
    """A Response that did not finish, or that carries an ``error``, is a failed call, not an
    empty answer; one cut short (``incomplete``, no error) is an answer, as a chat
    answer's ``length``. Streamed, the same goes for the Response that ends the stream
    (``response.completed``, ``response.incomplete``): it was passed on as an answer whatever
    its error."""
    mode = "ok" if status == "completed" else "unfinished_response"
    fake.reset(Behaviour(mode=mode, response_status=status, error_body=error, words_sent=2))
    native = NativeRequest("responses", RESPONSES)
    call = _stream if stream else _complete
    if says is None:
        result, _ = run(call(models["gpt-4o"], native))
        last = result[-1] if isinstance(result, list) else result.body
        assert last["choices"][0]["finish_reason"] == (
            "stop" if status == "completed" else "length"
        )
        return
    with pytest.raises(BackendError) as raised:
        run(call(models["gpt-4o"], native))
    # a stream's failure says it came in the Response that ended the stream
    said = says.replace(" failed:", " ended its stream with a failed response:") if stream else says
    assert raised.value.message == said


#: A file of the provider's, named by its id in a request.
FILE_ID = "file_011CNha8iCJcU1wXNR6q4V8w"


def _asking_about(text: str, file: dict[str, Any]) -> list[dict[str, Any]]:
    """A user turn that asks about a file: a text block (of type ``text``) and ``file``."""
    return [{"role": "user", "content": [{"type": text, "text": "Sum this file up."}, file]}]


#: Each native API's request naming FILE_ID, and its provider's stream event for a 404 about
#: it (Anthropic's ``not_found_error``; a Responses server's ``error`` with the status in
#: ``code``, as vLLM puts it).
FILE_EVENTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "messages": (
        {
            **MESSAGES,
            "messages": _asking_about("text", {"type": "container_upload", "file_id": FILE_ID}),
        },
        {
            "type": "error",
            "error": {"type": "not_found_error", "message": f"File not found: {FILE_ID}"},
        },
    ),
    "responses": (
        {
            **RESPONSES,
            "input": _asking_about("input_text", {"type": "input_file", "file_id": FILE_ID}),
        },
        {"type": "error", "code": 404, "message": f"File not found: {FILE_ID}"},
    ),
}


@pytest.mark.parametrize("api", sorted(FILE_EVENTS))
def test_a_404_event_naming_an_id_the_request_sent_is_its_400(
    fake: FakeProvider, models: dict[str, Model], api: str
) -> None:
    """A native stream's 404 event that names an id the request sent (a Files API file) is
    the request's 400, naming the field that holds it, as the same 404 answered with a status
    is: the event was read without the request, as the model's configuration (502, the chain
    went on and the model cooled for every client)."""
    request, event = FILE_EVENTS[api]
    fake.reset(Behaviour(mode="overloaded_after_open", error_body=event))
    model = models["claude" if api == "messages" else "gpt-4o"]
    with pytest.raises(BackendError) as raised:
        run(_stream(model, NativeRequest(api, request)))  # type: ignore[arg-type]
    assert type(raised.value) is UpstreamBadRequestError
    field = "messages" if api == "messages" else "input"
    assert (raised.value.status_code, raised.value.param) == (400, field)
