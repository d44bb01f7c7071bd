//! The forward pass over whole sequences (language.md, Semantics, steps 1 to 8).

use crate::spec::AttentionSpec;

use super::layer::Layer;
use super::parallel::fill_rows;
use super::tensor::Tensor;
use super::weights::Weights;

/// Everything the forward pass produces that a later stage may be checked against.
#[derive(Clone, Debug, PartialEq)]
pub struct ForwardOutputs {
    /// The layer output [B, S, E].
    pub out: Tensor,
    /// Final queries after q-k mean, norm and RoPE [B, S, Hq, d].
    pub q: Tensor,
    /// Final keys, what a KV cache holds [B, S, Hk, d].
    pub k: Tensor,
    /// Values, shifted heads included [B, S, Hk, d].
    pub v: Tensor,
    /// Attention output o before o_proj [B, S, Hq, d].
    pub attn: Tensor,
    /// Natural-log log-sum-exp of the scaled, masked logits of each query [B, Hq, S].
    pub lse: Tensor,
}

/// The layer on a batch x [B, S, E] of independent sequences.
pub fn forward(
    spec: &AttentionSpec,
    weights: &Weights,
    x: &Tensor,
) -> Result<ForwardOutputs, String> {
    let layer = Layer::new(spec, weights)?;
    x.check_consistent()?;
    let wrong_shape =
        || format!("input has shape {:?}, expected [batch, seq_len, {}]", x.shape, spec.model_dim);
    let [batch, seq_len, e] = x.shape[..] else { return Err(wrong_shape()) };
    if e != spec.model_dim {
        return Err(wrong_shape());
    }
    let (hq, hk, d) = (spec.query_heads, spec.kv_heads, spec.head_dim);
    let mut outputs = ForwardOutputs {
        out: Tensor::zeros(vec![batch, seq_len, e]),
        q: Tensor::zeros(vec![batch, seq_len, hq, d]),
        k: Tensor::zeros(vec![batch, seq_len, hk, d]),
        v: Tensor::zeros(vec![batch, seq_len, hk, d]),
        attn: Tensor::zeros(vec![batch, seq_len, hq, d]),
        lse: Tensor::zeros(vec![batch, hq, seq_len]),
    };
    for b in 0..batch {
        let sequence = forward_sequence(&layer, &x.data[b * seq_len * e..(b + 1) * seq_len * e]);
        let copy = |tensor: &mut Tensor, data: &[f64]| {
            tensor.data[b * data.len()..(b + 1) * data.len()].copy_from_slice(data);
        };
        copy(&mut outputs.out, &sequence.out);
        copy(&mut outputs.q, &sequence.q);
        copy(&mut outputs.k, &sequence.k);
        copy(&mut outputs.v, &sequence.v);
        copy(&mut outputs.attn, &sequence.attn);
        // lse is stored head-major; the sequence computed it token-major.
        for t in 0..seq_len {
            for h in 0..hq {
                outputs.lse.data[(b * hq + h) * seq_len + t] = sequence.lse[t * hq + h];
            }
        }
    }
    Ok(outputs)
}

/// One sequence's activations, every tensor token-major (row t first).
pub(super) struct SequenceActivations {
    /// T rows of zeros, then P0 = [q0 | k0] of every token [T + S, P].
    pub padded_packed: Vec<f64>,
    pub q: Vec<f64>,
    pub k: Vec<f64>,
    pub v: Vec<f64>,
    pub attn: Vec<f64>,
    /// [S, Hq].
    pub lse: Vec<f64>,
    pub out: Vec<f64>,
}

/// Steps 1 to 8 for one sequence x [S·E], starting at position 0 with zero history.
pub(super) fn forward_sequence(layer: &Layer, x: &[f64]) -> SequenceActivations {
    let spec = layer.spec;
    let e = spec.model_dim;
    let seq_len = x.len() / e;
    let (p, lq, lk) = (spec.packed_width(), spec.q_width(), spec.kv_width());
    let history = spec.conv_history();
    let row = |t: usize| &x[t * e..(t + 1) * e];

    // Steps 1 and 3: P0 below T zero rows, the single padding of the convolutions.
    let mut padded_packed = vec![0.0; (history + seq_len) * p];
    fill_rows(
        &mut padded_packed[history * p..],
        p,
        || (),
        |t, packed, _| layer.project_packed(row(t), packed),
    );

    // Step 2: the previous token's input, zeros before the first.
    let zeros = vec![0.0; e];
    let mut v = vec![0.0; seq_len * lk];
    fill_rows(
        &mut v,
        lk,
        || (),
        |t, v_t, _| {
            let x_prev = if t == 0 { &zeros[..] } else { row(t - 1) };
            layer.project_value(row(t), x_prev, v_t)
        },
    );

    let convolved = layer.convolve(&padded_packed, history + seq_len);

    // Steps 4 to 6, one token at a time; q and k are written as one [q | k] row per token.
    let mut qk = vec![0.0; seq_len * p];
    fill_rows(
        &mut qk,
        p,
        || (),
        |t, qk_t, _| {
            let (q_t, k_t) = qk_t.split_at_mut(lq);
            let packed = &padded_packed[(history + t) * p..][..p];
            layer.final_query_and_key(packed, &convolved[t * p..][..p], t, q_t, k_t);
        },
    );
    let (mut q, mut k) = (Vec::with_capacity(seq_len * lq), Vec::with_capacity(seq_len * lk));
    for qk_t in qk.chunks(p) {
        q.extend_from_slice(&qk_t[..lq]);
        k.extend_from_slice(&qk_t[lq..]);
    }

    // Step 7: each query row holds o [Hq·d] then lse [Hq]; logits are per-thread scratch.
    let hq = spec.query_heads;
    let mut attended = vec![0.0; seq_len * (lq + hq)];
    fill_rows(
        &mut attended,
        lq + hq,
        || vec![0.0; seq_len],
        |t, row_t, logits| {
            let (o_t, lse_t) = row_t.split_at_mut(lq);
            layer.attend(&q[t * lq..(t + 1) * lq], t, &k, &v, seq_len, o_t, lse_t, logits);
        },
    );
    let (mut attn, mut lse) = (Vec::with_capacity(seq_len * lq), Vec::with_capacity(seq_len * hq));
    for row_t in attended.chunks(lq + hq) {
        attn.extend_from_slice(&row_t[..lq]);
        lse.extend_from_slice(&row_t[lq..]);
    }

    // Step 8.
    let mut out = vec![0.0; seq_len * e];
    fill_rows(
        &mut out,
        e,
        || (),
        |t, out_t, _| layer.project_output(&attn[t * lq..(t + 1) * lq], out_t),
    );

    SequenceActivations { padded_packed, q, k, v, attn, lse, out }
}
