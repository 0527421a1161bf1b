#!/usr/bin/env bash
# make gpu-check: on a CUDA machine, build in place against its torch, run the test suite (CUDA cases
# included), compute-sanitizer memcheck and racecheck on small cases of every CUDA kernel, and the GPU
# benchmarks; write everything under OUT_DIR (first argument) and print a summary table last.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=$(realpath -m "${1:-gpu-check-out}")
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}"
declare -a SUMMARY

step() {  # step NAME LOG COMMAND...: run, log, record pass/fail
  local name=$1 log=$2
  shift 2
  echo "== $name"
  if "$@" >"$OUT/$log" 2>&1; then SUMMARY+=("$name|ok|$log"); else SUMMARY+=("$name|FAILED|$log"); fi
  tail -n 5 "$OUT/$log"
}

step "build" build.log env TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS="$(nproc)" "$PYTHON" setup.py build_ext --inplace
step "cuda kernels compiled" build_info.log "$PYTHON" -c \
  "import flowformer, torch; i = flowformer.build_info(); print(i, torch.cuda.get_device_name()); assert i['cuda']"
step "tests (CPU and CUDA)" pytest.log "$PYTHON" -m pytest tests/python -q -p no:cacheprovider -rs
if command -v compute-sanitizer >/dev/null; then
  step "compute-sanitizer memcheck" memcheck.log compute-sanitizer --tool memcheck --error-exitcode 1 \
    "$PYTHON" tests/sanitizer_cases.py
  step "compute-sanitizer racecheck" racecheck.log compute-sanitizer --tool racecheck --error-exitcode 1 \
    "$PYTHON" tests/sanitizer_cases.py
else
  SUMMARY+=("compute-sanitizer|MISSING|-")
fi
GPU=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo gpu)
# flash-linear-attention, the Triton peer of the linear-attention benchmark, when its wheels were carried
# along in .whl/ (pip download --no-deps flash-linear-attention fla-core -d .whl): no network needed.
if ls .whl/fla_core-*.whl >/dev/null 2>&1; then
  step "install flash-linear-attention" fla.log "$PYTHON" -m pip install --no-deps --no-index .whl/*.whl
fi
LENGTHS=1024,2048,4096,8192,16384,32768
step "benchmark flow_attention (bf16)" bench_flow.log "$PYTHON" benchmarks/bench_flow_attention.py --device cuda \
  --dtype bfloat16 --batch 8 --heads 16 --lengths $LENGTHS --compile --memory-budget-gib 60 --out "$OUT/bench"
step "benchmark linear_attention D=64 (bf16)" bench_linear64.log "$PYTHON" benchmarks/bench_linear_attention.py \
  --device cuda --dtype bfloat16 --batch 8 --heads 16 --dim 64 --lengths $LENGTHS --compile \
  --memory-budget-gib 60 --out "$OUT/bench/d64"
step "benchmark linear_attention D=128 (bf16)" bench_linear128.log "$PYTHON" benchmarks/bench_linear_attention.py \
  --device cuda --dtype bfloat16 --batch 8 --heads 16 --dim 128 --lengths $LENGTHS --memory-budget-gib 60 \
  --out "$OUT/bench/d128"
step "benchmark aft_full C=512 (bf16)" bench_aft.log "$PYTHON" benchmarks/bench_aft.py --device cuda \
  --dtype bfloat16 --batch 8 --heads 8 --dim 64 --lengths 256,512,1024,2048,4096,8192 --compile \
  --memory-budget-gib 60 --out "$OUT/bench"
mkdir -p "benchmarks/results/$GPU" && cp -r "$OUT"/bench/* "benchmarks/results/$GPU/" 2>/dev/null

echo
echo "gpu-check summary ($OUT)"
printf '%-36s %-8s %s\n' step result log
for row in "${SUMMARY[@]}"; do
  IFS='|' read -r name result log <<<"$row"
  printf '%-36s %-8s %s\n' "$name" "$result" "$log"
done
printf '%s\n' "${SUMMARY[@]}" | grep -q '|FAILED|' && exit 1
exit 0
