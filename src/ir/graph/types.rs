//! Type inference: the result types each op must have, given its operands and attributes.
//! The builder creates values with these types and the verifier checks recorded types against
//! them, so one function states every op's typing rule.

use super::{ElemType, Graph, Layout, Op, OpKind, ParamId, TensorType, seq_offset, seq_plus};
use crate::ir::size::SizeExpr;

type Rule = Result<Vec<TensorType>, String>;

/// The types of `op`'s results, or why its operands or attributes are inconsistent.
pub fn infer_result_types(graph: &Graph, op: &Op) -> Rule {
    let operand_types: Vec<&TensorType> = op
        .operands
        .iter()
        .map(|v| {
            graph
                .values
                .get(v.0)
                .map(|value| &value.ty)
                .ok_or_else(|| format!("operand %{} does not exist", v.0))
        })
        .collect::<Result<_, _>>()?;
    let param_shape = |id: ParamId| -> Result<Vec<SizeExpr>, String> {
        graph
            .params
            .get(id.0)
            .map(|p| p.ty.shape.clone())
            .ok_or_else(|| format!("parameter #{} is not declared", id.0))
    };
    let expect_operands = |count: usize| -> Result<(), String> {
        if operand_types.len() == count {
            Ok(())
        } else {
            Err(format!(
                "takes {count} operand(s), has {}",
                operand_types.len()
            ))
        }
    };
    let storage = ElemType::Storage(graph.spec.dtype);
    match &op.kind {
        OpKind::Input { width, .. } => {
            expect_operands(0)?;
            Ok(vec![TensorType::activation(
                SizeExpr::seq_len(),
                *width,
                storage,
            )])
        }
        OpKind::Linear { weight, bias } => {
            expect_operands(1)?;
            let (rows, inputs) = rows_and_channels(operand_types[0])?;
            if operand_types[0].elem != storage {
                return Err(format!(
                    "GEMM operand must be stored as {}, is {}",
                    storage.name(),
                    operand_types[0].elem.name()
                ));
            }
            let weight_shape = param_shape(*weight)?;
            let outputs = match weight_shape.as_slice() {
                [SizeExpr::Const(out), SizeExpr::Const(inp)] if *inp as usize == inputs => *out,
                _ => {
                    return Err(format!(
                        "weight {} does not map {inputs} input channels",
                        shape_text(&weight_shape)
                    ));
                }
            };
            if let Some(bias) = bias {
                let bias_shape = param_shape(*bias)?;
                if bias_shape != [SizeExpr::c(outputs)] {
                    return Err(format!(
                        "bias {} does not match {outputs} output channels",
                        shape_text(&bias_shape)
                    ));
                }
            }
            Ok(vec![TensorType::activation(
                rows,
                outputs as usize,
                ElemType::F32,
            )])
        }
        OpKind::TokenShift { rows } => {
            expect_operands(1)?;
            rows_and_channels(operand_types[0])?;
            if *rows == 0 {
                return Err("a token shift of 0 rows".into());
            }
            Ok(vec![operand_types[0].clone()])
        }
        OpKind::Concat => {
            if operand_types.is_empty() {
                return Err("concat needs at least one operand".into());
            }
            let (rows, _) = rows_and_channels(operand_types[0])?;
            let elem = operand_types[0].elem;
            let mut total = 0;
            for ty in &operand_types {
                let (r, c) = rows_and_channels(ty)?;
                if r != rows || ty.elem != elem {
                    return Err(format!(
                        "operands disagree: {} and {}",
                        type_text(operand_types[0]),
                        type_text(ty)
                    ));
                }
                total += c;
            }
            Ok(vec![TensorType::activation(rows, total, elem)])
        }
        OpKind::Split { widths } => {
            expect_operands(1)?;
            let (rows, channels) = rows_and_channels(operand_types[0])?;
            if widths.iter().sum::<usize>() != channels || widths.contains(&0) {
                return Err(format!(
                    "widths {widths:?} do not partition {channels} channels"
                ));
            }
            let elem = operand_types[0].elem;
            Ok(widths
                .iter()
                .map(|&w| TensorType::activation(rows.clone(), w, elem))
                .collect())
        }
        OpKind::CausalPad { rows } => {
            expect_operands(1)?;
            let (length, channels) = rows_and_channels(operand_types[0])?;
            let history = history_rows(&length)?;
            Ok(vec![TensorType::activation(
                seq_plus(history + rows),
                channels,
                operand_types[0].elem,
            )])
        }
        OpKind::ConvStage {
            kind,
            width,
            head_dim,
            weight,
            bias,
        } => {
            expect_operands(1)?;
            let (length, channels) = rows_and_channels(operand_types[0])?;
            expect_f32(operand_types[0])?;
            let history = history_rows(&length)?;
            if *width == 0 || history < width - 1 {
                return Err(format!(
                    "a width-{width} stage needs {} rows of history, the input has {history}",
                    width.saturating_sub(1)
                ));
            }
            let in_per_group = kind.inputs_per_output(*head_dim);
            check_whole_heads(channels, *head_dim)?;
            let want = [
                SizeExpr::c(channels as u64),
                in_per_group.into(),
                (*width).into(),
            ];
            let weight_shape = param_shape(*weight)?;
            if weight_shape != want {
                return Err(format!(
                    "weight {} should be {}",
                    shape_text(&weight_shape),
                    shape_text(&want)
                ));
            }
            let bias_shape = param_shape(*bias)?;
            if bias_shape != [SizeExpr::c(channels as u64)] {
                return Err(format!(
                    "bias {} should be [{channels}]",
                    shape_text(&bias_shape)
                ));
            }
            Ok(vec![TensorType::activation(
                seq_plus(history - (width - 1)),
                channels,
                ElemType::F32,
            )])
        }
        OpKind::QkMean { groups, head_dim } => {
            expect_operands(4)?;
            let [yq, yk, q0, k0] = [0, 1, 2, 3].map(|i| operand_types[i]);
            for ty in [yq, yk, q0, k0] {
                token_rows(ty)?;
                expect_f32(ty)?;
            }
            let (q_width, k_width) = (channels_of(yq)?, channels_of(yk)?);
            if channels_of(q0)? != q_width || channels_of(k0)? != k_width {
                return Err("pre-convolution q0/k0 do not match yq/yk".into());
            }
            if *head_dim == 0 || k_width % head_dim != 0 || q_width != k_width * groups {
                return Err(format!(
                    "{q_width} query channels are not {groups} group(s) of {k_width} key channels"
                ));
            }
            Ok(vec![yq.clone(), yk.clone()])
        }
        OpKind::L2Norm {
            head_dim,
            eps,
            temperature,
        } => {
            expect_operands(1)?;
            let ty = operand_types[0];
            let channels = per_token_head_channels(ty, *head_dim)?;
            if !(eps.is_finite() && *eps >= 0.0) {
                return Err(format!("eps {eps:?} must be finite and not negative"));
            }
            if let Some((temp, _)) = temperature {
                let temp_shape = param_shape(*temp)?;
                if temp_shape != [SizeExpr::c((channels / head_dim) as u64)] {
                    return Err(format!(
                        "temperature {} should have one entry per head ({})",
                        shape_text(&temp_shape),
                        channels / head_dim
                    ));
                }
            }
            Ok(vec![ty.clone()])
        }
        OpKind::Rope {
            head_dim,
            rotary_dim,
            theta,
            ..
        } => {
            expect_operands(1)?;
            let ty = operand_types[0];
            per_token_head_channels(ty, *head_dim)?;
            if *rotary_dim == 0 || rotary_dim % 2 != 0 || rotary_dim > head_dim {
                return Err(format!(
                    "rotary width {rotary_dim} must be even, in 2..={head_dim}"
                ));
            }
            if !(theta.is_finite() && *theta > 0.0) {
                return Err(format!("theta {theta:?} must be positive and finite"));
            }
            Ok(vec![ty.clone()])
        }
        OpKind::Cast { elem, layout } => {
            expect_operands(1)?;
            let ty = operand_types[0];
            if let Layout::Bshd { heads } = layout {
                token_rows(ty)?;
                let channels = channels_of(ty)?;
                if *heads == 0 || channels % heads != 0 {
                    return Err(format!("{channels} channels are not {heads} whole heads"));
                }
            }
            Ok(vec![TensorType::new(ty.shape.clone(), *elem, *layout)])
        }
        OpKind::Attention {
            groups,
            head_dim,
            scale,
            ..
        } => {
            expect_operands(3)?;
            let [q, k, v] = [0, 1, 2].map(|i| operand_types[i]);
            let query_heads = heads_of(q, *head_dim, storage)?;
            let kv_heads = heads_of(k, *head_dim, storage)?;
            if heads_of(v, *head_dim, storage)? != kv_heads {
                return Err("values and keys have different head counts".into());
            }
            if query_heads != kv_heads * groups {
                return Err(format!(
                    "{query_heads} query heads are not {groups} group(s) of {kv_heads} kv heads"
                ));
            }
            if !(scale.is_finite() && *scale > 0.0) {
                return Err(format!("scale {scale:?} must be positive and finite"));
            }
            let lse = TensorType::new(
                vec![SizeExpr::batch(), query_heads.into(), SizeExpr::seq_len()],
                ElemType::F32,
                Layout::RowMajor,
            );
            Ok(vec![q.clone(), lse])
        }
    }
}

/// (rows, channels) of a [B, rows, channels] activation.
fn rows_and_channels(ty: &TensorType) -> Result<(SizeExpr, usize), String> {
    match ty.shape.as_slice() {
        [b, rows, SizeExpr::Const(c)] if *b == SizeExpr::batch() => Ok((rows.clone(), *c as usize)),
        _ => Err(format!(
            "expects a [B, rows, channels] activation, got {}",
            type_text(ty)
        )),
    }
}

fn channels_of(ty: &TensorType) -> Result<usize, String> {
    rows_and_channels(ty).map(|(_, c)| c)
}

/// Ops that use absolute token positions need exactly S rows.
fn token_rows(ty: &TensorType) -> Result<(), String> {
    let (rows, _) = rows_and_channels(ty)?;
    if rows == SizeExpr::seq_len() {
        Ok(())
    } else {
        Err(format!(
            "expects one row per token (S rows), got {}",
            type_text(ty)
        ))
    }
}

fn check_whole_heads(channels: usize, head_dim: usize) -> Result<(), String> {
    if head_dim == 0 || !channels.is_multiple_of(head_dim) {
        return Err(format!(
            "{channels} channels are not whole heads of {head_dim}"
        ));
    }
    Ok(())
}

/// Channels of a per-token f32 operand (S rows) that holds whole heads of `head_dim`.
fn per_token_head_channels(ty: &TensorType, head_dim: usize) -> Result<usize, String> {
    token_rows(ty)?;
    expect_f32(ty)?;
    let channels = channels_of(ty)?;
    check_whole_heads(channels, head_dim)?;
    Ok(channels)
}

fn history_rows(length: &SizeExpr) -> Result<usize, String> {
    seq_offset(length).ok_or_else(|| format!("sequence axis {length} is not S plus history rows"))
}

fn expect_f32(ty: &TensorType) -> Result<(), String> {
    if ty.elem == ElemType::F32 {
        Ok(())
    } else {
        Err(format!("expects f32, got {}", type_text(ty)))
    }
}

/// Heads of an attention operand: S rows, stored, in BSHD layout with whole heads of d.
fn heads_of(ty: &TensorType, head_dim: usize, storage: ElemType) -> Result<usize, String> {
    token_rows(ty)?;
    let channels = channels_of(ty)?;
    match ty.layout {
        Layout::Bshd { heads } if ty.elem == storage && heads * head_dim == channels => Ok(heads),
        _ => Err(format!(
            "attention operands must be {} in BSHD layout with heads of {head_dim}, got {}",
            storage.name(),
            type_text(ty)
        )),
    }
}

pub(super) fn shape_text(shape: &[SizeExpr]) -> String {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    format!("[{}]", dims.join(","))
}

pub(super) fn type_text(ty: &TensorType) -> String {
    let layout = match ty.layout {
        Layout::RowMajor => String::new(),
        Layout::Bshd { heads } => format!("#bshd({heads})"),
    };
    format!("{}x{}{layout}", shape_text(&ty.shape), ty.elem.name())
}

impl std::fmt::Display for TensorType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&type_text(self))
    }
}
