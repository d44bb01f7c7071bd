"""Writes tests/fixtures/mla_hf/*.json: Hugging Face transformers' DeepseekV3Attention in float64 on
the CPU, for small MLA layers, so that tests/reference_mla.rs can hold ccc's MLA reference to it
without torch or transformers. Each fixture holds the layer's `.attn` source, its weights under
DeepseekV3Attention's state-dict names, an input x [B, S, E] and HF's output.

The rotary tables are computed here in float64 and passed to the module (HF's own rotary module
computes them in float32), and attention runs through SDPA in float64 with HF's causal default,
so both sides agree to float64 rounding.

Usage (needs torch and transformers with `models.deepseek_v3`; not run by CI):
    python3 scripts/hf-mla-fixture.py [OUT_DIR]
"""

import json
import os
import sys

import torch
import transformers
from transformers import DeepseekV3Config
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

# (name, q_rank or None, attention_bias, rope_interleave, YaRN's rope_parameters or None)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32.0,
        "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 0.707}
VARIANTS = [
    ("q_latent_interleaved_bias", 8, True, True, None),
    ("direct_queries_neox", None, False, False, None),
    ("yarn", 8, False, True, YARN),
]
E, HEADS, KV_RANK, ROPE, NOPE, V_DIM, THETA = 16, 2, 12, 4, 8, 6, 100.0
BATCH, SEQ = 2, 5


def attn_source(name, q_rank, bias, interleaved, yarn):
    scaling = ""
    if yarn:
        scaling = (f", yarn(factor = {yarn['factor']:g}, original_positions = {yarn['original_max_position_embeddings']}, "
                   f"beta_fast = {yarn['beta_fast']:g}, beta_slow = {yarn['beta_slow']:g}, mscale = {yarn['mscale']:g}, "
                   f"mscale_all_dim = {yarn['mscale_all_dim']:g})")
    return (f"attention {name} {{\n"
            f"    model_dim = {E}\n"
            f"    query_heads = {HEADS}\n"
            f"    mla {{ kv_rank = {KV_RANK}, q_rank = {q_rank if q_rank else 'none'}, rope_dim = {ROPE}, "
            f"nope_dim = {NOPE}, v_dim = {V_DIM} }}\n"
            f"    rope {{ theta = {THETA:g}, style = {'interleaved' if interleaved else 'neox'}{scaling} }}\n"
            f"    bias = {'true' if bias else 'false'}\n"
            f"}}\n")


def rotary_tables(config, seq):
    """cos, sin [1, S, ROPE] as DeepseekV3RotaryEmbedding lays them out (cat(freqs, freqs)), the
    angles in float64: plain RoPE's frequencies computed here, YaRN's (and its cos/sin factor) by
    transformers' own function, whose float32 frequencies the tolerance allows for."""
    if config.rope_parameters.get("rope_type", "default") == "yarn":
        inv_freq, amplitude = ROPE_INIT_FUNCTIONS["yarn"](config, None)
        inv_freq = inv_freq.to(torch.float64)
    else:
        inv_freq, amplitude = THETA ** (-torch.arange(0, ROPE, 2, dtype=torch.float64) / ROPE), 1.0
    freqs = torch.arange(seq, dtype=torch.float64)[:, None] * inv_freq[None]
    emb = torch.cat((freqs, freqs), dim=-1)[None]
    return emb.cos() * amplitude, emb.sin() * amplitude


def tensor_json(tensor):
    return {"shape": list(tensor.shape), "data": [float(v) for v in tensor.flatten().tolist()]}


def fixture(name, q_rank, bias, interleaved, yarn, seed):
    rope = dict(yarn, rope_theta=THETA) if yarn else {"rope_type": "default", "rope_theta": THETA}
    config = DeepseekV3Config(
        hidden_size=E, num_attention_heads=HEADS, num_key_value_heads=HEADS, q_lora_rank=q_rank,
        kv_lora_rank=KV_RANK, qk_rope_head_dim=ROPE, qk_nope_head_dim=NOPE, v_head_dim=V_DIM,
        attention_bias=bias, rope_interleave=interleaved, num_hidden_layers=1, vocab_size=16,
        rope_parameters=rope, max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    module = DeepseekV3Attention(config, layer_idx=0).to(torch.float64).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=torch.float64)
                            / parameter.shape[-1] ** 0.5)
        x = torch.randn(BATCH, SEQ, E, generator=generator, dtype=torch.float64)
        out = module(x, position_embeddings=rotary_tables(config, SEQ), attention_mask=None)[0]
    return {
        "source": attn_source(name, q_rank, bias, interleaved, yarn),
        "made_by": f"scripts/hf-mla-fixture.py; transformers {transformers.__version__}, torch {torch.__version__}",
        "weights": {key: tensor_json(value) for key, value in module.state_dict().items()},
        "x": tensor_json(x),
        "out": tensor_json(out),
    }


def main():
    out_dir = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests",
                                                                   "fixtures", "mla_hf")
    os.makedirs(out_dir, exist_ok=True)
    for seed, (name, q_rank, bias, interleaved, yarn) in enumerate(VARIANTS):
        path = os.path.join(out_dir, f"{name}.json")
        with open(path, "w") as handle:
            json.dump(fixture(name, q_rank, bias, interleaved, yarn, seed), handle)
            handle.write("\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
