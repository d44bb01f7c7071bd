"""Validates compiled libraries on the GPU against the torch float64 reference and, for ZAYA1-form
CCA libraries, against Hugging Face's ZayaAttention fed the same state dict.

    python3 python/validate.py gpu-carry/libs/zaya1 gpu-carry/libs/mha --shapes 2x1000,1x4096

For each library and shape: seeded random x (the spec's dtype) and weights; our forward with every
runtime-owned buffer NaN-poisoned and each kernel checked; relative L2 error of out, q, k, v, o and
lse against the reference (each must be below --tolerance, 1e-2 for bf16/f16 storage; a NaN left in
any buffer fails). For ZayaAttention-compatible specs also: HF in float64 vs the reference (checks
the reference itself; expect ~1e-7 from HF's float32 RoPE tables), our out vs HF in float64 (same
tolerance), and for scale, not pass/fail: HF in the spec's dtype vs HF float64 and vs ours. Prints a table; exits 1 when anything fails, 2 on a setup error."""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import ccc  # noqa: E402
from ccc.hf import ZayaLayer, zaya_incompatibility  # noqa: E402
from ccc.library import TORCH_DTYPES  # noqa: E402
from ccc.reference import reference_forward, relative_l2  # noqa: E402

COMPARED = ("out", "q", "k", "v", "o", "lse")
REFERENCE_CHECK_TOLERANCE = 1e-5


def parse_shapes(text):
    shapes = []
    for item in text.split(","):
        batch, _, seq_len = item.strip().partition("x")
        shapes.append((int(batch), int(seq_len)))
    return shapes


def validate_library(directory, shapes, seed, tolerance, hf_max_seq_len):
    """Rows of (library, shape, comparison, rel L2, limit, ok)."""
    layer = ccc.load(directory, validate=True)
    spec = layer.spec
    rows = []
    hf_problem = zaya_incompatibility(spec) if spec.has_cca_parts() else "not a CCA spec"
    for batch, seq_len in shapes:
        shape = f"{batch}x{seq_len}"
        generator = torch.Generator(device="cpu").manual_seed(seed + seq_len)
        x = torch.randn(batch, seq_len, spec.model_dim, generator=generator,
                        dtype=torch.float64).to(device="cuda", dtype=TORCH_DTYPES[spec.dtype])
        weights = layer.random_state_dict(seed)
        ours = layer.forward_with_intermediates(x, weights)
        torch.cuda.synchronize()
        reference = reference_forward(spec, weights, x)
        for name in COMPARED:
            if name not in ours:
                continue
            nan_count = int(torch.isnan(ours[name]).sum())
            error = relative_l2(ours[name], reference[name])
            label = f"{name} vs torch f64" + (f" ({nan_count} NaN left)" if nan_count else "")
            rows.append((spec.name, shape, label, error, tolerance, error < tolerance))
        if hf_problem is None and seq_len <= hf_max_seq_len:
            hf64 = ZayaLayer(spec, weights, torch.float64).forward(x.to(torch.float64))
            error = relative_l2(reference["out"], hf64)
            rows.append((spec.name, shape, "torch f64 reference vs HF f64", error,
                         REFERENCE_CHECK_TOLERANCE, error < REFERENCE_CHECK_TOLERANCE))
            error = relative_l2(ours["out"], hf64)
            rows.append((spec.name, shape, "out vs HF ZayaAttention f64", error, tolerance,
                         error < tolerance))
            # For scale only: how far HF's own layer in storage precision is from float64.
            hf_native = ZayaLayer(spec, weights, x.dtype).forward(x)
            rows.append((spec.name, shape, f"(info) HF {spec.dtype} vs HF f64",
                         relative_l2(hf_native, hf64), None, True))
            rows.append((spec.name, shape, f"(info) out vs HF {spec.dtype}",
                         relative_l2(ours["out"], hf_native), None, True))
            del hf64, hf_native
        del ours, reference
        torch.cuda.empty_cache()
    if hf_problem is not None:
        rows.append((spec.name, "-", f"HF comparison skipped: {hf_problem}", None, None, True))
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("libraries", nargs="+", help="library directories (DIR/<name>)")
    parser.add_argument("--shapes", default="2x1000,1x4096",
                        help="comma-separated BxS shapes (default 2x1000,1x4096)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-2)
    parser.add_argument("--hf-max-seq-len", type=int, default=4096,
                        help="skip the (slow, float64) HF comparison above this length")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("validate.py needs a CUDA GPU", file=sys.stderr)
        return 2
    rows = []
    for directory in args.libraries:
        try:
            rows += validate_library(directory, parse_shapes(args.shapes), args.seed,
                                     args.tolerance, args.hf_max_seq_len)
        except ccc.CccError as error:
            rows.append((os.path.basename(directory.rstrip("/")), "-", f"error: {error}", None,
                         None, False))
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print("| library | BxS | comparison | rel L2 | limit | |")
    print("|---|---|---|---|---|---|")
    for library, shape, label, error, limit, ok in rows:
        error_text = "" if error is None else f"{error:.3e}"
        limit_text = "" if limit is None else f"{limit:.0e}"
        print(f"| {library} | {shape} | {label} | {error_text} | {limit_text} | "
              f"{'ok' if ok else 'FAIL'} |")
    failed = [row for row in rows if not row[5]]
    print(f"{len(rows) - len(failed)} of {len(rows)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
