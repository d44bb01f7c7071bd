//! Tile-op emitters: each lowers one tile operation of the kernel IR to per-thread code, given its
//! operands' shapes and layouts as plain structs (the kernel IR's types map onto these).
//!
//! Layouts (the kernel IR's, docs/architecture.md "Kernel IR"):
//! - [`SharedTile`] with [`SharedLayout::RowMajor`]: row `r` starts at element `r * (cols + pad)`;
//!   rows must start on 16-byte boundaries (cp.async chunks, ldmatrix rows).
//! - [`AccumulatorTile`] with [`MmaAccumulator`]: an f32 tile spread over a `warps_m × warps_n`
//!   grid of warps (warp `w` is at grid row `w / warps_n`, column `w % warps_n`); inside a warp the
//!   tile is a grid of m16n8 C fragments, element `e` of a fragment at row `lane / 4 + 8 * (e / 2)`,
//!   column `2 * (lane % 4) + e % 2`.
//! - [`RowVector`]: one f32 per accumulator row a thread touches (`2 * fragments_m` of them),
//!   replicated over the 4 lanes of a quad.
//! - [`OperandAFragments`]: an accumulator tile rounded to bf16/f16 and repacked in registers as
//!   m16n8k16 A fragments (`MmaOperandA`), for `P · V` without a trip through shared memory.

use inkwell::values::{FloatValue, IntValue, PointerValue};

use super::{Elem, KernelBuilder, Result, unsupported};

/// Layout of a row-major tile in shared memory (swizzled tiles are addressed by
/// `lower::wgmma`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SharedLayout {
    /// Row-major with `pad_elems` unused elements after each row (against bank conflicts).
    RowMajor { pad_elems: u32 },
}

/// A tile in shared memory: `rows × cols` elements of `elem` at `base` (address space 3).
#[derive(Debug, Clone, Copy)]
pub struct SharedTile<'ctx> {
    pub base: PointerValue<'ctx>,
    pub elem: Elem,
    pub rows: u32,
    pub cols: u32,
    pub layout: SharedLayout,
}

impl<'ctx> SharedTile<'ctx> {
    /// Elements from the start of one row to the start of the next.
    pub fn row_pitch(&self) -> u32 {
        match self.layout {
            SharedLayout::RowMajor { pad_elems } => self.cols + pad_elems,
        }
    }

    /// Bytes a tile of this shape and layout occupies (what to reserve in shared memory).
    pub fn footprint_bytes(elem: Elem, rows: u32, cols: u32, layout: SharedLayout) -> u32 {
        match layout {
            SharedLayout::RowMajor { pad_elems } => rows * (cols + pad_elems) * elem.bytes(),
        }
    }

    fn check_rows_aligned(&self) -> Result<()> {
        if !(self.row_pitch() * self.elem.bytes()).is_multiple_of(16) {
            return unsupported(format!(
                "shared tile rows of {} {} elements (with padding) do not start on 16-byte boundaries",
                self.row_pitch(),
                self.elem.name()
            ));
        }
        Ok(())
    }
}

/// A box of a row-major tensor in global memory, with bounds: rows `>= row_limit` and columns
/// `>= col_limit` are read as zero and never written.
#[derive(Debug, Clone, Copy)]
pub struct GlobalTile<'ctx> {
    /// Element (0, 0) of the (row-major) view, in address space 1.
    pub base: PointerValue<'ctx>,
    pub elem: Elem,
    /// Elements between consecutive rows (i32).
    pub row_stride: IntValue<'ctx>,
    /// A compile-time guarantee: `row_stride` and `col_start` are multiples of this many
    /// elements and `base` is aligned to it. 16-byte copies need 16 bytes; paired stores 2 elements.
    pub alignment_elems: u32,
    /// Top-left corner of the box in the view (i32).
    pub row_start: IntValue<'ctx>,
    pub col_start: IntValue<'ctx>,
    /// Bounds of the view (i32).
    pub row_limit: IntValue<'ctx>,
    pub col_limit: IntValue<'ctx>,
}

impl<'ctx> GlobalTile<'ctx> {
    /// Address of view element (row, col), both i32, with the offset computed in i64.
    fn element(&self, kb: &KernelBuilder<'_, 'ctx>, row: IntValue<'ctx>, col: IntValue<'ctx>) -> Result<PointerValue<'ctx>> {
        let row_offset = kb.builder().build_int_mul(kb.to_i64(row)?, kb.to_i64(self.row_stride)?, "")?;
        let offset = kb.builder().build_int_add(row_offset, kb.to_i64(col)?, "")?;
        kb.element_pointer(self.base, self.elem, offset)
    }
}

/// `cp.async` copy of a global box into a shared tile of the same shape, by `threads` threads in
/// 16-byte chunks; chunks past the bounds are zero-filled (partially, at the column limit). Only
/// issues the copies: the caller commits, waits and synchronizes (`AsyncCommit`/`AsyncWait`/`Barrier`).
pub fn copy_global_to_shared_async<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    src: &GlobalTile<'ctx>,
    dst: &SharedTile<'ctx>,
    threads: u32,
) -> Result<()> {
    if src.elem != dst.elem {
        return unsupported(format!("copy from {} to {} would need a conversion", src.elem.name(), dst.elem.name()));
    }
    dst.check_rows_aligned()?;
    let bytes = dst.elem.bytes();
    let chunk_elems = 16 / bytes;
    if !src.alignment_elems.is_multiple_of(chunk_elems) {
        return unsupported(format!(
            "global rows aligned to {} elements cannot be copied in 16-byte chunks",
            src.alignment_elems
        ));
    }
    if !dst.cols.is_multiple_of(chunk_elems) {
        return unsupported(format!("tile width {} is not a multiple of {chunk_elems} elements", dst.cols));
    }
    let chunks_per_row = dst.cols / chunk_elems;
    let chunks = dst.rows * chunks_per_row;
    if threads == 0 || !chunks.is_multiple_of(threads) {
        return unsupported(format!("{chunks} chunks of a {}×{} tile do not divide over {threads} threads", dst.rows, dst.cols));
    }
    let thread = kb.thread_index()?;
    for round in 0..chunks / threads {
        let chunk = kb.add(thread, kb.i32((round * threads) as i64))?;
        let row = kb.div(chunk, kb.i32(chunks_per_row as i64))?;
        let col = kb.mul(kb.rem(chunk, kb.i32(chunks_per_row as i64))?, kb.i32(chunk_elems as i64))?;
        let global_row = kb.add(src.row_start, row)?;
        let global_col = kb.add(src.col_start, col)?;
        let row_inside = kb.lt(global_row, src.row_limit)?;
        let col_inside = kb.lt(global_col, src.col_limit)?;
        let inside = kb.and(row_inside, col_inside)?;
        // Bytes left in the row, clamped to one chunk: a partial last chunk is zero-filled.
        let left = kb.mul(kb.sub(src.col_limit, global_col)?, kb.i32(bytes as i64))?;
        let chunk_bytes = kb.min(left, kb.i32(16))?;
        let src_bytes = kb.select_int(inside, chunk_bytes, kb.i32(0))?;
        // Out of bounds, point at the view's first element so no stray address is ever formed.
        let in_bounds_address = src.element(kb, global_row, global_col)?;
        let address = kb.builder().build_select(inside, in_bounds_address, src.base, "")?.into_pointer_value();
        let shared_offset = kb.add(kb.mul(row, kb.i32(dst.row_pitch() as i64))?, col)?;
        let shared_address = kb.element_pointer(dst.base, dst.elem, shared_offset)?;
        kb.cp_async_16(shared_address, address, src_bytes)?;
    }
    Ok(())
}

/// Register layout of an accumulator tile: the warp grid it is spread over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MmaAccumulator {
    pub warps_m: u32,
    pub warps_n: u32,
}

/// Shape and layout of an f32 accumulator tile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AccumulatorShape {
    pub rows: u32,
    pub cols: u32,
    pub layout: MmaAccumulator,
}

impl AccumulatorShape {
    pub fn validate(&self) -> Result<()> {
        let MmaAccumulator { warps_m, warps_n } = self.layout;
        if warps_m == 0 || warps_n == 0 || !self.rows.is_multiple_of(16 * warps_m) || !self.cols.is_multiple_of(8 * warps_n) {
            return unsupported(format!(
                "a {}×{} accumulator does not split into m16n8 fragments over {warps_m}×{warps_n} warps",
                self.rows, self.cols
            ));
        }
        Ok(())
    }

    pub fn warp_rows(&self) -> u32 {
        self.rows / self.layout.warps_m
    }

    pub fn warp_cols(&self) -> u32 {
        self.cols / self.layout.warps_n
    }

    pub fn fragments_m(&self) -> u32 {
        self.warp_rows() / 16
    }

    pub fn fragments_n(&self) -> u32 {
        self.warp_cols() / 8
    }

    pub fn threads(&self) -> u32 {
        self.layout.warps_m * self.layout.warps_n * 32
    }

    /// Row-vector slots per thread: two rows (lane/4 and lane/4 + 8) per m fragment.
    pub fn row_slots(&self) -> u32 {
        2 * self.fragments_m()
    }

    fn slot(&self, fragment_m: u32, fragment_n: u32, element: u32) -> usize {
        ((fragment_m * self.fragments_n() + fragment_n) * 4 + element) as usize
    }
}

/// Where the calling thread sits in an accumulator layout (tile-local, i32).
struct ThreadPlace<'ctx> {
    warp_row: IntValue<'ctx>,
    warp_col: IntValue<'ctx>,
    lane: IntValue<'ctx>,
    /// `lane / 4`: the fragment row of elements 0 and 1.
    group: IntValue<'ctx>,
    /// `2 * (lane % 4)`: the fragment column of elements 0 and 2.
    pair_col: IntValue<'ctx>,
}

impl<'ctx> ThreadPlace<'ctx> {
    fn new(kb: &KernelBuilder<'_, 'ctx>, shape: &AccumulatorShape) -> Result<Self> {
        let warp = kb.warp_index()?;
        let lane = kb.lane()?;
        let warps_n = kb.i32(shape.layout.warps_n as i64);
        let warp_row = kb.mul(kb.div(warp, warps_n)?, kb.i32(shape.warp_rows() as i64))?;
        let warp_col = kb.mul(kb.rem(warp, warps_n)?, kb.i32(shape.warp_cols() as i64))?;
        let group = kb.div(lane, kb.i32(4))?;
        let pair_col = kb.mul(kb.rem(lane, kb.i32(4))?, kb.i32(2))?;
        Ok(ThreadPlace { warp_row, warp_col, lane, group, pair_col })
    }

    /// Tile-local row of row slot `slot` (see [`AccumulatorShape::row_slots`]).
    fn row(&self, kb: &KernelBuilder<'_, 'ctx>, slot: u32) -> Result<IntValue<'ctx>> {
        let offset = (slot / 2) * 16 + (slot % 2) * 8;
        kb.add(kb.add(self.warp_row, self.group)?, kb.i32(offset as i64))
    }

    /// Tile-local column of the thread's first pair (fragment column n adds 8n).
    fn first_col(&self, kb: &KernelBuilder<'_, 'ctx>) -> Result<IntValue<'ctx>> {
        kb.add(self.warp_col, self.pair_col)
    }

    /// Tile-local column of the first element of a pair in fragment column `fragment_n`.
    fn col(&self, kb: &KernelBuilder<'_, 'ctx>, fragment_n: u32) -> Result<IntValue<'ctx>> {
        kb.add(self.first_col(kb)?, kb.i32((fragment_n * 8) as i64))
    }
}

/// An f32 accumulator tile in registers (one private slot per element the thread holds).
pub struct AccumulatorTile<'ctx> {
    pub shape: AccumulatorShape,
    slots: Vec<PointerValue<'ctx>>,
}

impl<'ctx> AccumulatorTile<'ctx> {
    pub fn new(kb: &KernelBuilder<'_, 'ctx>, shape: AccumulatorShape) -> Result<Self> {
        shape.validate()?;
        let count = shape.fragments_m() * shape.fragments_n() * 4;
        let slots = (0..count).map(|_| kb.register_slot()).collect::<Result<_>>()?;
        Ok(AccumulatorTile { shape, slots })
    }

    /// `Fill { dst, value }`.
    pub fn fill(&self, kb: &KernelBuilder<'_, 'ctx>, value: f64) -> Result<()> {
        self.slots.iter().try_for_each(|slot| kb.store_f32(*slot, kb.f32(value)))
    }

    /// Every value this thread holds, in slot order: with one 16-row band per warp that is the
    /// register order of a wgmma D fragment (n8 column block, then the m16n8 C-fragment element).
    pub fn load_all(&self, kb: &KernelBuilder<'_, 'ctx>) -> Result<Vec<FloatValue<'ctx>>> {
        self.slots.iter().map(|slot| kb.load_f32(*slot)).collect()
    }

    /// Stores `values` in slot order (see [`Self::load_all`]).
    pub fn store_all(&self, kb: &KernelBuilder<'_, 'ctx>, values: &[FloatValue<'ctx>]) -> Result<()> {
        if values.len() != self.slots.len() {
            return unsupported(format!("{} values for {} accumulator slots", values.len(), self.slots.len()));
        }
        self.slots.iter().zip(values).try_for_each(|(slot, value)| kb.store_f32(*slot, *value))
    }

    /// The value this thread holds at `element_slot` (from [`ElementPosition::element_slot`] of a
    /// map over a tile with the same shape and layout).
    pub fn element(&self, kb: &KernelBuilder<'_, 'ctx>, element_slot: usize) -> Result<FloatValue<'ctx>> {
        match self.slots.get(element_slot) {
            Some(slot) => kb.load_f32(*slot),
            None => unsupported(format!("element slot {element_slot} of {}", self.slots.len())),
        }
    }
}

/// Two horizontally adjacent accumulator elements a thread holds: (row, col) and (row, col + 1),
/// `col` even.
#[derive(Debug, Clone, Copy)]
pub struct ElementPair<'ctx> {
    /// Tile-local (i32).
    pub row: IntValue<'ctx>,
    pub col: IntValue<'ctx>,
    /// `col` as the thread's first column (the same for all its pairs) plus a constant, so
    /// that writers can address every pair of a row from one base.
    pub thread_col: IntValue<'ctx>,
    pub col_offset: u32,
    pub row_slot: u32,
    pub low: FloatValue<'ctx>,
    pub high: FloatValue<'ctx>,
}

/// Calls `f` on every element pair of the accumulator this thread holds (stores, conversions).
pub fn for_each_accumulator_pair<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    tile: &AccumulatorTile<'ctx>,
    mut f: impl FnMut(&KernelBuilder<'_, 'ctx>, &ElementPair<'ctx>) -> Result<()>,
) -> Result<()> {
    let shape = tile.shape;
    let place = ThreadPlace::new(kb, &shape)?;
    let thread_col = place.first_col(kb)?;
    for fragment_m in 0..shape.fragments_m() {
        for half in 0..2 {
            let row_slot = fragment_m * 2 + half;
            let row = place.row(kb, row_slot)?;
            for fragment_n in 0..shape.fragments_n() {
                let pair = ElementPair {
                    row,
                    col: place.col(kb, fragment_n)?,
                    thread_col,
                    col_offset: fragment_n * 8,
                    row_slot,
                    low: kb.load_f32(tile.slots[shape.slot(fragment_m, fragment_n, 2 * half)])?,
                    high: kb.load_f32(tile.slots[shape.slot(fragment_m, fragment_n, 2 * half + 1)])?,
                };
                f(kb, &pair)?;
            }
        }
    }
    Ok(())
}

/// `Convert { dst: shared, src: accumulator }`: every element rounded to the shared tile's type
/// and written at the same (row, col) of `dst`, a tile or a window of one with the accumulator's
/// shape. 16-bit pairs are written as one 32-bit word when `pairs_aligned` (even row pitch and
/// an even first column).
pub fn store_accumulator_to_shared<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    src: &AccumulatorTile<'ctx>,
    dst: &SharedTile<'ctx>,
    pairs_aligned: bool,
) -> Result<()> {
    if dst.rows != src.shape.rows || dst.cols != src.shape.cols {
        return unsupported(format!(
            "convert of a {}×{} accumulator into a {}×{} shared window",
            src.shape.rows, src.shape.cols, dst.rows, dst.cols
        ));
    }
    let pitch = kb.i32(dst.row_pitch() as i64);
    for_each_accumulator_pair(kb, src, |kb, pair| {
        let offset = kb.add(kb.mul(pair.row, pitch)?, pair.col)?;
        let low_address = kb.element_pointer(dst.base, dst.elem, offset)?;
        match dst.elem {
            Elem::F32 => {
                kb.store_f32(low_address, pair.low)?;
                let high_address = kb.element_pointer(low_address, Elem::F32, kb.i32(1))?;
                kb.store_f32(high_address, pair.high)
            }
            half if pairs_aligned => kb.store_int(low_address, kb.pack_half2(half, pair.low, pair.high)?),
            half => {
                kb.store_int(low_address, kb.round_half(half, pair.low)?)?;
                let high_address = kb.element_pointer(low_address, half, kb.i32(1))?;
                kb.store_int(high_address, kb.round_half(half, pair.high)?)
            }
        }
    })
}

/// A per-row f32 vector over an accumulator layout (running max, sum, scale).
pub struct RowVector<'ctx> {
    pub of: AccumulatorShape,
    slots: Vec<PointerValue<'ctx>>,
}

impl<'ctx> RowVector<'ctx> {
    pub fn new(kb: &KernelBuilder<'_, 'ctx>, of: AccumulatorShape) -> Result<Self> {
        of.validate()?;
        let slots = (0..of.row_slots()).map(|_| kb.register_slot()).collect::<Result<_>>()?;
        Ok(RowVector { of, slots })
    }

    pub fn slot_count(&self) -> u32 {
        self.slots.len() as u32
    }

    pub fn get(&self, kb: &KernelBuilder<'_, 'ctx>, slot: u32) -> Result<FloatValue<'ctx>> {
        kb.load_f32(self.slot(slot)?)
    }

    pub fn set(&self, kb: &KernelBuilder<'_, 'ctx>, slot: u32, value: FloatValue<'ctx>) -> Result<()> {
        kb.store_f32(self.slot(slot)?, value)
    }

    fn slot(&self, slot: u32) -> Result<PointerValue<'ctx>> {
        match self.slots.get(slot as usize) {
            Some(pointer) => Ok(*pointer),
            None => unsupported(format!("row slot {slot} of {}", self.slots.len())),
        }
    }

    pub fn fill(&self, kb: &KernelBuilder<'_, 'ctx>, value: f64) -> Result<()> {
        self.slots.iter().try_for_each(|slot| kb.store_f32(*slot, kb.f32(value)))
    }

    /// Tile-local row (i32) of `slot` for the calling thread.
    pub fn row_of_slot(&self, kb: &KernelBuilder<'_, 'ctx>, slot: u32) -> Result<IntValue<'ctx>> {
        ThreadPlace::new(kb, &self.of)?.row(kb, slot)
    }

    /// Whether the calling thread is the first of the quad that holds its rows (the one that
    /// stores a replicated row value), as an i1.
    pub fn is_row_owner(&self, kb: &KernelBuilder<'_, 'ctx>) -> Result<IntValue<'ctx>> {
        let place = ThreadPlace::new(kb, &self.of)?;
        let first_col = kb.builder().build_int_compare(inkwell::IntPredicate::EQ, place.pair_col, kb.i32(0), "")?;
        if self.of.layout.warps_n == 1 {
            return Ok(first_col);
        }
        // With several warps along columns every one of them holds the row: the first stores it.
        let first_warp = kb.builder().build_int_compare(inkwell::IntPredicate::EQ, place.warp_col, kb.i32(0), "")?;
        kb.and(first_col, first_warp)
    }

    /// Elementwise map over the vector: `f(kb, slot, value)`.
    pub fn map(
        &self,
        kb: &KernelBuilder<'_, 'ctx>,
        mut f: impl FnMut(&KernelBuilder<'_, 'ctx>, u32, FloatValue<'ctx>) -> Result<FloatValue<'ctx>>,
    ) -> Result<()> {
        for slot in 0..self.slot_count() {
            let value = self.get(kb, slot)?;
            let mapped = f(kb, slot, value)?;
            self.set(kb, slot, mapped)?;
        }
        Ok(())
    }
}

/// What the elementwise function of [`map_accumulator`] knows about its element.
#[derive(Debug, Clone, Copy)]
pub struct ElementPosition<'ctx> {
    /// Tile-local row and column (i32); add the tile's origin for global positions.
    pub row: IntValue<'ctx>,
    pub col: IntValue<'ctx>,
    /// The [`RowVector`] slot of this element's row.
    pub row_slot: u32,
    /// Index of this element among the thread's slots of any accumulator of the same shape and
    /// layout (see [`AccumulatorTile::element`]).
    pub element_slot: usize,
}

/// `Map { dst, expr }` over an accumulator tile: each element becomes `f(kb, position, value)`.
pub fn map_accumulator<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    tile: &AccumulatorTile<'ctx>,
    mut f: impl FnMut(&KernelBuilder<'_, 'ctx>, &ElementPosition<'ctx>, FloatValue<'ctx>) -> Result<FloatValue<'ctx>>,
) -> Result<()> {
    map_accumulator_pairs(kb, tile, |kb, [left, right], [a, b]| Ok([f(kb, &left, a)?, f(kb, &right, b)?]))
}

/// [`map_accumulator`] a column pair at a time: `f(kb, positions, values)` maps the two
/// elements (row, c) and (row, c + 1), c even, that a thread holds side by side.
pub fn map_accumulator_pairs<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    tile: &AccumulatorTile<'ctx>,
    mut f: impl FnMut(&KernelBuilder<'_, 'ctx>, [ElementPosition<'ctx>; 2], [FloatValue<'ctx>; 2]) -> Result<[FloatValue<'ctx>; 2]>,
) -> Result<()> {
    let shape = tile.shape;
    let place = ThreadPlace::new(kb, &shape)?;
    for fragment_m in 0..shape.fragments_m() {
        for fragment_n in 0..shape.fragments_n() {
            let pair_col = place.col(kb, fragment_n)?;
            for half in 0..2 {
                let row_slot = fragment_m * 2 + half;
                let row = place.row(kb, row_slot)?;
                let position = |element: u32| -> Result<ElementPosition<'ctx>> {
                    Ok(ElementPosition {
                        row,
                        col: kb.add(pair_col, kb.i32((element % 2) as i64))?,
                        row_slot,
                        element_slot: shape.slot(fragment_m, fragment_n, element),
                    })
                };
                let positions = [position(2 * half)?, position(2 * half + 1)?];
                let slots = positions.map(|position| tile.slots[position.element_slot]);
                let values = [kb.load_f32(slots[0])?, kb.load_f32(slots[1])?];
                let mapped = f(kb, positions, values)?;
                kb.store_f32(slots[0], mapped[0])?;
                kb.store_f32(slots[1], mapped[1])?;
            }
        }
    }
    Ok(())
}

/// Reduction operators of `RowReduce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowReduction {
    Max,
    Sum,
}

/// `RowReduce { dst, src, op }`: each row of `src` reduced over all its columns into `dst`
/// (overwriting it). The row's elements live in one quad of one warp, so the layout must give
/// each warp whole rows (`warps_n == 1`); the quad is combined with `shfl.bfly` 1 and 2.
pub fn row_reduce<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    src: &AccumulatorTile<'ctx>,
    op: RowReduction,
    dst: &RowVector<'ctx>,
) -> Result<()> {
    row_reduce_with(kb, src, op, dst, true, AcrossWarps::No, |_, _, value| Ok(value))
}

/// Where a row reduction over warps split along the columns combines their parts: `rows ×
/// warps_n` f32 words of shared memory, which the whole CTA reaches (two CTA barriers).
#[derive(Clone, Copy)]
pub enum AcrossWarps<'ctx> {
    /// Whole rows per warp: the quad shuffles finish the reduction.
    No,
    Through(PointerValue<'ctx>),
}

/// [`row_reduce`] of `value(position, element)` instead of the elements themselves
/// (`RowReduce { value }`, e.g. the sum of squares of an L2 norm). With `across_threads` false,
/// each thread keeps its own part (row shares).
pub fn row_reduce_with<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    src: &AccumulatorTile<'ctx>,
    op: RowReduction,
    dst: &RowVector<'ctx>,
    across_threads: bool,
    across_warps: AcrossWarps<'ctx>,
    mut value: impl FnMut(&KernelBuilder<'_, 'ctx>, &ElementPosition<'ctx>, FloatValue<'ctx>) -> Result<FloatValue<'ctx>>,
) -> Result<()> {
    let shape = src.shape;
    let scratch = match across_warps {
        AcrossWarps::Through(scratch) if shape.layout.warps_n > 1 && across_threads => Some(scratch),
        AcrossWarps::No if shape.layout.warps_n == 1 => None,
        _ => return unsupported("a row reduction over warps split along the columns needs shared scratch, and a row vector"),
    };
    if dst.of.rows != shape.rows || dst.of.layout != shape.layout {
        return unsupported("row vector belongs to a different accumulator layout");
    }
    let combine = |a: FloatValue<'ctx>, b: FloatValue<'ctx>| match op {
        RowReduction::Max => kb.fmax(a, b),
        RowReduction::Sum => kb.fadd(a, b),
    };
    let place = ThreadPlace::new(kb, &shape)?;
    for row_slot in 0..shape.row_slots() {
        let (fragment_m, half) = (row_slot / 2, row_slot % 2);
        let row = place.row(kb, row_slot)?;
        let mut terms: Vec<FloatValue<'ctx>> = Vec::new();
        for fragment_n in 0..shape.fragments_n() {
            let pair_col = place.col(kb, fragment_n)?;
            for element in [2 * half, 2 * half + 1] {
                let element_slot = shape.slot(fragment_m, fragment_n, element);
                let position = ElementPosition {
                    row,
                    col: kb.add(pair_col, kb.i32((element % 2) as i64))?,
                    row_slot,
                    element_slot,
                };
                let element_value = kb.load_f32(src.slots[element_slot])?;
                terms.push(value(kb, &position, element_value)?);
            }
        }
        // A balanced tree: log2(n) dependent instructions instead of n on the softmax's path.
        while terms.len() > 1 {
            terms = terms.chunks(2).map(|pair| if pair.len() == 2 { combine(pair[0], pair[1]) } else { Ok(pair[0]) }).collect::<Result<_>>()?;
        }
        let mut total = terms.pop().ok_or_else(|| super::CodegenError::Unsupported("empty row".to_string()))?;
        if across_threads {
            total = across_quad(kb, total, combine)?;
        }
        dst.set(kb, row_slot, total)?;
    }
    if let Some(scratch) = scratch {
        // Each warp column's part to word (row, column), then every thread adds a row's parts in
        // column order, so that all warps of a row hold the same total.
        let warps_n = shape.layout.warps_n;
        let word = |row: IntValue<'ctx>, column: IntValue<'ctx>| -> Result<PointerValue<'ctx>> {
            let index = kb.add(kb.mul(row, kb.i32(warps_n as i64))?, column)?;
            kb.byte_pointer(scratch, kb.mul(index, kb.i32(4))?)
        };
        let column = kb.rem(kb.warp_index()?, kb.i32(warps_n as i64))?;
        for row_slot in 0..shape.row_slots() {
            kb.store_f32(word(place.row(kb, row_slot)?, column)?, dst.get(kb, row_slot)?)?;
        }
        kb.barrier()?;
        for row_slot in 0..shape.row_slots() {
            let row = place.row(kb, row_slot)?;
            let mut total = kb.load_f32(word(row, kb.i32(0))?)?;
            for other in 1..warps_n {
                total = combine(total, kb.load_f32(word(row, kb.i32(other as i64))?)?)?;
            }
            dst.set(kb, row_slot, total)?;
        }
        // The next reduction writes the same words.
        kb.barrier()?;
    }
    Ok(())
}

/// `value` combined by `combine` over the quad of lanes that hold one accumulator row.
pub fn across_quad<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    value: FloatValue<'ctx>,
    combine: impl Fn(FloatValue<'ctx>, FloatValue<'ctx>) -> Result<FloatValue<'ctx>>,
) -> Result<FloatValue<'ctx>> {
    let pair = combine(value, kb.shuffle_xor_f32(value, 1)?)?;
    combine(pair, kb.shuffle_xor_f32(pair, 2)?)
}

/// An accumulator tile rounded to a 16-bit type and repacked as m16n8k16 A fragments
/// (`MmaOperandA`): `rows × cols` with `cols` the K extent of the following mma.
pub struct OperandAFragments<'ctx> {
    pub elem: Elem,
    pub rows: u32,
    pub cols: u32,
    pub layout: MmaAccumulator,
    /// Index `(fragment_m * k_steps + k_step) * 4 + register`.
    registers: Vec<IntValue<'ctx>>,
}

impl<'ctx> OperandAFragments<'ctx> {
    /// Every register, in `band_k_step` order.
    pub fn registers(&self) -> &[IntValue<'ctx>] {
        &self.registers
    }

    /// Fragments of an `elem` tile of `rows` × `cols` over `layout` held in `registers`
    /// (`band_k_step` order), e.g. as loaded back from slots.
    pub fn from_registers(elem: Elem, rows: u32, cols: u32, layout: MmaAccumulator, registers: Vec<IntValue<'ctx>>) -> Self {
        OperandAFragments { elem, rows, cols, layout, registers }
    }

    /// The four registers of k16 step `k_step` of a warp's only 16-row band: the A fragment of
    /// an `mma.m16n8k16`, which is also the warp's part of a wgmma `m64k16` A operand.
    pub fn band_k_step(&self, k_step: u32) -> Result<[IntValue<'ctx>; 4]> {
        if self.rows != 16 * self.layout.warps_m {
            return unsupported(format!("{} rows over {} warps are not one 16-row band per warp", self.rows, self.layout.warps_m));
        }
        let start = (k_step * 4) as usize;
        match self.registers.get(start..start + 4) {
            Some(&[a, b, c, d]) => Ok([a, b, c, d]),
            _ => unsupported(format!("k16 step {k_step} of an A operand {} wide", self.cols)),
        }
    }
}

/// `Convert { dst, src }` from an f32 accumulator to A fragments in registers. The C fragments
/// of two neighbouring n8 columns are exactly the A fragment of one k16 step, so this is only
/// rounding and packing (`cvt.rn.bf16x2.f32`). Needs whole rows per warp.
pub fn convert_to_operand_a<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    src: &AccumulatorTile<'ctx>,
    elem: Elem,
) -> Result<OperandAFragments<'ctx>> {
    let shape = src.shape;
    if shape.layout.warps_n != 1 || !shape.cols.is_multiple_of(16) {
        return unsupported("an A operand needs whole rows per warp (warps_n = 1) and a width that is a multiple of 16");
    }
    let k_steps = shape.cols / 16;
    let mut registers = Vec::with_capacity((shape.fragments_m() * k_steps * 4) as usize);
    for fragment_m in 0..shape.fragments_m() {
        for k_step in 0..k_steps {
            for (fragment_n, half) in [(2 * k_step, 0), (2 * k_step, 1), (2 * k_step + 1, 0), (2 * k_step + 1, 1)] {
                let low = kb.load_f32(src.slots[shape.slot(fragment_m, fragment_n, 2 * half)])?;
                let high = kb.load_f32(src.slots[shape.slot(fragment_m, fragment_n, 2 * half + 1)])?;
                registers.push(kb.pack_half2(elem, low, high)?);
            }
        }
    }
    Ok(OperandAFragments { elem, rows: shape.rows, cols: shape.cols, layout: shape.layout, registers })
}

/// The A operand of [`mma`]: `rows × K`.
pub enum OperandA<'a, 'ctx> {
    /// Row-major shared tile, loaded with `ldmatrix.x4`.
    Shared(&'a SharedTile<'ctx>),
    /// Stored `[K, M]` row-major: `acc += Aᵀ · B` (a weight gradient's dYᵀ). `ldmatrix.trans`.
    SharedKByM(&'a SharedTile<'ctx>),
    /// Fragments already in registers (see [`convert_to_operand_a`]).
    Registers(&'a OperandAFragments<'ctx>),
}

/// The B operand of [`mma`], a shared tile.
pub enum OperandB<'a, 'ctx> {
    /// Stored `[N, K]` row-major: `acc += A · Bᵀ` (Q·Kᵀ; GEMM with B as `[N, K]`). `ldmatrix`.
    NByK(&'a SharedTile<'ctx>),
    /// Stored `[K, N]` row-major: `acc += A · B` (P·V). `ldmatrix.trans`.
    KByN(&'a SharedTile<'ctx>),
}

/// `Mma { acc, a, b }`: `acc += A · op(B)` with `mma.sync.m16n8k16`, each warp computing its part
/// of the accumulator layout one k16 step at a time.
pub fn mma<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    acc: &AccumulatorTile<'ctx>,
    a: OperandA<'_, 'ctx>,
    b: OperandB<'_, 'ctx>,
) -> Result<()> {
    let shape = acc.shape;
    let (b_tile, b_transposed_in_memory) = match b {
        OperandB::NByK(tile) => (tile, false),
        OperandB::KByN(tile) => (tile, true),
    };
    let (b_n, b_k) = if b_transposed_in_memory { (b_tile.cols, b_tile.rows) } else { (b_tile.rows, b_tile.cols) };
    let (a_rows, a_k, a_elem) = match &a {
        OperandA::Shared(tile) => (tile.rows, tile.cols, tile.elem),
        OperandA::SharedKByM(tile) => (tile.cols, tile.rows, tile.elem),
        OperandA::Registers(fragments) => (fragments.rows, fragments.cols, fragments.elem),
    };
    if a_rows != shape.rows || b_n != shape.cols || a_k != b_k {
        return unsupported(format!(
            "mma shapes do not fit: acc {}×{}, A {a_rows}×{a_k}, B gives N = {b_n}, K = {b_k}",
            shape.rows, shape.cols
        ));
    }
    if a_elem != b_tile.elem {
        return unsupported("mma operands of different element types");
    }
    if a_k % 16 != 0 || !shape.warp_cols().is_multiple_of(16) {
        return unsupported("mma needs K and each warp's N extent to be multiples of 16");
    }
    b_tile.check_rows_aligned()?;
    let place = ThreadPlace::new(kb, &shape)?;
    let lane_low = kb.rem(place.lane, kb.i32(8))?; // row inside one 8×8 matrix
    let lane_quarter = kb.div(place.lane, kb.i32(8))?; // which of the four matrices
    let eighth_elems = |value: IntValue<'ctx>| kb.mul(value, kb.i32(8));

    // The lane-dependent part of each ldmatrix address, computed once; steps add constants.
    let a_lane_base = match &a {
        OperandA::Shared(tile) => {
            tile.check_rows_aligned()?;
            // Matrices: rows 0-7|8-15 by k 0-7|8-15, so lane l reads row l % 16, k half l / 16.
            let row = kb.add(place.warp_row, kb.rem(place.lane, kb.i32(16))?)?;
            let col = eighth_elems(kb.div(place.lane, kb.i32(16))?)?;
            let offset = kb.add(kb.mul(row, kb.i32(tile.row_pitch() as i64))?, col)?;
            Some(kb.element_pointer(tile.base, tile.elem, offset)?)
        }
        OperandA::SharedKByM(tile) => {
            tile.check_rows_aligned()?;
            // Matrices (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15), (m 8-15, k 8-15), each
            // read transposed from 8 memory rows k: lane l gives row k = 8·(l / 16) + l % 8 at
            // column m = 8·((l / 8) % 2).
            let k = kb.add(eighth_elems(kb.div(place.lane, kb.i32(16))?)?, lane_low)?;
            let m = kb.add(place.warp_row, eighth_elems(kb.rem(lane_quarter, kb.i32(2))?)?)?;
            let offset = kb.add(kb.mul(k, kb.i32(tile.row_pitch() as i64))?, m)?;
            Some(kb.element_pointer(tile.base, tile.elem, offset)?)
        }
        OperandA::Registers(fragments) => {
            if fragments.layout.warps_m != shape.layout.warps_m || shape.layout.warps_n != 1 {
                return unsupported("register A fragments need an accumulator with the same warps_m and warps_n = 1");
            }
            None
        }
    };
    let b_lane_base = {
        let (row, col) = if b_transposed_in_memory {
            // Matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15).
            let k = kb.add(eighth_elems(kb.rem(lane_quarter, kb.i32(2))?)?, lane_low)?;
            let n = kb.add(place.warp_col, eighth_elems(kb.div(lane_quarter, kb.i32(2))?)?)?;
            (k, n)
        } else {
            // Matrices (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15).
            let n = kb.add(kb.add(place.warp_col, eighth_elems(kb.div(lane_quarter, kb.i32(2))?)?)?, lane_low)?;
            let k = eighth_elems(kb.rem(lane_quarter, kb.i32(2))?)?;
            (n, k)
        };
        let offset = kb.add(kb.mul(row, kb.i32(b_tile.row_pitch() as i64))?, col)?;
        kb.element_pointer(b_tile.base, b_tile.elem, offset)?
    };

    let bytes = a_elem.bytes() as i64;
    for k_step in 0..a_k / 16 {
        let mut a_fragments = Vec::with_capacity(shape.fragments_m() as usize);
        for fragment_m in 0..shape.fragments_m() {
            let registers = match (&a, a_lane_base) {
                (OperandA::Shared(tile), Some(lane_base)) => {
                    let offset = (fragment_m * 16 * tile.row_pitch() + k_step * 16) as i64 * bytes;
                    kb.ldmatrix_x4_at(lane_base, offset as i32, false)?
                }
                (OperandA::SharedKByM(tile), Some(lane_base)) => {
                    let offset = (k_step * 16 * tile.row_pitch() + fragment_m * 16) as i64 * bytes;
                    kb.ldmatrix_x4_at(lane_base, offset as i32, true)?
                }
                (OperandA::Registers(fragments), _) => {
                    let first = ((fragment_m * (a_k / 16) + k_step) * 4) as usize;
                    [0, 1, 2, 3].map(|register| fragments.registers[first + register])
                }
                (OperandA::Shared(_) | OperandA::SharedKByM(_), None) => {
                    return unsupported("shared A operand without an address");
                }
            };
            a_fragments.push(registers);
        }
        for fragment_pair in 0..shape.fragments_n() / 2 {
            let offset = if b_transposed_in_memory {
                (k_step * 16 * b_tile.row_pitch() + fragment_pair * 16) as i64
            } else {
                (fragment_pair * 16 * b_tile.row_pitch() + k_step * 16) as i64
            };
            let b_registers = kb.ldmatrix_x4_at(b_lane_base, (offset * bytes) as i32, b_transposed_in_memory)?;
            for (half, b_fragment) in [[b_registers[0], b_registers[1]], [b_registers[2], b_registers[3]]].into_iter().enumerate() {
                let fragment_n = fragment_pair * 2 + half as u32;
                for (fragment_m, a_fragment) in a_fragments.iter().enumerate() {
                    let slots: Vec<PointerValue<'ctx>> =
                        (0..4).map(|element| acc.slots[shape.slot(fragment_m as u32, fragment_n, element)]).collect();
                    let c = [
                        kb.load_f32(slots[0])?,
                        kb.load_f32(slots[1])?,
                        kb.load_f32(slots[2])?,
                        kb.load_f32(slots[3])?,
                    ];
                    let d = kb.mma_m16n8k16(a_elem, *a_fragment, b_fragment, c)?;
                    for (slot, value) in slots.iter().zip(d) {
                        kb.store_f32(*slot, value)?;
                    }
                }
            }
        }
    }
    Ok(())
}

/// `Store { src, dst }` of an accumulator tile to a global box, rounding to `dst.elem` (bf16,
/// f16 or f32), skipping elements outside the bounds. Adjacent column pairs are stored as one
/// 32-bit word when the destination is 16-bit and its rows are 2-element aligned.
pub fn store_accumulator<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    src: &AccumulatorTile<'ctx>,
    dst: &GlobalTile<'ctx>,
) -> Result<()> {
    let shape = src.shape;
    let place = ThreadPlace::new(kb, &shape)?;
    let paired = dst.elem != Elem::F32 && dst.alignment_elems.is_multiple_of(2);
    for fragment_m in 0..shape.fragments_m() {
        for half in 0..2 {
            let row = kb.add(dst.row_start, place.row(kb, fragment_m * 2 + half)?)?;
            let row_inside = kb.lt(row, dst.row_limit)?;
            kb.if_then(row_inside, |kb| {
                for fragment_n in 0..shape.fragments_n() {
                    let col = kb.add(dst.col_start, place.col(kb, fragment_n)?)?;
                    let low = kb.load_f32(src.slots[shape.slot(fragment_m, fragment_n, 2 * half)])?;
                    let high = kb.load_f32(src.slots[shape.slot(fragment_m, fragment_n, 2 * half + 1)])?;
                    let high_col = kb.add(col, kb.i32(1))?;
                    if paired {
                        let both_inside = kb.lt(high_col, dst.col_limit)?;
                        kb.if_else(
                            both_inside,
                            |kb| kb.store_int(dst.element(kb, row, col)?, kb.pack_half2(dst.elem, low, high)?),
                            |kb| {
                                let low_inside = kb.lt(col, dst.col_limit)?;
                                kb.if_then(low_inside, |kb| store_element(kb, dst, row, col, low))
                            },
                        )?;
                    } else {
                        for (column, value) in [(col, low), (high_col, high)] {
                            let inside = kb.lt(column, dst.col_limit)?;
                            kb.if_then(inside, |kb| store_element(kb, dst, row, column, value))?;
                        }
                    }
                }
                Ok(())
            })?;
        }
    }
    Ok(())
}

fn store_element<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    dst: &GlobalTile<'ctx>,
    row: IntValue<'ctx>,
    col: IntValue<'ctx>,
    value: FloatValue<'ctx>,
) -> Result<()> {
    let address = dst.element(kb, row, col)?;
    match dst.elem {
        Elem::F32 => kb.store_f32(address, value),
        half => kb.store_int(address, kb.round_half(half, value)?),
    }
}

/// Stores a row vector as f32 to `base[row_start + row]` for rows below `row_limit` (one lane of
/// each quad writes; `lse` of attention).
pub fn store_row_vector<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    vector: &RowVector<'ctx>,
    base: PointerValue<'ctx>,
    row_start: IntValue<'ctx>,
    row_limit: IntValue<'ctx>,
) -> Result<()> {
    if vector.of.layout.warps_n != 1 {
        return unsupported("row vectors are stored from layouts with whole rows per warp (warps_n = 1)");
    }
    let place = ThreadPlace::new(kb, &vector.of)?;
    let first_of_quad = kb.builder().build_int_compare(inkwell::IntPredicate::EQ, place.pair_col, kb.i32(0), "")?;
    for slot in 0..vector.slot_count() {
        let row = kb.add(row_start, place.row(kb, slot)?)?;
        let inside = kb.and(first_of_quad, kb.lt(row, row_limit)?)?;
        let value = vector.get(kb, slot)?;
        kb.if_then(inside, |kb| kb.store_f32(kb.element_pointer(base, Elem::F32, kb.to_i64(row)?)?, value))?;
    }
    Ok(())
}
