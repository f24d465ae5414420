"""Load at the limits: 200 concurrent requests against a token limit, then against a budget.

    python -m bench.limits_load            # or: make limits-load
    python -m bench.limits_load --concurrency 50 --tpm 500   # a quick look

Runs on loopback only: a fake OpenAI upstream (uvicorn) that answers after ``--delay`` seconds,
so every request is in flight at once, with ``completion_tokens`` equal to the request's
``max_tokens`` (the worst case a reservation must cover); and ``tiergate serve`` (SQLite store,
no local model, requests pinned to the closed model). Phase ``tokens`` sets
``TIERGATE_TPM_LIMIT``; phase ``budget`` gives the tenant a daily budget with
``over_budget: reject``. Each phase sends ``--concurrency`` requests at once and reads what was
spent from the outcome store. Passes when each overshoot (spent beyond the limit) is no more
than one request's reservation (prompt estimate + ``max_tokens``, priced at the model's rate).
Figures go to ``bench/results/limits_load.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "limits_load.json"
MAX_TOKENS = 16
PROMPT_TOKENS = 40  # what the fake upstream reports; Tiergate's estimate is above it
BODY = {
    "model": "gpt-4o",
    "messages": [{"role": "user", "content": "Summarise in one word: " + "lorem ipsum " * 10}],
    "max_tokens": MAX_TOKENS,
}
POLICY = """\
version: 1
models:
  gpt-4o: {{tier: closed, litellm_model: openai/gpt-4o, api_base: "http://127.0.0.1:{port}/v1"}}
closed_models: [gpt-4o]
aliases:
  auto: {{threshold: 0.5}}
"""
BUDGET = "tenants:\n  default: {{daily_budget_usd: {budget}, over_budget: reject}}\n"
DELAY_S = float(os.environ.get("LIMITS_UPSTREAM_DELAY_S", "0.5"))


async def upstream_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The fake upstream: waits, then answers with ``max_tokens`` completion tokens."""
    if scope["type"] != "http":
        return
    raw, more = b"", True
    while more:
        message = await receive()
        raw += message.get("body", b"")
        more = message.get("more_body", False)
    completion = int(json.loads(raw or b"{}").get("max_tokens") or 1)
    await asyncio.sleep(DELAY_S)
    answer = {
        "id": "chatcmpl-limits",
        "object": "chat.completion",
        "created": 0,
        "model": "gpt-4o",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ],
        "usage": {
            "prompt_tokens": PROMPT_TOKENS,
            "completion_tokens": completion,
            "total_tokens": PROMPT_TOKENS + completion,
        },
    }
    headers = [(b"content-type", b"application/json")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps(answer).encode()})


async def _burst(url: str, n: int) -> dict[int, int]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        responses = await asyncio.gather(*(client.post(url, json=BODY) for _ in range(n)))
    statuses: dict[int, int] = {}
    for response in responses:
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
    return statuses


def _phase(
    work: Path, up_port: int, n: int, *, tpm: int | None, budget: float | None
) -> dict[str, Any]:
    from bench.load import free_port, wait_ready

    work.mkdir()
    policy = POLICY.format(port=up_port) + (BUDGET.format(budget=budget) if budget else "")
    (work / "policy.yaml").write_text(policy)
    env = {
        **os.environ,
        "TIERGATE_POLICY": str(work / "policy.yaml"),
        "TIERGATE_LOCAL_BACKEND": "none",
        "TIERGATE_SQLITE_PATH": str(work / "outcomes.db"),
        "TIERGATE_LOG_LEVEL": "warning",
        "TIERGATE_POLICY_RELOAD_S": "0",
        "OPENAI_API_KEY": "sk-limits-load",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    if tpm is not None:
        env["TIERGATE_TPM_LIMIT"] = str(tpm)
    port = free_port()
    tiergate = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "serve", "--port", str(port)], env=env, cwd=ROOT
    )
    try:
        wait_ready(f"http://127.0.0.1:{port}/readyz")
        started = time.perf_counter()
        statuses = asyncio.run(_burst(f"http://127.0.0.1:{port}/v1/chat/completions", n))
        elapsed = time.perf_counter() - started
    finally:
        tiergate.send_signal(signal.SIGINT)  # graceful: the outcome store drains
        tiergate.wait(120)
    with sqlite3.connect(work / "outcomes.db") as db:
        rows = db.execute(
            "SELECT prompt_tokens, completion_tokens, cost_usd, signals FROM outcomes "
            "WHERE status = 'ok'"
        ).fetchall()
        records = db.execute("SELECT count(*) FROM outcomes").fetchone()[0]
    estimate = int(json.loads(rows[0][3])["prompt_tokens"]) if rows else 0
    return {
        "requests": n,
        "statuses": statuses,
        "records": records,
        "served": len(rows),
        "tokens_used": sum(p + c for p, c, _, _ in rows),
        "spent_usd": sum(cost for _, _, cost, _ in rows),
        "reservation_tokens": estimate + MAX_TOKENS,
        "seconds": round(elapsed, 2),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--tpm", type=int, default=2000, help="the token limit (per minute)")
    parser.add_argument("--budget", type=float, default=0.01, help="the daily budget, USD")
    args = parser.parse_args()
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from bench.load import free_port, serve_upstream, wait_ready
    from router.costs import CostBook, load_litellm_cost_map

    work = Path(tempfile.mkdtemp(prefix="tiergate-limits-"))
    up_port = free_port()
    upstream = serve_upstream("bench.limits_load:upstream_app", up_port)
    try:
        wait_ready(f"http://127.0.0.1:{up_port}/")
        tokens = _phase(work / "tokens", up_port, args.concurrency, tpm=args.tpm, budget=None)
        budget = _phase(work / "budget", up_port, args.concurrency, tpm=None, budget=args.budget)
    finally:
        upstream.terminate()
        upstream.wait(30)
    costs = CostBook(load_litellm_cost_map())
    tokens["limit"] = args.tpm
    tokens["overshoot_tokens"] = tokens["tokens_used"] - args.tpm
    budget["limit_usd"] = args.budget
    budget["reservation_usd"] = costs.closed_cost(
        "openai/gpt-4o", budget["reservation_tokens"] - MAX_TOKENS, MAX_TOKENS
    )
    budget["overshoot_usd"] = budget["spent_usd"] - args.budget
    result = {
        "concurrency": args.concurrency,
        "upstream_delay_s": DELAY_S,
        "tokens": tokens,
        "budget": budget,
        "passed": tokens["overshoot_tokens"] <= tokens["reservation_tokens"]
        and budget["overshoot_usd"] <= budget["reservation_usd"] + 1e-12
        and tokens["records"] == tokens["requests"]
        and budget["records"] == budget["requests"],
        "cpu_count": os.cpu_count(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
