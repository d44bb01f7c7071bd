//! Builders of the attention backward, in two forms.
//!
//! One pass (FlashAttention-3's structure, where the head width allows: [`ONE_PASS_MAX_HEAD_DIM`]):
//! - `attention_bwd_delta_clear`: D = rowsum(dO ∘ O) per query row and head, and the f32
//!   accumulators cleared (`dq_accum`; `dk_accum` and `dv_accum` where a group has several
//!   query heads);
//! - `attention_bwd_one_pass`: per key tile and query head, warp-specialized (TMA producer, wgmma
//!   consumers), over the query tiles that see the keys: dV = Pᵀ·dO, dK = scale·dSᵀ·Q summed in
//!   registers (stored, or with several query heads per group added into `dk_accum`/`dv_accum`
//!   by atomics), and dS·K added into `dq_accum` with atomics (in no fixed order: the last bits
//!   may differ from run to run);
//! - `attention_bwd_convert`: dQ = scale·dq_accum (and dK, dV from their accumulators) in the
//!   storage type.
//!
//! Two passes (FlashAttention-2's deterministic form, for the other shapes):
//! - `attention_bwd_delta`: D alone;
//! - `attention_bwd_dq`: per query tile, P and dS rebuilt from the saved lse and D over the key
//!   tiles it sees, dQ = scale·dS·K accumulated in registers;
//! - `attention_bwd_dkdv`: per key tile with K and V resident in shared memory, over the query
//!   tiles of every query head of its group in a fixed order, dV = Pᵀ·dO and dK = scale·dSᵀ·Q
//!   (summed over the group without atomics).
//!
//! dS and P enter the matrix multiplies in the storage type, as in the forward's P·V; dQ, dK and
//! dV are accumulated in f32 and stored in the storage type, the operand type of the GEMMs after
//! them. In the two-pass kernels, where the tiles allow (whole warpgroups along M), the shared
//! operands are swizzled and every GEMM is a wgmma, issued and waited for in place; otherwise
//! mma.sync.

use super::super::*;

/// Which attention backward kernel to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AttentionBackwardKernel {
    /// D, and the one-pass kernel's dQ accumulator cleared.
    DeltaClear,
    /// dK, dV, and dQ added into its f32 accumulator.
    OnePass,
    /// dQ from its accumulator (and dK, dV from theirs where the group is split).
    Convert,
    /// D alone (two passes).
    Delta,
    Dq,
    DkDv,
}

impl AttentionBackwardKernel {
    pub const ONE_PASS: [AttentionBackwardKernel; 3] =
        [AttentionBackwardKernel::DeltaClear, AttentionBackwardKernel::OnePass, AttentionBackwardKernel::Convert];
    pub const TWO_PASS: [AttentionBackwardKernel; 3] =
        [AttentionBackwardKernel::Delta, AttentionBackwardKernel::Dq, AttentionBackwardKernel::DkDv];

    /// The kernels the attention backward of `spec` launches, in order (D first: the others
    /// read it): one pass where its kernel takes the shape and the spec does not ask for a
    /// deterministic backward, else two.
    pub fn launched_by(spec: &AttentionSpec) -> [AttentionBackwardKernel; 3] {
        let one_pass = !spec.deterministic && default_attention_backward_schedule(spec, AttentionBackwardKernel::OnePass).is_ok();
        if one_pass { Self::ONE_PASS } else { Self::TWO_PASS }
    }

    /// Suffix of the kernel symbol `{spec.name}_{suffix}`.
    pub fn suffix(self) -> &'static str {
        match self {
            AttentionBackwardKernel::DeltaClear => "attention_bwd_delta_clear",
            AttentionBackwardKernel::OnePass => "attention_bwd_one_pass",
            AttentionBackwardKernel::Convert => "attention_bwd_convert",
            AttentionBackwardKernel::Delta => "attention_bwd_delta",
            AttentionBackwardKernel::Dq => "attention_bwd_dq",
            AttentionBackwardKernel::DkDv => "attention_bwd_dkdv",
        }
    }
}

/// The schedule an attention backward kernel gets unless told otherwise: 64-row tiles on 4
/// warps with a two-stage copy ring, smaller where those do not verify. `DkDv` steps over 32
/// query rows: its dK and dV accumulators take 128 registers a thread at head_dim 128, and
/// 64-query steps then spill.
pub fn default_attention_backward_schedule(
    spec: &AttentionSpec,
    which: AttentionBackwardKernel,
) -> Result<Schedule, String> {
    let d = spec.head_dim as u32;
    let query_step = |block: u32| match which {
        AttentionBackwardKernel::DkDv => block.min(32),
        _ => block,
    };
    let candidates: Vec<Schedule> = match which {
        // 128 keys on two consumer warpgroups, else 64 on one; two Q/dO stages.
        AttentionBackwardKernel::OnePass => [(128, 12), (64, 8)]
            .map(|(block_n, warps)| Schedule { block_m: ONE_PASS_ROWS, block_n, block_k: d, warps, stages: 2 })
            .to_vec(),
        _ => [(64, 4, 2), (64, 4, 1), (32, 2, 1), (16, 1, 1)]
            .map(|(block, warps, stages)| Schedule { block_m: query_step(block), block_n: block, block_k: d, warps, stages })
            .to_vec(),
    };
    first_that_builds(candidates, |schedule| build_attention_backward(spec, which, schedule))
        .map(|(schedule, _)| schedule)
        .map_err(|last_error| format!("no default {} schedule fits: {last_error}", which.suffix()))
}

/// Builds one attention backward kernel of `spec` with `schedule`, verified. For `Delta`,
/// `DeltaClear`, `Convert` and `Dq`, block_m query rows per CTA (block_n key rows per step of
/// `Dq`); for `DkDv` and `OnePass`, block_n key rows per CTA and block_m query rows per step.
/// block_k must be head_dim.
pub fn build_attention_backward(
    spec: &AttentionSpec,
    which: AttentionBackwardKernel,
    schedule: &Schedule,
) -> Result<KernelFn, String> {
    spec.validate()?;
    let s = schedule;
    if s.block_m == 0 || s.block_n == 0 || s.warps == 0 || s.stages == 0 {
        return Err(format!("schedule {s:?} has a zero size"));
    }
    if s.block_k != spec.head_dim as u32 {
        return Err(format!("attention backward reduces over whole heads: block_k must be head_dim {}", spec.head_dim));
    }
    let builder = AttentionBackward { spec, s, storage: spec.dtype.into(), d: spec.head_dim as u32 };
    let kernel = match which {
        AttentionBackwardKernel::DeltaClear => builder.delta(true)?,
        AttentionBackwardKernel::OnePass => builder.one_pass()?,
        AttentionBackwardKernel::Convert => builder.convert()?,
        AttentionBackwardKernel::Delta => builder.delta(false)?,
        AttentionBackwardKernel::Dq => builder.dq()?,
        AttentionBackwardKernel::DkDv => builder.dkdv()?,
    };
    verified(kernel, s)
}

struct AttentionBackward<'a> {
    spec: &'a AttentionSpec,
    s: &'a Schedule,
    storage: ElemType,
    d: u32,
}

impl AttentionBackward<'_> {
    fn bsd(&self, heads: usize) -> Vec<SizeExpr> {
        vec![SizeExpr::batch(), SizeExpr::seq_len(), size(heads), size(self.spec.head_dim)]
    }

    /// [B, Hq, S] f32: the lse the forward saved, and D.
    fn row_statistic(&self, name: &str, access: Access) -> KernelParam {
        tensor(name, ElemType::F32, vec![SizeExpr::batch(), size(self.spec.query_heads), SizeExpr::seq_len()], access)
    }

    /// Rows [row0, row0 + rows) of head `head` of a [B, S, heads, d] tensor.
    fn head_rows(&self, param: &str, row0: Expr, rows: u32, head: Expr) -> GlobalTile {
        GlobalTile {
            param: param.into(),
            dims: vec![GlobalDim::At(var("b")), span(row0, rows), GlobalDim::At(head), span(int(0), self.d)],
        }
    }

    /// Rows [row0, row0 + rows) of query head h of a [B, Hq, S] row statistic.
    fn statistic_rows(&self, param: &str, row0: Expr, rows: u32) -> GlobalTile {
        GlobalTile { param: param.into(), dims: vec![GlobalDim::At(var("b")), GlobalDim::At(var("h")), span(row0, rows)] }
    }

    /// Row statistic `param` of query `query` of head h, clamped into the sequence: rows past
    /// its end are masked or never stored, and must only read inside the tensor.
    fn statistic_at(&self, param: &str, query: Expr) -> Expr {
        Expr::global(param, vec![var("b"), var("h"), query.min(seq() - int(1))])
    }

    /// Whether key `key` is visible to query `query` and inside the sequence (queries past the
    /// end are excluded too: their rows of Q and dO are zeros, but their lse and D are not).
    fn visible(&self, query: Expr, key: Expr) -> Expr {
        let in_sequence = key.clone().lt(seq()).and(query.clone().lt(seq()));
        match mask_allows(self.spec.mask, query, key) {
            Some(allowed) => allowed.and(in_sequence),
            None => in_sequence,
        }
    }

    fn kernel(&self, which: AttentionBackwardKernel, params: Vec<KernelParam>, grid: [SizeExpr; 3], tiles: Tiles, body: Vec<Stmt>) -> KernelFn {
        tiled_kernel(format!("{}_{}", self.spec.name, which.suffix()), params, grid, self.s, tiles, body)
    }

    /// Whether the GEMMs of a kernel whose accumulators have `rows` rows and whose streamed
    /// operand tiles have `step_rows` rows run on wgmma ([`wgmma_fits`]); its shared operands
    /// are then swizzled (`operand`), else row-major for mma.sync.
    fn wgmma(&self, rows: u32, step_rows: u32) -> bool {
        wgmma_fits(self.storage, self.s.warps, rows, self.d, step_rows)
    }

    /// A shared operand tile of `rows` × head_dim: swizzled for wgmma, else row-major.
    fn operand(t: &mut Tiles, wgmma: bool, name: &str, elem: ElemType, rows: u32, d: u32) -> TileId {
        if wgmma { t.swizzled(name, elem, rows, d) } else { t.shared(name, elem, rows, d) }
    }

    /// One warp row-band per warp along `rows`: row statistics stay inside a warp.
    fn row_bands(&self, rows: u32, cols: u32) -> Result<(Layout, Layout, Layout), String> {
        let warps = self.s.warps;
        if !rows.is_multiple_of(16 * warps) || !cols.is_multiple_of(16) || !self.d.is_multiple_of(16) {
            return Err(format!(
                "attention backward tiles {rows}x{cols} (head_dim {}) do not split into 16-row bands over {warps} warps",
                self.d
            ));
        }
        Ok((
            Layout::MmaAccumulator { warps_m: warps, warps_n: 1 },
            Layout::MmaOperandA { warps_m: warps, warps_n: 1 },
            Layout::RowVector { warps_m: warps, warps_n: 1 },
        ))
    }

    /// D[b, h, t] = Σ_c dO[b, t, h, c]·O[b, t, h, c]; CTA = block_m query rows of head h. With
    /// `clear`, also zeros those rows of the one-pass kernels' f32 accumulators (dQ's, and dK's
    /// and dV's where the group is split).
    fn delta(&self, clear: bool) -> Result<KernelFn, String> {
        let (bm, d) = (self.s.block_m, self.d);
        let (acc, _, row_vec) = self.row_bands(bm, d)?;
        let mut t = Tiles { decls: Vec::new() };
        let o_s = t.shared("o_s", self.storage, bm, d);
        let do_s = t.shared("do_s", self.storage, bm, d);
        let product = t.regs("product", ElemType::F32, bm, d, acc);
        let delta = t.regs("delta", ElemType::F32, bm, 1, row_vec);
        let at = |tile: TileId| Expr::tile(tile, Expr::Row, Expr::Col);
        let mut body = vec![
            Stmt::Note(format!("CTA = {bm} query rows of head h, batch b: D = rowsum(dO ∘ O)")),
            let_("q_tile", Expr::BlockIdx(Axis::X)),
            let_("h", Expr::BlockIdx(Axis::Y)),
            let_("b", Expr::BlockIdx(Axis::Z)),
            let_("q_row0", var("q_tile") * int(bm)),
            Stmt::Copy { dst: t.whole(o_s), src: self.head_rows("o", var("q_row0"), bm, var("h")), is_async: true },
            Stmt::Copy { dst: t.whole(do_s), src: self.head_rows("do", var("q_row0"), bm, var("h")), is_async: true },
            Stmt::AsyncCommit,
            Stmt::AsyncWait { pending: 0 },
            Stmt::Barrier,
            Stmt::Map { dst: t.whole(product), expr: at(o_s) * at(do_s) },
            Stmt::RowReduce { dst: delta, src: t.whole(product), op: ReduceOp::Sum, value: Expr::Elem },
            Stmt::Store { src: t.whole(delta), dst: self.statistic_rows("delta", var("q_row0"), bm) },
        ];
        let hq = self.spec.query_heads;
        let mut params = vec![
            tensor("o", self.storage, self.bsd(hq), Access::Read),
            tensor("do", self.storage, self.bsd(hq), Access::Read),
            self.row_statistic("delta", Access::Write),
        ];
        let grid = [SizeExpr::seq_len().ceil_div(bm as u64), size(hq), SizeExpr::batch()];
        if !clear {
            return Ok(self.kernel(AttentionBackwardKernel::Delta, params, grid, t, body));
        }
        body.extend([
            Stmt::Fill { dst: t.whole(product), value: 0.0 },
            Stmt::Store { src: t.whole(product), dst: self.head_rows("dq_accum", var("q_row0"), bm, var("h")) },
        ]);
        params.push(tensor("dq_accum", ElemType::F32, self.bsd(hq), Access::Write));
        if self.splits_group() {
            // The CTAs of the first Hk query heads clear the kv heads' rows.
            let clear = ["dk_accum", "dv_accum"]
                .map(|param| Stmt::Store { src: t.whole(product), dst: self.head_rows(param, var("q_row0"), bm, var("h")) })
                .to_vec();
            body.push(Stmt::If { cond: var("h").lt(int(self.spec.kv_heads)), then_body: clear, else_body: Vec::new() });
            params.extend(self.key_gradient_params(Access::Write));
        }
        Ok(self.kernel(AttentionBackwardKernel::DeltaClear, params, grid, t, body))
    }

    /// dQ[b, t, h, :] = scale·dq_accum[b, t, h, :] in the storage type, and where the group is
    /// split dK = dk_accum (scaled as it was added) and dV = dv_accum too (by a group's first and
    /// second query head);
    /// CTA = block_m query rows of head h.
    fn convert(&self) -> Result<KernelFn, String> {
        let (bm, d) = (self.s.block_m, self.d);
        let (acc, _, _) = self.row_bands(bm, d)?;
        let mut t = Tiles { decls: Vec::new() };
        let accumulated = t.shared("accumulated", ElemType::F32, bm, d);
        let values = t.regs("values", ElemType::F32, bm, d, acc);
        let scale = self.spec.softmax_scale;
        let convert = |from: &str, to: &str, head: Expr, factor: f64| {
            vec![
                Stmt::Copy { dst: t.whole(accumulated), src: self.head_rows(from, var("q_row0"), bm, head.clone()), is_async: true },
                Stmt::AsyncCommit,
                Stmt::AsyncWait { pending: 0 },
                Stmt::Barrier,
                Stmt::Map { dst: t.whole(values), expr: Expr::tile(accumulated, Expr::Row, Expr::Col) * Expr::Float(factor) },
                Stmt::Store { src: t.whole(values), dst: self.head_rows(to, var("q_row0"), bm, head) },
            ]
        };
        let mut body = vec![
            Stmt::Note(format!("CTA = {bm} query rows of head h, batch b: dQ = scale · dq_accum")),
            let_("q_row0", Expr::BlockIdx(Axis::X) * int(bm)),
            let_("h", Expr::BlockIdx(Axis::Y)),
            let_("b", Expr::BlockIdx(Axis::Z)),
        ];
        body.extend(convert("dq_accum", "dq", var("h"), scale));
        let (hq, hk) = (self.spec.query_heads, self.spec.kv_heads);
        let mut params = vec![tensor("dq_accum", ElemType::F32, self.bsd(hq), Access::Read)];
        params.extend(self.key_gradient_params(Access::Read));
        params.push(tensor("dq", self.storage, self.bsd(hq), Access::Write));
        if self.splits_group() {
            // A group's first query head converts dK of its kv head, the second dV: no CTA does
            // more than two conversions. The barrier: every thread has read the staged dQ rows
            // before the next copy overwrites them.
            let group = self.spec.groups();
            body.push(Stmt::Note("dK = dk_accum (scaled as it was added) by a group's first head, dV = dv_accum by its second".into()));
            for (index, from, to) in [(0, "dk_accum", "dk"), (1, "dv_accum", "dv")] {
                let mut then_body = vec![Stmt::Barrier];
                then_body.extend(convert(from, to, var("h").floor_div(int(group)), 1.0));
                body.push(Stmt::If { cond: var("h").modulo(int(group)).eq(int(index)), then_body, else_body: Vec::new() });
            }
            params.extend([tensor("dk", self.storage, self.bsd(hk), Access::Write), tensor("dv", self.storage, self.bsd(hk), Access::Write)]);
        }
        let grid = [SizeExpr::seq_len().ceil_div(bm as u64), size(hq), SizeExpr::batch()];
        Ok(self.kernel(AttentionBackwardKernel::Convert, params, grid, t, body))
    }

    /// dQ = scale·dS·K for block_m query rows of head h over the key tiles they see, with
    /// P = exp(scale·Q·Kᵀ − lse) and dS = P ∘ (dO·Vᵀ − D).
    fn dq(&self) -> Result<KernelFn, String> {
        let (spec, s, d) = (self.spec, self.s, self.d);
        let (bm, bn) = (s.block_m, s.block_n);
        let (acc, operand, row_vec) = self.row_bands(bm, bn)?;
        let mut t = Tiles { decls: Vec::new() };
        let wgmma = self.wgmma(bm, bn);
        let q_s = Self::operand(&mut t, wgmma, "q_s", self.storage, bm, d);
        let do_s = Self::operand(&mut t, wgmma, "do_s", self.storage, bm, d);
        let k_s = Self::operand(&mut t, wgmma, "k_s", self.storage, s.stages * bn, d);
        let v_s = Self::operand(&mut t, wgmma, "v_s", self.storage, s.stages * bn, d);
        let probs = t.regs("probs", ElemType::F32, bm, bn, acc);
        let dscores = t.regs("dscores", ElemType::F32, bm, bn, acc);
        let dscores_a = t.regs("dscores_a", self.storage, bm, bn, operand);
        let dq = t.regs("dq", ElemType::F32, bm, d, acc);
        let lse = t.regs("lse", ElemType::F32, bm, 1, row_vec);
        let delta = t.regs("delta", ElemType::F32, bm, 1, row_vec);
        let at_row = |tile: TileId| Expr::tile(tile, Expr::Row, int(0));
        let scale = Expr::Float(spec.softmax_scale);
        let query = var("q_row0") + Expr::Row;
        let key = var("k_col0") + Expr::Col;
        let slot_view = |tile: TileId, slot: Expr| t.view(tile, times(slot, bn), int(0), bn, d);
        let load = |step: Expr, slot: Expr| {
            let key0 = times(var("kv_first") + step, bn);
            [("k", k_s), ("v", v_s)]
                .map(|(param, dst)| Stmt::Copy {
                    dst: slot_view(dst, slot.clone()),
                    src: self.head_rows(param, key0.clone(), bn, var("kv_head")),
                    is_async: true,
                })
                .to_vec()
        };
        let compute = |step: Expr, slot: Expr| {
            vec![
                let_("k_col0", (var("kv_first") + step) * int(bn)),
                Stmt::Fill { dst: t.whole(probs), value: 0.0 },
                Stmt::Mma { acc: t.whole(probs), a: t.whole(q_s), b: slot_view(k_s, slot.clone()), a_transposed: false, b_transposed: true },
                Stmt::Map {
                    dst: t.whole(probs),
                    expr: Expr::select(
                        self.visible(query.clone(), key.clone()),
                        (Expr::Elem * scale.clone() - at_row(lse)).exp(),
                        Expr::Float(0.0),
                    ),
                },
                Stmt::Fill { dst: t.whole(dscores), value: 0.0 },
                Stmt::Mma { acc: t.whole(dscores), a: t.whole(do_s), b: slot_view(v_s, slot.clone()), a_transposed: false, b_transposed: true },
                Stmt::Map {
                    dst: t.whole(dscores),
                    expr: Expr::tile(probs, Expr::Row, Expr::Col) * (Expr::Elem - at_row(delta)),
                },
                Stmt::Convert { dst: t.whole(dscores_a), src: t.whole(dscores) },
                Stmt::Mma { acc: t.whole(dq), a: t.whole(dscores_a), b: slot_view(k_s, slot), a_transposed: false, b_transposed: false },
            ]
        };
        let (kv_first, kv_end) = key_tiles_seen(spec.mask, bm, bn);
        let mut body = vec![
            Stmt::Note(format!("CTA = {bm} query rows of head h, batch b; key tiles of {bn}")),
            let_("q_tile", Expr::BlockIdx(Axis::X)),
            let_("h", Expr::BlockIdx(Axis::Y)),
            let_("b", Expr::BlockIdx(Axis::Z)),
            let_("kv_head", var("h").floor_div(int(spec.groups()))),
            let_("q_row0", var("q_tile") * int(bm)),
            Stmt::Copy { dst: t.whole(q_s), src: self.head_rows("q", var("q_row0"), bm, var("h")), is_async: true },
            Stmt::Copy { dst: t.whole(do_s), src: self.head_rows("do", var("q_row0"), bm, var("h")), is_async: true },
            Stmt::AsyncCommit,
            Stmt::AsyncWait { pending: 0 },
            Stmt::Barrier,
            Stmt::Map { dst: t.whole(lse), expr: self.statistic_at("lse", query.clone()) },
            Stmt::Map { dst: t.whole(delta), expr: self.statistic_at("delta", query.clone()) },
            Stmt::Fill { dst: t.whole(dq), value: 0.0 },
            let_("kv_first", kv_first),
            let_("kv_count", kv_end - var("kv_first")),
        ];
        body.extend(pipelined_loop("kv_step", var("kv_count"), s.stages, &load, &compute));
        body.extend([
            Stmt::Map { dst: t.whole(dq), expr: Expr::Elem * scale },
            Stmt::Store { src: t.whole(dq), dst: self.head_rows("dq", var("q_row0"), bm, var("h")) },
        ]);
        let (hq, hk) = (spec.query_heads, spec.kv_heads);
        let params = vec![
            tensor("q", self.storage, self.bsd(hq), Access::Read),
            tensor("k", self.storage, self.bsd(hk), Access::Read),
            tensor("v", self.storage, self.bsd(hk), Access::Read),
            tensor("do", self.storage, self.bsd(hq), Access::Read),
            self.row_statistic("lse", Access::Read),
            self.row_statistic("delta", Access::Read),
            tensor("dq", self.storage, self.bsd(hq), Access::Write),
        ];
        let grid = [SizeExpr::seq_len().ceil_div(bm as u64), size(hq), SizeExpr::batch()];
        Ok(self.kernel(AttentionBackwardKernel::Dq, params, grid, t, body))
    }

    /// dV = Pᵀ·dO and dK = scale·dSᵀ·Q for block_n key rows of kv head j, over the query tiles
    /// that see them of each of its G query heads in turn (Pᵀ and dSᵀ computed key-major:
    /// Sᵀ = K·Qᵀ, dPᵀ = V·dOᵀ).
    fn dkdv(&self) -> Result<KernelFn, String> {
        let (spec, s, d) = (self.spec, self.s, self.d);
        let (bm, bn) = (s.block_m, s.block_n);
        let (acc, operand, _) = self.row_bands(bn, bm)?;
        let mut t = Tiles { decls: Vec::new() };
        let wgmma = self.wgmma(bn, bm);
        let k_s = Self::operand(&mut t, wgmma, "k_s", self.storage, bn, d);
        let v_s = Self::operand(&mut t, wgmma, "v_s", self.storage, bn, d);
        let q_s = Self::operand(&mut t, wgmma, "q_s", self.storage, s.stages * bm, d);
        let do_s = Self::operand(&mut t, wgmma, "do_s", self.storage, s.stages * bm, d);
        let probs_t = t.regs("probs_t", ElemType::F32, bn, bm, acc);
        let probs_a = t.regs("probs_a", self.storage, bn, bm, operand);
        let dscores_t = t.regs("dscores_t", ElemType::F32, bn, bm, acc);
        let dscores_a = t.regs("dscores_a", self.storage, bn, bm, operand);
        let dk = t.regs("dk", ElemType::F32, bn, d, acc);
        let dv = t.regs("dv", ElemType::F32, bn, d, acc);
        let scale = Expr::Float(spec.softmax_scale);
        let key = var("k_row0") + Expr::Row;
        let query = var("q_col0") + Expr::Col;
        let slot_view = |tile: TileId, slot: Expr| t.view(tile, times(slot, bm), int(0), bm, d);
        let load = |step: Expr, slot: Expr| {
            let query0 = times(var("q_first") + step, bm);
            [("q", q_s), ("do", do_s)]
                .map(|(param, dst)| Stmt::Copy {
                    dst: slot_view(dst, slot.clone()),
                    src: self.head_rows(param, query0.clone(), bm, var("h")),
                    is_async: true,
                })
                .to_vec()
        };
        let compute = |step: Expr, slot: Expr| {
            vec![
                let_("q_col0", (var("q_first") + step) * int(bm)),
                Stmt::Fill { dst: t.whole(probs_t), value: 0.0 },
                Stmt::Mma { acc: t.whole(probs_t), a: t.whole(k_s), b: slot_view(q_s, slot.clone()), a_transposed: false, b_transposed: true },
                Stmt::Map {
                    dst: t.whole(probs_t),
                    expr: Expr::select(
                        self.visible(query.clone(), key.clone()),
                        (Expr::Elem * scale.clone() - self.statistic_at("lse", query.clone())).exp(),
                        Expr::Float(0.0),
                    ),
                },
                Stmt::Convert { dst: t.whole(probs_a), src: t.whole(probs_t) },
                Stmt::Mma { acc: t.whole(dv), a: t.whole(probs_a), b: slot_view(do_s, slot.clone()), a_transposed: false, b_transposed: false },
                Stmt::Fill { dst: t.whole(dscores_t), value: 0.0 },
                Stmt::Mma { acc: t.whole(dscores_t), a: t.whole(v_s), b: slot_view(do_s, slot.clone()), a_transposed: false, b_transposed: true },
                Stmt::Map {
                    dst: t.whole(dscores_t),
                    expr: Expr::tile(probs_t, Expr::Row, Expr::Col)
                        * (Expr::Elem - self.statistic_at("delta", query.clone())),
                },
                Stmt::Convert { dst: t.whole(dscores_a), src: t.whole(dscores_t) },
                Stmt::Mma { acc: t.whole(dk), a: t.whole(dscores_a), b: slot_view(q_s, slot), a_transposed: false, b_transposed: false },
            ]
        };
        let (q_first, q_end) = query_tiles_seeing(spec.mask, bm, bn);
        let mut per_head = vec![
            let_("h", var("kv_head") * int(spec.groups()) + var("g")),
            let_("q_first", q_first),
            let_("q_count", q_end - var("q_first")),
        ];
        per_head.extend(pipelined_loop("q_step", var("q_count"), s.stages, &load, &compute));
        let mut body = vec![
            Stmt::Note(format!(
                "CTA = {bn} key rows of kv head kv_head, batch b; query tiles of {bm} of each query head of the group"
            )),
            let_("k_tile", Expr::BlockIdx(Axis::X)),
            let_("kv_head", Expr::BlockIdx(Axis::Y)),
            let_("b", Expr::BlockIdx(Axis::Z)),
            let_("k_row0", var("k_tile") * int(bn)),
            Stmt::Copy { dst: t.whole(k_s), src: self.head_rows("k", var("k_row0"), bn, var("kv_head")), is_async: true },
            Stmt::Copy { dst: t.whole(v_s), src: self.head_rows("v", var("k_row0"), bn, var("kv_head")), is_async: true },
            Stmt::AsyncCommit,
            Stmt::AsyncWait { pending: 0 },
            Stmt::Barrier,
            Stmt::Fill { dst: t.whole(dk), value: 0.0 },
            Stmt::Fill { dst: t.whole(dv), value: 0.0 },
            for_("g", int(0), int(spec.groups()), per_head),
            Stmt::Map { dst: t.whole(dk), expr: Expr::Elem * scale },
            Stmt::Store { src: t.whole(dk), dst: self.head_rows("dk", var("k_row0"), bn, var("kv_head")) },
            Stmt::Store { src: t.whole(dv), dst: self.head_rows("dv", var("k_row0"), bn, var("kv_head")) },
        ];
        body.insert(0, Stmt::Note("dK and dV summed over the group's query heads in order: no atomics".into()));
        let (hq, hk) = (spec.query_heads, spec.kv_heads);
        let params = vec![
            tensor("q", self.storage, self.bsd(hq), Access::Read),
            tensor("k", self.storage, self.bsd(hk), Access::Read),
            tensor("v", self.storage, self.bsd(hk), Access::Read),
            tensor("do", self.storage, self.bsd(hq), Access::Read),
            self.row_statistic("lse", Access::Read),
            self.row_statistic("delta", Access::Read),
            tensor("dk", self.storage, self.bsd(hk), Access::Write),
            tensor("dv", self.storage, self.bsd(hk), Access::Write),
        ];
        let grid = [SizeExpr::seq_len().ceil_div(bn as u64), size(hk), SizeExpr::batch()];
        Ok(self.kernel(AttentionBackwardKernel::DkDv, params, grid, t, body))
    }
}

/// [first, end) of the key tiles of `bn` that some query of the tile at `q_row0` (`bm` rows)
/// sees, as expressions of `q_row0` and S.
fn key_tiles_seen(mask: Mask, bm: u32, bn: u32) -> (Expr, Expr) {
    let all = seq().ceil_div(int(bn));
    let through_diagonal = all.clone().min((var("q_row0") + int(bm)).ceil_div(int(bn)));
    match mask {
        Mask::None => (int(0), all),
        Mask::Causal => (int(0), through_diagonal),
        Mask::SlidingWindow { window } => {
            ((var("q_row0") - int(window - 1)).max(int(0)).floor_div(int(bn)), through_diagonal)
        }
    }
}

/// [first, end) of the query tiles of `bm` with some query that sees a key of the tile at
/// `k_row0` (`bn` rows), as expressions of `k_row0` and S.
fn query_tiles_seeing(mask: Mask, bm: u32, bn: u32) -> (Expr, Expr) {
    let all = seq().ceil_div(int(bm));
    match mask {
        Mask::None => (int(0), all),
        Mask::Causal => (var("k_row0").floor_div(int(bm)), all),
        // The last query that sees the tile's last key is k_row0 + bn − 1 + window − 1.
        Mask::SlidingWindow { window } => (
            var("k_row0").floor_div(int(bm)),
            all.min((var("k_row0") + int(bn as usize + window - 1)).ceil_div(int(bm))),
        ),
    }
}

/// [first, end) of the one-pass kernel's steps (query tiles of `bm` from `q_first`) whose queries
/// all see every key of the consumer's `rows` from `key0`, as expressions of those and S; `None`
/// where the mask makes it 0 (first) or `steps` (end) for every consumer.
fn unmasked_steps(mask: Mask, bm: u32, rows: u32) -> (Option<Expr>, Option<Expr>) {
    // Causal: the step's first query is at or past the band's last key.
    let past_diagonal = || Some((var("key0") + int(rows - 1)).ceil_div(int(bm)) - var("q_first"));
    match mask {
        // Only keys past the sequence's end are hidden: a band that holds none sees every step.
        Mask::None => (None, Some(Expr::select((var("key0") + int(rows)).le(seq()), var("steps"), int(0)))),
        Mask::Causal => (past_diagonal(), None),
        // ... and its last query within the window of the band's first key: q_row0 + bm − 1 <
        // key0 + window.
        Mask::SlidingWindow { window } => (
            past_diagonal(),
            Some((var("key0") + int(window) - int(bm)).floor_div(int(bm)) + int(1) - var("q_first")),
        ),
    }
}

/// Rows one consumer warpgroup owns in the one-pass kernel: its keys (the M of Sᵀ, dPᵀ, dV,
/// dK), and the query step (the M of dQ).
const ONE_PASS_ROWS: u32 = 64;
/// Registers per thread of the one-pass kernel's producer (coordinates only, in uniform
/// registers) and consumers (dK and dV of 64 keys at head_dim 128 take 128 alone; with less
/// than 240 ptxas spills): 24 + 2 · 240 = 3 · 168.
const ONE_PASS_PRODUCER_REGISTERS: u32 = 24;
const ONE_PASS_CONSUMER_REGISTERS: u32 = 240;
/// The widest head the one-pass kernel takes: its dK and dV accumulators grow with head_dim.
const ONE_PASS_MAX_HEAD_DIM: u32 = 128;

impl AttentionBackward<'_> {
    /// Whether the one-pass kernels give each query head of a group its own CTAs (groups of
    /// more than one): their dK and dV then meet in f32 accumulators by atomics, which the
    /// pre-pass clears and the convert kernel turns into dK and dV.
    fn splits_group(&self) -> bool {
        self.spec.groups() > 1
    }

    /// The one-pass form's key-side gradient parameters, accessed as `access`: dK and dV, or
    /// their f32 accumulators where the group is split.
    fn key_gradient_params(&self, access: Access) -> Vec<KernelParam> {
        let hk = self.spec.kv_heads;
        if self.splits_group() {
            vec![tensor("dk_accum", ElemType::F32, self.bsd(hk), access), tensor("dv_accum", ElemType::F32, self.bsd(hk), access)]
        } else if access == Access::Write {
            vec![tensor("dk", self.storage, self.bsd(hk), access), tensor("dv", self.storage, self.bsd(hk), access)]
        } else {
            Vec::new()
        }
    }

    /// The one-pass kernel (FlashAttention-3's structure): CTA = block_n keys of kv head
    /// `kv_head` for query head h (so that a group's heads fill the GPU at short lengths), one
    /// consumer warpgroup per 64 keys, K and V resident in shared memory; a producer
    /// warpgroup's elected thread brings Q and dO of each query step (block_m rows) into a ring
    /// of `stages` swizzled slots by TMA.
    /// Per step each consumer computes Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for its keys (staging the
    /// next step's lse and D meanwhile), Pᵀ and dSᵀ = Pᵀ ∘ (dPᵀ − D), and writes dSᵀ (rounded
    /// to the storage type) into its band of a swizzled tile; once every band is there (named
    /// barrier 1), consumer c issues the first of its 64-column panels c, c + consumers, … of
    /// dQ = dS·K over all block_n keys (dSᵀ read transposed), then dV += Pᵀ·dO and
    /// dK += dSᵀ·Q (its band as A), and adds each dQ panel into the f32 `dq_accum` with
    /// atomics as soon as it is done. dS alternates between two tiles: a consumer writes one
    /// while the other may still read the other's. At the end dK and dV are stored, or, where the
    /// group has several query heads, added into their f32 accumulators.
    fn one_pass(&self) -> Result<KernelFn, String> {
        let (spec, s, d) = (self.spec, self.s, self.d);
        let (bm, bn, stages) = (s.block_m, s.block_n, s.stages);
        let panel = layout::panel_cols(self.storage);
        if !self.storage.is_mma_operand() {
            return Err("the one-pass attention backward takes bf16 or f16".into());
        }
        if !d.is_multiple_of(panel) || d > ONE_PASS_MAX_HEAD_DIM {
            return Err(format!(
                "the one-pass attention backward takes head_dim in whole {panel}-column panels up to {ONE_PASS_MAX_HEAD_DIM}, not {d}"
            ));
        }
        if bm != ONE_PASS_ROWS {
            return Err(format!("the one-pass attention backward steps over {ONE_PASS_ROWS} queries (block_m), not {bm}"));
        }
        if bn == 0 || !bn.is_multiple_of(ONE_PASS_ROWS) || bn > 2 * ONE_PASS_ROWS {
            return Err(format!("block_n must be 64 or 128 keys (64 per consumer warpgroup), not {bn}"));
        }
        if stages < 2 {
            return Err(format!("{stages} Q/dO stages: the producer loads one step ahead, so at least 2"));
        }
        let consumers = bn / ONE_PASS_ROWS;
        let warps = (consumers + 1) * WARPGROUP_THREADS / 32;
        if s.warps != warps {
            return Err(format!("block_n {bn} takes {consumers} consumer warpgroups and a producer: {warps} warps, not {}", s.warps));
        }
        let elem_bytes = self.storage.size_bytes() as u32;
        let split_group = self.splits_group();
        let mut t = Tiles { decls: Vec::new() };
        let k_s = t.swizzled("k_s", self.storage, bn, d);
        let v_s = t.swizzled("v_s", self.storage, bn, d);
        let q_s = t.swizzled("q_s", self.storage, stages * bm, d);
        let do_s = t.swizzled("do_s", self.storage, stages * bm, d);
        let ds_s = t.swizzled("ds_s", self.storage, 2 * bn, bm);
        let acc = Layout::MmaAccumulator { warps_m: 4, warps_n: 1 };
        let operand = Layout::MmaOperandA { warps_m: 4, warps_n: 1 };
        let rows = ONE_PASS_ROWS;
        let probs_t = t.regs("probs_t", ElemType::F32, rows, bm, acc);
        let dscores_t = t.regs("dscores_t", ElemType::F32, rows, bm, acc);
        let probs_a = t.regs("probs_a", self.storage, rows, bm, operand);
        let dk = t.regs("dk", ElemType::F32, rows, d, acc);
        let dv = t.regs("dv", ElemType::F32, rows, d, acc);
        let dq = t.regs("dq", ElemType::F32, bm, panel, acc);
        // Each consumer's copy of the step's lse and D (two steps' worth: it writes one while
        // its threads may still read the other), read by column in the maps: loads from global
        // memory per element would each need a 64-bit address.
        let mut row_statistics = |name: &str| -> Vec<TileId> {
            (0..bn / ONE_PASS_ROWS)
                .map(|c| t.add(&format!("{name}_s{c}"), TileType { elem: ElemType::F32, rows: 2 * bm, cols: 1, layout: Layout::RowMajor { pad: 0 } }))
                .collect()
        };
        let (lse_s, delta_s) = (row_statistics("lse"), row_statistics("delta"));
        let barriers = vec![
            BarrierDecl { name: "kv_full".into(), slots: 1, arrivals: 1 },
            BarrierDecl { name: "full".into(), slots: stages, arrivals: 1 },
            BarrierDecl { name: "empty".into(), slots: stages, arrivals: consumers * WARPGROUP_THREADS },
        ];
        let (kv_full, full, empty) = (BarrierId(0), BarrierId(1), BarrierId(2));
        let slot = |ring: BarrierId, step: Expr| BarrierRef { ring, slot: step.modulo(int(stages)) };
        // Step n is use n / stages of its slot: its phase has that parity.
        let parity = |step: Expr| step.floor_div(int(stages)).modulo(int(2));
        let stage_view = |ring: TileId, step: Expr| t.view(ring, times(step.modulo(int(stages)), bm), int(0), bm, d);
        let w = |id: TileId| t.whole(id);
        let (hq, hk, group) = (spec.query_heads, spec.kv_heads, spec.groups());
        let scale = Expr::Float(spec.softmax_scale);

        let (q_first, q_end) = query_tiles_seeing(spec.mask, bm, bn);
        let mut body = vec![
            Stmt::Note(format!(
                "CTA = {bn} keys of kv head kv_head for query head h, batch b: {consumers} consumer warpgroup(s) of 64 keys, one TMA producer; query head h; query steps of {bm} through {stages} stages"
            )),
            let_("k_tiles", seq().ceil_div(int(bn))),
            Stmt::Note(
                "key tiles in order across query heads: the causal mask gives the first the most query steps, and the heads of one key tile share its K and V in L2".into(),
            ),
            let_("ordinal", Expr::BlockIdx(Axis::X) + var("k_tiles") * Expr::BlockIdx(Axis::Y)),
            let_("h", var("ordinal").modulo(int(hq))),
            let_("kv_head", var("h").floor_div(int(group))),
            let_("k_row0", var("ordinal").floor_div(int(hq)) * int(bn)),
            let_("b", Expr::BlockIdx(Axis::Z)),
            let_("q_first", q_first),
            let_("steps", q_end - var("q_first")),
        ];
        // Step n: query tile q_first + n.
        let step_lets = |prefix: &str| vec![let_(&format!("{prefix}q_row0"), (var("q_first") + var("n")) * int(bm))];

        let mut producer_step = vec![Stmt::If {
            cond: int(stages).le(var("n")),
            then_body: vec![Stmt::WaitParity { barrier: slot(empty, var("n") - int(stages)), parity: parity(var("n") - int(stages)) }],
            else_body: Vec::new(),
        }];
        producer_step.extend(step_lets("p_"));
        producer_step.push(Stmt::ArriveExpectTx { barrier: slot(full, var("n")), bytes: int(2 * bm * d * elem_bytes) });
        // Coordinates innermost first: q as [B, S, Hq, d] (column, head, row, batch); dO as the
        // [B, S, Hq·d] that o_proj's input gradient writes (column, row, batch).
        for (tensor, ring, coords) in [
            ("q", q_s, vec![int(0), var("h"), var("p_q_row0"), var("b")]),
            ("do", do_s, vec![var("h") * int(d), var("p_q_row0"), var("b")]),
        ] {
            producer_step.push(Stmt::TmaLoad { dst: stage_view(ring, var("n")), map: tensor_map_param(tensor), coords, barrier: slot(full, var("n")) });
        }
        let kv_barrier = BarrierRef { ring: kv_full, slot: int(0) };
        let mut producer = vec![Stmt::ArriveExpectTx { barrier: kv_barrier.clone(), bytes: int(2 * bn * d * elem_bytes) }];
        for (tensor, tile) in [("k", k_s), ("v", v_s)] {
            producer.push(Stmt::TmaLoad {
                dst: w(tile),
                map: tensor_map_param(tensor),
                coords: vec![int(0), var("kv_head"), var("k_row0"), var("b")],
                barrier: kv_barrier.clone(),
            });
        }
        producer.push(for_("n", int(0), var("steps"), producer_step));

        let consumer = |c: u32| -> Vec<Stmt> {
            let band = |tile: TileId| t.view(tile, int(c * rows), int(0), rows, d);
            let key = var("key0") + Expr::Row;
            let query = var("q_row0") + Expr::Col;
            let ds_buffer = var("n").modulo(int(2)) * int(bn);
            let statistic_buffer = var("n").modulo(int(2)) * int(bm);
            let statistic = |tile: TileId| Expr::tile(tile, statistic_buffer.clone() + Expr::Col, int(0));
            // Step n's lse and D went into buffer n % 2 during step n − 1 (the first step's before
            // the loop), loaded while that step's GEMMs ran; barrier 2 + c makes them visible and
            // keeps this step's loads into the other buffer after the last step's reads of it.
            let stage_statistics = |buffer: Expr, q_row0: Expr| -> Vec<Stmt> {
                [("lse", lse_s[c as usize]), ("delta", delta_s[c as usize])]
                    .into_iter()
                    .map(|(param, tile)| Stmt::Copy {
                        dst: t.view(tile, buffer.clone(), int(0), bm, 1),
                        src: self.statistic_rows(param, q_row0.clone(), bm),
                        is_async: false,
                    })
                    .collect()
            };
            // This consumer's dSᵀ rows: dK's A operand, and its band of dQ's.
            let ds_band = t.view(ds_s, ds_buffer.clone() + int(c * rows), int(0), rows, bm);
            // Only the mask: rows past the sequence's end come out zero without it (Q, dO, K
            // and V read zeros there, and so do the staged lse and D: P = 1, dP = 0, dS = 0;
            // a key past the end that the mask hides from every query in the sequence adds
            // nothing, and its dK and dV rows are never written).
            let probability = (Expr::Elem * scale.clone() - statistic(lse_s[c as usize])).exp();
            // Without a mask, keys past the end are masked too: dS there is −P·D, finite in
            // exact arithmetic, but it must not overflow into inf · 0 against K's zero rows.
            let masked = |p: Expr| {
                let allowed = mask_allows(self.spec.mask, query.clone(), key.clone()).unwrap_or_else(|| key.clone().lt(seq()));
                Expr::select(allowed, p, Expr::Float(0.0))
            };
            // dQ in 64-column panels; each step sends the first to the tensor cores before dV
            // and dK, so that its atomics issue while they run.
            let dq_panel = |p: u32| -> Vec<Stmt> {
                vec![
                    Stmt::Fill { dst: w(dq), value: 0.0 },
                    Stmt::MmaAsync {
                        acc: w(dq),
                        a: t.view(ds_s, ds_buffer.clone(), int(0), bn, bm),
                        b: t.view(k_s, int(0), int(p * panel), bn, panel),
                        a_transposed: true,
                        b_transposed: false,
                    },
                    Stmt::MmaCommit,
                ]
            };
            let dq_add = |p: u32| Stmt::AtomicAdd {
                src: w(dq),
                dst: GlobalTile {
                    param: "dq_accum".into(),
                    dims: vec![GlobalDim::At(var("b")), span(var("q_row0"), bm), GlobalDim::At(var("h")), span(int(p * panel), panel)],
                },
            };
            // Consumer c's panels of dQ: c, c + consumers, … (none for the second consumer at
            // head_dim 64).
            let panels: Vec<u32> = (c..d / panel).step_by(consumers as usize).collect();
            // A step whose queries see all of this consumer's keys skips the mask.
            let step = |mask: bool| -> Vec<Stmt> {
                let mut step = step_lets("");
                step.extend([
                    Stmt::NamedBarrier { id: int(2 + c), threads: WARPGROUP_THREADS, sync: true },
                    Stmt::WaitParity { barrier: slot(full, var("n")), parity: parity(var("n")) },
                    Stmt::Fill { dst: w(probs_t), value: 0.0 },
                    Stmt::Fill { dst: w(dscores_t), value: 0.0 },
                    Stmt::MmaAsync { acc: w(probs_t), a: band(k_s), b: stage_view(q_s, var("n")), a_transposed: false, b_transposed: true },
                    Stmt::MmaAsync { acc: w(dscores_t), a: band(v_s), b: stage_view(do_s, var("n")), a_transposed: false, b_transposed: true },
                    Stmt::MmaCommit,
                    Stmt::If {
                        cond: (var("n") + int(1)).lt(var("steps")),
                        then_body: stage_statistics((var("n") + int(1)).modulo(int(2)) * int(bm), var("q_row0") + int(bm)),
                        else_body: Vec::new(),
                    },
                    Stmt::MmaWait { pending: 0, after: None },
                    Stmt::Map { dst: w(probs_t), expr: if mask { masked(probability.clone()) } else { probability.clone() } },
                    Stmt::Map { dst: w(dscores_t), expr: Expr::tile(probs_t, Expr::Row, Expr::Col) * (Expr::Elem - statistic(delta_s[c as usize])) },
                    Stmt::Convert { dst: w(probs_a), src: w(probs_t) },
                    Stmt::Convert { dst: ds_band.clone(), src: w(dscores_t) },
                    // Every consumer's dS rows are in place (each warp wrote its own 16; wgmma reads
                    // all), with one consumer too.
                    Stmt::NamedBarrier { id: int(1), threads: consumers * WARPGROUP_THREADS, sync: true },
                ]);
                if let Some(&first) = panels.first() {
                    step.extend(dq_panel(first));
                }
                step.extend([
                    Stmt::MmaAsync { acc: w(dv), a: w(probs_a), b: stage_view(do_s, var("n")), a_transposed: false, b_transposed: false },
                    Stmt::MmaAsync { acc: w(dk), a: ds_band.clone(), b: stage_view(q_s, var("n")), a_transposed: false, b_transposed: false },
                    Stmt::MmaCommit,
                ]);
                if let Some(&first) = panels.first() {
                    step.extend([Stmt::MmaWait { pending: 1, after: None }, dq_add(first)]);
                }
                for &p in panels.iter().skip(1) {
                    step.extend(dq_panel(p));
                    step.extend([Stmt::MmaWait { pending: 0, after: None }, dq_add(p)]);
                }
                step.extend([Stmt::MmaWait { pending: 0, after: None }, Stmt::Arrive { barrier: slot(empty, var("n")) }]);
                step
            };
            let (unmasked_first, unmasked_end) = unmasked_steps(spec.mask, bm, rows);
            let mut steps = vec![
                Stmt::Note("steps whose queries all see this consumer's keys run without the mask".into()),
                let_("unmasked_first", unmasked_first.clone().unwrap_or_else(|| int(0)).max(int(0)).min(var("steps"))),
                let_("unmasked_end", unmasked_end.clone().unwrap_or_else(|| var("steps")).min(var("steps")).max(var("unmasked_first"))),
            ];
            if unmasked_first.is_some() {
                steps.push(for_("n", int(0), var("unmasked_first"), step(true)));
            }
            steps.push(for_("n", var("unmasked_first"), var("unmasked_end"), step(false)));
            if unmasked_end.is_some() {
                steps.push(for_("n", var("unmasked_end"), var("steps"), step(true)));
            }
            let out_rows = |param: &str| self.head_rows(param, var("key0"), rows, var("kv_head"));
            vec![
                let_("key0", var("k_row0") + int(c * rows)),
                Stmt::Fill { dst: w(dk), value: 0.0 },
                Stmt::Fill { dst: w(dv), value: 0.0 },
            ]
            .into_iter()
            .chain(stage_statistics(int(0), var("q_first") * int(bm)))
            .chain([
                Stmt::WaitParity { barrier: kv_barrier.clone(), parity: int(0) },
            ])
            .chain(steps)
            .chain([
                Stmt::Map { dst: w(dk), expr: Expr::Elem * scale.clone() },
                if split_group {
                    Stmt::AtomicAdd { src: w(dk), dst: out_rows("dk_accum") }
                } else {
                    Stmt::Store { src: w(dk), dst: out_rows("dk") }
                },
                if split_group {
                    Stmt::AtomicAdd { src: w(dv), dst: out_rows("dv_accum") }
                } else {
                    Stmt::Store { src: w(dv), dst: out_rows("dv") }
                },
            ])
            .collect()
        };
        let mut roles: Vec<Role> = (0..consumers)
            .map(|c| Role {
                name: format!("consumer{c}"),
                warpgroups: 1,
                index: "wg".into(),
                registers: ONE_PASS_CONSUMER_REGISTERS,
                body: consumer(c),
            })
            .collect();
        roles.push(Role {
            name: "producer".into(),
            warpgroups: 1,
            index: "wg".into(),
            registers: ONE_PASS_PRODUCER_REGISTERS,
            body: vec![Stmt::Elect { body: producer }],
        });
        body.push(Stmt::Roles(roles));

        let mut params = vec![
            tensor("q", self.storage, self.bsd(hq), Access::Read),
            tensor("k", self.storage, self.bsd(hk), Access::Read),
            tensor("v", self.storage, self.bsd(hk), Access::Read),
            tensor("do", self.storage, vec![SizeExpr::batch(), SizeExpr::seq_len(), size(hq * spec.head_dim)], Access::Read),
            self.row_statistic("lse", Access::Read),
            self.row_statistic("delta", Access::Read),
        ];
        params.extend(self.key_gradient_params(Access::Write));
        params.push(tensor("dq_accum", ElemType::F32, self.bsd(hq), Access::Write));
        params.extend(size_params());
        for (tensor, box_rows) in [("q", bm), ("k", bn), ("v", bn), ("do", bm)] {
            params.push(KernelParam::TensorMap { name: tensor_map_param(tensor), tensor: tensor.to_string(), box_rows });
        }
        Ok(KernelFn {
            name: format!("{}_{}", spec.name, AttentionBackwardKernel::OnePass.suffix()),
            params,
            grid: [SizeExpr::seq_len().ceil_div(bn as u64), size(hq), SizeExpr::batch()],
            warps,
            tiles: t.decls,
            barriers,
            schedule: *s,
            ctas_per_sm: 1,
            body,
        })
    }
}
