"""The local-model profile file: read, written, and refused with located errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from router.errors import ConfigError
from router.profile import (
    CapabilityAccuracy,
    LocalProfile,
    load_profile,
    profile_from_dict,
    wilson_interval,
    write_profile,
)


def _profile() -> LocalProfile:
    return LocalProfile(
        model="tiny",
        source="measured",
        capabilities={
            "math": CapabilityAccuracy(0.1, 0.02, 0.3, 20),
            "chat": CapabilityAccuracy(0.7),
        },
    )


def test_profile_round_trips_through_its_file(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    write_profile(_profile(), path)
    loaded = load_profile(path)
    assert loaded == _profile()
    assert loaded.origin == str(path)


def test_declared_yaml_profile_takes_bare_numbers(tmp_path: Path) -> None:
    path = tmp_path / "llama.yaml"
    path.write_text(
        "format: tiergate-profile\nformat_version: 1\nmodel: llama-3.1-8b\n"
        "source: published\ncapabilities: {math: 0.5, coding: 0.6}\n"
    )
    profile = load_profile(path)
    assert profile.accuracy("math") == 0.5
    # An omitted capability gets the mean of the given ones.
    assert profile.accuracy("chat") == pytest.approx(0.55)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"format": "other"}, "'format'"),
        ({"format_version": 9}, "format_version"),
        ({"capabilities": {"poetry": 0.5}}, "capabilities.poetry: unknown capability"),
        ({"capabilities": {"math": 1.5}}, "capabilities.math: 'accuracy'"),
        ({"capabilities": {"math": {"accuracy": 0.5, "low": 0.6}}}, "interval"),
        ({"source": "guessed"}, "'source'"),
        ({"colour": "red"}, "unknown key"),
    ],
)
def test_bad_profiles_are_refused_naming_the_key(change: dict[str, object], message: str) -> None:
    data = {**_profile().as_dict(), **change}
    with pytest.raises(ConfigError, match=message):
        profile_from_dict(data, origin="p.json")


def test_unreadable_profile_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid profile"):
        load_profile(path)
    with pytest.raises(ConfigError, match="cannot read"):
        load_profile(tmp_path / "missing.json")


def test_wilson_interval_brackets_the_rate() -> None:
    low, high = wilson_interval(3, 20)
    assert 0 < low < 0.15 < high < 0.4
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert json.dumps(_profile().as_dict())  # JSON-ready


def test_the_bundled_profile_is_found_beside_the_classifier_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An installed package (the image) has no models/ of its own: the bundled profile is read
    from profiles/ beside TIERGATE_CLASSIFIER_PATH first."""
    from router.profile import BUNDLED_PROFILES, default_profile, default_profile_path

    (tmp_path / "profiles").mkdir()
    text = "format: tiergate-profile\nformat_version: 1\nmodel: here\ncapabilities: {chat: 0.5}\n"
    (tmp_path / "profiles" / BUNDLED_PROFILES[-1]).write_text(text)
    monkeypatch.setenv("TIERGATE_CLASSIFIER_PATH", str(tmp_path / "router-v4"))
    assert default_profile_path() == tmp_path / "profiles" / BUNDLED_PROFILES[-1]
    assert default_profile().model == "here"
