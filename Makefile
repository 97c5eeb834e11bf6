# The two set-up commands of the README are `make demo` and `make test`; both install .venv first
# (scripts/install.sh, one pip resolve) when it is missing or pyproject.toml changed.
VENV ?= .venv
export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-slow test-all lint bench

$(VENV)/.installed: pyproject.toml scripts/install.sh
	bash scripts/install.sh

install: $(VENV)/.installed

# Real benchmark copies (<dir>/<name>/test.jsonl) for the demo's MATH-500 column, if a folder is given or found.
BENCHMARK_DIR ?= $(wildcard ../shared/data)

demo: install        ## the full pipeline on the embedded default (offline, CPU)
	REDI_BENCHMARK_DIR="$${REDI_BENCHMARK_DIR:-$(BENCHMARK_DIR)}" $(VENV)/bin/redi demo

test: install        ## the default test run (CI): everything not marked slow
	$(VENV)/bin/pytest

test-slow: install   ## the slow tier: vLLM end-to-end, real server, big must-show checks
	$(VENV)/bin/pytest -m slow

test-all: install
	$(VENV)/bin/pytest -m "slow or not slow"

lint: install
	$(VENV)/bin/ruff check redi flows tasks tests benchmarks deployments

bench: install       ## every benchmark script (figures go to docs/benchmarks/)
	for b in benchmarks/bench_*.py; do $(VENV)/bin/python $$b || exit 1; done
