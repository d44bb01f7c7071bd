//! The CPU reference: the whole layer in f64, straight from `AttentionSpec`.
//!
//! It judges every later stage (IR interpreter, GPU kernels, the PyTorch loader), so it shares no
//! code with the IR and is written to be read against docs/language.md, "Semantics" (step numbers
//! below are that list's). Everything is f64, including what the
//! GPU does in f32 (norm, softmax) or in bf16/f16 (storage); round inputs and weights with
//! [`round_to_dtype`] / [`Weights::rounded_to`] so that both sides start from the same numbers.
//!
//! For each sequence of x [S, E] (batch elements are independent):
//! 1. `q0 = x·W_qᵀ`, `k0 = x·W_kᵀ` (+ biases), PyTorch `nn.Linear` layout W [out, in].
//! 2. `v = [x·W_v1ᵀ | x_prev·W_v2ᵀ]`: the last `value_shift` kv heads read the previous token's x,
//!    zeros before the first token (their bias is still added there).
//! 3. Convolutions on `P0 = [q0 | k0]` (all q heads, then all k heads): P0 is left-padded with
//!    T = Σ(K−1) zero rows once, then every stage runs with no padding, as a PyTorch Conv1d
//!    cross-correlation (tap 0 reads the oldest row). A stage's bias therefore reaches row 0 of
//!    the stages after it. `depthwise` weights are [P, 1, K]; `per_head` weights are [P, d, K]
//!    and output channel c mixes the d input channels of its own head c / d. Without stages
//!    y = P0.
//! 4. q-k mean: `q̂_h = yq_h + ½·q0_h + ½·k0_g(h)`, `k̂_j = yk_j + ½·k0_j + ½·mean_{g(h)=j} q0_h`;
//!    without it `q̂ = yq`, `k̂ = yk`. g(h) = h / G.
//! 5. L2 norm: `sqrt(d)·x·rsqrt(‖x‖² + eps)`, keys also × τ_j (`learned`: temp_j,
//!    `learned_exp`: exp(clamp(temp_j, 1e-7, 2))).
//! 6. RoPE at the absolute position p on the first r channels of each head, angle p·θ^(−2i/r) for
//!    i < r/2: `neox` pairs channel i with i + r/2, `interleaved` pairs 2i with 2i + 1.
//! 7. `o_h = softmax(scale·q̃_h·K̃_g(h)ᵀ + mask)·V_g(h)` with `Mask::allows`; the log-sum-exp of
//!    each row's scaled, masked logits is kept for checking the kernels' saved statistics.
//! 8. `out = o·W_oᵀ` (+ bias).
//!
//! MLA layers (`spec.mla`) have their own forward, [`mla_forward`], and absorbed decode,
//! [`mla_decode`] (module `mla`); the functions below take the other layers.
//!
//! [`backward`] gives dL/dx and every parameter's gradient for a given dL/dout, derived by hand
//! step by step in reverse (see its module) and checked against finite differences.
//!
//! [`forward`] runs a batch; [`prefill`], [`prefill_chunk`] and [`decode_step`] run one sequence
//! with a [`DecodeState`] (KV cache, the raw P0 rows of the last T tokens, the previous token's
//! x·W_v2ᵀ), [`prefill_packed`] a packed batch of sequences of different lengths, and
//! [`PagedCache`] keeps the KV cache in pages through block tables; in any split they give the
//! same numbers as one forward pass over each whole sequence. Large inputs are spread over the
//! CPU's cores row by row; results do not depend on the thread count.

mod backward;
mod decode;
mod forward;
mod layer;
mod mla;
mod numeric;
mod parallel;
mod tensor;
mod weights;

pub use backward::{Gradients, attention_backward, backward};
pub use decode::{DecodeState, PagedCache, decode_step, prefill, prefill_chunk, prefill_packed};
pub use forward::{ForwardOutputs, forward};
pub use mla::{MlaOutputs, mla_decode, mla_forward};
pub use numeric::{Rng, round_to_dtype};
pub use tensor::{Tensor, max_abs_diff, rel_l2_error};
pub use weights::{Weights, random_input};
