"""The OpenAI Responses front's translation: request to chat, chat answer and chunks back."""

from __future__ import annotations

import json
from typing import Any

import pytest

from router import responses
from router.api import validate_chat, validated
from router.backends.native import NATIVE
from router.errors import BadRequestError
from router.schemas import ResponsesRequest
from tests.conftest import run
from tests.test_messages import CHAT_ANSWER, PNG, TOOL_STREAM, Source, collect

TOOL = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
SCHEMA = {
    "type": "json_schema",
    "name": "answer",
    "schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    "strict": True,
}


def request(**fields: Any) -> dict[str, Any]:
    """A Responses request with a string input, then whatever ``fields`` add or replace."""
    body: dict[str, Any] = {"model": "auto", "input": "What is the weather in Paris?"}
    body.update(fields)
    validated(ResponsesRequest, body)
    return body


def test_a_string_input_with_instructions_becomes_a_chat_request() -> None:
    chat, _ = responses.to_chat(request(instructions="Be brief.", max_output_tokens=40), "req_1")
    validate_chat(chat)
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]
    assert chat["max_tokens"] == 40 and "stream" not in chat


def test_items_tools_and_a_json_schema_become_a_chat_request() -> None:
    body = request(
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Weather where this was taken?"},
                    {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}"},
                ],
            },
            {
                "type": "function_call",
                "call_id": "call_1",
                "name": "get_weather",
                "arguments": '{"city": "Paris"}',
            },
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        ],
        tools=[TOOL],
        text={"format": SCHEMA},
        metadata={"team": "search"},
        stream=True,
    )
    chat, _ = responses.to_chat(body, "req_1")
    validate_chat(chat)
    user, assistant, tool = chat["messages"]
    assert user["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")
    assert assistant["tool_calls"][0]["function"]["name"] == "get_weather"
    assert tool["role"] == "tool" and tool["tool_call_id"] == "call_1"
    assert tool["content"] == "sunny"
    assert chat["tools"][0]["function"]["name"] == "get_weather"
    assert chat["response_format"]["type"] == "json_schema"
    assert chat["response_format"]["json_schema"]["schema"] == SCHEMA["schema"]
    assert chat["metadata"] == {"team": "search"}
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}


def test_a_function_call_output_of_text_and_image_parts_is_taken() -> None:
    # OpenAI's output may be a list of input_text/input_image parts (the Agents SDK sends one
    # for a tool that returns an image); Tiergate refused it with a 400, "input.2.output:
    # Input should be a valid string", even for an OpenAI model that would have taken it.
    image = {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}"}
    body = request(
        input=[
            {"role": "user", "content": "What does the page show?"},
            {"type": "function_call", "call_id": "call_1", "name": "shot", "arguments": "{}"},
            {
                "type": "function_call_output",
                "call_id": "call_1",
                "output": [{"type": "input_text", "text": "the page"}, image],
            },
        ],
        tools=[{**TOOL, "name": "shot"}],
    )
    chat, _ = responses.to_chat(body, "req_1")
    validate_chat(chat)
    tool = chat["messages"][2]
    assert tool["role"] == "tool" and tool["tool_call_id"] == "call_1"
    text, picture = tool["content"]
    assert text == {"type": "text", "text": "the page"}
    assert picture["image_url"]["url"] == image["image_url"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"conversation": {"id": "conv_1"}}, "conversation"),
    ],
)
def test_stored_state_is_refused_with_a_clear_400(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequestError, match="stateless") as caught:
        responses.to_chat(request(**fields), "req_1")
    assert caught.value.param == param


@pytest.mark.parametrize(
    ("item", "param", "says"),
    [
        ({"type": "web_search_call", "id": "ws_1"}, "input.1", "'function_call_output'"),
        ({"type": "reasoning", "summary": "short"}, "input.1.summary", "valid list"),
        (
            {"type": "function_call_output", "call_id": "call_1", "output": [{"type": "x"}]},
            "input.1.output.0",
            "'input_image'",
        ),
        ({"type": "function_call", "call_id": "call_1", "name": "f"}, "input.1.arguments", ""),
    ],
)
def test_an_invalid_input_item_is_named_by_its_own_fields(
    item: dict[str, Any], param: str, says: str
) -> None:
    # Each item was checked against every item type, and the error told was the message
    # type's: "input.1.type: Input should be 'message'" for an item of a type Tiergate does
    # not take or a function_call_output whose output was not a string.
    body = {"model": "auto", "input": [{"role": "user", "content": "Hi"}, item]}
    with pytest.raises(BadRequestError) as refused:
        validated(ResponsesRequest, body)
    assert refused.value.param == param and says in refused.value.message


def test_store_false_is_served() -> None:
    chat, _ = responses.to_chat(request(store=False), "req_1")
    assert "store" not in chat


def test_a_chat_answer_becomes_a_response() -> None:
    _, translation = responses.to_chat(request(tools=[TOOL]), "req_abc")
    out = responses.answer(CHAT_ANSWER, translation)
    assert out["object"] == "response" and out["id"] == "resp_abc"
    assert out["status"] == "completed" and out["model"] == "gpt-4o"
    message, call = out["output"]
    assert message["content"][0]["text"] == "Let me check."
    assert call["type"] == "function_call" and call["name"] == "get_weather"
    assert json.loads(call["arguments"]) == {"city": "Paris"}
    assert out["usage"]["input_tokens"] == 20 and out["usage"]["output_tokens"] == 5
    json.dumps(out)


def test_a_responses_usage_has_the_token_details_openai_always_sends() -> None:
    # A chat answer without token details (the local model's) gave a usage without them, and
    # clients reading usage.input_tokens_details.cached_tokens (the Agents SDK) met None.
    _, translation = responses.to_chat(request(), "req_abc")
    usages = [responses.answer(CHAT_ANSWER, translation)["usage"]]
    _, translation = responses.to_chat(request(tools=[TOOL], stream=True), "req_abc")
    events = run(collect(responses.events(Source(TOOL_STREAM), translation)))
    usages.append(events[-1]["response"]["usage"])
    for usage in usages:
        assert usage["input_tokens_details"]["cached_tokens"] == 0
        assert usage["output_tokens_details"]["reasoning_tokens"] == 0


def test_a_native_answer_is_sent_as_it_came() -> None:
    native = {"id": "resp_upstream", "object": "response", "output": []}
    _, translation = responses.to_chat(request(), "req_1")
    assert responses.answer({**CHAT_ANSWER, NATIVE: native}, translation) is native


def test_a_chunk_stream_becomes_responses_events() -> None:
    _, translation = responses.to_chat(request(tools=[TOOL], stream=True), "req_abc")
    source = Source(TOOL_STREAM)
    events = run(collect(responses.events(source, translation)))
    kinds = [e["type"] for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == "Let me check."
    arguments = "".join(
        e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta"
    )
    assert json.loads(arguments) == {"city": "Paris"}
    done = events[-1]["response"]
    assert done["id"] == "resp_abc" and done["status"] == "completed"
    assert done["usage"]["input_tokens"] == 20 and done["usage"]["output_tokens"] == 5
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert source.closed


def test_errors_mid_stream_are_a_responses_error_event() -> None:
    event = responses.error_event(BadRequestError("no", param="input"), None)
    assert event == {
        "type": "error",
        "code": "invalid_request",
        "message": "no",
        "param": "input",
        "sequence_number": 0,
    }
    after = {"type": "response.output_text.delta", "sequence_number": 4}
    assert responses.error_event(BadRequestError("no"), after)["sequence_number"] == 5


def test_a_previous_responses_output_items_can_be_sent_back() -> None:
    """An agent loop sends the whole conversation: earlier output items come back as input,
    with their ids, statuses and annotations."""
    _, translation = responses.to_chat(request(tools=[TOOL]), "req_abc")
    previous = responses.answer(CHAT_ANSWER, translation)["output"]
    body = request(
        input=[
            {"type": "message", "role": "user", "content": "Weather in Paris?"},
            *previous,
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        ],
        tools=[TOOL],
    )
    chat, _ = responses.to_chat(body, "req_def")
    validate_chat(chat)
    roles = [m["role"] for m in chat["messages"]]
    assert roles[0] == "user" and roles[-1] == "tool"
    assert any(m.get("tool_calls") for m in chat["messages"])
    assert "Let me check." in json.dumps(chat["messages"])
