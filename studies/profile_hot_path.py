"""Profile Tiergate's hot path: ``POST /v1/chat/completions``, closed tier, not streaming.

Runs the real app under uvicorn (uvloop, httptools, as ``tiergate serve`` does) in this process
with cProfile on, drives it with wrk against ``make bench``'s fake upstream, and prints the top
entries by own and by cumulative time. cProfile's own overhead inflates Python-heavy code, so
read the figures as shares.

    python -m studies.profile_hot_path [--seconds 8] [--connections 16] [--top 30]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import tempfile
import threading
import time
from pathlib import Path

import uvicorn
import uvloop

from bench.procs import free_port, wrk
from bench.proxy import BENCH_KEY, BENCH_KEY_ENV, CHAT, bench_policy, upstream


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--stream", action="store_true", help="profile streaming requests")
    args = parser.parse_args()
    os.environ[BENCH_KEY_ENV] = BENCH_KEY
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from router.app import create_app
    from router.config import Settings

    with tempfile.TemporaryDirectory() as tmp, upstream(Path(tmp)) as up:
        policy = bench_policy(up.port, Path(tmp) / "policy.yaml")
        settings = Settings(
            policy=policy,
            local_backend="none",
            sqlite_path=Path(tmp) / "o.db",
            log_level="warning",
            port=free_port(),
        )
        app = create_app(settings)
        config = uvicorn.Config(
            app, host="127.0.0.1", port=settings.port, log_level="warning", access_log=False
        )
        srv = uvicorn.Server(config)
        loops: list[asyncio.AbstractEventLoop] = []

        async def serve() -> None:
            loops.append(asyncio.get_running_loop())
            await srv.serve()

        thread = threading.Thread(target=lambda: uvloop.run(serve()), daemon=True)
        url = f"http://127.0.0.1:{settings.port}{CHAT}"
        profiler = cProfile.Profile()
        thread.start()
        while not srv.started:
            time.sleep(0.05)
        body = None
        if args.stream:
            body = Path(tmp) / "stream.json"
            chat = json.loads((Path(__file__).parent / "chat.json").read_text())
            body.write_text(json.dumps({**chat, "stream": True}))
        wrk(url, connections=args.connections, duration_s=2, body_file=body)  # warm-up
        # cProfile sees only the thread that enables it: switch it on from the server's loop.
        loops[0].call_soon_threadsafe(profiler.enable)
        got = wrk(url, connections=args.connections, duration_s=args.seconds, body_file=body)
        loops[0].call_soon_threadsafe(profiler.disable)
        time.sleep(0.2)
        srv.should_exit = True
        thread.join(10)
    print(f"profiled: {got['requests']} requests, {got['rps']:.0f} req/s under cProfile")
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(order)
        stats.print_stats(args.top)
        print(f"== by {order}, per request = total / {got['requests']}")
        print(out.getvalue())


if __name__ == "__main__":
    main()
