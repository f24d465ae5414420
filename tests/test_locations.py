"""Where Tiergate keeps what it writes and finds what it ships."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.locations import (
    default_policy_path,
    shipped,
    shipped_root,
    tiergate_home,
    user_data_dir,
)


def test_state_lives_in_tiergate_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from router import config
    from router.config import BUNDLED_GGUF, Settings

    monkeypatch.setenv("TIERGATE_HOME", str(tmp_path))
    monkeypatch.setattr(config, "shipped", lambda *parts: tmp_path / "wheel" / Path(*parts))
    settings = Settings()  # as from a wheel, which carries no GGUF
    assert settings.sqlite_path == tmp_path / "tiergate.db"
    assert settings.outcome_journal_path == tmp_path / "outcomes-journal.jsonl"
    assert settings.model_store == tmp_path / "model-store"
    assert settings.local_model_path == tmp_path / "models" / BUNDLED_GGUF
    assert Settings(sqlite_path=Path("x.db")).sqlite_path == Path("x.db")  # named: kept
    home = {"HOME": "/h"}
    assert user_data_dir({**home, "XDG_DATA_HOME": "/x"}, "linux") == Path("/x/tiergate")
    assert user_data_dir({**home, "XDG_DATA_HOME": "rel"}, "linux") == Path(
        "/h/.local/share/tiergate"
    )  # the XDG rule: a relative value is ignored
    assert user_data_dir(home, "darwin") == Path("/h/Library/Application Support/tiergate")
    assert user_data_dir({**home, "LOCALAPPDATA": "C:/L"}, "win32") == Path("C:/L/tiergate")


def test_a_checkout_serves_the_bundled_gguf_that_make_model_put_in_its_models(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In a source checkout the bundled GGUF is read from ``models/`` (where ``make model`` puts
    it), whatever TIERGATE_HOME is, so commands run beside ``make run`` find the model it
    serves; a path that is named still wins, and without the file the data directory's is
    used (where ``tiergate fetch-model`` puts it)."""
    from router import config
    from router.config import BUNDLED_GGUF, Settings

    shipped_models = tmp_path / "checkout" / "models"
    monkeypatch.setattr(config, "shipped", lambda *parts: tmp_path / "checkout" / Path(*parts))
    monkeypatch.setenv("TIERGATE_HOME", str(tmp_path / "home"))
    assert Settings().local_model_path == tmp_path / "home" / "models" / BUNDLED_GGUF
    shipped_models.mkdir(parents=True)
    (shipped_models / BUNDLED_GGUF).write_bytes(b"GGUF")
    assert Settings().local_model_path == shipped_models / BUNDLED_GGUF
    assert Settings(home=tmp_path / "other").local_model_path == shipped_models / BUNDLED_GGUF
    monkeypatch.setenv("TIERGATE_LOCAL_MODEL_PATH", "/models/qwen.gguf")
    assert Settings().local_model_path == Path("/models/qwen.gguf")
    assert Settings(local_model_path=Path("x.gguf")).local_model_path == Path("x.gguf")


def test_tiergate_home_names_the_data_folder_else_the_platform_one() -> None:
    assert tiergate_home({"TIERGATE_HOME": "/data", "HOME": "/h"}) == Path("/data")
    assert tiergate_home({"TIERGATE_HOME": "", "HOME": "/h"}) == user_data_dir({"HOME": "/h"})


def test_shipped_files_are_found_beside_the_package() -> None:
    assert default_policy_path() == shipped("policies", "default.yaml")
    assert default_policy_path().is_file()
    assert (shipped_root() / "models").is_dir()
