"""GPU test of training through a loaded library (`emit = [forward, backward]`): the layer's output
is differentiable in x and every weight through `Layer.forward` (ccc.autograd's custom operators),
and every gradient autograd hands back is held against float64 autograd of python/ccc/reference.py.

For every library under DIR (default gpu-carry/train, which scripts/gpu-prepare.sh fills with
every example compiled with backward), loaded in validate mode (every buffer the kernels write
NaN-filled before each call, each launch checked), at B 1 and 3 × S 1, 17, 1000 and B 1 × S 4097:
dx and each weight's .grad against float64 autograd, as relative L2 errors pooled over three random
draws of weights, x and dout (--draws), passing at 1.5× the error of PyTorch's own 16-bit autograd
of the same layer (+1e-3), or of Hugging Face's ZayaAttention where it computes the layer (the
issue's peer); a gradient that is zero in exact arithmetic by its RMS against the peer's. Then, on
the first library: torch.library.opcheck of the forward operator (its backward included through
the autograd registration), torch.compile(fullgraph=True) of a function that calls the layer
(output and gradients equal to eager), and the errors for a library compiled without backward.

    python3 tests/python/gpu_autograd.py [DIR] [--shapes 1x1,3x17,...]   (needs a CUDA GPU, torch,
                                                                          cuda-bindings, transformers)"""

import argparse
import glob
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))

import torch  # noqa: E402

import ccc  # noqa: E402
from ccc.autograd import layer_operators  # noqa: E402
from ccc.hf import ZayaLayer, zaya_incompatibility  # noqa: E402
from ccc.reference import gradient_error, reference_gradients  # noqa: E402


def check(condition, message):
    print(("ok   " if condition else "FAIL ") + message, flush=True)
    return bool(condition)


def peer_gradients(layer, x, weights, dout):
    """(peer name, gradients): HF's own 16-bit autograd where ZayaAttention computes the layer,
    else PyTorch's 16-bit autograd of the reference's steps (SDPA for the attention)."""
    if layer.spec.has_cca_parts() and zaya_incompatibility(layer.spec) is None:
        return "hf", ZayaLayer(layer.spec, weights, x.dtype).gradients(x, dout)
    return "torch", reference_gradients(layer.spec, weights, x, dout, compute_dtype=x.dtype)


def one_draw(layer, batch, seq_len, seed):
    """(ours, exact, peer name, peer's) gradients by name (dx included) for one random draw of
    weights, x and dout."""
    spec = layer.spec
    weights = {n: w.requires_grad_() for n, w in layer.random_state_dict(seed=seed).items()}
    x = torch.randn(batch, seq_len, spec.model_dim, device="cuda").to(weights[next(iter(weights))].dtype)
    x.requires_grad_()
    dout = torch.randn_like(x)
    out = layer.forward(x, weights)
    out.backward(dout)
    ours = {"dx": x.grad, **{n: w.grad for n, w in weights.items()}}
    plain = {n: w.detach() for n, w in weights.items()}
    exact = reference_gradients(spec, plain, x, dout)
    peer, theirs = peer_gradients(layer, x.detach(), plain, dout)
    return ours, exact, peer, theirs


def gradients_match(layer, batch, seq_len, draws):
    """Every gradient against float64 over `draws` random draws, pooled (the error of the
    concatenated draws): a gradient of a few elements (dL/dtemp has one per kv head) is otherwise
    judged on a handful of rounding errors."""
    pooled, failures, worst = {}, [], (None, 0.0, 1.0)
    for draw in range(draws):
        ours, exact, peer, theirs = one_draw(layer, batch, seq_len, seed=seq_len + 1000 * draw)
        for name, expected in exact.items():
            got = ours[name]
            if got is None or got.shape != expected.shape or not torch.isfinite(got).all():
                failures.append(f"{name}: {'missing' if got is None else 'not finite or misshapen'} (draw {draw})")
                continue
            for part, tensor in zip(pooled.setdefault(name, ([], [], [])), (got, expected, theirs[name])):
                part.append(tensor.detach().reshape(-1).to(torch.float64))
    for name, (got, expected, peer_grad) in pooled.items():
        error, bound = gradient_error(torch.cat(got), torch.cat(expected), torch.cat(peer_grad))
        if error > bound:
            failures.append(f"{name}: {error:.2e} > {bound:.2e}")
        if error / bound > worst[1] / worst[2]:
            worst = (name, error, bound)
    return check(not failures, f"{layer.spec.name} {batch}x{seq_len}: dx and {len(exact) - 1} weight gradients "
                 f"against f64 autograd over {draws} draws (bound from {peer}'s 16-bit autograd); nearest "
                 f"its bound {worst[0]} {worst[1]:.2e} <= {worst[2]:.2e}" + (f"; {failures}" if failures else ""))


def operator_checks(layer):
    results = []
    weights = layer.random_state_dict(seed=0)
    names = [w.name for w in layer.manifest.weights]
    x = torch.randn(1, 17, layer.spec.model_dim, device="cuda").to(weights[names[0]].dtype)
    forward = layer_operators(layer)
    try:
        torch.library.opcheck(forward, (x.requires_grad_(), [weights[n].requires_grad_() for n in names]))
        results.append(check(True, f"{layer.name}: torch.library.opcheck of the forward operator"))
    except Exception as error:  # opcheck raises its findings as exceptions
        results.append(check(False, f"{layer.name}: torch.library.opcheck: {error}"))

    def model(inputs, state):
        return layer.forward(inputs, state).float().square().mean()

    eager_x = x.detach().clone().requires_grad_()
    eager_w = {n: w.detach().clone().requires_grad_() for n, w in weights.items()}
    model(eager_x, eager_w).backward()
    compiled_x = x.detach().clone().requires_grad_()
    compiled_w = {n: w.detach().clone().requires_grad_() for n, w in weights.items()}
    try:
        torch.compile(model, fullgraph=True)(compiled_x, compiled_w).backward()
        same = torch.equal(eager_x.grad, compiled_x.grad) and all(
            torch.equal(eager_w[n].grad, compiled_w[n].grad) for n in names)
        results.append(check(same, f"{layer.name}: torch.compile(fullgraph=True) through the layer, "
                                   "gradients equal to eager"))
    except Exception as error:
        results.append(check(False, f"{layer.name}: torch.compile(fullgraph=True): {error}"))
    return results


def forward_only_errors(directory):
    layer = ccc.load(directory)
    weights = layer.random_state_dict(seed=0)
    x = torch.randn(1, 17, layer.spec.model_dim, device="cuda").to(next(iter(weights.values())).dtype)
    try:
        layer.forward(x.requires_grad_(), weights)
        return check(False, "a forward-only library must refuse a differentiable call")
    except ccc.ManifestError as error:
        return check("compiled without the backward entry point" in str(error),
                     f"a forward-only library refuses a differentiable call: {error}")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("directory", nargs="?", default="gpu-carry/train")
    parser.add_argument("--shapes", default="1x1,3x1,1x17,3x17,1x1000,3x1000,1x4097")
    parser.add_argument("--draws", type=int, default=3, help="random draws pooled per shape (at least 1)")
    parser.add_argument("--forward-only", default="gpu-carry/libs/mha/mha")
    args = parser.parse_args()
    if args.draws < 1:
        parser.error("--draws must be at least 1")
    libraries = sorted(os.path.dirname(m) for m in glob.glob(os.path.join(args.directory, "*", "*", "manifest.json")))
    results = [check(bool(libraries), f"libraries under {args.directory}: {len(libraries)}")]
    torch.manual_seed(0)
    for directory in libraries:
        layer = ccc.load(directory, validate=True)
        for shape in args.shapes.split(","):
            batch, seq_len = map(int, shape.split("x"))
            results.append(gradients_match(layer, batch, seq_len, args.draws))
    if libraries:
        results += operator_checks(ccc.load(libraries[0]))
    if os.path.exists(os.path.join(args.forward_only, "manifest.json")):
        results.append(forward_only_errors(args.forward_only))
    print(f"\n{sum(results)} of {len(results)} checks passed")
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
