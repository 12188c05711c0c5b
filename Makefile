# One command sets up and runs the demo, one sets up and runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck unit bench clean

# The distribution was called `reconciler` before it became rtc-segment-reconciler;
# a venv made before then drops it, so one distribution owns the `reconciler` script.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	if $(BIN)/python -m pip show --quiet reconciler >/dev/null 2>&1; then \
	  $(BIN)/python -m pip uninstall --quiet --yes reconciler; fi
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The daemon on the sample tree against an in-process emulator; Ctrl-C stops it.
# The emulator starts fresh every time, so the demo's state store does too.
# DEMO_ARGS go to `reconciler run`, e.g. make demo DEMO_ARGS="--health-port 9200".
DEMO_ARGS ?=
demo: $(STAMP)
	rm -f .reconciler/demo-state.db .reconciler/demo-state.db-wal .reconciler/demo-state.db-shm
	$(BIN)/reconciler run desired --emulator --state .reconciler/demo-state.db $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check reconciler tests bench
	$(BIN)/ruff format --check reconciler tests bench

typecheck: $(STAMP)
	$(BIN)/mypy

# Four workers: most tests wait on real subprocesses, sockets and clocks, not the CPU.
TEST_WORKERS ?= 4
unit: $(STAMP)
	$(BIN)/pytest -q -n $(TEST_WORKERS)

test: lint typecheck unit

clean:
	rm -rf $(VENV) .reconciler .mypy_cache .ruff_cache .pytest_cache
