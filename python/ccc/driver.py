"""The CUDA driver calls behind every kernel launch, through NVIDIA's cuda-bindings
(`cuda.bindings.driver`, 13.x for the CUDA 13 driver): load a module (PTX or cubin) on a GPU,
resolve a kernel, launch it on a stream, wait for a stream. The loader (ccc.library,
ccc.tensor_map) and the standalone kernel scripts in bench/ launch only through here.

    module = driver.load_module("kernels.ptx", device=0)
    kernel = driver.function(module, "my_kernel", dynamic_shared_bytes=64 * 1024)
    driver.launch(kernel, grid, block, shared, torch.cuda.current_stream().cuda_stream,
                  [driver.u64(x.data_ptr()), driver.u32(n), tensor_map.kernel_argument(t, 64)])

Every call runs in the GPU's primary context, the one torch's runtime uses, so that modules,
streams and device pointers are torch's. Kernel arguments are packed here, with ctypes, into the
`void *kernelParams[]` that cuLaunchKernel reads (`Arguments`). cuda-bindings is imported on the
first driver call, so that importing ccc and reading a manifest need neither it nor a GPU. Every
CUresult other than CUDA_SUCCESS raises KernelFault with the driver's error name and string."""

import ctypes
import importlib
import weakref

from .errors import KernelFault, SizeError
from .manifest import DEFAULT_SHARED_LIMIT_BYTES

TENSOR_MAP_BYTES = 128
TENSOR_MAP_ALIGNMENT = 64  # CUtensorMap's alignment in cuda.h
REQUIREMENT = "cuda-bindings>=13,<14"

_bindings = None  # cuda.bindings.driver, initialised (cuInit) on first use
_contexts = {}  # device ordinal -> its primary context


def bindings():
    """The `cuda.bindings.driver` module, the driver initialised: ImportError (saying what to
    install) without cuda-bindings, KernelFault where it cannot load libcuda."""
    global _bindings
    if _bindings is None:
        try:
            cu = importlib.import_module("cuda.bindings.driver")
        except ImportError as error:
            raise ImportError(f"launching ccc kernels needs NVIDIA's cuda-bindings (CUDA driver API "
                              f"bindings): pip install '{REQUIREMENT}'") from error
        try:
            (result,) = cu.cuInit(0)
        except RuntimeError as error:  # what cuda-bindings raises when it finds no libcuda.so.1
            raise KernelFault(f"the CUDA driver cannot be loaded (is this a machine with an NVIDIA "
                              f"GPU and its driver?): {error}") from error
        check(cu, result, "initialising the CUDA driver (cuInit)")
        _bindings = cu
    return _bindings


def check(cu, result, doing):
    """Raises KernelFault `<doing>: <error name>: <error string>` unless `result` (a CUresult of
    `cu`, the bindings) is CUDA_SUCCESS."""
    if result == cu.CUresult.CUDA_SUCCESS:
        return
    status, name = cu.cuGetErrorName(result)
    if status != cu.CUresult.CUDA_SUCCESS:  # a code this driver does not know
        raise KernelFault(f"{doing}: CUresult {int(result)}")
    _, text = cu.cuGetErrorString(result)
    raise KernelFault(f"{doing}: {name.decode()}: {text.decode()}")


class current:
    """`with current(device) as cu:` makes GPU `device`'s primary context (torch's) current on
    this thread for the block, and the previous one current again after it; `cu` is the bindings.
    A class rather than a generator: it wraps every launch, and costs less."""

    def __init__(self, device):
        self.device = device

    def __enter__(self):
        self.cu = cu = bindings()
        context = _contexts.get(self.device)
        if context is None:
            result, handle = cu.cuDeviceGet(self.device)
            check(cu, result, f"opening GPU {self.device}")
            # Retained for the life of the process, as torch retains it.
            result, context = cu.cuDevicePrimaryCtxRetain(handle)
            check(cu, result, f"retaining GPU {self.device}'s primary context")
            _contexts[self.device] = context
        (result,) = cu.cuCtxPushCurrent(context)
        if result != cu.CUresult.CUDA_SUCCESS:  # formatted only on failure: every launch passes here
            check(cu, result, f"making GPU {self.device}'s primary context current")
        return cu

    def __exit__(self, *exception):
        self.cu.cuCtxPopCurrent()


class Module:
    """A PTX or cubin module loaded on one GPU (`load_module`); unloaded when no longer referenced
    (its Functions reference it)."""

    def __init__(self, handle, device, name):
        self.handle, self.device, self.name = handle, device, name
        # Not at interpreter exit: the driver may be torn down by then, and the process frees all.
        weakref.finalize(self, _unload, handle, device).atexit = False

    def __repr__(self):
        return f"<ccc.driver.Module {self.name} on GPU {self.device}>"


def _unload(handle, device):
    with current(device) as cu:
        cu.cuModuleUnload(handle)


class Function:
    """One kernel of a Module (`function`)."""

    def __init__(self, module, symbol, handle):
        self.module, self.symbol, self.handle = module, symbol, handle

    def __repr__(self):
        return f"<ccc.driver.Function {self.symbol} of {self.module.name}>"


def load_module(source, device):
    """The module in `source` (the path of a PTX or cubin file, or its bytes) loaded on GPU
    `device` (an ordinal)."""
    if isinstance(source, (bytes, bytearray)):
        image, name = bytes(source), "a module image"
    else:
        with open(source, "rb") as file:
            image, name = file.read(), str(source)
    with current(device) as cu:
        # PTX must end in a NUL; a cubin's length comes from its ELF header, which ignores it.
        result, handle = cu.cuModuleLoadData(image + b"\0")
        check(cu, result, f"loading {name} on GPU {device}")
    return Module(handle, device, name)


def function(module, symbol, dynamic_shared_bytes):
    """Kernel `symbol` of `module`, allowed `dynamic_shared_bytes` of dynamic shared memory."""
    with current(module.device) as cu:
        result, handle = cu.cuModuleGetFunction(module.handle, symbol.encode())
        check(cu, result, f"resolving kernel `{symbol}` in {module.name}")
        if dynamic_shared_bytes > DEFAULT_SHARED_LIMIT_BYTES:
            # Above 48 KB a kernel must opt in before launch.
            (result,) = cu.cuFuncSetAttribute(
                handle, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                dynamic_shared_bytes)
            check(cu, result, f"allowing kernel `{symbol}` {dynamic_shared_bytes} bytes of dynamic shared "
                              "memory")
    return Function(module, symbol, handle)


def u64(value):
    """A u64 kernel argument (a device pointer)."""
    return _integer(ctypes.c_uint64, 64, value)


def u32(value):
    """A u32 kernel argument (a size)."""
    return _integer(ctypes.c_uint32, 32, value)


def _integer(ctype, bits, value):
    # ctypes would wrap an out-of-range value silently.
    if not 0 <= value < 1 << bits:
        raise SizeError(f"kernel argument {value} does not fit a u{bits}")
    return ctype(int(value))


class TensorMap:
    """A by-value 128-byte CUtensorMap kernel argument (a `.param .align 64 .b8 [128]`
    parameter): the descriptor's bytes at a 64-byte-aligned address of a buffer it owns (ctypes
    before Python 3.13 cannot align a structure to 64)."""

    def __init__(self, descriptor):
        if len(descriptor) != TENSOR_MAP_BYTES:
            raise ValueError(f"a tensor map descriptor has {TENSOR_MAP_BYTES} bytes, got {len(descriptor)}")
        self._buffer = ctypes.create_string_buffer(TENSOR_MAP_BYTES + TENSOR_MAP_ALIGNMENT - 1)
        start = ctypes.addressof(self._buffer)
        self.address = start + -start % TENSOR_MAP_ALIGNMENT
        ctypes.memmove(self.address, bytes(descriptor), TENSOR_MAP_BYTES)


class Arguments:
    """The `void *kernelParams[]` of a launch: one pointer per kernel parameter, in order, to that
    argument's bytes (a `u64`, a `u32` or a `TensorMap`), which cuLaunchKernel copies into the
    parameter, its size taken from the kernel's image. Holds the arguments, so everything the
    array points to lives as long as it does."""

    def __init__(self, values):
        self.values = tuple(values)
        self.array = (ctypes.c_void_p * len(self.values))(*(_address(v) for v in self.values))

    @property
    def pointer(self):
        """The array's address (the `void **`)."""
        return ctypes.addressof(self.array)


def _address(value):
    if isinstance(value, TensorMap):
        return value.address
    if isinstance(value, (ctypes.c_uint64, ctypes.c_uint32)):
        return ctypes.addressof(value)
    raise TypeError(f"a kernel argument is a u64, u32 or TensorMap, got {type(value).__name__}")


def launch(function, grid, block, shared, stream, args):
    """Launches `function` on `grid` x `block` (up to 3 dimensions each) with `shared` bytes of
    dynamic shared memory on `stream` (a CUstream handle, e.g. torch's `cuda_stream`), with `args`
    (an Arguments, or what one takes). Asynchronous: a fault shows at a later synchronisation."""
    if not isinstance(args, Arguments):
        args = Arguments(args)
    dims = tuple(grid) + (1,) * (3 - len(grid)) + tuple(block) + (1,) * (3 - len(block))
    with current(function.module.device) as cu:
        # kernelParams as the int address of our own array, which cuda-bindings passes through as
        # the `void **`: its (values, types) form packs scalars into 8-byte slots of its own and
        # takes a struct only as a ctypes.Structure, which cannot be 64-byte aligned before
        # Python 3.13; our array keeps the argument ABI explicit and tested.
        (result,) = cu.cuLaunchKernel(function.handle, *dims, shared, stream, args.pointer, 0)
    if result != cu.CUresult.CUDA_SUCCESS:  # formatted only on failure
        check(cu, result, f"launching kernel `{function.symbol}` (grid {grid}, block {block})")


def synchronize(stream, device, doing):
    """Waits for `stream` on GPU `device`; KernelFault `<doing>: <error>` where a kernel on it
    faulted."""
    with current(device) as cu:
        (result,) = cu.cuStreamSynchronize(stream)
        check(cu, result, doing)


__all__ = ["Arguments", "Function", "Module", "TensorMap", "bindings", "check", "current", "function", "launch",
           "load_module", "synchronize", "u32", "u64"]
