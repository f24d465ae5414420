"""Cost accounting: USD per request, closed and local, and the all-closed counterfactual.

Closed prices come from a model's ``price`` in the policy, else litellm's bundled cost map, read
as JSON straight from the installed package: offline, and without importing litellm (slow to
import, heavy in memory). A closed model neither prices costs $0 (:meth:`CostBook.unpriced`
names those, for the warnings of ``serve`` and ``policy check``). Prompt tokens a provider read
from or wrote to its prompt cache are priced at its cache prices where the price knows them (as
providers bill them: OpenAI's cached tokens at a half or a tenth, Anthropic's cache reads at a
tenth and cache writes at 1.25 times the input price, twice it for those kept an hour), else as
any input token (a one-hour write with no price of its own, as a five-minute one). A provider's
web searches (Anthropic's, as its usage counts them) are priced per search where the price
names one (litellm's ``search_context_cost_per_query``; a policy's ``web_search_per_1k``), else
count nothing. Local
calls are charged at a configured price per million tokens plus a price per GPU-hour, applied to
the request's local generation time. The counterfactual is what the same tokens would have cost
on the default closed model; "saved versus all-closed" is sum(counterfactual) - sum(cost).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from router.backends import Usage
    from router.policy import ModelSpec

_COST_MAP_FILE = "model_prices_and_context_window_backup.json"


@dataclass(frozen=True, slots=True)
class Price:
    """USD per token, input and output, and for prompt tokens read from or written to the
    provider's prompt cache (None: priced as input), and written to Anthropic's one-hour
    cache (None: priced as the other writes); and USD per web search (None: not known, $0)."""

    input_per_token: float
    output_per_token: float
    cache_read_per_token: float | None = None
    cache_write_per_token: float | None = None
    cache_write_1h_per_token: float | None = None
    per_web_search: float | None = None

    def cost(
        self,
        prompt_tokens: int,
        completion_tokens: int,
        *,
        cached: int = 0,
        cache_write: int = 0,
        cache_write_1h: int = 0,
        web_searches: int = 0,
    ) -> float:
        """USD for the given counts; ``cached`` and ``cache_write`` are the prompt tokens
        (counted in ``prompt_tokens``) read from and written to the prompt cache,
        ``cache_write_1h`` those of the writes kept an hour; ``web_searches``, the provider's
        searches."""
        read_price = self.input_per_token
        if self.cache_read_per_token is not None:
            read_price = self.cache_read_per_token
        write_price = self.input_per_token
        if self.cache_write_per_token is not None:
            write_price = self.cache_write_per_token
        hour_price = write_price
        if self.cache_write_1h_per_token is not None:
            hour_price = self.cache_write_1h_per_token
        cached = min(max(0, cached), prompt_tokens)
        cache_write = min(max(0, cache_write), prompt_tokens - cached)
        cache_write_1h = min(max(0, cache_write_1h), cache_write)
        uncached = prompt_tokens - cached - cache_write
        return (
            uncached * self.input_per_token
            + cached * read_price
            + (cache_write - cache_write_1h) * write_price
            + cache_write_1h * hour_price
            + completion_tokens * self.output_per_token
            + web_searches * (self.per_web_search or 0.0)
        )


#: The fields of a cost-map entry that :class:`CostBook` reads; the rest is dropped at load.
_PRICE_FIELDS = (
    "input_cost_per_token",
    "output_cost_per_token",
    "cache_read_input_token_cost",
    "cache_creation_input_token_cost",
    "cache_creation_input_token_cost_above_1hr",
    "search_context_cost_per_query",
)


def litellm_model_map() -> dict[str, Any]:
    """litellm's bundled model map (prices, context windows, output limits), whole, or an empty
    one if litellm is not installed: what ``litellm.model_cost`` holds offline, read without
    importing litellm. Callers keep only the fields they read."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return {}
    path = Path(next(iter(spec.submodule_search_locations))) / _COST_MAP_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


@functools.cache
def _litellm_tables() -> tuple[dict[str, Any], dict[str, int], frozenset[str], frozenset[str]]:
    # litellm's map, parsed once (about 0.1 s): its prices, its models' output limits, the
    # names of OpenAI's own models and of the models that reason only when asked to.
    data = litellm_model_map()
    prices = {
        name: {k: entry[k] for k in _PRICE_FIELDS if k in entry}
        for name, entry in data.items()
        if isinstance(entry, dict) and _PRICE_FIELDS[0] in entry
    }
    limits = {
        name: entry["max_output_tokens"]
        for name, entry in data.items()
        if isinstance(entry, dict) and type(entry.get("max_output_tokens")) is int
    }
    openai = frozenset(
        name
        for name, entry in data.items()
        if isinstance(entry, dict) and entry.get("litellm_provider") == "openai"
    )
    unreasoning = frozenset(
        name
        for name, entry in data.items()
        if isinstance(entry, dict) and entry.get("default_reasoning_effort") == "none"
    )
    return prices, limits, openai, unreasoning


def load_litellm_cost_map() -> dict[str, Any]:
    """litellm's bundled price table, or an empty one if litellm is not installed: per model,
    only the fields :class:`CostBook` reads, of the models that have a price. The whole table
    parses into about 70,000 objects that the server would hold for as long as it runs; the
    prices alone take a quarter of the memory (bench/README.md)."""
    return dict(_litellm_tables()[0])


def litellm_output_limits() -> Mapping[str, int]:
    """Each model's output limit (``max_output_tokens``) in litellm's bundled map, read in the
    same parse as its prices (:func:`load_litellm_cost_map`)."""
    return _litellm_tables()[1]


def litellm_openai_models() -> frozenset[str]:
    """The names litellm's bundled map lists as OpenAI's own models (``litellm_provider``
    ``openai``): ``gpt-4o`` and ``o3``, not ``deepseek-chat`` or ``claude-sonnet-4-5``, which
    the map lists under their own providers though an OpenAI-compatible API may serve them."""
    return _litellm_tables()[2]


def litellm_unreasoning_models() -> frozenset[str]:
    """The names litellm's bundled map gives ``default_reasoning_effort: none`` (``gpt-5.1``):
    models that reason only when a request sets ``reasoning_effort``."""
    return _litellm_tables()[3]


class CostBook:
    """Looks up prices once per model name and prices requests."""

    def __init__(
        self,
        cost_map: dict[str, Any],
        *,
        local_price_per_mtok: float = 0.0,
        local_price_per_gpu_hour: float = 0.0,
    ) -> None:
        self._map = cost_map
        self._local = Price(local_price_per_mtok / 1e6, local_price_per_mtok / 1e6)
        self._local_per_second = local_price_per_gpu_hour / 3600.0
        self._cache: dict[str, Price | None] = {}

    def price(self, litellm_model: str | None) -> Price | None:
        """The price of a closed model by its litellm name, or None when unknown."""
        if not litellm_model:
            return None
        if litellm_model not in self._cache:
            self._cache[litellm_model] = self._lookup(litellm_model)
        return self._cache[litellm_model]

    def _entry(self, name: str) -> dict[str, Any] | None:
        for key in (name, name.split("/", 1)[-1]):
            entry = self._map.get(key)
            if isinstance(entry, dict) and "input_cost_per_token" in entry:
                return entry
        return None

    def _lookup(self, name: str) -> Price | None:
        entry = self._entry(name)
        if entry is None:
            return None
        return Price(
            float(entry.get("input_cost_per_token") or 0.0),
            float(entry.get("output_cost_per_token") or 0.0),
            _optional(entry.get("cache_read_input_token_cost")),
            _optional(entry.get("cache_creation_input_token_cost")),
            _optional(entry.get("cache_creation_input_token_cost_above_1hr")),
            _per_search(entry.get("search_context_cost_per_query")),
        )

    def closed_price(self, model: ModelSpec | str | None) -> Price | None:
        """A closed model's price: its policy ``price`` when it names one, else litellm's table
        by its ``litellm_model`` (a bare string is a litellm name); None when neither knows it."""
        if model is None or isinstance(model, str):
            return self.price(model)
        if model.price is not None:
            given = model.price
            return Price(
                given.input_per_mtok / 1e6,
                given.output_per_mtok / 1e6,
                _per_token(given.cache_read_per_mtok),
                _per_token(given.cache_write_per_mtok),
                _per_token(given.cache_write_1h_per_mtok),
                None if given.web_search_per_1k is None else given.web_search_per_1k / 1e3,
            )
        return self.price(model.litellm_model)

    def closed_cost(
        self,
        model: ModelSpec | str | None,
        prompt: int,
        completion: int,
        *,
        cached: int = 0,
        cache_write: int = 0,
        cache_write_1h: int = 0,
        web_searches: int = 0,
    ) -> float:
        """USD for a call to the closed ``model``, ``cached``, ``cache_write`` and
        ``cache_write_1h`` of its prompt tokens at the model's cache prices, its
        ``web_searches`` at its price per search (:meth:`Price.cost`); 0.0 when its price is
        unknown (:meth:`unpriced` names such models, for a warning)."""
        price = self.closed_price(model)
        if price is None:
            return 0.0
        return price.cost(
            prompt,
            completion,
            cached=cached,
            cache_write=cache_write,
            cache_write_1h=cache_write_1h,
            web_searches=web_searches,
        )

    def unpriced(self, models: Iterable[ModelSpec]) -> list[str]:
        """The closed models among ``models`` whose calls would count $0: no policy price and
        none in litellm's table."""
        return [m.name for m in models if m.tier == "closed" and self.closed_price(m) is None]

    def unpriced_searches(self, models: Iterable[ModelSpec]) -> list[str]:
        """The closed models among ``models`` that may search the web, an ``anthropic/`` model
        (Anthropic's web search tool, which only such a model is sent:
        ``router.gateway.Gateway.fitted``), whose price names none per search (its policy
        ``price`` no ``web_search_per_1k``, litellm's table no ``search_context_cost_per_query``,
        as for ``claude-haiku-4-5``): their searches would count $0. Those without any price are
        :meth:`unpriced`'s."""
        return [
            m.name
            for m in models
            if m.tier == "closed"
            and (m.litellm_model or "").startswith("anthropic/")
            and (price := self.closed_price(m)) is not None
            and price.per_web_search is None
        ]

    def local_cost(self, prompt: int, completion: int, generation_s: float = 0.0) -> float:
        """USD for a local call: tokens at the per-1M price plus generation time per GPU-hour."""
        return self._local.cost(prompt, completion) + generation_s * self._local_per_second

    def call_cost(self, model: ModelSpec, usage: Usage) -> float:
        """USD for one call to ``model`` that used ``usage``: a closed model's at its prices, the
        cached prompt tokens at its cache prices and its web searches at its price per search,
        as the provider bills them; a local one's at the local prices, generation time
        included."""
        if model.tier == "closed":
            return self.closed_cost(
                model,
                usage.prompt_tokens,
                usage.completion_tokens,
                cached=usage.cached_tokens,
                cache_write=usage.cache_write_tokens,
                cache_write_1h=usage.cache_write_1h_tokens,
                web_searches=usage.web_searches,
            )
        return self.local_cost(usage.prompt_tokens, usage.completion_tokens, usage.generation_s)


def _per_token(per_mtok: float | None) -> float | None:
    # A policy price per 1M tokens, per token; None stays None (priced as another price).
    return None if per_mtok is None else per_mtok / 1e6


def _per_search(value: Any) -> float | None:
    # litellm's price per web search, by the search's context size: its medium one, which
    # litellm's cost code charges when the request names none (every Anthropic search).
    if isinstance(value, dict):
        value = value.get("search_context_size_medium")
    return _optional(value)


def _optional(value: Any) -> float | None:
    # A cache price in litellm's table: a number, else None (priced as input).
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
