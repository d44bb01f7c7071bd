//! The MLA reference (`reference::mla_forward`, `reference::mla_decode`): against Hugging Face's
//! `DeepseekV3Attention` (float64 fixtures from scripts/hf-mla-fixture.py), the absorbed decode
//! against the forward it reassociates, one token worked by hand, and `explain`'s accounting of
//! DeepSeek-V3's layer.

use ccc::AttentionSpec;
use ccc::frontend::parse_and_check;
use ccc::reference::{Tensor, Weights, mla_decode, mla_forward, random_input};
use ccc::spec::{Mask, RopeStyle};

/// ‖a − b‖ / ‖b‖.
fn relative(a: &[f64], b: &[f64]) -> f64 {
    let difference: f64 = a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum();
    (difference / b.iter().map(|y| y * y).sum::<f64>()).sqrt()
}

fn spec(source: &str) -> AttentionSpec {
    parse_and_check("test.attn", source).unwrap_or_else(|d| panic!("{}", d.render())).remove(0)
}

/// A small MLA layer: 4 heads, q/k width 24 (16 + 8), v width 12, latents of 20 and 16.
fn small(q_rank: &str, bias: bool, mask: &str, style: &str) -> AttentionSpec {
    spec(&format!(
        "attention small {{
            model_dim = 32
            query_heads = 4
            mla {{ kv_rank = 20, q_rank = {q_rank}, rope_dim = 8, nope_dim = 16, v_dim = 12 }}
            rope {{ theta = 100, style = {style} }}
            mask = {mask}
            bias = {bias}
        }}"
    ))
}

fn tensor(value: &serde_json::Value) -> Tensor {
    let shape = value["shape"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap() as usize).collect();
    let data = value["data"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    Tensor::new(shape, data).unwrap()
}

/// HF's RMSNorm runs in float32 even on float64 inputs: its output carries float32 rounding.
const HF_TOLERANCE: f64 = 1e-6;

#[test]
fn the_forward_matches_hugging_faces_deepseek_v3_attention() {
    let directory = format!("{}/tests/fixtures/mla_hf", env!("CARGO_MANIFEST_DIR"));
    let mut files: Vec<_> = std::fs::read_dir(&directory).unwrap().map(|entry| entry.unwrap().path()).collect();
    files.sort();
    assert_eq!(files.len(), 3, "{directory}");
    for path in files {
        let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let spec = spec(fixture["source"].as_str().unwrap());
        // Every tensor under HF's name and shape, and nothing else (Weights::check).
        let weights = Weights {
            tensors: fixture["weights"].as_object().unwrap().iter().map(|(name, t)| (name.clone(), tensor(t))).collect(),
        };
        let out = mla_forward(&spec, &weights, &tensor(&fixture["x"])).unwrap().out;
        let expected = tensor(&fixture["out"]);
        assert_eq!(out.shape, expected.shape);
        let error = relative(&out.data, &expected.data);
        assert!(error < HF_TOLERANCE, "{}: {error:e}", path.display());
        // The same weights with the rotation's style flipped are far off: the fixture pins it.
        let mut flipped = spec.clone();
        let rope = flipped.rope.as_mut().unwrap();
        rope.style = if rope.style == RopeStyle::Neox { RopeStyle::Interleaved } else { RopeStyle::Neox };
        let wrong = mla_forward(&flipped, &weights, &tensor(&fixture["x"])).unwrap().out;
        assert!(relative(&wrong.data, &expected.data) > 1e3 * HF_TOLERANCE, "{}", path.display());
    }
}

#[test]
fn absorbed_decode_equals_the_forward() {
    for (q_rank, bias, mask, style) in [
        ("16", false, "causal", "interleaved"),
        ("none", true, "causal", "neox"),
        ("16", true, "sliding_window(3)", "neox"),
    ] {
        let spec = small(q_rank, bias, mask, style);
        let weights = Weights::random(&spec, 7);
        let x = random_input(&spec, 2, 9, 11);
        let forward = mla_forward(&spec, &weights, &x).unwrap();
        let decoded = mla_decode(&spec, &weights, &x).unwrap();
        let error = relative(&decoded.data, &forward.out.data);
        assert!(error < 1e-12, "q_rank {q_rank}, bias {bias}, {mask}, {style}: {error:e}");
    }
}

#[test]
fn the_mask_and_the_rotation_change_the_output() {
    let causal = small("16", false, "causal", "interleaved");
    let weights = Weights::random(&causal, 3);
    let x = random_input(&causal, 1, 6, 5);
    let out = |spec: &AttentionSpec| mla_forward(spec, &weights, &x).unwrap().out.data;
    let reference = out(&causal);
    let window = AttentionSpec { mask: Mask::SlidingWindow { window: 2 }, ..causal.clone() };
    let mut neox = causal.clone();
    neox.rope.as_mut().unwrap().style = RopeStyle::Neox;
    for (what, other) in [("window", window), ("neox", neox)] {
        let difference = relative(&out(&other), &reference);
        assert!(difference > 1e-3, "{what}: {difference:e}");
    }
    // Row 0 sees only itself under every mask: the same in all three.
    let e = causal.model_dim;
    assert!(relative(&out(&AttentionSpec { mask: Mask::SlidingWindow { window: 2 }, ..causal.clone() })[..e], &reference[..e]) < 1e-14);
}

/// One token sees only itself: out = W_o·(W_uv_h·c_kv per head) + b, with
/// c_kv = w ⊙ a / sqrt(mean(a²) + eps), whatever the queries and keys are.
#[test]
fn a_single_token_is_its_own_value_through_the_latent() {
    let spec = small("16", true, "causal", "interleaved");
    let mla = spec.mla.unwrap();
    let weights = Weights::random(&spec, 1);
    let x = random_input(&spec, 1, 1, 2);
    let w = |name: &str| weights.tensors[name].data.clone();
    let (e, h) = (spec.model_dim, spec.query_heads);
    let linear = |weight: &[f64], bias: Option<&[f64]>, input: &[f64]| -> Vec<f64> {
        weight.chunks(input.len()).enumerate().map(|(i, row)| {
            row.iter().zip(input).map(|(a, b)| a * b).sum::<f64>() + bias.map_or(0.0, |b| b[i])
        }).collect()
    };
    let down = linear(&w("kv_a_proj_with_mqa.weight"), Some(&w("kv_a_proj_with_mqa.bias")), &x.data);
    let a = &down[..mla.kv_rank];
    let rms = (a.iter().map(|v| v * v).sum::<f64>() / a.len() as f64 + mla.rms_eps).sqrt();
    let c_kv: Vec<f64> = a.iter().zip(w("kv_a_layernorm.weight")).map(|(v, g)| g * v / rms).collect();
    let up = linear(&w("kv_b_proj.weight"), None, &c_kv);
    let o: Vec<f64> = (0..h).flat_map(|head| up[head * (mla.nope_dim + mla.v_dim) + mla.nope_dim..][..mla.v_dim].to_vec()).collect();
    let expected = linear(&w("o_proj.weight"), Some(&w("o_proj.bias")), &o);
    let got = mla_forward(&spec, &weights, &x).unwrap();
    assert_eq!(got.out.shape, vec![1, 1, e]);
    assert!(relative(&got.out.data, &expected) < 1e-13);
}

#[test]
fn explain_counts_deepseek_v3s_cache_and_parameters() {
    let dsv3 = spec(
        "attention dsv3 {
            model_dim = 7168
            query_heads = 128
            mla { kv_rank = 512, q_rank = 1536, rope_dim = 64, nope_dim = 128, v_dim = 128 }
            rope { theta = 10000, style = interleaved }
        }",
    );
    let costs = ccc::explain::LayerCosts::of(&dsv3, 4096);
    // DeepSeek-V2's accounting: (d_c + d_h^R) = 576 values per token against MHA's 2·n_h·d_h.
    assert_eq!(costs.kv_cache_bytes_per_token, 576 * 2);
    let mha = ccc::explain::LayerCosts::of(&dsv3.equivalent_mha(), 4096);
    assert_eq!(mha.kv_cache_bytes_per_token, 2 * 128 * 128 * 2);
    assert_eq!(costs.parameters, 7168 * 1536 + 1536 + 1536 * 128 * 192 + 7168 * 576 + 512 + 512 * 128 * 256 + 7168 * 128 * 128);
    let text = ccc::explain::explain_text(&dsv3, 4096);
    assert!(text.contains("c_kv + k_pe = 512 + 64 = 576 values per token"), "{text}");
}
