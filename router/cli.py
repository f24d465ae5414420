"""The ``tiergate`` command line.

Each subcommand is a small ``_cmd_<name>(args) -> int`` function registered in
:func:`build_parser`; :func:`main` parses and dispatches. Model commands:

* ``tiergate train --data F [--data ...] --out models/NAME``: fit and save a versioned artifact.
* ``tiergate score --data F --out S [--model P]``: one ``{"id", "score"}`` line per row.
* ``tiergate eval --data F [--model P] [--json] [--plot PNG] [--threshold T]``: APGR/CPT report.
* ``tiergate classify --data F --out L [--model P]``: capability, stakes and PII per row.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from router.errors import TiergateError


@contextmanager
def _output(path: str) -> Iterator[IO[str]]:
    if path == "-":
        yield sys.stdout
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        yield fh


def _load_model(path: str | None) -> Any:
    from router.training import default_model_path, load_scorer

    return load_scorer(Path(path) if path else default_model_path())


def _cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from router.training import train_artifact

    steps = ["read data", "routing classifier", "capability classifier"]
    if args.cv:
        steps.append("cross-validation")
    steps.append("save")
    with tqdm(total=len(steps), desc="tiergate train", unit="step", file=sys.stderr) as bar:

        def progress(step: str) -> None:
            bar.set_postfix_str(step)
            bar.update(1)

        out = train_artifact(args.data, args.out, cv=args.cv, progress=progress)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _cmd_score(args: argparse.Namespace) -> int:
    from router.training import load_prompts

    scorer = _load_model(args.model)
    rows = load_prompts(args.data)
    with _output(args.out) as out:
        for row_id, prompt in rows:
            score = scorer.analyze(prompt).score
            out.write(json.dumps({"id": row_id, "score": score}) + "\n")
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    from router.training import load_prompts

    scorer = _load_model(args.model)
    rows = load_prompts(args.data)
    with _output(args.out) as out:
        for row_id, prompt in rows:
            a = scorer.analyze(prompt)
            record = {
                "id": row_id,
                "capability": a.capability,
                "stakes": a.stakes,
                "pii": a.pii,
                "stakes_reason": a.stakes_reason,
                "pii_kinds": list(a.pii_kinds),
            }
            out.write(json.dumps(record) + "\n")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from router.metrics import evaluate
    from router.training import load_routing_rows

    scorer = _load_model(args.model)
    rows = load_routing_rows(args.data)
    scores = [scorer.analyze(r.prompt).score for r in rows]
    report = evaluate(
        scores,
        [r.weak_score for r in rows],
        [r.strong_score for r in rows],
        n_bootstrap=args.bootstrap,
        threshold=args.threshold,
    )
    if args.plot:
        from router.metrics import plot_report

        plot_report(report, args.plot, title=f"{Path(args.data).name} ({scorer.version})")
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(format_report(report))
    return 0


def format_report(report: Any) -> str:
    """A short human-readable rendering of a :class:`router.metrics.EvalReport`."""
    lines = [
        f"rows {report.n}   weak quality {report.weak_quality:.4f}   "
        f"strong quality {report.strong_quality:.4f}",
        "strong calls  quality   threshold",
    ]
    for p in sorted(report.curve, key=lambda p: p.strong_share):
        lines.append(f"   {p.strong_share:6.1%}   {p.quality:.4f}   {p.threshold:.4f}")

    def ci(name: str, iv: Any, pct: bool = False) -> str:
        f = "{:.1%}" if pct else "{:.3f}"
        return f"{name:<12} {f.format(iv.value)}  (95% CI {f.format(iv.low)}-{f.format(iv.high)})"

    lines += [
        ci("APGR", report.apgr),
        ci("APGR (fine)", report.apgr_fine),
        ci("CPT(50%)", report.cpt50, pct=True),
        ci("CPT(80%)", report.cpt80, pct=True),
        f"random       APGR {report.random['apgr']:.3f}  CPT(50%) {report.random['cpt50']:.1%}  "
        f"CPT(80%) {report.random['cpt80']:.1%}",
        f"oracle       APGR {report.oracle['apgr']:.3f}  CPT(50%) {report.oracle['cpt50']:.1%}  "
        f"CPT(80%) {report.oracle['cpt80']:.1%}",
    ]
    if report.threshold_point is not None:
        tp = report.threshold_point
        lines.append(
            f"threshold {report.threshold}: {tp['strong_share']:.1%} strong calls, "
            f"quality {tp['quality']:.4f}"
        )
    return "\n".join(lines)


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", help="model directory (default: $TIERGATE_CLASSIFIER_PATH or shipped)"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``tiergate`` argument parser: one sub-parser per command, each bound to ``_cmd_*``."""
    parser = argparse.ArgumentParser(prog="tiergate", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="fit and save a versioned classifier artifact")
    p.add_argument(
        "--data",
        action="append",
        required=True,
        help="JSONL routing file (id, prompt, weak_score, strong_score) or capability file "
        "(id, prompt, capability); repeatable",
    )
    p.add_argument("--out", required=True, help="new artifact directory, e.g. models/NAME")
    p.add_argument("--no-cv", dest="cv", action="store_false", help="skip cross-validation metrics")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("score", help="write {id, score} per prompt")
    p.add_argument("--data", required=True, help="JSONL with id and prompt")
    p.add_argument("--out", required=True, help="output JSONL ('-' for stdout)")
    _add_model_arg(p)
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser("eval", help="APGR / CPT of the model on a routing file")
    p.add_argument("--data", required=True, help="JSONL routing file")
    _add_model_arg(p)
    p.add_argument("--json", action="store_true", help="print the full report as JSON")
    p.add_argument("--plot", metavar="PNG", help="draw the curve to this image")
    p.add_argument("--threshold", type=float, help="policy score threshold to mark")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for CIs")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("classify", help="write {id, capability, stakes, pii} per prompt")
    p.add_argument("--data", required=True, help="JSONL with id and prompt")
    p.add_argument("--out", required=True, help="output JSONL ('-' for stdout)")
    _add_model_arg(p)
    p.set_defaults(func=_cmd_classify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tiergate`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except TiergateError as exc:
        print(f"tiergate: error: {exc.message}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    raise SystemExit(main())
