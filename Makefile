# edge-server: `make run` serves, `make test` tests. Both install what they need into .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
LLAMA_VERSION := 0.3.36
GPU ?= auto
ARGS ?=
MODEL ?=

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
CMAKE_ARGS_cpu := -DGGML_CUDA=OFF -DGGML_METAL=OFF
CMAKE_ARGS_cuda := -DGGML_CUDA=ON $(if $(CUDA_ARCHITECTURES),-DCMAKE_CUDA_ARCHITECTURES=$(CUDA_ARCHITECTURES))
CMAKE_ARGS_metal := -DGGML_METAL=ON
# Wheels are kept per backend, outside pip's cache (which keys on the sdist, not on CMAKE_ARGS),
# so a CPU wheel is never reused for a CUDA build or the other way round.
WHEELS := $(HOME)/.cache/edge-server/wheels/llama-cpp-python-$(LLAMA_VERSION)-$(BACKEND)
STAMP := $(VENV)/.edge-installed-$(BACKEND)
TEST_MODEL := models/generated/tiny-test.gguf

.PHONY: install install-test run test bench model tiny-model clean

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	@case "$(BACKEND)" in cpu|cuda|metal) ;; *) echo "GPU must be cpu, cuda or metal (got $(BACKEND))"; exit 2;; esac
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@if [ "$(BACKEND)" = cuda ] && ! command -v nvcc >/dev/null 2>&1; then export PATH=/usr/local/cuda/bin:$$PATH; fi; \
	if ! ls $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl >/dev/null 2>&1; then \
	  echo "building llama-cpp-python $(LLAMA_VERSION) for $(BACKEND) (about 5 minutes on 2 cores, once)"; \
	  mkdir -p $(WHEELS) && \
	  CMAKE_ARGS="$(CMAKE_ARGS_$(BACKEND))" CMAKE_BUILD_PARALLEL_LEVEL=$$(getconf _NPROCESSORS_ONLN) \
	    $(PIP) wheel --no-cache-dir --no-deps -w $(WHEELS) llama-cpp-python==$(LLAMA_VERSION) || exit 1; \
	fi
	$(PIP) install -q --force-reinstall --no-deps $(WHEELS)/llama_cpp_python-$(LLAMA_VERSION)-*.whl
	$(PIP) install -q -e .
	@rm -f $(VENV)/.edge-installed-*
	@touch $@

install-test: $(STAMP)
	$(PIP) install -q -e '.[test]'

run: install
	$(PY) -m edge_server serve $(if $(MODEL),--model $(MODEL)) $(ARGS)

$(TEST_MODEL): edge_server/synthetic.py | install
	$(PY) -m edge_server.synthetic $@

tiny-model: $(TEST_MODEL)

test: install-test tiny-model
	$(PY) -m pytest $(PYTEST_ARGS)

model: install
	$(PY) -c "from pathlib import Path; from edge_server.modelstore import DEFAULT_REPO, DEFAULT_FILE, download; print(download(DEFAULT_REPO, DEFAULT_FILE, Path('models')))"

bench: install
	@echo "make bench is not built yet: see the issue 'Continuous batching engine, prefix cache, and make bench'"; exit 1

clean:
	rm -rf $(VENV) models/generated .pytest_cache .hypothesis build *.egg-info
