"""Evaluation of the policy language: operators, ordering, aliases, tenants, constraints."""

from __future__ import annotations

import json
import textwrap
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from router.policy import (
    Policy,
    evaluate,
    load_policy,
    parse_policy,
)
from router.signals import Signals

ROOT = Path(__file__).resolve().parent.parent

MODELS = """\
version: 1
models:
  small: {tier: local, context_window: 1000}
  notools: {tier: closed, litellm_model: openai/x, supports_tools: false, context_window: 50000}
  big: {tier: closed, litellm_model: openai/gpt-4o, context_window: 100000}
  huge: {tier: closed, litellm_model: anthropic/claude, context_window: 1000000}
closed_models: [notools, big, huge]
threshold: 0.5
"""


def policy(body: str = "") -> Policy:
    return parse_policy(MODELS + textwrap.dedent(body))


def signals(**kwargs: Any) -> Signals:
    kwargs.setdefault("alias", "auto")
    return Signals(**kwargs)


# --------------------------------------------------------------------------- operators

# (condition as YAML, signal values, whether the rule matches)
OPERATOR_CASES: list[tuple[str, dict[str, Any], bool]] = [
    ("{capability: coding}", {"capability": "coding"}, True),
    ("{capability: coding}", {"capability": "math"}, False),
    ("{capability: {eq: coding}}", {"capability": None}, False),
    ("{capability: {eq: null}}", {"capability": None}, True),
    ("{capability: {eq: null}}", {"capability": "coding"}, False),
    ("{capability: {ne: coding}}", {"capability": "math"}, True),
    ("{capability: {ne: coding}}", {"capability": "coding"}, False),
    ("{capability: {ne: coding}}", {"capability": None}, False),  # missing never satisfies
    ("{prompt_tokens: {gt: 100}}", {"prompt_tokens": 101}, True),
    ("{prompt_tokens: {gt: 100}}", {"prompt_tokens": 100}, False),
    ("{prompt_tokens: {gte: 100}}", {"prompt_tokens": 100}, True),
    ("{prompt_tokens: {gte: 100}}", {"prompt_tokens": 99}, False),
    ("{score: {lt: 0.5}}", {"score": 0.49}, True),
    ("{score: {lt: 0.5}}", {"score": 0.5}, False),
    ("{score: {lte: 0.5}}", {"score": 0.5}, True),
    ("{score: {lte: 0.5}}", {"score": 0.51}, False),
    ("{max_tokens: {lt: 100}}", {"max_tokens": None}, False),
    ("{max_tokens: {lt: 100}}", {"max_tokens": 50}, True),
    ("{prompt_tokens: {gt: 10, lte: 20}}", {"prompt_tokens": 15}, True),
    ("{prompt_tokens: {gt: 10, lte: 20}}", {"prompt_tokens": 25}, False),
    ("{turns: {in: [2, 3]}}", {"turns": 3}, True),
    ("{turns: {in: [2, 3]}}", {"turns": 1}, False),
    ("{capability: [coding, math]}", {"capability": "math"}, True),
    ("{capability: [coding, math]}", {"capability": "chat"}, False),
    ("{capability: {not_in: [coding]}}", {"capability": "chat"}, True),
    ("{capability: {not_in: [coding]}}", {"capability": "coding"}, False),
    ("{capability: {not_in: [coding]}}", {"capability": None}, False),
    ("{capability: {matches: '^(cod|mat)'}}", {"capability": "math"}, True),
    ("{capability: {matches: '^(cod|mat)'}}", {"capability": "chat"}, False),
    ("{tenant: {contains: cm}}", {"tenant": "acme"}, True),
    ("{tenant: {contains: cm}}", {"tenant": "globex"}, False),
    ("{alias: {matches: '^auto-'}}", {"alias": "auto-best"}, True),
    ("{alias: {matches: '^auto-'}}", {"alias": "auto"}, False),
    ("{pii_kinds: {contains: email}}", {"pii_kinds": ("phone", "email")}, True),
    ("{pii_kinds: {contains: email}}", {"pii_kinds": ()}, False),
    ("{pii_kinds: [email, ssn]}", {"pii_kinds": ("ssn",)}, True),
    ("{pii_kinds: [email, ssn]}", {"pii_kinds": ("phone",)}, False),
    ("{pii_kinds: {not_in: [ssn]}}", {"pii_kinds": ("phone",)}, True),
    ("{pii_kinds: {not_in: [ssn]}}", {"pii_kinds": ("ssn", "phone")}, False),
    ("{pii_kinds: {matches: '^ss'}}", {"pii_kinds": ("ssn",)}, True),
    ("{has_images: true}", {"has_images": True}, True),
    ("{has_images: true}", {"has_images": False}, False),
    ("{has_tools: {ne: true}}", {"has_tools": False}, True),
    ("{pii: false}", {"pii": True}, False),
    ("{stakes: {gte: medium}}", {"stakes": "high"}, True),
    ("{stakes: {gte: medium}}", {"stakes": "medium"}, True),
    ("{stakes: {gte: medium}}", {"stakes": "low"}, False),
    ("{stakes: {gte: medium}}", {"stakes": None}, False),
    ("{stakes: {lt: high}}", {"stakes": "low"}, True),
    ("{stakes: [high]}", {"stakes": "high"}, True),
    # headers: name is case-free, values compare as text, order operators read numbers
    (
        "{header: {name: X-Tiergate-Stakes, eq: high}}",
        {"headers": {"x-tiergate-stakes": "high"}},
        True,
    ),
    (
        "{header: {name: x-tiergate-stakes, eq: high}}",
        {"headers": {"X-Tiergate-Stakes": "high"}},
        True,
    ),
    ("{header: {name: x-tiergate-stakes, eq: high}}", {"headers": {}}, False),
    (
        "{header: {name: x-tiergate-priority, gt: 3}}",
        {"headers": {"x-tiergate-priority": "5"}},
        True,
    ),
    (
        "{header: {name: x-tiergate-priority, gt: 3}}",
        {"headers": {"x-tiergate-priority": "two"}},
        False,
    ),
    # metadata: dotted paths walk nested mappings; booleans never equal numbers
    ("{metadata.team.name: search}", {"metadata": {"team": {"name": "search"}}}, True),
    ("{metadata.team.name: search}", {"metadata": {"team": "search"}}, False),
    ("{metadata.team.name: search}", {"metadata": {}}, False),
    ("{metadata.flag: {eq: 1}}", {"metadata": {"flag": True}}, False),
    ("{metadata.flag: true}", {"metadata": {"flag": True}}, True),
    ("{metadata.tags: {contains: beta}}", {"metadata": {"tags": ["beta", "x"]}}, True),
    ("{metadata.tier: [gold, silver]}", {"metadata": {"tier": "gold"}}, True),
    ("{metadata.tier: [gold, silver]}", {"metadata": {"tier": ["gold"]}}, False),
    ("{metadata.tier: {not_in: [gold]}}", {"metadata": {}}, False),
    ("{metadata.cost: {lte: 2.5}}", {"metadata": {"cost": 2}}, True),
    # combinators; documented edges: all [] always matches, any [] never does,
    # and `not` of a comparison on a missing signal is true
    ("{all: []}", {}, True),
    ("{any: []}", {}, False),
    ("{any: [{pii: true}, {has_images: true}]}", {"has_images": True}, True),
    ("{any: [{pii: true}, {has_images: true}]}", {}, False),
    ("{all: [{pii: true}, {has_images: true}]}", {"pii": True}, False),
    ("{all: [{pii: true}, {has_images: true}]}", {"pii": True, "has_images": True}, True),
    ("{not: {capability: coding}}", {"capability": None}, True),
    ("{not: {capability: coding}}", {"capability": "coding"}, False),
    ("{has_tools: true, turns: {gte: 2}}", {"has_tools": True, "turns": 1}, False),
    ("{has_tools: true, turns: {gte: 2}}", {"has_tools": True, "turns": 2}, True),
    ("{}", {}, True),
]


@pytest.mark.parametrize(("when", "values", "expected"), OPERATOR_CASES)
def test_operator(when: str, values: dict[str, Any], expected: bool) -> None:
    p = policy(f"rules:\n  - {{name: r, when: {when}, route: closed}}\n")
    decision = evaluate(p, signals(**values))
    # (not decision.rule: a request with tools is moved off the toolless closed model)
    assert decision.trace[0].name == "r" and decision.trace[0].matched is expected


@pytest.mark.parametrize(
    ("reference", "values", "expected"),
    [
        ("long", {"prompt_tokens": 700}, True),
        ("long", {"prompt_tokens": 10}, False),
        ("{signal: long}", {"prompt_tokens": 700}, True),
        ("{long: true}", {"prompt_tokens": 700}, True),
        ("{long: false}", {"prompt_tokens": 700}, False),
        ("{long: false}", {"prompt_tokens": 10}, True),
        ("{all: [long, {has_tools: true}]}", {"prompt_tokens": 700, "has_tools": True}, True),
        ("long_and_coding", {"prompt_tokens": 700, "capability": "coding"}, True),
        ("long_and_coding", {"prompt_tokens": 700, "capability": "chat"}, False),
    ],
)
def test_named_signal(reference: str, values: dict[str, Any], expected: bool) -> None:
    p = policy(f"""\
        signals:
          long: {{prompt_tokens: {{gt: 600}}}}
          long_and_coding: {{all: [long, {{capability: coding}}]}}
        rules:
          - {{name: r, when: {reference}, route: closed}}
        """)
    step = evaluate(p, signals(**values)).trace[0]
    assert step.name == "r" and step.matched is expected


def test_failed_condition_is_explained_in_trace() -> None:
    p = policy("""\
        rules:
          - {name: long, when: {prompt_tokens: {gt: 600}}, route: closed}
          - {name: coding, when: {capability: coding}, route: local}
        """)
    decision = evaluate(p, signals(prompt_tokens=10, capability="coding"))
    assert [(t.name, t.matched) for t in decision.trace] == [("long", False), ("coding", True)]
    assert decision.trace[0].why == "prompt_tokens > 600 is false"
    assert decision.trace[1].why == "matched: capability == 'coding'"


# --------------------------------------------------------------------------- ordering


def test_higher_priority_wins_regardless_of_file_order() -> None:
    p = policy("""\
        rules:
          - {name: low, priority: 1, route: local}
          - {name: high, priority: 5, when: {pii: false}, route: closed}
        """)
    decision = evaluate(p, signals())
    assert (decision.rule, decision.model) == ("high", "notools")
    assert [t.name for t in decision.trace] == ["high"]


def test_priority_ties_keep_file_order() -> None:
    p = policy("""\
        rules:
          - {name: first, priority: 3, when: {pii: false}, route: big}
          - {name: second, priority: 3, route: huge}
        """)
    assert evaluate(p, signals()).rule == "first"


def test_no_rule_matched_falls_to_default_rule() -> None:
    p = policy("rules:\n  - {name: never, when: {any: []}, route: closed}\n")
    decision = evaluate(p, signals(score=0.9))
    assert (decision.rule, decision.tier, decision.model) == ("default", "closed", "notools")
    assert [(t.name, t.matched) for t in decision.trace] == [("never", False), ("default", True)]


# --------------------------------------------------------------------------- aliases


ALIASES = """\
    aliases:
      auto: {threshold: 0.5}
      auto-best: {threshold: 0.2}
      auto-cheap: {target_closed_share: 0.1}
    rules:
      - {name: score, route: auto}
    """


@pytest.mark.parametrize(
    ("alias", "score", "tier", "threshold"),
    [
        ("auto", 0.49, "local", 0.5),
        ("auto", 0.5, "closed", 0.5),  # score >= threshold goes closed
        ("auto-best", 0.3, "closed", 0.2),
        ("auto-best", 0.1, "local", 0.2),
        ("auto-cheap", 0.6, "closed", 0.5),  # uncalibrated: starts at the policy threshold
        ("unknown-alias", 0.6, "closed", 0.5),  # the web layer 404s these; evaluate uses auto
    ],
)
def test_alias_threshold(alias: str, score: float, tier: str, threshold: float) -> None:
    decision = evaluate(policy(ALIASES), signals(alias=alias, score=score))
    assert (decision.tier, decision.threshold) == (tier, threshold)
    assert decision.alias == (alias if alias != "unknown-alias" else "auto")


def test_calibrated_threshold_wins_over_policy() -> None:
    p = policy(ALIASES)
    s = signals(alias="auto-cheap", score=0.6)
    decision = evaluate(p, s, thresholds={"auto-cheap": 0.7})
    assert (decision.tier, decision.threshold) == ("local", 0.7)
    # a calibration for another alias does not leak
    assert evaluate(p, s, thresholds={"auto": 0.9}).threshold == 0.5


def test_auto_alias_defaults_to_policy_threshold() -> None:
    p = parse_policy(MODELS.replace("threshold: 0.5", "threshold: 0.3"))
    assert p.alias_names() == ["auto"]
    assert evaluate(p, signals(score=0.35)).tier == "closed"


def test_model_listing_helpers() -> None:
    p = policy(
        ALIASES.rstrip(" ") + "    tenants:\n      acme: {aliases: {auto-acme: {threshold: 0.9}}}\n"
    )
    assert p.alias_names() == ["auto", "auto-best", "auto-cheap"]
    assert p.alias_names("acme")[-1] == "auto-acme"
    assert p.is_known_model("big") and p.is_known_model("auto-best")
    assert not p.is_known_model("auto-acme") and p.is_known_model("auto-acme", "acme")
    assert not p.is_known_model("gpt-5")
    spec = p.resolve_model("big")
    assert spec is not None and spec.name == "big" and spec.litellm_model == "openai/gpt-4o"
    assert p.resolve_model("auto") is None


# --------------------------------------------------------------------------- tenants, budget


TENANTS = """\
    rules:
      - {name: global-closed, priority: 50, when: {capability: coding}, route: closed}
      - {name: score, route: auto}
    tenants:
      acme:
        rules:
          - {name: acme-local, priority: -5, when: {capability: coding}, route: local}
        aliases:
          auto: {threshold: 0.9}
      capped:
        daily_budget_usd: 5.0
        over_budget: local
      hard:
        daily_budget_usd: 5.0
        over_budget: reject
    """


def test_tenant_rules_run_before_global_rules() -> None:
    p = policy(TENANTS)
    assert evaluate(p, signals(tenant="acme", capability="coding")).rule == "acme-local"
    assert evaluate(p, signals(tenant="other", capability="coding")).rule == "global-closed"


def test_tenant_alias_override() -> None:
    p = policy(TENANTS)
    assert evaluate(p, signals(tenant="acme", score=0.6)).tier == "local"
    assert evaluate(p, signals(tenant="other", score=0.6)).tier == "closed"


def test_a_global_calibration_does_not_replace_a_tenants_own_alias() -> None:
    # Calibrated thresholds come from every tenant's traffic: they must reach only the tenants
    # that use the global alias, not one whose policy sets the alias itself.
    p = policy(
        ALIASES.rstrip(" ")
        + """\
    tenants:
      fixed: {aliases: {auto-cheap: {threshold: 0.95}}}
      share:
        aliases:
          auto-cheap: {target_closed_share: 0.5}
          auto-own: {target_closed_share: 0.01}
    """
    )
    calibrated = {"auto-cheap": 0.7, "share/auto-cheap": 0.4, "share/auto-own": 0.99}
    s = signals(alias="auto-cheap", score=0.8)
    assert evaluate(p, s, thresholds=calibrated).threshold == 0.7  # no tenant entry
    assert evaluate(p, replace(s, tenant="fixed"), thresholds=calibrated).threshold == 0.95
    assert evaluate(p, replace(s, tenant="share"), thresholds=calibrated).threshold == 0.4
    own = signals(alias="auto-own", tenant="share", score=0.8)
    assert evaluate(p, own, thresholds=calibrated).threshold == 0.99
    assert evaluate(p, own).threshold == 0.5  # uncalibrated: the policy threshold
    assert p.calibration_key("auto-cheap") == "auto-cheap"
    assert p.calibration_key("auto-cheap", "fixed") is None
    assert p.calibration_key("auto-own", "share") == "share/auto-own"
    assert p.calibration_key("auto") is None


@pytest.mark.parametrize("spend", [None, 0.0, 4.99])
def test_under_budget_is_untouched(spend: float | None) -> None:
    decision = evaluate(policy(TENANTS), signals(tenant="capped", score=0.9), spend_today_usd=spend)
    assert (decision.tier, decision.rule, decision.rejected) == ("closed", "score", None)


def test_budget_spent_forces_local() -> None:
    p = policy("    shadow: {sample_rate: 0.5}\n" + TENANTS)
    assert evaluate(p, signals(tenant="capped", score=0.9), spend_today_usd=1.0).shadow_rate == 0.5
    decision = evaluate(p, signals(tenant="capped", score=0.9), spend_today_usd=5.0)
    assert (decision.tier, decision.model, decision.rule) == ("local", "small", "budget:capped")
    assert decision.local_only and decision.on_failure == "error" and decision.fallbacks == ()
    assert decision.shadow_rate == 0.0 and decision.rejected is None
    assert "spent $5.00 of its $5.00 daily budget" in decision.reason


def test_a_refused_hold_is_over_budget_and_its_reason_gives_the_spend_as_it_is() -> None:
    # The gateway passed max(budget, spend) as the spend: "$5.00 of its $5.00" with $3.20 spent.
    decision = evaluate(
        policy(TENANTS),
        signals(tenant="hard", score=0.9),
        spend_today_usd=3.2,
        hold_refused="; in-flight requests hold the rest",
    )
    assert decision.rejected == (
        "tenant 'hard' spent $3.20 of its $5.00 daily budget; in-flight requests hold the rest"
    )
    assert decision.rejected_held  # the holds free as their requests end: a retry may pass
    spent = evaluate(
        policy(TENANTS), signals(tenant="hard", score=0.9), spend_today_usd=7.5, hold_refused="; x"
    )
    assert spent.rejected == "tenant 'hard' spent $7.50 of its $5.00 daily budget"
    assert not spent.rejected_held


def test_a_budget_refusal_tells_the_spend_from_the_holds_of_requests_in_flight() -> None:
    # "spent and held $5.50": a refusal owed to holds (freed as their requests end, in seconds)
    # read like a spent budget, and was answered as one (retry after midnight UTC).
    held = evaluate(
        policy(TENANTS), signals(tenant="hard", score=0.9), spend_today_usd=5.5, held_usd=3.0
    )
    assert held.rejected == (
        "tenant 'hard' spent $2.50 and holds $3.00 for requests in flight of its $5.00 daily"
        " budget; what they do not spend is freed as they end"
    )
    assert held.rejected_held
    spent = evaluate(
        policy(TENANTS), signals(tenant="hard", score=0.9), spend_today_usd=6.0, held_usd=0.5
    )
    assert spent.rejected == (
        "tenant 'hard' spent $5.50 and holds $0.50 for requests in flight of its $5.00 daily budget"
    )
    assert not spent.rejected_held


def test_budget_spent_reject() -> None:
    decision = evaluate(policy(TENANTS), signals(tenant="hard", score=0.9), spend_today_usd=7.5)
    assert decision.rejected == "tenant 'hard' spent $7.50 of its $5.00 daily budget"
    assert (decision.tier, decision.rule, decision.on_failure) == ("local", "budget:hard", "error")


def test_budget_spent_local_requests_still_served() -> None:
    decision = evaluate(policy(TENANTS), signals(tenant="hard", score=0.1), spend_today_usd=9.0)
    assert (decision.tier, decision.rule, decision.rejected) == ("local", "score", None)
    assert decision.on_failure == "error"  # a fallback would spend the exhausted budget
    assert decision.local_only  # nor may a full local queue spill it (Gateway.spill_chain)


def test_budget_spent_but_local_cannot_serve_is_rejected() -> None:
    s = signals(tenant="capped", score=0.9, has_images=True)
    decision = evaluate(policy(TENANTS), s, spend_today_usd=5.0)
    assert decision.rejected is not None and "cannot take images" in decision.rejected


# ------------------------------------------------------------------ local_only, constraints


def test_local_only_rule() -> None:
    p = policy("""\
        shadow: {sample_rate: 0.3}
        rules:
          - {name: pii, priority: 9, when: {pii: true}, route: local, local_only: true,
             store_prompts: redacted, on_failure: closed}
        """)
    decision = evaluate(p, signals(pii=True, score=0.99))
    assert (decision.tier, decision.rule, decision.local_only) == ("local", "pii", True)
    assert (decision.on_failure, decision.fallbacks) == ("error", ())
    assert decision.store_prompts == "redacted" and decision.unsatisfiable is None
    assert decision.shadow_rate == 0.0  # a shadow call would send the prompt out
    assert evaluate(p, signals(score=0.1)).shadow_rate == 0.3


def test_local_only_never_moves_for_images() -> None:
    p = policy("rules:\n  - {name: pii, when: {pii: true}, route: local, local_only: true}\n")
    decision = evaluate(p, signals(pii=True, has_images=True))
    assert (decision.tier, decision.model) == ("local", "small")
    assert decision.unsatisfiable == "model 'small' cannot take images and the rule is local_only"
    assert decision.unsatisfiable_param == "messages"  # the field the 400 names


@pytest.mark.parametrize(
    ("values", "model", "why"),
    [
        ({"has_images": True}, "notools", "images"),
        ({"has_tools": True}, "big", "tools"),  # notools is skipped
        (
            {"prompt_tokens": 900, "max_tokens": 200},
            "notools",
            "1100 tokens (900 in the prompt + max_tokens 200; context window 1000)",
        ),
        ({"prompt_tokens": 200_000}, "huge", "200000 tokens (context window 1000)"),
        # A prompt that leaves no room for an answer: the least answer did not count.
        (
            {"prompt_tokens": 995},
            "notools",
            "995 tokens in the prompt, which leave 5 of its context window 1000 for the answer "
            "(at least 16)",
        ),
        # n > 1 went to the local model, which refused it with a 400 whatever the score
        ({"choices": 3}, "notools", "n=3 (it answers one choice)"),
    ],
)
def test_hard_constraints_move_to_first_capable_closed_model(
    values: dict[str, Any], model: str, why: str
) -> None:
    """The decision names the constraint as what decided (``x-tiergate-rule``, the record, the
    span): it named the rule that matched, which had chosen the local model, with no sign that
    a constraint overrode it. That rule stays in the reason and the trace."""
    p = policy("rules:\n  - {name: cheap, route: local}\n")
    decision = evaluate(p, signals(**values))
    assert (decision.tier, decision.model, decision.rule) == ("closed", model, "constraint")
    assert decision.as_dict()["rule"] == "constraint"
    assert decision.reason.startswith("rule 'cheap' routes to local 'small'; ")
    assert f"model 'small' cannot take {why} -> moved to '{model}'" in decision.reason
    assert [(t.name, t.matched) for t in decision.trace] == [("cheap", True), ("constraint", True)]


def test_a_local_only_rule_cannot_answer_several_choices_and_says_so() -> None:
    p = policy("rules:\n  - {name: pii, when: {pii: true}, route: local, local_only: true}\n")
    decision = evaluate(p, signals(pii=True, choices=2))
    assert decision.unsatisfiable == (
        "model 'small' cannot take n=2 (it answers one choice) and the rule is local_only"
    )
    assert not decision.context_exceeded  # a 400 invalid_request, not context_length_exceeded
    assert decision.unsatisfiable_param == "n"


@pytest.mark.parametrize(("prompt", "field"), [(1000, "messages"), (999, "max_tokens")])
def test_a_prompt_that_fills_the_window_names_the_prompt_not_max_tokens(
    prompt: int, field: str
) -> None:
    """A prompt estimated as long as the local model's window (1,000 tokens) leaves no room for
    any answer: the 400 named ``max_tokens``, which no value (at least 1) can fix. It names
    the prompt; one token shorter, ``max_tokens`` is what the client can lower."""
    p = policy("rules:\n  - {name: pii, when: {pii: true}, route: local, local_only: true}\n")
    decision = evaluate(p, signals(pii=True, prompt_tokens=prompt, max_tokens=200))
    assert decision.unsatisfiable is not None and decision.context_exceeded
    assert decision.unsatisfiable_param == field


def test_max_tokens_over_a_models_output_limit_moves_or_is_refused() -> None:
    """A closed model's ``max_output_tokens`` is a hard constraint, as its context window is:
    its provider refused a larger ``max_tokens`` (a 400), and cutting it down would return a
    shorter answer than the client asked room for. The request goes to a model that can
    write that much; pinned to this one, it is refused before any call, naming the limit."""
    p = parse_policy(
        MODELS.replace("100000}", "100000, max_output_tokens: 16384}")
        + "rules:\n  - {name: c, route: big}\n"
    )
    decision = evaluate(p, signals(max_tokens=20_000))
    assert (decision.model, decision.rule) == ("notools", "constraint")
    assert "model 'big' cannot take max_tokens 20000 (it writes at most 16384)" in decision.reason
    assert decision.fallbacks == ("huge",)  # not 'big', which would refuse it too
    assert evaluate(p, signals(max_tokens=16_384)).model == "big"
    pinned = evaluate(p, signals(alias="big", max_tokens=20_000))
    assert pinned.unsatisfiable == (
        "model 'big' cannot take max_tokens 20000 (it writes at most 16384) and the request pins it"
    )
    assert not pinned.context_exceeded


def test_prompt_exactly_at_window_stays_local() -> None:
    p = policy("rules:\n  - {name: cheap, route: local}\n")
    assert evaluate(p, signals(prompt_tokens=900, max_tokens=100)).model == "small"


def test_no_model_can_serve() -> None:
    p = policy("rules:\n  - {name: cheap, route: local}\n")
    decision = evaluate(p, signals(prompt_tokens=2_000_000))
    assert decision.model == "small"
    assert (
        decision.unsatisfiable is not None
        and "no closed model can either" in decision.unsatisfiable
    )
    assert decision.on_failure == "error"


#: Claudes on each path, behind an OpenAI model.
CLAUDES = """\
version: 1
models:
  small: {tier: local, context_window: 1000}
  big: {tier: closed, litellm_model: openai/gpt-4o}
  bedrock: {tier: closed, litellm_model: bedrock/anthropic.claude-3-5-sonnet-20241022-v2:0}
  litellm: {tier: closed, litellm_model: anthropic/claude-sonnet-4-5, transport: litellm}
  native: {tier: closed, litellm_model: anthropic/claude-sonnet-4-5}
closed_models: [big, bedrock, litellm, native]
threshold: 0.5
"""


def test_anthropics_own_tools_go_to_the_first_claude_that_takes_them() -> None:
    """A bash tool fits a Claude on Anthropic's API through litellm, which passes it on; a web
    search with settings only one reached natively; neither an OpenAI model nor a Claude on
    Bedrock. With no such model the request is refused as any request no model fits, its
    ``param`` the field the client sent them in, ``tools``."""
    p = parse_policy(CLAUDES)
    bash = {"anthropic_tools": ("bash_20250124",)}
    search = {"anthropic_tools": ("web_search_20250305",), "native_tools": ("web_search_20250305",)}
    assert evaluate(p, signals(score=0.9, **bash)).model == "litellm"
    decision = evaluate(p, signals(score=0.9, **search))
    assert (decision.model, decision.rule, decision.fallbacks) == ("native", "constraint", ())
    assert "model 'big' cannot take web_search_20250305 tools (only a Claude" in decision.reason
    pinned = evaluate(p, signals(alias="litellm", **search))
    assert pinned.unsatisfiable == (
        "model 'litellm' cannot take web_search_20250305 tools (only a Claude on Anthropic's "
        "own API takes them) and the request pins it"
    )
    assert pinned.unsatisfiable_param == "tools"
    none = parse_policy(CLAUDES.replace(", native]", "]"))
    refused = evaluate(none, signals(score=0.9, **search))
    assert refused.unsatisfiable == (
        "model 'big' cannot take web_search_20250305 tools (only a Claude on Anthropic's own API "
        "takes them) and no closed model can either"
    )
    assert (refused.unsatisfiable_param, refused.on_failure) == ("tools", "error")
    # The blocks of a message come first, and name the field.
    both = evaluate(p, signals(alias="big", server_tool_blocks=("server_tool_use",), **bash))
    assert both.unsatisfiable_param == "messages"
    assert "cannot take server_tool_use blocks, bash_20250124 tools (" in str(both.unsatisfiable)


def test_closed_route_skips_closed_model_without_tools() -> None:
    p = policy("rules:\n  - {name: c, route: notools}\n")
    decision = evaluate(p, signals(has_tools=True))
    assert decision.model == "big"
    assert decision.fallbacks == ("huge",)


# --------------------------------------------------------------------------- pinning, failure


def test_pinned_model_skips_rules_except_local_only() -> None:
    p = policy("""\
        rules:
          - {name: pii, priority: 9, when: {pii: true}, route: local, local_only: true}
          - {name: all-local, route: local}
        """)
    decision = evaluate(p, signals(alias="big"))
    assert (decision.model, decision.rule) == ("big", "pinned")
    assert (decision.on_failure, decision.fallbacks) == ("error", ())  # a pin is not swapped
    assert decision.trace[1].why == "skipped: the request pins a model"
    assert evaluate(p, signals(alias="big", pii=True)).model == "small"  # privacy beats a pin


def test_a_global_local_only_rule_beats_a_higher_priority_rule_for_every_tenant() -> None:
    # A tenant under `tenants` (here only for a budget) had the global local_only rules tried
    # first; any other tenant had them in priority order, so its personal data went closed.
    p = policy("""\
        rules:
          - {name: all-closed, priority: 5, route: closed}
          - {name: pii, when: {pii: true}, route: local, local_only: true}
        tenants:
          acme: {daily_budget_usd: 10}
        """)
    for tenant in ("default", "acme", "not-listed"):
        assert evaluate(p, signals(pii=True, tenant=tenant)).rule == "pii", tenant
        assert evaluate(p, signals(tenant=tenant)).rule == "all-closed", tenant


def test_a_tenants_local_only_rule_after_its_catch_all_still_keeps_pinned_requests_local() -> None:
    # A pin skips the catch-all but not a local_only rule, so the loader takes this one.
    p = policy("""\
        tenants:
          acme:
            rules:
              - {name: all-closed, priority: 5, route: closed}
              - {name: pii, when: {pii: true}, route: local, local_only: true}
        """)
    assert evaluate(p, signals(pii=True, tenant="acme")).rule == "all-closed"
    assert evaluate(p, signals(alias="big", pii=True, tenant="acme")).rule == "pii"


def test_pinned_model_is_never_swapped() -> None:
    decision = evaluate(policy(), signals(alias="small", has_images=True))
    assert (decision.model, decision.rule) == ("small", "pinned")
    assert decision.unsatisfiable == "model 'small' cannot take images and the request pins it"


@pytest.mark.parametrize(
    ("rule", "values", "on_failure", "fallbacks"),
    [
        ("{name: r, route: local}", {}, "closed", ("notools", "big", "huge")),
        ("{name: r, route: local, on_failure: error}", {}, "error", ()),
        ("{name: r, route: local, on_failure: local}", {}, "error", ()),
        ("{name: r, route: big}", {}, "closed", ("notools", "huge")),
        ("{name: r, route: big, on_failure: local}", {}, "local", ("small",)),
        # the local model cannot take the images: no silent fallback to it
        ("{name: r, route: big, on_failure: local}", {"has_images": True}, "error", ()),
    ],
)
def test_on_failure_and_fallbacks(
    rule: str, values: dict[str, Any], on_failure: str, fallbacks: tuple[str, ...]
) -> None:
    decision = evaluate(policy(f"rules:\n  - {rule}\n"), signals(**values))
    assert (decision.on_failure, decision.fallbacks) == (on_failure, fallbacks)


def test_rule_actions_shadow_and_store_prompts() -> None:
    p = policy("""\
        store_prompts: none
        shadow: {sample_rate: 0.1}
        rules:
          - {name: s, when: {capability: chat}, route: local, shadow: {sample_rate: 0.25},
             store_prompts: full}
        """)
    decision = evaluate(p, signals(capability="chat"))
    assert (decision.shadow_rate, decision.store_prompts) == (0.25, "full")
    decision = evaluate(p, signals(capability="math"))
    assert (decision.shadow_rate, decision.store_prompts) == (0.1, "none")


def test_one_tier_policy_auto_goes_to_the_tier_that_exists() -> None:
    p = parse_policy("version: 1\nmodels: {solo: {tier: local}}\n")
    decision = evaluate(p, signals(score=1.0))
    assert (decision.tier, decision.model) == ("local", "solo")
    assert "no closed model" in decision.reason


# --------------------------------------------------------------------------- outputs


def test_decision_as_dict_is_json_ready() -> None:
    decision = evaluate(load_policy(ROOT / "policies/default.yaml"), signals(score=0.7))
    data = json.loads(json.dumps(decision.as_dict()))
    assert data["rule"] == "default" and data["model"] == "gpt-4o"
    assert data["policy_version"] == decision.policy_version and len(data["policy_version"]) == 12
    assert data["trace"][-1] == {
        "name": "default",
        "priority": 0,
        "matched": True,
        "why": "matched: no other rule matched; the score decides",
    }


def test_digest_tracks_the_source_text() -> None:
    assert policy().digest == policy().digest
    assert policy().digest != policy("# a comment\n").digest
    assert policy().source == "<string>"


# (signals, expected (tier, model, rule)) for the default worldview
DEFAULT_CASES: list[tuple[dict[str, Any], tuple[str, str, str]]] = [
    ({"pii": True, "score": 0.99}, ("local", "local", "pii-stays-local")),
    ({"has_images": True}, ("closed", "gpt-4o", "images-need-closed")),
    ({"stakes": "high"}, ("closed", "gpt-4o", "high-stakes")),
    ({"headers": {"x-tiergate-stakes": "high"}}, ("closed", "gpt-4o", "high-stakes")),
    ({"prompt_tokens": 7000}, ("closed", "gpt-4o", "long-context")),
    ({"has_tools": True, "turns": 3}, ("closed", "gpt-4o", "agent-workflow")),
    # the local profile says what the local model is strong at (an 8B model at coding here)
    (
        {"capability": "coding", "score": 0.7, "local_accuracy": 0.73},
        ("local", "local", "open-model-strengths"),
    ),
    (
        {"capability": "coding", "score": 0.85, "local_accuracy": 0.73},
        ("local", "local", "open-model-strengths"),
    ),
    (
        {"capability": "coding", "score": 0.95, "local_accuracy": 0.73},
        ("closed", "gpt-4o", "default"),
    ),
    # the bundled 135M model at coding: not a strength, the score decides
    (
        {"capability": "coding", "score": 0.7, "local_accuracy": 0.05},
        ("closed", "gpt-4o", "default"),
    ),
    ({"capability": "coding", "score": 0.3, "local_accuracy": 0.05}, ("local", "local", "default")),
    (
        {"capability": "reasoning", "score": 0.45, "local_accuracy": 0.15},
        ("closed", "gpt-4o", "nuanced-judgment"),
    ),
    (
        {"capability": "reasoning", "score": 0.45, "local_accuracy": 0.8},
        ("local", "local", "open-model-strengths"),
    ),
    # chat the local model is strong at stays local even at a middling score
    (
        {"capability": "chat", "score": 0.6, "local_accuracy": 0.65, "prompt_tokens": 200},
        ("local", "local", "open-model-strengths"),
    ),
    ({"capability": "chat", "score": 0.2}, ("local", "local", "default")),
    # short small talk stays local with a local model that has some footing in chat
    (
        {"capability": "chat", "score": 0.75, "local_accuracy": 0.375, "prompt_tokens": 6},
        ("local", "local", "small-talk"),
    ),
    (
        {"capability": "chat", "score": 0.75, "local_accuracy": 0.375, "prompt_tokens": 200},
        ("closed", "gpt-4o", "default"),
    ),
    (
        {"capability": "chat", "score": 0.75, "local_accuracy": 0.1, "prompt_tokens": 6},
        ("closed", "gpt-4o", "default"),
    ),
    # one-turn tool call: no rule fires, but the local model cannot take tools
    # the local model takes no tools: a constraint decided, not the rule (default, local)
    ({"has_tools": True, "score": 0.1}, ("closed", "gpt-4o", "constraint")),
]


@pytest.mark.parametrize(("values", "expected"), DEFAULT_CASES)
def test_default_policy_worldview(values: dict[str, Any], expected: tuple[str, str, str]) -> None:
    decision = evaluate(load_policy(ROOT / "policies/default.yaml"), signals(**values))
    assert (decision.tier, decision.model, decision.rule) == expected


def test_a_decision_names_the_profile_entry_that_moved_it() -> None:
    """`policy explain` and POST /v1/route show which profile entry a decision read, and which
    rules read it; a decision no profile-reading rule considered names none."""
    p = load_policy(ROOT / "policies/default.yaml")
    kept = evaluate(
        p,
        signals(
            capability="chat",
            score=0.6,
            local_accuracy=0.65,
            local_profile="SmolLM2",
            prompt_tokens=200,
        ),
    )
    assert kept.profile_entry == (
        "SmolLM2: chat accuracy 0.65; read by small-talk (no match), open-model-strengths (matched)"
    )
    sent = evaluate(
        p, signals(capability="math", score=0.8, local_accuracy=0.02, local_profile="SmolLM2")
    )
    assert sent.tier == "closed" and sent.as_dict()["profile_entry"] == (
        "SmolLM2: math accuracy 0.02; read by small-talk (no match), open-model-strengths "
        "(no match), nuanced-judgment (no match)"
    )
    assert evaluate(p, signals(pii=True)).profile_entry is None
    plain = policy("rules:\n  - {name: r, when: {capability: chat}, route: local}\n")
    assert evaluate(plain, signals(capability="chat")).profile_entry is None


def test_a_profile_signal_may_be_named_or_inline() -> None:
    p = policy(
        """
        signals:
          strong_here: {local_accuracy: {gte: 0.6}}
          via_signal: {any: [strong_here]}
        rules:
          - {name: named, when: via_signal, route: local}
          - {name: inline, when: {local_accuracy: {lt: 0.2}}, route: closed}
        """
    )
    assert evaluate(p, signals(local_accuracy=0.7)).rule == "named"
    low = evaluate(p, signals(local_accuracy=0.1, local_profile="m", capability="math"))
    assert low.rule == "inline"
    assert low.profile_entry == "m: math accuracy 0.10; read by named (no match), inline (matched)"
    assert evaluate(p, signals()).rule == "default"  # no profile: local_accuracy is missing


def test_default_policy_stores_pii_prompts_redacted() -> None:
    decision = evaluate(load_policy(ROOT / "policies/default.yaml"), signals(pii=True))
    assert decision.store_prompts == "redacted" and decision.local_only


# --------------------------------------------------------------------------- cascade

CASCADE = """
cascade: {threshold: 0.6, hold_back_tokens: 8}
rules:
  - {name: private, priority: 10, when: {pii: true}, route: local, local_only: true}
  - {name: try-local, when: {capability: knowledge_qa}, route: cascade}
aliases:
  auto-cascade: {cascade: true}
"""


def test_a_cascade_rule_starts_on_the_local_model_and_names_its_escalation() -> None:
    d = evaluate(policy(CASCADE), signals(capability="knowledge_qa", score=0.9))
    assert (d.tier, d.model, d.rule) == ("local", "small", "try-local")
    assert d.cascade is not None and d.cascade.as_dict() == {
        "threshold": 0.6,
        "hold_back_tokens": 8,
        "escalate_to": "notools",
    }
    assert "cascade" in d.reason and "escalates to 'notools'" in d.reason
    assert d.as_dict()["cascade"]["escalate_to"] == "notools"


def test_the_cascade_alias_turns_the_score_route_into_a_cascade() -> None:
    p = policy(CASCADE)
    cascaded = evaluate(p, signals(alias="auto-cascade", score=0.9))
    assert (cascaded.rule, cascaded.alias, cascaded.tier) == ("default", "auto-cascade", "local")
    assert cascaded.cascade is not None and cascaded.threshold is None
    assert cascaded.cascade_skipped is None
    scored = evaluate(p, signals(alias="auto", score=0.9))
    assert scored.cascade is None and scored.tier == "closed"
    assert scored.cascade_skipped is None  # no cascade was asked for
    assert "auto-cascade" in p.alias_names()


def test_no_cascade_where_it_could_not_escalate_or_serve_locally() -> None:
    p = policy(CASCADE)
    private = evaluate(p, signals(alias="auto-cascade", pii=True))
    assert private.local_only and private.cascade is None
    no_closed = evaluate(p, signals(capability="knowledge_qa"), closed_available=False)
    assert no_closed.cascade is None and "no closed model" in no_closed.reason
    assert no_closed.cascade_skipped == "no closed model to escalate to"
    assert no_closed.as_dict()["cascade_skipped"] == no_closed.cascade_skipped
    images = evaluate(p, signals(capability="knowledge_qa", has_images=True))
    assert images.tier == "closed" and images.cascade is None
    assert images.cascade_skipped == "the request cannot be served locally"
    assert private.cascade_skipped is None  # a privacy rule, not a cascade, decided it


FITS = """\
version: 1
models:
  local: {tier: local, context_window: 8000}
  short: {tier: closed, litellm_model: openai/a, context_window: 4000}
  terse: {tier: closed, litellm_model: openai/b, context_window: 16000, max_output_tokens: 500}
  long: {tier: closed, litellm_model: openai/c, context_window: 16000}
closed_models: [short, terse, long]
on_failure: closed
rules:
  - {name: try-local, when: {capability: knowledge_qa}, route: cascade}
"""


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "escalate_to", "fallbacks"),
    [
        (100, None, "short", ("short", "terse", "long")),
        (6000, None, "terse", ("terse", "long")),  # over short's window
        (6000, 1000, "long", ("long",)),  # and over terse's output limit
    ],
)
def test_a_cascade_escalates_to_the_first_closed_model_that_can_take_the_request(
    prompt: int, max_tokens: int | None, escalate_to: str, fallbacks: tuple[str, ...]
) -> None:
    # It escalated to the first of closed_models whatever the request: a prompt over its
    # window was sent to it, refused, and the escalation failed.
    asked = signals(capability="knowledge_qa", prompt_tokens=prompt, max_tokens=max_tokens)
    d = evaluate(parse_policy(FITS), asked)
    assert (d.tier, d.model) == ("local", "local")
    assert d.cascade is not None and d.cascade.escalate_to == escalate_to
    assert f"escalates to '{escalate_to}'" in d.reason
    assert d.fallbacks == fallbacks  # where it goes on to if that one fails


def test_no_cascade_when_no_closed_model_can_take_the_request() -> None:
    """Escalating could only fail: the local answer is served as it is (cascade_skipped says
    why, as without a closed model), not judged and lost."""
    p = parse_policy(FITS.replace("closed_models: [short, terse, long]", "closed_models: [short]"))
    d = evaluate(p, signals(capability="knowledge_qa", prompt_tokens=7000))
    assert (d.tier, d.model, d.rule) == ("local", "local", "try-local")
    assert d.cascade is None and d.unsatisfiable is None
    assert d.cascade_skipped == (
        "no closed model can take the request "
        "('short' cannot take 7000 tokens (context window 4000))"
    )
    assert d.cascade_skipped in d.reason


def test_a_local_only_rule_cannot_cascade() -> None:
    from router.errors import PolicyError

    with pytest.raises(PolicyError, match="cannot cascade"):
        policy("rules:\n  - {name: x, route: cascade, local_only: true}\n")


def test_without_keys_a_lone_closed_model_still_falls_back_to_local() -> None:
    """A policy with one closed model (docs/policy.md's first policy): with no key, a decision
    for it ends with the local model, as with several (fail_closed: false)."""
    one = parse_policy(
        "version: 1\nmodels:\n  local: {tier: local}\n"
        "  gpt-4o: {tier: closed, litellm_model: openai/gpt-4o}\n"
    )
    decision = evaluate(one, signals(score=0.9), closed_available=False)
    assert decision.tier == "closed" and decision.no_closed_local
    assert decision.fallbacks == ("local",) and decision.on_failure == "local"
    # A pin, on_failure: error and fail_closed still keep it where it is.
    assert evaluate(one, signals(alias="gpt-4o"), closed_available=False).fallbacks == ()
    for extra in ("on_failure: error\n", "fail_closed: true\n"):
        strict = parse_policy(
            "version: 1\n" + extra + "models:\n  local: {tier: local}\n"
            "  gpt-4o: {tier: closed, litellm_model: openai/gpt-4o}\n"
        )
        assert evaluate(strict, signals(score=0.9), closed_available=False).fallbacks == ()
