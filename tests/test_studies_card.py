"""The model card's shipped block: the writer replaces only its block and refuses a card
without one; the committed card carries the block of the committed results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.artifact import DEFAULT_MODEL_NAME
from studies.card import CARD, MARKERS, RESULTS, card_block, write_block

START, END = MARKERS


def test_the_block_is_replaced_and_the_rest_of_the_card_kept(tmp_path: Path) -> None:
    card = tmp_path / "model-card.md"
    card.write_text(f"# Card\n\nby hand, above\n{START}\nold figures\n{END}\nby hand, below\n")
    write_block("new figures\n| a | b |", card)
    assert card.read_text() == (
        f"# Card\n\nby hand, above\n{START}\nnew figures\n| a | b |\n{END}\nby hand, below\n"
    )
    write_block("newer", card)  # a second run replaces the first run's block, not appends
    assert card.read_text().count(START) == 1
    assert "new figures" not in card.read_text()
    assert f"{START}\nnewer\n{END}" in card.read_text()


@pytest.mark.parametrize(
    "text",
    ["# Card without a block\n", f"# Only a start\n{START}\n", f"# Reversed\n{END}\n{START}\n"],
)
def test_a_card_without_its_block_is_refused_and_left_alone(tmp_path: Path, text: str) -> None:
    card = tmp_path / "model-card.md"
    card.write_text(text)
    with pytest.raises(ValueError, match="shipped:start"):
        write_block("figures", card)
    assert card.read_text() == text


def test_the_committed_card_carries_the_shipped_routers_results() -> None:
    # Shipping another router means rerunning `make model-card` (python -m studies.card).
    results = json.loads(RESULTS.read_text())
    assert results["model"] == DEFAULT_MODEL_NAME
    card = CARD.read_text()
    block = card[card.index(START) + len(START) : card.index(END)]
    assert block.strip("\n") == card_block(results)
    assert f"**{results['model']}**" in block and results["command"] in block
