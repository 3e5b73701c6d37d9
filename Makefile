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

.PHONY: setup lock test test-slow test-aot test-latest demo bench clean gpu-wheels

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

# The full AOT grid of the Triton kernels (python -m llm_lru.kernels.common.aot --full).
test-aot: setup
	$(PYTHON) -m pytest -q -m aot_full

# The newest releases that pyproject.toml allows, in a separate venv, through make test's suite:
# finds a break before a user does. Not part of CI, which installs from the lock. torch starts
# from the CPU 2.13.0 and is upgraded like the rest, as far as pip may go here (on these
# machines /etc/xdg/pip caps it at the 2.14.1 on disk; elsewhere that can be a CUDA download).
test-latest:
	rm -rf $(LATEST)
	$(PY) -m venv $(LATEST)
	$(LATEST)/bin/pip install -q torch==2.13.0
	$(LATEST)/bin/pip install -q --upgrade --upgrade-strategy eager -e '.[dev]' --config-settings editable_mode=strict
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

# Wheels for a lent GPU machine (bench/gpu_check.sh; the end of README.md). Its image has no network
# and its own torch, triton and transformers under Python 3.12: these are what llm_lru needs beyond
# it, pinned and hash-checked from the lock (fla is not in the lock: the gpu extra). .whl/ holds the
# cp312 runtime set (one version of each), .whl/build/ setuptools to build llm_lru there, .whl/host/
# this machine's binary wheels, so that tests/bench/test_gpu_check.py installs the same set here.
# omegaconf 2.4 vendors its antlr runtime. One GPU call carries 64 MiB, working tree included.
GPU_WHEELS    := .whl
GPU_PYTHON    := 3.12
FLA_VERSION   := 0.6.0
GPU_PINNED    := webdataset braceexpand omegaconf hjson pydantic pydantic-core annotated-types \
                 typing-inspection typing-extensions
GPU_BINARY    := pydantic-core
GPU_PLATFORMS := --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
# The lock's entries (pin + hashes) for the packages named in $(1).
lock_pins = awk -v names=" $(1) " '/^[a-z]/ {split($$1, a, "=="); keep = index(names, " " a[1] " ") > 0} keep' $(LOCK)

$(GPU_WHEELS)/requirements.txt: $(LOCK) Makefile
	@for n in deepspeed setuptools $(GPU_PINNED); do grep -q "^$$n==" $(LOCK) || \
	    { echo "gpu-wheels: '$$n' has no pin in $(LOCK)" >&2; exit 1; }; done
	rm -rf $(GPU_WHEELS).tmp && mkdir -p $(GPU_WHEELS).tmp/build $(GPU_WHEELS).tmp/host
	$(call lock_pins,deepspeed) > $(GPU_WHEELS).tmp/build/deepspeed.txt
	$(call lock_pins,setuptools) > $(GPU_WHEELS).tmp/build/setuptools.txt
	$(call lock_pins,$(GPU_PINNED)) > $(GPU_WHEELS).tmp/build/runtime.txt
	$(call lock_pins,$(GPU_BINARY)) > $(GPU_WHEELS).tmp/build/host.txt
	# DeepSpeed ships an sdist: a pure-Python wheel with no ops compiled (they JIT-build where used).
	DS_BUILD_OPS=0 $(PY) -m pip wheel -q --no-deps --require-hashes -w $(GPU_WHEELS).tmp -r $(GPU_WHEELS).tmp/build/deepspeed.txt
	$(PY) -m pip download -q --no-deps --require-hashes --only-binary=:all: --python-version $(GPU_PYTHON) \
	    --implementation cp $(GPU_PLATFORMS) -d $(GPU_WHEELS).tmp -r $(GPU_WHEELS).tmp/build/runtime.txt
	$(PY) -m pip download -q --no-deps --only-binary=:all: -d $(GPU_WHEELS).tmp \
	    flash-linear-attention==$(FLA_VERSION) fla-core==$(FLA_VERSION)
	$(PY) -m pip download -q --no-deps --require-hashes -d $(GPU_WHEELS).tmp/build -r $(GPU_WHEELS).tmp/build/setuptools.txt
	$(PY) -m pip download -q --no-deps --require-hashes --only-binary=:all: -d $(GPU_WHEELS).tmp/host \
	    -r $(GPU_WHEELS).tmp/build/host.txt
	(sed -n 's/^\([a-z][^ ]*==[^ ]*\) .*/\1/p' $(GPU_WHEELS).tmp/build/deepspeed.txt $(GPU_WHEELS).tmp/build/runtime.txt; \
	    echo flash-linear-attention==$(FLA_VERSION); echo fla-core==$(FLA_VERSION)) > $(GPU_WHEELS).tmp/requirements.txt
	rm -rf $(GPU_WHEELS) && mv $(GPU_WHEELS).tmp $(GPU_WHEELS)

gpu-wheels: $(GPU_WHEELS)/requirements.txt
	@wheels=$$(du -sb $(GPU_WHEELS) | cut -f1); \
	tree=$$(git ls-files -co --exclude-standard -z 2>/dev/null | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1); \
	total=$$((wheels + $${tree:-0})); \
	echo "gpu-wheels: $(GPU_WHEELS)/ $$((wheels >> 10)) KiB + working tree $$(($${tree:-0} >> 10)) KiB = $$((total >> 20)) MiB of the 64 MiB a GPU call carries"; \
	if [ $$total -gt 67108864 ]; then \
	    echo "gpu-wheels: too large: $(GPU_WHEELS)/ and the working tree come to $$total bytes, over the 64 MiB (67108864 bytes) one GPU call can carry; drop a wheel or shrink the tree" >&2; exit 1; fi
