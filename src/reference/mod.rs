//! The CPU reference: the whole layer in f64, straight from `AttentionSpec`.
