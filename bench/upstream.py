"""A fake provider that answers instantly, for the proxy-overhead benchmark.

A raw asyncio protocol (uvloop when installed), no framework: it reads one HTTP/1.1 request at a
time per connection (keep-alive) and answers in the wire format its path names, so that a closed
route can serve each of Tiergate's fronts natively:

- ``POST .../messages``: a fixed Anthropic ``message``, or with ``"stream": true`` Anthropic's
  event stream (``message_start`` ... 50 ``text_delta`` events ... ``message_stop``);
- ``POST .../responses``: a fixed OpenAI ``response``, or its event stream
  (``response.created`` ... 50 ``response.output_text.delta`` ... ``response.completed``);
- anything else (``.../chat/completions``): a fixed ``chat.completion``, or 50 SSE chunks, a
  usage chunk and ``[DONE]``.

Each streamed event is its own chunked-encoding write. The answer does not depend on the request
beyond its path and ``stream``, which is all a load test needs. It must never be the bottleneck:
its own p50 at concurrency 1 is checked with wrk by ``python -m bench`` and reported next to the
proxies.

Run: ``python -m bench.upstream --port 18001``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from typing import NamedTuple

STREAM_CHUNKS = 50
_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
_LENGTH_RE = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)

TEXT = "Hello! This is a fixed answer."
COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": TEXT},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
    },
    separators=(",", ":"),
).encode()


def _ok(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


RESPONSE = _ok(COMPLETION)
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def _sse(obj: object) -> bytes:
    return _chunk(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")


def _delta(i: int) -> bytes:
    choice = {"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}
    if i == 0:
        choice["delta"] = {"role": "assistant", "content": "tok0 "}
    return _sse(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "gpt-4o-bench",
            "choices": [choice],
        }
    )


STREAM_PARTS = [_delta(i) for i in range(STREAM_CHUNKS)]
STREAM_TAIL = (
    _sse(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "gpt-4o-bench",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
        }
    )
    + _sse(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": "gpt-4o-bench",
            "choices": [],
            "usage": {"prompt_tokens": 12, "completion_tokens": 50, "total_tokens": 62},
        }
    )
    + _chunk(b"data: [DONE]\n\n")
    + b"0\r\n\r\n"
)


def _event(name: str, obj: object) -> bytes:
    """One server-sent event with its ``event:`` line, as Anthropic and OpenAI's Responses send."""
    data = json.dumps(obj, separators=(",", ":")).encode()
    return _chunk(b"event: " + name.encode() + b"\ndata: " + data + b"\n\n")


MESSAGE = {
    "id": "msg_bench",
    "type": "message",
    "role": "assistant",
    "model": "claude-bench",
    "content": [{"type": "text", "text": TEXT}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 12, "output_tokens": 8},
}
_MESSAGE_START = {**MESSAGE, "content": [], "stop_reason": None, "usage": {"input_tokens": 12}}
MESSAGE_PARTS = [
    _event("message_start", {"type": "message_start", "message": _MESSAGE_START}),
    _event(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    ),
    *(
        _event(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": f"tok{i} "},
            },
        )
        for i in range(STREAM_CHUNKS)
    ),
]
MESSAGE_TAIL = (
    _event("content_block_stop", {"type": "content_block_stop", "index": 0})
    + _event(
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"output_tokens": STREAM_CHUNKS},
        },
    )
    + _event("message_stop", {"type": "message_stop"})
    + b"0\r\n\r\n"
)

_OUTPUT_TEXT = {"type": "output_text", "text": TEXT, "annotations": []}
_OUTPUT_MESSAGE = {
    "type": "message",
    "id": "msg_bench",
    "status": "completed",
    "role": "assistant",
    "content": [_OUTPUT_TEXT],
}
RESPONSE_OBJECT = {
    "id": "resp_bench",
    "object": "response",
    "created_at": 1700000000,
    "status": "completed",
    "model": "gpt-4o-bench",
    "output": [_OUTPUT_MESSAGE],
    "parallel_tool_calls": True,
    "tool_choice": "auto",
    "tools": [],
    "usage": {"input_tokens": 12, "output_tokens": 8, "total_tokens": 20},
}
_IN_PROGRESS = {**RESPONSE_OBJECT, "status": "in_progress", "output": [], "usage": None}
_ITEM = {"item_id": "msg_bench", "output_index": 0, "content_index": 0}
RESPONSE_PARTS = [
    _event("response.created", {"type": "response.created", "response": _IN_PROGRESS}),
    _event(
        "response.output_item.added",
        {
            "type": "response.output_item.added",
            "output_index": 0,
            "item": {**_OUTPUT_MESSAGE, "status": "in_progress", "content": []},
        },
    ),
    *(
        _event(
            "response.output_text.delta",
            {"type": "response.output_text.delta", **_ITEM, "delta": f"tok{i} "},
        )
        for i in range(STREAM_CHUNKS)
    ),
]
_STREAMED_TEXT = "".join(f"tok{i} " for i in range(STREAM_CHUNKS))
_STREAMED_MESSAGE = {**_OUTPUT_MESSAGE, "content": [{**_OUTPUT_TEXT, "text": _STREAMED_TEXT}]}
RESPONSE_TAIL = (
    _event(
        "response.output_text.done",
        {"type": "response.output_text.done", **_ITEM, "text": _STREAMED_TEXT},
    )
    + _event(
        "response.output_item.done",
        {"type": "response.output_item.done", "output_index": 0, "item": _STREAMED_MESSAGE},
    )
    + _event(
        "response.completed",
        {
            "type": "response.completed",
            "response": {
                **RESPONSE_OBJECT,
                "output": [_STREAMED_MESSAGE],
                "usage": {"input_tokens": 12, "output_tokens": 50, "total_tokens": 62},
            },
        },
    )
    + b"0\r\n\r\n"
)


class Wire(NamedTuple):
    """One API's answers: the whole response, and a stream's events and its end."""

    answer: bytes
    parts: list[bytes]
    tail: bytes


CHAT = Wire(RESPONSE, STREAM_PARTS, STREAM_TAIL)
MESSAGES = Wire(
    _ok(json.dumps(MESSAGE, separators=(",", ":")).encode()), MESSAGE_PARTS, MESSAGE_TAIL
)
RESPONSES = Wire(
    _ok(json.dumps(RESPONSE_OBJECT, separators=(",", ":")).encode()), RESPONSE_PARTS, RESPONSE_TAIL
)


def wire_for(path: bytes) -> Wire:
    """The API a request path names: Anthropic Messages, OpenAI Responses, else chat."""
    path = path.split(b"?", 1)[0].rstrip(b"/")
    if path.endswith(b"/messages"):
        return MESSAGES
    if path.endswith(b"/responses"):
        return RESPONSES
    return CHAT


class _Upstream(asyncio.Protocol):
    def __init__(self) -> None:
        self._buf = b""
        self._transport: asyncio.Transport | None = None
        self._task: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self._buf += data
        while True:
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                return
            match = _LENGTH_RE.search(self._buf, 0, end + 2)
            length = int(match.group(1)) if match else 0
            total = end + 4 + length
            if len(self._buf) < total:
                return
            target = self._buf[: self._buf.find(b"\r\n")].split(b" ")
            body = self._buf[end + 4 : total]
            self._buf = self._buf[total:]
            self._answer(wire_for(target[1] if len(target) > 1 else b"/"), body)

    def _answer(self, wire: Wire, body: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if _STREAM_RE.search(body):
            self._task = asyncio.ensure_future(self._stream(transport, wire))
        else:
            transport.write(wire.answer)

    async def _stream(self, transport: asyncio.Transport, wire: Wire) -> None:
        transport.write(STREAM_HEAD)
        for part in wire.parts:
            if transport.is_closing():
                return
            transport.write(part)
            await asyncio.sleep(0)  # a separate write per chunk, as a real provider sends them
        transport.write(wire.tail)


async def serve(host: str, port: int) -> None:
    """Serve until cancelled."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Upstream, host, port, backlog=2048, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    """Entry point: ``python -m bench.upstream --port N``."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18001)
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()
