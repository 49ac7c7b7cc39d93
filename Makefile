# The two commands of the README, and their helpers. Each target sets up what it needs.
#
#   make test          unit tests + every notebook under nbval, in parallel
#   make book          the HTML book in _build/html, every notebook executed
#   make check-site    open every page of _build/html in headless Chromium
#   make test-gpu      the gpu tier on one CUDA GPU (PY=python3: an existing interpreter)
#
# Each notebook runs once per `make test && make book`: the tests store executed
# notebooks in a jupyter-cache (_build/.jupyter_cache) and the book reads them from it.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
# PY=python3 runs the GPU check with an interpreter that has torch and the notebook
# tool chain already (the GPU machine is offline: see gpu-wheels); the default builds
# and uses .venv.
PY ?= $(VENV)/bin/python
USE_VENV := $(if $(filter $(VENV)/bin/python,$(PY)),venv,)
# A CPU wheel where one is provided locally; PyPI's default (CUDA) build elsewhere.
TORCH_SPEC ?= torch==2.13.0
NPROC := $(shell nproc 2>/dev/null || echo 2)
JOBS ?= $(NPROC)
# Threads per notebook kernel, so that JOBS kernels share the cores without
# oversubscribing them.
THREADS ?= $(shell echo $$(( $(NPROC) / $(JOBS) > 0 ? $(NPROC) / $(JOBS) : 1 )))
CELL_TIMEOUT ?= 900
CACHE := _build/.jupyter_cache
REPORTS := _build/reports
NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=$(CELL_TIMEOUT) \
         --nb-cache $(CACHE)
XDIST := -n $(JOBS) --dist loadfile
JB := $(VENV)/bin/jupyter-book build --all -W -n --keep-going
# The mermaid library from its npm package, served from the site (no CDN); `make test`
# fetches it too, for the browser check's own test. The version is also in
# _config.yml (mermaid_version).
MERMAID_VERSION := 12.3.0
MERMAID := _static/mermaid/mermaid.esm.min.mjs

.PHONY: help venv test execute book book-student notebooks student-labs lock clean \
        test-gpu gpu-wheels gpu-wheels-check check-site

help:
	@echo "make test          run the unit tests and every notebook (nbval), in parallel"
	@echo "make book          build the HTML book into _build/html"
	@echo "make book-student  the book with exercise solutions hidden (_build/student)"
	@echo "make student-labs  student versions of the labs in _build/student-labs"
	@echo "make notebooks     refresh the .ipynb copies used by Colab"
	@echo "make lock          rewrite constraints.txt from the current environment"
	@echo "make check-site    open every page of the built book in headless Chromium"
	@echo "make test-gpu      gpu-tier tests, notebooks and benchmarks on a CUDA GPU"
	@echo "make gpu-wheels    download the notebook tool chain for an offline GPU machine"
	@echo "make gpu-wheels-check  prove that tool chain complete on this machine"

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt constraints.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt -c constraints.txt
	$(PY) -m pip install -q --no-deps -e .
	$(PY) -m ipykernel install --sys-prefix --name python3 --display-name "Python 3" >/dev/null
	touch $@

test: venv $(MERMAID)
	@mkdir -p $(REPORTS); start=$$(date +%s); status=0; \
	OMP_NUM_THREADS=$(THREADS) $(PY) -m pytest $(XDIST) $(NBVAL) --nb-times $(REPORTS)/notebook-times.json \
	    tests book labs || status=$$?; \
	echo "make test: $$(( $$(date +%s) - start )) s (exit $$status);" \
	     "per-notebook seconds in $(REPORTS)/notebook-times.json"; \
	exit $$status

# Execute, in parallel, only the notebooks the cache lacks (none after `make test`).
execute: venv
	@mkdir -p $(REPORTS); status=0; \
	OMP_NUM_THREADS=$(THREADS) $(PY) -m pytest -q $(XDIST) $(NBVAL) --nb-missing-only \
	    --nb-times $(REPORTS)/book-notebook-times.json book labs || status=$$?; \
	if [ $$status -ne 0 ] && [ $$status -ne 5 ]; then exit $$status; fi

$(MERMAID): Makefile
	@command -v npm >/dev/null || { apt-get update -qq && apt-get install -y -qq npm; }
	@tmp=$$(mktemp -d); trap 'rm -rf $$tmp' EXIT; \
	(cd $$tmp && npm pack --silent mermaid@$(MERMAID_VERSION) >/dev/null); \
	tar xzf $$tmp/mermaid-$(MERMAID_VERSION).tgz -C $$tmp \
	    package/dist/mermaid.esm.min.mjs package/dist/chunks/mermaid.esm.min; \
	rm -rf _static/mermaid && mkdir -p _static/mermaid/chunks; \
	cp $$tmp/package/dist/mermaid.esm.min.mjs _static/mermaid/; \
	cp -r $$tmp/package/dist/chunks/mermaid.esm.min _static/mermaid/chunks/; \
	find _static/mermaid -name '*.map' -delete; \
	echo "mermaid $(MERMAID_VERSION) from npm into _static/mermaid"

book: venv $(MERMAID)
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory execute; \
	$(JB) . ; \
	echo "make book: $$(( $$(date +%s) - start )) s, notebook execution included." \
	     "Open $(CURDIR)/_build/html/index.html"

book-student: execute $(MERMAID)
	@mkdir -p _build/student
	$(PY) -c "import yaml; c = yaml.safe_load(open('_config.yml')); \
	c.setdefault('sphinx', {}).setdefault('config', {})['hide_solutions'] = True; \
	c['execute']['cache'] = '$(CURDIR)/$(CACHE)'; \
	yaml.safe_dump(c, open('_build/student/_config.yml', 'w'))"
	$(JB) --config _build/student/_config.yml --path-output _build/student .
	@echo "Student book (solutions hidden): open $(CURDIR)/_build/student/_build/html/index.html"

student-labs: venv
	$(PY) -m tools.labs student _build/student-labs

notebooks: venv
	$(PY) -m tools.colab write

# Every page of the built book in headless Chromium (Debian's, installed where missing;
# playwright drives it): JavaScript errors, raw math, undrawn diagrams, missing
# images and broken internal links fail.
check-site: venv
	@test -f _build/html/index.html || { echo "no _build/html: run make book first" >&2; exit 1; }
	@command -v chromium >/dev/null || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	$(PY) -m tools.sitecheck _build/html

# ---------------------------------------------------------------- the gpu tier
# Stops at once without an NVIDIA GPU, before building anything.
COMMIT ?= $(shell git rev-parse HEAD 2>/dev/null || cat .whl/COMMIT 2>/dev/null || echo unknown)

test-gpu:
	@if ! ls /dev/nvidia0 >/dev/null 2>&1 && ! nvidia-smi -L >/dev/null 2>&1; then \
	  echo "make test-gpu needs a CUDA GPU and this machine has none (no /dev/nvidia0," \
	       "no nvidia-smi). On this machine, 'make test' runs the cpu tier." >&2; \
	  exit 2; fi
	@$(if $(USE_VENV),$(MAKE) --no-print-directory venv,true)
	$(PY) -m tools.bench gpucheck --commit $(COMMIT) $(GPU_CHECK_ARGS)

# The notebook tool chain as wheels for the GPU machine (Python 3.12, manylinux
# x86-64, offline): the full dependency closure of requirements-gpu.txt at the
# versions constraints.txt pins, less what that machine's python3 has (GPU_HAS).
GPU_HAS := torch numpy matplotlib pytest pytest_xdist hypothesis accelerate tqdm \
  pyyaml PyYAML requests
WHEEL_PLATFORMS := $(foreach n,39 35 34 31 28 27 24 17,--platform manylinux_2_$(n)_x86_64) \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64
GPU_PY := --python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none \
  $(WHEEL_PLATFORMS) --platform any
# closure DIR [pip download options]: the wheels of requirements-gpu.txt and of
# everything they need, then those the GPU machine has removed.
define closure
	rm -rf $(1) && mkdir -p $(1)
	$(PY) -m pip download -q --only-binary=:all: $(2) -d $(1) \
	  -r requirements-gpu.txt -c constraints.txt
	for n in $(GPU_HAS); do rm -f $(1)/$$n-[0-9]*.whl; done
endef

gpu-wheels: $(USE_VENV)
	$(call closure,.whl,$(GPU_PY))
	git rev-parse HEAD > .whl/COMMIT 2>/dev/null || true
	@echo "$$(ls .whl/*.whl | wc -l) wheels, $$(du -sh .whl | cut -f1) in .whl/"

# The same closure for this machine's Python, installed with --no-index into a fresh
# venv holding only what the GPU machine's python3 has: the tests and notebooks must
# collect, and one notebook run under nbval.
CHECK_VENV := _build/gpu-wheels-check
gpu-wheels-check: $(USE_VENV)
	rm -rf $(CHECK_VENV) && $(PYTHON) -m venv $(CHECK_VENV)/venv
	$(CHECK_VENV)/venv/bin/python -m pip install -q "$(TORCH_SPEC)"
	$(CHECK_VENV)/venv/bin/python -m pip install -q numpy matplotlib pytest \
	  pytest-xdist hypothesis accelerate tqdm pyyaml requests -c constraints.txt
	$(call closure,$(CHECK_VENV)/wheels,)
	$(CHECK_VENV)/venv/bin/python -m pip install -q --no-index --no-deps \
	  --target $(CHECK_VENV)/site $(CHECK_VENV)/wheels/*.whl
	export PYTHONPATH=$(CURDIR)/$(CHECK_VENV)/site:$(CURDIR); \
	$(CHECK_VENV)/venv/bin/python -m pytest -q --collect-only tests >/dev/null && \
	$(CHECK_VENV)/venv/bin/python -m pytest -q --collect-only --nbval-lax \
	  --nbval-current-env book labs >/dev/null && \
	$(CHECK_VENV)/venv/bin/python -m pytest -q --nbval-lax --nbval-current-env \
	  book/02-core-concepts.md && echo "gpu-wheels-check: the closure is complete"

lock: venv
	( echo "# Exact versions CI installs (pip install -r requirements.txt -c constraints.txt)."; \
	  echo "# torch is pinned in the Makefile (TORCH_SPEC). Regenerate with: make lock"; \
	  $(PY) -m pip freeze --exclude-editable | grep -viE '^(torch|llmcore|nvidia-|triton)[=@ ]' ) \
	  > constraints.txt

clean:
	rm -rf _build
