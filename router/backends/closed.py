"""The closed tier: frontier APIs named by litellm model names (``openai/...``, ``anthropic/...``).

``openai/...`` models, and any model with an OpenAI-compatible ``api_base``, are called directly
over the pooled HTTP client (:mod:`router.backends.openai_http`): that path adds little
latency (bench/README.md). Every other provider goes through ``litellm.acompletion``, which
translates the request to the provider's own protocol. litellm is imported lazily, on the first
such call, offline (``LITELLM_LOCAL_MODEL_COST_MAP``, ``LITELLM_OFFLINE_MODE``): it reaches no
host but the provider's. A model can force the litellm path with ``transport: litellm`` in the
policy.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import functools
import itertools
import json
import logging
import os
import re
import sys
import traceback
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import dataclass
from typing import Any

import httpx

from router.backends import (
    MESSAGE_FIELD,
    Completion,
    ModelLike,
    Usage,
    answered_as,
    usage_from_body,
)
from router.backends.openai_http import (
    ERROR_BODY_BYTES,
    OVERLOADED,
    STREAM_ENDED,
    OpenAIHTTP,
    provider_failure,
    request_too_large,
    retry_after_s,
    stream_cut,
    stream_failure,
    unread_error_body,
    upstream_error,
    window_words_in,
)
from router.config import MAX_EVENT_BYTES
from router.costs import (
    litellm_openai_models,
    litellm_output_limits,
    litellm_unreasoning_models,
)
from router.errors import (
    BackendError,
    BadRequestError,
    ClientLibraryError,
    ModelSettingsError,
    TiergateError,
    UpstreamAuthError,
    UpstreamBadRequestError,
    UpstreamBadResponseError,
    UpstreamOverloadedError,
    UpstreamRateLimitedError,
    UpstreamRequestTooLargeError,
    UpstreamTimeoutError,
    scrub,
)
from router.schemas import OUTPUT_FIELDS

# The providers' usual environment variables for their keys (litellm's names: Azure's is
# AZURE_API_KEY, with AZURE_API_BASE and AZURE_API_VERSION, read by _azure_client).
PROVIDER_KEY_ENV = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "azure": "AZURE_API_KEY",
    "gemini": "GEMINI_API_KEY",
    "mistral": "MISTRAL_API_KEY",
    "groq": "GROQ_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
    "together_ai": "TOGETHERAI_API_KEY",
    "openrouter": "OPENROUTER_API_KEY",
}
#: Where an ``azure/`` model without ``api_base`` finds its endpoint: litellm's variable, which
#: :meth:`ClosedBackend._azure_client` reads, then the OpenAI SDK's, which the SDK reads itself.
AZURE_ENDPOINT_ENV = ("AZURE_API_BASE", "AZURE_OPENAI_ENDPOINT")
# Where a model without an api_base takes its base URL from (ClosedBackend._call_kwargs).
_BASE_SETTING = {"openai": "OPENAI_BASE_URL or OPENAI_API_BASE", "azure": "AZURE_API_BASE"}
_SETTINGS = "its provider's variables"
log = logging.getLogger("tiergate.closed")
# The loggers litellm._logging attaches its own stream handler to.
_LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")
_OPENAI_DEFAULT_BASE = "https://api.openai.com/v1"
# Fields of an OpenAI chat request that Tiergate sets itself or that must not reach a provider.
_STRIP = ("model", "metadata")
# litellm takes these as its own arguments, set per call below.
_LITELLM_OWN = ("stream", "stream_options")
#: The providers whose answers litellm reads through the client Tiergate hands it
#: (``client=``), read within ``max_event_bytes`` (a line of an event stream, a frame of
#: Bedrock's binary one) and an error body within 64 KiB (:func:`_bound_response`): litellm's
#: own HTTP handler, built with the bound, for those it calls with one; for ``openai/``
#: (``transport: litellm``) and ``azure/``, which it calls through the OpenAI SDK, an SDK
#: client over that handler's HTTP client (:meth:`ClosedBackend._openai_client`,
#: :meth:`ClosedBackend._azure_client`). Each is checked by a test against litellm's real
#: path. litellm gives no such hook for ``cohere_chat/`` (called with a client of its own);
#: ``vertex_ai/`` takes the handler but is not checked (its calls need Google credentials
#: first): those, and the providers not listed, are read by litellm's client, unbounded.
BOUNDED_PROVIDERS = frozenset(
    {"anthropic", "azure", "bedrock", "deepseek", "gemini", "groq", "mistral", "openai"}
    | {"openrouter", "together_ai"}
)


def provider_of(litellm_model: str) -> str:
    """``openai/gpt-4o`` -> ``openai``; a bare name is taken as OpenAI's, as litellm does."""
    return litellm_model.split("/", 1)[0] if "/" in litellm_model else "openai"


def provider_model(litellm_model: str) -> str:
    """The model ``litellm_model`` asks its provider for: the name without litellm's provider
    prefix (``anthropic/claude-sonnet-4-5`` -> ``claude-sonnet-4-5``; ``openai/my-org/gpt-4o``
    -> ``my-org/gpt-4o``, as an OpenAI-compatible server is sent it; an Azure deployment's
    name), and on Bedrock without litellm's route (``bedrock/converse/us.anthropic.claude-...``
    -> ``us.anthropic.claude-...``; an ARN stays whole)."""
    name = litellm_model.split("/", 1)[-1]
    if provider_of(litellm_model) == "bedrock":
        route, sep, rest = name.partition("/")
        if sep and ":" not in route and "." not in route:  # a route, not a model id or an ARN
            return rest
    return name


def key_for(model: ModelLike, environ: Mapping[str, str]) -> str | None:
    """The key for ``model`` from its ``api_key_env`` or its provider's usual variable."""
    env = model.api_key_env or PROVIDER_KEY_ENV.get(provider_of(model.litellm_model or ""))
    return environ.get(env) if env else None


def cannot_take(model: ModelLike, names: Collection[str]) -> frozenset[str]:
    """Of the chat fields ``names``, those ``model`` is known not to take.

    For an OpenAI model in litellm's model map (read offline), the fields outside the
    parameters litellm lists for it: ``top_k`` for every model, ``reasoning_effort`` for one
    that does not reason (gpt-4o, gpt-4.1), which OpenAI refuses with a 400. A model the map
    does not know, such as one an OpenAI-compatible server (vLLM) serves, may take them, and
    litellm translates the fields for the other providers: for those, none.

    A message field (``messages.NAME``) is the reasoning a translation replays on an assistant
    turn (``thinking_blocks`` with Anthropic's signatures, ``reasoning_content``): only a Claude
    model (:func:`claude`: litellm sends it back to Anthropic's API, Bedrock and Vertex AI
    alike) reads it back; OpenAI's message schema, and strict servers after it, refuse a
    message that carries it.
    """
    litellm_model = model.litellm_model or ""
    provider = provider_of(litellm_model)
    replayed = frozenset(n for n in names if n.startswith(MESSAGE_FIELD))
    if claude(litellm_model):
        return frozenset()
    if provider != "openai":
        return replayed
    litellm = quiet_litellm()
    name = litellm_model.split("/", 1)[-1]
    if litellm.model_cost.get(name, {}).get("litellm_provider") != "openai":
        return replayed
    supported = litellm.get_supported_openai_params(model=name, custom_llm_provider="openai")
    return frozenset(names) - frozenset(supported or ())


#: ``max_tokens`` for an Anthropic model, which requires one, when the request sets none and
#: neither the policy (``max_output_tokens``) nor litellm's model map gives the model's output
#: limit: the smallest current Claude's (claude-3-haiku's). litellm sent its own default, 128000,
#: which is over every Claude's limit: Anthropic refused each such request with a 400.
ANTHROPIC_MAX_TOKENS = 4096
# A Claude model id on Bedrock, with or without a region (``us.``) or route (``invoke/``) prefix,
# or at the end of a system-defined inference profile's ARN (``...:inference-profile/us.anthropic
# .claude-...``).
_BEDROCK_CLAUDE = re.compile(r"(?:^|[./])anthropic\.claude")


def claude(litellm_model: str) -> bool:
    """Whether ``litellm_model`` is a Claude model, which requires ``max_tokens`` wherever it is
    served: on Anthropic's API (``anthropic/...``), on Bedrock (``bedrock/anthropic.claude-...``,
    ``bedrock/us.anthropic.claude-...``) or on Vertex AI (``vertex_ai/claude-...``). litellm
    sends each a request without one with the same default (its map's limit, else 128000)."""
    provider = provider_of(litellm_model)
    name = litellm_model.split("/", 1)[-1]
    if provider == "bedrock":
        return _BEDROCK_CLAUDE.search(name) is not None
    if provider == "vertex_ai":
        return name.startswith("claude")
    return provider == "anthropic"


def hides_its_model(litellm_model: str) -> bool:
    """Whether ``litellm_model`` is a Bedrock application inference profile
    (``bedrock/arn:aws:bedrock:REGION:ACCOUNT:application-inference-profile/ID``): its ARN ends
    in an opaque id, so neither Tiergate nor litellm's map can tell the model behind it (litellm
    reads it from a deployment's ``base_model``, which Tiergate does not send)."""
    return provider_of(litellm_model) == "bedrock" and ":application-inference-profile/" in (
        litellm_model
    )


def hidden_output_limits(models: Iterable[ModelLike]) -> list[str]:
    """The closed models among ``models`` that :func:`hides_its_model` without a policy
    ``max_output_tokens``: a request to one that sets no ``max_tokens`` is sent none (a Claude
    behind it is not known for one, :func:`claude`: the provider's default applies), and its
    budget hold cannot read an output limit. With ``max_output_tokens`` it is sent that
    (:func:`default_max_tokens`) and held at it."""
    return _unlimited(models, hides_its_model)


def mapped_output_limit(litellm_model: str) -> int | None:
    """The output limit litellm's bundled model map gives ``litellm_model`` (looked up by the
    name the provider gets, as litellm does, then by the whole name, then, on Bedrock only, by
    its last part, the model id of a route such as ``bedrock/invoke/...``), or None where it
    does not know the model. Elsewhere a last part is no model id: ``openai/my-org/gpt-4o`` is
    an operator's own model on an OpenAI-compatible server, not OpenAI's gpt-4o."""
    limits = litellm_output_limits()
    found = limits.get(litellm_model.split("/", 1)[-1]) or limits.get(litellm_model)
    if found is None and provider_of(litellm_model) == "bedrock":
        found = limits.get(litellm_model.rsplit("/", 1)[-1])
    return found


def openai_model(litellm_model: str) -> bool:
    """Whether ``litellm_model`` is one of OpenAI's own models (``openai/gpt-4o``, ``o3``), as
    litellm's map lists them, and not another provider's served over an OpenAI-compatible API
    (``openai/deepseek-chat`` on DeepSeek's, ``openai/gemini-2.5-flash`` on Google's): only
    OpenAI's take at most :data:`OPENAI_STOP_SEQUENCES` and read ``max_completion_tokens``."""
    return provider_of(litellm_model) == "openai" and (
        provider_model(litellm_model) in litellm_openai_models()
    )


#: How many stop sequences OpenAI's chat API takes ("Up to 4 sequences", its API reference;
#: more is a 400), and Azure OpenAI's ("Up to four sequences", its REST reference).
OPENAI_STOP_SEQUENCES = 4
#: How many stop sequences Gemini takes ("up to 5", its GenerationConfig reference, as
#: litellm's Gemini config repeats it), on Google AI Studio and Vertex AI.
GEMINI_STOP_SEQUENCES = 5
# OpenAI's reasoning models that refuse ``stop`` (a 400 ``unsupported_parameter``, on OpenAI's
# API and Azure's): the o1, o3 and o4 families but o3-mini, and gpt-5 and later but gpt-5's
# chat models, as litellm's gpt-5 config lists them (it lists ``stop`` for the o-series, whose
# refusal users report: o1-preview, o1-mini, o3, o4-mini).
_O_SERIES_WITHOUT_STOP = re.compile(r"(?:o1|o3(?!-mini)|o4)(?:$|[-.])")
_GPT_GENERATION = re.compile(r"gpt-(\d+)")


def takes_no_stop(name: str) -> bool:
    """Whether the OpenAI model ``name`` (a model or Azure deployment name, no prefix) is one
    of the reasoning models that refuse ``stop`` (:data:`_O_SERIES_WITHOUT_STOP`, gpt-5 on)."""
    if _O_SERIES_WITHOUT_STOP.match(name):
        return True
    generation = _GPT_GENERATION.match(name)
    return generation is not None and int(generation[1]) >= 5 and "gpt-5-chat" not in name


def stop_sequence_limit(litellm_model: str) -> int | None:
    """How many stop sequences ``litellm_model`` takes at most, where known: OpenAI's own
    models (:func:`openai_model`) and any Azure OpenAI deployment take
    :data:`OPENAI_STOP_SEQUENCES`, but OpenAI's reasoning models none (:func:`takes_no_stop`:
    an Azure deployment is known for one only by a name that says it, such as ``azure/o3``); a
    Gemini model :data:`GEMINI_STOP_SEQUENCES`. A model an OpenAI-compatible server serves
    (vLLM, llama.cpp, DeepSeek's API), and other providers' (litellm translates their field),
    are not known for a limit: None. litellm sends them all (:func:`quiet_litellm`), so the
    fit check is the one bound."""
    provider = provider_of(litellm_model)
    if provider == "gemini" or (
        provider == "vertex_ai" and provider_model(litellm_model).startswith("gemini")
    ):
        return GEMINI_STOP_SEQUENCES
    if provider == "azure":
        name = litellm_model.rsplit("/", 1)[-1]  # a deployment, after a data zone (azure/eu/)
    elif openai_model(litellm_model):
        name = provider_model(litellm_model)
    else:
        return None
    return 0 if takes_no_stop(name) else OPENAI_STOP_SEQUENCES


# OpenAI's o-series reasoning models (o1, o3, o3-mini, o4-mini), by name.
_O_SERIES = re.compile(r"o\d+(?:$|[-.])")
#: The sampling fields OpenAI's o-series models refuse at other than their defaults (a 400
#: ``unsupported_parameter`` or ``unsupported_value``: temperature 1 alone is taken), as
#: litellm's o-series config refuses them.
O_SERIES_REFUSED = frozenset(
    {"frequency_penalty", "logprobs", "presence_penalty", "temperature", "top_p"}
)
#: What gpt-5 and later (but gpt-5's chat models) refuse, as litellm's gpt-5 config refuses it;
#: a model that reasons only when asked (:func:`~router.costs.litellm_unreasoning_models`:
#: gpt-5.1, default ``reasoning_effort: none``) takes ``temperature``, ``top_p`` and
#: ``logprobs`` by default.
GPT_REASONING_REFUSED = frozenset({"frequency_penalty", "logit_bias", "presence_penalty"})
_WHILE_REASONING = frozenset({"logprobs", "temperature", "top_p"})


def refused_sampling(litellm_model: str) -> frozenset[str]:
    """The sampling fields (``router.signals.SAMPLING_DEFAULTS``) ``litellm_model`` refuses at
    other than their default: OpenAI's reasoning models on OpenAI's API (:func:`openai_model`)
    or Azure's (a deployment known for one by a name that says it, as :func:`takes_no_stop`),
    which answer a 400 that the chain cannot pass (on the direct path) or that litellm raises
    before it calls (through litellm). Other models, none: litellm translates the fields for
    other providers, and an OpenAI-compatible server's model may take them."""
    if provider_of(litellm_model) == "azure":
        name = litellm_model.rsplit("/", 1)[-1]
    elif openai_model(litellm_model):
        name = provider_model(litellm_model)
    else:
        return frozenset()
    if _O_SERIES.match(name):
        return O_SERIES_REFUSED
    generation = _GPT_GENERATION.match(name)
    if generation is None or int(generation[1]) < 5 or "gpt-5-chat" in name:
        return frozenset()
    if name in litellm_unreasoning_models():
        return GPT_REASONING_REFUSED
    return GPT_REASONING_REFUSED | _WHILE_REASONING


def output_limit(model: ModelLike) -> int | None:
    """The most one call to the closed ``model`` writes when a request sets no ``max_tokens``:
    its policy ``max_output_tokens``, else litellm's map's limit, else, for a Claude model
    (:func:`claude`), :data:`ANTHROPIC_MAX_TOKENS` (what it is sent); None where nothing says
    (the budget hold then reads the context window, ``Gateway.call_tokens``)."""
    limit = model.max_output_tokens or mapped_output_limit(model.litellm_model or "")
    if limit is None and claude(model.litellm_model or ""):
        return ANTHROPIC_MAX_TOKENS
    return limit


def default_max_tokens(model: ModelLike, room: int | None = None) -> int | None:
    """The ``max_tokens`` to send ``model`` for a request that sets none: a Claude model's
    :func:`output_limit` (Claude requires one, on Anthropic's API, Bedrock or Vertex AI), any
    other model's policy ``max_output_tokens``: the operator's cap, and what the budget holds
    such a call at (``Gateway.call_tokens``), so the provider may not write more than was held.
    None where the policy sets none: the provider answers up to the model's own limit or the
    end of its window. At most ``room`` (what the context window leaves after the prompt; at
    least 1): providers refuse a prompt plus ``max_tokens`` over the window with a 400."""
    limit = output_limit(model) if claude(model.litellm_model or "") else model.max_output_tokens
    if limit is None or room is None:
        return limit
    return max(1, min(limit, room))


def sets_output_limit(body: Mapping[str, Any]) -> bool:
    """Whether the request ``body`` bounds its answer's length itself (``max_tokens``,
    ``max_completion_tokens``)."""
    return any(body.get(f) is not None for f in OUTPUT_FIELDS)


def direct(model: ModelLike) -> bool:
    """Whether the closed ``model`` is called on the direct OpenAI path, not through litellm."""
    if model.transport == "litellm":
        return False
    return provider_of(model.litellm_model or "") == "openai"


def output_field(model: ModelLike, body: Mapping[str, Any] | None = None) -> str:
    """The chat field that bounds an answer's length for ``model`` on the path it is called:
    on the direct path, ``max_completion_tokens`` for OpenAI's own models (:func:`openai_model`:
    its reasoning models refuse ``max_tokens``), but ``max_tokens`` for a request ``body`` with
    a ``prediction`` (:func:`predicted`); else ``max_tokens``, which every OpenAI-compatible
    server (vLLM, llama.cpp, Ollama) takes and some older ones take alone; through litellm,
    ``max_tokens``, which litellm translates for each provider."""
    if direct(model) and openai_model(model.litellm_model or "") and not predicted(body or {}):
        return "max_completion_tokens"
    return "max_tokens"


def predicted(body: Mapping[str, Any]) -> bool:
    """Whether ``body`` carries a predicted output (``prediction``): OpenAI's Predicted Outputs
    guide lists ``max_completion_tokens`` among the parameters they do not take, and the models
    that take a prediction (gpt-4o, gpt-4.1) take ``max_tokens``."""
    return body.get("prediction") is not None


def unknown_output_limits(models: Iterable[ModelLike]) -> list[str]:
    """The Claude models among ``models`` whose output limit neither the policy
    (``max_output_tokens``) nor litellm's model map gives: a request to one that sets no
    ``max_tokens`` is sent :data:`ANTHROPIC_MAX_TOKENS`, which may be below the model's own."""
    return _unlimited(models, lambda name: claude(name) and mapped_output_limit(name) is None)


def guessed_output_limits(models: Iterable[ModelLike]) -> list[str]:
    """The closed models among ``models`` whose output limit nothing gives: neither the policy
    (``max_output_tokens``, ``context_window``) nor litellm's map (a ``cohere_chat/`` or
    ``vertex_ai/`` model it does not list, one an OpenAI-compatible server serves), and not a
    Claude (sent :data:`ANTHROPIC_MAX_TOKENS`) nor a Bedrock application inference profile
    (:func:`hidden_output_limits`). A request to one that sets no ``max_tokens`` is sent none,
    and its budget hold and token reservation read ``TIERGATE_RESERVE_TOKENS`` for its answer
    (``Gateway.call_tokens``), which the provider may write past."""
    return [
        m.name
        for m in models
        if m.tier == "closed"
        and m.context_window is None
        and output_limit(m) is None
        and not hides_its_model(m.litellm_model or "")
    ]


def _unlimited(models: Iterable[ModelLike], chosen: Callable[[str], bool]) -> list[str]:
    # The closed models without a policy max_output_tokens whose litellm_model is ``chosen``.
    return [
        m.name
        for m in models
        if m.tier == "closed" and m.max_output_tokens is None and chosen(m.litellm_model or "")
    ]


@dataclass(frozen=True, slots=True)
class OutputLimitWarning:
    """Closed models of one kind whose output limit nothing gives, and what follows for a
    request to one that sets no ``max_tokens``, said of each model (``tiergate policy check``)
    and of them all in one line (``Gateway.warn_output_limits``, at start and reload) from the
    same words: :func:`output_limit_warnings` writes them."""

    models: list[ModelLike]
    follows: str
    #: The warning for one model, where ``{model}`` stands for its litellm_model.
    one: str
    #: The warning for them all, where ``{names}`` stands for their names.
    all: str

    @property
    def names(self) -> list[str]:
        """The models' names in the policy."""
        return [m.name for m in self.models]

    def each(self) -> list[tuple[str, str]]:
        """(a model's name, its warning) for each of the models."""
        return [
            (m.name, self.one.format(model=m.litellm_model, follows=self.follows))
            for m in self.models
        ]

    def together(self) -> str:
        """The warning for all the models at once."""
        return self.all.format(names=", ".join(self.names), follows=self.follows)


def output_limit_warnings(models: Iterable[ModelLike]) -> list[OutputLimitWarning]:
    """The warnings for ``models`` whose output limit neither the policy nor litellm's map
    gives: the Claude models (:func:`unknown_output_limits`), the Bedrock application
    inference profiles (:func:`hidden_output_limits`) and the others without a context window
    (:func:`guessed_output_limits`); a kind none of them is left out."""
    by_name = {m.name: m for m in models}
    said = [
        OutputLimitWarning(
            [by_name[n] for n in unknown_output_limits(by_name.values())],
            f"a request that sets no max_tokens is sent max_tokens {ANTHROPIC_MAX_TOKENS}",
            "no output limit for litellm_model {model!r} in the installed litellm's model map: "
            "{follows} (give it max_output_tokens)",
            "no output limit for Anthropic model(s) {names}: litellm's model map does not list "
            "their litellm_model, so {follows}; give each its limit in the policy "
            "(max_output_tokens)",
        ),
        OutputLimitWarning(
            [by_name[n] for n in hidden_output_limits(by_name.values())],
            "a request that sets no max_tokens is sent none (the provider's default applies) "
            "and its budget hold reads no output limit",
            "Tiergate cannot tell the model behind the Bedrock application inference profile "
            "{model!r}: {follows} (give it max_output_tokens)",
            "cannot tell the model behind Bedrock application inference profile(s) {names}: "
            "{follows}; give each its model's limit in the policy (max_output_tokens)",
        ),
        OutputLimitWarning(
            [by_name[n] for n in guessed_output_limits(by_name.values())],
            "a request that sets no max_tokens is sent none (the provider's default applies) "
            "and its budget hold reads TIERGATE_RESERVE_TOKENS for the answer, which it may "
            "write past",
            "no output limit for litellm_model {model!r} in the installed litellm's model map, "
            "and no context_window: {follows} (give it max_output_tokens)",
            "no output limit for closed model(s) {names}: litellm's model map does not list "
            "their litellm_model and the policy gives them no context_window, so {follows}; "
            "give each its limit in the policy (max_output_tokens)",
        ),
    ]
    return [warning for warning in said if warning.models]


class ClosedBackend:
    """Serves closed models through the direct OpenAI path or litellm (see module docstring)."""

    def __init__(
        self,
        http: OpenAIHTTP,
        *,
        timeout_s: float,
        environ: Mapping[str, str] | None = None,
        max_event_bytes: int = MAX_EVENT_BYTES,
    ) -> None:
        self._http = http
        self._timeout_s = timeout_s
        self._environ = environ if environ is not None else os.environ
        self._max_event_bytes = max_event_bytes
        self._litellm: Any = None
        # litellm's HTTP handler with the bound, and the event loop its connections belong to.
        self._client: tuple[asyncio.AbstractEventLoop, Any] | None = None
        # OpenAI SDK clients over that handler's HTTP client, by what they were built with.
        self._sdk_clients: dict[tuple[Any, ...], Any] = {}

    def api_key(self, model: ModelLike) -> str | None:
        """The key for ``model`` from its ``api_key_env`` or its provider's usual variable."""
        return key_for(model, self._environ)

    def unavailable_reason(self, model: ModelLike) -> str | None:
        """Unavailable when no key is configured (a keyless local URL needs ``api_key_env``),
        or, for an ``azure/`` model, no endpoint: its ``api_base``, else ``AZURE_API_BASE``
        (:meth:`_azure_client`), else the OpenAI SDK's ``AZURE_OPENAI_ENDPOINT``. Without one
        every call failed as it was made (the SDK's ``ValueError``), the model counted up."""
        if not model.litellm_model:
            return "closed model has no litellm_model"
        provider = provider_of(model.litellm_model)
        if self.api_key(model):
            if provider == "azure" and not (
                model.api_base or any(self._environ.get(env) for env in AZURE_ENDPOINT_ENV)
            ):
                return "no endpoint: set the model's api_base or AZURE_API_BASE"
            return None
        env = model.api_key_env or PROVIDER_KEY_ENV.get(provider)
        if env is None:  # its key may well be set, under a name this table does not know
            return (
                f"no API key: no known key variable for provider '{provider}': name the one "
                "that holds its key with the model's api_key_env"
            )
        return f"no API key: set {env}"

    def server_url(self, model: ModelLike) -> str | None:
        """The base URL called for ``model``: its ``api_base``, else OpenAI's on the direct
        path; None for a litellm provider without one (litellm picks the host, and reads its
        own variables for it)."""
        if direct(model):
            return model.api_base or _OPENAI_DEFAULT_BASE
        return model.api_base

    def _request(self, model: ModelLike, body: dict[str, Any]) -> dict[str, Any]:
        request = {k: v for k, v in body.items() if k not in _STRIP}
        request["model"] = provider_model(model.litellm_model or "")
        # One limit, in the field the model reads (output_field): OpenAI refuses both at once
        # (400 invalid_parameter_combination) and its reasoning models refuse max_tokens; an
        # OpenAI-compatible server may read max_tokens alone. The limit is the one the request
        # was fitted and held by (max_completion_tokens where set, signals), else Tiergate's.
        asked = [request.pop(f) for f in ("max_completion_tokens", "max_tokens") if f in request]
        limit = next((v for v in asked if v is not None), None)
        if limit is None:
            limit = default_max_tokens(model)
        if limit is not None:
            request[output_field(model, request)] = limit
        return request

    def _timeout(self, model: ModelLike) -> float:
        return model.timeout_s or self._timeout_s

    async def complete(
        self, model: ModelLike, body: dict[str, Any], usage: Usage | None = None
    ) -> Completion:
        """One answer from the provider (its usage comes with the answer, not before)."""
        if direct(model):
            result = await self._http.complete(
                model.api_base or _OPENAI_DEFAULT_BASE,
                self._request(model, body),
                api_key=self.api_key(model),
                label=model.name,
                timeout_s=self._timeout(model),
            )
        else:
            result = await self._litellm_complete(model, body)
        answered_as(result.body, model.name, result.usage)
        return result

    async def stream(
        self, model: ModelLike, body: dict[str, Any], usage: Usage
    ) -> AsyncIterator[dict[str, Any]]:
        """Chunks from the provider."""
        if direct(model):
            source = self._http.stream(
                model.api_base or _OPENAI_DEFAULT_BASE,
                self._request(model, body),
                usage,
                api_key=self.api_key(model),
                label=model.name,
                timeout_s=self._timeout(model),
            )
        else:
            source = self._litellm_stream(model, body, usage)
        try:
            async for chunk in source:
                answered_as(chunk, model.name, usage)
                yield chunk
        finally:  # a reader that stops early (a client that left) releases the provider now
            await _aclose(source)

    # -- litellm ---------------------------------------------------------------------------

    def _litellm_module(self) -> Any:
        if self._litellm is None:
            self._litellm = quiet_litellm()
        return self._litellm

    def _call_kwargs(self, model: ModelLike, body: dict[str, Any]) -> dict[str, Any]:
        """:meth:`_litellm_kwargs` with the client the model's provider is handed. A client that
        cannot be built from the model's settings (an ``api_base`` with a port ``${PORT}``:
        httpx's ``InvalidURL``) is a :class:`ModelSettingsError` the chain passes, not a 500
        that ends the request. Only the client is read so: a defect in translating the body
        stays a defect (a 500, logged), and a request the model cannot take stays its
        :class:`BadRequestError`."""
        kwargs = self._litellm_kwargs(model, body)
        try:
            client = self._client_for(model, kwargs["api_key"])
        except TiergateError:
            raise
        except Exception as exc:  # a client constructor's own errors (ValueError, InvalidURL)
            key = self.api_key(model)
            provider = provider_of(model.litellm_model or "")
            setting = "its api_base" if model.api_base else _BASE_SETTING.get(provider, _SETTINGS)
            why = scrub(f"{type(exc).__name__}: {exc}", [key])
            raise ModelSettingsError(
                f"{model.name} cannot be called as configured (check {setting}): its client "
                f"could not be built ({why})"
            ) from exc
        if client is not None:
            kwargs["client"] = client
        return kwargs

    def _client_for(self, model: ModelLike, api_key: str | None) -> Any:
        """The client litellm is handed for ``model``'s provider, or None where it builds its
        own."""
        provider = provider_of(model.litellm_model or "")
        if provider == "openai":
            return self._openai_client(model, api_key)
        if provider == "azure":
            return self._azure_client(model, api_key)
        if provider in BOUNDED_PROVIDERS:
            return self._bounded_client()
        return None

    def _litellm_kwargs(self, model: ModelLike, body: dict[str, Any]) -> dict[str, Any]:
        kwargs = {k: v for k, v in body.items() if k not in _STRIP and k not in _LITELLM_OWN}
        if predicted(kwargs) and kwargs.get("max_completion_tokens") is not None:
            # litellm sends max_completion_tokens as it is (:func:`predicted`); the value read
            # as the limit, as on the direct path (_request).
            kwargs["max_tokens"] = kwargs.pop("max_completion_tokens")
        if not sets_output_limit(kwargs):
            default = default_max_tokens(model)
            if default is not None:
                kwargs["max_tokens"] = default
        check_user_parts(kwargs.get("messages") or [], model.name)
        if claude(model.litellm_model or "") and "response_format" in kwargs:
            kwargs["response_format"] = anthropic_response_format(
                kwargs["response_format"], model.name
            )
        kwargs["model"] = model.litellm_model
        kwargs["api_key"] = self.api_key(model)
        kwargs["timeout"] = self._timeout(model)
        kwargs["num_retries"] = 0
        if model.api_base:
            kwargs["api_base"] = model.api_base
        return kwargs

    def _openai_client(self, model: ModelLike, api_key: str | None) -> Any:
        """An OpenAI SDK client over the bounded HTTP client, for an ``openai/`` model litellm
        calls (``transport: litellm``): litellm calls it through the SDK, which takes an SDK
        client, not litellm's handler. One per key, base URL and timeout, as litellm caches
        its own; the base URL is the one litellm would call."""
        handler = self._bounded_client()
        env = self._environ
        base = (
            model.api_base
            or env.get("OPENAI_BASE_URL")
            or env.get("OPENAI_API_BASE")
            or _OPENAI_DEFAULT_BASE
        )
        timeout = self._timeout(model)
        client = self._sdk_clients.get((api_key, base, timeout))
        if client is None:
            from openai import AsyncOpenAI

            client = AsyncOpenAI(
                api_key=api_key,
                base_url=base,
                timeout=timeout,
                max_retries=0,
                http_client=handler.client,
            )
            self._sdk_clients[(api_key, base, timeout)] = client
        return client

    def _azure_client(self, model: ModelLike, api_key: str | None) -> Any:
        """The SDK client litellm builds for an ``azure/`` model (its Azure settings: endpoint,
        API version, v1 routes), copied over the bounded HTTP client: litellm calls Azure
        through the OpenAI SDK and takes such a client as it is. The endpoint and API version
        are the ones litellm would use (the model's ``api_base``, else ``AZURE_API_BASE``;
        ``AZURE_API_VERSION``, else litellm's default). The key goes as ``api-key``: litellm's
        Entra ID settings apply only to a model without a key, which is not called (README,
        *Closed providers*)."""
        handler = self._bounded_client()
        env = self._environ
        base = model.api_base or env.get("AZURE_API_BASE")
        version = env.get("AZURE_API_VERSION") or self._litellm_module().AZURE_DEFAULT_API_VERSION
        timeout = self._timeout(model)
        client = self._sdk_clients.get(("azure", api_key, base, version, timeout))
        if client is None:
            from litellm.llms.azure.azure import AzureChatCompletion

            own: Any = AzureChatCompletion().get_azure_openai_client(
                api_key=api_key,
                api_base=base,
                api_version=version,
                litellm_params={},
                _is_async=True,
                model=provider_model(model.litellm_model or ""),
            )
            client = own.copy(http_client=handler.client, max_retries=0, timeout=timeout)
            self._sdk_clients[("azure", api_key, base, version, timeout)] = client
        return client

    def _bounded_client(self) -> Any:
        """litellm's own HTTP handler (its transport, proxies and TLS settings), whose answers
        are read within ``max_event_bytes``: one per event loop, as its pooled connections."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client[0] is not loop:
            from litellm.llms.custom_httpx.http_handler import AsyncHTTPHandler

            hooks: dict[str, list[Callable[..., object]]] = {
                "request": [_identity],
                "response": [_bound_response(self._max_event_bytes)],
            }
            self._client = (loop, AsyncHTTPHandler(timeout=self._timeout_s, event_hooks=hooks))
            self._sdk_clients.clear()  # they share its connections
        return self._client[1]

    async def _litellm_complete(self, model: ModelLike, body: dict[str, Any]) -> Completion:
        litellm = self._litellm_module()
        kwargs = self._call_kwargs(model, body)
        try:
            response = await litellm.acompletion(**kwargs, stream=False)
        except Exception as exc:  # litellm raises many types; mapped in one place
            raise map_litellm_error(exc, model.name, self.api_key(model), body) from exc
        payload = response.model_dump(exclude_none=True)
        usage = usage_from_body(payload, model.name)  # litellm's own fields count cache writes
        return Completion(body=openai_shaped(payload, message=True), usage=usage)

    async def _litellm_stream(
        self, model: ModelLike, body: dict[str, Any], usage: Usage
    ) -> AsyncIterator[dict[str, Any]]:
        litellm = self._litellm_module()
        kwargs = self._call_kwargs(model, body)
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        kwargs["stream_options"] = options
        finished = False
        response = None
        said = None  # the provider's name for the model: litellm's chunks name the one asked
        try:
            response = await litellm.acompletion(**kwargs, stream=True)
            async for chunk in response:
                data = chunk.model_dump(exclude_none=True)
                said = _provider_response_model(chunk) or said
                if said:
                    data["model"] = said
                ends = any(c.get("finish_reason") for c in data.get("choices") or ())
                if ends and _made_up_finish(response):
                    raise stream_cut(model.name)
                finished = finished or ends
                if data.get("usage"):
                    usage.take(usage_from_body(data, model.name))
                yield openai_shaped(data, message=False)
        except TiergateError:
            raise
        except Exception as exc:  # litellm raises many types; mapped in one place
            raise map_litellm_error(exc, model.name, self.api_key(model), body) from exc
        finally:
            # Left early (GeneratorExit at the yield), litellm's stream holds the provider's
            # connection, which goes on sending, until it is collected: close it now.
            if response is not None:
                await _aclose(response)
        if not finished:  # as on the direct path: a stream without its end was cut off
            raise stream_cut(model.name)

    async def aclose(self) -> None:
        """Close litellm's cached clients if it was used, and the bounded one; the direct
        path's pool has its own owner."""
        closes: list[Callable[[], Awaitable[object]]] = []
        if self._litellm is not None:
            closes.append(self._litellm.close_litellm_async_clients)
        if self._client is not None:
            closes.append(self._client[1].close)
            self._client = None
            self._sdk_clients.clear()
        for close in closes:
            try:
                await close()
            except Exception:  # closing must not fail shutdown; nothing is lost here
                log.debug("closing litellm clients failed", exc_info=True)


def _provider_response_model(chunk: Any) -> str | None:
    """The model a provider's stream chunk named, which litellm keeps in the chunk's hidden
    params (``provider_response_model``) while its ``model`` says the one asked for; None
    where it kept none (its closing usage chunk, an older litellm)."""
    hidden = getattr(chunk, "_hidden_params", None)
    said = hidden.get("provider_response_model") if isinstance(hidden, Mapping) else None
    return said if isinstance(said, str) and said else None


class _OverLimitError(Exception):
    """An answer, or one line of a streamed one, over the bound, raised while litellm reads it
    and found among its error's causes by :func:`map_litellm_error`: never seen outside."""


class _UnreadErrorBodyError(Exception):
    """An answer with an error status whose body is over the bound (:func:`_read_error_body`),
    found among litellm's error's causes by :func:`map_litellm_error`: never seen outside."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(f"an error body over {ERROR_BODY_BYTES} bytes")
        self.status = response.status_code
        self.reason = response.reason_phrase
        self.retry_after: str | None = response.headers.get("retry-after")


class _ProviderEventError(Exception):
    """A provider's error event in a stream litellm reads (Anthropic's ``error`` event, an
    OpenAI-compatible chunk ``{"error": ...}``), raised in its place and found among litellm's
    error's causes by :func:`map_litellm_error`: litellm raises each as a 500 with the
    provider's message alone, so a rate limit or an overload read as any failure."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(str(error.get("message") or "error"))
        self.error = error


#: The longest stream line read for an error event (one is a few hundred bytes).
_EVENT_KEPT = 64 * 1024


def _error_event(line: bytes | bytearray) -> dict[str, Any] | None:
    """The ``error`` of an SSE ``data:`` line that is a provider's error event, else None."""
    if not line.startswith(b"data:") or b'"error"' not in line:
        return None
    try:
        payload = json.loads(line[5:])
    except (ValueError, RecursionError):
        return None
    error = payload.get("error") if isinstance(payload, dict) else None
    if not error:
        return None
    return error if isinstance(error, dict) else {"message": str(error)}


def _sdk_error_event(exc: BaseException) -> dict[str, Any] | None:
    """The ``error`` of an error chunk the OpenAI SDK read in a stream (litellm calls
    ``azure/`` and ``openai/`` with ``transport: litellm`` through it; :class:`_Bounded`
    finds such a chunk first, but not one over :data:`_EVENT_KEPT`): it raises a bare
    ``APIError`` whose ``body`` is that error, which litellm calls a connection error."""
    for cause in _causes(exc):
        body = getattr(cause, "body", None)
        kind = type(cause)
        if kind.__name__ == "APIError" and kind.__module__.startswith("openai"):
            return body if isinstance(body, dict) else None
    return None


#: The content types of an answer read line by line (an event stream): the bound is per line.
_LINE_TYPES = ("text/event-stream", "application/x-ndjson")
#: The content type of AWS's binary event stream (Bedrock's streams): the bound is per frame.
_FRAMES_TYPE = "application/vnd.amazon.eventstream"


def _bound_response(limit: int) -> Callable[[httpx.Response], Awaitable[None]]:
    """An httpx response hook, run before the body is read, that bounds what is read of it as
    the direct path does (:mod:`router.backends.openai_http`): an error answer's body 64 KiB
    (:func:`_read_error_body`), an event stream ``limit`` bytes a line, AWS's binary one
    ``limit`` bytes a frame (:class:`_Frames`), any other body ``limit`` bytes in all, else
    :class:`_OverLimitError`."""

    async def bound(response: httpx.Response) -> None:
        if response.is_error:
            await _read_error_body(response)
            return
        kind = response.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind == _FRAMES_TYPE:
            response.stream = _Frames(response.stream, limit)
            return
        lines = kind in _LINE_TYPES
        length = response.headers.get("content-length", "")
        if not lines and length.isdigit() and int(length) > limit:
            raise _OverLimitError(f"sent a body over {limit} bytes")
        response.stream = _Bounded(response.stream, limit, lines=lines)

    return bound


async def _read_error_body(response: httpx.Response) -> None:
    """Read the body of an answer with an error status here, to at most
    :data:`~router.backends.openai_http.ERROR_BODY_BYTES`, as the direct path reads one: a
    longer body is not read on, its connection is closed, and :class:`_UnreadErrorBodyError`
    fails the call from its status. litellm reads a stream's error body itself and drops
    whatever fails that read, so the bound is met before litellm sees the answer."""
    stream: Any = response.stream  # the pool's stream: closed here, read or not
    body = bytearray()
    try:
        async for data in stream:
            body += data
            if len(body) > ERROR_BODY_BYTES:
                raise _UnreadErrorBodyError(response)
    finally:
        await stream.aclose()
    response.stream = httpx.ByteStream(bytes(body))


async def _identity(request: httpx.Request) -> None:
    # An answer is counted as it arrives: asked uncompressed, so what is counted is what is held.
    request.headers["accept-encoding"] = "identity"


class _Bounded(httpx.AsyncByteStream):
    """A response body read within ``limit`` bytes: a line (``lines``) or in all.

    The same bound as the direct path's :func:`~router.backends.openai_http._lines`, not the
    same reader: that one hands its caller lines, split at LF; this one hands litellm the
    bytes as they came, and counts a line to CR, LF or CRLF, as SSE ends one. Built on
    ``_lines``, it would hold each line until its end and hand litellm a piece per line."""

    def __init__(self, stream: Any, limit: int, *, lines: bool) -> None:
        self._stream = stream
        self._limit = limit
        self._lines = lines

    async def __aiter__(self) -> AsyncIterator[bytes]:
        run = 0  # bytes of the line so far, or of the body
        kept = bytearray()  # the line so far, while it may be an error event
        async for data in self._stream:
            if not self._lines:
                run += len(data)
                if run > self._limit:
                    raise _OverLimitError(f"sent a body over {self._limit} bytes")
                yield data
                continue
            at = 0  # where the piece starts in data
            for piece in data.splitlines(keepends=True):  # at CR, LF or CRLF, as SSE
                line = piece.rstrip(b"\r\n")
                run += len(line)
                if run > self._limit:
                    raise _OverLimitError(f"sent a stream event over {self._limit} bytes")
                if run <= _EVENT_KEPT:
                    kept += line
                if len(line) < len(piece):
                    error = _error_event(kept) if run <= _EVENT_KEPT else None
                    if error is not None:
                        if at:  # what came before it reaches litellm; the event does not
                            yield data[:at]
                        raise _ProviderEventError(error)
                    run = 0
                    kept.clear()
                at += len(piece)
            yield data

    async def aclose(self) -> None:
        await self._stream.aclose()


class _Frames(httpx.AsyncByteStream):
    """An AWS event stream (Bedrock's) read within ``limit`` bytes a frame. Each frame opens
    with its whole length (4 bytes, big-endian): one that says it is over the bound is not
    read on. The work is per frame, not per byte: a length read at each frame's start."""

    def __init__(self, stream: Any, limit: int) -> None:
        self._stream = stream
        self._limit = limit

    async def __aiter__(self) -> AsyncIterator[bytes]:
        skip = 0  # where the next frame starts, from the start of the next piece
        head = b""  # the start of a frame's length, when a piece ended within it
        async for data in self._stream:
            at = skip
            while at < len(data):
                had = len(head)
                head += data[at : at + 4 - had]
                if len(head) < 4:
                    break
                size = int.from_bytes(head, "big")
                if size > self._limit:
                    raise _OverLimitError(f"sent a stream event over {self._limit} bytes")
                # A frame is 16 bytes at least: a shorter length, which botocore refuses, is
                # stepped over as 16 so the reading goes on to that refusal.
                at += max(size, 16) - had
                head = b""
            skip = max(at - len(data), 0)
            yield data

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _aclose(stream: object) -> None:
    # Close a stream left before its end: our own generator, or litellm's stream, which else
    # holds the provider's connection until it is collected. A failure to close one that broke
    # must not mask why the request ended.
    aclose = getattr(stream, "aclose", None)
    if aclose is None:
        return
    try:
        await aclose()
    except Exception:
        log.debug("closing a stream failed", exc_info=True)


@functools.cache
def _valid_user_parts() -> tuple[str, ...]:
    # litellm's user content part types, read once: quiet_litellm() configures the process's
    # environment and loggers, work for the first call, not for every request.
    quiet_litellm()
    from litellm.types.llms.openai import ValidUserMessageContentTypes

    return tuple(ValidUserMessageContentTypes)


def check_user_parts(messages: list[Any], label: str) -> None:
    """Refuse (400) a user content part of a type litellm takes for no provider
    (``input_text``, a Responses part sent to chat, say). litellm refused it with a bare
    ``Exception``, which read as the model being unreachable: a 502 the SDK retried."""
    valid = _valid_user_parts()
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if message.get("role") != "user" or not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if isinstance(part, dict) and kind not in valid:
                raise BadRequestError(
                    f"{label} cannot take a user content part of type '{kind}': it takes "
                    f"{', '.join(valid)}",
                    code="unsupported_parameter",
                    param=f"messages.{i}.content.{j}.type",
                )


#: What a ``json_object`` answer must be, as the schema of the tool litellm forces an Anthropic
#: model to call: any JSON object.
_ANY_OBJECT: dict[str, Any] = {"type": "object"}


def anthropic_response_format(response_format: Any, label: str) -> Any:
    """``response_format`` as litellm honours it for a Claude model (:func:`claude`: on
    Anthropic's API, Bedrock or Vertex AI, which litellm translates alike), which has no JSON
    mode.

    litellm makes a ``json_schema`` one a tool the model must call, and the call's input the
    answer's text, but sent ``json_object`` (or anything but ``text``) nothing: the model
    answered in prose to a client that parses JSON. ``json_object`` (with llama.cpp's optional
    ``schema``) goes as a ``json_schema`` of any object; a type it does not know is refused (400),
    so a chain goes on to a model that may take it. A ``json_schema`` without its ``schema``,
    which OpenAI's API takes (it is optional there), goes with a schema of any object: litellm
    failed on it (``KeyError: 'schema'``), and the client had a 400 for a valid request."""
    if not isinstance(response_format, dict):
        return response_format
    kind = response_format.get("type")
    given = response_format.get("json_schema")
    if kind == "json_schema" and isinstance(given, dict) and given.get("schema") is None:
        return {**response_format, "json_schema": {**given, "schema": _ANY_OBJECT}}
    if kind in ("text", "json_schema"):
        return response_format
    if kind == "json_object":
        schema = response_format.get("schema")
        schema = schema if isinstance(schema, dict) else _ANY_OBJECT
        spec = {"name": "json_object", "schema": schema}
        return {"type": "json_schema", "json_schema": spec}
    raise BadRequestError(
        f"{label} (anthropic) does not take response_format type '{kind}': it takes text, "
        "json_object and json_schema",
        code="unsupported_parameter",
        param="response_format.type",
    )


def _made_up_finish(stream: Any) -> bool:
    """Whether litellm made up the ``finish_reason`` of an OpenAI-shaped stream (``mistral/``,
    ``groq/``, any OpenAI-compatible server it calls): it reads the ``data: [DONE]`` that ends
    one as ``stop``, whether or not the provider sent a finish_reason, so a stream cut with
    [DONE] (llama_cpp.server ends one it interrupts so) read as a whole answer. litellm keeps
    whether the provider sent one (private state: a version that does not keep it is
    trusted, and the tests of cut streams through litellm fail)."""
    return (
        getattr(stream, "uses_openai_chat_stream", False) is True
        and getattr(stream, "received_any_finish_reason", True) is False
    )


#: The most litellm downloads for one image URL it must send inline (Anthropic models: it
#: fetches the image itself), unless ``MAX_IMAGE_URL_DOWNLOAD_SIZE_MB`` is set: Anthropic's
#: own limit per image. litellm's default, 50, let a 900-byte request with ten image URLs make
#: the process download and hold hundreds of megabytes (SECURITY.md).
IMAGE_URL_MB = "5"

#: The variable litellm reads its limit on equal chunks in a row from (see
#: :func:`quiet_litellm`): set, litellm's guard holds; unset, Tiergate turns it off.
REPEATED_CHUNKS = "REPEATED_STREAMING_CHUNK_LIMIT"


def quiet_litellm() -> Any:
    """litellm, imported on first use offline (its bundled cost map and catalogs), with no
    telemetry and no debug banners (it prints one for every model name it does not know, such
    as Tiergate's), image URL downloads bounded by :data:`IMAGE_URL_MB` (read when litellm
    is imported), and its guard on a stream repeating one chunk off (:data:`REPEATED_CHUNKS`).

    litellm's loggers lose the plain-text handler it gives them at import (INFO on stdout,
    one record on two lines): their records go to the application's logging alone, which under
    ``tiergate serve`` writes JSON lines (:mod:`router.logs`), from INFO up whatever the
    application's level, unless ``LITELLM_LOG`` asks for litellm's own debug lines (they hold
    the prompts)."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    # Its other catalogs too (the first call to an Anthropic model fetched the beta headers'
    # from GitHub): its bundled copies, never a download at run time.
    os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
    os.environ.setdefault("MAX_IMAGE_URL_DOWNLOAD_SIZE_MB", IMAGE_URL_MB)
    if "LITELLM_LOG" not in os.environ:
        # litellm's debug lines hold each request's messages: under TIERGATE_LOG_LEVEL=debug
        # every prompt sent to a provider through litellm reached the log.
        for name in _LITELLM_LOGGERS:
            logging.getLogger(name).setLevel(logging.INFO)
    import litellm

    litellm.telemetry = False
    litellm.suppress_debug_info = True
    # litellm cut a request's ``stop`` to its first 4 (OpenAI's limit) for every provider:
    # a Claude asked for 6 stopped at 4 of them, and an answer that ran past one the client
    # stops on looked like the model's fault. The fit check holds each model to its own limit
    # (stop_sequence_limit) and sends a request over it elsewhere, as it does max_tokens.
    litellm.disable_stop_sequence_limit = True
    if REPEATED_CHUNKS not in os.environ:
        # litellm ends a stream with a 500 once 100 chunks in a row carry the same text: a
        # legitimate answer does that (a table of equal rows, a phrase asked for 200 times, a
        # provider streaming fixed-size pieces of a repetitive text), and the direct path
        # served it. Tiergate bounds an answer itself (max_tokens, max_event_bytes). litellm
        # reads the limit (an attribute named as the variable) at each chunk: set here, it
        # holds however litellm was imported.
        setattr(litellm, REPEATED_CHUNKS, sys.maxsize)
    for name in _LITELLM_LOGGERS:
        logging.getLogger(name).handlers.clear()
    return litellm


def counted_tokens(model: ModelLike, body: Mapping[str, Any], text: str) -> tuple[int, int]:
    """The tokens of ``body``'s prompt (its messages and tools) and of ``text`` (an answer) as
    litellm's tokenizer for ``model`` counts them (``litellm.token_counter``: tiktoken for
    OpenAI models, Anthropic's and DeepSeek's bundled tokenizers, tiktoken for any other), for
    a call whose provider reported no usage. Offline, as :func:`quiet_litellm` imports litellm:
    tiktoken reads the encodings litellm bundles, a tokenizer only the Hugging Face Hub holds
    falls back to tiktoken, and an image is counted at its default size, not fetched. Costs up to
    a second for a prompt of megabytes: call it off the event loop."""
    litellm = quiet_litellm()
    name = model.litellm_model or model.name
    messages = body.get("messages")
    tools = body.get("tools")
    prompt = litellm.token_counter(
        model=name,
        messages=messages if isinstance(messages, list) else [],
        tools=tools if isinstance(tools, list) and tools else None,
        use_default_image_token_count=True,
    )
    answer = litellm.token_counter(model=name, text=text) if text else 0
    return int(prompt), int(answer)


def map_litellm_error(
    exc: Exception,
    label: str,
    key: str | None = None,
    sent: Mapping[str, Any] | None = None,
) -> TiergateError:
    """Map a litellm exception to Tiergate's hierarchy; ``key``, the key the call sent, is
    redacted from the text whatever its shape; ``sent``, the request, whose ids a 404 may
    name. An error the provider answered (with headers, or litellm's
    ``provider_status_code``) is mapped from its status and error body as the direct paths
    map the same answer (:func:`_as_answered`), so the two cannot drift; one that only
    litellm raised (a timeout, a connection, its own refusals) by its class.

    The message reads as the direct paths' do (``claude answered 529: Overloaded``,
    ``claude unreachable: the stream ended before it finished``): the model, what happened,
    the provider's status and its own message, without litellm's wording around them. The log
    keeps litellm's text (its exception's name and message, scrubbed) for the operator.

    A failure mid-stream comes wrapped in a ``MidStreamFallbackError`` (for litellm's router,
    which Tiergate does not use): the error it wraps is the one mapped, and named once."""
    found = _found_in_stream(exc, label, key, sent)
    if found is not None:
        return found
    exc = _unwrapped(exc)
    status = getattr(exc, "status_code", None)
    name = type(exc).__name__
    if name == "UnsupportedParamsError":
        return _unsupported(exc, label, key)
    raw = _litellm_text(exc, key, limit=_READ_LIMIT)
    log.info("%s: litellm raised %s: %s", label, name, raw[:_TEXT_LIMIT])
    detail, error = _provider_words(raw)
    answered = _answered(exc, status)
    said = f"{label} answered {answered}: {detail}" if answered else f"{label} failed: {detail}"
    overloaded = _overloaded(exc, status, raw)
    error = _error_object(exc, error, detail, raw)
    failure = _as_answered(exc, answered, error, said, overloaded=overloaded, sent=sent)
    if failure is not None:
        return failure
    if "Timeout" in name or status in (408, 504):
        return UpstreamTimeoutError(f"{label} timed out: {detail}", upstream_status=status)
    if status == 429 or "RateLimit" in name:
        if request_too_large(raw):
            return UpstreamRequestTooLargeError(said, upstream_status=429)
        return UpstreamRateLimitedError(said, upstream_status=429, retry_after=_retry_after(exc))
    param = getattr(exc, "param", None)  # the field the provider's 400 named, if it did
    param = param if isinstance(param, str) else None
    refused = said if answered else f"{label} cannot take the request: {detail}"
    if "ContextWindow" in name:  # over the window as the direct paths read it (_error_object)
        return provider_failure(400, error, refused, upstream_status=status)
    if status in (400, 413, 422) or "BadRequest" in name:
        return UpstreamBadRequestError(refused, upstream_status=status, param=param)
    if status in (401, 403):
        return UpstreamAuthError(said, upstream_status=status)
    failed = _failed_in_process(exc, label, detail) if "Connection" in name else None
    if failed is not None:
        return failed
    if "Connection" in name or _cannot_connect(exc):
        return BackendError(
            f"{label} unreachable: {_UNFINISHED.sub(STREAM_ENDED, detail)}",
            code="upstream_unreachable",
            upstream_status=status,
        )
    return BackendError(said, upstream_status=status if isinstance(status, int) else None)


def _as_answered(
    exc: Exception,
    answered: int | None,
    error: dict[str, Any],
    said: str,
    *,
    overloaded: bool,
    sent: Mapping[str, Any] | None = None,
) -> BackendError | None:
    """The failure of a provider that ``answered`` an error status, by the mapping the direct
    paths take the same answer through (:func:`~router.backends.openai_http.provider_failure`),
    from its ``error`` object (:func:`_error_object`), with the provider's ``Retry-After``. An
    ``overloaded`` provider (:func:`_overloaded`, which litellm may name only in its text) is
    one whatever litellm's status; else None where nothing answered."""
    if overloaded:
        provider = getattr(exc, "provider_status_code", None)
        status = getattr(exc, "status_code", None)
        return UpstreamOverloadedError(
            said,
            upstream_status=provider if isinstance(provider, int) else status,
            retry_after=_retry_after(exc),
        )
    if answered is None:
        return None
    return provider_failure(
        answered,
        error,
        said,
        upstream_status=answered,
        retry_after=_retry_after(exc),
        sent=sent,
    )


def _error_object(exc: Exception, error: dict[str, Any], detail: str, raw: str) -> dict[str, Any]:
    """The provider's error object, as its SDK kept it (:func:`_sdk_body`), else as litellm's
    text ``raw`` repeats it (``error``), else its message alone (``detail``), with what litellm
    read of it that the text may not hold: the field a 400 named (``param``), and its word
    that the prompt is over the window (its ``ContextWindowExceededError``) only where ``raw``
    holds none of the words the direct paths read (a provider whose words they do not know).
    litellm finds its words anywhere in its text, a 400 that quotes a user's prompt included;
    where they are words the direct paths know, where they stand decides, as there."""
    error = dict(_sdk_body(exc) or error)
    error.setdefault("message", detail)
    param = getattr(exc, "param", None)
    if isinstance(param, str):
        error.setdefault("param", param)
    if "ContextWindow" in type(exc).__name__ and not window_words_in(raw):
        error["code"] = "context_length_exceeded"
    return error


def _sdk_body(exc: BaseException) -> dict[str, Any] | None:
    """The error object of the provider's answer as the SDK litellm called it through kept
    it (openai-python's ``body``, on litellm's error or one it was raised from), or None:
    litellm's text then holds only its message."""
    for cause in _causes(exc):
        body = getattr(cause, "body", None)
        if isinstance(body, dict):
            inner = body.get("error")
            return inner if isinstance(inner, dict) else body
    return None


def _found_in_stream(
    exc: Exception, label: str, key: str | None, sent: Mapping[str, Any] | None = None
) -> BackendError | None:
    """The failure Tiergate found in what litellm read, among ``exc``'s causes: an answer over
    the bound, as the direct path says it (router.backends.openai_http), or the provider's
    error event, by its kind (a rate limit, an overload, a bad request) as the direct and
    native paths take it (:func:`~router.backends.openai_http.stream_failure`, with ``sent``,
    the request, whose ids a 404 may name); else None."""
    causes = list(_causes(exc))
    over = next((c for c in causes if isinstance(c, _OverLimitError)), None)
    if over is not None:
        return UpstreamBadResponseError(f"{label} {over}")
    unread = next((c for c in causes if isinstance(c, _UnreadErrorBodyError)), None)
    if unread is not None:
        return unread_error_body(unread.status, label, unread.reason, unread.retry_after, key)
    event = next((c.error for c in causes if isinstance(c, _ProviderEventError)), None)
    event = event if event is not None else _sdk_error_event(exc)
    return None if event is None else stream_failure(label, event, api_key=key, sent=sent)


def _unwrapped(exc: Exception) -> Exception:
    """The error a ``MidStreamFallbackError`` wraps, else ``exc``."""
    wrapped = getattr(exc, "original_exception", None)
    if type(exc).__name__ == "MidStreamFallbackError" and isinstance(wrapped, Exception):
        return wrapped
    return exc


def _failed_in_process(exc: Exception, label: str, detail: str) -> TiergateError | None:
    """litellm's own failure, which it reports as a connection error, or None for a network
    error. A request it cannot translate for the provider (:func:`_refused_before_sending`)
    is a 400 that names why: the chain tries its next model, which may take it, and alone
    the client learns what to fix, rather than a 502 its SDK retries to the same end. A
    Python error elsewhere (reading the provider's answer) is a :class:`ClientLibraryError`.
    Neither cools the model: one tenant's request must not pass it over for all."""
    fault = _python_fault(exc)
    if _refused_before_sending(exc):
        how = f" ({type(fault).__name__}: {detail})" if fault is not None else f": {detail}"
        return BadRequestError(f"{label} cannot take the request: litellm cannot translate it{how}")
    if fault is not None:
        return ClientLibraryError(
            f"{label} could not be called: its client library failed "
            f"({type(fault).__name__}: {detail})"
        )
    return None


# How litellm says a stream stopped before its end (the direct paths say STREAM_ENDED).
_UNFINISHED = re.compile(r"^Stream ended before a finish_reason was received\.?$")


def _answered(exc: Exception, status: Any) -> int | None:
    """The HTTP status the provider answered, or None where nothing shows it answered: litellm
    gives its own errors a status too (a 400 for a request it cannot translate, a 500 for a
    connection that failed), but only a provider's answer has headers."""
    if _cannot_connect(exc):  # litellm's 500 (its provider_status_code too) for no connection
        return None
    provider = getattr(exc, "provider_status_code", None)
    if isinstance(provider, int):
        return provider
    if isinstance(status, int) and getattr(exc, "litellm_response_headers", None):
        return status
    return None


def _overloaded(exc: Exception, status: Any, message: str) -> bool:
    """Whether the provider said it is overloaded: a 503 (litellm's ``ServiceUnavailableError``),
    or Anthropic's 529 ``overloaded_error``, which litellm raises as an ``InternalServerError``
    with status 500 and the provider's 529 in ``provider_status_code``; any 5xx whose text
    names ``overloaded_error`` is one too."""
    return (
        status in OVERLOADED
        or getattr(exc, "provider_status_code", None) in OVERLOADED
        or (
            (status is None or (isinstance(status, int) and status >= 500))
            and "overloaded_error" in message
        )
    )


# What litellm appends to an error's text that is neither its nor the provider's word on it: the
# request's messages (the prompt) and a Python traceback (the server's paths and code).
_LITELLM_ADDENDA = re.compile(
    r"\n(?:Received Messages=|Traceback \(most recent call last\)).*", re.S
)


def _litellm_text(exc: Exception, key: str | None = None, limit: int = 300) -> str:
    """``exc``'s text as clients, logs and outcome records may repeat it: without what
    litellm appends (:data:`_LITELLM_ADDENDA`), ``key`` and anything shaped like a credential
    scrubbed, at most ``limit`` characters."""
    return scrub(_LITELLM_ADDENDA.sub("", str(exc)), [key])[:limit]


#: The most characters of a provider's message an error repeats, as the direct path's 500,
#: and of litellm's text read to find it (a provider's whole error body, in most cases).
_TEXT_LIMIT = 500
_READ_LIMIT = 20_000
# litellm's words around the provider's: its exception's name (``litellm.RateLimitError: ``,
# at times twice, or then bare before the provider's), the provider's (``AnthropicException - ``,
# ``GeminiException InternalServerError - ``), and its advice on catching it.
_LITELLM_PREFIX = re.compile(
    r"^(?:litellm\.\w+:\s*|\w+(?:Exception|Error)(?: \w+Error)? - "
    r"|(?:\w+Error|Timeout Error): (?=\w+(?:Exception|Error) - ))+"
)
# aiohttp's name for the TLS settings of a connection it could not make: an object's address.
_SSL_CONTEXT = re.compile(r" ssl:<[^>]*>")
_LITELLM_ADVICE = re.compile(r"\.?\s*Handle with `litellm\.\w+`\.?$")


def _provider_words(text: str) -> tuple[str, dict[str, Any]]:
    """What the provider (or the transport) said, from litellm's text: without litellm's words
    around it (:data:`_LITELLM_PREFIX`), and the ``message`` of a JSON error body rather than
    the body, which litellm repeats whole (as a ``b'...'`` bytes literal, from a stream); and
    that body's error object (:func:`~router.backends.openai_http.upstream_error`), else {}."""
    text = _LITELLM_ADVICE.sub("", _LITELLM_PREFIX.sub("", text.strip()))
    text = _SSL_CONTEXT.sub("", text)
    body = text
    if re.fullmatch(r"b'.*'|b\".*\"", body, re.S):
        with contextlib.suppress(ValueError, SyntaxError):
            body = ast.literal_eval(body).decode("utf-8", "replace")
    error = upstream_error(body)
    said = error.get("message")
    if isinstance(said, str) and said:
        text = said
    return text[:_TEXT_LIMIT] or "error", error


# How litellm names the request fields a provider does not take, before it calls the provider.
_UNSUPPORTED = re.compile(r"(\S+) does not support parameters: \[([^\]]*)\]")


def _unsupported(exc: Exception, label: str, key: str | None = None) -> BadRequestError:
    """litellm's refusal of request fields the model's provider does not take (``seed``, ``n``,
    ``logprobs`` for an Anthropic model), made before any call: the model cannot honour the
    request, as the local model cannot take tools. The chain goes on to its next model, and
    alone it is a 400 that names the fields (not litellm's advice on its own proxy settings)."""
    match = _UNSUPPORTED.search(str(exc))
    names = re.findall(r"'([^']+)'", match.group(2)) if match else []
    if not match or not names:
        return BadRequestError(
            f"{label} cannot take the request: {_litellm_text(exc, key)}",
            code="unsupported_parameter",
        )
    fields = ", ".join(f"'{n}'" for n in names)
    return BadRequestError(
        f"{label} ({match.group(1)}) does not take {fields}: send the request without "
        f"{'it' if len(names) == 1 else 'them'}, or to a model that takes "
        f"{'it' if len(names) == 1 else 'them'}",
        code="unsupported_parameter",
        param=names[0],
    )


#: The fields of OpenAI's chat ``usage`` (openai-python's ``CompletionUsage``), and of its two
#: breakdowns, as openai-python 3.63 defines them: what an answer through litellm keeps.
_USAGE_FIELDS = frozenset(
    {"prompt_tokens", "completion_tokens", "total_tokens"}
    | {"prompt_tokens_details", "completion_tokens_details"}
)
_USAGE_DETAILS = {
    "prompt_tokens_details": frozenset(
        {"audio_tokens", "cache_write_tokens", "cached_tokens", "image_tokens", "text_tokens"}
    ),
    "completion_tokens_details": frozenset(
        {"accepted_prediction_tokens", "audio_tokens", "reasoning_tokens"}
        | {"rejected_prediction_tokens", "text_tokens"}
    ),
}


def openai_shaped(payload: dict[str, Any], *, message: bool) -> dict[str, Any]:
    """litellm's answer (``message``) or chunk in OpenAI's own shape, as a client that stores
    the message and sends it back, perhaps to another model, needs it.

    * The ``provider_specific_fields`` litellm puts on each message or delta when every one of
      them is null (``{"citations": null, "thinking_blocks": null}`` for an Anthropic model)
      go: a strict model refuses the field in a message sent back. A field that says
      something stays.
    * A whole message's ``tool_calls`` lose the ``index`` litellm gives them (the content
      block's place in Anthropic's answer: 1 for the only call after the text). OpenAI's
      message tool calls have none; only a stream's deltas do, and those keep it.
    * ``usage`` keeps OpenAI's fields (:data:`_USAGE_FIELDS`, :data:`_USAGE_DETAILS`), the
      prompt cache's reads and writes among them (``cached_tokens``, ``cache_write_tokens``,
      which litellm maps from Anthropic's), and loses litellm's own: its copies of Anthropic's
      counts (``cache_creation_input_tokens``, ``cache_read_input_tokens``,
      ``cache_creation_tokens``), ``server_tool_use``, and the ``cost`` of a stream's last
      chunk, litellm's price, which is neither the policy's nor what Tiergate records.

    Only litellm's answers are shaped: the direct OpenAI path passes the provider's own
    through, fields OpenAI adds later included."""
    for choice in payload.get("choices") or ():
        part = choice.get("message" if message else "delta")
        if not isinstance(part, dict):
            continue
        extra = part.get("provider_specific_fields")
        if isinstance(extra, dict) and not any(v is not None for v in extra.values()):
            del part["provider_specific_fields"]
        if message:
            for call in part.get("tool_calls") or ():
                if isinstance(call, dict):
                    call.pop("index", None)
    usage = payload.get("usage")
    if isinstance(usage, dict):
        for key in usage.keys() - _USAGE_FIELDS:
            del usage[key]
        for key, fields in _USAGE_DETAILS.items():
            details = usage.get(key)
            if isinstance(details, dict):
                for name in details.keys() - fields:
                    del details[name]
    return payload


def _cannot_connect(exc: BaseException) -> bool:
    """Whether a connection failure caused ``exc``: litellm reports one to an Anthropic model
    (or an OpenAI one it calls) as ``InternalServerError`` with status 500, over the
    ``httpx.ConnectError`` its HTTP client raised."""
    return any(isinstance(c, (httpx.ConnectError, ConnectionError)) for c in _causes(exc))


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and the errors it was raised from or while handling, each once."""
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        yield cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__


def _network(error: BaseException) -> bool:
    """Whether ``error`` is a network error (a socket's, or one of :data:`_NETWORK_MODULES`)."""
    return isinstance(error, (OSError, TimeoutError)) or type(error).__module__.startswith(
        _NETWORK_MODULES
    )


def _python_fault(exc: BaseException) -> BaseException | None:
    """The plain Python error ``exc`` wraps (``KeyError('json_schema')`` for a
    ``response_format`` litellm cannot translate) when it wraps no network error, else None:
    litellm reports its own failures as ``APIConnectionError`` whether or not anything reached
    the provider."""
    python: BaseException | None = None
    for cause in itertools.islice(_causes(exc), 1, None):
        if _network(cause):
            return None
        if (
            python is None
            and type(cause).__module__ == "builtins"
            and isinstance(cause, _PYTHON_FAULTS)
        ):
            python = cause
    return python


def _refused_before_sending(exc: BaseException) -> bool:
    """Whether litellm failed on the request before it sent anything: no network error among
    ``exc``'s causes, and one of them raised within ``litellm.main.completion``, the step that
    checks the request and translates it for the provider (its message check's "Invalid user
    message at index 0" for a content part of an unknown type, a ``KeyError`` translating
    ``response_format``). Under ``acompletion`` that step returns the call unmade; the call,
    and the reading of the provider's answer, fail in ``acompletion`` itself. litellm calls
    both ``APIConnectionError``, as it calls a connection refused: where it was raised is all
    that tells a request no provider could take from a provider that failed."""
    causes = list(_causes(exc))
    if any(_network(cause) for cause in causes):
        return False
    return any(
        frame.f_code.co_name == "completion" and frame.f_globals.get("__name__") == "litellm.main"
        for cause in causes
        for frame, _ in traceback.walk_tb(cause.__traceback__)
    )


#: The errors a bug or an unexpected value raises (not the end of a stream a provider cut).
_PYTHON_FAULTS = (LookupError, TypeError, AttributeError, ValueError)
#: The libraries whose errors are network errors, wherever they sit in an error's causes.
_NETWORK_MODULES = ("httpx", "httpcore", "aiohttp", "h11", "ssl", "anyio")


def _retry_after(exc: Exception) -> float | None:
    """The provider's ``Retry-After`` seconds on a litellm error, or None.

    litellm keeps the provider's headers in ``litellm_response_headers``; the ``response`` it
    attaches to its errors is one it builds itself, without them.
    """
    response = getattr(exc, "response", None)
    for headers in (
        getattr(exc, "litellm_response_headers", None),
        getattr(response, "headers", None),
    ):
        if headers is None:
            continue
        seconds = retry_after_s(headers.get("retry-after"))
        if seconds is not None:
            return seconds
    return None
