//! Graph IR: printed snapshots after every pass for the example layers, canonical forms, and
//! the verifier on broken graphs.

mod common;

use ccc::ir::graph::{self, Graph, OpKind, ValueId};
use ccc::ir::passes::{PipelineOptions, pipeline, run_pipeline};
use ccc::spec::{AttentionSpec, EntryPoint};
use common::specs;

fn built(spec: &AttentionSpec) -> Graph {
    graph::build(spec, EntryPoint::Forward).expect("example specs build")
}

fn checked_options() -> PipelineOptions {
    PipelineOptions {
        print_after_all: true,
        verify_each_pass: true,
    }
}

/// The builder's graph and the graph after each pass, as one document.
fn pipeline_dump(spec: &AttentionSpec) -> String {
    let graph = built(spec);
    let mut text = format!("// built\n{graph}");
    let run = run_pipeline(graph, &checked_options()).expect("pipeline runs");
    for (pass, printed) in run.after_each {
        text.push_str(&format!("\n// after {pass}\n{printed}"));
    }
    text
}

#[test]
fn snapshots_after_every_pass() {
    for spec in specs::all() {
        insta::assert_snapshot!(format!("graph_passes_{}", spec.name), pipeline_dump(&spec));
    }
}

#[test]
fn pass_list_is_in_the_documented_order() {
    let names: Vec<&str> = pipeline().iter().map(|p| p.name).collect();
    assert_eq!(
        names,
        [
            "canonicalize",
            "dead-code-elimination",
            "materialize-projection-output",
            "fuse-qkv-projection",
            "fuse-qk-prologue",
            "fuse-attention",
            "fuse-output-projection"
        ]
    );
}

fn final_graph(spec: &AttentionSpec) -> Graph {
    run_pipeline(built(spec), &checked_options()).unwrap().graph
}

fn mnemonics(graph: &Graph) -> Vec<&'static str> {
    graph.ops.iter().map(|op| op.kind.mnemonic()).collect()
}

#[test]
fn plain_specs_keep_no_cca_op() {
    let cca_ops = [
        "token_shift",
        "concat",
        "split",
        "causal_pad",
        "conv_stage",
        "qk_mean",
        "l2_norm",
    ];
    for spec in [
        specs::mha(),
        specs::gqa(),
        specs::mqa(),
    ] {
        let graph = final_graph(&spec);
        let ops = mnemonics(&graph);
        assert!(
            ops.iter().all(|m| !cca_ops.contains(m)),
            "{}: {ops:?} still has CCA ops",
            spec.name
        );
        assert_eq!(
            ops,
            [
                "input",
                "linear",
                "linear",
                "linear",
                "cast",
                "cast",
                "cast",
                "attention",
                "linear",
                "cast"
            ],
            "{}",
            spec.name
        );
    }
}

#[test]
fn zaya1_fuses_into_four_groups_with_a_two_row_prologue_halo() {
    let graph = final_graph(&specs::zaya1());
    assert_eq!(graph.groups.len(), 4);
    let roles: Vec<_> = graph.groups.iter().map(|g| g.role).collect();
    assert_eq!(
        roles,
        [
            graph::KernelRole::QkvProjection,
            graph::KernelRole::QkPrologue { halo_rows: 2 },
            graph::KernelRole::Attention,
            graph::KernelRole::OutputProjection
        ]
    );
    // The input is the only op outside a kernel.
    let outside: Vec<_> = graph.ops.iter().filter(|op| op.group.is_none()).collect();
    assert_eq!(outside.len(), 1);
    assert!(matches!(outside[0].kind, OpKind::Input { .. }));
}

#[test]
fn backward_and_decode_are_reported_not_built() {
    let err = graph::build(&specs::zaya1(), EntryPoint::Backward).unwrap_err();
    assert_eq!(
        err.to_string(),
        "the backward entry point is not lowered to graph IR yet"
    );
    let mut broken = specs::zaya1();
    broken.value_shift = 5;
    let err = graph::build(&broken, EntryPoint::Forward).unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid spec: value_shift 5 exceeds kv_heads 2"
    );
}

fn verify_message(graph: &Graph) -> String {
    graph.verify().expect_err("the graph is broken").to_string()
}

fn op_index(graph: &Graph, mnemonic: &str) -> usize {
    graph
        .ops
        .iter()
        .position(|op| op.kind.mnemonic() == mnemonic)
        .unwrap()
}

#[test]
fn verifier_accepts_every_example_before_and_after_passes() {
    for spec in specs::all() {
        built(&spec).verify().unwrap();
        final_graph(&spec).verify().unwrap();
    }
}

#[test]
fn verifier_rejects_use_before_definition() {
    let mut graph = built(&specs::zaya1());
    let first_linear = op_index(&graph, "linear");
    let last = ValueId(graph.values.len() - 1);
    graph.ops[first_linear].operands[0] = last;
    assert_eq!(
        verify_message(&graph),
        format!(
            "op 1 (linear): operand %{} is used before it is defined",
            last.0
        )
    );
}

#[test]
fn verifier_rejects_a_value_defined_twice() {
    let mut graph = built(&specs::mha());
    graph.ops[2].results[0] = graph.ops[1].results[0];
    assert_eq!(
        verify_message(&graph),
        "op 2 (linear): result %1 is defined twice"
    );
}

#[test]
fn verifier_rejects_unknown_and_misshapen_parameters() {
    let mut graph = built(&specs::zaya1());
    graph.params[0].name = "q_proj.weights".into();
    assert_eq!(
        verify_message(&graph),
        "param @q_proj.weights: spec zaya1 has no such parameter"
    );

    let mut graph = built(&specs::zaya1());
    let conv = graph.param_by_name("qkv_proj.conv_qk_grouped.weight").unwrap();
    graph.params[conv.0].ty.shape[1] = 64usize.into();
    assert_eq!(
        verify_message(&graph),
        "param @qkv_proj.conv_qk_grouped.weight: declared [1280,64,2] but the spec's shape is [1280,128,2]"
    );
}

#[test]
fn verifier_rejects_a_wrong_result_type() {
    let mut graph = built(&specs::zaya1());
    let pad = op_index(&graph, "causal_pad");
    let result = graph.ops[pad].results[0];
    graph.values[result.0].ty.shape[1] = ccc::ir::graph::seq_plus(1);
    assert_eq!(
        verify_message(&graph),
        format!(
            "op {pad} (causal_pad): result %{} has type [B,S + 1,1280]xf32, expected [B,S + 2,1280]xf32",
            result.0
        )
    );
}

#[test]
fn verifier_rejects_operands_of_the_wrong_kind() {
    // Attention fed the f32 value before its store to bf16.
    let mut graph = built(&specs::mha());
    let attention = op_index(&graph, "attention");
    let v_store = graph.defining_op(graph.ops[attention].operands[2]).unwrap();
    graph.ops[attention].operands[2] = graph.ops[v_store].operands[0];
    assert_eq!(
        verify_message(&graph),
        format!(
            "op {attention} (attention): attention operands must be bf16 in BSHD layout with heads \
             of 128, got [B,S,2048]xf32"
        )
    );

    // A conv stage with more taps than the history left before it.
    let mut graph = built(&specs::zaya1());
    let conv = op_index(&graph, "conv_stage");
    if let OpKind::ConvStage { width, .. } = &mut graph.ops[conv].kind {
        *width = 4;
    }
    assert_eq!(
        verify_message(&graph),
        format!("op {conv} (conv_stage): a width-4 stage needs 3 rows of history, the input has 2")
    );
}

#[test]
fn verifier_rejects_split_groups_and_missing_outputs() {
    let mut graph = final_graph(&specs::mha());
    let attention = op_index(&graph, "attention");
    let attention_group = graph.ops[attention].group;
    graph.ops[attention + 1].group = graph.ops[attention - 1].group;
    graph.ops[attention - 1].group = attention_group;
    let message = verify_message(&graph);
    assert!(
        message.ends_with("is not contiguous: op 8 is separated from the rest"),
        "{message}"
    );

    let mut graph = built(&specs::mha());
    graph.outputs[0].value = ValueId(99);
    assert_eq!(
        verify_message(&graph),
        "output out: returns %99, which is never defined"
    );
}

#[test]
fn the_pipeline_verifies_its_input_when_asked() {
    assert_eq!(
        PipelineOptions::default().verify_each_pass,
        cfg!(debug_assertions)
    );
    let mut graph = built(&specs::mha());
    graph.outputs[0].value = ValueId(99);
    let err = run_pipeline(graph, &checked_options()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "pass verify-input: verifier: output out: returns %99, which is never defined"
    );
}
