# `make train` and `make test` each create .venv when missing and install moetrain into it.
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp
WORKDIR ?= runs/tiny-$(shell date +%Y%m%d-%H%M%S)
# Tests see 8 CPU devices, so every mesh of up to 8 devices runs on one machine; one pytest
# worker per core (on 2 cores this halves the wall time of the suite), each taking whole test
# files, so a file's module fixtures and cached results are computed once, not once per worker.
TEST_ENV := XLA_FLAGS=--xla_force_host_platform_device_count=8 TF_CPP_MIN_LOG_LEVEL=2

.PHONY: train test install clean

install: $(STAMP)

$(STAMP): setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

train: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(VENV)/bin/python -m moetrain.train --config configs/tiny.py --workdir $(WORKDIR)
	$(VENV)/bin/python tools/plot_metrics.py $(WORKDIR)

test: $(STAMP)
	$(TEST_ENV) $(VENV)/bin/python -m pytest -q -n auto --dist loadfile tests

clean:
	rm -rf $(VENV) runs
