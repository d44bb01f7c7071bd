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

/// `got` within TOLERANCE of `want` relative to its largest value (at least 1e-4: a gradient
/// that is zero in exact arithmetic, like a key bias's under softmax, is rounding noise on both
/// sides), and every value written: `relative_error` alone would pass over a NaN left in a
/// poisoned buffer.
fn assert_close(got: &[f64], want: &[f64], what: &str) {
    if let Some(index) = got.iter().position(|v| !v.is_finite()) {
        panic!("{what}: value {index} is {} (never written?)", got[index]);
    }
    assert_eq!(got.len(), want.len(), "{what}");
    let scale = want.iter().fold(1e-4f64, |m, v| m.max(v.abs()));
    let error = got.iter().zip(want).fold(0.0f64, |m, (a, b)| m.max((a - b).abs())) / scale;
    assert!(error <= TOLERANCE, "{what}: relative error {error:e} > {TOLERANCE:e}");
}

/// Runs the three kernels of one form (`AttentionBackwardKernel::ONE_PASS` or `TWO_PASS`) on the
/// forward's q, k, v, o and lse with a random dO and compares dq, dk and dv with the reference.
fn check(
    spec: &AttentionSpec,
    batch: usize,
    seq_len: usize,
    form: [AttentionBackwardKernel; 3],
    schedule_of: &dyn Fn(AttentionBackwardKernel) -> Schedule,
    rng: &mut XorShift64Star,
    what: &str,
) {
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
        ("dq_accum", vec![f64::NAN; dq.data.len()]),
        ("dk_accum", vec![f64::NAN; dk.data.len()]),
        ("dv_accum", vec![f64::NAN; dv.data.len()]),
        ("dk", vec![f64::NAN; dk.data.len()]),
        ("dv", vec![f64::NAN; dv.data.len()]),
    ]
    .into_iter()
    .map(|(name, data)| (name.to_string(), data))
    .collect();
    for which in form {
        let kernel = build_attention_backward(spec, which, &schedule_of(which)).unwrap_or_else(|e| panic!("{what}: {e}"));
        run_kernel(&kernel, &mut buffers, launch_sizes(batch, seq_len), Rounding::Exact).unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    for (name, want) in [("dq", &dq), ("dk", &dk), ("dv", &dv)] {
        assert_close(&buffers[name], &want.data, &format!("{what}: {name} of {spec:#?}"));
    }
}

const ONE_PASS: [AttentionBackwardKernel; 3] = AttentionBackwardKernel::ONE_PASS;
const TWO_PASS: [AttentionBackwardKernel; 3] = AttentionBackwardKernel::TWO_PASS;

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
            check(spec, batch, seq_len, TWO_PASS, &|which| default_attention_backward_schedule(spec, which).unwrap(), &mut rng, &what);
            check(spec, batch, seq_len, TWO_PASS, &|_| small(spec, 2), &mut rng, &format!("{what} small tiles"));
        }
    }
}

/// Head widths in whole 128-byte panels with 64-row tiles on 4 warps: every GEMM is a wgmma
/// with swizzled operands (the GPU's path; mma.sync where the tiles do not allow it).
#[test]
fn wgmma_attention_backward_kernels_match_the_reference() {
    let specs = [
        zaya1_like("zaya_d64", 256, 64, 4, 2),
        AttentionSpec { mask: Mask::SlidingWindow { window: 70 }, ..zaya1_like("zaya_d128_window", 256, 128, 2, 1) },
        AttentionSpec { mask: Mask::None, ..zaya1_like("zaya_d128_full", 256, 128, 2, 2) },
    ];
    let mut rng = XorShift64Star::new(12);
    for spec in &specs {
        for which in [AttentionBackwardKernel::Dq, AttentionBackwardKernel::DkDv] {
            let kernel = build_attention_backward(spec, which, &default_attention_backward_schedule(spec, which).unwrap()).unwrap();
            let swizzled = kernel.tiles.iter().filter(|tile| tile.ty.layout == ccc::ir::kernel::Layout::Swizzled128B).count();
            assert_eq!(swizzled, 4, "{} {}: every shared operand swizzled for wgmma", spec.name, which.suffix());
        }
        for (batch, seq_len) in [(1, 1), (2, 17), (1, 129)] {
            let what = format!("{} B={batch} S={seq_len}", spec.name);
            check(spec, batch, seq_len, TWO_PASS, &|which| default_attention_backward_schedule(spec, which).unwrap(), &mut rng, &what);
        }
    }
}

/// The one-pass form (warp-specialized, dQ by atomics) on the widths it takes, with one and two
/// consumer warpgroups, groups of 1 to 4 query heads (several: dK and dV by atomics too) and
/// every mask: key tiles that end past S, causal tiles that start mid-way through a query step,
/// windows shorter than a tile, and windows long enough for steps without the mask between
/// masked ones.
#[test]
fn one_pass_attention_backward_matches_the_reference() {
    let specs = [
        zaya1_like("zaya_d128", 256, 128, 4, 2),
        AttentionSpec { mask: Mask::SlidingWindow { window: 50 }, ..zaya1_like("zaya_d64_window", 128, 64, 2, 2) },
        AttentionSpec { mask: Mask::SlidingWindow { window: 130 }, ..zaya1_like("zaya_d64_long_window", 128, 64, 2, 1) },
        AttentionSpec { mask: Mask::None, ..zaya1_like("zaya_d64_full", 128, 64, 4, 1) },
    ];
    let mut rng = XorShift64Star::new(14);
    for spec in &specs {
        assert_eq!(AttentionBackwardKernel::launched_by(spec), ONE_PASS, "{}", spec.name);
        let deterministic = AttentionSpec { deterministic: true, ..spec.clone() };
        assert_eq!(AttentionBackwardKernel::launched_by(&deterministic), TWO_PASS, "{}: deterministic = true", spec.name);
        for block_n in [128, 64] {
            let one_pass = Schedule { block_m: 64, block_n, block_k: spec.head_dim as u32, warps: 4 + block_n / 16, stages: 2 };
            let schedule_of = |which| match which {
                AttentionBackwardKernel::OnePass => one_pass,
                other => default_attention_backward_schedule(spec, other).unwrap(),
            };
            for (batch, seq_len) in [(1, 1), (2, 17), (1, 200)] {
                let what = format!("{} B={batch} S={seq_len} block_n {block_n}", spec.name);
                check(spec, batch, seq_len, ONE_PASS, &schedule_of, &mut rng, &what);
            }
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
            check(&spec, batch, seq_len, TWO_PASS, &|which| default_attention_backward_schedule(&spec, which).unwrap(), &mut rng, &what);
        } else {
            check(&spec, batch, seq_len, TWO_PASS, &|_| small(&spec, stages), &mut rng, &format!("{what} small tiles, {stages} stages"));
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

mod gemm {
    use super::*;
    use ccc::ir::kernel::{
        ElemType, GradientTerm, KernelFn, InputGradient, SummedRows, TokenSum, WeightGradient, build_input_gradient, build_token_sum, build_weight_gradient,
        parts_name,
    };

    fn random(rng: &mut XorShift64Star, len: usize) -> Vec<f64> {
        (0..len).map(|_| rng.uniform(-1.0, 1.0)).collect()
    }

    fn schedule(block_m: u32, block_n: u32, block_k: u32, warps: u32, stages: u32) -> Schedule {
        Schedule { block_m, block_n, block_k, warps, stages }
    }

    /// The terms of dx through a q/k/v-like projection: q and k segments of dp0 [.., q + k], and
    /// the delayed value heads' segment of dv [.., 2v], read one token later.
    fn qkv_terms(q: usize, k: usize, v: usize) -> (Vec<GradientTerm>, [(&'static str, usize); 2]) {
        let term = |dy: &str, dy_columns, column0, width, weight: &str, row_shift| GradientTerm {
            dy: dy.into(),
            dy_columns,
            column0,
            width,
            weight: weight.into(),
            row_shift,
        };
        let terms = vec![term("dp0", q + k, 0, q, "w_q", 0), term("dp0", q + k, q, k, "w_k", 0), term("dv", 2 * v, v, v, "w_v2", 1)];
        (terms, [("dp0", q + k), ("dv", 2 * v)])
    }

    /// dx of a q/k/v-like projection: three segments of two gradient tensors, the last read one
    /// token later, against the sum written out.
    #[test]
    fn input_gradient_matches_the_sum_of_products() {
        let (terms, gradients) = qkv_terms(64, 32, 32);
        let schedules = [(1, 1, schedule(16, 16, 16, 1, 1)), (3, 17, schedule(16, 32, 32, 2, 2)), (2, 65, schedule(64, 16, 16, 4, 3))];
        check_input_gradient(&terms, 48, &gradients, &schedules, false);
    }

    /// The same on wgmma: 64-column chunks, whole warpgroups, 128 input columns per tile over
    /// 160 inputs (the last tile half outside).
    #[test]
    fn wgmma_input_gradient_matches_the_sum_of_products() {
        let (terms, gradients) = qkv_terms(128, 64, 64);
        let schedules = [(1, 1, schedule(64, 128, 64, 4, 3)), (2, 65, schedule(128, 128, 64, 8, 3)), (1, 200, schedule(64, 64, 64, 4, 2))];
        check_input_gradient(&terms, 160, &gradients, &schedules, true);
    }

    /// Runs the input gradient of `terms` on random operands for each (B, S, schedule) and
    /// compares it with the sum written out; `swizzled`: its shared tiles must be wgmma's.
    fn check_input_gradient(terms: &[GradientTerm], inputs: usize, gradients: &[(&str, usize)], schedules: &[(usize, usize, Schedule)], swizzled: bool) {
        let gradient = InputGradient { name: "dx".into(), terms: terms.to_vec(), inputs, output: "dx".into(), storage: ElemType::Bf16 };
        let mut rng = XorShift64Star::new(5);
        for (batch, seq_len, sched) in schedules.iter().cloned() {
            let mut buffers: Buffers = Buffers::new();
            for (name, columns) in gradients {
                buffers.insert(name.to_string(), random(&mut rng, batch * seq_len * columns));
            }
            for term in terms {
                buffers.insert(term.weight.clone(), random(&mut rng, term.width * inputs));
            }
            buffers.insert("dx".into(), vec![f64::NAN; batch * seq_len * inputs]);
            let kernel = build_input_gradient(&gradient, &sched).unwrap();
            let swizzled_tiles = kernel.tiles.iter().filter(|tile| tile.ty.layout == ccc::ir::kernel::Layout::Swizzled128B).count();
            assert_eq!(swizzled_tiles, if swizzled { 2 } else { 0 }, "{sched:?}");
            run_kernel(&kernel, &mut buffers, launch_sizes(batch, seq_len), Rounding::Exact).unwrap();
            let mut want = vec![0.0; batch * seq_len * inputs];
            for b in 0..batch {
                for t in 0..seq_len {
                    for term in terms {
                        let source = t + term.row_shift;
                        if source >= seq_len {
                            continue;
                        }
                        for o in 0..term.width {
                            let g = buffers[&term.dy][(b * seq_len + source) * term.dy_columns + term.column0 + o];
                            for i in 0..inputs {
                                want[(b * seq_len + t) * inputs + i] += g * buffers[&term.weight][o * inputs + i];
                            }
                        }
                    }
                }
            }
            assert_close(&buffers["dx"], &want, &format!("B={batch} S={seq_len} {sched:?}"));
        }
    }

    /// Builds `gradient` with `sched`, runs it on random dy and x, and compares dW (and db) summed
    /// over every token of the batch, from the gradient itself or from its parts' rows, with the
    /// sums written out. Returns the kernel.
    fn check_weight_gradient(gradient: &WeightGradient, sched: &Schedule, batch: usize, seq_len: usize, rng: &mut XorShift64Star) -> KernelFn {
        let (inputs, columns, width, parts) = (gradient.inputs, gradient.dy_columns, gradient.width, gradient.parts);
        let mut buffers: Buffers = Buffers::new();
        buffers.insert("dy".into(), random(rng, batch * seq_len * columns));
        buffers.insert("x".into(), random(rng, batch * seq_len * inputs));
        // In parts, the kernel writes each part's row of the parts buffers instead.
        let written = |name: &str| if parts > 1 { parts_name(name) } else { name.to_string() };
        buffers.insert(written("dw"), vec![f64::NAN; parts * width * inputs]);
        if gradient.bias_output.is_some() {
            buffers.insert(written("db"), vec![f64::NAN; parts * width]);
        }
        let kernel = build_weight_gradient(gradient, sched).unwrap();
        run_kernel(&kernel, &mut buffers, launch_sizes(batch, seq_len), Rounding::Exact).unwrap();
        let (mut dw, mut db) = (vec![0.0; width * inputs], vec![0.0; width]);
        for b in 0..batch {
            for t in 0..seq_len {
                for o in 0..width {
                    let g = buffers["dy"][(b * seq_len + t) * columns + gradient.column0 + o];
                    db[o] += g;
                    if t >= gradient.row_shift {
                        for i in 0..inputs {
                            dw[o * inputs + i] += g * buffers["x"][(b * seq_len + t - gradient.row_shift) * inputs + i];
                        }
                    }
                }
            }
        }
        let mut checked = vec![("dw", &dw)];
        if gradient.bias_output.is_some() {
            checked.push(("db", &db));
        }
        for (name, want) in checked {
            let written = &buffers[&written(name)];
            let summed: Vec<f64> = (0..want.len()).map(|i| (0..parts).map(|p| written[p * want.len() + i]).sum()).collect();
            let what = format!("{name} B={batch} S={seq_len} shift {} {sched:?} in {parts} parts", gradient.row_shift);
            assert_close(&summed, want, &what);
        }
        kernel
    }

    /// A weight gradient of columns `column0 .. column0 + width` of a [B, S, columns] dy against
    /// x [B, S, inputs] `row_shift` tokens earlier, with or without a bias, in `parts`.
    fn plain_gradient(columns: usize, column0: usize, width: usize, inputs: usize, row_shift: usize, bias: bool, parts: usize) -> WeightGradient {
        WeightGradient {
            name: "dw".into(),
            dy: "dy".into(),
            dy_columns: columns,
            column0,
            width,
            x: "x".into(),
            x_columns: inputs,
            x_rows_before: 0,
            x_column0: 0,
            inputs,
            row_shift,
            heads: None,
            dy_rows_before: 0,
            output_tap: None,
            output: "dw".into(),
            output_shape: vec![width, inputs],
            bias_output: bias.then(|| "db".into()),
            parts,
            storage: ElemType::Bf16,
        }
    }

    /// dW and db of a segment of dy against x one token earlier, summed over every token of the
    /// batch (in one CTA per tile, or in parts whose rows add up to the sum), against the sums
    /// written out.
    #[test]
    fn weight_gradient_matches_the_sum_over_tokens() {
        let mut rng = XorShift64Star::new(9);
        for (batch, seq_len, row_shift, sched, parts) in [
            (1, 1, 0, schedule(16, 16, 16, 1, 1), 1),
            (3, 17, 1, schedule(32, 16, 16, 2, 2), 1),
            (2, 65, 0, schedule(32, 32, 32, 2, 3), 1),
            (1, 1, 0, schedule(16, 16, 16, 1, 2), 3),
            (3, 17, 1, schedule(32, 16, 16, 2, 2), 5),
            (2, 65, 0, schedule(32, 32, 32, 2, 3), 4),
        ] {
            check_weight_gradient(&plain_gradient(96, 32, 64, 40, row_shift, true, parts), &sched, batch, seq_len, &mut rng);
        }
    }

    /// dW on wgmma (dy read transposed from a swizzled tile, no bias), whole and in parts,
    /// against the sum written out; the tiles must be wgmma's.
    #[test]
    fn wgmma_weight_gradient_matches_the_sum_over_tokens() {
        let mut rng = XorShift64Star::new(10);
        for (batch, seq_len, row_shift, sched, parts) in [
            (1, 1, 0, schedule(128, 128, 64, 8, 3), 1),
            (3, 17, 1, schedule(64, 128, 64, 4, 3), 1),
            (2, 129, 0, schedule(128, 64, 64, 8, 2), 3),
        ] {
            let kernel = check_weight_gradient(&plain_gradient(320, 64, 256, 192, row_shift, false, parts), &sched, batch, seq_len, &mut rng);
            let swizzled = kernel.tiles.iter().filter(|tile| tile.ty.layout == ccc::ir::kernel::Layout::Swizzled128B).count();
            assert_eq!(swizzled, 2, "{sched:?}");
        }
    }

    /// `atomic_add` adds the tile to what the buffer holds (the interpreter's semantics), and the
    /// verifier holds it to an f32 accumulator added into an f32 tensor.
    #[test]
    fn atomic_add_adds_the_tile_to_the_buffer() {
        let kernel = common::kernel::atomic_weight_gradient();
        let mut rng = XorShift64Star::new(13);
        let (batch, seq_len) = (2, 37);
        let held = random(&mut rng, 64 * 48);
        let mut buffers: Buffers = Buffers::new();
        buffers.insert("dy".into(), random(&mut rng, batch * seq_len * 64));
        buffers.insert("x".into(), random(&mut rng, batch * seq_len * 48));
        buffers.insert("dw".into(), held.clone());
        run_kernel(&kernel, &mut buffers, launch_sizes(batch, seq_len), Rounding::Exact).unwrap();
        let mut want = held;
        for row in 0..batch * seq_len {
            for o in 0..64 {
                for i in 0..48 {
                    want[o * 48 + i] += buffers["dy"][row * 64 + o] * buffers["x"][row * 48 + i];
                }
            }
        }
        assert_close(&buffers["dw"], &want, "dw += dyᵀ·x");

        let mut into_bf16 = kernel.clone();
        for param in &mut into_bf16.params {
            if let ccc::ir::kernel::KernelParam::Tensor { name, elem, .. } = param
                && name == "dw"
            {
                *elem = ElemType::Bf16;
            }
        }
        let errors = into_bf16.verify().unwrap_err().join("\n");
        assert!(errors.contains("atomic_add adds into f32 tensors, not bf16 `dw`"), "{errors}");
    }

    /// A token sum in parts, then the sum of its parts, against the plain sum (with a factor
    /// one token earlier, as a depthwise tap's weight gradient).
    #[test]
    fn token_sum_in_parts_adds_up_to_the_sum() {
        let columns = 70;
        let mut rng = XorShift64Star::new(11);
        for (batch, seq_len, parts) in [(1, 1, 7), (3, 17, 2), (2, 65, 64), (1, 33, 1)] {
            let sum = TokenSum {
                name: "sum".into(),
                input: "dy".into(),
                elem: ElemType::Bf16,
                columns,
                rows: SummedRows::Tokens { rows_before: 0 },
                factor: Some(("x".into(), 0, 1)),
                parts,
                output: "total".into(),
                output_shape: vec![columns],
                output_tap: None,
            };
            let finish = TokenSum {
                name: "finish".into(),
                input: parts_name("total"),
                elem: ElemType::F32,
                columns,
                rows: SummedRows::Parts(parts),
                factor: None,
                parts: 1,
                output: "total".into(),
                output_shape: vec![columns],
                output_tap: None,
            };
            let mut buffers: Buffers = Buffers::new();
            buffers.insert("dy".into(), random(&mut rng, batch * seq_len * columns));
            buffers.insert("x".into(), random(&mut rng, batch * seq_len * columns));
            buffers.insert(parts_name("total"), vec![f64::NAN; parts * columns]);
            buffers.insert("total".into(), vec![f64::NAN; columns]);
            // In one part the sum is written whole.
            let kernels = if parts > 1 { vec![build_token_sum(&sum).unwrap(), build_token_sum(&finish).unwrap()] } else { vec![build_token_sum(&sum).unwrap()] };
            for kernel in kernels {
                run_kernel(&kernel, &mut buffers, launch_sizes(batch, seq_len), Rounding::Exact).unwrap();
            }
            let mut want = vec![0.0; columns];
            for b in 0..batch {
                for t in 1..seq_len {
                    for (c, w) in want.iter_mut().enumerate() {
                        *w += buffers["dy"][(b * seq_len + t) * columns + c] * buffers["x"][(b * seq_len + t - 1) * columns + c];
                    }
                }
            }
            assert_close(&buffers["total"], &want, &format!("B={batch} S={seq_len} in {parts} parts"));
        }
    }

    #[test]
    fn gradient_gemms_reject_segments_that_straddle_tiles() {
        let gradient = WeightGradient {
            name: "dw".into(),
            dy: "dy".into(),
            dy_columns: 96,
            column0: 0,
            width: 48,
            x: "x".into(),
            x_columns: 32,
            x_rows_before: 0,
            x_column0: 0,
            inputs: 32,
            row_shift: 0,
            heads: None,
            dy_rows_before: 0,
            output_tap: None,
            output: "dw".into(),
            output_shape: vec![48, 32],
            bias_output: None,
            parts: 1,
            storage: ElemType::Bf16,
        };
        let error = build_weight_gradient(&gradient, &schedule(32, 16, 16, 2, 1)).unwrap_err();
        assert!(error.contains("48 weight rows are not a whole number of 32-row tiles"), "{error}");
        let input = InputGradient {
            name: "dx".into(),
            terms: vec![GradientTerm { dy: "dy".into(), dy_columns: 96, column0: 0, width: 48, weight: "w".into(), row_shift: 0 }],
            inputs: 32,
            output: "dx".into(),
            storage: ElemType::Bf16,
        };
        let error = build_input_gradient(&input, &schedule(16, 16, 32, 1, 1)).unwrap_err();
        assert!(error.contains("not a whole number of 32-column chunks"), "{error}");
    }
}

/// The whole backward of layers without convolutions or q-k mean (o_proj's input and weight
/// gradients, the attention backward, RoPE and the norm backward with dL/dtemp summed over
/// tokens, dx and every projection weight's gradient) in the interpreter, against the
/// reference's hand-derived backward of the whole layer.
mod layer {
    use super::*;
    use ccc::ir::kernel::interp::run_forward_with;
    use ccc::ir::kernel::{backward_kernels, default_schedule, gradient_name, has_qk_prologue};
    use ccc::reference::round_to_dtype;
    use ccc::reference::{Weights, backward};

    fn check_layer(spec: &AttentionSpec, batch: usize, seq_len: usize, rng: &mut XorShift64Star, what: &str) {
        let kernels = backward_kernels(spec).unwrap_or_else(|e| panic!("{what}: {e}"));
        check_chain(spec, &kernels, batch, seq_len, rng, what, Rounding::Exact, &|got, want, name| assert_close(got, want, name));
    }

    /// How a gradient is judged: (got, want, what).
    type Compare<'a> = &'a dyn Fn(&[f64], &[f64], &str);

    /// `kernels` run in `rounding` (the forward too) on random inputs, dx and every parameter's
    /// gradient compared with the reference's by `compare`.
    #[allow(clippy::too_many_arguments)]
    fn check_chain(
        spec: &AttentionSpec,
        kernels: &[ccc::ir::kernel::KernelFn],
        batch: usize,
        seq_len: usize,
        rng: &mut XorShift64Star,
        what: &str,
        rounding: Rounding,
        compare: Compare,
    ) {
        // In storage mode every input is a value of the storage type, as on the GPU.
        let stored = |values: Vec<f64>| match rounding {
            Rounding::Exact => values,
            Rounding::Storage => values.into_iter().map(|v| round_to_dtype(v, spec.dtype)).collect(),
        };
        let weights: Buffers = random_weights(spec, rng).into_iter().map(|(name, data)| (name, stored(data))).collect();
        let x = stored(random_input(spec, batch, seq_len, rng));
        let dout = stored((0..x.len()).map(|_| rng.uniform(-1.0, 1.0)).collect());
        let forward = run_forward_with(
            spec,
            &weights,
            &x,
            batch,
            seq_len,
            &|which| default_schedule(spec, which).unwrap(),
            rounding,
        )
        .unwrap();
        let mut buffers: Buffers = weights.clone();
        for (name, data) in [("x", x.clone()), ("dout", dout.clone()), ("q", forward.q), ("k", forward.k), ("v", forward.v), ("o", forward.o), ("lse", forward.lse)] {
            buffers.insert(name.into(), data);
        }
        if has_qk_prologue(spec) {
            buffers.insert("p0".into(), packed_projection(spec, &weights, &x));
        }
        let sizes = launch_sizes(batch, seq_len);
        for kernel in kernels {
            for param in &kernel.params {
                if let ccc::ir::kernel::KernelParam::Tensor { name, shape, access: ccc::ir::kernel::Access::Write, .. } = param {
                    let len: u64 = shape.iter().map(|dim| dim.eval(&sizes).unwrap()).product();
                    buffers.entry(name.clone()).or_insert_with(|| vec![f64::NAN; len as usize]);
                }
            }
            run_kernel(kernel, &mut buffers, sizes, rounding).unwrap_or_else(|e| panic!("{what}: {e}"));
        }
        let tensors = spec
            .params()
            .into_iter()
            .map(|p| (p.name.clone(), Tensor { shape: p.shape, data: weights[&p.name].clone() }))
            .collect();
        let x = Tensor { shape: vec![batch, seq_len, spec.model_dim], data: x };
        let dout = Tensor { shape: x.shape.clone(), data: dout };
        let want = backward(spec, &Weights { tensors }, &x, &dout).unwrap();
        compare(&buffers["dx"], &want.dx.data, &format!("{what}: dx"));
        for (name, tensor) in &want.weights.tensors {
            compare(&buffers[&gradient_name(name)], &tensor.data, &format!("{what}: {}", gradient_name(name)));
        }
    }

    /// p0 = [x·W_qᵀ + b_q | x·W_kᵀ + b_k], what the forward's projection saves.
    fn packed_projection(spec: &AttentionSpec, weights: &Buffers, x: &[f64]) -> Vec<f64> {
        let e = spec.model_dim;
        let params = spec.params();
        let find = |role: ParamRole| params.iter().find(|p| p.role == role).map(|p| &weights[&p.name]);
        let mut p0 = Vec::new();
        for row in x.chunks(e) {
            for (weight, bias) in [(ParamRole::QueryProj, ParamRole::QueryBias), (ParamRole::KeyProj, ParamRole::KeyBias)] {
                let weight = find(weight).unwrap();
                for (o, w_row) in weight.chunks(e).enumerate() {
                    let dot: f64 = w_row.iter().zip(row).map(|(w, x)| w * x).sum();
                    p0.push(dot + find(bias).map_or(0.0, |b| b[o]));
                }
            }
        }
        p0
    }

    /// With the CCA layers' test below: 100 random specs, the whole backward against the
    /// reference to 1e-10.
    #[test]
    fn layers_without_convolutions_or_mean_match_the_reference_backward() {
        let mut rng = XorShift64Star::new(0x1A7E);
        let mut checked = 0;
        let mut index = 0;
        while checked < 50 {
            let spec = random_spec(&mut rng, index);
            index += 1;
            if !spec.qk_conv.is_empty() || spec.qk_mean {
                continue;
            }
            let batch = rng.range(1, 3);
            let seq_len = rng.pick(&[1, 17, 65]);
            check_layer(&spec, batch, seq_len, &mut rng, &format!("{} B={batch} S={seq_len}", spec.name));
            checked += 1;
        }
    }

    /// The chain in storage mode (every tile and buffer rounded to its type, as the GPU stores
    /// them) stays within the error of bf16/f16 storage of the reference's gradients: a
    /// rounding in the wrong place (a gradient kept in 16 bits across a long sum) shows here
    /// before any GPU run.
    #[test]
    fn layers_in_storage_rounding_stay_near_the_reference_backward() {
        let mut rng = XorShift64Star::new(0x5707);
        let worst = std::cell::Cell::new(0.0f64);
        let mut checked = 0;
        let mut index = 0;
        while checked < 12 {
            let spec = random_spec(&mut rng, index);
            index += 1;
            if !spec.qk_conv.is_empty() || spec.qk_mean {
                continue;
            }
            // Relative to each gradient's largest value, about four times the largest seen (bf16
            // 7.5e-3 on a key bias, f16 5.1e-3 on dL/dtemp: sums that cancel, over gradients
            // stored in 16 bits).
            let bound = match spec.dtype {
                DType::Bf16 => 3e-2,
                DType::F16 => 2e-2,
            };
            let compare = |got: &[f64], want: &[f64], what: &str| {
                let scale = want.iter().fold(1e-4f64, |m, v| m.max(v.abs()));
                let error = got.iter().zip(want).fold(0.0f64, |m, (a, b)| m.max((a - b).abs())) / scale;
                assert!(got.iter().all(|v| v.is_finite()), "{what}: not every value written");
                assert!(error <= bound, "{what}: error {error:e} > {bound:e} relative to the largest gradient");
                worst.set(worst.get().max(error));
            };
            let batch = rng.range(1, 2);
            let seq_len = rng.pick(&[17, 65]);
            let kernels = backward_kernels(&spec).unwrap();
            let what = format!("{} B={batch} S={seq_len}", spec.name);
            check_chain(&spec, &kernels, batch, seq_len, &mut rng, &what, Rounding::Storage, &compare);
            checked += 1;
        }
        eprintln!("largest storage-mode error: {:.1e}", worst.get());
    }

    /// CCA layers: the prologue's RoPE and norm backward into `dmixed`, then back through the
    /// convolutions in time and the q-k mean's fan-in into dp0, with every stage's weight and
    /// bias gradient (the padding rows before token 0 included).
    #[test]
    fn cca_layers_match_the_reference_backward() {
        let specs = [
            zaya1_like("zaya_small", 64, 16, 4, 2),
            AttentionSpec { mask: Mask::SlidingWindow { window: 20 }, bias: true, ..zaya1_like("zaya_window", 64, 32, 4, 1) },
            AttentionSpec { key_temperature: KeyTemperature::LearnedExp, value_shift: 2, ..zaya1_like("zaya_exp", 64, 16, 4, 2) },
        ];
        let mut rng = XorShift64Star::new(0xCCA);
        for spec in &specs {
            let kernels = backward_kernels(spec).unwrap();
            for (batch, seq_len) in [(1, 1), (2, 17), (1, 65), (2, 129)] {
                let what = format!("{} B={batch} S={seq_len}", spec.name);
                check_chain(spec, &kernels, batch, seq_len, &mut rng, &what, Rounding::Exact, &|got, want, name| assert_close(got, want, name));
            }
        }
        let mut checked = 0;
        let mut index = 0;
        while checked < 50 {
            let spec = random_spec(&mut rng, 1000 + index);
            index += 1;
            if spec.qk_conv.is_empty() && !spec.qk_mean {
                continue;
            }
            let (batch, seq_len) = (rng.range(1, 2), rng.pick(&[1, 17, 65]));
            let what = format!("{} B={batch} S={seq_len}", spec.name);
            check_chain(&spec, &backward_kernels(&spec).unwrap(), batch, seq_len, &mut rng, &what, Rounding::Exact, &|got, want, name| assert_close(got, want, name));
            checked += 1;
        }
    }

    /// ZAYA1 itself (d 128, 8 query and 2 kv heads, E 2048) at B 3 × S 17 in storage rounding:
    /// every gradient within 1.5e-2 relative L2 of the reference's (7.8e-3 at most when
    /// written), what the GPU's q/k-path gradients must come near.
    #[test]
    fn zaya1_in_storage_rounding_stays_near_the_reference_backward() {
        let spec = crate::common::specs::zaya1();
        let compare = |got: &[f64], want: &[f64], what: &str| {
            assert!(got.iter().all(|v| v.is_finite()), "{what}: not every value written");
            let error: f64 = got.iter().zip(want).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt()
                / want.iter().map(|b| b * b).sum::<f64>().sqrt();
            assert!(error <= 1.5e-2, "{what}: relative L2 error {error:e}");
        };
        let kernels = backward_kernels(&spec).unwrap();
        check_chain(&spec, &kernels, 3, 17, &mut XorShift64Star::new(3), "zaya1", Rounding::Storage, &compare);
    }
}
