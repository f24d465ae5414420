"""The results table in bench/README.md, rewritten between two markers after each run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

START = "<!-- results:start (written by python -m bench; do not edit by hand) -->"
END = "<!-- results:end -->"


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render(results: dict[str, Any]) -> str:
    """Markdown for one run: machine, commands, proxy, streaming, decision, local, memory, goals."""
    m = results["machine"]
    lines = [
        START,
        "",
        f"Run of {results['when']} at commit `{m['git_commit']}`, {results['elapsed_s']:.0f} s. "
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['memory_gb']} GB, Linux {m['kernel']}, "
        f"Python {m['python']}, {m['wrk']}, LiteLLM {m['litellm']}. Load average "
        f"{m['loadavg_start']} at start, {m.get('loadavg_end')} at end (the machine is shared: "
        "read ratios, not absolute figures).",
        "",
        f"Settings: {results['settings']}.",
        "",
    ]
    up = results.get("upstream_c1")
    if up:
        lines += [
            f"Fake upstream alone at c1: p50 {_f(up['p50'], 3)} ms, p99 {_f(up['p99'], 3)} ms, "
            f"{_f(up['rps'], 0)} req/s.",
            "",
        ]
    if results.get("proxy"):
        lines += [
            "**Proxy overhead** (non-streaming, ms and req/s; medians over repeats; added = "
            "path minus direct in the same repeat):",
            "",
            "| conc | direct p50 | Tiergate p50 / p95 / p99 | LiteLLM p50 / p95 / p99 "
            "| Tiergate added p50 | LiteLLM added p50 | added ratio | Tiergate rps "
            "| LiteLLM rps | rps ratio | errors T / L |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for level, r in results["proxy"].items():
            lines.append(
                f"| {level} | {_f(r['direct_p50'], 3)} "
                f"| {_f(r['tiergate_p50'])} / {_f(r['tiergate_p95'])} / {_f(r['tiergate_p99'])} "
                f"| {_f(r['litellm_p50'])} / {_f(r['litellm_p95'])} / {_f(r['litellm_p99'])} "
                f"| {_f(r['tiergate_added_p50'], 3)} | {_f(r['litellm_added_p50'], 3)} "
                f"| {_f(r['tiergate_vs_litellm_added_p50'], 3)} | {_f(r['tiergate_rps'], 0)} "
                f"| {_f(r['litellm_rps'], 0)} | {_f(r['tiergate_vs_litellm_rps'])} "
                f"| {r['tiergate_errors']} / {r['litellm_errors']} |"
            )
        lines.append("")
    lines += _fronts_lines(results.get("fronts"))
    s = results.get("streaming")
    if s:
        lines += [
            "**Streaming** (50 chunks from the upstream, c1, ms):",
            "",
            "| path | TTFT p50 | TTFT p95 | total p50 | total p95 | added TTFT p50 "
            "| added total p50 |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in ("direct", "tiergate", "litellm"):
            lines.append(
                f"| {name} | {_f(s[f'{name}_ttft_p50'], 3)} | {_f(s[f'{name}_ttft_p95'], 3)} "
                f"| {_f(s[f'{name}_total_p50'], 3)} | {_f(s[f'{name}_total_p95'], 3)} "
                f"| {_f(s.get(f'{name}_added_ttft_p50'), 3)} "
                f"| {_f(s.get(f'{name}_added_total_p50'), 3)} |"
            )
        lines.append("")
    lines += decision_lines(results)
    lines += _decision_cap_lines(results.get("decision_cap"))
    loc = results.get("local")
    if loc:
        lines += [
            "**Local throughput** (SmolLM2-135M Q4_1, 1 thread, n_ctx 2048, temperature 0, "
            f"max_tokens 128, median of {loc['repeats']}):",
            "",
            "| server | tokens/s | TTFT ms | total ms | tokens |",
            "|---|---|---|---|---|",
        ]
        for name in ("tiergate", "llama_server"):
            lines.append(
                f"| {name} | {_f(loc[f'{name}_tokens_per_s'], 1)} "
                f"| {_f(loc[f'{name}_ttft_ms'], 1)} "
                f"| {_f(loc[f'{name}_total_ms'], 1)} | {_f(loc[f'{name}_tokens'], 0)} |"
            )
        lines += ["", f"Ratio Tiergate / llama_cpp.server: {_f(loc['tokens_per_s_ratio'], 3)}.", ""]
    mem = results.get("memory")
    if mem:
        lines += ["**Memory** (RSS, MB, process tree):", ""]
        lines += [f"- {k}: {v}" for k, v in mem.items()]
        lines.append("")
    g = results.get("goals")
    if g:
        lines += ["**Goals**:", "", "| goal | value | target | met |", "|---|---|---|---|"]
        for name, row in g.items():
            met = {True: "yes", False: "**no**", None: "-"}[row["met"]]
            lines.append(f"| {name} | {_f(row['value'], 3)} | {row['target']} | {met} |")
        lines.append("")
    lines.append(END)
    return "\n".join(lines)


#: Each front's routes as the fronts table names them: (front, route key, proxy, route).
_ROUTES = (
    ("chat", "tiergate", "Tiergate", "OpenAI model: chat completions"),
    ("chat", "litellm", "LiteLLM", "OpenAI model: chat completions"),
    ("messages", "tiergate_native", "Tiergate", "Anthropic model: native /v1/messages"),
    ("messages", "tiergate_translated", "Tiergate", "OpenAI model: translated to chat"),
    ("messages", "litellm_native", "LiteLLM", "Anthropic model: native /v1/messages"),
    ("messages", "litellm_translated", "LiteLLM", "OpenAI model: translated to chat"),
    ("responses", "tiergate_native", "Tiergate", "OpenAI model: native /v1/responses"),
    ("responses", "tiergate_translated", "Tiergate", "Anthropic model: translated to chat"),
)


def _fronts_lines(fronts: dict[str, Any] | None) -> list[str]:
    if not fronts:
        return []
    lines = [
        "**Fronts** (non-streaming; each front against the upstream called directly in its own "
        "API; medians over repeats):",
        "",
        "| front | proxy | route | direct p50 c1 | added p50 c1 | added p99 c1 | rps c64 "
        "| direct rps c64 | errors c1 / c64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for front, key, proxy, route in _ROUTES:
        c1, c64 = fronts.get(front, {}).get("c1", {}), fronts.get(front, {}).get("c64", {})
        if f"{key}_p50" not in c1 and f"{key}_rps" not in c64:
            continue
        lines.append(
            f"| {front} | {proxy} | {route} | {_f(c1.get('direct_p50'), 3)} "
            f"| {_f(c1.get(f'{key}_added_p50'), 3)} | {_f(c1.get(f'{key}_added_p99'), 3)} "
            f"| {_f(c64.get(f'{key}_rps'), 0)} | {_f(c64.get('direct_rps'), 0)} "
            f"| {c1.get(f'{key}_errors', '-')} / {c64.get(f'{key}_errors', '-')} |"
        )
    lines.append("")
    return lines


def decision_lines(results: dict[str, Any]) -> list[str]:
    """The decision table: the server's router (``decision``) and the static router timed
    beside it (``decision_static``, absent when the server's router is the static one), the
    budget (the run's ``goals``) against the static one, and a costly router's cost, also by
    prompt length."""
    default, static = results.get("decision"), results.get("decision_static")
    if not default:
        return []
    rows = [("server's router", default)] + ([("static router", static)] if static else [])
    lines = [
        "**Decision latency** (signals + scorer + policy, one core, ms; each prompt's fastest "
        "of the passes):",
        "",
        "| router | scorer | prompts | passes | p50 | p90 | p99 | max | mean "
        "| evaluate p50 / p99 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for role, d in rows:
        prompts = f"{d['sampled']} (sampled)" if d.get("sampled") else str(d["prompts"])
        kind = ", encoder" if d.get("costly") else ""
        lines.append(
            f"| {role} | `{d['scorer']}`{kind} | {prompts} | {d['passes']} | {_f(d['p50'], 4)} "
            f"| {_f(d.get('p90'), 4)} | {_f(d['p99'], 4)} | {_f(d['max'], 3)} "
            f"| {_f(d['mean'], 4)} | {_f(d.get('evaluate_p50'), 4)} / "
            f"{_f(d.get('evaluate_p99'), 4)} |"
        )
    notes = []
    goals = results.get("goals", {})
    p50, p99 = goals.get("decision_p50_ms"), goals.get("decision_p99_ms")
    if p50 and p99:
        met = "met" if p50["met"] and p99["met"] else "**not met**"
        notes.append(
            f"Budget p50 <= {p50['target']} ms, p99 <= {p99['target']} ms, applied to "
            f"`{(static or default)['scorer']}`: {met}."
        )
    gate = default.get("gate")
    if static and default.get("costly"):
        reads = "every prompt"
        if gate:
            read = gate["encoder"]["prompts"] / (
                gate["encoder"]["prompts"] + gate["table"]["prompts"]
            )
            reads = f"{read:.0%} of the prompts (those its static table is unsure of)"
        notes.append(
            f"`{default['scorer']}` reads {reads} through the encoder: p50 "
            f"{_f(default['p50'], 2)} ms, p99 {_f(default['p99'], 2)} ms, "
            f"{default['p50'] / static['p50']:.0f}x and {default['p99'] / static['p99']:.0f}x "
            "the static router's; it is not held to the budget, and the gateway decides its "
            "requests off the event loop."
        )
        if gate and gate["table"].get("p50") is not None and gate["encoder"].get("p50") is not None:
            notes.append(
                f"Decided from the table alone: {gate['table']['prompts']} prompts, p50 "
                f"{_f(gate['table']['p50'], 3)} ms, p99 {_f(gate['table']['p99'], 3)} ms; read "
                f"through the encoder: {gate['encoder']['prompts']} prompts, p50 "
                f"{_f(gate['encoder']['p50'], 2)} ms, p99 {_f(gate['encoder']['p99'], 2)} ms."
            )
    if notes:
        lines += ["", *notes]
    for role, d in rows:
        if d.get("length_bands"):
            lines += [
                "",
                f"By prompt length ({role}, `{d['scorer']}`; WordPiece tokens of the clipped "
                "prompt):",
                "",
                "| tokens | prompts | p50 | p99 |",
                "|---|---|---|---|",
            ]
            lines += [
                f"| {band} | {b['prompts']} | {_f(b.get('p50'), 3)} | {_f(b.get('p99'), 3)} |"
                for band, b in d["length_bands"].items()
            ]
    return [*lines, ""]


def _decision_cap_lines(cap: dict[str, Any] | None) -> list[str]:
    if not cap:
        return []
    lines = [
        f"**Decision at the size cap** ({cap['cap_bytes']} bytes, one core, scorer "
        f"`{cap['scorer']}`, {cap['repeats']} runs, ms):",
        "",
        "| body | bytes | fastest | median | CPU (fastest) | outcome |",
        "|---|---|---|---|---|---|",
    ]
    for name, row in cap["shapes"].items():
        # ``outcome``: the tier, "(pii)" when flagged, or the 400 a body over the window gets
        # (older results: ``tier`` and ``pii`` apart).
        outcome = row.get("outcome") or f"{row['tier']}" + (" (pii)" if row.get("pii") else "")
        lines.append(
            f"| {name} | {row['body_bytes']} | {_f(row['min_ms'], 1)} "
            f"| {_f(row['median_ms'], 1)} | {_f(row.get('cpu_min_ms'), 1)} | {outcome} |"
        )
    return [*lines, ""]


def update_readme(path: Path, results: dict[str, Any]) -> None:
    """Replace the block between the markers (append one if the file has none)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    block = render(results)
    if START in text and END in text:
        head, rest = text.split(START, 1)
        _, tail = rest.split(END, 1)
        text = head + block + tail
    else:
        text = text.rstrip("\n") + "\n\n## Latest results\n\n" + block + "\n"
    path.write_text(text)
