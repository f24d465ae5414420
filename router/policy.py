"""The routing policy language: its typed model, the decision, and the pure evaluation.

A policy file says which models exist, which named signals (derived conditions) exist, and which
rules send a request to the local tier, the closed tier, a named model, or let the score decide
(``auto``). The pydantic models here describe the file; ``router.policy_compile`` reads the YAML,
checks it and compiles every rule into plain closures once (``load_policy`` / ``parse_policy``),
and ``router.policy_schema`` describes it as JSON Schema. Both are re-exported from here.

:func:`evaluate` is pure and total: given a policy and a request's
:class:`~router.signals.Signals` it returns a :class:`Decision` that names the rule that matched,
the target, the score and threshold used, and a trace of every rule considered. It does no
validation, I/O or logging per call. The language reference is ``docs/policy.md``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from router.errors import PolicyIssue
from router.schemas import ANTHROPIC_SERVER_FIELDS
from router.signals import Signals

if TYPE_CHECKING:
    from router.policy_compile import load_policy, parse_policy
    from router.policy_schema import policy_json_schema

__all__ = [
    "MIN_ANSWER_TOKENS",
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
    "why_unfit",
]


def __getattr__(name: str) -> Any:
    # The loader and the schema live in their own modules, which import this one; they are
    # re-exported lazily so that ``from router.policy import load_policy`` keeps working.
    if name in ("load_policy", "parse_policy"):
        from router import policy_compile

        return getattr(policy_compile, name)
    if name == "policy_json_schema":
        from router import policy_schema

        return policy_schema.policy_json_schema
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


class ModelPrice(_Strict):
    """What a closed model costs, USD per million tokens: for a model litellm's price table does
    not know (a private endpoint, a model newer or older than the installed litellm), else its
    calls count $0 in costs and budgets."""

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    # Prompt tokens read from / written to the provider's prompt cache; None: the input price.
    cache_read_per_mtok: float | None = Field(None, ge=0)
    cache_write_per_mtok: float | None = Field(None, ge=0)
    # Written to Anthropic's one-hour cache (ttl: 1h); None: the cache_write_per_mtok price.
    cache_write_1h_per_mtok: float | None = Field(None, ge=0)
    # USD per 1,000 searches of the provider's web search tool, as its usage counts them
    # (Anthropic's); None: they count $0.
    web_search_per_1k: float | None = Field(None, ge=0)


class ModelSpec(_Strict):
    """One concrete model clients may pin (by its key) and rules may target."""

    name: str = ""
    tier: Tier
    litellm_model: str | None = None
    api_base: str | None = None
    api_key_env: str | None = None
    context_window: int | None = Field(None, gt=0)
    max_output_tokens: int | None = Field(
        None,
        gt=0,
        description="The most tokens a closed model writes in one answer (its provider's "
        "limit): a request whose max_tokens is over it goes to a model that can take it, as one "
        "over its context_window does. A request without max_tokens is sent this (at most "
        "what the context_window leaves after the prompt), which the budget holds it at; "
        "without it, a Claude model (which requires one) is sent litellm's map's limit, else "
        "4096, and any other writes up to its own limit.",
    )
    supports_tools: bool
    supports_images: bool
    timeout_s: float | None = Field(None, gt=0)
    # "litellm": always call through litellm (no direct OpenAI call, no native pass-through).
    transport: Literal["auto", "litellm"] = "auto"
    price: ModelPrice | None = None  # else litellm's table, by litellm_model
    description: str | None = None

    # What the provider takes at most where the policy says nothing (Policy.know_limits): its
    # output limit, and how many stop sequences. The properties below read them from
    # ``__pydantic_private__`` itself: pydantic's own lookup of a private attribute (its
    # ``__getattr__``) takes ~1.9 us, and they run for each model of every request's chain.
    _provider_output_limit: int | None = PrivateAttr(None)
    _provider_stop_limit: int | None = PrivateAttr(None)
    _provider_sampling: frozenset[str] = PrivateAttr(frozenset())

    @property
    def output_limit(self) -> int | None:
        """The most tokens the model writes in one answer, which a request's ``max_tokens``
        may not pass (:func:`why_unfit`): ``max_output_tokens``, else its provider's limit
        (litellm's model map, :meth:`Policy.know_limits`), else None."""
        limit: int | None = self.__pydantic_private__["_provider_output_limit"]  # type: ignore[index]
        return self.max_output_tokens or limit

    @property
    def stop_limit(self) -> int | None:
        """How many stop sequences the model takes at most (its provider's figure, OpenAI's 4,
        0 for an OpenAI reasoning model, :meth:`Policy.know_limits`), or None where no limit
        is known."""
        limit: int | None = self.__pydantic_private__["_provider_stop_limit"]  # type: ignore[index]
        return limit

    @property
    def refused_sampling(self) -> frozenset[str]:
        """The sampling fields (``signals.SAMPLING_DEFAULTS``) the model refuses at other than
        their default: an OpenAI reasoning model's (:meth:`Policy.know_limits`), else none."""
        refused: frozenset[str] = self.__pydantic_private__["_provider_sampling"]  # type: ignore[index]
        return refused

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
    encoder: bool = Field(
        True,
        description="Whether a classifier with a contextual encoder (router-v9) scores requests: "
        "false scores them with its static companion (router-v6), which decides in well under "
        "a millisecond; a classifier without an encoder is unaffected.",
    )
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

    _runtime: Runtime | None = PrivateAttr(None)

    @property
    def digest(self) -> str:
        """Short sha256 of the source text: the policy version for headers and records."""
        return self._runtime.digest if self._runtime else ""

    @property
    def source(self) -> str:
        """The file the policy came from, or ``<string>``."""
        return self._runtime.source if self._runtime else "<string>"

    @property
    def warnings(self) -> tuple[PolicyIssue, ...]:
        """What the checks found sound but likely not meant, each located in the file: a
        global rule every tenant under ``tenants`` hides behind its own rules, and a rule that
        sends personal data local, to a cascade or to the score without ``local_only`` while a
        closed model is reachable."""
        return self._runtime.warnings if self._runtime else ()

    @property
    def metadata_fields(self) -> frozenset[str]:
        """The top-level ``metadata`` keys some condition reads (``metadata.team.x`` reads
        ``team``): the only ones a request's signals and outcome record keep."""
        return self._runtime.metadata_fields if self._runtime else frozenset()

    def know_limits(
        self,
        output_of: Callable[[str], int | None],
        stops_of: Callable[[str], int | None],
        sampling_of: Callable[[str], frozenset[str]] = lambda _: frozenset(),
    ) -> Policy:
        """This policy, its closed models told what their provider takes at most, by their
        ``litellm_model`` (router.backends.closed: this module reads no provider's table):
        their output limit (``output_of``, litellm's model map) for
        :attr:`ModelSpec.output_limit`, and their stop sequences (``stops_of``) for
        :attr:`ModelSpec.stop_limit`, and the sampling fields it refuses (``sampling_of``) for
        :attr:`ModelSpec.refused_sampling`. The provider refuses a request over any, so it
        goes to a model that takes it (:func:`why_unfit`). What a request without
        ``max_tokens`` is sent stays the policy's."""
        for spec in self.models.values():
            if spec.tier == "closed":
                spec._provider_output_limit = output_of(spec.litellm_model or "")
                spec._provider_stop_limit = stops_of(spec.litellm_model or "")
                spec._provider_sampling = sampling_of(spec.litellm_model or "")
        return self

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

    def calibration_key(self, name: str, tenant: str | None = None) -> str | None:
        """Where alias ``name``'s calibrated threshold for ``tenant`` is kept: ``name`` for a
        global alias with a ``target_closed_share``, ``tenant/name`` for such an alias the
        tenant sets itself (alias names hold no ``/``), None when the alias in force has a fixed
        threshold or cascades. A tenant's own alias is never given the global calibration."""
        alias = self.alias_for(name, tenant)
        if alias is None or alias.target_closed_share is None:
            return None
        own = self.tenants.get(tenant) if tenant is not None else None
        return f"{tenant}/{name}" if own is not None and name in own.aliases else name

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
    * ``rule`` names what decided: the rule that matched, ``pinned``, ``constraint`` when a hard
      constraint moved the request off the model its rule chose (the rule is then in ``reason``
      and ``trace``), or ``budget:<tenant>`` when a spent budget decided.
    * ``local_only``: the request must not leave the local tier (privacy rule, or an exhausted
      budget): no spill, no fallback, no shadow.
    * ``private``: a ``local_only`` rule decided it (not the budget alone): what the caller may
      always ask for (``Gateway.decide``).
    * ``unsatisfiable``: set when the request needs something the chosen model lacks (images,
      tools, context) and the policy forbids moving it (local_only, or a pinned model). The
      caller answers with an error instead of calling the model (400), whose ``param`` is
      ``unsatisfiable_param``: the chat field the model cannot take (:func:`_unfit_field`).
    * ``context_exceeded``: the request is unsatisfiable for want of room (prompt plus
      ``max_tokens`` over the window): the 400 is ``context_length_exceeded``, as OpenAI's and
      the local model's own are, the code agent loops read to shorten their history.
    * ``rejected``: set when the tenant's daily budget is spent and its ``over_budget`` is
      ``reject``; the caller answers 429 ``budget_exceeded`` and calls no model. ``tier`` is then
      ``local`` so that a caller that forgets the check still spends nothing.
    * ``rejected_held``: the refusal is owed to holds of requests in flight (or the outcome
      store's refusal of a hold), not to spend: the spend alone is under the budget, and what
      those requests do not spend is freed as they end, so a retry in a few seconds may pass
      (unless the store's outage refused the hold: ``OutcomeStore.hold_retry_s``).
    * ``no_closed_local``: no closed model was available (no API key) and the policy does not say
      ``fail_closed``, so the local model ends the fallback chain of this closed decision.
    * ``cascade``: set when the request cascades (a ``route: cascade`` rule, or ``auto`` under a
      cascade alias) and can: the local model serves it, no constraint moved it, it is not
      ``local_only`` and a closed model that can take it is available to escalate to.
    * ``cascade_skipped``: why a request that asked for a cascade does not cascade (it is
      served as decided, without the confidence check), else None.
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
    rejected_held: bool = False
    policy_version: str = ""
    unsatisfiable_param: str | None = None
    budget_usd: float | None = None  # the tenant's daily budget, for reserving spend

    no_closed_local: bool = False
    private: bool = False
    profile_entry: str | None = None
    cascade: CascadePlan | None = None
    cascade_skipped: str | None = None
    context_exceeded: bool = False

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
            "cascade_skipped": self.cascade_skipped,
            "trace": [step.as_dict() for step in self.trace],
        }


# --------------------------------------------------------------------------- compiled form

# A compiled condition returns None when it holds, else a precomputed text saying what failed:
# no formatting or allocation happens per request. router.policy_compile builds these.
Test = Callable[[Signals], str | None]


@dataclass(slots=True)
class CompiledRule:
    """One rule as :func:`evaluate` runs it: its condition compiled, its traces built once."""

    name: str
    priority: int
    test: Test
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
class Runtime:
    """What :func:`evaluate` needs, in one plain object (pydantic private attributes are slow
    to read); ``router.policy_compile`` builds it when a policy loads."""

    digest: str
    source: str
    plans: Mapping[str, Plan]
    global_plan: Plan
    metadata_fields: frozenset[str] = frozenset()
    warnings: tuple[PolicyIssue, ...] = ()


@dataclass(frozen=True, slots=True)
class Plan:
    """One tenant's ordered rules (then the global ones, then ``default``), thresholds, budget."""

    tenant: str | None
    rules: tuple[CompiledRule, ...]
    thresholds: Mapping[str, float]
    budget_usd: float | None
    over_budget: Literal["local", "reject"]
    cascade_aliases: frozenset[str] = frozenset()
    #: Alias -> its key in ``evaluate(thresholds=...)`` (:meth:`Policy.calibration_key`), for
    #: the aliases with a ``target_closed_share`` only.
    calibrated: Mapping[str, str] = field(default_factory=dict)


# --------------------------------------------------------------------------- evaluation


def evaluate(
    policy: Policy,
    signals: Signals,
    *,
    thresholds: Mapping[str, float] | None = None,
    spend_today_usd: float | None = None,
    closed_available: bool = True,
    hold_refused: str | None = None,
    held_usd: float = 0.0,
) -> Decision:
    """Decide where one request goes. Pure, total on a valid policy, no I/O.

    ``thresholds`` holds calibrated thresholds per alias (the web layer calibrates aliases with a
    ``target_closed_share`` from the outcome store), keyed by :meth:`Policy.calibration_key`: a
    value there wins over the policy's for an alias with a target share, and only for the
    tenants that alias is in force for.
    ``spend_today_usd`` is the tenant's closed-tier spend today, checked against its budget;
    ``held_usd`` is the part of it that requests in flight hold, not yet spent: a refusal says
    which it is, and one owed to the holds is :attr:`Decision.rejected_held`.
    ``hold_refused``: why the outcome store refused this request's hold against the budget (the
    web layer decides again then): the request is over budget even with the spend under it, and
    the reason gives the spend as it is, followed by this text.
    ``closed_available`` false (no closed model has its API key) adds the local model as the
    last fallback of a closed decision, unless the policy says ``fail_closed``, the request pins
    a model, the rule's ``on_failure`` is ``error`` or the local model cannot take the request.
    Raises ``TypeError`` only for a Policy not built by :func:`parse_policy`/:func:`load_policy`.
    """
    private = policy.__pydantic_private__
    runtime: Runtime | None = private.get("_runtime") if private else None
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
    # A hard constraint that moved the request decided it, not the rule (in reason and trace).
    name = "constraint" if step.moved else name
    by_rule = local_only  # before a spent budget may force it local
    step.apply_budget(plan, spend_today_usd, hold_refused, held_usd)
    if step.forced_local:
        name, local_only = step.rule or name, True
    if step.over_budget:  # shadow traffic would spend the exhausted budget
        shadow_rate = 0.0
    # (local_only rules are compiled with shadow 0; fallbacks() turns their on_failure to error)
    configured = on_failure  # fallbacks() says "error" too when no other closed model is left
    on_failure, fallbacks = step.fallbacks(on_failure, local_only or step.over_budget)
    no_closed_local = False
    if (
        not closed_available
        and configured != "error"
        and step.rejected is None
        and step.unsatisfiable is None
        and not policy.fail_closed
        and policy.local_model not in fallbacks  # on_failure: local has put it there already
    ):
        no_closed_local = step.local_when_no_closed()
        if no_closed_local:
            on_failure, fallbacks = "local", (*fallbacks, policy.local_model or "")
    spec = policy.models[step.model]
    cascade = cascade_skipped = None
    if cascades:
        cascade, why = _cascade_plan(
            policy,
            signals,
            spec,
            local_only=local_only,
            over_budget=step.over_budget,
            closed_available=closed_available,
        )
        step.reason += why
        if cascade is None:
            cascade_skipped = why.removeprefix("; no cascade: ")
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
        # Past the budget a request stays local however it got there: a full local queue must
        # not spill it to the closed tier (Gateway.spill_chain reads local_only).
        local_only=local_only or step.over_budget,
        shadow_rate=shadow_rate,
        store_prompts=store,
        reason=step.reason,
        trace=tuple(trace),
        tenant=signals.tenant,
        fallbacks=fallbacks,
        unsatisfiable=step.unsatisfiable,
        unsatisfiable_param=step.unsatisfiable_param,
        rejected=step.rejected,
        rejected_held=step.rejected is not None and step.budget_held,
        policy_version=runtime.digest,
        budget_usd=plan.budget_usd,
        no_closed_local=no_closed_local,
        private=by_rule,
        profile_entry=profile_entry,
        cascade=cascade,
        cascade_skipped=cascade_skipped,
        context_exceeded=step.context_exceeded,
    )


def _route(
    policy: Policy,
    plan: Plan,
    rule: CompiledRule,
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
        key = plan.calibrated.get(alias)
        if thresholds is not None and key is not None:
            threshold = thresholds.get(key, threshold)
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
    policy: Policy,
    signals: Signals,
    spec: ModelSpec,
    *,
    local_only: bool,
    over_budget: bool,
    closed_available: bool,
) -> tuple[CascadePlan | None, str]:
    # The cascade as it will run, or None and why it will not. It escalates to the first closed
    # model that can take the request (the others it may go on to are the decision's fallbacks,
    # filtered alike); with none, escalating could only fail, and the local answer is served.
    if spec.tier != "local":
        return None, "; no cascade: the request cannot be served locally"
    if local_only:
        return None, "; no cascade: local_only, the local answer is kept whatever its confidence"
    if over_budget:  # escalating would spend the exhausted budget
        return None, "; no cascade: over budget, the local answer is kept whatever its confidence"
    if not policy.closed_models or not closed_available:
        return None, "; no cascade: no closed model to escalate to"
    # The first that fits, read one by one: most requests fit the first (no list is built).
    target = next(
        (n for n in policy.closed_models if why_unfit(policy.models[n], signals) is None), None
    )
    if target is None:
        each = "; ".join(
            f"'{name}' cannot take {why_unfit(policy.models[name], signals)}"
            for name in policy.closed_models
        )
        return None, f"; no cascade: no closed model can take the request ({each})"
    settings = policy.cascade
    plan = CascadePlan(settings.threshold, settings.hold_back_tokens, target)
    return plan, f"; confidence below {settings.threshold:g} escalates to '{target}'"


def _profile_entry(signals: Signals, plan: Plan, trace: list[RuleTrace]) -> str:
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
    plan: Plan, signals: Signals, pinned: bool, trace: list[RuleTrace]
) -> CompiledRule | None:
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


def _route_model(policy: Policy, rule: CompiledRule) -> str:
    if rule.model is not None:
        return rule.model
    model = _default_model(policy, "local" if rule.route == "local" else "closed")
    assert model is not None  # the checker rejects routes to a tier with no model
    return model


#: What a model without tools cannot take when the request offers none but its conversation
#: holds tool calls or results: the sender then knows to change the history, not ``tools``.
_TOOL_HISTORY = "tool calls in the conversation"


#: The fewest tokens a model's context window must leave after the prompt of a request that
#: sets no ``max_tokens`` for the model to take it: a prompt at the window's end (Tiergate's
#: estimate) fit by itself, and the model was sent ``max_tokens: 1`` or wrote to the end of its
#: window at once, a call paid for with no answer in it.
MIN_ANSWER_TOKENS = 16


def why_unfit(spec: ModelSpec, signals: Signals) -> str | None:
    """Why ``spec`` cannot serve the request without dropping part of it, or None: the hard
    constraints (docs/policy.md), which decisions, fallbacks, cascades and shadow judging
    (router.learning) all read."""
    unfit = _unfit_field(spec, signals)
    return None if unfit is None else unfit[0]


def _on_anthropics_api(spec: ModelSpec) -> bool:
    # Whether ``spec`` is reached over Anthropic's own Messages API, as a /v1/messages
    # request is passed to it as sent (router.backends.native.speaks): litellm's chat path
    # drops Anthropic's server-tool blocks and citations, sends a document by URL as an image
    # and rebuilds some of its tools (Signals.native_tools); other providers take none of them.
    model = spec.litellm_model or ""
    return spec.tier == "closed" and spec.transport != "litellm" and model.startswith("anthropic/")


def _anthropic_only(spec: ModelSpec, signals: Signals) -> list[tuple[str, str]]:
    # What of the request only a Claude on Anthropic's API takes and ``spec`` does not, each as
    # a refusal names it with its field (a message's blocks, then the top-level fields, then
    # ``tools``). A Claude there with `transport: litellm` takes the server-side fields, which
    # litellm passes on, and the tools it passes on whole (all but Signals.native_tools).
    held = signals.server_tool_blocks or signals.anthropic_only or signals.anthropic_tools
    if not held or _on_anthropics_api(spec):
        return []
    claude = spec.tier == "closed" and (spec.litellm_model or "").startswith("anthropic/")
    blocks = ", ".join(signals.server_tool_blocks)
    only = [(f"{blocks} blocks", "messages")] if blocks else []
    for name in signals.anthropic_only:
        field = name if name in ANTHROPIC_SERVER_FIELDS else "messages"
        if not (claude and field != "messages"):
            only.append((name, field))
    tools = ", ".join(signals.native_tools if claude else signals.anthropic_tools)
    return [*only, (f"{tools} tools", "tools")] if tools else only


def _unfit_decoding(spec: ModelSpec, signals: Signals) -> tuple[str, str] | None:
    # What the request asks of how the answer is written that ``spec`` refuses (a 400 from its
    # provider): more stop sequences than it takes, a sampling field it takes only at its
    # default; with the field, as _unfit_field gives it.
    stops = spec.stop_limit
    if stops is not None and signals.stop_sequences > stops:
        # Not trimmed: an answer that ran past a sequence the client stops on would look
        # like the model's fault, as a shortened answer would.
        if not stops:  # an OpenAI reasoning model
            return "stop sequences (it takes none)", "stop"
        return f"{signals.stop_sequences} stop sequences (it takes at most {stops})", "stop"
    if signals.sampling:
        # Not dropped: the client asked for an answer sampled so (temperature 0 for one it
        # can repeat), which the provider refuses with a 400 rather than ignores.
        refused = [name for name in signals.sampling if name in spec.refused_sampling]
        if refused:
            them = "them only at their defaults" if len(refused) > 1 else "it only at its default"
            return f"{', '.join(refused)} (it takes {them})", refused[0]
    return None


def _unfit_field(spec: ModelSpec, signals: Signals) -> tuple[str, str] | None:
    """:func:`why_unfit`'s reason with the chat request field it is about (``tools``, ``n``,
    ``max_tokens``, ``messages`` for images, tool calls in the history and a prompt over the
    window), the ``param`` of the 400 that refuses a request pinned to ``spec`` once named as
    its front names it (``FrontFields``); or None. The reason names the output limit as the
    client did (``Signals.output_field``)."""
    only = _anthropic_only(spec, signals)
    if only:
        what = ", ".join(name for name, _ in only)
        return f"{what} (only a Claude on Anthropic's own API takes them)", only[0][1]
    if signals.has_images and not spec.supports_images:
        return " and ".join(signals.media) or "images", "messages"
    if signals.has_tools and not spec.supports_tools:
        return (_TOOL_HISTORY, "messages") if signals.tool_history else ("tools", "tools")
    if signals.choices > 1 and spec.tier == "local":  # both local backends answer n=1 only
        return f"n={signals.choices} (it answers one choice)", "n"
    unfit = _unfit_decoding(spec, signals)
    if unfit is not None:
        return unfit
    limit = spec.output_limit
    if limit is not None and signals.max_tokens is not None and signals.max_tokens > limit:
        # Refused by the provider (a 400), and not cut down: a shorter answer than the client
        # asked room for would look like the model's fault.
        asked = f"{signals.output_field} {signals.max_tokens}"  # in the client's own words
        return f"{asked} (it writes at most {limit})", "max_tokens"
    if spec.context_window is not None:
        needed = signals.prompt_tokens + (signals.max_tokens or 0)
        if needed > spec.context_window:
            # A prompt that fits by itself is refused for the answer's room: say both parts,
            # and name max_tokens, the part the client can change without losing history.
            parts = (
                f"{signals.prompt_tokens} in the prompt + {signals.output_field} "
                f"{signals.max_tokens}; "
                if signals.max_tokens
                else ""
            )
            # A prompt as long as the window leaves no room for any answer: the prompt's field.
            fits = signals.max_tokens and signals.prompt_tokens < spec.context_window
            field = "max_tokens" if fits else "messages"
            return f"{needed} tokens ({parts}context window {spec.context_window})", field
        rest = spec.context_window - signals.prompt_tokens
        if signals.max_tokens is None and rest < MIN_ANSWER_TOKENS:
            return (
                f"{signals.prompt_tokens} tokens in the prompt, which leave {rest} of its "
                f"context window {spec.context_window} for the answer "
                f"(at least {MIN_ANSWER_TOKENS})"
            ), "messages"
    return None


class _Step:
    """The post-rule steps of one decision: hard constraints, budget, fallbacks."""

    __slots__ = (
        "budget_held",
        "context_exceeded",
        "forced_local",
        "local_only",
        "model",
        "moved",
        "over_budget",
        "pinned",
        "policy",
        "reason",
        "rejected",
        "rule",
        "signals",
        "trace",
        "unsatisfiable",
        "unsatisfiable_param",
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
        self.unsatisfiable_param: str | None = None
        self.context_exceeded = False
        self.rejected: str | None = None
        self.budget_held = False  # over budget for the holds (or a refused hold), not the spend
        self.rule: str | None = None
        self.forced_local = False
        self.moved = False  # a hard constraint moved the request to another model
        self.over_budget = False

    def _first_closed_fit(self, exclude: str) -> str | None:
        models = self.policy.models
        for name in self.policy.closed_models:
            if name != exclude and why_unfit(models[name], self.signals) is None:
                return name
        return None

    def apply_constraints(self) -> None:
        # The local tier must never silently drop images or tools, or truncate a prompt.
        found = _unfit_field(self.policy.models[self.model], self.signals)
        if found is None:
            return
        unfit, param = found
        what = f"model '{self.model}' cannot take {unfit}"
        room = "context window" in unfit  # room, not a feature (why_unfit names the window)
        if self.local_only or self.pinned:
            why = "the rule is local_only" if self.local_only else "the request pins it"
            self.unsatisfiable = f"{what} and {why}"
            self.unsatisfiable_param = param
            self.context_exceeded = room
            self.trace.append(RuleTrace("constraint", 0, False, self.unsatisfiable))
            self.reason += f"; {self.unsatisfiable}"
            return
        target = self._first_closed_fit(self.model)
        if target is None:
            self.unsatisfiable = f"{what} and no closed model can either"
            self.unsatisfiable_param = param
            self.context_exceeded = room
            self.trace.append(RuleTrace("constraint", 0, False, self.unsatisfiable))
            self.reason += f"; {self.unsatisfiable}"
            return
        note = f"{what} -> moved to '{target}'"
        self.trace.append(RuleTrace("constraint", 0, True, note))
        self.reason += f"; {note}"
        self.model, self.moved = target, True

    def apply_budget(
        self, plan: Plan, spend: float | None, hold_refused: str | None, held: float
    ) -> None:
        if plan.budget_usd is None or spend is None:
            return
        under = spend < plan.budget_usd
        if under and hold_refused is None:
            return
        self.over_budget = True
        tenant = plan.tenant or self.signals.tenant
        # ``spend`` counts the holds of requests in flight (``held``): money held, not spent.
        # Where the spend alone is under the budget, the holds stand in the way, and what their
        # requests do not spend is freed as they end: a retry may pass (rejected_held).
        paid = max(spend - held, 0.0)
        self.budget_held = paid < plan.budget_usd
        budget = usd(plan.budget_usd)
        holding = f" and holds {usd(held)} for requests in flight" if held > 0 else ""
        spent = f"tenant '{tenant}' spent {usd(paid)}{holding} of its {budget} daily budget"
        if under:
            spent += hold_refused or ""
        elif self.budget_held:
            spent += "; what they do not spend is freed as they end"
        if self.policy.models[self.model].tier == "local":
            return
        self.rule = f"budget:{tenant}"
        local = self.policy.local_model
        local_unfit = "there is no local model" if local is None else None
        if local is not None:
            unfit = why_unfit(self.policy.models[local], self.signals)
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
        unfit = why_unfit(self.policy.models[local], self.signals)
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
            if why_unfit(self.policy.models[local], self.signals) is not None:
                self.reason += "; no local fallback (the local model cannot serve this request)"
                return "error", ()
            return "local", (local,)
        if stay:  # a closed fallback would leave the local tier or spend an exhausted budget
            return "error", ()
        models = self.policy.models
        fits = tuple(
            name
            for name in self.policy.closed_models
            if name != self.model and why_unfit(models[name], self.signals) is None
        )
        return ("closed", fits) if fits else ("error", ())
