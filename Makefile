# Everything runs from a local virtual environment made by `make setup`, installed from
# requirements.lock (exact versions and hashes for Python 3.11, linux x86-64, CPU torch 2.13.0).
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
LOCK    := requirements.lock
# `make lock` and `make test-latest` use their own environments, never the locked one.
TOOLS   := .venv-tools
LATEST  := .venv-latest
UV_VERSION := 0.13.8
# DeepSpeed JIT-builds a CPU comm op once; keep the build inside the repo so reruns reuse it.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
# Triton kernels run on CPU only through the interpreter, which must be set before import.
export TRITON_INTERPRET ?= 1
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
# Package folders: adding or removing a module re-links the strict editable install.
PKG_DIRS := $(shell find llm_lru kernels data_prep eval -type d -not -name __pycache__)

.PHONY: setup lock test test-slow test-latest demo bench clean

# The locked dependencies, exactly: --no-deps so that nothing outside the lock is pulled in.
$(VENV)/.deps: $(LOCK)
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --require-hashes --no-deps -r $(LOCK)
	touch $@

# llm_lru itself, editable in setuptools' strict mode: a tree of links that editors and static
# analysers can follow to llm_lru.kernels / .data_prep / .eval (the package-dir mapping), with
# no import hook. Built with the locked setuptools, so the build fetches nothing either.
$(VENV)/.installed: $(VENV)/.deps pyproject.toml setup.py $(PKG_DIRS)
	$(BIN)/pip install -q --no-deps --no-build-isolation -e . --config-settings editable_mode=strict
	touch $@

setup: $(VENV)/.installed

# Regenerate the lock from pyproject.toml (+ requirements.in's torch pin) with the newest
# releases the ranges allow. Run it when a dependency changes or to take upgrades; commit the
# result only once `make test` passes on it.
lock:
	test -x $(TOOLS)/bin/uv || ($(PY) -m venv $(TOOLS) && $(TOOLS)/bin/pip install -q uv==$(UV_VERSION))
	$(TOOLS)/bin/uv pip compile pyproject.toml requirements.in --extra dev --generate-hashes \
	    --python-version 3.11 --python-platform x86_64-manylinux_2_28 --find-links /opt/wheels \
	    --custom-compile-command "make lock" --quiet -o $(LOCK)

test: setup
	$(PYTHON) -m pytest -q

test-slow: setup
	$(PYTHON) -m pytest -q -m slow

# The newest releases that pyproject.toml allows (CPU torch 2.13.0 kept, for the same reason as
# requirements.in), in a separate venv, through make test's suite: finds a break before a user
# does. Not part of CI, which installs from the lock.
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q torch==2.13.0
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[dev]'
	$(LATEST)/bin/pip check
	$(LATEST)/bin/pip freeze --exclude-editable > $(LATEST)/versions.txt
	grep -iE '^(torch|transformers|deepspeed|triton|tokenizers|safetensors|webdataset|omegaconf|lm.eval|numpy)==' $(LATEST)/versions.txt
	$(LATEST)/bin/python -m pytest -q

demo: setup
	$(BIN)/llm-lru demo

bench: setup
	$(PYTHON) bench/run_all.py

clean:
	rm -rf $(VENV) $(TOOLS) $(LATEST) .torch_extensions runs build
