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

$(RUN_STAMP): $(RUN_LOCK) | $(VENV)/bin/python
	$(BIN)/pip install --quiet --require-hashes -r $(RUN_LOCK)
	touch $@

$(DEV_STAMP): $(DEV_LOCK) | $(VENV)/bin/python
	$(BIN)/pip install --quiet --require-hashes -r $(DEV_LOCK)
	touch $@ $(RUN_STAMP)

# sidecar itself, installed in place with its data path compiled by mypyc (setup.py,
# sidecar/compiled.py): built again whenever a source changes, since compiled modules take
# precedence over the sources beside them. SIDECAR_PURE_PYTHON=1 builds without compiling.
# One stamp per kind of build, so that setting or unsetting the variable builds again.
BUILD_KIND := $(if $(filter 1,$(SIDECAR_PURE_PYTHON)),pure,compiled)
BUILD_STAMP := $(VENV)/.built-$(BUILD_KIND)
SOURCES := $(wildcard sidecar/*.py sidecar/*/*.py)

$(BUILD_STAMP): $(RUN_STAMP) pyproject.toml setup.py $(SOURCES)
	@[ $(BUILD_KIND) = pure ] || $(MAKE) --no-print-directory compiler
	rm -f $(VENV)/.built-* $(COMPILED_FILES)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

# what an in-place build leaves: it would shadow the sources if left behind
COMPILED_FILES = $(wildcard sidecar/*.so sidecar/*/*.so)

DEV := $(DEV_STAMP) $(BUILD_STAMP)

venv: $(DEV) ## create the virtualenv and install sidecar with its dev tools (from the lock)

lock: ## refresh the lock files on purpose: the newest releases pyproject.toml allows (LOCK_UPGRADE= keeps pins)
	rm -rf $(VENV)-lock && $(PYTHON) -m venv $(VENV)-lock
	$(VENV)-lock/bin/pip install --quiet $(PIP_TOOLS)
	PATH=$(CURDIR)/$(VENV)-lock/bin:$$PATH $(COMPILE) $(LOCK_UPGRADE) -o $(RUN_LOCK) pyproject.toml requirements/build.in
	PATH=$(CURDIR)/$(VENV)-lock/bin:$$PATH $(COMPILE) $(LOCK_UPGRADE) --extra dev -o $(DEV_LOCK) pyproject.toml requirements/build.in \
		requirements/dev.in
	rm -rf $(VENV)-lock

run: $(BUILD_STAMP) ## start the embedded demo: curl localhost:8080/echo/anything
	$(BIN)/sidecar run $(if $(CONFIG),-c $(CONFIG))

# System packages the tests run for real (Debian names), installed only when missing: Redis,
# promtool, and the real upstream and clients of the compatibility suite (nginx, curl, ab).
APT_NEEDS := redis-server:redis-server promtool:prometheus nginx:nginx-light ab:apache2-utils curl:curl

# A C compiler and Python's headers for the mypyc build (apt-get, when missing)
compiler:
	@command -v cc >/dev/null 2>&1 || $(MAKE) --no-print-directory system-deps APT_NEEDS="cc:gcc"
	@test -f "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("include"))')/Python.h" \
	  || $(MAKE) --no-print-directory system-deps APT_NEEDS="python3-config:python3-dev"

system-deps: ## install the system packages the tests need (apt-get, when missing)
	@missing=""; for pair in $(APT_NEEDS); do cmd=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$cmd >/dev/null 2>&1 || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

# the data path's suites once more on its sources (SIDECAR_PURE_PYTHON=1): the build without mypyc
PURE_TESTS := $(wildcard tests/test_front*.py) tests/test_proxy.py tests/test_http_semantics.py \
	tests/test_differential_checks.py tests/test_differential_fuzz.py tests/test_hostile_fuzz.py \
	tests/test_streaming.py tests/test_upstream_tls.py tests/test_upstream_trust.py \
	tests/test_faults.py tests/test_callers.py tests/test_rules.py tests/test_random_ids.py \
	tests/test_metrics.py tests/test_workers.py tests/test_compiled.py

test: $(DEV) system-deps ## run the whole test suite (then the data path's suites on its sources)
	$(BIN)/pytest $(PYTEST_ARGS)
	SIDECAR_PURE_PYTHON=1 $(BIN)/pytest $(PURE_TESTS) $(PYTEST_ARGS)

# make test runs the differential fuzz suite with a small budget; this runs it long, shrinks what
# fails to a minimal reproducer and prints how many examples ran. FUZZ_ONLY / FUZZ_WITHOUT
# (feature names, see tests/fakes/http_sequences.py) narrow what is generated.
FUZZ_EXAMPLES ?= 2000

fuzz: $(DEV) ## the differential fuzz suite, long: FUZZ_EXAMPLES per test (default 2000)
	FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest tests/test_differential_fuzz.py --timeout=0 -s \
		--hypothesis-show-statistics $(PYTEST_ARGS)

lint: $(DEV_STAMP) ## ruff format check, ruff, mypy
	$(BIN)/ruff format --check sidecar tests bench
	$(BIN)/ruff check sidecar tests bench
	$(BIN)/mypy

fmt: $(DEV_STAMP) ## format the code
	$(BIN)/ruff format sidecar tests bench
	$(BIN)/ruff check --fix sidecar tests bench

bench: $(DEV) ## measure sidecar against nginx and a minimal aiohttp proxy (installs wrk, nginx)
	@$(MAKE) --no-print-directory system-deps APT_NEEDS="wrk:wrk nginx:nginx-light taskset:util-linux"
	$(BIN)/python bench/run.py $(BENCH_ARGS)

bench-soak: $(DEV) ## the long figures: RSS over 500k requests, 1 GiB streaming, 2 s tokens under load
	@$(MAKE) --no-print-directory system-deps APT_NEEDS="wrk:wrk nginx:nginx-light taskset:util-linux"
	$(BIN)/python bench/soak.py $(SOAK_ARGS)

bench-ir: $(DEV) ## instructions per request and per MiB under callgrind: noise-free figures to compare builds
	@$(MAKE) --no-print-directory system-deps APT_NEEDS="valgrind:valgrind nginx:nginx-light"
	$(BIN)/python bench/instructions.py $(IR_ARGS)

bench-shared: $(DEV) system-deps ## how fast a replica sees a token another replica refreshed (Redis)
	$(BIN)/python bench/shared_refresh.py $(SHARED_ARGS)

chaos: $(DEV) ## 60 s of traffic while the identity provider fails and recovers (loopback)
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

clean: ## remove the virtualenv, caches and the compiled modules
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .sidecar build $(COMPILED_FILES)

.PHONY: help venv compiler lock run test fuzz lint fmt clean system-deps bench bench-soak bench-ir bench-shared chaos image
