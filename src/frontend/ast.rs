//! The syntax tree of a `.attn` file: what was written, with the byte span of every part, before
//! any meaning is given to it (that is the checker's job).

use std::ops::Range;

/// Byte offsets `start..end` into the source text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub start: usize,
    pub end: usize,
}

impl Span {
    pub fn new(start: usize, end: usize) -> Span {
        Span { start, end }
    }
    pub fn range(self) -> Range<usize> {
        self.start..self.end
    }
}

impl From<pest::Span<'_>> for Span {
    fn from(span: pest::Span<'_>) -> Span {
        Span::new(span.start(), span.end())
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct File {
    pub blocks: Vec<Block>,
}

/// `attention NAME { items }`.
#[derive(Clone, Debug, PartialEq)]
pub struct Block {
    pub name: Ident,
    pub items: Vec<Item>,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Ident {
    pub text: String,
    pub span: Span,
}

/// One item of a block: its key and what follows the key.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub key: Ident,
    pub kind: ItemKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ItemKind {
    /// `key = value`
    Assign(Value),
    /// `key { items }`
    Block(Vec<Item>),
    /// `key(arguments)`, a bare stage call such as `depthwise(width = 2)`.
    Call(Vec<Argument>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Value {
    pub kind: ValueKind,
    pub span: Span,
}

#[derive(Clone, Debug, PartialEq)]
pub enum ValueKind {
    /// A number as written (sign, digits, `_`, fraction, exponent); the checker decides whether it
    /// must be an integer and whether it fits.
    Number(String),
    Bool(bool),
    Name(String),
    Call {
        name: Ident,
        arguments: Vec<Argument>,
    },
    List(Vec<Value>),
}

/// A call argument: positional (`4096`) or named (`width = 2`).
#[derive(Clone, Debug, PartialEq)]
pub struct Argument {
    pub name: Option<Ident>,
    pub value: Value,
}

impl ItemKind {
    /// How the item was written, for messages such as "`rope` is a block, not a value".
    pub fn form(&self) -> &'static str {
        match self {
            ItemKind::Assign(_) => "a `key = value` item",
            ItemKind::Block(_) => "a `key { ... }` block",
            ItemKind::Call(_) => "a stage call",
        }
    }
}

impl ValueKind {
    /// What kind of value this is, in words, for "expected an integer, found a list".
    pub fn describe(&self) -> String {
        match self {
            ValueKind::Number(text) => format!("the number `{text}`"),
            ValueKind::Bool(value) => format!("`{value}`"),
            ValueKind::Name(name) => format!("the name `{name}`"),
            ValueKind::Call { name, .. } => format!("the call `{}(...)`", name.text),
            ValueKind::List(_) => "a list".to_string(),
        }
    }
}
