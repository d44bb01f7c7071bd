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
    /// The GPU cannot run the library's PTX target (e.g. sm_90a code on a non-Hopper GPU).
    WrongGpu {
        target: String,
        device: String,
        capability: (i32, i32),
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
        matches!(self, RuntimeError::NoDriver | RuntimeError::NoGpu { .. } | RuntimeError::WrongGpu { .. })
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
            RuntimeError::WrongGpu { target, device, capability: (major, minor) } => write!(
                f,
                "the library was compiled for {target}, which GPU 0 ({device}, compute capability \
                 {major}.{minor}) cannot run; {}",
                match target_capability(target) {
                    Some((major, minor, true)) => format!("it needs compute capability exactly {major}.{minor}"),
                    Some((major, minor, false)) => format!("it needs compute capability {major}.{minor} or later"),
                    None => "it needs a CUDA architecture such as sm_90a as its target".to_string(),
                }
            ),
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
                write!(f, "the library has no `{entry}` entry point: compile its spec with `{entry}` in `emit`")
            }
            RuntimeError::Reference { message } => write!(f, "CPU reference: {message}"),
        }
    }
}

impl std::error::Error for RuntimeError {}

/// The compute capability a PTX target such as `sm_90a` needs: (major, minor, whether exactly:
/// arch-specific targets, with the `a` suffix, use features only that capability has).
pub fn target_capability(target: &str) -> Option<(i32, i32, bool)> {
    let digits = target.strip_prefix("sm_")?;
    let (digits, exact) = match digits.strip_suffix('a') {
        Some(digits) => (digits, true),
        None => (digits, false),
    };
    if digits.len() < 2 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let (major, minor) = digits.split_at(digits.len() - 1);
    Some((major.parse().ok()?, minor.parse().ok()?, exact))
}

/// Whether a GPU of compute capability `capability` runs PTX for `target`: the capability itself
/// for arch-specific targets, it or any later one otherwise (the driver compiles PTX forward).
pub fn runs_target(target: &str, capability: (i32, i32)) -> bool {
    match target_capability(target) {
        Some((major, minor, true)) => capability == (major, minor),
        Some((major, minor, false)) => capability >= (major, minor),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_name_the_capability_they_need() {
        assert_eq!(target_capability("sm_90a"), Some((9, 0, true)));
        assert_eq!(target_capability("sm_80"), Some((8, 0, false)));
        assert_eq!(target_capability("sm_100a"), Some((10, 0, true)));
        for bad in ["sm_", "sm_9", "compute_90", "sm_9x", "sm_90b"] {
            assert_eq!(target_capability(bad), None, "{bad}");
        }
    }

    #[test]
    fn arch_specific_targets_run_only_on_their_capability() {
        assert!(runs_target("sm_90a", (9, 0)));
        assert!(!runs_target("sm_90a", (8, 9)));
        assert!(!runs_target("sm_90a", (10, 0)), "sm_90a features are not in later GPUs");
        assert!(runs_target("sm_80", (9, 0)), "plain PTX runs forward");
        assert!(!runs_target("sm_80", (7, 5)));
        assert!(!runs_target("compute_90", (9, 0)));
    }

    #[test]
    fn the_wrong_gpu_error_says_what_the_library_needs() {
        let error = RuntimeError::WrongGpu {
            target: "sm_90a".to_string(),
            device: "NVIDIA A100-SXM4-80GB".to_string(),
            capability: (8, 0),
        };
        assert_eq!(
            error.to_string(),
            "the library was compiled for sm_90a, which GPU 0 (NVIDIA A100-SXM4-80GB, compute capability 8.0) \
             cannot run; it needs compute capability exactly 9.0"
        );
        assert!(error.is_no_gpu(), "ccc-run reports it like a missing GPU (exit code 3)");
    }
}
