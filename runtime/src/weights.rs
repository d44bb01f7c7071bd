//! The learned tensors a library's kernels read, checked against the manifest's `weights` list.

use crate::error::RuntimeError;
use crate::tensor::{HostTensor, describe};
use ccc::manifest::{Manifest, TensorDType, WeightManifest};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// Exactly the manifest's weights, each in the manifest's dtype and shape.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightSet {
    tensors: BTreeMap<String, HostTensor>,
}

impl WeightSet {
    /// Loads the layer's weights from a safetensors file: the layer's own state dict (`prefix`
    /// empty: the file holds exactly its weights), or a whole model's checkpoint with the
    /// layer's names under `prefix` (say `model.layers.3.self_attn.`; tensors outside it are
    /// ignored). Only the header and the layer's tensors are read, so a checkpoint of many
    /// gigabytes costs what the layer's weights do. Tensors stored as bf16, f16 or f32 are
    /// converted to the library's dtype.
    pub fn from_safetensors_file(
        path: impl AsRef<Path>,
        manifest: &Manifest,
        prefix: &str,
    ) -> Result<WeightSet, RuntimeError> {
        let path = path.as_ref();
        let io = |message: String| RuntimeError::Io {
            path: path.to_path_buf(),
            message,
        };
        let file = File::open(path).map_err(|e| io(e.to_string()))?;
        let (data_start, header) = read_header(&file).map_err(io)?;
        let layer: Vec<(&String, &StoredTensor)> = header
            .iter()
            .filter(|(name, _)| name.starts_with(prefix))
            .collect();
        if layer.is_empty() && !prefix.is_empty() {
            return Err(io(wrong_prefix(&header, manifest, prefix)));
        }
        let converted = layer.into_iter().map(|(name, stored)| {
            let tensor = stored.read(&file, data_start).map_err(|e| format!("`{name}` {e}"));
            (name[prefix.len()..].to_string(), tensor)
        });
        WeightSet::from_converted(manifest, converted, prefix)
    }

    /// Builds from host data, e.g. a CPU reference's random weights. Each entry is
    /// (name, shape, values); values are rounded to the library's dtype.
    pub fn from_f64<'a>(
        manifest: &Manifest,
        entries: impl IntoIterator<Item = (&'a str, &'a [usize], &'a [f64])>,
    ) -> Result<WeightSet, RuntimeError> {
        let converted = entries.into_iter().map(|(name, shape, values)| {
            // Rounded straight from f64 to the library dtype: rounding through f32 first could
            // differ in the last bit. Names the manifest lacks are reported by `checked`.
            let dtype = weight_dtype(manifest, name).unwrap_or(TensorDType::F32);
            let tensor = HostTensor::from_f64(dtype, shape.to_vec(), values)
                .map_err(|e| format!("`{name}`: {e}"));
            (name.to_string(), tensor)
        });
        WeightSet::from_converted(manifest, converted, "")
    }

    pub fn from_f32<'a>(
        manifest: &Manifest,
        entries: impl IntoIterator<Item = (&'a str, &'a [usize], &'a [f32])>,
    ) -> Result<WeightSet, RuntimeError> {
        let converted = entries.into_iter().map(|(name, shape, values)| {
            let tensor = HostTensor::from_f32(TensorDType::F32, shape.to_vec(), values)
                .map_err(|e| format!("`{name}`: {e}"));
            (name.to_string(), tensor)
        });
        WeightSet::from_converted(manifest, converted, "")
    }

    /// Collects converted tensors, each failed conversion as a problem (the tensor is then
    /// unreadable rather than missing), and checks them against the manifest; problems name
    /// the tensors as the caller does (under `prefix`).
    fn from_converted(
        manifest: &Manifest,
        converted: impl IntoIterator<Item = (String, Result<HostTensor, String>)>,
        prefix: &str,
    ) -> Result<WeightSet, RuntimeError> {
        let mut problems = Vec::new();
        let mut unreadable = BTreeSet::new();
        let mut tensors = BTreeMap::new();
        for (name, tensor) in converted {
            match tensor {
                Ok(tensor) => {
                    tensors.insert(name, tensor);
                }
                Err(problem) => {
                    problems.push(problem);
                    unreadable.insert(name);
                }
            }
        }
        WeightSet::checked(manifest, tensors, problems, &unreadable, prefix)
    }

    /// Checks names and shapes against the manifest, reporting every problem at once, and
    /// converts each tensor to the manifest's dtype. `unreadable` tensors already have a
    /// problem reported and are not called missing again.
    fn checked(
        manifest: &Manifest,
        mut tensors: BTreeMap<String, HostTensor>,
        mut problems: Vec<String>,
        unreadable: &BTreeSet<String>,
        prefix: &str,
    ) -> Result<WeightSet, RuntimeError> {
        let mut checked = BTreeMap::new();
        let mut missing = Vec::new();
        for WeightManifest { name, shape, dtype } in &manifest.weights {
            match tensors.remove(name) {
                None if unreadable.contains(name) => {}
                None => missing.push(name.as_str()),
                Some(tensor) if tensor.shape != *shape => problems.push(format!(
                    "`{prefix}{name}` has shape {:?}, expected {shape:?}",
                    tensor.shape
                )),
                Some(tensor) => {
                    checked.insert(name.clone(), tensor.to_dtype(*dtype));
                }
            }
        }
        if !missing.is_empty() {
            problems.push(format!("missing {}", quoted(prefix, missing.iter().copied())));
        }
        let extra: Vec<&str> = tensors.keys().map(String::as_str).collect();
        if !extra.is_empty() {
            problems.push(format!("unexpected {}", quoted(prefix, extra.iter().copied())));
        }
        if problems.is_empty() {
            Ok(WeightSet { tensors: checked })
        } else {
            Err(RuntimeError::Weights { problems })
        }
    }

    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.get(name)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &HostTensor)> {
        self.tensors
            .iter()
            .map(|(name, tensor)| (name.as_str(), tensor))
    }
}

fn weight_dtype(manifest: &Manifest, name: &str) -> Option<TensorDType> {
    manifest
        .weights
        .iter()
        .find(|w| w.name == name)
        .map(|w| w.dtype)
}

fn quoted<'a>(prefix: &str, names: impl Iterator<Item = &'a str>) -> String {
    names
        .map(|n| format!("`{prefix}{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The largest header the safetensors format allows (its reference implementation's limit).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// One tensor of a safetensors header: its dtype, shape and bytes in the data section.
struct StoredTensor {
    dtype: String,
    shape: Vec<usize>,
    start: u64,
    end: u64,
}

impl StoredTensor {
    /// The tensor's bytes from the file (`data_start`: where the data section begins), as a
    /// host tensor of its stored dtype.
    fn read(&self, file: &File, data_start: u64) -> Result<HostTensor, String> {
        let dtype = match self.dtype.as_str() {
            "BF16" => TensorDType::Bf16,
            "F16" => TensorDType::F16,
            "F32" => TensorDType::F32,
            other => return Err(format!("is stored as {other}; bf16, f16 or f32 are accepted")),
        };
        // At most the file's size (read_header checked the offsets).
        let mut bytes = vec![0u8; (self.end - self.start) as usize];
        file.read_exact_at(&mut bytes, data_start + self.start)
            .map_err(|e| format!("could not be read: {e}"))?;
        // Its only errors: bytes that are not whole elements, or not the shape's count.
        HostTensor::from_le_bytes(dtype, self.shape.clone(), &bytes)
            .map_err(|_| format!("has {} bytes, not those of {} {:?}", bytes.len(), dtype.name(), self.shape))
    }
}

/// A safetensors file's header (an 8-byte little-endian length, then that much JSON): where the
/// data section starts, and every tensor in it by name.
fn read_header(file: &File) -> Result<(u64, BTreeMap<String, StoredTensor>), String> {
    let not_safetensors = |why: &str| format!("not a safetensors file: {why}");
    let file_bytes = file.metadata().map_err(|e| e.to_string())?.len();
    let mut length = [0u8; 8];
    file.read_exact_at(&mut length, 0)
        .map_err(|_| not_safetensors("shorter than its header's length"))?;
    let length = u64::from_le_bytes(length);
    if length > MAX_HEADER_BYTES || length + 8 > file_bytes {
        return Err(not_safetensors(&format!("a header of {length} bytes in a file of {file_bytes}")));
    }
    let mut header = vec![0u8; length as usize];
    file.read_exact_at(&mut header, 8).map_err(|e| e.to_string())?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| not_safetensors(&format!("header: {e}")))?;
    let data_start = 8 + length;
    let mut tensors = BTreeMap::new();
    for (name, entry) in header {
        if name == "__metadata__" {
            continue;
        }
        let field = |key: &str| entry.get(key).ok_or_else(|| not_safetensors(&format!("`{name}` has no {key}")));
        let numbers = |key: &str| -> Result<Vec<u64>, String> {
            field(key)?
                .as_array()
                .and_then(|values| values.iter().map(serde_json::Value::as_u64).collect())
                .ok_or_else(|| not_safetensors(&format!("`{name}`: {key} is not a list of integers")))
        };
        let dtype = field("dtype")?
            .as_str()
            .ok_or_else(|| not_safetensors(&format!("`{name}`: dtype is not a string")))?
            .to_string();
        let shape = numbers("shape")?.into_iter().map(|d| d as usize).collect();
        let [start, end] = numbers("data_offsets")?[..] else {
            return Err(not_safetensors(&format!("`{name}`: data_offsets is not [start, end]")));
        };
        if start > end || data_start.checked_add(end).is_none_or(|last| last > file_bytes) {
            return Err(not_safetensors(&format!("`{name}`: bytes {start}..{end} outside the file")));
        }
        tensors.insert(name, StoredTensor { dtype, shape, start, end });
    }
    Ok((data_start, tensors))
}

/// Why `prefix` finds none of the layer's weights, and where in the checkpoint they are.
fn wrong_prefix(header: &BTreeMap<String, StoredTensor>, manifest: &Manifest, prefix: &str) -> String {
    let Some(first) = manifest.weights.first().map(|w| w.name.as_str()) else {
        return format!("no tensor starts with `{prefix}`");
    };
    let found: Vec<String> = header
        .keys()
        .filter_map(|name| name.strip_suffix(first))
        .map(|found| format!("`{found}`"))
        .collect();
    if found.is_empty() {
        format!("no tensor starts with `{prefix}`, and none ends with the layer's `{first}`")
    } else {
        format!(
            "no tensor starts with `{prefix}`; the layer's `{first}` is under {}",
            found.join(", ")
        )
    }
}

/// Checks one tensor's dtype and shape; the error names the tensor, what was expected and what
/// came. Shared by every host-side check so that messages read the same.
pub fn check_tensor(
    name: &str,
    expected_dtype: TensorDType,
    expected_shape: &[usize],
    dtype: TensorDType,
    shape: &[usize],
) -> Result<(), RuntimeError> {
    if dtype == expected_dtype && shape == expected_shape {
        return Ok(());
    }
    Err(RuntimeError::TensorMismatch {
        tensor: name.to_string(),
        expected: describe(expected_dtype, expected_shape),
        got: describe(dtype, shape),
    })
}
