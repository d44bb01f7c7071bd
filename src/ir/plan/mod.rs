//! The kernel plan: which kernels one entry point launches, in order, with the buffers each
//! reads and writes (shapes as `SizeExpr`s of B and S), its scratch, its schedule and its
//! launch grid. It is lowered from a fully fused graph, one kernel per fusion group; the kernel
//! IR builder (src/ir/kernel) takes a `PlannedKernel`'s kind together with the spec.

use crate::ir::graph::{ElemType, Graph, KernelRole, Layout, OpKind, OutputKind, TensorType, ValueId};
use crate::ir::kernel::{self, Access, BackwardKernel, DecodeKernel, ForwardKernel, KernelParam, PagedKv, ProjectionSegment, SHIFT_STATE, Schedule, build_decode, gradient_name};
use crate::ir::passes::{PipelineOptions, run_pipeline};
use crate::ir::size::{SizeExpr, SizeVar};
use crate::spec::{AttentionSpec, ConvKind, EntryPoint, KeyTemperature, Mask, RopeStyle};
use std::collections::BTreeSet;
use std::fmt;

mod print;

#[derive(Clone, Debug, PartialEq)]
pub struct KernelPlan {
    /// The spec's name: every symbol starts with it.
    pub name: String,
    pub entry: EntryPoint,
    /// Activations the caller passes in (x).
    pub inputs: Vec<Buffer>,
    /// Learned tensors, by their state-dict names.
    pub params: Vec<Buffer>,
    /// Activations the caller gets back (out).
    pub outputs: Vec<Buffer>,
    /// What the caller keeps from call to call and the kernels update in place (a decode step's
    /// KV pages, convolution and shift state).
    pub state: Vec<Buffer>,
    pub kernels: Vec<PlannedKernel>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Buffer {
    pub name: String,
    pub ty: TensorType,
}

#[derive(Clone, Debug, PartialEq)]
pub struct PlannedKernel {
    /// `{spec.name}_{kernel}`, e.g. `zaya1_qkv_proj`.
    pub symbol: String,
    pub kind: KernelKind,
    /// Activation buffers read (layer inputs or earlier kernels' outputs).
    pub inputs: Vec<Buffer>,
    /// Parameter names read, in order.
    pub params: Vec<String>,
    /// Activation buffers written for later kernels or the caller.
    pub outputs: Vec<Buffer>,
    /// The caller's state read and written in place.
    pub updates: Vec<Buffer>,
    /// Buffers written for a later entry point (the log-sum-exp for backward): O(B·S·heads).
    pub scratch: Vec<Buffer>,
    /// Tile sizes, warps and pipeline depth: chosen by the kernel-IR builder's resource check
    /// (`kernel::default_schedule`) so that the plan and the kernel IR never disagree.
    pub schedule: Schedule,
    /// The launch grid of the kernel built with `schedule`.
    pub grid: Grid,
}

/// What the kernel-IR builder needs to know beyond the spec.
#[derive(Clone, Debug, PartialEq)]
pub enum KernelKind {
    /// The projection GEMM: each column segment is x (or the previous token's x)·Wᵀ + bias
    /// into a range of channels of p0 (or q, k) and v.
    QkvProjection { segments: Vec<ProjectionSegment> },
    /// The CCA prologue on p0, writing q and k. Each row tile re-reads `halo_rows` rows of p0
    /// before its first output row.
    QkPrologue {
        halo_rows: usize,
        prologue: Vec<PrologueStep>,
    },
    Attention {
        mask: Mask,
        query_heads: usize,
        kv_heads: usize,
        head_dim: usize,
        scale: f64,
        /// Writes the log-sum-exp of every query row (scratch `lse`).
        saves_lse: bool,
    },
    OutputProjection {
        bias: bool,
    },
    /// A kernel of the backward entry point, built with its default schedule from the spec.
    Backward(BackwardKernel),
    /// A kernel of the decode entry point over a paged KV cache of this geometry.
    Decode { kernel: DecodeKernel, paged: PagedKv },
}

/// Which kernel-IR builder builds a planned kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelBuilder {
    Forward(ForwardKernel),
    Backward(BackwardKernel),
    Decode(DecodeKernel, PagedKv),
}

impl KernelBuilder {
    /// The kernel IR of this kernel of `spec`: a forward kernel with `schedule`, a backward one
    /// with its default schedule (the one its plan entry recorded).
    pub fn build(self, spec: &AttentionSpec, schedule: &Schedule) -> Result<kernel::KernelFn, String> {
        match self {
            KernelBuilder::Forward(which) => kernel::build_forward(spec, which, schedule),
            KernelBuilder::Backward(which) => which.build(spec),
            KernelBuilder::Decode(which, paged) => build_decode(spec, which, paged),
        }
    }

    pub fn forward(self) -> Option<ForwardKernel> {
        match self {
            KernelBuilder::Forward(which) => Some(which),
            KernelBuilder::Backward(_) | KernelBuilder::Decode(..) => None,
        }
    }

    /// The forward kernel whose Hopper builder may replace this one, and over which token rows:
    /// the forward's own, and a packed prefill's projections and attention over its chunk.
    pub fn hopper_form(self) -> Option<(ForwardKernel, kernel::TokenRows)> {
        match self {
            KernelBuilder::Forward(which) => Some((which, kernel::TokenRows::Batch)),
            KernelBuilder::Decode(DecodeKernel::PrefillAttention, _) => Some((ForwardKernel::Attention, kernel::TokenRows::Packed)),
            KernelBuilder::Decode(DecodeKernel::PrefillProjection, _) => Some((ForwardKernel::QkvProjection, kernel::TokenRows::Packed)),
            KernelBuilder::Decode(DecodeKernel::PrefillOutputProjection, _) => Some((ForwardKernel::OutputProjection, kernel::TokenRows::Packed)),
            KernelBuilder::Backward(_) | KernelBuilder::Decode(..) => None,
        }
    }
}

impl PlannedKernel {
    /// Which kernel-IR builder builds this kernel.
    pub fn builder(&self) -> KernelBuilder {
        match self.kind {
            KernelKind::QkvProjection { .. } => KernelBuilder::Forward(ForwardKernel::QkvProjection),
            KernelKind::QkPrologue { .. } => KernelBuilder::Forward(ForwardKernel::QkPrologue),
            KernelKind::Attention { .. } => KernelBuilder::Forward(ForwardKernel::Attention),
            KernelKind::OutputProjection { .. } => KernelBuilder::Forward(ForwardKernel::OutputProjection),
            KernelKind::Backward(which) => KernelBuilder::Backward(which),
            KernelKind::Decode { kernel, paged } => KernelBuilder::Decode(kernel, paged),
        }
    }
}


/// One step of the q/k prologue, in execution order.
#[derive(Clone, Debug, PartialEq)]
pub enum PrologueStep {
    /// T zero rows of history before the sequence (padded once).
    CausalPad {
        rows: usize,
    },
    Conv {
        kind: ConvKind,
        width: usize,
    },
    QkMean,
    /// L2 norm of q and k heads, with the key temperature.
    L2Norm {
        key_temperature: KeyTemperature,
    },
    /// RoPE on q and k.
    Rope {
        rotary_dim: usize,
        theta: f64,
        style: RopeStyle,
    },
}

/// Launch grid in blocks: x, y, z.
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    pub x: SizeExpr,
    pub y: SizeExpr,
    pub z: SizeExpr,
}

impl Grid {
    pub fn blocks(&self) -> SizeExpr {
        self.x.clone() * self.y.clone() * self.z.clone()
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanError {
    pub message: String,
}

impl fmt::Display for PlanError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "kernel plan: {}", self.message)
    }
}

impl std::error::Error for PlanError {}

fn fail<T>(message: impl Into<String>) -> Result<T, PlanError> {
    Err(PlanError {
        message: message.into(),
    })
}

/// Builds, optimises and plans one entry point of `spec` with the default pipeline options (the
/// backward from its kernel builders: [`plan_backward`]).
pub fn plan_for(spec: &AttentionSpec, entry: EntryPoint) -> Result<KernelPlan, PlanError> {
    match entry {
        EntryPoint::Backward => return plan_backward(spec),
        EntryPoint::Decode => return plan_decode(spec, PagedKv::DEFAULT),
        EntryPoint::Prefill => return plan_prefill(spec, PagedKv::DEFAULT),
        EntryPoint::Forward => {}
    }
    let graph = crate::ir::graph::build(spec, entry).or_else(|e| fail(e.to_string()))?;
    let run = run_pipeline(graph, &PipelineOptions::default()).or_else(|e| fail(e.to_string()))?;
    let plan = lower(&run.graph)?;
    plan.verify()?;
    Ok(plan)
}

/// One kernel per fusion group of a fully fused graph, in program order.
pub fn lower(graph: &Graph) -> Result<KernelPlan, PlanError> {
    graph
        .verify()
        .or_else(|e| fail(format!("graph does not verify: {e}")))?;
    let spec = &graph.spec;
    if let Some(op) = graph
        .ops
        .iter()
        .find(|op| op.group.is_none() && !matches!(op.kind, OpKind::Input { .. }))
    {
        return fail(format!(
            "a {} op belongs to no kernel: run the fusion passes",
            op.kind.mnemonic()
        ));
    }
    let buffer_of = |value: ValueId| -> Result<Buffer, PlanError> {
        let info = graph.value(value);
        match &info.name {
            Some(name) => Ok(Buffer {
                name: name.clone(),
                ty: info.ty.clone(),
            }),
            None => fail(format!(
                "value %{} crosses a kernel boundary without a buffer name",
                value.0
            )),
        }
    };
    let mut inputs = Vec::new();
    for op in &graph.ops {
        if let OpKind::Input { name, .. } = &op.kind {
            inputs.push(Buffer {
                name: name.clone(),
                ty: graph.value(op.results[0]).ty.clone(),
            });
        }
    }
    let input_buffer = |value: ValueId| -> Result<Buffer, PlanError> {
        let def = graph.defining_op(value);
        match def.map(|i| &graph.ops[i].kind) {
            Some(OpKind::Input { name, .. }) => Ok(Buffer {
                name: name.clone(),
                ty: graph.value(value).ty.clone(),
            }),
            _ => buffer_of(value),
        }
    };

    let mut kernels = Vec::new();
    let mut start = 0;
    while start < graph.ops.len() {
        let Some(group) = graph.ops[start].group else {
            start += 1;
            continue;
        };
        let end = (start..graph.ops.len())
            .find(|&i| graph.ops[i].group != Some(group))
            .unwrap_or(graph.ops.len());
        let members = &graph.ops[start..end];
        let defined: BTreeSet<ValueId> = members
            .iter()
            .flat_map(|op| op.results.iter().copied())
            .collect();

        let mut kernel_inputs: Vec<Buffer> = Vec::new();
        let mut params: Vec<String> = Vec::new();
        for op in members {
            for operand in &op.operands {
                if !defined.contains(operand) {
                    let buffer = input_buffer(*operand)?;
                    if !kernel_inputs.contains(&buffer) {
                        kernel_inputs.push(buffer);
                    }
                }
            }
            for param in op.kind.params() {
                let name = graph.param(param).name.clone();
                if !params.contains(&name) {
                    params.push(name);
                }
            }
        }
        let (mut outputs, mut scratch) = (Vec::new(), Vec::new());
        for value in members.iter().flat_map(|op| op.results.iter().copied()) {
            let read_later = graph.ops[end..]
                .iter()
                .any(|op| op.operands.contains(&value));
            let returned = graph.outputs.iter().find(|o| o.value == value);
            if matches!(returned, Some(o) if o.kind == OutputKind::Saved) {
                scratch.push(buffer_of(value)?);
            } else if read_later || returned.is_some() {
                outputs.push(buffer_of(value)?);
            }
        }

        let role = graph.groups[group.0].role;
        let (kind, which) = match role {
            KernelRole::QkvProjection => (
                KernelKind::QkvProjection {
                    segments: kernel::projection_segments(spec),
                },
                ForwardKernel::QkvProjection,
            ),
            KernelRole::QkPrologue { halo_rows } => (
                KernelKind::QkPrologue {
                    halo_rows,
                    prologue: prologue_steps(members.iter().map(|op| &op.kind)),
                },
                ForwardKernel::QkPrologue,
            ),
            KernelRole::Attention => {
                let Some(OpKind::Attention {
                    mask,
                    groups,
                    head_dim,
                    scale,
                }) = members
                    .iter()
                    .map(|op| &op.kind)
                    .find(|k| matches!(k, OpKind::Attention { .. }))
                else {
                    return fail("the attention kernel has no attention op");
                };
                let kind = KernelKind::Attention {
                    mask: *mask,
                    query_heads: spec.kv_heads * groups,
                    kv_heads: spec.kv_heads,
                    head_dim: *head_dim,
                    scale: *scale,
                    saves_lse: !scratch.is_empty(),
                };
                (kind, ForwardKernel::Attention)
            }
            KernelRole::OutputProjection => {
                let bias = members
                    .iter()
                    .any(|op| matches!(op.kind, OpKind::Linear { bias: Some(_), .. }));
                (KernelKind::OutputProjection { bias }, ForwardKernel::OutputProjection)
            }
        };
        // Tile choice lives with the kernel builders, which check it against shared memory and
        // the warp layout; the grid is the one of the kernel they build.
        let schedule = kernel::default_schedule(spec, which).or_else(fail)?;
        let built = kernel::build_forward(spec, which, &schedule).or_else(fail)?;
        // The graph's cut and the kernel builder's parameters must name the same tensors (p0
        // or q and k, weights included), or the launch would bind the wrong buffers.
        let planned: BTreeSet<&str> = kernel_inputs
            .iter()
            .chain(&outputs)
            .chain(&scratch)
            .map(|b| b.name.as_str())
            .chain(params.iter().map(String::as_str))
            .collect();
        let bound: BTreeSet<&str> = built
            .params
            .iter()
            .filter(|p| matches!(p, KernelParam::Tensor { .. }))
            .map(KernelParam::name)
            .collect();
        if planned != bound {
            return fail(format!(
                "{}: the fusion group reads and writes {planned:?}, the kernel binds {bound:?}",
                built.name
            ));
        }
        let [x, y, z] = built.grid;
        let grid = Grid { x, y, z };
        kernels.push(PlannedKernel {
            symbol: format!("{}_{}", spec.name, role.symbol_suffix()),
            kind,
            inputs: kernel_inputs,
            params,
            outputs,
            updates: Vec::new(),
            scratch,
            schedule,
            grid,
        });
        start = end;
    }
    let outputs = graph
        .outputs
        .iter()
        .filter(|o| o.kind == OutputKind::Result)
        .map(|o| buffer_of(o.value))
        .collect::<Result<_, _>>()?;
    let params = graph
        .params
        .iter()
        .map(|p| Buffer {
            name: p.name.clone(),
            ty: p.ty.clone(),
        })
        .collect();
    Ok(KernelPlan {
        name: spec.name.clone(),
        entry: graph.entry,
        inputs,
        params,
        outputs,
        state: Vec::new(),
        kernels,
    })
}

/// The backward entry point of `spec`: [`BackwardKernel::launched_by`] in order, each kernel's
/// buffers read from the tensors its builder binds. It has no graph IR: what it reads besides
/// `x`, `dout` and the weights is what the forward saved (`q`, `k`, `v`, `o`, `lse`, and `p0`
/// with a prologue), and its outputs are `dx` and every weight's gradient.
pub fn plan_backward(spec: &AttentionSpec) -> Result<KernelPlan, PlanError> {
    let built = BackwardKernel::launched_by(spec)
        .into_iter()
        .map(|which| Ok((KernelKind::Backward(which), which.build(spec).or_else(fail)?)))
        .collect::<Result<Vec<_>, PlanError>>()?;
    plan_from_kernels(spec, EntryPoint::Backward, built, &[], |name| name == "dx" || name.starts_with("grad."))
}

/// The decode entry point of `spec`: [`DecodeKernel::launched_by`] in order, planned from the
/// tensors the builders bind like the backward's. The caller passes `x` [B, 1, E] (one token of
/// each of B sequences), the block tables and lengths, and its state (KV pages, convolution and
/// shift state: the buffers a kernel reads and writes); it gets `out` [B, 1, E].
pub fn plan_decode(spec: &AttentionSpec, paged: PagedKv) -> Result<KernelPlan, PlanError> {
    let built = DecodeKernel::launched_by(spec)
        .into_iter()
        .map(|which| Ok((KernelKind::Decode { kernel: which, paged }, build_decode(spec, which, paged).or_else(fail)?)))
        .collect::<Result<Vec<_>, PlanError>>()?;
    let token_rows = |name: &str, width: usize| Buffer {
        name: name.into(),
        ty: TensorType::new(vec![SizeExpr::batch(), SizeExpr::c(1), SizeExpr::from(width)], ElemType::Storage(spec.dtype), Layout::RowMajor),
    };
    let mut declared = vec![token_rows("x", spec.model_dim), token_rows("out", spec.model_dim)];
    if spec.value_shift > 0 {
        let width = spec.value_shift * spec.head_dim;
        declared.push(Buffer {
            name: SHIFT_STATE.into(),
            ty: TensorType::new(vec![SizeExpr::batch(), SizeExpr::from(width)], ElemType::Storage(spec.dtype), Layout::RowMajor),
        });
    }
    plan_from_kernels(spec, EntryPoint::Decode, built, &declared, |name| name == "out")
}

/// The prefill entry point of `spec`: [`DecodeKernel::prefill_launched_by`] in order over a
/// packed batch, as FlashAttention's varlen functions take one: `x` [S, E] holds the new tokens
/// of B sequences (sequence b rows cu_seqlens[b] .. cu_seqlens[b + 1]), each continuing the
/// seq_lens[b] − n tokens its pages and state hold (seq_lens counts them with the new ones);
/// their k̃ and v go into the pages, the state moves on, and the caller gets `out` [S, E].
pub fn plan_prefill(spec: &AttentionSpec, paged: PagedKv) -> Result<KernelPlan, PlanError> {
    let built = DecodeKernel::prefill_launched_by(spec)
        .into_iter()
        .map(|which| Ok((KernelKind::Decode { kernel: which, paged }, build_decode(spec, which, paged).or_else(fail)?)))
        .collect::<Result<Vec<_>, PlanError>>()?;
    let storage = |name: &str, shape: Vec<SizeExpr>| Buffer { name: name.into(), ty: TensorType::new(shape, ElemType::Storage(spec.dtype), Layout::RowMajor) };
    let token_rows = |name: &str| storage(name, vec![SizeExpr::seq_len(), SizeExpr::from(spec.model_dim)]);
    let heads = || [SizeExpr::from(spec.kv_heads), SizeExpr::from(spec.head_dim)];
    let mut declared = vec![token_rows("x"), token_rows("out")];
    for cache in ["k_cache", "v_cache"] {
        declared.push(storage(cache, [SizeExpr::pages(), SizeExpr::from(paged.page_size as usize)].into_iter().chain(heads()).collect()));
    }
    if spec.value_shift > 0 {
        declared.push(storage(SHIFT_STATE, vec![SizeExpr::batch(), SizeExpr::from(spec.value_shift * spec.head_dim)]));
    }
    plan_from_kernels(spec, EntryPoint::Prefill, built, &declared, |name| name == "out")
}

/// A plan from the kernels an entry point launches, in order (entry points without graph IR):
/// each buffer under the first shape a kernel binds it with (another kernel may view it under
/// another shape of as many elements), or under its `declared` shape (what the caller sees).
/// A buffer read before any kernel writes it is the caller's input (a buffer a kernel reads and
/// writes, even after others only read it, is the caller's state); `is_output` says which
/// written ones the caller gets.
fn plan_from_kernels(
    spec: &AttentionSpec,
    entry: EntryPoint,
    built: Vec<(KernelKind, kernel::KernelFn)>,
    declared: &[Buffer],
    is_output: impl Fn(&str) -> bool,
) -> Result<KernelPlan, PlanError> {
    let weights: Vec<Buffer> = spec
        .params()
        .into_iter()
        .map(|p| Buffer { name: p.name, ty: TensorType::new(p.shape.iter().map(|&d| SizeExpr::from(d)).collect(), ElemType::Storage(spec.dtype), Layout::RowMajor) })
        .collect();
    let (mut inputs, mut written, mut state, mut kernels) = (Vec::<Buffer>::new(), Vec::<Buffer>::new(), Vec::<Buffer>::new(), Vec::new());
    for (kind, built) in built {
        let (mut kernel_inputs, mut outputs, mut updates, mut params) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for param in &built.params {
            let KernelParam::Tensor { name, elem, shape, access } = param else { continue };
            if weights.iter().any(|w| &w.name == name) {
                params.push(name.clone());
                continue;
            }
            let elem = match elem {
                kernel::ElemType::F32 => ElemType::F32,
                kernel::ElemType::I32 => ElemType::I32,
                storage if *storage == kernel::ElemType::from(spec.dtype) => ElemType::Storage(spec.dtype),
                other => {
                    return fail(format!("{}: binds {name} as {}, neither f32, i32 nor the spec's {}", built.name, other.name(), spec.dtype.name()));
                }
            };
            let mut buffer = Buffer { name: name.clone(), ty: TensorType::new(shape.clone(), elem, Layout::RowMajor) };
            // A kernel may view a buffer under another shape of as many elements (o as
            // [B, S, Hq, d] or [B, S, Hq·d]): the plan keeps the declared or first one, but for
            // a weight's gradient, which has the weight's shape (a sum of parts writes it flat).
            let weight_shaped = weights
                .iter()
                .find(|w| gradient_name(&w.name) == *name)
                .map(|w| Buffer { name: name.clone(), ty: TensorType::new(w.ty.shape.clone(), elem, Layout::RowMajor) });
            let known = weight_shaped.or_else(|| declared.iter().chain(&written).chain(&inputs).chain(&state).find(|b| b.name == *name).cloned());
            if let Some(known) = known {
                if !same_elements(&known.ty, &buffer.ty) {
                    let earlier = if name.starts_with("grad.") { "its weight's shape" } else { "an earlier binding" };
                    return fail(format!("{}: binds {} as {}, not as many elements as {earlier}, {}", built.name, buffer.name, buffer.ty, known.ty));
                }
                buffer = known;
            }
            let is_new = !written.iter().chain(&inputs).chain(&state).any(|known| known.name == buffer.name);
            let (list, per_kernel) = match access {
                Access::Write => (&mut written, &mut outputs),
                // Read before any kernel of this call writes it: the caller's (x, dout, what the
                // forward saved).
                Access::Read => (&mut inputs, &mut kernel_inputs),
                Access::ReadWrite => (&mut state, &mut updates),
            };
            if is_new {
                list.push(buffer.clone());
            } else if *access == Access::ReadWrite
                && let Some(at) = inputs.iter().position(|known| known.name == buffer.name)
            {
                // An input an earlier kernel only read and this one updates: the caller's state.
                state.push(inputs.remove(at));
            }
            per_kernel.push(buffer);
        }
        let [x, y, z] = built.grid.clone();
        kernels.push(PlannedKernel {
            symbol: built.name.clone(),
            kind,
            inputs: kernel_inputs,
            params,
            outputs,
            updates,
            scratch: Vec::new(),
            schedule: built.schedule,
            grid: Grid { x, y, z },
        });
    }
    let outputs: Vec<Buffer> = written.into_iter().filter(|b| is_output(&b.name)).collect();
    let plan = KernelPlan { name: spec.name.clone(), entry, inputs, params: weights, outputs, state, kernels };
    plan.verify()?;
    Ok(plan)
}

/// Whether two tensor types are views of one buffer: the same element type and as many elements
/// at every size (checked at a few sizes, which sizes linear in each decide).
fn same_elements(a: &TensorType, b: &TensorType) -> bool {
    let elements = |ty: &TensorType, env: &crate::ir::size::SizeEnv| {
        ty.shape.iter().try_fold(1u64, |acc, dim| Some(acc * dim.eval(env).ok()?))
    };
    a.elem == b.elem
        && [(1, 1), (3, 17), (2, 1000)].into_iter().all(|(batch, seq_len)| {
            let env = crate::ir::size::SizeEnv { batch, seq_len, sms: Some(132), pages: Some(batch * 7), blocks: Some(seq_len + 2) };
            elements(a, &env).is_some() && elements(a, &env) == elements(b, &env)
        })
}

/// The steps of the q/k prologue: one per CCA op, q and k halves of the same step (their
/// norms, their RoPE) merged into one.
fn prologue_steps<'a>(ops: impl Iterator<Item = &'a OpKind>) -> Vec<PrologueStep> {
    let mut steps: Vec<PrologueStep> = Vec::new();
    for kind in ops {
        let step = match kind {
            OpKind::CausalPad { rows } => PrologueStep::CausalPad { rows: *rows },
            OpKind::ConvStage { kind, width, .. } => PrologueStep::Conv {
                kind: *kind,
                width: *width,
            },
            OpKind::QkMean { .. } => PrologueStep::QkMean,
            OpKind::L2Norm { temperature, .. } => PrologueStep::L2Norm {
                key_temperature: temperature.map_or(KeyTemperature::None, |(_, kind)| kind),
            },
            OpKind::Rope {
                rotary_dim,
                theta,
                style,
                ..
            } => PrologueStep::Rope {
                rotary_dim: *rotary_dim,
                theta: *theta,
                style: *style,
            },
            _ => continue,
        };
        match (steps.last_mut(), &step) {
            (
                Some(PrologueStep::L2Norm { key_temperature }),
                PrologueStep::L2Norm {
                    key_temperature: next,
                },
            ) => {
                if *next != KeyTemperature::None {
                    *key_temperature = *next;
                }
            }
            (Some(last), _) if *last == step && matches!(step, PrologueStep::Rope { .. }) => {}
            _ => steps.push(step),
        }
    }
    steps
}

/// How many factors of S a size has: a buffer of degree 2 would be S×S.
fn seq_degree(expr: &SizeExpr) -> u32 {
    match expr {
        SizeExpr::Const(_) => 0,
        SizeExpr::Var(var) => u32::from(*var == SizeVar::SeqLen),
        SizeExpr::Add(a, b) => seq_degree(a).max(seq_degree(b)),
        SizeExpr::Mul(a, b) => seq_degree(a) + seq_degree(b),
        SizeExpr::CeilDiv(a, _) => seq_degree(a),
    }
}

impl KernelPlan {
    /// Symbols, dataflow between kernels (every buffer read is a layer input or written by an
    /// earlier kernel, with the same type), parameters, tiles, and that no buffer is S×S.
    pub fn verify(&self) -> Result<(), PlanError> {
        if self.kernels.is_empty() {
            return fail("the plan has no kernels");
        }
        let mut available: Vec<Buffer> = self.inputs.iter().chain(&self.state).cloned().collect();
        let mut symbols = BTreeSet::new();
        for kernel in &self.kernels {
            let here = &kernel.symbol;
            if let Some(which) = kernel.builder().forward() {
                let want = format!("{}_{}", self.name, which.suffix());
                if *here != want {
                    return fail(format!("kernel {here} should be named {want}"));
                }
            }
            if !symbols.insert(here.clone()) {
                return fail(format!("kernel {here} appears twice"));
            }
            for input in &kernel.inputs {
                match available.iter().find(|b| b.name == input.name) {
                    Some(b) if b.ty == input.ty => {}
                    Some(b) => {
                        return fail(format!(
                            "kernel {here} reads {} as {}, but it was written as {}",
                            input.name, input.ty, b.ty
                        ));
                    }
                    None => {
                        return fail(format!(
                            "kernel {here} reads {}, which no earlier kernel writes",
                            input.name
                        ));
                    }
                }
            }
            for updated in &kernel.updates {
                // The caller's state, or what an earlier kernel of this call wrote.
                let written_earlier = available.iter().any(|b| b == updated) && !self.inputs.iter().any(|b| b.name == updated.name);
                if !self.state.iter().any(|b| b == updated) && !written_earlier {
                    return fail(format!(
                        "kernel {here} updates {} as {}, which is neither the caller's state of that type nor written by an earlier kernel",
                        updated.name, updated.ty
                    ));
                }
            }
            for param in &kernel.params {
                if !self.params.iter().any(|p| p.name == *param) {
                    return fail(format!("kernel {here} reads undeclared parameter @{param}"));
                }
            }
            for buffer in kernel.outputs.iter().chain(&kernel.scratch) {
                // In the backward several kernels may write parts of one buffer (a convolution's
                // weight gradient, one tap each), never a layer input or under another type.
                let is_input = self.inputs.iter().any(|b| b.name == buffer.name);
                match available.iter().find(|b| b.name == buffer.name) {
                    Some(b) if self.entry == EntryPoint::Backward && !is_input && b == buffer => continue,
                    Some(_) => {
                        return fail(format!(
                            "kernel {here} writes {}, which already exists",
                            buffer.name
                        ));
                    }
                    None => {}
                }
                let degree: u32 = buffer.ty.shape.iter().map(seq_degree).sum();
                if degree > 1 {
                    return fail(format!(
                        "kernel {here}: buffer {} is quadratic in S",
                        buffer.name
                    ));
                }
                available.push(buffer.clone());
            }
            if let KernelKind::QkPrologue { halo_rows, .. } = kernel.kind
                && halo_rows >= kernel.schedule.block_m as usize
            {
                return fail(format!(
                    "kernel {here}: a tile of {} rows cannot hold a halo of {halo_rows}",
                    kernel.schedule.block_m
                ));
            }
            for axis in [&kernel.grid.x, &kernel.grid.y, &kernel.grid.z] {
                if *axis == SizeExpr::c(0) {
                    return fail(format!("kernel {here} launches an empty grid"));
                }
            }
        }
        for output in &self.outputs {
            if !available.iter().any(|b| b == output) {
                return fail(format!("no kernel writes the layer output {}", output.name));
            }
        }
        Ok(())
    }
}
