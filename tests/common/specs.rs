//! Specs for the tests: the example layers built in code the way examples/*.attn describe them,
//! the examples parsed from their files, hand-made small layers, and the graph tests' random
//! specs.

use super::rng::SplitMix64;
use ccc::spec::{
    AttentionSpec, ConvKind, ConvStage, DType, KeyTemperature, Mask, QkNorm, Rope, RopeStyle,
};

/// ZAYA1's convolution: depthwise then per-head, both of width 2.
fn zaya1_convolution() -> Vec<ConvStage> {
    vec![
        ConvStage {
            kind: ConvKind::Depthwise,
            width: 2,
        },
        ConvStage {
            kind: ConvKind::PerHead,
            width: 2,
        },
    ]
}

/// A layer with ZAYA1's CCA parts (both convolutions, q-k mean, one shifted value head, L2
/// norm with learned temperature, NeoX RoPE on half the head at θ = 5e6) at any sizes.
pub fn zaya1_like(
    name: &str,
    model_dim: usize,
    head_dim: usize,
    query_heads: usize,
    kv_heads: usize,
) -> AttentionSpec {
    AttentionSpec {
        qk_conv: zaya1_convolution(),
        qk_mean: true,
        value_shift: 1,
        qk_norm: QkNorm::L2,
        key_temperature: KeyTemperature::Learned,
        rope: Some(Rope {
            fraction: 0.5,
            rotary_dim: head_dim / 2,
            theta: 5e6,
            style: RopeStyle::Neox,
            yarn: None,
        }),
        ..AttentionSpec::plain(name, model_dim, head_dim, query_heads, kv_heads)
    }
}

/// The reference tests' ZAYA1-like layer in miniature (E = 64, d = 16, 4 query heads, 2 kv
/// heads), with biases and RoPE at θ = 1e4. The Hugging Face comparison in
/// tests/reference_properties.rs pins numbers to exactly this spec: change it only with them.
pub fn small_zaya_like(name: &str) -> AttentionSpec {
    AttentionSpec {
        rope: Some(Rope {
            fraction: 0.5,
            rotary_dim: 8,
            theta: 10_000.0,
            style: RopeStyle::Neox,
            yarn: None,
        }),
        bias: true,
        ..zaya1_like(name, 64, 16, 4, 2)
    }
}

/// ZAYA1's CCGQA layer.
pub fn zaya1() -> AttentionSpec {
    zaya1_like("zaya1", 2048, 128, 8, 2)
}

pub fn mha() -> AttentionSpec {
    AttentionSpec::plain("mha", 2048, 128, 16, 16)
}

pub fn gqa() -> AttentionSpec {
    AttentionSpec::plain("gqa", 2048, 128, 16, 4)
}

pub fn mqa() -> AttentionSpec {
    AttentionSpec::plain("mqa", 2048, 128, 16, 1)
}

/// Plain CCA: 4× query compression, one query head per kv head, no value shift.
pub fn cca() -> AttentionSpec {
    AttentionSpec {
        qk_conv: zaya1_convolution(),
        qk_mean: true,
        qk_norm: QkNorm::L2,
        key_temperature: KeyTemperature::LearnedExp,
        rope: Some(Rope {
            fraction: 1.0,
            rotary_dim: 128,
            theta: 1e4,
            style: RopeStyle::Neox,
            yarn: None,
        }),
        ..AttentionSpec::plain("cca", 2048, 128, 4, 4)
    }
}

/// GQA with a 4096-token sliding window and interleaved RoPE.
pub fn sliding_window_gqa() -> AttentionSpec {
    AttentionSpec {
        mask: Mask::SlidingWindow { window: 4096 },
        rope: Some(Rope {
            fraction: 1.0,
            rotary_dim: 128,
            theta: 1e4,
            style: RopeStyle::Interleaved,
            yarn: None,
        }),
        ..AttentionSpec::plain("swa", 2048, 128, 16, 4)
    }
}

pub fn all() -> Vec<AttentionSpec> {
    vec![zaya1(), mha(), gqa(), mqa(), cca(), sliding_window_gqa()]
}

/// Every examples/*.attn, parsed and checked, in file-name order.
pub fn example_files() -> Vec<AttentionSpec> {
    let directory = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut paths: Vec<_> = std::fs::read_dir(&directory)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "attn"))
        .collect();
    paths.sort();
    assert!(paths.len() >= 7, "examples/*.attn: found only {paths:?}");
    paths
        .iter()
        .flat_map(|path| {
            let text = std::fs::read_to_string(path).unwrap();
            ccc::frontend::parse_and_check(&path.display().to_string(), &text)
                .unwrap_or_else(|diagnostics| panic!("{}", diagnostics.render()))
        })
        .collect()
}

/// What [`random_small_spec`] draws from where the graph tests differ.
pub struct SmallSpecChoices<'a> {
    pub head_dims: &'a [usize],
    pub windows: &'a [usize],
    /// Draw bf16 or f16; otherwise keep `AttentionSpec::plain`'s dtype (and draw nothing).
    pub random_dtype: bool,
}

/// A random spec with tiny heads for the graph interpreter tests (the specs need not fit a
/// kernel), named `case{index}`.
pub fn random_small_spec(
    rng: &mut SplitMix64,
    index: usize,
    choices: &SmallSpecChoices,
) -> AttentionSpec {
    let head_dim = rng.pick(choices.head_dims);
    let kv_heads = 1 + rng.below(3);
    let query_heads = kv_heads * (1 + rng.below(3));
    let model_dim = head_dim * (1 + rng.below(2 * query_heads));
    let qk_conv = (0..rng.below(4))
        .map(|_| ConvStage {
            kind: if rng.flip() {
                ConvKind::Depthwise
            } else {
                ConvKind::PerHead
            },
            width: 1 + rng.below(4),
        })
        .collect();
    let qk_norm = if rng.flip() { QkNorm::L2 } else { QkNorm::None };
    let key_temperature = match qk_norm {
        QkNorm::None => KeyTemperature::None,
        QkNorm::L2 => rng.pick(&[
            KeyTemperature::None,
            KeyTemperature::Learned,
            KeyTemperature::LearnedExp,
        ]),
    };
    let rope = rng.flip().then(|| {
        // Any even rotary width up to d: fractions from 2/d to 1.
        let rotary_dim = 2 * (1 + rng.below(head_dim / 2));
        Rope {
            fraction: rotary_dim as f64 / head_dim as f64,
            rotary_dim,
            theta: rng.pick(&[10.0, 1e4, 5e6]),
            style: if rng.flip() {
                RopeStyle::Neox
            } else {
                RopeStyle::Interleaved
            },
            yarn: None,
        }
    });
    let mask = match rng.below(3) {
        0 => Mask::None,
        1 => Mask::Causal,
        _ => Mask::SlidingWindow {
            window: rng.pick(choices.windows),
        },
    };
    let plain = AttentionSpec::plain(
        &format!("case{index}"),
        model_dim,
        head_dim,
        query_heads,
        kv_heads,
    );
    // Fields in the order the generators have always drawn them, so seeds keep their cases.
    AttentionSpec {
        qk_conv,
        qk_mean: rng.flip(),
        value_shift: rng.below(kv_heads + 1),
        qk_norm,
        key_temperature,
        rope,
        mask,
        softmax_scale: rng.uniform(0.2, 1.5),
        norm_eps: rng.pick(&[0.0, 1e-12, 1e-3]),
        dtype: if choices.random_dtype {
            rng.pick(&[DType::Bf16, DType::F16])
        } else {
            plain.dtype
        },
        bias: rng.flip(),
        ..plain
    }
}
