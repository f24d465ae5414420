"""Start and stop the servers under test, wait for them, read their memory, run wrk."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
LUA = BENCH / "post.lua"


def free_port() -> int:
    """A free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """A server process we started, and where it listens."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def base(self) -> str:
        """Its base URL (no /v1)."""
        return f"http://127.0.0.1:{self.port}"

    def rss_mb(self) -> float:
        """Resident memory of the process and all its descendants, in MB (MiB)."""
        return sum(_rss_kb(pid) for pid in _tree(self.proc.pid)) / 1024.0


def _rss_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree(pid: int) -> list[int]:
    out = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for child in children:
        out.extend(_tree(int(child)))
    return out


@contextmanager
def server(
    name: str,
    argv: Sequence[str],
    *,
    port: int,
    ready_path: str,
    env: Mapping[str, str] | None = None,
    workdir: Path,
    timeout_s: float = 120.0,
) -> Iterator[Server]:
    """Run ``argv`` until the block ends; yield once ``GET ready_path`` answers."""
    log = workdir / f"{name}.log"
    full_env = {**os.environ, **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=ROOT,
            start_new_session=True,
        )
    srv = Server(name, proc, port, log)
    try:
        _wait_ready(srv, ready_path, timeout_s)
        yield srv
    finally:
        _stop(proc)


def _wait_ready(srv: Server, path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"{srv.name} exited: {srv.log.read_text()[-3000:]}")
        try:
            if httpx.get(srv.base + path, timeout=2.0).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{srv.name} not ready after {timeout_s}s: {srv.log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


def wrk(
    url: str,
    *,
    connections: int,
    duration_s: float,
    threads: int = 1,
    body_file: Path | None = None,
) -> dict[str, Any]:
    """One wrk run with ``post.lua``; returns its JSON line, converted to ms and req/s."""
    threads = min(threads, connections)
    env = dict(os.environ)
    if body_file is not None:
        env["BENCH_BODY"] = str(body_file)
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(duration_s))}s",
        "--timeout",
        "10s",
        "-s",
        str(LUA),
        url,
    ]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
    line = next((x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk printed no result: {done.stdout}\n{done.stderr}")
    raw = json.loads(line.removeprefix("BENCH_JSON "))
    errors = sum(raw[k] for k in raw if k.startswith("errors_"))
    return {
        "requests": raw["requests"],
        "rps": raw["requests"] / (raw["duration_us"] / 1e6),
        "p50": raw["p50_us"] / 1000.0,
        "p90": raw["p90_us"] / 1000.0,
        "p95": raw["p95_us"] / 1000.0,
        "p99": raw["p99_us"] / 1000.0,
        "max": raw["max_us"] / 1000.0,
        "mean": raw["mean_us"] / 1000.0,
        "errors": errors,
        "errors_detail": {
            k.removeprefix("errors_"): raw[k] for k in raw if k.startswith("errors_")
        },
    }


def python() -> str:
    """This interpreter (the project venv's)."""
    return sys.executable
