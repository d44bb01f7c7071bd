#!/usr/bin/env python3
"""Writes seeded random `.attn` specs for the GPU suite: FlashAttention-style random shapes through
the whole pipeline (projection segments of any width, GQA ratios, head_dim 16 to 128, every
mask, conv stages, q-k mean, value shift, norms, RoPE styles and fractions, bias, bf16/f16).

Usage: python3 scripts/random-specs.py --count N [--seed K] --out DIR

Every spec stays inside what the kernels tile (head_dim a multiple of 16, convolution widths up
to 4); `ccc check` must accept each one (scripts/gpu-prepare.sh compiles them, a refusal fails
the preparation). The same seed always gives the same files.
"""

import argparse
import os
import random


def random_spec(rng, index):
    d = rng.choice([16, 32, 64, 64, 128, 128])
    kv_heads = rng.choice([1, 1, 2, 3, 4])
    groups = rng.choice([1, 2, 3, 4])
    query_heads = kv_heads * groups
    model_dim = d * rng.choice([1, 2, 3, 4, 6, 8])
    lines = [f"attention random_{index} {{",
             f"    model_dim   = {model_dim}",
             f"    head_dim    = {d}",
             f"    query_heads = {query_heads}",
             f"    kv_heads    = {kv_heads}"]
    if rng.random() < 0.5:
        stages = [f"{rng.choice(['depthwise', 'per_head'])}(width = {rng.randint(1, 4)})"
                  for _ in range(rng.randint(1, 2))]
        lines.append("    qk_conv { " + "; ".join(stages) + " }")
    if rng.random() < 0.5:
        lines.append("    qk_mean = true")
    shift = rng.randint(0, kv_heads)
    if shift:
        lines.append(f"    value_shift = {shift}")
    if rng.random() < 0.5:
        lines.append("    qk_norm = l2")
        lines.append(f"    key_temperature = {rng.choice(['none', 'learned', 'learned_exp'])}")
    if rng.random() < 0.7:
        rotary = 2 * rng.randint(1, d // 2)
        style = rng.choice(["neox", "interleaved"])
        theta = rng.choice(["10_000", "5_000_000", "500"])
        lines.append(f"    rope {{ fraction = {rotary / d!r}, theta = {theta}, style = {style} }}")
    mask = rng.choice(["causal", "causal", "none", f"sliding_window({rng.choice([1, 7, 64, 100, 1000])})"])
    lines.append(f"    mask = {mask}")
    lines.append(f"    dtype = {rng.choice(['bf16', 'f16'])}")
    if rng.random() < 0.3:
        lines.append("    bias = true")
    # The decode and prefill entry points too, for bench/decode_step.py (the sweep's `decode` step).
    lines.append("    emit = [forward, decode]")
    lines.append("}")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    os.makedirs(args.out, exist_ok=True)
    for index in range(args.count):
        with open(os.path.join(args.out, f"random_{index}.attn"), "w") as handle:
            handle.write(f"// scripts/random-specs.py --seed {args.seed}, spec {index}\n")
            handle.write(random_spec(rng, index))


if __name__ == "__main__":
    main()
