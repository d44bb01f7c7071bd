"""ccc.driver and ccc.tensor_map without a GPU: the bytes a launch hands cuLaunchKernel (u64
pointers, u32 sizes and 128-byte tensor-map descriptors, each at the address its kernelParams
entry names, the descriptors 64-byte aligned), the driver calls and their order, the errors when
cuda-bindings or libcuda is missing or a driver call fails, and that importing ccc and reading a
manifest load neither. The driver is a stand-in that follows cuda-bindings' conventions (every
call returns (CUresult, outputs...)); stdlib only."""

import ctypes
import enum
import gc
import os
import subprocess
import sys
import tempfile
import types
import unittest
from unittest import mock

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.join(HERE, "..", "..", "python")
sys.path.insert(0, PACKAGE)

from ccc import driver, tensor_map  # noqa: E402
from ccc.errors import KernelFault, SizeError  # noqa: E402

LIBRARY = os.path.join(HERE, "fixtures", "fixture")


class CUresult(enum.IntEnum):
    CUDA_SUCCESS = 0
    CUDA_ERROR_INVALID_VALUE = 1
    CUDA_ERROR_NO_DEVICE = 100
    CUDA_ERROR_INVALID_PTX = 218
    CUDA_ERROR_NOT_FOUND = 500
    CUDA_ERROR_ILLEGAL_ADDRESS = 700


ERROR_STRINGS = {
    CUresult.CUDA_ERROR_NO_DEVICE: "no CUDA-capable device is detected",
    CUresult.CUDA_ERROR_INVALID_PTX: "a PTX JIT compilation failed",
    CUresult.CUDA_ERROR_NOT_FOUND: "named symbol not found",
    CUresult.CUDA_ERROR_ILLEGAL_ADDRESS: "an illegal memory access was encountered",
}


class Unsigned:
    """cuuint64_t / cuuint32_t: a boxed integer."""

    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return type(other) is type(self) and other.value == self.value

    def __repr__(self):
        return f"{type(self).__name__}({self.value})"


class FakeDriver(types.SimpleNamespace):
    """The part of `cuda.bindings.driver` that ccc uses. Records every call in `calls`; `fail`
    maps a function name to the CUresult it returns instead of CUDA_SUCCESS."""

    CUresult = CUresult
    CUfunction_attribute = types.SimpleNamespace(CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES=8)
    CUtensorMapDataType = enum.IntEnum("CUtensorMapDataType", {"CU_TENSOR_MAP_DATA_TYPE_FLOAT16": 6,
                                                                "CU_TENSOR_MAP_DATA_TYPE_BFLOAT16": 9})
    CUtensorMapInterleave = enum.IntEnum("CUtensorMapInterleave", {"CU_TENSOR_MAP_INTERLEAVE_NONE": 0})
    CUtensorMapSwizzle = enum.IntEnum("CUtensorMapSwizzle", {"CU_TENSOR_MAP_SWIZZLE_128B": 3})
    CUtensorMapL2promotion = enum.IntEnum("CUtensorMapL2promotion", {"CU_TENSOR_MAP_L2_PROMOTION_L2_256B": 3})
    CUtensorMapFloatOOBfill = enum.IntEnum("CUtensorMapFloatOOBfill", {"CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE": 0})
    cuuint64_t = type("cuuint64_t", (Unsigned,), {})
    cuuint32_t = type("cuuint32_t", (Unsigned,), {})

    def __init__(self):
        super().__init__(calls=[], fail={}, launched_bytes=None)

    def _call(self, name, *args, outputs=()):
        self.calls.append((name, args))
        result = self.fail.get(name, CUresult.CUDA_SUCCESS)
        return (result, *outputs)

    def names(self):
        return [name for name, _ in self.calls]

    def cuInit(self, flags):
        return self._call("cuInit", flags)

    def cuGetErrorName(self, error):
        if error not in ERROR_STRINGS:
            return CUresult.CUDA_ERROR_INVALID_VALUE, None
        return CUresult.CUDA_SUCCESS, CUresult(error).name.encode()

    def cuGetErrorString(self, error):
        return CUresult.CUDA_SUCCESS, ERROR_STRINGS[error].encode()

    def cuDeviceGet(self, ordinal):
        return self._call("cuDeviceGet", ordinal, outputs=(f"device{ordinal}",))

    def cuDevicePrimaryCtxRetain(self, device):
        return self._call("cuDevicePrimaryCtxRetain", device, outputs=(f"context of {device}",))

    def cuCtxPushCurrent(self, context):
        return self._call("cuCtxPushCurrent", context)

    def cuCtxPopCurrent(self):
        return self._call("cuCtxPopCurrent", outputs=("popped",))

    def cuModuleLoadData(self, image):
        return self._call("cuModuleLoadData", image, outputs=("module",))

    def cuModuleUnload(self, module):
        return self._call("cuModuleUnload", module)

    def cuModuleGetFunction(self, module, name):
        return self._call("cuModuleGetFunction", module, name, outputs=(f"function {name.decode()}",))

    def cuFuncSetAttribute(self, function, attribute, value):
        return self._call("cuFuncSetAttribute", function, attribute, value)

    def cuLaunchKernel(self, *args):
        # What the driver would copy: each parameter's bytes, read through the void ** now.
        params = ctypes.cast(args[9], ctypes.POINTER(ctypes.c_void_p))
        self.launched_bytes = [ctypes.string_at(params[i], size) for i, size in enumerate((8, 4, 128))]
        return self._call("cuLaunchKernel", *args)

    def cuStreamSynchronize(self, stream):
        return self._call("cuStreamSynchronize", stream)

    def cuTensorMapEncodeTiled(self, *args):
        self.encoded = (ctypes.c_ubyte * 128)(*range(1, 129))
        return self._call("cuTensorMapEncodeTiled", *args,
                          outputs=(types.SimpleNamespace(getPtr=lambda: ctypes.addressof(self.encoded)),))


def read_pointers(args):
    array = ctypes.cast(args.pointer, ctypes.POINTER(ctypes.c_void_p))
    return [array[i] for i in range(len(args.values))]


class WithFakeDriver(unittest.TestCase):
    def setUp(self):
        self.cu = FakeDriver()
        for patch in (mock.patch.object(driver, "_bindings", self.cu), mock.patch.dict(driver._contexts, clear=True)):
            patch.start()
            self.addCleanup(patch.stop)
        # The stand-in's descriptors are cached by address: none may outlive the test.
        tensor_map.encode.cache_clear()
        self.addCleanup(tensor_map.encode.cache_clear)
        # Unload what a test loaded while the stand-in is still in place.
        self.addCleanup(gc.collect)


class Arguments(unittest.TestCase):
    def test_each_argument_has_its_bytes_at_the_address_its_entry_names(self):
        descriptor = bytes(range(7, 7 + 128))
        args = driver.Arguments([driver.u64(0x7F00_1234_5678_9A00), driver.u32(4097), driver.TensorMap(descriptor),
                                 driver.u32(0)])
        self.assertEqual(len(args.array), 4)
        self.assertEqual(args.pointer, ctypes.addressof(args.array))
        pointer, size, tensor_map_at, zero = read_pointers(args)
        self.assertEqual(ctypes.string_at(pointer, 8), (0x7F00_1234_5678_9A00).to_bytes(8, "little"))
        self.assertEqual(ctypes.string_at(size, 4), (4097).to_bytes(4, "little"))
        self.assertEqual(ctypes.string_at(tensor_map_at, 128), descriptor)
        self.assertEqual(ctypes.string_at(zero, 4), bytes(4))

    def test_descriptors_are_64_byte_aligned(self):
        maps = [driver.TensorMap(bytes([i]) * 128) for i in range(32)]
        args = driver.Arguments(maps)
        for i, address in enumerate(read_pointers(args)):
            self.assertEqual(address % 64, 0)
            self.assertEqual(ctypes.string_at(address, 128), bytes([i]) * 128)

    def test_the_arguments_live_as_long_as_the_array(self):
        args = driver.Arguments([driver.u64(1 << 40), driver.TensorMap(b"\xab" * 128)])
        gc.collect()
        pointer, descriptor = read_pointers(args)
        self.assertEqual(ctypes.string_at(pointer, 8), (1 << 40).to_bytes(8, "little"))
        self.assertEqual(ctypes.string_at(descriptor, 128), b"\xab" * 128)

    def test_values_that_do_not_fit_are_refused(self):
        self.assertRaisesRegex(SizeError, "4294967296 does not fit a u32", driver.u32, 1 << 32)
        self.assertRaisesRegex(SizeError, "-1 does not fit a u64", driver.u64, -1)
        self.assertRaisesRegex(ValueError, "has 128 bytes, got 64", driver.TensorMap, bytes(64))
        # A bare int says nothing of its width.
        self.assertRaisesRegex(TypeError, "u64, u32 or TensorMap, got int", driver.Arguments, [5])


class Launch(WithFakeDriver):
    def loaded(self, shared=0):
        with tempfile.NamedTemporaryFile("wb", suffix=".ptx", delete=False) as file:
            file.write(b".version 8.0\n.target sm_90a\n")
        self.addCleanup(os.unlink, file.name)
        module = driver.load_module(file.name, 1)
        return file.name, driver.function(module, "fixture_attention", shared)

    def test_load_resolve_and_launch_in_the_primary_context(self):
        path, function = self.loaded()
        args = driver.Arguments([driver.u64(0xDEAD_BEE0), driver.u32(17), driver.TensorMap(bytes(range(128)))])
        driver.launch(function, (5, 6), (128,), 1024, 0x5_0000, args)
        self.assertEqual(self.cu.names(), [
            "cuDeviceGet", "cuDevicePrimaryCtxRetain", "cuCtxPushCurrent", "cuModuleLoadData",
            "cuCtxPopCurrent", "cuCtxPushCurrent", "cuModuleGetFunction", "cuCtxPopCurrent",
            "cuCtxPushCurrent", "cuLaunchKernel", "cuCtxPopCurrent"])
        calls = dict(self.cu.calls)
        self.assertEqual(calls["cuDeviceGet"], (1,))
        self.assertEqual(calls["cuCtxPushCurrent"], ("context of device1",))
        # PTX is NUL-terminated for the driver.
        self.assertEqual(calls["cuModuleLoadData"], (b".version 8.0\n.target sm_90a\n\0",))
        self.assertEqual(calls["cuModuleGetFunction"], ("module", b"fixture_attention"))
        self.assertEqual(calls["cuLaunchKernel"],
                         ("function fixture_attention", 5, 6, 1, 128, 1, 1, 1024, 0x5_0000, args.pointer, 0))
        self.assertEqual(self.cu.launched_bytes, [(0xDEAD_BEE0).to_bytes(8, "little"), (17).to_bytes(4, "little"),
                                                  bytes(range(128))])

    def test_a_launch_packs_a_list_of_arguments_itself(self):
        _, function = self.loaded()
        driver.launch(function, (1, 1, 1), (32, 1, 1), 0, 0, [driver.u64(8), driver.u32(9), driver.TensorMap(bytes(128))])
        self.assertEqual(self.cu.launched_bytes, [(8).to_bytes(8, "little"), (9).to_bytes(4, "little"), bytes(128)])

    def test_more_than_48_kb_of_shared_memory_is_opted_into(self):
        self.loaded(shared=48 * 1024)
        self.assertNotIn("cuFuncSetAttribute", self.cu.names())
        self.loaded(shared=200 * 1024)
        self.assertEqual(dict(self.cu.calls)["cuFuncSetAttribute"], ("function fixture_attention", 8, 200 * 1024))

    def test_the_context_is_retained_once_per_gpu(self):
        self.loaded()
        self.loaded()
        self.assertEqual(self.cu.names().count("cuDevicePrimaryCtxRetain"), 1)

    def test_a_module_is_unloaded_when_released(self):
        _, function = self.loaded()
        del function
        gc.collect()
        self.assertEqual(self.cu.names()[-3:], ["cuCtxPushCurrent", "cuModuleUnload", "cuCtxPopCurrent"])
        self.assertEqual(dict(self.cu.calls)["cuModuleUnload"], ("module",))

    def test_driver_errors_name_the_call_the_kernel_and_the_error(self):
        path, function = self.loaded()
        self.cu.fail["cuLaunchKernel"] = CUresult.CUDA_ERROR_ILLEGAL_ADDRESS
        with self.assertRaises(KernelFault) as raised:
            driver.launch(function, (3, 2, 1), (256, 1, 1), 0, 0, [driver.u64(8), driver.u32(9),
                                                                 driver.TensorMap(bytes(128))])
        self.assertEqual(str(raised.exception), "launching kernel `fixture_attention` (grid (3, 2, 1), block "
                         "(256, 1, 1)): CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered")
        self.assertEqual(self.cu.names()[-1], "cuCtxPopCurrent")  # the context is restored on failure

        self.cu.fail["cuStreamSynchronize"] = CUresult.CUDA_ERROR_ILLEGAL_ADDRESS
        with self.assertRaises(KernelFault) as raised:
            driver.synchronize(0x5_0000, 1, "running kernel `fixture_attention` (launch 2 of 2)")
        self.assertEqual(str(raised.exception), "running kernel `fixture_attention` (launch 2 of 2): "
                         "CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered")

        self.cu.fail["cuModuleGetFunction"] = CUresult.CUDA_ERROR_NOT_FOUND
        with self.assertRaises(KernelFault) as raised:
            driver.function(function.module, "fixture_missing", 0)
        self.assertEqual(str(raised.exception), f"resolving kernel `fixture_missing` in {path}: "
                         "CUDA_ERROR_NOT_FOUND: named symbol not found")

        self.cu.fail["cuModuleLoadData"] = CUresult.CUDA_ERROR_INVALID_PTX
        with self.assertRaises(KernelFault) as raised:
            driver.load_module(b"not ptx", 0)
        self.assertEqual(str(raised.exception), "loading a module image on GPU 0: CUDA_ERROR_INVALID_PTX: "
                         "a PTX JIT compilation failed")

    def test_a_code_the_driver_cannot_name_is_given_as_a_number(self):
        self.assertRaisesRegex(KernelFault, r"^launching: CUresult 999$", driver.check, self.cu, 999, "launching")


class TensorMaps(WithFakeDriver):
    def test_encoded_as_the_rust_runtime_encodes(self):
        descriptor = tensor_map.encode(0x7000_0000, "bf16", (3, 17, 8, 128), 64)
        self.assertEqual(descriptor, bytes(range(1, 129)))
        cu = self.cu
        [(name, args)] = [call for call in cu.calls if call[0] == "cuTensorMapEncodeTiled"]
        # runtime/src/tensor_map.rs: innermost first, 128-byte panels, no interleave, 128-byte
        # swizzle, 256-byte L2 promotion, zeros outside.
        self.assertEqual(args, (
            cu.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 4, 0x7000_0000,
            [cu.cuuint64_t(d) for d in (128, 8, 17, 3)], [cu.cuuint64_t(s) for s in (256, 2048, 17 * 2048)],
            [cu.cuuint32_t(b) for b in (64, 1, 64, 1)], [cu.cuuint32_t(1)] * 4,
            cu.CUtensorMapInterleave.CU_TENSOR_MAP_INTERLEAVE_NONE, cu.CUtensorMapSwizzle.CU_TENSOR_MAP_SWIZZLE_128B,
            cu.CUtensorMapL2promotion.CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
            cu.CUtensorMapFloatOOBfill.CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE))
        self.assertEqual(tensor_map.encode(0x7000_0000, "f16", (1280, 576), 128), bytes(range(1, 129)))
        self.assertEqual(cu.calls[-1][1][0], cu.CUtensorMapDataType.CU_TENSOR_MAP_DATA_TYPE_FLOAT16)

    def test_the_same_tensor_is_encoded_once(self):
        for _ in range(3):
            tensor_map.encode(0x7000_0000, "bf16", (2, 1000, 2048), 128)
        self.assertEqual(self.cu.names().count("cuTensorMapEncodeTiled"), 1)

    def test_an_encoding_error_names_the_tensor(self):
        self.cu.fail["cuTensorMapEncodeTiled"] = CUresult.CUDA_ERROR_NOT_FOUND
        with self.assertRaises(KernelFault) as raised:
            tensor_map.encode(0x7000_0010, "bf16", (2, 1000, 2048), 128)
        self.assertEqual(str(raised.exception), "encoding the tensor map of a bf16 [2, 1000, 2048] tensor at "
                         "0x70000010 (boxes of 128 rows): CUDA_ERROR_NOT_FOUND: named symbol not found")


class MissingDriver(unittest.TestCase):
    def setUp(self):
        patch = mock.patch.object(driver, "_bindings", None)
        patch.start()
        self.addCleanup(patch.stop)

    def test_without_cuda_bindings_the_error_says_what_to_install(self):
        with mock.patch.dict(sys.modules, {"cuda.bindings.driver": None}):
            with self.assertRaisesRegex(ImportError, r"needs NVIDIA's cuda-bindings .*pip install "
                                        r"'cuda-bindings>=13,<14'"):
                driver.load_module(b"", 0)

    def test_without_libcuda_the_error_says_so(self):
        cu = FakeDriver()
        cu.cuInit = mock.Mock(side_effect=RuntimeError('"cuda" is an NVIDIA driver library and can only be '
                                                       "found via system search"))
        with mock.patch.dict(sys.modules, {"cuda.bindings.driver": cu}):
            with self.assertRaisesRegex(KernelFault, "the CUDA driver cannot be loaded .*NVIDIA driver library"):
                driver.bindings()
            self.assertIsNone(driver._bindings)

    def test_without_a_gpu_cuinit_s_error_is_reported(self):
        cu = FakeDriver()
        cu.fail["cuInit"] = CUresult.CUDA_ERROR_NO_DEVICE
        with mock.patch.dict(sys.modules, {"cuda.bindings.driver": cu}):
            with self.assertRaises(KernelFault) as raised:
                driver.bindings()
        self.assertEqual(str(raised.exception), "initialising the CUDA driver (cuInit): CUDA_ERROR_NO_DEVICE: "
                         "no CUDA-capable device is detected")


class NoGpuNeeded(unittest.TestCase):
    def test_importing_ccc_and_reading_a_library_load_no_driver(self):
        probe = ("import sys, ccc, ccc.driver, ccc.tensor_map; ccc.read_library(sys.argv[1]); "
                 "print(sorted(m for m in sys.modules if m.split('.')[0] in ('cuda', 'torch')))")
        run = subprocess.run([sys.executable, "-c", probe, LIBRARY], capture_output=True, text=True,
                             env={**os.environ, "PYTHONPATH": PACKAGE})
        self.assertEqual(run.returncode, 0, run.stderr)
        self.assertEqual(run.stdout.strip(), "[]")


if __name__ == "__main__":
    unittest.main()
