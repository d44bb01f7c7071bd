//! The frontend on the bundled examples (resolved specs, snapshotted) and on a catalogue of bad
//! inputs, at least one per rule of docs/language.md (rendered diagnostics, snapshotted so that
//! the caret positions are visible in review).

use ccc::AttentionSpec;
use ccc::frontend::{parse_and_check, spec_text};
use ccc::spec::{ConvKind, EntryPoint, KeyTemperature, Mask, QkNorm, RopeStyle};

const EXAMPLES: &[&str] = &["zaya1", "mha", "gqa", "mqa", "cca4x", "sliding_window", "encoder"];

fn example(name: &str) -> AttentionSpec {
    let path = format!("{}/examples/{name}.attn", env!("CARGO_MANIFEST_DIR"));
    let source = std::fs::read_to_string(&path).unwrap();
    let mut specs = parse_and_check(&path, &source)
        .unwrap_or_else(|diagnostics| panic!("{}", diagnostics.render()));
    assert_eq!(specs.len(), 1, "{name}.attn holds one block");
    specs.remove(0)
}

fn check(source: &str) -> Result<Vec<AttentionSpec>, String> {
    parse_and_check("test.attn", source).map_err(|diagnostics| diagnostics.render())
}

fn one(source: &str) -> AttentionSpec {
    let mut specs = check(source).unwrap_or_else(|rendered| panic!("{rendered}"));
    assert_eq!(specs.len(), 1);
    specs.remove(0)
}

#[test]
fn every_example_resolves_to_its_snapshot() {
    for name in EXAMPLES {
        let spec = example(name);
        spec.validate().unwrap();
        insta::assert_snapshot!(format!("example_{name}"), format!("{spec:#?}"));
    }
}

#[test]
fn zaya1_resolves_as_language_md_says() {
    let spec = example("zaya1");
    assert_eq!((spec.model_dim, spec.head_dim, spec.query_heads, spec.kv_heads), (2048, 128, 8, 2));
    assert_eq!(
        spec.qk_conv.iter().map(|s| (s.kind, s.width)).collect::<Vec<_>>(),
        [(ConvKind::Depthwise, 2), (ConvKind::PerHead, 2)]
    );
    assert!(spec.qk_mean);
    assert_eq!(spec.value_shift, 1);
    assert_eq!(spec.qk_norm, QkNorm::L2);
    assert_eq!(spec.key_temperature, KeyTemperature::Learned);
    let rope = spec.rope.unwrap();
    assert_eq!(
        (rope.fraction, rope.rotary_dim, rope.theta, rope.style),
        (0.5, 64, 5e6, RopeStyle::Neox)
    );
    assert_eq!(spec.mask, Mask::Causal);
    assert_eq!(spec.softmax_scale, 1.0 / 128f64.sqrt());
    assert_eq!(spec.norm_eps, 1e-12);
    assert_eq!(spec.entry_points, [EntryPoint::Forward]);
    assert_eq!(spec.tune.unwrap().seq_len, Some(16384));
    assert_eq!(spec.param_count(), 5_575_682);
}

#[test]
fn defaults_are_the_table_of_language_md() {
    let spec = one("attention plain { model_dim = 2048; head_dim = 128 }");
    assert_eq!(spec, AttentionSpec::plain("plain", 2048, 128, 16, 16));
    assert!(!spec.deterministic);
    let spec = one("attention d { model_dim = 2048; head_dim = 128; emit = [forward, backward]; deterministic = true }");
    assert!(spec.deterministic);
    let rope = one("attention r { model_dim = 256, head_dim = 64, rope {} }").rope.unwrap();
    assert_eq!(
        (rope.fraction, rope.rotary_dim, rope.theta, rope.style),
        (1.0, 64, 10_000.0, RopeStyle::Neox)
    );
}

#[test]
fn heads_resolve_from_compression_and_groups() {
    let spec = one("attention c { model_dim = 2048, head_dim = 128, compression = 4, groups = 2 }");
    assert_eq!((spec.query_heads, spec.kv_heads), (4, 2));
    let spec = one("attention g { model_dim = 2048, head_dim = 128, groups = 16 }");
    assert_eq!((spec.query_heads, spec.kv_heads), (16, 1));
    // More query heads than model_dim / head_dim is allowed (compression below 1).
    let spec =
        one("attention wide { model_dim = 1024, head_dim = 128, query_heads = 16, kv_heads = 8 }");
    assert_eq!(spec.compression(), 0.5);
}

#[test]
fn syntax_variants_mean_the_same() {
    let multi_line = one(
        "/* block\n comment */ attention a {\n  model_dim = 4_096 // width\n\n  head_dim = 1.28e2\n  qk_conv {\n    depthwise(2)\n    per_head(width = 3,)\n  }\n  emit = decode\n  mask = sliding_window(window = 16)\n}\n",
    );
    let one_line = one(
        "attention a { model_dim = 4096; head_dim = 128, qk_conv { depthwise(width = 2); per_head(3) }, emit = [decode], mask = sliding_window(16) }",
    );
    assert_eq!(multi_line, one_line);
    assert_eq!(one_line.conv_history(), 3);
    assert_eq!(one_line.entry_points, [EntryPoint::Decode]);
    assert_eq!(one_line.mask, Mask::SlidingWindow { window: 16 });
    // Entry points come out in a fixed order whatever order they are listed in.
    let spec =
        one("attention e { model_dim = 256, head_dim = 64, emit = [\n decode,\n forward,\n] }");
    assert_eq!(spec.entry_points, [EntryPoint::Forward, EntryPoint::Decode]);
}

#[test]
fn several_blocks_come_out_in_order() {
    let specs = check("attention a { model_dim = 256, head_dim = 64 }\n\nattention b { model_dim = 512, head_dim = 64 }").unwrap();
    assert_eq!(specs.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["a", "b"]);
}

#[test]
fn blocks_split_only_at_block_headers() {
    // Two blocks on one line are fine; an item named `attention` is an unknown item, not a block.
    let specs = check("attention a { model_dim = 256, head_dim = 64 } attention b { model_dim = 256, head_dim = 64 }").unwrap();
    assert_eq!(specs.len(), 2);
    let rendered =
        check("attention a {\n    model_dim = 256, head_dim = 64\nattention = 1\n}\n").unwrap_err();
    assert!(rendered.contains("unknown item `attention`"), "{rendered}");
    // A header inside a comment does not start a block.
    let specs =
        check("attention a {\n model_dim = 256, head_dim = 64 /*\nattention b {\n*/ }").unwrap();
    assert_eq!(specs.len(), 1);
}

#[test]
fn printed_specs_parse_back_to_the_same_spec() {
    for name in EXAMPLES {
        let spec = example(name);
        let text = spec_text(&spec);
        assert_eq!(one(&text), spec, "{text}");
    }
    insta::assert_snapshot!("spec_text_zaya1", spec_text(&example("zaya1")));
}

/// DeepSeek-V3's attention layer as `DeepseekV3Attention`'s config gives it.
const DEEPSEEK_V3: &str = "attention dsv3 {
    model_dim   = 7168
    query_heads = 128
    mla { kv_rank = 512, q_rank = 1536, rope_dim = 64, nope_dim = 128, v_dim = 128 }
    rope { theta = 10000, style = interleaved }
}
";

#[test]
fn mla_resolves_with_deepseek_v3s_widths_and_names() {
    let spec = one(DEEPSEEK_V3);
    let mla = spec.mla.expect("an MLA layer");
    assert_eq!((spec.head_dim, spec.query_heads, spec.kv_heads), (192, 128, 128));
    assert_eq!((mla.q_rank, mla.kv_rank, mla.rms_eps), (Some(1536), 512, 1e-6));
    let rope = spec.rope.unwrap();
    assert_eq!((rope.rotary_dim, rope.style), (64, RopeStyle::Interleaved));
    assert_eq!(spec.softmax_scale, 1.0 / 192f64.sqrt());
    let params: Vec<(String, Vec<usize>)> = spec.params().into_iter().map(|p| (p.name, p.shape)).collect();
    let expected: Vec<(String, Vec<usize>)> = [
        ("q_a_proj.weight", vec![1536, 7168]),
        ("q_a_layernorm.weight", vec![1536]),
        ("q_b_proj.weight", vec![128 * 192, 1536]),
        ("kv_a_proj_with_mqa.weight", vec![576, 7168]),
        ("kv_a_layernorm.weight", vec![512]),
        ("kv_b_proj.weight", vec![128 * 256, 512]),
        ("o_proj.weight", vec![7168, 128 * 128]),
    ]
    .into_iter()
    .map(|(name, shape)| (name.to_string(), shape))
    .collect();
    assert_eq!(params, expected);
    let text = spec_text(&spec);
    assert_eq!(one(&text), spec, "{text}");
    // DeepSeek-V3's YaRN: its mscale_all_dim folds into the softmax scale.
    let yarn = one(&DEEPSEEK_V3.replace(
        "style = interleaved",
        "style = interleaved, yarn(factor = 40, original_positions = 4096, mscale = 1, mscale_all_dim = 1)",
    ));
    let magnitude = 0.1 * 40f64.ln() + 1.0;
    assert!((yarn.softmax_scale - magnitude * magnitude / 192f64.sqrt()).abs() < 1e-15);
    assert_eq!(one(&spec_text(&yarn)), yarn);
    let without_q_latent = one(&DEEPSEEK_V3.replace("q_rank = 1536", "q_rank = none"));
    assert_eq!(without_q_latent.params()[0].name, "q_proj.weight");
    assert_eq!(one(&spec_text(&without_q_latent)), without_q_latent);
}

/// (snapshot name, source, a fragment the rendered diagnostics must contain).
const BAD_INPUTS: &[(&str, &str, &str)] = &[
    // Syntax.
    // MLA.
    (
        "mla_with_cca_parts",
        "attention a {\n    model_dim = 1024\n    query_heads = 8\n    head_dim = 64\n    qk_mean = true\n    mla { kv_rank = 128, rope_dim = 32, nope_dim = 64, v_dim = 64 }\n    rope { theta = 10000 }\n}\n",
        "`qk_mean` does not apply to an MLA layer",
    ),
    (
        "mla_without_rope",
        "attention a {\n    model_dim = 1024\n    query_heads = 8\n    mla { kv_rank = 128, rope_dim = 32, nope_dim = 64, v_dim = 64 }\n}\n",
        "an MLA layer needs a `rope` block",
    ),
    (
        "mla_odd_rope_dim",
        "attention a {\n    model_dim = 1024\n    query_heads = 8\n    mla { kv_rank = 128, rope_dim = 31, nope_dim = 64, v_dim = 64 }\n    rope { theta = 10000 }\n}\n",
        "rope_dim 31 is odd",
    ),
    (
        "mla_rope_fraction",
        "attention a {\n    model_dim = 1024\n    query_heads = 8\n    mla { kv_rank = 128, rope_dim = 32, nope_dim = 64, v_dim = 64 }\n    rope { fraction = 0.5 }\n}\n",
        "`fraction` does not apply to an MLA layer's RoPE",
    ),
    (
        "mla_missing_width",
        "attention a {\n    model_dim = 1024\n    query_heads = 8\n    mla { kv_rank = 128, rope_dim = 32, nope_dim = 64 }\n    rope { theta = 10000 }\n}\n",
        "`mla` has no `v_dim`",
    ),
    (
        "yarn_without_factor",
        "attention a {\n    model_dim = 1024\n    head_dim = 64\n    rope { theta = 10000, yarn(original_positions = 4096) }\n}\n",
        "`yarn` has no `factor`",
    ),
    (
        "yarn_unknown_argument",
        "attention a {\n    model_dim = 1024\n    head_dim = 64\n    rope { theta = 10000, yarn(factor = 4, original_positions = 4096, mscale_all = 1) }\n}\n",
        "unknown argument `mscale_all` of `yarn`",
    ),
    (
        "yarn_zero_beta",
        "attention a {\n    model_dim = 1024\n    head_dim = 64\n    rope { theta = 10000, yarn(factor = 4, original_positions = 4096, beta_fast = 0) }\n}\n",
        "`beta_fast` must be positive",
    ),
    ("parse_missing_equals", "attention a {\n    model_dim 2048\n}\n", "expected `(`, `=` or `{`"),
    (
        "parse_missing_close_brace",
        "attention a {\n    model_dim = 2048\n",
        "this `{` is never closed",
    ),
    ("parse_missing_block_name", "attention {\n}\n", "expected a block name"),
    ("parse_keyword_typo", "attentoin a {\n}\n", "expected `attention NAME { ... }`"),
    (
        "parse_text_after_block",
        "attention a { model_dim = 256, head_dim = 64 }\nmodel_dim = 512\n",
        "found `model_dim`",
    ),
    ("parse_unclosed_comment", "attention a { model_dim = 2048 /* width\n}\n", "never closed"),
    ("parse_stray_character", "attention a {\n    model_dim = 2048 @\n}\n", "found `@`"),
    ("parse_missing_list_value", "attention a {\n    emit = [forward, ]]\n}\n", "found `]`"),
    (
        "parse_missing_separator",
        "attention a {\n    model_dim = 2048 head_dim = 128\n}\n",
        "a separator",
    ),
    (
        "parse_nesting_too_deep",
        "attention a { x = [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]] }\n",
        "nested too deeply",
    ),
    ("parse_value_missing", "attention a {\n    model_dim =\n}\n", "expected a value"),
    // Files and blocks.
    ("empty_file", "", "no `attention` blocks"),
    ("only_comments", "// nothing here\n/* still nothing */\n", "no `attention` blocks"),
    (
        "duplicate_block_name",
        "attention a { model_dim = 256, head_dim = 64 }\nattention a { model_dim = 512, head_dim = 64 }\n",
        "duplicate block name `a`",
    ),
    ("missing_required_items", "attention a {\n    query_heads = 8\n}\n", "has no `model_dim`"),
    // Items.
    (
        "unknown_item_suggestion",
        "attention a {\n    model_dim = 2048\n    head_dim = 128\n    kv_head = 2\n}\n",
        "did you mean `kv_heads`?",
    ),
    (
        "unknown_item_no_suggestion",
        "attention a {\n    model_dim = 2048\n    head_dim = 128\n    banana = 2\n}\n",
        "known items",
    ),
    (
        "duplicate_item",
        "attention a {\n    model_dim = 2048\n    head_dim = 128\n    model_dim = 4096\n}\n",
        "`model_dim` is given twice",
    ),
    (
        "stage_outside_qk_conv",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    depthwise(width = 2)\n}\n",
        "go inside `qk_conv",
    ),
    (
        "block_written_as_value",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    rope = true\n}\n",
        "`rope` is a block",
    ),
    (
        "value_written_as_block",
        "attention a {\n    model_dim { size = 2048 }\n    head_dim = 128\n}\n",
        "`model_dim` takes a value",
    ),
    // Values.
    (
        "unknown_value_suggestion",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    mask = causl\n}\n",
        "did you mean `causal`?",
    ),
    (
        "unknown_dtype",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    dtype = fp32\n}\n",
        "unknown value `fp32` for `dtype`",
    ),
    (
        "unknown_rope_style",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    rope { style = neoX }\n}\n",
        "did you mean `neox`?",
    ),
    (
        "unknown_mask_call",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    mask = sliding(4096)\n}\n",
        "`mask` must be one of",
    ),
    (
        "bool_expected",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    qk_mean = 1\n}\n",
        "must be `true` or `false`",
    ),
    (
        "integer_expected",
        "attention a {\n    model_dim = causal\n    head_dim = 128\n}\n",
        "`model_dim` must be a whole number",
    ),
    (
        "fractional_integer",
        "attention a {\n    model_dim = 2048\n    head_dim = 64.5\n}\n",
        "has a fractional part",
    ),
    (
        "zero_width",
        "attention a {\n    model_dim = 2048\n    head_dim = 0\n}\n",
        "`head_dim` must be positive",
    ),
    (
        "negative_value_shift",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    value_shift = -1\n}\n",
        "must not be negative",
    ),
    (
        "number_overflows",
        "attention a {\n    model_dim = 1e40\n    head_dim = 340282366920938463463374607431768211457\n}\n",
        "`model_dim` is too large",
    ),
    (
        "dimension_over_bound",
        "attention a {\n    model_dim = 2_000_000\n    head_dim = 128\n}\n",
        "at most 1048576 (2^20)",
    ),
    (
        "float_overflows",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    rope { theta = 1e400 }\n}\n",
        "out of range",
    ),
    (
        "negative_softmax_scale",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    softmax_scale = -0.1\n}\n",
        "must be positive",
    ),
    (
        "negative_norm_eps",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    norm_eps = -1e-6\n}\n",
        "must not be negative",
    ),
    // Heads.
    (
        "model_dim_not_multiple_of_head_dim",
        "attention a {\n    model_dim = 2050\n    head_dim  = 128\n}\n",
        "not a multiple of head_dim",
    ),
    (
        "query_heads_not_multiple_of_kv_heads",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    query_heads = 8\n    kv_heads = 3\n}\n",
        "query_heads 8 is not a multiple of kv_heads 3",
    ),
    (
        "kv_heads_exceed_query_heads",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    kv_heads = 32\n}\n",
        "not a multiple of kv_heads 32",
    ),
    (
        "compression_and_query_heads",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    query_heads = 8\n    compression = 2\n}\n",
        "not both",
    ),
    (
        "groups_and_kv_heads",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    groups = 4\n    kv_heads = 4\n}\n",
        "not both",
    ),
    (
        "compression_not_dividing",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    compression = 3\n}\n",
        "compression 3 does not divide",
    ),
    (
        "groups_not_dividing",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    compression = 2\n    groups = 3\n}\n",
        "groups 3 does not divide",
    ),
    (
        "value_shift_exceeds_kv_heads",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    kv_heads = 2\n    value_shift = 3\n}\n",
        "value_shift 3 is larger than kv_heads 2",
    ),
    (
        "projection_too_wide",
        "attention a {\n    model_dim = 1024, head_dim = 1024\n    query_heads = 1_048_576\n}\n",
        "too wide",
    ),
    (
        "too_many_parameters",
        "attention a {\n    model_dim = 1_048_576, head_dim = 1024\n}\n",
        "parameters",
    ),
    // CCA parts.
    (
        "key_temperature_without_norm",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    key_temperature = learned\n}\n",
        "needs `qk_norm = l2`",
    ),
    (
        "key_temperature_with_norm_none",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    qk_norm = none\n    key_temperature = learned_exp\n}\n",
        "the keys are not normalised here",
    ),
    (
        "unknown_stage",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    qk_conv { depthwize(width = 2) }\n}\n",
        "did you mean `depthwise`?",
    ),
    (
        "stage_argument_typo",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    qk_conv { per_head(widht = 2) }\n}\n",
        "did you mean `width`?",
    ),
    (
        "stage_without_width",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    qk_conv { depthwise() }\n}\n",
        "needs its width",
    ),
    (
        "stage_extra_argument",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    qk_conv { depthwise(2, 3) }\n}\n",
        "takes one argument",
    ),
    (
        "stage_written_as_value",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    qk_conv { depthwise = 2 }\n}\n",
        "write `depthwise(width = 2)`",
    ),
    (
        "negative_conv_width",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    qk_conv { depthwise(width = -2) }\n}\n",
        "`width` must be positive",
    ),
    (
        "empty_qk_conv",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    qk_conv { }\n}\n",
        "has no stages",
    ),
    (
        "conv_history_too_long",
        "attention a {\n    model_dim = 256, head_dim = 64\n    qk_conv { depthwise(1_000_000); depthwise(1_000_000) }\n}\n",
        "tokens of history",
    ),
    // RoPE.
    (
        "rotary_width_not_whole",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    rope { fraction = 0.3 }\n}\n",
        "not a whole number of channels",
    ),
    (
        "rotary_width_odd",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    rope { fraction = 0.0078125 }\n}\n",
        "is odd",
    ),
    (
        "rotary_width_zero",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    rope { fraction = 0 }\n}\n",
        "is not positive",
    ),
    (
        "rotary_width_over_head_dim",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    rope { fraction = 1.5 }\n}\n",
        "larger than head_dim",
    ),
    (
        "rope_unknown_key",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    rope { thetta = 1e4 }\n}\n",
        "did you mean `theta`?",
    ),
    // Mask, emit, tune.
    (
        "zero_sliding_window",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    mask = sliding_window(0)\n}\n",
        "`window` must be positive",
    ),
    (
        "sliding_window_wrong_argument",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    mask = sliding_window(size = 4096)\n}\n",
        "has no argument `size`",
    ),
    (
        "duplicate_emit_entry",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    emit = [forward, decode, forward]\n}\n",
        "listed twice",
    ),
    (
        "empty_emit",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    emit = []\n}\n",
        "`emit` is empty",
    ),
    (
        "unknown_emit_entry",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    emit = [forwards]\n}\n",
        "did you mean `forward`?",
    ),
    (
        "backward_without_forward",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    emit = [backward]\n}\n",
        "`backward` needs `forward` in `emit`",
    ),
    (
        "tune_unknown_key",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    tune { seqlen = 4096 }\n}\n",
        "did you mean `seq_len`?",
    ),
    (
        "tune_zero_batch",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    tune { batch = 0 }\n}\n",
        "`batch` must be positive",
    ),
    // All errors of a file at once, in source order.
    (
        "syntax_errors_in_several_blocks",
        "attention a {\n    model_dim = 2048\n    head_dim 128\n}\n\nattention b {\n    model_dim = 2048\n    head_dim = 128\n\nattention c {\n    model_dim = 2050, head_dim = 128\n}\n",
        "has 3 errors",
    ),
    (
        "many_errors_at_once",
        "attention a {\n    model_dim = 2048, head_dim = 128\n    kv_head = 2\n    mask = causl\n    value_shift = 99\n    emit = [forward, forward]\n}\nattention b {\n    head_dim = 0\n}\n",
        "has 6 errors",
    ),
];

#[test]
fn bad_inputs_are_rejected_with_clear_diagnostics() {
    let mut names = std::collections::HashSet::new();
    for (name, source, fragment) in BAD_INPUTS {
        assert!(names.insert(name), "two bad inputs are named {name}");
        let rendered = match check(source) {
            Ok(specs) => panic!("{name}: accepted, resolved to {specs:#?}"),
            Err(rendered) => rendered,
        };
        assert!(rendered.contains(fragment), "{name}: expected {fragment:?} in\n{rendered}");
        insta::assert_snapshot!(format!("bad_{name}"), format!("{source}\n---\n{rendered}"));
    }
}

#[test]
fn errors_point_inside_the_file() {
    for (name, source, _) in BAD_INPUTS {
        let diagnostics = parse_and_check("test.attn", source).unwrap_err();
        for error in diagnostics.errors() {
            for span in error.spans() {
                assert!(
                    span.start <= span.end && span.end <= source.len(),
                    "{name}: span {span:?}"
                );
            }
        }
    }
}
