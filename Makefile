# `make train` and `make test` each create .venv when missing and install moetrain into it:
# training needs the runtime alone, the tests add the test extra (torch, transformers, ...).
PYTHON ?= python3
VENV := .venv
# One stamp per install, each redone when setup.py changes; `make test` after `make train`
# adds just the extra.
RUNTIME_STAMP := $(VENV)/.runtime-stamp
TEST_STAMP := $(VENV)/.test-stamp
# A fixed workdir: `make train` again resumes from its newest checkpoint.
WORKDIR ?= runs/tiny
# More flags for moetrain.train, e.g. ARGS='--config.train.steps=50'.
ARGS ?=
# Tests see 8 CPU devices, so every mesh of up to 8 devices runs on one machine; one pytest
# worker per core (on 2 cores this halves the wall time of the suite), each taking whole test
# files, so a file's module fixtures and cached results are computed once, not once per worker.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 TF_CPP_MIN_LOG_LEVEL=2

.PHONY: train test install clean

install: $(RUNTIME_STAMP)

# Order-only: a newer venv does not make the installs stale.
$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip

# --no-compile: Python compiles the modules it imports on first use; compiling every installed
# module up front (torch's and transformers' thousands) took 40 s of the test install's 70.
$(RUNTIME_STAMP): setup.py | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet --no-compile -e .
	touch $@

# The test install includes the runtime, so it renews both stamps.
$(TEST_STAMP): setup.py | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install --quiet --no-compile -e '.[test]'
	touch $(RUNTIME_STAMP) $@

train: $(RUNTIME_STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(VENV)/bin/python -m moetrain.train --config configs/tiny.py \
	  --workdir $(WORKDIR) $(ARGS)
	$(VENV)/bin/python tools/plot_metrics.py $(WORKDIR)

test: $(TEST_STAMP)
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q -n auto --dist loadfile tests

clean:
	rm -rf $(VENV) runs
