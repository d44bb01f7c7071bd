//! The graph verifier: parameter declarations against the spec, SSA order, every op's types
//! against inference, outputs, and fusion groups (contiguous, inputs outside them).

use super::types::{shape_text, type_text};
use super::{Graph, OpKind, TensorType, ValueId, infer_result_types};
use crate::ir::size::SizeExpr;
use std::collections::BTreeSet;
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifyError {
    /// Where: `op 3 (linear)`, `param @q_proj.weight`, `output out`, `group 1`.
    pub location: String,
    pub message: String,
}

impl fmt::Display for VerifyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.location, self.message)
    }
}

impl std::error::Error for VerifyError {}

fn fail<T>(location: impl Into<String>, message: impl Into<String>) -> Result<T, VerifyError> {
    Err(VerifyError {
        location: location.into(),
        message: message.into(),
    })
}

impl Graph {
    pub fn verify(&self) -> Result<(), VerifyError> {
        self.verify_params()?;
        let mut defined: BTreeSet<ValueId> = BTreeSet::new();
        for (index, op) in self.ops.iter().enumerate() {
            let here = format!("op {index} ({})", op.kind.mnemonic());
            for operand in &op.operands {
                if operand.0 >= self.values.len() {
                    return fail(here, format!("operand %{} does not exist", operand.0));
                }
                if !defined.contains(operand) {
                    return fail(
                        here,
                        format!("operand %{} is used before it is defined", operand.0),
                    );
                }
            }
            for param in op.kind.params() {
                if param.0 >= self.params.len() {
                    return fail(here, format!("parameter #{} is not declared", param.0));
                }
            }
            let expected = infer_result_types(self, op).or_else(|msg| fail(&here, msg))?;
            if expected.len() != op.results.len() {
                return fail(
                    here,
                    format!(
                        "has {} result(s), expected {}",
                        op.results.len(),
                        expected.len()
                    ),
                );
            }
            for (result, want) in op.results.iter().zip(&expected) {
                if result.0 >= self.values.len() {
                    return fail(here, format!("result %{} does not exist", result.0));
                }
                if !defined.insert(*result) {
                    return fail(here, format!("result %{} is defined twice", result.0));
                }
                let have = &self.values[result.0].ty;
                if have != want {
                    return fail(
                        here,
                        format!(
                            "result %{} has type {}, expected {}",
                            result.0,
                            type_text(have),
                            type_text(want)
                        ),
                    );
                }
            }
            if let (OpKind::Input { .. }, Some(_)) = (&op.kind, op.group) {
                return fail(here, "an input belongs to no kernel");
            }
        }
        self.verify_outputs(&defined)?;
        self.verify_groups()
    }

    fn verify_params(&self) -> Result<(), VerifyError> {
        let spec_params = self.spec.params();
        let mut seen = BTreeSet::new();
        for decl in &self.params {
            let here = format!("param @{}", decl.name);
            if !seen.insert(decl.name.as_str()) {
                return fail(here, "declared twice");
            }
            let Some(info) = spec_params.iter().find(|p| p.name == decl.name) else {
                return fail(
                    here,
                    format!("spec {} has no such parameter", self.spec.name),
                );
            };
            let want: Vec<SizeExpr> = info.shape.iter().map(|&n| n.into()).collect();
            if decl.ty.shape != want {
                return fail(
                    here,
                    format!(
                        "declared {} but the spec's shape is {}",
                        shape_text(&decl.ty.shape),
                        shape_text(&want)
                    ),
                );
            }
            let stored = TensorType::fixed(&info.shape, super::ElemType::Storage(self.spec.dtype));
            if decl.ty != stored {
                return fail(
                    here,
                    format!(
                        "declared {}, expected {}",
                        type_text(&decl.ty),
                        type_text(&stored)
                    ),
                );
            }
        }
        Ok(())
    }

    fn verify_outputs(&self, defined: &BTreeSet<ValueId>) -> Result<(), VerifyError> {
        if self.outputs.is_empty() {
            return fail("graph", "has no outputs");
        }
        let mut names = BTreeSet::new();
        for output in &self.outputs {
            let here = format!("output {}", output.name);
            if !names.insert(output.name.as_str()) {
                return fail(here, "named twice");
            }
            if !defined.contains(&output.value) {
                return fail(
                    here,
                    format!("returns %{}, which is never defined", output.value.0),
                );
            }
        }
        Ok(())
    }

    fn verify_groups(&self) -> Result<(), VerifyError> {
        let mut closed = BTreeSet::new();
        let mut current = None;
        for (index, op) in self.ops.iter().enumerate() {
            if op.group != current {
                if let Some(previous) = current {
                    closed.insert(previous);
                }
                current = op.group;
                if let Some(group) = current {
                    if group.0 >= self.groups.len() {
                        return fail(
                            format!("op {index}"),
                            format!("group {} does not exist", group.0),
                        );
                    }
                    if closed.contains(&group) {
                        return fail(
                            format!("group {}", group.0),
                            format!("is not contiguous: op {index} is separated from the rest"),
                        );
                    }
                }
            }
        }
        Ok(())
    }
}
