//! `ccc explain`: what a layer costs, next to the plain multi-head layer of the same width.

use std::fmt::Write;

use crate::spec::{AttentionSpec, ConvKind, KeyTemperature, Mask, Mla, QkNorm, RopeStyle};

/// Sequence length for per-token FLOPs when neither the command line nor `tune.seq_len` gives one.
pub const DEFAULT_SEQ_LEN: usize = 4096;

/// The costs `explain` prints, for one layer at one sequence length.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LayerCosts {
    pub parameters: usize,
    /// K and V of every kv head: 2 · Hk · d · dtype bytes.
    pub kv_cache_bytes_per_token: usize,
    /// The raw packed rows of the last T tokens: P · T · dtype bytes.
    pub conv_state_bytes: usize,
    /// The previous token's x·W_v2ᵀ: value_shift · d · dtype bytes.
    pub shift_state_bytes: usize,
    /// What the forward keeps for the backward per token (the backward plan's inputs but x and
    /// dout: p0, q, k, v, o, lse), whether or not the spec emits backward.
    pub saved_for_backward_bytes_per_token: usize,
    /// Keys an average query sees at this sequence length under the mask.
    pub average_keys: f64,
    /// Forward FLOPs per token: projections, convolutions, attention, output projection
    /// (elementwise steps such as the mean, norm and RoPE are not counted).
    pub forward_flops_per_token: f64,
}

impl LayerCosts {
    pub fn of(spec: &AttentionSpec, seq_len: usize) -> LayerCosts {
        if let Some(mla) = &spec.mla {
            return LayerCosts::of_mla(spec, mla, seq_len);
        }
        let bytes = spec.dtype.size_bytes();
        let (e, d) = (spec.model_dim as f64, spec.head_dim as f64);
        let (lq, lk, p) =
            (spec.q_width() as f64, spec.kv_width() as f64, spec.packed_width() as f64);
        let projections = 2.0 * e * (lq + 2.0 * lk) + 2.0 * lq * e;
        let convolutions: f64 = spec
            .qk_conv
            .iter()
            .map(|stage| {
                let k = stage.width as f64;
                match stage.kind {
                    ConvKind::Depthwise => 2.0 * p * k,
                    ConvKind::PerHead => 2.0 * p * d * k,
                }
            })
            .sum();
        let average_keys = average_keys(spec.mask, seq_len);
        LayerCosts {
            parameters: spec.param_count(),
            kv_cache_bytes_per_token: 2 * spec.kv_width() * bytes,
            conv_state_bytes: spec.packed_width() * spec.conv_history() * bytes,
            shift_state_bytes: spec.value_shift * spec.head_dim * bytes,
            saved_for_backward_bytes_per_token: saved_bytes_per_token(spec),
            average_keys,
            forward_flops_per_token: projections + convolutions + 4.0 * average_keys * lq,
        }
    }

    /// MLA in DeepSeek-V2's accounting: the cache keeps the latent c_kv and the shared rotated
    /// key k_pe per token (the absorbed decode's cache); the forward runs attention with
    /// `nope_dim + rope_dim`-wide queries and keys and `v_dim`-wide values per head.
    fn of_mla(spec: &AttentionSpec, mla: &Mla, seq_len: usize) -> LayerCosts {
        let (e, h) = (spec.model_dim as f64, spec.query_heads as f64);
        let (qk, v) = (spec.head_dim as f64, mla.v_dim as f64);
        let queries = match mla.q_rank {
            Some(rank) => 2.0 * e * rank as f64 + 2.0 * rank as f64 * h * qk,
            None => 2.0 * e * h * qk,
        };
        let latent = 2.0 * e * mla.cached_width() as f64 + 2.0 * mla.kv_rank as f64 * h * (mla.nope_dim as f64 + v);
        let output = 2.0 * h * v * e;
        let average_keys = average_keys(spec.mask, seq_len);
        LayerCosts {
            parameters: spec.param_count(),
            kv_cache_bytes_per_token: mla.cached_width() * spec.dtype.size_bytes(),
            conv_state_bytes: 0,
            shift_state_bytes: 0,
            // No MLA backward is planned yet.
            saved_for_backward_bytes_per_token: 0,
            average_keys,
            forward_flops_per_token: queries + latent + output + 2.0 * average_keys * h * (qk + v),
        }
    }
}

/// Bytes per token of the buffers the backward reads from the forward (its plan's inputs but x
/// and dout); 0 for a spec the backward cannot be planned for.
fn saved_bytes_per_token(spec: &AttentionSpec) -> usize {
    let Ok(plan) = crate::ir::plan::plan_backward(spec) else { return 0 };
    let bytes = |seq_len: u64| -> u64 {
        let env = crate::ir::size::SizeEnv { batch: 1, seq_len, sms: None, pages: None, blocks: None };
        plan.inputs
            .iter()
            .filter(|b| !matches!(b.name.as_str(), "x" | "dout"))
            .map(|b| {
                let elements: u64 = b.ty.shape.iter().map(|d| d.eval(&env).unwrap_or(0)).product();
                elements * b.ty.elem.size_bytes() as u64
            })
            .sum()
    };
    (bytes(2) - bytes(1)) as usize
}

/// The number of keys an average query of a sequence of `seq_len` tokens sees under `mask`.
pub fn average_keys(mask: Mask, seq_len: usize) -> f64 {
    let s = seq_len as f64;
    match mask {
        Mask::None => s,
        Mask::Causal => (s + 1.0) / 2.0,
        Mask::SlidingWindow { window } if window >= seq_len => (s + 1.0) / 2.0,
        Mask::SlidingWindow { window } => {
            // Queries 0..w-1 see t+1 keys, the remaining S-w see w each.
            let w = window as f64;
            (w * (w + 1.0) / 2.0 + (s - w) * w) / s
        }
    }
}

/// What kind of attention this is, in the usual names.
pub fn kind_name(spec: &AttentionSpec) -> &'static str {
    if spec.mla.is_some() {
        return "MLA";
    }
    let compressed = spec.query_heads * spec.head_dim != spec.model_dim;
    match (spec.has_cca_parts() || compressed, spec.groups() == 1) {
        (true, true) => "CCA",
        (true, false) => "CCGQA",
        (false, _) if spec.query_heads == spec.kv_heads => "MHA",
        (false, _) if spec.kv_heads == 1 => "MQA",
        (false, _) => "GQA",
    }
}

/// One screen about the layer: its shape, then its costs next to the equivalent MHA.
pub fn explain_text(spec: &AttentionSpec, seq_len: usize) -> String {
    let mha = spec.equivalent_mha();
    let this = LayerCosts::of(spec, seq_len);
    let base = LayerCosts::of(&mha, seq_len);
    let mut text = format!(
        "{} ({}): model_dim E = {}, {} query and {} kv heads of width {}\n",
        spec.name,
        kind_name(spec),
        spec.model_dim,
        spec.query_heads,
        spec.kv_heads,
        spec.head_dim
    );
    let mut row = |name: &str, value: String| {
        let _ = writeln!(text, "  {name:<15}{value}");
    };
    if let Some(mla) = &spec.mla {
        mla_rows(spec, mla, &mut row);
    } else {
        cca_rows(spec, &mut row);
    }
    row(
        "rotary",
        match &spec.rope {
            None => "none".to_string(),
            Some(rope) => format!(
                "{} of {} channels ({}), theta {}, {}",
                rope.rotary_dim,
                spec.head_dim,
                if spec.mla.is_some() { "the last ones".to_string() } else { format!("fraction {}", rope.fraction) },
                rope.theta,
                match rope.style {
                    RopeStyle::Neox => "neox",
                    RopeStyle::Interleaved => "interleaved",
                }
            ),
        },
    );
    row(
        "softmax scale",
        format!(
            "{:.6} (1/sqrt(d) = {:.6})",
            spec.softmax_scale,
            1.0 / (spec.head_dim as f64).sqrt()
        ),
    );
    let mask = match spec.mask {
        Mask::None => "none".to_string(),
        Mask::Causal => "causal".to_string(),
        Mask::SlidingWindow { window } => format!("sliding_window({window})"),
    };
    row("mask, dtype", format!("{mask}, {}", spec.dtype.name()));
    comparison(spec, &mha, &this, &base, seq_len, &mut text);
    text
}

/// MLA's heads, latents and cache.
fn mla_rows(spec: &AttentionSpec, mla: &Mla, row: &mut impl FnMut(&str, String)) {
    row(
        "heads",
        format!(
            "H = {} (one key/value head each), q/k width d = nope {} + rope {} = {}, v width {}",
            spec.query_heads, mla.nope_dim, mla.rope_dim, spec.head_dim, mla.v_dim
        ),
    );
    let queries = match mla.q_rank {
        Some(rank) => format!("q_rank {rank}"),
        None => "queries straight from x".to_string(),
    };
    row("latents", format!("{queries}, kv_rank {} (RMSNorm, eps {:e})", mla.kv_rank, mla.rms_eps));
    row(
        "cache",
        format!(
            "c_kv + k_pe = {} + {} = {} values per token (absorbed decode)",
            mla.kv_rank,
            mla.rope_dim,
            mla.cached_width()
        ),
    );
}

/// The heads, latent widths and CCA parts of a CCA/GQA/MHA layer.
fn cca_rows(spec: &AttentionSpec, row: &mut impl FnMut(&str, String)) {
    row(
        "heads",
        format!(
            "Hq = {}, Hk = {}, G = {}, d = {}",
            spec.query_heads,
            spec.kv_heads,
            spec.groups(),
            spec.head_dim
        ),
    );
    row(
        "latent widths",
        format!(
            "Lq = Hq·d = {}, Lk = Hk·d = {}, P = Lq + Lk = {}",
            spec.q_width(),
            spec.kv_width(),
            spec.packed_width()
        ),
    );
    row("compression", format!("{} (E / Lq)", ratio_text(spec.compression())));
    let convolution = if spec.qk_conv.is_empty() {
        "none".to_string()
    } else {
        let stages: Vec<String> = spec
            .qk_conv
            .iter()
            .map(|stage| {
                let kind = match stage.kind {
                    ConvKind::Depthwise => "depthwise",
                    ConvKind::PerHead => "per_head",
                };
                format!("{kind}({})", stage.width)
            })
            .collect();
        format!("{}, history T = {} tokens", stages.join(" → "), spec.conv_history())
    };
    row("convolution", convolution);
    let mut extras = Vec::new();
    if spec.qk_mean {
        extras.push("q-k mean".to_string());
    }
    if spec.value_shift > 0 {
        extras.push(format!("value_shift {}", spec.value_shift));
    }
    if spec.qk_norm == QkNorm::L2 {
        extras.push(format!("L2 qk norm (eps {:e})", spec.norm_eps));
    }
    if spec.key_temperature != KeyTemperature::None {
        let temperature = match spec.key_temperature {
            KeyTemperature::LearnedExp => "learned_exp",
            _ => "learned",
        };
        extras.push(format!("key temperature {temperature}"));
    }
    row("CCA parts", if extras.is_empty() { "none".to_string() } else { extras.join(", ") });
}

/// The costs next to the equivalent MHA's.
fn comparison(
    spec: &AttentionSpec,
    mha: &AttentionSpec,
    this: &LayerCosts,
    base: &LayerCosts,
    seq_len: usize,
    text: &mut String,
) {
    let _ = writeln!(text);
    let mha_heading = format!("MHA ({} heads)", mha.query_heads);
    let _ =
        writeln!(text, "  {:<36}{:>16}{:>16}{:>12}", "", "this layer", mha_heading, "MHA / this");
    let mut compare =
        |name: String, this: String, base_text: String, this_value: f64, base_value: f64| {
            let ratio = if this_value > 0.0 && base_value > 0.0 {
                format!("{:.2}×", base_value / this_value)
            } else {
                "—".to_string()
            };
            let _ = writeln!(text, "  {name:<36}{this:>16}{base_text:>16}{ratio:>12}");
        };
    compare(
        "parameters".to_string(),
        si(this.parameters as f64),
        si(base.parameters as f64),
        this.parameters as f64,
        base.parameters as f64,
    );
    // Byte counts, printed as they are.
    let counts = [
        ("KV cache bytes / token", this.kv_cache_bytes_per_token, base.kv_cache_bytes_per_token),
        ("conv state bytes / sequence", this.conv_state_bytes, base.conv_state_bytes),
        ("shift state bytes / sequence", this.shift_state_bytes, base.shift_state_bytes),
        (
            "saved for backward bytes / token",
            this.saved_for_backward_bytes_per_token,
            base.saved_for_backward_bytes_per_token,
        ),
    ];
    for (name, this_count, base_count) in counts {
        compare(name.to_string(), this_count.to_string(), base_count.to_string(), this_count as f64, base_count as f64);
    }
    compare(
        format!("forward FLOPs / token (S = {seq_len})"),
        si(this.forward_flops_per_token),
        si(base.forward_flops_per_token),
        this.forward_flops_per_token,
        base.forward_flops_per_token,
    );
    let _ = writeln!(text);
    let _ = match spec.mla {
        Some(_) => writeln!(
            text,
            "  parameters exactly: {} (MHA {}); the cache keeps c_kv and k_pe (the absorbed decode's); no backward is planned for MLA yet",
            this.parameters, base.parameters
        ),
        None => writeln!(
            text,
            "  parameters exactly: {} (MHA {}); shift state: the previous token's x·W_v2ᵀ; saved for backward: q, k, v, o, lse (and p0 for a norm, convolution or q-k mean)",
            this.parameters, base.parameters
        ),
    };
    let attention = match &spec.mla {
        Some(mla) => format!("2·H·(d + v_dim) = {} per key", 2 * spec.query_heads * (spec.head_dim + mla.v_dim)),
        None => "4·Lq per key".to_string(),
    };
    let _ = writeln!(
        text,
        "  FLOPs: projections + convolutions + attention ({attention}, {:.1} keys per query on average)",
        this.average_keys
    );
}

/// 5.58M, 16.8M, 1.23G: three significant figures with an SI suffix.
fn si(value: f64) -> String {
    let (scaled, suffix) = if value >= 1e12 {
        (value / 1e12, "T")
    } else if value >= 1e9 {
        (value / 1e9, "G")
    } else if value >= 1e6 {
        (value / 1e6, "M")
    } else if value >= 1e3 {
        (value / 1e3, "k")
    } else {
        return format!("{value:.0}");
    };
    let decimals = if scaled >= 100.0 {
        0
    } else if scaled >= 10.0 {
        1
    } else {
        2
    };
    format!("{scaled:.decimals$}{suffix}")
}

fn ratio_text(value: f64) -> String {
    if value.fract() == 0.0 { format!("{value:.0}×") } else { format!("{value:.3}×") }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn average_keys_counts_what_the_mask_allows() {
        for mask in [Mask::None, Mask::Causal, Mask::SlidingWindow { window: 5 }] {
            for seq_len in [1, 4, 5, 6, 17] {
                let seen: usize =
                    (0..seq_len).map(|t| (0..seq_len).filter(|&j| mask.allows(t, j)).count()).sum();
                let expected = seen as f64 / seq_len as f64;
                assert!(
                    (average_keys(mask, seq_len) - expected).abs() < 1e-12,
                    "{mask:?} {seq_len}"
                );
            }
        }
    }

    #[test]
    fn zaya1_costs_match_hand_arithmetic() {
        let spec = crate::frontend::zaya1_example();
        let costs = LayerCosts::of(&spec, 16384);
        assert_eq!(costs.kv_cache_bytes_per_token, 2 * 2 * 128 * 2);
        assert_eq!(costs.conv_state_bytes, 1280 * 2 * 2);
        assert_eq!(costs.shift_state_bytes, 256);
        // p0 [P], q and o [Lq], k and v [Lk] in bf16, lse [Hq] in f32.
        assert_eq!(costs.saved_for_backward_bytes_per_token, (1280 + 2 * 1024 + 2 * 256) * 2 + 8 * 4);
        // Projections 2·E·(Lq + 2·Lk) + output 2·Lq·E + depthwise 2·P·K + per-head 2·P·d·K
        // + attention 4·Lq·(S + 1)/2.
        let flops = 2.0 * 2048.0 * (1024.0 + 512.0)
            + 2.0 * 1024.0 * 2048.0
            + 2.0 * 1280.0 * 2.0
            + 2.0 * 1280.0 * 128.0 * 2.0
            + 4.0 * 1024.0 * 16385.0 / 2.0;
        assert_eq!(costs.forward_flops_per_token, flops);
        let mha = LayerCosts::of(&spec.equivalent_mha(), 16384);
        assert_eq!((mha.kv_cache_bytes_per_token, mha.conv_state_bytes), (8192, 0));
        assert_eq!(kind_name(&spec), "CCGQA");
        assert_eq!(kind_name(&spec.equivalent_mha()), "MHA");
    }
}
