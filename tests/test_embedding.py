"""The static embedding under the capability model: BERT's WordPiece split, and a table that
must fit its vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from router.capability import (
    CapabilityModel,
    GatedCapability,
    default_capability_path,
    load_capability,
    load_reader,
)
from router.embedding import StaticEmbedding, WordPiece


@pytest.fixture(scope="module")
def shipped() -> CapabilityModel:
    return load_capability()


def test_wordpiece_splits_like_bert(shipped: CapabilityModel) -> None:
    vocab = shipped.embedding.vocab
    ids = WordPiece(vocab).ids("Hello, world! unaffable NAÏVE")
    assert [vocab[i] for i in ids] == ["hello", ",", "world", "!", "una", "##ffa", "##ble", "naive"]


def test_embedding_refuses_a_table_that_does_not_fit_its_vocabulary() -> None:
    with pytest.raises(ValueError, match="one row per vocabulary token"):
        StaticEmbedding(np.zeros((3, 4), dtype=np.float16), ["[UNK]", "a"])


def test_the_gates_two_capability_models_share_one_table_and_tokenizer() -> None:
    # capability-v3 and capability-v4 name one table file; the gate over them holds it once.
    gate = load_reader(default_capability_path().parent / "capability-v5")
    assert isinstance(gate, GatedCapability)
    first, then = gate.first.embedding, gate.then.embedding
    assert first.table is then.table and first.tokenizer is then.tokenizer
    assert not first.table.flags.writeable
    assert first.provenance == then.provenance and first.provenance is not then.provenance


def test_a_shared_tokenizer_must_be_over_the_same_vocabulary() -> None:
    vocab = ["[UNK]", "a", "b"]
    table = np.zeros((3, 4), dtype=np.float16)
    shared = StaticEmbedding(table, vocab).tokenizer
    assert StaticEmbedding(table, vocab, tokenizer=shared).tokenizer is shared
    with pytest.raises(ValueError, match="not over this vocabulary"):
        StaticEmbedding(np.zeros((2, 4)), ["[UNK]", "a"], tokenizer=shared)
