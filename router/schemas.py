"""Wire models: what Tiergate accepts on ``/v1/*``.

The chat request is validated for the fields Tiergate reads or must check, and keeps every other
field (``extra="allow"``) so that it passes through to the backend without loss. Responses are
the backends' OpenAI-shaped dicts and are not re-modelled.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

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
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None


class FeedbackRequest(BaseModel):
    """A quality signal about one earlier request (``POST /v1/feedback``)."""

    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128)
    score: float | None = Field(None, ge=0, le=1)
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
