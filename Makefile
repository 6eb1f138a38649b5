# The two commands a new user needs: `make train` and `make test` (fresh machine, Python 3.11 + pip).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-stamp
CONFIG ?= configs/tiny-cpu.yaml

.PHONY: train test lint venv clean

# (Re)install when the venv is missing or pyproject.toml changed.
$(STAMP): pyproject.toml
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

train: $(STAMP)
	$(VENV)/bin/distca train --config $(CONFIG)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .hypothesis
