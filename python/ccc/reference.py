"""The layer of docs/language.md (Semantics, steps 1 to 8) in torch float64, for validating GPU
libraries at sequence lengths where the Rust f64 reference (src/reference) is too slow.

Written from the semantics, not from the Hugging Face module it is checked against: explicit
convolution taps over T zero rows padded once, the q-k mean, the L2 norm with eps inside the square
root, RoPE angles computed in float64, and attention in query blocks so that memory stays bounded
at 32k tokens. Every tensor comes back in the layout of the manifest's named buffers.

With storage_dtype ("bf16" or "f16") the same computation rounds to that type wherever the GPU
kernels store a tensor in it (see `reference_forward`), so that python/validate.py can compare
the kernels with a reference that carries the same unavoidable rounding and set a tolerance a
few times the small remainder instead of the storage precision."""

import torch

from .mask_rule import block_key_range, key_range

# Logits of one query block are at most this many bytes (float64).
LOGITS_BUDGET_BYTES = 2 << 30


def _params_by_role(spec, state_dict, dtype):
    roles = {}
    for param in spec.params():
        if param.name not in state_dict:
            raise KeyError(f"the state dict lacks `{param.name}`")
        roles[param.role] = state_dict[param.name].to(dtype)
    return roles


def _linear(x, weights, weight_role, bias_role):
    y = x @ weights[weight_role].T
    if bias_role in weights:
        y = y + weights[bias_role]
    return y


def _convolve(spec, weights, packed, rounded):
    """Step 3: pad [q0 | k0] with T zero rows once, then every stage without further padding
    (cross-correlation: tap 0 multiplies the oldest row). `rounded` is applied to every stage's
    output (the kernels store each stage in the storage type)."""
    batch, seq_len, channels = packed.shape
    d = spec.head_dim
    rows = torch.nn.functional.pad(packed, (0, 0, spec.conv_history, 0))
    for index, stage in enumerate(spec.qk_conv):
        weight = weights[f"conv_weight:{index}"]  # [P, 1 or d, K]
        bias = weights[f"conv_bias:{index}"]
        out_rows = rows.shape[1] - stage.width + 1
        result = bias.expand(batch, out_rows, channels).clone()
        for tap in range(stage.width):
            window = rows[:, tap:tap + out_rows]
            if stage.kind == "depthwise":
                result += window * weight[:, 0, tap]
            else:
                heads = channels // d
                # weight[head * d + o, i, tap] mixes input channel i of the head into output o.
                per_head = weight[:, :, tap].reshape(heads, d, d)
                mixed = torch.einsum("bthi,hoi->btho", window.reshape(batch, out_rows, heads, d),
                                     per_head)
                result += mixed.reshape(batch, out_rows, channels)
        rows = rounded(result)
    return rows


def _rotate(heads, spec, positions):
    """Step 6 on the first r channels of every head of [B, S, H, d]."""
    rope = spec.rope
    r = rope.rotary_dim
    exponents = torch.arange(r // 2, dtype=torch.float64, device=heads.device) * (-2.0 / r)
    angles = positions.to(torch.float64)[:, None] * torch.pow(
        torch.tensor(rope.theta, dtype=torch.float64, device=heads.device), exponents)
    cos, sin = (f(angles).to(heads.dtype)[None, :, None, :] for f in (torch.cos, torch.sin))
    rotary = heads[..., :r]
    if rope.style == "neox":
        first, second = rotary[..., :r // 2], rotary[..., r // 2:]
    else:
        first, second = rotary[..., 0::2], rotary[..., 1::2]
    new_first = first * cos - second * sin
    new_second = second * cos + first * sin
    if rope.style == "neox":
        rotated = torch.cat([new_first, new_second], dim=-1)
    else:
        rotated = torch.stack([new_first, new_second], dim=-1).flatten(-2)
    return torch.cat([rotated, heads[..., r:]], dim=-1)


def _attend(spec, q, k, v, mask_kind, window):
    """Step 7 over query blocks: o [B, S, Hq, d] and lse [B, Hq, S]. Which keys each query sees
    comes from ccc.mask_rule (the rule written out from docs/language.md), not from the spec's
    block structure: (mask_kind, window) may be one of its deliberately wrong masks."""
    batch, seq_len, hq, d = q.shape
    hk, groups = spec.kv_heads, spec.groups
    # [B, Hk, G, S, d] queries against [B, Hk, S, d] keys and values: query head h reads h // G.
    q = q.permute(0, 2, 1, 3).reshape(batch, hk, groups, seq_len, d)
    k = k.permute(0, 2, 1, 3)
    v = v.permute(0, 2, 1, 3)
    o = torch.empty_like(q)
    lse = torch.empty(batch, hk, groups, seq_len, dtype=torch.float64, device=q.device)
    block = max(1, min(seq_len, LOGITS_BUDGET_BYTES // (8 * batch * hq * seq_len)))
    positions = torch.arange(seq_len, device=q.device)
    for start in range(0, seq_len, block):
        end = min(seq_len, start + block)
        key_start, key_end = block_key_range(mask_kind, window, start, end, seq_len)
        logits = spec.softmax_scale * torch.einsum(
            "bjgtd,bjsd->bjgts", q[:, :, :, start:end], k[:, :, key_start:key_end])
        # Per query row, its run [first, last] of allowed keys; -inf outside it (a row with no
        # key would give NaN, which no mask here produces).
        runs = [key_range(mask_kind, window, t, seq_len) or (seq_len, -1) for t in range(start, end)]
        first = torch.tensor([run[0] for run in runs], device=q.device)[:, None]
        last = torch.tensor([run[1] for run in runs], device=q.device)[:, None]
        j = positions[None, key_start:key_end]
        allowed = (j >= first) & (j <= last)
        if not bool(allowed.all()):
            logits = logits.masked_fill(~allowed, float("-inf"))
        block_lse = torch.logsumexp(logits, dim=-1)
        weights = torch.exp(logits - block_lse[..., None])
        o[:, :, :, start:end] = torch.einsum("bjgts,bjsd->bjgtd", weights,
                                             v[:, :, key_start:key_end])
        lse[:, :, :, start:end] = block_lse
    o = o.reshape(batch, hq, seq_len, d).permute(0, 2, 1, 3)
    return o, lse.reshape(batch, hq, seq_len)


def _attend_sdpa(spec, q, k, v, mask_kind, window):
    """Step 7 as a PyTorch user writes it in 16 bits: SDPA over the kv heads repeated per group,
    the mask from ccc.mask_rule as a boolean matrix (is_causal where it is the causal one).
    o [B, S, Hq, d]; no lse."""
    seq_len = q.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    k, v = (t.repeat_interleave(spec.groups, dim=1) for t in (k, v))
    allowed = None
    if mask_kind not in ("none", "causal"):
        runs = [key_range(mask_kind, window, t, seq_len) or (seq_len, -1) for t in range(seq_len)]
        first = torch.tensor([run[0] for run in runs], device=q.device)[:, None]
        last = torch.tensor([run[1] for run in runs], device=q.device)[:, None]
        j = torch.arange(seq_len, device=q.device)[None]
        allowed = (j >= first) & (j <= last)
    o = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=allowed, is_causal=mask_kind == "causal", scale=spec.softmax_scale)
    return o.transpose(1, 2), None


STORAGE_DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16}


def storage_rounding(storage_dtype):
    """The function that rounds a float64 tensor to `storage_dtype` ("bf16", "f16" or None) and
    widens it back to float64, round to nearest even as the kernels' cvt.rn does; the identity
    for None. (torch goes from float64 through float32 on the way, a double rounding that the
    kernels' f32 values also take.)"""
    if storage_dtype is None:
        return lambda tensor: tensor
    dtype = STORAGE_DTYPES[storage_dtype]
    return lambda tensor: tensor.to(dtype).to(torch.float64)


def reference_attention(spec, q, k, v, mask=None):
    """Step 7 alone, in float64, on given q [B, S, Hq, d], k and v [B, S, Hk, d] (e.g. the
    kernels' own q̃, k̃ and v, so that only the attention kernel's arithmetic is compared):
    (o [B, S, Hq, d], lse [B, Hq, S]). mask: (kind, window) as for reference_forward."""
    if mask is None:
        mask = (spec.mask.kind, spec.mask.window)
    q, k, v = (t.to(torch.float64) for t in (q, k, v))
    return _attend(spec, q, k, v, *mask)


def reference_forward(spec, state_dict, x, storage_dtype=None, mask=None, round_before_rope=True,
                      compute_dtype=torch.float64):
    """The layer on x [B, S, E] in float64 on x's device. Returns a dict with out [B, S, E],
    q [B, S, Hq, d], k [B, S, Hk, d], v [B, S, Hk, d], o [B, S, Hq, d] and lse [B, Hq, S], all
    float64 (the names of docs/manifest.md).

    storage_dtype ("bf16" or "f16"; None: exact float64 throughout) rounds where the GPU
    kernels store a tensor in the storage type (docs/architecture.md, src/codegen/hopper/
    prologue.rs's "Numerics"), and nowhere else:
    - the projections q0, k0 (`p0`, or q and k directly when there is no prologue) and v;
    - the output of every convolution stage;
    - with RoPE and round_before_rope, the head after the q-k mean and the norm, before the
      rotation, and q and k after it (the `q`, `k` stores). The two prologues differ here: the
      Hopper one (head_dim 64, 128) always rotates the rounded head; the kernel-IR one rotates
      it in f32 unless the spec has convolutions (then its staging buffer is the storage-typed
      conv buffer). It only matters with a q-k mean or norm and no convolution, where
      validate.py tries both;
    - o (stored by the attention kernel, read by the output projection) and out.
    Inside the attention the kernels also round P to the storage type before P·V, against a
    running row maximum that depends on their key tiles; that is not modelled (it is the main
    reason o and out keep an error of about the storage precision). lse stays float64 (the
    kernels keep it in f32).

    mask: (kind, window) from ccc.mask_rule instead of the spec's mask, for the deliberately
    wrong masks of validate.py's self-check.

    compute_dtype torch.bfloat16 or torch.float16 (with storage_dtype None) runs the same steps in
    that type, step 7 through SDPA, lse None: PyTorch's own 16-bit autograd of the layer, the
    peer whose gradient error bench/layer_backward.py holds ours to."""
    rounded = storage_rounding(storage_dtype)
    if mask is None:
        mask = (spec.mask.kind, spec.mask.window)
    weights = _params_by_role(spec, {n: t.to(x.device) for n, t in state_dict.items()}, compute_dtype)
    x = x.to(compute_dtype)
    batch, seq_len, _ = x.shape
    hq, hk, d = spec.query_heads, spec.kv_heads, spec.head_dim

    # Steps 1 and 2.
    q0 = rounded(_linear(x, weights, "query_proj", "query_bias"))
    k0 = rounded(_linear(x, weights, "key_proj", "key_bias"))
    values = []
    if "value_proj_current" in weights:
        values.append(_linear(x, weights, "value_proj_current", "value_bias_current"))
    if "value_proj_delayed" in weights:
        previous = torch.nn.functional.pad(x[:, :-1], (0, 0, 1, 0))
        values.append(_linear(previous, weights, "value_proj_delayed", "value_bias_delayed"))
    v = rounded(torch.cat(values, dim=-1).view(batch, seq_len, hk, d))

    # Step 3.
    packed = torch.cat([q0, k0], dim=-1)
    convolved = _convolve(spec, weights, packed, rounded) if spec.qk_conv else packed
    q = convolved[..., :spec.q_width].reshape(batch, seq_len, hq, d)
    k = convolved[..., spec.q_width:].reshape(batch, seq_len, hk, d)

    # Step 4.
    if spec.qk_mean:
        q0_heads = q0.view(batch, seq_len, hq, d)
        k0_heads = k0.view(batch, seq_len, hk, d)
        q = q + 0.5 * q0_heads + 0.5 * k0_heads.repeat_interleave(spec.groups, dim=2)
        k = k + 0.5 * k0_heads + 0.5 * q0_heads.view(batch, seq_len, hk, spec.groups, d).mean(3)

    # Step 5.
    if spec.qk_norm == "l2":
        if spec.key_temperature == "learned":
            tau = weights["key_temperature"]
        elif spec.key_temperature == "learned_exp":
            tau = weights["key_temperature"].clamp(1e-7, 2.0).exp()
        else:
            tau = torch.ones(hk, dtype=compute_dtype, device=x.device)

        def normalise(heads, scale):
            return heads * (scale / torch.sqrt((heads * heads).sum(-1, keepdim=True)
                                               + spec.norm_eps))

        q = normalise(q, d**0.5)
        k = normalise(k, d**0.5 * tau[None, None, :, None])

    # Step 6.
    if spec.rope is not None:
        positions = torch.arange(seq_len, device=x.device)
        before = rounded if round_before_rope else (lambda tensor: tensor)
        q = _rotate(before(q), spec, positions)
        k = _rotate(before(k), spec, positions)
    q, k = rounded(q), rounded(k)

    # Steps 7 and 8.
    attend = _attend if compute_dtype == torch.float64 else _attend_sdpa
    o, lse = attend(spec, q, k, v, *mask)
    o = rounded(o)
    out = rounded(_linear(o.reshape(batch, seq_len, spec.q_width), weights, "output_proj",
                          "output_bias"))
    return {"out": out, "q": q, "k": k, "v": v, "o": o, "lse": lse}


def relative_l2(actual, expected):
    """‖actual − expected‖ / ‖expected‖ in float64 (inf when actual has NaN or inf)."""
    actual = actual.to(torch.float64)
    expected = expected.to(torch.float64)
    if not torch.isfinite(actual).all():
        return float("inf")
    return (torch.linalg.vector_norm(actual - expected)
            / torch.linalg.vector_norm(expected).clamp_min(1e-300)).item()


def reference_gradients(spec, state_dict, x, dout, compute_dtype=torch.float64):
    """dx and every weight's gradient (by the state dict's names) of autograd through
    `reference_forward` computed in `compute_dtype`, for L = sum(out · dout): the exact gradients
    in float64; in bfloat16 or float16, PyTorch's own 16-bit autograd of the same layer."""
    leaves = {name: w.detach().to(compute_dtype).requires_grad_() for name, w in state_dict.items()}
    x_leaf = x.detach().to(compute_dtype).requires_grad_()
    out = reference_forward(spec, leaves, x_leaf, compute_dtype=compute_dtype)["out"]
    grads = torch.autograd.grad(out, [x_leaf, *leaves.values()], dout.to(compute_dtype))
    return {"dx": grads[0], **dict(zip(leaves, grads[1:]))}


def gradient_error(actual, exact, peer):
    """(error, bound) of one 16-bit gradient against the exact one, a peer's 16-bit gradient of the
    same setting the bound: the relative L2 error, within 1.5× the peer's + 1e-3; for a gradient
    that is zero in exact arithmetic (a key bias's: no relative error exists) the RMS, within 1.5×
    the peer's RMS + 1e-4 (both are rounding noise)."""
    actual, peer = (t.to(torch.float64).reshape(exact.shape) for t in (actual, peer))
    rms = lambda t: (torch.linalg.vector_norm(t) / t.numel() ** 0.5).item()  # noqa: E731
    if rms(exact.to(torch.float64)) < 1e-12:
        error = rms(actual) if torch.isfinite(actual).all() else float("inf")
        return error, 1.5 * rms(peer) + 1e-4
    return relative_l2(actual, exact), 1.5 * relative_l2(peer, exact) + 1e-3
