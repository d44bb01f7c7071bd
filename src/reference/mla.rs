//! Multi-head latent attention (docs/language.md, "MLA"), in f64, with Hugging Face
//! `DeepseekV3Attention`'s meaning. For each token at position t of x [S, E]:
//! 1. queries: `q = x·W_qᵀ`, or with `q_rank` `q = RMSNorm(x·W_dqᵀ + b)·W_uqᵀ`; head h is
//!    `[q_nope | q_pe]` (nope_dim, then rope_dim channels);
//! 2. the latent: `[a | k_pe] = x·W_dkvᵀ + b`, `c_kv = RMSNorm(a)` (kv_rank channels), k_pe the
//!    shared rotated key (rope_dim channels); `RMSNorm(a) = w ⊙ a / sqrt(mean(a²) + rms_eps)`;
//! 3. per head `[k_nope | v] = c_kv·W_ukvᵀ`, `k = [k_nope | k_pe]`;
//! 4. RoPE at t on q_pe and k_pe (the heads' last rope_dim channels);
//! 5. `o_h = softmax(scale·q_h·K_hᵀ + mask)·V_h`, `out = o·W_oᵀ + b`.
//!
//! [`mla_decode`] runs the same layer one token at a time in the absorbed form a serving cache
//! uses: the cache keeps only `[c_kv | k_pe]` per token, the query's nope part goes into the
//! latent (`q_nope·W_uk`), attention runs there, and the result leaves it through `W_uv`. The
//! two are the same arithmetic reassociated, so they agree to rounding; the tests hold them to it.

use crate::spec::{AttentionSpec, Mla, ParamRole, RopeStyle};

use super::layer::{RopeFrequencies, rope_frequencies, rotate};
use super::tensor::Tensor;
use super::weights::Weights;

/// What the MLA forward produces that a later stage may be checked against.
#[derive(Clone, Debug, PartialEq)]
pub struct MlaOutputs {
    /// The layer output [B, S, E].
    pub out: Tensor,
    /// What a serving cache keeps per token: `[c_kv | k_pe]` [B, S, kv_rank + rope_dim].
    pub latent: Tensor,
    /// Natural-log log-sum-exp of the scaled, masked logits of each query [B, H, S].
    pub lse: Tensor,
}

/// The layer's weights by role, and what every token needs.
struct MlaLayer<'a> {
    spec: &'a AttentionSpec,
    mla: Mla,
    weights: &'a Weights,
    frequencies: RopeFrequencies,
    style: RopeStyle,
}

/// One token's queries and latent row.
struct TokenProjections {
    /// [H, nope_dim + rope_dim], q_pe rotated.
    q: Vec<f64>,
    /// `[c_kv | k_pe]`, k_pe rotated.
    latent: Vec<f64>,
}

impl<'a> MlaLayer<'a> {
    fn new(spec: &'a AttentionSpec, weights: &'a Weights) -> Result<MlaLayer<'a>, String> {
        weights.check(spec)?;
        let mla = spec.mla.ok_or_else(|| format!("`{}` is not an MLA layer", spec.name))?;
        let rope = spec.rope.ok_or_else(|| format!("MLA layer `{}` has no RoPE", spec.name))?;
        Ok(MlaLayer { spec, mla, weights, frequencies: rope_frequencies(&rope), style: rope.style })
    }

    fn tensor(&self, role: ParamRole) -> Option<&'a [f64]> {
        self.spec.param_name(role).map(|name| self.weights.data(&name))
    }

    /// `W·x + b` for W [out, in] (PyTorch's `nn.Linear`).
    fn linear(&self, weight: ParamRole, bias: ParamRole, x: &[f64]) -> Vec<f64> {
        let weight = self.tensor(weight).expect("checked by Weights::check");
        let mut y: Vec<f64> = weight.chunks(x.len()).map(|row| dot(row, x)).collect();
        if let Some(bias) = self.tensor(bias) {
            y.iter_mut().zip(bias).for_each(|(y, b)| *y += b);
        }
        y
    }

    /// `w ⊙ a / sqrt(mean(a²) + eps)`.
    fn rms_norm(&self, a: &[f64], weight: ParamRole) -> Vec<f64> {
        let weight = self.tensor(weight).expect("checked by Weights::check");
        let mean_square = a.iter().map(|v| v * v).sum::<f64>() / a.len() as f64;
        let scale = 1.0 / (mean_square + self.mla.rms_eps).sqrt();
        a.iter().zip(weight).map(|(v, w)| w * v * scale).collect()
    }

    /// Steps 1, 2 and 4 for the token `x` at `position`.
    fn project(&self, x: &[f64], position: usize) -> TokenProjections {
        let (mla, style) = (self.mla, self.style);
        let mut q = match mla.q_rank {
            None => self.linear(ParamRole::QueryProj, ParamRole::QueryBias, x),
            Some(_) => {
                let latent = self.linear(ParamRole::QueryDown, ParamRole::QueryDownBias, x);
                let normed = self.rms_norm(&latent, ParamRole::QueryNorm);
                self.linear(ParamRole::QueryUp, ParamRole::QueryBias, &normed)
            }
        };
        for head in q.chunks_mut(self.spec.head_dim) {
            rotate(&mut head[mla.nope_dim..], &self.frequencies, style, position, false);
        }
        let down = self.linear(ParamRole::LatentDown, ParamRole::LatentDownBias, x);
        let mut latent = self.rms_norm(&down[..mla.kv_rank], ParamRole::LatentNorm);
        let mut k_pe = down[mla.kv_rank..].to_vec();
        rotate(&mut k_pe, &self.frequencies, style, position, false);
        latent.extend(k_pe);
        TokenProjections { q, latent }
    }

    /// W_uk_h [nope_dim, kv_rank] and W_uv_h [v_dim, kv_rank] of head h: rows of W_ukv.
    fn up_projections(&self, h: usize) -> (&'a [f64], &'a [f64]) {
        let mla = self.mla;
        let w = self.tensor(ParamRole::LatentUp).expect("checked by Weights::check");
        let head = &w[h * (mla.nope_dim + mla.v_dim) * mla.kv_rank..][..(mla.nope_dim + mla.v_dim) * mla.kv_rank];
        head.split_at(mla.nope_dim * mla.kv_rank)
    }

    /// Step 5's output projection of o [H·v_dim].
    fn output(&self, o: &[f64]) -> Vec<f64> {
        self.linear(ParamRole::OutputProj, ParamRole::OutputBias, o)
    }
}

/// The MLA layer on a batch x [B, S, E] of independent sequences.
pub fn mla_forward(spec: &AttentionSpec, weights: &Weights, x: &Tensor) -> Result<MlaOutputs, String> {
    let layer = MlaLayer::new(spec, weights)?;
    let (batch, seq_len) = batch_shape(spec, x)?;
    let (e, h, d, mla) = (spec.model_dim, spec.query_heads, spec.head_dim, layer.mla);
    let width = mla.cached_width();
    let mut outputs = MlaOutputs {
        out: Tensor::zeros(vec![batch, seq_len, e]),
        latent: Tensor::zeros(vec![batch, seq_len, width]),
        lse: Tensor::zeros(vec![batch, h, seq_len]),
    };
    for b in 0..batch {
        let tokens: Vec<TokenProjections> =
            (0..seq_len).map(|t| layer.project(&x.data[(b * seq_len + t) * e..][..e], t)).collect();
        // Step 3: every token's keys and values, [S, H, d] and [S, H, v_dim].
        let mut keys = vec![0.0; seq_len * h * d];
        let mut values = vec![0.0; seq_len * h * mla.v_dim];
        for (t, token) in tokens.iter().enumerate() {
            let (c_kv, k_pe) = token.latent.split_at(mla.kv_rank);
            for head in 0..h {
                let (w_uk, w_uv) = layer.up_projections(head);
                let key = &mut keys[(t * h + head) * d..][..d];
                for (i, row) in w_uk.chunks(mla.kv_rank).enumerate() {
                    key[i] = dot(row, c_kv);
                }
                key[mla.nope_dim..].copy_from_slice(k_pe);
                for (i, row) in w_uv.chunks(mla.kv_rank).enumerate() {
                    values[(t * h + head) * mla.v_dim + i] = dot(row, c_kv);
                }
            }
            outputs.latent.data[(b * seq_len + t) * width..][..width].copy_from_slice(&token.latent);
        }
        for (t, token) in tokens.iter().enumerate() {
            let mut o = vec![0.0; h * mla.v_dim];
            for head in 0..h {
                let q_h = &token.q[head * d..][..d];
                let logits: Vec<f64> = (0..seq_len)
                    .map(|j| spec.mask.allows(t, j).then(|| spec.softmax_scale * dot(q_h, &keys[(j * h + head) * d..][..d])))
                    .map(|logit| logit.unwrap_or(f64::NEG_INFINITY))
                    .collect();
                let (weights, lse) = softmax(&logits);
                outputs.lse.data[(b * h + head) * seq_len + t] = lse;
                let o_h = &mut o[head * mla.v_dim..][..mla.v_dim];
                for (j, p) in weights.iter().enumerate().filter(|(_, p)| **p > 0.0) {
                    let v = &values[(j * h + head) * mla.v_dim..][..mla.v_dim];
                    o_h.iter_mut().zip(v).for_each(|(o, v)| *o += p * v);
                }
            }
            outputs.out.data[(b * seq_len + t) * e..][..e].copy_from_slice(&layer.output(&o));
        }
    }
    Ok(outputs)
}

/// The layer over x [B, S, E] one token at a time, each attending over the cached `[c_kv | k_pe]`
/// rows of the tokens before it and itself, in the absorbed form: per head the query's nope part
/// is taken into the latent (`q_lat = W_ukᵀ·q_nope`), the logits are `scale·(q_lat·c_kv +
/// q_pe·k_pe)`, and the weighted sum of latents leaves through W_uv. Only causal and
/// sliding-window masks decode (a token cannot see later ones).
pub fn mla_decode(spec: &AttentionSpec, weights: &Weights, x: &Tensor) -> Result<Tensor, String> {
    let layer = MlaLayer::new(spec, weights)?;
    if spec.mask == crate::spec::Mask::None {
        return Err("a decode step sees only the tokens before it: mask = none does not decode".into());
    }
    let (batch, seq_len) = batch_shape(spec, x)?;
    let (e, h, d, mla) = (spec.model_dim, spec.query_heads, spec.head_dim, layer.mla);
    let width = mla.cached_width();
    let mut out = Tensor::zeros(vec![batch, seq_len, e]);
    for b in 0..batch {
        let mut cache: Vec<f64> = Vec::with_capacity(seq_len * width);
        for t in 0..seq_len {
            let token = layer.project(&x.data[(b * seq_len + t) * e..][..e], t);
            cache.extend_from_slice(&token.latent);
            let mut o = vec![0.0; h * mla.v_dim];
            for head in 0..h {
                let (w_uk, w_uv) = layer.up_projections(head);
                let (q_nope, q_pe) = token.q[head * d..][..d].split_at(mla.nope_dim);
                let mut q_lat = vec![0.0; mla.kv_rank];
                for (q, row) in q_nope.iter().zip(w_uk.chunks(mla.kv_rank)) {
                    q_lat.iter_mut().zip(row).for_each(|(l, w)| *l += q * w);
                }
                let logits: Vec<f64> = cache
                    .chunks(width)
                    .enumerate()
                    .map(|(j, row)| {
                        let (c_kv, k_pe) = row.split_at(mla.kv_rank);
                        match spec.mask.allows(t, j) {
                            true => spec.softmax_scale * (dot(&q_lat, c_kv) + dot(q_pe, k_pe)),
                            false => f64::NEG_INFINITY,
                        }
                    })
                    .collect();
                let (weights, _) = softmax(&logits);
                let mut o_lat = vec![0.0; mla.kv_rank];
                for (p, row) in weights.iter().zip(cache.chunks(width)) {
                    o_lat.iter_mut().zip(&row[..mla.kv_rank]).for_each(|(o, c)| *o += p * c);
                }
                for (o, row) in o[head * mla.v_dim..][..mla.v_dim].iter_mut().zip(w_uv.chunks(mla.kv_rank)) {
                    *o = dot(row, &o_lat);
                }
            }
            out.data[(b * seq_len + t) * e..][..e].copy_from_slice(&layer.output(&o));
        }
    }
    Ok(out)
}

fn batch_shape(spec: &AttentionSpec, x: &Tensor) -> Result<(usize, usize), String> {
    x.check_consistent()?;
    match x.shape[..] {
        [batch, seq_len, e] if e == spec.model_dim => Ok((batch, seq_len)),
        _ => Err(format!("input has shape {:?}, expected [batch, seq_len, {}]", x.shape, spec.model_dim)),
    }
}

/// The softmax of `logits` (−∞ for hidden keys) and the log-sum-exp.
fn softmax(logits: &[f64]) -> (Vec<f64>, f64) {
    let max = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let exps: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f64 = exps.iter().sum();
    (exps.iter().map(|e| e / sum).collect(), max + sum.ln())
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}
