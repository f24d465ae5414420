"""Where Tiergate finds what it ships, and where it keeps what it writes.

**Shipped files** (read-only): the default policy and its examples (``policies/``), the shipped
classifier with its evaluation report, and local-model profiles (``models/``). The repository
keeps them at its top level; a wheel carries them as package data under ``router/_shipped/``
(the mapping is in pyproject.toml; GGUF files are not carried). :func:`shipped` finds them in
either place, relative to this package, so ``tiergate serve`` works from any folder.

**Mutable state** (the SQLite outcome store, the Redis outage journal, the model store, the
fetched GGUF) lives in one data directory: ``TIERGATE_HOME``, by default the platform's user data
directory (:func:`user_data_dir`). ``make run`` points it at the repository's ``var/``.

Nothing happens at import.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

APP_NAME = "tiergate"
ENV_HOME = "TIERGATE_HOME"
#: The folder of a wheel's package data, inside the package.
SHIPPED_DIR = "_shipped"


def shipped_root() -> Path:
    """The folder that holds ``policies/`` and ``models/``: the package's ``_shipped/`` in an
    installed wheel, else the source checkout this package was imported from."""
    package = Path(__file__).resolve().parent
    bundled = package / SHIPPED_DIR
    return bundled if bundled.is_dir() else package.parent


def shipped(*parts: str) -> Path:
    """A shipped file or folder, e.g. ``shipped("policies", "default.yaml")``."""
    return shipped_root().joinpath(*parts)


def base_data_dir() -> Path | None:
    """The folder of the base routing files ``tiergate retrain`` refits on, by default: the
    ``shared/data`` folder beside the source checkout this package was imported from (the
    repository's ``../shared/data``, where the benchmarks and studies read them too), found from
    the package as :func:`shipped` finds its files, so from any working directory. None in an
    installed wheel: it has no checkout and carries none of them (``--base`` names the folder)."""
    package = Path(__file__).resolve().parent
    if (package / SHIPPED_DIR).is_dir():
        return None
    return package.parent.parent / "shared" / "data"


def default_policy_path() -> Path:
    """The shipped default policy."""
    return shipped("policies", "default.yaml")


def user_data_dir(environ: Mapping[str, str] | None = None, platform: str | None = None) -> Path:
    """The platform's per-user data directory for Tiergate.

    Linux and other Unix: ``$XDG_DATA_HOME/tiergate`` when that is an absolute path (the XDG
    Base Directory rule), else ``~/.local/share/tiergate``. macOS: ``~/Library/Application
    Support/tiergate``. Windows: ``%LOCALAPPDATA%\\tiergate``.
    """
    env = os.environ if environ is None else environ
    platform = sys.platform if platform is None else platform
    home = Path(env.get("HOME") or Path.home())
    if platform == "win32":
        base = Path(env.get("LOCALAPPDATA") or home / "AppData" / "Local")
    elif platform == "darwin":
        base = home / "Library" / "Application Support"
    else:
        xdg = env.get("XDG_DATA_HOME", "")
        base = Path(xdg) if xdg and Path(xdg).is_absolute() else home / ".local" / "share"
    return base / APP_NAME


def tiergate_home(environ: Mapping[str, str] | None = None) -> Path:
    """The data directory: ``TIERGATE_HOME``, else :func:`user_data_dir`."""
    env = os.environ if environ is None else environ
    value = env.get(ENV_HOME)
    return Path(value) if value else user_data_dir(env)
