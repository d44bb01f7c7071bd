"""Peer systems for the side-by-side benchmark: the same layer or attention core as PyTorch users
run it today. Each builder allocates its inputs and returns a zero-argument callable that runs one
forward pass on them (with train=True: a layer's forward and backward through autograd, a core's
backward alone, its forward run once outside), so the harness times every system the same way;
weights are built once per system by the caller and passed in (they stay resident across shapes,
as in a model)."""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "fa2": SDPBackend.FLASH_ATTENTION}


def backward_of(forward, inputs):
    """The backward alone of `forward()` with respect to `inputs` (which require grad): the
    forward runs once here, each call differentiates its graph again for a fresh dO."""
    out = forward()
    dout = torch.randn_like(out)
    return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)


def forward_and_backward(forward, inputs):
    """One training step's worth of `forward()`: the forward, then the gradients of `inputs`."""
    dout = torch.randn_like(forward().detach())
    return lambda: torch.autograd.grad(forward(), inputs, dout)


def sdpa_core(backend, batch, seq_len, q_heads, kv_heads, head_dim, causal=True,
              dtype=torch.bfloat16, train=False):
    """Attention core alone through torch SDPA with one backend ("cudnn" or "fa2"), inputs in
    SDPA's [B, H, S, D] layout."""
    q = torch.randn(batch, q_heads, seq_len, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(batch, kv_heads, seq_len, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, device="cuda", dtype=dtype)
    gqa = q_heads != kv_heads
    if gqa and backend == "cudnn":
        # cuDNN through SDPA takes GQA only as repeated heads; the repeat is outside the timing.
        k = k.repeat_interleave(q_heads // kv_heads, dim=1)
        v = v.repeat_interleave(q_heads // kv_heads, dim=1)
        gqa = False
    chosen = [BACKENDS[backend]]
    for tensor in (q, k, v):
        tensor.requires_grad_(train)

    def run():
        with sdpa_kernel(chosen):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)

    if train:
        with sdpa_kernel(chosen):
            return backward_of(run, (q, k, v))
    return run


def flex_window_core(batch, seq_len, q_heads, kv_heads, head_dim, window, dtype=torch.bfloat16,
                     train=False):
    """Sliding-window attention core through FlexAttention (PyTorch's Triton kernels, compiled
    with torch.compile, skipping the key blocks its block mask rules out): query i sees keys
    i - window + 1 .. i. Inputs in [B, H, S, D]; compiled before the timing starts."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q = torch.randn(batch, q_heads, seq_len, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(batch, kv_heads, seq_len, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, device="cuda", dtype=dtype)

    def in_window(b, h, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (q_idx - kv_idx < window)

    block_mask = create_block_mask(in_window, None, None, seq_len, seq_len, device="cuda")
    attend = torch.compile(flex_attention)

    for tensor in (q, k, v):
        tensor.requires_grad_(train)

    def run():
        return attend(q, k, v, block_mask=block_mask, enable_gqa=q_heads != kv_heads)

    if train:
        return backward_of(run, (q, k, v))
    run()
    return run


def mha_layer_weights(model_dim, dtype=torch.bfloat16, seed=0):
    """Fused [W_q | W_k | W_v] and W_o of the MHA layer of width model_dim."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    scale = model_dim**-0.5
    w_qkv = torch.randn(3 * model_dim, model_dim, device="cuda", dtype=dtype,
                        generator=generator) * scale
    w_o = torch.randn(model_dim, model_dim, device="cuda", dtype=dtype,
                      generator=generator) * scale
    return w_qkv, w_o


def mha_layer(weights, batch, seq_len, model_dim, head_dim, dtype=torch.bfloat16, train=False):
    """The MHA layer of the same width: fused qkv GEMM, cuDNN SDPA (causal), output GEMM. No RoPE
    (it would only add elementwise work to the peer)."""
    w_qkv, w_o = weights
    heads = model_dim // head_dim
    x = torch.randn(batch, seq_len, model_dim, device="cuda", dtype=dtype)

    def run():
        qkv = F.linear(x, w_qkv).view(batch, seq_len, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=True)
        return F.linear(o.transpose(1, 2).reshape(batch, seq_len, model_dim), w_o)

    if train:
        leaves = [x.requires_grad_()] + [w.detach().requires_grad_() for w in (w_qkv, w_o)]
        w_qkv, w_o = leaves[1:]
        return forward_and_backward(run, leaves)
    return run


def zaya_layer(zaya, batch, seq_len, module=None, dtype=torch.bfloat16, train=False):
    """Hugging Face's ZayaAttention forward (its PyTorch prologue + SDPA) on fresh x, with the
    rotary tables computed outside the timing as the model does once for all layers. `zaya` is a
    ccc.hf.ZayaLayer; `module` optionally replaces its module (e.g. by torch.compile of it)."""
    x = torch.randn(batch, seq_len, zaya.config.hidden_size, device="cuda", dtype=dtype)
    embeddings = zaya.position_embeddings(x)

    def run():
        return zaya.forward(x, module=module, position_embeddings=embeddings)

    if train:
        leaves = [x.requires_grad_()] + [w.requires_grad_() for w in zaya.module.parameters()]
        return forward_and_backward(
            lambda: zaya.output(x, module=module, position_embeddings=embeddings), leaves)
    return run
