//! TMA descriptors for the manifest's `tensor_map` kernel parameters
//! ([`ccc::manifest::KernelParamManifest::TensorMap`]): a dense [B, S, H, D] buffer of a 16-bit
//! dtype seen as the 4-d tensor (D, H, S, B), innermost first, boxes of one 128-byte panel of D ×
//! 1 head × `box_rows` rows × 1 batch element, 128-byte swizzle, zeros outside the tensor.
//!
//! The geometry comes from the call plan (host only, tested without a GPU); the 128-byte
//! descriptor itself is encoded by the driver (`cuTensorMapEncodeTiled`) from the buffer's
//! device address, for each call, and reaches the kernel through global memory.

use crate::error::RuntimeError;
use crate::plan::PlannedBuffer;
use ccc::manifest::TensorDType;
use cudarc::driver::sys;

/// Bytes of one encoded descriptor (`CUtensorMap`).
pub const TENSOR_MAP_BYTES: usize = 128;
/// Bytes of one box row: one 128-byte swizzle panel.
const PANEL_BYTES: u64 = 128;

/// Everything `cuTensorMapEncodeTiled` needs besides the address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorMapGeometry {
    pub dtype: TensorDType,
    /// Extents, innermost first: (D, H, S, B).
    pub dims: [u64; 4],
    /// Byte strides of the three outer dimensions (H, S, B).
    pub strides_bytes: [u64; 3],
    /// Box extents, innermost first: (elements of 128 bytes, 1, box_rows, 1).
    pub box_dims: [u32; 4],
}

/// The geometry of `buffer`'s map with boxes of `box_rows` rows; the manifest was validated
/// (shape [B, S, H, D], bf16 or f16, D a multiple of a panel), so an error here means a
/// manifest the validator let through.
pub fn geometry(buffer: &PlannedBuffer, box_rows: u32) -> Result<TensorMapGeometry, RuntimeError> {
    let mismatch = |why: &str| RuntimeError::Size {
        message: format!("tensor map of `{}` {:?}: {why}", buffer.name, buffer.shape),
    };
    let &[batch, seq, heads, head_dim] = buffer.shape.as_slice() else {
        return Err(mismatch("not a [B, S, H, D] buffer"));
    };
    let element = buffer.dtype.size_bytes() as u64;
    if element != 2 || (head_dim as u64 * element) % PANEL_BYTES != 0 {
        return Err(mismatch("needs 16-bit elements and rows of whole 128-byte panels"));
    }
    let row_bytes = head_dim as u64 * element;
    Ok(TensorMapGeometry {
        dtype: buffer.dtype,
        dims: [head_dim as u64, heads as u64, seq as u64, batch as u64],
        strides_bytes: [row_bytes, row_bytes * heads as u64, row_bytes * heads as u64 * seq as u64],
        box_dims: [(PANEL_BYTES / element) as u32, 1, box_rows, 1],
    })
}

/// Encodes the descriptor of the tensor at device address `address` (needs the driver).
pub fn encode(geometry: &TensorMapGeometry, address: u64, name: &str) -> Result<[u8; TENSOR_MAP_BYTES], RuntimeError> {
    let data_type = match geometry.dtype {
        TensorDType::Bf16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
        TensorDType::F16 => sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
        TensorDType::F32 => {
            return Err(RuntimeError::Size { message: format!("tensor map of `{name}`: f32 is not mapped") });
        }
    };
    let element_strides = [1u32; 4];
    let mut map = sys::CUtensorMap { opaque: [0; 16] };
    // SAFETY: every pointer is to a live array of the length the rank (4) implies; the driver
    // writes only the descriptor.
    let status = unsafe {
        sys::cuTensorMapEncodeTiled(
            &mut map,
            data_type,
            4,
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
    let mut bytes = [0u8; TENSOR_MAP_BYTES];
    for (chunk, word) in bytes.chunks_exact_mut(8).zip(map.opaque) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    Ok(bytes)
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
    fn geometry_views_bshd_as_d_h_s_b_with_one_panel_per_box_row() {
        let geometry = geometry(&buffer(TensorDType::Bf16, vec![3, 17, 8, 128]), 128).unwrap();
        assert_eq!(geometry.dims, [128, 8, 17, 3]);
        assert_eq!(geometry.strides_bytes, [256, 2048, 17 * 2048]);
        assert_eq!(geometry.box_dims, [64, 1, 128, 1]);
    }

    #[test]
    fn geometry_refuses_what_the_kernel_cannot_read() {
        let error = geometry(&buffer(TensorDType::F32, vec![1, 4, 2, 64]), 64).unwrap_err().to_string();
        assert!(error.contains("tensor map of `q`") && error.contains("16-bit"), "{error}");
        let error = geometry(&buffer(TensorDType::Bf16, vec![1, 4, 2, 48]), 64).unwrap_err().to_string();
        assert!(error.contains("128-byte panels"), "{error}");
        let error = geometry(&buffer(TensorDType::Bf16, vec![4, 2, 64]), 64).unwrap_err().to_string();
        assert!(error.contains("[B, S, H, D]"), "{error}");
    }
}
