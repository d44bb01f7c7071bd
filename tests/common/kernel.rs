//! The kernel IR tests' generator of specs, weights and inputs, and the CPU reference run on
//! them.

use super::rng::XorShift64Star;
use ccc::ir::kernel::interp::Buffers;
use ccc::reference::{ForwardOutputs, Tensor, Weights, forward};
use ccc::spec::*;

/// A random valid spec with head_dim a multiple of 16.
pub fn random_spec(rng: &mut XorShift64Star, index: usize) -> AttentionSpec {
    let d = if rng.range(0, 9) == 0 {
        64
    } else {
        rng.pick(&[16, 32])
    };
    let kv_heads = rng.range(1, 3);
    let groups = rng.range(1, 3);
    let model_dim = d * rng.range(1, 4);
    let mut spec = AttentionSpec::plain(
        &format!("random{index}"),
        model_dim,
        d,
        kv_heads * groups,
        kv_heads,
    );
    spec.qk_conv = (0..rng.range(0, 3))
        .map(|_| ConvStage {
            kind: if rng.coin() {
                ConvKind::Depthwise
            } else {
                ConvKind::PerHead
            },
            width: rng.range(1, 4),
        })
        .collect();
    spec.qk_mean = rng.coin();
    spec.value_shift = rng.range(0, kv_heads);
    if rng.coin() {
        spec.qk_norm = QkNorm::L2;
        spec.key_temperature = rng.pick(&[
            KeyTemperature::None,
            KeyTemperature::Learned,
            KeyTemperature::LearnedExp,
        ]);
        spec.norm_eps = rng.pick(&[1e-12, 1e-6]);
    }
    if rng.range(0, 3) > 0 {
        let rotary_dim = 2 * rng.range(1, d / 2);
        spec.rope = Some(Rope {
            fraction: rotary_dim as f64 / d as f64,
            rotary_dim,
            theta: rng.pick(&[100.0, 10_000.0, 5e6]),
            style: if rng.coin() {
                RopeStyle::Neox
            } else {
                RopeStyle::Interleaved
            },
            yarn: None,
        });
    }
    spec.mask = match rng.range(0, 3) {
        0 => Mask::None,
        1 => Mask::Causal,
        _ => Mask::SlidingWindow {
            window: rng.pick(&[1, 3, 7, 16, 20, 64, 70, 100]),
        },
    };
    if rng.coin() {
        spec.softmax_scale = rng.uniform(0.05, 0.5);
    }
    spec.dtype = if rng.coin() { DType::Bf16 } else { DType::F16 };
    spec.bias = rng.coin();
    spec.validate()
        .expect("the generator only builds valid specs");
    spec
}

pub fn random_weights(spec: &AttentionSpec, rng: &mut XorShift64Star) -> Buffers {
    spec.params()
        .into_iter()
        .map(|p| {
            let n: usize = p.shape.iter().product();
            let (lo, hi) = match p.role {
                ParamRole::KeyTemperature => match spec.key_temperature {
                    // learned_exp: values on both sides of the clamp.
                    KeyTemperature::LearnedExp => (-1.0, 3.0),
                    _ => (0.5, 1.5),
                },
                ParamRole::ConvWeight { .. } => (-0.6, 0.6),
                _ => {
                    let fan_in = *p.shape.last().unwrap_or(&1) as f64;
                    (-1.0 / fan_in.sqrt(), 1.0 / fan_in.sqrt())
                }
            };
            (p.name, (0..n).map(|_| rng.uniform(lo, hi)).collect())
        })
        .collect()
}

pub fn random_input(spec: &AttentionSpec, batch: usize, seq_len: usize, rng: &mut XorShift64Star) -> Vec<f64> {
    (0..batch * seq_len * spec.model_dim)
        .map(|_| rng.uniform(-1.0, 1.0))
        .collect()
}

/// The CPU reference (`ccc::reference::forward`) on the same weights and input.
pub fn reference(
    spec: &AttentionSpec,
    w: &Buffers,
    x: &[f64],
    batch: usize,
    seq_len: usize,
) -> ForwardOutputs {
    let tensors = spec
        .params()
        .into_iter()
        .map(|p| {
            let data = w[&p.name].clone();
            (
                p.name,
                Tensor {
                    shape: p.shape,
                    data,
                },
            )
        })
        .collect();
    let x = Tensor {
        shape: vec![batch, seq_len, spec.model_dim],
        data: x.to_vec(),
    };
    forward(spec, &Weights { tensors }, &x).expect("the reference accepts every valid spec")
}

/// max |a − b| / max(1e-300, max |b|).
pub fn relative_error(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
    a.iter()
        .zip(b)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()))
        / scale
}

/// A weight-gradient GEMM (dW [64, 48] of dy [B, S, 64] and x [B, S, 48]) whose final store of
/// `dw` is an `atomic_add`: dW added to what the buffer holds, as a gradient accumulated across
/// calls. Verified.
pub fn atomic_weight_gradient() -> ccc::ir::kernel::KernelFn {
    use ccc::ir::kernel::{ElemType, Schedule, Stmt, WeightGradient, build_weight_gradient};
    let gradient = WeightGradient {
        name: "dw_add".into(),
        dy: "dy".into(),
        dy_columns: 64,
        dy_rows_before: 0,
        column0: 0,
        width: 64,
        x: "x".into(),
        x_columns: 48,
        x_rows_before: 0,
        x_column0: 0,
        inputs: 48,
        row_shift: 0,
        heads: None,
        output: "dw".into(),
        output_shape: vec![64, 48],
        output_tap: None,
        bias_output: None,
        parts: 1,
        storage: ElemType::Bf16,
    };
    let schedule = Schedule { block_m: 32, block_n: 16, block_k: 16, warps: 2, stages: 2 };
    let mut kernel = build_weight_gradient(&gradient, &schedule).expect("weight gradient");
    let store = kernel.body.iter_mut().find(|stmt| matches!(stmt, Stmt::Store { dst, .. } if dst.param == "dw")).expect("the store of dw");
    let Stmt::Store { src, dst } = store.clone() else { unreachable!() };
    *store = Stmt::AtomicAdd { src, dst };
    kernel.verify().expect("verifies");
    kernel
}
