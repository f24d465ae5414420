"""The server ``tiergate serve`` runs: uvicorn with a bounded request head."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from tests.conftest import policy_yaml, wait_for
from tests.fake_provider import FakeProvider
from tests.scripted_local import ScriptedLocal

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_an_endless_header_is_cut_off(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch, parser: str
) -> None:
    """``tiergate serve``'s server refuses a header block past its limit instead of buffering
    it: a client that keeps sending one unfinished header is answered and disconnected. A
    large body is not a large head: it is still served."""
    import threading

    import uvicorn

    from router import server as serving
    from router.app import create_app
    from router.server import uvicorn_config
    from tests.conftest import free_port, make_settings

    fake.reset()  # answer normally, whatever the test before left it doing
    if parser == "h11":  # as where httptools is not installed
        monkeypatch.setattr(serving, "_bounded_httptools", lambda: None)

    settings = make_settings(tmp_path, policy_yaml(fake), port=free_port())
    app = create_app(settings, local_backend=ScriptedLocal())
    server = uvicorn.Server(uvicorn_config(app, settings))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        assert wait_for(lambda: server.started, 30)
        with socket.create_connection(("127.0.0.1", settings.port), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-filler: ")
            sent, answer = 0, b""
            try:
                while sent < 8 * 1024 * 1024:  # 8 MiB of one header value, never finished
                    sock.sendall(b"a" * 65536)
                    sent += 65536
            except OSError:  # the server closed the connection while we were still sending
                pass
            try:
                answer = sock.recv(200)
            except OSError:
                answer = b""
        assert sent < 8 * 1024 * 1024 or answer.startswith(b"HTTP/1.1 4"), (sent, answer)
        assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer
        ok = httpx.get(f"http://127.0.0.1:{settings.port}/healthz", timeout=10)
        assert ok.status_code == 200
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 600_000}]}
        url = f"http://127.0.0.1:{settings.port}/v1/chat/completions"
        assert httpx.post(url, json=big, timeout=30).status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)
