//! Global tensors and boxes (addresses, bounds, `valid` ranges), copies into shared tiles,
//! per-thread loops over shared windows, and stores of register tiles.

use inkwell::IntPredicate;
use inkwell::values::{FloatValue, IntValue, PointerValue};

use super::super::tile::{ElementPair, for_each_accumulator_pair};
use super::expr::ElementSite;
use super::{Lowering, TileStorage};
use crate::codegen::{CodegenError, Elem, KernelBuilder, Result, unsupported};
use crate::ir::kernel::{Expr, GlobalDim, GlobalTile, KernelParam, Layout, TileView};
use crate::ir::size::SizeExpr;

/// Elements of a shared window one thread loads per loop iteration before storing them (the
/// loads in flight at once), see `for_each_window_element`. Copies are small per element and
/// wait on L2: many at once. A map evaluates its expression per
/// element, mostly on shared memory and L1: a few at once, to keep code size (and compile
/// time) down.
const COPY_BATCH: u32 = 16;
const MAP_BATCH: u32 = 4;
/// 32-bit words one thread loads per loop iteration of a copy of interleaved taps (see
/// `copy_tap_chunks`) before storing them: 16 loads of 16 bytes in flight; ZAYA1's per-head
/// weight copies (8 chunks of 2 taps per thread) run unlooped.
const TAP_COPY_WORDS: u32 = 64;
/// Widest innermost dimension whose entries `copy_tap_chunks` picks from whole chunks: a wider
/// one loads more than 4 times the bytes it stores.
const MAX_INTERLEAVED_TAPS: u64 = 4;

/// A shared window as `Copy` fills it: its shape and element type, and where element (row, col)
/// of it lives (row-major with padding, or swizzled).
struct CopyWindow<'a, 'ctx> {
    rows: u32,
    cols: u32,
    elem: Elem,
    /// Whether every row starts on a 16-byte boundary (cp.async chunks).
    rows_16_byte_aligned: bool,
    #[allow(clippy::type_complexity)]
    address: Box<dyn Fn(&KernelBuilder<'_, 'ctx>, IntValue<'ctx>, IntValue<'ctx>) -> Result<PointerValue<'ctx>> + 'a>,
}

/// One element of an element-wise copy between its load and its store.
enum CopiedElement<'ctx> {
    /// Same 16-bit type on both sides: the bits.
    Bits(IntValue<'ctx>),
    Float(FloatValue<'ctx>),
}

/// Rounds an f32 to `elem` (round to nearest even) and stores it.
fn store_from_f32<'ctx>(kb: &KernelBuilder<'_, 'ctx>, pointer: PointerValue<'ctx>, elem: Elem, value: FloatValue<'ctx>) -> Result<()> {
    match elem {
        Elem::F32 => kb.store_f32(pointer, value),
        half => kb.store_int(pointer, kb.round_half(half, value)?),
    }
}

/// A tensor parameter for this call: base pointer, extents (i32) and row-major strides (i64).
pub(super) struct Tensor<'ctx> {
    pub(super) base: PointerValue<'ctx>,
    pub(super) elem: Elem,
    extents: Vec<IntValue<'ctx>>,
    strides: Vec<IntValue<'ctx>>,
    /// Innermost extent when it is a compile-time constant.
    innermost_constant: Option<u64>,
}

impl<'ctx> Tensor<'ctx> {
    /// Extents (i32), outermost first.
    pub(super) fn extents(&self) -> &[IntValue<'ctx>] {
        &self.extents
    }

    /// Address of the element at a full multi-index (i32 each, offset computed in i64).
    pub(super) fn element(&self, kb: &KernelBuilder<'_, 'ctx>, index: &[IntValue<'ctx>]) -> Result<PointerValue<'ctx>> {
        if index.len() != self.strides.len() {
            return unsupported(format!("{} indices into a tensor of rank {}", index.len(), self.strides.len()));
        }
        let builder = kb.builder();
        let mut offset = kb.context().i64_type().const_zero();
        for (i, stride) in index.iter().zip(&self.strides) {
            let wide = builder.build_int_s_extend(*i, kb.context().i64_type(), "")?;
            offset = builder.build_int_add(offset, builder.build_int_mul(wide, *stride, "")?, "")?;
        }
        kb.element_pointer(self.base, self.elem, offset)
    }
}

/// One span of a global box: element `i` of the axis is tensor index `start + i`.
struct BoxAxis<'ctx> {
    start: IntValue<'ctx>,
    extent: IntValue<'ctx>,
    stride: IntValue<'ctx>,
    valid: Option<(IntValue<'ctx>, IntValue<'ctx>)>,
    /// The tensor's innermost dimension (stride 1).
    innermost: bool,
    /// The start when it is a compile-time constant.
    constant_start: Option<i64>,
    /// The start as written, for alignment proofs.
    start_expr: Expr,
    /// The tensor dimension the span runs along.
    dim: usize,
    /// Every index of the span is known at compile time to be inside the tensor (a constant
    /// start, a constant extent, no valid range): no checks are emitted.
    always_inside: bool,
}

impl<'ctx> BoxAxis<'ctx> {
    /// Whether tensor index `start + offset` is inside the tensor and the valid range (i1).
    fn inside(&self, kb: &KernelBuilder<'_, 'ctx>, offset: IntValue<'ctx>) -> Result<IntValue<'ctx>> {
        if self.always_inside {
            return Ok(kb.context().bool_type().const_all_ones());
        }
        let index = kb.add(self.start, offset)?;
        let mut inside = kb.and(kb.le(kb.i32(0), index)?, kb.lt(index, self.extent)?)?;
        if let Some((low, high)) = self.valid {
            inside = kb.and(inside, kb.and(kb.le(low, index)?, kb.lt(index, high)?)?)?;
        }
        Ok(inside)
    }

    fn offset(&self, kb: &KernelBuilder<'_, 'ctx>, offset: IntValue<'ctx>) -> Result<IntValue<'ctx>> {
        let index = kb.builder().build_int_s_extend(kb.add(self.start, offset)?, kb.context().i64_type(), "")?;
        Ok(kb.builder().build_int_mul(index, self.stride, "")?)
    }
}

/// A box of a global tensor seen as a rows × cols tile (a missing column span is one column).
pub(super) struct GlobalBox<'ctx> {
    tensor: Tensor<'ctx>,
    /// Offset (i64 elements) of the fixed (`At`) indices.
    fixed: IntValue<'ctx>,
    rows: BoxAxis<'ctx>,
    cols: Option<BoxAxis<'ctx>>,
    pub(super) shape: (u32, u32),
    /// A fixed index into the innermost dimension (see [`InterleavedTaps`]).
    taps: Option<InterleavedTaps<'ctx>>,
}

/// A box whose innermost tensor dimension is a fixed index (`At`) of a dimension with a
/// compile-time extent (`[out, in, tap]` conv weights copied one tap at a time): along the
/// dimension before it the box reads every `count`-th element of contiguous memory.
struct InterleavedTaps<'ctx> {
    /// The fixed innermost index (i32) and its value when it is a constant.
    index: IntValue<'ctx>,
    constant: Option<i64>,
    /// Extent of the innermost dimension.
    count: u64,
    /// Offset (i64 elements) of the fixed indices other than the innermost one.
    outer_fixed: IntValue<'ctx>,
    /// Extent of the dimension before the innermost one, when a compile-time constant.
    inner_extent: Option<u64>,
}

impl<'ctx> GlobalBox<'ctx> {
    /// Whether box element (row, col) exists and may be read or written (i1).
    fn inside(&self, kb: &KernelBuilder<'_, 'ctx>, row: IntValue<'ctx>, col: IntValue<'ctx>) -> Result<IntValue<'ctx>> {
        let row_inside = self.rows.inside(kb, row)?;
        match &self.cols {
            Some(cols) => kb.and(row_inside, cols.inside(kb, col)?),
            None => Ok(row_inside),
        }
    }

    fn pointer(&self, kb: &KernelBuilder<'_, 'ctx>, row: IntValue<'ctx>, col: IntValue<'ctx>) -> Result<PointerValue<'ctx>> {
        let builder = kb.builder();
        let mut offset = builder.build_int_add(self.fixed, self.rows.offset(kb, row)?, "")?;
        if let Some(cols) = &self.cols {
            offset = builder.build_int_add(offset, cols.offset(kb, col)?, "")?;
        }
        kb.element_pointer(self.tensor.base, self.tensor.elem, offset)
    }

    /// Address of box element (row, col + extra): from (row, col)'s by a constant where the
    /// column stride is a constant (LLVM would otherwise keep each column's offset in
    /// registers), else computed whole.
    fn pointer_right_of(&self, kb: &KernelBuilder<'_, 'ctx>, row: IntValue<'ctx>, col: IntValue<'ctx>, extra: u32) -> Result<PointerValue<'ctx>> {
        let stride = self.cols.as_ref().and_then(|cols| cols.stride.get_sign_extended_constant());
        match stride {
            Some(stride) => {
                let bytes = i64::from(extra) * stride * self.tensor.elem.bytes() as i64;
                kb.byte_pointer(self.pointer(kb, row, col)?, kb.context().i64_type().const_int(bytes as u64, true))
            }
            None => self.pointer(kb, row, kb.add(col, kb.i32(i64::from(extra)))?),
        }
    }

    /// Address of box element (row, col) at innermost index 0 instead of the box's fixed one:
    /// the start of the run of interleaved taps that holds it.
    fn tap_run_pointer(&self, kb: &KernelBuilder<'_, 'ctx>, taps: &InterleavedTaps<'ctx>, cols: &BoxAxis<'ctx>, row: IntValue<'ctx>, col: IntValue<'ctx>) -> Result<PointerValue<'ctx>> {
        let builder = kb.builder();
        let offset = builder.build_int_add(taps.outer_fixed, self.rows.offset(kb, row)?, "")?;
        let offset = builder.build_int_add(offset, cols.offset(kb, col)?, "")?;
        kb.element_pointer(self.tensor.base, self.tensor.elem, offset)
    }

    /// Elements along the columns that are consecutive in memory and start at a multiple of
    /// `elems` (as far as can be proven here; runtime starts are the verifier's promise).
    fn columns_contiguous_in(&self, elems: u64) -> bool {
        match &self.cols {
            Some(cols) => {
                cols.innermost
                    && self.tensor.innermost_constant.is_some_and(|extent| extent.is_multiple_of(elems))
                    && cols.constant_start.is_none_or(|start| start.rem_euclid(elems as i64) == 0)
            }
            None => false,
        }
    }
}

impl<'k, 'ctx> Lowering<'k, 'ctx> {
    fn size_value(&self, kb: &KernelBuilder<'_, 'ctx>, size: &SizeExpr) -> Result<IntValue<'ctx>> {
        Ok(match size {
            SizeExpr::Const(value) => {
                let value = i32::try_from(*value)
                    .map_err(|_| CodegenError::Unsupported(format!("size {value} does not fit in i32")))?;
                kb.i32(value as i64)
            }
            SizeExpr::Var(var) => kb.size_param(var.symbol())?,
            SizeExpr::Add(a, b) => kb.add(self.size_value(kb, a)?, self.size_value(kb, b)?)?,
            SizeExpr::Mul(a, b) => kb.mul(self.size_value(kb, a)?, self.size_value(kb, b)?)?,
            SizeExpr::CeilDiv(a, divisor) => {
                let divisor = u32::try_from(*divisor)
                    .map_err(|_| CodegenError::Unsupported(format!("divisor {divisor} does not fit in i32")))?;
                kb.ceil_div(self.size_value(kb, a)?, divisor)?
            }
        })
    }

    pub(super) fn tensor(&self, kb: &KernelBuilder<'_, 'ctx>, param: &str) -> Result<Tensor<'ctx>> {
        let Some(KernelParam::Tensor { elem, shape, .. }) = self.kernel.param(param) else {
            return unsupported(format!("`{param}` is not a tensor parameter of `{}`", self.kernel.name));
        };
        let extents = shape.iter().map(|size| self.size_value(kb, size)).collect::<Result<Vec<_>>>()?;
        let i64_type = kb.context().i64_type();
        let mut strides = vec![i64_type.const_int(1, false); extents.len()];
        for dim in (0..extents.len().saturating_sub(1)).rev() {
            let inner = kb.builder().build_int_z_extend(extents[dim + 1], i64_type, "")?;
            strides[dim] = kb.builder().build_int_mul(strides[dim + 1], inner, "")?;
        }
        let innermost_constant = match shape.last() {
            Some(SizeExpr::Const(value)) => Some(*value),
            _ => None,
        };
        Ok(Tensor { base: kb.pointer_param(param)?, elem: Elem::from(*elem), extents, strides, innermost_constant })
    }

    fn global_box(&self, kb: &KernelBuilder<'_, 'ctx>, tile: &GlobalTile) -> Result<GlobalBox<'ctx>> {
        let tensor = self.tensor(kb, &tile.param)?;
        if tile.dims.len() != tensor.extents.len() {
            return unsupported(format!("box of rank {} in tensor `{}` of rank {}", tile.dims.len(), tile.param, tensor.extents.len()));
        }
        let constant_extent = |param: &str, dim: usize| match self.kernel.param(param) {
            Some(KernelParam::Tensor { shape, .. }) => match shape.get(dim) {
                Some(SizeExpr::Const(extent)) => Some(*extent),
                _ => None,
            },
            _ => None,
        };
        let shape = tile
            .box_shape()
            .ok_or_else(|| CodegenError::Unsupported(format!("box of `{}` without one or two spans", tile.param)))?;
        let builder = kb.builder();
        let mut fixed = kb.context().i64_type().const_zero();
        let mut axes = Vec::with_capacity(2);
        let mut taps = None;
        let last = tile.dims.len() - 1;
        for (dim, global_dim) in tile.dims.iter().enumerate() {
            match global_dim {
                GlobalDim::At(index_expr) => {
                    let index = self.eval(kb, index_expr, &ElementSite::None)?.int()?;
                    if dim == last
                        && last > 0
                        && let Some(count) = constant_extent(&tile.param, dim)
                    {
                        taps = Some(InterleavedTaps {
                            index,
                            constant: match index_expr {
                                Expr::Int(value) => Some(*value),
                                _ => None,
                            },
                            count,
                            outer_fixed: fixed,
                            inner_extent: constant_extent(&tile.param, dim - 1),
                        });
                    }
                    let wide = builder.build_int_s_extend(index, kb.context().i64_type(), "")?;
                    fixed = builder.build_int_add(fixed, builder.build_int_mul(wide, tensor.strides[dim], "")?, "")?;
                }
                GlobalDim::Span { start, len, valid } => {
                    let valid = match valid {
                        Some((low, high)) => Some((
                            self.eval(kb, low, &ElementSite::None)?.int()?,
                            self.eval(kb, high, &ElementSite::None)?.int()?,
                        )),
                        None => None,
                    };
                    let constant_start = match start {
                        Expr::Int(value) => Some(*value),
                        _ => None,
                    };
                    let always_inside = match (constant_start, valid, constant_extent(&tile.param, dim)) {
                        (Some(first), None, Some(extent)) => first >= 0 && first + *len as i64 <= extent as i64,
                        _ => false,
                    };
                    axes.push(BoxAxis {
                        start: self.eval(kb, start, &ElementSite::None)?.int()?,
                        extent: tensor.extents[dim],
                        stride: tensor.strides[dim],
                        valid,
                        innermost: dim == last,
                        constant_start,
                        start_expr: start.clone(),
                        dim,
                        always_inside,
                    });
                }
            }
        }
        let mut axes = axes.into_iter();
        let rows = axes.next().ok_or_else(|| CodegenError::Unsupported(format!("box of `{}` without a span", tile.param)))?;
        Ok(GlobalBox { tensor, fixed, rows, cols: axes.next(), shape, taps })
    }

    /// Runs `load(kb, row, col)` then `store(kb, loaded)` for every element of a `rows × cols`
    /// window, spread over the block's threads (element `i · threads + thread` in round `i`),
    /// `batch` rounds per loop iteration: all loads of an iteration are issued before
    /// its first store, so their latencies overlap. (One load and store per iteration waited a
    /// full L2 round trip per element: the per-head conv weights, then copied element by
    /// element, were most of the CCA prologue's time; they now take `copy_tap_chunks`.) The loop
    /// stays rolled: fully unrolled, all rounds' values would be live at once next to the
    /// accumulators (the strided conv-weight copies spilled that way).
    fn for_each_window_element<T>(
        &self,
        kb: &KernelBuilder<'_, 'ctx>,
        rows: u32,
        cols: u32,
        batch: u32,
        mut load: impl FnMut(&KernelBuilder<'_, 'ctx>, IntValue<'ctx>, IntValue<'ctx>) -> Result<T>,
        mut store: impl FnMut(&KernelBuilder<'_, 'ctx>, T) -> Result<()>,
    ) -> Result<()> {
        let threads = kb.collective_threads(self.kernel.threads());
        let count = rows * cols;
        let rounds = count.div_ceil(threads);
        let batch = rounds.min(batch);
        let batches = rounds.div_ceil(batch);
        // Every (round, thread) of every batch is an element unless a round or batch is partial.
        let exact = count.is_multiple_of(threads) && rounds.is_multiple_of(batch);
        let thread = kb.thread_index()?;
        kb.for_range_rolled(kb.i32(0), kb.i32(batches as i64), |kb, batch_index| {
            let mut pending = Vec::with_capacity(batch as usize);
            for step in 0..batch {
                let round = kb.add(kb.mul(batch_index, kb.i32(batch as i64))?, kb.i32(step as i64))?;
                let index = kb.add(kb.mul(round, kb.i32(threads as i64))?, thread)?;
                let exists = if exact { None } else { Some(kb.lt(index, kb.i32(count as i64))?) };
                // A missing element loads as element (0, 0) and is not stored.
                let index = match exists {
                    Some(exists) => kb.select_int(exists, index, kb.i32(0))?,
                    None => index,
                };
                let row = kb.div(index, kb.i32(cols as i64))?;
                let col = kb.rem(index, kb.i32(cols as i64))?;
                pending.push((exists, load(kb, row, col)?));
            }
            for (exists, loaded) in pending {
                match exists {
                    Some(exists) => kb.if_then(exists, |kb| store(kb, loaded))?,
                    None => store(kb, loaded)?,
                }
            }
            Ok(())
        })
    }

    /// Runs `each(kb, row, col, last_col)` for every 16-byte chunk (`chunk_elems` elements of a
    /// row) of a `rows × cols` window, spread over the block's threads (chunk `i · threads +
    /// thread` in round `i`, so adjacent threads take adjacent chunks); a partial last round is
    /// guarded.
    fn for_each_window_chunk(
        &self,
        kb: &KernelBuilder<'_, 'ctx>,
        rows: u32,
        cols: u32,
        chunk_elems: u32,
        each: impl Fn(&KernelBuilder<'_, 'ctx>, IntValue<'ctx>, IntValue<'ctx>, IntValue<'ctx>) -> Result<()>,
    ) -> Result<()> {
        let chunks_per_row = cols / chunk_elems;
        let chunks = rows * chunks_per_row;
        let threads = kb.collective_threads(self.kernel.threads());
        let thread = kb.thread_index()?;
        for round in 0..chunks.div_ceil(threads) {
            let chunk = kb.add(thread, kb.i32((round * threads) as i64))?;
            let visit = |kb: &KernelBuilder<'_, 'ctx>| -> Result<()> {
                let row = kb.div(chunk, kb.i32(chunks_per_row as i64))?;
                let col = kb.mul(kb.rem(chunk, kb.i32(chunks_per_row as i64))?, kb.i32(chunk_elems as i64))?;
                each(kb, row, col, kb.add(col, kb.i32(chunk_elems as i64 - 1))?)
            };
            if (round + 1) * threads <= chunks {
                visit(kb)?;
            } else {
                kb.if_then(kb.lt(chunk, kb.i32(chunks as i64))?, visit)?;
            }
        }
        Ok(())
    }

    /// `Map`/`Fill` over a shared window: a 16-byte chunk per thread and round where the
    /// window's chunks are aligned ([`Lowering::map_shared_runs`]), else each thread takes every
    /// `threads`-th element.
    pub(super) fn map_shared(&self, kb: &KernelBuilder<'_, 'ctx>, dst: &TileView, expr: &Expr) -> Result<()> {
        let window = self.shared_window(kb, dst)?;
        if self.map_shared_runs(kb, &window, &dst.col0, expr)?.is_some() {
            return Ok(());
        }
        let pitch = kb.i32(window.row_pitch() as i64);
        self.for_each_window_element(
            kb,
            window.rows,
            window.cols,
            MAP_BATCH,
            |kb, row, col| {
                let pointer = kb.element_pointer(window.base, window.elem, kb.add(kb.mul(row, pitch)?, col)?)?;
                let old = kb.load_as_f32(pointer, window.elem)?;
                let value = self.eval(kb, expr, &ElementSite::Shared { row, col, value: old })?.float()?;
                Ok((pointer, value))
            },
            |kb, (pointer, value)| store_from_f32(kb, pointer, window.elem, value),
        )
    }

    /// `Copy`: cp.async in 16-byte chunks when the box allows it, else element by element.
    pub(super) fn copy(&self, kb: &KernelBuilder<'_, 'ctx>, dst: &TileView, src: &GlobalTile, is_async: bool) -> Result<()> {
        if !matches!(self.tiles[dst.tile.0], TileStorage::Shared { .. }) {
            return unsupported(format!("copy into register tile %{}", self.tile_name(dst.tile)));
        }
        let window = if self.kernel.tile(dst.tile).ty.layout == Layout::Swizzled128B {
            let window = self.swizzled_window(kb, dst)?;
            CopyWindow {
                rows: dst.rows,
                cols: dst.cols,
                elem: window.elem(),
                rows_16_byte_aligned: true,
                address: Box::new(move |kb, row, col| window.element_address(kb, row, col)),
            }
        } else {
            let window = self.shared_window(kb, dst)?;
            CopyWindow {
                rows: window.rows,
                cols: window.cols,
                elem: window.elem,
                rows_16_byte_aligned: (window.row_pitch() * window.elem.bytes()).is_multiple_of(16),
                address: Box::new(move |kb, row, col| {
                    kb.element_pointer(window.base, window.elem, kb.add(kb.mul(row, kb.i32(window.row_pitch() as i64))?, col)?)
                }),
            }
        };
        let global = self.global_box(kb, src)?;
        if global.shape != (window.rows, window.cols) {
            return unsupported(format!(
                "copy of a {:?} box of `{}` into a {}×{} window",
                global.shape, src.param, window.rows, window.cols
            ));
        }
        let chunk_elems = 16 / window.elem.bytes();
        let chunkable = is_async
            && global.tensor.elem == window.elem
            && window.cols.is_multiple_of(chunk_elems)
            && window.rows_16_byte_aligned
            && matches!(dst.col0, Expr::Int(c) if (c as u64).is_multiple_of(chunk_elems as u64))
            && global.columns_contiguous_in(chunk_elems as u64);
        if chunkable {
            self.copy_chunks_async(kb, &window, &global)
        } else if tap_chunkable(&window, dst, &global) {
            self.copy_tap_chunks(kb, &window, &global)
        } else {
            self.copy_elements(kb, &window, &global)
        }
    }

    /// Copy of a box along interleaved taps (see [`tap_chunkable`]): each thread fills one
    /// 16-byte chunk of a window row (`E` = 16 / element bytes columns) from the `count`
    /// consecutive 16-byte chunks of the tensor that hold those columns' every tap, picking the
    /// box's tap in registers. Chunks are spread over the block's threads and batched like
    /// [`Lowering::for_each_window_element`]. A chunk whose row lies outside the box (tensor
    /// bounds, `valid`) or whose columns lie outside the tensor is zero-filled; the columns of
    /// a chunk are all inside or all outside (extent and start are multiples of `E`).
    fn copy_tap_chunks(&self, kb: &KernelBuilder<'_, 'ctx>, window: &CopyWindow<'_, 'ctx>, global: &GlobalBox<'ctx>) -> Result<()> {
        let (Some(taps), Some(cols)) = (global.taps.as_ref(), global.cols.as_ref()) else {
            return Err(CodegenError::Llvm("tap copy without taps or columns".into()));
        };
        let elem_bytes = window.elem.bytes();
        let chunk_elems = 16 / elem_bytes;
        let count = taps.count as u32;
        let batch = (TAP_COPY_WORDS / (4 * count)).max(1);
        // Word `lane` of the window chunk from tap `tap` of the run: 32-bit elements are words
        // of the run; 16-bit ones are gathered in pairs with `prmt`.
        let lane_of_tap = |kb: &KernelBuilder<'_, 'ctx>, words: &[IntValue<'ctx>], lane: u32, tap: u32| -> Result<IntValue<'ctx>> {
            if elem_bytes == 4 {
                return Ok(words[(lane * count + tap) as usize]);
            }
            let low = (2 * lane) * count + tap;
            let high = (2 * lane + 1) * count + tap;
            let (low_half, high_half) = (2 * (low % 2), 2 * (high % 2));
            let selector = low_half | (low_half + 1) << 4 | (4 + high_half) << 8 | (5 + high_half) << 12;
            kb.byte_perm(words[(low / 2) as usize], words[(high / 2) as usize], selector)
        };
        let lane = |kb: &KernelBuilder<'_, 'ctx>, words: &[IntValue<'ctx>], lane: u32| -> Result<IntValue<'ctx>> {
            if let Some(tap) = taps.constant {
                return lane_of_tap(kb, words, lane, tap as u32);
            }
            // A runtime tap: selects over the candidates (an index past the dimension reads
            // the last tap; the interpreter rejects it).
            let mut value = lane_of_tap(kb, words, lane, count - 1)?;
            for tap in (0..count - 1).rev() {
                let is_tap = kb.builder().build_int_compare(IntPredicate::EQ, taps.index, kb.i32(tap as i64), "")?;
                value = kb.select_int(is_tap, lane_of_tap(kb, words, lane, tap)?, value)?;
            }
            Ok(value)
        };
        self.for_each_window_element(
            kb,
            window.rows,
            window.cols / chunk_elems,
            batch,
            |kb, row, chunk| {
                let col = kb.mul(chunk, kb.i32(chunk_elems as i64))?;
                let inside = kb.and(global.rows.inside(kb, row)?, cols.inside(kb, col)?)?;
                let run = global.tap_run_pointer(kb, taps, cols, row, col)?;
                // The loads always happen, from the tensor's start when outside.
                let run = kb.builder().build_select(inside, run, global.tensor.base, "")?.into_pointer_value();
                let mut words = Vec::with_capacity(4 * count as usize);
                for part in 0..count {
                    words.extend(kb.load_global_v4_at(run, 16 * part as i32)?);
                }
                let mut lanes = [kb.i32(0); 4];
                for (index, value) in lanes.iter_mut().enumerate() {
                    *value = kb.select_int(inside, lane(kb, &words, index as u32)?, kb.i32(0))?;
                }
                Ok(((window.address)(kb, row, col)?, lanes))
            },
            |kb, (target, lanes)| kb.store_v4(target, lanes),
        )
    }

    fn copy_chunks_async(&self, kb: &KernelBuilder<'_, 'ctx>, window: &CopyWindow<'_, 'ctx>, global: &GlobalBox<'ctx>) -> Result<()> {
        let chunk_elems = 16 / window.elem.bytes();
        let cols = global.cols.as_ref().ok_or_else(|| CodegenError::Llvm("chunked copy without columns".into()))?;
        self.for_each_window_chunk(kb, window.rows, window.cols, chunk_elems, |kb, row, col, last_col| {
            // A chunk is read only if all of it is inside; otherwise it is zero-filled.
            let inside = kb.and(global.rows.inside(kb, row)?, kb.and(cols.inside(kb, col)?, cols.inside(kb, last_col)?)?)?;
            let source = global.pointer(kb, row, col)?;
            // Out of bounds, point at the tensor's first element so no stray address is formed.
            let source = kb.builder().build_select(inside, source, global.tensor.base, "")?.into_pointer_value();
            let bytes = kb.select_int(inside, kb.i32(16), kb.i32(0))?;
            kb.cp_async_16((window.address)(kb, row, col)?, source, bytes)
        })
    }

    /// Element-wise copy (strided boxes, 1-column boxes, conversions): outside elements read 0.
    fn copy_elements(&self, kb: &KernelBuilder<'_, 'ctx>, window: &CopyWindow<'_, 'ctx>, global: &GlobalBox<'ctx>) -> Result<()> {
        let same_type = global.tensor.elem == window.elem && window.elem != Elem::F32;
        self.for_each_window_element(
            kb,
            window.rows,
            window.cols,
            COPY_BATCH,
            |kb, row, col| {
                let inside = global.inside(kb, row, col)?;
                let source = global.pointer(kb, row, col)?;
                // The load always happens, from the tensor's first element when outside.
                let source = kb.builder().build_select(inside, source, global.tensor.base, "")?.into_pointer_value();
                let target = (window.address)(kb, row, col)?;
                let value = if same_type {
                    let bits = kb.builder().build_load(kb.context().i16_type(), source, "")?.into_int_value();
                    CopiedElement::Bits(kb.select_int(inside, bits, kb.context().i16_type().const_zero())?)
                } else {
                    let value = kb.load_as_f32(source, global.tensor.elem)?;
                    CopiedElement::Float(kb.select_f32(inside, value, kb.f32(0.0))?)
                };
                Ok((target, value))
            },
            |kb, (target, value)| match value {
                CopiedElement::Bits(bits) => kb.store_int(target, bits),
                CopiedElement::Float(value) => store_from_f32(kb, target, window.elem, value),
            },
        )
    }

    /// `Store` of a register tile: every element inside the box (tensor bounds, `valid`) is
    /// rounded to the tensor's type and written by the thread that holds it. Of a shared window:
    /// see [`Lowering::store_shared`].
    pub(super) fn store(&self, kb: &KernelBuilder<'_, 'ctx>, src: &TileView, dst: &GlobalTile) -> Result<()> {
        if matches!(self.tiles[src.tile.0], TileStorage::Shared { .. }) {
            return self.store_shared(kb, src, dst);
        }
        self.whole_register_tile(src)?;
        let global = self.global_box(kb, dst)?;
        let ty = &self.kernel.tile(src.tile).ty;
        if global.shape != (ty.rows, ty.cols) {
            return unsupported(format!("store of a {}×{} tile into a {:?} box of `{}`", ty.rows, ty.cols, global.shape, dst.param));
        }
        let elem = global.tensor.elem;
        match &self.tiles[src.tile.0] {
            TileStorage::Accumulator(acc) => {
                let paired = elem != Elem::F32 && global.columns_contiguous_in(2);
                for_each_accumulator_pair(kb, acc, |kb, pair| store_pair(kb, &global, pair, paired))
            }
            TileStorage::Rows(rows) => {
                let owner = rows.is_row_owner(kb)?;
                for slot in 0..rows.slot_count() {
                    let row = rows.row_of_slot(kb, slot)?;
                    let col = kb.i32(0);
                    let store = kb.and(owner, global.inside(kb, row, col)?)?;
                    let value = rows.get(kb, slot)?;
                    kb.if_then(store, |kb| store_from_f32(kb, global.pointer(kb, row, col)?, elem, value))?;
                }
                Ok(())
            }
            _ => unsupported(format!("store from %{}: only accumulators and row vectors are stored", self.tile_name(src.tile))),
        }
    }
}

impl<'ctx> Lowering<'_, 'ctx> {
    /// `AtomicAdd`: each element of the accumulator inside the box added to global memory by a
    /// relaxed atomic; a thread's two adjacent columns by one two-wide atomic where both are
    /// inside and the columns are contiguous from an even start (8-byte aligned).
    pub(super) fn atomic_add(&self, kb: &KernelBuilder<'_, 'ctx>, src: &TileView, dst: &GlobalTile) -> Result<()> {
        self.whole_register_tile(src)?;
        let global = self.global_box(kb, dst)?;
        let ty = &self.kernel.tile(src.tile).ty;
        if global.shape != (ty.rows, ty.cols) {
            return unsupported(format!("atomic add of a {}×{} tile into a {:?} box of `{}`", ty.rows, ty.cols, global.shape, dst.param));
        }
        let TileStorage::Accumulator(acc) = &self.tiles[src.tile.0] else {
            return unsupported(format!("atomic add from %{}: only accumulators are added", self.tile_name(src.tile)));
        };
        let paired = global.columns_contiguous_in(2);
        for_each_accumulator_pair(kb, acc, |kb, pair| {
            write_pair(
                kb,
                &global,
                pair,
                paired,
                PairAddressing::FromRowStart,
                |kb, pointer, value| kb.red_global_add_f32(pointer, value),
                |kb, pointer, low, high| kb.red_global_add_v2_f32(pointer, low, high),
            )
        })
    }

    /// `Store` of a shared window: 16-byte chunks spread over the CTA (each warp writes whole
    /// rows, where an accumulator's fragments write 4 bytes per row and thread) when the types
    /// match and rows and box columns allow it; a chunk not wholly inside the box is written
    /// element by element. Otherwise element by element, rounded to the tensor's type.
    fn store_shared(&self, kb: &KernelBuilder<'_, 'ctx>, src: &TileView, dst: &GlobalTile) -> Result<()> {
        let window = self.shared_window(kb, src)?;
        let global = self.global_box(kb, dst)?;
        if global.shape != (window.rows, window.cols) {
            return unsupported(format!("store of a {}×{} window into a {:?} box of `{}`", window.rows, window.cols, global.shape, dst.param));
        }
        let elem = global.tensor.elem;
        let element_address = |kb: &KernelBuilder<'_, 'ctx>, row: IntValue<'ctx>, col: IntValue<'ctx>| {
            kb.element_pointer(window.base, window.elem, kb.add(kb.mul(row, kb.i32(window.row_pitch() as i64))?, col)?)
        };
        let store_element = |kb: &KernelBuilder<'_, 'ctx>, row: IntValue<'ctx>, col: IntValue<'ctx>| -> Result<()> {
            let inside = global.inside(kb, row, col)?;
            kb.if_then(inside, |kb| {
                let value = kb.load_as_f32(element_address(kb, row, col)?, window.elem)?;
                store_from_f32(kb, global.pointer(kb, row, col)?, elem, value)
            })
        };
        let chunk_elems = 16 / window.elem.bytes();
        let chunkable = elem == window.elem
            && window.cols.is_multiple_of(chunk_elems)
            && (window.row_pitch() * window.elem.bytes()).is_multiple_of(16)
            && matches!(src.col0, Expr::Int(c) if (c as u64).is_multiple_of(chunk_elems as u64))
            && global.columns_contiguous_in(chunk_elems as u64);
        let Some(cols) = global.cols.as_ref().filter(|_| chunkable) else {
            let threads = kb.collective_threads(self.kernel.threads());
            let thread = kb.thread_index()?;
            for round in 0..(window.rows * window.cols).div_ceil(threads) {
                let element = kb.add(thread, kb.i32((round * threads) as i64))?;
                let store = |kb: &KernelBuilder<'_, 'ctx>| {
                    let row = kb.div(element, kb.i32(window.cols as i64))?;
                    store_element(kb, row, kb.rem(element, kb.i32(window.cols as i64))?)
                };
                kb.if_then(kb.lt(element, kb.i32((window.rows * window.cols) as i64))?, store)?;
            }
            return Ok(());
        };
        self.for_each_window_chunk(kb, window.rows, window.cols, chunk_elems, |kb, row, col, last_col| {
            let whole = kb.and(global.rows.inside(kb, row)?, kb.and(cols.inside(kb, col)?, cols.inside(kb, last_col)?)?)?;
            kb.if_else(
                whole,
                |kb| kb.store_v4(global.pointer(kb, row, col)?, kb.load_v4(element_address(kb, row, col)?)?),
                |kb| {
                    for offset in 0..chunk_elems {
                        store_element(kb, row, kb.add(col, kb.i32(offset as i64))?)?;
                    }
                    Ok(())
                },
            )
        })
    }
}

/// Whether a copy's box reads interleaved taps that [`Lowering::copy_tap_chunks`] can load in
/// whole 16-byte chunks: a column span along the dimension right before a fixed innermost
/// index into 2..=4 entries, the same element type (16 or 32 bits) on both sides, window rows of
/// whole 16-byte chunks, and a tensor run per row that starts on a 16-byte boundary: the
/// column dimension's extent (so every outer stride) and the column start multiples of `E` =
/// 16 / element bytes, no `valid` range on the columns (so `E` columns are all inside the
/// tensor or all outside it). The tensor's base is 16-byte aligned, as for cp.async.
fn tap_chunkable(window: &CopyWindow<'_, '_>, dst: &TileView, global: &GlobalBox<'_>) -> bool {
    let (Some(taps), Some(cols)) = (global.taps.as_ref(), global.cols.as_ref()) else {
        return false;
    };
    let chunk_elems = 16 / window.elem.bytes();
    global.tensor.elem == window.elem
        && matches!(window.elem.bytes(), 2 | 4)
        && (2..=MAX_INTERLEAVED_TAPS).contains(&taps.count)
        && taps.constant.is_none_or(|tap| (0..taps.count as i64).contains(&tap))
        && cols.dim + 1 == global.tensor.extents.len() - 1
        && cols.valid.is_none()
        && cols.start_expr.is_always_multiple_of(chunk_elems)
        && taps.inner_extent.is_some_and(|extent| extent.is_multiple_of(chunk_elems as u64))
        && window.cols.is_multiple_of(chunk_elems)
        && window.rows_16_byte_aligned
        && matches!(dst.col0, Expr::Int(c) if (c as u64).is_multiple_of(chunk_elems as u64))
}

fn store_pair<'ctx>(kb: &KernelBuilder<'_, 'ctx>, global: &GlobalBox<'ctx>, pair: &ElementPair<'ctx>, paired: bool) -> Result<()> {
    let elem = global.tensor.elem;
    write_pair(
        kb,
        global,
        pair,
        paired,
        PairAddressing::PerElement,
        |kb, pointer, value| store_from_f32(kb, pointer, elem, value),
        |kb, pointer, low, high| kb.store_int(pointer, kb.pack_half2(elem, low, high)?),
    )
}

/// How [`write_pair`] forms a pair's address.
#[derive(Clone, Copy)]
enum PairAddressing {
    /// From the thread's first pair of the row plus a constant: one base register per row and
    /// the rest in the instructions' offsets. Atomics, issued while wgmma accumulators are in
    /// flight, need the registers (the one-pass attention backward spilled without it).
    FromRowStart,
    /// Each element's own address (LLVM keeps the columns' offsets in registers): the
    /// persistent GEMMs' epilogue stores measured faster so (BENCHMARKS.md).
    PerElement,
}

/// Writes an accumulator pair (columns c, c + 1 of one row) into `global`, skipping what lies
/// outside the box: with `both` in one access where `paired` (the columns are contiguous from
/// an aligned start) and both are inside, else each element inside with `one`.
fn write_pair<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    global: &GlobalBox<'ctx>,
    pair: &ElementPair<'ctx>,
    paired: bool,
    addressing: PairAddressing,
    one: impl Fn(&KernelBuilder<'_, 'ctx>, PointerValue<'ctx>, FloatValue<'ctx>) -> Result<()>,
    both: impl FnOnce(&KernelBuilder<'_, 'ctx>, PointerValue<'ctx>, FloatValue<'ctx>, FloatValue<'ctx>) -> Result<()>,
) -> Result<()> {
    let high_col = kb.add(pair.col, kb.i32(1))?;
    let low_inside = global.inside(kb, pair.row, pair.col)?;
    let high_inside = global.inside(kb, pair.row, high_col)?;
    let pointer = |kb: &KernelBuilder<'_, 'ctx>, extra: u32| match addressing {
        PairAddressing::FromRowStart => global.pointer_right_of(kb, pair.row, pair.thread_col, pair.col_offset + extra),
        PairAddressing::PerElement => global.pointer(kb, pair.row, kb.add(pair.col, kb.i32(i64::from(extra)))?),
    };
    let one_by_one = |kb: &KernelBuilder<'_, 'ctx>| -> Result<()> {
        kb.if_then(low_inside, |kb| one(kb, pointer(kb, 0)?, pair.low))?;
        kb.if_then(high_inside, |kb| one(kb, pointer(kb, 1)?, pair.high))
    };
    if !paired {
        return one_by_one(kb);
    }
    kb.if_else(kb.and(low_inside, high_inside)?, |kb| both(kb, pointer(kb, 0)?, pair.low, pair.high), one_by_one)
}
