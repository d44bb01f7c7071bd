use std::fmt;
use std::path::PathBuf;

/// Everything that can go wrong between a library directory and results on the GPU. Each
/// message names the file, tensor or kernel concerned.
#[derive(Debug)]
pub enum RuntimeError {
    /// libcuda could not be loaded: no NVIDIA driver on this machine.
    NoDriver,
    /// The driver loaded but no usable GPU answered.
    NoGpu {
        detail: String,
    },
    Io {
        path: PathBuf,
        message: String,
    },
    Manifest {
        path: PathBuf,
        message: String,
    },
    /// A CUDA driver call failed; `during` says what the runtime was doing.
    Driver {
        during: String,
        message: String,
    },
    /// A tensor's dtype or shape differs from what the manifest expects.
    TensorMismatch {
        tensor: String,
        expected: String,
        got: String,
    },
    /// The weight set does not match the manifest (missing, extra or mis-shaped tensors).
    Weights {
        problems: Vec<String>,
    },
    /// A size or grid that does not fit the kernels' argument types for these (B, S).
    Size {
        message: String,
    },
    EntryPointMissing {
        entry: &'static str,
    },
    /// The CPU reference refused the inputs.
    Reference {
        message: String,
    },
}

impl RuntimeError {
    /// Whether the error means "no GPU here" rather than a fault of the library or the inputs.
    pub fn is_no_gpu(&self) -> bool {
        matches!(self, RuntimeError::NoDriver | RuntimeError::NoGpu { .. })
    }

    pub(crate) fn driver(during: impl Into<String>, error: cudarc::driver::DriverError) -> Self {
        RuntimeError::Driver {
            during: during.into(),
            message: error.to_string(),
        }
    }
}

impl fmt::Display for RuntimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuntimeError::NoDriver => f.write_str(
                "no CUDA driver: libcuda could not be loaded on this machine; \
                 run on a machine with an NVIDIA GPU and its driver installed",
            ),
            RuntimeError::NoGpu { detail } => write!(f, "no usable CUDA GPU: {detail}"),
            RuntimeError::Io { path, message } => write!(f, "{}: {message}", path.display()),
            RuntimeError::Manifest { path, message } => write!(f, "{}: {message}", path.display()),
            RuntimeError::Driver { during, message } => {
                write!(f, "CUDA error while {during}: {message}")
            }
            RuntimeError::TensorMismatch {
                tensor,
                expected,
                got,
            } => {
                write!(f, "tensor `{tensor}`: expected {expected}, got {got}")
            }
            RuntimeError::Weights { problems } => {
                write!(
                    f,
                    "weights do not match the library: {}",
                    problems.join("; ")
                )
            }
            RuntimeError::Size { message } => f.write_str(message),
            RuntimeError::EntryPointMissing { entry } => {
                write!(f, "the library has no `{entry}` entry point")
            }
            RuntimeError::Reference { message } => write!(f, "CPU reference: {message}"),
        }
    }
}

impl std::error::Error for RuntimeError {}
