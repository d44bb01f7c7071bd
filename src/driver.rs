//! The compile driver: one resolved spec through every stage, in order. Each stage's text is what
//! `ccc compile --emit STAGE` prints; `compile_library` runs them all and returns the files of a
//! kernel library (PTX + manifest).

use crate::ir::graph;
use crate::ir::kernel::{Access, KernelFn, KernelParam};
#[cfg(feature = "llvm")]
use crate::ir::kernel::{self, ElemType, ForwardKernel};
use crate::ir::size::SizeExpr;
use crate::ir::passes::{PipelineOptions, run_pipeline};
use crate::ir::plan::{self, KernelBuilder, KernelPlan};
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
    /// The spec item responsible (`head_dim`), where one is: what a located error points at
    /// (else the layer's name).
    pub item: Option<&'static str>,
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cannot compile `{}` ({}): {}", self.layer, self.stage, self.message)
    }
}

impl std::error::Error for CompileError {}

fn error(spec: &AttentionSpec, stage: &'static str, message: impl fmt::Display) -> CompileError {
    CompileError { layer: spec.name.clone(), stage, message: message.to_string(), item: None }
}

/// The entry points of `spec`'s library ([`AttentionSpec::library_entry_points`]).
fn lowered_entry_points(spec: &AttentionSpec) -> Result<Vec<EntryPoint>, CompileError> {
    kernels_exist(spec)?;
    if spec.emits(EntryPoint::Backward) && !spec.emits(EntryPoint::Forward) {
        return Err(error(spec, "plan", "the backward entry point needs the forward's (emit = [forward, backward])"));
    }
    Ok(spec.library_entry_points())
}

/// Graph IR text of every entry point: as built, or after each pass with `print_after_all`.
pub fn graph_text(spec: &AttentionSpec, print_after_all: bool) -> Result<String, CompileError> {
    let mut out = String::new();
    for entry in lowered_entry_points(spec)? {
        if entry != EntryPoint::Forward {
            out += &format!(
                "// {} {}: no graph IR; its kernels are planned from their builders (--emit plan)\n",
                spec.name,
                entry.name()
            );
            continue;
        }
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

/// The compiler's stages, in the order they run. `compile --emit STAGE` prints one,
/// `--print-after-all` every one up to it; `compile` runs them all.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Stage {
    /// The resolved spec, as canonical `.attn` text with every default written out.
    Spec,
    /// Graph IR as built from the spec (with --print-after-all: after every pass).
    Graph,
    /// The kernel plan: kernels in launch order with buffers, schedules and grids.
    Plan,
    /// Kernel IR: one tile-level function per kernel, as the library builds it.
    Kernel,
    /// LLVM IR of the library's module (needs the `llvm` feature).
    Llvm,
    /// The PTX for sm_90a (needs the `llvm` feature).
    Ptx,
}

impl Stage {
    pub const IN_ORDER: [Stage; 6] = [Stage::Spec, Stage::Graph, Stage::Plan, Stage::Kernel, Stage::Llvm, Stage::Ptx];

    pub fn name(self) -> &'static str {
        match self {
            Stage::Spec => "spec",
            Stage::Graph => "graph",
            Stage::Plan => "plan",
            Stage::Kernel => "kernel",
            Stage::Llvm => "llvm",
            Stage::Ptx => "ptx",
        }
    }
}

/// The text of each of `stages` for `spec`, from one run of the compiler: the plan and the kernels
/// are built once, and every stage printed is the one that ships. `Ok(None)` for LLVM IR or PTX in
/// a build without LLVM. With `print_after_all`, the graph after every pass.
pub fn stage_texts(spec: &AttentionSpec, stages: &[Stage], print_after_all: bool) -> Result<Option<Vec<String>>, CompileError> {
    #[cfg(feature = "llvm")]
    let mut compilation: Option<Compilation> = None;
    #[cfg(feature = "llvm")]
    let mut lowered: Option<crate::codegen::lower::LoweredModule> = None;
    let mut texts = Vec::new();
    for &stage in stages {
        texts.push(match stage {
            Stage::Spec => crate::frontend::spec_text(spec),
            Stage::Graph => graph_text(spec, print_after_all)?,
            #[cfg(feature = "llvm")]
            later => {
                if compilation.is_none() {
                    compilation = Some(Compilation::new(spec, &[])?);
                }
                let compilation = compilation.as_ref().expect("built above");
                match later {
                    Stage::Plan => compilation.plan_text()?,
                    Stage::Kernel => compilation.kernel_text(),
                    llvm_or_ptx => {
                        if lowered.is_none() {
                            lowered = Some(compilation.lowered()?);
                        }
                        let module = lowered.as_ref().expect("lowered above");
                        if llvm_or_ptx == Stage::Llvm { module.llvm_ir.clone() } else { module.ptx.clone() }
                    }
                }
            }
            #[cfg(not(feature = "llvm"))]
            Stage::Plan => plans(spec)?.iter().map(|plan| plan.to_string()).collect(),
            #[cfg(not(feature = "llvm"))]
            Stage::Kernel => identified_kernels(spec)?.into_iter().map(|(_, kernel)| kernel.to_string()).collect(),
            #[cfg(not(feature = "llvm"))]
            Stage::Llvm | Stage::Ptx => return Ok(None),
        });
    }
    Ok(Some(texts))
}

/// Plan text of every entry point: with codegen, each kernel's schedule and grid as the library
/// launches it ([`Compilation::launched_plans`]), so that `--emit plan` and the manifest agree.
pub fn plan_text(spec: &AttentionSpec) -> Result<String, CompileError> {
    Ok(stage_texts(spec, &[Stage::Plan], false)?.expect("plans need no LLVM").remove(0))
}

/// The kernel plan of every entry point as the library launches it ([`Compilation::launched_plans`]).
#[cfg(feature = "llvm")]
pub fn launched_plans(spec: &AttentionSpec) -> Result<Vec<KernelPlan>, CompileError> {
    Compilation::new(spec, &[])?.launched_plans()
}

/// The kernel IR of every planned kernel, in launch order.
pub fn kernels(spec: &AttentionSpec) -> Result<Vec<KernelFn>, CompileError> {
    Ok(identified_kernels(spec)?.into_iter().map(|(_, kernel)| kernel).collect())
}

/// [`kernels`] with the identity of each: which builder its plan entry asked for.
fn identified_kernels(spec: &AttentionSpec) -> Result<Vec<(KernelBuilder, KernelFn)>, CompileError> {
    tileable_head_dim(spec)?;
    build_planned(spec, &plans(spec)?)
}

/// What the language describes but no kernel computes yet, located on its item: checked before
/// any rule of the kernels themselves.
fn kernels_exist(spec: &AttentionSpec) -> Result<(), CompileError> {
    if spec.mla.is_some() {
        let message = "MLA layers have no kernels yet: `ccc explain` and the f64 reference (`reference::mla`) \
                       describe them, `compile` does not";
        return Err(CompileError { item: Some("mla"), ..error(spec, "graph", message) });
    }
    if spec.rope.is_some_and(|rope| rope.yarn.is_some()) {
        let message = "YaRN-scaled RoPE is in the f64 reference only: the kernels compute plain RoPE frequencies";
        return Err(CompileError { item: Some("rope"), ..error(spec, "graph", message) });
    }
    Ok(())
}

/// The kernels' first rule, said up front in the user's terms: the planner and the builders would
/// otherwise report it as a schedule that does not fit.
fn tileable_head_dim(spec: &AttentionSpec) -> Result<(), CompileError> {
    kernels_exist(spec)?;
    if !spec.head_dim.is_multiple_of(16) {
        let message = format!(
            "head_dim {} is not supported by the sm_90a kernels yet: it must be a multiple of 16 \
             (the k-step of the tensor-core instructions)",
            spec.head_dim
        );
        return Err(CompileError { item: Some("head_dim"), ..error(spec, "kernel", message) });
    }
    Ok(())
}

/// Every stage that can reject `spec` short of writing files: planning, building and verifying
/// the kernel IR of every entry point, and (with LLVM) lowering it to PTX and writing and
/// validating the manifest. What `ccc check` runs, so that it rejects what a plain `compile`
/// would (not what `--ptxas` or `--tuning` add).
pub fn check_compiles(spec: &AttentionSpec) -> Result<(), CompileError> {
    #[cfg(feature = "llvm")]
    {
        Compilation::new(spec, &[])?.library(&CompileOptions::default()).map(|_| ())
    }
    #[cfg(not(feature = "llvm"))]
    {
        kernels(spec).map(|_| ())
    }
}

/// The kernel IR of every kernel of `plans` with its identity, in launch order.
fn build_planned(spec: &AttentionSpec, plans: &[KernelPlan]) -> Result<Vec<(KernelBuilder, KernelFn)>, CompileError> {
    let mut out = Vec::new();
    for plan in plans {
        for planned in &plan.kernels {
            let which = planned.builder();
            let built = which.build(spec, &planned.schedule).map_err(|e| error(spec, "kernel", e))?;
            out.push((which, built));
        }
    }
    Ok(out)
}

/// How one kernel is launched, as the lowering decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchInfo {
    pub threads: u32,
    pub dynamic_shared_bytes: u32,
    pub grid: [crate::ir::size::SizeExpr; 3],
}

/// Whether the attention kernel of `spec` is the warp-specialized wgmma kernel
/// (`ir::kernel::build_wgmma_attention`) rather than the tiled kernel-IR attention: head_dim 64,
/// 128, 192 or 256 (the widths whose tile candidates the sweep's `hopper` step checks on the GPU),
/// with any mask (no mask, causal, sliding window). Same ABI and grid shape either way.
pub fn uses_wgmma_attention(spec: &AttentionSpec) -> bool {
    matches!(spec.head_dim, 64 | 128 | 192 | 256)
}

/// Whether the projection GEMMs of `spec` (qkv_proj, out_proj) come from the Hopper fast path
/// (the persistent wgmma GEMM of `codegen::hopper`): its 16-byte copies need reduction widths
/// (model_dim and the query width) that are multiples of 8 elements. Same ABI either way.
pub fn uses_wgmma_projection(spec: &AttentionSpec) -> bool {
    spec.model_dim.is_multiple_of(8) && spec.q_width().is_multiple_of(8)
}

/// The kernel IR of every kernel of `spec` in launch order, as the library ships it (attention
/// and the projection GEMMs built for the chosen tiles): what the interpreter runs to check what
/// ships.
#[cfg(feature = "llvm")]
pub fn planned_kernel_ir(spec: &AttentionSpec) -> Result<Vec<KernelFn>, CompileError> {
    Ok(Compilation::new(spec, &[])?.kernels)
}

/// Kernel IR text of the kernels that ship.
pub fn kernel_text(spec: &AttentionSpec) -> Result<String, CompileError> {
    Ok(stage_texts(spec, &[Stage::Kernel], false)?.expect("kernel IR needs no LLVM").remove(0))
}

/// The manifest's description of every entry point of `plans`: each one's kernels (`kernels`,
/// `launches` and `ptxas` hold every entry point's, in plan order) and every buffer they touch,
/// with its role. What the backward reads besides `x` and `dout` is `saved` in the forward
/// (`Manifest::validate` checks that both declare it alike).
pub fn entry_point_manifests(
    spec: &AttentionSpec,
    plans: &[KernelPlan],
    kernels: &[KernelFn],
    launches: &[LaunchInfo],
    ptxas: &[Option<PtxasStats>],
) -> Result<Vec<EntryPointManifest>, CompileError> {
    let saved: Vec<&str> = plans
        .iter()
        .filter(|plan| plan.entry == EntryPoint::Backward)
        .flat_map(|plan| &plan.inputs)
        .map(|buffer| buffer.name.as_str())
        .filter(|name| !matches!(*name, "x" | "dout"))
        .collect();
    let (mut manifests, mut start) = (Vec::new(), 0);
    for plan in plans {
        let end = start + plan.kernels.len();
        if end > kernels.len() || end > launches.len() || end > ptxas.len() {
            return Err(error(spec, "manifest", "fewer kernels built than planned"));
        }
        manifests.push(entry_point_manifest(spec, plan, &saved, &kernels[start..end], &launches[start..end], &ptxas[start..end])?);
        start = end;
    }
    Ok(manifests)
}

/// Layout name of an activation buffer from its name and shape: [B, S, E] tensors, heads split
/// out, channels, per-head rows, or a weight-shaped gradient.
fn buffer_layout(name: &str, shape: &[SizeExpr]) -> Option<&'static str> {
    let constant = |dim: &SizeExpr| matches!(dim, SizeExpr::Const(_));
    // A packed prefill's tokens [S, E] (S counting every sequence's), else [B, S, E].
    if matches!(name, "x" | "out") && shape.len() == 2 {
        return Some("SE");
    }
    if matches!(name, "x" | "out" | "dout" | "dx") {
        return Some("BSE");
    }
    // A decode step's pages [pages, page_size, Hk, d], and its state, indices and partial
    // results, each row-major in the order of its shape.
    if matches!(name, "k_cache" | "v_cache") {
        return Some("paged");
    }
    if matches!(name, crate::ir::kernel::CONV_STATE | crate::ir::kernel::SHIFT_STATE | "block_table" | "seq_lens" | "cu_seqlens" | "o_part" | "lse_part") {
        return Some("row_major");
    }
    if shape.iter().all(constant) {
        return Some("row_major");
    }
    match shape.len() {
        4 => Some("BSHD"),
        3 if constant(&shape[1]) => Some("BHS"),
        3 => Some("BSC"),
        _ => None,
    }
}

/// One entry point's manifest ([`entry_point_manifests`]): roles from its plan (the caller's
/// inputs and outputs, what a later entry point reads as `saved`, kernels' scratch, the rest
/// intermediates).
fn entry_point_manifest(
    spec: &AttentionSpec,
    plan: &KernelPlan,
    saved: &[&str],
    kernels: &[KernelFn],
    launches: &[LaunchInfo],
    ptxas: &[Option<PtxasStats>],
) -> Result<EntryPointManifest, CompileError> {
    let weight_names: Vec<String> = spec.params().into_iter().map(|p| p.name).collect();
    let mut buffers: Vec<BufferManifest> =
        Manifest::weights_for(spec).iter().map(WeightManifest::as_buffer).collect();
    let listed = |list: &[plan::Buffer], name: &str| list.iter().any(|b| b.name == name);
    let scratch = |name: &str| plan.kernels.iter().any(|k| listed(&k.scratch, name));
    let mut kernel_manifests = Vec::new();
    for (index, kernel) in kernels.iter().enumerate() {
        let mut params = Vec::new();
        for param in &kernel.params {
            match param {
                KernelParam::Size(var) => params.push(KernelParamManifest::Size { var: *var }),
                KernelParam::TensorMap { tensor, box_rows, .. } => {
                    // Loaders encode the map from the buffer's shape, or from the kernel's view
                    // where it differs (a rank-3 map read with four coordinates faults on the GPU).
                    let viewed = kernel.params.iter().find_map(|p| match p {
                        KernelParam::Tensor { name, shape, .. } if name == tensor => Some(shape),
                        _ => None,
                    });
                    let buffer = buffers.iter().find(|b| &b.name == tensor).map(|b| &b.shape);
                    let (Some(viewed), Some(buffer)) = (viewed, buffer) else {
                        return Err(error(
                            spec,
                            "manifest",
                            format!(
                                "kernel {} maps `{tensor}`, {}",
                                kernel.name,
                                if viewed.is_none() { "which it has no tensor parameter for" } else { "which is not declared" }
                            ),
                        ));
                    };
                    let view = (viewed != buffer).then(|| viewed.clone());
                    params.push(KernelParamManifest::TensorMap { buffer: tensor.clone(), box_rows: *box_rows, view })
                }
                KernelParam::Tensor { name, elem, shape, access } => {
                    params.push(KernelParamManifest::Buffer { name: name.clone() });
                    if weight_names.contains(name) || buffers.iter().any(|b| &b.name == name) {
                        continue;
                    }
                    let role = if listed(&plan.state, name) {
                        BufferRole::State
                    } else if listed(&plan.inputs, name) {
                        BufferRole::Input
                    } else if listed(&plan.outputs, name) {
                        BufferRole::Output
                    } else if *access == Access::Read {
                        return Err(error(
                            spec,
                            "manifest",
                            format!("kernel {} reads `{name}`, which nothing writes", kernel.name),
                        ));
                    } else if plan.entry == EntryPoint::Forward && saved.contains(&name.as_str()) {
                        BufferRole::Saved
                    } else if scratch(name) {
                        BufferRole::Scratch
                    } else {
                        BufferRole::Intermediate
                    };
                    // An input or output in the plan's shape: a kernel may bind a view of it (a
                    // sum of parts writes a weight's gradient flat; a decode step's projection
                    // sees its [B, 1, E] tokens as [1, B, E] rows).
                    let shape = plan.outputs.iter().chain(&plan.inputs).chain(&plan.state).find(|b| &b.name == name).map_or(shape, |b| &b.ty.shape);
                    let Some(layout) = buffer_layout(name, shape) else {
                        return Err(error(
                            spec,
                            "manifest",
                            format!(
                                "kernel {} binds `{name}` with {} dimensions; activations are [B, S, heads, d], \
                                 [B, S, channels] or [B, heads, S]",
                                kernel.name,
                                shape.len()
                            ),
                        ));
                    };
                    buffers.push(BufferManifest {
                        name: name.clone(),
                        role,
                        dtype: TensorDType::from(*elem),
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
            grid: launch.grid.clone(),
            block: [launch.threads, 1, 1],
            dynamic_shared_bytes: launch.dynamic_shared_bytes,
            ptxas: ptxas.get(index).copied().flatten(),
        });
    }
    Ok(EntryPointManifest { entry: plan.entry, kernels: kernel_manifests, buffers })
}

/// A compiled kernel library: what `ccc compile` writes into DIR/NAME/.
#[cfg(feature = "llvm")]
#[derive(Clone, Debug)]
pub struct Library {
    pub manifest: Manifest,
    pub ptx: String,
    /// The PTX assembled for the target, when asked for (`manifest.cubin_file` names it).
    pub cubin: Option<Vec<u8>>,
}

#[cfg(feature = "llvm")]
#[derive(Clone, Debug, Default)]
pub struct CompileOptions {
    /// Where compiled PTX is cached; `None` compiles every time.
    pub cache: Option<crate::codegen::cache::PtxCache>,
    /// Assemble the PTX with ptxas and record registers, shared memory and spills per kernel in
    /// the manifest; a kernel that spills is an error.
    pub ptxas: bool,
    /// Also keep what ptxas assembled, as the library's cubin, which loaders take instead of
    /// compiling the PTX on the GPU (implies `ptxas`).
    pub cubin: bool,
    /// Tiles per Hopper kernel (by name) instead of the resource model's choice: from a tuning
    /// result (`ccc compile --tuning`) or a candidate of `ccc tune`.
    pub tiles: Vec<(String, crate::tuning::TileChoice)>,
}

/// The wgmma attention kernel's configuration for `spec`, named after the planned kernel.
#[cfg(feature = "llvm")]
fn wgmma_attention(spec: &AttentionSpec, kernel: &KernelFn) -> crate::codegen::hopper::HopperAttentionConfig {
    use crate::codegen::hopper;
    let (causal, window) = kernel::causal_window(spec.mask);
    hopper::HopperAttentionConfig {
        name: kernel.name.clone(),
        elem: ElemType::from(spec.dtype).into(),
        head_dim: spec.head_dim as u32,
        q_heads: spec.query_heads as u32,
        kv_heads: spec.kv_heads as u32,
        causal,
        window,
        // The resource model's start; `PlannedTiles::of` replaces the tile, stages and
        // schedule with its choice (`hopper::tiles`).
        block_m: 128,
        block_n: 128,
        stages: 3,
        schedule: hopper::Schedule::PingPong,
        // A third of the H200's 50 MB L2, so that two groups in flight at a boundary still fit:
        // at 8k it ordered CTAs better than one head at a time, at 16k it cost ZAYA1 9%
        // (BENCHMARKS.md); 8 and 4 MB are among the variants that
        // bench/hopper_attention.py times (tests/codegen_hopper.rs, `bench_configs`).
        l2_group_bytes: 16 << 20,
    }
}

/// The kernel a projection's wgmma GEMM is built from: `kernel` itself, or for a packed
/// prefill's projection (written over [1, S] rows) the forward's over [B, S] under its name,
/// whose GEMM is then seen over the packed rows ([`kernel::TokenRows::sized`]).
#[cfg(feature = "llvm")]
fn gemm_base(spec: &AttentionSpec, which: ForwardKernel, rows: kernel::TokenRows, kernel: &KernelFn) -> Result<KernelFn, CompileError> {
    if rows == kernel::TokenRows::Batch {
        return Ok(kernel.clone());
    }
    let schedule = kernel::default_schedule(spec, which).map_err(|e| error(spec, "kernel", e))?;
    let mut base = kernel::build_forward(spec, which, &schedule).map_err(|e| error(spec, "kernel", e))?;
    base.name = kernel.name.clone();
    Ok(base)
}

/// The tiles of the wgmma projection GEMM for a projection kernel of `spec` (same ABI) as the
/// resource model ranks them, or `None` where the tiled kernel stays (reduction widths that
/// 16-byte rows cannot tile, an `o` whose heads are not whole 64-column TMA boxes).
#[cfg(feature = "llvm")]
fn wgmma_projection(
    spec: &AttentionSpec,
    which: ForwardKernel,
    kernel: &KernelFn,
) -> Option<crate::codegen::hopper::HopperGemmConfig> {
    use crate::codegen::hopper::{self, HopperGemmConfig};
    if !uses_wgmma_projection(spec) {
        return None;
    }
    let out_proj = match which {
        ForwardKernel::QkvProjection => false,
        ForwardKernel::OutputProjection => true,
        ForwardKernel::QkPrologue | ForwardKernel::Attention => return None,
    };
    let (a, k, a_head_dim, segments) = kernel::gemm_operands(spec, out_proj)?;
    let base = HopperGemmConfig {
        name: kernel.name.clone(),
        elem: ElemType::from(spec.dtype).into(),
        params: crate::codegen::lower::param_kinds(kernel),
        a,
        k,
        segments,
        // Tile, stages and schedule: the resource model's choice (`hopper::tiles`).
        block_n: 128,
        stages: 4,
        schedule: hopper::GemmSchedule::PingPong,
        a_head_dim,
        // TMA: one producer thread instead of 128 computing addresses and bounds for 16-byte
        // copies, which the profile showed could not keep the consumers fed (BENCHMARKS.md).
        loads: hopper::TileLoads::Tma,
    };
    base.launch().ok()?;
    Some(hopper::best_gemm(&base, hopper::ProblemShape::of(spec)).unwrap_or(base))
}

/// The kernels of `spec` whose PTX comes from the Hopper fast path, with the configurations the
/// driver chose (in launch order).
#[cfg(feature = "llvm")]
pub fn tile_configs(spec: &AttentionSpec) -> Result<Vec<crate::codegen::hopper::TileConfig>, CompileError> {
    Ok(PlannedTiles::of(spec)?.tiles.into_iter().flatten().collect())
}

/// The tile candidates of every Hopper attention and GEMM kernel of `spec`, ranked by the resource
/// model at `shape` (the spec's tuning shape unless given): what `ccc tune --list` prints.
#[cfg(feature = "llvm")]
pub fn tile_listing(
    spec: &AttentionSpec,
    shape: Option<crate::codegen::hopper::ProblemShape>,
) -> Result<String, CompileError> {
    use crate::codegen::hopper::{self, TileConfig, ProblemShape, tiles};
    let shape = shape.unwrap_or_else(|| ProblemShape::of(spec));
    let mut sections = Vec::new();
    for fast in &tile_configs(spec)? {
        match fast {
            TileConfig::Attention(config) => {
                let candidates = hopper::attention_candidates(config, shape);
                sections.push(tiles::listing(&config.name, "attention", shape, &candidates));
            }
            TileConfig::Gemm(config) => {
                let candidates = hopper::gemm_candidates(config, shape);
                sections.push(tiles::listing(&config.name, "projection GEMM", shape, &candidates));
            }
        }
    }
    if sections.is_empty() {
        sections.push(format!("{}: no kernel comes from the Hopper fast path (nothing to tune)\n", spec.name));
    }
    Ok(sections.join("\n"))
}

/// Compiles the top `top` candidates of every Hopper attention and GEMM kernel of `spec` (ranked
/// at `shape`) into candidate libraries `directory/KERNEL/RANK/`, each the whole layer with only
/// that kernel's tiles changed, and writes their index `directory/tune-index.json`
/// (`crate::tuning`). The outer error is a compile error, the inner one a file that cannot be
/// written.
#[cfg(feature = "llvm")]
pub fn write_tuning_candidates(
    spec: &AttentionSpec,
    shape: crate::codegen::hopper::ProblemShape,
    top: usize,
    options: &CompileOptions,
    directory: &std::path::Path,
) -> Result<std::io::Result<crate::tuning::TuneIndex>, CompileError> {
    use crate::codegen::hopper::{self, TileConfig, tiles};
    use crate::tuning::{INDEX_FILE, INDEX_FORMAT, IndexCandidate, IndexKernel, TuneIndex, spec_fingerprint};
    let mut kernels = Vec::new();
    let mut libraries = Vec::new();
    for kernel in tile_configs(spec)? {
        let ranked: Vec<_> = match &kernel {
            TileConfig::Attention(config) => hopper::attention_candidates(config, shape)
                .into_iter()
                .filter_map(|c| Some((tiles::attention_tiles(&c.config), c.verdict.ok()?.micros)))
                .collect(),
            TileConfig::Gemm(config) => hopper::gemm_candidates(config, shape)
                .into_iter()
                .filter_map(|c| Some((tiles::gemm_tiles(&c.config), c.verdict.ok()?.micros)))
                .collect(),
        };
        let mut candidates = Vec::new();
        for (rank, (choice, estimate_us)) in ranked.into_iter().take(top).enumerate() {
            let library_options = CompileOptions { tiles: vec![(kernel.name().to_string(), choice.clone())], ..options.clone() };
            let library = compile_library(spec, &library_options)?;
            let relative = format!("{}/{}", kernel.name(), rank + 1);
            libraries.push((directory.join(&relative), library));
            // To 0.1 µs: the model is not more precise than that.
            let estimate_us = (estimate_us * 10.0).round() / 10.0;
            candidates.push(IndexCandidate { rank: rank + 1, library: relative, tiles: choice, estimate_us });
        }
        kernels.push(IndexKernel { kernel: kernel.name().to_string(), candidates });
    }
    let index = TuneIndex {
        format: INDEX_FORMAT.to_string(),
        layer: spec.name.clone(),
        spec_fingerprint: spec_fingerprint(spec),
        batch: shape.batch,
        seq_len: shape.seq_len,
        kernels,
    };
    let write = || -> std::io::Result<()> {
        for (library_directory, library) in &libraries {
            write_library(library, library_directory)?;
        }
        let text = serde_json::to_string_pretty(&index).map_err(std::io::Error::other)?;
        std::fs::write(directory.join(INDEX_FILE), text + "\n")
    };
    Ok(write().map(|()| index))
}

/// The tile-choice stage: every planned kernel with its kernel IR at the default schedule and,
/// where a Hopper builder builds it, the tiles chosen for that builder.
#[cfg(feature = "llvm")]
struct PlannedTiles {
    /// The plan of every entry point, which the kernels below were built from.
    plans: Vec<KernelPlan>,
    /// Which builder built each (the plan's identity, in launch order).
    which: Vec<KernelBuilder>,
    kernels: Vec<KernelFn>,
    /// The tiles of each kernel a Hopper builder builds (attention, projections).
    tiles: Vec<Option<crate::codegen::hopper::TileConfig>>,
}

#[cfg(feature = "llvm")]
impl PlannedTiles {
    fn of(spec: &AttentionSpec) -> Result<PlannedTiles, CompileError> {
        use crate::codegen::hopper::TileConfig;
        tileable_head_dim(spec)?;
        let plans = plans(spec)?;
        let (which, kernels): (Vec<KernelBuilder>, Vec<KernelFn>) = build_planned(spec, &plans)?.into_iter().unzip();
        let tiles = which
            .iter()
            .zip(&kernels)
            .map(|(which, k)| match which.hopper_form() {
                // The backward's and serving's kernels (but a prefill's attention over its chunk)
                // are the mma.sync forms of their builders.
                None => None,
                // The tile model's best configuration; without one (a head width none fits), the
                // tiled kernel IR's attention.
                Some((ForwardKernel::Attention, _)) => uses_wgmma_attention(spec)
                    .then(|| {
                        let base = wgmma_attention(spec, k);
                        let shape = crate::codegen::hopper::ProblemShape::of(spec);
                        crate::codegen::hopper::best_attention(&base, shape).map(TileConfig::Attention)
                    })
                    .flatten(),
                Some((ForwardKernel::QkPrologue, _)) => None,
                Some((projection @ (ForwardKernel::QkvProjection | ForwardKernel::OutputProjection), rows)) => {
                    wgmma_projection(spec, projection, &gemm_base(spec, projection, rows, k).ok()?).map(TileConfig::Gemm)
                }
            })
            .collect();
        Ok(PlannedTiles { plans, which, kernels, tiles })
    }

    /// Replaces the tiles of the named kernels; a name that is not a Hopper attention or GEMM
    /// kernel of `spec`, or tiles the resource rules reject, is an error.
    fn with_tiles(
        mut self,
        spec: &AttentionSpec,
        tiles: &[(String, crate::tuning::TileChoice)],
    ) -> Result<PlannedTiles, CompileError> {
        use crate::codegen::hopper::{TileConfig, tiles};
        for (name, choice) in tiles {
            let kernel = self.tiles.iter_mut().flatten().find(|k| k.name() == name);
            let tuned = match kernel {
                Some(TileConfig::Attention(config)) => {
                    tiles::with_attention_tiles(config, choice).map(TileConfig::Attention)
                }
                Some(TileConfig::Gemm(config)) => tiles::with_gemm_tiles(config, choice).map(TileConfig::Gemm),
                _ => {
                    let tunable: Vec<&str> = self
                        .tiles
                        .iter()
                        .flatten()
                        .map(TileConfig::name)
                        .collect();
                    Err(format!(
                        "the tuning names kernel `{name}`, which is not a Hopper attention or GEMM kernel of this \
                         layer (those are: {})",
                        if tunable.is_empty() { "none".to_string() } else { tunable.join(", ") }
                    ))
                }
            }
            .map_err(|message| error(spec, "tuning", message))?;
            if let Some(slot) = self.tiles.iter_mut().flatten().find(|k| k.name() == name) {
                *slot = tuned;
            }
        }
        Ok(self)
    }

    /// The kernel IR of every kernel: the Hopper attention and GEMM configurations built by their
    /// kernel-IR builders for the tiles chosen, the other kernels as planned. The driver only
    /// picks shapes the builders take, so a builder error is a compiler bug, reported as such.
    fn into_kernel_ir(self, spec: &AttentionSpec) -> Result<(Vec<KernelPlan>, Vec<KernelFn>), CompileError> {
        use crate::codegen::hopper::{GemmSchedule, TileConfig};
        let PlannedTiles { plans, which, mut kernels, tiles } = self;
        for ((which, kernel), chosen) in which.iter().zip(kernels.iter_mut()).zip(tiles) {
            let built = match (chosen, which.hopper_form()) {
                (Some(TileConfig::Gemm(config)), Some((which, rows))) => {
                    let schedule = kernel::WgmmaGemmSchedule {
                        block_n: config.block_n,
                        stages: config.stages,
                        ping_pong: config.schedule == GemmSchedule::PingPong,
                    };
                    kernel::build_wgmma_projection(spec, which, &gemm_base(spec, which, rows, kernel)?, &schedule).map(|built| rows.sized(built))
                }
                (Some(TileConfig::Attention(config)), Some((_, rows))) => kernel::build_wgmma_attention(spec, kernel, &config.kernel_schedule(), rows),
                _ => continue,
            };
            *kernel = built.map_err(|e| error(spec, "kernel", e))?;
        }
        Ok((plans, kernels))
    }
}

/// LLVM IR and PTX of every kernel of `spec` (what `--emit llvm` and `--emit ptx` print).
#[cfg(feature = "llvm")]
pub fn lowered(spec: &AttentionSpec) -> Result<crate::codegen::lower::LoweredModule, CompileError> {
    Compilation::new(spec, &[])?.lowered()
}

/// Identifies this build of the compiler in cache keys, so that a rebuilt compiler never reads
/// PTX an older build wrote under the same version number.
#[cfg(feature = "llvm")]
fn build_fingerprint() -> String {
    let executable = std::env::current_exe().and_then(std::fs::metadata);
    match executable {
        Ok(meta) => {
            let modified = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| d.as_nanos());
            format!("{} bytes, modified {modified}", meta.len())
        }
        Err(_) => "unknown build".to_string(),
    }
}

/// Every stage, from the spec to PTX and a validated manifest.
#[cfg(feature = "llvm")]
pub fn compile_library(
    spec: &AttentionSpec,
    options: &CompileOptions,
) -> Result<Library, CompileError> {
    Compilation::new(spec, &options.tiles)?.library(options)
}

/// One spec through the stages after it, run once in order: graph IR and passes → kernel plan →
/// kernel IR (each kernel built for its chosen tiles: the resource model's, or a tuning's) →
/// LLVM IR and PTX on demand. What `compile`, `--emit` and the tests read, so that every stage
/// they print or check is the one that ships.
#[cfg(feature = "llvm")]
pub struct Compilation<'s> {
    spec: &'s AttentionSpec,
    /// The plan of every entry point, which the kernels were built from.
    plans: Vec<KernelPlan>,
    /// The kernel IR of every kernel in launch order: what becomes PTX.
    kernels: Vec<KernelFn>,
}

#[cfg(feature = "llvm")]
impl<'s> Compilation<'s> {
    /// Plans and builds every kernel, with `tiles` in place of the resource model's choice for the
    /// kernels they name.
    pub fn new(spec: &'s AttentionSpec, tiles: &[(String, crate::tuning::TileChoice)]) -> Result<Compilation<'s>, CompileError> {
        let (plans, kernels) = PlannedTiles::of(spec)?.with_tiles(spec, tiles)?.into_kernel_ir(spec)?;
        Ok(Compilation { spec, plans, kernels })
    }

    /// The kernel plan of every entry point with each kernel's schedule and grid replaced by those
    /// of the kernel IR built for it, so that `--emit plan` and the manifest agree.
    pub fn launched_plans(&self) -> Result<Vec<KernelPlan>, CompileError> {
        let mut plans = self.plans.clone();
        let mut shipped = self.kernels.iter();
        for planned_kernel in plans.iter_mut().flat_map(|plan| plan.kernels.iter_mut()) {
            let Some(kernel) = shipped.next() else {
                return Err(error(self.spec, "plan", "fewer kernels built than planned"));
            };
            planned_kernel.schedule = kernel.schedule;
            let [x, y, z] = kernel.grid.clone();
            planned_kernel.grid = plan::Grid { x, y, z };
        }
        Ok(plans)
    }

    pub fn plan_text(&self) -> Result<String, CompileError> {
        Ok(self.launched_plans()?.iter().map(|plan| plan.to_string()).collect())
    }

    /// The kernel IR of every kernel.
    pub fn kernel_text(&self) -> String {
        self.kernels.iter().map(|kernel| kernel.to_string()).collect()
    }

    /// LLVM IR and PTX of every kernel.
    pub fn lowered(&self) -> Result<crate::codegen::lower::LoweredModule, CompileError> {
        crate::codegen::lower::lower_kernels(&self.spec.name, &self.kernels).map_err(|e| error(self.spec, "codegen", e))
    }

    /// The PTX (through the cache when given), ptxas' report when asked for, and the validated
    /// manifest, written from the plan's kernels and launches.
    pub fn library(&self, options: &CompileOptions) -> Result<Library, CompileError> {
        let (spec, kernels) = (self.spec, &self.kernels);
        let emit = || crate::codegen::lower::lower_kernels_to_ptx(&spec.name, kernels).map(|module| module.ptx);
        let ptx = match &options.cache {
            // The kernel IR determines the PTX for a given build of the compiler.
            Some(cache) => {
                let description: String = kernels.iter().map(|kernel| kernel.to_string()).collect::<Vec<_>>().join("\n");
                cache.get_or_emit(&format!("{}\n{description}", build_fingerprint()), emit)
            }
            None => emit(),
        }
        .map_err(|e| error(spec, "codegen", e))?;
        let launches: Vec<LaunchInfo> = kernels
            .iter()
            .map(|kernel| {
                let launch = crate::codegen::lower::launch_of(kernel);
                LaunchInfo {
                    threads: launch.threads,
                    dynamic_shared_bytes: launch.dynamic_shared_bytes,
                    grid: kernel.grid.clone(),
                }
            })
            .collect();
        let (ptxas, cubin) = if options.ptxas || options.cubin {
            let assembled = crate::codegen::ptxas::assemble_cubin(&ptx).map_err(|e| error(spec, "ptxas", e))?;
            (ptxas_stats(spec, &assembled.reports, kernels)?, options.cubin.then_some(assembled.cubin))
        } else {
            (vec![None; kernels.len()], None)
        };
        let ptx_file = format!("{}.ptx", spec.name);
        let entries = entry_point_manifests(spec, &self.plans, kernels, &launches, &ptxas)?;
        let mut manifest = Manifest::new(spec.clone(), ptx_file, entries);
        manifest.cubin_file = cubin.as_ref().map(|_| format!("{}.cubin", spec.name));
        manifest.validate().map_err(|e| error(spec, "manifest", e))?;
        Ok(Library { manifest, ptx, cubin })
    }
}

#[cfg(feature = "llvm")]
fn ptxas_stats(
    spec: &AttentionSpec,
    reports: &[crate::codegen::ptxas::PtxasReport],
    kernels: &[KernelFn],
) -> Result<Vec<Option<PtxasStats>>, CompileError> {
    kernels
        .iter()
        .map(|kernel| {
            let report = reports.iter().find(|r| r.kernel == kernel.name).ok_or_else(|| {
                error(spec, "ptxas", format!("ptxas reported nothing for {}", kernel.name))
            })?;
            if report.spill_stores > 0 || report.spill_loads > 0 || report.stack_frame > 0 {
                return Err(error(
                    spec,
                    "ptxas",
                    format!(
                        "{} spills ({} bytes stored, {} loaded, {} bytes of stack)",
                        kernel.name, report.spill_stores, report.spill_loads, report.stack_frame
                    ),
                ));
            }
            Ok(Some(PtxasStats {
                registers: report.registers,
                spill_stores: report.spill_stores,
                spill_loads: report.spill_loads,
                shared_bytes: report.shared_bytes,
            }))
        })
        .collect()
}

/// Writes `library` into `directory` (manifest.json and the PTX and cubin files it names).
#[cfg(feature = "llvm")]
pub fn write_library(library: &Library, directory: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(directory)?;
    std::fs::write(directory.join(&library.manifest.ptx_file), &library.ptx)?;
    if let (Some(cubin), Some(file)) = (&library.cubin, &library.manifest.cubin_file) {
        std::fs::write(directory.join(file), cubin)?;
    }
    std::fs::write(directory.join("manifest.json"), library.manifest.to_json() + "\n")
}
