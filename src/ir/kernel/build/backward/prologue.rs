//! `qk_prologue_bwd_conv`: the gradient of p0 from `dmixed` (the gradient at the q-k mean's
//! output, which `qk_prologue_bwd` writes), back through the convolutions and the q-k mean.
//!
//! The forward's mirror: one CTA per (head, row tile, batch element), heads fastest. A stage's
//! input row r feeds its output rows r .. r + K − 1, so the backward of a tile of output rows
//! needs the T rows after it (a halo below the tile, recomputed by the next tile too), where the
//! forward needed T rows before. Per tile of `block_m` rows:
//! - the head's rows of `dmixed` are copied (zero past S) above `trail` zero rows, so that a
//!   shifted tap stays inside the staged tile;
//! - each stage, last first: a per-head stage is one mma per tap, A the staged gradient rows
//!   shifted down by K − 1 − tap, B the tap's [out, in] weights read as they are (Wᵀ applied from
//!   the right); a depthwise stage is an element-wise map. Each stage's result is rounded to the
//!   storage type, as the forward rounds its outputs;
//! - the q-k mean's fan-in is added from `dmixed` in global memory (the query head's kv head at
//!   (½/G), a key head's G query heads at ½ each) with the identity path's ½ of the own head, and
//!   the tile's rows without the halo are stored to `dp0`.
//!
//! The tiles start T rows before token 0: the gradients of the stage outputs that later stages
//! read from the padding (tokens −R .. −1, R the later stages' history) feed the weight and bias
//! gradients, so each stage's gradient is kept in [`stage_gradient_name`] ([B, T + S, P], row T
//! at token 0).

use super::super::qk_prologue::{head_row_tiles, widest_tap_reach};
use super::super::*;

/// The buffer holding the gradient of convolution stage `stage`'s output: `dmixed` for the last
/// stage, else [B, T + S, P] with row T at token 0.
pub fn stage_gradient_name(spec: &AttentionSpec, stage: usize) -> String {
    if stage + 1 == spec.qk_conv.len() { "dmixed".into() } else { format!("dconv{stage}") }
}

/// Builds `qk_prologue_bwd_conv` for `spec` with `schedule` (block_m rows per tile including the
/// T halo rows, block_n = head_dim, warps), verified.
pub fn build_prologue_conv_backward(spec: &AttentionSpec, schedule: &Schedule) -> Result<KernelFn, String> {
    spec.validate()?;
    let s = schedule;
    let d = spec.head_dim as u32;
    if spec.qk_conv.is_empty() && !spec.qk_mean {
        return Err(format!("{}: no convolution or q-k mean between p0 and the norm", spec.name));
    }
    let (halo, (wm, wn)) = head_row_tiles(spec, s, "qk_prologue_bwd_conv")?;
    let m = s.block_m;
    let storage: ElemType = spec.dtype.into();
    let trail = widest_tap_reach(spec);
    let out_rows = m - halo;
    let mut t = Tiles { decls: Vec::new() };
    let rows = m + trail;
    let grad_s = t.shared("grad_s", storage, rows, d);
    // A per-head stage writes over its input once its mmas have read it; a depthwise stage needs
    // another buffer.
    let mut spare: Option<TileId> = None;
    let mut stage_src = Vec::new();
    let mut stage_dst = Vec::new();
    let mut current = grad_s;
    for stage in spec.qk_conv.iter().rev() {
        let dst = match stage.kind {
            ConvKind::PerHead => current,
            ConvKind::Depthwise => {
                if current == grad_s {
                    *spare.get_or_insert_with(|| t.shared("conv_s", storage, rows, d))
                } else {
                    grad_s
                }
            }
        };
        stage_src.push(current);
        stage_dst.push(dst);
        current = dst;
    }
    let weights: Vec<Option<TileId>> = spec
        .qk_conv
        .iter()
        .enumerate()
        .map(|(index, conv)| {
            (conv.kind == ConvKind::PerHead).then(|| t.shared(&format!("w{index}"), storage, conv.width as u32 * d, d))
        })
        .collect();
    let acc = t.regs("acc", ElemType::F32, m, d, Layout::MmaAccumulator { warps_m: wm, warps_n: wn });
    let name_of = |role| param_name(spec, role).expect("roles asked for exist in spec.params()");

    let mut body = vec![
        Stmt::Note(format!(
            "CTA = head `head` (query heads first), {out_rows} rows of batch b (+{halo} halo rows after them): dp0 from dmixed"
        )),
        let_("head", Expr::BlockIdx(Axis::X)),
        let_("b", Expr::BlockIdx(Axis::Z)),
        let_("channel0", var("head") * int(d)),
        let_("t0", Expr::BlockIdx(Axis::Y) * int(out_rows) - int(halo)),
    ];
    if trail > 0 {
        let mut zeroed = vec![grad_s];
        zeroed.extend(spare);
        body.extend(zeroed.into_iter().map(|tile| Stmt::Fill { dst: t.view(tile, int(m), int(0), trail, d), value: 0.0 }));
    }
    for (index, stage) in spec.qk_conv.iter().enumerate() {
        let Some(w) = weights[index] else { continue };
        let weight = name_of(ParamRole::ConvWeight { stage: index });
        for tap in 0..stage.width as u32 {
            body.push(Stmt::Copy {
                dst: t.view(w, int(tap * d), int(0), d, d),
                src: GlobalTile {
                    param: weight.clone(),
                    dims: vec![span(var("channel0"), d), span(int(0), d), GlobalDim::At(int(tap))],
                },
                is_async: false,
            });
        }
    }
    let dmixed_rows =
        |channel0: Expr| GlobalTile { param: "dmixed".into(), dims: vec![GlobalDim::At(var("b")), span(var("t0"), m), span(channel0, d)] };
    body.extend([
        Stmt::Copy { dst: t.view(grad_s, int(0), int(0), m, d), src: dmixed_rows(var("channel0")), is_async: true },
        Stmt::AsyncCommit,
        Stmt::AsyncWait { pending: 0 },
        Stmt::Barrier,
    ]);
    for (position, (index, stage)) in spec.qk_conv.iter().enumerate().rev().enumerate() {
        let (src, dst) = (stage_src[position], stage_dst[position]);
        let k = stage.width as u32;
        body.push(Stmt::Note(format!("conv stage {index} backward: input row r gets output rows r .. r + {}", k - 1)));
        match stage.kind {
            ConvKind::Depthwise => {
                let weight = name_of(ParamRole::ConvWeight { stage: index });
                let mut expr = Expr::Float(0.0);
                for tap in 0..k {
                    let w = Expr::global(&weight, vec![var("channel0") + Expr::Col, int(0), int(tap)]);
                    expr = expr + w * Expr::tile(src, plus(Expr::Row, (k - 1 - tap) as i64), Expr::Col);
                }
                body.push(Stmt::Map { dst: t.view(dst, int(0), int(0), m, d), expr });
            }
            ConvKind::PerHead => {
                let w = weights[index].expect("a per-head stage has a weight tile");
                // Output row r + K − 1 − tap read input row r through tap `tap`.
                body.push(Stmt::Fill { dst: t.whole(acc), value: 0.0 });
                body.push(for_(
                    "tap",
                    int(0),
                    int(k),
                    vec![Stmt::Mma {
                        acc: t.whole(acc),
                        a: t.view(src, int(k - 1) - var("tap"), int(0), m, d),
                        b: t.view(w, var("tap") * int(d), int(0), d, d),
                        a_transposed: false,
                        b_transposed: false,
                    }],
                ));
                // Every warp's mmas have read the rows written over next.
                body.push(Stmt::Barrier);
                body.push(Stmt::Convert { dst: t.view(dst, int(0), int(0), m, d), src: t.whole(acc) });
            }
        }
        body.push(Stmt::Barrier);
        if index > 0 {
            // dst holds the gradient of stage index − 1's output, kept for the weight gradients.
            // It is zero before the first token a later stage reads (−R): the gradient reaches a
            // token only from the tokens after it, and dmixed is zero before token 0.
            let history = halo as i64;
            body.extend([
                Stmt::Store {
                    src: t.view(dst, int(0), int(0), m, d),
                    dst: GlobalTile {
                        param: stage_gradient_name(spec, index - 1),
                        dims: vec![
                            GlobalDim::At(var("b")),
                            GlobalDim::Span {
                                start: var("t0") + int(history),
                                len: m,
                                // From token −T on: the zeros too, which the sums over rows read.
                                valid: Some((var("t0") + int(history), var("t0") + int(history + out_rows as i64))),
                            },
                            span(var("channel0"), d),
                        ],
                    },
                },
            ]);
        }
    }
    // The identity path (or the convolutions' result) plus the q-k mean's fan-in.
    let g = spec.groups() as i64;
    let hq = spec.query_heads as i64;
    let token = (var("t0") + Expr::Row).max(int(0)).min(seq() - int(1));
    let dmixed_at = |head: Expr| Expr::global("dmixed", vec![var("b"), token.clone(), head * int(d) + Expr::Col]);
    let own = Expr::tile(current, Expr::Row, Expr::Col);
    let mut query_expr = own.clone();
    let mut key_expr = own;
    let mut key_group = Vec::new();
    if spec.qk_mean {
        let half = |e: Expr| Expr::Float(0.5) * e;
        query_expr = query_expr + half(dmixed_at(var("head"))) + Expr::Float(0.5 / g as f64) * dmixed_at(int(hq) + var("kv"));
        key_expr = key_expr + half(dmixed_at(var("head")));
        // A key head's G query heads one per iteration, as in the forward.
        key_group.push(for_(
            "s",
            int(0),
            int(g),
            vec![Stmt::Map { dst: t.whole(acc), expr: Expr::Elem + half(dmixed_at(var("kv") * int(g) + var("s"))) }],
        ));
    }
    let mut key_body = vec![let_("kv", var("head") - int(hq)), Stmt::Map { dst: t.whole(acc), expr: key_expr }];
    key_body.extend(key_group);
    body.push(Stmt::If {
        cond: var("head").lt(int(hq)),
        then_body: vec![let_("kv", var("head").floor_div(int(g))), Stmt::Map { dst: t.whole(acc), expr: query_expr }],
        else_body: key_body,
    });
    body.push(Stmt::Store {
        src: t.whole(acc),
        dst: GlobalTile {
            param: "dp0".into(),
            dims: vec![
                GlobalDim::At(var("b")),
                GlobalDim::Span { start: var("t0"), len: m, valid: Some((var("t0").max(int(0)), var("t0") + int(out_rows))) },
                span(var("channel0"), d),
            ],
        },
    });
    let packed = || vec![SizeExpr::batch(), SizeExpr::seq_len(), size(spec.packed_width())];
    let mut params = vec![tensor("dmixed", storage, packed(), Access::Read)];
    params.extend(weight_params(spec, |role| matches!(role, ParamRole::ConvWeight { .. })));
    params.push(tensor("dp0", storage, packed(), Access::Write));
    for stage in 0..spec.qk_conv.len().saturating_sub(1) {
        let padded = vec![SizeExpr::batch(), SizeExpr::seq_len() + size(halo as usize), size(spec.packed_width())];
        params.push(tensor(&stage_gradient_name(spec, stage), storage, padded, Access::Write));
    }
    let grid = [
        size(spec.query_heads + spec.kv_heads),
        (SizeExpr::seq_len() + size(halo as usize)).ceil_div(out_rows as u64),
        SizeExpr::batch(),
    ];
    verified(tiled_kernel(format!("{}_qk_prologue_bwd_conv", spec.name), params, grid, s, t, body), s)
}
