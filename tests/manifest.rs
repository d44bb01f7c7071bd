//! The manifest's JSON form and its validation errors.

use ccc::ir::size::{SizeEnv, SizeExpr, SizeVar};
use ccc::manifest::{
    BufferManifest, BufferRole, EntryPointManifest, KernelManifest, KernelParamManifest, Manifest,
    PtxasStats, SCHEMA_VERSION, TensorDType,
};
use ccc::spec::{AttentionSpec, EntryPoint};

mod common;

fn buffer(
    name: &str,
    role: BufferRole,
    dtype: TensorDType,
    shape: Vec<SizeExpr>,
    layout: &str,
) -> BufferManifest {
    BufferManifest {
        name: name.into(),
        role,
        dtype,
        shape,
        layout: layout.into(),
    }
}

fn param(name: &str) -> KernelParamManifest {
    KernelParamManifest::Buffer { name: name.into() }
}

/// The three-kernel forward pass of a GQA layer, as codegen would describe it.
fn gqa_manifest() -> Manifest {
    let spec = AttentionSpec::plain("gqa", 64, 16, 4, 2);
    let (b, s) = (SizeExpr::batch(), SizeExpr::seq_len());
    let bf16 = TensorDType::Bf16;
    let bshd = |heads: usize| vec![b.clone(), s.clone(), heads.into(), 16usize.into()];
    let mut buffers = vec![
        buffer(
            "x",
            BufferRole::Input,
            bf16,
            vec![b.clone(), s.clone(), 64usize.into()],
            "BSE",
        ),
        buffer(
            "out",
            BufferRole::Output,
            bf16,
            vec![b.clone(), s.clone(), 64usize.into()],
            "BSE",
        ),
        buffer("q", BufferRole::Intermediate, bf16, bshd(4), "BSHD"),
        buffer("k", BufferRole::Intermediate, bf16, bshd(2), "BSHD"),
        buffer("v", BufferRole::Intermediate, bf16, bshd(2), "BSHD"),
        buffer("o", BufferRole::Intermediate, bf16, bshd(4), "BSHD"),
        buffer(
            "lse",
            BufferRole::Scratch,
            TensorDType::F32,
            vec![b.clone(), 4usize.into(), s.clone()],
            "BHS",
        ),
    ];
    buffers.extend(Manifest::weights_for(&spec).iter().map(|w| w.as_buffer()));
    let sizes = || {
        vec![
            KernelParamManifest::Size {
                var: SizeVar::Batch,
            },
            KernelParamManifest::Size {
                var: SizeVar::SeqLen,
            },
        ]
    };
    let kernel = |symbol: &str, names: &[&str], grid: [SizeExpr; 3]| KernelManifest {
        symbol: symbol.into(),
        params: names.iter().map(|n| param(n)).chain(sizes()).collect(),
        grid,
        block: [128, 1, 1],
        dynamic_shared_bytes: 0,
        ptxas: None,
    };
    let mut attention = kernel(
        "gqa_attention",
        &["q", "k", "v", "o", "lse"],
        [s.clone().ceil_div(64), SizeExpr::c(4), b.clone()],
    );
    attention.dynamic_shared_bytes = 64 * 1024;
    attention.ptxas = Some(PtxasStats {
        registers: 168,
        spill_stores: 0,
        spill_loads: 0,
        shared_bytes: 0,
    });
    let kernels = vec![
        kernel(
            "gqa_qkv_proj",
            &[
                "x",
                "q_proj.weight",
                "k_proj.weight",
                "v_proj.weight",
                "q",
                "k",
                "v",
            ],
            [SizeExpr::c(8), s.clone().ceil_div(64), b.clone()],
        ),
        attention,
        kernel(
            "gqa_out_proj",
            &["o", "o_proj.weight", "out"],
            [SizeExpr::c(1), s.clone().ceil_div(64), b.clone()],
        ),
    ];
    let mut manifest = Manifest::new(
        spec,
        "gqa.ptx",
        vec![EntryPointManifest {
            entry: EntryPoint::Forward,
            kernels,
            buffers,
        }],
    );
    manifest.compiler_version = "0.1.0".into();
    manifest
}

/// Serialises, lets `edit` change the JSON tree, and returns the loader's error.
fn error_after(edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut value: serde_json::Value = serde_json::from_str(&gqa_manifest().to_json()).unwrap();
    edit(&mut value);
    Manifest::from_json(&value.to_string()).expect_err("the edited manifest must be rejected")
}

fn forward(value: &mut serde_json::Value) -> &mut serde_json::Value {
    &mut value["entry_points"][0]
}

#[test]
fn json_round_trip_is_lossless() {
    let manifest = gqa_manifest();
    manifest.validate().unwrap();
    assert_eq!((manifest.schema_version, manifest.target.as_str()), (SCHEMA_VERSION, "sm_90a"));
    let text = manifest.to_json();
    assert_eq!(Manifest::from_json(&text).unwrap(), manifest);
}

#[test]
fn json_form_stays_simple_for_other_loaders() {
    let value: serde_json::Value = serde_json::from_str(&gqa_manifest().to_json()).unwrap();
    let attention = &value["entry_points"][0]["kernels"][1];
    assert_eq!(value["schema_version"], 6);
    // A library without a cubin does not mention one.
    assert!(value.get("cubin_file").is_none());
    assert_eq!(value["entry_points"][0]["entry"], "forward");
    assert_eq!(
        attention["params"][0],
        serde_json::json!({"kind": "buffer", "name": "q"})
    );
    assert_eq!(
        attention["params"][5],
        serde_json::json!({"kind": "size", "var": "B"})
    );
    assert_eq!(
        attention["grid"][0],
        serde_json::json!({"ceil_div": [{"var": "S"}, 64]})
    );
    assert_eq!(attention["grid"][1], serde_json::json!({"const": 4}));
    assert_eq!(attention["ptxas"]["registers"], 168);
    let lse = &value["entry_points"][0]["buffers"][6];
    assert_eq!(lse["dtype"], "f32");
    assert_eq!(lse["role"], "scratch");
    assert_eq!(
        value["weights"][0],
        serde_json::json!({"name": "q_proj.weight", "shape": [64, 64], "dtype": "bf16"})
    );
}

#[test]
fn buffer_sizes_evaluate_per_call() {
    let manifest = gqa_manifest();
    let forward = manifest.entry_point(EntryPoint::Forward).unwrap();
    let env = SizeEnv {
        batch: 3,
        seq_len: 17,
        sms: None,
        pages: None,
        blocks: None,
    };
    assert_eq!(
        forward.buffer("q").unwrap().elements(&env),
        Ok(3 * 17 * 4 * 16)
    );
    assert_eq!(
        forward.buffer("lse").unwrap().elements(&env),
        Ok(3 * 4 * 17)
    );
    assert_eq!(
        forward.buffer("o_proj.weight").unwrap().elements(&env),
        Ok(64 * 64)
    );
}

#[test]
fn unknown_schema_version_is_named_before_anything_else() {
    let err = error_after(|v| {
        v["schema_version"] = 7.into();
        v["some_field_of_version_7"] = true.into();
    });
    assert_eq!(
        err,
        "unknown manifest schema version 7: this build reads version 6"
    );
    let err = error_after(|v| {
        v.as_object_mut().unwrap().remove("schema_version");
    });
    assert_eq!(err, "manifest has no schema_version");
}

#[test]
fn kernel_param_naming_a_missing_buffer_is_rejected() {
    let err = error_after(|v| forward(v)["kernels"][2]["params"][1]["name"] = "w_o".into());
    assert_eq!(
        err,
        "entry point `forward`: kernel `gqa_out_proj`: parameter 1 names a missing buffer `w_o`"
    );
}

#[test]
fn weights_must_be_the_spec_parameters() {
    let err = error_after(|v| v["weights"][1]["shape"] = serde_json::json!([32, 65]));
    assert!(err.starts_with("weights must be the spec's parameters in order, in bf16: expected [q_proj.weight [64, 64] bf16, k_proj.weight [32, 64] bf16"), "{err}");
    assert!(
        err.contains("got [q_proj.weight [64, 64] bf16, k_proj.weight [32, 65] bf16"),
        "{err}"
    );
}

#[test]
fn weight_buffers_must_match_their_weight() {
    let err = error_after(|v| forward(v)["buffers"][7]["dtype"] = "f32".into());
    assert_eq!(
        err,
        "entry point `forward`: buffer `q_proj.weight`: must match weight bf16 [64, 64], got f32 [64, 64]"
    );
    let err = error_after(|v| forward(v)["buffers"][7]["name"] = "q_weight".into());
    assert!(
        err.contains("buffer `q_weight`: role weight, but no weight of that name"),
        "{err}"
    );
}

#[test]
fn forward_input_and_output_contract_is_enforced() {
    let err =
        error_after(|v| forward(v)["buffers"][0]["shape"][2] = serde_json::json!({"const": 63}));
    assert_eq!(
        err,
        "entry point `forward`: buffer `x` must be input bf16 [B, S, 64] in layout BSE, got input bf16 [B, S, 63] in layout BSE"
    );
    let err = error_after(|v| {
        forward(v)["buffers"].as_array_mut().unwrap().remove(1);
    });
    assert_eq!(
        err,
        "entry point `forward`: the forward pass needs a buffer `out`"
    );
}

#[test]
fn structural_errors_name_the_item() {
    let err = error_after(|v| forward(v)["kernels"][1]["symbol"] = "gqa_qkv_proj".into());
    assert_eq!(err, "kernel symbol `gqa_qkv_proj` is used twice");
    let err = error_after(|v| forward(v)["kernels"][0]["block"] = serde_json::json!([64, 32, 1]));
    assert_eq!(
        err,
        "entry point `forward`: kernel `gqa_qkv_proj`: block [64, 32, 1] exceeds 1024 threads"
    );
    let err = error_after(|v| forward(v)["kernels"][1]["dynamic_shared_bytes"] = 300_000.into());
    assert!(
        err.contains("dynamic shared memory 300000 bytes exceeds"),
        "{err}"
    );
    let err = error_after(|v| forward(v)["buffers"][3]["name"] = "q".into());
    assert_eq!(err, "entry point `forward`: buffer `q` is declared twice");
    let err = error_after(|v| v["ptx_file"] = "../elsewhere.ptx".into());
    assert!(
        err.starts_with("ptx_file `../elsewhere.ptx` must be a relative path"),
        "{err}"
    );
    let err = error_after(|v| v["entry_points"][0]["entry"] = "decode".into());
    assert_eq!(err, "entry point `decode` is not in the spec's emit list");
    let err = error_after(|v| v["entry_points"] = serde_json::json!([]));
    assert_eq!(err, "the spec emits `forward` but the manifest lacks it");
}

#[test]
fn malformed_json_is_an_error_not_a_panic() {
    assert!(
        Manifest::from_json("{")
            .unwrap_err()
            .starts_with("manifest is not valid JSON")
    );
    let err = error_after(|v| {
        forward(v)["kernels"][0]["params"][0] = serde_json::json!({"kind": "pointer"})
    });
    assert!(
        err.starts_with("malformed manifest: unknown variant `pointer`"),
        "{err}"
    );
    let err = error_after(|v| v["extra"] = 1.into());
    assert!(
        err.starts_with("malformed manifest: unknown field `extra`"),
        "{err}"
    );
}

/// The manifests of every entry point of `spec` as the driver writes them from its plans and the
/// planned kernels (launches without LLVM: the kernels' own threads and grids).
fn entry_manifests(spec: &AttentionSpec) -> Vec<ccc::manifest::EntryPointManifest> {
    let plans = ccc::driver::plans(spec).unwrap();
    let kernels = ccc::driver::kernels(spec).unwrap();
    let launches: Vec<ccc::driver::LaunchInfo> = kernels
        .iter()
        .map(|k| ccc::driver::LaunchInfo {
            threads: k.threads(),
            dynamic_shared_bytes: 0,
            grid: k.grid.clone(),
        })
        .collect();
    let ptxas = vec![None; kernels.len()];
    ccc::driver::entry_point_manifests(spec, &plans, &kernels, &launches, &ptxas).unwrap()
}

/// The driver describes every buffer the planned kernels touch: p0, the projection GEMM's
/// output read by the q/k prologue, is an intermediate laid out [B, S, channels].
#[test]
fn the_driver_declares_the_packed_projection_as_a_bsc_intermediate() {
    let spec = common::specs::zaya1();
    let entry = entry_manifests(&spec).remove(0);
    let symbols: Vec<&str> = entry.kernels.iter().map(|k| k.symbol.as_str()).collect();
    assert_eq!(
        symbols,
        [
            "zaya1_qkv_proj",
            "zaya1_qk_prologue",
            "zaya1_attention",
            "zaya1_out_proj"
        ]
    );
    let (b, s) = (SizeExpr::batch(), SizeExpr::seq_len());
    assert_eq!(
        entry.buffer("p0"),
        Some(&buffer(
            "p0",
            BufferRole::Intermediate,
            TensorDType::Bf16,
            vec![b.clone(), s.clone(), 1280usize.into()],
            "BSC",
        ))
    );
    assert_eq!(
        entry.buffer("q"),
        Some(&buffer(
            "q",
            BufferRole::Intermediate,
            TensorDType::Bf16,
            vec![b, s, 8usize.into(), 128usize.into()],
            "BSHD",
        ))
    );
    let manifest = Manifest::new(spec, "zaya1.ptx", vec![entry]);
    manifest.validate().unwrap();
}

/// With `emit = [forward, backward]` the forward keeps what the backward reads (role `saved`,
/// declared alike in both), and the backward takes x, dout and those as inputs and returns dx and
/// an f32 gradient of every weight; without backward nothing is saved.
#[test]
fn the_forward_saves_what_the_backward_reads() {
    let mut spec = common::specs::zaya1();
    let forward_only = entry_manifests(&spec).remove(0);
    assert!(forward_only.buffers.iter().all(|b| b.role != BufferRole::Saved));
    assert_eq!(forward_only.buffer("lse").map(|b| b.role), Some(BufferRole::Scratch));
    spec.entry_points = vec![EntryPoint::Forward, EntryPoint::Backward];
    let entries = entry_manifests(&spec);
    let (forward, backward) = (&entries[0], &entries[1]);
    assert_eq!((forward.entry, backward.entry), (EntryPoint::Forward, EntryPoint::Backward));
    let saved: Vec<&str> = forward.buffers.iter().filter(|b| b.role == BufferRole::Saved).map(|b| b.name.as_str()).collect();
    assert_eq!(saved, ["p0", "v", "q", "k", "o", "lse"]);
    for name in &saved {
        let (kept, read) = (forward.buffer(name).unwrap(), backward.buffer(name).unwrap());
        assert_eq!(read.role, BufferRole::Input, "{name}");
        assert_eq!((&kept.shape, kept.dtype), (&read.shape, read.dtype), "{name}");
    }
    let inputs: Vec<&str> = backward.buffers.iter().filter(|b| b.role == BufferRole::Input).map(|b| b.name.as_str()).collect();
    assert_eq!(inputs.len(), saved.len() + 2, "{inputs:?}");
    assert!(inputs.contains(&"x") && inputs.contains(&"dout"));
    let outputs: Vec<&str> = backward.buffers.iter().filter(|b| b.role == BufferRole::Output).map(|b| b.name.as_str()).collect();
    let mut expected: Vec<String> = spec.params().into_iter().map(|p| format!("grad.{}", p.name)).collect();
    expected.push("dx".into());
    let mut got: Vec<String> = outputs.iter().map(|s| s.to_string()).collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    for param in spec.params() {
        let gradient = backward.buffer(&format!("grad.{}", param.name)).unwrap();
        assert_eq!(gradient.dtype, TensorDType::F32);
        assert_eq!(gradient.shape, param.shape.iter().map(|&d| SizeExpr::from(d)).collect::<Vec<_>>());
    }
    let mut backward_only = spec.clone();
    backward_only.entry_points = vec![EntryPoint::Backward];
    assert_eq!(
        ccc::driver::plans(&backward_only).unwrap_err().message,
        "the backward entry point needs the forward's (emit = [forward, backward])"
    );
    let manifest = Manifest::new(spec, "zaya1.ptx", entries);
    manifest.validate().unwrap();
    // The backward must read each saved buffer as the forward keeps it.
    let mut retyped = manifest.clone();
    retyped.entry_points[1].buffers.iter_mut().filter(|b| b.name == "lse").for_each(|b| b.dtype = TensorDType::Bf16);
    assert_eq!(
        retyped.validate().unwrap_err(),
        "the backward reads `lse` (bf16 [B, 8, S]), which the forward does not save as such"
    );
    // A backward without a gradient of every weight is refused.
    let mut broken = manifest.clone();
    broken.entry_points[1].buffers.retain(|b| b.name != "grad.o_proj.weight");
    broken.entry_points[1].kernels.iter_mut().for_each(|k| {
        k.params.retain(|p| !matches!(p, KernelParamManifest::Buffer { name } if name == "grad.o_proj.weight"))
    });
    assert_eq!(
        broken.validate().unwrap_err(),
        "entry point `backward`: the backward pass needs an f32 output `grad.o_proj.weight` of shape [2048, 1024]"
    );
}

#[test]
fn tensor_map_params_round_trip_and_name_what_the_kernel_cannot_map() {
    let map = |buffer: &str, box_rows: u32| serde_json::json!({"kind": "tensor_map", "buffer": buffer, "box_rows": box_rows});
    // q [B, S, 4, 16], x [B, S, 64] and a weight [64, 64]: rows of whole 16-byte chunks.
    let mut value: serde_json::Value = serde_json::from_str(&gqa_manifest().to_json()).unwrap();
    let params = || [map("q", 128), map("x", 128), map("q_proj.weight", 64)];
    forward(&mut value)["kernels"][1]["params"].as_array_mut().unwrap().extend(params());
    let manifest = Manifest::from_json(&value.to_string()).unwrap();
    let expected: Vec<KernelParamManifest> = [("q", 128), ("x", 128), ("q_proj.weight", 64)]
        .map(|(buffer, box_rows)| KernelParamManifest::TensorMap { buffer: buffer.into(), box_rows, view: None })
        .to_vec();
    assert_eq!(manifest.entry_points[0].kernels[1].params[7..], expected[..]);
    let prefix = "entry point `forward`: kernel `gqa_attention`: parameter 7";
    let cases = [
        (map("w", 64), format!("{prefix} maps a missing buffer `w`")),
        (
            map("lse", 64),
            format!("{prefix}: tensor map of `lse`: needs a [B, S, H, D], [B, S, C] or row-major [R, C] buffer, got BHS [B, 4, S]"),
        ),
    ];
    for (param, expected) in cases {
        let err = error_after(|v| forward(v)["kernels"][1]["params"].as_array_mut().unwrap().push(param));
        assert_eq!(err, expected);
    }
    let err = error_after(|v| {
        forward(v)["buffers"][2]["shape"][3] = serde_json::json!({"const": 12});
        forward(v)["kernels"][1]["params"].as_array_mut().unwrap().push(map("q", 64));
    });
    assert_eq!(err, format!("{prefix}: tensor map of `q`: the innermost dimension 12 is not a constant multiple of 8"));
    for box_rows in [0, 257] {
        let err = error_after(|v| forward(v)["kernels"][1]["params"].as_array_mut().unwrap().push(map("q", box_rows)));
        assert_eq!(err, format!("{prefix}: tensor map of `q`: a box of {box_rows} rows (1 to 256)"));
    }
    // A map may see its buffer under another shape of as many elements (x [B, S, 64] as heads).
    let viewed = |view: serde_json::Value| serde_json::json!({"kind": "tensor_map", "buffer": "x", "box_rows": 64, "view": view});
    let heads = serde_json::json!([{"var": "B"}, {"var": "S"}, {"const": 4}, {"const": 16}]);
    let mut value: serde_json::Value = serde_json::from_str(&gqa_manifest().to_json()).unwrap();
    forward(&mut value)["kernels"][1]["params"].as_array_mut().unwrap().push(viewed(heads));
    Manifest::from_json(&value.to_string()).unwrap();
    let err = error_after(|v| {
        forward(v)["kernels"][1]["params"].as_array_mut().unwrap().push(viewed(serde_json::json!([{"var": "B"}, {"var": "S"}, {"const": 32}])))
    });
    assert_eq!(err, format!("{prefix}: tensor map of `x`: a view [B, S, 32] of the buffer's [B, S, 64] does not hold as many elements"));
}

/// The spec fixtures of the Python tests (tests/python/fixtures/*_spec.json) are the examples'
/// specs as the Rust manifest writer serializes them. `CCC_UPDATE_FIXTURES=1` rewrites them.
#[test]
fn the_python_spec_fixtures_are_written_by_the_rust_serializer() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for example in ["zaya1", "cca4x"] {
        let text = std::fs::read_to_string(root.join(format!("examples/{example}.attn"))).unwrap();
        let spec = ccc::frontend::parse_and_check(example, &text).unwrap().remove(0);
        let want = serde_json::to_string_pretty(&spec).unwrap() + "\n";
        let path = root.join(format!("tests/python/fixtures/{example}_spec.json"));
        if std::env::var_os("CCC_UPDATE_FIXTURES").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap();
        assert!(have == want, "{} differs from the Rust serializer's; CCC_UPDATE_FIXTURES=1 rewrites it", path.display());
    }
    // ZAYA1 with backward, as the driver lays out its entry points (launch sizes aside).
    let mut spec = common::specs::zaya1();
    spec.entry_points = vec![EntryPoint::Forward, EntryPoint::Backward];
    let manifest = Manifest::new(spec.clone(), "zaya1.ptx", entry_manifests(&spec));
    let want = manifest.to_json() + "\n";
    let path = root.join("tests/python/fixtures/zaya1_train_manifest.json");
    if std::env::var_os("CCC_UPDATE_FIXTURES").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(have == want, "{} differs from the driver's; CCC_UPDATE_FIXTURES=1 rewrites it", path.display());
    // ZAYA1 for serving: the decode entry point beside the forward (read by the Python tests
    // and the runtime's host checks).
    spec.entry_points = vec![EntryPoint::Forward, EntryPoint::Decode];
    let manifest = Manifest::new(spec.clone(), "zaya1.ptx", entry_manifests(&spec));
    let want = manifest.to_json() + "\n";
    let path = root.join("tests/python/fixtures/zaya1_serve_manifest.json");
    if std::env::var_os("CCC_UPDATE_FIXTURES").is_some() {
        std::fs::write(&path, &want).unwrap();
    }
    let have = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(have == want, "{} differs from the driver's; CCC_UPDATE_FIXTURES=1 rewrites it", path.display());
}

/// The decode entry point's buffers: the caller's token rows, index tensors and state by role;
/// the rest allocated per call.
#[test]
fn the_decode_entry_point_declares_the_callers_state() {
    let mut spec = common::specs::zaya1();
    spec.entry_points = vec![EntryPoint::Forward, EntryPoint::Decode];
    let decode = entry_manifests(&spec).remove(1);
    let described: Vec<String> = decode
        .buffers
        .iter()
        .filter(|b| b.role != BufferRole::Weight)
        .map(|b| format!("{} {} {} {} {}", b.name, b.role.name(), b.dtype.name(), ccc::manifest::format_shape(&b.shape), b.layout))
        .collect();
    assert_eq!(
        described,
        [
            "x input bf16 [B, 1, 2048] BSE",
            "p0 intermediate bf16 [1, B, 1280] BSC",
            "v intermediate bf16 [1, B, 2, 128] BSHD",
            "shift_next intermediate bf16 [1, B, 1, 128] BSHD",
            "conv_state state bf16 [B, 1280, 2] row_major",
            "seq_lens input i32 [B] row_major",
            "q intermediate bf16 [B, 1, 8, 128] BSHD",
            "k intermediate bf16 [B, 1, 2, 128] BSHD",
            "shift_state state bf16 [B, 128] row_major",
            "block_table input i32 [B, blocks] row_major",
            "k_cache state bf16 [pages, 16, 2, 128] paged",
            "v_cache state bf16 [pages, 16, 2, 128] paged",
            "o_part intermediate f32 [B, ceil(blocks*16/512), 8, 128] row_major",
            "lse_part intermediate f32 [B, ceil(blocks*16/512), 8] row_major",
            "o intermediate bf16 [B, 1, 8, 128] BSHD",
            "out output bf16 [B, 1, 2048] BSE",
        ]
    );
}
