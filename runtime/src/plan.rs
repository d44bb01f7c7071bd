//! Host-side preparation of one call: from the manifest and the caller's sizes to concrete
//! buffer shapes, byte counts, grids and kernel arguments. Everything here runs without a GPU, so
//! shape and dtype errors are tested on any machine; the GPU side only allocates and launches.

use crate::error::RuntimeError;
use crate::tensor::describe;
use ccc::ir::size::{EvalError, SizeEnv, SizeExpr, SizeVar};
use ccc::manifest::{
    BufferRole, EntryPointManifest, KernelParamManifest, Manifest, TensorDType, format_shape,
};
use ccc::spec::EntryPoint;
use std::collections::BTreeMap;

/// Largest grid extents CUDA accepts in x and in y/z.
const MAX_GRID_X: u64 = (1 << 31) - 1;
const MAX_GRID_YZ: u64 = 65_535;

#[derive(Clone, Debug, PartialEq)]
pub struct CallPlan {
    pub entry: EntryPoint,
    pub env: SizeEnv,
    /// One per manifest buffer, in the manifest's order.
    pub buffers: Vec<PlannedBuffer>,
    /// One per kernel, in launch order.
    pub launches: Vec<PlannedLaunch>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PlannedBuffer {
    pub name: String,
    pub role: BufferRole,
    pub dtype: TensorDType,
    pub shape: Vec<usize>,
    pub bytes: usize,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PlannedLaunch {
    pub symbol: String,
    pub grid: (u32, u32, u32),
    pub block: (u32, u32, u32),
    pub dynamic_shared_bytes: u32,
    pub args: Vec<PlannedArg>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlannedArg {
    /// Index into [`CallPlan::buffers`].
    Buffer(usize),
    Size(u32),
    /// The TMA descriptor of buffer `buffer` (index into [`CallPlan::buffers`]) with boxes of
    /// `box_rows` rows, passed by value; encoded when the call's buffers are bound
    /// ([`crate::tensor_map`]), seen as `view` where the manifest gives one.
    TensorMap { buffer: usize, box_rows: u32, view: Option<Vec<usize>> },
}

impl CallPlan {
    /// Plans a call of `entry` for explicit sizes (`env.sms`: the SM count of the device it
    /// runs on, which persistent grids need).
    pub fn for_sizes(
        manifest: &Manifest,
        entry: EntryPoint,
        env: SizeEnv,
    ) -> Result<CallPlan, RuntimeError> {
        let entry_manifest = entry_of(manifest, entry)?;
        if env.batch == 0 || env.seq_len == 0 {
            return Err(RuntimeError::Size {
                message: format!(
                    "batch ({}) and sequence length ({}) must be positive",
                    env.batch, env.seq_len
                ),
            });
        }
        let too_big = |what: &str| RuntimeError::Size {
            message: format!(
                "{what} overflows for B = {}, S = {}",
                env.batch, env.seq_len
            ),
        };
        let unbound = |what: &str, var: SizeVar| RuntimeError::Size {
            message: format!("{what} {}", EvalError::Unbound(var)),
        };
        let mut buffers = Vec::with_capacity(entry_manifest.buffers.len());
        for buffer in &entry_manifest.buffers {
            let what = format!("the shape of `{}`", buffer.name);
            let shape = buffer
                .shape
                .iter()
                .map(|d| match d.eval(&env) {
                    Ok(v) => usize::try_from(v).map_err(|_| too_big(&what)),
                    Err(EvalError::Overflow) => Err(too_big(&what)),
                    Err(EvalError::Unbound(var)) => Err(unbound(&what, var)),
                })
                .collect::<Result<Vec<usize>, _>>()?;
            let bytes = shape
                .iter()
                .try_fold(buffer.dtype.size_bytes(), |acc, &d| acc.checked_mul(d))
                .ok_or_else(|| too_big(&format!("the size of `{}`", buffer.name)))?;
            buffers.push(PlannedBuffer {
                name: buffer.name.clone(),
                role: buffer.role,
                dtype: buffer.dtype,
                shape,
                bytes,
            });
        }
        let mut launches = Vec::with_capacity(entry_manifest.kernels.len());
        for kernel in &entry_manifest.kernels {
            let mut grid = [0u32; 3];
            for (axis, (expr, limit)) in kernel
                .grid
                .iter()
                .zip([MAX_GRID_X, MAX_GRID_YZ, MAX_GRID_YZ])
                .enumerate()
            {
                let blocks = expr.eval(&env).map_err(|error| match error {
                    EvalError::Overflow => too_big(&format!("the grid of `{}`", kernel.symbol)),
                    EvalError::Unbound(var) => {
                        unbound(&format!("kernel `{}`: grid dimension {axis} = {expr}", kernel.symbol), var)
                    }
                })?;
                if blocks == 0 || blocks > limit {
                    return Err(RuntimeError::Size {
                        message: format!(
                            "kernel `{}`: grid dimension {axis} = {expr} = {blocks} for B = {}, S = {} is outside 1..={limit}",
                            kernel.symbol, env.batch, env.seq_len
                        ),
                    });
                }
                grid[axis] = blocks as u32;
            }
            let buffer_index = |name: &str| {
                entry_manifest.buffers.iter().position(|b| b.name == name).ok_or_else(|| RuntimeError::Size {
                    message: format!("kernel `{}` names a missing buffer `{name}`", kernel.symbol),
                })
            };
            let args = kernel
                .params
                .iter()
                .enumerate()
                .map(|(index, param)| match param {
                    KernelParamManifest::Buffer { name } => buffer_index(name).map(PlannedArg::Buffer),
                    KernelParamManifest::TensorMap { buffer, box_rows, view } => {
                        let view = view
                            .as_ref()
                            .map(|shape| {
                                shape
                                    .iter()
                                    .map(|dim| dim.eval(&env).map(|d| d as usize).map_err(|e| RuntimeError::Size { message: format!("kernel `{}`: view of `{buffer}`: {e}", kernel.symbol) }))
                                    .collect::<Result<Vec<_>, _>>()
                            })
                            .transpose()?;
                        buffer_index(buffer).map(|buffer| PlannedArg::TensorMap { buffer, box_rows: *box_rows, view })
                    }
                    KernelParamManifest::Size { var } => {
                        let value = env
                            .get(*var)
                            .ok_or_else(|| unbound(&format!("kernel `{}`: parameter {index}", kernel.symbol), *var))?;
                        u32::try_from(value).map(PlannedArg::Size).map_err(|_| {
                            too_big(&format!("{} as a 32-bit kernel argument", var.symbol()))
                        })
                    }
                })
                .collect::<Result<Vec<_>, _>>()?;
            launches.push(PlannedLaunch {
                symbol: kernel.symbol.clone(),
                grid: (grid[0], grid[1], grid[2]),
                block: (kernel.block[0], kernel.block[1], kernel.block[2]),
                dynamic_shared_bytes: kernel.dynamic_shared_bytes,
                args,
            });
        }
        Ok(CallPlan {
            entry,
            env,
            buffers,
            launches,
        })
    }

    /// Plans a call whose B and S come from the caller's tensor `input` (e.g. `x` of shape
    /// [B, S, E]), after checking its dtype and shape against the manifest, on a device of
    /// `sms` SMs (`None`: no device, which libraries with a persistent grid refuse).
    pub fn for_input(
        manifest: &Manifest,
        entry: EntryPoint,
        input: &str,
        dtype: TensorDType,
        shape: &[usize],
        sms: Option<u64>,
    ) -> Result<CallPlan, RuntimeError> {
        let entry_manifest = entry_of(manifest, entry)?;
        let declared = entry_manifest
            .buffer(input)
            .filter(|b| b.role == BufferRole::Input)
            .ok_or_else(|| RuntimeError::Size {
                message: format!("the `{}` entry point has no input `{input}`", entry.name()),
            })?;
        let mismatch = || RuntimeError::TensorMismatch {
            tensor: input.to_string(),
            expected: format!(
                "{} {}",
                declared.dtype.name(),
                format_shape(&declared.shape)
            ),
            got: describe(dtype, shape),
        };
        if dtype != declared.dtype || shape.len() != declared.shape.len() {
            return Err(mismatch());
        }
        let env = infer_sizes([(declared.shape.as_slice(), shape)], sms).ok_or_else(mismatch)?;
        let plan = CallPlan::for_sizes(manifest, entry, env)?;
        if plan.buffer(input).map(|b| b.shape.as_slice()) != Some(shape) {
            return Err(mismatch());
        }
        Ok(plan)
    }

    /// Plans a call whose sizes come from the caller's tensors, each `(name, dtype, shape)`: every
    /// one must be a buffer the caller supplies to `entry` (an input or state), of its dtype and
    /// rank, and of the shape the sizes read off all of them give (a decode step's B from x,
    /// `pages` from its KV pages, `blocks` from its block table).
    pub fn for_supplied(
        manifest: &Manifest,
        entry: EntryPoint,
        supplied: &[(&str, TensorDType, &[usize])],
        sms: Option<u64>,
    ) -> Result<CallPlan, RuntimeError> {
        let entry_manifest = entry_of(manifest, entry)?;
        let mut declared = Vec::with_capacity(supplied.len());
        for &(name, dtype, shape) in supplied {
            let buffer = entry_manifest
                .buffer(name)
                .filter(|b| matches!(b.role, BufferRole::Input | BufferRole::State))
                .ok_or_else(|| RuntimeError::Size { message: format!("the `{}` entry point takes no tensor `{name}`", entry.name()) })?;
            if dtype != buffer.dtype || shape.len() != buffer.shape.len() {
                return Err(RuntimeError::TensorMismatch {
                    tensor: name.to_string(),
                    expected: format!("{} {}", buffer.dtype.name(), format_shape(&buffer.shape)),
                    got: describe(dtype, shape),
                });
            }
            declared.push((buffer.shape.as_slice(), shape));
        }
        if !declared.iter().any(|(shape, _)| shape.contains(&SizeExpr::batch())) {
            return Err(RuntimeError::Size {
                message: format!(
                    "the tensors given ({}) do not determine B",
                    supplied.iter().map(|(name, ..)| format!("`{name}`")).collect::<Vec<_>>().join(", ")
                ),
            });
        }
        let env = infer_sizes(declared.iter().copied(), sms).ok_or_else(|| RuntimeError::Size {
            message: format!(
                "the shapes of {} do not agree on the sizes: {}",
                supplied.iter().map(|(name, ..)| format!("`{name}`")).collect::<Vec<_>>().join(", "),
                supplied.iter().zip(&declared).map(|((name, _, shape), (expr, _))| format!("{name} {shape:?} as {}", format_shape(expr))).collect::<Vec<_>>().join(", ")
            ),
        })?;
        let plan = CallPlan::for_sizes(manifest, entry, env)?;
        for &(name, dtype, shape) in supplied {
            let planned = plan.buffer(name).expect("checked above");
            if planned.shape != shape {
                return Err(RuntimeError::TensorMismatch {
                    tensor: name.to_string(),
                    expected: describe(planned.dtype, &planned.shape),
                    got: describe(dtype, shape),
                });
            }
        }
        Ok(plan)
    }

    pub fn buffer(&self, name: &str) -> Option<&PlannedBuffer> {
        self.buffers.iter().find(|b| b.name == name)
    }
}

/// Checks a decode step's or a prefill's indices on the host: a prefill's `cu_seqlens` (with its
/// token count) starts at 0, never decreases and ends at the tokens given, and no sequence takes
/// more new tokens than its length; every length fits its row of the block table; and every
/// entry the call touches (the pages holding a key a new token sees: under a sliding window, not
/// those wholly before the first new token's) names a page of the pool. A sequence without new
/// tokens touches nothing. The error names the tensor and the index.
pub fn check_decode_indices(
    manifest: &Manifest,
    block_table: &[i32],
    seq_lens: &[i32],
    pages: usize,
    packed: Option<(&[i32], usize)>,
) -> Result<(), RuntimeError> {
    let page_size = entry_of(manifest, EntryPoint::Decode)?
        .buffer("k_cache")
        .and_then(|b| match b.shape.get(1) {
            Some(SizeExpr::Const(rows)) => Some(*rows as usize),
            _ => None,
        })
        .ok_or_else(|| RuntimeError::Size { message: "the decode entry point has no k_cache of constant page size".into() })?;
    let batch = seq_lens.len();
    let blocks = if batch == 0 { 0 } else { block_table.len() / batch };
    let problem = |message: String| Err(RuntimeError::Size { message });
    if let Some((cu_seqlens, tokens)) = packed {
        if cu_seqlens.len() != batch + 1 {
            return problem(format!("cu_seqlens has {} entries, expected {} (one more than the {batch} sequences)", cu_seqlens.len(), batch + 1));
        }
        if cu_seqlens[0] != 0 {
            return problem(format!("cu_seqlens[0] = {}, expected 0", cu_seqlens[0]));
        }
        if let Some(b) = (1..=batch).find(|&b| cu_seqlens[b] < cu_seqlens[b - 1]) {
            return problem(format!("cu_seqlens[{b}] = {} is below cu_seqlens[{}] = {}", cu_seqlens[b], b - 1, cu_seqlens[b - 1]));
        }
        if cu_seqlens[batch] as usize != tokens {
            return problem(format!("cu_seqlens[{batch}] = {}, expected the {tokens} tokens of x", cu_seqlens[batch]));
        }
    }
    for (b, &len) in seq_lens.iter().enumerate() {
        if len < 0 || len as usize > blocks * page_size {
            return problem(format!(
                "seq_lens[{b}] = {len}: a length from 0 to the block table's {blocks} pages of {page_size} tokens"
            ));
        }
        // A decode step's new token is the last of every non-empty sequence.
        let new = match packed {
            Some((cu_seqlens, _)) => (cu_seqlens[b + 1] - cu_seqlens[b]) as usize,
            None => usize::from(len > 0),
        };
        if new > len as usize {
            return problem(format!("seq_lens[{b}] = {len}: fewer than the sequence's {new} new tokens (cu_seqlens[{}] − cu_seqlens[{b}])", b + 1));
        }
        if new == 0 {
            continue;
        }
        let first_key = match manifest.spec.mask {
            ccc::spec::Mask::SlidingWindow { window } => (len as usize - new + 1).saturating_sub(window),
            _ => 0,
        };
        for j in first_key / page_size..(len as usize).div_ceil(page_size) {
            let page = block_table[b * blocks + j];
            if page < 0 || page as usize >= pages {
                return problem(format!(
                    "block_table[{b}, {j}] = {page}: sequence {b} (length {len}) reads it, and the pool has pages 0..{pages}"
                ));
            }
        }
    }
    Ok(())
}

fn entry_of(manifest: &Manifest, entry: EntryPoint) -> Result<&EntryPointManifest, RuntimeError> {
    manifest
        .entry_point(entry)
        .ok_or(RuntimeError::EntryPointMissing {
            entry: entry.name(),
        })
}

/// Reads the sizes off the dimensions of caller tensors (declared shape, actual shape) that are
/// declared as a plain size variable (`B`, `S`, `pages`, `blocks`); S is 1 when no declared
/// dimension is S (a decode step's tokens). `None` when B or S is not determined or a dimension
/// contradicts another.
fn infer_sizes<'a>(tensors: impl IntoIterator<Item = (&'a [SizeExpr], &'a [usize])>, sms: Option<u64>) -> Option<SizeEnv> {
    let mut found: BTreeMap<SizeVar, u64> = BTreeMap::new();
    let mut mentions_seq_len = false;
    for (declared, shape) in tensors {
        mentions_seq_len |= declared.iter().any(|d| d.uses(SizeVar::SeqLen));
        for (expr, &dim) in declared.iter().zip(shape) {
            let SizeExpr::Var(var) = expr else { continue };
            if *found.entry(*var).or_insert(dim as u64) != dim as u64 {
                return None;
            }
        }
    }
    let seq_len = match found.get(&SizeVar::SeqLen) {
        Some(&s) => s,
        None if !mentions_seq_len => 1,
        None => return None,
    };
    Some(SizeEnv {
        batch: *found.get(&SizeVar::Batch)?,
        seq_len,
        sms,
        pages: found.get(&SizeVar::Pages).copied(),
        blocks: found.get(&SizeVar::Blocks).copied(),
    })
}
