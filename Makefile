# One-command entry points: `make demo` (set up + main job), `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch; on a CUDA machine use e.g. TORCH_SPEC="torch==2.13.0" with your index.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup setup-test lint test test-fast demo
# pip byte-compiles on one core; compileall -j 0 on every core (85 s against 57 s for the install on 2 cores).
# Left to first imports instead, the compiling lands on the first Ray start, which then timed out in the tests.
PIP := $(BIN)/pip install -q --disable-pip-version-check --no-compile
# Like pip, it skips files that do not compile (a few test data files in some packages).
COMPILE := $(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check --upgrade pip
	$(PIP) "$(TORCH_SPEC)" -e .
	$(COMPILE)
	touch $@

# The tests' extras (pytest, lm-eval's reference harness) only where the tests run, not for the main job.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[test]"
	$(COMPILE)
	touch $@

# Workers: the slow end-to-end tests (run first) mostly wait on processes and timeouts, so 4 workers
# keep 2 cores busy.
TEST_WORKERS ?= 4
lint: setup-test
	$(BIN)/ruff check fl_offsite strategies benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal

test-fast: setup-test
	$(BIN)/python -m pytest -m "not slow"

demo: setup
	$(BIN)/fl-offsite demo
