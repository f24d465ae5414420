"""The versioned model store (``TIERGATE_MODEL_STORE``) and the proxy's hot swap of its model.

Layout::

    <store>/versions/<id>/model.joblib      an artifact written by router.artifact.save_scorer
    <store>/versions/<id>/serving.npz       (router.artifact; the proxy loads serving.npz),
    <store>/versions/<id>/metadata.json     with lineage (parent, label counts, gate metrics)
    <store>/current                         the serving version's id, replaced atomically
    <store>/history.jsonl                   every pointer change (promote, rollback), in order
    <store>/current.lock                    held while the pointer is read and moved

A version directory is never edited after it is written. ``promote`` and ``rollback`` only
rewrite ``current`` (a temporary file renamed over it), so a reader sees the old id or the new
one, never half of either. Every move of the pointer holds ``current.lock``
(:meth:`ModelStore.locked`), as does a retrain from its gate's decision to its promotion.
Running proxies poll the pointer (:func:`watch_model_store`) and swap ``gateway.scorer`` once
the new artifact has loaded and passed its trust checks; requests in flight finish on the
scorer they started with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from router.errors import ArtifactError, ConfigError

log = logging.getLogger("tiergate.registry")

_VERSION = re.compile(r"^v(\d{4,})$")


def default_loader(path: Path) -> Any:
    """Load an artifact with the proxy's trusted-only loader (its serving form, numpy only;
    :func:`router.artifact.load_scorer`)."""
    from router.artifact import load_scorer

    return load_scorer(path)


class ModelStore:
    """A directory of model versions and a ``current`` pointer (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._held = threading.RLock()
        self._depth = 0

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the pointer lock (``current.lock``, across processes) for a read-then-move of
        ``current``: a retrain's "is my parent still current? then promote" is one step that a
        promote or rollback in between cannot split. Re-entrant within this instance."""
        from router.outcomes import lock_beside

        with self._held:
            claim = None
            if self._depth == 0:
                self.root.mkdir(parents=True, exist_ok=True)
                _, claim = lock_beside(self.root / "current", wait=True)
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if claim is not None:
                    claim.close()

    @property
    def versions_dir(self) -> Path:
        """Where version directories live."""
        return self.root / "versions"

    def path(self, version: str) -> Path:
        """The directory of ``version``; a :class:`ConfigError` if there is none."""
        p = self.versions_dir / version
        if not _VERSION.match(version) or not p.is_dir():
            raise ConfigError(f"no model version '{version}' in {self.root}")
        return p

    def version_ids(self) -> list[str]:
        """Every version id, oldest first."""
        if not self.versions_dir.is_dir():
            return []
        ids = [p.name for p in self.versions_dir.iterdir() if _VERSION.match(p.name)]
        return sorted(ids, key=lambda v: int(v[1:]))

    def next_version(self) -> str:
        """The id the next version gets (one past the highest)."""
        ids = self.version_ids()
        return f"v{(int(ids[-1][1:]) + 1 if ids else 1):04d}"

    def metadata(self, version: str) -> dict[str, Any]:
        """The sidecar of one version."""
        meta = json.loads((self.path(version) / "metadata.json").read_text(encoding="utf-8"))
        return meta if isinstance(meta, dict) else {}

    def current(self) -> str | None:
        """The id the pointer names, or None before the first promotion."""
        try:
            text = (self.root / "current").read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return None
        return text or None

    def _point(self, version: str, action: str, reason: str) -> None:
        with self.locked():
            self._point_locked(version, action, reason)

    def _point_locked(self, version: str, action: str, reason: str) -> None:
        self.path(version)
        previous = self.current()
        fd, tmp = tempfile.mkstemp(prefix=".current-", dir=self.root)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(version + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.root / "current")
        entry = {
            "ts": time.time(),
            "action": action,
            "version": version,
            "previous": previous,
            "reason": reason,
        }
        with (self.root / "history.jsonl").open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry) + "\n")

    def adopt(self, artifact: Path, loader: Callable[[Path], Any] = default_loader) -> str:
        """Copy an existing artifact directory in as the next version (current if none is),
        once ``loader`` (the proxy's) has loaded it: a folder the proxies could not serve is
        refused (its loader's error), never stored."""
        loader(Path(artifact))
        with self.locked():  # the id and the first pointer, as one step
            return self._copy_in(Path(artifact))

    def seed(self, artifact: Path, loader: Callable[[Path], Any] = default_loader) -> str | None:
        """Adopt ``artifact`` (as :meth:`adopt`) only while no version is current, and return
        its id; None when one is. The check and the copy are one step under the pointer lock,
        so of two first retrains on an empty store (the CronJob's and one by hand) exactly one
        seeds it, and the other finds it seeded instead of storing a second copy."""
        if self.current() is not None:
            return None
        loader(Path(artifact))
        with self.locked():
            return None if self.current() is not None else self._copy_in(Path(artifact))

    def _copy_in(self, artifact: Path) -> str:
        # Under the pointer lock: the next id, the copy, and the pointer if there is none yet.
        import shutil

        version = self.next_version()
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=self.versions_dir))
        try:
            shutil.copytree(artifact, tmp, dirs_exist_ok=True)
            os.replace(tmp, self.versions_dir / version)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if self.current() is None:
            self.promote(version, reason=f"adopted {artifact}")
        return version

    def promote(
        self,
        version: str,
        reason: str = "manual",
        *,
        force: bool = False,
        loader: Callable[[Path], Any] | None = None,
    ) -> None:
        """Make ``version`` the serving model. A version the retrain gate refused is refused
        here too unless ``force``: the gate is what keeps a worse model from serving.
        ``loader`` (the proxy's, as :meth:`adopt` takes it): load the version first and refuse
        one that does not load (:meth:`check_loads`), ``force`` or not."""
        self.path(version)
        gate = self.metadata(version).get("lineage", {}).get("gate", {})
        if gate.get("decision") == "refused" and not force:
            why = "; ".join(str(r) for r in gate.get("reasons") or []) or "no reason recorded"
            raise ConfigError(
                f"{version} was refused by the retrain gate ({why}); promote it anyway with --force"
            )
        if loader is not None:
            self.check_loads(version, loader)
        self._point(version, "promote", reason)

    def check_loads(self, version: str, loader: Callable[[Path], Any]) -> None:
        """Refuse (:class:`ArtifactError`) to point at a version ``loader`` cannot load (one an
        older Tiergate wrote, say): the proxies would log it and keep the old model while the
        store names this one, and a proxy that restarts would serve the heuristic scorer."""
        try:
            loader(self.path(version))
        except (ConfigError, OSError) as exc:
            raise ArtifactError(
                f"{version} in {self.root} cannot be loaded by this Tiergate ({exc}); "
                f"{self.current()} stays current"
            ) from exc

    def history(self) -> list[dict[str, Any]]:
        """Every pointer change, oldest first."""
        try:
            lines = (self.root / "history.jsonl").read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in lines if line.strip()]

    def _promoted(self) -> list[str]:
        """The versions promoted and not rolled back since, oldest first: each rollback undoes
        the promotion on top, so rolling back again walks further back instead of returning
        to the version just rolled back from."""
        stack: list[str] = []
        for entry in self.history():
            if entry["action"] == "rollback" and stack:
                stack.pop()
            if not stack or stack[-1] != entry["version"]:
                stack.append(entry["version"])
        return stack

    def rollback(self, loader: Callable[[Path], Any] | None = None) -> str:
        """Point back to the version that served before the current one was promoted; returns
        its id. Repeated, it steps back through the promotions one at a time. ``loader``: as
        :meth:`promote` takes it."""
        with self.locked():
            return self._rollback_locked(loader)

    def _rollback_locked(self, loader: Callable[[Path], Any] | None) -> str:
        current = self.current()
        stack = self._promoted()
        if stack and stack[-1] == current:
            previous = stack[-2] if len(stack) > 1 else None
        else:  # the pointer was moved by hand: the version it replaced
            previous = next(
                (e["previous"] for e in reversed(self.history()) if e["version"] == current),
                None,
            )
        if not previous:
            raise ConfigError(
                f"nothing to roll back to in {self.root} (tiergate models promote VERSION "
                "points at any version)"
            )
        if loader is not None:
            self.check_loads(previous, loader)
        self._point(previous, "rollback", f"rollback from {self.current()}")
        return str(previous)

    def listing(self) -> list[dict[str, Any]]:
        """One summary per version (for ``tiergate models list``): its id, the ``model`` it is
        built on (an adopted version's own, e.g. router-v9; a retrained one's, its parent's),
        and ``model_version``, the name its scores carry (outcome records, the
        ``x-tiergate-model-version`` header): an adopted version's model, a retrained one's id."""
        current = self.current()
        out: list[dict[str, Any]] = []
        model_of: dict[str, Any] = {}
        for version in self.version_ids():
            try:
                meta = self.metadata(version)
            except (OSError, ValueError) as exc:  # listed, not fatal: the others still show
                meta = {"error": f"unreadable sidecar ({exc.__class__.__name__})"}
            lineage = meta.get("lineage", {})
            # Parents are older, so listed first; one that is gone leaves the version's name.
            model_of[version] = model_of.get(lineage.get("parent")) or meta.get("version")
            out.append(
                {
                    "version": version,
                    "current": version == current,
                    "model": model_of[version],
                    "model_version": meta.get("version"),
                    "error": meta.get("error"),
                    "created_at": meta.get("created_at"),
                    "parent": lineage.get("parent"),
                    "labels": lineage.get("labels", {}).get("used"),
                    "gate": lineage.get("gate", {}).get("decision"),
                    "design": lineage.get("candidate", {}).get("design"),
                }
            )
        return out

    def load_current(self, loader: Callable[[Path], Any] = default_loader) -> tuple[str, Any]:
        """Load the serving version: ``(version id, scorer)``."""
        version = self.current()
        if version is None:
            raise ConfigError(f"model store {self.root} has no current version")
        return version, loader(self.path(version))


def restart_advice(root: Path) -> str:
    """What to do when a store's current version cannot be loaded by this Tiergate (one an
    older release wrote, with another prompt window or other library versions): `tiergate
    train`, which the load error advises for a lone artifact, puts nothing in the store."""
    from router.artifact import default_model_path

    return (
        f"adopt a router this release ships (`tiergate models adopt {default_model_path()} "
        f"--store {root}`) and promote the version it prints (`tiergate models promote VERSION`)"
    )


def store_version(settings: Any) -> str | None:
    """The model store version the settings serve, or None (no store, or none promoted)."""
    return None if settings.model_store is None else ModelStore(settings.model_store).current()


def configured_model_path(settings: Any) -> Path:
    """The classifier the settings serve: the model store's current version when
    ``model_store`` is set and names one, else ``classifier_path``, else the shipped default.
    The proxy and the commands that read "the configured router" resolve it here alike."""
    from router.artifact import default_model_path

    if (current := store_version(settings)) is not None:
        return ModelStore(settings.model_store).path(current)
    path: Path = settings.classifier_path or default_model_path()
    return path


def built_on(settings: Any, version: str | None, scorer: Any) -> str:
    """The model ``scorer`` is built on, as ``tiergate models list`` names it: for one loaded
    from the store's ``version``, that version's row (router-v9 for a profile relearnt over
    it); else the scorer's own name."""
    if settings.model_store is not None and version is not None:
        rows = ModelStore(settings.model_store).listing()
        if model := next((r["model"] for r in rows if r["version"] == version), None):
            return str(model)
    return str(scorer.version)


async def watch_model_store(
    gateway: Any,
    settings: Any,
    loader: Callable[[Path], Any] = default_loader,
    serving: str | None = None,
    on_swap: Callable[[str, Any], None] | None = None,
) -> None:
    """Poll the store's pointer and swap ``gateway.scorer`` when it names a new version.

    ``serving`` is the version the gateway's scorer was loaded from, if any: an adopted
    version's model keeps its own name (router-v9 as v0001), so the scorer's name cannot say.
    The artifact loads (and is trust-checked) in a worker thread; only a fully loaded scorer is
    swapped in, with one attribute assignment, so no request ever sees a half-built one. A
    version that fails to load is logged and the serving model stays. ``on_swap(version,
    scorer)`` is called after each swap (the proxy names the new model in ``/metrics``).
    """
    if settings.model_store is None or settings.model_watch_s <= 0:
        return
    from router.artifact import release_freed_memory

    store = ModelStore(settings.model_store)
    loaded: str | None = serving or getattr(gateway.scorer, "version", None)
    while True:
        version = None
        try:
            version = store.current()
            if version is not None and version != loaded:
                scorer = await asyncio.to_thread(loader, store.path(version))
                gateway.scorer = scorer
                if on_swap is not None:
                    on_swap(version, scorer)
                release_freed_memory()  # what the swapped-out model held, once collected
                log.info("model %s now serving (was %s)", version, loaded)
                loaded = version
        except Exception:  # a bad version must not stop the watcher; the old model serves on
            log.exception(
                "loading model version %s from %s failed; %s keeps serving",
                version,
                store.root,
                loaded,
            )
            loaded = store.current()
        await asyncio.sleep(settings.model_watch_s)
