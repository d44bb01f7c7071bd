"""Nsight Compute's view of chosen kernels of one or more libraries, old beside new.

Usage: python3 bench/profile_kernels.py LIBRARY_DIR... [--kernels qk_prologue,attention]
       [--shape 1x16384] [--backward] [--out DIR]

For each library and kernel suffix, runs `ncu` (from PATH or /usr/local/cuda/bin) on a child
process that binds random weights and runs the library's forward once at the shape (with
--backward, then its backward on what the forward saved, for backward kernels such as
attention_bwd_one_pass), profiling the first launch of that kernel with the sections that explain
a time: speed of light, compute workload, occupancy, launch statistics, warp states, memory
workload, scheduler, and each stall reason per issued instruction. Prints the lines that matter
(duration, throughputs, registers, occupancy and its limits, eligible warps, stalls) per library
and kernel, and writes each full report to DIR/<library>_<kernel>.txt.
"""

import argparse
import os
import shutil
import subprocess
import sys

SECTIONS = [
    "SpeedOfLight", "ComputeWorkloadAnalysis", "Occupancy", "LaunchStats", "WarpStateStats", "MemoryWorkloadAnalysis",
    "SchedulerStats",
]
# Why warps wait, per issued instruction (the warp-state breakdown the section only summarises).
STALL_METRICS = "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio"
KEYS = (
    "Duration", "Throughput", "Registers Per Thread", "Achieved Occupancy", "Theoretical Occupancy",
    "Block Limit Registers", "Block Limit Shared Mem", "Eligible Warps", "Issued Warp", "No Eligible",
    "L1/TEX Hit", "L2 Hit", "Warp Cycles Per Issued", "issue_stalled", "Executed Ipc",
)


def run_once(directory, shape, backward):
    """The child: one forward of the library at `shape`, then its backward if asked."""
    import torch

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
    import ccc
    from ccc.library import TORCH_DTYPES

    layer = ccc.load(directory)
    batch, seq = (int(v) for v in shape.split("x"))
    x = torch.randn(batch, seq, layer.spec.model_dim, device="cuda").to(TORCH_DTYPES[layer.spec.dtype])
    weights = layer.random_state_dict(seed=0)
    call = layer.bind(x, weights, poison=False)
    call.run(check_each=False)
    if backward:
        layer.bind_backward(x, weights, call.saved(), torch.randn_like(x), poison=False).run(check_each=False)
    torch.cuda.synchronize()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("libraries", nargs="+")
    parser.add_argument("--kernels", default="qk_prologue,attention")
    parser.add_argument("--shape", default="1x16384")
    parser.add_argument("--backward", action="store_true", help="also run the backward (profile its kernels)")
    parser.add_argument("--out", default="profile-out")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_once(args.libraries[0], args.shape, args.backward)
        return
    ncu = shutil.which("ncu") or "/usr/local/cuda/bin/ncu"
    if not os.path.exists(ncu):
        sys.exit("profile_kernels: no ncu on PATH or in /usr/local/cuda/bin")
    os.makedirs(args.out, exist_ok=True)
    for directory in args.libraries:
        for suffix in args.kernels.split(","):
            command = [ncu, "--kernel-name", f"regex:_{suffix}$", "--launch-count", "1"]
            for section in SECTIONS:
                command += ["--section", section]
            command += ["--metrics", STALL_METRICS]
            command += [sys.executable, os.path.abspath(__file__), directory, "--child", "--shape", args.shape]
            if args.backward:
                command.append("--backward")
            result = subprocess.run(command, capture_output=True, text=True, timeout=300)
            name = directory.strip("/").replace("/", "_") + f"_{suffix}"
            with open(os.path.join(args.out, f"{name}.txt"), "w") as handle:
                handle.write(result.stdout + result.stderr)
            print(f"=== {directory} {suffix} (ncu exit {result.returncode})")
            for line in result.stdout.splitlines():
                if any(key in line for key in KEYS):
                    print("   ", " ".join(line.split()))


if __name__ == "__main__":
    main()
