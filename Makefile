# The whole set-up on a fresh machine is `make demo` (the main job) and `make test` (every test):
# both run `make setup` first, which is idempotent.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
BUILD_DIR ?= build/cmake
JOBS ?= $(or $(MAX_JOBS),$(CMAKE_BUILD_PARALLEL_LEVEL),$(shell nproc))
OUT ?= gpu-check-out

.PHONY: setup deps catch2 build test test-simt test-python test-emulated test-cpp demo bench bounds gpu-check clean

setup: deps catch2 build

# A virtualenv with torch (installed from this machine's local wheels) and the test and build tools.
deps: $(VENV)/.deps-$(TORCH_VERSION)
$(VENV)/.deps-$(TORCH_VERSION): Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION) torchvision numpy pytest expecttest psutil matplotlib tqdm ninja \
		"cmake>=3.28" setuptools wheel
	touch $@

# Catch2 v2 (Debian package) for the C++ tests.
catch2:
	@dpkg -s catch2 >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq catch2; } \
		|| echo "warning: could not install Catch2 (Debian package catch2); the C++ tests need it"

# The one build (CMake, in $(BUILD_DIR)), through setup.py: the op library, copied into the package as
# python/flowformer/_C.so, then the Catch2 tests against that same library. The CPU kernels, and the CUDA
# kernels when nvcc exists (TORCH_CUDA_ARCH_LIST, default "8.0;9.0"; FLOWFORMER_CUDA=0: CPU only).
# Incremental: with nothing changed it takes seconds. The editable install (once) makes the package
# importable from the virtualenv; pip hides the build's output, hence the plain build before it. The
# tests are left out where Catch2 is missing, so that `make demo` does not need it (test-cpp then fails).
CPP_TESTS = $$(dpkg -s catch2 >/dev/null 2>&1 && echo ON || echo OFF)
BUILD_ENV = FLOWFORMER_BUILD_DIR=$(BUILD_DIR) MAX_JOBS=$(JOBS) \
	CMAKE_ARGS="-DFLOWFORMER_BUILD_TESTS=$(CPP_TESTS) -DFLOWFORMER_PYTHON=$(abspath $(PY))"
build: deps
	$(BUILD_ENV) $(PY) setup.py -q build_ext --inplace
	$(VENV)/bin/cmake --build $(BUILD_DIR) -j $(JOBS)
	@test -f $(VENV)/.flowformer-editable || { $(BUILD_ENV) $(PY) -m pip install -q --no-build-isolation \
		--no-deps -e . && touch $(VENV)/.flowformer-editable; }

test: setup test-simt test-python test-emulated test-cpp

# The SIMT emulator's own tests (kernels/simt; torch-free, ASan and UBSan) and the static checks of the
# sample kernels' sm_90 code and of the op library's fused kernels as `make build` compiled them (tests/static;
# needs nvcc, sm_90 in TORCH_CUDA_ARCH_LIST, and cuobjdump from the venv's triton wheel).
SIMT_BUILD_DIR ?= build/simt
SIMT_CONFIGURE = $(VENV)/bin/cmake -S tests/simt -B $(SIMT_BUILD_DIR) -G Ninja \
	-DCMAKE_MAKE_PROGRAM=$(abspath $(VENV))/bin/ninja -DPython3_EXECUTABLE=$(abspath $(PY)) \
	-DFLOWFORMER_LIBRARY=$(abspath $(BUILD_DIR))/libflowformer.so >/dev/null
test-simt: build catch2
	$(SIMT_CONFIGURE)
	$(VENV)/bin/cmake --build $(SIMT_BUILD_DIR) -j $(JOBS)
	$(VENV)/bin/ctest --test-dir $(SIMT_BUILD_DIR) --output-on-failure --no-tests=error -j $(JOBS)

# Lower bounds on the fused linear-attention kernels' GPU time, from what the emulator counts them doing and
# the issue slots of their sm_90 chunk loops (benchmarks/kernel_bounds.py); results in benchmarks/results/bounds.
SIMT_SASS = $(SIMT_BUILD_DIR)/libfused_kernels_bounds_sm90.so
bounds: deps catch2
	$(SIMT_CONFIGURE)
	$(VENV)/bin/cmake --build $(SIMT_BUILD_DIR) -j $(JOBS) --target kernel_counts \
		$$(command -v nvcc >/dev/null && echo fused_kernels_bounds_sm90)
	$(PY) benchmarks/kernel_bounds.py --counts $(SIMT_BUILD_DIR)/kernel_counts \
		$$(test -f $(SIMT_SASS) && echo --sass $(SIMT_SASS)) --out benchmarks/results/bounds

test-python:
	$(PY) -m pytest tests/python -q -p no:cacheprovider

# The op tests again, with the CPU backends running the CUDA backends' algorithms: their CUDA item kernel
# (kernels/common/item_kernel.cuh) in the SIMT emulator, so the CUDA code is tested without a GPU.
test-emulated:
	FLOWFORMER_EMULATE_CUDA=1 $(PY) -m pytest tests/python -q -p no:cacheprovider -k "flow_attention or linear_attention or aft"

# The Catch2 tests and the C++ package, from the build that `make build` made (no second compile).
test-cpp: setup
	$(VENV)/bin/ctest --test-dir $(BUILD_DIR) --output-on-failure --no-tests=error -j $(JOBS)

demo: setup
	$(PY) -m flowformer.demo

# A quick CPU benchmark; results (JSON, markdown, PNG) go to benchmarks/results/cpu; then the kernel bounds.
bench: setup bounds
	$(PY) benchmarks/bench_flow_attention.py --device cpu --lengths 1024,2048,4096 --out benchmarks/results/cpu
	$(PY) benchmarks/bench_linear_attention.py --device cpu --lengths 1024,2048,4096 --out benchmarks/results/cpu
	$(PY) benchmarks/bench_aft.py --device cpu --batch 2 --heads 8 --dim 64 --lengths 256,512,1024 \
		--out benchmarks/results/cpu

# On a CUDA machine (no network needed), in about 8 minutes: build for that GPU, the SIMT layout probe, the
# CUDA tests, compute-sanitizer (four tools), benchmarks (two lengths; linear attention's decoding step and
# length sweeps); results and a summary in $(OUT).
gpu-check:
	bash benchmarks/gpu_check.sh $(OUT)

clean:
	rm -rf build python/flowformer/_C*.so $(OUT)
