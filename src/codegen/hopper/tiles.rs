//! Tile choice from a resource model: for the attention kernel and each projection GEMM of a
//! spec, every candidate configuration (tile shape, K/V or operand stages, schedule) is checked
//! against the rules of the hardware and of the emitters, and the feasible ones are ranked by an
//! estimate of their time on an H200 at the spec's tuning shape (`tune { batch, seq_len }`, else
//! [`DEFAULT_BATCH`] × [`DEFAULT_SEQ_LEN`]). The driver takes the first;
//! `ccc tune --list` prints the whole table and `ccc tune -o` compiles the top few for
//! `ccc-run tune` to check and time on the GPU.
//!
//! A candidate is rejected, with the reason, when
//! - its wgmma shape is not one the instructions take ([`Rejection::WgmmaShape`]): N a multiple of
//!   8 up to 256, and for attention the key tile also a multiple of 16 (it is the K of `P·V`);
//! - the accumulators a consumer thread holds, plus a reserve for everything else, exceed the
//!   registers its warpgroup gets ([`Rejection::Registers`]): the `setmaxnreg` budget of the
//!   warp-specialized kernels (224 for attention, 232 for the GEMM), else 255;
//! - the emitter refuses the combination ([`Rejection::Schedule`]), e.g. ping-pong with one
//!   consumer warpgroup or too few stages for a schedule;
//! - the config's own `launch()` needs more than 227 KiB of shared memory per block
//!   ([`Rejection::SharedMemory`]).
//!
//! # The cost model
//!
//! Times are in microseconds on the [`SMS`] (132) SMs of an H100 / H200 SXM, with rates fitted
//! to the H200 measurements of BENCHMARKS.md (2026-11-28; clocks as found). What it models, and
//! why:
//!
//! - **Attention**: a CTA's time is its key tiles times the time of one key tile plus a fixed
//!   cost per CTA (load Q, store O and the log-sum-exp). One key tile costs its tensor work
//!   (`4 · block_m · block_n · d` FLOP) at [`ATTENTION_FLOPS_PER_SM`] scaled by the schedule's
//!   measured efficiency ([`schedule_efficiency`]), plus [`ATTENTION_KEY_TILE_NS`] that does not
//!   shrink with the tile (barrier hand-offs, the rescale of O, the row reductions' shuffles).
//!   The measured schedules all had two consumer warpgroups per SM; with fewer, the tensor cores
//!   idle while the only warpgroup runs its softmax, modelled as proportionally slower.
//!   Causal masks give query tile `i` only the key tiles up to its diagonal, sliding windows
//!   only those from its first row's window start on (`HopperAttentionConfig::key_tiles_of`, the
//!   kernel's own loop bounds), so ragged and edge tiles cost whole tiles. The CTAs are then
//!   placed longest first on the SMs × the CTAs that fit on one (registers, shared memory),
//!   CTAs sharing an SM running at its shared rate: wave quantization and the causal tail come
//!   out of that placement (beyond 64 waves the work is spread evenly instead, and beyond 2^20
//!   tokens it is scaled from 2^20, so that any shape the language allows is estimated in
//!   moments).
//! - **Projection GEMMs**: the persistent grid (one CTA per SM) gives each CTA every `SMS`-th
//!   output tile (`128 × block_n`), so the time is `ceil(tiles / SMS)` tiles. A tile is
//!   `ceil(K / 64)` stages, each at the measured rate ([`GEMM_STAGE_NS`] for a 128-wide tile,
//!   proportional to the width), but no faster than L2 delivers its a and W tiles
//!   ([`GEMM_L2_BYTES_PER_NS_PER_SM`]: narrow tiles re-read a for fewer columns) and than the
//!   `stages − 1` loads in flight can deliver over a load latency of [`GEMM_LOAD_LATENCY_NS`]
//!   (Little's law), plus [`GEMM_TILE_NS`] per tile, plus the
//!   epilogue ([`GEMM_EPILOGUE_NS_PER_COLUMN`] per output column): exposed in full by the
//!   cooperative schedule (both warpgroups store while the tensor cores idle), hidden by
//!   ping-pong behind the other warpgroup's mainloop except for the last tile.
//!
//! - **Loads**: the rates above were fitted with cp.async loads; TMA loads scale the attention
//!   key tile by [`ATTENTION_TMA_FACTOR`] and the GEMM mainloop by [`GEMM_TMA_MAINLOOP_FACTOR`],
//!   the ratios measured side by side.
//!
//! Equal estimates go to the candidate with less shared memory (a deeper pipeline that buys
//! nothing only takes room), then to enumeration order.
//!
//! The driver compiles the top-ranked candidate. Every candidate the model finds feasible for
//! ZAYA1's projections, the awkward projections and head widths 64 to 256 is written by
//! `tests/codegen_hopper.rs` and checked on the GPU by `bench/hopper_attention.py` and
//! `bench/hopper_gemm.py` (the sweep's `hopper` step); `ccc tune` times the top candidates, and a
//! tuning file it writes can select any of them (`ccc compile --tuning`).
//!
//! Calibration (`tests/codegen_tiles.rs` checks these): at B = 1, S = 16384 the model estimates
//! the MHA attention kernel (16 heads, d = 128, causal) at 1.772 ms against 1.752 measured
//! standalone, ZAYA1's (8 query heads) at 0.888 ms against 0.871, the schedules' ratios as
//! measured; ZAYA1's out projection at 0.149 ms ping-pong (0.145 measured) and 0.183 cooperative
//! (0.181), its qkv projection at 0.220 ms ping-pong (0.213) and 0.244 cooperative (0.215: that
//! one hid most of its epilogue, which the model exposes in full). The 256-wide cooperative out
//! projection comes out at 0.181 ms against 0.162 measured, still behind ping-pong as measured.
//! The ranking puts the configurations the measurements chose first for every example:
//! attention 128 × 128, 3 stages, ping-pong (measured ahead of warp-specialized by 5% and of the
//! overlapped schedule by 9%); GEMMs 128 wide, 4 stages, ping-pong (ahead of cooperative by 20%
//! on the out projection; 4, 5 and 6 stages alike, the tie going to 4). With TMA (what the
//! driver compiles) the estimates are ZAYA1's attention 0.836 ms, qkv projection 0.172 and out
//! projection 0.117, against 0.766 to 0.878, 0.154 to 0.186 and 0.115 to 0.168 measured for
//! each kernel inside the layer in this session's runs (`ccc-run tune` and
//! `bench/kernel_times.py`, BENCHMARKS.md).

use super::attention::{HopperAttentionConfig, Schedule, WARPGROUP_ROWS};
use super::gemm::TileLoads;
use super::gemm::{self, GEMM_BLOCK_K, GEMM_BLOCK_M, GemmSchedule, HopperGemmConfig};
use super::primitives::WgmmaShape;
use crate::ir::kernel::SHARED_MEMORY_LIMIT_BYTES;
use crate::ir::kernel::layout::WGMMA_K;
use crate::codegen::CodegenError;
use std::fmt;

/// Batch size the model assumes when the spec has no `tune { batch }`.
pub const DEFAULT_BATCH: u64 = 1;
/// Sequence length the model assumes when the spec has no `tune { seq_len }`: the shape of the
/// measurements (BENCHMARKS.md) and of issue 7's targets.
pub const DEFAULT_SEQ_LEN: u64 = 16384;

/// SMs of the H100 / H200 SXM that the model is fitted to and tunes for. Launches do not use it;
/// a persistent grid has as many CTAs as the device has SMs (`SizeVar::SmCount`).
const SMS: u64 = crate::ir::kernel::TARGET_SMS as u64;

/// Registers per consumer thread besides the accumulators (addresses, loop state, the softmax's
/// row statistics): the most that still admits the 128 × 128, d = 128 ping-pong attention kernel
/// (192 accumulator registers under its budget of 224), which assembles without spills.
const ATTENTION_REGISTER_RESERVE: u32 = 32;
/// The same for the GEMM: admits the ping-pong 128-wide tile with a bias (128 accumulators and 32
/// bias values under 232) and rejects the cooperative 256-wide one with a bias (128 + 64), whose
/// epilogue spilled (BENCHMARKS.md, random specs).
const GEMM_REGISTER_RESERVE: u32 = 48;

/// Dense bf16/f16 tensor work one SM does per second in the attention kernel's key loop, fitted to
/// the MHA kernel at 16k (1.752 ms standalone, BENCHMARKS.md).
const ATTENTION_FLOPS_PER_SM: f64 = 5.1e12;
/// Per key tile and CTA, independent of the tile's size (an estimate of ~200 cycles of barrier
/// hand-offs and the O rescale; not measured on its own).
const ATTENTION_KEY_TILE_NS: f64 = 100.0;
/// Per CTA: the Q tile's load latency and the store of O and the log-sum-exp (an estimate, not
/// measured on its own).
const ATTENTION_CTA_NS: f64 = 1500.0;

/// One 64-deep stage of a 128 × 128 output tile, fitted to the ping-pong out projection at 16k
/// (0.145 ms for 16 tiles of 16 stages per CTA).
const GEMM_STAGE_NS: f64 = 560.0;
/// Global-load latency under load that the stages in flight must cover: 4 stages (3 in flight)
/// cover it for 128-wide tiles, as the measurements (4, 5 and 6 stages alike) require.
const GEMM_LOAD_LATENCY_NS: f64 = 1200.0;
/// Bytes per nanosecond one SM receives from L2 while all of them stream (7.9 TB/s over 132 SMs,
/// about what Hopper's L2 delivers): a 128-wide stage (32 KiB) arrives in 546 ns, just inside its
/// 560 ns of tensor work; a 64-wide one (24 KiB for half the work) cannot keep up.
const GEMM_L2_BYTES_PER_NS_PER_SM: f64 = 60.0;
/// Per output tile: accumulators zeroed, the turn barrier, the first stage's wait (an estimate, not
/// measured on its own).
const GEMM_TILE_NS: f64 = 200.0;
/// Epilogue per output column of a 128-row tile, fitted to the cooperative out projection at 16k
/// (0.181 ms against 0.145 ping-pong: 2.25 µs per 128-wide tile).
const GEMM_EPILOGUE_NS_PER_COLUMN: f64 = 2250.0 / 128.0;

/// What TMA loads take off the cp.async-fitted rates above: the kernels measured side by side in
/// the same process (BENCHMARKS.md). Attention: 0.821 against 0.871 ms standalone (ZAYA1, 16k).
/// GEMM mainloop: ZAYA1's qkv and out projections inside the layer, 0.165 against 0.212 and 0.133
/// against 0.174 ms at 16k, about 0.8 of the whole kernel with the epilogue left as it was.
pub const ATTENTION_TMA_FACTOR: f64 = 0.94;
const GEMM_TMA_MAINLOOP_FACTOR: f64 = 0.78;

/// The problem size the estimate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProblemShape {
    pub batch: u64,
    pub seq_len: u64,
}

impl ProblemShape {
    /// The spec's `tune { batch, seq_len }`, defaults where it gives none.
    pub fn of(spec: &crate::spec::AttentionSpec) -> ProblemShape {
        let tune = spec.tune.unwrap_or(crate::spec::TuneShape { batch: None, seq_len: None, kv_len: None });
        ProblemShape {
            batch: tune.batch.map_or(DEFAULT_BATCH, |b| b as u64),
            seq_len: tune.seq_len.map_or(DEFAULT_SEQ_LEN, |s| s as u64),
        }
    }
}

/// Why a candidate cannot run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    WgmmaShape(String),
    Registers { needed: u32, budget: u32 },
    Schedule(String),
    SharedMemory(String),
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rejection::WgmmaShape(why) => write!(f, "wgmma shape: {why}"),
            Rejection::Registers { needed, budget } => {
                write!(f, "registers: {needed} per consumer thread, budget {budget}")
            }
            Rejection::Schedule(why) => write!(f, "schedule: {why}"),
            Rejection::SharedMemory(why) => write!(f, "shared memory: {why}"),
        }
    }
}

/// An emitter's refusal in the words of a rejection.
fn reason(error: CodegenError) -> String {
    match error {
        CodegenError::Unsupported(message) => message,
        CodegenError::Llvm(message) => format!("LLVM: {message}"),
    }
}

/// What a feasible candidate uses and its estimated time.
#[derive(Debug, Clone, PartialEq)]
pub struct Fit {
    pub dynamic_shared_bytes: u32,
    /// Accumulator registers plus the reserve, per consumer thread.
    pub registers: u32,
    pub register_budget: u32,
    /// CTAs that fit on one SM at once.
    pub ctas_per_sm: u32,
    pub micros: f64,
}

/// One configuration of the search and its verdict.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate<C> {
    pub config: C,
    pub verdict: Result<Fit, Rejection>,
}

/// `candidates` in rank order: feasible ones fastest first, then the rejected ones.
fn ranked<C>(mut candidates: Vec<Candidate<C>>) -> Vec<Candidate<C>> {
    // Stable: equal keys keep enumeration order.
    candidates.sort_by(|a, b| match (&a.verdict, &b.verdict) {
        (Ok(x), Ok(y)) => {
            x.micros.total_cmp(&y.micros).then(x.dynamic_shared_bytes.cmp(&y.dynamic_shared_bytes))
        }
        (Ok(_), Err(_)) => std::cmp::Ordering::Less,
        (Err(_), Ok(_)) => std::cmp::Ordering::Greater,
        (Err(_), Err(_)) => std::cmp::Ordering::Equal,
    });
    candidates
}

// ----- attention -------------------------------------------------------------------------------

/// Query rows per CTA the search tries (one or two consumer warpgroups).
pub const ATTENTION_BLOCK_M: [u32; 2] = [64, 128];
/// Key tiles the search tries: powers of two, so that a 128-row query tile's causal diagonal and
/// power-of-two sequence lengths end on a tile boundary. Other multiples of 16 pass the checks
/// ([`check_attention`]) but were never run on the GPU.
pub const ATTENTION_BLOCK_N: [u32; 3] = [64, 128, 256];
pub const ATTENTION_STAGES: std::ops::RangeInclusive<u32> = 3..=5;
pub const ATTENTION_SCHEDULES: [Schedule; 2] = [Schedule::PingPong, Schedule::WarpSpecialized];

/// Measured tensor efficiency of each schedule relative to ping-pong (BENCHMARKS.md, d = 128
/// causal, 16 heads, S = 16384: ping-pong 2.236 ms, warp-specialized 2.364).
pub fn schedule_efficiency(schedule: Schedule) -> f64 {
    match schedule {
        Schedule::PingPong => 1.0,
        Schedule::WarpSpecialized => 2.236 / 2.364,
    }
}

/// Accumulator registers per consumer thread: S (`block_n / 2` f32), O (`d / 2` f32) and P of
/// two tiles (`block_n / 4` packed pairs each: `P·V` of the previous tile overlaps the softmax).
fn attention_accumulators(config: &HopperAttentionConfig) -> u32 {
    config.block_n / 2 + config.head_dim / 2 + 2 * config.block_n / 4
}

/// Checks one attention configuration against the resource rules; `Ok` carries its resources
/// (the estimate is filled in by [`attention_candidates`]).
pub fn check_attention(config: &HopperAttentionConfig) -> Result<Fit, Rejection> {
    for n in [config.block_n, config.head_dim] {
        WgmmaShape { n, elem: config.elem }.validate().map_err(|e| Rejection::WgmmaShape(reason(e)))?;
    }
    if !config.block_n.is_multiple_of(WGMMA_K) {
        return Err(Rejection::WgmmaShape(format!(
            "the key tile {} is the K of P·V: it must be a multiple of {WGMMA_K}",
            config.block_n
        )));
    }
    let budget = crate::ir::kernel::ATTENTION_CONSUMER_REGISTERS;
    let needed = attention_accumulators(config) + ATTENTION_REGISTER_RESERVE;
    if needed > budget {
        return Err(Rejection::Registers { needed, budget });
    }
    // The builder's own rules, then its shared memory against the limit.
    let launch = config.launch().map_err(|e| Rejection::Schedule(reason(e)))?;
    if launch.dynamic_shared_bytes as usize > SHARED_MEMORY_LIMIT_BYTES {
        return Err(Rejection::SharedMemory(format!(
            "Q and {} stages of K/V take {} bytes of shared memory, more than {SHARED_MEMORY_LIMIT_BYTES}",
            config.stages, launch.dynamic_shared_bytes
        )));
    }
    Ok(Fit {
        dynamic_shared_bytes: launch.dynamic_shared_bytes,
        registers: needed,
        register_budget: budget,
        // `.maxntid` with one CTA per SM: setmaxnreg hands out the whole register file.
        ctas_per_sm: 1,
        micros: 0.0,
    })
}

/// Longest sequence the attention estimate places CTAs for; beyond it the time grows with the
/// square of the sequence (the work of both masks), at many waves where placement no longer
/// matters.
const ATTENTION_MODEL_MAX_SEQ_LEN: u64 = 1 << 20;
/// Waves beyond which CTAs are not placed one by one: the time is then the work spread evenly
/// over the slots, or the longest CTA if that is longer.
const PLACEMENT_MAX_WAVES: u64 = 64;

/// Estimated time of a feasible attention configuration at `shape` (see the module doc).
pub fn attention_micros(config: &HopperAttentionConfig, ctas_per_sm: u32, shape: ProblemShape) -> f64 {
    if shape.seq_len > ATTENTION_MODEL_MAX_SEQ_LEN {
        let scale = shape.seq_len as f64 / ATTENTION_MODEL_MAX_SEQ_LEN as f64;
        let at_most = ProblemShape { seq_len: ATTENTION_MODEL_MAX_SEQ_LEN, ..shape };
        return attention_micros(config, ctas_per_sm, at_most) * scale * scale;
    }
    let (bm, bn, d) = (config.block_m as u64, config.block_n as u64, config.head_dim as u64);
    let consumer_warpgroups_per_sm = ctas_per_sm * config.block_m / WARPGROUP_ROWS;
    let occupancy = (consumer_warpgroups_per_sm as f64 / 2.0).min(1.0);
    let rate = ATTENTION_FLOPS_PER_SM * schedule_efficiency(config.schedule) * occupancy;
    let key_tile_ns = ((4 * bm * bn * d) as f64 / rate * 1e9 + ATTENTION_KEY_TILE_NS) * ATTENTION_TMA_FACTOR;
    let seq = shape.seq_len.max(1);
    let query_tiles = seq.div_ceil(bm);
    // Key tiles per query tile, longest first (the kernel's order).
    let mut key_tiles: Vec<u64> = (0..query_tiles)
        .rev()
        .map(|i| config.key_tiles_of(i, seq))
        .collect();
    key_tiles.sort_unstable_by(|a, b| b.cmp(a));
    let ctas_per_query_tile = shape.batch * config.q_heads as u64;
    // Each of the co-resident CTAs gets its share of the SM.
    let share = ctas_per_sm as f64;
    let slots = SMS * ctas_per_sm as u64;
    let jobs = key_tiles.iter().map(|&tiles| ((tiles as f64 * key_tile_ns) * share + ATTENTION_CTA_NS, ctas_per_query_tile));
    let ctas = query_tiles.saturating_mul(ctas_per_query_tile);
    let makespan_ns = if ctas > PLACEMENT_MAX_WAVES * slots {
        let (work, longest) =
            jobs.fold((0.0, 0.0_f64), |(work, longest), (duration, count)| (work + duration * count as f64, longest.max(duration)));
        (work / slots as f64).max(longest)
    } else {
        longest_first_makespan(jobs, slots as usize)
    };
    makespan_ns / 1e3
}

/// Makespan (ns) of jobs `(duration, count)`, given longest first, placed greedily on the
/// earliest free of `slots`.
fn longest_first_makespan(jobs: impl Iterator<Item = (f64, u64)>, slots: usize) -> f64 {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    // Free times in integer picoseconds, so that the heap orders them exactly.
    let mut free: BinaryHeap<Reverse<u64>> = (0..slots.max(1)).map(|_| Reverse(0)).collect();
    let mut end = 0u64;
    for (duration, count) in jobs {
        let duration = (duration * 1e3).round() as u64;
        let mut left = count;
        while left > 0 {
            let Some(Reverse(start)) = free.pop() else { break };
            // Every slot free at the same time takes one job each: place them in one step.
            let mut together = 1;
            while together < left && free.peek() == Some(&Reverse(start)) {
                free.pop();
                together += 1;
            }
            let finish = start + duration;
            end = end.max(finish);
            for _ in 0..together {
                free.push(Reverse(finish));
            }
            left -= together;
        }
    }
    end as f64 / 1e3
}

/// Every attention candidate derived from `base` (its tile, stages and schedule replaced), ranked
/// at `shape`: feasible ones fastest first, then the rejected ones in enumeration order.
pub fn attention_candidates(base: &HopperAttentionConfig, shape: ProblemShape) -> Vec<Candidate<HopperAttentionConfig>> {
    let mut candidates = Vec::new();
    for schedule in ATTENTION_SCHEDULES {
        for block_m in ATTENTION_BLOCK_M {
            for block_n in ATTENTION_BLOCK_N {
                for stages in ATTENTION_STAGES {
                    let config = HopperAttentionConfig { block_m, block_n, stages, schedule, ..base.clone() };
                    let verdict = check_attention(&config).map(|fit| Fit {
                        micros: attention_micros(&config, fit.ctas_per_sm, shape),
                        ..fit
                    });
                    candidates.push(Candidate { config, verdict });
                }
            }
        }
    }
    ranked(candidates)
}

/// The configuration the driver compiles: the top-ranked feasible candidate, if any. Every
/// candidate the model can find feasible runs on the GPU in `bench/hopper_attention.py` and
/// `bench/hopper_gemm.py` (`tests/codegen_hopper.rs` writes them all).
fn chosen<C>(candidates: Vec<Candidate<C>>) -> Option<C> {
    candidates.into_iter().find(|c| c.verdict.is_ok()).map(|c| c.config)
}

/// The attention configuration the driver compiles for `base` at `shape` (see [`chosen`]).
pub fn best_attention(base: &HopperAttentionConfig, shape: ProblemShape) -> Option<HopperAttentionConfig> {
    chosen(attention_candidates(base, shape))
}

// ----- projection GEMM -------------------------------------------------------------------------

/// Output columns per tile the search tries.
pub const GEMM_BLOCK_N: [u32; 4] = [64, 128, 192, 256];
pub const GEMM_STAGES: std::ops::RangeInclusive<u32> = 3..=6;
pub const GEMM_SCHEDULES: [GemmSchedule; 2] = [GemmSchedule::PingPong, GemmSchedule::Cooperative];

/// Accumulator registers per consumer thread (a ping-pong warpgroup holds the whole 128-row tile,
/// two m64 blocks), plus the bias values its epilogue holds (`block_n / 4` per thread).
fn gemm_accumulators(config: &HopperGemmConfig) -> u32 {
    let accumulators = match config.schedule {
        GemmSchedule::Cooperative => config.block_n / 2,
        GemmSchedule::PingPong => config.block_n,
    };
    let bias = if config.segments.iter().any(|s| s.bias.is_some()) { config.block_n / 4 } else { 0 };
    accumulators + bias
}

/// Checks one GEMM configuration against the resource rules.
pub fn check_gemm(config: &HopperGemmConfig) -> Result<Fit, Rejection> {
    WgmmaShape { n: config.block_n, elem: config.elem }
        .validate()
        .map_err(|e| Rejection::WgmmaShape(reason(e)))?;
    let budget = gemm::CONSUMER_REGISTERS;
    let needed = gemm_accumulators(config) + GEMM_REGISTER_RESERVE;
    if needed > budget {
        return Err(Rejection::Registers { needed, budget });
    }
    config.validate().map_err(|e| Rejection::Schedule(reason(e)))?;
    let launch = config.launch().map_err(|e| Rejection::SharedMemory(reason(e)))?;
    Ok(Fit {
        dynamic_shared_bytes: launch.dynamic_shared_bytes,
        registers: needed,
        register_budget: budget,
        ctas_per_sm: 1,
        micros: 0.0,
    })
}

/// Estimated time of a feasible GEMM configuration at `shape` (see the module doc).
pub fn gemm_micros(config: &HopperGemmConfig, shape: ProblemShape) -> f64 {
    // In f64: B · S / 128 · column tiles passes u64 at the largest shapes `ccc tune` accepts.
    let row_tiles = shape.batch as f64 * shape.seq_len.div_ceil(GEMM_BLOCK_M as u64) as f64;
    let tiles_per_cta = (row_tiles * config.column_tiles() as f64 / SMS as f64).ceil();
    let width = config.block_n as f64 / 128.0;
    let in_flight = config.stages.saturating_sub(1).max(1) as f64;
    let stage_bytes = ((GEMM_BLOCK_M + config.block_n) * GEMM_BLOCK_K * config.elem.bytes()) as f64;
    let stage_ns = (GEMM_STAGE_NS * width)
        .max(stage_bytes / GEMM_L2_BYTES_PER_NS_PER_SM)
        .max(GEMM_LOAD_LATENCY_NS / in_flight);
    let loads = match config.loads {
        TileLoads::Tma => GEMM_TMA_MAINLOOP_FACTOR,
        TileLoads::CpAsync => 1.0,
    };
    let mainloop_ns = config.k.div_ceil(GEMM_BLOCK_K) as f64 * stage_ns * loads;
    let epilogue_ns = GEMM_EPILOGUE_NS_PER_COLUMN * config.block_n as f64;
    let total_ns = match config.schedule {
        GemmSchedule::Cooperative => tiles_per_cta * (GEMM_TILE_NS + mainloop_ns + epilogue_ns),
        GemmSchedule::PingPong => {
            let exposed = (epilogue_ns - mainloop_ns).max(0.0);
            tiles_per_cta * (GEMM_TILE_NS + mainloop_ns + exposed) + epilogue_ns - exposed
        }
    };
    total_ns / 1e3
}

/// Every GEMM candidate derived from `base`, ranked at `shape`.
pub fn gemm_candidates(base: &HopperGemmConfig, shape: ProblemShape) -> Vec<Candidate<HopperGemmConfig>> {
    let mut candidates = Vec::new();
    for schedule in GEMM_SCHEDULES {
        for block_n in GEMM_BLOCK_N {
            for stages in GEMM_STAGES {
                let config = HopperGemmConfig { block_n, stages, schedule, ..base.clone() };
                let verdict = check_gemm(&config).map(|fit| Fit { micros: gemm_micros(&config, shape), ..fit });
                candidates.push(Candidate { config, verdict });
            }
        }
    }
    ranked(candidates)
}

/// The GEMM configuration the driver compiles for `base` at `shape` (see [`chosen`]).
pub fn best_gemm(base: &HopperGemmConfig, shape: ProblemShape) -> Option<HopperGemmConfig> {
    chosen(gemm_candidates(base, shape))
}

// ----- listing ---------------------------------------------------------------------------------

/// The columns of a candidate's configuration in a listing.
pub trait TileColumns {
    /// Column headings, aligned with [`TileColumns::columns`].
    fn headings() -> String;
    fn columns(&self) -> String;
}

impl TileColumns for HopperAttentionConfig {
    fn headings() -> String {
        format!("{:>7} {:>7} {:>6} {:<15} {:<7}", "block_m", "block_n", "stages", "schedule", "loads")
    }
    fn columns(&self) -> String {
        format!("{:>7} {:>7} {:>6} {:<15} {:<7}", self.block_m, self.block_n, self.stages, format!("{:?}", self.schedule), "Tma")
    }
}

impl TileColumns for HopperGemmConfig {
    fn headings() -> String {
        format!("{:>7} {:>6} {:<15} {:<7}", "block_n", "stages", "schedule", "loads")
    }
    fn columns(&self) -> String {
        format!(
            "{:>7} {:>6} {:<15} {:<7}",
            self.block_n,
            self.stages,
            format!("{:?}", self.schedule),
            format!("{:?}", self.loads)
        )
    }
}

/// A table of ranked `candidates` of one kernel: the feasible ones with their rank, shared
/// memory, registers, CTAs per SM and estimated time (the first is the one compiled), then the
/// rejected ones with their reason.
pub fn listing<C: TileColumns>(kernel: &str, kind: &str, shape: ProblemShape, candidates: &[Candidate<C>]) -> String {
    let mut out = format!("{kernel}: {kind}, estimated at B = {}, S = {}\n", shape.batch, shape.seq_len);
    out += &format!(
        "  {:>4} {} {:>8} {:>9} {:>7} {:>10}\n",
        "rank",
        C::headings(),
        "shared",
        "registers",
        "CTAs/SM",
        "est. µs"
    );
    let mut rank = 0;
    for candidate in candidates {
        if let Ok(fit) = &candidate.verdict {
            rank += 1;
            let mark = if rank == 1 { "  <- compiled" } else { "" };
            out += &format!(
                "  {rank:>4} {} {:>8} {:>9} {:>7} {:>10.1}{mark}\n",
                candidate.config.columns(),
                fit.dynamic_shared_bytes,
                format!("{}/{}", fit.registers, fit.register_budget),
                fit.ctas_per_sm,
                fit.micros
            );
        }
    }
    // Without a choice the driver compiles the kernel IR's attention, or the GEMM's default.
    let fallback =
        if kind == "attention" { "the kernel IR's attention is compiled instead" } else { "the kernel keeps its default configuration" };
    if rank == 0 {
        out += &format!("  (no feasible candidate: {fallback})\n");
    }
    let rejected: Vec<_> = candidates.iter().filter_map(|c| c.verdict.as_ref().err().map(|r| (c, r))).collect();
    if !rejected.is_empty() {
        out += &format!("  rejected ({}):\n", rejected.len());
        for (candidate, reason) in rejected {
            out += &format!("       {}  {reason}\n", candidate.config.columns());
        }
    }
    out
}

// ----- tuning files ----------------------------------------------------------------------------

use crate::tuning::TileChoice;

/// The tiles of `config` as a tuning file names them.
pub fn attention_tiles(config: &HopperAttentionConfig) -> TileChoice {
    TileChoice::Attention {
        block_m: config.block_m,
        block_n: config.block_n,
        stages: config.stages,
        schedule: format!("{:?}", config.schedule),
        loads: format!("{:?}", TileLoads::Tma),
    }
}

/// The tiles of `config` as a tuning file names them.
pub fn gemm_tiles(config: &HopperGemmConfig) -> TileChoice {
    TileChoice::Gemm {
        block_n: config.block_n,
        stages: config.stages,
        schedule: format!("{:?}", config.schedule),
        loads: format!("{:?}", config.loads),
    }
}

/// The loads a tuning file may name: the kernel-IR builders load with TMA only (cp.async
/// remains a mode of the GEMM cost model, which was fitted on cp.async kernels).
const TILE_LOADS: [TileLoads; 1] = [TileLoads::Tma];

/// The choice a tuning file names `name` (schedules and loads by their Rust names); `what` and
/// `kernel` say in the error which field of which kernel it was.
fn named<T: Copy + fmt::Debug>(choices: &[T], name: &str, what: &str, kernel: &str) -> Result<T, String> {
    choices.iter().copied().find(|choice| format!("{choice:?}") == name).ok_or_else(|| {
        let names: Vec<String> = choices.iter().map(|choice| format!("{choice:?}")).collect();
        format!("unknown {what} `{name}` for {kernel} (one of {})", names.join(", "))
    })
}

/// `config` with the tiles of `choice`, checked against the resource rules; errors say why not.
pub fn with_attention_tiles(config: &HopperAttentionConfig, choice: &TileChoice) -> Result<HopperAttentionConfig, String> {
    let TileChoice::Attention { block_m, block_n, stages, schedule, loads } = choice else {
        return Err(format!("{} is an attention kernel; the tuning gives it GEMM tiles ({choice})", config.name));
    };
    let schedule = named(&ATTENTION_SCHEDULES, schedule, "attention schedule", &config.name)?;
    named(&TILE_LOADS, loads, "loads", &config.name)?;
    let tuned = HopperAttentionConfig { block_m: *block_m, block_n: *block_n, stages: *stages, schedule, ..config.clone() };
    check_attention(&tuned).map_err(|rejection| format!("the tiles {choice} of {} are rejected: {rejection}", config.name))?;
    Ok(tuned)
}

/// `config` with the tiles of `choice`, checked against the resource rules; errors say why not.
pub fn with_gemm_tiles(config: &HopperGemmConfig, choice: &TileChoice) -> Result<HopperGemmConfig, String> {
    let TileChoice::Gemm { block_n, stages, schedule, loads } = choice else {
        return Err(format!("{} is a projection GEMM; the tuning gives it attention tiles ({choice})", config.name));
    };
    let schedule = named(&GEMM_SCHEDULES, schedule, "GEMM schedule", &config.name)?;
    let loads = named(&TILE_LOADS, loads, "loads", &config.name)?;
    let tuned = HopperGemmConfig { block_n: *block_n, stages: *stages, schedule, loads, ..config.clone() };
    check_gemm(&tuned).map_err(|rejection| format!("the tiles {choice} of {} are rejected: {rejection}", config.name))?;
    Ok(tuned)
}
