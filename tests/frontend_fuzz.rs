//! Bounded fuzzing of the frontend inside the normal test suite: random bytes, token soups from
//! the grammar's vocabulary and mutations of the examples. Every input must come back as specs
//! that validate, or as errors whose spans lie inside the file on character boundaries; nothing
//! may panic, and every accepted spec must print, parse back and explain without overflow.
//! A seeded generator keeps failures reproducible (the failing input is printed).

use std::panic::{AssertUnwindSafe, catch_unwind};

use ccc::explain::explain_text;
use ccc::frontend::{MAX_SEQUENCE, parse_and_check, spec_text};

mod common;
use common::rng::SplitMix64;

const VOCABULARY: &[&str] = &[
    "attention",
    "zaya1",
    "a",
    "a",
    "{",
    "}",
    "(",
    ")",
    "[",
    "]",
    "=",
    ",",
    ";",
    "\n",
    "\n",
    " ",
    "\t",
    "//",
    "/*",
    "*/",
    "model_dim",
    "head_dim",
    "query_heads",
    "kv_heads",
    "compression",
    "groups",
    "qk_conv",
    "depthwise",
    "per_head",
    "width",
    "qk_mean",
    "value_shift",
    "qk_norm",
    "l2",
    "none",
    "key_temperature",
    "learned",
    "learned_exp",
    "rope",
    "fraction",
    "theta",
    "style",
    "neox",
    "interleaved",
    "mask",
    "causal",
    "sliding_window",
    "softmax_scale",
    "norm_eps",
    "dtype",
    "bf16",
    "f16",
    "bias",
    "emit",
    "forward",
    "backward",
    "decode",
    "tune",
    "batch",
    "seq_len",
    "kv_len",
    "true",
    "false",
    "0",
    "1",
    "2",
    "-2",
    "3",
    "8",
    "16",
    "128",
    "2048",
    "4_096",
    "0.5",
    "1e4",
    "5_000_000",
    "1e400",
    "-1e-9",
    "99999999999999999999999999999999999999999",
    "1e99999999999999999999",
    "1_048_576",
    "é",
    "\u{0}",
    "\r\n",
    "_",
    "1.",
    ".5",
    "e",
    "+",
];

const EXAMPLES: &[&str] = &[
    include_str!("../examples/zaya1.attn"),
    include_str!("../examples/mha.attn"),
    include_str!("../examples/gqa.attn"),
    include_str!("../examples/mqa.attn"),
    include_str!("../examples/cca4x.attn"),
    include_str!("../examples/sliding_window.attn"),
];

/// Runs one input through the frontend and checks the outcome; `Err` describes a violation.
fn judge(source: &str, render: bool) -> Result<bool, String> {
    let outcome = catch_unwind(AssertUnwindSafe(|| parse_and_check("fuzz.attn", source)))
        .map_err(|_| "the frontend panicked".to_string())?;
    match outcome {
        Ok(specs) => {
            // No block may be dropped silently.
            let blocks =
                ccc::frontend::parse("fuzz.attn", source).map(|file| file.blocks.len()).ok();
            if blocks != Some(specs.len()) {
                return Err(format!("{} specs from {blocks:?} blocks", specs.len()));
            }
            for spec in &specs {
                spec.validate()
                    .map_err(|why| format!("accepted an invalid spec ({why}): {spec:?}"))?;
                // Every accepted spec must also be explainable at the longest sequence allowed.
                explain_text(spec, MAX_SEQUENCE as usize);
                let reparsed =
                    parse_and_check("printed.attn", &spec_text(spec)).map_err(|diagnostics| {
                        format!("its printed spec does not parse:\n{}", diagnostics.render())
                    })?;
                if reparsed.len() != 1 || reparsed[0] != *spec {
                    return Err(format!("printing and parsing changed the spec {spec:?}"));
                }
            }
            Ok(true)
        }
        Err(diagnostics) => {
            if diagnostics.errors().is_empty() {
                return Err("rejected without an error".to_string());
            }
            for error in diagnostics.errors() {
                for span in error.spans() {
                    let inside = span.start <= span.end && span.end <= source.len();
                    if !inside
                        || !source.is_char_boundary(span.start)
                        || !source.is_char_boundary(span.end)
                    {
                        return Err(format!(
                            "error {:?} has span {span:?} outside the file or mid-character",
                            error.message
                        ));
                    }
                }
            }
            if render {
                catch_unwind(AssertUnwindSafe(|| diagnostics.render()))
                    .map_err(|_| "rendering the diagnostics panicked".to_string())?;
            }
            Ok(false)
        }
    }
}

fn random_bytes(rng: &mut SplitMix64) -> String {
    let length = rng.below(120);
    let bytes: Vec<u8> = (0..length).map(|_| rng.next() as u8).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Random ASCII drawn mostly from the characters the grammar uses.
fn random_ascii(rng: &mut SplitMix64) -> String {
    const CHARACTERS: &[u8] = b"attention{}()[]=,;\n _/*0123456789.eE-+abcdlq";
    (0..rng.below(160)).map(|_| CHARACTERS[rng.below(CHARACTERS.len())] as char).collect()
}

fn token_soup(rng: &mut SplitMix64) -> String {
    let mut text = String::new();
    if rng.below(2) == 0 {
        text.push_str("attention a {\n");
    }
    for _ in 0..rng.below(60) {
        text.push_str(rng.pick(VOCABULARY));
        if rng.below(3) == 0 {
            text.push(' ');
        }
    }
    if rng.below(2) == 0 {
        text.push_str("\n}");
    }
    text
}

/// A random char boundary of `text`.
fn boundary(rng: &mut SplitMix64, text: &str) -> usize {
    let mut at = rng.below(text.len() + 1);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

/// Byte offsets of the ASCII digits in `text`.
fn digit_positions(text: &str) -> Vec<usize> {
    text.char_indices()
        .filter(|(_, c)| c.is_ascii_digit())
        .map(|(i, _)| i)
        .collect()
}

fn mutate(rng: &mut SplitMix64, base: &str) -> String {
    let mut text = base.to_string();
    for _ in 0..1 + rng.below(4) {
        let (a, b) = (boundary(rng, &text), boundary(rng, &text));
        let (start, end) = (a.min(b), a.max(b));
        match rng.below(7) {
            // Delete a range (kept short: long deletions mostly produce the same empty file).
            0 => {
                let end = boundary(rng, &text[..end.min(start + 24)]).max(start);
                text.replace_range(start..end, "");
            }
            // Duplicate a range.
            1 => {
                let copy = text[start..end].to_string();
                text.insert_str(end, &copy);
            }
            // Change a digit.
            2 => {
                let digits = digit_positions(&text);
                if !digits.is_empty() {
                    let at = digits[rng.below(digits.len())];
                    let digit = (b'0' + rng.below(10) as u8) as char;
                    text.replace_range(at..at + 1, &digit.to_string());
                }
            }
            // Replace a number with a huge, negative or odd one.
            3 => {
                let digits = digit_positions(&text);
                if !digits.is_empty() {
                    let at = digits[rng.below(digits.len())];
                    let huge = rng.pick(&[
                        "99999999999999999999999",
                        "1e300",
                        "-7",
                        "0",
                        "1_048_577",
                        "18446744073709551616",
                        "3.5",
                    ]);
                    text.insert_str(at, huge);
                }
            }
            // Insert a token from the vocabulary.
            4 => {
                let token = rng.pick(VOCABULARY);
                text.insert_str(start, token);
            }
            // Swap two lines.
            5 => {
                let mut lines: Vec<&str> = text.lines().collect();
                if lines.len() > 1 {
                    let (i, j) = (rng.below(lines.len()), rng.below(lines.len()));
                    lines.swap(i, j);
                }
                text = lines.join("\n");
            }
            // Cut the file short.
            _ => text.truncate(end),
        }
    }
    text
}

#[test]
fn no_input_panics_and_every_error_points_into_the_file() {
    let mut rng = SplitMix64(0x00C0_FFEE_A77E);
    let mut accepted = 0;
    let mut total = 0;
    type Generator = fn(&mut SplitMix64) -> String;
    let generators: [(&str, usize, Generator); 5] = [
        ("random bytes", 20_000, random_bytes),
        ("random ascii", 20_000, random_ascii),
        ("token soup", 30_000, token_soup),
        ("mutated example", 35_000, |rng| {
            let base = EXAMPLES[rng.below(EXAMPLES.len())];
            mutate(rng, base)
        }),
        ("two mutated examples", 5_000, |rng| {
            let (a, b) = (EXAMPLES[rng.below(EXAMPLES.len())], EXAMPLES[rng.below(EXAMPLES.len())]);
            mutate(rng, &format!("{a}\n{b}"))
        }),
    ];
    // Panics are caught and reported with their input; keep the default hook from printing each.
    let previous_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut failures = Vec::new();
    for (kind, count, generate) in generators {
        for index in 0..count {
            let source = generate(&mut rng);
            match judge(&source, index % 16 == 0) {
                Ok(was_accepted) => accepted += usize::from(was_accepted),
                Err(why) => failures.push(format!("{kind} #{index}: {why}\ninput: {source:?}")),
            }
            total += 1;
        }
    }
    std::panic::set_hook(previous_hook);
    assert!(
        failures.is_empty(),
        "{} failures, first ones:\n{}",
        failures.len(),
        failures[..failures.len().min(5)].join("\n\n")
    );
    assert!(total >= 100_000);
    // The mutations must not be so destructive that nothing valid is ever tried.
    assert!(accepted > 1_000, "only {accepted} of {total} inputs were valid specs");
}
