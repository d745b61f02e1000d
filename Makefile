# The two commands of the README. Each sets itself up on first use (scripts/setup.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: setup train test lint
setup:
	@VENV=$(VENV) bash scripts/setup.sh

train: setup  ## the default job: `make train ARGS="algo=raft iterations=3"` passes Hydra overrides
	$(PY) train.py $(ARGS)

test: setup  ## the test suite (CPU; gpu/vllm tests skip themselves)
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(VENV)/bin/ruff check dibs tests train.py
