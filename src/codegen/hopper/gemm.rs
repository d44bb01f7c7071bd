//! The projection GEMM's configuration (`dest = a · Wᵀ + bias` over the layer's column
//! segments): what the resource model (`tiles`) ranks and `ccc tune` varies, and the rules and
//! launch facts it needs without building the kernel. The kernel itself is a kernel-IR builder,
//! `ir::kernel::build_wgmma_projection`, which the driver calls with the chosen block_n, stages
//! and schedule: a persistent grid, one producer warpgroup issuing TMA boxes of `a` and W into
//! a ring of swizzled stages, two consumer warpgroups on wgmma, ping-pong or cooperative.

use super::HopperLaunch;
use super::primitives::WgmmaShape;
use crate::codegen::{Elem, ParamKind, Result, unsupported};
use crate::ir::kernel::layout::{Swizzle128BTile, TILE_ALIGNMENT};
pub use crate::ir::kernel::{GEMM_BLOCK_K, GEMM_BLOCK_M, GemmSegment, PERSISTENT_GRID};
use crate::ir::kernel::{SHARED_MEMORY_LIMIT_BYTES, WARPGROUP_THREADS};

const MAX_SHARED_BYTES: u32 = SHARED_MEMORY_LIMIT_BYTES as u32;
const THREADS: u32 = 3 * WARPGROUP_THREADS;
/// Registers per thread of the consumer warpgroups (the kernel-IR builder's budget; the
/// resource model checks the accumulators against it).
pub(crate) const CONSUMER_REGISTERS: u32 = crate::ir::kernel::GEMM_CONSUMER_REGISTERS;

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

/// How the producer warpgroup fills the shared tiles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TileLoads {
    /// 16-byte cp.async copies by the producer's 128 threads.
    CpAsync,
    /// TMA box copies issued by one producer thread, counting their bytes on the stage's full
    /// barrier.
    Tma,
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


/// Shared memory of one CTA: `stages` × (a tile, W tile), the mbarriers `full[stages]` and
/// `empty[stages]`, and the swizzle's alignment slack (as the kernel-IR builder lays it out).
fn shared_bytes(config: &HopperGemmConfig) -> Result<u32> {
    let a = Swizzle128BTile::new(config.elem, GEMM_BLOCK_M, GEMM_BLOCK_K)?;
    let w = Swizzle128BTile::new(config.elem, config.block_n, GEMM_BLOCK_K)?;
    let total = config.stages * (a.footprint_bytes() + w.footprint_bytes()) + 2 * config.stages * 8 + TILE_ALIGNMENT;
    if total > MAX_SHARED_BYTES {
        return unsupported(format!(
            "{} stages of {}-row a and {}-row W tiles take {total} bytes of shared memory, more than {MAX_SHARED_BYTES}",
            config.stages, GEMM_BLOCK_M, config.block_n
        ));
    }
    Ok(total)
}

impl HopperGemmConfig {
    /// Column tiles over all segments (each tile inside one segment).
    pub fn column_tiles(&self) -> u32 {
        self.segments.iter().map(|s| s.cols.div_ceil(self.block_n)).sum()
    }

    /// Threads, shared memory and grid ([`PERSISTENT_GRID`]: one CTA per SM of the device, looping
    /// over the output tiles) of the kernel this config emits, without emitting it.
    pub fn launch(&self) -> Result<HopperLaunch> {
        self.validate()?;
        let dynamic_shared_bytes = shared_bytes(self)?;
        Ok(HopperLaunch {
            threads: THREADS,
            dynamic_shared_bytes,
            grid: PERSISTENT_GRID,
        })
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

