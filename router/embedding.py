"""A static text embedding: WordPiece tokens, one stored vector each, mean-pooled. Numpy only.

The capability model (:mod:`router.capability`) reads a prompt as the mean of its tokens'
vectors, taken from a table that :mod:`router.distill` derived once from all-MiniLM-L6-v2
(Apache-2.0). A prompt costs one tokenisation and one row gather, which fits the decision
budget where a transformer forward pass would not (docs/model-card.md).

* :class:`WordPiece`: BERT's uncased tokeniser in plain Python (lower case, accents stripped,
  punctuation split off, greedy longest-match word pieces), with a per-word cache. It follows
  ``BertTokenizer`` closely but not to the last character class (a non-ASCII symbol is split off
  like punctuation); training and serving use this one, so they agree.
* :class:`StaticEmbedding`: ``embed(text)`` pools the token vectors of
  :func:`router.features.clip` of the text (the window every per-request feature reads): the
  l2-normalised means of all tokens, of the first and of the last :data:`POOL_TOKENS`.
* :func:`save` / :func:`load`: ``embedding.npz`` (``table`` float16, ``vocab``) beside a
  ``metadata.json`` sidecar that names its provenance and licence and holds its sha256;
  :func:`load` hashes the bytes it then reads and refuses a mismatch.
* :func:`write_table` writes the table's float32 expansion beside ``embedding.npz``
  (:data:`TABLE_FILE`) or into ``$TIERGATE_HOME/models`` (``tiergate fetch-model``); where one
  is there and holds exactly that table, readers map it (:func:`map_table`) instead of holding
  a float32 copy of their own.

Nothing happens at import beyond compiling two regexes; no scikit-learn, scipy or torch.
"""

from __future__ import annotations

import copy
import json
import logging
import mmap
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from router.artifact import (
    METADATA_FILE,
    parse_npz,
    read_checked,
    read_sidecar,
    replace_file,
    write_npz,
    write_sidecar,
)
from router.errors import ArtifactError
from router.features import clip
from router.locations import tiergate_home

EMBEDDING_FILE = "embedding.npz"
#: The float32 expansion of an ``embedding.npz`` table, beside it (:func:`write_table`).
TABLE_FILE = "embedding.f32.npy"
EMBEDDING_FORMAT = "tiergate-embedding"
EMBEDDING_FORMAT_VERSION = 1

#: Words, single punctuation characters (BERT counts ``_`` as punctuation), CJK ideographs alone.
_PIECES = re.compile(r"[\u4e00-\u9fff\u3400-\u4dbf\uf900-\ufaff]|[^\W_]+|[^\w\s]|_")
_MAX_WORD = 100  # BERT's max_input_chars_per_word: a longer run is one [UNK]
_CACHE_LIMIT = 200_000
#: How many tokens at each end of a prompt make its head and tail pools
#: (:meth:`StaticEmbedding.embed`).
POOL_TOKENS = 24

FloatArray = NDArray[np.float64]

log = logging.getLogger("tiergate.embedding")


class WordPiece:
    """BERT's uncased WordPiece over ``vocab`` (token strings in id order)."""

    def __init__(self, vocab: Sequence[str]) -> None:
        self.index = {token: i for i, token in enumerate(vocab)}
        self.unk = self.index["[UNK]"]
        self.vocab_size = len(vocab)
        self._cache: dict[str, tuple[int, ...]] = {}

    def _word(self, word: str) -> tuple[int, ...]:
        if len(word) > _MAX_WORD:
            return (self.unk,)
        index, out, start = self.index, [], 0
        while start < len(word):
            end = len(word)
            while end > start:
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in index:
                    out.append(index[piece])
                    break
                end -= 1
            else:
                return (self.unk,)
            start = end
        return tuple(out)

    def ids(self, text: str) -> list[int]:
        """The token ids of ``text`` (no ``[CLS]``/``[SEP]``)."""
        low = text.lower()
        if not low.isascii():
            low = "".join(
                c for c in unicodedata.normalize("NFD", low) if unicodedata.category(c) != "Mn"
            )
        cache = self._cache
        out: list[int] = []
        for word in _PIECES.findall(low):
            ids = cache.get(word)
            if ids is None:
                if len(cache) >= _CACHE_LIMIT:
                    cache.clear()
                ids = cache[word] = self._word(word)
            out.extend(ids)
        return out


class StaticEmbedding:
    """Token vectors (``table``, one row per ``vocab`` entry) mean-pooled into a prompt vector."""

    def __init__(
        self,
        table: NDArray[Any],
        vocab: Sequence[str],
        provenance: Mapping[str, Any] | None = None,
        *,
        tokenizer: WordPiece | None = None,
        stored_dtype: np.dtype[Any] | None = None,
    ) -> None:
        if table.ndim != 2 or table.shape[0] != len(vocab) or not np.isfinite(table).all():
            raise ValueError("embedding: table must be finite, one row per vocabulary token")
        self.vocab = list(vocab)
        # float32 at run time: a float16 table saves memory but is slower to gather and mean,
        # and the decision budget is the tighter limit (docs/model-card.md). Saved back in its
        # stored type (``stored_dtype``, default the table's own; float16 converts exactly).
        self.table: NDArray[np.float32] = np.asarray(table, dtype=np.float32)
        self.stored_dtype = np.dtype(stored_dtype) if stored_dtype is not None else table.dtype
        # ``tokenizer``: one already built over this very vocabulary, shared (its index and word
        # cache are megabytes) rather than built again.
        if tokenizer is not None and tokenizer.vocab_size != len(self.vocab):
            raise ValueError("embedding: the tokenizer is not over this vocabulary")
        self.tokenizer = tokenizer if tokenizer is not None else WordPiece(self.vocab)
        self.provenance = dict(provenance or {})

    def reads_like(self, other: object) -> bool:
        """Whether ``other`` gives every prompt the same vector as this embedding does (the
        same class over the very same table and tokenizer), so that one vector can serve both."""
        return (
            type(other) is type(self)
            and isinstance(other, StaticEmbedding)
            and other.table is self.table
            and other.tokenizer is self.tokenizer
        )

    @property
    def dims(self) -> int:
        """The length of one token vector."""
        return int(self.table.shape[1])

    @property
    def width(self) -> int:
        """The length of a prompt vector (:meth:`embed`): three pools of :attr:`dims`."""
        return 3 * self.dims

    def embed(self, text: str) -> FloatArray:
        """The prompt vector of ``clip(text)``: the l2-normalised mean of all its token vectors,
        of its first :data:`POOL_TOKENS` and of its last :data:`POOL_TOKENS`, side by side (zeros
        where there is no token). The first and last tokens usually hold the instruction, which
        says what is asked more than the pasted material between them."""
        ids = self.tokenizer.ids(clip(text))
        out: FloatArray = np.zeros(3 * self.dims)
        if ids:
            rows = self.table[ids]
            d = self.dims
            for i, part in enumerate((rows, rows[:POOL_TOKENS], rows[-POOL_TOKENS:])):
                v = part.mean(axis=0, dtype=np.float64)
                norm = float(np.sqrt(v @ v))
                if norm > 0.0:
                    out[i * d : (i + 1) * d] = v / norm
        return out

    def embed_many(self, texts: Iterable[str]) -> FloatArray:
        """:meth:`embed` of each text, one row each."""
        rows = [self.embed(t) for t in texts]
        return np.vstack(rows) if rows else np.zeros((0, self.width))


def save(
    directory: str | Path, table: NDArray[Any], vocab: Sequence[str], provenance: Mapping[str, Any]
) -> None:
    """Write ``embedding.npz`` and its sidecar into ``directory`` (created if needed)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    entry = write_embedding(d, StaticEmbedding(table, vocab, provenance))
    write_sidecar(
        d,
        {
            "format": EMBEDDING_FORMAT,
            "format_version": EMBEDDING_FORMAT_VERSION,
            "embedding": entry,
            "numpy": np.__version__,
        },
    )


def write_embedding(directory: Path, embedding: StaticEmbedding) -> dict[str, Any]:
    """Write ``embedding.npz`` into an artifact directory; returns its sidecar entry (file,
    sha256, shape, provenance), which :func:`read_embedding` checks."""
    digest = write_npz(
        directory / EMBEDDING_FILE,
        {
            "table": embedding.table.astype(embedding.stored_dtype),
            "vocab": np.array(embedding.vocab),
        },
    )
    return {
        "file": EMBEDDING_FILE,
        "format_version": EMBEDDING_FORMAT_VERSION,
        "sha256": digest,
        "shape": list(embedding.table.shape),
        "dtype": str(embedding.stored_dtype),
        "provenance": embedding.provenance,
    }


def embedding_path(directory: Path, entry: object) -> Path:
    """The file an artifact's sidecar ``entry`` names: its own ``embedding.npz``, or a sibling
    artifact's (``../NAME/embedding.npz``), so that models over one table ship it once. Any
    other name is refused, so a sidecar cannot point outside the models directory."""
    name = entry.get("file") if isinstance(entry, dict) else None
    if name == EMBEDDING_FILE:
        return directory / EMBEDDING_FILE
    parts = name.split("/") if isinstance(name, str) else []
    if (
        len(parts) == 3
        and parts[0] == ".."
        and parts[1] not in ("", ".", "..")
        and "\\" not in parts[1]
        and parts[2] == EMBEDDING_FILE
    ):
        return directory.parent / parts[1] / EMBEDDING_FILE
    raise ArtifactError(f"{directory}: its sidecar names no {EMBEDDING_FILE}")


#: The table last read, by the sha256 of its file: the capability models of a gate, or a
#: router and its hot-swapped successor, share one copy of it.
_READ: dict[str, StaticEmbedding] = {}


def _require_format(directory: Path, entry: Mapping[str, Any]) -> None:
    if entry.get("format_version") != EMBEDDING_FORMAT_VERSION:
        raise ArtifactError(
            f"{directory}: embedding format {entry.get('format_version')!r}, "
            f"this Tiergate reads {EMBEDDING_FORMAT_VERSION}"
        )


def _parse(path: Path, data: bytes) -> tuple[NDArray[Any], NDArray[Any]]:
    # The table and vocabulary of checked ``embedding.npz`` bytes: plain arrays, no pickle.
    arrays = parse_npz(path, data)
    table, vocab = arrays.get("table"), arrays.get("vocab")
    if (
        table is None
        or vocab is None
        or table.ndim != 2
        or table.dtype.kind != "f"
        or vocab.dtype.kind != "U"
    ):
        raise ArtifactError(f"{path}: not a static embedding")
    return table, vocab


def read_embedding(directory: Path, entry: object) -> StaticEmbedding:
    """The :class:`StaticEmbedding` an artifact's sidecar ``entry`` names
    (:func:`embedding_path`), checked for its format version and sha256 before its bytes are
    parsed (plain arrays, no pickle). Its float32 table is mapped from the first of
    :func:`table_paths` that holds exactly it (:func:`map_table`), else a copy. Bytes already
    parsed, by their hash, are not parsed again: the result shares their table and tokenizer
    (neither is ever written to)."""
    path = embedding_path(directory, entry)
    assert isinstance(entry, dict)  # embedding_path refuses anything else
    _require_format(directory, entry)
    digest = str(entry.get("sha256"))
    data = read_checked(path, digest)
    read = _READ.get(digest)
    if read is None:
        table, vocab = _parse(path, data)
        mapped = None
        for candidate in table_paths(path, digest):
            if (mapped := map_table(candidate, table)) is not None:
                break
        try:
            read = StaticEmbedding(
                table if mapped is None else mapped, vocab.tolist(), stored_dtype=table.dtype
            )
        except (ValueError, KeyError) as exc:
            raise ArtifactError(f"{path}: unusable embedding ({exc})") from exc
        if mapped is not None:
            _release_pages(mapped)
        read.table.flags.writeable = False
        _READ.clear()
        _READ[digest] = read
    out = copy.copy(read)
    out.provenance = dict(entry.get("provenance") or {})
    return out


def share_embedding(
    directory: Path, owner: Path, entry: object, embedding: StaticEmbedding
) -> dict[str, Any]:
    """The sidecar entry by which a new artifact in ``directory`` reads the embedding file of
    ``owner``, a sibling artifact whose sidecar ``entry`` names it, instead of writing a copy.
    Refused (:class:`ValueError`) unless the two are siblings and that file holds exactly
    ``embedding``'s table and vocabulary."""
    if directory.resolve().parent != owner.resolve().parent:
        raise ValueError(f"{owner} is not beside {directory}")
    theirs = read_embedding(owner, entry)
    assert isinstance(entry, dict)
    mine = embedding.table.astype(embedding.stored_dtype)
    if (
        theirs.vocab != embedding.vocab
        or theirs.stored_dtype != embedding.stored_dtype
        or not np.array_equal(theirs.table.astype(theirs.stored_dtype), mine)
    ):
        raise ValueError(f"{owner}'s embedding is not the one the model was fitted with")
    name = entry["file"]
    return {
        **entry,
        "file": f"../{owner.name}/{EMBEDDING_FILE}" if name == EMBEDDING_FILE else name,
    }


def load(directory: str | Path) -> StaticEmbedding:
    """The static embedding saved in ``directory`` by :func:`save` (or inside a capability
    artifact), refused with an :class:`ArtifactError` when it is not what its sidecar says."""
    d = Path(directory)
    meta = read_sidecar(d, EMBEDDING_FILE, kind=EMBEDDING_FORMAT, version=EMBEDDING_FORMAT_VERSION)
    return read_embedding(d, meta.get("embedding"))


def table_paths(npz: Path, digest: str) -> list[Path]:
    """Where :func:`read_embedding` looks for the float32 table of the ``embedding.npz`` at
    ``npz`` (whose sha256 is ``digest``), in order: :data:`TABLE_FILE` beside it (``tiergate
    fetch-model --dest``, ``make model``, the image), then ``$TIERGATE_HOME/models``, named by
    the digest (``tiergate fetch-model`` without ``--dest``: the shipped folder of a
    pip-installed Tiergate may not be writable)."""
    return [npz.with_name(TABLE_FILE), tiergate_home() / "models" / _home_name(digest)]


def _home_name(digest: str) -> str:
    return f"embedding-{digest[:16]}.f32.npy"


def map_table(
    path: Path, table: NDArray[Any], *, quiet: bool = False
) -> NDArray[np.float32] | None:
    """``table`` as float32, mapped read-only from the ``.npy`` file at ``path`` when that holds
    exactly it, bit for bit (every row is compared with ``table`` converted); None when there
    is no such file, and None with a warning when the file holds anything else (stale, cut
    short or tampered with): the caller then keeps a copy, as it would without the file.
    ``quiet`` logs that at debug level, for :func:`write_table`, which replaces such a file.

    Mapped pages are the page cache's: processes on one node share them, the kernel may drop
    them under pressure, and they count in a process's resident set only once it reads them.
    Do not write over the file in place; :func:`write_table` replaces it by a rename."""
    want = np.dtype("<f4")
    report = log.debug if quiet else log.warning
    try:
        with path.open("rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy format {version}")
            offset = f.tell()
            size = f.seek(0, 2)
            mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else None
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        report("%s: not a table to map (%s); holding a copy instead", path, exc)
        return None
    if (
        mapped is None
        or tuple(shape) != table.shape
        or dtype != want
        or fortran
        or size != offset + table.size * want.itemsize
    ):
        if mapped is not None:
            mapped.close()
        report("%s: not this table's shape or type; holding a copy instead", path)
        return None
    out = np.frombuffer(mapped, dtype=want, count=table.size, offset=offset).reshape(table.shape)
    step = 4096
    for i in range(0, table.shape[0], step):
        mine = np.asarray(table[i : i + step], dtype=want).view(np.uint32)
        if not np.array_equal(out[i : i + step].view(np.uint32), mine):
            report(
                "%s: does not hold this table (run `tiergate fetch-model --only table`); "
                "holding a copy instead",
                path,
            )
            return None
    return out


def table_mapping(table: NDArray[Any]) -> mmap.mmap | None:
    """The file mapping ``table`` is a view of (:func:`map_table`), or None for a copy."""
    base: object = table
    while isinstance(base, np.ndarray):
        base = base.base
    if isinstance(base, memoryview):  # what np.frombuffer keeps of the mapping
        base = base.obj
    return base if isinstance(base, mmap.mmap) else None


def _release_pages(table: NDArray[Any]) -> None:
    # Drop a mapped table's pages from this process's resident set (they stay in the page
    # cache): reading and checking it touched every one, serving touches only the rows it reads.
    mapping = table_mapping(table)
    if mapping is not None and hasattr(mmap, "MADV_DONTNEED"):
        mapping.madvise(mmap.MADV_DONTNEED)


def write_table(directory: str | Path, dest: Path | None = None) -> Path | None:
    """Write the float32 expansion of the table in the ``embedding.npz`` that the artifact in
    ``directory`` owns, for :func:`read_embedding` to map: beside it as :data:`TABLE_FILE`, or
    into ``dest`` named by its sha256 (:func:`table_paths`). Its path, or None when the artifact
    owns no table (it reads a sibling's, or has none). The table is read sha256-checked; a file
    already there that holds exactly it is kept, and so is one beside it when ``dest`` is given
    (readers map that one first): its path is returned and nothing is written."""
    d = Path(directory)
    try:
        meta = json.loads((d / METADATA_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{d}: no readable {METADATA_FILE} ({exc})") from exc
    entry = meta.get("embedding") if isinstance(meta, dict) else None
    if not isinstance(entry, dict) or entry.get("file") != EMBEDDING_FILE:
        return None
    _require_format(d, entry)
    digest = str(entry.get("sha256"))
    path = d / TABLE_FILE if dest is None else dest / _home_name(digest)
    table, _ = _parse(d / EMBEDDING_FILE, read_checked(d / EMBEDDING_FILE, digest))
    if dest is not None and map_table(d / TABLE_FILE, table, quiet=True) is not None:
        return d / TABLE_FILE  # readers map the one beside it first: nothing to write
    if map_table(path, table, quiet=True) is None:  # none there, or one to replace
        expanded = np.ascontiguousarray(table, dtype="<f4")

        def write(tmp: Path) -> None:
            with tmp.open("xb") as fh:
                np.lib.format.write_array(fh, expanded, version=(1, 0), allow_pickle=False)

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_file(path, write)
        except OSError as exc:
            raise ArtifactError(f"{path}: cannot be written ({exc})") from exc
    return path


def write_tables(models_dir: str | Path, dest: Path | None = None) -> list[Path]:
    """:func:`write_table` for every artifact directly under ``models_dir`` that owns a table."""
    out = []
    for sidecar in sorted(Path(models_dir).glob(f"*/{METADATA_FILE}")):
        written = write_table(sidecar.parent, dest)
        if written is not None:
            out.append(written)
    return out
