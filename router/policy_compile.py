"""Reading a policy file: YAML with positions, the checker and compiler, and located errors.

:func:`parse_policy` / :func:`load_policy` validate the YAML into a
:class:`~router.policy.Policy` (pydantic, ``extra="forbid"``), check what needs the whole file
(unknown models and signals, cycles, duplicate names, operators a signal does not take), and
compile every rule into plain closures once, so that :func:`router.policy.evaluate` only calls
them. Every problem is reported with file, line, column and key path in a single
:class:`~router.errors.PolicyError`.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import math
import re
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError

from router.errors import PolicyError, PolicyIssue
from router.pii import PII_KINDS
from router.policy import (
    OPERATORS,
    POLICY_HEADER_PREFIX,
    RESERVED_RULES,
    Alias,
    Comparison,
    CompiledRule,
    Condition,
    ModelSpec,
    Plan,
    Policy,
    Rule,
    RuleTrace,
    Runtime,
    Tenant,
    Test,
)
from router.scoring import CAPABILITIES, STAKES
from router.signals import Signals

__all__ = ["load_policy", "parse_policy"]

#: A key path in the file, as pydantic reports it: ``("rules", 0, "when")``.
Loc = tuple[str | int, ...]
#: What a rule, alias or tenant-scoped name may be; a signal name is lower_snake_case.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
SIGNAL_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
#: What a model's name may hold: it is sent as a header value (``x-tiergate-model``), which
#: a character beyond Latin-1 cannot be, and a client's HTTP library may refuse beyond ASCII.
HEADER_TEXT = re.compile(r"^[!-~](?:[ -~]*[!-~])?$")
_STAKES_RANK = {name: rank for rank, name in enumerate(STAKES)}


def _always(_: Signals) -> str | None:
    return None


# --------------------------------------------------------------------------- parsing


def load_policy(path: str | Path) -> Policy:
    """Read and validate the policy file at ``path``. Raises :class:`PolicyError`."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError([PolicyIssue(source, None, None, "", f"cannot read: {exc}")]) from exc
    return parse_policy(text, source)


def parse_policy(text: str, source: str = "<string>") -> Policy:
    """Validate policy YAML ``text``; ``source`` names it in messages. Raises PolicyError."""
    try:
        return _parse_policy(text, source)
    except RecursionError:  # the YAML reader, the validator or the compiler ran out of stack
        message = (
            "nested too deeply to read (a condition or list hundreds of levels deep): "
            "flatten it, for example with named signals"
        )
        raise PolicyError([PolicyIssue(source, None, None, "", message)]) from None


def _parse_policy(text: str, source: str) -> Policy:
    data, positions, issues = _read_yaml(text, source)
    if issues:
        raise PolicyError(issues)
    locate = _Locator(source, positions)
    if not isinstance(data, dict):
        raise PolicyError([locate((), "a policy is a mapping that starts with `version: 1`")])
    try:
        policy = Policy.model_validate(data)
    except ValidationError as exc:
        issues = [_issue_from_pydantic(err, locate) for err in exc.errors()]
        raise PolicyError(sorted(issues, key=_by_place)) from None
    checker = _Checker(policy)
    problems = checker.check()
    if problems:
        raise PolicyError(sorted((locate(loc, msg) for loc, msg in problems), key=_by_place))
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]
    warnings = tuple(sorted((locate(loc, msg) for loc, msg in checker.warnings), key=_by_place))
    fields = frozenset(checker.metadata_fields)
    _build_plans(policy, checker.compiled, digest, source, fields, warnings=warnings)
    return policy


def _by_place(issue: PolicyIssue) -> tuple[int, int]:
    return issue.line or 0, issue.column or 0


class _AliasError(Exception):
    def __init__(self, event: yaml.AliasEvent) -> None:
        super().__init__(event.anchor)
        self.anchor, self.mark = event.anchor, event.start_mark


class _PolicyLoader(yaml.SafeLoader):
    """SafeLoader without aliases: ``*name`` lets a few hundred bytes stand for gigabytes once
    expanded (an "alias bomb", which also made the key-path walk exponential), and a policy
    has no need of them. The first alias is refused before anything is built."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            raise _AliasError(self.peek_event())  # type: ignore[no-untyped-call]
        node: yaml.Node | None = super().compose_node(parent, index)
        return node


def _read_yaml(text: str, source: str) -> tuple[Any, dict[Loc, tuple[int, int]], list[PolicyIssue]]:
    loader = _PolicyLoader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except _AliasError as exc:
        line, col = (exc.mark.line + 1, exc.mark.column + 1) if exc.mark else (None, None)
        message = f"YAML aliases are not allowed in a policy (*{exc.anchor}): write the value out"
        return None, {}, [PolicyIssue(source, line, col, "", message)]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark  # problem_mark is where the parser gave up
        what = exc.problem or "invalid YAML"
        if "'\\t'" in what:  # PyYAML's words do not say what to do about a tab
            what += " (use spaces: YAML takes no tab here)"
        if exc.context and exc.context_mark is not None:
            start = exc.context_mark
            what += f" ({exc.context} at line {start.line + 1}, column {start.column + 1})"
        line, col = (mark.line + 1, mark.column + 1) if mark else (None, None)
        return None, {}, [PolicyIssue(source, line, col, "", f"YAML syntax error: {what}")]
    except yaml.YAMLError as exc:
        return None, {}, [PolicyIssue(source, None, None, "", f"YAML error: {exc}")]
    finally:
        loader.dispose()
    positions: dict[Loc, tuple[int, int]] = {}
    issues: list[PolicyIssue] = []
    if node is not None:
        _index(node, (), positions, issues, source)
    return data, positions, issues


def _index(
    node: yaml.Node,
    loc: Loc,
    positions: dict[Loc, tuple[int, int]],
    issues: list[PolicyIssue],
    source: str,
) -> None:
    """Map every key path to the line and column where it is written."""
    start = node.start_mark
    positions.setdefault(loc, (start.line + 1, start.column + 1))
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = str(key_node.value)
            mark = key_node.start_mark
            if key in seen:
                issues.append(
                    PolicyIssue(
                        source,
                        mark.line + 1,
                        mark.column + 1,
                        _path((*loc, key)),
                        f"duplicate key {key!r} (the later one would silently win)",
                    )
                )
            seen.add(key)
            positions[(*loc, key)] = (mark.line + 1, mark.column + 1)
            _index(value_node, (*loc, key), positions, issues, source)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, (*loc, i), positions, issues, source)


def _path(loc: Loc) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class _Locator:
    def __init__(self, source: str, positions: dict[Loc, tuple[int, int]]) -> None:
        self.source, self.positions = source, positions

    def __call__(self, loc: Loc, message: str) -> PolicyIssue:
        probe = loc
        while probe and probe not in self.positions:
            probe = probe[:-1]
        line, col = self.positions.get(probe, (1, 1))
        return PolicyIssue(self.source, line, col, _path(loc), message)

    def misplaced(self, loc: Loc) -> str:
        """Where a missing key is written one level too deep (``route:`` indented under
        ``when:``), as a hint; else ''."""
        *parent, key = loc
        for where, (line, _) in self.positions.items():
            nested = len(where) == len(loc) + 1 and isinstance(where[-2], str)
            if nested and where[-1] == key and list(where[:-2]) == parent:
                return (
                    f" (the one on line {line} is inside {_path(where[:-1])}: move it out a "
                    f"level, beside {where[-2]!r})"
                )
        return ""


_FRIENDLY = {
    "string_type": "expected text",
    "int_type": "expected a whole number",
    "float_type": "expected a number",
    "bool_type": "expected true or false",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
}


_BOUNDS = {
    "greater_than": ("more than", "gt"),
    "greater_than_equal": ("at least", "ge"),
    "less_than": ("less than", "lt"),
    "less_than_equal": ("at most", "le"),
}


def _issue_from_pydantic(err: Mapping[str, Any], locate: _Locator) -> PolicyIssue:
    loc: Loc = tuple(p for p in err["loc"] if p != "[key]")
    kind, ctx = err["type"], err.get("ctx") or {}
    if kind == "missing":
        hint = " (add `version: 1` at the top)" if loc == ("version",) else locate.misplaced(loc)
        return _with_path(locate(loc[:-1], f"missing required key {loc[-1]!r}{hint}"), loc)
    if kind == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        message = f"unknown key {loc[-1]!r}{_suggest(str(loc[-1]), allowed)}"
        if allowed:
            message += f" (expected one of {', '.join(allowed)})"
        return locate(loc, message)
    if kind == "literal_error":
        message = f"invalid value {err['input']!r} (expected one of {ctx.get('expected')})"
        if loc == ("version",):
            message = _version_message(err["input"])
        return locate(loc, message)
    if kind in _FRIENDLY:
        hint = ""
        if kind == "model_type" and isinstance(err["input"], list) and _is_condition(loc):
            hint = " (conditions that must all hold: `all: [...]`; any one of them: `any: [...]`)"
        return locate(loc, f"{_FRIENDLY[kind]}, got {_describe(err['input'])}{hint}")
    if kind in _BOUNDS:
        word, key = _BOUNDS[kind]
        return locate(loc, f"must be {word} {ctx.get(key)}, got {_describe(err['input'])}")
    message = str(err["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return locate(loc, message[:1].lower() + message[1:])


def _version_message(value: Any) -> str:
    # `version: "1"` is the text "1", not the number: saying "unsupported version '1' (this
    # Tiergate reads version 1)" left the author staring at what looks like the same value.
    if isinstance(value, str) and value.strip() == "1":
        return f"expected the number 1, got text {value!r}: write `version: 1`, without quotes"
    if value is None:
        return "no value: write `version: 1`"
    return f"unsupported version {value!r} (this Tiergate reads version 1)"


def _is_condition(loc: Loc) -> bool:
    # Where a condition is written: a rule's `when`, a `not`, a named signal's definition.
    return bool(loc) and (loc[-1] in ("when", "not") or (len(loc) == 2 and loc[0] == "signals"))


def _with_path(issue: PolicyIssue, loc: Loc) -> PolicyIssue:
    return PolicyIssue(issue.source, issue.line, issue.column, _path(loc), issue.message)


def _describe(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _unwrap(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return args[0] if len(args) == 1 else tp
    if get_origin(tp) is Annotated:
        return get_args(tp)[0]
    return tp


def _allowed_keys(loc: Loc) -> list[str]:
    """The keys the model at ``loc`` accepts (for 'unknown key' messages)."""
    tp: Any = Policy
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            fields = {(f.alias or n): f.annotation for n, f in tp.model_fields.items()}
            if part not in fields:
                return []
            tp = fields[str(part)]
        elif get_origin(tp) in (list, dict):
            tp = get_args(tp)[-1]
        else:
            return []
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [
            f.alias or n for n, f in tp.model_fields.items() if n != "name" or tp is not ModelSpec
        ]
    return []


# --------------------------------------------------------------------------- checking + compiling

# Built-in signals and the kind of value each holds; the operators each kind takes; the keys a
# condition mapping may hold. The JSON Schema (router.policy_schema) is written from these too.
# "fraction": a number from 0 to 1 (the score, a profile accuracy), where `gte: 70` meant as a
# percentage would silently never match. "header": a request header, whose value is always text,
# so `eq: true` (YAML's true, not "true") would silently never match.
Kind = Literal[
    "bool", "number", "fraction", "text", "capability", "stakes", "list", "header", "any"
]
BUILTIN_SIGNALS: dict[str, Kind] = {
    "capability": "capability",
    "stakes": "stakes",
    "pii": "bool",
    "pii_kinds": "list",
    "prompt_tokens": "number",
    "max_tokens": "number",
    "has_images": "bool",
    "has_tools": "bool",
    "turns": "number",
    "score": "fraction",
    "local_accuracy": "fraction",
    "tenant": "text",
    "alias": "text",
}
KIND_OPERATORS: dict[str, frozenset[str]] = {
    "bool": frozenset({"eq", "ne"}),
    "number": frozenset({"eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in"}),
    "fraction": frozenset({"eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in"}),
    "text": frozenset({"eq", "ne", "in", "not_in", "contains", "matches"}),
    "capability": frozenset({"eq", "ne", "in", "not_in", "matches"}),
    "stakes": frozenset({"eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in"}),
    "list": frozenset({"contains", "in", "not_in", "matches"}),
    "header": frozenset(OPERATORS),
    "any": frozenset(OPERATORS),
}
CONDITION_KEYS = ("all", "any", "not", "signal", "header", *BUILTIN_SIGNALS)


class _Checker:
    """Cross-reference checks that need the whole file, and compilation of the conditions."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._profile_seen: set[str] = set()
        self.problems: list[tuple[Loc, str]] = []
        self.signal_tests: dict[str, tuple[Test, str]] = {}
        self.resolving: list[str] = []
        self.compiled: dict[str | None, list[CompiledRule]] = {}
        self.metadata_fields: set[str] = set()  # top-level metadata keys a condition reads
        self.warnings: list[tuple[Loc, str]] = []  # sound, but likely not what was meant

    def add(self, loc: Loc, message: str) -> None:
        self.problems.append((loc, message))

    def _request_models(self) -> set[str]:
        """The names a request may send as its model: every alias (``auto``, the global ones,
        any tenant's own) and every model."""
        names = {"auto", *self.policy.aliases, *self.policy.models}
        for tenant in self.policy.tenants.values():
            if tenant is not None:
                names.update(tenant.aliases)
        return names

    def check(self) -> list[tuple[Loc, str]]:
        self._check_models()
        for name in self.policy.signals:
            self._signal(name, ("signals", name))
        self._check_aliases(self.policy.aliases, ("aliases",))
        if "auto" in self.policy.models and "auto" not in self.policy.aliases:
            # Every policy has the `auto` alias (added below when the file does not define it):
            # a model of that name would turn every `model: "auto"` request into a pin.
            self.add(
                ("models", "auto"),
                "model 'auto' has the name of the alias every policy has; pick another",
            )
        self.compiled[None] = self._rules(self.policy.rules, ("rules",), set())
        global_names = {r.name for r in self.policy.rules}
        for tenant, cfg in self.policy.tenants.items():
            loc: Loc = ("tenants", tenant)
            self._check_aliases(cfg.aliases, (*loc, "aliases"), tenant=True)
            if "over_budget" in cfg.model_fields_set and cfg.daily_budget_usd is None:
                # `monthly_budget_usd` refused, then removed: the cap the file reads as having
                # is not there, and the tenant's closed spend is unlimited
                self.add(
                    (*loc, "over_budget"),
                    f"over_budget has no effect without daily_budget_usd: tenant {tenant!r} has "
                    "no budget, so its closed spend is unlimited; set daily_budget_usd (USD per "
                    "UTC day), or remove over_budget",
                )
            self.compiled[tenant] = self._rules(cfg.rules, (*loc, "rules"), global_names)
        if not self.problems:  # the analysis reads conditions the checks above found sound
            reach = _Reach(self.policy)
            self.problems += reach.problems()
            if not self.problems:
                self.warnings = reach.hidden_for_every_tenant() + self._personal_data_out(reach)
        if "auto" not in self.policy.aliases:
            self.policy.aliases = {
                "auto": Alias(threshold=self.policy.threshold),
                **self.policy.aliases,
            }
        return self.problems

    def _personal_data_out(self, reach: _Reach) -> list[tuple[Loc, str]]:
        """Rules that send personal data where a closed model can serve it while the route
        reads as keeping it in: ``local`` or a local model without ``local_only``, a cascade,
        the score (``auto``). A rule that routes it closed says so and is left alone. Not
        refused, as a policy that served before an upgrade must still start."""
        p = self.policy
        if p.local_model is None or not p.closed_models:
            return []  # no tier to keep it in, or none to leave to
        if any(_implies(_PII, f) for _, _, f in reach.kept_local):
            return []  # a global local_only rule, tried first, keeps all personal data
        rules = [*reach.global_rest, *(e for own in reach.own.values() for e in own)]
        found = []
        for loc, rule, form in rules:
            if not rule.local_only and _selects_pii(form):
                message = self._out_message(rule, loc)
                if message is not None:
                    found.append((loc, message))
        return found

    def _out_message(self, rule: Rule, loc: Loc) -> str | None:
        # What lets a personal-data rule's request out, as far as this policy leaves it open,
        # and the fix; None for a rule that routes it to a closed model on purpose.
        p = self.policy
        assert p.local_model is not None
        keyword = rule.route in ("local", "closed", "auto", "cascade")
        target = None if keyword else p.models[rule.route]
        name = rule.name
        fix = "add `local_only: true` to the rule"
        if rule.route == "cascade":
            head = f"rule {name!r} sends personal data to a cascade"
            ways = [
                "when the cascade doubts the local answer, or the local model fails or its queue "
                "is full (it escalates, whatever on_failure and queue_full say)"
            ]
            fix = "route the rule `local` with `local_only: true` (a cascade cannot be local_only)"
        elif rule.route == "auto":
            head = f"rule {name!r} routes personal data by its score (route: auto)"
            ways = ["when its score reaches the threshold of the alias the request names"]
            tenant = str(loc[1]) if loc[0] == "tenants" else None
            cascading = self._cascade_aliases(tenant)
            if cascading:
                ways.append(
                    f"when the request names an alias that cascades ({', '.join(cascading)}) "
                    "and the cascade escalates"
                )
            ways += self._local_ways(rule)
            fix = "route the rule `local` with `local_only: true`"
        elif rule.route == "local" or (target is not None and target.tier == "local"):
            head = f"rule {name!r} routes personal data local but is not local_only"
            ways = self._local_ways(rule)
        else:
            return None
        rate = (rule.shadow or p.shadow).sample_rate
        if rate > 0:  # the judge's closed model answers a sampled local answer's request too
            ways.append(f"when it is shadow-judged (shadow sample_rate {rate:g})")
        local = target or p.models[p.local_model]
        unfit = "images, tools, n > 1"
        if local.context_window is not None:
            # The window must hold the prompt and the answer's room (policy.why_unfit).
            unfit += ", a prompt that leaves its context window no room for the answer"
        ways.append(f"when the local model cannot take it ({unfit})")
        ways.append("when the request names a closed model (a pin skips all but local_only rules)")
        when = ", ".join(ways[:-1]) + ", or " + ways[-1]
        return (
            f"{head}: such a request goes to a closed model {when}; to keep it local (served "
            f"there or an error, never sent out), {fix}"
        )

    def _local_ways(self, rule: Rule) -> list[str]:
        # How a request the local model starts on leaves it, by the policy's settings.
        ways = []
        if (rule.on_failure or self.policy.on_failure) == "closed":
            ways.append("when the local model fails (on_failure: closed)")
        if self.policy.queue_full == "spill":
            ways.append("when the local queue is full (queue_full: spill)")
        return ways

    def _cascade_aliases(self, tenant: str | None) -> list[str]:
        # The aliases under which `route: auto` cascades: for a tenant's rule, those in force
        # for the tenant; for a global rule, also any tenant's own (its rules serve them all).
        def cascading(aliases: Mapping[str, Alias]) -> set[str]:
            return {name for name, alias in aliases.items() if alias.cascade}

        p = self.policy
        if tenant is not None:
            return sorted(cascading({**p.aliases, **p.tenants[tenant].aliases}))
        return sorted(
            cascading(p.aliases).union(*(cascading(t.aliases) for t in p.tenants.values()))
        )

    def _check_models(self) -> None:
        p = self.policy
        if not p.models:
            self.add(("models",), "define at least one model")
        for key, spec in p.models.items():
            self._check_model(key, spec)
        if p.local_model is None:
            p.local_model = next((k for k, m in p.models.items() if m.tier == "local"), None)
        elif p.local_model not in p.models:
            self.add(("local_model",), self._unknown_model(p.local_model))
        elif p.models[p.local_model].tier != "local":
            self.add(("local_model",), f"model {p.local_model!r} is not tier local")
        if not p.closed_models:
            p.closed_models = [k for k, m in p.models.items() if m.tier == "closed"]
        for i, name in enumerate(p.closed_models):
            if name in p.closed_models[:i]:
                first = p.closed_models.index(name)
                self.add(
                    ("closed_models", i),
                    f"model {name!r} is listed twice (first as closed_models[{first}]): a call "
                    "that failed on it would be tried on it again; list each model once",
                )
            elif name not in p.models:
                self.add(("closed_models", i), self._unknown_model(name))
            elif p.models[name].tier != "closed":
                self.add(("closed_models", i), f"model {name!r} is not tier closed")

    def _check_model(self, key: str, spec: ModelSpec) -> None:
        if not HEADER_TEXT.fullmatch(key):  # else every answer it serves fails as a 500
            self.add(
                ("models", key),
                f"model name {key!r} is sent in the x-tiergate-model header: use printable "
                "ASCII, no spaces at its ends",
            )
        if spec.name and spec.name != key:
            self.add(("models", key, "name"), f"name {spec.name!r} differs from its key {key!r}")
        spec.name = key
        if spec.tier == "closed" and not spec.litellm_model:
            self.add(("models", key), "a closed model needs litellm_model (e.g. openai/gpt-4o)")
        if spec.tier == "local" and spec.price is not None:
            self.add(
                ("models", key, "price"),
                "a local model's price is a setting (TIERGATE_LOCAL_PRICE_PER_MTOK, "
                "TIERGATE_LOCAL_PRICE_PER_GPU_HOUR), not a policy key",
            )
        self._check_output_limit(key, spec)
        for key_name, flag, what in (
            ("supports_tools", spec.supports_tools, "tools"),
            ("supports_images", spec.supports_images, "images"),
        ):
            if spec.tier == "local" and flag:  # the decision would pick a model that refuses
                self.add(
                    ("models", key, key_name),
                    f"the local tier takes no {what} (both local backends refuse them with a "
                    f"400): leave it false, so {what[:-1]} requests go closed",
                )

    def _check_output_limit(self, key: str, spec: ModelSpec) -> None:
        limit = spec.max_output_tokens
        if limit is None:
            return
        if spec.tier == "local":
            self.add(
                ("models", key, "max_output_tokens"),
                "a local model's answer length is a setting (TIERGATE_LOCAL_MAX_TOKENS), not a "
                "policy key",
            )
        elif spec.context_window is not None and limit > spec.context_window:
            self.add(
                ("models", key, "max_output_tokens"),
                f"max_output_tokens {limit} is over the model's context_window "
                f"{spec.context_window}: an answer cannot be longer than the window",
            )

    def _unknown_model(self, name: str) -> str:
        return f"unknown model {name!r} (models: {', '.join(self.policy.models) or 'none'})"

    def _check_aliases(self, aliases: Mapping[str, Alias], loc: Loc, tenant: bool = False) -> None:
        for name, alias in aliases.items():
            if name in self.policy.models:
                self.add((*loc, name), f"alias {name!r} has the name of a model; pick another")
            elif not NAME.fullmatch(name):
                self.add((*loc, name), f"alias name {name!r}: use letters, digits, '-', '_', '.'")
            if alias.cascade and self.policy.local_model is None:  # evaluate would have no start
                self.add(
                    (*loc, name, "cascade"),
                    "a cascade starts on the local model: add a model with tier local under "
                    "models, or give this alias a threshold",
                )

    # -- rules

    def _rules(self, rules: Sequence[Rule], loc: Loc, taken: set[str]) -> list[CompiledRule]:
        seen: dict[str, int] = {}
        out: list[CompiledRule] = []
        for i, rule in enumerate(rules):
            rloc: Loc = (*loc, i)
            self._rule_name(rule.name, (*rloc, "name"), seen, taken, i)
            compiled = self._rule(rule, rloc)
            if compiled is not None:
                out.append(compiled)
        return out

    def _rule_name(
        self, name: str, loc: Loc, seen: dict[str, int], taken: set[str], i: int
    ) -> None:
        if not NAME.fullmatch(name):
            self.add(loc, f"rule name {name!r}: use letters, digits, '-', '_', '.'")
        elif name in RESERVED_RULES or name.startswith("budget:"):
            self.add(loc, f"rule name {name!r} is reserved for the evaluator's own steps")
        elif name in seen:
            self.add(loc, f"duplicate rule name {name!r} (first used by rule {seen[name]})")
        elif name in taken:
            self.add(loc, f"rule name {name!r} is already used by a global rule")
        seen.setdefault(name, i)

    def _rule(self, rule: Rule, loc: Loc) -> CompiledRule | None:
        p = self.policy
        test: Test = _always
        desc = "always"
        if rule.when is not None:  # checked first, so a bad route does not hide its problems
            test, desc = self._condition(rule.when, (*loc, "when"))
        route, model = rule.route, None
        if route not in ("local", "closed", "auto", "cascade"):
            if route not in p.models:
                hint = _suggest(route, list(p.models))
                self.add(
                    (*loc, "route"),
                    f"unknown route {route!r}{hint} (expected local, closed, auto, cascade "
                    f"or a model: {', '.join(p.models)})",
                )
                return None
            route, model = "model", rule.route
        self._check_route(rule, loc, model)
        shadow = (rule.shadow or p.shadow).sample_rate
        return CompiledRule(
            name=rule.name,
            priority=rule.priority,
            test=test,
            desc=desc,
            route=route,
            model=model,
            on_failure=rule.on_failure or p.on_failure,
            local_only=rule.local_only,
            shadow_rate=0.0 if rule.local_only else shadow,
            # Private traffic keeps its prompt only when the rule says so explicitly.
            store_prompts=rule.store_prompts or ("none" if rule.local_only else p.store_prompts),
            hit=RuleTrace(rule.name, rule.priority, True, f"matched: {desc}"),
            skipped=RuleTrace(rule.name, rule.priority, False, "skipped: the request pins a model"),
            misses={},
            reads_profile=rule.when is not None and self._reads_profile(rule.when),
        )

    def _reads_profile(self, cond: Condition) -> bool:
        # True when the condition tests local_accuracy, itself or through a named signal.
        def walk(node: Any) -> bool:
            if isinstance(node, Mapping):
                return any(
                    key == "local_accuracy"
                    or (key == "signal" and self._signal_reads_profile(str(value)))
                    or (key in self.policy.signals and self._signal_reads_profile(key))
                    or walk(value)
                    for key, value in node.items()
                )
            if isinstance(node, list):
                return any(walk(item) for item in node)
            return isinstance(node, str) and self._signal_reads_profile(node)

        return walk(cond.model_dump(by_alias=True, exclude_none=True))

    def _signal_reads_profile(self, name: str) -> bool:
        if name not in self.policy.signals or name in self._profile_seen:
            return False
        self._profile_seen.add(name)  # a cycle (refused elsewhere) must not recurse forever
        try:
            return self._reads_profile(self.policy.signals[name])
        finally:
            self._profile_seen.discard(name)

    def _check_route(self, rule: Rule, loc: Loc, model: str | None) -> None:
        p = self.policy
        tier = p.models[model].tier if model is not None else rule.route
        if tier == "cascade":
            if p.local_model is None or not p.closed_models:
                self.add((*loc, "route"), "route cascade needs a local and a closed model")
            if rule.local_only:
                self.add(
                    (*loc, "local_only"),
                    "a local_only rule cannot cascade (it would never escalate)",
                )
            return
        if tier == "local" and p.local_model is None:
            self.add((*loc, "route"), "route local needs a model with tier local under models")
        if tier == "closed" and not p.closed_models:
            self.add((*loc, "route"), "route closed needs a model with tier closed under models")
        if rule.local_only:
            if tier != "local":
                self.add(
                    (*loc, "local_only"), "a local_only rule must route to local or a local model"
                )
            if rule.shadow is not None and rule.shadow.sample_rate > 0:
                self.add((*loc, "shadow"), "shadow would send a local_only request to another tier")

    # -- conditions

    def _signal(self, name: str, loc: Loc) -> tuple[Test, str] | None:
        if name in self.signal_tests:
            return self.signal_tests[name]
        if name in self.resolving:
            cycle = " -> ".join([*self.resolving[self.resolving.index(name) :], name])
            self.add(loc, f"signals refer to each other in a cycle: {cycle}")
            return None
        if name in CONDITION_KEYS or not SIGNAL_NAME.fullmatch(name):
            self.add(
                ("signals", name), f"signal name {name!r}: use lower_snake_case, not a built-in"
            )
        self.resolving.append(name)
        test = self._condition(self.policy.signals[name], ("signals", name))[0]
        self.resolving.pop()
        fail = f"{name} is false"

        def named(s: Signals) -> str | None:
            return None if test(s) is None else fail

        self.signal_tests[name] = (named, name)
        return named, name

    def _signal_ref(self, name: str, loc: Loc) -> tuple[Test, str]:
        if name not in self.policy.signals:
            defined = ", ".join(self.policy.signals) or "none defined"
            hint = _suggest(name, list(self.policy.signals))
            self.add(loc, f"unknown signal {name!r}{hint} (signals: {defined})")
            return _always, name
        return self._signal(name, loc) or (_always, name)

    def _condition(self, cond: Condition, loc: Loc) -> tuple[Test, str]:
        parts: list[tuple[Test, str]] = []
        if cond.all_ is not None:
            parts.append(
                _all([self._condition(c, (*loc, "all", i)) for i, c in enumerate(cond.all_)])
            )
        if cond.any_ is not None:
            parts.append(
                _any([self._condition(c, (*loc, "any", i)) for i, c in enumerate(cond.any_)])
            )
        if cond.not_ is not None:
            parts.append(_not(self._condition(cond.not_, (*loc, "not"))))
        if cond.signal is not None:
            parts.append(self._signal_ref(cond.signal, (*loc, "signal")))
        for key, kind in BUILTIN_SIGNALS.items():
            cmp = getattr(cond, key)
            if cmp is not None:
                parts.append(self._comparison(key, kind, _getter(key, kind), cmp, (*loc, key)))
        if cond.header is not None:
            name = cond.header.name.lower()
            if not name.startswith(POLICY_HEADER_PREFIX):
                self.add(
                    (*loc, "header", "name"),
                    f"header {cond.header.name!r} never reaches the policy: the proxy passes it "
                    f"only {POLICY_HEADER_PREFIX}* request headers (those the caller's key may "
                    f"set); name it {POLICY_HEADER_PREFIX}{name.removeprefix('x-')}",
                )
            parts.append(
                self._comparison(
                    f"header {name}", "header", _header_getter(name), cond.header, (*loc, "header")
                )
            )
        for key, cmp in (cond.__pydantic_extra__ or {}).items():
            parts.append(self._extra(key, cmp, (*loc, key)))
        return _all(parts) if len(parts) != 1 else parts[0]

    def _extra(self, key: str, cmp: Comparison, loc: Loc) -> tuple[Test, str]:
        if key.startswith("metadata.") and len(key) > len("metadata."):
            self.metadata_fields.add(key[9:].split(".", maxsplit=1)[0])
            return self._comparison(key, "any", _metadata_getter(key[9:].split(".")), cmp, loc)
        if key in self.policy.signals:
            ref = (self._signal(key, loc) or (_always, key))[0]

            def as_bool(s: Signals) -> bool:
                return ref(s) is None

            return self._comparison(key, "bool", as_bool, cmp, loc)
        names = [*CONDITION_KEYS, *self.policy.signals]
        expected = ", ".join([*names, "metadata.<field>"])
        self.add(loc, f"unknown signal {key!r}{_suggest(key, names)} (expected one of {expected})")
        return _always, key

    def _comparison(
        self, label: str, kind: Kind, get: Callable[[Signals], Any], cmp: Comparison, loc: Loc
    ) -> tuple[Test, str]:
        ops = cmp.operators()
        if not ops:
            self.add(loc, "no operator given (expected one of " + ", ".join(OPERATORS) + ")")
            return _always, label
        parts: list[tuple[Test, str]] = []
        for op, value in ops:
            if op not in KIND_OPERATORS[kind]:
                allowed = ", ".join(o for o in OPERATORS if o in KIND_OPERATORS[kind])
                self.add((*loc, op), f"operator {op!r} does not apply to {label} (use {allowed})")
                continue
            checked = self._value(label, kind, op, value, (*loc, op))
            if checked is not _NOTHING:  # a bad value may not compile (`matches: null`)
                parts.append(_leaf(label, kind, get, op, checked))
        return _all(parts) if len(parts) != 1 else parts[0]

    def _value(self, label: str, kind: Kind, op: str, value: Any, loc: Loc) -> Any:
        """The value to compile, or ``_NOTHING`` when it is wrong (the problem is recorded)."""
        if op in ("in", "not_in") and not isinstance(value, list):
            self.add(loc, f"{label} {op}: expected a list, got {_describe(value)}")
            return _NOTHING
        values = value if op in ("in", "not_in") else [value]
        bad = next((v for v in values if not _value_ok(kind, op, v)), _NOTHING)
        if bad is not _NOTHING:
            self.add(loc, _bad_value(label, kind, op, bad))
            return _NOTHING
        if label == "alias" and op in ("eq", "ne", "in", "not_in"):
            # A request names an alias or a model (any other name is a 404 before the policy):
            # a misspelt one here would never match, silently.
            names = self._request_models()
            unknown = next((v for v in values if isinstance(v, str) and v not in names), None)
            if unknown is not None:
                self.add(
                    loc,
                    f"unknown alias {unknown!r}{_suggest(unknown, sorted(names))} (a request "
                    "names an alias or a model: " + ", ".join(sorted(names)) + ")",
                )
                return _NOTHING
        if kind == "stakes" and op in ("gt", "gte", "lt", "lte"):
            return _STAKES_RANK.get(value, 0)
        return value


_NOTHING = object()


def _value_ok(kind: Kind, op: str, v: Any) -> bool:
    if op == "matches":
        return isinstance(v, str)
    if op == "eq" and v is None:
        return True
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "number":
        return isinstance(v, int | float) and not isinstance(v, bool)
    if kind == "fraction":
        return isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1
    if kind == "text":
        return isinstance(v, str)
    if kind == "list":  # pii_kinds: a misspelt kind would never match, silently
        return v in PII_KINDS
    if kind == "capability":
        return v in CAPABILITIES
    if kind == "stakes":
        return v in STAKES
    if op in ("gt", "gte", "lt", "lte"):
        return isinstance(v, int | float) and not isinstance(v, bool)
    if kind == "header":
        return isinstance(v, str)
    return v is not None


def _bad_value(label: str, kind: Kind, op: str, value: Any) -> str:
    if op != "matches" and kind in ("capability", "stakes", "list"):
        names = {"capability": CAPABILITIES, "stakes": STAKES, "list": PII_KINDS}[kind]
        what = {"capability": "capability", "stakes": "stakes level", "list": "pii kind"}[kind]
        return f"unknown {what} {value!r}{_suggest(str(value), names)} (expected one of " + (
            ", ".join(names) + ")"
        )
    expected = {
        "bool": "true or false",
        "number": "a number",
        "fraction": "a number from 0 to 1",
        "text": "text",
        "list": "text",
        "header": "a number" if op in ORDER else "text",
        "any": "a number" if op in ORDER else "a value",
    }[kind]
    if op == "matches":
        expected = "a regular expression"
    hint = ""
    if kind == "fraction" and isinstance(value, int | float) and value in range(2, 101):
        hint = f" (for {value:g}% write {value / 100:g})"
    if kind == "header" and op not in ORDER and isinstance(value, bool | int | float):
        quoted = _describe(value) if isinstance(value, bool) else repr(value)
        hint = f' (a header\'s value is text: write "{quoted}" in quotes)'
    return f"{label} {op}: expected {expected}, got {_describe(value)}{hint}"


def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.75)
    return f", did you mean {close[0]!r}?" if close else ""


# --------------------------------------------------------------------------- rules that never match

#: A condition in a normal form, for comparing conditions at load time (never per request):
#: ``("cmp", label, kind, op, is_bool, value)``, ``("all" | "any", frozenset of forms)``,
#: ``("not", form)``, ``_TRUE``, or ``("false", reported)``. Named signals are written out, the
#: order of keys and list items is gone and one-value lists read as ``eq``, so two conditions
#: written differently that hold for the same requests mostly get the same form. Only rewrites
#: that keep the meaning exactly are made: a form may miss an equivalence, never invent one.
Form = tuple[Any, ...]
_TRUE: Form = ("true",)
#: Bool signals a request always has (pii, has_images, has_tools): `ne: true` is `eq: false`.
_NEVER_MISSING = frozenset({"pii", "has_images", "has_tools"})


class _Reach:
    """Rules that can never match, and conditions that can never hold, in a policy that passed
    every other check. A rule is dead when a rule tried before it, in the order
    :func:`_build_plans` gives each tenant, holds for every request it would: one that matches
    everything, one with the same condition, or one whose condition is part of its own (``pii:
    true`` before ``{pii: true, capability: coding}``). A ``local_only`` rule after a rule that
    is not still decides the requests that pin a model, so only a ``local_only`` rule hides it.
    A condition never holds when two of its comparisons exclude each other (``prompt_tokens >
    3000`` and ``prompt_tokens < 1000``); it is reported where they meet.
    """

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.signal_forms: dict[str, Form] = {}
        self.never: dict[Loc, str] = {}  # where a condition can never hold, and why
        self.dead: list[tuple[Loc, str]] = []
        self.own: dict[str, list[tuple[Loc, Rule, Form]]] = {}  # each tenant's rules, in order
        self.global_rest: list[tuple[Loc, Rule, Form]] = []  # the global rules not local_only
        self.kept_local: list[tuple[Loc, Rule, Form]] = []  # the global local_only rules

    def problems(self) -> list[tuple[Loc, str]]:
        for name in self.policy.signals:
            self.signal(name)
        entries = [
            (("rules", i), r, self.rule_form(r, ("rules", i)))
            for i, r in enumerate(self.policy.rules)
        ]
        order = sorted(entries, key=lambda e: (not e[1].local_only, -e[1].priority))
        self._walk(order, 0)
        kept_local = self.kept_local = [e for e in order if e[1].local_only]
        for tenant, cfg in self.policy.tenants.items():
            loc: Loc = ("tenants", tenant, "rules")
            own = [((*loc, i), r, self.rule_form(r, (*loc, i))) for i, r in enumerate(cfg.rules)]
            self._walk([*kept_local, *sorted(own, key=lambda e: -e[1].priority)], len(kept_local))
            self.own[tenant] = own
        self.global_rest = [e for e in order if not e[1].local_only]
        never = [
            (loc, f"can never hold: no request has both {why}") for loc, why in self.never.items()
        ]
        return never + self.dead

    def hidden_for_every_tenant(self) -> list[tuple[Loc, str]]:
        """Global rules that every tenant under ``tenants`` hides behind its own rules (tried
        first). Not refused: a tenant the policy does not list still reaches them."""
        if not self.policy.tenants:
            return []
        found = []
        for loc, rule, form in self.global_rest:
            if form[0] == "false":
                continue
            hiders = []
            for tenant, own in self.own.items():
                by = next((r for _, r, f in own if f[0] != "false" and _implies(form, f)), None)
                if by is None:
                    break
                hiders.append(f"{tenant}: {by.name!r}")
            else:
                others = "" if "default" in self.policy.tenants else " (such as 'default')"
                found.append(
                    (
                        loc,
                        f"rule {rule.name!r} decides no request of a tenant under `tenants`: "
                        "each one's own rules, tried before the global ones, match every request "
                        f"it would ({', '.join(hiders)}); it decides only for tenants not listed "
                        f"there{others}: remove it if there are none",
                    )
                )
        return found

    def _walk(self, order: Sequence[tuple[Loc, Rule, Form]], start: int) -> None:
        # Report each rule from order[start] on that an earlier rule hides (the earliest one).
        for k in range(start, len(order)):
            loc, rule, form = order[k]
            if form[0] == "false" and form[1]:  # already reported where it cannot hold
                continue
            for hider in order[:k]:
                hides = hider[2][0] != "false" and (hider[1].local_only or not rule.local_only)
                if hides and _implies(form, hider[2]):
                    self.dead.append((loc, _dead_message(loc, rule, form, hider)))
                    break

    def rule_form(self, rule: Rule, loc: Loc) -> Form:
        return _TRUE if rule.when is None else self.form(rule.when, (*loc, "when"))

    def signal(self, name: str) -> Form:
        if name not in self.signal_forms:
            self.signal_forms[name] = ("cmp", name, "bool", "eq", True, True)  # a cycle guard
            self.signal_forms[name] = self.form(self.policy.signals[name], ("signals", name))
        return self.signal_forms[name]

    def form(self, cond: Condition, loc: Loc) -> Form:
        parts: list[Form] = []
        if cond.all_ is not None:
            items = [self.form(c, (*loc, "all", i)) for i, c in enumerate(cond.all_)]
            parts.append(self._all(items, (*loc, "all")))
        if cond.any_ is not None:
            parts.append(
                _any_form([self.form(c, (*loc, "any", i)) for i, c in enumerate(cond.any_)])
            )
        if cond.not_ is not None:
            parts.append(_not_form(self.form(cond.not_, (*loc, "not"))))
        if cond.signal is not None:
            parts.append(self.signal(cond.signal))
        for key, kind in BUILTIN_SIGNALS.items():
            cmp = getattr(cond, key)
            if cmp is not None:
                parts.append(self._comparison(key, kind, cmp, (*loc, key)))
        if cond.header is not None:
            label = f"header {cond.header.name.lower()}"
            parts.append(self._comparison(label, "header", cond.header, (*loc, "header")))
        for key, cmp in (cond.__pydantic_extra__ or {}).items():
            if key.startswith("metadata."):
                parts.append(self._comparison(key, "any", cmp, (*loc, key)))
            else:  # a named signal compared with true or false
                parts.append(self._named(key, cmp, (*loc, key)))
        return self._all(parts, loc)

    def _comparison(self, label: str, kind: Kind, cmp: Comparison, loc: Loc) -> Form:
        return self._all([_leaf_form(label, kind, op, v) for op, v in cmp.operators()], loc)

    def _named(self, name: str, cmp: Comparison, loc: Loc) -> Form:
        parts = []
        for op, v in cmp.operators():
            if isinstance(v, bool) and op in ("eq", "ne"):
                holds = self.signal(name)
                parts.append(holds if (op == "eq") is v else _not_form(holds))
            else:  # `eq: null` and the like: kept as written
                parts.append(_leaf_form(name, "bool", op, v))
        return self._all(parts, loc)

    def _all(self, parts: Sequence[Form], loc: Loc) -> Form:
        falses = [p for p in parts if p[0] == "false"]
        if falses:
            return ("false", any(p[1] for p in falses))
        flat: set[Form] = set()
        for p in parts:
            if p[0] == "all":
                flat |= p[1]
            elif p != _TRUE:
                flat.add(p)
        why = _contradiction(flat)
        if why is not None:
            self.never.setdefault(loc, why)
            return ("false", True)
        if not flat:
            return _TRUE
        return next(iter(flat)) if len(flat) == 1 else ("all", frozenset(flat))


def _leaf_form(label: str, kind: Kind, op: str, v: Any) -> Form:
    if op in ("in", "not_in"):
        values = frozenset(v)
        if len(values) == 1 and None not in values and kind not in ("any", "list"):
            op, v = "eq" if op == "in" else "ne", next(iter(values))  # `[coding]` is `coding`
        else:
            return ("cmp", label, kind, op, False, values)
    if op in ORDER:
        return ("cmp", label, kind, op, False, _STAKES_RANK[v] if kind == "stakes" else v)
    if op == "ne" and label in _NEVER_MISSING and isinstance(v, bool):
        op, v = "eq", not v
    return ("cmp", label, kind, op, isinstance(v, bool), v)  # `eq: 1` is not `eq: true`


def _any_form(parts: Sequence[Form]) -> Form:
    flat: set[Form] = set()
    reported = False
    for p in parts:
        if p == _TRUE:
            return _TRUE
        if p[0] == "false":
            reported = reported or p[1]
        elif p[0] == "any":
            flat |= p[1]
        else:
            flat.add(p)
    if any(("not", f) in flat for f in flat):  # x or not x
        return _TRUE
    if not flat:  # `any: []` is how a rule is switched off: not reported
        return ("false", reported)
    return next(iter(flat)) if len(flat) == 1 else ("any", frozenset(flat))


def _selects_pii(form: Form, held: bool = True) -> bool:
    """Whether ``form`` matches a request for holding personal data (``pii: true``, a kind in
    ``pii_kinds``, a named signal built on them), not for lacking it (``pii: false``,
    ``not: {pii: true}``)."""
    if form[0] == "cmp":
        label, op, value = form[1], form[3], form[5]
        if label == "pii":
            return op == "eq" and value is held
        return label == "pii_kinds" and (op != "not_in") is held
    if form[0] in ("all", "any"):
        return any(_selects_pii(f, held) for f in form[1])
    return form[0] == "not" and _selects_pii(form[1], not held)


def _not_form(form: Form) -> Form:
    if form == _TRUE:  # `not: {}`, written as never, as `any: []`
        return ("false", False)
    if form[0] == "false":
        return _TRUE
    return form[1] if form[0] == "not" else ("not", form)


@functools.lru_cache(maxsize=4096)
def _implies(a: Form, b: Form) -> bool:
    """Whether every request ``a`` holds for, ``b`` holds for too (as far as forms tell)."""
    if b in (_TRUE, a):
        return True
    if b[0] == "all":
        return all(_implies(a, x) for x in b[1])
    if a[0] == "any":
        return all(_implies(x, b) for x in a[1])
    if a[0] == "all" and any(_implies(x, b) for x in a[1]):
        return True
    if b[0] == "any":
        return any(_implies(a, x) for x in b[1])
    if a[0] == "not" and b[0] == "not":
        return _implies(b[1], a[1])
    return a[0] == "cmp" and b[0] == "cmp" and _leaf_implies(a, b)


#: `pii` is true whenever `pii_kinds` names a kind: these comparisons of pii_kinds imply it.
_PII: Form = ("cmp", "pii", "bool", "eq", True, True)
_HAS_KINDS = frozenset({"contains", "in", "matches"})


def _leaf_implies(f: Form, g: Form) -> bool:
    # Whether comparison ``f`` holding means ``g`` holds: one signal's bounds and values.
    if g == _PII and f[1] == "pii_kinds":
        return f[3] in _HAS_KINDS
    if f[1] != g[1] or f[2] != g[2]:
        return False
    domain = _DOMAINS.get(f[2])
    if domain is not None and f[3] in _PLAIN and g[3] in _PLAIN:  # few values: try each
        if f[3] == "in" and None in f[5]:  # holds for a missing one too
            return False
        held = [x for x in domain if _value_holds(f[2], x, f)]
        return bool(held) and all(_value_holds(f[2], x, g) for x in held)
    low, high = _bound(f), _bound(g)
    if low is not None and high is not None:  # two bounds of one side: the tighter implies
        (side, a, strict_a), (side_b, b, strict_b) = low, high
        if side != side_b:
            return False
        tighter = a > b if side == "low" else a < b
        return tighter or (a == b and (strict_a or not strict_b))
    kind, op, v = f[2], f[3], f[5]
    if kind not in _VALUED or op not in ("eq", "in") or (op == "in" and None in v):
        return False
    values = frozenset({v}) if op == "eq" else v
    if v is None or not values:
        return False
    return all(_value_holds(kind, x, g) for x in values)


#: The signals of few values (`stakes > medium` is `stakes == high`), and the operators a value
#: is checked against one by one.
_DOMAINS: dict[str, tuple[str, ...]] = {"stakes": STAKES, "capability": CAPABILITIES}
_PLAIN = frozenset({"eq", "ne", "in", "not_in", "gt", "gte", "lt", "lte"})
#: The kinds whose `eq` and `in` values compare plainly (no text read as a number, no
#: `1 == true`), so a value can be checked against another comparison of the signal.
_VALUED = frozenset({"number", "fraction", "stakes", "capability", "text"})


def _value_holds(kind: Kind, x: Any, g: Form) -> bool:
    # Whether a signal equal to ``x`` satisfies comparison ``g``.
    op, v = g[3], g[5]
    if op == "eq":
        return bool(x == v)
    if op == "ne":
        return bool(x != v)
    if op in ("in", "not_in"):
        return (x in v) is (op == "in")
    if op in ORDER and kind in ("number", "fraction", "stakes"):
        return bool(ORDER[op](_STAKES_RANK[x] if kind == "stakes" else x, v))
    return False


def _bound(f: Form) -> tuple[str, float, bool] | None:
    """An order comparison as (``low`` or ``high``, value, strict). Token counts, turns and
    stakes levels are whole numbers, so there a strict bound is the inclusive one next to it:
    ``turns > 2`` is ``turns >= 3``."""
    _, _, kind, op, _, v = f
    if op not in ORDER:
        return None
    side, strict = ("low" if op in ("gt", "gte") else "high"), op in ("gt", "lt")
    if kind in ("number", "stakes"):
        if side == "low":
            v = math.floor(v) + 1 if strict else math.ceil(v)
        else:
            v = math.ceil(v) - 1 if strict else math.floor(v)
        strict = False
    return side, v, strict


def _contradiction(forms: set[Form]) -> str | None:
    """Why the conjunction of ``forms`` can never hold ("x > 5 and x < 2"), else None."""
    for f in sorted(forms, key=_show):
        if ("not", f) in forms:
            return f"{_show(f)} and not {_show(f)}"
    leaves: dict[str, list[Form]] = {}
    for f in sorted((f for f in forms if f[0] == "cmp"), key=_show):
        leaves.setdefault(f[1], []).append(f)
    for same in leaves.values():
        pair = _clash(same)
        if pair is not None:
            return f"{_show(pair[0])} and {_show(pair[1])}"
    return None


def _clash(leaves: list[Form]) -> tuple[Form, Form] | None:
    # Two comparisons of one signal that no value satisfies together.
    return _empty_range(leaves) or next(
        ((f, g) for f in leaves if f[3] == "eq" for g in leaves if _excludes(f, g)), None
    )


def _empty_range(leaves: list[Form]) -> tuple[Form, Form] | None:
    # The tightest lower and upper bounds, when no value lies between them.
    bounds = [(f, b) for f in leaves if (b := _bound(f)) is not None]
    lows = [(f, b) for f, b in bounds if b[0] == "low"]
    highs = [(f, b) for f, b in bounds if b[0] == "high"]
    if not lows or not highs:
        return None
    low, (_, lv, lstrict) = max(lows, key=lambda e: (e[1][1], e[1][2]))
    high, (_, hv, hstrict) = min(highs, key=lambda e: (e[1][1], not e[1][2]))
    if lv > hv or (lv == hv and (lstrict or hstrict)):
        return low, high
    return None


def _excludes(eq: Form, g: Form) -> bool:
    # Whether no value is both ``== eq`` and satisfies ``g`` (of the same signal).
    kind, op, value = eq[2], g[3], (eq[4], eq[5])
    if op == "eq":
        return (g[4], g[5]) != value
    if op == "ne":
        return (g[4], g[5]) == value
    if op in ("in", "not_in"):
        return (eq[5] in g[5]) is (op == "not_in")
    if op in ORDER and kind in ("number", "fraction", "stakes"):
        x = _STAKES_RANK.get(eq[5]) if kind == "stakes" else eq[5]
        return x is None or not ORDER[op](x, g[5])
    return False


def _show(form: Form) -> str:
    # A form as a decision's trace shows a condition: `prompt_tokens > 3000`.
    if form[0] == "cmp":
        _, label, kind, op, _, v = form
        if kind == "stakes" and op in ORDER:
            v = STAKES[v]
        elif isinstance(v, frozenset):
            v = sorted(v, key=repr)
        elif isinstance(v, float) and v.is_integer():
            v = int(v)
        return f"{label} {_SYMBOL.get(op, op.replace('_', ' '))} {v!r}"
    if form[0] in ("all", "any"):
        return (
            "(" + f" {'and' if form[0] == 'all' else 'or'} ".join(sorted(map(_show, form[1]))) + ")"
        )
    if form[0] == "not":
        return f"not {_show(form[1])}"
    return "always" if form == _TRUE else "never"


def _dead_message(loc: Loc, rule: Rule, form: Form, hider: tuple[Loc, Rule, Form]) -> str:
    where, by, by_form = hider
    crossed = where[0] != loc[0]  # a tenant's rule behind a global local_only rule
    # No priority lifts a rule over a local_only one where those are tried first.
    lift = not crossed and not (loc[0] == "rules" and by.local_only and not rule.local_only)
    head = (
        f"rule {rule.name!r} can never match: rule {by.name!r} ({_path(where)}, priority "
        f"{by.priority}) is tried before it"
    )
    why = ", as the global local_only rules are tried before a tenant's own" if crossed else ""
    if by_form == form or _implies(by_form, form):  # `turns > 2` is `turns >= 3`
        return f"{head} with the same condition{why}; remove one, or give one another `when`"
    if by_form == _TRUE:
        head, fix = f"{head} and matches every request{why}", f"a `when` to {by.name!r}"
    else:
        head += f" and matches every request {rule.name!r} would{why}"
        fix = f"a narrower `when` to {by.name!r}"
    if lift:
        fix = f"{rule.name!r} a priority above {by.priority}, or {fix}"
    return f"{head}; give {fix}"


# --------------------------------------------------------------------------- closures


def _getter(key: str, kind: Kind) -> Callable[[Signals], Any]:
    if kind == "stakes":
        return lambda s: s.stakes
    return lambda s: getattr(s, key)


def _header_getter(name: str) -> Callable[[Signals], Any]:
    def get(s: Signals) -> Any:
        headers = s.headers
        value = headers.get(name)
        if value is None and headers:
            value = next((v for k, v in headers.items() if k.lower() == name), None)
        return value

    return get


def _metadata_getter(path: list[str]) -> Callable[[Signals], Any]:
    def get(s: Signals) -> Any:
        value: Any = s.metadata
        for part in path:
            if not isinstance(value, Mapping):
                return None
            value = value.get(part)
        return value

    return get


def _number(x: Any) -> float | None:
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, int | float):
        return x
    if isinstance(x, str):
        try:
            return float(x)
        except ValueError:
            return None
    return None


def _same(x: Any, v: Any) -> bool:
    return bool(x == v) and isinstance(x, bool) == isinstance(v, bool)


#: The order operators, and how each compares a signal's value with the policy's.
ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "gt": lambda x, v: x > v,
    "gte": lambda x, v: x >= v,
    "lt": lambda x, v: x < v,
    "lte": lambda x, v: x <= v,
}
_SYMBOL = {"eq": "==", "ne": "!=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def _leaf(
    label: str, kind: Kind, get: Callable[[Signals], Any], op: str, v: Any
) -> tuple[Test, str]:
    shown = STAKES[v] if kind == "stakes" and op in ORDER else v
    if isinstance(shown, float) and shown.is_integer():
        shown = int(shown)
    desc = f"{label} {_SYMBOL.get(op, op.replace('_', ' '))} {shown!r}"
    fail = f"{desc} is false"
    pred = _predicate(kind, op, v, get)

    def test(s: Signals) -> str | None:
        return None if pred(s) else fail

    return test, desc


def _predicate(
    kind: Kind, op: str, v: Any, get: Callable[[Signals], Any]
) -> Callable[[Signals], bool]:
    if op == "eq":
        if v is None:
            return lambda s: get(s) is None
        if kind == "any":
            return lambda s: _same(get(s), v)
        return lambda s: bool(get(s) == v)
    if op == "ne":
        if kind == "any":
            return lambda s: (x := get(s)) is not None and not _same(x, v)
        return lambda s: (x := get(s)) is not None and x != v
    if op in ORDER:
        return _order_predicate(kind, op, v, get)
    if op in ("in", "not_in"):
        return _membership(
            kind, op == "in", frozenset(x for x in v if x is not None), None in v, get
        )
    if op == "contains":
        return lambda s: _contains(get(s), v)
    rx = re.compile(v)
    if kind == "list":
        return lambda s: any(rx.search(x) for x in get(s))
    return lambda s: isinstance(x := get(s), str) and rx.search(x) is not None


def _order_predicate(
    kind: Kind, op: str, v: Any, get: Callable[[Signals], Any]
) -> Callable[[Signals], bool]:
    cmp = ORDER[op]
    if kind == "stakes":
        rank = _STAKES_RANK
        return lambda s: (x := rank.get(get(s))) is not None and cmp(x, v)
    if kind in ("any", "header"):
        return lambda s: (x := _number(get(s))) is not None and cmp(x, v)
    return lambda s: (x := get(s)) is not None and cmp(x, v)


def _membership(
    kind: Kind,
    inside: bool,
    values: frozenset[Any],
    with_null: bool,
    get: Callable[[Signals], Any],
) -> Callable[[Signals], bool]:
    if kind == "list":
        if inside:
            return lambda s: not values.isdisjoint(get(s))
        return lambda s: values.isdisjoint(get(s))

    def member(x: Any) -> bool:
        if x is None:
            return with_null
        return isinstance(x, str | int | float | bool) and x in values

    if inside:
        return lambda s: member(get(s))
    return lambda s: (x := get(s)) is not None and not member(x)


def _contains(x: Any, v: Any) -> bool:
    if isinstance(x, str):
        return isinstance(v, str) and v in x
    if isinstance(x, list | tuple | set | frozenset):
        return v in x
    return False


def _all(parts: list[tuple[Test, str]]) -> tuple[Test, str]:
    tests = tuple(t for t, _ in parts)
    desc = "(" + " and ".join(d for _, d in parts) + ")" if parts else "all [] (always)"

    def test(s: Signals) -> str | None:
        for t in tests:
            why = t(s)
            if why is not None:
                return why
        return None

    return test, desc


def _any(parts: list[tuple[Test, str]]) -> tuple[Test, str]:
    tests = tuple(t for t, _ in parts)
    desc = "(" + " or ".join(d for _, d in parts) + ")" if parts else "any [] (never)"
    fail = f"none of {desc}" if parts else "any [] never matches"

    def test(s: Signals) -> str | None:
        for t in tests:
            if t(s) is None:
                return None
        return fail

    return test, desc


def _not(part: tuple[Test, str]) -> tuple[Test, str]:
    inner, inner_desc = part
    desc = f"not {inner_desc}"
    fail = f"{inner_desc} is true"

    def test(s: Signals) -> str | None:
        return fail if inner(s) is None else None

    return test, desc


def _build_plans(
    policy: Policy,
    compiled: Mapping[str | None, list[CompiledRule]],
    digest: str,
    source: str,
    metadata_fields: frozenset[str] = frozenset(),
    *,
    warnings: tuple[PolicyIssue, ...] = (),
) -> None:
    """Order each tenant's rules once: the global ``local_only`` rules, its own rules, then the
    other global ones, then ``default``. A tenant rule cannot take precedence over a global
    ``local_only`` rule: a tenant's ``route: gpt-4o`` would otherwise carry personal data out.
    A tenant without an entry gets the same order without rules of its own, so giving a tenant
    a budget never changes which global rule decides its requests.

    Within each list a higher ``priority`` goes first and ties keep file order (a stable sort).
    """
    default = CompiledRule(
        name="default",
        priority=-(2**63),
        test=_always,
        desc="no rule matched",
        route="auto",
        model=None,
        on_failure=policy.on_failure,
        local_only=False,
        shadow_rate=policy.shadow.sample_rate,
        store_prompts=policy.store_prompts,
        hit=RuleTrace("default", 0, True, "matched: no other rule matched; the score decides"),
        skipped=RuleTrace("default", 0, False, "skipped: the request pins a model"),
        misses={},
    )

    def ordered(rules: Sequence[CompiledRule]) -> list[CompiledRule]:
        return sorted(rules, key=lambda r: -r.priority)

    def thresholds(tenant: Tenant | None) -> dict[str, float]:
        aliases = dict(policy.aliases)
        if tenant is not None:
            aliases.update(tenant.aliases)
        # An alias with a target_closed_share starts at the policy threshold until calibrated.
        return {
            name: a.threshold if a.threshold is not None else policy.threshold
            for name, a in aliases.items()
            if not a.cascade
        }

    def calibrated(tenant: str | None) -> dict[str, str]:
        names = policy.alias_names(tenant)
        keys = {name: policy.calibration_key(name, tenant) for name in names}
        return {name: key for name, key in keys.items() if key is not None}

    def cascading(tenant: Tenant | None) -> frozenset[str]:
        aliases = dict(policy.aliases)
        if tenant is not None:
            aliases.update(tenant.aliases)
        return frozenset(name for name, a in aliases.items() if a.cascade)

    global_rules = ordered(compiled[None])
    kept_local = [r for r in global_rules if r.local_only]
    rest = [r for r in global_rules if not r.local_only]
    plans: dict[str, Plan] = {}
    for name, tenant in policy.tenants.items():
        rules = (*kept_local, *ordered(compiled[name]), *rest, default)
        plans[name] = Plan(
            name,
            rules,
            thresholds(tenant),
            tenant.daily_budget_usd,
            tenant.over_budget,
            cascading(tenant),
            calibrated(name),
        )
    global_plan = Plan(
        None,
        (*kept_local, *rest, default),
        thresholds(None),
        None,
        "local",
        cascading(None),
        calibrated(None),
    )
    policy._runtime = Runtime(digest, source, plans, global_plan, metadata_fields, warnings)
