//! The files of `ccc tune` (no LLVM needed, so that `ccc-run` on the GPU machine shares them).
//!
//! 1. `ccc tune SPEC -o DIR --top K` compiles, for every Hopper attention and projection-GEMM
//!    kernel of each layer, the top K candidates of the resource model (`codegen::hopper::tiles`)
//!    into candidate libraries `DIR/LAYER/KERNEL/RANK/` (the layer's whole library, only that
//!    kernel's tiles changed) and writes the index `DIR/LAYER/tune-index.json` ([`TuneIndex`]).
//! 2. `ccc-run tune DIR/LAYER --batch B --seq-len S` checks every candidate library against the
//!    f64 reference (as `ccc-run validate` does, at B = 2, S = 257), times the candidate's kernel
//!    on the GPU (CUDA events around that kernel) and writes `DIR/LAYER/tuning-GPU.json`
//!    ([`TuningResult`]): per kernel, every candidate's median time and the fastest correct one.
//! 3. `ccc compile SPEC --tuning FILE` compiles the fastest tiles. A result belongs to one spec
//!    (its [`spec_fingerprint`]) and one GPU (its name, also in the file name): compile refuses a
//!    file whose fingerprint is not the spec's, and, given a directory, takes the `tuning-*.json`
//!    in it whose fingerprint matches (refusing to guess between GPUs).

use crate::spec::AttentionSpec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Names the file format of the index; a change of its meaning changes the number.
pub const INDEX_FORMAT: &str = "ccc-tune-index/1";
/// Names the file format of the result.
pub const RESULT_FORMAT: &str = "ccc-tuning/1";
/// The index's file name inside a layer's tuning directory.
pub const INDEX_FILE: &str = "tune-index.json";

/// Identifies a spec: SHA-256 of its canonical text (`ccc compile --emit spec`), so that a
/// tuning result is applied only to the layer it was measured for.
pub fn spec_fingerprint(spec: &AttentionSpec) -> String {
    let digest = Sha256::digest(crate::frontend::spec_text(spec).as_bytes());
    digest.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// The tiles of one kernel: what a tuning result sets (names as in `codegen::hopper`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TileChoice {
    Attention { block_m: u32, block_n: u32, stages: u32, schedule: String, loads: String },
    Gemm { block_n: u32, stages: u32, schedule: String, loads: String },
}

impl std::fmt::Display for TileChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TileChoice::Attention { block_m, block_n, stages, schedule, loads } => {
                write!(f, "{block_m}x{block_n}, {stages} stages, {schedule}, {loads}")
            }
            TileChoice::Gemm { block_n, stages, schedule, loads } => {
                write!(f, "128x{block_n}, {stages} stages, {schedule}, {loads}")
            }
        }
    }
}

/// One candidate library of a kernel.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IndexCandidate {
    /// The model's rank among the kernel's feasible candidates (1 is the driver's default
    /// where it has run on the GPU).
    pub rank: usize,
    /// The library directory, relative to the index.
    pub library: String,
    pub tiles: TileChoice,
    /// The model's estimate at the index's shape.
    pub estimate_us: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IndexKernel {
    pub kernel: String,
    pub candidates: Vec<IndexCandidate>,
}

/// What `ccc tune -o DIR` writes for one layer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuneIndex {
    pub format: String,
    pub layer: String,
    pub spec_fingerprint: String,
    /// The shape the model ranked for (the spec's `tune` block, else B = 1, S = 16384).
    pub batch: u64,
    pub seq_len: u64,
    pub kernels: Vec<IndexKernel>,
}

/// One timed candidate.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TimedCandidate {
    pub tiles: TileChoice,
    pub library: String,
    pub estimate_us: f64,
    /// Whether its library's forward pass matched the f64 reference (`ccc-run validate`'s
    /// check) before it was timed; a candidate that did not is neither timed nor chosen.
    pub correct: bool,
    /// Median over the timed calls, CUDA events around this kernel alone.
    pub median_ms: Option<f64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TunedKernel {
    pub kernel: String,
    /// The fastest candidate's tiles.
    pub chosen: TileChoice,
    /// Every candidate, fastest first (incorrect ones last).
    pub times: Vec<TimedCandidate>,
}

/// What `ccc-run tune` writes: measured tiles for one spec on one GPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TuningResult {
    pub format: String,
    pub layer: String,
    pub spec_fingerprint: String,
    /// The GPU's name as the CUDA driver reports it.
    pub gpu: String,
    pub batch: u64,
    pub seq_len: u64,
    pub kernels: Vec<TunedKernel>,
}

impl TuningResult {
    /// The file name a result for `gpu` gets in its layer's tuning directory:
    /// `tuning-` and the GPU's name with every run of other characters than letters and digits
    /// made one `-` (`tuning-NVIDIA-H200.json`).
    pub fn file_name(gpu: &str) -> String {
        let mut slug = String::new();
        for c in gpu.chars() {
            if c.is_ascii_alphanumeric() {
                slug.push(c);
            } else if !slug.ends_with('-') {
                slug.push('-');
            }
        }
        format!("tuning-{}.json", slug.trim_matches('-'))
    }

    /// Parses a result file's text; `source` names it in errors.
    pub fn parse(text: &str, source: &str) -> Result<TuningResult, String> {
        let result: TuningResult =
            serde_json::from_str(text).map_err(|e| format!("{source} is not a tuning result: {e}"))?;
        if result.format != RESULT_FORMAT {
            return Err(format!("{source} has format `{}`, expected `{RESULT_FORMAT}`", result.format));
        }
        Ok(result)
    }

    /// The result's tiles per kernel, after checking that it was measured for `spec`.
    pub fn tiles_for(&self, spec: &AttentionSpec, source: &str) -> Result<Vec<(String, TileChoice)>, String> {
        let fingerprint = spec_fingerprint(spec);
        if self.spec_fingerprint != fingerprint {
            return Err(format!(
                "{source} was measured for a different spec (layer `{}`, fingerprint {}), not for layer `{}` \
                 (fingerprint {}); run `ccc tune` again for this spec",
                self.layer,
                short(&self.spec_fingerprint),
                spec.name,
                short(&fingerprint)
            ));
        }
        Ok(self.kernels.iter().map(|k| (k.kernel.clone(), k.chosen.clone())).collect())
    }
}

impl TuneIndex {
    pub fn parse(text: &str, source: &str) -> Result<TuneIndex, String> {
        let index: TuneIndex =
            serde_json::from_str(text).map_err(|e| format!("{source} is not a tuning index: {e}"))?;
        if index.format != INDEX_FORMAT {
            return Err(format!("{source} has format `{}`, expected `{INDEX_FORMAT}`", index.format));
        }
        Ok(index)
    }
}

/// The first 12 hex digits of a fingerprint, for messages.
fn short(fingerprint: &str) -> &str {
    fingerprint.get(..12).unwrap_or(fingerprint)
}

/// Finds the tuning result for `spec` in `directory` or in its subdirectory named after the
/// layer (where `ccc tune -o DIR` puts a layer's candidates and `ccc-run tune` its result): the
/// one `tuning-*.json` whose fingerprint is the spec's. Several (one per GPU) are an error that
/// names them.
pub fn find_result(directory: &std::path::Path, spec: &AttentionSpec) -> Result<(std::path::PathBuf, TuningResult), String> {
    let fingerprint = spec_fingerprint(spec);
    let mut entries: Vec<std::fs::DirEntry> =
        std::fs::read_dir(directory).map_err(|e| format!("cannot read {}: {e}", directory.display()))?.flatten().collect();
    let layer_directory = directory.join(&spec.name);
    if layer_directory.is_dir() {
        let layer_entries = std::fs::read_dir(&layer_directory)
            .map_err(|e| format!("cannot read {}: {e}", layer_directory.display()))?;
        entries.extend(layer_entries.flatten());
    }
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("tuning-") && name.ends_with(".json")) {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        let result = TuningResult::parse(&text, &path.display().to_string())?;
        if result.spec_fingerprint == fingerprint {
            found.push((path, result));
        }
    }
    found.sort_by(|a, b| a.0.cmp(&b.0));
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(format!(
            "{} holds no tuning result for layer `{}` (fingerprint {})",
            directory.display(),
            spec.name,
            short(&fingerprint)
        )),
        _ => Err(format!(
            "{} holds tuning results for layer `{}` from several GPUs ({}): pass one file to --tuning",
            directory.display(),
            spec.name,
            found.iter().map(|(_, r)| r.gpu.as_str()).collect::<Vec<_>>().join(", ")
        )),
    }
}
