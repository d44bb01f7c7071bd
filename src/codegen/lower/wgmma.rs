//! The kernel IR's 128-byte-swizzled shared tiles ([`Layout::Swizzled128B`]): where a window's
//! elements live (for `Copy`), and `Mma` with a swizzled B operand as warpgroup MMA: one
//! `wgmma.mma_async m64nNk16` per warpgroup and k16 step, from matrix descriptors of the
//! tiles' layout type ([`Swizzle128BTile`]), waited for before the statement ends so that the
//! IR's synchronous `Mma` semantics hold.
//!
//! Proxies: wgmma reads shared memory through the async proxy, the copies write it through the
//! generic one; the lowering of `Barrier` in a kernel with swizzled tiles fences the two
//! (`fence.proxy.async.shared::cta`) before `bar.sync`, so what one thread wrote before a barrier
//! is what every warpgroup's wgmma reads after it, and a wgmma's reads end before later copies
//! (every `Mma` waits for its wgmma; the verifier puts a barrier between it and the next write).

use inkwell::values::{BasicValueEnum, FloatValue, IntValue, PointerValue};

use super::expr::ElementSite;
use super::{Lowering, TileStorage};
use crate::codegen::hopper::copy::descriptor;
use crate::codegen::hopper::{Accumulate, WgmmaA, WgmmaShape};
use crate::codegen::{Elem, KernelBuilder, Result, unsupported};
use crate::ir::kernel::layout::{ATOM_ROWS, OperandMajor, SWIZZLE_BYTES, Swizzle128BTile, WGMMA_K};
use crate::codegen::tile::{MmaAccumulator, OperandAFragments, for_each_accumulator_pair};
use crate::ir::kernel::{ANCHOR_BYTES, Expr, Layout, Stmt, TileId, TileView};

/// Rows of one wgmma (a warpgroup's band of the accumulator).
const WARPGROUP_ROWS: u32 = 64;
const WARPS_PER_WARPGROUP: u32 = 4;

/// A window of a swizzled tile: whole 8-row atoms and whole panels (the verifier's rule), so its
/// first line is where the tile's layout puts row `row0` of panel `col0 / 64`.
pub(super) struct SwizzledWindow<'ctx> {
    base: PointerValue<'ctx>,
    /// The whole tile: its panels are `panel_bytes` apart whatever the window.
    tile: Swizzle128BTile,
}

impl<'ctx> SwizzledWindow<'ctx> {
    pub(super) fn base(&self) -> PointerValue<'ctx> {
        self.base
    }
    pub(super) fn tile(&self) -> Swizzle128BTile {
        self.tile
    }
    pub(super) fn elem(&self) -> Elem {
        self.tile.elem.into()
    }

    /// Address of window element (row, col) (i32 each): panel, line, then the 16-byte chunk
    /// at `chunk ^ (row % 8)` (the window starts on an atom, so `row % 8` is the tile's).
    pub(super) fn element_address(&self, kb: &KernelBuilder<'_, 'ctx>, row: IntValue<'ctx>, col: IntValue<'ctx>) -> Result<PointerValue<'ctx>> {
        let panel_cols = kb.i32(self.tile.panel_cols() as i64);
        let chunk_elems = kb.i32(self.tile.chunk_elems() as i64);
        let in_panel = kb.rem(col, panel_cols)?;
        let chunk = kb.builder().build_xor(kb.div(in_panel, chunk_elems)?, kb.rem(row, kb.i32(ATOM_ROWS as i64))?, "")?;
        let bytes = [
            kb.mul(kb.div(col, panel_cols)?, kb.i32(self.tile.panel_bytes() as i64))?,
            kb.mul(row, kb.i32(SWIZZLE_BYTES as i64))?,
            kb.mul(chunk, kb.i32(16))?,
            kb.mul(kb.rem(in_panel, chunk_elems)?, kb.i32(self.elem().bytes() as i64))?,
        ];
        let offset = bytes[1..].iter().try_fold(bytes[0], |sum, part| kb.add(sum, *part))?;
        kb.byte_pointer(self.base, offset)
    }
}

impl<'k, 'ctx> Lowering<'k, 'ctx> {
    /// `Convert` of accumulator `src` into the swizzled window `dst` (16-bit elements): each
    /// thread's pairs of adjacent columns rounded and packed into one 32-bit store at their
    /// swizzled address (a pair never straddles a 16-byte chunk), then
    /// `fence.proxy.async.shared::cta`: the stores go through the generic proxy and a wgmma
    /// reads through the async one, so the barrier that hands the tile over must come after the
    /// fence (inside roles that barrier is a named one, which does not fence).
    pub(super) fn convert_to_swizzled(&self, kb: &KernelBuilder<'_, 'ctx>, dst: &TileView, src: TileId) -> Result<()> {
        let window = self.swizzled_window(kb, dst)?;
        let accumulator = self.accumulator(src)?;
        if (accumulator.shape.rows, accumulator.shape.cols) != (dst.rows, dst.cols) {
            return unsupported(format!(
                "convert of a {}×{} accumulator into a {}×{} swizzled window",
                accumulator.shape.rows, accumulator.shape.cols, dst.rows, dst.cols
            ));
        }
        let elem = window.elem();
        for_each_accumulator_pair(kb, accumulator, |kb, pair| {
            let address = window.element_address(kb, pair.row, pair.col)?;
            kb.store_int(address, kb.pack_half2(elem, pair.low, pair.high)?)
        })?;
        kb.fence_proxy_async_shared()
    }

    pub(super) fn swizzled_window(&self, kb: &KernelBuilder<'_, 'ctx>, view: &TileView) -> Result<SwizzledWindow<'ctx>> {
        let decl = self.kernel.tile(view.tile);
        let (TileStorage::Shared { offset }, Some(tile)) = (&self.tiles[view.tile.0], decl.ty.swizzled()) else {
            return unsupported(format!("%{} is not a swizzled shared tile", decl.name));
        };
        let tile = tile?;
        let Expr::Int(col0) = view.col0 else {
            return unsupported(format!("a window of swizzled %{} at a runtime column", decl.name));
        };
        let panel_offset = (col0 as u32 / tile.panel_cols()) * tile.panel_bytes();
        let row0 = self.eval(kb, &view.row0, &ElementSite::None)?.int()?;
        let line_offset = kb.mul(row0, kb.i32(SWIZZLE_BYTES as i64))?;
        let tile_base = self.shared_tile_base(kb, *offset + panel_offset)?;
        Ok(SwizzledWindow { base: kb.byte_pointer(tile_base, line_offset)?, tile })
    }

    /// `Mma { acc, a, b }` with a swizzled B: `acc += a · op(b)` on the tensor cores, each
    /// warpgroup its 64 rows of `acc` (the verifier checked the warp grid and the shapes), issued
    /// and waited for.
    pub(super) fn wgmma(&self, kb: &KernelBuilder<'_, 'ctx>, acc: &TileView, a: &TileView, b: &TileView, a_transposed: bool, b_transposed: bool) -> Result<()> {
        let (values, a_registers) = self.wgmma_issue(kb, acc, a, b, a_transposed, b_transposed, true, false)?;
        kb.wgmma_commit_group()?;
        // The A fragments pass through the wait with the accumulators: wgmma reads them until
        // it completes, so nothing may reuse their registers before.
        let mut pending: Vec<BasicValueEnum<'ctx>> = values.iter().map(|value| (*value).into()).collect();
        pending.extend(a_registers.iter().map(|register| BasicValueEnum::from(*register)));
        let waited = kb.wgmma_wait(0, &pending)?;
        let values: Vec<_> = waited[..values.len()].iter().map(|value| value.into_float_value()).collect();
        self.accumulator(acc.tile)?.store_all(kb, &values)
    }

    /// A run of consecutive `MmaAsync` statements: one fence over every accumulator they add to
    /// (so that no register write, not even a zero an accumulator starts from, falls between it
    /// and the wgmma that read it), then each statement's wgmma in order, left in flight in the
    /// open group. The accumulator slots take the values the instructions return, which the
    /// group's wait ties down. The accumulators in `zeroed` start at zero: the first wgmma into
    /// each overwrites it, and they stay out of the fence.
    pub(super) fn wgmma_async_run(&self, kb: &KernelBuilder<'_, 'ctx>, run: &[&Stmt], zeroed: &[TileId]) -> Result<()> {
        let mut tiles: Vec<TileId> = Vec::new();
        for stmt in run {
            if let Stmt::MmaAsync { acc, .. } = stmt
                && !tiles.contains(&acc.tile)
                && !zeroed.contains(&acc.tile)
            {
                tiles.push(acc.tile);
            }
        }
        // Register operands a: their packing must land before the fence too.
        for stmt in run {
            if let Stmt::MmaAsync { a, .. } = stmt
                && matches!(self.tiles[a.tile.0], TileStorage::AsyncOperandA { .. })
                && !tiles.contains(&a.tile)
            {
                tiles.push(a.tile);
            }
        }
        self.pass_registers(kb, &tiles, |kb, values| kb.wgmma_fence(values))?;
        let mut started: Vec<TileId> = Vec::new();
        for stmt in run {
            let Stmt::MmaAsync { acc, a, b, a_transposed, b_transposed } = stmt else {
                return unsupported("a run of asynchronous MMAs holds another statement");
            };
            let overwrite = zeroed.contains(&acc.tile) && !started.contains(&acc.tile);
            started.push(acc.tile);
            let (values, _) = self.wgmma_issue(kb, acc, a, b, *a_transposed, *b_transposed, false, overwrite)?;
            self.accumulator(acc.tile)?.store_all(kb, &values)?;
            let operand = matches!(self.tiles[a.tile.0], TileStorage::AsyncOperandA { .. }).then_some(a.tile);
            self.note_in_flight([acc.tile].into_iter().chain(operand));
        }
        Ok(())
    }

    /// `MmaWait`: `wgmma.wait_group pending` with every accumulator an asynchronous MMA of the
    /// kernel writes, and every register operand one reads, passed through it, so that no read of
    /// an accumulator moves above the wait and no operand's registers are reused before it.
    /// With `after`, a volatile store of the sum of the thread's elements of that tile to the
    /// thread's anchor word comes first: ptxas keeps the wait below it.
    pub(super) fn wgmma_wait(&self, kb: &KernelBuilder<'_, 'ctx>, pending: u32, after: Option<TileId>) -> Result<()> {
        let tiles = self.in_flight.borrow().clone();
        if pending == 0 {
            self.in_flight.borrow_mut().clear();
        }
        if let Some(tile) = after {
            let values: Vec<FloatValue<'ctx>> = match &self.tiles[tile.0] {
                TileStorage::Rows(rows) => (0..rows.of.row_slots()).map(|slot| rows.get(kb, slot)).collect::<Result<_>>()?,
                _ => self.accumulator(tile)?.load_all(kb)?,
            };
            let sum = values.iter().skip(1).try_fold(values[0], |sum, value| kb.fadd(sum, *value))?;
            let offset = self.kernel.anchor_offset() as i64;
            let word = kb.add(kb.i32(offset), kb.mul(kb.cta_thread_index()?, kb.i32(ANCHOR_BYTES as i64))?)?;
            let base = self.shared_base.ok_or_else(|| crate::codegen::CodegenError::Llvm("an anchor without shared memory".into()))?;
            let address = kb.shared_address(kb.byte_pointer(base, word)?)?;
            kb.inline_ptx(None, "st.volatile.shared.f32 [$0], $1;", "r,f,~{memory}", &[address.into(), sum.into()], true)?;
        }
        self.pass_registers(kb, &tiles, |kb, values| kb.wgmma_wait(pending, values))
    }

    /// Loads every register of `tiles` (accumulators, slot-held operands a), passes them through
    /// `through` (an instruction that ties them down) and stores what it returns back.
    fn pass_registers(
        &self,
        kb: &KernelBuilder<'_, 'ctx>,
        tiles: &[TileId],
        through: impl FnOnce(&KernelBuilder<'_, 'ctx>, &[BasicValueEnum<'ctx>]) -> Result<Vec<BasicValueEnum<'ctx>>>,
    ) -> Result<()> {
        let mut values: Vec<BasicValueEnum<'ctx>> = Vec::new();
        let mut counts = Vec::new();
        for tile in tiles {
            let loaded: Vec<BasicValueEnum<'ctx>> = match &self.tiles[tile.0] {
                TileStorage::AsyncOperandA { slots } => {
                    slots.iter().map(|slot| Ok(kb.load_f32(*slot)?.into())).collect::<Result<_>>()?
                }
                _ => self.accumulator(*tile)?.load_all(kb)?.into_iter().map(BasicValueEnum::from).collect(),
            };
            counts.push(loaded.len());
            values.extend(loaded);
        }
        let passed = through(kb, &values)?;
        let mut rest = &passed[..];
        for (tile, count) in tiles.iter().zip(counts) {
            let values: Vec<FloatValue<'ctx>> = rest[..count].iter().map(|value| value.into_float_value()).collect();
            match &self.tiles[tile.0] {
                TileStorage::AsyncOperandA { slots } => {
                    for (slot, value) in slots.iter().zip(&values) {
                        kb.store_f32(*slot, *value)?;
                    }
                }
                _ => self.accumulator(*tile)?.store_all(kb, &values)?,
            }
            rest = &rest[count..];
        }
        Ok(())
    }

    /// The A fragments of a slot-held operand tile, loaded from its slots.
    fn async_operand_a(&self, kb: &KernelBuilder<'_, 'ctx>, tile: TileId) -> Result<OperandAFragments<'ctx>> {
        let TileStorage::AsyncOperandA { slots } = &self.tiles[tile.0] else {
            return unsupported(format!("%{} is not an operand of asynchronous MMAs", self.tile_name(tile)));
        };
        let ty = self.kernel.tile(tile).ty;
        let Layout::MmaOperandA { warps_m, warps_n } = ty.layout else {
            return unsupported(format!("%{} is not an mma_a tile", self.tile_name(tile)));
        };
        let registers = slots
            .iter()
            .map(|slot| Ok(kb.builder().build_bit_cast(kb.load_f32(*slot)?, kb.context().i32_type(), "")?.into_int_value()))
            .collect::<Result<Vec<IntValue<'ctx>>>>()?;
        Ok(OperandAFragments::from_registers(Elem::from(ty.elem), ty.rows, ty.cols, MmaAccumulator { warps_m, warps_n }, registers))
    }

    /// Issues `acc += op(a) · op(b)` (fence, one wgmma per k16 step), or `acc = op(a) · op(b)`
    /// when `overwrite` (the first step ignores the accumulator); returns the accumulator values
    /// and the A registers the instructions read. A transposed a is a shared [K, M] tile read
    /// MN-major.
    #[allow(clippy::too_many_arguments)]
    fn wgmma_issue(
        &self,
        kb: &KernelBuilder<'_, 'ctx>,
        acc: &TileView,
        a: &TileView,
        b: &TileView,
        a_transposed: bool,
        b_transposed: bool,
        fence: bool,
        overwrite: bool,
    ) -> Result<(Vec<FloatValue<'ctx>>, Vec<IntValue<'ctx>>)> {
        self.whole_register_tile(acc)?;
        let accumulator = self.accumulator(acc.tile)?;
        let b_window = self.swizzled_window(kb, b)?;
        let shape = WgmmaShape { n: acc.cols, elem: b_window.elem() };
        let b_address = kb.shared_address(b_window.base)?;
        // B [N, K] (Kᵀ of Q·Kᵀ) has its lines along K; B [K, N] (V of P·V) along N.
        let b_major = if b_transposed { OperandMajor::K } else { OperandMajor::MN };
        let steps = if a_transposed { a.rows } else { a.cols } / WGMMA_K;
        let b_descriptor = |step: u32| -> Result<IntValue<'ctx>> {
            let slice = match b_major {
                OperandMajor::K => b_window.tile.k_major_descriptor(0, step * WGMMA_K)?,
                OperandMajor::MN => b_window.tile.mn_major_descriptor(step * WGMMA_K, 0)?,
            };
            descriptor(kb, b_address, slice.constant_bits(), slice.start_offset)
        };
        enum AOperand<'ctx> {
            Shared { address: IntValue<'ctx>, tile: Swizzle128BTile },
            Registers(Vec<[IntValue<'ctx>; 4]>),
        }
        let a_operand = match &self.tiles[a.tile.0] {
            TileStorage::Shared { .. } => {
                let window = self.swizzled_window(kb, a)?;
                // Warpgroup g multiplies rows 64g .. 64g + 63 of op(A) (a warp-uniform value):
                // 64 lines of A, or, transposed, its 64 columns: one panel of 16-bit elements.
                let warpgroup = kb.warp_uniform(kb.div(kb.warp_index()?, kb.i32(WARPS_PER_WARPGROUP as i64))?)?;
                let band_bytes = if a_transposed { window.tile.panel_bytes() } else { WARPGROUP_ROWS * SWIZZLE_BYTES };
                if a_transposed && window.tile.panel_cols() != WARPGROUP_ROWS {
                    return unsupported("a transposed wgmma operand a needs 16-bit elements (a warpgroup's 64 rows in one panel)");
                }
                let band = kb.mul(warpgroup, kb.i32(band_bytes as i64))?;
                AOperand::Shared { address: kb.add(kb.shared_address(window.base)?, band)?, tile: window.tile }
            }
            TileStorage::OperandA(Some(fragments)) => {
                self.whole_register_tile(a)?;
                AOperand::Registers((0..steps).map(|step| fragments.band_k_step(step)).collect::<Result<_>>()?)
            }
            TileStorage::AsyncOperandA { .. } => {
                self.whole_register_tile(a)?;
                let fragments = self.async_operand_a(kb, a.tile)?;
                AOperand::Registers((0..steps).map(|step| fragments.band_k_step(step)).collect::<Result<_>>()?)
            }
            _ => return unsupported(format!("wgmma reads operand a %{} before it is filled", self.tile_name(a.tile))),
        };
        // The fence orders this thread's register writes (accumulator, A fragments) before the
        // wgmma that read them; the values come back from it so none is computed below it.
        let mut fenced: Vec<BasicValueEnum<'ctx>> = if overwrite {
            let undefined = kb.context().f32_type().get_undef();
            vec![undefined.into(); (accumulator.shape.fragments_m() * accumulator.shape.fragments_n() * 4) as usize]
        } else {
            accumulator.load_all(kb)?.into_iter().map(Into::into).collect()
        };
        let acc_count = fenced.len();
        if let AOperand::Registers(steps) = &a_operand {
            fenced.extend(steps.iter().flatten().map(|register| BasicValueEnum::from(*register)));
        }
        let fenced = if fence { kb.wgmma_fence(&fenced)? } else { fenced };
        let mut values: Vec<_> = fenced[..acc_count].iter().map(|value| value.into_float_value()).collect();
        let a_registers: Vec<IntValue<'ctx>> = fenced[acc_count..].iter().map(|value| value.into_int_value()).collect();
        for step in 0..steps {
            let a_step = match &a_operand {
                AOperand::Shared { address, tile } => {
                    let (slice, major) = if a_transposed {
                        (tile.mn_major_descriptor(step * WGMMA_K, 0)?, OperandMajor::MN)
                    } else {
                        (tile.k_major_descriptor(0, step * WGMMA_K)?, OperandMajor::K)
                    };
                    WgmmaA::Shared(descriptor(kb, *address, slice.constant_bits(), slice.start_offset)?, major)
                }
                AOperand::Registers(_) => {
                    let at = (step * 4) as usize;
                    WgmmaA::Registers([a_registers[at], a_registers[at + 1], a_registers[at + 2], a_registers[at + 3]])
                }
            };
            let accumulate = if overwrite && step == 0 { Accumulate::Overwrite } else { Accumulate::Add };
            values = kb.wgmma(shape, a_step, b_descriptor(step)?, b_major, accumulate, &values)?;
        }
        Ok((values, a_registers))
    }

}
