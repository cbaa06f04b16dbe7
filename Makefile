# Two commands for a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180

.PHONY: run test setup bench lint clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=24"
	$(PY) -m pip install -e ".[mlops,dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	rm -rf runs/elpv-mono
	$(VENV)/bin/tracebank fit --data elpv:mono --out runs/elpv-mono/bank
	$(VENV)/bin/tracebank evaluate runs/elpv-mono/bank --data elpv:mono
	$(VENV)/bin/tracebank predict runs/elpv-mono/bank --data elpv:mono --count 6 --out runs/elpv-mono/heatmaps

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m pipeline.bench

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline flows serving tests
	$(VENV)/bin/mypy pipeline

clean:
	rm -rf $(VENV) build out runs
