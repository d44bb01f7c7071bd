//! Graph IR: the layer as typed tensor operations in SSA form.
//!
//! Naga-style arenas: `Graph::values` holds every SSA value (its type and an optional buffer
//! name), `Graph::ops` holds the operations in program order, and operations refer to values and
//! parameters by index handles. Parameters are module-level declarations (`@q_proj.weight`), named
//! and shaped exactly as `AttentionSpec::params()` says, so a checkpoint maps onto them by name.
//! Fusion does not restructure the graph: a fusion pass tags a contiguous run of ops with a
//! `FusionGroup`, which becomes one kernel of the plan (src/ir/plan). The interpreter therefore
//! runs any graph, before or after fusion, by executing ops in order.

mod build;
pub mod interp;
mod print;
/// Spellings of spec enums shared by the graph and plan printers.
pub(crate) mod print_names {
    pub(crate) use super::print::{conv_kind_name, mask_text, temperature_name};
}
mod types;
mod verify;

pub use build::{BuildError, build};
pub use types::infer_result_types;
pub use verify::VerifyError;

use crate::ir::size::{SizeExpr, SizeVar};
use crate::spec::{AttentionSpec, ConvKind, DType, EntryPoint, KeyTemperature, Mask, RopeStyle};
use std::collections::BTreeSet;

/// Handle of an SSA value: an index into `Graph::values`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub usize);

/// Handle of a parameter declaration: an index into `Graph::params`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ParamId(pub usize);

/// Handle of a fusion group: an index into `Graph::groups`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupId(pub usize);

/// Element type: activations and weights are stored in the spec's dtype, arithmetic between
/// kernel boundaries accumulates in f32.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElemType {
    Storage(DType),
    F32,
    /// Index tensors a serving call passes (block tables, sequence lengths).
    I32,
}

impl ElemType {
    pub fn name(self) -> &'static str {
        match self {
            ElemType::Storage(dtype) => dtype.name(),
            ElemType::F32 => "f32",
            ElemType::I32 => "i32",
        }
    }

    pub fn size_bytes(self) -> usize {
        match self {
            ElemType::Storage(dtype) => dtype.size_bytes(),
            ElemType::F32 | ElemType::I32 => 4,
        }
    }
}

/// How a tensor's elements sit in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Row-major in the order of the shape.
    RowMajor,
    /// A [B, S, H·d] tensor read as `heads` heads of d channels, token-major ([B, S, H, d]):
    /// the layout the projection kernel writes and attention reads.
    Bshd { heads: usize },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorType {
    pub shape: Vec<SizeExpr>,
    pub elem: ElemType,
    pub layout: Layout,
}

impl TensorType {
    pub fn new(shape: Vec<SizeExpr>, elem: ElemType, layout: Layout) -> TensorType {
        TensorType {
            shape,
            elem,
            layout,
        }
    }
    /// [B, rows, channels] row-major.
    pub fn activation(rows: SizeExpr, channels: usize, elem: ElemType) -> TensorType {
        TensorType::new(
            vec![SizeExpr::batch(), rows, channels.into()],
            elem,
            Layout::RowMajor,
        )
    }
    /// A tensor of fixed shape (parameters).
    pub fn fixed(shape: &[usize], elem: ElemType) -> TensorType {
        TensorType::new(
            shape.iter().map(|&n| n.into()).collect(),
            elem,
            Layout::RowMajor,
        )
    }
}

/// `S + rows`: the sequence axis extended by `rows` rows of causal history.
pub fn seq_plus(rows: usize) -> SizeExpr {
    SizeExpr::seq_len() + SizeExpr::c(rows as u64)
}

/// The `rows` of an axis written `S + rows` (or `S`), or `None` for any other expression.
pub fn seq_offset(axis: &SizeExpr) -> Option<usize> {
    match axis {
        SizeExpr::Var(SizeVar::SeqLen) => Some(0),
        SizeExpr::Add(a, b) => match (a.as_ref(), b.as_ref()) {
            (SizeExpr::Var(SizeVar::SeqLen), SizeExpr::Const(n)) => usize::try_from(*n).ok(),
            _ => None,
        },
        _ => None,
    }
}

/// A learned tensor the graph reads, declared once.
#[derive(Clone, Debug, PartialEq)]
pub struct ParamDecl {
    /// The Hugging Face state-dict name from `AttentionSpec::params()`.
    pub name: String,
    pub ty: TensorType,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub ty: TensorType,
    /// The buffer name a value gets when it crosses a kernel boundary (q, k, v, o, lse, out).
    pub name: Option<String>,
}

/// One semantic step of the layer. Attributes that the interpreter and the kernel builders need
/// are carried on the op, so that an op reads the same without the spec.
#[derive(Clone, Debug, PartialEq)]
pub enum OpKind {
    /// A layer input [B, S, width] in the storage dtype.
    Input { name: String, width: usize },
    /// y = x·Wᵀ (+ b), `nn.Linear`'s convention, accumulating in f32.
    Linear {
        weight: ParamId,
        bias: Option<ParamId>,
    },
    /// y[t] = x[t − rows], zero for t < rows (the value shift's x_prev).
    TokenShift { rows: usize },
    /// Concatenation along the channel axis.
    Concat,
    /// Splits the channel axis into consecutive slices of these widths.
    Split { widths: Vec<usize> },
    /// Prepends `rows` zero rows on the sequence axis: the convolutions' history, padded once.
    CausalPad { rows: usize },
    /// PyTorch Conv1d with no padding over the sequence axis: the output has `width − 1` rows
    /// fewer than the input. Depthwise: one filter per channel; per-head: a d×d matrix per tap.
    ConvStage {
        kind: ConvKind,
        width: usize,
        head_dim: usize,
        weight: ParamId,
        bias: ParamId,
    },
    /// The q-k mean skip: operands (yq, yk, q0, k0), results (q̂, k̂).
    QkMean { groups: usize, head_dim: usize },
    /// sqrt(d)·x·rsqrt(‖x_h‖² + eps) per head, times the per-head key temperature if given.
    L2Norm {
        head_dim: usize,
        eps: f64,
        temperature: Option<(ParamId, KeyTemperature)>,
    },
    /// Rotary embedding of the first `rotary_dim` channels of every head at absolute positions.
    Rope {
        head_dim: usize,
        rotary_dim: usize,
        theta: f64,
        style: RopeStyle,
    },
    /// Conversion to another element type and layout (a store at a kernel boundary).
    Cast { elem: ElemType, layout: Layout },
    /// Softmax attention over latent heads: operands (q, k, v), results (o, lse).
    Attention {
        mask: Mask,
        groups: usize,
        head_dim: usize,
        scale: f64,
    },
}

impl OpKind {
    /// The mnemonic the printer uses.
    pub fn mnemonic(&self) -> &'static str {
        match self {
            OpKind::Input { .. } => "input",
            OpKind::Linear { .. } => "linear",
            OpKind::TokenShift { .. } => "token_shift",
            OpKind::Concat => "concat",
            OpKind::Split { .. } => "split",
            OpKind::CausalPad { .. } => "causal_pad",
            OpKind::ConvStage { .. } => "conv_stage",
            OpKind::QkMean { .. } => "qk_mean",
            OpKind::L2Norm { .. } => "l2_norm",
            OpKind::Rope { .. } => "rope",
            OpKind::Cast { .. } => "cast",
            OpKind::Attention { .. } => "attention",
        }
    }

    /// Parameters the op reads, in operand order.
    pub fn params(&self) -> Vec<ParamId> {
        match self {
            OpKind::Linear { weight, bias } => std::iter::once(*weight).chain(*bias).collect(),
            OpKind::ConvStage { weight, bias, .. } => vec![*weight, *bias],
            OpKind::L2Norm {
                temperature: Some((temp, _)),
                ..
            } => vec![*temp],
            _ => Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    pub kind: OpKind,
    pub operands: Vec<ValueId>,
    pub results: Vec<ValueId>,
    /// The fusion group (future kernel) this op belongs to.
    pub group: Option<GroupId>,
}

/// The kernel a fusion group becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelRole {
    /// The projection GEMM: x·[W_q | W_k | W_v…]ᵀ (+ biases), the delayed value heads reading
    /// the previous token's x; it writes the packed [q0 | k0] (`p0`) when a q/k prologue follows,
    /// else q and k, and always v.
    QkvProjection,
    /// The CCA prologue on `p0` (convolutions, q-k mean, norms, RoPE), writing q and k; each row
    /// tile re-reads `halo_rows` rows of history (the convolutions' T).
    QkPrologue {
        halo_rows: usize,
    },
    /// Flash attention that also saves the log-sum-exp.
    Attention,
    OutputProjection,
}

impl KernelRole {
    /// The kernel this group becomes (its identity through plan, kernel IR and manifest).
    pub fn kernel(self) -> crate::ir::kernel::ForwardKernel {
        use crate::ir::kernel::ForwardKernel;
        match self {
            KernelRole::QkvProjection => ForwardKernel::QkvProjection,
            KernelRole::QkPrologue { .. } => ForwardKernel::QkPrologue,
            KernelRole::Attention => ForwardKernel::Attention,
            KernelRole::OutputProjection => ForwardKernel::OutputProjection,
        }
    }

    /// The suffix of the kernel symbol (`{spec.name}_{suffix}`).
    pub fn symbol_suffix(self) -> &'static str {
        self.kernel().suffix()
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct FusionGroup {
    pub role: KernelRole,
}

/// What a graph output is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutputKind {
    /// A result the caller asked for (the layer output).
    Result,
    /// State saved for a later entry point (the log-sum-exp for backward).
    Saved,
}

#[derive(Clone, Debug, PartialEq)]
pub struct GraphOutput {
    pub name: String,
    pub value: ValueId,
    pub kind: OutputKind,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Graph {
    pub spec: AttentionSpec,
    pub entry: EntryPoint,
    pub params: Vec<ParamDecl>,
    pub values: Vec<Value>,
    pub ops: Vec<Op>,
    pub groups: Vec<FusionGroup>,
    pub outputs: Vec<GraphOutput>,
}

impl Graph {
    pub fn value(&self, id: ValueId) -> &Value {
        &self.values[id.0]
    }
    pub fn param(&self, id: ParamId) -> &ParamDecl {
        &self.params[id.0]
    }
    pub fn param_by_name(&self, name: &str) -> Option<ParamId> {
        self.params.iter().position(|p| p.name == name).map(ParamId)
    }
    /// Index of the op that defines `value`.
    pub fn defining_op(&self, value: ValueId) -> Option<usize> {
        self.ops.iter().position(|op| op.results.contains(&value))
    }
    /// Indices of the ops that read `value`.
    pub fn users(&self, value: ValueId) -> Vec<usize> {
        (0..self.ops.len())
            .filter(|&i| self.ops[i].operands.contains(&value))
            .collect()
    }

    /// Appends an op, creating its result values with the types inference gives.
    pub fn push_op(
        &mut self,
        kind: OpKind,
        operands: Vec<ValueId>,
    ) -> Result<Vec<ValueId>, String> {
        let op = Op {
            kind,
            operands,
            results: Vec::new(),
            group: None,
        };
        let types = infer_result_types(self, &op)?;
        let results: Vec<ValueId> = types
            .into_iter()
            .map(|ty| {
                self.values.push(Value { ty, name: None });
                ValueId(self.values.len() - 1)
            })
            .collect();
        self.ops.push(Op {
            results: results.clone(),
            ..op
        });
        Ok(results)
    }

    /// Inserts an op before the op at `index` (so that it runs before that op's readers),
    /// creating its result values with the types inference gives.
    pub fn insert_op(
        &mut self,
        index: usize,
        kind: OpKind,
        operands: Vec<ValueId>,
    ) -> Result<Vec<ValueId>, String> {
        let results = self.push_op(kind, operands)?;
        let op = self.ops.pop().expect("push_op appended the op");
        self.ops.insert(index, op);
        Ok(results)
    }

    /// Makes every reader of `from` (ops and graph outputs) read `to` instead.
    pub fn replace_all_uses(&mut self, from: ValueId, to: ValueId) {
        for op in &mut self.ops {
            for operand in &mut op.operands {
                if *operand == from {
                    *operand = to;
                }
            }
        }
        for output in &mut self.outputs {
            if output.value == from {
                output.value = to;
            }
        }
        if self.values[to.0].name.is_none() {
            self.values[to.0].name = self.values[from.0].name.take();
        }
    }

    /// Removes ops whose results nobody reads (inputs stay: they are the layer's signature),
    /// then renumbers values, parameters stay as declared, and drops groups left empty.
    pub fn remove_dead_ops(&mut self) {
        let mut live: BTreeSet<ValueId> = self.outputs.iter().map(|o| o.value).collect();
        let mut keep = vec![false; self.ops.len()];
        for (index, op) in self.ops.iter().enumerate().rev() {
            let is_input = matches!(op.kind, OpKind::Input { .. });
            if is_input || op.results.iter().any(|r| live.contains(r)) {
                keep[index] = true;
                live.extend(op.operands.iter().copied());
            }
        }
        let mut index = 0;
        self.ops.retain(|_| {
            index += 1;
            keep[index - 1]
        });
        self.renumber();
    }

    /// Renumbers values in order of definition and groups in order of first use, so that
    /// printing after any rewrite is stable.
    fn renumber(&mut self) {
        let mut new_id = vec![None; self.values.len()];
        let mut values = Vec::new();
        for op in &self.ops {
            for result in &op.results {
                new_id[result.0] = Some(ValueId(values.len()));
                values.push(self.values[result.0].clone());
            }
        }
        let map = |v: ValueId| {
            new_id
                .get(v.0)
                .copied()
                .flatten()
                .unwrap_or(ValueId(usize::MAX))
        };
        for op in &mut self.ops {
            op.operands.iter_mut().for_each(|v| *v = map(*v));
            op.results.iter_mut().for_each(|v| *v = map(*v));
        }
        self.outputs.iter_mut().for_each(|o| o.value = map(o.value));
        self.values = values;

        let mut group_map = vec![None; self.groups.len()];
        let mut groups = Vec::new();
        for op in &mut self.ops {
            if let Some(group) = op.group {
                let new = *group_map[group.0].get_or_insert_with(|| {
                    groups.push(self.groups[group.0].clone());
                    GroupId(groups.len() - 1)
                });
                op.group = Some(new);
            }
        }
        self.groups = groups;
    }

    /// Reorders ops so that `members` are contiguous: first the ops they depend on, then the
    /// members, then everything else, each part in its old order (a valid SSA order, since the
    /// first part is closed under dependencies). A fusion group the members depend on moves
    /// before them whole, so that it stays contiguous too.
    pub fn make_contiguous(&mut self, members: &BTreeSet<usize>) {
        let mut needed: BTreeSet<usize> = BTreeSet::new();
        let mut stack: Vec<usize> = members.iter().copied().collect();
        while let Some(index) = stack.pop() {
            let mut deps: Vec<usize> = self.ops[index]
                .operands
                .iter()
                .filter_map(|operand| self.defining_op(*operand))
                .collect();
            if let Some(group) = self.ops[index].group
                && needed.contains(&index)
            {
                deps.extend((0..self.ops.len()).filter(|&i| self.ops[i].group == Some(group)));
            }
            for def in deps {
                if !members.contains(&def) && needed.insert(def) {
                    stack.push(def);
                }
            }
        }
        let order: Vec<usize> = needed
            .iter()
            .copied()
            .chain(members.iter().copied())
            .chain((0..self.ops.len()).filter(|i| !needed.contains(i) && !members.contains(i)))
            .collect();
        let old = std::mem::take(&mut self.ops);
        let mut slots: Vec<Option<Op>> = old.into_iter().map(Some).collect();
        self.ops = order.into_iter().filter_map(|i| slots[i].take()).collect();
        self.renumber();
    }

    /// Tags `members` (op indices) as a new fusion group and makes them contiguous.
    pub fn fuse(&mut self, members: &BTreeSet<usize>, role: KernelRole) -> Result<(), String> {
        if let Some(&taken) = members.iter().find(|&&i| self.ops[i].group.is_some()) {
            return Err(format!(
                "op {taken} ({}) is already in a fusion group",
                self.ops[taken].kind.mnemonic()
            ));
        }
        self.groups.push(FusionGroup { role });
        let group = GroupId(self.groups.len() - 1);
        for &index in members {
            self.ops[index].group = Some(group);
        }
        self.make_contiguous(members);
        Ok(())
    }
}
