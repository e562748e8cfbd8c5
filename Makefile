# make demo: the main job on a fresh machine.  make test: the test suite.  Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; a looser pin would pull a multi-GB CUDA build on this machine.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test test-fast bench clean

venv: $(BIN)/pum

$(BIN)/pum: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "$(TORCH_PIN)"
	$(BIN)/pip install --quiet -e ".[test]"
	touch $(BIN)/pum

demo: venv
	$(BIN)/pum demo

test: venv
	$(BIN)/python -m pytest

test-fast: venv
	$(BIN)/python -m pytest -m "not e2e"

bench: venv
	$(BIN)/python bench/server_memory.py

clean:
	rm -rf $(VENV) saves/demo .pytest_cache
