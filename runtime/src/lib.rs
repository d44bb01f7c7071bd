//! `ccc-runtime`: loads a kernel library that `ccc compile` produced (manifest.json + PTX), runs
//! it on an NVIDIA GPU through the CUDA driver API (cudarc, libcuda opened at run time) and checks
//! it against the CPU reference. It never links LLVM, so it travels to GPU machines that have
//! none.
//!
//! Host-side work (reading and validating the manifest, planning buffer sizes and grids for a
//! call, checking tensor shapes and dtypes, loading weights) is separate from the GPU side
//! ([`Library`]), so all of it is tested on machines without a GPU.

pub mod error;
pub mod library;
pub mod plan;
pub mod tensor;
pub mod tensor_map;
pub mod validate;
pub mod weights;

pub use error::RuntimeError;
pub use library::{
    DecodeCache, DeviceTensor, DeviceWeights, KernelCode, Library, MANIFEST_FILE, Outputs, open_device, read_library,
};
pub use plan::CallPlan;
pub use tensor::{HostData, HostTensor};
pub use weights::WeightSet;
