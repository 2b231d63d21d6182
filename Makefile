# `make serve`, `make test`, `make load`, `make bench`. Each installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export BENTOML_HOME ?= $(CURDIR)/.bentoml
export BENTOML_DO_NOT_TRACK := true

.PHONY: install serve test check build model clean load bench

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	@# The CPU wheel of torch, before anything else can pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt -c constraints.txt
	touch $@

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/python -m tools.serve

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

check: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

# Embedded Redis + demo data + `bentoml serve` + Locust (~60 s); report in load_tests/results/.
load: $(STAMP)
	$(BIN)/python -m load_tests.run_load $(LOAD_ARGS)

# In-process micro-benchmarks vs the raw pipeline and Feast (own venv), then end to end.
bench: $(STAMP)
	$(BIN)/python -m load_tests.bench $(BENCH_ARGS)

model: $(STAMP)
	$(BIN)/python -m models.train --if-missing

build: model
	$(BIN)/bentoml build

clean:
	rm -rf $(VENV) .venv-feast .mypy_cache .ruff_cache .pytest_cache
