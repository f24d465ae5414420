"""Pricing requests: closed models from litellm's bundled table (offline), local calls per
token and per GPU-hour, and an unknown model costing nothing rather than failing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from router.costs import CostBook, Price, load_litellm_cost_map
from tests.conftest import KEYS, LiveServer, live, policy_yaml, wait_for
from tests.fake_provider import SEARCH_RESULT_TOKENS, Behaviour, FakeProvider

MAP = {
    "gpt-4o": {"input_cost_per_token": 2.5e-6, "output_cost_per_token": 1e-5},
    "anthropic/claude-x": {"input_cost_per_token": 3e-6, "output_cost_per_token": 1.5e-5},
    "embedding-only": {"mode": "embedding"},
}


def test_a_closed_call_is_priced_by_its_litellm_name_with_or_without_provider() -> None:
    book = CostBook(MAP)
    assert book.closed_cost("openai/gpt-4o", 1000, 100) == pytest.approx(0.0035)
    assert book.closed_cost("gpt-4o", 1000, 100) == pytest.approx(0.0035)
    assert book.price("anthropic/claude-x") == Price(3e-6, 1.5e-5)


def test_an_unknown_or_unpriced_model_costs_nothing() -> None:
    book = CostBook(MAP)
    assert book.price("openai/not-a-model") is None and book.price(None) is None
    assert book.closed_cost("embedding-only", 1000, 100) == 0.0


def test_a_local_call_pays_per_token_and_per_gpu_hour() -> None:
    book = CostBook({}, local_price_per_mtok=0.2, local_price_per_gpu_hour=3.6)
    assert book.local_cost(1_000_000, 0) == pytest.approx(0.2)
    assert book.local_cost(500_000, 500_000, generation_s=10.0) == pytest.approx(0.21)
    assert CostBook({}).local_cost(1_000_000, 1_000_000, 100.0) == 0.0


def test_litellms_bundled_table_is_read_offline() -> None:
    table = load_litellm_cost_map()
    assert CostBook(table).closed_cost("openai/gpt-4o", 1_000_000, 0) > 0.0


def test_a_closed_models_output_limit_comes_from_litellms_table() -> None:
    from router.backends.closed import output_limit
    from router.policy import ModelSpec

    assert output_limit(ModelSpec(tier="closed", litellm_model="openai/gpt-4o")) == 16384
    unknown = ModelSpec(tier="closed", litellm_model="openai/not-a-model")
    assert output_limit(unknown) is None


def test_the_loaded_table_keeps_only_prices() -> None:
    table = load_litellm_cost_map()
    assert table, "litellm's table should be installed with the dev dependencies"
    for entry in table.values():
        assert "input_cost_per_token" in entry
        assert set(entry) <= {
            "input_cost_per_token",
            "output_cost_per_token",
            "cache_read_input_token_cost",
            "cache_creation_input_token_cost",
            "cache_creation_input_token_cost_above_1hr",
            "search_context_cost_per_query",
        }


def test_cached_prompt_tokens_are_priced_at_the_cache_prices() -> None:
    """Providers bill prompt tokens read from their prompt cache at a fraction of the input
    price and (Anthropic) those written to it at more; a price that names no cache price
    charges them as input."""
    from router.policy import ModelPrice

    book = CostBook(
        {
            "gpt-4o": {**MAP["gpt-4o"], "cache_read_input_token_cost": 1.25e-6},
            "claude-x": {
                **MAP["anthropic/claude-x"],
                "cache_read_input_token_cost": 3e-7,
                "cache_creation_input_token_cost": 3.75e-6,
            },
        }
    )
    # 1,000 prompt tokens of which 800 cached: 200 at input, 800 at the cache read price.
    assert book.closed_cost("openai/gpt-4o", 1000, 100, cached=800) == pytest.approx(
        200 * 2.5e-6 + 800 * 1.25e-6 + 100 * 1e-5
    )
    assert book.closed_cost(
        "anthropic/claude-x", 1000, 100, cached=600, cache_write=300
    ) == pytest.approx(100 * 3e-6 + 600 * 3e-7 + 300 * 3.75e-6 + 100 * 1.5e-5)
    # No cache price: cached tokens cost what input tokens do.
    assert CostBook(MAP).closed_cost("gpt-4o", 1000, 100, cached=800) == pytest.approx(0.0035)
    own = _own(ModelPrice(input_per_mtok=2, output_per_mtok=8, cache_read_per_mtok=0.5))
    assert book.closed_cost(own, 1_000_000, 0, cached=500_000) == pytest.approx(1.0 + 0.25)


def _own(price: Any) -> Any:
    # A closed model the policy prices itself.
    from router.policy import ModelSpec

    return ModelSpec(
        name="own",
        tier="closed",
        litellm_model="anthropic/private",
        supports_tools=True,
        supports_images=True,
        price=price,
    )


def test_one_hour_cache_writes_have_their_own_price() -> None:
    """Anthropic bills a prompt-cache write kept an hour at twice the input price, one kept
    five minutes at 1.25 times; a price that names no one-hour price charges it as the other
    writes (as litellm does), and a policy price can name it."""
    from router.policy import ModelPrice

    claude = {
        **MAP["anthropic/claude-x"],
        "cache_read_input_token_cost": 3e-7,
        "cache_creation_input_token_cost": 3.75e-6,
    }
    book = CostBook({"claude-x": {**claude, "cache_creation_input_token_cost_above_1hr": 6e-6}})
    # 1,000 prompt tokens: 600 read, 300 written of which 100 for an hour, 100 at input.
    assert book.closed_cost(
        "anthropic/claude-x", 1000, 100, cached=600, cache_write=300, cache_write_1h=100
    ) == pytest.approx(100 * 3e-6 + 600 * 3e-7 + 200 * 3.75e-6 + 100 * 6e-6 + 100 * 1.5e-5)
    assert CostBook({"claude-x": claude}).closed_cost(
        "claude-x", 1000, 0, cache_write=300, cache_write_1h=100
    ) == pytest.approx(700 * 3e-6 + 300 * 3.75e-6)
    own = _own(
        ModelPrice(
            input_per_mtok=1,
            output_per_mtok=5,
            cache_write_per_mtok=1.25,
            cache_write_1h_per_mtok=2,
        )
    )
    assert book.closed_cost(
        own, 1_000_000, 0, cache_write=1_000_000, cache_write_1h=400_000
    ) == pytest.approx(0.6 * 1.25 + 0.4 * 2)


def test_web_searches_are_priced_per_search() -> None:
    """Anthropic bills each web search ($10 per 1,000) beside the tokens: litellm's table names
    the price by the search's context size (a Claude's searches are the medium one's), a
    policy price per 1,000 searches; a price that names none counts them $0."""
    from router.policy import ModelPrice

    searched = {"search_context_cost_per_query": {"search_context_size_medium": 0.01}}
    book = CostBook({"claude-x": {**MAP["anthropic/claude-x"], **searched}})
    assert book.closed_cost("anthropic/claude-x", 1000, 100, web_searches=3) == pytest.approx(
        1000 * 3e-6 + 100 * 1.5e-5 + 3 * 0.01
    )
    assert CostBook(MAP).closed_cost("anthropic/claude-x", 0, 0, web_searches=3) == 0.0
    own = _own(ModelPrice(input_per_mtok=1, output_per_mtok=5, web_search_per_1k=10))
    assert book.closed_cost(own, 0, 0, web_searches=7) == pytest.approx(0.07)


CACHED, WRITTEN, HOUR = 4000, 1000, 600


@pytest.fixture(scope="module")
def priced(tmp_path_factory: pytest.TempPathFactory, fake: FakeProvider) -> Iterator[LiveServer]:
    """Tiergate with gpt-4o and a Claude model litellm's table prices, on the fake provider."""
    policy = policy_yaml(fake).replace(
        "anthropic/claude-3-5-sonnet-20241022", "anthropic/claude-sonnet-4-5-20250929"
    )
    with pytest.MonkeyPatch.context() as mp:
        for key, value in KEYS.items():
            mp.setenv(key, value)
        with live(tmp_path_factory.mktemp("costs"), policy) as srv:
            yield srv


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(
    ("path", "model"),
    [
        ("/v1/chat/completions", "gpt-4o"),  # the direct OpenAI path
        ("/v1/chat/completions", "claude"),  # litellm's Anthropic path
        ("/v1/messages", "claude"),  # passed through natively
        ("/v1/messages", "gpt-4o"),
        ("/v1/responses", "gpt-4o"),  # passed through natively
        ("/v1/responses", "claude"),
    ],
)
def test_the_recorded_cost_is_what_the_provider_bills_for_cached_prompts(
    priced: LiveServer, fake: FakeProvider, path: str, model: str, stream: bool
) -> None:
    """With prompt caching, the record's cost is the provider's usage priced by litellm
    (cache reads and writes at their own prices), on every front, streamed or not."""
    fake.reset(Behaviour(cached_tokens=CACHED, cache_write_tokens=WRITTEN))
    record = _recorded(priced, path, model, stream)
    if model == "gpt-4o":  # OpenAI bills no cache writes
        name, written, prompt, completion = "gpt-4o", 0, 11 + CACHED, 7
    else:
        name, written, prompt, completion = "claude-sonnet-4-5-20250929", WRITTEN, 13, 9
        prompt += CACHED + WRITTEN
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "prompt_tokens_details": {"cached_tokens": CACHED},
        "cache_creation_input_tokens": written,
    }
    assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt, completion)
    assert record["cost_usd"] == pytest.approx(_billed(name, usage), rel=1e-9)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",  # litellm's Anthropic path
        "/v1/messages",  # passed through natively
        "/v1/responses",  # litellm's Anthropic path, from a Response
    ],
)
def test_one_hour_cache_writes_are_recorded_at_their_own_price(
    priced: LiveServer, fake: FakeProvider, path: str, stream: bool
) -> None:
    """Anthropic's usage breaks the prompt-cache writes down by lifetime (``cache_creation``):
    those kept an hour (``ttl: 1h``) cost twice the input price, not the five minutes' 1.25
    times. The record prices each at its own, natively and through litellm, streamed or not."""
    fake.reset(
        Behaviour(cached_tokens=CACHED, cache_write_tokens=WRITTEN, cache_write_1h_tokens=HOUR)
    )
    record = _recorded(priced, path, "claude", stream)
    by_lifetime = {"ephemeral_5m_input_tokens": WRITTEN - HOUR, "ephemeral_1h_input_tokens": HOUR}
    usage = {
        "prompt_tokens": 13 + CACHED + WRITTEN,
        "completion_tokens": 9,
        "prompt_tokens_details": {
            "cached_tokens": CACHED,
            "cache_creation_token_details": by_lifetime,
        },
        "cache_creation_input_tokens": WRITTEN,
    }
    billed = _billed("claude-sonnet-4-5-20250929", usage)
    assert record["cost_usd"] == pytest.approx(billed, rel=1e-9)


#: A web search, as each front asks a Claude for one.
SEARCH = {
    "/v1/chat/completions": {"web_search_options": {}},
    "/v1/messages": {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_the_prompt_a_web_search_grew_is_recorded(
    priced: LiveServer, fake: FakeProvider, path: str, stream: bool
) -> None:
    """A Claude reads the results of its web searches, and Anthropic bills them as input: a
    stream's closing usage (``message_delta``, cumulative) counts them, its opening
    (``message_start``) only the prompt sent. The record counts what was billed, streamed or
    not, natively and through litellm."""
    fake.reset(Behaviour(web_searches=2))
    record = _recorded(priced, path, "claude", stream, **SEARCH[path])
    assert record["prompt_tokens"] == 13 + 2 * SEARCH_RESULT_TOKENS
    assert record["completion_tokens"] == 9


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages"])
def test_web_searches_are_recorded_at_their_price(
    priced: LiveServer, fake: FakeProvider, path: str, stream: bool
) -> None:
    """Anthropic bills each web search a Claude makes beside its tokens; its usage counts them
    (``server_tool_use.web_search_requests``). The record's cost includes them at the price
    litellm's table gives, natively and through litellm, streamed or not, so the budget that
    the record settles sees them."""
    fake.reset(Behaviour(web_searches=2))
    record = _recorded(priced, path, "claude", stream, **SEARCH[path])
    usage = {
        "prompt_tokens": 13 + 2 * SEARCH_RESULT_TOKENS,
        "completion_tokens": 9,
        "server_tool_use": {"web_search_requests": 2},
    }
    billed = _billed("claude-sonnet-4-5-20250929", usage)
    assert billed > _billed("claude-sonnet-4-5-20250929", {**usage, "server_tool_use": None})
    assert record["cost_usd"] == pytest.approx(billed, rel=1e-9)


def _recorded(
    priced: LiveServer, path: str, model: str, stream: bool, **extra: Any
) -> dict[str, Any]:
    # The outcome record of one request to ``model`` on the front at ``path``.
    body: dict[str, Any] = {"model": model, "stream": stream, **extra}
    if path == "/v1/responses":
        body["input"] = "HARD question"
    else:
        body.update(messages=[{"role": "user", "content": "HARD question"}], max_tokens=50)
    response = priced.http.post(path, json=body)
    assert response.status_code == 200, response.text
    store = priced.gateway.outcomes
    request_id = response.headers["x-request-id"]
    assert wait_for(lambda: store.get(request_id) is not None), "no outcome record"
    record = store.get(request_id)
    assert record is not None
    return dict(record)


def _billed(name: str, usage: dict[str, Any]) -> float:
    # What the provider bills for ``usage``, priced by litellm's own cost code.
    import litellm

    response = {"model": name, "usage": usage, "choices": []}
    return float(litellm.completion_cost(completion_response=response, model=name))


def test_a_policy_price_wins_and_unpriced_closed_models_are_named() -> None:
    """A model the installed litellm's table does not list would count $0 in costs and budgets:
    the policy's ``price`` covers it, and ``unpriced`` names those it does not cover."""
    from router.policy import ModelPrice, ModelSpec

    def spec(name: str, tier: str, litellm: str | None, price: ModelPrice | None = None) -> Any:
        return ModelSpec(
            name=name,
            tier=tier,  # type: ignore[arg-type]
            litellm_model=litellm,
            supports_tools=True,
            supports_images=True,
            price=price,
        )

    book = CostBook(MAP)
    listed = spec("gpt", "closed", "openai/gpt-4o")
    unknown = spec("old", "closed", "anthropic/claude-gone")
    priced = spec(
        "own", "closed", "openai/private", ModelPrice(input_per_mtok=3, output_per_mtok=15)
    )
    local = spec("local", "local", None)
    assert book.closed_cost(listed, 1000, 100) == pytest.approx(0.0035)
    assert book.closed_cost(unknown, 1000, 100) == 0.0
    assert book.closed_cost(priced, 1_000_000, 100_000) == pytest.approx(3 + 1.5)
    assert book.unpriced([listed, unknown, priced, local]) == ["old"]
