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
/// input; or the sum of a split reduction's parts ([`SummedRows::Parts`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenSum {
    pub name: String,
    pub input: String,
    pub elem: ElemType,
    pub columns: usize,
    pub rows: SummedRows,
    /// (tensor, its rows before token 0, token shift): the input's token t meets its token t − shift.
    pub factor: Option<(String, usize, usize)>,
    /// CTAs along the grid's y, each adding every `parts`-th chunk of rows into its own row
    /// `part` of [`parts_name`]`(output)` ([parts, ..output_shape], added up by a later kernel);
    /// 1 writes `output` itself.
    pub parts: usize,
    pub output: String,
    /// [columns], or [columns, 1, taps] with `output_tap` the tap written.
    pub output_shape: Vec<usize>,
    pub output_tap: Option<usize>,
}

/// The rows a [`TokenSum`] adds up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SummedRows {
    /// Every token of every batch element: the input is [B, rows_before + S, columns], token 0
    /// at row `rows_before` (the convolutions' padded stage tensors have rows before it; a
    /// factor's row is its own token's).
    Tokens { rows_before: usize },
    /// The parts of a split reduction: the input is [1, parts, columns].
    Parts(usize),
}

/// Columns of a [`TokenSum`]'s CTA.
const TOKEN_SUM_COLUMNS: usize = 64;

/// Builds a [`TokenSum`]: one CTA per 64 columns (and part), 16-row chunks of every batch
/// element in order, staged in shared memory and added, transposed, to a [64, 16] accumulator
/// whose rows are summed at the end.
pub fn build_token_sum(sum: &TokenSum) -> Result<KernelFn, String> {
    const CHUNK: u32 = 16;
    const COLUMNS: u32 = TOKEN_SUM_COLUMNS as u32;
    const WARPS: u32 = 4;
    if sum.parts == 0 {
        return Err(format!("{}: a sum in 0 parts", sum.name));
    }
    // The input's shape, its rows before token 0, chunks per batch element and batch elements.
    let (input_shape, rows_before, chunks, batches) = match sum.rows {
        SummedRows::Tokens { rows_before } => (
            vec![SizeExpr::batch(), SizeExpr::seq_len() + size(rows_before), size(sum.columns)],
            rows_before,
            plus(seq(), rows_before as i64).ceil_div(int(CHUNK)),
            Expr::Size(SizeVar::Batch),
        ),
        SummedRows::Parts(0) => return Err(format!("{}: a sum of 0 parts", sum.name)),
        SummedRows::Parts(parts) if sum.factor.is_none() => {
            (vec![size(1), size(parts), size(sum.columns)], 0, int(parts.div_ceil(CHUNK as usize)), int(1))
        }
        SummedRows::Parts(_) => return Err(format!("{}: the parts of a sum have no factor", sum.name)),
    };
    let output = if sum.parts > 1 { parts_name(&sum.output) } else { sum.output.clone() };
    let mut t = Tiles { decls: Vec::new() };
    let input_s = t.shared("input_s", sum.elem, CHUNK, COLUMNS);
    let factor_s = sum.factor.as_ref().map(|_| t.shared("factor_s", sum.elem, CHUNK, COLUMNS));
    let acc = t.regs("acc", ElemType::F32, COLUMNS, CHUNK, Layout::MmaAccumulator { warps_m: WARPS, warps_n: 1 });
    let sums = t.regs("sums", ElemType::F32, COLUMNS, 1, Layout::RowVector { warps_m: WARPS, warps_n: 1 });
    // Part p adds steps p, p + parts, …: each a chunk of one batch element.
    let step = var("i") * int(sum.parts) + var("part");
    let (b, row0) = (step.clone().floor_div(var("chunks")), times(step.modulo(var("chunks")), CHUNK));
    let rows_of = |param: &str, start: Expr| GlobalTile {
        param: param.into(),
        dims: vec![GlobalDim::At(b.clone()), span(start, CHUNK), span(var("col0"), COLUMNS)],
    };
    let mut body_of_step = vec![Stmt::Copy { dst: t.whole(input_s), src: rows_of(&sum.input, row0.clone()), is_async: false }];
    let mut value = Expr::tile(input_s, Expr::Col, Expr::Row);
    if let (Some((factor, factor_before, shift)), Some(factor_s)) = (&sum.factor, factor_s) {
        let offset = *factor_before as i64 - rows_before as i64 - *shift as i64;
        body_of_step.push(Stmt::Copy { dst: t.whole(factor_s), src: rows_of(factor, plus(row0, offset)), is_async: false });
        value = value * Expr::tile(factor_s, Expr::Col, Expr::Row);
    }
    body_of_step.extend([
        Stmt::Barrier,
        Stmt::Map { dst: t.whole(acc), expr: Expr::Elem + value },
        // The next copy overwrites what every thread read.
        Stmt::Barrier,
    ]);
    let mut output_dims = Vec::new();
    if sum.parts > 1 {
        output_dims.push(GlobalDim::At(var("part")));
    }
    output_dims.push(span(var("col0"), COLUMNS));
    if let Some(tap) = sum.output_tap {
        output_dims.extend([GlobalDim::At(int(0)), GlobalDim::At(int(tap))]);
    }
    let parts = int(sum.parts);
    let body = vec![
        Stmt::Note(format!(
            "{}[c] = Σ over every row of {}[b, r, c]{}{}",
            output,
            sum.input,
            if sum.factor.is_some() { " · factor" } else { "" },
            if sum.parts > 1 { format!(", part blockIdx.y of {}", sum.parts) } else { String::new() }
        )),
        let_("col0", Expr::BlockIdx(Axis::X) * int(COLUMNS)),
        let_("part", Expr::BlockIdx(Axis::Y)),
        let_("chunks", chunks),
        Stmt::Fill { dst: t.whole(acc), value: 0.0 },
        // ceil((steps − part) / parts) steps, none when part is past the last.
        for_("i", int(0), (batches * var("chunks") + parts.clone() - int(1) - var("part")).floor_div(parts), body_of_step),
        Stmt::RowReduce { dst: sums, src: t.whole(acc), op: ReduceOp::Sum, value: Expr::Elem },
        Stmt::Store { src: t.whole(sums), dst: GlobalTile { param: output.clone(), dims: output_dims } },
    ];
    let mut params = vec![tensor(&sum.input, sum.elem, input_shape, Access::Read)];
    if let Some((factor, factor_before, _)) = &sum.factor {
        let shape = vec![SizeExpr::batch(), SizeExpr::seq_len() + size(*factor_before), size(sum.columns)];
        params.push(tensor(factor, sum.elem, shape, Access::Read));
    }
    let parts_dim = (sum.parts > 1).then_some(sum.parts);
    let output_shape = parts_dim.into_iter().chain(sum.output_shape.iter().copied()).map(size).collect();
    params.push(tensor(&output, ElemType::F32, output_shape, Access::Write));
    let schedule = Schedule { block_m: COLUMNS, block_n: CHUNK, block_k: CHUNK, warps: WARPS, stages: 1 };
    let grid = [size(sum.columns.div_ceil(COLUMNS as usize)), size(sum.parts), size(1)];
    verified(tiled_kernel(sum.name.clone(), params, grid, &schedule, t, body), &schedule)
}

/// CTAs a reduction over every token aims for: four per SM of the target, so that the loads of
/// one hide behind the others'.
const REDUCTION_CTAS: usize = 4 * TARGET_SMS as usize;
/// The most parts a reduction is split into, and the most bytes its parts may take (each part
/// is an f32 copy of the whole output, alive until the sum of parts).
const MAX_REDUCTION_PARTS: usize = 64;
const MAX_PARTS_BYTES: usize = 8 << 20;

/// Parts for a reduction over tokens whose output of `elements` alone gives `ctas` CTAs.
fn reduction_parts(ctas: usize, elements: usize) -> usize {
    let affordable = MAX_PARTS_BYTES / (elements.max(1) * ElemType::F32.size_bytes());
    REDUCTION_CTAS.div_ceil(ctas.max(1)).min(affordable).clamp(1, MAX_REDUCTION_PARTS)
}

/// The buffer a kernel in parts writes instead of `output`: [parts, ..output's shape].
pub fn parts_name(output: &str) -> String {
    format!("parts.{output}")
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
    /// One tap of convolution stage `stage`'s weight gradient (in parts where
    /// [`SplitGradient::ConvWeight`] has more than one).
    ConvWeightTap { stage: usize, tap: usize },
    /// Convolution stage `stage`'s bias gradient (likewise).
    ConvBias { stage: usize },
    /// The parts of a gradient reduced over tokens, added up in order (launched only where the
    /// gradient is split into more than one).
    SumOfParts(SplitGradient),
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
        kernels.extend(AttentionBackwardKernel::launched_by(spec).map(BackwardKernel::Attention));
        // The sum of a split gradient's parts, where it is split (in one part its kernels write
        // the gradient itself).
        let sum_of = |gradient: SplitGradient| {
            matches!(gradient.layout(spec), Ok((_, _, parts)) if parts > 1).then_some(BackwardKernel::SumOfParts(gradient))
        };
        if has_qk_prologue(spec) {
            kernels.push(BackwardKernel::PrologueNorm);
            if param_name(spec, ParamRole::KeyTemperature).is_some() {
                kernels.push(BackwardKernel::TemperatureGradient);
                kernels.extend(sum_of(SplitGradient::Temperature));
            }
            if !spec.qk_conv.is_empty() || spec.qk_mean {
                kernels.push(BackwardKernel::PrologueConvolutions);
                for (stage, conv) in spec.qk_conv.iter().enumerate() {
                    kernels.extend((0..conv.width).map(|tap| BackwardKernel::ConvWeightTap { stage, tap }));
                    kernels.extend(sum_of(SplitGradient::ConvWeight { stage }));
                    kernels.push(BackwardKernel::ConvBias { stage });
                    kernels.extend(sum_of(SplitGradient::ConvBias { stage }));
                }
            }
        }
        kernels.push(BackwardKernel::InputGradient);
        for (index, gradient) in projection_gradients(spec).1.iter().enumerate() {
            kernels.push(BackwardKernel::WeightGradient(index));
            kernels.extend(sum_of(SplitGradient::Weight(index)));
            if gradient.bias_output.is_some() {
                kernels.extend(sum_of(SplitGradient::WeightBias(index)));
            }
        }
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
            BackwardKernel::SumOfParts(which) => format!("sum_of_parts {{{}}}", which.describe()),
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
            BackwardKernel::TemperatureGradient => build_token_sum(&temperature_sum(spec)?),
            BackwardKernel::PrologueConvolutions => {
                build_prologue_conv_backward(spec, &default_schedule(spec, ForwardKernel::QkPrologue)?)
            }
            BackwardKernel::ConvWeightTap { stage, tap } => conv_weight_tap(spec, stage, tap),
            BackwardKernel::ConvBias { stage } => conv_bias(spec, stage),
            BackwardKernel::SumOfParts(which) => which.build_sum(spec),
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

/// A gradient reduced over every token in parts: its kernels write the [`parts_name`] buffer,
/// which [`BackwardKernel::SumOfParts`] adds up in order (the same bits every run).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SplitGradient {
    /// dL/dtemp.
    Temperature,
    /// Convolution stage `stage`'s weight gradient (every tap).
    ConvWeight { stage: usize },
    /// Convolution stage `stage`'s bias gradient.
    ConvBias { stage: usize },
    /// Weight gradient `index` of [`projection_gradients`]' list, when its tiles alone are too
    /// few CTAs.
    Weight(usize),
    /// Its bias gradient.
    WeightBias(usize),
}

impl SplitGradient {
    fn describe(self) -> String {
        match self {
            SplitGradient::Temperature => "temperature".into(),
            SplitGradient::ConvWeight { stage } => format!("conv_weight, stage = {stage}"),
            SplitGradient::ConvBias { stage } => format!("conv_bias, stage = {stage}"),
            SplitGradient::Weight(index) => format!("weight, index = {index}"),
            SplitGradient::WeightBias(index) => format!("weight_bias, index = {index}"),
        }
    }

    /// The gradient's buffer, its number of elements and the parts it is summed in: enough that
    /// the output's CTAs times the parts reach [`REDUCTION_CTAS`] (a projection's weight gradient
    /// is split only when its tiles are fewer than the SMs: [`projection_gradients`]); 1 where
    /// the output alone has enough CTAs.
    fn layout(self, spec: &AttentionSpec) -> Result<(String, usize, usize), String> {
        let packed = spec.packed_width();
        let parameter = |role: ParamRole| {
            param_name(spec, role).ok_or_else(|| format!("{} has no {role:?} parameter", spec.name))
        };
        let conv = |stage: usize| {
            spec.qk_conv.get(stage).copied().ok_or_else(|| format!("{} has no convolution stage {stage}", spec.name))
        };
        let token_sum_ctas = |columns: usize| columns.div_ceil(TOKEN_SUM_COLUMNS);
        let (name, elements, ctas) = match self {
            SplitGradient::Temperature => (parameter(ParamRole::KeyTemperature)?, spec.kv_heads, token_sum_ctas(spec.kv_heads)),
            SplitGradient::ConvBias { stage } => {
                conv(stage)?;
                (parameter(ParamRole::ConvBias { stage })?, packed, token_sum_ctas(packed))
            }
            SplitGradient::ConvWeight { stage } => {
                let conv = conv(stage)?;
                let weight = parameter(ParamRole::ConvWeight { stage })?;
                match conv.kind {
                    // One GEMM per head in the default gradient tiles.
                    ConvKind::PerHead => {
                        let tiles = spec.head_dim.div_ceil(GRADIENT_TILE as usize);
                        (weight, packed * spec.head_dim * conv.width, (spec.query_heads + spec.kv_heads) * tiles * tiles)
                    }
                    ConvKind::Depthwise => (weight, packed * conv.width, token_sum_ctas(packed)),
                }
            }
            SplitGradient::Weight(index) | SplitGradient::WeightBias(index) => {
                let weights = projection_gradients(spec).1;
                let gradient = weights
                    .get(index)
                    .ok_or_else(|| format!("{} has {} weight gradients, not {}", spec.name, weights.len(), index + 1))?;
                let (output, elements) = match self {
                    SplitGradient::Weight(_) => (Some(gradient.output.clone()), gradient.width * gradient.inputs),
                    _ => (gradient.bias_output.clone(), gradient.width),
                };
                let output = output.ok_or_else(|| format!("{}: {} has no bias", spec.name, gradient.name))?;
                return Ok((output, elements, gradient.parts));
            }
        };
        Ok((gradient_name(&name), elements, reduction_parts(ctas, elements)))
    }

    /// The kernel adding up the parts, in order, into the gradient (viewed flat).
    fn build_sum(self, spec: &AttentionSpec) -> Result<KernelFn, String> {
        let (output, elements, parts) = self.layout(spec)?;
        let name = match self {
            SplitGradient::Temperature => format!("{}_temperature_grad_sum", spec.name),
            SplitGradient::ConvWeight { stage } => format!("{}_conv{stage}_dweight_sum", spec.name),
            SplitGradient::ConvBias { stage } => format!("{}_conv{stage}_dbias_sum", spec.name),
            SplitGradient::Weight(index) | SplitGradient::WeightBias(index) => {
                let gemm = &projection_gradients(spec).1[index].name;
                if matches!(self, SplitGradient::Weight(_)) { format!("{gemm}_sum") } else { format!("{gemm}_bias_sum") }
            }
        };
        build_token_sum(&TokenSum {
            name,
            input: parts_name(&output),
            elem: ElemType::F32,
            columns: elements,
            rows: SummedRows::Parts(parts),
            factor: None,
            parts: 1,
            output,
            output_shape: vec![elements],
            output_tap: None,
        })
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
    let (output, _, parts) = SplitGradient::ConvWeight { stage }.layout(spec)?;
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
                output,
                output_shape: vec![p, d, conv.width],
                output_tap: Some(tap),
                bias_output: None,
                parts,
                storage,
            };
            with_default_gradient_schedule(|s| build_weight_gradient(&gradient, s))
        }
        ConvKind::Depthwise => build_token_sum(&TokenSum {
            name,
            input: dy,
            elem: storage,
            columns: p,
            rows: SummedRows::Tokens { rows_before: dy_rows_before },
            factor: Some((x, x_rows_before, row_shift)),
            parts,
            output,
            output_shape: vec![p, 1, conv.width],
            output_tap: Some(tap),
        }),
    }
}

/// A convolution stage's bias gradient: the token sum of its output gradient.
fn conv_bias(spec: &AttentionSpec, stage: usize) -> Result<KernelFn, String> {
    let ((dy, dy_rows_before), _) = conv_stage_operands(spec, stage)?;
    let (output, _, parts) = SplitGradient::ConvBias { stage }.layout(spec)?;
    build_token_sum(&TokenSum {
        name: format!("{}_conv{stage}_dbias", spec.name),
        input: dy,
        elem: spec.dtype.into(),
        columns: spec.packed_width(),
        rows: SummedRows::Tokens { rows_before: dy_rows_before },
        factor: None,
        parts,
        output,
        output_shape: vec![spec.packed_width()],
        output_tap: None,
    })
}

/// dL/dtemp [Hk] from the prologue backward's rows, in parts.
fn temperature_sum(spec: &AttentionSpec) -> Result<TokenSum, String> {
    let (output, _, parts) = SplitGradient::Temperature.layout(spec)?;
    Ok(TokenSum {
        name: format!("{}_temperature_grad", spec.name),
        input: "dtemp_rows".into(),
        elem: ElemType::F32,
        columns: spec.kv_heads,
        rows: SummedRows::Tokens { rows_before: 0 },
        factor: None,
        parts,
        output,
        output_shape: vec![spec.kv_heads],
        output_tap: None,
    })
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
    // A weight gradient whose default tiles are fewer CTAs than SMs sums its tokens in parts.
    let split = |mut gradient: WeightGradient| {
        let tile = GRADIENT_TILE as usize;
        let ctas = gradient.width.div_ceil(tile) * gradient.inputs.div_ceil(tile);
        let elements = gradient.width * gradient.inputs;
        gradient.parts = if ctas < TARGET_SMS as usize { reduction_parts(ctas, elements) } else { 1 };
        gradient
    };
    let mut weights = vec![split(WeightGradient {
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
        parts: 1,
        storage,
    })];
    for (index, segment) in segments.iter().enumerate() {
        weights.push(split(WeightGradient {
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
            parts: 1,
            storage,
        }));
    }
    (vec![out_proj, qkv], weights)
}

/// Rows and columns of a gradient GEMM's output tile in its default schedule (what the split
/// into parts counts CTAs by).
const GRADIENT_TILE: u32 = 128;

/// A gradient GEMM with the schedule it gets unless told otherwise: 128 × 128 output tiles on
/// two warpgroups (wgmma where the builder can: 64-wide chunks, a three-stage ring of 96 KiB, 64
/// accumulator registers a thread), else 64 rows on one, else the first of 64 × 64,
/// 32 × 32 and 16 × 16 tiles (4, 2, 1 warps; 32-wide chunks, else 16) with a two-stage copy ring
/// that `build` accepts (segments must be whole tiles and chunks).
pub fn with_default_gradient_schedule(build: impl Fn(&Schedule) -> Result<KernelFn, String>) -> Result<KernelFn, String> {
    let wgmma = [(GRADIENT_TILE, 8), (64, 4)]
        .map(|(block_m, warps)| Schedule { block_m, block_n: GRADIENT_TILE, block_k: 64, warps, stages: 3 });
    let mma_sync = [(64, 4), (32, 2), (16, 1)].into_iter().flat_map(|(block, warps)| {
        [32, 16].map(move |block_k| Schedule { block_m: block, block_n: block, block_k, warps, stages: 2 })
    });
    first_that_builds(wgmma.into_iter().chain(mma_sync), build).map(|(_, kernel)| kernel)
}
