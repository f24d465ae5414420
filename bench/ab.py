"""Proxy overhead of two revisions side by side: ``python -m bench.ab REV``.

Runs ``tiergate serve`` from a git worktree at ``REV`` (the base) and from this checkout (the
head) at the same time, on separate ports, against one fake upstream, and alternates ``wrk``
between them round by round (the order flips each round). Both servers see the same machine
state, so a difference in the medians is the code's, not the host's: a sequential A/B on a
shared machine moves by more than most changes cost (bench/README.md).

The worktree links this checkout's fetched model files (the GGUF, the encoder weights, the
mapped table), so both sides serve the same shipped router.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from bench import proxy
from bench.procs import ROOT, free_port, python, server, wrk

SIDES = ("base", "head")


def orders(rounds: int) -> list[tuple[str, str]]:
    """The order the two sides run in each round: base first, then head first, and so on."""
    return [SIDES if i % 2 == 0 else SIDES[::-1] for i in range(rounds)]


def summarise(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per concurrency: each side's median req/s and p50 (ms) over its rounds, and head minus
    base."""
    out: dict[str, Any] = {}
    for c in sorted({r["connections"] for r in runs}):
        level: dict[str, Any] = {}
        for side in SIDES:
            mine = [r for r in runs if r["connections"] == c and r["side"] == side]
            level[side] = {
                "rps": statistics.median(r["rps"] for r in mine),
                "p50_ms": statistics.median(r["p50"] for r in mine),
                "rounds": len(mine),
            }
        level["head_minus_base"] = {
            k: level["head"][k] - level["base"][k] for k in ("rps", "p50_ms")
        }
        out[f"c{c}"] = level
    return out


def _ignored_model_files() -> list[Path]:
    done = subprocess.run(
        ["git", "ls-files", "--others", "--ignored", "--exclude-standard", "models"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [Path(line) for line in done.stdout.splitlines() if line]


@contextmanager
def worktree(rev: str) -> Iterator[Path]:
    """A detached worktree at ``rev`` with this checkout's fetched model files linked in."""
    dest = Path(tempfile.mkdtemp(prefix="tiergate-ab-")) / "tree"
    subprocess.run(
        ["git", "worktree", "add", "--detach", "-q", str(dest), rev], cwd=ROOT, check=True
    )
    try:
        for rel in _ignored_model_files():
            link = dest / rel
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(ROOT / rel)
        yield dest
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(dest)], cwd=ROOT, check=False)


def run(rev: str, *, rounds: int, duration_s: float, concurrency: Sequence[int]) -> dict[str, Any]:
    """Serve both sides, alternate wrk between them, and return every run and the summary."""
    work = Path(tempfile.mkdtemp(prefix="tiergate-ab-work-"))
    with ExitStack() as stack:
        tree = stack.enter_context(worktree(rev))
        up = stack.enter_context(proxy.upstream(work))
        policy = proxy.bench_policy(up.port, work / "bench-policy.yaml")
        urls = {}
        for side, code in (("base", tree), ("head", ROOT)):
            port = free_port()
            env = {**proxy.tiergate_env(work, policy, local=False), "PYTHONPATH": str(code)}
            srv = stack.enter_context(
                server(
                    f"tiergate-{side}",
                    [str(Path(python()).parent / "tiergate"), "serve", "--port", str(port)],
                    port=port,
                    ready_path="/healthz",
                    env=env,
                    workdir=work,
                )
            )
            urls[side] = f"{srv.base}/v1/chat/completions"
        runs = []
        for i, order in enumerate(orders(rounds)):
            for c in concurrency:
                for side in order:
                    result = wrk(
                        urls[side],
                        connections=c,
                        duration_s=duration_s,
                        body_file=proxy.chat_body(),
                    )
                    runs.append({"round": i, "side": side, "connections": c, **result})
                    print(
                        f"round {i} {side} c{c}: {result['rps']:.0f} req/s, "
                        f"p50 {result['p50']:.3f} ms",
                        flush=True,
                    )
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return {
        "base": rev,
        "head": f"{head} (working tree)",
        "rounds": rounds,
        "duration_s": duration_s,
        "load_average": os.getloadavg(),
        "runs": runs,
        "summary": summarise(runs),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ab", description=__doc__.split("\n")[0])
    parser.add_argument("rev", help="the base revision (a commit, tag or branch)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per wrk run")
    parser.add_argument("--concurrency", default="1,16", help="wrk connections, comma-separated")
    parser.add_argument("--out", type=Path, help="write the runs and the summary as JSON")
    args = parser.parse_args(argv)
    result = run(
        args.rev,
        rounds=args.rounds,
        duration_s=args.duration,
        concurrency=[int(c) for c in args.concurrency.split(",")],
    )
    for level, figures in result["summary"].items():
        base, head, diff = figures["base"], figures["head"], figures["head_minus_base"]
        print(
            f"{level}: base {base['rps']:.0f} req/s p50 {base['p50_ms']:.3f} ms; "
            f"head {head['rps']:.0f} req/s p50 {head['p50_ms']:.3f} ms; "
            f"head - base {diff['rps']:+.0f} req/s {diff['p50_ms']:+.3f} ms"
        )
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
