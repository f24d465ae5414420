"""Wire models: what Tiergate accepts on ``/v1/*``.

The chat request is validated for the fields Tiergate reads or must check, and keeps every other
field (``extra="allow"``) so that it passes through to the backend without loss. Responses are
the backends' OpenAI-shaped dicts and are not re-modelled.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema

# The body is passed on as the client sent it, so a value must already have the type the
# backends take: "100" or 100.0 for max_tokens would pass a lax check, skip the cap and reach
# llama.cpp as the wrong type. Numbers and flags are therefore checked strictly.
StrictInt = Annotated[int, Field(strict=True)]
Number = Annotated[float, Field(strict=True)]  # strict float still takes an int
Flag = Annotated[bool, Field(strict=True)]
TokenId = Annotated[str, Field(pattern=r"^[0-9]{1,9}$")]


class Message(BaseModel):
    """One chat message. ``content`` is a string, a content-part array, or null (tool calls)."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_unless_assistant(self) -> Message:
        """Only an assistant message (a tool call, audio, a refusal) may leave ``content`` null;
        a null prompt is refused here rather than failing inside a chat template."""
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required in a {self.role} message")
        return self


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    model_config = ConfigDict(extra="allow")

    include_usage: Flag = False


class FunctionSpec(BaseModel):
    """A function tool's ``function``: the name is what the model calls it by."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: Flag | None = None


class ChatTool(BaseModel):
    """One entry of ``tools``. A function tool is checked here, since a provider's library
    fails on one without its ``function`` (a 502 for a malformed request); tools of other
    types (``custom``, a provider's own) pass through as sent."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(min_length=1)
    function: FunctionSpec | None = None

    @model_validator(mode="after")
    def _function_given(self) -> ChatTool:
        if self.type == "function" and self.function is None:
            raise ValueError("a function tool needs its function (a name, and parameters)")
        return self


class JsonSchemaSpec(BaseModel):
    """``response_format.json_schema``: OpenAI requires its ``name``."""

    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1)
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: Flag | None = None


class ResponseFormat(BaseModel):
    """``response_format``. A ``json_schema`` one must carry its schema's spec: without it
    the local model ignored the request for JSON and a library behind a closed model failed
    (502). Other types (``text``, ``json_object``, a server's own) are each backend's to
    honour or refuse."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(min_length=1)
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _spec_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("a json_schema response_format needs its json_schema (a name)")
        return self


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request. Unknown fields are kept and passed through."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    stream: Flag = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = Field(None, ge=1, le=16)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, ge=0, le=1)
    presence_penalty: Number | None = Field(None, ge=-2, le=2)
    frequency_penalty: Number | None = Field(None, ge=-2, le=2)
    logit_bias: dict[TokenId, Annotated[Number, Field(ge=-100, le=100)]] | None = None
    logprobs: Flag | None = None
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    stop: str | list[str] | None = None
    seed: StrictInt | None = None
    tools: list[ChatTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    metadata: dict[str, Any] | None = None


# -- Anthropic Messages (``POST /v1/messages``) -----------------------------------------------
# Blocks are checked for the fields the translation reads; others (``cache_control``, citations)
# are kept and passed on.


class _Block(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextBlock(_Block):
    """A text content block."""

    type: Literal["text"]
    text: str


class ImageSource(_Block):
    """An image given inline (base64) or by URL."""

    type: Literal["base64", "url"]
    media_type: str | None = None
    data: str | None = None
    url: str | None = None

    @model_validator(mode="after")
    def _payload(self) -> ImageSource:
        if (self.data if self.type == "base64" else self.url) is None:
            raise ValueError(f"an image source of type {self.type!r} needs its payload")
        return self


class ImageBlock(_Block):
    """An image content block."""

    type: Literal["image"]
    source: ImageSource


#: Where each kind of document source carries its document.
_DOCUMENT_PAYLOAD = {
    "base64": "data",
    "text": "data",
    "url": "url",
    "content": "content",
}


class DocumentSource(_Block):
    """A document given inline (a base64 PDF, plain text, content blocks) or by URL. One of
    Anthropic's Files API (``file``) is refused: Tiergate serves no Files API, a file another
    key uploaded cannot be read with Tiergate's, and litellm's translation dropped it."""

    type: Literal["base64", "text", "url", "content", "file"]

    @model_validator(mode="after")
    def _payload(self) -> DocumentSource:
        if self.type == "file":
            raise ValueError(
                "a document of Anthropic's Files API cannot be served (Tiergate has no Files "
                "API): send it inline (base64, text) or by url"
            )
        field = _DOCUMENT_PAYLOAD[self.type]
        if (self.model_extra or {}).get(field) is None:
            raise ValueError(f"a document source of type {self.type!r} needs its {field}")
        return self


class DocumentBlock(_Block):
    """A document (a PDF, plain text) content block."""

    type: Literal["document"]
    source: DocumentSource
    title: str | None = None


class SearchResultBlock(_Block):
    """A search result (a passage an app retrieved), which a Claude may cite."""

    type: Literal["search_result"]
    source: str
    title: str
    content: list[TextBlock]


class ToolUseBlock(_Block):
    """The assistant's call of a tool."""

    type: Literal["tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ToolResultBlock(_Block):
    """What a tool returned, sent back in a user turn."""

    type: Literal["tool_result"]
    tool_use_id: str = Field(min_length=1)
    content: (
        str
        | list[
            Annotated[
                TextBlock | ImageBlock | DocumentBlock | SearchResultBlock,
                Field(discriminator="type"),
            ]
        ]
    ) = ""
    is_error: Flag | None = None


class ThinkingBlock(_Block):
    """Extended thinking an assistant turn carries back."""

    type: Literal["thinking", "redacted_thinking"]


class ServerToolUseBlock(_Block):
    """A Claude's call of a tool Anthropic runs (web search, web fetch, code execution, tool
    search; an MCP server's tool), which an assistant turn carries back."""

    type: Literal["server_tool_use", "mcp_tool_use"]
    id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    input: dict[str, Any]


class ServerToolResultBlock(_Block):
    """What a tool Anthropic runs returned, in the assistant turn that called it; its
    ``content`` is the tool's own shape, passed on as it is."""

    type: Literal[
        "web_search_tool_result",
        "web_fetch_tool_result",
        "code_execution_tool_result",
        "bash_code_execution_tool_result",
        "text_editor_code_execution_tool_result",
        "tool_search_tool_result",
        "mcp_tool_result",
    ]
    tool_use_id: str = Field(min_length=1)
    content: Any


class ContainerUploadBlock(_Block):
    """A file (of Anthropic's Files API) for code execution's container."""

    type: Literal["container_upload"]
    file_id: str = Field(min_length=1)


#: The blocks of Anthropic's server tools, which only a Claude reached over Anthropic's own
#: API takes (the chat translation drops them): a request with one is routed to such a model
#: alone (``Signals.server_tool_blocks``).
SERVER_TOOL_BLOCKS = frozenset(
    name
    for block in (ServerToolUseBlock, ServerToolResultBlock, ContainerUploadBlock)
    for name in get_args(block.model_fields["type"].annotation)
)
#: Anthropic's server-side features a Messages request sets at its top level, which only a
#: Claude reached over Anthropic's own API serves (``Signals.anthropic_only``).
ANTHROPIC_SERVER_FIELDS = ("mcp_servers", "container", "context_management")

ContentBlock = Annotated[
    TextBlock
    | ImageBlock
    | DocumentBlock
    | SearchResultBlock
    | ToolUseBlock
    | ToolResultBlock
    | ThinkingBlock
    | ServerToolUseBlock
    | ServerToolResultBlock
    | ContainerUploadBlock,
    Field(discriminator="type"),
]


class AnthropicMessage(BaseModel):
    """One turn of an Anthropic conversation."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str | list[ContentBlock]


class AnthropicTool(_Block):
    """A client tool (``input_schema``); server tools carry a ``type`` and no schema."""

    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None


class AnthropicToolChoice(_Block):
    """``auto``, ``any``, ``none``, or one named ``tool``."""

    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: Flag | None = None

    @model_validator(mode="after")
    def _names_its_tool(self) -> AnthropicToolChoice:
        # Unnamed, the translation asked the provider for a function called "".
        if self.type == "tool" and not self.name:
            raise ValueError("a tool_choice of type 'tool' needs the tool's name")
        return self


class _AnthropicBody(BaseModel):
    """What a request of Anthropic's API refuses that an OpenAI client may send."""

    #: OpenAI's chat field, refused (:meth:`_not_anthropics`); not in the published schema.
    web_search_options: SkipJsonSchema[Any] = None

    @field_validator("web_search_options")
    @classmethod
    def _not_anthropics(cls, value: Any) -> Any:
        # Anthropic refuses a field it does not know ("Extra inputs are not permitted"), and
        # no routing check reads this one: a Claude was sent it, another model refused it.
        raise ValueError(
            "not part of Anthropic's Messages API (it is OpenAI's chat field): ask for a web "
            'search with Anthropic\'s web search tool, {"type": "web_search_20250305", '
            '"name": "web_search"}'
        )


class MessagesRequest(_AnthropicBody):
    """Anthropic's Messages request. ``max_tokens`` is required, as Anthropic requires it."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    max_tokens: StrictInt = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    stream: Flag = False
    temperature: Number | None = Field(None, ge=0, le=1)
    top_p: Number | None = Field(None, ge=0, le=1)
    top_k: StrictInt | None = Field(None, ge=0)
    tools: list[AnthropicTool] | None = None
    tool_choice: AnthropicToolChoice | None = None
    metadata: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


class CountTokensRequest(_AnthropicBody):
    """``POST /v1/messages/count_tokens``: a Messages request without ``max_tokens``, refused
    what the Messages request refuses (Anthropic's count_tokens takes the same fields)."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[TextBlock] | None = None
    tools: list[AnthropicTool] | None = None


# -- OpenAI Responses (``POST /v1/responses``) -------------------------------------------------


class InputText(_Block):
    """Text in a Responses message (``output_text`` in an assistant turn sent back)."""

    type: Literal["input_text", "output_text"]
    text: str


class InputImage(_Block):
    """An image in a Responses message, by URL (``data:`` URLs included)."""

    type: Literal["input_image"]
    image_url: str
    detail: Literal["auto", "low", "high"] | None = None


class InputMessage(_Block):
    """A message item; ``type`` may be left out."""

    type: Literal["message"] | None = None
    role: Literal["user", "assistant", "system", "developer"]
    content: str | list[Annotated[InputText | InputImage, Field(discriminator="type")]]


class FunctionCallItem(_Block):
    """The model's call of a function tool, sent back in a later turn."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutputItem(_Block):
    """A function tool's result: text, or text and image parts (a screenshot tool's)."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[Annotated[InputText | InputImage, Field(discriminator="type")]]


class ReasoningItem(_Block):
    """A reasoning model's reasoning, sent back in a later turn (the Agents SDK does): its
    summary, and ``encrypted_content`` when the client asked for it (``include``)."""

    type: Literal["reasoning"]
    summary: list[dict[str, Any]] = Field(default_factory=list)
    encrypted_content: str | None = None


def _item_type(item: Any) -> str:
    # A message item may leave its type out.
    kind = item.get("type") if isinstance(item, dict) else getattr(item, "type", None)
    return str(kind or "message")


#: A Responses input item, told apart by its ``type``: an unknown type is refused as such, and
#: a known one is checked against its own fields only.
InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCallItem, Tag("function_call")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output")]
    | Annotated[ReasoningItem, Tag("reasoning")],
    Discriminator(
        _item_type,
        custom_error_type="invalid_item_type",
        custom_error_message=(
            "Tiergate's /v1/responses takes input items of type 'message', 'function_call', "
            "'function_call_output' and 'reasoning'"
        ),
    ),
]


class FunctionTool(_Block):
    """A function tool; Tiergate serves no hosted tools (web or file search)."""

    type: Literal["function"]
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: Flag | None = None


class TextFormat(_Block):
    """``text.format``: plain text, any JSON object, or JSON matching a schema."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: Flag | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> TextFormat:
        if self.type == "json_schema" and (self.schema_ is None or not self.name):
            raise ValueError("a json_schema format needs a name and a schema")
        return self


class TextConfig(_Block):
    """``text``: the output format."""

    format: TextFormat | None = None


class ResponsesRequest(BaseModel):
    """OpenAI's Responses request, stateless: ``store``, ``previous_response_id`` and
    ``conversation`` are refused by the endpoint rather than here, so the client reads why."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: TextConfig | None = None
    max_output_tokens: StrictInt | None = Field(None, ge=1)
    temperature: Number | None = Field(None, ge=0, le=2)
    top_p: Number | None = Field(None, ge=0, le=1)
    stream: Flag = False
    store: Flag | None = None
    previous_response_id: str | None = None
    parallel_tool_calls: Flag | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None


#: The chat request's fields that bound the answer's length.
OUTPUT_FIELDS = ("max_tokens", "max_completion_tokens")


@dataclass(frozen=True, slots=True)
class FrontFields:
    """What a front calls the chat request's fields that a refusal names: the one that bounds
    the answer's length, the one that holds the prompt and the stop sequences. A front's
    request is served as a chat request; its errors must name the field its client sent, not
    the chat one."""

    #: The front's output limit; None on chat, which has two (:data:`OUTPUT_FIELDS`).
    output: str | None = None
    prompt: str = "messages"
    stop: str = "stop"

    def name(self, chat_field: str) -> str:
        """``chat_field`` as this front calls it (any field but these keeps its name)."""
        if chat_field in OUTPUT_FIELDS:
            return self.output or chat_field
        if chat_field == "stop":
            return self.stop
        return self.prompt if chat_field == "messages" else chat_field

    def output_of(self, body: Mapping[str, Any]) -> str:
        """The field that bounds the answer of the chat request ``body`` as its client sent
        it: on chat ``max_completion_tokens`` where it is set (it is the one read), else
        ``max_tokens``."""
        sent = "max_completion_tokens" if body.get("max_completion_tokens") is not None else ""
        return self.name(sent or "max_tokens")

    def named(self, chat_field: str, body: Mapping[str, Any]) -> str:
        """``chat_field`` as the client of the chat request ``body`` calls it: the output limit
        as it sent it (:meth:`output_of`), any other field as :meth:`name` gives it."""
        return self.output_of(body) if chat_field in OUTPUT_FIELDS else self.name(chat_field)


CHAT_FIELDS = FrontFields()
#: Each front's names, by its name (``Call.front``, the outcome record's ``front``).
FRONT_FIELDS: Mapping[str, FrontFields] = {
    "chat": CHAT_FIELDS,
    # Anthropic's output limit, which it requires, and its stop sequences.
    "messages": FrontFields(output="max_tokens", stop="stop_sequences"),
    "responses": FrontFields(output="max_output_tokens", prompt="input"),
}


def front_fields(front: str) -> FrontFields:
    """The field names of the front called ``front`` (chat's for a name it does not know)."""
    return FRONT_FIELDS.get(front, CHAT_FIELDS)


class FeedbackRequest(BaseModel):
    """A quality signal about one earlier request (``POST /v1/feedback``)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128)
    score: Annotated[float, Strict()] | None = Field(None, ge=0, le=1)  # a number, not "0.5"
    thumbs: Literal["up", "down"] | None = None
    comment: str | None = Field(None, max_length=2000)


def inline_json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` inlined, for an OpenAPI ``requestBody``.

    The chat handler reads the raw body (to pass unknown fields through), so FastAPI cannot see
    the model; this puts it in the OpenAPI document for clients and schema-based fuzzers.
    """
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def json_request_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` declaring ``model`` as a route's required JSON body."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline_json_schema(model)}},
        }
    }
