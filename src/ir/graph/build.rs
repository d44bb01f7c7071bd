//! `AttentionSpec` → graph IR, one op per step of language.md's Semantics.
//!
//! The builder writes every step literally, including those that are identities for a given
//! spec (the [q0 | k0] pack and its split, a pad of T = 0 rows, a one-part value concat):
//! canonicalisation removes them, so the rules for "MHA is CCA with the parts absent" live in
//! one pass rather than in special cases here.

use super::{
    ElemType, Graph, GraphOutput, Layout, OpKind, OutputKind, ParamDecl, TensorType, ValueId,
};
use crate::spec::{AttentionSpec, EntryPoint, KeyTemperature, ParamRole, QkNorm};
use std::fmt;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BuildError {
    /// The spec breaks one of its invariants (`AttentionSpec::validate`).
    InvalidSpec(String),
    /// The entry point has no graph form yet (only forward is lowered).
    EntryNotLowered(EntryPoint),
    /// An op could not be typed: a builder bug surfaced as an error, not a panic.
    Internal(String),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::InvalidSpec(msg) => write!(f, "invalid spec: {msg}"),
            BuildError::EntryNotLowered(entry) => {
                write!(
                    f,
                    "the {} entry point is not lowered to graph IR yet",
                    entry.name()
                )
            }
            BuildError::Internal(msg) => write!(f, "graph builder: {msg}"),
        }
    }
}

impl std::error::Error for BuildError {}

/// The graph of one entry point of `spec`.
pub fn build(spec: &AttentionSpec, entry: EntryPoint) -> Result<Graph, BuildError> {
    spec.validate().map_err(BuildError::InvalidSpec)?;
    match entry {
        EntryPoint::Forward => build_forward(spec).map_err(BuildError::Internal),
        EntryPoint::Backward | EntryPoint::Decode | EntryPoint::Prefill => Err(BuildError::EntryNotLowered(entry)),
    }
}

fn build_forward(spec: &AttentionSpec) -> Result<Graph, String> {
    let storage = ElemType::Storage(spec.dtype);
    let params = spec
        .params()
        .into_iter()
        .map(|p| ParamDecl {
            ty: TensorType::fixed(&p.shape, storage),
            name: p.name,
        })
        .collect();
    let mut g = Graph {
        spec: spec.clone(),
        entry: EntryPoint::Forward,
        params,
        values: Vec::new(),
        ops: Vec::new(),
        groups: Vec::new(),
        outputs: Vec::new(),
    };
    // Parameters are found by role, so the graph does not depend on the state-dict naming.
    let param = |g: &Graph, role: ParamRole| {
        spec.param_name(role)
            .and_then(|name| g.param_by_name(&name))
            .ok_or_else(|| format!("spec.params() has no {role:?} parameter"))
    };
    let optional_bias = |g: &Graph, role: ParamRole| -> Result<_, String> {
        if spec.bias {
            param(g, role).map(Some)
        } else {
            Ok(None)
        }
    };
    let one = |results: Vec<ValueId>| results[0];
    let d = spec.head_dim;

    // 1. Projections.
    let x = one(g.push_op(
        OpKind::Input {
            name: "x".into(),
            width: spec.model_dim,
        },
        vec![],
    )?);
    let q_proj = OpKind::Linear {
        weight: param(&g, ParamRole::QueryProj)?,
        bias: optional_bias(&g, ParamRole::QueryBias)?,
    };
    let q0 = one(g.push_op(q_proj, vec![x])?);
    let k_proj = OpKind::Linear {
        weight: param(&g, ParamRole::KeyProj)?,
        bias: optional_bias(&g, ParamRole::KeyBias)?,
    };
    let k0 = one(g.push_op(k_proj, vec![x])?);

    // 2. Values: current heads from x, shifted heads from x_prev.
    let mut value_parts = Vec::new();
    if spec.current_value_heads() > 0 {
        let proj = OpKind::Linear {
            weight: param(&g, ParamRole::ValueProjCurrent)?,
            bias: optional_bias(&g, ParamRole::ValueBiasCurrent)?,
        };
        value_parts.push(one(g.push_op(proj, vec![x])?));
    }
    if spec.value_shift > 0 {
        let x_prev = one(g.push_op(OpKind::TokenShift { rows: 1 }, vec![x])?);
        let proj = OpKind::Linear {
            weight: param(&g, ParamRole::ValueProjDelayed)?,
            bias: optional_bias(&g, ParamRole::ValueBiasDelayed)?,
        };
        value_parts.push(one(g.push_op(proj, vec![x_prev])?));
    }
    let v_f32 = one(g.push_op(OpKind::Concat, value_parts)?);

    // 3. Convolutions on the packed [q0 | k0], padded once with T rows.
    let packed = one(g.push_op(OpKind::Concat, vec![q0, k0])?);
    let mut y = one(g.push_op(
        OpKind::CausalPad {
            rows: spec.conv_history(),
        },
        vec![packed],
    )?);
    for (index, stage) in spec.qk_conv.iter().enumerate() {
        let conv = OpKind::ConvStage {
            kind: stage.kind,
            width: stage.width,
            head_dim: d,
            weight: param(&g, ParamRole::ConvWeight { stage: index })?,
            bias: param(&g, ParamRole::ConvBias { stage: index })?,
        };
        y = one(g.push_op(conv, vec![y])?);
    }
    let split = OpKind::Split {
        widths: vec![spec.q_width(), spec.kv_width()],
    };
    let halves = g.push_op(split, vec![y])?;
    let (mut q, mut k) = (halves[0], halves[1]);

    // 4. q-k mean skip from the pre-convolution projections.
    if spec.qk_mean {
        let mean = OpKind::QkMean {
            groups: spec.groups(),
            head_dim: d,
        };
        let mixed = g.push_op(mean, vec![q, k, q0, k0])?;
        (q, k) = (mixed[0], mixed[1]);
    }

    // 5. L2 normalisation, with the key temperature on keys only.
    if spec.qk_norm == QkNorm::L2 {
        let eps = spec.norm_eps;
        q = one(g.push_op(
            OpKind::L2Norm {
                head_dim: d,
                eps,
                temperature: None,
            },
            vec![q],
        )?);
        let temperature = match spec.key_temperature {
            KeyTemperature::None => None,
            kind => Some((param(&g, ParamRole::KeyTemperature)?, kind)),
        };
        k = one(g.push_op(
            OpKind::L2Norm {
                head_dim: d,
                eps,
                temperature,
            },
            vec![k],
        )?);
    }

    // 6. RoPE at absolute positions.
    if let Some(rope) = spec.rope {
        let op = OpKind::Rope {
            head_dim: d,
            rotary_dim: rope.rotary_dim,
            theta: rope.theta,
            style: rope.style,
        };
        q = one(g.push_op(op.clone(), vec![q])?);
        k = one(g.push_op(op, vec![k])?);
    }

    // q̃, k̃ and v are stored in the storage dtype, heads contiguous (BSHD).
    let store = |g: &mut Graph, value: ValueId, heads: usize, name: &str| {
        let cast = OpKind::Cast {
            elem: storage,
            layout: Layout::Bshd { heads },
        };
        let stored = one(g.push_op(cast, vec![value])?);
        g.values[stored.0].name = Some(name.to_string());
        Ok::<_, String>(stored)
    };
    let q = store(&mut g, q, spec.query_heads, "q")?;
    let k = store(&mut g, k, spec.kv_heads, "k")?;
    let v = store(&mut g, v_f32, spec.kv_heads, "v")?;

    // 7. Attention, saving the log-sum-exp for backward.
    let attention = OpKind::Attention {
        mask: spec.mask,
        groups: spec.groups(),
        head_dim: d,
        scale: spec.softmax_scale,
    };
    let attended = g.push_op(attention, vec![q, k, v])?;
    let (o, lse) = (attended[0], attended[1]);
    g.values[o.0].name = Some("o".into());
    g.values[lse.0].name = Some("lse".into());

    // 8. Output projection.
    let o_proj = OpKind::Linear {
        weight: param(&g, ParamRole::OutputProj)?,
        bias: optional_bias(&g, ParamRole::OutputBias)?,
    };
    let out_f32 = one(g.push_op(o_proj, vec![o])?);
    let cast = OpKind::Cast {
        elem: storage,
        layout: Layout::RowMajor,
    };
    let out = one(g.push_op(cast, vec![out_f32])?);
    g.values[out.0].name = Some("out".into());

    g.outputs = vec![
        GraphOutput {
            name: "out".into(),
            value: out,
            kind: OutputKind::Result,
        },
        GraphOutput {
            name: "lse".into(),
            value: lse,
            kind: OutputKind::Saved,
        },
    ];
    Ok(g)
}
