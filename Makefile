# The README's two commands: `make run` (service on the default model) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PORT ?= 8000
HOST ?= 0.0.0.0
LADDER ?= $(or $(GREENROUTE_CACHE_DIR),$(HOME)/.cache/greenroute)/ladder
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run build test lint typecheck bench clean system-deps image-test kernels gpu-check compose-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# `build` extra: torch (CPU wheel), transformers, optimum — needed to build the ladder once.
$(VENV)/.installed-build: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[build]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q -e '.[build,dev]'
	touch $@ $(VENV)/.installed-build

# onnxruntime-genai's model builder (fused Llama graphs) needs transformers 5.x, optimum-onnx
# needs < 4.58: the builder gets its own environment, used by `greenroute build` as a subprocess.
BUILDER_VENV ?= .venv-builder
BUILDER_REQ := models/build/pipeline/genai-builder-requirements.txt
export GREENROUTE_GENAI_BUILDER ?= $(abspath $(BUILDER_VENV))/bin/python

$(BUILDER_VENV)/.installed: $(BUILDER_REQ)
	test -x $(BUILDER_VENV)/bin/python || $(PYTHON) -m venv $(BUILDER_VENV)
	$(BUILDER_VENV)/bin/python -m pip install -q --upgrade pip
	$(BUILDER_VENV)/bin/pip install -q -r $(BUILDER_REQ)
	touch $@

# greenroute's own onnxruntime kernels (kernels/: C++17, g++, onnxruntime's API headers from
# Debian's libonnxruntime-dev). Without a compiler or the headers this says so in one line and
# the ladder races onnxruntime's operators only.
KERNELS_LIB := kernels/build/libgreenroute_kernels.so
CXX ?= g++
$(KERNELS_LIB): kernels/rowquant.cc kernels/attention.cc kernels/fetch-ort-headers.sh
	@mkdir -p kernels/build
	@if command -v $(CXX) >/dev/null && kernels/fetch-ort-headers.sh kernels/build/include; then \
	  $(CXX) -std=c++17 -O3 -ffp-contract=off -fPIC -shared -fvisibility=hidden -Wall -Wextra \
	    -Ikernels/build/include -o $@ kernels/rowquant.cc kernels/attention.cc \
	  && echo "built $@"; \
	else echo "greenroute kernels not built (no $(CXX) or no onnxruntime headers): the ladder uses onnxruntime's operators only"; fi

# kernels/avx2only.c: hides every x86 extension above AVX2 + FMA from CPUID (where the CPU has
# CPUID faulting), so AVX2 code paths can be measured natively on a bigger CPU: kernels/avx2only CMD
AVX2ONLY_LIB := kernels/build/libavx2only.so
CC ?= cc
$(AVX2ONLY_LIB): kernels/avx2only.c
	@mkdir -p kernels/build
	@if command -v $(CC) >/dev/null; then $(CC) -O2 -fPIC -shared -Wall -Wextra -o $@ $< \
	  && echo "built $@"; else echo "kernels/avx2only not built (no $(CC))"; fi

kernels: $(KERNELS_LIB) $(AVX2ONLY_LIB)

## build the default ladder if missing or stale (skipped when up to date)
build: $(VENV)/.installed-build $(BUILDER_VENV)/.installed kernels
	$(BIN)/greenroute build --out $(LADDER) > /dev/null

## install, build the default ladder if needed, start the service on :$(PORT)
run: build
	$(BIN)/greenroute show --ladder $(LADDER)
	$(BIN)/greenroute serve --host $(HOST) --port $(PORT) --ladder $(LADDER)

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check cli app models routing serving telemetry tests bench

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

# Programs (Debian packages) that tests drive for real: a Prometheus server scraping the service,
# headless Chromium and its WebDriver driving the web page, qemu-user running kernel checks on an
# emulated AVX2-only CPU (tests/models/test_exactness.py). `program:package` where the names
# differ. Installed with apt-get when missing and we are root (or have sudo); otherwise their
# tests say what to install (skipped outside CI, failed under CI=true).
SYSTEM_TOOLS ?= prometheus chromium chromedriver:chromium-driver qemu-x86_64:qemu-user
system-deps:
	@missing=""; for spec in $(SYSTEM_TOOLS); do \
	  command -v $${spec%%:*} >/dev/null || missing="$$missing $${spec#*:}"; done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo="sudo -n"; \
	else echo "not installed:$$missing (apt-get install$$missing)"; exit 0; fi; \
	echo "installing:$$missing"; \
	$$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq \
	  --no-install-recommends $$missing > /dev/null

## install everything and run lint, type check and the whole test suite
test: system-deps lint typecheck $(BUILDER_VENV)/.installed kernels
	$(BIN)/python -m pytest -q -p no:cacheprovider

## build the CPU image from the Dockerfile with podman and smoke-test it (deploy/image-smoke.sh:
## ~30 min on 2 CPUs when nothing is cached; not part of `make test`)
image-test:
	deploy/image-smoke.sh

## docker-compose.yml up for real (Compose v2 on podman's API socket), real traffic, every
## dashboard query against Prometheus, volume across down/up, SIGTERM drain (~35 min cold)
compose-test: $(VENV)/.installed-dev
	deploy/compose-test.sh

## on a machine with an NVIDIA GPU: build, serve on CUDA with NVML, check meters, batching and
## routing in one table (bench/gpu_check.py; exit 1 on a failed check)
gpu-check: build
	$(BIN)/greenroute bench gpu-check --ladder $(LADDER)

bench: build
	$(BIN)/greenroute bench models --ladder $(LADDER)

clean:
	rm -rf $(VENV) $(BUILDER_VENV) .pytest_cache .mypy_cache .ruff_cache kernels/build
