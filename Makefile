# Two commands matter (see README): `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.arcfab-installed

.PHONY: setup demo test test-all bench clean

setup: $(STAMP)

# torch first, pinned to the CPU build (an open range would pull a multi-GB CUDA build);
# then the package with its dev extras, editable.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: setup
	$(BIN)/python -m experiments.demo

test: setup
	$(BIN)/python -m pytest -q

test-all: setup
	$(BIN)/python -m pytest -q -m ""

bench: setup
	$(BIN)/python benchmarks/clone_restore.py

clean:
	rm -rf runs outputs multirun .pytest_cache .hypothesis
