"""Checks and times variants of the wgmma attention kernel (ccc::ir::kernel::build_wgmma_attention) on the GPU.

Usage: python3 bench/hopper_attention.py --ptx-dir DIR [--kernels REGEX] [--out FILE] [--skip-timing] [--sass]
       python3 bench/hopper_attention.py --ptx-dir DIR --kernels REGEX --launch-only B:S   (under ncu)

DIR holds `<kernel>.ptx` and `kernels.json` (written by
`CCC_HOPPER_PTX_OUT=DIR cargo test --release --test codegen_hopper attention_assembles`):
for each kernel its name, elem (bf16/f16), head_dim, q_heads, kv_heads, causal, window (a sliding
window of that many keys, or null), softmax_scale, block_m, threads and
dynamic_shared_bytes. With --sass, each `<kernel>.cubin` beside the PTX (assembled with
`ptxas -arch=sm_90a`) is disassembled with nvdisasm: the count of HGMMA (warpgroup MMA) and of
LDL/STL (local-memory spills) instructions. Correctness: o and lse against a float32 reference on the same bf16
inputs (relative L2 of o < 1e-2, max |lse error| < 2e-2 on rows that exist). Timing: CUDA events,
3 warm-up runs, median of 20, against torch SDPA with the cuDNN and FlashAttention-2 backends
(GQA: kv heads repeated outside the timed region). FLOPs of causal attention: 4·B·S²·Hq·d / 2.
"""

import argparse
import math
import os
import re
import shutil
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernel_bench import finish, launch as launch_kernel, load_kernels, median_ms

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from ccc import driver, tensor_map  # noqa: E402


DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


def launch(kernel, q, k, v, o, lse):
    spec, _, function = kernel
    batch, seq, _, _ = q.shape
    grid = (math.ceil(seq / spec["block_m"]), spec["q_heads"], batch)
    args = [driver.u64(t.data_ptr()) for t in (q, k, v, o, lse)] + [driver.u32(batch), driver.u32(seq)]
    if spec.get("tma"):
        args += [tensor_map.kernel_argument(q, spec["block_m"]), tensor_map.kernel_argument(k, spec["block_n"]),
                 tensor_map.kernel_argument(v, spec["block_n"])]
    launch_kernel(function, grid, spec["threads"], spec["dynamic_shared_bytes"], args)


def run_kernel(kernel, q, k, v):
    spec = kernel[0]
    batch, seq, _, d = q.shape
    o = torch.full_like(q, float("nan"))
    lse = torch.full((batch, spec["q_heads"], seq), float("nan"), device=q.device, dtype=torch.float32)
    launch(kernel, q, k, v, o, lse)
    torch.cuda.synchronize()
    return o, lse


def reference(spec, q, k, v):
    """float32 attention on BSHD inputs: o [B, S, Hq, d] and natural-log lse [B, Hq, S]."""
    group = spec["q_heads"] // spec["kv_heads"]
    qf = q.float().transpose(1, 2)
    kf = k.float().transpose(1, 2).repeat_interleave(group, dim=1)
    vf = v.float().transpose(1, 2).repeat_interleave(group, dim=1)
    seq = q.shape[1]
    outputs, lses = [], []
    for head in range(qf.shape[1]):  # one head at a time keeps S = 4097 within memory
        scores = qf[:, head] @ kf[:, head].transpose(-1, -2) * spec["softmax_scale"]
        if spec["causal"]:
            everything = torch.ones(seq, seq, dtype=torch.bool, device=q.device)
            mask = everything.tril()
            if spec.get("window"):
                mask &= ~everything.tril(-spec["window"])  # keys j > i - window
            scores = scores.masked_fill(~mask, float("-inf"))
        lses.append(torch.logsumexp(scores, dim=-1))
        outputs.append(torch.softmax(scores, dim=-1) @ vf[:, head])
    return torch.stack(outputs, dim=2), torch.stack(lses, dim=1)


def check(kernel, batch, seq, generator):
    spec = kernel[0]
    d = spec["head_dim"]
    shape_q = (batch, seq, spec["q_heads"], d)
    shape_kv = (batch, seq, spec["kv_heads"], d)
    dtype = DTYPES[spec["elem"]]
    q = torch.randn(shape_q, generator=generator, device="cuda").to(dtype)
    k = torch.randn(shape_kv, generator=generator, device="cuda").to(dtype)
    v = torch.randn(shape_kv, generator=generator, device="cuda").to(dtype)
    o, lse = run_kernel(kernel, q, k, v)
    o_ref, lse_ref = reference(spec, q, k, v)
    o_error = ((o.float() - o_ref).norm() / o_ref.norm()).item()
    lse_error = (lse - lse_ref).abs().max().item()
    ok = o_error < 1e-2 and lse_error < 2e-2 and not torch.isnan(o).any().item()
    return ok, o_error, lse_error


def sass_counts(ptx_dir, names):
    """{kernel: (HGMMA count, LDL/STL count)} from nvdisasm, for kernels with a cubin."""
    nvdisasm = shutil.which("nvdisasm") or "/usr/local/cuda/bin/nvdisasm"
    if not os.path.exists(nvdisasm):
        print("  nvdisasm not found: no SASS check")
        return {}
    counts = {}
    for name in names:
        cubin = os.path.join(ptx_dir, name + ".cubin")
        if os.path.exists(cubin):
            sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
            counts[name] = (len(re.findall(r"\bHGMMA\.", sass)), len(re.findall(r"\b(LDL|STL)\b", sass)))
    return counts


def sdpa_time(backend, q, k, v, group, causal, reps=20, warmup=3):
    # SDPA takes [B, H, S, d]; layout changes and kv repetition stay outside the timing.
    qt = q.transpose(1, 2).contiguous()
    kt = k.transpose(1, 2).repeat_interleave(group, dim=1).contiguous()
    vt = v.transpose(1, 2).repeat_interleave(group, dim=1).contiguous()
    try:
        with sdpa_kernel(backend):
            return median_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal), reps, warmup)
    except RuntimeError as error:
        print(f"  {backend}: unavailable ({str(error).splitlines()[0][:100]})")
        return None


def benchmark(kernel_variants, batch, seq, reps=20, warmup=3, peers=("cuDNN", "FA2")):
    """Times each kernel variant (same shape) and the SDPA backends `peers`: {name: (ms, TFLOP/s)}."""
    spec = kernel_variants[0][1][0]
    d = spec["head_dim"]
    q = torch.randn(batch, seq, spec["q_heads"], d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(batch, seq, spec["kv_heads"], d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(batch, seq, spec["kv_heads"], d, device="cuda", dtype=torch.bfloat16)
    o = torch.empty_like(q)
    lse = torch.empty(batch, spec["q_heads"], seq, device="cuda", dtype=torch.float32)
    flops = 4 * batch * seq * seq * spec["q_heads"] * d / (2 if spec["causal"] else 1)
    group = spec["q_heads"] // spec["kv_heads"]
    results = {}
    for label, kernel in kernel_variants:
        results[label] = median_ms(lambda: launch(kernel, q, k, v, o, lse), reps, warmup)
    backends = {"cuDNN": SDPBackend.CUDNN_ATTENTION, "FA2": SDPBackend.FLASH_ATTENTION}
    for peer in peers:
        results[peer] = sdpa_time(backends[peer], q, k, v, group, spec["causal"], reps, warmup)
    return {name: (ms, flops / (ms * 1e-3) / 1e12 if ms else None) for name, ms in results.items()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ptx-dir", required=True)
    parser.add_argument("--kernels", default="", help="only kernels whose name matches this regex")
    parser.add_argument("--out")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--sass", action="store_true", help="count HGMMA and LDL/STL in the cubins' SASS")
    parser.add_argument("--launch-only", metavar="B:S",
                        help="no checks: launch each selected kernel and cuDNN once at this shape (for ncu)")
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "cuDNN", torch.backends.cudnn.version())
    kernels = load_kernels(args.ptx_dir, "kernels.json", args.kernels)
    if args.launch_only:
        batch, seq = map(int, args.launch_only.split(":"))
        for name, kernel in kernels.items():
            print(name, benchmark([(name, kernel)], batch, seq, reps=1, warmup=0, peers=("cuDNN",)))
        return
    generator = torch.Generator(device="cuda").manual_seed(0)
    report = {"correctness": [], "timing": [], "sass": {}}
    all_ok = True
    if args.sass:
        print("\nSASS (HGMMA instructions, LDL/STL spill instructions)")
        for name, (hgmma, local) in sass_counts(args.ptx_dir, kernels).items():
            ok = hgmma > 0 and local == 0
            all_ok &= ok
            print(f"  {'ok  ' if ok else 'FAIL'} {name:45s} HGMMA {hgmma:3d}  LDL/STL {local}")
            report["sass"][name] = dict(hgmma=hgmma, local_memory=local)
    print("\ncorrectness (o: relative L2 < 1e-2; lse: max abs error < 2e-2)")
    for name, kernel in kernels.items():
        for batch, seq in [(2, 1), (2, 17), (2, 200), (1, 4097)]:
            ok, o_error, lse_error = check(kernel, batch, seq, generator)
            all_ok &= ok
            print(f"  {'ok  ' if ok else 'FAIL'} {name:40s} B={batch} S={seq:5d}  o {o_error:.2e}  lse {lse_error:.2e}")
            report["correctness"].append(dict(kernel=name, B=batch, S=seq, ok=ok, o_rel_l2=o_error, lse_max_abs=lse_error))
    if not args.skip_timing:
        print("\ntiming (median of 20, ms and TFLOP/s; serial / overlap / ws / pingpong = ccc wgmma schedules;"
              " pp-l2-N = pingpong with CTAs ordered in L2 groups of N MB of K/V, pingpong's own groups being 16 MB;"
              " pp-tma = pingpong with TMA loads)")
        suffixes = [("serial", ""), ("overlap", "_overlap"), ("ws", "_ws"), ("pingpong", "_pingpong"),
                    ("pp-l2-8", "_pingpong_l2_8mb"), ("pp-l2-4", "_pingpong_l2_4mb"), ("pp-tma", "_pingpong_tma")]
        columns = [label for label, _ in suffixes] + ["cuDNN", "FA2"]
        print(f"  {'shape':36s} {'B':>2s} {'S':>6s} | " + " | ".join(f"{c:>17s}" for c in columns))
        for name, batch, seq in [
            ("attention_wgmma_d128_causal_h16_16", 1, 8192),
            ("attention_wgmma_d128_causal_h16_16", 1, 16384),
            ("attention_wgmma_d128_causal_h8_2", 1, 8192),
            ("attention_wgmma_d128_causal_h8_2", 1, 16384),
            ("attention_wgmma_d128_causal_h8_2", 4, 4096),
            ("attention_wgmma_d128_full_h8_2", 1, 16384),
            ("attention_wgmma_d64_causal_h8_2", 1, 16384),
        ]:
            variants = [(label, kernels[name + suffix]) for label, suffix in suffixes if name + suffix in kernels]
            if not variants:
                continue
            results = benchmark(variants, batch, seq)
            cells = []
            for column in columns:
                ms, tflops = results.get(column, (None, None))
                cells.append(f"{ms:7.3f} {tflops:6.1f} TF" if ms else f"{'n/a':>17s}")
            print(f"  {name[len('attention_wgmma_'):]:36s} {batch:2d} {seq:6d} | " + " | ".join(cells))
            report["timing"].append(dict(kernel=name, B=batch, S=seq, results=results))
    finish(report, args.out, all_ok)


if __name__ == "__main__":
    main()
