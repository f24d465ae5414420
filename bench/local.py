"""Local throughput: Tiergate's in-process llama.cpp tier against ``python -m llama_cpp.server``.

Same GGUF, same thread count (1), n_ctx 2048, n_batch 512, the same messages (a system message
is sent, so Tiergate adds none), temperature 0 and max_tokens 128. Both servers stay up side by
side and are asked in turn, request after request, so machine load falls on both alike.
Each streamed request gives the time to the first token and the generation rate
(tokens after the first / time after the first), from the client's side of the wire.
"""

from __future__ import annotations

import statistics
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from bench.procs import ROOT, Server, free_port, python, server
from bench.proxy import send_n, settle_rss, tiergate

GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
MAX_TOKENS = 128
BODY = {
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Write a long story about a lighthouse keeper and a storm."},
    ],
    "temperature": 0,
    "max_tokens": MAX_TOKENS,
    "stream": True,
}


def _one(client: httpx.Client, url: str, model: str) -> dict[str, float]:
    start = time.perf_counter()
    first = last = None
    tokens = 0
    with client.stream("POST", url, json={**BODY, "model": model}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data:") or '"content"' not in line:
                continue
            if '"content":""' in line.replace(" ", ""):
                continue
            now = time.perf_counter()
            first = first if first is not None else now
            last = now
            tokens += 1
    end = time.perf_counter()
    assert first is not None and last is not None, "no tokens streamed"
    gen_s = last - first
    return {
        "ttft_ms": (first - start) * 1000.0,
        "total_ms": (end - start) * 1000.0,
        "tokens": tokens,
        "tokens_per_s": (tokens - 1) / gen_s if gen_s > 0 else 0.0,
    }


def _llama_server(workdir: Path) -> Any:
    port = free_port()
    return server(
        "llama_cpp.server",
        [
            python(),
            "-m",
            "llama_cpp.server",
            "--model",
            str(GGUF),
            "--n_ctx",
            "2048",
            "--n_threads",
            "1",
            "--n_batch",
            "512",
            "--port",
            str(port),
        ],
        port=port,
        ready_path="/v1/models",
        workdir=workdir,
    )


def run(workdir: Path, policy: Path, *, repeats: int, requests_for_memory: int) -> dict[str, Any]:
    """Medians over ``repeats`` alternating requests per server, after one warm-up each."""
    with ExitStack() as stack:
        tg: Server = stack.enter_context(tiergate(workdir, policy, local=True))
        idle_with_model = settle_rss(tg)
        ls: Server = stack.enter_context(_llama_server(workdir))
        targets = {"tiergate": (tg, "local"), "llama_server": (ls, "local")}
        got: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
        with httpx.Client(timeout=300.0) as client:
            for srv, model in targets.values():
                _one(client, srv.base + "/v1/chat/completions", model)
            for _ in range(repeats):
                for name, (srv, model) in targets.items():
                    got[name].append(_one(client, srv.base + "/v1/chat/completions", model))
        out: dict[str, Any] = {"tiergate_idle_rss_with_model_mb": idle_with_model}
        for name, rows in got.items():
            for key in ("tokens_per_s", "ttft_ms", "total_ms", "tokens"):
                out[f"{name}_{key}"] = round(statistics.median(r[key] for r in rows), 3)
        out["tokens_per_s_ratio"] = round(
            out["tiergate_tokens_per_s"] / out["llama_server_tokens_per_s"], 3
        )
        out["repeats"] = repeats
        out["tiergate_rss_with_model_after_local_mb"] = round(tg.rss_mb(), 1)
        send_n(tg, requests_for_memory)
        out["tiergate_rss_with_model_after_requests_mb"] = round(tg.rss_mb(), 1)
        return out
