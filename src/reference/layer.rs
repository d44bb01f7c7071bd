//! The layer's steps on single rows (one token), shared by the whole-sequence forward pass and by
//! decode. Step numbers are those of language.md, Semantics.

use crate::spec::{AttentionSpec, ConvKind, KeyTemperature, ParamRole, QkNorm, Rope, RopeStyle};

use super::parallel::fill_rows;
use super::weights::Weights;

/// y = W·x (+ b) for one row, W stored [out, in] as in `nn.Linear`.
pub(super) struct Linear<'a> {
    pub weight: &'a [f64],
    pub bias: Option<&'a [f64]>,
    pub inputs: usize,
}

impl Linear<'_> {
    fn apply(&self, x: &[f64], y: &mut [f64]) {
        self.apply_weight(x, y);
        self.add_bias(y);
    }

    /// y = x·Wᵀ, without the bias.
    fn apply_weight(&self, x: &[f64], y: &mut [f64]) {
        for (o, y_o) in y.iter_mut().enumerate() {
            *y_o = dot(&self.weight[o * self.inputs..(o + 1) * self.inputs], x);
        }
    }

    fn add_bias(&self, y: &mut [f64]) {
        if let Some(bias) = self.bias {
            y.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
        }
    }
}

/// Σ a_i·b_i over eight interleaved partial sums: a single running sum is one long chain of
/// dependent additions, which makes the big inputs of GPU validation several times slower. The
/// order is fixed, so results stay deterministic.
pub(super) fn dot(a: &[f64], b: &[f64]) -> f64 {
    const LANES: usize = 8;
    let (a_chunks, b_chunks) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f64 = a_chunks.remainder().iter().zip(b_chunks.remainder()).map(|(x, y)| x * y).sum();
    let mut partial = [0.0f64; LANES];
    for (x, y) in a_chunks.zip(b_chunks) {
        for lane in 0..LANES {
            partial[lane] += x[lane] * y[lane];
        }
    }
    partial.iter().sum::<f64>() + tail
}

/// One convolution stage: weight [P, inputs_per_group, K], bias [P].
pub(super) struct ConvStage<'a> {
    pub kind: ConvKind,
    pub width: usize,
    pub weight: &'a [f64],
    pub bias: &'a [f64],
}

/// A spec with its parameters resolved by role; built only from a valid spec and checked weights.
pub(super) struct Layer<'a> {
    pub spec: &'a AttentionSpec,
    pub(super) q_proj: Linear<'a>,
    pub(super) k_proj: Linear<'a>,
    /// Absent when every kv head is shifted.
    pub(super) v_current: Option<Linear<'a>>,
    /// Absent when no kv head is shifted.
    pub(super) v_delayed: Option<Linear<'a>>,
    pub(super) o_proj: Linear<'a>,
    pub(super) conv: Vec<ConvStage<'a>>,
    /// τ_j per kv head (step 5), already through the clamp and exp of `learned_exp`.
    pub(super) key_scale: Vec<f64>,
    /// The temperature parameter as stored (empty without one).
    pub(super) temperature: &'a [f64],
    /// Step 6's frequencies and amplitude.
    rope_frequencies: RopeFrequencies,
}

impl<'a> Layer<'a> {
    pub fn new(spec: &'a AttentionSpec, weights: &'a Weights) -> Result<Layer<'a>, String> {
        spec.validate()?;
        if spec.mla.is_some() {
            return Err(format!(
                "`{}` is an MLA layer: its reference is `reference::mla`",
                spec.name
            ));
        }
        weights.check(spec)?;
        let params = spec.params();
        let find =
            |role: ParamRole| params.iter().find(|p| p.role == role).map(|p| weights.data(&p.name));
        let linear = |weight: ParamRole, bias: ParamRole, inputs: usize| {
            find(weight).map(|weight| Linear { weight, bias: find(bias), inputs })
        };
        let e = spec.model_dim;
        let missing = |what: &str| format!("internal: `params()` lists no {what}");
        let conv = spec
            .qk_conv
            .iter()
            .enumerate()
            .map(|(stage, conv)| {
                Ok(ConvStage {
                    kind: conv.kind,
                    width: conv.width,
                    weight: find(ParamRole::ConvWeight { stage })
                        .ok_or_else(|| missing("conv weight"))?,
                    bias: find(ParamRole::ConvBias { stage })
                        .ok_or_else(|| missing("conv bias"))?,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        let key_scale = match spec.key_temperature {
            KeyTemperature::None => vec![1.0; spec.kv_heads],
            KeyTemperature::Learned => {
                find(ParamRole::KeyTemperature).ok_or_else(|| missing("temperature"))?.to_vec()
            }
            KeyTemperature::LearnedExp => find(ParamRole::KeyTemperature)
                .ok_or_else(|| missing("temperature"))?
                .iter()
                .map(|t| t.clamp(1e-7, 2.0).exp())
                .collect(),
        };
        let temperature = find(ParamRole::KeyTemperature).unwrap_or(&[]);
        let rope_frequencies = spec.rope.map_or_else(RopeFrequencies::default, |rope| rope_frequencies(&rope));
        Ok(Layer {
            spec,
            q_proj: linear(ParamRole::QueryProj, ParamRole::QueryBias, e)
                .ok_or_else(|| missing("q_proj"))?,
            k_proj: linear(ParamRole::KeyProj, ParamRole::KeyBias, e)
                .ok_or_else(|| missing("k_proj"))?,
            v_current: linear(ParamRole::ValueProjCurrent, ParamRole::ValueBiasCurrent, e),
            v_delayed: linear(ParamRole::ValueProjDelayed, ParamRole::ValueBiasDelayed, e),
            o_proj: linear(ParamRole::OutputProj, ParamRole::OutputBias, spec.q_width())
                .ok_or_else(|| missing("o_proj"))?,
            conv,
            key_scale,
            temperature,
            rope_frequencies,
        })
    }

    /// Step 1 and the packing of step 3: the row P0 = [q0 | k0] (P channels) of token x.
    pub fn project_packed(&self, x: &[f64], packed: &mut [f64]) {
        let (q0, k0) = packed.split_at_mut(self.spec.q_width());
        self.q_proj.apply(x, q0);
        self.k_proj.apply(x, k0);
    }

    /// Step 2: v = [x·W_v1ᵀ | x_prev·W_v2ᵀ] (Hk·d channels); `x_prev` is zeros for the first token,
    /// so the delayed heads still get their bias there.
    pub fn project_value(&self, x: &[f64], x_prev: &[f64], v: &mut [f64]) {
        let (current, delayed) =
            v.split_at_mut(self.spec.current_value_heads() * self.spec.head_dim);
        if let Some(proj) = &self.v_current {
            proj.apply(x, current);
        }
        if let Some(proj) = &self.v_delayed {
            proj.apply(x_prev, delayed);
        }
    }

    /// Step 2 with the delayed heads' input given as the shift state `shift` = x_prev·W_v2ᵀ
    /// (without the bias, so that zeros stand for the zero row before a sequence).
    pub fn project_value_shifted(&self, x: &[f64], shift: &[f64], v: &mut [f64]) {
        let (current, delayed) =
            v.split_at_mut(self.spec.current_value_heads() * self.spec.head_dim);
        if let Some(proj) = &self.v_current {
            proj.apply(x, current);
        }
        if let Some(proj) = &self.v_delayed {
            delayed.copy_from_slice(shift);
            proj.add_bias(delayed);
        }
    }

    /// The shift state a token leaves for the next one: x·W_v2ᵀ [value_shift·d] (empty without
    /// shifted heads).
    pub fn shift_state(&self, x: &[f64], shift: &mut [f64]) {
        if let Some(proj) = &self.v_delayed {
            proj.apply_weight(x, shift);
        }
    }

    /// Step 3: runs every stage over `rows` packed rows (P channels each) with no padding, so the
    /// result has rows − T rows. The caller puts the T rows of history first (zeros before the
    /// start of a sequence), which is the "pad once" rule. Without stages this returns the input.
    pub fn convolve(&self, padded: &[f64], rows: usize) -> Vec<f64> {
        self.convolve_stages(padded, rows).pop().expect("the input is always there")
    }

    /// [`Layer::convolve`] keeping every stage's input: the padded input first, the result last
    /// (one entry per stage plus one).
    pub fn convolve_stages(&self, padded: &[f64], rows: usize) -> Vec<Vec<f64>> {
        let p = self.spec.packed_width();
        let d = self.spec.head_dim;
        let mut activations = vec![padded[..rows * p].to_vec()];
        let mut input_rows = rows;
        for stage in &self.conv {
            let input = activations.last().expect("the input is always there");
            let output_rows = input_rows + 1 - stage.width;
            let mut output = vec![0.0; output_rows * p];
            fill_rows(
                &mut output,
                p,
                || (),
                |t, out_row, _| {
                    let window = &input[t * p..(t + stage.width) * p];
                    for (c, out) in out_row.iter_mut().enumerate() {
                        let mut sum = stage.bias[c];
                        match stage.kind {
                            // weight[c, 0, k]; cross-correlation: tap 0 reads the oldest row.
                            ConvKind::Depthwise => {
                                for k in 0..stage.width {
                                    sum += stage.weight[c * stage.width + k] * window[k * p + c];
                                }
                            }
                            // weight[c, i, k] mixes input channel i of c's own head.
                            ConvKind::PerHead => {
                                let head_start = (c / d) * d;
                                for i in 0..d {
                                    let taps =
                                        &stage.weight[(c * d + i) * stage.width..][..stage.width];
                                    for (k, w) in taps.iter().enumerate() {
                                        sum += w * window[k * p + head_start + i];
                                    }
                                }
                            }
                        }
                        *out = sum;
                    }
                },
            );
            activations.push(output);
            input_rows = output_rows;
        }
        activations
    }

    /// Steps 4 to 6 for one token at absolute `position`: from its P0 row and its convolved row y,
    /// the final query heads q [Hq·d] and key heads k [Hk·d].
    pub fn final_query_and_key(
        &self,
        packed: &[f64],
        convolved: &[f64],
        position: usize,
        q: &mut [f64],
        k: &mut [f64],
    ) {
        self.mix_query_and_key(packed, convolved, q, k);
        self.normalise(q, k);
        self.rotate_heads(q, k, position, false);
    }

    /// Step 4 for one token: q̂ [Hq·d] and k̂ [Hk·d] from its P0 row and its convolved row y.
    pub fn mix_query_and_key(&self, packed: &[f64], convolved: &[f64], q: &mut [f64], k: &mut [f64]) {
        let spec = self.spec;
        let (d, lq) = (spec.head_dim, spec.q_width());
        let (q0, k0) = packed.split_at(lq);
        q.copy_from_slice(&convolved[..lq]);
        k.copy_from_slice(&convolved[lq..]);

        // q̂_h += ½·q0_h + ½·k0_g(h); k̂_j += ½·k0_j + ½·mean of q0 over j's query heads.
        if spec.qk_mean {
            let groups = spec.groups();
            for h in 0..spec.query_heads {
                let j = spec.kv_head_of(h);
                for c in 0..d {
                    q[h * d + c] += 0.5 * q0[h * d + c] + 0.5 * k0[j * d + c];
                }
            }
            for j in 0..spec.kv_heads {
                for c in 0..d {
                    let sum: f64 = (j * groups..(j + 1) * groups).map(|h| q0[h * d + c]).sum();
                    k[j * d + c] += 0.5 * k0[j * d + c] + 0.5 * sum / groups as f64;
                }
            }
        }
    }

    /// Step 5 in place: sqrt(d)·x·rsqrt(‖x‖² + eps) per head, keys also × τ_j.
    pub fn normalise(&self, q: &mut [f64], k: &mut [f64]) {
        let spec = self.spec;
        if spec.qk_norm != QkNorm::L2 {
            return;
        }
        let d = spec.head_dim;
        let sqrt_d = (d as f64).sqrt();
        let normalise = |head: &mut [f64], scale: f64| {
            let factor = scale / self.norm(head);
            head.iter_mut().for_each(|x| *x *= factor);
        };
        q.chunks_mut(d).for_each(|head| normalise(head, sqrt_d));
        for (head, tau) in k.chunks_mut(d).zip(&self.key_scale) {
            normalise(head, sqrt_d * tau);
        }
    }

    /// sqrt(‖x‖² + eps) of one head.
    pub fn norm(&self, head: &[f64]) -> f64 {
        let squared_norm: f64 = head.iter().map(|x| x * x).sum();
        (squared_norm + self.spec.norm_eps).sqrt()
    }

    /// Step 6 in place: rotates the first r channels of every head by angles p·θ^(−2i/r), or by
    /// their negatives when `inverse` (the rotation's transpose, which the backward applies).
    pub fn rotate_heads(&self, q: &mut [f64], k: &mut [f64], position: usize, inverse: bool) {
        let d = self.spec.head_dim;
        if let Some(rope) = self.spec.rope {
            for head in q.chunks_mut(d).chain(k.chunks_mut(d)) {
                self.rotate(&mut head[..rope.rotary_dim], rope.style, position, inverse);
            }
        }
    }

    fn rotate(&self, slice: &mut [f64], style: RopeStyle, position: usize, inverse: bool) {
        rotate(slice, &self.rope_frequencies, style, position, inverse);
    }

    /// Step 7 for the query row of one token at absolute `position`: for each query head,
    /// softmax(scale·q·kᵀ + mask)·v over the first `kv_len` tokens' keys and values (rows of Hk·d),
    /// written to o [Hq·d]; lse [Hq] gets the natural-log log-sum-exp of the scaled, masked logits.
    /// `logits` is scratch space of at least `kv_len` values.
    #[allow(clippy::too_many_arguments)]
    pub fn attend(
        &self,
        q: &[f64],
        position: usize,
        keys: &[f64],
        values: &[f64],
        kv_len: usize,
        o: &mut [f64],
        lse: &mut [f64],
        logits: &mut [f64],
    ) {
        let spec = self.spec;
        let (d, lk) = (spec.head_dim, spec.kv_width());
        for h in 0..spec.query_heads {
            let j = spec.kv_head_of(h);
            let q_h = &q[h * d..(h + 1) * d];
            let mut max = f64::NEG_INFINITY;
            for (key_position, logit) in logits[..kv_len].iter_mut().enumerate() {
                *logit = if spec.mask.allows(position, key_position) {
                    let k_j = &keys[key_position * lk + j * d..][..d];
                    spec.softmax_scale * dot(q_h, k_j)
                } else {
                    f64::NEG_INFINITY
                };
                max = max.max(*logit);
            }
            let o_h = &mut o[h * d..(h + 1) * d];
            o_h.fill(0.0);
            let mut sum = 0.0;
            for (key_position, logit) in logits[..kv_len].iter().enumerate() {
                if *logit == f64::NEG_INFINITY {
                    continue;
                }
                let weight = (logit - max).exp();
                sum += weight;
                let v_j = &values[key_position * lk + j * d..][..d];
                o_h.iter_mut().zip(v_j).for_each(|(o, v)| *o += weight * v);
            }
            o_h.iter_mut().for_each(|o| *o /= sum);
            lse[h] = max + sum.ln();
        }
    }

    /// Step 8: out = o·W_oᵀ (+ b) for one token.
    pub fn project_output(&self, o: &[f64], out: &mut [f64]) {
        self.o_proj.apply(o, out);
    }
}

/// RoPE's frequency of each rotated pair, and the factor cos and sin carry: θ^(−2i/r) for i < r/2
/// and 1 (step 6), or YaRN's ([`crate::spec::Yarn`]).
pub(super) fn rope_frequencies(rope: &Rope) -> RopeFrequencies {
    match rope.yarn {
        Some(yarn) => RopeFrequencies {
            inverse: yarn.inverse_frequencies(rope.theta, rope.rotary_dim),
            amplitude: yarn.attention_factor(),
        },
        None => {
            let r = rope.rotary_dim as f64;
            let inverse = (0..rope.rotary_dim / 2).map(|i| rope.theta.powf(-2.0 * i as f64 / r)).collect();
            RopeFrequencies { inverse, amplitude: 1.0 }
        }
    }
}

/// What [`rotate`] turns by.
#[derive(Clone, Debug, Default)]
pub(super) struct RopeFrequencies {
    pub inverse: Vec<f64>,
    pub amplitude: f64,
}

/// Rotates `slice` (the r rotated channels) at `position` by angles p·f_i, or by their negatives
/// when `inverse` (the transpose), scaling by the amplitude either way.
pub(super) fn rotate(slice: &mut [f64], frequencies: &RopeFrequencies, style: RopeStyle, position: usize, inverse: bool) {
    let half = slice.len() / 2;
    let direction = if inverse { -1.0 } else { 1.0 };
    for (i, inverse_frequency) in frequencies.inverse.iter().enumerate() {
        let (sin, cos) = (direction * position as f64 * inverse_frequency).sin_cos();
        let (sin, cos) = (frequencies.amplitude * sin, frequencies.amplitude * cos);
        // The two channels that rotate together with frequency i.
        let (a, b) = match style {
            RopeStyle::Neox => (i, i + half),
            RopeStyle::Interleaved => (2 * i, 2 * i + 1),
        };
        let (x1, x2) = (slice[a], slice[b]);
        slice[a] = x1 * cos - x2 * sin;
        slice[b] = x2 * cos + x1 * sin;
    }
}
