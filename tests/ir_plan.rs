//! The kernel plan: snapshots for the example layers, the forward kernels, grids and
//! scratch sizes, and the plan verifier on broken plans.

mod common;

use ccc::ir::graph::{ElemType, Layout, TensorType};
use ccc::ir::kernel::ProjectionSegment;
use ccc::ir::plan::{self, Buffer, KernelKind, KernelPlan, PrologueStep};
use ccc::ir::size::{SizeEnv, SizeExpr};
use ccc::spec::{AttentionSpec, ConvKind, EntryPoint, KeyTemperature, RopeStyle};
use common::specs;

fn planned(spec: &AttentionSpec) -> KernelPlan {
    plan::plan_for(spec, EntryPoint::Forward).expect("example specs plan")
}

#[test]
fn snapshots_of_the_example_plans() {
    for spec in specs::all() {
        insta::assert_snapshot!(format!("plan_{}", spec.name), planned(&spec).to_string());
    }
}

fn segment(
    weight: &str,
    output: &str,
    column0: usize,
    width: usize,
    row_shift: usize,
) -> ProjectionSegment {
    ProjectionSegment {
        weight: weight.into(),
        bias: None,
        output: output.into(),
        column0,
        width,
        row_shift,
    }
}

#[test]
fn zaya1_has_a_projection_gemm_and_a_prologue_before_attention() {
    let plan = planned(&specs::zaya1());
    let symbols: Vec<&str> = plan.kernels.iter().map(|k| k.symbol.as_str()).collect();
    assert_eq!(
        symbols,
        [
            "zaya1_qkv_proj",
            "zaya1_qk_prologue",
            "zaya1_attention",
            "zaya1_out_proj"
        ]
    );
    assert!(
        plan.to_string()
            .starts_with("plan @zaya1.forward: 4 kernels\n")
    );
    assert_eq!(
        plan.kernels[0].kind,
        KernelKind::QkvProjection {
            segments: vec![
                segment("qkv_proj.q_proj.weight", "p0", 0, 1024, 0),
                segment("qkv_proj.k_proj.weight", "p0", 1024, 256, 0),
                segment("qkv_proj.v_proj_current.weight", "v", 0, 128, 0),
                segment("qkv_proj.v_proj_delayed.weight", "v", 128, 128, 1),
            ],
        }
    );
    let p0 = TensorType::new(
        vec![SizeExpr::batch(), SizeExpr::seq_len(), 1280usize.into()],
        ElemType::Storage(ccc::spec::DType::Bf16),
        Layout::RowMajor,
    );
    let names = |buffers: &[Buffer]| buffers.iter().map(|b| b.name.clone()).collect::<Vec<_>>();
    assert_eq!(names(&plan.kernels[0].outputs), ["p0", "v"]);
    assert_eq!(plan.kernels[0].outputs[0].ty, p0);
    assert_eq!(plan.kernels[1].inputs[0].ty, p0);
    assert_eq!(names(&plan.kernels[1].outputs), ["q", "k"]);
    assert_eq!(
        plan.kernels[1].kind,
        KernelKind::QkPrologue {
            halo_rows: 2,
            prologue: vec![
                PrologueStep::CausalPad { rows: 2 },
                PrologueStep::Conv {
                    kind: ConvKind::Depthwise,
                    width: 2
                },
                PrologueStep::Conv {
                    kind: ConvKind::PerHead,
                    width: 2
                },
                PrologueStep::QkMean,
                PrologueStep::L2Norm {
                    key_temperature: KeyTemperature::Learned
                },
                PrologueStep::Rope {
                    rotary_dim: 64,
                    theta: 5e6,
                    style: RopeStyle::Neox
                },
            ],
        }
    );
    let env = SizeEnv {
        batch: 2,
        seq_len: 16384,
        sms: None,
        pages: None,
        blocks: None,
    };
    // The GEMM: (1024 + 256 + 256) / 64 column tiles, ceil(S/64) row tiles, B.
    assert_eq!(plan.kernels[0].grid.x, SizeExpr::c(24));
    assert_eq!(plan.kernels[0].grid.blocks().eval(&env), Ok(24 * 256 * 2));
    // Each 64-row prologue tile re-reads 2 halo rows, and a CTA takes two tiles (its per-head
    // weights staged once): ceil(S/124) row groups per head (8 + 2) and sequence.
    assert_eq!(plan.kernels[1].schedule.block_m, 64);
    assert_eq!(plan.kernels[1].grid.blocks().eval(&env), Ok(133 * 10 * 2));
    // Attention: ceil(S/64)·Hq·B blocks.
    assert_eq!(plan.kernels[2].grid.blocks().eval(&env), Ok(256 * 8 * 2));
    assert_eq!(plan.kernels[2].grid.blocks().to_string(), "ceil(S/64)*8*B");
    // The output GEMM: column tiles fastest, then row tiles, then B.
    assert_eq!(plan.kernels[3].grid.x, SizeExpr::c(2048 / 64));
    assert_eq!(plan.kernels[3].grid.y, SizeExpr::seq_len().ceil_div(64));
}

#[test]
fn attention_saves_a_linear_size_log_sum_exp() {
    let plan = planned(&specs::zaya1());
    let attention = &plan.kernels[2];
    let lse = TensorType::new(
        vec![SizeExpr::batch(), 8usize.into(), SizeExpr::seq_len()],
        ElemType::F32,
        Layout::RowMajor,
    );
    assert_eq!(
        attention.scratch,
        [Buffer {
            name: "lse".into(),
            ty: lse
        }]
    );
    let env = SizeEnv {
        batch: 1,
        seq_len: 16384,
        sms: None,
        pages: None,
        blocks: None,
    };
    let elements: u64 = attention.scratch[0]
        .ty
        .shape
        .iter()
        .map(|d| d.eval(&env).unwrap())
        .product();
    assert_eq!(elements, 8 * 16384);
}

#[test]
fn plain_layers_have_three_kernels_and_project_straight_into_q_k_v() {
    for spec in [
        specs::mha(),
        specs::gqa(),
        specs::mqa(),
    ] {
        let plan = planned(&spec);
        let suffixes: Vec<&str> = plan
            .kernels
            .iter()
            .map(|k| k.builder().forward().expect("a forward kernel").suffix())
            .collect();
        assert_eq!(
            suffixes,
            ["qkv_proj", "attention", "out_proj"],
            "{}",
            spec.name
        );
        let KernelKind::QkvProjection { segments } = &plan.kernels[0].kind else {
            panic!("{}: kernel 0 is {:?}", spec.name, plan.kernels[0].kind);
        };
        let outputs: Vec<&str> = segments.iter().map(|s| s.output.as_str()).collect();
        assert_eq!(outputs, ["q", "k", "v"], "{}", spec.name);
        assert!(segments.iter().all(|s| s.row_shift == 0 && s.column0 == 0));
        let written: Vec<&str> = plan.kernels[0]
            .outputs
            .iter()
            .map(|b| b.name.as_str())
            .collect();
        assert_eq!(written, ["q", "k", "v"], "{}", spec.name);
        // One block per 64 columns of [q | k | v], 64 rows and batch element.
        let columns = (spec.query_heads + 2 * spec.kv_heads) * spec.head_dim;
        assert_eq!(plan.kernels[0].grid.x, SizeExpr::c(columns as u64 / 64));
        assert_eq!(plan.kernels[0].grid.y, SizeExpr::seq_len().ceil_div(64));
        assert_eq!(plan.kernels[0].grid.z, SizeExpr::batch());
    }
}

#[test]
fn a_halo_wider_than_any_projection_tile_is_a_clear_error() {
    let mut spec = specs::cca();
    spec.qk_conv = vec![ccc::spec::ConvStage {
        kind: ConvKind::Depthwise,
        width: 200,
    }];
    let error = plan::plan_for(&spec, EntryPoint::Forward).unwrap_err().to_string();
    assert!(error.contains("no default qk_prologue schedule fits"), "{error}");
}

fn verify_message(plan: &KernelPlan) -> String {
    plan.verify().expect_err("the plan is broken").to_string()
}

#[test]
fn plan_verifier_rejects_broken_plans() {
    let good = planned(&specs::zaya1());
    good.verify().unwrap();

    let mut plan = good.clone();
    plan.kernels.swap(1, 2);
    assert_eq!(
        verify_message(&plan),
        "kernel plan: kernel zaya1_attention reads q, which no earlier kernel writes"
    );

    let mut plan = good.clone();
    plan.kernels.swap(0, 1);
    assert_eq!(
        verify_message(&plan),
        "kernel plan: kernel zaya1_qk_prologue reads p0, which no earlier kernel writes"
    );

    let mut plan = good.clone();
    plan.kernels[2].inputs[1].ty.layout = Layout::Bshd { heads: 1 };
    assert_eq!(
        verify_message(&plan),
        "kernel plan: kernel zaya1_attention reads k as [B,S,256]xbf16#bshd(1), but it was \
         written as [B,S,256]xbf16#bshd(2)"
    );

    let mut plan = good.clone();
    plan.kernels[2].scratch[0].ty.shape[1] = SizeExpr::seq_len();
    assert_eq!(
        verify_message(&plan),
        "kernel plan: kernel zaya1_attention: buffer lse is quadratic in S"
    );

    let mut plan = good.clone();
    plan.kernels[3].symbol = "zaya1_o_proj".into();
    assert_eq!(
        verify_message(&plan),
        "kernel plan: kernel zaya1_o_proj should be named zaya1_out_proj"
    );

    let mut plan = good.clone();
    plan.kernels[0].params.push("q_proj.bias".into());
    assert_eq!(
        verify_message(&plan),
        "kernel plan: kernel zaya1_qkv_proj reads undeclared parameter @q_proj.bias"
    );

    let mut plan = good;
    plan.kernels.pop();
    assert_eq!(
        verify_message(&plan),
        "kernel plan: no kernel writes the layer output out"
    );
}

#[test]
fn lowering_an_unfused_graph_is_an_error() {
    let graph = ccc::ir::graph::build(&specs::mha(), EntryPoint::Forward).unwrap();
    let err = plan::lower(&graph).unwrap_err();
    assert_eq!(
        err.to_string(),
        "kernel plan: a linear op belongs to no kernel: run the fusion passes"
    );
}

/// The backward entry point's plan: its kernels in the builders' launch order, reading x, dout
/// and what the forward writes (and nothing it has not), writing dx and every weight's gradient;
/// the printed plan names each kernel's builder.
#[test]
fn the_backward_plan_reads_the_forwards_buffers_and_writes_every_gradient() {
    use ccc::ir::kernel::{BackwardKernel, backward_kernels};
    use ccc::spec::EntryPoint;
    // A layer whose convolution gradients have CTAs enough on their own: written whole, no
    // sum of parts.
    let wide = specs::zaya1_like("wide", 16384, 128, 128, 4);
    for spec in [specs::zaya1(), specs::mha(), specs::gqa(), wide] {
        let forward = planned(&spec);
        let backward = ccc::ir::plan::plan_for(&spec, EntryPoint::Backward).unwrap();
        let symbols: Vec<String> = backward.kernels.iter().map(|k| k.symbol.clone()).collect();
        let built: Vec<String> = backward_kernels(&spec).unwrap().into_iter().map(|k| k.name).collect();
        assert_eq!(symbols, built, "{}", spec.name);
        assert_eq!(backward.kernels.len(), BackwardKernel::launched_by(&spec).len());
        let forward_writes: Vec<&str> = forward
            .kernels
            .iter()
            .flat_map(|k| k.outputs.iter().chain(&k.scratch))
            .map(|b| b.name.as_str())
            .collect();
        for input in &backward.inputs {
            assert!(
                ["x", "dout"].contains(&input.name.as_str()) || forward_writes.contains(&input.name.as_str()),
                "{}: the backward reads {}, which the forward does not write",
                spec.name,
                input.name
            );
        }
        let mut outputs: Vec<String> = backward.outputs.iter().map(|b| b.name.clone()).collect();
        let mut expected: Vec<String> = spec.params().into_iter().map(|p| format!("grad.{}", p.name)).collect();
        expected.push("dx".into());
        outputs.sort();
        expected.sort();
        assert_eq!(outputs, expected, "{}", spec.name);
        for param in spec.params() {
            let gradient = backward.outputs.iter().find(|b| b.name == format!("grad.{}", param.name)).unwrap();
            let shape: Vec<SizeExpr> = param.shape.iter().map(|&d| SizeExpr::from(d)).collect();
            assert_eq!(gradient.ty.shape, shape, "{}: grad.{} has the weight's shape", spec.name, param.name);
        }
        let text = backward.to_string();
        assert!(text.contains("backward attention_bwd_one_pass"), "{text}");
        assert!(text.contains("dq_accum : [B,S,") && text.contains("xf32"), "{text}");
        let deterministic = ccc::ir::plan::plan_for(&AttentionSpec { deterministic: true, ..spec.clone() }, EntryPoint::Backward).unwrap();
        let text = deterministic.to_string();
        assert!(text.contains("backward attention_bwd_dkdv") && !text.contains("dq_accum"), "{text}");
    }
}
