"""Wire models: the chat request keeps unknown fields for the backend, checks numbers strictly,
refuses a null prompt, and its schema reaches the OpenAPI document with nothing left to resolve."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from router.schemas import ChatCompletionRequest, FeedbackRequest, inline_json_schema

USER = [{"role": "user", "content": "hi"}]


def test_unknown_fields_pass_through_untouched() -> None:
    body = {"model": "auto", "messages": USER, "reasoning_effort": "low", "x_vendor": {"a": 1}}
    parsed = ChatCompletionRequest.model_validate(body)
    dumped = parsed.model_dump(exclude_unset=True)
    assert dumped["reasoning_effort"] == "low" and dumped["x_vendor"] == {"a": 1}


@pytest.mark.parametrize(
    "extra",
    [
        {"max_tokens": "100"},
        {"max_tokens": 100.0},
        {"max_tokens": 0},
        {"stream": "true"},
        {"temperature": "0.5"},
        {"logit_bias": {"hello": 1}},
        {"n": 17},
    ],
)
def test_numbers_and_flags_are_checked_strictly(extra: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "auto", "messages": USER, **extra})


def test_only_an_assistant_message_may_leave_content_null() -> None:
    tool_call = {"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}
    ChatCompletionRequest.model_validate({"model": "m", "messages": [*USER, tool_call]})
    with pytest.raises(ValidationError, match="content is required in a user message"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user"}]})
    with pytest.raises(ValidationError):
        ChatCompletionRequest.model_validate({"model": "m", "messages": []})


def test_feedback_refuses_fields_it_does_not_know() -> None:
    assert FeedbackRequest(request_id="r1", thumbs="up").thumbs == "up"
    with pytest.raises(ValidationError):
        FeedbackRequest.model_validate({"request_id": "r1", "stars": 5})


def test_the_inlined_schema_has_no_references_left() -> None:
    schema = inline_json_schema(ChatCompletionRequest)
    text = json.dumps(schema)
    assert "$ref" not in text and "$defs" not in text
    assert "role" in json.dumps(schema["properties"]["messages"])
