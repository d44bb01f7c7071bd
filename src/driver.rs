//! The compile driver: one resolved spec through every stage, in order. Each stage's text is what
//! `ccc compile --emit STAGE` prints; `compile_library` runs them all and returns the files of a
//! kernel library (PTX + manifest).

use crate::ir::graph;
use crate::ir::kernel::{self, Access, ElemType, KernelFn, KernelParam};
use crate::ir::passes::{PipelineOptions, run_pipeline};
use crate::ir::plan::{self, KernelPlan};
use crate::manifest::{
    BufferManifest, BufferRole, EntryPointManifest, KernelManifest, KernelParamManifest, Manifest,
    PtxasStats, TensorDType, WeightManifest,
};
use crate::spec::{AttentionSpec, EntryPoint};
use std::fmt;

/// A stage failed for a spec the checker accepted (e.g. a shape the kernels cannot tile yet).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileError {
    pub layer: String,
    pub stage: &'static str,
    pub message: String,
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot compile `{}` ({}): {}", self.layer, self.stage, self.message)
    }
}

impl std::error::Error for CompileError {}

fn error(spec: &AttentionSpec, stage: &'static str, message: impl fmt::Display) -> CompileError {
    CompileError { layer: spec.name.clone(), stage, message: message.to_string() }
}

/// The entry points the compiler can lower today. `emit = [backward]` or `[decode]` is accepted
/// by the language but reported here until those kernels exist.
fn lowered_entry_points(spec: &AttentionSpec) -> Result<Vec<EntryPoint>, CompileError> {
    for entry in &spec.entry_points {
        if *entry != EntryPoint::Forward {
            return Err(error(
                spec,
                "plan",
                format!("the {} entry point is not implemented yet (only forward)", entry.name()),
            ));
        }
    }
    Ok(spec.entry_points.clone())
}

/// Graph IR text of every entry point: as built, or after each pass with `print_after_all`.
pub fn graph_text(spec: &AttentionSpec, print_after_all: bool) -> Result<String, CompileError> {
    let mut out = String::new();
    for entry in lowered_entry_points(spec)? {
        let built = graph::build(spec, entry).map_err(|e| error(spec, "graph", e))?;
        if !print_after_all {
            out += &built.to_string();
            continue;
        }
        out += &format!("// ----- {} before any pass\n{built}", entry.name());
        let options = PipelineOptions { print_after_all: true, ..PipelineOptions::default() };
        let run = run_pipeline(built, &options).map_err(|e| error(spec, "passes", e))?;
        for (pass, text) in &run.after_each {
            out += &format!("// ----- {} after {pass}\n{text}", entry.name());
        }
    }
    Ok(out)
}

/// The kernel plan of every entry point.
pub fn plans(spec: &AttentionSpec) -> Result<Vec<KernelPlan>, CompileError> {
    lowered_entry_points(spec)?
        .into_iter()
        .map(|entry| plan::plan_for(spec, entry).map_err(|e| error(spec, "plan", e)))
        .collect()
}

/// The kernel IR of every planned kernel, in launch order.
pub fn kernels(spec: &AttentionSpec) -> Result<Vec<KernelFn>, CompileError> {
    let mut out = Vec::new();
    for plan in plans(spec)? {
        for planned in &plan.kernels {
            let which = planned.forward_kernel();
            let built = kernel::build_forward(spec, which, &planned.schedule)
                .map_err(|e| error(spec, "kernel", e))?;
            out.push(built);
        }
    }
    Ok(out)
}

/// How one kernel is launched, as the lowering decided it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LaunchInfo {
    pub threads: u32,
    pub dynamic_shared_bytes: u32,
}

/// The manifest's description of one entry point: its kernels in launch order (parameters in ABI
/// order, grids as size expressions) and every buffer they touch, with its role.
pub fn entry_point_manifest(
    spec: &AttentionSpec,
    entry: EntryPoint,
    kernels: &[KernelFn],
    launches: &[LaunchInfo],
    ptxas: &[Option<PtxasStats>],
) -> Result<EntryPointManifest, CompileError> {
    let weight_names: Vec<String> = spec.params().into_iter().map(|p| p.name).collect();
    let mut buffers: Vec<BufferManifest> =
        Manifest::weights_for(spec).iter().map(WeightManifest::as_buffer).collect();
    let mut kernel_manifests = Vec::new();
    for (index, kernel) in kernels.iter().enumerate() {
        let mut params = Vec::new();
        for param in &kernel.params {
            match param {
                KernelParam::Size(var) => params.push(KernelParamManifest::Size { var: *var }),
                KernelParam::Tensor { name, elem, shape, access } => {
                    params.push(KernelParamManifest::Buffer { name: name.clone() });
                    if weight_names.contains(name) || buffers.iter().any(|b| &b.name == name) {
                        continue;
                    }
                    let (role, layout) = match (name.as_str(), access) {
                        ("x", _) => (BufferRole::Input, "BSE"),
                        ("out", _) => (BufferRole::Output, "BSE"),
                        ("lse", _) => (BufferRole::Scratch, "BHS"),
                        (_, Access::Write) => (BufferRole::Intermediate, "BSHD"),
                        (_, Access::Read) => {
                            return Err(error(
                                spec,
                                "manifest",
                                format!("kernel {} reads `{name}`, which nothing writes", kernel.name),
                            ));
                        }
                    };
                    let dtype = match elem {
                        ElemType::F32 => TensorDType::F32,
                        ElemType::Bf16 => TensorDType::Bf16,
                        ElemType::F16 => TensorDType::F16,
                    };
                    buffers.push(BufferManifest {
                        name: name.clone(),
                        role,
                        dtype,
                        shape: shape.clone(),
                        layout: layout.to_string(),
                    });
                }
            }
        }
        let launch = launches.get(index).ok_or_else(|| {
            error(spec, "manifest", format!("no launch information for {}", kernel.name))
        })?;
        kernel_manifests.push(KernelManifest {
            symbol: kernel.name.clone(),
            params,
            grid: kernel.grid.clone(),
            block: [launch.threads, 1, 1],
            dynamic_shared_bytes: launch.dynamic_shared_bytes,
            ptxas: ptxas.get(index).copied().flatten(),
        });
    }
    Ok(EntryPointManifest { entry, kernels: kernel_manifests, buffers })
}
