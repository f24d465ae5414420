"""The model card's shipped block: the writer replaces only its block and refuses a card
without one; the committed card carries the block of the committed results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.artifact import DEFAULT_MODEL_NAME
from router.training import CapabilityRow
from studies.card import CARD, MARKERS, RESULTS, card_block, served_label_figures, write_block

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


def test_the_served_label_figures_put_out_of_fold_predictions_through_the_persona_rule() -> None:
    persona = "Imagine you are a historian of ancient Egypt and describe the Rosetta Stone to me."
    review = "You are a senior engineer. Review this code for bugs, please: def f(): return 1"
    rows = [
        CapabilityRow("a/1", persona, "roleplay", "a"),
        CapabilityRow("a/2", "What is the capital of France, and why there?", "knowledge_qa", "a"),
        CapabilityRow("b/1", "Write a haiku about rain on a tin roof.", "creative_writing", "b"),
    ]
    research = [CapabilityRow("r/1", review, "coding", "r")]
    pred = {
        "a/1": "knowledge_qa",
        "a/2": "knowledge_qa",
        "b/1": "creative_writing",
        "r/1": "coding",
    }
    out = served_label_figures(rows, research, pred)
    assert out["rows_changed"] == 1  # the persona; the review keeps its task's label
    assert out["pooled"]["accuracy"] == 1.0
    assert out["per_source"]["a"]["accuracy"] == 1.0
    assert out["test_only"]["accuracy"] == 1.0
    assert out["against_model"]["loso"]["accuracy_diff"] == pytest.approx(1 / 3)
    assert out["against_model"]["test_only"]["accuracy_diff"] == 0.0


def test_a_splits_two_gates_read_one_store_of_encoder_vectors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The card's routing readers: router-v9's score gate and label gate, composed over encoder
    vectors kept in one store (each checked against its shipped gate), run the encoder at most
    once a prompt and leave the vectors on disk for the next run."""
    from studies import card, router_v9

    prompts = [
        "Give me three ideas for a weekend trip near Lyon.",  # the table is unsure: encoded
        "Write a haiku about routers and the sea.",
        "What is 17 times 23? Show your working.",
        "hey, how's it going?",
    ]
    monkeypatch.setattr(card, "check_prompts", lambda: prompts)
    monkeypatch.setattr(router_v9, "CACHE", tmp_path)
    score, label = card.split_roles(card.ROOT / "models" / "capability-v9")
    stores: dict[Path, router_v9.VectorStore] = {}
    readers = [card.served_reader(d, stores) for d in (score, label)]
    assert [type(r).__name__ for r in readers] == ["GatedReader", "GatedReader"]
    assert len(stores) == 1
    (store,) = stores.values()
    assert 1 <= len(store.vectors) <= len(prompts)
    store.save()
    again = router_v9.VectorStore(store.embedding, store.cache)
    assert store.cache.parent == tmp_path and sorted(again.vectors) == sorted(store.vectors)
