# Two commands for a fresh machine: `make run` and `make test` (see README.md).
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 180
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1

.PHONY: run test setup bench lint mutate clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=24"
	$(PY) -m pip install -e ".[mlops,dev]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	test -d data/train || $(VENV)/bin/tracebank import elpv:mono
	$(PY) -m flows.train

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m benchmarks.accuracy

lint: $(STAMP)
	$(VENV)/bin/ruff check pipeline flows serving benchmarks tests
	$(VENV)/bin/mypy pipeline

# Mutation testing of the modules in pyproject.toml's [tool.mutmut] only_mutate (docs/mutation.md):
# not part of `make test`. One worker, one BLAS thread: the machine is shared.
$(VENV)/.mutmut-installed: $(STAMP)
	$(PY) -m pip install -e ".[mlops,dev,mutation]"
	touch $@

mutate: $(VENV)/.mutmut-installed
	rm -rf mutants
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children 1
	$(PY) -m benchmarks.mutation

clean:
	rm -rf $(VENV) build out runs mutants
