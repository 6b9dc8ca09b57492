# soupsearch: `make demo` runs the demo search, `make test` runs the tests.
# Both create .venv and install the package with its dependencies when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RAY_PORT ?= 6390
RAY_DASHBOARD_PORT ?= 8265
CONFIG ?= configs/demo.yaml

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/soupsearch demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --timeout=900 tests

bench: $(STAMP)
	$(BIN)/python bench/merge.py

clean:
	rm -rf runs mlflow.db mlruns mlartifacts .pytest_cache
