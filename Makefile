# Every target installs what it needs into .venv first; `make serve` and `make test` work on a fresh machine.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
export SHARDSERVE_HOME ?= $(HOME)/.cache/shardserve

.PHONY: install model serve test test-slow soak fuzz bench lint clean deploy-tools

KERNEL_SOURCES := setup.py $(wildcard app/kernels/csrc/*)

$(STAMP): pyproject.toml $(KERNEL_SOURCES)
	$(PYTHON) -m venv $(VENV)
	# the CPU wheel of torch lies on disk; a looser spec would download a CUDA build of several GB
	$(PY) -m pip install torch==2.13.0 setuptools wheel ninja
	# --no-build-isolation: the C++ kernels (app/kernels/csrc) compile against this torch
	$(PY) -m pip install --no-build-isolation -e '.[dev]'
	$(PY) -c "from app.kernels import describe; print('shardserve compute path:', describe('auto'))"
	# the playground test drives a real headless Chromium; playwright cannot download one here
	command -v chromium || (apt-get update && apt-get install -y chromium) || true
	touch $(STAMP)

install: $(STAMP)

model: install
	$(VENV)/bin/shardserve download

serve: model
	$(VENV)/bin/shardserve serve

# tests/deploy/test_deploy.py checks the deployment files with the operators' own tools: hadolint and
# kubernetes-validate come with the dev extras, docker-compose and promtool (package prometheus)
# from Debian. --no-install-recommends keeps the Docker engine and node-exporter out. Failing
# here is not fatal: those tests then skip, saying which tool is missing.
deploy-tools: install
	@command -v docker-compose >/dev/null && command -v promtool >/dev/null || \
	  (apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
	    docker-compose prometheus) || \
	  echo "deploy-tools: docker-compose/promtool not installed; their checks in tests/deploy/test_deploy.py will skip"

test: model deploy-tools
	$(VENV)/bin/pytest

test-slow: model
	$(VENV)/bin/pytest -m slow

# The long robustness runs; RELIABILITY.md records their latest results and commands.
# make soak [SOAK_MINUTES=10]: the long overload and disconnect tests (256 clients against 16 seats
# and a queue of 64; 2 x 1000 vanishing streams), then mixed load against a real `shardserve serve`
# with 300 idle and half-open loopback connections held beside it after the first minute.
SOAK_MINUTES ?= 10
soak: model
	SHARDSERVE_LONG=1 $(VENV)/bin/pytest tests/e2e/test_robustness.py -k "clients or storm"
	$(PY) -m tests.support.soak --minutes $(SOAK_MINUTES)

# make fuzz [FUZZ_EXAMPLES=500]: schemathesis cases per API operation (make test runs 100).
FUZZ_EXAMPLES ?= 500
fuzz: model
	SHARDSERVE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV)/bin/pytest -s tests/e2e/test_api_fuzz.py

# make bench [PEERS=all|llama|vllm|naive|none] [QUICK=1]: kernels, engine, then the serve workloads
# against shardserve and each peer (set up once in its own venv under .bench/), written into
# BENCHMARKS.md between the bench markers, charts in docs/bench/. Each table goes to .bench/results
# first and is shown when its bench ends; progress bars and logs go to the terminal as they run.
PEERS ?= all
BENCH_RESULTS := .bench/results

bench: model
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
