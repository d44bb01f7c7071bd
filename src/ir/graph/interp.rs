//! The graph interpreter: runs a graph in f64 on concrete inputs, op by op in program order.
//!
//! Fusion groups only tag ops, so the same loop runs a graph before and after every pass; tests
//! compare the outputs across passes. Casts are exact here (rounding to bf16 is judged on the
//! GPU against the reference, not by this tool). Every result is checked against its type's
//! shape evaluated at the call's sizes, so a mistyped graph fails loudly instead of computing
//! something plausible.

use super::{Graph, OpKind, ValueId};
use crate::ir::size::SizeEnv;
use crate::spec::{KeyTemperature, RopeStyle};
use std::collections::BTreeMap;
use std::fmt;

/// A dense row-major f64 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Array {
    pub shape: Vec<usize>,
    pub data: Vec<f64>,
}

impl Array {
    pub fn zeros(shape: Vec<usize>) -> Array {
        let len = shape.iter().product();
        Array {
            shape,
            data: vec![0.0; len],
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InterpError(pub String);

impl fmt::Display for InterpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "graph interpreter: {}", self.0)
    }
}

impl std::error::Error for InterpError {}

/// Runs `graph` for `env`'s batch and sequence length. `inputs` maps input names (`x`) and
/// `params` maps parameter names to arrays of the declared shapes. Returns every graph output.
pub fn run(
    graph: &Graph,
    env: SizeEnv,
    inputs: &BTreeMap<String, Array>,
    params: &BTreeMap<String, Array>,
) -> Result<BTreeMap<String, Array>, InterpError> {
    let err = |msg: String| InterpError(msg);
    // Kernels below index without bounds checks of their own: only typed graphs get that far.
    graph.verify().map_err(|e| err(e.to_string()))?;
    for decl in &graph.params {
        let want = concrete_shape(&decl.ty.shape, &env)?;
        match params.get(&decl.name) {
            Some(array) if array.shape == want => {}
            Some(array) => {
                return Err(err(format!(
                    "parameter {} has shape {:?}, expected {want:?}",
                    decl.name, array.shape
                )));
            }
            None => return Err(err(format!("parameter {} is missing", decl.name))),
        }
    }
    let param = |id: super::ParamId| -> Result<&Array, InterpError> {
        let decl = graph
            .params
            .get(id.0)
            .ok_or_else(|| err(format!("no parameter #{}", id.0)))?;
        params
            .get(&decl.name)
            .ok_or_else(|| err(format!("parameter {} is missing", decl.name)))
    };

    let mut values: BTreeMap<ValueId, Array> = BTreeMap::new();
    for (index, op) in graph.ops.iter().enumerate() {
        let operands: Vec<&Array> = op
            .operands
            .iter()
            .map(|v| {
                values
                    .get(v)
                    .ok_or_else(|| err(format!("op {index} reads undefined %{}", v.0)))
            })
            .collect::<Result<_, _>>()?;
        let results: Vec<Array> = match &op.kind {
            OpKind::Input { name, .. } => {
                let array = inputs
                    .get(name)
                    .ok_or_else(|| err(format!("input {name} is missing")))?;
                vec![array.clone()]
            }
            OpKind::Linear { weight, bias } => {
                let bias = bias.map(&param).transpose()?;
                vec![linear(operands[0], param(*weight)?, bias)]
            }
            OpKind::TokenShift { rows } => vec![token_shift(operands[0], *rows)],
            OpKind::Concat => vec![concat(&operands)],
            OpKind::Split { widths } => split(operands[0], widths),
            OpKind::CausalPad { rows } => vec![causal_pad(operands[0], *rows)],
            OpKind::ConvStage {
                kind,
                width,
                head_dim,
                weight,
                bias,
            } => {
                let group = kind.inputs_per_output(*head_dim);
                vec![conv(
                    operands[0],
                    param(*weight)?,
                    param(*bias)?,
                    *width,
                    group,
                )]
            }
            OpKind::QkMean { groups, head_dim } => qk_mean(
                [operands[0], operands[1], operands[2], operands[3]],
                *groups,
                *head_dim,
            ),
            OpKind::L2Norm {
                head_dim,
                eps,
                temperature,
            } => {
                let temperature = match temperature {
                    Some((id, kind)) => Some((param(*id)?, *kind)),
                    None => None,
                };
                vec![l2_norm(operands[0], *head_dim, *eps, temperature)]
            }
            OpKind::Rope {
                head_dim,
                rotary_dim,
                theta,
                style,
            } => {
                vec![rope(operands[0], *head_dim, *rotary_dim, *theta, *style)]
            }
            OpKind::Cast { .. } => vec![operands[0].clone()],
            OpKind::Attention {
                mask,
                groups,
                head_dim,
                scale,
            } => attention(
                operands[0],
                operands[1],
                operands[2],
                *mask,
                *groups,
                *head_dim,
                *scale,
            ),
        };
        if results.len() != op.results.len() {
            return Err(err(format!(
                "op {index} produced {} results",
                results.len()
            )));
        }
        for (id, array) in op.results.iter().zip(results) {
            let ty = &graph
                .values
                .get(id.0)
                .ok_or_else(|| err(format!("no value %{}", id.0)))?
                .ty;
            let want = concrete_shape(&ty.shape, &env)?;
            if array.shape != want {
                return Err(err(format!(
                    "op {index} ({}) made %{} with shape {:?}, its type says {want:?}",
                    op.kind.mnemonic(),
                    id.0,
                    array.shape
                )));
            }
            values.insert(*id, array);
        }
    }
    graph
        .outputs
        .iter()
        .map(|o| {
            let array = values
                .get(&o.value)
                .ok_or_else(|| err(format!("output {} undefined", o.name)))?;
            Ok((o.name.clone(), array.clone()))
        })
        .collect()
}

fn concrete_shape(
    shape: &[crate::ir::size::SizeExpr],
    env: &SizeEnv,
) -> Result<Vec<usize>, InterpError> {
    shape
        .iter()
        .map(|d| {
            d.eval(env)
                .map_err(|error| InterpError(format!("size {d} {error}")))
                .and_then(|n| usize::try_from(n).map_err(|_| InterpError(format!("size {d} overflows"))))
        })
        .collect()
}

/// [B, L, C] dimensions.
fn dims3(a: &Array) -> (usize, usize, usize) {
    (a.shape[0], a.shape[1], a.shape[2])
}

fn linear(x: &Array, weight: &Array, bias: Option<&Array>) -> Array {
    let (batch, rows, inputs) = dims3(x);
    let outputs = weight.shape[0];
    let mut y = Array::zeros(vec![batch, rows, outputs]);
    for row in 0..batch * rows {
        let x_row = &x.data[row * inputs..(row + 1) * inputs];
        for o in 0..outputs {
            let w_row = &weight.data[o * inputs..(o + 1) * inputs];
            let dot: f64 = x_row.iter().zip(w_row).map(|(a, b)| a * b).sum();
            y.data[row * outputs + o] = dot + bias.map_or(0.0, |b| b.data[o]);
        }
    }
    y
}

fn token_shift(x: &Array, shift: usize) -> Array {
    let (batch, rows, channels) = dims3(x);
    let mut y = Array::zeros(x.shape.clone());
    for b in 0..batch {
        for t in shift..rows {
            let src = (b * rows + t - shift) * channels;
            let dst = (b * rows + t) * channels;
            y.data[dst..dst + channels].copy_from_slice(&x.data[src..src + channels]);
        }
    }
    y
}

fn concat(parts: &[&Array]) -> Array {
    let (batch, rows, _) = dims3(parts[0]);
    let total: usize = parts.iter().map(|p| p.shape[2]).sum();
    let mut y = Array::zeros(vec![batch, rows, total]);
    for row in 0..batch * rows {
        let mut offset = 0;
        for part in parts {
            let width = part.shape[2];
            y.data[row * total + offset..row * total + offset + width]
                .copy_from_slice(&part.data[row * width..(row + 1) * width]);
            offset += width;
        }
    }
    y
}

fn split(x: &Array, widths: &[usize]) -> Vec<Array> {
    let (batch, rows, channels) = dims3(x);
    let mut offset = 0;
    widths
        .iter()
        .map(|&width| {
            let mut part = Array::zeros(vec![batch, rows, width]);
            for row in 0..batch * rows {
                part.data[row * width..(row + 1) * width].copy_from_slice(
                    &x.data[row * channels + offset..row * channels + offset + width],
                );
            }
            offset += width;
            part
        })
        .collect()
}

fn causal_pad(x: &Array, pad: usize) -> Array {
    let (batch, rows, channels) = dims3(x);
    let mut y = Array::zeros(vec![batch, rows + pad, channels]);
    for b in 0..batch {
        let src = b * rows * channels;
        let dst = (b * (rows + pad) + pad) * channels;
        y.data[dst..dst + rows * channels].copy_from_slice(&x.data[src..src + rows * channels]);
    }
    y
}

/// PyTorch Conv1d over the row axis, no padding, groups of `group` consecutive channels
/// (1: depthwise; d: per head). Weight [C, group, K]; tap 0 multiplies the oldest row.
fn conv(x: &Array, weight: &Array, bias: &Array, taps: usize, group: usize) -> Array {
    let (batch, rows, channels) = dims3(x);
    let out_rows = rows + 1 - taps;
    let mut y = Array::zeros(vec![batch, out_rows, channels]);
    for b in 0..batch {
        for t in 0..out_rows {
            for c in 0..channels {
                let first = c / group * group;
                let mut acc = bias.data[c];
                for i in 0..group {
                    for k in 0..taps {
                        let w = weight.data[(c * group + i) * taps + k];
                        acc += w * x.data[(b * rows + t + k) * channels + first + i];
                    }
                }
                y.data[(b * out_rows + t) * channels + c] = acc;
            }
        }
    }
    y
}

fn qk_mean(operands: [&Array; 4], groups: usize, d: usize) -> Vec<Array> {
    let [yq, yk, q0, k0] = operands;
    let (batch, rows, q_width) = dims3(yq);
    let k_width = yk.shape[2];
    let kv_heads = k_width / d;
    let (mut q, mut k) = (yq.clone(), yk.clone());
    for row in 0..batch * rows {
        for h in 0..kv_heads * groups {
            let j = h / groups;
            for c in 0..d {
                q.data[row * q_width + h * d + c] += 0.5 * q0.data[row * q_width + h * d + c]
                    + 0.5 * k0.data[row * k_width + j * d + c];
            }
        }
        for j in 0..kv_heads {
            for c in 0..d {
                let mean: f64 = (0..groups)
                    .map(|g| q0.data[row * q_width + (j * groups + g) * d + c])
                    .sum::<f64>()
                    / groups as f64;
                k.data[row * k_width + j * d + c] +=
                    0.5 * k0.data[row * k_width + j * d + c] + 0.5 * mean;
            }
        }
    }
    vec![q, k]
}

fn l2_norm(x: &Array, d: usize, eps: f64, temperature: Option<(&Array, KeyTemperature)>) -> Array {
    let (batch, rows, channels) = dims3(x);
    let mut y = x.clone();
    for row in 0..batch * rows {
        for h in 0..channels / d {
            let start = row * channels + h * d;
            let head = &x.data[start..start + d];
            let squared: f64 = head.iter().map(|v| v * v).sum();
            let tau = match temperature {
                None | Some((_, KeyTemperature::None)) => 1.0,
                Some((temp, KeyTemperature::Learned)) => temp.data[h],
                Some((temp, KeyTemperature::LearnedExp)) => temp.data[h].clamp(1e-7, 2.0).exp(),
            };
            let factor = (d as f64).sqrt() * tau / (squared + eps).sqrt();
            for (out, value) in y.data[start..start + d].iter_mut().zip(head) {
                *out = value * factor;
            }
        }
    }
    y
}

fn rope(x: &Array, d: usize, r: usize, theta: f64, style: RopeStyle) -> Array {
    let (batch, rows, channels) = dims3(x);
    let mut y = x.clone();
    for b in 0..batch {
        for t in 0..rows {
            for h in 0..channels / d {
                let start = (b * rows + t) * channels + h * d;
                for i in 0..r / 2 {
                    let angle = t as f64 * theta.powf(-2.0 * i as f64 / r as f64);
                    let (sin, cos) = angle.sin_cos();
                    let (a, c) = match style {
                        RopeStyle::Neox => (start + i, start + i + r / 2),
                        RopeStyle::Interleaved => (start + 2 * i, start + 2 * i + 1),
                    };
                    let (x1, x2) = (x.data[a], x.data[c]);
                    y.data[a] = x1 * cos - x2 * sin;
                    y.data[c] = x2 * cos + x1 * sin;
                }
            }
        }
    }
    y
}

fn attention(
    q: &Array,
    k: &Array,
    v: &Array,
    mask: crate::spec::Mask,
    groups: usize,
    d: usize,
    scale: f64,
) -> Vec<Array> {
    let (batch, rows, q_width) = dims3(q);
    let k_width = k.shape[2];
    let query_heads = q_width / d;
    let mut o = Array::zeros(q.shape.clone());
    let mut lse = Array::zeros(vec![batch, query_heads, rows]);
    for b in 0..batch {
        for h in 0..query_heads {
            let j = h / groups;
            for t in 0..rows {
                let query = &q.data[(b * rows + t) * q_width + h * d..][..d];
                let logits: Vec<(usize, f64)> = (0..rows)
                    .filter(|&s| mask.allows(t, s))
                    .map(|s| {
                        let key = &k.data[(b * rows + s) * k_width + j * d..][..d];
                        (
                            s,
                            scale * query.iter().zip(key).map(|(a, c)| a * c).sum::<f64>(),
                        )
                    })
                    .collect();
                let max = logits
                    .iter()
                    .map(|&(_, l)| l)
                    .fold(f64::NEG_INFINITY, f64::max);
                let total: f64 = logits.iter().map(|&(_, l)| (l - max).exp()).sum();
                for &(s, logit) in &logits {
                    let p = (logit - max).exp() / total;
                    for c in 0..d {
                        o.data[(b * rows + t) * q_width + h * d + c] +=
                            p * v.data[(b * rows + s) * k_width + j * d + c];
                    }
                }
                lse.data[(b * query_heads + h) * rows + t] = max + total.ln();
            }
        }
    }
    vec![o, lse]
}
