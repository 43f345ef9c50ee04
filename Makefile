# Two entry points: `make demo` and `make test` (`make test-quick`: the tier without Ray, servers or e5
# training). All set up .venv on first use.
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
RS      := $(VENV)/bin/raysparse
# Where the XTREME task data lives (layout described in README). Override on your machine.
export RAYSPARSE_DATA ?= $(abspath ../shared/data/xtreme)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup model demo lint-imports test test-quick bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first (pinned), so nothing pulls a CUDA build behind our back.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

# Converts the embedded multilingual-e5-small once into the cache (never into the repo).
model: setup
	$(RS) fetch-model

# The main job: a real search (several algorithms, both settings, a Dynamic Sparsification trial).
demo: model
	$(RS) search experiments/searches/demo.yaml

# The import contracts in .importlinter: layers (no module imports from a layer above it) and more.
lint-imports: setup
	$(VENV)/bin/lint-imports

test: model
	$(VENV)/bin/lint-imports && $(PY) -m pytest -q tests

# Tests not marked slow (tests/conftest.py marks those that start Ray, MLflow, a notebook or a browser,
# or train e5): structure, selection, specs, loaders, metrics, bad input, offline reports.
test-quick: model
	$(VENV)/bin/lint-imports && $(PY) -m pytest -q -m "not slow" tests

bench: model
	$(PY) experiments/bench/shrink_speedup.py

clean:
	rm -rf outputs .pytest_cache .import_linter_cache
