"""Python loader for ccc kernel libraries (`ccc compile spec.attn -o DIR` writes DIR/<name>/).

    import ccc
    layer = ccc.load("out/zaya1")                 # manifest.json + PTX, kernels resolved lazily
    weights = layer.random_state_dict(seed=0)     # or a Hugging Face state dict on the GPU
    out = layer.forward(x, weights)               # x: [B, S, E] CUDA tensor in the spec's dtype

The manifest parsing, validation and call planning (ccc.manifest, ccc.sizes, ccc.spec) are plain
Python; launching needs torch and NVIDIA's cuda-bindings (ccc.driver) and is imported on first use."""

from .errors import CccError, KernelFault, ManifestError, SizeError, TensorMismatch, UnsupportedDevice
from .hf_match import LibraryMismatch, NotSupported
from .manifest import CallPlan, Manifest, plan_call, plan_for_input, read_library
from .spec import Spec, parse_spec


def load(directory, validate=False):
    """Loads the library in `directory` (its manifest.json and PTX). With validate=True every
    runtime-owned buffer is NaN-filled before each call and each kernel is checked for faults
    before the next is launched."""
    from .library import Layer

    return Layer(directory, validate=validate)


__all__ = ["load", "CccError", "KernelFault", "ManifestError", "SizeError", "TensorMismatch", "UnsupportedDevice",
           "LibraryMismatch", "NotSupported", "CallPlan", "Manifest", "Spec", "parse_spec", "plan_call",
           "plan_for_input", "read_library"]
