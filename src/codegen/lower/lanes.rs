//! Lane groups: an element-wise map lowered a group of adjacent columns of one row at a time
//! (a thread's 16-byte chunk of a shared row, or the column pair an accumulator fragment gives
//! each thread), so that a read whose column moves with the lane is one vector load for the
//! group instead of one 2-byte load per element.
//!
//! An index analysis ([`Lowering::lane_index`]) proves on the expression where a read's column
//! is lane 0's plus the lane, with lane 0's a multiple of the group's width: the column itself,
//! plus a base known to be such a multiple (let-bound variables carry what they are a multiple
//! of, e.g. `channel0 = head · 128`), or a `select` of two such runs on a condition that is the
//! same in every lane (RoPE's partner `col < r/2 ? col + r/2 : col − r/2`). Every other read
//! stays per element.

use inkwell::values::{FloatValue, IntValue, PointerValue};

use super::expr::{ElementSite, Value, binary, clamp, fused_multiply_add, multiply_add, select};
use super::{Lowering, TileStorage};
use crate::codegen::tile::SharedTile;
use crate::codegen::{CodegenError, Elem, KernelBuilder, Result, unsupported};
use crate::ir::kernel::{BinOp, Expr, KernelParam, Layout, TileId};
use crate::ir::size::SizeExpr;

/// What an integer expression does across the lanes of a group of `width` columns whose first
/// column is a multiple of `width`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum LaneIndex {
    /// The same in every lane, and a multiple of `multiple_of` (0: it is 0).
    Uniform { multiple_of: u64 },
    /// Lane j's value is lane 0's plus j, and lane 0's is a multiple of the width.
    Run,
    /// Anything else.
    Scattered,
}

/// A group of adjacent elements of one row that a thread maps together: lane j's element is
/// `sites[j]`, its column lane 0's plus j, lane 0's a multiple of the group's width.
pub(super) struct LaneGroup<'ctx> {
    pub(super) sites: Vec<ElementSite<'ctx>>,
}

impl LaneGroup<'_> {
    fn width(&self) -> u32 {
        self.sites.len() as u32
    }
}

/// An expression's values in the lanes of a group.
pub(super) enum Lanes<'ctx> {
    Uniform(Value<'ctx>),
    Each(Vec<Value<'ctx>>),
}

impl<'ctx> Lanes<'ctx> {
    fn lane(&self, lane: usize) -> Value<'ctx> {
        match self {
            Lanes::Uniform(value) => *value,
            Lanes::Each(values) => values[lane],
        }
    }

    pub(super) fn floats(&self, width: u32) -> Result<Vec<FloatValue<'ctx>>> {
        (0..width as usize).map(|lane| self.lane(lane).float()).collect()
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl<'k, 'ctx> Lowering<'k, 'ctx> {
    /// What the integer `expr` is known to be a multiple of (0: it is 0); 1 when nothing is known.
    pub(super) fn multiple_of(&self, expr: &Expr) -> u64 {
        match expr {
            Expr::Int(value) => value.unsigned_abs(),
            Expr::Var(name) => self.scope.iter().rev().find(|binding| binding.name == *name).map_or(1, |binding| binding.multiple_of),
            Expr::Binary(BinOp::Mul, a, b) => self.multiple_of(a).checked_mul(self.multiple_of(b)).unwrap_or(1),
            Expr::Binary(BinOp::Add | BinOp::Sub | BinOp::Min | BinOp::Max, a, b) | Expr::Select(_, a, b) => {
                gcd(self.multiple_of(a), self.multiple_of(b))
            }
            _ => 1,
        }
    }

    /// Whether `expr` may differ between the lanes of a group (they share the row).
    fn varies(&self, expr: &Expr) -> bool {
        match expr {
            Expr::Col | Expr::Elem => true,
            Expr::Tile { tile, row, col } => {
                matches!(self.tiles[tile.0], TileStorage::Accumulator(_)) || self.varies(row) || self.varies(col)
            }
            Expr::Global { index, .. } => index.iter().any(|index| self.varies(index)),
            Expr::Unary(_, a) => self.varies(a),
            Expr::Binary(_, a, b) => self.varies(a) || self.varies(b),
            Expr::Select(cond, a, b) => self.varies(cond) || self.varies(a) || self.varies(b),
            _ => false,
        }
    }

    pub(super) fn lane_index(&self, expr: &Expr, width: u32) -> LaneIndex {
        if !self.varies(expr) {
            return LaneIndex::Uniform { multiple_of: self.multiple_of(expr) };
        }
        let aligned = |index: LaneIndex| matches!(index, LaneIndex::Uniform { multiple_of } if multiple_of % u64::from(width) == 0);
        let index = |e: &Expr| self.lane_index(e, width);
        match expr {
            Expr::Col => LaneIndex::Run,
            Expr::Binary(BinOp::Add, a, b) => match (index(a), index(b)) {
                (LaneIndex::Run, other) | (other, LaneIndex::Run) if aligned(other) => LaneIndex::Run,
                _ => LaneIndex::Scattered,
            },
            Expr::Binary(BinOp::Sub, a, b) if index(a) == LaneIndex::Run && aligned(index(b)) => LaneIndex::Run,
            Expr::Select(cond, a, b)
                if self.lane_uniform_condition(cond, width) && index(a) == LaneIndex::Run && index(b) == LaneIndex::Run =>
            {
                LaneIndex::Run
            }
            _ => LaneIndex::Scattered,
        }
    }

    /// Whether the condition `cond` is the same in every lane of a group.
    pub(super) fn lane_uniform_condition(&self, cond: &Expr, width: u32) -> bool {
        if !self.varies(cond) {
            return true;
        }
        match cond {
            // run₀ + j < u for every j < width exactly when run₀ < u, both being multiples of
            // the width.
            Expr::Binary(BinOp::Lt, a, b) => {
                self.lane_index(a, width) == LaneIndex::Run
                    && matches!(self.lane_index(b, width), LaneIndex::Uniform { multiple_of } if multiple_of % u64::from(width) == 0)
            }
            Expr::Binary(BinOp::And, a, b) => self.lane_uniform_condition(a, width) && self.lane_uniform_condition(b, width),
            _ => false,
        }
    }

    /// `expr` in every lane of `group`: what does not vary is evaluated once, reads of runs are
    /// one vector load, the rest per lane (as [`Lowering::eval_guarded`] would).
    pub(super) fn eval_lanes(
        &self,
        kb: &KernelBuilder<'_, 'ctx>,
        expr: &Expr,
        group: &LaneGroup<'ctx>,
        in_select_arm: bool,
    ) -> Result<Lanes<'ctx>> {
        if !self.varies(expr) {
            return Ok(Lanes::Uniform(self.eval_guarded(kb, expr, &group.sites[0], in_select_arm)?));
        }
        let width = group.width() as usize;
        let lanes = |e: &Expr| self.eval_lanes(kb, e, group, in_select_arm);
        let floats = |values: Vec<FloatValue<'ctx>>| Lanes::Each(values.into_iter().map(Value::Float).collect());
        let read = match expr {
            Expr::Tile { tile, row, col } => self.tile_run(kb, *tile, row, col, group, in_select_arm)?,
            Expr::Global { param, index } => self.global_run(kb, param, index, group, in_select_arm)?,
            _ => None,
        };
        if let Some(values) = read {
            return Ok(floats(values));
        }
        Ok(match expr {
            Expr::Unary(op, a) => {
                let a = lanes(a)?;
                Lanes::Each((0..width).map(|lane| self.unary(kb, *op, a.lane(lane))).collect::<Result<_>>()?)
            }
            Expr::Binary(op, a, b) if *op != BinOp::Pow => match fused_multiply_add(*op, a, b) {
                Some((x, y, c, negate_c)) => {
                    let (x, y, c) = (lanes(x)?, lanes(y)?, lanes(c)?);
                    Lanes::Each(
                        (0..width)
                            .map(|lane| multiply_add(kb, *op, x.lane(lane), y.lane(lane), c.lane(lane), negate_c))
                            .collect::<Result<_>>()?,
                    )
                }
                None => {
                    let (a, b) = (lanes(a)?, lanes(b)?);
                    Lanes::Each((0..width).map(|lane| binary(kb, *op, a.lane(lane), b.lane(lane))).collect::<Result<_>>()?)
                }
            },
            Expr::Select(cond, then, otherwise) => {
                let cond = lanes(cond)?;
                let a = self.eval_lanes(kb, then, group, true)?;
                let b = self.eval_lanes(kb, otherwise, group, true)?;
                Lanes::Each(
                    (0..width).map(|lane| select(kb, cond.lane(lane).bool()?, a.lane(lane), b.lane(lane))).collect::<Result<_>>()?,
                )
            }
            _ => Lanes::Each(
                group.sites.iter().map(|site| self.eval_guarded(kb, expr, site, in_select_arm)).collect::<Result<_>>()?,
            ),
        })
    }

    /// A read of a shared tile whose row is the same in every lane and whose column is a run:
    /// one vector load for the group. None where the read is not such a run.
    fn tile_run(
        &self,
        kb: &KernelBuilder<'_, 'ctx>,
        tile: TileId,
        row: &Expr,
        col: &Expr,
        group: &LaneGroup<'ctx>,
        in_select_arm: bool,
    ) -> Result<Option<Vec<FloatValue<'ctx>>>> {
        let width = group.width();
        let decl = self.kernel.tile(tile);
        let (TileStorage::Shared { offset }, Layout::RowMajor { pad }) = (&self.tiles[tile.0], decl.ty.layout) else {
            return Ok(None);
        };
        let elem = Elem::from(decl.ty.elem);
        let pitch = decl.ty.cols + pad;
        let runs_fit = decl.ty.cols >= width && decl.ty.cols.is_multiple_of(width) && pitch.is_multiple_of(width);
        if !runs_fit || !run_bytes_loadable(elem, width) || self.varies(row) || self.lane_index(col, width) != LaneIndex::Run {
            return Ok(None);
        }
        let site = &group.sites[0];
        let mut r = self.eval_guarded(kb, row, site, in_select_arm)?.int()?;
        let mut c = self.eval_guarded(kb, col, site, in_select_arm)?.int()?;
        if in_select_arm {
            // Into 0 ..= cols − width, which keeps a multiple of the width one.
            r = clamp(kb, r, kb.i32(i64::from(decl.ty.rows)))?;
            c = clamp(kb, c, kb.i32(i64::from(decl.ty.cols - width + 1)))?;
        }
        let index = kb.add(kb.mul(r, kb.i32(i64::from(pitch)))?, c)?;
        let base = self.shared_tile_base(kb, *offset)?;
        Ok(Some(load_run(kb, kb.element_pointer(base, elem, index)?, elem, width)?))
    }

    /// A read of a global tensor whose outer indices are the same in every lane and whose
    /// innermost index is a run: one vector load for the group (tensors start on 16-byte
    /// boundaries, the runtime's promise, and a constant innermost extent that is a multiple of
    /// the width keeps every row so). None where the read is not such a run.
    fn global_run(
        &self,
        kb: &KernelBuilder<'_, 'ctx>,
        param: &str,
        index: &[Expr],
        group: &LaneGroup<'ctx>,
        in_select_arm: bool,
    ) -> Result<Option<Vec<FloatValue<'ctx>>>> {
        let width = group.width();
        let Some(KernelParam::Tensor { elem, shape, .. }) = self.kernel.param(param) else {
            return Ok(None);
        };
        let elem = Elem::from(*elem);
        let rows_aligned = matches!(shape.last(), Some(SizeExpr::Const(extent)) if extent.is_multiple_of(u64::from(width)));
        let Some((last, outer)) = index.split_last() else {
            return Ok(None);
        };
        if elem == Elem::I32
            || !rows_aligned
            || !run_bytes_loadable(elem, width)
            || outer.iter().any(|index| self.varies(index))
            || self.lane_index(last, width) != LaneIndex::Run
        {
            return Ok(None);
        }
        let tensor = self.tensor(kb, param)?;
        let site = &group.sites[0];
        let mut indices = Vec::with_capacity(index.len());
        for (position, (index, extent)) in index.iter().zip(tensor.extents()).enumerate() {
            let mut value = self.eval_guarded(kb, index, site, in_select_arm)?.int()?;
            if in_select_arm {
                let extent = if position + 1 == tensor.extents().len() { kb.sub(*extent, kb.i32(i64::from(width) - 1))? } else { *extent };
                value = clamp(kb, value, extent)?;
            }
            indices.push(value);
        }
        Ok(Some(load_run(kb, tensor.element(kb, &indices)?, elem, width)?))
    }

    /// `Map` over a shared window a 16-byte chunk of a row per thread and round: the chunk's old
    /// elements are one vector load, its new ones one vector store. None where the window's
    /// chunks do not start on 16-byte boundaries.
    pub(super) fn map_shared_runs(
        &self,
        kb: &KernelBuilder<'_, 'ctx>,
        window: &SharedTile<'ctx>,
        col0: &Expr,
        expr: &Expr,
    ) -> Result<Option<()>> {
        let width = 16 / window.elem.bytes();
        let aligned = window.cols.is_multiple_of(width)
            && window.row_pitch().is_multiple_of(width)
            && self.multiple_of(col0).is_multiple_of(u64::from(width));
        if !aligned || window.elem == Elem::I32 {
            return Ok(None);
        }
        let pitch = kb.i32(i64::from(window.row_pitch()));
        // Vector loads are not removed when unused (see `load_words`): the old chunk is loaded
        // only where the expression reads it.
        let mut reads_old = false;
        expr.visit(&mut |e| reads_old |= *e == Expr::Elem);
        self.for_each_window_run(kb, window.rows, window.cols, width, |kb, row, col| {
            let pointer = kb.element_pointer(window.base, window.elem, kb.add(kb.mul(row, pitch)?, col)?)?;
            let old = if reads_old { load_run(kb, pointer, window.elem, width)? } else { vec![kb.f32(0.0); width as usize] };
            let mut sites = Vec::with_capacity(width as usize);
            for (lane, value) in old.into_iter().enumerate() {
                sites.push(ElementSite::Shared { row, col: kb.add(col, kb.i32(lane as i64))?, value });
            }
            let new = self.eval_lanes(kb, expr, &LaneGroup { sites }, false)?.floats(width)?;
            store_run(kb, pointer, window.elem, &new)
        })?;
        Ok(Some(()))
    }

    /// Runs `each(kb, row, col)` for every run of `width` columns (`col` its first) of a
    /// `rows × cols` window, spread over the block's threads, adjacent threads on adjacent runs.
    /// Where the threads cover whole rows, a thread keeps its column in every round, so that
    /// what the map reads per column (a convolution's weights) is loaded once.
    fn for_each_window_run(
        &self,
        kb: &KernelBuilder<'_, 'ctx>,
        rows: u32,
        cols: u32,
        width: u32,
        each: impl Fn(&KernelBuilder<'_, 'ctx>, IntValue<'ctx>, IntValue<'ctx>) -> Result<()>,
    ) -> Result<()> {
        let per_row = cols / width;
        let threads = kb.collective_threads(self.kernel.threads());
        let thread = kb.thread_index()?;
        let per_row_value = kb.i32(i64::from(per_row));
        if threads.is_multiple_of(per_row) {
            let rows_per_round = threads / per_row;
            let col = kb.mul(kb.rem(thread, per_row_value)?, kb.i32(i64::from(width)))?;
            let first_row = kb.div(thread, per_row_value)?;
            let rounds = rows.div_ceil(rows_per_round);
            let partial = !rows.is_multiple_of(rows_per_round);
            return kb.for_range_rolled(kb.i32(0), kb.i32(i64::from(rounds)), |kb, round| {
                let row = kb.add(first_row, kb.mul(round, kb.i32(i64::from(rows_per_round)))?)?;
                if partial { kb.if_then(kb.lt(row, kb.i32(i64::from(rows)))?, |kb| each(kb, row, col)) } else { each(kb, row, col) }
            });
        }
        let runs = rows * per_row;
        let rounds = runs.div_ceil(threads);
        kb.for_range_rolled(kb.i32(0), kb.i32(i64::from(rounds)), |kb, round| {
            let run = kb.add(kb.mul(round, kb.i32(i64::from(threads)))?, thread)?;
            let visit = |kb: &KernelBuilder<'_, 'ctx>| {
                let row = kb.div(run, per_row_value)?;
                each(kb, row, kb.mul(kb.rem(run, per_row_value)?, kb.i32(i64::from(width)))?)
            };
            if runs.is_multiple_of(threads) { visit(kb) } else { kb.if_then(kb.lt(run, kb.i32(i64::from(runs)))?, visit) }
        })
    }
}

/// Whether a run of `width` elements is whole 32-bit words (what [`load_run`] loads).
fn run_bytes_loadable(elem: Elem, width: u32) -> bool {
    elem != Elem::I32 && (width * elem.bytes()).is_multiple_of(4)
}

/// `width` elements from `pointer` (aligned to their size, or to 16 bytes when larger) widened
/// to f32: 16-byte loads, or one narrower load.
fn load_run<'ctx>(kb: &KernelBuilder<'_, 'ctx>, pointer: PointerValue<'ctx>, elem: Elem, width: u32) -> Result<Vec<FloatValue<'ctx>>> {
    let bytes = width * elem.bytes();
    let mut values = Vec::with_capacity(width as usize);
    for first in (0..bytes).step_by(16) {
        let words = (bytes - first).min(16) / 4;
        let at = kb.byte_pointer(pointer, kb.i32(i64::from(first)))?;
        for word in kb.load_words(at, words)? {
            values.extend(unpack_word(kb, elem, word)?);
        }
    }
    Ok(values)
}

/// The elements of one 32-bit word, first element in the low bits, as f32.
fn unpack_word<'ctx>(kb: &KernelBuilder<'_, 'ctx>, elem: Elem, word: IntValue<'ctx>) -> Result<Vec<FloatValue<'ctx>>> {
    let builder = kb.builder();
    let f32_type = kb.context().f32_type();
    Ok(match elem {
        Elem::F32 => vec![builder.build_bit_cast(word, f32_type, "")?.into_float_value()],
        // A bf16 is the high half of the f32 with its bits: a shift and a mask widen a pair.
        Elem::Bf16 => {
            let low = builder.build_left_shift(word, kb.i32(16), "")?;
            let high = builder.build_and(word, kb.i32(0xffff_0000u32 as i32 as i64), "")?;
            vec![builder.build_bit_cast(low, f32_type, "")?.into_float_value(), builder.build_bit_cast(high, f32_type, "")?.into_float_value()]
        }
        Elem::F16 => {
            let i16_type = kb.context().i16_type();
            let low = builder.build_int_truncate(word, i16_type, "")?;
            let high = builder.build_int_truncate(builder.build_right_shift(word, kb.i32(16), false, "")?, i16_type, "")?;
            vec![kb.widen_half(elem, low)?, kb.widen_half(elem, high)?]
        }
        Elem::I32 => return Err(CodegenError::Unsupported("an i32 tensor is not widened to f32".into())),
    })
}

/// Rounds `values` to `elem` and stores them from `pointer` as [`load_run`] loads them.
fn store_run<'ctx>(kb: &KernelBuilder<'_, 'ctx>, pointer: PointerValue<'ctx>, elem: Elem, values: &[FloatValue<'ctx>]) -> Result<()> {
    let words = match elem {
        Elem::F32 => {
            let i32_type = kb.context().i32_type();
            values.iter().map(|value| Ok(kb.builder().build_bit_cast(*value, i32_type, "")?.into_int_value())).collect::<Result<Vec<_>>>()?
        }
        Elem::Bf16 | Elem::F16 => values.chunks(2).map(|pair| kb.pack_half2(elem, pair[0], pair[1])).collect::<Result<Vec<_>>>()?,
        Elem::I32 => return unsupported("an i32 tile is not mapped"),
    };
    for (index, piece) in words.chunks(4).enumerate() {
        kb.store_words(kb.byte_pointer(pointer, kb.i32(16 * index as i64))?, piece)?;
    }
    Ok(())
}
