# Quick start: `make demo` (convert a tiny offline checkpoint and run the pipeline), `make test` (the test suite).
# A fresh machine needs only Python 3.10+: the first target run creates $(VENV) and installs everything.
# TORCH picks the PyTorch build: the default is a CPU wheel; use e.g. `make demo TORCH=torch` for your CUDA build.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install install-lmms-eval demo test lint

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# LLaVA's own code, the reference in tests (prompts, scorers): its pure modules only, so without dependencies
	$(BIN)/python -m pip install --quiet --no-deps llava-torch==1.2.2.post1
	touch $@

# The optional lmms-eval adapter and its tests (CI runs them). PyPI's torchvision, which lmms-eval pulls, is built
# for the CUDA torch and does not load beside the CPU build (nothing here needs it); lmms-eval's wandb pin would
# downgrade protobuf to 6, which cannot read the tiny tokenizers' sentencepiece models.
install-lmms-eval: install
	$(BIN)/python -m pip install --quiet -c .ci/lmms-eval-constraints.txt -e ".[lmms-eval]"
	$(BIN)/python -m pip uninstall --quiet --yes torchvision
	$(BIN)/python -m pip install --quiet "protobuf>=7"

demo: install
	$(BIN)/python -m llava_trim.tools.demo

test: install
	$(BIN)/python -m pytest -q

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
