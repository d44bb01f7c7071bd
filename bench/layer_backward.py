"""Checks and times the whole backward of layers without CCA steps (o_proj's input gradient, the
attention backward, RoPE's backward, dx and every weight gradient:
ccc::ir::kernel::backward_kernels, the mma.sync forms) on the GPU, against PyTorch autograd.

Usage: python3 bench/layer_backward.py --ptx-dir DIR [--shapes 1x1,3x17,...] [--time-shapes ...] [--out FILE]

DIR holds `<kernel>.ptx` and `layer_backward.json` (written by
`CCC_HOPPER_PTX_OUT=DIR cargo test --release --test codegen_hopper each_gradient`): per layer its
sizes, RoPE, parameters (name, shape, role) and kernels in launch order (parameters in ABI order,
grid as size expressions, threads, dynamic shared memory). Layers with an L2 norm, convolutions or
the q-k mean are skipped here (the interpreter checks them; ZAYA1's through Hugging Face's layer
is the next step).

Correctness: random x, weights and dout in the layer's dtype; p0, q, k, v, o and lse from a
float32 forward of those values, rounded where the forward stores them; every kernel output NaN-poisoned; dx and every
weight gradient against float32 autograd of the layer, as relative L2 errors, beside PyTorch's own
bf16 autograd (SDPA) against the same float32 gradients. Passes when ours are at most 1.5× PyTorch's
(+1e-3). Timing (CUDA events, median of 20): our kernels together against PyTorch's bf16 autograd
backward of the same layer (SDPA, cuDNN backend where it runs).
"""

import argparse
import json
import math
import os
import sys

import numpy
import torch
import torch.nn.functional as F

from attention_backward import mask_of, rel_l2
from kernel_bench import finish, median_ms

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from ccc.sizes import parse_size_expr  # noqa: E402


def by_role(layer, weights):
    return {p["role"]: weights[p["name"]] for p in layer["params"]}


def rope(layer, heads):
    """RoPE of [B, S, H, d] heads at positions 0..S-1 (NeoX halves or interleaved pairs of the
    first rotary_dim channels)."""
    spec = layer["rope"]
    if spec is None:
        return heads
    r, seq = spec["rotary_dim"], heads.shape[1]
    inverse_frequency = spec["theta"] ** (-torch.arange(0, r // 2, device=heads.device, dtype=torch.float64) * 2 / r)
    angle = torch.arange(seq, device=heads.device, dtype=torch.float64)[:, None] * inverse_frequency
    cos, sin = (f(angle).to(heads.dtype)[None, :, None, :] for f in (torch.cos, torch.sin))
    rotary, rest = heads[..., :r], heads[..., r:]
    if spec["neox"]:
        x1, x2 = rotary[..., : r // 2], rotary[..., r // 2:]
        rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = rotary[..., 0::2], rotary[..., 1::2]
        rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([rotated, rest], dim=-1)


def forward(layer, x, weights, dtype):
    """The layer in `dtype` (float32: by hand, with lse; 16-bit: through SDPA), returning
    (out, p0, q, k, v, o, lse) with q, k, v, o as [B, S, heads, d] and p0 = [q0 | k0]."""
    role = by_role(layer, weights)
    d, hq, hk = layer["head_dim"], layer["q_heads"], layer["kv_heads"]
    batch, seq, _ = x.shape

    def linear(inp, weight, bias):
        y = inp @ role[weight].t()
        return y + role[bias] if bias in role else y

    q0, k0 = linear(x, "QueryProj", "QueryBias"), linear(x, "KeyProj", "KeyBias")
    p0 = torch.cat([q0, k0], dim=-1)
    q, k = rope(layer, q0.view(batch, seq, hq, d)), rope(layer, k0.view(batch, seq, hk, d))
    parts = []
    if "ValueProjCurrent" in role:
        parts.append(linear(x, "ValueProjCurrent", "ValueBiasCurrent"))
    if "ValueProjDelayed" in role:
        x_prev = torch.cat([torch.zeros_like(x[:, :1]), x[:, :-1]], dim=1)
        parts.append(linear(x_prev, "ValueProjDelayed", "ValueBiasDelayed"))
    v = torch.cat(parts, dim=-1).view(batch, seq, hk, d)
    group = hq // hk
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(group, 1), v.transpose(1, 2).repeat_interleave(group, 1)
    allowed = mask_of(layer, seq, x.device)
    lse = None
    if dtype == torch.float32:
        scores = (qt @ kt.transpose(-1, -2)) * layer["softmax_scale"]
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        o = torch.softmax(scores, dim=-1) @ vt
    else:
        o = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed if layer["window"] else None,
                                           is_causal=layer["causal"] and layer["window"] is None,
                                           scale=layer["softmax_scale"])
    o = o.transpose(1, 2)
    out = linear(o.reshape(batch, seq, hq * d), "OutputProj", "OutputBias")
    return out, p0, q, k, v, o, lse


def autograd(layer, x, weights, dout, dtype):
    """dx and every weight's gradient through PyTorch autograd in `dtype`."""
    leaves = {name: w.detach().to(dtype).requires_grad_() for name, w in weights.items()}
    x_leaf = x.detach().to(dtype).requires_grad_()
    out = forward(layer, x_leaf, leaves, dtype)[0]
    names = list(leaves)
    grads = torch.autograd.grad(out, [x_leaf] + [leaves[n] for n in names], dout.to(dtype))
    return {"dx": grads[0].float(), **{n: g.float() for n, g in zip(names, grads[1:])}}


class Chain:
    def __init__(self, ptx_dir, layer):
        import cupy

        self.layer, self.kernels = layer, []
        for spec in layer["kernels"]:
            module = cupy.RawModule(path=os.path.join(ptx_dir, spec["name"] + ".ptx"))
            function = module.get_function(spec["name"])
            function.max_dynamic_shared_size_bytes = spec["dynamic_shared_bytes"]
            grid = [parse_size_expr(g, f"{spec['name']}.grid") for g in spec["grid"]]
            self.kernels.append((spec, module, function, grid))

    def outputs(self, batch, seq, device, fill):
        layer = self.layer
        d, hq, hk, e = layer["head_dim"], layer["q_heads"], layer["kv_heads"], layer["model_dim"]
        storage = dict(device=device, dtype=dtype_of(layer))
        made = {"do": torch.full((batch, seq, hq * d), fill, **storage),
                "delta": torch.full((batch, hq, seq), fill, device=device),
                "dq": torch.full((batch, seq, hq, d), fill, **storage),
                "dk": torch.full((batch, seq, hk, d), fill, **storage),
                "dv": torch.full((batch, seq, hk, d), fill, **storage),
                "dp0": torch.full((batch, seq, (hq + hk) * d), fill, **storage),
                "dx": torch.full((batch, seq, e), fill, **storage)}
        for p in layer["params"]:
            made["grad." + p["name"]] = torch.full(p["shape"], fill, device=device)
        return made

    def run(self, buffers, batch, seq):
        env = {"B": batch, "S": seq}
        for spec, _, function, grid in self.kernels:
            args = tuple(numpy.uint32(batch) if p == "B" else numpy.uint32(seq) if p == "S"
                         else numpy.uint64(buffers[p].data_ptr()) for p in spec["params"])
            function(tuple(g.eval(env) for g in grid), (spec["threads"],), args, shared_mem=spec["dynamic_shared_bytes"])


def dtype_of(layer):
    return {"bf16": torch.bfloat16, "f16": torch.float16}[layer["elem"]]


def inputs(layer, batch, seq, device):
    e, dtype = layer["model_dim"], dtype_of(layer)
    weights = {}
    for p in layer["params"]:
        fan_in = p["shape"][-1] if len(p["shape"]) > 1 else e
        weights[p["name"]] = ((torch.rand(p["shape"], device=device) * 2 - 1) / math.sqrt(fan_in)).to(dtype)
    x = torch.randn(batch, seq, e, device=device).to(dtype)
    dout = torch.randn(batch, seq, e, device=device).to(dtype)
    return weights, x, dout


def saved(layer, x, weights):
    """What the forward keeps for the backward, from a float32 forward of the 16-bit values."""
    with torch.no_grad():
        _, p0, q, k, v, o, lse = forward(layer, x.float(), {n: w.float() for n, w in weights.items()}, torch.float32)
    batch, seq = x.shape[:2]
    stored = {"p0": p0, "q": q, "k": k, "v": v, "o": o.reshape(batch, seq, -1)}
    return {**{n: t.to(x.dtype).contiguous() for n, t in stored.items()}, "lse": lse.contiguous()}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ptx-dir", required=True)
    parser.add_argument("--shapes", default="1x1,3x17,2x1000,1x4097")
    parser.add_argument("--time-shapes", default="1x4096,1x16384")
    parser.add_argument("--out")
    args = parser.parse_args()
    with open(os.path.join(args.ptx_dir, "layer_backward.json")) as handle:
        layers = json.load(handle)
    torch.manual_seed(0)
    device = "cuda"
    report, all_ok = [], True
    for layer in layers:
        if layer["qk_norm"] or layer["cca"]:
            continue
        chain = Chain(args.ptx_dir, layer)
        for shape in args.shapes.split(","):
            batch, seq = map(int, shape.split("x"))
            weights, x, dout = inputs(layer, batch, seq, device)
            buffers = {"x": x, "dout": dout, **weights, **saved(layer, x, weights),
                       **chain.outputs(batch, seq, device, float("nan"))}
            chain.run(buffers, batch, seq)
            torch.cuda.synchronize()
            exact = autograd(layer, x, weights, dout, torch.float32)
            peer = autograd(layer, x, weights, dout, dtype_of(layer))
            row, failures = {"layer": layer["layer"], "shape": shape}, []
            for name in exact:
                ours = buffers["dx" if name == "dx" else "grad." + name].float().view(exact[name].shape)
                error, peer_error = rel_l2(ours, exact[name]), rel_l2(peer[name], exact[name])
                ok = bool(torch.isfinite(ours).all()) and error <= 1.5 * peer_error + 1e-3
                all_ok &= ok
                row[name] = {"error": error, "torch_bf16_error": peer_error, "ok": ok}
                if not ok:
                    failures.append(name)
            report.append(row)
            worst = max((n for n in exact), key=lambda n: row[n]["error"])
            print(f"{layer['layer']} {shape}: dx {row['dx']['error']:.2e} (torch {row['dx']['torch_bf16_error']:.2e}); "
                  f"worst {worst} {row[worst]['error']:.2e} (torch {row[worst]['torch_bf16_error']:.2e})"
                  + (f"; FAILED {failures}" if failures else ""), flush=True)
        for shape in args.time_shapes.split(",") if args.time_shapes else []:
            batch, seq = map(int, shape.split("x"))
            weights, x, dout = inputs(layer, batch, seq, device)
            with torch.no_grad():
                _, p0, q, k, v, o, _ = forward(layer, x, weights, dtype_of(layer))
            buffers = {"x": x, "dout": dout, **weights, "p0": p0.contiguous(), "q": q.contiguous(), "k": k.contiguous(),
                       "v": v.contiguous(),
                       "o": o.reshape(batch, seq, -1).contiguous(),
                       "lse": torch.randn(batch, layer["q_heads"], seq, device=device) + 10,
                       **chain.outputs(batch, seq, device, 0.0)}
            ours = median_ms(lambda: chain.run(buffers, batch, seq))
            leaves = {n: w.detach().requires_grad_() for n, w in weights.items()}
            x_leaf = x.detach().requires_grad_()
            out = forward(layer, x_leaf, leaves, dtype_of(layer))[0]
            targets = [x_leaf] + list(leaves.values())
            theirs = median_ms(lambda: torch.autograd.grad(out, targets, dout, retain_graph=True))
            report.append({"layer": layer["layer"], "timed": shape, "ccc_ms": ours, "torch_autograd_ms": theirs})
            print(f"{layer['layer']} {shape} backward: ccc {ours:.3f} ms, torch autograd {theirs:.3f} ms", flush=True)
    finish(report, args.out, all_ok)


if __name__ == "__main__":
    main()
