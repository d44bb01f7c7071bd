//! The manifest of a compiled kernel library (`manifest.json` next to the PTX).
//!
//! Codegen writes it; the Rust runtime (`ccc-runtime`) and any other loader read it. It says
//! everything a loader needs without knowing the compiler: which kernels to launch in which order,
//! with which parameters in ABI order, on which grid, and every buffer's dtype, layout and size as a
//! [`SizeExpr`] over the runtime sizes. docs/manifest.md describes the JSON field by field; keep
//! the two in step and bump [`SCHEMA_VERSION`] on any change an older reader would misread (version 2: tensor
//! maps passed by value instead of through a device pointer; version 3: sizes may use `SMs`, the
//! SM count of the device the library runs on, which persistent grids are made of; version 4: the
//! decode entry point, with buffers of role `state`, i32 index buffers and the sizes `pages` and
//! `blocks`; version 5: the packed prefill entry point; version 6: `cubin_file`).

use crate::ir::size::{EvalError, SizeEnv, SizeExpr, SizeVar};
use crate::spec::{AttentionSpec, DType, EntryPoint};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path};

/// The schema version this build writes and reads.
pub const SCHEMA_VERSION: u32 = 6;

/// Hopper's dynamic shared memory limit per block (227 KB).
pub const MAX_DYNAMIC_SHARED_BYTES: u32 = 232_448;

/// Shared memory a kernel may use without opting in through the function attribute.
pub const DEFAULT_SHARED_LIMIT_BYTES: u32 = 48 * 1024;

/// Threads per block allowed by every CUDA GPU.
pub const MAX_THREADS_PER_BLOCK: u32 = 1024;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub schema_version: u32,
    /// The `ccc` version that wrote the library (informational).
    pub compiler_version: String,
    /// The layer the library implements; loaders build the CPU reference from it.
    pub spec: AttentionSpec,
    /// The PTX target, e.g. `sm_90a`.
    pub target: String,
    /// The PTX file, relative to the manifest's directory.
    pub ptx_file: String,
    /// The same kernels assembled by ptxas for `target` (`ccc compile --cubin`), relative to the
    /// manifest's directory: loaders take it instead of having the driver compile the PTX.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cubin_file: Option<String>,
    pub entry_points: Vec<EntryPointManifest>,
    /// Every learned tensor the caller supplies, in `spec.params()` order.
    pub weights: Vec<WeightManifest>,
}

/// One learned tensor: Hugging Face name, PyTorch shape (`nn.Linear` [out, in], `nn.Conv1d`
/// [out, in / groups, K]), and the dtype the kernels read it in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightManifest {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: TensorDType,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryPointManifest {
    pub entry: EntryPoint,
    /// Launched in this order on one stream; each kernel sees the previous ones' writes.
    pub kernels: Vec<KernelManifest>,
    /// Every buffer a kernel of this entry point names.
    pub buffers: Vec<BufferManifest>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelManifest {
    /// The `.entry` name in the PTX.
    pub symbol: String,
    /// Kernel parameters in ABI order.
    pub params: Vec<KernelParamManifest>,
    /// Blocks in x, y, z: over B and S, or `SMs` (the device's SM count) for a persistent grid.
    pub grid: [SizeExpr; 3],
    /// Threads in x, y, z.
    pub block: [u32; 3],
    pub dynamic_shared_bytes: u32,
    /// Resource use reported by `ptxas -v` when codegen ran it.
    pub ptxas: Option<PtxasStats>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PtxasStats {
    pub registers: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    /// Static shared memory.
    pub shared_bytes: u32,
}

/// One kernel parameter: a device pointer to a named buffer, a runtime size passed as `u32`, or
/// a TMA descriptor of a named buffer that the runtime encodes for the call and passes by value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum KernelParamManifest {
    Buffer { name: String },
    Size { var: SizeVar },
    /// The 128-byte `CUtensorMap` (`cuTensorMapEncodeTiled`) of buffer `buffer`, a dense tensor
    /// of a 16-bit dtype ([B, S, H, D] `BSHD`, [B, S, C] `BSE`/`BSC`, or a row-major weight
    /// [R, C]) seen with its dimensions innermost first, with boxes of one 128-byte panel of the
    /// innermost dimension × `box_rows` along the row dimension (S, or R of a weight) × 1 along
    /// any other, 128-byte swizzle, 256-byte L2 promotion, and zeros for elements outside the
    /// tensor; passed by value (128 bytes, a `__grid_constant__` parameter aligned to 64).
    /// `view`, where given, is the shape the map sees the buffer as instead of its own (as many
    /// elements, row-major: a packed prefill's x [S, E] seen as [1, S, E]).
    TensorMap {
        buffer: String,
        box_rows: u32,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        view: Option<Vec<SizeExpr>>,
    },
}

/// Most rows a TMA box may span (`cuTensorMapEncodeTiled`: every box dimension ≤ 256).
pub const MAX_TENSOR_MAP_BOX_ROWS: u32 = 256;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BufferManifest {
    pub name: String,
    pub role: BufferRole,
    pub dtype: TensorDType,
    /// Logical shape, outermost first.
    pub shape: Vec<SizeExpr>,
    /// How the shape is laid out in memory, e.g. `BSHD` (row-major over [B, S, H, D]) or
    /// `row_major`. Always dense: no padding between rows.
    pub layout: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BufferRole {
    /// Supplied by the caller, read only.
    Input,
    /// Allocated by the runtime and returned to the caller.
    Output,
    /// One of the manifest's `weights`, supplied by the caller.
    Weight,
    /// Written by one kernel and read by a later one (q̃, k̃, v, o); loaders may return it for
    /// checking against the reference.
    Intermediate,
    /// Kernel-private data, or data kept for checking (the log-sum-exp `lse` without backward).
    Scratch,
    /// Written by the forward for the backward (p0, q̃, k̃, v, o, lse): returned to the caller,
    /// who passes it to the backward entry point, where it is an input.
    Saved,
    /// Supplied by the caller, read and updated in place, kept from call to call: a decode
    /// step's KV pages, convolution state and shift state.
    State,
}

impl BufferRole {
    pub fn name(self) -> &'static str {
        match self {
            BufferRole::Input => "input",
            BufferRole::Output => "output",
            BufferRole::Weight => "weight",
            BufferRole::Intermediate => "intermediate",
            BufferRole::Scratch => "scratch",
            BufferRole::Saved => "saved",
            BufferRole::State => "state",
        }
    }
    /// Whether the caller provides the buffer (the runtime allocates all others).
    pub fn is_caller_supplied(self) -> bool {
        matches!(self, BufferRole::Input | BufferRole::Weight | BufferRole::State)
    }
}

/// Element type of a buffer: the spec's storage dtypes plus f32 for statistics like `lse`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TensorDType {
    Bf16,
    F16,
    F32,
    /// Index tensors: block tables, sequence lengths.
    I32,
}

impl TensorDType {
    pub fn size_bytes(self) -> usize {
        match self {
            TensorDType::Bf16 | TensorDType::F16 => 2,
            TensorDType::F32 | TensorDType::I32 => 4,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            TensorDType::Bf16 => "bf16",
            TensorDType::F16 => "f16",
            TensorDType::F32 => "f32",
            TensorDType::I32 => "i32",
        }
    }
}

impl From<crate::ir::kernel::ElemType> for TensorDType {
    fn from(elem: crate::ir::kernel::ElemType) -> TensorDType {
        use crate::ir::kernel::ElemType;
        match elem {
            ElemType::F32 => TensorDType::F32,
            ElemType::Bf16 => TensorDType::Bf16,
            ElemType::F16 => TensorDType::F16,
            ElemType::I32 => TensorDType::I32,
        }
    }
}

impl From<DType> for TensorDType {
    fn from(dtype: DType) -> TensorDType {
        match dtype {
            DType::Bf16 => TensorDType::Bf16,
            DType::F16 => TensorDType::F16,
        }
    }
}

impl Manifest {
    /// A manifest of this schema version for sm_90a written by this compiler: the weights list
    /// follows from `spec`, the rest is the caller's.
    pub fn new(
        spec: AttentionSpec,
        ptx_file: impl Into<String>,
        entry_points: Vec<EntryPointManifest>,
    ) -> Manifest {
        Manifest {
            schema_version: SCHEMA_VERSION,
            compiler_version: env!("CARGO_PKG_VERSION").to_string(),
            weights: Manifest::weights_for(&spec),
            spec,
            target: "sm_90a".to_string(),
            ptx_file: ptx_file.into(),
            cubin_file: None,
            entry_points,
        }
    }

    /// The weights list every manifest for `spec` must carry: `spec.params()` in the spec's dtype.
    pub fn weights_for(spec: &AttentionSpec) -> Vec<WeightManifest> {
        spec.params()
            .into_iter()
            .map(|p| WeightManifest {
                name: p.name,
                shape: p.shape,
                dtype: spec.dtype.into(),
            })
            .collect()
    }

    /// Parses and validates. The schema version is checked before the rest, so that a manifest
    /// from a newer compiler is reported as such rather than as a field error.
    pub fn from_json(text: &str) -> Result<Manifest, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("manifest is not valid JSON: {e}"))?;
        match value.get("schema_version").map(|v| v.as_u64()) {
            None => return Err("manifest has no schema_version".into()),
            Some(Some(v)) if v == u64::from(SCHEMA_VERSION) => {}
            Some(Some(v)) => {
                return Err(format!(
                    "unknown manifest schema version {v}: this build reads version {SCHEMA_VERSION}"
                ));
            }
            Some(None) => return Err("manifest schema_version is not an unsigned integer".into()),
        }
        let manifest: Manifest =
            serde_json::from_value(value).map_err(|e| format!("malformed manifest: {e}"))?;
        manifest.validate()?;
        Ok(manifest)
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a manifest always serialises")
    }

    pub fn entry_point(&self, entry: EntryPoint) -> Option<&EntryPointManifest> {
        self.entry_points.iter().find(|e| e.entry == entry)
    }

    /// Checks everything a loader relies on; the message names the offending item.
    pub fn validate(&self) -> Result<(), String> {
        if self.schema_version != SCHEMA_VERSION {
            return Err(format!(
                "unknown manifest schema version {}: this build reads version {SCHEMA_VERSION}",
                self.schema_version
            ));
        }
        self.spec
            .validate()
            .map_err(|e| format!("manifest spec is invalid: {e}"))?;
        if !self.target.starts_with("sm_") {
            return Err(format!(
                "target `{}` is not a CUDA architecture like sm_90a",
                self.target
            ));
        }
        let files = std::iter::once(("ptx_file", &self.ptx_file)).chain(self.cubin_file.iter().map(|file| ("cubin_file", file)));
        for (field, file) in files {
            let inside = Path::new(file).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
            if file.is_empty() || !inside {
                return Err(format!("{field} `{file}` must be a relative path inside the library directory"));
            }
        }
        let expected_weights = Manifest::weights_for(&self.spec);
        if self.weights != expected_weights {
            return Err(format!(
                "weights must be the spec's parameters in order, in {}: expected [{}], got [{}]",
                self.spec.dtype.name(),
                describe_weights(&expected_weights),
                describe_weights(&self.weights)
            ));
        }
        let mut seen_entries = BTreeSet::new();
        let mut seen_symbols = BTreeSet::new();
        for entry in &self.entry_points {
            let name = entry.entry.name();
            if !seen_entries.insert(entry.entry) {
                return Err(format!("entry point `{name}` is listed twice"));
            }
            if !self.spec.library_entry_points().contains(&entry.entry) {
                return Err(format!(
                    "entry point `{name}` is not in the spec's emit list"
                ));
            }
            entry
                .validate(self)
                .map_err(|e| format!("entry point `{name}`: {e}"))?;
            for kernel in &entry.kernels {
                if !seen_symbols.insert(kernel.symbol.as_str()) {
                    return Err(format!("kernel symbol `{}` is used twice", kernel.symbol));
                }
            }
        }
        self.validate_saved()?;
        for entry in &self.spec.library_entry_points() {
            if !seen_entries.contains(entry) {
                return Err(format!(
                    "the spec emits `{}` but the manifest lacks it",
                    entry.name()
                ));
            }
        }
        Ok(())
    }
}

impl Manifest {
    /// Role `saved` only in the forward; with a backward, its inputs other than x and dout are
    /// exactly the forward's saved buffers, declared alike.
    fn validate_saved(&self) -> Result<(), String> {
        for entry in self.entry_points.iter().filter(|e| e.entry != EntryPoint::Forward) {
            if let Some(buffer) = entry.buffers.iter().find(|b| b.role == BufferRole::Saved) {
                return Err(format!("entry point `{}`: buffer `{}` has role saved, which only the forward's buffers take", entry.entry.name(), buffer.name));
            }
        }
        let Some(forward) = self.entry_point(EntryPoint::Forward) else { return Ok(()) };
        let Some(backward) = self.entry_point(EntryPoint::Backward) else {
            return match forward.buffers.iter().find(|b| b.role == BufferRole::Saved) {
                Some(kept) => Err(format!("the forward saves `{}` but the library has no backward", kept.name)),
                None => Ok(()),
            };
        };
        for read in backward.buffers.iter().filter(|b| b.role == BufferRole::Input && !matches!(b.name.as_str(), "x" | "dout")) {
            match forward.buffer(&read.name) {
                Some(kept) if kept.role == BufferRole::Saved && kept.dtype == read.dtype && kept.shape == read.shape => {}
                _ => {
                    return Err(format!(
                        "the backward reads `{}` ({} {}), which the forward does not save as such",
                        read.name,
                        read.dtype.name(),
                        format_shape(&read.shape)
                    ));
                }
            }
        }
        if let Some(kept) = forward.buffers.iter().find(|b| b.role == BufferRole::Saved && backward.buffer(&b.name).is_none()) {
            return Err(format!("the forward saves `{}`, which the backward does not read", kept.name));
        }
        Ok(())
    }
}

fn describe_weights(weights: &[WeightManifest]) -> String {
    weights
        .iter()
        .map(|w| format!("{} {:?} {}", w.name, w.shape, w.dtype.name()))
        .collect::<Vec<_>>()
        .join(", ")
}

impl WeightManifest {
    /// The entry-point buffer through which kernels read this weight.
    pub fn as_buffer(&self) -> BufferManifest {
        BufferManifest {
            name: self.name.clone(),
            role: BufferRole::Weight,
            dtype: self.dtype,
            shape: self.shape.iter().map(|&d| SizeExpr::from(d)).collect(),
            layout: "row_major".to_string(),
        }
    }
}

impl EntryPointManifest {
    pub fn buffer(&self, name: &str) -> Option<&BufferManifest> {
        self.buffers.iter().find(|b| b.name == name)
    }

    fn validate(&self, manifest: &Manifest) -> Result<(), String> {
        let mut names = BTreeMap::new();
        for buffer in &self.buffers {
            if names.insert(buffer.name.as_str(), buffer).is_some() {
                return Err(format!("buffer `{}` is declared twice", buffer.name));
            }
            buffer
                .validate(manifest)
                .map_err(|e| format!("buffer `{}`: {e}", buffer.name))?;
        }
        let token_buffers: &[(&str, BufferRole)] = match self.entry {
            EntryPoint::Forward | EntryPoint::Decode | EntryPoint::Prefill => &[("x", BufferRole::Input), ("out", BufferRole::Output)],
            EntryPoint::Backward => &[("x", BufferRole::Input), ("dout", BufferRole::Input), ("dx", BufferRole::Output)],
        };
        if !matches!(self.entry, EntryPoint::Decode | EntryPoint::Prefill)
            && let Some(state) = self.buffers.iter().find(|b| b.role == BufferRole::State)
        {
            return Err(format!("buffer `{}` has role state, which only the decode and prefill entry points' buffers take", state.name));
        }
        if self.entry == EntryPoint::Backward {
            for weight in &manifest.weights {
                let name = format!("grad.{}", weight.name);
                let expected: Vec<SizeExpr> = weight.shape.iter().map(|&d| SizeExpr::from(d)).collect();
                match names.get(name.as_str()) {
                    Some(found) if found.role == BufferRole::Output && found.dtype == TensorDType::F32 && found.shape == expected => {}
                    _ => return Err(format!("the backward pass needs an f32 output `{name}` of shape {:?}", weight.shape)),
                }
            }
        }
        {
            let spec = &manifest.spec;
            // A decode step takes one token of each sequence, a prefill the packed tokens of all.
            let e = SizeExpr::from(spec.model_dim);
            let (token_shape, layout) = match self.entry {
                EntryPoint::Decode => (vec![SizeExpr::batch(), SizeExpr::c(1), e], "BSE"),
                EntryPoint::Prefill => (vec![SizeExpr::seq_len(), e], "SE"),
                EntryPoint::Forward | EntryPoint::Backward => (vec![SizeExpr::batch(), SizeExpr::seq_len(), e], "BSE"),
            };
            for &(name, role) in token_buffers {
                let expected = BufferManifest {
                    name: name.to_string(),
                    role,
                    dtype: spec.dtype.into(),
                    shape: token_shape.clone(),
                    layout: layout.to_string(),
                };
                match names.get(name) {
                    Some(&found) if *found == expected => {}
                    Some(found) => {
                        return Err(format!(
                            "buffer `{name}` must be {} {} {} in layout {layout}, got {} {} {} in layout {}",
                            role.name(),
                            spec.dtype.name(),
                            format_shape(&token_shape),
                            found.role.name(),
                            found.dtype.name(),
                            format_shape(&found.shape),
                            found.layout
                        ));
                    }
                    None => return Err(format!("the {} pass needs a buffer `{name}`", self.entry.name())),
                }
            }
        }
        if self.kernels.is_empty() {
            return Err("no kernels".into());
        }
        for kernel in &self.kernels {
            kernel
                .validate(&names)
                .map_err(|e| format!("kernel `{}`: {e}", kernel.symbol))?;
        }
        Ok(())
    }
}

impl BufferManifest {
    /// Elements for one call.
    pub fn elements(&self, env: &SizeEnv) -> Result<u64, EvalError> {
        self.shape
            .iter()
            .try_fold(1u64, |acc, dim| acc.checked_mul(dim.eval(env)?).ok_or(EvalError::Overflow))
    }

    fn validate(&self, manifest: &Manifest) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("empty name".into());
        }
        if self.shape.is_empty() {
            return Err("shape has no dimensions".into());
        }
        if self.layout.is_empty() {
            return Err("empty layout".into());
        }
        if self.role == BufferRole::Weight {
            let Some(weight) = manifest.weights.iter().find(|w| w.name == self.name) else {
                return Err("role weight, but no weight of that name in the manifest".into());
            };
            let shape: Vec<SizeExpr> = weight.shape.iter().map(|&d| SizeExpr::from(d)).collect();
            if shape != self.shape || weight.dtype != self.dtype {
                return Err(format!(
                    "must match weight {} {:?}, got {} {}",
                    weight.dtype.name(),
                    weight.shape,
                    self.dtype.name(),
                    format_shape(&self.shape)
                ));
            }
        }
        Ok(())
    }
}

impl KernelManifest {
    fn validate(&self, buffers: &BTreeMap<&str, &BufferManifest>) -> Result<(), String> {
        let mut chars = self.symbol.chars();
        let identifier = chars
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
        if !identifier {
            return Err("the symbol is not a PTX identifier".into());
        }
        for (index, param) in self.params.iter().enumerate() {
            match param {
                KernelParamManifest::Buffer { name } if !buffers.contains_key(name.as_str()) => {
                    return Err(format!("parameter {index} names a missing buffer `{name}`"));
                }
                KernelParamManifest::TensorMap { buffer, box_rows, view } => {
                    let Some(&target) = buffers.get(buffer.as_str()) else {
                        return Err(format!("parameter {index} maps a missing buffer `{buffer}`"));
                    };
                    let viewed = match view {
                        None => target.clone(),
                        Some(view) => viewed_as(target, view).map_err(|why| format!("parameter {index}: tensor map of `{buffer}`: {why}"))?,
                    };
                    tensor_map_target(&viewed, *box_rows)
                        .map_err(|why| format!("parameter {index}: tensor map of `{buffer}`: {why}"))?;
                }
                _ => {}
            }
        }
        if self.block.contains(&0) {
            return Err(format!("block {:?} has a zero dimension", self.block));
        }
        let threads = self
            .block
            .iter()
            .try_fold(1u32, |acc, &d| acc.checked_mul(d));
        if threads.is_none_or(|t| t > MAX_THREADS_PER_BLOCK) {
            return Err(format!(
                "block {:?} exceeds {MAX_THREADS_PER_BLOCK} threads",
                self.block
            ));
        }
        if self.dynamic_shared_bytes > MAX_DYNAMIC_SHARED_BYTES {
            return Err(format!(
                "dynamic shared memory {} bytes exceeds the {MAX_DYNAMIC_SHARED_BYTES}-byte limit",
                self.dynamic_shared_bytes
            ));
        }
        Ok(())
    }
}

/// Checks that `buffer` can be seen through a [`KernelParamManifest::TensorMap`]: `BSHD` of rank
/// 4, `BSE`/`BSC` of rank 3 or a `row_major` weight of rank 2, a 16-bit dtype, an innermost
/// dimension whose rows are a non-zero multiple of 16 bytes (TMA's stride rule), and a box of 1
/// to [`MAX_TENSOR_MAP_BOX_ROWS`] rows.
fn tensor_map_target(buffer: &BufferManifest, box_rows: u32) -> Result<(), String> {
    let rank = match buffer.layout.as_str() {
        "BSHD" => 4,
        "BSE" | "BSC" => 3,
        "row_major" => 2,
        _ => 0,
    };
    if rank != buffer.shape.len() {
        return Err(format!(
            "needs a [B, S, H, D], [B, S, C] or row-major [R, C] buffer, got {} {}",
            buffer.layout,
            format_shape(&buffer.shape)
        ));
    }
    if !matches!(buffer.dtype, TensorDType::Bf16 | TensorDType::F16) {
        return Err(format!("needs bf16 or f16, got {}", buffer.dtype.name()));
    }
    let alignment_elements = 16 / buffer.dtype.size_bytes() as u64;
    let innermost = &buffer.shape[rank - 1];
    if !matches!(innermost, SizeExpr::Const(d) if *d > 0 && d % alignment_elements == 0) {
        return Err(format!("the innermost dimension {innermost} is not a constant multiple of {alignment_elements}"));
    }
    if box_rows == 0 || box_rows > MAX_TENSOR_MAP_BOX_ROWS {
        return Err(format!("a box of {box_rows} rows (1 to {MAX_TENSOR_MAP_BOX_ROWS})"));
    }
    Ok(())
}

/// `buffer` seen as `view` (a tensor map's), laid out as its rank says (`BSHD`, `BSC` or
/// `row_major`): it must hold as many elements at every size.
fn viewed_as(buffer: &BufferManifest, view: &[SizeExpr]) -> Result<BufferManifest, String> {
    let layout = match view.len() {
        4 => "BSHD",
        3 => "BSC",
        2 => "row_major",
        _ => return Err(format!("a view {} of rank 2 to 4", format_shape(view))),
    };
    let elements = |shape: &[SizeExpr], env: &SizeEnv| shape.iter().try_fold(1u64, |acc, dim| Some(acc * dim.eval(env).ok()?));
    let same = [(1, 1), (3, 17), (2, 1000)].into_iter().all(|(batch, seq_len)| {
        let env = SizeEnv { batch, seq_len, sms: Some(132), pages: Some(7), blocks: Some(5) };
        elements(&buffer.shape, &env) == elements(view, &env)
    });
    if !same {
        return Err(format!("a view {} of the buffer's {} does not hold as many elements", format_shape(view), format_shape(&buffer.shape)));
    }
    Ok(BufferManifest { shape: view.to_vec(), layout: layout.to_string(), ..buffer.clone() })
}

/// `[B, S, 2048]`: how shapes appear in messages.
pub fn format_shape(shape: &[SizeExpr]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join(", "))
}
