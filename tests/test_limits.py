"""Rate limits (in-process and across replicas through Redis), size limits, local timeouts."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from router import limits
from router.auth import Principal, hash_key
from router.errors import RateLimitError
from router.outcomes import SQLiteOutcomeStore
from tests.conftest import GGUF, LiveServer, live, policy_yaml, wait_for
from tests.fake_provider import FakeProvider
from tests.redis_server import RedisServer, redis_binary
from tests.scripted_local import ScriptedLocal

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}


def _post(server: LiveServer, body: object = CHAT, key: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=10)


def _records_settle(server: LiveServer, expected: int) -> None:
    store = server.gateway.outcomes
    assert wait_for(lambda: store.count() >= expected), (store.count(), expected)
    store.flush()
    assert store.count() == expected


def _assert_rate_limited(response: httpx.Response, code: str) -> None:
    assert response.status_code == 429, response.text
    assert 1 <= int(response.headers["retry-after"]) <= 60
    error = response.json()["error"]
    assert error["type"] == "rate_limit_error" and error["code"] == code


def test_requests_per_minute_in_process(tmp_path: Path, fake: FakeProvider) -> None:
    with live(tmp_path, policy_yaml(fake), local_backend_obj=ScriptedLocal(), rpm_limit=3) as srv:
        statuses = [_post(srv).status_code for _ in range(3)]
        assert statuses == [200, 200, 200]
        _assert_rate_limited(_post(srv), "rpm_limit_exceeded")
        _records_settle(srv, 4)  # the refused request is recorded too
        assert srv.gateway.outcomes.recent(1)[0]["http_status"] == 429


def test_limits_are_per_tenant_and_per_key(tmp_path: Path, fake: FakeProvider) -> None:
    keys = tmp_path / "keys.yaml"
    entries = [
        {"sha256": hash_key("tg-a"), "tenant": "a", "permissions": []},
        {"sha256": hash_key("tg-b"), "tenant": "b", "permissions": [], "rpm": 5},
    ]
    keys.write_text(yaml.safe_dump({"keys": entries}))
    with live(
        tmp_path,
        policy_yaml(fake),
        local_backend_obj=ScriptedLocal(),
        rpm_limit=1,
        api_keys_file=keys,
    ) as srv:
        assert _post(srv, key="tg-a").status_code == 200
        _assert_rate_limited(_post(srv, key="tg-a"), "rpm_limit_exceeded")
        assert [_post(srv, key="tg-b").status_code for _ in range(5)] == [200] * 5
        _assert_rate_limited(_post(srv, key="tg-b"), "rpm_limit_exceeded")


def test_tokens_per_minute(tmp_path: Path, fake: FakeProvider) -> None:
    fake.reset()
    # the fake closed model reports 18 tokens per answer; HARD prompts go to it
    hard = {"model": "auto", "messages": [{"role": "user", "content": "HARD"}]}
    with live(tmp_path, policy_yaml(fake), local_backend_obj=ScriptedLocal(), tpm_limit=30) as srv:
        assert _post(srv, hard).status_code == 200  # 18 used
        stream = {**hard, "stream": True}
        with httpx.stream(
            "POST", srv.url + "/v1/chat/completions", json=stream, timeout=10
        ) as response:
            assert response.status_code == 200
            response.read()  # 36 used: the stream's usage is charged when it ends
        _assert_rate_limited(_post(srv, hard), "tpm_limit_exceeded")


@pytest.mark.skipif(redis_binary() is None, reason="no redis-server binary")
def test_rate_limit_is_shared_by_replicas_through_redis(tmp_path: Path, fake: FakeProvider) -> None:
    with RedisServer(tmp_path) as redis_server:

        def replica(name: str) -> Iterator[LiveServer]:
            work = tmp_path / name
            work.mkdir()
            return live(
                work,
                policy_yaml(fake),
                local_backend_obj=ScriptedLocal(),
                outcomes=SQLiteOutcomeStore(work / "o.db"),
                redis_url=redis_server.url,
                rpm_limit=4,
                api_keys_file=_one_key(work),
            )

        with replica("a") as a, replica("b") as b:
            got = [_post(srv, key="tg-k").status_code for srv in (a, b, a, b)]
            assert got == [200] * 4
            _assert_rate_limited(_post(a, key="tg-k"), "rpm_limit_exceeded")
            _assert_rate_limited(_post(b, key="tg-k"), "rpm_limit_exceeded")
        keys = [k.decode() for k in redis_server.client().keys("tiergate:rl:t:req:*")]
        assert len(keys) == 1


def _one_key(work: Path) -> Path:
    path = work / "keys.yaml"
    path.write_text(
        yaml.safe_dump({"keys": [{"sha256": hash_key("tg-k"), "tenant": "t", "permissions": []}]})
    )
    return path


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory, fake: FakeProvider) -> Iterator[LiveServer]:
    """A server with small size limits."""
    with live(
        tmp_path_factory.mktemp("small"),
        policy_yaml(fake),
        local_backend_obj=ScriptedLocal(queue_size=8),
        max_body_bytes=4096,
        max_messages=4,
        max_tokens_cap=100,
    ) as srv:
        yield srv


def test_oversized_body_by_content_length(small: LiveServer) -> None:
    before = small.gateway.outcomes.count()
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    response = _post(small, big)
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    _records_settle(small, before + 1)


def test_oversized_chunked_body_is_cut_off(small: LiveServer) -> None:
    """No Content-Length: the body is counted as it streams in and refused past the limit."""
    before = small.gateway.outcomes.count()

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "auto", "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}]}'

    response = httpx.post(small.url + "/v1/chat/completions", content=chunks(), timeout=10)
    assert response.status_code == 413
    _records_settle(small, before + 1)


def test_a_lying_content_length_cannot_grow_the_body(small: LiveServer) -> None:
    """Content-Length says 10 bytes, 100 kB follow: the server reads no more than declared."""
    with socket.create_connection(("127.0.0.1", small.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 10\r\n\r\n" + b"x" * 100_000
        )
        head = sock.recv(200)
    assert head.startswith(b"HTTP/1.1 400"), head


def test_too_many_messages_and_max_tokens_over_the_cap(small: LiveServer) -> None:
    many = {"model": "auto", "messages": [{"role": "user", "content": "hi"}] * 5}
    response = _post(small, many)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    for field in ("max_tokens", "max_completion_tokens"):
        response = _post(small, {**CHAT, field: 101})
        assert response.status_code == 400 and response.json()["error"]["param"] == field
    assert _post(small, {**CHAT, "max_tokens": 100}).status_code == 200


def test_the_dry_run_refuses_what_chat_refuses(small: LiveServer) -> None:
    """/v1/route applies chat's size caps, so it never explains a route chat would refuse."""
    many = {"model": "auto", "messages": [{"role": "user", "content": "hi"}] * 5}
    response = httpx.post(small.url + "/v1/route", json=many, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    response = httpx.post(small.url + "/v1/route", json={**CHAT, "max_tokens": 101}, timeout=10)
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"
    assert httpx.post(small.url + "/v1/route", json=CHAT, timeout=10).status_code == 200


@pytest.mark.skipif(not GGUF.is_file(), reason="bundled GGUF missing: make model")
def test_local_generation_past_local_timeout_is_a_local_failure(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """The real GGUF is stopped at local_timeout_s, and the request falls back to closed."""
    fake.reset()
    body = {
        "model": "auto",
        "messages": [{"role": "user", "content": "Write a long story about a dragon."}],
        "max_tokens": 400,
    }
    with live(tmp_path, policy_yaml(fake, on_failure="closed"), local_timeout_s=0.2) as srv:
        _assert_stopped_and_fell_back(srv, fake, body)
    # the policy model's timeout_s wins over the setting
    fake.reset()
    policy = policy_yaml(fake, on_failure="closed").replace(
        "    context_window: 2048\n", "    context_window: 2048\n    timeout_s: 0.2\n", 1
    )
    assert "timeout_s: 0.2" in policy
    (tmp_path / "policy").mkdir()
    with live(tmp_path / "policy", policy, local_timeout_s=300) as srv:
        _assert_stopped_and_fell_back(srv, fake, body)


def _assert_stopped_and_fell_back(srv: LiveServer, fake: FakeProvider, body: object) -> None:
    response = _post(srv, body)
    assert response.status_code == 200, response.text
    assert response.headers["x-tiergate-fallback"] == "local->closed"
    assert response.headers["x-tiergate-model"] == "gpt-4o"
    assert len(fake.received) == 1
    # the worker is told to stop (at its next token): the local slot comes back
    gate = srv.gateway.local.gate
    assert wait_for(lambda: gate.depth == 0, 30)


def test_the_window_slides_across_the_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    """A burst at the end of one minute still counts at the start of the next (no 2x burst at
    the boundary), and fades as the previous minute slides out."""
    limiter = limits.RateLimiter(rpm=3, tpm=None)
    tenant = Principal(tenant="t", permissions=frozenset(), key_id="k")
    now = [6000.0 + 59]  # second 59 of a minute

    monkeypatch.setattr(limits.time, "time", lambda: now[0])

    async def admit() -> bool:
        try:
            await limiter.admit(tenant)
        except RateLimitError:
            return False
        return True

    async def scenario() -> list[bool]:
        got = [await admit() for _ in range(4)]  # 3 allowed, the 4th refused
        now[0] = 6000.0 + 61  # the next minute: the 3 still weigh 3 * 59/60
        got.append(await admit())
        now[0] = 6000.0 + 110  # 50 s in: the 3 weigh 0.5
        got += [await admit(), await admit(), await admit()]
        return got

    assert asyncio.run(scenario()) == [True, True, True, False, False, True, True, False]


@pytest.mark.parametrize("value", [101.0, "101", 100.5, "100", True])
def test_max_tokens_must_be_an_integer(small: LiveServer, value: object) -> None:
    """A float or a numeric string would slip past the cap and the context-window check."""
    for field in ("max_tokens", "max_completion_tokens"):
        for path in ("/v1/chat/completions", "/v1/route"):
            body = {**CHAT, field: value}
            response = httpx.post(small.url + path, json=body, timeout=10)
            assert response.status_code == 400, (field, value, response.text)
            assert response.json()["error"]["param"] == field


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
