# The two commands of the README. Each sets itself up on first use (scripts/setup.sh).
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

GRID ?= raft_vs_raftpp
SWEEP ?= multirun/$(GRID)/$(shell date +%Y-%m-%d_%H-%M-%S)
SWEEP := $(SWEEP)
REPORT ?= $(SWEEP)/report
REPORT_ARGS ?=  # more keys of the report (conf/report.yaml): `python -m dibs.report --help`

.PHONY: setup train test lint grid report lock
setup:
	@VENV=$(VENV) bash scripts/setup.sh

train: setup  ## the default job: `make train ARGS="algo=raft iterations=3"` passes Hydra overrides
	$(PY) train.py $(ARGS)

test: setup  ## the test suite (CPU; gpu/vllm tests skip themselves)
	$(PY) -m pytest -q $(ARGS)

lock:  ## re-resolve every dependency afresh and pin it in requirements-lock.txt (then commit it)
	bash scripts/lock.sh

lint: setup
	$(VENV)/bin/ruff check dibs tests train.py

grid: setup  ## a grid end to end: `make grid GRID=raft_vs_raftpp [ARGS="seed=0,1"]`, then its report
	$(PY) train.py -m +grid=$(GRID) hydra.sweep.dir=$(SWEEP) $(ARGS)
	$(PY) -m dibs.report sweep=$(SWEEP) out=$(REPORT) $(REPORT_ARGS)

report: setup  ## a finished grid's report: `make report SWEEP=multirun/<grid>/<time> [REPORT_ARGS="target=0.15"]`
	@if [ "$(origin SWEEP)" = "file" ]; then echo "make report: give the grid folder, SWEEP=multirun/<grid>/<time>"; exit 2; fi
	$(PY) -m dibs.report sweep=$(SWEEP) out=$(REPORT) $(REPORT_ARGS)

.PHONY: bundle gpu-check
bundle:  ## wheels for a GPU machine with no index (docs/gpu.md): `make bundle [PYTHON_VERSION=3.11 PLATFORM=... TAR=1]`
	bash scripts/offline_bundle.sh

gpu-check:  ## on that GPU machine, offline: install from the bundle, GPU tests, gpu_phases, a short train; one JSON
	@if [ -z "$(BUNDLE)" ]; then echo "make gpu-check: give the bundle, BUNDLE=offline-bundle (docs/gpu.md)"; exit 2; fi
	bash scripts/gpu_check.sh "$(BUNDLE)"
