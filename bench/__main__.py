"""``make bench``: every benchmark in one run; writes bench/results and bench/README.md's table.

Phases (each figure is compared with its reference measured in the same run):

1. proxy overhead: the fake upstream direct, through Tiergate, through LiteLLM proxy, with wrk at
   several concurrencies; streaming TTFT and total time; idle RSS and RSS after 10,000 requests;
2. decision latency: signals + scorer + policy over the prompts in the shared data, one core,
   for the server's router and, beside it in the same run, the static router
   (``router.artifact.STATIC_MODEL_NAME``), which the decision budget applies to;
3. local throughput: Tiergate's in-process llama.cpp tier against ``llama_cpp.server``;
   Tiergate's RSS with the model loaded;
4. decision at the size cap: the same decision on 8 MiB bodies of several shapes
   (``bench/decision_cap.py``), one core.

Run: ``python -m bench [--quick] [--only proxy,decision,local,decision_cap] [--out FILE]``;
``--quick`` shortens the runs (3 s, one repeat, fewer requests for memory and streaming) except
where ``--duration`` or ``--repeats`` is given.
Phases that need no upstream (decision, decision_cap) run without wrk. ``--out`` writes the
run's results to FILE only (not latest.json, the dated copy or the README table): for running
one phase alone, e.g. ``python -m bench --only decision_cap --out
bench/results/decision_cap.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import local, proxy
from bench.procs import ROOT, python, wrk
from bench.report import update_readme
from router.artifact import STATIC_MODEL_NAME

RESULTS = ROOT / "bench" / "results"
#: The router over the static table alone, timed beside the server's (``decision_phases``).
STATIC_MODEL = Path("models") / STATIC_MODEL_NAME  # from ROOT, where the phase runs
GOALS = {
    "added_p50_c1_vs_litellm": 0.15,
    "added_p50_c1_ms": 1.5,
    "rps_c64_vs_litellm": 5.0,
    "decision_p50_ms": 0.3,
    "decision_p99_ms": 1.0,
    "evaluate_p99_ms": 0.15,
    "local_tokens_per_s_ratio": 0.97,
    "idle_rss_vs_litellm": 0.33,
    "decision_at_cap_max_ms": 100.0,
}
#: Phases that talk to the fake upstream (the others run without it, and without wrk).
UPSTREAM_PHASES = {"proxy", "local"}


def machine() -> dict[str, Any]:
    """What the figures were measured on, including the load other users put on it."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = 0.0
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        mem_gb = round(pages / 2**30, 1)
    except (ValueError, OSError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "wrk": _version(["wrk", "--version"]),
        "litellm": _version(
            [
                str(proxy.LITELLM_VENV / "bin" / "python"),
                "-c",
                "import importlib.metadata as m; print(m.version('litellm'))",
            ]
        ),
        "git_commit": _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"]),
    }


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    except OSError:
        return "missing"
    return (
        (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr) else ""
    )


def ensure_tools(phases: set[str]) -> None:
    """wrk on PATH; LiteLLM proxy in its own venv; llama_cpp.server's extras: install if missing.

    The LiteLLM venv (``bench/.venv-litellm``, git-ignored) and the two server extras are
    installed with pip from PyPI on first use; none of them is a Tiergate dependency.
    """
    if phases & UPSTREAM_PHASES and shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    if "proxy" in phases and not (proxy.LITELLM_VENV / "bin" / "litellm").exists():
        print("installing litellm[proxy] into bench/.venv-litellm ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(proxy.LITELLM_VENV)], check=True)
        pip = str(proxy.LITELLM_VENV / "bin" / "pip")
        subprocess.run([pip, "install", "-q", "litellm[proxy]"], check=True)
    if "local" in phases and importlib.util.find_spec("sse_starlette") is None:
        print("installing llama_cpp.server's extras into this venv ...", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "sse-starlette", "starlette-context"],
            check=True,
        )


def decision_phase(limit: int | None, model: Path | None = None) -> dict[str, Any]:
    """Run the decision benchmark in its own process (pinned to one core) for ``model``, else
    for the router the server loads."""
    argv = [python(), "-m", "bench.decision_pipeline", "--json"]
    if model is not None:
        argv += ["--model", str(model)]
    if limit:
        argv += ["--limit", str(limit)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=True)
    if done.stderr.strip():
        print(f"  {done.stderr.strip()}", flush=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def decision_phases(limit: int | None) -> dict[str, Any]:
    """The server's router (``decision``) and, when that is another, the static router
    (``decision_static``, which the decision budget applies to), one after the other."""
    out = {"decision": decision_phase(limit)}
    print(f"  {_decision_line(out['decision'])}", flush=True)
    if out["decision"]["scorer"] != f"learned {STATIC_MODEL_NAME}":
        out["decision_static"] = decision_phase(limit, STATIC_MODEL)
        print(f"  {_decision_line(out['decision_static'])}", flush=True)
    return out


def _decision_line(d: dict[str, Any]) -> str:
    prompts = f"sampled {d['sampled']}" if d.get("sampled") else f"{d['prompts']} prompts"
    return (
        f"{d['scorer']}: p50 {d['p50']:.4f} ms, p90 {d.get('p90', 0.0):.4f} ms, "
        f"p99 {d['p99']:.4f} ms, mean {d['mean']:.4f} ms ({prompts}, fastest of "
        f"{d['passes']} pass{'' if d['passes'] == 1 else 'es'})"
    )


def decision_cap_phase(quick: bool) -> dict[str, Any]:
    """Run the size-cap decision benchmark in its own process (pinned to one core)."""
    argv = [python(), "-m", "bench.decision_cap", "--json", "--repeats", "2" if quick else "5"]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, check=True)
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def goals(results: dict[str, Any]) -> dict[str, Any]:
    """Each goal: the measured value, the target and whether it is met."""
    out: dict[str, Any] = {}
    c1, c64 = results.get("proxy", {}).get("c1"), results.get("proxy", {}).get("c64")
    mem, loc = results.get("memory", {}), results.get("local")
    # The budget is the static router's: a router that reads prompts through the encoder costs
    # milliseconds by design (its figures are reported beside, not against the budget).
    dec = results.get("decision_static") or results.get("decision")

    def goal(name: str, value: float | None, target: float, higher_is_better: bool) -> None:
        met = None if value is None else (value >= target if higher_is_better else value <= target)
        out[name] = {"value": value, "target": target, "met": met}

    if c1:
        goal("added_p50_c1_vs_litellm", c1["tiergate_vs_litellm_added_p50"], 0.15, False)
        goal("added_p50_c1_ms", c1["tiergate_added_p50"], 1.5, False)
    if c64:
        goal("rps_c64_vs_litellm", c64["tiergate_vs_litellm_rps"], 5.0, True)
        out["errors_c64"] = {
            "value": c64["tiergate_errors"],
            "target": 0,
            "met": c64["tiergate_errors"] == 0,
        }
    if dec:
        goal("decision_p50_ms", dec["p50"], 0.3, False)
        goal("decision_p99_ms", dec["p99"], 1.0, False)
        if "evaluate_p99" in dec:
            goal("evaluate_p99_ms", dec["evaluate_p99"], 0.15, False)
    if loc:
        goal("local_tokens_per_s_ratio", loc["tokens_per_s_ratio"], 0.97, True)
    cap = results.get("decision_cap")
    if cap:
        worst = max(row["min_ms"] for row in cap["shapes"].values())
        goal("decision_at_cap_max_ms", worst, 100.0, False)
    if mem.get("litellm_idle_rss_mb"):
        ratio = round(mem["tiergate_idle_rss_mb"] / mem["litellm_idle_rss_mb"], 3)
        goal("idle_rss_vs_litellm", ratio, 0.33, False)
    return out


def _exit_on_term(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds the context managers, which stop the servers


def _upstream_phases(
    args: argparse.Namespace,
    phases: set[str],
    concurrency: list[int],
    results: dict[str, Any],
    workdir: Path,
) -> None:
    """The phases that run against the fake upstream (and the decision phase beside them)."""
    with proxy.upstream(workdir) as up:
        policy = proxy.bench_policy(up.port, workdir / "bench-policy.yaml")
        check = wrk(up.base + proxy.CHAT, connections=1, duration_s=min(args.duration, 5.0))
        results["upstream_c1"] = {k: check[k] for k in ("p50", "p99", "rps", "errors")}
        print(f"upstream alone c1: p50 {check['p50']:.3f} ms, {check['rps']:.0f} rps")
        if "proxy" in phases:
            print("proxy overhead ...", flush=True)
            got = proxy.run(
                workdir,
                up,
                policy,
                duration_s=args.duration,
                repeats=args.repeats,
                concurrency=concurrency,
                stream_n=results["settings"]["stream_requests_per_repeat"],
                requests_for_memory=results["settings"]["requests_for_memory"],
            )
            results["proxy"] = got["proxy"]
            results["streaming"] = got["streaming"]
            results["memory"].update(got["memory"])
            results["proxy_runs"] = got["runs"]
            results["fronts"] = got["fronts"]
            results["front_runs"] = got["front_runs"]
        if "decision" in phases:
            print("decision latency ...", flush=True)
            results.update(decision_phases(2000 if args.quick else None))
        if "local" in phases:
            print("local throughput ...", flush=True)
            got = local.run(
                workdir,
                policy,
                repeats=2 if args.quick else 5,
                requests_for_memory=results["settings"]["requests_for_memory"],
            )
            results["local"] = got
            results["memory"]["tiergate_idle_rss_with_model_mb"] = got.pop(
                "tiergate_idle_rss_with_model_mb"
            )
            for key in list(got):
                if key.startswith("tiergate_rss_with_model"):
                    results["memory"][key] = got.pop(key)
            print(f"  {results['local']}", flush=True)


def main() -> int:
    """Entry point of ``python -m bench``."""
    signal.signal(signal.SIGTERM, _exit_on_term)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="short runs, for development")
    parser.add_argument("--only", default="proxy,decision,local,decision_cap", help="phases to run")
    parser.add_argument("--duration", type=float, help="seconds per wrk run (10; --quick: 3)")
    parser.add_argument("--repeats", type=int, help="interleaved repeats (3; --quick: 1)")
    parser.add_argument("--concurrency", default="1,16,64,256")
    parser.add_argument("--no-write", action="store_true", help="print, do not write results")
    parser.add_argument(
        "--body",
        type=Path,
        help="the chat request of the proxy phase (bench/chat.json; bench/chat_encoded.json: "
        "a prompt the gated capability model reads through the encoder)",
    )
    parser.add_argument(
        "--out", type=Path, help="write the results here only (not latest.json or the README)"
    )
    args = parser.parse_args()
    # --quick shortens what it is not told: e.g. --quick --repeats 3 keeps three repeats.
    if args.duration is None:
        args.duration = 3.0 if args.quick else 10.0
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    phases = set(args.only.split(","))
    if args.body is not None:
        os.environ["BENCH_BODY"] = str(args.body.resolve())  # wrk's post.lua reads it too
    ensure_tools(phases)
    concurrency = [int(c) for c in args.concurrency.split(",")]
    started = time.monotonic()
    results: dict[str, Any] = {
        "when": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "machine": machine(),
        "settings": {
            "wrk_duration_s": args.duration,
            "repeats": args.repeats,
            "concurrency": concurrency,
            "stream_requests_per_repeat": 30 if args.quick else 100,
            "requests_for_memory": 2000 if args.quick else 10_000,
            "chat_body": str(proxy.chat_body().resolve().relative_to(ROOT)),
        },
        "commands": {
            "all": "make bench   # = .venv/bin/python -m bench",
            "wrk": f"wrk -t1 -c<C> -d{args.duration:g}s --timeout 10s -s bench/post.lua "
            "http://127.0.0.1:<port>/v1/chat/completions",
            "wrk_fronts": f"BENCH_BODY=bench/<messages|responses>.json wrk -t1 -c<C> "
            f"-d{args.duration:g}s --timeout 10s -s bench/post.lua "
            "http://127.0.0.1:<port>/v1/<messages|responses>",
            "tiergate_anthropic": "the same, its policy's closed models [claude, gpt-4o]",
            "upstream": "python -m bench.upstream --port <up>",
            "tiergate": "TIERGATE_POLICY=<bench-policy.yaml> TIERGATE_LOCAL_BACKEND=none "
            "BENCH_OPENAI_KEY=sk-bench tiergate serve --port <port>",
            "litellm": "bench/.venv-litellm/bin/litellm --config <litellm.yaml> --port <port> "
            "--num_workers 1",
            "llama_server": "python -m llama_cpp.server --model "
            "models/SmolLM2-135M-Instruct.Q4_1.gguf --n_ctx 2048 --n_threads 1 --n_batch 512",
            "decision": "python -m bench.decision_pipeline",
            "decision_static": "python -m bench.decision_pipeline --model "
            f"models/{STATIC_MODEL_NAME}",
            "decision_cap": "python -m bench.decision_cap",
        },
        "proxy": {},
        "memory": {},
    }
    if "decision_cap" in phases:
        print("decision at the size cap ...", flush=True)
        results["decision_cap"] = decision_cap_phase(args.quick)
        print(f"  {results['decision_cap']['shapes']}", flush=True)
    if "decision" in phases and not phases & UPSTREAM_PHASES:
        print("decision latency ...", flush=True)
        results.update(decision_phases(2000 if args.quick else None))
        phases.discard("decision")
    with tempfile.TemporaryDirectory(prefix="tiergate-bench-") as tmp:
        workdir = Path(tmp)
        if phases & UPSTREAM_PHASES:
            _upstream_phases(args, phases, concurrency, results, workdir)
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["goals"] = goals(results)
    results["elapsed_s"] = round(time.monotonic() - started, 1)
    text = json.dumps(results, indent=2) + "\n"
    if args.no_write:
        print(text)
        return 0
    if args.out is not None:
        args.out.write_text(text)
        print(f"wrote {args.out} ({results['elapsed_s']:.0f} s)")
        return 0
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(text)
    stamp = datetime.now(UTC).strftime("%Y-%m-%d")
    (RESULTS / f"{stamp}.json").write_text(text)
    update_readme(ROOT / "bench" / "README.md", results)
    print(
        f"wrote bench/results/latest.json, bench/results/{stamp}.json, bench/README.md "
        f"({results['elapsed_s']:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
