"""Checks and times the whole backward of every example layer and two plain ones (o_proj's input
gradient, the attention backward, the prologue's backward through RoPE, the norm, the q-k mean and
the convolutions, dx and every weight gradient: ccc::ir::kernel::backward_kernels, the mma.sync
forms) on the GPU, against PyTorch autograd.

Usage: python3 bench/layer_backward.py --ptx-dir DIR [--shapes 1x1,3x17,...] [--time-shapes ...] [--out FILE]

DIR holds `<kernel>.ptx` and `layer_backward.json` (written by
`CCC_HOPPER_PTX_OUT=DIR cargo test --release --test codegen_hopper each_gradient`): per layer its
spec, sizes, RoPE, parameters (name, shape, role) and kernels in launch order (parameters in ABI
order, tensors with type and shape, grid as size expressions, threads, dynamic shared memory).

Correctness: random x, weights and dout in the layer's dtype; p0, q, k, v, o and lse from
python/ccc/reference.py's float64 forward of those values, rounded where the forward stores them;
every buffer a kernel writes NaN-poisoned; dx and every weight gradient against float64 autograd
through that reference, as relative L2 errors. Layers without CCA steps or norm are also run
through PyTorch's own 16-bit autograd (SDPA) and pass when ours are at most 1.5× its error
(+1e-3); the others pass under 5e-2 (the interpreter's storage-rounding bound is 3e-2), until a
Hugging Face peer is wired in. Timing (CUDA events, median of 20): our kernels together, beside
PyTorch's 16-bit autograd backward of the same layer where it exists (SDPA, cuDNN where it runs).
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
from ccc.reference import reference_forward  # noqa: E402
from ccc.sizes import parse_size_expr  # noqa: E402
from ccc.spec import parse_spec  # noqa: E402


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
        """Every buffer a kernel of the chain writes, `fill`ed, shaped from the kernels' tensors."""
        env, made = {"B": batch, "S": seq}, {}
        types = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
        for spec, _, _, _ in self.kernels:
            for tensor in spec["tensors"]:
                if tensor["write"] and tensor["name"] not in made:
                    shape = [parse_size_expr(dim, tensor["name"]).eval(env) for dim in tensor["shape"]]
                    made[tensor["name"]] = torch.full(shape, fill, device=device, dtype=types[tensor["elem"]])
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
        if p["role"] == "KeyTemperature":
            weights[p["name"]] = (torch.rand(p["shape"], device=device) + 0.5).to(dtype)
            continue
        # Fan-in: a projection's input width; a convolution's taps × inputs per group.
        shape = p["shape"]
        fan_in = shape[1] * shape[2] if len(shape) == 3 else shape[-1] if len(shape) == 2 else e
        weights[p["name"]] = ((torch.rand(shape, device=device) * 2 - 1) / math.sqrt(fan_in)).to(dtype)
    x = torch.randn(batch, seq, e, device=device).to(dtype)
    dout = torch.randn(batch, seq, e, device=device).to(dtype)
    return weights, x, dout


def saved(layer, spec, x, weights):
    """What the forward keeps for the backward, from the float64 reference forward of the 16-bit
    values, rounded where the forward stores them."""
    with torch.no_grad():
        forward64 = reference_forward(spec, weights, x, storage_dtype=layer["elem"])
        role = by_role(layer, {n: w.double() for n, w in weights.items()})
        x64 = x.double()

        def projected(weight, bias):
            y = x64 @ role[weight].t()
            return y + role[bias] if bias in role else y

        p0 = torch.cat([projected("QueryProj", "QueryBias"), projected("KeyProj", "KeyBias")], dim=-1)
    batch, seq = x.shape[:2]
    stored = {"p0": p0, "q": forward64["q"], "k": forward64["k"], "v": forward64["v"],
              "o": forward64["o"].reshape(batch, seq, -1)}
    return {**{n: t.to(x.dtype).contiguous() for n, t in stored.items()}, "lse": forward64["lse"].float().contiguous()}


def run_checked(chain, layer, spec, batch, seq, device):
    """The chain on random inputs and the forward's saved tensors, every output NaN-poisoned
    first: (weights, x, dout, buffers)."""
    weights, x, dout = inputs(layer, batch, seq, device)
    buffers = {"x": x, "dout": dout, **weights, **saved(layer, spec, x, weights),
               **chain.outputs(batch, seq, device, float("nan"))}
    chain.run(buffers, batch, seq)
    torch.cuda.synchronize()
    return weights, x, dout, buffers


def exact_gradients(spec, x, weights, dout):
    """dx and every weight's gradient through float64 autograd of the reference forward."""
    leaves = {name: w.detach().double().requires_grad_() for name, w in weights.items()}
    x_leaf = x.detach().double().requires_grad_()
    out = reference_forward(spec, leaves, x_leaf)["out"]
    names = list(leaves)
    grads = torch.autograd.grad(out, [x_leaf] + [leaves[n] for n in names], dout.double())
    return {"dx": grads[0], **dict(zip(names, grads[1:]))}


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
        spec = parse_spec(layer["spec"])
        has_peer = not (layer["qk_norm"] or layer["cca"])
        chain = Chain(args.ptx_dir, layer)
        for shape in args.shapes.split(","):
            batch, seq = map(int, shape.split("x"))
            weights, x, dout, buffers = run_checked(chain, layer, spec, batch, seq, device)
            exact = exact_gradients(spec, x, weights, dout)
            peer = autograd(layer, x, weights, dout, dtype_of(layer)) if has_peer else None
            row, failures = {"layer": layer["layer"], "shape": shape}, []
            for name in exact:
                ours = buffers["dx" if name == "dx" else "grad." + name].double().view(exact[name].shape)
                error = rel_l2(ours, exact[name])
                peer_error = rel_l2(peer[name].double(), exact[name]) if peer else None
                bound = 1.5 * peer_error + 1e-3 if peer else 5e-2
                ok = bool(torch.isfinite(ours).all()) and error <= bound
                # A gradient that is zero in exact arithmetic (q and k of one token, whose softmax
                # has one key; a key bias) has no relative error: its RMS must be rounding noise.
                rms = lambda t: (t.norm() / math.sqrt(t.numel())).item()  # noqa: E731
                if rms(exact[name]) < 1e-12:
                    error, bound = rms(ours), 1e-4
                    ok = bool(torch.isfinite(ours).all()) and error <= bound
                all_ok &= ok
                row[name] = {"error": error, "torch_error": peer_error, "bound": bound, "ok": ok}
                if not ok:
                    failures.append(name)
            report.append(row)
            worst = max((n for n in exact), key=lambda n: row[n]["error"])
            print(f"{layer['layer']} {shape}: dx {row['dx']['error']:.2e}; worst {worst} {row[worst]['error']:.2e} "
                  f"(bound {row[worst]['bound']:.2e})" + (f"; FAILED {failures}" if failures else ""), flush=True)
        for shape in args.time_shapes.split(",") if args.time_shapes else []:
            batch, seq = map(int, shape.split("x"))
            weights, x, dout = inputs(layer, batch, seq, device)
            d, hq, hk = layer["head_dim"], layer["q_heads"], layer["kv_heads"]

            def random16(*shape):
                return torch.randn(*shape, device=device).to(dtype_of(layer))

            buffers = {"x": x, "dout": dout, **weights, "p0": random16(batch, seq, (hq + hk) * d),
                       "q": random16(batch, seq, hq, d), "k": random16(batch, seq, hk, d),
                       "v": random16(batch, seq, hk, d), "o": random16(batch, seq, hq * d),
                       "lse": torch.randn(batch, hq, seq, device=device) + 10,
                       **chain.outputs(batch, seq, device, 0.0)}
            ours = median_ms(lambda: chain.run(buffers, batch, seq))
            row = {"layer": layer["layer"], "timed": shape, "ccc_ms": ours}
            if has_peer:
                leaves = {n: w.detach().requires_grad_() for n, w in weights.items()}
                x_leaf = x.detach().requires_grad_()
                out = forward(layer, x_leaf, leaves, dtype_of(layer))[0]
                targets = [x_leaf] + list(leaves.values())
                row["torch_autograd_ms"] = median_ms(lambda: torch.autograd.grad(out, targets, dout, retain_graph=True))
            report.append(row)
            peer_text = f", torch autograd {row['torch_autograd_ms']:.3f} ms" if has_peer else ""
            print(f"{layer['layer']} {shape} backward: ccc {ours:.3f} ms{peer_text}", flush=True)
    finish(report, args.out, all_ok)


if __name__ == "__main__":
    main()
