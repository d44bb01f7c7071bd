"""The pure-Python parts of the loader: size expressions, the spec's parameter list, manifest
parsing and validation, call planning and the checks of the caller's tensors. Stdlib only:
`python3 -m unittest discover -s tests/python` (scripts/test.sh runs it)."""

import copy
import json
import os
import sys
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))

from ccc.errors import ManifestError, SizeError, TensorMismatch  # noqa: E402
from ccc.flops import core_flops, layer_flops  # noqa: E402
from ccc.manifest import (check_decode_indices, plan_for_supplied, TensorInfo, check_supplied, parse_manifest, plan_call,  # noqa: E402
                          plan_for_input, read_library)
from ccc.sizes import Unbound, parse_size_expr  # noqa: E402
from ccc.spec import parse_spec  # noqa: E402
from ccc.tensor_map import geometry  # noqa: E402

FIXTURES = os.path.join(HERE, "fixtures")
# The runtime's test library (runtime/tests/common/mod.rs) as `Manifest::to_json` writes it.
FIXTURE_LIBRARY = os.path.join(FIXTURES, "fixture")


def fixture_json():
    with open(os.path.join(FIXTURE_LIBRARY, "manifest.json")) as file:
        return json.load(file)


def load_spec_json(name):
    with open(os.path.join(FIXTURES, f"{name}_spec.json")) as file:
        return json.load(file)


def B():
    return {"var": "B"}


def S():
    return {"var": "S"}


def c(value):
    return {"const": value}


def mul(a, b):
    return {"mul": [a, b]}


def zaya1_manifest_json():
    """ZAYA1's forward library as the kernel plan lays it out (tests/snapshots/ir_plan__plan_zaya1
    .snap): three kernels, q/k/v/o intermediates with merged head dimensions, lse scratch."""
    spec_json = load_spec_json("zaya1")
    spec = parse_spec(spec_json)
    weights = [{"name": p.name, "shape": list(p.shape), "dtype": "bf16"} for p in spec.params()]

    def buffer(name, role, shape, layout, dtype="bf16"):
        return {"name": name, "role": role, "dtype": dtype, "shape": shape, "layout": layout}

    def kernel(symbol, buffers, grid, shared=0):
        params = [{"kind": "buffer", "name": n} for n in buffers]
        params += [{"kind": "size", "var": "B"}, {"kind": "size", "var": "S"}]
        return {"symbol": symbol, "params": params, "grid": grid, "block": [256, 1, 1],
                "dynamic_shared_bytes": shared, "ptxas": None}

    prologue_weights = [w["name"] for w in weights
                        if "conv" in w["name"] or w["name"] == "qk_norm.temp"]
    projection_weights = [w["name"] for w in weights
                          if w["name"] != "o_proj.weight" and w["name"] not in prologue_weights]
    buffers = [
        buffer("x", "input", [B(), S(), c(2048)], "BSE"),
        buffer("out", "output", [B(), S(), c(2048)], "BSE"),
        buffer("p0", "intermediate", [B(), S(), c(1280)], "BSC"),
        buffer("q", "intermediate", [B(), S(), c(1024)], "BSHD"),
        buffer("k", "intermediate", [B(), S(), c(256)], "BSHD"),
        buffer("v", "intermediate", [B(), S(), c(256)], "BSHD"),
        buffer("o", "intermediate", [B(), S(), c(1024)], "BSHD"),
        buffer("lse", "scratch", [B(), c(8), S()], "BHS", dtype="f32"),
    ] + [buffer(w["name"], "weight", [c(d) for d in w["shape"]], "row_major") for w in weights]
    kernels = [
        kernel("zaya1_qkv_proj", ["x"] + projection_weights + ["p0", "v"],
               [c(24), {"ceil_div": [S(), 64]}, B()]),
        kernel("zaya1_qk_prologue", ["p0"] + prologue_weights + ["q", "k"],
               [{"ceil_div": [S(), 62]}, B(), c(2)], shared=148_544),
        kernel("zaya1_attention", ["q", "k", "v", "o", "lse"],
               [{"ceil_div": [S(), 128]}, c(8), B()], shared=98_304),
        kernel("zaya1_out_proj", ["o", "o_proj.weight", "out"],
               [c(32), {"ceil_div": [S(), 64]}, B()]),
    ]
    return {"schema_version": 6, "compiler_version": "test", "spec": spec_json,
            "target": "sm_90a", "ptx_file": "zaya1.ptx",
            "entry_points": [{"entry": "forward", "kernels": kernels, "buffers": buffers}],
            "weights": weights}


def tensor_map(buffer, box_rows):
    return {"kind": "tensor_map", "buffer": buffer, "box_rows": box_rows}


def parse(value):
    return parse_manifest(json.dumps(value))


class SizeExpressions(unittest.TestCase):
    def test_grid_expression_prints_and_evaluates(self):
        tiles = parse_size_expr(mul(mul({"ceil_div": [S(), 64]}, B()), c(8)), "grid")
        self.assertEqual(str(tiles), "ceil(S/64)*B*8")
        self.assertEqual(tiles.eval({"B": 3, "S": 4097}), 65 * 3 * 8)
        self.assertTrue(tiles.uses("B") and tiles.uses("S"))

    def test_precedence_matches_the_rust_printer(self):
        expr = parse_size_expr(mul({"add": [B(), c(1)]}, S()), "shape")
        self.assertEqual(str(expr), "(B + 1)*S")
        self.assertEqual(expr.eval({"B": 2, "S": 5}), 15)

    def test_the_sm_count_is_a_variable_an_environment_may_lack(self):
        grid = parse_size_expr(mul({"var": "SMs"}, c(2)), "grid")
        self.assertEqual(str(grid), "SMs*2")
        self.assertEqual(grid.eval({"B": 1, "S": 1, "SMs": 7}), 14)
        for env in ({"B": 1, "S": 1, "SMs": None}, {"B": 1, "S": 1}):
            with self.assertRaises(Unbound) as raised:
                grid.eval(env)
            self.assertEqual(str(raised.exception),
                             "needs SMs, the device's SM count, which is not given")

    def test_overflow_is_none(self):
        big = parse_size_expr(mul(B(), S()), "shape")
        self.assertIsNone(big.eval({"B": 2**64 - 1, "S": 2}))
        self.assertEqual(big.eval({"B": 2**32, "S": 2**31}), 2**63)

    def test_malformed_trees_are_rejected_with_the_field(self):
        cases = [
            ({"var": "T"}, "unknown size variable 'T'"),
            ({"ceil_div": [S(), 0]}, "divisor must be a positive integer"),
            ({"pow": [S(), 2]}, "unknown size expression 'pow'"),
            ({"const": -1}, "const must be an unsigned integer"),
            ({"const": True}, "const must be an unsigned integer"),
            ({"add": [S()]}, "add takes a list of two items"),
            ({"const": 1, "var": "B"}, "one key"),
        ]
        for value, message in cases:
            with self.subTest(value=value):
                with self.assertRaises(ManifestError) as raised:
                    parse_size_expr(value, "buffer `q`.shape[0]")
                self.assertIn(message, str(raised.exception))
                self.assertIn("buffer `q`.shape[0]", str(raised.exception))


class SpecParameters(unittest.TestCase):
    def test_zaya1_parameters_are_zaya_attention_names(self):
        spec = parse_spec(load_spec_json("zaya1"))
        names = [p.name for p in spec.params()]
        self.assertEqual(names, [
            "qkv_proj.q_proj.weight", "qkv_proj.k_proj.weight",
            "qkv_proj.v_proj_current.weight", "qkv_proj.v_proj_delayed.weight",
            "qkv_proj.conv_qk_depthwise.weight", "qkv_proj.conv_qk_depthwise.bias",
            "qkv_proj.conv_qk_grouped.weight", "qkv_proj.conv_qk_grouped.bias",
            "qk_norm.temp", "o_proj.weight"])
        # The count src/spec.rs checks against the paper's arithmetic.
        total = sum(_product(p.shape) for p in spec.params())
        self.assertEqual(total, 5_575_682)
        self.assertEqual(spec.conv_history, 2)
        self.assertEqual(spec.packed_width, 1280)
        self.assertEqual(spec.params()[6].shape, (1280, 128, 2))

    def test_plain_specs_use_llama_names(self):
        spec_json = load_spec_json("zaya1")
        spec_json.update(qk_conv=[], qk_mean=False, value_shift=0, qk_norm="none",
                         key_temperature="none", bias=True)
        names = [p.name for p in parse_spec(spec_json).params()]
        self.assertEqual(names, ["q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias",
                                 "v_proj.weight", "v_proj.bias", "o_proj.weight", "o_proj.bias"])

    def test_cca4x_shifts_half_the_value_heads(self):
        spec = parse_spec(load_spec_json("cca4x"))
        shapes = {p.name: p.shape for p in spec.params()}
        self.assertEqual(shapes["qkv_proj.v_proj_current.weight"], (256, 2048))
        self.assertEqual(shapes["qkv_proj.v_proj_delayed.weight"], (256, 2048))
        self.assertEqual(shapes["qk_norm.temp"], (4,))

    def test_sliding_window_mask_parses(self):
        spec_json = load_spec_json("zaya1")
        spec_json["mask"] = {"sliding_window": {"window": 4096}}
        mask = parse_spec(spec_json).mask
        self.assertEqual((mask.kind, mask.window, str(mask)),
                         ("sliding_window", 4096, "sliding_window(4096)"))

    def test_deterministic_is_read_and_absent_means_false(self):
        spec_json = load_spec_json("zaya1")
        self.assertFalse(parse_spec(spec_json).deterministic)
        spec_json["deterministic"] = True
        self.assertTrue(parse_spec(spec_json).deterministic)
        # Manifests written before the key existed.
        del spec_json["deterministic"]
        self.assertFalse(parse_spec(spec_json).deterministic)
        spec_json["deterministic"] = "yes"
        with self.assertRaisesRegex(ManifestError, "deterministic"):
            parse_spec(spec_json)

    def test_invalid_spec_names_the_rule(self):
        spec_json = load_spec_json("zaya1")
        spec_json["value_shift"] = 3
        with self.assertRaisesRegex(ManifestError, "value_shift 3 exceeds kv_heads 2"):
            parse_spec(spec_json)
        spec_json = load_spec_json("zaya1")
        spec_json["qk_norm"] = "l1"
        with self.assertRaisesRegex(ManifestError, "spec.qk_norm: unknown variant 'l1'"):
            parse_spec(spec_json)


def _product(shape):
    result = 1
    for dim in shape:
        result *= dim
    return result


class ManifestValidation(unittest.TestCase):
    def test_the_runtime_fixture_parses(self):
        manifest = parse(fixture_json())
        self.assertEqual(manifest.spec.name, "fixture")
        forward = manifest.entry_point("forward")
        self.assertEqual([k.symbol for k in forward.kernels],
                         ["fixture_double", "fixture_add_diagonal"])
        self.assertEqual(forward.kernels[1].dynamic_shared_bytes, 65536)
        self.assertEqual(str(forward.kernels[0].grid[0]), "ceil(B*S*8/64)")

    def test_a_zaya1_library_parses(self):
        manifest = parse(zaya1_manifest_json())
        self.assertEqual(len(manifest.weights), 10)
        self.assertEqual(manifest.weights[8].name, "qk_norm.temp")

    def test_a_decode_step_reads_its_sizes_off_the_callers_tensors(self):
        with open(os.path.join(FIXTURES, "zaya1_serve_manifest.json")) as file:
            manifest = parse(json.load(file))
        decode = manifest.entry_point("decode")
        self.assertEqual(sorted(b.name for b in decode.buffers if b.role == "state"),
                         ["conv_state", "k_cache", "shift_state", "v_cache"])

        def supplied(batch=4, page_rows=16, table_rows=4):
            return {"x": ("bf16", (batch, 1, 2048)), "block_table": ("i32", (table_rows, 10)),
                    "seq_lens": ("i32", (batch,)), "k_cache": ("bf16", (50, page_rows, 2, 128)),
                    "v_cache": ("bf16", (50, page_rows, 2, 128)), "conv_state": ("bf16", (batch, 1280, 2)),
                    "shift_state": ("bf16", (batch, 128))}

        plan = plan_for_supplied(manifest, "decode", supplied(), 132)
        self.assertEqual(plan.buffer("o_part").shape, (4, 1, 8, 128))
        self.assertEqual(plan.buffer("out").shape, (4, 1, 2048))
        with self.assertRaises(TensorMismatch) as raised:
            plan_for_supplied(manifest, "decode", supplied(page_rows=8), 132)
        self.assertIn("tensor `k_cache`: expected bf16 [50, 16, 2, 128], got bf16 [50, 8, 2, 128]",
                      str(raised.exception))
        with self.assertRaises(SizeError) as raised:
            plan_for_supplied(manifest, "decode", supplied(table_rows=3), 132)
        self.assertIn("block_table [3, 10] as [B, blocks]", str(raised.exception))
        with self.assertRaises(ManifestError):
            plan_for_supplied(manifest, "decode", {"dout": ("bf16", (4, 1, 2048))}, 132)
        # Indices: as the Rust runtime's host check (runtime/tests/host_checks.rs).
        table = [[4, 7, -1], [0, 1, 2]]
        check_decode_indices(manifest, table, [20, 48], 8)
        for lens, rows, message in [([33, 48], table, "block_table[0, 2] = -1: sequence 0 (length 33) reads it"),
                                    ([20, 48], [[4, 9, -1], [0, 1, 2]], "block_table[0, 1] = 9"),
                                    ([20, 49], table, "seq_lens[1] = 49: a length from 0 to the block table's 3")]:
            with self.assertRaises(SizeError) as raised:
                check_decode_indices(manifest, rows, lens, 8)
            self.assertIn(message, str(raised.exception))
        # A prefill's cu_seqlens, as the Rust runtime checks them.
        check_decode_indices(manifest, table, [20, 48], 8, packed=([0, 20, 30], 30))
        check_decode_indices(manifest, table, [33, 48], 8, packed=([0, 0, 30], 30))
        for cu, lens, tokens, message in [([0, 20], [20, 48], 20, "cu_seqlens has 2 entries, expected 3"),
                                          ([1, 20, 30], [20, 48], 30, "cu_seqlens[0] = 1, expected 0"),
                                          ([0, 20, 10], [20, 48], 10, "cu_seqlens[2] = 10 is below cu_seqlens[1] = 20"),
                                          ([0, 20, 30], [20, 48], 31, "cu_seqlens[2] = 30, expected the 31 tokens of x"),
                                          ([0, 21, 30], [20, 48], 30, "seq_lens[0] = 20: fewer than the sequence's 21 new")]:
            with self.assertRaises(SizeError) as raised:
                check_decode_indices(manifest, table, lens, 8, packed=(cu, tokens))
            self.assertIn(message, str(raised.exception))
        with self.assertRaises(SizeError) as raised:
            plan_for_supplied(manifest, "decode", {"k_cache": ("bf16", (50, 16, 2, 128))}, 132)
        self.assertIn("the tensors given (`k_cache`) do not determine B", str(raised.exception))

    def test_a_training_library_saves_what_its_backward_reads(self):
        with open(os.path.join(FIXTURES, "zaya1_train_manifest.json")) as file:
            value = json.load(file)
        manifest = parse(value)
        forward, backward = manifest.entry_point("forward"), manifest.entry_point("backward")
        saved = [b.name for b in forward.buffers if b.role == "saved"]
        self.assertEqual(saved, ["p0", "v", "q", "k", "o", "lse"])
        self.assertTrue(all(backward.buffer(name).role == "input" for name in saved))
        plan = plan_for_input(manifest, "backward", "dout", "bf16", (3, 17, 2048), 132)
        self.assertEqual(plan.buffer("dx").shape, (3, 17, 2048))
        self.assertEqual(plan.buffer("grad.o_proj.weight").shape, (2048, 1024))
        self.assertEqual(plan.buffer("grad.o_proj.weight").dtype, "f32")
        supplied = {b.name: TensorInfo(b.dtype, b.shape, "cuda:0", True)
                    for b in plan.buffers if b.role == "input"}
        supplied.update((w.name, TensorInfo(w.dtype, w.shape, "cuda:0", True)) for w in manifest.weights)
        check_supplied(manifest, plan, supplied)
        del supplied["q"]
        with self.assertRaises(TensorMismatch) as raised:
            check_supplied(manifest, plan, supplied)
        self.assertIn("missing tensor `q` (bf16 [3, 17, 8, 128])", str(raised.exception))
        broken = copy.deepcopy(value)
        backward_json = broken["entry_points"][1]
        backward_json["buffers"] = [b for b in backward_json["buffers"] if b["name"] != "grad.qk_norm.temp"]
        for kernel in backward_json["kernels"]:
            kernel["params"] = [p for p in kernel["params"] if p.get("name") != "grad.qk_norm.temp"]
        with self.assertRaises(ManifestError) as raised:
            parse(broken)
        self.assertIn("the backward pass needs an f32 output `grad.qk_norm.temp` of shape [2]",
                      str(raised.exception))
        retyped = copy.deepcopy(value)
        for buffer in retyped["entry_points"][1]["buffers"]:
            if buffer["name"] == "lse":
                buffer["dtype"] = "bf16"
        with self.assertRaises(ManifestError) as raised:
            parse(retyped)
        self.assertIn("the backward reads `lse` (bf16 [B, 8, S]), which the forward does not save "
                      "as such", str(raised.exception))

    def test_schema_version_is_checked_first(self):
        self.assertRaisesRegex(ManifestError, "^unknown manifest schema version 7: this build "
                               "reads version 6$", parse_manifest, '{"schema_version": 7}')
        self.assertRaisesRegex(ManifestError, "no schema_version", parse_manifest, "{}")
        self.assertRaisesRegex(ManifestError, "not valid JSON", parse_manifest, "{")

    def broken(self, edit, message):
        value = fixture_json()
        edit(value)
        with self.assertRaises(ManifestError) as raised:
            parse(value)
        self.assertIn(message, str(raised.exception))

    def test_each_rule_names_what_is_wrong(self):
        forward = lambda m: m["entry_points"][0]  # noqa: E731
        cases = [
            (lambda m: m.update(extra=1), "unknown field `extra`"),
            (lambda m: forward(m)["kernels"][0].update(registers=3),
             "entry_points[0].kernels[0]: unknown field `registers`"),
            (lambda m: forward(m)["kernels"][0].pop("block"), "missing field `block`"),
            (lambda m: forward(m)["buffers"][2].update(role="temporary"),
             "unknown variant 'temporary'"),
            (lambda m: m.update(target="compute_90"), "target `compute_90` is not a CUDA"),
            (lambda m: m.update(ptx_file="../elsewhere.ptx"), "must be a relative path"),
            (lambda m: m.update(ptx_file="/abs.ptx"), "must be a relative path"),
            (lambda m: m["weights"].pop(), "weights must be the spec's parameters in order"),
            (lambda m: m["weights"][0].update(dtype="f16"), "expected [q_proj.weight [8, 8] bf16"),
            (lambda m: m["entry_points"].append(copy.deepcopy(forward(m))),
             "entry point `forward` is listed twice"),
            (lambda m: m.update(entry_points=[]), "the spec emits `forward` but the manifest"),
            (lambda m: forward(m)["buffers"].append(copy.deepcopy(forward(m)["buffers"][2])),
             "entry point `forward`: buffer `o` is declared twice"),
            (lambda m: forward(m)["buffers"][3]["shape"].reverse() or
             forward(m)["buffers"][3]["shape"].__setitem__(0, c(9)),
             "buffer `o_proj.weight`: must match weight bf16 [8, 8], got bf16 [9, 8]"),
            (lambda m: forward(m)["buffers"][0].update(dtype="f32"),
             "buffer `x` must be input bf16 [B, S, 8] in layout BSE, got input f32 [B, S, 8]"),
            (lambda m: forward(m)["buffers"].pop(1), "the forward pass needs a buffer `out`"),
            (lambda m: forward(m).update(kernels=[]), "no kernels"),
            (lambda m: forward(m)["kernels"][0].update(symbol="9lives"),
             "kernel `9lives`: the symbol is not a PTX identifier"),
            (lambda m: forward(m)["kernels"][1].update(symbol="fixture_double"),
             "kernel symbol `fixture_double` is used twice"),
            (lambda m: forward(m)["kernels"][0]["params"].append({"kind": "buffer", "name": "y"}),
             "parameter 4 names a missing buffer `y`"),
            (lambda m: forward(m)["kernels"][0].update(block=[64, 32, 1]),
             "block [64, 32, 1] exceeds 1024 threads"),
            (lambda m: forward(m)["kernels"][0].update(block=[64, 0, 1]), "has a zero dimension"),
            (lambda m: forward(m)["kernels"][0].update(dynamic_shared_bytes=232449),
             "dynamic shared memory 232449 bytes exceeds the 232448-byte limit"),
            (lambda m: forward(m)["kernels"][0]["params"].append({"kind": "size", "var": "T"}),
             "unknown variant 'T'"),
            (lambda m: forward(m)["kernels"][0]["params"].append(tensor_map("y", 64)),
             "parameter 4 maps a missing buffer `y`"),
            (lambda m: forward(m)["kernels"][0]["params"].append(tensor_map("o", 64)),
             "parameter 4: tensor map of `o`: the innermost dimension 4 is not a constant multiple "
             "of 8"),
            (lambda m: forward(m)["buffers"][2].update(layout="BSC") or
             forward(m)["kernels"][0]["params"].append(tensor_map("o", 64)),
             "needs a [B, S, H, D], [B, S, C] or row-major [R, C] buffer, got BSC [B, S, 2, 4]"),
            (lambda m: forward(m)["kernels"][0]["params"].append(tensor_map("o", -1)),
             "box_rows: expected uint, got -1"),
        ]
        for edit, message in cases:
            with self.subTest(message=message):
                self.broken(edit, message)

    def test_read_library_names_the_file(self):
        manifest, ptx_path = read_library(FIXTURE_LIBRARY)
        self.assertTrue(ptx_path.endswith("fixture.ptx"))
        with tempfile.TemporaryDirectory() as directory:
            with open(os.path.join(directory, "manifest.json"), "w") as file:
                json.dump(fixture_json(), file)
            with self.assertRaisesRegex(ManifestError, "fixture.ptx: the PTX file the manifest "
                                        "names does not exist"):
                read_library(directory)
            with self.assertRaisesRegex(ManifestError, "absent/manifest.json"):
                read_library(os.path.join(directory, "absent"))

    def test_a_library_with_a_cubin_loads_the_cubin(self):
        with tempfile.TemporaryDirectory() as directory:
            value = fixture_json()
            value["cubin_file"] = "fixture.cubin"
            with open(os.path.join(directory, "manifest.json"), "w") as file:
                json.dump(value, file)
            with open(os.path.join(directory, "fixture.ptx"), "w") as file:
                file.write("// ptx\n")
            with self.assertRaisesRegex(ManifestError, "fixture.cubin: the cubin file the manifest "
                                        "names does not exist"):
                read_library(directory)
            with open(os.path.join(directory, "fixture.cubin"), "wb") as file:
                file.write(b"\x7fELF")
            manifest, module_path = read_library(directory)
            self.assertEqual((manifest.cubin_file, module_path),
                             ("fixture.cubin", os.path.join(directory, "fixture.cubin")))
            value["cubin_file"] = "../fixture.cubin"
            with open(os.path.join(directory, "manifest.json"), "w") as file:
                json.dump(value, file)
            with self.assertRaisesRegex(ManifestError, "cubin_file `../fixture.cubin` must be a "
                                        "relative path inside the library directory"):
                read_library(directory)


class CallPlanning(unittest.TestCase):
    def setUp(self):
        self.fixture = parse(fixture_json())
        self.zaya1 = parse(zaya1_manifest_json())

    def test_tensor_map_arguments_name_their_buffer_and_box(self):
        value = zaya1_manifest_json()
        forward = value["entry_points"][0]
        next(b for b in forward["buffers"] if b["name"] == "q")["shape"] = [B(), S(), c(8), c(128)]
        forward["kernels"][2]["params"].append(tensor_map("q", 128))
        plan = plan_call(parse(value), "forward", 2, 1000, None)
        kind, (index, box_rows, view) = plan.launches[2].args[-1]
        self.assertEqual((kind, plan.buffers[index].name, plan.buffers[index].shape, box_rows, view),
                         ("tensor_map", "q", (2, 1000, 8, 128), 128, None))
        # A map may see its buffer under another shape of as many elements, as the Rust manifest.
        value = zaya1_manifest_json()
        forward = value["entry_points"][0]
        forward["kernels"][2]["params"].append(dict(tensor_map("x", 128), view=[c(1), S(), c(2), c(1024)]))
        with self.assertRaisesRegex(ManifestError, r"a view \[1, S, 2, 1024\] of the buffer's \[B, S, 2048\] "
                                    "does not hold as many elements"):
            parse(value)
        forward["kernels"][2]["params"][-1]["view"] = [B(), S(), c(2), c(1024)]
        plan = plan_call(parse(value), "forward", 2, 1000, None)
        self.assertEqual(plan.launches[2].args[-1][1][2], (2, 1000, 2, 1024))

    def test_tensor_map_geometry_matches_the_rust_runtime(self):
        # runtime/src/tensor_map.rs, geometry_sees_dimensions_innermost_first_with_boxes_along_the_rows
        self.assertEqual(geometry("bf16", (3, 17, 8, 128), 128),
                         ((128, 8, 17, 3), (256, 2048, 17 * 2048), (64, 1, 128, 1)))
        self.assertEqual(geometry("bf16", (2, 1000, 2048), 128),
                         ((2048, 1000, 2), (4096, 4096 * 1000), (64, 128, 1)))
        self.assertEqual(geometry("f16", (1280, 576), 128), ((576, 1280), (1152,), (64, 128)))
        self.assertRaisesRegex(ValueError, "bf16 or f16", geometry, "f32", (1, 4, 2, 64), 64)
        self.assertRaisesRegex(ValueError, "16-byte chunks", geometry, "bf16", (1, 4, 2, 12), 64)

    def test_fixture_plan_reads_b_and_s_off_x(self):
        plan = plan_for_input(self.fixture, "forward", "x", "bf16", (2, 17, 8), 132)
        self.assertEqual((plan.batch, plan.seq_len, plan.sms), (2, 17, 132))
        self.assertEqual(plan.buffer("o").shape, (2, 17, 2, 4))
        self.assertEqual(plan.buffer("o").bytes, 2 * 17 * 8 * 2)
        first, second = plan.launches
        self.assertEqual(first.grid, (5, 1, 1))  # ceil(2·17·8 / 64)
        names = [plan.buffers[v].name if k == "buffer" else v for k, v in second.args]
        self.assertEqual(names, ["o", "o_proj.weight", "out", 2, 17])
        self.assertEqual(second.dynamic_shared_bytes, 65536)

    def test_zaya1_plan_at_16k(self):
        plan = plan_call(self.zaya1, "forward", 8, 16384, None)
        grids = [launch.grid for launch in plan.launches]
        self.assertEqual(grids, [(24, 256, 8), (265, 8, 2), (128, 8, 8), (32, 256, 8)])
        # The projection GEMM's packed [q0 | k0], allocated like any other intermediate.
        self.assertEqual(plan.buffer("p0").shape, (8, 16384, 1280))
        self.assertEqual(plan.buffer("p0").bytes, 8 * 16384 * 1280 * 2)
        self.assertEqual(plan.buffer("lse").shape, (8, 8, 16384))
        self.assertEqual(plan.buffer("lse").bytes, 8 * 8 * 16384 * 4)

    def test_wrong_input_is_described_like_the_rust_runtime(self):
        cases = [("f32", (2, 17, 8)), ("bf16", (2, 17, 9)), ("bf16", (17, 8))]
        for dtype, shape in cases:
            with self.subTest(dtype=dtype, shape=shape):
                with self.assertRaises(TensorMismatch) as raised:
                    plan_for_input(self.fixture, "forward", "x", dtype, shape, None)
                self.assertEqual(str(raised.exception),
                                 f"tensor `x`: expected bf16 [B, S, 8], got {dtype} "
                                 f"[{', '.join(map(str, shape))}]")

    def test_sizes_out_of_range(self):
        self.assertRaisesRegex(SizeError, r"batch \(0\) and sequence length \(5\) must be positive",
                               plan_call, self.fixture, "forward", 0, 5, None)
        with self.assertRaises(SizeError) as raised:
            plan_call(self.fixture, "forward", 1, 2**35, None)
        self.assertIn("kernel `fixture_double`: grid dimension 0 = ceil(B*S*8/64) = 4294967296 "
                      "for B = 1, S = 34359738368 is outside 1..=2147483647",
                      str(raised.exception))
        with self.assertRaisesRegex(SizeError, "B as a 32-bit kernel argument overflows"):
            plan_call(self.fixture, "forward", 2**32, 1, None)
        self.assertRaisesRegex(ManifestError, "no `decode` entry point",
                               plan_call, self.fixture, "decode", 1, 1, None)

    def test_persistent_grids_take_the_gpus_sm_count(self):
        # The projections as they ship: one CTA per SM; out_proj also takes the count.
        value = zaya1_manifest_json()
        kernels = value["entry_points"][0]["kernels"]
        for kernel in (kernels[0], kernels[3]):
            kernel["grid"] = [{"var": "SMs"}, c(1), c(1)]
        kernels[3]["params"].append({"kind": "size", "var": "SMs"})
        manifest = parse(value)
        self.assertEqual(str(manifest.entry_points[0].kernels[0].grid[0]), "SMs")
        plan = plan_for_input(manifest, "forward", "x", "bf16", (8, 16384, 2048), 7)
        grids = [launch.grid for launch in plan.launches]
        self.assertEqual(grids, [(7, 1, 1), (265, 8, 2), (128, 8, 8), (7, 1, 1)])
        self.assertEqual(plan.launches[3].args[-1], ("size", 7))
        with self.assertRaises(SizeError) as raised:
            plan_call(manifest, "forward", 8, 16384, None)
        self.assertEqual(str(raised.exception), "kernel `zaya1_qkv_proj`: grid dimension 0 = SMs "
                         "needs SMs, the device's SM count, which is not given")
        kernels[0]["grid"] = [c(24), {"ceil_div": [S(), 64]}, B()]
        kernels[3]["grid"] = [c(32), {"ceil_div": [S(), 64]}, B()]
        with self.assertRaises(SizeError) as raised:
            plan_call(parse(value), "forward", 8, 16384, None)
        self.assertEqual(str(raised.exception), "kernel `zaya1_out_proj`: parameter 5 needs SMs, "
                         "the device's SM count, which is not given")


def info(dtype, shape, device="cuda:0", contiguous=True, address=0x7f0000000000):
    return TensorInfo(dtype, tuple(shape), device, contiguous, address)


class SuppliedTensors(unittest.TestCase):
    def setUp(self):
        self.manifest = parse(zaya1_manifest_json())
        self.plan = plan_for_input(self.manifest, "forward", "x", "bf16", (1, 64, 2048), None)
        self.supplied = {"x": info("bf16", (1, 64, 2048))}
        self.supplied.update((w.name, info("bf16", w.shape)) for w in self.manifest.weights)

    def problems(self):
        with self.assertRaises(TensorMismatch) as raised:
            check_supplied(self.manifest, self.plan, self.supplied)
        return raised.exception.problems

    def test_matching_tensors_pass(self):
        check_supplied(self.manifest, self.plan, self.supplied)

    def test_every_problem_is_listed(self):
        del self.supplied["qk_norm.temp"]
        self.supplied["o_proj.weight"] = info("bf16", (1024, 2048))
        self.supplied["qkv_proj.k_proj.weight"] = info("f32", (256, 2048))
        self.supplied["qkv_proj.q_proj.weight"] = info("bf16", (1024, 2048), device="cuda:1")
        self.supplied["qkv_proj.conv_qk_grouped.weight"] = info("bf16", (1280, 128, 2),
                                                                contiguous=False)
        self.supplied["q_proj.weight"] = info("bf16", (1024, 2048))
        self.assertEqual(self.problems(), [
            "tensor `qkv_proj.q_proj.weight` is on cuda:1, expected cuda:0 (where `x` is)",
            "tensor `qkv_proj.k_proj.weight`: expected bf16 [256, 2048], got f32 [256, 2048]",
            "tensor `qkv_proj.conv_qk_grouped.weight` is not contiguous: the kernels read dense "
            "row-major memory (pass `.contiguous()`)",
            "missing weight `qk_norm.temp` (bf16 [2])",
            "tensor `o_proj.weight`: expected bf16 [2048, 1024], got bf16 [1024, 2048]",
            "unexpected weight `q_proj.weight` (the library's weights are "
            "qkv_proj.q_proj.weight, qkv_proj.k_proj.weight, qkv_proj.v_proj_current.weight, "
            "qkv_proj.v_proj_delayed.weight, qkv_proj.conv_qk_depthwise.weight, "
            "qkv_proj.conv_qk_depthwise.bias, qkv_proj.conv_qk_grouped.weight, "
            "qkv_proj.conv_qk_grouped.bias, qk_norm.temp, o_proj.weight)",
        ])

    def test_a_tensor_off_a_16_byte_boundary_is_refused(self):
        # A contiguous view two bf16 elements into another tensor.
        self.supplied["qk_norm.temp"] = info("bf16", (2,), address=0x7f0000000004)
        self.assertEqual(self.problems(), [
            "tensor `qk_norm.temp` starts at 0x7f0000000004, not on a 16-byte boundary: the "
            "kernels read it in 16-byte vectors (pass `.clone()`)"])

    def test_x_on_the_cpu_is_refused(self):
        self.supplied["x"] = info("bf16", (1, 64, 2048), device="cpu")
        self.assertIn("tensor `x` is on cpu: the kernels need CUDA tensors", self.problems())


class Flops(unittest.TestCase):
    def test_flash_attention_convention(self):
        spec = parse_spec(load_spec_json("zaya1"))
        # 4·B·S²·H·D halved for causal: 8 heads of 128 at 16k, batch 1.
        self.assertEqual(core_flops(spec, 1, 16384), 2 * 16384**2 * 8 * 128)
        tokens = 16384
        projections = 2 * tokens * 2048 * (1024 + 256 + 256) + 2 * tokens * 1024 * 2048
        conv = 2 * tokens * 1280 * 2 + 2 * tokens * 1280 * 128 * 2
        self.assertEqual(layer_flops(spec, 1, tokens),
                         projections + conv + core_flops(spec, 1, tokens))

    def test_sliding_window_counts_window_keys(self):
        spec_json = load_spec_json("zaya1")
        spec_json["mask"] = {"sliding_window": {"window": 4096}}
        spec = parse_spec(spec_json)
        self.assertEqual(core_flops(spec, 1, 2048), 2 * 2048**2 * 8 * 128)
        self.assertEqual(core_flops(spec, 1, 16384),
                         4 * 8 * 128 * (16384 * 4096 - 4096**2 / 2))


if __name__ == "__main__":
    unittest.main()
