# sae-mlops: fresh clone -> `make demo` / `make test`.
# torch is pinned at install time by constraints.txt (the local CPU build), not by the package.

VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.sae-mlops-installed

.PHONY: install demo check test clean distclean

install: $(STAMP)

# Re-runs only when the venv is missing or the dependency declarations changed.
$(STAMP): pyproject.toml constraints.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/sae-mlops demo

# Static checks: ruff (lint), mypy (types, on the package), import-linter (layers; MLflow only in tracking).
check: install
	$(VENV)/bin/ruff check sae_mlops tests scripts entrypoints
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# The suite on 3 pytest-xdist workers (many tests wait on subprocesses and servers, so 3 keep
# 2 cores busy); groups and order come from tests/conftest.py (docs/guides/testing.md). Exit code 5 (no
# tests collected) fails like any other.
PYTEST_WORKERS ?= 3
test: install
	$(VENV)/bin/pytest -q -n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder

# Build and cache leftovers only; results (analysis/, mlflow.db, mlruns/) are kept.
clean:
	rm -rf build dist .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Also the virtualenv (the next `make` reinstalls).
distclean: clean
	rm -rf $(VENV)
