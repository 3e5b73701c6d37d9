# Everything runs from a local virtual environment made by `make setup`.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
PYTHON  := $(BIN)/python
# DeepSpeed JIT-builds a CPU comm op once; keep the build inside the repo so reruns reuse it.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.torch_extensions
# Triton kernels run on CPU only through the interpreter, which must be set before import.
export TRITON_INTERPRET ?= 1
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-slow demo bench clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	# CPU torch first, so that the project's `torch` requirement never pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

setup: $(VENV)/.installed

test: setup
	$(PYTHON) -m pytest -q

test-slow: setup
	$(PYTHON) -m pytest -q -m slow

demo: setup
	$(BIN)/llm-lru demo

bench: setup
	$(PYTHON) bench/run_all.py

clean:
	rm -rf $(VENV) .torch_extensions runs
