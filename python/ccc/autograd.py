"""PyTorch autograd for a loaded layer compiled with `emit = [forward, backward]`.

Each loaded library gets two operators registered with `torch.library.custom_op`:
`ccc::<name>_<n>_forward(x, weights) -> (out, saved)` and
`ccc::<name>_<n>_backward(x, weights, saved, dout) -> (dx, weight gradients)`, with fake
implementations that give every output's shape from the manifest (so `torch.compile(fullgraph=True)`
traces through them without running them) and the first's gradient formula the second
(`register_autograd`). `Layer.forward` calls them whenever autograd records and x or a weight
requires grad; `differentiable_forward` is the same call spelled out."""

import torch

from .errors import TensorMismatch

# Operators registered so far in this process: each loaded Layer gets its own pair.
_registered_count = 0


def differentiable_forward(layer, x, state_dict):
    """out = layer(x) with the weights `state_dict` (Hugging Face names), recorded by autograd:
    `out.backward(dout)` fills x.grad and each weight's .grad (in the weight's dtype)."""
    layer.require_backward()
    names = [w.name for w in layer.manifest.weights]
    missing = [name for name in names if name not in state_dict]
    if missing:
        raise TensorMismatch([f"missing weight `{name}`" for name in missing])
    out, _saved = layer_operators(layer)(x, [state_dict[name] for name in names])
    return out


def layer_operators(layer):
    """The forward operator of `layer` (registering both on first use, for this Layer object:
    another `ccc.load` of the same directory gets its own)."""
    global _registered_count
    if layer._operators is None:
        layer._operators = _register(layer, f"ccc::{layer.name}_{_registered_count}")
        _registered_count += 1
    return layer._operators


def _register(layer, qualified):
    names = [w.name for w in layer.manifest.weights]
    saved_names = [b.name for b in layer.manifest.entry_point("forward").buffers if b.role == "saved"]

    @torch.library.custom_op(f"{qualified}_forward", mutates_args=())
    def forward(x: torch.Tensor, weights: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        out, saved = layer.forward_saving(x, dict(zip(names, weights)))
        return out, [saved[name] for name in saved_names]

    @forward.register_fake
    def _(x, weights):
        shapes = layer.buffer_shapes("forward", x.shape[0], x.shape[1])
        made = lambda name: x.new_empty(shapes[name][0], dtype=shapes[name][1])  # noqa: E731
        return made("out"), [made(name) for name in saved_names]

    @torch.library.custom_op(f"{qualified}_backward", mutates_args=())
    def backward(x: torch.Tensor, weights: list[torch.Tensor], saved: list[torch.Tensor],
                 dout: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        dx, grads = layer.backward(x, dict(zip(names, weights)), dict(zip(saved_names, saved)), dout)
        # The kernels sum weight gradients in f32; autograd wants each in its weight's dtype.
        return dx, [grads[name].to(weight.dtype) for name, weight in zip(names, weights)]

    @backward.register_fake
    def _(x, weights, saved, dout):
        return torch.empty_like(x), [torch.empty_like(weight) for weight in weights]

    def setup_context(ctx, inputs, output):
        x, weights = inputs
        ctx.weight_count = len(weights)
        ctx.save_for_backward(x, *weights, *output[1])

    def gradient(ctx, dout, _dsaved):
        x, *rest = ctx.saved_tensors
        weights, saved = rest[:ctx.weight_count], rest[ctx.weight_count:]
        dx, grads = backward(x, list(weights), list(saved), dout.contiguous())
        return dx, grads

    forward.register_autograd(gradient, setup_context=setup_context)
    return forward


__all__ = ["differentiable_forward", "layer_operators"]
