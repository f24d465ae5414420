"""The wheel carries what it needs: built from the checkout, installed outside it, served from an
empty folder with no provider key.

Fast and offline: the wheel is built with the project venv's setuptools (no build isolation,
nothing downloaded), and installed with ``--no-deps`` into a fresh venv whose site-packages
reads the project venv's through a ``.pth`` line. That is a fair test of the wheel: the new venv
imports ``router`` from the wheel (asserted below, and PYTHONPATH is cleared), the process runs
in a folder with nothing of the checkout in it, and the only thing borrowed is the third-party
dependencies, at the versions the project venv pins, which is what ``pip install`` would
resolve them to. (A ``.pth`` line adds a folder to ``sys.path`` after the venv's own
site-packages and does not run the ``.pth`` files inside it, so the project venv's editable
install of ``router`` is not picked up either.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import sysconfig
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from router.artifact import DEFAULT_MODEL_NAME, STATIC_MODEL_NAME
from router.capability import DEFAULT_CAPABILITY_NAME
from router.config import BUNDLED_GGUF
from router.embedding import embedding_path
from router.encoder import ENCODER_FILE
from tests.conftest import GGUF, REPO, checkout_files, free_port

pytestmark = pytest.mark.slow  # builds a wheel and a fresh venv

SHIPPED = "router/_shipped"


def _source_tree(dest: Path) -> Path:
    """The files git would commit (tracked or not ignored), copied: what a clean checkout holds."""
    for name in checkout_files():
        src = REPO / name
        if src.is_file() and not src.is_symlink():
            target = dest / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, target)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel built from a copy of the checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = _source_tree(tmp / "src")
    built = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"),
            *("--no-index", "-w", str(tmp / "dist"), str(src)),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    # Needs setuptools >= 70.1 in this venv (the dev extra; `make install` brings it).
    assert built.returncode == 0, built.stderr[-3000:]
    (path,) = (tmp / "dist").glob("tiergate-*.whl")
    return path


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv outside the checkout with the wheel installed (see the module docstring)."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    deps = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    Path(purelib, "tiergate-test-deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "--python", str(python), "install", "-q"),
            *("--no-deps", "--no-index", str(wheel)),
        ],
        check=True,
        capture_output=True,
        # PYTHONPATH would show pip the checkout's router as if it were installed already.
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
    )
    assert (root / "bin" / "tiergate").is_file()
    return root


def _clean_env(home: Path, **extra: str) -> dict[str, str]:
    drop = ("PYTHONPATH", "VIRTUAL_ENV")
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in drop and not k.startswith("TIERGATE_") and not k.endswith("_API_KEY")
    }
    return {**env, "TIERGATE_HOME": str(home), **extra}


def test_wheel_carries_policy_classifier_and_report_but_no_gguf(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    model = f"{SHIPPED}/models/{DEFAULT_MODEL_NAME}"
    for needed in ("metadata.json", "serving.npz", "eval.json"):
        assert f"{model}/{needed}" in names
    # The capability model the classifier reads, with the embedding table its sidecar names
    # (shared by the capability models: the wheel carries it once).
    capability = REPO / "models" / DEFAULT_CAPABILITY_NAME
    for needed in ("metadata.json", "head.npz"):
        assert f"{SHIPPED}/models/{DEFAULT_CAPABILITY_NAME}/{needed}" in names
    entry = json.loads((capability / "metadata.json").read_text())["embedding"]
    table = embedding_path(capability, entry).resolve().relative_to(REPO / "models")
    assert f"{SHIPPED}/models/{table.as_posix()}" in names
    assert len([n for n in names if n.endswith("/embedding.npz")]) == 1
    assert f"{SHIPPED}/policies/default.yaml" in names
    examples = {p.name for p in (REPO / "policies" / "examples").glob("*.yaml")}
    assert {f"{SHIPPED}/policies/examples/{e}" for e in examples} <= names
    profiles = {p.name for p in (REPO / "models" / "profiles").glob("*")}
    assert {f"{SHIPPED}/models/profiles/{p}" for p in profiles} <= names
    assert not [n for n in names if n.endswith(".gguf")]
    # The static-only router the proxy falls back to without the encoder, and not the encoder's
    # 91 MB of weights (`tiergate fetch-model` puts them in TIERGATE_HOME).
    assert f"{SHIPPED}/models/{STATIC_MODEL_NAME}/serving.npz" in names
    assert not [n for n in names if n.endswith(".safetensors")]


@pytest.fixture
def served(venv: Path, tmp_path: Path) -> Iterator[tuple[str, Path, Path]]:
    """``tiergate serve`` from the venv, in an empty folder, no provider key, GGUF in HOME."""
    home, cwd = tmp_path / "home", tmp_path / "empty"
    cwd.mkdir()
    # Where `tiergate fetch-model` puts the bundled model by default.
    (home / "models").mkdir(parents=True)
    (home / "models" / BUNDLED_GGUF).symlink_to(GGUF)
    (home / "models" / ENCODER_FILE).symlink_to(REPO / "models" / ENCODER_FILE)
    port = free_port()
    env = _clean_env(home, TIERGATE_PORT=str(port), TIERGATE_N_THREADS="1")
    log = tmp_path / "serve.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [str(venv / "bin" / "tiergate"), "serve"], cwd=cwd, env=env, stdout=out, stderr=out
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        yield url, home, cwd
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, log.read_text()
    assert "Traceback" not in log.read_text()


@pytest.mark.gguf
def test_installed_wheel_serves_from_an_empty_folder(
    served: tuple[str, Path, Path], venv: Path
) -> None:
    url, home, cwd = served
    ready = httpx.get(url + "/readyz").json()
    assert ready["ready"] is True
    assert ready["scorer"] == {
        "name": "learned",
        "version": DEFAULT_MODEL_NAME,
        "loaded": DEFAULT_MODEL_NAME,
    }
    assert ready["no_closed"]["serves"] == "local"
    assert "_shipped" in ready["policy"]["path"]
    body = {"model": "auto", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
    response = httpx.post(url + "/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    assert response.headers["x-tiergate-model-version"] == DEFAULT_MODEL_NAME
    assert response.headers["x-tiergate-tier"] == "local"
    request_id = response.headers["x-request-id"]
    assert httpx.get(url + "/metrics").status_code == 200  # the default install has /metrics
    dashboard = httpx.get(url + "/dashboard/data").json()
    assert dashboard["evaluation"]["model_version"] == DEFAULT_MODEL_NAME
    # The router the server runs is the wheel's, not the checkout's.
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import router; print(router.__file__)"],
        cwd=cwd,
        env=_clean_env(home),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(venv)) and str(REPO) not in where
    # Outcomes go to TIERGATE_HOME, nothing to the folder it was started in.
    deadline = time.monotonic() + 30
    db = home / "tiergate.db"
    while True:
        if db.is_file():
            with sqlite3.connect(db) as conn:
                rows = conn.execute(
                    "SELECT id FROM outcomes WHERE id = ?", (request_id,)
                ).fetchall()
            if rows:
                break
        assert time.monotonic() < deadline, "no outcome record under TIERGATE_HOME"
        time.sleep(0.2)
    assert list(cwd.iterdir()) == []


def test_installed_cli_finds_the_shipped_policy_and_its_records(venv: Path, tmp_path: Path) -> None:
    env = _clean_env(tmp_path / "home")
    tiergate = str(venv / "bin" / "tiergate")
    check = subprocess.run(
        [tiergate, "policy", "check"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stderr
    assert "default.yaml: ok" in check.stdout
    # No GGUF in this HOME: one line that names the command to fetch it, no traceback.
    serve = subprocess.run(
        [tiergate, "serve"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert serve.returncode == 2
    assert serve.stderr.count("\n") == 1 and "tiergate fetch-model" in serve.stderr
    report = json.loads(
        subprocess.run(
            [str(venv / "bin" / "python"), "-c", _EVAL_PATH],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    # Neither the GGUF nor the encoder's weights are in this HOME: the default router needs the
    # encoder, so the static-only router stands in for it.
    assert report["model_version"] == STATIC_MODEL_NAME


_EVAL_PATH = (
    "import json, sys; from router.artifact import default_model_path; "
    "sys.stdout.write((default_model_path() / 'eval.json').read_text())"
)
