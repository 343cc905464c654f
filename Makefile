# Two entry points: `make demo` (set up, run the built-in default) and `make test` (set up, lint, test).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench clean

$(BIN)/l3: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $(BIN)/l3

setup: $(BIN)/l3

demo: setup
	$(BIN)/l3 simulate --out out/demo

lint: setup
	$(BIN)/ruff check src tests bench

test: lint
	$(BIN)/pytest

bench: setup
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .hypothesis
