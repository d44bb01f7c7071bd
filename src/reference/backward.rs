//! The backward pass in f64, derived by hand from the forward's steps (language.md, Semantics),
//! not by differentiating any IR. Given x and dL/dout it
//! returns dL/dx and dL/dθ for every parameter under its Hugging Face name. Each sequence's
//! activations are recomputed by the forward pass; the steps then run in reverse:
//!
//! - Step 8: `dattn = dout·W_o`, `dW_o = Σ_t doutᵀ·attn`, `db_o = Σ_t dout`.
//! - Step 7: Attention, per query head h and its kv head j = g(h), with P = softmax(scale·q·kᵀ + mask),
//!   D_t = ⟨do_t, o_t⟩: `dS = P ∘ (do·vᵀ − D)`, `dq = scale·dS·k`, `dk_j += scale·dSᵀ·q`,
//!   `dv_j += Pᵀ·do` (dK and dV summed over the group). P is rebuilt from the saved lse.
//! - Step 6: RoPE: the transposed rotation, the same pairs turned by −p·θ^(−2i/r).
//! - Step 5: L2 norm, y = s·x/n with n = sqrt(‖x‖² + eps): `dx = (s/n)·(dy − x·⟨x, dy⟩/n²)`; keys have
//!   s = √d·τ_j and `dτ_j = Σ_t ⟨dy, √d·x/n⟩`, times exp(temp_j) for `learned_exp` where the
//!   clamp passes the gradient (1e-7 ≤ temp_j ≤ 2, as PyTorch's clamp does).
//! - Step 4: q-k mean: `dyq = dq̂`, `dyk = dk̂`, `dq0_h += ½·dq̂_h + (½/G)·dk̂_g(h)`,
//!   `dk0_j += ½·dk̂_j + ½·Σ_{g(h)=j} dq̂_h`.
//! - Step 3: Each convolution stage backward in time: an input row r feeds output rows r − k for every
//!   tap k, so `dI[r] = Σ_k dO[r − k]·w[·, ·, k]`; `dw[c, i, k] = Σ_t dO[t, c]·I[t + k, i]`,
//!   `db = Σ_t dO[t]` over every output row, including rows that read the zero padding (how a
//!   stage's bias reaches the rows of the next one). The padding rows' own gradient is dropped.
//! - Steps 2 and 1: `dx[t] = dq0[t]·W_q + dk0[t]·W_k + dva[t]·W_v1 + dvb[t + 1]·W_v2` (the
//!   delayed heads read the previous token), and each weight's `Σ_t dyᵀ·input`, bias `Σ_t dy`.

use crate::spec::{AttentionSpec, ConvKind, KeyTemperature, ParamRole, QkNorm};

use super::forward::forward_sequence;
use super::layer::{ConvStage, Layer, Linear, dot};
use super::parallel::fill_rows;
use super::tensor::Tensor;
use super::weights::Weights;

/// What the backward pass produces.
#[derive(Clone, Debug, PartialEq)]
pub struct Gradients {
    /// dL/dx [B, S, E].
    pub dx: Tensor,
    /// dL/dθ for every parameter, under the names and shapes of `spec.params()`.
    pub weights: Weights,
}

/// dL/dx and dL/dθ of the layer on x [B, S, E], given dL/dout [B, S, E].
pub fn backward(
    spec: &AttentionSpec,
    weights: &Weights,
    x: &Tensor,
    dout: &Tensor,
) -> Result<Gradients, String> {
    let layer = Layer::new(spec, weights)?;
    x.check_consistent()?;
    dout.check_consistent()?;
    let [batch, seq_len, e] = x.shape[..] else {
        return Err(format!("input has shape {:?}, expected [batch, seq_len, {}]", x.shape, spec.model_dim));
    };
    if e != spec.model_dim {
        return Err(format!("input has shape {:?}, expected [batch, seq_len, {}]", x.shape, spec.model_dim));
    }
    if dout.shape != x.shape {
        return Err(format!("dout has shape {:?}, expected the input's {:?}", dout.shape, x.shape));
    }
    let mut dx = Tensor::zeros(x.shape.clone());
    let mut sums = ParameterGradients::zeros(&layer);
    let len = seq_len * e;
    for b in 0..batch {
        let range = b * len..(b + 1) * len;
        let sequence = sequence_backward(&layer, &x.data[range.clone()], &dout.data[range.clone()]);
        dx.data[range].copy_from_slice(&sequence.dx);
        sums.add(&sequence.parameters);
    }
    Ok(Gradients { dx, weights: sums.into_weights(spec) })
}

/// Gradients of the parameters, one flat vector per parameter of the layer (empty where absent).
#[derive(Clone)]
struct ParameterGradients {
    q_proj: LinearGradient,
    k_proj: LinearGradient,
    v_current: LinearGradient,
    v_delayed: LinearGradient,
    o_proj: LinearGradient,
    /// (weight, bias) per convolution stage.
    conv: Vec<(Vec<f64>, Vec<f64>)>,
    /// dL/dtemp per kv head (through the clamp and exp of `learned_exp`).
    temperature: Vec<f64>,
}

#[derive(Clone, Default)]
struct LinearGradient {
    weight: Vec<f64>,
    bias: Vec<f64>,
}

impl LinearGradient {
    fn add(&mut self, other: &LinearGradient) {
        add_into(&mut self.weight, &other.weight);
        add_into(&mut self.bias, &other.bias);
    }
}

fn add_into(sum: &mut Vec<f64>, part: &[f64]) {
    if sum.is_empty() {
        sum.extend_from_slice(part);
    } else {
        sum.iter_mut().zip(part).for_each(|(s, p)| *s += p);
    }
}

impl ParameterGradients {
    fn zeros(layer: &Layer) -> ParameterGradients {
        ParameterGradients {
            q_proj: LinearGradient::default(),
            k_proj: LinearGradient::default(),
            v_current: LinearGradient::default(),
            v_delayed: LinearGradient::default(),
            o_proj: LinearGradient::default(),
            conv: vec![(Vec::new(), Vec::new()); layer.conv.len()],
            temperature: Vec::new(),
        }
    }

    fn add(&mut self, other: &ParameterGradients) {
        self.q_proj.add(&other.q_proj);
        self.k_proj.add(&other.k_proj);
        self.v_current.add(&other.v_current);
        self.v_delayed.add(&other.v_delayed);
        self.o_proj.add(&other.o_proj);
        for ((weight, bias), (other_weight, other_bias)) in self.conv.iter_mut().zip(&other.conv) {
            add_into(weight, other_weight);
            add_into(bias, other_bias);
        }
        add_into(&mut self.temperature, &other.temperature);
    }

    /// Named like the parameters; a parameter no sequence touched (a batch of none) is zeros.
    fn into_weights(self, spec: &AttentionSpec) -> Weights {
        let tensors = spec
            .params()
            .into_iter()
            .map(|param| {
                let data = match param.role {
                    ParamRole::QueryProj => &self.q_proj.weight,
                    ParamRole::QueryBias => &self.q_proj.bias,
                    ParamRole::KeyProj => &self.k_proj.weight,
                    ParamRole::KeyBias => &self.k_proj.bias,
                    ParamRole::ValueProjCurrent => &self.v_current.weight,
                    ParamRole::ValueBiasCurrent => &self.v_current.bias,
                    ParamRole::ValueProjDelayed => &self.v_delayed.weight,
                    ParamRole::ValueBiasDelayed => &self.v_delayed.bias,
                    ParamRole::OutputProj => &self.o_proj.weight,
                    ParamRole::OutputBias => &self.o_proj.bias,
                    ParamRole::ConvWeight { stage } => &self.conv[stage].0,
                    ParamRole::ConvBias { stage } => &self.conv[stage].1,
                    ParamRole::KeyTemperature => &self.temperature,
                    role @ (ParamRole::QueryDown
                    | ParamRole::QueryDownBias
                    | ParamRole::QueryNorm
                    | ParamRole::QueryUp
                    | ParamRole::LatentDown
                    | ParamRole::LatentDownBias
                    | ParamRole::LatentNorm
                    | ParamRole::LatentUp) => {
                        unreachable!("{role:?}: Layer::new rejects MLA specs")
                    }
                };
                let numel: usize = param.shape.iter().product();
                let data = if data.is_empty() { vec![0.0; numel] } else { data.clone() };
                (param.name, Tensor { shape: param.shape, data })
            })
            .collect();
        Weights { tensors }
    }
}

struct SequenceGradients {
    dx: Vec<f64>,
    parameters: ParameterGradients,
}

/// The backward pass of one sequence x [S·E] with dL/dout [S·E].
fn sequence_backward(layer: &Layer, x: &[f64], dout: &[f64]) -> SequenceGradients {
    let spec = layer.spec;
    let (e, d) = (spec.model_dim, spec.head_dim);
    let seq_len = x.len() / e;
    let (p, lq, lk, hq) = (spec.packed_width(), spec.q_width(), spec.kv_width(), spec.query_heads);
    let history = spec.conv_history();
    let activations = forward_sequence(layer, x);
    let mut parameters = ParameterGradients::zeros(layer);

    // Step 8.
    let dattn = input_gradient(&layer.o_proj, dout, lq);
    parameters.o_proj = linear_gradient(&layer.o_proj, dout, &activations.attn);

    // Step 7.
    let (dq, dk, dv) = sequence_attention_backward(spec, &activations.q, &activations.k, &activations.v,
        &activations.attn, &activations.lse, &dattn, seq_len);

    // Steps 6 to 4, token by token; each row is [dy (P) | dP0 from the q-k mean (P) | dL/dτ (Hk)].
    let stage_inputs = layer.convolve_stages(&activations.padded_packed, history + seq_len);
    let convolved = stage_inputs.last().expect("the input is always there");
    let hk = spec.kv_heads;
    let mut token_rows = vec![0.0; seq_len * (2 * p + hk)];
    fill_rows(&mut token_rows, 2 * p + hk, || (), |t, row, _| {
        let (dy, rest) = row.split_at_mut(p);
        let (dpacked, dscale) = rest.split_at_mut(p);
        let packed = &activations.padded_packed[(history + t) * p..][..p];
        let (dy_q, dy_k) = dy.split_at_mut(lq);
        dy_q.copy_from_slice(&dq[t * lq..][..lq]);
        dy_k.copy_from_slice(&dk[t * lk..][..lk]);
        layer.rotate_heads(dy_q, dy_k, t, true);
        let (mut q_mixed, mut k_mixed) = (vec![0.0; lq], vec![0.0; lk]);
        layer.mix_query_and_key(packed, &convolved[t * p..][..p], &mut q_mixed, &mut k_mixed);
        if spec.qk_norm == QkNorm::L2 {
            let sqrt_d = (d as f64).sqrt();
            for (dy_h, x_h) in dy_q.chunks_mut(d).zip(q_mixed.chunks(d)) {
                norm_backward(layer, x_h, dy_h, sqrt_d);
            }
            for (j, (dy_j, x_j)) in dy_k.chunks_mut(d).zip(k_mixed.chunks(d)).enumerate() {
                // dL/dτ_j = ⟨dy, √d·x/n⟩, read before dy becomes dx̂.
                let n = layer.norm(x_j);
                dscale[j] = sqrt_d * dot(dy_j, x_j) / n;
                norm_backward(layer, x_j, dy_j, sqrt_d * layer.key_scale[j]);
            }
        }
        if spec.qk_mean {
            let groups = spec.groups();
            let (dq0, dk0) = dpacked.split_at_mut(lq);
            for h in 0..hq {
                let j = spec.kv_head_of(h);
                for c in 0..d {
                    dq0[h * d + c] = 0.5 * dy_q[h * d + c] + 0.5 / groups as f64 * dy_k[j * d + c];
                    dk0[j * d + c] += 0.5 * dy_q[h * d + c];
                }
            }
            dk0.iter_mut().zip(dy_k.iter()).for_each(|(g, dyk)| *g += 0.5 * dyk);
        }
    });
    let mut dy = Vec::with_capacity(seq_len * p);
    let mut dpacked = Vec::with_capacity(seq_len * p);
    let mut dscale = vec![0.0; hk];
    for row in token_rows.chunks(2 * p + hk) {
        dy.extend_from_slice(&row[..p]);
        dpacked.extend_from_slice(&row[p..2 * p]);
        dscale.iter_mut().zip(&row[2 * p..]).for_each(|(s, r)| *s += r);
    }
    if spec.qk_norm == QkNorm::L2 && spec.key_temperature != KeyTemperature::None {
        parameters.temperature = temperature_gradient(layer, &dscale);
    }

    // Step 3, last stage first; the input's gradient below the T padding rows is dP0's.
    let mut doutput = dy;
    for (stage_index, stage) in layer.conv.iter().enumerate().rev() {
        let input = &stage_inputs[stage_index];
        let (dinput, dweight, dbias) = conv_backward(stage, input, &doutput, p, d);
        parameters.conv[stage_index] = (dweight, dbias);
        doutput = dinput;
    }
    dpacked.iter_mut().zip(&doutput[history * p..]).for_each(|(g, c)| *g += c);

    // Steps 1 and 2.
    let (dq0, dk0): (Vec<f64>, Vec<f64>) = {
        let (mut dq0, mut dk0) = (Vec::with_capacity(seq_len * lq), Vec::with_capacity(seq_len * lk));
        for row in dpacked.chunks(p) {
            dq0.extend_from_slice(&row[..lq]);
            dk0.extend_from_slice(&row[lq..]);
        }
        (dq0, dk0)
    };
    let current = spec.current_value_heads() * d;
    let (dv_current, dv_delayed): (Vec<f64>, Vec<f64>) = {
        let (mut a, mut b) = (Vec::with_capacity(seq_len * current), Vec::with_capacity(seq_len * (lk - current)));
        for row in dv.chunks(lk) {
            a.extend_from_slice(&row[..current]);
            b.extend_from_slice(&row[current..]);
        }
        (a, b)
    };
    let mut x_prev = vec![0.0; seq_len * e];
    if seq_len > 1 {
        x_prev[e..].copy_from_slice(&x[..(seq_len - 1) * e]);
    }
    parameters.q_proj = linear_gradient(&layer.q_proj, &dq0, x);
    parameters.k_proj = linear_gradient(&layer.k_proj, &dk0, x);
    let mut dx = input_gradient(&layer.q_proj, &dq0, e);
    add_into(&mut dx, &input_gradient(&layer.k_proj, &dk0, e));
    if let Some(proj) = &layer.v_current {
        parameters.v_current = linear_gradient(proj, &dv_current, x);
        add_into(&mut dx, &input_gradient(proj, &dv_current, e));
    }
    if let Some(proj) = &layer.v_delayed {
        parameters.v_delayed = linear_gradient(proj, &dv_delayed, &x_prev);
        // Token t's delayed heads read x[t − 1]: dx[t − 1] gets their gradient.
        let dx_prev = input_gradient(proj, &dv_delayed, e);
        dx[..(seq_len - 1) * e].iter_mut().zip(&dx_prev[e..]).for_each(|(g, s)| *g += s);
    }
    SequenceGradients { dx, parameters }
}

/// dL/dinput [S, inputs] = dy [S, outputs]·W of a linear layer.
fn input_gradient(linear: &Linear, dy: &[f64], inputs: usize) -> Vec<f64> {
    let outputs = linear.weight.len() / inputs;
    let mut dinput = vec![0.0; dy.len() / outputs.max(1) * inputs];
    if outputs == 0 {
        return dinput;
    }
    fill_rows(&mut dinput, inputs, || (), |t, row, _| {
        for (o, g) in dy[t * outputs..][..outputs].iter().enumerate() {
            let weight_row = &linear.weight[o * inputs..][..inputs];
            row.iter_mut().zip(weight_row).for_each(|(r, w)| *r += g * w);
        }
    });
    dinput
}

/// dW [outputs, inputs] = Σ_t dy[t]ᵀ·input[t] and, with a bias, db = Σ_t dy[t].
fn linear_gradient(linear: &Linear, dy: &[f64], input: &[f64]) -> LinearGradient {
    let inputs = linear.inputs;
    let outputs = linear.weight.len() / inputs;
    let rows = input.len() / inputs;
    // dy transposed, so that each output row's sum walks contiguous memory.
    let mut dy_columns = vec![0.0; outputs * rows];
    for t in 0..rows {
        for o in 0..outputs {
            dy_columns[o * rows + t] = dy[t * outputs + o];
        }
    }
    let mut weight = vec![0.0; outputs * inputs];
    fill_rows(&mut weight, inputs, || (), |o, row, _| {
        for (t, g) in dy_columns[o * rows..][..rows].iter().enumerate() {
            row.iter_mut().zip(&input[t * inputs..][..inputs]).for_each(|(r, x)| *r += g * x);
        }
    });
    let bias = match linear.bias {
        Some(_) => (0..outputs).map(|o| dy_columns[o * rows..][..rows].iter().sum()).collect(),
        None => Vec::new(),
    };
    LinearGradient { weight, bias }
}

/// The attention core's backward alone (step 7): (dq, dk, dv) of softmax attention given q, k,
/// v, its output o and lse (as [`super::ForwardOutputs`] holds them: [B, S, heads, d] and
/// [B, Hq, S]) and do = dL/do [B, S, Hq, d]; dk and dv are summed over each group.
pub fn attention_backward(
    spec: &AttentionSpec,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
) -> Result<(Tensor, Tensor, Tensor), String> {
    let [batch, seq_len, hq, d] = q.shape[..] else {
        return Err(format!("q has shape {:?}, expected [batch, seq_len, heads, head_dim]", q.shape));
    };
    let hk = spec.kv_heads;
    for (name, tensor, shape) in [
        ("q", q, vec![batch, seq_len, spec.query_heads, spec.head_dim]),
        ("k", k, vec![batch, seq_len, hk, d]),
        ("v", v, vec![batch, seq_len, hk, d]),
        ("o", o, vec![batch, seq_len, hq, d]),
        ("do", d_o, vec![batch, seq_len, hq, d]),
        ("lse", lse, vec![batch, hq, seq_len]),
    ] {
        tensor.check_consistent()?;
        if tensor.shape != shape {
            return Err(format!("{name} has shape {:?}, expected {shape:?}", tensor.shape));
        }
    }
    let (mut dq, mut dk, mut dv) = (Tensor::zeros(q.shape.clone()), Tensor::zeros(k.shape.clone()), Tensor::zeros(v.shape.clone()));
    let (q_len, kv_len) = (seq_len * hq * d, seq_len * hk * d);
    for b in 0..batch {
        let queries = b * q_len..(b + 1) * q_len;
        let keys = b * kv_len..(b + 1) * kv_len;
        // The sequence pass keeps lse token-major.
        let lse_rows: Vec<f64> =
            (0..seq_len * hq).map(|i| lse.data[(b * hq + i % hq) * seq_len + i / hq]).collect();
        let (dq_b, dk_b, dv_b) = sequence_attention_backward(
            spec,
            &q.data[queries.clone()],
            &k.data[keys.clone()],
            &v.data[keys.clone()],
            &o.data[queries.clone()],
            &lse_rows,
            &d_o.data[queries.clone()],
            seq_len,
        );
        dq.data[queries].copy_from_slice(&dq_b);
        dk.data[keys.clone()].copy_from_slice(&dk_b);
        dv.data[keys].copy_from_slice(&dv_b);
    }
    Ok((dq, dk, dv))
}

/// Step 7 backward for one sequence: (dq [S·Lq], dk [S·Lk], dv [S·Lk]), the final q and k's
/// gradients and v's. One pass over query rows gives dq, one over key rows gives dk and dv; each
/// rebuilds P from the lse.
#[allow(clippy::too_many_arguments)]
fn sequence_attention_backward(
    spec: &AttentionSpec,
    q: &[f64],
    k: &[f64],
    v: &[f64],
    o: &[f64],
    lse: &[f64],
    dout: &[f64],
    seq_len: usize,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (d, lq, lk, hq) = (spec.head_dim, spec.q_width(), spec.kv_width(), spec.query_heads);
    let scale = spec.softmax_scale;
    // D[t, h] = ⟨do, o⟩, the row sum of dP ∘ P.
    let delta: Vec<f64> = (0..seq_len * hq)
        .map(|i| dot(&dout[(i / hq) * lq + (i % hq) * d..][..d], &o[(i / hq) * lq + (i % hq) * d..][..d]))
        .collect();
    // P[t, s] and dS[t, s] of query head h.
    let weights = |t: usize, s: usize, h: usize| -> (f64, f64) {
        let j = spec.kv_head_of(h);
        let logit = scale * dot(head(q, lq, d, t, h), head(k, lk, d, s, j));
        let probability = (logit - lse[t * hq + h]).exp();
        let dprobability = dot(head(dout, lq, d, t, h), head(v, lk, d, s, j));
        (probability, probability * (dprobability - delta[t * hq + h]))
    };
    let mut dq = vec![0.0; seq_len * lq];
    fill_rows(&mut dq, lq, || (), |t, row, _| {
        for h in 0..hq {
            let j = spec.kv_head_of(h);
            for s in (0..seq_len).filter(|&s| spec.mask.allows(t, s)) {
                let (_, ds) = weights(t, s, h);
                let k_s = &k[s * lk + j * d..][..d];
                row[h * d..][..d].iter_mut().zip(k_s).for_each(|(g, k)| *g += scale * ds * k);
            }
        }
    });
    // Each key row holds [dk (Lk) | dv (Lk)].
    let mut dkv = vec![0.0; seq_len * 2 * lk];
    fill_rows(&mut dkv, 2 * lk, || (), |s, row, _| {
        let (dk_s, dv_s) = row.split_at_mut(lk);
        for h in 0..hq {
            let j = spec.kv_head_of(h);
            for t in (0..seq_len).filter(|&t| spec.mask.allows(t, s)) {
                let (probability, ds) = weights(t, s, h);
                let q_t = &q[t * lq + h * d..][..d];
                let do_t = &dout[t * lq + h * d..][..d];
                dk_s[j * d..][..d].iter_mut().zip(q_t).for_each(|(g, q)| *g += scale * ds * q);
                dv_s[j * d..][..d].iter_mut().zip(do_t).for_each(|(g, x)| *g += probability * x);
            }
        }
    });
    let (mut dk, mut dv) = (Vec::with_capacity(seq_len * lk), Vec::with_capacity(seq_len * lk));
    for row in dkv.chunks(2 * lk) {
        dk.extend_from_slice(&row[..lk]);
        dv.extend_from_slice(&row[lk..]);
    }
    (dq, dk, dv)
}

/// Head `h` of token `t` in rows of `width` values.
fn head(rows: &[f64], width: usize, d: usize, t: usize, h: usize) -> &[f64] {
    &rows[t * width + h * d..][..d]
}

/// Step 5 backward for one head in place: dy of y = s·x/n becomes dx = (s/n)·(dy − x·⟨x, dy⟩/n²).
fn norm_backward(layer: &Layer, x: &[f64], dy: &mut [f64], scale: f64) {
    let n = layer.norm(x);
    let projection = dot(x, dy) / (n * n);
    dy.iter_mut().zip(x).for_each(|(g, x)| *g = scale / n * (*g - x * projection));
}

/// dL/dtemp per kv head from dL/dτ_j = Σ_t ⟨dk̃_j, √d·k̂_j/n⟩.
fn temperature_gradient(layer: &Layer, dtau: &[f64]) -> Vec<f64> {
    match layer.spec.key_temperature {
        KeyTemperature::None => Vec::new(),
        KeyTemperature::Learned => dtau.to_vec(),
        // τ = exp(clamp(temp, 1e-7, 2)): the clamp passes the gradient on its closed range.
        KeyTemperature::LearnedExp => dtau
            .iter()
            .zip(layer.temperature)
            .zip(&layer.key_scale)
            .map(|((g, temp), tau)| if (1e-7..=2.0).contains(temp) { g * tau } else { 0.0 })
            .collect(),
    }
}

/// Step 3 backward of one stage: (dinput [rows_in·P], dweight, dbias) from the stage's input
/// [rows_in·P] and its output's gradient [rows_out·P], rows_out = rows_in − K + 1.
fn conv_backward(stage: &ConvStage, input: &[f64], doutput: &[f64], p: usize, d: usize)
    -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let (rows_out, width) = (doutput.len() / p, stage.width);
    let rows_in = rows_out + width - 1;
    let mut dinput = vec![0.0; rows_in * p];
    fill_rows(&mut dinput, p, || (), |r, row, _| {
        // Output row t reads input row r through tap k = r − t.
        for k in 0..width {
            let Some(t) = r.checked_sub(k).filter(|&t| t < rows_out) else { continue };
            let dout_t = &doutput[t * p..][..p];
            match stage.kind {
                ConvKind::Depthwise => {
                    for (c, g) in row.iter_mut().enumerate() {
                        *g += stage.weight[c * width + k] * dout_t[c];
                    }
                }
                ConvKind::PerHead => {
                    for (c, dout_c) in dout_t.iter().enumerate() {
                        let head_start = (c / d) * d;
                        for i in 0..d {
                            row[head_start + i] += stage.weight[(c * d + i) * width + k] * dout_c;
                        }
                    }
                }
            }
        }
    });
    let inputs_per_output = stage.kind.inputs_per_output(d);
    let mut dweight = vec![0.0; p * inputs_per_output * width];
    fill_rows(&mut dweight, inputs_per_output * width, || (), |c, row, _| {
        let first_input = match stage.kind {
            ConvKind::Depthwise => c,
            ConvKind::PerHead => (c / d) * d,
        };
        for t in 0..rows_out {
            let g = doutput[t * p + c];
            for i in 0..inputs_per_output {
                for k in 0..width {
                    row[i * width + k] += g * input[(t + k) * p + first_input + i];
                }
            }
        }
    });
    let dbias = (0..p).map(|c| (0..rows_out).map(|t| doutput[t * p + c]).sum()).collect();
    (dinput, dweight, dbias)
}
