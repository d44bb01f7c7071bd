//! What the Hopper kernels share to fill their swizzled tiles and to point wgmma at them:
//! cp.async of row-major global rows into a [`Swizzle128BTile`], and the runtime matrix
//! descriptor of a tile.

use inkwell::values::{IntValue, PointerValue};

use crate::ir::kernel::layout::{Swizzle128BTile, TILE_ALIGNMENT};
use crate::codegen::{CodegenError, KernelBuilder, Result};

/// The first 1024-byte-aligned shared-window address at or after `raw_address`: the 128-byte
/// swizzle is a function of address bits 4..9, so swizzled tiles start there.
pub(crate) fn aligned_tile_address<'ctx>(kb: &KernelBuilder<'_, 'ctx>, raw_address: IntValue<'ctx>) -> Result<IntValue<'ctx>> {
    let alignment = TILE_ALIGNMENT as i64;
    kb.and(kb.add(raw_address, kb.i32(alignment - 1))?, kb.i32(-alignment))
}

/// Rows of a row-major global tensor: the pointer to row 0, column 0 of the view and the element
/// stride between rows.
pub(super) struct RowSource<'ctx> {
    pub base: PointerValue<'ctx>,
    pub row_stride: u32,
}

/// Which rows and columns of a [`RowSource`] exist; the rest of a tile reads as zeros.
pub(super) struct Bounds<'ctx> {
    /// Rows below this one are zero (a negative row index, e.g. a shifted or padded window).
    /// `None` when the tile never starts below row 0.
    pub first_row: Option<IntValue<'ctx>>,
    /// Rows at or past this one are zero.
    pub row_limit: IntValue<'ctx>,
    /// The tile's first column and the row's width: 16-byte chunks at or past the width are
    /// zero. `None` when the tile always lies inside the row.
    pub columns: Option<(IntValue<'ctx>, u32)>,
}

/// cp.async of rows `row_start ..` (`tile.rows` of them, zero-filled outside `bounds`) of `rows`
/// into a swizzled tile at `tile_base + byte_offset`, by `threads` threads of which the calling
/// one is number `thread`. Each thread copies the same 16-byte column chunk of rows
/// `threads / chunks_per_row` apart, so its addresses differ by constants from one row to the
/// next (cheap in registers) and its swizzled position stays the same (that step is a multiple of
/// the 8-row swizzle atom).
#[allow(clippy::too_many_arguments)]
pub(super) fn copy_tile_async<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    rows: &RowSource<'ctx>,
    row_start: IntValue<'ctx>,
    bounds: &Bounds<'ctx>,
    tile: &Swizzle128BTile,
    tile_base: PointerValue<'ctx>,
    byte_offset: u32,
    thread: IntValue<'ctx>,
    threads: u32,
) -> Result<()> {
    let chunks_per_row = tile.cols / tile.chunk_elems();
    if !threads.is_multiple_of(chunks_per_row)
        || !(threads / chunks_per_row).is_multiple_of(8)
        || !tile.rows.is_multiple_of(threads / chunks_per_row)
    {
        return Err(CodegenError::Unsupported(format!(
            "{threads} threads do not copy a {}×{} tile in whole 8-row steps",
            tile.rows, tile.cols
        )));
    }
    let rows_per_round = threads / chunks_per_row;
    let first_row = kb.div(thread, kb.i32(chunks_per_row as i64))?;
    let chunk_col = kb.rem(thread, kb.i32(chunks_per_row as i64))?;
    // The swizzled position (see `Swizzle128BTile::chunk_offset`).
    let panel = kb.div(chunk_col, kb.i32(8))?;
    let in_line = kb.builder().build_xor(kb.rem(chunk_col, kb.i32(8))?, kb.rem(first_row, kb.i32(8))?, "")?;
    let shared_first = kb.add(
        kb.add(kb.mul(panel, kb.i32(tile.panel_bytes() as i64))?, kb.mul(first_row, kb.i32(128))?)?,
        kb.add(kb.mul(in_line, kb.i32(16))?, kb.i32(byte_offset as i64))?,
    )?;
    let shared_first = kb.byte_pointer(tile_base, shared_first)?;
    let global_first_row = kb.add(row_start, first_row)?;
    let chunk_start = kb.mul(chunk_col, kb.i32(tile.chunk_elems() as i64))?;
    let (column_inside, global_col) = match bounds.columns {
        None => (None, chunk_start),
        Some((col_start, width)) => {
            let col = kb.add(col_start, chunk_start)?;
            (Some(kb.lt(col, kb.i32(width as i64))?), col)
        }
    };
    let i64_type = kb.context().i64_type();
    // Only a tile that may start below row 0 needs the sign.
    let row_index_i64 = match bounds.first_row {
        None => kb.to_i64(global_first_row)?,
        Some(_) => kb.builder().build_int_s_extend(global_first_row, i64_type, "")?,
    };
    let global_first = kb.element_pointer(
        rows.base,
        tile.elem.into(),
        kb.builder().build_int_add(
            kb.builder().build_int_mul(
                row_index_i64,
                i64_type.const_int(rows.row_stride as u64, false),
                "",
            )?,
            kb.to_i64(global_col)?,
            "",
        )?,
    )?;
    for round in 0..tile.rows / rows_per_round {
        let row_step = round * rows_per_round;
        let shared_address = kb.byte_pointer(shared_first, kb.i32((row_step * 128) as i64))?;
        let global_row = kb.add(global_first_row, kb.i32(row_step as i64))?;
        let mut inside = kb.lt(global_row, bounds.row_limit)?;
        if let Some(first_valid) = bounds.first_row {
            inside = kb.and(inside, kb.le(first_valid, global_row)?)?;
        }
        if let Some(column_inside) = column_inside {
            inside = kb.and(inside, column_inside)?;
        }
        let step_bytes = row_step as u64 * rows.row_stride as u64 * tile.elem.size_bytes() as u64;
        let in_bounds = kb.byte_pointer(global_first, i64_type.const_int(step_bytes, false))?;
        // Out of bounds, point at the view's first element so no stray address is ever formed.
        let address = kb.builder().build_select(inside, in_bounds, rows.base, "")?.into_pointer_value();
        let bytes = kb.select_int(inside, kb.i32(16), kb.i32(0))?;
        kb.cp_async_16(shared_address, address, bytes)?;
    }
    Ok(())
}

/// A wgmma descriptor for the runtime tile base `tile_address` (a 16-byte aligned shared-window
/// address; tiles are 1024-aligned): the constant fields plus `(tile_address + start_offset) >> 4`
/// in the start-address field. Built as `tile_address >> 4` (shared by every descriptor of the
/// tile) plus a constant in the low word, the high word a constant: one integer add per
/// descriptor where a 64-bit add chain per wgmma had kept the issuing warps busy (BENCHMARKS.md).
/// The start field (bits 0..13) cannot carry into the leading-offset field: shared-window
/// addresses stay below 2^18.
pub(crate) fn descriptor<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    tile_address: IntValue<'ctx>,
    constant_bits: u64,
    start_offset: u32,
) -> Result<IntValue<'ctx>> {
    if !start_offset.is_multiple_of(16) || constant_bits & 0x3fff != 0 {
        return Err(CodegenError::Llvm(format!(
            "a descriptor start offset of {start_offset} bytes is not a multiple of 16, or its constant bits {constant_bits:#x} hold a start address"
        )));
    }
    let builder = kb.builder();
    let tile_start = builder.build_right_shift(tile_address, kb.i32(4), false, "")?;
    let low_constant = (constant_bits & 0xffff_ffff) + (start_offset >> 4) as u64;
    let low = kb.add(tile_start, kb.i32(low_constant as i64))?;
    let i64_type = kb.context().i64_type();
    let high = i64_type.const_int(constant_bits & !0xffff_ffff, false);
    Ok(builder.build_or(builder.build_int_z_extend(low, i64_type, "")?, high, "")?)
}
