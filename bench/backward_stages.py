"""Localizes a backward error in the prologue of a CCA layer on the GPU: runs the layer's whole
backward chain (as bench/layer_backward.py does) and compares the buffers the prologue's kernels
write with float64 autograd of steps 3 to 6 (convolutions, q-k mean, norm, RoPE) from the same
p0, back-propagating the chain's own dq and dk, so that errors of the attention backward are left
out:
- `dmixed` (the gradient at the q-k mean's output, from qk_prologue_bwd),
- `dconv{i}` (each convolution stage's output gradient, rows from T before token 0) and `dp0`
  (from qk_prologue_bwd_conv),
- `conv{i}_in` (each stage's input after the first, a forward value qk_prologue_bwd keeps),
- dL/dtemp per kv head,
as relative L2 errors; storage rounding alone leaves a few 1e-3.

Usage: python3 bench/backward_stages.py --ptx-dir DIR [--layers zaya1,cca4x] [--shapes 3x17,1x1000]
(DIR as for bench/layer_backward.py).
"""

import argparse
import json
import os
import sys

import torch

from attention_backward import rel_l2
from layer_backward import Chain, run_checked

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
from ccc.spec import parse_spec  # noqa: E402


def prologue_from_p0(spec, weights, p0, positions):
    """Steps 3 to 6 in float64 from p0 [B, S, P]: (q, k, mixed, stage outputs, stage inputs),
    every stage tensor padded to T rows before token 0 as the kernels keep them."""
    roles = {p.role: weights[p.name].double() for p in spec.params()}
    batch, seq, channels = p0.shape
    d, hq, hk, history = spec.head_dim, spec.query_heads, spec.kv_heads, spec.conv_history
    rows = torch.nn.functional.pad(p0, (0, 0, history, 0))
    outputs, stage_inputs = [], [rows]
    for index, stage in enumerate(spec.qk_conv):
        weight, bias = roles[f"conv_weight:{index}"], roles[f"conv_bias:{index}"]
        out_rows = rows.shape[1] - stage.width + 1
        result = bias.expand(batch, out_rows, channels).clone()
        for tap in range(stage.width):
            window = rows[:, tap:tap + out_rows]
            if stage.kind == "depthwise":
                result = result + window * weight[:, 0, tap]
            else:
                heads = channels // d
                mixed = torch.einsum("bthi,hoi->btho", window.reshape(batch, out_rows, heads, d),
                                     weight[:, :, tap].reshape(heads, d, d))
                result = result + mixed.reshape(batch, out_rows, channels)
        result.retain_grad()
        outputs.append(result)
        rows = result
        stage_inputs.append(rows)
    q = rows[..., :spec.q_width].reshape(batch, seq, hq, d)
    k = rows[..., spec.q_width:].reshape(batch, seq, hk, d)
    if spec.qk_mean:
        q0, k0 = p0[..., :spec.q_width].view(batch, seq, hq, d), p0[..., spec.q_width:].view(batch, seq, hk, d)
        q = q + 0.5 * q0 + 0.5 * k0.repeat_interleave(spec.groups, dim=2)
        k = k + 0.5 * k0 + 0.5 * q0.view(batch, seq, hk, spec.groups, d).mean(3)
    mixed = torch.cat([q.reshape(batch, seq, -1), k.reshape(batch, seq, -1)], dim=-1)
    mixed.retain_grad()
    q, k = mixed[..., :spec.q_width].view(batch, seq, hq, d), mixed[..., spec.q_width:].view(batch, seq, hk, d)
    if spec.qk_norm == "l2":
        temp = roles.get("key_temperature")
        tau = torch.ones(hk, dtype=torch.float64, device=p0.device)
        if spec.key_temperature == "learned":
            tau = temp
        elif spec.key_temperature == "learned_exp":
            tau = temp.clamp(1e-7, 2.0).exp()
        norm = lambda h, s: h * (s / torch.sqrt((h * h).sum(-1, keepdim=True) + spec.norm_eps))  # noqa: E731
        q, k = norm(q, d**0.5), norm(k, d**0.5 * tau[None, None, :, None])
    if spec.rope is not None:
        from ccc.reference import _rotate

        q, k = _rotate(q, spec, positions), _rotate(k, spec, positions)
    return q, k, mixed, outputs, stage_inputs, roles


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ptx-dir", required=True)
    parser.add_argument("--layers", default="zaya1,cca4x")
    parser.add_argument("--shapes", default="3x17,1x1000")
    args = parser.parse_args()
    with open(os.path.join(args.ptx_dir, "layer_backward.json")) as handle:
        layers = {layer["layer"]: layer for layer in json.load(handle)}
    torch.manual_seed(0)
    device = "cuda"
    for name in args.layers.split(","):
        layer = layers[name]
        spec = parse_spec(layer["spec"])
        chain = Chain(args.ptx_dir, layer)
        history = spec.conv_history
        for shape in args.shapes.split(","):
            batch, seq = map(int, shape.split("x"))
            weights, _, _, buffers = run_checked(chain, layer, spec, batch, seq, device)
            leaves = {n: w.detach().double().requires_grad_() for n, w in weights.items()}
            p0 = buffers["p0"].double().requires_grad_()
            positions = torch.arange(seq, device=device)
            q, k, mixed, outputs, stage_inputs, roles = prologue_from_p0(spec, leaves, p0, positions)
            torch.autograd.backward([q, k], [buffers["dq"].double(), buffers["dk"].double()])
            rows = [("dmixed", buffers["dmixed"], mixed.grad), ("dp0", buffers["dp0"], p0.grad)]
            for index in range(len(spec.qk_conv) - 1):
                # Stage index's output covers tokens from −(T − Σ_{j ≤ index}(K_j − 1)); pad to T.
                grad = outputs[index].grad
                padded = torch.nn.functional.pad(grad, (0, 0, history + seq - grad.shape[1], 0))
                rows.append((f"dconv{index}", buffers[f"dconv{index}"], padded))
                value = stage_inputs[index + 1].detach()
                padded_value = torch.nn.functional.pad(value, (0, 0, history + seq - value.shape[1], 0))
                start = history + seq - value.shape[1]
                rows.append((f"conv{index + 1}_in", buffers[f"conv{index + 1}_in"][:, start:], padded_value[:, start:]))
            temperature = spec.param_name("key_temperature")
            if temperature is not None:
                rows.append(("dtemp", buffers["grad." + temperature], leaves[temperature].grad))
            print(f"{name} {shape}: " + ", ".join(
                f"{label} {rel_l2(ours.double().reshape(want.shape), want):.2e}" for label, ours, want in rows), flush=True)


if __name__ == "__main__":
    main()
