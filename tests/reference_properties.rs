//! Properties of the reference that hold for any weights: agreement with textbook attention,
//! head symmetry, causality, batch independence.

mod common;

// Inside `mod reference` so that `cargo test reference` selects these tests.
mod reference {
    use ccc::reference::{ForwardOutputs, Tensor, Weights, forward, max_abs_diff, random_input};
    use crate::common::specs::small_zaya_like;
    use ccc::spec::{AttentionSpec, Mask, ParamRole, Rope, RopeStyle};

    /// softmax(Q·Kᵀ·scale + mask)·V per head, GQA by h / G, then o_proj: written the textbook way
    /// with nested vectors, sharing nothing with the reference. Returns (out [S][E], lse [h][t]).
    fn textbook_attention(
        spec: &AttentionSpec,
        w: &Weights,
        x: &[Vec<f64>],
    ) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
        let (d, hq, hk) = (spec.head_dim, spec.query_heads, spec.kv_heads);
        let linear = |name: &str, x: &[f64]| -> Vec<f64> {
            let weight = &w.tensors[&format!("{name}.weight")];
            let (rows, cols) = (weight.shape[0], weight.shape[1]);
            let bias = w.tensors.get(&format!("{name}.bias"));
            (0..rows)
                .map(|r| {
                    let dot: f64 = (0..cols).map(|c| weight.data[r * cols + c] * x[c]).sum();
                    dot + bias.map_or(0.0, |b| b.data[r])
                })
                .collect()
        };
        let q: Vec<Vec<f64>> = x.iter().map(|row| linear("q_proj", row)).collect();
        let k: Vec<Vec<f64>> = x.iter().map(|row| linear("k_proj", row)).collect();
        let v: Vec<Vec<f64>> = x.iter().map(|row| linear("v_proj", row)).collect();
        let seq_len = x.len();
        let mut o = vec![vec![0.0; hq * d]; seq_len];
        let mut lse = vec![vec![0.0; seq_len]; hq];
        for h in 0..hq {
            let g = h / (hq / hk);
            for t in 0..seq_len {
                let visible: Vec<usize> =
                    (0..seq_len).filter(|&j| spec.mask.allows(t, j)).collect();
                let scores: Vec<f64> = visible
                    .iter()
                    .map(|&j| {
                        (0..d).map(|c| q[t][h * d + c] * k[j][g * d + c]).sum::<f64>()
                            * spec.softmax_scale
                    })
                    .collect();
                let total: f64 = scores.iter().map(|s| s.exp()).sum();
                lse[h][t] = total.ln();
                for (&j, s) in visible.iter().zip(&scores) {
                    for c in 0..d {
                        o[t][h * d + c] += s.exp() / total * v[j][g * d + c];
                    }
                }
            }
        }
        (o.iter().map(|row| linear("o_proj", row)).collect(), lse)
    }

    #[test]
    fn a_layer_without_cca_parts_is_textbook_attention() {
        // 70 tokens make the reference split rows over threads (32 rows per thread at least).
        for (mask, bias, seq_len) in [
            (Mask::Causal, true, 9),
            (Mask::None, false, 9),
            (Mask::SlidingWindow { window: 3 }, true, 9),
            (Mask::Causal, false, 70),
        ] {
            let spec = AttentionSpec { mask, bias, ..AttentionSpec::plain("plain", 12, 3, 4, 2) };
            let weights = Weights::random(&spec, 11);
            let x = random_input(&spec, 1, seq_len, 12);
            let rows: Vec<Vec<f64>> = x.data.chunks(12).map(|r| r.to_vec()).collect();
            let (out, lse) = textbook_attention(&spec, &weights, &rows);
            let outputs = forward(&spec, &weights, &x).unwrap();
            let expected_out = Tensor::new(vec![1, seq_len, 12], out.concat()).unwrap();
            let expected_lse = Tensor::new(vec![1, 4, seq_len], lse.concat()).unwrap();
            assert!(max_abs_diff(&outputs.out, &expected_out).unwrap() < 1e-13, "{mask:?}");
            assert!(max_abs_diff(&outputs.lse, &expected_lse).unwrap() < 1e-13, "{mask:?}");
        }
    }

    /// The weights of `multi` (Hq = Hk = H) that give every head the weights of the one head of
    /// `single`: projections stacked H times, convolution channels repeated per head in the
    /// [q heads | k heads] order, o_proj's input blocks repeated.
    fn repeat_heads(single: &AttentionSpec, w: &Weights, multi: &AttentionSpec) -> Weights {
        let heads = multi.query_heads;
        let mut tensors = std::collections::BTreeMap::new();
        for param in multi.params() {
            let source = &w.tensors[&param.name].data;
            let data: Vec<f64> = match param.role {
                ParamRole::OutputProj => {
                    source.chunks(single.head_dim).flat_map(|row| row.repeat(heads)).collect()
                }
                ParamRole::OutputBias => source.clone(),
                ParamRole::ConvWeight { .. } | ParamRole::ConvBias { .. } => {
                    let (q_part, k_part) = source.split_at(source.len() / 2);
                    [q_part.repeat(heads), k_part.repeat(heads)].concat()
                }
                _ => source.repeat(heads),
            };
            tensors.insert(param.name, Tensor::new(param.shape, data).unwrap());
        }
        Weights { tensors }
    }

    #[test]
    fn heads_with_identical_weights_each_compute_the_single_head_layer() {
        let heads = 3;
        // Value shift would make the heads differ, so it is off; everything else of small_zaya_like is on.
        let single = AttentionSpec {
            model_dim: 16,
            head_dim: 4,
            query_heads: 1,
            kv_heads: 1,
            value_shift: 0,
            rope: Some(Rope {
                fraction: 0.5,
                rotary_dim: 2,
                theta: 10_000.0,
                style: RopeStyle::Neox,
                yarn: None,
            }),
            ..small_zaya_like("zaya_like")
        };
        let multi = AttentionSpec { query_heads: heads, kv_heads: heads, ..single.clone() };
        let weights = Weights::random(&single, 21);
        let x = random_input(&single, 2, 10, 22);
        let one = forward(&single, &weights, &x).unwrap();
        let many = forward(&multi, &repeat_heads(&single, &weights, &multi), &x).unwrap();
        for h in 0..heads {
            for (b, t, c) in
                (0..2).flat_map(|b| (0..10).flat_map(move |t| (0..4).map(move |c| (b, t, c))))
            {
                for (name, a, e) in [
                    ("attn", &many.attn, &one.attn),
                    ("q", &many.q, &one.q),
                    ("k", &many.k, &one.k),
                ] {
                    let (got, want) = (a.at(&[b, t, h, c]), e.at(&[b, t, 0, c]));
                    assert!(
                        (got - want).abs() < 1e-13,
                        "{name} head {h} at {b},{t},{c}: {got} vs {want}"
                    );
                }
            }
        }
        // out = Σ_h o_h·W1ᵀ + b = H·(out_single − b) + b.
        let bias = &weights.tensors["o_proj.bias"].data;
        for (i, (got, single_out)) in many.out.data.iter().zip(&one.out.data).enumerate() {
            let b = bias[i % 16];
            let want = heads as f64 * (single_out - b) + b;
            assert!((got - want).abs() < 1e-12, "out[{i}]: {got} vs {want}");
        }
    }

    fn rows_up_to(tensor: &Tensor, t0: usize) -> Vec<f64> {
        // Token-major tensors [B, S, ..] with B = 1: the first t0 + 1 rows.
        let row = tensor.data.len() / tensor.shape[1];
        tensor.data[..(t0 + 1) * row].to_vec()
    }

    fn perturbed_after(x: &Tensor, t0: usize) -> Tensor {
        let e = x.shape[2];
        let mut y = x.clone();
        for (i, value) in y.data.iter_mut().enumerate().skip((t0 + 1) * e) {
            *value += 1.0 + (i % 7) as f64;
        }
        y
    }

    fn lse_up_to(outputs: &ForwardOutputs, t0: usize) -> Vec<f64> {
        let seq_len = outputs.lse.shape[2];
        outputs.lse.data.chunks(seq_len).flat_map(|head| head[..=t0].to_vec()).collect()
    }

    #[test]
    fn causal_outputs_do_not_depend_on_later_tokens() {
        let t0 = 5;
        for mask in [Mask::Causal, Mask::SlidingWindow { window: 3 }] {
            let spec = AttentionSpec { mask, ..small_zaya_like("zaya_like") };
            let weights = Weights::random(&spec, 31);
            let x = random_input(&spec, 1, 12, 32);
            let before = forward(&spec, &weights, &x).unwrap();
            let after = forward(&spec, &weights, &perturbed_after(&x, t0)).unwrap();
            for (name, a, b) in [
                ("out", &before.out, &after.out),
                ("q", &before.q, &after.q),
                ("k", &before.k, &after.k),
                ("v", &before.v, &after.v),
                ("attn", &before.attn, &after.attn),
            ] {
                assert_eq!(rows_up_to(a, t0), rows_up_to(b, t0), "{name} under {mask:?}");
                assert_ne!(a.data, b.data, "{name}: the perturbation must change later rows");
            }
            assert_eq!(lse_up_to(&before, t0), lse_up_to(&after, t0));
        }
        // Without a mask the same perturbation does reach earlier outputs: the check above has teeth.
        let spec = AttentionSpec { mask: Mask::None, ..small_zaya_like("zaya_like") };
        let weights = Weights::random(&spec, 31);
        let x = random_input(&spec, 1, 12, 32);
        let before = forward(&spec, &weights, &x).unwrap();
        let after = forward(&spec, &weights, &perturbed_after(&x, t0)).unwrap();
        assert_ne!(rows_up_to(&before.out, t0), rows_up_to(&after.out, t0));
    }

    #[test]
    fn batch_elements_are_independent() {
        let spec = small_zaya_like("zaya_like");
        let weights = Weights::random(&spec, 41);
        let (batch, seq_len, e) = (3, 9, spec.model_dim);
        let x = random_input(&spec, batch, seq_len, 42);
        let together = forward(&spec, &weights, &x).unwrap();
        for b in 0..batch {
            let alone_input =
                Tensor::new(vec![1, seq_len, e], x.data[b * seq_len * e..][..seq_len * e].to_vec());
            let alone = forward(&spec, &weights, &alone_input.unwrap()).unwrap();
            let slice = |t: &Tensor| {
                t.data[b * t.data.len() / batch..(b + 1) * t.data.len() / batch].to_vec()
            };
            assert_eq!(slice(&together.out), alone.out.data);
            assert_eq!(slice(&together.k), alone.k.data);
            assert_eq!(slice(&together.v), alone.v.data);
            assert_eq!(slice(&together.lse), alone.lse.data);
        }
    }

    #[test]
    fn random_weights_follow_the_parameter_list_and_rounding_is_exact() {
        let spec = small_zaya_like("zaya_like");
        let weights = Weights::random(&spec, 51);
        weights.check(&spec).unwrap();
        assert_eq!(weights, Weights::random(&spec, 51));
        assert_ne!(weights, Weights::random(&spec, 52));
        // Biases are nonzero when the spec has them; temperatures keep logits O(1).
        assert!(weights.tensors["qkv_proj.q_proj.bias"].data.iter().all(|&b| b != 0.0));
        assert!(weights.tensors["qk_norm.temp"].data.iter().all(|&t| (0.5..1.5).contains(&t)));
        let bound = 1.0 / 64f64.sqrt();
        assert!(weights.tensors["qkv_proj.q_proj.weight"].data.iter().all(|w| w.abs() <= bound));

        let rounded = weights.rounded_to(ccc::spec::DType::Bf16);
        for (name, tensor) in &rounded.tensors {
            for (r, w) in tensor.data.iter().zip(&weights.tensors[name].data) {
                // bf16 keeps 8 significant bits: relative error at most 2^-8, and rounding is idempotent.
                assert!((r - w).abs() <= w.abs() * 2f64.powi(-8), "{name}");
                assert_eq!(ccc::reference::round_to_dtype(*r, ccc::spec::DType::Bf16), *r);
                // Only the top 7 of f64's 52 stored significand bits may be set.
                assert_eq!(r.to_bits() & ((1u64 << 45) - 1), 0, "{name}: {r}");
            }
        }
        assert_ne!(rounded, weights);
        let x = random_input(&spec, 2, 5, 53);
        assert_eq!(x.shape, [2, 5, 64]);
        let mean = x.data.iter().sum::<f64>() / x.data.len() as f64;
        assert!(mean.abs() < 0.2);
    }

    #[test]
    fn matches_hugging_face_zaya_on_seeded_weights() {
        // Expected numbers from transformers 5.17 on the GPU machine, all in float64: its
        // `ZayaCCAProjection` (projections, value shift, both convolutions, q-k mean) and
        // `ZayaQKNorm` with these exact weights and input (the SplitMix64 streams of
        // `Weights::random(spec, 5)` and `random_input(spec, 1, 11, 6)` re-generated in Python),
        // its `apply_rotary_pos_emb` with float64 cos/sin tables, then causal softmax attention and
        // o_proj. Hugging Face's norm has no eps (it clamps the norm instead), hence the tolerance.
        // small_zaya_like() is pinned to these numbers.
        let spec = small_zaya_like("hf_zaya");
        let outputs =
            forward(&spec, &Weights::random(&spec, 5), &random_input(&spec, 1, 11, 6)).unwrap();
        let squared_sum: f64 = outputs.out.data.iter().map(|v| v * v).sum();
        assert!((squared_sum / 41.36959921484301 - 1.0).abs() < 1e-12, "{squared_sum}");
        let last_token =
            [0.0305285063975992, -0.016637233446342672, -0.21849541764286345, -0.04287938645649131];
        let first_token = [0.2889276344355821, 0.2893677196321851];
        for (c, expected) in last_token.iter().enumerate() {
            let got = outputs.out.at(&[0, 10, c]);
            assert!((got - expected).abs() < 1e-12, "out[0, 10, {c}] = {got}, expected {expected}");
        }
        for (c, expected) in first_token.iter().enumerate() {
            let got = outputs.out.at(&[0, 0, c]);
            assert!((got - expected).abs() < 1e-12, "out[0, 0, {c}] = {got}, expected {expected}");
        }
    }
}
