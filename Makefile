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

test: docs
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_routing.py

clean:
	rm -rf $(VENV) runs site .pytest_cache
