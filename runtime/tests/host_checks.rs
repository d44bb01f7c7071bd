//! Host-side checks that run on any machine: call planning, tensor and weight validation,
//! safetensors loading, dtype conversions.

mod common;

use ccc::ir::size::{SizeEnv, SizeVar};
use ccc::manifest::{BufferRole, KernelParamManifest, TensorDType};
use ccc::spec::EntryPoint;
use ccc_runtime::plan::PlannedArg;
use ccc_runtime::tensor::{nan_bytes, round_through};
use ccc_runtime::{CallPlan, HostTensor, RuntimeError, WeightSet};
use common::{WeightList, fixture_manifest, fixture_weight_list, persistent_fixture, weight_entries};
use half::bf16;
use safetensors::{Dtype, tensor::TensorView};

#[test]
fn plan_evaluates_shapes_grids_and_arguments() {
    let manifest = fixture_manifest();
    let plan = CallPlan::for_input(
        &manifest,
        EntryPoint::Forward,
        "x",
        TensorDType::Bf16,
        &[3, 17, 8],
        Some(132),
    )
    .unwrap();
    assert_eq!(
        plan.env,
        SizeEnv {
            batch: 3,
            seq_len: 17,
            sms: Some(132), pages: None, blocks: None }
    );
    let o = plan.buffer("o").unwrap();
    assert_eq!(
        (o.role, o.shape.as_slice(), o.bytes),
        (BufferRole::Intermediate, &[3, 17, 2, 4][..], 3 * 17 * 8 * 2)
    );
    assert_eq!(plan.buffer("o_proj.weight").unwrap().shape, [8, 8]);
    // 3·17·8 = 408 elements over 64-thread blocks.
    assert_eq!(plan.launches[0].grid, (7, 1, 1));
    assert_eq!(
        plan.launches[1].dynamic_shared_bytes,
        common::BIG_SHARED_BYTES
    );
    let names: Vec<&str> = plan.launches[1]
        .args
        .iter()
        .filter_map(|a| match a {
            PlannedArg::Buffer(i) => Some(plan.buffers[*i].name.as_str()),
            PlannedArg::Size(_) | PlannedArg::TensorMap { .. } => None,
        })
        .collect();
    assert_eq!(names, ["o", "o_proj.weight", "out"]);
    assert_eq!(
        plan.launches[1].args[3..],
        [PlannedArg::Size(3), PlannedArg::Size(17)]
    );
}

#[test]
fn plan_passes_tensor_maps_with_their_buffer_and_box() {
    let mut manifest = fixture_manifest();
    let forward = &mut manifest.entry_points[0];
    let o = forward.buffers.iter_mut().find(|b| b.name == "o").unwrap();
    o.shape[3] = ccc::ir::size::SizeExpr::c(64);
    forward.kernels[1].params.push(KernelParamManifest::TensorMap { buffer: "o".into(), box_rows: 64, view: None });
    manifest.validate().unwrap();
    let plan = CallPlan::for_sizes(&manifest, EntryPoint::Forward, SizeEnv { batch: 2, seq_len: 5, sms: None, pages: None, blocks: None }).unwrap();
    let Some(&PlannedArg::TensorMap { buffer, box_rows, .. }) = plan.launches[1].args.last() else {
        panic!("the last argument is the tensor map: {:?}", plan.launches[1].args);
    };
    assert_eq!((plan.buffers[buffer].name.as_str(), plan.buffers[buffer].shape.as_slice(), box_rows), ("o", &[2, 5, 2, 64][..], 64));
    let geometry = ccc_runtime::tensor_map::geometry(&plan.buffers[buffer], box_rows).unwrap();
    assert_eq!((geometry.dims, geometry.box_dims), (vec![64, 2, 5, 2], vec![64, 1, 64, 1]));
}

#[test]
fn wrong_input_shape_or_dtype_names_the_tensor() {
    let manifest = fixture_manifest();
    let plan = |dtype, shape: &[usize]| {
        CallPlan::for_input(&manifest, EntryPoint::Forward, "x", dtype, shape, None)
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        plan(TensorDType::Bf16, &[2, 5, 9]),
        "tensor `x`: expected bf16 [B, S, 8], got bf16 [2, 5, 9]"
    );
    assert_eq!(
        plan(TensorDType::F32, &[2, 5, 8]),
        "tensor `x`: expected bf16 [B, S, 8], got f32 [2, 5, 8]"
    );
    assert_eq!(
        plan(TensorDType::Bf16, &[10, 8]),
        "tensor `x`: expected bf16 [B, S, 8], got bf16 [10, 8]"
    );
    assert_eq!(
        plan(TensorDType::Bf16, &[0, 5, 8]),
        "batch (0) and sequence length (5) must be positive"
    );
}

#[test]
fn sizes_that_do_not_fit_are_errors() {
    let manifest = fixture_manifest();
    let plan = |batch, seq_len| {
        CallPlan::for_sizes(&manifest, EntryPoint::Forward, SizeEnv { batch, seq_len, sms: None, pages: None, blocks: None })
            .unwrap_err()
            .to_string()
    };
    assert_eq!(
        plan(1 << 40, 1 << 30),
        "the size of `x` overflows for B = 1099511627776, S = 1073741824"
    );
    assert_eq!(
        plan(1 << 20, 1 << 20),
        "kernel `fixture_double`: grid dimension 0 = ceil(B*S*8/64) = 137438953472 for B = 1048576, S = 1048576 is outside 1..=2147483647"
    );
    assert_eq!(
        plan(1 << 33, 1),
        "B as a 32-bit kernel argument overflows for B = 8589934592, S = 1"
    );
    let err = CallPlan::for_sizes(
        &manifest,
        EntryPoint::Decode,
        SizeEnv {
            batch: 1,
            seq_len: 1,
            sms: None,
            pages: None,
            blocks: None,
        },
    )
    .unwrap_err();
    assert_eq!(err.to_string(), "the library has no `decode` entry point: compile its spec with `decode` in `emit`");
}

/// The persistent fixture whose second kernel also takes the SM count, as its last argument.
fn persistent_fixture_taking_sms() -> ccc::manifest::Manifest {
    let mut manifest = persistent_fixture();
    manifest.entry_points[0].kernels[1].params.push(KernelParamManifest::Size { var: SizeVar::SmCount });
    manifest
}

#[test]
fn a_persistent_grid_takes_the_sm_count_of_the_device() {
    let manifest = persistent_fixture_taking_sms();
    let plan = CallPlan::for_input(&manifest, EntryPoint::Forward, "x", TensorDType::Bf16, &[3, 17, 8], Some(5)).unwrap();
    assert_eq!((plan.launches[0].grid, plan.launches[1].grid), ((7, 1, 1), (5, 1, 1)));
    assert_eq!(plan.launches[1].args.last(), Some(&PlannedArg::Size(5)));
    let on_132 = CallPlan::for_sizes(&manifest, EntryPoint::Forward, SizeEnv { batch: 3, seq_len: 1000, sms: Some(132), pages: None, blocks: None }).unwrap();
    assert_eq!((on_132.launches[0].grid, on_132.launches[1].grid), ((375, 1, 1), (132, 1, 1)));
}

#[test]
fn a_persistent_grid_without_an_sm_count_names_the_kernel_and_the_size() {
    let manifest = persistent_fixture_taking_sms();
    let err = CallPlan::for_input(&manifest, EntryPoint::Forward, "x", TensorDType::Bf16, &[3, 17, 8], None).unwrap_err();
    assert_eq!(
        err.to_string(),
        "kernel `fixture_add_diagonal`: grid dimension 0 = SMs needs SMs, the device's SM count, which is not given"
    );
    let mut as_argument_only = manifest.clone();
    as_argument_only.entry_points[0].kernels[1].grid = fixture_manifest().entry_points[0].kernels[1].grid.clone();
    let err = CallPlan::for_sizes(&as_argument_only, EntryPoint::Forward, SizeEnv { batch: 3, seq_len: 17, sms: None, pages: None, blocks: None })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "kernel `fixture_add_diagonal`: parameter 5 needs SMs, the device's SM count, which is not given"
    );
    let err = CallPlan::for_sizes(&manifest, EntryPoint::Forward, SizeEnv { batch: 3, seq_len: 17, sms: Some(0), pages: None, blocks: None })
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "kernel `fixture_add_diagonal`: grid dimension 0 = SMs = 0 for B = 3, S = 17 is outside 1..=2147483647"
    );
}

fn fixture_weights(scale: f64) -> WeightList {
    fixture_weight_list(|i| scale * i as f64)
}

#[test]
fn weight_set_reports_every_missing_extra_and_misshaped_tensor() {
    let manifest = fixture_manifest();
    let mut list = fixture_weights(0.01);
    list.retain(|(name, _, _)| name != "k_proj.weight" && name != "v_proj.weight");
    list[0].1 = vec![4, 16];
    list.push(("lm_head.weight".into(), vec![1], vec![0.0]));
    let err = WeightSet::from_f64(&manifest, weight_entries(&list)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "weights do not match the library: `q_proj.weight` has shape [4, 16], expected [8, 8]; \
         missing `k_proj.weight`, `v_proj.weight`; unexpected `lm_head.weight`"
    );
    let list = fixture_weights(0.01);
    let set = WeightSet::from_f64(&manifest, weight_entries(&list)).unwrap();
    let q = set.get("q_proj.weight").unwrap();
    assert_eq!(q.dtype(), TensorDType::Bf16);
    assert_eq!(q.to_f64()[3], bf16::from_f64(0.03).to_f64());
}

#[test]
fn safetensors_files_load_in_any_float_dtype() {
    let manifest = fixture_manifest();
    let list = fixture_weights(0.25); // exact in every dtype
    // Each tensor stored in a different dtype, as mixed checkpoints sometimes are.
    let dtypes = [
        TensorDType::F32,
        TensorDType::Bf16,
        TensorDType::F16,
        TensorDType::F32,
    ];
    let stored: Vec<(String, TensorDType, Vec<usize>, Vec<u8>)> = list
        .iter()
        .zip(dtypes)
        .map(|((name, shape, data), dtype)| {
            let tensor = HostTensor::from_f64(dtype, shape.clone(), data).unwrap();
            (name.clone(), dtype, shape.clone(), tensor.to_le_bytes())
        })
        .collect();
    let views = stored.iter().map(|(name, dtype, shape, bytes)| {
        let dtype = match dtype {
            TensorDType::Bf16 => Dtype::BF16,
            TensorDType::F16 => Dtype::F16,
            TensorDType::F32 => Dtype::F32,
            TensorDType::I32 => Dtype::I32,
        };
        (
            name.clone(),
            TensorView::new(dtype, shape.clone(), bytes).unwrap(),
        )
    });
    let path = common::scratch_dir("safetensors-any-dtype").join("fixture-weights.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let set = WeightSet::from_safetensors_file(&path, &manifest, "").unwrap();
    for (name, shape, data) in &list {
        let tensor = set.get(name).unwrap();
        assert_eq!(
            (tensor.dtype(), &tensor.shape),
            (TensorDType::Bf16, shape),
            "{name}"
        );
        assert_eq!(&tensor.to_f64(), data, "{name}");
    }
    let from_memory = WeightSet::from_f64(&manifest, weight_entries(&list)).unwrap();
    assert_eq!(set, from_memory);
}

#[test]
fn safetensors_errors_name_the_tensor_or_the_file() {
    let manifest = fixture_manifest();
    let ints = vec![0u8; 4];
    let views = [(
        "q_proj.weight".to_string(),
        TensorView::new(Dtype::I32, vec![1], &ints).unwrap(),
    )];
    let path = common::scratch_dir("safetensors-errors").join("ints.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let err = WeightSet::from_safetensors_file(&path, &manifest, "")
        .unwrap_err()
        .to_string();
    assert!(err.starts_with("weights do not match the library: `q_proj.weight` is stored as I32; bf16, f16 or f32 are accepted; missing `k_proj.weight`"), "{err}");
    let path = common::scratch_dir("safetensors-errors").join("not-safetensors.bin");
    std::fs::write(&path, b"hello").unwrap();
    let err = WeightSet::from_safetensors_file(&path, &manifest, "").unwrap_err();
    assert!(
        matches!(&err, RuntimeError::Io { .. })
            && err.to_string().contains("not a safetensors file"),
        "{err}"
    );
    // A header whose shape overflows, and one whose bytes lie past the end: errors, not panics.
    let header = br#"{"q_proj.weight":{"dtype":"BF16","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,2]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    file.extend_from_slice(&[0, 0]);
    std::fs::write(&path, &file).unwrap();
    let err = WeightSet::from_safetensors_file(&path, &manifest, "").unwrap_err().to_string();
    assert!(err.contains("`q_proj.weight` has 2 bytes, not those of bf16"), "{err}");
    let header = br#"{"q_proj.weight":{"dtype":"BF16","shape":[1],"data_offsets":[0,18446744073709551615]}}"#;
    let mut file = (header.len() as u64).to_le_bytes().to_vec();
    file.extend_from_slice(header);
    std::fs::write(&path, &file).unwrap();
    let err = WeightSet::from_safetensors_file(&path, &manifest, "").unwrap_err().to_string();
    assert!(err.contains("outside the file"), "{err}");
    let err =
        WeightSet::from_safetensors_file("/nonexistent/w.safetensors", &manifest, "").unwrap_err();
    assert!(
        err.to_string().starts_with("/nonexistent/w.safetensors: "),
        "{err}"
    );
}

/// A whole model's checkpoint: two layers' weights under `model.layers.N.self_attn.`, an
/// embedding, and a tensor of a dtype the loader refuses, which it must not read.
#[test]
fn a_layer_loads_from_a_whole_model_checkpoint_by_its_prefix() {
    let manifest = fixture_manifest();
    let layers = [fixture_weights(0.25), fixture_weights(0.5)];
    let mut stored: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (index, list) in layers.iter().enumerate() {
        for (name, shape, data) in list {
            let bytes = HostTensor::from_f64(TensorDType::Bf16, shape.clone(), data).unwrap().to_le_bytes();
            stored.push((format!("model.layers.{index}.self_attn.{name}"), Dtype::BF16, shape.clone(), bytes));
        }
    }
    stored.push(("model.embed_tokens.weight".into(), Dtype::F32, vec![2], vec![0; 8]));
    stored.push(("model.layers.0.mlp.steps".into(), Dtype::I64, vec![1], vec![0; 8]));
    let views = stored
        .iter()
        .map(|(name, dtype, shape, bytes)| (name.clone(), TensorView::new(*dtype, shape.clone(), bytes).unwrap()));
    let path = common::scratch_dir("safetensors-checkpoint").join("model.safetensors");
    safetensors::serialize_to_file(views, None, &path).unwrap();

    let set = WeightSet::from_safetensors_file(&path, &manifest, "model.layers.1.self_attn.").unwrap();
    assert_eq!(set, WeightSet::from_f64(&manifest, weight_entries(&layers[1])).unwrap());

    let err = WeightSet::from_safetensors_file(&path, &manifest, "model.layers.7.self_attn.").unwrap_err().to_string();
    assert!(
        err.ends_with(
            "no tensor starts with `model.layers.7.self_attn.`; the layer's `q_proj.weight` is under \
             `model.layers.0.self_attn.`, `model.layers.1.self_attn.`"
        ),
        "{err}"
    );
    // A prefix that matches other tensors: the layer's are missing, each named in full.
    let err = WeightSet::from_safetensors_file(&path, &manifest, "model.layers.0.").unwrap_err().to_string();
    assert!(err.contains("missing `model.layers.0.q_proj.weight`"), "{err}");
    assert!(err.contains("`model.layers.0.mlp.steps` is stored as I64"), "{err}");
}

#[test]
fn dtype_conversions_round_to_nearest_even() {
    // 1 + 2^-8 is halfway between two bf16 values: ties go to the even one, 1.0.
    let halfway = 1.0 + 2f64.powi(-8);
    let t = HostTensor::from_f64(TensorDType::Bf16, vec![3], &[halfway, -2.5, 1e-3]).unwrap();
    assert_eq!(t.to_f64()[..2], [1.0, -2.5]);
    let mut values = [halfway, 3.0];
    round_through(TensorDType::Bf16, &mut values);
    assert_eq!(values, [1.0, 3.0]);
    let back = HostTensor::from_le_bytes(TensorDType::Bf16, vec![3], &t.to_le_bytes()).unwrap();
    assert_eq!(back, t);
    assert_eq!(t.to_dtype(TensorDType::F32).to_dtype(TensorDType::Bf16), t);
    assert!(HostTensor::from_f64(TensorDType::F16, vec![2, 2], &[1.0]).is_err());
    assert!(HostTensor::from_le_bytes(TensorDType::F32, vec![1], &[0, 0, 0]).is_err());
    let poison =
        HostTensor::from_le_bytes(TensorDType::F16, vec![4], &nan_bytes(TensorDType::F16, 4))
            .unwrap();
    assert!(poison.to_f64().iter().all(|v| v.is_nan()));
    let poison =
        HostTensor::from_le_bytes(TensorDType::F32, vec![2], &nan_bytes(TensorDType::F32, 2))
            .unwrap();
    assert!(poison.to_f64().iter().all(|v| v.is_nan()));
}

/// The Python loader's test fixture (tests/python/fixtures/fixture/) is what the Rust manifest
/// writer and the runtime's fixture PTX give, byte for byte, so that the two loaders are tested
/// on one library. `CCC_UPDATE_FIXTURES=1` rewrites the files from the Rust side.
#[test]
fn the_python_fixture_library_is_written_by_the_rust_manifest_writer() {
    let directory = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/fixtures/fixture");
    let files = [("manifest.json", common::fixture_manifest().to_json() + "\n"), ("fixture.ptx", common::FIXTURE_PTX.to_string())];
    for (name, want) in files {
        let path = directory.join(name);
        if std::env::var_os("CCC_UPDATE_FIXTURES").is_some() {
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            have == want,
            "{} differs from what the Rust writer gives; run with CCC_UPDATE_FIXTURES=1 to rewrite it",
            path.display()
        );
    }
}

/// Index tensors (block tables, sequence lengths): integers only, little-endian i32 on the
/// device, poisoned with the most negative index (i32 has no NaN).
#[test]
fn i32_host_tensors_hold_integers_only() {
    let table = HostTensor::from_f64(TensorDType::I32, vec![2, 2], &[3.0, 0.0, -1.0, 7.0]).unwrap();
    assert_eq!(table.to_le_bytes(), [3i32, 0, -1, 7].iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    let back = HostTensor::from_le_bytes(TensorDType::I32, vec![2, 2], &table.to_le_bytes()).unwrap();
    assert_eq!((back.dtype(), back.to_f64()), (TensorDType::I32, vec![3.0, 0.0, -1.0, 7.0]));
    for bad in [0.5, 3e9, f64::NAN] {
        let error = HostTensor::from_f64(TensorDType::I32, vec![1], &[bad]).unwrap_err();
        assert!(error.to_string().contains("is not an i32 index"), "{error}");
    }
    assert_eq!(nan_bytes(TensorDType::I32, 2), [i32::MIN.to_le_bytes(), i32::MIN.to_le_bytes()].concat());
}

/// ZAYA1's decode entry point (tests/python/fixtures/zaya1_serve_manifest.json, which
/// tests/manifest.rs keeps equal to the driver's): B from x, the pool's pages from the KV pages,
/// the block table's width from it; every tensor checked by name before anything runs.
#[test]
fn a_decode_step_reads_its_sizes_off_the_callers_tensors() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/fixtures/zaya1_serve_manifest.json");
    let manifest = ccc::manifest::Manifest::from_json(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (bf16, i32) = (TensorDType::Bf16, TensorDType::I32);
    let tensors = |batch: usize, page_rows: usize, table_rows: usize| -> Vec<(&'static str, TensorDType, Vec<usize>)> {
        vec![
            ("x", bf16, vec![batch, 1, 2048]),
            ("block_table", i32, vec![table_rows, 10]),
            ("seq_lens", i32, vec![batch]),
            ("k_cache", bf16, vec![50, page_rows, 2, 128]),
            ("v_cache", bf16, vec![50, page_rows, 2, 128]),
            ("conv_state", bf16, vec![batch, 1280, 2]),
            ("shift_state", bf16, vec![batch, 128]),
        ]
    };
    let plan_of = |list: &[(&'static str, TensorDType, Vec<usize>)]| {
        let supplied: Vec<(&str, TensorDType, &[usize])> = list.iter().map(|(n, d, s)| (*n, *d, s.as_slice())).collect();
        CallPlan::for_supplied(&manifest, EntryPoint::Decode, &supplied, Some(132))
    };
    let plan = plan_of(&tensors(4, 16, 4)).unwrap();
    assert_eq!(plan.env, SizeEnv { batch: 4, seq_len: 1, sms: Some(132), pages: Some(50), blocks: Some(10) });
    assert_eq!(plan.buffer("o_part").unwrap().shape, [4, 1, 8, 128]);
    assert_eq!(plan.buffer("out").unwrap().shape, [4, 1, 2048]);
    let attention = plan.launches.iter().find(|l| l.symbol == "zaya1_decode_attention").unwrap();
    assert_eq!(attention.grid, (1, 2, 4));
    // Pages of 8 rows in a library built for 16.
    let err = plan_of(&tensors(4, 8, 4)).unwrap_err();
    assert!(matches!(&err, RuntimeError::TensorMismatch { tensor, .. } if tensor == "k_cache"), "{err}");
    // A block table for 3 sequences beside 4 tokens.
    let err = plan_of(&tensors(4, 16, 3)).unwrap_err().to_string();
    assert!(err.contains("do not agree on the sizes") && err.contains("block_table [3, 10] as [B, blocks]"), "{err}");
    // The forward's tensor names are not a decode step's.
    let err = CallPlan::for_supplied(&manifest, EntryPoint::Decode, &[("dout", bf16, &[4, 1, 2048])], Some(132)).unwrap_err();
    assert!(err.to_string().contains("the `decode` entry point takes no tensor `dout`"), "{err}");
    // Nothing that says B.
    let err = CallPlan::for_supplied(&manifest, EntryPoint::Decode, &[("k_cache", bf16, &[50, 16, 2, 128])], Some(132)).unwrap_err();
    assert!(err.to_string().contains("the tensors given (`k_cache`) do not determine B"), "{err}");
}

/// A decode step's indices against its pool: a length past the block table, or a page the step
/// would read outside the pool, is named with its index; entries past a sequence's pages are
/// never read and may hold anything.
#[test]
fn a_decode_steps_indices_are_checked_against_the_pool() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/python/fixtures/zaya1_serve_manifest.json");
    let manifest = ccc::manifest::Manifest::from_json(&std::fs::read_to_string(path).unwrap()).unwrap();
    // Two sequences, three pages of 16 each in the table, a pool of 8 pages.
    let table = [4, 7, -1, 0, 1, 2];
    ccc_runtime::plan::check_decode_indices(&manifest, &table, &[20, 48], 8, None).unwrap();
    let err = ccc_runtime::plan::check_decode_indices(&manifest, &table, &[33, 48], 8, None).unwrap_err().to_string();
    assert!(err.contains("block_table[0, 2] = -1: sequence 0 (length 33) reads it, and the pool has pages 0..8"), "{err}");
    let err = ccc_runtime::plan::check_decode_indices(&manifest, &[4, 9, -1, 0, 1, 2], &[20, 48], 8, None).unwrap_err().to_string();
    assert!(err.contains("block_table[0, 1] = 9"), "{err}");
    let err = ccc_runtime::plan::check_decode_indices(&manifest, &table, &[20, 49], 8, None).unwrap_err().to_string();
    assert!(err.contains("seq_lens[1] = 49: a length from 0 to the block table's 3 pages of 16 tokens"), "{err}");
    // A prefill's cu_seqlens: from 0, never decreasing, to the tokens of x; no sequence takes
    // more new tokens than its length; one without new tokens touches no page.
    let check = |cu: &[i32], lens: &[i32], tokens| ccc_runtime::plan::check_decode_indices(&manifest, &table, lens, 8, Some((cu, tokens)));
    check(&[0, 20, 30], &[20, 48], 30).unwrap();
    check(&[0, 0, 30], &[33, 48], 30).unwrap();
    for (cu, lens, tokens, message) in [
        (&[0, 20][..], &[20, 48][..], 20, "cu_seqlens has 2 entries, expected 3"),
        (&[1, 20, 30], &[20, 48], 30, "cu_seqlens[0] = 1, expected 0"),
        (&[0, 20, 10], &[20, 48], 10, "cu_seqlens[2] = 10 is below cu_seqlens[1] = 20"),
        (&[0, 20, 30], &[20, 48], 31, "cu_seqlens[2] = 30, expected the 31 tokens of x"),
        (&[0, 21, 30], &[20, 48], 30, "seq_lens[0] = 20: fewer than the sequence's 21 new tokens"),
    ] {
        let err = check(cu, lens, tokens).unwrap_err().to_string();
        assert!(err.contains(message), "{err}");
    }
}
