"""GPU test of `ccc.hf.patch`: a randomly initialised two-layer ZAYA model at ZAYA1's attention
widths (hidden 2048, 8 query and 2 kv heads of 128, convolutions of widths 2 and 2, NeoX RoPE on
half of each head), layer 0 `hybrid` (causal, θ 5e6) and layer 1 `hybrid_sliding` (a window of
--sliding-window keys, θ 1e4, so that both kinds of library run), the rest made small (one expert
of width 1024, so that no token's routing flips between two experts on a rounding difference; a
1024-token vocabulary), in bfloat16 on cuda, attention weights at O(1) scales. A deep copy is
patched with the libraries in LIBS, and on a B 2 × S --prompt batch (longer than the window):

1. logits of the patched model against the unpatched one's: relative L2 at most 2e-2. Both run
   the layer in bf16 with different rounding points (HF rounds q, k and v after the convolutions,
   the norm and RoPE, and P before P·V; ccc's kernels keep f32 between some of them). Measured on
   the CPU with the bf16-rounded reference (ccc.reference, storage_dtype="bf16") in place of the
   kernels, which python/validate.py holds the kernels to within 7e-3 per layer: 0.9e-2 to
   1.0e-2 over four seeds, while a wrong mask, position or page gives 1e-1 and more;
2. logits against the same model run in float32: the patched model's error at most 1.5 times the
   unpatched bf16 model's + 1e-3 (measured: 0.66e-2 to 0.75e-2 against 0.86e-2 to 0.98e-2);
3. generate (64 greedy tokens, the patched model through ccc's prefill and decode entry points):
   the logits of every step against the unpatched model's teacher-forced on the same tokens,
   relative L2 at most 2e-2, as in 1;
4. the 64 tokens against the unpatched model's generate: identical, or identical up to a step
   where the unpatched model's logits of the two choices are within TIE (0.0625, 4 bf16 ulps of
   its top logits, which lie in [2, 4)): bf16 logits tie often, and a rounding difference of the
   attention flips such a choice (on the CPU as above, all four seeds' 128 tokens first differed
   at a margin of 0 or 1 ulp; an off-by-one decode length gave 0.39);
5. torch.compile(fullgraph=True) of the patched model's forward (no cache) against eager:
   relative L2 at most 1e-3 (the same kernels; only the code around them is compiled).

Compiles nothing. On the CPU machine, for the config this script builds (emit adds the decode
entry point that generate needs):

    python3 tests/python/gpu_hf_patch.py --write-config gpu-carry/hf/config.json
    target/release/ccc spec --from-hf gpu-carry/hf/config.json -o gpu-carry/hf/model.attn
    sed -i 's/^}$/    emit = [forward, decode]\\n}/' gpu-carry/hf/model.attn
    target/release/ccc compile gpu-carry/hf/model.attn -o gpu-carry/hf/libs

then on the GPU machine (needs torch, transformers with the ZAYA model, cuda-bindings):

    python3 tests/python/gpu_hf_patch.py gpu-carry/hf/libs

Prints one line per check and a summary; exits 1 when any check fails."""

import argparse
import copy
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", "python"))

LOGITS_TOLERANCE = 2e-2
TIE = 0.0625
COMPILE_TOLERANCE = 1e-3
NEW_TOKENS = 64


def config_fields(sliding_window):
    """The model's config.json fields: ZAYA1's attention, two layers, a small MoE and vocabulary."""
    return {
        "model_type": "zaya",
        "dtype": "bfloat16",
        "vocab_size": 1024,
        "hidden_size": 2048,
        "num_hidden_layers": 2,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "head_dim": 128,
        "cca_time0": 2,
        "cca_time1": 2,
        "attention_bias": False,
        "layer_types": ["hybrid", "hybrid_sliding"],
        "sliding_window": sliding_window,
        "rope_parameters": {
            "hybrid": {"rope_type": "default", "rope_theta": 5_000_000.0, "partial_rotary_factor": 0.5},
            "hybrid_sliding": {"rope_type": "default", "rope_theta": 10_000.0, "partial_rotary_factor": 0.5},
        },
        "num_experts": 1,
        "moe_intermediate_size": 1024,
        "router_hidden_size": 256,
        "max_position_embeddings": 4096,
        # No end of sequence: every generate call makes all its tokens.
        "eos_token_id": None,
    }


def check(condition, message):
    print(("ok   " if condition else "FAIL ") + message, flush=True)
    return bool(condition)


def build_model(fields, seed, device):
    """The model in bf16 on `device`: transformers' initialisation, then the attention weights at the
    scales ccc's random_state_dict uses (linear weights ~ N(0, 1/in), temperatures in [0.5, 1.5];
    transformers' zero temperature would make every key zero)."""
    import torch
    from transformers import ZayaConfig, ZayaForCausalLM

    torch.manual_seed(seed)
    config = ZayaConfig(**{k: v for k, v in fields.items() if k not in ("model_type", "dtype")})
    model = ZayaForCausalLM(config).to(device=device, dtype=torch.bfloat16).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            for name, parameter in layer.self_attn.named_parameters():
                shape = parameter.shape
                if name == "qk_norm.temp":
                    value = torch.rand(shape, generator=generator) + 0.5
                elif parameter.dim() == 1:
                    value = 0.1 * torch.randn(shape, generator=generator)
                else:
                    fan_in = shape[1] * shape[2] if parameter.dim() == 3 else shape[1]
                    value = torch.randn(shape, generator=generator) / fan_in**0.5
                parameter.copy_(value)
    return model


def run_checks(reference, patched, ids):
    """Checks 1 to 5 of the module's docstring on the unpatched `reference` and the `patched`
    model for the prompt batch `ids`; a list of booleans."""
    import torch

    from ccc.reference import relative_l2

    prompt = ids.shape[1]
    results = []
    with torch.no_grad():
        expected = reference(ids, use_cache=False).logits
        logits = patched(ids, use_cache=False).logits
        exact = copy.deepcopy(reference).float()(ids, use_cache=False).logits
    error = relative_l2(logits, expected)
    results.append(check(error <= LOGITS_TOLERANCE,
                         f"logits: relative L2 {error:.2e} to the unpatched model's (tolerance {LOGITS_TOLERANCE:.0e})"))
    ours, theirs = relative_l2(logits, exact), relative_l2(expected, exact)
    results.append(check(ours <= 1.5 * theirs + 1e-3,
                         f"logits: relative L2 {ours:.2e} to the model in float32, the unpatched bf16 model's "
                         f"{theirs:.2e} (tolerance 1.5x + 1e-3)"))

    run = patched.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
                           return_dict_in_generate=True)
    steps = torch.stack(run.logits, dim=1)
    with torch.no_grad():
        # The unpatched model teacher-forced on the patched model's tokens, without a cache.
        forced = reference(run.sequences[:, :-1], use_cache=False).logits[:, prompt - 1:].float()
    error = relative_l2(steps, forced)
    results.append(check(error <= LOGITS_TOLERANCE,
                         f"generate: the logits of {NEW_TOKENS} greedy steps (a prefill and decode steps through "
                         f"ccc's pages) at relative L2 {error:.2e} to the unpatched model's on the same tokens "
                         f"(tolerance {LOGITS_TOLERANCE:.0e})"))

    wanted = reference.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    new, wanted_new = run.sequences[:, prompt:], wanted[:, prompt:]
    if torch.equal(new, wanted_new):
        results.append(check(True, f"generate: {NEW_TOKENS} greedy tokens x {ids.shape[0]} sequences identical"))
    else:
        row, step = (new != wanted_new).nonzero()[0].tolist()
        ours_token, their_token = new[row, step].item(), wanted_new[row, step].item()
        margin = (forced[row, step, their_token] - forced[row, step, ours_token]).item()
        results.append(check(margin <= TIE, f"generate: sequence {row} first differs at new token {step} "
                                            f"({ours_token} for {their_token}), where the unpatched model's logits "
                                            f"of the two differ by {margin:.3g} (a near tie within {TIE})"))

    compiled = torch.compile(patched.forward, fullgraph=True)
    with torch.no_grad():
        eager = patched(ids, use_cache=False).logits
        traced = compiled(ids, use_cache=False).logits
    error = relative_l2(traced, eager)
    results.append(check(error <= COMPILE_TOLERANCE,
                         f"torch.compile(fullgraph=True): relative L2 {error:.2e} to eager "
                         f"(tolerance {COMPILE_TOLERANCE:.0e})"))
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("libraries", nargs="?", help="the directory `ccc compile` wrote (LIBS/NAME/manifest.json)")
    parser.add_argument("--write-config", metavar="FILE", help="write the model's config.json to FILE and exit")
    parser.add_argument("--sliding-window", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=300, help="prompt length (longer than the window)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    fields = config_fields(args.sliding_window)
    if args.write_config:
        os.makedirs(os.path.dirname(os.path.abspath(args.write_config)), exist_ok=True)
        with open(args.write_config, "w") as file:
            json.dump(fields, file, indent=2)
        print(f"wrote {args.write_config}")
        return 0
    if not args.libraries:
        parser.error("give the library directory (or --write-config FILE)")

    import torch

    import ccc.hf

    reference = build_model(fields, args.seed, "cuda")
    patched = ccc.hf.patch(copy.deepcopy(reference), args.libraries)
    names = [os.path.basename(layer.self_attn.library.directory) for layer in patched.model.layers]
    print(f"patched layers: {', '.join(names)}; {torch.cuda.get_device_name()}", flush=True)
    # Above the pad, bos and eos ids, so that generate's attention mask is all ones.
    ids = torch.randint(3, fields["vocab_size"], (2, args.prompt),
                        generator=torch.Generator().manual_seed(args.seed + 1)).cuda()
    results = run_checks(reference, patched, ids)
    passed = sum(results)
    print(f"gpu_hf_patch: {passed} passed, {len(results) - passed} failed", flush=True)
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
