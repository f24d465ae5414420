"""The ``tiergate`` command line: policy check/explain/schema, outcomes, --help."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.cli import main
from router.outcomes import OutcomeRecord, SQLiteOutcomeStore

REPO = Path(__file__).resolve().parent.parent


def test_policy_check_accepts_every_shipped_policy(capsys: pytest.CaptureFixture[str]) -> None:
    files = [
        REPO / "policies" / "default.yaml",
        *sorted((REPO / "policies/examples").glob("*.yaml")),
    ]
    assert main(["policy", "check", *map(str, files)]) == 0
    out = capsys.readouterr().out
    assert out.count(": ok (version ") == len(files)


def test_policy_check_reports_located_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\nmodels:\n  local: {tier: local}\nrules:\n"
        "  - name: r\n    when: {capability: {equals: coding}}\n    route: local\n"
    )
    assert main(["policy", "check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert f"{bad}:6:" in err and "equals" in err


def test_policy_schema_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "version" in schema["properties"] and "rules" in schema["properties"]


def test_policy_explain_shows_rules_and_decision(capsys: pytest.CaptureFixture[str]) -> None:
    policy = str(REPO / "policies" / "default.yaml")
    assert (
        main(["policy", "explain", policy, "--prompt", "my email is ann@example.com", "--json"])
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert report["signals"]["pii"] is True
    assert report["decision"]["rule"] == "pii-stays-local"
    assert report["decision"]["local_only"] is True
    assert report["decision"]["trace"][0]["matched"] is True

    assert (
        main(
            ["policy", "explain", policy, "--prompt", "hello", "--header", "x-tiergate-stakes=high"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "MATCH high-stakes" in out
    assert "decision closed -> gpt-4o" in out

    # explain sees only the headers the proxy would pass the policy
    assert (
        main(["policy", "explain", policy, "--prompt", "hi", "--header", "X-Team=legal", "--json"])
        == 0
    )
    captured = capsys.readouterr()
    assert json.loads(captured.out)["signals"]["headers"] == {}
    assert "--header X-Team ignored" in captured.err


def test_outcomes_command_prints_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "o.db"
    store = SQLiteOutcomeStore(db)
    store.start()
    for i in range(3):
        store.submit(
            OutcomeRecord(
                id=f"req_{i}",
                ts=1_700_000_000 + i,
                tenant="acme",
                alias="auto",
                tier="local",
                model="local",
                rule="default",
                score=0.2,
                threshold=0.5,
                policy_version="p",
                model_version="m",
                status="ok",
                http_status=200,
                stream=False,
                latency_ms=12.5,
                prompt_tokens=10,
                completion_tokens=5,
            )
        )
    store.close()
    assert main(["outcomes", "--db", str(db), "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "req_2" in out and "req_1" in out and "req_0" not in out
    assert "2 shown of 3 records" in out
    assert main(["outcomes", "--db", str(db), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["id"] for r in rows] == ["req_2", "req_1", "req_0"]
    assert main(["outcomes", "--db", str(tmp_path / "missing.db")]) == 1


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("serve", "fetch-model", "outcomes", "policy"):
        assert command in out


def test_serve_help_lists_every_setting_with_its_default(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from router.config import Settings

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in Settings.model_fields:
        assert f"TIERGATE_{name.upper()} (default: " in out, name
    assert "TIERGATE_PORT (default: 8000)" in out
    assert "TIERGATE_ALLOW_ANONYMOUS (default: false)" in out
    for endpoint in ("/v1/route", "/v1/feedback", "/metrics", "/dashboard"):
        assert endpoint in out


def test_printed_store_urls_hide_the_password() -> None:
    from router.cli import _without_password

    assert _without_password("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert _without_password("rediss://app:s3cret@r.example/1") == "rediss://app:***@r.example/1"
    assert _without_password("redis://redis:6379/0") == "redis://redis:6379/0"
    assert _without_password("redis://:pw@[::1]:6379/0") == "redis://:***@[::1]:6379/0"
    assert _without_password("redis://R:6379/0?password=pw&db=1") == (
        "redis://R:6379/0?password=***&db=1"
    )
