//! Test support shared by the integration tests: seeded generators, the example layers and
//! hand-built fixtures, random specs, and the kernel tests' weights and CPU reference.
//! Each test crate includes it with `mod common;` and uses only part of it.
#![allow(dead_code)]

pub mod kernel;
pub mod rng;
pub mod specs;
