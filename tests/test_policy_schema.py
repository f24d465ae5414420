"""``tiergate policy schema``: the JSON Schema an editor checks a policy file against.

An editor must accept every policy the loader accepts (shorthands included) and should flag what
the loader rejects for its shape: unknown keys, operators and values. The shipped policies, the
documented examples, a table of edge cases and generated conditions are each checked with both.
"""

from __future__ import annotations

import functools
import json
import textwrap
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from router.cli import main
from router.errors import PolicyError
from router.policy import OPERATORS
from router.policy_compile import parse_policy
from router.policy_schema import policy_json_schema
from tests.test_policy_compile import DOC_HEAD, _doc_examples

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(
    [
        *ROOT.glob("policies/*.yaml"),
        *ROOT.glob("policies/examples/*.yaml"),
        *ROOT.glob("helm/tiergate/policies/**/*.yaml"),
    ]
)


@functools.cache
def _validator() -> jsonschema.Draft202012Validator:
    schema = policy_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    # The format checker makes `matches:` values compile as regular expressions, as the loader
    # requires (editors that check formats do the same).
    return jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    )


def schema_errors(text: str) -> list[str]:
    data = yaml.safe_load(text)
    return [f"{e.json_path}: {e.message}" for e in _validator().iter_errors(data)]


def loader_accepts(text: str, *, shape_only: bool = False) -> bool:
    """Whether the loader takes ``text``; ``shape_only``: or refuses it only for a condition
    that can never hold (``{gt: 5, lt: 2}``), which no schema can express."""
    try:
        parse_policy(text)
    except PolicyError as exc:
        never = all(i.message.startswith("can never hold: ") for i in exc.issues)
        return shape_only and never
    return True


# --------------------------------------------------------------------------- shipped files


def test_every_shipped_copy_is_found() -> None:
    names = {str(p.relative_to(ROOT)) for p in SHIPPED}
    assert {
        "policies/default.yaml",
        "policies/examples/cost-capped.yaml",
        "helm/tiergate/policies/default.yaml",
        "helm/tiergate/policies/examples/privacy-first.yaml",
    } <= names
    assert len(SHIPPED) == 8


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_policy_validates(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    assert loader_accepts(text)
    assert schema_errors(text) == []


def test_cli_schema_validates_the_default_policy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["policy", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema == policy_json_schema()
    data = yaml.safe_load((ROOT / "policies/default.yaml").read_text(encoding="utf-8"))
    jsonschema.validate(data, schema, cls=jsonschema.Draft202012Validator)


# --------------------------------------------------------------------------- docs/policy.md


def _doc_policies() -> list[str]:
    # Fragments are placed in a minimal policy that defines the models they name, as in
    # tests/test_policy_compile.py::test_doc_examples_parse.
    out = []
    for block in _doc_examples():
        if block.startswith("version"):
            out.append(block)
        elif block.startswith("models:"):
            out.append("version: 1\n" + block)
        elif block.startswith("when:"):
            rule = "rules:\n  - name: r\n    route: local\n" + textwrap.indent(block, "    ")
            out.append(DOC_HEAD + rule)
        else:
            out.append(DOC_HEAD + block)
    return out


DOC_POLICIES = _doc_policies()


def test_docs_have_policy_examples() -> None:
    assert len(DOC_POLICIES) >= 8 and DOC_POLICIES[0].startswith("version: 1")


@pytest.mark.parametrize("text", DOC_POLICIES, ids=[f"block{i}" for i in range(len(DOC_POLICIES))])
def test_documented_policy_validates(text: str) -> None:
    assert loader_accepts(text)
    assert schema_errors(text) == []


# --------------------------------------------------------------------------- edge cases

HEAD = """\
version: 1
models:
  local: {tier: local}
  gpt: {tier: closed, litellm_model: openai/gpt-4o}
signals:
  long_context: {prompt_tokens: {gt: 6000}}
"""


def when(condition: str) -> str:
    return HEAD + f"rules:\n  - {{name: r, route: local, when: {condition}}}\n"


def local_model(spec: str) -> str:
    return HEAD.replace("local: {tier: local}", f"local: {{{spec}}}")


# (id, policy text, whether the loader accepts it): the schema must agree on each.
CASES: list[tuple[str, str, bool]] = [
    # shorthands and defaults
    ("supports-defaults", HEAD, True),
    ("supports-explicit", local_model("tier: local, supports_tools: false"), True),
    ("integer-threshold", HEAD + "threshold: 1\n", True),
    ("bare-bool", when("{pii: true}"), True),
    ("bare-value", when("{capability: coding}"), True),
    ("bare-list", when("{capability: [coding, math]}"), True),
    ("bare-signal", when("long_context"), True),
    ("signal-key", when("{signal: long_context}"), True),
    ("signal-as-bool", when("{long_context: false}"), True),
    ("signal-in-combinators", when("{any: [long_context, {not: long_context}]}"), True),
    ("metadata-scalar", when("{metadata.team: legal}"), True),
    ("metadata-list", when("{metadata.data_class: [confidential, restricted]}"), True),
    ("metadata-nested", when("{metadata.team.name: {matches: '^se'}}"), True),
    ("header", when("{header: {name: x-tiergate-stakes, eq: high}}"), True),
    ("eq-null", when("{capability: {eq: null}}"), True),
    ("null-means-absent", when("{pii_kinds: null, header: null, signal: null}"), True),
    ("stakes-order", when("{stakes: {gte: medium}}"), True),
    ("list-contains", when("{pii_kinds: {contains: email}}"), True),
    ("empty-when", when("{}"), True),
    ("null-when", when("null"), True),
    ("retention-forever", HEAD + "retention_days: null\n", True),
    ("encoder-off", HEAD + "encoder: false\n", True),
    ("alias-share", HEAD + "aliases: {auto-cheap: {target_closed_share: 0.2}}\n", True),
    ("alias-one-null", HEAD + "aliases: {a: {threshold: 0.1, target_closed_share: null}}\n", True),
    (
        "tenant",
        HEAD + "tenants: {acme: {rules: [{name: t, route: gpt}], daily_budget_usd: 5, "
        "over_budget: reject}}\n",
        True,
    ),
    # the cap over_budget reads as having is not there: the tenant's spend is unlimited
    ("over-budget-without-a-budget", HEAD + "tenants: {acme: {over_budget: reject}}\n", False),
    (
        "over-budget-with-a-null-budget",
        HEAD + "tenants: {acme: {daily_budget_usd: null, over_budget: local}}\n",
        False,
    ),
    ("model-name-matches-key", local_model("tier: local, name: local"), True),
    ("output-limit", HEAD.replace("gpt-4o}", "gpt-4o, max_output_tokens: 16384}"), True),
    ("output-limit-zero", HEAD.replace("gpt-4o}", "gpt-4o, max_output_tokens: 0}"), False),
    ("output-limit-as-text", HEAD.replace("gpt-4o}", "gpt-4o, max_output_tokens: '16k'}"), False),
    # what the loader rejects for its shape
    ("unknown-top-level-key", HEAD + "colour: blue\n", False),
    ("unknown-model-key", local_model("tier: local, gpu: true"), False),
    ("unknown-rule-key", HEAD + "rules: [{name: r, route: local, colour: red}]\n", False),
    ("unknown-operator", when("{capability: {equals: coding}}"), False),
    ("wrong-type-threshold", HEAD + "threshold: high\n", False),
    ("wrong-type-encoder", HEAD + "encoder: 'false'\n", False),
    ("encoder-not-a-number", HEAD + "encoder: 0\n", False),
    ("encoder-not-null", HEAD + "encoder: null\n", False),
    ("wrong-type-priority", HEAD + "rules: [{name: r, route: local, priority: high}]\n", False),
    ("wrong-type-supports", local_model("tier: local, supports_tools: 1"), False),
    ("threshold-out-of-range", HEAD + "threshold: 1.5\n", False),
    ("bad-tier", local_model("tier: edge"), False),
    ("missing-version", HEAD.replace("version: 1\n", ""), False),
    ("missing-tier", local_model("context_window: 10"), False),
    ("missing-route", HEAD + "rules: [{name: r}]\n", False),
    ("operator-not-for-signal", when("{pii: {gt: 1}}"), False),
    ("list-not-for-bool", when("{pii: [true]}"), False),
    ("bare-value-not-for-list", when("{pii_kinds: ssn}"), False),
    ("unknown-capability", when("{capability: codng}"), False),
    ("unknown-pii-kind", when("{pii_kinds: {contains: emial}}"), False),
    ("unknown-stakes", when("{stakes: {gte: 2}}"), False),
    ("number-as-text", when("{turns: {gte: '2'}}"), False),
    ("score-bounds", when("{score: {gte: 0, lt: 1}, local_accuracy: [0.5, 1]}"), True),
    ("score-as-percentage", when("{score: {gte: 70}}"), False),
    ("local-accuracy-over-one", when("{local_accuracy: [0.5, 1.5]}"), False),
    ("score-negative", when("{score: {ne: -0.1}}"), False),
    ("no-operator", when("{turns: {}}"), False),
    ("header-without-name", when("{header: {eq: high}}"), False),
    ("header-without-operator", when("{header: {name: x-tiergate-a}}"), False),
    ("header-the-proxy-never-passes", when("{header: {name: x-team, eq: legal}}"), False),
    ("header-name-case-free", when("{header: {name: X-Tiergate-Team, eq: legal}}"), True),
    ("header-shorthand", when("{header: high}"), False),
    ("bad-regex", when("{alias: {matches: '('}}"), False),
    ("in-null", when("{turns: {in: null}}"), False),
    ("matches-null", when("{alias: {matches: null}}"), False),
    ("signal-compared-to-number", when("{long_context: 1}"), False),
    ("bool-compared-to-number", when("{pii: {eq: 1}}"), False),
    ("header-name-not-text", when("{header: {name: 5, eq: high}}"), False),
    ("header-value-not-text", when("{header: {name: x-tiergate-private, eq: true}}"), False),
    ("header-value-quoted", when("{header: {name: x-tiergate-private, eq: 'true'}}"), True),
    ("header-order-number", when("{header: {name: x-tiergate-n, gte: 2}}"), True),
    ("metadata-without-field", when("{metadata.: x}"), False),
    ("condition-not-a-mapping", when("5"), False),
    ("bad-signal-name", HEAD + "  Long-Context: {pii: true}\n", False),
    ("signal-named-like-builtin", HEAD + "  pii: {pii: true}\n", False),
    ("reserved-rule-name", HEAD + "rules: [{name: default, route: local}]\n", False),
    ("bad-rule-name", HEAD + "rules: [{name: 'my rule', route: local}]\n", False),
    ("bad-alias-name", HEAD + "aliases: {'auto best': {threshold: 0.1}}\n", False),
    ("alias-both", HEAD + "aliases: {a: {threshold: 0.1, target_closed_share: 0.2}}\n", False),
    ("alias-neither", HEAD + "aliases: {a: {description: none set}}\n", False),
]


@pytest.mark.parametrize(("text", "accepted"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_schema_agrees_with_loader(text: str, accepted: bool) -> None:
    assert loader_accepts(text) is accepted
    errors = schema_errors(text)
    assert (errors == []) is accepted, errors


def test_a_bad_null_value_is_a_located_error_not_a_crash() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(when("{turns: {not_in: null}, alias: {matches: null}}"))
    text = str(info.value)
    assert "turns not_in: expected a list, got null" in text
    assert "alias matches: expected a regular expression, got null" in text


# --------------------------------------------------------------------------- generated conditions

SCALARS = st.sampled_from(
    [None, True, False, 0, 3, 2.5, "coding", "math", "high", "low", "acme", "^a", "(", "x-h"]
)
VALUES = st.one_of(SCALARS, st.lists(SCALARS, max_size=2))
OPERATOR_MAPS = st.dictionaries(st.sampled_from([*OPERATORS, "name", "equals"]), VALUES, max_size=2)
HEADERS = st.builds(
    lambda name, ops: {**name, **ops},
    st.fixed_dictionaries(
        {}, optional={"name": st.sampled_from(["x-tiergate-h", "X-Tiergate-H", "x-h", 5])}
    ),
    OPERATOR_MAPS,
)
KEYS = [
    *("capability", "stakes", "pii", "pii_kinds", "prompt_tokens", "max_tokens", "has_images"),
    *("has_tools", "turns", "score", "tenant", "alias", "header"),
    *("metadata.team", "metadata.", "long_context", "Long_context"),
]
ENTRIES = st.one_of(
    st.tuples(st.sampled_from(KEYS), st.one_of(VALUES, OPERATOR_MAPS)),
    st.tuples(st.just("header"), HEADERS),
)
LEAVES = st.one_of(
    st.sampled_from(["long_context", "Long_context", "pii", "long-context"]),
    st.lists(ENTRIES, max_size=2).map(dict),
)


def _with_combinators(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    combinators = st.fixed_dictionaries(
        {},
        optional={
            "all": st.one_of(st.lists(inner, max_size=3), st.none(), inner),
            "any": st.lists(inner, max_size=3),
            "not": st.one_of(inner, st.none()),
            "signal": st.sampled_from(["long_context", "pii", None, 5]),
        },
    )
    return st.one_of(inner, st.builds(lambda a, b: {**a, **b}, LEAVES.filter(_is_map), combinators))


def _is_map(value: Any) -> bool:
    return isinstance(value, dict)


CONDITIONS = st.recursive(LEAVES, _with_combinators, max_leaves=8)


@settings(max_examples=400, deadline=None, database=None, derandomize=True)
@given(condition=CONDITIONS)
def test_schema_agrees_with_loader_on_generated_conditions(condition: Any) -> None:
    # Every signal a condition names here is defined, so only its shape decides: the loader and
    # the schema must give the same answer.
    text = HEAD + yaml.safe_dump({"rules": [{"name": "r", "route": "local", "when": condition}]})
    errors = schema_errors(text)
    assert (errors == []) is loader_accepts(text, shape_only=True), errors


def test_json_schema_names_operators() -> None:
    schema = json.dumps(policy_json_schema())
    assert '"not_in"' in schema and '"target_closed_share"' in schema


def test_schema_takes_a_cascade_alias_as_one_setting() -> None:
    head = "version: 1\nmodels:\n  l: {tier: local}\n  c: {tier: closed, litellm_model: openai/x}\n"
    ok = head + "aliases:\n  auto-cascade: {cascade: true}\n"
    both = head + "aliases:\n  auto-cascade: {cascade: true, threshold: 0.3}\n"
    assert loader_accepts(ok) and schema_errors(ok) == []
    assert not loader_accepts(both) and schema_errors(both) != []
