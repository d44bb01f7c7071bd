//! The decode entry point's kernels (`plan_decode`: projection, prologue after the convolution
//! state, KV append with the shift state, paged attention and merge, output projection) run in
//! the interpreter, in f64, for a batch of sequences of different lengths continuing from the
//! state the reference's prefill left (pages in random order, an empty slot), against the
//! reference's `decode_step` of each sequence: the outputs, and the state the step leaves (the
//! new token's k and v in its page row, nothing else in the pool touched, the convolution and
//! shift state moved on). And the prefill entry point's kernel after the forward over a batch of
//! right-padded prompts: the pages and state it leaves equal the reference's prefill, and a
//! decode step from them the reference's.

mod common;

use ccc::ir::kernel::interp::{Buffers, INTERPRETER_SMS, Rounding, run_kernel};
use ccc::ir::kernel::{Access, DecodeKernel, KernelFn, KernelParam, PagedKv, build_decode, forward_kernels};
use ccc::ir::plan::{KernelPlan, plan_decode};
use ccc::ir::size::SizeEnv;
use ccc::reference::{DecodeState, Tensor, Weights, decode_step, prefill};
use ccc::spec::{AttentionSpec, Mask};
use common::kernel::{random_spec, random_weights};
use common::rng::XorShift64Star;
use common::specs::small_zaya_like;

/// Relative error allowed against the f64 reference: both compute in f64 (Rounding::Exact),
/// in different orders.
const TOLERANCE: f64 = 1e-9;

/// Sequence lengths before the step (the step adds one); −1 marks an empty slot.
const PROMPTS: [i64; 5] = [0, 16, -1, 37, 5];

struct Step {
    buffers: Buffers,
    sizes: SizeEnv,
    /// Per slot: the state before the step (None for the empty slot) and its pages.
    states: Vec<Option<DecodeState>>,
    table: Vec<Vec<i64>>,
}

fn weights_of(spec: &AttentionSpec, w: &Buffers) -> Weights {
    let tensors = spec.params().into_iter().map(|p| (p.name.clone(), Tensor { shape: p.shape, data: w[&p.name].clone() })).collect();
    Weights { tensors }
}

/// Every sequence prefilled by the reference, its state copied into the step's buffers: pages
/// in random order (spare ones between), the convolution state transposed to [B, P, T].
fn step_inputs(spec: &AttentionSpec, paged: PagedKv, weights: &Weights, rng: &mut XorShift64Star) -> Step {
    let (page, e, p, t) = (paged.page_size as usize, spec.model_dim, spec.packed_width(), spec.conv_history());
    let row_len = spec.kv_width();
    let states: Vec<Option<DecodeState>> = PROMPTS
        .iter()
        .map(|&len| {
            (len >= 0).then(|| {
                let x = Tensor { shape: vec![len as usize, e], data: (0..len as usize * e).map(|_| rng.uniform(-1.0, 1.0)).collect() };
                if len == 0 { DecodeState::new(spec) } else { prefill(spec, weights, &x).expect("reference prefill").1 }
            })
        })
        .collect();
    let pages_of = |len: i64| (len.max(0) as usize + 1).div_ceil(page);
    let blocks = PROMPTS.iter().map(|&len| pages_of(len)).max().unwrap() + 1;
    let pages = PROMPTS.iter().map(|&len| pages_of(len)).sum::<usize>() + 4;
    let mut order: Vec<usize> = (0..pages).collect();
    for i in (1..pages).rev() {
        order.swap(i, rng.range(0, i));
    }
    let mut free = order.into_iter();
    let table: Vec<Vec<i64>> =
        PROMPTS.iter().map(|&len| (0..blocks).map(|j| if j < pages_of(len) { free.next().unwrap() as i64 } else { -1 }).collect()).collect();
    // The pool's unused rows hold values the step must leave alone.
    let mut k_cache: Vec<f64> = (0..pages * page * row_len).map(|i| 1e3 + i as f64).collect();
    let mut v_cache: Vec<f64> = (0..pages * page * row_len).map(|i| -1e3 - i as f64).collect();
    let batch = PROMPTS.len();
    let mut conv_state = vec![0.0; batch * p * t];
    let mut shift_state = vec![0.0; batch * spec.value_shift * spec.head_dim];
    for (b, state) in states.iter().enumerate() {
        let Some(state) = state else {
            // An empty slot's state is whatever the caller left there.
            for (i, value) in conv_state[b * p * t..(b + 1) * p * t].iter_mut().enumerate() {
                *value = 0.25 + i as f64;
            }
            continue;
        };
        for position in 0..state.position {
            let at = (table[b][position / page] as usize * page + position % page) * row_len;
            k_cache[at..at + row_len].copy_from_slice(&state.keys[position * row_len..][..row_len]);
            v_cache[at..at + row_len].copy_from_slice(&state.values[position * row_len..][..row_len]);
        }
        for row in 0..t {
            for channel in 0..p {
                conv_state[(b * p + channel) * t + row] = state.conv_rows[row * p + channel];
            }
        }
        let width = state.shift.len();
        shift_state[b * width..(b + 1) * width].copy_from_slice(&state.shift);
    }
    let mut buffers: Buffers = weights.tensors.iter().map(|(name, tensor)| (name.clone(), tensor.data.clone())).collect();
    buffers.insert("x".into(), (0..batch * e).map(|_| rng.uniform(-1.0, 1.0)).collect());
    buffers.insert("seq_lens".into(), PROMPTS.iter().map(|&len| (len + 1) as f64).collect());
    buffers.insert("block_table".into(), table.iter().flatten().map(|&page| page as f64).collect());
    buffers.insert("k_cache".into(), k_cache);
    buffers.insert("v_cache".into(), v_cache);
    if t > 0 {
        buffers.insert("conv_state".into(), conv_state);
    }
    if spec.value_shift > 0 {
        buffers.insert("shift_state".into(), shift_state);
    }
    let sizes = SizeEnv { batch: batch as u64, seq_len: 1, sms: Some(INTERPRETER_SMS), pages: Some(pages as u64), blocks: Some(blocks as u64) };
    Step { buffers, sizes, states, table }
}

/// Runs the plan's kernels in order ([`run_kernels`]).
fn run(spec: &AttentionSpec, plan: &KernelPlan, step: &mut Step) {
    let kernels: Vec<KernelFn> = plan.kernels.iter().map(|planned| planned.builder().build(spec, &planned.schedule).expect("builds")).collect();
    run_kernels(&kernels, &mut step.buffers, step.sizes);
}

/// Runs `kernels` in order; what a kernel writes first is poisoned (NaN), so that reading an
/// element no kernel wrote fails the comparison.
fn run_kernels(kernels: &[KernelFn], buffers: &mut Buffers, sizes: SizeEnv) {
    for kernel in kernels {
        for param in &kernel.params {
            if let KernelParam::Tensor { name, shape, access: Access::Write, .. } = param
                && !buffers.contains_key(name)
            {
                let len: u64 = shape.iter().map(|dim| dim.eval(&sizes).expect("sized")).product();
                buffers.insert(name.clone(), vec![f64::NAN; len as usize]);
            }
        }
        run_kernel(kernel, buffers, sizes, Rounding::Exact).unwrap_or_else(|error| panic!("{}: {error}", kernel.name));
    }
}

fn relative_error(got: &[f64], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
    // NaN compares as an infinite error.
    got.iter().zip(want).map(|(g, w)| if (g - w).is_nan() { f64::INFINITY } else { (g - w).abs() / scale }).fold(0.0, f64::max)
}

fn check(spec: &AttentionSpec, paged: PagedKv, seed: u64) {
    let mut rng = XorShift64Star::new(seed);
    let weights = weights_of(spec, &random_weights(spec, &mut rng));
    let plan = plan_decode(spec, paged).unwrap_or_else(|error| panic!("{}: {error}", spec.name));
    let mut step = step_inputs(spec, paged, &weights, &mut rng);
    let before = step.buffers.clone();
    run(spec, &plan, &mut step);
    let (e, p, t, page) = (spec.model_dim, spec.packed_width(), spec.conv_history(), paged.page_size as usize);
    let row_len = spec.kv_width();
    let what = format!("{} {paged:?}", spec.name);
    let (mut want_k, mut want_v) = (before["k_cache"].clone(), before["v_cache"].clone());
    for (b, state) in step.states.iter().enumerate() {
        let got_out = &step.buffers["out"][b * e..(b + 1) * e];
        let Some(state) = state else {
            // An empty slot attends to nothing: its output is the projection of zeros.
            let zeros = vec![0.0; e];
            let bias = spec.params().into_iter().find(|w| w.role == ccc::spec::ParamRole::OutputBias).map(|w| weights.tensors[&w.name].data.clone());
            assert!(relative_error(got_out, bias.as_deref().unwrap_or(&zeros)) <= TOLERANCE, "{what}: the empty slot's out");
            if t > 0 {
                assert_eq!(step.buffers["conv_state"][b * p * t..(b + 1) * p * t], before["conv_state"][b * p * t..(b + 1) * p * t], "{what}: the empty slot's state");
            }
            continue;
        };
        let mut after = state.clone();
        let x = &step.buffers["x"][b * e..(b + 1) * e];
        let want_out = decode_step(spec, &weights, &mut after, x).expect("reference decode step");
        let error = relative_error(got_out, &want_out);
        assert!(error <= TOLERANCE, "{what}: out of sequence {b} (length {}): relative error {error:e}", state.position);
        let position = state.position;
        let at = (step.table[b][position / page] as usize * page + position % page) * row_len;
        want_k[at..at + row_len].copy_from_slice(&after.keys[position * row_len..][..row_len]);
        want_v[at..at + row_len].copy_from_slice(&after.values[position * row_len..][..row_len]);
        for row in 0..t {
            for channel in 0..p {
                let (got, want) = (step.buffers["conv_state"][(b * p + channel) * t + row], after.conv_rows[row * p + channel]);
                assert!((got - want).abs() <= TOLERANCE * want.abs().max(1.0), "{what}: conv_state[{b}, {channel}, {row}] = {got}, expected {want}");
            }
        }
        if spec.value_shift > 0 {
            let width = after.shift.len();
            let error = relative_error(&step.buffers["shift_state"][b * width..(b + 1) * width], &after.shift);
            assert!(error <= TOLERANCE, "{what}: shift_state of sequence {b}: relative error {error:e}");
        }
    }
    for (name, want) in [("k_cache", &want_k), ("v_cache", &want_v)] {
        let error = relative_error(&step.buffers[name], want);
        assert!(error <= TOLERANCE, "{what}: {name}: relative error {error:e} (a row other than the new tokens' changed, or a new one is wrong)");
    }
}

#[test]
fn a_decode_step_of_a_zaya1_like_layer_equals_the_references() {
    let spec = small_zaya_like("zaya_like");
    for paged in [PagedKv { page_size: 16, partition_keys: 16 }, PagedKv { page_size: 8, partition_keys: 32 }] {
        check(&spec, paged, 3);
    }
    check(&AttentionSpec { mask: Mask::SlidingWindow { window: 7 }, ..spec.clone() }, PagedKv { page_size: 8, partition_keys: 16 }, 4);
    check(&AttentionSpec { value_shift: 2, bias: false, ..spec }, PagedKv { page_size: 16, partition_keys: 32 }, 5);
}

#[test]
fn decode_steps_of_random_specs_equal_the_references() {
    let mut rng = XorShift64Star::new(41);
    for index in 0..12 {
        let spec = random_spec(&mut rng, index);
        check(&spec, PagedKv { page_size: 8, partition_keys: 16 }, 100 + index as u64);
    }
}

/// The forward over prompts right-padded to S, then the prefill kernel: every sequence's pages
/// and state equal the reference's prefill of its prompt, an empty slot's state is left as it
/// was, and what the pool held elsewhere is left alone.
fn check_prefill(spec: &AttentionSpec, paged: PagedKv, seed: u64) {
    let mut rng = XorShift64Star::new(seed);
    let weights = weights_of(spec, &random_weights(spec, &mut rng));
    let lens = [5usize, 0, 16, 23];
    let (batch, seq_len, e, page) = (lens.len(), 24usize, spec.model_dim, paged.page_size as usize);
    let row_len = spec.kv_width();
    let (blocks, pages) = (seq_len.div_ceil(page), batch * seq_len.div_ceil(page) + 3);
    let mut order: Vec<usize> = (0..pages).collect();
    for i in (1..pages).rev() {
        order.swap(i, rng.range(0, i));
    }
    let table: Vec<i64> = order[..batch * blocks].iter().map(|&p| p as i64).collect();
    // Padding tokens are finite: the forward runs over them, causally after the prompt.
    let x: Vec<f64> = (0..batch * seq_len * e).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let mut buffers: Buffers = weights.tensors.iter().map(|(name, tensor)| (name.clone(), tensor.data.clone())).collect();
    buffers.insert("x".into(), x.clone());
    buffers.insert("seq_lens".into(), lens.iter().map(|&l| l as f64).collect());
    buffers.insert("block_table".into(), table.iter().map(|&p| p as f64).collect());
    let pool: Vec<f64> = (0..pages * page * row_len).map(|i| 0.5 + i as f64).collect();
    let (p, t, shift) = (spec.packed_width(), spec.conv_history(), spec.value_shift * spec.head_dim);
    buffers.insert("k_cache".into(), pool.clone());
    buffers.insert("v_cache".into(), pool.clone());
    buffers.insert("conv_state".into(), vec![7.0; batch * p * t]);
    buffers.insert("shift_state".into(), vec![7.0; batch * shift]);
    let sizes = SizeEnv { batch: batch as u64, seq_len: seq_len as u64, sms: Some(INTERPRETER_SMS), pages: Some(pages as u64), blocks: Some(blocks as u64) };
    let mut kernels = forward_kernels(spec).expect("forward kernels");
    kernels.push(build_decode(spec, DecodeKernel::CacheFill, paged).expect("prefill kernel"));
    run_kernels(&kernels, &mut buffers, sizes);
    let what = format!("{} {paged:?}", spec.name);
    let (mut want_k, mut want_v) = (pool.clone(), pool);
    for (b, &len) in lens.iter().enumerate() {
        if len == 0 {
            // An empty slot writes nothing: its state is the caller's.
            assert!(buffers["conv_state"][b * p * t..(b + 1) * p * t].iter().all(|v| *v == 7.0), "{what}: the empty slot's conv_state");
            assert!(buffers["shift_state"][b * shift..(b + 1) * shift].iter().all(|v| *v == 7.0), "{what}: the empty slot's shift_state");
            continue;
        }
        let prompt = Tensor { shape: vec![len, e], data: x[b * seq_len * e..][..len * e].to_vec() };
        let state = prefill(spec, &weights, &prompt).expect("reference prefill").1;
        // Under a sliding window, the pages wholly before the last token's window stay as they were.
        let first_page = match spec.mask {
            Mask::SlidingWindow { window } => len.saturating_sub(window) / page,
            _ => 0,
        };
        for position in first_page * page..len {
            let at = (table[b * blocks + position / page] as usize * page + position % page) * row_len;
            want_k[at..at + row_len].copy_from_slice(&state.keys[position * row_len..][..row_len]);
            want_v[at..at + row_len].copy_from_slice(&state.values[position * row_len..][..row_len]);
        }
        for row in 0..t {
            for channel in 0..p {
                let (got, want) = (buffers["conv_state"][(b * p + channel) * t + row], state.conv_rows[row * p + channel]);
                assert!((got - want).abs() <= TOLERANCE * want.abs().max(1.0), "{what}: conv_state[{b}, {channel}, {row}] = {got}, expected {want}");
            }
        }
        if shift > 0 {
            let error = relative_error(&buffers["shift_state"][b * shift..(b + 1) * shift], &state.shift);
            assert!(error <= TOLERANCE, "{what}: shift_state of sequence {b}: relative error {error:e}");
        }
    }
    for (name, want) in [("k_cache", &want_k), ("v_cache", &want_v)] {
        let error = relative_error(&buffers[name], want);
        assert!(error <= TOLERANCE, "{what}: {name}: relative error {error:e}");
    }
}

#[test]
fn prefill_of_a_padded_batch_leaves_the_references_pages_and_state() {
    let spec = small_zaya_like("zaya_like");
    check_prefill(&spec, PagedKv { page_size: 8, partition_keys: 16 }, 9);
    check_prefill(&AttentionSpec { mask: Mask::SlidingWindow { window: 7 }, ..spec.clone() }, PagedKv { page_size: 8, partition_keys: 16 }, 11);
    check_prefill(&AttentionSpec { value_shift: 2, bias: false, ..spec }, PagedKv { page_size: 16, partition_keys: 16 }, 10);
    let mut rng = XorShift64Star::new(43);
    for index in 0..8 {
        check_prefill(&random_spec(&mut rng, index), PagedKv { page_size: 8, partition_keys: 16 }, 200 + index as u64);
    }
}
