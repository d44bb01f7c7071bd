//! The compiler's intermediate representations: graph IR (tensor operations), the kernel plan
//! (which kernels run, with their buffers and grids) and kernel IR (one tile-level function per
//! kernel), each with a verifier and a printer. docs/architecture.md describes the levels.

pub mod graph;
pub mod kernel;
pub mod passes;
pub mod plan;
pub mod size;
