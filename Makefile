# The two set-up commands of the README:
#   make demo   create .venv if absent, install WronAI (CPU torch first), run the offline QLoRA demo
#   make test   the same install, then the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
# Exact versions (what CI runs) live in constraints.txt; torch's pin is read from there too.
CONSTRAINTS ?= constraints.txt
TORCH_SPEC ?= $(shell grep -m1 '^torch==' $(CONSTRAINTS))

.PHONY: demo test install lint typecheck docs clean

install: $(VENV)/.wronai-installed

$(VENV)/.wronai-installed: pyproject.toml $(CONSTRAINTS)
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# torch first, pinned to the CPU build: an unpinned torch would pull a multi-GB CUDA build.
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[dev]"
	@touch $@

demo: install
	$(BIN)/wronai train configs/offline_demo.yaml --overwrite

test: install
	$(BIN)/pytest -q

lint: install
	$(BIN)/ruff check src tests scripts examples benchmarks
	$(BIN)/ruff format --check src tests scripts examples benchmarks

typecheck: install
	$(BIN)/mypy

docs: install
	$(BIN)/wronai config-docs --out docs/configuration.md

clean:
	rm -rf runs .cache .pytest_cache
