# Two entry points: `make demo` and `make test`. Both create .venv on first use.
# `make docs` builds the documentation site into site/ (`make test` builds it too, --strict).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
# silences Material for MkDocs' end-of-life banner (docs/development.md, "Documentation")
export NO_MKDOCS_2_WARNING := 1

.PHONY: demo test docs bench venv clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[flower,test,docs,export]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/iopfl demo --out runs/demo

# not --quiet: it hides the very warnings --strict turns into a failed build
docs: $(STAMP)
	$(BIN)/mkdocs build --strict --site-dir site

# Lint, format check and type check first (seconds), then the docs, then the suite on two workers (the
# CI machine's two cores); --dist loadfile keeps each test file on one worker, so a module-scoped fixture
# (a Flower deployment, a trained run) is built once.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(MAKE) docs
	$(BIN)/python -m pytest -n 2 --dist loadfile -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_routing.py

clean:
	rm -rf $(VENV) runs site .pytest_cache .mypy_cache .ruff_cache
