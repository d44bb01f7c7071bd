//! Per-thread instructions. NVVM intrinsics where LLVM 22 has a convenient one (special
//! registers, barrier, shuffles, `ex2`/`lg2`/`rsqrt`); inline PTX where the intrinsic is missing or
//! awkward (`ldmatrix`, `mma.sync`, `cp.async`, packed conversions). Plain LLVM loads and stores of
//! 16-byte vectors become `ld/st.{global,shared}.v4`.
//!
//! Inline PTX that touches memory is marked side-effecting so that LLVM never moves it across a
//! barrier or hoists it out of a loop; pure register instructions (`mma`, `cvt`) are not, so LLVM
//! may schedule them freely.

use inkwell::module::Module;
use inkwell::types::{BasicMetadataTypeEnum, BasicType, BasicTypeEnum};
use inkwell::values::{BasicValue, BasicValueEnum, CallSiteValue, FloatValue, FunctionValue, IntValue, PointerValue};
use inkwell::intrinsics::Intrinsic;

use inkwell::AddressSpace;

use super::{CodegenError, Elem, GLOBAL_ADDRESS_SPACE, KernelBuilder, Result, SHARED_ADDRESS_SPACE, unsupported};

/// Declares an LLVM intrinsic by name (overloaded ones take their types).
pub(crate) fn intrinsic<'ctx>(module: &Module<'ctx>, name: &str, types: &[BasicTypeEnum<'ctx>]) -> Result<FunctionValue<'ctx>> {
    let found = Intrinsic::find(name).ok_or_else(|| CodegenError::Llvm(format!("LLVM has no intrinsic `{name}`")))?;
    found
        .get_declaration(module, types)
        .ok_or_else(|| CodegenError::Llvm(format!("cannot declare intrinsic `{name}`")))
}

pub(crate) fn float_result(call: CallSiteValue<'_>) -> Result<FloatValue<'_>> {
    match call.try_as_basic_value().basic() {
        Some(BasicValueEnum::FloatValue(value)) => Ok(value),
        _ => Err(CodegenError::Llvm("call did not return a float".to_string())),
    }
}

fn int_result(call: CallSiteValue<'_>) -> Result<IntValue<'_>> {
    match call.try_as_basic_value().basic() {
        Some(BasicValueEnum::IntValue(value)) => Ok(value),
        _ => Err(CodegenError::Llvm("call did not return an integer".to_string())),
    }
}

/// Special registers readable per thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpecialRegister {
    ThreadX,
    BlockX,
    BlockY,
    BlockZ,
    /// `%nctaid.x`: CTAs in the grid along x.
    GridX,
    GridY,
    GridZ,
}

impl<'m, 'ctx> KernelBuilder<'m, 'ctx> {
    fn call_intrinsic(&self, name: &str, types: &[BasicTypeEnum<'ctx>], args: &[BasicValueEnum<'ctx>]) -> Result<CallSiteValue<'ctx>> {
        let function = intrinsic(self.module(), name, types)?;
        let args: Vec<_> = args.iter().map(|arg| (*arg).into()).collect();
        Ok(self.builder().build_call(function, &args, "")?)
    }

    /// Inline PTX. `result` is the LLVM return type (a struct for several outputs).
    pub fn inline_ptx(
        &self,
        result: Option<BasicTypeEnum<'ctx>>,
        assembly: &str,
        constraints: &str,
        args: &[BasicValueEnum<'ctx>],
        side_effects: bool,
    ) -> Result<CallSiteValue<'ctx>> {
        let arg_types: Vec<BasicMetadataTypeEnum> = args.iter().map(|arg| arg.get_type().into()).collect();
        let function_type = match result {
            Some(result) => result.fn_type(&arg_types, false),
            None => self.context().void_type().fn_type(&arg_types, false),
        };
        let asm = self.context().create_inline_asm(
            function_type,
            assembly.to_string(),
            constraints.to_string(),
            side_effects,
            false,
            None,
            false,
        );
        let args: Vec<_> = args.iter().map(|arg| (*arg).into()).collect();
        Ok(self.builder().build_indirect_call(function_type, asm, &args, "")?)
    }

    fn struct_fields(&self, call: CallSiteValue<'ctx>, count: u32) -> Result<Vec<BasicValueEnum<'ctx>>> {
        let value = call
            .try_as_basic_value()
            .basic()
            .ok_or_else(|| CodegenError::Llvm("inline PTX returned nothing".to_string()))?
            .into_struct_value();
        (0..count)
            .map(|index| Ok(self.builder().build_extract_value(value, index, "")?))
            .collect()
    }

    // ---- thread identity ------------------------------------------------------------------

    pub fn special_register(&self, register: SpecialRegister) -> Result<IntValue<'ctx>> {
        let name = match register {
            SpecialRegister::ThreadX => "llvm.nvvm.read.ptx.sreg.tid.x",
            SpecialRegister::BlockX => "llvm.nvvm.read.ptx.sreg.ctaid.x",
            SpecialRegister::BlockY => "llvm.nvvm.read.ptx.sreg.ctaid.y",
            SpecialRegister::BlockZ => "llvm.nvvm.read.ptx.sreg.ctaid.z",
            SpecialRegister::GridX => "llvm.nvvm.read.ptx.sreg.nctaid.x",
            SpecialRegister::GridY => "llvm.nvvm.read.ptx.sreg.nctaid.y",
            SpecialRegister::GridZ => "llvm.nvvm.read.ptx.sreg.nctaid.z",
        };
        int_result(self.call_intrinsic(name, &[], &[])?)
    }

    /// `threadIdx.x`, or within a thread group ([`KernelBuilder::set_thread_group`]) the
    /// thread's index in its group; with [`KernelBuilder::read_thread_index_per_use`] an opaque
    /// read each time.
    pub fn thread_index(&self) -> Result<IntValue<'ctx>> {
        let thread = self.cta_thread_index()?;
        match self.thread_group.get() {
            Some(threads) => self.and(thread, self.i32(threads as i64 - 1)),
            None => Ok(thread),
        }
    }

    /// From now on (until set back to `None`) tile operations are collective over aligned groups
    /// of `threads` threads (a power of two: the warpgroups of a warp-specialized role), and
    /// [`KernelBuilder::thread_index`] counts within the group.
    pub fn set_thread_group(&self, threads: Option<u32>) {
        self.thread_group.set(threads);
    }

    /// The threads that share a collective tile operation: the thread group's, else the CTA's
    /// `cta_threads`.
    pub fn collective_threads(&self, cta_threads: u32) -> u32 {
        self.thread_group.get().unwrap_or(cta_threads)
    }

    /// `threadIdx.x` whatever the thread group.
    pub fn cta_thread_index(&self) -> Result<IntValue<'ctx>> {
        if self.thread_index_per_use.get() {
            let i32_type = self.context().i32_type().into();
            let call = self.inline_ptx(Some(i32_type), "mov.u32 $0, %tid.x;", "=r", &[], true)?;
            // threadIdx.x < 1024: with the range LLVM still folds (tid + k·threads) / c and the like.
            let range = self.context().metadata_node(&[self.i32(0).into(), self.i32(1024).into()]);
            let instruction = call.try_as_basic_value().basic().and_then(|v| v.as_instruction_value());
            if let Some(instruction) = instruction {
                instruction
                    .set_metadata(range, self.context().get_kind_id("range"))
                    .map_err(|error| CodegenError::Llvm(error.to_string()))?;
            }
            int_result(call)
        } else {
            self.special_register(SpecialRegister::ThreadX)
        }
    }

    /// From now on every [`KernelBuilder::thread_index`] is a fresh read LLVM cannot merge with
    /// the others. Otherwise GVN shares the per-thread row/column offsets of every tile op over
    /// the whole kernel, and in long kernels (the fused projection's passes) those shared values
    /// stay live across all the loops until ptxas spills.
    pub fn read_thread_index_per_use(&self) {
        self.thread_index_per_use.set(true);
    }

    /// `threadIdx.x % 32`.
    pub fn lane(&self) -> Result<IntValue<'ctx>> {
        let thread = self.thread_index()?;
        self.and(thread, self.i32(31))
    }

    /// `threadIdx.x / 32`.
    pub fn warp_index(&self) -> Result<IntValue<'ctx>> {
        let thread = self.thread_index()?;
        self.div(thread, self.i32(32))
    }

    // ---- synchronization and warp exchange --------------------------------------------------

    /// `bar.sync 0` over the whole block (LLVM 22 name of the former `llvm.nvvm.barrier0`).
    pub fn barrier(&self) -> Result<()> {
        self.call_intrinsic("llvm.nvvm.barrier.cta.sync.aligned.all", &[], &[self.i32(0).into()])?;
        Ok(())
    }

    /// `shfl.sync.bfly.b32` over the full warp: the value of lane `lane ^ lane_mask`.
    pub fn shuffle_xor_f32(&self, value: FloatValue<'ctx>, lane_mask: u32) -> Result<FloatValue<'ctx>> {
        let call = self.call_intrinsic(
            "llvm.nvvm.shfl.sync.bfly.f32",
            &[],
            &[self.i32(-1).into(), value.into(), self.i32(lane_mask as i64).into(), self.i32(31).into()],
        )?;
        float_result(call)
    }

    /// `value` as lane 0 holds it (`shfl.sync.idx.b32`, full warp), for a value that is already
    /// the same in every lane (a warp or warpgroup index): ptxas cannot prove that of anything
    /// derived from `%tid`, but it can of a broadcast, and then keeps the value, the branches on
    /// it and what is computed from it under them in uniform registers (CUTLASS does the same).
    pub fn warp_uniform(&self, value: IntValue<'ctx>) -> Result<IntValue<'ctx>> {
        let call = self.call_intrinsic(
            "llvm.nvvm.shfl.sync.idx.i32",
            &[],
            &[self.i32(-1).into(), value.into(), self.i32(0).into(), self.i32(31).into()],
        )?;
        int_result(call)
    }

    // ---- fast math ----------------------------------------------------------------------------

    /// `ex2.approx.ftz.f32`: 2^x, the softmax exponential once log2(e) is folded into the scale.
    pub fn exp2_approx(&self, value: FloatValue<'ctx>) -> Result<FloatValue<'ctx>> {
        let f32_type = self.context().f32_type().into();
        float_result(self.call_intrinsic("llvm.nvvm.ex2.approx.ftz", &[f32_type], &[value.into()])?)
    }

    /// `lg2.approx.ftz.f32`.
    pub fn log2_approx(&self, value: FloatValue<'ctx>) -> Result<FloatValue<'ctx>> {
        float_result(self.call_intrinsic("llvm.nvvm.lg2.approx.ftz.f", &[], &[value.into()])?)
    }

    /// `rsqrt.approx.ftz.f32`.
    pub fn rsqrt_approx(&self, value: FloatValue<'ctx>) -> Result<FloatValue<'ctx>> {
        float_result(self.call_intrinsic("llvm.nvvm.rsqrt.approx.ftz.f", &[], &[value.into()])?)
    }

    // ---- shared and global memory ------------------------------------------------------------

    /// The 32-bit shared-window address of a shared pointer, as the `.shared` PTX forms take it.
    pub fn shared_address(&self, pointer: PointerValue<'ctx>) -> Result<IntValue<'ctx>> {
        Ok(self.builder().build_ptr_to_int(pointer, self.context().i32_type(), "")?)
    }

    /// `ldmatrix.sync.aligned.m8n8.x4{.trans}.shared.b16`: four 8×8 b16 matrices; lane `i` gives
    /// the address of row `i % 8` of matrix `i / 8`. Returns one b16x2 register per matrix.
    pub fn ldmatrix_x4(&self, row_address: PointerValue<'ctx>, transpose: bool) -> Result<[IntValue<'ctx>; 4]> {
        self.ldmatrix_x4_at(row_address, 0, transpose)
    }

    /// [`KernelBuilder::ldmatrix_x4`] at `row_address + byte_offset`, the constant offset folded
    /// into the instruction (`[$4+offset]`): the loads of one mma share one address register
    /// instead of keeping one per fragment live across the loop.
    pub fn ldmatrix_x4_at(&self, row_address: PointerValue<'ctx>, byte_offset: i32, transpose: bool) -> Result<[IntValue<'ctx>; 4]> {
        let i32_type = self.context().i32_type();
        let result = self.context().struct_type(&[i32_type.into(); 4], false);
        let trans = if transpose { ".trans" } else { "" };
        let displacement = match byte_offset {
            0 => String::new(),
            offset => format!("+{offset}"),
        };
        let assembly = format!("ldmatrix.sync.aligned.m8n8.x4{trans}.shared.b16 {{$0, $1, $2, $3}}, [$4{displacement}];");
        let address = self.shared_address(row_address)?;
        let call = self.inline_ptx(Some(result.into()), &assembly, "=r,=r,=r,=r,r", &[address.into()], true)?;
        let fields = self.struct_fields(call, 4)?;
        Ok([0, 1, 2, 3].map(|index| fields[index].into_int_value()))
    }

    /// `mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32`: `c + a · b` for one
    /// warp, with the PTX ISA's fragment layouts (a: 4 b16x2, b: 2 b16x2, c/d: 4 f32).
    pub fn mma_m16n8k16(
        &self,
        elem: Elem,
        a: [IntValue<'ctx>; 4],
        b: [IntValue<'ctx>; 2],
        c: [FloatValue<'ctx>; 4],
    ) -> Result<[FloatValue<'ctx>; 4]> {
        let kind = match elem {
            Elem::Bf16 => "bf16",
            Elem::F16 => "f16",
            Elem::F32 | Elem::I32 => return unsupported(format!("mma.sync m16n8k16 takes bf16 or f16 operands, not {}", elem.name())),
        };
        let f32_type = self.context().f32_type();
        let result = self.context().struct_type(&[f32_type.into(); 4], false);
        let assembly = format!(
            "mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32 {{$0, $1, $2, $3}}, {{$4, $5, $6, $7}}, {{$8, $9}}, {{$10, $11, $12, $13}};"
        );
        let mut args: Vec<BasicValueEnum> = Vec::with_capacity(10);
        args.extend(a.iter().map(|value| BasicValueEnum::from(*value)));
        args.extend(b.iter().map(|value| BasicValueEnum::from(*value)));
        args.extend(c.iter().map(|value| BasicValueEnum::from(*value)));
        let call = self.inline_ptx(Some(result.into()), &assembly, "=f,=f,=f,=f,r,r,r,r,r,r,0,1,2,3", &args, false)?;
        let fields = self.struct_fields(call, 4)?;
        Ok([0, 1, 2, 3].map(|index| fields[index].into_float_value()))
    }

    /// `cp.async.cg.shared.global [dst], [src], 16, src_bytes`: copies `src_bytes` (0 or 16) and
    /// zero-fills the rest of the 16-byte chunk, so out-of-bounds chunks read as zero.
    pub fn cp_async_16(&self, shared_dst: PointerValue<'ctx>, global_src: PointerValue<'ctx>, src_bytes: IntValue<'ctx>) -> Result<()> {
        let dst = self.shared_address(shared_dst)?;
        let src = self.builder().build_ptr_to_int(global_src, self.context().i64_type(), "")?;
        self.inline_ptx(
            None,
            "cp.async.cg.shared.global [$0], [$1], 16, $2;",
            "r,l,r,~{memory}",
            &[dst.into(), src.into(), src_bytes.into()],
            true,
        )?;
        Ok(())
    }

    /// `cp.async.commit_group`.
    pub fn cp_async_commit(&self) -> Result<()> {
        self.inline_ptx(None, "cp.async.commit_group;", "~{memory}", &[], true)?;
        Ok(())
    }

    /// `cp.async.wait_group pending`: waits until at most `pending` committed groups are in flight.
    pub fn cp_async_wait(&self, pending: u32) -> Result<()> {
        self.inline_ptx(None, &format!("cp.async.wait_group {pending};"), "~{memory}", &[], true)?;
        Ok(())
    }

    /// Rounds two f32 to the nearest 16-bit floats and packs them, `low` in bits 0..16
    /// (`cvt.rn.{bf16x2,f16x2}.f32 d, high, low`).
    pub fn pack_half2(&self, elem: Elem, low: FloatValue<'ctx>, high: FloatValue<'ctx>) -> Result<IntValue<'ctx>> {
        let kind = match elem {
            Elem::Bf16 => "bf16x2",
            Elem::F16 => "f16x2",
            Elem::F32 | Elem::I32 => return unsupported("pack_half2 packs bf16 or f16"),
        };
        let assembly = format!("cvt.rn.{kind}.f32 $0, $1, $2;");
        let i32_type = self.context().i32_type().into();
        int_result(self.inline_ptx(Some(i32_type), &assembly, "=r,f,f", &[high.into(), low.into()], false)?)
    }

    /// Rounds one f32 to a 16-bit float, returned in the low 16 bits of an i16.
    pub fn round_half(&self, elem: Elem, value: FloatValue<'ctx>) -> Result<IntValue<'ctx>> {
        let kind = match elem {
            Elem::Bf16 => "bf16",
            Elem::F16 => "f16",
            Elem::F32 | Elem::I32 => return unsupported("round_half rounds to bf16 or f16"),
        };
        let assembly = format!("cvt.rn.{kind}.f32 $0, $1;");
        let i16_type = self.context().i16_type().into();
        int_result(self.inline_ptx(Some(i16_type), &assembly, "=h,f", &[value.into()], false)?)
    }

    /// Loads one element of type `elem` and widens it to f32.
    pub fn load_as_f32(&self, pointer: PointerValue<'ctx>, elem: Elem) -> Result<FloatValue<'ctx>> {
        match elem {
            Elem::F32 => self.load_f32(pointer),
            Elem::I32 => unsupported("an i32 index tensor is read as an integer, not widened to f32"),
            half => {
                let bits = self.builder().build_load(self.context().i16_type(), pointer, "")?.into_int_value();
                self.widen_half(half, bits)
            }
        }
    }

    /// Widens the 16-bit float in `bits` (an i16) to f32: bf16 by moving its bits up, f16 by
    /// `cvt`.
    pub fn widen_half(&self, elem: Elem, bits: IntValue<'ctx>) -> Result<FloatValue<'ctx>> {
        let builder = self.builder();
        let context = self.context();
        Ok(match elem {
            Elem::Bf16 => {
                let wide = builder.build_int_z_extend(bits, context.i32_type(), "")?;
                let shifted = builder.build_left_shift(wide, self.i32(16), "")?;
                builder.build_bit_cast(shifted, context.f32_type(), "")?.into_float_value()
            }
            Elem::F16 => {
                let half = builder.build_bit_cast(bits, context.f16_type(), "")?.into_float_value();
                builder.build_float_ext(half, context.f32_type(), "")?
            }
            Elem::F32 | Elem::I32 => return unsupported("widen_half widens bf16 or f16"),
        })
    }

    /// `prmt.b32`: byte `i` of the result is byte `selector >> 4i & 7` of `b:a` (bytes 0-3 of
    /// `a`, 4-7 of `b`).
    pub fn byte_perm(&self, a: IntValue<'ctx>, b: IntValue<'ctx>, selector: u32) -> Result<IntValue<'ctx>> {
        let call = self.call_intrinsic("llvm.nvvm.prmt", &[], &[a.into(), b.into(), self.i32(selector as i64).into()])?;
        int_result(call)
    }

    /// `ld.global.v4.b32` from `pointer + byte_offset` (16-byte aligned) as inline PTX. A plain
    /// vector load whose lanes are only extracted is split by LLVM's O3 into four 4-byte loads
    /// (and narrower ones where bits go unused), which ptxas does not merge again.
    pub fn load_global_v4_at(&self, pointer: PointerValue<'ctx>, byte_offset: i32) -> Result<[IntValue<'ctx>; 4]> {
        let i32_type = self.context().i32_type();
        let result = self.context().struct_type(&[i32_type.into(); 4], false);
        let displacement = match byte_offset {
            0 => String::new(),
            offset => format!("+{offset}"),
        };
        let assembly = format!("ld.global.v4.b32 {{$0, $1, $2, $3}}, [$4{displacement}];");
        let address = self.builder().build_ptr_to_int(pointer, self.context().i64_type(), "")?;
        let call = self.inline_ptx(Some(result.into()), &assembly, "=r,=r,=r,=r,l,~{memory}", &[address.into()], true)?;
        let fields = self.struct_fields(call, 4)?;
        Ok([0, 1, 2, 3].map(|index| fields[index].into_int_value()))
    }

    /// `red.global.add.f32`: `*pointer += value` as one relaxed atomic whose result is not read.
    pub fn red_global_add_f32(&self, pointer: PointerValue<'ctx>, value: FloatValue<'ctx>) -> Result<()> {
        let address = self.builder().build_ptr_to_int(pointer, self.context().i64_type(), "")?;
        self.inline_ptx(None, "red.global.add.f32 [$0], $1;", "l,f,~{memory}", &[address.into(), value.into()], true)?;
        Ok(())
    }

    /// `red.global.add.v2.f32`: `pointer[0] += low`, `pointer[1] += high` in one instruction
    /// (sm_90); the address must be 8-byte aligned.
    pub fn red_global_add_v2_f32(&self, pointer: PointerValue<'ctx>, low: FloatValue<'ctx>, high: FloatValue<'ctx>) -> Result<()> {
        let address = self.builder().build_ptr_to_int(pointer, self.context().i64_type(), "")?;
        self.inline_ptx(None, "red.global.add.v2.f32 [$0], {$1, $2};", "l,f,f,~{memory}", &[address.into(), low.into(), high.into()], true)?;
        Ok(())
    }

    /// A 16-byte load (`ld.{global,shared}.v4.b32`); the address must be 16-byte aligned.
    pub fn load_v4(&self, pointer: PointerValue<'ctx>) -> Result<[IntValue<'ctx>; 4]> {
        let vector_type = self.context().i32_type().vec_type(4);
        let load = self.builder().build_load(vector_type, pointer, "")?;
        load.as_instruction_value()
            .ok_or_else(|| CodegenError::Llvm("load is not an instruction".to_string()))?
            .set_alignment(16)
            .map_err(|error| CodegenError::Llvm(error.to_string()))?;
        let vector = load.into_vector_value();
        let mut lanes = [self.i32(0); 4];
        for (index, lane) in lanes.iter_mut().enumerate() {
            *lane = self.builder().build_extract_element(vector, self.i32(index as i64), "")?.into_int_value();
        }
        Ok(lanes)
    }

    /// A 16-byte store (`st.{global,shared}.v4.b32`); the address must be 16-byte aligned.
    pub fn store_v4(&self, pointer: PointerValue<'ctx>, lanes: [IntValue<'ctx>; 4]) -> Result<()> {
        let vector_type = self.context().i32_type().vec_type(4);
        let mut vector = vector_type.get_undef();
        for (index, lane) in lanes.iter().enumerate() {
            vector = self.builder().build_insert_element(vector, *lane, self.i32(index as i64), "")?;
        }
        let store = self.builder().build_store(pointer, vector)?;
        store.set_alignment(16).map_err(|error| CodegenError::Llvm(error.to_string()))?;
        Ok(())
    }

    /// `words` (1, 2 or 4) consecutive 32-bit words from `pointer` in one load
    /// (`ld.{shared,global}[.v2|.v4].b32`); the address must be aligned to their size. Two or
    /// four words are inline PTX, ordered with every other memory access: as a plain vector load
    /// whose lanes are only extracted, LLVM's O3 splits them into 4-byte loads (see
    /// [`KernelBuilder::load_global_v4_at`]).
    pub fn load_words(&self, pointer: PointerValue<'ctx>, words: u32) -> Result<Vec<IntValue<'ctx>>> {
        let i32_type = self.context().i32_type();
        if words == 1 {
            let load = self.builder().build_load(i32_type, pointer, "")?;
            load.as_instruction_value()
                .ok_or_else(|| CodegenError::Llvm("load is not an instruction".to_string()))?
                .set_alignment(4)
                .map_err(|error| CodegenError::Llvm(error.to_string()))?;
            return Ok(vec![load.into_int_value()]);
        }
        if words != 2 && words != 4 {
            return unsupported(format!("a load of {words} words"));
        }
        let space = pointer.get_type().get_address_space();
        let (space, address, operand) = if space == AddressSpace::from(SHARED_ADDRESS_SPACE) {
            (".shared", self.shared_address(pointer)?, "r")
        } else {
            let address = self.builder().build_ptr_to_int(pointer, self.context().i64_type(), "")?;
            (if space == AddressSpace::from(GLOBAL_ADDRESS_SPACE) { ".global" } else { "" }, address, "l")
        };
        let outputs: Vec<String> = (0..words).map(|index| format!("${index}")).collect();
        let assembly = format!("ld{space}.v{words}.b32 {{{}}}, [${words}];", outputs.join(", "));
        let constraints = format!("{}{operand},~{{memory}}", "=r,".repeat(words as usize));
        let result = self.context().struct_type(&vec![i32_type.into(); words as usize], false);
        let call = self.inline_ptx(Some(result.into()), &assembly, &constraints, &[address.into()], true)?;
        Ok(self.struct_fields(call, words)?.into_iter().map(|field| field.into_int_value()).collect())
    }

    /// `words` (1, 2 or 4) 32-bit words stored from `pointer` in one store; the address must be
    /// aligned to their size.
    pub fn store_words(&self, pointer: PointerValue<'ctx>, words: &[IntValue<'ctx>]) -> Result<()> {
        match words {
            [word] => self.store_int(pointer, *word),
            [a, b, c, d] => self.store_v4(pointer, [*a, *b, *c, *d]),
            [a, b] => {
                let mut vector = self.context().i32_type().vec_type(2).get_undef();
                for (index, word) in [a, b].into_iter().enumerate() {
                    vector = self.builder().build_insert_element(vector, *word, self.i32(index as i64), "")?;
                }
                let store = self.builder().build_store(pointer, vector)?;
                store.set_alignment(8).map_err(|error| CodegenError::Llvm(error.to_string()))?;
                Ok(())
            }
            _ => unsupported(format!("a store of {} words", words.len())),
        }
    }

    /// A naturally aligned scalar store of an integer (i16 or i32) value.
    pub fn store_int(&self, pointer: PointerValue<'ctx>, value: IntValue<'ctx>) -> Result<()> {
        let store = self.builder().build_store(pointer, value)?;
        store
            .set_alignment(value.get_type().get_bit_width() / 8)
            .map_err(|error| CodegenError::Llvm(error.to_string()))?;
        Ok(())
    }
}
