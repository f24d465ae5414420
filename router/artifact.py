"""A model artifact on disk: its layout, and every read, write and check of one.

An artifact is a directory::

    model.joblib    the fitted scikit-learn estimators (training, evaluation, retraining)
    serving.npz     the same models as plain arrays (router.serving): what is scored
    metadata.json   the sidecar: format and library versions, training data, metrics, and the
                    sha256 of model.joblib and of serving.npz (with its own format version)
    profile.json    optional, a profile router's local profile learnt by ``tiergate retrain``
                    (router.retrain), served in place of the configured one it was learnt over

Only what Tiergate wrote is loaded: the sidecar's format versions and sha256s are checked
before a byte is parsed, ``serving.npz`` is read with ``allow_pickle=False``, and
``model.joblib`` is unpickled only when its hash and library versions match. A new version is
assembled aside and renamed into place; a written one is never edited. scikit-learn and joblib
are imported only by the functions that read or write the pickle; nothing happens at import.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import platform
import sys
import tempfile
import uuid
import zipfile
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.lib.npyio import NpzFile
from numpy.typing import NDArray

from router import __version__
from router.errors import ArtifactError
from router.features import HEAD_CHARS, MAX_CHARS, STRUCTURE_FEATURES, TAIL_CHARS, window_mismatch
from router.locations import shipped
from router.profile import LocalProfile, default_profile, profile_from_dict, write_profile
from router.scoring import Scorer
from router.serving import CapabilityReader, ProfileScorer, ServingScorer

if TYPE_CHECKING:
    from router.classifier import GapRouting, LearnedScorer, PromptClassifier

log = logging.getLogger("tiergate.artifact")

ARTIFACT_FORMAT = "tiergate-classifier"
ARTIFACT_FORMAT_VERSION = 1
MODEL_FILE = "model.joblib"
METADATA_FILE = "metadata.json"
SERVING_FILE = "serving.npz"
#: A profile router's learnt local profile (``tiergate retrain``), read in place of the
#: configured one when it was learnt over that same profile (:func:`served_profile`).
PROFILE_FILE = "profile.json"
#: The layout of ``serving.npz`` (:data:`router.serving.FORM_ARRAYS`); a reader refuses others.
#: Format 1 lacks ``cap_coef`` (read as zeros), format 2 has it, format 3 adds the ``profile``
#: routing kind; a form is written in the oldest format that holds it, so older replicas can
#: serve it. Format 4 is a profile head alone (:data:`router.serving.HEAD_ARRAYS`) over a
#: standalone capability artifact that the sidecar pins by its sidecar's sha256.
SERVING_FORMAT_VERSION = 3
PROFILE_HEAD_FORMAT = 4
READABLE_SERVING_FORMATS = (1, 2, 3, 4)
DEFAULT_MODEL_NAME = "router-v9"
#: The shipped router over the static table alone (sub-millisecond decisions): the default's
#: stand-in where the encoder's weights have not been fetched.
STATIC_MODEL_NAME = "router-v6"
ENV_MODEL_PATH = "TIERGATE_CLASSIFIER_PATH"

_ZIP_TIME = (1980, 1, 1, 0, 0, 0)  # the earliest time a zip entry can carry


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (an artifact's files, a GGUF, a data file)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def default_model_path() -> Path:
    """The default model: ``$TIERGATE_CLASSIFIER_PATH``, else the shipped
    ``models/<DEFAULT_MODEL_NAME>`` (package data, :func:`router.locations.shipped`); where
    that reads the encoder and its weights are not there (``tiergate fetch-model`` not run),
    ``models/<STATIC_MODEL_NAME>``, with a warning that says how to fetch them."""
    env = os.environ.get(ENV_MODEL_PATH)
    if env:
        return Path(env)
    if DEFAULT_MODEL_NAME != STATIC_MODEL_NAME:
        from router.encoder import ENCODER_FILE, encoder_path

        found = encoder_path()
        if found is None or not found.is_file():
            _warn_static_stand_in(ENCODER_FILE)
            return shipped("models", STATIC_MODEL_NAME)
    return shipped("models", DEFAULT_MODEL_NAME)


@functools.cache
def _warn_static_stand_in(encoder_file: str) -> None:
    # Once a process: start-up asks for the default model from several places.
    log.warning(
        "%s needs the encoder weights (%s), which are not fetched: serving %s instead "
        "(run `tiergate fetch-model --only encoder`)",
        DEFAULT_MODEL_NAME,
        encoder_file,
        STATIC_MODEL_NAME,
    )


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


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The sidecar of an artifact directory with ``model.joblib``, checked for format and
    library versions (the versions the pickle is bound to)."""
    p = Path(path)
    meta = read_sidecar(p, MODEL_FILE)
    expected = library_versions()
    found = meta.get("libraries", {})
    mismatched = {k: (found.get(k), v) for k, v in expected.items() if found.get(k) != v}
    if mismatched:
        detail = ", ".join(f"{k}: model {a} vs installed {b}" for k, (a, b) in mismatched.items())
        raise ArtifactError(
            f"{p}: library version mismatch ({detail}); retrain with `tiergate train`"
        )
    return meta


def replace_file(path: Path, write: Any) -> None:
    """Call ``write`` on a sibling temporary file, then rename it over ``path``: a reader sees
    the old file or the new one, never half of one (and a mapping of the old keeps its bytes)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_sidecar(directory: Path, meta: Mapping[str, Any]) -> None:
    """Write an artifact's sidecar (atomically replacing one that is there)."""
    text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
    replace_file(directory / METADATA_FILE, lambda tmp: tmp.write_text(text))


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
    replace_file(path, lambda tmp: _write_npz(tmp, arrays))
    return sha256_file(path)


def read_checked(path: Path, sha256: object) -> bytes:
    """The bytes of a file an artifact's sidecar names, refused (:class:`ArtifactError`) unless
    they hash to ``sha256`` (the sidecar's)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{path}: named by its sidecar, cannot be read") from exc
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ArtifactError(f"{path}: sha256 does not match its sidecar; refusing to load")
    return data


def parse_npz(path: Path, data: bytes, what: str = "arrays") -> dict[str, NDArray[Any]]:
    """The arrays of the ``.npz`` bytes ``data`` (read from ``path``), without pickles; an
    :class:`ArtifactError` (naming the file as ``what``) otherwise."""
    try:
        loaded = np.load(io.BytesIO(data), allow_pickle=False)
        if not isinstance(loaded, NpzFile):
            raise ValueError("not an .npz archive")
        with loaded:
            return {key: loaded[key] for key in loaded.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ArtifactError(f"{path}: unusable {what} ({exc})") from exc


def read_checked_npz(path: Path, sha256: object, what: str = "arrays") -> dict[str, NDArray[Any]]:
    """The arrays of an ``.npz`` whose bytes hash to ``sha256`` (the sidecar's), read from the
    very bytes that were hashed, without pickles; an :class:`ArtifactError` (naming the file as
    ``what``) otherwise."""
    return parse_npz(path, read_checked(path, sha256), what)


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
    """A standalone capability artifact (``router.capability``'s format, a head or a gate of
    two), numpy only."""
    # Imported here: router.capability reads its files through this module's helpers.
    from router.capability import load_reader

    return load_reader(directory)


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


def router_capability(path: str | Path) -> CapabilityReader:
    """The capability model a profile-reading router (serving form 4) reads prompts through,
    checked as :func:`load_serving_form` checks it; other routers read no profile per
    capability through one, and are refused."""
    p = Path(path)
    entry = read_sidecar(p).get("serving")
    if not isinstance(entry, dict) or entry.get("format_version") != PROFILE_HEAD_FORMAT:
        raise ArtifactError(
            f"{p}: not a router that reads the local profile through a capability model "
            f"(serving form {PROFILE_HEAD_FORMAT}, as {DEFAULT_MODEL_NAME})"
        )
    return _capability_of(p, entry)


def load_serving_form(
    path: str | Path,
    meta: Mapping[str, Any] | None = None,
    profile: LocalProfile | None = None,
) -> ServingScorer | ProfileScorer:
    """The scorer of an artifact's serving form, checked as the module docstring says (``meta``:
    its sidecar, when already read; ``profile``: the local model's, default the bundled one)."""
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
        profile = served_profile(p, meta, default_profile() if profile is None else profile)
        version = str(meta.get("version", p.name))
        if found == PROFILE_HEAD_FORMAT:
            score_of = meta.get("score_of")
            if score_of is not None and not isinstance(score_of, str):
                raise ValueError(f"score_of must be a router's name, not {score_of!r}")
            return ProfileScorer(_capability_of(p, entry), form, version, profile, score_of)
        if found != 1 and "cap_coef" not in form:  # only format 1 predates it
            raise ValueError(f"format {found} needs 'cap_coef'")
        return ServingScorer(form, version, profile)
    except ValueError as exc:
        raise ArtifactError(f"{file}: unusable serving form ({exc})") from exc


def is_profile_router(path: str | Path) -> bool:
    """Whether the artifact at ``path`` is a profile head over a capability model (serving form
    4): what it learns from outcomes is the local profile, not estimators."""
    serving = read_sidecar(path).get("serving")
    return isinstance(serving, dict) and serving.get("format_version") == PROFILE_HEAD_FORMAT


def served_profile(path: Path, meta: Mapping[str, Any], configured: LocalProfile) -> LocalProfile:
    """The local profile an artifact serves with: its learnt ``profile.json`` (checked against
    the sidecar's sha256) when it has one and it was learnt over ``configured``; else
    ``configured``. A learnt profile read over another local model's would route for the wrong
    model, so a changed configured profile wins (logged) until a retrain relearns it."""
    entry = meta.get("profile")
    if entry is None:
        return configured
    file = path / PROFILE_FILE
    if not isinstance(entry, dict) or entry.get("file") != PROFILE_FILE:
        raise ArtifactError(f"{path / METADATA_FILE}: no valid profile entry")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise ArtifactError(f"{file}: named by its sidecar, cannot be read") from exc
    if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise ArtifactError(f"{file}: sha256 does not match its sidecar; refusing to load")
    try:
        learnt = profile_from_dict(json.loads(data), origin=str(file))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{file}: not a valid profile file ({exc})") from exc
    found = entry.get("prior")
    prior: dict[str, Any] = found if isinstance(found, dict) else {}
    if prior.get("fingerprint") != configured.fingerprint():
        log.warning(
            "model %s: its profile was learnt over %s's %s profile, but the configured local "
            "profile is %s's (%s): serving the configured one (`tiergate retrain` relearns it)",
            path,
            prior.get("model"),
            prior.get("source"),
            configured.model,
            configured.origin or configured.source,
        )
        return configured
    return learnt


def save_learned_profile(
    parent: str | Path,
    out_dir: str | Path,
    profile: LocalProfile,
    prior: LocalProfile,
    *,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write a new version of the profile router ``parent`` that serves ``profile`` (learnt
    over the configured ``prior``): the parent's profile head and capability pin unchanged,
    ``profile.json`` and its sidecar entry (sha256, the prior's fingerprint) added."""
    src = Path(parent)
    meta = read_sidecar(src)
    if not is_profile_router(src):
        raise ArtifactError(f"{src}: not a profile router; only its local profile is learnt")
    import shutil

    serving = dict(meta["serving"])
    read_checked_npz(src / SERVING_FILE, serving.get("sha256"), "serving form")  # checked
    out = Path(out_dir)
    tmp = _aside(out)
    shutil.copyfile(src / SERVING_FILE, tmp / SERVING_FILE)
    cap: dict[str, Any] = serving.get("capability") or {}
    if isinstance(cap.get("name"), str) and (src / cap["name"]).is_dir():
        # The parent carries its capability model inside: so does the child.
        shutil.copytree(src / cap["name"], tmp / cap["name"])
    write_profile(profile, tmp / PROFILE_FILE)
    entry = {
        "file": PROFILE_FILE,
        "sha256": sha256_file(tmp / PROFILE_FILE),
        "prior": {
            "model": prior.model,
            "source": prior.source,
            "origin": prior.origin,
            "fingerprint": prior.fingerprint(),
        },
    }
    kept: dict[str, Any] = {k: meta[k] for k in ("features", "gap", "target") if k in meta}
    sidecar = {
        **_sidecar_head(out.name, out.name),
        **kept,
        **(metadata or {}),
        "profile": entry,
        "serving": serving,
    }
    return _publish(tmp, out, sidecar)


def library_versions() -> dict[str, str]:
    """Versions that must match between the writer and the reader of an artifact's pickle."""
    import joblib
    import scipy
    import sklearn

    return {
        "tiergate_artifact_format": str(ARTIFACT_FORMAT_VERSION),
        "scikit-learn": sklearn.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "joblib": joblib.__version__,
        "python": ".".join(map(str, sys.version_info[:2])),
    }


def _aside(out: Path) -> Path:
    # A temporary sibling of a new artifact directory, where it is assembled.
    if out.exists():
        raise ArtifactError(f"{out} already exists; write a new version instead of editing one")
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))


def _publish(tmp: Path, out: Path, sidecar: Mapping[str, Any]) -> Path:
    # Write the sidecar last, then rename the assembled directory into place: readers never see
    # half of it. mkdtemp makes it owner-only; an artifact is meant to be shared.
    write_sidecar(tmp, sidecar)
    tmp.chmod(0o755)
    os.replace(tmp, out)
    return out


def _sidecar_head(name: str, version: str) -> dict[str, Any]:
    return {
        "format": ARTIFACT_FORMAT,
        "format_version": ARTIFACT_FORMAT_VERSION,
        "name": name,
        "version": version,
        "tiergate_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "libraries": library_versions(),
        "platform": platform.platform(),
    }


def save_scorer(
    scorer: LearnedScorer, out_dir: str | Path, *, metadata: dict[str, Any] | None = None
) -> Path:
    """Write ``scorer`` as a new artifact directory (``model.joblib``, its serving form and the
    sidecar) and return its path. Refuses to overwrite one: a retrain writes a new version."""
    import joblib

    out = Path(out_dir)
    tmp = _aside(out)
    model_path = tmp / MODEL_FILE
    joblib.dump(
        {"format": ARTIFACT_FORMAT, "routing": scorer.routing, "capability": scorer.capability},
        model_path,
        compress=3,
    )
    sidecar = {
        **_sidecar_head(out.name, scorer.version),
        "model_sha256": sha256_file(model_path),
        "features": {
            "routing": _describe(scorer.routing),
            "capability": _describe(scorer.capability),
            "max_chars": MAX_CHARS,
            "head_chars": HEAD_CHARS,
            "tail_chars": TAIL_CHARS,
            "structure": list(STRUCTURE_FEATURES),
        },
        **(metadata or {}),
        "serving": write_serving_form(tmp, scorer.form),
    }
    return _publish(tmp, out, sidecar)


def save_profile_router(
    routing: GapRouting,
    capability: Path,
    out_dir: str | Path,
    *,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write router-v4 over a standalone capability artifact (``capability``, a directory such
    as ``models/capability-v1``): the profile head as serving form 4 (no pickle: the head is
    all there is to serve) and the sidecar pinning the capability model, as a new directory."""
    out = Path(out_dir)
    tmp = _aside(out)
    sidecar = {
        **_sidecar_head(out.name, out.name),
        "features": {"routing": routing.describe(), "capability": capability.name},
        **(metadata or {}),
        "serving": write_profile_head(tmp, routing.head(), Path(capability)),
    }
    return _publish(tmp, out, sidecar)


def _describe(model: PromptClassifier) -> dict[str, Any]:
    from router.classifier import PromptClassifier

    plain = (str, int, float, bool, type(None))
    words = np.asarray(model.word_coef_)
    out: dict[str, Any] = {
        "estimator": model.describe(),
        # Estimator-valued parameters (a capability or base model) are described on their own.
        "params": {k: v for k, v in model.get_params(deep=False).items() if isinstance(v, plain)},
        "classes": [str(c) for c in model.classes_],
        "vocabulary_size": len(model.vocabulary_),
        # Terms with a weight in a decision row (a CapabilityRouting has none of its own: its
        # words count through the capability probabilities).
        "weighted_terms": int(np.count_nonzero(np.abs(words).sum(axis=0))),
        "reads_capability_probabilities": model.capability_coef() is not None,
    }
    base = getattr(model, "base_", None)
    if isinstance(base, PromptClassifier):
        out["base"] = _describe(base)
    return out


def load_fitted(path: str | Path) -> LearnedScorer:
    """The fitted estimators of an artifact written by :func:`save_scorer`, for retraining and
    studies (scoring goes through :func:`load_scorer`). ``model.joblib`` is unpickled only after
    its sha256 and library versions match the sidecar; its contents are then type-checked."""
    import joblib

    from router.classifier import LearnedScorer, PromptClassifier

    p = Path(path)
    if not (p / MODEL_FILE).exists() and (p / METADATA_FILE).is_file():
        serving = read_sidecar(p).get("serving") or {}
        if serving.get("format_version") == PROFILE_HEAD_FORMAT:
            raise ArtifactError(
                f"{p}: a profile head over a capability model (router-v4 and later) has no "
                "scikit-learn estimators to load; `tiergate retrain` relearns its local profile "
                "instead (--candidate auto or profile), `tiergate train --capability` refits it"
            )
    meta = read_metadata(p)
    features = meta.get("features") or {}
    # Written before the window was recorded: the first window, 2,000 + 500 characters.
    mismatch = window_mismatch(features.get("head_chars", 2000), features.get("tail_chars", 500))
    if mismatch is not None:
        raise ArtifactError(f"{p}: {mismatch}")
    model_path = p / MODEL_FILE
    if sha256_file(model_path) != meta.get("model_sha256"):
        raise ArtifactError(f"{model_path}: sha256 does not match its sidecar; refusing to load")
    payload = joblib.load(model_path)
    if not isinstance(payload, dict) or payload.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{model_path}: unexpected contents")
    routing, capability = payload.get("routing"), payload.get("capability")
    if not isinstance(routing, PromptClassifier) or not isinstance(capability, PromptClassifier):
        raise ArtifactError(f"{model_path}: unexpected estimator types")
    try:
        return LearnedScorer(routing, capability, str(meta.get("version", p.name)))
    except ValueError as exc:
        raise ArtifactError(f"{model_path}: {exc}") from exc


def add_serving_form(path: str | Path) -> dict[str, Any]:
    """Give an artifact written before serving forms existed its ``serving.npz``, without
    retraining (``tiergate serving-form``); returns the sidecar's serving entry.

    ``model.joblib`` is loaded with every check of :func:`load_fitted` and left byte-identical;
    the serving form is derived from it deterministically (the same model always gives the same
    bytes), and the sidecar is replaced atomically. An artifact that already has a serving form
    is only checked (a version in a model store is never edited).
    """
    p = Path(path)
    meta = read_sidecar(p)
    if "serving" in meta:  # any artifact with one, a profile router's (no model.joblib) too
        load_serving_form(p, meta)  # refuses one that does not match its sidecar
        entry: dict[str, Any] = meta["serving"]
        return entry
    scorer = load_fitted(p)
    meta = read_metadata(p)
    meta["serving"] = write_serving_form(p, scorer.form)
    write_sidecar(p, meta)
    return dict(meta["serving"])


def release_freed_memory() -> bool:
    """Hand the heap pages freed since loading back to the system (glibc's ``malloc_trim``);
    False where the C library has none. Reading an artifact holds its compressed bytes, its
    parsed arrays and their float32 copies at once (a peak of about 60 MB for the shipped
    capability table), and glibc keeps what is then freed for later allocations, so an idle
    proxy would hold it for good. The proxy calls this once it has started and after a hot
    swap (bench/README.md gives the figures)."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return False
    trim(0)
    return True


def load_scorer(path: str | Path, profile: LocalProfile | None = None) -> Scorer:
    """The scorer of an artifact, reading ``profile`` as the local model's (default: the bundled
    model's): the proxy's start-up and hot swap, the CLI and the benches load through here.

    Its serving form, without scikit-learn; an artifact written before serving forms existed is
    read through :func:`load_fitted` (which derives the form from the pickle). Foreign or
    tampered files raise :class:`ArtifactError`.
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
        return load_fitted(p)
    scorer = load_serving_form(p, meta, profile)
    log.info(
        "model %s loaded from its serving form (%s, numpy only), local profile %s",
        p,
        SERVING_FILE,
        scorer.profile.label if scorer.profile is not None else "none",
    )
    return scorer
