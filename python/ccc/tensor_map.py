"""TMA descriptors for the manifest's `tensor_map` kernel parameters, as the Rust runtime encodes
them (runtime/src/tensor_map.rs): a dense tensor of a 16-bit dtype ([B, S, H, D], [B, S, C] or a
row-major weight [R, C]) seen with its dimensions innermost first, boxes of one 128-byte panel of
the innermost dimension x `box_rows` along the row dimension (S, or R of a weight) x 1 along any
other, 128-byte swizzle, 256-byte L2 promotion, zeros outside the tensor. Encoded by the CUDA
driver (`cuTensorMapEncodeTiled`, through cuda-bindings) and handed to the kernel by value: its 128
bytes fill a `.param .align 64 .b8 [128]` kernel parameter (a `__grid_constant__` map), so nothing
is copied to device memory."""

import ctypes
import functools

from . import driver

PANEL_BYTES = 128
STRIDE_ALIGNMENT = 16  # TMA's rule for the byte strides of the outer dimensions


def geometry(dtype, shape, box_rows):
    """(dims, byte strides of all but the innermost, box), innermost first, of the map of a
    [B, S, H, D], [B, S, C] or [R, C] tensor of `dtype` ("bf16" or "f16"); ValueError for what
    the kernels cannot read."""
    if not 2 <= len(shape) <= 4 or dtype not in ("bf16", "f16"):
        raise ValueError(f"a tensor map needs a bf16 or f16 [B, S, H, D], [B, S, C] or [R, C] tensor, "
                         f"got {dtype} {list(shape)}")
    dims = tuple(reversed(shape))
    if dims[0] == 0 or dims[0] * 2 % STRIDE_ALIGNMENT:
        raise ValueError(f"a tensor map needs rows of whole {STRIDE_ALIGNMENT}-byte chunks, got "
                         f"{list(shape)}")
    strides = []
    stride = 2
    for dim in dims[:-1]:
        stride *= dim
        strides.append(stride)
    row_dimension = 1 if len(dims) == 2 else len(dims) - 2  # S, or R of a weight
    box = tuple(PANEL_BYTES // 2 if i == 0 else box_rows if i == row_dimension else 1
                for i in range(len(dims)))
    return dims, tuple(strides), box


# A descriptor depends on nothing but these arguments, so a call on the same buffers (weights, and
# the intermediates torch's allocator hands out again) reuses the host bytes instead of encoding
# them again.
@functools.lru_cache(maxsize=1024)
def encode(address, dtype, shape, box_rows):
    """The 128-byte descriptor of the tensor at device address `address`, as bytes."""
    dims, strides, box = geometry(dtype, shape, box_rows)
    cu = driver.bindings()
    data_type = {"bf16": cu.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
                 "f16": cu.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16}[dtype]
    result, descriptor = cu.cuTensorMapEncodeTiled(
        data_type, len(dims), address, [cu.cuuint64_t(d) for d in dims], [cu.cuuint64_t(s) for s in strides],
        [cu.cuuint32_t(b) for b in box], [cu.cuuint32_t(1)] * len(dims),
        cu.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE, cu.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
        cu.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
        # NONE: elements outside the tensor read as zeros.
        cu.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE)
    driver.check(cu, result, f"encoding the tensor map of a {dtype} {list(shape)} tensor at {address:#x} "
                             f"(boxes of {box_rows} rows)")
    return ctypes.string_at(descriptor.getPtr(), driver.TENSOR_MAP_BYTES)


def kernel_argument(tensor, box_rows):
    """The descriptor of torch tensor `tensor` (see `geometry`, contiguous) as a by-value kernel
    argument (a driver.TensorMap)."""
    import torch

    dtype = {torch.bfloat16: "bf16", torch.float16: "f16"}.get(tensor.dtype, str(tensor.dtype))
    if not tensor.is_contiguous():
        raise ValueError("a tensor map needs a contiguous tensor")
    # In the tensor's GPU's context, as every driver call here (the encoder may check for one).
    with driver.current(tensor.device.index):
        return driver.TensorMap(encode(tensor.data_ptr(), dtype, tuple(tensor.shape), box_rows))
