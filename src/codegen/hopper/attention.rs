//! The attention kernel's tiles as the resource model and tuning see them: the shape of the
//! layer's attention (head width, heads, mask) beside a schedule of the kernel-IR builder
//! ([`crate::ir::kernel::build_wgmma_attention`]), whose checks and footprint they use.

use super::HopperLaunch;
use crate::codegen::{Elem, Result};
use crate::ir::kernel::{self, WgmmaAttentionSchedule};
use crate::ir::size::SizeExpr;

/// Rows of Q one consumer warpgroup owns (the wgmma M).
pub const WARPGROUP_ROWS: u32 = 64;

/// The inputs that shape the wgmma attention kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct HopperAttentionConfig {
    pub name: String,
    /// Storage type of q, k, v, o (bf16 or f16).
    pub elem: Elem,
    pub head_dim: u32,
    pub q_heads: u32,
    pub kv_heads: u32,
    pub causal: bool,
    /// A sliding window on top of the causal mask: query t sees keys t − window + 1 ..= t.
    pub window: Option<u32>,
    /// Query rows per CTA: 64 per consumer warpgroup, one or two.
    pub block_m: u32,
    /// Keys per K/V tile (the N of `S = Q · Kᵀ`, the K of `O += P · V`).
    pub block_n: u32,
    /// K/V shared buffers.
    pub stages: u32,
    pub schedule: Schedule,
    /// K/V bytes of the heads that CTAs work on together (the CTA work order: longest causal
    /// rows first within each group of heads); whole kv heads, at least one.
    pub l2_group_bytes: u32,
}

/// How the consumer warpgroups share the tensor cores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Schedule {
    /// Each consumer issues its GEMMs when it is ready.
    WarpSpecialized,
    /// Two consumers take turns to issue their GEMMs (FlashAttention-3's ping-pong), so that
    /// one's softmax runs while the other's GEMMs occupy the tensor cores.
    PingPong,
}

impl HopperAttentionConfig {
    /// The builder's schedule for these tiles.
    pub fn kernel_schedule(&self) -> WgmmaAttentionSchedule {
        WgmmaAttentionSchedule {
            block_m: self.block_m,
            block_n: self.block_n,
            stages: self.stages,
            ping_pong: self.schedule == Schedule::PingPong,
            l2_group_bytes: self.l2_group_bytes,
        }
    }

    /// Threads, shared memory (which may exceed the limit: the resource model checks it) and grid
    /// of the kernel these tiles build; errors say what the builder does not take.
    pub fn launch(&self) -> Result<HopperLaunch> {
        let (threads, shared) = kernel::wgmma_attention_footprint(self.elem.into(), self.head_dim, &self.kernel_schedule())
            .map_err(crate::codegen::CodegenError::Unsupported)?;
        Ok(HopperLaunch {
            threads,
            dynamic_shared_bytes: shared as u32,
            grid: [SizeExpr::seq_len().ceil_div(self.block_m as u64), SizeExpr::c(self.q_heads as u64), SizeExpr::batch()],
        })
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
}
