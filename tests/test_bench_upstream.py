"""The benchmark's fake provider answers each front's wire format, whole and streamed."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bench import upstream


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    transports: list[asyncio.BaseTransport] = []

    class Tracked(upstream._Upstream):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            transports.append(transport)
            super().connection_made(transport)

    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(
        loop.create_server(Tracked, "127.0.0.1", 0, reuse_address=True)
    )
    port = server.sockets[0].getsockname()[1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    # Accepted connections outlive server.close(): close them and let their callbacks run, or
    # their sockets are collected open (a ResourceWarning in whichever test runs next).
    server.close()
    for transport in transports:
        transport.close()
    loop.run_until_complete(server.wait_closed())
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()


def _events(base: str, path: str) -> list[tuple[str | None, Any]]:
    """(event name, data) of each server-sent event of a streamed answer."""
    out: list[tuple[str | None, Any]] = []
    with httpx.stream("POST", base + path, json={"stream": True}, timeout=10) as response:
        assert response.status_code == 200
        name = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = line.removeprefix("data: ")
                out.append((name, data if data == "[DONE]" else json.loads(data)))
                name = None
    return out


def test_each_path_gets_its_apis_answer(base: str) -> None:
    post = {"model": "m", "max_tokens": 8}
    chat = httpx.post(base + "/v1/chat/completions", json=post).json()
    assert chat["choices"][0]["message"]["content"] == upstream.TEXT
    message = httpx.post(base + "/v1/messages", json=post).json()
    assert message["type"] == "message"
    assert message["content"] == [{"type": "text", "text": upstream.TEXT}]
    response = httpx.post(base + "/v1/responses?x=1", json=post).json()
    assert response["object"] == "response"
    assert response["output"][0]["content"][0]["text"] == upstream.TEXT


def test_each_stream_is_its_apis_event_stream(base: str) -> None:
    chat = _events(base, "/v1/chat/completions")
    assert chat[-1] == (None, "[DONE]")
    text = "".join(
        d["choices"][0]["delta"].get("content") or "" for _, d in chat[:-2] if d["choices"]
    )
    messages = _events(base, "/v1/messages")
    assert [name for name, _ in messages] == [data["type"] for _, data in messages]
    assert messages[0][0] == "message_start" and messages[-1][0] == "message_stop"
    streamed = "".join(d["delta"]["text"] for name, d in messages if name == "content_block_delta")
    responses = _events(base, "/v1/responses")
    assert [name for name, _ in responses] == [data["type"] for _, data in responses]
    assert responses[0][0] == "response.created" and responses[-1][0] == "response.completed"
    deltas = "".join(d["delta"] for name, d in responses if name == "response.output_text.delta")
    final = responses[-1][1]["response"]["output"][0]["content"][0]["text"]
    assert text == streamed == deltas == final
    assert text.count("tok") == upstream.STREAM_CHUNKS
