"""GPU smoke test of the loader and the torch reference, without a compiled attention library:
runs the runtime's two-kernel fixture library (runtime/tests/common/mod.rs) through ccc.load and
checks its output bit for bit, checks the error messages on a wrong call, checks that a persistent
grid launches one CTA per SM of the GPU, captures a bound call in a CUDA graph, and checks the torch float64 reference against Hugging
Face's ZayaAttention in float64 on ZAYA1's shape.

    python3 tests/python/gpu_smoke.py      (needs a CUDA GPU, torch, cuda-bindings, transformers)"""

import json
import os
import shutil
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))

import torch  # noqa: E402

import ccc  # noqa: E402
from ccc.hf import ZayaLayer  # noqa: E402
from ccc.library import random_state_dict  # noqa: E402
from ccc.reference import reference_forward, relative_l2  # noqa: E402
from ccc.spec import parse_spec  # noqa: E402

FIXTURES = os.path.join(HERE, "fixtures")


def check(condition, message):
    print(("ok   " if condition else "FAIL ") + message, flush=True)
    return bool(condition)


def fixture_library():
    results = []
    for validate in (True, False):
        layer = ccc.load(os.path.join(FIXTURES, "fixture"), validate=validate)
        weights = layer.random_state_dict(seed=1)
        x = torch.randn(2, 17, 8, device="cuda").to(torch.bfloat16)
        # On a side stream: the kernels must run on torch's current stream, after x is written.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            outputs = layer.forward_with_intermediates(x, weights, poison=validate)
        torch.cuda.current_stream().wait_stream(side)
        doubled = (2 * x.float()).to(torch.bfloat16)
        diagonal = torch.diagonal(weights["o_proj.weight"]).float()
        expected = (doubled.float() + diagonal).to(torch.bfloat16)
        results.append(check(torch.equal(outputs["o"].reshape(2, 17, 8), doubled)
                             and outputs["o"].shape == (2, 17, 2, 4),
                             f"fixture o = 2x, viewed [B, S, heads, d] (validate={validate})"))
        results.append(check(torch.equal(outputs["out"], expected),
                             f"fixture out = o + diag(W_o) bit for bit (validate={validate})"))
        results.append(check(torch.equal(layer.forward(x, weights), expected),
                             f"forward() returns out (validate={validate})"))
    try:
        layer.forward(x.float(), weights)
        results.append(check(False, "an f32 x must be refused"))
    except ccc.TensorMismatch as error:
        results.append(check("tensor `x`: expected bf16 [B, S, 8], got f32 [2, 17, 8]"
                             == str(error), f"wrong dtype refused: {error}"))
    wrong = dict(weights, extra=weights["o_proj.weight"])
    wrong["o_proj.weight"] = weights["o_proj.weight"].t()
    del wrong["q_proj.weight"]
    try:
        layer.forward(x, wrong)
        results.append(check(False, "wrong weights must be refused"))
    except ccc.TensorMismatch as error:
        results.append(check(len(error.problems) == 3, f"wrong weights refused: {error}"))
    return results


def persistent_grid():
    """The fixture with its second kernel on [SMs, 1, 1] (runtime/tests/common/mod.rs,
    persistent_fixture): its 64-thread CTAs do not loop, so they write the first 64·SMs elements
    of out and leave the rest NaN-poisoned, which shows the grid the loader launched."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    with tempfile.TemporaryDirectory() as directory:
        shutil.copytree(os.path.join(FIXTURES, "fixture"), directory, dirs_exist_ok=True)
        path = os.path.join(directory, "manifest.json")
        with open(path) as file:
            manifest = json.load(file)
        manifest["entry_points"][0]["kernels"][1]["grid"] = [{"var": "SMs"}, {"const": 1},
                                                             {"const": 1}]
        with open(path, "w") as file:
            json.dump(manifest, file)
        layer = ccc.load(directory, validate=True)
        weights = layer.random_state_dict(seed=1)
        x = torch.randn(1, 8 * sms + 8, 8, device="cuda").to(torch.bfloat16)
        out = layer.forward(x, weights).flatten()
    written = int((~out.isnan()).sum())
    return [check(written == 64 * sms and not out[:written].isnan().any(),
                  f"a persistent grid runs one CTA per SM: {written} of {out.numel()} written, "
                  f"64 x {sms} SMs expected")]


def graph_capture():
    """A bound forward call captured in a CUDA graph: new inputs written into the bound x in place,
    a replay gives bit for bit what a direct run gives (no launch of the call allocates or
    synchronises, so capture is legal)."""
    layer = ccc.load(os.path.join(FIXTURES, "fixture"))
    weights = layer.random_state_dict(seed=2)
    x = torch.randn(2, 17, 8, device="cuda").to(torch.bfloat16)
    call = layer.bind(x, weights)
    call.run()  # loads the module before capture: loading is not a stream operation
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call.run()
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.cuda.synchronize()
    replayed = call.outputs()["out"].clone()
    call.run()
    torch.cuda.synchronize()
    return [check(torch.equal(replayed, call.outputs()["out"]),
                  "a CUDA-graph replay of a bound forward equals a direct run, bit for bit")]


def reference_against_hf():
    with open(os.path.join(FIXTURES, "zaya1_spec.json")) as file:
        spec = parse_spec(json.load(file))
    weights = random_state_dict(spec, seed=3)
    x = torch.randn(2, 257, spec.model_dim, device="cuda", dtype=torch.float64)
    ours = reference_forward(spec, weights, x)["out"]
    hf64 = ZayaLayer(spec, weights, torch.float64).forward(x)
    error = relative_l2(ours, hf64)
    results = [check(error < 1e-5, f"torch f64 reference vs HF ZayaAttention f64, ZAYA1 2x257: "
                                   f"rel L2 {error:.2e}")]
    hf_bf16 = ZayaLayer(spec, weights, torch.bfloat16).forward(x.to(torch.bfloat16))
    print(f"info HF bf16 vs HF f64: rel L2 {relative_l2(hf_bf16, hf64):.2e}")
    return results


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    outcomes = fixture_library() + persistent_grid() + graph_capture() + reference_against_hf()
    print(f"{sum(outcomes)} of {len(outcomes)} passed")
    sys.exit(0 if all(outcomes) else 1)
