//! The hand-derived backward pass of the reference against central finite differences of its
//! forward pass: L = Σ out ∘ dout for a random dout, every gradient entry (or a random sample of
//! them in the larger tensors) checked on random small specs of every kind.

mod common;

// Inside `mod reference` so that `cargo test reference` selects these tests.
mod reference {
    use crate::common::rng::SplitMix64;
    use crate::common::specs::{SmallSpecChoices, random_small_spec, small_zaya_like, zaya1_like};
    use ccc::reference::{Tensor, Weights, backward, forward, random_input};
    use ccc::spec::{AttentionSpec, KeyTemperature, Mask, QkNorm};

    /// Heads of width 2..8 and windows of 1..6 tokens: every kind of spec at a size where each
    /// finite difference costs two forward passes of microseconds.
    const SMALL_SPECS: SmallSpecChoices =
        SmallSpecChoices { head_dims: &[2, 4, 8], windows: &[1, 2, 3, 5], random_dtype: false };

    /// Step of the central difference: its truncation error (~h²) and rounding error (~1e-16/h)
    /// are both near 1e-10 relative for O(1) activations.
    const STEP: f64 = 1e-5;
    /// |analytic − numeric| ≤ TOLERANCE·(1 + |numeric|): a hundred times the difference's own
    /// error, far below any missing or doubled term (which is O(|gradient|)). Where a tiny head's
    /// L2 norm is nearly singular the plain difference is off by more (1.5e-7 seen at d = 2), so an
    /// entry outside the tolerance is measured again with Richardson's extrapolation (error ~h⁴).
    const TOLERANCE: f64 = 1e-7;
    /// Entries checked per tensor; smaller tensors are checked whole.
    const SAMPLES: usize = 24;

    fn loss(spec: &AttentionSpec, weights: &Weights, x: &Tensor, dout: &Tensor) -> f64 {
        let out = forward(spec, weights, x).expect("forward").out;
        out.data.iter().zip(&dout.data).map(|(o, g)| o * g).sum()
    }

    fn sample(rng: &mut SplitMix64, len: usize) -> Vec<usize> {
        if len <= SAMPLES {
            (0..len).collect()
        } else {
            (0..SAMPLES).map(|_| rng.below(len)).collect()
        }
    }

    /// Checks dx and every parameter's gradient of `spec` at B × S against finite differences;
    /// returns the largest relative error seen.
    fn check_against_finite_differences(spec: &AttentionSpec, batch: usize, seq_len: usize, seed: u64) -> f64 {
        let weights = Weights::random(spec, seed);
        let x = random_input(spec, batch, seq_len, seed + 1);
        let dout = random_input(spec, batch, seq_len, seed + 2);
        let gradients = backward(spec, &weights, &x, &dout).expect("backward");
        let mut rng = SplitMix64(seed);
        let mut worst = 0.0f64;
        // The central difference of `loss_at(±step)`, extrapolated when the plain one misses.
        let mut compare = |what: &str, index: usize, analytic: f64, loss_at: &dyn Fn(f64) -> f64| {
            let difference = |step: f64| (loss_at(step) - loss_at(-step)) / (2.0 * step);
            let relative = |numeric: f64| (analytic - numeric).abs() / (1.0 + numeric.abs());
            let mut numeric = difference(STEP);
            if relative(numeric) > TOLERANCE {
                numeric = (4.0 * difference(STEP / 2.0) - numeric) / 3.0;
            }
            let error = relative(numeric);
            assert!(
                error <= TOLERANCE,
                "{}: d{what}[{index}] = {analytic} but finite differences give {numeric} (B {batch}, S {seq_len})\n{spec:?}",
                spec.name
            );
            worst = worst.max(error);
        };
        for index in sample(&mut rng, x.data.len()) {
            let loss_at = |step: f64| {
                let mut moved = x.clone();
                moved.data[index] += step;
                loss(spec, &weights, &moved, &dout)
            };
            compare("x", index, gradients.dx.data[index], &loss_at);
        }
        assert_eq!(
            gradients.weights.tensors.keys().collect::<Vec<_>>(),
            weights.tensors.keys().collect::<Vec<_>>(),
            "a gradient for every parameter, named like it"
        );
        for (name, tensor) in &weights.tensors {
            assert_eq!(gradients.weights.tensors[name].shape, tensor.shape, "{name}");
            for index in sample(&mut rng, tensor.data.len()) {
                let loss_at = |step: f64| {
                    let mut moved = weights.clone();
                    moved.tensors.get_mut(name).unwrap().data[index] += step;
                    loss(spec, &moved, &x, &dout)
                };
                compare(name, index, gradients.weights.tensors[name].data[index], &loss_at);
            }
        }
        worst
    }

    #[test]
    fn reference_backward_matches_finite_differences_on_random_specs() {
        let mut rng = SplitMix64(0xBAC4);
        let mut worst = 0.0f64;
        for index in 0..120 {
            let spec = random_small_spec(&mut rng, index, &SMALL_SPECS);
            let (batch, seq_len) = (1 + rng.below(2), [1, 2, 5, 9][rng.below(4)]);
            worst = worst.max(check_against_finite_differences(&spec, batch, seq_len, 100 + index as u64));
        }
        eprintln!("largest relative error: {worst:.1e}");
    }

    #[test]
    fn reference_backward_matches_finite_differences_on_cca_layers() {
        // ZAYA1's parts (two convolutions, q-k mean, a shifted value head, L2 norm with a
        // learned temperature, partial NeoX RoPE), with a window and with learned_exp.
        let zaya = zaya1_like("zaya_small", 32, 8, 4, 2);
        let windowed = AttentionSpec { mask: Mask::SlidingWindow { window: 3 }, bias: true, ..zaya.clone() };
        let exp_temperature = AttentionSpec { key_temperature: KeyTemperature::LearnedExp, ..zaya.clone() };
        for (seed, spec) in [zaya, windowed, exp_temperature, small_zaya_like("small_zaya")].iter().enumerate() {
            for seq_len in [1, 4, 11] {
                check_against_finite_differences(spec, 2, seq_len, 7 * seed as u64 + seq_len as u64);
            }
        }
    }

    /// Outside [1e-7, 2] the clamp of `learned_exp` passes no gradient to the temperature; inside
    /// it the gradient is dL/dτ·τ.
    #[test]
    fn reference_backward_temperature_stops_at_the_clamp() {
        let spec = AttentionSpec {
            key_temperature: KeyTemperature::LearnedExp,
            qk_norm: QkNorm::L2,
            ..zaya1_like("clamped", 32, 8, 4, 2)
        };
        let mut weights = Weights::random(&spec, 3);
        weights.tensors.get_mut("qk_norm.temp").unwrap().data = vec![2.5, 1.0];
        let x = random_input(&spec, 1, 6, 4);
        let dout = random_input(&spec, 1, 6, 5);
        let gradients = backward(&spec, &weights, &x, &dout).unwrap();
        let dtemp = &gradients.weights.tensors["qk_norm.temp"].data;
        assert_eq!(dtemp[0], 0.0, "clamped above 2");
        assert!(dtemp[1].abs() > 1e-6, "inside the clamp: {}", dtemp[1]);
    }

    #[test]
    fn reference_backward_rejects_mismatched_shapes() {
        let spec = small_zaya_like("shapes");
        let weights = Weights::random(&spec, 1);
        let x = random_input(&spec, 1, 4, 2);
        let dout = random_input(&spec, 1, 5, 3);
        let error = backward(&spec, &weights, &x, &dout).unwrap_err();
        assert!(error.contains("dout has shape [1, 5, 64]"), "{error}");
    }
}
