"""The Anthropic Messages and OpenAI Responses fronts end to end, driven by the official SDKs.

Tiergate runs over real HTTP with the real GGUF as the local tier; the closed tier is the
loopback fake speaking OpenAI's chat and Responses protocols and Anthropic's Messages protocol.
A pinned ``claude`` behind ``/v1/messages`` and a pinned ``gpt-4o`` behind ``/v1/responses``
are passed through natively; the other pairings go through the chat translation.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
from anthropic import beta_tool

from router.auth import hash_key
from router.outcomes import OutcomeRecord, SQLiteOutcomeStore
from tests.conftest import GGUF, LiveServer, live, policy_yaml, wait_for
from tests.fake_provider import ANTHROPIC_OVERLOADED, Behaviour, FakeProvider
from tests.scripted_local import ScriptedLocal
from tests.test_messages import PNG, thought, tool_returned

gguf = pytest.mark.skipif(not GGUF.is_file(), reason="bundled GGUF missing: make model")
pytestmark = [gguf, pytest.mark.gguf]

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
WEATHER_FUNCTION = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


class CapturingStore(SQLiteOutcomeStore):
    """The real SQLite store, remembering each record as submitted (``front`` included)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.seen: dict[str, list[OutcomeRecord]] = {}

    def submit(self, record: OutcomeRecord) -> None:
        """Remember, then store as usual."""
        self.seen.setdefault(record.id, []).append(record)
        super().submit(record)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> CapturingStore:
    """The outcome store of this module's Tiergate."""
    return CapturingStore(tmp_path_factory.mktemp("fronts-store") / "outcomes.db")


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, fake: FakeProvider, store: CapturingStore
) -> Iterator[LiveServer]:
    """One Tiergate with the real local model, shared by this module's tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", "sk-test-openai-key")
        mp.setenv("ANTHROPIC_API_KEY", "sk-ant-test-key")
        with live(
            tmp_path_factory.mktemp("fronts"), policy_yaml(fake), outcomes=store, gguf=True
        ) as srv:
            yield srv


@pytest.fixture
def claude_client(server: LiveServer, fake: FakeProvider) -> Iterator[anthropic.Anthropic]:
    """Anthropic's SDK, pointed at Tiergate as ``ANTHROPIC_BASE_URL`` would point it."""
    fake.reset()
    with anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture
def openai_client(server: LiveServer, fake: FakeProvider) -> Iterator[openai.OpenAI]:
    """OpenAI's SDK, for ``responses.create``."""
    fake.reset()
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0) as client:
        yield client


def recorded(store: CapturingStore, request_id: str, front: str) -> OutcomeRecord:
    """The one record of ``request_id``, checked to name ``front``."""
    assert wait_for(lambda: store.get(request_id) is not None), "no outcome record"
    (record,) = store.seen[request_id]
    assert record.front == front
    return record


# -- /v1/messages --------------------------------------------------------------------------


def test_messages_from_the_local_model(
    claude_client: anthropic.Anthropic, store: CapturingStore, fake: FakeProvider
) -> None:
    raw = claude_client.messages.with_raw_response.create(
        model="auto",
        max_tokens=12,
        system="Answer in a few words.",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        extra_body={"temperature": 0},
    )
    message = raw.parse()
    assert raw.headers["x-tiergate-tier"] == "local"
    assert message.type == "message" and message.model == "local"
    assert message.content[0].type == "text" and message.content[0].text.strip()
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.output_tokens > 0
    assert fake.received == []
    record = recorded(store, raw.headers["x-request-id"], "messages")
    assert record.tier == "local" and record.status == "ok" and not record.stream


def test_messages_stream_from_the_local_model(
    claude_client: anthropic.Anthropic, store: CapturingStore
) -> None:
    with claude_client.messages.stream(
        model="auto", max_tokens=10, messages=[{"role": "user", "content": "Say hello."}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    assert text.strip() and final.content[0].text == text  # type: ignore[union-attr]
    assert final.usage.output_tokens > 0
    record = recorded(store, request_id, "messages")
    assert record.stream and record.tier == "local" and record.completion_tokens > 0


def test_a_stop_sequence_that_ends_a_local_answer_is_named(
    claude_client: anthropic.Anthropic,
) -> None:
    # The local answer cut at a stop sequence said stop_reason "end_turn", stop_sequence None:
    # Anthropic says "stop_sequence" and which one.
    ask: dict[str, Any] = {
        "model": "local",
        "max_tokens": 30,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "stop_sequences": ["\u2603", " "],  # every answer of several words has a space
        "extra_body": {"temperature": 0},
    }
    message = claude_client.messages.create(**ask)
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", " ")
    assert " " not in message.content[0].text  # type: ignore[union-attr]
    with claude_client.messages.stream(**ask) as stream:
        delta = next(e for e in stream if e.type == "message_delta")
        final = stream.get_final_message()
    assert (delta.delta.stop_reason, delta.delta.stop_sequence) == ("stop_sequence", " ")
    assert (final.stop_reason, final.stop_sequence) == ("stop_sequence", " ")
    unmet = claude_client.messages.create(**{**ask, "stop_sequences": ["\u2603"]})
    assert unmet.stop_reason in ("end_turn", "max_tokens") and unmet.stop_sequence is None


def _input_tokens(client: anthropic.Anthropic, prompt: str) -> tuple[str, int, int]:
    """(the tier that answered, message_start's input_tokens, the final message's)."""
    with client.messages.stream(
        model="auto", max_tokens=5, messages=[{"role": "user", "content": prompt}]
    ) as stream:
        start = next(event for event in stream if event.type == "message_start")
        final = stream.get_final_message()
        tier = stream.response.headers["x-tiergate-tier"]
    assert start.type == "message_start"
    return tier, start.message.usage.input_tokens, final.usage.input_tokens


def test_a_translated_stream_gives_its_input_tokens_in_message_start(
    claude_client: anthropic.Anthropic,
) -> None:
    # message_start said input_tokens: 0; real Anthropic gives the prompt's count there. The
    # local model's count is known by its first chunk, and is the one message_delta gives.
    tier, start, final = _input_tokens(claude_client, "Say hello.")
    assert tier == "local" and start == final > 0
    # A closed model counts only at the end: message_start has Tiergate's estimate, and the
    # final message the provider's count.
    tier, start, final = _input_tokens(claude_client, "HARD: say hello.")
    assert tier == "closed" and start > 0 and final == 11


def test_a_pinned_claude_is_passed_through_natively(
    claude_client: anthropic.Anthropic, store: CapturingStore, fake: FakeProvider
) -> None:
    raw = claude_client.messages.with_raw_response.create(
        model="claude",
        max_tokens=50,
        system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "Hi"}],
        extra_body={"top_k": 5},
        metadata={"user_id": "u-7"},
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"},
    )
    message = raw.parse()
    assert raw.headers["x-tiergate-model"] == "claude"
    assert raw.headers["x-tiergate-rule"] == "pinned"
    assert message.content[0].text == Behaviour().text  # type: ignore[union-attr]
    assert message.id == "msg_fake" and message.model == "claude"
    sent = fake.received[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == "sk-ant-test-key"
    assert sent.headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert sent.body["model"] == "claude-3-5-sonnet-20241022"
    assert sent.body["system"][0]["cache_control"] == {"type": "ephemeral"}  # nothing lost
    assert sent.body["top_k"] == 5 and sent.body["metadata"] == {"user_id": "u-7"}
    record = recorded(store, raw.headers["x-request-id"], "messages")
    assert record.model == "claude" and record.status == "ok"
    assert (record.prompt_tokens, record.completion_tokens) == (13, 9)


def test_a_native_claude_stream_with_a_tool_call(
    claude_client: anthropic.Anthropic, store: CapturingStore, fake: FakeProvider
) -> None:
    fake.reset(Behaviour(mode="tool_call"))
    with claude_client.messages.stream(
        model="claude",
        max_tokens=50,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "Weather in Paris?"}],
    ) as stream:
        final = stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    tool = final.content[-1]
    assert tool.type == "tool_use" and tool.name == "get_weather"
    assert tool.input == {"city": "Paris"}
    assert final.stop_reason == "tool_use"
    assert fake.received[-1].path == "/v1/messages" and fake.received[-1].body["stream"] is True
    record = recorded(store, request_id, "messages")
    assert record.stream and (record.prompt_tokens, record.completion_tokens) == (13, 9)


def test_a_tool_call_round_trip_through_an_openai_model(
    claude_client: anthropic.Anthropic, store: CapturingStore, fake: FakeProvider
) -> None:
    fake.reset(Behaviour(mode="tool_call"))
    question = {"role": "user", "content": "HARD: what is the weather in Paris?"}
    first = claude_client.messages.with_raw_response.create(
        model="auto",
        max_tokens=50,
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "any"},
        messages=[question],  # type: ignore[list-item]
    )
    assert first.headers["x-tiergate-model"] == "gpt-4o"
    message = first.parse()
    call = next(block for block in message.content if block.type == "tool_use")
    assert call.name == "get_weather" and call.input == {"city": "Paris"}
    assert message.stop_reason == "tool_use"
    sent = fake.received[-1]
    assert sent.path == "/v1/chat/completions" and sent.body["tool_choice"] == "required"
    assert sent.body["tools"][0]["function"]["name"] == "get_weather"

    fake.reset()
    second = claude_client.messages.create(
        model="auto",
        max_tokens=50,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[
            question,  # type: ignore[list-item]
            {"role": "assistant", "content": message.content},  # type: ignore[dict-item]
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}],
            },
        ],
    )
    assert second.content[0].text == Behaviour().text  # type: ignore[union-attr]
    back = fake.received[-1].body["messages"]
    assert back[-2]["tool_calls"][0]["id"] == call.id
    assert back[-1] == {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
    recorded(store, first.headers["x-request-id"], "messages")


def test_a_translated_stream_keeps_anthropics_event_order(
    claude_client: anthropic.Anthropic, fake: FakeProvider
) -> None:
    fake.reset(Behaviour(mode="tool_call"))
    with claude_client.messages.stream(
        model="auto",
        max_tokens=50,
        tools=[WEATHER],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "HARD: weather in Paris?"}],
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert fake.received[-1].path == "/v1/chat/completions"
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "message_delta" in kinds
    assert final.content[-1].type == "tool_use"
    assert final.content[-1].input == {"city": "Paris"}  # type: ignore[union-attr]


def test_parallel_tool_calls_interleaved_by_an_openai_model_stay_apart(
    claude_client: anthropic.Anthropic, store: CapturingStore, fake: FakeProvider
) -> None:
    # Two calls whose argument pieces came alternately reached the Anthropic SDK as
    # get_weather({}) and get_time({"city": "Paris"}): Rome was lost.
    calls = [("get_weather", {"city": "Paris"}), ("get_time", {"city": "Rome"})]
    fake.reset(Behaviour(mode="tool_call", calls=calls, interleave=True))
    time_tool = {**WEATHER, "name": "get_time", "description": "The time in a city."}
    with claude_client.messages.stream(
        model="auto",
        max_tokens=50,
        tools=[WEATHER, time_tool],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "HARD: weather in Paris, time in Rome?"}],
    ) as stream:
        final = stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    assert fake.received[-1].path == "/v1/chat/completions"
    uses = [block for block in final.content if block.type == "tool_use"]
    assert [(use.id, use.name, use.input) for use in uses] == [
        ("call_fake_1", "get_weather", {"city": "Paris"}),
        ("call_fake_2", "get_time", {"city": "Rome"}),
    ]
    assert final.stop_reason == "tool_use"
    record = recorded(store, request_id, "messages")
    assert record.model == "gpt-4o" and record.status == "ok" and record.stream


def test_an_image_goes_to_a_closed_model(
    claude_client: anthropic.Anthropic, fake: FakeProvider
) -> None:
    raw = claude_client.messages.with_raw_response.create(
        model="auto",
        max_tokens=30,
        messages=[
            {
                "role": "user",
                "content": [
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                    },
                    {"type": "text", "text": "What is this?"},
                ],
            }
        ],
    )
    assert raw.headers["x-tiergate-tier"] == "closed"
    image = fake.received[-1].body["messages"][0]["content"][0]
    assert image == {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}


PDF = base64.b64encode(b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF").decode()


def _document(source: dict[str, Any]) -> list[Any]:
    """A user turn with a document of ``source`` and a question about it."""
    block = {"type": "document", "source": source, "title": "report.pdf"}
    return [{"role": "user", "content": [block, {"type": "text", "text": "Summarize it."}]}]


def test_a_pdf_document_goes_to_a_closed_model(
    claude_client: anthropic.Anthropic, fake: FakeProvider
) -> None:
    # Every document block was a 400 ("Input tag 'document' found using 'type' does not match
    # any of the expected tags"), even for a Claude, which reads PDFs.
    pdf = _document({"type": "base64", "media_type": "application/pdf", "data": PDF})
    raw = claude_client.messages.with_raw_response.create(model="auto", max_tokens=20, messages=pdf)
    assert raw.headers["x-tiergate-tier"] == "closed"  # the local model reads no PDF
    part = fake.received[-1].body["messages"][0]["content"][0]
    assert part == {
        "type": "file",
        "file": {"filename": "report.pdf", "file_data": f"data:application/pdf;base64,{PDF}"},
    }
    claude_client.messages.create(model="claude", max_tokens=20, messages=pdf)
    sent = fake.received[-1]
    assert sent.path == "/v1/messages" and sent.body["messages"] == pdf  # as it came
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude_client.messages.create(model="local", max_tokens=20, messages=pdf)
    assert refused.value.body["error"]["message"].startswith(  # type: ignore[index]
        "model 'local' cannot take documents and the request pins it"
    )
    counted = claude_client.messages.count_tokens(model="auto", messages=pdf)
    assert counted.input_tokens > 1000  # a PDF page, not the few words beside it


def test_a_plain_text_document_reaches_a_chat_model_as_text(
    claude_client: anthropic.Anthropic, fake: FakeProvider
) -> None:
    # litellm's translation dropped a text document without a word: gpt-4o answered a
    # question about a document it was never sent.
    text = _document({"type": "text", "media_type": "text/plain", "data": "Sales rose 4%."})
    blocks = _document({"type": "content", "content": [{"type": "text", "text": "Q3: flat."}]})
    for turns, says in [(text, "Sales rose 4%."), (blocks, "Q3: flat.")]:
        claude_client.messages.create(model="gpt-4o", max_tokens=20, messages=turns)
        first = fake.received[-1].body["messages"][0]["content"][0]
        assert first == {"type": "text", "text": f"report.pdf\n\n{says}"}


def test_search_results_reach_a_chat_model_as_text(
    claude_client: anthropic.Anthropic, fake: FakeProvider
) -> None:
    # A search_result block (a RAG app's retrieved passage, which Claude cites) was a 400 on
    # every model; a Claude gets it as sent, a chat model its title, source and text.
    passage = [{"type": "text", "text": "Sales rose 4%."}]
    found = dict(type="search_result", source="https://example.com/q3", title="Q3 report")
    turns: Any = [
        {"role": "user", "content": [{**found, "content": passage}, {"type": "text", "text": "?"}]}
    ]
    claude_client.messages.create(model="claude", max_tokens=20, messages=turns)
    assert fake.received[-1].body["messages"] == turns
    claude_client.messages.create(model="gpt-4o", max_tokens=20, messages=turns)
    first = fake.received[-1].body["messages"][0]["content"][0]
    assert first == {
        "type": "text",
        "text": "Q3 report\n\nhttps://example.com/q3\n\nSales rose 4%.",
    }


@pytest.mark.parametrize("model", ["gpt-4o", "claude"])
def test_a_document_of_anthropics_files_api_is_refused(
    claude_client: anthropic.Anthropic, fake: FakeProvider, model: str
) -> None:
    # A file_id names a file uploaded to Anthropic's Files API, which Tiergate does not serve
    # (nor can a file uploaded with the client's own key be read with Tiergate's): litellm's
    # translation dropped the document, and gpt-4o answered without it.
    file = _document({"type": "file", "file_id": "file_011CNha8iCJcU1wXNR6q4V8w"})
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude_client.messages.create(model=model, max_tokens=20, messages=file)
    assert refused.value.body["error"]["message"].startswith(  # type: ignore[index]
        "messages.0.content.0.source: Value error, a document of Anthropic's Files API"
    )
    assert fake.received == []


@pytest.mark.parametrize("model", ["auto", "claude"])
def test_openais_web_search_options_is_refused_on_the_messages_front(
    claude_client: anthropic.Anthropic, fake: FakeProvider, model: str
) -> None:
    # OpenAI's top-level web_search_options is no part of Anthropic's Messages API, which
    # refuses it ("Extra inputs are not permitted"). No routing check read it: a Claude was
    # sent it as it came, and on auto a model the gateway's last guard refused was chosen.
    # It is the schema's 400, naming the field; a web search is Anthropic's web_search tool.
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude_client.messages.create(
            model=model,
            max_tokens=20,
            messages=[{"role": "user", "content": "What is new in Python?"}],
            extra_body={"web_search_options": {}},
        )
    assert refused.value.body["error"]["message"].startswith(  # type: ignore[index]
        "web_search_options: Value error, not part of Anthropic's Messages API"
    )
    assert fake.received == []


def test_openais_web_search_options_is_refused_when_counting_tokens(
    claude_client: anthropic.Anthropic,
) -> None:
    # count_tokens took what the Messages request refuses (Anthropic's count_tokens takes the
    # same fields, and refuses this one as unknown): it counted a request create would refuse.
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude_client.messages.count_tokens(
            model="auto",
            messages=[{"role": "user", "content": "What is new in Python?"}],
            extra_body={"web_search_options": {}},
        )
    assert refused.value.body["error"]["message"].startswith(  # type: ignore[index]
        "web_search_options: Value error, not part of Anthropic's Messages API"
    )


def test_documents_a_tool_returned_reach_a_chat_model(
    claude_client: anthropic.Anthropic, fake: FakeProvider
) -> None:
    # A tool_result holding a document was a 400 ("Input tag 'document' found using 'type' does
    # not match any of the expected tags: 'text', 'image'"), though Anthropic takes one there.
    # A PDF reaches gpt-4o as a file part from the user, after the results (OpenAI takes a
    # file only from a user), and a text one as its text in the tool message.
    pdf = {"type": "base64", "media_type": "application/pdf", "data": PDF}
    text = {"type": "text", "media_type": "text/plain", "data": "Sales rose 4%."}
    turns: Any = [
        {"role": "user", "content": "HARD: read the two reports"},
        {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": f"toolu_{i}", "name": "get_weather", "input": {}}
                for i in (1, 2)
            ],
        },
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": f"toolu_{i}",
                    "content": [{"type": "document", "source": source, "title": "q3"}],
                }
                for i, source in ((1, pdf), (2, text))
            ],
        },
    ]
    claude_client.messages.create(model="auto", max_tokens=20, tools=[WEATHER], messages=turns)  # type: ignore[list-item]
    sent = fake.received[-1].body["messages"]
    assert [m["role"] for m in sent] == ["user", "assistant", "tool", "tool", "user"]
    assert sent[3]["content"] == "q3\n\nSales rose 4%."
    assert sent[4]["content"] == [
        {"type": "text", "text": "The images of tool result toolu_1:"},
        {
            "type": "file",
            "file": {"filename": "document.pdf", "file_data": f"data:application/pdf;base64,{PDF}"},
        },
    ]


def test_a_pdf_by_url_goes_only_to_a_claude(
    claude_client: anthropic.Anthropic, fake: FakeProvider
) -> None:
    # litellm's adapter sends a document by URL to a chat model as an image_url of the PDF,
    # which gpt-4o read as an image (OpenAI's file part takes a PDF's data or a file id, not
    # a URL) and the local model cannot read: only a Claude on Anthropic's own API takes it.
    # A PDF sent inline still goes to gpt-4o.
    url = {"type": "url", "url": "https://example.com/q3.pdf"}
    in_result = tool_returned({"type": "document", "source": url})
    for turns in (_document(url), in_result):
        raw = claude_client.messages.with_raw_response.create(
            model="auto", max_tokens=20, tools=[WEATHER], messages=turns
        )
        assert raw.headers["x-tiergate-model"] == "claude"
        sent = fake.received[-1]
        assert sent.path == "/v1/messages" and sent.body["messages"] == turns
        for model in ("gpt-4o", "local"):
            with pytest.raises(anthropic.BadRequestError) as refused:
                claude_client.messages.create(model=model, max_tokens=20, messages=turns)
            assert refused.value.body["error"]["message"].startswith(  # type: ignore[index]
                f"model '{model}' cannot take documents by URL (only a Claude on Anthropic's"
            )
    assert [r.path for r in fake.received] == ["/v1/messages", "/v1/messages"]
    inline = {"type": "base64", "media_type": "application/pdf", "data": PDF}
    raw = claude_client.messages.with_raw_response.create(
        model="gpt-4o", max_tokens=20, messages=_document(inline)
    )
    assert raw.headers["x-tiergate-model"] == "gpt-4o"
    assert fake.received[-1].body["messages"][0]["content"][0]["type"] == "file"


@pytest.mark.parametrize("where", ["message", "tool_result"])
def test_citations_are_asked_only_of_a_claude(
    claude_client: anthropic.Anthropic, fake: FakeProvider, where: str
) -> None:
    # A document with citations enabled reached gpt-4o without them (the translation drops
    # the flag), and its answer came back with no citations and no word: such a request
    # goes to a Claude on Anthropic's own API, and pinned elsewhere it is a 400.
    source = {"type": "text", "media_type": "text/plain", "data": "Sales rose 4%."}
    cited = {"type": "document", "source": source, "citations": {"enabled": True}}
    turns = (
        tool_returned(cited)
        if where == "tool_result"
        else [{"role": "user", "content": [cited, {"type": "text", "text": "How did sales do?"}]}]
    )
    raw = claude_client.messages.with_raw_response.create(
        model="auto", max_tokens=20, tools=[WEATHER], messages=turns
    )
    assert raw.headers["x-tiergate-model"] == "claude"
    assert fake.received[-1].path == "/v1/messages"
    assert fake.received[-1].body["messages"] == turns
    with pytest.raises(anthropic.BadRequestError) as refused:
        claude_client.messages.create(model="gpt-4o", max_tokens=20, messages=turns)
    assert "cannot take citations (only a Claude" in str(refused.value)
    assert len(fake.received) == 1


@pytest.mark.parametrize("model", ["auto", "gpt-4o", "claude"])
def test_a_cited_answer_in_the_history_asks_no_citations(
    claude_client: anthropic.Anthropic, fake: FakeProvider, model: str
) -> None:
    # Claude's cited answer carries its citations as a list on each text block, and a client
    # sends that turn back as it came: the check for ``citations: {enabled: true}`` read the
    # list as the flag and failed the request with a 500. The list asks for nothing: the
    # request is served as any other conversation.
    cite = {"type": "char_location", "cited_text": "Sales rose 4%.", "document_index": 0}
    cite |= {"document_title": "q3", "start_char_index": 0, "end_char_index": 14}
    said = {"type": "text", "text": "Sales rose 4%.", "citations": [cite]}
    turns: Any = [
        {"role": "user", "content": "How did sales do?"},
        {"role": "assistant", "content": [said]},
        {"role": "user", "content": "HARD: and costs?"},
    ]
    raw = claude_client.messages.with_raw_response.create(
        model=model, max_tokens=20, messages=turns
    )
    assert raw.status_code == 200
    assert raw.headers["x-tiergate-model"] == ("gpt-4o" if model == "auto" else model)


def test_a_documents_context_reaches_a_chat_model_as_text(
    claude_client: anthropic.Anthropic, fake: FakeProvider
) -> None:
    # A document's context (what the client says about it) was dropped for a chat model by
    # litellm's translation: it now leads the document as text, for a PDF and a text one.
    pdf = {"type": "base64", "media_type": "application/pdf", "data": PDF}
    text = {"type": "text", "media_type": "text/plain", "data": "Sales rose 4%."}
    about = {"title": "q3", "context": "The board's Q3 pack."}
    turns: Any = [
        {
            "role": "user",
            "content": [
                {"type": "document", "source": pdf, **about},
                {"type": "document", "source": text, **about},
                {"type": "text", "text": "Summarize them."},
            ],
        }
    ]
    claude_client.messages.create(model="gpt-4o", max_tokens=20, messages=turns)
    parts = fake.received[-1].body["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "file", "text", "text"]
    assert parts[0]["text"] == "q3\n\nThe board's Q3 pack."
    assert parts[2]["text"] == "q3\n\nThe board's Q3 pack.\n\nSales rose 4%."


def test_a_privacy_rule_keeps_a_message_local(
    claude_client: anthropic.Anthropic, fake: FakeProvider
) -> None:
    raw = claude_client.messages.with_raw_response.create(
        model="auto",
        max_tokens=8,
        messages=[{"role": "user", "content": "HARD question about my PII record"}],
    )
    assert raw.headers["x-tiergate-tier"] == "local"
    assert raw.headers["x-tiergate-rule"] == "pii-stays-local"
    assert fake.received == []


THINKING = {"type": "enabled", "budget_tokens": 1024}


@pytest.mark.parametrize("model", ["auto", "gpt-4o"], ids=["routed", "pinned"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_anthropic_only_parameters_are_dropped_for_an_openai_model(
    claude_client: anthropic.Anthropic, fake: FakeProvider, model: str, stream: bool
) -> None:
    # top_k and thinking (as reasoning_effort) went on to gpt-4o, which OpenAI refuses with a
    # 400: the client spoke Anthropic's API and cannot know which model serves it.
    fake.reset(Behaviour(strict=True))
    request: dict[str, Any] = {
        "model": model,
        "max_tokens": 2048,
        "messages": [{"role": "user", "content": "HARD: name a prime number."}],
        "thinking": THINKING,
        "extra_body": {"top_k": 5},
    }
    if stream:
        with claude_client.messages.stream(**request) as events:
            message = events.get_final_message()
    else:
        message = claude_client.messages.create(**request)
    assert message.content[0].text.strip() == Behaviour().text  # type: ignore[union-attr]
    sent = fake.received[-1]
    assert sent.path == "/v1/chat/completions" and sent.body["model"] == "gpt-4o"
    assert "top_k" not in sent.body and "reasoning_effort" not in sent.body


#: Anthropic's request fields that change how a Claude is run, not what it answers.
ANTHROPIC_RUNNING: dict[str, Any] = {
    "cache_control": {"type": "ephemeral"},
    "speed": "fast",
    "diagnostics": {"previous_message_id": "msg_1"},
}


@pytest.mark.parametrize("model", ["gpt-4o", "local", "claude"])
def test_how_a_claude_is_run_is_dropped_for_other_models(
    claude_client: anthropic.Anthropic, fake: FakeProvider, model: str
) -> None:
    # SDK 2.x takes top-level cache_control (automatic caching), speed and diagnostics: they
    # went on to gpt-4o, which OpenAI refuses with a 400 ("Unrecognized request argument"), and
    # the local model refused them with a 400 too, though the client did not choose the model.
    fake.reset(Behaviour(strict=True))
    raw = claude_client.messages.with_raw_response.create(
        model=model,
        max_tokens=5,
        messages=[{"role": "user", "content": "Say hello."}],
        **ANTHROPIC_RUNNING,
    )
    assert raw.headers["x-tiergate-model"] == model
    assert raw.parse().content[0].text.strip()  # type: ignore[union-attr]
    if model == "local":
        assert fake.received == []
        return
    sent = fake.received[-1].body
    kept = {k: sent.get(k) for k in ANTHROPIC_RUNNING}
    assert kept == (ANTHROPIC_RUNNING if model == "claude" else dict.fromkeys(ANTHROPIC_RUNNING))


def test_thinking_routed_to_the_local_model_is_answered_there(
    claude_client: anthropic.Anthropic, fake: FakeProvider
) -> None:
    # The local model cannot think: reasoning_effort from the translation is dropped for it,
    # as for an OpenAI model that does not reason, rather than refused.
    fake.reset(Behaviour(strict=True))
    raw = claude_client.messages.with_raw_response.create(
        model="auto",
        max_tokens=8,
        messages=[{"role": "user", "content": "Say hello."}],
        thinking=THINKING,  # type: ignore[arg-type]
        extra_body={"top_k": 5},
    )
    assert raw.headers["x-tiergate-tier"] == "local"
    assert "x-tiergate-fallback" not in raw.headers
    assert raw.parse().content[0].text.strip()  # type: ignore[union-attr]
    assert fake.received == []


SIGNED = {"type": "thinking", "thinking": "17 times 23 is 391.", "signature": "EqQBCkYIARgC-sig"}
THOUGHT_HISTORY: list[dict[str, Any]] = [
    {"role": "user", "content": "HARD: what is 17 times 23?"},
    {"role": "assistant", "content": [SIGNED, {"type": "text", "text": "391"}]},
    {"role": "user", "content": "HARD: and twice that?"},
]


@pytest.mark.parametrize("model", ["auto", "gpt-4o"], ids=["routed", "pinned"])
def test_a_thought_history_reaches_an_openai_model_without_claudes_thinking(
    claude_client: anthropic.Anthropic, fake: FakeProvider, model: str
) -> None:
    # A signed thinking block from an earlier Claude turn became the assistant message's
    # thinking_blocks and reasoning_content, fields OpenAI's message schema does not have:
    # a strict server refused the whole conversation. Only an Anthropic model reads them.
    fake.reset(Behaviour(strict=True))
    message = claude_client.messages.create(
        model=model,
        max_tokens=50,
        messages=THOUGHT_HISTORY,  # type: ignore[arg-type]
    )
    assert message.content[0].text == Behaviour().text  # type: ignore[union-attr]
    sent = fake.received[-1]
    assert sent.path == "/v1/chat/completions" and sent.body["model"] == "gpt-4o"
    assert sent.body["messages"][1] == {"role": "assistant", "content": "391"}


#: Where a policy's claude is served, as its lines: Anthropic's API through litellm's chat
#: path, and Bedrock's InvokeModel.
ANTHROPIC_VIA_LITELLM = (
    "    litellm_model: anthropic/claude-3-5-sonnet-20241022\n    transport: litellm\n"
)
BEDROCK_CLAUDE = "    litellm_model: bedrock/invoke/anthropic.claude-3-haiku-20240307-v1:0\n"


@pytest.mark.parametrize(
    ("served", "path"),
    [
        (ANTHROPIC_VIA_LITELLM, "/v1/messages"),
        (BEDROCK_CLAUDE, "/v1/model/anthropic.claude-3-haiku-20240307-v1:0/invoke"),
    ],
    ids=["anthropic", "bedrock"],
)
def test_a_thought_history_keeps_claudes_thinking_for_a_claude_model(
    tmp_path: Path, fake: FakeProvider, served: str, path: str
) -> None:
    # Claude through litellm's chat path gets its signed thinking block back, as Anthropic
    # requires of a turn that thought; gpt-4o, next on the chain, goes without it. So does a
    # Claude on Bedrock (litellm replays it there, as to Vertex AI): only ``anthropic/`` models
    # were given it.
    fake.reset()
    anthropic_base = f"    api_base: {fake.base_url.removesuffix('/v1')}\n"
    if served == BEDROCK_CLAUDE:
        served += f"    api_base: {fake.base_url}\n    api_key_env: ANTHROPIC_API_KEY\n"
    else:
        served += anthropic_base
    policy = policy_yaml(fake).replace(
        "    litellm_model: anthropic/claude-3-5-sonnet-20241022\n" + anthropic_base, served
    )
    body = {"max_tokens": 50, "messages": THOUGHT_HISTORY}
    with live(tmp_path, policy, local_backend_obj=ScriptedLocal()) as srv:
        answer = srv.http.post("/v1/messages", json={"model": "claude", **body})
        assert answer.status_code == 200, answer.text
        sent = fake.received[-1]
        assert sent.path == path
        assert SIGNED in sent.body["messages"][1]["content"]
        fake.reset(Behaviour(strict=True))
        answer = srv.http.post("/v1/messages", json={"model": "gpt-4o", **body})
        assert answer.status_code == 200, answer.text
        assert fake.received[-1].body["messages"][1] == {"role": "assistant", "content": "391"}


def test_max_tokens_past_a_models_own_limit_goes_to_a_model_that_can_write_it(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # max_tokens 20000 reached gpt-4o, which OpenAI refuses (litellm's map, as OpenAI, says it
    # writes at most 16384): only a policy max_output_tokens bounded a non-Claude model.
    fake.reset(Behaviour(strict=True))
    policy = policy_yaml(fake).replace(
        "claude-3-5-sonnet-20241022", "claude-sonnet-4-5-20250929"
    )  # 64000 in litellm's map
    ask: dict[str, Any] = {"max_tokens": 20000, "messages": [{"role": "user", "content": "Hi"}]}
    with (
        live(tmp_path, policy, local_backend_obj=ScriptedLocal()) as srv,
        anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0) as client,
    ):
        with pytest.raises(anthropic.BadRequestError) as refused:
            client.messages.create(model="gpt-4o", **ask)
        assert fake.received == []
        raw = client.messages.with_raw_response.create(model="auto", **ask)
    assert "model 'gpt-4o' cannot take max_tokens 20000 (it writes at most 16384)" in str(
        refused.value
    )
    assert raw.headers["x-tiergate-model"] == "claude"
    assert [(r.path, r.body["max_tokens"]) for r in fake.received] == [("/v1/messages", 20000)]


def test_more_stop_sequences_than_openai_takes_go_to_a_model_that_takes_them(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # OpenAI takes at most 4 stop sequences and refuses more with a 400; the translation sent
    # an Anthropic client's 5 to gpt-4o. Trimmed, the answer could run past one the client
    # stops on, so the request goes where all 5 are honoured, or, pinned, is a 400.
    fake.reset(Behaviour(strict=True))
    stops = ["END", "STOP", "###", "---", "==="]
    ask: dict[str, Any] = {
        "max_tokens": 20,
        "messages": [{"role": "user", "content": "HARD: count to ten"}],
        "stop_sequences": stops,
    }
    with (
        live(tmp_path, policy_yaml(fake), local_backend_obj=ScriptedLocal()) as srv,
        anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0) as client,
    ):
        with pytest.raises(anthropic.BadRequestError) as refused:
            client.messages.create(model="gpt-4o", **ask)
        assert fake.received == []
        for model in ("auto", "claude", "local"):
            raw = client.messages.with_raw_response.create(model=model, **ask)
            assert raw.headers["x-tiergate-model"] == ("claude" if model == "auto" else model)
        ask["stop_sequences"] = stops[:4]
        four = client.messages.with_raw_response.create(model="gpt-4o", **ask)
    assert "model 'gpt-4o' cannot take 5 stop sequences (it takes at most 4)" in str(refused.value)
    assert four.headers["x-tiergate-model"] == "gpt-4o"
    sent = [r.body.get("stop_sequences") or r.body.get("stop") for r in fake.received]
    assert sent == [stops, stops, stops[:4]]


def _with_o3(fake: FakeProvider) -> str:
    """The test policy with OpenAI's reasoning model o3 (on the fake) as its first closed model."""
    o3 = f"  o3:\n    tier: closed\n    litellm_model: openai/o3\n    api_base: {fake.base_url}\n"
    return (
        policy_yaml(fake)
        .replace("  gpt-4o:\n", o3 + "  gpt-4o:\n", 1)
        .replace("closed_models: [gpt-4o, claude]", "closed_models: [o3, gpt-4o, claude]")
    )


def test_a_temperature_an_openai_reasoning_model_refuses_goes_to_one_that_takes_it(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # o3 refuses temperature other than 1 with a 400, which Tiergate passed on as the request's
    # answer on the direct path, for a model the client did not choose (auto): the request
    # goes where its temperature is honoured, or, pinned, is a 400 that reaches no provider.
    fake.reset(Behaviour(strict=True))
    policy = _with_o3(fake)
    ask: dict[str, Any] = {"messages": [{"role": "user", "content": "HARD: count to ten"}]}
    with (
        live(tmp_path, policy, local_backend_obj=ScriptedLocal()) as srv,
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0) as client,
    ):
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="o3", temperature=0.2, **ask)
        assert fake.received == []
        chat = client.chat.completions.with_raw_response
        moved = chat.create(model="auto-best", temperature=0.2, **ask)
        kept = chat.create(model="auto-best", temperature=1, **ask)
    assert "model 'o3' cannot take temperature (it takes it only at its default)" in str(
        refused.value
    )
    assert refused.value.body["param"] == "temperature"  # type: ignore[index]
    assert [moved.headers["x-tiergate-model"], kept.headers["x-tiergate-model"]] == ["gpt-4o", "o3"]
    assert [(r.body["model"], r.body.get("temperature")) for r in fake.received] == [
        ("gpt-4o", 0.2),
        ("o3", None),  # at its default it asks for nothing, and goes without it
    ]


def test_sampling_fields_at_their_defaults_reach_an_openai_reasoning_model_without_them(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # A client that sends every field at its default (top_p 1, the penalties 0, logprobs
    # false) asks for nothing, so the policy lets o3 serve it; o3 refuses top_p (and litellm
    # each of them) whatever its value, and its 400 was the request's answer, on auto too.
    fake.reset(Behaviour(strict=True))
    policy = _with_o3(fake)
    defaults = {"top_p": 1.0, "presence_penalty": 0, "frequency_penalty": 0, "logprobs": False}
    ask: dict[str, Any] = {"messages": [{"role": "user", "content": "HARD: count to ten"}]}
    with (
        live(tmp_path, policy, local_backend_obj=ScriptedLocal()) as srv,
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0) as client,
    ):
        chat = client.chat.completions.with_raw_response
        answers = [chat.create(model=m, **ask, **defaults) for m in ("auto-best", "o3")]
    assert [a.headers["x-tiergate-model"] for a in answers] == ["o3", "o3"]
    assert [sorted(set(defaults) & set(r.body)) for r in fake.received] == [[], []]


def test_sampling_fields_at_their_defaults_reach_o3_over_the_responses_api_without_them(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # The same over /v1/responses, where o3 is passed the client's request natively: it was
    # sent top_p 1 as the client sent it, and its 400 was the answer.
    fake.reset(Behaviour(strict=True))
    policy = _with_o3(fake)
    defaults = {"top_p": 1.0, "temperature": 1}
    with (
        live(tmp_path, policy, local_backend_obj=ScriptedLocal()) as srv,
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0) as client,
    ):
        create = client.responses.with_raw_response.create
        ask = "HARD: count to ten"
        answers = [create(model=m, input=ask, **defaults) for m in ("auto-best", "o3")]
        streamed = create(model="o3", input=ask, stream=True, **defaults)
        events = [event.type for event in streamed.parse()]
    assert [a.headers["x-tiergate-model"] for a in [*answers, streamed]] == ["o3"] * 3
    assert events[-1] == "response.completed"
    assert [r.path for r in fake.received] == ["/v1/responses"] * 3
    assert [sorted(set(defaults) & set(r.body)) for r in fake.received] == [[], [], []]


def test_a_predicted_output_is_sent_its_limit_as_max_tokens(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # OpenAI's Predicted Outputs do not take max_completion_tokens (its guide), the field the
    # direct path sent gpt-4o a request's max_tokens, or the policy's max_output_tokens, in:
    # every such request with a prediction was refused. gpt-4o takes max_tokens.
    fake.reset(Behaviour(strict=True))
    policy = policy_yaml(fake).replace(
        "openai/gpt-4o\n", "openai/gpt-4o\n    max_output_tokens: 300\n", 1
    )
    ask: dict[str, Any] = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}]}
    prediction = {"type": "content", "content": "def f():\n    return 1\n"}
    with (
        live(tmp_path, policy, local_backend_obj=ScriptedLocal()) as srv,
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0) as client,
    ):
        for limit in ({"max_tokens": 50}, {"max_completion_tokens": 60}, {}):
            client.chat.completions.create(**ask, **limit, prediction=prediction)
        client.chat.completions.create(**ask, max_tokens=70)  # no prediction: as before
    fields = ("max_tokens", "max_completion_tokens")
    assert [{f: r.body[f] for f in fields if f in r.body} for r in fake.received] == [
        {"max_tokens": 50},
        {"max_tokens": 60},
        {"max_tokens": 300},
        {"max_completion_tokens": 70},
    ]


def test_a_self_hosted_model_named_like_openais_is_not_held_to_openais_limits(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # `openai/my-org/gpt-4o` is an operator's own model on an OpenAI-compatible server: litellm's
    # map does not know it, but the lookup by a name's last part gave it gpt-4o's 16384 output
    # tokens and 4 stop sequences, so its requests were refused or sent elsewhere.
    fake.reset()
    policy = policy_yaml(fake).replace("openai/gpt-4o", "openai/my-org/gpt-4o")
    stops = ["END", "STOP", "###", "---", "==="]
    with (
        live(tmp_path, policy, local_backend_obj=ScriptedLocal()) as srv,
        openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0) as client,
    ):
        raw = client.chat.completions.with_raw_response.create(
            model="gpt-4o",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=20000,
            stop=stops,
        )
    assert raw.headers["x-tiergate-model"] == "gpt-4o"
    assert [(r.body["model"], r.body.get("stop")) for r in fake.received] == [
        ("my-org/gpt-4o", stops)
    ]


@pytest.mark.parametrize("stream", [False, True])
def test_an_overloaded_provider_is_anthropics_529_on_the_messages_front(
    tmp_path: Path, fake: FakeProvider, stream: bool
) -> None:
    # Anthropic answers an overload with 529, which its SDK raises as OverloadedError; the
    # front answered 503, the SDK's ServiceUnavailableError. The chat front keeps its 503.
    ask = [{"role": "user", "content": "HARD: anything"}]
    retry = {"retry-after": "12"}
    fake.reset(Behaviour("status", 529, error_body=ANTHROPIC_OVERLOADED, error_headers=retry))
    with (
        live(tmp_path, policy_yaml(fake), local_backend_obj=ScriptedLocal()) as srv,
        anthropic.Anthropic(base_url=srv.url, api_key="unused", max_retries=0) as client,
    ):
        with pytest.raises(anthropic.OverloadedError) as overloaded:
            client.messages.create(model="claude", max_tokens=20, messages=ask, stream=stream)
        response = overloaded.value.response
        assert response.status_code == 529 and response.headers["retry-after"] == "12"
        assert response.json()["error"]["type"] == "overloaded_error"
        store, request_id = srv.gateway.outcomes, response.headers["x-request-id"]
        assert wait_for(lambda: store.get(request_id) is not None)
        assert (store.get(request_id) or {})["http_status"] == 529  # recorded as answered
        chat = srv.http.post(
            "/v1/chat/completions", json={"model": "gpt-4o", "messages": ask, "stream": stream}
        )
        assert chat.status_code == 503 and chat.headers["retry-after"] == "12"
        assert chat.json()["error"]["code"] == "upstream_overloaded"


MCP = [{"type": "url", "url": "https://mcp.example.com/sse", "name": "example"}]
#: Anthropic's server-side fields, each with a value a client sends.
SERVER_FIELDS: list[tuple[str, Any]] = [
    ("mcp_servers", MCP),
    ("container", "container_011CPR5CNjB747bTd36fQLFk"),
    ("context_management", {"edits": [{"type": "clear_tool_uses_20250919"}]}),
]


def _without_claude(fake: FakeProvider) -> str:
    """The test policy without its Claude: gpt-4o is its only closed model."""
    policy = policy_yaml(fake).replace("closed_models: [gpt-4o, claude]", "closed_models: [gpt-4o]")
    return policy.replace(
        f"  claude:\n    tier: closed\n    litellm_model: anthropic/claude-3-5-sonnet-20241022\n"
        f"    api_base: {fake.base_url.removesuffix('/v1')}\n",
        "",
    )


def _only_a_claude_serves(
    tmp_path: Path,
    fake: FakeProvider,
    request: dict[str, Any],
    says: str,
    pinned: tuple[str, ...] = ("gpt-4o",),
) -> list[dict[str, Any]]:
    """The bodies claude was sent for ``request`` on auto and pinned to it, each checked to
    be served by claude natively; pinned to each of ``pinned``, and on auto with no Claude in
    the policy, the request is checked to be a 400 that ``says`` why, and not sent."""
    (tmp_path / "all").mkdir(), (tmp_path / "none").mkdir()
    bodies = []
    with live(tmp_path / "all", policy_yaml(fake), local_backend_obj=ScriptedLocal()) as srv:
        for model in ("auto", "claude"):
            answer = srv.http.post("/v1/messages", json={**request, "model": model})
            assert answer.status_code == 200, answer.text
            assert answer.headers["x-tiergate-model"] == "claude"
            assert fake.received[-1].path == "/v1/messages"
            bodies.append(fake.received[-1].body)
        for model in pinned:
            refused = srv.http.post("/v1/messages", json={**request, "model": model})
            assert refused.status_code == 400, refused.text
            assert says in refused.text
    with live(tmp_path / "none", _without_claude(fake), local_backend_obj=ScriptedLocal()) as srv:
        refused = srv.http.post("/v1/messages", json={**request, "model": "auto"})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["type"] == "invalid_request_error"
        assert says in refused.text
    assert [r.path for r in fake.received] == ["/v1/messages", "/v1/messages"]
    return bodies


@pytest.mark.parametrize(("name", "value"), SERVER_FIELDS)
def test_anthropic_server_features_are_served_only_by_a_claude(
    tmp_path: Path, fake: FakeProvider, name: str, value: Any
) -> None:
    # mcp_servers, container and context_management are Anthropic's own: the translation
    # passed them to gpt-4o, which refuses unknown fields. Routed (auto), every model but
    # claude refused them along the chain and the request ended in a 503; now the fit check
    # sends it to the Claude on Anthropic's own API, natively. Pinned to gpt-4o, or with no
    # such Claude in the policy, it is a 400 naming the field, and nothing is sent.
    fake.reset(Behaviour(strict=True))
    request: dict[str, Any] = {
        "max_tokens": 20,
        "messages": [{"role": "user", "content": "HARD: what can the tool do?"}],
        name: value,
    }
    sent = _only_a_claude_serves(tmp_path, fake, request, f"cannot take {name} (only a Claude")
    assert [body[name] for body in sent] == [value, value]


@pytest.mark.parametrize(("name", "value"), SERVER_FIELDS)
def test_a_claude_through_litellm_still_serves_anthropics_server_fields(
    tmp_path: Path, fake: FakeProvider, name: str, value: Any
) -> None:
    # litellm passes these fields on to Anthropic (its AnthropicConfig), and a Claude with
    # `transport: litellm` served them; the fit check for server-tool blocks, URL PDFs and
    # citations, which the chat translation loses, refused them too, with a 400.
    fake.reset()
    policy = policy_yaml(fake).replace(
        "litellm_model: anthropic/claude-3-5-sonnet-20241022",
        "litellm_model: anthropic/claude-3-5-sonnet-20241022\n    transport: litellm",
    )
    request = {"max_tokens": 20, "messages": [{"role": "user", "content": "HARD: hi"}]}
    with live(tmp_path, policy, local_backend_obj=ScriptedLocal()) as srv:
        answers = [
            srv.http.post("/v1/messages", json={**request, name: value, "model": model})
            for model in ("claude", "auto")
        ]
    assert [(a.status_code, a.headers.get("x-tiergate-model")) for a in answers] == [
        (200, "claude"),
        (200, "claude"),
    ], answers[0].text
    assert [(r.path, r.body[name]) for r in fake.received] == [("/v1/messages", value)] * 2


@pytest.mark.parametrize("name", [name for name, _ in SERVER_FIELDS])
def test_a_null_server_field_asks_for_nothing(
    tmp_path: Path, fake: FakeProvider, name: str
) -> None:
    # Clients that serialise an unset optional field (SDKs, LangChain) send it as null. A null
    # mcp_servers, container or context_management counted as set: routed, the request went
    # only to a Claude; pinned to gpt-4o it was a 400. It asks for nothing: gpt-4o serves it,
    # and is not sent the null (OpenAI refuses a field it does not know, null or not).
    fake.reset(Behaviour(strict=True))
    request = {"max_tokens": 20, "messages": [{"role": "user", "content": "HARD: hi"}], name: None}
    with live(tmp_path, policy_yaml(fake), local_backend_obj=ScriptedLocal()) as srv:
        answers = [
            srv.http.post("/v1/messages", json={**request, "model": model})
            for model in ("gpt-4o", "auto")
        ]
    assert [(a.status_code, a.headers.get("x-tiergate-model")) for a in answers] == [
        (200, "gpt-4o"),
        (200, "gpt-4o"),
    ], answers[0].text
    sent = [(r.path, name in r.body) for r in fake.received]
    assert sent == [("/v1/chat/completions", False)] * 2


#: The second turn of a web-search conversation: Claude's search, its results and its answer
#: come back in the history (its search tool is offered again).
WEB_SEARCH_TURN: list[dict[str, Any]] = [
    {"role": "user", "content": "HARD: what is new in Python 3.14?"},
    {
        "role": "assistant",
        "content": [
            {
                "type": "server_tool_use",
                "id": "srvtoolu_01",
                "name": "web_search",
                "input": {"query": "Python 3.14 release notes"},
            },
            {
                "type": "web_search_tool_result",
                "tool_use_id": "srvtoolu_01",
                "content": [
                    {
                        "type": "web_search_result",
                        "url": "https://docs.python.org/3.14/whatsnew/3.14.html",
                        "title": "What's new in Python 3.14",
                        "encrypted_content": "EqgfCioIARgBIiQ3YTAwMjY1Mi1mZjM5",
                        "page_age": "2 days ago",
                    }
                ],
            },
            {"type": "text", "text": "Template strings and deferred annotations."},
        ],
    },
    {"role": "user", "content": "Tell me more about the first."},
]


def test_a_web_search_conversation_goes_on_only_with_a_claude(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # The schema refused the history's server_tool_use and web_search_tool_result blocks
    # (400) even for claude; the chat translation drops them, so only a Claude on Anthropic's
    # own API can serve such a turn: on auto it goes there, pinned elsewhere it is a 400
    # naming the blocks, and without a Claude in the policy, auto is that 400 too.
    fake.reset(Behaviour(strict=True))
    request: dict[str, Any] = {"max_tokens": 20, "messages": WEB_SEARCH_TURN}
    says = "server_tool_use, web_search_tool_result"
    sent = _only_a_claude_serves(tmp_path, fake, request, says, pinned=("gpt-4o", "local"))
    assert [body["messages"] for body in sent] == [WEB_SEARCH_TURN, WEB_SEARCH_TURN]


BASH = {"type": "bash_20250124", "name": "bash"}
WEB_SEARCH = {"type": "web_search_20250305", "name": "web_search"}
COMPUTER = {
    "type": "computer_20250124",
    "name": "computer",
    "display_width_px": 1024,
    "display_height_px": 768,
}
#: Anthropic's own tools that litellm's translation passes on to a Claude whole: these as sent,
#: and a bare web search, which it rebuilds as this one.
CARRIED_TOOLS: list[dict[str, Any]] = [
    BASH,
    {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool", "max_characters": 9},
    {"type": "code_execution_20250825", "name": "code_execution"},
    {"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 2},
    {"type": "memory_20250818", "name": "memory"},
    {"type": "tool_search_tool_regex_20251119", "name": "tool_search_tool_regex"},
    WEB_SEARCH,
]
#: And those it does not: a web search with settings or of another version (rebuilt as a bare
#: web_search_20250305), the computer tool (a tool with no schema, or none of its settings).
NATIVE_TOOLS: list[dict[str, Any]] = [
    {**WEB_SEARCH, "max_uses": 3, "allowed_domains": ["python.org"]},
    {"type": "web_search_20260209", "name": "web_search"},
    COMPUTER,
]


@pytest.mark.parametrize("tool", [BASH, WEB_SEARCH, COMPUTER], ids=lambda tool: tool["type"])
def test_anthropics_own_tools_are_served_only_by_a_claude(
    tmp_path: Path, fake: FakeProvider, tool: dict[str, Any]
) -> None:
    # Claude Code's bash tool reached gpt-4o as a tool of type bash_20250124, which OpenAI
    # refuses (400 "Invalid value: 'bash_20250124'"), and Anthropic's server-side web search
    # as web_search_options, which only OpenAI's search models take. The gateway refused them
    # per call, after the policy had chosen gpt-4o: on auto the request ended in that refusal
    # (a 400, or a 503 when no model of the chain took it) and never reached claude. The
    # computer tool reached gpt-4o as a function whose schema was the display's size. The
    # policy's fit check now sends them to claude; pinned elsewhere, or with no Claude in the
    # policy, the request is the policy's 400, and nothing is sent.
    fake.reset(Behaviour(strict=True))
    request: dict[str, Any] = {
        "max_tokens": 20,
        "messages": [{"role": "user", "content": "HARD: list the files"}],
        "tools": [tool],
    }
    says = f"cannot take {tool['type']} tools (only a Claude on Anthropic's own API takes them)"
    sent = _only_a_claude_serves(tmp_path, fake, request, says, pinned=("gpt-4o", "local"))
    assert [body["tools"] for body in sent] == [[tool], [tool]]


@pytest.mark.parametrize("tool", [BASH, WEB_SEARCH], ids=lambda tool: tool["type"])
def test_anthropics_own_tools_with_no_claude_are_refused_as_any_unfit_request(
    tmp_path: Path, fake: FakeProvider, tool: dict[str, Any]
) -> None:
    # With no Claude in the policy, a web search on auto was a 503 (every model of the chain
    # refused it: "no tier could serve the request"), a bash tool gpt-4o's own refusal. A
    # request the policy knows no model takes is its 400, as one asking for more than any
    # model writes is.
    fake.reset()
    ask = {"model": "auto", "messages": [{"role": "user", "content": "HARD: list the files"}]}
    with live(tmp_path, _without_claude(fake), local_backend_obj=ScriptedLocal()) as srv:
        answers = [
            srv.http.post("/v1/messages", json={**ask, "max_tokens": 20, "tools": [tool]}),
            srv.http.post("/v1/messages", json={**ask, "max_tokens": 20_000}),
        ]
    assert [(a.status_code, a.json()["error"]["type"]) for a in answers] == [
        (400, "invalid_request_error")
    ] * 2, answers[0].text
    messages = [a.json()["error"]["message"] for a in answers]
    assert messages == [
        f"model 'gpt-4o' cannot take {tool['type']} tools (only a Claude on Anthropic's own "
        "API takes them) and no closed model can either",
        "model 'gpt-4o' cannot take max_tokens 20000 (it writes at most 16384) and no closed "
        "model can either",
    ]
    assert fake.received == []


def _with_a_claude_through_litellm(fake: FakeProvider) -> str:
    """The test policy with a second Claude, ``claude-litellm`` (``transport: litellm``),
    tried before claude."""
    policy = policy_yaml(fake).replace(
        "closed_models: [gpt-4o, claude]", "closed_models: [gpt-4o, claude-litellm, claude]"
    )
    second = (
        "  claude-litellm:\n    tier: closed\n"
        "    litellm_model: anthropic/claude-3-5-sonnet-20241022\n    transport: litellm\n"
        f"    api_base: {fake.base_url.removesuffix('/v1')}\n"
    )
    return policy.replace("models:\n", "models:\n" + second, 1)


@pytest.mark.parametrize(
    "tool", CARRIED_TOOLS + NATIVE_TOOLS, ids=lambda tool: f"{tool['type']}-{len(tool)}"
)
def test_a_claude_through_litellm_takes_the_anthropic_tools_litellm_passes_on(
    tmp_path: Path, fake: FakeProvider, tool: dict[str, Any]
) -> None:
    # litellm's translation passes Anthropic's bash, text editor, code execution, web fetch,
    # memory and tool search tools on to a Claude as sent, but rebuilds a web search as a bare
    # web_search_20250305 (a pinned Claude through litellm searched past allowed_domains, with
    # no max_uses) and sends the computer tool as a client tool with no schema. On auto the
    # first go to the Claude through litellm, the rest to the Claude on Anthropic's own API;
    # pinned to the Claude through litellm, the rest are a 400.
    fake.reset()
    carried = tool in CARRIED_TOOLS
    request: dict[str, Any] = {
        "max_tokens": 20,
        "messages": [{"role": "user", "content": "HARD: list the files"}],
        "tools": [tool],
    }
    with live(
        tmp_path, _with_a_claude_through_litellm(fake), local_backend_obj=ScriptedLocal()
    ) as srv:
        routed = srv.http.post("/v1/messages", json={**request, "model": "auto"})
        pinned = srv.http.post("/v1/messages", json={**request, "model": "claude-litellm"})
    assert pinned.status_code == (200 if carried else 400), pinned.text
    if not carried:
        says = f"model 'claude-litellm' cannot take {tool['type']} tools (only a Claude on"
        assert pinned.json()["error"]["message"].startswith(says), pinned.text
    served = "claude-litellm" if carried else "claude"
    assert (routed.status_code, routed.headers.get("x-tiergate-model")) == (200, served), (
        routed.text
    )
    assert [(r.path, r.body["tools"]) for r in fake.received] == [("/v1/messages", [tool])] * (
        2 if carried else 1
    )


@pytest.mark.parametrize("model", ["gpt-4o", "claude"])
def test_the_anthropic_tool_runner_sends_the_whole_conversation_to_any_model(
    claude_client: anthropic.Anthropic, server: LiveServer, fake: FakeProvider, model: str
) -> None:
    # The Anthropic SDKs' tool runner (Python 2.17, JS 1.17) holds the conversation in a
    # message thread by default: its first turn sends `thread: {"type": "create"}`, each
    # later one only its new messages (the tool results, no tools) and `previous_message_id`.
    # Tiergate, which holds no thread, ignored `thread`: gpt-4o got a conversation of tool
    # results alone, and routing and the privacy rule read only those. Refused as Anthropic
    # refuses a request it cannot thread, the runner sends the whole conversation instead.
    fake.reset(Behaviour(mode="tool_call"))

    @beta_tool
    def get_weather(city: str) -> str:
        """The weather in a city."""
        fake.reset()  # the model answers the result in words
        return f"sunny in {city}"

    question = {"role": "user", "content": "HARD: what is the weather in Paris?"}
    runner = claude_client.beta.messages.tool_runner(
        model=model, max_tokens=50, tools=[get_weather], messages=[question]
    )
    final = runner.until_done()
    assert final.content[-1].text == Behaviour().text  # type: ignore[union-attr]
    (sent,) = fake.received
    if model == "gpt-4o":
        assert [m["role"] for m in sent.body["messages"]] == ["user", "assistant", "tool"]
        assert sent.body["tools"][0]["function"]["name"] == "get_weather"
    else:
        assert [m["role"] for m in sent.body["messages"]] == ["user", "assistant", "user"]
        assert sent.body["tools"][0]["name"] == "get_weather" and "thread" not in sent.body
    fake.reset()
    refused = httpx.post(
        server.url + "/v1/messages",
        json={
            "model": model,
            "max_tokens": 5,
            "messages": [question],
            "thread": {"type": "continue", "previous_message_id": "msg_1"},
        },
    )
    assert refused.status_code == 400 and fake.received == []
    error = refused.json()["error"]
    assert error["type"] == "invalid_request_error" and "stateless" in error["message"]
    assert error["details"] == {"error_code": "thread_unsupported_request"}


def test_a_chat_client_that_sends_top_k_still_sends_it(
    server: LiveServer, fake: FakeProvider
) -> None:
    # Only what the Anthropic translation added is dropped: a chat client's own top_k goes on.
    fake.reset()
    answer = httpx.post(
        server.url + "/v1/chat/completions",
        json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], "top_k": 5},
    )
    assert answer.status_code == 200
    assert fake.received[-1].body["top_k"] == 5


def test_a_model_litellm_does_not_know_keeps_top_k(tmp_path: Path, fake: FakeProvider) -> None:
    # An OpenAI-compatible server (vLLM) serving a model litellm's map does not know may take
    # top_k: what it can take is not known, so nothing is dropped.
    fake.reset()
    vllm = (
        "  vllm:\n    tier: closed\n    litellm_model: openai/my-org/llama-3-70b\n"
        f"    api_base: {fake.base_url}\n    api_key_env: OPENAI_API_KEY\n"
    )
    policy = policy_yaml(fake).replace("models:\n", "models:\n" + vllm, 1)
    with live(tmp_path, policy, local_backend_obj=ScriptedLocal()) as srv:
        answer = srv.http.post(
            "/v1/messages",
            json={
                "model": "vllm",
                "max_tokens": 20,
                "top_k": 5,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
    assert answer.status_code == 200, answer.text
    assert fake.received[-1].body["top_k"] == 5


#: Anthropic's optional Messages fields, as clients that serialise an unset field send them.
NULL_FIELDS = ("top_k", "temperature", "top_p", "stop_sequences", "metadata", "tool_choice")
NULL_FIELDS += ("thinking", "system")


def test_an_optional_field_sent_as_null_asks_for_nothing(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # litellm's adapter copied top_k, temperature and top_p sent as null into the chat request,
    # and a model litellm's map does not know (vLLM) was sent "top_k": null, which it may
    # refuse as a value of the wrong type. A null asks for nothing: it is left out.
    fake.reset()
    vllm = (
        "  vllm:\n    tier: closed\n    litellm_model: openai/my-org/llama-3-70b\n"
        f"    api_base: {fake.base_url}\n    api_key_env: OPENAI_API_KEY\n"
    )
    policy = policy_yaml(fake).replace("models:\n", "models:\n" + vllm, 1)
    request = {"model": "vllm", "max_tokens": 20, "messages": [{"role": "user", "content": "hi"}]}
    with live(tmp_path, policy, local_backend_obj=ScriptedLocal()) as srv:
        answer = srv.http.post("/v1/messages", json={**request, **dict.fromkeys(NULL_FIELDS)})
    assert answer.status_code == 200, answer.text
    sent = fake.received[-1].body
    assert [k for k, v in sent.items() if v is None] == []


def test_messages_errors_take_anthropics_shape(
    claude_client: anthropic.Anthropic, server: LiveServer
) -> None:
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude_client.messages.create(
            model="no-such-model", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
        )
    assert missing.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": missing.value.body["error"]["message"]},  # type: ignore[index]
    }
    bare = httpx.post(
        server.url + "/v1/messages",
        json={"model": "auto", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert bare.status_code == 400
    assert bare.json()["type"] == "error"
    assert bare.json()["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in bare.json()["error"]["message"]


def test_the_anthropic_sdk_sees_the_request_id(
    claude_client: anthropic.Anthropic, store: CapturingStore
) -> None:
    # Anthropic's SDK reads `request-id` alone: message._request_id and an error's request_id
    # were None, though Tiergate sent the id as x-request-id.
    hello = [{"role": "user", "content": "hi"}]
    message = claude_client.messages.create(model="gpt-4o", max_tokens=5, messages=hello)  # type: ignore[arg-type]
    assert message._request_id is not None and message._request_id.startswith("req_")
    recorded(store, message._request_id, "messages")
    with claude_client.messages.stream(model="gpt-4o", max_tokens=5, messages=hello) as stream:  # type: ignore[arg-type]
        stream.until_done()
        assert stream.request_id == stream.response.headers["x-request-id"]
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude_client.messages.create(model="no-such-model", max_tokens=5, messages=hello)  # type: ignore[arg-type]
    assert missing.value.request_id == missing.value.response.headers["x-request-id"]


def test_count_tokens_is_answered_locally(
    claude_client: anthropic.Anthropic, fake: FakeProvider
) -> None:
    counted = claude_client.messages.count_tokens(
        model="claude",
        system="Be brief.",
        messages=[{"role": "user", "content": "What is the weather in Paris today?"}],
        tools=[WEATHER],  # type: ignore[list-item]
    )
    assert counted.input_tokens > 10
    assert fake.received == []
    # A model /v1/messages would refuse is refused here too (it was counted, with a 200).
    with pytest.raises(anthropic.NotFoundError) as missing:
        claude_client.messages.count_tokens(
            model="no-such-model",  # type: ignore[arg-type]
            messages=[{"role": "user", "content": "hi"}],
        )
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


# -- /v1/responses -------------------------------------------------------------------------


def test_responses_from_the_local_model(
    openai_client: openai.OpenAI, store: CapturingStore, fake: FakeProvider
) -> None:
    raw = openai_client.responses.with_raw_response.create(
        model="auto",
        instructions="Answer in a few words.",
        input="What is the capital of France?",
        max_output_tokens=16,
        temperature=0,
    )
    response = raw.parse()
    assert raw.headers["x-tiergate-tier"] == "local"
    assert response.object == "response" and response.status == "completed"
    assert response.output_text.strip()
    assert response.usage is not None and response.usage.output_tokens > 0
    assert fake.received == []
    recorded(store, raw.headers["x-request-id"], "responses")


def test_responses_stream_from_the_local_model(
    openai_client: openai.OpenAI, store: CapturingStore
) -> None:
    with openai_client.responses.with_streaming_response.create(
        model="auto", input="Say hello.", max_output_tokens=16, stream=True
    ) as response:
        events = list(response.parse())
        request_id = response.headers["x-request-id"]
    kinds = [event.type for event in events]
    assert kinds[0] == "response.created"
    assert kinds[-1] in ("response.completed", "response.incomplete")  # incomplete: the cap
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text.strip()
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == text and final.usage is not None
    record = recorded(store, request_id, "responses")
    assert record.stream and record.tier == "local"
    assert record.completion_tokens == final.usage.output_tokens


def test_a_json_schema_text_format_constrains_the_local_answer(
    openai_client: openai.OpenAI,
) -> None:
    # text.format becomes chat's json_schema response_format, which the local model ignored.
    schema = {
        "type": "json_schema",
        "name": "yes_no",
        "schema": {
            "type": "object",
            "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
            "required": ["answer"],
            "additionalProperties": False,
        },
    }
    response = openai_client.responses.create(
        model="local",
        input="Is Paris in France? Tell me about it.",
        text={"format": schema},  # type: ignore[typeddict-item]
        max_output_tokens=40,
        temperature=0,
    )
    assert json.loads(response.output_text)["answer"] in ("yes", "no")


def test_a_pinned_openai_model_is_passed_through_natively(
    openai_client: openai.OpenAI, store: CapturingStore, fake: FakeProvider
) -> None:
    schema = {
        "type": "json_schema",
        "name": "weather",
        "schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
            "additionalProperties": False,
        },
        "strict": True,
    }
    raw = openai_client.responses.with_raw_response.create(
        model="gpt-4o",
        instructions="Be brief.",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Where was this taken?"},
                    {"type": "input_image", "image_url": f"data:image/png;base64,{PNG}"},
                ],
            }
        ],
        text={"format": schema},  # type: ignore[typeddict-item]
        max_output_tokens=40,
    )
    response = raw.parse()
    assert raw.headers["x-tiergate-model"] == "gpt-4o"
    assert response.output_text == Behaviour().text and response.model == "gpt-4o"
    sent = fake.received[-1]
    assert sent.path == "/v1/responses"
    assert sent.body["store"] is False and sent.body["model"] == "gpt-4o"
    assert sent.body["text"] == {"format": schema}
    assert sent.body["input"][0]["content"][1]["type"] == "input_image"  # the image went closed
    record = recorded(store, raw.headers["x-request-id"], "responses")
    assert (record.prompt_tokens, record.completion_tokens) == (11, 7)


def test_a_native_responses_stream_with_a_function_call(
    openai_client: openai.OpenAI, fake: FakeProvider
) -> None:
    fake.reset(Behaviour(mode="tool_call"))
    with openai_client.responses.stream(
        model="gpt-4o",
        input="Weather in Paris?",
        tools=[WEATHER_FUNCTION],  # type: ignore[list-item]
    ) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    call = final.output[-1]
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}
    assert fake.received[-1].body["stream"] is True


def test_a_function_call_round_trip_through_an_anthropic_model(
    openai_client: openai.OpenAI, store: CapturingStore, fake: FakeProvider
) -> None:
    fake.reset(Behaviour(mode="tool_call"))
    question: Any = {"role": "user", "content": "What is the weather in Paris?"}
    first = openai_client.responses.with_raw_response.create(
        model="claude",
        input=[question],
        tools=[WEATHER_FUNCTION],  # type: ignore[list-item]
    )
    response = first.parse()
    call = next(item for item in response.output if item.type == "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert fake.received[-1].path == "/v1/messages"  # claude does not speak Responses
    recorded(store, first.headers["x-request-id"], "responses")

    fake.reset()
    second = openai_client.responses.create(
        model="claude",
        input=[
            question,
            {
                "type": "function_call",
                "call_id": call.call_id,
                "name": call.name,
                "arguments": call.arguments,
            },
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"},
        ],
        tools=[WEATHER_FUNCTION],  # type: ignore[list-item]
    )
    assert second.output_text == Behaviour().text
    turns = fake.received[-1].body["messages"]
    result = turns[-1]["content"][0]
    assert result["type"] == "tool_result" and result["tool_use_id"] == call.call_id


#: The Agents SDK's second turn after a reasoning model called a tool: its reasoning item
#: (with ``encrypted_content`` when the client asked ``include`` for it), then the call and
#: its result.
REASONING = {
    "type": "reasoning",
    "id": "rs_1",
    "summary": [{"type": "summary_text", "text": "The weather tool answers this."}],
    "encrypted_content": "gAAAAB-opaque",
}
CALLED: list[Any] = [
    {"role": "user", "content": "What is the weather in Paris?"},
    REASONING,
    {
        "type": "function_call",
        "id": "fc_1",
        "call_id": "call_1",
        "name": "get_weather",
        "arguments": '{"city": "Paris"}',
        "status": "completed",
    },
    {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
]


def test_reasoning_items_go_back_to_an_openai_model_as_sent(
    openai_client: openai.OpenAI, fake: FakeProvider
) -> None:
    # The Agents SDK sends a reasoning model's reasoning items back on the next turn: they
    # were refused (400), which broke its loop at the first tool call. An item without
    # encrypted_content names a stored item, which the stateless call (store: false) cannot
    # find (OpenAI answers 404): it is left out.
    by_id = {"type": "reasoning", "id": "rs_0", "summary": []}
    response = openai_client.responses.create(
        model="gpt-4o",
        input=[by_id, *CALLED],
        tools=[WEATHER_FUNCTION],  # type: ignore[list-item]
        include=["reasoning.encrypted_content"],
    )
    assert response.output_text == Behaviour().text
    sent = fake.received[-1]
    assert sent.path == "/v1/responses" and sent.body["input"] == CALLED
    assert sent.body["include"] == ["reasoning.encrypted_content"]


def test_reasoning_items_are_left_out_of_a_translated_request(
    openai_client: openai.OpenAI, fake: FakeProvider
) -> None:
    # A model reached through the chat translation gets the call and its result without the
    # reasoning, which was another model's (its summary became reasoning_content).
    response = openai_client.responses.create(
        model="claude",
        input=CALLED,
        tools=[WEATHER_FUNCTION],  # type: ignore[list-item]
    )
    assert response.output_text == Behaviour().text
    turns = fake.received[-1].body["messages"]
    assert [block["type"] for block in turns[1]["content"]] == ["tool_use"]


def test_a_reasoning_item_before_an_answer_reaches_the_local_model(
    openai_client: openai.OpenAI, fake: FakeProvider
) -> None:
    raw = openai_client.responses.with_raw_response.create(
        model="local",
        input=[
            {"role": "user", "content": "What is 17 times 23?"},
            REASONING,
            {"role": "assistant", "content": "391"},
            {"role": "user", "content": "And twice that?"},
        ],
        max_output_tokens=8,
    )
    assert raw.headers["x-tiergate-model"] == "local"
    assert raw.parse().output_text.strip()
    assert fake.received == []


def test_reasoning_items_are_left_out_for_an_openai_chat_model(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # gpt-4o over litellm's chat path: a strict server refused the replayed reasoning_content.
    fake.reset(Behaviour(strict=True))
    policy = policy_yaml(fake).replace(
        "    litellm_model: openai/gpt-4o\n",
        "    litellm_model: openai/gpt-4o\n    transport: litellm\n",
    )
    with live(tmp_path, policy, local_backend_obj=ScriptedLocal()) as srv:
        answer = srv.http.post(
            "/v1/responses", json={"model": "gpt-4o", "input": CALLED, "tools": [WEATHER_FUNCTION]}
        )
    assert answer.status_code == 200, answer.text
    assistant = fake.received[-1].body["messages"][1]
    assert assistant["role"] == "assistant" and "reasoning_content" not in assistant


def test_a_privacy_rule_keeps_a_response_local(
    openai_client: openai.OpenAI, fake: FakeProvider
) -> None:
    raw = openai_client.responses.with_raw_response.create(
        model="auto", input="HARD question about my PII record", max_output_tokens=8
    )
    assert raw.headers["x-tiergate-tier"] == "local"
    assert raw.headers["x-tiergate-rule"] == "pii-stays-local"
    assert fake.received == []


@pytest.mark.parametrize(
    "state", [{"previous_response_id": "resp_1"}, {"store": True}], ids=["chained", "stored"]
)
def test_stored_responses_are_refused(openai_client: openai.OpenAI, state: dict[str, Any]) -> None:
    with pytest.raises(openai.BadRequestError, match="stateless"):
        openai_client.responses.create(model="auto", input="hi", **state)


# -- authentication ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["x-api-key", "bearer"])
def test_both_auth_headers_are_accepted(tmp_path: Path, fake: FakeProvider, how: str) -> None:
    keys = tmp_path / "keys.yaml"
    keys.write_text(f"keys:\n  - {{sha256: {hash_key('tg-fronts-secret-1')}, tenant: acme}}\n")
    with live(
        tmp_path, policy_yaml(fake), local_backend_obj=ScriptedLocal(), api_keys_file=keys
    ) as srv:
        kwargs = (
            {"api_key": "tg-fronts-secret-1"}
            if how == "x-api-key"
            else {"auth_token": "tg-fronts-secret-1"}
        )
        with anthropic.Anthropic(base_url=srv.url, max_retries=0, **kwargs) as client:
            message = client.messages.create(
                model="auto", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
            assert message.content[0].text.strip() == "w0 w1 w2"  # type: ignore[union-attr]
        with (
            anthropic.Anthropic(base_url=srv.url, max_retries=0, api_key="tg-wrong") as client,
            pytest.raises(anthropic.AuthenticationError) as denied,
        ):
            client.messages.create(
                model="auto", max_tokens=5, messages=[{"role": "user", "content": "hi"}]
            )
        assert denied.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]


# -- failures mid-stream -------------------------------------------------------------------


def test_a_messages_stream_cut_upstream_ends_in_an_error_event(
    claude_client: anthropic.Anthropic, store: CapturingStore, fake: FakeProvider
) -> None:
    fake.reset(Behaviour(mode="reset_mid_stream"))
    with (
        claude_client.messages.stream(
            model="gpt-4o", max_tokens=20, messages=[{"role": "user", "content": "HARD"}]
        ) as stream,
        pytest.raises(anthropic.APIStatusError) as failed,
    ):
        request_id = stream.response.headers["x-request-id"]
        list(stream)
    assert failed.value.body["error"]["type"] == "api_error"  # type: ignore[index]
    record = recorded(store, request_id, "messages")
    assert record.status == "error" and record.http_status == 502


@pytest.mark.parametrize("model", ["claude", "gpt-4o"], ids=["translated", "native"])
def test_a_responses_stream_cut_upstream_ends_in_an_error_event(
    openai_client: openai.OpenAI, store: CapturingStore, fake: FakeProvider, model: str
) -> None:
    """The error event is numbered after the events before it, as OpenAI numbers every event
    of a stream: without a ``sequence_number`` the JS SDK's ``responses.stream()`` rejected
    with a plain object rather than an error."""
    fake.reset(Behaviour(mode="reset_mid_stream"))
    with openai_client.responses.with_streaming_response.create(
        model=model, input="HARD", stream=True
    ) as response:
        events = list(response.parse())
        request_id = response.headers["x-request-id"]
    assert events[-1].type == "error"
    assert events[-1].code.startswith("upstream_")  # type: ignore[union-attr]
    numbers = [getattr(event, "sequence_number", None) for event in events]
    assert numbers == list(range(len(events))) and len(events) > 2
    record = recorded(store, request_id, "responses")
    assert record.status == "error" and record.http_status == 502


def test_a_tool_loop_s_thinking_counts_toward_the_context_window(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A tool loop sends the assistant turn's thinking back with the results, and Claude reads
    it as input. The window check read the conversation without it: a request pinned to a
    Claude whose window 20,000 tokens of thinking overflow was sent to it. It is refused
    before it is sent, as the same text in a plain turn is."""
    fake.reset()
    window = "    context_window: 8000\n"
    policy = policy_yaml(fake).replace(
        "claude-3-5-sonnet-20241022\n", "claude-3-5-sonnet-20241022\n" + window
    )
    tool = {"name": "get_weather", "input_schema": {"type": "object"}}
    body = {
        "model": "claude",
        "max_tokens": 100,
        "tools": [tool],
        "messages": thought("tool_result"),
    }
    with live(tmp_path, policy) as srv:
        answer = srv.http.post("/v1/messages", json=body)
    assert answer.status_code == 400, answer.text
    assert "context window 8000" in answer.json()["error"]["message"]
    assert fake.received == []
