"""Shared test parts: a fake closed provider on loopback, a real uvicorn server, test scorers.

Tests talk to Tiergate over real HTTP (uvicorn on a free loopback port) with the official
``openai`` client, so streaming, disconnects and headers behave as they do for users.
"""

from __future__ import annotations

import asyncio
import os
import socket
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import pytest
import uvicorn
from fastapi import FastAPI

from router.app import create_app
from router.config import Settings
from router.scoring import Analysis
from router.services import services
from tests.fake_provider import FakeProvider

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


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LiveServer:
    """Runs an app under uvicorn in a thread, on a free loopback port."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)

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
def live(tmp_path: Path, policy: str, **kwargs: Any) -> Iterator[LiveServer]:
    """Serve a test app over real HTTP; ``kwargs`` split into settings and create_app parts."""
    parts = {k: kwargs.pop(k) for k in ("scorer", "outcomes", "local_backend_obj") if k in kwargs}
    settings = make_settings(tmp_path, policy, **kwargs)
    app = create_app(
        settings,
        scorer=parts.get("scorer", KeywordScorer()),
        outcomes=parts.get("outcomes"),
        local_backend=parts.get("local_backend_obj"),
    )
    with LiveServer(app) as server:
        yield server


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
