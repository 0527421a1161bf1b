#!/usr/bin/env bash
# make gpu-check: the whole check on a GPU machine in one call, sized for a short loan (about 8 minutes on a
# bare H200 machine: Python 3.12, torch, nvcc, compute-sanitizer; no network). Each step has a time limit
# and is timed; logs and results go to OUT_DIR (first argument) and benchmarks/results/<GPU>/; a summary
# table comes last.
#   1. build for this GPU only (TORCH_CUDA_ARCH_LIST=9.0 unless set, all cores), unless a carried build loads
#   2. the SIMT layout probe: the device's mma/ldmatrix lane -> element maps against the emulator's
#   3. the CUDA cases of the test suite
#   4. linear attention at issue 14's shape S1 and its decoding step (the figures most wanted, first)
#   5. compute-sanitizer memcheck, racecheck, synccheck and initcheck on small cases of every CUDA kernel
#   6. the other benchmarks, and linear attention's length sweeps against the peers
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-gpu-check-out}")
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
declare -a SUMMARY
START=$SECONDS

step() {  # step NAME LOG LIMIT_S COMMAND...: run under a time limit, log, record result and seconds
  local name=$1 log=$2 limit=$3 began=$SECONDS result
  shift 3
  echo "== $name (limit ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT/$log" 2>&1
  case $? in
    0) result=ok ;;
    124 | 137) result=TIMEOUT ;;
    *) result=FAILED ;;
  esac
  SUMMARY+=("$name|$result|$((SECONDS - began))|$log")
  tail -n 4 "$OUT/$log"
}

loads() {
  "$PYTHON" -c "import flowformer, torch; i = flowformer.build_info(); print(i, torch.cuda.get_device_name()); \
assert i['cuda'] and torch.cuda.get_device_capability()[0] * 10 in [a * 10 for a in i.get('cuda_archs', [])]"
}
if loads >"$OUT/build_info.log" 2>&1; then
  SUMMARY+=("build (carried, loads)|ok|0|build_info.log")
else
  step "build (sm_$(echo "$TORCH_CUDA_ARCH_LIST" | tr -d .), $MAX_JOBS jobs)" build.log 420 "$PYTHON" setup.py build_ext --inplace
  step "cuda kernels load" build_info.log 60 loads
fi

probe() {  # the same probe kernel on the device and in the emulator: the records must be equal
  nvcc -std=c++20 -O2 -arch=sm_90 -Ikernels -Itests/simt tests/simt/layout_probe.cu -o "$OUT/layout_probe" &&
    g++ -std=c++20 -O1 -Ikernels -Itests/simt tests/simt/layout_probe_emulated.cpp kernels/simt/fiber.cpp \
      kernels/simt/emulator.cpp kernels/simt/shared_memory.cpp -lpthread -o "$OUT/layout_probe_emulated" &&
    "$OUT/layout_probe" >"$OUT/layout_device.txt" && "$OUT/layout_probe_emulated" >"$OUT/layout_emulated.txt" &&
    diff "$OUT/layout_device.txt" "$OUT/layout_emulated.txt" && echo "device and emulator fragments agree"
}
step "simt layout probe (mma, ldmatrix)" layout_probe.log 120 probe

step "tests (CUDA cases)" pytest.log 240 "$PYTHON" -m pytest tests/python -q -p no:cacheprovider -k cuda -rs
GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo gpu)
# flash-linear-attention, the Triton peer of the linear-attention benchmarks, when its wheels were carried
# along in .whl/ (pip download --no-deps flash-linear-attention fla-core einops -d .whl): no network needed.
if ls .whl/fla_core-*.whl >/dev/null 2>&1; then
  step "install flash-linear-attention" fla.log 60 "$PYTHON" -m pip install --no-deps --no-index .whl/*.whl
fi
BENCH="--device cuda --dtype bfloat16 --dim 64 --repeat 20 --memory-budget-gib 60"
# Issue 14's shape S1 (B = 8, H = 16, L = 8192, D = M = 64) and L = 2048, every implementation but the
# compiled reference (its compilation alone would take much of the step's time).
step "benchmark linear_attention S1 (bf16)" bench_linear64.log 120 "$PYTHON" benchmarks/bench_linear_attention.py \
  $BENCH --batch 8 --heads 16 --lengths 2048,8192 --out "$OUT/bench/d64"
step "benchmark linear decoding step (bf16)" bench_decode.log 60 "$PYTHON" benchmarks/bench_linear_decode.py \
  --device cuda --dtype bfloat16 --batch 8 --heads 16 --dim 64 --histories 1024,8192,65536 --out "$OUT/bench/d64"
if command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck synccheck initcheck; do
    step "compute-sanitizer $tool" "$tool.log" 150 compute-sanitizer --tool "$tool" --error-exitcode 1 \
      "$PYTHON" tests/sanitizer_cases.py
  done
  step "compute-sanitizer racecheck (probe)" racecheck_probe.log 60 compute-sanitizer --tool racecheck \
    --error-exitcode 1 "$OUT/layout_probe"
else
  SUMMARY+=("compute-sanitizer|MISSING|0|-")
fi

step "benchmark flow_attention (bf16)" bench_flow.log 90 "$PYTHON" benchmarks/bench_flow_attention.py $BENCH \
  --batch 8 --heads 16 --lengths 2048,8192 --out "$OUT/bench"
step "benchmark aft_full C=512 (bf16)" bench_aft.log 90 "$PYTHON" benchmarks/bench_aft.py $BENCH \
  --batch 8 --heads 8 --lengths 1024,4096 --out "$OUT/bench"
# The length sweeps against the peers (no eager reference), at B H = 128 and B H = 8, causal.
for bh in "8 16" "1 8"; do
  set -- $bh
  step "benchmark linear_attention sweep B=$1 H=$2" "bench_sweep_b$1.log" 120 "$PYTHON" \
    benchmarks/bench_linear_attention.py $BENCH --batch "$1" --heads "$2" --lengths 1024,4096,16384,32768 \
    --modes causal,causal_unnormalized --impls sdpa,fla_chunk --out "$OUT/bench/sweep_b$1_h$2"
done
mkdir -p "benchmarks/results/$GPU" && cp -r "$OUT"/bench/* "benchmarks/results/$GPU/" 2>/dev/null

echo
echo "gpu-check summary ($GPU, $OUT, $((SECONDS - START)) s in all)"
printf '%-44s %-8s %6s  %s\n' step result seconds log
for row in "${SUMMARY[@]}"; do
  IFS='|' read -r name result seconds log <<<"$row"
  printf '%-44s %-8s %6s  %s\n' "$name" "$result" "$seconds" "$log"
done
printf '%s\n' "${SUMMARY[@]}" | grep -qE '\|(FAILED|TIMEOUT|MISSING)\|' && exit 1
exit 0
