# Every target installs what it needs into .venv first; `make serve` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export SHARDSERVE_HOME ?= $(HOME)/.cache/shardserve

.PHONY: install model serve test test-slow bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# the CPU wheel of torch lies on disk; a looser spec would download a CUDA build of several GB
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

model: install
	$(VENV)/bin/shardserve download

serve: model
	$(VENV)/bin/shardserve serve

test: model
	$(VENV)/bin/pytest

test-slow: model
	$(VENV)/bin/pytest -m slow

bench: model
	$(VENV)/bin/shardserve bench kernels

lint: install
	$(VENV)/bin/ruff check app tests
	$(VENV)/bin/ruff format --check app tests

clean:
	rm -rf $(VENV) build *.egg-info
