//! Syntax tree → `AttentionSpec`: gives meaning to every item, resolves every derived value
//! (heads from `compression`/`groups`, rotary width, default scale) and reports every broken rule
//! of docs/language.md with the span it is about. Errors are collected, not returned at the first.

use std::collections::HashMap;

use super::ast::{Argument, Block, File, Ident, Item, ItemKind, Span, Value, ValueKind};
use super::diagnostics::Error;
use super::number::{self, Number};
use super::suggest::did_you_mean;
use crate::spec::{
    AttentionSpec, ConvKind, ConvStage, DType, EntryPoint, KeyTemperature, Mask, Mla, QkNorm, Rope,
    RopeStyle, TuneShape, Yarn,
};

/// Bound on every dimension and head count (E, d, Hq, Hk, convolution widths, batch).
pub const MAX_DIM: u64 = 1 << 20;
/// Bound on the channel widths Lq = Hq·d and Lk = Hk·d.
pub const MAX_WIDTH: u64 = 1 << 24;
/// Bound on sequence lengths (`sliding_window`, `tune.seq_len`, `tune.kv_len`).
pub const MAX_SEQUENCE: u64 = 1 << 30;
/// Bound on the layer's learned scalars. With it every tensor size, and every later product of a
/// few of these sizes in 64 bits, stays far from overflowing.
pub const MAX_PARAMS: u64 = 1 << 40;

const BLOCK_KEYS: &[&str] = &[
    "model_dim",
    "head_dim",
    "query_heads",
    "compression",
    "kv_heads",
    "groups",
    "qk_conv",
    "qk_mean",
    "value_shift",
    "qk_norm",
    "key_temperature",
    "rope",
    "mask",
    "softmax_scale",
    "norm_eps",
    "dtype",
    "bias",
    "deterministic",
    "emit",
    "tune",
    "mla",
];
const MLA_KEYS: &[&str] = &["kv_rank", "q_rank", "rope_dim", "nope_dim", "v_dim", "rms_eps"];
/// Items of an attention block that an MLA layer does not take: its head widths come from the
/// `mla` block, it has one key/value head per query head, and CCA's parts act on latent heads
/// of one width, which MLA's queries, keys and values do not share.
const NOT_WITH_MLA: &[(&str, &str)] = &[
    ("head_dim", "MLA's query/key width is nope_dim + rope_dim and its value width v_dim"),
    ("kv_heads", "MLA has one key/value head per query head"),
    ("groups", "MLA has one key/value head per query head"),
    ("compression", "give MLA's `query_heads`"),
    ("qk_conv", "CCA's convolutions do not apply to MLA"),
    ("qk_mean", "CCA's q-k mean does not apply to MLA"),
    ("value_shift", "CCA's value shift does not apply to MLA"),
    ("qk_norm", "MLA normalises its latents (RMSNorm, `rms_eps` in `mla`), not q and k"),
    ("key_temperature", "MLA has no key temperature"),
    ("norm_eps", "MLA's RMSNorm takes `rms_eps` in the `mla` block"),
];
const ROPE_KEYS: &[&str] = &["fraction", "theta", "style", "yarn"];
const YARN_ARGUMENTS: &[&str] = &["factor", "original_positions", "beta_fast", "beta_slow", "mscale", "mscale_all_dim"];
const TUNE_KEYS: &[&str] = &["batch", "seq_len", "kv_len"];
const STAGES: &[&str] = &["depthwise", "per_head"];

/// Checks every block of a parsed file. `Err` holds every error found, in source order.
/// `whole_file` is false when some blocks did not parse: then an empty `file` is no error of its own.
pub fn check(
    file: &File,
    source: &str,
    whole_file: bool,
) -> Result<Vec<AttentionSpec>, Vec<Error>> {
    let mut checker = Checker { errors: Vec::new() };
    if file.blocks.is_empty() && whole_file {
        let end = source.len();
        checker.errors.push(
            Error::new(Span::new(end, end), "no `attention` blocks in this file")
                .label("expected `attention NAME { ... }`")
                .help("a `.attn` file holds one or more blocks such as `attention mha { model_dim = 2048, head_dim = 128 }`"),
        );
    }
    let mut first_block_named: HashMap<&str, &Ident> = HashMap::new();
    let mut specs = Vec::new();
    for block in &file.blocks {
        if let Some(first) = first_block_named.get(block.name.text.as_str()) {
            checker.errors.push(
                Error::new(block.name.span, format!("duplicate block name `{}`", block.name.text))
                    .label("second block with this name")
                    .related(first.span, "first defined here")
                    .note("the block name prefixes every kernel symbol, so it must be unique in the file"),
            );
        } else {
            first_block_named.insert(&block.name.text, &block.name);
        }
        if let Some(spec) = checker.block(block) {
            debug_assert!(
                spec.validate().is_ok(),
                "checker accepted an invalid spec: {:?}",
                spec.validate()
            );
            specs.push(spec);
        }
    }
    if checker.errors.is_empty() {
        Ok(specs)
    } else {
        checker.errors.sort_by_key(|error| (error.span.start, error.span.end));
        Err(checker.errors)
    }
}

struct Checker {
    errors: Vec<Error>,
}

/// A value that was given, with where it was written.
#[derive(Clone, Copy)]
struct Given<T> {
    value: T,
    span: Span,
}

/// The items of [`Checker::shared_items`]; `softmax_scale` none when not given.
struct SharedItems {
    mask: Mask,
    softmax_scale: Option<f64>,
    dtype: DType,
    bias: bool,
    deterministic: bool,
    entry_points: Vec<EntryPoint>,
    tune: Option<TuneShape>,
}

impl SharedItems {
    /// `spec` with these items; a given softmax_scale replaces its default.
    fn onto(self, spec: AttentionSpec) -> AttentionSpec {
        AttentionSpec {
            mask: self.mask,
            softmax_scale: self.softmax_scale.unwrap_or(spec.softmax_scale),
            dtype: self.dtype,
            bias: self.bias,
            deterministic: self.deterministic,
            entry_points: self.entry_points,
            tune: self.tune,
            ..spec
        }
    }
}

impl Checker {
    fn error(&mut self, error: Error) {
        self.errors.push(error);
    }

    /// Checks one block; `None` when it has errors (they are recorded).
    fn block(&mut self, block: &Block) -> Option<AttentionSpec> {
        let errors_before = self.errors.len();
        let items = self.index_items(&block.items, BLOCK_KEYS, "an attention block");
        if let Some(mla) = items.get("mla") {
            return self.mla_layer(block, &items, mla, errors_before);
        }

        let model_dim = self.required_size(
            &items,
            block,
            "model_dim",
            "2048",
            "the width of the layer's input and output",
        );
        let head_dim =
            self.required_size(&items, block, "head_dim", "128", "the width of one head");
        let heads = self.heads(&items, model_dim, head_dim);

        let qk_conv = match items.get("qk_conv") {
            Some(item) => self.conv_stages(item),
            None => Some(Vec::new()),
        };
        let qk_mean = self.optional(&items, "qk_mean", false, |c, v| c.boolean(v, "qk_mean"));
        let value_shift =
            self.optional_given(&items, "value_shift", |c, v| c.count(v, "value_shift", MAX_DIM));
        let qk_norm = self.optional_given(&items, "qk_norm", |c, v| {
            c.choice(v, "qk_norm", &[("none", QkNorm::None), ("l2", QkNorm::L2)])
        });
        let key_temperature = self.optional_given(&items, "key_temperature", |c, v| {
            c.choice(
                v,
                "key_temperature",
                &[
                    ("none", KeyTemperature::None),
                    ("learned", KeyTemperature::Learned),
                    ("learned_exp", KeyTemperature::LearnedExp),
                ],
            )
        });
        let rope = match items.get("rope") {
            Some(item) => self.rope(item, head_dim).map(Some),
            None => Some(None),
        };
        let norm_eps =
            self.optional(&items, "norm_eps", 1e-12, |c, v| c.non_negative_float(v, "norm_eps"));
        let shared = self.shared_items(&items);

        // Rules between items.
        let qk_norm_value = qk_norm.as_ref().map(|given| given.map_or(QkNorm::None, |g| g.value));
        if let (Some(Some(temperature)), Some(norm)) = (key_temperature, qk_norm_value)
            && temperature.value != KeyTemperature::None
            && norm != QkNorm::L2
        {
            let mut error = Error::new(temperature.span, "`key_temperature` needs `qk_norm = l2`")
                .label("a key temperature scales the L2-normalised keys");
            error = match items.get("qk_norm") {
                Some(norm_item) => {
                    error.related(norm_item.span, "the keys are not normalised here")
                }
                None => error.help("add `qk_norm = l2`, or remove `key_temperature`"),
            };
            self.error(error);
        }
        if let (Some(Some(shift)), Some((_, kv_heads))) = (value_shift, heads)
            && shift.value > kv_heads
        {
            self.error(
                    Error::new(shift.span, format!("value_shift {} is larger than kv_heads {kv_heads}", shift.value))
                        .label(format!("at most {kv_heads}"))
                        .note("value_shift counts the kv heads (the last ones) whose value comes from the previous token"),
                );
        }

        if self.errors.len() > errors_before {
            return None;
        }
        let (model_dim, head_dim) = (model_dim?.value, head_dim?.value);
        let (query_heads, kv_heads) = heads?;
        let plain = AttentionSpec::plain(&block.name.text, model_dim, head_dim, query_heads, kv_heads);
        let spec = AttentionSpec {
            qk_conv: qk_conv?,
            qk_mean: qk_mean?,
            value_shift: value_shift?.map_or(0, |g| g.value),
            qk_norm: qk_norm_value?,
            key_temperature: key_temperature?.map_or(KeyTemperature::None, |g| g.value),
            rope: rope?,
            norm_eps: norm_eps?,
            ..shared?.onto(plain)
        };
        self.check_totals(&spec, block)?;
        Some(spec)
    }

    /// The items every kind of layer takes besides its heads, RoPE and CCA parts.
    fn shared_items(&mut self, items: &HashMap<&str, &Item>) -> Option<SharedItems> {
        let mask = self.optional(items, "mask", Mask::Causal, |c, v| c.mask(v));
        let softmax_scale = self.optional_given(items, "softmax_scale", |c, v| {
            c.positive_float(v, "softmax_scale").map(|given| given.value)
        });
        let dtype = self.optional(items, "dtype", DType::Bf16, |c, v| {
            c.choice(v, "dtype", &[("bf16", DType::Bf16), ("f16", DType::F16)])
        });
        let bias = self.optional(items, "bias", false, |c, v| c.boolean(v, "bias"));
        let deterministic = self.optional(items, "deterministic", false, |c, v| c.boolean(v, "deterministic"));
        let entry_points = self.optional(items, "emit", vec![EntryPoint::Forward], |c, v| c.entry_points(v));
        let tune = match items.get("tune") {
            Some(item) => self.tune(item).map(Some),
            None => Some(None),
        };
        Some(SharedItems {
            mask: mask?,
            softmax_scale: softmax_scale?.map(|given| given.value),
            dtype: dtype?,
            bias: bias?,
            deterministic: deterministic?,
            entry_points: entry_points?,
            tune: tune?,
        })
    }

    /// A block with an `mla { ... }` item: multi-head latent attention (docs/language.md, "MLA").
    fn mla_layer(
        &mut self,
        block: &Block,
        items: &HashMap<&str, &Item>,
        mla_item: &Item,
        errors_before: usize,
    ) -> Option<AttentionSpec> {
        for (key, why) in NOT_WITH_MLA {
            if let Some(item) = items.get(key) {
                self.error(
                    Error::new(
                        item.key.span,
                        format!("`{key}` does not apply to an MLA layer"),
                    )
                    .label("not with `mla`")
                    .related(mla_item.key.span, "MLA layer because of this block")
                    .note(*why),
                );
            }
        }
        let model_dim = self.required_size(
            items,
            block,
            "model_dim",
            "7168",
            "the width of the layer's input and output",
        );
        let query_heads =
            self.required_size(items, block, "query_heads", "128", "the number of heads");
        let mla = self.mla(mla_item);
        let rope = match items.get("rope") {
            Some(item) => self.mla_rope(item, mla),
            None => {
                self.error(
                    Error::new(mla_item.key.span, "an MLA layer needs a `rope` block")
                        .label("its queries and keys carry rope_dim rotated channels")
                        .help("add `rope { theta = 10000, style = interleaved }` (DeepSeek-V3's)"),
                );
                None
            }
        };
        let shared = self.shared_items(items);
        if self.errors.len() > errors_before {
            return None;
        }
        let (mla, heads) = (mla?, query_heads?.value);
        let plain = AttentionSpec::plain(&block.name.text, model_dim?.value, mla.nope_dim + mla.rope_dim, heads, heads);
        // DeepSeek's MLA folds YaRN's mscale_all_dim into the logits' scale.
        let scale = plain.softmax_scale * rope.and_then(|rope| rope.yarn).map_or(1.0, |yarn| yarn.softmax_factor());
        let spec = AttentionSpec { rope, mla: Some(mla), ..shared?.onto(AttentionSpec { softmax_scale: scale, ..plain }) };
        self.check_totals(&spec, block)?;
        Some(spec)
    }

    /// The `mla { ... }` block's ranks and widths.
    fn mla(&mut self, item: &Item) -> Option<Mla> {
        let example = "kv_rank = 512, q_rank = 1536, rope_dim = 64, nope_dim = 128, v_dim = 128";
        let items = self.block_items(item, example)?;
        let items = self.index_items(items, MLA_KEYS, "`mla`");
        let required = |checker: &mut Self, key: &str, meaning: &str| match items.get(key) {
            Some(item) => {
                let value = checker.assigned(item)?;
                checker.size(value, key, MAX_DIM)
            }
            None => {
                checker.error(
                    Error::new(item.key.span, format!("`mla` has no `{key}`"))
                        .label(format!("`{key}` is required"))
                        .help(format!("add `{key}` ({meaning}); e.g. {example}")),
                );
                None
            }
        };
        let kv_rank = required(
            self,
            "kv_rank",
            "the key/value latent's width, what the cache keeps",
        );
        let rope_dim = required(
            self,
            "rope_dim",
            "the rotated channels at the end of each query and key head",
        );
        let nope_dim = required(
            self,
            "nope_dim",
            "each query and key head's channels without position",
        );
        let v_dim = required(self, "v_dim", "each value head's width");
        let q_rank = match items.get("q_rank") {
            None => Some(None),
            Some(item) => {
                let value = self.assigned(item)?;
                match &value.kind {
                    ValueKind::Name(name) if name == "none" => Some(None),
                    _ => self.size(value, "q_rank", MAX_DIM).map(Some),
                }
            }
        };
        let rms_eps = self.optional(&items, "rms_eps", 1e-6, |c, v| {
            c.non_negative_float(v, "rms_eps")
        });
        if let (Some(rope_dim), Some(item)) = (rope_dim, items.get("rope_dim"))
            && rope_dim % 2 != 0
        {
            self.error(
                Error::new(item.span, format!("rope_dim {rope_dim} is odd"))
                    .label("RoPE rotates pairs of channels")
                    .help(format!("rope_dim = {}", rope_dim + 1)),
            );
            return None;
        }
        Some(Mla {
            q_rank: q_rank?,
            kv_rank: kv_rank?,
            rope_dim: rope_dim?,
            nope_dim: nope_dim?,
            v_dim: v_dim?,
            rms_eps: rms_eps?,
        })
    }

    /// MLA's `rope { theta, style }`: it rotates the heads' last rope_dim channels, so no
    /// `fraction`.
    fn mla_rope(&mut self, item: &Item, mla: Option<Mla>) -> Option<Rope> {
        let items = self.block_items(item, "theta = 10000, style = interleaved")?;
        let items = self.index_items(items, ROPE_KEYS, "`rope`");
        if let Some(fraction) = items.get("fraction") {
            self.error(
                Error::new(
                    fraction.key.span,
                    "`fraction` does not apply to an MLA layer's RoPE",
                )
                .label("MLA rotates rope_dim channels")
                .help("set `rope_dim` in the `mla` block instead"),
            );
        }
        let rotation = self.rotation(&items);
        let (mla, (theta, style, yarn)) = (mla?, rotation?);
        let head_dim = mla.nope_dim + mla.rope_dim;
        Some(Rope { fraction: mla.rope_dim as f64 / head_dim as f64, rotary_dim: mla.rope_dim, theta, style, yarn })
    }

    /// A `rope` block's θ, style and YaRN scaling, which every layer's RoPE takes.
    fn rotation(&mut self, items: &HashMap<&str, &Item>) -> Option<(f64, RopeStyle, Option<Yarn>)> {
        let theta = self.optional(items, "theta", 10_000.0, |c, v| c.positive_float(v, "theta").map(|g| g.value));
        let style = self.optional(items, "style", RopeStyle::Neox, |c, v| {
            c.choice(v, "style", &[("neox", RopeStyle::Neox), ("interleaved", RopeStyle::Interleaved)])
        });
        let yarn = match items.get("yarn") {
            Some(item) => self.yarn(item).map(Some),
            None => Some(None),
        };
        Some((theta?, style?, yarn?))
    }

    /// Bounds on products of the sizes, checked once everything else is valid.
    fn check_totals(&mut self, spec: &AttentionSpec, block: &Block) -> Option<()> {
        let d = spec.head_dim as u64;
        for (heads, what) in [(spec.query_heads, "query_heads"), (spec.kv_heads, "kv_heads")] {
            let width = heads as u64 * d;
            if width > MAX_WIDTH {
                self.error(
                    Error::new(
                        block.name.span,
                        format!("{what} · head_dim = {heads} · {d} = {width} channels is too wide"),
                    )
                    .label("in this block")
                    .note(format!("at most {MAX_WIDTH} (2^24) channels per projection")),
                );
                return None;
            }
        }
        if spec.mla.is_some() {
            // Every dimension is at most 2^20, so each tensor's product fits; the sum in u128.
            let total: u128 = spec
                .params()
                .iter()
                .map(|p| p.shape.iter().map(|&n| n as u128).product::<u128>())
                .sum();
            if total > u128::from(MAX_PARAMS) {
                self.error(
                    Error::new(
                        block.name.span,
                        format!("this layer would have {total} parameters"),
                    )
                    .label("too large")
                    .note(format!(
                        "at most {MAX_PARAMS} (2^40) learned scalars per layer"
                    )),
                );
                return None;
            }
            return Some(());
        }
        // Same tensors as `AttentionSpec::params`, in u128 so that the sum itself cannot overflow.
        let (e, lq, lk) = (spec.model_dim as u128, spec.q_width() as u128, spec.kv_width() as u128);
        let packed = lq + lk;
        let mut total = 2 * e * lq + 2 * e * lk + u128::from(spec.bias) * (lq + 2 * lk + e);
        for stage in &spec.qk_conv {
            let inputs = stage.kind.inputs_per_output(spec.head_dim) as u128;
            total += packed * inputs * stage.width as u128 + packed;
        }
        total += spec.kv_heads as u128;
        if total > u128::from(MAX_PARAMS) {
            self.error(
                Error::new(block.name.span, format!("this layer would have {total} parameters"))
                    .label("too large")
                    .note(format!("at most {MAX_PARAMS} (2^40) learned scalars per layer")),
            );
            return None;
        }
        Some(())
    }

    /// Maps each known key to its first item; reports unknown and repeated keys.
    fn index_items<'a>(
        &mut self,
        items: &'a [Item],
        known: &[&str],
        context: &str,
    ) -> HashMap<&'a str, &'a Item> {
        let mut index: HashMap<&str, &Item> = HashMap::new();
        for item in items {
            let key = item.key.text.as_str();
            if !known.contains(&key) {
                let mut error =
                    Error::new(item.key.span, format!("unknown item `{key}` in {context}"))
                        .label("not a known item");
                if let Some(suggestion) = did_you_mean(key, known) {
                    error = error.help(format!("did you mean `{suggestion}`?"));
                } else if STAGES.contains(&key) && known == BLOCK_KEYS {
                    error = error.help(format!(
                        "convolution stages go inside `qk_conv {{ {key}(width = 2) }}`"
                    ));
                } else {
                    error = error.note(format!("known items: {}", known.join(", ")));
                }
                self.error(error);
                continue;
            }
            if let Some(first) = index.get(key) {
                self.error(
                    Error::new(item.key.span, format!("`{key}` is given twice"))
                        .label("given again here")
                        .related(first.key.span, "first given here")
                        .help("remove one of them"),
                );
                continue;
            }
            index.insert(key, item);
        }
        index
    }

    /// The value of a `key = value` item; reports an item written in another form.
    fn assigned<'a>(&mut self, item: &'a Item) -> Option<&'a Value> {
        match &item.kind {
            ItemKind::Assign(value) => Some(value),
            other => {
                let key = &item.key.text;
                self.error(
                    Error::new(item.span, format!("`{key}` takes a value, not {}", other.form()))
                        .label("written as a block or call")
                        .help(format!("write `{key} = ...`")),
                );
                None
            }
        }
    }

    /// The items of a `key { ... }` item; reports an item written in another form.
    fn block_items<'a>(&mut self, item: &'a Item, example: &str) -> Option<&'a [Item]> {
        match &item.kind {
            ItemKind::Block(items) => Some(items),
            other => {
                let key = &item.key.text;
                self.error(
                    Error::new(item.span, format!("`{key}` is a block, not {}", other.form()))
                        .label("expected `{ ... }`")
                        .help(format!("write `{key} {{ {example} }}`")),
                );
                None
            }
        }
    }

    /// `Some(default)` when absent, `Some(value)` when given and valid, `None` on an error.
    fn optional<T>(
        &mut self,
        items: &HashMap<&str, &Item>,
        key: &str,
        default: T,
        read: impl FnOnce(&mut Self, &Value) -> Option<T>,
    ) -> Option<T> {
        match items.get(key) {
            None => Some(default),
            Some(item) => {
                let value = self.assigned(item)?;
                read(self, value)
            }
        }
    }

    /// Like `optional` but keeps whether the item was given, and where.
    fn optional_given<T>(
        &mut self,
        items: &HashMap<&str, &Item>,
        key: &str,
        read: impl FnOnce(&mut Self, &Value) -> Option<T>,
    ) -> Option<Option<Given<T>>> {
        match items.get(key) {
            None => Some(None),
            Some(item) => {
                let value = self.assigned(item)?;
                let read_value = read(self, value)?;
                Some(Some(Given { value: read_value, span: value.span }))
            }
        }
    }

    fn required_size(
        &mut self,
        items: &HashMap<&str, &Item>,
        block: &Block,
        key: &str,
        example: &str,
        meaning: &str,
    ) -> Option<Given<usize>> {
        let Some(item) = items.get(key) else {
            self.error(
                Error::new(
                    block.name.span,
                    format!("attention block `{}` has no `{key}`", block.name.text),
                )
                .label(format!("`{key}` is required"))
                .help(format!("add `{key} = {example}` ({meaning})")),
            );
            return None;
        };
        let value = self.assigned(item)?;
        let size = self.size(value, key, MAX_DIM)?;
        Some(Given { value: size, span: value.span })
    }

    /// Resolves (Hq, Hk) from `query_heads`/`compression` and `kv_heads`/`groups`.
    fn heads(
        &mut self,
        items: &HashMap<&str, &Item>,
        model_dim: Option<Given<usize>>,
        head_dim: Option<Given<usize>>,
    ) -> Option<(usize, usize)> {
        // Both forms given: one error, then carry on with the explicit head count.
        for (explicit, derived) in [("query_heads", "compression"), ("kv_heads", "groups")] {
            if let (Some(a), Some(b)) = (items.get(explicit), items.get(derived)) {
                let (first, second) = if a.span.start < b.span.start { (a, b) } else { (b, a) };
                self.error(
                    Error::new(
                        second.key.span,
                        format!("give `{explicit}` or `{derived}`, not both"),
                    )
                    .label("second way of giving the same count")
                    .related(first.key.span, "already given here")
                    .help(format!("remove `{}`", second.key.text)),
                );
            }
        }
        let query_heads =
            self.optional_given(items, "query_heads", |c, v| c.size(v, "query_heads", MAX_DIM));
        let compression = if items.contains_key("query_heads") {
            Some(None)
        } else {
            self.optional_given(items, "compression", |c, v| c.size(v, "compression", MAX_DIM))
        };
        let kv_heads =
            self.optional_given(items, "kv_heads", |c, v| c.size(v, "kv_heads", MAX_DIM));
        let groups = if items.contains_key("kv_heads") {
            Some(None)
        } else {
            self.optional_given(items, "groups", |c, v| c.size(v, "groups", MAX_DIM))
        };

        let (model_dim, head_dim) = (model_dim?, head_dim?);
        let (e, d) = (model_dim.value, head_dim.value);
        if e % d != 0 {
            self.error(
                Error::new(
                    head_dim.span,
                    format!("model_dim {e} is not a multiple of head_dim {d}"),
                )
                .label(format!("does not divide {e}"))
                .related(model_dim.span, "model_dim given here")
                .help(format!(
                    "head_dim must divide model_dim: for example {}",
                    divisors_text(e as u64, d as u64)
                )),
            );
            return None;
        }
        let mha_heads = e / d;

        let query_heads = match (query_heads?, compression?) {
            (Some(given), _) => given,
            (None, Some(compression)) => {
                let c = compression.value;
                if mha_heads % c != 0 {
                    self.error(
                        Error::new(compression.span, format!("compression {c} does not divide the {mha_heads} heads of model_dim / head_dim"))
                            .label(format!("{mha_heads} heads cannot be compressed {c}×"))
                            .help(format!("use a divisor of {mha_heads}: {}", divisors_text(mha_heads as u64, c as u64))),
                    );
                    return None;
                }
                Given { value: mha_heads / c, span: compression.span }
            }
            (None, None) => Given { value: mha_heads, span: head_dim.span },
        };
        let hq = query_heads.value;
        let kv_heads = match (kv_heads?, groups?) {
            (Some(given), _) => {
                if hq % given.value != 0 {
                    let mut error = Error::new(
                        given.span,
                        format!("query_heads {hq} is not a multiple of kv_heads {}", given.value),
                    )
                    .label("does not divide the query heads")
                    .help(format!(
                        "kv_heads must divide query_heads: {}",
                        divisors_text(hq as u64, given.value as u64)
                    ));
                    if items.contains_key("query_heads") || items.contains_key("compression") {
                        error = error.related(query_heads.span, format!("{hq} query heads"));
                    }
                    self.error(error);
                    return None;
                }
                given.value
            }
            (None, Some(groups)) => {
                let g = groups.value;
                if hq % g != 0 {
                    self.error(
                        Error::new(
                            groups.span,
                            format!("groups {g} does not divide query_heads {hq}"),
                        )
                        .label("query heads per kv head must divide the query heads")
                        .help(format!(
                            "use a divisor of {hq}: {}",
                            divisors_text(hq as u64, g as u64)
                        )),
                    );
                    return None;
                }
                hq / g
            }
            (None, None) => hq,
        };
        Some((hq, kv_heads))
    }

    fn conv_stages(&mut self, item: &Item) -> Option<Vec<ConvStage>> {
        let items = self.block_items(item, "depthwise(width = 2)")?;
        if items.is_empty() {
            self.error(
                Error::new(item.span, "`qk_conv` has no stages")
                    .label("empty")
                    .help("add stages such as `depthwise(width = 2)` and `per_head(width = 2)`, or remove `qk_conv`"),
            );
            return None;
        }
        let mut stages = Some(Vec::new());
        let mut history: u64 = 0;
        for stage_item in items {
            let stage = self.conv_stage(stage_item);
            if let Some(stage) = stage {
                history += stage.width as u64 - 1;
                if history > MAX_DIM {
                    self.error(
                        Error::new(
                            stage_item.span,
                            format!("the convolution stages need {history} tokens of history"),
                        )
                        .label("too long")
                        .note(format!(
                            "the total history Σ(width − 1) may be at most {MAX_DIM} (2^20)"
                        )),
                    );
                    stages = None;
                }
            }
            match (&mut stages, stage) {
                (Some(list), Some(stage)) => list.push(stage),
                _ => stages = None,
            }
        }
        stages
    }

    fn conv_stage(&mut self, item: &Item) -> Option<ConvStage> {
        let name = item.key.text.as_str();
        let ItemKind::Call(arguments) = &item.kind else {
            let mut error = Error::new(
                item.span,
                format!("`qk_conv` holds stage calls, not {}", item.kind.form()),
            )
            .label("expected a call such as `depthwise(width = 2)`");
            if STAGES.contains(&name) {
                error = error.help(format!("write `{name}(width = 2)`"));
            }
            self.error(error);
            return None;
        };
        let kind = match name {
            "depthwise" => ConvKind::Depthwise,
            "per_head" => ConvKind::PerHead,
            _ => {
                let mut error =
                    Error::new(item.key.span, format!("unknown convolution stage `{name}`"))
                        .label("not a stage");
                error = match did_you_mean(name, STAGES) {
                    Some(suggestion) => error.help(format!("did you mean `{suggestion}`?")),
                    None => error
                        .note("the stages are `depthwise(width = K)` and `per_head(width = K)`"),
                };
                self.error(error);
                return None;
            }
        };
        let value = self.single_argument(arguments, item.span, name, "width", "2")?;
        let width = self.size(value, "width", MAX_DIM)?;
        Some(ConvStage { kind, width })
    }

    /// The one argument of a call such as `depthwise(width = 2)` or `sliding_window(4096)`,
    /// positional or named `parameter`.
    fn single_argument<'a>(
        &mut self,
        arguments: &'a [Argument],
        call_span: Span,
        call: &str,
        parameter: &str,
        example: &str,
    ) -> Option<&'a Value> {
        let Some(first) = arguments.first() else {
            self.error(
                Error::new(call_span, format!("`{call}` needs its {parameter}"))
                    .label(format!("missing {parameter}"))
                    .help(format!("write `{call}({parameter} = {example})`")),
            );
            return None;
        };
        let mut ok = true;
        if let Some(name) = &first.name
            && name.text != parameter
        {
            let mut error =
                Error::new(name.span, format!("`{call}` has no argument `{}`", name.text))
                    .label("unknown argument");
            error = match did_you_mean(&name.text, &[parameter]) {
                Some(suggestion) => error.help(format!("did you mean `{suggestion}`?")),
                None => error.help(format!("its only argument is `{parameter}`")),
            };
            self.error(error);
            ok = false;
        }
        for extra in &arguments[1..] {
            self.error(
                Error::new(
                    extra.value.span,
                    format!("`{call}` takes one argument, its {parameter}"),
                )
                .label("extra argument")
                .help(format!("write `{call}({parameter} = {example})`")),
            );
            ok = false;
        }
        ok.then_some(&first.value)
    }

    fn rope(&mut self, item: &Item, head_dim: Option<Given<usize>>) -> Option<Rope> {
        let items = self.block_items(item, "fraction = 0.5, theta = 10000")?;
        let items = self.index_items(items, ROPE_KEYS, "`rope`");
        let fraction = self.optional_given(&items, "fraction", |c, v| c.float(v, "fraction"));
        let rotation = self.rotation(&items);
        let fraction = fraction?;
        let d = head_dim?.value;
        let (fraction_value, fraction_span) = match fraction {
            Some(given) => (given.value, given.span),
            None => (1.0, item.key.span),
        };
        let rotary_dim = self.rotary_dim(d, fraction_value, fraction_span)?;
        let (theta, style, yarn) = rotation?;
        Some(Rope { fraction: fraction_value, rotary_dim, theta, style, yarn })
    }

    /// `yarn(factor = 40, original_positions = 4096, ...)`: named arguments only, `factor` and
    /// `original_positions` required, the rest at Hugging Face's defaults.
    fn yarn(&mut self, item: &Item) -> Option<Yarn> {
        let example = "yarn(factor = 40, original_positions = 4096)";
        let ItemKind::Call(arguments) = &item.kind else {
            self.error(
                Error::new(item.span, format!("`yarn` is a call, not {}", item.kind.form()))
                    .label("expected `yarn(...)`")
                    .help(format!("write `{example}`")),
            );
            return None;
        };
        let mut given: HashMap<&str, &Value> = HashMap::new();
        let mut ok = true;
        for argument in arguments {
            let Some(name) = &argument.name else {
                self.error(
                    Error::new(argument.value.span, "`yarn` takes named arguments only")
                        .label("no name")
                        .help(format!("write `{example}`")),
                );
                ok = false;
                continue;
            };
            if !YARN_ARGUMENTS.contains(&name.text.as_str()) {
                let mut error = Error::new(name.span, format!("unknown argument `{}` of `yarn`", name.text)).label("not a YaRN parameter");
                error = match did_you_mean(&name.text, YARN_ARGUMENTS) {
                    Some(suggestion) => error.help(format!("did you mean `{suggestion}`?")),
                    None => error.note(format!("the arguments are {}", YARN_ARGUMENTS.join(", "))),
                };
                self.error(error);
                ok = false;
            } else if given.insert(name.text.as_str(), &argument.value).is_some() {
                self.error(Error::new(name.span, format!("`{}` is given twice", name.text)).label("given again here"));
                ok = false;
            }
        }
        let required = |checker: &mut Self, key: &str| match given.get(key) {
            Some(value) => Some(*value),
            None => {
                checker.error(
                    Error::new(item.span, format!("`yarn` has no `{key}`"))
                        .label(format!("`{key}` is required"))
                        .help(format!("e.g. `{example}`")),
                );
                None
            }
        };
        let factor = required(self, "factor").and_then(|v| self.positive_float(v, "factor"));
        let original_positions = required(self, "original_positions").and_then(|v| self.size(v, "original_positions", MAX_SEQUENCE));
        let float = |checker: &mut Self, key: &str, default: f64| match given.get(key) {
            Some(value) => checker.non_negative_float(value, key),
            None => Some(default),
        };
        // The betas count rotations: 0 would put a ramp bound at infinity.
        let positive = |checker: &mut Self, key: &str, default: f64| match given.get(key) {
            Some(value) => checker.positive_float(value, key).map(|g| g.value),
            None => Some(default),
        };
        let beta_fast = positive(self, "beta_fast", 32.0);
        let beta_slow = positive(self, "beta_slow", 1.0);
        let mscale = float(self, "mscale", 0.0);
        let mscale_all_dim = float(self, "mscale_all_dim", 0.0);
        if !ok {
            return None;
        }
        Some(Yarn {
            factor: factor?.value,
            original_positions: original_positions?,
            beta_fast: beta_fast?,
            beta_slow: beta_slow?,
            mscale: mscale?,
            mscale_all_dim: mscale_all_dim?,
        })
    }

    /// r = d · fraction: a whole, even number of channels in 2..=d.
    fn rotary_dim(&mut self, d: usize, fraction: f64, span: Span) -> Option<usize> {
        let width = d as f64 * fraction;
        let rounded = width.round();
        let problem = if fraction <= 0.0 {
            Some(format!("rotary width head_dim · fraction = {d} · {fraction} is not positive"))
        } else if fraction > 1.0 {
            Some(format!(
                "rotary width head_dim · fraction = {d} · {fraction} = {width} is larger than head_dim {d}"
            ))
        } else if (width - rounded).abs() > 1e-9 * width.max(1.0) {
            Some(format!(
                "rotary width head_dim · fraction = {d} · {fraction} = {width} is not a whole number of channels"
            ))
        } else if rounded == 0.0 {
            Some(format!("rotary width head_dim · fraction = {d} · {fraction} is zero"))
        } else if !(rounded as usize).is_multiple_of(2) {
            Some(format!("rotary width head_dim · fraction = {d} · {fraction} = {rounded} is odd"))
        } else {
            None
        };
        match problem {
            None => Some(rounded as usize),
            Some(message) => {
                let mut error = Error::new(span, message)
                    .label("RoPE rotates pairs of channels")
                    .note("the rotary width must be an even number of channels between 2 and head_dim");
                if d >= 2 {
                    let nearest_even =
                        ((width / 2.0).round().clamp(1.0, (d / 2) as f64) * 2.0) as usize;
                    error = error.help(format!(
                        "fraction = {} rotates {nearest_even} channels",
                        nearest_even as f64 / d as f64
                    ));
                }
                self.error(error);
                None
            }
        }
    }

    fn tune(&mut self, item: &Item) -> Option<TuneShape> {
        let items = self.block_items(item, "batch = 1, seq_len = 4096")?;
        let items = self.index_items(items, TUNE_KEYS, "`tune`");
        let batch = self.optional_given(&items, "batch", |c, v| c.size(v, "batch", MAX_DIM));
        let seq_len =
            self.optional_given(&items, "seq_len", |c, v| c.size(v, "seq_len", MAX_SEQUENCE));
        let kv_len =
            self.optional_given(&items, "kv_len", |c, v| c.size(v, "kv_len", MAX_SEQUENCE));
        Some(TuneShape {
            batch: batch?.map(|g| g.value),
            seq_len: seq_len?.map(|g| g.value),
            kv_len: kv_len?.map(|g| g.value),
        })
    }

    fn mask(&mut self, value: &Value) -> Option<Mask> {
        if let ValueKind::Call { name, arguments } = &value.kind
            && name.text == "sliding_window"
        {
            let window =
                self.single_argument(arguments, value.span, "sliding_window", "window", "4096")?;
            let window = self.size(window, "window", MAX_SEQUENCE)?;
            return Some(Mask::SlidingWindow { window });
        }
        self.choice(value, "mask", &[("none", Mask::None), ("causal", Mask::Causal)])
    }

    fn entry_points(&mut self, value: &Value) -> Option<Vec<EntryPoint>> {
        let values = match &value.kind {
            ValueKind::List(values) => values.as_slice(),
            _ => std::slice::from_ref(value),
        };
        if values.is_empty() {
            self.error(
                Error::new(value.span, "`emit` is empty")
                    .label("no entry points")
                    .help("emit at least one of forward, backward, decode: `emit = [forward]`"),
            );
            return None;
        }
        let options = [
            ("forward", EntryPoint::Forward),
            ("backward", EntryPoint::Backward),
            ("decode", EntryPoint::Decode),
        ];
        let mut seen: Vec<(EntryPoint, Span)> = Vec::new();
        let mut ok = true;
        for entry in values {
            match self.choice(entry, "emit", &options) {
                Some(point) => match seen.iter().find(|(seen_point, _)| *seen_point == point) {
                    Some((_, first)) => {
                        self.error(
                            Error::new(
                                entry.span,
                                format!("`{}` is listed twice in `emit`", point.name()),
                            )
                            .label("listed again here")
                            .related(*first, "first listed here"),
                        );
                        ok = false;
                    }
                    None => seen.push((point, entry.span)),
                },
                None => ok = false,
            }
        }
        let has_forward = seen.iter().any(|(point, _)| *point == EntryPoint::Forward);
        if let Some((_, span)) = seen.iter().find(|(point, _)| *point == EntryPoint::Backward)
            && !has_forward
        {
            self.error(
                Error::new(*span, "`backward` needs `forward` in `emit`")
                    .label("the backward reads what the forward saves")
                    .help("emit both: `emit = [forward, backward]`"),
            );
            ok = false;
        }
        let mut points: Vec<EntryPoint> = seen.into_iter().map(|(point, _)| point).collect();
        points.sort();
        ok.then_some(points)
    }

    /// One of a fixed set of names.
    fn choice<T: Copy>(&mut self, value: &Value, key: &str, options: &[(&str, T)]) -> Option<T> {
        let names: Vec<&str> = options.iter().map(|(name, _)| *name).collect();
        let mut listed = names.iter().map(|name| format!("`{name}`")).collect::<Vec<_>>();
        if key == "mask" {
            listed.push("`sliding_window(W)`".to_string());
        }
        let expected = listed.join(", ");
        if let ValueKind::Name(name) = &value.kind {
            if let Some((_, option)) = options.iter().find(|(option_name, _)| option_name == name) {
                return Some(*option);
            }
            let mut error = Error::new(value.span, format!("unknown value `{name}` for `{key}`"))
                .label(format!("expected one of {expected}"));
            if let Some(suggestion) = did_you_mean(name, &names) {
                error = error.help(format!("did you mean `{suggestion}`?"));
            } else if key == "mask" && did_you_mean(name, &["sliding_window"]).is_some() {
                error = error.help("did you mean `sliding_window(4096)`?");
            }
            self.error(error);
            return None;
        }
        let mut error = Error::new(
            value.span,
            format!("`{key}` must be one of {expected}, found {}", value.kind.describe()),
        )
        .label("not allowed here");
        if let ValueKind::Call { name, .. } = &value.kind
            && let Some(suggestion) =
                did_you_mean(&name.text, &["sliding_window"]).filter(|_| key == "mask")
        {
            error = error.help(format!("did you mean `{suggestion}(...)`?"));
        }
        self.error(error);
        None
    }

    fn boolean(&mut self, value: &Value, key: &str) -> Option<bool> {
        if let ValueKind::Bool(flag) = value.kind {
            return Some(flag);
        }
        let mut error = Error::new(
            value.span,
            format!("`{key}` must be `true` or `false`, found {}", value.kind.describe()),
        )
        .label("expected a boolean");
        if let ValueKind::Name(name) = &value.kind
            && let Some(suggestion) = did_you_mean(name, &["true", "false"])
        {
            error = error.help(format!("did you mean `{suggestion}`?"));
        }
        self.error(error);
        None
    }

    fn number_text<'a>(&mut self, value: &'a Value, key: &str, expected: &str) -> Option<&'a str> {
        match &value.kind {
            ValueKind::Number(text) => Some(text),
            other => {
                self.error(
                    Error::new(
                        value.span,
                        format!("`{key}` must be {expected}, found {}", other.describe()),
                    )
                    .label(format!("expected {expected}")),
                );
                None
            }
        }
    }

    /// A whole number in 0..=bound.
    fn count(&mut self, value: &Value, key: &str, bound: u64) -> Option<usize> {
        self.integer_in(value, key, 0, bound)
    }

    /// A whole number in 1..=bound.
    fn size(&mut self, value: &Value, key: &str, bound: u64) -> Option<usize> {
        self.integer_in(value, key, 1, bound)
    }

    fn integer_in(&mut self, value: &Value, key: &str, least: u64, bound: u64) -> Option<usize> {
        let text = self.number_text(value, key, "a whole number")?;
        let too_large = |checker: &mut Checker| {
            checker.error(
                Error::new(value.span, format!("`{key}` is too large"))
                    .label(format!("at most {bound} (2^{})", bound.trailing_zeros()))
                    .note(format!("`{key}` may be at most {bound}")),
            )
        };
        match number::parse(text) {
            Number::Integer(integer) if integer < i128::from(least) => {
                let requirement = if least == 0 { "not be negative" } else { "be positive" };
                self.error(
                    Error::new(value.span, format!("`{key}` must {requirement}, found {text}"))
                        .label(if least == 0 {
                            "negative"
                        } else if integer == 0 {
                            "zero"
                        } else {
                            "negative"
                        }),
                );
                None
            }
            Number::Integer(integer) if integer > i128::from(bound) => {
                too_large(self);
                None
            }
            Number::Integer(integer) => usize::try_from(integer).ok(),
            Number::TooLarge { negative: false } => {
                too_large(self);
                None
            }
            Number::TooLarge { negative: true } => {
                self.error(
                    Error::new(value.span, format!("`{key}` must be positive, found {text}"))
                        .label("negative"),
                );
                None
            }
            Number::Fraction => {
                self.error(
                    Error::new(value.span, format!("`{key}` must be a whole number, found {text}"))
                        .label("has a fractional part"),
                );
                None
            }
        }
    }

    /// Any finite number.
    fn float(&mut self, value: &Value, key: &str) -> Option<f64> {
        let text = self.number_text(value, key, "a number")?;
        match number::to_f64(text) {
            Some(float) => Some(float),
            None => {
                self.error(
                    Error::new(value.span, format!("`{key}` is out of range"))
                        .label("does not fit in a 64-bit float"),
                );
                None
            }
        }
    }

    fn positive_float(&mut self, value: &Value, key: &str) -> Option<Given<f64>> {
        let float = self.float(value, key)?;
        if float <= 0.0 {
            self.error(
                Error::new(value.span, format!("`{key}` must be positive, found {float}"))
                    .label("not positive"),
            );
            return None;
        }
        Some(Given { value: float, span: value.span })
    }

    fn non_negative_float(&mut self, value: &Value, key: &str) -> Option<f64> {
        let float = self.float(value, key)?;
        if float < 0.0 {
            self.error(
                Error::new(value.span, format!("`{key}` must not be negative, found {float}"))
                    .label("negative"),
            );
            return None;
        }
        Some(float)
    }
}

/// "1, 2, 4, 8 or 16": divisors of `n` nearest to `wanted` (at most six), for help lines.
fn divisors_text(n: u64, wanted: u64) -> String {
    let mut divisors: Vec<u64> = Vec::new();
    let mut candidate = 1;
    while candidate * candidate <= n {
        if n.is_multiple_of(candidate) {
            divisors.push(candidate);
            divisors.push(n / candidate);
        }
        candidate += 1;
    }
    divisors.sort_unstable();
    divisors.dedup();
    divisors.sort_by_key(|divisor| divisor.abs_diff(wanted));
    divisors.truncate(6);
    divisors.sort_unstable();
    let words: Vec<String> = divisors.iter().map(u64::to_string).collect();
    match words.as_slice() {
        [] => String::new(),
        [only] => only.clone(),
        [init @ .., last] => format!("{} or {last}", init.join(", ")),
    }
}
