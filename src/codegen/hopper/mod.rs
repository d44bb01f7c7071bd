//! The Hopper (sm_90a) fast path: warpgroup MMA (`wgmma.mma_async`) on 128-byte-swizzled shared
//! tiles, the synchronization it needs (wgmma fences and groups, `mbarrier`, async-proxy fences,
//! `setmaxnreg`), and a flash-attention forward kernel built on them with the same ABI and grid
//! shape as the kernel-IR attention kernel (`ir::kernel::build_forward(.., Attention, ..)`).
//!
//! - [`layout`]: the shared-memory layout as a Rust type ([`layout::Swizzle128BTile`]) and the
//!   64-bit matrix descriptors wgmma reads it through.
//! - [`primitives`]: per-thread (per-warpgroup) instructions as inline PTX.
//! - [`attention`]: the wgmma attention kernel.

pub mod attention;
mod copy;
pub mod gemm;
pub mod layout;
pub mod primitives;

pub use attention::{HopperAttentionConfig, HopperAttentionLaunch, Schedule, emit_attention_wgmma};
pub use layout::{MatrixDescriptor, OperandMajor, Swizzle128BTile};
pub use primitives::{Accumulate, WgmmaA, WgmmaShape};
