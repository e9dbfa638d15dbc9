# usclip developer commands. `make demo` and `make test` install into .venv first when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.usclip-installed
export HF_HUB_OFFLINE ?= 1

.PHONY: install test test-all lint format demo smoke bench mutants clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install usclip with the dev extra

# `make test` runs the default suite on PYTEST_WORKERS pytest-xdist processes, one file per process at a time (module
# fixtures are built once); `make test PYTEST_WORKERS=0` runs it in this process, as plain `python -m pytest` does.
PYTEST_WORKERS ?= 2

test: $(STAMP)  ## the default test suite (no slow tests), on 2 processes
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

test-all: $(STAMP)  ## every test, slow ones included
	$(BIN)/python -m pytest -m ""

lint: $(STAMP)  ## ruff and mypy
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

demo: $(STAMP)  ## train and test the demo segmentation model on synthetic ultrasound (CPU, a few minutes)
	$(BIN)/python -m usclip.demo

smoke: $(STAMP)  ## one fast_dev_run of the CLI on the demo config
	$(BIN)/usclip fit --config configs/demo.yaml --trainer.fast_dev_run=true

mutants: $(STAMP)  ## mutation run: named one-line bugs the default suite must catch (docs/testing.md; not in CI)
	$(BIN)/python bench/mutants.py $(MUTANTS_ARGS)

bench: $(STAMP)  ## benchmarks (figures go to docs/benchmarks.md)
	@for f in bench/*.py; do [ "$$f" = bench/mutants.py ] && continue; echo "== $$f"; $(BIN)/python $$f || exit 1; done

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache .mypy_cache .coverage htmlcov
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
