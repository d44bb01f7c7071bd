//! Projection GEMMs on wgmma: `dest = a · Wᵀ + bias` for the `nn.Linear` layers of a layer
//! (`a` = x or o, [B, S, K] in the storage type; W [cols, K] row-major, as PyTorch stores it),
//! with the ABI of the kernel-IR projection kernels so that it can replace them on Hopper.
//!
//! The output columns are a list of [`GemmSegment`]s, each with its own weight, bias and
//! destination (qkv_proj writes q0 and k0 into one packed buffer and the value heads into v; the
//! delayed value heads read x one row up). An output tile is `128 × block_n` inside one segment.
//! The grid is persistent ([`PERSISTENT_CTAS`] CTAs): CTA c computes tiles c, c + CTAs, ... in
//! raster order (column tile fastest, then row tile, then batch element), so that the CTAs that
//! run together share their rows of `a` in L2 while all of W stays there.
//!
//! Warp-specialized like the attention kernel: a producer warpgroup copies `a` and W tiles of
//! 64 columns (one 128-byte swizzle panel) with cp.async into `stages` shared buffers and hands
//! them over through `full` mbarriers (the copies arrive on them as they land,
//! `cp.async.mbarrier.arrive`); two consumer warpgroups run `m64nNk16` wgmma and return a
//! stage through its `empty` mbarrier once the wgmma group that read it has finished, with one
//! group in flight. Either both work on each tile, 64 rows each, or each takes every other tile
//! whole ([`GemmSchedule`]). The stage ring runs on from one output tile to the next, so the
//! producer loads the next tile while a tile is stored. The epilogue adds
//! the bias, rounds once to the storage type and stores straight from the accumulator fragments,
//! rows past S and columns past the segment masked.

use inkwell::IntPredicate;
use inkwell::attributes::AttributeLoc;
use inkwell::values::{FloatValue, IntValue, PointerValue};

use super::HopperLaunch;
use super::attention::TileLoads;
use super::copy::{Bounds, RowSource, aligned_tile_address, copy_tile_async, descriptor};
use crate::ir::kernel::layout::{OperandMajor, SWIZZLE_BYTES, Swizzle128BTile, TILE_ALIGNMENT, WGMMA_K};
use super::primitives::{Accumulate, WgmmaA, WgmmaShape};
use crate::codegen::{CodegenError, Elem, KernelBuilder, ParamKind, PtxModule, Result, SpecialRegister, unsupported};
use crate::manifest::KernelParamManifest;
use crate::ir::size::SizeExpr;

const WARPGROUP_THREADS: u32 = 128;
/// Rows of one consumer warpgroup (the wgmma M) and of the CTA (two consumer warpgroups).
const WARPGROUP_ROWS: u32 = 64;
pub const GEMM_BLOCK_M: u32 = 2 * WARPGROUP_ROWS;
/// K of one stage: one 128-byte panel of 16-bit elements.
pub const GEMM_BLOCK_K: u32 = 64;
const THREADS: u32 = 3 * WARPGROUP_THREADS;
/// CTAs of the persistent grid: one per SM of an H100 / H200 SXM (132). Each loops over output
/// tiles, so the producer fills the next tile's stages while the consumers store the last one;
/// on a GPU with more SMs some would idle, with fewer the tail runs as a second wave.
pub const PERSISTENT_CTAS: u32 = 132;
const MAX_SHARED_BYTES: u32 = 227 * 1024;
/// One CTA per SM: ptxas allocates the whole kernel under the entry cap (65536 / 384 = 170
/// registers), so a second CTA (cap 85) would not hold a 64 × 128 accumulator tile per thread.
/// `setmaxnreg` then moves registers from the producer warpgroup, which only computes addresses,
/// to the consumers (40 + 2 · 232 = 3 · 168, the CTA's whole allotment).
const PRODUCER_REGISTERS: u32 = 40;
pub(crate) const CONSUMER_REGISTERS: u32 = 232;
const _: () = assert!(super::registers_fit(PRODUCER_REGISTERS, CONSUMER_REGISTERS));

/// One run of output columns with its own weight, bias and destination.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GemmSegment {
    /// Weight parameter [cols, K].
    pub weight: String,
    /// Bias parameter [cols], if any.
    pub bias: Option<String>,
    pub cols: u32,
    /// Destination parameter [B, S, dest_width]; this segment writes columns
    /// `dest_col .. dest_col + cols` of it.
    pub dest: String,
    pub dest_width: u32,
    pub dest_col: u32,
    /// Output row t reads `a` row t − row_shift (rows before 0 read as zeros): 1 for the value
    /// heads that take the previous token.
    pub row_shift: u32,
}

/// The inputs that shape the wgmma projection kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct HopperGemmConfig {
    pub name: String,
    /// Storage type of `a`, the weights, the biases and the destinations (bf16 or f16).
    pub elem: Elem,
    /// Kernel parameters in ABI order (those of the kernel-IR kernel it replaces); must include
    /// `a`, every segment's weight, bias and destination, and the sizes `B` and `S`.
    pub params: Vec<ParamKind>,
    /// The A operand [B, S, k].
    pub a: String,
    /// The reduction width K (a multiple of 8: cp.async moves 16-byte chunks).
    pub k: u32,
    pub segments: Vec<GemmSegment>,
    /// Output columns per CTA: the wgmma N (a multiple of 8 up to 256).
    pub block_n: u32,
    /// Shared-memory buffers of `a` and W tiles.
    pub stages: u32,
    pub schedule: GemmSchedule,
    /// `Some(d)` when `a` is [B, S, H, d] (the attention output, K = H·d), `None` when it is
    /// [B, S, K]: what the TMA boxes of `a` address.
    pub a_head_dim: Option<u32>,
    pub loads: TileLoads,
}

/// How the two consumer warpgroups share the output tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GemmSchedule {
    /// Both work on each tile, 64 rows each: they finish together, and the tensor cores idle
    /// while both store.
    Cooperative,
    /// Each takes every other tile of the CTA whole (two m64 blocks, 2 · block_n / 2
    /// accumulators per thread, so block_n ≤ 128), their mainloops taking turns (named
    /// barriers), so that one's mainloop runs while the other stores its tile. The driver's
    /// choice (faster on the H200, BENCHMARKS.md).
    PingPong,
}


/// Shared tiles of one CTA at byte offsets from the 1024-aligned base: `stages` × (a tile, W
/// tile), then the mbarriers `full[stages]` and `empty[stages]`.
struct SharedPlan {
    a: Swizzle128BTile,
    w: Swizzle128BTile,
    stage_bytes: u32,
    barriers_offset: u32,
    total_bytes: u32,
}

impl SharedPlan {
    fn new(config: &HopperGemmConfig) -> Result<Self> {
        let a = Swizzle128BTile::new(config.elem, GEMM_BLOCK_M, GEMM_BLOCK_K)?;
        let w = Swizzle128BTile::new(config.elem, config.block_n, GEMM_BLOCK_K)?;
        let stage_bytes = a.footprint_bytes() + w.footprint_bytes();
        let barriers_offset = config.stages * stage_bytes;
        let total_bytes = barriers_offset + 2 * config.stages * 8;
        if total_bytes + TILE_ALIGNMENT > MAX_SHARED_BYTES {
            return unsupported(format!(
                "{} stages of {}-row a and {}-row W tiles take {} bytes of shared memory, more than {MAX_SHARED_BYTES}",
                config.stages,
                GEMM_BLOCK_M,
                config.block_n,
                total_bytes + TILE_ALIGNMENT
            ));
        }
        Ok(SharedPlan { a, w, stage_bytes, barriers_offset, total_bytes })
    }
}

impl HopperGemmConfig {
    /// A human-readable description used as part of a cache key.
    pub fn describe(&self) -> String {
        let segments: Vec<String> = self
            .segments
            .iter()
            .map(|s| {
                format!(
                    "{}+{}:{}->{}[{}@{}]>>{}",
                    s.weight,
                    s.bias.as_deref().unwrap_or("-"),
                    s.cols,
                    s.dest,
                    s.dest_width,
                    s.dest_col,
                    s.row_shift
                )
            })
            .collect();
        format!(
            "gemm-wgmma {} elem={} params={:?} a={} k={} segments=[{}] block_n={} stages={} schedule={:?} a-head-dim={:?} loads={:?}",
            self.name,
            self.elem.name(),
            self.params,
            self.a,
            self.k,
            segments.join(", "),
            self.block_n,
            self.stages,
            self.schedule,
            self.a_head_dim,
            self.loads
        )
    }

    /// Column tiles over all segments (each tile inside one segment).
    pub fn column_tiles(&self) -> u32 {
        self.segments.iter().map(|s| s.cols.div_ceil(self.block_n)).sum()
    }

    /// Threads, shared memory and grid (`[PERSISTENT_CTAS, 1, 1]`: the CTAs loop over the output
    /// tiles) of the kernel this config emits, without emitting it.
    pub fn launch(&self) -> Result<HopperLaunch> {
        self.validate()?;
        let plan = SharedPlan::new(self)?;
        Ok(HopperLaunch {
            threads: THREADS,
            dynamic_shared_bytes: plan.total_bytes + TILE_ALIGNMENT,
            grid: [
                SizeExpr::c(PERSISTENT_CTAS as u64),
                SizeExpr::c(1),
                SizeExpr::c(1),
            ],
            extra_params: self
                .tensor_maps()
                .into_iter()
                .map(|(buffer, box_rows, _)| KernelParamManifest::TensorMap { buffer, box_rows })
                .collect(),
        })
    }

    /// With TMA loads, the tensor maps the kernel takes after its ABI parameters: (buffer, box
    /// rows, parameter name) for `a` (128-row boxes), then each distinct segment weight (block_n
    /// rows).
    fn tensor_maps(&self) -> Vec<(String, u32, String)> {
        if self.loads == TileLoads::CpAsync {
            return Vec::new();
        }
        let mut maps = vec![(self.a.clone(), GEMM_BLOCK_M, tensor_map_param(&self.a))];
        for segment in &self.segments {
            if !maps.iter().any(|(buffer, _, _)| *buffer == segment.weight) {
                maps.push((segment.weight.clone(), self.block_n, tensor_map_param(&segment.weight)));
            }
        }
        maps
    }

    pub(crate) fn validate(&self) -> Result<()> {
        if self.elem == Elem::F32 {
            return unsupported("projection operands are bf16 or f16");
        }
        if self.k == 0 || !self.k.is_multiple_of(8) {
            return unsupported(format!("the reduction width {} is not a multiple of 8", self.k));
        }
        WgmmaShape { n: self.block_n, elem: self.elem }.validate()?;
        if self.segments.is_empty() || self.segments.iter().any(|s| s.cols == 0 || !s.cols.is_multiple_of(2)) {
            return unsupported("every segment needs an even, non-zero number of columns");
        }
        if let Some(s) = self.segments.iter().find(|s| s.dest_col + s.cols > s.dest_width || s.dest_col % 2 != 0) {
            return unsupported(format!("segment {} does not fit (evenly aligned) in its destination", s.weight));
        }
        if self.schedule == GemmSchedule::PingPong && self.block_n > 128 {
            return unsupported(format!(
                "a ping-pong warpgroup holds a whole 128 × {} tile: more accumulators than registers (block_n ≤ 128)",
                self.block_n
            ));
        }
        if self.loads == TileLoads::Tma && self.a_head_dim.is_some_and(|d| d == 0 || !d.is_multiple_of(GEMM_BLOCK_K)) {
            return unsupported(format!(
                "TMA boxes of {GEMM_BLOCK_K} columns of a [B, S, H, d] operand need d a multiple of {GEMM_BLOCK_K}, not {:?}",
                self.a_head_dim
            ));
        }
        if self.stages > super::MAX_STAGES {
            return unsupported(format!("{} stages: at most {}", self.stages, super::MAX_STAGES));
        }
        if self.stages < 3 {
            // The consumers hold two stages (the one read and the one its in-flight predecessor
            // group still reads): a third one loads.
            return unsupported("the producer needs at least 3 stages (one loading while two are read)");
        }
        let tensors = std::iter::once(&self.a)
            .chain(self.segments.iter().flat_map(|s| [&s.weight, &s.dest]))
            .chain(self.segments.iter().filter_map(|s| s.bias.as_ref()));
        super::require_params(&self.params, "projection", tensors.map(String::as_str))
    }
}

/// The values that depend on which segment the CTA's column tile is in (uniform over the CTA).
struct SegmentValues<'ctx> {
    weight: PointerValue<'ctx>,
    /// Without a bias, the weight (as many leading elements; read and ignored).
    bias: PointerValue<'ctx>,
    has_bias: IntValue<'ctx>,
    dest: PointerValue<'ctx>,
    dest_width: IntValue<'ctx>,
    dest_col: IntValue<'ctx>,
    cols: IntValue<'ctx>,
    first_tile: IntValue<'ctx>,
    row_shift: IntValue<'ctx>,
    /// The generic address of the weight's tensor map (TMA loads only).
    weight_map: Option<IntValue<'ctx>>,
}

/// The output tile a CTA works on: which segment, where its rows and columns start.
struct OutputTile<'ctx> {
    segment: SegmentValues<'ctx>,
    batch: IntValue<'ctx>,
    row_start: IntValue<'ctx>,
    /// First column inside the segment.
    col_start: IntValue<'ctx>,
}

/// Emits the wgmma projection kernel into `module`.
pub fn emit_gemm_wgmma<'ctx>(module: &PtxModule<'ctx>, config: &HopperGemmConfig) -> Result<HopperLaunch> {
    config.validate()?;
    let plan = SharedPlan::new(config)?;
    let shape = WgmmaShape { n: config.block_n, elem: config.elem };
    let shared = module.dynamic_shared(&format!("{}_shared", config.name));
    let params: Vec<ParamKind> = config
        .params
        .iter()
        .cloned()
        .chain(config.tensor_maps().into_iter().map(|(_, _, param)| ParamKind::TensorMap(param)))
        .collect();
    let kb = module.declare_kernel(&config.name, &params)?;
    // setmaxnreg needs a register cap at entry: `.maxntid` with one CTA per SM.
    for (key, value) in [("nvvm.maxntid", THREADS.to_string()), ("nvvm.minctasm", "1".to_string())] {
        kb.function().add_attribute(AttributeLoc::Function, kb.context().create_string_attribute(key, &value));
    }
    let seq_len = kb.size_param("S")?;
    let batches = kb.size_param("B")?;
    let thread = kb.thread_index()?;
    let lane = kb.lane()?;
    let warpgroup = kb.warp_uniform(kb.div(thread, kb.i32(WARPGROUP_THREADS as i64))?)?;
    let warp_in_group = kb.rem(kb.div(thread, kb.i32(32))?, kb.i32(4))?;

    // Tiles in raster order (column tile fastest, then row tile, then batch element), dealt
    // round-robin to the persistent CTAs: CTA c takes tiles c, c + CTAs, ...
    let column_tiles = config.column_tiles();
    let row_tiles = kb.ceil_div(seq_len, GEMM_BLOCK_M)?;
    let tiles = kb.mul(kb.mul(row_tiles, batches)?, kb.i32(column_tiles as i64))?;
    let first_tile = kb.special_register(SpecialRegister::BlockX)?;
    // This CTA's tiles: ceil((tiles - first) / CTAs), none when first ≥ tiles (the dividend is
    // never negative: first < CTAs).
    let own_tiles = kb.div(
        kb.add(kb.sub(tiles, first_tile)?, kb.i32(PERSISTENT_CTAS as i64 - 1))?,
        kb.i32(PERSISTENT_CTAS as i64),
    )?;
    let output_tile = |kb: &KernelBuilder<'_, 'ctx>, ordinal: IntValue<'ctx>| -> Result<OutputTile<'ctx>> {
        let tile = kb.add(first_tile, kb.mul(ordinal, kb.i32(PERSISTENT_CTAS as i64))?)?;
        let column_tile = kb.rem(tile, kb.i32(column_tiles as i64))?;
        let rest = kb.div(tile, kb.i32(column_tiles as i64))?;
        let segment = select_segment(kb, config, column_tile)?;
        let col_start = kb.mul(kb.sub(column_tile, segment.first_tile)?, kb.i32(config.block_n as i64))?;
        Ok(OutputTile {
            batch: kb.div(rest, row_tiles)?,
            row_start: kb.mul(kb.rem(rest, row_tiles)?, kb.i32(GEMM_BLOCK_M as i64))?,
            col_start,
            segment,
        })
    };

    let raw_address = kb.shared_address(shared)?;
    let aligned_address = aligned_tile_address(&kb, raw_address)?;
    let aligned = kb.byte_pointer(shared, kb.sub(aligned_address, raw_address)?)?;
    let barrier = |kb: &KernelBuilder<'_, 'ctx>, index: IntValue<'ctx>| -> Result<PointerValue<'ctx>> {
        kb.byte_pointer(aligned, kb.add(kb.i32(plan.barriers_offset as i64), kb.mul(index, kb.i32(8))?)?)
    };
    // The stage ring runs on across output tiles: step = ordinal · k_tiles + k-tile.
    let stages = kb.i32(config.stages as i64);
    let full = |kb: &KernelBuilder<'_, 'ctx>, step: IntValue<'ctx>| barrier(kb, kb.rem(step, stages)?);
    let empty = |kb: &KernelBuilder<'_, 'ctx>, step: IntValue<'ctx>| barrier(kb, kb.add(kb.rem(step, stages)?, stages)?);
    // Step s is the (s / stages)-th use of its stage: its full phase has parity (s / stages) % 2.
    let parity = |kb: &KernelBuilder<'_, 'ctx>, step: IntValue<'ctx>| kb.and(kb.div(step, stages)?, kb.i32(1));
    let stage_address = |kb: &KernelBuilder<'_, 'ctx>, step: IntValue<'ctx>| -> Result<IntValue<'ctx>> {
        kb.add(aligned_address, kb.mul(kb.rem(step, stages)?, kb.i32(plan.stage_bytes as i64))?)
    };
    let k_tiles = config.k.div_ceil(GEMM_BLOCK_K);

    kb.if_then(kb.lt(thread, kb.i32(1))?, |kb| {
        for stage in 0..config.stages {
            // Full: one arrival per producer thread (cp.async) or the TMA issuer's one.
            let producers = match config.loads {
                TileLoads::CpAsync => WARPGROUP_THREADS,
                TileLoads::Tma => 1,
            };
            kb.mbarrier_init(barrier(kb, kb.i32(stage as i64))?, producers)?;
            // A stage is read by both consumer warpgroups, or (ping-pong) by the one whose tile it holds.
            let readers = match config.schedule {
                GemmSchedule::Cooperative => 2 * WARPGROUP_THREADS,
                GemmSchedule::PingPong => WARPGROUP_THREADS,
            };
            kb.mbarrier_init(barrier(kb, kb.i32((config.stages + stage) as i64))?, readers)?;
        }
        Ok(())
    })?;
    kb.barrier()?;

    let consumer_threads = 2 * WARPGROUP_THREADS;
    let is_producer = kb.le(kb.i32(2), warpgroup)?;
    kb.if_else(
        is_producer,
        |kb| {
            kb.set_max_registers(false, PRODUCER_REGISTERS)?;
            let copy_thread = kb.sub(thread, kb.i32(consumer_threads as i64))?;
            let i64_type = kb.context().i64_type();
            let ragged_k = !config.k.is_multiple_of(GEMM_BLOCK_K);
            // Rows before 0 exist only in shifted segments.
            let first_row = config.segments.iter().any(|s| s.row_shift > 0).then(|| kb.i32(0));
            let issue = |kb: &KernelBuilder<'_, 'ctx>, tile: &OutputTile<'ctx>, k_tile: IntValue<'ctx>, step: IntValue<'ctx>| -> Result<()> {
                let k_start = kb.mul(k_tile, kb.i32(GEMM_BLOCK_K as i64))?;
                // A ragged K reads its last tile's columns from the row start and zero-fills
                // those past K; otherwise the views start at the tile's first column.
                let (columns, view_col) =
                    if ragged_k { (Some((k_start, config.k)), kb.i32(0)) } else { (None, k_start) };
                let a_bounds = Bounds { first_row, row_limit: seq_len, columns };
                let w_bounds = Bounds { first_row: None, row_limit: kb.sub(tile.segment.cols, tile.col_start)?, columns };
                let base = kb.byte_pointer(aligned, kb.sub(stage_address(kb, step)?, aligned_address)?)?;
                let a_offset = kb.builder().build_int_add(
                    kb.builder().build_int_mul(
                        kb.builder().build_int_mul(kb.to_i64(tile.batch)?, kb.to_i64(seq_len)?, "")?,
                        i64_type.const_int(config.k as u64, false),
                        "",
                    )?,
                    kb.to_i64(view_col)?,
                    "",
                )?;
                let a_source = RowSource {
                    base: kb.element_pointer(kb.pointer_param(&config.a)?, config.elem, a_offset)?,
                    row_stride: config.k,
                };
                let w_offset = kb.builder().build_int_add(
                    kb.builder().build_int_mul(kb.to_i64(tile.col_start)?, i64_type.const_int(config.k as u64, false), "")?,
                    kb.to_i64(view_col)?,
                    "",
                )?;
                let w_source =
                    RowSource { base: kb.element_pointer(tile.segment.weight, config.elem, w_offset)?, row_stride: config.k };
                let a_row_start = kb.sub(tile.row_start, tile.segment.row_shift)?;
                copy_tile_async(kb, &a_source, a_row_start, &a_bounds, &plan.a, base, 0, copy_thread, WARPGROUP_THREADS)?;
                copy_tile_async(
                    kb,
                    &w_source,
                    kb.i32(0),
                    &w_bounds,
                    &plan.w,
                    base,
                    plan.a.footprint_bytes(),
                    copy_thread,
                    WARPGROUP_THREADS,
                )
            };
            let wait_for_stage = |kb: &KernelBuilder<'_, 'ctx>, step: IntValue<'ctx>| {
                kb.if_then(kb.le(stages, step)?, |kb| {
                    let reused = kb.sub(step, stages)?;
                    kb.mbarrier_wait_parity(empty(kb, reused)?, parity(kb, reused)?)
                })
            };
            match config.loads {
                TileLoads::CpAsync => {
                    // Each thread's copies of a step arrive on the step's full barrier by
                    // themselves once they land: the producer only ever waits for a free stage,
                    // so a stage that comes back late never holds up the publication of steps
                    // already copied.
                    kb.for_range_rolled(kb.i32(0), own_tiles, |kb, ordinal| {
                        let tile = output_tile(kb, ordinal)?;
                        let first_step = kb.mul(ordinal, kb.i32(k_tiles as i64))?;
                        kb.for_range_rolled(kb.i32(0), kb.i32(k_tiles as i64), |kb, k_tile| {
                            let step = kb.add(first_step, k_tile)?;
                            wait_for_stage(kb, step)?;
                            issue(kb, &tile, k_tile, step)?;
                            kb.cp_async_mbarrier_arrive(full(kb, step)?)
                        })
                    })?;
                    // The arrivals ride on this thread's copies: it stays until they landed.
                    kb.cp_async_wait_all()
                }
                TileLoads::Tma => {
                    // One thread issues a box of `a` and one of W per step; the full barrier
                    // expects both boxes' bytes (elements outside a tensor arrive as zeros and
                    // count: rows past S, before 0 in shifted segments, columns past K, weight
                    // rows past the segment).
                    let issuer = kb.builder().build_int_compare(IntPredicate::EQ, copy_thread, kb.i32(0), "")?;
                    kb.if_then(issuer, |kb| {
                        let a_map = kb.tensor_map_param_address(&tensor_map_param(&config.a))?;
                        let step_bytes = kb.i32((plan.a.footprint_bytes() + plan.w.footprint_bytes()) as i64);
                        kb.for_range_rolled(kb.i32(0), own_tiles, |kb, ordinal| {
                            let tile = output_tile(kb, ordinal)?;
                            let weight_map = tile.segment.weight_map.ok_or_else(|| {
                                CodegenError::Llvm("a TMA GEMM without a weight tensor map".to_string())
                            })?;
                            let first_step = kb.mul(ordinal, kb.i32(k_tiles as i64))?;
                            let a_row = kb.sub(tile.row_start, tile.segment.row_shift)?;
                            kb.for_range_rolled(kb.i32(0), kb.i32(k_tiles as i64), |kb, k_tile| {
                                let step = kb.add(first_step, k_tile)?;
                                wait_for_stage(kb, step)?;
                                kb.mbarrier_arrive_expect_tx(full(kb, step)?, step_bytes)?;
                                let k_start = kb.mul(k_tile, kb.i32(GEMM_BLOCK_K as i64))?;
                                let a_coordinates = match config.a_head_dim {
                                    // (column in the head, head, row, batch)
                                    Some(d) => vec![
                                        kb.rem(k_start, kb.i32(d as i64))?,
                                        kb.div(k_start, kb.i32(d as i64))?,
                                        a_row,
                                        tile.batch,
                                    ],
                                    // (column, row, batch)
                                    None => vec![k_start, a_row, tile.batch],
                                };
                                let base = kb.sub(stage_address(kb, step)?, aligned_address)?;
                                kb.cp_async_bulk_tensor(kb.byte_pointer(aligned, base)?, a_map, &a_coordinates, full(kb, step)?)?;
                                let w_destination =
                                    kb.byte_pointer(aligned, kb.add(base, kb.i32(plan.a.footprint_bytes() as i64))?)?;
                                kb.cp_async_bulk_tensor(w_destination, weight_map, &[k_start, tile.col_start], full(kb, step)?)
                            })
                        })
                    })
                }
            }
        },
        |kb| {
            kb.set_max_registers(true, CONSUMER_REGISTERS)?;
            // The 64-row blocks of a tile this warpgroup computes, and which of the CTA's tiles.
            let (row_blocks, first_ordinal, ordinal_step) = match config.schedule {
                GemmSchedule::Cooperative => (vec![warpgroup], kb.i32(0), 1),
                GemmSchedule::PingPong => (vec![kb.i32(0), kb.i32(1)], warpgroup, 2),
            };
            let block_registers = shape.accumulator_registers() as usize;
            let slots = (0..row_blocks.len() * block_registers)
                .map(|_| kb.register_slot())
                .collect::<Result<Vec<PointerValue<'ctx>>>>()?;
            let row_block_offsets: Vec<IntValue<'ctx>> = row_blocks
                .iter()
                .map(|block| kb.mul(*block, kb.i32((WARPGROUP_ROWS * SWIZZLE_BYTES) as i64)))
                .collect::<Result<_>>()?;
            // ceil((own_tiles - first_ordinal) / ordinal_step); the dividend is never negative
            // (first_ordinal < ordinal_step).
            let my_tiles = kb.div(
                kb.add(kb.sub(own_tiles, first_ordinal)?, kb.i32(ordinal_step as i64 - 1))?,
                kb.i32(ordinal_step as i64),
            )?;
            // Ping-pong turns: a full barrier's parity wait is only right within one phase of
            // the barrier's current one, so a warpgroup waits for its tile's stages only once
            // the other has waited for all of the tile before (named barrier 1 + warpgroup,
            // 128 syncing + 128 arriving threads: own turn, other's turn). The tile with ordinal
            // n hands the turn on only if tile n + 1 exists, so that every arrival is matched by
            // a sync.
            let pair = 2 * WARPGROUP_THREADS;
            let turns = match config.schedule {
                GemmSchedule::Cooperative => None,
                GemmSchedule::PingPong => Some((kb.add(warpgroup, kb.i32(1))?, kb.sub(kb.i32(2), warpgroup)?)),
            };
            if let Some((_, other_turn)) = turns {
                let opens = kb.and(kb.lt(kb.i32(0), warpgroup)?, kb.lt(kb.i32(0), own_tiles)?)?;
                kb.if_then(opens, |kb| kb.named_barrier_arrive(other_turn, pair))?;
            }
            kb.for_range_rolled(kb.i32(0), my_tiles, |kb, index| {
                let ordinal = kb.add(first_ordinal, kb.mul(index, kb.i32(ordinal_step as i64))?)?;
                let first_step = kb.mul(ordinal, kb.i32(k_tiles as i64))?;
                for slot in &slots {
                    kb.store_f32(*slot, kb.f32(0.0))?;
                }
                if let Some((own_turn, _)) = turns {
                    kb.named_barrier_sync(own_turn, pair)?;
                }
                kb.for_range_rolled(kb.i32(0), kb.i32(k_tiles as i64), |kb, k_tile| {
                    let step = kb.add(first_step, k_tile)?;
                    kb.mbarrier_wait_parity(full(kb, step)?, parity(kb, step)?)?;
                    // The copies were made by the generic proxy: fence before wgmma reads them.
                    if config.loads == TileLoads::CpAsync {
                        kb.fence_proxy_async_shared()?;
                    }
                    let w_address = kb.add(stage_address(kb, step)?, kb.i32(plan.a.footprint_bytes() as i64))?;
                    let loaded: Vec<_> =
                        slots.iter().map(|slot| Ok(kb.load_f32(*slot)?.into())).collect::<Result<_>>()?;
                    let mut acc: Vec<FloatValue<'ctx>> =
                        kb.wgmma_fence(&loaded)?.into_iter().map(|value| value.into_float_value()).collect();
                    for k_step in 0..GEMM_BLOCK_K / WGMMA_K {
                        let w_desc = plan.w.k_major_descriptor(0, k_step * WGMMA_K)?;
                        let w = descriptor(kb, w_address, w_desc.constant_bits(), w_desc.start_offset)?;
                        for (block, offset) in row_block_offsets.iter().enumerate() {
                            let a_address = kb.add(stage_address(kb, step)?, *offset)?;
                            let a_desc = plan.a.k_major_descriptor(0, k_step * WGMMA_K)?;
                            let a = descriptor(kb, a_address, a_desc.constant_bits(), a_desc.start_offset)?;
                            let range = block * block_registers..(block + 1) * block_registers;
                            let updated =
                                kb.wgmma(shape, WgmmaA::Shared(a), w, OperandMajor::K, Accumulate::Add, &acc[range.clone()])?;
                            acc.splice(range, updated);
                        }
                    }
                    kb.wgmma_commit_group()?;
                    // The group before this one has finished reading its stage.
                    kb.wgmma_wait(1, &[])?;
                    kb.if_then(kb.lt(kb.i32(0), k_tile)?, |kb| kb.mbarrier_arrive(empty(kb, kb.sub(step, kb.i32(1))?)?))?;
                    for (slot, value) in slots.iter().zip(&acc) {
                        kb.store_f32(*slot, *value)?;
                    }
                    Ok(())
                })?;
                if let Some((_, other_turn)) = turns {
                    let next_exists = kb.lt(kb.add(ordinal, kb.i32(1))?, own_tiles)?;
                    kb.if_then(next_exists, |kb| kb.named_barrier_arrive(other_turn, pair))?;
                }
                let last: Vec<FloatValue<'ctx>> = slots.iter().map(|slot| kb.load_f32(*slot)).collect::<Result<_>>()?;
                let accumulators = kb.wgmma_wait_accumulators(0, &last)?;
                // The tile's last stage is free once its group finished: the producer may
                // already fill it for the next tile while this one is stored.
                let last_step = kb.add(first_step, kb.i32(k_tiles as i64 - 1))?;
                kb.mbarrier_arrive(empty(kb, last_step)?)?;
                let tile = output_tile(kb, ordinal)?;
                for (block, row_block) in row_blocks.iter().enumerate() {
                    let values = &accumulators[block * block_registers..(block + 1) * block_registers];
                    store_tile(kb, config, &tile, values, seq_len, *row_block, warp_in_group, lane)?;
                }
                Ok(())
            })
        },
    )?;
    kb.finish()?;
    config.launch()
}

/// The segment that column tile `column_tile` falls in: a chain of selects from the last
/// segment back to the first, so that the first segment whose tiles reach past it wins.
fn select_segment<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    config: &HopperGemmConfig,
    column_tile: IntValue<'ctx>,
) -> Result<SegmentValues<'ctx>> {
    let mut first_tiles = Vec::new();
    let mut end = 0;
    for segment in &config.segments {
        first_tiles.push(end);
        end += segment.cols.div_ceil(config.block_n);
    }
    let values = |index: usize| -> Result<SegmentValues<'ctx>> {
        let segment = &config.segments[index];
        let weight = kb.pointer_param(&segment.weight)?;
        let (bias, has_bias) = match &segment.bias {
            Some(name) => (kb.pointer_param(name)?, kb.context().bool_type().const_int(1, false)),
            None => (weight, kb.context().bool_type().const_int(0, false)),
        };
        Ok(SegmentValues {
            weight,
            bias,
            has_bias,
            dest: kb.pointer_param(&segment.dest)?,
            dest_width: kb.i32(segment.dest_width as i64),
            dest_col: kb.i32(segment.dest_col as i64),
            cols: kb.i32(segment.cols as i64),
            first_tile: kb.i32(first_tiles[index] as i64),
            row_shift: kb.i32(segment.row_shift as i64),
            weight_map: match config.loads {
                TileLoads::CpAsync => None,
                TileLoads::Tma => Some(kb.tensor_map_param_address(&tensor_map_param(&segment.weight))?),
            },
        })
    };
    let last = config.segments.len() - 1;
    let mut chosen = values(last)?;
    for index in (0..last).rev() {
        let end_tile = first_tiles[index] + config.segments[index].cols.div_ceil(config.block_n);
        let inside = kb.lt(column_tile, kb.i32(end_tile as i64))?;
        let this = values(index)?;
        let pick_pointer = |a: PointerValue<'ctx>, b: PointerValue<'ctx>| -> Result<PointerValue<'ctx>> {
            Ok(kb.builder().build_select(inside, a, b, "")?.into_pointer_value())
        };
        let pick = |a: IntValue<'ctx>, b: IntValue<'ctx>| kb.select_int(inside, a, b);
        chosen = SegmentValues {
            weight: pick_pointer(this.weight, chosen.weight)?,
            bias: pick_pointer(this.bias, chosen.bias)?,
            has_bias: pick(this.has_bias, chosen.has_bias)?,
            dest: pick_pointer(this.dest, chosen.dest)?,
            dest_width: pick(this.dest_width, chosen.dest_width)?,
            dest_col: pick(this.dest_col, chosen.dest_col)?,
            cols: pick(this.cols, chosen.cols)?,
            first_tile: pick(this.first_tile, chosen.first_tile)?,
            row_shift: pick(this.row_shift, chosen.row_shift)?,
            weight_map: match (this.weight_map, chosen.weight_map) {
                (Some(this), Some(chosen)) => Some(pick(this, chosen)?),
                _ => None,
            },
        };
    }
    Ok(chosen)
}

/// The name of the kernel parameter that points to `buffer`'s tensor map.
fn tensor_map_param(buffer: &str) -> String {
    format!("{buffer}.tensor_map")
}

/// Bias, one rounding, and the store of the 64 × block_n accumulators of 64-row block
/// `row_block` of a tile:
/// register `i` of a thread is row `16·warp + lane / 4 + 8·((i / 2) % 2)`, column
/// `8·(i / 4) + 2·(lane % 4) + i % 2` (see `KernelBuilder::wgmma`); each thread stores its
/// column pairs as one 4-byte word.
#[allow(clippy::too_many_arguments)]
fn store_tile<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    config: &HopperGemmConfig,
    tile: &OutputTile<'ctx>,
    accumulators: &[FloatValue<'ctx>],
    seq_len: IntValue<'ctx>,
    row_block: IntValue<'ctx>,
    warp_in_group: IntValue<'ctx>,
    lane: IntValue<'ctx>,
) -> Result<()> {
    let elem = config.elem;
    let (segment, batch, row_start) = (&tile.segment, tile.batch, tile.row_start);
    let pair_col = kb.add(tile.col_start, kb.mul(kb.rem(lane, kb.i32(4))?, kb.i32(2))?)?;
    let fragments = config.block_n / 8;
    let first_row = kb.add(
        kb.add(row_start, kb.mul(row_block, kb.i32(WARPGROUP_ROWS as i64))?)?,
        kb.add(kb.mul(warp_in_group, kb.i32(16))?, kb.div(lane, kb.i32(4))?)?,
    )?;
    for half in 0..2u32 {
        let row = kb.add(first_row, kb.i32(8 * half as i64))?;
        kb.if_then(kb.lt(row, seq_len)?, |kb| {
            let flat_row = kb.builder().build_int_add(
                kb.builder().build_int_mul(kb.to_i64(batch)?, kb.to_i64(seq_len)?, "")?,
                kb.to_i64(row)?,
                "",
            )?;
            let row_offset = kb.builder().build_int_add(
                kb.builder().build_int_mul(flat_row, kb.to_i64(segment.dest_width)?, "")?,
                kb.to_i64(segment.dest_col)?,
                "",
            )?;
            let row_base = kb.element_pointer(segment.dest, elem, row_offset)?;
            for fragment in 0..fragments {
                let first = (4 * fragment + 2 * half) as usize;
                let col = kb.add(pair_col, kb.i32((8 * fragment) as i64))?;
                kb.if_then(kb.lt(col, segment.cols)?, |kb| {
                    // Loaded where it is added (an L1 hit after the first row): held for the
                    // whole tile, block_n / 4 bias values per thread would spill at n256.
                    // Without a bias the pointer is the weight's, in bounds and ignored.
                    let (bias_low, bias_high) =
                        load_pair_as_f32(kb, kb.element_pointer(segment.bias, elem, kb.to_i64(col)?)?, elem)?;
                    let low = kb.fadd(accumulators[first], kb.select_f32(segment.has_bias, bias_low, kb.f32(0.0))?)?;
                    let high =
                        kb.fadd(accumulators[first + 1], kb.select_f32(segment.has_bias, bias_high, kb.f32(0.0))?)?;
                    let address = kb.element_pointer(row_base, elem, kb.to_i64(col)?)?;
                    kb.store_int(address, kb.pack_half2(elem, low, high)?)
                })?;
            }
            Ok(())
        })?;
    }
    Ok(())
}

/// Two consecutive 16-bit elements at `pointer` (4-byte aligned) widened to f32.
fn load_pair_as_f32<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    pointer: PointerValue<'ctx>,
    elem: Elem,
) -> Result<(FloatValue<'ctx>, FloatValue<'ctx>)> {
    let builder = kb.builder();
    let context = kb.context();
    let word = builder.build_load(context.i32_type(), pointer, "")?.into_int_value();
    let low_bits = builder.build_int_truncate(word, context.i16_type(), "")?;
    let high_bits = builder.build_int_truncate(builder.build_right_shift(word, kb.i32(16), false, "")?, context.i16_type(), "")?;
    Ok((kb.widen_half(elem, low_bits)?, kb.widen_half(elem, high_bits)?))
}
