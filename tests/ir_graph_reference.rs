//! The graph interpreter after every pass of the pipeline against the CPU reference
//! (`ccc::reference::forward`), on every example layer and on random small specs.
//!
//! tests/ir_graph_interp.rs checks each pass against the graph before it; this file closes the
//! loop to the reference that judges the kernels, so a graph that is wrong from the builder on
//! (and therefore "preserved" by every pass) fails here.

use ccc::ir::graph::interp::{self, Array};
use ccc::ir::graph::{self, Graph};
use ccc::ir::passes::pipeline;
use ccc::ir::size::SizeEnv;
use ccc::reference::{self, Tensor, Weights, random_input, rel_l2_error};
use ccc::spec::{
    AttentionSpec, ConvKind, ConvStage, DType, EntryPoint, KeyTemperature, Mask, QkNorm, Rope,
    RopeStyle,
};
use std::collections::BTreeMap;

mod common;
use common::rng::SplitMix64;
use common::specs::{SmallSpecChoices, example_files, random_small_spec};

/// Relative L2 error allowed between the graph interpreter and the reference: both run in f64,
/// so anything above rounding noise is a semantic difference.
const TOLERANCE: f64 = 1e-10;

/// Heads of width 2..16, windows of 1, 3 or 7 tokens, both dtypes.
const SMALL_SPECS: SmallSpecChoices = SmallSpecChoices {
    head_dims: &[2, 4, 8, 16],
    windows: &[1, 3, 7],
    random_dtype: true,
};

fn to_array(tensor: &Tensor) -> Array {
    Array {
        shape: tensor.shape.clone(),
        data: tensor.data.clone(),
    }
}

fn to_tensor(array: &Array) -> Tensor {
    Tensor {
        shape: array.shape.clone(),
        data: array.data.clone(),
    }
}

/// The reference's weights as the interpreter's parameter map: both are keyed by
/// `spec.params()` names, so this is a change of container only.
fn interpreter_params(weights: &Weights) -> BTreeMap<String, Array> {
    weights
        .tensors
        .iter()
        .map(|(name, tensor)| (name.clone(), to_array(tensor)))
        .collect()
}

/// One layer on one input: the graph is built from `graph_spec`, the reference runs
/// `reference_spec` (the same spec, except in the test that checks this file can fail).
struct Case<'a> {
    graph_spec: &'a AttentionSpec,
    reference_spec: &'a AttentionSpec,
    batch: usize,
    seq_len: usize,
    seed: u64,
}

/// Largest relative L2 error of the graph's outputs against the reference over the built graph
/// and the graph after every pass, with the stage it occurred at. Panics if an output is missing
/// or the graph fails to build, pass or run.
fn worst_error(case: &Case) -> (f64, String) {
    let spec = case.graph_spec;
    let mut weights = Weights::random(spec, case.seed);
    // `Weights::random` keeps temperatures in (0.5, 1.5); spread them across learned_exp's clamp
    // to [1e-7, 2] at both ends, so the clamp is compared too.
    if let Some(temperature) = weights.tensors.get_mut("qk_norm.temp") {
        let mut rng = SplitMix64(case.seed ^ 0x7E39);
        temperature
            .data
            .iter_mut()
            .for_each(|t| *t = rng.uniform(-0.5, 2.5));
    }
    let x = random_input(spec, case.batch, case.seq_len, case.seed ^ 0xA11CE);
    let want = reference::forward(case.reference_spec, &weights, &x)
        .unwrap_or_else(|e| panic!("{}: reference: {e}", spec.name));
    let params = interpreter_params(&weights);
    let inputs = BTreeMap::from([("x".to_string(), to_array(&x))]);
    let env = SizeEnv {
        batch: case.batch as u64,
        seq_len: case.seq_len as u64,
        sms: None,
        pages: None,
        blocks: None,
    };

    let compare = |graph: &Graph, stage: &str| -> (f64, String) {
        let outputs = interp::run(graph, env, &inputs, &params)
            .unwrap_or_else(|e| panic!("{} {stage}: {e}\n{graph}", spec.name));
        let out = outputs
            .get("out")
            .unwrap_or_else(|| panic!("{}: no `out` output", spec.name));
        let mut worst = (
            rel_l2_error(&to_tensor(out), &want.out).unwrap(),
            format!("out {stage}"),
        );
        // The forward graph saves the log-sum-exp for backward; when it does, it must be the
        // reference's.
        if let Some(lse) = outputs.get("lse") {
            let error = rel_l2_error(&to_tensor(lse), &want.lse).unwrap();
            if error > worst.0 {
                worst = (error, format!("lse {stage}"));
            }
        }
        worst
    };

    let mut graph = graph::build(spec, EntryPoint::Forward)
        .unwrap_or_else(|e| panic!("{}: build: {e}", spec.name));
    let mut worst = compare(&graph, "before any pass");
    for pass in pipeline() {
        pass.apply(&mut graph)
            .unwrap_or_else(|e| panic!("{} {}: {e}", spec.name, pass.name));
        let error = compare(&graph, &format!("after {}", pass.name));
        if error.0 > worst.0 {
            worst = error;
        }
    }
    worst
}

fn assert_matches_reference(spec: &AttentionSpec, batch: usize, seq_len: usize, seed: u64) {
    let case = Case {
        graph_spec: spec,
        reference_spec: spec,
        batch,
        seq_len,
        seed,
    };
    let (error, stage) = worst_error(&case);
    assert!(
        error <= TOLERANCE,
        "{} (B={batch}, S={seq_len}, seed {seed}): {stage} differs from the reference by {error:e} \
         (relative L2)\n{spec:?}",
        spec.name
    );
}

#[test]
fn every_example_matches_the_reference_after_every_pass() {
    // The examples are full-size layers (E = 2048): B = 2, S = 17 takes ~12 s in release but
    // minutes unoptimised, so a debug `cargo test` runs one short sequence (still longer than
    // the convolution history, so the halo and the shifted values are exercised).
    let (batch, seq_len) = if cfg!(debug_assertions) {
        (1, 5)
    } else {
        (2, 17)
    };
    for (index, spec) in example_files().iter().enumerate() {
        assert_matches_reference(spec, batch, seq_len, 100 + index as u64);
    }
}

#[test]
fn random_specs_match_the_reference_after_every_pass() {
    let mut rng = SplitMix64(0x6EF_CCA1);
    let cases = 220;
    // Which features the cases exercised, so a generator change cannot silently drop one.
    let mut seen = std::collections::BTreeSet::new();
    for index in 0..cases {
        let spec = random_small_spec(&mut rng, index, &SMALL_SPECS);
        spec.validate()
            .unwrap_or_else(|e| panic!("the generator made an invalid spec: {e}\n{spec:?}"));
        let batch = 1 + rng.below(2);
        let seq_len = rng.pick(&[1, 2, 5, 17, 33]);
        assert_matches_reference(&spec, batch, seq_len, rng.next());
        seen.extend(features(&spec, batch, seq_len));
    }
    let wanted = [
        "B=1",
        "B=2",
        "S=1",
        "S=2",
        "S=5",
        "S=17",
        "S=33",
        "d=2",
        "d=4",
        "d=8",
        "d=16",
        "gqa",
        "mqa",
        "mha",
        "depthwise",
        "per_head",
        "3 stages",
        "width 1",
        "width 4",
        "qk_mean",
        "value_shift 0",
        "value_shift partial",
        "value_shift all",
        "temperature none",
        "temperature learned",
        "temperature learned_exp",
        "rope neox",
        "rope interleaved",
        "rope partial",
        "mask none",
        "mask causal",
        "window 1",
        "window 3",
        "window 7",
        "bias",
        "bf16",
        "f16",
    ];
    let missing: Vec<_> = wanted.iter().filter(|f| !seen.contains(**f)).collect();
    assert!(missing.is_empty(), "no random case had {missing:?}");
}

/// The features of one random case, named as `random_specs_match_the_reference_after_every_pass`
/// requires them.
fn features(spec: &AttentionSpec, batch: usize, seq_len: usize) -> Vec<String> {
    let mut features = vec![
        format!("B={batch}"),
        format!("S={seq_len}"),
        format!("d={}", spec.head_dim),
        format!("{} stages", spec.qk_conv.len()),
        format!(
            "temperature {}",
            match spec.key_temperature {
                KeyTemperature::None => "none",
                KeyTemperature::Learned => "learned",
                KeyTemperature::LearnedExp => "learned_exp",
            }
        ),
        match spec.mask {
            Mask::None => "mask none".to_string(),
            Mask::Causal => "mask causal".to_string(),
            Mask::SlidingWindow { window } => format!("window {window}"),
        },
        match spec.dtype {
            DType::Bf16 => "bf16".to_string(),
            DType::F16 => "f16".to_string(),
        },
    ];
    features.push(match (spec.kv_heads, spec.query_heads) {
        (1, hq) if hq > 1 => "mqa".to_string(),
        (hk, hq) if hk == hq => "mha".to_string(),
        _ => "gqa".to_string(),
    });
    for stage in &spec.qk_conv {
        features.push(format!("width {}", stage.width));
        features.push(match stage.kind {
            ConvKind::Depthwise => "depthwise".to_string(),
            ConvKind::PerHead => "per_head".to_string(),
        });
    }
    features.push(match spec.value_shift {
        0 => "value_shift 0".to_string(),
        s if s == spec.kv_heads => "value_shift all".to_string(),
        _ => "value_shift partial".to_string(),
    });
    if let Some(rope) = spec.rope {
        features.push(match rope.style {
            RopeStyle::Neox => "rope neox".to_string(),
            RopeStyle::Interleaved => "rope interleaved".to_string(),
        });
        if rope.rotary_dim < spec.head_dim {
            features.push("rope partial".to_string());
        }
    }
    if spec.qk_mean {
        features.push("qk_mean".to_string());
    }
    if spec.bias {
        features.push("bias".to_string());
    }
    features
}

/// The comparison can fail: a reference told a different mask, RoPE or key temperature than the
/// graph was built from (same parameters, so both still run) must be far off.
#[test]
fn a_wrong_spec_on_one_side_is_caught() {
    let spec = AttentionSpec {
        qk_conv: vec![ConvStage {
            kind: ConvKind::Depthwise,
            width: 2,
        }],
        qk_mean: true,
        value_shift: 1,
        qk_norm: QkNorm::L2,
        key_temperature: KeyTemperature::Learned,
        ..AttentionSpec::plain("control", 16, 4, 4, 2)
    };
    let wrong_specs = [
        (
            "mask",
            AttentionSpec {
                mask: Mask::SlidingWindow { window: 3 },
                ..spec.clone()
            },
        ),
        (
            "rope",
            AttentionSpec {
                rope: Some(Rope {
                    fraction: 1.0,
                    rotary_dim: 4,
                    theta: 10.0,
                    style: RopeStyle::Neox,
                    yarn: None,
                }),
                ..spec.clone()
            },
        ),
        (
            "key_temperature",
            AttentionSpec {
                key_temperature: KeyTemperature::LearnedExp,
                ..spec.clone()
            },
        ),
    ];
    for (field, wrong) in &wrong_specs {
        let case = Case {
            graph_spec: &spec,
            reference_spec: wrong,
            batch: 2,
            seq_len: 9,
            seed: 7,
        };
        let (error, stage) = worst_error(&case);
        assert!(
            error > 1e-3,
            "a wrong {field} went unnoticed: {stage} differs by only {error:e}"
        );
    }
}
