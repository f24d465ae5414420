"""The JSON Schema of a policy file, for editors and ``tiergate policy schema``.

pydantic describes the models; what the validators and the checker accept beyond that is added
here from the checker's own tables, so the schema and the loader cannot drift apart.
"""

from __future__ import annotations

from typing import Any, get_args

from router.pii import PII_KINDS
from router.policy import OPERATORS, POLICY_HEADER_PREFIX, RESERVED_RULES, Policy
from router.policy_compile import (
    BUILTIN_SIGNALS,
    CONDITION_KEYS,
    KIND_OPERATORS,
    NAME,
    ORDER,
    SIGNAL_NAME,
    Kind,
)
from router.scoring import CAPABILITIES, STAKES

__all__ = ["policy_json_schema"]


def policy_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a policy file, for editors and ``tiergate policy schema``.

    It accepts what the loader accepts, shorthands included. pydantic describes the models; what
    the validators and the checker shape themselves is described here from the same tables:
    model defaults by tier, ``when: long_context``, ``pii: true``, ``capability: [coding, math]``,
    ``metadata.team: legal``, the operators and values each signal takes, and the names of
    signals, rules and aliases. What needs the whole file (unknown models, routes and signals,
    cycles, duplicate names) is left to ``tiergate policy check``.
    """
    schema = Policy.model_json_schema(by_alias=True)
    defs: dict[str, Any] = schema["$defs"]
    model = defs["ModelSpec"]  # the before-validator fills supports_* in from the tier
    model["required"] = [k for k in model["required"] if not k.startswith("supports_")]
    for key in ("supports_tools", "supports_images"):
        model["properties"][key]["description"] = "default: true for tier closed, false for local"
    defs["Alias"]["oneOf"] = [  # exactly one of the settings
        *(
            {"required": [key], "properties": {key: {"type": "number"}}}
            for key in ("threshold", "target_closed_share")
        ),
        {"required": ["cascade"], "properties": {"cascade": {"const": True}}},
    ]
    rule_name = defs["Rule"]["properties"]["name"]
    rule_name["pattern"] = NAME.pattern
    rule_name["not"] = {"enum": list(RESERVED_RULES)}
    defs["Tenant"]["dependentSchemas"] = {  # over_budget says what a budget does: one is set
        "over_budget": {
            "required": ["daily_budget_usd"],
            "properties": {"daily_budget_usd": {"type": "number"}},
        }
    }
    for aliases in (schema["properties"]["aliases"], defs["Tenant"]["properties"]["aliases"]):
        aliases["propertyNames"] = {"pattern": NAME.pattern}
    schema["properties"]["signals"]["propertyNames"] = {"pattern": _signal_pattern()}
    del defs["Comparison"], defs["HeaderComparison"]
    defs["Condition"] = _condition_schema(defs["Condition"])
    for kind in get_args(Kind):
        if kind != "header":  # written out where `header:` is, with its `name`
            defs[f"Comparison_{kind}"] = _comparison_schema(kind)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _or_null(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _signal_pattern() -> str:
    # The signal names the checker allows: lower_snake_case, not a key of the condition language.
    reserved = "|".join(CONDITION_KEYS)
    return f"^(?!(?:{reserved})$){SIGNAL_NAME.pattern.removeprefix('^')}"


def _condition_schema(generated: dict[str, Any]) -> dict[str, Any]:
    """``when:``: a signal's name, or a mapping of combinators, signals and comparisons."""
    mapping = {k: v for k, v in generated.items() if k not in ("title", "description")}
    props = mapping["properties"]
    props["signal"] = _or_null({"type": "string", "pattern": _signal_pattern()})
    for key, kind in BUILTIN_SIGNALS.items():
        props[key] = _or_null({"$ref": f"#/$defs/Comparison_{kind}"})
    header = _operators_schema("header")
    header["properties"]["name"] = {
        "type": "string",
        # case-free, as the loader reads it (JSON Schema regexes have no inline flags)
        "pattern": "^"
        + "".join(f"[{c}{c.upper()}]" if c.isalpha() else c for c in POLICY_HEADER_PREFIX),
    }
    header.update(required=["name"], minProperties=2)  # the name and at least one operator
    props["header"] = _or_null(header)
    # Any other key is a named signal (compared with true/false) or a metadata field.
    mapping["patternProperties"] = {
        r"^metadata\..": {"$ref": "#/$defs/Comparison_any"},
        _signal_pattern(): {"$ref": "#/$defs/Comparison_bool"},
    }
    mapping["additionalProperties"] = False
    return {
        "title": generated["title"],
        "description": generated["description"],
        "anyOf": [{"type": "string", "pattern": _signal_pattern()}, mapping],
    }


def _comparison_schema(kind: Kind) -> dict[str, Any]:
    """What a signal of ``kind`` takes: operators, or a bare value (``eq``) or a list (``in``)."""
    operators = _operators_schema(kind)
    props = operators["properties"]
    shorthands = {"eq": "a bare value means eq", "in": "a list means in"}
    said = [text for op, text in shorthands.items() if op in props]
    return {
        "description": "; ".join([f"operators: {', '.join(props)}", *said]),
        "anyOf": [*(props[op] for op in shorthands if op in props), operators],
    }


def _operators_schema(kind: Kind) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for op in OPERATORS:
        if op in KIND_OPERATORS[kind]:
            value = _value_schema(kind, op)
            if op == "eq":  # `eq: null` tests for a missing signal
                value = _or_null(value)
            elif op in ("in", "not_in"):
                value = {"type": "array", "items": value}
            props[op] = value
    return {
        "type": "object",
        "properties": props,
        "additionalProperties": False,
        "minProperties": 1,
    }


def _value_schema(kind: Kind, op: str) -> dict[str, Any]:
    # One value of `op` on a `kind` signal: what the checker accepts, written as JSON Schema.
    if op == "matches":
        return {"type": "string", "format": "regex"}
    if kind == "bool":
        return {"type": "boolean"}
    if kind == "number" or (kind in ("any", "header") and op in ORDER):
        return {"type": "number"}
    if kind == "fraction":
        return {"type": "number", "minimum": 0, "maximum": 1}
    if kind in ("text", "header"):  # a header's value is text; its order operators take numbers
        return {"type": "string"}
    if kind == "list":
        return {"enum": list(PII_KINDS)}
    if kind in ("capability", "stakes"):
        return {"enum": list(CAPABILITIES if kind == "capability" else STAKES)}
    return {"type": ["string", "number", "boolean"]}
