"""The static embedding under the capability model: BERT's WordPiece split, and a table that
must fit its vocabulary."""

from __future__ import annotations

import numpy as np
import pytest

from router.capability import CapabilityModel, load_capability
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
