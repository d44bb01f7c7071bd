//! Kernel IR: the interpreter against the CPU reference (`ccc::reference`), the
//! printed IR of the forward kernels (insta), and the verifier on broken functions.

mod common;

use ccc::ir::kernel::interp::{ForwardOutputs, Rounding, launch_sizes, run_forward, run_forward_with};
use ccc::ir::kernel::{ForwardKernel, Schedule, build_forward, default_schedule};
use ccc::spec::*;
use common::kernel::*;
use common::rng::XorShift64Star;
use common::specs::zaya1_like;

const TOLERANCE: f64 = 1e-10;

fn check_against_reference(
    spec: &AttentionSpec,
    outputs: &ForwardOutputs,
    reference: &ccc::reference::ForwardOutputs,
    what: &str,
) {
    for (name, got, want) in [
        ("q", &outputs.q, &reference.q.data),
        ("k", &outputs.k, &reference.k.data),
        ("v", &outputs.v, &reference.v.data),
        ("o", &outputs.o, &reference.attn.data),
        ("lse", &outputs.lse, &reference.lse.data),
        ("out", &outputs.out, &reference.out.data),
    ] {
        let err = relative_error(got, want);
        assert!(
            err <= TOLERANCE,
            "{what}: {name} relative error {err:e} > {TOLERANCE:e} for {spec:#?}"
        );
    }
}

/// Small tiles: more tiles per sequence, so tile edges, halos, block skipping and every phase of
/// the copy ring all happen.
fn small_schedule(spec: &AttentionSpec, stages: u32, which: ForwardKernel) -> Schedule {
    let d = spec.head_dim as u32;
    let (block_n, block_k, stages) = match which {
        ForwardKernel::QkvProjection => (16, 16, stages),
        // The prologue streams nothing: one buffer.
        ForwardKernel::QkPrologue => (d, 16, 1),
        ForwardKernel::Attention => (16, d, stages),
        ForwardKernel::OutputProjection => (16, 16, stages),
    };
    Schedule {
        block_m: 16,
        block_n,
        block_k,
        warps: 1,
        stages,
    }
}

#[test]
fn zaya1_like_small_specs_match_the_reference() {
    let specs = [
        zaya1_like("zaya_small", 64, 16, 4, 2),
        zaya1_like("zaya_d32", 128, 32, 8, 2),
        AttentionSpec {
            value_shift: 2,
            ..zaya1_like("zaya_all_shifted", 64, 16, 4, 2)
        },
        AttentionSpec {
            bias: true,
            key_temperature: KeyTemperature::LearnedExp,
            ..zaya1_like("zaya_bias", 96, 32, 2, 1)
        },
    ];
    let mut rng = XorShift64Star::new(7);
    for spec in &specs {
        let weights = random_weights(spec, &mut rng);
        for (batch, seq_len) in [(1, 1), (2, 17), (1, 65), (2, 129)] {
            let x = random_input(spec, batch, seq_len, &mut rng);
            let reference = reference(spec, &weights, &x, batch, seq_len);
            let outputs = run_forward(spec, &weights, &x, batch, seq_len).unwrap();
            check_against_reference(
                spec,
                &outputs,
                &reference,
                &format!("{} B={batch} S={seq_len}", spec.name),
            );
            let small = run_forward_with(
                spec,
                &weights,
                &x,
                batch,
                seq_len,
                &|which| small_schedule(spec, 3, which),
                Rounding::Exact,
            )
            .unwrap();
            check_against_reference(
                spec,
                &small,
                &reference,
                &format!("{} small tiles", spec.name),
            );
        }
    }
}

/// Random specs: `count` of them from `seed`, each at one (B, S), alternating default and small
/// tile schedules (copy rings of 1 or 2 stages).
fn random_specs_match(seed: u64, count: usize) {
    let mut rng = XorShift64Star::new(seed);
    for index in 0..count {
        let spec = random_spec(&mut rng, index);
        let weights = random_weights(&spec, &mut rng);
        let batch = rng.range(1, 2);
        let seq_len = rng.pick(&[1, 17, 63, 64, 65, 129]);
        let x = random_input(&spec, batch, seq_len, &mut rng);
        let reference = reference(&spec, &weights, &x, batch, seq_len);
        let outputs = if index % 3 == 0 {
            run_forward(&spec, &weights, &x, batch, seq_len)
        } else {
            run_forward_with(
                &spec,
                &weights,
                &x,
                batch,
                seq_len,
                &|which| small_schedule(&spec, index as u32 % 3, which),
                Rounding::Exact,
            )
        }
        .unwrap_or_else(|e| panic!("{e}\n{spec:#?}"));
        check_against_reference(
            &spec,
            &outputs,
            &reference,
            &format!("seed {seed} spec {index} B={batch} S={seq_len}"),
        );
    }
}

#[test]
fn random_specs_match_the_reference_part_1() {
    random_specs_match(1, 70);
}

#[test]
fn random_specs_match_the_reference_part_2() {
    random_specs_match(2, 70);
}

#[test]
fn random_specs_match_the_reference_part_3() {
    random_specs_match(3, 70);
}

#[test]
fn storage_rounding_stays_within_bf16_error() {
    for dtype in [DType::Bf16, DType::F16] {
        storage_rounding_error_is_that_of(AttentionSpec {
            dtype,
            ..zaya1_like("zaya_small", 64, 16, 4, 2)
        });
    }
}

fn storage_rounding_error_is_that_of(spec: AttentionSpec) {
    let mut rng = XorShift64Star::new(11);
    let weights = random_weights(&spec, &mut rng);
    let x = random_input(&spec, 1, 65, &mut rng);
    let reference = reference(&spec, &weights, &x, 1, 65);
    let default = |which| default_schedule(&spec, which).unwrap();
    let rounded =
        run_forward_with(&spec, &weights, &x, 1, 65, &default, Rounding::Storage).unwrap();
    let err = relative_error(&rounded.out, &reference.out.data);
    // bf16 keeps 8 significant bits, f16 11: a few roundings deep the error is ~1e-2 (bf16) or
    // ~1e-3 (f16), far from exact and far from wrong.
    let (low, high) = match spec.dtype {
        DType::Bf16 => (1e-4, 5e-2),
        DType::F16 => (1e-5, 5e-3),
    };
    assert!(
        err > low && err < high,
        "{:?}: rounded out error {err:e}",
        spec.dtype
    );
}

#[test]
fn default_schedules_fit_head_dims_up_to_256() {
    for d in [16, 32, 64, 128, 256] {
        let spec = AttentionSpec {
            qk_conv: vec![
                ConvStage {
                    kind: ConvKind::Depthwise,
                    width: 4,
                },
                ConvStage {
                    kind: ConvKind::PerHead,
                    width: 4,
                },
                ConvStage {
                    kind: ConvKind::PerHead,
                    width: 3,
                },
            ],
            ..zaya1_like("wide", 2048, d, 8, 2)
        };
        for which in ForwardKernel::launched_by(&spec) {
            let schedule =
                default_schedule(&spec, which).unwrap_or_else(|e| panic!("d = {d}: {e}"));
            let kernel = build_forward(&spec, which, &schedule).unwrap();
            assert!(
                kernel.shared_bytes() <= 227 * 1024,
                "d = {d}: {} bytes",
                kernel.shared_bytes()
            );
        }
    }
}

#[test]
fn schedules_that_do_not_fit_are_rejected() {
    let spec = zaya1_like("zaya1", 2048, 256, 8, 2);
    let huge = Schedule {
        block_m: 256,
        block_n: 256,
        block_k: 64,
        warps: 4,
        stages: 1,
    };
    let err = build_forward(&spec, ForwardKernel::QkPrologue, &huge).unwrap_err();
    assert!(err.contains("exceeds the 232448-byte limit"), "{err}");
    let halo_only = Schedule {
        block_m: 16,
        block_n: 256,
        block_k: 32,
        warps: 1,
        stages: 1,
    };
    let deep = AttentionSpec {
        qk_conv: vec![ConvStage {
            kind: ConvKind::Depthwise,
            width: 17,
        }],
        ..spec.clone()
    };
    let err = build_forward(&deep, ForwardKernel::QkPrologue, &halo_only).unwrap_err();
    assert!(err.contains("no output rows"), "{err}");
    let straddling = Schedule {
        block_m: 64,
        block_n: 96,
        block_k: 32,
        warps: 4,
        stages: 2,
    };
    let err = build_forward(&spec, ForwardKernel::QkvProjection, &straddling).unwrap_err();
    assert!(err.contains("block_n must divide head_dim"), "{err}");
}

#[test]
fn only_specs_with_a_qk_step_launch_a_prologue() {
    let plain = AttentionSpec::plain("mha", 256, 64, 4, 4);
    assert_eq!(
        ForwardKernel::launched_by(&plain),
        [
            ForwardKernel::QkvProjection,
            ForwardKernel::Attention,
            ForwardKernel::OutputProjection
        ]
    );
    let schedule = default_schedule(&plain, ForwardKernel::QkvProjection).unwrap();
    let err = build_forward(&plain, ForwardKernel::QkPrologue, &schedule).unwrap_err();
    assert!(err.contains("launches no qk_prologue"), "{err}");
    let with_rope = AttentionSpec {
        rope: Some(Rope {
            fraction: 1.0,
            rotary_dim: 64,
            theta: 10000.0,
            style: RopeStyle::Neox,
            yarn: None,
        }),
        ..plain
    };
    assert_eq!(
        ForwardKernel::launched_by(&with_rope)[..2],
        [ForwardKernel::QkvProjection, ForwardKernel::QkPrologue]
    );
}

fn zaya1() -> AttentionSpec {
    zaya1_like("zaya1", 2048, 128, 8, 2)
}

fn printed(spec: &AttentionSpec, which: ForwardKernel) -> String {
    let schedule = default_schedule(spec, which).unwrap();
    build_forward(spec, which, &schedule).unwrap().to_string()
}

#[test]
fn forward_kernels_are_named_after_the_spec_in_run_order() {
    let names: Vec<String> = ccc::ir::kernel::forward_kernels(&zaya1())
        .unwrap()
        .into_iter()
        .map(|k| k.name)
        .collect();
    assert_eq!(
        names,
        [
            "zaya1_qkv_proj",
            "zaya1_qk_prologue",
            "zaya1_attention",
            "zaya1_out_proj"
        ]
    );
}

#[test]
fn zaya1_kernels_print_stably() {
    let spec = zaya1();
    insta::assert_snapshot!(
        "zaya1_qkv_proj",
        printed(&spec, ForwardKernel::QkvProjection)
    );
    insta::assert_snapshot!(
        "zaya1_qk_prologue",
        printed(&spec, ForwardKernel::QkPrologue)
    );
    insta::assert_snapshot!("zaya1_attention", printed(&spec, ForwardKernel::Attention));
    insta::assert_snapshot!(
        "zaya1_out_proj",
        printed(&spec, ForwardKernel::OutputProjection)
    );
}

#[test]
fn mha_kernels_print_stably() {
    let spec = AttentionSpec::plain("mha", 2048, 128, 16, 16);
    insta::assert_snapshot!("mha_qkv_proj", printed(&spec, ForwardKernel::QkvProjection));
    insta::assert_snapshot!("mha_attention", printed(&spec, ForwardKernel::Attention));
    insta::assert_snapshot!(
        "mha_out_proj",
        printed(&spec, ForwardKernel::OutputProjection)
    );
}

#[test]
fn the_interpreter_reports_bad_bindings() {
    let spec = AttentionSpec::plain("mha", 64, 16, 4, 4);
    let schedule = default_schedule(&spec, ForwardKernel::OutputProjection).unwrap();
    let kernel = build_forward(&spec, ForwardKernel::OutputProjection, &schedule).unwrap();
    let mut buffers = ccc::ir::kernel::interp::Buffers::new();
    buffers.insert("o".into(), vec![0.0; 2 * 5 * 64]);
    buffers.insert("o_proj.weight".into(), vec![0.0; 64 * 64]);
    let err = ccc::ir::kernel::interp::run_kernel(&kernel, &mut buffers, launch_sizes(2, 5), Rounding::Exact)
        .unwrap_err();
    assert_eq!(err, "mha_out_proj: no buffer bound to out");
    buffers.insert("out".into(), vec![0.0; 7]);
    let err = ccc::ir::kernel::interp::run_kernel(&kernel, &mut buffers, launch_sizes(2, 5), Rounding::Exact)
        .unwrap_err();
    assert_eq!(
        err,
        "mha_out_proj: buffer out has 7 values, its shape needs 640"
    );
    let mut weights = random_weights(&spec, &mut XorShift64Star::new(3));
    weights.remove("o_proj.weight");
    let x = vec![0.0; 64];
    assert_eq!(
        run_forward(&spec, &weights, &x, 1, 1).unwrap_err(),
        "mha_out_proj: no buffer bound to o_proj.weight"
    );
}

#[test]
fn head_dims_mma_cannot_tile_are_errors_not_panics() {
    for d in [8, 24, 40] {
        let spec = zaya1_like("odd", 4 * d, d, 2, 1);
        let err = ccc::ir::kernel::forward_kernels(&spec).unwrap_err();
        assert!(err.contains("no default"), "d = {d}: {err}");
    }
}
