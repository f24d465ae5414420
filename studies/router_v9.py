"""router-v9: router-v8's routing score, with capability-v8's labels.

:mod:`studies.capability_v6` fitted capability-v8, a gate like capability-v5 with a third seed
set, which names chat categories better (the authored test set: 82% to 88%) and carries to
held-out sources at least as well. The first candidate router was router-v8's recipe refitted
over it (``--over-gate``): it lost APGR on MMLU and on MMLU-Pro (Llama-3.1-8B) against router-v8
(``results/router_v9_gate_123.json``), so by :func:`studies.router_v5.ships` it does not ship.

router-v9 instead reads a **split** capability artifact, ``models/capability-v9``
(:class:`router.capability.SplitCapability`): capability-v5's probabilities feed the routing
score, so the profile head refitted over it (:func:`router.training.train_profile_router`, as
``tiergate train --capability models/capability-v9`` does) is router-v8's (checked: within
:data:`HEAD_TOLERANCE`; its sidecar says so as ``score_of: router-v8``, which lets the cascade's
confidence model, fitted on router-v8's score, read it); capability-v8's arg-max names the
capability that the policy, ``classify`` and the profile's entry read. ``--train`` writes both,
then each prompt set of the routing files is held out in turn and router-v9 compared with
router-v8 as :mod:`studies.router_v5` does.

Both encoder heads read the same encoder vectors, so the vectors (not each head's
probabilities) are kept on disk under ``studies/.cache``, keyed by the table's provenance, the
encoder weights' sha256 and the window, and each head applies its own linear map; every gate is
checked against its shipped artifact, loaded as the proxy loads it, on a sample of prompts::

    python -m studies.router_v9 [--train]
    python -m studies.router_v9 --over-gate    # the first candidate, written under var/
    python -m studies.router_v9 --static [--train]   # router-v10, the opt-in static split

Needs the encoder's weights (``make model``). Writes ``studies/results/router_v9.json``
(``router_v9_gate_123.json`` with ``--over-gate``, ``router_v10.json`` with ``--static``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from router.artifact import load_capability_model
from router.capability import CapabilityModel, save_split, softmax
from router.distill import WEIGHTS_SHA256
from router.encoder import ContextualEmbedding
from router.training import load_routing_rows, train_profile_router
from studies.capability_gate import GatedReader
from studies.router_v5 import CACHE, MODELS, MemoReader, cached_reader, compare
from studies.score_v4 import DATA, ROUTING_FILES

RESULTS = MODELS.parent / "studies" / "results" / "router_v9.json"
GATE_RESULTS = RESULTS.with_name("router_v9_gate_123.json")
BASELINE, CANDIDATE = "router-v8", "router-v9"
GATES = {
    "capability-v5": ("capability-v3", "capability-v4"),
    "capability-v8": ("capability-v6", "capability-v7"),
}
SCORE, LABEL, SPLIT = "capability-v5", "capability-v8", "capability-v9"


@dataclass(frozen=True)
class Split:
    """A router that scores as ``baseline`` through ``score`` and labels through ``label``,
    the two read through the split artifact ``split``."""

    baseline: str
    candidate: str
    score: str
    label: str
    split: str
    results: Path


ENCODER = Split(BASELINE, CANDIDATE, SCORE, LABEL, SPLIT, RESULTS)
#: A static split (opt-in, through ``classifier_path``): router-v6's score, capability-v6's labels.
STATIC = Split(
    "router-v6",
    "router-v10",
    "capability-v3",
    "capability-v6",
    "capability-v10",
    RESULTS.with_name("router_v10.json"),
)
#: How far router-v9's refitted head may be from router-v8's: the refit reads probabilities
#: composed from float32 encoder vectors (the cache), router-v8's fit read float64 ones.
HEAD_TOLERANCE = 1e-8
SAMPLE = 200


class VectorStore:
    """One contextual embedding's prompt vectors, memoised and kept on disk between runs."""

    def __init__(self, embedding: ContextualEmbedding, cache: Path) -> None:
        self.embedding, self.cache = embedding, cache
        self.vectors: dict[str, np.ndarray] = {}
        if cache.is_file():
            with np.load(cache) as f:
                self.vectors = dict(zip(f["keys"].tolist(), f["vectors"], strict=True))
        self._stored = len(self.vectors)

    def vector(self, text: str) -> np.ndarray:
        key = hashlib.sha256(text.encode()).hexdigest()
        if key not in self.vectors:
            self.vectors[key] = self.embedding.embed(text).astype(np.float32)
        return self.vectors[key]

    def save(self) -> None:
        """Write the cache when it grew."""
        if len(self.vectors) == self._stored:
            return
        self.cache.parent.mkdir(parents=True, exist_ok=True)
        keys = sorted(self.vectors)
        partial = self.cache.with_suffix(".part.npz")
        np.savez(partial, keys=np.array(keys), vectors=np.vstack([self.vectors[k] for k in keys]))
        partial.replace(self.cache)
        self._stored = len(keys)


class HeadReader:
    """An encoder capability model's head over a shared :class:`VectorStore`."""

    def __init__(self, model: CapabilityModel, store: VectorStore) -> None:
        self.model, self.store = model, store
        self.capabilities, self.version = model.capabilities, model.version

    def probabilities(self, text: str) -> np.ndarray:
        x = self.store.vector(text).astype(np.float64)
        out: np.ndarray = softmax(self.model.logits_of(x))
        return out

    def save(self) -> None:
        self.store.save()


def store_for(model: CapabilityModel, stores: dict[Path, VectorStore]) -> VectorStore:
    """The vector store of ``model``'s encoder, kept on disk under a key of the table's
    provenance, the weights' sha256 and the window, and shared through ``stores`` (by that
    file) with every other head that reads the same vectors."""
    emb = model.embedding
    if not isinstance(emb, ContextualEmbedding):
        raise SystemExit(f"{model.version}: not an encoder model")
    pinned = (sorted(emb.provenance.items()), WEIGHTS_SHA256, emb.head_tokens, emb.tail_tokens)
    cache = CACHE / f"encoder-vectors-{hashlib.sha256(repr(pinned).encode()).hexdigest()[:16]}.npz"
    if cache not in stores:
        stores[cache] = VectorStore(emb, cache)
    return stores[cache]


def composed_gate(
    gate: Path,
    static: Path,
    encoder: CapabilityModel,
    stores: dict[Path, VectorStore],
    check: Sequence[str],
) -> GatedReader:
    """The gate in ``gate`` composed from ``static``'s cached probabilities and the ``encoder``
    head (its second member, loaded) over its shared vector store (:func:`store_for`), refused
    unless it agrees with the shipped gate, loaded as the proxy loads it, on ``check``."""
    shipped = load_capability_model(gate)
    composed = GatedReader(
        cached_reader(static),
        MemoReader(HeadReader(encoder, store_for(encoder, stores))),
        shipped.threshold,  # type: ignore[attr-defined]
    )
    for text in check:
        if np.abs(shipped.probabilities(text) - composed.probabilities(text)).max() > 1e-6:
            raise SystemExit(f"{gate.name}: the shipped gate and the composed one disagree")
    return composed


@functools.cache
def check_prompts() -> tuple[str, ...]:
    """:data:`SAMPLE` routing prompts, evenly spaced, that composed gates are checked on (read
    once a run)."""
    rows = [r for f in ROUTING_FILES for r in load_routing_rows(DATA / f)]
    return tuple(r.prompt for r in rows[:: max(1, len(rows) // SAMPLE)])


def _encoder_head(directory: Path) -> CapabilityModel:
    model = load_capability_model(directory)
    assert isinstance(model, CapabilityModel)
    return model


def readers() -> dict[str, Any]:
    """Readers per gate (:func:`composed_gate`), their encoder heads over shared vectors."""
    stores: dict[Path, VectorStore] = {}
    return {
        gate: composed_gate(
            MODELS / gate, MODELS / static, _encoder_head(MODELS / encoder), stores, check_prompts()
        )
        for gate, (static, encoder) in GATES.items()
    }


def _head_difference(a: Path, b: Path) -> float:
    # The largest absolute difference between two profile routers' head arrays (inf when they
    # hold different arrays or capabilities).
    with np.load(a / "serving.npz") as x, np.load(b / "serving.npz") as y:
        if sorted(x.files) != sorted(y.files):
            return float("inf")
        if any(x[k].dtype.kind != "f" and not np.array_equal(x[k], y[k]) for k in x.files):
            return float("inf")
        return max(float(np.abs(x[k] - y[k]).max()) for k in x.files if x[k].dtype.kind == "f")


def split_router(
    pair: Split, found: dict[str, Any], files: list[Path], *, train: bool
) -> dict[str, Any]:
    """With ``train``, write ``pair``'s split artifact and its router (the head refitted over the
    score's probabilities, naming the baseline as ``score_of``); then check that the head is the
    baseline's and compare the two routers leave-one-source-out."""
    if train:
        for name in (pair.split, pair.candidate):
            shutil.rmtree(MODELS / name, ignore_errors=True)
        save_split(
            MODELS / pair.split,
            MODELS / pair.score,
            MODELS / pair.label,
            {"chosen_by": "python -m studies.router_v9", "results": pair.results.name},
        )
        train_profile_router(
            files,
            MODELS / pair.split,
            MODELS / pair.candidate,
            reader=found[pair.score],
            metadata={"score_of": pair.baseline},
        )
    diff = _head_difference(MODELS / pair.baseline, MODELS / pair.candidate)
    if diff > HEAD_TOLERANCE:
        if train:  # its sidecar would claim the baseline's score: withdraw it
            shutil.rmtree(MODELS / pair.candidate)
        raise SystemExit(
            f"{pair.candidate}'s head is not {pair.baseline}'s (largest difference {diff})"
        )
    print(f"{pair.candidate}'s head is {pair.baseline}'s: largest difference {diff:.1e}")
    return compare(
        {pair.baseline: pair.score, pair.candidate: pair.split},
        pair.results,
        readers={**found, pair.split: found[pair.score]},
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the comparison; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m studies.router_v9")
    parser.add_argument(
        "--train",
        action="store_true",
        help="write models/capability-v9 and models/router-v9 (with --static: -v10)",
    )
    parser.add_argument(
        "--over-gate",
        action="store_true",
        help="the first candidate: router-v8's recipe over capability-v8, under var/",
    )
    parser.add_argument(
        "--static",
        action="store_true",
        help="the static split: router-v6's score with capability-v6's labels (router-v10)",
    )
    args = parser.parse_args(argv)
    files = [DATA / f for f in ROUTING_FILES]
    if args.static:
        reader = cached_reader(MODELS / STATIC.score)
        try:
            split_router(STATIC, {STATIC.score: reader}, files, train=args.train)
        finally:
            reader.save()
        return 0
    found = readers()
    try:
        if args.over_gate:
            out = MODELS.parent / "var" / "router_v9" / CANDIDATE
            shutil.rmtree(out, ignore_errors=True)
            train_profile_router(files, MODELS / LABEL, out, reader=found[LABEL])
            compare(
                {BASELINE: SCORE, CANDIDATE: LABEL},
                GATE_RESULTS,
                readers=found,
                routers={CANDIDATE: out},
            )
            return 0
        split_router(ENCODER, found, files, train=args.train)
    finally:
        for reader in found.values():
            reader.static.save()
            reader.encoder.reader.save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
