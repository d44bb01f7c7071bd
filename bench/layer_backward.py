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
through that reference, as relative L2 errors. Beside ours, the same errors of PyTorch's own
16-bit autograd through the same layer (reference.py's steps in the layer's dtype, SDPA for the
attention) and, for layers Hugging Face's ZayaAttention computes, of HF's own 16-bit autograd
(the issue's peer; its float64 autograd is also checked against our reference, HF_F64_AGREEMENT).
A gradient passes when its error is at most 1.5× the peer's (HF where it applies, else PyTorch)
+ 1e-3; one that is zero in exact arithmetic when its RMS is at most 1.5× the peer's + 1e-4. Timing (CUDA events, median of 20):
our kernels together, beside PyTorch's 16-bit autograd backward of the same layer (and HF's).
"""

import argparse
import json
import math
import os
import sys

import torch

from attention_backward import rel_l2
from kernel_bench import driver, finish, launch, median_ms

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from ccc.hf import ZayaLayer, zaya_incompatibility  # noqa: E402
from ccc.reference import gradient_error, reference_forward, reference_gradients  # noqa: E402
from ccc.sizes import parse_size_expr  # noqa: E402
from ccc.spec import parse_spec  # noqa: E402


def by_role(layer, weights):
    return {p["role"]: weights[p["name"]] for p in layer["params"]}


# Our float64 reference against HF's float64 autograd of ZayaAttention: relative L2 of the worst
# gradient; validate.py's bound for the forward (HF builds its rotary tables in float32).
HF_F64_AGREEMENT = 1e-5


class Chain:
    def __init__(self, ptx_dir, layer):
        self.layer, self.kernels = layer, []
        device = torch.cuda.current_device()
        for spec in layer["kernels"]:
            module = driver.load_module(os.path.join(ptx_dir, spec["name"] + ".ptx"), device)
            function = driver.function(module, spec["name"], spec["dynamic_shared_bytes"])
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
            args = [driver.u32(batch) if p == "B" else driver.u32(seq) if p == "S"
                    else driver.u64(buffers[p].data_ptr()) for p in spec["params"]]
            launch(function, tuple(g.eval(env) for g in grid), spec["threads"], spec["dynamic_shared_bytes"], args)


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
        dtype = dtype_of(layer)
        hf_compatible = spec.has_cca_parts() and zaya_incompatibility(spec) is None
        chain = Chain(args.ptx_dir, layer)
        for shape in args.shapes.split(","):
            batch, seq = map(int, shape.split("x"))
            weights, x, dout, buffers = run_checked(chain, layer, spec, batch, seq, device)
            exact = reference_gradients(spec, weights, x, dout)
            peers = {"torch": reference_gradients(spec, weights, x, dout, compute_dtype=dtype)}
            if hf_compatible:
                peers["hf"] = ZayaLayer(spec, weights, dtype).gradients(x, dout)
                # Our f64 reference against HF's own autograd in f64: the names and the
                # derivative being checked are the ones HF trains with.
                hf64 = ZayaLayer(spec, weights, torch.float64).gradients(x.double(), dout.double())
                apart = {name: rel_l2(hf64[name].view(exact[name].shape), exact[name]) for name in exact}
                farthest = max(apart, key=apart.get)
                print(f"{layer['layer']} {shape}: f64 reference vs HF's f64 autograd, farthest {farthest} "
                      f"{apart[farthest]:.2e}", flush=True)
                all_ok &= apart[farthest] <= HF_F64_AGREEMENT
            judge = "hf" if hf_compatible else "torch"
            row, failures = {"layer": layer["layer"], "shape": shape, "judged_against": judge}, []
            for name in exact:
                ours = buffers["dx" if name == "dx" else "grad." + name]
                # Zero-exact gradients (q and k of one token, whose softmax has one key; a key
                # bias) are judged by RMS: see gradient_error.
                error, bound = gradient_error(ours, exact[name], peers[judge][name])
                peer_errors = {p: gradient_error(g[name], exact[name], g[name])[0] for p, g in peers.items()}
                ok = bool(torch.isfinite(ours).all()) and error <= bound
                all_ok &= ok
                row[name] = {"error": error, **{f"{p}_error": e for p, e in peer_errors.items()},
                             "bound": bound, "ok": ok}
                if not ok:
                    failures.append(name)
            report.append(row)
            worst = max((n for n in exact), key=lambda n: row[n]["error"] / row[n]["bound"])
            print(f"{layer['layer']} {shape}: dx {row['dx']['error']:.2e}; nearest its bound {worst} "
                  f"{row[worst]['error']:.2e} (bound {row[worst]['bound']:.2e} from {judge}'s "
                  f"{row[worst].get(judge + '_error', 0):.2e})"
                  + (f"; FAILED {failures}" if failures else ""), flush=True)
            if failures:
                for name in failures:
                    print(f"    {name}: ours {row[name]['error']:.2e}, "
                          + ", ".join(f"{p} {row[name][p + '_error']:.2e}" for p in peers), flush=True)
        for shape in args.time_shapes.split(",") if args.time_shapes else []:
            batch, seq = map(int, shape.split("x"))
            weights, x, dout = inputs(layer, batch, seq, device)
            d, hq, hk = layer["head_dim"], layer["q_heads"], layer["kv_heads"]

            def random16(*shape):
                return torch.randn(*shape, device=device).to(dtype)

            buffers = {"x": x, "dout": dout, **weights, "p0": random16(batch, seq, (hq + hk) * d),
                       "q": random16(batch, seq, hq, d), "k": random16(batch, seq, hk, d),
                       "v": random16(batch, seq, hk, d), "o": random16(batch, seq, hq * d),
                       "lse": torch.randn(batch, hq, seq, device=device) + 10,
                       **chain.outputs(batch, seq, device, 0.0)}
            ours = median_ms(lambda: chain.run(buffers, batch, seq))
            row = {"layer": layer["layer"], "timed": shape, "ccc_ms": ours}
            leaves = {n: w.detach().requires_grad_() for n, w in weights.items()}
            x_leaf = x.detach().requires_grad_()
            targets = [x_leaf] + list(leaves.values())
            out = reference_forward(spec, leaves, x_leaf, compute_dtype=dtype)["out"]
            row["torch_autograd_ms"] = median_ms(lambda: torch.autograd.grad(out, targets, dout, retain_graph=True))
            peer_text = f", torch autograd {row['torch_autograd_ms']:.3f} ms"
            if hf_compatible:
                hf = ZayaLayer(spec, weights, dtype)
                params = list(hf.module.parameters())
                for weight in params:
                    weight.requires_grad_(True)
                x_leaf = x.detach().requires_grad_()
                out = hf.output(x_leaf)
                row["hf_autograd_ms"] = median_ms(
                    lambda: torch.autograd.grad(out, [x_leaf] + params, dout, retain_graph=True))
                peer_text += f", HF ZayaAttention autograd {row['hf_autograd_ms']:.3f} ms"
            report.append(row)
            print(f"{layer['layer']} {shape} backward: ccc {ours:.3f} ms{peer_text}", flush=True)
    finish(report, args.out, all_ok)


if __name__ == "__main__":
    main()
