//! The GEMMs of the projections' backward, on activations seen as [B, S, columns]:
//!
//! - an input gradient `dinput[b, t, :] = Σ_terms dy[b, t + shift, segment]·W` (dx through the
//!   q, k and value projections, the delayed value heads reading dy one token later; do through
//!   o_proj), each term a segment of columns of a gradient times its weight [width, inputs];
//! - a weight gradient `dW = Σ_{b, t} dy[b, t, segment]ᵀ·x[b, t − shift]` (and, with a bias,
//!   `db = Σ_{b, t} dy[b, t, segment]`), reducing over every token of the batch in one CTA in a
//!   fixed order: no atomics, the same bits every run. dyᵀ is read transposed from shared memory.
//!
//! Gradients between kernels are in the storage type (as PyTorch's bf16 autograd keeps them);
//! weight gradients leave in f32.

use super::super::*;
use super::parts_name;

/// One product of an input gradient: `dy[b, t + row_shift, column0 .. column0 + width]·weight`,
/// weight [width, inputs].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GradientTerm {
    pub dy: String,
    /// Columns of the whole dy tensor.
    pub dy_columns: usize,
    pub column0: usize,
    pub width: usize,
    pub weight: String,
    /// 1 where the forward read the previous token (the delayed value heads), else 0.
    pub row_shift: usize,
}

/// `output[b, t, :] = Σ_terms term`, [B, S, inputs] in the storage type.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputGradient {
    pub name: String,
    pub terms: Vec<GradientTerm>,
    pub inputs: usize,
    pub output: String,
    pub storage: ElemType,
}

/// `output = Σ_{b, t} dy[b, t, column0 .. column0 + width]ᵀ·x[b, t − row_shift, x_column0 ..
/// x_column0 + inputs]` [width, inputs], and `bias_output = Σ_{b, t} dy[b, t, column0 ..]`
/// [width] when given; both f32. t runs over every row of dy, those before token 0 included
/// (the padded stage gradients of the convolutions). With `parts` > 1 the tokens are split over
/// that many CTAs per output tile, each writing its own row of [`parts_name`] of `output` and
/// `bias_output` ([parts, ..shape], added up in order by a later kernel).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WeightGradient {
    pub name: String,
    pub dy: String,
    pub dy_columns: usize,
    /// Rows of dy (and of x) before token 0: dy and x are [B, rows_before + S, columns], row
    /// rows_before holding token 0. 0 for activations.
    pub dy_rows_before: usize,
    pub column0: usize,
    pub width: usize,
    pub x: String,
    pub x_columns: usize,
    pub x_rows_before: usize,
    pub x_column0: usize,
    pub inputs: usize,
    /// 1 for the delayed value heads (the previous token's x), K − 1 − tap for a convolution tap.
    pub row_shift: usize,
    /// One GEMM per head along the grid's z, (heads, head width): head z adds z·width to both
    /// column starts and to the output's first row (a per-head convolution's [P, d, K] weight).
    pub heads: Option<(usize, usize)>,
    pub output: String,
    /// [rows, inputs], or [rows, inputs, taps] with `output_tap` the tap written.
    pub output_shape: Vec<usize>,
    pub output_tap: Option<usize>,
    pub bias_output: Option<String>,
    pub parts: usize,
    pub storage: ElemType,
}

fn activation(name: &str, elem: ElemType, columns: usize, access: Access) -> KernelParam {
    tensor(name, elem, vec![SizeExpr::batch(), SizeExpr::seq_len(), size(columns)], access)
}

fn check_schedule(s: &Schedule) -> Result<(u32, u32), String> {
    if s.block_m == 0 || s.block_n == 0 || s.block_k == 0 || s.warps == 0 || s.stages == 0 {
        return Err(format!("schedule {s:?} has a zero size"));
    }
    if !s.block_k.is_multiple_of(16) {
        return Err(format!("block_k {} is not a multiple of 16", s.block_k));
    }
    warp_grid(s.block_m, s.block_n, s.warps)
}

/// Builds an input-gradient GEMM with `schedule` (block_m rows × block_n input columns per CTA,
/// block_k-wide chunks of each term's segment), verified: a wgmma per chunk where the tiles are
/// whole warpgroups and panels, else mma.sync. Every segment is a whole number of chunks, so a
/// chunk never reads the next segment's columns.
pub fn build_input_gradient(gradient: &InputGradient, schedule: &Schedule) -> Result<KernelFn, String> {
    let s = schedule;
    let (wm, wn) = check_schedule(s)?;
    let (bm, bn, bk) = (s.block_m, s.block_n, s.block_k);
    if let Some(term) = gradient.terms.iter().find(|term| !term.width.is_multiple_of(bk as usize)) {
        return Err(format!("{}: segment of {} columns of {} is not a whole number of {bk}-column chunks", gradient.name, term.width, term.dy));
    }
    let mut t = Tiles { decls: Vec::new() };
    // Whole warpgroups along M and whole 128-byte panels of dy's chunk (K-major) and of W's
    // columns (MN-major): swizzled operands, and the product is a wgmma; else mma.sync.
    let panel = layout::panel_cols(gradient.storage);
    let wgmma = layout::wgmma_accumulator_fits(wm, wn, bm, bn) && bk.is_multiple_of(panel) && bn.is_multiple_of(panel);
    let (dy_s, w_s) = if wgmma {
        (t.swizzled("dy_s", gradient.storage, s.stages * bm, bk), t.swizzled("w_s", gradient.storage, s.stages * bk, bn))
    } else {
        (t.shared("dy_s", gradient.storage, s.stages * bm, bk), t.shared("w_s", gradient.storage, s.stages * bk, bn))
    };
    let acc = t.regs("acc", ElemType::F32, bm, bn, Layout::MmaAccumulator { warps_m: wm, warps_n: wn });
    let mut body = vec![
        Stmt::Note(format!("CTA = rows {bm} x input columns {bn} of {} for batch b", gradient.output)),
        let_("col_tile", Expr::BlockIdx(Axis::X)),
        let_("row_tile", Expr::BlockIdx(Axis::Y)),
        let_("b", Expr::BlockIdx(Axis::Z)),
        let_("row0", var("row_tile") * int(bm)),
        let_("col0", var("col_tile") * int(bn)),
        Stmt::Fill { dst: t.whole(acc), value: 0.0 },
    ];
    for term in &gradient.terms {
        body.push(Stmt::Note(format!(
            "+= {}[t{}, {}..{}]·{}",
            term.dy,
            if term.row_shift == 0 { String::new() } else { format!(" + {}", term.row_shift) },
            term.column0,
            term.column0 + term.width,
            term.weight
        )));
        let load = |chunk: Expr, slot: Expr| {
            let k0 = times(chunk, bk);
            vec![
                Stmt::Copy {
                    dst: t.view(dy_s, times(slot.clone(), bm), int(0), bm, bk),
                    src: GlobalTile {
                        param: term.dy.clone(),
                        dims: vec![
                            GlobalDim::At(var("b")),
                            span(plus(var("row0"), term.row_shift as i64), bm),
                            span(plus(k0.clone(), term.column0 as i64), bk),
                        ],
                    },
                    is_async: true,
                },
                Stmt::Copy {
                    dst: t.view(w_s, times(slot, bk), int(0), bk, bn),
                    src: GlobalTile { param: term.weight.clone(), dims: vec![span(k0, bk), span(var("col0"), bn)] },
                    is_async: true,
                },
            ]
        };
        let compute = |_: Expr, slot: Expr| {
            vec![Stmt::Mma {
                acc: t.whole(acc),
                a: t.view(dy_s, times(slot.clone(), bm), int(0), bm, bk),
                b: t.view(w_s, times(slot, bk), int(0), bk, bn),
                a_transposed: false,
                b_transposed: false,
            }]
        };
        body.extend(pipelined_loop("kc", int(term.width / bk as usize), s.stages, &load, &compute));
    }
    body.push(Stmt::Store {
        src: t.whole(acc),
        dst: GlobalTile {
            param: gradient.output.clone(),
            dims: vec![GlobalDim::At(var("b")), span(var("row0"), bm), span(var("col0"), bn)],
        },
    });
    let mut params = Vec::new();
    for term in &gradient.terms {
        if !params.iter().any(|p: &KernelParam| p.name() == term.dy) {
            params.push(activation(&term.dy, gradient.storage, term.dy_columns, Access::Read));
        }
    }
    for term in &gradient.terms {
        params.push(tensor(&term.weight, gradient.storage, vec![size(term.width), size(gradient.inputs)], Access::Read));
    }
    params.push(activation(&gradient.output, gradient.storage, gradient.inputs, Access::Write));
    let grid = [size(gradient.inputs.div_ceil(bn as usize)), SizeExpr::seq_len().ceil_div(bm as u64), SizeExpr::batch()];
    verified(tiled_kernel(gradient.name.clone(), params, grid, s, t, body), s)
}

/// Builds a weight-gradient GEMM with `schedule` (block_m weight rows × block_n input columns per
/// CTA, block_k tokens per step), verified. The weight's rows are a whole number of tiles.
pub fn build_weight_gradient(gradient: &WeightGradient, schedule: &Schedule) -> Result<KernelFn, String> {
    let s = schedule;
    let (wm, wn) = check_schedule(s)?;
    let (bm, bn, bk) = (s.block_m, s.block_n, s.block_k);
    if !gradient.width.is_multiple_of(bm as usize) {
        return Err(format!("{}: {} weight rows are not a whole number of {bm}-row tiles", gradient.name, gradient.width));
    }
    if gradient.parts == 0 {
        return Err(format!("{}: a sum in 0 parts", gradient.name));
    }
    // In parts, the kernel writes the parts buffers instead.
    let written = |buffer: &str| if gradient.parts > 1 { parts_name(buffer) } else { buffer.to_string() };
    let (output, bias_output) = (written(&gradient.output), gradient.bias_output.as_deref().map(written));
    let row_tiles = gradient.width / bm as usize;
    let mut t = Tiles { decls: Vec::new() };
    // Whole warpgroups along M, dy's chunk (read transposed: its lines along M) and x's in whole
    // 128-byte panels: swizzled operands and a wgmma per chunk; else mma.sync (always with a
    // bias, whose ones-column product reads dy from a row-major tile).
    let panel = layout::panel_cols(gradient.storage);
    let wgmma = gradient.bias_output.is_none()
        && layout::wgmma_accumulator_fits(wm, wn, bm, bn)
        && bm.is_multiple_of(panel)
        && bn.is_multiple_of(panel);
    let (dy_s, x_s) = if wgmma {
        (t.swizzled("dy_s", gradient.storage, s.stages * bk, bm), t.swizzled("x_s", gradient.storage, s.stages * bk, bn))
    } else {
        (t.shared("dy_s", gradient.storage, s.stages * bk, bm), t.shared("x_s", gradient.storage, s.stages * bk, bn))
    };
    let acc = t.regs("acc", ElemType::F32, bm, bn, Layout::MmaAccumulator { warps_m: wm, warps_n: wn });
    // The bias gradient as one more product: dyᵀ·e0 with e0 a [bk, 16] tile whose first column
    // is ones, then the row sums of the 16 columns (one of them nonzero).
    let bias = bias_output.as_ref().map(|output| {
        let ones = t.shared("e0_s", gradient.storage, bk, 16);
        let acc = t.regs("bias_acc", ElemType::F32, bm, 16, Layout::MmaAccumulator { warps_m: s.warps, warps_n: 1 });
        let sums = t.regs("bias_sums", ElemType::F32, bm, 1, Layout::RowVector { warps_m: s.warps, warps_n: 1 });
        (output, ones, acc, sums)
    });
    let dy_view = |slot: Expr| t.view(dy_s, times(slot, bk), int(0), bk, bm);
    if bias.is_some() && !bm.is_multiple_of(16 * s.warps) {
        return Err(format!("{}: the bias sums need {bm} rows in 16-row bands over {} warps", gradient.name, s.warps));
    }
    // dy row r is token r − dy_rows_before; x holds token t − row_shift at row
    // t − row_shift + x_rows_before.
    let x_row_offset = gradient.x_rows_before as i64 - gradient.dy_rows_before as i64 - gradient.row_shift as i64;
    let load = |i: Expr, slot: Expr| {
        // Part p adds steps p, p + parts, …: each a chunk of one batch element.
        let step = i * int(gradient.parts) + var("part");
        let row0 = times(step.clone().modulo(var("chunks")), bk);
        let b = step.floor_div(var("chunks"));
        vec![
            Stmt::Copy {
                dst: dy_view(slot.clone()),
                src: GlobalTile {
                    param: gradient.dy.clone(),
                    dims: vec![GlobalDim::At(b.clone()), span(row0.clone(), bk), span(var("dy_col0"), bm)],
                },
                is_async: true,
            },
            Stmt::Copy {
                dst: t.view(x_s, times(slot, bk), int(0), bk, bn),
                src: GlobalTile {
                    param: gradient.x.clone(),
                    dims: vec![GlobalDim::At(b), span(plus(row0, x_row_offset), bk), span(var("x_col0"), bn)],
                },
                is_async: true,
            },
        ]
    };
    let compute = |_: Expr, slot: Expr| {
        let mut out = vec![Stmt::Mma {
            acc: t.whole(acc),
            a: dy_view(slot.clone()),
            b: t.view(x_s, times(slot.clone(), bk), int(0), bk, bn),
            a_transposed: true,
            b_transposed: false,
        }];
        if let Some((_, ones, bias_acc, _)) = &bias {
            out.push(Stmt::If {
                cond: var("col_tile").eq(int(0)),
                then_body: vec![Stmt::Mma {
                    acc: t.whole(*bias_acc),
                    a: dy_view(slot),
                    b: t.whole(*ones),
                    a_transposed: true,
                    b_transposed: false,
                }],
                else_body: Vec::new(),
            });
        }
        out
    };
    let head_offset = match gradient.heads {
        Some((_, width)) => Expr::BlockIdx(Axis::Z) * int(width),
        None => int(0),
    };
    let mut body = vec![
        Stmt::Note(format!(
            "CTA = weight rows {bm} x input columns {bn} of {output}, summed over every token of the batch in order{}",
            if gradient.parts > 1 { format!(", part blockIdx.y / {row_tiles} of {}", gradient.parts) } else { String::new() }
        )),
        let_("col_tile", Expr::BlockIdx(Axis::X)),
        let_("row_tile", Expr::BlockIdx(Axis::Y).modulo(int(row_tiles))),
        let_("part", Expr::BlockIdx(Axis::Y).floor_div(int(row_tiles))),
        let_("row0", head_offset.clone() + var("row_tile") * int(bm)),
        let_("col0", var("col_tile") * int(bn)),
        let_("dy_col0", plus(var("row0"), gradient.column0 as i64)),
        let_("x_col0", plus(head_offset + var("col0"), gradient.x_column0 as i64)),
        let_("chunks", plus(seq(), gradient.dy_rows_before as i64).ceil_div(int(bk))),
        Stmt::Fill { dst: t.whole(acc), value: 0.0 },
    ];
    if let Some((_, ones, bias_acc, _)) = &bias {
        body.extend([
            Stmt::Fill { dst: t.whole(*bias_acc), value: 0.0 },
            Stmt::Map { dst: t.whole(*ones), expr: Expr::select(Expr::Col.eq(int(0)), Expr::Float(1.0), Expr::Float(0.0)) },
        ]);
    }
    // ceil((steps − part) / parts) steps, none when part is past the last.
    let parts = int(gradient.parts);
    let steps = (Expr::Size(SizeVar::Batch) * var("chunks") + parts.clone() - int(1) - var("part")).floor_div(parts);
    body.extend(pipelined_loop("i", steps, s.stages, &load, &compute));
    let part_dim = (gradient.parts > 1).then(|| GlobalDim::At(var("part")));
    let mut output_dims: Vec<GlobalDim> = part_dim.clone().into_iter().collect();
    output_dims.extend([span(var("row0"), bm), span(var("col0"), bn)]);
    output_dims.extend(gradient.output_tap.map(|tap| GlobalDim::At(int(tap))));
    body.push(Stmt::Store { src: t.whole(acc), dst: GlobalTile { param: output.clone(), dims: output_dims } });
    if let Some((output, _, bias_acc, sums)) = &bias {
        body.push(Stmt::If {
            cond: var("col_tile").eq(int(0)),
            then_body: vec![
                Stmt::RowReduce { dst: *sums, src: t.whole(*bias_acc), op: ReduceOp::Sum, value: Expr::Elem },
                Stmt::Store {
                    src: t.whole(*sums),
                    dst: GlobalTile { param: output.to_string(), dims: part_dim.into_iter().chain([span(var("row0"), bm)]).collect() },
                },
            ],
            else_body: Vec::new(),
        });
    }
    let padded = |columns: usize, rows_before: usize| {
        vec![SizeExpr::batch(), SizeExpr::seq_len() + size(rows_before), size(columns)]
    };
    let dy_shape = if gradient.dy_rows_before == 0 {
        activation(&gradient.dy, gradient.storage, gradient.dy_columns, Access::Read)
    } else {
        tensor(&gradient.dy, gradient.storage, padded(gradient.dy_columns, gradient.dy_rows_before), Access::Read)
    };
    let x_shape = if gradient.x_rows_before == 0 {
        activation(&gradient.x, gradient.storage, gradient.x_columns, Access::Read)
    } else {
        tensor(&gradient.x, gradient.storage, padded(gradient.x_columns, gradient.x_rows_before), Access::Read)
    };
    let with_parts = |shape: &[usize]| {
        (gradient.parts > 1).then_some(gradient.parts).into_iter().chain(shape.iter().copied()).map(size).collect()
    };
    let mut params = vec![dy_shape, x_shape, tensor(&output, ElemType::F32, with_parts(&gradient.output_shape), Access::Write)];
    if let Some(bias_output) = &bias_output {
        params.push(tensor(bias_output, ElemType::F32, with_parts(&[gradient.width]), Access::Write));
    }
    let grid = [
        size(gradient.inputs.div_ceil(bn as usize)),
        size(row_tiles * gradient.parts),
        size(gradient.heads.map_or(1, |(heads, _)| heads)),
    ];
    verified(tiled_kernel(gradient.name.clone(), params, grid, s, t, body), s)
}
