# The whole set-up on a fresh machine is `make demo` (the main job) and `make test` (every test):
# both run `make setup` first, which is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
BUILD_DIR ?= build/cmake
JOBS ?= $(shell nproc)
OUT ?= gpu-check-out
TORCH_CMAKE = $$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')

.PHONY: setup deps catch2 build test test-simt test-python test-emulated test-cpp cpp-build demo bench gpu-check clean

setup: deps catch2 build

# A virtualenv with torch (installed from this machine's local wheels) and the test and build tools.
deps: $(VENV)/.deps-$(TORCH_VERSION)
$(VENV)/.deps-$(TORCH_VERSION): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION) torchvision numpy pytest expecttest psutil matplotlib ninja \
		"cmake>=3.28" setuptools wheel
	touch $@

# Catch2 v2 (Debian package) for the C++ tests.
catch2:
	@dpkg -s catch2 >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq catch2; } \
		|| echo "warning: could not install Catch2 (Debian package catch2); the C++ tests need it"

# The op library, built in place (python/flowformer/_C.so): CPU kernels, and CUDA kernels when nvcc exists.
build: deps
	@if [ -f $(VENV)/.flowformer-editable ]; then \
		$(PY) setup.py -q build_ext --inplace; \
	else \
		$(PY) -m pip install -q --no-build-isolation --no-deps -e . && touch $(VENV)/.flowformer-editable; \
	fi

test: setup test-simt test-python test-emulated test-cpp

# The SIMT emulator's own tests (kernels/simt; torch-free, ASan and UBSan) and the static checks of the
# sample kernels' sm_90 code (tests/static; needs nvcc, and cuobjdump from the venv's triton wheel).
SIMT_BUILD_DIR ?= build/simt
test-simt: deps catch2
	$(VENV)/bin/cmake -S tests/simt -B $(SIMT_BUILD_DIR) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
		-DPython3_EXECUTABLE=$(abspath $(PY)) >/dev/null
	$(VENV)/bin/cmake --build $(SIMT_BUILD_DIR) -j $(JOBS)
	$(VENV)/bin/ctest --test-dir $(SIMT_BUILD_DIR) --output-on-failure --no-tests=error

test-python:
	$(PY) -m pytest tests/python -q -p no:cacheprovider

# The op tests again, with the CPU backends running the CUDA backends' algorithms (their item functions
# on host threads): the CUDA kernels' logic is tested on machines without a GPU.
test-emulated:
	FLOWFORMER_EMULATE_CUDA=1 $(PY) -m pytest tests/python -q -p no:cacheprovider -k "flow_attention or linear_attention or aft"

cpp-build: setup
	$(VENV)/bin/cmake -S . -B $(BUILD_DIR) -G Ninja -DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja \
		-DCMAKE_PREFIX_PATH="$(TORCH_CMAKE)" -DFLOWFORMER_PYTHON=$(abspath $(PY)) >/dev/null
	$(VENV)/bin/cmake --build $(BUILD_DIR) -j $(JOBS)

test-cpp: cpp-build
	$(VENV)/bin/ctest --test-dir $(BUILD_DIR) --output-on-failure

demo: setup
	$(PY) -m flowformer.demo

# A quick CPU benchmark; results (JSON, markdown, PNG) go to benchmarks/results/cpu.
bench: setup
	$(PY) benchmarks/bench_flow_attention.py --device cpu --lengths 1024,2048,4096 --out benchmarks/results/cpu
	$(PY) benchmarks/bench_linear_attention.py --device cpu --lengths 1024,2048,4096 --out benchmarks/results/cpu
	$(PY) benchmarks/bench_aft.py --device cpu --batch 2 --heads 8 --dim 64 --lengths 256,512,1024 \
		--out benchmarks/results/cpu

# On a CUDA machine (no network needed): build in place with its own torch, CUDA tests,
# compute-sanitizer, benchmarks; results and a summary go to $(OUT).
gpu-check:
	bash benchmarks/gpu_check.sh $(OUT)

clean:
	rm -rf build python/flowformer/_C*.so $(OUT)
