"""Checks and times the wgmma projection GEMMs (ccc::codegen::hopper::gemm) on the GPU.

Usage: python3 bench/hopper_gemm.py --ptx-dir DIR [--kernels REGEX] [--out FILE] [--skip-timing]
       python3 bench/hopper_gemm.py --ptx-dir DIR --kernels REGEX --launch-only B:S   (under ncu)

DIR holds `<kernel>.ptx` and `gemms.json` (written by
`CCC_HOPPER_PTX_OUT=DIR cargo test --release --test codegen_hopper gemm`): for each kernel its
parameters in ABI order, the A operand and K, the column segments (weight, bias, cols,
destination, its width, the first column written, the row shift), threads and dynamic shared
memory, the grid (size expressions: one CTA per SM of the GPU), and for TMA kernels the tensor
maps they take after their ABI parameters ([buffer, box rows], encoded with
python/ccc/tensor_map.py; `a` seen as [B, S, K / d, d] when `a_head_dim` is set). Correctness:
every destination is poisoned with NaN, then compared column by column with a float32 reference
on the same inputs (`a` shifted down by row_shift rows with zeros in front, times Wᵀ, plus
bias), relative L2 < 1e-2 per segment and no NaN left. Timing: CUDA events, 3
warm-ups, median of 20, against torch.nn.functional.linear (cuBLAS) on all of the kernel's
weights concatenated (the same FLOPs). FLOPs: 2·B·S·K·(Σ cols).
"""

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

from kernel_bench import finish, launch as launch_kernel, load_kernels, median_ms

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from ccc import driver, tensor_map  # noqa: E402
from ccc.sizes import parse_size_expr  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


def make_tensors(spec, batch, seq, generator):
    """Random inputs (scaled so that outputs are O(1)) and NaN-poisoned destinations, by name."""
    dtype = DTYPES[spec["elem"]]
    k = spec["k"]
    tensors = {spec["a"]: torch.randn(batch, seq, k, generator=generator, device="cuda").to(dtype)}
    for s in spec["segments"]:
        tensors[s["weight"]] = (torch.randn(s["cols"], k, generator=generator, device="cuda") / math.sqrt(k)).to(dtype)
        if s["bias"]:
            tensors[s["bias"]] = torch.randn(s["cols"], generator=generator, device="cuda").to(dtype)
        tensors.setdefault(s["dest"], torch.full((batch, seq, s["dest_width"]), float("nan"), device="cuda", dtype=dtype))
    return tensors


def descriptor(spec, tensors, buffer, box_rows):
    """The TMA descriptor of `buffer` as a by-value argument (python/ccc/tensor_map.py): `a` as
    [B, S, K / d, d] when the kernel addresses it by head (`a_head_dim`), else as it is."""
    t = tensors[buffer]
    if buffer == spec["a"] and spec.get("a_head_dim"):
        d = spec["a_head_dim"]
        t = t.view(t.shape[0], t.shape[1], t.shape[2] // d, d)
    return tensor_map.kernel_argument(t, box_rows)


def launch(kernel, tensors, batch, seq):
    spec, _, function = kernel
    args = []
    for name in spec["params"]:
        if name == "B":
            args.append(driver.u32(batch))
        elif name == "S":
            args.append(driver.u32(seq))
        else:
            args.append(driver.u64(tensors[name].data_ptr()))
    for buffer, box_rows in spec.get("tensor_maps", []):
        args.append(descriptor(spec, tensors, buffer, box_rows))
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    env = {"B": batch, "S": seq, "SMs": sms}
    grid = tuple(parse_size_expr(g, "grid").eval(env) for g in spec["grid"])
    launch_kernel(function, grid, spec["threads"], spec["dynamic_shared_bytes"], args)


def check(kernel, batch, seq, generator):
    spec = kernel[0]
    tensors = make_tensors(spec, batch, seq, generator)
    launch(kernel, tensors, batch, seq)
    torch.cuda.synchronize()
    a = tensors[spec["a"]].float()
    worst = 0.0
    ok = True
    for s in spec["segments"]:
        shifted = torch.zeros_like(a)
        shifted[:, s["row_shift"]:] = a[:, : seq - s["row_shift"]] if s["row_shift"] < seq else 0
        expected = shifted @ tensors[s["weight"]].float().T
        if s["bias"]:
            expected += tensors[s["bias"]].float()
        got = tensors[s["dest"]][..., s["dest_col"] : s["dest_col"] + s["cols"]].float()
        error = ((got - expected).norm() / expected.norm().clamp_min(1e-30)).item()
        worst = max(worst, error)
        ok &= error < 1e-2
    for s in spec["segments"]:
        ok &= not torch.isnan(tensors[s["dest"]]).any().item()
    return ok, worst


def benchmark(kernel, batch, seq, generator, reps=20, warmup=3):
    spec = kernel[0]
    tensors = make_tensors(spec, batch, seq, generator)
    cols = sum(s["cols"] for s in spec["segments"])
    flops = 2 * batch * seq * spec["k"] * cols
    ours = median_ms(lambda: launch(kernel, tensors, batch, seq), reps, warmup)
    weight = torch.cat([tensors[s["weight"]] for s in spec["segments"]])
    bias = None
    if all(s["bias"] for s in spec["segments"]):
        bias = torch.cat([tensors[s["bias"]] for s in spec["segments"]])
    a = tensors[spec["a"]]
    cublas = median_ms(lambda: F.linear(a, weight, bias), reps, warmup)
    return {"ccc": (ours, flops / ours / 1e9), "cuBLAS": (cublas, flops / cublas / 1e9)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ptx-dir", required=True)
    parser.add_argument("--kernels", default="")
    parser.add_argument("--out")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--launch-only", metavar="B:S",
                        help="no checks: launch each selected kernel and cuBLAS once at this shape (for ncu)")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    kernels = load_kernels(args.ptx_dir, "gemms.json", args.kernels)
    generator = torch.Generator(device="cuda").manual_seed(0)
    if args.launch_only:
        batch, seq = map(int, args.launch_only.split(":"))
        for name, kernel in kernels.items():
            print(name, benchmark(kernel, batch, seq, generator, reps=1, warmup=0))
        return
    report = {"correctness": [], "timing": []}
    all_ok = True
    print("\ncorrectness (relative L2 per segment < 1e-2, no NaN left in any destination)")
    for name, kernel in kernels.items():
        for batch, seq in [(2, 1), (3, 17), (2, 1000), (1, 4097)]:
            ok, error = check(kernel, batch, seq, generator)
            all_ok &= ok
            print(f"  {'ok  ' if ok else 'FAIL'} {name:36s} B={batch} S={seq:5d}  worst segment {error:.2e}")
            report["correctness"].append(dict(kernel=name, B=batch, S=seq, ok=ok, rel_l2=error))
    if not args.skip_timing:
        print("\ntiming (median of 20: ms, TFLOP/s)")
        for name, kernel in kernels.items():
            if "ragged" in name:
                continue
            for batch, seq in [(1, 4096), (1, 16384), (8, 4096)]:
                results = benchmark(kernel, batch, seq, generator)
                cells = "  ".join(f"{label} {ms:7.3f} ms {tf:6.1f} TF" for label, (ms, tf) in results.items())
                print(f"  {name:36s} B={batch} S={seq:5d}  {cells}")
                report["timing"].append(dict(kernel=name, B=batch, S=seq, results=results))
    finish(report, args.out, all_ok)


if __name__ == "__main__":
    main()
