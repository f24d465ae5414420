"""Data loading, training and the trusted-only, versioned artifact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from router.artifact import METADATA_FILE, MODEL_FILE, default_model_path, load_fitted, save_scorer
from router.errors import ArtifactError
from router.training import (
    DataFormatError,
    fit_scorer,
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


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
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
    assert load_prompts(p) == [("7", "hello")]


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


def test_save_load_roundtrip_and_refusals(tmp_path: Path, files: tuple[Path, Path]) -> None:
    routing, caps = files
    scorer = fit_scorer(load_routing_rows(routing), load_capability_rows(caps))
    out = save_scorer(scorer, tmp_path / "m1", metadata={"note": "test"})
    loaded = load_fitted(out)
    text = "Prove that thing1 is irrational step by step."
    assert loaded.analyze(text).score == pytest.approx(scorer.analyze(text).score, abs=1e-12)
    with pytest.raises(ArtifactError, match="already exists"):
        save_scorer(scorer, out)

    meta_path = out / METADATA_FILE
    meta = json.loads(meta_path.read_text())
    assert meta["note"] == "test" and meta["libraries"]["scikit-learn"]

    # A model fitted on another prompt window is refused, and one whose sidecar predates the
    # recorded window is taken to have the first window (2,000 + 500 characters).
    assert (meta["features"]["head_chars"], meta["features"]["tail_chars"]) == (1000, 250)
    for window in ({"head_chars": 2000, "tail_chars": 500}, {}):
        features = {k: v for k, v in meta["features"].items() if not k.endswith("_chars")}
        meta_path.write_text(json.dumps({**meta, "features": features | window}))
        with pytest.raises(ArtifactError, match="2000 \\+ 500 character prompt window"):
            load_fitted(out)

    # A different library version is refused.
    meta["libraries"]["scikit-learn"] = "0.0.1"
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="version mismatch"):
        load_fitted(out)


def test_tampered_model_is_refused_before_unpickling(
    tmp_path: Path, files: tuple[Path, Path]
) -> None:
    routing, caps = files
    out = save_scorer(
        fit_scorer(load_routing_rows(routing), load_capability_rows(caps)), tmp_path / "m"
    )
    # A foreign pickle that would run code if unpickled.
    (out / MODEL_FILE).write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        load_fitted(out)


def test_foreign_directories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="not a Tiergate model"):
        load_fitted(tmp_path)
    (tmp_path / MODEL_FILE).write_bytes(b"x")
    (tmp_path / METADATA_FILE).write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ArtifactError, match="not a Tiergate classifier"):
        load_fitted(tmp_path)


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


def test_default_model_path_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TIERGATE_CLASSIFIER_PATH", str(tmp_path))
    assert default_model_path() == tmp_path
    monkeypatch.delenv("TIERGATE_CLASSIFIER_PATH")
    assert default_model_path().parent.name == "models"


def test_install_constraints_pin_what_the_shipped_model_was_written_with() -> None:
    """`make` and the Dockerfile install with constraints.txt; a fresh install must be able to
    read the shipped model, so the pins and the model's recorded library versions agree."""
    root = Path(__file__).resolve().parent.parent
    pins = {}
    for raw in (root / "constraints.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name] = version
    recorded = json.loads((default_model_path() / "metadata.json").read_text())["libraries"]
    assert pins == {k: recorded[k] for k in ("scikit-learn", "numpy", "scipy", "joblib")}
    assert "-c constraints.txt" in (root / "Makefile").read_text()
    assert "-c /src/constraints.txt" in (root / "Dockerfile").read_text()


def test_a_profile_head_says_why_it_cannot_be_retrained() -> None:
    """router-v4 has no pickled estimators: loading it for retraining names the reason."""
    with pytest.raises(ArtifactError, match="no scikit-learn estimators"):
        load_fitted(default_model_path())
