# soupsearch: `make demo` runs the demo search, `make test` runs the tests.
# Both create .venv and install the package with its dependencies when needed.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RAY_PORT ?= 6390
RAY_DASHBOARD_PORT ?= 8265
CONFIG ?= configs/demo.yaml

RAY_TEMP ?= /tmp/soupsearch-ray
ARGS ?=
export RAY_AUTH_MODE ?= token

.PHONY: install demo demo-multitask demo-text test bench clean cluster-up cluster-down submit

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/soupsearch demo

# Multi-task merging on the offline demo: builds runs/mt-sweep when it is missing (under
# a minute on 2 cores), then runs configs/multitask.yaml.
demo-multitask: $(STAMP)
	@test -f runs/mt-sweep/manifest.json || $(BIN)/soupsearch sweep multitask --out runs/mt-sweep
	$(BIN)/soupsearch run configs/multitask.yaml

demo-text: $(STAMP)
	@test -f runs/text-sweep/manifest.json || $(BIN)/soupsearch sweep text --out runs/text-sweep
	$(BIN)/soupsearch run configs/text.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q -ra --timeout=900 -n 2 --dist loadgroup tests

bench: $(STAMP)
	$(BIN)/python bench/merge.py
	$(BIN)/python bench/scaling.py
	$(BIN)/python bench/e2e.py
	$(BIN)/python bench/sharding.py
	$(BIN)/python bench/quality.py
	$(BIN)/python bench/data.py

# A real local cluster on loopback: a head and one worker node (`ray start` processes).
cluster-up: $(STAMP)
	$(BIN)/soupsearch cluster up --temp-dir $(RAY_TEMP) --port $(RAY_PORT) --dashboard-port $(RAY_DASHBOARD_PORT)

cluster-down:
	$(BIN)/soupsearch cluster down --temp-dir $(RAY_TEMP)

# Submit a search as a Ray job and follow its logs. Relative paths in the config resolve
# against this directory (root=...), so the job writes to the same mlflow.db as `make demo`.
submit: $(STAMP)
	@test -f runs/demo-sweep/manifest.json || $(BIN)/soupsearch sweep demo --out runs/demo-sweep
	PATH=$(CURDIR)/$(BIN):$$PATH $(BIN)/ray job submit --address http://127.0.0.1:$(RAY_DASHBOARD_PORT) \
	  --working-dir . --runtime-env-json '{"excludes": [".venv", ".git", "runs", "mlruns", "mlartifacts", "*.db", "__pycache__"]}' \
	  -- python -m soupsearch.jobs $(CONFIG) --set root=$(CURDIR) $(ARGS)

clean:
	rm -rf runs mlflow.db .mlflow.db.lock mlruns mlartifacts .pytest_cache
