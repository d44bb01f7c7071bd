//! The decode attention over a paged KV cache (kernel-IR builders `decode_attention` and
//! `decode_merge`) in the interpreter against attention computed directly in f64 over the keys
//! each sequence's block table names: mixed lengths, pages out of order, page sizes of 16 and 8
//! (two pages per key tile), causal and sliding-window masks, grouped heads; and the append of
//! new tokens' k and v into their pages. The kernels lower and assemble without spills. (The
//! whole decode step against the reference: tests/ir_kernel_decode_step.rs.)

mod common;

use ccc::ir::kernel::interp::{Buffers, INTERPRETER_SMS, Rounding, run_kernel};
use ccc::ir::kernel::*;
use ccc::ir::size::SizeEnv;
use ccc::spec::{AttentionSpec, Mask};
use common::rng::XorShift64Star;

const D: usize = 16;
const QUERY_HEADS: usize = 4;
const KV_HEADS: usize = 2;

struct Case {
    spec: AttentionSpec,
    paged: PagedKv,
    lens: Vec<usize>,
}

struct Cache {
    blocks: usize,
    pages: usize,
    table: Vec<Vec<i64>>,
    q: Vec<f64>,
    k: Vec<f64>,
    v: Vec<f64>,
}

fn spec(mask: Mask) -> AttentionSpec {
    let mut spec = AttentionSpec::plain("paged", QUERY_HEADS * D, D, QUERY_HEADS, KV_HEADS);
    spec.mask = mask;
    spec
}

/// A pool with every sequence's pages in random order, spare pages between them, and the block
/// table's entries outside the pages a sequence's new token sees (past its length, wholly
/// before its window: a server may free those) set to −1, never read.
fn cache(case: &Case, rng: &mut XorShift64Star) -> Cache {
    let page = case.paged.page_size as usize;
    let blocks = case.lens.iter().map(|len| len.div_ceil(page)).max().unwrap() + 1;
    let used: usize = case.lens.iter().map(|len| len.div_ceil(page)).sum();
    let pages = used + 3;
    let mut order: Vec<usize> = (0..pages).collect();
    for i in (1..pages).rev() {
        order.swap(i, rng.range(0, i));
    }
    let mut next = order.into_iter();
    let table = case
        .lens
        .iter()
        .map(|&len| {
            let first = first_key(case, len);
            (0..blocks)
                .map(|j| {
                    let page_id = if j < len.div_ceil(page) { next.next().unwrap() as i64 } else { -1 };
                    if (j + 1) * page <= first { -1 } else { page_id }
                })
                .collect()
        })
        .collect();
    let mut values = |n: usize| (0..n).map(|_| rng.uniform(-1.0, 1.0)).collect::<Vec<f64>>();
    let (b, cache_len) = (case.lens.len(), pages * page * KV_HEADS * D);
    Cache { blocks, pages, table, q: values(b * QUERY_HEADS * D), k: values(cache_len), v: values(cache_len) }
}

/// The first key the new token (position len − 1) sees.
fn first_key(case: &Case, len: usize) -> usize {
    match case.spec.mask {
        Mask::SlidingWindow { window } => len.saturating_sub(window),
        _ => 0,
    }
}

/// o[b, h] over the keys the new token sees, in f64 (0 for a sequence of length 0).
fn expected(case: &Case, cache: &Cache) -> Vec<f64> {
    let page = case.paged.page_size as usize;
    let group = QUERY_HEADS / KV_HEADS;
    let mut out = Vec::new();
    for (b, &len) in case.lens.iter().enumerate() {
        let first = first_key(case, len);
        if len == 0 {
            out.extend(vec![0.0; QUERY_HEADS * D]);
            continue;
        }
        for h in 0..QUERY_HEADS {
            let row = |data: &[f64], j: usize| -> Vec<f64> {
                let p = cache.table[b][j / page] as usize;
                let at = ((p * page + j % page) * KV_HEADS + h / group) * D;
                data[at..at + D].to_vec()
            };
            let q = &cache.q[(b * QUERY_HEADS + h) * D..][..D];
            let scores: Vec<f64> = (first..len)
                .map(|j| case.spec.softmax_scale * q.iter().zip(row(&cache.k, j)).map(|(a, b)| a * b).sum::<f64>())
                .collect();
            let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
            let total: f64 = weights.iter().sum();
            let mut o = vec![0.0; D];
            for (w, j) in weights.iter().zip(first..len) {
                for (o, v) in o.iter_mut().zip(row(&cache.v, j)) {
                    *o += w / total * v;
                }
            }
            out.extend(o);
        }
    }
    out
}

fn run(case: &Case, cache: &Cache) -> Vec<f64> {
    let attention = build_decode(&case.spec, DecodeKernel::Attention, case.paged).expect("decode attention");
    let merge = build_decode(&case.spec, DecodeKernel::Merge, case.paged).expect("decode merge");
    let batch = case.lens.len();
    let partitions = (cache.blocks * case.paged.page_size as usize).div_ceil(case.paged.partition_keys as usize);
    let mut buffers = Buffers::new();
    buffers.insert("q".into(), cache.q.clone());
    buffers.insert("k_cache".into(), cache.k.clone());
    buffers.insert("v_cache".into(), cache.v.clone());
    buffers.insert("block_table".into(), cache.table.iter().flatten().map(|&p| p as f64).collect());
    buffers.insert("seq_lens".into(), case.lens.iter().map(|&l| l as f64).collect());
    // Poisoned: the merge must read only what the attention wrote.
    buffers.insert("o_part".into(), vec![f64::NAN; batch * partitions * QUERY_HEADS * D]);
    buffers.insert("lse_part".into(), vec![f64::NAN; batch * partitions * QUERY_HEADS]);
    buffers.insert("o".into(), vec![f64::NAN; batch * QUERY_HEADS * D]);
    let sizes = SizeEnv { batch: batch as u64, seq_len: 1, sms: Some(INTERPRETER_SMS), pages: Some(cache.pages as u64), blocks: Some(cache.blocks as u64) };
    for kernel in [&attention, &merge] {
        run_kernel(kernel, &mut buffers, sizes, Rounding::Exact).unwrap_or_else(|error| panic!("{}: {error}", kernel.name));
    }
    buffers.remove("o").unwrap()
}

fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for (page_size, partition_keys) in [(16, 32), (8, 32), (16, 16)] {
        for mask in [Mask::Causal, Mask::SlidingWindow { window: 20 }] {
            cases.push(Case { spec: spec(mask), paged: PagedKv { page_size, partition_keys }, lens: vec![1, 17, 0, 45, 64] });
        }
    }
    cases
}

#[test]
fn decode_attention_over_pages_equals_attention_over_the_sequence() {
    let mut rng = XorShift64Star::new(11);
    for case in cases() {
        let cache = cache(&case, &mut rng);
        let (got, want) = (run(&case, &cache), expected(&case, &cache));
        // NaN (an unwritten or 0/0 value) must fail, so it is compared, not maxed away.
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - w).abs() < 1e-12, "{:?} {:?}: o[{i}] = {g}, expected {w}", case.paged, case.spec.mask);
        }
    }
}

#[test]
fn decode_geometry_is_checked() {
    let spec = spec(Mask::Causal);
    let error = build_decode(&spec, DecodeKernel::Attention, PagedKv { page_size: 12, partition_keys: 48 }).unwrap_err();
    assert!(error.contains("page size 12: a multiple of 8"), "{error}");
    let error = build_decode(&spec, DecodeKernel::Attention, PagedKv { page_size: 8, partition_keys: 40 }).unwrap_err();
    assert!(error.contains("40 keys per partition: a multiple of the 16-key tile"), "{error}");
}

#[test]
fn decode_kernels_lower_and_assemble_without_spills() {
    for case in cases() {
        for which in [DecodeKernel::Attention, DecodeKernel::Merge, DecodeKernel::Append] {
            let kernel = build_decode(&case.spec, which, case.paged).expect("builds");
            let lowered = ccc::codegen::lower::lower_kernels(&kernel.name, std::slice::from_ref(&kernel)).expect("lowers");
            assemble_without_spills(&kernel.name, &lowered.ptx);
        }
    }
}

/// `ptx` assembles for sm_90a without spills (a missing ptxas fails the test).
fn assemble_without_spills(name: &str, ptx: &str) {
    let reports = ccc::codegen::ptxas::assemble(ptx).unwrap_or_else(|error| panic!("{name}: {error}"));
    for report in reports {
        assert_eq!((report.spill_stores, report.spill_loads, report.stack_frame), (0, 0, 0), "{name}: {report:?}");
    }
}

/// A sequence's new token (position seq_lens[b] − 1) lands in row position % page_size of the
/// page the block table names; an empty slot (seq_lens 0) writes nothing, and every other row of
/// the pool keeps its value.
#[test]
fn kv_append_writes_each_new_token_into_its_page_row_and_nothing_else() {
    let spec = spec(Mask::Causal);
    let paged = PagedKv { page_size: 8, partition_keys: 16 };
    let kernel = build_decode(&spec, DecodeKernel::Append, paged).expect("kv append");
    let (pages, blocks) = (6usize, 3usize);
    // Sequence 0's first token, sequence 1's 14th (row 5 of its second page), an empty slot.
    // Entries a token never reaches are −1.
    let (table, seq_lens) = ([[5i64, 2, -1], [0, 3, -1], [-1, -1, -1]], [1usize, 14, 0]);
    let batch = seq_lens.len();
    let row_len = KV_HEADS * D;
    let mut rng = XorShift64Star::new(5);
    let k: Vec<f64> = (0..batch * row_len).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let v: Vec<f64> = (0..batch * row_len).map(|_| rng.uniform(-1.0, 1.0)).collect();
    let pool = |offset: f64| (0..pages * 8 * row_len).map(|i| offset + i as f64).collect::<Vec<f64>>();
    let mut buffers = Buffers::new();
    buffers.insert("k".into(), k.clone());
    buffers.insert("v".into(), v.clone());
    buffers.insert("block_table".into(), table.iter().flatten().map(|&p| p as f64).collect());
    buffers.insert("seq_lens".into(), seq_lens.iter().map(|&s| s as f64).collect());
    buffers.insert("k_cache".into(), pool(1e4));
    buffers.insert("v_cache".into(), pool(2e4));
    let sizes = SizeEnv { batch: batch as u64, seq_len: 1, sms: Some(INTERPRETER_SMS), pages: Some(pages as u64), blocks: Some(blocks as u64) };
    run_kernel(&kernel, &mut buffers, sizes, Rounding::Exact).expect("runs");
    let (mut want_k, mut want_v) = (pool(1e4), pool(2e4));
    for b in (0..batch).filter(|&b| seq_lens[b] > 0) {
        let position = seq_lens[b] - 1;
        let row = (table[b][position / 8] as usize * 8 + position % 8) * row_len;
        want_k[row..row + row_len].copy_from_slice(&k[b * row_len..(b + 1) * row_len]);
        want_v[row..row + row_len].copy_from_slice(&v[b * row_len..(b + 1) * row_len]);
    }
    assert_eq!(buffers["k_cache"], want_k);
    assert_eq!(buffers["v_cache"], want_v);
}

/// The partitions of the grid come from `blocks`: the kernel must take it as a parameter.
#[test]
fn a_grid_over_the_block_table_needs_its_width_as_a_parameter() {
    let mut kernel = build_decode(&spec(Mask::Causal), DecodeKernel::Attention, PagedKv { page_size: 16, partition_keys: 32 }).expect("builds");
    kernel.params.retain(|param| *param != KernelParam::Size(ccc::ir::size::SizeVar::Blocks));
    let errors = kernel.verify().expect_err("blocks is not a parameter");
    assert!(errors.iter().any(|e| e.ends_with("grid uses blocks but it is not a parameter")), "{errors:?}");
}

/// Every example with a causal or sliding-window mask, at the geometry the serving benchmarks
/// use (pages of 16 keys, 512 keys per partition): the decode kernels lower and assemble
/// without spills. With `CCC_HOPPER_PTX_OUT=DIR` their PTX goes there with `decode.json` (for
/// bench/decode_attention.py, which launches them raw: per kernel its example, stage,
/// parameters in ABI order, threads, shared memory and the geometry).
#[test]
fn decode_kernels_of_every_example_assemble_without_spills() {
    let out = std::env::var_os("CCC_HOPPER_PTX_OUT").map(std::path::PathBuf::from);
    let paged = PagedKv { page_size: 16, partition_keys: 512 };
    let mut descriptions = Vec::new();
    for spec in common::specs::example_files().into_iter().filter(|spec| spec.mask != Mask::None) {
        for which in DecodeKernel::launched_by(&spec) {
            let kernel = build_decode(&spec, which, paged).expect("builds");
            let ptx = ccc::codegen::lower::lower_kernels(&kernel.name, std::slice::from_ref(&kernel)).expect("lowers").ptx;
            assemble_without_spills(&kernel.name, &ptx);
            if let Some(dir) = &out {
                std::fs::create_dir_all(dir).expect("output dir");
                std::fs::write(dir.join(format!("{}.ptx", kernel.name)), &ptx).expect("write ptx");
                descriptions.push(serde_json::json!({
                    "name": kernel.name, "layer": spec.name, "stage": which.suffix(), "elem": spec.dtype.name(),
                    "head_dim": spec.head_dim, "q_heads": spec.query_heads, "kv_heads": spec.kv_heads,
                    "window": match spec.mask { Mask::SlidingWindow { window } => Some(window), _ => None },
                    "softmax_scale": spec.softmax_scale, "page_size": paged.page_size, "partition_keys": paged.partition_keys,
                    "params": kernel.params.iter().map(KernelParam::name).collect::<Vec<_>>(),
                    "threads": kernel.threads(), "dynamic_shared_bytes": kernel.shared_bytes(),
                }));
            }
        }
    }
    if let Some(dir) = &out {
        std::fs::write(dir.join("decode.json"), serde_json::to_string_pretty(&descriptions).expect("json")).expect("write json");
    }
}
