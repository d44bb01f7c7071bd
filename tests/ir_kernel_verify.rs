//! The kernel IR verifier on deliberately broken functions: each mutation of a valid kernel must
//! be reported with a message that names the statement and the rule.

mod common;

use ccc::ir::kernel::*;
use ccc::spec::AttentionSpec;
use common::specs::zaya1_like;

fn attention() -> KernelFn {
    let spec = AttentionSpec::plain("mha", 256, 64, 4, 4);
    let schedule = default_schedule(&spec, ForwardKernel::Attention).unwrap();
    build_forward(&spec, ForwardKernel::Attention, &schedule).unwrap()
}

fn tile_id(kernel: &KernelFn, name: &str) -> TileId {
    TileId(kernel.tiles.iter().position(|t| t.name == name).unwrap())
}

/// The body of the key-tile loop (a ring of 2 cp.async buffers by default).
fn kv_loop(kernel: &mut KernelFn) -> &mut Vec<Stmt> {
    kernel
        .body
        .iter_mut()
        .find_map(|s| match s {
            Stmt::For { var, body, .. } if var == "kv_step" => Some(body),
            _ => None,
        })
        .unwrap()
}

fn errors(kernel: &KernelFn) -> Vec<String> {
    kernel
        .verify()
        .expect_err("the broken kernel must not verify")
}

fn assert_reports(kernel: &KernelFn, expected: &str) {
    let errors = errors(kernel);
    assert!(
        errors.iter().any(|e| e == expected),
        "expected\n  {expected}\namong\n  {}",
        errors.join("\n  ")
    );
}

#[test]
fn the_built_kernels_verify() {
    attention().verify().unwrap();
    let spec = zaya1_like("zaya1", 2048, 128, 8, 2);
    for which in ForwardKernel::launched_by(&spec) {
        let schedule = default_schedule(&spec, which).unwrap();
        build_forward(&spec, which, &schedule)
            .unwrap()
            .verify()
            .unwrap();
    }
}

#[test]
fn a_wait_without_a_barrier_is_reported() {
    let mut kernel = attention();
    let body = kv_loop(&mut kernel);
    let wait = body
        .iter()
        .position(|s| matches!(s, Stmt::AsyncWait { .. }))
        .unwrap();
    body.remove(wait + 1);
    assert_reports(
        &kernel,
        "cp.async.wait 1: must be followed by a barrier so that every thread sees the copied tile",
    );
    assert_reports(
        &kernel,
        "mma %scores += %q_s * %k_s[kv_step % 2 * 64 .. +64, :]^T: reads %k_s after a write without a barrier",
    );
}

#[test]
fn reading_before_the_copy_is_waited_for_is_reported() {
    let expected = "mma %scores += %q_s * %k_s[kv_step % 2 * 64 .. +64, :]^T: \
                    reads %k_s before its cp.async is waited for";
    // Waiting for all but the two newest groups leaves the tile about to be used in flight.
    let mut kernel = attention();
    for stmt in kv_loop(&mut kernel).iter_mut() {
        if let Stmt::AsyncWait { pending } = stmt {
            *pending = 2;
        }
    }
    assert_reports(&kernel, expected);
    let mut kernel = attention();
    kv_loop(&mut kernel).retain(|s| !matches!(s, Stmt::AsyncWait { .. }));
    assert_reports(&kernel, expected);
}

#[test]
fn overwriting_a_tile_still_being_read_is_reported() {
    let mut kernel = attention();
    let body = kv_loop(&mut kernel);
    assert_eq!(body.pop(), Some(Stmt::Barrier));
    assert_reports(
        &kernel,
        "cp.async %k_s[(kv_step + 1) % 2 * 64 .. +64, :] <- \
         k[b, (kv_first + (kv_step + 1)) * 64 .. +64, kv_head, 0 .. +64]: \
         overwrites %k_s while other threads may still read it (missing barrier)",
    );
}

#[test]
fn mma_and_copy_shapes_must_agree() {
    let mut kernel = attention();
    let q_s = tile_id(&kernel, "q_s");
    for stmt in kv_loop(&mut kernel).iter_mut() {
        if let Stmt::Mma {
            a,
            b_transposed: true,
            ..
        } = stmt
        {
            *a = TileView {
                tile: q_s,
                row0: Expr::Int(0),
                col0: Expr::Int(0),
                rows: 64,
                cols: 48,
            };
        }
    }
    for stmt in kernel.body.iter_mut() {
        if let Stmt::Copy { src, .. } = stmt {
            src.dims[3] = GlobalDim::Span {
                start: Expr::Int(0),
                len: 32,
                valid: None,
            };
        }
    }
    assert_reports(
        &kernel,
        "mma %scores += %q_s[:, 0 .. +48] * %k_s[kv_step % 2 * 64 .. +64, :]^T: K of a (48) != K of b (64)",
    );
    assert_reports(
        &kernel,
        "cp.async %q_s <- q[b, q_row0 .. +64, h, 0 .. +32]: box 64x32 into view 64x64",
    );
}

#[test]
fn mma_fragments_and_warp_grids_are_checked() {
    let mut kernel = attention();
    let scores = tile_id(&kernel, "scores");
    kernel.tiles[scores.0].ty.rows = 48;
    assert_reports(
        &kernel,
        "tile %scores: 48x64 over 4x1 warps is not made of 16x8 mma fragments",
    );
    let mut kernel = attention();
    kernel.warps = 2;
    assert_reports(
        &kernel,
        "tile %scores: warp grid 4x1 does not match 2 warps",
    );
}

#[test]
fn the_accumulator_must_live_in_registers() {
    let mut kernel = attention();
    let v_s = tile_id(&kernel, "v_s");
    let body = kv_loop(&mut kernel);
    for stmt in body.iter_mut() {
        if let Stmt::Mma {
            acc,
            b_transposed: false,
            ..
        } = stmt
        {
            acc.tile = v_s;
        }
    }
    let errors = errors(&kernel);
    assert!(
        errors
            .iter()
            .any(|e| e.ends_with("the accumulator must be an mma_acc register tile")),
        "{errors:?}"
    );
}

#[test]
fn shared_memory_over_the_limit_is_reported() {
    let mut kernel = attention();
    let k_s = tile_id(&kernel, "k_s");
    kernel.tiles[k_s.0].ty.rows = 2048;
    assert_reports(
        &kernel,
        "kernel mha_attention: shared memory 287744 bytes exceeds the 232448-byte limit",
    );
}

#[test]
fn loop_variables_are_scoped_to_their_loop() {
    let mut kernel = attention();
    kernel.body.push(Stmt::Let {
        var: "late".into(),
        value: Expr::var("kv_tile"),
    });
    assert_reports(
        &kernel,
        "let late = kv_tile: variable kv_tile is not in scope",
    );
}

#[test]
fn parameters_must_exist_and_be_used_as_declared() {
    let mut kernel = attention();
    for stmt in kernel.body.iter_mut() {
        if let Stmt::Store { dst, .. } = stmt {
            if dst.param == "o" {
                dst.param = "out".into();
            } else {
                dst.param = "q".into();
            }
        }
    }
    let errors = errors(&kernel);
    assert!(
        errors.contains(
            &"store %o -> out[b, q_row0 .. +64, h, 0 .. +64]: no parameter named out".to_string()
        ),
        "{errors:?}"
    );
    assert!(
        errors.contains(
            &"store %m -> q[b, h, q_row0 .. +64]: q is written but not declared so".to_string()
        ),
        "{errors:?}"
    );
    assert!(
        errors.contains(
            &"store %m -> q[b, h, q_row0 .. +64]: q has 4 dimensions, indexed with 3".to_string()
        ),
        "{errors:?}"
    );
}

#[test]
fn elementwise_reads_respect_thread_ownership_and_types() {
    let mut kernel = attention();
    let (k_s, scores) = (tile_id(&kernel, "k_s"), tile_id(&kernel, "scores"));
    let k_view = TileView::whole(k_s, &kernel.tiles[k_s.0].ty);
    kernel.body.push(Stmt::Map {
        dst: k_view.clone(),
        expr: Expr::tile(scores, Expr::Row, Expr::Col),
    });
    kernel.body.push(Stmt::Map {
        dst: k_view,
        expr: Expr::Elem + Expr::Int(1),
    });
    assert_reports(
        &kernel,
        "map %k_s = %scores[row, col]: register tile %scores read by a map into shared memory",
    );
    assert_reports(&kernel, "map %k_s = elem + 1: `elem + 1` mixes F32 and I32");
}

#[test]
fn swizzled_tiles_follow_the_wgmma_rules() {
    // Written by copy, read by mma only.
    let mut kernel = attention();
    let q_s = tile_id(&kernel, "q_s");
    assert_eq!(kernel.tile(q_s).ty.layout, Layout::Swizzled128B, "the attention operands are swizzled for wgmma");
    let whole = TileView::whole(q_s, &kernel.tile(q_s).ty);
    kernel.body.push(Stmt::Map { dst: whole, expr: Expr::Elem });
    assert_reports(
        &kernel,
        "map %q_s = elem: swizzled128b tile %q_s is only written by copy, TMA and convert from an accumulator, and read by mma",
    );
    // Convert writes one from an accumulator (a later wgmma's operand), not from operand fragments.
    let scores = tile_id(&kernel, "scores");
    let probs = tile_id(&kernel, "probs");
    let (rows, cols) = (kernel.tile(scores).ty.rows, kernel.tile(scores).ty.cols);
    let window = TileView { tile: q_s, row0: Expr::Int(0), col0: Expr::Int(0), rows, cols };
    let mut kernel = attention();
    kernel.body.push(Stmt::Convert { dst: window.clone(), src: TileView::whole(scores, &kernel.tile(scores).ty) });
    let errors = kernel.verify().err().unwrap_or_default().join("\n");
    assert!(!errors.contains("conversion") && !errors.contains("only written by"), "{errors}");
    kernel.body.push(Stmt::Convert { dst: window, src: TileView::whole(probs, &kernel.tile(probs).ty) });
    assert_reports(
        &kernel,
        "convert %q_s <- %probs: no conversion from MmaOperandA { warps_m: 4, warps_n: 1 } to Swizzled128B (accumulator → shared, 16-bit swizzled included, or → operand A)",
    );
    // Windows of whole 8-row atoms.
    let mut kernel = attention();
    let k_s = tile_id(&kernel, "k_s");
    let span = |len| GlobalDim::Span { start: Expr::Int(0), len, valid: None };
    kernel.body.push(Stmt::Copy {
        dst: TileView { tile: k_s, row0: Expr::Int(4), col0: Expr::Int(0), rows: 64, cols: 64 },
        src: GlobalTile { param: "k".into(), dims: vec![GlobalDim::At(Expr::Int(0)), span(64), GlobalDim::At(Expr::Int(0)), span(64)] },
        is_async: true,
    });
    assert_reports(
        &kernel,
        "cp.async %k_s[4 .. +64, :] <- k[0, 0 .. +64, 0, 0 .. +64]: a window of swizzled128b tile %k_s spans whole \
         8-row atoms and 64-column panels (row offset a multiple of 8, constant column offset)",
    );
    // Whole 128-byte panels.
    let mut kernel = attention();
    kernel.tiles[q_s.0].ty.cols = 96;
    assert_reports(&kernel, "tile %q_s: a 128-byte swizzled tile of bf16 needs a multiple of 64 columns, not 96");
    // A swizzled A needs a swizzled B (wgmma).
    let mut kernel = attention();
    kernel.tiles[k_s.0].ty.layout = Layout::RowMajor { pad: 8 };
    assert_reports(
        &kernel,
        "mma %scores += %q_s * %k_s[kv_step % 2 * 64 .. +64, :]^T: a swizzled128b operand a needs a swizzled128b operand b (wgmma)",
    );
    // Whole warpgroups along M, one 16-row band per warp.
    let mut kernel = attention();
    let scores = tile_id(&kernel, "scores");
    kernel.tiles[scores.0].ty.layout = Layout::MmaAccumulator { warps_m: 2, warps_n: 2 };
    assert_reports(
        &kernel,
        "mma %scores += %q_s * %k_s[kv_step % 2 * 64 .. +64, :]^T: wgmma needs whole warpgroups along M with one \
         16-row band per warp, not 2x2 warps over 64 rows",
    );
}

/// Shapes the lowering cannot take are verifier errors, so that `check` and the schedule search
/// see them: an mma.sync whose warps hold fewer than 16 columns each; a row reduction over warps
/// split along the columns (which meet in shared memory between CTA barriers) into row shares.
/// The same reduction into a row vector verifies, and the shared layout holds its words.
#[test]
fn warp_splits_the_lowering_cannot_take_are_reported() {
    let spec = zaya1_like("zaya1", 2048, 128, 8, 2);
    let split = Schedule { block_m: 64, block_n: 128, block_k: 32, warps: 8, stages: 1 };
    let mut kernel = build_forward(&spec, ForwardKernel::QkPrologue, &split).unwrap();
    assert_eq!(kernel.row_reduce_scratch_bytes(), 64 * 2 * 4);
    let sum_sq = tile_id(&kernel, "sum_sq");
    kernel.tiles[sum_sq.0].ty.layout = Layout::RowShares { warps_m: 4, warps_n: 2 };
    let errors = errors(&kernel);
    assert!(
        errors.iter().any(|e| e.ends_with("a row reduction over warps split 2 ways along the columns needs the whole CTA and a row vector (not inside a role, not into row shares)")),
        "{errors:?}"
    );
    let narrow = zaya1_like("narrow", 256, 16, 12, 4);
    let error = build_forward(&narrow, ForwardKernel::QkPrologue, &Schedule { block_n: 16, ..split }).unwrap_err();
    assert!(error.contains("each warp's N extent (16 columns over 2 warps) is not a multiple of 16"), "{error}");
}

/// The occupancy goal must fit one SM: shared memory (with the 1 KiB kept per CTA) and threads.
#[test]
fn an_occupancy_goal_that_does_not_fit_is_reported() {
    let spec = zaya1_like("zaya1", 2048, 128, 8, 2);
    let mut kernel = build_forward(&spec, ForwardKernel::QkPrologue, &default_schedule(&spec, ForwardKernel::QkPrologue).unwrap()).unwrap();
    assert_eq!(kernel.ctas_per_sm, 2, "ZAYA1's prologue fits two CTAs per SM");
    kernel.ctas_per_sm = 3;
    let errors = errors(&kernel);
    assert!(
        errors.iter().any(|e| e.starts_with("kernel zaya1_qk_prologue: 3 resident CTAs per SM do not fit (256 threads and")),
        "{errors:?}"
    );
}
