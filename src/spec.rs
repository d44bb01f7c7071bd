//! `AttentionSpec`: one attention layer, fully resolved and validated.
//!
//! This is the contract between the frontend (which builds it from `.attn` text and enforces every
//! rule of docs/language.md) and everything after it: the CPU reference, the IR, codegen and the
//! runtime. Code that receives an `AttentionSpec` may assume it is valid; `AttentionSpec::validate`
//! restates the invariants so that specs built by hand (tests, property generators) are checked too.
//! It is serialisable so that a kernel library's manifest can carry it to the GPU machine.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttentionSpec {
    /// Block name; prefixes every kernel symbol.
    pub name: String,
    /// E: width of the layer's input and output.
    pub model_dim: usize,
    /// d: width of one head, query and key/value alike.
    pub head_dim: usize,
    /// Hq: query heads (the latent heads for CCA).
    pub query_heads: usize,
    /// Hk: key/value heads. Query head h reads kv head h / (Hq / Hk).
    pub kv_heads: usize,
    /// Causal convolution stages over the packed [q0 | k0] channels, applied in order.
    pub qk_conv: Vec<ConvStage>,
    /// The q-k mean skip connection (language.md, Semantics step 4).
    pub qk_mean: bool,
    /// How many kv heads (the last ones) take their value from the previous token's input.
    pub value_shift: usize,
    pub qk_norm: QkNorm,
    pub key_temperature: KeyTemperature,
    pub rope: Option<Rope>,
    pub mask: Mask,
    /// Multiplies the logits before softmax.
    pub softmax_scale: f64,
    /// Added to the squared norm inside the reciprocal square root of the L2 norm.
    pub norm_eps: f64,
    pub dtype: DType,
    /// Biases on the four projections (q, k, v, o).
    pub bias: bool,
    /// The backward sums in a fixed order, so that it gives the same bits every run (the
    /// attention backward in two passes instead of dQ, and a group's dK and dV, by atomics).
    #[serde(default)]
    pub deterministic: bool,
    /// Entry points the library provides, in a fixed order without duplicates.
    pub entry_points: Vec<EntryPoint>,
    /// Shapes that tile selection should favour.
    pub tune: Option<TuneShape>,
    /// Multi-head latent attention (DeepSeek-V2/V3): queries and keys/values through low-rank
    /// latents; then `head_dim` is the query/key width `nope_dim + rope_dim`, `kv_heads` equals
    /// `query_heads`, and `rope` rotates each head's last `rope_dim` channels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mla: Option<Mla>,
}

/// The latent parts of an MLA layer (docs/language.md, "MLA"), with Hugging Face
/// `DeepseekV3Attention`'s meaning: `c_kv = RMSNorm(x·W_dkv)[..kv_rank]` (the cached latent),
/// `k_pe` = the projection's last `rope_dim` channels (shared by all heads, rotated), per head
/// `[k_nope | v] = c_kv·W_ukv`, queries `x·W_q` or `RMSNorm(x·W_dq)·W_uq` (`q_rank`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Mla {
    /// The query latent's width (`q_lora_rank`); none: queries straight from x.
    pub q_rank: Option<usize>,
    /// The key/value latent's width (`kv_lora_rank`): what the cache keeps per token.
    pub kv_rank: usize,
    /// Rotated channels at the end of each query and key head (`qk_rope_head_dim`).
    pub rope_dim: usize,
    /// Channels of each query and key head without position (`qk_nope_head_dim`).
    pub nope_dim: usize,
    /// Width of each value head (`v_head_dim`).
    pub v_dim: usize,
    /// ε of both latents' RMSNorm (`DeepseekV3RMSNorm`'s 1e-6 by default).
    pub rms_eps: f64,
}

impl Mla {
    /// Values the cache keeps per token: the latent and the shared rotated key.
    pub fn cached_width(&self) -> usize {
        self.kv_rank + self.rope_dim
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvStage {
    pub kind: ConvKind,
    /// Taps K; the stage needs K - 1 rows of history.
    pub width: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvKind {
    /// One K-tap filter per channel, with bias (Conv1d with groups = channels).
    Depthwise,
    /// For each head, a d×d matrix per tap, with bias (Conv1d with groups = Hq + Hk).
    PerHead,
}

impl ConvKind {
    /// Input channels each output channel reads per tap (Conv1d's in_channels / groups).
    pub fn inputs_per_output(self, head_dim: usize) -> usize {
        match self {
            ConvKind::Depthwise => 1,
            ConvKind::PerHead => head_dim,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QkNorm {
    None,
    L2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyTemperature {
    None,
    /// τ_j = temp_j.
    Learned,
    /// τ_j = exp(clamp(temp_j, 1e-7, 2)).
    LearnedExp,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Rope {
    /// Fraction of each head's channels that rotate, as written in the spec.
    pub fraction: f64,
    /// r = head_dim · fraction: the rotated channels (the first r of each head). Even, > 0.
    pub rotary_dim: usize,
    pub theta: f64,
    pub style: RopeStyle,
    /// YaRN's context extension (docs/language.md, "RoPE scaling"); none: plain RoPE.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub yarn: Option<Yarn>,
}

/// YaRN (arXiv 2309.00071) as Hugging Face's `_compute_yarn_parameters` reads `rope_type = "yarn"`:
/// frequencies between θ's and θ's divided by `factor`, ramped over the channels whose wavelengths
/// lie between `beta_fast` and `beta_slow` rotations in `original_positions`; cos and sin scaled
/// by [`Yarn::attention_factor`]; an MLA layer's logits also by [`Yarn::softmax_factor`].
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Yarn {
    pub factor: f64,
    pub original_positions: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// 0: not given.
    pub mscale: f64,
    /// 0: not given.
    pub mscale_all_dim: f64,
}

impl Yarn {
    /// YaRN's `0.1·m·ln(factor) + 1` (1 for factor ≤ 1).
    fn magnitude(&self, m: f64) -> f64 {
        if self.factor <= 1.0 { 1.0 } else { 0.1 * m * self.factor.ln() + 1.0 }
    }

    /// What cos and sin are multiplied by.
    pub fn attention_factor(&self) -> f64 {
        if self.mscale != 0.0 && self.mscale_all_dim != 0.0 {
            self.magnitude(self.mscale) / self.magnitude(self.mscale_all_dim)
        } else {
            self.magnitude(1.0)
        }
    }

    /// What DeepSeek's MLA multiplies its softmax scale by: the square of the `mscale_all_dim`
    /// magnitude (1 when it is not given).
    pub fn softmax_factor(&self) -> f64 {
        if self.mscale_all_dim != 0.0 { self.magnitude(self.mscale_all_dim).powi(2) } else { 1.0 }
    }

    /// The inverse frequency of each of the r/2 rotated pairs.
    pub fn inverse_frequencies(&self, theta: f64, rotary_dim: usize) -> Vec<f64> {
        let r = rotary_dim as f64;
        let correction = |rotations: f64| {
            r * (self.original_positions as f64 / (rotations * 2.0 * std::f64::consts::PI)).ln() / (2.0 * theta.ln())
        };
        let low = correction(self.beta_fast).floor().max(0.0);
        let mut high = correction(self.beta_slow).ceil().min(r - 1.0);
        if low == high {
            high += 0.001;
        }
        (0..rotary_dim / 2)
            .map(|i| {
                let extrapolation = theta.powf(-2.0 * i as f64 / r);
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                // Channels below the ramp keep θ's frequency, those above it are divided by factor.
                extrapolation / self.factor * ramp + extrapolation * (1.0 - ramp)
            })
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RopeStyle {
    /// Rotates the two halves of the rotary slice (GPT-NeoX, Hugging Face `rotate_half`).
    Neox,
    /// Rotates adjacent pairs (2i, 2i + 1) (GPT-J, Meta's original LLaMA).
    Interleaved,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mask {
    /// Every query sees every key.
    None,
    /// Query t sees keys 0..=t.
    Causal,
    /// Query t sees the `window` most recent keys including itself: t - window < j <= t
    /// (the Mistral / Hugging Face `sliding_window` convention).
    SlidingWindow { window: usize },
}

impl Mask {
    /// Whether query `t` sees key `j` (both absolute positions).
    pub fn allows(self, t: usize, j: usize) -> bool {
        match self {
            Mask::None => true,
            Mask::Causal => j <= t,
            Mask::SlidingWindow { window } => j <= t && t - j < window,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DType {
    Bf16,
    F16,
}

impl DType {
    pub fn size_bytes(self) -> usize {
        2
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::Bf16 => "bf16",
            DType::F16 => "f16",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryPoint {
    Forward,
    Backward,
    Decode,
    /// A batch's prompts into the decode step's pages and state, after the forward over them:
    /// generated with `decode` (not written in `emit`).
    Prefill,
}

impl EntryPoint {
    pub fn name(self) -> &'static str {
        match self {
            EntryPoint::Forward => "forward",
            EntryPoint::Backward => "backward",
            EntryPoint::Decode => "decode",
            EntryPoint::Prefill => "prefill",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TuneShape {
    pub batch: Option<usize>,
    pub seq_len: Option<usize>,
    pub kv_len: Option<usize>,
}

/// One learned tensor of the layer, named and shaped as in a PyTorch state dict
/// (`nn.Linear` weights are [out, in]; `nn.Conv1d` weights are [out, in / groups, K]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Vec<usize>,
    pub role: ParamRole,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum ParamRole {
    QueryProj,
    /// MLA: x into the query latent (`q_a_proj`), its bias, the latent's RMSNorm weight
    /// (`q_a_layernorm`) and the latent up to the heads (`q_b_proj`).
    QueryDown,
    QueryDownBias,
    QueryNorm,
    QueryUp,
    /// MLA: x into the key/value latent and the shared rotated key (`kv_a_proj_with_mqa`), its
    /// bias, the latent's RMSNorm weight (`kv_a_layernorm`), the latent up to every head's
    /// `[k_nope | v]` (`kv_b_proj`).
    LatentDown,
    LatentDownBias,
    LatentNorm,
    LatentUp,
    KeyProj,
    /// Projection of the current token's input into the first Hk - value_shift kv heads
    /// (all Hk heads when value_shift = 0).
    ValueProjCurrent,
    /// Projection of the previous token's input into the last value_shift kv heads.
    ValueProjDelayed,
    OutputProj,
    ConvWeight { stage: usize },
    ConvBias { stage: usize },
    KeyTemperature,
    QueryBias,
    KeyBias,
    ValueBiasCurrent,
    ValueBiasDelayed,
    OutputBias,
}

impl AttentionSpec {
    /// G = Hq / Hk: query heads per kv head.
    pub fn groups(&self) -> usize {
        self.query_heads / self.kv_heads
    }
    /// kv head read by query head `h`.
    pub fn kv_head_of(&self, h: usize) -> usize {
        h / self.groups()
    }
    /// Lq = Hq · d.
    pub fn q_width(&self) -> usize {
        self.query_heads * self.head_dim
    }
    /// Lk = Hk · d (the width of k and of v).
    pub fn kv_width(&self) -> usize {
        self.kv_heads * self.head_dim
    }
    /// P = Lq + Lk: channels of the packed [q0 | k0] tensor the convolutions run on.
    pub fn packed_width(&self) -> usize {
        self.q_width() + self.kv_width()
    }
    /// T = Σ (K − 1): rows of causal history the convolution stages need.
    pub fn conv_history(&self) -> usize {
        self.qk_conv.iter().map(|s| s.width - 1).sum()
    }
    /// Query compression factor E / (d · Hq), as a ratio (1 for MHA).
    pub fn compression(&self) -> f64 {
        self.model_dim as f64 / self.q_width() as f64
    }
    /// Kv heads that read the current token (the first ones).
    pub fn current_value_heads(&self) -> usize {
        self.kv_heads - self.value_shift
    }
    /// Whether the spec uses any part of CCA (anything beyond plain MHA/GQA/MQA).
    pub fn has_cca_parts(&self) -> bool {
        !self.qk_conv.is_empty()
            || self.qk_mean
            || self.value_shift > 0
            || self.qk_norm != QkNorm::None
            || self.key_temperature != KeyTemperature::None
    }
    pub fn emits(&self, entry: EntryPoint) -> bool {
        self.entry_points.contains(&entry)
    }

    /// The entry points a library of this spec has: the emit list, with `prefill` after `decode`
    /// (a decode step needs its pages filled).
    pub fn library_entry_points(&self) -> Vec<EntryPoint> {
        let mut entries = self.entry_points.clone();
        if self.emits(EntryPoint::Decode) {
            entries.push(EntryPoint::Prefill);
        }
        entries
    }

    /// Hugging Face state-dict names of the convolution stages: the first depthwise stage is
    /// `conv_qk_depthwise`, the first per-head stage `conv_qk_grouped` (ZAYA1's names); later
    /// stages of the same kind get a suffix `_1`, `_2`, ... in order.
    pub fn conv_stage_names(&self) -> Vec<String> {
        let (mut depthwise, mut per_head) = (0, 0);
        self.qk_conv
            .iter()
            .map(|stage| {
                let (base, count) = match stage.kind {
                    ConvKind::Depthwise => ("conv_qk_depthwise", &mut depthwise),
                    ConvKind::PerHead => ("conv_qk_grouped", &mut per_head),
                };
                let name = if *count == 0 { base.to_string() } else { format!("{base}_{count}") };
                *count += 1;
                name
            })
            .collect()
    }

    /// Every learned tensor, in a fixed order, with PyTorch's shapes and the names of the
    /// matching Hugging Face attention module's state dict, so that a checkpoint loads as it is:
    /// specs with CCA parts follow `ZayaAttention` (q/k/v projections and convolutions under
    /// `qkv_proj.`, `qk_norm.temp`, `o_proj`); plain specs follow `LlamaAttention`
    /// (`q_proj`, `k_proj`, `v_proj`, `o_proj`).
    pub fn params(&self) -> Vec<ParamInfo> {
        if let Some(mla) = &self.mla {
            return self.mla_params(mla);
        }
        let (e, d) = (self.model_dim, self.head_dim);
        let p = self.packed_width();
        let prefix = if self.has_cca_parts() { "qkv_proj." } else { "" };
        let mut out = Vec::new();
        let mut push = |name: &str, shape: Vec<usize>, role: ParamRole| {
            let name = match role {
                ParamRole::KeyTemperature | ParamRole::OutputProj | ParamRole::OutputBias => {
                    name.to_string()
                }
                _ => format!("{prefix}{name}"),
            };
            out.push(ParamInfo { name, shape, role })
        };
        push("q_proj.weight", vec![self.q_width(), e], ParamRole::QueryProj);
        if self.bias {
            push("q_proj.bias", vec![self.q_width()], ParamRole::QueryBias);
        }
        push("k_proj.weight", vec![self.kv_width(), e], ParamRole::KeyProj);
        if self.bias {
            push("k_proj.bias", vec![self.kv_width()], ParamRole::KeyBias);
        }
        let current = self.current_value_heads() * d;
        let delayed = self.value_shift * d;
        if self.value_shift == 0 {
            push("v_proj.weight", vec![current, e], ParamRole::ValueProjCurrent);
            if self.bias {
                push("v_proj.bias", vec![current], ParamRole::ValueBiasCurrent);
            }
        } else {
            if current > 0 {
                push("v_proj_current.weight", vec![current, e], ParamRole::ValueProjCurrent);
                if self.bias {
                    push("v_proj_current.bias", vec![current], ParamRole::ValueBiasCurrent);
                }
            }
            push("v_proj_delayed.weight", vec![delayed, e], ParamRole::ValueProjDelayed);
            if self.bias {
                push("v_proj_delayed.bias", vec![delayed], ParamRole::ValueBiasDelayed);
            }
        }
        for (stage_index, (stage, name)) in
            self.qk_conv.iter().zip(self.conv_stage_names()).enumerate()
        {
            let in_per_group = stage.kind.inputs_per_output(d);
            push(
                &format!("{name}.weight"),
                vec![p, in_per_group, stage.width],
                ParamRole::ConvWeight { stage: stage_index },
            );
            push(&format!("{name}.bias"), vec![p], ParamRole::ConvBias { stage: stage_index });
        }
        if self.key_temperature != KeyTemperature::None {
            push("qk_norm.temp", vec![self.kv_heads], ParamRole::KeyTemperature);
        }
        push("o_proj.weight", vec![e, self.q_width()], ParamRole::OutputProj);
        if self.bias {
            push("o_proj.bias", vec![e], ParamRole::OutputBias);
        }
        out
    }

    /// MLA's tensors under `DeepseekV3Attention`'s names (`bias` is its `attention_bias`: on
    /// both down-projections and the output).
    fn mla_params(&self, mla: &Mla) -> Vec<ParamInfo> {
        let (e, h) = (self.model_dim, self.query_heads);
        let mut out = Vec::new();
        let mut push = |name: &str, shape: Vec<usize>, role: ParamRole| {
            out.push(ParamInfo { name: name.to_string(), shape, role })
        };
        match mla.q_rank {
            None => push("q_proj.weight", vec![self.q_width(), e], ParamRole::QueryProj),
            Some(rank) => {
                push("q_a_proj.weight", vec![rank, e], ParamRole::QueryDown);
                if self.bias {
                    push("q_a_proj.bias", vec![rank], ParamRole::QueryDownBias);
                }
                push("q_a_layernorm.weight", vec![rank], ParamRole::QueryNorm);
                push("q_b_proj.weight", vec![self.q_width(), rank], ParamRole::QueryUp);
            }
        }
        push("kv_a_proj_with_mqa.weight", vec![mla.cached_width(), e], ParamRole::LatentDown);
        if self.bias {
            push("kv_a_proj_with_mqa.bias", vec![mla.cached_width()], ParamRole::LatentDownBias);
        }
        push("kv_a_layernorm.weight", vec![mla.kv_rank], ParamRole::LatentNorm);
        push("kv_b_proj.weight", vec![h * (mla.nope_dim + mla.v_dim), mla.kv_rank], ParamRole::LatentUp);
        push("o_proj.weight", vec![e, h * mla.v_dim], ParamRole::OutputProj);
        if self.bias {
            push("o_proj.bias", vec![e], ParamRole::OutputBias);
        }
        out
    }

    /// The state-dict name of the parameter with `role`, if the spec has one.
    pub fn param_name(&self, role: ParamRole) -> Option<String> {
        self.params().into_iter().find(|p| p.role == role).map(|p| p.name)
    }

    /// Total learned scalars.
    pub fn param_count(&self) -> usize {
        self.params().iter().map(|p| p.shape.iter().product::<usize>()).sum()
    }

    /// The plain multi-head layer of the same width that `explain` compares against:
    /// same model_dim and head_dim, Hq = Hk = model_dim / head_dim, no CCA parts, same mask,
    /// dtype and bias.
    /// For MLA, DeepSeek-V2's comparison instead: MHA with the layer's heads, each of `v_dim`
    /// channels for queries, keys and values alike.
    pub fn equivalent_mha(&self) -> AttentionSpec {
        if let Some(mla) = &self.mla {
            let name = format!("{}_mha", self.name);
            let mut mha = AttentionSpec::plain(&name, self.model_dim, mla.v_dim, self.query_heads, self.query_heads);
            mha.rope = self.rope.map(|rope| Rope { fraction: 1.0, rotary_dim: mla.v_dim, ..rope });
            return AttentionSpec { mask: self.mask, dtype: self.dtype, bias: self.bias, ..mha };
        }
        let heads = self.model_dim / self.head_dim;
        AttentionSpec {
            name: format!("{}_mha", self.name),
            query_heads: heads,
            kv_heads: heads,
            qk_conv: Vec::new(),
            qk_mean: false,
            value_shift: 0,
            qk_norm: QkNorm::None,
            key_temperature: KeyTemperature::None,
            rope: self.rope,
            softmax_scale: 1.0 / (self.head_dim as f64).sqrt(),
            ..self.clone()
        }
    }

    /// Restates the invariants the checker enforces, for specs built without the frontend.
    /// The frontend reports each of these with a source location; this only says what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let fail = |msg: String| Err(msg);
        if self.model_dim == 0 || self.head_dim == 0 || self.query_heads == 0 || self.kv_heads == 0 {
            return fail("model_dim, head_dim, query_heads and kv_heads must be positive".into());
        }
        if let Some(mla) = &self.mla {
            return self.validate_mla(mla);
        }
        if !self.model_dim.is_multiple_of(self.head_dim) {
            return fail(format!(
                "model_dim {} is not a multiple of head_dim {}",
                self.model_dim, self.head_dim
            ));
        }
        if !self.query_heads.is_multiple_of(self.kv_heads) {
            return fail(format!(
                "query_heads {} is not a multiple of kv_heads {}",
                self.query_heads, self.kv_heads
            ));
        }
        if self.value_shift > self.kv_heads {
            return fail(format!(
                "value_shift {} exceeds kv_heads {}",
                self.value_shift, self.kv_heads
            ));
        }
        if self.qk_conv.iter().any(|s| s.width == 0) {
            return fail("convolution widths must be positive".into());
        }
        if self.key_temperature != KeyTemperature::None && self.qk_norm != QkNorm::L2 {
            return fail("key_temperature needs qk_norm = l2".into());
        }
        if let Some(rope) = &self.rope {
            if rope.rotary_dim == 0 || rope.rotary_dim % 2 != 0 || rope.rotary_dim > self.head_dim {
                return fail(format!(
                    "rotary width {} must be even, positive and at most head_dim",
                    rope.rotary_dim
                ));
            }
            if !(rope.theta > 0.0 && rope.theta.is_finite()) {
                return fail("rope theta must be positive and finite".into());
            }
        }
        if let Mask::SlidingWindow { window: 0 } = self.mask {
            return fail("sliding window must be positive".into());
        }
        if !(self.softmax_scale.is_finite() && self.softmax_scale > 0.0) {
            return fail("softmax_scale must be positive and finite".into());
        }
        if !(self.norm_eps.is_finite() && self.norm_eps >= 0.0) {
            return fail("norm_eps must be finite and not negative".into());
        }
        if self.entry_points.is_empty() {
            return fail("at least one entry point must be emitted".into());
        }
        Ok(())
    }
}

impl AttentionSpec {
    /// The invariants of an MLA spec, after the common ones.
    fn validate_mla(&self, mla: &Mla) -> Result<(), String> {
        if [mla.kv_rank, mla.rope_dim, mla.nope_dim, mla.v_dim].contains(&0)
            || mla.q_rank == Some(0)
        {
            return Err("MLA's ranks and widths must be positive".into());
        }
        if mla.rope_dim % 2 != 0 {
            return Err(format!("MLA's rope_dim {} must be even", mla.rope_dim));
        }
        if self.head_dim != mla.nope_dim + mla.rope_dim {
            return Err(format!(
                "an MLA head_dim must be nope_dim + rope_dim = {}",
                mla.nope_dim + mla.rope_dim
            ));
        }
        if self.kv_heads != self.query_heads {
            return Err("MLA has one key/value head per query head".into());
        }
        if self.has_cca_parts() {
            return Err("MLA does not take CCA's parts (qk_conv, qk_mean, value_shift, qk_norm, key_temperature)".into());
        }
        match &self.rope {
            Some(rope)
                if rope.rotary_dim == mla.rope_dim
                    && rope.theta > 0.0
                    && rope.theta.is_finite() => {}
            _ => {
                return Err(format!(
                    "MLA rotates exactly rope_dim = {} channels with a positive theta",
                    mla.rope_dim
                ));
            }
        }
        if !(mla.rms_eps.is_finite() && mla.rms_eps >= 0.0) {
            return Err("MLA's rms_eps must be finite and not negative".into());
        }
        if !(self.softmax_scale.is_finite() && self.softmax_scale > 0.0) {
            return Err("softmax_scale must be positive and finite".into());
        }
        if let Mask::SlidingWindow { window: 0 } = self.mask {
            return Err("sliding window must be positive".into());
        }
        if self.entry_points.is_empty() {
            return Err("at least one entry point must be emitted".into());
        }
        Ok(())
    }

    /// A plain attention layer with every optional item at its language.md default
    /// (causal mask, bf16, no CCA parts, scale 1/sqrt(d), forward only). The checker starts
    /// from the same defaults; tests and property generators build variants from it.
    pub fn plain(
        name: &str,
        model_dim: usize,
        head_dim: usize,
        query_heads: usize,
        kv_heads: usize,
    ) -> AttentionSpec {
        AttentionSpec {
            name: name.to_string(),
            model_dim,
            head_dim,
            query_heads,
            kv_heads,
            qk_conv: Vec::new(),
            qk_mean: false,
            value_shift: 0,
            qk_norm: QkNorm::None,
            key_temperature: KeyTemperature::None,
            rope: None,
            mask: Mask::Causal,
            softmax_scale: 1.0 / (head_dim.max(1) as f64).sqrt(),
            norm_eps: 1e-12,
            dtype: DType::Bf16,
            bias: false,
            deterministic: false,
            entry_points: vec![EntryPoint::Forward],
            tune: None,
            mla: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zaya1_parameter_count_matches_the_paper_arithmetic() {
        let spec = crate::frontend::zaya1_example();
        spec.validate().unwrap();
        // The paper's figure: about 5.6M parameters against 16.8M for MHA of the same width.
        assert_eq!(spec.param_count(), 5_575_682);
        assert_eq!(spec.equivalent_mha().param_count(), 4 * 2048 * 2048);
        assert_eq!(spec.equivalent_mha().params()[0].name, "q_proj.weight");
        assert_eq!(spec.conv_history(), 2);
        assert_eq!(spec.packed_width(), 1280);
        let names: Vec<_> = spec.params().into_iter().map(|p| p.name).collect();
        assert_eq!(
            names,
            [
                "qkv_proj.q_proj.weight",
                "qkv_proj.k_proj.weight",
                "qkv_proj.v_proj_current.weight",
                "qkv_proj.v_proj_delayed.weight",
                "qkv_proj.conv_qk_depthwise.weight",
                "qkv_proj.conv_qk_depthwise.bias",
                "qkv_proj.conv_qk_grouped.weight",
                "qkv_proj.conv_qk_grouped.bias",
                "qk_norm.temp",
                "o_proj.weight"
            ]
        );
    }

    #[test]
    fn sliding_window_sees_exactly_window_keys() {
        let mask = Mask::SlidingWindow { window: 3 };
        let seen: Vec<usize> = (0..10).filter(|&j| mask.allows(7, j)).collect();
        assert_eq!(seen, [5, 6, 7]);
        assert!(Mask::Causal.allows(3, 3) && !Mask::Causal.allows(3, 4));
    }

    #[test]
    fn validate_names_the_broken_rule() {
        let mut spec = crate::frontend::zaya1_example();
        spec.value_shift = 3;
        assert!(spec.validate().unwrap_err().contains("value_shift"));
    }
}
