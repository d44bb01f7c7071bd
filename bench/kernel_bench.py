"""What the standalone kernel scripts share (bench/hopper_attention.py, bench/hopper_gemm.py,
bench/kernel_times.py): loading PTX kernels described by a JSON index, the median of
CUDA-event timings, and the closing report of the checking scripts. (bench/bench.py has its own timer: it flushes the L2 and adapts the count.)"""

import json
import os
import re
import statistics
import sys

import torch


def load_kernels(ptx_dir, index_file, pattern):
    """{name: (spec, module, function)} for the kernels of `ptx_dir/index_file` whose name matches
    `pattern`; each `<name>.ptx` loaded with cupy, its dynamic shared-memory limit raised to the
    spec's `dynamic_shared_bytes`."""
    import cupy

    with open(os.path.join(ptx_dir, index_file)) as handle:
        specs = json.load(handle)
    kernels = {}
    for spec in specs:
        if not re.search(pattern, spec["name"]):
            continue
        module = cupy.RawModule(path=os.path.join(ptx_dir, spec["name"] + ".ptx"))
        function = module.get_function(spec["name"])
        function.max_dynamic_shared_size_bytes = spec["dynamic_shared_bytes"]
        kernels[spec["name"]] = (spec, module, function)
    return kernels


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
