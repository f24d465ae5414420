"""Proxy overhead and memory: the fake upstream direct, through Tiergate, through LiteLLM proxy.

All the servers run side by side for the whole phase; for each concurrency the paths are
measured in turn, repeat after repeat (a, b, c, a, b, c, ...), so that load from other users of
the machine falls on all of them alike. Figures are medians over the repeats.

Beside chat completions, each of Tiergate's other fronts (:data:`FRONTS`) is measured at
:data:`FRONT_CONCURRENCY` against the upstream called directly in that front's own API, once
per route a front can take: native (the closed model speaks the front's API and gets the
client's request as sent) and translated (the request becomes a chat request for a model that
does not). A second Tiergate whose default closed model is Anthropic's serves the Anthropic
routes; LiteLLM proxy's ``/v1/messages`` is the anchor, through both kinds of model.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import yaml

from bench import streaming
from bench.procs import ROOT, Server, free_port, python, server, wrk

BENCH_KEY_ENV = "BENCH_OPENAI_KEY"
BENCH_KEY = "sk-bench-not-a-real-key"
CLIENT_KEY = "sk-bench-3f9c2a7e41d05b86c1e9a4f27d3b6058"
LITELLM_VENV = ROOT / "bench" / ".venv-litellm"
CHAT = "/v1/chat/completions"
#: The Anthropic model of the bench policies and LiteLLM's config, at the same upstream.
ANTHROPIC_MODEL = "anthropic/claude-3-5-sonnet-20241022"
#: The concurrencies the other fronts are measured at: added latency alone, and throughput.
FRONT_CONCURRENCY = (1, 64)


@dataclass(frozen=True)
class Front:
    """A front measured beside chat completions: its path, its request (``bench/<body>``) and
    the routes through it, each ``name: (server, model)``; ``model`` replaces the body's
    ``auto`` where the route needs a named model (LiteLLM has no router to pick one)."""

    path: str
    body: str
    routes: dict[str, tuple[str, str | None]]


FRONTS = {
    "messages": Front(
        "/v1/messages",
        "messages.json",
        {
            # Tiergate: an Anthropic model gets the request as sent; an OpenAI one a chat request.
            "tiergate_native": ("tiergate_anthropic", None),
            "tiergate_translated": ("tiergate", None),
            "litellm_native": ("litellm", "claude"),
            "litellm_translated": ("litellm", None),
        },
    ),
    "responses": Front(
        "/v1/responses",
        "responses.json",
        {
            # An OpenAI model gets the request as sent; an Anthropic one a chat request (then
            # litellm's Anthropic chat path, as any chat request to that model).
            "tiergate_native": ("tiergate", None),
            "tiergate_translated": ("tiergate_anthropic", None),
        },
    ),
}


def bench_policy(upstream_port: int, dest: Path, *, anthropic_first: bool = False) -> Path:
    """policies/default.yaml with its closed tier pointed at the fake upstream, threshold 0.

    The rules stay as shipped (so evaluation costs what it costs in production); the closed
    models are the upstream, and ``auto`` has threshold 0 so every request is routed closed, to
    the first closed model: OpenAI's, or with ``anthropic_first`` Anthropic's.
    """
    policy = yaml.safe_load((ROOT / "policies" / "default.yaml").read_text())
    base = f"http://127.0.0.1:{upstream_port}"
    policy["models"] = {
        "local": policy["models"]["local"],
        "gpt-4o": {
            "tier": "closed",
            "litellm_model": "openai/gpt-4o",
            "api_base": base + "/v1",
            "api_key_env": BENCH_KEY_ENV,
            "context_window": 128000,
        },
        "claude": {
            "tier": "closed",
            "litellm_model": ANTHROPIC_MODEL,
            "api_base": base,
            "api_key_env": BENCH_KEY_ENV,
            "context_window": 200000,
        },
    }
    policy["closed_models"] = ["claude", "gpt-4o"] if anthropic_first else ["gpt-4o", "claude"]
    policy["threshold"] = 0.0
    policy["aliases"] = {"auto": {"threshold": 0.0}}
    policy["store_prompts"] = "none"
    dest.write_text(yaml.safe_dump(policy, sort_keys=False))
    return dest


def litellm_config(upstream_port: int, dest: Path) -> Path:
    """A LiteLLM proxy config for the same upstream, no database."""
    config = {
        "model_list": [
            {
                "model_name": "auto",
                "litellm_params": {
                    "model": "openai/gpt-4o",
                    "api_base": f"http://127.0.0.1:{upstream_port}/v1",
                    "api_key": f"os.environ/{BENCH_KEY_ENV}",
                },
            },
            {
                "model_name": "claude",
                "litellm_params": {
                    "model": ANTHROPIC_MODEL,
                    "api_base": f"http://127.0.0.1:{upstream_port}",
                    "api_key": f"os.environ/{BENCH_KEY_ENV}",
                },
            },
        ],
        "litellm_settings": {"telemetry": False, "drop_params": True},
        # A master key, as a deployment has (LiteLLM refuses to start without one); the load
        # generator sends it as the bearer token on every path.
        "general_settings": {"master_key": CLIENT_KEY},
    }
    dest.write_text(yaml.safe_dump(config, sort_keys=False))
    return dest


@contextmanager
def upstream(workdir: Path) -> Iterator[Server]:
    """The fake upstream (see bench/upstream.py)."""
    port = free_port()
    with server(
        "upstream",
        [python(), "-m", "bench.upstream", "--port", str(port)],
        port=port,
        ready_path="/v1/models",
        workdir=workdir,
    ) as srv:
        yield srv


def tiergate_env(workdir: Path, policy: Path, *, local: bool) -> dict[str, str]:
    """Settings for ``tiergate serve`` under test."""
    env = {
        BENCH_KEY_ENV: BENCH_KEY,
        "TIERGATE_POLICY": str(policy),
        "TIERGATE_LOCAL_BACKEND": "llama_cpp" if local else "none",
        # The GGUF `make model` fetches into the checkout (the server's own default is the
        # user data directory, where a fresh machine has none).
        "TIERGATE_LOCAL_MODEL_PATH": os.environ.get("TIERGATE_LOCAL_MODEL_PATH")
        or str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"),
        "TIERGATE_SQLITE_PATH": str(workdir / f"outcomes-{time.monotonic_ns()}.db"),
        "TIERGATE_LOG_LEVEL": "warning",
        "TIERGATE_N_THREADS": "1",
        "TIERGATE_N_CTX": "2048",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    }
    return env


@contextmanager
def tiergate(
    workdir: Path, policy: Path, *, local: bool = False, name: str | None = None
) -> Iterator[Server]:
    """``tiergate serve``: one worker, the closed tier at the upstream."""
    port = free_port()
    tiergate_bin = Path(python()).parent / "tiergate"
    with server(
        name or ("tiergate-model" if local else "tiergate"),
        [str(tiergate_bin), "serve", "--port", str(port)],
        port=port,
        ready_path="/healthz",
        env=tiergate_env(workdir, policy, local=local),
        workdir=workdir,
    ) as srv:
        yield srv


@contextmanager
def litellm(workdir: Path, config: Path) -> Iterator[Server]:
    """LiteLLM proxy from its own venv: one worker, no database."""
    port = free_port()
    env = {
        BENCH_KEY_ENV: BENCH_KEY,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "LITELLM_LOG": "ERROR",
        "DISABLE_SCHEMA_UPDATE": "true",
    }
    env.pop("DATABASE_URL", None)
    os.environ.pop("DATABASE_URL", None)
    with server(
        "litellm",
        [
            str(LITELLM_VENV / "bin" / "litellm"),
            "--config",
            str(config),
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        port=port,
        ready_path="/health/liveliness",
        env=env,
        workdir=workdir,
        timeout_s=180.0,
    ) as srv:
        yield srv


def settle_rss(srv: Server, seconds: float = 3.0) -> float:
    """RSS after the server has sat idle for a moment (lazy start-up work done)."""
    time.sleep(seconds)
    return round(srv.rss_mb(), 1)


def chat_body() -> Path:
    """The chat request every chat-completions path is measured with: ``$BENCH_BODY`` (which
    ``post.lua`` reads too; ``python -m bench --body``), else ``bench/chat.json``."""
    return Path(os.environ.get("BENCH_BODY") or ROOT / "bench" / "chat.json")


#: 240 prompts written for Tiergate (40 for each of six capabilities), for the memory a proxy
#: holds after varied traffic: a prompt reads its own rows of the capability table (a mapped
#: file) and, where the table is unsure, its own encoder pass; one repeated body reads the same.
VARIED_PROMPTS = ROOT / "studies" / "data" / "capability_seeds_3.jsonl"


def varied_bodies() -> list[bytes]:
    """:func:`chat_body` with its user message replaced by each of :data:`VARIED_PROMPTS`."""
    template = json.loads(chat_body().read_text())
    out = []
    for line in VARIED_PROMPTS.read_text().splitlines():
        body = json.loads(json.dumps(template))
        body["messages"][-1]["content"] = json.loads(line)["prompt"]
        out.append(json.dumps(body).encode())
    return out


def send_n(
    srv: Server,
    n: int,
    connections: int = 32,
    max_s: float = 150.0,
    bodies: list[bytes] | None = None,
) -> dict[str, Any]:
    """Send ``n`` requests, ``connections`` at a time (wrk cannot stop at a count): the
    :func:`chat_body`, or ``bodies`` in turn.

    Stops early after ``max_s`` seconds (a slow proxy on a loaded machine would otherwise hold
    the whole run); the number actually sent is returned and reported.
    """
    if bodies is None:
        bodies = [chat_body().read_bytes()]
    return asyncio.run(_send_n(srv.base + CHAT, n, connections, max_s, bodies))


async def _send_n(
    url: str, n: int, connections: int, max_s: float, bodies: list[bytes]
) -> dict[str, Any]:
    headers = {"content-type": "application/json", "authorization": f"Bearer {CLIENT_KEY}"}
    left = n
    sent = errors = 0
    start = time.perf_counter()
    deadline = start + max_s
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections)) as http:

        async def worker() -> None:
            nonlocal left, sent, errors
            while left > 0 and time.perf_counter() < deadline:
                left -= 1
                body = bodies[left % len(bodies)]
                async with http.post(url, data=body, headers=headers) as response:
                    await response.read()
                    sent += 1
                    errors += response.status != 200

        await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - start
    return {"requests": sent, "errors": errors, "rps": round(sent / elapsed, 1)}


def _rss_after(
    mem: dict[str, Any],
    servers: tuple[Server, ...],
    n: int,
    what: str,
    bodies: list[bytes] | None,
) -> dict[str, dict[str, Any]]:
    """Send ``n`` requests (:func:`send_n`) to each server in turn, then record each one's RSS
    as ``mem[f"{name}_rss_after_{what}_mb"]``; what each send returned, by server name."""
    sent = {srv.name: send_n(srv, n, bodies=bodies) for srv in servers}
    for srv in servers:
        mem[f"{srv.name}_rss_after_{what}_mb"] = round(srv.rss_mb(), 1)
    rows = ", ".join(f"{srv.name} {mem[f'{srv.name}_rss_after_{what}_mb']} MB" for srv in servers)
    kind = f"more requests, {len(bodies)} prompts in turn" if bodies else "requests"
    print(f"  RSS after {n} {kind}: {rows}", flush=True)
    return sent


def run(
    workdir: Path,
    up: Server,
    policy: Path,
    *,
    duration_s: float,
    repeats: int,
    concurrency: list[int],
    stream_n: int,
    requests_for_memory: int,
) -> dict[str, Any]:
    """The proxy phase; returns per-concurrency medians, streaming and the memory figures."""
    results: dict[str, Any] = {"runs": {}, "front_runs": {}, "memory": {}}
    with ExitStack() as stack:
        config = litellm_config(up.port, workdir / "litellm.yaml")
        tg = stack.enter_context(tiergate(workdir, policy))
        anthropic = bench_policy(
            up.port, workdir / "bench-policy-anthropic.yaml", anthropic_first=True
        )
        tga = stack.enter_context(tiergate(workdir, anthropic, name="tiergate-anthropic"))
        ll = stack.enter_context(litellm(workdir, config))
        mem = results["memory"]
        mem["tiergate_idle_rss_mb"] = settle_rss(tg)
        mem["litellm_idle_rss_mb"] = settle_rss(ll, 0.5)
        print(
            f"  idle RSS: tiergate {mem['tiergate_idle_rss_mb']} MB, "
            f"litellm {mem['litellm_idle_rss_mb']} MB",
            flush=True,
        )
        warm = _rss_after(mem, (tg, ll), requests_for_memory, "requests", None)
        mem["requests_for_memory"] = {k: v["requests"] for k, v in warm.items()}
        mem["memory_requests_errors"] = {k: v["errors"] for k, v in warm.items()}
        varied = varied_bodies()
        warm = _rss_after(mem, (tg, ll), requests_for_memory, "varied", varied)
        mem["varied_prompts"] = len(varied)
        mem["varied_requests_errors"] = {k: v["errors"] for k, v in warm.items()}
        paths = {"direct": up, "tiergate": tg, "litellm": ll}
        servers = {**paths, "tiergate_anthropic": tga}
        routes = front_routes(workdir, servers)
        for conc in concurrency:
            runs: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
            by_front = {f: {n: [] for n in r} for f, r in routes.items()}
            measure_fronts = conc in FRONT_CONCURRENCY
            for _ in range(repeats):
                for name, srv in paths.items():
                    runs[name].append(wrk(srv.base + CHAT, connections=conc, duration_s=duration_s))
                for front, named in routes.items() if measure_fronts else ():
                    for name, (url, body) in named.items():
                        by_front[front][name].append(
                            wrk(url, connections=conc, duration_s=duration_s, body_file=body)
                        )
            results["runs"][f"c{conc}"] = runs
            if measure_fronts:
                results["front_runs"][f"c{conc}"] = by_front
            print(
                f"  c{conc}: "
                + ", ".join(
                    f"{n} p50 {median(r, 'p50'):.3f} ms {median(r, 'rps'):.0f} rps"
                    for n, r in [*runs.items(), *_flat(by_front if measure_fronts else {})]
                ),
                flush=True,
            )
        streams: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
        stream_body = {**json.loads(chat_body().read_text()), "stream": True}
        for _ in range(repeats):
            for name, srv in paths.items():
                streams[name].append(streaming.measure(srv.base + CHAT, stream_n, stream_body))
        results["streaming"] = summarise_streams(streams)
        print(f"  streaming: {results['streaming']}", flush=True)
    results["proxy"] = summarise(results["runs"])
    results["fronts"] = summarise_fronts(results["runs"], results["front_runs"])
    return results


def front_routes(
    workdir: Path, servers: dict[str, Server]
) -> dict[str, dict[str, tuple[str, Path]]]:
    """Per front, ``{route: (url, request body file)}``, ``direct`` first; each route is checked
    once to answer 200, and each Tiergate route to be native or translated as named."""
    out: dict[str, dict[str, tuple[str, Path]]] = {}
    for front, spec in FRONTS.items():
        source = ROOT / "bench" / spec.body
        named = {"direct": (servers["direct"].base + spec.path, source)}
        for name, (srv, model) in spec.routes.items():
            body = source
            if model is not None:
                body = workdir / f"{front}-{name}.json"
                body.write_text(json.dumps({**json.loads(source.read_text()), "model": model}))
            named[name] = (servers[srv].base + spec.path, body)
            _check_route(front, name, *named[name])
        out[front] = named
    return out


def _check_route(front: str, name: str, url: str, body: Path) -> None:
    """Refuse to measure a route that fails or does not take the path its name says.

    A native answer is the upstream's own (its ``id``); a translated one is Tiergate's.
    """
    headers = {"content-type": "application/json", "authorization": f"Bearer {CLIENT_KEY}"}
    response = httpx.post(url, content=body.read_bytes(), headers=headers, timeout=30.0)
    if response.status_code != 200:
        raise RuntimeError(f"{front} {name}: {response.status_code} {response.text[:500]}")
    if name.startswith("tiergate_"):
        native = response.json().get("id") in ("msg_bench", "resp_bench")
        if native != name.endswith("_native"):
            raise RuntimeError(
                f"{front} {name}: the answer came {'native' if native else 'translated'}"
            )


def _flat(by_front: dict[str, dict[str, list[dict[str, Any]]]]) -> list[tuple[str, Any]]:
    return [
        (f"{front} {name}", rs) for front, named in by_front.items() for name, rs in named.items()
    ]


def median(runs: list[dict[str, Any]], key: str) -> float:
    """Median of one figure over repeated runs."""
    return float(statistics.median(r[key] for r in runs))


def _level(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians for each path at one concurrency, and each path's added latency over direct."""
    row: dict[str, Any] = {}
    for name, rs in runs.items():
        for key in ("p50", "p95", "p99", "rps"):
            row[f"{name}_{key}"] = round(median(rs, key), 3)
        row[f"{name}_errors"] = int(sum(r["errors"] for r in rs))
    for name, rs in runs.items():
        if name == "direct":
            continue
        for key in ("p50", "p95", "p99"):
            # Added latency per repeat (same-run pairs), then the median.
            added = [p[key] - d[key] for p, d in zip(rs, runs["direct"], strict=True)]
            row[f"{name}_added_{key}"] = round(float(statistics.median(added)), 3)
    return row


def summarise(all_runs: dict[str, dict[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """Per concurrency: medians for each path, added latency, ratios."""
    out: dict[str, Any] = {}
    for level, runs in all_runs.items():
        row = _level(runs)
        row["tiergate_vs_litellm_added_p50"] = _ratio(
            row["tiergate_added_p50"], row["litellm_added_p50"]
        )
        row["tiergate_vs_litellm_rps"] = _ratio(row["tiergate_rps"], row["litellm_rps"])
        out[level] = row
    return out


def summarise_fronts(
    chat_runs: dict[str, dict[str, list[dict[str, Any]]]],
    front_runs: dict[str, dict[str, dict[str, list[dict[str, Any]]]]],
) -> dict[str, Any]:
    """Per front (chat completions first), per measured concurrency: as :func:`summarise`'s
    rows, each route against the upstream called directly in that front's API."""
    out: dict[str, Any] = {"chat": {}}
    for level, by_front in front_runs.items():
        out["chat"][level] = _level(chat_runs[level])
        for front, runs in by_front.items():
            out.setdefault(front, {})[level] = _level(runs)
    return out


def _ratio(a: float, b: float) -> float | None:
    return round(a / b, 3) if b else None


def summarise_streams(streams: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Medians of the per-repeat medians, and the added TTFT and total against direct."""
    out: dict[str, Any] = {}
    for name, rs in streams.items():
        for key in ("ttft_p50", "ttft_p95", "total_p50", "total_p95"):
            out[f"{name}_{key}"] = round(median(rs, key), 3)
        out[f"{name}_chunks"] = rs[-1]["chunks"]
    for name in ("tiergate", "litellm"):
        for key in ("ttft_p50", "total_p50"):
            added = [p[key] - d[key] for p, d in zip(streams[name], streams["direct"], strict=True)]
            out[f"{name}_added_{key}"] = round(float(statistics.median(added)), 3)
    return out
