"""Which compiled library implements which attention layer of a Hugging Face ZAYA model: the layer's
fields read off its config (transformers' `ZayaConfig`, or any object with its attributes) the way
`ZayaAttention` and `ZayaRotaryEmbedding` read them, compared with each library's spec. Plain
Python, so that `ccc.hf.patch`'s choice and its errors are tested without torch or transformers."""

import math
import os

from .errors import CccError, ManifestError
from .manifest import MANIFEST_FILE, read_library

COMPILE_HINT = ("compile the model's spec there: `ccc spec --from-hf config.json > model.attn && "
                "ccc compile model.attn -o DIR` (with `emit = [forward, decode]` in each block for generate)")

# ZAYA's layer types: `hybrid` attends causally, `hybrid_sliding` in a sliding window.
LAYER_TYPES = ("hybrid", "hybrid_sliding")


class LibraryMismatch(CccError, ValueError):
    """No library in the directory implements a layer of the model, or several do."""


class NotSupported(CccError, NotImplementedError):
    """A model, layer, cache or call that ccc's layers cannot run as Hugging Face's module would:
    a padded batch, positions other than the cached length onwards, a RoPE with frequency scaling,
    a cache other than DynamicCache, beam search, ..."""


def dtype_name(torch_dtype_text):
    """"bf16" or "f16" for `str(torch.bfloat16)` / `str(torch.float16)`; NotSupported otherwise."""
    names = {"torch.bfloat16": "bf16", "torch.float16": "f16"}
    if torch_dtype_text not in names:
        raise NotSupported(f"the model's attention weights are {torch_dtype_text.replace('torch.', '')}: ccc's "
                           "layers run in bfloat16 or float16 (convert the model first, e.g. "
                           "`model.to(torch.bfloat16)`)")
    return names[torch_dtype_text]


def layer_fields(config, layer_index, dtype):
    """The spec fields of layer `layer_index` of a ZAYA model with this config and weight dtype
    ("bf16" or "f16"), as {field: value} in the form of `spec_fields`. Raises NotSupported for a
    layer that no ccc spec expresses."""
    where = f"layer {layer_index}"
    layer_type = config.layer_types[layer_index]
    if layer_type not in LAYER_TYPES:
        raise NotSupported(f"{where}: layer type `{layer_type}` is not one of ZAYA's ({', '.join(LAYER_TYPES)})")
    kv_heads = config.num_key_value_heads
    if kv_heads % 2:
        raise NotSupported(f"{where}: {kv_heads} kv heads: ZAYA takes half the value channels from the previous "
                           "token, which ccc expresses in whole kv heads (value_shift), so it needs an even number")
    # ZayaAttention's own fallback when the config has no head_dim.
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = (config.rope_parameters or {}).get(layer_type)
    if not isinstance(rope, dict):
        raise NotSupported(f"{where}: the config's rope_parameters has no `{layer_type}` entry, which "
                           "ZayaRotaryEmbedding reads for this layer type")
    if rope.get("rope_type", "default") != "default":
        raise NotSupported(f"{where}: rope_type `{rope['rope_type']}`: ccc's RoPE has no frequency scaling "
                           "(only `default`)")
    if "rope_theta" not in rope:
        raise NotSupported(f"{where}: the config's rope_parameters.{layer_type} has no rope_theta")
    # ZayaRotaryEmbedding.compute_default_rope_parameters: int(head_dim * factor), factor 1 when absent.
    rotary_dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    if layer_type == "hybrid":
        mask = "causal"
    else:
        window = config.sliding_window
        if not isinstance(window, int) or window <= 0:
            raise NotSupported(f"{where}: a `hybrid_sliding` layer, but sliding_window is {window!r}")
        mask = f"sliding_window({window})"
    return {
        "model_dim": config.hidden_size,
        "head_dim": head_dim,
        "query_heads": config.num_attention_heads,
        "kv_heads": kv_heads,
        "qk_conv": f"depthwise({config.cca_time0}), per_head({config.cca_time1})",
        "qk_mean": True,
        "value_shift": kv_heads // 2,
        "qk_norm": "l2",
        # ZayaQKNorm multiplies by the temperature as it is.
        "key_temperature": "learned",
        "rope": f"neox, rotary_dim {rotary_dim}, theta {float(rope['rope_theta'])!r}" if rotary_dim else "none",
        "mask": mask,
        "softmax_scale": head_dim**-0.5,
        "dtype": dtype,
        "bias": bool(config.attention_bias),
    }


def spec_fields(spec):
    """A spec's fields in the form `layer_fields` gives a layer's."""
    rope = spec.rope
    return {
        "model_dim": spec.model_dim,
        "head_dim": spec.head_dim,
        "query_heads": spec.query_heads,
        "kv_heads": spec.kv_heads,
        "qk_conv": ", ".join(f"{stage.kind}({stage.width})" for stage in spec.qk_conv) or "none",
        "qk_mean": spec.qk_mean,
        "value_shift": spec.value_shift,
        "qk_norm": spec.qk_norm,
        "key_temperature": spec.key_temperature,
        "rope": f"{rope.style}, rotary_dim {rope.rotary_dim}, theta {rope.theta!r}" if rope else "none",
        "mask": str(spec.mask),
        "softmax_scale": spec.softmax_scale,
        "dtype": spec.dtype,
        "bias": spec.bias,
    }


def differences(layer, spec):
    """Where `spec` differs from a layer's fields (`layer_fields`), as "FIELD LIB, not LAYER"."""
    found, library = [], spec_fields(spec)
    for field, wanted in layer.items():
        have = library[field]
        same = (math.isclose(have, wanted, rel_tol=1e-12) if field == "softmax_scale" else have == wanted)
        if not same:
            found.append(f"{field} {have}, not {wanted}")
    return found


def library_directories(libraries):
    """The library directories under `libraries`: the directory itself when it holds a
    manifest.json, else each subdirectory that does (as `ccc compile -o DIR` writes them)."""
    libraries = os.fspath(libraries)
    if os.path.isfile(os.path.join(libraries, MANIFEST_FILE)):
        return [libraries]
    if not os.path.isdir(libraries):
        raise LibraryMismatch(f"{libraries} is not a directory; {COMPILE_HINT}")
    found = sorted(os.path.join(libraries, name) for name in os.listdir(libraries)
                   if os.path.isfile(os.path.join(libraries, name, MANIFEST_FILE)))
    if not found:
        raise LibraryMismatch(f"{libraries} holds no library (no {libraries}/NAME/{MANIFEST_FILE}); {COMPILE_HINT}")
    return found


def read_libraries(libraries):
    """[(directory, Manifest)] of every library under `libraries` (`library_directories`); a
    manifest that does not read is an error naming it."""
    read = []
    for directory in library_directories(libraries):
        manifest, _module = read_library(directory)
        read.append((directory, manifest))
    return read


def choose_library(config, layer_index, dtype, candidates, libraries="the library directory"):
    """The one (directory, Manifest) of `candidates` whose spec is layer `layer_index`'s;
    LibraryMismatch naming the layer and what differs in each library when none is, or naming
    them all when several are."""
    wanted = layer_fields(config, layer_index, dtype)
    matching, reasons = [], []
    for directory, manifest in candidates:
        problems = differences(wanted, manifest.spec)
        if problems:
            reasons.append(f"  {os.path.basename(directory)}: " + "; ".join(problems))
        else:
            matching.append((directory, manifest))
    if len(matching) == 1:
        return matching[0]
    layer_type = config.layer_types[layer_index]
    if matching:
        names = ", ".join(os.path.basename(directory) for directory, _ in matching)
        raise LibraryMismatch(f"layer {layer_index} (`{layer_type}`) matches several libraries in {libraries}: "
                              f"{names}; keep one")
    described = ", ".join(f"{field} {value}" for field, value in wanted.items())
    raise LibraryMismatch(f"no library in {libraries} implements layer {layer_index} (`{layer_type}`: {described}):\n"
                          + "\n".join(reasons) + f"\n{COMPILE_HINT}")


def check_weights(manifest, parameters, layer_index):
    """ManifestError unless the module's parameters [(name, shape)] are the library's weights by
    name and shape (what it reads through `named_parameters()`)."""
    have = sorted((name, tuple(shape)) for name, shape in parameters)
    wanted = sorted((weight.name, tuple(weight.shape)) for weight in manifest.weights)
    if have != wanted:
        extra = [f"{name} {list(shape)}" for name, shape in have if (name, shape) not in wanted]
        missing = [f"{name} {list(shape)}" for name, shape in wanted if (name, shape) not in have]
        raise ManifestError(f"layer {layer_index}'s parameters are not `{manifest.spec.name}`'s weights: "
                            f"the module has {', '.join(extra) or 'nothing else'}; the library wants "
                            f"{', '.join(missing) or 'nothing else'}")


__all__ = ["LibraryMismatch", "NotSupported", "check_weights", "choose_library", "differences", "dtype_name",
           "layer_fields", "library_directories", "read_libraries", "spec_fields"]
