# Two commands do all set-up on a fresh machine with Python 3.11:
#   make run   - create the venv if needed, install, start the gateway (serve run config.yaml)
#   make test  - the same set-up, then lint and the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install run test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: install
	VENV=$(VENV) ./scripts/run.sh

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: install lint
	$(PY) -m pytest

bench: install
	$(PY) -m bench.passthrough

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
