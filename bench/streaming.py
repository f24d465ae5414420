"""Streaming: time to first token and total time, per path, with a small httpx client.

wrk sees a response only as a whole, so it cannot time the first token. This client sends one
streaming request at a time (concurrency 1: the figure is the path's own latency, not queueing),
reads the SSE lines as they arrive, and notes when the first ``data:`` line with content comes
and when ``[DONE]`` does. The same client and the same request body are used for every path, so
the client's own cost (a few tens of microseconds per chunk) cancels out in the differences.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import httpx

CLIENT_KEY = "sk-bench-3f9c2a7e41d05b86c1e9a4f27d3b6058"  # = bench.proxy.CLIENT_KEY

BODY = {
    "model": "auto",
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write a haiku about routers and the sea."},
    ],
    "max_tokens": 64,
    "stream": True,
}


def one(client: httpx.Client, url: str, body: dict[str, Any]) -> tuple[float, float, int]:
    """(ttft_ms, total_ms, content chunks) for one streaming request."""
    start = time.perf_counter()
    ttft = None
    chunks = 0
    with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:"):
                continue
            if line.strip() == "data: [DONE]":
                break
            if '"content"' in line:
                chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - start
    total = time.perf_counter() - start
    return (ttft if ttft is not None else total) * 1000.0, total * 1000.0, chunks


def measure(url: str, n: int, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """Median and p95 TTFT and total over ``n`` sequential streaming requests (after 5 warm-ups)."""
    body = body or BODY
    with httpx.Client(timeout=60.0, headers={"authorization": f"Bearer {CLIENT_KEY}"}) as client:
        for _ in range(5):
            one(client, url, body)
        results = [one(client, url, body) for _ in range(n)]
    ttft = [r[0] for r in results]
    total = [r[1] for r in results]
    return {
        "ttft_p50": round(statistics.median(ttft), 3),
        "ttft_p95": round(_p(ttft, 95), 3),
        "total_p50": round(statistics.median(total), 3),
        "total_p95": round(_p(total, 95), 3),
        "chunks": results[-1][2],
        "n": n,
    }


def _p(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100.0))]
