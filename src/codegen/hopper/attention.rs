//! Flash-attention forward on wgmma, with the ABI of the kernel-IR attention kernel
//! (q, k, v, o, lse, B, S) so that it can replace it on Hopper.
//!
//! One CTA computes `block_m` query rows of one query head of one batch element with
//! `block_m / 64` consumer warpgroups, each owning 64 rows (plus, in the warp-specialized
//! schedules, a producer warpgroup that only copies). Q and streamed K/V tiles live in 128-byte
//! swizzled shared tiles ([`Swizzle128BTile`]), copied through `stages` buffers with cp.async
//! or, as an option of the warp-specialized schedules, with TMA ([`TileLoads`]).
//! How the GEMMs, the softmax and the copies are ordered is the [`Schedule`].
//! Per key tile and warpgroup: `S = Q · Kᵀ` with wgmma from shared memory (both K-major),
//! the mask only on tiles that cross the causal diagonal, a sliding window's start or the
//! sequence end (a window's CTA skips the key tiles before it), online softmax on
//! the accumulator fragments in log2 units (`exp2(s · scale · log2 e − m)` as one FMA + `ex2`),
//! `P` rounded to bf16/f16 in registers, and `O += P · V` with wgmma taking A from registers and
//! V from shared memory as an MN-major operand (no transpose pass). Row sums stay per thread
//! until the end. CTAs take query tiles longest first within groups of heads whose K/V fits
//! L2 ([`work_item`]).
//!
//! Parameters (ABI order): `q [B, S, Hq, d]`, `k [B, S, Hk, d]`, `v [B, S, Hk, d]`,
//! `o [B, S, Hq, d]` in the storage type, `lse [B, Hq, S]` f32 (natural log), then `B`, `S` (u32)
//! (with TMA loads, then the tensor maps `q_map`, `k_map`, `v_map`).
//! Grid `(ceil(S / block_m), Hq, B)`, [`HopperLaunch::threads`] threads,
//! [`HopperLaunch::dynamic_shared_bytes`] of dynamic shared memory (raise the kernel's
//! limit first: it is above 48 KiB).

use inkwell::IntPredicate;
use inkwell::attributes::AttributeLoc;
use inkwell::values::{BasicValueEnum, FloatValue, IntValue, PointerValue};

use super::HopperLaunch;
use super::copy::{Bounds, RowSource, aligned_tile_address, copy_tile_async, descriptor};
use crate::ir::kernel::layout::{OperandMajor, Swizzle128BTile, TILE_ALIGNMENT, WGMMA_K};
use super::primitives::{Accumulate, WgmmaA, WgmmaShape};
use crate::codegen::{CodegenError, Elem, KernelBuilder, ParamKind, PtxModule, Result, SpecialRegister, unsupported};
use crate::ir::size::SizeExpr;
use crate::manifest::KernelParamManifest;

/// Rows of Q one consumer warpgroup owns (the wgmma M).
pub const WARPGROUP_ROWS: u32 = 64;
const WARPGROUP_THREADS: u32 = 128;
/// Shared memory one CTA may use on sm_90 (227 KiB).
const MAX_SHARED_BYTES: u32 = crate::ir::kernel::SHARED_MEMORY_LIMIT_BYTES as u32;

/// The inputs that shape the wgmma attention kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct HopperAttentionConfig {
    pub name: String,
    /// Storage type of q, k, v, o (bf16 or f16).
    pub elem: Elem,
    /// 64 or 128.
    pub head_dim: u32,
    pub q_heads: u32,
    pub kv_heads: u32,
    pub causal: bool,
    /// A sliding window on top of the causal mask: query t sees keys t − window + 1 ..= t. The
    /// CTA then runs only the key tiles that meet its rows' windows, masking those at either end.
    pub window: Option<u32>,
    /// Multiplies q·k before the softmax (usually 1/√d).
    pub softmax_scale: f64,
    /// Query rows per CTA: 64 per warpgroup, one or two warpgroups.
    pub block_m: u32,
    /// Keys per K/V tile (the N of `S = Q · Kᵀ`, the K of `O += P · V`).
    pub block_n: u32,
    /// K/V shared buffers (at least 2 for [`Schedule::Serial`], 3 for [`Schedule::OverlapSoftmax`]).
    pub stages: u32,
    pub schedule: Schedule,
    /// K/V bytes of the heads that CTAs work on together (the CTA work order: longest causal
    /// rows first within each group of heads); whole kv heads, at least one.
    pub l2_group_bytes: u32,
    pub loads: TileLoads,
}

/// How the producer warpgroup of the warp-specialized schedules fills the shared tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TileLoads {
    /// Its 128 threads copy 16-byte chunks (cp.async); each thread's copies arrive on the tile's
    /// full barrier as they land.
    CpAsync,
    /// One thread issues TMA box copies (`cp.async.bulk.tensor.4d`, one per 64-column panel of
    /// Q, K and V) that count their bytes on the full barrier. The kernel then takes three more
    /// parameters after `S`: `q_map`, `k_map`, `v_map`, the 128-byte tensor maps
    /// (`cuTensorMapEncodeTiled`, by value as `__grid_constant__` parameters) of q, k and v seen
    /// as 4-d tensors (d, heads, S, B), innermost
    /// first, with boxes of 64 × 1 × rows × 1 (rows: block_m for q, block_n for k and v),
    /// 128-byte swizzle and zero fill: rows past S read as zeros, as with cp.async.
    Tma,
}

/// How each warpgroup orders its two GEMMs and the softmax within one key tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Schedule {
    /// `S = Q·Kᵀ`, wait, softmax, `O += P·V`, wait: the tensor cores idle during the softmax
    /// unless the other warpgroup happens to fill them.
    Serial,
    /// Iteration j issues `S_j = Q·K_jᵀ` and `O += P_{j-1}·V_{j-1}` back to back, waits only for
    /// `S_j`, and runs the softmax of tile j while `P·V` is still on the tensor cores
    /// (FlashAttention-3's intra-warpgroup overlap). Keeps P of two tiles live, and V of tile
    /// j - 1 in shared memory while tile j + 1 loads, so it needs 3 stages.
    OverlapSoftmax,
    /// [`Schedule::OverlapSoftmax`] in the consumer warpgroups, plus one producer warpgroup that
    /// does all cp.async copies (Q with the first tile) and hands stages over through `mbarrier`s
    /// (full: the copies arrive on it as they land, `cp.async.mbarrier.arrive`; empty:
    /// consumers → producer) instead of CTA-wide barriers,
    /// so that the consumer warpgroups drift apart and one's softmax overlaps the other's GEMMs.
    /// `setmaxnreg` moves registers from the producer (56) to the consumers (224).
    WarpSpecialized,
    /// [`Schedule::WarpSpecialized`] with two consumer warpgroups taking turns to issue their
    /// GEMMs (named barriers 1 and 2, FlashAttention-3's ping-pong): each one's softmax then
    /// runs while the other's GEMMs occupy the tensor cores.
    PingPong,
}

/// Per-thread registers of the producer warpgroup of [`Schedule::WarpSpecialized`]: values
/// computed before the role split stay live in it, and with 40 ptxas spills one of them.
const PRODUCER_REGISTERS: u32 = 56;
/// Per-thread registers of its consumer warpgroups: the rest of the CTA's 3 · 168.
pub(crate) const CONSUMER_REGISTERS: u32 = 224;
const _: () = assert!(super::registers_fit(PRODUCER_REGISTERS, CONSUMER_REGISTERS));

impl HopperAttentionConfig {
    /// A human-readable description used as part of a cache key.
    pub fn describe(&self) -> String {
        format!(
            "attention-wgmma {} elem={} d={} hq={} hk={} causal={} window={:?} scale={:e} tile={}x{} stages={} schedule={:?} l2-group={} loads={:?}",
            self.name,
            self.elem.name(),
            self.head_dim,
            self.q_heads,
            self.kv_heads,
            self.causal,
            self.window,
            self.softmax_scale,
            self.block_m,
            self.block_n,
            self.stages,
            self.schedule,
            self.l2_group_bytes,
            self.loads
        )
    }

    /// Threads, shared memory and grid of the kernel this config emits, without emitting it
    /// (what a PTX cache hit needs for the manifest).
    pub fn launch(&self) -> Result<HopperLaunch> {
        self.validate()?;
        let plan = SharedPlan::new(self)?;
        let consumer_threads = self.block_m / WARPGROUP_ROWS * WARPGROUP_THREADS;
        let threads = match self.schedule {
            Schedule::WarpSpecialized | Schedule::PingPong => consumer_threads + WARPGROUP_THREADS,
            Schedule::Serial | Schedule::OverlapSoftmax => consumer_threads,
        };
        let extra_params = self
            .tensor_maps()
            .into_iter()
            .map(|(buffer, box_rows, _)| KernelParamManifest::TensorMap { buffer: buffer.to_string(), box_rows })
            .collect();
        Ok(HopperLaunch {
            threads,
            dynamic_shared_bytes: plan.total_bytes + TILE_ALIGNMENT,
            grid: [
                SizeExpr::seq_len().ceil_div(self.block_m as u64),
                SizeExpr::c(self.q_heads as u64),
                SizeExpr::batch(),
            ],
            extra_params,
        })
    }

    /// With TMA loads, the tensor maps the kernel takes after `S`: (buffer, box rows, parameter
    /// name) for q (block_m rows), k and v (block_n rows).
    fn tensor_maps(&self) -> Vec<(&'static str, u32, &'static str)> {
        match self.loads {
            TileLoads::CpAsync => Vec::new(),
            TileLoads::Tma => vec![("q", self.block_m, "q_map"), ("k", self.block_n, "k_map"), ("v", self.block_n, "v_map")],
        }
    }

    /// Key tiles the CTA of query tile `query_tile` runs over a sequence of `seq` tokens (what
    /// the kernel's loop bounds compute, for the cost model).
    pub fn key_tiles_of(&self, query_tile: u64, seq: u64) -> u64 {
        let (bm, bn) = (self.block_m as u64, self.block_n as u64);
        let query_start = query_tile * bm;
        let end = if self.causal { (query_start + bm).min(seq).div_ceil(bn) } else { seq.div_ceil(bn) };
        let first = match self.window {
            Some(window) => (query_start + 1).saturating_sub(window as u64) / bn,
            None => 0,
        };
        end.saturating_sub(first)
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.elem == Elem::F32 {
            return unsupported("attention operands are bf16 or f16");
        }
        if self.window.is_some_and(|window| window == 0 || !self.causal) {
            return unsupported("a sliding window is a causal mask of at least one key");
        }
        if self.kv_heads == 0 || !self.q_heads.is_multiple_of(self.kv_heads) {
            return unsupported(format!("{} query heads do not group over {} kv heads", self.q_heads, self.kv_heads));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(64) || self.head_dim > 256 {
            return unsupported(format!(
                "the wgmma attention kernel takes head_dim 64, 128, 192 or 256 (whole 128-byte panels, wgmma N ≤ 256), not {}",
                self.head_dim
            ));
        }
        // Three warpgroups would leave 170 registers per thread: S, O and P do not fit without
        // warp specialization and setmaxnreg.
        if self.block_m != WARPGROUP_ROWS && self.block_m != 2 * WARPGROUP_ROWS {
            return unsupported(format!("block_m must be 64 or 128 (64 rows per warpgroup), not {}", self.block_m));
        }
        if self.block_n == 0 || !self.block_n.is_multiple_of(WGMMA_K) || self.block_n > 256 {
            return unsupported(format!("block_n must be a multiple of 16 up to 256, not {}", self.block_n));
        }
        let least_stages = match self.schedule {
            Schedule::Serial => 2,
            Schedule::OverlapSoftmax | Schedule::WarpSpecialized | Schedule::PingPong => 3,
        };
        if self.schedule == Schedule::PingPong && self.block_m != 2 * WARPGROUP_ROWS {
            return unsupported("the ping-pong schedule alternates two consumer warpgroups: block_m must be 128");
        }
        if self.loads == TileLoads::Tma && !matches!(self.schedule, Schedule::WarpSpecialized | Schedule::PingPong) {
            return unsupported("TMA loads are issued by the producer warpgroup of the warp-specialized schedules");
        }
        if self.stages > super::MAX_STAGES {
            return unsupported(format!("{} K/V stages: at most {}", self.stages, super::MAX_STAGES));
        }
        if self.stages < least_stages {
            return unsupported(format!("the {:?} schedule needs at least {least_stages} K/V stages", self.schedule));
        }
        Ok(())
    }
}


/// Whether the softmax of a tile applies the mask (sequence end, causal diagonal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Masking {
    Never,
    Always,
    /// Branches on whether the tile needs it (only where no wgmma is in flight).
    WhenNeeded,
}

/// Shared tiles of one CTA, at byte offsets from the 1024-aligned base.
struct SharedPlan {
    q: Swizzle128BTile,
    kv: Swizzle128BTile,
    stage_bytes: u32,
    /// Where the `mbarrier`s start (after the tiles): `full[stages]`, then `empty[stages]`.
    barriers_offset: u32,
    /// 4-byte words, one per consumer thread, the overlapped schedules store to as a scheduling
    /// anchor (after the barriers).
    anchor_offset: u32,
    total_bytes: u32,
}

impl SharedPlan {
    fn new(config: &HopperAttentionConfig) -> Result<Self> {
        let q = Swizzle128BTile::new(config.elem, config.block_m, config.head_dim)?;
        let kv = Swizzle128BTile::new(config.elem, config.block_n, config.head_dim)?;
        let stage_bytes = 2 * kv.footprint_bytes();
        let barriers_offset = q.footprint_bytes() + config.stages * stage_bytes;
        let barrier_bytes = match config.schedule {
            Schedule::WarpSpecialized | Schedule::PingPong => 2 * config.stages * 8,
            Schedule::Serial | Schedule::OverlapSoftmax => 0,
        };
        let anchor_offset = barriers_offset + barrier_bytes;
        // One word per consumer thread: a word all of them stored to would be a write-write
        // race (compute-sanitizer's racecheck reports it), though nothing reads it.
        let anchor_bytes = match config.schedule {
            Schedule::OverlapSoftmax | Schedule::WarpSpecialized | Schedule::PingPong => {
                config.block_m / WARPGROUP_ROWS * WARPGROUP_THREADS * 4
            }
            Schedule::Serial => 0,
        };
        let total_bytes = anchor_offset + anchor_bytes;
        if total_bytes + TILE_ALIGNMENT > MAX_SHARED_BYTES {
            return unsupported(format!(
                "Q and {} stages of K/V take {} bytes of shared memory, more than {MAX_SHARED_BYTES}",
                config.stages,
                total_bytes + TILE_ALIGNMENT
            ));
        }
        Ok(SharedPlan { q, kv, stage_bytes, barriers_offset, anchor_offset, total_bytes })
    }

    fn k_offset(&self, stage: u32) -> u32 {
        self.q.footprint_bytes() + stage * self.stage_bytes
    }
}

/// Emits the wgmma attention forward kernel into `module`.
pub fn emit_attention_wgmma<'ctx>(
    module: &PtxModule<'ctx>,
    config: &HopperAttentionConfig,
) -> Result<HopperLaunch> {
    config.validate()?;
    let plan = SharedPlan::new(config)?;
    let warpgroups = config.block_m / WARPGROUP_ROWS;
    // Threads that compute (and, without a producer, also copy).
    let consumer_threads = warpgroups * WARPGROUP_THREADS;
    let warp_specialized = matches!(config.schedule, Schedule::WarpSpecialized | Schedule::PingPong);
    let threads = match config.schedule {
        Schedule::WarpSpecialized | Schedule::PingPong => consumer_threads + WARPGROUP_THREADS,
        Schedule::Serial | Schedule::OverlapSoftmax => consumer_threads,
    };
    let group = config.q_heads / config.kv_heads;
    let d = config.head_dim;
    let scores_shape = WgmmaShape { n: config.block_n, elem: config.elem };
    let output_shape = WgmmaShape { n: d, elem: config.elem };
    scores_shape.validate()?;
    output_shape.validate()?;

    let params = [
        ParamKind::GlobalPointer("q".into()),
        ParamKind::GlobalPointer("k".into()),
        ParamKind::GlobalPointer("v".into()),
        ParamKind::GlobalPointer("o".into()),
        ParamKind::GlobalPointer("lse".into()),
        ParamKind::Size("B".into()),
        ParamKind::Size("S".into()),
    ];
    let tensor_map_params: Vec<&str> = config.tensor_maps().into_iter().map(|(_, _, param)| param).collect();
    let params: Vec<ParamKind> =
        params.into_iter().chain(tensor_map_params.iter().map(|name| ParamKind::TensorMap(name.to_string()))).collect();
    let shared = module.dynamic_shared(&format!("{}_shared", config.name));
    let kb = module.declare_kernel(&config.name, &params)?;
    if warp_specialized {
        // setmaxnreg needs a register cap at entry: `.maxntid` with one CTA per SM.
        for (key, value) in [("nvvm.maxntid", threads.to_string()), ("nvvm.minctasm", "1".to_string())] {
            kb.function().add_attribute(AttributeLoc::Function, kb.context().create_string_attribute(key, &value));
        }
    }
    let seq_len = kb.size_param("S")?;
    let thread = kb.thread_index()?;
    let lane = kb.lane()?;
    let warpgroup = kb.warp_uniform(kb.div(thread, kb.i32(WARPGROUP_THREADS as i64))?)?;
    let warp_in_group = kb.rem(kb.div(thread, kb.i32(32))?, kb.i32(4))?;
    let query_tiles = kb.ceil_div(seq_len, config.block_m)?;
    let (head, query_tile) = work_item(&kb, config, seq_len, query_tiles)?;
    let query_start = kb.mul(query_tile, kb.i32(config.block_m as i64))?;
    let batch = kb.special_register(SpecialRegister::BlockZ)?;
    let kv_head = kb.div(head, kb.i32(group as i64))?;

    let raw_address = kb.shared_address(shared)?;
    let aligned_address = aligned_tile_address(&kb, raw_address)?;
    let aligned = kb.byte_pointer(shared, kb.sub(aligned_address, raw_address)?)?;

    let head_rows = |name: &str, heads: u32, head: IntValue<'ctx>| -> Result<RowSource<'ctx>> {
        let i64_type = kb.context().i64_type();
        let rows_before = kb.builder().build_int_mul(kb.to_i64(batch)?, kb.to_i64(seq_len)?, "")?;
        let head_index = kb.builder().build_int_add(
            kb.builder().build_int_mul(rows_before, i64_type.const_int(heads as u64, false), "")?,
            kb.to_i64(head)?,
            "",
        )?;
        let offset = kb.builder().build_int_mul(head_index, i64_type.const_int(d as u64, false), "")?;
        Ok(RowSource { base: kb.element_pointer(kb.pointer_param(name)?, config.elem, offset)?, row_stride: heads * d })
    };
    let q_rows = head_rows("q", config.q_heads, head)?;
    let k_rows = head_rows("k", config.kv_heads, kv_head)?;
    let v_rows = head_rows("v", config.kv_heads, kv_head)?;
    let o_rows = head_rows("o", config.q_heads, head)?;

    // Thread-local row of accumulator half `h` (registers with (i / 2) % 2 == h) and the column
    // of register 0; see `KernelBuilder::wgmma`.
    let fragment_row = kb.add(
        kb.add(kb.mul(warpgroup, kb.i32(WARPGROUP_ROWS as i64))?, kb.mul(warp_in_group, kb.i32(16))?)?,
        kb.div(lane, kb.i32(4))?,
    )?;
    let rows = [fragment_row, kb.add(fragment_row, kb.i32(8))?];
    let pair_col = kb.mul(kb.rem(lane, kb.i32(4))?, kb.i32(2))?;

    // The CTA's key tiles are `first_tile + i` for i in 0..key_tiles: the loops, stages and
    // barrier phases count i, the keys come from first_tile + i (0 unless a sliding window
    // leaves the first tiles out).
    let block_n = kb.i32(config.block_n as i64);
    let not_below_zero = |kb: &KernelBuilder<'_, 'ctx>, value: IntValue<'ctx>| -> Result<IntValue<'ctx>> {
        kb.select_int(kb.lt(value, kb.i32(0))?, kb.i32(0), value)
    };
    let first_tile = match config.window {
        // The first key of the first row's window, max(0, query_start − window + 1).
        Some(window) => kb.div(not_below_zero(&kb, kb.sub(query_start, kb.i32(window as i64 - 1))?)?, block_n)?,
        None => kb.i32(0),
    };
    let key_tiles_in_sequence = kb.ceil_div(seq_len, config.block_n)?;
    let end_tile = if config.causal {
        let query_end = kb.add(query_start, kb.i32(config.block_m as i64))?;
        kb.min(kb.ceil_div(query_end, config.block_n)?, key_tiles_in_sequence)?
    } else {
        key_tiles_in_sequence
    };
    let key_tiles = kb.sub(end_tile, first_tile)?;
    // Tiles i below this one need no causal or sequence-end mask: they end at or before the
    // sequence end and (causal) at or before the first query row of the CTA + 1. (A window's
    // leading tiles may still need its mask: `window_unmasked_from`.)
    let whole_tiles_in_sequence = kb.div(seq_len, block_n)?;
    let unmasked_end = if config.causal {
        let below_diagonal = kb.div(kb.add(query_start, kb.i32(1))?, block_n)?;
        kb.min(kb.min(below_diagonal, whole_tiles_in_sequence)?, end_tile)?
    } else {
        kb.min(whole_tiles_in_sequence, end_tile)?
    };
    let unmasked_tiles = match config.window {
        Some(_) => not_below_zero(&kb, kb.sub(unmasked_end, first_tile)?)?,
        None => unmasked_end,
    };
    // With a window, tiles i from this one on need no window mask: every key of tile
    // first_tile + i is in the window of the CTA's last row, ceil((query_start + block_m −
    // window) / block_n) on.
    let window_unmasked_from = match config.window {
        Some(window) => {
            let last_row_reach = not_below_zero(&kb, kb.sub(kb.add(query_start, kb.i32(config.block_m as i64))?, kb.i32(window as i64))?)?;
            Some(not_below_zero(&kb, kb.sub(kb.ceil_div(last_row_reach, config.block_n)?, first_tile)?)?)
        }
        None => None,
    };

    // Which threads copy: all of them, or the producer warpgroup's.
    let (copy_thread, copy_threads) = match config.schedule {
        Schedule::WarpSpecialized | Schedule::PingPong => {
            (kb.sub(thread, kb.i32(consumer_threads as i64))?, WARPGROUP_THREADS)
        }
        Schedule::Serial | Schedule::OverlapSoftmax => (thread, consumer_threads),
    };
    // Rows past the sequence end read as zeros.
    let sequence = Bounds { first_row: None, row_limit: seq_len, columns: None };
    let issue_q = |kb: &KernelBuilder<'_, 'ctx>| {
        copy_tile_async(kb, &q_rows, query_start, &sequence, &plan.q, aligned, 0, copy_thread, copy_threads)
    };
    let issue_kv = |kb: &KernelBuilder<'_, 'ctx>, tile: IntValue<'ctx>| -> Result<()> {
        let key_start = kb.mul(kb.add(first_tile, tile)?, block_n)?;
        let stage = kb.rem(tile, kb.i32(config.stages as i64))?;
        let k_offset = kb.add(kb.i32(plan.k_offset(0) as i64), kb.mul(stage, kb.i32(plan.stage_bytes as i64))?)?;
        let k_base = kb.byte_pointer(aligned, k_offset)?;
        copy_tile_async(kb, &k_rows, key_start, &sequence, &plan.kv, k_base, 0, copy_thread, copy_threads)?;
        copy_tile_async(
            kb,
            &v_rows,
            key_start,
            &sequence,
            &plan.kv,
            k_base,
            plan.kv.footprint_bytes(),
            copy_thread,
            copy_threads,
        )
    };

    let output = (0..output_shape.accumulator_registers()).map(|_| kb.register_slot()).collect::<Result<Vec<_>>>()?;
    let scores = (0..scores_shape.accumulator_registers()).map(|_| kb.register_slot()).collect::<Result<Vec<_>>>()?;
    // P packed as b16x2, kept as f32 bit patterns (the slots are f32) between iterations.
    let probabilities = (0..config.block_n / 4).map(|_| kb.register_slot()).collect::<Result<Vec<_>>>()?;
    let running_max = [kb.register_slot()?, kb.register_slot()?];
    let running_sum = [kb.register_slot()?, kb.register_slot()?];
    // The overlapped schedules apply a tile's O rescale only when P·V of that tile is issued.
    let pending_rescale = [kb.register_slot()?, kb.register_slot()?];
    for slot in &output {
        kb.store_f32(*slot, kb.f32(0.0))?;
    }
    for h in 0..2 {
        kb.store_f32(running_max[h], kb.f32(f64::NEG_INFINITY))?;
        kb.store_f32(running_sum[h], kb.f32(0.0))?;
    }
    let scale_log2 = config.softmax_scale * std::f64::consts::LOG2_E;
    let q_warpgroup_address = kb.add(aligned_address, kb.mul(warpgroup, kb.i32((WARPGROUP_ROWS * 128) as i64))?)?;
    let stage_addresses =
        |kb: &KernelBuilder<'_, 'ctx>, tile: IntValue<'ctx>| -> Result<(IntValue<'ctx>, IntValue<'ctx>)> {
            let stage = kb.rem(tile, kb.i32(config.stages as i64))?;
            let k_address = kb.add(
                kb.add(aligned_address, kb.i32(plan.k_offset(0) as i64))?,
                kb.mul(stage, kb.i32(plan.stage_bytes as i64))?,
            )?;
            Ok((k_address, kb.add(k_address, kb.i32(plan.kv.footprint_bytes() as i64))?))
        };

    // S = Q · Kᵀ for this warpgroup's 64 rows, issued and committed as one wgmma group.
    let issue_scores = |kb: &KernelBuilder<'_, 'ctx>, k_address: IntValue<'ctx>| -> Result<Vec<FloatValue<'ctx>>> {
        let undefined = kb.context().f32_type().get_undef();
        let mut s: Vec<FloatValue<'ctx>> = vec![undefined; scores_shape.accumulator_registers() as usize];
        kb.wgmma_fence(&[])?;
        for k_step in 0..d / WGMMA_K {
            let a_desc = plan.q.k_major_descriptor(0, k_step * WGMMA_K)?;
            let a = descriptor(kb, q_warpgroup_address, a_desc.constant_bits(), a_desc.start_offset)?;
            let b_desc = plan.kv.k_major_descriptor(0, k_step * WGMMA_K)?;
            let b = descriptor(kb, k_address, b_desc.constant_bits(), b_desc.start_offset)?;
            let accumulate = if k_step == 0 { Accumulate::Overwrite } else { Accumulate::Add };
            s = kb.wgmma(scores_shape, WgmmaA::Shared(a), b, OperandMajor::K, accumulate, &s)?;
        }
        kb.wgmma_commit_group()?;
        Ok(s)
    };

    // O += P · V from the slots, issued as one wgmma group. Returns O and P as they left the
    // fence: wgmma keeps reading P after issue, so P must stay live until the group's wait.
    let issue_output = |kb: &KernelBuilder<'_, 'ctx>,
                        v_address: IntValue<'ctx>|
     -> Result<(Vec<FloatValue<'ctx>>, Vec<BasicValueEnum<'ctx>>)> {
        let mut fenced: Vec<BasicValueEnum<'ctx>> =
            output.iter().map(|slot| Ok(kb.load_f32(*slot)?.into())).collect::<Result<_>>()?;
        for slot in &probabilities {
            let bits = kb.builder().build_bit_cast(kb.load_f32(*slot)?, kb.context().i32_type(), "")?;
            fenced.push(bits);
        }
        let fenced = kb.wgmma_fence(&fenced)?;
        let (o_fenced, p_fenced) = fenced.split_at(output.len());
        let mut o: Vec<FloatValue<'ctx>> = o_fenced.iter().map(|value| value.into_float_value()).collect();
        for (k_step, a) in p_fenced.chunks(4).enumerate() {
            let a = [a[0].into_int_value(), a[1].into_int_value(), a[2].into_int_value(), a[3].into_int_value()];
            let b_desc = plan.kv.mn_major_descriptor(k_step as u32 * WGMMA_K, 0)?;
            let b = descriptor(kb, v_address, b_desc.constant_bits(), b_desc.start_offset)?;
            o = kb.wgmma(output_shape, WgmmaA::Registers(a), b, OperandMajor::MN, Accumulate::Add, &o)?;
        }
        kb.wgmma_commit_group()?;
        Ok((o, p_fenced.to_vec()))
    };

    // Waits for the output group (and all before it), keeping P live until then; stores O.
    let finish_output =
        |kb: &KernelBuilder<'_, 'ctx>, o: &[FloatValue<'ctx>], p: &[BasicValueEnum<'ctx>]| -> Result<()> {
            let mut pending: Vec<BasicValueEnum<'ctx>> = o.iter().map(|value| (*value).into()).collect();
            pending.extend_from_slice(p);
            let waited = kb.wgmma_wait(0, &pending)?;
            for (slot, value) in output.iter().zip(&waited) {
                kb.store_f32(*slot, value.into_float_value())?;
            }
            Ok(())
        };

    // Mask (only on tiles that reach past the sequence end or, causal, past the first query row,
    // or that a window's start crosses),
    // online softmax per row half (the quad of 4 lanes shares a row), P packed into the slots.
    // Returns P (f32) and the factor by which O must be rescaled before P·V is added.
    type Probabilities<'ctx> = (Vec<FloatValue<'ctx>>, [FloatValue<'ctx>; 2]);
    let softmax = |kb: &KernelBuilder<'_, 'ctx>,
                   s: &[FloatValue<'ctx>],
                   tile: IntValue<'ctx>,
                   masking: Masking|
     -> Result<Probabilities<'ctx>> {
        for (slot, value) in scores.iter().zip(s) {
            kb.store_f32(*slot, *value)?;
        }
        let key_start = kb.mul(kb.add(first_tile, tile)?, block_n)?;
        let mut needs_mask = kb.le(unmasked_tiles, tile)?;
        if let Some(from) = window_unmasked_from {
            needs_mask = kb.or(needs_mask, kb.lt(tile, from)?)?;
        }
        let apply_mask = |kb: &KernelBuilder<'_, 'ctx>| -> Result<()> {
            for (index, slot) in scores.iter().enumerate() {
                let index = index as u32;
                let col = kb.add(pair_col, kb.i32((8 * (index / 4) + index % 2) as i64))?;
                let key = kb.add(key_start, col)?;
                let mut allowed = kb.lt(key, seq_len)?;
                if config.causal {
                    let query = kb.add(query_start, rows[((index / 2) % 2) as usize])?;
                    allowed = kb.and(allowed, kb.le(key, query)?)?;
                    if let Some(window) = config.window {
                        allowed = kb.and(allowed, kb.lt(kb.sub(query, key)?, kb.i32(window as i64))?)?;
                    }
                }
                let value = kb.load_f32(*slot)?;
                kb.store_f32(*slot, kb.select_f32(allowed, value, kb.f32(f64::NEG_INFINITY))?)?;
            }
            Ok(())
        };
        match masking {
            Masking::Never => {}
            Masking::Always => apply_mask(kb)?,
            Masking::WhenNeeded => kb.if_then(needs_mask, apply_mask)?,
        }
        let s: Vec<FloatValue<'ctx>> = scores.iter().map(|slot| kb.load_f32(*slot)).collect::<Result<_>>()?;
        let mut shift = [kb.f32(0.0); 2];
        let mut rescale = [kb.f32(0.0); 2];
        for h in 0..2 {
            let half: Vec<FloatValue<'ctx>> =
                s.iter().enumerate().filter(|(index, _)| (index / 2) % 2 == h).map(|(_, value)| *value).collect();
            let mut tile_max = pairwise(&half, |a, b| kb.fmax(a, b))?;
            tile_max = kb.fmax(tile_max, kb.shuffle_xor_f32(tile_max, 1)?)?;
            tile_max = kb.fmax(tile_max, kb.shuffle_xor_f32(tile_max, 2)?)?;
            let previous = kb.load_f32(running_max[h])?;
            let new_max = kb.fmax(previous, kb.fmul(tile_max, kb.f32(scale_log2))?)?;
            // A row without any allowed key so far keeps max -inf; shift by 0 so exp2 gives 0, not NaN.
            let no_keys = kb.feq(new_max, kb.f32(f64::NEG_INFINITY))?;
            shift[h] = kb.select_f32(no_keys, kb.f32(0.0), new_max)?;
            rescale[h] = kb.exp2_approx(kb.fsub(previous, shift[h])?)?;
            kb.store_f32(running_max[h], new_max)?;
        }
        let negative_shift = [kb.fsub(kb.f32(0.0), shift[0])?, kb.fsub(kb.f32(0.0), shift[1])?];
        let p = s
            .iter()
            .enumerate()
            .map(|(index, value)| kb.exp2_approx(kb.fma(*value, kb.f32(scale_log2), negative_shift[(index / 2) % 2])?))
            .collect::<Result<Vec<_>>>()?;
        let mut partial_sum = [kb.f32(0.0); 2];
        for (h, sum) in partial_sum.iter_mut().enumerate() {
            let half: Vec<FloatValue<'ctx>> =
                p.iter().enumerate().filter(|(index, _)| (index / 2) % 2 == h).map(|(_, value)| *value).collect();
            *sum = pairwise(&half, |a, b| kb.fadd(a, b))?;
        }
        for h in 0..2 {
            // Thread-partial sums: the quad's lanes are added once at the end.
            let decayed = kb.fmul(kb.load_f32(running_sum[h])?, rescale[h])?;
            kb.store_f32(running_sum[h], kb.fadd(decayed, partial_sum[h])?)?;
        }
        Ok((p, rescale))
    };
    // P rounded and packed into the slots as wgmma A fragments: n8 column blocks 2t and 2t + 1
    // form k16 step t.
    let pack_probabilities = |kb: &KernelBuilder<'_, 'ctx>, p: &[FloatValue<'ctx>]| -> Result<()> {
        let mut packed = probabilities.iter();
        for k_step in 0..(config.block_n / WGMMA_K) as usize {
            let (low, high) = (8 * k_step, 8 * k_step + 4);
            for first in [low, low + 2, high, high + 2] {
                let bits = kb.pack_half2(config.elem, p[first], p[first + 1])?;
                let slot = packed.next().ok_or_else(|| CodegenError::Llvm("P slots run out".to_string()))?;
                kb.store_f32(
                    *slot,
                    kb.builder().build_bit_cast(bits, kb.context().f32_type(), "")?.into_float_value(),
                )?;
            }
        }
        Ok(())
    };
    let rescale_output = |kb: &KernelBuilder<'_, 'ctx>, rescale: [FloatValue<'ctx>; 2]| -> Result<()> {
        for (index, slot) in output.iter().enumerate() {
            kb.store_f32(*slot, kb.fmul(kb.load_f32(*slot)?, rescale[(index / 2) % 2])?)?;
        }
        Ok(())
    };
    // cp.async wrote through the generic proxy and wgmma reads through the async one: wait,
    // fence, then the barrier publishes the tile to both warpgroups.
    let publish_tile = |kb: &KernelBuilder<'_, 'ctx>, pending: u32| -> Result<()> {
        kb.cp_async_wait(pending)?;
        kb.fence_proxy_async_shared()?;
        kb.barrier()
    };

    // O / l and lse = (m + log2 l) · ln 2; rows without any key (l = 0) give O = 0, lse = -inf.
    let store_results = |kb: &KernelBuilder<'_, 'ctx>| -> Result<()> {
        let mut inverse_sum = [kb.f32(0.0); 2];
        let mut log_sum_exp = [kb.f32(0.0); 2];
        for h in 0..2 {
            let mut sum = kb.load_f32(running_sum[h])?;
            sum = kb.fadd(sum, kb.shuffle_xor_f32(sum, 1)?)?;
            sum = kb.fadd(sum, kb.shuffle_xor_f32(sum, 2)?)?;
            let empty = kb.feq(sum, kb.f32(0.0))?;
            inverse_sum[h] = kb.select_f32(empty, kb.f32(0.0), kb.fdiv(kb.f32(1.0), sum)?)?;
            let lse =
                kb.fmul(kb.fadd(kb.load_f32(running_max[h])?, kb.log2_approx(sum)?)?, kb.f32(std::f64::consts::LN_2))?;
            log_sum_exp[h] = kb.select_f32(empty, kb.f32(f64::NEG_INFINITY), lse)?;
        }
        for h in 0..2 {
            let query = kb.add(query_start, rows[h])?;
            let inside = kb.lt(query, seq_len)?;
            kb.if_then(inside, |kb| {
                let row_offset = kb.builder().build_int_mul(
                    kb.to_i64(query)?,
                    kb.context().i64_type().const_int(o_rows.row_stride as u64, false),
                    "",
                )?;
                let row_base = kb.element_pointer(o_rows.base, config.elem, row_offset)?;
                for fragment in 0..d / 8 {
                    let first = (4 * fragment + 2 * h as u32) as usize;
                    let low = kb.fmul(kb.load_f32(output[first])?, inverse_sum[h])?;
                    let high = kb.fmul(kb.load_f32(output[first + 1])?, inverse_sum[h])?;
                    let col = kb.add(pair_col, kb.i32((8 * fragment) as i64))?;
                    let address = kb.element_pointer(row_base, config.elem, col)?;
                    kb.store_int(address, kb.pack_half2(config.elem, low, high)?)?;
                }
                Ok(())
            })?;
        }
        let lse_row_base = {
            let rows_before = kb.builder().build_int_mul(
                kb.to_i64(kb.add(kb.mul(batch, kb.i32(config.q_heads as i64))?, head)?)?,
                kb.to_i64(seq_len)?,
                "",
            )?;
            kb.element_pointer(kb.pointer_param("lse")?, Elem::F32, rows_before)?
        };
        let first_of_quad = kb.builder().build_int_compare(IntPredicate::EQ, pair_col, kb.i32(0), "")?;
        for h in 0..2 {
            let query = kb.add(query_start, rows[h])?;
            let inside = kb.and(first_of_quad, kb.lt(query, seq_len)?)?;
            let value = log_sum_exp[h];
            kb.if_then(inside, |kb| {
                kb.store_f32(kb.element_pointer(lse_row_base, Elem::F32, kb.to_i64(query)?)?, value)
            })?;
        }
        Ok(())
    };

    // ptxas hoists `wgmma.wait_group` as far up as it may (it has no operands), which would put
    // the wait for P·V before the softmax's exponentials and undo the overlap; it does not move
    // it above a shared-memory store. So a volatile store of a value that depends on every
    // exponential of the tile (the sum of both running row sums) goes right before the wait.
    let anchor_address =
        kb.add(kb.add(aligned_address, kb.i32(plan.anchor_offset as i64))?, kb.mul(thread, kb.i32(4))?)?;
    let anchor_wait = |kb: &KernelBuilder<'_, 'ctx>| -> Result<()> {
        let sums = kb.fadd(kb.load_f32(running_sum[0])?, kb.load_f32(running_sum[1])?)?;
        kb.inline_ptx(
            None,
            "st.volatile.shared.f32 [$0], $1;",
            "r,f,~{memory}",
            &[anchor_address.into(), sums.into()],
            true,
        )?;
        Ok(())
    };
    let remember_rescale = |kb: &KernelBuilder<'_, 'ctx>, rescale: [FloatValue<'ctx>; 2]| -> Result<()> {
        kb.store_f32(pending_rescale[0], rescale[0])?;
        kb.store_f32(pending_rescale[1], rescale[1])
    };
    let apply_pending_rescale = |kb: &KernelBuilder<'_, 'ctx>| -> Result<()> {
        rescale_output(kb, [kb.load_f32(pending_rescale[0])?, kb.load_f32(pending_rescale[1])?])
    };
    // The overlapped loop of one consumer warpgroup. `acquire(tile)` makes the tile's stage
    // readable; `release(tile)` runs once P·V of the tile has finished reading its stage;
    // `take_turn(last)` and `pass_turn(last)` bracket each issue of GEMMs (`last` for the final
    // one).
    let overlapped_tiles = |kb: &KernelBuilder<'_, 'ctx>,
                            acquire: &dyn Fn(&KernelBuilder<'_, 'ctx>, IntValue<'ctx>) -> Result<()>,
                            release: &dyn Fn(&KernelBuilder<'_, 'ctx>, IntValue<'ctx>) -> Result<()>,
                            take_turn: &dyn Fn(&KernelBuilder<'_, 'ctx>) -> Result<()>,
                            pass_turn: &dyn Fn(&KernelBuilder<'_, 'ctx>, bool) -> Result<()>|
     -> Result<()> {
        let any_tiles = kb.lt(kb.i32(0), key_tiles)?;
        kb.if_then(any_tiles, |kb| {
            let first = kb.i32(0);
            acquire(kb, first)?;
            take_turn(kb)?;
            let s = issue_scores(kb, stage_addresses(kb, first)?.0)?;
            pass_turn(kb, false)?;
            let s = kb.wgmma_wait_accumulators(0, &s)?;
            let (p, rescale) = softmax(kb, &s, first, Masking::WhenNeeded)?;
            remember_rescale(kb, rescale)?;
            pack_probabilities(kb, &p)
        })?;
        // While P·V is in flight the softmax must not branch: ptxas waits for all wgmma at a
        // join. So the tiles after the first run in loops that mask all or nothing: a window's
        // leading tiles (masked), the unmasked middle, the trailing tiles (masked).
        let steady_state = |kb: &KernelBuilder<'_, 'ctx>, tile: IntValue<'ctx>, masking: Masking| -> Result<()> {
            acquire(kb, tile)?;
            let previous = kb.sub(tile, kb.i32(1))?;
            let (k_address, _) = stage_addresses(kb, tile)?;
            let (_, previous_v_address) = stage_addresses(kb, previous)?;
            // S of this tile and P·V of the previous one run while this tile's softmax does.
            // Like FlashAttention-3, O is rescaled for the previous tile before its P·V is
            // issued, and this tile's P is packed only after that P·V finished: the new P can
            // then take the registers of the old one.
            take_turn(kb)?;
            let s = issue_scores(kb, k_address)?;
            apply_pending_rescale(kb)?;
            let (o, previous_p) = issue_output(kb, previous_v_address)?;
            pass_turn(kb, false)?;
            let s = kb.wgmma_wait_accumulators(1, &s)?;
            let (p, rescale) = softmax(kb, &s, tile, masking)?;
            remember_rescale(kb, rescale)?;
            anchor_wait(kb)?;
            finish_output(kb, &o, &previous_p)?;
            release(kb, previous)?;
            pack_probabilities(kb, &p)
        };
        let at_least_one = |kb: &KernelBuilder<'_, 'ctx>, value: IntValue<'ctx>| -> Result<IntValue<'ctx>> {
            kb.select_int(kb.lt(value, kb.i32(1))?, kb.i32(1), value)
        };
        // A window's first tiles (up to `unmasked_from`) need its mask too.
        let unmasked_from = match window_unmasked_from {
            Some(from) => {
                let from = kb.min(at_least_one(kb, from)?, at_least_one(kb, key_tiles)?)?;
                kb.for_range(kb.i32(1), from, |kb, tile| steady_state(kb, tile, Masking::Always))?;
                from
            }
            None => kb.i32(1),
        };
        let first_masked = kb.select_int(kb.lt(unmasked_tiles, unmasked_from)?, unmasked_from, unmasked_tiles)?;
        kb.for_range(unmasked_from, first_masked, |kb, tile| steady_state(kb, tile, Masking::Never))?;
        kb.for_range(first_masked, key_tiles, |kb, tile| steady_state(kb, tile, Masking::Always))?;
        kb.if_then(any_tiles, |kb| {
            let (_, last_v_address) = stage_addresses(kb, kb.sub(key_tiles, kb.i32(1))?)?;
            take_turn(kb)?;
            apply_pending_rescale(kb)?;
            let (o, p) = issue_output(kb, last_v_address)?;
            pass_turn(kb, true)?;
            finish_output(kb, &o, &p)
        })
    };
    let no_turns = |_: &KernelBuilder<'_, 'ctx>| Ok(());
    let no_turn_passing = |_: &KernelBuilder<'_, 'ctx>, _: bool| Ok(());

    match config.schedule {
        Schedule::Serial => {
            // Prologue: Q and the first `stages - 1` K/V tiles, one cp.async group each.
            issue_q(&kb)?;
            for tile in 0..config.stages - 1 {
                let tile = kb.i32(tile as i64);
                kb.if_then(kb.lt(tile, key_tiles)?, |kb| issue_kv(kb, tile))?;
                kb.cp_async_commit()?;
            }
            kb.for_range(kb.i32(0), key_tiles, |kb, tile| {
                let ahead = kb.add(tile, kb.i32(config.stages as i64 - 1))?;
                kb.if_then(kb.lt(ahead, key_tiles)?, |kb| issue_kv(kb, ahead))?;
                // Always commit (an empty group near the end) so that the wait count is constant.
                kb.cp_async_commit()?;
                publish_tile(kb, config.stages - 1)?;
                let (k_address, v_address) = stage_addresses(kb, tile)?;
                let s = issue_scores(kb, k_address)?;
                let s = kb.wgmma_wait_accumulators(0, &s)?;
                let (p, rescale) = softmax(kb, &s, tile, Masking::WhenNeeded)?;
                rescale_output(kb, rescale)?;
                pack_probabilities(kb, &p)?;
                let (o, p) = issue_output(kb, v_address)?;
                finish_output(kb, &o, &p)?;
                // The next iteration's copy overwrites the stage just read.
                kb.barrier()
            })?;
            store_results(&kb)?;
        }
        Schedule::OverlapSoftmax => {
            // Tile j's stage is reloaded with tile j + stages only after P·V of tile j, which
            // runs in iteration j + 1: `stages - 2` tiles are loaded ahead. Tile j + stages - 2
            // is issued right after the barrier of iteration j, when every warpgroup has
            // finished iteration j - 1 and with it P·V of tile j - 2, the stage's last reader.
            let ahead = config.stages - 2;
            issue_q(&kb)?;
            for tile in 0..ahead {
                let tile = kb.i32(tile as i64);
                kb.if_then(kb.lt(tile, key_tiles)?, |kb| issue_kv(kb, tile))?;
                kb.cp_async_commit()?;
            }
            let acquire = |kb: &KernelBuilder<'_, 'ctx>, tile: IntValue<'ctx>| -> Result<()> {
                publish_tile(kb, ahead - 1)?;
                let next = kb.add(tile, kb.i32(ahead as i64))?;
                kb.if_then(kb.lt(next, key_tiles)?, |kb| issue_kv(kb, next))?;
                kb.cp_async_commit()
            };
            overlapped_tiles(&kb, &acquire, &|_, _| Ok(()), &no_turns, &no_turn_passing)?;
            store_results(&kb)?;
        }
        Schedule::WarpSpecialized | Schedule::PingPong => {
            let barrier = |index: IntValue<'ctx>| -> Result<PointerValue<'ctx>> {
                kb.byte_pointer(aligned, kb.add(kb.i32(plan.barriers_offset as i64), kb.mul(index, kb.i32(8))?)?)
            };
            let stages = kb.i32(config.stages as i64);
            let full = |kb: &KernelBuilder<'_, 'ctx>, tile: IntValue<'ctx>| barrier(kb.rem(tile, stages)?);
            let empty =
                |kb: &KernelBuilder<'_, 'ctx>, tile: IntValue<'ctx>| barrier(kb.add(kb.rem(tile, stages)?, stages)?);
            // Tile t is the (t / stages)-th use of its stage: its full phase has parity
            // (t / stages) % 2, and the producer waits for the empty phase of tile t - stages.
            let parity = |kb: &KernelBuilder<'_, 'ctx>, tile: IntValue<'ctx>| kb.and(kb.div(tile, stages)?, kb.i32(1));
            kb.if_then(kb.lt(thread, kb.i32(1))?, |kb| {
                for stage in 0..config.stages {
                    // Full: one arrival per producer thread (cp.async) or the TMA issuer's one.
                    let producers = match config.loads {
                        TileLoads::CpAsync => WARPGROUP_THREADS,
                        TileLoads::Tma => 1,
                    };
                    kb.mbarrier_init(barrier(kb.i32(stage as i64))?, producers)?;
                    kb.mbarrier_init(barrier(kb.i32((config.stages + stage) as i64))?, consumer_threads)?;
                }
                Ok(())
            })?;
            kb.barrier()?;
            let is_producer = kb.le(kb.i32(warpgroups as i64), warpgroup)?;
            kb.if_else(
                is_producer,
                |kb| {
                    kb.set_max_registers(false, PRODUCER_REGISTERS)?;
                    let wait_for_stage = |kb: &KernelBuilder<'_, 'ctx>, tile: IntValue<'ctx>| -> Result<()> {
                        kb.if_then(kb.le(stages, tile)?, |kb| {
                            let reused = kb.sub(tile, stages)?;
                            kb.mbarrier_wait_parity(empty(kb, reused)?, parity(kb, reused)?)
                        })
                    };
                    match config.loads {
                        TileLoads::CpAsync => {
                            // Q lands with the first tile. Each thread's copies of a tile arrive
                            // on the tile's full barrier by themselves once they land, so the
                            // producer never waits for a copy, only for a free stage: publishing
                            // a tile does not queue behind the wait for the next one's stage.
                            issue_q(kb)?;
                            kb.for_range(kb.i32(0), key_tiles, |kb, tile| {
                                wait_for_stage(kb, tile)?;
                                issue_kv(kb, tile)?;
                                kb.cp_async_mbarrier_arrive(full(kb, tile)?)
                            })?;
                            // The arrivals ride on this thread's copies: it stays until they landed.
                            kb.cp_async_wait_all()
                        }
                        TileLoads::Tma => {
                            let issuer = kb.builder().build_int_compare(
                                IntPredicate::EQ,
                                thread,
                                kb.i32(consumer_threads as i64),
                                "",
                            )?;
                            kb.if_then(issuer, |kb| {
                                let maps: Vec<IntValue<'ctx>> = tensor_map_params
                                    .iter()
                                    .map(|name| kb.tensor_map_param_address(name))
                                    .collect::<Result<_>>()?;
                                let [q_map, k_map, v_map] = maps[..] else {
                                    return unsupported("TMA attention takes the tensor maps of q, k and v");
                                };
                                // One box per 64-column panel: (column, head, row, batch).
                                let load_panels = |kb: &KernelBuilder<'_, 'ctx>,
                                                   map: IntValue<'ctx>,
                                                   tile: &Swizzle128BTile,
                                                   base: IntValue<'ctx>,
                                                   head: IntValue<'ctx>,
                                                   first_row: IntValue<'ctx>,
                                                   barrier: PointerValue<'ctx>|
                                 -> Result<()> {
                                    for panel in 0..tile.panels() {
                                        let destination = kb.byte_pointer(
                                            aligned,
                                            kb.add(base, kb.i32((panel * tile.panel_bytes()) as i64))?,
                                        )?;
                                        let column = kb.i32((panel * tile.panel_cols()) as i64);
                                        kb.cp_async_bulk_tensor(destination, map, &[column, head, first_row, batch], barrier)?;
                                    }
                                    Ok(())
                                };
                                let kv_bytes = 2 * plan.kv.footprint_bytes();
                                kb.for_range(kb.i32(0), key_tiles, |kb, tile| {
                                    wait_for_stage(kb, tile)?;
                                    let first = kb.builder().build_int_compare(IntPredicate::EQ, tile, kb.i32(0), "")?;
                                    let bytes = kb.select_int(
                                        first,
                                        kb.i32((kv_bytes + plan.q.footprint_bytes()) as i64),
                                        kb.i32(kv_bytes as i64),
                                    )?;
                                    kb.mbarrier_arrive_expect_tx(full(kb, tile)?, bytes)?;
                                    // Q lands with the first tile.
                                    kb.if_then(first, |kb| {
                                        load_panels(kb, q_map, &plan.q, kb.i32(0), head, query_start, full(kb, tile)?)
                                    })?;
                                    let key_start = kb.mul(kb.add(first_tile, tile)?, block_n)?;
                                    let stage = kb.rem(tile, stages)?;
                                    let k_base = kb.add(
                                        kb.i32(plan.k_offset(0) as i64),
                                        kb.mul(stage, kb.i32(plan.stage_bytes as i64))?,
                                    )?;
                                    let v_base = kb.add(k_base, kb.i32(plan.kv.footprint_bytes() as i64))?;
                                    load_panels(kb, k_map, &plan.kv, k_base, kv_head, key_start, full(kb, tile)?)?;
                                    load_panels(kb, v_map, &plan.kv, v_base, kv_head, key_start, full(kb, tile)?)
                                })
                            })
                        }
                    }
                },
                |kb| {
                    kb.set_max_registers(true, CONSUMER_REGISTERS)?;
                    let acquire = |kb: &KernelBuilder<'_, 'ctx>, tile: IntValue<'ctx>| -> Result<()> {
                        kb.mbarrier_wait_parity(full(kb, tile)?, parity(kb, tile)?)?;
                        match config.loads {
                            // cp.async writes through the generic proxy: fence before wgmma reads.
                            TileLoads::CpAsync => kb.fence_proxy_async_shared(),
                            TileLoads::Tma => Ok(()),
                        }
                    };
                    let release = |kb: &KernelBuilder<'_, 'ctx>, tile: IntValue<'ctx>| -> Result<()> {
                        kb.mbarrier_arrive(empty(kb, tile)?)
                    };
                    if config.schedule == Schedule::WarpSpecialized {
                        overlapped_tiles(kb, &acquire, &release, &no_turns, &no_turn_passing)?;
                        return store_results(kb);
                    }
                    // Ping-pong: warpgroup w waits at named barrier 1 + w for its turn and passes
                    // the turn at the other's barrier (128 syncing + 128 arriving threads).
                    // Warpgroup 1 opens with a pass so that warpgroup 0 issues first; it skips
                    // its very last pass, which nobody would wait for, so both issue the same
                    // number of times and every barrier phase completes.
                    let own_turn = kb.add(warpgroup, kb.i32(1))?;
                    let other_turn = kb.sub(kb.i32(2), warpgroup)?;
                    let is_second = kb.lt(kb.i32(0), warpgroup)?;
                    let pair = 2 * WARPGROUP_THREADS;
                    kb.if_then(is_second, |kb| kb.named_barrier_arrive(other_turn, pair))?;
                    let take_turn = |kb: &KernelBuilder<'_, 'ctx>| kb.named_barrier_sync(own_turn, pair);
                    let pass_turn = |kb: &KernelBuilder<'_, 'ctx>, last: bool| -> Result<()> {
                        if last {
                            kb.if_then(kb.lt(warpgroup, kb.i32(1))?, |kb| kb.named_barrier_arrive(other_turn, pair))
                        } else {
                            kb.named_barrier_arrive(other_turn, pair)
                        }
                    };
                    overlapped_tiles(kb, &acquire, &release, &take_turn, &pass_turn)?;
                    store_results(kb)
                },
            )?;
        }
    }
    kb.finish()?;
    let launch = config.launch()?;
    debug_assert_eq!(launch.threads, threads);
    Ok(launch)
}

/// `values` combined by `op` as a balanced tree: each row's max and sum over a thread's scores
/// is then a chain of log2(n) dependent instructions instead of n, which the profile showed on
/// the consumers' critical path (BENCHMARKS.md).
fn pairwise<'ctx>(
    values: &[FloatValue<'ctx>],
    op: impl Fn(FloatValue<'ctx>, FloatValue<'ctx>) -> Result<FloatValue<'ctx>>,
) -> Result<FloatValue<'ctx>> {
    let mut level = values.to_vec();
    while level.len() > 1 {
        level = level.chunks(2).map(|pair| if pair.len() == 2 { op(pair[0], pair[1]) } else { Ok(pair[0]) }).collect::<Result<_>>()?;
    }
    level.pop().ok_or_else(|| CodegenError::Llvm("a reduction over no values".to_string()))
}

/// Which query head and query tile the CTA computes, from its place in launch order
/// (`blockIdx.x + query_tiles · blockIdx.y` within its batch element `blockIdx.z`).
/// The hardware starts CTAs about in launch order, each SM taking the next one as one ends, so
/// launching the longest causal rows first keeps the tail short (longest processing time first).
/// Over all heads at once, though, the K/V that the CTAs in flight read would outgrow L2 for
/// many heads at long S. So heads go in groups (whole kv heads with their query heads) whose
/// K/V fits `l2_group_bytes`; within a group, query tiles go longest first with the group's
/// heads innermost. The last group may be smaller.
fn work_item<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    config: &HopperAttentionConfig,
    seq_len: IntValue<'ctx>,
    query_tiles: IntValue<'ctx>,
) -> Result<(IntValue<'ctx>, IntValue<'ctx>)> {
    // (bytes / bytes per token) / S: no product that could overflow.
    let kv_token_bytes = 2 * config.head_dim * config.elem.bytes();
    let kv_heads_per_group = kb.div(kb.i32((config.l2_group_bytes / kv_token_bytes) as i64), seq_len)?;
    let kv_heads_per_group = kb.select_int(kb.lt(kv_heads_per_group, kb.i32(1))?, kb.i32(1), kv_heads_per_group)?;
    let kv_heads_per_group = kb.min(kv_heads_per_group, kb.i32(config.kv_heads as i64))?;
    let group_heads = kb.mul(kv_heads_per_group, kb.i32((config.q_heads / config.kv_heads) as i64))?;
    let ordinal = kb.add(
        kb.special_register(SpecialRegister::BlockX)?,
        kb.mul(query_tiles, kb.special_register(SpecialRegister::BlockY)?)?,
    )?;
    let group = kb.div(ordinal, kb.mul(group_heads, query_tiles)?)?;
    let first_head = kb.mul(group, group_heads)?;
    let in_group = kb.sub(ordinal, kb.mul(first_head, query_tiles)?)?;
    let heads_here = kb.min(group_heads, kb.sub(kb.i32(config.q_heads as i64), first_head)?)?;
    let rank = kb.div(in_group, heads_here)?;
    let head = kb.add(first_head, kb.sub(in_group, kb.mul(rank, heads_here)?)?)?;
    let query_tile = kb.sub(kb.sub(query_tiles, kb.i32(1))?, rank)?;
    Ok((head, query_tile))
}

