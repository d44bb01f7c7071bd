#!/usr/bin/env bash
# Runs ON the GPU machine: one session's whole check-and-benchmark sweep in one remote call, each
# step under its own time limit so that a hung kernel costs that step, not the call.
#   1. hopper: with gpu-carry/hopper-ptx (GPU_PREPARE_HOPPER_PTX=1): the standalone Hopper
#      kernels, correctness only (bench/hopper_gemm.py, bench/hopper_attention.py --skip-timing):
#      a hang shows here first, within its step's limit;
#   2. runtime-tests: the runtime's GPU tests (gpu-carry/runtime-gpu-tests: the hand-written PTX
#      fixture through load, launch, NaN poisoning, timing, and ccc-run's CLI); the suite then
#      skips them, so that they run once;
#   3. suite: the GPU suite (scripts/gpu-suite.sh): B 1 and 3 × S 1, 17, 1000, then B 1 × S 4097;
#   4. python-gpu: tests/python/gpu_smoke.py (the Python loader on the fixture library, its error
#      messages, the torch reference against Hugging Face's ZayaAttention);
#   5. validate: python/validate.py (f64, storage-rounded and lse checks, docs/gpu-tests.md) on
#      zaya1 and mha at 1×4096 (ZAYA1 also against Hugging Face's layer) and on the sliding
#      windows (the example's 4096 and gpu-prepare.sh's short ones) at 2×1000;
#   6. times: bench/kernel_times.py (each kernel alone) on zaya1 and mha at 1×16384;
#   7. bench: bench/bench.py on zaya1, mha and sliding_window at S 4096, 8192, 16384, B 1, with
#      the peers (FlexAttention for the window);
#   8. tune (not default): with gpu-carry/tune (GPU_PREPARE_TUNE=1): ccc-run tune over ZAYA1's
#      candidates at 1×16384, writing $OUT/tune/tuning.json;
#   ab (not default): with gpu-carry/old (GPU_PREPARE_OLD=REV): bench/ab_kernels.py, every kernel
#      of zaya1, mha and sliding_window against the same examples compiled at REV, alternating
#      rounds at 1×16384 (a kernel change must stay within 3% of the build before it);
#   backward (not default): with gpu-carry/hopper-ptx (GPU_PREPARE_HOPPER_PTX=1):
#      bench/attention_backward.py, every example's attention backward kernels against PyTorch's
#      float32 autograd (beside its bf16 SDPA backward) at B 1, 3, 2, 1 × S 1, 17, 1000, 4097, and
#      timed at 1×8192 and 1×16384 beside SDPA's cuDNN and FlashAttention-2 backward; then
#      bench/layer_backward.py, the whole backward of every example (and two plain layers): dx and
#      every weight gradient against float64 autograd of python/ccc/reference.py (beside PyTorch's
#      16-bit autograd for the layers without CCA steps), timed; then bench/backward_stages.py, the
#      prologue backward's buffers of zaya1 and cca4x against float64 autograd of steps 3 to 6;
#   decode (not default): with gpu-carry/serve (every example compiled with decode):
#      bench/decode_step.py, chunked packed prefills and decode steps of every example (and of the
#      random specs, with GPU_PREPARE_RANDOM) against its forward over the whole sequences, ZAYA1-form
#      layers also against Hugging Face's ZayaAttention over 256 decode steps, then zaya1's step
#      timed at B 1, 8, 64, 256 × context 1k to 32k beside an MHA layer's decode step in PyTorch
#      and HF's, and packed prefills beside the forwards; a 3000-token prefill + 1000 steps of
#      every example; and
#      with gpu-carry/decode-ptx: bench/decode_attention.py, the raw decode attention kernels
#      against float32 attention, timed beside SDPA's decode on a dense cache, with the achieved
#      HBM bandwidth;
#   train (not default): with gpu-carry/train (every example compiled with backward):
#      tests/python/gpu_autograd.py (gradients through Layer.forward's autograd against float64,
#      opcheck, torch.compile), `ccc-run validate` of zaya1's and mha's training libraries,
#      bench/kernel_times.py --backward (each backward kernel alone at 1×16384; with
#      gpu-carry/old-train, GPU_PREPARE_OLD's builds beside them),
#      bench/train_loop.py (200 AdamW steps against HF's layer) and bench/bench.py --train
#      (forward + backward of the layer, backward of the core, beside the peers) at 4k, 8k and 16k;
#   profile (not default): bench/profile_kernels.py, Nsight Compute on the prologue and attention
#      of zaya1 and mha (and of gpu-carry/old's when there), reports in $OUT/profile;
#   ablate (not default): with gpu-carry/ablate (GPU_PREPARE_ABLATE=1), bench/kernel_times.py on
#      zaya1 and on zaya1 without each prologue step (mean, norm, RoPE, either convolution): what
#      each step of the prologue costs;
#   hf (not default): with gpu-carry/hf (gpu-prepare.sh), tests/python/gpu_hf_patch.py: a
#      two-layer ZAYA model patched with ccc.hf.patch against itself unpatched (logits, 64 greedy
#      tokens, torch.compile);
#   9. sanitize (not default, slow: run it alone): scripts/gpu-sanitize.sh, compute-sanitizer's
#      memcheck, racecheck, synccheck and initcheck over every non-random library at 2×300 and
#      1×1000, the table in $OUT/sanitize.md.
# Everything is written under $OUT (default sweep-out). About 6 to 7 minutes on an H200 (default steps).
# Usage: OUT=$OUT bash scripts/gpu-sweep.sh [STEP...]
#   (steps: hopper runtime-tests suite python-gpu validate times bench ab tune backward decode
#    train profile sanitize hf ablate)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-sweep-out}
mkdir -p "$out"
libs=gpu-carry/libs
# gpu-prepare.sh packs the standalone Hopper PTX (GPU_PREPARE_HOPPER_PTX=1).
if [ -f gpu-carry/hopper-ptx.tar.xz ] && [ ! -d gpu-carry/hopper-ptx ]; then
  tar -C gpu-carry -xJf gpu-carry/hopper-ptx.tar.xz
fi
steps=${*:-hopper runtime-tests suite python-gpu validate times bench}
# gpu-suite.sh runs the runtime's GPU tests first unless told not to: not twice in one sweep.
suite_skip_tests=0
[[ " $steps " == *" runtime-tests "* ]] && suite_skip_tests=1
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
        step hopper-gemm 240 python3 -u -W ignore bench/hopper_gemm.py --ptx-dir gpu-carry/hopper-ptx --skip-timing
        step hopper-attention 300 python3 -u -W ignore bench/hopper_attention.py --ptx-dir gpu-carry/hopper-ptx --skip-timing
      fi
      ;;
    runtime-tests)
      # --include-ignored: the GPU tests are #[ignore]d so that plain `cargo test` skips them.
      step runtime-tests 120 env CCC_RUN="$PWD/gpu-carry/ccc-run" CCC_PTXAS="$(command -v ptxas || true)" \
        gpu-carry/runtime-gpu-tests --include-ignored --test-threads 1
      ;;
    suite)
      step suite 200 env OUT="$out/suite" GPU_SUITE_SKIP_TESTS=$suite_skip_tests GPU_SUITE_SEQ_LENS="1 17 1000" \
        bash scripts/gpu-suite.sh
      step suite-4097 90 env OUT="$out/suite-4097" GPU_SUITE_SKIP_TESTS=1 GPU_SUITE_FAULT=0 GPU_SUITE_BATCHES=1 \
        GPU_SUITE_SEQ_LENS=4097 bash scripts/gpu-suite.sh
      ;;
    python-gpu) step python-gpu 120 python3 -u -W ignore tests/python/gpu_smoke.py ;;
    validate)
      step validate 90 python3 -u -W ignore python/validate.py "$libs/zaya1/zaya1" "$libs/mha/mha" --shapes 1x4096
      # Windows shorter than S, where a window bound off by one key changes many rows' lse.
      windows=("$libs/sliding_window/sliding_window")
      [ -d "$libs/short_windows" ] && windows+=("$libs"/short_windows/*/)
      step validate-windows 90 python3 -u -W ignore python/validate.py "${windows[@]}" --shapes 2x1000
      ;;
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
    ab)
      if [ -d gpu-carry/old ]; then
        pairs=()
        for name in zaya1 mha sliding_window; do
          [ -d "gpu-carry/old/$name" ] && pairs+=("$libs/$name/$name" "gpu-carry/old/$name")
        done
        step ab 150 python3 -u -W ignore bench/ab_kernels.py "${pairs[@]}" --shapes 1x16384 --rounds 5
      fi
      ;;
    backward)
      if [ -f gpu-carry/hopper-ptx/attention_backward.json ]; then
        step attention-backward 240 python3 -u -W ignore bench/attention_backward.py --ptx-dir gpu-carry/hopper-ptx \
          --out "$out/attention-backward.json"
        step layer-backward 240 python3 -u -W ignore bench/layer_backward.py --ptx-dir gpu-carry/hopper-ptx --time-shapes 1x16384 \
          --out "$out/layer-backward.json"
        step backward-stages 90 python3 -u -W ignore bench/backward_stages.py --ptx-dir gpu-carry/hopper-ptx
      fi
      ;;
    decode)
      if [ -d gpu-carry/serve ]; then
        served=("gpu-carry/serve/zaya1/zaya1")
        for dir in gpu-carry/serve/*/*/ "$libs"/random_*/*/; do
          [ -d "$dir" ] && [ "${dir%/}" != gpu-carry/serve/zaya1/zaya1 ] && served+=("${dir%/}")
        done
        step decode-step 400 python3 -u -W ignore bench/decode_step.py "${served[@]}" --time --hf-steps 256 --out "$out/decode-step.json"
        # A 3000-token prefill and 1000 decode steps of every example against the forward.
        step decode-long 300 python3 -u -W ignore bench/decode_step.py gpu-carry/serve/*/*/ --lens 3000 --steps 1000
        step decode-rust 120 env CCC_GPU_SERVE_LIB=gpu-carry/serve/zaya1/zaya1 gpu-carry/runtime-gpu-tests --ignored \
          prefill_and_decode_from_rust
        # Every decode kernel under memcheck (out-of-bounds page reads and writes), small shapes.
        step decode-memcheck 300 /usr/local/cuda/bin/compute-sanitizer --tool memcheck --error-exitcode 1 \
          python3 -u -W ignore bench/decode_step.py gpu-carry/serve/zaya1/zaya1 gpu-carry/serve/sliding_window/sliding_window \
          gpu-carry/serve/mha/mha --lens 0,1,17,40 --steps 2
      fi
      if [ -f gpu-carry/decode-ptx/decode.json ]; then
        step decode-attention 400 python3 -u -W ignore bench/decode_attention.py --ptx-dir gpu-carry/decode-ptx \
          --out "$out/decode-attention.json"
      fi
      ;;
    train)
      if [ -d gpu-carry/train ]; then
        step autograd 540 python3 -u -W ignore tests/python/gpu_autograd.py gpu-carry/train
        # One log for both libraries and the loop's plot at the top of $out: the device returns a
        # limited number of files, top-level ones first.
        step validate-train 120 bash -c 'status=0
          for name in zaya1 mha; do
            gpu-carry/ccc-run validate "gpu-carry/train/$name/$name" --batch 1,3 --seq-len 17,1000 || status=1
          done
          exit $status'
        # With gpu-carry/old-train (GPU_PREPARE_OLD), each library's old build right after it.
        timed=()
        for name in zaya1 mha; do
          timed+=("gpu-carry/train/$name/$name")
          [ -d "gpu-carry/old-train/$name" ] && timed+=("gpu-carry/old-train/$name/$name")
        done
        step times-backward 150 python3 -u -W ignore bench/kernel_times.py "${timed[@]}" --shapes 1x16384 --backward
        step train-loop 120 python3 -u -W ignore bench/train_loop.py gpu-carry/train/zaya1/zaya1 --out "$out"
        step bench-train 300 python3 -u -W ignore bench/bench.py gpu-carry/train/zaya1/zaya1 gpu-carry/train/mha/mha \
          --train --out "$out/bench-train" --seq-lens 4096,8192,16384 --batches 1
      fi
      ;;
    profile)
      profiled=("$libs/zaya1/zaya1" "$libs/mha/mha")
      for name in zaya1 mha; do
        [ -d "gpu-carry/old/$name" ] && profiled+=("gpu-carry/old/$name")
      done
      step profile 300 python3 -u -W ignore bench/profile_kernels.py "${profiled[@]}" --kernels qk_prologue,attention \
        --out "$out/profile"
      ;;
    sanitize) step sanitize 570 env OUT="$out" bash scripts/gpu-sanitize.sh ;;
    ablate)
      if [ -d gpu-carry/ablate ]; then
        step ablate 150 python3 -u -W ignore bench/kernel_times.py "$libs/zaya1/zaya1" gpu-carry/ablate/*/ --shapes 1x16384
      fi
      ;;
    hf)
      [ -d gpu-carry/hf/libs ] && step hf-patch 300 python3 -u -W ignore tests/python/gpu_hf_patch.py gpu-carry/hf/libs
      ;;
    *)
      echo "gpu-sweep: unknown step $s (hopper runtime-tests suite python-gpu validate times bench ab tune backward decode train profile sanitize hf ablate)" >&2
      exit 2
      ;;
  esac
done
exit "$failed"
