# The two quick-start commands: `make demo` and `make test`. Both create or update .venv first.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
# torch 2.13.0 CPU build; elsewhere set e.g. PIP_TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"
PIP_TORCH ?= torch==2.13.0

.PHONY: venv demo test test-fast test-slow lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(PIP_TORCH)
	$(VENV)/bin/python -m pip install -q -e ".[dev,eval,log]"
	touch $(STAMP)

demo: venv
	$(VENV)/bin/drpruning demo --out runs/demo

# the default suite in two worker processes (docs/benchmarks.md, "Test suite")
DEFAULT_SUITE := $(VENV)/bin/pytest -m "not slow" -q -n 2

# the default suite, then the slow end-to-end tests once, in one process (each loads the real model)
test: venv
	$(VENV)/bin/ruff check src tests bench experiments
	$(DEFAULT_SUITE)
	$(VENV)/bin/pytest -m slow -q --durations=12

test-fast: venv
	$(DEFAULT_SUITE)

lint: venv
	$(VENV)/bin/ruff check src tests bench experiments

clean:
	rm -rf $(VENV) runs .pytest_cache
