//! The serving reference: chunked prefill, packed batches of sequences of different lengths and a
//! paged KV cache give what one forward pass over each whole sequence gives, and misuse (bad
//! `cu_seqlens`, pages outside the pool, a sequence longer than its pages) is an error naming the
//! index.

mod common;

// Inside `mod reference` so that `cargo test reference` selects these tests.
mod reference {
    use crate::common::specs::small_zaya_like;
    use ccc::reference::{
        DecodeState, PagedCache, Rng, Tensor, Weights, forward, prefill, prefill_chunk, prefill_packed, random_input,
    };
    use ccc::spec::{AttentionSpec, ConvKind, ConvStage, Mask};

    fn variants() -> Vec<(&'static str, AttentionSpec)> {
        let base = small_zaya_like("zaya_like");
        vec![
            ("zaya_like", base.clone()),
            ("value_shift 0, no bias", AttentionSpec { value_shift: 0, bias: false, ..base.clone() }),
            ("every kv head shifted", AttentionSpec { value_shift: 2, ..base.clone() }),
            (
                "T = 5",
                AttentionSpec {
                    qk_conv: vec![
                        ConvStage { kind: ConvKind::Depthwise, width: 3 },
                        ConvStage { kind: ConvKind::PerHead, width: 4 },
                    ],
                    ..base.clone()
                },
            ),
            ("sliding window of 4", AttentionSpec { mask: Mask::SlidingWindow { window: 4 }, ..base.clone() }),
            ("plain attention", AttentionSpec { bias: true, ..AttentionSpec::plain("plain", 64, 16, 4, 2) }),
        ]
    }

    /// max |a − b| / max |b|.
    fn relative_difference(actual: &[f64], expected: &[f64]) -> f64 {
        assert_eq!(actual.len(), expected.len());
        let scale = expected.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        actual.iter().zip(expected).fold(0.0f64, |m, (a, b)| m.max((a - b).abs())) / scale.max(f64::MIN_POSITIVE)
    }

    /// Rows first..end of a [1, S, E] or [S, E] input as an [n, E] tensor.
    fn rows(x: &Tensor, e: usize, first: usize, end: usize) -> Tensor {
        Tensor::new(vec![end - first, e], x.data[first * e..end * e].to_vec()).unwrap()
    }

    /// The sequences' rows packed into one x [N, E], with their cu_seqlens.
    fn packed(e: usize, sequences: &[&[f64]]) -> (Tensor, Vec<usize>) {
        let mut cu_seqlens = vec![0];
        for sequence in sequences {
            cu_seqlens.push(cu_seqlens.last().unwrap() + sequence.len() / e);
        }
        (Tensor::new(vec![*cu_seqlens.last().unwrap(), e], sequences.concat()).unwrap(), cu_seqlens)
    }

    /// Random chunk lengths (0 included) summing to `total`.
    fn random_split(rng: &mut Rng, total: usize, longest: usize) -> Vec<usize> {
        let mut lengths = Vec::new();
        let mut left = total;
        while left > 0 {
            let length = (rng.uniform(0.0, (longest + 1) as f64) as usize).min(left);
            lengths.push(length);
            left -= length;
        }
        lengths
    }

    #[test]
    fn chunked_prefill_in_any_split_equals_one_forward_pass() {
        let total = 23;
        let mut rng = Rng::new(5);
        for (name, spec) in variants() {
            let e = spec.model_dim;
            let weights = Weights::random(&spec, 91);
            let x = random_input(&spec, 1, total, 92);
            let full = forward(&spec, &weights, &x).unwrap();
            for trial in 0..4 {
                let split = random_split(&mut rng, total, 7);
                let mut state = DecodeState::new(&spec);
                let (mut out, mut first) = (Vec::new(), 0);
                for &length in &split {
                    out.extend(prefill_chunk(&spec, &weights, &mut state, &rows(&x, e, first, first + length)).unwrap().data);
                    first += length;
                }
                let error = relative_difference(&out, &full.out.data);
                assert!(error < 1e-12, "{name}, split {split:?} (trial {trial}): relative difference {error}");
                assert!(relative_difference(&state.keys, &full.k.data) < 1e-12, "{name}: keys");
                assert!(relative_difference(&state.values, &full.v.data) < 1e-12, "{name}: values");
            }
        }
    }

    #[test]
    fn a_packed_batch_equals_each_sequence_alone() {
        for (name, spec) in variants() {
            let e = spec.model_dim;
            let weights = Weights::random(&spec, 93);
            // Sequence 1 continues from a prefill of 5 tokens; the others start empty.
            let lengths = [1usize, 17, 0, 9];
            let inputs: Vec<Tensor> =
                lengths.iter().enumerate().map(|(i, &n)| random_input(&spec, 1, n + 5, 100 + i as u64)).collect();
            let mut states = vec![DecodeState::new(&spec); lengths.len()];
            states[1] = prefill(&spec, &weights, &rows(&inputs[1], e, 0, 5)).unwrap().1;
            let start = |i: usize| if i == 1 { 5 } else { 0 };
            let sequences: Vec<&[f64]> =
                lengths.iter().enumerate().map(|(i, &n)| &inputs[i].data[start(i) * e..(start(i) + n) * e]).collect();
            let (x, cu_seqlens) = packed(e, &sequences);
            let out = prefill_packed(&spec, &weights, &mut states, &x, &cu_seqlens).unwrap();
            for (i, &n) in lengths.iter().enumerate() {
                let whole = forward(&spec, &weights, &inputs[i]).unwrap();
                let expected = &whole.out.data[start(i) * e..(start(i) + n) * e];
                let got = &out.data[cu_seqlens[i] * e..cu_seqlens[i + 1] * e];
                if n > 0 {
                    let error = relative_difference(got, expected);
                    assert!(error < 1e-12, "{name}, sequence {i}: relative difference {error}");
                }
                assert_eq!(states[i].position, start(i) + n, "{name}, sequence {i}");
            }
        }
    }

    #[test]
    fn a_paged_cache_in_random_page_order_equals_contiguous_decoding() {
        let page_size = 4;
        let mut rng = Rng::new(7);
        for (name, spec) in variants() {
            let e = spec.model_dim;
            let weights = Weights::random(&spec, 95);
            // Prompts of 1, 6 and 0 tokens, then 7 decode steps each: at most 13 tokens, 4 pages.
            let prompts = [1usize, 6, 0];
            let steps = 7;
            let inputs: Vec<Tensor> =
                (0..3).map(|i| random_input(&spec, 1, prompts[i] + steps, 200 + i as u64)).collect();
            let mut order: Vec<usize> = (0..12).collect();
            for i in (1..order.len()).rev() {
                order.swap(i, (rng.uniform(0.0, (i + 1) as f64) as usize).min(i));
            }
            let tables = order.chunks(4).map(<[usize]>::to_vec).collect();
            let mut cache = PagedCache::new(&spec, page_size, 12, tables).unwrap();
            let sequences: Vec<&[f64]> = prompts.iter().enumerate().map(|(i, &n)| &inputs[i].data[..n * e]).collect();
            let (x, cu_seqlens) = packed(e, &sequences);
            let mut outputs = vec![Vec::new(); 3];
            let out = cache.step(&spec, &weights, &x, &cu_seqlens).unwrap();
            for i in 0..3 {
                outputs[i].extend_from_slice(&out.data[cu_seqlens[i] * e..cu_seqlens[i + 1] * e]);
            }
            for step in 0..steps {
                let tokens: Vec<f64> =
                    (0..3).flat_map(|i| inputs[i].data[(prompts[i] + step) * e..(prompts[i] + step + 1) * e].to_vec()).collect();
                let out = cache.step(&spec, &weights, &Tensor::new(vec![3, e], tokens).unwrap(), &[0, 1, 2, 3]).unwrap();
                for (i, output) in outputs.iter_mut().enumerate() {
                    output.extend_from_slice(&out.data[i * e..(i + 1) * e]);
                }
            }
            for (i, output) in outputs.iter().enumerate() {
                let whole = forward(&spec, &weights, &inputs[i]).unwrap();
                let error = relative_difference(output, &whole.out.data);
                assert!(error < 1e-12, "{name}, sequence {i}: relative difference {error}");
                assert!(relative_difference(&cache.state(&spec, i).keys, &whole.k.data) < 1e-12, "{name}: keys");
            }
        }
    }

    #[test]
    fn misuse_is_an_error_naming_the_index() {
        let spec = small_zaya_like("zaya_like");
        let e = spec.model_dim;
        let weights = Weights::random(&spec, 97);
        let x = random_input(&spec, 1, 6, 98);
        let flat = Tensor::new(vec![6, e], x.data.clone()).unwrap();
        let mut states = vec![DecodeState::new(&spec); 2];
        let before = states.clone();
        let cases: [(&[usize], &str); 4] = [
            (&[0, 6], "cu_seqlens has 2 entries, expected 3 (one more than the sequences)"),
            (&[1, 3, 6], "cu_seqlens[0] is 1, expected 0"),
            (&[0, 4, 3], "cu_seqlens[2] = 3 is below cu_seqlens[1] = 4"),
            (&[0, 2, 5], "cu_seqlens ends at 5, expected the token count 6"),
        ];
        for (cu_seqlens, message) in cases {
            let error = prefill_packed(&spec, &weights, &mut states, &flat, cu_seqlens).unwrap_err();
            assert_eq!(error, message);
        }
        assert_eq!(states, before, "a refused batch changes no state");
        assert_eq!(
            PagedCache::new(&spec, 4, 3, vec![vec![0, 1], vec![2, 3]]).unwrap_err(),
            "block_tables[1][1] = 3 names a page outside the pool of 3"
        );
        assert_eq!(
            PagedCache::new(&spec, 4, 3, vec![vec![0, 1], vec![2, 1]]).unwrap_err(),
            "block_tables[1][1] = 1 is already block_tables[0][1]"
        );
        let mut cache = PagedCache::new(&spec, 4, 3, vec![vec![0], vec![1, 2]]).unwrap();
        let before = cache.clone();
        assert_eq!(
            cache.step(&spec, &weights, &flat, &[0, 5, 6]).unwrap_err(),
            "sequence 0 would hold 5 tokens, more than its 1 pages of 4"
        );
        assert_eq!(cache, before, "a refused step changes no page");
        cache.step(&spec, &weights, &flat, &[0, 4, 6]).unwrap();
        assert_eq!(cache.seq_lens, [4, 2]);
    }
}
