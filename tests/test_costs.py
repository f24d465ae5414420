"""Pricing requests: closed models from litellm's bundled table (offline), local calls per
token and per GPU-hour, and an unknown model costing nothing rather than failing."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from router.costs import CostBook, Price, load_litellm_cost_map
from tests.conftest import KEYS, LiveServer, live, policy_yaml, wait_for
from tests.fake_provider import Behaviour, FakeProvider

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
        }


def test_cached_prompt_tokens_are_priced_at_the_cache_prices() -> None:
    """Providers bill prompt tokens read from their prompt cache at a fraction of the input
    price and (Anthropic) those written to it at more; a price that names no cache price
    charges them as input."""
    from router.policy import ModelPrice, ModelSpec

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
    own = ModelSpec(
        name="own",
        tier="closed",
        litellm_model="openai/private",
        supports_tools=True,
        supports_images=True,
        price=ModelPrice(input_per_mtok=2, output_per_mtok=8, cache_read_per_mtok=0.5),
    )
    assert book.closed_cost(own, 1_000_000, 0, cached=500_000) == pytest.approx(1.0 + 0.25)


CACHED, WRITTEN = 4000, 1000


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
    import litellm

    fake.reset(Behaviour(cached_tokens=CACHED, cache_write_tokens=WRITTEN))
    messages = [{"role": "user", "content": "HARD question"}]
    body: dict[str, Any] = {"model": model, "stream": stream}
    if path == "/v1/responses":
        body["input"] = "HARD question"
    else:
        body.update(messages=messages, max_tokens=50)
    response = priced.http.post(path, json=body)
    assert response.status_code == 200, response.text
    store = priced.gateway.outcomes
    request_id = response.headers["x-request-id"]
    assert wait_for(lambda: store.get(request_id) is not None), "no outcome record"
    record = store.get(request_id)
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
    billed = litellm.completion_cost(
        completion_response={"model": name, "usage": usage, "choices": []}, model=name
    )
    assert record is not None
    assert (record["prompt_tokens"], record["completion_tokens"]) == (prompt, completion)
    assert record["cost_usd"] == pytest.approx(billed, rel=1e-9)


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
