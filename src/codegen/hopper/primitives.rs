//! Hopper instructions as inline PTX: warpgroup MMA and its fences, `mbarrier` on shared `b64`,
//! the async-proxy fence, `setmaxnreg`, named barriers and the 2-D TMA copy.
//!
//! wgmma runs asynchronously to the issuing threads, but LLVM sees inline assembly as finished
//! when it returns. So [`KernelBuilder::wgmma_fence`] and [`KernelBuilder::wgmma_wait`] take the
//! accumulator registers and hand them back as their own outputs: code that reads an accumulator
//! after the wait, or writes it before the fence, cannot be moved across them (the same role as
//! CUTLASS's `warpgroup_fence_operand`). All of them are side-effecting so that they keep their
//! order among themselves.

use inkwell::IntPredicate;
use inkwell::types::BasicTypeEnum;
use inkwell::values::{BasicValueEnum, CallSiteValue, FloatValue, IntValue, PointerValue};

use crate::ir::kernel::layout::OperandMajor;
use crate::codegen::{CodegenError, Elem, KernelBuilder, Result, unsupported};

/// The wgmma shapes this emitter uses: `m64nNk16` with 16-bit inputs and f32 accumulators.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct WgmmaShape {
    pub n: u32,
    pub elem: Elem,
}

impl WgmmaShape {
    pub fn validate(&self) -> Result<()> {
        if self.elem == Elem::F32 {
            return unsupported("wgmma here multiplies bf16 or f16 inputs");
        }
        if self.n < 8 || self.n > 256 || !self.n.is_multiple_of(8) {
            return unsupported(format!("wgmma m64nNk16 needs N in 8..=256, a multiple of 8, not {}", self.n));
        }
        Ok(())
    }

    /// f32 accumulator registers per thread: the 64×N tile over 128 threads.
    pub fn accumulator_registers(&self) -> u32 {
        self.n / 2
    }
}

/// The A operand of one wgmma.
#[derive(Debug, Clone, Copy)]
pub enum WgmmaA<'ctx> {
    /// A descriptor (i64) of a 64×16 slice in shared memory, its lines along K (`K`) or along
    /// M (`MN`: A stored transposed, read with the transpose bit).
    Shared(IntValue<'ctx>, OperandMajor),
    /// Four b16x2 registers per thread in the m64k16 A-fragment layout: warp `w` holds rows
    /// `16w .. 16w + 15`, like an `mma.m16n8k16` A fragment.
    Registers([IntValue<'ctx>; 4]),
}

/// Whether a wgmma adds to its accumulator or overwrites it (`scale-d`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accumulate {
    Add,
    Overwrite,
}

impl<'m, 'ctx> KernelBuilder<'m, 'ctx> {
    fn struct_outputs(&self, call: CallSiteValue<'ctx>, count: usize) -> Result<Vec<BasicValueEnum<'ctx>>> {
        let value = call
            .try_as_basic_value()
            .basic()
            .ok_or_else(|| CodegenError::Llvm("inline PTX returned nothing".to_string()))?;
        if count == 1 {
            return Ok(vec![value]);
        }
        let value = value.into_struct_value();
        (0..count as u32).map(|index| Ok(self.builder().build_extract_value(value, index, "")?)).collect()
    }

    /// Inline PTX that reads and rewrites `registers` (f32 or i32) in place through tied operands
    /// and has side effects; returns the registers as the instruction leaves them.
    fn ptx_passing_registers(
        &self,
        assembly: &str,
        registers: &[BasicValueEnum<'ctx>],
    ) -> Result<Vec<BasicValueEnum<'ctx>>> {
        if registers.is_empty() {
            self.inline_ptx(None, assembly, "~{memory}", &[], true)?;
            return Ok(Vec::new());
        }
        let count = registers.len();
        let types: Vec<BasicTypeEnum<'ctx>> = registers.iter().map(|value| value.get_type()).collect();
        let result: BasicTypeEnum =
            if count == 1 { types[0] } else { self.context().struct_type(&types, false).into() };
        let mut constraints = Vec::with_capacity(2 * count + 1);
        for value in registers {
            constraints.push(match value {
                BasicValueEnum::FloatValue(_) => "=f".to_string(),
                BasicValueEnum::IntValue(_) => "=r".to_string(),
                _ => return unsupported("wgmma fences pass f32 or i32 registers"),
            });
        }
        constraints.extend((0..count).map(|index| index.to_string()));
        constraints.push("~{memory}".to_string());
        let call = self.inline_ptx(Some(result), assembly, &constraints.join(","), registers, true)?;
        self.struct_outputs(call, count)
    }

    /// `wgmma.fence.sync.aligned`: orders this thread's earlier register writes before the wgmma
    /// that follow. Pass every register those wgmma read or accumulate into that was written since
    /// the last wgmma (accumulators, A fragments): they come back from the fence, so LLVM cannot
    /// sink their computation below it (ptxas would then inject its own fences, warning C7519).
    pub fn wgmma_fence(&self, registers: &[BasicValueEnum<'ctx>]) -> Result<Vec<BasicValueEnum<'ctx>>> {
        self.ptx_passing_registers("wgmma.fence.sync.aligned;", registers)
    }

    /// `wgmma.commit_group.sync.aligned`: closes the group of wgmma issued since the last commit.
    pub fn wgmma_commit_group(&self) -> Result<()> {
        self.inline_ptx(None, "wgmma.commit_group.sync.aligned;", "~{memory}", &[], true)?;
        Ok(())
    }

    /// `wgmma.wait_group.sync.aligned pending`: waits until at most `pending` groups are in flight.
    /// Pass the accumulators of the finished groups (read after the wait) and the A-fragment
    /// registers that their wgmma read (which must not be reused before it): they come back from
    /// the wait.
    pub fn wgmma_wait(&self, pending: u32, registers: &[BasicValueEnum<'ctx>]) -> Result<Vec<BasicValueEnum<'ctx>>> {
        self.ptx_passing_registers(&format!("wgmma.wait_group.sync.aligned {pending};"), registers)
    }

    /// [`Self::wgmma_wait`] for accumulators only.
    pub fn wgmma_wait_accumulators(
        &self,
        pending: u32,
        accumulators: &[FloatValue<'ctx>],
    ) -> Result<Vec<FloatValue<'ctx>>> {
        let values: Vec<BasicValueEnum<'ctx>> = accumulators.iter().map(|value| (*value).into()).collect();
        Ok(self.wgmma_wait(pending, &values)?.into_iter().map(|value| value.into_float_value()).collect())
    }

    /// `wgmma.mma_async.sync.aligned.m64nNk16.f32.{bf16,f16}.{bf16,f16}`:
    /// `acc (+)= A · B` for one warpgroup, B a 16×N shared slice given by its descriptor (`b_major`
    /// says whether its lines run along K or N). `acc` holds [`WgmmaShape::accumulator_registers`]
    /// f32 in the wgmma D-fragment layout: register `i` of thread `t` (warp `w = t / 32`, lane `l`)
    /// is row `16w + l / 4 + 8 · ((i / 2) % 2)`, column `8 · (i / 4) + 2 · (l % 4) + i % 2`.
    pub fn wgmma(
        &self,
        shape: WgmmaShape,
        a: WgmmaA<'ctx>,
        b_descriptor: IntValue<'ctx>,
        b_major: OperandMajor,
        accumulate: Accumulate,
        acc: &[FloatValue<'ctx>],
    ) -> Result<Vec<FloatValue<'ctx>>> {
        shape.validate()?;
        let count = shape.accumulator_registers() as usize;
        if acc.len() != count {
            return unsupported(format!("m64n{}k16 takes {count} accumulator registers, got {}", shape.n, acc.len()));
        }
        let kind = shape.elem.name();
        let trans_b = match b_major {
            OperandMajor::K => 0,
            OperandMajor::MN => 1,
        };
        let outputs: Vec<String> = (0..count).map(|index| format!("${index}")).collect();
        let mut args: Vec<BasicValueEnum<'ctx>> = Vec::new();
        let mut constraints: Vec<String> = vec!["=f".to_string(); count];
        let (a_operand, trans_a) = match a {
            WgmmaA::Shared(descriptor, major) => {
                args.push(descriptor.into());
                constraints.push("l".into());
                (format!("${count}"), if major == OperandMajor::MN { ", 1" } else { ", 0" })
            }
            WgmmaA::Registers(registers) => {
                for register in registers {
                    args.push(register.into());
                    constraints.push("r".into());
                }
                (format!("{{${}, ${}, ${}, ${}}}", count, count + 1, count + 2, count + 3), "")
            }
        };
        let b_index = count + args.len();
        args.push(b_descriptor.into());
        constraints.push("l".into());
        let scale_d = match accumulate {
            Accumulate::Add => 1,
            Accumulate::Overwrite => 0,
        };
        args.push(self.i32(scale_d).into());
        constraints.push("r".into());
        let scale_index = b_index + 1;
        for (index, value) in acc.iter().enumerate() {
            args.push((*value).into());
            constraints.push(index.to_string());
        }
        let assembly = format!(
            "{{\n.reg .pred p;\nsetp.ne.b32 p, ${scale_index}, 0;\n\
             wgmma.mma_async.sync.aligned.m64n{n}k16.f32.{kind}.{kind} {{{outputs}}}, {a_operand}, ${b_index}, p, 1, 1{trans_a}, {trans_b};\n}}",
            n = shape.n,
            outputs = outputs.join(", "),
        );
        let f32_type: BasicTypeEnum = self.context().f32_type().into();
        let result = self.context().struct_type(&vec![f32_type; count], false);
        let call = self.inline_ptx(Some(result.into()), &assembly, &constraints.join(","), &args, true)?;
        Ok(self.struct_outputs(call, count)?.into_iter().map(|value| value.into_float_value()).collect())
    }

    /// `fence.proxy.async.shared::cta`: makes this thread's ordinary shared-memory writes
    /// (st.shared, cp.async) visible to the async proxy (wgmma operand reads, TMA).
    pub fn fence_proxy_async_shared(&self) -> Result<()> {
        self.inline_ptx(None, "fence.proxy.async.shared::cta;", "~{memory}", &[], true)?;
        Ok(())
    }

    /// `setmaxnreg.inc.sync.aligned.u32 count` (`increase`) or `.dec`: moves the warpgroup's
    /// per-thread register allotment; `count` must be a multiple of 8 in 24..=256.
    pub fn set_max_registers(&self, increase: bool, count: u32) -> Result<()> {
        if !(24..=256).contains(&count) || !count.is_multiple_of(8) {
            return unsupported(format!("setmaxnreg takes a multiple of 8 in 24..=256, not {count}"));
        }
        let direction = if increase { "inc" } else { "dec" };
        self.inline_ptx(None, &format!("setmaxnreg.{direction}.sync.aligned.u32 {count};"), "~{memory}", &[], true)?;
        Ok(())
    }

    /// `bar.sync id, threads`: waits at named barrier `id` (1..=15; 0 is [`KernelBuilder::barrier`])
    /// until `threads` threads (a multiple of 32) have arrived or synced there.
    pub fn named_barrier_sync(&self, id: IntValue<'ctx>, threads: u32) -> Result<()> {
        self.inline_ptx(
            None,
            "bar.sync $0, $1;",
            "r,r,~{memory}",
            &[id.into(), self.i32(threads as i64).into()],
            true,
        )?;
        Ok(())
    }

    /// `bar.arrive id, threads`: counts this thread at named barrier `id` without waiting.
    pub fn named_barrier_arrive(&self, id: IntValue<'ctx>, threads: u32) -> Result<()> {
        self.inline_ptx(
            None,
            "bar.arrive $0, $1;",
            "r,r,~{memory}",
            &[id.into(), self.i32(threads as i64).into()],
            true,
        )?;
        Ok(())
    }

    /// `bar.warp.sync 0xffffffff`: the whole warp meets here, and its shared-memory writes before
    /// it are visible to its reads after it.
    pub fn warp_sync(&self) -> Result<()> {
        self.inline_ptx(None, "bar.warp.sync -1;", "~{memory}", &[], true)?;
        Ok(())
    }

    /// `mbarrier.init.shared::cta.b64 [barrier], arrivals` on an 8-byte aligned shared word.
    pub fn mbarrier_init(&self, barrier: PointerValue<'ctx>, arrivals: u32) -> Result<()> {
        let address = self.shared_address(barrier)?;
        self.inline_ptx(
            None,
            "mbarrier.init.shared::cta.b64 [$0], $1;",
            "r,r,~{memory}",
            &[address.into(), self.i32(arrivals as i64).into()],
            true,
        )?;
        Ok(())
    }

    /// `mbarrier.arrive.shared::cta.b64`: one arrival (the state token is discarded).
    pub fn mbarrier_arrive(&self, barrier: PointerValue<'ctx>) -> Result<()> {
        let address = self.shared_address(barrier)?;
        self.inline_ptx(None, "mbarrier.arrive.shared::cta.b64 _, [$0];", "r,~{memory}", &[address.into()], true)?;
        Ok(())
    }

    /// `cp.async.mbarrier.arrive.noinc.shared::cta.b64`: one arrival on `barrier` once every
    /// cp.async this thread issued before has landed, without the thread waiting for them (the
    /// barrier's expected count includes this arrival: `.noinc`). Readers must still fence the
    /// async proxy after their wait before wgmma reads the data.
    pub fn cp_async_mbarrier_arrive(&self, barrier: PointerValue<'ctx>) -> Result<()> {
        let address = self.shared_address(barrier)?;
        self.inline_ptx(
            None,
            "cp.async.mbarrier.arrive.noinc.shared::cta.b64 [$0];",
            "r,~{memory}",
            &[address.into()],
            true,
        )?;
        Ok(())
    }

    /// `cp.async.wait_all`: waits for every cp.async this thread issued, committed or not.
    pub fn cp_async_wait_all(&self) -> Result<()> {
        self.inline_ptx(None, "cp.async.wait_all;", "~{memory}", &[], true)?;
        Ok(())
    }

    /// `mbarrier.arrive.expect_tx.shared::cta.b64`: one arrival that also tells the barrier to
    /// wait for `bytes` more bytes of asynchronous copies (TMA) completing on it.
    pub fn mbarrier_arrive_expect_tx(&self, barrier: PointerValue<'ctx>, bytes: IntValue<'ctx>) -> Result<()> {
        let address = self.shared_address(barrier)?;
        self.inline_ptx(
            None,
            "mbarrier.arrive.expect_tx.shared::cta.b64 _, [$0], $1;",
            "r,r,~{memory}",
            &[address.into(), bytes.into()],
            true,
        )?;
        Ok(())
    }

    /// `cp.async.bulk.tensor.Nd.shared::cluster.global.mbarrier::complete_tx::bytes`: the tensor
    /// engine (TMA) copies the box at `coordinates` (i32, innermost first; 1 to 5 of them) of the
    /// tensor described by the 128-byte tensor map at generic address `tensor_map` (i64) into
    /// shared memory at `shared_dst`, and counts the bytes on `barrier` (whose phase must expect
    /// them, [`Self::mbarrier_arrive_expect_tx`]). Elements outside the tensor land as zeros and
    /// count too. The map can live in global memory or be a kernel parameter: LLVM 22 lowers a
    /// `ptr byval([128 x i8]) align 64 "nvvm.grid_constant"` parameter to
    /// `.param .align 64 .b8 name[128]` and its address to `cvta.param.u64`.
    pub fn cp_async_bulk_tensor(
        &self,
        shared_dst: PointerValue<'ctx>,
        tensor_map: IntValue<'ctx>,
        coordinates: &[IntValue<'ctx>],
        barrier: PointerValue<'ctx>,
    ) -> Result<()> {
        let rank = coordinates.len();
        if !(1..=5).contains(&rank) {
            return unsupported(format!("a TMA box has 1 to 5 coordinates, not {rank}"));
        }
        let dst = self.shared_address(shared_dst)?;
        let barrier = self.shared_address(barrier)?;
        let coordinate_operands: Vec<String> = (0..rank).map(|i| format!("${}", 2 + i)).collect();
        let assembly = format!(
            "cp.async.bulk.tensor.{rank}d.shared::cluster.global.mbarrier::complete_tx::bytes [$0], [$1, {{{}}}], [${}];",
            coordinate_operands.join(", "),
            2 + rank
        );
        let constraints = format!("r,l,{}r,~{{memory}}", "r,".repeat(rank));
        let mut args: Vec<BasicValueEnum<'ctx>> = vec![dst.into(), tensor_map.into()];
        args.extend(coordinates.iter().map(|c| BasicValueEnum::from(*c)));
        args.push(barrier.into());
        self.inline_ptx(None, &assembly, &constraints, &args, true)?;
        Ok(())
    }

    /// `mbarrier.try_wait.parity.shared::cta.b64`: whether the phase with parity `parity` (0 or 1,
    /// i32) has completed; an i1. The instruction itself may suspend the thread for a while.
    pub fn mbarrier_try_wait_parity(
        &self,
        barrier: PointerValue<'ctx>,
        parity: IntValue<'ctx>,
    ) -> Result<IntValue<'ctx>> {
        let address = self.shared_address(barrier)?;
        let i32_type: BasicTypeEnum = self.context().i32_type().into();
        let call = self.inline_ptx(
            Some(i32_type),
            "{\n.reg .pred done;\nmbarrier.try_wait.parity.shared::cta.b64 done, [$1], $2;\nselp.u32 $0, 1, 0, done;\n}",
            "=r,r,r,~{memory}",
            &[address.into(), parity.into()],
            true,
        )?;
        let flag = self.struct_outputs(call, 1)?[0].into_int_value();
        Ok(self.builder().build_int_compare(IntPredicate::NE, flag, self.i32(0), "")?)
    }

    /// Spins on [`Self::mbarrier_try_wait_parity`] until the phase with `parity` has completed.
    pub fn mbarrier_wait_parity(&self, barrier: PointerValue<'ctx>, parity: IntValue<'ctx>) -> Result<()> {
        let builder = self.builder();
        let context = self.context();
        let retry = context.append_basic_block(self.function(), "mbarrier.wait");
        let done = context.append_basic_block(self.function(), "mbarrier.done");
        builder.build_unconditional_branch(retry)?;
        builder.position_at_end(retry);
        let completed = self.mbarrier_try_wait_parity(barrier, parity)?;
        builder.build_conditional_branch(completed, done, retry)?;
        builder.position_at_end(done);
        Ok(())
    }
}
