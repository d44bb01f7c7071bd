//! TMA descriptors for the manifest's `tensor_map` kernel parameters
//! ([`ccc::manifest::KernelParamManifest::TensorMap`]): a dense tensor of a 16-bit dtype
//! ([B, S, H, D], [B, S, C] or a row-major weight [R, C]) seen with its dimensions innermost
//! first, boxes of one 128-byte panel of the innermost dimension × `box_rows` along the row
//! dimension (S, or R of a weight) × 1 along any other, 128-byte swizzle, zeros outside the
//! tensor.
//!
//! The geometry comes from the call plan (host only, tested without a GPU); the 128-byte
//! descriptor itself is encoded by the driver (`cuTensorMapEncodeTiled`) from the buffer's
//! device address, for each call, and reaches the kernel by value as a `__grid_constant__`
//! parameter (no device copy, so no proxy fence before the kernel's first TMA copy).

use crate::error::RuntimeError;
use crate::plan::PlannedBuffer;
use ccc::manifest::TensorDType;
use cudarc::driver::{DeviceRepr, sys};

/// One encoded descriptor, pushed to `cuLaunchKernel` as a 128-byte by-value argument (the
/// kernel's `.param .align 64 .b8 name[128]`).
#[repr(C, align(64))]
pub struct EncodedTensorMap(sys::CUtensorMap);

// SAFETY: plain bytes of the size and alignment of the kernel parameter it fills.
unsafe impl DeviceRepr for EncodedTensorMap {}

const _: () = assert!(std::mem::size_of::<EncodedTensorMap>() == 128);
/// Bytes of one box row: one 128-byte swizzle panel.
const PANEL_BYTES: u64 = 128;
/// TMA's rule for the byte strides of the outer dimensions.
const STRIDE_ALIGNMENT: u64 = 16;

/// Everything `cuTensorMapEncodeTiled` needs besides the address; dimensions innermost first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMapGeometry {
    pub dtype: TensorDType,
    pub dims: Vec<u64>,
    /// Byte strides of every dimension but the innermost.
    pub strides_bytes: Vec<u64>,
    pub box_dims: Vec<u32>,
}

/// The geometry of `buffer`'s map with boxes of `box_rows` rows. The row dimension is S of a
/// [B, S, H, D] or [B, S, C] buffer (second outermost) and R of a weight [R, C] (outermost).
/// The manifest was validated, so an error here means a manifest the validator let through.
pub fn geometry(buffer: &PlannedBuffer, box_rows: u32) -> Result<TensorMapGeometry, RuntimeError> {
    let mismatch = |why: &str| RuntimeError::Size {
        message: format!("tensor map of `{}` {:?}: {why}", buffer.name, buffer.shape),
    };
    if !(2..=4).contains(&buffer.shape.len()) {
        return Err(mismatch("not a [B, S, H, D], [B, S, C] or [R, C] buffer"));
    }
    let element = buffer.dtype.size_bytes() as u64;
    let dims: Vec<u64> = buffer.shape.iter().rev().map(|&d| d as u64).collect();
    if element != 2 || dims[0] == 0 || !(dims[0] * element).is_multiple_of(STRIDE_ALIGNMENT) {
        return Err(mismatch("needs 16-bit elements and rows of whole 16-byte chunks"));
    }
    let strides_bytes: Vec<u64> = dims
        .iter()
        .scan(element, |stride, &d| {
            *stride *= d;
            Some(*stride)
        })
        .take(dims.len() - 1)
        .collect();
    let row_dimension = if dims.len() == 2 { 1 } else { dims.len() - 2 };
    let box_dims = (0..dims.len())
        .map(|i| match i {
            0 => (PANEL_BYTES / element) as u32,
            i if i == row_dimension => box_rows,
            _ => 1,
        })
        .collect();
    Ok(TensorMapGeometry { dtype: buffer.dtype, dims, strides_bytes, box_dims })
}

/// Encodes the descriptor of the tensor at device address `address` (needs the driver).
pub fn encode(geometry: &TensorMapGeometry, address: u64, name: &str) -> Result<EncodedTensorMap, RuntimeError> {
    let data_type = match geometry.dtype {
        TensorDType::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        TensorDType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        TensorDType::F32 | TensorDType::I32 => {
            return Err(RuntimeError::Size { message: format!("tensor map of `{name}`: {} is not mapped", geometry.dtype.name()) });
        }
    };
    let element_strides = vec![1u32; geometry.dims.len()];
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: every pointer is to a live array of the length the rank (the length of `dims`, 2 to 4) implies; the driver
    // writes only the descriptor.
    let status = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            data_type,
            geometry.dims.len() as u32,
            address as *mut std::ffi::c_void,
            geometry.dims.as_ptr(),
            geometry.strides_bytes.as_ptr(),
            geometry.box_dims.as_ptr(),
            element_strides.as_ptr(),
            sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
            sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
        )
    };
    status.result().map_err(|e| RuntimeError::driver(format!("encoding the tensor map of `{name}` ({geometry:?})"), e))?;
    Ok(EncodedTensorMap(map))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ccc::manifest::BufferRole;

    fn buffer(dtype: TensorDType, shape: Vec<usize>) -> PlannedBuffer {
        let bytes = shape.iter().product::<usize>() * dtype.size_bytes();
        PlannedBuffer { name: "q".into(), role: BufferRole::Intermediate, dtype, shape, bytes }
    }

    #[test]
    fn geometry_sees_dimensions_innermost_first_with_boxes_along_the_rows() {
        let bshd = geometry(&buffer(TensorDType::Bf16, vec![3, 17, 8, 128]), 128).unwrap();
        assert_eq!(bshd.dims, [128, 8, 17, 3]);
        assert_eq!(bshd.strides_bytes, [256, 2048, 17 * 2048]);
        assert_eq!(bshd.box_dims, [64, 1, 128, 1]);
        let bse = geometry(&buffer(TensorDType::Bf16, vec![2, 1000, 2048]), 128).unwrap();
        assert_eq!((bse.dims, bse.strides_bytes, bse.box_dims), (vec![2048, 1000, 2], vec![4096, 4096 * 1000], vec![64, 128, 1]));
        let weight = geometry(&buffer(TensorDType::F16, vec![1280, 576]), 128).unwrap();
        assert_eq!((weight.dims, weight.strides_bytes, weight.box_dims), (vec![576, 1280], vec![1152], vec![64, 128]));
    }

    #[test]
    fn geometry_refuses_what_the_kernel_cannot_read() {
        let error = geometry(&buffer(TensorDType::F32, vec![1, 4, 2, 64]), 64).unwrap_err().to_string();
        assert!(error.contains("tensor map of `q`") && error.contains("16-bit"), "{error}");
        let error = geometry(&buffer(TensorDType::Bf16, vec![1, 4, 2, 12]), 64).unwrap_err().to_string();
        assert!(error.contains("16-byte chunks"), "{error}");
        let error = geometry(&buffer(TensorDType::Bf16, vec![64]), 64).unwrap_err().to_string();
        assert!(error.contains("[B, S, H, D], [B, S, C] or [R, C]"), "{error}");
    }
}
