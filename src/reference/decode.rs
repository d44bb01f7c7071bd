//! Serving: prefill and decode of sequences that carry state from call to call (docs/language.md,
//! "Decode state"), one sequence at a time ([`prefill`], [`prefill_chunk`], [`decode_step`]),
//! packed batches of sequences of different lengths ([`prefill_packed`]), and a KV cache in pages
//! reached through block tables ([`PagedCache`]).
//!
//! A chunk continues a sequence exactly: the convolution state plays the part of the T zero rows
//! of the forward pass, the shift state that of the zero x_prev row, and positions start at the
//! tokens already seen, so prefilling S tokens in any number of chunks (a decode step is a chunk
//! of one) gives what one forward pass over the S tokens gives (for the `causal` and
//! `sliding_window` masks; under `none` a token sees only the tokens so far, its chunk's
//! included).

use crate::spec::AttentionSpec;

use super::layer::Layer;
use super::parallel::fill_rows;
use super::tensor::Tensor;
use super::weights::Weights;

/// What one sequence carries from call to call.
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
    /// Shift state: the previous token's x·W_v2ᵀ, the delayed value heads' input without their
    /// bias (zeros before the start) [value_shift·d]: what vLLM and SGLang keep.
    pub shift: Vec<f64>,
}

impl DecodeState {
    /// The state of a sequence with no tokens yet.
    pub fn new(spec: &AttentionSpec) -> DecodeState {
        DecodeState {
            position: 0,
            keys: Vec::new(),
            values: Vec::new(),
            conv_rows: vec![0.0; spec.conv_history() * spec.packed_width()],
            shift: vec![0.0; spec.value_shift * spec.head_dim],
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
        expect("shift", self.shift.len(), spec.value_shift * spec.head_dim)
    }
}

/// Runs the layer over the prompt x [S, E] of a new sequence: its output [S, E] and the state
/// after it.
pub fn prefill(spec: &AttentionSpec, weights: &Weights, x: &Tensor) -> Result<(Tensor, DecodeState), String> {
    let mut state = DecodeState::new(spec);
    let out = prefill_chunk(spec, weights, &mut state, x)?;
    Ok((out, state))
}

/// Runs the layer on the next token x_t [E] of the sequence `state` describes, returns its output
/// [E] and advances the state. On error the state is left unchanged.
pub fn decode_step(
    spec: &AttentionSpec,
    weights: &Weights,
    state: &mut DecodeState,
    x_t: &[f64],
) -> Result<Vec<f64>, String> {
    let token = Tensor { shape: vec![1, x_t.len()], data: x_t.to_vec() };
    if x_t.len() != spec.model_dim {
        return Err(format!("token has {} values, expected model_dim {}", x_t.len(), spec.model_dim));
    }
    Ok(prefill_chunk(spec, weights, state, &token)?.data)
}

/// Runs the layer on the next n tokens x [n, E] of the sequence `state` describes (chunked
/// prefill; n = 1 is a decode step), returns their output [n, E] and advances the state. On
/// error the state is left unchanged.
pub fn prefill_chunk(
    spec: &AttentionSpec,
    weights: &Weights,
    state: &mut DecodeState,
    x: &Tensor,
) -> Result<Tensor, String> {
    let layer = Layer::new(spec, weights)?;
    state.check(spec)?;
    x.check_consistent()?;
    let e = spec.model_dim;
    let wrong_shape = || format!("chunk has shape {:?}, expected [seq_len, {e}]", x.shape);
    let [n, width] = x.shape[..] else { return Err(wrong_shape()) };
    if width != e {
        return Err(wrong_shape());
    }
    let (p, lq, lk, hq) = (spec.packed_width(), spec.q_width(), spec.kv_width(), spec.query_heads);
    let (history, start) = (spec.conv_history(), state.position);
    let row = |t: usize| &x.data[t * e..(t + 1) * e];

    // Steps 1 and 3: the convolution state, then this chunk's P0 rows.
    let mut padded = state.conv_rows.clone();
    padded.resize((history + n) * p, 0.0);
    fill_rows(&mut padded[history * p..], p, || (), |t, packed, _| layer.project_packed(row(t), packed));
    let convolved = layer.convolve(&padded, history + n);

    // Step 2: the first token's delayed heads from the shift state, the others' from the token
    // before them in the chunk.
    let shift_width = spec.value_shift * spec.head_dim;
    let mut shifts = state.shift.clone();
    shifts.resize((n + 1) * shift_width, 0.0);
    fill_rows(&mut shifts[shift_width..], shift_width, || (), |t, shift, _| layer.shift_state(row(t), shift));
    // Nothing fails from here on: the cache grows in place.
    let (keys, values) = (&mut state.keys, &mut state.values);
    keys.resize((start + n) * lk, 0.0);
    values.resize((start + n) * lk, 0.0);
    fill_rows(&mut values[start * lk..], lk, || (), |t, v_t, _| {
        layer.project_value_shifted(row(t), &shifts[t * shift_width..][..shift_width], v_t)
    });

    // Steps 4 to 6 at each token's absolute position.
    let mut queries = vec![0.0; n * lq];
    let mut qk = vec![0.0; n * p];
    fill_rows(&mut qk, p, || (), |t, qk_t, _| {
        let (q_t, k_t) = qk_t.split_at_mut(lq);
        layer.final_query_and_key(&padded[(history + t) * p..][..p], &convolved[t * p..][..p], start + t, q_t, k_t);
    });
    for (t, qk_t) in qk.chunks(p).enumerate() {
        queries[t * lq..(t + 1) * lq].copy_from_slice(&qk_t[..lq]);
        keys[(start + t) * lk..(start + t + 1) * lk].copy_from_slice(&qk_t[lq..]);
    }

    // Steps 7 and 8 over every key cached so far; the mask keeps each token to its own past.
    let kv_len = start + n;
    let mut out = vec![0.0; n * e];
    fill_rows(&mut out, e, || (vec![0.0; lq], vec![0.0; hq], vec![0.0; kv_len]), |t, out_t, scratch| {
        let (o, lse, logits) = scratch;
        layer.attend(&queries[t * lq..(t + 1) * lq], start + t, keys, values, kv_len, o, lse, logits);
        layer.project_output(o, out_t);
    });

    state.position = kv_len;
    state.conv_rows = padded[n * p..].to_vec();
    state.shift = shifts[n * shift_width..].to_vec();
    Ok(Tensor { shape: vec![n, e], data: out })
}

/// Prefill of a packed batch: sequence i is x[cu_seqlens[i] .. cu_seqlens[i + 1]] ([N, E] in
/// all, FlashAttention's varlen convention), continuing from `states[i]` (a new sequence's state
/// is [`DecodeState::new`]). Convolutions, the value shift, RoPE positions and the mask restart at
/// every sequence boundary. Returns out [N, E]; on error no state changes.
pub fn prefill_packed(
    spec: &AttentionSpec,
    weights: &Weights,
    states: &mut [DecodeState],
    x: &Tensor,
    cu_seqlens: &[usize],
) -> Result<Tensor, String> {
    x.check_consistent()?;
    let e = spec.model_dim;
    let wrong_shape = || format!("x has shape {:?}, expected [tokens, {e}]", x.shape);
    let [tokens, width] = x.shape[..] else { return Err(wrong_shape()) };
    if width != e {
        return Err(wrong_shape());
    }
    check_cu_seqlens(cu_seqlens, states.len(), tokens)?;
    // Every check of prefill_chunk up front, so that the sequences then advance in place.
    Layer::new(spec, weights)?;
    for (i, state) in states.iter().enumerate() {
        state.check(spec).map_err(|message| format!("sequence {i}: {message}"))?;
    }
    let mut out = Vec::with_capacity(tokens * e);
    for (i, state) in states.iter_mut().enumerate() {
        let (first, end) = (cu_seqlens[i], cu_seqlens[i + 1]);
        let chunk = Tensor { shape: vec![end - first, e], data: x.data[first * e..end * e].to_vec() };
        out.extend(prefill_chunk(spec, weights, state, &chunk)?.data);
    }
    Ok(Tensor { shape: vec![tokens, e], data: out })
}

/// `cu_seqlens` for `sequences` sequences of `tokens` tokens in all: sequences + 1 offsets from 0,
/// never decreasing, ending at `tokens`.
fn check_cu_seqlens(cu_seqlens: &[usize], sequences: usize, tokens: usize) -> Result<(), String> {
    if cu_seqlens.len() != sequences + 1 {
        return Err(format!("cu_seqlens has {} entries, expected {} (one more than the sequences)", cu_seqlens.len(), sequences + 1));
    }
    if cu_seqlens[0] != 0 {
        return Err(format!("cu_seqlens[0] is {}, expected 0", cu_seqlens[0]));
    }
    if let Some(i) = (1..cu_seqlens.len()).find(|&i| cu_seqlens[i] < cu_seqlens[i - 1]) {
        return Err(format!("cu_seqlens[{i}] = {} is below cu_seqlens[{}] = {}", cu_seqlens[i], i - 1, cu_seqlens[i - 1]));
    }
    match cu_seqlens.last() {
        Some(&last) if last == tokens => Ok(()),
        _ => Err(format!("cu_seqlens ends at {}, expected the token count {tokens}", cu_seqlens[sequences])),
    }
}

/// A KV cache in pages, as a serving engine keeps it: k̃ and v of `pages` pages of `page_size`
/// tokens each ([pages, page_size, Hk, d]); sequence i's token t lives in page
/// `block_tables[i][t / page_size]`, slot `t % page_size`. Beside it, per sequence, the length
/// and the convolution and shift state of [`DecodeState`].
#[derive(Clone, Debug, PartialEq)]
pub struct PagedCache {
    pub page_size: usize,
    pub pages: usize,
    pub k_pages: Vec<f64>,
    pub v_pages: Vec<f64>,
    pub block_tables: Vec<Vec<usize>>,
    pub seq_lens: Vec<usize>,
    pub conv_rows: Vec<Vec<f64>>,
    pub shift: Vec<Vec<f64>>,
}

impl PagedCache {
    /// `pages` empty pages and one empty sequence per block table.
    pub fn new(spec: &AttentionSpec, page_size: usize, pages: usize, block_tables: Vec<Vec<usize>>) -> Result<PagedCache, String> {
        if page_size == 0 {
            return Err("page_size must be positive".into());
        }
        let sequences = block_tables.len();
        let empty = DecodeState::new(spec);
        let cache = PagedCache {
            page_size,
            pages,
            k_pages: vec![0.0; pages * page_size * spec.kv_width()],
            v_pages: vec![0.0; pages * page_size * spec.kv_width()],
            block_tables,
            seq_lens: vec![0; sequences],
            conv_rows: vec![empty.conv_rows.clone(); sequences],
            shift: vec![empty.shift; sequences],
        };
        let mut owner = vec![None; pages];
        for (i, table) in cache.block_tables.iter().enumerate() {
            for (slot, &page) in table.iter().enumerate() {
                if page >= pages {
                    return Err(format!("block_tables[{i}][{slot}] = {page} names a page outside the pool of {pages}"));
                }
                if let Some((other, other_slot)) = owner[page] {
                    return Err(format!("block_tables[{i}][{slot}] = {page} is already block_tables[{other}][{other_slot}]"));
                }
                owner[page] = Some((i, slot));
            }
        }
        Ok(cache)
    }

    /// Sequence i's state, its keys and values gathered from its pages.
    pub fn state(&self, spec: &AttentionSpec, i: usize) -> DecodeState {
        let lk = spec.kv_width();
        let (mut keys, mut values) = (Vec::with_capacity(self.seq_lens[i] * lk), Vec::with_capacity(self.seq_lens[i] * lk));
        for t in 0..self.seq_lens[i] {
            let at = self.slot(i, t) * lk;
            keys.extend_from_slice(&self.k_pages[at..at + lk]);
            values.extend_from_slice(&self.v_pages[at..at + lk]);
        }
        DecodeState {
            position: self.seq_lens[i],
            keys,
            values,
            conv_rows: self.conv_rows[i].clone(),
            shift: self.shift[i].clone(),
        }
    }

    /// Token slot (page · page_size + offset) of sequence i's token t.
    fn slot(&self, i: usize, t: usize) -> usize {
        self.block_tables[i][t / self.page_size] * self.page_size + t % self.page_size
    }

    /// Prefill or decode of a packed batch into the pages: sequence i takes the tokens
    /// x[cu_seqlens[i] .. cu_seqlens[i + 1]] after the ones it holds; their k̃ and v are written
    /// into its pages. Checks before anything runs that every sequence's pages hold its new
    /// length. Returns out [N, E].
    pub fn step(&mut self, spec: &AttentionSpec, weights: &Weights, x: &Tensor, cu_seqlens: &[usize]) -> Result<Tensor, String> {
        check_cu_seqlens(cu_seqlens, self.block_tables.len(), x.shape.first().copied().unwrap_or(0))?;
        for (i, table) in self.block_tables.iter().enumerate() {
            let length = self.seq_lens[i] + cu_seqlens[i + 1] - cu_seqlens[i];
            if length > table.len() * self.page_size {
                return Err(format!(
                    "sequence {i} would hold {length} tokens, more than its {} pages of {}",
                    table.len(),
                    self.page_size
                ));
            }
        }
        let mut states: Vec<DecodeState> = (0..self.block_tables.len()).map(|i| self.state(spec, i)).collect();
        let out = prefill_packed(spec, weights, &mut states, x, cu_seqlens)?;
        let lk = spec.kv_width();
        for (i, state) in states.into_iter().enumerate() {
            for t in self.seq_lens[i]..state.position {
                let at = self.slot(i, t) * lk;
                self.k_pages[at..at + lk].copy_from_slice(&state.keys[t * lk..(t + 1) * lk]);
                self.v_pages[at..at + lk].copy_from_slice(&state.values[t * lk..(t + 1) * lk]);
            }
            self.seq_lens[i] = state.position;
            self.conv_rows[i] = state.conv_rows;
            self.shift[i] = state.shift;
        }
        Ok(out)
    }
}
