"""FLOP counts for the benchmark, pure Python.

Attention core: FlashAttention's convention, 4·B·S²·H·D for the forward (two GEMMs of 2·S²·D per
head), halved for a causal mask (no credit for the diagonal); a sliding window of W keys counts
4·B·H·D·(S·W − W²/2) once S > W. Layer: the core plus 2·B·S·in·out for every projection (q, k,
v, o) and the convolution taps (2 FLOPs per tap per output channel). Elementwise work (q-k mean,
L2 norm, RoPE, softmax) is not counted."""


def attended_pairs(mask, seq_len):
    """Query-key pairs the convention credits for one head of one sequence."""
    if mask.kind == "none":
        return seq_len * seq_len
    if mask.kind == "sliding_window" and seq_len > mask.window:
        return seq_len * mask.window - mask.window * mask.window / 2
    return seq_len * seq_len / 2


def core_flops(spec, batch, seq_len):
    return 4 * batch * spec.query_heads * spec.head_dim * attended_pairs(spec.mask, seq_len)


def layer_flops(spec, batch, seq_len):
    tokens = batch * seq_len
    e, d = spec.model_dim, spec.head_dim
    projections = 2 * tokens * e * (spec.q_width + 2 * spec.kv_width)  # q, k, v
    projections += 2 * tokens * spec.q_width * e  # o
    conv = 0
    for stage in spec.qk_conv:
        inputs_per_channel = 1 if stage.kind == "depthwise" else d
        conv += 2 * tokens * spec.packed_width * inputs_per_channel * stage.width
    return projections + conv + core_flops(spec, batch, seq_len)
