# Setup and the two quickstart commands. Everything lives in .venv and installs through requirements/cpu.lock, the
# exact versions the test suite passed with; CPU hosts get the CPU build of torch first, so no CUDA wheels arrive.
# Refresh the lock with `make lock`: it installs the newest releases in .venv-latest, runs the tests there, and only
# if they pass writes what that venv holds into the lock.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements/cpu.lock
LATEST := .venv-latest
INSTALLED := $(VENV)/.installed
TORCH ?= $(shell grep -m1 '^torch==' $(LOCK))
UNIT_AND_RECIPES := -m "not gpu and not slurm and not heavy"
export REQUIREMENT_NAMES := from scaling.environment import supported_requirements as r; \
	print(*(x.name for x in r() if x.name != "torch"))

.PHONY: setup setup-gpu run test test-fast test-latest lock system-deps lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(INSTALLED)  ## CPU host: torch's CPU build, then the package with dev + dicom extras, all from the lock

# Installed once per change of the lock or pyproject.toml (the package itself is editable), so `make run` and
# `make test` start at once; `make -B setup` reinstalls.
$(INSTALLED): $(BIN)/python $(LOCK) pyproject.toml
	$(BIN)/pip install -q -c $(LOCK) "$(TORCH)"
	$(BIN)/pip install -q -c $(LOCK) -e ".[dev,dicom]"
	touch $@

setup-gpu: $(BIN)/python  ## CUDA host: the default (CUDA) build of the locked torch, then the package from the lock
	$(BIN)/pip install -q "$(firstword $(subst +, ,$(TORCH)))"
	grep -v '^torch==' $(LOCK) > $(VENV)/gpu-constraints.txt
	$(BIN)/pip install -q -c $(VENV)/gpu-constraints.txt -e ".[dev,dicom]"
	touch $(INSTALLED)  # `make run` / `make test` keep this CUDA build

run: setup  ## the default job: instruction-tune the embedded model on synthetic data, evaluate, report
	$(BIN)/accelerate launch --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
		recipes/instruct.py

system-deps:  ## Debian packages some tests need (root only; those tests skip without them): slurm-wlm + munge for the
	@# launch/ tests, a Java runtime for the COCO caption tokeniser
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		missing=""; command -v slurmctld >/dev/null 2>&1 || missing="slurm-wlm munge"; \
		command -v java >/dev/null 2>&1 || missing="$$missing default-jre-headless"; \
		[ -z "$$missing" ] || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing \
			>/dev/null) || echo "could not install $$missing; the tests that need them will skip"; \
	else echo "not root or no apt-get; the slurm and COCO-tokeniser tests will skip"; fi

test: setup system-deps  ## the whole suite except GPU tests and the heavy ones (pytest -m heavy runs those)
	$(BIN)/python -m pytest -q -m "not gpu and not heavy"

test-fast: setup  ## unit tests only
	$(BIN)/python -m pytest -q -m "not gpu and not slow and not distributed and not slurm"

# The newest release of every requirement, ignoring the lock and pyproject's upper bounds (the version check is
# skipped, since those bounds are what is being tested); torch stays the locked CPU build unless TORCH= is given.
test-latest:  ## unit + recipe tiers on the newest releases, in .venv-latest
	rm -rf $(LATEST) && $(PYTHON) -m venv $(LATEST) && $(LATEST)/bin/pip install -q --upgrade pip
	$(LATEST)/bin/pip install -q "$(TORCH)"
	$(LATEST)/bin/pip install -q -e ".[dev,dicom]"
	$(LATEST)/bin/pip install -q --upgrade $$($(LATEST)/bin/python -c "$$REQUIREMENT_NAMES")
	$(LATEST)/bin/scaling env
	SCALING_SKIP_VERSION_CHECK=1 $(LATEST)/bin/python -m pytest -q $(UNIT_AND_RECIPES)

lock: test-latest  ## write .venv-latest's versions (which just passed the tests) into requirements/cpu.lock
	{ echo "# The exact versions the test suite passed with (make test-latest), written by \`make lock\`."; \
	  echo "# Installed with pip install -c $(LOCK); widen pyproject.toml's upper bounds to match."; \
	  $(LATEST)/bin/pip freeze --exclude-editable | sort -f; } > $(LOCK)

lint:
	$(BIN)/ruff check scaling recipes tests
