"""Reading, validating and planning calls of a kernel library manifest (schema version 5,
docs/manifest.md), in plain Python so that it runs and is tested without a GPU or torch.

`read_library(dir)` parses and validates `dir/manifest.json` with the rules of
`Manifest::from_json` (src/manifest.rs); `plan_for_input` turns the caller's input shape into a
`CallPlan` (every buffer's concrete shape and byte count, every launch's grid and arguments) with
the checks of the Rust runtime's `CallPlan::for_input`; `check_supplied` checks the caller's
tensors (x and the weights) by name, dtype, shape, device and contiguity, listing every problem."""

import json
import os
import re
from collections import namedtuple
import dataclasses
from dataclasses import dataclass

from .errors import ManifestError, SizeError, TensorMismatch, UnsupportedDevice
from .sizes import SIZE_VARS, U64_MAX, Unbound, format_shape, parse_size_expr
from .spec import parse_spec

SCHEMA_VERSION = 6
MANIFEST_FILE = "manifest.json"
MAX_DYNAMIC_SHARED_BYTES = 232_448
DEFAULT_SHARED_LIMIT_BYTES = 48 * 1024
MAX_THREADS_PER_BLOCK = 1024
MAX_GRID = (2**31 - 1, 65_535, 65_535)
U32_MAX = 2**32 - 1
MAX_TENSOR_MAP_BOX_ROWS = 256  # cuTensorMapEncodeTiled: every box dimension <= 256

ROLES = ("input", "output", "weight", "intermediate", "scratch", "saved", "state")
CALLER_SUPPLIED_ROLES = ("input", "weight", "state")
TENSOR_DTYPES = {"bf16": 2, "f16": 2, "f32": 4, "i32": 4}
PTX_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*\Z")


@dataclass(frozen=True)
class WeightInfo:
    name: str
    shape: tuple
    dtype: str


@dataclass(frozen=True)
class BufferManifest:
    name: str
    role: str
    dtype: str
    shape: tuple  # of SizeExpr
    layout: str


@dataclass(frozen=True)
class KernelManifest:
    symbol: str
    # ("buffer", name), ("size", "B" | "S" | "SMs") or ("tensor_map", (name, rows, view)), view
    # the shape (size expressions) the map sees the buffer as, or None for its own
    params: tuple
    grid: tuple  # three SizeExpr
    block: tuple
    dynamic_shared_bytes: int
    ptxas: object  # dict or None


@dataclass(frozen=True)
class EntryPointManifest:
    entry: str
    kernels: tuple
    buffers: tuple

    def buffer(self, name):
        return next((b for b in self.buffers if b.name == name), None)


@dataclass(frozen=True)
class Manifest:
    schema_version: int
    compiler_version: str
    spec: object
    target: str
    ptx_file: str
    entry_points: tuple
    weights: tuple
    cubin_file: object = None  # str or None: the PTX assembled for `target` (`ccc compile --cubin`)

    def entry_point(self, entry):
        return next((e for e in self.entry_points if e.entry == entry), None)


def _object(value, where, required, optional=()):
    """Checks that `value` is an object with every required key and no unknown one."""
    if not isinstance(value, dict):
        raise ManifestError(f"malformed manifest: {where}: expected an object, got {value!r}")
    unknown = [k for k in value if k not in required and k not in optional]
    if unknown:
        raise ManifestError(f"malformed manifest: {where}: unknown field `{unknown[0]}`, "
                            f"expected one of {', '.join(required + optional)}")
    missing = [k for k in required if k not in value]
    if missing:
        raise ManifestError(f"malformed manifest: {where}: missing field `{missing[0]}`")
    return value


def _typed(value, kind, where):
    checks = {
        "uint": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= U32_MAX,
        "str": lambda v: isinstance(v, str),
        "list": lambda v: isinstance(v, list),
    }
    if not checks[kind](value):
        raise ManifestError(f"malformed manifest: {where}: expected {kind}, got {value!r}")
    return value


def _variant(value, choices, where):
    if value not in choices:
        raise ManifestError(f"malformed manifest: {where}: unknown variant {value!r}, "
                            f"expected one of {', '.join(choices)}")
    return value


def _parse_buffer(obj, where):
    _object(obj, where, ("name", "role", "dtype", "shape", "layout"))
    shape = tuple(parse_size_expr(d, f"{where}.shape[{i}]")
                  for i, d in enumerate(_typed(obj["shape"], "list", f"{where}.shape")))
    return BufferManifest(
        name=_typed(obj["name"], "str", f"{where}.name"),
        role=_variant(obj["role"], ROLES, f"{where}.role"),
        dtype=_variant(obj["dtype"], tuple(TENSOR_DTYPES), f"{where}.dtype"),
        shape=shape,
        layout=_typed(obj["layout"], "str", f"{where}.layout"),
    )


def _parse_param(obj, where):
    if not isinstance(obj, dict) or obj.get("kind") not in ("buffer", "size", "tensor_map"):
        raise ManifestError(f"malformed manifest: {where}: expected "
                            f"{{\"kind\": \"buffer\", \"name\": ..}}, "
                            f"{{\"kind\": \"size\", \"var\": \"B\" | \"S\" | \"SMs\"}} or "
                            f"{{\"kind\": \"tensor_map\", \"buffer\": .., \"box_rows\": ..}}, got {obj!r}")
    if obj["kind"] == "buffer":
        _object(obj, where, ("kind", "name"))
        return ("buffer", _typed(obj["name"], "str", f"{where}.name"))
    if obj["kind"] == "tensor_map":
        _object(obj, where, ("kind", "buffer", "box_rows"), ("view",))
        view = None
        if "view" in obj:
            view = tuple(parse_size_expr(d, f"{where}.view[{i}]")
                         for i, d in enumerate(_typed(obj["view"], "list", f"{where}.view")))
        return ("tensor_map", (_typed(obj["buffer"], "str", f"{where}.buffer"),
                               _typed(obj["box_rows"], "uint", f"{where}.box_rows"), view))
    _object(obj, where, ("kind", "var"))
    return ("size", _variant(obj["var"], tuple(SIZE_VARS), f"{where}.var"))


def _parse_kernel(obj, where):
    _object(obj, where, ("symbol", "params", "grid", "block", "dynamic_shared_bytes"), ("ptxas",))
    grid = _typed(obj["grid"], "list", f"{where}.grid")
    block = _typed(obj["block"], "list", f"{where}.block")
    if len(grid) != 3 or len(block) != 3:
        raise ManifestError(f"malformed manifest: {where}: grid and block have three items")
    ptxas = obj.get("ptxas")
    if ptxas is not None:
        _object(ptxas, f"{where}.ptxas",
                ("registers", "spill_stores", "spill_loads", "shared_bytes"))
        for key, value in ptxas.items():
            _typed(value, "uint", f"{where}.ptxas.{key}")
    return KernelManifest(
        symbol=_typed(obj["symbol"], "str", f"{where}.symbol"),
        params=tuple(_parse_param(p, f"{where}.params[{i}]")
                     for i, p in enumerate(_typed(obj["params"], "list", f"{where}.params"))),
        grid=tuple(parse_size_expr(g, f"{where}.grid[{i}]") for i, g in enumerate(grid)),
        block=tuple(_typed(b, "uint", f"{where}.block[{i}]") for i, b in enumerate(block)),
        dynamic_shared_bytes=_typed(obj["dynamic_shared_bytes"], "uint",
                                    f"{where}.dynamic_shared_bytes"),
        ptxas=ptxas,
    )


def parse_manifest(text):
    """Parses and validates manifest JSON text; raises ManifestError naming the rule broken."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ManifestError(f"manifest is not valid JSON: {error}") from None
    if not isinstance(value, dict) or "schema_version" not in value:
        raise ManifestError("manifest has no schema_version")
    version = value["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 0:
        raise ManifestError("manifest schema_version is not an unsigned integer")
    if version != SCHEMA_VERSION:
        raise ManifestError(f"unknown manifest schema version {version}: "
                            f"this build reads version {SCHEMA_VERSION}")
    _object(value, "manifest", ("schema_version", "compiler_version", "spec", "target",
                                "ptx_file", "entry_points", "weights"), ("cubin_file",))
    weights = []
    for i, w in enumerate(_typed(value["weights"], "list", "weights")):
        where = f"weights[{i}]"
        _object(w, where, ("name", "shape", "dtype"))
        weights.append(WeightInfo(
            _typed(w["name"], "str", f"{where}.name"),
            tuple(_typed(d, "uint", f"{where}.shape")
                  for d in _typed(w["shape"], "list", f"{where}.shape")),
            _variant(w["dtype"], tuple(TENSOR_DTYPES), f"{where}.dtype")))
    entries = []
    for i, e in enumerate(_typed(value["entry_points"], "list", "entry_points")):
        where = f"entry_points[{i}]"
        _object(e, where, ("entry", "kernels", "buffers"))
        entries.append(EntryPointManifest(
            entry=_variant(e["entry"], ("forward", "backward", "decode", "prefill"), f"{where}.entry"),
            kernels=tuple(_parse_kernel(k, f"{where}.kernels[{j}]") for j, k in
                          enumerate(_typed(e["kernels"], "list", f"{where}.kernels"))),
            buffers=tuple(_parse_buffer(b, f"{where}.buffers[{j}]") for j, b in
                          enumerate(_typed(e["buffers"], "list", f"{where}.buffers")))))
    manifest = Manifest(
        schema_version=version,
        compiler_version=_typed(value["compiler_version"], "str", "compiler_version"),
        spec=parse_spec(value["spec"]),
        target=_typed(value["target"], "str", "target"),
        ptx_file=_typed(value["ptx_file"], "str", "ptx_file"),
        entry_points=tuple(entries),
        weights=tuple(weights),
        cubin_file=(None if value.get("cubin_file") is None
                    else _typed(value["cubin_file"], "str", "cubin_file")),
    )
    validate_manifest(manifest)
    return manifest


def _describe_weights(weights):
    return ", ".join(f"{w.name} {list(w.shape)} {w.dtype}" for w in weights)


def expected_weights(spec):
    """The weights list every manifest for `spec` carries: `spec.params()` in the spec's dtype."""
    return tuple(WeightInfo(p.name, p.shape, spec.dtype) for p in spec.params())


def validate_manifest(manifest):
    """Rules 3 to 7 of docs/manifest.md (parsing covers 1 and 2)."""
    spec = manifest.spec
    if not manifest.target.startswith("sm_"):
        raise ManifestError(f"target `{manifest.target}` is not a CUDA architecture like sm_90a")
    files = [("ptx_file", manifest.ptx_file)]
    if manifest.cubin_file is not None:
        files.append(("cubin_file", manifest.cubin_file))
    for field, file in files:
        parts = file.replace("\\", "/").split("/")
        if not file or os.path.isabs(file) or any(part == ".." for part in parts):
            raise ManifestError(f"{field} `{file}` must be a relative path inside the library directory")
    expected = expected_weights(spec)
    if manifest.weights != expected:
        raise ManifestError(
            f"weights must be the spec's parameters in order, in {spec.dtype}: "
            f"expected [{_describe_weights(expected)}], got [{_describe_weights(manifest.weights)}]")
    seen_entries, seen_symbols = set(), set()
    for entry in manifest.entry_points:
        if entry.entry in seen_entries:
            raise ManifestError(f"entry point `{entry.entry}` is listed twice")
        seen_entries.add(entry.entry)
        if entry.entry not in spec.library_entry_points():
            raise ManifestError(f"entry point `{entry.entry}` is not in the spec's emit list")
        try:
            _validate_entry(entry, manifest)
        except ManifestError as error:
            raise ManifestError(f"entry point `{entry.entry}`: {error}") from None
        for kernel in entry.kernels:
            if kernel.symbol in seen_symbols:
                raise ManifestError(f"kernel symbol `{kernel.symbol}` is used twice")
            seen_symbols.add(kernel.symbol)
    _validate_saved(manifest)
    for entry in spec.library_entry_points():
        if entry not in seen_entries:
            raise ManifestError(f"the spec emits `{entry}` but the manifest lacks it")


def _validate_saved(manifest):
    """Role `saved` only in the forward; with a backward, its inputs other than x and dout are
    exactly the forward's saved buffers, declared alike (the Rust rule, src/manifest.rs)."""
    for entry in manifest.entry_points:
        if entry.entry != "forward":
            for buffer in entry.buffers:
                if buffer.role == "saved":
                    raise ManifestError(f"entry point `{entry.entry}`: buffer `{buffer.name}` has role "
                                        "saved, which only the forward's buffers take")
    forward, backward = manifest.entry_point("forward"), manifest.entry_point("backward")
    if forward is None:
        return
    kept = [b for b in forward.buffers if b.role == "saved"]
    if backward is None:
        if kept:
            raise ManifestError(f"the forward saves `{kept[0].name}` but the library has no backward")
        return
    for read in backward.buffers:
        if read.role != "input" or read.name in ("x", "dout"):
            continue
        found = forward.buffer(read.name)
        if found is None or (found.role, found.dtype, found.shape) != ("saved", read.dtype, read.shape):
            raise ManifestError(f"the backward reads `{read.name}` ({read.dtype} "
                                f"{format_shape(read.shape)}), which the forward does not save as such")
    for buffer in kept:
        if backward.buffer(buffer.name) is None:
            raise ManifestError(f"the forward saves `{buffer.name}`, which the backward does not read")


def _validate_entry(entry, manifest):
    spec = manifest.spec
    names = {}
    for buffer in entry.buffers:
        if buffer.name in names:
            raise ManifestError(f"buffer `{buffer.name}` is declared twice")
        names[buffer.name] = buffer
        problem = _buffer_problem(buffer, manifest)
        if problem:
            raise ManifestError(f"buffer `{buffer.name}`: {problem}")
    token_buffers = {"forward": (("x", "input"), ("out", "output")),
                     "backward": (("x", "input"), ("dout", "input"), ("dx", "output")),
                     "decode": (("x", "input"), ("out", "output")),
                     "prefill": (("x", "input"), ("out", "output"))}
    if entry.entry not in ("decode", "prefill"):
        for buffer in entry.buffers:
            if buffer.role == "state":
                raise ManifestError(f"buffer `{buffer.name}` has role state, which only the decode "
                                    "and prefill entry points' buffers take")
    if entry.entry in token_buffers:
        # A decode step takes one token of each sequence, a prefill the packed tokens of all.
        batch, tokens, e = (parse_size_expr({"var": "B"}, ""), parse_size_expr({"var": "S"}, ""),
                            parse_size_expr({"const": spec.model_dim}, ""))
        token_shape, layout = {"decode": ((batch, parse_size_expr({"const": 1}, ""), e), "BSE"),
                               "prefill": ((tokens, e), "SE")}.get(entry.entry, ((batch, tokens, e), "BSE"))
        for name, role in token_buffers[entry.entry]:
            found = names.get(name)
            if found is None:
                raise ManifestError(f"the {entry.entry} pass needs a buffer `{name}`")
            if (found.role, found.dtype, found.shape, found.layout) != (
                    role, spec.dtype, token_shape, layout):
                raise ManifestError(
                    f"buffer `{name}` must be {role} {spec.dtype} {format_shape(token_shape)} in "
                    f"layout {layout}, got {found.role} {found.dtype} {format_shape(found.shape)} in "
                    f"layout {found.layout}")
    if entry.entry == "backward":
        for weight in manifest.weights:
            found = names.get("grad." + weight.name)
            if found is None or (found.role, found.dtype, _constant_shape(found.shape)) != (
                    "output", "f32", tuple(weight.shape)):
                raise ManifestError(f"the backward pass needs an f32 output `grad.{weight.name}` "
                                    f"of shape {list(weight.shape)}")
    if not entry.kernels:
        raise ManifestError("no kernels")
    for kernel in entry.kernels:
        problem = _kernel_problem(kernel, names)
        if problem:
            raise ManifestError(f"kernel `{kernel.symbol}`: {problem}")


def _constant_shape(shape):
    """The shape's extents when none depends on B or S, else None."""
    try:
        return tuple(dim.eval({}) for dim in shape)
    except Unbound:
        return None


def _buffer_problem(buffer, manifest):
    if not buffer.name:
        return "empty name"
    if not buffer.shape:
        return "shape has no dimensions"
    if not buffer.layout:
        return "empty layout"
    if buffer.role == "weight":
        weight = next((w for w in manifest.weights if w.name == buffer.name), None)
        if weight is None:
            return "role weight, but no weight of that name in the manifest"
        declared = tuple(d.eval({}) if d.op == "const" else None for d in buffer.shape)
        if declared != weight.shape or buffer.dtype != weight.dtype:
            return (f"must match weight {weight.dtype} {list(weight.shape)}, got {buffer.dtype} "
                    f"{format_shape(buffer.shape)}")
    return None


def _viewed_as(buffer, view):
    """`buffer` seen as `view` (a tensor map's), laid out as its rank says; a message where the
    view does not hold as many elements at every size. The Rust manifest's rule."""
    layout = {4: "BSHD", 3: "BSC", 2: "row_major"}.get(len(view))
    if layout is None:
        return f"a view {format_shape(view)} of rank 2 to 4"

    def elements(shape, env):
        count = 1
        for dim in shape:
            count *= dim.eval(env)
        return count
    for batch, seq_len in ((1, 1), (3, 17), (2, 1000)):
        env = {"B": batch, "S": seq_len, "SMs": 132, "pages": 7, "blocks": 5}
        if elements(buffer.shape, env) != elements(view, env):
            return (f"a view {format_shape(view)} of the buffer's {format_shape(buffer.shape)} does not "
                    "hold as many elements")
    return dataclasses.replace(buffer, shape=tuple(view), layout=layout)


def _tensor_map_problem(buffer, box_rows):
    """What keeps `buffer` from being read through a tensor map (see ccc.tensor_map), if anything."""
    rank = {"BSHD": 4, "BSE": 3, "BSC": 3, "row_major": 2}.get(buffer.layout)
    if rank != len(buffer.shape):
        return (f"needs a [B, S, H, D], [B, S, C] or row-major [R, C] buffer, got {buffer.layout} "
                f"{format_shape(buffer.shape)}")
    if buffer.dtype not in ("bf16", "f16"):
        return f"needs bf16 or f16, got {buffer.dtype}"
    alignment = 16 // TENSOR_DTYPES[buffer.dtype]
    innermost = buffer.shape[-1]
    if innermost.op != "const" or innermost.eval({}) == 0 or innermost.eval({}) % alignment:
        return f"the innermost dimension {innermost} is not a constant multiple of {alignment}"
    if not 1 <= box_rows <= MAX_TENSOR_MAP_BOX_ROWS:
        return f"a box of {box_rows} rows (1 to {MAX_TENSOR_MAP_BOX_ROWS})"
    return None


def _kernel_problem(kernel, buffers):
    if not PTX_IDENTIFIER.match(kernel.symbol):
        return "the symbol is not a PTX identifier"
    for index, (kind, value) in enumerate(kernel.params):
        if kind == "buffer" and value not in buffers:
            return f"parameter {index} names a missing buffer `{value}`"
        if kind == "tensor_map":
            name, box_rows, view = value
            if name not in buffers:
                return f"parameter {index} maps a missing buffer `{name}`"
            target = buffers[name]
            if view is not None:
                target = _viewed_as(target, view)
                if isinstance(target, str):
                    return f"parameter {index}: tensor map of `{name}`: {target}"
            problem = _tensor_map_problem(target, box_rows)
            if problem:
                return f"parameter {index}: tensor map of `{name}`: {problem}"
    if 0 in kernel.block:
        return f"block {list(kernel.block)} has a zero dimension"
    threads = kernel.block[0] * kernel.block[1] * kernel.block[2]
    if threads > MAX_THREADS_PER_BLOCK:
        return f"block {list(kernel.block)} exceeds {MAX_THREADS_PER_BLOCK} threads"
    if kernel.dynamic_shared_bytes > MAX_DYNAMIC_SHARED_BYTES:
        return (f"dynamic shared memory {kernel.dynamic_shared_bytes} bytes exceeds the "
                f"{MAX_DYNAMIC_SHARED_BYTES}-byte limit")
    return None


def read_library(directory):
    """Reads and validates `directory/manifest.json`; returns (manifest, path of the module to
    load: the cubin where the library carries one, which the driver loads without compiling,
    else the PTX). Needs no GPU."""
    path = os.path.join(directory, MANIFEST_FILE)
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as error:
        raise ManifestError(f"{path}: {error.strerror or error}") from None
    try:
        manifest = parse_manifest(text)
    except ManifestError as error:
        raise ManifestError(f"{path}: {error}") from None
    for kind, file in (("PTX", manifest.ptx_file), ("cubin", manifest.cubin_file)):
        if file is not None and not os.path.isfile(os.path.join(directory, file)):
            raise ManifestError(f"{os.path.join(directory, file)}: the {kind} file the manifest names "
                                "does not exist")
    return manifest, os.path.join(directory, manifest.cubin_file or manifest.ptx_file)


# --- Planning one call -------------------------------------------------------------------------

@dataclass(frozen=True)
class PlannedBuffer:
    name: str
    role: str
    dtype: str
    shape: tuple  # of int
    bytes: int
    layout: str


@dataclass(frozen=True)
class PlannedLaunch:
    symbol: str
    grid: tuple
    block: tuple
    dynamic_shared_bytes: int
    # ("buffer", index into CallPlan.buffers), ("size", u32 value) or
    # ("tensor_map", (index into CallPlan.buffers, box rows, view shape or None))
    args: tuple


@dataclass(frozen=True)
class CallPlan:
    entry: str
    batch: int
    seq_len: int
    sms: object  # the GPU's SM count, or None when planned without one
    buffers: tuple
    launches: tuple

    def buffer(self, name):
        return next((b for b in self.buffers if b.name == name), None)


def _entry_of(manifest, entry):
    found = manifest.entry_point(entry)
    if found is None:
        raise ManifestError(f"the library has no `{entry}` entry point: compile its spec with "
                            f"`{entry}` in `emit`")
    return found


def plan_call(manifest, entry, batch, seq_len, sms, pages=None, blocks=None):
    """Concrete shapes, byte counts, grids and kernel arguments of one call of `entry` on a GPU of
    `sms` SMs (None: no GPU, which libraries with a persistent grid refuse); a decode step's
    `pages` (its KV pool) and `blocks` (its block table's width)."""
    entry_manifest = _entry_of(manifest, entry)
    if batch <= 0 or seq_len <= 0:
        raise SizeError(f"batch ({batch}) and sequence length ({seq_len}) must be positive")
    env = {"B": batch, "S": seq_len, "SMs": sms, "pages": pages, "blocks": blocks}

    def too_big(what):
        return SizeError(f"{what} overflows for B = {batch}, S = {seq_len}")

    def evaluate(expr, what):
        try:
            return expr.eval(env)
        except Unbound as unbound:
            raise SizeError(f"{what} {unbound}") from None

    buffers = []
    for buffer in entry_manifest.buffers:
        shape = tuple(evaluate(d, f"the shape of `{buffer.name}`") for d in buffer.shape)
        if None in shape:
            raise too_big(f"the shape of `{buffer.name}`")
        size = TENSOR_DTYPES[buffer.dtype]
        for dim in shape:
            size *= dim
        if size > U64_MAX:
            raise too_big(f"the size of `{buffer.name}`")
        buffers.append(PlannedBuffer(buffer.name, buffer.role, buffer.dtype, shape, size,
                                     buffer.layout))
    index_of = {b.name: i for i, b in enumerate(buffers)}
    launches = []
    for kernel in entry_manifest.kernels:
        grid = []
        for axis, (expr, limit) in enumerate(zip(kernel.grid, MAX_GRID)):
            blocks = evaluate(expr, f"kernel `{kernel.symbol}`: grid dimension {axis} = {expr}")
            if blocks is None:
                raise too_big(f"the grid of `{kernel.symbol}`")
            if not 1 <= blocks <= limit:
                raise SizeError(
                    f"kernel `{kernel.symbol}`: grid dimension {axis} = {expr} = {blocks} for "
                    f"B = {batch}, S = {seq_len} is outside 1..={limit}")
            grid.append(blocks)
        args = []
        for index, (kind, value) in enumerate(kernel.params):
            if kind == "buffer":
                args.append(("buffer", index_of[value]))
            elif kind == "tensor_map":
                name, box_rows, view = value
                if view is not None:
                    view = tuple(evaluate(d, f"kernel `{kernel.symbol}`: the view of `{name}`") for d in view)
                args.append(("tensor_map", (index_of[name], box_rows, view)))
            elif env[value] is None:
                raise SizeError(f"kernel `{kernel.symbol}`: parameter {index} {Unbound(value)}")
            elif env[value] > U32_MAX:
                raise too_big(f"{value} as a 32-bit kernel argument")
            else:
                args.append(("size", env[value]))
        launches.append(PlannedLaunch(kernel.symbol, tuple(grid), kernel.block,
                                      kernel.dynamic_shared_bytes, tuple(args)))
    return CallPlan(entry, batch, seq_len, sms, tuple(buffers), tuple(launches))


def describe(dtype, shape):
    return f"{dtype} {format_shape(shape)}"


def plan_for_input(manifest, entry, input_name, dtype, shape, sms):
    """Plans a call whose B and S are read off the caller's `input_name` tensor, after checking its
    dtype and shape against the manifest (`tensor `x`: expected bf16 [B, S, 2048], got ...`), on a
    GPU of `sms` SMs (None: no GPU)."""
    entry_manifest = _entry_of(manifest, entry)
    declared = entry_manifest.buffer(input_name)
    if declared is None or declared.role != "input":
        raise ManifestError(f"the `{entry}` entry point has no input `{input_name}`")
    shape = tuple(shape)
    mismatch = TensorMismatch([f"tensor `{input_name}`: expected "
                               f"{describe(declared.dtype, declared.shape)}, got "
                               f"{describe(dtype, shape)}"])
    if dtype != declared.dtype or len(shape) != len(declared.shape):
        raise mismatch
    sizes = {}
    for expr, dim in zip(declared.shape, shape):
        if expr.op == "var":
            if sizes.setdefault(expr.args[0], dim) != dim:
                raise mismatch
    if "B" not in sizes or "S" not in sizes:
        raise mismatch
    plan = plan_call(manifest, entry, sizes["B"], sizes["S"], sms)
    if plan.buffer(input_name).shape != shape:
        raise mismatch
    return plan


def plan_for_supplied(manifest, entry, supplied, sms):
    """Plans a call whose sizes come from the caller's tensors, `supplied` a dict name ->
    (dtype, shape): each must be a buffer the caller supplies to `entry` (an input or state) of its
    dtype and rank, and of the shape the sizes read off all of them give (a decode step's B from
    x, `pages` from its KV pages, `blocks` from its block table); S is 1 when no buffer has it.
    The rules of the Rust runtime's `CallPlan::for_supplied`."""
    entry_manifest = _entry_of(manifest, entry)
    sizes, mentions_s, declared = {}, False, {}
    for name, (dtype, shape) in supplied.items():
        buffer = entry_manifest.buffer(name)
        if buffer is None or buffer.role not in ("input", "state"):
            raise ManifestError(f"the `{entry}` entry point takes no tensor `{name}`")
        shape = tuple(shape)
        if dtype != buffer.dtype or len(shape) != len(buffer.shape):
            raise TensorMismatch([f"tensor `{name}`: expected {describe(buffer.dtype, buffer.shape)}, "
                                  f"got {describe(dtype, shape)}"])
        declared[name] = (buffer, shape)
        mentions_s |= any(dim.uses("S") for dim in buffer.shape)
        for expr, dim in zip(buffer.shape, shape):
            if expr.op == "var" and sizes.setdefault(expr.args[0], dim) != dim:
                raise SizeError("the shapes of " + ", ".join(f"`{n}`" for n in supplied)
                                + " do not agree on the sizes: " + ", ".join(
                                    f"{n} {list(s)} as {format_shape(b.shape)}" for n, (b, s) in declared.items()))
    if "B" not in sizes:
        raise SizeError("the tensors given (" + ", ".join(f"`{n}`" for n in supplied) + ") do not determine B")
    if "S" not in sizes and mentions_s:
        raise SizeError("the tensors given (" + ", ".join(f"`{n}`" for n in supplied) + ") do not determine S")
    plan = plan_call(manifest, entry, sizes["B"], sizes.get("S", 1), sms, sizes.get("pages"), sizes.get("blocks"))
    for name, (buffer, shape) in declared.items():
        if plan.buffer(name).shape != shape:
            raise TensorMismatch([f"tensor `{name}`: expected {describe(buffer.dtype, plan.buffer(name).shape)}, "
                                  f"got {describe(supplied[name][0], shape)}"])
    return plan


def check_decode_indices(manifest, block_table, seq_lens, pages, packed=None):
    """A decode step's or a prefill's indices on the host (lists: block_table [B][blocks],
    seq_lens [B]; for a prefill `packed` = (cu_seqlens [B + 1], tokens of x)): cu_seqlens starts
    at 0, never decreases and ends at the tokens, no sequence takes more new tokens than its
    length, every length fits its row of the block table, and every entry the call touches (the
    pages holding a key a new token sees: under a sliding window, not those wholly before the
    first new token's) names a page of the pool; a sequence without new tokens touches nothing.
    Raises SizeError naming the tensor and the index. The Rust runtime's rule."""
    cache = _entry_of(manifest, "decode").buffer("k_cache")
    if cache is None:
        raise ManifestError("the decode entry point has no k_cache of constant page size")
    page_size = cache.shape[1].eval({})
    batch = len(seq_lens)
    if packed is not None:
        cu_seqlens, tokens = packed
        if len(cu_seqlens) != batch + 1:
            raise SizeError(f"cu_seqlens has {len(cu_seqlens)} entries, expected {batch + 1} (one more than "
                            f"the {batch} sequences)")
        if cu_seqlens[0] != 0:
            raise SizeError(f"cu_seqlens[0] = {cu_seqlens[0]}, expected 0")
        for b in range(1, batch + 1):
            if cu_seqlens[b] < cu_seqlens[b - 1]:
                raise SizeError(f"cu_seqlens[{b}] = {cu_seqlens[b]} is below cu_seqlens[{b - 1}] = {cu_seqlens[b - 1]}")
        if cu_seqlens[batch] != tokens:
            raise SizeError(f"cu_seqlens[{batch}] = {cu_seqlens[batch]}, expected the {tokens} tokens of x")
    for b, (length, row) in enumerate(zip(seq_lens, block_table)):
        if not 0 <= length <= len(row) * page_size:
            raise SizeError(f"seq_lens[{b}] = {length}: a length from 0 to the block table's {len(row)} "
                            f"pages of {page_size} tokens")
        new = packed[0][b + 1] - packed[0][b] if packed is not None else int(length > 0)
        if new > length:
            raise SizeError(f"seq_lens[{b}] = {length}: fewer than the sequence's {new} new tokens "
                            f"(cu_seqlens[{b + 1}] − cu_seqlens[{b}])")
        if new == 0:
            continue
        mask = manifest.spec.mask
        first_key = max(0, length - new + 1 - mask.window) if mask.kind == "sliding_window" else 0
        for j in range(first_key // page_size, -(-length // page_size)):
            if not 0 <= row[j] < pages:
                raise SizeError(f"block_table[{b}, {j}] = {row[j]}: sequence {b} (length {length}) reads "
                                f"it, and the pool has pages 0..{pages}")


# --- Checking the caller's tensors -------------------------------------------------------------

TensorInfo = namedtuple("TensorInfo", "dtype shape device contiguous address", defaults=(0,))
TensorInfo.__doc__ = ("What the checks need to know of a caller's tensor: dtype name (bf16, f16, "
                      "f32, or another name for anything else), shape, device (`cuda:0`, `cpu`), "
                      "whether it is dense row-major, and the address of its first element.")

# Kernels read and write caller tensors in 16-byte vectors (cp.async chunks, vector loads of
# element-wise maps): each must start on such a boundary. torch's allocations do; a view at an
# odd offset into another tensor may not.
TENSOR_ALIGNMENT = 16


def off_gpu_problem(name, device):
    """What is wrong with tensor `name` on `device` when that is not a CUDA device, else None."""
    if str(device).startswith("cuda"):
        return None
    return f"tensor `{name}` is on {device}: the kernels need CUDA tensors"


def check_supplied(manifest, plan, supplied):
    """Checks every caller-supplied buffer of `plan` (x and the weights) against `supplied`, a dict
    name -> TensorInfo, and that `supplied` holds nothing else. All tensors must be dense and on
    x's CUDA device. Raises TensorMismatch listing every problem."""
    problems = []
    inputs = [b for b in plan.buffers if b.role in ("input", "state")]
    device = supplied[inputs[0].name].device if inputs and inputs[0].name in supplied else None
    off_gpu = off_gpu_problem(inputs[0].name, device) if device is not None else None
    if off_gpu:
        problems.append(off_gpu)
        device = None
    expected = [(b.name, b.dtype, b.shape, "tensor") for b in inputs]
    expected += [(w.name, w.dtype, w.shape, "weight") for w in manifest.weights]
    for name, dtype, shape, kind in expected:
        info = supplied.get(name)
        if info is None:
            problems.append(f"missing {kind} `{name}` ({describe(dtype, shape)})")
            continue
        if info.dtype != dtype or tuple(info.shape) != tuple(shape):
            problems.append(f"tensor `{name}`: expected {describe(dtype, shape)}, got "
                            f"{describe(info.dtype, tuple(info.shape))}")
        if device is not None and str(info.device) != str(device):
            problems.append(f"tensor `{name}` is on {info.device}, expected {device} "
                            f"(where `{inputs[0].name}` is)")
        if not info.contiguous:
            problems.append(f"tensor `{name}` is not contiguous: the kernels read dense "
                            f"row-major memory (pass `.contiguous()`)")
        elif info.address % TENSOR_ALIGNMENT:
            problems.append(f"tensor `{name}` starts at {info.address:#x}, not on a "
                            f"{TENSOR_ALIGNMENT}-byte boundary: the kernels read it in "
                            f"{TENSOR_ALIGNMENT}-byte vectors (pass `.clone()`)")
    known = {name for name, _, _, _ in expected}
    extra = sorted(name for name in supplied if name not in known)
    if extra:
        problems.append("unexpected weight" + ("s " if len(extra) > 1 else " ")
                        + ", ".join(f"`{n}`" for n in extra) + " (the library's weights are "
                        + ", ".join(w.name for w in manifest.weights) + ")")
    if problems:
        raise TensorMismatch(problems)


def target_capability(target):
    """The compute capability a PTX target such as `sm_90a` needs: (major, minor, exact), exact
    for arch-specific targets (the `a` suffix), whose features only that capability has; None for
    a string that is not such a target."""
    match = re.fullmatch(r"sm_(\d+)(\d)(a?)", target)
    if not match:
        return None
    return int(match.group(1)), int(match.group(2)), match.group(3) == "a"


def check_device(target, capability, device_name):
    """Raises UnsupportedDevice unless a GPU of compute capability (major, minor) runs PTX for
    `target`: that capability for arch-specific targets, it or a later one otherwise."""
    needed = target_capability(target)
    if needed is not None:
        major, minor, exact = needed
        if (tuple(capability) == (major, minor)) if exact else (tuple(capability) >= (major, minor)):
            return
        need = f"compute capability exactly {major}.{minor}" if exact else f"compute capability {major}.{minor} or later"
    else:
        need = "a CUDA architecture such as sm_90a as its target"
    raise UnsupportedDevice(
        f"the library was compiled for {target}, which {device_name} (compute capability "
        f"{capability[0]}.{capability[1]}) cannot run; it needs {need}")
