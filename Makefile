# Setup and the two quickstart commands. Everything lives in .venv; CPU hosts get the CPU build of torch first so
# that installing the package never pulls CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

.PHONY: setup setup-gpu run test test-fast slurm-deps lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python  ## CPU host: torch CPU build, then the package with dev + dicom extras
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev,dicom]"

setup-gpu: $(BIN)/python  ## CUDA host: the default (CUDA) torch wheel, then the package
	$(BIN)/pip install -q "torch>=2.4"
	$(BIN)/pip install -q -e ".[dev,dicom]"

run: setup  ## the default job: instruction-tune the embedded model on synthetic data, evaluate, report
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		recipes/instruct.py

slurm-deps:  ## Debian's slurm-wlm + munge for the launch/ tests (root only; the tests skip without them)
	@if command -v slurmctld >/dev/null 2>&1; then echo "slurm present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge >/dev/null) \
		|| echo "slurm-wlm could not be installed; the slurm tests will skip"; \
	else echo "not root or no apt-get; the slurm tests will skip"; fi

test: setup slurm-deps  ## the whole suite except GPU tests
	$(BIN)/python -m pytest -q -m "not gpu"

test-fast: setup  ## unit tests only
	$(BIN)/python -m pytest -q -m "not gpu and not slow and not distributed and not slurm"

lint:
	$(BIN)/ruff check scaling recipes tests
