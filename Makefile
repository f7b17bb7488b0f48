# Set-up is part of every target: a fresh machine needs only `make run` or `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch lies on these machines' disk; elsewhere pip fetches it.
# GPU users: install your own CUDA build of torch into $(VENV) first (see README); it is kept.
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install run test test-fast lint format bench bench-full bench-ab gpu-check clean

# Everything through uv, which resolves and unpacks in parallel (pip takes a
# minute for torch alone). torch comes from the find-links of this machine's pip config, where its
# CPU wheel lies; where pip has no find-links, pip installs torch itself, honouring its own config.
# No bytecode is compiled at install (all of site-packages: ~28 s here). Instead the targets below let Python
# cache the bytecode of what it imports, as it does by default: where PYTHONDONTWRITEBYTECODE is set, every
# process would otherwise compile torch and transformers anew (~6 s each).
PY := env -u PYTHONDONTWRITEBYTECODE $(BIN)/python
FIND_LINKS := $(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null)
ifneq ($(strip $(FIND_LINKS)),)
INSTALL_TORCH = $(BIN)/uv pip install --quiet --python $(BIN)/python \
	$(foreach link,$(FIND_LINKS),--find-links $(link)) $(TORCH)
else
INSTALL_TORCH = $(BIN)/pip install --quiet $(TORCH)
endif

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import uv" 2>/dev/null || $(BIN)/pip install --quiet uv
	$(BIN)/python -c "import torch" 2>/dev/null || $(INSTALL_TORCH)
	$(BIN)/uv pip install --quiet --python $(BIN)/python -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	$(PY) train.py $(ARGS)

# Two pytest workers: many tests wait on subprocesses (accelerate launch, kill and resume).
test: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist worksteal $(PYTEST_ARGS)

test-fast: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q -n 2 --dist worksteal -m "not slow" $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/bench.py --mode short $(ARGS)

bench-full: install
	$(PY) benchmarks/bench.py --mode full $(ARGS)

# Each speed-up of the wing against the defaults, and the whole wing off: 1 epoch, 3 rounds.
bench-ab: install
	$(PY) benchmarks/bench.py --ab "" speedups=off speedups.fast_dropout=false \
		speedups.sparse_embedding_grad=false speedups.first_token_last_layer=false $(ARGS)

# On a CUDA machine, in under 5 minutes: the tests marked gpu, a 1-epoch MRPC run, and this engine against the
# HF Trainer (bf16) on a bert-base-sized encoder (docs/gpu.md). Without CUDA it says so and exits 0.
gpu-check: install
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) benchmarks/gpu_check.py $(ARGS)

lint: install
	$(BIN)/ruff check engine tests train.py predict.py benchmarks hydra_plugins
	$(BIN)/ruff format --check engine tests train.py predict.py benchmarks hydra_plugins

format: install
	$(BIN)/ruff check --fix engine tests train.py predict.py benchmarks hydra_plugins
	$(BIN)/ruff format engine tests train.py predict.py benchmarks hydra_plugins

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
