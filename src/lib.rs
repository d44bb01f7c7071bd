//! ccc: a compiler for attention kernels.
//!
//! The path of a spec (docs/architecture.md): `.attn` text → [`frontend`] → [`spec::AttentionSpec`]
//! → graph IR → kernel plan → kernel IR ([`ir`]) → LLVM IR → PTX ([`codegen`], behind the `llvm`
//! feature) → manifest + PTX, loaded by the `ccc-runtime` crate. [`reference`] computes the layer
//! in f64 straight from the spec and judges every stage.

pub mod cli;
#[cfg(feature = "llvm")]
pub mod codegen;
pub mod driver;
pub mod explain;
pub mod frontend;
pub mod ir;
pub mod manifest;
pub mod reference;
pub mod spec;
pub mod tuning;

pub use spec::AttentionSpec;
