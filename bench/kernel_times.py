"""Where a library's time goes: each kernel timed alone on the buffers of one whole run.

Usage: python3 bench/kernel_times.py LIBRARY_DIR... [--shapes 1x16384,8x4096] [--backward] [--out FILE]

For each library and B×S: binds random weights (ccc.random_state_dict) and x ~ N(0, 1), runs
the forward once, then times the whole entry point and each kernel alone (`run_kernel`), CUDA
events, 5 warm-ups, median of 30. With --backward (a library compiled with `emit = [forward,
backward]`), the entry point timed is the backward, on what that forward saved and dout ~ N(0, 1).
Prints ms per kernel and its share of the sum.
"""

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import ccc  # noqa: E402
from ccc.library import TORCH_DTYPES  # noqa: E402
from kernel_bench import median_ms  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("libraries", nargs="+")
    parser.add_argument("--shapes", default="1x16384")
    parser.add_argument("--backward", action="store_true", help="time the backward entry point")
    parser.add_argument("--out")
    args = parser.parse_args()
    report = []
    for directory in args.libraries:
        layer = ccc.load(directory)
        weights = layer.random_state_dict(seed=0)
        for shape in args.shapes.split(","):
            batch, seq = (int(v) for v in shape.split("x"))
            x = torch.randn(batch, seq, layer.spec.model_dim, device="cuda").to(TORCH_DTYPES[layer.spec.dtype])
            call = layer.bind(x, weights, poison=False)
            call.run(check_each=False)
            if args.backward:
                dout = torch.randn_like(x)
                call = layer.bind_backward(x, weights, call.saved(), dout, poison=False)
                call.run(check_each=False)
            total = median_ms(lambda: call.run(check_each=False), reps=30, warmup=5)
            kernels = {}
            for launch in call.plan.launches:
                suffix = launch.symbol[len(layer.name) + 1:]
                kernels[suffix] = median_ms(lambda: call.run_kernel(suffix, check_each=False), reps=30, warmup=5)
            parts = sum(kernels.values())
            entry = "backward" if args.backward else "forward"
            print(f"{layer.name} B={batch} S={seq}: whole {entry} {total:.3f} ms (kernels alone sum {parts:.3f})")
            for suffix, ms in kernels.items():
                print(f"  {suffix:14s} {ms:8.3f} ms  {100 * ms / parts:5.1f} %")
            report.append(dict(library=layer.name, B=batch, S=seq, entry=entry, total_ms=total, kernels_ms=kernels))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
