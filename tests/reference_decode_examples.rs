//! Prefill + decode against one forward pass, on every example layer at its real sizes
//! (tests/reference_decode.rs does the same on small hand-made variants).

mod common;

// Inside `mod reference` so that `cargo test reference` selects these tests.
mod reference {
    use ccc::reference::{
        Tensor, Weights, decode_step, forward, prefill, random_input, rel_l2_error,
    };
    use crate::common::specs::example_files;
    use ccc::spec::Mask;

    /// Both sides run in f64 on the same numbers; only summation order may differ.
    const TOLERANCE: f64 = 1e-10;
    const PREFILL_LEN: usize = 5;
    const DECODE_STEPS: usize = 4;

    fn rows(tensor: &Tensor, first: usize, count: usize, width: usize) -> Tensor {
        Tensor {
            shape: vec![count, width],
            data: tensor.data[first * width..(first + count) * width].to_vec(),
        }
    }

    #[test]
    fn prefill_then_decode_matches_forward_on_every_example() {
        let mut checked = Vec::new();
        for (index, spec) in example_files().iter().enumerate() {
            // Decode is causal by construction: a decoded token sees only the tokens so far, so
            // under mask `none` (the encoder example) it cannot equal a bidirectional forward
            // pass over the whole sequence. Those layers are skipped.
            if spec.mask == Mask::None {
                continue;
            }
            let e = spec.model_dim;
            let total = PREFILL_LEN + DECODE_STEPS;
            let seed = 300 + index as u64;
            let weights = Weights::random(spec, seed);
            let x = random_input(spec, 1, total, seed ^ 0xDEC0DE);
            let whole = forward(spec, &weights, &x).unwrap().out;

            let prompt = Tensor {
                shape: vec![PREFILL_LEN, e],
                data: x.data[..PREFILL_LEN * e].to_vec(),
            };
            let (prefill_out, mut state) = prefill(spec, &weights, &prompt).unwrap();
            let error = rel_l2_error(&prefill_out, &rows(&whole, 0, PREFILL_LEN, e)).unwrap();
            assert!(
                error <= TOLERANCE,
                "{}: prefill differs by {error:e}",
                spec.name
            );

            for t in PREFILL_LEN..total {
                let token = &x.data[t * e..(t + 1) * e];
                let out = decode_step(spec, &weights, &mut state, token).unwrap();
                let out = Tensor {
                    shape: vec![1, e],
                    data: out,
                };
                let error = rel_l2_error(&out, &rows(&whole, t, 1, e)).unwrap();
                assert!(
                    error <= TOLERANCE,
                    "{}: decoded token {t} differs by {error:e}",
                    spec.name
                );
            }
            assert_eq!(state.position, total, "{}", spec.name);
            checked.push(spec.name.clone());
        }
        // Every example but the encoder has a causal or sliding-window mask.
        assert_eq!(
            checked,
            ["cca4x", "gqa", "mha", "mqa", "sliding_window", "zaya1"],
            "the examples checked"
        );
    }
}
