#!/usr/bin/env bash
# Runs ON the GPU machine: one session's whole check-and-benchmark sweep in one remote call, each
# step under its own time limit so that a hung kernel costs that step, not the call.
#   1. with gpu-carry/hopper-ptx (GPU_PREPARE_HOPPER_PTX=1): the standalone Hopper kernels,
#      correctness only (bench/hopper_gemm.py, bench/hopper_attention.py --skip-timing): a hang
#      shows here first, within its step's limit;
#   2. the GPU suite (scripts/gpu-suite.sh): B 1 and 3 × S 1, 17, 1000, then B 1 × S 4097;
#   3. python/validate.py on zaya1 and mha at 1×4096 (ZAYA1 also against Hugging Face's layer);
#   4. bench/kernel_times.py (each kernel alone) on zaya1 and mha at 1×16384;
#   5. bench/bench.py on zaya1, mha and sliding_window at S 4096, 8192, 16384, B 1, with the
#      peers (FlexAttention for the window);
#   6. with gpu-carry/tune (GPU_PREPARE_TUNE=1): ccc-run tune over ZAYA1's candidates at
#      1×16384, writing $OUT/tune/tuning.json (not part of the default steps).
# Everything is written under $OUT (default sweep-out). About 5 to 6 minutes on an H200.
# Usage: OUT=$OUT bash scripts/gpu-sweep.sh [STEP...]  (steps: hopper suite validate times bench tune)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-sweep-out}
mkdir -p "$out"
libs=gpu-carry/libs
steps=${*:-hopper suite validate times bench}
failed=0
step() {
  local name=$1 limit=$2
  shift 2
  echo "=== $name ($(date -u +%T) UTC, limit ${limit}s)"
  timeout "$limit" "$@" >"$out/$name.txt" 2>&1
  local status=$?
  tail -n 40 "$out/$name.txt"
  if [ "$status" -ne 0 ]; then
    [ "$status" -eq 124 ] && echo "gpu-sweep: $name timed out after ${limit}s" || echo "gpu-sweep: $name exited $status"
    failed=1
  fi
  return "$status"
}
for s in $steps; do
  case $s in
    hopper)
      if [ -d gpu-carry/hopper-ptx ]; then
        step hopper-gemm 90 python3 -u -W ignore bench/hopper_gemm.py --ptx-dir gpu-carry/hopper-ptx --skip-timing
        step hopper-attention 150 python3 -u -W ignore bench/hopper_attention.py --ptx-dir gpu-carry/hopper-ptx --skip-timing
      fi
      ;;
    suite)
      step suite 200 env OUT="$out/suite" GPU_SUITE_SEQ_LENS="1 17 1000" bash scripts/gpu-suite.sh
      step suite-4097 90 env OUT="$out/suite-4097" GPU_SUITE_SKIP_TESTS=1 GPU_SUITE_FAULT=0 GPU_SUITE_BATCHES=1 \
        GPU_SUITE_SEQ_LENS=4097 bash scripts/gpu-suite.sh
      ;;
    validate) step validate 90 python3 -u -W ignore python/validate.py "$libs/zaya1/zaya1" "$libs/mha/mha" --shapes 1x4096 ;;
    times) step times 60 python3 -u -W ignore bench/kernel_times.py "$libs/zaya1/zaya1" "$libs/mha/mha" --shapes 1x16384 ;;
    bench)
      step bench 200 python3 -u -W ignore bench/bench.py "$libs/zaya1/zaya1" "$libs/mha/mha" \
        "$libs/sliding_window/sliding_window" --out "$out/bench" --seq-lens 4096,8192,16384 --batches 1
      ;;
    tune)
      if [ -d gpu-carry/tune/zaya1 ]; then
        mkdir -p "$out/tune"
        step tune 240 gpu-carry/ccc-run tune gpu-carry/tune/zaya1 --batch 1 --seq-len 16384 \
          --out "$out/tune/tuning.json"
      fi
      ;;
    *) echo "gpu-sweep: unknown step $s (hopper suite validate times bench tune)" >&2; exit 2 ;;
  esac
done
exit "$failed"
