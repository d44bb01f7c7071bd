//! The decode entry point's kernels (`plan_decode`: projection, prologue after the convolution
//! state, KV append with the shift state, paged attention and merge, output projection) run in
//! the interpreter, in f64, for a batch of sequences of different lengths continuing from the
//! state the reference's prefill left (pages in random order, an empty slot), against the
//! reference's `decode_step` of each sequence: the outputs, and the state the step leaves (the
//! new token's k and v in its page row, nothing else in the pool touched, the convolution and
//! shift state moved on). And the prefill entry point's kernels (`plan_prefill`) over a packed
//! batch of chunks continuing cached sequences, as planned and as the driver ships them, against
//! the reference's `PagedCache::step`.

mod common;

use ccc::ir::kernel::interp::{Buffers, INTERPRETER_SMS, Rounding, run_kernel};
use ccc::ir::kernel::{Access, KernelFn, KernelParam, PagedKv};
use ccc::ir::plan::{KernelPlan, plan_decode, plan_prefill};
use ccc::ir::size::SizeEnv;
use ccc::reference::{DecodeState, Tensor, Weights, decode_step, prefill};
use ccc::spec::{AttentionSpec, EntryPoint, Mask};
use common::kernel::{random_spec, random_weights};
use common::rng::XorShift64Star;
use common::specs::{small_zaya_like, zaya1_like};

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

/// Cached tokens before the packed prefill, and the chunk each sequence then takes: new and
/// continued sequences (one at a page boundary), one shorter than the convolution history, an empty slot (0, 0), a
/// sequence without new tokens, chunks crossing pages, and one long enough for several query
/// tiles, prologue CTAs and key tiles.
const CHUNKS: [(usize, usize); 7] = [(0, 5), (16, 4), (0, 0), (17, 1), (3, 23), (6, 0), (130, 70)];

/// The prefill plan's kernels over a packed batch of chunks continuing what the reference's
/// paged cache holds (pages in random order, a pool whose other rows hold values nothing may
/// touch): `out`, the whole pool, and every sequence's convolution and shift state equal the
/// reference's `PagedCache::step`; an empty slot's state stays the caller's.
fn check_prefill(spec: &AttentionSpec, paged: PagedKv, seed: u64) {
    check_prefill_with(spec, paged, seed, false);
}

/// [`check_prefill`] with the kernels the driver ships where `shipped` (the Hopper forms of the
/// projections and of the chunk's attention, for the spec's tiles), else the plan's.
fn check_prefill_with(spec: &AttentionSpec, paged: PagedKv, seed: u64, shipped: bool) {
    let mut rng = XorShift64Star::new(seed);
    let weights = weights_of(spec, &random_weights(spec, &mut rng));
    let (e, page, row_len) = (spec.model_dim, paged.page_size as usize, spec.kv_width());
    let (p, t, shift) = (spec.packed_width(), spec.conv_history(), spec.value_shift * spec.head_dim);
    let batch = CHUNKS.len();
    let pages_of = |(cached, new): (usize, usize)| (cached + new).div_ceil(page);
    let blocks = CHUNKS.iter().map(|&c| pages_of(c)).max().unwrap();
    let pages = CHUNKS.iter().map(|&c| pages_of(c)).sum::<usize>() + 3;
    let mut order: Vec<usize> = (0..pages).collect();
    for i in (1..pages).rev() {
        order.swap(i, rng.range(0, i));
    }
    let mut free = order.into_iter();
    let tables: Vec<Vec<usize>> = CHUNKS.iter().map(|&c| (0..pages_of(c)).map(|_| free.next().unwrap()).collect()).collect();
    let mut cache = ccc::reference::PagedCache::new(spec, page, pages, tables.clone()).expect("reference cache");
    cache.k_pages = (0..pages * page * row_len).map(|i| 0.5 + i as f64).collect();
    cache.v_pages = (0..pages * page * row_len).map(|i| -0.5 - i as f64).collect();
    let packed = |lens: &[usize], rng: &mut XorShift64Star| {
        let cu: Vec<usize> = std::iter::once(0).chain(lens.iter().scan(0, |end, &n| { *end += n; Some(*end) })).collect();
        let x = Tensor { shape: vec![cu[batch], e], data: (0..cu[batch] * e).map(|_| rng.uniform(-1.0, 1.0)).collect() };
        (x, cu)
    };
    let (prefix, prefix_cu) = packed(&CHUNKS.map(|(cached, _)| cached), &mut rng);
    cache.step(spec, &weights, &prefix, &prefix_cu).expect("reference prefill of the cached tokens");
    let (x, cu) = packed(&CHUNKS.map(|(_, new)| new), &mut rng);

    let mut buffers: Buffers = weights.tensors.iter().map(|(name, tensor)| (name.clone(), tensor.data.clone())).collect();
    buffers.insert("x".into(), x.data.clone());
    buffers.insert("cu_seqlens".into(), cu.iter().map(|&v| v as f64).collect());
    buffers.insert("seq_lens".into(), CHUNKS.iter().map(|&(cached, new)| (cached + new) as f64).collect());
    // Entries no kernel may read are −1 (the interpreter fails on a read outside the pool):
    // those past a sequence's pages, and those wholly before its first new token's window.
    let first_read = |cached: usize| match spec.mask {
        Mask::SlidingWindow { window } => (cached + 1).saturating_sub(window) / page,
        _ => 0,
    };
    let table_entries = tables.iter().zip(CHUNKS).flat_map(|(table, (cached, _))| {
        (0..blocks).map(move |j| if j < first_read(cached) { -1.0 } else { table.get(j).map_or(-1.0, |&page| page as f64) })
    });
    buffers.insert("block_table".into(), table_entries.collect());
    buffers.insert("k_cache".into(), cache.k_pages.clone());
    buffers.insert("v_cache".into(), cache.v_pages.clone());
    // The caller's state: the reference's, transposed to [B, P, T]; the empty slot's arbitrary.
    let mut conv_state = vec![7.0; batch * p * t];
    let mut shift_state = vec![7.0; batch * shift];
    for (b, &(cached, _)) in CHUNKS.iter().enumerate() {
        if cached == 0 {
            continue;
        }
        for row in 0..t {
            for channel in 0..p {
                conv_state[(b * p + channel) * t + row] = cache.conv_rows[b][row * p + channel];
            }
        }
        shift_state[b * shift..(b + 1) * shift].copy_from_slice(&cache.shift[b]);
    }
    if t > 0 {
        buffers.insert("conv_state".into(), conv_state.clone());
    }
    if shift > 0 {
        buffers.insert("shift_state".into(), shift_state.clone());
    }
    let sizes = SizeEnv { batch: batch as u64, seq_len: cu[batch] as u64, sms: Some(INTERPRETER_SMS), pages: Some(pages as u64), blocks: Some(blocks as u64) };
    let plan = plan_prefill(spec, paged).expect("prefill plan");
    let kernels: Vec<KernelFn> = if shipped {
        let shipped = ccc::driver::planned_kernel_ir(spec).expect("compiles");
        let prefill: Vec<KernelFn> = plan.kernels.iter().map(|planned| shipped.iter().find(|k| k.name == planned.symbol).expect("shipped").clone()).collect();
        // The Hopper forms: the projections' and the chunk's attention's TMA loads.
        let tma: Vec<&str> = prefill.iter().filter(|k| format!("{:?}", k.body).contains("TmaLoad")).map(|k| k.name.as_str()).collect();
        assert_eq!(tma.len(), 3, "{}: the shipped prefill's TMA kernels are {tma:?}", spec.name);
        prefill
    } else {
        plan.kernels.iter().map(|planned| planned.builder().build(spec, &planned.schedule).expect("builds")).collect()
    };
    run_kernels(&kernels, &mut buffers, sizes);

    let out = cache.step(spec, &weights, &x, &cu).expect("reference prefill");
    let what = format!("{} {paged:?}", spec.name);
    let error = relative_error(&buffers["out"], &out.data);
    assert!(error <= TOLERANCE, "{what}: out: relative error {error:e}");
    for (name, want) in [("k_cache", &cache.k_pages), ("v_cache", &cache.v_pages)] {
        let error = relative_error(&buffers[name], want);
        assert!(error <= TOLERANCE, "{what}: {name}: relative error {error:e}");
    }
    for (b, &(cached, new)) in CHUNKS.iter().enumerate() {
        // A slot that takes no token keeps the caller's state (the empty slot's arbitrary one).
        let (want_conv, want_shift): (Vec<f64>, Vec<f64>) = if cached + new == 0 || new == 0 {
            (conv_state[b * p * t..(b + 1) * p * t].to_vec(), shift_state[b * shift..(b + 1) * shift].to_vec())
        } else {
            ((0..p * t).map(|i| cache.conv_rows[b][(i % t) * p + i / t]).collect(), cache.shift[b].clone())
        };
        if t > 0 {
            let error = relative_error(&buffers["conv_state"][b * p * t..(b + 1) * p * t], &want_conv);
            assert!(error <= TOLERANCE, "{what}: conv_state of sequence {b}: relative error {error:e}");
        }
        if shift > 0 {
            let error = relative_error(&buffers["shift_state"][b * shift..(b + 1) * shift], &want_shift);
            assert!(error <= TOLERANCE, "{what}: shift_state of sequence {b}: relative error {error:e}");
        }
    }
}

#[test]
fn packed_prefill_continuing_cached_sequences_equals_the_references() {
    let spec = small_zaya_like("zaya_like");
    check_prefill(&spec, PagedKv { page_size: 8, partition_keys: 16 }, 9);
    check_prefill(&AttentionSpec { mask: Mask::SlidingWindow { window: 7 }, ..spec.clone() }, PagedKv { page_size: 8, partition_keys: 16 }, 11);
    check_prefill(&AttentionSpec { value_shift: 2, bias: false, ..spec.clone() }, PagedKv { page_size: 16, partition_keys: 16 }, 10);
    check_prefill(&spec, PagedKv { page_size: 128, partition_keys: 128 }, 12);
    // Pages that do not divide the key tile (tiles of two 24-token pages); a one-key window (no
    // cached key visible: the cached pass must read no page).
    check_prefill(&spec, PagedKv { page_size: 24, partition_keys: 48 }, 13);
    check_prefill(&AttentionSpec { mask: Mask::SlidingWindow { window: 1 }, ..spec.clone() }, PagedKv { page_size: 8, partition_keys: 16 }, 14);
    let mut rng = XorShift64Star::new(43);
    for index in 0..8 {
        check_prefill(&random_spec(&mut rng, index), PagedKv { page_size: 8, partition_keys: 16 }, 200 + index as u64);
    }
}

/// The prefill as the driver ships it for a head_dim-64 layer: the projections' wgmma GEMMs over
/// the packed rows (x seen through a tensor map as [1, S, E]) and the chunk's warp-specialized
/// attention, causal and windowed.
#[test]
fn the_shipped_packed_prefill_equals_the_references() {
    let spec = AttentionSpec { value_shift: 1, entry_points: vec![EntryPoint::Forward, EntryPoint::Decode], ..zaya1_like("zaya_d64", 128, 64, 4, 2) };
    check_prefill_with(&spec, PagedKv::DEFAULT, 31, true);
    check_prefill_with(&AttentionSpec { mask: Mask::SlidingWindow { window: 5 }, ..spec }, PagedKv::DEFAULT, 32, true);
}
