//! Host tensors: typed element storage plus a shape, with the conversions the runtime needs
//! (f64 ↔ storage dtype with round-to-nearest-even, little-endian bytes for the device).

use crate::error::RuntimeError;
use ccc::manifest::TensorDType;
use half::{bf16, f16};

#[derive(Clone, Debug, PartialEq)]
pub enum HostData {
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    F32(Vec<f32>),
    /// Index tensors (block tables, sequence lengths).
    I32(Vec<i32>),
}

/// A dense row-major tensor in host memory.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: HostData,
}

impl HostTensor {
    /// Rounds `values` to `dtype` (round to nearest even, as the GPU's conversions do).
    pub fn from_f64(
        dtype: TensorDType,
        shape: Vec<usize>,
        values: &[f64],
    ) -> Result<HostTensor, RuntimeError> {
        check_len(&shape, values.len())?;
        let data = match dtype {
            TensorDType::Bf16 => {
                HostData::Bf16(values.iter().map(|&v| bf16::from_f64(v)).collect())
            }
            TensorDType::F16 => HostData::F16(values.iter().map(|&v| f16::from_f64(v)).collect()),
            TensorDType::F32 => HostData::F32(values.iter().map(|&v| v as f32).collect()),
            TensorDType::I32 => HostData::I32(integers(values.iter().copied())?),
        };
        Ok(HostTensor { shape, data })
    }

    pub fn from_f32(
        dtype: TensorDType,
        shape: Vec<usize>,
        values: &[f32],
    ) -> Result<HostTensor, RuntimeError> {
        check_len(&shape, values.len())?;
        let data = match dtype {
            TensorDType::Bf16 => {
                HostData::Bf16(values.iter().map(|&v| bf16::from_f32(v)).collect())
            }
            TensorDType::F16 => HostData::F16(values.iter().map(|&v| f16::from_f32(v)).collect()),
            TensorDType::F32 => HostData::F32(values.to_vec()),
            TensorDType::I32 => HostData::I32(integers(values.iter().map(|&v| f64::from(v)))?),
        };
        Ok(HostTensor { shape, data })
    }

    /// Reads little-endian elements of `dtype`, as stored on the device or in safetensors.
    pub fn from_le_bytes(
        dtype: TensorDType,
        shape: Vec<usize>,
        bytes: &[u8],
    ) -> Result<HostTensor, RuntimeError> {
        let elements = bytes.len() / dtype.size_bytes();
        if !bytes.len().is_multiple_of(dtype.size_bytes()) {
            return Err(RuntimeError::Size {
                message: format!(
                    "{} bytes are not a whole number of {} elements",
                    bytes.len(),
                    dtype.name()
                ),
            });
        }
        check_len(&shape, elements)?;
        let pairs = || {
            bytes
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]))
        };
        let data = match dtype {
            TensorDType::Bf16 => HostData::Bf16(pairs().map(bf16::from_bits).collect()),
            TensorDType::F16 => HostData::F16(pairs().map(f16::from_bits).collect()),
            TensorDType::F32 => HostData::F32(
                bytes
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
            TensorDType::I32 => HostData::I32(
                bytes
                    .chunks_exact(4)
                    .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                    .collect(),
            ),
        };
        Ok(HostTensor { shape, data })
    }

    pub fn dtype(&self) -> TensorDType {
        match self.data {
            HostData::Bf16(_) => TensorDType::Bf16,
            HostData::F16(_) => TensorDType::F16,
            HostData::F32(_) => TensorDType::F32,
            HostData::I32(_) => TensorDType::I32,
        }
    }

    pub fn len(&self) -> usize {
        match &self.data {
            HostData::Bf16(v) => v.len(),
            HostData::F16(v) => v.len(),
            HostData::F32(v) => v.len(),
            HostData::I32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Exact widening to f64.
    pub fn to_f64(&self) -> Vec<f64> {
        match &self.data {
            HostData::Bf16(v) => v.iter().map(|x| x.to_f64()).collect(),
            HostData::F16(v) => v.iter().map(|x| x.to_f64()).collect(),
            HostData::F32(v) => v.iter().map(|&x| f64::from(x)).collect(),
            HostData::I32(v) => v.iter().map(|&x| f64::from(x)).collect(),
        }
    }

    /// The same values in another dtype (rounded when narrowing).
    pub fn to_dtype(&self, dtype: TensorDType) -> HostTensor {
        if dtype == self.dtype() {
            return self.clone();
        }
        let data = match (&self.data, dtype) {
            // f32 → 16-bit rounds once, directly; going through f64 would give the same result.
            (HostData::F32(v), TensorDType::Bf16) => {
                HostData::Bf16(v.iter().map(|&x| bf16::from_f32(x)).collect())
            }
            (HostData::F32(v), TensorDType::F16) => {
                HostData::F16(v.iter().map(|&x| f16::from_f32(x)).collect())
            }
            _ => {
                let wide = self.to_f64();
                return HostTensor::from_f64(dtype, self.shape.clone(), &wide)
                    .expect("same element count as the source tensor");
            }
        };
        HostTensor {
            shape: self.shape.clone(),
            data,
        }
    }

    pub fn to_le_bytes(&self) -> Vec<u8> {
        match &self.data {
            HostData::Bf16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            HostData::F16(v) => v.iter().flat_map(|x| x.to_bits().to_le_bytes()).collect(),
            HostData::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            HostData::I32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
}

/// The bytes of `elements` quiet NaNs of `dtype`: what outputs and intermediates are filled with
/// before a launch, so that anything a kernel fails to write shows up as NaN.
pub fn nan_bytes(dtype: TensorDType, elements: usize) -> Vec<u8> {
    let one: Vec<u8> = match dtype {
        TensorDType::Bf16 => bf16::NAN.to_bits().to_le_bytes().to_vec(),
        TensorDType::F16 => f16::NAN.to_bits().to_le_bytes().to_vec(),
        TensorDType::F32 => f32::NAN.to_le_bytes().to_vec(),
        // No NaN: the most negative index, which no page or length check lets through.
        TensorDType::I32 => i32::MIN.to_le_bytes().to_vec(),
    };
    one.repeat(elements)
}

/// Rounds every value to `dtype` and back, in place: what the reference must see so that it
/// starts from exactly the numbers the GPU reads.
pub fn round_through(dtype: TensorDType, values: &mut [f64]) {
    for v in values {
        *v = match dtype {
            TensorDType::Bf16 => bf16::from_f64(*v).to_f64(),
            TensorDType::F16 => f16::from_f64(*v).to_f64(),
            TensorDType::F32 => f64::from(*v as f32),
            // Index tensors hold integers already (`HostTensor::from_f64` refuses others).
            TensorDType::I32 => *v,
        };
    }
}

/// `values` as i32, each an integer in range (an index tensor holds nothing else).
fn integers(values: impl Iterator<Item = f64>) -> Result<Vec<i32>, RuntimeError> {
    values
        .map(|v| {
            if v.fract() == 0.0 && v >= f64::from(i32::MIN) && v <= f64::from(i32::MAX) {
                Ok(v as i32)
            } else {
                Err(RuntimeError::Size { message: format!("{v} is not an i32 index") })
            }
        })
        .collect()
}

fn check_len(shape: &[usize], len: usize) -> Result<(), RuntimeError> {
    let expected = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
    if expected != Some(len) {
        return Err(RuntimeError::Size {
            message: format!("shape {shape:?} does not hold {len} elements"),
        });
    }
    Ok(())
}

/// `bf16 [2, 17, 64]`: how tensors appear in mismatch messages.
pub fn describe(dtype: TensorDType, shape: &[usize]) -> String {
    format!("{} {:?}", dtype.name(), shape)
}
