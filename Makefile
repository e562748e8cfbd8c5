# make demo: the main job on a fresh machine.  make test: the test suite.  Both create .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; a looser pin would pull a multi-GB CUDA build on this machine.
TORCH_PIN ?= torch==2.13.0

.PHONY: venv demo test test-fast test-slow bench bench-tofu clean

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

# Every test that starts no process (the e2e ones do: tests/test_tiers.py checks the marks) and is not
# marked slow, on two processes (pytest-xdist) that steal work from each other (measured faster than
# --dist load or loadfile here). Compiled and assertion-rewritten modules are kept in __pycache__
# (git-ignored) even where the environment sets PYTHONDONTWRITEBYTECODE: each process then starts
# ~4 s sooner from the second run on.
test-fast: venv
	PYTHONDONTWRITEBYTECODE= $(BIN)/python -m pytest -m "not e2e and not slow" -n 2 --dist worksteal

# What test-fast leaves out (the TOFU benchmark, schemathesis's fuzzing, the repeats and variants of
# in-process pipelines it samples: README, "Development"); make test runs them too.
test-slow: venv
	$(BIN)/python -m pytest -m "slow and not e2e"

bench: venv
	$(BIN)/python bench/server_memory.py
	$(BIN)/python bench/lease_concurrency.py

# The TOFU quality benchmark (issue 10): base/target/retain CPU models built once (cached in .cache/tofu-cpu),
# then 7 methods × {baseline, PUM at m = 4, 2 and κ = 0, 0.01, 0.1} × 3 seeds on forget01 and forget10, in
# priority order, one process per split. Runs already in saves/bench/quality/results.json are kept, so an
# interrupted run resumes; bench/results/tofu_quality_cpu.{json,md,png} are copied from it at the end.
bench-tofu: venv
	$(BIN)/pip install --quiet -e ".[test,bench]"
	$(BIN)/python bench/tofu_bench.py --splits forget10 --out saves/bench/quality & \
	  $(BIN)/python bench/tofu_bench.py --splits forget01 --out saves/bench/quality; wait
	$(BIN)/python bench/tofu_bench.py --report-only --out saves/bench/quality
	cp saves/bench/quality/results.json bench/results/tofu_quality_cpu.json
	sed "s/(quality.png)/(tofu_quality_cpu.png)/" saves/bench/quality/report.md > bench/results/tofu_quality_cpu.md
	cp saves/bench/quality/quality.png bench/results/tofu_quality_cpu.png

clean:
	rm -rf $(VENV) saves/demo .pytest_cache
