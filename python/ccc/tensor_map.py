"""TMA descriptors for the manifest's `tensor_map` kernel parameters, as the Rust runtime encodes
them (runtime/src/tensor_map.rs): a dense tensor of a 16-bit dtype ([B, S, H, D], [B, S, C] or a
row-major weight [R, C]) seen with its dimensions innermost first, boxes of one 128-byte panel of
the innermost dimension x `box_rows` along the row dimension (S, or R of a weight) x 1 along any
other, 128-byte swizzle, 256-byte L2 promotion, zeros outside the tensor. Encoded by the CUDA
driver (`cuTensorMapEncodeTiled`, through ctypes) and handed to the kernel by value: its 128 bytes
fill a `.param .align 64 .b8 [128]` kernel parameter (a `__grid_constant__` map), so nothing is
copied to device memory."""

import ctypes
import functools

TENSOR_MAP_BYTES = 128
PANEL_BYTES = 128
STRIDE_ALIGNMENT = 16  # TMA's rule for the byte strides of the outer dimensions
# cuTensorMapEncodeTiled's enums (CUDA driver API).
_DATA_TYPES = {"bf16": 9, "f16": 6}
_INTERLEAVE_NONE = 0
_SWIZZLE_128B = 3
_L2_PROMOTION_256B = 3
_OOB_FILL_ZEROS = 0

_encode = None


def _encoder():
    global _encode
    if _encode is None:
        libcuda = ctypes.CDLL("libcuda.so.1")
        encode = libcuda.cuTensorMapEncodeTiled
        u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
        encode.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p,
                           u32p, u32p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
        encode.restype = ctypes.c_int
        _encode = encode
    return _encode


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
    descriptor = (ctypes.c_uint64 * (TENSOR_MAP_BYTES // 8))()
    rank = len(dims)
    status = _encoder()(
        ctypes.addressof(descriptor), _DATA_TYPES[dtype], rank, ctypes.c_void_p(address),
        (ctypes.c_uint64 * rank)(*dims), (ctypes.c_uint64 * (rank - 1))(*strides),
        (ctypes.c_uint32 * rank)(*box), (ctypes.c_uint32 * rank)(*([1] * rank)), _INTERLEAVE_NONE,
        _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_FILL_ZEROS)
    if status != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {status} for a {dtype} "
                           f"{list(shape)} tensor at {address:#x} (boxes of {box_rows} rows)")
    return bytes(descriptor)


def kernel_argument(tensor, box_rows):
    """The descriptor of torch tensor `tensor` (see `geometry`, contiguous) as a by-value cupy
    kernel argument: a numpy array of one 128-byte element, which cupy passes by value."""
    import numpy
    import torch

    dtype = {torch.bfloat16: "bf16", torch.float16: "f16"}.get(tensor.dtype, str(tensor.dtype))
    if not tensor.is_contiguous():
        raise ValueError("a tensor map needs a contiguous tensor")
    descriptor = encode(tensor.data_ptr(), dtype, tuple(tensor.shape), box_rows)
    return numpy.frombuffer(descriptor, dtype=numpy.dtype([("descriptor", numpy.uint8, (TENSOR_MAP_BYTES,))]))
