# The two commands: `make demo` runs the main job, `make test` runs every test. Both set up what they need first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup system venv demo test lint unit integration e2e bench clean

setup: system venv

system:
	@scripts/setup-system.sh

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "setup: installing the project and its test tools into $(VENV)"
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -m pip install -q -e '.[test]'
	@touch $(STAMP)

demo: setup
	@$(BIN)/clustermesh demo

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test: setup lint
	@scripts/run-tests.sh

bench: setup
	$(BIN)/python bench/kvstore.py --quick

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
