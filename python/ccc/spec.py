"""The attention layer a library implements: the manifest's `spec` object (serde form of
`AttentionSpec` in src/spec.rs), parsed and checked, with the derived sizes and the Hugging Face
parameter list (`params()`) that the Rust side computes, so that the Python loader can check a
manifest's weights and build references without the compiler."""

import math
from dataclasses import dataclass

from .errors import ManifestError

CONV_KINDS = ("depthwise", "per_head")
QK_NORMS = ("none", "l2")
KEY_TEMPERATURES = ("none", "learned", "learned_exp")
ROPE_STYLES = ("neox", "interleaved")
DTYPES = ("bf16", "f16")
ENTRY_POINTS = ("forward", "backward", "decode")


@dataclass(frozen=True)
class ConvStage:
    kind: str
    width: int


@dataclass(frozen=True)
class Rope:
    fraction: float
    rotary_dim: int
    theta: float
    style: str


@dataclass(frozen=True)
class Mask:
    """kind "none", "causal" or "sliding_window" (then `window` keys, the query's own included)."""

    kind: str
    window: int = 0

    def __str__(self):
        return f"sliding_window({self.window})" if self.kind == "sliding_window" else self.kind


@dataclass(frozen=True)
class Param:
    """One learned tensor: Hugging Face state-dict name, PyTorch shape, role (as in src/spec.rs
    `ParamRole`, snake_case; conv roles carry their stage: `conv_weight:0`)."""

    name: str
    shape: tuple
    role: str


@dataclass(frozen=True)
class Spec:
    name: str
    model_dim: int
    head_dim: int
    query_heads: int
    kv_heads: int
    qk_conv: tuple
    qk_mean: bool
    value_shift: int
    qk_norm: str
    key_temperature: str
    rope: object  # Rope or None
    mask: Mask
    softmax_scale: float
    norm_eps: float
    dtype: str
    bias: bool
    deterministic: bool  # absent from manifests written before the key existed: False
    entry_points: tuple
    tune: object  # dict or None

    @property
    def groups(self):
        return self.query_heads // self.kv_heads

    @property
    def q_width(self):
        return self.query_heads * self.head_dim

    @property
    def kv_width(self):
        return self.kv_heads * self.head_dim

    @property
    def packed_width(self):
        return self.q_width + self.kv_width

    @property
    def conv_history(self):
        return sum(stage.width - 1 for stage in self.qk_conv)

    def library_entry_points(self):
        """The entry points a library of this spec has: the emit list, with `prefill` after
        `decode` (AttentionSpec::library_entry_points)."""
        return tuple(self.entry_points) + (("prefill",) if "decode" in self.entry_points else ())

    @property
    def current_value_heads(self):
        return self.kv_heads - self.value_shift

    def has_cca_parts(self):
        return bool(self.qk_conv or self.qk_mean or self.value_shift > 0
                    or self.qk_norm != "none" or self.key_temperature != "none")

    def conv_stage_names(self):
        """ZAYA1's names for the first stage of each kind, `_1`, `_2`, ... for later ones."""
        counts = {"depthwise": 0, "per_head": 0}
        base = {"depthwise": "conv_qk_depthwise", "per_head": "conv_qk_grouped"}
        names = []
        for stage in self.qk_conv:
            count = counts[stage.kind]
            names.append(base[stage.kind] if count == 0 else f"{base[stage.kind]}_{count}")
            counts[stage.kind] += 1
        return names

    def params(self):
        """Every learned tensor in the order of `AttentionSpec::params()`: ZayaAttention's names for
        specs with CCA parts (under `qkv_proj.`), LlamaAttention's for plain ones."""
        e, d = self.model_dim, self.head_dim
        prefix = "qkv_proj." if self.has_cca_parts() else ""
        out = []

        def push(name, shape, role, prefixed=True):
            out.append(Param((prefix if prefixed else "") + name, tuple(shape), role))

        push("q_proj.weight", (self.q_width, e), "query_proj")
        if self.bias:
            push("q_proj.bias", (self.q_width,), "query_bias")
        push("k_proj.weight", (self.kv_width, e), "key_proj")
        if self.bias:
            push("k_proj.bias", (self.kv_width,), "key_bias")
        current, delayed = self.current_value_heads * d, self.value_shift * d
        if self.value_shift == 0:
            push("v_proj.weight", (current, e), "value_proj_current")
            if self.bias:
                push("v_proj.bias", (current,), "value_bias_current")
        else:
            if current > 0:
                push("v_proj_current.weight", (current, e), "value_proj_current")
                if self.bias:
                    push("v_proj_current.bias", (current,), "value_bias_current")
            push("v_proj_delayed.weight", (delayed, e), "value_proj_delayed")
            if self.bias:
                push("v_proj_delayed.bias", (delayed,), "value_bias_delayed")
        for index, (stage, name) in enumerate(zip(self.qk_conv, self.conv_stage_names())):
            in_per_group = 1 if stage.kind == "depthwise" else d
            push(f"{name}.weight", (self.packed_width, in_per_group, stage.width),
                 f"conv_weight:{index}")
            push(f"{name}.bias", (self.packed_width,), f"conv_bias:{index}")
        if self.key_temperature != "none":
            push("qk_norm.temp", (self.kv_heads,), "key_temperature", prefixed=False)
        push("o_proj.weight", (e, self.q_width), "output_proj", prefixed=False)
        if self.bias:
            push("o_proj.bias", (e,), "output_bias", prefixed=False)
        return out

    def param_name(self, role):
        return next((p.name for p in self.params() if p.role == role), None)

    def validate(self):
        """The invariants of `AttentionSpec::validate`; raises ManifestError naming the rule."""
        def fail(message):
            raise ManifestError(f"manifest spec is invalid: {message}")

        if min(self.model_dim, self.head_dim, self.query_heads, self.kv_heads) <= 0:
            fail("model_dim, head_dim, query_heads and kv_heads must be positive")
        if self.model_dim % self.head_dim:
            fail(f"model_dim {self.model_dim} is not a multiple of head_dim {self.head_dim}")
        if self.query_heads % self.kv_heads:
            fail(f"query_heads {self.query_heads} is not a multiple of kv_heads {self.kv_heads}")
        if self.value_shift > self.kv_heads:
            fail(f"value_shift {self.value_shift} exceeds kv_heads {self.kv_heads}")
        if any(stage.width == 0 for stage in self.qk_conv):
            fail("convolution widths must be positive")
        if self.key_temperature != "none" and self.qk_norm != "l2":
            fail("key_temperature needs qk_norm = l2")
        if self.rope is not None:
            r = self.rope.rotary_dim
            if r == 0 or r % 2 or r > self.head_dim:
                fail(f"rotary width {r} must be even, positive and at most head_dim")
            if not (math.isfinite(self.rope.theta) and self.rope.theta > 0):
                fail("rope theta must be positive and finite")
        if self.mask.kind == "sliding_window" and self.mask.window == 0:
            fail("sliding window must be positive")
        if not (math.isfinite(self.softmax_scale) and self.softmax_scale > 0):
            fail("softmax_scale must be positive and finite")
        if not (math.isfinite(self.norm_eps) and self.norm_eps >= 0):
            fail("norm_eps must be finite and not negative")
        if not self.entry_points:
            fail("at least one entry point must be emitted")


def _field(obj, key, kind, where):
    if key not in obj:
        raise ManifestError(f"malformed manifest: {where}: missing field `{key}`")
    value = obj[key]
    ok = {
        "uint": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
        "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": lambda v: isinstance(v, bool),
        "str": lambda v: isinstance(v, str),
        "list": lambda v: isinstance(v, list),
        "object": lambda v: isinstance(v, dict),
    }[kind](value)
    if not ok:
        raise ManifestError(f"malformed manifest: {where}.{key}: expected {kind}, got {value!r}")
    return value


def _choice(value, choices, where):
    if value not in choices:
        raise ManifestError(f"malformed manifest: {where}: unknown variant {value!r}, "
                            f"expected one of {', '.join(choices)}")
    return value


def _parse_mask(value, where):
    if value in ("none", "causal"):
        return Mask(value)
    if isinstance(value, dict) and list(value) == ["sliding_window"] and isinstance(
            value["sliding_window"], dict):
        window = _field(value["sliding_window"], "window", "uint", f"{where}.sliding_window")
        return Mask("sliding_window", window)
    raise ManifestError(f"malformed manifest: {where}: expected \"none\", \"causal\" or "
                        f"{{\"sliding_window\": {{\"window\": W}}}}, got {value!r}")


def parse_spec(obj, where="spec"):
    """Parses and validates the serde form of `AttentionSpec` (as `ccc compile` writes spec.json and
    the manifest's `spec`). Unknown keys are ignored, as serde does for this struct."""
    if not isinstance(obj, dict):
        raise ManifestError(f"malformed manifest: {where}: expected an object")
    stages = []
    for index, stage in enumerate(_field(obj, "qk_conv", "list", where)):
        stage_where = f"{where}.qk_conv[{index}]"
        if not isinstance(stage, dict):
            raise ManifestError(f"malformed manifest: {stage_where}: expected an object")
        stages.append(ConvStage(
            _choice(_field(stage, "kind", "str", stage_where), CONV_KINDS, f"{stage_where}.kind"),
            _field(stage, "width", "uint", stage_where)))
    rope = obj.get("rope")
    if rope is not None:
        rope_where = f"{where}.rope"
        if not isinstance(rope, dict):
            raise ManifestError(f"malformed manifest: {rope_where}: expected an object or null")
        rope = Rope(
            float(_field(rope, "fraction", "float", rope_where)),
            _field(rope, "rotary_dim", "uint", rope_where),
            float(_field(rope, "theta", "float", rope_where)),
            _choice(_field(rope, "style", "str", rope_where), ROPE_STYLES, f"{rope_where}.style"))
    tune = obj.get("tune")
    if tune is not None and not isinstance(tune, dict):
        raise ManifestError(f"malformed manifest: {where}.tune: expected an object or null")
    entries = _field(obj, "entry_points", "list", where)
    for index, entry in enumerate(entries):
        _choice(entry, ENTRY_POINTS, f"{where}.entry_points[{index}]")
    spec = Spec(
        name=_field(obj, "name", "str", where),
        model_dim=_field(obj, "model_dim", "uint", where),
        head_dim=_field(obj, "head_dim", "uint", where),
        query_heads=_field(obj, "query_heads", "uint", where),
        kv_heads=_field(obj, "kv_heads", "uint", where),
        qk_conv=tuple(stages),
        qk_mean=_field(obj, "qk_mean", "bool", where),
        value_shift=_field(obj, "value_shift", "uint", where),
        qk_norm=_choice(_field(obj, "qk_norm", "str", where), QK_NORMS, f"{where}.qk_norm"),
        key_temperature=_choice(_field(obj, "key_temperature", "str", where), KEY_TEMPERATURES,
                                f"{where}.key_temperature"),
        rope=rope,
        mask=_parse_mask(obj.get("mask"), f"{where}.mask"),
        softmax_scale=float(_field(obj, "softmax_scale", "float", where)),
        norm_eps=float(_field(obj, "norm_eps", "float", where)),
        dtype=_choice(_field(obj, "dtype", "str", where), DTYPES, f"{where}.dtype"),
        bias=_field(obj, "bias", "bool", where),
        deterministic=_field(obj, "deterministic", "bool", where) if "deterministic" in obj else False,
        entry_points=tuple(entries),
        tune=tune,
    )
    spec.validate()
    return spec
