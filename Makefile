# One command sets up and runs the demo, one sets up and runs the whole suite.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Debian's chromium, for the dashboard's headless-browser test; outside the venv
# because apt installs it system-wide, so `make clean` does not drop it.
BROWSER_STAMP := .reconciler/.chromium

.PHONY: demo test lint typecheck unit bench clean browser

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

# Installed here, before pytest starts, so the install never counts against the
# suite's time. Without root or apt-get it says how, and the browser test skips.
$(BROWSER_STAMP):
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "installing chromium for the dashboard's browser test (apt-get)"; \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium; \
	else \
	  echo "chromium is missing and cannot be installed here (needs root and apt-get):" \
	    "the dashboard's browser test will skip; install it with" \
	    "'sudo apt-get install --no-install-recommends chromium'" >&2; \
	fi
	@if command -v chromium >/dev/null 2>&1; then mkdir -p $(@D) && touch $@; fi

browser: $(BROWSER_STAMP)

# promtool checks and unit-tests the alert rules (tests/test_monitoring.py). Only
# the binary is taken out of Debian's prometheus package, into the venv, so no
# service is installed or started. Without apt that one test skips.
$(BIN)/promtool: | $(STAMP)
	@tmp=$$(mktemp -d); \
	if command -v apt-get >/dev/null 2>&1 && (cd "$$tmp" && \
	    { apt-get download prometheus >/dev/null 2>&1 || \
	      { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get download prometheus >/dev/null 2>&1; }; } && \
	    dpkg -x prometheus_*.deb x && install -m 0755 x/usr/bin/promtool $(CURDIR)/$(BIN)/promtool); then \
	  echo "promtool: $$($(BIN)/promtool --version 2>&1 | head -n 1)"; \
	else \
	  echo "promtool could not be installed (needs apt-get): the alert rules' promtool test will skip" >&2; \
	fi; \
	rm -rf "$$tmp"

lint: $(STAMP)
	$(BIN)/ruff check reconciler tests bench
	$(BIN)/ruff format --check reconciler tests bench
	$(BIN)/lint-imports --no-cache

typecheck: $(STAMP)
	$(BIN)/mypy

# Four workers: most tests wait on real subprocesses, sockets and clocks, not the CPU.
TEST_WORKERS ?= 4
unit: $(STAMP) $(BROWSER_STAMP) $(BIN)/promtool
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/pytest -q -n $(TEST_WORKERS)

test: lint typecheck unit

clean:
	rm -rf $(VENV) .reconciler .mypy_cache .ruff_cache .pytest_cache
