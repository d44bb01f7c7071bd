"""TMA descriptors for the manifest's `tensor_map` kernel parameters, as the Rust runtime encodes
them (runtime/src/tensor_map.rs): a dense [B, S, H, D] tensor of a 16-bit dtype seen as the 4-d
tensor (D, H, S, B), innermost first, boxes of one 128-byte panel of D x 1 head x `box_rows` rows
x 1 batch element, 128-byte swizzle, 256-byte L2 promotion, zeros outside the tensor. Encoded by
the CUDA driver (`cuTensorMapEncodeTiled`, through ctypes) and handed to the kernel as a pointer
to a copy in device memory."""

import ctypes

TENSOR_MAP_BYTES = 128
PANEL_BYTES = 128
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
    """(dims, byte strides of the outer three, box) of the map of a [B, S, H, D] tensor of
    `dtype` ("bf16" or "f16"); ValueError for what the kernels cannot read."""
    if len(shape) != 4 or dtype not in ("bf16", "f16"):
        raise ValueError(f"a tensor map needs a bf16 or f16 [B, S, H, D] tensor, got {dtype} {list(shape)}")
    batch, seq, heads, head_dim = shape
    row_bytes = head_dim * 2
    if row_bytes % PANEL_BYTES:
        raise ValueError(f"a tensor map needs rows of whole {PANEL_BYTES}-byte panels, got D = {head_dim}")
    dims = (head_dim, heads, seq, batch)
    strides = (row_bytes, row_bytes * heads, row_bytes * heads * seq)
    box = (PANEL_BYTES // 2, 1, box_rows, 1)
    return dims, strides, box


def encode(address, dtype, shape, box_rows):
    """The 128-byte descriptor of the tensor at device address `address`, as bytes."""
    dims, strides, box = geometry(dtype, shape, box_rows)
    descriptor = (ctypes.c_uint64 * (TENSOR_MAP_BYTES // 8))()
    status = _encoder()(
        ctypes.addressof(descriptor), _DATA_TYPES[dtype], 4, ctypes.c_void_p(address),
        (ctypes.c_uint64 * 4)(*dims), (ctypes.c_uint64 * 3)(*strides), (ctypes.c_uint32 * 4)(*box),
        (ctypes.c_uint32 * 4)(1, 1, 1, 1), _INTERLEAVE_NONE, _SWIZZLE_128B, _L2_PROMOTION_256B,
        _OOB_FILL_ZEROS)
    if status != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled failed with CUresult {status} for a {dtype} "
                           f"{list(shape)} tensor at {address:#x} (boxes of {box_rows} rows)")
    return bytes(descriptor)


def on_device(tensor, box_rows):
    """The descriptor of torch tensor `tensor` ([B, S, H, D], contiguous) in a uint8 tensor on its
    device: keep it alive for as long as kernels may read it."""
    import torch

    dtype = {torch.bfloat16: "bf16", torch.float16: "f16"}.get(tensor.dtype, str(tensor.dtype))
    if not tensor.is_contiguous():
        raise ValueError("a tensor map needs a contiguous tensor")
    descriptor = encode(tensor.data_ptr(), dtype, tuple(tensor.shape), box_rows)
    return torch.frombuffer(bytearray(descriptor), dtype=torch.uint8).to(tensor.device)
