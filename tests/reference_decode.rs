//! Prefill + decode against one forward pass, the S = 1 edge, and errors on bad input.

mod common;

// Inside `mod reference` so that `cargo test reference` selects these tests.
mod reference {
    use ccc::reference::{
        DecodeState, Tensor, Weights, decode_step, forward, prefill, random_input,
    };
    use crate::common::specs::small_zaya_like;
    use ccc::spec::{AttentionSpec, ConvKind, ConvStage, KeyTemperature, Mask, Rope, RopeStyle};

    fn variants() -> Vec<(&'static str, AttentionSpec)> {
        let base = small_zaya_like("zaya_like");
        vec![
            ("zaya_like", base.clone()),
            ("bias off", AttentionSpec { bias: false, ..base.clone() }),
            ("value_shift 0", AttentionSpec { value_shift: 0, ..base.clone() }),
            ("value_shift = Hk", AttentionSpec { value_shift: 2, ..base.clone() }),
            (
                "three stages, widths 1 to 4",
                AttentionSpec {
                    qk_conv: vec![
                        ConvStage { kind: ConvKind::PerHead, width: 3 },
                        ConvStage { kind: ConvKind::Depthwise, width: 1 },
                        ConvStage { kind: ConvKind::Depthwise, width: 4 },
                    ],
                    ..base.clone()
                },
            ),
            (
                "sliding window",
                AttentionSpec { mask: Mask::SlidingWindow { window: 4 }, ..base.clone() },
            ),
            (
                "interleaved rope",
                AttentionSpec {
                    rope: Some(Rope {
                        fraction: 1.0,
                        rotary_dim: 16,
                        theta: 500.0,
                        style: RopeStyle::Interleaved,
                        yarn: None,
                    }),
                    ..base.clone()
                },
            ),
            (
                "learned_exp",
                AttentionSpec { key_temperature: KeyTemperature::LearnedExp, ..base.clone() },
            ),
            (
                "MQA, no qk_mean",
                AttentionSpec { kv_heads: 1, value_shift: 0, qk_mean: false, ..base.clone() },
            ),
            (
                "plain attention",
                AttentionSpec { bias: true, ..AttentionSpec::plain("plain", 64, 16, 4, 2) },
            ),
        ]
    }

    /// max |a − b| / max |b| over two output lists.
    fn relative_difference(actual: &[f64], expected: &[f64]) -> f64 {
        assert_eq!(actual.len(), expected.len());
        let scale = expected.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let diff = actual.iter().zip(expected).fold(0.0f64, |m, (a, b)| m.max((a - b).abs()));
        diff / scale
    }

    /// Outputs of prefilling `prompt_len` tokens and decoding the rest of x [1, S, E], one row each.
    fn prefill_then_decode(
        spec: &AttentionSpec,
        weights: &Weights,
        x: &Tensor,
        prompt_len: usize,
    ) -> (Vec<f64>, DecodeState) {
        let e = spec.model_dim;
        let prompt = Tensor::new(vec![prompt_len, e], x.data[..prompt_len * e].to_vec()).unwrap();
        let (prompt_out, mut state) = prefill(spec, weights, &prompt).unwrap();
        let mut outputs = prompt_out.data;
        for token in x.data[prompt_len * e..].chunks(e) {
            outputs.extend(decode_step(spec, weights, &mut state, token).unwrap());
        }
        (outputs, state)
    }

    #[test]
    fn prefill_then_decode_equals_one_forward_pass() {
        let (prompt_len, total) = (7, 12);
        for (name, spec) in variants() {
            spec.validate().unwrap();
            let weights = Weights::random(&spec, 61);
            let x = random_input(&spec, 1, total, 62);
            let full = forward(&spec, &weights, &x).unwrap();
            let (decoded, state) = prefill_then_decode(&spec, &weights, &x, prompt_len);
            let error = relative_difference(&decoded, &full.out.data);
            assert!(error < 1e-12, "{name}: relative difference {error}");
            // The KV cache holds exactly the forward pass's final keys and values.
            assert_eq!(state.position, total);
            assert!(relative_difference(&state.keys, &full.k.data) < 1e-12, "{name}: keys");
            assert!(relative_difference(&state.values, &full.v.data) < 1e-12, "{name}: values");
        }
    }

    #[test]
    fn decoding_from_an_empty_state_or_after_one_token_equals_one_forward_pass() {
        // T = 5 > the prompt: the convolution state still holds zero rows from before the start.
        let spec = AttentionSpec {
            qk_conv: vec![
                ConvStage { kind: ConvKind::Depthwise, width: 3 },
                ConvStage { kind: ConvKind::PerHead, width: 4 },
            ],
            ..small_zaya_like("zaya_like")
        };
        let weights = Weights::random(&spec, 71);
        let x = random_input(&spec, 1, 6, 72);
        let full = forward(&spec, &weights, &x).unwrap();
        for prompt_len in [0, 1, 2] {
            let (decoded, _) = prefill_then_decode(&spec, &weights, &x, prompt_len);
            let error = relative_difference(&decoded, &full.out.data);
            assert!(error < 1e-12, "prompt of {prompt_len}: relative difference {error}");
        }
        let (_, empty) = prefill(&spec, &weights, &Tensor::zeros(vec![0, 64])).unwrap();
        assert_eq!(empty, DecodeState::new(&spec));

        // S = 1: with a causal mask the only key is the token itself, so o = v and out = v·W_oᵀ + b.
        let one =
            forward(&spec, &weights, &Tensor::new(vec![1, 1, 64], x.data[..64].to_vec()).unwrap())
                .unwrap();
        assert_eq!(one.lse.shape, [1, 4, 1]);
        for h in 0..4 {
            let kv = h / 2;
            for c in 0..16 {
                assert!((one.attn.at(&[0, 0, h, c]) - one.v.at(&[0, 0, kv, c])).abs() < 1e-15);
            }
        }
        assert!(relative_difference(&one.out.data, &full.out.data[..64]) < 1e-12);
    }

    #[test]
    fn bad_shapes_and_weights_are_errors_that_name_the_culprit() {
        let spec = small_zaya_like("zaya_like");
        let weights = Weights::random(&spec, 81);
        let x = random_input(&spec, 1, 4, 82);

        let flat = Tensor::new(vec![4, 64], x.data.clone()).unwrap();
        assert!(forward(&spec, &weights, &flat).unwrap_err().contains("[4, 64]"));
        let narrow = Tensor::zeros(vec![1, 4, 32]);
        assert!(
            forward(&spec, &weights, &narrow)
                .unwrap_err()
                .contains("expected [batch, seq_len, 64]")
        );
        let inconsistent = Tensor { shape: vec![1, 4, 64], data: vec![0.0; 10] };
        assert!(forward(&spec, &weights, &inconsistent).is_err());

        let mut missing = weights.clone();
        missing.tensors.remove("qkv_proj.conv_qk_grouped.weight");
        let message = forward(&spec, &missing, &x).unwrap_err();
        assert!(
            message.contains("qkv_proj.conv_qk_grouped.weight") && message.contains("[96, 16, 2]"),
            "{message}"
        );

        let mut extra = weights.clone();
        extra.tensors.insert("v_proj.weight".into(), Tensor::zeros(vec![32, 64]));
        assert!(forward(&spec, &extra, &x).unwrap_err().contains("v_proj.weight"));

        let mut misshapen = weights.clone();
        misshapen.tensors.insert("qk_norm.temp".into(), Tensor::zeros(vec![4]));
        let message = forward(&spec, &misshapen, &x).unwrap_err();
        assert!(message.contains("qk_norm.temp") && message.contains("[2]"), "{message}");

        let invalid = AttentionSpec { value_shift: 3, ..spec.clone() };
        assert!(forward(&invalid, &weights, &x).unwrap_err().contains("value_shift"));

        assert!(prefill(&spec, &weights, &x).unwrap_err().contains("[seq_len, 64]"));
        let (_, mut state) = prefill(&spec, &weights, &flat).unwrap();
        let before = state.clone();
        assert!(decode_step(&spec, &weights, &mut state, &[0.0; 63]).unwrap_err().contains("63"));
        let other = AttentionSpec { qk_conv: Vec::new(), ..spec.clone() };
        let other_weights = Weights::random(&other, 83);
        assert!(
            decode_step(&other, &other_weights, &mut state, &[0.0; 64])
                .unwrap_err()
                .contains("conv_rows")
        );
        assert_eq!(state, before, "a failed step leaves the state alone");
    }
}
