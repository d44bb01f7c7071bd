#!/usr/bin/env bash
# Plants known kernel bugs in the kernel-IR builders, one at a time, and checks that the CPU tests
# catch each (the interpreter against the f64 reference): in the forward (tests/ir_kernel_roles.rs)
# a causal mask that leaks key t + 1, the q-k mean's ½ turned into 1, the RoPE styles swapped; in
# the backward (tests/ir_kernel_backward.rs) the two-pass kernels' mask leaking key t + 1 and
# RoPE's backward turning the same way as the forward; in the decode step
# (tests/ir_kernel_decode_step.rs) RoPE one position late and the convolution state not moved on;
# in the packed prefill (the same file) RoPE not counting the cached tokens and the merge with
# the cached keys mis-weighted.
# Each file is restored from git afterwards,
# also when interrupted. Exit status 0 when every mutation failed the tests, 1 when one slipped
# through. About two minutes per mutation (a release build of the tests, then the run).
set -uo pipefail
cd "$(dirname "$0")/.."

attention=src/ir/kernel/build/wgmma_attention.rs
builders=src/ir/kernel/build/qk_prologue.rs
attention_backward=src/ir/kernel/build/backward/attention.rs
serving=src/ir/kernel/build/decode.rs
for file in "$attention" "$builders" "$attention_backward" "$serving"; do
  if ! git diff --quiet -- "$file"; then
    echo "mutation-check: $file has uncommitted changes; commit or stash them first" >&2
    exit 2
  fi
done
trap 'git checkout -q -- "$attention" "$builders" "$attention_backward" "$serving"' EXIT

forward_tests=$'--test\tir_kernel_roles\t--\tthe_planned_kernel_ir\twgmma_attention_matches'
backward_tests=$'--test\tir_kernel_backward'
decode_tests=$'--test\tir_kernel_decode_step'
# name, file, text, replacement, test arguments (tab-separated: the texts hold `|`; the test
# arguments are the last fields)
mutations=(
  $'causal mask leaks key t+1\t'"$attention"$'\tvisible = visible.and(key.clone().le(query.clone()));\tvisible = visible.and(key.clone().le(query.clone() + int(1)));\t'"$forward_tests"
  $'q-k mean ½ becomes 1\t'"$builders"$'\tlet half = |e: Expr| Expr::Float(0.5) * e;\tlet half = |e: Expr| Expr::Float(1.0) * e;\t'"$forward_tests"
  $'RoPE styles swapped\t'"$builders"$'\tRopeStyle::Neox => (\tRopeStyle::Swapped => (\t'"$forward_tests"
  $'backward: the two-pass kernels\' mask leaks key t+1\t'"$attention_backward"$'\tmatch mask_allows(self.spec.mask, query, key) {\tmatch mask_allows(self.spec.mask, query + int(1), key) {\t'"$backward_tests"
  $'backward: RoPE turned forward\t'"$builders"$'\tlet sign = if inverse { Expr::Float(-1.0) * sign } else { sign };\tlet sign = sign;\t'"$backward_tests"
  $'decode: RoPE one position late\t'"$builders"$'\tRows::DecodeStep(_) => Expr::global("seq_lens", vec![var("b")]) - seq() + self.top(),\tRows::DecodeStep(_) => Expr::global("seq_lens", vec![var("b")]) + self.top(),\t'"$decode_tests"
  $'decode: convolution state not moved on\t'"$builders"$'\tplus(Expr::Col, self.lead as i64 + 1)\tplus(Expr::Col, self.lead as i64)\t'"$decode_tests"
  $'prefill: RoPE from the chunk\'s first token, not the cached length\t'"$builders"$'\tRows::Packed(_) => var("cached") + self.top() - var("seq_start"),\tRows::Packed(_) => self.top() - var("seq_start"),\t'"$decode_tests"
  $'prefill: the cached keys\' weight halved in the merge\t'"$serving"$'\texpr: (at_row(softmax.m) - at_row(softmax.m_new)).exp() },\texpr: (at_row(softmax.m) - at_row(softmax.m_new)).exp() * Expr::Float(0.5) },\t'"$decode_tests"
)
failed=0
for mutation in "${mutations[@]}"; do
  IFS=$'\t' read -r -a fields <<<"$mutation"
  name=${fields[0]} file=${fields[1]} text=${fields[2]} replacement=${fields[3]}
  test_args=("${fields[@]:4}")
  MUTATION_FILE="$file" MUTATION_TEXT="$text" MUTATION_REPLACEMENT="$replacement" python3 - <<'PY'
import os
path, text, replacement = os.environ["MUTATION_FILE"], os.environ["MUTATION_TEXT"], os.environ["MUTATION_REPLACEMENT"]
source = open(path).read()
if source.count(text) != 1:
    raise SystemExit(f"mutation-check: `{text}` is not in {path} exactly once; update the script")
source = source.replace(text, replacement)
if replacement.startswith("RopeStyle::Swapped"):
    # Swap the two arms: Neox takes Interleaved's pattern and the other way round.
    source = source.replace("RopeStyle::Interleaved => (", "RopeStyle::Neox => (").replace("RopeStyle::Swapped => (", "RopeStyle::Interleaved => (")
open(path, "w").write(source)
PY
  [ $? -eq 0 ] || exit 2
  if cargo test --release -q "${test_args[@]}" >/tmp/mutation-check.log 2>&1; then
    echo "MISSED  $name: the tests passed with it"
    failed=1
  else
    echo "caught  $name: $(grep -m1 -oE 'relative error [0-9.e+-]+|does not verify|error\[E[0-9]+\]' /tmp/mutation-check.log || echo 'tests failed')"
  fi
  git checkout -q -- "$file"
done
exit $failed
