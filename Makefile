# Two commands: `make demo` and `make test`. Each creates .venv on first use (pip, pinned by
# constraints.txt) and then runs. PYTHON must be 3.10+ (3.11 uses the torch wheel cached on our machines).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xa-installed
PYTEST_ARGS ?=
# pytest-xdist workers: each test runs on one thread (tests/conftest.py), so two workers use both cores of
# our 2-core machines (14 -> 8 minutes); 0 runs the suite in this process.
TEST_WORKERS ?= 2

.PHONY: demo test lint format venv clean-venv

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	@touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

demo: $(STAMP)
	$(PY) -m xa_lightning.demo

clean-venv:
	rm -rf $(VENV)
