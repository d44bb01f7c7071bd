"""The decode entry point of libraries compiled with `emit = [forward, decode]`, on the GPU.

Check (every library given): sequences of different lengths are run through the forward once,
whole; their first L tokens (L = 0 included) are then prefilled in two packed, chunked prefills
(`Layer.prefill`: the first part of every prompt, then the rest continuing from the pages of a
shuffled pool and each sequence's state; each chunk's out must give the forward's rows), and N
decode steps (`Layer.decode`) must give the
whole-sequence forward's out for tokens L .. L+N-1 (relative L2 error under 2e-2, bf16/f16
tolerance) and append its k and v rows; a decode step captured in a CUDA graph must give bitwise
the output of the same step launched directly.

Timing (`--time`, the first library): the whole decode step (CUDA events around the replay of a
CUDA graph of `BoundCall.run`, as a server launches it) at B x context, with the decode attention's time alone and the bandwidth
its KV reads reach (bytes of the pages it reads / time), beside the decode step of an MHA layer
of the same width in PyTorch (q, k, v projections, the new k and v written into a dense cache,
SDPA over it, the output projection; graphed too), where its cache fits in half the GPU's memory,
and beside Hugging Face's ZAYA1 decode step (`ZayaAttention` with its `DynamicCache`, launched
eagerly: its cache grows by concatenation, which no CUDA graph captures; our step launched
directly is timed too). Then packed prefills of 32k tokens beside the forwards of the same
sequences.
"""

import argparse
import itertools
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "python"))
import ccc  # noqa: E402

TOLERANCE = 2e-2


def rel_l2(got, want):
    got, want = got.float(), want.float()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def page_size(layer):
    """Tokens per KV page of the library's decode entry point."""
    return next(b for b in layer.manifest.entry_point("decode").buffers if b.name == "k_cache").shape[1].eval({})


def shuffled_pages(lens, page, generator):
    """A block table [B, blocks] over a pool with each sequence's pages in random order and spare
    pages between them; entries past a sequence's pages are -1 (never read)."""
    needed = [max(1, math.ceil(length / page)) for length in lens]
    blocks = max(needed)
    pages = sum(needed) + 8
    order = torch.randperm(pages, generator=generator).tolist()
    table = torch.full((len(lens), blocks), -1, dtype=torch.int32)
    for b, count in enumerate(needed):
        table[b, :count] = torch.tensor(order[:count], dtype=torch.int32)
        order = order[count:]
    return table, pages


def check(directory, lens, steps, seed):
    layer = ccc.load(directory)
    spec = layer.spec
    if spec.mask.kind == "none":
        # The forward is bidirectional, while a prefill's chunk and a decode step see the tokens
        # so far: no forward to compare with here
        # (tests/ir_kernel_decode_step.rs checks such specs against the reference).
        return {"library": directory, "ok": True, "skipped": "mask none: no forward gives a decode step's output"}
    device = torch.device("cuda")
    weights = layer.random_state_dict(seed)
    dtype = ccc.library.TORCH_DTYPES[spec.dtype]
    generator = torch.Generator().manual_seed(seed)
    page = page_size(layer)
    batch, e = len(lens), spec.model_dim
    total = [length + steps for length in lens]
    table, pages = shuffled_pages(total, page, generator)
    cache = layer.decode_cache(batch, pages)
    xs, forwards = [], []
    for length in total:
        x = torch.randn(1, length, e, generator=generator).to(device=device, dtype=dtype)
        xs.append(x)
        forwards.append(layer.forward_with_intermediates(x, weights, poison=False))
    # The prompts through `Layer.prefill` in two packed, chunked prefills (the first part of
    # each, then the rest continuing from the cache), each chunk's out against the forward's rows.
    table_d = table.to(device)
    done = [0] * batch
    for chunk in ([length // 2 + length % 3 for length in lens], [length - length // 2 - length % 3 for length in lens]):
        packed = torch.cat([xs[b][0, done[b]:done[b] + n] for b, n in enumerate(chunk)])
        cu = torch.tensor([0] + list(itertools.accumulate(chunk)), dtype=torch.int32, device=device)
        seq_lens = torch.tensor([done[b] + n for b, n in enumerate(chunk)], dtype=torch.int32, device=device)
        out = layer.prefill(packed, weights, cache, cu, table_d, seq_lens, check_indices=True)
        for b, n in enumerate(chunk):
            if n:
                error = rel_l2(out[cu[b]:cu[b + 1]], forwards[b]["out"][0, done[b]:done[b] + n])
                if error > TOLERANCE:
                    raise AssertionError(f"prefill out of sequence {b} (tokens {done[b]}..{done[b] + n}): relative L2 {error:.2e}")
            done[b] += n
    worst = 0.0
    for step in range(steps):
        x = torch.stack([xs[b][0, lens[b] + step] for b in range(batch)]).unsqueeze(1)
        seq_lens = torch.tensor([length + step + 1 for length in lens], dtype=torch.int32, device=device)
        out = layer.decode(x, weights, cache, table_d, seq_lens)
        for b in range(batch):
            position = lens[b] + step
            error = rel_l2(out[b, 0], forwards[b]["out"][0, position])
            p, row = table[b, position // page].item(), position % page
            error_k = rel_l2(cache["k_cache"][p, row], forwards[b]["k"][0, position])
            error_v = rel_l2(cache["v_cache"][p, row], forwards[b]["v"][0, position])
            worst = max(worst, error, error_k, error_v)
    graph_equal = captured_step_is_bitwise_equal(layer, weights, cache, table_d, x, seq_lens)
    return {"library": directory, "lens": lens, "steps": steps, "page_size": page, "worst_rel_l2": worst,
            "graph_bitwise_equal": graph_equal, "ok": worst <= TOLERANCE and graph_equal}


def check_against_hf(directory, prompts, steps, seed):
    """ZAYA1-form layers only: sequences of `prompts` tokens prefilled together (one packed call)
    and then `steps` decode steps through our library, against Hugging Face's `ZayaAttention` in
    float32 with its own `DynamicCache` fed the same (16-bit) weights and tokens (its prefill of
    each prompt, then its decode steps): the relative L2 error of every generated position's out,
    worst over sequences and steps (HF in the 16-bit dtype itself rounds every op: 2.6e-2 from
    ours on an H100, against our 3e-3 from the float32 forward)."""
    from ccc.hf import ZayaLayer, zaya_incompatibility
    from transformers.cache_utils import DynamicCache

    layer = ccc.load(directory)
    spec = layer.spec
    problem = zaya_incompatibility(spec)
    if problem:
        return {"library": directory, "ok": True, "skipped": f"not a ZayaAttention layer: {problem}"}
    device = torch.device("cuda")
    weights = layer.random_state_dict(seed)
    dtype = ccc.library.TORCH_DTYPES[spec.dtype]
    generator = torch.Generator().manual_seed(seed)
    hf = ZayaLayer(spec, weights, torch.float32)
    batch, e = len(prompts), spec.model_dim
    table, pages = shuffled_pages([p + steps for p in prompts], page_size(layer), generator)
    table = table.to(device)
    cache = layer.decode_cache(batch, pages)
    xs = [torch.randn(p + steps, e, generator=generator).to(device=device, dtype=dtype) for p in prompts]
    cu = torch.tensor([0] + list(itertools.accumulate(prompts)), dtype=torch.int32, device=device)
    lens = torch.tensor(prompts, dtype=torch.int32, device=device)
    layer.prefill(torch.cat([x[:p] for x, p in zip(xs, prompts)]), weights, cache, cu, table, lens, check_indices=True)
    hf_caches = []
    worst = 0.0
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # float32 with GQA: the math backend (cuDNN would re-plan at every new cache length).
    with torch.no_grad(), sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
        for x, p in zip(xs, prompts):
            hf_cache = DynamicCache(config=hf.config)
            prompt = x[None, :p].float()
            hf.module(prompt, attention_mask=None, past_key_values=hf_cache, position_embeddings=hf.position_embeddings(prompt))
            hf_caches.append(hf_cache)
        for step in range(steps):
            tokens = torch.stack([x[p + step] for x, p in zip(xs, prompts)]).unsqueeze(1)
            seq_lens = torch.tensor([p + step + 1 for p in prompts], dtype=torch.int32, device=device)
            out = layer.decode(tokens, weights, cache, table, seq_lens)
            for b, (hf_cache, p) in enumerate(zip(hf_caches, prompts)):
                token = tokens[b:b + 1].float()
                position = torch.full((1, 1), p + step, device=device)
                want = hf.module(token, attention_mask=None, past_key_values=hf_cache,
                                 position_embeddings=hf.rotary(token, position, layer_type=hf.layer_type))[0]
                worst = max(worst, rel_l2(out[b, 0], want[0, 0]))
    return {"library": directory, "against": "HF ZayaAttention + DynamicCache", "prompts": prompts, "steps": steps,
            "worst_rel_l2": worst, "ok": worst <= TOLERANCE}


def captured_step_is_bitwise_equal(layer, weights, cache, table, x, seq_lens):
    """A decode step captured in a CUDA graph and replayed gives bitwise the output of the same
    step launched directly, from the same state."""
    saved = {name: tensor.clone() for name, tensor in cache.items()}

    def restore():
        for name, tensor in cache.items():
            tensor.copy_(saved[name])

    call = layer.bind_decode(x, weights, cache, table, seq_lens, poison=False)
    call.run(check_each=False)
    restore()
    call.run(check_each=False)
    direct = call.tensors["out"].clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call.run(check_each=False)
    restore()
    call.tensors["out"].fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    restore()
    return bool(torch.equal(call.tensors["out"], direct))


def graphed(run):
    """`run` captured in a CUDA graph (after one launch outside it): its replay, which is how a
    server launches a decode step, without the host's per-kernel launch cost."""
    run()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            run()
    except Exception as error:  # timed directly instead, and said so
        print(f"not graphed ({type(error).__name__}: {error}): timing direct launches")
        torch.cuda.synchronize()
        return run
    return graph.replay


def cuda_time(run, repeats=20):
    run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def time_ccc(layer, weights, batch, context):
    spec = layer.spec
    device = torch.device("cuda")
    dtype = ccc.library.TORCH_DTYPES[spec.dtype]
    page = page_size(layer)
    generator = torch.Generator().manual_seed(0)
    table, pages = shuffled_pages([context] * batch, page, generator)
    cache = layer.decode_cache(batch, pages)
    for tensor in cache.values():
        tensor.normal_()
    x = torch.randn(batch, 1, spec.model_dim, device=device, dtype=dtype)
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    call = layer.bind_decode(x, weights, cache, table.to(device), seq_lens, poison=False)
    step_ms = cuda_time(graphed(lambda: call.run(check_each=False)))
    direct_ms = cuda_time(lambda: call.run(check_each=False))
    attention_ms = cuda_time(graphed(lambda: call.run_kernel("decode_attention", check_each=False)))
    kv_bytes = 2 * batch * context * spec.kv_heads * spec.head_dim * torch.finfo(dtype).bits // 8
    return step_ms, direct_ms, attention_ms, kv_bytes / (attention_ms * 1e-3) / 1e9


def time_hf(spec, weights, batch, context):
    """Hugging Face's ZAYA1 decode step (`ZayaAttention` with its own `DynamicCache` holding
    `context` tokens of random k, v and state, the new token at position `context`), launched
    eagerly as `generate` runs it: its KV cache grows by concatenation every step, which a CUDA
    graph cannot capture. None for layers not of ZAYA1's form, or where the cache and its copy
    would take more than half the GPU's memory."""
    from ccc.hf import ZayaLayer, zaya_incompatibility
    from transformers.cache_utils import DynamicCache

    if zaya_incompatibility(spec):
        return None
    device = torch.device("cuda")
    dtype = ccc.library.TORCH_DTYPES[spec.dtype]
    cache_bytes = 2 * batch * spec.kv_heads * (context + 32) * spec.head_dim * 2
    if 2 * cache_bytes > torch.cuda.get_device_properties(0).total_memory / 2:
        return None
    hf = ZayaLayer(spec, weights, dtype)
    cache = DynamicCache(config=hf.config)
    keys = torch.randn(batch, spec.kv_heads, context, spec.head_dim, device=device, dtype=dtype)
    cache.update(keys, torch.randn_like(keys), 0)
    cache.update_conv_state(torch.randn(batch, spec.packed_width, spec.conv_history, device=device, dtype=dtype), 0)
    cache.update_recurrent_state(torch.randn(batch, spec.value_shift * spec.head_dim, device=device, dtype=dtype), 0)
    x = torch.randn(batch, 1, spec.model_dim, device=device, dtype=dtype)
    positions = torch.full((batch, 1), context, device=device)
    embeddings = hf.rotary(x, positions, layer_type=hf.layer_type)
    # SDPA's cuDNN backend builds a new plan for every cache length (about 40 ms of host time a
    # step on an H100): the flash and memory-efficient backends, which decode at any length.
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.no_grad(), sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        ms = cuda_time(lambda: hf.module(x, attention_mask=None, past_key_values=cache, position_embeddings=embeddings), repeats=10)
    del cache, keys, hf
    torch.cuda.empty_cache()
    return ms


def time_prefill(layer, weights, lens):
    """A packed prefill of new sequences of `lens` tokens (one call, `Layer.prefill`'s kernels
    bound once) beside the forwards of the same sequences, one call each: milliseconds of both,
    and of each prefill kernel alone."""
    spec = layer.spec
    device = torch.device("cuda")
    dtype = ccc.library.TORCH_DTYPES[spec.dtype]
    generator = torch.Generator().manual_seed(1)
    table, pages = shuffled_pages(lens, page_size(layer), generator)
    cache = layer.decode_cache(len(lens), pages)
    x = torch.randn(sum(lens), spec.model_dim, device=device, dtype=dtype)
    cu = torch.tensor([0] + list(itertools.accumulate(lens)), dtype=torch.int32, device=device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    supplied = {"x": x, "cu_seqlens": cu, "block_table": table.to(device), "seq_lens": seq_lens, **cache, **weights}
    call = layer._bind("prefill", None, supplied, False)
    prefill_ms = cuda_time(lambda: call.run(check_each=False), repeats=10)
    kernels = {launch.symbol.removeprefix(layer.name + "_"): None for launch in call.plan.launches}
    for suffix in kernels:
        kernels[suffix] = cuda_time(lambda: call.run_kernel(suffix, check_each=False), repeats=10)
    forwards = [layer.bind(x[cu[b]:cu[b + 1]].unsqueeze(0), weights) for b in range(len(lens))]

    def run_forwards():
        for forward in forwards:
            forward.run(check_each=False)
    forward_ms = cuda_time(run_forwards, repeats=10)
    return prefill_ms, forward_ms, kernels


def time_mha(spec, batch, context):
    """The decode step of an MHA layer of the same width (E / d heads of d) in PyTorch: None when
    its dense cache would take more than half the GPU's memory."""
    device = torch.device("cuda")
    dtype = ccc.library.TORCH_DTYPES[spec.dtype]
    e, d = spec.model_dim, spec.head_dim
    heads = e // d
    cache_bytes = 2 * batch * heads * (context + 1) * d * 2
    if cache_bytes > torch.cuda.get_device_properties(0).total_memory / 2:
        return None
    k_cache = torch.randn(batch, heads, context + 1, d, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    w_qkv = torch.randn(3 * e, e, device=device, dtype=dtype) / e**0.5
    w_o = torch.randn(e, e, device=device, dtype=dtype) / e**0.5
    x = torch.randn(batch, 1, e, device=device, dtype=dtype)

    def step():
        q, k, v = (x @ w_qkv.t()).view(batch, 1, 3, heads, d).unbind(2)
        k_cache[:, :, context] = k[:, 0]
        v_cache[:, :, context] = v[:, 0]
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k_cache, v_cache)
        return o.transpose(1, 2).reshape(batch, 1, e) @ w_o.t()

    with torch.no_grad():
        ms = cuda_time(graphed(step))
    del k_cache, v_cache
    torch.cuda.empty_cache()
    return ms


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("libraries", nargs="+")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--lens", default="0,1,17,1000,4097")
    parser.add_argument("--time", action="store_true")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--contexts", default="1024,4096,16384,32768")
    parser.add_argument("--prefill-lens", default="8192,6144,4096,4096,3072,3072,2048,2048;4096,4096,4096,4096,4096,4096,4096,4096",
                        help="packed prefills timed with --time: sequence lengths, batches separated by ';'")
    parser.add_argument("--hf-steps", type=int, default=0,
                        help="also decode this many steps against Hugging Face's ZayaAttention (ZAYA1-form layers)")
    parser.add_argument("--out")
    args = parser.parse_args()
    print(f"device: {torch.cuda.get_device_name(0)}")
    report = {"device": torch.cuda.get_device_name(0), "checks": [], "times": []}
    lens = [int(v) for v in args.lens.split(",")]
    failed = False
    for directory in args.libraries:
        try:
            result = check(directory, lens, args.steps, seed=7)
        except Exception as error:  # report every library, then fail
            result = {"library": directory, "ok": False, "error": f"{type(error).__name__}: {error}"}
        failed |= not result["ok"]
        report["checks"].append(result)
        print(json.dumps(result))
        if args.hf_steps:
            try:
                result = check_against_hf(directory, [p for p in lens if p > 0] or [1], args.hf_steps, seed=9)
            except Exception as error:  # report every library, then fail
                result = {"library": directory, "against": "HF", "ok": False, "error": f"{type(error).__name__}: {error}"}
            failed |= not result["ok"]
            report["checks"].append(result)
            print(json.dumps(result))
    if args.time:
        layer = ccc.load(args.libraries[0])
        weights = layer.random_state_dict(3)
        print(f"{'B':>4} {'context':>8} {'ccc step ms':>12} {'(direct)':>9} {'attention ms':>13} {'KV GB/s':>9} "
              f"{'MHA step ms':>12} {'MHA/ccc':>8} {'HF step ms':>11} {'HF/ccc':>7}")
        for batch in [int(v) for v in args.batches.split(",")]:
            for context in [int(v) for v in args.contexts.split(",")]:
                step_ms, direct_ms, attention_ms, bandwidth = time_ccc(layer, weights, batch, context)
                mha_ms = time_mha(layer.spec, batch, context)
                try:
                    hf_ms = time_hf(layer.spec, weights, batch, context)
                except Exception as error:  # the peer's API moves between transformers releases
                    print(f"HF decode step not timed: {type(error).__name__}: {error}")
                    hf_ms = None
                ratio = lambda peer: f"{peer / step_ms:8.2f}" if peer else "       -"
                mha = f"{mha_ms:12.3f}" if mha_ms else "           -"
                hf = f"{hf_ms:11.3f}" if hf_ms else "          -"
                print(f"{batch:4d} {context:8d} {step_ms:12.3f} {direct_ms:9.3f} {attention_ms:13.3f} {bandwidth:9.0f} "
                      f"{mha} {ratio(mha_ms)} {hf} {ratio(hf_ms)}")
                report["times"].append({"batch": batch, "context": context, "step_ms": step_ms, "direct_step_ms": direct_ms,
                                        "attention_ms": attention_ms, "kv_gb_per_s": bandwidth, "mha_step_ms": mha_ms,
                                        "hf_step_ms": hf_ms})
                torch.cuda.empty_cache()
    if args.time:
        for lens in [[int(v) for v in group.split(",")] for group in args.prefill_lens.split(";")]:
            prefill_ms, forward_ms, kernels = time_prefill(layer, weights, lens)
            print(f"packed prefill of {lens} ({sum(lens)} tokens): {prefill_ms:.3f} ms; the forwards of the same "
                  f"sequences: {forward_ms:.3f} ms ({prefill_ms / forward_ms:.2f}x); kernels: "
                  + ", ".join(f"{name} {ms:.3f}" for name, ms in kernels.items()))
            report["prefill"] = report.get("prefill", []) + [
                {"lens": lens, "prefill_ms": prefill_ms, "forwards_ms": forward_ms, "kernels_ms": kernels}]
            torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as file:
            json.dump(report, file, indent=1)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
