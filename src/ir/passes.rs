//! The graph pass pipeline: ONE ordered list (`pipeline()`), each entry with the reason it sits
//! where it does, in the style of Triton's `make_ttgir` and TileLang's `cuda/pipeline.py`.
//! `run_pipeline` verifies the graph before the first pass and after every pass when
//! `verify_each_pass` is set (the default in debug builds; tests set it explicitly) and, with
//! `print_after_all`, returns the printed IR after each pass (`ccc compile --print-after-all`).
//! The fused graph then lowers to the kernel plan (src/ir/plan).

use crate::ir::graph::{Graph, KernelRole, OpKind, ValueId};
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
        // spec (a pad of 0 rows, a one-part concat, split(concat(..)), same-type casts). Fusion
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
        // First fusion: claims every op attention's q, k, v depend on (projections, token
        // shift, pad, convolutions, q-k mean, norms, RoPE, the BSHD stores) as the epilogue of
        // the down-projection GEMM. It runs before attention is fused so that the cut is "all
        // producers of attention's operands", which is the paper's fusion boundary; it fixes the
        // halo each row tile recomputes (T conv rows, or the value shift's one row).
        Pass {
            name: "fuse-qkv-projection",
            run: fuse_qkv_projection,
        },
        // Attention alone: flash attention with online softmax, saving the log-sum-exp. After
        // the projection fusion so that its inputs are already kernel-boundary buffers.
        Pass {
            name: "fuse-attention",
            run: fuse_attention,
        },
        // Last: what remains reads attention's o (the output GEMM and its store), so every op
        // except the inputs now belongs to exactly one of three kernels.
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

fn fuse_qkv_projection(graph: &mut Graph) -> Result<(), String> {
    let attention = attention_op(graph)?;
    let mut members = BTreeSet::new();
    let mut stack = graph.ops[attention].operands.clone();
    while let Some(value) = stack.pop() {
        let Some(def) = graph.defining_op(value) else {
            continue;
        };
        if matches!(graph.ops[def].kind, OpKind::Input { .. }) || !members.insert(def) {
            continue;
        }
        stack.extend(graph.ops[def].operands.iter().copied());
    }
    // Each row tile recomputes the x rows its first output row looks back on: T rows of
    // convolution history, or the value shift's row.
    let halo_rows = members
        .iter()
        .map(|&i| match graph.ops[i].kind {
            OpKind::CausalPad { rows } | OpKind::TokenShift { rows } => rows,
            _ => 0,
        })
        .max()
        .unwrap_or(0);
    graph.fuse(&members, KernelRole::QkvProjection { halo_rows })
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
