"""Shared test parts: a fake closed provider on loopback, a test app served in process, scorers.

``live()`` runs the app's lifespan in a background event loop and answers HTTP in process
(``srv.http``, starlette's ``TestClient``) with a scripted local tier, so most tests take
milliseconds. Tests of what only a socket shows (disconnects, backpressure, the official
``openai`` client) pass ``socket=True`` and use ``srv.url``; tests of the real GGUF pass
``gguf=True`` and carry the ``gguf`` marker.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import textwrap
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import pytest
import uvicorn
from anyio.from_thread import BlockingPortal
from fastapi import FastAPI
from starlette.testclient import TestClient

from router.app import create_app
from router.config import Settings
from router.scoring import Analysis
from router.services import services
from tests.fake_provider import FakeProvider
from tests.scripted_local import ScriptedLocal

_R = TypeVar("_R")

REPO = Path(__file__).resolve().parent.parent
GGUF = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
KEYS = {"OPENAI_API_KEY": "sk-test-openai-key", "ANTHROPIC_API_KEY": "sk-ant-test-key"}


class KeywordScorer:
    """Deterministic test scorer: 'HARD' in the prompt scores 0.9, anything else 0.1."""

    name = "keyword-test"
    version = "keyword-test-1"

    def analyze(self, text: str, *, has_tools: bool = False) -> Analysis:
        """0.9 for prompts containing HARD, else 0.1; 'PII' marks personal data."""
        return Analysis(
            score=0.9 if "HARD" in text else 0.1,
            capability="chat",
            stakes="low",
            pii="PII" in text,
            pii_kinds=("email",) if "PII" in text else (),
        )


def policy_yaml(fake: FakeProvider, *, extra: str = "", **top: Any) -> str:
    """A test policy: the local model, gpt-4o and claude on the fake provider."""
    settings = {
        "threshold": 0.5,
        "on_failure": "local",
        "queue_full": "spill",
        "store_prompts": "none",
        **top,
    }
    head = "\n".join(f"{k}: {v}" for k, v in settings.items())
    return (
        textwrap.dedent(
            f"""\
            version: 1
            models:
              local:
                tier: local
                context_window: 2048
              gpt-4o:
                tier: closed
                litellm_model: openai/gpt-4o
                api_base: {fake.base_url}
              claude:
                tier: closed
                litellm_model: anthropic/claude-3-5-sonnet-20241022
                api_base: {fake.base_url.removesuffix("/v1")}
            local_model: local
            closed_models: [gpt-4o, claude]
            aliases:
              auto: {{threshold: 0.5}}
              auto-best: {{threshold: 0.05}}
            rules:
              - name: pii-stays-local
                priority: 100
                when: {{pii: true}}
                route: local
                local_only: true
            """
        )
        + head
        + "\n"
        + textwrap.dedent(extra)
    )


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeProvider]:
    """One fake provider for the session; tests call ``fake.reset()`` first."""
    with FakeProvider() as provider:
        yield provider


@pytest.fixture(scope="session", autouse=True)
def _tiergate_home(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Settings default their files into TIERGATE_HOME (the user's data directory): tests never
    # read a model store or write outcomes there.
    os.environ["TIERGATE_HOME"] = str(tmp_path_factory.mktemp("tiergate-home"))


@pytest.fixture(autouse=True)
def _provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in KEYS.items():
        monkeypatch.setenv(key, value)
    # `--config` sets TIERGATE_CONFIG for the rest of the process (router.config.load_settings),
    # so a test that runs `main([..., "--config", F])` would hand F to every later test's
    # settings: each test starts without it, and its own setting is undone after it.
    monkeypatch.delenv("TIERGATE_CONFIG", raising=False)


def checkout_files() -> list[str]:
    """The files git would commit (tracked, or untracked and not ignored): what a clean
    checkout holds, as paths relative to the repository."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name]


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def silent_server() -> Iterator[tuple[str, list[socket.socket]]]:
    """A hung server (a llama.cpp server, an OTLP collector): it accepts connections and never
    answers. Yields its root URL (``http://127.0.0.1:PORT``) and the connections it accepted;
    on leaving, they close, so whatever still waits on them fails then."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.05)
    accepted: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        while not done.is_set():
            with suppress(TimeoutError):
                accepted.append(listener.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", accepted
    finally:
        done.set()
        thread.join()
        for conn in [*accepted, listener]:
            conn.close()


class LiveServer:
    """A test app with its lifespan running in a background event loop.

    ``http`` answers in process. ``url`` (and ``port``) bind a real loopback socket, served by
    uvicorn in the same loop, on first use: the official client, raw sockets and disconnects
    need one, and a test that reads ``url`` gets one whether or not it asked with ``socket=True``.
    """

    def __init__(self, app: FastAPI, *, socket: bool = False) -> None:
        self.app = app
        self._want_socket = socket
        # The app sees a loopback peer, as it does behind uvicorn on 127.0.0.1.
        self.http = TestClient(
            app,
            base_url="http://127.0.0.1",
            raise_server_exceptions=False,
            client=("127.0.0.1", 50000),
        )
        self._server: uvicorn.Server | None = None
        self._serving: Future[None] | None = None
        self._port = 0
        self._binding = threading.Lock()  # tests may read ``url`` from several threads

    def __enter__(self) -> LiveServer:
        self.http.__enter__()
        if self._want_socket:
            self._bind()
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if self._server is not None and self._serving is not None:
                self._server.should_exit = True
                self._serving.result(60)
        finally:
            self.http.__exit__(None, None, None)

    def _portal(self) -> BlockingPortal:
        portal = self.http.portal
        if portal is None:
            raise RuntimeError("the app is not running: use `with live(...)`")
        return portal

    def _bind(self) -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self._port = int(sock.getsockname()[1])
        # lifespan="off": the app's lifespan already runs in this loop, under ``http``.
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off")
        self._server = server = uvicorn.Server(config)
        self._serving = self._portal().start_task_soon(server.serve, [sock])
        deadline = time.monotonic() + 60
        while not server.started:
            if self._serving.done():
                self._serving.result()  # raises what stopped it
            if self._serving.done() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.01)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``, a real socket (bound on first use)."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def port(self) -> int:
        """The loopback port of the real socket (bound on first use)."""
        with self._binding:
            if self._server is None:
                self._bind()
        return self._port

    def run(self, fn: Callable[[], Awaitable[_R]]) -> _R:
        """``fn()`` run to its end in the app's event loop: the gateway driven directly, with
        the parts its lifespan built."""
        return self._portal().call(fn)

    @property
    def thread(self) -> threading.Thread:
        """The thread that runs the app's event loop."""
        thread: threading.Thread = self._portal().call(threading.current_thread)
        return thread

    @property
    def gateway(self) -> Any:
        """The running app's gateway."""
        return services(self.app).gateway


def make_settings(tmp_path: Path, policy: str, **overrides: Any) -> Settings:
    """Settings for a test app: the policy text written to a file, SQLite in ``tmp_path``."""
    policy_path = tmp_path / "policy.yaml"
    policy_path.write_text(policy)
    values: dict[str, Any] = {
        "policy": policy_path,
        "sqlite_path": tmp_path / "outcomes.db",
        "local_model_path": GGUF,
        "n_ctx": 2048,
        "n_threads": 1,
        "policy_reload_s": 0.2,
        "local_backend": "llama_cpp",
    }
    values.update(overrides)
    return Settings(**values)


@contextmanager
def live(
    tmp_path: Path, policy: str, *, socket: bool = False, gguf: bool = False, **kwargs: Any
) -> Iterator[LiveServer]:
    """Run a test app; ``kwargs`` split into settings and create_app parts.

    The local tier is a :class:`ScriptedLocal` unless the test passes its own
    (``local_backend_obj``), names another backend in the settings, or asks for the real GGUF
    with ``gguf=True`` (the test must then carry ``@pytest.mark.gguf``). ``socket=True`` binds
    a real loopback socket at once.
    """
    parts = {k: kwargs.pop(k) for k in ("scorer", "outcomes", "local_backend_obj") if k in kwargs}
    local = parts.get("local_backend_obj")
    if gguf:
        _require_marker("gguf")
        if local is not None:
            raise ValueError("gguf=True serves the real model: do not pass local_backend_obj")
    elif local is None and kwargs.get("local_backend", "llama_cpp") == "llama_cpp":
        local = ScriptedLocal()
    settings = make_settings(tmp_path, policy, **kwargs)
    app = create_app(
        settings,
        scorer=parts.get("scorer", KeywordScorer()),
        outcomes=parts.get("outcomes"),
        local_backend=local,
    )
    with LiveServer(app, socket=socket) as server:
        yield server


_running: list[pytest.Item] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # One place says why a gguf test did not run.
    if not GGUF.is_file():
        skip = pytest.mark.skip(reason="bundled GGUF missing: make model")
        for item in items:
            if item.get_closest_marker("gguf") is not None:
                item.add_marker(skip)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    # Noted before fixtures are set up, so live() can check the markers of the test it serves.
    # pytest loads this file as `conftest` and the tests import it as `tests.conftest`: two
    # modules, so the note goes to both.
    import tests.conftest as imported

    _running[:] = imported._running[:] = [item]


def _require_marker(name: str) -> None:
    if _running and _running[0].get_closest_marker(name) is None:
        raise RuntimeError(f"{_running[0].nodeid} uses the real GGUF: mark it @pytest.mark.{name}")


class SlowReserve:
    """A store's ``reserve_spend``, all else real, whose calls that ``which`` picks (by request
    id and budget) wait for ``let_write``: ``writing`` is set as one starts, ``written`` as it
    ends. Installed in its place, it holds a hold's write in its worker thread while the
    request or task that asked for it is cancelled."""

    def __init__(self, store: Any, which: Callable[[str, float | None], bool]) -> None:
        self.writing, self.let_write, self.written = (threading.Event() for _ in range(3))
        self._reserve = store.reserve_spend
        self._which = which

    def __call__(self, tenant: str, request_id: str, usd: float, budget: float | None) -> bool:
        """The store's reserve_spend, after ``let_write`` where ``which`` picks the call."""
        if not self._which(request_id, budget):
            return bool(self._reserve(tenant, request_id, usd, budget))
        self.writing.set()
        self.let_write.wait(10)
        try:
            return bool(self._reserve(tenant, request_id, usd, budget))
        finally:
            self.written.set()


def sent_raw(server: LiveServer, body: dict[str, Any]) -> socket.socket:
    """The open socket of a chat request sent to ``server``, to close at will (a client that
    leaves)."""
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


def wait_for(predicate: Any, timeout_s: float = 10.0) -> bool:
    """Poll ``predicate`` until it is true or the time is up."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


def run(coro: Any) -> Any:
    """Run a coroutine to completion in a fresh loop (for async client bursts)."""
    return asyncio.run(coro)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    """A real redis-server on a free loopback port (stopped at the end)."""
    from tests.redis_server import RedisServer

    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


class ErasingStore:
    """An outcome store for a live app, SQLite or Redis, and `tiergate outcomes delete` on it,
    run as an operator runs it beside the app."""

    def __init__(self, backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.backend = backend
        self.url: str | None = None  # the Redis store's
        self._tmp_path = tmp_path
        self._monkeypatch = monkeypatch

    def make(self) -> Any:
        """A fresh store for ``live(outcomes=...)``: None is the app's own SQLite file, in
        ``tmp_path`` (the same file for each app made there)."""
        if self.url is None:
            return None
        from router.outcomes_redis import RedisOutcomeStore

        return RedisOutcomeStore(self.url, journal=self._tmp_path / "journal.jsonl")

    def delete(self, *args: str) -> int:
        """`tiergate outcomes delete ARGS` on the store; its exit status."""
        from router.cli import main

        with self._monkeypatch.context() as env:
            if self.url is None:
                where = ["--db", str(self._tmp_path / "outcomes.db")]
            else:
                where = []
                env.setenv("TIERGATE_REDIS_URL", self.url)
                journal = self._tmp_path / "cli-journal.jsonl"
                env.setenv("TIERGATE_OUTCOME_JOURNAL_PATH", str(journal))
            return int(main(["outcomes", *where, "delete", *args]))


@pytest.fixture(params=["sqlite", "redis"])
def erasing(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> ErasingStore:
    """Each outcome store in turn, with `tiergate outcomes delete` on it (:class:`ErasingStore`)."""
    store = ErasingStore(request.param, tmp_path, monkeypatch)
    if request.param == "redis":
        store.url = request.getfixturevalue("redis_server").url
    return store
