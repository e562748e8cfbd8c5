# make demo: the main job on a fresh machine.  make test: the test suite.  Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; a looser pin would pull a multi-GB CUDA build on this machine.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test test-fast bench bench-tofu clean

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

# Every test that starts no process (the e2e ones do: tests/test_tiers.py checks the marks), on two
# processes (pytest-xdist): about 85 s of CPU in all.
test-fast: venv
	$(BIN)/python -m pytest -m "not e2e" -n 2

bench: venv
	$(BIN)/python bench/server_memory.py
	$(BIN)/python bench/lease_concurrency.py

# The TOFU forget10 head-to-head: builds the CPU models once (68 min here, then cached), then runs
# 7 methods × {baseline, PUM κ = 0 (the no-noise control), 0.01, 0.1}: about 110 min on one core.
# Runs already in saves/bench/tofu/results.json are kept, so an interrupted run resumes.
bench-tofu: venv
	$(BIN)/pip install --quiet -e ".[test,bench]"
	$(BIN)/python bench/tofu_bench.py --threads 1 --forget-split forget10 --kappas 0 0.01 0.1

clean:
	rm -rf $(VENV) saves/demo .pytest_cache
