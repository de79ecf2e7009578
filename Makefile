# The two commands of the README: `make demo` and `make test`. Both create/reuse .venv and install with the pins
# that work on the project machines (constraints.txt); torch is pinned in the same pip command so that pip keeps the
# CPU build instead of pulling a CUDA one.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
PIP_QUIET := 2>&1 | grep -v -e "is ignored: it is neither" -e "^$$" || true

.PHONY: install demo test test-fast lint bench clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "installing mergeflow and its pinned dependencies into $(VENV) (first time: a few minutes)"
	@set -o pipefail; $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt torch==2.13.0 -e ".[all,dev]" $(PIP_QUIET)
	@$(PY) -c "import mergeflow, torch, lm_eval, prefect, mlflow, mergekit" || (echo "install failed" && exit 1)
	@rm -f $(VENV)/.installed-*; touch $(STAMP)

install: $(STAMP)

# The demo flow on Prefect's ephemeral API, registering into mlflow.db / mlartifacts/ in the project folder.
demo: install
	$(PY) -m flows.demo

# The suite on TEST_WORKERS processes (pytest-xdist), a test module per worker at a time, so module and session
# fixtures are built once per worker; the zoos are shared between workers (tests/conftest.py).
TEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile

lint: install
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/merge_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
