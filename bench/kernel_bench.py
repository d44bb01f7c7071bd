"""What the standalone kernel scripts share (bench/hopper_attention.py, bench/hopper_gemm.py,
bench/kernel_times.py): loading PTX kernels described by a JSON index and launching them on
torch's current stream (through ccc.driver, the loader's launch path), the median of
CUDA-event timings, and the closing report of the checking scripts. (bench/bench.py has its own timer: it flushes the L2 and adapts the count.)"""

import json
import os
import re
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from ccc import driver  # noqa: E402


def load_kernels(ptx_dir, index_file, pattern):
    """{name: (spec, module, function)} for the kernels of `ptx_dir/index_file` whose name matches
    `pattern`; each `<name>.ptx` loaded on torch's current GPU with ccc.driver, allowed the spec's
    `dynamic_shared_bytes`."""
    with open(os.path.join(ptx_dir, index_file)) as handle:
        specs = json.load(handle)
    device = torch.cuda.current_device()
    kernels = {}
    for spec in specs:
        if not re.search(pattern, spec["name"]):
            continue
        module = driver.load_module(os.path.join(ptx_dir, spec["name"] + ".ptx"), device)
        kernels[spec["name"]] = (spec, module, driver.function(module, spec["name"], spec["dynamic_shared_bytes"]))
    return kernels


def launch(function, grid, threads, shared, args):
    """Launches `function` (of `load_kernels`) on torch's current stream with 1-D blocks of
    `threads`; `args` as ccc.driver.launch takes them."""
    driver.launch(function, grid, (threads,), shared, torch.cuda.current_stream().cuda_stream, args)


def median_ms(fn, reps=20, warmup=3):
    """Median of `reps` CUDA-event timings of `fn()` on the current stream, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def finish(report, out, all_ok):
    """Writes `report` as JSON to `out` (when given), prints the verdict and exits: 0 when every
    check passed, 1 otherwise."""
    if out:
        with open(out, "w") as handle:
            json.dump(report, handle, indent=1)
    print("\nall correct" if all_ok else "\nSOME CHECKS FAILED")
    sys.exit(0 if all_ok else 1)
