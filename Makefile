# Quick start: `make demo` (convert a tiny offline checkpoint and run the pipeline; `make demo-next` for LLaVA-NeXT),
# `make test` (the test suite), `make app` (the Gradio page on the demo's tiny model, http://127.0.0.1:7860;
# `make app PORT=8000` for another port).
# A fresh machine needs only Python 3.10+: the first target run creates $(VENV) and installs what that target needs:
# `make demo` the runtime dependencies only (what `pip install llava-trim` brings), `make app` adds the `app` extra,
# `make test` the test and tool extras, LLaVA's package, DeepSpeed, lmms-eval and a second environment with the oldest
# supported transformers.
# TORCH picks the PyTorch build: the default is a CPU wheel; use e.g. `make demo TORCH=torch` for your CUDA build.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

DEMO_MODEL := demo-output/llava-v1.5-7b-trim
PORT ?= 7860
# The oldest transformers the model code runs on (its files check it at import; conversion/write.py states it in each
# converted config.json); `make test` runs the remote code there too, in $(OLDEST_VENV).
OLDEST_TRANSFORMERS := 5.24.0
OLDEST_VENV := .venv-transformers-$(OLDEST_TRANSFORMERS)

.PHONY: install install-test install-lmms-eval install-oldest-transformers demo demo-next test lint app

# The runtime: torch and the package with its dependencies, as `pip install llava-trim` installs them
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e .
	touch $@

# What the tests and the tools add: the test extras (pytest, ruff, peft, gradio, ...)
install-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# LLaVA's own code, the reference in tests (prompts, scorers): its pure modules only, so without dependencies
	$(BIN)/python -m pip install --quiet --no-deps llava-torch==1.2.2.post1
	# DeepSpeed, which the multi-process fine-tuning tests run on the CPU: built against the torch installed above
	# (an isolated build would fetch PyPI's default CUDA torch)
	$(BIN)/python -m pip install --quiet setuptools wheel
	$(BIN)/python -m pip install --quiet --no-build-isolation deepspeed==0.19.8
	touch $@

# The optional lmms-eval adapter, which the test suite covers: `make test` installs it. lmms-eval leaves torch
# unpinned (PyPI's default is the multi-GB CUDA build), so the torch already installed is pinned. PyPI's torchvision,
# which it pulls, is built for the CUDA torch and does not load beside the CPU build (nothing here needs it);
# lmms-eval's wandb pin would downgrade protobuf to 6, which cannot read the tiny tokenizers' sentencepiece models.
install-lmms-eval: $(VENV)/.installed-lmms-eval

$(VENV)/.installed-lmms-eval: $(VENV)/.installed-test .ci/lmms-eval-constraints.txt
	$(BIN)/python -m pip install --quiet -c .ci/lmms-eval-constraints.txt -e ".[lmms-eval]" \
		"torch==$$($(BIN)/python -c 'import torch; print(torch.__version__)')"
	$(BIN)/python -m pip uninstall --quiet --yes torchvision
	$(BIN)/python -m pip install --quiet "protobuf>=7"
	touch $@

# A second environment with the torch of $(VENV) and the oldest supported transformers, for
# tests/test_transformers_versions.py: only what the model repository's code needs (it imports torch and transformers).
install-oldest-transformers: $(OLDEST_VENV)/.installed

$(OLDEST_VENV)/.installed: $(VENV)/.installed
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet \
		"torch==$$($(BIN)/python -c 'import torch; print(torch.__version__)')" \
		"transformers==$(OLDEST_TRANSFORMERS)" pillow sentencepiece "protobuf>=7" safetensors accelerate
	touch $@

demo: install
	$(BIN)/python -m llava_trim.tools.demo

demo-next: install
	$(BIN)/python -m llava_trim.tools.demo --family next

app: install $(VENV)/.installed-app $(DEMO_MODEL)/config.json
	$(BIN)/python -m llava_trim.tools.app --model $(DEMO_MODEL) --port $(PORT)

$(VENV)/.installed-app: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[app]"
	touch $@

$(DEMO_MODEL)/config.json: | install
	rm -rf demo-output
	$(BIN)/python -m llava_trim.tools.demo --keep demo-output

test: install-test install-lmms-eval install-oldest-transformers
	LLAVA_TRIM_REQUIRE_LMMS_EVAL=1 LLAVA_TRIM_OLDEST_TRANSFORMERS_PYTHON=$(CURDIR)/$(OLDEST_VENV)/bin/python \
		$(BIN)/python -m pytest -q

lint: install-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
