"""A fake OpenAI-compatible upstream that answers instantly, for the proxy-overhead benchmark.

A raw asyncio protocol (uvloop when installed), no framework: it reads one HTTP/1.1 request at a
time per connection (keep-alive), and answers ``POST .../chat/completions`` with a fixed
``chat.completion`` body, or, when the body asks for ``"stream": true``, with 50 SSE chunks (each
its own chunked-encoding write, then a usage chunk and ``[DONE]``). Anything else gets the same
JSON, which is all a load test needs. It must never be the bottleneck: its own p50 at
concurrency 1 is checked with wrk by ``python -m bench`` and reported next to the proxies.

Run: ``python -m bench.upstream --port 18001``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re

STREAM_CHUNKS = 50
_STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
_LENGTH_RE = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-4o-bench",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello! This is a fixed answer."},
                "finish_reason": "stop",
                "logprobs": None,
            }
        ],
        "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20},
    },
    separators=(",", ":"),
).encode()

RESPONSE = (
    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
    + str(len(COMPLETION)).encode()
    + b"\r\n\r\n"
    + COMPLETION
)
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
            body = self._buf[end + 4 : total]
            self._buf = self._buf[total:]
            self._answer(body)

    def _answer(self, body: bytes) -> None:
        transport = self._transport
        assert transport is not None
        if _STREAM_RE.search(body):
            self._task = asyncio.ensure_future(self._stream(transport))
        else:
            transport.write(RESPONSE)

    async def _stream(self, transport: asyncio.Transport) -> None:
        transport.write(STREAM_HEAD)
        for part in STREAM_PARTS:
            if transport.is_closing():
                return
            transport.write(part)
            await asyncio.sleep(0)  # a separate write per chunk, as a real provider sends them
        transport.write(STREAM_TAIL)


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
