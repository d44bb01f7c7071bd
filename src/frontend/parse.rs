//! `.attn` text → syntax tree, with parse errors in plain words.

use pest::Parser as _;
use pest::error::{ErrorVariant, InputLocation};
use pest::iterators::Pair;

use super::ast::{Argument, Block, File, Ident, Item, ItemKind, Span, Value, ValueKind};
use super::diagnostics::Error;

#[derive(pest_derive::Parser)]
#[grammar = "../grammar/attn.pest"]
struct AttnParser;

/// Brackets may nest at most this deep. The grammar and the tree walk recurse once per level, so
/// the bound keeps hostile input (`[[[[...`) from exhausting the stack; real specs use 3 levels.
pub const MAX_NESTING: usize = 32;

/// Parses a whole file: the blocks that parse, and the syntax errors (none when the file parses).
///
/// Each block is parsed on its own (a block starts at a line that begins `attention NAME {`, which
/// no valid item can), since pest stops at its first error: one syntax error per broken block, and
/// the blocks that do parse still reach the checker. Nesting is bounded per part, which is also
/// what each parse and tree walk recurses over.
pub fn parse(source: &str) -> (File, Vec<Error>) {
    let mut bounds = block_starts(source);
    if bounds.first() != Some(&0) {
        bounds.insert(0, 0);
    }
    bounds.push(source.len());
    let mut blocks = Vec::new();
    let mut errors = Vec::new();
    for part in bounds.windows(2) {
        match check_nesting(source, part[0], part[1])
            .and_then(|()| parse_part(source, part[0], part[1]))
        {
            Ok(part_blocks) => blocks.extend(part_blocks),
            Err(error) => errors.push(error),
        }
    }
    (File { blocks }, errors)
}

/// Parses `source[start..end]` as a sequence of blocks, with spans into the whole `source`.
fn parse_part(source: &str, start: usize, end: usize) -> Result<Vec<Block>, Error> {
    let mut pairs = AttnParser::parse(Rule::file, &source[start..end])
        .map_err(|error| describe_error(source, start, end, error))?;
    let walker = Walker { offset: start };
    let file = pairs.next().map(|pair| pair.into_inner()).into_iter().flatten();
    Ok(file.filter(|pair| pair.as_rule() == Rule::block).map(|pair| walker.block(pair)).collect())
}

/// Byte offsets of the lines (outside comments) that begin `attention NAME {`.
fn block_starts(source: &str) -> Vec<usize> {
    let bytes = source.as_bytes();
    let mut starts = Vec::new();
    let mut index = 0;
    let mut at_line_start = true;
    while index < bytes.len() {
        match bytes[index] {
            b'\n' => {
                at_line_start = true;
                index += 1;
            }
            b' ' | b'\t' | b'\r' => index += 1,
            b'/' if bytes.get(index + 1) == Some(&b'/') => {
                while index < bytes.len() && bytes[index] != b'\n' {
                    index += 1;
                }
            }
            b'/' if bytes.get(index + 1) == Some(&b'*') => {
                at_line_start = false;
                index = match source[index + 2..].find("*/") {
                    Some(offset) => index + 2 + offset + 2,
                    None => bytes.len(),
                };
            }
            _ => {
                if at_line_start && is_block_header(&bytes[index..]) {
                    starts.push(index);
                }
                at_line_start = false;
                index += 1;
            }
        }
    }
    starts
}

/// Whether `text` begins `attention`, blanks, a name, blanks and `{`.
fn is_block_header(text: &[u8]) -> bool {
    let Some(rest) = text.strip_prefix(b"attention") else {
        return false;
    };
    let is_blank = |b: &u8| *b == b' ' || *b == b'\t';
    let is_name = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_';
    let after_keyword = rest.iter().take_while(|b| is_blank(b)).count();
    let rest = &rest[after_keyword..];
    let name = rest.iter().take_while(|b| is_name(b)).count();
    let rest = &rest[name..];
    let after_name = rest.iter().take_while(|b| is_blank(b)).count();
    after_keyword > 0 && name > 0 && rest.get(after_name) == Some(&b'{')
}

/// Rejects brackets nested deeper than [`MAX_NESTING`] in `source[start..end]` (a part never
/// starts inside a comment, so the part can be scanned alone).
fn check_nesting(source: &str, start: usize, end: usize) -> Result<(), Error> {
    let mut depth = 0usize;
    for (index, byte) in code_brackets(&source[start..end]) {
        let index = start + index;
        if matches!(byte, b'{' | b'(' | b'[') {
            depth += 1;
            if depth > MAX_NESTING {
                return Err(Error::new(Span::new(index, index + 1), "brackets nested too deeply")
                    .label(format!("more than {MAX_NESTING} levels deep"))
                    .note(format!(
                        "`.attn` files may nest `{{`, `(` and `[` at most {MAX_NESTING} levels deep"
                    )));
            }
        } else {
            depth = depth.saturating_sub(1);
        }
    }
    Ok(())
}

/// The last `{` of `source[start..end]` that is not closed in it, for "this `{` is never closed".
fn unclosed_brace(source: &str, start: usize, end: usize) -> Option<usize> {
    let mut open = Vec::new();
    for (index, byte) in code_brackets(&source[start..end]) {
        match byte {
            b'{' => open.push(start + index),
            b'}' => {
                open.pop();
            }
            _ => {}
        }
    }
    open.pop()
}

/// Positions of the brackets outside comments. An unterminated block comment ends the scan
/// (the parser reports it).
fn code_brackets(source: &str) -> impl Iterator<Item = (usize, u8)> + '_ {
    let bytes = source.as_bytes();
    let mut index = 0;
    std::iter::from_fn(move || {
        while index < bytes.len() {
            let at = index;
            index += 1;
            match bytes[at] {
                b'/' if bytes.get(at + 1) == Some(&b'/') => {
                    while index < bytes.len() && bytes[index] != b'\n' {
                        index += 1;
                    }
                }
                b'/' if bytes.get(at + 1) == Some(&b'*') => match source[at + 2..].find("*/") {
                    Some(offset) => index = at + 2 + offset + 2,
                    None => index = bytes.len(),
                },
                byte @ (b'{' | b'(' | b'[' | b'}' | b')' | b']') => return Some((at, byte)),
                _ => {}
            }
        }
        None
    })
}

/// Builds the syntax tree from pest's pairs; `offset` is where the parsed text starts in the file.
struct Walker {
    offset: usize,
}

impl Walker {
    fn span(&self, pair: &Pair<'_, Rule>) -> Span {
        Span::new(self.offset + pair.as_span().start(), self.offset + pair.as_span().end())
    }

    /// An `identifier` or a rule that wraps one (`block_name`, `key`, `argument_name`).
    fn ident(&self, pair: Pair<'_, Rule>) -> Ident {
        Ident { text: pair.as_str().to_string(), span: self.span(&pair) }
    }

    fn block(&self, pair: Pair<'_, Rule>) -> Block {
        let span = self.span(&pair);
        let mut name = None;
        let mut items = Vec::new();
        for part in pair.into_inner() {
            match part.as_rule() {
                Rule::block_name => name = Some(self.ident(part)),
                Rule::body => items = self.body(part),
                _ => {}
            }
        }
        // The grammar guarantees a name; an empty one would only make error messages vaguer.
        let name = name.unwrap_or(Ident { text: String::new(), span });
        Block { name, items, span }
    }

    fn body(&self, pair: Pair<'_, Rule>) -> Vec<Item> {
        pair.into_inner()
            .filter(|part| part.as_rule() == Rule::item)
            .map(|part| self.item(part))
            .collect()
    }

    fn item(&self, pair: Pair<'_, Rule>) -> Item {
        let span: Span = self.span(&pair);
        let mut key = None;
        let mut kind = None;
        for part in pair.into_inner() {
            match part.as_rule() {
                Rule::key => key = Some(self.ident(part)),
                Rule::body => kind = Some(ItemKind::Block(self.body(part))),
                Rule::arguments => kind = Some(ItemKind::Call(self.arguments(part))),
                Rule::value => kind = Some(ItemKind::Assign(self.value(part))),
                _ => {}
            }
        }
        let key = key.unwrap_or(Ident { text: String::new(), span });
        let kind = kind.unwrap_or(ItemKind::Block(Vec::new()));
        Item { key, kind, span }
    }

    fn arguments(&self, pair: Pair<'_, Rule>) -> Vec<Argument> {
        pair.into_inner()
            .filter(|part| part.as_rule() == Rule::argument)
            .map(|part| self.argument(part))
            .collect()
    }

    fn argument(&self, pair: Pair<'_, Rule>) -> Argument {
        let span: Span = self.span(&pair);
        let mut name = None;
        let mut argument_value = None;
        for part in pair.into_inner() {
            match part.as_rule() {
                Rule::argument_name => name = Some(self.ident(part)),
                Rule::value => argument_value = Some(self.value(part)),
                _ => {}
            }
        }
        let value = argument_value.unwrap_or(Value { kind: ValueKind::List(Vec::new()), span });
        Argument { name, value }
    }

    /// `pair` is a `value`; its single child says which kind.
    fn value(&self, pair: Pair<'_, Rule>) -> Value {
        let span: Span = self.span(&pair);
        let Some(inner) = pair.into_inner().next() else {
            return Value { kind: ValueKind::List(Vec::new()), span };
        };
        let kind = match inner.as_rule() {
            Rule::number => ValueKind::Number(inner.as_str().to_string()),
            Rule::boolean => ValueKind::Bool(inner.as_str() == "true"),
            Rule::name => ValueKind::Name(inner.as_str().to_string()),
            Rule::list => ValueKind::List(
                inner
                    .into_inner()
                    .filter(|part| part.as_rule() == Rule::value)
                    .map(|part| self.value(part))
                    .collect(),
            ),
            Rule::call => {
                let mut name = None;
                let mut call_arguments = Vec::new();
                for part in inner.into_inner() {
                    match part.as_rule() {
                        Rule::identifier => name = Some(self.ident(part)),
                        Rule::arguments => call_arguments = self.arguments(part),
                        _ => {}
                    }
                }
                let name = name.unwrap_or(Ident { text: String::new(), span });
                ValueKind::Call { name, arguments: call_arguments }
            }
            _ => ValueKind::List(Vec::new()),
        };
        Value { kind, span }
    }
}

/// What the parser wanted, in words a spec author knows.
fn expected_words(rule: Rule) -> Option<&'static str> {
    Some(match rule {
        // `file` is reported when nothing at all could be parsed at the start of the file.
        Rule::file | Rule::attention_keyword | Rule::block => "`attention NAME { ... }`",
        Rule::block_name => "a block name",
        Rule::identifier | Rule::name => "a name",
        Rule::end_of_file => "the end of the file",
        Rule::item | Rule::key => "an item (`key = value`, `key { ... }` or a stage call)",
        Rule::separator => "a separator (new line, `;` or `,`)",
        Rule::value | Rule::argument => "a value",
        Rule::argument_name => "an argument name",
        Rule::number | Rule::digits => "a number",
        Rule::open_brace => "`{`",
        Rule::close_brace => "`}`",
        Rule::open_paren => "`(`",
        Rule::close_paren => "`)`",
        Rule::open_bracket => "`[`",
        Rule::close_bracket => "`]`",
        Rule::comma => "`,`",
        Rule::assign => "`=`",
        _ => return None,
    })
}

/// Describes the text at `position` for "found ..." (one character, a word, or the end).
fn found_at(source: &str, position: usize) -> (String, Span) {
    let rest = &source[position..];
    let Some(first) = rest.chars().next() else {
        return ("the end of the file".to_string(), Span::new(position, position));
    };
    if first == '\n' || first == '\r' {
        return (
            "the end of the line".to_string(),
            Span::new(position, position + first.len_utf8()),
        );
    }
    if first.is_ascii_alphanumeric() || first == '_' {
        let length =
            rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(rest.len());
        return (format!("`{}`", &rest[..length]), Span::new(position, position + length));
    }
    if rest.starts_with("/*") {
        return (
            "a `/*` comment that is never closed".to_string(),
            Span::new(position, position + 2),
        );
    }
    let shown = if first.is_control() { format!("{:?}", first) } else { format!("`{first}`") };
    (shown, Span::new(position, position + first.len_utf8()))
}

/// Turns pest's error in the part `source[start..end]` into one in words, located in `source`.
fn describe_error(
    source: &str,
    start: usize,
    end: usize,
    error: pest::error::Error<Rule>,
) -> Error {
    let position = match error.location {
        InputLocation::Pos(position) => position,
        InputLocation::Span((span_start, _)) => span_start,
    };
    let position = (start + position).min(end);
    let (found, span) = found_at(source, position);
    let mut expected: Vec<&str> = match &error.variant {
        ErrorVariant::ParsingError { positives, .. } => {
            positives.iter().filter_map(|rule| expected_words(*rule)).collect()
        }
        ErrorVariant::CustomError { .. } => Vec::new(),
    };
    let at_end = position >= end;
    if at_end {
        // Another separator never helps at the end of a block; what is missing is the rest.
        expected.retain(|words| !words.starts_with("a separator"));
    }
    expected.sort_unstable();
    expected.dedup();
    let message = match expected.as_slice() {
        [] => format!("unexpected {found}"),
        [only] => format!("expected {only}, found {found}"),
        [init @ .., last] => format!("expected {} or {last}, found {found}", init.join(", ")),
    };
    let mut error = Error::new(span, message).label(match expected.as_slice() {
        [] => "not understood here".to_string(),
        _ => "unexpected here".to_string(),
    });
    if found.contains("never closed") {
        error = error.help("close the comment with `*/`");
    }
    if at_end
        && expected.contains(&"`}`")
        && let Some(open) = unclosed_brace(source, start, position)
    {
        error = error.related(Span::new(open, open + 1), "this `{` is never closed");
    }
    if expected.contains(&"`=`") {
        error = error.help("an item is written `key = value`, `key { ... }` or `stage(width = K)`");
    }
    error
}
