//! `.attn` text → `AttentionSpec`: parsing (pest, `grammar/attn.pest`), checking, diagnostics.
//!
//! ```
//! let text = "attention mha { model_dim = 2048, head_dim = 128 }";
//! match ccc::frontend::parse_and_check("mha.attn", text) {
//!     Ok(specs) => assert_eq!(specs[0].query_heads, 16),
//!     Err(diagnostics) => panic!("{}", diagnostics.render()),
//! }
//! ```

pub mod ast;
mod check;
mod diagnostics;
mod hf_config;
mod number;
mod parse;
mod print;
mod suggest;

pub use check::{MAX_DIM, MAX_PARAMS, MAX_SEQUENCE, MAX_WIDTH};
pub use diagnostics::{Diagnostics, Error};
pub use hf_config::{HfConfigError, attn_from_hf_config};
pub use parse::MAX_NESTING;
pub use print::spec_text;

/// Parses `source` into its syntax tree; on syntax errors returns them (the first of each block).
/// `file_name` is only used to render the errors.
pub fn parse(file_name: &str, source: &str) -> Result<ast::File, Diagnostics> {
    let (file, errors) = parse::parse(source);
    if errors.is_empty() { Ok(file) } else { Err(Diagnostics::new(file_name, source, errors)) }
}

/// Parses and checks a whole file: one fully resolved, valid `AttentionSpec` per block, in order,
/// or every error of the file (the first syntax error of each block that does not parse, and every
/// rule broken by the blocks that do), in source order.
pub fn parse_and_check(
    file_name: &str,
    source: &str,
) -> Result<Vec<crate::AttentionSpec>, Diagnostics> {
    let (file, mut errors) = parse::parse(source);
    match check::check(&file, source, errors.is_empty()) {
        Ok(specs) if errors.is_empty() => Ok(specs),
        Ok(_) => Err(Diagnostics::new(file_name, source, errors)),
        Err(check_errors) => {
            errors.extend(check_errors);
            errors.sort_by_key(|error| (error.span.start, error.span.end));
            Err(Diagnostics::new(file_name, source, errors))
        }
    }
}

/// ZAYA1's layer as examples/zaya1.attn describes it, for the unit tests that need a real CCA
/// spec: parsing the example keeps them on the same layer as the CLI and integration tests.
#[cfg(test)]
pub(crate) fn zaya1_example() -> crate::AttentionSpec {
    let text = include_str!("../../examples/zaya1.attn");
    let mut specs = parse_and_check("examples/zaya1.attn", text)
        .unwrap_or_else(|diagnostics| panic!("{}", diagnostics.render()));
    assert_eq!(specs.len(), 1, "examples/zaya1.attn holds one layer");
    specs.remove(0)
}
