"""Does the loop learn? Replay AlpacaEval as live traffic, label it, retrain, plot the curve.

``python -m studies.learning_loop`` (``--quick`` for a shorter run). AlpacaEval (CC BY-NC) is used
only to *simulate* traffic and its labels here; no artifact trained in this run is shipped.

* The AlpacaEval rows are split once by a hash of their id into an **evaluation slice**, never
  sent, and traffic replayed in a fixed order through a running Tiergate app (real API, SQLite
  outcome store, model store and hot-swap watcher). The local tier is a stub answer (only
  routing is learnt); the closed model and the judge are :class:`SimulatedClosed` on loopback.
* Labels follow the file's scores: every local answer gets user **feedback** with quality
  ``weak_score``; the policy shadows ``--shadow-rate`` of the local answers, and the judge
  prefers the closed answer with probability ``strong_score`` (noisy, as real judges are).
* Every ``--every`` labelled outcomes the loop runs :func:`router.retrain.retrain`; a promoted
  version reaches the proxy through the model store's pointer, without a restart.
* The curve is the serving model's APGR on the evaluation slice against the number of labelled
  outcomes. The **adversarial** run inverts the feedback; the gate must refuse its candidates.

The starting model is the shipped one when present, else one fitted as ``tiergate train`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import httpx

from router.app import create_app
from router.artifact import load_fitted, save_scorer
from router.backends import Completion, ModelLike, Usage
from router.config import Settings
from router.metrics import evaluate
from router.outcomes import SQLiteOutcomeStore
from router.registry import ModelStore
from router.retrain import (
    BASE_FILES,
    GateConfig,
    NotEnoughLabelsError,
    bucket,
    compare,
    retrain,
)
from router.services import services
from router.training import (
    TFIDF_MODEL_NAME,
    RoutingRow,
    fit_scorer,
    load_capability_rows,
    load_routing_rows,
)

REPO = Path(__file__).resolve().parent.parent
ALPACA = "alpacaeval2_openhermes7b_vs_gpt4turbo.jsonl"
LOCAL_ANSWER = "A short answer from the local model."


class StubLocal:
    """A local tier that answers at once (the simulation learns routing, not generation)."""

    def unavailable_reason(self, model: ModelLike) -> str | None:
        return None

    async def complete(
        self, model: ModelLike, body: dict[str, Any], usage: Usage | None = None
    ) -> Completion:
        message = {"role": "assistant", "content": LOCAL_ANSWER}
        return Completion(
            body={
                "id": "local",
                "object": "chat.completion",
                "created": 0,
                "model": model.name,
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            },
            usage=Usage(10, 8),
        )

    async def stream(self, model: ModelLike, body: dict[str, Any], usage: Usage) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


CLOSED_ANSWER = "A longer answer from the closed model."


class SimulatedClosed:
    """The closed model and the shadow judge, on loopback, speaking OpenAI's chat wire format.

    A judge prompt (``router.learning``'s pairwise template) is answered ``[[A]]``/``[[B]]``/
    ``[[C]]`` as ``judge(question, answer_a, answer_b)`` decides; any other request gets
    :data:`CLOSED_ANSWER`. Going through HTTP keeps litellm's real path in the loop.
    """

    def __init__(self, judge: Callable[[str, str, str], str]) -> None:
        self.judge = judge
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def base_url(self) -> str:
        """What the policy's ``api_base`` points at."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def __enter__(self) -> SimulatedClosed:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def answer(self, body: dict[str, Any]) -> str:
        """The content for one chat request."""
        messages = body.get("messages") or []
        if not messages or "impartial judge" not in str(messages[0].get("content")):
            return CLOSED_ANSWER
        user = str(messages[-1].get("content"))
        question = user.split("[User Question]\n", 1)[1].split("\n\n[The Start of", 1)[0]
        a = user.split("[The Start of Assistant A's Answer]\n", 1)[1].split("\n[The End of", 1)[0]
        b = user.split("[The Start of Assistant B's Answer]\n", 1)[1].split("\n[The End of", 1)[0]
        return f"[[{self.judge(question, a, b)}]]"

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        provider = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))
                message = {"role": "assistant", "content": provider.answer(body)}
                data = json.dumps(
                    {
                        "id": "closed",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body.get("model", "closed"),
                        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
                    }
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        return Handler


def policy_text(fake: SimulatedClosed, shadow_rate: float) -> str:
    """Everything local (threshold 1.0), ``shadow_rate`` of it shadowed, prompts stored."""
    return f"""\
version: 1
models:
  local: {{tier: local, context_window: 8192}}
  gpt-4o: {{tier: closed, litellm_model: openai/gpt-4o, api_base: "{fake.base_url}"}}
local_model: local
closed_models: [gpt-4o]
threshold: 1.0
store_prompts: full
retention_days: 30
shadow: {{sample_rate: {shadow_rate}}}
aliases:
  auto: {{threshold: 1.0}}
"""


def first_model(data: Path, store: ModelStore) -> str:
    """The shipped model if there is one, else one fitted like ``tiergate train`` does."""
    shipped = REPO / "models" / TFIDF_MODEL_NAME
    if (shipped / "metadata.json").exists():
        return store.adopt(shipped)
    routing = [r for name in BASE_FILES for r in load_routing_rows(data / name)]
    caps = load_capability_rows(data / "capabilities.jsonl", commercial_only=True)
    scorer = fit_scorer(routing, caps, version="v0001")
    save_scorer(scorer, store.versions_dir / "v0001", metadata={"note": "bench starting model"})
    store.promote("v0001", reason="bench starting model")
    return "v0001"


def heldout_apgr(scorer: Any, rows: list[RoutingRow], n_bootstrap: int) -> dict[str, float]:
    """APGR of ``scorer`` (the one the proxy serves) on the evaluation slice, true file scores,
    with its 95% CI."""
    scores = [scorer.score(r.prompt) for r in rows]
    report = evaluate(
        scores,
        [r.weak_score for r in rows],
        [r.strong_score for r in rows],
        n_bootstrap=n_bootstrap,
    )
    return {"apgr": report.apgr.value, "low": report.apgr.low, "high": report.apgr.high}


async def _settle(app: Any) -> None:
    learning = services(app).learning
    while learning.pending:
        await asyncio.sleep(0.05)
    await asyncio.to_thread(services(app).gateway.outcomes.flush, 30)


async def replay(
    *,
    mode: str,
    traffic: list[RoutingRow],
    evaluation: list[RoutingRow],
    data: Path,
    workdir: Path,
    seed_store: Path,
    every: int,
    max_labels: int,
    gate: GateConfig,
    n_bootstrap: int,
    shadow_rate: float,
) -> dict[str, Any]:
    """One replay (``honest`` or ``adversarial`` feedback); returns its curve."""
    models = ModelStore(workdir / mode / "models")
    shutil.copytree(seed_store, models.root)
    outcomes = SQLiteOutcomeStore(workdir / mode / "outcomes.db")
    by_prompt = {r.prompt: r for r in traffic}
    rng = random.Random(f"judge:{mode}")

    def judge(question: str, a: str, b: str) -> str:
        row = by_prompt[question]
        closed_wins = rng.random() < row.strong_score
        closed_pos = "A" if a != LOCAL_ANSWER else "B"
        return closed_pos if closed_wins else ("B" if closed_pos == "A" else "A")

    base = [data / name for name in BASE_FILES]
    points: list[dict[str, Any]] = []
    retrains: list[dict[str, Any]] = []
    with SimulatedClosed(judge) as fake:
        policy = workdir / mode / "policy.yaml"
        policy.write_text(policy_text(fake, shadow_rate))
        settings = Settings(
            policy=policy,
            sqlite_path=workdir / mode / "unused.db",
            local_backend="none",
            model_store=models.root,
            model_watch_s=0.1,
            calibrate_every_s=0,
            policy_reload_s=0,
            purge_every_s=0,
        )
        _, first = models.load_current(load_fitted)
        app = create_app(
            settings,
            scorer=first,
            outcomes=outcomes,
            local_backend=StubLocal(),
            environ={"OPENAI_API_KEY": "sk-sim"},
        )
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://tiergate"
            ) as client,
        ):
            gateway = services(app).gateway

            def point(labelled: int) -> None:
                scored = heldout_apgr(gateway.scorer, evaluation, n_bootstrap)
                points.append({"labelled": labelled, "version": gateway.scorer.version, **scored})
                print(
                    f"  [{mode}] {labelled:4d} labelled  serving {gateway.scorer.version}  "
                    f"held-out APGR {scored['apgr']:.3f} "
                    f"[{scored['low']:.3f}, {scored['high']:.3f}]",
                    flush=True,
                )

            point(0)
            labelled = 0
            for row in traffic:
                if labelled >= max_labels:
                    break
                resp = await client.post(
                    "/v1/chat/completions",
                    json={"model": "auto", "messages": [{"role": "user", "content": row.prompt}]},
                )
                resp.raise_for_status()
                while services(app).learning.pending >= 8:  # traffic paced so no shadow is skipped
                    await asyncio.sleep(0.01)
                if resp.headers["x-tiergate-tier"] != "local":
                    continue
                quality = row.weak_score if mode == "honest" else 1.0 - row.weak_score
                fb = await client.post(
                    "/v1/feedback",
                    json={"request_id": resp.headers["x-request-id"], "score": quality},
                )
                fb.raise_for_status()
                labelled += 1
                if labelled % every == 0 or labelled == min(max_labels, len(traffic)):
                    await _settle(app)
                    try:
                        report = await asyncio.to_thread(retrain, outcomes, models, base, gate)
                    except NotEnoughLabelsError as exc:
                        print(f"  [{mode}] retrain skipped: {exc.message}", flush=True)
                        retrains.append({"labelled": labelled, "skipped": exc.message})
                        continue
                    candidate = load_fitted(models.path(report.version))
                    retrains.append(
                        {
                            "labelled": labelled,
                            **report.to_dict(),
                            "candidate_true_heldout": heldout_apgr(
                                candidate, evaluation, n_bootstrap
                            ),
                        }
                    )
                    print(
                        f"  [{mode}] retrain -> {report.version}: {report.decision} "
                        f"({'; '.join(report.reasons)})",
                        flush=True,
                    )
                    deadline = time.monotonic() + 10
                    while (
                        report.promoted
                        and gateway.scorer.version != report.version
                        and time.monotonic() < deadline
                    ):
                        await asyncio.sleep(0.05)
                    point(labelled)
            learning = services(app).learning
            paired = compare(
                "evaluation slice, serving now vs start",
                evaluation,
                first,
                gateway.scorer,
                n_bootstrap=n_bootstrap,
            )
            stats = {
                "shadow_skipped": learning.shadow_skipped,
                "shadow_labelled": learning.shadow_labelled,
                "shadow_failed": learning.shadow_failed,
                "labels_in_store": len(outcomes.labels()),
            }
    return {
        "mode": mode,
        "points": points,
        "retrains": retrains,
        "stats": stats,
        "improvement": {
            "diff": paired.diff,
            "low": paired.diff_low,
            "high": paired.diff_high,
            "n": paired.n,
        },
    }


def plot(result: dict[str, Any], path: Path) -> None:
    """The learning curves (serving model's held-out APGR with its CI) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colours = {"honest": "tab:blue", "adversarial": "tab:red"}
    for run in result["runs"]:
        xs = [p["labelled"] for p in run["points"]]
        ys = [p["apgr"] for p in run["points"]]
        colour = colours[run["mode"]]
        ax.plot(xs, ys, marker="o", color=colour, label=f"{run['mode']} labels: serving model")
        ax.fill_between(
            xs,
            [p["low"] for p in run["points"]],
            [p["high"] for p in run["points"]],
            color=colour,
            alpha=0.12,
        )
        for r in run["retrains"]:
            if "skipped" in r:
                continue
            promoted = r["promoted"]
            ax.scatter(
                [r["labelled"]],
                [r["candidate_true_heldout"]["apgr"]],
                marker="^" if promoted else "x",
                color=colour,
                s=60,
                zorder=3,
            )
    ax.axhline(0.5, color="grey", linestyle=":", label="random router")
    ax.set_xlabel("labelled outcomes")
    ax.set_ylabel("APGR on the held-out AlpacaEval slice")
    ax.set_title("Learning loop: ^ candidate promoted, x candidate refused by the gate")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run the honest and adversarial replays; write JSON and PNG."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=REPO / "studies" / "results")
    parser.add_argument("--every", type=int, default=100, help="retrain every N labels")
    parser.add_argument("--max-labels", type=int, default=500)
    parser.add_argument("--bootstrap", type=int, default=500)
    parser.add_argument(
        "--base-cap", type=int, default=0, help="base rows per file in retrains (0 = all)"
    )
    parser.add_argument("--shadow-rate", type=float, default=1.0, help="policy shadow rate")
    parser.add_argument("--modes", default="honest,adversarial")
    parser.add_argument(
        "--candidate", default="residual", choices=["residual", "refit"], help="candidate design"
    )
    parser.add_argument("--min-gain", type=float, default=0.0, help="the gate's --min-gain")
    parser.add_argument(
        "--require-significant",
        action="store_true",
        help="the gate's --require-significant (the held-out gain's whole CI above --min-gain)",
    )
    parser.add_argument("--quick", action="store_true", help="200 labels, retrain every 100")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_labels, args.every, args.bootstrap = 200, 100, 200
    rows = load_routing_rows(args.data / ALPACA)
    evaluation = [r for r in rows if bucket(r.id, "sim-eval") < 0.25]
    traffic = sorted(
        (r for r in rows if bucket(r.id, "sim-eval") >= 0.25),
        key=lambda r: bucket(r.id, "sim-order"),
    )
    gate = GateConfig(
        n_bootstrap=args.bootstrap,
        base_train_cap=args.base_cap or None,
        candidate=args.candidate,
        min_gain=args.min_gain,
        require_significant=args.require_significant,
    )
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tiergate-loop-") as tmp:
        workdir = Path(tmp)
        seed_store = ModelStore(workdir / "seed")
        print(f"starting model: {first_model(args.data, seed_store)}", flush=True)
        runs = [
            asyncio.run(
                replay(
                    mode=mode,
                    traffic=traffic,
                    evaluation=evaluation,
                    data=args.data,
                    workdir=workdir,
                    seed_store=seed_store.root,
                    every=args.every,
                    max_labels=args.max_labels,
                    gate=gate,
                    n_bootstrap=args.bootstrap,
                    shadow_rate=args.shadow_rate,
                )
            )
            for mode in args.modes.split(",")
        ]
    result = {
        "data": ALPACA,
        "evaluation_rows": len(evaluation),
        "traffic_rows": len(traffic),
        "gate": gate.__dict__,
        "shadow_rate": args.shadow_rate,
        "seconds": round(time.monotonic() - started, 1),
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learning_curve.json").write_text(json.dumps(result, indent=2, default=str))
    plot(result, args.out / "learning_curve.png")
    for run in runs:
        first, last, gain = run["points"][0], run["points"][-1], run["improvement"]
        print(
            f"{run['mode']}: held-out APGR {first['apgr']:.3f} -> {last['apgr']:.3f} "
            f"({gain['diff']:+.3f}, paired 95% CI [{gain['low']:+.3f}, {gain['high']:+.3f}]) "
            f"after {last['labelled']} labelled outcomes; "
            f"promoted {sum(r.get('promoted', False) for r in run['retrains'])}/"
            f"{len(run['retrains'])}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
