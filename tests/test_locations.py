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
    from router.config import BUNDLED_GGUF, Settings

    monkeypatch.setenv("TIERGATE_HOME", str(tmp_path))
    settings = Settings()
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


def test_tiergate_home_names_the_data_folder_else_the_platform_one() -> None:
    assert tiergate_home({"TIERGATE_HOME": "/data", "HOME": "/h"}) == Path("/data")
    assert tiergate_home({"TIERGATE_HOME": "", "HOME": "/h"}) == user_data_dir({"HOME": "/h"})


def test_shipped_files_are_found_beside_the_package() -> None:
    assert default_policy_path() == shipped("policies", "default.yaml")
    assert default_policy_path().is_file()
    assert (shipped_root() / "models").is_dir()
