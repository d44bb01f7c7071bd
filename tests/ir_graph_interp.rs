//! The graph interpreter before and after every pass, on random small specs, against a
//! straightforward per-token evaluation of language.md's Semantics written here.

use ccc::ir::graph::interp::{self, Array};
use ccc::ir::graph::{self, Graph, GraphOutput, OpKind, OutputKind};
use ccc::ir::passes::pipeline;
use ccc::ir::size::SizeEnv;
use ccc::spec::{
    AttentionSpec, ConvKind, ConvStage, EntryPoint, KeyTemperature, Mask, QkNorm, Rope, RopeStyle,
};
use std::collections::BTreeMap;

mod common;
use common::rng::SplitMix64;
use common::specs::{SmallSpecChoices, random_small_spec, zaya1_like};

struct Case {
    spec: AttentionSpec,
    batch: usize,
    seq_len: usize,
    x: Array,
    weights: BTreeMap<String, Array>,
}

/// Heads of width 2..8 and windows of 1..6 tokens.
const SMALL_SPECS: SmallSpecChoices = SmallSpecChoices {
    head_dims: &[2, 4, 8],
    windows: &[1, 2, 3, 4, 5, 6],
    random_dtype: false,
};

fn random_array(rng: &mut SplitMix64, shape: Vec<usize>, low: f64, high: f64) -> Array {
    let len = shape.iter().product();
    Array {
        shape,
        data: (0..len).map(|_| rng.uniform(low, high)).collect(),
    }
}

fn random_weights(rng: &mut SplitMix64, spec: &AttentionSpec) -> BTreeMap<String, Array> {
    spec.params()
        .into_iter()
        .map(|p| {
            // Keep activations O(1): scale a matrix by its fan-in; temperatures span the
            // learned_exp clamp at both ends.
            let fan_in: usize = p.shape.iter().skip(1).product::<usize>().max(1);
            let bound = 1.0 / (fan_in as f64).sqrt();
            let array = if p.name == "qk_norm.temp" {
                random_array(rng, p.shape, -0.5, 2.5)
            } else {
                random_array(rng, p.shape, -bound, bound)
            };
            (p.name, array)
        })
        .collect()
}

fn random_case(rng: &mut SplitMix64, index: usize) -> Case {
    let spec = random_small_spec(rng, index, &SMALL_SPECS);
    spec.validate().expect("the generator makes valid specs");
    let batch = 1 + rng.below(2);
    let seq_len = rng.pick(&[1, 2, 5, 17, 33]);
    let x = random_array(rng, vec![batch, seq_len, spec.model_dim], -1.0, 1.0);
    let weights = random_weights(rng, &spec);
    Case {
        spec,
        batch,
        seq_len,
        x,
        weights,
    }
}

fn run_graph(graph: &Graph, case: &Case) -> BTreeMap<String, Array> {
    let env = SizeEnv {
        batch: case.batch as u64,
        seq_len: case.seq_len as u64,
        sms: None,
        pages: None,
        blocks: None,
    };
    let inputs = BTreeMap::from([("x".to_string(), case.x.clone())]);
    interp::run(graph, env, &inputs, &case.weights)
        .unwrap_or_else(|e| panic!("{}: {e}\n{graph}", case.spec.name))
}

/// max |a − b| over the tensor, relative to max |a|.
fn relative_error(a: &Array, b: &Array) -> f64 {
    assert_eq!(a.shape, b.shape);
    let scale = a
        .data
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    let diff = a
        .data
        .iter()
        .zip(&b.data)
        .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
    diff / scale
}

fn assert_outputs_close(
    want: &BTreeMap<String, Array>,
    have: &BTreeMap<String, Array>,
    tolerance: f64,
    what: &str,
) {
    assert_eq!(
        want.keys().collect::<Vec<_>>(),
        have.keys().collect::<Vec<_>>(),
        "{what}"
    );
    for (name, array) in want {
        let error = relative_error(array, &have[name]);
        assert!(
            error <= tolerance,
            "{what}: {name} differs by {error:e} (relative)"
        );
    }
}

#[test]
fn every_pass_preserves_the_result_on_random_specs() {
    let mut rng = SplitMix64(0x5EED_CCA0);
    let cases = 240;
    for index in 0..cases {
        let case = random_case(&mut rng, index);
        let mut graph = graph::build(&case.spec, EntryPoint::Forward).unwrap();
        graph.verify().unwrap();
        let before = run_graph(&graph, &case);
        for pass in pipeline() {
            pass.apply(&mut graph)
                .unwrap_or_else(|e| panic!("{:?}: {e}", case.spec));
            graph
                .verify()
                .unwrap_or_else(|e| panic!("after {}: {e}\n{graph}", pass.name));
            let after = run_graph(&graph, &case);
            assert_outputs_close(
                &before,
                &after,
                1e-12,
                &format!("{} after {}", case.spec.name, pass.name),
            );
        }
        // The passes and the kernel builders agree on which kernels the spec launches.
        let roles: Vec<&str> = graph.groups.iter().map(|g| g.role.symbol_suffix()).collect();
        let launched: Vec<&str> = ccc::ir::kernel::ForwardKernel::launched_by(&case.spec)
            .into_iter()
            .map(|k| k.suffix())
            .collect();
        assert_eq!(roles, launched, "{}", case.spec.name);
        let per_token = per_token_forward(&case);
        assert_outputs_close(
            &per_token,
            &before,
            1e-10,
            &format!("{} vs per-token", case.spec.name),
        );
    }
}

#[test]
fn tiny_zaya_like_layer_matches_the_per_token_evaluation() {
    let spec = zaya1_like("tiny_zaya", 16, 4, 4, 2);
    check_against_per_token(spec, 2, 7, 11);
}

#[test]
fn tiny_sliding_window_gqa_with_bias_matches_the_per_token_evaluation() {
    let spec = AttentionSpec {
        mask: Mask::SlidingWindow { window: 3 },
        bias: true,
        rope: Some(Rope {
            fraction: 1.0,
            rotary_dim: 4,
            theta: 1e4,
            style: RopeStyle::Interleaved,
            yarn: None,
        }),
        ..AttentionSpec::plain("tiny_swa", 12, 4, 3, 1)
    };
    check_against_per_token(spec, 1, 9, 12);
}

fn check_against_per_token(spec: AttentionSpec, batch: usize, seq_len: usize, seed: u64) {
    let mut rng = SplitMix64(seed);
    let x = random_array(&mut rng, vec![batch, seq_len, spec.model_dim], -1.0, 1.0);
    let weights = random_weights(&mut rng, &spec);
    let case = Case {
        spec,
        batch,
        seq_len,
        x,
        weights,
    };
    let mut graph = graph::build(&case.spec, EntryPoint::Forward).unwrap();
    for pass in pipeline() {
        pass.apply(&mut graph).unwrap();
    }
    assert_outputs_close(
        &per_token_forward(&case),
        &run_graph(&graph, &case),
        1e-12,
        &case.spec.name,
    );
}

/// Padding once with T rows is not padding each stage: the first stage's bias reaches row 0 of
/// the second (the exactness pitfall of docs/language.md, Semantics step 3). With zero projections, row 0 of two width-2
/// depthwise stages is b2 + (w2[0] + w2[1])·b1, not b2 + w2[1]·b1.
#[test]
fn first_stage_bias_reaches_row_zero_of_the_next_stage() {
    let spec = AttentionSpec {
        qk_conv: vec![
            ConvStage {
                kind: ConvKind::Depthwise,
                width: 2,
            },
            ConvStage {
                kind: ConvKind::Depthwise,
                width: 2,
            },
        ],
        ..AttentionSpec::plain("pad_once", 2, 2, 1, 1)
    };
    let mut graph = graph::build(&spec, EntryPoint::Forward).unwrap();
    let split = graph
        .ops
        .iter()
        .position(|op| matches!(op.kind, OpKind::Split { .. }))
        .unwrap();
    let conv_out = graph.ops[split].operands[0];
    graph.outputs.push(GraphOutput {
        name: "conv".into(),
        value: conv_out,
        kind: OutputKind::Result,
    });
    let param = |shape: Vec<usize>, data: Vec<f64>| Array { shape, data };
    let mut weights = BTreeMap::new();
    for name in [
        "qkv_proj.q_proj.weight",
        "qkv_proj.k_proj.weight",
        "qkv_proj.v_proj.weight",
        "o_proj.weight",
    ] {
        weights.insert(name.to_string(), param(vec![2, 2], vec![0.0; 4]));
    }
    // Channel 0 only matters; channels 1..4 get the same filters.
    weights.insert(
        "qkv_proj.conv_qk_depthwise.weight".into(),
        param(vec![4, 1, 2], [0.5, 2.0].repeat(4)),
    );
    weights.insert(
        "qkv_proj.conv_qk_depthwise.bias".into(),
        param(vec![4], vec![3.0; 4]),
    );
    weights.insert(
        "qkv_proj.conv_qk_depthwise_1.weight".into(),
        param(vec![4, 1, 2], [5.0, 7.0].repeat(4)),
    );
    weights.insert(
        "qkv_proj.conv_qk_depthwise_1.bias".into(),
        param(vec![4], vec![11.0; 4]),
    );
    let case = Case {
        spec,
        batch: 1,
        seq_len: 2,
        x: param(vec![1, 2, 2], vec![1.0, 2.0, 3.0, 4.0]),
        weights,
    };
    let conv = &run_graph(&graph, &case)["conv"];
    // Stage 1 gives m = b1 + 0 = 3 at every position (P0 is zero); row 0 of stage 2 sees
    // m[−1] = 3 (not a zero pad) and m[0] = 3: 11 + 5·3 + 7·3 = 47.
    assert_eq!(conv.shape, [1, 2, 4]);
    assert_eq!(conv.data[0], 47.0);
    assert_eq!(conv.data[4], 47.0);
}

/// One sequence at a time, one token at a time, straight from language.md's Semantics.
/// Returns the graph's outputs: `out` [B, S, E] and `lse` [B, Hq, S].
fn per_token_forward(case: &Case) -> BTreeMap<String, Array> {
    let spec = &case.spec;
    let (e, d, hq, hk, s_len) = (
        spec.model_dim,
        spec.head_dim,
        spec.query_heads,
        spec.kv_heads,
        case.seq_len,
    );
    let g = spec.groups();
    // Hugging Face names: ZayaAttention keeps q/k/v and the convolutions under `qkv_proj.`.
    let full_name = |name: &str| {
        let own = name.starts_with("o_proj") || name.starts_with("qk_norm");
        if spec.has_cca_parts() && !own { format!("qkv_proj.{name}") } else { name.to_string() }
    };
    let w = |name: &str| &case.weights[&full_name(name)];
    let bias = |name: &str| spec.bias.then(|| w(name));
    // y = W·x + b for one token.
    let project = |weight: &Array, b: Option<&Array>, x: &[f64]| -> Vec<f64> {
        (0..weight.shape[0])
            .map(|o| {
                let row = &weight.data[o * weight.shape[1]..(o + 1) * weight.shape[1]];
                row.iter().zip(x).map(|(a, c)| a * c).sum::<f64>() + b.map_or(0.0, |b| b.data[o])
            })
            .collect()
    };
    let mut out = Array::zeros(vec![case.batch, s_len, e]);
    let mut lse = Array::zeros(vec![case.batch, hq, s_len]);
    for b in 0..case.batch {
        let x_at = |t: usize| &case.x.data[(b * s_len + t) * e..(b * s_len + t + 1) * e];
        let zero_x = vec![0.0; e];
        let mut q0 = Vec::new();
        let mut k0 = Vec::new();
        let mut v = Vec::new();
        for t in 0..s_len {
            q0.push(project(w("q_proj.weight"), bias("q_proj.bias"), x_at(t)));
            k0.push(project(w("k_proj.weight"), bias("k_proj.bias"), x_at(t)));
            let s = spec.value_shift;
            let mut value = Vec::new();
            if s == 0 {
                value = project(w("v_proj.weight"), bias("v_proj.bias"), x_at(t));
            } else {
                if s < hk {
                    value = project(
                        w("v_proj_current.weight"),
                        bias("v_proj_current.bias"),
                        x_at(t),
                    );
                }
                let previous = if t == 0 { &zero_x[..] } else { x_at(t - 1) };
                value.extend(project(
                    w("v_proj_delayed.weight"),
                    bias("v_proj_delayed.bias"),
                    previous,
                ));
            }
            v.push(value);
        }
        // Convolutions by absolute position: level 0 is P0 with zero rows before position 0;
        // each stage's output at position p reads its input at p − K + 1 ..= p.
        let history = spec.conv_history() as i64;
        let p_width = spec.packed_width();
        let mut level: BTreeMap<i64, Vec<f64>> = (-history..s_len as i64)
            .map(|p| {
                let row = if p < 0 {
                    vec![0.0; p_width]
                } else {
                    [q0[p as usize].clone(), k0[p as usize].clone()].concat()
                };
                (p, row)
            })
            .collect();
        let mut first = -history;
        for (stage, name) in spec.qk_conv.iter().zip(spec.conv_stage_names()) {
            let k = stage.width as i64;
            let weight = w(&format!("{name}.weight"));
            let conv_bias = w(&format!("{name}.bias"));
            let per_group = match stage.kind {
                ConvKind::Depthwise => 1,
                ConvKind::PerHead => d,
            };
            first += k - 1;
            level = (first..s_len as i64)
                .map(|p| {
                    let row = (0..p_width)
                        .map(|c| {
                            let group_start = c / per_group * per_group;
                            let mut acc = conv_bias.data[c];
                            for tap in 0..k {
                                let input = &level[&(p - k + 1 + tap)];
                                for i in 0..per_group {
                                    let index = (c * per_group + i) * stage.width + tap as usize;
                                    acc += weight.data[index] * input[group_start + i];
                                }
                            }
                            acc
                        })
                        .collect();
                    (p, row)
                })
                .collect();
        }
        // Per token: q-k mean, norm, temperature, RoPE.
        let mut q_final = Vec::new();
        let mut k_final = Vec::new();
        for t in 0..s_len {
            let y = &level[&(t as i64)];
            let mut q_heads: Vec<Vec<f64>> =
                (0..hq).map(|h| y[h * d..(h + 1) * d].to_vec()).collect();
            let mut k_heads: Vec<Vec<f64>> = (0..hk)
                .map(|j| y[hq * d + j * d..hq * d + (j + 1) * d].to_vec())
                .collect();
            if spec.qk_mean {
                for h in 0..hq {
                    for c in 0..d {
                        q_heads[h][c] += 0.5 * q0[t][h * d + c] + 0.5 * k0[t][(h / g) * d + c];
                    }
                }
                for j in 0..hk {
                    for c in 0..d {
                        let mean =
                            (0..g).map(|i| q0[t][(j * g + i) * d + c]).sum::<f64>() / g as f64;
                        k_heads[j][c] += 0.5 * k0[t][j * d + c] + 0.5 * mean;
                    }
                }
            }
            if spec.qk_norm == QkNorm::L2 {
                let normalise = |head: &mut Vec<f64>, tau: f64| {
                    let norm2: f64 = head.iter().map(|v| v * v).sum();
                    let factor = (d as f64).sqrt() * tau / (norm2 + spec.norm_eps).sqrt();
                    head.iter_mut().for_each(|v| *v *= factor);
                };
                q_heads.iter_mut().for_each(|head| normalise(head, 1.0));
                for (j, head) in k_heads.iter_mut().enumerate() {
                    let tau = match spec.key_temperature {
                        KeyTemperature::None => 1.0,
                        KeyTemperature::Learned => w("qk_norm.temp").data[j],
                        KeyTemperature::LearnedExp => {
                            w("qk_norm.temp").data[j].clamp(1e-7, 2.0).exp()
                        }
                    };
                    normalise(head, tau);
                }
            }
            if let Some(rope) = spec.rope {
                let r = rope.rotary_dim;
                let rotate = |head: &mut Vec<f64>| {
                    let original = head.clone();
                    for i in 0..r / 2 {
                        let angle = t as f64 / rope.theta.powf(2.0 * i as f64 / r as f64);
                        let (a, c) = match rope.style {
                            RopeStyle::Neox => (i, i + r / 2),
                            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
                        };
                        head[a] = original[a] * angle.cos() - original[c] * angle.sin();
                        head[c] = original[c] * angle.cos() + original[a] * angle.sin();
                    }
                };
                q_heads.iter_mut().for_each(rotate);
                k_heads.iter_mut().for_each(rotate);
            }
            q_final.push(q_heads);
            k_final.push(k_heads);
        }
        // Attention, then the output projection, token by token.
        for t in 0..s_len {
            let mut o = vec![0.0; hq * d];
            for h in 0..hq {
                let j = h / g;
                let seen: Vec<usize> = (0..s_len).filter(|&u| spec.mask.allows(t, u)).collect();
                let logits: Vec<f64> = seen
                    .iter()
                    .map(|&u| {
                        spec.softmax_scale
                            * q_final[t][h]
                                .iter()
                                .zip(&k_final[u][j])
                                .map(|(a, c)| a * c)
                                .sum::<f64>()
                    })
                    .collect();
                let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let denominator: f64 = logits.iter().map(|l| (l - max).exp()).sum();
                for (&u, l) in seen.iter().zip(&logits) {
                    for c in 0..d {
                        o[h * d + c] += (l - max).exp() / denominator * v[u][j * d + c];
                    }
                }
                lse.data[(b * hq + h) * s_len + t] = max + denominator.ln();
            }
            let row = project(w("o_proj.weight"), bias("o_proj.bias"), &o);
            out.data[(b * s_len + t) * e..(b * s_len + t + 1) * e].copy_from_slice(&row);
        }
    }
    BTreeMap::from([("out".to_string(), out), ("lse".to_string(), lse)])
}

#[test]
fn interpreter_reports_bad_inputs_instead_of_panicking() {
    let spec = AttentionSpec::plain("small", 8, 4, 2, 1);
    let graph = graph::build(&spec, EntryPoint::Forward).unwrap();
    let mut rng = SplitMix64(3);
    let mut weights = random_weights(&mut rng, &spec);
    let env = SizeEnv {
        batch: 1,
        seq_len: 3,
        sms: None,
        pages: None,
        blocks: None,
    };
    let x = random_array(&mut rng, vec![1, 3, 8], -1.0, 1.0);
    let inputs = BTreeMap::from([("x".to_string(), x)]);
    interp::run(&graph, env, &inputs, &weights).unwrap();

    let short = SizeEnv {
        batch: 1,
        seq_len: 2,
        sms: None,
        pages: None,
        blocks: None,
    };
    let err = interp::run(&graph, short, &inputs, &weights).unwrap_err();
    assert_eq!(
        err.to_string(),
        "graph interpreter: op 0 (input) made %0 with shape [1, 3, 8], its type says [1, 2, 8]"
    );

    weights.remove("k_proj.weight");
    let err = interp::run(&graph, env, &inputs, &weights).unwrap_err();
    assert_eq!(
        err.to_string(),
        "graph interpreter: parameter k_proj.weight is missing"
    );
}
