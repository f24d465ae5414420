"""The Anthropic Messages front's translation: request to chat, chat answer and chunks back."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from router import messages
from router.api import validate_chat, validated
from router.backends.native import NATIVE
from router.errors import (
    AuthenticationError,
    BadRequestError,
    BudgetExceededError,
    ThreadUnsupportedError,
    TierUnavailableError,
    UpstreamOverloadedError,
)
from router.schemas import MessagesRequest
from router.signals import extract_signals
from tests.conftest import run
from tests.test_signals import BlindScorer

TOOL = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
PNG = (  # a 1x1 PNG
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9aw"
    "AAAABJRU5ErkJggg=="
)


def request(**fields: Any) -> dict[str, Any]:
    """A Messages request: a user turn, then whatever ``fields`` add or replace."""
    body: dict[str, Any] = {
        "model": "auto",
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
    }
    body.update(fields)
    validated(MessagesRequest, body)
    return body


def test_a_full_request_becomes_a_valid_chat_request() -> None:
    body = request(
        system=[{"type": "text", "text": "Be brief."}],
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture, and the weather?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "get_weather",
                        "input": {"city": "Paris"},
                    }
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}],
            },
        ],
        tools=[TOOL],
        tool_choice={"type": "any"},
        stop_sequences=["END"],
        metadata={"user_id": "u-1", "team": "search"},
        temperature=0.5,
        stream=True,
    )
    chat, _ = messages.to_chat(body, "req_abc")
    validate_chat(chat)
    system, user, assistant, tool = chat["messages"]
    assert system["role"] == "system" and "Be brief." in json.dumps(system["content"])
    image = user["content"][1]
    assert image["type"] == "image_url"
    assert image["image_url"]["url"] == f"data:image/png;base64,{PNG}"
    call = assistant["tool_calls"][0]
    assert call["id"] == "toolu_1" and json.loads(call["function"]["arguments"]) == {
        "city": "Paris"
    }
    assert "thinking_blocks" not in assistant  # null fields a strict provider refuses are gone
    assert tool == {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}
    assert chat["tools"][0]["function"]["name"] == "get_weather"
    assert chat["tool_choice"] == "required"
    assert chat["stop"] == ["END"]
    assert chat["max_tokens"] == 64 and chat["temperature"] == 0.5
    assert chat["metadata"] == {"user_id": "u-1", "team": "search"}  # the policy reads it
    assert chat["stream"] is True and chat["stream_options"] == {"include_usage": True}


def _tool_turns(*results: dict[str, Any]) -> list[dict[str, Any]]:
    uses = [
        {"type": "tool_use", "id": r["tool_use_id"], "name": "get_weather", "input": {}}
        for r in results
    ]
    return [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": uses},
        {"role": "user", "content": [{"type": "tool_result", **r} for r in results]},
    ]


def test_a_failed_tool_result_reads_as_an_error_to_a_chat_model() -> None:
    # litellm's adapter dropped is_error: the model read "HTTP 503" as the tool's answer.
    turns = _tool_turns(
        {
            "tool_use_id": "toolu_1",
            "content": "HTTP 503 from weather API",
            "is_error": True,
        },
        {"tool_use_id": "toolu_2", "content": "sunny"},
        {"tool_use_id": "toolu_3", "is_error": True},
        {"tool_use_id": "toolu_4", "content": "error: timed out", "is_error": True},
    )
    chat, _ = messages.to_chat(request(tools=[TOOL], messages=turns), "req_1")
    validate_chat(chat)
    tools = {m["tool_call_id"]: m["content"] for m in chat["messages"] if m["role"] == "tool"}
    assert tools == {
        "toolu_1": "Error: HTTP 503 from weather API",
        "toolu_2": "sunny",
        "toolu_3": "Error: the tool failed",
        "toolu_4": "error: timed out",  # already says so
    }


def test_a_tool_results_image_reaches_a_chat_model_from_a_user() -> None:
    # OpenAI refuses an image in a tool message (400 "Image URLs are only allowed for
    # messages with role 'user'"), where the translation put a screenshot a tool returned.
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}}
    shot = {"tool_use_id": "toolu_1", "content": [{"type": "text", "text": "page"}, image]}
    bare = {"tool_use_id": "toolu_2", "content": [image]}
    chat, _ = messages.to_chat(request(messages=_tool_turns(shot, bare)), "req_abc")
    validate_chat(chat)
    turns = chat["messages"][2:]
    assert [turn["role"] for turn in turns] == ["tool", "tool", "user"]
    assert all("image_url" not in json.dumps(turn) for turn in turns[:2])
    assert turns[0]["content"] == [{"type": "text", "text": "page"}]
    assert turns[1]["content"] == "The images of toolu_2 follow."
    url = f"data:image/png;base64,{PNG}"
    assert turns[2]["content"] == [
        {"type": "text", "text": "The images of tool result toolu_1:"},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "text", "text": "The images of tool result toolu_2:"},
        {"type": "image_url", "image_url": {"url": url}},
    ]


def test_a_system_string_leads_the_chat() -> None:
    chat, _ = messages.to_chat(request(system="You are terse."), "req_1")
    assert chat["messages"][0]["role"] == "system"
    assert "You are terse." in json.dumps(chat["messages"][0]["content"])
    assert "stream" not in chat


@pytest.mark.parametrize("kind", ["auto", "any", "tool"])
def test_disabling_parallel_tool_use_reaches_the_chat_request(kind: str) -> None:
    # The flag was dropped: an OpenAI model could answer with several tool calls at once.
    choice: dict[str, Any] = {"type": kind, "disable_parallel_tool_use": True}
    if kind == "tool":
        choice["name"] = "get_weather"
    chat, _ = messages.to_chat(request(tools=[TOOL], tool_choice=choice), "req_1")
    validate_chat(chat)
    assert chat["parallel_tool_calls"] is False
    del choice["disable_parallel_tool_use"]
    allowed, _ = messages.to_chat(request(tools=[TOOL], tool_choice=choice), "req_2")
    assert "parallel_tool_calls" not in allowed


def test_a_tool_choice_of_one_tool_must_name_it() -> None:
    # It was accepted, and the provider was asked for a function named "".
    with pytest.raises(BadRequestError, match="tool_choice") as refused:
        request(tools=[TOOL], tool_choice={"type": "tool"})
    assert "name" in refused.value.message


def test_max_tokens_is_required() -> None:
    body = request()
    del body["max_tokens"]
    with pytest.raises(BadRequestError, match="max_tokens"):
        validated(MessagesRequest, body)


@pytest.mark.parametrize(
    ("content", "param", "says"),
    [
        ([{"type": "text"}], "messages.0.content.0.text", "Field required"),
        ([{"type": "text", "text": 5}], "messages.0.content.0.text", "valid string"),
        ([{"type": "video", "source": {}}], "messages.0.content.0", "'video'"),
        (
            [{"type": "document", "source": {"type": "text"}}],
            "messages.0.content.0.source",
            "needs its data",
        ),
    ],
)
def test_an_invalid_block_is_named_where_it_is(content: Any, param: str, says: str) -> None:
    # Every invalid list of blocks was "messages.0.content.str: Input should be a valid
    # string": the error of the string form the content could also have taken.
    body = request()
    body["messages"] = [{"role": "user", "content": content}]
    with pytest.raises(BadRequestError) as refused:
        validated(MessagesRequest, body)
    assert refused.value.param == param
    assert refused.value.message.startswith(f"{param}: ") and says in refused.value.message


CHAT_ANSWER = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "gpt-4o",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    ],
    "usage": {"prompt_tokens": 20, "completion_tokens": 5, "total_tokens": 25},
}


def test_a_chat_answer_becomes_a_message() -> None:
    _, translation = messages.to_chat(request(tools=[TOOL]), "req_abc")
    out = messages.answer(CHAT_ANSWER, translation)
    assert out["type"] == "message" and out["role"] == "assistant"
    assert out["id"] == "msg_abc" and out["model"] == "gpt-4o"
    assert out["content"] == [
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
    ]
    assert out["stop_reason"] == "tool_use"
    assert out["usage"]["input_tokens"] == 20 and out["usage"]["output_tokens"] == 5
    json.dumps(out)  # plain JSON


def test_a_stop_sequence_the_backend_names_is_reported_as_anthropic_does() -> None:
    # A choice's stop_reason (vLLM's field, which the local model sets) names the sequence.
    _, translation = messages.to_chat(request(stop_sequences=["END", "STOP"]), "req_abc")
    stopped = {"index": 0, "message": {"role": "assistant", "content": "Hi"}}
    chat = {**CHAT_ANSWER, "choices": [{**stopped, "finish_reason": "stop", "stop_reason": "STOP"}]}
    out = messages.answer(chat, translation)
    assert (out["stop_reason"], out["stop_sequence"]) == ("stop_sequence", "STOP")
    ended = messages.answer(
        {**chat, "choices": [{**stopped, "finish_reason": "stop"}]}, translation
    )
    assert (ended["stop_reason"], ended["stop_sequence"]) == ("end_turn", None)
    source = Source(
        [
            chunk({"role": "assistant", "content": "Hi"}),
            {
                **chunk({}, "stop"),
                "choices": [
                    {"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "STOP"}
                ],
            },
            {**chunk({}), "choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 1}},
        ]
    )
    events = run(collect(messages.events(source, translation)))
    (delta,) = [e for e in events if e["type"] == "message_delta"]
    assert delta["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "STOP"}


def test_a_native_answer_is_sent_as_it_came() -> None:
    native = {"id": "msg_upstream", "type": "message", "content": [], "extra": {"kept": True}}
    _, translation = messages.to_chat(request(), "req_1")
    assert messages.answer({**CHAT_ANSWER, NATIVE: native}, translation) is native


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    """A chat completion chunk."""
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "local",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


TOOL_STREAM = [
    chunk({"role": "assistant", "content": ""}),
    chunk({"content": "Let me "}),
    chunk({"content": "check."}),
    chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ""},
                }
            ]
        }
    ),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city": '}}]}),
    chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}),
    chunk({}, "tool_calls"),
    {**chunk({}), "choices": [], "usage": {"prompt_tokens": 20, "completion_tokens": 5}},
]


class Source:
    """A chunk stream that records whether it was closed."""

    def __init__(self, chunks: list[dict[str, Any]]) -> None:
        self.chunks = list(chunks)
        self.closed = False

    def __aiter__(self) -> Source:
        return self

    async def __anext__(self) -> dict[str, Any]:
        if not self.chunks:
            raise StopAsyncIteration
        return self.chunks.pop(0)

    async def aclose(self) -> None:
        self.closed = True


async def collect(events: AsyncIterator[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every event of a stream."""
    return [event async for event in events]


def test_a_chunk_stream_becomes_anthropics_event_sequence() -> None:
    _, translation = messages.to_chat(request(tools=[TOOL], stream=True), "req_abc")
    source = Source(TOOL_STREAM)
    events = run(collect(messages.events(source, translation)))
    assert [e["type"] for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert events[0]["message"]["id"] == "msg_abc" and events[0]["message"]["model"] == "local"
    text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    assert text == "Let me check."
    assert events[5]["content_block"]["type"] == "tool_use"
    assert events[5]["content_block"]["name"] == "get_weather"
    partial = "".join(
        e["delta"]["partial_json"]
        for e in events
        if e.get("delta", {}).get("type") == "input_json_delta"
    )
    assert json.loads(partial) == {"city": "Paris"}
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    assert events[-2]["usage"]["output_tokens"] == 5
    assert source.closed


def opened(index: int, call_id: str, name: str, arguments: str) -> dict[str, Any]:
    """A chunk that opens tool call ``index``."""
    function = {"name": name, "arguments": arguments}
    call = {"index": index, "id": call_id, "type": "function", "function": function}
    return chunk({"tool_calls": [call]})


def more(index: int, arguments: str) -> dict[str, Any]:
    """A chunk that continues tool call ``index``'s arguments."""
    return chunk({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})


@pytest.mark.parametrize("finish", ["apart", "with the last piece", "none"])
def test_interleaved_parallel_tool_calls_keep_their_own_arguments(finish: str) -> None:
    # A chat stream may send two calls' argument pieces alternately, by index. litellm's
    # adapter wrote the first call's second piece into the second call's block: the client got
    # get_weather({}) and get_time({"city": "Paris"}), and Rome was lost.
    _, translation = messages.to_chat(request(tools=[TOOL], stream=True), "req_abc")
    last = more(1, '"Rome"}')
    if finish == "with the last piece":
        last["choices"][0]["finish_reason"] = "tool_calls"
    stream = [
        chunk({"role": "assistant", "content": ""}),
        opened(0, "call_1", "get_weather", '{"city": '),
        opened(1, "call_2", "get_time", '{"city": '),
        more(0, '"Paris"}'),
        last,
        *([chunk({}, "tool_calls")] if finish == "apart" else []),
    ]
    events = run(collect(messages.events(Source(stream), translation)))
    blocks: dict[int, dict[str, Any]] = {}
    for event in events:
        if event["type"] == "content_block_start":
            blocks[event["index"]] = {**event["content_block"], "json": ""}
        elif event.get("delta", {}).get("type") == "input_json_delta":
            blocks[event["index"]]["json"] += event["delta"]["partial_json"]
    calls = [
        (block["id"], block["name"], json.loads(block["json"]))
        for block in blocks.values()
        if block["type"] == "tool_use"
    ]
    assert calls == [
        ("call_1", "get_weather", {"city": "Paris"}),
        ("call_2", "get_time", {"city": "Rome"}),
    ]
    if finish != "none":
        assert events[-2]["delta"]["stop_reason"] == "tool_use"


def test_message_start_carries_the_prompt_tokens_known_before_the_answer() -> None:
    # Anthropic gives input_tokens in message_start; the translation gave 0 there.
    _, translation = messages.to_chat(request(tools=[TOOL], stream=True), "req_abc")
    events = run(collect(messages.events(Source(TOOL_STREAM), translation, 42)))
    assert events[0]["type"] == "message_start"
    assert events[0]["message"]["usage"]["input_tokens"] == 42


def test_native_events_pass_through_unchanged() -> None:
    native = [{"type": "message_start", "message": {"id": "m"}}, {"type": "message_stop"}]
    source = Source([{**chunk({}), NATIVE: event} for event in native])
    _, translation = messages.to_chat(request(stream=True), "req_1")
    assert run(collect(messages.events(source, translation))) == native
    assert source.closed


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (BadRequestError("bad"), "invalid_request_error"),
        (AuthenticationError("who?"), "authentication_error"),
        (BudgetExceededError("spent"), "rate_limit_error"),
        (TierUnavailableError("none"), "api_error"),
        (UpstreamOverloadedError("claude answered 529: Overloaded"), "overloaded_error"),
    ],
)
def test_errors_take_anthropics_shape(error: Any, kind: str) -> None:
    assert messages.error_event(error) == {
        "type": "error",
        "error": {"type": kind, "message": error.message},
    }


@pytest.mark.parametrize(
    "thread", [{"type": "create"}, {"type": "continue", "previous_message_id": "msg_1"}]
)
def test_a_thread_is_refused_with_anthropics_code_for_it(thread: dict[str, Any]) -> None:
    # Anthropic's SDKs read `error.details.error_code`: on this one their tool runner sends
    # the whole conversation again without `thread` (tests/test_fronts.py runs it).
    with pytest.raises(ThreadUnsupportedError, match="stateless") as refused:
        messages.to_chat(request(thread=thread), "req_1")
    assert refused.value.status_code == 400 and refused.value.param == "thread"
    assert messages.error_event(refused.value)["error"] == {
        "type": "invalid_request_error",
        "message": messages.STATELESS,
        "details": {"error_code": "thread_unsupported_request"},
    }


def test_count_tokens_is_the_routing_estimate_and_grows_with_the_prompt() -> None:
    short = messages.count_tokens({"model": "auto", "messages": request()["messages"]})
    long = messages.count_tokens(
        {"model": "auto", "messages": [{"role": "user", "content": "word " * 400}]}
    )
    with_tools = messages.count_tokens(
        {"model": "auto", "messages": request()["messages"], "tools": [TOOL]}
    )
    assert 0 < short["input_tokens"] < with_tools["input_tokens"] < long["input_tokens"]


#: Text of about 10,000 tokens (3.5 characters a token).
PAGE = "The quick brown fox jumps over the lazy dog. " * 780


def thought(then: str) -> list[dict[str, Any]]:
    """A conversation whose assistant turn thought (``PAGE`` twice over: a thinking and a
    redacted_thinking block) and called a tool; ``then`` the tool's result comes back
    (``tool_result``), or the client asks a new question (``text``)."""
    thinking = [
        {"type": "thinking", "thinking": PAGE, "signature": "c2ln"},
        {"type": "redacted_thinking", "data": PAGE},
    ]
    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}
    turns: list[dict[str, Any]] = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": [*thinking, call]},
        {"role": "user", "content": [result]},
    ]
    if then == "text":
        turns += [{"role": "assistant", "content": "Sunny."}, {"role": "user", "content": "Ok?"}]
    return turns


@pytest.mark.parametrize(("then", "counted"), [("tool_result", True), ("text", False)])
def test_the_thinking_a_tool_loop_sends_back_counts(then: str, counted: bool) -> None:
    # A tool loop sends the assistant turn's thinking back with the results, and Claude
    # reads and bills it as input; the estimate read only the content and the tool calls, so
    # 20,000 tokens of thinking counted nothing toward holds, context fit and count_tokens. An
    # earlier turn's thinking Claude strips: it does not count.
    def count(turns: list[dict[str, Any]]) -> int:
        body = {"model": "auto", "messages": turns, "tools": [TOOL]}
        return int(messages.count_tokens(body)["input_tokens"])

    turns = thought(then)
    thinking = count(turns) - count(
        [turns[0], {**turns[1], "content": turns[1]["content"][2:]}, *turns[2:]]
    )
    assert (thinking >= 2 * 10_000) is counted, thinking
    assert thinking == 0 or counted


def test_a_large_tool_schema_counts_in_full() -> None:
    # Providers bill tool definitions as input: a 200 KB schema beside a tiny message is
    # held and fitted to a context window as the 50,000 tokens or more it is.
    schema = {
        "type": "object",
        "properties": {f"f{i}": {"description": "x" * 190} for i in range(1000)},
    }
    tool = {**TOOL, "input_schema": schema}
    ask = [{"role": "user", "content": "hi"}]
    assert (
        messages.count_tokens({"model": "auto", "messages": ask, "tools": [tool]})["input_tokens"]
        >= 200_000 / 3.5 * 0.95
    )


def _ran(use: str, name: str, result: str, content: Any) -> list[dict[str, Any]]:
    """A server tool's call (block type ``use``) and its result (``result``), as a Claude's
    turn carries them back."""
    ran = {"type": use, "id": f"srvtoolu_{name}", "name": name, "input": {"query": "figures"}}
    return [ran, {"type": result, "tool_use_id": ran["id"], "content": content}]


#: A conversation in which Claude ran its server tools (web search, code execution, an MCP
#: server's tool): their calls and results come back in the history.
SERVER_TOOL_TURNS: list[dict[str, Any]] = [
    {"role": "user", "content": "Find the report and chart its figures."},
    {
        "role": "assistant",
        "content": [
            *_ran(
                "server_tool_use",
                "web_search",
                "web_search_tool_result",
                [
                    {
                        "type": "web_search_result",
                        "url": "https://a.example",
                        "encrypted_content": PAGE,
                    }
                ],
            ),
            *_ran(
                "server_tool_use",
                "code_execution",
                "code_execution_tool_result",
                {"type": "code_execution_result", "stdout": PAGE, "stderr": "", "return_code": 0},
            ),
            *_ran("mcp_tool_use", "lookup", "mcp_tool_result", [{"type": "text", "text": PAGE}]),
            {"type": "text", "text": "Here is the chart."},
        ],
    },
    {"role": "user", "content": "Thanks."},
]


def test_count_tokens_counts_the_server_tool_blocks_a_claude_is_sent() -> None:
    # The count read the chat translation, which drops the blocks (only a Claude, sent the
    # history as it came, takes them): 30,000 tokens of results counted as 17.
    turns = SERVER_TOOL_TURNS
    without = [turns[0], {"role": "assistant", "content": "Here is the chart."}, turns[2]]
    counted = messages.count_tokens({"model": "auto", "messages": turns})["input_tokens"]
    plain = messages.count_tokens({"model": "auto", "messages": without})["input_tokens"]
    assert counted - plain >= 3 * 10_000


def tool_returned(block: dict[str, Any]) -> list[Any]:
    """A conversation whose tool returned ``block``."""
    call = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [block]}
    return [
        {"role": "user", "content": "Read the report"},
        {"role": "assistant", "content": [call]},
        {"role": "user", "content": [result]},
    ]


def _pdf(source: dict[str, Any], *, in_result: bool) -> list[dict[str, Any]]:
    """A user turn that holds a PDF document, or a tool's result that does."""
    document = {"type": "document", "source": source}
    if in_result:
        return tool_returned(document)
    return [{"role": "user", "content": [document, {"type": "text", "text": "Summarise."}]}]


@pytest.mark.parametrize("in_result", [False, True])
def test_a_pdf_by_url_counts_as_a_pdf_sent_inline_does(in_result: bool) -> None:
    # The chat translation makes a PDF by URL an image part (a Claude, the one model it goes
    # to, is sent the PDF), so it counted as an image, 3,000 tokens under the same PDF inline.
    inline = {"type": "base64", "media_type": "application/pdf", "data": "JVBERi0xLjQK"}
    by_url = {"type": "url", "url": "https://example.com/report.pdf"}
    counts = [
        messages.count_tokens({"model": "auto", "messages": _pdf(source, in_result=in_result)})
        for source in (inline, by_url)
    ]
    assert abs(counts[0]["input_tokens"] - counts[1]["input_tokens"]) < 20


OUTPUT_FORMAT = {
    "type": "json_schema",
    "schema": {
        "type": "object",
        "properties": {
            f"field_{i}": {"type": "string", "description": "x" * 40} for i in range(60)
        },
    },
}


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"tools": [TOOL], "system": "Be brief."},
        {"output_format": OUTPUT_FORMAT},  # the chat request's response_format
        {"messages": SERVER_TOOL_TURNS},
        {"messages": _pdf({"type": "url", "url": "https://example.com/a.pdf"}, in_result=True)},
    ],
)
def test_count_tokens_is_what_routing_counts(fields: dict[str, Any]) -> None:
    # count_tokens read the messages and tools alone: a structured output's schema (about
    # 800 tokens), which routing holds and fits a context window for, was not counted.
    body = request(**fields)
    chat, _ = messages.to_chat(body, "req_1")
    routed = extract_signals(chat, BlindScorer(), sent=body).prompt_tokens
    counted = messages.count_tokens({k: v for k, v in body.items() if k != "max_tokens"})
    assert counted == {"input_tokens": routed}
