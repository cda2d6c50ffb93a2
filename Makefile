# Every target installs what it needs into .venv first; `make serve` and `make test` work on a fresh machine.
# `make serve` (and `make model`) install the runtime dependencies only; `make install`, `make test`
# and the other developer targets add the dev extras (tests, benchmarks, lint), and `make test` the browser.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BASE := $(VENV)/.base-stamp
RUNTIME := $(VENV)/.runtime-stamp
DEV := $(VENV)/.dev-stamp
export SHARDSERVE_HOME ?= $(HOME)/.cache/shardserve

.PHONY: install model serve test test-slow soak fuzz bench lint clean deploy-tools browser

KERNEL_SOURCES := setup.py $(wildcard app/kernels/csrc/*)

# Before anything is downloaded: a Python this package supports, with its venv module (Debian and
# Ubuntu ship that apart, as python3-venv; without it `python3 -m venv` fails half-way, on ensurepip).
$(BASE):
	@command -v $(PYTHON) >/dev/null || { echo "make: $(PYTHON) not found: install Python 3.10 or newer, or set PYTHON=/path/to/python3" >&2; exit 1; }
	@$(PYTHON) -c 'import sys; v = sys.version_info[:2]; sys.exit(0 if v >= (3, 10) else "make: shardserve needs Python 3.10 or newer; $(PYTHON) is %d.%d: set PYTHON=python3.11, say" % v)'
	@$(PYTHON) -c 'import venv, ensurepip' 2>/dev/null || { echo "make: $(PYTHON) has no venv module (or no ensurepip): install it, e.g. apt-get install python3-venv (python3.X-venv for Python 3.X)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	# the CPU wheel of torch lies on disk; a looser spec would download a CUDA build of several GB
	$(PY) -m pip install torch==2.13.0 setuptools wheel ninja
	touch $@

# the runtime: what `serve` needs, the YAML parser of --config and huggingface_hub included
$(RUNTIME): $(BASE) pyproject.toml $(KERNEL_SOURCES)
	# --no-build-isolation: the C++ kernels (app/kernels/csrc) compile against this torch
	$(PY) -m pip install --no-build-isolation -e .
	$(PY) -c "from app.kernels import describe; print('shardserve compute path:', describe('auto'))"
	touch $@

# the dev extras, read from the installed package's metadata so the package is not built twice
$(DEV): $(RUNTIME)
	$(PY) -c 'import importlib.metadata as m; print("\n".join(r.split(";")[0] for r in m.requires("shardserve") if "extra == \"dev\"" in r))' > $(VENV)/dev-requirements.txt
	$(PY) -m pip install -r $(VENV)/dev-requirements.txt
	touch $@

install: $(DEV)

model: $(RUNTIME)
	$(VENV)/bin/shardserve download

serve: model
	$(VENV)/bin/shardserve serve

# the playground test drives a real headless Chromium; playwright cannot download one here
browser:
	@command -v chromium >/dev/null || (apt-get update && apt-get install -y chromium) || \
	  echo "browser: chromium not installed; tests/e2e/test_playground.py will skip"

# tests/deploy/test_deploy.py checks the deployment files with the operators' own tools: hadolint and
# kubernetes-validate come with the dev extras, docker-compose and promtool (package prometheus)
# from Debian. --no-install-recommends keeps the Docker engine and node-exporter out. Failing
# here is not fatal: those tests then skip, saying which tool is missing.
deploy-tools: install
	@command -v docker-compose >/dev/null && command -v promtool >/dev/null || \
	  (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
	    docker-compose prometheus) || \
	  echo "deploy-tools: docker-compose/promtool not installed; their checks in tests/deploy/test_deploy.py will skip"

test: install model deploy-tools browser
	$(VENV)/bin/pytest

test-slow: install model
	$(VENV)/bin/pytest -m slow

# The long robustness runs; RELIABILITY.md records their latest results and commands.
# make soak [SOAK_MINUTES=10]: the long overload and disconnect tests (256 clients against 16 seats
# and a queue of 64; 2 x 1000 vanishing streams), then mixed load against a real `shardserve serve`
# with 300 idle and half-open loopback connections held beside it after the first minute.
SOAK_MINUTES ?= 10
soak: install model
	SHARDSERVE_LONG=1 $(VENV)/bin/pytest tests/e2e/test_robustness.py -k "clients or storm"
	$(PY) -m tests.support.soak --minutes $(SOAK_MINUTES)

# make fuzz [FUZZ_EXAMPLES=500]: schemathesis cases per API operation (make test runs 100).
FUZZ_EXAMPLES ?= 500
fuzz: install model
	SHARDSERVE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest -s tests/e2e/test_api_fuzz.py

# make bench [PEERS=all|llama|vllm|naive|none] [QUICK=1]: kernels, engine, then the serve workloads
# against shardserve and each peer (set up once in its own venv under .bench/), written into
# BENCHMARKS.md between the bench markers, charts in docs/bench/. Each table goes to .bench/results
# first and is shown when its bench ends; progress bars and logs go to the terminal as they run.
PEERS ?= all
BENCH_RESULTS := .bench/results

bench: install model
	@echo "make bench: the full run takes an hour or more (QUICK=1: a few minutes once the peers are set up;"
	@echo "building llama.cpp or installing vLLM the first time adds 15+ minutes each)."
	@mkdir -p $(BENCH_RESULTS)
	$(VENV)/bin/shardserve bench kernels $(if $(QUICK),--batches 1 16 --repeat 3) \
	  --json $(BENCH_RESULTS)/kernels.json > $(BENCH_RESULTS)/kernels.md
	@cat $(BENCH_RESULTS)/kernels.md
	$(VENV)/bin/shardserve bench engine $(if $(QUICK),--concurrency 16) \
	  --json $(BENCH_RESULTS)/engine.json > $(BENCH_RESULTS)/engine.md
	@cat $(BENCH_RESULTS)/engine.md
	$(VENV)/bin/shardserve bench structured $(if $(QUICK),--concurrency 16 --output-len 64) \
	  --json $(BENCH_RESULTS)/structured.json > $(BENCH_RESULTS)/structured.md
	@cat $(BENCH_RESULTS)/structured.md
	$(VENV)/bin/shardserve bench report --peers $(PEERS) $(if $(QUICK),--quick)

lint: install
	$(VENV)/bin/ruff check app tests
	$(VENV)/bin/ruff format --check app tests

clean:
	rm -rf $(VENV) build *.egg-info app/kernels/*.so
