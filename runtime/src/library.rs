//! A loaded kernel library on one GPU: the manifest, the PTX module and its resolved kernels.

use crate::error::{RuntimeError, runs_target};
use crate::plan::{CallPlan, PlannedArg, PlannedBuffer, check_decode_indices};
use crate::tensor::{HostData, HostTensor, nan_bytes};
use crate::tensor_map::{self, EncodedTensorMap};
use crate::weights::{WeightSet, check_tensor};
use ccc::manifest::{BufferRole, DEFAULT_SHARED_LIMIT_BYTES, Manifest, TensorDType};
use ccc::ir::size::SizeEnv;
use ccc::spec::EntryPoint;
use cudarc::driver::sys::{CUdevice_attribute, CUevent_flags, CUfunction_attribute};
use cudarc::driver::{
    CudaContext, CudaEvent, CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The manifest file every library directory holds.
pub const MANIFEST_FILE: &str = "manifest.json";

/// A tensor in GPU memory: raw bytes with their dtype and shape (dense, row-major).
pub struct DeviceTensor {
    pub dtype: TensorDType,
    pub shape: Vec<usize>,
    pub buffer: CudaSlice<u8>,
}

impl DeviceTensor {
    /// Copies back to the host (waits for the stream).
    pub fn to_host(&self) -> Result<HostTensor, RuntimeError> {
        let bytes = self
            .buffer
            .stream()
            .clone_dtoh(&self.buffer)
            .map_err(|e| RuntimeError::driver("copying a tensor to the host", e))?;
        HostTensor::from_le_bytes(self.dtype, self.shape.clone(), &bytes)
    }
}

/// The library's weights, uploaded once and reused by every call.
pub struct DeviceWeights {
    tensors: BTreeMap<String, DeviceTensor>,
}

/// One call's arguments ([`Library::bind`]).
struct BoundCall<'a> {
    /// Every buffer of the plan, in plan order.
    tensors: Vec<&'a DeviceTensor>,
    /// The encoded TMA descriptors of the plan's tensor-map arguments, in launch and argument
    /// order; each launch copies its own into the kernel's parameters.
    tensor_maps: Vec<EncodedTensorMap>,
}

/// A decode step's state on the GPU, kept by the caller from step to step and updated in place:
/// the KV pages (`k_cache`, `v_cache` [pages, page_size, Hk, d]) and, where the layer has them,
/// the convolution state (`conv_state` [B, P, T]) and shift state (`shift_state` [B, s·d]).
pub struct DecodeCache {
    pub tensors: BTreeMap<String, DeviceTensor>,
}

/// What one call produced: every buffer the runtime allocated (outputs, intermediates and
/// scratch), by manifest name, with its role.
pub struct Outputs {
    pub tensors: BTreeMap<String, (BufferRole, DeviceTensor)>,
}

impl Outputs {
    pub fn get(&self, name: &str) -> Option<&DeviceTensor> {
        self.tensors.get(name).map(|(_, tensor)| tensor)
    }

    pub fn to_host(&self) -> Result<BTreeMap<String, (BufferRole, HostTensor)>, RuntimeError> {
        self.tensors
            .iter()
            .map(|(name, (role, tensor))| Ok((name.clone(), (*role, tensor.to_host()?))))
            .collect()
    }
}

/// A library's kernels as the driver loads them: the PTX, and the cubin assembled from it when
/// the library carries one (`ccc compile --cubin`), which is loaded instead so that the driver
/// compiles nothing.
#[derive(Debug)]
pub struct KernelCode {
    pub ptx: String,
    pub cubin: Option<Vec<u8>>,
}

/// Reads and validates `DIR/manifest.json` and the PTX (and cubin) it names. No GPU needed.
pub fn read_library(dir: &Path) -> Result<(Manifest, KernelCode), RuntimeError> {
    let manifest_path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| RuntimeError::Io {
        path: manifest_path.clone(),
        message: e.to_string(),
    })?;
    let manifest = Manifest::from_json(&text).map_err(|message| RuntimeError::Manifest {
        path: manifest_path.clone(),
        message,
    })?;
    let ptx_path = dir.join(&manifest.ptx_file);
    let ptx = std::fs::read_to_string(&ptx_path).map_err(|e| RuntimeError::Io {
        path: ptx_path.clone(),
        message: e.to_string(),
    })?;
    if ptx.contains('\0') {
        // The driver takes the PTX as a C string.
        return Err(RuntimeError::Io {
            path: ptx_path,
            message: "PTX text contains a NUL byte".into(),
        });
    }
    let cubin = match &manifest.cubin_file {
        Some(file) => {
            let path = dir.join(file);
            Some(std::fs::read(&path).map_err(|e| RuntimeError::Io { path, message: e.to_string() })?)
        }
        None => None,
    };
    Ok((manifest, KernelCode { ptx, cubin }))
}

/// Opens GPU `ordinal`, reporting a missing driver or GPU as such instead of panicking.
pub fn open_device(ordinal: usize) -> Result<Arc<CudaContext>, RuntimeError> {
    // SAFETY: only tries to dlopen libcuda under its usual names.
    if !unsafe { cudarc::driver::sys::is_culib_present() } {
        return Err(RuntimeError::NoDriver);
    }
    CudaContext::new(ordinal).map_err(|e| RuntimeError::NoGpu {
        detail: e.to_string(),
    })
}

/// The SM count of the context's GPU (`CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT`).
fn device_sms(context: &CudaContext) -> Result<u64, RuntimeError> {
    let during = "reading the GPU's SM count";
    let count = context
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
        .map_err(|e| RuntimeError::driver(during, e))?;
    u64::try_from(count).map_err(|_| RuntimeError::Driver {
        during: during.to_string(),
        message: format!("the driver reported {count} SMs"),
    })
}

pub struct Library {
    dir: PathBuf,
    manifest: Manifest,
    context: Arc<CudaContext>,
    /// SMs of the GPU: persistent grids launch one CTA on each.
    sms: u64,
    stream: Arc<CudaStream>,
    functions: BTreeMap<String, CudaFunction>,
}

impl Library {
    /// Reads the library in `dir`, loads its PTX on GPU 0 and resolves every kernel.
    pub fn load(dir: impl AsRef<Path>) -> Result<Library, RuntimeError> {
        let dir = dir.as_ref().to_path_buf();
        let (manifest, code) = read_library(&dir)?;
        let context = open_device(0)?;
        let capability = context
            .compute_capability()
            .map_err(|e| RuntimeError::driver("reading the GPU's compute capability", e))?;
        if !runs_target(&manifest.target, capability) {
            let device = context.name().unwrap_or_else(|_| "unnamed".to_string());
            return Err(RuntimeError::WrongGpu { target: manifest.target.clone(), device, capability });
        }
        let sms = device_sms(&context)?;
        let stream = context.default_stream();
        let (image, file) = match code.cubin {
            Some(cubin) => (Ptx::from_binary(cubin), manifest.cubin_file.as_deref().unwrap_or_default()),
            None => (Ptx::from_src(code.ptx), manifest.ptx_file.as_str()),
        };
        let module = context
            .load_module(image)
            .map_err(|e| RuntimeError::driver(format!("loading {}", dir.join(file).display()), e))?;
        let mut functions = BTreeMap::new();
        for kernel in manifest.entry_points.iter().flat_map(|e| &e.kernels) {
            let function = module.load_function(&kernel.symbol).map_err(|e| {
                RuntimeError::driver(format!("resolving kernel `{}`", kernel.symbol), e)
            })?;
            if kernel.dynamic_shared_bytes > DEFAULT_SHARED_LIMIT_BYTES {
                // Above 48 KB a kernel must opt in before launch.
                function
                    .set_attribute(
                        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                        kernel.dynamic_shared_bytes as i32,
                    )
                    .map_err(|e| {
                        RuntimeError::driver(
                            format!(
                                "allowing {} bytes of shared memory for `{}`",
                                kernel.dynamic_shared_bytes, kernel.symbol
                            ),
                            e,
                        )
                    })?;
            }
            functions.insert(kernel.symbol.clone(), function);
        }
        Ok(Library {
            dir,
            manifest,
            context,
            sms,
            stream,
            functions,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn device_name(&self) -> Result<String, RuntimeError> {
        self.context
            .name()
            .map_err(|e| RuntimeError::driver("reading the device name", e))
    }

    /// SMs of the GPU the library is loaded on (the size `SMs` of its calls).
    pub fn sms(&self) -> u64 {
        self.sms
    }

    pub fn upload(&self, tensor: &HostTensor) -> Result<DeviceTensor, RuntimeError> {
        let buffer = self
            .stream
            .clone_htod(&tensor.to_le_bytes())
            .map_err(|e| RuntimeError::driver("copying a tensor to the GPU", e))?;
        Ok(DeviceTensor {
            dtype: tensor.dtype(),
            shape: tensor.shape.clone(),
            buffer,
        })
    }

    pub fn upload_weights(&self, weights: &WeightSet) -> Result<DeviceWeights, RuntimeError> {
        let tensors = weights
            .iter()
            .map(|(name, tensor)| Ok((name.to_string(), self.upload(tensor)?)))
            .collect::<Result<_, RuntimeError>>()?;
        Ok(DeviceWeights { tensors })
    }

    /// Runs the forward pass on `x` [B, S, E]: checks x and the weights against the manifest,
    /// allocates every other buffer filled with NaN, launches the kernels in order and checks
    /// each one for errors before the next.
    pub fn forward(
        &self,
        x: &DeviceTensor,
        weights: &DeviceWeights,
    ) -> Result<Outputs, RuntimeError> {
        let (plan, supplied) = self.forward_call(x, weights)?;
        let owned = self.allocate(&plan)?;
        {
            let call = self.bind(&plan, &supplied, &owned)?;
            self.launch_all(&plan, &call, true, None)?;
        }
        Ok(Outputs { tensors: owned })
    }

    /// The forward pass's plan for `x`, and the tensors the caller supplies to it by name:
    /// `x` and every weight.
    fn forward_call<'a>(
        &self,
        x: &'a DeviceTensor,
        weights: &'a DeviceWeights,
    ) -> Result<(CallPlan, BTreeMap<&'a str, &'a DeviceTensor>), RuntimeError> {
        let plan = CallPlan::for_input(&self.manifest, EntryPoint::Forward, "x", x.dtype, &x.shape, Some(self.sms))?;
        let mut supplied = BTreeMap::from([("x", x)]);
        supplied.extend(
            weights
                .tensors
                .iter()
                .map(|(name, tensor)| (name.as_str(), tensor)),
        );
        Ok((plan, supplied))
    }

    /// Runs the backward pass of a library compiled with `emit = [forward, backward]`: from
    /// `dout` [B, S, E] and what the forward call on `x` saved (the outputs of role `saved` in
    /// `forward`, i.e. [`Library::forward`]'s result), returns `dx` and every weight's gradient
    /// `grad.<name>` (f32) among the buffers it allocated. Checks every tensor against the
    /// manifest, allocates the rest filled with NaN and launches the kernels in order, each
    /// checked before the next.
    pub fn backward(
        &self,
        x: &DeviceTensor,
        weights: &DeviceWeights,
        forward: &Outputs,
        dout: &DeviceTensor,
    ) -> Result<Outputs, RuntimeError> {
        let plan = CallPlan::for_input(&self.manifest, EntryPoint::Backward, "dout", dout.dtype, &dout.shape, Some(self.sms))?;
        let mut supplied = BTreeMap::from([("x", x), ("dout", dout)]);
        supplied.extend(weights.tensors.iter().map(|(name, tensor)| (name.as_str(), tensor)));
        let mut missing = Vec::new();
        for buffer in plan.buffers.iter().filter(|b| b.role == BufferRole::Input) {
            if supplied.contains_key(buffer.name.as_str()) {
                continue;
            }
            match forward.tensors.get(&buffer.name) {
                Some((BufferRole::Saved, tensor)) => {
                    supplied.insert(buffer.name.as_str(), tensor);
                }
                _ => missing.push(format!("`{}` (saved by the forward call)", buffer.name)),
            }
        }
        if !missing.is_empty() {
            return Err(RuntimeError::Size {
                message: format!("the backward call lacks {}: pass the outputs of this library's forward", missing.join(", ")),
            });
        }
        let owned = self.allocate(&plan)?;
        {
            let call = self.bind(&plan, &supplied, &owned)?;
            self.launch_all(&plan, &call, true, None)?;
        }
        Ok(Outputs { tensors: owned })
    }

    /// A decode step's state for `sequences` sequence slots and a pool of `pages` KV pages, all
    /// zero (every slot a sequence with no tokens yet): each buffer of role `state` of the
    /// library's decode entry point, by name.
    pub fn decode_cache(&self, sequences: usize, pages: usize) -> Result<DecodeCache, RuntimeError> {
        let entry = self
            .manifest
            .entry_point(EntryPoint::Decode)
            .ok_or(RuntimeError::EntryPointMissing { entry: EntryPoint::Decode.name() })?;
        let env = SizeEnv { batch: sequences as u64, seq_len: 1, sms: Some(self.sms), pages: Some(pages as u64), blocks: None };
        let mut tensors = BTreeMap::new();
        for buffer in entry.buffers.iter().filter(|b| b.role == BufferRole::State) {
            let shape = buffer
                .shape
                .iter()
                .map(|dim| dim.eval(&env).map(|v| v as usize))
                .collect::<Result<Vec<usize>, _>>()
                .map_err(|e| RuntimeError::Size { message: format!("the shape of `{}` {e}", buffer.name) })?;
            let bytes = shape.iter().product::<usize>() * buffer.dtype.size_bytes();
            let zeros = self
                .stream
                .alloc_zeros::<u8>(bytes)
                .map_err(|e| RuntimeError::driver(format!("allocating `{}` ({bytes} bytes)", buffer.name), e))?;
            tensors.insert(buffer.name.clone(), DeviceTensor { dtype: buffer.dtype, shape, buffer: zeros });
        }
        Ok(DecodeCache { tensors })
    }

    /// A prefill of a library compiled with `decode` in its emit list, over a packed batch as
    /// FlashAttention's varlen functions take one: `x` [S, E] holds the new tokens of B sequences,
    /// sequence b's rows cu_seqlens[b] .. cu_seqlens[b + 1] (`cu_seqlens` [B + 1], i32), each
    /// continuing the tokens `cache` holds for it (a chunked prefill; a new sequence holds none);
    /// `seq_lens` [B] (i32) is each length with the new tokens, `block_table` [B, blocks] (i32)
    /// its pages. Writes the new tokens' k and v into the pages, moves the convolution and shift
    /// state on, and returns `out` [S, E] among the buffers it allocated. Every tensor is checked
    /// against the manifest, and the indices (`check_decode_indices`, which copies them to the
    /// host), before anything runs.
    pub fn prefill(
        &self,
        x: &DeviceTensor,
        weights: &DeviceWeights,
        cache: &mut DecodeCache,
        cu_seqlens: &DeviceTensor,
        block_table: &DeviceTensor,
        seq_lens: &DeviceTensor,
    ) -> Result<Outputs, RuntimeError> {
        let mut supplied: BTreeMap<&str, &DeviceTensor> =
            BTreeMap::from([("x", x), ("cu_seqlens", cu_seqlens), ("block_table", block_table), ("seq_lens", seq_lens)]);
        supplied.extend(cache.tensors.iter().map(|(name, tensor)| (name.as_str(), tensor)));
        self.run_over_pages(EntryPoint::Prefill, supplied, weights, (block_table, seq_lens), Some(cu_seqlens))
    }

    /// One decode step of a library compiled with `decode` in its emit list: `x` [B, 1, E] holds
    /// the new token of each of B sequences, `block_table` [B, blocks] (i32) the pages of each in
    /// `cache`'s pool, `seq_lens` [B] (i32) its length with the new token (0: an empty slot).
    /// Appends each token's k and v to its page, moves the convolution and shift state on, and
    /// returns `out` [B, 1, E] among the buffers it allocated. Sizes are read off the tensors
    /// and every one is checked against the manifest, and the indices against the pool
    /// (`check_decode_indices`, which copies them to the host), before anything runs.
    pub fn decode(
        &self,
        x: &DeviceTensor,
        weights: &DeviceWeights,
        cache: &mut DecodeCache,
        block_table: &DeviceTensor,
        seq_lens: &DeviceTensor,
    ) -> Result<Outputs, RuntimeError> {
        let mut supplied: BTreeMap<&str, &DeviceTensor> = BTreeMap::from([("x", x), ("block_table", block_table), ("seq_lens", seq_lens)]);
        supplied.extend(cache.tensors.iter().map(|(name, tensor)| (name.as_str(), tensor)));
        self.run_over_pages(EntryPoint::Decode, supplied, weights, (block_table, seq_lens), None)
    }

    /// A call of the decode or prefill entry point on `supplied` (every caller tensor but the
    /// weights): planned from their shapes, the block table and lengths (and a prefill's
    /// `cu_seqlens`) checked against the pool and the tokens, then launched, each kernel checked.
    fn run_over_pages<'a>(
        &self,
        entry: EntryPoint,
        mut supplied: BTreeMap<&'a str, &'a DeviceTensor>,
        weights: &'a DeviceWeights,
        (block_table, seq_lens): (&DeviceTensor, &DeviceTensor),
        cu_seqlens: Option<&DeviceTensor>,
    ) -> Result<Outputs, RuntimeError> {
        let shapes: Vec<(&str, TensorDType, &[usize])> = supplied.iter().map(|(name, t)| (*name, t.dtype, t.shape.as_slice())).collect();
        let plan = CallPlan::for_supplied(&self.manifest, entry, &shapes, Some(self.sms))?;
        let indices = |tensor: &DeviceTensor| match tensor.to_host()?.data {
            HostData::I32(values) => Ok(values),
            _ => Err(RuntimeError::Size { message: "an index tensor that is not i32".into() }),
        };
        let pages = plan.env.pages.unwrap_or(0) as usize;
        let cu_seqlens = cu_seqlens.map(indices).transpose()?;
        let packed = cu_seqlens.as_deref().map(|cu| (cu, plan.env.seq_len as usize));
        check_decode_indices(&self.manifest, &indices(block_table)?, &indices(seq_lens)?, pages, packed)?;
        supplied.extend(weights.tensors.iter().map(|(name, tensor)| (name.as_str(), tensor)));
        let owned = self.allocate(&plan)?;
        {
            let call = self.bind(&plan, &supplied, &owned)?;
            self.launch_all(&plan, &call, true, None)?;
        }
        Ok(Outputs { tensors: owned })
    }

    /// The forward and then the backward call from and to host memory: every buffer the
    /// backward allocated (`dx` and `grad.<name>` among them), for a library compiled with
    /// `emit = [forward, backward]`.
    pub fn backward_host(
        &self,
        x: &HostTensor,
        weights: &WeightSet,
        dout: &HostTensor,
    ) -> Result<BTreeMap<String, (BufferRole, HostTensor)>, RuntimeError> {
        // Checked before uploading so that a wrong dout or a forward-only library costs no GPU work.
        CallPlan::for_input(&self.manifest, EntryPoint::Backward, "dout", dout.dtype(), &dout.shape, Some(self.sms))?;
        let (x, dout) = (self.upload(x)?, self.upload(dout)?);
        let weights = self.upload_weights(weights)?;
        let forward = self.forward(&x, &weights)?;
        self.backward(&x, &weights, &forward, &dout)?.to_host()
    }

    /// [`Library::forward`] from and to host memory.
    pub fn forward_host(
        &self,
        x: &HostTensor,
        weights: &WeightSet,
    ) -> Result<BTreeMap<String, (BufferRole, HostTensor)>, RuntimeError> {
        // Checked before uploading so that a wrong x costs no GPU work.
        CallPlan::for_input(
            &self.manifest,
            EntryPoint::Forward,
            "x",
            x.dtype(),
            &x.shape,
            Some(self.sms),
        )?;
        let x = self.upload(x)?;
        let weights = self.upload_weights(weights)?;
        self.forward(&x, &weights)?.to_host()
    }

    /// Times the forward pass with CUDA events: `warmup` untimed calls, then `iterations` timed
    /// ones, each a full launch sequence on buffers allocated once. Milliseconds per call.
    pub fn time_forward(
        &self,
        x: &DeviceTensor,
        weights: &DeviceWeights,
        warmup: usize,
        iterations: usize,
    ) -> Result<Vec<f32>, RuntimeError> {
        self.timed_calls(x, weights, warmup, |plan, call| {
            let event = || {
                self.stream
                    .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(|e| RuntimeError::driver("recording a timing event", e))
            };
            let mut times = Vec::with_capacity(iterations);
            for _ in 0..iterations {
                let start = event()?;
                self.launch_all(plan, call, false, None)?;
                let end = event()?;
                times.push(
                    start
                        .elapsed_ms(&end)
                        .map_err(|e| RuntimeError::driver("reading a timing event", e))?,
                );
            }
            Ok(times)
        })
    }

    /// Times each kernel of the forward pass with CUDA events recorded between consecutive
    /// launches: `warmup` untimed calls, then `iterations` timed ones on buffers allocated once.
    /// Per kernel in launch order: its symbol and milliseconds per call.
    pub fn time_kernels(
        &self,
        x: &DeviceTensor,
        weights: &DeviceWeights,
        warmup: usize,
        iterations: usize,
    ) -> Result<Vec<(String, Vec<f32>)>, RuntimeError> {
        self.timed_calls(x, weights, warmup, |plan, call| {
            let mut times: Vec<(String, Vec<f32>)> = plan
                .launches
                .iter()
                .map(|launch| (launch.symbol.clone(), Vec::with_capacity(iterations)))
                .collect();
            for _ in 0..iterations {
                let mut events = Vec::with_capacity(plan.launches.len() + 1);
                self.launch_all(plan, call, false, Some(&mut events))?;
                for (kernel, pair) in times.iter_mut().zip(events.windows(2)) {
                    let elapsed = pair[0]
                        .elapsed_ms(&pair[1])
                        .map_err(|e| RuntimeError::driver("reading a timing event", e))?;
                    kernel.1.push(elapsed);
                }
            }
            Ok(times)
        })
    }

    /// Runs `timed` on the forward pass's buffers, allocated and bound once, after one call
    /// checked kernel by kernel (so that a faulty library fails clearly) and `warmup` untimed
    /// ones; waits for the stream before returning what `timed` measured.
    fn timed_calls<T>(
        &self,
        x: &DeviceTensor,
        weights: &DeviceWeights,
        warmup: usize,
        timed: impl FnOnce(&CallPlan, &BoundCall<'_>) -> Result<T, RuntimeError>,
    ) -> Result<T, RuntimeError> {
        let (plan, supplied) = self.forward_call(x, weights)?;
        let owned = self.allocate(&plan)?;
        let call = self.bind(&plan, &supplied, &owned)?;
        self.launch_all(&plan, &call, true, None)?;
        for _ in 0..warmup {
            self.launch_all(&plan, &call, false, None)?;
        }
        let measured = timed(&plan, &call)?;
        self.synchronize("finishing the timed calls")?;
        Ok(measured)
    }

    /// Allocates every buffer the runtime owns for this call, filled with NaN.
    fn allocate(
        &self,
        plan: &CallPlan,
    ) -> Result<BTreeMap<String, (BufferRole, DeviceTensor)>, RuntimeError> {
        let mut owned = BTreeMap::new();
        for buffer in plan.buffers.iter().filter(|b| !b.role.is_caller_supplied()) {
            let elements = buffer.bytes / buffer.dtype.size_bytes();
            let bytes = self
                .stream
                .clone_htod(&nan_bytes(buffer.dtype, elements))
                .map_err(|e| {
                    RuntimeError::driver(
                        format!("allocating `{}` ({} bytes)", buffer.name, buffer.bytes),
                        e,
                    )
                })?;
            let tensor = DeviceTensor {
                dtype: buffer.dtype,
                shape: buffer.shape.clone(),
                buffer: bytes,
            };
            owned.insert(buffer.name.clone(), (buffer.role, tensor));
        }
        Ok(owned)
    }

    /// The arguments of one call: the plan's buffers, caller-supplied ones checked against the
    /// plan, and the TMA descriptors of its tensor-map arguments, encoded once for every launch
    /// sequence on these buffers.
    fn bind<'a>(
        &self,
        plan: &CallPlan,
        supplied: &BTreeMap<&str, &'a DeviceTensor>,
        owned: &'a BTreeMap<String, (BufferRole, DeviceTensor)>,
    ) -> Result<BoundCall<'a>, RuntimeError> {
        let mut tensors = Vec::with_capacity(plan.buffers.len());
        for buffer in &plan.buffers {
            let tensor = if buffer.role.is_caller_supplied() {
                let tensor =
                    supplied
                        .get(buffer.name.as_str())
                        .ok_or_else(|| RuntimeError::Weights {
                            problems: vec![format!("missing {} `{}`", buffer.role.name(), buffer.name)],
                        })?;
                check_tensor(
                    &buffer.name,
                    buffer.dtype,
                    &buffer.shape,
                    tensor.dtype,
                    &tensor.shape,
                )?;
                *tensor
            } else {
                &owned[&buffer.name].1
            };
            tensors.push(tensor);
        }
        let tensor_maps = self.encode_tensor_maps(plan, &tensors)?;
        Ok(BoundCall { tensors, tensor_maps })
    }

    /// Launches the plan's kernels in order on the buffers of `call`. With `check_each`, waits
    /// after every launch so that a fault names its kernel. With `events`, records one before
    /// each launch and one after the last.
    fn launch_all(
        &self,
        plan: &CallPlan,
        call: &BoundCall<'_>,
        check_each: bool,
        mut events: Option<&mut Vec<CudaEvent>>,
    ) -> Result<(), RuntimeError> {
        let record = |events: &mut Vec<CudaEvent>| -> Result<(), RuntimeError> {
            let event = self
                .stream
                .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| RuntimeError::driver("recording a timing event", e))?;
            events.push(event);
            Ok(())
        };
        let tensors = &call.tensors;
        let mut descriptors = call.tensor_maps.iter();
        let count = plan.launches.len();
        for (index, launch) in plan.launches.iter().enumerate() {
            if let Some(events) = events.as_deref_mut() {
                record(events)?;
            }
            let function = &self.functions[&launch.symbol];
            let mut args = self.stream.launch_builder(function);
            for arg in &launch.args {
                match arg {
                    PlannedArg::Buffer(buffer) => args.arg(&tensors[*buffer].buffer),
                    PlannedArg::Size(value) => args.arg(value),
                    PlannedArg::TensorMap { .. } => {
                        let descriptor = descriptors.next().ok_or_else(|| RuntimeError::Driver {
                            during: format!("launching kernel `{}`", launch.symbol),
                            message: "a tensor-map argument has no encoded descriptor".into(),
                        })?;
                        args.arg(descriptor)
                    }
                };
            }
            let config = LaunchConfig {
                grid_dim: launch.grid,
                block_dim: launch.block,
                shared_mem_bytes: launch.dynamic_shared_bytes,
            };
            // SAFETY: the arguments follow the manifest's ABI order and every buffer has the
            // size the manifest states for these (B, S); that contract is codegen's.
            unsafe { args.launch(config) }.map_err(|e| {
                RuntimeError::driver(format!("launching kernel `{}`", launch.symbol), e)
            })?;
            if check_each {
                self.synchronize(&format!(
                    "running kernel `{}` (launch {} of {count})",
                    launch.symbol,
                    index + 1
                ))?;
            }
        }
        if let Some(events) = events {
            record(events)?;
        }
        Ok(())
    }

    /// Encodes the TMA descriptor of every tensor-map argument of the plan, in launch and
    /// argument order.
    fn encode_tensor_maps(
        &self,
        plan: &CallPlan,
        tensors: &[&DeviceTensor],
    ) -> Result<Vec<EncodedTensorMap>, RuntimeError> {
        let mut encoded = Vec::new();
        for launch in &plan.launches {
            for arg in &launch.args {
                if let PlannedArg::TensorMap { buffer, box_rows, ref view } = *arg {
                    let planned = &plan.buffers[buffer];
                    let viewed = view.as_ref().map(|shape| PlannedBuffer { shape: shape.clone(), ..planned.clone() });
                    let geometry = tensor_map::geometry(viewed.as_ref().unwrap_or(planned), box_rows)?;
                    let (address, _read) = tensors[buffer].buffer.device_ptr(&self.stream);
                    encoded.push(tensor_map::encode(&geometry, address, &planned.name)?);
                }
            }
        }
        Ok(encoded)
    }

    fn synchronize(&self, during: &str) -> Result<(), RuntimeError> {
        self.stream
            .synchronize()
            .map_err(|e| RuntimeError::driver(during, e))
    }
}
