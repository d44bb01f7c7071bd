//! Builders of the backward kernels and the list of one backward call ([`backward_kernels`]): the
//! attention backward ([`attention`]), the prologue's per-row steps backward (RoPE and the norm:
//! `qk_prologue`'s builder run the other way, [`build_prologue_backward`]), the convolutions' and
//! q-k mean's backward ([`prologue`]), sums over tokens ([`build_token_sum`]) and the GEMMs of the
//! projections' and per-head convolutions' weight gradients and of the input gradients ([`gemm`]).

mod attention;
mod gemm;
mod prologue;

pub use super::qk_prologue::{prologue_backward_output, stage_input_name};
pub use attention::{AttentionBackwardKernel, build_attention_backward, default_attention_backward_schedule};
pub use gemm::{GradientTerm, InputGradient, WeightGradient, build_input_gradient, build_weight_gradient};
pub use prologue::{build_prologue_conv_backward, stage_gradient_name};

use super::qk_prologue::PrologueBuilder;
use super::*;

/// The backward of the prologue's RoPE and norm for `spec` with `schedule` (a `qk_prologue`
/// schedule), verified: see `PrologueBuilder::build_backward`.
pub fn build_prologue_backward(spec: &AttentionSpec, schedule: &Schedule) -> Result<KernelFn, String> {
    spec.validate()?;
    if !has_qk_prologue(spec) {
        return Err(format!("{} has no q/k step after the projection: its backward has no prologue", spec.name));
    }
    verified(PrologueBuilder::new(spec, schedule)?.build_backward(), schedule)
}

/// `output[c] = Σ_{b, r} input[b, r, c]·factor[b, r − shift, c]` over every row of the input
/// (without a factor: the plain sum): dL/dtemp from its rows, a convolution's bias gradient from
/// its stage gradient, a depthwise tap's weight gradient from the stage gradient and the stage
/// input. Inputs may have rows before token 0 (`rows_before`, as in the convolutions' padded
/// stage tensors; the factor's row is its own token's).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSum {
    pub name: String,
    pub input: String,
    pub elem: ElemType,
    pub columns: usize,
    pub rows_before: usize,
    /// (tensor, its rows before token 0, token shift): the input's token t meets its token t − shift.
    pub factor: Option<(String, usize, usize)>,
    pub output: String,
    /// [columns], or [columns, 1, taps] with `output_tap` the tap written.
    pub output_shape: Vec<usize>,
    pub output_tap: Option<usize>,
}

/// Builds a [`TokenSum`]: one CTA per 64 columns, 16-row chunks of every batch element in order,
/// staged in shared memory and added, transposed, to a [64, 16] accumulator whose rows are summed
/// at the end.
pub fn build_token_sum(sum: &TokenSum) -> Result<KernelFn, String> {
    const CHUNK: u32 = 16;
    const COLUMNS: u32 = 64;
    const WARPS: u32 = 4;
    let mut t = Tiles { decls: Vec::new() };
    let input_s = t.shared("input_s", sum.elem, CHUNK, COLUMNS);
    let factor_s = sum.factor.as_ref().map(|_| t.shared("factor_s", sum.elem, CHUNK, COLUMNS));
    let acc = t.regs("acc", ElemType::F32, COLUMNS, CHUNK, Layout::MmaAccumulator { warps_m: WARPS, warps_n: 1 });
    let sums = t.regs("sums", ElemType::F32, COLUMNS, 1, Layout::RowVector { warps_m: WARPS, warps_n: 1 });
    let chunks = plus(seq(), sum.rows_before as i64).ceil_div(int(CHUNK));
    let (b, row0) = (var("step").floor_div(var("chunks")), times(var("step").modulo(var("chunks")), CHUNK));
    let rows_of = |param: &str, start: Expr| GlobalTile {
        param: param.into(),
        dims: vec![GlobalDim::At(b.clone()), span(start, CHUNK), span(var("col0"), COLUMNS)],
    };
    let mut step = vec![Stmt::Copy { dst: t.whole(input_s), src: rows_of(&sum.input, row0.clone()), is_async: false }];
    let mut value = Expr::tile(input_s, Expr::Col, Expr::Row);
    if let (Some((factor, factor_before, shift)), Some(factor_s)) = (&sum.factor, factor_s) {
        let offset = *factor_before as i64 - sum.rows_before as i64 - *shift as i64;
        step.push(Stmt::Copy { dst: t.whole(factor_s), src: rows_of(factor, plus(row0, offset)), is_async: false });
        value = value * Expr::tile(factor_s, Expr::Col, Expr::Row);
    }
    step.extend([
        Stmt::Barrier,
        Stmt::Map { dst: t.whole(acc), expr: Expr::Elem + value },
        // The next copy overwrites what every thread read.
        Stmt::Barrier,
    ]);
    let mut output_dims = vec![span(var("col0"), COLUMNS)];
    if let Some(tap) = sum.output_tap {
        output_dims.extend([GlobalDim::At(int(0)), GlobalDim::At(int(tap))]);
    }
    let body = vec![
        Stmt::Note(format!("{}[c] = Σ over every row of {}[b, r, c]{}", sum.output, sum.input, if sum.factor.is_some() { " · factor" } else { "" })),
        let_("col0", Expr::BlockIdx(Axis::X) * int(COLUMNS)),
        let_("chunks", chunks),
        Stmt::Fill { dst: t.whole(acc), value: 0.0 },
        for_("step", int(0), Expr::Size(SizeVar::Batch) * var("chunks"), step),
        Stmt::RowReduce { dst: sums, src: t.whole(acc), op: ReduceOp::Sum, value: Expr::Elem },
        Stmt::Store { src: t.whole(sums), dst: GlobalTile { param: sum.output.clone(), dims: output_dims } },
    ];
    let shape = |rows_before: usize| {
        vec![SizeExpr::batch(), SizeExpr::seq_len() + size(rows_before), size(sum.columns)]
    };
    let mut params = vec![tensor(&sum.input, sum.elem, shape(sum.rows_before), Access::Read)];
    if let Some((factor, factor_before, _)) = &sum.factor {
        params.push(tensor(factor, sum.elem, shape(*factor_before), Access::Read));
    }
    params.push(tensor(&sum.output, ElemType::F32, sum.output_shape.iter().map(|n| size(*n)).collect(), Access::Write));
    let schedule = Schedule { block_m: COLUMNS, block_n: CHUNK, block_k: CHUNK, warps: WARPS, stages: 1 };
    let grid = [size(sum.columns.div_ceil(COLUMNS as usize)), size(1), size(1)];
    verified(tiled_kernel(sum.name.clone(), params, grid, &schedule, t, body), &schedule)
}

/// Which backward kernel: the identity the backward plan records and [`BackwardKernel::build`]
/// builds from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BackwardKernel {
    /// o_proj's input gradient `do` (what the attention backward reads).
    OutputInputGradient,
    Attention(AttentionBackwardKernel),
    /// The prologue's RoPE and norm backward ([`build_prologue_backward`]).
    PrologueNorm,
    /// dL/dtemp summed over tokens from the prologue backward's rows.
    TemperatureGradient,
    /// The convolutions' and q-k mean's backward into dp0 ([`build_prologue_conv_backward`]).
    PrologueConvolutions,
    /// One tap of convolution stage `stage`'s weight gradient.
    ConvWeightTap { stage: usize, tap: usize },
    /// Convolution stage `stage`'s bias gradient.
    ConvBias { stage: usize },
    /// dx through every projection segment.
    InputGradient,
    /// Weight (and bias) gradient `index` of [`projection_gradients`]' list: 0 is o_proj's, then
    /// one per projection segment.
    WeightGradient(usize),
}

impl BackwardKernel {
    /// The kernels of one backward call of `spec` in launch order: o_proj's input gradient
    /// (`do`), the attention backward, the prologue's RoPE and norm backward with dL/dtemp summed
    /// over tokens, the convolutions' and q-k mean's backward into dp0 with the convolutions'
    /// weight and bias gradients, dx, then every projection's weight gradient. They read the
    /// forward's saved `q`, `k`, `v`, `o`, `lse` and (with a prologue) `p0`, with `x` and `dout`.
    pub fn launched_by(spec: &AttentionSpec) -> Vec<BackwardKernel> {
        let mut kernels = vec![BackwardKernel::OutputInputGradient];
        kernels.extend(AttentionBackwardKernel::LAUNCH_ORDER.map(BackwardKernel::Attention));
        if has_qk_prologue(spec) {
            kernels.push(BackwardKernel::PrologueNorm);
            if param_name(spec, ParamRole::KeyTemperature).is_some() {
                kernels.push(BackwardKernel::TemperatureGradient);
            }
            if !spec.qk_conv.is_empty() || spec.qk_mean {
                kernels.push(BackwardKernel::PrologueConvolutions);
                for (stage, conv) in spec.qk_conv.iter().enumerate() {
                    kernels.extend((0..conv.width).map(|tap| BackwardKernel::ConvWeightTap { stage, tap }));
                    kernels.push(BackwardKernel::ConvBias { stage });
                }
            }
        }
        kernels.push(BackwardKernel::InputGradient);
        kernels.extend((0..projection_gradients(spec).1.len()).map(BackwardKernel::WeightGradient));
        kernels
    }

    /// What the plan prints for this kernel: `attention_bwd_dq`, `conv_weight_tap {stage = 0, tap = 1}`.
    pub fn describe(self) -> String {
        match self {
            BackwardKernel::OutputInputGradient => "output_input_gradient".into(),
            BackwardKernel::Attention(which) => which.suffix().into(),
            BackwardKernel::PrologueNorm => "prologue_norm".into(),
            BackwardKernel::TemperatureGradient => "temperature_gradient".into(),
            BackwardKernel::PrologueConvolutions => "prologue_convolutions".into(),
            BackwardKernel::ConvWeightTap { stage, tap } => format!("conv_weight_tap {{stage = {stage}, tap = {tap}}}"),
            BackwardKernel::ConvBias { stage } => format!("conv_bias {{stage = {stage}}}"),
            BackwardKernel::InputGradient => "input_gradient".into(),
            BackwardKernel::WeightGradient(index) => format!("weight_gradient {{index = {index}}}"),
        }
    }

    /// The kernel IR of this kernel of `spec`'s backward with its default schedule, verified.
    pub fn build(self, spec: &AttentionSpec) -> Result<KernelFn, String> {
        let gradients = || projection_gradients(spec);
        match self {
            BackwardKernel::OutputInputGradient => {
                with_default_gradient_schedule(|s| build_input_gradient(&gradients().0[0], s))
            }
            BackwardKernel::Attention(which) => {
                build_attention_backward(spec, which, &default_attention_backward_schedule(spec, which)?)
            }
            BackwardKernel::PrologueNorm => {
                build_prologue_backward(spec, &default_schedule(spec, ForwardKernel::QkPrologue)?)
            }
            BackwardKernel::TemperatureGradient => {
                let temperature = param_name(spec, ParamRole::KeyTemperature)
                    .ok_or_else(|| format!("{} has no key temperature", spec.name))?;
                build_token_sum(&temperature_sum(spec, format!("{}_temperature_grad", spec.name), &temperature))
            }
            BackwardKernel::PrologueConvolutions => {
                build_prologue_conv_backward(spec, &default_schedule(spec, ForwardKernel::QkPrologue)?)
            }
            BackwardKernel::ConvWeightTap { stage, tap } => conv_weight_tap(spec, stage, tap),
            BackwardKernel::ConvBias { stage } => conv_bias(spec, stage),
            BackwardKernel::InputGradient => with_default_gradient_schedule(|s| build_input_gradient(&gradients().0[1], s)),
            BackwardKernel::WeightGradient(index) => {
                let weights = gradients().1;
                let gradient = weights
                    .get(index)
                    .ok_or_else(|| format!("{} has {} weight gradients, not {}", spec.name, weights.len(), index + 1))?;
                with_default_gradient_schedule(|s| build_weight_gradient(gradient, s))
            }
        }
    }
}

/// The kernels of one backward call of `spec` in launch order ([`BackwardKernel::launched_by`]),
/// each with its default schedule.
pub fn backward_kernels(spec: &AttentionSpec) -> Result<Vec<KernelFn>, String> {
    BackwardKernel::launched_by(spec).into_iter().map(|which| which.build(spec)).collect()
}

/// A buffer's name with the rows it holds before token 0.
type PaddedBuffer = (String, usize);

/// Convolution stage `stage`'s gradient (`dy`) and input (p0, or [`stage_input_name`]), both read
/// over every row from T before token 0 on.
fn conv_stage_operands(spec: &AttentionSpec, stage: usize) -> Result<(PaddedBuffer, PaddedBuffer), String> {
    let last = spec.qk_conv.len().checked_sub(1).ok_or_else(|| format!("{} has no convolution", spec.name))?;
    if stage > last {
        return Err(format!("{} has {} convolution stages, not {}", spec.name, last + 1, stage + 1));
    }
    let history = spec.conv_history();
    let dy = (stage_gradient_name(spec, stage), if stage == last { 0 } else { history });
    let x = if stage == 0 { (PROJECTION_BUFFER.to_string(), 0) } else { (stage_input_name(stage), history) };
    Ok((dy, x))
}

/// One tap of a convolution stage's weight gradient: for a per-head stage a GEMM per head
/// (dW[:, :, tap] = Σ dOᵀ·I shifted by K − 1 − tap), for a depthwise stage a token sum of
/// products.
fn conv_weight_tap(spec: &AttentionSpec, stage: usize, tap: usize) -> Result<KernelFn, String> {
    let storage: ElemType = spec.dtype.into();
    let (p, d) = (spec.packed_width(), spec.head_dim);
    let ((dy, dy_rows_before), (x, x_rows_before)) = conv_stage_operands(spec, stage)?;
    let conv = spec.qk_conv[stage];
    if tap >= conv.width {
        return Err(format!("convolution stage {stage} of {} has {} taps, not {}", spec.name, conv.width, tap + 1));
    }
    let weight = param_name(spec, ParamRole::ConvWeight { stage }).expect("every stage has a weight");
    let name = format!("{}_conv{stage}_dweight_tap{tap}", spec.name);
    let row_shift = conv.width - 1 - tap;
    match conv.kind {
        ConvKind::PerHead => {
            let gradient = WeightGradient {
                name,
                dy,
                dy_columns: p,
                dy_rows_before,
                column0: 0,
                width: d,
                x,
                x_columns: p,
                x_rows_before,
                x_column0: 0,
                inputs: d,
                row_shift,
                heads: Some((spec.query_heads + spec.kv_heads, d)),
                output: gradient_name(&weight),
                output_shape: vec![p, d, conv.width],
                output_tap: Some(tap),
                bias_output: None,
                storage,
            };
            with_default_gradient_schedule(|s| build_weight_gradient(&gradient, s))
        }
        ConvKind::Depthwise => build_token_sum(&TokenSum {
            name,
            input: dy,
            elem: storage,
            columns: p,
            rows_before: dy_rows_before,
            factor: Some((x, x_rows_before, row_shift)),
            output: gradient_name(&weight),
            output_shape: vec![p, 1, conv.width],
            output_tap: Some(tap),
        }),
    }
}

/// A convolution stage's bias gradient: the token sum of its output gradient.
fn conv_bias(spec: &AttentionSpec, stage: usize) -> Result<KernelFn, String> {
    let ((dy, dy_rows_before), _) = conv_stage_operands(spec, stage)?;
    let bias = param_name(spec, ParamRole::ConvBias { stage }).expect("every stage has a bias");
    build_token_sum(&TokenSum {
        name: format!("{}_conv{stage}_dbias", spec.name),
        input: dy,
        elem: spec.dtype.into(),
        columns: spec.packed_width(),
        rows_before: dy_rows_before,
        factor: None,
        output: gradient_name(&bias),
        output_shape: vec![spec.packed_width()],
        output_tap: None,
    })
}

/// dL/dtemp [Hk] from the prologue backward's rows.
fn temperature_sum(spec: &AttentionSpec, name: String, temperature: &str) -> TokenSum {
    TokenSum {
        name,
        input: "dtemp_rows".into(),
        elem: ElemType::F32,
        columns: spec.kv_heads,
        rows_before: 0,
        factor: None,
        output: gradient_name(temperature),
        output_shape: vec![spec.kv_heads],
        output_tap: None,
    }
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
        dy_rows_before: 0,
        column0: 0,
        width: e,
        x: "o".into(),
        x_columns: lq,
        x_rows_before: 0,
        x_column0: 0,
        inputs: lq,
        row_shift: 0,
        heads: None,
        output: gradient_name(&output_weight),
        output_shape: vec![e, lq],
        output_tap: None,
        bias_output: param_name(spec, ParamRole::OutputBias).map(|bias| gradient_name(&bias)),
        storage,
    }];
    for (index, segment) in segments.iter().enumerate() {
        weights.push(WeightGradient {
            name: format!("{}_qkv_proj_dweight{index}", spec.name),
            dy: gradient_name(&segment.output),
            dy_columns: columns_of(&segment.output),
            dy_rows_before: 0,
            column0: segment.column0,
            width: segment.width,
            x: "x".into(),
            x_columns: e,
            x_rows_before: 0,
            x_column0: 0,
            inputs: e,
            row_shift: segment.row_shift,
            heads: None,
            output: gradient_name(&segment.weight),
            output_shape: vec![segment.width, e],
            output_tap: None,
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
    let candidates = [(64, 4), (32, 2), (16, 1)].into_iter().flat_map(|(block, warps)| {
        [32, 16].map(move |block_k| Schedule { block_m: block, block_n: block, block_k, warps, stages: 2 })
    });
    first_that_builds(candidates, build).map(|(_, kernel)| kernel)
}
