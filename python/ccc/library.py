"""A compiled library loaded on a GPU, driven from PyTorch.

Mirrors the Rust runtime (runtime/src/library.rs): kernels launch in manifest order on one stream
(here torch's current stream, so they order with the caller's torch work), buffers the runtime owns
are allocated with torch (so they show in torch's memory counters), kernels that ask for more than
48 KB of dynamic shared memory get the function attribute raised at load time, and in validate
mode every runtime-owned buffer is filled with NaN first and every launch is checked before the
next, so that an unwritten element or a faulting kernel is reported as such. Nothing is copied:
kernels receive the `data_ptr()` of the caller's tensors (and, for `tensor_map` parameters, the
TMA descriptor of one by value, encoded when the call is bound). Loading and launching go through
the CUDA driver API (ccc.driver, NVIDIA's cuda-bindings)."""

import torch

from . import driver, tensor_map
from .errors import ManifestError, TensorMismatch
from .manifest import (TensorInfo, check_device, check_supplied, off_gpu_problem, check_decode_indices, plan_call,
                       plan_for_input, plan_for_supplied, read_library)

TORCH_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32, "i32": torch.int32}
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}

# Names the validator knows (docs/manifest.md) with their logical [.., heads, head_dim] split.
HEAD_SPLIT_BUFFERS = {"q": "query_heads", "k": "kv_heads", "v": "kv_heads", "o": "query_heads"}


def tensor_info(tensor):
    return TensorInfo(DTYPE_NAMES.get(tensor.dtype, str(tensor.dtype).replace("torch.", "")),
                      tuple(tensor.shape), str(tensor.device), tensor.is_contiguous(), tensor.data_ptr())


class BoundCall:
    """One (x, weights) call with every runtime-owned buffer allocated: `run()` launches the whole
    entry point again on the same buffers, `run_kernel(suffix)` a single kernel (e.g. `attention`
    on the q, k, v a previous `run()` wrote). For timing without allocation in the loop."""

    def __init__(self, layer, plan, tensors, device):
        self.layer = layer
        self.plan = plan
        self.tensors = tensors  # manifest name -> torch tensor, caller's and runtime's
        self.device = device
        # Packed once: every run() launches on the same buffers.
        self._arguments = [driver.Arguments(self._kernel_arguments(launch)) for launch in plan.launches]

    def _kernel_arguments(self, launch):
        args = []
        for kind, value in launch.args:
            if kind == "buffer":
                args.append(driver.u64(self.tensors[self.plan.buffers[value].name].data_ptr()))
            elif kind == "tensor_map":
                index, box_rows, view = value
                tensor = self.tensors[self.plan.buffers[index].name]
                args.append(tensor_map.kernel_argument(tensor if view is None else tensor.view(view), box_rows))
            else:
                args.append(driver.u32(value))
        return args

    def run(self, check_each=None):
        """Launches every kernel in order on torch's current stream."""
        self._launch(range(len(self.plan.launches)), check_each)

    def run_kernel(self, suffix, check_each=None):
        """Launches only the kernel whose symbol is `<name>_<suffix>`."""
        symbol = f"{self.layer.name}_{suffix}"
        for index, launch in enumerate(self.plan.launches):
            if launch.symbol == symbol:
                return self._launch([index], check_each)
        raise KeyError(f"the library has no kernel `{symbol}`; it has "
                       + ", ".join(l.symbol for l in self.plan.launches))

    def _launch(self, indices, check_each):
        check = self.layer.validate if check_each is None else check_each
        stream = torch.cuda.current_stream(self.device).cuda_stream
        for index in indices:
            launch = self.plan.launches[index]
            function = self.layer._function(launch.symbol, self.device)
            driver.launch(function, launch.grid, launch.block, launch.dynamic_shared_bytes, stream,
                          self._arguments[index])
            if check:
                driver.synchronize(stream, self.device.index, f"running kernel `{launch.symbol}` (launch "
                                   f"{index + 1} of {len(self.plan.launches)})")

    def saved(self):
        """The forward's buffers of role `saved` (what its backward reads), by name."""
        return {b.name: self.tensors[b.name] for b in self.plan.buffers if b.role == "saved"}

    def outputs(self):
        """Runtime-owned buffers by manifest name; q, k, v, o viewed as [B, S, heads, head_dim]."""
        spec = self.layer.spec
        result = {}
        for buffer in self.plan.buffers:
            if buffer.role in ("input", "weight", "state"):
                continue
            tensor = self.tensors[buffer.name]
            if buffer.name in HEAD_SPLIT_BUFFERS and tensor.dim() == 3:
                heads = getattr(spec, HEAD_SPLIT_BUFFERS[buffer.name])
                tensor = tensor.view(*tensor.shape[:2], heads, spec.head_dim)
            result[buffer.name] = tensor
        return result


class Layer:
    """One loaded library: its forward (differentiable when it has a backward) and backward entry
    points. Build with `ccc.load(directory)`."""

    def __init__(self, directory, validate=False):
        self.directory = str(directory)
        self.manifest, self.module_path = read_library(self.directory)
        self.spec = self.manifest.spec
        self.name = self.spec.name
        self.validate = validate
        self._functions = {}  # device index -> {symbol: driver.Function}, each keeping its module loaded
        self._operators = None  # its torch.library operators (ccc.autograd), registered on first use

    @property
    def weights(self):
        """(name, shape, dtype) of every weight the forward pass takes, in spec order."""
        return [(w.name, w.shape, w.dtype) for w in self.manifest.weights]

    def __repr__(self):
        return (f"<ccc layer {self.name} from {self.directory}: "
                f"{len(self.manifest.entry_point('forward').kernels)} kernels>")

    def _function(self, symbol, device):
        if device.index not in self._functions:
            self._functions[device.index] = self._load_module(device)
        return self._functions[device.index][symbol]

    def _load_module(self, device):
        check_device(self.manifest.target, torch.cuda.get_device_capability(device),
                     f"GPU {device.index} ({torch.cuda.get_device_name(device)})")
        module = driver.load_module(self.module_path, device.index)
        return {kernel.symbol: driver.function(module, kernel.symbol, kernel.dynamic_shared_bytes)
                for entry in self.manifest.entry_points for kernel in entry.kernels}

    def bind(self, x, state_dict, poison=None):
        """Checks x [B, S, E] and the weights, allocates every runtime-owned buffer of the forward
        (NaN-filled in validate mode or with poison=True, else uninitialised) and returns a
        BoundCall."""
        return self._bind("forward", "x", {"x": x, **state_dict}, poison)

    def buffer_shapes(self, entry, batch, seq_len):
        """name -> (shape, torch dtype) of every buffer of `entry` for these sizes (which may be
        symbolic under torch.compile): what a fake implementation allocates."""
        env = {"B": batch, "S": seq_len}
        return {b.name: (tuple(d.eval(env) for d in b.shape), TORCH_DTYPES[b.dtype])
                for b in self.manifest.entry_point(entry).buffers}

    @property
    def has_backward(self):
        """Whether the library was compiled with `backward` in `emit`."""
        return self.manifest.entry_point("backward") is not None

    def require_backward(self):
        """Raises ManifestError, saying what to change, unless the library has a backward."""
        if not self.has_backward:
            raise ManifestError(
                f"`{self.name}` was compiled without the backward entry point: add `backward` to "
                "`emit` (`emit = [forward, backward]`) to train with it; for inference, call it "
                "under torch.no_grad() or with tensors that do not require grad")

    def bind_backward(self, x, state_dict, saved, dout, poison=None):
        """The backward call's BoundCall: x and the weights of the forward call, what it saved
        (`saved`, the forward's buffers of role `saved` by name: p0, q, k, v, o, lse) and
        dout [B, S, E]."""
        return self._bind("backward", "dout", {"x": x, "dout": dout, **state_dict, **saved}, poison)

    @property
    def has_decode(self):
        """Whether the library was compiled with `decode` in `emit`."""
        return self.manifest.entry_point("decode") is not None

    def decode_cache(self, sequences, pages, device="cuda"):
        """A decode step's state for `sequences` sequence slots and a pool of `pages` KV pages,
        zero (every slot a sequence with no tokens yet): name -> tensor for every buffer of role
        `state` (`k_cache`, `v_cache` [pages, page_size, Hk, d]; `conv_state` [B, P, T] and
        `shift_state` [B, s*d] where the layer has them). The caller keeps it from step to step;
        the step updates it in place."""
        if not self.has_decode:
            raise ManifestError(f"`{self.name}` was compiled without the decode entry point: add "
                                "`decode` to `emit` (`emit = [forward, decode]`) to serve with it")
        plan = plan_call(self.manifest, "decode", sequences, 1, None, pages, 1)
        return {b.name: torch.zeros(b.shape, dtype=TORCH_DTYPES[b.dtype], device=device)
                for b in plan.buffers if b.role == "state"}

    def prefill(self, x, state_dict, cache, cu_seqlens, block_table, seq_lens, poison=None, check_indices=None):
        """A prefill over a packed batch, as FlashAttention's varlen functions take one: x [S, E]
        holds the new tokens of B sequences, sequence b's rows cu_seqlens[b] .. cu_seqlens[b + 1]
        (`cu_seqlens` [B + 1], int32), each continuing the tokens `cache` (`decode_cache`) holds
        for it (a chunked prefill; a new sequence's slot holds none, and its state is ignored);
        `seq_lens` [B] (int32) is each length with the new tokens, `block_table` [B, blocks]
        (int32) its pages. Writes the new tokens' k and v into the pages, moves the convolution
        and shift state on, and returns out [S, E]. With `check_indices` (default: in validate
        mode) the indices are checked first (`check_decode_indices`), which waits for the GPU."""
        supplied = {"x": x, "cu_seqlens": cu_seqlens, "block_table": block_table, "seq_lens": seq_lens,
                    **cache, **state_dict}
        call = self._bind("prefill", None, supplied, poison)
        if self.validate if check_indices is None else check_indices:
            check_decode_indices(self.manifest, block_table.tolist(), seq_lens.tolist(), cache["k_cache"].shape[0],
                                 packed=(cu_seqlens.tolist(), x.shape[0]))
        call.run()
        return call.tensors["out"]

    def bind_decode(self, x, state_dict, cache, block_table, seq_lens, poison=None, check_indices=None):
        """The decode step's BoundCall for x [B, 1, E] (or [B, E]): the new token of each of B
        sequences, their pages in `cache` (`decode_cache`) named by `block_table` [B, blocks]
        (int32) and their lengths with the new token `seq_lens` [B] (int32; 0: an empty slot).
        With `check_indices` (default: in validate mode) the indices are copied to the host and
        checked against the pool first (`check_decode_indices`), which waits for the GPU: leave it
        off where the step is captured in a CUDA graph."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        supplied = {"x": x, "block_table": block_table, "seq_lens": seq_lens, **cache, **state_dict}
        call = self._bind("decode", None, supplied, poison)
        if self.validate if check_indices is None else check_indices:
            check_decode_indices(self.manifest, block_table.tolist(), seq_lens.tolist(), cache["k_cache"].shape[0])
        return call

    def decode(self, x, state_dict, cache, block_table, seq_lens):
        """One decode step (`bind_decode`): appends each token's k and v to its page, moves the
        convolution and shift state on, and returns out [B, 1, E]. Its own small buffers come from
        torch's caching allocator and nothing waits for the GPU (outside validate mode), so a
        BoundCall's `run()` can be captured in a CUDA graph."""
        call = self.bind_decode(x, state_dict, cache, block_table, seq_lens)
        call.run()
        return call.tensors["out"]

    def _bind(self, entry, anchor, supplied_tensors, poison):
        """Plans `entry` for the sizes of the caller's `anchor` tensor (None: of every input and
        state tensor, a decode step's), checks every caller-supplied tensor and allocates the
        others."""
        anchor_name = anchor or "block_table"
        anchor_tensor = supplied_tensors[anchor_name]
        info = tensor_info(anchor_tensor)
        # Before planning: persistent grids have one CTA per SM of the anchor's GPU.
        problem = off_gpu_problem(anchor_name, anchor_tensor.device)
        if problem:
            raise TensorMismatch([problem])
        sms = torch.cuda.get_device_properties(anchor_tensor.device).multi_processor_count
        if anchor is None:
            weights = {w.name for w in self.manifest.weights}
            shapes = {name: (tensor_info(t).dtype, tuple(t.shape)) for name, t in supplied_tensors.items()
                      if name not in weights}
            plan = plan_for_supplied(self.manifest, entry, shapes, sms)
        else:
            plan = plan_for_input(self.manifest, entry, anchor, info.dtype, info.shape, sms)
        check_supplied(self.manifest, plan, {name: tensor_info(t) for name, t in supplied_tensors.items()})
        device = anchor_tensor.device
        poison = self.validate if poison is None else poison
        tensors = dict(supplied_tensors)
        for buffer in plan.buffers:
            if buffer.role in ("input", "weight", "state"):
                continue
            dtype = TORCH_DTYPES[buffer.dtype]
            if poison:
                # i32 has no NaN: the most negative index, as the Rust runtime poisons.
                value = torch.iinfo(dtype).min if not dtype.is_floating_point else float("nan")
                tensors[buffer.name] = torch.full(buffer.shape, value, dtype=dtype, device=device)
            else:
                tensors[buffer.name] = torch.empty(buffer.shape, dtype=dtype, device=device)
        return BoundCall(self, plan, tensors, device)

    def forward(self, x, state_dict):
        """out [B, S, E] = the layer applied to x [B, S, E] with the given weights (a dict of
        Hugging Face state-dict names to CUDA tensors in the spec's dtype). When autograd records
        and x or a weight requires grad, the call is differentiable (ccc.autograd), which needs a
        library compiled with `emit = [forward, backward]`."""
        if torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in state_dict.values())):
            from .autograd import differentiable_forward

            return differentiable_forward(self, x, state_dict)
        call = self.bind(x, state_dict)
        call.run()
        return call.tensors["out"]

    __call__ = forward

    def forward_saving(self, x, state_dict):
        """out [B, S, E] and what the backward needs (the buffers of role `saved`, by name): the
        forward of a library compiled with `emit = [forward, backward]`."""
        self.require_backward()
        call = self.bind(x, state_dict)
        call.run()
        return call.tensors["out"], call.saved()

    def backward(self, x, state_dict, saved, dout):
        """dx [B, S, E] and every weight's gradient (f32, by the weight's name) of the forward call
        on (x, state_dict) that returned `saved` ([`forward_saving`]), for the output gradient
        dout [B, S, E]."""
        call = self.bind_backward(x, state_dict, saved, dout.contiguous())
        call.run()
        grads = {name[len("grad."):]: t for name, t in call.tensors.items() if name.startswith("grad.")}
        return call.tensors["dx"], grads

    def forward_with_intermediates(self, x, state_dict, poison=True):
        """Like forward, returning every runtime-owned buffer by name: out, q, k, v, o (as
        [B, S, heads, head_dim]) and lse [B, Hq, S] (f32), NaN-poisoned before the launch by
        default so that unwritten elements show."""
        call = self.bind(x, state_dict, poison=poison)
        call.run()
        return call.outputs()

    def random_state_dict(self, seed, device="cuda"):
        """Random weights of the right names, shapes and dtype, at scales that keep activations
        O(1): linear weights ~ N(0, 1/in), convolution taps and biases small, temperatures in
        [0.5, 1.5]."""
        return random_state_dict(self.spec, seed, device)


def random_state_dict(spec, seed, device="cuda"):
    generator = torch.Generator(device="cpu").manual_seed(seed)
    dtype = TORCH_DTYPES[spec.dtype]
    weights = {}
    for param in spec.params():
        shape = param.shape
        if param.role == "key_temperature":
            value = torch.rand(shape, generator=generator, dtype=torch.float64) + 0.5
        elif param.role.startswith("conv_weight"):
            fan_in = shape[1] * shape[2]
            value = torch.randn(shape, generator=generator, dtype=torch.float64) / fan_in**0.5
        elif len(shape) == 1:  # biases
            value = 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64)
        else:
            value = torch.randn(shape, generator=generator, dtype=torch.float64) / shape[1]**0.5
        weights[param.name] = value.to(dtype=dtype, device=device).contiguous()
    return weights


__all__ = ["Layer", "BoundCall", "TensorMismatch", "random_state_dict", "tensor_info"]
