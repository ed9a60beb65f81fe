# Set-up-and-run commands. Each target creates (or reuses) .venv and installs what it needs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.ftte-installed
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q
export FLWR_TELEMETRY_ENABLED := 0
export RAY_USAGE_STATS_ENABLED := 0
# the install compiles privacy/_native.c (optional in pyproject.toml, so a machine without a C
# compiler still installs); here a missing extension fails tests/privacy/test_native.py
export FTTE_REQUIRE_NATIVE := 1


.PHONY: demo demo-secagg test test-all bench bench-all compare-flower install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, so nothing later resolves a CUDA build.
$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -c constraints.txt torch==2.13.0
	$(PIP) install -c constraints.txt -e ".[test,flower,http,ray]"
	touch $(STAMP)

install: $(STAMP)

# The default task (MNIST, cnn28, 100 devices, 90% stragglers, DP and secure aggregation),
# every strategy to the common horizon, with the configured learning rates (--no-tune keeps
# it within about 10 minutes on 2 cores; `ftte compare` without it tunes each strategy's
# rates on another seed first, see BENCHMARKS.md).
demo: $(STAMP)
	$(BIN)/ftte compare --out runs/compare --no-tune

test: $(STAMP)
	$(BIN)/pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/pytest -q bench -m "not slow" --benchmark-enable --benchmark-json=bench-results.json

bench-all: $(STAMP)
	$(BIN)/pytest -q bench --benchmark-enable --benchmark-json=bench-results.json

demo-secagg: $(STAMP)
	$(BIN)/ftte bench secagg --clients 10 --dim 100000 --dropout 0.1 --json

compare-flower: $(STAMP)
	$(BIN)/ftte bench secagg --clients 10 --dim 1000000 --dropout 0.1 --compare flower --json

clean:
	rm -rf $(VENV) build *.egg-info
