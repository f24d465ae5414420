"""The HTTP surface: the ``/v1/*`` endpoints (OpenAI chat, Anthropic Messages, OpenAI
Responses) plus health and readiness.

The HTTP layer parses, applies the size caps, frames and sets headers; everything else about a
request (deciding, serving, recording) is :meth:`~router.gateway.Gateway.serve`'s. A front
turns its request into a :class:`~router.gateway.Call` with :func:`call_of` and frames what the
gateway answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Generic, TypeVar

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from router import messages, responses
from router.auth import Principal, check_record_access, principal_of
from router.backends.native import NativeRequest
from router.calibration import AliasThreshold
from router.errors import (
    MESSAGES_PATH,
    BadRequestError,
    ClientDisconnected,
    TiergateError,
    UnsupportedEncodingError,
)
from router.gateway import (
    NO_CLOSED_FALLBACK,
    Call,
    StreamAnswer,
    new_request_id,
    refuse_unknown_model,
    unknown_model,
)
from router.limits import check_request_size
from router.policy import POLICY_HEADER_PREFIX, Policy
from router.schemas import (
    ChatCompletionRequest,
    CountTokensRequest,
    FeedbackRequest,
    MessagesRequest,
    ResponsesRequest,
    front_fields,
    json_request_body,
)
from router.services import Services, services

_Model = TypeVar("_Model", bound=BaseModel)
_Tr = TypeVar("_Tr")
_T = TypeVar("_T")
log = logging.getLogger("tiergate.api")
router = APIRouter()


def _dumps(data: Any) -> bytes:
    """``data`` as compact UTF-8 JSON for the client (:func:`client_utf8`). A number that is
    not finite (a provider's ``NaN`` log-probability, which Python's json reads; an ``NaN``
    in an evaluation report) is written as null: ``NaN`` and ``Infinity`` are not JSON, and a
    browser's or a strict client's parser refuses the whole answer for one."""
    try:
        text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:  # a number that is not finite, somewhere: rare, walked only then
        text = json.dumps(finite(data), separators=(",", ":"), ensure_ascii=False)
    return client_utf8(text)


def finite(data: Any) -> Any:
    """``data`` with each float that is not finite made None, JSON's null: ``NaN`` and
    ``Infinity``, which Python's json writes, are not JSON (:func:`_dumps`; ``tiergate eval
    --json``)."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {key: finite(value) for key, value in data.items()}
    if isinstance(data, list | tuple):
        return [finite(value) for value in data]
    return data


def client_utf8(text: str) -> bytes:
    """``text`` as UTF-8 for the client. A lone surrogate, which a provider's text may escape
    (``"\\ud83d"``: half an emoji), has no UTF-8 form: it is written as U+FFFD, as one in a
    request is read (:func:`parse_json`), not failed as a 500."""
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text).encode()


class ClientJSON(JSONResponse):
    """A JSON response written as :func:`_dumps` writes an answer: an error's message may quote
    a provider's, lone surrogate and all, and ``/readyz`` and the dashboard show paths, which
    hold one where a file name is not UTF-8."""

    def render(self, content: Any) -> bytes:
        return _dumps(content)


# Deeper JSON is refused: no chat request needs it, and deeper structures would meet Python's
# recursion limit in whatever walks them next (validation, PII scanning, the encoder).
MAX_JSON_DEPTH = 64
_SURROGATE = re.compile("[\ud800-\udfff]")
# How a lone surrogate can reach a parsed string: a \uD800-\uDFFF escape, or its
# UTF-8 form (json.loads decodes bytes with ``surrogatepass``). A UTF-8 body without either
# has none; one in UTF-16 or UTF-32, which json.loads reads too, is checked whole.
_SURROGATE_BYTES = re.compile(rb"\\u[dD][89abcdefABCDEF]|\xed[\xa0-\xbf]")
#: A body longer than this is parsed and checked on a worker thread (off_loop_when_large).
OFFLOAD_BODY_BYTES = 64 * 1024


async def read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object (:func:`parse_json`), parsed on a worker thread when
    it is large (:func:`off_loop_when_large`)."""
    raw = await read_body(request)
    return await off_loop_when_large(raw, functools.partial(parse_json, raw))


async def read_body(request: Request) -> bytes:
    """The request's body, or :class:`ClientDisconnected` (recorded ``aborted``, 499) when the
    client leaves before all of it has arrived: a client that goes is not a server fault. A
    compressed body is refused (415): decoding one would let a small request expand past the
    size cap."""
    encoding = request.headers.get("content-encoding", "").strip().lower()
    if encoding not in ("", "identity"):
        raise UnsupportedEncodingError(
            f"Content-Encoding {encoding!r} is not supported: send the body uncompressed"
        )
    try:
        return await request.body()
    except ClientDisconnect as exc:
        raise ClientDisconnected("the client left before its request had arrived") from exc


async def off_loop_when_large(raw: bytes, work: Callable[[], _T]) -> _T:
    """``work()``, on a worker thread when the body ``raw`` is over :data:`OFFLOAD_BODY_BYTES`.

    Parsing and checking a body near the size cap is CPU work that grows with the number of
    values in it: eight MiB of ``[1,1,...]`` costs seconds, during which the event loop would
    answer nothing else (not even ``/healthz``)."""
    if len(raw) > OFFLOAD_BODY_BYTES:
        return await asyncio.to_thread(work)
    return work()


def parse_json(raw: bytes) -> dict[str, Any]:
    """``raw`` as a JSON object, or a 400 naming what is wrong with it.

    Lone surrogates (``"\\ud800"``, in values and keys, at any depth) are replaced by U+FFFD
    rather than refused. Such a string cannot be encoded as UTF-8, so it would fail at the
    provider, in the outcome store or in a log; replacing it keeps the request (a client that
    cut a UTF-16 string between the two halves of an emoji still gets its answer), as a UTF-8
    decoder, WHATWG's ``TextEncoder`` and Go's ``encoding/json`` do. Nesting deeper than
    :data:`MAX_JSON_DEPTH` is a 400.
    """
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequestError(f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise BadRequestError(_too_deep()) from exc
    if not isinstance(body, dict):
        raise BadRequestError("request body must be a JSON object")
    utf8 = json.detect_encoding(raw) == "utf-8"
    _clean(body, surrogates=not utf8 or _SURROGATE_BYTES.search(raw) is not None)
    return body


def _too_deep() -> str:
    return f"request body is nested more than {MAX_JSON_DEPTH} levels deep"


def _clean_text(text: str) -> str:
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def _clean(body: dict[str, Any], *, surrogates: bool) -> None:
    """Replace lone surrogates in ``body`` in place (only where ``surrogates``: the raw body
    may hold one), or raise a 400 when it is nested too deep.

    Iterative, so that the depth check itself cannot overflow the stack; only containers go
    on the stack, so a body of millions of numbers or short strings is one pass over each.
    """
    stack: list[tuple[list[Any] | dict[str, Any], int]] = [(body, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            if surrogates and not all(k.isascii() for k in node):
                cleaned = {_clean_text(k): v for k, v in node.items()}
                node.clear()
                node.update(cleaned)
            items: Iterable[tuple[Any, Any]] = node.items()
        else:
            items = enumerate(node)
        for key, value in items:
            kind = type(value)  # json.loads makes exactly these types, never subclasses
            if kind is str:
                if surrogates and not value.isascii():
                    node[key] = _clean_text(value)
            elif kind is list or kind is dict:
                if depth + 1 >= MAX_JSON_DEPTH:
                    raise BadRequestError(_too_deep())
                if value:
                    stack.append((value, depth + 1))


def validate_chat(body: dict[str, Any]) -> None:
    """Check the chat request's shape; the dict itself is passed on unchanged."""
    validated(ChatCompletionRequest, body)


def validated(model: type[_Model], body: dict[str, Any]) -> _Model:
    """``body`` parsed as ``model``, or a 400 naming the invalid field.

    Where a field may take several shapes (a string or a list of blocks), pydantic reports one
    error per shape, the string's first, with the shape's name in the location. The error told
    is the one that reaches deepest into what the client sent, at its path in the request: a
    list item missing ``text`` is ``messages.0.content.0.text: Field required``, not
    ``messages.0.content.str: Input should be a valid string``.
    """
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        located = [(_request_path(body, error["loc"]), error["msg"]) for error in exc.errors()]
        (_, where), message = max(located, key=lambda item: item[0][0])
        raise BadRequestError(f"{where}: {message}", param=where or None) from exc


def _request_path(body: Any, loc: tuple[int | str, ...]) -> tuple[int, str]:
    """How deep ``loc`` reaches into ``body``, and its path there. A missing field at the end
    counts; a union member's name in ``loc`` is not part of the request and is left out."""
    node, parts = body, []
    for i, key in enumerate(loc):
        if _holds(node, key):
            node = node[key]
        elif i < len(loc) - 1 or not isinstance(node, dict):
            continue
        parts.append(str(key))
    return len(parts), ".".join(parts)


def _holds(node: Any, key: int | str) -> bool:
    if isinstance(node, dict):
        return isinstance(key, str) and key in node
    return isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node)


def _policy_headers(request: Request, *, gated: bool = True) -> dict[str, str]:
    """The ``x-tiergate-*`` headers the caller may steer the policy with (``gated=False``: all
    it sent, which may only ever make a request local_only; see Gateway.decide)."""
    allowed = getattr(request.state, "policy_headers", None) if gated else None
    out = {}
    for key, value in request.headers.items():
        if key.startswith(POLICY_HEADER_PREFIX) and (allowed is None or key in allowed):
            out[key] = value
    return out


def _policy_metadata(request: Request) -> frozenset[str] | None:
    """The ``metadata`` keys this caller may steer the policy with (None: all), gated like
    ``x-tiergate-*`` headers (``set_policy_headers``, else the key's ``policy_metadata``)."""
    allowed: frozenset[str] | None = getattr(request.state, "policy_metadata", None)
    return allowed


def _tenant(request: Request) -> str:
    return str(getattr(request.state, "tenant", "default"))


#: A front's translation: (its request, the request id) -> (the chat request, the request as
#: sent for a target that speaks the front's own API, or None).
Translate = Callable[[dict[str, Any], str], tuple[dict[str, Any], NativeRequest | None]]


async def call_of(
    request: Request,
    *,
    front: str,
    translate: Translate | None = None,
) -> Call:
    """``request`` as the gateway serves it: admitted by the rate limiter, read, translated by
    its front (``translate``; none for chat), checked against the chat schema and the size caps.

    A request refused on the way still becomes a :class:`Call`, carrying its refusal, so that
    it is answered and recorded like any other.
    """
    started = time.perf_counter()
    svc = services(request)
    principal = principal_of(request)
    body: dict[str, Any] = {}
    native: NativeRequest | None = None
    refused: BaseException | None = None
    # The id RequestIds (router.app) gave the request: its answer and log lines carry it too.
    request_id = str(getattr(request.state, "request_id", None) or new_request_id())

    def read(raw: bytes) -> None:
        # Parsed, translated and checked in one step, off the event loop for a large body.
        nonlocal body, native
        body = parse_json(raw)
        if translate is not None:
            body, native = translate(body, request_id)
        validate_chat(body)
        check_request_size(body, svc.settings, front_fields(front))

    try:
        await svc.limiter.admit(principal)
        raw = await read_body(request)
        await off_loop_when_large(raw, functools.partial(read, raw))
    except Exception as exc:  # answered and recorded by the gateway, as it was raised
        refused = exc
    except asyncio.CancelledError as exc:
        # Stopped by the server at shutdown while the body arrived: the gateway records it as
        # stopped and raises it again at once, so the cancellation goes on as it would have.
        refused = exc
    return Call(
        body=body,
        principal=principal,
        tenant=_tenant(request),
        front=front,
        policy_headers=_policy_headers(request),
        # All the caller sent, where its key may not set every one (else the same headers).
        sent_policy_headers=(
            None
            if getattr(request.state, "policy_headers", None) is None
            else _policy_headers(request, gated=False)
        ),
        metadata_keys=_policy_metadata(request),
        disconnected=request.is_disconnected,
        native=native,
        refused=refused,
        request_id=request_id,
        started=started,
    )


@router.post("/v1/chat/completions", openapi_extra=json_request_body(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    """OpenAI chat completions, routed. Streams as SSE when ``stream`` is true."""
    call = await call_of(request, front="chat")
    return await _respond(
        request,
        call,
        # Read only once it streams: the body is then valid (a refused one may hold anything).
        lambda answer: _sse(answer, _include_usage(call.body)),
        lambda exc: b"data: " + _dumps(exc.to_body()) + b"\n\n",
    )


def _include_usage(body: Mapping[str, Any]) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


#: What a stream sends when it has had nothing to send for ``stream_keepalive_s``: an SSE
#: comment, which every SSE client skips, so that a proxy does not close the connection as idle.
KEEPALIVE = b": keep-alive\n\n"


async def _respond(
    request: Request,
    call: Call,
    frame: Callable[[StreamAnswer], AsyncGenerator[bytes, None]],
    frame_error: Callable[[TiergateError], bytes],
) -> Response:
    """The gateway's answer to ``call``: its JSON body, or its stream framed by ``frame``.

    With ``stream_keepalive_s`` set, a stream sends :data:`KEEPALIVE` whenever it has had
    nothing to send for that long; one whose first chunk has not come by then starts at once
    (the headers that name the model have not been decided) and ends with ``frame_error`` if
    the request fails after all.
    """
    svc = services(request)
    every = svc.settings.stream_keepalive_s if call.stream else 0.0
    try:
        if every:
            serving = asyncio.ensure_future(svc.gateway.serve(call))
            try:
                await asyncio.wait({serving}, timeout=every)
            except BaseException:  # stopped (at shutdown): the call, or the stream it opened
                await _settled(serving)
                raise
            if not serving.done():
                return _Stream(
                    _opened_early(serving, frame, frame_error, every),
                    end=functools.partial(_settled, serving),
                    media_type="text/event-stream",
                    headers={"x-request-id": call.request_id, "cache-control": "no-cache"},
                )
            answer = serving.result()
        else:
            answer = await svc.gateway.serve(call)
    except ClientDisconnected:  # nobody to answer; the gateway recorded it as aborted
        return Response(status_code=499)
    if isinstance(answer, StreamAnswer):
        return _Stream(
            _kept_alive(frame(answer), every) if every else frame(answer),
            end=answer.chunks.aclose,
            media_type="text/event-stream",
            headers={**answer.headers, "cache-control": "no-cache"},
        )
    return Response(_dumps(answer.body), media_type="application/json", headers=answer.headers)


class _Stream(StreamingResponse):
    """A streamed answer that stops at the next part once its client has gone, and ends its
    request (``end``: closes its stream, or stops the call still opening it) as it ends.

    Starlette notices a client that leaves in a listener beside the loop that sends the parts,
    and cancels that loop. anyio delivers that cancellation only when the loop waits on
    something not yet done; reading a fast provider, with every read ready at once (and
    uvicorn's send to a gone client returning at once), it never does: the whole answer was
    read from the provider, billed, and recorded ok. The listener's flag, read after each part
    is sent (no system call), ends the parts instead: closing them closes the provider's stream
    and records the request aborted. A slow part is still cut short by the cancellation.

    Cancelled, in a send or before its first part, Starlette closes no parts, and parts closed
    before their first step run none of their code: the stream would be closed, and recorded,
    only when the garbage collector got to it, the model generating meanwhile. The parts are
    closed, then ``end`` called, once the response is over, however it ended.
    """

    def __init__(
        self,
        parts: AsyncGenerator[bytes, None],
        *,
        end: Callable[[], Awaitable[None]],
        **kwargs: Any,
    ) -> None:
        self._left = False
        self._parts = self._until_left(parts)
        self._end = end
        super().__init__(self._parts, **kwargs)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._parts.aclose()
            finally:
                await self._end()

    async def listen_for_disconnect(self, receive: Receive) -> None:
        await super().listen_for_disconnect(receive)
        self._left = True

    async def _until_left(self, parts: AsyncGenerator[bytes, None]) -> AsyncGenerator[bytes, None]:
        try:
            async for part in parts:
                yield part
                if self._left:
                    return
        finally:
            await parts.aclose()


async def _opened_early(
    serving: asyncio.Future[Any],
    frame: Callable[[StreamAnswer], AsyncGenerator[bytes, None]],
    frame_error: Callable[[TiergateError], bytes],
    every: float,
) -> AsyncGenerator[bytes, None]:
    """A stream begun before the gateway opened it: keep-alives until it has, then its parts;
    or, if it failed, its error as the last event (the status line has already gone). The
    response stops ``serving`` as it ends (:func:`_settled`)."""
    while not serving.done():
        yield KEEPALIVE
        await asyncio.wait({serving}, timeout=every)
    try:
        answer = serving.result()
    except ClientDisconnected:  # the gateway recorded it as aborted
        return
    except TiergateError as exc:
        yield frame_error(exc)
        return
    except Exception:  # a defect: recorded as an error 500 by the gateway
        log.exception("a stream failed before its first chunk")
        yield frame_error(TiergateError("internal error"))
        return
    assert isinstance(answer, StreamAnswer)  # a stream's call is answered with one
    parts = _kept_alive(frame(answer), every)
    try:
        async for part in parts:
            yield part
    finally:
        await parts.aclose()  # its pump reads the stream: stopped before the stream is closed


async def _kept_alive(
    parts: AsyncGenerator[bytes, None], every: float
) -> AsyncGenerator[bytes, None]:
    """``parts``, and :data:`KEEPALIVE` whenever the next one takes over ``every`` seconds.
    ``parts`` runs in a task of its own, which reads a part only once the one before it was
    sent, as without keep-alives: a client that reads slowly still holds the stream back, and
    one that leaves in a front's last event's send is recorded aborted (read past it, the
    request is recorded as served)."""
    queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=1)
    sent = asyncio.Event()

    async def pump() -> None:
        try:
            async for part in parts:
                await queue.put(part)
                await sent.wait()
                sent.clear()
            await queue.put(None)
        finally:
            await parts.aclose()

    pumping = asyncio.ensure_future(pump())
    taking: asyncio.Future[bytes | None] | None = None
    try:
        while True:
            taking = taking or asyncio.ensure_future(queue.get())
            waiting: set[asyncio.Future[Any]] = {taking, pumping}
            done, _ = await asyncio.wait(
                waiting, timeout=every, return_when=asyncio.FIRST_COMPLETED
            )
            if taking in done:
                part, taking = taking.result(), None
                if part is None:
                    return
                yield part
                sent.set()
            elif pumping in done:  # all its parts were taken: what is left is its end
                pumping.result()  # or it broke: a defect, as its framing catches errors
                return
            elif not done:
                yield KEEPALIVE
    finally:
        if taking is not None:
            taking.cancel()
        await _cancel(pumping)


async def _settled(serving: asyncio.Future[Any]) -> None:
    """End a stream begun before the gateway opened it: stop the call if it is still opening
    (the gateway records it), else close the stream it opened, framed or not."""
    await _cancel(serving)
    if not serving.cancelled() and serving.exception() is None:
        answer = serving.result()
        if isinstance(answer, StreamAnswer):
            await answer.chunks.aclose()


async def _cancel(task: asyncio.Future[Any]) -> None:
    # Cancel ``task`` and wait until it has ended, so that the request it serves is recorded.
    if not task.done():
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task


async def _sse(answer: StreamAnswer, include_usage: bool) -> AsyncGenerator[bytes, None]:
    """Frame chunks as chat SSE; the closing usage chunk only when the client asked for it.
    An error mid-stream becomes an error event (the status line has already gone); a chunk
    that cannot be framed is thrown into the stream (:func:`_throw_in`), which records it."""
    try:
        async for chunk in answer.chunks:
            if not include_usage and not chunk.get("choices") and chunk.get("usage"):
                continue
            try:
                framed = b"data: " + _dumps(chunk) + b"\n\n"
            except Exception as exc:
                await _throw_in(answer.chunks, exc)
                raise
            yield framed
        yield b"data: [DONE]\n\n"
    except TiergateError as exc:
        yield b"data: " + _dumps(exc.to_body()) + b"\n\n"
    except Exception:  # a defect mid-stream, or framing: recorded as an error 500 by the gateway
        _failed(answer.request_id)
        yield b"data: " + _dumps(TiergateError("internal error").to_body()) + b"\n\n"
    finally:
        await answer.chunks.aclose()


@dataclass(frozen=True, slots=True)
class Front(Generic[_Tr]):
    """A front other than chat: its request schema and its translation to and from chat."""

    name: str
    schema: type[BaseModel]
    to_chat: Callable[[Mapping[str, Any], str], tuple[dict[str, Any], _Tr]]
    native: Callable[[Mapping[str, Any], Mapping[str, str]], NativeRequest]
    answer: Callable[[Mapping[str, Any], _Tr], dict[str, Any]]
    #: (chat chunks, the translation, the prompt's tokens as known when the stream opened).
    events: Callable[
        [AsyncGenerator[dict[str, Any], None], _Tr, int], AsyncGenerator[dict[str, Any], None]
    ]
    #: A failure once the stream began, as the front's error event: (the error, the last event
    #: the stream sent, or None).
    error_event: Callable[[TiergateError, Mapping[str, Any] | None], dict[str, Any]]
    #: The chat fields its translation makes that a model may go without (``Call.optional``).
    optional: frozenset[str] = frozenset()
    #: The fields only a model speaking this front's API serves (``Call.native_only``).
    native_only: frozenset[str] = frozenset()


MESSAGES = Front(
    "messages",
    MessagesRequest,
    messages.to_chat,
    messages.native,
    messages.answer,
    messages.events,
    messages.error_event,
    optional=messages.OPTIONAL,
    native_only=messages.NATIVE_ONLY,
)
RESPONSES = Front(
    "responses",
    ResponsesRequest,
    responses.to_chat,
    responses.native,
    responses.answer,
    responses.events,
    responses.error_event,
    optional=responses.OPTIONAL,
)


@router.post("/v1/messages", openapi_extra=json_request_body(MessagesRequest))
async def create_message(request: Request) -> Response:
    """Anthropic Messages, routed and served like a chat request (see :mod:`router.messages`).
    Streams Anthropic's events when ``stream`` is true; errors take Anthropic's shape."""
    return await serve_front(request, MESSAGES)


@router.post("/v1/messages/count_tokens", openapi_extra=json_request_body(CountTokensRequest))
async def count_message_tokens(request: Request) -> dict[str, int]:
    """The prompt's token count as Tiergate estimates it for routing (no model is called)."""
    svc = services(request)
    principal = principal_of(request)
    policy = svc.gateway.policy

    def count(raw: bytes) -> dict[str, int]:
        # Parsed, checked and counted in one step, off the event loop for a large body: the
        # translation and the estimate cost seconds near the size cap, as parsing does.
        body = parse_json(raw)
        validated(CountTokensRequest, body)
        # As /v1/messages answers it, rather than counting for a model it cannot use.
        refuse_unknown_model(policy, str(body.get("model", "auto")), principal.tenant)
        return messages.count_tokens(body)

    await svc.limiter.admit(principal, tokens=False)
    raw = await read_body(request)
    return await off_loop_when_large(raw, functools.partial(count, raw))


@router.post("/v1/responses", openapi_extra=json_request_body(ResponsesRequest))
async def create_response(request: Request) -> Response:
    """OpenAI Responses, stateless, routed and served like a chat request (see
    :mod:`router.responses`). Streams the Responses events when ``stream`` is true."""
    return await serve_front(request, RESPONSES)


async def serve_front(request: Request, front: Front[_Tr]) -> Response:
    """Serve a front's request through the gateway and answer in the front's format: its
    body, or its named events."""
    kept: list[_Tr] = []

    def translate(body: dict[str, Any], request_id: str) -> tuple[dict[str, Any], NativeRequest]:
        validated(front.schema, body)
        chat, translation = front.to_chat(body, request_id)
        kept.append(translation)
        return chat, front.native(body, request.headers)

    call = await call_of(request, front=front.name, translate=translate)
    if kept:  # the front's answer is made before the request is recorded
        translation = kept[0]
        call = replace(
            call,
            shape=lambda chat: front.answer(chat, translation),
            optional=front.optional,
            native_only=front.native_only,
        )
    return await _respond(
        request,
        call,
        lambda served: _event_sse(
            front.events(served.chunks, kept[0], served.prompt_tokens),
            front.error_event,
            served.request_id,
        ),
        lambda exc: _event(front.error_event(exc, None)),  # nothing but keep-alives sent
    )


def _event(event: dict[str, Any]) -> bytes:
    name = str(event.get("type", "message"))
    if "\n" in name or "\r" in name:  # a provider's type must not write lines of its own
        name = name.replace("\r", "").replace("\n", "")
    return b"event: " + client_utf8(name) + b"\ndata: " + _dumps(event) + b"\n\n"


async def _event_sse(
    events: AsyncGenerator[dict[str, Any], None],
    error_event: Callable[[TiergateError, Mapping[str, Any] | None], dict[str, Any]],
    request_id: str,
) -> AsyncGenerator[bytes, None]:
    """Frame a front's events as named SSE events (``event:`` and ``data:``); an error
    mid-stream becomes the front's error event, after the last event sent (the status line
    has already gone). An event that cannot be framed is thrown into ``events``
    (:func:`_throw_in`), which pass it to the stream (``native_or``)."""
    last: dict[str, Any] | None = None
    try:
        async for event in events:
            try:
                framed = _event(event)
            except Exception as exc:
                await _throw_in(events, exc)
                raise
            yield framed
            last = event
    except TiergateError as exc:
        yield _event(error_event(exc, last))
    except Exception:  # a translation, or framing, that failed: recorded as an error
        _failed(request_id)
        yield _event(error_event(TiergateError("internal error"), last))
    finally:
        await events.aclose()


def _failed(request_id: str) -> None:
    """Log the defect being handled that ended a stream: here, once, with the request's id. The
    gateway logs one only before a stream opens; after, it records the failure thrown into the
    stream, a front's last events' included (they are framed after the chat stream's last
    chunk, while the request's life waits: router.backends.native.CHUNKS_END)."""
    log.exception("request %s failed", request_id, extra={"request_id": request_id})


async def _throw_in(stream: AsyncGenerator[Any, None], exc: Exception) -> None:
    """Throw ``exc``, the failure to frame a part of ``stream``, into it: an encoding or framing
    failure is Tiergate's own, and the stream's owner records it as that error, where closing
    the stream would record a client that left (aborted, 499)."""
    with contextlib.suppress(Exception):
        await stream.athrow(exc)


def stream_error(path: str, exc: TiergateError, sent: bytes = b"") -> bytes:
    """``exc`` framed as the last event of a stream on ``path`` whose status line has gone:
    the front's error event on ``/v1/messages`` and ``/v1/responses``, after ``sent``, the
    last event the stream sent as it was framed (its ``sequence_number``, on
    ``/v1/responses``); else chat's."""
    fronts: dict[str, Front[Any]] = {MESSAGES_PATH: MESSAGES, "/v1/responses": RESPONSES}
    front = fronts.get(path)
    if front is None:
        return b"data: " + _dumps(exc.to_body()) + b"\n\n"
    return _event(front.error_event(exc, _framed(sent)))


def _framed(frame: bytes) -> dict[str, Any] | None:
    """The event :func:`_event` framed as ``frame``, or None (no frame, or not one)."""
    _, found, data = frame.partition(b"\ndata: ")
    try:
        event = json.loads(data) if found else None
    except (ValueError, RecursionError):
        return None
    return event if isinstance(event, dict) else None


@router.post("/v1/feedback")
async def feedback(request: Request) -> dict[str, Any]:
    """A quality signal about one of the caller's own earlier requests, or any request for an
    ``admin`` key (404 for any other)."""
    svc = services(request)
    principal = principal_of(request)
    await svc.limiter.admit(principal, tokens=False)
    req = validated(FeedbackRequest, await read_json(request))
    label = await svc.learning.feedback(
        req, lambda record: check_record_access(principal, record, req.request_id)
    )
    return {
        "object": "feedback",
        "request_id": label.request_id,
        "source": label.source,
        "quality": label.quality,
        "value": label.value,
    }


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    """Routing aliases and configured models, each with its availability."""
    svc = services(request)
    await svc.limiter.admit(principal_of(request), tokens=False)
    return {"object": "list", "data": _model_entries(svc, _tenant(request))}


@router.get("/v1/models/{model_id}")
async def retrieve_model(request: Request, model_id: str) -> dict[str, Any]:
    """One alias or configured model as ``GET /v1/models`` lists it (OpenAI's
    ``models.retrieve``, which clients call to check a model name), or a 404."""
    svc = services(request)
    await svc.limiter.admit(principal_of(request), tokens=False)
    for entry in _model_entries(svc, _tenant(request)):
        if entry["id"] == model_id:
            return entry
    raise unknown_model(model_id)


def _model_entries(svc: Services, tenant: str) -> list[dict[str, Any]]:
    gateway = svc.gateway
    policy = gateway.policy
    data: list[dict[str, Any]] = []
    closed_available = gateway.closed_available()
    for name in policy.alias_names(tenant):
        info: dict[str, Any] = {"kind": "alias"}
        alias = policy.alias_for(name, tenant)
        key = policy.calibration_key(name, tenant)
        if alias is not None and alias.cascade:
            info.update(_cascade_info(policy, closed_available))
        elif key is not None and key in gateway.alias_thresholds:
            info.update(gateway.alias_thresholds[key].as_dict())
        elif alias is not None and alias.threshold is not None:  # as the tenant's plan has it
            info.update(AliasThreshold(name, alias.threshold, "policy").as_dict())
        data.append(
            {"id": name, "object": "model", "created": 0, "owned_by": "tiergate", "tiergate": info}
        )
    for name, spec in policy.models.items():
        reason = gateway.unavailable_reason(spec)
        data.append(
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": (spec.litellm_model or "local").split("/", 1)[0],
                "tiergate": {
                    "kind": "model",
                    "tier": spec.tier,
                    "available": reason is None,
                    "reason": reason,
                },
            }
        )
    return data


@router.post("/v1/route", openapi_extra=json_request_body(ChatCompletionRequest))
async def dry_run(request: Request) -> dict[str, Any]:
    """Explain how a chat request would be routed, without calling any model. The request gets
    chat's checks up to the decision (rate limit, shape, size caps, pin permission); the
    backend's own checks (e.g. ``n > 1`` for the local model) are not run."""
    call = await call_of(request, front="chat")
    plan = await services(request).gateway.route(call)
    return plan.as_dict()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> ClientJSON:
    """Readiness: the policy is parsed, the local model (if any) is loaded, and the outcome
    writer runs on a store it takes.

    Anyone may ask (probes send no key) and gets ``{"ready": ...}``; the details (policy path,
    reload error, models, missing key variables, calibration) go only to a caller whose key
    has ``dashboard`` or ``admin``: they map the deployment for an attacker.
    """
    report = readiness(services(request))
    principal = getattr(request.state, "principal", None)
    if not (isinstance(principal, Principal) and principal.can("dashboard")):
        report = {"ready": report["ready"]}
    return ClientJSON(report, status_code=200 if report["ready"] else 503)


def readiness(svc: Services) -> dict[str, Any]:
    """The readiness report: policy, local tier, closed models, scorer, outcome writer and
    store (a store that refuses its backend is not ready)."""
    gateway = svc.gateway
    deciding = gateway.deciding()
    holder = gateway.policies
    policy = gateway.policy
    local_reason = None
    local_depth = 0
    if policy.local_model:  # "local tier disabled" when TIERGATE_LOCAL_BACKEND=none
        local_reason = gateway.unavailable_reason(policy.models[policy.local_model])
    if gateway.local is not None:
        local_depth = gateway.local_queue_depth
    closed = {
        name: {
            "available": (reason := gateway.unavailable_reason(policy.models[name])) is None,
            "reason": reason,
            "priced": gateway.costs.closed_price(policy.models[name]) is not None,
            "cooldown": gateway.cooldowns.status().get(name),
        }
        for name in policy.closed_models
    }
    local_ok = gateway.local is None or local_reason is None
    no_closed = None
    if policy.closed_models and not gateway.closed_available():
        if policy.fail_closed:
            serves, then = "error", "the policy says fail_closed, so requests routed closed get 503"
        elif gateway.local is None or not policy.local_model:
            serves, then = (
                "error",
                "there is no local tier either, so every request gets 503",
            )
        else:
            serves = "local"
            then = (
                "requests routed closed are served by the local model "
                f"(x-tiergate-fallback: {NO_CLOSED_FALLBACK})"
            )
        no_closed = {"serves": serves, "note": f"no closed model is available (no API key): {then}"}
    # A dead outcome writer is started again here, and this one probe says it was dead.
    restarted = gateway.outcomes.check_writer()
    outcomes = {**gateway.outcomes.health(), "restarted": restarted}
    return {
        # A store that refuses its backend (a Redis too old, found after an outage at start).
        "ready": local_ok and restarted is None and not outcomes.get("refusal"),
        "no_closed": no_closed,
        "outcomes": outcomes,
        "policy": {
            "path": str(holder.path),
            "version": policy.digest,
            "last_reload_error": holder.last_error,
        },
        "local": {
            "backend": svc.settings.local_backend,
            "available": gateway.local is not None and local_reason is None,
            "reason": local_reason,
            "queue_depth": local_depth,
            "cooldown": gateway.cooldowns.status().get(policy.local_model or ""),
        },
        "closed": closed,
        "scorer": {
            "name": deciding.name,
            "version": deciding.version,
            "loaded": gateway.scorer.version,  # differs under `encoder: false`
        },
        "aliases": {
            **{name: t.as_dict() for name, t in gateway.alias_thresholds.items()},
            **_cascade_aliases(policy, gateway.closed_available()),
        },
    }


def _cascade_aliases(policy: Policy, closed_available: bool) -> dict[str, dict[str, Any]]:
    return {
        name: _cascade_info(policy, closed_available)
        for name, alias in policy.aliases.items()
        if alias.cascade
    }


def _cascade_info(policy: Policy, closed_available: bool) -> dict[str, Any]:
    # A cascade alias has no score threshold: its answers' confidence decides, and it can
    # escalate only while a closed model is available.
    settings = policy.cascade
    return {
        "cascade": True,
        "confidence_threshold": settings.threshold,
        "hold_back_tokens": settings.hold_back_tokens,
        "escalates": bool(policy.closed_models) and closed_available,
    }
