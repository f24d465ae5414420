"""Signals read from a chat request: the ``pii`` signal covers every string the request would
send upstream, while the routing score still reads the last user turn."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from router.scoring import Analysis
from router.signals import (
    FILE_TOKENS,
    IMAGE_TOKENS,
    cache_lifetime,
    estimate_tokens,
    extract_signals,
    request_pii_kinds,
    request_strings,
    text_tokens,
)

SSN = "123-45-6789"


class BlindScorer:
    """Scores 0.9 and never reports personal data: the signal must come from the body scan."""

    name = "blind"
    version = "blind-1"

    def __init__(self) -> None:
        self.texts: list[str] = []

    def analyze(self, text: str, *, has_tools: bool = False) -> Analysis:
        """Remember what was scored."""
        self.texts.append(text)
        return Analysis(score=0.9, capability="chat", stakes="low")


def _base() -> dict[str, Any]:
    return {
        "model": "auto",
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": "Summarise our chat."},
        ],
    }


def _with(path: str, value: Any) -> dict[str, Any]:
    body = _base()
    placements: dict[str, Any] = {
        "system": lambda b: b["messages"][0].update(content=value),
        "developer": lambda b: b["messages"].insert(0, {"role": "developer", "content": value}),
        "earlier user turn": lambda b: b["messages"].insert(1, {"role": "user", "content": value}),
        "assistant": lambda b: b["messages"].insert(1, {"role": "assistant", "content": value}),
        "tool result": lambda b: b["messages"].insert(
            1, {"role": "tool", "tool_call_id": "c1", "content": value}
        ),
        "tool_call arguments": lambda b: b["messages"].insert(
            1,
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "c1",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": f'{{"id": "{value}"}}'},
                    }
                ],
            },
        ),
        "input_text part": lambda b: b["messages"][1].update(
            content=[{"type": "text", "text": "hi"}, {"type": "input_text", "text": value}]
        ),
        "image url": lambda b: b["messages"][1].update(
            content=[{"type": "image_url", "image_url": {"url": f"https://x.test/?q={value}"}}]
        ),
        "message name": lambda b: b["messages"][1].update(name=value),
        "user": lambda b: b.update(user=value),
        "stop": lambda b: b.update(stop=["END", value]),
        "tool description": lambda b: b.update(
            tools=[
                {
                    "type": "function",
                    "function": {"name": "f", "description": value, "parameters": {}},
                }
            ]
        ),
        "tool parameters": lambda b: b.update(
            tools=[
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"x": {"enum": [value]}}},
                    },
                }
            ]
        ),
        "response_format": lambda b: b.update(
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "r", "schema": {"description": value}},
            }
        ),
        "unknown field": lambda b: b.update(extra_context={"note": value}),
        "unknown message field": lambda b: b["messages"][1].update(annotation=value),
        "metadata": lambda b: b.update(metadata={"ref": value}),
        "a key": lambda b: b.update(metadata={value: "x"}),
        "a number": lambda b: b.update(extra_context={"card": 4111111111111111}),
    }
    placements[path](body)
    return body


PLACEMENTS = [
    "system",
    "developer",
    "earlier user turn",
    "assistant",
    "tool result",
    "tool_call arguments",
    "input_text part",
    "image url",
    "message name",
    "user",
    "stop",
    "tool description",
    "tool parameters",
    "response_format",
    "unknown field",
    "unknown message field",
    "metadata",
    "a key",
]


@pytest.mark.parametrize("where", PLACEMENTS)
def test_personal_data_anywhere_in_the_request_sets_pii(where: str) -> None:
    scorer = BlindScorer()
    clean = extract_signals(_with(where, "nothing personal"), scorer)
    assert not clean.pii
    signals = extract_signals(_with(where, f"my ssn is {SSN}"), scorer)
    assert signals.pii
    assert "ssn" in signals.pii_kinds


def test_a_card_number_sent_as_a_json_number_is_personal_data() -> None:
    signals = extract_signals(_with("a number", None), BlindScorer())
    assert signals.pii_kinds == ("card",)


def test_obfuscated_personal_data_in_a_system_message_sets_pii() -> None:
    for value in ("card 4111\u200b1111\u200b1111\u200b1111", "jane\uff20example.com"):
        assert extract_signals(_with("system", value), BlindScorer()).pii


def test_the_score_still_reads_the_last_user_turn() -> None:
    scorer = BlindScorer()
    body = _with("system", f"my ssn is {SSN}")
    extract_signals(body, scorer)
    assert scorer.texts == ["Summarise our chat."]


def test_an_ordinary_request_has_no_pii() -> None:
    body = {
        **_base(),
        "max_tokens": 4096,
        "seed": 123456789,
        "temperature": 0.7,
        "stop": ["\n\n"],
        "metadata": {"team": "legal", "build": "2023-10-15"},
    }
    assert not extract_signals(body, BlindScorer()).pii


def test_request_strings_reads_every_string_once_and_leaves_the_body_alone() -> None:
    body = _with("tool_call arguments", "v")
    before = copy.deepcopy(body)
    strings = list(request_strings(body))
    assert body == before
    assert '{"id": "v"}' in strings and "lookup" in strings and "model" in strings
    assert strings.count("auto") == 1


def test_metadata_keeps_only_the_keys_asked_for() -> None:
    body = {**_base(), "metadata": {"team": "legal", "ssn": SSN, "blob": "x" * 10_000}}
    signals = extract_signals(body, BlindScorer(), metadata_keys={"team"})
    assert signals.metadata == {"team": "legal"}
    assert signals.pii  # what is not kept is still scanned
    assert extract_signals(body, BlindScorer(), metadata_keys=set()).metadata == {}


@pytest.mark.parametrize(
    "value", ["jane\uff20example.com", "4111\u200b1111\u200b1111\u200b1111", "me:\n+1 415-555-2671"]
)
def test_json_escapes_in_tool_call_arguments_do_not_hide_personal_data(value: str) -> None:
    # json.dumps escapes non-ASCII and newlines: the model reads the decoded text.
    body = _with("tool_call arguments", "x")
    body["messages"][1]["tool_calls"][0]["function"]["arguments"] = json.dumps({"q": value})
    assert "\\" in body["messages"][1]["tool_calls"][0]["function"]["arguments"]
    assert extract_signals(body, BlindScorer()).pii


def test_json_escapes_in_the_prompt_do_not_hide_personal_data() -> None:
    body = _base()
    body["messages"][1]["content"] = json.dumps({"note": "jane\uff20example.com"})
    assert extract_signals(body, BlindScorer()).pii


def test_an_inline_file_is_read_up_to_its_payload() -> None:
    # Base64 bytes hold no text a detector can read, and are most of a body near the size cap;
    # the same digits anywhere else are read.
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,4111111111111111AAAA"}}
    inline = {"model": "auto", "messages": [{"role": "user", "content": [part]}]}
    assert list(request_strings(inline["messages"][0]["content"][0]["image_url"])) == [
        "url",
        "data:image/png;base64,",
    ]
    assert not request_pii_kinds(inline)
    text = {"model": "auto", "messages": [{"role": "user", "content": "4111111111111111"}]}
    assert request_pii_kinds(text) == ("card",)


@pytest.mark.parametrize(
    "hidden",
    [
        "data:text/plain;base64, customer SSN 078-05-1120, email john.smith@example.com",
        "data:x;base64,john.smith@example.com",
        "data:image/png;base64,4111 1111 1111 1111",
    ],
)
def test_text_behind_a_data_prefix_is_still_read(hidden: str) -> None:
    # Only a payload that is base64 through and through is skipped.
    body = {"model": "auto", "messages": [{"role": "system", "content": hidden}]}
    assert request_pii_kinds(body)
    assert request_pii_kinds({"model": "auto", "messages": [], "user": hidden})


@pytest.mark.parametrize(
    "hidden",
    [
        "data:text/plain;base64,4111111111111111",
        "data:text/plain;base64,+14155552671",
        "data:x;base64,GB82WEST12345698765432",
    ],
)
def test_a_data_prefix_outside_a_file_field_hides_nothing(hidden: str) -> None:
    # Card numbers, phone numbers and IBANs written without spaces are made of base64's
    # characters: behind a "data:" prefix in a system message they used to be skipped as if
    # they were an image's bytes, and the model read them as text upstream.
    body = {"model": "auto", "messages": [{"role": "system", "content": hidden}]}
    assert request_pii_kinds(body)
    assert request_pii_kinds({"model": "auto", "messages": [], "user": hidden})
    parts = [{"type": "text", "text": hidden}]
    assert request_pii_kinds({"model": "auto", "messages": [{"role": "user", "content": parts}]})


#: A PNG's first bytes in base64, then characters that read as a card number (Luhn-valid):
#: base64's alphabet holds the digits, so a large image spells one now and then.
CARD_IN_BASE64 = "iVBORw0KGgoAAAANSUhEUgAA4111111111111111AAAA"


def _anthropic(*blocks: dict[str, Any]) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": list(blocks)}]}


def _source(media_type: str, data: str) -> dict[str, Any]:
    return {"type": "base64", "media_type": media_type, "data": data}


#: Each place a file's base64 payload is sent in (a chat, Responses or Messages part).
BINARY_PARTS: dict[str, Callable[[str], dict[str, Any]]] = {
    "anthropic image": lambda data: {"type": "image", "source": _source("image/png", data)},
    "anthropic pdf": lambda data: {"type": "document", "source": _source("application/pdf", data)},
    "tool result image": lambda data: {
        "type": "tool_result",
        "tool_use_id": "t1",
        "content": [{"type": "image", "source": _source("image/jpeg", data)}],
    },
    "input_audio": lambda data: {"type": "input_audio", "input_audio": {"data": data}},
    "image_url": lambda data: {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64," + data},
    },
    "file_data": lambda data: {
        "type": "file",
        "file": {"file_data": "data:application/pdf;base64," + data},
    },
    "input_image": lambda data: {
        "type": "input_image",
        "image_url": "data:image/png;base64," + data,
    },
    "input_file": lambda data: {
        "type": "input_file",
        "file_data": "data:application/pdf;base64," + data,
    },
}


@pytest.mark.parametrize("where", sorted(BINARY_PARTS))
def test_a_binary_payload_is_not_read_as_text(where: str) -> None:
    """An image's, a PDF's or a sound's base64 holds no text a detector can read; read as text
    it made false positives (a card number spelled by the alphabet kept the request local)
    and most of a large request's decision time (an Anthropic ``base64`` source, OpenAI's
    ``input_audio``: only ``data:`` URLs were skipped)."""
    assert request_pii_kinds(_anthropic(BINARY_PARTS[where](CARD_IN_BASE64))) == ()
    assert request_pii_kinds(_anthropic({"type": "text", "text": CARD_IN_BASE64})) == ("card",)
    # Text that is not base64 (spaces) in the same place is read: it is no file's bytes.
    assert request_pii_kinds(_anthropic(BINARY_PARTS[where]("4111 1111 1111 1111"))) == ("card",)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@pytest.mark.parametrize(
    "part",
    [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": SSN}},
        {"type": "document", "source": {"type": "base64", "media_type": "text/plain", "data": ""}},
        {"type": "document", "source": {"type": "base64", "data": ""}},  # no media type
        {"type": "file", "file": {"file_data": "data:text/plain;base64,"}},
        {"type": "input_file", "file_data": "data:text/csv;charset=utf-8;base64,"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": SSN}},
    ],
    ids=[
        "text document",
        "base64 text document",
        "base64 untyped document",
        "text file_data",
        "csv input_file",
        "image of text",
    ],
)
def test_a_text_file_is_read_as_the_model_reads_it(part: dict[str, Any]) -> None:
    """A plain-text document is text the model reads, however it is sent: as is, or encoded
    (a base64 source or a ``data:`` URL of a type other than an image, a PDF or a sound is
    decoded and read; a payload that is not base64 at all is text and read as it is). Encoded,
    its personal data went unread and out to a closed model."""
    part = copy.deepcopy(part)
    source = part.get("source") or {}
    if source.get("data") == "":
        source["data"] = _b64(f"Customer SSN {SSN}\n")
    field = part.get("file") or part
    if isinstance(field.get("file_data"), str):
        field["file_data"] += _b64(f"name,ssn\njane,{SSN}\n")
    assert request_pii_kinds(_anthropic(part)) == ("ssn",)


@pytest.mark.parametrize(
    ("media_type", "encoding"),
    [
        ("text/plain", "utf-16"),  # a byte-order mark says it (Windows' "Unicode" text)
        ("text/csv", "utf-32"),
        ("text/plain; charset=utf-16le", "utf-16-le"),  # the type says it
        ("text/plain;charset=UTF-16BE", "utf-16-be"),
    ],
)
def test_a_text_file_in_another_encoding_is_read_as_its_type_says(
    media_type: str, encoding: str
) -> None:
    """A text file is decoded as UTF-8, and as text in another encoding where its type is
    ``text/``: a UTF-16 or UTF-32 file, told by its byte-order mark or its ``charset``, was
    decoded as UTF-8 with its undecodable bytes replaced, a NUL between every letter, and its
    personal data went out unread."""
    data = base64.b64encode(f"name,ssn\njane,{SSN}\n".encode(encoding)).decode()
    document = {"type": "document", "source": _source(media_type, data)}
    assert request_pii_kinds(_anthropic(document)) == ("ssn",)
    url = f"data:{media_type.replace(' ', '')};base64,{data}"
    assert request_pii_kinds(_anthropic({"type": "input_file", "file_data": url})) == ("ssn",)


# -- the prompt estimate: what budgets and token limits reserve --------------------------------

PDF = "data:application/pdf;base64," + "JVBERi0xLjQK" * 350_000  # about 4 MB


def _prompt_tokens(content: list[dict[str, Any]]) -> int:
    body = {"model": "auto", "messages": [{"role": "user", "content": content}]}
    return extract_signals(body, BlindScorer()).prompt_tokens


def test_images_and_files_count_toward_the_prompt_estimate() -> None:
    # A 4 MB PDF and an image were estimated at 9 tokens, so a budget or a token limit
    # reserved nearly nothing for a request that costs thousands.
    text = [{"type": "text", "text": "Summarise this."}]
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    pdf = {"type": "file", "file": {"filename": "report.pdf", "file_data": PDF}}
    assert _prompt_tokens([*text, image]) >= _prompt_tokens(text) + IMAGE_TOKENS
    assert _prompt_tokens([*text, pdf, image]) >= _prompt_tokens(text) + FILE_TOKENS + IMAGE_TOKENS
    responses_image = {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="}
    assert _prompt_tokens([*text, responses_image]) >= _prompt_tokens(text) + IMAGE_TOKENS


def test_input_text_parts_count_as_text() -> None:
    # A 100,000-character input_text part was estimated at 4 tokens (the message's framing).
    assert _prompt_tokens([{"type": "input_text", "text": "x" * 100_000}]) >= 100_000 // 4


# The same request in several scripts, and text a tokenizer splits finely (digits, emoji).
_SCRIPTS = {
    "english": "Write a short letter to my landlord about the broken heating in the flat.",
    "chinese": "请给我的房东写一封短信，说明公寓里的暖气坏了，并请他尽快派人修理。",  # noqa: RUF001
    "japanese": "アパートの暖房が壊れたことについて、大家さんに短い手紙を書いてください。",
    "russian": "Напиши короткое письмо моему арендодателю о сломанном отоплении в квартире.",  # noqa: RUF001
    "arabic": "اكتب رسالة قصيرة إلى المالك بشأن التدفئة المعطلة في الشقة واطلب إصلاحها.",
    "digits": "\n".join(",".join(str(1000 + i * j) for j in range(8)) for i in range(6)),
    "emoji": "🎉😀👍🚀 " * 8,
}


@pytest.mark.gguf
@pytest.mark.parametrize("name", list(_SCRIPTS))
def test_the_token_estimate_holds_beyond_english(name: str) -> None:
    """Within a factor of two of the bundled model's tokenizer in every script: at 3.5
    characters a token, Chinese and Japanese were under-counted about five times, and emoji
    eight, so a prompt past the local window passed the long-context rule."""
    import llama_cpp

    from tests.conftest import GGUF

    vocab = llama_cpp.Llama(str(GGUF), vocab_only=True, verbose=False)
    text = _SCRIPTS[name]
    real = len(vocab.tokenize(text.encode(), add_bos=False))
    assert 0.5 <= text_tokens(text) / real <= 1.5


def test_a_long_chinese_prompt_meets_the_long_context_rule() -> None:
    # 2,600 characters of Chinese are 3,300-4,700 tokens to the tokenizers the local tier runs
    # (SmolLM2: 1.8 a character): the default policy's rule (over 3,000) must see it.
    body = {"model": "auto", "messages": [{"role": "user", "content": "暖气坏了" * 650}]}
    assert extract_signals(body, BlindScorer()).prompt_tokens > 3000


class _Unread(dict[str, Any]):
    """A file part's payload that fails the test if the estimate reads it."""

    def __getitem__(self, key: str) -> Any:
        raise AssertionError("the estimate read a file's payload")

    def get(self, key: str, default: Any = None) -> Any:
        raise AssertionError("the estimate read a file's payload")


def test_the_estimate_never_reads_a_files_payload() -> None:
    parts = [{"type": "file", "file": _Unread(file_data=PDF)}]
    assert estimate_tokens([{"role": "user", "content": parts}]) == FILE_TOKENS + 4


CALL = {"name": "get_weather", "arguments": "{}"}


@pytest.mark.parametrize(
    ("extra", "has_tools"),
    [
        ({}, False),
        ({"tools": [{"type": "function", "function": {"name": "get_weather"}}]}, True),
        ({"functions": [{"name": "get_weather"}]}, True),
        ({"messages": [{"role": "tool", "tool_call_id": "c1", "content": "21"}]}, True),
        ({"messages": [{"role": "function", "name": "get_weather", "content": "21"}]}, True),
        ({"messages": [{"role": "assistant", "content": None, "function_call": CALL}]}, True),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"id": "c1", "function": CALL}]}]},
            True,
        ),
    ],
)
def test_a_tool_call_or_result_in_either_form_sets_has_tools(
    extra: dict[str, Any], has_tools: bool
) -> None:
    body = {**_base(), **{k: v for k, v in extra.items() if k != "messages"}}
    body["messages"] = [*body["messages"], *extra.get("messages", [])]
    assert extract_signals(body, BlindScorer()).has_tools is has_tools


SCHEMA = {
    "type": "object",
    "properties": {f"field_{i}": {"type": "string", "description": "x" * 40} for i in range(60)},
}


@pytest.mark.parametrize(
    ("extra", "at_least"),
    [
        # About 800 tokens of schema, which OpenAI reads and bills as input.
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "r", "schema": SCHEMA},
                }
            },
            700,
        ),
        ({"response_format": {"type": "json_object", "schema": SCHEMA}}, 700),  # llama.cpp's
        ({"prediction": {"type": "content", "content": "def f():\n    return 1\n" * 100}}, 500),
        (
            {"prediction": {"type": "content", "content": [{"type": "text", "text": "y" * 3500}]}},
            900,
        ),
    ],
)
def test_a_schema_or_a_prediction_counts_toward_the_prompt_estimate(
    extra: dict[str, Any], at_least: int
) -> None:
    """The prompt estimate (budget and token holds, context fit) read the messages and tools
    only: a request with a large json_schema or predicted output was held, and fitted to a
    context window, as if it had neither."""
    base = extract_signals(_base(), BlindScorer())
    plain = base.prompt_tokens
    signals = extract_signals({**_base(), **extra}, BlindScorer())
    assert signals.prompt_tokens - plain >= at_least
    # A prediction's part of what is held is priced apart (billed as output where the answer
    # differs).
    if "prediction" in extra:
        assert signals.prediction_tokens == signals.prompt_held - base.prompt_held
    else:
        assert signals.prediction_tokens == 0
    text = {"response_format": {"type": "text"}, "prediction": None}
    assert extract_signals({**_base(), **text}, BlindScorer()).prompt_tokens == plain


def _fetched(document: dict[str, Any]) -> dict[str, Any]:
    """A /v1/messages request whose history holds a page Claude fetched (web fetch)."""
    fetched = {"type": "web_fetch_result", "url": "https://example.com/a", "content": document}
    turn = [
        {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_fetch", "input": {}},
        {"type": "web_fetch_tool_result", "tool_use_id": "srvtoolu_1", "content": fetched},
    ]
    return {"messages": [{"role": "assistant", "content": turn}, {"role": "user", "content": "?"}]}


def test_server_tool_blocks_count_toward_the_prompt_estimate() -> None:
    # The estimate read the chat translation, which drops a server tool's blocks, though a
    # Claude (the one model that takes them) reads and bills them: a fetched page of 35,000
    # characters counted nothing toward holds and context fit.
    chat = {"model": "auto", "messages": [{"role": "user", "content": "?"}]}
    page = {"type": "text", "media_type": "text/plain", "data": "word " * 7000}
    text = _fetched({"type": "document", "source": page})
    pdf = _fetched({"type": "document", "source": {"type": "base64", "data": PDF}})
    plain = extract_signals(chat, BlindScorer()).prompt_tokens
    read = extract_signals(chat, BlindScorer(), sent=text).prompt_tokens
    assert read - plain >= 35_000 / 3.5
    guessed = extract_signals(chat, BlindScorer(), sent=pdf).prompt_tokens - plain
    assert FILE_TOKENS <= guessed < FILE_TOKENS + 100  # a PDF's guess: its payload unread


def test_a_function_call_counts_toward_the_prompt_estimate() -> None:
    message = {"role": "assistant", "content": None}
    called = {**message, "function_call": {"name": "f", "arguments": "x" * 700}}
    assert estimate_tokens([called]) - estimate_tokens([message]) >= 200


def test_anthropics_own_tools_are_named_by_the_path_that_takes_them() -> None:
    """The types of a Messages request's own Anthropic tools, sorted, and those litellm's chat
    translation does not pass on whole (it rebuilds any web search as a bare
    web_search_20250305 and sends the computer tool as a client tool with no schema); a client
    tool is none of them, unless litellm's adapter reads it as its web search."""
    ask = [{"role": "user", "content": "list the files"}]
    tools = [
        {"name": "get_weather", "input_schema": {"type": "object"}},
        {"type": "custom", "name": "lookup", "input_schema": {"type": "object"}},
        {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
        {"type": "bash_20250124", "name": "bash", "cache_control": {"type": "ephemeral"}},
        {"type": "web_search_20250305", "name": "web_search", "cache_control": {}},
    ]
    sent = {"model": "auto", "max_tokens": 9, "messages": ask, "tools": tools}
    signals = extract_signals({"messages": ask}, BlindScorer(), sent=sent)
    assert signals.anthropic_tools == (
        "bash_20250124",
        "text_editor_20250728",
        "web_search_20250305",
    )
    assert signals.native_tools == ()
    lost = [
        {"type": "web_search_20250305", "name": "web_search", "allowed_domains": ["python.org"]},
        {"type": "web_search_20260209", "name": "web_search"},
        {"type": "computer_20250124", "name": "computer", "display_width_px": 1024},
    ]
    for tool in lost:
        named = extract_signals({"messages": ask}, BlindScorer(), sent={**sent, "tools": [tool]})
        assert named.anthropic_tools == named.native_tools == (tool["type"],)
    legacy = {**sent, "tools": [{"name": "web_search"}]}  # litellm's adapter: a web search
    assert extract_signals({"messages": ask}, BlindScorer(), sent=legacy).anthropic_tools == (
        "web_search",
    )
    # A Responses request's tools are OpenAI's, and a chat request has no native form.
    responses = {"input": "hi", "tools": [{"type": "web_search_preview"}]}
    assert extract_signals({"messages": ask}, BlindScorer(), sent=responses).anthropic_tools == ()
    chat = {"messages": ask, "tools": [{"type": "bash_20250124", "name": "bash"}]}
    assert extract_signals(chat, BlindScorer()).anthropic_tools == ()


@pytest.mark.parametrize(
    "where",
    ["request", "system", "tool", "message", "part", "tool result"],
)
def test_a_prompt_marked_for_caching_is_priced_as_written(where: str) -> None:
    """Anthropic bills a prompt it writes to its cache at 1.25 times the input price, twice
    for ``ttl: 1h``; a ``cache_control`` may stand on the request, a system block, a tool, a
    message or a part of one, or a tool result's block. The longest lifetime asked is kept
    for the budget hold."""
    one_hour = {"type": "ephemeral", "ttl": "1h"}
    part = {"type": "text", "text": "the manual"}
    result = {"type": "tool_result", "tool_use_id": "t1", "content": [dict(part)]}
    sent: dict[str, Any] = {
        "model": "auto",
        "system": [dict(part)],
        "tools": [{"name": "look", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": [dict(part), result]}],
    }
    marked = {
        "request": sent,
        "system": sent["system"][0],
        "tool": sent["tools"][0],
        "message": sent["messages"][0],
        "part": sent["messages"][0]["content"][0],
        "tool result": result["content"][0],
    }[where]
    chat = {"messages": [{"role": "user", "content": "the manual"}]}
    assert cache_lifetime(chat, sent) is None
    marked["cache_control"] = {"type": "ephemeral"}
    assert cache_lifetime(chat, sent) == "5m"
    sent["messages"][0]["content"][0]["cache_control"] = one_hour
    assert cache_lifetime(chat, sent) == "1h"
    # A chat request's own marks count too (litellm passes them on to a Claude).
    assert cache_lifetime(sent) == "1h"


def test_redacting_escaped_text_keeps_a_character_json_wrote_as_a_surrogate_pair() -> None:
    """``json.dumps`` writes a character beyond the BMP (an emoji) as two ``\\uXXXX`` escapes,
    a surrogate pair. Decoded one escape at a time for redaction, each half became a lone
    surrogate, stored as U+FFFD twice: the prompt lost the emoji its personal data sat beside."""
    from router.signals import redacted

    phone = "\u00a0".join(["+33", "6", "12", "34", "56", "78"])
    escaped = json.dumps({"note": "call me \U0001f600", "phone": phone})
    assert "\\ud83d\\ude00" in escaped
    stored = redacted(escaped)
    assert "\U0001f600" in stored and "\ufffd" not in stored
    assert "[PHONE]" in stored
    assert all(not "\ud800" <= c <= "\udfff" for c in stored)


def test_redacting_escaped_text_leaves_no_part_of_an_address_an_escape_split() -> None:
    """An address split by a zero-width space, as ``json.dumps`` writes it
    (``jane.doe\\u200b@example.com``), is an address to the ``pii`` signal once decoded. Redacted
    before it was decoded, the detector matched from inside the escape (``u200b@example.com``)
    and the name before it was stored: ``jane.doe\\[EMAIL]``."""
    from router.signals import redacted

    escaped = json.dumps({"to": "jane.doe\u200b@example.com", "phone": "+33 6 12 34 56 78"})
    assert "\\u200b" in escaped
    stored = redacted(escaped)
    assert "jane" not in stored, stored
    assert "[EMAIL]" in stored and "[PHONE]" in stored
