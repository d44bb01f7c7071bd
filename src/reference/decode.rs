//! Prefill and token-by-token decode of one sequence (docs/language.md, "Decode state").
//!
//! Decode continues a sequence exactly: the convolution state plays the part of the T zero rows
//! of the forward pass, and the shift state that of the zero x_prev row, so prefill of S tokens
//! followed by n decode steps gives what one forward pass over S + n tokens gives (for the
//! `causal` and `sliding_window` masks; under `none` a decoded token sees only the tokens so far).

use crate::spec::AttentionSpec;

use super::forward::forward_sequence;
use super::layer::Layer;
use super::tensor::Tensor;
use super::weights::Weights;

/// What one sequence carries from token to token.
#[derive(Clone, Debug, PartialEq)]
pub struct DecodeState {
    /// Tokens seen so far, which is the absolute position of the next one.
    pub position: usize,
    /// KV cache: final keys (after norm, temperature and RoPE) of every token so far [position, Hk, d].
    pub keys: Vec<f64>,
    /// KV cache: values of every token so far [position, Hk, d].
    pub values: Vec<f64>,
    /// Convolution state: raw P0 = [q0 | k0] rows of the last T tokens, oldest first, with zero
    /// rows standing for tokens before the start [T, P].
    pub conv_rows: Vec<f64>,
    /// Shift state: the previous token's input x, zeros before the start [E].
    pub prev_x: Vec<f64>,
}

impl DecodeState {
    /// The state of a sequence with no tokens yet.
    pub fn new(spec: &AttentionSpec) -> DecodeState {
        DecodeState {
            position: 0,
            keys: Vec::new(),
            values: Vec::new(),
            conv_rows: vec![0.0; spec.conv_history() * spec.packed_width()],
            prev_x: vec![0.0; spec.model_dim],
        }
    }

    fn check(&self, spec: &AttentionSpec) -> Result<(), String> {
        let expect = |what: &str, len: usize, expected: usize| {
            if len == expected {
                Ok(())
            } else {
                Err(format!("decode state: {what} holds {len} values, expected {expected}"))
            }
        };
        let cache_len = self.position * spec.kv_width();
        expect("keys", self.keys.len(), cache_len)?;
        expect("values", self.values.len(), cache_len)?;
        expect("conv_rows", self.conv_rows.len(), spec.conv_history() * spec.packed_width())?;
        expect("prev_x", self.prev_x.len(), spec.model_dim)
    }
}

/// Runs the layer over the prompt x [S, E] and returns its output [S, E] with the state after it.
pub fn prefill(
    spec: &AttentionSpec,
    weights: &Weights,
    x: &Tensor,
) -> Result<(Tensor, DecodeState), String> {
    let layer = Layer::new(spec, weights)?;
    x.check_consistent()?;
    let e = spec.model_dim;
    let wrong_shape = || format!("prompt has shape {:?}, expected [seq_len, {e}]", x.shape);
    let [seq_len, width] = x.shape[..] else { return Err(wrong_shape()) };
    if width != e {
        return Err(wrong_shape());
    }
    let sequence = forward_sequence(&layer, &x.data);
    let rows_kept = spec.conv_history() * spec.packed_width();
    let padded = &sequence.padded_packed;
    let state = DecodeState {
        position: seq_len,
        keys: sequence.k,
        values: sequence.v,
        // The padded P0 has T zero rows first, so its last T rows are right even when S < T.
        conv_rows: padded[padded.len() - rows_kept..].to_vec(),
        prev_x: if seq_len == 0 { vec![0.0; e] } else { x.data[(seq_len - 1) * e..].to_vec() },
    };
    Ok((Tensor { shape: vec![seq_len, e], data: sequence.out }, state))
}

/// Runs the layer on the next token x_t [E] of the sequence `state` describes, returns its output
/// [E] and advances the state. On error the state is left unchanged.
pub fn decode_step(
    spec: &AttentionSpec,
    weights: &Weights,
    state: &mut DecodeState,
    x_t: &[f64],
) -> Result<Vec<f64>, String> {
    let layer = Layer::new(spec, weights)?;
    state.check(spec)?;
    if x_t.len() != spec.model_dim {
        return Err(format!(
            "token has {} values, expected model_dim {}",
            x_t.len(),
            spec.model_dim
        ));
    }
    let (p, lq, lk) = (spec.packed_width(), spec.q_width(), spec.kv_width());
    let history = spec.conv_history();
    let position = state.position;

    // The convolution window: T rows of state, then this token's P0 row; it yields one row.
    let mut window = state.conv_rows.clone();
    window.resize((history + 1) * p, 0.0);
    layer.project_packed(x_t, &mut window[history * p..]);
    let convolved = layer.convolve(&window, history + 1);

    let (mut q, mut k, mut v) = (vec![0.0; lq], vec![0.0; lk], vec![0.0; lk]);
    layer.final_query_and_key(&window[history * p..], &convolved, position, &mut q, &mut k);
    layer.project_value(x_t, &state.prev_x, &mut v);
    state.keys.extend_from_slice(&k);
    state.values.extend_from_slice(&v);

    let kv_len = position + 1;
    let (mut o, mut lse, mut logits) =
        (vec![0.0; lq], vec![0.0; spec.query_heads], vec![0.0; kv_len]);
    layer.attend(&q, position, &state.keys, &state.values, kv_len, &mut o, &mut lse, &mut logits);
    let mut out = vec![0.0; spec.model_dim];
    layer.project_output(&o, &mut out);

    state.conv_rows = window[p..].to_vec();
    state.prev_x = x_t.to_vec();
    state.position = kv_len;
    Ok(out)
}
