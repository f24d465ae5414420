"""Rate limits (in-process and across replicas through Redis), size limits, local timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml

from router import limits
from router.auth import Principal, hash_key
from router.backends import Usage
from router.errors import RateLimitError
from router.outcomes import SQLiteOutcomeStore
from tests.conftest import (
    ErasingStore,
    LiveServer,
    SlowReserve,
    live,
    policy_yaml,
    sent_raw,
    wait_for,
)
from tests.fake_provider import FakeProvider
from tests.redis_server import RedisServer, redis_binary
from tests.scripted_local import ScriptedLocal

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hi"}]}


def _post(server: LiveServer, body: object = CHAT, key: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return server.http.post("/v1/chat/completions", json=body, headers=headers)


def _records_settle(server: LiveServer, expected: int) -> None:
    store = server.gateway.outcomes
    assert wait_for(lambda: store.count() >= expected), (store.count(), expected)
    store.flush()
    assert store.count() == expected


def _assert_rate_limited(response: httpx.Response, code: str) -> None:
    assert response.status_code == 429, response.text
    # Until the sliding count has room: up to two minutes (this minute's count weighs in the next)
    assert 1 <= int(response.headers["retry-after"]) <= 120
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
        with srv.http.stream("POST", "/v1/chat/completions", json=stream) as response:
            assert response.status_code == 200
            response.read()  # 36 used: the stream's usage is charged when it ends
        _assert_rate_limited(_post(srv, hard), "tpm_limit_exceeded")
        # Listing models and labelling spend no tokens: only the request count applies.
        assert srv.http.get("/v1/models").status_code == 200
        label = srv.http.post("/v1/feedback", json={"request_id": "req_x", "thumbs": "up"})
        assert label.status_code != 429


@pytest.mark.skipif(redis_binary() is None, reason="no redis-server binary")
def test_rate_limit_is_shared_by_replicas_through_redis(tmp_path: Path, fake: FakeProvider) -> None:
    with RedisServer(tmp_path) as redis_server:

        def replica(name: str) -> Iterator[LiveServer]:
            return _replica(tmp_path / name, fake, redis_server, redis_outcomes=False)

        with replica("a") as a, replica("b") as b:
            got = [_post(srv, key="tg-k").status_code for srv in (a, b, a, b)]
            assert got == [200] * 4
            _assert_rate_limited(_post(a, key="tg-k"), "rpm_limit_exceeded")
            _assert_rate_limited(_post(b, key="tg-k"), "rpm_limit_exceeded")
        hashed = limits.tenant_hash("t")
        keys = [k.decode() for k in redis_server.client().keys(f"tiergate:rl:{hashed}:req:*")]
        assert len(keys) == 1


@pytest.mark.skipif(redis_binary() is None, reason="no redis-server binary")
def test_a_redis_top_up_that_reaches_redis_after_its_settle_leaks_no_tokens(
    tmp_path: Path,
) -> None:
    """A request that goes on to another model tops its token reservation up, and settles when
    it ends; each change is sent to Redis by its own task, on whichever pooled connection is
    free. A top-up that reached Redis after the settle (its connection slower: a new one, a
    script reloaded) found the window taken below zero by the settle and set to 0, then added
    its tokens back: 1,000 tokens no request used counted against the tenant for the window."""
    tenant = Principal(tenant="acme", permissions=frozenset(), key_id="k")

    async def scenario(url: str) -> int:
        limiter = limits.RateLimiter(rpm=None, tpm=100_000, redis_url=url)
        hold = await limiter.reserve(tenant, 100)
        script, sent = limiter._settle_script, []

        async def first_one_slow(*args: Any, **kwargs: Any) -> Any:
            sent.append(kwargs["args"][0])
            if len(sent) == 1:
                await asyncio.sleep(0.2)  # the top-up's connection is slower than the settle's
            return await script(*args, **kwargs)

        limiter._settle_script = first_one_slow
        hold.top_up(1000)  # a fallback to a model that may write more
        hold.settle(30)  # the request ended: it used 30 tokens
        await limiter.aclose()  # its changes reach Redis
        assert sent == [1000, 30 - 1100]
        return hold.start

    with RedisServer(tmp_path) as redis_server:
        start = asyncio.run(scenario(redis_server.url))
        window = f"{limits._redis_base('acme')}:tok:{start}"
        assert int(redis_server.client().get(window) or 0) == 30


@pytest.mark.skipif(redis_binary() is None, reason="no redis-server binary")
def test_a_token_reservation_made_as_its_client_leaves_is_released(
    tmp_path: Path, fake: FakeProvider
) -> None:
    """A request's tokens are reserved in Redis before it is served. One cancelled while the
    reservation was on its way (its client left; the server stopping) ended at once, with no
    hold to settle, and the script then reserved its tokens in the tenant's window: none of
    them used, counted against the limit until the window passed (2 minutes). Released once
    it lands, the window holds only what was used."""
    from router.gateway import Call

    fake.reset()
    with (
        RedisServer(tmp_path) as redis_server,
        live(
            tmp_path,
            policy_yaml(fake),
            tpm_limit=100_000,
            redis_url=redis_server.url,
            api_keys_file=_one_key(tmp_path),
        ) as srv,
    ):
        assert _post(srv, key="tg-k").status_code == 200  # the limiter's scripts are loaded
        outcomes = srv.gateway.outcomes
        assert wait_for(lambda: outcomes.count() == 1) and outcomes.flush()
        used = _used(outcomes.recent(1))
        assert wait_for(lambda: _held_tokens(srv, "t") == used)
        limiter = srv.gateway.limiter
        script = limiter._reserve_script

        async def leave() -> None:
            landed, answered = asyncio.Event(), asyncio.Event()

            async def answered_late(**kwargs: Any) -> Any:
                done = await script(**kwargs)  # reserved in Redis
                landed.set()
                await answered.wait()  # its answer not read yet as the request is cancelled
                return done

            limiter._reserve_script = answered_late
            principal = Principal(tenant="t", permissions=frozenset(), key_id="k")
            call = Call(body=dict(CHAT), principal=principal, tenant="t")
            serving = asyncio.ensure_future(srv.gateway.serve(call))
            await landed.wait()
            serving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            answered.set()

        srv.run(leave)
        assert wait_for(lambda: outcomes.count() == 2)
        assert wait_for(lambda: _held_tokens(srv, "t") == used, timeout_s=3), (
            _held_tokens(srv, "t"),
            used,
        )


async def _admitted(url: str) -> int:
    """How many of three requests of one tenant a limiter of 2 a minute on ``url`` admits."""
    tenant = Principal(tenant="acme", permissions=frozenset(), key_id="k")
    limiter, n = limits.RateLimiter(rpm=2, tpm=None, redis_url=url), 0
    for _ in range(3):
        with contextlib.suppress(RateLimitError):
            await limiter.admit(tenant)
            n += 1
    await limiter.aclose()
    return n


def test_two_deployments_on_one_redis_keep_apart_by_its_database_number(tmp_path: Path) -> None:
    """Every key Tiergate keeps in Redis begins with ``tiergate:``, and no setting changes
    that: two deployments on one Redis keep apart by the database number in their
    TIERGATE_REDIS_URL (docs/kubernetes.md). A tenant's requests and outcomes in one are not
    counted in the other."""
    from router.outcomes_redis import RedisOutcomeStore
    from tests.records import outcome

    with RedisServer(tmp_path) as redis_server:
        urls = [redis_server.url, redis_server.url.removesuffix("/0") + "/1"]
        assert [asyncio.run(_admitted(url)) for url in urls] == [2, 2]
        stores = [RedisOutcomeStore(u, journal=tmp_path / f"{i}.jsonl") for i, u in enumerate(urls)]
        for store in stores:
            store.start()
        try:
            stores[0].submit(outcome(tenant="acme"))
            assert stores[0].flush(10)
            assert [store.count("acme") for store in stores] == [1, 0]
        finally:
            for store in stores:
                store.close()


@pytest.mark.skipif(redis_binary() is None, reason="no redis-server binary")
def test_in_a_redis_outage_each_replica_admits_only_its_share_of_the_limit(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # Each replica fell back to the whole limit on its own: two replicas admitted 2 x rpm.
    with RedisServer(tmp_path) as redis_server:

        def replica(name: str) -> Iterator[LiveServer]:
            return _replica(tmp_path / name, fake, redis_server, redis_outcomes=True)

        with replica("a") as a, replica("b") as b:
            stores = [a.gateway.outcomes, b.gateway.outcomes]
            assert wait_for(lambda: [s.replicas for s in stores] == [2, 2], timeout_s=10)
            redis_server.stop()
            got = {
                name: [_post(srv, key="tg-k").status_code for _ in range(4)]
                for name, srv in (("a", a), ("b", b))
            }
            assert got == {"a": [200, 200, 429, 429], "b": [200, 200, 429, 429]}
            refused = _post(a, key="tg-k")
            _assert_rate_limited(refused, "rpm_limit_exceeded")
            assert refused.json()["error"]["message"] == (
                "tenant 't' is over its limit of 2 requests per minute (this replica's share"
                " of it while Redis is unreachable, 1/2)"
            )


@pytest.mark.skipif(redis_binary() is None, reason="no redis-server binary")
def test_an_erasure_leaves_no_window_that_names_the_tenant_and_no_fresh_minute(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`tiergate outcomes delete --tenant` beside a replica whose rate limits live in Redis:
    the windows were `tiergate:rl:<tenant>:req:<minute>`, naming the tenant for two minutes
    after its erasure. They are kept under its hash, and count on across the erasure: the
    tenant gets no fresh minute of requests by being erased."""
    from router.cli import main

    with RedisServer(tmp_path) as redis_server:
        work = tmp_path / "a"
        with _replica(work, fake, redis_server, redis_outcomes=True, tenant="acme-corp") as a:
            assert [_post(a, key="tg-k").status_code for _ in range(4)] == [200] * 4
            assert a.gateway.outcomes.flush(10)
            monkeypatch.setenv("TIERGATE_REDIS_URL", redis_server.url)
            monkeypatch.setenv("TIERGATE_OUTCOME_JOURNAL_PATH", str(tmp_path / "cli.jsonl"))
            assert main(["outcomes", "delete", "--tenant", "acme-corp"]) == 0
            keys = list(redis_server.client().scan_iter())
            assert keys and not [k for k in keys if b"acme-corp" in k]
            _assert_rate_limited(_post(a, key="tg-k"), "rpm_limit_exceeded")


@pytest.mark.skipif(redis_binary() is None, reason="no redis-server binary")
def test_an_erasure_moves_the_windows_an_earlier_release_named_to_the_tenant_s_hash(
    tmp_path: Path,
) -> None:
    """A replica of the release before, still serving in a rolling upgrade, counts the
    tenant's windows under its name: an erasure moves their counts under its hash, where this
    release's limits count them, and leaves another tenant's (acme-corp:b's) alone."""
    from router.outcomes_redis import RedisOutcomeStore

    tenant = Principal(tenant="acme-corp", permissions=frozenset(), key_id="k")
    with RedisServer(tmp_path) as redis_server:
        client = redis_server.client()
        start = int(time.time() // 60) * 60
        client.set(f"tiergate:rl:acme-corp:req:{start}", 3, ex=120)
        client.set(f"tiergate:rl:acme-corp:tok:{start}", 500, ex=120)
        client.set(f"tiergate:rl:acme-corp:b:req:{start}", 1, ex=120)
        store = RedisOutcomeStore(redis_server.url, journal=tmp_path / "cli.jsonl")
        store.connect()
        try:
            store.erase(tenant="acme-corp")
        finally:
            store.close()
        named = sorted(k.decode() for k in client.scan_iter() if b"acme-corp" in k)
        assert named == [f"tiergate:rl:acme-corp:b:req:{start}"]
        assert 0 < client.ttl(f"tiergate:rl:{limits.tenant_hash('acme-corp')}:req:{start}") <= 120
        limiter = limits.RateLimiter(rpm=4, tpm=1000, redis_url=redis_server.url)

        async def admitted() -> list[bool]:
            got = []
            for _ in range(2):
                try:
                    await limiter.admit(tenant, tokens=False)
                    got.append(True)
                except RateLimitError:
                    got.append(False)
            await limiter.aclose()
            return got

        assert asyncio.run(admitted()) == [True, False]  # 3 counted before, 1 more let in


def test_without_a_replica_count_the_outage_limit_is_the_whole_limit() -> None:
    tenant = Principal(tenant="t", permissions=frozenset(), key_id="k")
    closed_port = "redis://127.0.0.1:9/0"  # nothing listens on the discard port
    shared = limits.RateLimiter(rpm=4, tpm=None, redis_url=closed_port, replicas=lambda: 3)
    alone = limits.RateLimiter(rpm=4, tpm=None, redis_url=closed_port)

    async def admitted(limiter: limits.RateLimiter) -> int:
        n = 0
        for _ in range(6):
            try:
                await limiter.admit(tenant)
            except RateLimitError:
                continue
            n += 1
        await limiter.aclose()
        return n

    assert asyncio.run(admitted(shared)) == 2  # ceil(4 / 3)
    assert asyncio.run(admitted(alone)) == 4


def _replica(
    work: Path,
    fake: FakeProvider,
    redis_server: RedisServer,
    *,
    redis_outcomes: bool,
    tenant: str = "t",
) -> Iterator[LiveServer]:
    """A replica with rpm 4 and one key, its limits in ``redis_server`` (its outcomes too with
    ``redis_outcomes``, else in its own SQLite file)."""
    from router.outcomes_redis import RedisOutcomeStore

    work.mkdir()
    return live(
        work,
        policy_yaml(fake),
        local_backend_obj=ScriptedLocal(),
        outcomes=RedisOutcomeStore(redis_server.url, journal=work / "journal.jsonl")
        if redis_outcomes
        else SQLiteOutcomeStore(work / "o.db"),
        redis_url=redis_server.url,
        rpm_limit=4,
        api_keys_file=_one_key(work, tenant),
    )


def _one_key(work: Path, tenant: str = "t") -> Path:
    path = work / "keys.yaml"
    entry = {"sha256": hash_key("tg-k"), "tenant": tenant, "permissions": []}
    path.write_text(yaml.safe_dump({"keys": [entry]}))
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

    # A real socket: a chunked body arrives in pieces, as from a client.
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


def test_a_responses_request_over_a_cap_is_told_its_own_field(small: LiveServer) -> None:
    """/v1/responses has no max_tokens or messages: the 400 names the fields it was sent."""
    over = small.http.post(
        "/v1/responses", json={"model": "auto", "input": "hi", "max_output_tokens": 101}
    )
    assert over.status_code == 400, over.text
    assert over.json()["error"]["param"] == "max_output_tokens"
    assert over.json()["error"]["message"].startswith("max_output_tokens 101 ")
    many = [{"role": "user", "content": "hi"}] * 5
    response = small.http.post("/v1/responses", json={"model": "auto", "input": many})
    assert response.status_code == 400 and response.json()["error"]["param"] == "input"


def test_the_dry_run_refuses_what_chat_refuses(small: LiveServer) -> None:
    """/v1/route applies chat's size caps, so it never explains a route chat would refuse."""
    many = {"model": "auto", "messages": [{"role": "user", "content": "hi"}] * 5}
    response = small.http.post("/v1/route", json=many)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
    response = small.http.post("/v1/route", json={**CHAT, "max_tokens": 101})
    assert response.status_code == 400 and response.json()["error"]["param"] == "max_tokens"
    assert small.http.post("/v1/route", json=CHAT).status_code == 200


@pytest.mark.gguf
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
    policy = policy_yaml(fake, on_failure="closed")
    with live(tmp_path, policy, gguf=True, local_timeout_s=0.2) as srv:
        _assert_stopped_and_fell_back(srv, fake, body)
    # the policy model's timeout_s wins over the setting
    fake.reset()
    policy = policy_yaml(fake, on_failure="closed").replace(
        "    context_window: 2048\n", "    context_window: 2048\n    timeout_s: 0.2\n", 1
    )
    assert "timeout_s: 0.2" in policy
    (tmp_path / "policy").mkdir()
    with live(tmp_path / "policy", policy, gguf=True, local_timeout_s=300) as srv:
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


@pytest.mark.parametrize("store", ["in-process", "redis"])
def test_a_client_that_waits_as_retry_after_says_is_let_in(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    """Retry-After said "until this minute ends", but the minute's count still weighs in the
    next one: the OpenAI SDK slept 40 s as told and got a second 429 (Retry-After 60). It now
    says when the count has slid down enough: a second sooner is still refused."""
    if store == "redis" and redis_binary() is None:
        pytest.skip("no redis-server binary")
    now = [6000.0 + 20]  # second 20 of a minute
    monkeypatch.setattr(limits.time, "time", lambda: now[0])
    tenant = Principal(tenant="t", permissions=frozenset(), key_id="k")

    async def refused(call: Any) -> int | None:
        try:
            await call()
        except RateLimitError as exc:
            return int(exc.headers["retry-after"])
        return None

    async def scenario(redis_url: str | None) -> list[int | None]:
        requests = limits.RateLimiter(rpm=3, tpm=None, redis_url=redis_url)
        tokens = limits.RateLimiter(rpm=None, tpm=100, redis_url=redis_url)
        tenant_tokens = Principal(tenant="u", permissions=frozenset(), key_id="k2")
        admit = lambda: requests.admit(tenant)  # noqa: E731
        reserve = lambda: tokens.reserve(tenant_tokens, 90)  # noqa: E731
        got = [await refused(admit) for _ in range(4)]  # 3 in, the 4th refused
        got += [await refused(reserve) for _ in range(3)]  # 90 + 90 reserved, then refused
        start = now[0]
        wait, wait_tokens = got[3], got[6]
        assert wait is not None and wait_tokens is not None
        now[0] = start + wait - 1
        got.append(await refused(admit))  # not yet: a second sooner
        now[0] = start + wait
        got.append(await refused(admit))
        now[0] = start + wait_tokens - 1
        got.append(await refused(reserve))
        now[0] = start + wait_tokens
        got.append(await refused(reserve))
        await requests.aclose()
        await tokens.aclose()
        return got

    if store == "redis":
        with RedisServer(tmp_path) as redis_server:
            got = asyncio.run(scenario(redis_server.url))
    else:
        got = asyncio.run(scenario(None))
    # 3 requests weigh 3 * 40/60 = 2 (room for one) 20 s into the next minute: 60 s from now,
    # not the 40 s left in this one; 180 tokens weigh under 100 past 26.7 s into it.
    assert got == [None, None, None, 60, None, None, 67, 1, None, 1, None]


# -- reservations: limits hold under concurrency and when a client leaves early ---------------

LONG = "please answer this question " * 4  # a prompt estimate above what the fakes report


async def _burst(url: str, body: object, n: int, key: str | None = None) -> list[httpx.Response]:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=n)) as client:
        return list(
            await asyncio.gather(
                *(client.post(url + "/v1/chat/completions", json=body, headers=headers)
                  for _ in range(n))
            )
        )  # fmt: skip


def _used(rows: list[dict[str, object]]) -> int:
    return sum(int(r["prompt_tokens"]) + int(r["completion_tokens"]) for r in rows)  # type: ignore[call-overload]


def test_concurrent_requests_stay_within_the_token_limit(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # 100 concurrent requests once spent 1,500 tokens against a 150-token limit: each was
    # admitted before any had been charged.
    fake.reset()
    local = ScriptedLocal(queue_size=200, words=20)
    body = {**CHAT, "messages": [{"role": "user", "content": LONG}], "max_tokens": 20}
    with live(tmp_path, policy_yaml(fake), local_backend_obj=local, tpm_limit=150) as srv:
        got = asyncio.run(_burst(srv.url, body, 40))
        codes = [r.status_code for r in got]
        assert set(codes) == {200, 429} and codes.count(200) >= 2
        refused = next(r for r in got if r.status_code == 429)
        assert refused.json()["error"]["code"] == "tpm_limit_exceeded"
        store = srv.gateway.outcomes
        assert wait_for(lambda: store.count() == 40) and store.flush()
        rows = [r for r in store.recent(100) if r["status"] == "ok"]
        reservation = int(rows[0]["signals"]["prompt_held"]) + 20
        assert _used(rows) <= 150 + reservation


def test_answers_without_max_tokens_stay_within_the_token_limit(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # A request without max_tokens reserved TIERGATE_RESERVE_TOKENS (4,096) of completion in
    # the token window while gpt-4o wrote up to its own limit (16,384): 20 concurrent ones
    # used 81,975 tokens of a 20,000-token minute, where one reservation is 16,422.
    from tests.fake_provider import Behaviour

    fake.reset(Behaviour(mode="stall", stall_s=0.5, completion_tokens=16384))
    body = {key: value for key, value in HARD_LONG.items() if key != "max_tokens"}
    local = ScriptedLocal()
    with live(tmp_path, policy_yaml(fake), local_backend_obj=local, tpm_limit=20_000) as srv:
        got = asyncio.run(_burst(srv.url, body, 20))
        codes = [r.status_code for r in got]
        assert set(codes) == {200, 429}, codes
        store = srv.gateway.outcomes
        assert wait_for(lambda: store.count() == 20) and store.flush()
        rows = [r for r in store.recent(100) if r["status"] == "ok"]
        assert {r["model"] for r in rows} == {"gpt-4o"}
        reservation = int(rows[0]["signals"]["prompt_held"]) + 16384
        assert _used(rows) <= 20_000 + reservation, (_used(rows), reservation)


def _reaching_gpt5(fake: FakeProvider) -> str:
    """The test policy, with gpt-5 (128,000 output tokens in litellm's map) as the first closed
    model: a local request that fails, or a full local queue, goes on to it."""
    gpt5 = "  gpt-5:\n    tier: closed\n    litellm_model: openai/gpt-5\n    api_base: "
    gpt5 += fake.base_url
    return (
        policy_yaml(fake, on_failure="closed")
        .replace("local_model: local\n", f"{gpt5}\nlocal_model: local\n")
        .replace("closed_models: [gpt-4o, claude]", "closed_models: [gpt-5, gpt-4o, claude]")
    )


def _holding(queue_size: int = 0) -> ScriptedLocal:
    """A local tier whose calls wait for ``release``."""
    local = ScriptedLocal(queue_size=queue_size)
    local.mode = "hold"
    return local


def _held_tokens(srv: LiveServer, tenant: str) -> int:
    """The tokens the limiter counts for ``tenant``, reservations included: in Redis, where it
    keeps them, else in process (no public reading: only the limiter needs it)."""
    limiter = srv.gateway.limiter
    if limiter._redis_url is None:
        return limiter._tokens[tenant].current
    client = redis.Redis.from_url(limiter._redis_url)
    try:
        keys = client.keys(f"tiergate:rl:{limits.tenant_hash(tenant)}:tok:*")
        return sum(int(client.get(key) or 0) for key in keys)
    finally:
        client.close()


def test_a_local_request_reserves_its_local_call_not_its_closed_fallback(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # A local request without max_tokens reserved what any model it may reach can write: its
    # fallback gpt-5's 128,000 tokens, so one filled a 20,000-token minute and the tenant's
    # other requests were refused (429) until it ended. It reserves its local call's tokens.
    fake.reset()
    local = _holding(queue_size=10)
    releasing = threading.Thread(
        target=lambda: (wait_for(lambda: local.calls == 4, timeout_s=5), local.release.set())
    )
    with live(tmp_path, _reaching_gpt5(fake), local_backend_obj=local, tpm_limit=20_000) as srv:
        releasing.start()
        got = asyncio.run(_burst(srv.url, CHAT, 4))
        releasing.join()
        assert [r.status_code for r in got] == [200] * 4, [r.text for r in got]
        assert {r.headers["x-tiergate-tier"] for r in got} == {"local"}
        assert fake.received == []


def _falling_back(
    srv: LiveServer,
    local: ScriptedLocal,
    fake: FakeProvider,
    held: Callable[[], float],
    *,
    topped: object,
    key: str | None = None,
) -> tuple[float, float, bool]:
    """Ask once, its local call held, then failed, so that it falls back to gpt-5 (stalled):
    ``held`` read during the local call, and during gpt-5's, and whether it equalled ``topped``
    there within 2 s. The answer is gpt-5's."""
    answers: list[httpx.Response] = []
    asking = threading.Thread(target=lambda: answers.append(_post(srv, key=key)))
    asking.start()
    try:
        assert wait_for(lambda: local.calls == 1)
        during_local = held()
        local.mode = "fail"
        local.release.set()
        assert wait_for(lambda: len(fake.received) == 1)
        topped_up = wait_for(lambda: held() == topped, timeout_s=2)
        during_closed = held()
    finally:
        local.release.set()
        fake.unstall()
        asking.join(30)
    assert answers[0].status_code == 200
    assert answers[0].headers["x-tiergate-model"] == "gpt-5"
    return during_local, during_closed, topped_up


@pytest.mark.parametrize("store", ["in-process", "redis"])
def test_a_fallback_to_a_closed_model_tops_the_reservation_up(
    tmp_path: Path, fake: FakeProvider, store: str
) -> None:
    """The local call reserves its own tokens; the fallback to gpt-5 adds what gpt-5 may write
    before it is called, and the end settles to what was used. The window is past the limit
    (4,000) by then: a request under way is not refused."""
    from tests.fake_provider import Behaviour

    if store == "redis" and redis_binary() is None:
        pytest.skip("no redis-server binary")
    fake.reset(Behaviour(mode="stall", stall_s=10))
    local = _holding()
    with contextlib.ExitStack() as stack:
        redis_url = None
        if store == "redis":
            redis_url = stack.enter_context(RedisServer(tmp_path)).url
        srv = stack.enter_context(
            live(
                tmp_path,
                _reaching_gpt5(fake),
                local_backend_obj=local,
                tpm_limit=4_000,
                redis_url=redis_url,
                api_keys_file=_one_key(tmp_path),
            )
        )
        routed = srv.http.post("/v1/route", json=CHAT, headers={"authorization": "Bearer tg-k"})
        prompt = routed.json()["signals"]["prompt_held"]
        during_local, during_closed, topped_up = _falling_back(
            srv, local, fake, lambda: _held_tokens(srv, "t"), topped=prompt + 128_000, key="tg-k"
        )
        assert during_local == prompt + 4096, during_local
        assert topped_up, (during_closed, prompt + 128_000)
        outcomes = srv.gateway.outcomes
        assert wait_for(lambda: outcomes.count() == 1) and outcomes.flush()
        used = _used(outcomes.recent(1))
        assert wait_for(lambda: _held_tokens(srv, "t") == used), (_held_tokens(srv, "t"), used)


def _budget_policy(fake: FakeProvider, budget: float, tenant: str = "default") -> str:
    return policy_yaml(
        fake,
        extra=f"tenants:\n  {tenant}: {{daily_budget_usd: {budget}, over_budget: reject}}\n",
    )


HARD_LONG = {
    "model": "auto",
    "messages": [{"role": "user", "content": "HARD " + LONG}],
    "max_tokens": 7,
}


def _held_usd(srv: LiveServer, tenant: str) -> float:
    """USD the outcome store holds for ``tenant``'s requests in flight: in Redis, where a shared
    store keeps its holds, else in the writer's ledger (no public reading: only budgets need it)."""
    from router.outcomes_redis import RedisOutcomeStore

    store = srv.gateway.outcomes
    if not isinstance(store, RedisOutcomeStore):
        return store.ledger._held.get(tenant, 0.0)  # type: ignore[attr-defined]
    return sum(float(v) for v in store._client.hvals(store.key("hold", tenant)))


def test_local_requests_in_flight_hold_the_local_cost_not_the_fallback_s(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # A local request without max_tokens held what its fallback gpt-5 may write (128,000 tokens,
    # $1.28): with two in flight, a $2/day tenant's closed-bound request was refused, 429
    # "spent $2.56 of its $2.00 daily budget", though nothing had been spent.
    fake.reset()
    local = _holding(queue_size=10)
    policy = (
        _reaching_gpt5(fake) + "tenants:\n  default: {daily_budget_usd: 2, over_budget: reject}\n"
    )
    with live(tmp_path, policy, local_backend_obj=local) as srv:
        asking = [threading.Thread(target=_post, args=(srv,)) for _ in range(2)]
        for thread in asking:
            thread.start()
        try:
            assert wait_for(lambda: local.calls == 2)
            held = _held_usd(srv, "default")
            closed = _post(srv, {**CHAT, "messages": [{"role": "user", "content": "HARD hi"}]})
        finally:
            local.release.set()
            for thread in asking:
                thread.join(30)
        assert closed.status_code == 200, closed.text
        assert closed.headers["x-tiergate-model"] == "gpt-5"
        assert held < 0.01, held


@pytest.mark.parametrize("store", ["in-process", "redis"])
def test_a_fallback_to_a_closed_model_tops_the_budget_hold_up(
    tmp_path: Path, fake: FakeProvider, store: str
) -> None:
    """The local call holds its own cost; the fallback to gpt-5 adds what gpt-5 may cost before
    it is called, with no budget check ($0.50 is passed by then: a request under way is not
    refused), and the record settles the hold."""
    from router.outcomes_redis import RedisOutcomeStore
    from tests.fake_provider import Behaviour

    if store == "redis" and redis_binary() is None:
        pytest.skip("no redis-server binary")
    fake.reset(Behaviour(mode="stall", stall_s=10))
    local = _holding()
    policy = (
        _reaching_gpt5(fake) + "tenants:\n  default: {daily_budget_usd: 0.5, over_budget: reject}\n"
    )
    with contextlib.ExitStack() as stack:
        outcomes = None
        if store == "redis":
            url = stack.enter_context(RedisServer(tmp_path)).url
            outcomes = RedisOutcomeStore(url, journal=tmp_path / "j.jsonl")
        srv = stack.enter_context(
            live(tmp_path, policy, local_backend_obj=local, outcomes=outcomes)
        )
        routed = srv.http.post("/v1/route", json=CHAT)
        prompt = routed.json()["signals"]["prompt_held"]
        gpt5 = srv.gateway.costs.call_cost(
            srv.gateway.policy.models["gpt-5"], Usage(prompt, 128_000)
        )
        during_local, during_closed, topped_up = _falling_back(
            srv, local, fake, lambda: _held_usd(srv, "default"), topped=pytest.approx(gpt5)
        )
        assert during_local < 0.01, during_local
        assert topped_up, (during_closed, gpt5)
        assert wait_for(lambda: _held_usd(srv, "default") == 0.0)


def test_a_client_leaving_while_its_hold_is_topped_up_leaves_no_hold(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The budget hold is grown in a worker thread when a request falls back. A streamed
    request whose client left meanwhile was cancelled at once and recorded, releasing its hold,
    and the thread then made the hold: a hold of no request, counted in the tenant's spend (and
    renewed in Redis) until the process ended. The cancelled request now waits for the store's
    write to end before it is recorded."""
    from tests.fake_provider import Behaviour

    fake.reset(Behaviour(mode="stall", stall_s=10))
    local = _holding()
    policy = (
        _reaching_gpt5(fake) + "tenants:\n  default: {daily_budget_usd: 5, over_budget: reject}\n"
    )
    with live(tmp_path, policy, local_backend_obj=local) as srv:
        store = srv.gateway.outcomes
        # The top-up of a request under way (no budget check) waits.
        held = SlowReserve(store, lambda request_id, budget: budget is None)
        monkeypatch.setattr(store, "reserve_spend", held)
        sock = sent_raw(srv, {**CHAT, "stream": True})
        try:
            assert wait_for(lambda: local.calls == 1)
            local.mode = "fail"
            local.release.set()
            assert held.writing.wait(10)  # the fallback to gpt-5 grows the hold
        finally:
            sock.close()  # the client leaves while it is grown
        time.sleep(1.0)  # the gateway sees it go (it asks every 0.25 s)
        held.let_write.set()
        assert held.written.wait(10)
        assert wait_for(lambda: store.count() == 1)
        assert store.flush()
        assert wait_for(lambda: _held_usd(srv, "default") == 0.0, timeout_s=3), _held_usd(
            srv, "default"
        )
        assert fake.received == []


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_budget_refusal_owed_to_holds_says_so_and_asks_for_a_retry_in_seconds(
    tmp_path: Path, fake: FakeProvider, backend: str
) -> None:
    """A closed request in flight holds what gpt-4o may write (16,384 tokens, $0.16) of a $0.10
    budget, with nothing spent. Another was refused saying the tenant "spent and held $0.16",
    with ``x-should-retry: false`` and a ``Retry-After`` until midnight UTC, though the hold is
    settled (and what it did not spend freed) as its request ends. Now it says what is spent and
    what is held, with ``x-should-retry: true`` and a ``Retry-After`` of 5 s; on Redis, so
    does another replica, which sees the hold only in Redis (its hold is refused there)."""
    from router.outcomes_redis import RedisOutcomeStore
    from router.policy import usd
    from tests.fake_provider import Behaviour

    if backend == "redis" and redis_binary() is None:
        pytest.skip("no redis-server binary")
    fake.reset(Behaviour(mode="stall", stall_s=10))
    hard = {**CHAT, "messages": [{"role": "user", "content": "HARD hi"}]}
    policy = _budget_policy(fake, 0.1)
    with contextlib.ExitStack() as stack:
        url = None
        if backend == "redis":
            url = stack.enter_context(RedisServer(tmp_path / "redis")).url

        def replica(name: str) -> LiveServer:
            work = tmp_path / name
            work.mkdir()
            store = RedisOutcomeStore(url, journal=work / "j.jsonl") if url else None
            return stack.enter_context(live(work, policy, outcomes=store))

        a = replica("a")
        others = [a, replica("b")] if url else [a]
        asking = threading.Thread(target=_post, args=(a, hard))
        asking.start()
        try:
            assert wait_for(lambda: len(fake.received) == 1)
            held = _held_usd(a, "default")
            refused = [_post(srv, hard) for srv in others]
        finally:
            fake.unstall()
            asking.join(30)
    assert held > 0.1
    for response in refused:
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "budget_exceeded"
        assert response.headers["x-should-retry"] == "true"
        assert response.headers["retry-after"] == "5"  # errors.BUDGET_HELD_RETRY_S
    messages = [r.json()["error"]["message"] for r in refused]
    assert messages[0] == (
        f"tenant 'default' spent $0.00 and holds {usd(held)} for requests in flight of its $0.10"
        " daily budget; what they do not spend is freed as they end"
    )
    if url:  # replica b holds nothing itself: Redis refused its hold
        assert messages[1] == (
            "tenant 'default' spent $0.00 of its $0.10 daily budget; requests in flight hold"
            " the rest"
        )


def test_concurrent_requests_stay_within_the_budget(tmp_path: Path, fake: FakeProvider) -> None:
    # $0.0075 was spent against a $0.0001 budget: the budget was checked against what had been
    # recorded, and none of the requests in flight had been.
    from tests.fake_provider import Behaviour

    fake.reset(Behaviour(mode="stall", stall_s=0.5))
    with live(tmp_path, _budget_policy(fake, 0.0006), local_backend_obj=ScriptedLocal()) as srv:
        got = asyncio.run(_burst(srv.url, HARD_LONG, 30))
        codes = [r.status_code for r in got]
        assert codes.count(200) >= 2 and codes.count(429) >= 10
        refused = next(r for r in got if r.status_code == 429)
        message = refused.json()["error"]["message"]
        held = r"(and holds \$0\.000\d+ for requests in flight )?"
        assert re.search(rf"spent \$0\.\d+ {held}of its \$0\.0006 daily budget", message), message
        # Spent: no retry before the budget's UTC day ends (an SDK retry would be refused, and
        # recorded); held by requests in flight: a retry in seconds.
        for response in (r for r in got if r.status_code == 429):
            text = response.json()["error"]["message"]
            spent = "freed as they end" not in text and "in flight hold" not in text
            assert response.headers["x-should-retry"] == ("false" if spent else "true"), text
            wait = int(response.headers["retry-after"])
            assert 5 < wait <= 86400 if spent else wait == 5, text
        store = srv.gateway.outcomes
        assert wait_for(lambda: store.count() == 30) and store.flush()
        rows = [r for r in store.recent(100) if r["status"] == "ok"]
        spent = sum(float(r["cost_usd"]) for r in rows)
        prompt = int(rows[0]["signals"]["prompt_held"])
        reservation = srv.gateway.costs.closed_cost("openai/gpt-4o", prompt, 7)
        assert spent <= 0.0006 + reservation, (spent, reservation)
        # A refusal called no model: no tier (it counted as a local failure on the dashboard
        # and in tiergate_requests_total{tier="local"}), its decision kept for the explanation.
        refusals = [r for r in store.recent(100) if r["http_status"] == 429]
        assert len(refusals) == codes.count(429)
        assert all(r["tier"] is None and r["model"] is None for r in refusals)
        assert all(r["error_type"] == "budget_exceeded" and r["rule"] for r in refusals)


def test_concurrent_prompts_no_tokenizer_merges_stay_within_the_budget(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # A prompt of text that merges nothing ("a\n" repeated: a token a byte for GPT-4o's
    # tokenizer) was held at Tiergate's estimate, 3.5 characters a token: each request in
    # flight held under a third of what it was billed, and concurrent ones spent three times
    # the budget. Held at the most such a prompt can be, they stay within one request of it.
    from tests.fake_provider import Behaviour

    fake.reset(Behaviour(mode="stall", stall_s=0.5, bill_bytes=True))
    body = {**HARD_LONG, "messages": [{"role": "user", "content": "HARD " + "a\n" * 3000}]}
    budget = 0.05  # gpt-4o: $2.50 a million prompt tokens, about $0.015 a request
    with live(tmp_path, _budget_policy(fake, budget), local_backend_obj=ScriptedLocal()) as srv:
        got = asyncio.run(_burst(srv.url, body, 20))
        assert {r.status_code for r in got} == {200, 429}
        store = srv.gateway.outcomes
        assert wait_for(lambda: store.count() == 20) and store.flush()
        costs = [float(r["cost_usd"]) for r in store.recent(100) if r["status"] == "ok"]
    assert sum(costs) <= budget + max(costs), (sum(costs), len(costs))


def _spend_twice(srv: LiveServer) -> list[httpx.Response]:
    """Two closed calls of tenant default, recorded."""
    sent = [_post(srv, HARD_LONG) for _ in range(2)]
    assert [r.headers["x-tiergate-tier"] for r in sent] == ["closed", "closed"]
    assert srv.gateway.outcomes.flush(10)
    return sent


def _refused_after_a_restart(
    tmp_path: Path, fake: FakeProvider, erasing: ErasingStore, spent: float
) -> None:
    """A restart with a budget under ``spent``, with no record left: the spend still counts,
    and the next closed call is refused (the fake saw only the two of :func:`_spend_twice`)."""
    with live(tmp_path, _budget_policy(fake, spent * 0.9), outcomes=erasing.make()) as srv:
        assert srv.gateway.outcomes.count() == 0
        assert srv.gateway.outcomes.spend_today("default") == pytest.approx(spent)
        refused = _post(srv, HARD_LONG)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["code"] == "budget_exceeded"
    assert len([r for r in fake.received if "HARD" in str(r.body)]) == 2


def test_an_erased_request_s_spend_still_counts_against_the_budget_after_a_restart(
    tmp_path: Path, fake: FakeProvider, erasing: ErasingStore
) -> None:
    """`tiergate outcomes delete` of a tenant's requests, then a restart: SQLite rebuilt the
    day's spend from the records left, so what the erased requests cost left the budget and
    the tenant could spend it again. Redis keeps the day's spend apart from the records."""
    fake.reset()
    with live(tmp_path, _budget_policy(fake, 1.0), outcomes=erasing.make()) as srv:
        sent = _spend_twice(srv)
        spent = srv.gateway.outcomes.spend_today("default")
    assert spent > 0
    assert (
        erasing.delete(*[arg for r in sent for arg in ("--request-id", r.headers["x-request-id"])])
        == 0
    )
    _refused_after_a_restart(tmp_path, fake, erasing, spent)


def test_an_erased_tenant_s_spend_still_counts_and_redis_does_not_name_it(
    tmp_path: Path, fake: FakeProvider, erasing: ErasingStore
) -> None:
    """`tiergate outcomes delete --tenant default` beside a running app: Redis kept the
    tenant's name as a field of `tiergate:spend:<day>` for two days. Its spend now moves to
    the tenant's hash, where the budget still finds it: a replica started after the erasure
    refuses as the one before it would have."""
    fake.reset()
    with live(tmp_path, _budget_policy(fake, 1.0), outcomes=erasing.make()) as srv:
        _spend_twice(srv)
        spent = srv.gateway.outcomes.spend_today("default")
        assert spent > 0
        assert erasing.delete("--tenant", "default") == 0
    if erasing.url is not None:
        client = redis.Redis.from_url(erasing.url)
        keys = list(client.scan_iter())
        assert not [k for k in keys if b"default" in k]
        spends = [client.hgetall(k) for k in keys if k.startswith(b"tiergate:spend:")]
        assert spends and not [f for day in spends for f in day if b"default" in f]
    _refused_after_a_restart(tmp_path, fake, erasing, spent)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_a_replica_started_past_a_spent_budget_sees_it_from_its_first_request(
    tmp_path: Path, fake: FakeProvider, backend: str
) -> None:
    """A replica added (a rollout, an autoscaler) while a tenant was past its budget decided
    that tenant's requests against $0 until its first refresh from Redis, about a second in:
    its hold in Redis still refused the closed call, but /v1/route answered gpt-4o and the 429
    said "spent $0.00 of its $0.00001 daily budget; requests in flight hold the rest"."""
    from router.outcomes_redis import RedisOutcomeStore
    from router.policy import usd

    if backend == "redis" and redis_binary() is None:
        pytest.skip("no redis-server binary")
    policy = policy_yaml(
        fake, extra="tenants:\n  default: {daily_budget_usd: 0.00001, over_budget: reject}\n"
    )
    fake.reset()
    with contextlib.ExitStack() as stack:
        url = None
        if backend == "redis":
            url = stack.enter_context(RedisServer(tmp_path / "redis")).url

        def replica(name: str) -> Iterator[LiveServer]:
            work = tmp_path / name if url else tmp_path  # SQLite: one file, restarted
            work.mkdir(exist_ok=True)
            store = RedisOutcomeStore(url, journal=work / "j.jsonl") if url else None
            return live(work, policy, outcomes=store)

        with replica("a") as a:
            assert _post(a, HARD_LONG).headers["x-tiergate-model"] == "gpt-4o"
            assert a.gateway.outcomes.flush(10)
            spent = a.gateway.outcomes.spend_today("default")
        assert spent > 0.00001
        fake.reset()
        with replica("b") as b:
            plan = b.http.post("/v1/route", json=HARD_LONG).json()["decision"]
            refused = _post(b, HARD_LONG)
    why = f"tenant 'default' spent {usd(spent)} of its $0.00001 daily budget"
    assert (plan["rule"], plan["rejected"]) == ("budget:default", why)
    assert refused.status_code == 429, refused.text
    assert refused.json()["error"]["message"] == why
    assert refused.headers["x-should-retry"] == "false"  # spent: a retry waits for the next day
    assert fake.received == []


def _burst_within_budget(
    tmp_path: Path,
    fake: FakeProvider,
    body: dict[str, Any],
    budget: float,
    completion: int,
    *,
    gpt_4o: str = "",
) -> None:
    # 30 concurrent requests to gpt-4o (with the policy lines ``gpt_4o`` added to it), each
    # billed ``completion`` tokens, spend at most the budget plus one request's reservation.
    policy = _budget_policy(fake, budget)
    if gpt_4o:
        policy = policy.replace(GPT_4O, GPT_4O + gpt_4o)
    with live(tmp_path, policy, local_backend_obj=ScriptedLocal()) as srv:
        rows = _answered_of_a_burst(srv, body, 1)
        spent = sum(float(r["cost_usd"]) for r in rows)
        prompt = int(rows[0]["signals"]["prompt_held"])
        reservation = srv.gateway.costs.closed_cost("openai/gpt-4o", prompt, completion)
        assert spent <= budget + reservation, (spent, reservation)
        assert all(r["completion_tokens"] == completion for r in rows)


def _answered_of_a_burst(srv: LiveServer, body: dict[str, Any], least: int) -> list[Any]:
    # The records of the answered requests of 30 concurrent ones, at least ``least`` of them.
    got = asyncio.run(_burst(srv.url, body, 30))
    assert [r.status_code for r in got].count(200) >= least
    store = srv.gateway.outcomes
    assert wait_for(lambda: store.count() == 30) and store.flush()
    return [r for r in store.recent(100) if r["status"] == "ok"]


GPT_4O = "    litellm_model: openai/gpt-4o\n"


def test_each_choice_of_n_counts_against_the_budget(tmp_path: Path, fake: FakeProvider) -> None:
    # Requests asking for n=16 choices held the cost of one, while the provider billed sixteen:
    # 30 concurrent ones spent several times the budget plus one reservation.
    from tests.fake_provider import Behaviour

    fake.reset(Behaviour(mode="stall", stall_s=0.5, bill_choices=True))
    _burst_within_budget(tmp_path, fake, {**HARD_LONG, "n": 16}, 0.0003, 7 * 16)


def test_answers_without_max_tokens_stay_within_the_budget(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # A request without max_tokens held TIERGATE_RESERVE_TOKENS (4096) of completion while
    # gpt-4o wrote up to its own limit (16,384): 30 concurrent ones spent $2.13 of a $0.50
    # budget, four times past it, where one reservation is $0.16.
    from tests.fake_provider import Behaviour

    fake.reset(Behaviour(mode="stall", stall_s=0.5, completion_tokens=16384))
    body = {key: value for key, value in HARD_LONG.items() if key != "max_tokens"}
    _burst_within_budget(tmp_path, fake, body, 0.5, 16384)


def test_answers_without_max_tokens_stay_within_a_policy_output_limit(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # With max_output_tokens: 2000 for gpt-4o, a request without max_tokens was held at 2,000
    # completion tokens but sent no limit, and gpt-4o wrote up to its own (16,384): the spend
    # passed the budget plus one reservation. It is sent max_completion_tokens 2000.
    from tests.fake_provider import Behaviour

    fake.reset(Behaviour(mode="stall", stall_s=0.5, completion_tokens=16384))
    body = {key: value for key, value in HARD_LONG.items() if key != "max_tokens"}
    _burst_within_budget(tmp_path, fake, body, 0.5, 2000, gpt_4o="    max_output_tokens: 2000\n")


@pytest.mark.parametrize(
    ("limits", "held"),
    [
        ("    max_output_tokens: 8192\n", 8192),  # the policy's limit, which it is sent
        ("    context_window: 200000\n", 4096),  # unmapped: sent 4096, not the window's rest
    ],
)
def test_a_claude_call_without_max_tokens_is_held_at_what_it_is_sent(
    tmp_path: Path, fake: FakeProvider, limits: str, held: int
) -> None:
    # The budget hold priced a call without max_tokens at litellm's table, else the context
    # window's rest: 199,900 tokens for a Claude litellm does not map, which is sent 4,096, and
    # 4,096 for one whose policy gives 8,192, which is sent 8,192 (and may write them).
    from router.gateway import RequestContext
    from router.signals import Signals

    claude = "    litellm_model: anthropic/claude-3-5-sonnet-20241022\n"
    policy = policy_yaml(fake).replace(claude, claude + limits)
    with live(tmp_path, policy) as srv:
        ctx = RequestContext(request_id="r", tenant="t", started=0.0, stream=False)
        ctx.signals = Signals(alias="auto", prompt_tokens=100)
        spec = srv.gateway.policy.models["claude"]
        assert srv.gateway.call_tokens(ctx, 4096, spec) == (100, held)
        ctx.signals = Signals(alias="auto", prompt_tokens=100, max_tokens=50)
        assert srv.gateway.call_tokens(ctx, 4096, spec) == (100, 50)


def test_a_prediction_is_held_at_the_output_price(tmp_path: Path, fake: FakeProvider) -> None:
    """The part of a predicted output (OpenAI's ``prediction``) the answer does not use is
    billed as completion tokens, at the output price (four times gpt-4o's input price). The
    budget hold counted the prediction in the prompt, at the input price: a request with a
    1,000-token prediction was held $0.0075 short of what it may be billed. The prediction is
    held as completion now, once."""
    from router.gateway import RequestContext
    from router.signals import extract_signals
    from tests.conftest import KeywordScorer

    plain = {**HARD_LONG, "max_tokens": 50}
    predicted = {**plain, "prediction": {"type": "content", "content": "x" * 3500}}  # held 3,500
    with live(tmp_path, _budget_policy(fake, 1.0)) as srv:
        spec = srv.gateway.policy.models["gpt-4o"]
        held = []
        for body in (plain, predicted):
            ctx = RequestContext(request_id="r", tenant="default", started=0.0, stream=False)
            ctx.signals = extract_signals(body, KeywordScorer())
            held.append(srv.gateway.call_tokens(ctx, 4096, spec))
        costs = srv.gateway.costs
        usd = [costs.closed_cost("openai/gpt-4o", prompt, out) for prompt, out in held]
    assert held[1] == (held[0][0], 50 + 3500)
    assert usd[1] - usd[0] == pytest.approx(costs.closed_cost("openai/gpt-4o", 0, 3500))


@pytest.mark.parametrize("ttl", ["5m", "1h"])
def test_prompts_marked_for_caching_stay_within_the_budget(
    tmp_path: Path, fake: FakeProvider, ttl: str
) -> None:
    """Anthropic bills a prompt it writes to its cache (``cache_control``) at 1.25 times the
    input price, twice for ``ttl: 1h``. The hold priced the prompt at input: 30 concurrent
    Claude requests whose prompts were all written spent past the budget by more than one
    request's reservation (the most one such request can cost)."""
    from router.signals import extract_signals
    from tests.conftest import KeywordScorer
    from tests.fake_provider import Behaviour

    text = {"type": "text", "text": "HARD " + LONG * 100, "cache_control": {"type": "ephemeral"}}
    if ttl == "1h":
        text["cache_control"] = {"type": "ephemeral", "ttl": "1h"}
    body = {"model": "claude", "max_tokens": 50, "messages": [{"role": "user", "content": [text]}]}
    prompt = extract_signals(body, KeywordScorer()).prompt_tokens
    written = prompt - 13  # the fake's prompt is 13 tokens plus those written: as estimated
    fake.reset(
        Behaviour(
            mode="stall",
            stall_s=0.5,
            cache_write_tokens=written,
            cache_write_1h_tokens=written if ttl == "1h" else 0,
        )
    )
    claude = "anthropic/claude-3-5-sonnet-20241022"
    policy = _budget_policy(fake, 0.1).replace(claude, "anthropic/claude-sonnet-4-5-20250929")
    with live(tmp_path, policy, local_backend_obj=ScriptedLocal()) as srv:
        rows = _answered_of_a_burst(srv, body, 2)
        assert {r["model"] for r in rows} == {"claude"}
        spent = sum(float(r["cost_usd"]) for r in rows)
        spec = srv.gateway.policy.models["claude"]
        hour = prompt if ttl == "1h" else 0
        reservation = srv.gateway.costs.closed_cost(
            spec, prompt, 50, cache_write=prompt, cache_write_1h=hour
        )
        assert spent <= 0.1 + reservation, (spent, reservation)


@pytest.mark.parametrize("over_budget", ["local", "reject"])
def test_a_full_local_queue_does_not_spill_a_spent_budget_to_the_closed_tier(
    tmp_path: Path, fake: FakeProvider, over_budget: str
) -> None:
    # A tenant past its budget still had its local-bound requests spill to gpt-4o when the
    # local queue was full (queue_full: spill), so keeping the local model busy bought closed
    # calls past the budget, under over_budget: reject too.
    from concurrent.futures import ThreadPoolExecutor

    fake.reset()
    local = ScriptedLocal()
    extra = f"tenants:\n  default: {{daily_budget_usd: 0.00001, over_budget: {over_budget}}}\n"
    with live(tmp_path, policy_yaml(fake, extra=extra), local_backend_obj=local) as srv:
        assert _post(srv, HARD_LONG).headers["x-tiergate-model"] == "gpt-4o"
        store = srv.gateway.outcomes
        assert wait_for(lambda: store.count() == 1) and store.flush()
        spent = store.spend_today("default")
        assert spent > 0.00001
        fake.reset()
        local.mode = "hold"
        with ThreadPoolExecutor(1) as pool:
            held = pool.submit(_post, srv, CHAT)
            assert wait_for(lambda: local.gate.running == 1)
            refused = _post(srv, CHAT)
            local.release.set()
            assert held.result().status_code == 200
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["code"] == "local_queue_full"
        assert fake.received == []
        assert wait_for(lambda: store.count() == 3) and store.flush()
        assert store.spend_today("default") == pytest.approx(spent)


def test_a_stream_left_after_finish_reason_is_charged(tmp_path: Path, fake: FakeProvider) -> None:
    # Reading to finish_reason and leaving before the usage chunk used to cost nothing.
    from tests.fake_provider import Behaviour

    words = " ".join(f"w{i}" for i in range(40))
    fake.reset(Behaviour(text=words, chunk_delay_s=0.02))
    hard = {"model": "auto", "messages": [{"role": "user", "content": "HARD"}], "stream": True}
    with live(tmp_path, policy_yaml(fake), local_backend_obj=ScriptedLocal(), tpm_limit=40) as srv:
        with srv.http.stream("POST", "/v1/chat/completions", json=hard) as r:
            for line in r.iter_lines():
                if '"finish_reason":"stop"' in line.replace(" ", ""):
                    break  # the client leaves before the usage chunk
        store = srv.gateway.outcomes
        assert wait_for(lambda: store.count() == 1) and store.flush()
        row = store.recent(1)[0]
        assert row["status"] == "aborted"
        assert row["completion_tokens"] >= 40 and row["prompt_tokens"] > 0
        assert row["cost_usd"] > 0
        _assert_rate_limited(_post(srv, {**hard, "stream": False}), "tpm_limit_exceeded")


def test_budget_error_prints_amounts_that_read() -> None:
    from router.errors import BudgetExceededError
    from router.policy import usd

    # Retry-After runs to the end of the UTC day the budget counts.
    assert BudgetExceededError("x", now=86400 * 20000 + 3600).headers["retry-after"] == "82800"

    assert usd(0.0075) == "$0.0075" and usd(0.0001) == "$0.0001" and usd(0.0) == "$0.00"
    assert usd(0.05) == "$0.05" and usd(12.5) == "$12.50" and usd(0.012345) == "$0.012"


@pytest.mark.skipif(redis_binary() is None, reason="no redis-server binary")
def test_replicas_share_token_and_budget_reservations_through_redis(
    tmp_path: Path, fake: FakeProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    import redis.asyncio as aioredis

    from router.outcomes_redis import RedisOutcomeStore
    from tests.fake_provider import Behaviour

    # The limiter gives Redis 0.25 s before counting in process (a fallback with its own test);
    # on a loaded test machine that fallback, not the sharing, would decide the outcome.
    from_url = aioredis.Redis.from_url

    def patient(url: str, **kw: Any) -> Any:
        return from_url(url, **{**kw, "socket_timeout": 10, "socket_connect_timeout": 10})

    monkeypatch.setattr(aioredis.Redis, "from_url", patient)

    fake.reset(Behaviour(mode="stall", stall_s=0.5))
    with RedisServer(tmp_path) as redis_server:

        def replica(name: str, **kw: object) -> Iterator[LiveServer]:
            work = tmp_path / name
            work.mkdir()
            return live(
                work,
                _budget_policy(fake, 0.0003, tenant="t"),
                local_backend_obj=ScriptedLocal(queue_size=100, words=20),
                outcomes=RedisOutcomeStore(redis_server.url, journal=work / "j.jsonl"),
                redis_url=redis_server.url,
                api_keys_file=_one_key(work),
                **kw,
            )

        def ok_rows(*servers: LiveServer) -> list[dict[str, Any]]:
            for srv in servers:
                assert srv.gateway.outcomes.flush(10)
            shared = servers[0].gateway.outcomes  # one Redis holds both replicas' records
            return [r for r in shared.recent(100) if r["status"] == "ok"]

        async def both(a: LiveServer, b: LiveServer, body: object, n: int) -> list[int]:
            halves = await asyncio.gather(
                _burst(a.url, body, n, key="tg-k"), _burst(b.url, body, n, key="tg-k")
            )
            return [r.status_code for r in halves[0] + halves[1]]

        local_body = {**CHAT, "messages": [{"role": "user", "content": LONG}], "max_tokens": 20}
        with replica("a", tpm_limit=150) as a, replica("b", tpm_limit=150) as b:
            assert set(asyncio.run(both(a, b, local_body, 20))) == {200, 429}
            rows = ok_rows(a, b)
            reservation = int(rows[0]["signals"]["prompt_held"]) + 20
            assert _used(rows) <= 150 + reservation
        with replica("c") as c, replica("d") as d:
            assert set(asyncio.run(both(c, d, HARD_LONG, 15))) == {200, 429}
            rows = [r for r in ok_rows(c, d) if r["tier"] == "closed"]
            spent = sum(float(r["cost_usd"]) for r in rows)
            prompt = int(rows[0]["signals"]["prompt_held"])
            assert spent <= 0.0003 + c.gateway.costs.closed_cost("openai/gpt-4o", prompt, 7)


def test_a_reservation_settles_in_the_window_it_was_made_in(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reserved tokens count at once; settling swaps them for what was used, also after the
    minute has turned (the reservation then sits in the previous window)."""
    limiter = limits.RateLimiter(rpm=None, tpm=100)
    tenant = Principal(tenant="t", permissions=frozenset(), key_id="k")
    now = [6000.0 + 59]
    monkeypatch.setattr(limits.time, "time", lambda: now[0])

    async def reserve(tokens: int) -> limits.TokenHold | None:
        try:
            return await limiter.reserve(tenant, tokens)
        except RateLimitError:
            return None

    async def scenario() -> list[bool]:
        first = await reserve(90)
        second = await reserve(90)  # 90 < 100: admitted, the one-reservation overshoot
        third = await reserve(90)  # 180 reserved: refused
        now[0] = 6000.0 + 61
        refused = await reserve(1)  # the 180 still weigh 177
        assert first is not None and second is not None
        first.settle(10)
        second.settle(10)  # 20 used: weighs 19.7 now
        again = await reserve(1)
        return [third is None, refused is None, again is not None]

    assert asyncio.run(scenario()) == [True, True, True]


@pytest.mark.parametrize("value", [101.0, "101", 100.5, "100", True])
def test_max_tokens_must_be_an_integer(small: LiveServer, value: object) -> None:
    """A float or a numeric string would slip past the cap and the context-window check."""
    for field in ("max_tokens", "max_completion_tokens"):
        for path in ("/v1/chat/completions", "/v1/route"):
            body = {**CHAT, field: value}
            response = small.http.post(path, json=body)
            assert response.status_code == 400, (field, value, response.text)
            assert response.json()["error"]["param"] == field


@pytest.mark.skipif(redis_binary() is None, reason="no redis-server binary")
def test_a_budget_refusal_in_a_redis_outage_says_what_was_spent_and_why(
    tmp_path: Path, fake: FakeProvider
) -> None:
    # A replica started while Redis is down holds no budgeted spend (it cannot see the spend).
    # Its 429 said "spent $1.25 of its $1.25 daily budget", the budget given as the spend.
    from router.outcomes_redis import RedisOutcomeStore

    with RedisServer(tmp_path) as redis_server:
        redis_server.stop()
        store = RedisOutcomeStore(redis_server.url, journal=tmp_path / "journal.jsonl")
        with live(
            tmp_path,
            _budget_policy(fake, 1.25),
            local_backend_obj=ScriptedLocal(),
            outcomes=store,
        ) as srv:
            refused = _post(srv, {**CHAT, "messages": [{"role": "user", "content": "HARD hi"}]})
            assert refused.status_code == 429, refused.text
            error = refused.json()["error"]
            assert error["code"] == "budget_exceeded"
            assert error["message"].startswith(
                "tenant 'default' spent $0.00 of its $1.25 daily budget; the outcome store"
                " is unreachable and this replica has not read the shared spend"
            ), error["message"]


@pytest.mark.skipif(redis_binary() is None, reason="no redis-server binary")
@pytest.mark.parametrize("password", ["wrong-pw", None])
def test_a_refused_redis_password_is_logged_once_as_the_setting_to_fix(
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    password: str | None,
) -> None:
    """A wrong password (``WRONGPASS``) or none (``NOAUTH``) was logged as an outage, by its
    exception's name, once a retry: the limits are counted in process as in one (readiness
    fails through the outcome store), but the log says once what to fix, and no password."""
    monkeypatch.setattr(limits, "REDIS_RETRY_S", 0.0)  # every admission tries Redis again
    caplog.set_level("WARNING", logger="tiergate.limits")
    with RedisServer(tmp_path, password="right-pw") as redis_server:
        assert asyncio.run(_admitted(redis_server.url_with(password))) == 2  # in process
    said = [r for r in caplog.records if r.name == "tiergate.limits"]
    assert [r.levelname for r in said] == ["ERROR"], caplog.text
    assert "TIERGATE_REDIS_URL" in said[0].message and "refused" in said[0].message
    assert "right-pw" not in caplog.text and "wrong-pw" not in caplog.text


@pytest.mark.skipif(redis_binary() is None, reason="no redis-server binary")
def test_a_refusal_that_comes_back_after_redis_worked_is_logged_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The limiter said a refusal once, as what to fix, but kept it said after Redis worked
    again: the same refusal later (an ACL change undone, a rotation gone wrong twice) was
    not logged at all, while the limits were counted in process again."""
    monkeypatch.setattr(limits, "REDIS_RETRY_S", 0.0)  # every admission tries Redis again
    caplog.set_level("WARNING", logger="tiergate.limits")
    tenant = Principal(tenant="acme", permissions=frozenset(), key_id="k")
    with RedisServer(tmp_path) as redis_server:
        admin = redis_server.client()
        denied = ["+@all", "-@scripting"]  # the limiter's scripts: NOPERM
        admin.acl_setuser("tg", enabled=True, passwords=["+tg-pw"], keys=["*"], commands=denied)
        url = redis_server.url.replace("redis://", "redis://tg:tg-pw@")

        async def scenario() -> None:
            limiter = limits.RateLimiter(rpm=100, tpm=None, redis_url=url)
            await limiter.admit(tenant)  # refused
            admin.acl_setuser("tg", commands=["+@all"])
            await limiter.admit(tenant)  # counted in Redis
            assert admin.keys("tiergate:*")
            admin.acl_setuser("tg", commands=["-@scripting"])
            await limiter.admit(tenant)  # refused again
            await limiter.aclose()

        asyncio.run(scenario())
    said = [r for r in caplog.records if r.name == "tiergate.limits"]
    assert [r.levelname for r in said] == ["ERROR", "ERROR"], caplog.text


@pytest.mark.skipif(redis_binary() is None, reason="no redis-server binary")
def test_a_redis_outage_is_logged_once_as_it_begins_and_once_as_it_ends(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """During an outage the limiter logged a warning at each retry of Redis (every
    REDIS_RETRY_S, about once a second, while requests came in) and nothing when Redis
    answered again. It says the outage once as it begins and once as it ends, as the
    outcome store does."""
    monkeypatch.setattr(limits, "REDIS_RETRY_S", 0.0)  # every admission tries Redis again
    caplog.set_level("WARNING", logger="tiergate.limits")
    tenant = Principal(tenant="acme", permissions=frozenset(), key_id="k")
    with RedisServer(tmp_path) as redis_server:

        async def scenario() -> None:
            limiter = limits.RateLimiter(rpm=100, tpm=None, redis_url=redis_server.url)
            await limiter.admit(tenant)  # counted in Redis
            redis_server.stop()
            for _ in range(5):
                await limiter.admit(tenant)  # in process, Redis tried each time
            redis_server.start()
            for _ in range(3):
                await limiter.admit(tenant)  # counted in Redis again
            await limiter.aclose()

        asyncio.run(scenario())
        assert redis_server.client().keys("tiergate:*")
    said = [r.getMessage() for r in caplog.records if r.name == "tiergate.limits"]
    assert len(said) == 2, said
    assert "Redis unavailable" in said[0] and "Redis available again" in said[1], said
