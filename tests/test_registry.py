"""The versioned model store: adopting, promoting and rolling back move only the pointer, and
the watcher swaps the serving model only once a version has loaded."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import router.artifact
from router.errors import ConfigError
from router.registry import ModelStore, configured_model_path, watch_model_store


def _artifact(tmp_path: Path, name: str, parent: str | None = None) -> Path:
    d = tmp_path / name
    d.mkdir()
    meta = {"created_at": name, "lineage": {"parent": parent, "gate": {"decision": "promote"}}}
    (d / "metadata.json").write_text(json.dumps(meta))
    return d


def _unchecked(path: Path) -> None:
    """A loader that takes these sidecar-only stand-ins (the real one loads an artifact)."""


def test_the_first_adopted_version_serves_and_later_ones_wait(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    assert store.current() is None and store.version_ids() == []
    assert store.adopt(_artifact(tmp_path, "a"), loader=_unchecked) == "v0001"
    assert store.adopt(_artifact(tmp_path, "b", parent="v0001"), loader=_unchecked) == "v0002"
    assert store.current() == "v0001"
    listing = {row["version"]: row for row in store.listing()}
    assert listing["v0001"]["current"] and not listing["v0002"]["current"]
    assert listing["v0002"]["parent"] == "v0001" and listing["v0002"]["gate"] == "promote"


def test_adopting_what_the_proxy_could_not_load_is_refused_and_leaves_nothing(
    tmp_path: Path,
) -> None:
    from router.artifact import shipped
    from router.errors import ArtifactError

    store = ModelStore(tmp_path / "store")
    plain = tmp_path / "plain"
    plain.mkdir()
    for folder in (plain, tmp_path / "missing"):
        with pytest.raises(ArtifactError, match="not a Tiergate model"):
            store.adopt(folder)
    assert store.current() is None and not store.root.exists()
    assert store.adopt(shipped("models", "router-v6")) == "v0001"  # the real loader
    assert [r["model"] for r in store.listing()] == ["router-v6"]


def test_models_adopt_says_whether_the_version_now_serves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The first version adopted into a store becomes current, and running proxies swap to it;
    the command said only "stored as v0001", the same as for a version that waits."""
    from router.artifact import shipped
    from router.cli import main

    at = ["--store", str(tmp_path / "store")]
    assert main(["models", "adopt", str(shipped("models", "router-v6")), *at]) == 0
    assert "v0001 is now current (the store had none): proxies serve it" in capsys.readouterr().out
    assert main(["models", "adopt", str(shipped("models", "router-v6")), *at]) == 0
    out = capsys.readouterr().out
    assert "v0001 stays current: `tiergate models promote v0002` serves it" in out


def test_a_version_with_a_broken_sidecar_is_listed_not_fatal(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    store.adopt(_artifact(tmp_path, "a"), loader=_unchecked)
    store.adopt(_artifact(tmp_path, "b"), loader=_unchecked)
    (store.path("v0002") / "metadata.json").unlink()  # emptied by hand, say
    listing = {row["version"]: row for row in store.listing()}
    assert listing["v0001"]["error"] is None and listing["v0001"]["current"]
    assert listing["v0002"]["error"] == "unreadable sidecar (FileNotFoundError)"


def test_list_shows_each_versions_id_and_the_model_it_is_built_on(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The docs say `models list` names each version's model; a retrained version's sidecar
    names only its own id, so the model column repeated the version column. It now shows the
    model a version is built on, and --json also the name its scores carry."""
    from router.cli import main

    store = ModelStore(tmp_path / "store")
    for name, parent in (("router-v9", None), ("v0002", "v0001"), ("v0003", "v0002")):
        artifact = _artifact(tmp_path, name, parent)
        meta = json.loads((artifact / "metadata.json").read_text())
        (artifact / "metadata.json").write_text(json.dumps({**meta, "version": name}))
        store.adopt(artifact, loader=_unchecked)
    assert main(["models", "list", "--store", str(store.root)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:2] == ["version", "model"]
    assert [line.lstrip("* ").split()[:2] for line in table[1:4]] == [
        ["v0001", "router-v9"],
        ["v0002", "router-v9"],
        ["v0003", "router-v9"],
    ]
    assert main(["models", "list", "--store", str(store.root), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["version"], r["model"], r["model_version"]) for r in rows] == [
        ("v0001", "router-v9", "router-v9"),
        ("v0002", "router-v9", "v0002"),
        ("v0003", "router-v9", "v0003"),
    ]


def test_the_configured_model_is_the_stores_current_then_the_path_then_the_shipped_one(
    tmp_path: Path,
) -> None:
    """The proxy and `tiergate profile --from-labels` resolve "the configured router" alike."""
    from router.artifact import default_model_path

    pinned = tmp_path / "pinned"
    settings = SimpleNamespace(model_store=None, classifier_path=None)
    assert configured_model_path(settings) == default_model_path()
    settings.classifier_path = pinned
    assert configured_model_path(settings) == pinned
    settings.model_store = tmp_path / "store"  # a store with no version yet: the path serves
    assert configured_model_path(settings) == pinned
    ModelStore(settings.model_store).adopt(_artifact(tmp_path, "a"), loader=_unchecked)
    assert configured_model_path(settings) == settings.model_store / "versions" / "v0001"


def test_promote_and_rollback_move_the_pointer_and_keep_history(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    store.adopt(_artifact(tmp_path, "a"), loader=_unchecked)
    store.adopt(_artifact(tmp_path, "b"), loader=_unchecked)
    store.promote("v0002", reason="better")
    assert store.current() == "v0002"
    assert store.rollback() == "v0001" and store.current() == "v0001"
    actions = [(e["action"], e["version"], e["previous"]) for e in store.history()]
    assert actions == [
        ("promote", "v0001", None),
        ("promote", "v0002", "v0001"),
        ("rollback", "v0001", "v0002"),
    ]
    assert (store.path("v0002") / "metadata.json").is_file()  # versions are never removed


def test_rolling_back_again_steps_further_back(tmp_path: Path) -> None:
    """Two bad promotions in a row are undone by two rollbacks; the second never re-serves
    the version the first one rolled back from."""
    store = ModelStore(tmp_path / "store")
    for name in ("a", "b", "c"):
        store.adopt(_artifact(tmp_path, name), loader=_unchecked)
    store.promote("v0002")
    store.promote("v0003")
    assert store.rollback() == "v0002"
    assert store.rollback() == "v0001" and store.current() == "v0001"
    with pytest.raises(ConfigError, match="nothing to roll back"):
        store.rollback()
    store.promote("v0003")  # a promotion after rollbacks rolls back to where it came from
    assert store.rollback() == "v0001"


def test_a_version_the_gate_refused_is_promoted_only_with_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import router.registry
    from router.cli import main

    monkeypatch.setattr(router.registry, "default_loader", _unchecked)  # the CLI's: stand-ins

    store = ModelStore(tmp_path / "store")
    store.adopt(_artifact(tmp_path, "a"), loader=_unchecked)
    refused = _artifact(tmp_path, "b", parent="v0001")
    meta = json.loads((refused / "metadata.json").read_text())
    meta["lineage"]["gate"] = {"decision": "refused", "reasons": ["worse on held-out traffic"]}
    (refused / "metadata.json").write_text(json.dumps(meta))
    store.adopt(refused, loader=_unchecked)
    with pytest.raises(ConfigError, match=r"refused by the retrain gate \(worse on held-out"):
        store.promote("v0002")
    assert store.current() == "v0001"
    assert main(["models", "promote", "v0002", "--store", str(store.root)]) == 2
    assert "--force" in capsys.readouterr().err and store.current() == "v0001"
    assert main(["models", "promote", "v0002", "--force", "--store", str(store.root)]) == 0
    assert store.current() == "v0002"


def test_promote_and_rollback_refuse_a_version_this_tiergate_cannot_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A version an older Tiergate wrote (another artifact format): pointing the store at it
    would leave every proxy on the old model while `models list` names it, and a proxy that
    restarts would serve the heuristic scorer. The command refuses it, `--force` or not."""
    from router.cli import main

    store = ModelStore(tmp_path / "store")
    store.adopt(router.artifact.default_model_path())
    old = tmp_path / "old"
    shutil.copytree(router.artifact.default_model_path(), old)
    meta = json.loads((old / "metadata.json").read_text())
    (old / "metadata.json").write_text(json.dumps({**meta, "format_version": 0}))
    shutil.copytree(old, store.versions_dir / "v0002")  # as an older release left it
    at = ["--store", str(store.root)]
    for argv in (
        ["models", "promote", "v0002", *at],
        ["models", "promote", "v0002", "--force", *at],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "v0002" in err and "cannot be loaded by this Tiergate" in err, err
        assert "v0001 stays current" in err and store.current() == "v0001"
    store.promote("v0002")  # the pointer moved by hand (no loader): rollback then checks
    assert main(["models", "promote", "v0001", *at]) == 0
    store.promote("v0002")
    assert main(["models", "rollback", *at]) == 0 and store.current() == "v0001"
    assert main(["models", "rollback", *at]) == 2
    assert "v0002 in" in capsys.readouterr().err and store.current() == "v0001"


def test_unknown_versions_and_an_empty_store_are_refused(tmp_path: Path) -> None:
    store = ModelStore(tmp_path / "store")
    with pytest.raises(ConfigError):
        store.load_current()
    store.adopt(_artifact(tmp_path, "a"), loader=_unchecked)
    for bad in ("v0009", "../a", "latest"):
        with pytest.raises(ConfigError):
            store.promote(bad)
    with pytest.raises(ConfigError, match="nothing to roll back"):
        store.rollback()
    assert store.load_current(lambda p: p.name) == ("v0001", "v0001")


def test_the_watcher_swaps_in_a_promoted_version_but_never_a_broken_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    released: list[bool] = []
    monkeypatch.setattr(
        router.artifact, "release_freed_memory", lambda: released.append(True) or True
    )
    store = ModelStore(tmp_path / "store")
    store.adopt(_artifact(tmp_path, "a"), loader=_unchecked)
    store.adopt(_artifact(tmp_path, "b"), loader=_unchecked)
    store.adopt(_artifact(tmp_path, "c"), loader=_unchecked)
    gateway = SimpleNamespace(scorer=SimpleNamespace(version="v0001"))
    settings = SimpleNamespace(model_store=store.root, model_watch_s=0.01)

    tried: list[str] = []

    def loader(path: Path) -> Any:
        tried.append(path.name)
        if path.name == "v0003":
            raise ValueError("tampered")
        return SimpleNamespace(version=path.name)

    async def serving_after(version: str) -> str:
        task = asyncio.create_task(watch_model_store(gateway, settings, loader))
        try:
            store.promote(version)
            for _ in range(1000):
                await asyncio.sleep(0.01)
                if version in tried and version in ("v0003", gateway.scorer.version):
                    break
            return str(gateway.scorer.version)
        finally:
            task.cancel()

    assert asyncio.run(serving_after("v0002")) == "v0002"
    assert asyncio.run(serving_after("v0003")) == "v0002"  # the broken version never serves
    failed = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert failed == [f"loading model version v0003 from {store.root} failed; v0002 keeps serving"]
    assert asyncio.run(serving_after("v0001")) == "v0001"
    assert len(released) == 2  # after each swap, what the old model held goes back
