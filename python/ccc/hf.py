"""Hugging Face transformers' ZAYA attention (`ZayaAttention`). `patch(model, libraries)` runs a
loaded ZAYA model's attention layers on ccc's compiled libraries, `unpatch(model)` undoes it (see
ccc.hf_patch). `ZayaLayer` builds the module for a spec and feeds it a state dict, for validation
and as a benchmark peer; only CCA specs of ZAYA1's form map onto it: a depthwise then a per-head
convolution stage, the q-k mean, half the kv heads shifted, L2 norm with learned temperature, NeoX
RoPE, causal mask, scale 1/sqrt(d)."""

import math

import torch

from .hf_patch import CccZayaAttention, patch, unpatch


def zaya_incompatibility(spec):
    """None when ZayaAttention computes this spec's layer, else the reason it does not."""
    stages = [stage.kind for stage in spec.qk_conv]
    reasons = [
        (stages != ["depthwise", "per_head"], "convolution stages are not [depthwise, per_head]"),
        (not spec.qk_mean, "no q-k mean"),
        (2 * spec.value_shift != spec.kv_heads, "value_shift is not half of kv_heads"),
        (spec.qk_norm != "l2" or spec.key_temperature != "learned",
         "not qk_norm = l2 with key_temperature = learned"),
        (spec.rope is None or spec.rope.style != "neox", "no NeoX RoPE"),
        (spec.mask.kind != "causal", "mask is not causal"),
        (not math.isclose(spec.softmax_scale, spec.head_dim**-0.5, rel_tol=1e-12),
         "softmax_scale is not 1/sqrt(head_dim)"),
    ]
    found = [reason for broken, reason in reasons if broken]
    return "; ".join(found) if found else None


def zaya_config(spec, max_positions=131072):
    """A one-layer ZayaConfig whose attention is `spec`."""
    from transformers import ZayaConfig

    rope = {"rope_type": "default", "rope_theta": float(spec.rope.theta),
            "partial_rotary_factor": float(spec.rope.fraction)}
    return ZayaConfig(
        hidden_size=spec.model_dim,
        num_attention_heads=spec.query_heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.head_dim,
        num_hidden_layers=1,
        vocab_size=128,
        num_experts=2,
        attention_bias=spec.bias,
        cca_time0=spec.qk_conv[0].width,
        cca_time1=spec.qk_conv[1].width,
        max_position_embeddings=max_positions,
        rope_parameters={"hybrid": rope, "hybrid_sliding": dict(rope)},
    )


class ZayaLayer:
    """ZayaAttention with its rotary tables; `forward(x)` runs the layer on x [B, S, E] at
    positions 0..S-1 (causal, no cache)."""

    def __init__(self, spec, state_dict, dtype, device="cuda", attn_implementation="sdpa"):
        problem = zaya_incompatibility(spec)
        if problem:
            raise ValueError(f"`{spec.name}` is not a ZayaAttention layer: {problem}")
        from transformers.models.zaya.modeling_zaya import ZayaAttention, ZayaRotaryEmbedding

        self.config = zaya_config(spec)
        self.config._attn_implementation = attn_implementation
        self.module = ZayaAttention(self.config, layer_idx=0).to(device=device, dtype=dtype).eval()
        self.module.load_state_dict({name: t.to(device=device, dtype=dtype)
                                     for name, t in state_dict.items()}, strict=True)
        self.rotary = ZayaRotaryEmbedding(self.config).to(device)
        self.layer_type = self.config.layer_types[0]

    def position_embeddings(self, x):
        batch, seq_len, _ = x.shape
        positions = torch.arange(seq_len, device=x.device)[None].expand(batch, -1)
        return self.rotary(x, positions, layer_type=self.layer_type)

    @torch.no_grad()
    def forward(self, x, module=None, position_embeddings=None):
        return self.output(x, module, position_embeddings)

    def output(self, x, module=None, position_embeddings=None):
        """The layer's output, differentiable (autograd records it when x or a weight requires
        grad)."""
        # `is None`, not `or`: truth-testing a torch.compile wrapper asks the module for len().
        if position_embeddings is None:
            position_embeddings = self.position_embeddings(x)
        module = self.module if module is None else module
        return module(x, attention_mask=None, position_embeddings=position_embeddings)[0]

    def gradients(self, x, dout):
        """Autograd through the module in its own dtype: {"dx": ..., name: dL/dweight} for
        L = sum(out * dout), under the state dict's (Hugging Face's) names."""
        params = dict(self.module.named_parameters())
        for weight in params.values():
            weight.requires_grad_(True)
        x_leaf = x.detach().to(next(iter(params.values())).dtype).requires_grad_()
        out = self.output(x_leaf)
        grads = torch.autograd.grad(out, [x_leaf] + list(params.values()), dout.to(out.dtype))
        return {"dx": grads[0], **dict(zip(params, grads[1:]))}


__all__ = ["CccZayaAttention", "ZayaLayer", "patch", "unpatch", "zaya_config", "zaya_incompatibility"]
