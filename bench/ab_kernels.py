"""Two builds of the same layer side by side: each kernel of library A and of library B timed in
alternating rounds on the same inputs, so that clock drift and a warming GPU hit both alike.

Usage: python3 bench/ab_kernels.py NEW_DIR OLD_DIR [NEW_DIR OLD_DIR ...] [--shapes 1x16384]
       [--rounds 7] [--kernels attention,qkv_proj]

Per pair and B×S: binds the same random weights and x to both, then `--rounds` times times each
kernel of A then of B (CUDA events, median of 20 after 3 warm-ups). Prints, per kernel, the
median over rounds of each and the ratio new / old with its range over the rounds.
"""

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import ccc  # noqa: E402
from ccc.library import TORCH_DTYPES  # noqa: E402
from kernel_bench import median_ms  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("libraries", nargs="+", help="pairs: new, old")
    parser.add_argument("--shapes", default="1x16384")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--kernels", help="comma-separated kernel suffixes (default: all)")
    args = parser.parse_args()
    if len(args.libraries) % 2:
        parser.error("libraries come in pairs: new, old")
    for new_dir, old_dir in zip(args.libraries[::2], args.libraries[1::2]):
        layers = [ccc.load(new_dir), ccc.load(old_dir)]
        weights = layers[0].random_state_dict(seed=0)
        for shape in args.shapes.split(","):
            batch, seq = (int(v) for v in shape.split("x"))
            x = torch.randn(batch, seq, layers[0].spec.model_dim, device="cuda").to(TORCH_DTYPES[layers[0].spec.dtype])
            calls = [layer.bind(x, weights, poison=False) for layer in layers]
            for call in calls:
                call.run(check_each=False)
            name = layers[0].name
            suffixes = [launch.symbol[len(name) + 1:] for launch in calls[0].plan.launches]
            if args.kernels:
                suffixes = [s for s in suffixes if s in args.kernels.split(",")]
            times = {s: ([], []) for s in suffixes}
            for _ in range(args.rounds):
                for suffix in suffixes:
                    for side, call in enumerate(calls):
                        times[suffix][side].append(median_ms(lambda: call.run_kernel(suffix, check_each=False)))
            print(f"{name} B={batch} S={seq} ({args.rounds} rounds): new {new_dir} vs old {old_dir}")
            for suffix, (new, old) in times.items():
                ratios = [n / o for n, o in zip(new, old)]
                print(f"  {suffix:14s} new {statistics.median(new):7.3f} ms  old {statistics.median(old):7.3f} ms  "
                      f"new/old {statistics.median(ratios):.3f} (rounds {min(ratios):.3f} .. {max(ratios):.3f})")


if __name__ == "__main__":
    main()
