"""The server ``tiergate serve`` runs: uvicorn with a bounded request head."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import policy_yaml, wait_for
from tests.fake_provider import FakeProvider
from tests.scripted_local import ScriptedLocal

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}


@contextmanager
def _serving(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch, parser: str
) -> Iterator[int]:
    # ``tiergate serve``'s uvicorn server on a free port, with the given parser.
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
        yield settings.port
    finally:
        server.should_exit = True
        thread.join(30)


def _answer(port: int, heads: bytes) -> bytes:
    # All the server answers to ``heads``, sent whole in one write, until it closes.
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(heads)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_an_endless_header_is_cut_off(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch, parser: str
) -> None:
    """``tiergate serve``'s server refuses a header block past its limit instead of buffering
    it: a client that keeps sending one unfinished header is answered and disconnected. A
    large body is not a large head: it is still served."""
    with _serving(tmp_path, fake, monkeypatch, parser) as port:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
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
        ok = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        assert ok.status_code == 200
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 600_000}]}
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        assert httpx.post(url, json=big, timeout=30).status_code == 200


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_whole_head_over_the_limit_gets_431_in_one_write(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch, parser: str
) -> None:
    """The 64 KiB limit holds for a head that arrives complete in one read too, in headers or
    in the request line, and on a kept-alive connection's second request; a head just under
    it is served."""
    from router.server import MAX_HEAD_BYTES

    def head(target: str = "/healthz", filler: int = 0, close: bool = True) -> bytes:
        fields = f"host: x\r\nx-filler: {'a' * filler}\r\n" + ("connection: close\r\n" * close)
        return f"GET {target} HTTP/1.1\r\n{fields}\r\n".encode()

    with _serving(tmp_path, fake, monkeypatch, parser) as port:
        under = _answer(port, head(filler=MAX_HEAD_BYTES - 200))
        assert under.startswith(b"HTTP/1.1 200"), under[:100]
        for over in (
            head(filler=MAX_HEAD_BYTES + 10),
            head(filler=100_000),
            head(target="/healthz?" + "q" * (MAX_HEAD_BYTES + 10)),
        ):
            answer = _answer(port, over)
            assert answer.startswith(b"HTTP/1.1 431"), answer[:100]
            assert b'"code":"headers_too_large"' in answer
        # Pipelined behind a small request on a kept-alive connection, in the same write.
        answer = _answer(port, head(close=False) + head(filler=MAX_HEAD_BYTES + 10))
        assert b"HTTP/1.1 431" in answer, answer[-300:]
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200


def _left_waiting(port: int, sent: bytes, trickle: bytes = b"") -> bytes:
    # What the server answers a client that sends ``sent`` and then, every 0.1 s, ``trickle``
    # (never finishing its request), until the server closes (b"" after 10 s: never closed).
    with socket.create_connection(("127.0.0.1", port), timeout=0.1) as sock:
        sock.sendall(sent)
        answer, deadline = b"", time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                with contextlib.suppress(OSError):
                    sock.sendall(trickle)
                continue
            if not chunk:
                return answer
            answer += chunk
        return b""


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_a_client_too_slow_to_send_its_request_is_cut_off(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch, parser: str
) -> None:
    """A connection that sends nothing, or trickles a head or a body, is answered 408 and
    closed once its time is up, instead of holding a connection for ever (slowloris); the
    clock stops once the request has arrived, so a slow answer is not cut."""
    from router import server as serving
    from tests.fake_provider import Behaviour

    monkeypatch.setattr(serving, "HEAD_TIMEOUT_S", 0.5, raising=False)
    monkeypatch.setattr(serving, "BODY_TIMEOUT_S", 0.5, raising=False)
    post = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    with _serving(tmp_path, fake, monkeypatch, parser) as port:
        for sent, trickle, part in [
            (b"", b"", b"head"),  # connects and says nothing
            (post, b"x-more: 1\r\n", b"head"),
            (post + b"content-length: 1000\r\n\r\n{", b" ", b"body"),
            # A kept-alive connection's second request.
            (b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGET /healthz HTTP/1.1\r\n", b"", b"head"),
        ]:
            answer = _left_waiting(port, sent, trickle)
            assert answer, (sent, "still open after 10 s")
            last = answer[answer.rindex(b"HTTP/1.1 ") :]
            assert last.startswith(b"HTTP/1.1 408"), answer[-300:]
            assert b"request " + part + b" did not arrive" in last, last
        fake.reset(Behaviour(chunk_delay_s=0.15))  # a stream of about 1.5 s
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        with httpx.stream("POST", url, json={**CHAT, "model": "gpt-4o", "stream": True}) as s:
            assert s.status_code == 200
            assert s.read().rstrip().endswith(b"data: [DONE]")


# -- shutdown ---------------------------------------------------------------------------------

_RUNNER = """
import asyncio, sys
from pathlib import Path

from router.app import create_app
from router.cli import _bind, _serve
from tests.conftest import KeywordScorer, make_settings
from tests.scripted_local import ScriptedLocal

tmp, port, extra = Path(sys.argv[1]), int(sys.argv[2]), eval(sys.argv[3])
settings = make_settings(tmp, (tmp / "policy.text").read_text(), port=port, **extra)
local = ScriptedLocal(words=100_000, queue_size=4)  # answers that would run for minutes
local.token_delay_s = 0.005
app = create_app(settings, scorer=KeywordScorer(), local_backend=local)
asyncio.run(_serve(app, settings, _bind("127.0.0.1", port)))
"""


def _records(db: Path) -> list[tuple[str, int, str | None]]:
    import sqlite3

    with contextlib.closing(sqlite3.connect(db)) as conn:
        query = "SELECT status, http_status, error_type FROM outcomes"
        return [tuple(r) for r in conn.execute(query)]


STOPPED = ("error", 503, "server_shutting_down")  # the record of a request stopped at shutdown


@contextmanager
def _serve_process(tmp_path: Path, fake: FakeProvider, **settings: object) -> Iterator[Any]:
    # ``tiergate serve``'s own loop (router.cli._serve) in a process of its own, so that it can
    # be sent signals; the local tier is scripted, answering one long stream.
    from tests.conftest import free_port

    (tmp_path / "policy.text").write_text(policy_yaml(fake))
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-c", _RUNNER, str(tmp_path), str(port), repr(settings)],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        assert wait_for(lambda: _listening(port) or proc.poll() is not None, 60)
        assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
        return True
    return False


@contextmanager
def _streaming(port: int) -> Iterator[httpx.Response]:
    # A local stream that has begun, its client connected (and reading) until the block ends.
    with (
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
        client.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "model": "local", "stream": True}
        ) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        next(lines)  # the stream has begun

        def read() -> None:  # keep reading, as a client does, until the server ends it
            with contextlib.suppress(httpx.HTTPError):
                for _ in lines:
                    pass

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        yield response
        reader.join(30)


def test_a_request_still_running_at_a_forced_stop_is_recorded(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A second Ctrl-C stops waiting for requests in flight. Those still running (a stream,
    and a request queued behind it for the local model) are ended before the lifespan drains
    the outcome store and stops the local model, so each still gets its one record."""
    with (
        _serve_process(tmp_path, fake) as (proc, port),
        ThreadPoolExecutor(1) as pool,
        _streaming(port),
    ):
        queued = pool.submit(
            httpx.post,
            f"http://127.0.0.1:{port}/v1/chat/completions",
            json={**CHAT, "model": "local"},
            timeout=60,
        )
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
        with contextlib.suppress(httpx.HTTPError):
            queued.result()
    assert _records(tmp_path / "outcomes.db") == [STOPPED] * 2


def test_sigterm_gives_requests_in_flight_the_shutdown_timeout(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A stream that would outlast the container's grace period is stopped when
    TIERGATE_SHUTDOWN_TIMEOUT_S is up, so the process exits (and drains the store) before a
    SIGKILL, and the stream is recorded."""
    with _serve_process(tmp_path, fake, shutdown_timeout_s=1) as (proc, port), _streaming(port):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    assert _records(tmp_path / "outcomes.db") == [STOPPED]


def test_a_request_stopped_at_shutdown_is_told_to_retry(tmp_path: Path, fake: FakeProvider) -> None:
    """When the shutdown timeout is up, a request whose answer had not begun gets a 503 with
    ``x-should-retry: true`` (another replica can serve it), a stream under way ends with that
    error as its last event, no traceback is logged, and each record says the server stopped
    it rather than that its client left."""
    with (
        _serve_process(tmp_path, fake, shutdown_timeout_s=1) as (proc, port),
        ThreadPoolExecutor(1) as pool,
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
        client.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "model": "local", "stream": True}
        ) as stream,
    ):
        lines = stream.iter_lines()
        next(lines)  # the stream has begun; the next request waits behind it for the model
        queued = pool.submit(client.post, "/v1/chat/completions", json={**CHAT, "model": "local"})
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        last = [line for line in lines if line][-1]
        answer = queued.result()
        assert proc.wait(20) == 0
        log = proc.stderr.read().decode()
    assert answer.status_code == 503
    assert answer.headers["x-should-retry"] == "true"
    assert answer.json()["error"]["code"] == "server_shutting_down"
    assert last.startswith("data: ") and '"code":"server_shutting_down"' in last
    assert "Traceback" not in log and "Exception in ASGI application" not in log
    assert _records(tmp_path / "outcomes.db") == [STOPPED] * 2


def test_a_request_stopped_while_its_body_arrives_is_recorded(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A request the shutdown timeout stops while its body is still arriving (the gateway has
    not seen it yet) is recorded as stopped by the server, like one stopped while answered."""
    with (
        _serve_process(tmp_path, fake, shutdown_timeout_s=1) as (proc, port),
        socket.create_connection(("127.0.0.1", port), 5) as sock,
    ):
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
            b"content-type: application/json\r\ncontent-length: 200\r\n\r\n"
            b'{"model": "auto", "messages": ['
        )
        time.sleep(0.5)  # the head is read and the app awaits the rest of the body
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
    assert _records(tmp_path / "outcomes.db") == [STOPPED]
