//! Builders of the backward kernels: the attention backward ([`attention`]), the prologue's
//! per-row steps backward (RoPE and the norm: `qk_prologue`'s builder run the other way,
//! [`build_prologue_backward`]), sums over tokens ([`build_token_sum`]) and the GEMMs of the
//! projections' backward ([`gemm`]: input gradients dY·W, weight gradients dYᵀ·X), with which of
//! them a layer's backward runs ([`projection_gradients`]).

mod attention;
mod gemm;
mod prologue;

pub use attention::{AttentionBackwardKernel, build_attention_backward, default_attention_backward_schedule};
pub use prologue::build_prologue_conv_backward;
pub use gemm::{GradientTerm, InputGradient, WeightGradient, build_input_gradient, build_weight_gradient};

use super::qk_prologue::PrologueBuilder;
use super::*;

pub use super::qk_prologue::prologue_backward_output;

/// The backward of the prologue's RoPE and norm for `spec` with `schedule` (a `qk_prologue`
/// schedule), verified: see `PrologueBuilder::build_backward`.
pub fn build_prologue_backward(spec: &AttentionSpec, schedule: &Schedule) -> Result<KernelFn, String> {
    spec.validate()?;
    if !has_qk_prologue(spec) {
        return Err(format!("{} has no q/k step after the projection: its backward has no prologue", spec.name));
    }
    verified(PrologueBuilder::new(spec, schedule)?.build_backward(), schedule)
}

/// `output[c] = Σ_{b, t} input[b, t, c]` for an f32 input [B, S, columns], in one CTA in a fixed
/// order (dL/dtemp from its rows): 16-token chunks staged in shared memory and added, transposed,
/// to a [columns, 16] accumulator whose rows are summed at the end.
pub fn build_token_sum(name: &str, input: &str, output: &str, columns: usize) -> Result<KernelFn, String> {
    const CHUNK: u32 = 16;
    let rows = (columns as u32).next_multiple_of(16);
    let mut t = Tiles { decls: Vec::new() };
    let chunk_s = t.shared("chunk_s", ElemType::F32, CHUNK, rows);
    let acc = t.regs("acc", ElemType::F32, rows, CHUNK, Layout::MmaAccumulator { warps_m: 1, warps_n: 1 });
    let sums = t.regs("sums", ElemType::F32, rows, 1, Layout::RowVector { warps_m: 1, warps_n: 1 });
    let chunks = seq().ceil_div(int(CHUNK));
    let step = var("step");
    let body = vec![
        Stmt::Note(format!("{output}[c] = Σ over every token of {input}[b, t, c]")),
        Stmt::Fill { dst: t.whole(acc), value: 0.0 },
        for_(
            "step",
            int(0),
            Expr::Size(SizeVar::Batch) * chunks.clone(),
            vec![
                Stmt::Copy {
                    dst: t.whole(chunk_s),
                    src: GlobalTile {
                        param: input.into(),
                        dims: vec![
                            GlobalDim::At(step.clone().floor_div(chunks.clone())),
                            span(times(step.modulo(chunks), CHUNK), CHUNK),
                            span(int(0), rows),
                        ],
                    },
                    is_async: false,
                },
                Stmt::Barrier,
                Stmt::Map { dst: t.whole(acc), expr: Expr::Elem + Expr::tile(chunk_s, Expr::Col, Expr::Row) },
                // The next copy overwrites what every thread read.
                Stmt::Barrier,
            ],
        ),
        Stmt::RowReduce { dst: sums, src: t.whole(acc), op: ReduceOp::Sum, value: Expr::Elem },
        Stmt::Store { src: t.whole(sums), dst: GlobalTile { param: output.into(), dims: vec![span(int(0), rows)] } },
    ];
    let schedule = Schedule { block_m: rows, block_n: CHUNK, block_k: CHUNK, warps: 1, stages: 1 };
    let mut params = vec![
        tensor(input, ElemType::F32, vec![SizeExpr::batch(), SizeExpr::seq_len(), size(columns)], Access::Read),
        tensor(output, ElemType::F32, vec![size(columns)], Access::Write),
    ];
    params.extend(size_params());
    let kernel = KernelFn {
        name: name.into(),
        params,
        grid: [size(1), size(1), size(1)],
        warps: 1,
        tiles: t.decls,
        barriers: Vec::new(),
        schedule,
        ctas_per_sm: 1,
        body,
    };
    verified(kernel, &schedule)
}

/// The kernels of one backward call of `spec` in launch order, each with its default schedule:
/// o_proj's input gradient (`do`), the attention backward, the prologue's RoPE and norm backward
/// with dL/dtemp summed over tokens, dx, then every weight gradient. Reads the forward's saved
/// `q`, `k`, `v`, `o`, `lse` and (with a prologue) `p0`, with `x` and `dout`. Layers with
/// convolutions or the q-k mean are refused: their backward is not built yet.
pub fn backward_kernels(spec: &AttentionSpec) -> Result<Vec<KernelFn>, String> {
    if !spec.qk_conv.is_empty() || spec.qk_mean {
        return Err(format!(
            "{}: the backward of the convolutions and the q-k mean is not built yet (layers without them have one)",
            spec.name
        ));
    }
    let (inputs, weights) = projection_gradients(spec);
    let mut kernels = vec![with_default_gradient_schedule(|s| build_input_gradient(&inputs[0], s))?];
    for which in AttentionBackwardKernel::LAUNCH_ORDER {
        kernels.push(build_attention_backward(spec, which, &default_attention_backward_schedule(spec, which)?)?);
    }
    if has_qk_prologue(spec) {
        kernels.push(build_prologue_backward(spec, &default_schedule(spec, ForwardKernel::QkPrologue)?)?);
        if let Some(temperature) = param_name(spec, ParamRole::KeyTemperature) {
            let name = format!("{}_temperature_grad", spec.name);
            kernels.push(build_token_sum(&name, "dtemp_rows", &gradient_name(&temperature), spec.kv_heads)?);
        }
    }
    kernels.push(with_default_gradient_schedule(|s| build_input_gradient(&inputs[1], s))?);
    for gradient in &weights {
        kernels.push(with_default_gradient_schedule(|s| build_weight_gradient(gradient, s))?);
    }
    Ok(kernels)
}

fn verified(kernel: KernelFn, s: &Schedule) -> Result<KernelFn, String> {
    kernel.verify().map_err(|errors| format!("{} with {s:?} does not verify:\n  {}", kernel.name, errors.join("\n  ")))?;
    Ok(kernel)
}

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
