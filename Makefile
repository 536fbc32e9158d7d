# fedesm: make demo (federated run on real GPSite ATP data, tiny model), make test (install + full suite).
# On a CPU machine torch is pinned to a CPU build before anything else is installed, so
# no package pulls a multi-GB CUDA build. GPU users: `make install TORCH=` keeps the torch they have.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
DEMO_DIR ?= demo_out

.PHONY: help install test test-fast demo experiments-cpu jobs bench poc helm-check chart-tools clean

help:
	@echo "make demo      run the FRA-LoRA federated demo (GPSite ATP real data, tiny ESM-2, 2 sites, CPU)"
	@echo "make test      install everything into $(VENV) and run the whole test suite"
	@echo "make test-fast unit tests only (no simulator / network runs)"
	@echo "make experiments-cpu  the paper's experiments at CPU scale (3 seeds, ~1.5-2 h on 2 cores), report in experiments_out/cpu"
	@echo "make jobs      export the job bundles (configuration only) to jobs_export/"
	@echo "make bench     run the benchmarks, write bench/results.json"
	@echo "make poc       bring up a local provisioned network (server + 2 sites)"
	@echo "make helm-check lint, render, validate (k8s 1.30) and checkov-scan the Helm charts"
	@echo "make install   create $(VENV) with fedesm and its dependencies"

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -n "$(TORCH)" ] && ! $(PY) -c "import torch" 2>/dev/null; then \
		echo "installing $(TORCH) first"; $(PY) -m pip install -q "$(TORCH)"; fi
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

test: install chart-tools
	$(PY) -m pytest -q

chart-tools:
	bash scripts/install_helm_tools.sh

helm-check: install chart-tools
	$(PY) -m pytest -q tests/integration/test_helm_charts.py

test-fast: install
	$(PY) -m pytest -q -m "not slow"

demo: install
	$(VENV)/bin/fedesm demo --out $(DEMO_DIR)

experiments-cpu: install
	$(VENV)/bin/fedesm experiment run cpu --out experiments_out/cpu

jobs: install
	$(VENV)/bin/fedesm job export --out jobs_export

bench: install
	$(PY) bench/run_bench.py --out bench/results.json

clean:
	rm -rf $(DEMO_DIR) jobs_export .pytest_cache $(POC_DIR)

POC_DIR ?= poc_workspace
poc: install
	$(VENV)/bin/fedesm poc up --workspace $(POC_DIR)
