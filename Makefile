# One-command entry points: `make demo` (set up + main job), `make test` (set up + tests).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch's CPU build: from PyTorch's CPU wheel index where pip reaches it, else from the package index (on Linux a
# multi-GB CUDA build, except on machines with the CPU file at hand, such as this project's). A CUDA build:
#   make setup TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
TORCH_FROM = $(shell $(PYTHON) -c "import urllib.request as r; r.urlopen('$(TORCH_INDEX)/torch/', timeout=5)" \
                 2>/dev/null && echo --extra-index-url $(TORCH_INDEX))
# The exact versions CI passed with (`make lock` writes them); `make setup CONSTRAINTS=` takes the newest allowed.
CONSTRAINTS ?= constraints.txt
PINNED = $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: setup setup-test lint test test-fast demo lock
# uv where pip can install it (13 s against 50 s for pip here), else pip; either with pip's configuration
# (fl_offsite/ops/install.py). Neither byte-compiles: compileall -j 0 does, on every core (pip alone took 85 s).
# Left to first imports instead, the compiling lands on the first Ray start, which then timed out in the tests.
INSTALL := $(PYTHON) -m fl_offsite.ops.install $(VENV)
# Like pip, it skips files that do not compile (a few test data files in some packages).
COMPILE := $(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null || true
setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

# $(1): this package, with the extras wanted. One install and one compile, whichever target asks.
define install
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check $(PINNED) uv || echo "uv could not be installed: installing with pip"
	$(INSTALL) $(TORCH_FROM) $(PINNED) "$(TORCH_SPEC)" -e $(1)
	$(COMPILE)
endef

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(call install,.)
	touch $@

# The tests' extras (pytest, lm-eval's reference harness) only where the tests run, not for the main job.
$(VENV)/.installed-test: pyproject.toml $(CONSTRAINTS)
	$(call install,".[test]")
	touch $(VENV)/.installed $@

# Workers: the slow end-to-end tests (run first) mostly wait on processes and timeouts, so 4 workers
# keep 2 cores busy.
TEST_WORKERS ?= 4
lint: setup-test
	$(BIN)/ruff check fl_offsite strategies benchmarks
	$(BIN)/mypy

# mypy (40 s of CPU on a cold cache) runs beside the suite, which waits on processes for part of its time;
# its report follows the suite's, and either failing fails the target.
test: setup-test
	$(BIN)/ruff check fl_offsite strategies benchmarks
	$(BIN)/mypy > $(VENV)/mypy.log 2>&1 & mypy=$$!; \
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist worksteal; suite=$$?; \
	wait $$mypy; types=$$?; cat $(VENV)/mypy.log; test $$suite -eq 0 -a $$types -eq 0

test-fast: setup-test
	$(BIN)/python -m pytest -m "not slow"

demo: setup
	$(BIN)/fl-offsite demo

# After a green CI run: record the versions it passed with (torch without its build tag, for any index).
lock: setup-test
	{ echo "# The versions \`make test\` passed with in CI (Python 3.11, CPU), written by \`make lock\`."; \
	  $(BIN)/pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/'; } > $(CONSTRAINTS)
