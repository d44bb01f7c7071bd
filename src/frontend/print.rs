//! `AttentionSpec` → canonical `.attn` text: every item explicit, defaults and derived values
//! resolved, derived quantities in comments. What `ccc compile --emit spec` prints; parsing it
//! back gives the same spec (floats are printed in Rust's shortest round-trip form).

use std::fmt::Write;

use crate::spec::{AttentionSpec, ConvKind, KeyTemperature, Mask, QkNorm, RopeStyle};

pub fn spec_text(spec: &AttentionSpec) -> String {
    let mut lines: Vec<(String, String)> = Vec::new();
    let mut line = |item: String, comment: String| lines.push((item, comment));
    let key = |name: &str| format!("{name:<15} = ");

    line(format!("{}{}", key("model_dim"), spec.model_dim), String::new());
    match &spec.mla {
        Some(mla) => {
            line(format!("{}{}", key("query_heads"), spec.query_heads), "one key/value head each".to_string());
            let q_rank = mla.q_rank.map_or("none".to_string(), |rank| rank.to_string());
            line(
                format!(
                    "mla {{ kv_rank = {}, q_rank = {q_rank}, rope_dim = {}, nope_dim = {}, v_dim = {}, rms_eps = {:?} }}",
                    mla.kv_rank, mla.rope_dim, mla.nope_dim, mla.v_dim, mla.rms_eps
                ),
                format!("query/key width {}", spec.head_dim),
            );
        }
        None => {
        line(format!("{}{}", key("head_dim"), spec.head_dim), String::new());
        line(
            format!("{}{}", key("query_heads"), spec.query_heads),
            format!("compression {}", short(spec.compression())),
        );
        line(format!("{}{}", key("kv_heads"), spec.kv_heads), format!("groups {}", spec.groups()));
        if !spec.qk_conv.is_empty() {
            line("qk_conv {".to_string(), format!("history T = {} tokens", spec.conv_history()));
            for (stage, name) in spec.qk_conv.iter().zip(spec.conv_stage_names()) {
                let kind = match stage.kind {
                    ConvKind::Depthwise => "depthwise",
                    ConvKind::PerHead => "per_head",
                };
                line(format!("    {kind}(width = {})", stage.width), name);
            }
            line("}".to_string(), String::new());
        }
        line(format!("{}{}", key("qk_mean"), spec.qk_mean), String::new());
        line(format!("{}{}", key("value_shift"), spec.value_shift), String::new());
        let norm = match spec.qk_norm {
            QkNorm::None => "none",
            QkNorm::L2 => "l2",
        };
        line(format!("{}{norm}", key("qk_norm")), String::new());
        let temperature = match spec.key_temperature {
            KeyTemperature::None => "none",
            KeyTemperature::Learned => "learned",
            KeyTemperature::LearnedExp => "learned_exp",
        };
        line(format!("{}{temperature}", key("key_temperature")), String::new());
        }
    }
    if let Some(rope) = &spec.rope {
        let style = match rope.style {
            RopeStyle::Neox => "neox",
            RopeStyle::Interleaved => "interleaved",
        };
        line(
            {
                let yarn = rope.yarn.map_or(String::new(), |yarn| {
                    format!(
                        ", yarn(factor = {:?}, original_positions = {}, beta_fast = {:?}, beta_slow = {:?}, mscale = {:?}, mscale_all_dim = {:?})",
                        yarn.factor, yarn.original_positions, yarn.beta_fast, yarn.beta_slow, yarn.mscale, yarn.mscale_all_dim
                    )
                });
                match spec.mla {
                    Some(_) => format!("rope {{ theta = {:?}, style = {style}{yarn} }}", rope.theta),
                    None => format!("rope {{ fraction = {:?}, theta = {:?}, style = {style}{yarn} }}", rope.fraction, rope.theta),
                }
            },
            format!("rotary width {}", rope.rotary_dim),
        );
    }
    let mask = match spec.mask {
        Mask::None => "none".to_string(),
        Mask::Causal => "causal".to_string(),
        Mask::SlidingWindow { window } => format!("sliding_window({window})"),
    };
    line(format!("{}{mask}", key("mask")), String::new());
    line(format!("{}{:?}", key("softmax_scale"), spec.softmax_scale), String::new());
    if spec.mla.is_none() {
        line(format!("{}{:?}", key("norm_eps"), spec.norm_eps), String::new());
    }
    line(format!("{}{}", key("dtype"), spec.dtype.name()), String::new());
    line(format!("{}{}", key("bias"), spec.bias), String::new());
    line(format!("{}{}", key("deterministic"), spec.deterministic), String::new());
    let entries: Vec<&str> = spec.entry_points.iter().map(|entry| entry.name()).collect();
    line(format!("{}[{}]", key("emit"), entries.join(", ")), String::new());
    if let Some(tune) = &spec.tune {
        let shapes: Vec<String> =
            [("batch", tune.batch), ("seq_len", tune.seq_len), ("kv_len", tune.kv_len)]
                .into_iter()
                .filter_map(|(name, size)| size.map(|size| format!("{name} = {size}")))
                .collect();
        line(format!("tune {{ {} }}", shapes.join(", ")), String::new());
    }

    let width = lines
        .iter()
        .filter(|(_, comment)| !comment.is_empty())
        .map(|(item, _)| item.len())
        .max()
        .unwrap_or(0);
    let mut text = format!("attention {} {{\n", spec.name);
    for (item, comment) in lines {
        if comment.is_empty() {
            let _ = writeln!(text, "    {item}");
        } else {
            let _ = writeln!(text, "    {item:<width$}  // {comment}");
        }
    }
    text.push_str("}\n");
    text
}

/// A ratio without a trailing `.0` when whole, else with up to three decimals.
fn short(value: f64) -> String {
    if value.fract() == 0.0 { format!("{value:.0}") } else { format!("{value:.3}") }
}
