"""The model commands of the ``tiergate`` CLI: train, score, eval, classify."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.cli import build_parser, main

HARD = "Prove that {} is irrational, step by step, and derive the bound."
EASY = "hi, what is {}?"


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    rows: list[dict[str, object]] = []
    for i in range(20):
        hard = i % 2 == 0
        rows.append(
            {
                "id": f"r{i}",
                "prompt": (HARD if hard else EASY).format(f"x{i}"),
                "weak_score": 0.0 if hard else 1.0,
                "strong_score": 1.0,
            }
        )
    routing = write_jsonl(tmp / "routing.jsonl", rows)
    # The score reads the capability (router-v4): the toy capability model tells the hard
    # proofs (maths, where the weak model always fails) from the easy chat.
    caps = write_jsonl(
        tmp / "caps.jsonl",
        [{"id": f"c{i}", "prompt": EASY.format(f"c{i}"), "capability": "chat"} for i in range(4)]
        + [{"id": f"m{i}", "prompt": HARD.format(f"m{i}"), "capability": "math"} for i in range(4)],
    )
    out = tmp / "models" / "test-v1"
    assert main(["train", "--data", str(routing), "--data", str(caps), "--out", str(out)]) == 0
    return out


@pytest.fixture
def data(tmp_path: Path) -> Path:
    rows = [
        {"id": "a", "prompt": HARD.format("pi"), "weak_score": 0.0, "strong_score": 1.0},
        {"id": "b", "prompt": EASY.format("up"), "weak_score": 1.0, "strong_score": 1.0},
        {
            "id": "c",
            "prompt": "Email bob@example.com about my tax return",
            "weak_score": 1.0,
            "strong_score": 0.0,
        },
        {"id": "d", "prompt": HARD.format("e"), "weak_score": 0.0, "strong_score": 1.0},
    ]
    return write_jsonl(tmp_path / "data.jsonl", rows)


def test_parser_has_the_model_commands() -> None:
    parser = build_parser()
    for cmd in ("train", "score", "eval", "classify"):
        assert (
            parser.parse_args(
                [cmd, "--data", "x", "--out", "y"] if cmd != "eval" else [cmd, "--data", "x"]
            ).command
            == cmd
        )


def test_score_writes_one_line_per_row(model_dir: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.jsonl"
    assert main(["score", "--data", str(data), "--out", str(out), "--model", str(model_dir)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["id"] for x in lines] == ["a", "b", "c", "d"]
    assert set(lines[0]) == {"id", "score"}
    assert lines[0]["score"] > lines[1]["score"]


def test_classify_writes_labels(model_dir: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "labels.jsonl"
    assert (
        main(["classify", "--data", str(data), "--out", str(out), "--model", str(model_dir)]) == 0
    )
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 4
    assert {"id", "capability", "stakes", "pii"} <= set(lines[2])
    assert lines[2]["pii"] is True and lines[2]["stakes"] == "high"
    assert lines[1]["pii"] is False


def test_eval_json_and_plot(
    model_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    png = tmp_path / "curve.png"
    args = ["eval", "--data", str(data), "--model", str(model_dir), "--json", "--plot", str(png)]
    assert main([*args, "--threshold", "0.5", "--bootstrap", "50"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert len(report["curve"]) == 11
    assert report["apgr"]["low"] <= report["apgr"]["value"] <= report["apgr"]["high"]
    assert report["threshold_point"] is not None
    assert png.stat().st_size > 1000
    assert main(["eval", "--data", str(data), "--model", str(model_dir), "--bootstrap", "20"]) == 0
    assert "CPT(50%)" in capsys.readouterr().out


# The random reference's mean of draws that are all NaN warns (metrics.random_reference);
# the command goes on and writes its report, which is what this reads.
@pytest.mark.filterwarnings("ignore:Mean of empty slice:RuntimeWarning")
def test_eval_json_writes_what_it_cannot_tell_as_null(
    model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Weak and strong of equal quality leave APGR without a value (0/0): it was written as
    # NaN, which is not JSON (jq, a browser, a strict parser refuse the whole report).
    rows = [
        {"id": str(i), "prompt": (HARD if i % 2 else EASY).format(i), "weak_score": 1.0}
        for i in range(6)
    ]
    data = write_jsonl(tmp_path / "even.jsonl", [{**r, "strong_score": 1.0} for r in rows])
    args = ["eval", "--data", str(data), "--model", str(model_dir), "--json", "--bootstrap", "20"]
    assert main(args) == 0

    def refuse(constant: str) -> object:
        raise ValueError(f"{constant} is not JSON")

    report = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert report["apgr"] == {"value": None, "low": None, "high": None}
    assert len(report["curve"]) == 11 and report["n"] == 6


def test_serving_form_command_adds_the_form_to_an_older_artifact(
    model_dir: Path, data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = tmp_path / "old"
    old.mkdir()
    (old / "model.joblib").write_bytes((model_dir / "model.joblib").read_bytes())
    meta = json.loads((model_dir / "metadata.json").read_text())
    written = meta.pop("serving")
    (old / "metadata.json").write_text(json.dumps(meta))
    assert main(["serving-form", "--model", str(old)]) == 0
    assert written["sha256"] in capsys.readouterr().err
    assert json.loads((old / "metadata.json").read_text())["serving"] == written
    out_old, out_new = tmp_path / "old.jsonl", tmp_path / "new.jsonl"
    assert main(["classify", "--data", str(data), "--out", str(out_old), "--model", str(old)]) == 0
    args = ["classify", "--data", str(data), "--out", str(out_new), "--model", str(model_dir)]
    assert main(args) == 0
    assert out_old.read_text() == out_new.read_text()


def test_errors_are_reported_not_raised(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope"
    assert main(["score", "--data", "x.jsonl", "--out", "-", "--model", str(missing)]) == 2
    assert "not a Tiergate model" in capsys.readouterr().err


def test_score_uses_the_shipped_model_by_default(data: Path, tmp_path: Path) -> None:
    from router.artifact import default_model_path

    if not (default_model_path() / "metadata.json").is_file():
        pytest.skip("no shipped model in this checkout")
    out = tmp_path / "s.jsonl"
    assert main(["score", "--data", str(data), "--out", str(out)]) == 0
    scores = [json.loads(x)["score"] for x in out.read_text().splitlines()]
    assert len(scores) == 4 and all(0.0 <= s <= 1.0 for s in scores)


def test_score_defaults_to_the_model_serve_decides_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a model store, serve (and `policy explain`) score with its current version; score,
    classify and eval scored with the shipped router instead, so their numbers were not the
    proxy's after a promotion."""
    from router.artifact import STATIC_MODEL_NAME, default_model_path

    data = write_jsonl(
        tmp_path / "m.jsonl", [{"id": "m", "prompt": "Solve for x: 3x^2 - 5x + 2 = 0."}]
    )

    def score(*extra: str) -> float:
        assert main(["score", "--data", str(data), "--out", "-", *extra]) == 0
        return float(json.loads(capsys.readouterr().out)["score"])

    static = default_model_path().parent / STATIC_MODEL_NAME
    shipped = score()
    assert score("--model", str(static)) != shipped
    store = tmp_path / "store"
    assert main(["models", "adopt", str(static), "--store", str(store)]) == 0
    capsys.readouterr()
    monkeypatch.setenv("TIERGATE_MODEL_STORE", str(store))
    assert score() == score("--model", str(static))


def test_score_given_a_model_and_a_profile_reads_no_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Reading the serve settings for a default the command was given broke an offline score
    # on a machine whose TIERGATE_* variables are meant for serve (and are wrong here).
    from router.artifact import STATIC_MODEL_NAME, default_model_path
    from router.profile import default_profile_path

    data = write_jsonl(tmp_path / "m.jsonl", [{"id": "m", "prompt": "Hello"}])
    monkeypatch.setenv("TIERGATE_PORT", "not-a-port")
    static = default_model_path().parent / STATIC_MODEL_NAME
    given = ["--model", str(static), "--profile", str(default_profile_path())]
    assert main(["score", "--data", str(data), "--out", "-", *given]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == "m"


def test_score_reads_the_local_profile(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tiergate score` reads the local profile: --profile, else TIERGATE_LOCAL_PROFILE, else
    the bundled model's. A maths prompt scores lower for Llama-3.1-8B than for SmolLM2-135M."""
    from router.profile import profile_dir

    data = write_jsonl(
        tmp_path / "m.jsonl", [{"id": "m", "prompt": "Solve for x: 3x^2 - 5x + 2 = 0."}]
    )
    llama = profile_dir() / "Llama-3.1-8B-Instruct.yaml"

    def score(*extra: str) -> float:
        assert main(["score", "--data", str(data), "--out", "-", *extra]) == 0
        return float(json.loads(capsys.readouterr().out)["score"])

    bundled = score()
    assert score("--profile", str(llama)) < bundled - 0.2
    monkeypatch.setenv("TIERGATE_LOCAL_PROFILE", str(llama))
    assert score() == score("--profile", str(llama))
    monkeypatch.setenv("TIERGATE_LOCAL_PROFILE", str(tmp_path / "missing.yaml"))
    assert main(["score", "--data", str(data), "--out", "-"]) == 2
    assert "cannot read the local model profile" in capsys.readouterr().err


def test_policy_explain_shows_the_profile_entry(capsys: pytest.CaptureFixture[str]) -> None:
    from router.profile import default_profile, profile_dir

    policy = str(profile_dir().parent.parent / "policies" / "default.yaml")
    assert main(["policy", "explain", policy, "--prompt", "Hello"]) == 0
    out = capsys.readouterr().out
    assert "decision local -> local (rule 'small-talk'" in out
    bundled = default_profile()
    chat = bundled.accuracy("chat")
    assert f"profile  {bundled.model}: chat accuracy {chat:.2f}; read by small-talk" in out


def test_an_empty_profile_setting_means_the_bundled_profile(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # TIERGATE_LOCAL_PROFILE= (as a template leaves an unset value) read the current folder.
    from router.profile import default_profile, profile_dir

    monkeypatch.setenv("TIERGATE_LOCAL_PROFILE", "")
    policy = str(profile_dir().parent.parent / "policies" / "default.yaml")
    assert main(["policy", "explain", policy, "--prompt", "Hello"]) == 0
    assert f"profile  {default_profile().model}:" in capsys.readouterr().out


def test_serving_form_on_the_shipped_router_only_checks_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Its help says the default is the shipped model and that one with a form is only checked:
    the shipped router is a profile head with no model.joblib, and that is not an error."""
    from router.artifact import SERVING_FILE, default_model_path, read_sidecar

    shipped = default_model_path()
    assert not (shipped / "model.joblib").exists()
    stamp = (shipped / SERVING_FILE).stat().st_mtime_ns
    assert main(["serving-form"]) == 0
    assert read_sidecar(shipped)["serving"]["sha256"] in capsys.readouterr().err
    assert (shipped / SERVING_FILE).stat().st_mtime_ns == stamp


@pytest.mark.parametrize("command", ["eval", "retrain"])
def test_bootstrap_below_one_is_a_usage_error(command: str) -> None:
    # eval printed NaN intervals (0) or a numpy traceback (negative); retrain promoted on NaN.
    with pytest.raises(SystemExit) as exc:
        main([command, "--bootstrap", "0", *(["--data", "x.jsonl"] if command == "eval" else [])])
    assert exc.value.code == 2


def test_an_out_that_cannot_be_written_is_one_line_not_a_traceback(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    for out in (tmp_path, blocker / "sub" / "s.jsonl"):  # a folder; a path under a file
        for cmd in ("score", "classify"):
            assert main([cmd, "--data", str(data), "--out", str(out)]) == 2
            assert f"--out {out}: cannot write it" in capsys.readouterr().err


def test_a_run_that_fails_midway_leaves_the_previous_out_untouched(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import router.cli

    class FailsOnTheThirdPrompt:
        def __init__(self) -> None:
            self.calls = 0

        def analyze(self, prompt: str) -> object:
            self.calls += 1
            if self.calls == 3:
                raise KeyboardInterrupt  # Ctrl-C, or any failure, after two rows were written
            return type("A", (), {"score": 0.5})()

    monkeypatch.setattr(router.cli, "_load_model", lambda *_: FailsOnTheThirdPrompt())
    out = tmp_path / "scores.jsonl"
    out.write_text("the previous run's scores\n")
    with pytest.raises(KeyboardInterrupt):
        main(["score", "--data", str(data), "--out", str(out)])
    assert out.read_text() == "the previous run's scores\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.jsonl", "scores.jsonl"]


def test_out_that_is_the_data_file_is_refused_and_the_prompts_stay(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = data.read_text()
    monkeypatch.chdir(tmp_path)
    for cmd in ("score", "classify"):
        for out in (str(data), "./data.jsonl"):  # the same path, or the same file by another
            assert main([cmd, "--data", str(data), "--out", out]) == 2
            assert "is the --data file" in capsys.readouterr().err
            assert data.read_text() == before


def test_score_and_classify_give_back_each_id_as_the_file_has_it(
    model_dir: Path, tmp_path: Path
) -> None:
    # A benchmark keyed by integers joins its scores back by `labels[row["id"]]`: a "1" for 1
    # finds nothing.
    rows = [{"id": 1, "prompt": EASY.format("up")}, {"id": "q-2", "prompt": HARD.format("e")}]
    data = write_jsonl(tmp_path / "ints.jsonl", rows)
    for cmd in ("score", "classify"):
        out = tmp_path / f"{cmd}.jsonl"
        assert main([cmd, "--data", str(data), "--out", str(out), "--model", str(model_dir)]) == 0
        assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [1, "q-2"]
    dup = write_jsonl(tmp_path / "dup.jsonl", [*rows, {"id": "1", "prompt": "again"}])
    assert main(["score", "--data", str(dup), "--out", "-", "--model", str(model_dir)]) == 2


def test_score_classify_and_eval_show_their_progress_on_stderr(
    model_dir: Path, data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 2,000 prompts take a minute or more on one core: the user sees that it runs, and how far.
    for cmd in ("score", "classify", "eval"):
        args = [cmd, "--data", str(data), "--model", str(model_dir)]
        assert main([*args, "--bootstrap", "10"] if cmd == "eval" else [*args, "--out", "-"]) == 0
        printed = capsys.readouterr()
        assert f"tiergate {cmd}: 100%" in printed.err and "4/4" in printed.err
        assert "tiergate" not in printed.out  # stdout keeps only the rows or the report


def test_score_classify_and_eval_help_say_what_they_read_write_and_default_to(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from router.artifact import DEFAULT_MODEL_NAME, STATIC_MODEL_NAME
    from router.pii import PII_KINDS
    from router.profile import default_profile
    from router.scoring import CAPABILITIES

    def help_of(cmd: str) -> str:
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        return " ".join(capsys.readouterr().out.split())

    assert "SmolLM2-135M" in default_profile().model and default_profile().source == "measured"
    for cmd in ("score", "classify", "eval"):
        text = help_of(cmd)
        assert f"the shipped {DEFAULT_MODEL_NAME}; {STATIC_MODEL_NAME}, with a warning" in text
        assert "else the bundled SmolLM2-135M's measured profile" in text
    for cmd in ("score", "eval"):
        assert "materially better than the local model's | prompt, local profile), in [0, 1]" in (
            help_of(cmd)
        )
    assert "`id` (a string or an integer, unique) and `prompt`; other fields" in help_of("score")
    assert "weak_score and strong_score" in help_of("eval")
    classify = help_of("classify")
    assert all(name in classify for name in (*CAPABILITIES, *PII_KINDS))
    assert "the labels do not depend on it" in classify
