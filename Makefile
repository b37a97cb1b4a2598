# The few commands a newcomer needs. Everything installs into ./.venv.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# torch + torchvision must come as a matching pair (GLM-4.1V's processor needs torchvision).
# On x86_64 Linux these are CUDA builds that also run on CPU; see README "GPU install".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
TINY := .models/tiny
# pip on this kind of machine warns about every local index folder it skips; that is noise.
QUIET_PIP := grep -v "is ignored: it is neither a file nor a directory" || true

.PHONY: help install tiny demo test test-slow container-test lint bench load-test gpu-bench gpu-compare gpu-kit kernels bento clean redis-server

help:
	@echo "make demo       set up everything, then serve the offline tiny model (PORT=3000) and say how to call it"
	@echo "make test       set up everything, then run lint + the test suite (what CI runs)"
	@echo "make test-slow  the slow suites (schemathesis, container build, every GPU-session step walked on the CPU)"
	@echo "make container-test  build the tiny model's Bento into an image, run it, call it (installs Docker if needed)"
	@echo "make bento      build the Bento for GLM4V_MODEL (a hub id or a model-store tag)"
	@echo "make bench      engine, scheduler, service, decode-step, upload, prefill-chunk, image-arrival, step-overhead and compile-time benchmarks on the tiny model -> docs/benchmarks.md"
	@echo "make load-test  64 clients for 60 s, mixed APIs: zero lost requests -> docs/benchmarks.md"
	@echo "make gpu-bench  on a CUDA host: the real architecture, random bf16 weights -> docs/benchmarks.md"
	@echo "make gpu-compare  on a CUDA host: GPU-only tests, the served engine (and one stream with each step waited for), A/Bs of the served engine against tuning timed by events and SDPA attention (both together, then each), a profile at an image's context with and without the split kernels, a wider tuning search, a kernel profile, the MLP activation stored and the rotary embedding fused (together and each alone, A/Bs over fresh compilations), PDL, combo kernels, one-row GEMMs, unfused q/k/v, a long-context profile, wider tuning, before vs now, compile time, prefill chunks, eager, no compile"
	@echo "make gpu-kit    before a lent GPU machine: every GPU-session step walked on the CPU, then wheels in .whl/ and the older engine in .base/ to carry there"
	@echo "make kernels    any machine: the Triton kernels Inductor writes for one decoder layer of a single stream on a GPU -> docs/benchmarks.md"
	@echo "make tiny       build the tiny offline checkpoint into $(TINY)"
	@echo "make clean      remove .venv, .models and caches"

$(BIN)/.installed: pyproject.toml
	@echo ">> creating $(VENV) and installing glm4v-bento (first time: a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_SPEC) 2>&1 | $(QUIET_PIP)
	$(BIN)/pip install -q -e '.[dev]' 2>&1 | $(QUIET_PIP)
	$(BIN)/python -c "import torch, torchvision, transformers, bentoml; print('>> installed torch', torch.__version__, '| transformers', transformers.__version__, '| bentoml', bentoml.__version__)"
	touch $@

install: $(BIN)/.installed

$(TINY)/config.json: glm4v_bento/tiny.py $(BIN)/.installed
	$(BIN)/glm4v-bento tiny-model $(TINY)

tiny: $(TINY)/config.json

PORT ?= 3000

demo: $(TINY)/config.json
	$(BIN)/glm4v-bento demo --model-dir $(TINY) --port $(PORT)

lint: $(BIN)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The rate-limit tests run a real Redis server (Debian's), started and stopped by the tests.
redis-server:
	@command -v redis-server >/dev/null || { echo ">> installing Debian's redis-server for the tests"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

test: $(BIN)/.installed lint redis-server
	$(BIN)/pytest -q

test-slow: $(BIN)/.installed
	$(BIN)/pytest -q -s -m slow

container-test: $(BIN)/.installed
	$(BIN)/pytest -q -s -m slow tests/test_container.py

bench: $(TINY)/config.json
	$(BIN)/python bench/engine_bench.py --model $(TINY) --output docs/benchmarks.md
	$(BIN)/python bench/scheduler_bench.py --model $(TINY) --output docs/benchmarks.md
	$(BIN)/python bench/service_bench.py --model $(TINY) --output docs/benchmarks.md
	$(BIN)/python bench/decode_step_bench.py --model $(TINY) --output docs/benchmarks.md
	$(BIN)/python bench/image_upload_bench.py --model $(TINY) --output docs/benchmarks.md
	$(BIN)/python bench/prefill_chunk_bench.py --model $(TINY) --output docs/benchmarks.md
	$(BIN)/python bench/image_arrival_bench.py --model $(TINY) --output docs/benchmarks.md
	$(BIN)/python bench/step_overhead_bench.py --model $(TINY) --output docs/benchmarks.md
	$(BIN)/python bench/startup_bench.py --model $(TINY) --runs 3 --output docs/benchmarks.md
	$(BIN)/python bench/compile_bench.py --output docs/benchmarks.md
	$(BIN)/python bench/compile_bench.py --restart --output docs/benchmarks.md

gpu-bench: $(BIN)/.installed
	$(BIN)/python bench/gpu_bench.py --output docs/benchmarks.md

# No GPU needed: the Triton kernels Inductor writes for a single stream's decoder layer on one.
kernels: $(BIN)/.installed
	$(BIN)/python bench/inductor_kernels.py --output docs/benchmarks.md

# On a CUDA host: the steps of bench/gpu_session.sh (GPU-only tests, the GPU benchmark as served,
# with and without compile and CUDA graphs, a kernel profile, compile time, and the engine before
# the GPU work ($(GPU_BASE)) vs now) -> bench/results/benchmarks.md. For a machine without this repo's
# packages or git (the device tool's), `make gpu-kit` here puts wheels for Python 3.12 in .whl/
# and the older engine in .base/; there, `bash bench/gpu_session.sh` runs the same steps.
GPU_BASE ?= 904f9a2
GPU_WHEELS = transformers==5.24.0 pydantic==2.14.4 pydantic-core==2.50.5 pydantic-settings==2.16.3 \
	annotated-types==0.8.0 typing-inspection==0.4.5 python-dotenv==1.2.4 regex
gpu-compare: $(BIN)/.installed .base/REVISION
	PYTHON=$(BIN)/python bash bench/gpu_session.sh

# gpu-kit also walks every step of the session on the CPU (--tiny, about five minutes, the session's
# slow tests): device time is short, and a step broken since the last commit that walked it should
# fail here, not there.
gpu-kit: $(BIN)/.installed .base/REVISION
	$(BIN)/pytest -q -m slow tests/test_bench_smoke.py
	rm -rf .whl && mkdir -p .whl
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		-d .whl $(GPU_WHEELS) 2>&1 | $(QUIET_PIP)
	@du -sh .whl .base

.base/REVISION:
	rm -rf .base && mkdir -p .base
	git archive $(GPU_BASE) glm4v_bento bench | tar -x -C .base
	git rev-parse --short $(GPU_BASE) > $@

load-test: $(TINY)/config.json
	$(BIN)/python bench/load_test.py --model $(TINY) --clients 64 --seconds 60 --output docs/benchmarks.md

bento: $(BIN)/.installed
	$(BIN)/glm4v-bento build

clean:
	rm -rf $(VENV) .models .pytest_cache .ruff_cache
