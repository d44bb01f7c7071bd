#!/usr/bin/env bash
# Runs HERE (the CPU machine with Rust and LLVM). Builds everything the GPU machine needs, since it
# has neither, into gpu-carry/ (git-ignored; pass it to the remote run as a carried path):
#   gpu-carry/ccc-run                      the runtime CLI, checked not to link LLVM
#   gpu-carry/runtime-gpu-tests            the runtime's GPU test binary (tests/gpu.rs)
#   gpu-carry/libs/<example>/<block>/      manifest.json + PTX + cubin of every examples/*.attn
#   gpu-carry/train/<example>/<block>/     every example compiled with emit = [forward, backward]
#   gpu-carry/serve/<example>/<block>/     every example compiled with emit = [forward, decode]
#   gpu-carry/libs/short_windows/<block>/  sliding windows of 7 and 100 keys (d 128 and 64),
#                                          written below: the examples' only window (4096) is
#                                          not shorter than the suite's S but at 4097
#   gpu-carry/libs/random_<i>/random_<i>/  with GPU_PREPARE_RANDOM=N: N seeded random specs
#                                          (scripts/random-specs.py, seed GPU_PREPARE_RANDOM_SEED)
#   gpu-carry/hopper-ptx.tar.xz            with GPU_PREPARE_HOPPER_PTX=1: the Hopper kernel
#                                          variants of tests/codegen_hopper.rs (every tile
#                                          candidate), for bench/hopper_attention.py and
#                                          bench/hopper_gemm.py; gpu-sweep.sh unpacks it
#   gpu-carry/decode-ptx/                  the decode kernels of tests/ir_kernel_decode.rs
#                                          (decode.json), for bench/decode_attention.py
#   gpu-carry/tune/zaya1/                  with GPU_PREPARE_TUNE=1: the candidate libraries of
#                                          `ccc tune examples/zaya1.attn --top 6`, for the
#                                          sweep's `tune` step (ccc-run tune)
#   gpu-carry/old/<example>/               with GPU_PREPARE_OLD=REV: zaya1, mha and
#                                          sliding_window compiled by the compiler of git
#                                          revision REV (built in a worktree under target/), for
#                                          the sweep's `ab` step (bench/ab_kernels.py), and
#                                          gpu-carry/old-train/<example>/: zaya1 and mha
#                                          with the backward, for the `train` step's times
# Then on the GPU machine: bash scripts/gpu-suite.sh (docs/gpu-tests.md).
set -euo pipefail
cd "$(dirname "$0")/.."
carry=gpu-carry

# ccc-run in its own cargo invocation: built together with the `ccc` binary, cargo would unify
# ccc's features and link LLVM into the runtime too.
cargo build --release -p ccc-runtime --bin ccc-run
if ldd target/release/ccc-run | grep -i llvm; then
  echo "gpu-prepare: target/release/ccc-run links LLVM; the GPU machine cannot run it" >&2
  exit 1
fi
gpu_tests=$(cargo test --release -p ccc-runtime --test gpu --no-run --message-format=json |
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
[ -x "$gpu_tests" ] || { echo "gpu-prepare: could not find the GPU test binary" >&2; exit 1; }
cargo build --release --bin ccc

rm -rf "$carry/libs" "$carry/ccc-run" "$carry/runtime-gpu-tests"
mkdir -p "$carry/libs"
cp target/release/ccc-run "$carry/ccc-run"
cp "$gpu_tests" "$carry/runtime-gpu-tests"
# Line tables are of no use there and the carried tree is size-limited.
strip "$carry/ccc-run" "$carry/runtime-gpu-tests"

shopt -s nullglob
examples=(examples/*.attn)
if [ ${#examples[@]} -eq 0 ]; then
  echo "gpu-prepare: no examples/*.attn to compile" >&2
  exit 1
fi
# Windows shorter than every suite length but 1 (S 17, 1000, 4097), so that a window bound off
# by one key changes many rows: each of d 128 and 64 with a window of 7 and of 100, over both
# dtypes, a plain GQA/MHA/MQA core and one with a prologue (RoPE, L2 norm, q-k mean). Not
# examples: examples/ are the bundled user-facing specs, these exist for the GPU suite only.
extra=$(mktemp -d)
cat >"$extra/short_windows.attn" <<'ATTN'
// scripts/gpu-prepare.sh: sliding windows shorter than the GPU suite's sequence lengths.
attention window7_d128 {
    model_dim = 1024, head_dim = 128, query_heads = 8, kv_heads = 2
    rope { theta = 10_000 }
    mask = sliding_window(7)
}
attention window100_d128 {
    model_dim = 1024, head_dim = 128, query_heads = 8, kv_heads = 8
    mask = sliding_window(100)
    dtype = f16
}
attention window7_d64 {
    model_dim = 512, head_dim = 64, query_heads = 8, kv_heads = 1
    rope { theta = 500_000, style = interleaved }
    mask = sliding_window(7)
    dtype = f16
}
attention window100_d64 {
    model_dim = 512, head_dim = 64, query_heads = 8, kv_heads = 4
    qk_mean = true, qk_norm = l2, key_temperature = learned
    rope { fraction = 0.5 }
    mask = sliding_window(100)
}
ATTN
examples+=("$extra/short_windows.attn")
if [ "${GPU_PREPARE_RANDOM:-0}" -gt 0 ]; then
  rm -rf target/random-specs
  python3 scripts/random-specs.py --count "$GPU_PREPARE_RANDOM" --seed "${GPU_PREPARE_RANDOM_SEED:-0}" \
    --out target/random-specs
  examples+=(target/random-specs/*.attn)
fi
failed=()
for file in "${examples[@]}"; do
  name=$(basename "$file" .attn)
  # The examples carry cubins (the loaders' cubin path); the random specs only PTX (the carried
  # tree is size-limited; the driver JIT-compiles them, the loaders' PTX path).
  flag=--cubin
  [[ $file == target/random-specs/* ]] && flag=--ptxas
  if ! ./target/release/ccc compile "$file" -o "$carry/libs/$name" $flag; then
    failed+=("$file")
  fi
done
# Every example again with `emit = [forward, backward]` (train/, for tests/python/gpu_autograd.py)
# and with `emit = [forward, decode]` (serve/, for bench/decode_step.py).
for kind in train serve; do
  case $kind in
    train) emit="forward, backward" ;;
    serve) emit="forward, decode" ;;
  esac
  rm -rf "$carry/$kind" "$extra/$kind"
  mkdir -p "$extra/$kind"
  for file in examples/*.attn; do
    name=$(basename "$file" .attn)
    python3 - "$file" "$extra/$kind/$name.attn" "$emit" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
emit = f"emit = [{sys.argv[3]}]"
text, found = re.subn(r"emit\s*=\s*\[[^\]]*\]", emit, text)
if not found:
    text = re.sub(r"\}\s*$", f"    {emit}\n}}\n", text.rstrip())
open(sys.argv[2], "w").write(text)
PY
    if ! ./target/release/ccc compile "$extra/$kind/$name.attn" -o "$carry/$kind/$name" --ptxas; then
      failed+=("$extra/$kind/$name.attn")
    fi
  done
done

# A two-layer ZAYA model's libraries (one causal, one sliding-window layer, with decode), from the
# config tests/python/gpu_hf_patch.py builds its model from, for the sweep's `hf` step.
rm -rf "$carry/hf"
mkdir -p "$carry/hf"
python3 tests/python/gpu_hf_patch.py --write-config "$carry/hf/config.json"
./target/release/ccc spec --from-hf "$carry/hf/config.json" -o "$extra/hf.attn"
python3 - "$extra/hf.attn" <<'PY'
import re, sys
text = open(sys.argv[1]).read()
open(sys.argv[1], "w").write(re.sub(r"\n\}", "\n    emit = [forward, decode]\n}", text))
PY
./target/release/ccc compile "$extra/hf.attn" -o "$carry/hf/libs" --ptxas || failed+=("$extra/hf.attn")

# ZAYA1 without each of its prologue's steps (GPU_PREPARE_ABLATE=1), for the sweep's `ablate`
# step: each variant's qk_prologue timed beside the whole one says what each step costs.
rm -rf "$carry/ablate"
if [ "${GPU_PREPARE_ABLATE:-0}" = 1 ]; then
  for variant in no_mean no_norm no_rope no_depthwise no_per_head no_conv; do
    python3 - examples/zaya1.attn "$extra/ablate_$variant.attn" "$variant" <<'PY'
import re, sys
text, variant = open(sys.argv[1]).read(), sys.argv[3]
text = text.replace("attention zaya1", f"attention zaya1_{variant}")
edits = {
    "no_mean": [(r"qk_mean\s*=\s*true", "qk_mean = false")],
    "no_norm": [(r"qk_norm\s*=\s*l2", "qk_norm = none"), (r"key_temperature\s*=\s*learned", "key_temperature = none")],
    "no_rope": [(r"\n\s*rope \{[^}]*\}[^\n]*", "")],
    "no_depthwise": [(r"\n\s*depthwise\([^)]*\)[^\n]*", "")],
    "no_per_head": [(r"\n\s*per_head\([^)]*\)[^\n]*", "")],
    "no_conv": [(r"\n\s*qk_conv \{.*?\n\s*\}[^\n]*", "")],
}[variant]
for pattern, replacement in edits:
    text, found = re.subn(pattern, replacement, text, flags=re.S)
    assert found, (variant, pattern)
open(sys.argv[2], "w").write(text)
PY
    ./target/release/ccc compile "$extra/ablate_$variant.attn" -o "$carry/ablate" || failed+=("ablate $variant")
  done
fi

rm -rf "$carry/hopper-ptx" "$carry/hopper-ptx.tar.xz"
if [ "${GPU_PREPARE_HOPPER_PTX:-0}" = 1 ]; then
  CCC_HOPPER_PTX_OUT="$PWD/$carry/hopper-ptx" cargo test --release --test codegen_hopper assembles >/dev/null
  # Every tile candidate's PTX is about 37 MB, a 2 MB archive: the carried tree is size-limited.
  # gpu-sweep.sh unpacks it on the GPU machine.
  tar -C "$carry" -cJf "$carry/hopper-ptx.tar.xz" hopper-ptx
  rm -rf "$carry/hopper-ptx"
fi
rm -rf "$carry/decode-ptx"
CCC_HOPPER_PTX_OUT="$PWD/$carry/decode-ptx" cargo test --release --test ir_kernel_decode every_example >/dev/null

rm -rf "$carry/tune"
if [ "${GPU_PREPARE_TUNE:-0}" = 1 ]; then
  ./target/release/ccc tune examples/zaya1.attn -o "$carry/tune" --top 6 >/dev/null
fi

rm -rf "$carry/old" "$carry/old-train"
if [ -n "${GPU_PREPARE_OLD:-}" ]; then
  old_tree=target/old-compiler
  rm -rf "$old_tree"
  git worktree prune
  git worktree add --detach "$old_tree" "$GPU_PREPARE_OLD" >/dev/null
  CARGO_TARGET_DIR="$PWD/target/old-compiler-target" cargo build --release --bin ccc --manifest-path "$old_tree/Cargo.toml"
  for name in zaya1 mha sliding_window; do
    target/old-compiler-target/release/ccc compile "examples/$name.attn" -o "$carry/old" --no-cache || failed+=("old $name")
  done
  # The training libraries too, for the sweep's `train` step (backward kernel times side by side).
  for name in zaya1 mha; do
    target/old-compiler-target/release/ccc compile "$extra/train/$name.attn" -o "$carry/old-train/$name" --no-cache ||
      failed+=("old train $name")
  done
  git worktree remove --force "$old_tree"
fi

echo "gpu-prepare: $carry holds:"
ls -l "$carry"
find "$carry/libs" -name manifest.json | sort | sed 's|/manifest.json$||; s|^|  library |'
du -sh "$carry"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu-prepare: ccc compile failed for: ${failed[*]}" >&2
  exit 1
fi
