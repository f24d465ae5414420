"""Load test: 20,000 chat requests at 200 concurrent through Tiergate to a fake upstream.

    python -m bench.load            # or: make load-test
    python -m bench.load --requests 2000 --concurrency 50   # a quick look

Runs three processes on loopback: a minimal OpenAI-compatible upstream (uvicorn), ``tiergate
serve`` (one worker, SQLite outcome store, no local model, every request pinned to the closed
model so nothing but the proxy path is measured), and ``hey`` (an established HTTP load
generator; ``apt-get install hey``) in two phases: 5,000 requests, then 15,000 more. Passes when
there are 0 errors, the outcome store holds exactly one record per request, and Tiergate's RSS
grows by less than 10% between the 5,000th and the 20,000th request. Figures go to
``bench/results/load.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "load.json"
ANSWER = json.dumps(
    {
        "id": "chatcmpl-load",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "ok"},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 9, "completion_tokens": 1, "total_tokens": 10},
    }
).encode()
POLICY = """\
version: 1
models:
  local: {{tier: local, context_window: 2048}}
  gpt-4o: {{tier: closed, litellm_model: openai/gpt-4o, api_base: "http://127.0.0.1:{port}/v1"}}
local_model: local
closed_models: [gpt-4o]
aliases:
  auto: {{threshold: 0.5}}
"""
BODY = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Say ok."}], "max_tokens": 4}


async def upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The fake upstream: every POST gets the same small chat.completion."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": ANSWER})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def serve_upstream(app: str, port: int) -> subprocess.Popen[bytes]:
    """Run ``app`` (``module:attribute``) under uvicorn on loopback ``port``."""
    argv = ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", "--no-access-log"]
    return subprocess.Popen([sys.executable, "-m", "uvicorn", app, *argv], cwd=ROOT)


def wait_ready(url: str, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=1).status_code < 500:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} did not come up")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def hey(url: str, body_file: Path, requests: int, concurrency: int) -> dict[str, Any]:
    """Run hey once and parse its summary: rps, latency percentiles, statuses, errors."""
    out = subprocess.run(
        [
            "hey",
            "-n",
            str(requests),
            "-c",
            str(concurrency),
            "-t",
            "120",
            "-m",
            "POST",
            "-T",
            "application/json",
            "-D",
            str(body_file),
            url,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    statuses = {int(code): int(n) for code, n in re.findall(r"\[(\d{3})\]\s+(\d+) responses", out)}
    errors = re.findall(r"^\s+\[(\d+)\]\s+(.+)$", out.split("Error distribution:")[-1], re.M)
    percentiles = {int(q): float(s) * 1000 for q, s in re.findall(r"(\d+)% in ([\d.]+) secs", out)}
    ok = statuses.get(200, 0)
    return {
        "requests": requests,
        "ok": ok,
        "errors": requests - ok,
        "statuses": statuses,
        "error_kinds": [f"{n}x {what.strip()}" for n, what in errors]
        if "Error distribution" in out
        else [],
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
        "p50_ms": round(percentiles[50], 2),
        "p99_ms": round(percentiles[99], 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--first", type=int, default=5_000, help="RSS is read after these")
    args = parser.parse_args()
    if shutil.which("hey") is None:
        print("hey is not installed: apt-get install hey", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="tiergate-load-"))
    up_port, tg_port = free_port(), free_port()
    (work / "policy.yaml").write_text(POLICY.format(port=up_port))
    body_file = work / "body.json"
    body_file.write_text(json.dumps(BODY))
    env = {
        **os.environ,
        "TIERGATE_POLICY": str(work / "policy.yaml"),
        "TIERGATE_LOCAL_BACKEND": "none",
        "TIERGATE_SQLITE_PATH": str(work / "outcomes.db"),
        "TIERGATE_LOG_LEVEL": "warning",
        "TIERGATE_POLICY_RELOAD_S": "0",
        "OPENAI_API_KEY": "sk-load-test",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    upstream = serve_upstream("bench.load:upstream_app", up_port)
    tiergate = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", "--port", str(tg_port)], env=env, cwd=ROOT
    )
    try:
        wait_ready(f"http://127.0.0.1:{up_port}/")
        wait_ready(f"http://127.0.0.1:{tg_port}/readyz")
        url = f"http://127.0.0.1:{tg_port}/v1/chat/completions"
        started = time.perf_counter()
        first = hey(url, body_file, args.first, args.concurrency)
        rss_first = rss_mb(tiergate.pid)
        rest = hey(url, body_file, args.requests - args.first, args.concurrency)
        elapsed = time.perf_counter() - started
        rss_last = rss_mb(tiergate.pid)
    finally:
        tiergate.send_signal(signal.SIGINT)  # graceful: the outcome store drains
        tiergate.wait(120)
        upstream.terminate()
        upstream.wait(30)
    with sqlite3.connect(work / "outcomes.db") as db:
        records = db.execute("SELECT count(*) FROM outcomes").fetchone()[0]
        statuses = dict(db.execute("SELECT http_status, count(*) FROM outcomes GROUP BY 1"))
    result = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "generator": "hey "
        + subprocess.run(
            ["dpkg-query", "-W", "-f=${Version}", "hey"],
            check=False,
            capture_output=True,
            text=True,
        ).stdout,
        "errors": first["errors"] + rest["errors"],
        "records": records,
        "record_statuses": statuses,
        "rss_mb_at_first": round(rss_first, 1),
        "rss_mb_at_end": round(rss_last, 1),
        "rss_growth_pct": round(100 * (rss_last - rss_first) / rss_first, 2),
        "rps": round(args.requests / elapsed, 1),
        "phases": [first, rest],
        "load_average": os.getloadavg(),
        "cpu_count": os.cpu_count(),
    }
    result["passed"] = (
        result["errors"] == 0 and records == args.requests and result["rss_growth_pct"] < 10
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
