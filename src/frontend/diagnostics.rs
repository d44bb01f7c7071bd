//! Errors of one source file, rendered rustc-style by `codespan-reporting`.

use std::fmt;

use codespan_reporting::diagnostic::{Diagnostic, Label};
use codespan_reporting::files::SimpleFile;
use codespan_reporting::term::{self, termcolor};

use super::ast::Span;

/// One error: a message, the span it is about, optional related spans and help lines.
#[derive(Clone, Debug, PartialEq)]
pub struct Error {
    pub message: String,
    pub span: Span,
    /// Text under the carets of the primary span.
    pub label: String,
    /// Other places that explain the error ("first given here").
    pub related: Vec<(Span, String)>,
    /// `help: ...` lines (what would be right) and `note: ...` lines (why).
    pub notes: Vec<String>,
}

impl Error {
    pub fn new(span: Span, message: impl Into<String>) -> Error {
        Error {
            message: message.into(),
            span,
            label: String::new(),
            related: Vec::new(),
            notes: Vec::new(),
        }
    }
    pub fn label(mut self, label: impl Into<String>) -> Error {
        self.label = label.into();
        self
    }
    pub fn related(mut self, span: Span, label: impl Into<String>) -> Error {
        self.related.push((span, label.into()));
        self
    }
    pub fn help(mut self, help: impl Into<String>) -> Error {
        self.notes.push(format!("help: {}", help.into()));
        self
    }
    pub fn note(mut self, note: impl Into<String>) -> Error {
        self.notes.push(format!("note: {}", note.into()));
        self
    }

    /// Every span the error points at, primary first.
    pub fn spans(&self) -> impl Iterator<Item = Span> + '_ {
        std::iter::once(self.span).chain(self.related.iter().map(|(span, _)| *span))
    }

    fn to_codespan(&self) -> Diagnostic<()> {
        let mut labels = vec![Label::primary((), self.span.range()).with_message(&self.label)];
        labels.extend(
            self.related
                .iter()
                .map(|(span, text)| Label::secondary((), span.range()).with_message(text)),
        );
        Diagnostic::error()
            .with_message(&self.message)
            .with_labels(labels)
            .with_notes(self.notes.clone())
    }
}

/// All errors found in one file, with the file's name and text so that they can be rendered.
#[derive(Clone, Debug)]
pub struct Diagnostics {
    file_name: String,
    source: String,
    errors: Vec<Error>,
}

impl Diagnostics {
    pub fn new(file_name: &str, source: &str, errors: Vec<Error>) -> Diagnostics {
        Diagnostics { file_name: file_name.to_string(), source: source.to_string(), errors }
    }

    pub fn errors(&self) -> &[Error] {
        &self.errors
    }

    /// Renders every error, then a summary line, without colour (stable text for snapshots and
    /// pipes).
    pub fn render(&self) -> String {
        let mut buffer = termcolor::NoColor::new(Vec::new());
        self.emit(&mut buffer);
        String::from_utf8_lossy(&buffer.into_inner()).into_owned()
    }

    /// Renders every error, then a summary line, to a colour-capable writer (ANSI colours when
    /// `writer` supports them).
    pub fn emit(&self, writer: &mut dyn termcolor::WriteColor) {
        let file = SimpleFile::new(self.file_name.as_str(), self.source.as_str());
        let config = term::Config::default();
        for error in &self.errors {
            // Spans come from the parser and checker and always lie inside the source; should one
            // not, print the message alone rather than lose the error.
            if term::emit_to_write_style(writer, &config, &file, &error.to_codespan()).is_err() {
                let _ = writeln!(writer, "error: {}\n", error.message);
            }
        }
        let count = self.errors.len();
        let plural = if count == 1 { "" } else { "s" };
        let _ = writeln!(writer, "error: {} has {count} error{plural}", self.file_name);
    }
}

impl Diagnostics {
    /// Every error as one line of JSON (`--message-format json`, in the manner of cargo's):
    /// `{"level": "error", "message", "file", "line", "column", "end_line", "end_column",
    /// "label", "notes": [..], "related": [{"line", "column", "label"}]}`, lines and columns
    /// 1-based, columns counted in characters.
    pub fn json_lines(&self) -> Vec<String> {
        let position = |offset: usize| {
            let before = &self.source[..offset.min(self.source.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |tail| tail.chars().count()) + 1;
            (line, column)
        };
        self.errors
            .iter()
            .map(|error| {
                let (line, column) = position(error.span.start);
                let (end_line, end_column) = position(error.span.end);
                let related: Vec<serde_json::Value> = error
                    .related
                    .iter()
                    .map(|(span, label)| {
                        let (line, column) = position(span.start);
                        serde_json::json!({"line": line, "column": column, "label": label})
                    })
                    .collect();
                serde_json::json!({
                    "level": "error", "message": error.message, "file": self.file_name,
                    "line": line, "column": column, "end_line": end_line, "end_column": end_column,
                    "label": error.label, "notes": error.notes, "related": related,
                })
                .to_string()
            })
            .collect()
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.render())
    }
}

impl std::error::Error for Diagnostics {}
