//! The example layers, built in code the way examples/*.attn describe them.

use ccc::spec::{
    AttentionSpec, ConvKind, ConvStage, KeyTemperature, Mask, QkNorm, Rope, RopeStyle,
};

/// ZAYA1's CCGQA layer.
pub fn zaya1() -> AttentionSpec {
    AttentionSpec {
        qk_conv: vec![
            ConvStage {
                kind: ConvKind::Depthwise,
                width: 2,
            },
            ConvStage {
                kind: ConvKind::PerHead,
                width: 2,
            },
        ],
        qk_mean: true,
        value_shift: 1,
        qk_norm: QkNorm::L2,
        key_temperature: KeyTemperature::Learned,
        rope: Some(Rope {
            fraction: 0.5,
            rotary_dim: 64,
            theta: 5e6,
            style: RopeStyle::Neox,
        }),
        ..AttentionSpec::plain("zaya1", 2048, 128, 8, 2)
    }
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
        qk_conv: vec![
            ConvStage {
                kind: ConvKind::Depthwise,
                width: 2,
            },
            ConvStage {
                kind: ConvKind::PerHead,
                width: 2,
            },
        ],
        qk_mean: true,
        qk_norm: QkNorm::L2,
        key_temperature: KeyTemperature::LearnedExp,
        rope: Some(Rope {
            fraction: 1.0,
            rotary_dim: 128,
            theta: 1e4,
            style: RopeStyle::Neox,
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
        }),
        ..AttentionSpec::plain("swa", 2048, 128, 16, 4)
    }
}

pub fn all() -> Vec<AttentionSpec> {
    vec![zaya1(), mha(), gqa(), mqa(), cca(), sliding_window_gqa()]
}
