"""Side-by-side benchmark of ccc libraries against the PyTorch peers, every figure from one process
and one run.

    python3 bench/bench.py gpu-carry/libs/zaya1 gpu-carry/libs/mha gpu-carry/libs/gqa --out $OUT

Systems (filter with --systems, shell-style patterns on the names):
  ccc:<lib>                our whole-layer forward (all kernels of the library)
  ccc-forward:<lib>        the same forward as `layer.forward(x, state_dict)`, as a user calls it
  ccc-core:<lib>           our attention kernel alone, on q, k, v a full call wrote
  mha-cudnn:E<E>           the MHA layer of the same width: qkv GEMM + cuDNN SDPA + o GEMM
  hf-zaya:<lib>            Hugging Face ZayaAttention (SDPA), for ZAYA1-form CCA libraries
  hf-zaya-compiled:<lib>   torch.compile of it
  cudnn-core:<lib>         cuDNN SDPA on the same attention core (kv heads repeated outside timing)
  fa2-core:<lib>           FlashAttention-2 SDPA on the same attention core (native GQA)
  flex-core:<lib>          FlexAttention (torch.compile) on the same sliding-window core

Timing: CUDA events around each call on torch's current stream, L2 flushed (256 MiB write) before
each timed call, warm-up calls first (torch.compile compiles there), median of the timed calls.
Peak memory: what the call allocates above what was resident before it (weights excluded; inputs,
outputs, intermediates and workspace included), from torch's allocator counters; for ccc-core it is
the attention kernel's own buffers (q, k, v, o, lse), which is all it touches.
With --train (libraries compiled with `emit = [forward, backward]`): a layer system runs its
forward and backward (dx and every weight's gradient; the peers through autograd) and a core
system its backward alone (the forward once outside the timing); FLOPs are 3× the forward's for
a layer and 2.5× for a core (FlashAttention's convention: five matrix products against two).
Outputs: OUT/bench.md (tables, ratios at 16k), OUT/bench.json, OUT/bench.png."""

import argparse
import dataclasses
import datetime
import fnmatch
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "python"))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import ccc  # noqa: E402
import peers  # noqa: E402
from ccc.flops import core_flops, layer_flops  # noqa: E402
from ccc.hf import ZayaLayer, zaya_incompatibility  # noqa: E402
from ccc.library import TORCH_DTYPES, random_state_dict  # noqa: E402
from ccc.spec import Mask, parse_spec  # noqa: E402

FULL_SEQ_LENS = (1024, 2048, 4096, 8192, 16384, 32768)
QUICK_SEQ_LENS = (1024, 4096, 16384)
SUMMARY_SEQ_LEN = 16384
FLUSH_BYTES = 256 << 20
MIB = 1 << 20


class System:
    """One benchmarked system: `setup(batch, seq_len)` allocates its inputs and returns
    (callable, bytes to report instead of the measured peak or None)."""

    def __init__(self, name, kind, library, spec, setup, train=False):
        self.name = name
        self.train = train
        self.kind = kind  # "layer" or "core"
        self.library = library  # library name this system is compared within, or None
        self.spec = spec  # the layer whose FLOPs it is credited with
        self.setup = setup

    def flops(self, batch, seq_len):
        if self.kind == "core":
            return core_flops(self.spec, batch, seq_len) * (2.5 if self.train else 1)
        return layer_flops(self.spec, batch, seq_len) * (3 if self.train else 1)


def ours(layer, weights, train):
    def random_x(batch, seq_len):
        return torch.randn(batch, seq_len, layer.spec.model_dim, device="cuda",
                           dtype=TORCH_DTYPES[layer.spec.dtype])

    def bound_call(batch, seq_len):
        call = layer.bind(random_x(batch, seq_len), weights)
        call.run(check_each=True)  # the first call checks each kernel, as the Rust runtime does
        if not torch.isfinite(call.tensors["out"]).all():
            raise RuntimeError("non-finite output")
        return call

    def setup_layer(batch, seq_len):
        call = bound_call(batch, seq_len)
        if train:
            backward = bound_backward(call)

            def step():
                call.run(check_each=False)
                backward.run(check_each=False)
            return step, None
        return (lambda: call.run(check_each=False)), None

    def bound_backward(call):
        """The backward call on what `call` saved, for a random dout, checked once."""
        saved = call.saved()
        x = call.tensors["x"]
        backward = layer.bind_backward(x, weights, saved, torch.randn_like(x))
        backward.run(check_each=True)
        if not torch.isfinite(backward.tensors["dx"]).all():
            raise RuntimeError("non-finite dx")
        return backward

    def setup_core_backward(batch, seq_len):
        backward = bound_backward(bound_call(batch, seq_len))
        # The attention backward's kernels in launch order: one pass (delta_clear, one_pass,
        # convert) or, deterministic, two (delta, dq, dkdv).
        prefix = f"{layer.name}_"
        kernels = [launch.symbol.removeprefix(prefix) for launch in backward.plan.launches
                   if launch.symbol.startswith(f"{prefix}attention_bwd_")]
        symbols = {f"{prefix}{kernel}" for kernel in kernels}
        # Like the core's forward: the attention backward's own buffers (q, k, v, o, lse, do,
        # delta, dq or dq_accum, dk, dv) are all it touches.
        touched = {backward.plan.buffers[index].name for launch in backward.plan.launches
                   if launch.symbol in symbols for kind, index in launch.args if kind == "buffer"}
        core_bytes = sum(b.bytes for b in backward.plan.buffers if b.name in touched)

        def run():
            for kernel in kernels:
                backward.run_kernel(kernel, check_each=False)
        return run, core_bytes

    def setup_core(batch, seq_len):
        call = bound_call(batch, seq_len)
        attention = next((l for l in call.plan.launches
                          if l.symbol == f"{layer.name}_attention"), None)
        if attention is None:
            raise RuntimeError(f"the library has no kernel `{layer.name}_attention`")
        touched = {call.plan.buffers[index].name for kind, index in attention.args
                   if kind == "buffer"}
        core_bytes = sum(b.bytes for b in call.plan.buffers if b.name in touched)
        return (lambda: call.run_kernel("attention", check_each=False)), core_bytes

    def setup_forward(batch, seq_len):
        """`layer.forward(x, state_dict)` exactly as a user calls it: each call checks its
        tensors, plans, and allocates its outputs and intermediates (torch's caching allocator)
        before the launches that `ccc:<lib>` times alone."""
        x = random_x(batch, seq_len)
        if not torch.isfinite(layer.forward(x, weights)).all():
            raise RuntimeError("non-finite output")
        return (lambda: layer.forward(x, weights)), None

    name = layer.name
    systems = [System(f"ccc:{name}", "layer", name, layer.spec, setup_layer, train),
               System(f"ccc-core:{name}", "core", name, layer.spec,
                      setup_core_backward if train else setup_core, train)]
    if not train:
        systems.insert(1, System(f"ccc-forward:{name}", "layer", name, layer.spec, setup_forward))
    return systems


def core_peers(spec, dtype, train):
    causal = spec.mask.kind == "causal"

    def builder(backend):
        def setup(batch, seq_len):
            return peers.sdpa_core(backend, batch, seq_len, spec.query_heads, spec.kv_heads,
                                   spec.head_dim, causal=causal, dtype=dtype, train=train), None
        return setup

    return [System(f"{backend}-core:{spec.name}", "core", spec.name, spec, builder(backend), train)
            for backend in ("cudnn", "fa2")]


def window_peer(spec, dtype, train):
    """FlexAttention on the same sliding window (cuDNN and FlashAttention through SDPA take only
    causal or no masks)."""

    def setup(batch, seq_len):
        return peers.flex_window_core(batch, seq_len, spec.query_heads, spec.kv_heads, spec.head_dim,
                                      spec.mask.window, dtype=dtype, train=train), None

    return System(f"flex-core:{spec.name}", "core", spec.name, spec, setup, train)


def mha_peer(spec, dtype, train):
    mha = spec_equivalent_mha(spec)
    weights = peers.mha_layer_weights(spec.model_dim, dtype)

    def setup(batch, seq_len):
        return peers.mha_layer(weights, batch, seq_len, spec.model_dim, spec.head_dim, dtype,
                               train=train), None

    return System(f"mha-cudnn:E{spec.model_dim}", "layer", None, mha, setup, train)


def spec_equivalent_mha(spec):
    """`AttentionSpec::equivalent_mha`: same width and head_dim, every head its own kv head, no
    CCA parts, causal."""
    heads = spec.model_dim // spec.head_dim
    return dataclasses.replace(
        spec, name=f"{spec.name}_mha", query_heads=heads, kv_heads=heads, qk_conv=(),
        qk_mean=False, value_shift=0, qk_norm="none", key_temperature="none",
        softmax_scale=spec.head_dim**-0.5, mask=Mask("causal"))


def hf_peers(spec, weights, train):
    zaya = ZayaLayer(spec, weights, TORCH_DTYPES[spec.dtype])
    compiled = torch.compile(zaya.module)

    def builder(module):
        def setup(batch, seq_len):
            return peers.zaya_layer(zaya, batch, seq_len, module=module,
                                    dtype=TORCH_DTYPES[spec.dtype], train=train), None
        return setup

    return [System(f"hf-zaya:{spec.name}", "layer", spec.name, spec, builder(None), train),
            System(f"hf-zaya-compiled:{spec.name}", "layer", spec.name, spec, builder(compiled), train)]


def allocate_library_workspaces():
    """One small GEMM and SDPA call per backend before the sweep, so that cuBLAS's and cuDNN's
    persistent workspaces are resident and not charged to the first point measured."""
    a = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
    torch.nn.functional.linear(a, a)
    q = torch.randn(1, 2, 128, 128, device="cuda", dtype=torch.bfloat16)
    for backend in peers.BACKENDS.values():
        try:
            with peers.sdpa_kernel([backend]):
                torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
        except RuntimeError:
            pass  # that backend's own rows will report why it cannot run
    torch.cuda.synchronize()


def time_calls(run, flush, warmup, target_s, min_iters, max_iters):
    """Median milliseconds of `run` over CUDA events, L2 flushed before each timed call."""
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    probe_start, probe_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
        enable_timing=True)
    probe_start.record()
    run()
    probe_end.record()
    torch.cuda.synchronize()
    estimate_ms = max(probe_start.elapsed_time(probe_end), 1e-3)
    iterations = int(min(max_iters, max(min_iters, target_s * 1000 / estimate_ms)))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(iterations)]
    for start, end in events:
        flush.zero_()
        start.record()
        run()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    return statistics.median(times), times


def measure(system, batch, seq_len, flush, settings, crosscheck=False):
    """One (system, B, S) point: a result dict (with `error` set when it could not run). With
    `crosscheck`, the same call is also timed by triton.testing.do_bench (its own L2 flush and
    median), so that the harness's number can be checked against the one other projects quote."""
    result = {"flops": system.flops(batch, seq_len)}
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    run = None
    try:
        run, reported_bytes = system.setup(batch, seq_len)
        run()  # warm (torch.compile compiles here), then the peak of one steady-state call
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - resident
        median_ms, times = time_calls(run, flush, **settings)
        if crosscheck:
            # Its own failure (no triton, its flush buffer out of memory) must not cost the point.
            try:
                from triton.testing import do_bench

                result["ms_do_bench"] = do_bench(run, return_mode="median")
            except Exception as error:
                result["do_bench_error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
    except torch.cuda.OutOfMemoryError:
        result["error"] = "out of memory"
        return result
    except Exception as error:  # a peer or our library failing must not stop the sweep
        result["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        return result
    finally:
        del run
    result.update(
        ms=median_ms,
        ms_p10=times[len(times) // 10],
        ms_p90=times[(len(times) * 9) // 10],
        iterations=len(times),
        tflops=result["flops"] / (median_ms * 1e-3) / 1e12,
        peak_mib=(reported_bytes if reported_bytes is not None else peak) / MIB,
    )
    return result


def environment():
    import transformers

    try:
        from cuda import bindings
        bindings_version = bindings.__version__
    except ImportError:
        bindings_version = "not installed"
    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "transformers": transformers.__version__,
        "cuda_bindings": bindings_version,
        "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def peer_ratios(result, by_key):
    """{peer name: peer ms / this ms} for the peers this row is compared with (>1: this row is
    faster)."""
    if "ms" not in result:
        return {}
    ratios = {}
    key = (result["batch"], result["seq_len"])
    for other in by_key.get(key, []):
        if other is result or "ms" not in other:
            continue
        same_library = other["library"] == result["library"] and result["library"] is not None
        if result["kind"] == "layer" and other["kind"] == "layer" and (
                other["system"] == f"mha-cudnn:E{result['model_dim']}"
                or (same_library and other["system"].startswith("hf-zaya"))):
            ratios[other["system"]] = other["ms"] / result["ms"]
        if result["kind"] == "core" and other["kind"] == "core" and same_library and (
                not other["system"].startswith("ccc")):
            ratios[other["system"]] = other["ms"] / result["ms"]
    return ratios


def write_markdown(path, env, config, results):
    by_key = {}
    for result in results:
        by_key.setdefault((result["batch"], result["seq_len"]), []).append(result)
    lines = [
        "# ccc benchmark",
        "",
        f"{env['gpu']}; torch {env['torch']} (CUDA {env['cuda']}, cuDNN {env['cudnn']}); "
        f"transformers {env['transformers']}; cuda-bindings {env['cuda_bindings']}; {env['date_utc']}.",
        "",
        f"Mode: {config['mode']} (train: layers forward + backward, cores backward alone, "
        "FLOPs 3× and 2.5× the forward's); causal; bf16 unless the spec says otherwise. Median of "
        "CUDA-event timings with the L2 flushed before each call. TFLOP/s by FlashAttention's "
        "convention (cores: 4·B·S²·H·D, halved for causal; layers: projections + convolution taps "
        "+ core). Peak: MiB allocated by the call above the resident weights. A ratio is the "
        "peer's time divided by this system's (above 1: this system is faster).",
        "",
    ]
    lines += ["## Ratios at S = 16384", ""]
    summary = [r for r in results if r["seq_len"] == SUMMARY_SEQ_LEN
               and r["system"].startswith("ccc")]
    if not summary:
        lines.append("No ccc system was measured at S = 16384 in this run.")
    for result in summary:
        ratios = peer_ratios(result, by_key)
        if "ms" not in result:
            lines.append(f"- `{result['system']}` B={result['batch']}: {result['error']}")
            continue
        text = ", ".join(f"{ratio:.2f}× vs `{peer}`" for peer, ratio in sorted(ratios.items()))
        lines.append(f"- `{result['system']}` B={result['batch']}: {result['ms']:.3f} ms; "
                     + (text or "no peer measured"))
    lines.append("")
    for kind, title in (("layer", "Whole layer"), ("core", "Attention core")):
        lines += [f"## {title}", "",
                  "| system | B | S | ms | TFLOP/s | peak MiB | ratios (peer ms / ms) |",
                  "|---|---|---|---|---|---|---|"]
        rows = sorted((r for r in results if r["kind"] == kind),
                      key=lambda r: (r["library"] or "", r["batch"], r["seq_len"], r["system"]))
        for r in rows:
            if "ms" not in r:
                lines.append(f"| {r['system']} | {r['batch']} | {r['seq_len']} | "
                             f"{r['error']} | | | |")
                continue
            ratios = peer_ratios(r, by_key)
            text = "; ".join(f"{ratio:.2f}× vs {peer}" for peer, ratio in sorted(ratios.items()))
            ms = f"{r['ms']:.3f}" + (f" (do_bench {r['ms_do_bench']:.3f})" if "ms_do_bench" in r else "")
            lines.append(f"| {r['system']} | {r['batch']} | {r['seq_len']} | {ms} | "
                         f"{r['tflops']:.1f} | {r['peak_mib']:.0f} | {text} |")
        lines.append("")
    with open(path, "w") as file:
        file.write("\n".join(lines))


def system_styles(systems):
    """{system: (colour, line style)}, a different pair for each of up to 80 systems: tab20's
    colours crossed with four line styles, in the order given."""
    import matplotlib.pyplot as plt

    colours = plt.get_cmap("tab20").colors
    dashes = ("-", "--", "-.", ":")
    return {system: (colours[i % len(colours)], dashes[(i // len(colours) + i) % len(dashes)])
            for i, system in enumerate(systems)}


def write_plot(path, results, batches):
    """Per batch size: latency, TFLOP/s and each ccc row's speed-up over the peers it is compared
    with in bench.md (above 1: ccc is faster). Circles: whole layers; squares: attention cores."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(3, len(batches), figsize=(7 * len(batches), 14), squeeze=False)
    systems = sorted({r["system"] for r in results})
    styles = system_styles(systems)
    by_key = {}
    for result in results:
        by_key.setdefault((result["batch"], result["seq_len"]), []).append(result)
    for column, batch in enumerate(batches):
        for system in systems:
            rows = sorted((r for r in results if r["system"] == system and r["batch"] == batch and "ms" in r),
                          key=lambda r: r["seq_len"])
            if not rows:
                continue
            colour, dash = styles[system]
            marker = "s" if rows[0]["kind"] == "core" else "o"
            seq_lens = [r["seq_len"] for r in rows]
            line = dict(color=colour, linestyle=dash, marker=marker, label=system)
            axes[0][column].plot(seq_lens, [r["ms"] for r in rows], **line)
            axes[1][column].plot(seq_lens, [r["tflops"] for r in rows], **line)
            if not system.startswith("ccc"):
                continue
            speedups = {}
            for r in rows:
                for peer, ratio in peer_ratios(r, by_key).items():
                    speedups.setdefault(peer, []).append((r["seq_len"], ratio))
            for peer, points in sorted(speedups.items()):
                _, peer_dash = styles[peer]
                axes[2][column].plot(*zip(*points), color=colour, linestyle=peer_dash, marker=marker,
                                     label=f"{system} vs {peer}")
        axes[2][column].axhline(1.0, color="black", linewidth=0.8)
        for row, label in enumerate(("latency (ms)", "TFLOP/s", "speed-up of ccc (×)")):
            axis = axes[row][column]
            axis.set_xscale("log", base=2)
            if row == 0:
                axis.set_yscale("log")
            axis.set_xlabel("sequence length")
            axis.set_ylabel(label)
            axis.set_title(f"B = {batch}: {label} (circles: layer, squares: attention core)")
            axis.grid(True, which="both", alpha=0.3)
    for row in (0, 2):
        axes[row][-1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight")


def open_target(path):
    """A library directory (manifest.json + PTX), or a spec alone (a spec.json holding a
    manifest's `spec` object, or a directory holding one): then only the peers run."""
    if os.path.isfile(os.path.join(path, "manifest.json")):
        layer = ccc.load(path)
        return layer, layer.spec
    spec_path = path if path.endswith(".json") else os.path.join(path, "spec.json")
    with open(spec_path) as file:
        return None, parse_spec(json.load(file))


def build_systems(args):
    systems = []
    mha_widths = set()
    for path in args.libraries:
        layer, spec = open_target(path)
        dtype = TORCH_DTYPES[spec.dtype]
        weights = random_state_dict(spec, args.seed)
        if layer is not None:
            systems += ours(layer, weights, args.train)
        if spec.mask.kind == "causal":
            systems += core_peers(spec, dtype, args.train)
        if spec.mask.kind == "sliding_window":
            systems.append(window_peer(spec, dtype, args.train))
        if (spec.model_dim, spec.head_dim, spec.dtype) not in mha_widths:
            mha_widths.add((spec.model_dim, spec.head_dim, spec.dtype))
            systems.append(mha_peer(spec, dtype, args.train))
        if spec.has_cca_parts() and zaya_incompatibility(spec) is None:
            systems += hf_peers(spec, weights, args.train)
    if args.systems:
        patterns = [p.strip() for p in args.systems.split(",") if p.strip()]
        systems = [s for s in systems if any(fnmatch.fnmatch(s.name, p) for p in patterns)]
    return systems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("libraries", nargs="+",
                        help="compiled library directories (DIR/<name>); a spec.json alone "
                             "benchmarks only the peers for it")
    parser.add_argument("--out", default=os.environ.get("OUT", "bench-out"),
                        help="output folder (default $OUT)")
    parser.add_argument("--seq-lens", help="comma-separated, e.g. 1024,16384")
    parser.add_argument("--batches", help="comma-separated, default 1,8 (quick: 1)")
    parser.add_argument("--systems", help="comma-separated name patterns, e.g. 'ccc*,fa2-core:*'")
    parser.add_argument("--quick", action="store_true",
                        help="1k/4k/16k, B = 1, fewer timed calls, about 5 minutes in all")
    parser.add_argument("--budget-s", type=float,
                        help="stop measuring new points after this many seconds (quick: 240)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", action="store_true",
                        help="layers: forward + backward; cores: backward alone")
    parser.add_argument("--crosscheck", action="store_true",
                        help="also time every point with triton.testing.do_bench and report both")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.py needs a CUDA GPU", file=sys.stderr)
        return 2
    seq_lens = ([int(s) for s in args.seq_lens.split(",")] if args.seq_lens
                else list(QUICK_SEQ_LENS if args.quick else FULL_SEQ_LENS))
    batches = ([int(b) for b in args.batches.split(",")] if args.batches
               else [1] if args.quick else [1, 8])
    budget = args.budget_s if args.budget_s is not None else (240.0 if args.quick else math.inf)
    settings = (dict(warmup=3, target_s=0.2, min_iters=5, max_iters=30) if args.quick
                else dict(warmup=5, target_s=0.5, min_iters=10, max_iters=100))
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)
    systems = build_systems(args)
    started = time.monotonic()
    flush = torch.empty(FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    allocate_library_workspaces()
    results = []
    failed_at = {}  # (system, batch) -> seq_len where it ran out of memory
    for seq_len in seq_lens:
        for batch in batches:
            for system in systems:
                if time.monotonic() - started > budget:
                    result = {"error": "skipped: time budget"}
                elif failed_at.get((system.name, batch), math.inf) < seq_len:
                    result = {"error": "skipped: out of memory at a shorter length"}
                else:
                    result = measure(system, batch, seq_len, flush, settings, args.crosscheck)
                    if result.get("error") == "out of memory":
                        failed_at[(system.name, batch)] = seq_len
                result.update(system=system.name, kind=system.kind, library=system.library,
                              model_dim=system.spec.model_dim, batch=batch, seq_len=seq_len)
                results.append(result)
                shown = (f"{result['ms']:9.3f} ms {result['tflops']:7.1f} TFLOP/s "
                         f"{result['peak_mib']:8.0f} MiB" if "ms" in result else result["error"])
                if "ms_do_bench" in result:
                    shown += f" (do_bench {result['ms_do_bench']:.3f} ms)"
                print(f"{system.name:28s} B={batch:<2d} S={seq_len:<6d} {shown}", flush=True)
    env = environment()
    config = {"mode": ("quick" if args.quick else "full") + (", train" if args.train else ""),
              "seq_lens": seq_lens,
              "batches": batches, "libraries": args.libraries, "timing": settings,
              "seconds": round(time.monotonic() - started, 1)}
    with open(os.path.join(args.out, "bench.json"), "w") as file:
        json.dump({"environment": env, "config": config, "results": results}, file, indent=1)
    write_markdown(os.path.join(args.out, "bench.md"), env, config, results)
    write_plot(os.path.join(args.out, "bench.png"), results, batches)
    print(f"wrote {args.out}/bench.md, bench.json, bench.png in {config['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
