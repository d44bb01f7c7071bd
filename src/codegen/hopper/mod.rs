//! Hopper (sm_90a) specifics: warpgroup MMA (`wgmma.mma_async`) on 128-byte-swizzled shared
//! tiles and the synchronization it needs (wgmma fences and groups, `mbarrier`, async-proxy
//! fences, `setmaxnreg`) as per-thread primitives the kernel-IR lowering uses, and the tiles of
//! the kernel-IR builders' Hopper kernels.
//!
//! The shared-memory layout these kernels use, 128-byte swizzle, and the 64-bit matrix
//! descriptors wgmma reads it through are kernel-IR types (`ir::kernel::layout`).
//! - [`primitives`]: per-thread (per-warpgroup) instructions as inline PTX.
//! - [`attention`]: the tiles of the wgmma attention kernel (`ir::kernel::build_wgmma_attention`).
//! - [`gemm`]: the tiles of the wgmma projection GEMM (`ir::kernel::build_wgmma_projection`).
//! - [`tiles`]: the tile choice for the attention kernel and the GEMMs: candidates checked against
//!   shared memory, registers and the wgmma shape rules, ranked by a cost model.

pub mod attention;
pub(crate) mod copy;
pub mod gemm;
pub mod primitives;
pub mod tiles;

pub use attention::{HopperAttentionConfig, Schedule};
pub use gemm::{GemmSchedule, GemmSegment, HopperGemmConfig, TileLoads};
pub use crate::ir::kernel::layout::{MatrixDescriptor, OperandMajor, Swizzle128BTile};
pub use primitives::{Accumulate, WgmmaA, WgmmaShape};
pub use tiles::{
    Candidate, Fit, ProblemShape, Rejection, attention_candidates, best_attention, best_gemm, check_attention,
    check_gemm, gemm_candidates,
};

use crate::codegen::{ParamKind, Result, unsupported};
use crate::ir::size::SizeExpr;

/// Checks that `params` (a kernel's ABI) holds every tensor in `tensors` as a global pointer and
/// the sizes B and S, which the emitters look up by name; `kernel` names the kernel in errors.
fn require_params<'a>(
    params: &[ParamKind],
    kernel: &str,
    tensors: impl IntoIterator<Item = &'a str>,
) -> Result<()> {
    for name in tensors {
        if !params.iter().any(|p| matches!(p, ParamKind::GlobalPointer(n) if n == name)) {
            return unsupported(format!("the {kernel} kernel has no tensor parameter `{name}`"));
        }
    }
    let sized = |name: &str| params.iter().any(|p| matches!(p, ParamKind::Size(n) if n == name));
    if !sized("B") || !sized("S") {
        return unsupported(format!("the {kernel} kernel needs the size parameters B and S"));
    }
    Ok(())
}

/// The tiles chosen for a kernel that a Hopper kernel-IR builder builds (the resource model's
/// choice or a tuning's), before the builder turns them into kernel IR.
#[derive(Debug, Clone, PartialEq)]
pub enum TileConfig {
    Attention(HopperAttentionConfig),
    Gemm(HopperGemmConfig),
}

/// Most shared-memory stages a pipelined kernel takes: none of these kernels fits more in 227 KiB
/// (the smallest stage, a 128 × 64 and a 64 × 64 tile of 16-bit elements, is 24 KiB); the bound
/// keeps a tuning file's stage count from overflowing the shared-memory arithmetic.
pub const MAX_STAGES: u32 = 16;

/// Threads, shared memory and grid of the kernel a tile configuration builds, known without
/// building it (what the resource model checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HopperLaunch {
    pub threads: u32,
    /// Includes up to 1 KiB to align the swizzled tiles to 1024 bytes (raise the kernel's limit
    /// first: it is above 48 KiB).
    pub dynamic_shared_bytes: u32,
    pub grid: [SizeExpr; 3],
}

impl TileConfig {
    pub fn name(&self) -> &str {
        match self {
            TileConfig::Attention(config) => &config.name,
            TileConfig::Gemm(config) => &config.name,
        }
    }

}
