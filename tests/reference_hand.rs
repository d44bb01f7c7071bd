//! The reference on tiny layers whose outputs are worked out by hand in the comments.

// Inside `mod reference` so that `cargo test reference` selects these tests.
mod reference {
    use ccc::reference::{Tensor, Weights, forward};
    use ccc::spec::{
        AttentionSpec, ConvKind, ConvStage, KeyTemperature, Mask, QkNorm, Rope, RopeStyle,
    };

    /// Random weights for `spec` with the named tensors replaced by the given values. Names are
    /// the module-local ones (`q_proj.weight`); ZayaAttention keeps q/k/v and the convolutions
    /// under `qkv_proj.`, so a name is also looked up there.
    fn weights_with(spec: &AttentionSpec, overrides: &[(&str, Vec<f64>)]) -> Weights {
        let mut weights = Weights::random(spec, 1);
        for (name, data) in overrides {
            let full = if weights.tensors.contains_key(*name) {
                name.to_string()
            } else {
                format!("qkv_proj.{name}")
            };
            let tensor =
                weights.tensors.get_mut(&full).unwrap_or_else(|| panic!("no weight {name}"));
            assert_eq!(tensor.data.len(), data.len(), "{name}");
            tensor.data = data.clone();
        }
        weights.check(spec).unwrap();
        weights
    }

    fn input(rows: &[&[f64]]) -> Tensor {
        let data: Vec<f64> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::new(vec![1, rows.len(), rows[0].len()], data).unwrap()
    }

    /// Values of `tensor[0, t, head, ..]` for every t, as rows.
    fn rows_of_head(tensor: &Tensor, head: usize) -> Vec<Vec<f64>> {
        let (seq_len, d) = (tensor.shape[1], tensor.shape[3]);
        (0..seq_len).map(|t| (0..d).map(|c| tensor.at(&[0, t, head, c])).collect()).collect()
    }

    fn assert_close(actual: &[Vec<f64>], expected: &[Vec<f64>], tolerance: f64) {
        assert_eq!(actual.len(), expected.len());
        for (a, e) in actual.iter().zip(expected) {
            assert_eq!(a.len(), e.len());
            for (x, y) in a.iter().zip(e) {
                assert!(
                    (x - y).abs() <= tolerance * y.abs().max(1.0),
                    "got {actual:?}, expected {expected:?}"
                );
            }
        }
    }

    #[test]
    fn convolution_pads_once_so_the_first_stage_bias_reaches_row_zero() {
        // E = d = 1, one q head and one k head: P0 = [q0 | k0] = [x | x] with W_q = W_k = 1.
        let spec = AttentionSpec {
            qk_conv: vec![
                ConvStage { kind: ConvKind::Depthwise, width: 2 },
                ConvStage { kind: ConvKind::PerHead, width: 2 },
            ],
            ..AttentionSpec::plain("conv", 1, 1, 1, 1)
        };
        let weights = weights_with(
            &spec,
            &[
                ("q_proj.weight", vec![1.0]),
                ("k_proj.weight", vec![1.0]),
                // Stage 1, weight [P=2, 1, K=2]: channel q taps (1, 10) bias 100; channel k taps (2, 0) bias −1.
                ("conv_qk_depthwise.weight", vec![1.0, 10.0, 2.0, 0.0]),
                ("conv_qk_depthwise.bias", vec![100.0, -1.0]),
                // Stage 2, weight [2, d=1, 2]: channel q taps (1, 2) bias 0; channel k taps (0, 1) bias 0.5.
                ("conv_qk_grouped.weight", vec![1.0, 2.0, 0.0, 1.0]),
                ("conv_qk_grouped.bias", vec![0.0, 0.5]),
            ],
        );
        let outputs = forward(&spec, &weights, &input(&[&[1.0], &[2.0], &[3.0]])).unwrap();
        // T = 2: the padded q channel is [0, 0, 1, 2, 3].
        // Stage 1 (no padding): m[i] = 100 + 1·p[i] + 10·p[i+1] = [100, 110, 121, 132].
        // Stage 2: y[t] = 1·m[t] + 2·m[t+1] = [100 + 220, 110 + 242, 121 + 264] = [320, 352, 385].
        // Padding each stage separately would give y[0] = 2·110 = 220 instead.
        assert_close(&rows_of_head(&outputs.q, 0), &[vec![320.0], vec![352.0], vec![385.0]], 1e-15);
        // k channel: m[i] = −1 + 2·p[i] = [−1, −1, 1, 3]; y[t] = 0.5 + m[t+1] = [−0.5, 1.5, 3.5].
        assert_close(&rows_of_head(&outputs.k, 0), &[vec![-0.5], vec![1.5], vec![3.5]], 1e-15);
    }

    #[test]
    fn per_head_convolution_mixes_channels_of_its_own_head_with_tap_zero_oldest() {
        // E = d = 2, one q head (channels 0, 1) and one k head (channels 2, 3); q0 = x, k0 = 2x.
        let spec = AttentionSpec {
            qk_conv: vec![ConvStage { kind: ConvKind::PerHead, width: 2 }],
            ..AttentionSpec::plain("per_head", 2, 2, 1, 1)
        };
        #[rustfmt::skip]
    let conv_weight = vec![
        // [c][i][k]: output channel c, input channel i of c's head, tap k (0 = previous row).
        1.0, 0.0,   0.0, 10.0,  // c0 = b0 + x_prev[0] + 10·x_now[1]
        0.0, 100.0, 0.0, 0.0,   // c1 = b1 + 100·x_now[0]
        0.0, 1.0,   0.0, 0.0,   // c2 = b2 + k_now[0]      (reads channel 2, not 0)
        0.0, 0.0,   1.0, 0.0,   // c3 = b3 + k_prev[1]     (reads channel 3)
    ];
        let weights = weights_with(
            &spec,
            &[
                ("q_proj.weight", vec![1.0, 0.0, 0.0, 1.0]),
                ("k_proj.weight", vec![2.0, 0.0, 0.0, 2.0]),
                ("conv_qk_grouped.weight", conv_weight),
                ("conv_qk_grouped.bias", vec![0.5, 0.25, 0.0, -1.0]),
            ],
        );
        let outputs = forward(&spec, &weights, &input(&[&[1.0, 2.0], &[3.0, 4.0]])).unwrap();
        // Padded P0 rows: [0 0 0 0], [1 2 2 4], [3 4 6 8].
        // c0: 0.5 + 0 + 10·2 = 20.5, then 0.5 + 1 + 10·4 = 41.5.  c1: 0.25 + 100, 0.25 + 300.
        assert_close(
            &rows_of_head(&outputs.q, 0),
            &[vec![20.5, 100.25], vec![41.5, 300.25]],
            1e-15,
        );
        // c2: 2, 6.  c3: −1 + 0, −1 + 4.
        assert_close(&rows_of_head(&outputs.k, 0), &[vec![2.0, -1.0], vec![6.0, 3.0]], 1e-15);
    }

    #[test]
    fn value_shift_delays_the_last_heads_and_keeps_their_bias_at_the_start() {
        // E = 2, d = 1, two kv heads, the last one shifted.
        let spec = AttentionSpec {
            value_shift: 1,
            bias: true,
            ..AttentionSpec::plain("shift", 2, 1, 2, 2)
        };
        let weights = weights_with(
            &spec,
            &[
                ("v_proj_current.weight", vec![1.0, 10.0]),
                ("v_proj_current.bias", vec![0.5]),
                ("v_proj_delayed.weight", vec![100.0, 1000.0]),
                ("v_proj_delayed.bias", vec![0.25]),
            ],
        );
        let x = input(&[&[1.0, 2.0], &[3.0, 4.0], &[5.0, 6.0]]);
        let outputs = forward(&spec, &weights, &x).unwrap();
        // Head 0 reads x[t]: 1 + 20 + 0.5, 3 + 40 + 0.5, 5 + 60 + 0.5.
        assert_close(&rows_of_head(&outputs.v, 0), &[vec![21.5], vec![43.5], vec![65.5]], 1e-15);
        // Head 1 reads x[t−1], zeros at t = 0: 0.25, 100 + 2000 + 0.25, 300 + 4000 + 0.25.
        assert_close(
            &rows_of_head(&outputs.v, 1),
            &[vec![0.25], vec![2100.25], vec![4300.25]],
            1e-15,
        );

        // value_shift = Hk: every head is delayed, and there is no current projection at all.
        let spec = AttentionSpec { value_shift: 2, ..spec };
        let weights = weights_with(
            &spec,
            &[
                ("v_proj_delayed.weight", vec![1.0, 0.0, 0.0, 1.0]),
                ("v_proj_delayed.bias", vec![0.0, 7.0]),
            ],
        );
        let outputs = forward(&spec, &weights, &x).unwrap();
        assert_close(&rows_of_head(&outputs.v, 0), &[vec![0.0], vec![1.0], vec![3.0]], 1e-15);
        assert_close(&rows_of_head(&outputs.v, 1), &[vec![7.0], vec![9.0], vec![11.0]], 1e-15);
    }

    #[test]
    fn qk_mean_adds_the_pre_convolution_projections() {
        // E = 4, d = 1, Hq = 4, Hk = 2 (G = 2). q0 = x = [1, 2, 3, 4]; k0 = [10·x0, 20·x3] = [10, 80].
        // A width-1 depthwise stage doubles everything (y = 2·P0) so that pre- and post-convolution
        // values differ.
        let base = AttentionSpec {
            qk_conv: vec![ConvStage { kind: ConvKind::Depthwise, width: 1 }],
            ..AttentionSpec::plain("mean", 4, 1, 4, 2)
        };
        let overrides = [
            ("q_proj.weight", vec![1., 0., 0., 0., 0., 1., 0., 0., 0., 0., 1., 0., 0., 0., 0., 1.]),
            ("k_proj.weight", vec![10., 0., 0., 0., 0., 0., 0., 20.]),
            ("conv_qk_depthwise.weight", vec![2.0; 6]),
            ("conv_qk_depthwise.bias", vec![0.0; 6]),
        ];
        let x = input(&[&[1.0, 2.0, 3.0, 4.0]]);
        let heads =
            |t: &Tensor| -> Vec<f64> { (0..t.shape[2]).map(|h| t.at(&[0, 0, h, 0])).collect() };

        let spec = AttentionSpec { qk_mean: true, ..base.clone() };
        let outputs = forward(&spec, &weights_with(&spec, &overrides), &x).unwrap();
        // q̂_h = 2·q0_h + ½·q0_h + ½·k0_(h/2) = [2.5 + 5, 5 + 5, 7.5 + 40, 10 + 40].
        assert_eq!(heads(&outputs.q), [7.5, 10.0, 47.5, 50.0]);
        // k̂_j = 2·k0_j + ½·k0_j + ½·mean(q0 of heads 2j, 2j+1) = [25 + ½·1.5, 200 + ½·3.5].
        assert_eq!(heads(&outputs.k), [25.75, 201.75]);

        let outputs = forward(&base, &weights_with(&base, &overrides), &x).unwrap();
        assert_eq!(heads(&outputs.q), [2.0, 4.0, 6.0, 8.0]);
        assert_eq!(heads(&outputs.k), [20.0, 160.0]);
    }

    #[test]
    fn l2_norm_scales_by_sqrt_d_and_keys_by_their_temperature() {
        // E = 4, d = 2, Hq = Hk = 2, W_q = W_k = I: heads [3, 4] and [0, 2] for both q and k.
        // eps = 11 makes its place visible: rsqrt(25 + 11) = 1/6, rsqrt(4 + 11) = 1/√15.
        let identity = vec![1., 0., 0., 0., 0., 1., 0., 0., 0., 0., 1., 0., 0., 0., 0., 1.];
        let x = input(&[&[3.0, 4.0, 0.0, 2.0]]);
        let run = |temperature: KeyTemperature, temp: Vec<f64>| {
            let spec = AttentionSpec {
                qk_norm: QkNorm::L2,
                key_temperature: temperature,
                norm_eps: 11.0,
                ..AttentionSpec::plain("norm", 4, 2, 2, 2)
            };
            let weights = weights_with(
                &spec,
                &[
                    ("q_proj.weight", identity.clone()),
                    ("k_proj.weight", identity.clone()),
                    ("qk_norm.temp", temp),
                ],
            );
            let outputs = forward(&spec, &weights, &x).unwrap();
            let all =
                |t: &Tensor| vec![rows_of_head(t, 0)[0].clone(), rows_of_head(t, 1)[0].clone()];
            (all(&outputs.q), all(&outputs.k))
        };
        let r2 = 2f64.sqrt();
        let r15 = 15f64.sqrt();

        // learned: τ = [2, −0.5] used as they are.
        let (q, k) = run(KeyTemperature::Learned, vec![2.0, -0.5]);
        // q̃ = √2·[3, 4]/6 and √2·[0, 2]/√15.
        assert_close(&q, &[vec![r2 * 0.5, r2 * 4.0 / 6.0], vec![0.0, r2 * 2.0 / r15]], 1e-14);
        // k̃ = √2·2·[3, 4]/6 and √2·(−0.5)·[0, 2]/√15.
        assert_close(&k, &[vec![r2, r2 * 4.0 / 3.0], vec![0.0, -r2 / r15]], 1e-14);

        // learned_exp: τ = exp(clamp(temp, 1e-7, 2)) = [exp(1e-7), exp(2)] for temp = [−1, 3].
        let (_, k) = run(KeyTemperature::LearnedExp, vec![-1.0, 3.0]);
        let tau = [1e-7f64.exp(), 2f64.exp()];
        assert_close(
            &k,
            &[vec![tau[0] * r2 * 0.5, tau[0] * r2 * 4.0 / 6.0], vec![0.0, tau[1] * r2 * 2.0 / r15]],
            1e-14,
        );
    }

    /// q0 = [1, 2, 3, 4, 5, 6] and k0 = 2·q0 at every position; d = 6, r = 4, θ = 100, so the two
    /// frequencies are θ^0 = 1 and θ^(−2/4) = 0.1.
    fn rope_outputs(style: RopeStyle) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
        let spec = AttentionSpec {
            rope: Some(Rope { fraction: 4.0 / 6.0, rotary_dim: 4, theta: 100.0, style, yarn: None }),
            ..AttentionSpec::plain("rope", 6, 6, 1, 1)
        };
        let identity: Vec<f64> = (0..36).map(|i| if i % 7 == 0 { 1.0 } else { 0.0 }).collect();
        let double: Vec<f64> = identity.iter().map(|x| 2.0 * x).collect();
        let weights =
            weights_with(&spec, &[("q_proj.weight", identity), ("k_proj.weight", double)]);
        let row: &[f64] = &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let outputs = forward(&spec, &weights, &input(&[row, row, row])).unwrap();
        (rows_of_head(&outputs.q, 0), rows_of_head(&outputs.k, 0))
    }

    #[test]
    fn neox_rope_rotates_the_halves_of_the_rotary_slice() {
        let (q, k) = rope_outputs(RopeStyle::Neox);
        assert_eq!(q[0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]); // position 0: no rotation
        // Position 2: pairs (0, 2) at angle 2·1 and (1, 3) at angle 2·0.1; channels 4, 5 untouched.
        let (s1, c1) = 2f64.sin_cos();
        let (s2, c2) = 0.2f64.sin_cos();
        let expected = vec![
            1. * c1 - 3. * s1,
            2. * c2 - 4. * s2,
            3. * c1 + 1. * s1,
            4. * c2 + 2. * s2,
            5.,
            6.,
        ];
        assert_close(&q[2..], std::slice::from_ref(&expected), 1e-14);
        let doubled: Vec<f64> = expected.iter().map(|x| 2.0 * x).collect();
        assert_close(&k[2..], &[doubled], 1e-14);
    }

    #[test]
    fn interleaved_rope_rotates_adjacent_pairs() {
        let (q, _) = rope_outputs(RopeStyle::Interleaved);
        assert_eq!(q[0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        // Position 1: pairs (0, 1) at angle 1 and (2, 3) at angle 0.1.
        let (s1, c1) = 1f64.sin_cos();
        let (s2, c2) = 0.1f64.sin_cos();
        let expected = vec![
            1. * c1 - 2. * s1,
            2. * c1 + 1. * s1,
            3. * c2 - 4. * s2,
            4. * c2 + 3. * s2,
            5.,
            6.,
        ];
        assert_close(&q[1..2], &[expected], 1e-14);
    }

    #[test]
    fn masks_choose_which_values_are_averaged() {
        // E = d = 1 with W_q = 0: every logit is 0, so each output is the plain mean of the values
        // its query sees, and lse = ln(number of keys seen). W_v = W_o = 1, x = [1, 2, 4, 8].
        let x = input(&[&[1.0], &[2.0], &[4.0], &[8.0]]);
        let run = |mask: Mask| {
            let spec = AttentionSpec { mask, ..AttentionSpec::plain("mask", 1, 1, 1, 1) };
            let weights = weights_with(
                &spec,
                &[
                    ("q_proj.weight", vec![0.0]),
                    ("v_proj.weight", vec![1.0]),
                    ("o_proj.weight", vec![1.0]),
                ],
            );
            let outputs = forward(&spec, &weights, &x).unwrap();
            (outputs.out.data, outputs.lse.data)
        };
        let ln = |n: f64| n.ln();

        let (out, lse) = run(Mask::SlidingWindow { window: 2 });
        assert_close(&[out], &[vec![1.0, 1.5, 3.0, 6.0]], 1e-15); // keys {0}, {0,1}, {1,2}, {2,3}
        assert_close(&[lse], &[vec![0.0, ln(2.0), ln(2.0), ln(2.0)]], 1e-15);

        let (out, _) = run(Mask::SlidingWindow { window: 1 });
        assert_close(&[out], &[vec![1.0, 2.0, 4.0, 8.0]], 1e-15);

        let (out, lse) = run(Mask::Causal);
        assert_close(&[out], &[vec![1.0, 1.5, 7.0 / 3.0, 15.0 / 4.0]], 1e-15);
        assert_close(&[lse], &[vec![0.0, ln(2.0), ln(3.0), ln(4.0)]], 1e-15);

        let (out, lse) = run(Mask::None);
        assert_close(&[out], &[vec![15.0 / 4.0; 4]], 1e-15);
        assert_close(&[lse], &[vec![ln(4.0); 4]], 1e-15);
    }
}
