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
mod number;
mod parse;
mod print;
mod suggest;

pub use check::{MAX_DIM, MAX_PARAMS, MAX_SEQUENCE, MAX_WIDTH};
pub use diagnostics::{Diagnostics, Error};
pub use parse::MAX_NESTING;
pub use print::spec_text;

/// Parses `source` into its syntax tree; on a syntax error returns that error (the first one).
/// `file_name` is only used to render the error.
pub fn parse(file_name: &str, source: &str) -> Result<ast::File, Diagnostics> {
    parse::parse(source).map_err(|error| Diagnostics::new(file_name, source, vec![error]))
}

/// Parses and checks a whole file: one fully resolved, valid `AttentionSpec` per block, in order,
/// or every error of the file (the first syntax error, or all rule violations).
pub fn parse_and_check(
    file_name: &str,
    source: &str,
) -> Result<Vec<crate::AttentionSpec>, Diagnostics> {
    let file = parse(file_name, source)?;
    check::check(&file, source).map_err(|errors| Diagnostics::new(file_name, source, errors))
}
