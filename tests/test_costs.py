"""Pricing requests: closed models from litellm's bundled table (offline), local calls per
token and per GPU-hour, and an unknown model costing nothing rather than failing."""

from __future__ import annotations

from typing import Any

import pytest

from router.costs import CostBook, Price, load_litellm_cost_map

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


def test_the_loaded_table_keeps_only_prices() -> None:
    table = load_litellm_cost_map()
    assert table, "litellm's table should be installed with the dev dependencies"
    for entry in table.values():
        assert "input_cost_per_token" in entry
        assert set(entry) <= {"input_cost_per_token", "output_cost_per_token"}


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
