"""Checks and times the attention backward kernels (ccc::ir::kernel::build_attention_backward, the
mma.sync form) on the GPU, against PyTorch.

Usage: python3 bench/attention_backward.py --ptx-dir DIR [--layers REGEX] [--shapes 1x4097,...]
       [--time-shapes 1x8192,...] [--out FILE]

DIR holds `<kernel>.ptx` and `attention_backward.json` (written by
`CCC_HOPPER_PTX_OUT=DIR cargo test --release --test codegen_hopper attention_backward`): per
kernel its layer, stage (delta, dq, dkdv), parameters in ABI order, rows per CTA, threads and
dynamic shared memory.

Correctness, per layer and shape: random bf16 q, k, v and dO; o and lse from a float32 forward
of the same bf16 inputs (o rounded to bf16 as the forward stores it); our dq, dk, dv (f32) against
float32 autograd of that forward, as relative L2 errors (ours stored in bf16, as PyTorch's are), beside the errors of PyTorch's own bf16
backward (SDPA, cuDNN or FlashAttention-2 backend, whichever runs) against the same float32
gradients. Passes when ours are at most 1.5× PyTorch's (+1e-3). Outputs are NaN-poisoned first.
Timing (bf16, CUDA events, median of 20): the three kernels together against SDPA's backward
with the cuDNN and FlashAttention-2 backends (GQA through repeated kv heads, summed back
outside the timed region).
"""

import argparse
import math
import os
import re
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernel_bench import driver, finish, launch, load_kernels, median_ms


def mask_of(spec, seq, device):
    if not spec["causal"]:
        return None
    query = torch.arange(seq, device=device)[:, None]
    key = torch.arange(seq, device=device)[None, :]
    allowed = key <= query
    if spec["window"] is not None:
        allowed &= (query - key) < spec["window"]
    return allowed


def reference_forward(spec, q, k, v):
    """o [B, S, Hq, d] and lse [B, Hq, S] in float32 from bf16 inputs (GQA by repeat_interleave)."""
    group = spec["q_heads"] // spec["kv_heads"]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    kf, vf = kf.repeat_interleave(group, 1), vf.repeat_interleave(group, 1)
    scores = (qf @ kf.transpose(-1, -2)) * spec["softmax_scale"]
    allowed = mask_of(spec, q.shape[1], q.device)
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    o = torch.softmax(scores, dim=-1) @ vf
    return o.transpose(1, 2), lse


def torch_backward(spec, q, k, v, d_o, dtype):
    """(dq, dk, dv) of SDPA in `dtype` through autograd, dk/dv summed over each group."""
    group = spec["q_heads"] // spec["kv_heads"]
    leaves = [t.detach().to(dtype).transpose(1, 2).requires_grad_() for t in (q, k, v)]
    kr, vr = (t.repeat_interleave(group, 1) for t in leaves[1:])
    allowed = mask_of(spec, q.shape[1], q.device)
    if dtype == torch.float32:
        scores = (leaves[0] @ kr.transpose(-1, -2)) * spec["softmax_scale"]
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        o = torch.softmax(scores, dim=-1) @ vr
    else:
        o = F.scaled_dot_product_attention(leaves[0], kr, vr, attn_mask=allowed if spec["window"] else None,
                                           is_causal=spec["causal"] and spec["window"] is None,
                                           scale=spec["softmax_scale"])
    grads = torch.autograd.grad(o, leaves, d_o.to(dtype).transpose(1, 2))
    return [g.transpose(1, 2).float() for g in grads]


def rel_l2(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


class Layer:
    def __init__(self, kernels):
        self.kernels = {spec["stage"].removeprefix("attention_bwd_"): (spec, function) for spec, _, function in kernels}
        self.spec = kernels[0][0]

    def run(self, tensors, batch, seq):
        for stage in ("delta", "dq", "dkdv"):
            spec, function = self.kernels[stage]
            heads = spec["kv_heads"] if stage == "dkdv" else spec["q_heads"]
            grid = (math.ceil(seq / spec["block_rows"]), heads, batch)
            args = [driver.u32(batch) if p == "B" else driver.u32(seq) if p == "S"
                    else driver.u64(tensors[p].data_ptr()) for p in spec["params"]]
            launch(function, grid, spec["threads"], spec["dynamic_shared_bytes"], args)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ptx-dir", required=True)
    parser.add_argument("--layers", default=".")
    parser.add_argument("--shapes", default="1x1,3x17,2x1000,1x4097")
    parser.add_argument("--time-shapes", default="1x8192,1x16384")
    parser.add_argument("--out")
    args = parser.parse_args()
    loaded = load_kernels(args.ptx_dir, "attention_backward.json", ".")
    by_layer = {}
    for name, (spec, module, function) in loaded.items():
        if re.search(args.layers, spec["layer"]):
            by_layer.setdefault(spec["layer"], []).append((spec, module, function))
    torch.manual_seed(0)
    device = "cuda"
    report, all_ok = [], True
    for layer_name, kernels in sorted(by_layer.items()):
        layer = Layer(kernels)
        spec = layer.spec
        d, hq, hk = spec["head_dim"], spec["q_heads"], spec["kv_heads"]
        for shape in args.shapes.split(","):
            batch, seq = map(int, shape.split("x"))
            q = torch.randn(batch, seq, hq, d, device=device).bfloat16()
            k = torch.randn(batch, seq, hk, d, device=device).bfloat16()
            v = torch.randn(batch, seq, hk, d, device=device).bfloat16()
            d_o = torch.randn(batch, seq, hq, d, device=device).bfloat16()
            o, lse = reference_forward(spec, q, k, v)
            tensors = {"q": q, "k": k, "v": v, "do": d_o, "o": o.bfloat16().contiguous(), "lse": lse.contiguous(),
                       "delta": torch.full((batch, hq, seq), float("nan"), device=device),
                       "dq": torch.full((batch, seq, hq, d), float("nan"), device=device, dtype=torch.bfloat16),
                       "dk": torch.full((batch, seq, hk, d), float("nan"), device=device, dtype=torch.bfloat16),
                       "dv": torch.full((batch, seq, hk, d), float("nan"), device=device, dtype=torch.bfloat16)}
            layer.run(tensors, batch, seq)
            torch.cuda.synchronize()
            exact = torch_backward(spec, q, k, v, d_o, torch.float32)
            peer = torch_backward(spec, q, k, v, d_o, torch.bfloat16)
            row = {"layer": layer_name, "shape": shape}
            for name, ours, want, theirs in zip(("dq", "dk", "dv"), (tensors[n].float() for n in ("dq", "dk", "dv")), exact, peer):
                error, peer_error = rel_l2(ours, want), rel_l2(theirs, want)
                ok = bool(torch.isfinite(ours).all()) and error <= 1.5 * peer_error + 1e-3
                all_ok &= ok
                row[name] = {"error": error, "torch_bf16_error": peer_error, "ok": ok}
            report.append(row)
            print(f"{layer_name} {shape}: " + ", ".join(
                f"{n} {row[n]['error']:.2e} (torch {row[n]['torch_bf16_error']:.2e}){'' if row[n]['ok'] else ' FAIL'}"
                for n in ("dq", "dk", "dv")), flush=True)
        for shape in args.time_shapes.split(",") if args.time_shapes else []:
            batch, seq = map(int, shape.split("x"))
            q = torch.randn(batch, seq, hq, d, device=device).bfloat16()
            k = torch.randn(batch, seq, hk, d, device=device).bfloat16()
            v = torch.randn(batch, seq, hk, d, device=device).bfloat16()
            d_o = torch.randn(batch, seq, hq, d, device=device).bfloat16()
            o, lse = reference_forward(spec, q, k, v) if seq <= 8192 else (torch.randn(batch, seq, hq, d, device=device),
                                                                         torch.randn(batch, hq, seq, device=device) + 10)
            tensors = {"q": q, "k": k, "v": v, "do": d_o, "o": o.bfloat16().contiguous(), "lse": lse.contiguous(),
                       "delta": torch.empty((batch, hq, seq), device=device),
                       "dq": torch.empty((batch, seq, hq, d), device=device, dtype=torch.bfloat16),
                       "dk": torch.empty((batch, seq, hk, d), device=device, dtype=torch.bfloat16),
                       "dv": torch.empty((batch, seq, hk, d), device=device, dtype=torch.bfloat16)}
            ours = median_ms(lambda: layer.run(tensors, batch, seq))
            row = {"layer": layer_name, "timed": shape, "ccc_ms": ours}
            group = hq // hk
            qt, kt, vt = (t.transpose(1, 2) for t in (q, k.repeat_interleave(group, 2), v.repeat_interleave(group, 2)))
            dot = d_o.transpose(1, 2)
            for backend_name, backend in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash2", SDPBackend.FLASH_ATTENTION)):
                if spec["window"] is not None:
                    continue
                try:
                    leaves = [t.detach().requires_grad_() for t in (qt, kt, vt)]
                    with sdpa_kernel([backend]):
                        out = F.scaled_dot_product_attention(*leaves, is_causal=spec["causal"], scale=spec["softmax_scale"])
                        row[backend_name + "_ms"] = median_ms(
                            lambda: torch.autograd.grad(out, leaves, dot, retain_graph=True))
                except RuntimeError as error:
                    row[backend_name + "_ms"] = None
                    print(f"  {backend_name}: {str(error).splitlines()[0]}")
            report.append(row)
            peers = ", ".join(f"{n} {row[n + '_ms']:.3f} ms" for n in ("cudnn", "flash2") if row.get(n + "_ms"))
            print(f"{layer_name} {shape} backward: ccc {ours:.3f} ms; {peers}", flush=True)
    finish(report, args.out, all_ok)


if __name__ == "__main__":
    main()
