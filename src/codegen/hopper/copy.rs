//! What the lowering of the Hopper kernels needs to point wgmma at swizzled tiles: the
//! 1024-aligned base of the tiles and the runtime matrix descriptor of a tile.

use inkwell::values::IntValue;

use crate::ir::kernel::layout::TILE_ALIGNMENT;
use crate::codegen::{CodegenError, KernelBuilder, Result};

/// The first 1024-byte-aligned shared-window address at or after `raw_address`: the 128-byte
/// swizzle is a function of address bits 4..9, so swizzled tiles start there.
pub(crate) fn aligned_tile_address<'ctx>(kb: &KernelBuilder<'_, 'ctx>, raw_address: IntValue<'ctx>) -> Result<IntValue<'ctx>> {
    let alignment = TILE_ALIGNMENT as i64;
    kb.and(kb.add(raw_address, kb.i32(alignment - 1))?, kb.i32(-alignment))
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
