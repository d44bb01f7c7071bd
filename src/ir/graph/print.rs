//! The stable text form of the graph (`ccc compile --emit graph`): parameter declarations, then
//! one op per line, `%n = mnemonic operands {attributes} : operand types -> result types`;
//! a fusion group prints as a `kernel` block around its ops.

use super::types::type_text;
use super::{Graph, KernelRole, Op, OpKind, OutputKind};
use std::fmt::{self, Write};

impl fmt::Display for Graph {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "graph @{}.{} {{", self.spec.name, self.entry.name())?;
        for param in &self.params {
            writeln!(f, "  param @{} : {}", param.name, type_text(&param.ty))?;
        }
        let mut open_group = None;
        for op in &self.ops {
            if op.group != open_group {
                if open_group.is_some() {
                    writeln!(f, "  }}")?;
                }
                if let Some(group) = op.group {
                    let role = self.groups.get(group.0).map(|g| g.role);
                    writeln!(f, "  kernel {} {{", role_text(role))?;
                }
                open_group = op.group;
            }
            let indent = if op.group.is_some() { "    " } else { "  " };
            writeln!(f, "{indent}{}", self.op_text(op))?;
        }
        if open_group.is_some() {
            writeln!(f, "  }}")?;
        }
        let outputs: Vec<String> = self
            .outputs
            .iter()
            .map(|o| {
                let saved = if o.kind == OutputKind::Saved {
                    " saved"
                } else {
                    ""
                };
                format!("{}{saved} = %{}", o.name, o.value.0)
            })
            .collect();
        writeln!(f, "  return {}", outputs.join(", "))?;
        writeln!(f, "}}")
    }
}

fn role_text(role: Option<KernelRole>) -> String {
    match role {
        Some(KernelRole::QkPrologue { halo_rows }) => {
            format!("qk_prologue {{halo_rows = {halo_rows}}}")
        }
        Some(role) => role.symbol_suffix().to_string(),
        None => "<missing group>".to_string(),
    }
}

impl Graph {
    fn op_text(&self, op: &Op) -> String {
        let mut line = String::new();
        let results: Vec<String> = op.results.iter().map(|r| format!("%{}", r.0)).collect();
        let mut operands: Vec<String> = op.operands.iter().map(|v| format!("%{}", v.0)).collect();
        operands.extend(op.kind.params().iter().map(|p| match self.params.get(p.0) {
            Some(decl) => format!("@{}", decl.name),
            None => format!("@#{}", p.0),
        }));
        let _ = write!(line, "{} = {}", results.join(", "), op.kind.mnemonic());
        if let OpKind::Input { name, .. } = &op.kind {
            let _ = write!(line, " \"{name}\"");
        }
        if !operands.is_empty() {
            let _ = write!(line, " {}", operands.join(", "));
        }
        let attributes = attributes(&op.kind);
        if !attributes.is_empty() {
            let _ = write!(line, " {{{}}}", attributes.join(", "));
        }
        let type_of = |v: &super::ValueId| match self.values.get(v.0) {
            Some(value) => type_text(&value.ty),
            None => "<undefined>".to_string(),
        };
        let operand_types: Vec<String> = op.operands.iter().map(type_of).collect();
        let result_types: Vec<String> = op.results.iter().map(type_of).collect();
        if operand_types.is_empty() {
            let _ = write!(line, " : {}", result_types.join(", "));
        } else {
            let _ = write!(
                line,
                " : {} -> {}",
                operand_types.join(", "),
                result_types.join(", ")
            );
        }
        line
    }
}

fn attributes(kind: &OpKind) -> Vec<String> {
    match kind {
        OpKind::Input { .. } | OpKind::Linear { .. } | OpKind::Concat => Vec::new(),
        OpKind::TokenShift { rows } | OpKind::CausalPad { rows } => vec![format!("rows = {rows}")],
        OpKind::Split { widths } => vec![format!("widths = {widths:?}")],
        OpKind::ConvStage { kind, width, .. } => {
            vec![
                format!("kind = {}", conv_kind_name(*kind)),
                format!("width = {width}"),
            ]
        }
        OpKind::QkMean { groups, head_dim } => {
            vec![
                format!("groups = {groups}"),
                format!("head_dim = {head_dim}"),
            ]
        }
        OpKind::L2Norm {
            head_dim,
            eps,
            temperature,
        } => {
            let mut attrs = vec![format!("head_dim = {head_dim}"), format!("eps = {eps:?}")];
            if let Some((_, kind)) = temperature {
                attrs.push(format!("temperature = {}", temperature_name(*kind)));
            }
            attrs
        }
        OpKind::Rope {
            head_dim,
            rotary_dim,
            theta,
            style,
        } => vec![
            format!("head_dim = {head_dim}"),
            format!("rotary_dim = {rotary_dim}"),
            format!("theta = {theta:?}"),
            format!("style = {style:?}").to_lowercase(),
        ],
        OpKind::Cast { .. } => Vec::new(),
        OpKind::Attention {
            mask,
            groups,
            head_dim,
            scale,
        } => vec![
            format!("mask = {}", mask_text(*mask)),
            format!("groups = {groups}"),
            format!("head_dim = {head_dim}"),
            format!("scale = {scale:?}"),
        ],
    }
}

pub(crate) fn conv_kind_name(kind: crate::spec::ConvKind) -> &'static str {
    match kind {
        crate::spec::ConvKind::Depthwise => "depthwise",
        crate::spec::ConvKind::PerHead => "per_head",
    }
}

pub(crate) fn mask_text(mask: crate::spec::Mask) -> String {
    match mask {
        crate::spec::Mask::None => "none".into(),
        crate::spec::Mask::Causal => "causal".into(),
        crate::spec::Mask::SlidingWindow { window } => format!("sliding_window({window})"),
    }
}

pub(crate) fn temperature_name(kind: crate::spec::KeyTemperature) -> &'static str {
    match kind {
        crate::spec::KeyTemperature::None => "none",
        crate::spec::KeyTemperature::Learned => "learned",
        crate::spec::KeyTemperature::LearnedExp => "learned_exp",
    }
}
