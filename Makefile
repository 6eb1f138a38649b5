# The two commands a new user needs: `make train` and `make test` (fresh machine, Python 3.11 + pip).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed-stamp
CONFIG ?= configs/tiny-cpu.yaml

.PHONY: train test test-fast lint venv clean

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

# Everything: pure tests and the multi-process simulated-cluster tests (trainers, servers, a local Ray).
# Whole modules run on TEST_WORKERS pytest-xdist workers (module fixtures such as a shared training run stay
# one per module), the slowest modules first (tests/conftest.py). Much of a cluster test is waiting (Ray and
# process start-up, timeouts under test), so two workers suit a 2-core machine; TEST_WORKERS=0 runs serially.
TEST_WORKERS ?= 2
test: lint
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder --durations=15

# The inner loop: pure, single-process tests only (no spawned trainers, servers or Ray), under 2 minutes.
test-fast: lint
	$(VENV)/bin/python -m pytest -q -m "not cluster and not slow"

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .hypothesis
