"""A model artifact on disk: its layout, its sidecar's checks, and the proxy's loader.

An artifact is a directory written by :func:`router.training.save_scorer`::

    model.joblib    the fitted scikit-learn estimators (training, evaluation, retraining)
    serving.npz     the same models as plain arrays (router.serving): what the proxy loads
    metadata.json   the sidecar: format and library versions, training data, metrics, and the
                    sha256 of model.joblib and of serving.npz (with its own format version)

:func:`load_for_serving` loads only what Tiergate wrote: it checks the sidecar's format version,
then the serving form's format version and sha256, and only then reads the bytes it hashed with
``numpy.load(allow_pickle=False)`` (plain arrays: nothing in the file can run code), whose names,
kinds and shapes :class:`~router.serving.ServingScorer` checks in turn. The library versions of
the sidecar bind only the pickle (:func:`router.training.read_metadata` checks them there). An
artifact written before serving forms existed has no ``serving`` entry; it is loaded through
scikit-learn as :func:`router.training.load_scorer` loads it, with a log line that says so, and
``tiergate serving-form`` gives it its serving form without retraining.

This module imports neither scikit-learn, scipy nor joblib, and nothing happens at import.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib.npyio import NpzFile
from numpy.typing import NDArray

from router.errors import ArtifactError
from router.fetch import sha256_file
from router.locations import shipped
from router.profile import LocalProfile, default_profile
from router.scoring import Scorer
from router.serving import CapabilityReader, ProfileScorer, ServingScorer

log = logging.getLogger("tiergate.artifact")

ARTIFACT_FORMAT = "tiergate-classifier"
ARTIFACT_FORMAT_VERSION = 1
MODEL_FILE = "model.joblib"
METADATA_FILE = "metadata.json"
SERVING_FILE = "serving.npz"
#: The layout of ``serving.npz`` (:data:`router.serving.FORM_ARRAYS`); a reader refuses others.
#: Version 2 added ``cap_coef``; a version-1 form (router-v1, router-v2) has none and reads as if
#: it were all zeros. Version 3 added the ``profile`` routing kind (router-v4: ``gap_strong``,
#: ``gap_slope``), whose score reads the local model's profile; forms without it are still
#: written as version 2 (or 1), so older replicas can serve them.
SERVING_FORMAT_VERSION = 3
#: Format 4 is a profile head alone (:data:`router.serving.HEAD_ARRAYS`) over a standalone
#: capability artifact that the sidecar names and pins by its sidecar's sha256.
PROFILE_HEAD_FORMAT = 4
READABLE_SERVING_FORMATS = (1, 2, 3, 4)
DEFAULT_MODEL_NAME = "router-v4"
ENV_MODEL_PATH = "TIERGATE_CLASSIFIER_PATH"

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry


def default_model_path() -> Path:
    """The default model: ``$TIERGATE_CLASSIFIER_PATH``, else the shipped
    ``models/<DEFAULT_MODEL_NAME>`` (package data, :func:`router.locations.shipped`)."""
    env = os.environ.get(ENV_MODEL_PATH)
    if env:
        return Path(env)
    return shipped("models", DEFAULT_MODEL_NAME)


def read_sidecar(
    path: str | Path,
    *needs: str,
    kind: str = ARTIFACT_FORMAT,
    version: int = ARTIFACT_FORMAT_VERSION,
) -> dict[str, Any]:
    """The sidecar of an artifact directory, checked for its format and format version.

    ``needs``: files the caller reads, which must be there beside ``metadata.json``; ``kind`` and
    ``version``: the sidecar's ``format`` and ``format_version`` (a classifier's by default).
    """
    p = Path(path)
    meta_path = p / METADATA_FILE
    if not all((p / name).is_file() for name in (*needs, METADATA_FILE)):
        raise ArtifactError(
            f"{p} is not a Tiergate model (needs {' and '.join((*needs, METADATA_FILE))})"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{meta_path}: unreadable sidecar") from exc
    if not isinstance(meta, dict) or meta.get("format") != kind:
        what = "classifier" if kind == ARTIFACT_FORMAT else f"model ({kind})"
        raise ArtifactError(f"{meta_path}: not a Tiergate {what} sidecar")
    _require_version(meta_path, "artifact format", meta.get("format_version"), version)
    return meta


def _require_version(where: Path, what: str, found: object, expected: int) -> None:
    if found != expected:
        raise ArtifactError(f"{where}: {what} {found!r}, this Tiergate reads {expected}")


def _replace(path: Path, write: Any) -> None:
    # Write a sibling temporary file, then rename it over ``path``: a reader sees the old file
    # or the new one, never half of one.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_sidecar(directory: Path, meta: Mapping[str, Any]) -> None:
    """Write an artifact's sidecar (atomically replacing one that is there)."""
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    _replace(directory / METADATA_FILE, lambda tmp: tmp.write_text(text))


def _write_npz(path: Path, form: Mapping[str, NDArray[Any]]) -> None:
    # What numpy.savez_compressed writes, except that every member carries a fixed time (savez
    # stamps the current one): the same arrays always make the same bytes, so a serving form
    # derived again from the same model.joblib has the same sha256.
    with zipfile.ZipFile(path, "x", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(form):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as fh:
                np.lib.format.write_array(fh, np.asarray(form[key]), allow_pickle=False)


def write_profile_head(
    directory: Path, head: Mapping[str, NDArray[Any]], capability: Path
) -> dict[str, Any]:
    """Write a profile head (serving form 4) into an artifact directory, pinned to the
    capability artifact ``capability`` (its name and its sidecar's sha256); returns the
    sidecar's serving entry."""
    return {
        "file": SERVING_FILE,
        "format_version": PROFILE_HEAD_FORMAT,
        "sha256": write_npz(directory / SERVING_FILE, head),
        "routing": "profile",
        "capability": {"name": capability.name, "sha256": sha256_file(capability / METADATA_FILE)},
    }


def write_npz(path: Path, arrays: Mapping[str, NDArray[Any]]) -> str:
    """Write ``arrays`` as a reproducible ``.npz`` (atomically replacing ``path``); returns its
    sha256 for the sidecar, which :func:`read_checked_npz` checks."""
    _replace(path, lambda tmp: _write_npz(tmp, arrays))
    return sha256_file(path)


def read_checked_npz(path: Path, sha256: object, what: str = "arrays") -> dict[str, NDArray[Any]]:
    """The arrays of an ``.npz`` whose bytes hash to ``sha256`` (the sidecar's), read from the
    very bytes that were hashed, without pickles; an :class:`ArtifactError` (naming the file as
    ``what``) otherwise."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: named by its sidecar, cannot be read") from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ArtifactError(f"{path}: sha256 does not match its sidecar; refusing to load")
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(loaded, NpzFile):
            raise ValueError("not an .npz archive")
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"{path}: unusable {what} ({exc})") from exc


def write_serving_form(directory: Path, form: Mapping[str, NDArray[Any]]) -> dict[str, Any]:
    """Write ``serving.npz`` into an artifact directory; returns its sidecar entry.

    A form whose ``cap_coef`` is all zero (a model that reads no capability probabilities) is
    written as format 1, without it, so Tiergate versions that read only format 1 can still
    serve it (replicas of two versions sharing a model store during an upgrade).
    """
    version = SERVING_FORMAT_VERSION if "gap_strong" in form else 2
    if version == 2 and "cap_coef" in form and not np.asarray(form["cap_coef"]).any():
        form = {key: value for key, value in form.items() if key != "cap_coef"}
        version = 1
    return {
        "file": SERVING_FILE,
        "format_version": version,
        "sha256": write_npz(directory / SERVING_FILE, form),
        "routing": str(np.asarray(form["routing"])),
    }


def capability_dir(artifact: Path, name: str) -> Path:
    """Where a format-4 artifact's capability model lives: a directory ``name`` inside the
    artifact when it carries one, else beside it, else the shipped one (``models/NAME``)."""
    for where in (artifact / name, artifact.parent / name):
        if where.is_dir():
            return where
    return shipped("models", name)


def load_capability_model(directory: Path) -> CapabilityReader:
    """A standalone capability artifact (``router.capability``'s format), numpy only."""
    # Imported here: router.capability reads its files through this module's helpers.
    from router.capability import load_capability

    return load_capability(directory)


def _capability_of(artifact: Path, entry: Mapping[str, Any]) -> CapabilityReader:
    # The capability artifact the sidecar names, refused unless its sidecar is the pinned one.
    cap = entry.get("capability")
    if not isinstance(cap, dict) or not isinstance(cap.get("name"), str):
        raise ArtifactError(f"{artifact / METADATA_FILE}: names no capability model")
    where = capability_dir(artifact, cap["name"])
    if not (where / METADATA_FILE).is_file() or sha256_file(where / METADATA_FILE) != cap.get(
        "sha256"
    ):
        raise ArtifactError(
            f"{artifact}: its capability model {where} is missing or not the one it was fitted on"
        )
    return load_capability_model(where)


def load_serving_form(
    path: str | Path,
    meta: Mapping[str, Any] | None = None,
    profile: LocalProfile | None = None,
) -> ServingScorer | ProfileScorer:
    """The :class:`~router.serving.ServingScorer` of an artifact with a serving form, checked as
    the module docstring says (``meta``: its sidecar, when already read; ``profile``: the local
    model's, default :func:`router.profile.default_profile`)."""
    p = Path(path)
    meta = read_sidecar(p) if meta is None else meta
    entry = meta.get("serving")
    if not isinstance(entry, dict) or entry.get("file") != SERVING_FILE:
        raise ArtifactError(f"{p / METADATA_FILE}: no valid serving form entry")
    found = entry.get("format_version")
    if found not in READABLE_SERVING_FORMATS:
        raise ArtifactError(
            f"{p}: serving form format {found!r}, this Tiergate reads "
            f"{', '.join(map(str, READABLE_SERVING_FORMATS))}"
        )
    file = p / SERVING_FILE
    form = read_checked_npz(file, entry.get("sha256"), "serving form")
    try:
        if profile is None:
            profile = default_profile()
        version = str(meta.get("version", p.name))
        if found == PROFILE_HEAD_FORMAT:
            return ProfileScorer(_capability_of(p, entry), form, version, profile)
        if found != 1 and "cap_coef" not in form:  # only format 1 predates it
            raise ValueError(f"format {found} needs 'cap_coef'")
        return ServingScorer(form, version, profile)
    except ValueError as exc:
        raise ArtifactError(f"{file}: unusable serving form ({exc})") from exc


def load_for_serving(path: str | Path, profile: LocalProfile | None = None) -> Scorer:
    """The scorer the proxy serves from an artifact (the proxy's start-up, its hot swap and the
    ``score``/``classify``/``eval`` commands load through here), reading ``profile`` as the
    local model's (default: :func:`router.profile.default_profile`, the bundled model's).

    Its serving form when the sidecar lists one, without importing scikit-learn; else, for an
    artifact written before serving forms existed, :func:`router.training.load_scorer` (which
    imports scikit-learn). Both refuse foreign or tampered files with an :class:`ArtifactError`.
    """
    p = Path(path)
    meta = read_sidecar(p)
    if "serving" not in meta:
        log.warning(
            "model %s has no %s: loading %s through scikit-learn (about 100 MB more memory; "
            "`tiergate serving-form --model %s` adds it)",
            p,
            SERVING_FILE,
            MODEL_FILE,
            p,
        )
        from router.training import load_scorer

        return load_scorer(p)
    scorer = load_serving_form(p, meta, profile)
    log.info(
        "model %s loaded from its serving form (%s, numpy only), local profile %s",
        p,
        SERVING_FILE,
        scorer.profile.model if scorer.profile is not None else "none",
    )
    return scorer
