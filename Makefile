# One-machine entry points: `make demo` runs the main job, `make test` runs the tests.
VENV ?= .venv
PYTHON ?= python3

.PHONY: setup criu test lint demo dev bench

setup: $(VENV)/.installed criu

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

# Snapshots need CRIU 4; the script installs it from Debian's packages when it
# runs as root on Debian, and otherwise explains what is missing.
criu:
	scripts/install-criu.sh || echo "warning: CRIU 4 is not available; snapshot tests will skip"

test: setup
	scripts/run-tests

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

demo: setup
	$(VENV)/bin/vmflow demo

dev: setup
	$(VENV)/bin/vmflow dev

bench: setup
	$(VENV)/bin/python -m bench
