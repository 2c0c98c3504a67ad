# sae-mlops: fresh clone -> `make demo` / `make test`.
# Every package (torch: the local CPU build) is pinned by uv.lock; `make install` installs exactly those pins
# with uv (`uv sync --frozen`), `make lock` re-resolves after pyproject.toml changes (then commit uv.lock and
# requirements-lock.txt, the same pins exported for pip: MLproject, conda.yaml, Dockerfile).

VENV ?= .venv
PYTHON ?= python3
STAMP := $(VENV)/.sae-mlops-installed
RUNTIME_STAMP := $(VENV)/.sae-mlops-runtime
# uv itself, pinned, outside .venv (uv sync removes packages the lock does not list).
UV_VERSION := 0.13.9
TOOLS ?= .tools
UV ?= $(TOOLS)/bin/uv
EXTRAS := --extra dev --extra docs
# (with UV=uv, an uv already on PATH is used and nothing is bootstrapped)
UV_DEP := $(if $(filter $(TOOLS)/bin/uv,$(UV)),$(UV),)
export UV_PROJECT_ENVIRONMENT := $(VENV)
export NO_MKDOCS_2_WARNING := 1

.PHONY: install install-runtime demo check test lock lock-check docs docs-serve clean distclean

# install: everything make check / make test need (the dev and docs extras too).
install: $(STAMP)
# install-runtime: what the package itself needs (make demo); --inexact keeps extras already installed.
install-runtime: $(RUNTIME_STAMP)

# (pip --target: no venv to create, about half the time of a venv + pip; uv is one static binary)
$(TOOLS)/bin/uv:
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-warn-script-location --target $(TOOLS) "uv==$(UV_VERSION)"

# Re-runs only when the venv is missing or the lock changed; installs the locked versions, nothing else.
# --compile-bytecode: uv, unlike pip, writes no .pyc files by default; where PYTHONDONTWRITEBYTECODE is
# set (this project's machines, many container images) Python then never writes them either, and every
# process compiles torch, transformers and TransformerLens from source: a demo quick analysis took 11.4 s
# instead of 4.6 s, and the test suite about 70 % more CPU time. Compiling once costs about 20 s here.
$(STAMP): pyproject.toml uv.lock | $(UV_DEP)
	$(UV) sync --frozen --compile-bytecode --python $(PYTHON) $(EXTRAS)
	touch $(STAMP) $(RUNTIME_STAMP)

$(RUNTIME_STAMP): pyproject.toml uv.lock | $(UV_DEP)
	$(UV) sync --frozen --compile-bytecode --inexact --python $(PYTHON)
	touch $(RUNTIME_STAMP)

# Re-resolve every dependency (after editing pyproject.toml), then export the same pins for pip users.
lock: | $(UV_DEP)
	$(UV) lock
	$(UV) export --frozen --no-emit-project --no-dev --no-hashes --no-header --quiet -o requirements-lock.txt

# Fails when pyproject.toml and uv.lock (or requirements-lock.txt) drift apart.
lock-check: | $(UV_DEP)
	$(UV) lock --check
	$(UV) export --frozen --no-emit-project --no-dev --no-hashes --no-header --quiet | diff -q - requirements-lock.txt >/dev/null \
		|| { echo "requirements-lock.txt is not the export of uv.lock: run make lock" >&2; exit 1; }

# The documentation site (docs/, mkdocs.yml): reference pages are generated from the code first.
docs: install
	$(VENV)/bin/python scripts/gen_reference.py
	$(VENV)/bin/mkdocs build --strict

docs-serve: install
	$(VENV)/bin/python scripts/gen_reference.py
	$(VENV)/bin/mkdocs serve

demo: install-runtime
	$(VENV)/bin/sae-mlops demo

# Static checks: ruff (lint), mypy (types, on the package), import-linter (layers; MLflow only in tracking).
# Then the lock (pyproject.toml and uv.lock agree) and the documentation site, built strictly.
check: install lock-check
	$(VENV)/bin/ruff check sae_mlops tests scripts entrypoints
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports
	$(VENV)/bin/python scripts/gen_reference.py --check
	$(VENV)/bin/mkdocs build --strict --site-dir build/site

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

# Also the virtualenvs (the next `make` reinstalls).
distclean: clean
	rm -rf $(VENV) $(TOOLS) site
