"""Peer systems for the side-by-side benchmark: the same layer or attention core as PyTorch users
run it today. Each builder returns a zero-argument callable that runs one forward pass on
preallocated inputs, so the harness can time every system the same way."""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def sdpa_core(backend, batch, seq_len, q_heads, kv_heads, head_dim, causal=True, dtype=torch.bfloat16):
    """Attention core alone through torch SDPA with one backend (cuDNN or FlashAttention-2)."""
    q = torch.randn(batch, q_heads, seq_len, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(batch, kv_heads, seq_len, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, device="cuda", dtype=dtype)
    gqa = q_heads != kv_heads
    if gqa and backend == SDPBackend.CUDNN_ATTENTION:
        # cuDNN through SDPA takes GQA only as repeated heads; the repeat is outside the timing.
        k = k.repeat_interleave(q_heads // kv_heads, dim=1)
        v = v.repeat_interleave(q_heads // kv_heads, dim=1)
        gqa = False

    def run():
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    return run


def mha_layer(batch, seq_len, model_dim, head_dim, dtype=torch.bfloat16):
    """The MHA layer of the same width: fused qkv GEMM, cuDNN SDPA (causal), output GEMM."""
    heads = model_dim // head_dim
    x = torch.randn(batch, seq_len, model_dim, device="cuda", dtype=dtype)
    w_qkv = torch.randn(3 * model_dim, model_dim, device="cuda", dtype=dtype) * model_dim**-0.5
    w_o = torch.randn(model_dim, model_dim, device="cuda", dtype=dtype) * model_dim**-0.5

    def run():
        qkv = F.linear(x, w_qkv).view(batch, seq_len, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        return F.linear(o.transpose(1, 2).reshape(batch, seq_len, model_dim), w_o)

    return run


def zaya_config(model_dim=2048, q_heads=8, kv_heads=2, head_dim=128):
    from transformers import ZayaConfig

    return ZayaConfig(
        hidden_size=model_dim,
        num_attention_heads=q_heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_hidden_layers=1,
        vocab_size=128,
        num_experts=2,
    )


def zaya_attention_module(config, dtype=torch.bfloat16, attn_impl="sdpa"):
    """Hugging Face's ZayaAttention (layer 0) with random weights, on the GPU."""
    from transformers.models.zaya.modeling_zaya import ZayaAttention, ZayaRotaryEmbedding

    config._attn_implementation = attn_impl
    layer = ZayaAttention(config, layer_idx=0).to(device="cuda", dtype=dtype).eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * p.shape[-1] ** -0.5 if p.dim() > 1 else torch.rand_like(p) + 0.5)
    rotary = ZayaRotaryEmbedding(config).to("cuda")
    return layer, rotary


def zaya_layer(batch, seq_len, compiled=False, dtype=torch.bfloat16, module=None):
    """Hugging Face's ZAYA1 CCGQA layer forward (its PyTorch prologue + SDPA), optionally compiled."""
    config = zaya_config()
    layer, rotary = module if module is not None else zaya_attention_module(config, dtype)
    x = torch.randn(batch, seq_len, config.hidden_size, device="cuda", dtype=dtype)
    positions = torch.arange(seq_len, device="cuda")[None].expand(batch, -1)
    cos, sin = rotary(x, positions, layer_type=config.layer_types[0])
    fwd = torch.compile(layer) if compiled else layer

    @torch.no_grad()
    def run():
        return fwd(x, attention_mask=None, position_embeddings=(cos, sin))[0]

    return run
