//! The kernel IR's warp-specialization statements on sm_90a: mbarrier rings (placed after the
//! tiles, initialized by thread 0 before the body), roles (the warpgroup index broadcast from
//! lane 0 so that ptxas keeps the role branches and their loop state uniform; `setmaxnreg` per
//! role; tile statements collective over the role's warpgroup), `elect` (the warpgroup's thread
//! 0), TMA box copies per 128-byte panel, arrivals and parity waits, named barriers.

use inkwell::values::PointerValue;

use super::{Binding, Lowering};
use super::expr::{ElementSite, Value};
use crate::codegen::{KernelBuilder, Result, unsupported};
use crate::ir::kernel::{BarrierRef, Expr, MBARRIER_BYTES, REGISTERS_PER_CTA, Role, Stmt, TileView, WARPGROUP_THREADS};

impl<'k, 'ctx> Lowering<'k, 'ctx> {
    /// Thread 0 initializes every mbarrier of the kernel; a CTA barrier publishes them.
    pub(super) fn init_barriers(&self, kb: &KernelBuilder<'_, 'ctx>) -> Result<()> {
        let kernel = self.kernel;
        if kernel.barriers.is_empty() {
            return Ok(());
        }
        kb.if_then(kb.lt(kb.cta_thread_index()?, kb.i32(1))?, |kb| {
            for (ring, decl) in kernel.barriers.iter().enumerate() {
                let base = kernel.barrier_offset(crate::ir::kernel::BarrierId(ring));
                for slot in 0..decl.slots as usize {
                    let pointer = self.shared_byte(kb, kb.i32((base + slot * MBARRIER_BYTES) as i64))?;
                    kb.mbarrier_init(pointer, decl.arrivals)?;
                }
            }
            Ok(())
        })?;
        kb.barrier()
    }

    fn shared_byte(&self, kb: &KernelBuilder<'_, 'ctx>, offset: inkwell::values::IntValue<'ctx>) -> Result<PointerValue<'ctx>> {
        let base = self.shared_base.ok_or_else(|| crate::codegen::CodegenError::Llvm("mbarriers without shared memory".into()))?;
        kb.byte_pointer(base, offset)
    }

    /// Slot `barrier.slot` (modulo the ring) of a barrier ring.
    pub(super) fn barrier_pointer(&self, kb: &KernelBuilder<'_, 'ctx>, barrier: &BarrierRef) -> Result<PointerValue<'ctx>> {
        let slots = self.kernel.barrier(barrier.ring).slots;
        let slot = kb.rem(self.eval(kb, &barrier.slot, &ElementSite::None)?.int()?, kb.i32(slots as i64))?;
        let offset = kb.add(
            kb.i32(self.kernel.barrier_offset(barrier.ring) as i64),
            kb.mul(slot, kb.i32(MBARRIER_BYTES as i64))?,
        )?;
        self.shared_byte(kb, offset)
    }

    /// Each role on its warpgroups, in list order.
    pub(super) fn roles(&mut self, kb: &KernelBuilder<'_, 'ctx>, roles: &[Role]) -> Result<()> {
        let warpgroup =
            kb.warp_uniform(kb.div(kb.cta_thread_index()?, kb.i32(WARPGROUP_THREADS as i64))?)?;
        // What `.maxntid` gives each thread (ptxas allocates in units of 8).
        let allotment = REGISTERS_PER_CTA / self.kernel.threads() / 8 * 8;
        self.role_chain(kb, roles, 0, warpgroup, allotment)
    }

    fn role_chain(
        &mut self,
        kb: &KernelBuilder<'_, 'ctx>,
        roles: &[Role],
        first: u32,
        warpgroup: inkwell::values::IntValue<'ctx>,
        allotment: u32,
    ) -> Result<()> {
        let Some((role, rest)) = roles.split_first() else { return Ok(()) };
        let run = |this: &mut Self, kb: &KernelBuilder<'_, 'ctx>| -> Result<()> {
            if role.registers != allotment {
                kb.set_max_registers(role.registers > allotment, role.registers)?;
            }
            kb.set_thread_group(Some(WARPGROUP_THREADS));
            // Each role's warpgroups start with no MMA in flight.
            this.in_flight.borrow_mut().clear();
            this.scope.push(Binding { name: role.index.clone(), value: Value::Int(kb.sub(warpgroup, kb.i32(first as i64))?), multiple_of: 1 });
            let lowered = this.block(kb, &role.body);
            this.scope.pop();
            kb.set_thread_group(None);
            lowered
        };
        if rest.is_empty() {
            return run(self, kb);
        }
        let inside = kb.lt(warpgroup, kb.i32((first + role.warpgroups) as i64))?;
        let this = std::cell::RefCell::new(&mut *self);
        kb.if_else(
            inside,
            |kb| run(&mut this.borrow_mut(), kb),
            |kb| this.borrow_mut().role_chain(kb, rest, first + role.warpgroups, warpgroup, allotment),
        )
    }

    /// The body on the role warpgroup's thread 0.
    pub(super) fn elect(&mut self, kb: &KernelBuilder<'_, 'ctx>, body: &[Stmt]) -> Result<()> {
        let elected = kb.lt(kb.thread_index()?, kb.i32(1))?;
        let this = std::cell::RefCell::new(&mut *self);
        kb.if_then(elected, |kb| this.borrow_mut().block(kb, body))
    }

    /// One TMA box per 128-byte panel of the window, panel p at coordinate 0 + p · panel columns.
    pub(super) fn tma_load(
        &self,
        kb: &KernelBuilder<'_, 'ctx>,
        dst: &TileView,
        map: &str,
        coords: &[Expr],
        barrier: &BarrierRef,
    ) -> Result<()> {
        let window = self.swizzled_window(kb, dst)?;
        let map_address = kb.tensor_map_param_address(map)?;
        let mut coordinates = coords
            .iter()
            .map(|c| self.eval(kb, c, &ElementSite::None)?.int())
            .collect::<Result<Vec<_>>>()?;
        if coordinates.is_empty() {
            return unsupported("a TMA copy without coordinates");
        }
        let barrier = self.barrier_pointer(kb, barrier)?;
        let first_column = coordinates[0];
        let tile = window.tile();
        for panel in 0..dst.cols / tile.panel_cols() {
            let destination = kb.byte_pointer(window.base(), kb.i32((panel * tile.panel_bytes()) as i64))?;
            coordinates[0] = kb.add(first_column, kb.i32((panel * tile.panel_cols()) as i64))?;
            kb.cp_async_bulk_tensor(destination, map_address, &coordinates, barrier)?;
        }
        Ok(())
    }
}
