"""Checks and times the decode attention over a paged KV cache (ccc::ir::kernel::build_decode:
`decode_attention` then `decode_merge`) on the GPU, against PyTorch.

Usage: python3 bench/decode_attention.py --ptx-dir DIR [--layers REGEX] [--check-lens 1,17,0,1000,4097]
       [--batches 1,8,64,256] [--contexts 1024,4096,16384,32768] [--max-gib 20] [--out FILE]

DIR holds `<kernel>.ptx` and `decode.json` (written by `CCC_HOPPER_PTX_OUT=DIR cargo test
--release --test ir_kernel_decode every_example`; `bash scripts/gpu-prepare.sh` writes
gpu-carry/decode-ptx so): per kernel its layer, stage, parameters in ABI order, threads,
dynamic shared memory, page size and keys per partition.

Correctness, per layer: one batch of sequences of the `--check-lens` lengths (0: a padded slot,
whose o must be 0), their pages spread over one pool in random order (block-table entries past a
sequence's pages are −1: never read);
o (bf16) against float32 attention of the same bf16 q, k and v over each sequence's keys (the new
token at position len − 1 sees every key, or the last `window`), relative L2 ≤ 1e-2 per
sequence; the partial buffers and o are NaN-poisoned first.
Timing, per layer, batch and context (every sequence at that context): the two kernels
together, CUDA events around 10 calls in a row, median of 20, beside SDPA's decode on a dense cache of the same
contents (one query token, `enable_gqa`; each backend that takes it: FlashAttention, cuDNN,
memory-efficient). Reported with the KV bytes read (B · ctx · Hk · d · 2 tensors · 2 bytes, or
the window's keys) over the time, and that as a share of the GPU's HBM bandwidth (H100 SXM
3.35 TB/s, H200 4.8 TB/s, from the device name; none for PCIe cards). Points whose KV fits in
the L2 are marked (repeated calls read it from there); points whose caches (ours and the
peer's dense copy) would pass `--max-gib` are skipped with a message. A backend that does not
take the shape (the memory-efficient one has no `enable_gqa`) is reported with its error.
"""

import argparse
import math
import re

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from kernel_bench import driver, finish, launch, load_kernels, median_ms

PEAK_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}


class Layer:
    """One example's decode kernels and geometry."""

    def __init__(self, kernels):
        self.kernels = {spec["stage"]: (spec, function) for spec, _, function in kernels}
        self.spec = self.kernels["decode_attention"][0]
        s = self.spec
        self.page, self.partition = s["page_size"], s["partition_keys"]
        self.hq, self.hk, self.d = s["q_heads"], s["kv_heads"], s["head_dim"]
        self.dtype = {"bf16": torch.bfloat16, "f16": torch.float16}[s["elem"]]

    def buffers(self, lens, blocks, pages, device, poison):
        """The partial outputs and o for a batch of `lens` over a table `blocks` wide."""
        batch, parts = len(lens), math.ceil(blocks * self.page / self.partition)
        fill = float("nan") if poison else 0.0
        return {
            "o_part": torch.full((batch, parts, self.hq, self.d), fill, device=device),
            "lse_part": torch.full((batch, parts, self.hq), fill, device=device),
            "o": torch.full((batch, self.hq, self.d), fill, device=device, dtype=self.dtype),
        }

    def launcher(self, tensors, sizes):
        """A call of both kernels on `tensors`, its arguments built once (so that a timing holds
        the launches, not the building)."""
        batch = sizes["B"]
        parts = math.ceil(sizes["blocks"] * self.page / self.partition)
        grids = {"decode_attention": (parts, self.hk, batch), "decode_merge": (self.hq, batch, 1)}
        launches = []
        for stage in ("decode_attention", "decode_merge"):
            spec, function = self.kernels[stage]
            args = driver.Arguments(driver.u32(sizes[p]) if p in sizes else driver.u64(tensors[p].data_ptr())
                                    for p in spec["params"])
            launches.append((function, grids[stage], spec["threads"], spec["dynamic_shared_bytes"], args))

        def run():
            for function, grid, threads, shared, args in launches:
                launch(function, grid, threads, shared, args)
        return run


def paged_cache(layer, lens, device, seed):
    """k and v pools with every sequence's pages in random order, the block table (−1 past a
    sequence's pages), its width and the pool's pages."""
    page = layer.page
    counts = [math.ceil(n / page) for n in lens]
    blocks, pages = max(max(counts), 1), sum(counts) + 2
    order = torch.randperm(pages, generator=torch.Generator().manual_seed(seed))
    generator = torch.Generator(device=device).manual_seed(seed)
    table = torch.full((len(lens), blocks), -1, dtype=torch.int32)
    start = 0
    for b, count in enumerate(counts):
        table[b, :count] = order[start:start + count]
        start += count
    shape = (pages, page, layer.hk, layer.d)
    k_cache = torch.randn(shape, generator=generator, device=device, dtype=layer.dtype)
    v_cache = torch.randn(shape, generator=generator, device=device, dtype=layer.dtype)
    q = torch.randn(len(lens), layer.hq, layer.d, generator=generator, device=device, dtype=layer.dtype)
    return q, k_cache, v_cache, table.to(device), blocks, pages


def gathered(cache, table_row, n, page):
    """The first n rows of a sequence's pages [n, Hk, d]."""
    ids = table_row[: math.ceil(n / page)].long()
    return cache[ids].reshape(-1, cache.shape[2], cache.shape[3])[:n]


def reference(layer, q, k, v, window):
    """float32 o [Hq, d] of one token over keys k, v [n, Hk, d] (the last `window` if given)."""
    if window is not None:
        k, v = k[-window:], v[-window:]
    group = layer.hq // layer.hk
    kf, vf = (t.float().repeat_interleave(group, 1).transpose(0, 1) for t in (k, v))  # [Hq, n, d]
    scores = (kf @ q.float()[:, :, None])[:, :, 0] * layer.spec["softmax_scale"]  # [Hq, n]
    return (torch.softmax(scores, dim=-1)[:, None, :] @ vf)[:, 0, :]


def check(layer, lens, device):
    q, k_cache, v_cache, table, blocks, pages = paged_cache(layer, lens, device, 0)
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_table": table,
               "seq_lens": torch.tensor(lens, dtype=torch.int32, device=device)}
    tensors.update(layer.buffers(lens, blocks, pages, device, poison=True))
    layer.launcher(tensors, {"B": len(lens), "S": 1, "pages": pages, "blocks": blocks})()
    torch.cuda.synchronize()
    errors = []
    for b, n in enumerate(lens):
        got = tensors["o"][b].float()
        if n == 0:  # a padded slot: o = 0
            errors.append(got.abs().max().item() if torch.isfinite(got).all() else float("inf"))
            continue
        want = reference(layer, q[b], gathered(k_cache, table[b], n, layer.page),
                         gathered(v_cache, table[b], n, layer.page), layer.spec["window"])
        error = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        errors.append(error if torch.isfinite(got).all() else float("inf"))
    return errors


def timed_ms(fn, inner=10):
    """Milliseconds per call of `fn`, from the median of CUDA-event timings of `inner` calls in a
    row (a single short launch would be timed with its host overhead)."""
    return median_ms(lambda: [fn() for _ in range(inner)]) / inner


def time_point(layer, batch, context, device):
    lens = [context] * batch
    q, k_cache, v_cache, table, blocks, pages = paged_cache(layer, lens, device, 1)
    tensors = {"q": q, "k_cache": k_cache, "v_cache": v_cache, "block_table": table,
               "seq_lens": torch.tensor(lens, dtype=torch.int32, device=device)}
    tensors.update(layer.buffers(lens, blocks, pages, device, poison=False))
    sizes = {"B": batch, "S": 1, "pages": pages, "blocks": blocks}
    row = {"batch": batch, "context": context, "ccc_ms": timed_ms(layer.launcher(tensors, sizes))}
    # The peer's dense cache [B, Hk, keys, d] of the same contents: the keys the token sees.
    window = layer.spec["window"]
    keys = min(context, window) if window is not None else context
    dense = [torch.empty(batch, layer.hk, keys, layer.d, device=device, dtype=layer.dtype) for _ in range(2)]
    for cache, out in zip((k_cache, v_cache), dense):
        for b in range(batch):
            out[b] = gathered(cache, table[b], context, layer.page)[context - keys:].transpose(0, 1)
    query = q[:, :, None, :]
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                def call():
                    return F.scaled_dot_product_attention(query, *dense, scale=layer.spec["softmax_scale"], enable_gqa=True)
                call()
                row[name + "_ms"] = timed_ms(call)
        except RuntimeError as error:
            row[name + "_ms"] = None
            row[name + "_error"] = str(error).splitlines()[0]
    row["kv_bytes"] = batch * keys * layer.hk * layer.d * 2 * layer.dtype.itemsize
    return row


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--ptx-dir", required=True)
    parser.add_argument("--layers", default=".")
    parser.add_argument("--check-lens", default="1,17,0,1000,4097,16,33")
    parser.add_argument("--batches", default="1,8,64,256")
    parser.add_argument("--contexts", default="1024,4096,16384,32768")
    parser.add_argument("--max-gib", type=float, default=20.0)
    parser.add_argument("--out")
    args = parser.parse_args()
    loaded = load_kernels(args.ptx_dir, "decode.json", "decode_(attention|merge)$")
    by_layer = {}
    for spec, module, function in loaded.values():
        if re.search(args.layers, spec["layer"]):
            by_layer.setdefault(spec["layer"], []).append((spec, module, function))
    device = "cuda"
    name = torch.cuda.get_device_name()
    # SXM parts only: a PCIe card's HBM is slower, and its peak is not assumed.
    peak = None if "PCIe" in name else next((v for k, v in PEAK_BYTES_PER_S.items() if k in name), None)
    print(f"{name}: HBM peak {peak / 1e12 if peak else float('nan'):.2f} TB/s", flush=True)
    report, all_ok = [], True
    for layer_name, kernels in sorted(by_layer.items()):
        layer = Layer(kernels)
        lens = [int(n) for n in args.check_lens.split(",")]
        errors = check(layer, lens, device)
        ok = all(e <= 1e-2 for e in errors)
        all_ok &= ok
        report.append({"layer": layer_name, "lens": lens, "rel_l2": errors, "ok": ok})
        print(f"{layer_name} check lens {lens}: rel L2 " + ", ".join(f"{e:.1e}" for e in errors)
              + ("" if ok else "  FAIL"), flush=True)
        for batch in (int(b) for b in args.batches.split(",")):
            for context in (int(c) for c in args.contexts.split(",")):
                # Ours (paged k and v) and the peer's dense copy.
                cache_bytes = batch * context * layer.hk * layer.d * 2 * layer.dtype.itemsize
                if 2 * cache_bytes > args.max_gib * 2**30:
                    print(f"{layer_name} B={batch} ctx={context}: skipped, {2 * cache_bytes / 2**30:.1f} GiB of caches "
                          f"> --max-gib {args.max_gib}", flush=True)
                    continue
                row = time_point(layer, batch, context, device)
                row["layer"] = layer_name
                seconds = row["ccc_ms"] / 1e3
                row["ccc_tb_s"] = row["kv_bytes"] / seconds / 1e12
                row["ccc_of_peak"] = row["kv_bytes"] / seconds / peak if peak else None
                report.append(row)
                peers = ", ".join(f"{n} {row[n + '_ms']:.3f} ms" if row.get(n + "_ms") else f"{n} n/a ({row.get(n + '_error', '')})"
                                  for n in ("flash", "cudnn", "efficient"))
                share = f" ({100 * row['ccc_of_peak']:.0f} % of peak)" if peak else ""
                # KV that fits in the 50 MB L2 twice over is read from it on repeated calls.
                cached = " [KV fits in L2]" if row["kv_bytes"] < 100e6 else ""
                print(f"{layer_name} B={batch} ctx={context}: ccc {row['ccc_ms']:.4f} ms, "
                      f"{row['ccc_tb_s']:.2f} TB/s{share}{cached}; {peers}", flush=True)
                torch.cuda.empty_cache()
    finish(report, args.out, all_ok)


if __name__ == "__main__":
    main()
