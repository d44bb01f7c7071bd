"""The loader's exceptions. Every message names the file, kernel, buffer or tensor at fault."""


class CccError(Exception):
    """Base class of every error the loader raises."""


class ManifestError(CccError, ValueError):
    """A manifest that is not valid JSON, has the wrong schema version or breaks a rule of
    docs/manifest.md."""


class SizeError(CccError, ValueError):
    """A call whose sizes do not fit: a shape, byte count, grid or kernel argument overflows, or B or
    S is not positive."""


class TensorMismatch(CccError, ValueError):
    """A caller-supplied tensor (x or a weight) with the wrong dtype, shape, device or layout, or a
    missing or unexpected weight. `problems` lists every one found, not only the first."""

    def __init__(self, problems):
        self.problems = list(problems)
        super().__init__("; ".join(self.problems))


class KernelFault(CccError, RuntimeError):
    """A kernel that failed to launch or faulted while running (checked per kernel in validate
    mode)."""


class UnsupportedDevice(CccError, RuntimeError):
    """A GPU that cannot run the library's PTX target (e.g. sm_90a code on a non-Hopper GPU)."""
