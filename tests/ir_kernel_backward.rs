//! The attention backward kernels (kernel IR, interpreted in f64) against the reference's
//! hand-derived attention backward, on random specs and awkward lengths.

mod common;

use ccc::ir::kernel::interp::{Buffers, Rounding, launch_sizes, run_kernel};
use ccc::ir::kernel::{AttentionBackwardKernel, Schedule, build_attention_backward, default_attention_backward_schedule};
use ccc::reference::{Tensor, attention_backward};
use ccc::spec::*;
use common::kernel::*;
use common::rng::XorShift64Star;
use common::specs::zaya1_like;

/// Exact mode: the kernels and the reference differ only in the order of f64 sums.
const TOLERANCE: f64 = 1e-10;

/// Runs the three kernels on the forward's q, k, v, o and lse with a random dO and compares dq,
/// dk and dv with the reference.
fn check(spec: &AttentionSpec, batch: usize, seq_len: usize, schedule_of: &dyn Fn(AttentionBackwardKernel) -> Schedule, rng: &mut XorShift64Star, what: &str) {
    let weights = random_weights(spec, rng);
    let x = random_input(spec, batch, seq_len, rng);
    let forward = reference(spec, &weights, &x, batch, seq_len);
    let d_o: Vec<f64> = (0..forward.attn.data.len()).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let d_o_tensor = Tensor { shape: forward.attn.shape.clone(), data: d_o.clone() };
    let (dq, dk, dv) = attention_backward(spec, &forward.q, &forward.k, &forward.v, &forward.attn, &forward.lse, &d_o_tensor)
        .expect("reference attention backward");
    let mut buffers: Buffers = [
        ("q", forward.q.data.clone()),
        ("k", forward.k.data.clone()),
        ("v", forward.v.data.clone()),
        ("o", forward.attn.data.clone()),
        ("lse", forward.lse.data.clone()),
        ("do", d_o),
        // Poisoned: every value the kernels should write is overwritten.
        ("delta", vec![f64::NAN; forward.lse.data.len()]),
        ("dq", vec![f64::NAN; dq.data.len()]),
        ("dk", vec![f64::NAN; dk.data.len()]),
        ("dv", vec![f64::NAN; dv.data.len()]),
    ]
    .into_iter()
    .map(|(name, data)| (name.to_string(), data))
    .collect();
    for which in AttentionBackwardKernel::LAUNCH_ORDER {
        let kernel = build_attention_backward(spec, which, &schedule_of(which)).unwrap_or_else(|e| panic!("{what}: {e}"));
        run_kernel(&kernel, &mut buffers, launch_sizes(batch, seq_len), Rounding::Exact).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    for (name, want) in [("dq", &dq), ("dk", &dk), ("dv", &dv)] {
        let error = relative_error(&buffers[name], &want.data);
        assert!(error <= TOLERANCE, "{what}: {name} relative error {error:e} > {TOLERANCE:e}\n{spec:#?}");
    }
}

/// 16-row tiles: many tiles per sequence, so causal and window tile ranges, partial last tiles
/// and every phase of the copy ring are exercised.
fn small(spec: &AttentionSpec, stages: u32) -> Schedule {
    Schedule { block_m: 16, block_n: 16, block_k: spec.head_dim as u32, warps: 1, stages }
}

#[test]
fn attention_backward_kernels_match_the_reference_on_cca_layers() {
    let specs = [
        zaya1_like("zaya_small", 64, 16, 4, 2),
        AttentionSpec { mask: Mask::SlidingWindow { window: 20 }, ..zaya1_like("zaya_window", 64, 32, 4, 1) },
        AttentionSpec { mask: Mask::None, ..zaya1_like("zaya_full", 64, 16, 2, 2) },
    ];
    let mut rng = XorShift64Star::new(11);
    for spec in &specs {
        for (batch, seq_len) in [(1, 1), (2, 17), (1, 65), (2, 129)] {
            let what = format!("{} B={batch} S={seq_len}", spec.name);
            check(spec, batch, seq_len, &|which| default_attention_backward_schedule(spec, which).unwrap(), &mut rng, &what);
            check(spec, batch, seq_len, &|_| small(spec, 2), &mut rng, &format!("{what} small tiles"));
        }
    }
}

#[test]
fn attention_backward_kernels_match_the_reference_on_random_specs() {
    let mut rng = XorShift64Star::new(0xB4C2);
    for index in 0..40 {
        let spec = random_spec(&mut rng, index);
        let batch = rng.range(1, 2);
        let seq_len = rng.pick(&[1, 17, 63, 64, 65, 129]);
        let stages = 1 + index as u32 % 3;
        let what = format!("spec {index} B={batch} S={seq_len}");
        if index % 2 == 0 {
            check(&spec, batch, seq_len, &|which| default_attention_backward_schedule(&spec, which).unwrap(), &mut rng, &what);
        } else {
            check(&spec, batch, seq_len, &|_| small(&spec, stages), &mut rng, &format!("{what} small tiles, {stages} stages"));
        }
    }
}

#[test]
fn attention_backward_rejects_bad_schedules() {
    let spec = zaya1_like("zaya_small", 64, 16, 4, 2);
    let wrong_depth = Schedule { block_k: 32, ..small(&spec, 1) };
    let error = build_attention_backward(&spec, AttentionBackwardKernel::Dq, &wrong_depth).unwrap_err();
    assert!(error.contains("block_k must be head_dim 16"), "{error}");
    let ragged = Schedule { block_m: 24, ..small(&spec, 1) };
    let error = build_attention_backward(&spec, AttentionBackwardKernel::DkDv, &ragged).unwrap_err();
    assert!(error.contains("do not split into 16-row bands"), "{error}");
}
