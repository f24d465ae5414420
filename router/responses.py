"""The OpenAI Responses front: ``POST /v1/responses``, stateless.

A Responses request becomes Tiergate's chat request (:func:`to_chat`), is routed and served like
any chat request, and its chat answer or chunk stream becomes a Response (:func:`answer`) or
the Responses event stream (:func:`events`). Both directions are litellm's Responses-to-chat
transformation, the one litellm's ``responses()`` uses for providers without a Responses API,
imported on first use. An answer the provider gave natively (:mod:`router.backends.native`) is
sent as it came.

Nothing is stored: ``store: true``, ``previous_response_id`` and ``conversation`` are refused with
a 400 that says so, and a native call is made with ``store: false``.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from router.backends.native import NATIVE, NativeRequest, native_or
from router.errors import BadRequestError, TiergateError

STATELESS = (
    "Tiergate's /v1/responses is stateless: send the whole conversation in 'input' "
    "(and 'store': false or no 'store')"
)
# Request fields that are not the Responses request's optional parameters in litellm's sense.
_NOT_PARAMS = ("model", "input", "stream")
#: The fields the translation gives an assistant turn from a ``reasoning`` item (its summary as
#: ``reasoning_content``; ``thinking_blocks`` from what litellm encrypted): a model that cannot
#: take them goes without (``Call.optional``).
OPTIONAL = frozenset({"messages.thinking_blocks", "messages.reasoning_content"})


@dataclass(frozen=True, slots=True)
class Translation:
    """What turning the chat answer back needs: the request's input and parameters (a Response
    echoes them) and the id the Response is given."""

    input: str | list[Any]
    params: dict[str, Any]
    response_id: str


def refuse_state(body: Mapping[str, Any]) -> None:
    """400 for what would need stored responses or a stored conversation."""
    for param in ("previous_response_id", "conversation"):
        if body.get(param) is not None:
            raise BadRequestError(STATELESS, param=param)
    if body.get("store") is True:
        raise BadRequestError(STATELESS, param="store")


def _config() -> Any:
    from router.backends.closed import quiet_litellm

    quiet_litellm()
    from litellm.responses.litellm_completion_transformation.transformation import (
        LiteLLMCompletionResponsesConfig,
    )

    return LiteLLMCompletionResponsesConfig


def to_chat(body: Mapping[str, Any], request_id: str) -> tuple[dict[str, Any], Translation]:
    """The chat request for a validated Responses request.

    ``metadata`` is kept whole, as on the chat front, so the policy can read it; it is not
    sent to a provider.
    """
    refuse_state(body)
    params = {k: v for k, v in body.items() if k not in _NOT_PARAMS and v is not None}
    try:
        chat: dict[str, Any] = _config().transform_responses_api_request_to_chat_completion_request(
            model=body["model"],
            input=body["input"],
            responses_api_request=params,
            stream=bool(body.get("stream")),
        )
    except Exception as exc:  # the library's errors on a request it cannot read: a 400
        raise BadRequestError(f"cannot translate the request: {exc}") from exc
    if not body.get("stream"):
        chat.pop("stream", None)
    if body.get("metadata") is not None:
        chat["metadata"] = body["metadata"]
    response_id = "resp_" + request_id.removeprefix("req_")
    return chat, Translation(body["input"], params, response_id)


def native(body: Mapping[str, Any], headers: Mapping[str, str]) -> NativeRequest:
    """The request as sent, for an OpenAI model reached over its own Responses API.

    A ``reasoning`` item without ``encrypted_content`` names an item stored at OpenAI, which
    the call, made with ``store: false``, cannot read (OpenAI answers 404 and says to remove
    it): it is left out.
    """
    items = body["input"]
    if isinstance(items, list) and any(_stored_reasoning(item) for item in items):
        body = {**body, "input": [item for item in items if not _stored_reasoning(item)]}
    return NativeRequest("responses", body)


def _stored_reasoning(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and item.get("type") == "reasoning"
        and not item.get("encrypted_content")
    )


def answer(chat: Mapping[str, Any], translation: Translation) -> dict[str, Any]:
    """The Response for a chat answer (or the provider's own, passed through)."""
    if NATIVE in chat:
        passed: dict[str, Any] = chat[NATIVE]
        return passed
    response = _config().transform_chat_completion_response_to_responses_api_response(
        request_input=translation.input,
        responses_api_request=translation.params,
        chat_completion_response=dict(chat),
    )
    out: dict[str, Any] = response.model_dump(mode="json", exclude_none=True)
    out["id"] = translation.response_id
    _complete_usage(out)
    return out


def _complete_usage(response: dict[str, Any]) -> None:
    """Give a Response's usage the token details OpenAI always sends.

    litellm fills them only from the chat answer's own details, which the local model has not:
    clients read ``usage.input_tokens_details.cached_tokens`` (the Agents SDK copies both into
    its usage), and met None.
    """
    usage = response.get("usage")
    if isinstance(usage, dict):
        usage.setdefault("input_tokens_details", {"cached_tokens": 0})
        usage.setdefault("output_tokens_details", {"reasoning_tokens": 0})


class _Chunks:
    """A chat chunk stream as the litellm stream wrapper its Responses iterator reads."""

    logging_obj = None

    def __init__(self, first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]]):
        self._first = first
        self._rest = rest

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> Any:
        from litellm.types.utils import ModelResponseStream

        chunk, self._first = self._first, None
        if chunk is None:
            chunk = await anext(self._rest)
        return ModelResponseStream(**chunk)

    async def aclose(self) -> None:
        pass  # the caller closes the chunk stream


def events(
    chunks: AsyncGenerator[dict[str, Any], None], translation: Translation, prompt_tokens: int = 0
) -> AsyncGenerator[dict[str, Any], None]:
    """The Responses events for a chat chunk stream (or the provider's own events).

    ``prompt_tokens`` is not read: a Response has no usage until ``response.completed``.
    Closing this closes ``chunks``.
    """

    async def translate(
        first: dict[str, Any] | None, rest: AsyncIterator[dict[str, Any]]
    ) -> AsyncIterator[dict[str, Any]]:
        _config()  # litellm, quietened, before its streaming module
        from litellm.responses.litellm_completion_transformation.streaming_iterator import (
            LiteLLMCompletionStreamingIterator,
        )

        iterator = LiteLLMCompletionStreamingIterator(
            model=str((first or {}).get("model", "")),
            litellm_custom_stream_wrapper=_Chunks(first, rest),
            request_input=translation.input,
            responses_api_request=translation.params,  # type: ignore[arg-type]
        )
        async for event in iterator:
            out: dict[str, Any] = event.model_dump(mode="json", exclude_none=True)
            response = out.get("response")
            if isinstance(response, dict):
                response["id"] = translation.response_id
                _complete_usage(response)
            yield out

    return native_or(chunks, translate)


def error_event(exc: TiergateError, previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A failure after the stream began, as the Responses ``error`` event: numbered after
    ``previous``, the last event the stream sent (0 when it sent none), as OpenAI numbers every
    event of a stream (its SDKs read ``sequence_number`` to order and resume them)."""
    number = previous.get("sequence_number") if previous is not None else None
    return {
        "type": "error",
        "code": exc.code,
        "message": exc.message,
        "param": exc.param,
        "sequence_number": number + 1 if isinstance(number, int) else 0,
    }
