"""Model artifacts (router.artifact): written atomically, read only when Tiergate wrote them."""

from __future__ import annotations

import hashlib
import json
import logging
import platform
from pathlib import Path

import numpy as np
import pytest

from router.artifact import (
    METADATA_FILE,
    MODEL_FILE,
    SERVING_FILE,
    add_serving_form,
    default_model_path,
    load_fitted,
    load_scorer,
    read_metadata,
    release_freed_memory,
    save_scorer,
    sha256_file,
)
from router.classifier import LearnedScorer
from router.errors import ArtifactError
from router.serving import ServingScorer
from router.training import fit_scorer, load_capability_rows, load_routing_rows
from tests.test_training import (
    capability_rows,
    files_fixture,  # noqa: F401 (a fixture)
    routing_rows,
    write_jsonl,
)

PROMPT = "Prove that thing1 is irrational step by step."


def test_sha256_file_is_the_files_digest(tmp_path: Path) -> None:
    data = bytes(range(256)) * 9000  # over one 1 MiB block
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module", name="artifact")
def artifact_fixture(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("serving")
    routing = load_routing_rows(write_jsonl(tmp / "routing.jsonl", routing_rows()))
    caps = load_capability_rows(write_jsonl(tmp / "caps.jsonl", capability_rows()))
    return save_scorer(fit_scorer(routing, caps, version="t-1"), tmp / "model")


@pytest.fixture
def copy(artifact: Path, tmp_path: Path) -> Path:
    out = tmp_path / "model"
    out.mkdir()
    for f in artifact.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


def _edit_sidecar(path: Path, **changes: object) -> None:
    meta = json.loads((path / METADATA_FILE).read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    (path / METADATA_FILE).write_text(json.dumps(meta))


def serving_entry(path: Path) -> dict[str, object]:
    entry: dict[str, object] = json.loads((path / METADATA_FILE).read_text())["serving"]
    return entry


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


def test_read_metadata_checks_the_library_versions_of_the_pickle(artifact: Path) -> None:
    meta = read_metadata(artifact)
    assert meta["model_sha256"] == sha256_file(artifact / MODEL_FILE)
    assert meta["serving"]["sha256"] == sha256_file(artifact / SERVING_FILE)


def test_a_tampered_serving_form_is_refused(copy: Path) -> None:
    data = bytearray((copy / SERVING_FILE).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / SERVING_FILE).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        load_scorer(copy)


def test_another_serving_format_version_is_refused(copy: Path) -> None:
    _edit_sidecar(copy, serving={**serving_entry(copy), "format_version": 5})
    with pytest.raises(
        ArtifactError, match="serving form format 5, this Tiergate reads 1, 2, 3, 4"
    ):
        load_scorer(copy)
    _edit_sidecar(copy, format_version=2)
    with pytest.raises(ArtifactError, match="artifact format 2"):
        load_scorer(copy)


def test_the_serving_entry_names_only_its_own_file(copy: Path) -> None:
    _edit_sidecar(copy, serving={**serving_entry(copy), "file": f"../{MODEL_FILE}"})
    with pytest.raises(ArtifactError, match="no valid serving form entry"):
        load_scorer(copy)
    (copy / SERVING_FILE).unlink()
    _edit_sidecar(copy, serving={**serving_entry(copy), "file": SERVING_FILE})
    with pytest.raises(ArtifactError, match="cannot be read"):
        load_scorer(copy)


@pytest.mark.parametrize(
    "change", ["pickled", "missing", "shape", "features", "window", "cap_coef", "no_cap_coef"]
)
def test_a_foreign_form_with_a_matching_hash_is_still_refused(copy: Path, change: str) -> None:
    # Someone rewrote both the file and its sidecar entry: the hash matches, the contents must
    # still be plain arrays of the expected names, kinds and shapes.
    with np.load(copy / SERVING_FILE, allow_pickle=False) as npz:
        form = {key: npz[key] for key in npz.files}
    if change == "pickled":
        form["vocabulary"] = np.array([object()], dtype=object)
    elif change == "missing":
        del form["shift"]
    elif change == "shape":
        form["intercept"] = form["intercept"][:-1]
    elif change == "cap_coef":  # one capability short
        form["cap_coef"] = form["cap_coef"][:, :-1]
    elif change == "no_cap_coef":  # format 2 without it would score without the capabilities
        del form["cap_coef"]
    elif change == "window":  # fitted on another prompt window (the first model's)
        form["clip"] = np.array([2000, 500], dtype=np.int64)
    else:
        form["structure_features"] = form["structure_features"][::-1]
    np.savez(copy / SERVING_FILE, **form)
    _edit_sidecar(copy, serving={**serving_entry(copy), "sha256": sha256_file(copy / SERVING_FILE)})
    with pytest.raises(ArtifactError, match="unusable serving form"):
        load_scorer(copy)


def test_an_artifact_without_serving_form_loads_through_sklearn(
    copy: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (copy / SERVING_FILE).unlink()
    _edit_sidecar(copy, serving=None)
    with caplog.at_level(logging.INFO, logger="tiergate.artifact"):
        scorer = load_scorer(copy)
    assert isinstance(scorer, LearnedScorer)
    assert "has no serving.npz" in caplog.text and "through scikit-learn" in caplog.text
    assert scorer.analyze(PROMPT) == load_fitted(copy).analyze(PROMPT)


def test_serving_form_is_derived_from_model_joblib_alone(artifact: Path, copy: Path) -> None:
    written = serving_entry(artifact)
    model = (copy / MODEL_FILE).read_bytes()
    (copy / SERVING_FILE).unlink()
    _edit_sidecar(copy, serving=None)
    before = json.loads((copy / METADATA_FILE).read_text())

    entry = add_serving_form(copy)
    # Deterministic: the bytes save_scorer wrote, derived again from model.joblib.
    assert entry == written
    assert (copy / MODEL_FILE).read_bytes() == model
    after = json.loads((copy / METADATA_FILE).read_text())
    assert after.pop("serving") == written and after == before
    assert isinstance(load_scorer(copy), ServingScorer)
    # Again: only checked, nothing rewritten; a tampered one is refused.
    stamp = (copy / SERVING_FILE).stat().st_mtime_ns
    assert add_serving_form(copy) == written
    assert (copy / SERVING_FILE).stat().st_mtime_ns == stamp
    (copy / SERVING_FILE).write_bytes(b"PK\x05\x06" + b"\x00" * 18)
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        add_serving_form(copy)


def test_default_model_path_env_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TIERGATE_CLASSIFIER_PATH", str(tmp_path))
    assert default_model_path() == tmp_path
    monkeypatch.delenv("TIERGATE_CLASSIFIER_PATH")
    assert default_model_path().parent.name == "models"


def test_default_model_without_encoder_weights_is_the_static_one_with_one_warning(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from router.artifact import DEFAULT_MODEL_NAME, STATIC_MODEL_NAME, _warn_static_stand_in
    from router.encoder import ENV_ENCODER_PATH

    if DEFAULT_MODEL_NAME == STATIC_MODEL_NAME:
        pytest.skip("the shipped model reads no encoder")
    monkeypatch.delenv("TIERGATE_CLASSIFIER_PATH", raising=False)
    monkeypatch.setenv(ENV_ENCODER_PATH, str(tmp_path / "missing.safetensors"))
    _warn_static_stand_in.cache_clear()
    with caplog.at_level("WARNING", logger="tiergate"):
        paths = [default_model_path() for _ in range(3)]  # start-up asks from several places
    assert {p.name for p in paths} == {STATIC_MODEL_NAME}
    warned = [r for r in caplog.records if "encoder weights" in r.getMessage()]
    assert len(warned) == 1 and "tiergate fetch-model --only encoder" in warned[0].getMessage()


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
    pickled = ("scikit-learn", "numpy", "scipy", "joblib")  # constraints also pins test tools
    assert {k: pins.get(k) for k in pickled} == {k: recorded[k] for k in pickled}
    assert "-c constraints.txt" in (root / "Makefile").read_text()
    assert "-c /src/constraints.txt" in (root / "Dockerfile").read_text()


def test_a_profile_head_says_why_it_cannot_be_retrained() -> None:
    """router-v4 has no pickled estimators: loading it for retraining names the reason."""
    with pytest.raises(ArtifactError, match="no scikit-learn estimators"):
        load_fitted(default_model_path())


def _anon_rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    raise AssertionError("no RssAnon in /proc/self/status")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_memory_goes_back_to_the_system() -> None:
    # 80 MB of heap blocks (64 KB, under glibc's mmap threshold), every other one then freed:
    # the holes between the blocks that stay are kept for later allocations, until trimmed.
    blocks = []
    for _ in range(1280):
        blocks.append(bytearray(65_536))
        blocks[-1][::4096] = b"x" * 16  # touch every page
    del blocks[::2]
    held = _anon_rss_kb()
    assert release_freed_memory()
    assert held - _anon_rss_kb() > 20_000
    assert len(blocks) == 640
