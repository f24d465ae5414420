"""The static embedding under the capability model: BERT's WordPiece split, and a table that
must fit its vocabulary."""

from __future__ import annotations

import json
import logging
import mmap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

import router.embedding as embedding_module
from router.artifact import METADATA_FILE
from router.capability import (
    CapabilityModel,
    GatedCapability,
    default_capability_path,
    load_capability,
    load_reader,
)
from router.embedding import (
    EMBEDDING_FILE,
    TABLE_FILE,
    StaticEmbedding,
    WordPiece,
    load,
    save,
    table_mapping,
    write_embedding,
    write_table,
    write_tables,
)
from router.errors import ArtifactError


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


# ---- the float32 table beside embedding.npz, mapped -------------------------------------------
@pytest.fixture
def fresh_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    # read_embedding keeps the table it last parsed, by its file's hash: start without one.
    monkeypatch.setattr(embedding_module, "_READ", {})


def _saved(directory: Path, rows: int = 300, seed: int = 0) -> NDArray[np.float16]:
    rng = np.random.default_rng(seed)
    table = (rng.standard_normal((rows, 16)) * 0.1).astype(np.float16)
    table[0] = 0.0
    table[1, :3] = [np.float16(6e-8), -np.float16(0.0), np.float16(-6e-5)]  # subnormals, -0
    vocab = ["[UNK]", "[CLS]", "[SEP]"] + [f"w{i}" for i in range(rows - 3)]
    save(directory, table, vocab, {"source": "test"})
    return table


PROMPTS = ["w1 w2 w3", "w7 w7 w250 [CLS] unknown words", "", "w" + " w".join(map(str, range(99)))]


@pytest.mark.usefixtures("fresh_reads")
def test_a_written_table_is_mapped_and_reads_exactly_as_the_stored_one(tmp_path: Path) -> None:
    table = _saved(tmp_path)
    copy_ = load(tmp_path)  # no table file yet: a float32 copy of its own
    assert not isinstance(table_mapping(copy_.table), mmap.mmap)
    path = write_table(tmp_path)
    assert path == tmp_path / TABLE_FILE and path.is_file()
    embedding_module._READ.clear()
    mapped = load(tmp_path)
    assert isinstance(table_mapping(mapped.table), mmap.mmap)
    assert not mapped.table.flags.writeable and mapped.stored_dtype == np.float16
    assert mapped.table.dtype == np.float32 and mapped.table.shape == table.shape
    bits = table.astype(np.float32).view(np.uint32)
    np.testing.assert_array_equal(mapped.table.view(np.uint32), bits)
    np.testing.assert_array_equal(mapped.embed_many(PROMPTS), copy_.embed_many(PROMPTS))
    # Saving it again writes the stored float16 table, not the float32 expansion.
    (tmp_path / "again").mkdir()
    assert write_embedding(tmp_path / "again", mapped)["dtype"] == "float16"
    assert (tmp_path / "again" / EMBEDDING_FILE).read_bytes() == (
        tmp_path / EMBEDDING_FILE
    ).read_bytes()
    # A table file already in place that holds the table is kept, not written again.
    before = path.stat()
    assert write_table(tmp_path) == path
    after = path.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def _smaps_rss_kb(path: Path) -> int:
    # The resident kilobytes of this process's mappings of ``path`` (/proc/self/smaps).
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            inside = line.endswith(str(path))
        elif inside and head and head[0] == "Rss:":
            total += int(head[1])
    return total


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux's /proc")
@pytest.mark.usefixtures("fresh_reads")
def test_a_mapped_table_holds_in_memory_only_the_rows_read(tmp_path: Path) -> None:
    table = _saved(tmp_path, rows=16_384)  # 1 MB as float32: 256 pages
    path = write_table(tmp_path)
    assert path is not None
    loaded = load(tmp_path)  # reading and checking it touched every page, then let them go
    assert _smaps_rss_kb(path) < 64
    loaded.embed("w5 w6")
    assert 0 < _smaps_rss_kb(path) < 256
    np.testing.assert_array_equal(loaded.table[5:9], table[5:9].astype(np.float32))


@pytest.mark.parametrize("damage", ["row", "short", "float64", "fortran", "garbage", "empty"])
@pytest.mark.usefixtures("fresh_reads")
def test_a_table_file_that_does_not_hold_the_table_is_ignored_with_a_warning(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    table = _saved(tmp_path)
    path = tmp_path / TABLE_FILE
    good = table.astype(np.float32)
    if damage == "row":
        wrong = good.copy()
        wrong[7, 3] = np.nextafter(wrong[7, 3], np.float32(1))
        np.save(path, wrong)
    elif damage == "short":
        np.save(path, good)
        path.write_bytes(path.read_bytes()[:-4])
    elif damage == "float64":
        np.save(path, table.astype(np.float64))
    elif damage == "fortran":
        np.save(path, np.asfortranarray(good))
    elif damage == "garbage":
        path.write_bytes(b"not an npy file at all")
    else:
        path.write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="tiergate.embedding"):
        loaded = load(tmp_path)
    assert not isinstance(table_mapping(loaded.table), mmap.mmap)
    np.testing.assert_array_equal(loaded.table, good)
    assert any(str(path) in r.getMessage() and "copy" in r.getMessage() for r in caplog.records)
    # write_table puts the right one in its place, which the next read maps, and says nothing
    # of the file it replaces (its warning would tell the user to run what is running).
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tiergate.embedding"):
        assert write_table(tmp_path) == path
    assert caplog.records == []
    embedding_module._READ.clear()
    assert isinstance(table_mapping(load(tmp_path).table), mmap.mmap)


@pytest.mark.usefixtures("fresh_reads")
def test_no_table_file_is_no_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    _saved(tmp_path)
    with caplog.at_level(logging.DEBUG, logger="tiergate.embedding"):
        load(tmp_path)
    assert caplog.records == []


@pytest.mark.usefixtures("fresh_reads")
def test_tables_are_written_for_the_artifacts_that_own_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from router.cli import main

    _saved(tmp_path / "owner")
    (tmp_path / "reader").mkdir()  # reads its sibling's table
    meta = json.loads((tmp_path / "owner" / METADATA_FILE).read_text())
    meta["embedding"]["file"] = f"../owner/{EMBEDDING_FILE}"
    (tmp_path / "reader" / METADATA_FILE).write_text(json.dumps(meta))
    (tmp_path / "other").mkdir()  # no table at all
    (tmp_path / "other" / METADATA_FILE).write_text('{"format": "tiergate-classifier"}')
    written = tmp_path / "owner" / TABLE_FILE
    assert write_tables(tmp_path) == [written]
    assert not (tmp_path / "reader" / TABLE_FILE).exists()
    written.unlink()
    assert main(["fetch-model", "--only", "table", "--dest", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(written)]
    assert written.is_file()


@pytest.mark.usefixtures("fresh_reads")
def test_without_dest_the_table_goes_to_the_data_directory_and_is_found_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A pip-installed Tiergate's shipped folder may not be writable: fetch-model without
    # --dest writes the table of the classifier serve loads into $TIERGATE_HOME/models, named
    # by the sha256 of its embedding.npz, and readers look there after the file beside it.
    from router.cli import main

    table = _saved(tmp_path / "models" / "owner")
    home = tmp_path / "home"
    monkeypatch.setenv("TIERGATE_HOME", str(home))
    monkeypatch.setenv("TIERGATE_CLASSIFIER_PATH", str(tmp_path / "models" / "router-x"))
    assert main(["fetch-model", "--only", "table"]) == 0
    digest = json.loads((tmp_path / "models" / "owner" / METADATA_FILE).read_text())["embedding"][
        "sha256"
    ]
    written = home / "models" / f"embedding-{digest[:16]}.f32.npy"
    assert capsys.readouterr().out.split() == [str(written)]
    assert not (tmp_path / "models" / "owner" / TABLE_FILE).exists()
    mapped = load(tmp_path / "models" / "owner")
    assert isinstance(table_mapping(mapped.table), mmap.mmap)
    maps = Path("/proc/self/maps")
    assert not maps.exists() or str(written) in maps.read_text()  # that very file
    np.testing.assert_array_equal(mapped.table, table.astype(np.float32))
    # The file beside the embedding comes first; a home file that does not hold the table is
    # passed over with a warning.
    np.save(written, np.zeros(table.shape, np.float32))
    embedding_module._READ.clear()
    assert not isinstance(table_mapping(load(tmp_path / "models" / "owner").table), mmap.mmap)
    write_table(tmp_path / "models" / "owner")
    embedding_module._READ.clear()
    assert isinstance(table_mapping(load(tmp_path / "models" / "owner").table), mmap.mmap)
    # With that file beside it (a checkout after `make model`), fetch-model keeps it and writes
    # no second copy into the data directory.
    written.unlink()
    assert main(["fetch-model", "--only", "table"]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "models" / "owner" / TABLE_FILE)]
    assert not written.exists()


@pytest.mark.usefixtures("fresh_reads")
def test_without_dest_the_table_is_the_one_of_the_model_stores_current_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Serve loads the model store's current version before ``classifier_path``
    (registry.configured_model_path); fetch-model wrote the tables of ``classifier_path``'s
    folder instead, and none for a version that carries its own capability model: serve held
    a copy of that table in every process. It writes the table serve reads."""
    from router.cli import main

    _saved(tmp_path / "models" / "owner", seed=1)  # beside classifier_path: not served
    version = tmp_path / "store" / "versions" / "v0001"
    _saved(version / "cap")  # the current version's own capability model owns this table
    sidecar = {"format": "tiergate-classifier", "serving": {"capability": {"name": "cap"}}}
    (version / METADATA_FILE).write_text(json.dumps(sidecar))
    (tmp_path / "store" / "current").write_text("v0001\n")
    home = tmp_path / "home"
    monkeypatch.setenv("TIERGATE_HOME", str(home))
    monkeypatch.setenv("TIERGATE_CLASSIFIER_PATH", str(tmp_path / "models" / "router-x"))
    monkeypatch.setenv("TIERGATE_MODEL_STORE", str(tmp_path / "store"))
    assert main(["fetch-model", "--only", "table"]) == 0
    digest = json.loads((version / "cap" / METADATA_FILE).read_text())["embedding"]["sha256"]
    assert capsys.readouterr().out.split() == [
        str(home / "models" / f"embedding-{digest[:16]}.f32.npy")
    ]
    embedding_module._READ.clear()
    assert isinstance(table_mapping(load(version / "cap").table), mmap.mmap)


@pytest.mark.usefixtures("fresh_reads")
def test_a_table_that_cannot_be_written_is_one_line_from_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from router.cli import main

    _saved(tmp_path / "owner")

    def refuse(path: Path, write: Any) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(embedding_module, "replace_file", refuse)
    assert main(["fetch-model", "--only", "table", "--dest", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "owner" / TABLE_FILE) in err and "Permission denied" in err
    assert "Traceback" not in err


@pytest.mark.usefixtures("fresh_reads")
def test_a_table_is_written_only_from_bytes_that_match_the_sidecar(tmp_path: Path) -> None:
    _saved(tmp_path)
    with (tmp_path / EMBEDDING_FILE).open("ab") as fh:
        fh.write(b"\0")
    with pytest.raises(ArtifactError, match="sha256"):
        write_table(tmp_path)
    assert not (tmp_path / TABLE_FILE).exists()


@pytest.mark.usefixtures("fresh_reads")
def test_a_table_is_not_written_for_an_embedding_format_this_tiergate_does_not_read(
    tmp_path: Path,
) -> None:
    # The reader refuses such an artifact, so a table written for it could never be mapped.
    _saved(tmp_path)
    meta = json.loads((tmp_path / METADATA_FILE).read_text())
    meta["embedding"]["format_version"] = 999
    (tmp_path / METADATA_FILE).write_text(json.dumps(meta))
    for act in (lambda: write_table(tmp_path), lambda: load(tmp_path)):
        with pytest.raises(ArtifactError, match="embedding format 999"):
            act()
    assert not (tmp_path / TABLE_FILE).exists()
