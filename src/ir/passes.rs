//! The graph pass pipeline: ONE ordered list (`pipeline()`), each entry with the reason it sits
//! where it does, in the style of Triton's `make_ttgir` and TileLang's `cuda/pipeline.py`.
//! `run_pipeline` verifies the graph before the first pass and after every pass when
//! `verify_each_pass` is set (the default in debug builds; tests set it explicitly) and, with
//! `print_after_all`, returns the printed IR after each pass (`ccc compile --print-after-all`).
//! The fused graph then lowers to the kernel plan (src/ir/plan).

use crate::ir::graph::{ElemType, Graph, KernelRole, Layout, OpKind, ValueId};
use crate::ir::kernel::PROJECTION_BUFFER;
use crate::spec::ParamRole;
use std::collections::BTreeSet;
use std::fmt;

/// One graph-to-graph transformation.
#[derive(Clone, Copy)]
pub struct Pass {
    pub name: &'static str,
    run: fn(&mut Graph) -> Result<(), String>,
}

impl Pass {
    pub fn apply(&self, graph: &mut Graph) -> Result<(), PassError> {
        (self.run)(graph).map_err(|message| PassError {
            pass: self.name,
            message,
        })
    }
}

impl fmt::Debug for Pass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// The forward pipeline, in order.
pub fn pipeline() -> Vec<Pass> {
    vec![
        // First, on the builder's literal graph: folds the steps that are identities for this
        // spec (a pad of 0 rows, a one-part concat, split(concat(..)), concat(split(..)),
        // same-type casts). Fusion
        // must see the minimal graph, so that a plain MHA/GQA/MQA spec reaches it with no CCA
        // op left and its projection kernel gets an empty prologue.
        Pass {
            name: "canonicalize",
            run: canonicalize,
        },
        // Right after canonicalize, which leaves the folded ops without readers, and before any
        // fusion: a dead op would otherwise be pulled into a kernel and cost work there.
        Pass {
            name: "dead-code-elimination",
            run: eliminate_dead_code,
        },
        // Before fusion, on the minimal graph: when q or k have a step after their projection
        // (convolutions, q-k mean, norms, RoPE), stores the packed [q0 | k0] as the buffer p0 in
        // the storage dtype and makes those steps read it back. That buffer is the cut between
        // the projection GEMM and the CCA prologue; a plain spec has no such step and keeps its
        // projections feeding the q and k stores directly.
        Pass {
            name: "materialize-projection-output",
            run: materialize_projection_output,
        },
        // First fusion: the projection GEMM, i.e. everything the buffers it writes (p0 or q and
        // k; v) depend on: the q, k and value projections, the value shift, the value concat and
        // the stores. It runs first so that the prologue's cut is "what lies between p0 and
        // attention's q and k".
        Pass {
            name: "fuse-qkv-projection",
            run: fuse_qkv_projection,
        },
        // The CCA prologue: every op left between p0 and attention's q and k (pad, convolutions,
        // q-k mean, norms, RoPE, the BSHD stores), one kernel that re-reads the T halo rows of p0
        // before each row tile. A plain spec has nothing left here and gets no group.
        Pass {
            name: "fuse-qk-prologue",
            run: fuse_qk_prologue,
        },
        // Attention alone: flash attention with online softmax, saving the log-sum-exp. After
        // the projection and prologue fusions so that its inputs are already kernel-boundary
        // buffers.
        Pass {
            name: "fuse-attention",
            run: fuse_attention,
        },
        // Last: what remains reads attention's o (the output GEMM and its store), so every op
        // except the inputs now belongs to exactly one kernel (three, or four with a prologue).
        Pass {
            name: "fuse-output-projection",
            run: fuse_output_projection,
        },
    ]
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassError {
    /// The pass that failed, or `verify-input` when the graph was broken before any pass.
    pub pass: &'static str,
    pub message: String,
}

impl fmt::Display for PassError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "pass {}: {}", self.pass, self.message)
    }
}

impl std::error::Error for PassError {}

#[derive(Clone, Debug)]
pub struct PipelineOptions {
    /// Keep the printed graph after every pass.
    pub print_after_all: bool,
    /// Run the verifier before the first pass and after each pass.
    pub verify_each_pass: bool,
}

// Not derivable: debug builds verify after every pass, release builds do not.
#[allow(clippy::derivable_impls)]
impl Default for PipelineOptions {
    fn default() -> PipelineOptions {
        PipelineOptions {
            print_after_all: false,
            verify_each_pass: cfg!(debug_assertions),
        }
    }
}

#[derive(Clone, Debug)]
pub struct PipelineRun {
    pub graph: Graph,
    /// (pass name, printed graph after it), when `print_after_all` was set.
    pub after_each: Vec<(&'static str, String)>,
}

pub fn run_pipeline(mut graph: Graph, options: &PipelineOptions) -> Result<PipelineRun, PassError> {
    let verify = |graph: &Graph, pass: &'static str| {
        graph.verify().map_err(|e| PassError {
            pass,
            message: format!("verifier: {e}"),
        })
    };
    if options.verify_each_pass {
        verify(&graph, "verify-input")?;
    }
    let mut after_each = Vec::new();
    for pass in pipeline() {
        pass.apply(&mut graph)?;
        if options.verify_each_pass {
            verify(&graph, pass.name)?;
        }
        if options.print_after_all {
            after_each.push((pass.name, graph.to_string()));
        }
    }
    Ok(PipelineRun { graph, after_each })
}

fn canonicalize(graph: &mut Graph) -> Result<(), String> {
    loop {
        let mut rewrites: Vec<(ValueId, ValueId)> = Vec::new();
        for op in &graph.ops {
            match &op.kind {
                OpKind::CausalPad { rows: 0 } | OpKind::Cast { .. } => {
                    rewrites.push((op.results[0], op.operands[0]));
                }
                OpKind::Concat if op.operands.len() == 1 => {
                    rewrites.push((op.results[0], op.operands[0]));
                }
                // concat(split(v)) of all the parts in order is v.
                OpKind::Concat => {
                    let Some(def) = graph.defining_op(op.operands[0]) else {
                        continue;
                    };
                    let producer = &graph.ops[def];
                    if matches!(producer.kind, OpKind::Split { .. })
                        && producer.results == op.operands
                    {
                        rewrites.push((op.results[0], producer.operands[0]));
                    }
                }
                OpKind::Split { .. } => {
                    let Some(def) = graph.defining_op(op.operands[0]) else {
                        continue;
                    };
                    let producer = &graph.ops[def];
                    if producer.kind == OpKind::Concat
                        && producer.operands.len() == op.results.len()
                    {
                        rewrites.extend(
                            op.results
                                .iter()
                                .copied()
                                .zip(producer.operands.iter().copied()),
                        );
                    }
                }
                _ => {}
            }
        }
        // A rewrite is an identity only where the types agree (a cast to another dtype, a split
        // along other boundaries than the concat's, stay); one whose value nobody reads is done.
        let is_read =
            |v: ValueId| !graph.users(v).is_empty() || graph.outputs.iter().any(|o| o.value == v);
        let rewrites: Vec<(ValueId, ValueId)> = rewrites
            .into_iter()
            .filter(|&(from, to)| graph.value(from).ty == graph.value(to).ty && is_read(from))
            .collect();
        if rewrites.is_empty() {
            return Ok(());
        }
        for (from, to) in rewrites {
            graph.replace_all_uses(from, to);
        }
    }
}

fn eliminate_dead_code(graph: &mut Graph) -> Result<(), String> {
    graph.remove_dead_ops();
    Ok(())
}

fn attention_op(graph: &Graph) -> Result<usize, String> {
    let found: Vec<usize> = (0..graph.ops.len())
        .filter(|&i| matches!(graph.ops[i].kind, OpKind::Attention { .. }))
        .collect();
    match found.as_slice() {
        [one] => Ok(*one),
        _ => Err(format!(
            "expected exactly one attention op, found {}",
            found.len()
        )),
    }
}

/// The op that projects x with the weight of `role`, and its result.
fn projection(graph: &Graph, role: ParamRole) -> Result<(usize, ValueId), String> {
    let weight = graph
        .spec
        .param_name(role)
        .and_then(|name| graph.param_by_name(&name))
        .ok_or_else(|| format!("the graph declares no {role:?} parameter"))?;
    graph
        .ops
        .iter()
        .position(|op| matches!(op.kind, OpKind::Linear { weight: w, .. } if w == weight))
        .map(|index| (index, graph.ops[index].results[0]))
        .ok_or_else(|| format!("no op projects with the {role:?} weight"))
}

fn materialize_projection_output(graph: &mut Graph) -> Result<(), String> {
    let (q_op, q0) = projection(graph, ParamRole::QueryProj)?;
    let (k_op, k0) = projection(graph, ParamRole::KeyProj)?;
    let is_store =
        |op: usize| matches!(graph.ops[op].kind, OpKind::Cast { layout: Layout::Bshd { .. }, .. });
    let stored_directly = [q0, k0]
        .iter()
        .all(|&v| graph.users(v).into_iter().all(is_store));
    if stored_directly {
        return Ok(());
    }
    let spec = graph.spec.clone();
    let at = q_op.max(k_op) + 1;
    let packed = graph.insert_op(at, OpKind::Concat, vec![q0, k0])?[0];
    let store = OpKind::Cast {
        elem: ElemType::Storage(spec.dtype),
        layout: Layout::RowMajor,
    };
    let p0 = graph.insert_op(at + 1, store, vec![packed])?[0];
    graph.values[p0.0].name = Some(PROJECTION_BUFFER.to_string());
    let load = OpKind::Cast {
        elem: ElemType::F32,
        layout: Layout::RowMajor,
    };
    let loaded = graph.insert_op(at + 2, load, vec![p0])?[0];
    let split = OpKind::Split {
        widths: vec![spec.q_width(), spec.kv_width()],
    };
    let halves = graph.insert_op(at + 3, split, vec![loaded])?;
    // Every step after the projections reads q0 and k0 back from p0.
    for op in &mut graph.ops[at + 4..] {
        for operand in &mut op.operands {
            if *operand == q0 {
                *operand = halves[0];
            } else if *operand == k0 {
                *operand = halves[1];
            }
        }
    }
    // The convolutions' concat of the two halves read back is the loaded p0 itself.
    canonicalize(graph)?;
    graph.remove_dead_ops();
    Ok(())
}

/// Indices of the ops `roots` depend on, walking back until a layer input or an op for which
/// `stop` holds.
fn producers(graph: &Graph, roots: &[ValueId], stop: impl Fn(usize) -> bool) -> BTreeSet<usize> {
    let mut members = BTreeSet::new();
    let mut stack = roots.to_vec();
    while let Some(value) = stack.pop() {
        let Some(def) = graph.defining_op(value) else {
            continue;
        };
        if matches!(graph.ops[def].kind, OpKind::Input { .. }) || stop(def) {
            continue;
        }
        if members.insert(def) {
            stack.extend(graph.ops[def].operands.iter().copied());
        }
    }
    members
}

fn fuse_qkv_projection(graph: &mut Graph) -> Result<(), String> {
    let attention = attention_op(graph)?;
    let [q, k, v] = graph.ops[attention].operands[..] else {
        return Err("attention does not read exactly q, k and v".into());
    };
    let packed = graph
        .ops
        .iter()
        .flat_map(|op| op.results.iter().copied())
        .find(|&value| graph.value(value).name.as_deref() == Some(PROJECTION_BUFFER));
    let written = match packed {
        Some(p0) => vec![p0, v],
        None => vec![q, k, v],
    };
    let members = producers(graph, &written, |_| false);
    graph.fuse(&members, KernelRole::QkvProjection)
}

fn fuse_qk_prologue(graph: &mut Graph) -> Result<(), String> {
    let attention = attention_op(graph)?;
    let roots = graph.ops[attention].operands[..2].to_vec();
    let members = producers(graph, &roots, |op| graph.ops[op].group.is_some());
    if members.is_empty() {
        return Ok(());
    }
    // Each row tile re-reads the T rows of p0 its first output row looks back on.
    let halo_rows = members
        .iter()
        .map(|&i| match graph.ops[i].kind {
            OpKind::CausalPad { rows } => rows,
            _ => 0,
        })
        .max()
        .unwrap_or(0);
    graph.fuse(&members, KernelRole::QkPrologue { halo_rows })
}

fn fuse_attention(graph: &mut Graph) -> Result<(), String> {
    let attention = attention_op(graph)?;
    graph.fuse(&BTreeSet::from([attention]), KernelRole::Attention)
}

fn fuse_output_projection(graph: &mut Graph) -> Result<(), String> {
    let attention = attention_op(graph)?;
    let mut members = BTreeSet::new();
    let mut stack = vec![graph.ops[attention].results[0]];
    while let Some(value) = stack.pop() {
        for user in graph.users(value) {
            if members.insert(user) {
                stack.extend(graph.ops[user].results.iter().copied());
            }
        }
    }
    if members.is_empty() {
        return Err("nothing reads attention's output".into());
    }
    graph.fuse(&members, KernelRole::OutputProjection)
}
