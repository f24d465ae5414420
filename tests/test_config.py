"""Deployment settings: overrides beat ``TIERGATE_*`` variables, which beat the config file;
files not named land in the data directory; a bad value is one readable ConfigError."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from router.config import Settings, load_settings
from router.errors import ConfigError


@pytest.fixture
def config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "tiergate.yaml"
    path.write_text("PORT: 9001\nlog_level: warning\nn_threads: 3\n")
    # load_settings sets TIERGATE_CONFIG; monkeypatch restores it after the test.
    monkeypatch.setenv("TIERGATE_CONFIG", str(path))
    monkeypatch.setenv("TIERGATE_HOME", str(tmp_path / "home"))
    return path


def test_overrides_then_environment_then_file(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIERGATE_LOG_LEVEL", "error")
    settings = load_settings(config_file, n_threads=None, port=9002)
    assert settings.port == 9002  # an override beats the file
    assert settings.log_level == "error"  # the environment beats the file
    assert settings.n_threads == 3  # the file beats the default; None is no override


def test_unnamed_files_land_in_the_data_directory(config_file: Path, tmp_path: Path) -> None:
    settings = load_settings(config_file, sqlite_path=tmp_path / "mine.db")
    assert settings.sqlite_path == tmp_path / "mine.db"
    assert settings.model_store == tmp_path / "home" / "model-store"


def test_a_bad_value_or_file_is_one_readable_config_error(
    config_file: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="port"):
        load_settings(config_file, port=70000)
    listed = tmp_path / "list.yaml"
    listed.write_text("- port\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(listed)
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    assert _file_error(tmp_path, "prot: 9001\nencoder_path: /w.safetensors\n") == (
        "invalid settings: prot: no such setting (`tiergate serve --help` lists them); "
        "did you mean 'port'?; encoder_path: no such setting (`tiergate serve --help` lists "
        "them)"
    )
    # The environment's names, pasted into the file.
    assert _file_error(tmp_path, "TIERGATE_N_CTX: 2048\n") == (
        "invalid settings: tiergate_n_ctx: no such setting: a file key has no TIERGATE_ "
        "prefix; did you mean 'n_ctx'?"
    )


def _file_error(tmp_path: Path, text: str) -> str:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(path)
    return str(err.value)


def test_an_empty_path_variable_means_the_default(
    config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TIERGATE_CLASSIFIER_PATH", "  ")
    assert load_settings(config_file).classifier_path is None


def test_every_tiergate_variable_is_documented_and_every_documented_one_exists() -> None:
    repo = Path(__file__).resolve().parents[1]
    read = {f"TIERGATE_{name.upper()}" for name in Settings.model_fields}
    for module in (repo / "router").rglob("*.py"):
        read |= set(re.findall(r"TIERGATE_[A-Z0-9_]*[A-Z0-9]", module.read_text(encoding="utf-8")))
    pages = [repo / "README.md", repo / "SECURITY.md", *sorted((repo / "docs").glob("*.md"))]
    text = "\n".join(page.read_text(encoding="utf-8") for page in pages)
    assert sorted(v for v in read if not re.search(rf"\b{v}\b", text)) == []
    # A variable the docs name as a setting (not a shell variable of an example, `$NAME`).
    named = set(re.findall(r"(?<![$\w])(TIERGATE_[A-Z0-9_]*[A-Z0-9])\b", text))
    assert sorted(named - read) == []


def test_every_test_the_docs_cite_is_in_the_file_they_name() -> None:
    # `tests/test_x.py::test_y` or `test_x.py::test_y`, and `::test_z` for the same file as the
    # last one named before it on the page: a reader who runs what a guarantee cites must find it.
    repo = Path(__file__).resolve().parents[1]
    pages = [repo / "README.md", repo / "SECURITY.md", *sorted((repo / "docs").glob("*.md"))]
    wrong = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        named: str | None = None
        for match in re.finditer(r"(?:tests/)?(test_\w+\.py)?::(test_\w+)", text):
            named = match.group(1) or named
            where = f"{page.name}:{text.count(chr(10), 0, match.start()) + 1}"
            source = repo / "tests" / named if named else None
            if source is None or not source.is_file():
                wrong.append(f"{where}: {match.group(2)} names no test file")
            elif not re.search(rf"^(async )?def {match.group(2)}\(", source.read_text(), re.M):
                wrong.append(f"{where}: {match.group(2)} is not in tests/{named}")
    assert wrong == []


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://:S3CRETPW@127.0.0.1:notaport/0", "its port is not a number"),
        ("http://:S3CRETPW@cache/", "must start with redis://, rediss:// or unix://"),
        ("redis://:S3CRETPW@cache:6379/zero", "its path must be a database number"),
        ("redis://:123#S3CRETPW@cache:6379/0", "it holds a '#'"),
    ],
)
def test_a_bad_redis_url_is_a_config_error_without_its_password(
    url: str, problem: str, monkeypatch: pytest.MonkeyPatch, config_file: Path
) -> None:
    # It was a traceback from the first connection, at start-up.
    monkeypatch.setenv("TIERGATE_REDIS_URL", url)
    with pytest.raises(ConfigError, match=problem) as err:
        load_settings(config_file)
    assert "S3CRETPW" not in str(err.value)


@pytest.mark.parametrize("url", ["", "  "])
def test_an_empty_redis_url_means_none(
    url: str, monkeypatch: pytest.MonkeyPatch, config_file: Path
) -> None:
    monkeypatch.setenv("TIERGATE_REDIS_URL", url)
    assert load_settings(config_file).redis_url is None


def test_a_redis_password_is_kept_once_and_never_repeated(
    monkeypatch: pytest.MonkeyPatch, config_file: Path
) -> None:
    # TIERGATE_REDIS_PASSWORD joins the URL percent-encoded; a URL with its own password too,
    # or no URL at all, is refused without showing either.
    monkeypatch.setenv("TIERGATE_REDIS_PASSWORD", "S3CRET/PW")
    monkeypatch.setenv("TIERGATE_REDIS_URL", "rediss://default@cache:6380/1")
    assert load_settings(config_file).redis_url == "rediss://default:S3CRET%2FPW@cache:6380/1"
    for url, problem in (
        ("redis://:OLDPW@cache:6379/0", "redis_url carries a password and redis_password is set"),
        ("", "redis_password is set but redis_url is not"),
    ):
        monkeypatch.setenv("TIERGATE_REDIS_URL", url)
        with pytest.raises(ConfigError, match=problem) as err:
            load_settings(config_file)
        assert "S3CRET" not in str(err.value) and "OLDPW" not in str(err.value)
