"""Decision latency on a body at the size cap: what one maximal request costs before routing.

Every string of a chat request is read for personal data (``router.signals.request_strings``),
so the decision's cost grows with the body. This times what ``Gateway.decide`` runs
(``extract_signals`` with the server's scorer, then ``evaluate`` with ``policies/default.yaml``)
on bodies of several shapes, each as close under ``TIERGATE_MAX_BODY_BYTES`` (8 MiB by
default) as its unit allows, pinned to one core. Each shape is timed ``--repeats`` times after
one warm-up call; the fastest and the median wall-clock times are reported, and the fastest CPU
time of the deciding thread (on a loaded, shared machine the wall clock also holds other
processes' turns). Goal: well under 100 ms.

Shapes: ``prose`` (the shared data's prompts, one user message), ``conversation`` (the same
text in 1,000 messages, the message cap), ``tool_heavy`` (400 tools whose descriptions and JSON
schemas carry the text, one short question), ``numbers_123`` (``"123."`` repeated: the red-team
body that took 14 s at 400 KB), ``digits_near_miss`` (``"12.1. "``-style digit groups that
no detector accepts: the adversarial worst case for the digit detectors), ``cjk`` (Chinese
prose with numbers: the non-ASCII path).

Run: ``python -m bench.decision_cap [--repeats N] [--json] [--out FILE]`` (also a phase of
``python -m bench``: ``--only decision_cap``).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
GOAL_MS = 100.0


def _size(body: dict[str, Any]) -> int:
    return len(json.dumps(body, ensure_ascii=False).encode())


def _fill(make: Callable[[int], dict[str, Any]], cap: int) -> dict[str, Any]:
    """The largest ``make(n)`` whose JSON fits in ``cap`` bytes (n found by bisection)."""
    lo, hi = 1, 1
    while _size(make(hi)) <= cap:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if _size(make(mid)) <= cap else (lo, mid)
    return make(lo)


def _prose(data: Path) -> str:
    texts: list[str] = []
    total = 0
    for path in sorted(data.glob("*.jsonl")):
        with path.open(encoding="utf-8") as fh:
            for line in fh:
                prompt = json.loads(line).get("prompt")
                if isinstance(prompt, str):
                    texts.append(prompt)
                    total += len(prompt)
        if total > 9_000_000:
            break
    return "\n\n".join(texts)


def _chat(text: str) -> dict[str, Any]:
    return {"model": "auto", "messages": [{"role": "user", "content": text}]}


def shapes(cap: int, data: Path, window_chars: int) -> dict[str, dict[str, Any]]:
    """Each benchmark body, as large as fits under ``cap`` bytes; and the largest text any
    model's window can take (``window_chars``), and an inline image at the cap."""
    prose = _prose(data)
    per_message = len(prose) // 1000

    def conversation(n: int) -> dict[str, Any]:
        size = min(n, per_message)
        roles = ("user", "assistant")
        messages = [
            {"role": roles[i % 2], "content": prose[i * size : (i + 1) * size]} for i in range(999)
        ]
        return {"model": "auto", "messages": [*messages, {"role": "user", "content": "Go on."}]}

    def tools(n: int) -> dict[str, Any]:
        size = min(n, len(prose) // 800)
        return {
            "model": "auto",
            "messages": [{"role": "user", "content": "Which tool fits?"}],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": f"tool_{i}",
                        "description": prose[2 * i * size : (2 * i + 1) * size],
                        "parameters": {
                            "type": "object",
                            "properties": {
                                "q": {"description": prose[(2 * i + 1) * size : (2 * i + 2) * size]}
                            },
                        },
                    },
                }
                for i in range(400)
            ],
        }

    cjk_unit = "我们在2023年10月15日讨论了第12章和第3.4节的内容\uff0c价格是12.50元。"
    return {
        "prose": _fill(lambda n: _chat(prose[:n]), cap),
        "conversation": _fill(conversation, cap),
        "tool_heavy": _fill(tools, cap),
        "numbers_123": _fill(lambda n: _chat("123." * n), cap),
        "digits_near_miss": _fill(lambda n: _chat("12.1. 3.45 6-7 " * n), cap),
        "cjk": _fill(lambda n: _chat(cjk_unit * n), cap),
        "prose_at_window": _chat((prose * (1 + window_chars // len(prose)))[: window_chars - 100]),
        "image_at_cap": _fill(lambda n: _chat(_image("QUJD" * (n // 4))), cap),
    }


def _image(payload: str) -> list[dict[str, Any]]:
    url = "data:image/png;base64," + payload
    return [{"type": "text", "text": "What is in this picture?"}, _image_part(url)]


def _image_part(url: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": url}}


def run(repeats: int = 5, data: Path = DATA) -> dict[str, Any]:
    """Time the decision on each shape; ms figures."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    from router.app import configured_scorer
    from router.config import Settings
    from router.errors import BadRequestError
    from router.gateway import (
        MAX_CHARS_PER_TOKEN,
        load_serving_policy,
        refuse_beyond_every_window,
    )
    from router.policy import evaluate
    from router.signals import extract_signals

    settings = Settings(local_backend="none")
    scorer = configured_scorer(settings)
    policy = load_serving_policy(ROOT / "policies" / "default.yaml")
    cap = settings.max_body_bytes
    windows = [m.context_window or 0 for m in policy.models.values()]
    window_chars = max(windows) * MAX_CHARS_PER_TOKEN
    loadavg_start = [round(x, 2) for x in os.getloadavg()]
    rows: dict[str, Any] = {}
    for name, shape in shapes(cap, data, window_chars).items():
        text = json.dumps(shape, ensure_ascii=False)
        times: list[float] = []
        cpu: list[float] = []
        outcome = ""
        for i in range(repeats + 1):
            body = json.loads(text)  # fresh strings, as each request has
            start, start_cpu = time.perf_counter(), time.thread_time()
            try:  # what Gateway.decide runs
                refuse_beyond_every_window(body, policy)
                signals = extract_signals(body, scorer, metadata_keys=policy.metadata_fields)
                decision = evaluate(policy, signals, thresholds={}, spend_today_usd=0.0)
                outcome = f"{decision.tier}" + (" (pii)" if signals.pii else "")
            except BadRequestError as exc:
                outcome = f"400 {exc.code}"
            if i:  # the first call warms up
                times.append((time.perf_counter() - start) * 1000.0)
                cpu.append((time.thread_time() - start_cpu) * 1000.0)
        rows[name] = {
            "body_bytes": len(text.encode()),
            "min_ms": round(min(times), 1),
            "median_ms": round(statistics.median(times), 1),
            "max_ms": round(max(times), 1),
            # CPU time of the deciding thread: what the work costs, less what a shared
            # machine's other load adds to the wall clock.
            "cpu_min_ms": round(min(cpu), 1),
            "outcome": outcome,
            "goal_met": min(times) < GOAL_MS,
        }
        print(f"  {name}: {rows[name]}", flush=True)
    return {
        "cap_bytes": cap,
        "window_chars": window_chars,
        "repeats": repeats,
        "goal_ms": GOAL_MS,
        "scorer": f"{scorer.name} {scorer.version}",
        "shapes": rows,
        "loadavg_start": loadavg_start,
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
    }


def main() -> None:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--out", type=Path, help="also write the result here (JSON)")
    args = parser.parse_args()
    result = run(args.repeats, args.data)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result) if args.json else json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
