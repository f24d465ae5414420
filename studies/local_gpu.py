"""The local tier on a GPU: Tiergate's in-process llama.cpp backend with ``n_gpu_layers``.

Needs a CUDA build of llama-cpp-python (``make install CMAKE_ARGS="-DGGML_CUDA=on"``); on a
CPU-only build it says so and exits 0. It checks that the build can offload and that loading the
GGUF puts every layer on the GPU (from llama.cpp's load log), then streams the same prompts
through :class:`router.backends.local.LlamaCppBackend` with ``n_gpu_layers`` 0 and -1: time to
the first token, generation rate, and whether greedy answers agree between CPU and GPU.

    python -m studies.local_gpu [--gguf PATH] [--out studies/results/local_gpu.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
GGUF = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = (
    "Write a long story about a lighthouse keeper and a storm.",
    "Explain how a bicycle stays upright, step by step.",
    "List ten uses for a paperclip, one per line.",
)
MAX_TOKENS = 128
ROUNDS = 3


@dataclass(frozen=True)
class _Model:
    """The parts of a policy ModelSpec the backend reads."""

    name: str = "local"
    tier: str = "local"
    litellm_model: str | None = None
    api_base: str | None = None
    api_key_env: str | None = None
    timeout_s: float | None = None


def _gpu_memory_mib() -> int | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return int(out.split()[0])


def _offloaded_layers(gguf: Path) -> str | None:
    """llama.cpp's own account of the offload ("offloaded 31/31 layers to GPU")."""
    from llama_cpp import Llama

    with tempfile.TemporaryFile() as log_file:
        saved = os.dup(2)
        os.dup2(log_file.fileno(), 2)  # llama.cpp logs from C: capture descriptor 2 itself
        try:
            llm = Llama(model_path=str(gguf), n_gpu_layers=-1, n_ctx=512, verbose=True)
            del llm
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        log_file.seek(0)
        log = log_file.read().decode("utf-8", errors="replace")
    match = re.search(r"offloaded (\d+)/(\d+) layers to GPU", log)
    return match.group(0) if match else None


async def _stream(backend: Any, prompt: str) -> tuple[float, float, str, int]:
    from router.backends import Usage

    body = {
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": prompt},
        ],
        "temperature": 0,
        "max_tokens": MAX_TOKENS,
    }
    usage = Usage()
    start = time.perf_counter()
    first: float | None = None
    parts: list[str] = []
    async for chunk in backend.stream(_Model(), body, usage):
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content")
            if text:
                first = first if first is not None else time.perf_counter()
                parts.append(text)
    end = time.perf_counter()
    ttft = ((first or end) - start) * 1000.0
    tokens = usage.completion_tokens
    rate = (tokens - 1) / (end - first) if first is not None and tokens > 1 else 0.0
    return ttft, rate, "".join(parts), tokens


def _run(gguf: Path, n_gpu_layers: int, threads: int) -> dict[str, Any]:
    from router.backends.local import LlamaCppBackend
    from router.config import Settings

    settings = Settings(
        local_model_path=gguf, n_gpu_layers=n_gpu_layers, n_threads=threads, n_ctx=2048
    )
    backend = LlamaCppBackend(settings)
    before = _gpu_memory_mib()
    started = time.perf_counter()
    backend.load()
    load_s = time.perf_counter() - started
    after = _gpu_memory_mib()

    async def go() -> list[tuple[float, float, str, int]]:
        await _stream(backend, PROMPTS[0])  # warm-up
        out = []
        for _ in range(ROUNDS):
            for prompt in PROMPTS:
                out.append(await _stream(backend, prompt))
        await backend.aclose()
        return out

    results = asyncio.run(go())
    return {
        "n_gpu_layers": n_gpu_layers,
        "n_threads": threads,
        "load_s": round(load_s, 3),
        "gpu_memory_mib_added": None if before is None or after is None else after - before,
        "ttft_ms_median": round(statistics.median(r[0] for r in results), 2),
        "tokens_per_s_median": round(statistics.median(r[1] for r in results), 1),
        "completion_tokens": sum(r[3] for r in results),
        "answers": [r[2] for r in results[: len(PROMPTS)]],
    }


def main(argv: list[str] | None = None) -> int:
    """Measure the local backend on the GPU against the CPU; print and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=GGUF)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    args = parser.parse_args(argv)
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed; skipped")
        return 0
    if not llama_cpp.llama_supports_gpu_offload():
        print("this llama-cpp-python build cannot offload to a GPU; skipped")
        return 0
    report: dict[str, Any] = {
        "llama_cpp_python": llama_cpp.__version__,
        "python": platform.python_version(),
        "gguf": args.gguf.name,
        "max_tokens": MAX_TOKENS,
        "requests_per_run": ROUNDS * len(PROMPTS),
        "offload_log": _offloaded_layers(args.gguf),
    }
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        report["gpu"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            check=False,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    cpu = _run(args.gguf, 0, args.threads)
    gpu = _run(args.gguf, -1, args.threads)
    report["cpu"], report["gpu_run"] = cpu, gpu
    report["greedy_answers_equal"] = cpu["answers"] == gpu["answers"]
    if cpu["tokens_per_s_median"]:
        report["speedup"] = round(gpu["tokens_per_s_median"] / cpu["tokens_per_s_median"], 2)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
