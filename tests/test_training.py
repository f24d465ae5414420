"""Data loading and training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from router.artifact import METADATA_FILE
from router.training import (
    DataFormatError,
    load_capability_rows,
    load_prompts,
    load_routing_rows,
    routing_target,
    train_artifact,
)

HARD = ["Prove that {} is irrational step by step.", "Implement {} in C++ with tests."]
EASY = ["hi, what is {}?", "say {} in French"]


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def routing_rows(n: int = 12, dataset: str = "a") -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for i in range(n):
        hard = i % 2 == 0
        template = HARD[i % 4 // 2] if hard else EASY[i % 4 // 2]
        rows.append(
            {
                "id": f"{dataset}/{i}",
                "prompt": template.format(f"thing{i % 3}"),
                "weak_score": 0.0 if hard else 1.0,
                "strong_score": 1.0,
                "category": f"c{i % 5}",
            }
        )
    return rows


def capability_rows() -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for i in range(6):
        src = f"src{i % 2}"
        rows.append(
            {"id": f"c{i}", "prompt": f"Write code {i}", "capability": "coding", "source": src}
        )
        rows.append({"id": f"m{i}", "prompt": f"What is {i}?", "capability": "math", "source": src})
    rows.append(
        {"id": "nc", "prompt": "x", "capability": "chat", "commercial_use": False, "source": "s"}
    )
    return rows


@pytest.fixture(name="files")
def files_fixture(tmp_path: Path) -> tuple[Path, Path]:
    routing = write_jsonl(tmp_path / "routing.jsonl", routing_rows())
    caps = write_jsonl(tmp_path / "caps.jsonl", capability_rows())
    return routing, caps


def test_loaders_validate_schema(tmp_path: Path, files: tuple[Path, Path]) -> None:
    routing, caps = files
    rows = load_routing_rows(routing)
    assert len(rows) == 12 and rows[0].dataset == "routing" and rows[0].category == "c0"
    assert [r.id for r in load_capability_rows(caps)].count("nc") == 0  # non-commercial skipped
    assert len(load_capability_rows(caps, commercial_only=False)) == 13
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"id": "x", "prompt": "p", "weak_score": "high"}])
    with pytest.raises(DataFormatError, match=r"bad.jsonl:1: field 'weak_score'"):
        load_routing_rows(bad)
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(DataFormatError, match="not valid JSON"):
        load_prompts(tmp_path / "broken.jsonl")


def test_load_prompts_reads_only_id_and_prompt(tmp_path: Path) -> None:
    p = write_jsonl(tmp_path / "p.jsonl", [{"id": 7, "prompt": "hello", "weak_score": "junk"}])
    assert load_prompts(p) == [(7, "hello")]


def test_routing_target_balances_datasets_only_on_request() -> None:
    rows = load_routing_rows_from(routing_rows(12, "a")) + load_routing_rows_from(
        routing_rows(4, "b")
    )
    y, w = routing_target(rows)
    assert y.sum() == 8  # the hard half of each set
    assert np.all(w == 1.0)  # default: pooled base rates, every row the same weight
    y, w = routing_target(rows, balance=True)
    assert w[:12].sum() == pytest.approx(w[12:].sum())


def load_routing_rows_from(rows: list[dict[str, object]]) -> list:  # type: ignore[type-arg]
    from router.training import RoutingRow

    return [
        RoutingRow(
            id=str(r["id"]),
            prompt=str(r["prompt"]),
            weak_score=float(r["weak_score"]),  # type: ignore[arg-type]
            strong_score=float(r["strong_score"]),  # type: ignore[arg-type]
            dataset=str(r["id"]).split("/")[0],
        )
        for r in rows
    ]


def test_train_artifact_records_data_hashes_and_cv(
    tmp_path: Path, files: tuple[Path, Path]
) -> None:
    routing, caps = files
    other = write_jsonl(tmp_path / "other.jsonl", routing_rows(10, "b"))
    steps: list[str] = []
    out = train_artifact([routing, other, caps], tmp_path / "m2", progress=steps.append)
    meta = json.loads((out / METADATA_FILE).read_text())
    assert [f["kind"] for f in meta["data_files"]] == ["routing", "routing", "capability"]
    assert meta["data_files"][0]["rows"] == 12 and len(meta["data_files"][0]["sha256"]) == 64
    cv = meta["cv_metrics"]["routing"]  # router-v4: each prompt set held out in turn
    assert {"leave_one_source_out/other", "leave_one_source_out/routing"} <= set(cv)
    assert 0.0 <= meta["cv_metrics"]["capability"]["accuracy"] <= 1.0
    assert steps[-1] == "save"
    assert meta["serving"]["file"] == "serving.npz" and len(meta["serving"]["sha256"]) == 64


def test_a_file_that_is_not_utf8_is_refused_with_its_line(tmp_path: Path) -> None:
    # Latin-1 text saved by a spreadsheet: the user must learn which file and line, not see a
    # UnicodeDecodeError traceback.
    path = tmp_path / "latin1.jsonl"
    ok = b'{"id": "a", "prompt": "ok", "weak_score": 1, "strong_score": 1}\n'
    path.write_bytes(ok + b'{"id": "b", "prompt": "caf\xe9"}\n')
    with pytest.raises(DataFormatError, match=r"latin1.jsonl:2: not valid UTF-8"):
        load_prompts(path)
    with pytest.raises(DataFormatError, match=r"latin1.jsonl:2: not valid UTF-8"):
        load_routing_rows(path)


def test_a_windows_file_with_a_bom_and_crlf_lines_reads_as_any_other(tmp_path: Path) -> None:
    # Notepad, PowerShell's Out-File and Excel's "CSV UTF-8" write a byte-order mark first.
    rows = routing_rows(3)
    text = "\r\n".join(json.dumps(r) for r in rows) + "\r\n\r\n"
    path = tmp_path / "windows.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    (tmp_path / "unix").mkdir()
    unix = write_jsonl(tmp_path / "unix" / "windows.jsonl", rows)  # same name: same dataset
    assert load_routing_rows(path) == load_routing_rows(unix)
    assert [row_id for row_id, _ in load_prompts(path)] == [r["id"] for r in rows]
    # Only at the start: elsewhere it is a character inside a line, and not JSON.
    path.write_bytes(text.encode() + b"\xef\xbb\xbf" + json.dumps(rows[0]).encode())
    with pytest.raises(DataFormatError, match=r"windows.jsonl:5: not valid JSON"):
        load_prompts(path)


def test_a_routing_score_outside_0_1_is_refused(tmp_path: Path) -> None:
    # A 1-10 judge score left unscaled would make eval's oracle and APGR meaningless.
    rows = routing_rows(4)
    rows[2]["weak_score"] = 7.0
    with pytest.raises(DataFormatError, match=r"r.jsonl:3: weak_score/strong_score must be"):
        load_routing_rows(write_jsonl(tmp_path / "r.jsonl", rows))


def test_a_repeated_id_is_refused_with_both_lines(tmp_path: Path) -> None:
    # A row pasted twice would count twice in training and in eval's APGR, and make score's
    # output impossible to join back by id.
    rows = routing_rows(4)
    rows.append(dict(rows[1]))
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    for load in (load_routing_rows, load_prompts):
        with pytest.raises(DataFormatError, match=r"d.jsonl:5: id 'a/1' repeats line 2"):
            load(path)


def test_a_training_file_given_twice_is_refused(tmp_path: Path) -> None:
    # `tiergate train a.jsonl a.jsonl` (or a copy under another name) fitted every row twice
    # and reported cross-validated figures over the doubled rows.
    first = write_jsonl(tmp_path / "a.jsonl", routing_rows(12))
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(first.read_bytes())
    for data in ([first, first], [first, copy]):
        with pytest.raises(DataFormatError, match=r"the same data as .*a.jsonl \(given twice\)"):
            train_artifact(data, tmp_path / "out", cv=False)
    assert not (tmp_path / "out").exists()


def test_an_empty_prompt_file_is_refused_like_the_other_loaders(tmp_path: Path) -> None:
    # score and classify exited 0 with no output on an empty (say, truncated) file, where
    # train, eval and profile --from-labels say "no rows".
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataFormatError, match=r"empty.jsonl: no rows"):
        load_prompts(tmp_path / "empty.jsonl")


def test_a_missing_field_is_named_as_missing(tmp_path: Path) -> None:
    # A file in another schema ({"text", "label"}) read "field 'prompt' must be a str".
    path = write_jsonl(tmp_path / "other.jsonl", [{"id": "a", "text": "hi", "label": 1}])
    with pytest.raises(DataFormatError, match=r"other.jsonl:1: missing field 'prompt'"):
        load_prompts(path)


def test_an_id_of_another_type_is_refused_saying_what_an_id_may_be(tmp_path: Path) -> None:
    # Integer ids are read, so "must be a str" sent users to quote ids that were fine.
    for bad in (1.5, None, True, ["a"]):
        path = write_jsonl(tmp_path / "ids.jsonl", [{"id": bad, "prompt": "hi"}])
        with pytest.raises(DataFormatError, match=r"ids.jsonl:1: field 'id' must be a string or"):
            load_prompts(path)
