# sidecar: `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.DEFAULT_GOAL := help

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

# Two lock files with hashes (requirements/*.txt, made by `make lock`): what running needs, and that
# plus the dev tools. `make run` installs the first, `make test` and `make lint` the second.
RUN_LOCK := requirements/run.txt
DEV_LOCK := requirements/dev.txt
RUN_STAMP := $(VENV)/.installed-run
DEV_STAMP := $(VENV)/.installed-dev
PIP_TOOLS := pip-tools==7.5.2
# `make lock LOCK_UPGRADE=` keeps every pin and only adds what pyproject.toml newly asks for
LOCK_UPGRADE ?= --upgrade
COMPILE := pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --no-emit-index-url \
	--no-emit-find-links --no-header

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(RUN_STAMP): $(RUN_LOCK) pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet --require-hashes -r $(RUN_LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

$(DEV_STAMP): $(DEV_LOCK) pyproject.toml | $(VENV)/bin/python
	$(BIN)/pip install --quiet --require-hashes -r $(DEV_LOCK)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@ $(RUN_STAMP)

venv: $(DEV_STAMP) ## create the virtualenv and install sidecar with its dev tools (from the lock)

lock: ## refresh the lock files on purpose: the newest releases pyproject.toml allows (LOCK_UPGRADE= keeps pins)
	rm -rf $(VENV)-lock && $(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/pip install --quiet $(PIP_TOOLS)
	PATH=$(CURDIR)/$(VENV)-lock/bin:$$PATH $(COMPILE) $(LOCK_UPGRADE) -o $(RUN_LOCK) pyproject.toml requirements/build.in
	PATH=$(CURDIR)/$(VENV)-lock/bin:$$PATH $(COMPILE) $(LOCK_UPGRADE) --extra dev -o $(DEV_LOCK) pyproject.toml requirements/build.in \
		requirements/dev.in
	rm -rf $(VENV)-lock

run: $(RUN_STAMP) ## start the embedded demo: curl localhost:8080/echo/anything
	$(BIN)/sidecar run $(if $(CONFIG),-c $(CONFIG))

# System packages the tests run for real (Debian names), installed only when missing: Redis,
# promtool, and the real upstream and clients of the compatibility suite (nginx, curl, ab).
APT_NEEDS := redis-server:redis-server promtool:prometheus nginx:nginx-light ab:apache2-utils curl:curl

system-deps: ## install the system packages the tests need (apt-get, when missing)
	@missing=""; for pair in $(APT_NEEDS); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

test: $(DEV_STAMP) system-deps ## run the whole test suite
	$(BIN)/pytest $(PYTEST_ARGS)

# make test runs the differential fuzz suite with a small budget; this runs it long, shrinks what
# fails to a minimal reproducer and prints how many examples ran. FUZZ_ONLY / FUZZ_WITHOUT
# (feature names, see tests/fakes/http_sequences.py) narrow what is generated.
FUZZ_EXAMPLES ?= 2000

fuzz: $(DEV_STAMP) ## the differential fuzz suite, long: FUZZ_EXAMPLES per test (default 2000)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest tests/test_differential_fuzz.py --timeout=0 -s \
		--hypothesis-show-statistics $(PYTEST_ARGS)

lint: $(DEV_STAMP) ## ruff format check, ruff, mypy
	$(BIN)/ruff format --check sidecar tests bench
	$(BIN)/ruff check sidecar tests bench
	$(BIN)/mypy

fmt: $(DEV_STAMP) ## format the code
	$(BIN)/ruff format sidecar tests bench
	$(BIN)/ruff check --fix sidecar tests bench

bench: $(DEV_STAMP) ## measure sidecar against nginx and a minimal aiohttp proxy (installs wrk, nginx)
	@$(MAKE) --no-print-directory system-deps APT_NEEDS="wrk:wrk nginx:nginx-light taskset:util-linux"
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-soak: $(DEV_STAMP) ## the long figures: RSS over 500k requests, 1 GiB streaming, 2 s tokens under load
	@$(MAKE) --no-print-directory system-deps APT_NEEDS="wrk:wrk nginx:nginx-light taskset:util-linux"
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

bench-ir: $(DEV_STAMP) ## instructions per request and per MiB under callgrind: noise-free figures to compare builds
	@$(MAKE) --no-print-directory system-deps APT_NEEDS="valgrind:valgrind nginx:nginx-light"
	$(BIN)/python bench/instructions.py $(IR_ARGS)

bench-shared: $(DEV_STAMP) system-deps ## how fast a replica sees a token another replica refreshed (Redis)
	$(BIN)/python bench/shared_refresh.py $(SHARED_ARGS)

chaos: $(DEV_STAMP) ## 60 s of traffic while the identity provider fails and recovers (loopback)
	$(BIN)/python bench/chaos.py $(CHAOS_ARGS)

# The one version source (pyproject.toml reads it too); the image's OCI labels take it, the commit
# and the commit's time (not the build's: two builds of one commit label alike).
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"$$/\1/p' sidecar/__init__.py)
REVISION := $(shell git rev-parse HEAD 2>/dev/null || echo unknown)
CREATED := $(shell git log -1 --format=%cI 2>/dev/null || echo unknown)

image: ## build the container image sidecar:VERSION (needs a Docker or Podman engine)
	@engine=$$(command -v docker || command -v podman) || { echo "no docker or podman here"; exit 1; }; \
	$$engine build -f deploy/Dockerfile --build-arg VERSION=$(VERSION) --build-arg REVISION=$(REVISION) \
		--build-arg CREATED=$(CREATED) -t sidecar:$(VERSION) .

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .sidecar

.PHONY: help venv lock run test fuzz lint fmt clean system-deps bench bench-soak bench-ir bench-shared chaos image
