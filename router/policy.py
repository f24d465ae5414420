"""The routing policy: a typed YAML language and its pure evaluation.

A policy file says which models exist, which named signals (derived conditions) exist, and which
rules send a request to the local tier, the closed tier, a named model, or let the score decide
(``auto``). :func:`parse_policy` / :func:`load_policy` validate the YAML into a :class:`Policy`
(pydantic, ``extra="forbid"``) and compile every rule into plain closures once; each problem is
reported with file, line, column and key path in a single :class:`~router.errors.PolicyError`.

:func:`evaluate` is pure and total: given a policy and a request's
:class:`~router.signals.Signals` it returns a :class:`Decision` that names the rule that matched,
the target, the score and threshold used, and a trace of every rule considered. It does no
validation, I/O or logging per call. The language reference is ``docs/policy.md``.
"""

from __future__ import annotations

import difflib
import hashlib
import math
import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from router.errors import PolicyError, PolicyIssue
from router.scoring import CAPABILITIES, STAKES
from router.signals import Signals

__all__ = [
    "OPERATORS",
    "POLICY_HEADER_PREFIX",
    "Alias",
    "Comparison",
    "Condition",
    "Decision",
    "HeaderComparison",
    "ModelSpec",
    "Policy",
    "Rule",
    "RuleTrace",
    "Shadow",
    "Tenant",
    "evaluate",
    "load_policy",
    "parse_policy",
    "policy_json_schema",
]

Tier = Literal["local", "closed"]
OnFailure = Literal["local", "closed", "error"]
StorePrompts = Literal["full", "redacted", "none"]
Operator = Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in", "contains", "matches"]
OPERATORS: tuple[str, ...] = get_args(Operator)

# Rule names the evaluator uses for its own steps; a policy may not reuse them.
RESERVED_RULES = ("default", "pinned", "constraint", "no-closed")
#: The only request headers the proxy passes to the policy (further filtered by the caller's
#: key permissions), so the only names a ``header:`` condition may test.
POLICY_HEADER_PREFIX = "x-tiergate-"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SIGNAL_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_STAKES_RANK = {name: rank for rank, name in enumerate(STAKES)}


# --------------------------------------------------------------------------- the typed file


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise PydanticCustomError(
        "scalar",
        "expected a single value (text, number, true/false or null), got {kind}",
        {"kind": type(value).__name__},
    )


def _regex(value: str) -> str:
    try:
        re.compile(value)
    except re.error as exc:
        raise PydanticCustomError(
            "regex",
            "invalid regular expression '{pattern}': {error}",
            {"pattern": value, "error": str(exc)},
        ) from None
    return value


def _bound(value: Any) -> Any:
    if isinstance(value, int | float | str) and not isinstance(value, bool):
        return value
    raise PydanticCustomError(
        "bound", "expected a number (or a stakes level), got {kind}", {"kind": type(value).__name__}
    )


_ScalarSchema = {"type": ["string", "number", "boolean", "null"]}
ScalarValue = Annotated[Any, AfterValidator(_scalar), WithJsonSchema(_ScalarSchema)]
# Order operators take numbers, and stakes levels for `stakes` (``stakes: {gte: medium}``).
Bound = Annotated[Any, AfterValidator(_bound), WithJsonSchema({"type": ["number", "string"]})]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=False)


class Comparison(_Strict):
    """Operators applied to one signal; several operators in one mapping must all hold.

    Shorthands: a bare value means ``eq`` (``capability: coding``), a list means ``in``
    (``capability: [coding, math]``). A missing signal (``None``) satisfies only ``eq: null``.
    """

    model_config = ConfigDict(
        json_schema_extra={"description": "operators: " + ", ".join(OPERATORS)}
    )

    eq: ScalarValue = None
    ne: ScalarValue = None
    gt: Bound | None = None
    gte: Bound | None = None
    lt: Bound | None = None
    lte: Bound | None = None
    in_: list[ScalarValue] | None = Field(None, alias="in")
    not_in: list[ScalarValue] | None = None
    contains: ScalarValue = None
    matches: Annotated[str, AfterValidator(_regex)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, list):
            return {"in": value}
        if not isinstance(value, dict):
            return {"eq": value}
        unknown = [k for k in value if k not in OPERATORS and k not in cls._extra_keys()]
        if unknown:
            raise PydanticCustomError(
                "unknown_operator",
                "unknown operator '{op}' (expected one of {expected})",
                {"op": str(unknown[0]), "expected": ", ".join(OPERATORS)},
            )
        return value

    @classmethod
    def _extra_keys(cls) -> tuple[str, ...]:
        return ()

    def operators(self) -> list[tuple[str, Any]]:
        """The operators the author wrote, with their values, in a stable order."""
        fields_set = self.model_fields_set
        out: list[tuple[str, Any]] = []
        for op in OPERATORS:
            attr = "in_" if op == "in" else op
            if attr in fields_set:
                out.append((op, getattr(self, attr)))
        return out


class HeaderComparison(Comparison):
    """A request header: ``header: {name: x-tiergate-stakes, eq: high}`` (name is case-free)."""

    name: str

    @classmethod
    def _extra_keys(cls) -> tuple[str, ...]:
        return ("name",)


def _condition_from_string(value: Any) -> Any:
    return {"signal": value} if isinstance(value, str) else value


class Condition(BaseModel):
    """A ``when:`` clause. Entries in one mapping must all hold (an implicit ``all``).

    ``all: []`` always matches, ``any: []`` never matches. A bare string, or ``signal: name``,
    refers to a signal defined under ``signals:``; ``name: true`` does the same.
    ``metadata.<field>`` reads the request's ``metadata`` (dots walk nested mappings).
    """

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=False)
    __pydantic_extra__: dict[str, Comparison] = Field(init=False)

    all_: list[Condition] | None = Field(None, alias="all")
    any_: list[Condition] | None = Field(None, alias="any")
    not_: Condition | None = Field(None, alias="not")
    signal: str | None = None
    capability: Comparison | None = None
    stakes: Comparison | None = None
    pii: Comparison | None = None
    pii_kinds: Comparison | None = None
    prompt_tokens: Comparison | None = None
    max_tokens: Comparison | None = None
    has_images: Comparison | None = None
    has_tools: Comparison | None = None
    turns: Comparison | None = None
    score: Comparison | None = None
    local_accuracy: Comparison | None = None
    tenant: Comparison | None = None
    alias: Comparison | None = None
    header: HeaderComparison | None = None

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        return _condition_from_string(value)


class ModelSpec(_Strict):
    """One concrete model clients may pin (by its key) and rules may target."""

    name: str = ""
    tier: Tier
    litellm_model: str | None = None
    api_base: str | None = None
    api_key_env: str | None = None
    context_window: int | None = Field(None, gt=0)
    supports_tools: bool
    supports_images: bool
    timeout_s: float | None = Field(None, gt=0)
    description: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _tier_defaults(cls, value: Any) -> Any:
        # Closed frontier APIs take tools and images; a local model is assumed not to.
        # (An invalid tier is reported on its own, without "missing supports_*" noise.)
        if isinstance(value, dict):
            closed = value.get("tier") == "closed"
            value = {"supports_tools": closed, "supports_images": closed, **value}
        return value


class Shadow(_Strict):
    """Shadow-judge this fraction of locally served requests against the default closed model."""

    sample_rate: float = Field(0.0, ge=0.0, le=1.0)


class Rule(_Strict):
    """``when`` the condition holds, ``route`` the request; the first matching rule wins."""

    name: str
    description: str | None = None
    priority: int = 0
    when: Condition | None = None
    route: str
    on_failure: OnFailure | None = None
    local_only: bool = False
    shadow: Shadow | None = None
    store_prompts: StorePrompts | None = None


class Cascade(_Strict):
    """How a cascade runs: the local model answers first, and an answer whose confidence (the
    cascade model's P(the local answer is right)) is below ``threshold`` escalates to the
    closed tier. A stream holds back its first ``hold_back_tokens`` tokens until then."""

    threshold: float = Field(0.5, ge=0.0, le=1.0)
    hold_back_tokens: int = Field(16, ge=1, le=512)


class Alias(_Strict):
    """A virtual model name (``auto``, ``auto-cheap``): exactly one of the settings. ``cascade:
    true`` makes the score's ``auto`` route a cascade instead (``auto-cascade``)."""

    description: str | None = None
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    target_closed_share: float | None = Field(None, ge=0.0, le=1.0)
    cascade: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> Alias:
        settings = (self.threshold is not None, self.target_closed_share is not None, self.cascade)
        if sum(settings) != 1:
            raise PydanticCustomError(
                "alias_setting", "set exactly one of threshold, target_closed_share or cascade"
            )
        return self


class Tenant(_Strict):
    """Per-tenant rules (evaluated before the global ones), alias overrides and a budget."""

    rules: list[Rule] = Field(default_factory=list)
    aliases: dict[str, Alias] = Field(default_factory=dict)
    daily_budget_usd: float | None = Field(None, ge=0.0)
    over_budget: Literal["local", "reject"] = "local"


class Policy(_Strict):
    """A validated policy. Build one with :func:`parse_policy` or :func:`load_policy`.

    ``local_model`` defaults to the first local model, ``closed_models`` (first = default closed
    model, the rest fallbacks in order) to every closed model in file order. Treat as read-only:
    the compiled rules are built once at load.
    """

    version: Literal[1]
    description: str | None = None
    models: dict[str, ModelSpec]
    local_model: str | None = None
    closed_models: list[str] = Field(default_factory=list)
    threshold: float = Field(0.5, ge=0.0, le=1.0)
    on_failure: OnFailure = "closed"
    queue_full: Literal["spill", "reject"] = "spill"
    fail_closed: bool = Field(
        False,
        description="When no closed model is available (no API key): false serves what the "
        "policy routes closed with the local model instead (x-tiergate-fallback: "
        "no-closed->local); true answers 503.",
    )
    store_prompts: StorePrompts = "full"
    retention_days: int | None = Field(30, ge=1)
    shadow: Shadow = Field(default_factory=Shadow)
    cascade: Cascade = Field(default_factory=Cascade)
    signals: dict[str, Condition] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)
    aliases: dict[str, Alias] = Field(default_factory=dict)
    tenants: dict[str, Tenant] = Field(default_factory=dict)

    _runtime: _Runtime | None = PrivateAttr(None)

    @property
    def digest(self) -> str:
        """Short sha256 of the source text: the policy version for headers and records."""
        return self._runtime.digest if self._runtime else ""

    @property
    def source(self) -> str:
        """The file the policy came from, or ``<string>``."""
        return self._runtime.source if self._runtime else "<string>"

    @property
    def metadata_fields(self) -> frozenset[str]:
        """The top-level ``metadata`` keys some condition reads (``metadata.team.x`` reads
        ``team``): the only ones a request's signals and outcome record keep."""
        return self._runtime.metadata_fields if self._runtime else frozenset()

    def resolve_model(self, name: str) -> ModelSpec | None:
        """The model a client may pin by ``name``, or ``None``."""
        return self.models.get(name)

    def alias_names(self, tenant: str | None = None) -> list[str]:
        """Alias names (``auto`` first), including the tenant's own, for ``GET /v1/models``."""
        names = list(self.aliases)
        if tenant is not None and tenant in self.tenants:
            names += [a for a in self.tenants[tenant].aliases if a not in self.aliases]
        return names

    def alias_for(self, name: str, tenant: str | None = None) -> Alias | None:
        """The alias settings in force for ``tenant`` (its override, else the global one)."""
        if tenant is not None and tenant in self.tenants:
            override = self.tenants[tenant].aliases.get(name)
            if override is not None:
                return override
        return self.aliases.get(name)

    def is_known_model(self, name: str, tenant: str | None = None) -> bool:
        """Whether ``name`` is an alias or a model; anything else is a 404 for the client."""
        return name in self.models or self.alias_for(name, tenant) is not None


Condition.model_rebuild()


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class RuleTrace:
    """One step of a decision: a rule considered (or a step such as a constraint), and why."""

    name: str
    priority: int
    matched: bool
    why: str

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "name": self.name,
            "priority": self.priority,
            "matched": self.matched,
            "why": self.why,
        }


@dataclass(frozen=True, slots=True)
class CascadePlan:
    """A decision that cascades: ``model`` (local) answers first; an answer whose confidence is
    below ``threshold`` is discarded and the request goes to ``escalate_to`` (closed)."""

    threshold: float
    hold_back_tokens: int
    escalate_to: str

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view."""
        return {
            "threshold": self.threshold,
            "hold_back_tokens": self.hold_back_tokens,
            "escalate_to": self.escalate_to,
        }


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one request goes, and why.

    * ``model`` is a key of ``policy.models``; ``fallbacks`` are the models to try, in order, if
      it fails (already filtered to models that can serve the request; empty when
      ``on_failure`` is ``error``).
    * ``local_only``: the request must not leave the local tier (privacy rule, or an exhausted
      budget): no spill, no fallback, no shadow.
    * ``unsatisfiable``: set when the request needs something the chosen model lacks (images,
      tools, context) and the policy forbids moving it (local_only, or a pinned model). The
      caller answers with an error instead of calling the model (400).
    * ``rejected``: set when the tenant's daily budget is spent and its ``over_budget`` is
      ``reject``; the caller answers 429 ``budget_exceeded`` and calls no model. ``tier`` is then
      ``local`` so that a caller that forgets the check still spends nothing.
    * ``no_closed_local``: no closed model was available (no API key) and the policy does not say
      ``fail_closed``, so the local model ends the fallback chain of this closed decision.
    * ``cascade``: set when the request cascades (a ``route: cascade`` rule, or ``auto`` under a
      cascade alias) and can: the local model serves it, no constraint moved it, it is not
      ``local_only`` and a closed model is available to escalate to.
    """

    tier: Tier
    model: str
    rule: str
    score: float
    threshold: float | None
    alias: str
    on_failure: OnFailure
    local_only: bool
    shadow_rate: float
    store_prompts: StorePrompts
    reason: str
    trace: tuple[RuleTrace, ...]
    tenant: str = "default"
    fallbacks: tuple[str, ...] = ()
    unsatisfiable: str | None = None
    rejected: str | None = None
    policy_version: str = ""
    budget_usd: float | None = None  # the tenant's daily budget, for reserving spend

    no_closed_local: bool = False
    profile_entry: str | None = None
    cascade: CascadePlan | None = None

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready view for headers, outcome records and trace spans."""
        return {
            "tier": self.tier,
            "model": self.model,
            "rule": self.rule,
            "score": round(self.score, 6),
            "threshold": self.threshold,
            "alias": self.alias,
            "tenant": self.tenant,
            "on_failure": self.on_failure,
            "fallbacks": list(self.fallbacks),
            "local_only": self.local_only,
            "shadow_rate": self.shadow_rate,
            "store_prompts": self.store_prompts,
            "unsatisfiable": self.unsatisfiable,
            "rejected": self.rejected,
            "no_closed_local": self.no_closed_local,
            "reason": self.reason,
            "policy_version": self.policy_version,
            "profile_entry": self.profile_entry,
            "cascade": self.cascade.as_dict() if self.cascade is not None else None,
            "trace": [step.as_dict() for step in self.trace],
        }


# --------------------------------------------------------------------------- compiled form

# A compiled condition returns None when it holds, else a precomputed text saying what failed:
# no formatting or allocation happens per request.
_Test = Callable[[Signals], str | None]


def _always(_: Signals) -> str | None:
    return None


@dataclass(slots=True)
class _CompiledRule:
    name: str
    priority: int
    test: _Test
    desc: str
    route: str  # "local", "closed", "auto", "cascade" or "model"
    model: str | None
    on_failure: OnFailure
    local_only: bool
    shadow_rate: float
    store_prompts: StorePrompts
    hit: RuleTrace
    skipped: RuleTrace
    misses: dict[str, RuleTrace]
    reads_profile: bool = False  # its condition reads local_accuracy (the local profile)

    def miss(self, why: str) -> RuleTrace:
        trace = self.misses.get(why)
        if trace is None:
            trace = self.misses[why] = RuleTrace(self.name, self.priority, False, why)
        return trace


@dataclass(frozen=True, slots=True)
class _Runtime:
    # What evaluate needs, in one plain object: pydantic private attributes are slow to read.
    digest: str
    source: str
    plans: Mapping[str, _Plan]
    global_plan: _Plan
    metadata_fields: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class _Plan:
    tenant: str | None
    rules: tuple[_CompiledRule, ...]
    thresholds: Mapping[str, float]
    budget_usd: float | None
    over_budget: Literal["local", "reject"]
    cascade_aliases: frozenset[str] = frozenset()


# --------------------------------------------------------------------------- evaluation


def evaluate(
    policy: Policy,
    signals: Signals,
    *,
    thresholds: Mapping[str, float] | None = None,
    spend_today_usd: float | None = None,
    closed_available: bool = True,
) -> Decision:
    """Decide where one request goes. Pure, total on a valid policy, no I/O.

    ``thresholds`` holds calibrated thresholds per alias (the web layer calibrates aliases with a
    ``target_closed_share`` from the outcome store); a value there wins over the policy's.
    ``spend_today_usd`` is the tenant's closed-tier spend today, checked against its budget.
    ``closed_available`` false (no closed model has its API key) adds the local model as the
    last fallback of a closed decision, unless the policy says ``fail_closed``, the request pins
    a model, the rule's ``on_failure`` is ``error`` or the local model cannot take the request.
    Raises ``TypeError`` only for a Policy not built by :func:`parse_policy`/:func:`load_policy`.
    """
    private = policy.__pydantic_private__
    runtime: _Runtime | None = private.get("_runtime") if private else None
    if runtime is None:
        raise TypeError("build a Policy with parse_policy() or load_policy()")
    plan = runtime.plans.get(signals.tenant, runtime.global_plan)
    pinned = signals.alias if signals.alias in policy.models else None
    known = signals.alias in plan.thresholds or signals.alias in plan.cascade_aliases
    alias = signals.alias if known else "auto"
    trace: list[RuleTrace] = []
    rule = _first_match(plan, signals, pinned is not None, trace)

    threshold: float | None = None
    cascades = False
    on_failure: OnFailure
    if rule is None:
        assert pinned is not None  # the default rule matches every unpinned request
        model, reason = pinned, f"request pins model '{pinned}'"
        # A pin names one model: falling back to another would silently break it.
        name, on_failure, local_only = "pinned", "error", False
        shadow_rate, store = policy.shadow.sample_rate, policy.store_prompts
    else:
        name, on_failure, local_only = rule.name, rule.on_failure, rule.local_only
        shadow_rate, store = rule.shadow_rate, rule.store_prompts
        cascades = rule.route == "cascade" or (
            rule.route == "auto" and alias in plan.cascade_aliases
        )
        model, reason, threshold = _route(
            policy, plan, rule, alias, score=signals.score, thresholds=thresholds
        )

    step = _Step(
        policy,
        signals,
        model=model,
        reason=reason,
        local_only=local_only,
        pinned=pinned is not None,
        trace=trace,
    )
    step.apply_constraints()
    step.apply_budget(plan, spend_today_usd)
    if step.forced_local:
        name, local_only = step.rule or name, True
    if step.over_budget:  # shadow traffic would spend the exhausted budget
        shadow_rate = 0.0
    # (local_only rules are compiled with shadow 0; fallbacks() turns their on_failure to error)
    on_failure, fallbacks = step.fallbacks(on_failure, local_only or step.over_budget)
    no_closed_local = False
    if (
        not closed_available
        and on_failure != "error"
        and not policy.fail_closed
        and policy.local_model not in fallbacks  # on_failure: local has put it there already
    ):
        no_closed_local = step.local_when_no_closed()
        if no_closed_local:
            on_failure, fallbacks = "local", (*fallbacks, policy.local_model or "")
    spec = policy.models[step.model]
    cascade = None
    if cascades:
        cascade, why = _cascade_plan(policy, spec, local_only, closed_available)
        step.reason += why
    profile_entry = None
    if rule is not None and any(r.reads_profile for r in plan.rules[: len(trace)]):
        profile_entry = _profile_entry(signals, plan, trace)
    return Decision(
        tier=spec.tier,
        model=step.model,
        rule=name,
        score=signals.score,
        threshold=threshold,
        alias=alias,
        on_failure=on_failure,
        local_only=local_only,
        shadow_rate=shadow_rate,
        store_prompts=store,
        reason=step.reason,
        trace=tuple(trace),
        tenant=signals.tenant,
        fallbacks=fallbacks,
        unsatisfiable=step.unsatisfiable,
        rejected=step.rejected,
        policy_version=runtime.digest,
        budget_usd=plan.budget_usd,
        no_closed_local=no_closed_local,
        profile_entry=profile_entry,
        cascade=cascade,
    )


def _route(
    policy: Policy,
    plan: _Plan,
    rule: _CompiledRule,
    alias: str,
    *,
    score: float,
    thresholds: Mapping[str, float] | None,
) -> tuple[str, str, float | None]:
    # The model a matched rule routes to, why, and the score threshold it used (if any).
    name = rule.name
    if rule.route == "cascade":
        return (*_cascade_start(policy, name, None), None)
    if rule.route == "auto" and alias in plan.cascade_aliases:
        return (*_cascade_start(policy, name, alias), None)
    if rule.route == "auto":
        threshold = plan.thresholds[alias]
        if thresholds is not None:
            threshold = thresholds.get(alias, threshold)
        model, reason = _auto(policy, score, threshold, alias)
        return model, f"rule '{name}': {reason}", threshold
    model = _route_model(policy, rule)
    kind = rule.route if rule.model is None else "model"
    return model, f"rule '{name}' routes to {kind} '{model}'", None


def _cascade_start(policy: Policy, rule: str, alias: str | None) -> tuple[str, str]:
    # A cascade starts on the local model (the checker requires one).
    model = _default_model(policy, "local")
    assert model is not None
    via = f" (alias '{alias}')" if alias is not None else ""
    return model, f"rule '{rule}'{via}: cascade, the local model '{model}' answers first"


def _cascade_plan(
    policy: Policy, spec: ModelSpec, local_only: bool, closed_available: bool
) -> tuple[CascadePlan | None, str]:
    # The cascade as it will run, or None and why it will not.
    if spec.tier != "local":
        return None, "; no cascade: the request cannot be served locally"
    if local_only:
        return None, "; no cascade: local_only, the local answer is kept whatever its confidence"
    if not policy.closed_models or not closed_available:
        return None, "; no cascade: no closed model to escalate to"
    settings = policy.cascade
    target = policy.closed_models[0]
    plan = CascadePlan(settings.threshold, settings.hold_back_tokens, target)
    return plan, f"; confidence below {settings.threshold:g} escalates to '{target}'"


def _profile_entry(signals: Signals, plan: _Plan, trace: list[RuleTrace]) -> str:
    # Which profile entry the decision read, and the rules that read it (matched or not).
    rules = [
        f"{t.name} ({'matched' if t.matched else 'no match'})"
        for r, t in zip(plan.rules, trace, strict=False)
        if r.reads_profile and r.name == t.name
    ]
    accuracy = "unknown" if signals.local_accuracy is None else f"{signals.local_accuracy:.2f}"
    return (
        f"{signals.local_profile or 'no profile'}: {signals.capability} accuracy {accuracy}; "
        f"read by {', '.join(rules)}"
    )


def usd(amount: float) -> str:
    """A dollar amount with two significant digits below a dollar ($0.0075, not $0.01)."""
    if amount >= 1 or amount <= 0:
        return f"${amount:,.2f}"
    decimals = max(2, 1 - math.floor(math.log10(amount)))
    text = f"{amount:.{decimals}f}".rstrip("0")
    return "$" + text + "0" * (2 - len(text.split(".")[1]))


def _first_match(
    plan: _Plan, signals: Signals, pinned: bool, trace: list[RuleTrace]
) -> _CompiledRule | None:
    for rule in plan.rules:
        if pinned and not rule.local_only:
            trace.append(rule.skipped)
            continue
        why = rule.test(signals)
        if why is None:
            trace.append(rule.hit)
            return rule
        trace.append(rule.miss(why))
    return None


def _default_model(policy: Policy, tier: Tier) -> str | None:
    if tier == "local":
        return policy.local_model
    return policy.closed_models[0] if policy.closed_models else None


def _auto(policy: Policy, score: float, threshold: float, alias: str) -> tuple[str, str]:
    tier: Tier = "closed" if score >= threshold else "local"
    cmp = ">=" if tier == "closed" else "<"
    reason = f"score {score:.3f} {cmp} threshold {threshold:.3f} (alias '{alias}') -> {tier}"
    model = _default_model(policy, tier)
    if model is None:  # a one-tier policy: everything goes to the tier that exists
        other: Tier = "local" if tier == "closed" else "closed"
        model = _default_model(policy, other)
        reason += f", but the policy has no {tier} model -> {other}"
    assert model is not None  # the checker requires at least one model
    return model, reason


def _route_model(policy: Policy, rule: _CompiledRule) -> str:
    if rule.model is not None:
        return rule.model
    model = _default_model(policy, "local" if rule.route == "local" else "closed")
    assert model is not None  # the checker rejects routes to a tier with no model
    return model


def _unfit(spec: ModelSpec, signals: Signals) -> str | None:
    """Why ``spec`` cannot serve the request without dropping part of it, or None."""
    if signals.has_images and not spec.supports_images:
        return "images"
    if signals.has_tools and not spec.supports_tools:
        return "tools"
    if spec.context_window is not None:
        needed = signals.prompt_tokens + (signals.max_tokens or 0)
        if needed > spec.context_window:
            return f"{needed} tokens (context window {spec.context_window})"
    return None


class _Step:
    """The post-rule steps of one decision: hard constraints, budget, fallbacks."""

    __slots__ = (
        "forced_local",
        "local_only",
        "model",
        "over_budget",
        "pinned",
        "policy",
        "reason",
        "rejected",
        "rule",
        "signals",
        "trace",
        "unsatisfiable",
    )

    def __init__(
        self,
        policy: Policy,
        signals: Signals,
        *,
        model: str,
        reason: str,
        local_only: bool,
        pinned: bool,
        trace: list[RuleTrace],
    ) -> None:
        self.policy, self.signals, self.model, self.reason = policy, signals, model, reason
        self.local_only, self.pinned, self.trace = local_only, pinned, trace
        self.unsatisfiable: str | None = None
        self.rejected: str | None = None
        self.rule: str | None = None
        self.forced_local = False
        self.over_budget = False

    def _first_closed_fit(self, exclude: str) -> str | None:
        models = self.policy.models
        for name in self.policy.closed_models:
            if name != exclude and _unfit(models[name], self.signals) is None:
                return name
        return None

    def apply_constraints(self) -> None:
        # The local tier must never silently drop images or tools, or truncate a prompt.
        unfit = _unfit(self.policy.models[self.model], self.signals)
        if unfit is None:
            return
        what = f"model '{self.model}' cannot take {unfit}"
        if self.local_only or self.pinned:
            why = "the rule is local_only" if self.local_only else "the request pins it"
            self.unsatisfiable = f"{what} and {why}"
            self.trace.append(RuleTrace("constraint", 0, False, self.unsatisfiable))
            self.reason += f"; {self.unsatisfiable}"
            return
        target = self._first_closed_fit(self.model)
        if target is None:
            self.unsatisfiable = f"{what} and no closed model can either"
            self.trace.append(RuleTrace("constraint", 0, False, self.unsatisfiable))
            self.reason += f"; {self.unsatisfiable}"
            return
        note = f"{what} -> moved to '{target}'"
        self.trace.append(RuleTrace("constraint", 0, True, note))
        self.reason += f"; {note}"
        self.model = target

    def apply_budget(self, plan: _Plan, spend: float | None) -> None:
        if plan.budget_usd is None or spend is None or spend < plan.budget_usd:
            return
        self.over_budget = True
        tenant = plan.tenant or self.signals.tenant
        spent = f"tenant '{tenant}' spent {usd(spend)} of its {usd(plan.budget_usd)} daily budget"
        if self.policy.models[self.model].tier == "local":
            return
        self.rule = f"budget:{tenant}"
        local = self.policy.local_model
        local_unfit = "there is no local model" if local is None else None
        if local is not None:
            unfit = _unfit(self.policy.models[local], self.signals)
            local_unfit = f"the local model cannot take {unfit}" if unfit else None
        if plan.over_budget == "reject" or local_unfit is not None:
            self.rejected = spent if local_unfit is None else f"{spent} and {local_unfit}"
            self.trace.append(RuleTrace(self.rule, 0, True, f"rejected: {self.rejected}"))
            self.reason += f"; rejected: {self.rejected}"
        else:
            self.trace.append(RuleTrace(self.rule, 0, True, f"{spent} -> local"))
            self.reason += f"; {spent} -> forced local"
        if local is not None:
            self.model = local
            self.forced_local = True

    def local_when_no_closed(self) -> bool:
        """Whether the local model may end the chain of a closed decision while no closed model
        is available (evaluate's ``closed_available``); notes it in the reason and trace."""
        local = self.policy.local_model
        if self.policy.models[self.model].tier != "closed" or self.pinned or local is None:
            return False
        unfit = _unfit(self.policy.models[local], self.signals)
        if unfit is not None:
            self.reason += f"; no closed model is available and the local model cannot take {unfit}"
            return False
        note = "no closed model is available (no API key) -> local (fail_closed: false)"
        self.trace.append(RuleTrace("no-closed", 0, True, note))
        self.reason += f"; {note}"
        return True

    def fallbacks(self, on_failure: OnFailure, stay: bool) -> tuple[OnFailure, tuple[str, ...]]:
        if self.rejected is not None or self.unsatisfiable is not None or on_failure == "error":
            return "error", ()
        tier = self.policy.models[self.model].tier
        if on_failure == "local":
            local = self.policy.local_model
            if tier == "local" or local is None:
                return "error", ()
            if _unfit(self.policy.models[local], self.signals) is not None:
                self.reason += "; no local fallback (the local model cannot serve this request)"
                return "error", ()
            return "local", (local,)
        if stay:  # a closed fallback would leave the local tier or spend an exhausted budget
            return "error", ()
        models = self.policy.models
        fits = tuple(
            name
            for name in self.policy.closed_models
            if name != self.model and _unfit(models[name], self.signals) is None
        )
        return ("closed", fits) if fits else ("error", ())


# --------------------------------------------------------------------------- parsing


Loc = tuple[str | int, ...]


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
    _build_plans(policy, checker.compiled, digest, source, frozenset(checker.metadata_fields))
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
        hint = " (add `version: 1` at the top)" if loc == ("version",) else ""
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
            message = f"unsupported version {err['input']!r} (this Tiergate reads version 1)"
        return locate(loc, message)
    if kind in _FRIENDLY:
        return locate(loc, f"{_FRIENDLY[kind]}, got {_describe(err['input'])}")
    if kind in _BOUNDS:
        word, key = _BOUNDS[kind]
        return locate(loc, f"must be {word} {ctx.get(key)}, got {_describe(err['input'])}")
    message = str(err["msg"])
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    return locate(loc, message[:1].lower() + message[1:])


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

# Built-in signals: how to read each from Signals, and what kind of value it is.
_Kind = Literal["bool", "number", "text", "capability", "stakes", "list", "any"]
_BUILTINS: dict[str, _Kind] = {
    "capability": "capability",
    "stakes": "stakes",
    "pii": "bool",
    "pii_kinds": "list",
    "prompt_tokens": "number",
    "max_tokens": "number",
    "has_images": "bool",
    "has_tools": "bool",
    "turns": "number",
    "score": "number",
    "local_accuracy": "number",
    "tenant": "text",
    "alias": "text",
}
_KIND_OPS: dict[str, frozenset[str]] = {
    "bool": frozenset({"eq", "ne"}),
    "number": frozenset({"eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in"}),
    "text": frozenset({"eq", "ne", "in", "not_in", "contains", "matches"}),
    "capability": frozenset({"eq", "ne", "in", "not_in", "matches"}),
    "stakes": frozenset({"eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in"}),
    "list": frozenset({"contains", "in", "not_in", "matches"}),
    "any": frozenset(OPERATORS),
}
_CONDITION_KEYS = ("all", "any", "not", "signal", "header", *_BUILTINS)


class _Checker:
    """Cross-reference checks that need the whole file, and compilation of the conditions."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._profile_seen: set[str] = set()
        self.problems: list[tuple[Loc, str]] = []
        self.signal_tests: dict[str, tuple[_Test, str]] = {}
        self.resolving: list[str] = []
        self.compiled: dict[str | None, list[_CompiledRule]] = {}
        self.metadata_fields: set[str] = set()  # top-level metadata keys a condition reads

    def add(self, loc: Loc, message: str) -> None:
        self.problems.append((loc, message))

    def check(self) -> list[tuple[Loc, str]]:
        self._check_models()
        for name in self.policy.signals:
            self._signal(name, ("signals", name))
        self._check_aliases(self.policy.aliases, ("aliases",))
        self.compiled[None] = self._rules(self.policy.rules, ("rules",), set())
        global_names = {r.name for r in self.policy.rules}
        for tenant, cfg in self.policy.tenants.items():
            loc: Loc = ("tenants", tenant)
            self._check_aliases(cfg.aliases, (*loc, "aliases"), tenant=True)
            self.compiled[tenant] = self._rules(cfg.rules, (*loc, "rules"), global_names)
        if "auto" not in self.policy.aliases:
            self.policy.aliases = {
                "auto": Alias(threshold=self.policy.threshold),
                **self.policy.aliases,
            }
        return self.problems

    def _check_models(self) -> None:
        p = self.policy
        if not p.models:
            self.add(("models",), "define at least one model")
        for key, spec in p.models.items():
            if spec.name and spec.name != key:
                self.add(
                    ("models", key, "name"), f"name {spec.name!r} differs from its key {key!r}"
                )
            spec.name = key
            if spec.tier == "closed" and not spec.litellm_model:
                self.add(("models", key), "a closed model needs litellm_model (e.g. openai/gpt-4o)")
        if p.local_model is None:
            p.local_model = next((k for k, m in p.models.items() if m.tier == "local"), None)
        elif p.local_model not in p.models:
            self.add(("local_model",), self._unknown_model(p.local_model))
        elif p.models[p.local_model].tier != "local":
            self.add(("local_model",), f"model {p.local_model!r} is not tier local")
        if not p.closed_models:
            p.closed_models = [k for k, m in p.models.items() if m.tier == "closed"]
        for i, name in enumerate(p.closed_models):
            if name not in p.models:
                self.add(("closed_models", i), self._unknown_model(name))
            elif p.models[name].tier != "closed":
                self.add(("closed_models", i), f"model {name!r} is not tier closed")

    def _unknown_model(self, name: str) -> str:
        return f"unknown model {name!r} (models: {', '.join(self.policy.models) or 'none'})"

    def _check_aliases(self, aliases: Mapping[str, Alias], loc: Loc, tenant: bool = False) -> None:
        for name in aliases:
            if name in self.policy.models:
                self.add((*loc, name), f"alias {name!r} has the name of a model; pick another")
            elif not _NAME.match(name):
                self.add((*loc, name), f"alias name {name!r}: use letters, digits, '-', '_', '.'")

    # -- rules

    def _rules(self, rules: Sequence[Rule], loc: Loc, taken: set[str]) -> list[_CompiledRule]:
        seen: dict[str, int] = {}
        out: list[_CompiledRule] = []
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
        if not _NAME.match(name):
            self.add(loc, f"rule name {name!r}: use letters, digits, '-', '_', '.'")
        elif name in RESERVED_RULES or name.startswith("budget:"):
            self.add(loc, f"rule name {name!r} is reserved for the evaluator's own steps")
        elif name in seen:
            self.add(loc, f"duplicate rule name {name!r} (first used by rule {seen[name]})")
        elif name in taken:
            self.add(loc, f"rule name {name!r} is already used by a global rule")
        seen.setdefault(name, i)

    def _rule(self, rule: Rule, loc: Loc) -> _CompiledRule | None:
        p = self.policy
        test: _Test = _always
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
        return _CompiledRule(
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

    def _signal(self, name: str, loc: Loc) -> tuple[_Test, str] | None:
        if name in self.signal_tests:
            return self.signal_tests[name]
        if name in self.resolving:
            cycle = " -> ".join([*self.resolving[self.resolving.index(name) :], name])
            self.add(loc, f"signals refer to each other in a cycle: {cycle}")
            return None
        if name in _CONDITION_KEYS or not _SIGNAL_NAME.match(name):
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

    def _signal_ref(self, name: str, loc: Loc) -> tuple[_Test, str]:
        if name not in self.policy.signals:
            defined = ", ".join(self.policy.signals) or "none defined"
            hint = _suggest(name, list(self.policy.signals))
            self.add(loc, f"unknown signal {name!r}{hint} (signals: {defined})")
            return _always, name
        return self._signal(name, loc) or (_always, name)

    def _condition(self, cond: Condition, loc: Loc) -> tuple[_Test, str]:
        parts: list[tuple[_Test, str]] = []
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
        for key, kind in _BUILTINS.items():
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
                    f"header {name}", "any", _header_getter(name), cond.header, (*loc, "header")
                )
            )
        for key, cmp in (cond.__pydantic_extra__ or {}).items():
            parts.append(self._extra(key, cmp, (*loc, key)))
        return _all(parts) if len(parts) != 1 else parts[0]

    def _extra(self, key: str, cmp: Comparison, loc: Loc) -> tuple[_Test, str]:
        if key.startswith("metadata.") and len(key) > len("metadata."):
            self.metadata_fields.add(key[9:].split(".", maxsplit=1)[0])
            return self._comparison(key, "any", _metadata_getter(key[9:].split(".")), cmp, loc)
        if key in self.policy.signals:
            ref = (self._signal(key, loc) or (_always, key))[0]

            def as_bool(s: Signals) -> bool:
                return ref(s) is None

            return self._comparison(key, "bool", as_bool, cmp, loc)
        names = [*_CONDITION_KEYS, *self.policy.signals]
        expected = ", ".join([*names, "metadata.<field>"])
        self.add(loc, f"unknown signal {key!r}{_suggest(key, names)} (expected one of {expected})")
        return _always, key

    def _comparison(
        self, label: str, kind: _Kind, get: Callable[[Signals], Any], cmp: Comparison, loc: Loc
    ) -> tuple[_Test, str]:
        ops = cmp.operators()
        if not ops:
            self.add(loc, "no operator given (expected one of " + ", ".join(OPERATORS) + ")")
            return _always, label
        parts: list[tuple[_Test, str]] = []
        for op, value in ops:
            if op not in _KIND_OPS[kind]:
                allowed = ", ".join(o for o in OPERATORS if o in _KIND_OPS[kind])
                self.add((*loc, op), f"operator {op!r} does not apply to {label} (use {allowed})")
                continue
            checked = self._value(label, kind, op, value, (*loc, op))
            if checked is not _NOTHING:  # a bad value may not compile (`matches: null`)
                parts.append(_leaf(label, kind, get, op, checked))
        return _all(parts) if len(parts) != 1 else parts[0]

    def _value(self, label: str, kind: _Kind, op: str, value: Any, loc: Loc) -> Any:
        """The value to compile, or ``_NOTHING`` when it is wrong (the problem is recorded)."""
        if op in ("in", "not_in") and not isinstance(value, list):
            self.add(loc, f"{label} {op}: expected a list, got {_describe(value)}")
            return _NOTHING
        values = value if op in ("in", "not_in") else [value]
        bad = next((v for v in values if not _value_ok(kind, op, v)), _NOTHING)
        if bad is not _NOTHING:
            self.add(loc, _bad_value(label, kind, op, bad))
            return _NOTHING
        if kind == "stakes" and op in ("gt", "gte", "lt", "lte"):
            return _STAKES_RANK.get(value, 0)
        return value


_NOTHING = object()


def _value_ok(kind: _Kind, op: str, v: Any) -> bool:
    if op == "matches":
        return isinstance(v, str)
    if op == "eq" and v is None:
        return True
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "number":
        return isinstance(v, int | float) and not isinstance(v, bool)
    if kind in ("text", "list"):
        return isinstance(v, str)
    if kind == "capability":
        return v in CAPABILITIES
    if kind == "stakes":
        return v in STAKES
    if op in ("gt", "gte", "lt", "lte"):
        return isinstance(v, int | float) and not isinstance(v, bool)
    return v is not None


def _bad_value(label: str, kind: _Kind, op: str, value: Any) -> str:
    if op != "matches" and kind in ("capability", "stakes"):
        names = CAPABILITIES if kind == "capability" else STAKES
        what = "capability" if kind == "capability" else "stakes level"
        return f"unknown {what} {value!r}{_suggest(str(value), names)} (expected one of " + (
            ", ".join(names) + ")"
        )
    expected = {
        "bool": "true or false",
        "number": "a number",
        "text": "text",
        "list": "text",
        "any": "a number" if op in _ORDER else "a value",
    }[kind]
    if op == "matches":
        expected = "a regular expression"
    return f"{label} {op}: expected {expected}, got {_describe(value)}"


def _suggest(word: str, options: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.75)
    return f", did you mean {close[0]!r}?" if close else ""


# --------------------------------------------------------------------------- closures


def _getter(key: str, kind: _Kind) -> Callable[[Signals], Any]:
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


_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "gt": lambda x, v: x > v,
    "gte": lambda x, v: x >= v,
    "lt": lambda x, v: x < v,
    "lte": lambda x, v: x <= v,
}
_SYMBOL = {"eq": "==", "ne": "!=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}


def _leaf(
    label: str, kind: _Kind, get: Callable[[Signals], Any], op: str, v: Any
) -> tuple[_Test, str]:
    shown = STAKES[v] if kind == "stakes" and op in _ORDER else v
    if isinstance(shown, float) and shown.is_integer():
        shown = int(shown)
    desc = f"{label} {_SYMBOL.get(op, op.replace('_', ' '))} {shown!r}"
    fail = f"{desc} is false"
    pred = _predicate(kind, op, v, get)

    def test(s: Signals) -> str | None:
        return None if pred(s) else fail

    return test, desc


def _predicate(
    kind: _Kind, op: str, v: Any, get: Callable[[Signals], Any]
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
    if op in _ORDER:
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
    kind: _Kind, op: str, v: Any, get: Callable[[Signals], Any]
) -> Callable[[Signals], bool]:
    cmp = _ORDER[op]
    if kind == "stakes":
        rank = _STAKES_RANK
        return lambda s: (x := rank.get(get(s))) is not None and cmp(x, v)
    if kind == "any":
        return lambda s: (x := _number(get(s))) is not None and cmp(x, v)
    return lambda s: (x := get(s)) is not None and cmp(x, v)


def _membership(
    kind: _Kind,
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


def _all(parts: list[tuple[_Test, str]]) -> tuple[_Test, str]:
    tests = tuple(t for t, _ in parts)
    desc = "(" + " and ".join(d for _, d in parts) + ")" if parts else "all [] (always)"

    def test(s: Signals) -> str | None:
        for t in tests:
            why = t(s)
            if why is not None:
                return why
        return None

    return test, desc


def _any(parts: list[tuple[_Test, str]]) -> tuple[_Test, str]:
    tests = tuple(t for t, _ in parts)
    desc = "(" + " or ".join(d for _, d in parts) + ")" if parts else "any [] (never)"
    fail = f"none of {desc}" if parts else "any [] never matches"

    def test(s: Signals) -> str | None:
        for t in tests:
            if t(s) is None:
                return None
        return fail

    return test, desc


def _not(part: tuple[_Test, str]) -> tuple[_Test, str]:
    inner, inner_desc = part
    desc = f"not {inner_desc}"
    fail = f"{inner_desc} is true"

    def test(s: Signals) -> str | None:
        return fail if inner(s) is None else None

    return test, desc


def _build_plans(
    policy: Policy,
    compiled: Mapping[str | None, list[_CompiledRule]],
    digest: str,
    source: str,
    metadata_fields: frozenset[str] = frozenset(),
) -> None:
    """Order each tenant's rules once: its own rules, then the global ones, then ``default``.

    Within each list a higher ``priority`` goes first and ties keep file order (a stable sort).
    """
    default = _CompiledRule(
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

    def ordered(rules: Sequence[_CompiledRule]) -> list[_CompiledRule]:
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

    def cascading(tenant: Tenant | None) -> frozenset[str]:
        aliases = dict(policy.aliases)
        if tenant is not None:
            aliases.update(tenant.aliases)
        return frozenset(name for name, a in aliases.items() if a.cascade)

    global_rules = ordered(compiled[None])
    plans: dict[str, _Plan] = {}
    for name, tenant in policy.tenants.items():
        rules = (*ordered(compiled[name]), *global_rules, default)
        plans[name] = _Plan(
            name,
            rules,
            thresholds(tenant),
            tenant.daily_budget_usd,
            tenant.over_budget,
            cascading(tenant),
        )
    global_plan = _Plan(
        None, (*global_rules, default), thresholds(None), None, "local", cascading(None)
    )
    policy._runtime = _Runtime(digest, source, plans, global_plan, metadata_fields)


# --------------------------------------------------------------------------- JSON schema


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
    rule_name["pattern"] = _NAME.pattern
    rule_name["not"] = {"enum": list(RESERVED_RULES)}
    for aliases in (schema["properties"]["aliases"], defs["Tenant"]["properties"]["aliases"]):
        aliases["propertyNames"] = {"pattern": _NAME.pattern}
    schema["properties"]["signals"]["propertyNames"] = {"pattern": _signal_pattern()}
    del defs["Comparison"], defs["HeaderComparison"]
    defs["Condition"] = _condition_schema(defs["Condition"])
    for kind in get_args(_Kind):
        defs[f"Comparison_{kind}"] = _comparison_schema(kind)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def _or_null(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def _signal_pattern() -> str:
    # The names _Checker._signal allows: lower_snake_case and not a key of the condition language.
    reserved = "|".join(_CONDITION_KEYS)
    return f"^(?!(?:{reserved})$){_SIGNAL_NAME.pattern.removeprefix('^')}"


def _condition_schema(generated: dict[str, Any]) -> dict[str, Any]:
    """``when:``: a signal's name, or a mapping of combinators, signals and comparisons."""
    mapping = {k: v for k, v in generated.items() if k not in ("title", "description")}
    props = mapping["properties"]
    props["signal"] = _or_null({"type": "string", "pattern": _signal_pattern()})
    for key, kind in _BUILTINS.items():
        props[key] = _or_null({"$ref": f"#/$defs/Comparison_{kind}"})
    header = _operators_schema("any")
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


def _comparison_schema(kind: _Kind) -> dict[str, Any]:
    """What a signal of ``kind`` takes: operators, or a bare value (``eq``) or a list (``in``)."""
    operators = _operators_schema(kind)
    props = operators["properties"]
    shorthands = {"eq": "a bare value means eq", "in": "a list means in"}
    said = [text for op, text in shorthands.items() if op in props]
    return {
        "description": "; ".join([f"operators: {', '.join(props)}", *said]),
        "anyOf": [*(props[op] for op in shorthands if op in props), operators],
    }


def _operators_schema(kind: _Kind) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for op in OPERATORS:
        if op in _KIND_OPS[kind]:
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


def _value_schema(kind: _Kind, op: str) -> dict[str, Any]:
    # One value of `op` on a `kind` signal: what _value_ok accepts, written as JSON Schema.
    if op == "matches":
        return {"type": "string", "format": "regex"}
    if kind == "bool":
        return {"type": "boolean"}
    if kind == "number" or (kind == "any" and op in _ORDER):
        return {"type": "number"}
    if kind in ("text", "list"):
        return {"type": "string"}
    if kind in ("capability", "stakes"):
        return {"enum": list(CAPABILITIES if kind == "capability" else STAKES)}
    return {"type": ["string", "number", "boolean"]}
