#!/usr/bin/env bash
# Runs ON the GPU machine (CUDA driver, python3; no Rust, no LLVM), in the repo copy, with the
# artifacts scripts/gpu-prepare.sh built here and carried over in gpu-carry/:
#   1. the runtime's GPU tests (a hand-written PTX fixture: proves load, launch, NaN poisoning,
#      shared-memory opt-in, timing), then
#   2. `ccc-run validate` for every library under gpu-carry/libs × B × S, against the CPU reference.
# Prints one table row per case (library, B, S, worst relative L2 error, status) and, when $OUT is
# set, writes the table to $OUT/gpu-suite.md and every command's output to $OUT/gpu-suite.log.
#
# Usage: bash scripts/gpu-suite.sh [CARRY_DIR]        (default: gpu-carry)
# Environment, to split a long suite over several calls:
#   GPU_SUITE_BATCHES   default "1 3"
#   GPU_SUITE_SEQ_LENS  default "1 17 128 1000 4097"
#   GPU_SUITE_LIBS      only libraries whose path contains this text (default: all)
#   GPU_SUITE_SKIP_TESTS=1  skip step 1
#   GPU_SUITE_FAULT=0   skip the deliberately broken library (a wrong mask that must FAIL)
# Exit status: 0 when every case passes, 1 otherwise, 2 when the artifacts are missing, 3 when
# this machine has no usable GPU.
set -uo pipefail
cd "$(dirname "$0")/.."
carry=${1:-gpu-carry}
run="$PWD/$carry/ccc-run"
batches=${GPU_SUITE_BATCHES:-1 3}
seq_lens=${GPU_SUITE_SEQ_LENS:-1 17 128 1000 4097}
filter=${GPU_SUITE_LIBS:-}

log=/dev/null
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  log="$OUT/gpu-suite.log"
  : >"$log"
fi

if [ ! -x "$run" ]; then
  echo "gpu-suite: $run not found: run scripts/gpu-prepare.sh on the build machine and carry $carry" >&2
  exit 2
fi
nvidia-smi -L 2>&1 | tee -a "$log"

header=$'| library | B | S | max rel L2 err | status | seconds |\n|---|---|---|---|---|---|'
rows=()
failures=0

if [ "${GPU_SUITE_SKIP_TESTS:-0}" != 1 ]; then
  tests="$carry/runtime-gpu-tests"
  started=$SECONDS
  if [ -x "$tests" ]; then
    # --include-ignored: the GPU tests are #[ignore]d so that plain `cargo test` skips them.
    # The fixture's PTX is also assembled with the machine's ptxas when there is one.
    CCC_RUN="$run" CCC_PTXAS="$(command -v ptxas || true)" "$tests" --include-ignored --test-threads 1 \
      >>"$log" 2>&1
    code=$?
    if [ $code -eq 0 ]; then status=pass; else status="FAIL (exit $code, see log)"; failures=$((failures + 1)); fi
  else
    status="FAIL ($tests missing)"
    failures=$((failures + 1))
  fi
  rows+=("| runtime launch-path tests (PTX fixture) | - | - | - | $status | $((SECONDS - started)) |")
  echo "${rows[-1]}"
fi

mapfile -t libraries < <(find "$carry/libs" -name manifest.json 2>/dev/null | sed 's|/manifest.json$||' | sort)
if [ ${#libraries[@]} -eq 0 ]; then
  echo "gpu-suite: no libraries under $carry/libs" >&2
  failures=$((failures + 1))
fi

for lib in "${libraries[@]}"; do
  name=${lib#"$carry/libs/"}
  if [ -n "$filter" ] && [[ "$name" != *"$filter"* ]]; then continue; fi
  for b in $batches; do
    for s in $seq_lens; do
      started=$SECONDS
      # One invocation per case, so that a crash or timeout costs one row, not the rest.
      output=$("$run" validate "$lib" --batch "$b" --seq-len "$s" --seed 0 2>&1)
      code=$?
      printf '### %s B=%s S=%s (exit %s)\n%s\n\n' "$name" "$b" "$s" "$code" "$output" >>"$log"
      if [ $code -eq 3 ]; then
        echo "$output" >&2
        echo "gpu-suite: no usable GPU on this machine" >&2
        exit 3
      fi
      result=$(grep '^RESULT ' <<<"$output" | tail -1)
      if [ -n "$result" ]; then
        err=$(sed -n 's/.*max_rel_l2=\([^ ]*\).*/\1/p' <<<"$result")
        status=$(sed -n 's/.*status=\([^ ]*\).*/\1/p' <<<"$result")
        if [ "$status" != pass ]; then
          failing=$(grep -v '^RESULT ' <<<"$output" | awk '/FAIL/ { print $3 }' | paste -sd, -)
          status="FAIL ($failing)"
        fi
      else
        err=-
        status="ERROR (exit $code): $(tail -1 <<<"$output" | tr '|' '/')"
      fi
      [ "$status" = pass ] || failures=$((failures + 1))
      rows+=("| $name | $b | $s | $err | $status | $((SECONDS - started)) |")
      echo "${rows[-1]}"
    done
  done
done

# A library whose kernels disagree with its spec must be caught: flip the mask of a causal
# library's spec to `none` (its kernels stay causal) and expect validate to report FAIL (exit 1).
# Not a q-k-mean (CCA) library: with random weights their queries mostly attend to their own
# token, so a mask error moves the output by only ~4e-4.
broken_from=$(grep -L '"qk_mean": true' "${libraries[@]/%//manifest.json}" 2>/dev/null |
  xargs -r grep -l '"mask": "causal"' | head -1)
if [ -n "$broken_from" ] && [ "${GPU_SUITE_FAULT:-1}" = 1 ]; then
  broken=$(mktemp -d)/wrong_mask
  cp -r "$(dirname "$broken_from")" "$broken"
  sed -i 's/"mask": "causal"/"mask": "none"/' "$broken/manifest.json"
  started=$SECONDS
  output=$("$run" validate "$broken" --batch 1 --seq-len 128 --seed 0 2>&1)
  code=$?
  printf '### deliberately wrong mask (exit %s)\n%s\n\n' "$code" "$output" >>"$log"
  if [ $code -eq 1 ]; then status="pass (caught: validate failed as it must)"; else status="FAIL (not caught, exit $code)"; failures=$((failures + 1)); fi
  rows+=("| $(dirname "${broken_from#"$carry/libs/"}") with mask flipped to none | 1 | 128 | - | $status | $((SECONDS - started)) |")
  echo "${rows[-1]}"
fi

table=$(printf '%s\n' "$header" "${rows[@]}")
echo
echo "$table"
echo "gpu-suite: $failures failing row(s)"
if [ -n "${OUT:-}" ]; then
  {
    echo "# GPU suite, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    nvidia-smi -L 2>/dev/null | sed 's/^/    /'
    echo
    echo "$table"
    echo
    echo "$failures failing row(s). Tolerance: relative L2 error < 1e-2 (bf16), < 5e-3 (f16); any NaN fails."
  } >"$OUT/gpu-suite.md"
fi
[ $failures -eq 0 ]
