"""The layer of docs/language.md (Semantics, steps 1 to 8) in torch float64, for validating GPU
libraries at sequence lengths where the Rust f64 reference (src/reference) is too slow.

Written from the semantics, not from the Hugging Face module it is checked against: explicit
convolution taps over T zero rows padded once, the q-k mean, the L2 norm with eps inside the square
root, RoPE angles computed in float64, and attention in query blocks so that memory stays bounded
at 32k tokens. Every tensor comes back in the layout of the manifest's named buffers."""

import torch

# Logits of one query block are at most this many bytes (float64).
LOGITS_BUDGET_BYTES = 2 << 30


def _params_by_role(spec, state_dict):
    roles = {}
    for param in spec.params():
        if param.name not in state_dict:
            raise KeyError(f"the state dict lacks `{param.name}`")
        roles[param.role] = state_dict[param.name].to(torch.float64)
    return roles


def _linear(x, weights, weight_role, bias_role):
    y = x @ weights[weight_role].T
    if bias_role in weights:
        y = y + weights[bias_role]
    return y


def _convolve(spec, weights, packed):
    """Step 3: pad [q0 | k0] with T zero rows once, then every stage without further padding
    (cross-correlation: tap 0 multiplies the oldest row)."""
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
        rows = result
    return rows


def _rotate(heads, spec, positions):
    """Step 6 on the first r channels of every head of [B, S, H, d]."""
    rope = spec.rope
    r = rope.rotary_dim
    exponents = torch.arange(r // 2, dtype=torch.float64, device=heads.device) * (-2.0 / r)
    angles = positions.to(torch.float64)[:, None] * torch.pow(
        torch.tensor(rope.theta, dtype=torch.float64, device=heads.device), exponents)
    cos, sin = angles.cos()[None, :, None, :], angles.sin()[None, :, None, :]
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


def _attend(spec, q, k, v):
    """Step 7 over query blocks: o [B, S, Hq, d] and lse [B, Hq, S]."""
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
    mask = spec.mask
    for start in range(0, seq_len, block):
        end = min(seq_len, start + block)
        key_start = 0
        key_end = seq_len if mask.kind == "none" else end
        if mask.kind == "sliding_window":
            key_start = max(0, start - mask.window + 1)
        logits = spec.softmax_scale * torch.einsum(
            "bjgtd,bjsd->bjgts", q[:, :, :, start:end], k[:, :, key_start:key_end])
        if mask.kind != "none":
            t = positions[start:end, None]
            j = positions[None, key_start:key_end]
            allowed = j <= t
            if mask.kind == "sliding_window":
                allowed &= (t - j) < mask.window
            logits = logits.masked_fill(~allowed, float("-inf"))
        block_lse = torch.logsumexp(logits, dim=-1)
        weights = torch.exp(logits - block_lse[..., None])
        o[:, :, :, start:end] = torch.einsum("bjgts,bjsd->bjgtd", weights,
                                             v[:, :, key_start:key_end])
        lse[:, :, :, start:end] = block_lse
    o = o.reshape(batch, hq, seq_len, d).permute(0, 2, 1, 3)
    return o, lse.reshape(batch, hq, seq_len)


def reference_forward(spec, state_dict, x):
    """The layer on x [B, S, E] in float64 on x's device. Returns a dict with out [B, S, E],
    q [B, S, Hq, d], k [B, S, Hk, d], v [B, S, Hk, d], o [B, S, Hq, d] and lse [B, Hq, S], all
    float64 (the names of docs/manifest.md)."""
    weights = _params_by_role(spec, {n: t.to(x.device) for n, t in state_dict.items()})
    x = x.to(torch.float64)
    batch, seq_len, _ = x.shape
    hq, hk, d = spec.query_heads, spec.kv_heads, spec.head_dim

    # Steps 1 and 2.
    q0 = _linear(x, weights, "query_proj", "query_bias")
    k0 = _linear(x, weights, "key_proj", "key_bias")
    values = []
    if "value_proj_current" in weights:
        values.append(_linear(x, weights, "value_proj_current", "value_bias_current"))
    if "value_proj_delayed" in weights:
        previous = torch.nn.functional.pad(x[:, :-1], (0, 0, 1, 0))
        values.append(_linear(previous, weights, "value_proj_delayed", "value_bias_delayed"))
    v = torch.cat(values, dim=-1).view(batch, seq_len, hk, d)

    # Step 3.
    packed = torch.cat([q0, k0], dim=-1)
    convolved = _convolve(spec, weights, packed) if spec.qk_conv else packed
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
            tau = torch.ones(hk, dtype=torch.float64, device=x.device)

        def normalise(heads, scale):
            return heads * (scale / torch.sqrt((heads * heads).sum(-1, keepdim=True)
                                               + spec.norm_eps))

        q = normalise(q, d**0.5)
        k = normalise(k, d**0.5 * tau[None, None, :, None])

    # Step 6.
    if spec.rope is not None:
        positions = torch.arange(seq_len, device=x.device)
        q = _rotate(q, spec, positions)
        k = _rotate(k, spec, positions)

    # Steps 7 and 8.
    o, lse = _attend(spec, q, k, v)
    out = _linear(o.reshape(batch, seq_len, spec.q_width), weights, "output_proj", "output_bias")
    return {"out": out, "q": q, "k": k, "v": v, "o": o, "lse": lse}


def relative_l2(actual, expected):
    """‖actual − expected‖ / ‖expected‖ in float64 (inf when actual has NaN or inf)."""
    actual = actual.to(torch.float64)
    expected = expected.to(torch.float64)
    if not torch.isfinite(actual).all():
        return float("inf")
    return (torch.linalg.vector_norm(actual - expected)
            / torch.linalg.vector_norm(expected).clamp_min(1e-300)).item()
