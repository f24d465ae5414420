"""Reading a policy: shipped and documented policies load; every problem in a broken one is
reported, located by file, line, column and key path."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from router.errors import ConfigError, PolicyError
from router.policy import Decision, evaluate
from router.policy_compile import load_policy, parse_policy
from router.signals import Signals

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SHIPPED = sorted([*ROOT.glob("policies/*.yaml"), *ROOT.glob("policies/examples/*.yaml")])
BROKEN = HERE / "policies_broken"

M = """\
version: 1
models:
  local: {tier: local}
  gpt: {tier: closed, litellm_model: openai/gpt-4o}
"""  # four lines: what follows starts on line 5

OPS = "eq, ne, gt, gte, lt, lte, in, not_in, contains, matches"

# (id, policy text, every message expected, in order)
CORPUS: list[tuple[str, str, list[str]]] = [
    # --- YAML itself
    (
        "yaml-syntax",
        "version: 1\nmodels:\n  local: {tier: local\n",
        [
            "p.yaml:4:1: YAML syntax error: expected ',' or '}', but got '<stream end>' "
            "(while parsing a flow mapping at line 3, column 10)"
        ],
    ),
    (
        "yaml-tab",
        "version: 1\nmodels:\n\tlocal: x\n",
        [
            "p.yaml:3:1: YAML syntax error: found character '\\t' that cannot start any token "
            "(use spaces: YAML takes no tab here)"
        ],
    ),
    (
        "duplicate-key",
        M + "threshold: 0.5\nthreshold: 0.6\n",
        ["p.yaml:6:1: threshold: duplicate key 'threshold' (the later one would silently win)"],
    ),
    ("empty", "", ["p.yaml:1:1: a policy is a mapping that starts with `version: 1`"]),
    # --- version
    (
        "version-missing",
        "models:\n  local: {tier: local}\n",
        ["p.yaml:1:1: version: missing required key 'version' (add `version: 1` at the top)"],
    ),
    (
        "version-wrong",
        "version: 2\nmodels:\n  local: {tier: local}\n",
        ["p.yaml:1:1: version: unsupported version 2 (this Tiergate reads version 1)"],
    ),
    (
        # quoted, the version is text: "unsupported version '1' (this Tiergate reads version
        # 1)" named what looked like the very value it asked for
        "version-quoted",
        'version: "1"\nmodels:\n  local: {tier: local}\n',
        [
            "p.yaml:1:1: version: expected the number 1, got text '1': write `version: 1`, "
            "without quotes"
        ],
    ),
    (
        "version-empty",
        "version:\nmodels:\n  local: {tier: local}\n",
        ["p.yaml:1:1: version: no value: write `version: 1`"],
    ),
    # --- wrong types
    (
        "wrong-type-number",
        M + "threshold: high\n",
        ["p.yaml:5:1: threshold: expected a number, got str 'high'"],
    ),
    (
        "wrong-type-int",
        M + "rules:\n  - name: a\n    priority: first\n    route: local\n",
        ["p.yaml:7:5: rules[0].priority: expected a whole number, got str 'first'"],
    ),
    (
        "wrong-type-list",
        M + "rules: {name: a}\n",
        ["p.yaml:5:1: rules: expected a list, got a mapping"],
    ),
    (
        "wrong-type-bool",
        M + "encoder: 'false'\n",
        ["p.yaml:5:1: encoder: expected true or false, got str 'false'"],
    ),
    (
        "wrong-type-mapping",
        "version: 1\nmodels: [a, b]\n",
        ["p.yaml:2:1: models: expected a mapping, got a list"],
    ),
    (
        "wrong-type-scalar",
        M + "rules:\n  - {name: a, when: {metadata.x: {eq: [1]}}, route: local}\n",
        [
            "p.yaml:6:35: rules[0].when.metadata.x.eq: expected a single value "
            "(text, number, true/false or null), got list"
        ],
    ),
    (
        "out-of-range",
        M + "aliases:\n  auto: {threshold: 1.5}\n",
        ["p.yaml:6:10: aliases.auto.threshold: must be at most 1.0, got float 1.5"],
    ),
    (
        "bad-literal",
        "version: 1\nmodels:\n  local: {tier: remote}\n",
        [
            "p.yaml:3:11: models.local.tier: invalid value 'remote' "
            "(expected one of 'local' or 'closed')"
        ],
    ),
    # --- unknown keys
    (
        "unknown-top-key",
        M + "rulez: []\n",
        [
            "p.yaml:5:1: rulez: unknown key 'rulez', did you mean 'rules'? (expected one of "
            "version, description, models, local_model, closed_models, threshold, encoder, "
            "on_failure, queue_full, fail_closed, store_prompts, retention_days, shadow, cascade, "
            "signals, rules, aliases, tenants)"
        ],
    ),
    (
        "unknown-model-key",
        "version: 1\nmodels:\n  local: {tier: local, contxt_window: 10}\n",
        [
            "p.yaml:3:24: models.local.contxt_window: unknown key 'contxt_window', did you mean "
            "'context_window'? (expected one of tier, litellm_model, api_base, api_key_env, "
            "context_window, max_output_tokens, supports_tools, supports_images, timeout_s, "
            "transport, price, "
            "description)"
        ],
    ),
    (
        "unknown-signal",
        M + "rules:\n  - name: a\n    when: {capabilty: coding}\n    route: local\n",
        [
            "p.yaml:7:12: rules[0].when.capabilty: unknown signal 'capabilty', did you mean "
            "'capability'? (expected one of all, any, not, signal, header, capability, stakes, "
            "pii, pii_kinds, prompt_tokens, max_tokens, has_images, has_tools, turns, score, "
            "local_accuracy, tenant, alias, metadata.<field>)"
        ],
    ),
    # --- operators and values
    (
        "unknown-operator",
        M
        + "rules:\n  - name: a\n    when:\n      capability: {equals: coding}\n    route: local\n",
        [
            f"p.yaml:8:7: rules[0].when.capability: unknown operator "
            f"'equals' (expected one of {OPS})"
        ],
    ),
    (
        "operator-not-for-signal",
        M + "rules:\n  - name: a\n    when: {has_images: {gt: 3}}\n    route: local\n",
        [
            "p.yaml:7:25: rules[0].when.has_images.gt: operator 'gt' does not apply to has_images "
            "(use eq, ne)"
        ],
    ),
    (
        "no-operator",
        M + "rules:\n  - {name: a, when: {pii: {}}, route: local}\n",
        [f"p.yaml:6:22: rules[0].when.pii: no operator given (expected one of {OPS})"],
    ),
    (
        # a list of conditions is not a condition: say how to combine them
        "when-as-a-list",
        M
        + "signals:\n  s: [{pii: true}]\nrules:\n"
        + "  - {name: a, when: [{pii: true}], route: local}\n"
        + "  - {name: b, when: {not: [s]}, route: local}\n",
        [
            "p.yaml:6:3: signals.s: expected a mapping, got a list (conditions that must all "
            "hold: `all: [...]`; any one of them: `any: [...]`)",
            "p.yaml:8:15: rules[0].when: expected a mapping, got a list (conditions that must "
            "all hold: `all: [...]`; any one of them: `any: [...]`)",
            "p.yaml:9:22: rules[1].when.not: expected a mapping, got a list (conditions that "
            "must all hold: `all: [...]`; any one of them: `any: [...]`)",
        ],
    ),
    (
        "wrong-value-type",
        M + "rules:\n  - {name: a, when: {prompt_tokens: {lt: many}}, route: local}\n",
        [
            "p.yaml:6:38: rules[0].when.prompt_tokens.lt: prompt_tokens lt: expected a number, "
            "got str 'many'"
        ],
    ),
    (
        # score and local_accuracy are 0..1: a percentage would silently never match
        "score-as-percentage",
        M
        + "rules:\n  - {name: a, when: {score: {gte: 70}}, route: gpt}\n"
        + "  - {name: b, when: {local_accuracy: [0.5, 1.5]}, route: local}\n",
        [
            "p.yaml:6:30: rules[0].when.score.gte: score gte: expected a number from 0 to 1, "
            "got int 70 (for 70% write 0.7)",
            "p.yaml:7:22: rules[1].when.local_accuracy.in: local_accuracy in: expected a number "
            "from 0 to 1, got float 1.5",
        ],
    ),
    (
        # a request names an alias or a model (anything else is a 404): a typo never matched
        "unknown-alias",
        M
        + "rules:\n  - {name: a, when: {alias: auto-bset}, route: gpt}\n"
        + "  - {name: b, when: {alias: {in: [auto, gpt]}}, route: local}\n",
        [
            "p.yaml:6:22: rules[0].when.alias.eq: unknown alias 'auto-bset' (a request names "
            "an alias or a model: auto, gpt, local)",
        ],
    ),
    (
        "unknown-stakes",
        M + "rules:\n  - {name: a, when: {stakes: {gte: huge}}, route: local}\n",
        [
            "p.yaml:6:31: rules[0].when.stakes.gte: unknown stakes level 'huge' "
            "(expected one of low, medium, high)"
        ],
    ),
    (
        "bad-regex",
        M + "rules:\n  - {name: a, when: {alias: {matches: '(('}}, route: local}\n",
        [
            "p.yaml:6:30: rules[0].when.alias.matches: invalid regular expression '((': "
            "missing ), unterminated subpattern at position 1"
        ],
    ),
    (
        "header-needs-name",
        M + "rules:\n  - {name: a, when: {header: {eq: high}}, route: local}\n",
        ["p.yaml:6:22: rules[0].when.header.name: missing required key 'name'"],
    ),
    (
        "header-the-proxy-never-passes",
        M + "rules:\n  - {name: a, when: {header: {name: X-Team, eq: legal}}, route: local}\n",
        [
            "p.yaml:6:31: rules[0].when.header.name: header 'X-Team' never reaches the policy: "
            "the proxy passes it only x-tiergate-* request headers (those the caller's key may "
            "set); name it x-tiergate-team"
        ],
    ),
    (
        # a header's value is always text: YAML's true (not "true") or 1 never equals it, so a
        # privacy rule written `eq: true` silently let every marked request out
        "header-value-not-text",
        M
        + "rules:\n  - {name: a, when: {header: {name: x-tiergate-private, eq: true}}, "
        + "route: local}\n  - {name: b, when: {header: {name: x-tiergate-n, in: ['1', 2], "
        + "gte: 1}}, route: local}\n",
        [
            "p.yaml:6:57: rules[0].when.header.eq: header x-tiergate-private eq: expected text, "
            'got true (a header\'s value is text: write "true" in quotes)',
            "p.yaml:7:51: rules[1].when.header.in: header x-tiergate-n in: expected text, got "
            'int 2 (a header\'s value is text: write "2" in quotes)',
        ],
    ),
    # --- rules
    (
        "missing-route",
        M + "rules:\n  - name: a\n    when: {pii: true}\n",
        ["p.yaml:6:5: rules[0].route: missing required key 'route'"],
    ),
    (
        # `route:` indented one level too deep sits under `when`: "missing required key
        # 'route'" alone pointed at a rule that plainly had one
        "route-indented-under-when",
        M + "rules:\n  - name: a\n    when:\n      pii: true\n      route: local\n",
        [
            "p.yaml:6:5: rules[0].route: missing required key 'route' (the one on line 9 is "
            "inside rules[0].when: move it out a level, beside 'when')"
        ],
    ),
    (
        # `$` matches before a final newline: a name ending in one passed, and went out in
        # the x-tiergate-model / x-tiergate-rule header, where a newline cannot be
        "names-with-trailing-newline",
        'version: 1\nmodels:\n  local: {tier: local}\n  "gpt\\n": '
        "{tier: closed, litellm_model: openai/gpt-4o}\n"
        'signals:\n  "hard\\n": {pii: true}\n'
        'rules:\n  - {name: "a\\n", route: local}\n',
        [
            "p.yaml:4:3: models.gpt\n: model name 'gpt\\n' is sent in the "
            "x-tiergate-model header: use printable ASCII, no spaces at its ends",
            "p.yaml:6:3: signals.hard\n: signal name 'hard\\n': use lower_snake_case, not a "
            "built-in",
            "p.yaml:8:6: rules[0].name: rule name 'a\\n': use letters, digits, '-', '_', '.'",
        ],
    ),
    (
        "duplicate-rule-name",
        M + "rules:\n  - {name: a, when: {pii: true}, route: local}\n"
        "  - {name: b, when: {pii: true}, route: local}\n  - {name: a, route: closed}\n",
        ["p.yaml:8:6: rules[2].name: duplicate rule name 'a' (first used by rule 0)"],
    ),
    (
        # a rule tried after one that matches every request (no `when`, or `when:` left
        # empty) never decides anything: `policy check` said ok
        "rule-after-a-catch-all",
        M + "rules:\n  - {name: everything, route: local}\n"
        "  - {name: late, when: {pii: true}, route: gpt}\n"
        "  - {name: early, priority: 1, when: {has_tools: true}, route: gpt}\n"
        "tenants:\n  acme:\n    rules:\n      - name: mine\n        when:\n        route: gpt\n"
        "      - {name: theirs, when: {pii: true}, route: local}\n",
        [
            "p.yaml:7:5: rules[1]: rule 'late' can never match: rule 'everything' (rules[0], "
            "priority 0) is tried before it and matches every request; give 'late' a priority "
            "above 0, or a `when` to 'everything'",
            "p.yaml:15:9: tenants.acme.rules[1]: rule 'theirs' can never match: rule 'mine' "
            "(tenants.acme.rules[0], priority 0) is tried before it and matches every request; "
            "give 'theirs' a priority above 0, or a `when` to 'mine'",
        ],
    ),
    (
        # the local_only rules of `rules:` are tried first: no priority lifts another over them
        "rule-after-a-local-only-catch-all",
        M + "rules:\n  - {name: all-local, route: local, local_only: true}\n"
        "  - {name: up, priority: 100, when: {pii: true}, route: gpt}\n",
        [
            "p.yaml:7:5: rules[1]: rule 'up' can never match: rule 'all-local' (rules[0], "
            "priority 0) is tried before it and matches every request; give a `when` to "
            "'all-local'",
        ],
    ),
    (
        # two rules written differently with one meaning (keys in another order, `[x]` for
        # `x`, `ne: true` for `eq: false`): the second never decided anything, and said ok
        "same-condition-written-differently",
        M + "rules:\n  - {name: a, when: {capability: coding, pii: false}, route: local}\n"
        "  - {name: b, when: {all: [{pii: {ne: true}}, {capability: [coding]}]}, route: gpt}\n",
        [
            "p.yaml:7:5: rules[1]: rule 'b' can never match: rule 'a' (rules[0], priority 0) is "
            "tried before it with the same condition; remove one, or give one another `when`",
        ],
    ),
    (
        # a rule tried after a broader one (its condition is part of this one's) never decides
        "narrower-condition-after-a-broader-one",
        M + "signals:\n  private: {pii: true}\nrules:\n"
        "  - {name: any-pii, when: private, route: local}\n"
        "  - {name: pii-code, when: {pii: true, capability: coding}, route: gpt}\n",
        [
            "p.yaml:9:5: rules[1]: rule 'pii-code' can never match: rule 'any-pii' (rules[0], "
            "priority 0) is tried before it and matches every request 'pii-code' would; give "
            "'pii-code' a priority above 0, or a narrower `when` to 'any-pii'",
        ],
    ),
    (
        # turns, token counts and stakes levels are whole numbers: `turns > 2` is `turns >= 3`,
        # and the second rule never decided anything while `policy check` said ok
        "same-condition-by-whole-number-arithmetic",
        M + "rules:\n  - {name: a, when: {turns: {gt: 2}}, route: gpt}\n"
        "  - {name: b, when: {turns: {gte: 3}}, route: local}\n"
        "  - {name: c, when: {stakes: {gt: medium}}, route: gpt}\n"
        "  - {name: d, when: {stakes: high}, route: local}\n",
        [
            "p.yaml:7:5: rules[1]: rule 'b' can never match: rule 'a' (rules[0], priority 0) is "
            "tried before it with the same condition; remove one, or give one another `when`",
            "p.yaml:9:5: rules[3]: rule 'd' can never match: rule 'c' (rules[2], priority 0) is "
            "tried before it with the same condition; remove one, or give one another `when`",
        ],
    ),
    (
        # a narrower range, value or list after a wider one: `score >= 0.6` behind
        # `score >= 0.3` (coding to gpt above 0.6 never happened), `turns == 5` behind
        # `turns >= 3`, `[coding, math]` behind `[coding, math, reasoning]`, and a pii kind
        # behind `pii: true` (a request with a pii kind has pii)
        "narrower-range-after-a-wider-one",
        M + "rules:\n  - {name: a, priority: 9, when: {capability: coding, score: {gte: 0.3}}, "
        "route: gpt}\n"
        "  - {name: b, priority: 8, when: {capability: coding, score: {gte: 0.6}}, route: gpt}\n"
        "  - {name: c, when: {turns: {gte: 3}}, route: gpt}\n"
        "  - {name: d, when: {turns: 5, prompt_tokens: {lt: 100}}, route: local}\n"
        "  - {name: e, when: {capability: [coding, math, reasoning]}, route: local}\n"
        "  - {name: f, when: {capability: {in: [coding, math]}}, route: gpt}\n"
        "  - {name: g, priority: 99, when: {pii: true}, route: local, local_only: true}\n"
        "  - {name: h, priority: 98, when: {pii_kinds: {contains: card}}, route: local, "
        "local_only: true, store_prompts: none}\n",
        [
            "p.yaml:7:5: rules[1]: rule 'b' can never match: rule 'a' (rules[0], priority 9) is "
            "tried before it and matches every request 'b' would; give 'b' a priority above 9, "
            "or a narrower `when` to 'a'",
            "p.yaml:9:5: rules[3]: rule 'd' can never match: rule 'c' (rules[2], priority 0) is "
            "tried before it and matches every request 'd' would; give 'd' a priority above 0, "
            "or a narrower `when` to 'c'",
            "p.yaml:11:5: rules[5]: rule 'f' can never match: rule 'e' (rules[4], priority 0) is "
            "tried before it and matches every request 'f' would; give 'f' a priority above 0, "
            "or a narrower `when` to 'e'",
            "p.yaml:13:5: rules[7]: rule 'h' can never match: rule 'g' (rules[6], priority 99) "
            "is tried before it and matches every request 'h' would; give 'h' a priority above "
            "99, or a narrower `when` to 'g'",
        ],
    ),
    (
        # no whole number lies strictly between 2 and 3
        "whole-number-range-that-is-empty",
        M + "rules:\n  - {name: a, when: {turns: {gt: 2, lt: 3}}, route: gpt}\n",
        [
            "p.yaml:6:22: rules[0].when.turns: can never hold: no request has both turns > 2 "
            "and turns < 3",
        ],
    ),
    (
        # over_budget with no daily_budget_usd (a `monthly_budget_usd` refused, then removed):
        # the file reads as capped, and the tenant's closed spend was unlimited
        "over-budget-without-a-budget",
        M + "tenants:\n  acme:\n    over_budget: reject\n",
        [
            "p.yaml:7:5: tenants.acme.over_budget: over_budget has no effect without "
            "daily_budget_usd: tenant 'acme' has no budget, so its closed spend is unlimited; "
            "set daily_budget_usd (USD per UTC day), or remove over_budget",
        ],
    ),
    (
        # the global local_only rules are tried before a tenant's: a global local_only
        # catch-all decides every request of the tenant, pinned or not, and said ok
        "tenant-rules-behind-a-global-local-only-catch-all",
        M + "rules:\n  - {name: all-local, route: local, local_only: true}\n"
        "tenants:\n  acme:\n    rules:\n"
        "      - {name: mine, priority: 9, when: {pii: true}, route: gpt}\n"
        "      - {name: mine-too, when: {has_tools: true}, route: local, local_only: true}\n",
        [
            "p.yaml:10:9: tenants.acme.rules[0]: rule 'mine' can never match: rule 'all-local' "
            "(rules[0], priority 0) is tried before it and matches every request, as the global "
            "local_only rules are tried before a tenant's own; give a `when` to 'all-local'",
            "p.yaml:11:9: tenants.acme.rules[1]: rule 'mine-too' can never match: rule "
            "'all-local' (rules[0], priority 0) is tried before it and matches every request, as "
            "the global local_only rules are tried before a tenant's own; give a `when` to "
            "'all-local'",
        ],
    ),
    (
        "tenant-rule-with-a-global-local-only-rules-condition",
        M + "rules:\n  - {name: pii, when: {pii: true}, route: local, local_only: true}\n"
        "tenants:\n  acme:\n    rules:\n"
        "      - {name: acme-pii, priority: 5, when: {pii: {eq: true}}, route: gpt}\n",
        [
            "p.yaml:10:9: tenants.acme.rules[0]: rule 'acme-pii' can never match: rule 'pii' "
            "(rules[0], priority 0) is tried before it with the same condition, as the global "
            "local_only rules are tried before a tenant's own; remove one, or give one another "
            "`when`",
        ],
    ),
    (
        # comparisons that exclude each other: the rule (or the branch, or the signal) never
        # matched, and `policy check` said ok; each is reported where the two meet
        "condition-that-can-never-hold",
        M + "signals:\n  long: {prompt_tokens: {gt: 3000}}\n  short: {prompt_tokens: {lte: 1000}}\n"
        "  odd: {all: [{turns: {gte: 3}}, {turns: {lt: 3}}]}\nrules:\n"
        "  - {name: a, when: {prompt_tokens: {gt: 3000, lt: 1000}}, route: gpt}\n"
        "  - {name: b, when: {all: [long, short]}, route: gpt}\n"
        "  - {name: c, when: {any: [{stakes: {gte: high, eq: low}}, {pii: true}]}, route: gpt}\n"
        "  - {name: d, when: {capability: coding, all: [{capability: [math, chat]}]}, route: gpt}\n"
        "  - {name: e, when: {long: true, not: long}, route: gpt}\n",
        [
            "p.yaml:8:9: signals.odd.all: can never hold: no request has both turns >= 3 and "
            "turns < 3",
            "p.yaml:10:22: rules[0].when.prompt_tokens: can never hold: no request has both "
            "prompt_tokens > 3000 and prompt_tokens < 1000",
            "p.yaml:11:22: rules[1].when.all: can never hold: no request has both "
            "prompt_tokens > 3000 and prompt_tokens <= 1000",
            "p.yaml:12:29: rules[2].when.any[0].stakes: can never hold: no request has both "
            "stakes == 'low' and stakes >= 'high'",
            "p.yaml:13:15: rules[3].when: can never hold: no request has both capability == "
            "'coding' and capability in ['chat', 'math']",
            "p.yaml:14:15: rules[4].when: can never hold: no request has both prompt_tokens > "
            "3000 and not prompt_tokens > 3000",
        ],
    ),
    (
        # the fallbacks were `gpt, gpt`: a failed call was retried on the model that failed
        "closed-model-listed-twice",
        M + "closed_models: [gpt, gpt]\n",
        [
            "p.yaml:5:22: closed_models[1]: model 'gpt' is listed twice (first as "
            "closed_models[0]): a call that failed on it would be tried on it again; list each "
            "model once"
        ],
    ),
    (
        "tenant-rule-shadows-global",
        M + "rules:\n  - {name: a, route: local}\ntenants:\n  acme:\n    rules:\n"
        "      - {name: a, route: closed}\n",
        [
            "p.yaml:10:10: tenants.acme.rules[0].name: rule name 'a' is "
            "already used by a global rule"
        ],
    ),
    (
        "reserved-rule-name",
        M + "rules:\n  - {name: default, route: local}\n",
        [
            "p.yaml:6:6: rules[0].name: rule name 'default' is reserved "
            "for the evaluator's own steps"
        ],
    ),
    (
        "local-only-to-closed",
        M + "rules:\n  - {name: a, route: closed, local_only: true}\n",
        [
            "p.yaml:6:30: rules[0].local_only: a local_only rule must "
            "route to local or a local model"
        ],
    ),
    # --- references
    (
        "unknown-route-model",
        M + "rules:\n  - {name: a, route: gpt-5}\n",
        [
            "p.yaml:6:15: rules[0].route: unknown route 'gpt-5', did you mean 'gpt'? "
            "(expected local, closed, auto, cascade or "
            "a model: local, gpt)"
        ],
    ),
    (
        "unknown-model-refs",
        M + "local_model: llama\nclosed_models: [gpt, claude]\n",
        [
            "p.yaml:5:1: local_model: unknown model 'llama' (models: local, gpt)",
            "p.yaml:6:22: closed_models[1]: unknown model 'claude' (models: local, gpt)",
        ],
    ),
    (
        "unknown-named-signal",
        M + "rules:\n  - name: a\n    when: long_context\n    route: local\n",
        ["p.yaml:7:5: rules[0].when.signal: unknown signal 'long_context' (signals: none defined)"],
    ),
    (
        "signal-cycle",
        M + "signals:\n  a: b\n  b: {all: [a]}\n",
        [
            "p.yaml:7:13: signals.b.all[0].signal: signals refer to each "
            "other in a cycle: a -> b -> a"
        ],
    ),
    (
        # Sent in the x-tiergate-model header: beyond Latin-1, every answer it served was a 500.
        "model-name-beyond-ascii",
        'version: 1\nmodels:\n  local: {tier: local}\n  "gpt-\\u6a21": '
        "{tier: closed, litellm_model: openai/gpt-4o}\n",
        [
            "p.yaml:4:3: models.gpt-\u6a21: model name 'gpt-\u6a21' is sent in the "
            "x-tiergate-model header: use printable ASCII, no spaces at its ends"
        ],
    ),
    (
        "closed-needs-litellm",
        "version: 1\nmodels:\n  gpt: {tier: closed}\n",
        ["p.yaml:3:3: models.gpt: a closed model needs litellm_model (e.g. openai/gpt-4o)"],
    ),
    (
        "local-takes-no-tools-or-images",
        "version: 1\nmodels:\n"
        "  local: {tier: local, supports_tools: true, supports_images: true}\n",
        [
            "p.yaml:3:24: models.local.supports_tools: the local tier takes no tools (both "
            "local backends refuse them with a 400): leave it false, so tool requests go closed",
            "p.yaml:3:46: models.local.supports_images: the local tier takes no images (both "
            "local backends refuse them with a 400): leave it false, so image requests go closed",
        ],
    ),
    (
        "route-local-without-local-model",
        "version: 1\nmodels:\n  gpt: {tier: closed, litellm_model: openai/gpt-4o}\n"
        "rules:\n  - {name: a, route: local}\n",
        ["p.yaml:5:15: rules[0].route: route local needs a model with tier local under models"],
    ),
    (
        "unknown-pii-kind",
        M + "rules:\n  - {name: a, route: local, local_only: true, "
        "when: {pii_kinds: {contains: emial}}}\n",
        [
            "p.yaml:6:66: rules[0].when.pii_kinds.contains: unknown pii kind 'emial', did you "
            "mean 'email'? (expected one of email, phone, card, iban, ssn, uk_nino, "
            "cn_resident_id, aadhaar, ip_address)"
        ],
    ),
    # --- aliases
    (
        "alias-both-settings",
        M + "aliases:\n  auto: {threshold: 0.5, target_closed_share: 0.2}\n",
        ["p.yaml:6:3: aliases.auto: set exactly one of threshold, target_closed_share or cascade"],
    ),
    (
        "alias-no-setting",
        M + "aliases:\n  auto-cheap: {}\n",
        [
            "p.yaml:6:3: aliases.auto-cheap: set exactly one of threshold, target_closed_share "
            "or cascade"
        ],
    ),
    (
        # checked ok, then every request for the alias failed: AssertionError, a 500
        "cascade-alias-without-a-local-model",
        "version: 1\nmodels:\n  gpt: {tier: closed, litellm_model: openai/gpt-4o}\n"
        "aliases:\n  auto-cascade: {cascade: true}\n"
        "tenants:\n  acme:\n    aliases:\n      auto: {cascade: true}\n",
        [
            "p.yaml:5:18: aliases.auto-cascade.cascade: a cascade starts on the local model: "
            "add a model with tier local under models, or give this alias a threshold",
            "p.yaml:9:14: tenants.acme.aliases.auto.cascade: a cascade starts on the local "
            "model: add a model with tier local under models, or give this alias a threshold",
        ],
    ),
    (
        "alias-named-like-model",
        M + "aliases:\n  gpt: {threshold: 0.5}\n",
        ["p.yaml:6:3: aliases.gpt: alias 'gpt' has the name of a model; pick another"],
    ),
    (
        "model-named-like-the-implicit-auto-alias",
        "version: 1\nmodels:\n  local: {tier: local}\n"
        "  auto: {tier: closed, litellm_model: openai/gpt-4o}\n",
        [
            "p.yaml:4:3: models.auto: model 'auto' has the name of the alias every policy has; "
            "pick another"
        ],
    ),
]


@pytest.mark.parametrize(("text", "expected"), [c[1:] for c in CORPUS], ids=[c[0] for c in CORPUS])
def test_broken_policy_message(text: str, expected: list[str]) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    assert [str(issue) for issue in caught.value.issues] == expected


def test_rules_that_can_still_match_are_taken() -> None:
    """Not dead: `any: []` (a rule switched off), a narrower rule tried before a broader one,
    a tenant's rule behind a global catch-all that is not local_only (the tenant's come first),
    and a local_only rule behind a catch-all that is not (a pinned request skips that one)."""
    p = parse_policy(
        M + "rules:\n  - {name: switched-off, when: {any: []}, route: gpt}\n"
        "  - {name: narrow, priority: 2, when: {pii: true, capability: coding}, route: gpt}\n"
        "  - {name: broad, when: {pii: true}, route: local}\n"
        "  - {name: everything, priority: -1, route: gpt}\n"
        "tenants:\n  acme:\n    rules:\n      - {name: t-all, route: gpt}\n"
        "      - {name: t-pii, when: {pii: {ne: false}}, route: local, local_only: true}\n"
    )
    pii_code = {"pii": True, "capability": "coding"}
    assert evaluate(p, Signals(alias="auto", **pii_code)).rule == "narrow"
    assert evaluate(p, Signals(alias="auto", pii=True)).rule == "broad"
    assert evaluate(p, Signals(alias="auto", tenant="acme", pii=True)).rule == "t-all"
    assert evaluate(p, Signals(alias="gpt", tenant="acme", pii=True)).rule == "t-pii"


def test_a_wider_rule_after_a_narrower_one_is_taken() -> None:
    """The other way round is sound: `score >= 0.6` first, then `score >= 0.3`; `turns: 5`
    first, then `turns >= 3`; a pii kind first, then `pii`."""
    p = parse_policy(
        M + "rules:\n  - {name: high, priority: 2, when: {score: {gte: 0.6}}, route: gpt}\n"
        "  - {name: mid, priority: 1, when: {score: {gte: 0.3}}, route: local}\n"
        "  - {name: five, when: {turns: 5}, route: gpt}\n"
        "  - {name: many, when: {turns: {gte: 3}}, route: local}\n"
        "  - {name: card, priority: 9, when: {pii_kinds: {contains: card}}, route: local, "
        "local_only: true}\n"
        "  - {name: pii, priority: 8, when: {pii: true}, route: local, local_only: true}\n"
    )
    assert evaluate(p, Signals(alias="auto", score=0.7)).rule == "high"
    assert evaluate(p, Signals(alias="auto", score=0.4)).rule == "mid"
    assert evaluate(p, Signals(alias="auto", score=0.1, turns=4)).rule == "many"
    assert evaluate(p, Signals(alias="auto", pii=True, pii_kinds=("card",))).rule == "card"
    assert evaluate(p, Signals(alias="auto", pii=True, pii_kinds=("email",))).rule == "pii"


@pytest.mark.parametrize(
    "when",
    [
        "{turns: {gte: 3, lte: 3}}",  # one value is enough
        "{stakes: {gte: medium, eq: high}}",
        "{capability: {in: [coding, math], ne: math}}",
        "{all: [{metadata.n: true}, {metadata.n: {ne: 1}}]}",  # true is not 1 in metadata
        "{all: [{metadata.n: {gt: 3}}, {metadata.n: {lt: 4}}]}",  # 3.5
        "{turns: {gt: 2, lt: 4}}",  # 3
        "{prompt_tokens: {gt: 2.5, lt: 3.5}}",  # 3
        "{score: {gt: 0.5, lt: 0.500001}}",  # a score is no whole number
        "{all: [{header: {name: x-tiergate-n, gt: 2}}, {header: {name: x-tiergate-n, lt: 3}}]}",
        "{header: {name: x-tiergate-a, eq: x}, all: [{header: {name: x-tiergate-b, eq: y}}]}",
    ],
)
def test_conditions_that_can_hold_are_taken(when: str) -> None:
    p = parse_policy(M + f"rules:\n  - {{name: r, when: {when}, route: gpt}}\n")
    assert p.rules[0].name == "r"


@pytest.mark.parametrize("depth", [400, 5000])
def test_a_policy_nested_too_deeply_is_a_policy_error_not_a_traceback(depth: int) -> None:
    # `policy check` printed a RecursionError traceback, and a hot reload logged one each poll.
    when = "{not: " * depth + "{pii: true}" + "}" * depth
    text = f"version: 1\nrules:\n  - {{name: r, route: local, when: {when}}}\n"
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    assert [str(i) for i in caught.value.issues] == [
        "p.yaml: nested too deeply to read (a condition or list hundreds of levels deep): "
        "flatten it, for example with named signals"
    ]


def test_every_problem_in_a_file_is_listed_with_its_line() -> None:
    path = BROKEN / "several-problems.yaml"
    with pytest.raises(PolicyError) as caught:
        load_policy(path)
    assert [(i.line, i.column, i.path) for i in caught.value.issues] == [
        (12, 7, "rules[0].when.capability"),
        (15, 5, "rules[1].priority"),
        (21, 5, "rules[2].colour"),
    ]
    assert all(issue.source == str(path) for issue in caught.value.issues)
    assert str(caught.value).startswith("invalid policy: 3 problems\n  " + str(path) + ":12:7: ")


def test_reference_problems_are_all_listed() -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(BROKEN / "bad-references.yaml")
    assert [f"{i.line}:{i.column} {i.path}: {i.message}" for i in caught.value.issues] == [
        "5:25 closed_models[1]: unknown model 'claude-sonnet' (models: local, gpt-4o)",
        "10:5 rules[0].when.signal: unknown signal 'long_contxt', did you mean 'long_context'? "
        "(signals: long_context)",
        "13:12 rules[1].when.capability.eq: unknown capability 'cooding', did you mean "
        "'coding'? (expected one of coding, math, reasoning, extraction, summarization, "
        "knowledge_qa, creative_writing, roleplay, chat)",
        "14:5 rules[1].route: unknown route 'gpt-5' (expected local, closed, auto, cascade or a "
        "model: local, gpt-4o)",
        "15:5 rules[2].name: duplicate rule name 'long' (first used by rule 0)",
    ]


def test_unreadable_file() -> None:
    with pytest.raises(PolicyError) as caught:
        load_policy(BROKEN / "does-not-exist.yaml")
    (issue,) = caught.value.issues
    assert issue.line is None and issue.message.startswith("cannot read: ")
    assert str(issue).startswith(str(BROKEN / "does-not-exist.yaml") + ": cannot read: ")


def test_policy_error_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_policy("version: 1\nmodels: {}\n")
    assert caught.value.code == "policy_error"
    assert str(caught.value) == (
        "invalid policy: 1 problem\n  <string>:2:1: models: define at least one model"
    )


_BOMB = "version: 1\na: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]\n" for i in range(8)
)  # nine levels of ten: 10**9 strings once expanded


def test_yaml_aliases_are_refused_where_they_are_written() -> None:
    """Aliases let a few hundred bytes expand to gigabytes (an "alias bomb"); a policy needs
    none, so the first one is refused, located, before anything is expanded."""
    with pytest.raises(PolicyError) as caught:
        parse_policy(_BOMB, "p.yaml")
    (issue,) = caught.value.issues
    assert (issue.line, issue.column) == (3, 8)
    assert "alias" in issue.message and "*a" in issue.message
    small = M + "rules:\n  - &r {name: a, route: local}\n  - *r\n"
    with pytest.raises(PolicyError) as caught:
        parse_policy(small, "p.yaml")
    assert [str(i) for i in caught.value.issues] == [
        "p.yaml:7:5: YAML aliases are not allowed in a policy (*r): write the value out"
    ]


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_shipped_policies_parse(path: Path) -> None:
    p = load_policy(path)
    assert p.source == str(path) and "auto" in p.alias_names()
    assert p.warnings == ()  # a policy we ship is what we say to write
    assert isinstance(evaluate(p, Signals(alias="auto")), Decision)


def test_shipped_policies_exist() -> None:
    names = {p.name for p in SHIPPED}
    assert {"default.yaml", "privacy-first.yaml", "cost-capped.yaml", "quality-first.yaml"} <= names


DOC_HEAD = """\
version: 1
models:
  local: {tier: local, context_window: 8192}
  gpt-4o: {tier: closed, litellm_model: openai/gpt-4o}
  claude-sonnet: {tier: closed, litellm_model: anthropic/claude-3-5-sonnet-20241022}
"""


def _doc_examples() -> list[str]:
    doc = (ROOT / "docs/policy.md").read_text(encoding="utf-8")
    return re.findall(r"```yaml\n(.*?)```", doc, re.S)


@pytest.mark.parametrize("block", _doc_examples(), ids=lambda b: b.splitlines()[0])
def test_doc_examples_parse(block: str) -> None:
    # fragments are checked inside a minimal policy that defines the models they name
    if block.startswith("version"):
        text = block
    elif block.startswith("models:"):
        text = "version: 1\n" + block
    elif block.startswith("when:"):
        text = DOC_HEAD + "rules:\n  - name: r\n    route: local\n" + textwrap.indent(block, "    ")
    else:
        text = DOC_HEAD + block
    parse_policy(text)


def test_a_global_rule_that_some_tenant_reaches_is_no_warning() -> None:
    """Only a global rule that every tenant under `tenants` hides is warned of: here globex,
    which has no rules of its own, still reaches `images`."""
    text = (
        M + "rules:\n  - {name: images, when: {has_images: true}, route: gpt}\n"
        "tenants:\n  acme:\n    rules:\n      - {name: acme-all, route: gpt}\n"
    )
    assert [i.path for i in parse_policy(text).warnings] == ["rules[0]"]
    assert parse_policy(text + "  globex: {daily_budget_usd: 1}\n").warnings == ()


STRICT = "on_failure: error\nqueue_full: reject\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(
            M + "rules:\n  - {name: pii-local, when: {pii: true}, route: local}\n",
            "p.yaml:6:5: rules[0]: rule 'pii-local' routes personal data local but is not "
            "local_only: such a request goes to a closed model when the local model fails "
            "(on_failure: closed), when the local queue is full (queue_full: spill), when the "
            "local model cannot take it (images, tools, n > 1), or when the request names a "
            "closed model (a pin skips all but local_only rules); to keep it local (served there "
            "or an error, never sent out), add `local_only: true` to the rule",
            id="local",
        ),
        pytest.param(
            M + "rules:\n  - {name: pii-cascade, when: {pii: true}, route: cascade}\n",
            "p.yaml:6:5: rules[0]: rule 'pii-cascade' sends personal data to a cascade: such a "
            "request goes to a closed model when the cascade doubts the local answer, or the "
            "local model fails or its queue is full (it escalates, whatever on_failure and "
            "queue_full say), when the local model cannot take it (images, tools, n > 1), or "
            "when the request names a closed model (a pin skips all but local_only rules); to "
            "keep it local (served there or an error, never sent out), route the rule `local` "
            "with `local_only: true` (a cascade cannot be local_only)",
            id="cascade",
        ),
        pytest.param(
            M + STRICT + "rules:\n  - {name: pii-auto, when: {pii: true}, route: auto}\n",
            "p.yaml:8:5: rules[0]: rule 'pii-auto' routes personal data by its score (route: "
            "auto): such a request goes to a closed model when its score reaches the threshold "
            "of the alias the request names, when the local model cannot take it (images, "
            "tools, n > 1), or when the request names a closed model (a pin skips all but "
            "local_only rules); to keep it local (served there or an error, never sent out), "
            "route the rule `local` with `local_only: true`",
            id="auto",
        ),
    ],
)
def test_a_personal_data_rule_that_lets_it_out_is_warned_of_with_the_fix(
    text: str, message: str
) -> None:
    """`{when: {pii: true}, route: local}` without `local_only` reads as "personal data stays
    local", but a closed model still serves such a request when the local model fails, its
    queue is full, it cannot take the request or the request names a closed model
    (tests/test_privacy.py shows each). A cascade escalates a doubtful local answer, prompt and
    all, and `route: auto` sends a high score closed: neither was warned of. Valid, so a
    warning that says what can happen and the fix (a cascade cannot be local_only)."""
    (warning,) = parse_policy(text, "p.yaml").warnings
    assert str(warning) == message


def test_the_personal_data_warning_names_only_the_ways_out_the_policy_leaves_open() -> None:
    rule = "rules:\n  - {name: r, when: {pii: true}, route: local}\n"
    windowed = M.replace("{tier: local}", "{tier: local, context_window: 4096}")
    (warning,) = parse_policy(windowed + STRICT + rule).warnings
    # Not "a prompt over its window": one that fits but leaves less than the least answer
    # (or the max_tokens asked) is refused too (policy.why_unfit).
    assert (
        "goes to a closed model when the local model cannot take it (images, tools, n > 1, a "
        "prompt that leaves its context window no room for the answer), or when the request "
        "names" in warning.message
    )
    # An alias that cascades makes `auto` a cascade for the requests that name it.
    auto = rule.replace("route: local", "route: auto") + "aliases:\n  deep: {cascade: true}\n"
    (warning,) = parse_policy(M + STRICT + auto).warnings
    assert (
        "alias the request names, when the request names an alias that cascades (deep) "
        "and the cascade escalates, when the local model cannot" in warning.message
    )


@pytest.mark.parametrize("route", ["local", "cascade", "auto"])
def test_the_personal_data_warning_names_shadow_judging(route: str) -> None:
    """A request such a rule leaves on the local model may be shadow-judged: the default
    closed model answers it too, prompt and all (router.learning; only local_only is never
    shadowed). With on_failure: error and queue_full: reject the warning named the other ways
    out but not this one. A rule's own shadow rate is the one that counts."""
    rule = f"rules:\n  - {{name: r, when: {{pii: true}}, route: {route}}}\n"
    shadowed = M + STRICT + "shadow: {sample_rate: 0.1}\n"
    (warning,) = parse_policy(shadowed + rule).warnings
    assert "when it is shadow-judged (shadow sample_rate 0.1)" in warning.message
    unshadowed = rule.replace("}\n", ", shadow: {sample_rate: 0}}\n")
    (warning,) = parse_policy(shadowed + unshadowed).warnings
    assert "shadow" not in warning.message
    own = rule.replace("}\n", ", shadow: {sample_rate: 0.25}}\n")
    (warning,) = parse_policy(M + STRICT + own).warnings
    assert "when it is shadow-judged (shadow sample_rate 0.25), when the local" in warning.message


LOCAL, CASCADE, AUTO = "local but is not local_only", "to a cascade", "by its score (route: auto)"


@pytest.mark.parametrize(
    ("rules", "says"),
    [
        ("rules:\n  - {name: r, when: {pii_kinds: {contains: email}}, route: local}\n", LOCAL),
        ("rules:\n  - {name: r, when: {pii: {ne: false}, turns: {gt: 1}}, route: local}\n", LOCAL),
        (
            "rules:\n  - {name: r, when: {not: {pii: false}}, route: local, on_failure: closed}\n",
            LOCAL,
        ),
        (
            "signals:\n  personal: {any: [{pii: true}, {metadata.private: true}]}\n"
            "rules:\n  - {name: r, when: personal, route: local}\n",
            LOCAL,
        ),
        (
            "tenants:\n  acme:\n    rules:\n      - {name: r, when: {pii: true}, route: local}\n",
            LOCAL,
        ),
        ("rules:\n  - {name: r, when: {pii_kinds: {contains: email}}, route: cascade}\n", CASCADE),
        (
            "signals:\n  personal: {pii: true}\n"
            "rules:\n  - {name: r, when: personal, route: auto}\n",
            AUTO,
        ),
        (
            "tenants:\n  acme:\n    rules:\n      - {name: r, when: {pii: true}, route: cascade}\n",
            CASCADE,
        ),
    ],
    ids=[
        "pii_kinds",
        "pii-among-others",
        "not-pii-false",
        "named-signal",
        "tenant-rule",
        "cascade",
        "auto",
        "tenant-cascade",
    ],
)
def test_every_personal_data_rule_that_can_send_it_out_is_warned_of(rules: str, says: str) -> None:
    (warning,) = parse_policy(M + rules).warnings
    assert warning.message.startswith("rule 'r' ") and f"personal data {says}: " in warning.message


def test_a_tenant_rule_names_the_cascading_aliases_in_force_for_its_tenant() -> None:
    """`route: auto` cascades under an alias that cascades: a tenant's rule is told of those
    in force for its tenant (its own override of a global one included), a global rule of
    any tenant's as well (it serves them all)."""
    text = (
        M + "aliases:\n  deep: {cascade: true}\n  wide: {cascade: true}\n"
        "rules:\n  - {name: g, when: {pii: true}, route: auto}\n"
        "tenants:\n  acme:\n    aliases:\n      wide: {threshold: 0.5}\n"
        "      own: {cascade: true}\n    rules:\n"
        "      - {name: t, when: {pii: true, turns: {gt: 1}}, route: auto}\n"
    )
    messages = {w.path: w.message for w in parse_policy(text).warnings}
    assert len(messages) == 2
    assert "alias that cascades (deep, own, wide)" in messages["rules[0]"]
    assert "alias that cascades (deep, own)" in messages["tenants.acme.rules[0]"]


def test_no_rule_is_warned_of_behind_a_local_only_rule_that_keeps_all_personal_data() -> None:
    """The global local_only rules are tried first, for every tenant and for a request that
    pins a model: once one holds for every request with personal data, no other rule sees
    any, wherever it routes. Each later rule that also takes personal data among other
    requests (a global one, a tenant's) was warned of all the same."""
    keep = "rules:\n  - {name: keep, when: {pii: true}, route: local, local_only: true}\n"
    later = "  - {name: r, when: {any: [{pii: true}, {turns: {gt: 3}}]}, route: cascade}\n"
    own = "tenants:\n  acme:\n    rules:\n" + textwrap.indent(later, "    ")
    own = own.replace("name: r,", "name: t,").replace("gt: 3", "gt: 5")
    assert parse_policy(M + keep + later + own).warnings == ()
    # A local_only rule for one kind of personal data leaves the other kinds to them.
    some = keep.replace("{pii: true}", "{pii_kinds: {contains: email}}")
    warned = parse_policy(M + some + later + own).warnings
    assert [w.path for w in warned] == ["rules[1]", "tenants.acme.rules[0]"]


@pytest.mark.parametrize(
    "text",
    [
        M + "rules:\n  - {name: r, when: {pii: true}, route: local, local_only: true}\n",
        M + "rules:\n  - {name: r, when: {pii: false}, route: local}\n",
        M + "rules:\n  - {name: r, when: {not: {pii: true}}, route: local}\n",
        M + "rules:\n  - {name: r, when: {pii_kinds: {not_in: [email]}}, route: local}\n",
        M + "rules:\n  - {name: r, when: {pii: true}, route: gpt}\n",
        "version: 1\nmodels:\n  local: {tier: local}\n"
        "rules:\n  - {name: r, when: {pii: true}, route: local}\n",
        M + "rules:\n  - {name: r, when: {pii: true}, route: closed}\n",
        M + "rules:\n  - {name: r, when: {pii: false}, route: cascade}\n",
        M + "rules:\n  - {name: r, route: auto}\n",
        "version: 1\nmodels:\n  gpt: {tier: closed, litellm_model: openai/gpt-4o}\n"
        "rules:\n  - {name: r, when: {pii: true}, route: auto}\n",
    ],
    ids=[
        "local_only",
        "pii-false",
        "not-pii",
        "pii_kinds-not_in",
        "routes-closed",
        "no-closed",
        "route-closed",
        "cascade-without-pii",
        "auto-for-all",
        "no-local",
    ],
)
def test_a_rule_that_cannot_send_personal_data_out_is_no_warning(text: str) -> None:
    """A local_only rule, one for requests without personal data, one that routes it closed
    on purpose, a catch-all that does not single it out, and a policy with only one tier."""
    assert parse_policy(text).warnings == ()
