# rbac-gateway — every target creates .venv and installs the pinned dependencies when missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help venv run test test-unit test-integration lint clean

help:  ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[test,lint]'
	touch $@

venv: $(STAMP)  ## create .venv with the pinned dependencies

run: $(STAMP)  ## start the backend (127.0.0.1:8081) and the gateway (127.0.0.1:8080); Ctrl-C stops both
	$(PY) scripts/run_stack.py

test: $(STAMP)  ## run the whole test suite (unit + integration against real processes)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-unit: $(STAMP)  ## fast in-process tests only
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

test-integration: $(STAMP)  ## tests against real processes (or GATEWAY_URL when set)
	$(PY) -m pytest -q tests/integration $(PYTEST_ARGS)

lint: $(STAMP)  ## ruff (lint + format check), mypy --strict on gateway/, and check every shipped policy
	$(VENV)/bin/ruff check gateway inventory_backend tests scripts bench
	$(VENV)/bin/ruff format --check gateway inventory_backend tests scripts bench
	$(VENV)/bin/mypy --strict gateway
	$(PY) -m gateway check rbac.yaml
	$(PY) -m gateway check deploy/kubernetes/rbac.yaml

clean:  ## remove the venv, caches and the local database
	rm -rf $(VENV) .pytest_cache .hypothesis data *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +

# Fragments for the compose stack and the benchmark live beside this file.
-include mk/*.mk
