//! The learned tensors a library's kernels read, checked against the manifest's `weights` list.

use crate::error::RuntimeError;
use crate::tensor::{HostTensor, describe};
use ccc::manifest::{Manifest, TensorDType, WeightManifest};
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Exactly the manifest's weights, each in the manifest's dtype and shape.
#[derive(Clone, Debug, PartialEq)]
pub struct WeightSet {
    tensors: BTreeMap<String, HostTensor>,
}

impl WeightSet {
    /// Loads a safetensors file (a Hugging Face / PyTorch state dict of this layer). Tensors
    /// stored as bf16, f16 or f32 are converted to the library's dtype.
    pub fn from_safetensors_file(
        path: impl AsRef<Path>,
        manifest: &Manifest,
    ) -> Result<WeightSet, RuntimeError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| RuntimeError::Io {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        WeightSet::from_safetensors_bytes(&bytes, manifest).map_err(|e| match e {
            RuntimeError::Size { message } => RuntimeError::Io {
                path: path.to_path_buf(),
                message,
            },
            other => other,
        })
    }

    pub fn from_safetensors_bytes(
        bytes: &[u8],
        manifest: &Manifest,
    ) -> Result<WeightSet, RuntimeError> {
        let file = SafeTensors::deserialize(bytes).map_err(|e| RuntimeError::Size {
            message: format!("not a safetensors file: {e}"),
        })?;
        let converted = file.iter().map(|(name, view)| {
            let tensor = match view.dtype() {
                Dtype::BF16 => Ok(TensorDType::Bf16),
                Dtype::F16 => Ok(TensorDType::F16),
                Dtype::F32 => Ok(TensorDType::F32),
                other => Err(format!(
                    "`{name}` is stored as {other:?}; bf16, f16 or f32 are accepted"
                )),
            }
            .and_then(|dtype| {
                HostTensor::from_le_bytes(dtype, view.shape().to_vec(), view.data())
                    .map_err(|e| format!("`{name}`: {e}"))
            });
            (name.to_string(), tensor)
        });
        WeightSet::from_converted(manifest, converted)
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
        WeightSet::from_converted(manifest, converted)
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
        WeightSet::from_converted(manifest, converted)
    }

    /// Collects converted tensors, each failed conversion as a problem (the tensor is then
    /// unreadable rather than missing), and checks them against the manifest.
    fn from_converted(
        manifest: &Manifest,
        converted: impl IntoIterator<Item = (String, Result<HostTensor, String>)>,
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
        WeightSet::checked(manifest, tensors, problems, &unreadable)
    }

    /// Checks names and shapes against the manifest, reporting every problem at once, and
    /// converts each tensor to the manifest's dtype. `unreadable` tensors already have a
    /// problem reported and are not called missing again.
    fn checked(
        manifest: &Manifest,
        mut tensors: BTreeMap<String, HostTensor>,
        mut problems: Vec<String>,
        unreadable: &BTreeSet<String>,
    ) -> Result<WeightSet, RuntimeError> {
        let mut checked = BTreeMap::new();
        let mut missing = Vec::new();
        for WeightManifest { name, shape, dtype } in &manifest.weights {
            match tensors.remove(name) {
                None if unreadable.contains(name) => {}
                None => missing.push(name.as_str()),
                Some(tensor) if tensor.shape != *shape => problems.push(format!(
                    "`{name}` has shape {:?}, expected {shape:?}",
                    tensor.shape
                )),
                Some(tensor) => {
                    checked.insert(name.clone(), tensor.to_dtype(*dtype));
                }
            }
        }
        if !missing.is_empty() {
            problems.push(format!("missing {}", quoted(missing.iter().copied())));
        }
        let extra: Vec<&str> = tensors.keys().map(String::as_str).collect();
        if !extra.is_empty() {
            problems.push(format!("unexpected {}", quoted(extra.iter().copied())));
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

fn quoted<'a>(names: impl Iterator<Item = &'a str>) -> String {
    names
        .map(|n| format!("`{n}`"))
        .collect::<Vec<_>>()
        .join(", ")
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
