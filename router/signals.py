"""Cheap signals read from a chat request, before any model runs.

:func:`extract_signals` turns an OpenAI chat request (a plain dict) plus the scorer's
:class:`~router.scoring.Analysis` into a :class:`Signals` value, the only input the policy sees.
It is pure and fast: no tokenizer, no network. Token counts are estimated from the text
(:func:`text_tokens`: 3.5 characters a token for English, more tokens for digits and for
scripts beyond ASCII), which is what the long-context rule needs, and images and files by a
fixed guess each (:func:`estimate_tokens`); budget holds and token reservations count the most
the text can be instead (a token a UTF-8 byte, :func:`prompt_sizes`, ``Signals.prompt_bound``).

The routing score reads the last user turn (:func:`scoring_text`); the ``pii`` signal reads
every string the request would send upstream (:func:`request_strings`: every message, part,
name, tool call, tool, ``stop``, ``user``, ``response_format``, ``metadata``, unknown fields,
object keys and integers), so personal data anywhere keeps a privacy rule in force.
"""

from __future__ import annotations

import binascii
import codecs
import math
import re
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from router.pii import PII_KINDS, pii_kinds, redact
from router.schemas import ANTHROPIC_SERVER_FIELDS, CHAT_FIELDS, SERVER_TOOL_BLOCKS, FrontFields
from router.scoring import Analysis, Scorer

CHARS_PER_TOKEN = 3.5
#: Tokens a digit adds past its share of CHARS_PER_TOKEN: tokenizers read one to three digits
#: a token (SmolLM2 and Llama 2 one, Llama 3 and GPT-4o three), against 3.5 letters.
DIGIT_TOKENS = 0.3
#: Tokens each UTF-8 byte of a character past its first adds: tokenizers split text beyond ASCII
#: far finer than English. A Chinese, Japanese or Korean character (three bytes) counts 1.3
#: tokens, a Cyrillic or Arabic letter (two) 0.8, an emoji (four) 1.8: between SmolLM2's
#: tokenizer (1.8, 0.7-1.0, 2.8) and the larger vocabularies of Llama 3 or Qwen (about 0.7 for
#: Chinese).
EXTRA_BYTE_TOKENS = 0.5
_DIGITS = b"0123456789"
# Per-message framing a chat template adds (role markers, separators).
TOKENS_PER_MESSAGE = 4


@dataclass(frozen=True, slots=True)
class Signals:
    """Everything the policy may match on for one request. Never holds the prompt text."""

    alias: str
    tenant: str = "default"
    prompt_tokens: int = 0
    # The most tokens the prompt can be (a token a UTF-8 byte of its text; images and files by
    # the guesses): what a budget hold and a token reservation count, so that text a tokenizer
    # cannot merge (``"a\n"`` repeated, 3.5 times the estimate) is not held at the estimate.
    # None: ``prompt_tokens`` (a value made without a request). A price, not a signal.
    prompt_bound: int | None = None
    # Of prompt_bound, a predicted output's (:func:`prediction_tokens`): its unused part is
    # billed as completion tokens. A price, not a signal: no policy matches on it.
    prediction_tokens: int = 0
    max_tokens: int | None = None
    # What the client called max_tokens (max_completion_tokens, a front's max_output_tokens),
    # for the policy's explanations. A name, not a signal: no policy matches on it.
    output_field: str = "max_tokens"
    has_images: bool = False
    has_tools: bool = False
    # has_tools only for the conversation's tool calls or results: the request offers no tools.
    tool_history: bool = False
    # The request's ``n``: the local tier answers one choice, so n > 1 goes to a closed model.
    choices: int = 1
    # The types of Anthropic's server-tool blocks in a /v1/messages history (a web search and
    # its results), sorted: only a Claude reached over Anthropic's own API takes them.
    server_tool_blocks: tuple[str, ...] = ()
    # What else of a /v1/messages request only a Claude reached over Anthropic's own API
    # takes, as a refusal names it (:func:`anthropic_only`): the chat translation sends a
    # document by URL as an image and drops citations; it passes the server-side fields on,
    # which litellm sends to Anthropic for an ``anthropic/`` model and no other model takes
    # (policy._anthropic_only).
    anthropic_only: tuple[str, ...] = ()
    # The types of Anthropic's own tools a /v1/messages request offers (``bash_20250124``,
    # ``web_search_20250305``...), sorted: only a Claude on Anthropic's API takes them; and of
    # these, ``native_tools``, those litellm's chat translation does not pass on to one whole,
    # which only such a Claude reached natively takes (:func:`anthropic_tools`).
    anthropic_tools: tuple[str, ...] = ()
    native_tools: tuple[str, ...] = ()
    # The kinds of the non-text parts (``documents``: a PDF; ``images``: any other), sorted,
    # as a refusal names them. A name, not a signal: no policy matches on it.
    media: tuple[str, ...] = ()
    # How many stop sequences the request sets (``stop``): OpenAI takes at most 4.
    stop_sequences: int = 0
    # The sampling fields the request sets to other than their default (:func:`sampling`),
    # sorted: OpenAI's reasoning models refuse them (``ModelSpec.refused_sampling``).
    sampling: tuple[str, ...] = ()
    turns: int = 1
    score: float = 0.0
    capability: str | None = None
    capability_reason: str | None = None
    stakes: str | None = None
    stakes_reason: str | None = None
    pii: bool = False
    pii_kinds: tuple[str, ...] = ()
    local_accuracy: float | None = None
    local_profile: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)

    @property
    def prompt_held(self) -> int:
        """The prompt tokens a hold counts: ``prompt_bound`` where known."""
        return self.prompt_tokens if self.prompt_bound is None else self.prompt_bound

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view for records, headers and explanations."""
        return {
            "alias": self.alias,
            "tenant": self.tenant,
            "prompt_tokens": self.prompt_tokens,
            "prompt_held": self.prompt_held,
            "max_tokens": self.max_tokens,
            "has_images": self.has_images,
            "has_tools": self.has_tools,
            "tool_history": self.tool_history,
            "choices": self.choices,
            "turns": self.turns,
            "score": round(self.score, 6),
            "capability": self.capability,
            "capability_reason": self.capability_reason,
            "stakes": self.stakes,
            "stakes_reason": self.stakes_reason,
            "pii": self.pii,
            "pii_kinds": list(self.pii_kinds),
            "local_accuracy": self.local_accuracy,
            "local_profile": self.local_profile,
            "headers": dict(self.headers),
            "metadata": dict(self.metadata),
        }


def message_text(message: Mapping[str, Any]) -> str:
    """The text parts of one message's ``content`` (string or content-part array)."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            str(part.get("text", ""))
            for part in content
            if isinstance(part, Mapping) and part.get("type") == "text"
        )
    return ""


def scoring_text(messages: list[Mapping[str, Any]]) -> str:
    """The text the scorer reads: the last user turn, which carries the task."""
    message = _scored_message(messages)
    return message_text(message) if message is not None else ""


def _scored_message(messages: list[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    users = [m for m in messages if m.get("role") == "user"]
    return users[-1] if users else messages[-1] if messages else None


def _scored_strings(messages: list[Mapping[str, Any]]) -> set[int]:
    """The ids of the strings :func:`scoring_text` is made of."""
    message = _scored_message(messages)
    content = message.get("content") if message is not None else None
    if isinstance(content, str):
        return {id(content)}
    if isinstance(content, list):
        return {
            id(part["text"])
            for part in content
            if isinstance(part, Mapping)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        }
    return set()


#: Tokens one image part counts for. Anthropic bills about width x height / 750 and scales an
#: image down past 1.15 megapixels (about 1,600 tokens at most); OpenAI's high detail bills 85
#: plus 170 per 512-pixel tile, 1,445 at most for gpt-4o. The image itself is not decoded.
IMAGE_TOKENS = 1600
#: Tokens one file part (a PDF, audio, any other non-text part) counts for: one PDF page as
#: Anthropic bills it, up to 3,000 tokens of extracted text plus the page's image. The payload
#: is not read, so a file of many pages counts as one; the provider's usage settles the hold.
FILE_TOKENS = 3000 + IMAGE_TOKENS
#: Part types that carry an image (OpenAI chat, Responses, Anthropic).
IMAGE_PARTS = frozenset({"image_url", "input_image", "image"})


def text_tokens(text: str) -> float:
    """Estimated tokens of ``text``, for no tokenizer in particular: a character a
    :data:`CHARS_PER_TOKEN`-th of a token, plus :data:`DIGIT_TOKENS` an ASCII digit and
    :data:`EXTRA_BYTE_TOKENS` for each UTF-8 byte of a character past its first. Linear, at
    memory speed (``str.encode``, ``bytes.translate``)."""
    return _estimated(text, text.encode("utf-8", "surrogatepass"))


def _estimated(text: str, data: bytes) -> float:
    # :func:`text_tokens` of ``text``, whose UTF-8 form is ``data``.
    digits = len(data) - len(data.translate(None, _DIGITS))
    return (
        len(text) / CHARS_PER_TOKEN
        + digits * DIGIT_TOKENS
        + (len(data) - len(text)) * EXTRA_BYTE_TOKENS
    )


class _Tally:
    """Text tokens counted both ways in one pass, each string encoded once: the estimate
    (:func:`text_tokens`) and the most they can be, a token a UTF-8 byte, as a byte-level
    tokenizer reads text none of whose bytes merge (``"a\n"`` repeated, or random punctuation:
    GPT-4o's tokenizer reads either at 2.4 to 3.5 times the estimate)."""

    __slots__ = ("bound", "estimate")

    def __init__(self) -> None:
        self.estimate = 0.0
        self.bound = 0.0

    def add(self, text: str) -> None:
        data = text.encode("utf-8", "surrogatepass")
        self.estimate += _estimated(text, data)
        self.bound += len(data)

    def whole(self, bound: bool) -> int:
        """The tally in whole tokens: the estimate, or with ``bound`` the most it can be."""
        return math.ceil((self.bound if bound else self.estimate) - 1e-9)


def _content_size(content: Any, tally: _Tally) -> int:
    # The tokens of the images and files in one message's content; its text goes to ``tally``.
    # A part's ``text`` counts whatever its type (``text``, ``input_text``, ``output_text``);
    # an image or file counts by the guesses above, so its payload is never read.
    if isinstance(content, str):
        tally.add(content)
        return 0
    media = 0
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, Mapping):
                continue
            text = part.get("text")
            if part.get("type") in IMAGE_PARTS:
                media += IMAGE_TOKENS
            elif isinstance(text, str):
                tally.add(text)
            else:
                media += FILE_TOKENS
    return media


def estimate_tokens(
    messages: list[Mapping[str, Any]],
    tools: Any = None,
    *,
    response_format: Any = None,
    prediction: Any = None,
    bound: bool = False,
) -> int:
    """Prompt-token estimate: text by :func:`text_tokens`, each image as :data:`IMAGE_TOKENS`
    and each file as :data:`FILE_TOKENS`, plus :data:`TOKENS_PER_MESSAGE` a message.

    The request's other model input counts too: the tools, a ``response_format``'s JSON schema
    (which the provider reads and bills as input: OpenAI's structured outputs, the tool litellm
    makes of it for Claude), a ``prediction`` (OpenAI's predicted output, which the model
    reads; the part the answer does not use is billed at the output price), and the thinking
    a tool loop sends back (:func:`_replayed_thinking`). ``bound``: text counted at the most
    it can be (a token a UTF-8 byte: :class:`_Tally`) instead."""
    tally = _Tally()
    fixed = _tally_prompt(messages, tools, response_format, prediction, tally)
    return tally.whole(bound) + fixed


def _tally_prompt(
    messages: list[Mapping[str, Any]],
    tools: Any,
    response_format: Any,
    prediction: Any,
    tally: _Tally,
) -> int:
    # :func:`estimate_tokens`' text into ``tally``; returns the tokens counted whole (images,
    # files, a message's own).
    media = 0
    if response_format and isinstance(response_format, Mapping):  # truth first: no ABC check
        schema = response_format.get("json_schema") or response_format.get("schema")
        if schema:
            tally.add(str(schema))
    if prediction and isinstance(prediction, Mapping):
        media = _content_size(prediction.get("content"), tally)
    called: Mapping[str, Any] | None = None  # the last message that calls a tool
    for m in messages:
        media += _content_size(m.get("content"), tally)
        calls = m.get("tool_calls") or m.get("function_call")
        if calls:
            tally.add(str(calls))
            called = m
    if tools:
        tally.add(str(tools))
    if called is not None:
        _replayed_thinking(messages, called, tally)
    return media + TOKENS_PER_MESSAGE * len(messages)


def _replayed_thinking(
    messages: list[Mapping[str, Any]], called: Mapping[str, Any], tally: _Tally
) -> None:
    # The thinking of the last assistant turn when it is ``called``, the last to call tools
    # (``thinking_blocks``, as litellm's translation of Anthropic's ``thinking`` and
    # ``redacted_thinking`` blocks holds them): a tool loop must send it back with the results,
    # and Claude reads and bills it as input. An earlier turn's thinking it strips, uncounted
    # (Anthropic's docs: context windows, token counting). A redacted block's encrypted
    # ``data`` counts as text would: its tokens are not known. Read only where a turn called a
    # tool, so a plain conversation's estimate pays nothing for it.
    last = next((m for m in reversed(messages) if m.get("role") == "assistant"), None)
    blocks = called.get("thinking_blocks")
    if last is not called or not isinstance(blocks, list):
        return
    for b in blocks:
        if isinstance(b, Mapping) and isinstance(text := b.get("thinking", b.get("data")), str):
            tally.add(text)


def prompt_estimate(body: Mapping[str, Any], blocks: Sequence[Mapping[str, Any]] = ()) -> int:
    """The prompt-token estimate of the chat request ``body`` (:func:`estimate_tokens` of its
    messages, tools, ``response_format`` and ``prediction``), corrected by ``blocks``, its
    front's native request's (:func:`native_blocks`), for what only a Claude is sent: the
    server-tool blocks, which the chat translation drops, and each PDF by URL, which it makes
    an image part, counted as a file. Routing and ``/v1/messages/count_tokens`` both count
    with this, so the two agree."""
    return prompt_sizes(body, blocks)[0]


def prompt_sizes(
    body: Mapping[str, Any], blocks: Sequence[Mapping[str, Any]] = ()
) -> tuple[int, int]:
    """(:func:`prompt_estimate`, the most the prompt can be: its text a token a UTF-8 byte,
    what a budget hold and a token reservation count), read in one pass."""
    text, served = _Tally(), _Tally()
    fixed = _tally_prompt(
        list(body.get("messages") or []),
        body.get("tools") or body.get("functions"),
        body.get("response_format"),
        body.get("prediction"),
        text,
    )
    fixed += _tally_server_blocks(blocks, served)
    fixed += sum(1 for b in blocks if _by_url(b)) * (FILE_TOKENS - IMAGE_TOKENS)
    return (
        text.whole(False) + served.whole(False) + fixed,
        text.whole(True) + served.whole(True) + fixed,
    )


def _by_url(block: Mapping[str, Any]) -> bool:
    # A document (a PDF: Anthropic takes no other kind by URL) of a ``url`` source.
    return block.get("type") == "document" and (block.get("source") or {}).get("type") == "url"


def _tally_server_blocks(blocks: Sequence[Mapping[str, Any]], tally: _Tally) -> int:
    # Each string of the server-tool blocks counts as text (into ``tally``), as a tool call's
    # JSON does; each image or document of a payload source counts by the fixed guesses
    # (returned).
    media = 0
    for part in server_block_parts(blocks):
        if isinstance(part, str):
            tally.add(part)
        else:
            media += IMAGE_TOKENS if part.get("type") == "image" else FILE_TOKENS
    return media


def server_block_parts(blocks: Iterable[Mapping[str, Any]]) -> Iterator[str | Mapping[str, Any]]:
    """What the server-tool blocks among ``blocks`` (:func:`native_blocks`) give a Claude to
    read: each string in them (a search's query and results, their encrypted page text, code
    and its output, an MCP tool's result), keys too, and each image or document of a base64,
    URL or file source (a fetched PDF) whole, its payload not text. The chat translation drops
    these blocks; the prompt estimate and the window pre-check count them from here.
    Iterative: nesting costs no stack."""
    stack: list[Any] = [b for b in blocks if b.get("type") in SERVER_TOOL_BLOCKS]
    while stack:
        value = stack.pop()
        if isinstance(value, str):
            yield value
        elif isinstance(value, list):
            stack.extend(value)
        elif isinstance(value, Mapping):
            kind, source = value.get("type"), value.get("source")
            if kind in ("image", "document") and _payload_source(source):
                yield value
                continue
            for key, item in value.items():
                yield str(key)
                stack.append(item)


def _payload_source(source: Any) -> bool:
    # An image's or a document's source that holds a file (not text a model reads as such).
    return isinstance(source, Mapping) and source.get("type") in ("base64", "url", "file")


def prediction_tokens(prediction: Any) -> int:
    """The most tokens a request's ``prediction`` (OpenAI's predicted output) can be, counted
    as a hold counts message content (a token a UTF-8 byte). The model reads it; the part the
    answer does not use is billed as completion tokens (``rejected_prediction_tokens``, within
    ``completion_tokens``), at the output price."""
    if not prediction or not isinstance(prediction, Mapping):
        return 0
    tally = _Tally()
    media = _content_size(prediction.get("content"), tally)
    return tally.whole(True) + media


#: The characters of a base64 payload (line breaks allowed, as MIME writes them).
_BASE64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\r\n"
#: Media types whose bytes hold no text a detector could read (a PDF's text is compressed).
_BINARY_MEDIA = ("image/", "audio/", "video/", "application/pdf")


def _payload_text(payload: str, media_type: str) -> str:
    """What the detectors read of a base64 ``payload`` of ``media_type``: nothing of an
    image's, a sound's or a PDF's bytes (read as text, their base64 only makes false
    positives); the text of any other file, decoded (a ``text/plain`` file is text the model
    reads). A payload that is not base64 through and through is text, and is read whole."""
    if not payload.isascii() or payload.encode("ascii").translate(None, _BASE64):
        return payload
    media = media_type.lower()
    if media.startswith(_BINARY_MEDIA):
        return ""
    try:
        data = binascii.a2b_base64(payload)
    except binascii.Error:
        return payload
    if media.startswith("text/"):  # text in the encoding its mark or its type names, if any
        return data.decode(_text_encoding(media, data), "replace")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # bytes
        return ""


#: Byte-order marks, UTF-32's first: its little-endian mark begins with UTF-16's.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


def _text_encoding(media_type: str, data: bytes) -> str:
    # The encoding of a text file: UTF-16 or UTF-32 where its byte-order mark or its type's
    # ``charset`` says so (their ASCII letters are valid UTF-8, a NUL between each), else
    # UTF-8, whose replaced bytes leave an 8-bit charset's ASCII letters to read. No other
    # charset is taken: one may name no text encoding (``base64``, ``zlib``).
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            return encoding
    charset = media_type.partition("charset=")[2].partition(";")[0].strip().strip('"')
    try:
        name = codecs.lookup(charset).name if charset else "utf-8"
    except LookupError:
        return "utf-8"
    return name if name.startswith(("utf-16", "utf-32")) else "utf-8"


def _without_data_payload(text: str) -> str:
    # An inline file (``data:image/png;base64,...``) is read up to its payload, and its
    # payload as :func:`_payload_text` reads it: an image's encoded bytes hold no text the
    # detectors could read, and are most of a body near the size cap.
    if text.startswith("data:"):
        head, sep, payload = text.partition(";base64,")
        if sep:
            return head + sep + _payload_text(payload, head[5:])
    return text


#: The object keys whose string value may be an inline file (``data:...;base64,...``): OpenAI's
#: ``image_url.url`` and ``file.file_data``, the Responses API's ``image_url`` and ``file_data``.
FILE_FIELDS = frozenset({"url", "image_url", "file_data"})
#: How :func:`request_strings` reads a string that is not text (None): as a :data:`FILE_FIELDS`
#: value, or (a media type) as a base64 payload. OpenAI's ``input_audio`` holds one in ``data``.
_FILE_FIELD, _AUDIO = "data:", "audio/"
#: The keys whose value may be read otherwise than as text (:func:`_read_as`).
_PAYLOAD_KEYS = FILE_FIELDS | {"data", "input_audio"}


def _read_as(parent: Mapping[str, Any], key: str, value: Any, how: str | None) -> str | None:
    # How to read ``value``, ``parent[key]`` (``parent`` read as ``how``): a file field's, an
    # Anthropic ``base64`` source's or an ``input_audio``'s ``data`` as a file; else as text.
    if key in FILE_FIELDS:
        return _FILE_FIELD
    if key == "input_audio":
        return _AUDIO
    if not isinstance(value, str):
        return None
    if how == _AUDIO:
        return _AUDIO
    if parent.get("type") != "base64":
        return None
    media = parent.get("media_type")
    return media if isinstance(media, str) else ""


def request_strings(body: Any, *, as_sent: bool = False) -> Iterator[str]:
    """Every string in a JSON value, each once: object keys and values, list items, and
    integers written out (a card number sent as a JSON number is still a card number). A
    file's base64 payload is read as :func:`_payload_text` reads it (an image's not at all):
    an inline ``data:...;base64,`` file in a file field (:data:`FILE_FIELDS`), the ``data`` of
    an Anthropic ``base64`` source and of OpenAI's ``input_audio``; anywhere else such a
    string is text a model reads, and is read whole. ``as_sent``: payloads too as they are
    (what a pass over the request costs, which an image's yields nothing to show).

    Iterative, so nesting depth costs no stack.
    """
    stack: list[tuple[Any, str | None]] = [(body, None)]
    while stack:
        value, how = stack.pop()
        if isinstance(value, str):
            if how is None or as_sent:
                yield value
            elif how == _FILE_FIELD:
                yield _without_data_payload(value)
            else:
                yield _payload_text(value, how)
        elif isinstance(value, Mapping):
            for key, item in value.items():
                yield str(key)
                read = _read_as(value, key, item, how) if key in _PAYLOAD_KEYS else None
                stack.append((item, read))
        elif isinstance(value, list | tuple):
            stack.extend((item, None) for item in value)
        elif isinstance(value, int) and not isinstance(value, bool):
            yield str(value)


# A JSON escape: a surrogate pair first (``json.dumps`` writes an emoji as two escapes, which
# decode to one character), then any one escape.
_JSON_ESCAPE = re.compile(
    r"\\(?:u([dD][89abAB][0-9a-fA-F]{2})\\u([dD][c-fC-F][0-9a-fA-F]{2})"
    r'|u([0-9a-fA-F]{4})|(["\\/bfnrt]))'
)
_ESCAPED = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}


def _unescape(match: re.Match[str]) -> str:
    high, low, code, char = match.groups()
    if high:
        return chr(0x10000 + ((int(high, 16) - 0xD800) << 10) + int(low, 16) - 0xDC00)
    return chr(int(code, 16)) if code else _ESCAPED.get(char, char)


def request_pii_kinds(body: Mapping[str, Any], *, read: Collection[int] = ()) -> tuple[str, ...]:
    """The kinds of personal data anywhere in the request (see :func:`request_strings`); the
    strings whose ids are in ``read`` (already read by the caller) are not read again as they
    are, only decoded (below).

    A string that looks like JSON (it opens with ``{``, ``[`` or ``"``) and has backslashes is
    also read with its JSON escapes decoded: tool-call arguments and many tool results are JSON
    text, where ``\\u200b`` or ``\\n`` would otherwise hide what the model reads.
    The strings are read as one text, one per line: no detector matches across a line break,
    so each string is read as if alone, in one linear pass whatever the number of strings.
    """
    texts: list[str] = []
    for text in request_strings(body):
        if id(text) not in read:
            texts.append(text)
        if "\\" in text and text.lstrip()[:1] in ("{", "[", '"'):
            texts.append(_JSON_ESCAPE.sub(_unescape, text))
    return pii_kinds("\n".join(texts))


def redacted(text: str) -> str:
    """``text`` with its personal data redacted (:func:`~router.pii.redact`), read as the
    ``pii`` signal reads it: where decoding its JSON escapes shows more (a phone number spaced
    with ``\\u00a0`` or a card number split by ``\\u200b``, as ``json.dumps`` writes them),
    the decoded text is redacted, so what kept a request local is not stored whole. The text
    as sent is decoded first: redacted before it, a detector that matched from inside an
    escape (``u200b@example.com`` in ``jane.doe\\u200b@example.com``) left the rest behind.
    Where only the raw text shows any, its redaction is decoded and read again."""
    clean = redact(text)
    if "\\" not in text:
        return clean
    decoded = _JSON_ESCAPE.sub(_unescape, text)
    if pii_kinds(decoded):
        return redact(decoded)
    if clean == text:  # nothing redacted raw: its decoding was just read
        return clean
    decoded = _JSON_ESCAPE.sub(_unescape, clean)
    return redact(decoded) if pii_kinds(decoded) else clean


def _tool_turn(message: Mapping[str, Any]) -> bool:
    # A tool call or its result, in either form: ``tool_calls`` and ``tool`` messages, or the
    # older ``function_call`` and ``function`` ones. A conversation that holds one needs a model
    # that takes tools: chat templates render the call as an empty assistant turn.
    return message.get("role") in ("tool", "function") or bool(
        message.get("tool_calls") or message.get("function_call")
    )


#: The chat fields that set how a model samples its answer, each with the value that asks for
#: nothing (its default, as OpenAI documents it): a request that sends the default is answered
#: as one that leaves the field out, and a model that refuses the field is sent it without
#: (``Gateway.fitted``: OpenAI's reasoning models refuse all but temperature whatever their
#: value).
SAMPLING_DEFAULTS: Mapping[str, Any] = {
    "frequency_penalty": 0,
    "logit_bias": {},
    "logprobs": False,
    "presence_penalty": 0,
    "temperature": 1,
    "top_p": 1,
}


def sampling(body: Mapping[str, Any]) -> tuple[str, ...]:
    """The sampling fields (:data:`SAMPLING_DEFAULTS`) ``body`` sets to other than their
    default, sorted; a null asks for nothing."""
    sent = SAMPLING_DEFAULTS.keys() & body.keys()
    if not sent:  # most requests set none of them
        return ()
    return tuple(sorted(n for n in sent if body[n] is not None and body[n] != SAMPLING_DEFAULTS[n]))


def requested_choices(body: Mapping[str, Any]) -> int:
    """The choices a request asks for (``n``, validated as an integer from 1 to 16)."""
    n = body.get("n")
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1


def extract_signals(
    body: Mapping[str, Any],
    scorer: Scorer,
    *,
    tenant: str = "default",
    headers: Mapping[str, str] | None = None,
    metadata_keys: Collection[str] | None = None,
    sent: Mapping[str, Any] | None = None,
    fields: FrontFields = CHAT_FIELDS,
) -> Signals:
    """Read the request's signals and score it. ``body`` is a validated chat request dict.

    ``metadata_keys``: the top-level ``metadata`` keys the signals keep (those the policy reads
    and the caller may set); None keeps them all. All of ``metadata`` is still read for PII.
    ``sent``: the request as a front may send it instead of ``body`` (a native pass-through),
    read for PII too: fields the chat translation drops would otherwise go upstream unread.
    ``fields``: the names of the front it came in on, which the policy's explanations use.
    """
    messages: list[Mapping[str, Any]] = list(body.get("messages") or [])
    tools = body.get("tools") or body.get("functions")
    tool_history = not tools and any(_tool_turn(m) for m in messages)
    has_tools = bool(tools) or tool_history
    text = scoring_text(messages)
    # The prompt is read here and by the scorer (for its stakes): pii_kinds remembers the last
    # long string, so it is read once. The rest of the body is read without it.
    prompt_kinds = pii_kinds(text)
    analysis: Analysis = scorer.analyze(text, has_tools=has_tools)
    rest = request_pii_kinds(body, read=_scored_strings(messages))
    found = {*prompt_kinds, *rest, *analysis.pii_kinds}
    if sent is not None:
        found.update(request_pii_kinds(sent))
    kinds = tuple(k for k in PII_KINDS if k in found) + tuple(sorted(found - set(PII_KINDS)))
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
    media = media_kinds(messages)  # none: no image, no document
    blocks = tuple(native_blocks(sent)) if sent is not None else ()
    tools, native_tools = anthropic_tools(sent) if sent is not None else ((), ())
    prompt_tokens, prompt_bound = prompt_sizes(body, blocks)
    return Signals(
        alias=str(body.get("model", "auto")),
        tenant=tenant,
        prompt_tokens=prompt_tokens,
        prompt_bound=prompt_bound,
        prediction_tokens=prediction_tokens(body.get("prediction")),
        max_tokens=int(max_tokens) if isinstance(max_tokens, int) else None,
        output_field=fields.output_of(body),
        has_images=bool(media),
        has_tools=has_tools,
        tool_history=tool_history,
        choices=requested_choices(body),
        server_tool_blocks=server_tool_blocks(blocks),
        anthropic_only=anthropic_only(sent or {}, blocks),
        anthropic_tools=tools,
        native_tools=native_tools,
        media=media,
        stop_sequences=_stop_count(body.get("stop")),
        sampling=sampling(body),
        turns=sum(1 for m in messages if m.get("role") == "user"),
        score=analysis.score,
        capability=analysis.capability,
        capability_reason=analysis.capability_reason,
        stakes=analysis.stakes,
        stakes_reason=analysis.stakes_reason,
        pii=bool(kinds) or analysis.pii,
        pii_kinds=kinds,
        local_accuracy=analysis.local_accuracy,
        local_profile=analysis.local_profile,
        headers=dict(headers or {}),
        metadata=policy_metadata(body, metadata_keys),
    )


def _stop_count(stop: Any) -> int:
    # A chat request's ``stop``: one sequence as a string, or a list of them.
    if isinstance(stop, str):
        return 1
    return len(stop) if isinstance(stop, list) else 0


def server_tool_blocks(blocks: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """The types of the server-tool blocks (schemas.SERVER_TOOL_BLOCKS) among ``blocks``, a
    front's native request's (:func:`native_blocks`), sorted: the chat translation has dropped
    them."""
    found = {block.get("type") for block in blocks}
    return tuple(sorted(SERVER_TOOL_BLOCKS.intersection(found)))


def anthropic_only(sent: Mapping[str, Any], blocks: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """What of the Messages request ``sent`` (a front's native request; ``blocks``, its
    :func:`native_blocks`) only a Claude reached over Anthropic's own API takes, besides
    server-tool blocks: ``documents by URL`` (the chat translation sends one as an image),
    ``citations`` asked of a document or search result (a chat model gives none), and the
    server-side fields it sets (schemas.ANTHROPIC_SERVER_FIELDS; one sent as null asks for
    nothing, as clients that serialise unset fields send it). A Responses request (no
    ``messages``) has none."""
    if not isinstance(sent.get("messages"), list):
        return ()
    by_url = any(_by_url(b) for b in blocks)
    # A document's or search result's ``{"enabled": true}``; an answer's text block replayed
    # in the history carries its citations as a list, which asks for none.
    cited = any(
        isinstance(c := b.get("citations"), Mapping) and c.get("enabled") is True for b in blocks
    )
    named = ["documents by URL"] if by_url else []
    named += ["citations"] if cited else []
    return (*named, *(name for name in ANTHROPIC_SERVER_FIELDS if sent.get(name) is not None))


#: The type prefixes of Anthropic's own tools that litellm's chat translation passes on to a
#: Claude as sent (its ``ANTHROPIC_HOSTED_TOOLS``, web search aside).
CARRIED_TOOLS = ("bash", "text_editor", "code_execution", "web_fetch", "memory", "tool_search_tool")
#: What a web search tool may hold for litellm's translation to pass it on whole: it rebuilds
#: any as a bare ``web_search_20250305``, without ``max_uses``, domains or ``user_location``
#: (``cache_control`` says how a Claude is run, not what it answers).
CARRIED_WEB_SEARCH = frozenset({"type", "name", "cache_control"})


def anthropic_tools(sent: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The types of Anthropic's own tools the Messages request ``sent`` offers, sorted, and
    those of them litellm's chat translation does not pass on to a Claude whole: a web search
    with settings or of another version, the computer tool (sent as a client tool with no
    schema) and any type it does not know. A tool named ``web_search`` without a schema is
    a web search to that translation. A Responses request (no ``messages``) has none."""
    tools = sent.get("tools") if isinstance(sent.get("messages"), list) else None
    if not isinstance(tools, list) or not tools:
        return (), ()
    found: set[str] = set()
    lost: set[str] = set()
    for tool in tools:
        kind = _tool_type(tool) if isinstance(tool, Mapping) else None
        if kind is None:
            continue
        found.add(kind)
        if not _carried(kind, tool):
            lost.add(kind)
    return tuple(sorted(found)), tuple(sorted(lost))


def _carried(kind: str, tool: Mapping[str, Any]) -> bool:
    # Whether litellm's chat translation passes the tool of type ``kind`` on to a Claude whole.
    if kind.startswith("web_search"):
        return kind in ("web_search", "web_search_20250305") and set(tool) <= CARRIED_WEB_SEARCH
    return kind.startswith(CARRIED_TOOLS)


def _tool_type(tool: Mapping[str, Any]) -> str | None:
    # The type of a tool of Anthropic's own, or None for a client tool (type ``custom`` or
    # none; ``function``, an OpenAI tool litellm's adapter takes as one). That adapter reads a
    # tool named web_search with no schema as Anthropic's web search.
    kind = tool.get("type")
    if isinstance(kind, str) and kind not in ("custom", "function"):
        return kind
    return "web_search" if tool.get("name") == "web_search" and "input_schema" not in tool else None


def cache_lifetime(*requests: Mapping[str, Any]) -> str | None:
    """The longest lifetime the ``requests`` (a chat request, its front's native one) ask a
    provider's prompt cache to keep their prompt: ``1h`` where a ``cache_control`` says
    ``ttl: 1h``, else ``5m`` where any is set (Anthropic's default), else None. Anthropic bills
    the prompt it writes at 1.25 times the input price, twice for an hour. Read only where
    Anthropic and litellm's translation take one (the request, its system blocks, tools,
    messages, their parts and a tool result's blocks), with no ABC checks: a few microseconds
    for a short request."""
    marks: list[Any] = []
    for request in requests:
        marks.append(request.get("cache_control"))
        for key in ("system", "tools"):
            value = request.get(key)
            if isinstance(value, list):
                marks += [p.get("cache_control") for p in value if isinstance(p, dict)]
        for message in request.get("messages") or ():
            if not isinstance(message, dict):
                continue
            marks.append(message.get("cache_control"))
            content = message.get("content")
            for part in content if isinstance(content, list) else ():
                if isinstance(part, dict):
                    marks.append(part.get("cache_control"))
                    inner = part.get("content")  # a tool result's blocks
                    if isinstance(inner, list):
                        marks += [b.get("cache_control") for b in inner if isinstance(b, dict)]
    asked = [mark for mark in marks if isinstance(mark, dict)]
    if not asked:
        return None
    return "1h" if any(mark.get("ttl") == "1h" for mark in asked) else "5m"


def native_blocks(sent: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """The content blocks of a native Messages request ``sent``, and those of its tool
    results: what :func:`server_tool_blocks` and :func:`anthropic_only` read, in one pass."""
    for message in sent.get("messages") or ():
        content = message.get("content") if isinstance(message, Mapping) else None
        for block in content if isinstance(content, list) else ():
            if not isinstance(block, Mapping):
                continue
            yield block
            inner = block.get("content") if block.get("type") == "tool_result" else None
            if isinstance(inner, list):
                yield from (b for b in inner if isinstance(b, Mapping))


def media_kinds(messages: list[Mapping[str, Any]]) -> tuple[str, ...]:
    """The kinds of the non-text parts of chat ``messages``, sorted: ``documents`` for a PDF
    (a ``file`` part, or an image part of a PDF's data URL), ``images`` for any other."""
    kinds = {
        "documents" if _is_document(part) else "images"
        for message in messages
        if isinstance(message.get("content"), list)
        for part in message["content"]
        if isinstance(part, Mapping) and part.get("type") not in (None, "text")
    }
    return tuple(sorted(kinds))


def _is_document(part: Mapping[str, Any]) -> bool:
    url = (part.get("image_url") or {}) if part.get("type") == "image_url" else {}
    pdf = isinstance(url, Mapping) and str(url.get("url", "")).startswith("data:application/pdf")
    return part.get("type") == "file" or pdf


def policy_metadata(body: Mapping[str, Any], keys: Collection[str] | None) -> dict[str, Any]:
    """The request's top-level ``metadata`` fields named in ``keys`` (None: all of them), as
    the policy sees them."""
    metadata = body.get("metadata")
    if not isinstance(metadata, Mapping):
        return {}
    return {k: v for k, v in metadata.items() if keys is None or k in keys}
