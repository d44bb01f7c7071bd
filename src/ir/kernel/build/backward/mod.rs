//! Builders of the backward kernels: the attention backward ([`attention`]) and the GEMMs of the
//! projections' backward ([`gemm`]: input gradients dY·W, weight gradients dYᵀ·X), and which of
//! them a layer's backward runs ([`projection_gradients`]).

mod attention;
mod gemm;

pub use attention::{AttentionBackwardKernel, build_attention_backward, default_attention_backward_schedule};
pub use gemm::{GradientTerm, InputGradient, WeightGradient, build_input_gradient, build_weight_gradient};

use super::*;

/// The buffer holding dL/d`name`: `d` before an activation (`dq`, `dp0`, `do`), `grad.` before
/// a parameter's name (`grad.o_proj.weight`).
pub fn gradient_name(name: &str) -> String {
    if name.contains('.') { format!("grad.{name}") } else { format!("d{name}") }
}

/// The GEMMs of `spec`'s projections backward: the input gradient through o_proj (`do`, what
/// the attention backward reads), the weight gradients of o_proj, the input gradient `dx`
/// through every projection segment, and each segment's weight gradient; in that order.
pub fn projection_gradients(spec: &AttentionSpec) -> (Vec<InputGradient>, Vec<WeightGradient>) {
    let storage: ElemType = spec.dtype.into();
    let (e, lq) = (spec.model_dim, spec.q_width());
    let output_weight = param_name(spec, ParamRole::OutputProj).expect("every spec has an output projection");
    let out_proj = InputGradient {
        name: format!("{}_out_proj_dinput", spec.name),
        terms: vec![GradientTerm {
            dy: "dout".into(),
            dy_columns: e,
            column0: 0,
            width: e,
            weight: output_weight.clone(),
            row_shift: 0,
        }],
        inputs: lq,
        output: "do".into(),
        storage,
    };
    let columns_of = |output: &str| match output {
        PROJECTION_BUFFER => spec.packed_width(),
        "q" => lq,
        _ => spec.kv_width(),
    };
    let segments = projection_segments(spec);
    let qkv = InputGradient {
        name: format!("{}_qkv_proj_dinput", spec.name),
        terms: segments
            .iter()
            .map(|segment| GradientTerm {
                dy: gradient_name(&segment.output),
                dy_columns: columns_of(&segment.output),
                column0: segment.column0,
                width: segment.width,
                weight: segment.weight.clone(),
                row_shift: segment.row_shift,
            })
            .collect(),
        inputs: e,
        output: "dx".into(),
        storage,
    };
    let mut weights = vec![WeightGradient {
        name: format!("{}_out_proj_dweight", spec.name),
        dy: "dout".into(),
        dy_columns: e,
        column0: 0,
        width: e,
        x: "o".into(),
        inputs: lq,
        row_shift: 0,
        output: gradient_name(&output_weight),
        bias_output: param_name(spec, ParamRole::OutputBias).map(|bias| gradient_name(&bias)),
        storage,
    }];
    for (index, segment) in segments.iter().enumerate() {
        weights.push(WeightGradient {
            name: format!("{}_qkv_proj_dweight{index}", spec.name),
            dy: gradient_name(&segment.output),
            dy_columns: columns_of(&segment.output),
            column0: segment.column0,
            width: segment.width,
            x: "x".into(),
            inputs: e,
            row_shift: segment.row_shift,
            output: gradient_name(&segment.weight),
            bias_output: segment.bias.as_deref().map(gradient_name),
            storage,
        });
    }
    (vec![out_proj, qkv], weights)
}

/// A gradient GEMM with the schedule it gets unless told otherwise: the first of 64 × 64,
/// 32 × 32 and 16 × 16 tiles (4, 2, 1 warps; 32-wide chunks, else 16) with a two-stage copy ring
/// that `build` accepts (segments must be whole tiles and chunks).
pub fn with_default_gradient_schedule(build: impl Fn(&Schedule) -> Result<KernelFn, String>) -> Result<KernelFn, String> {
    let mut last_error = String::from("no candidate schedule");
    for (block, warps) in [(64, 4), (32, 2), (16, 1)] {
        for block_k in [32, 16] {
            match build(&Schedule { block_m: block, block_n: block, block_k, warps, stages: 2 }) {
                Ok(kernel) => return Ok(kernel),
                Err(error) => last_error = error,
            }
        }
    }
    Err(last_error)
}
