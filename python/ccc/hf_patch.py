"""`patch(model, libraries)`: every `ZayaAttention` of a loaded Hugging Face ZAYA model replaced by
a module that runs ccc's compiled layer for it (ccc.hf_match picks the library), on the module's
own parameters; `unpatch(model)` puts the originals back.

Without a cache the library's forward runs (differentiable through ccc.autograd when autograd
records and the library has a backward). With transformers' DynamicCache (generate's) and a
library compiled with `emit = [forward, decode]`, each patched layer keeps ccc's paged KV cache and
convolution and shift state for that cache object: filled by the prefill entry point when the
cache is empty, extended by a decode step per token (or a chunked prefill), while HF's cache only
counts the layer's tokens, which generate, the mask builders and `get_seq_length` read."""

import inspect
import os
import weakref

import torch

from .errors import ManifestError
from .hf_match import NotSupported, check_weights, choose_library, dtype_name, read_libraries
from .library import Layer

# Operators registered so far in this process (each patched library gets its own).
_operator_count = 0


def _inference_operator(layer):
    """`ccc::<name>_<n>_inference(x, weights) -> out`: the layer's forward without autograd, as a
    torch.library operator whose fake implementation gives out's shape, so that
    torch.compile(fullgraph=True) traces through a patched model."""
    global _operator_count
    names = [weight.name for weight in layer.manifest.weights]
    qualified = f"ccc::{layer.name}_{_operator_count}_inference"
    _operator_count += 1

    @torch.library.custom_op(qualified, mutates_args=())
    def inference(x: torch.Tensor, weights: list[torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            return layer.forward(x, dict(zip(names, weights)))

    @inference.register_fake
    def _(x, weights):
        shape, dtype = layer.buffer_shapes("forward", x.shape[0], x.shape[1])["out"]
        return x.new_empty(shape, dtype=dtype)

    return inference


def _needs_grad(x, weights):
    return torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights.values()))


class _PagedCache:
    """ccc's state for the sequences of one HF cache in one layer: `decode_cache`'s KV pages and
    convolution and shift state. Block j of sequence b is page j * batch + b, so that growing the
    pool appends pages and leaves every written one where it is."""

    def __init__(self, layer, batch, device):
        self.layer, self.batch, self.device = layer, batch, device
        self.page_size = layer.manifest.entry_point("decode").buffer("k_cache").shape[1].eval({})
        self.blocks = 0
        self.state = self.block_table = None
        self.length = 0  # tokens of each sequence: a batch without padding has one length
        self.hf_keys = None  # HF's placeholder after this layer's last update (see CccZayaAttention)

    def _reserve(self, tokens):
        needed = -(-tokens // self.page_size)
        if needed <= self.blocks:
            return
        # Doubling keeps the copying of a long generation linear in its length.
        blocks = max(needed, 2 * self.blocks)
        grown = self.layer.decode_cache(self.batch, blocks * self.batch, self.device)
        if self.state is not None:
            for name, tensor in self.state.items():
                # The pages keep their numbers; the [B, ...] states are copied whole.
                grown[name][: tensor.shape[0]].copy_(tensor)
        pages = torch.arange(blocks, dtype=torch.int32, device=self.device) * self.batch
        self.block_table = pages[None, :] + torch.arange(self.batch, dtype=torch.int32, device=self.device)[:, None]
        self.state, self.blocks = grown, blocks

    def run(self, x, weights):
        """out [B, S, E] for the next S tokens x [B, S, E] of every sequence."""
        batch, seq_len, width = x.shape
        total = self.length + seq_len
        self._reserve(total)
        seq_lens = torch.full((batch,), total, dtype=torch.int32, device=self.device)
        if seq_len == 1:
            out = self.layer.decode(x, weights, self.state, self.block_table, seq_lens)
        else:
            # Packed as the prefill entry point takes a batch: sequence b's rows b*S .. (b+1)*S.
            cu_seqlens = torch.arange(0, batch * seq_len + 1, seq_len, dtype=torch.int32, device=self.device)
            out = self.layer.prefill(x.view(batch * seq_len, width), weights, self.state, cu_seqlens,
                                     self.block_table, seq_lens).view(batch, seq_len, width)
        self.length = total
        return out


class _Refusal:
    """What a patched layer holds for a cache whose first call it did not serve from ccc's pages:
    the error a continuation of that cache raises."""

    def __init__(self, error, message):
        self.error, self.message = error, message


class _Shared:
    """A loaded library and its operator, which deep copies of a patched model share: they are
    loaded GPU modules and a registered operator, not state."""

    def __init__(self, layer, operator):
        self.layer, self.operator = layer, operator

    def __deepcopy__(self, memo):
        return self


class _PerCache(weakref.WeakKeyDictionary):
    """HF cache object -> what a patched layer holds for it (_PagedCache or _Refusal); an entry goes
    with its cache. A deep copy of the model starts with none, as its layers have computed nothing
    for the caches that exist."""

    def __deepcopy__(self, memo):
        return _PerCache()


class CccZayaAttention(torch.nn.Module):
    """A ZayaAttention's replacement that runs ccc's compiled layer (`library`, a ccc Layer) on the
    original's parameters: its o_proj, qkv_proj and qk_norm submodules themselves, so that state
    dict keys, `.to()`, optimizers and checkpoints see the same parameters. Called as ZayaAttention
    is; returns (out, None), as ZayaAttention does without eager attention weights."""

    def __init__(self, original, library, operator):
        super().__init__()
        # In the original's order (o_proj, qkv_proj, qk_norm): the state dict's and parameters() order.
        for name, child in original.named_children():
            setattr(self, name, child)
        self.config, self.layer_idx, self.layer_type = original.config, original.layer_idx, original.layer_type
        self.attention_dropout = original.attention_dropout
        self._shared = _Shared(library, operator)
        self._names = [weight.name for weight in library.manifest.weights]
        self._caches = _PerCache()
        # Outside the module tree (its parameters are this module's): what unpatch() puts back.
        self.__dict__["original"] = original

    @property
    def library(self):
        """The ccc Layer this module runs."""
        return self._shared.layer

    def extra_repr(self):
        return f"layer_idx={self.layer_idx}, library={self.library.directory}"

    def forward(self, hidden_states, attention_mask=None, cache=None, position_embeddings=None,
                past_key_values=None, **kwargs):
        # attention_mask and position_embeddings go unread: the library applies its spec's mask and
        # RoPE at the positions it counts (0 on without a cache, the cached length on with one), and
        # the ZayaModel's input check (patch) refuses padding and other positions.
        if self.training and self.attention_dropout:
            raise NotSupported(f"layer {self.layer_idx}: attention_dropout {self.attention_dropout} in training: "
                               "ccc's layers have no dropout")
        cache = past_key_values if cache is None else cache
        x = hidden_states.contiguous()
        weights = dict(self.named_parameters())
        if cache is None:
            return self._forward(x, weights), None
        return self._extend(x, weights, cache), None

    def _forward(self, x, weights):
        if _needs_grad(x, weights):
            # ccc.autograd's operators; without a backward, the Layer's error says what to compile.
            return self.library.forward(x, weights)
        return self._shared.operator(x, [weights[name] for name in self._names])

    def _extend(self, x, weights, cache):
        from transformers.cache_utils import DynamicCache

        where = f"layer {self.layer_idx}"
        offloading = getattr(cache, "offloading", False)
        if not isinstance(cache, DynamicCache) or offloading:
            raise NotSupported(f"{where}: a {type(cache).__name__}{' with offloading' if offloading else ''}: "
                               "ccc's layers keep their keys and values in their own pages beside a "
                               "transformers DynamicCache, and take no other cache")
        batch, seq_len, _ = x.shape
        past = cache.get_seq_length(self.layer_idx)
        if past == 0:
            # An empty cache: a new generate call, or a cache reset.
            held = self._first(x, weights)
            out = held.run(x, weights) if isinstance(held, _PagedCache) else self._forward(x, weights)
        else:
            held = self._caches.get(cache)
            if held is None:
                raise NotSupported(f"{where}: the cache holds {past} tokens this patched layer did not compute "
                                   "(filled before patch(), or by another model): start from an empty cache")
            if isinstance(held, _Refusal):
                raise held.error(held.message)
            if cache.layers[self.layer_idx].keys is not held.hf_keys or past != held.length or batch != held.batch:
                raise NotSupported(f"{where}: the cache was changed outside this layer (reordered or cropped, as "
                                   "beam search and assisted decoding do, or its batch changed): ccc's pages "
                                   "follow one sequence per batch row, extended token by token")
            out = held.run(x, weights)
        # HF's cache counts the layer's tokens in a [B, 1, S, 1] placeholder, whose length generate,
        # the mask builders and the next call read; ccc's pages hold the keys and values.
        placeholder = x.new_zeros(batch, 1, seq_len, 1)
        cache.update(placeholder, placeholder, self.layer_idx)
        if isinstance(held, _PagedCache):
            held.hf_keys = cache.layers[self.layer_idx].keys
        self._caches[cache] = held
        return out

    def _first(self, x, weights):
        """A _PagedCache for the sequences that start in an empty cache, or the _Refusal that a
        continuation will raise where ccc's pages cannot be filled (the forward serves this call)."""
        where = f"layer {self.layer_idx}"
        if _needs_grad(x, weights):
            return _Refusal(NotSupported, f"{where}: the cache's first call ran with autograd recording, which "
                                          "ccc's paged cache is not filled by: generate under torch.no_grad()")
        if not self.library.has_decode:
            return _Refusal(ManifestError, f"`{self.library.name}` ({where}) was compiled without the decode entry "
                                           "point, so it cannot continue a cached sequence: add `emit = [forward, "
                                           "decode]` to its block in the .attn and compile again, or call the "
                                           "model with use_cache=False")
        return _PagedCache(self.library, x.shape[0], x.device)


def _check_model_inputs(model, args, kwargs):
    """ZayaModel's forward pre-hook: refuses what the patched layers cannot honour before any of
    them runs: a padded batch (a zero in the 2D attention mask) or another kind of mask, and
    position_ids or cache_position other than the cached length onwards (the layers put RoPE
    there themselves)."""
    if torch.compiler.is_compiling():
        # Reading the values would break the graph: checked in eager calls only.
        return
    given = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    # transformers names the cache `cache` (5.x, `past_key_values` deprecated) or `past_key_values`.
    given = {**given.pop("kwargs", {}), **given}
    mask = given.get("attention_mask")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise NotSupported("an attention mask other than a [B, S] padding mask: ccc's layers apply their "
                               "spec's causal or sliding-window mask")
        if not bool(mask.all()):
            raise NotSupported("a padded batch (a zero in the attention mask): ccc's layers take every sequence "
                               "of a batch at the same length, from position 0; run sequences of different "
                               "lengths one at a time")
    cache = given.get("cache")
    if cache is None:
        cache = given.get("past_key_values")
    past = 0 if cache is None else cache.get_seq_length()
    for name in ("position_ids", "cache_position"):
        positions = given.get(name)
        if positions is None:
            continue
        count = positions.shape[-1]
        if not bool((positions == torch.arange(past, past + count, device=positions.device)).all()):
            raise NotSupported(f"{name} other than {past}..{past + count - 1} for every sequence: ccc's layers "
                               "put RoPE at the positions from the cached length on")


def patch(model, libraries):
    """Replaces every ZayaAttention of `model` (a loaded transformers ZAYA model, e.g.
    ZayaForCausalLM, in bfloat16 or float16) with a CccZayaAttention running the library under
    `libraries` (the directory `ccc compile` wrote, DIR/NAME/manifest.json) whose spec is that
    layer's, and checks the model's inputs on each call; returns the model. Every layer is matched
    before anything changes: LibraryMismatch names a layer no library implements and what differs,
    NotSupported what ccc's layers cannot express."""
    from transformers.models.zaya.modeling_zaya import ZayaAttention, ZayaModel

    sites = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if isinstance(child, ZayaAttention)]
    if not sites:
        patched = any(isinstance(module, CccZayaAttention) for module in model.modules())
        raise ValueError("the model has no ZayaAttention module"
                         + (" left: it is patched already (ccc.hf.unpatch(model) first)" if patched else ""))
    hosts = [module for module in model.modules() if isinstance(module, ZayaModel)]
    inside = {id(module) for host in hosts for module in host.modules()}
    stray = [child.layer_idx for _, _, child in sites if id(child) not in inside]
    if stray:
        raise NotSupported(f"layers {stray} are outside a ZayaModel, whose inputs (positions, attention mask) "
                           "patch() checks for them")
    candidates = read_libraries(libraries)
    chosen = []
    for _, _, child in sites:
        dtype = dtype_name(str(child.o_proj.weight.dtype))
        directory, manifest = choose_library(child.config, child.layer_idx, dtype, candidates, os.fspath(libraries))
        check_weights(manifest, [(name, p.shape) for name, p in child.named_parameters()], child.layer_idx)
        chosen.append(directory)
    # One Layer (one loaded module per GPU) and operator per library, shared by its layers.
    layers = {directory: Layer(directory) for directory in sorted(set(chosen))}
    operators = {directory: _inference_operator(layer) for directory, layer in layers.items()}
    for (parent, name, child), directory in zip(sites, chosen):
        setattr(parent, name, CccZayaAttention(child, layers[directory], operators[directory]))
    for host in hosts:
        if getattr(host, "_ccc_input_check", None) is None:
            host._ccc_input_check = host.register_forward_pre_hook(_check_model_inputs, with_kwargs=True)
    return model


def unpatch(model):
    """Puts back every ZayaAttention that patch() replaced in `model`, on the current parameters,
    and removes the input check; returns the model."""
    sites = [(parent, name, child) for parent in model.modules()
             for name, child in parent.named_children() if isinstance(child, CccZayaAttention)]
    for parent, name, patched in sites:
        original = patched.original
        # The patched module's submodules, in case they were replaced since patch().
        for child_name, child in patched.named_children():
            setattr(original, child_name, child)
        original.train(patched.training)
        setattr(parent, name, original)
    for host in model.modules():
        handle = getattr(host, "_ccc_input_check", None)
        if handle is not None:
            handle.remove()
            del host._ccc_input_check
    return model


__all__ = ["CccZayaAttention", "patch", "unpatch"]
