# Two commands matter (see README): `make plan` (the main job) and `make test`. Each sets
# up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.arcfab-installed

.PHONY: setup plan demo serve world-model test test-all bench clean

setup: $(STAMP)

# torch first, pinned to the CPU build (an open range would pull a multi-GB CUDA build);
# then the package with its dev extras, editable.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

plan: setup
	$(BIN)/python -m experiments.plan

demo: setup
	$(BIN)/python -m experiments.demo

# mini-dreamzero from nothing: data, every network, DAgger, fidelity (92.0 min measured on 2 cores,
# about 84 projected since the simulator's 2.5x step, not yet run end to end; budget 90).
world-model: setup
	$(BIN)/python -m experiments.build_world_model

# The web service and tree explorer on http://127.0.0.1:8000/ (ARCFAB_TOKEN to require a token).
serve: setup
	$(BIN)/arcfab serve

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

bench: setup
	$(BIN)/python benchmarks/clone_restore.py

clean:
	rm -rf runs outputs multirun .pytest_cache .hypothesis
