//! PTX emission: tile operations lowered to per-thread LLVM IR for `nvptx64-nvidia-cuda`
//! (`sm_90a`, `+ptx81`: vector `red` needs PTX 8.1), then LLVM's NVPTX back end writes PTX text.
//!
//! Layers, bottom up:
//! - [`PtxModule`] / [`KernelBuilder`]: target set-up, kernel declaration (calling convention 71),
//!   shared memory (address space 3), scalar helpers, structured loops and branches.
//! - [`primitives`]: per-thread instructions (special registers, barrier, shuffles, `ex2`,
//!   `ldmatrix`, `mma.sync`, `cp.async`, bf16/f16 packing, 128-bit loads and stores).
//! - [`tile`]: tile-op emitters over the kernel IR's layouts (`RowMajor` shared tiles,
//!   `MmaAccumulator` register tiles, row vectors, `MmaOperandA` fragments).
//! - [`hopper`]: wgmma / mbarrier / setmaxnreg primitives, 128B-swizzled layouts and the
//!   wgmma flash-attention kernel (sm_90a fast path).
//! - [`lower`]: kernel IR (`ir::kernel::KernelFn`) to LLVM IR and PTX through the tile emitters.
//! - [`ptxas`] checks PTX with NVIDIA's assembler; [`cache`] keeps emitted PTX on disk.

pub mod cache;
pub mod hopper;
pub mod lower;
pub mod primitives;
pub mod ptxas;
pub mod tile;

pub use primitives::SpecialRegister;

use std::fmt;

use inkwell::builder::{Builder, BuilderError};
use inkwell::context::Context;
use inkwell::module::{Linkage, Module};
use inkwell::passes::PassBuilderOptions;
use inkwell::targets::{CodeModel, FileType, InitializationConfig, RelocMode, Target, TargetMachine, TargetTriple};
use inkwell::types::BasicTypeEnum;
use inkwell::values::{BasicValueEnum, FloatValue, FunctionValue, IntValue, PointerValue};
use inkwell::{AddressSpace, FloatPredicate, IntPredicate, OptimizationLevel};

/// The only target this compiler emits for.
pub const TARGET_TRIPLE: &str = "nvptx64-nvidia-cuda";
pub const TARGET_CPU: &str = "sm_90a";
pub const TARGET_FEATURES: &str = "+ptx81";

/// LLVM's number for the `ptx_kernel` calling convention: without it LLVM 22 emits a `.func`.
const PTX_KERNEL_CALLING_CONVENTION: u32 = 71;
pub(crate) const GLOBAL_ADDRESS_SPACE: u16 = 1;
pub(crate) const SHARED_ADDRESS_SPACE: u16 = 3;

/// Anything that can go wrong while emitting: LLVM refusing the module, a target lookup, or a
/// tile operation whose shapes and layouts do not fit together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CodegenError {
    /// The LLVM builder was misused (a bug in an emitter) or LLVM reported an error.
    Llvm(String),
    /// Shapes, layouts or parameters that the emitters cannot lower.
    Unsupported(String),
}

impl fmt::Display for CodegenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CodegenError::Llvm(message) => write!(f, "LLVM: {message}"),
            CodegenError::Unsupported(message) => write!(f, "cannot lower: {message}"),
        }
    }
}

impl std::error::Error for CodegenError {}

impl From<BuilderError> for CodegenError {
    fn from(error: BuilderError) -> Self {
        CodegenError::Llvm(error.to_string())
    }
}

pub type Result<T> = std::result::Result<T, CodegenError>;

pub(crate) fn unsupported<T>(message: impl Into<String>) -> Result<T> {
    Err(CodegenError::Unsupported(message.into()))
}

/// Storage element types of tiles in memory; accumulators are always f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Elem {
    Bf16,
    F16,
    F32,
    /// Index tensors only (see `ElemType::I32`).
    I32,
}

impl From<crate::ir::kernel::ElemType> for Elem {
    fn from(elem: crate::ir::kernel::ElemType) -> Self {
        use crate::ir::kernel::ElemType;
        match elem {
            ElemType::F32 => Elem::F32,
            ElemType::Bf16 => Elem::Bf16,
            ElemType::F16 => Elem::F16,
            ElemType::I32 => Elem::I32,
        }
    }
}

impl From<Elem> for crate::ir::kernel::ElemType {
    fn from(elem: Elem) -> Self {
        use crate::ir::kernel::ElemType;
        match elem {
            Elem::F32 => ElemType::F32,
            Elem::Bf16 => ElemType::Bf16,
            Elem::F16 => ElemType::F16,
            Elem::I32 => ElemType::I32,
        }
    }
}

impl From<crate::ir::kernel::layout::LayoutError> for CodegenError {
    fn from(error: crate::ir::kernel::layout::LayoutError) -> Self {
        CodegenError::Unsupported(error.0)
    }
}

impl Elem {
    pub fn bytes(self) -> u32 {
        match self {
            Elem::Bf16 | Elem::F16 => 2,
            Elem::F32 | Elem::I32 => 4,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Elem::Bf16 => "bf16",
            Elem::F16 => "f16",
            Elem::F32 => "f32",
            Elem::I32 => "i32",
        }
    }
}

/// A kernel parameter in ABI order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamKind {
    /// `ptr addrspace(1)` to a tensor in global memory.
    GlobalPointer(String),
    /// A runtime size (`B`, `S`, `M`, ...) as i32.
    Size(String),
    /// A 128-byte TMA descriptor (`CUtensorMap`) passed by value as a `__grid_constant__`
    /// parameter: `ptr byval([128 x i8]) align 64 "nvvm.grid_constant"`, which NVPTX emits as
    /// `.param .align 64 .b8 name[128]`. The kernel takes its generic address (`cvta.param`)
    /// for `cp.async.bulk.tensor`; parameter space needs no proxy fence, unlike a map that host
    /// copies wrote to global memory.
    TensorMap(String),
}

impl ParamKind {
    pub fn name(&self) -> &str {
        match self {
            ParamKind::GlobalPointer(name) | ParamKind::Size(name) | ParamKind::TensorMap(name) => name,
        }
    }
}

/// Bytes of a `CUtensorMap`, and the alignment a kernel parameter holding one needs.
pub const TENSOR_MAP_BYTES: u32 = 128;
pub const TENSOR_MAP_ALIGN: u32 = 64;

/// One LLVM module for the NVPTX target: the context is borrowed so that values can outlive the
/// module-building calls that created them.
pub struct PtxModule<'ctx> {
    context: &'ctx Context,
    module: Module<'ctx>,
    builder: Builder<'ctx>,
    machine: TargetMachine,
}

impl<'ctx> PtxModule<'ctx> {
    pub fn new(context: &'ctx Context, name: &str) -> Result<Self> {
        Target::initialize_nvptx(&InitializationConfig::default());
        let triple = TargetTriple::create(TARGET_TRIPLE);
        let target = Target::from_triple(&triple)
            .map_err(|error| CodegenError::Llvm(format!("target {TARGET_TRIPLE}: {error}")))?;
        let machine = target
            .create_target_machine(
                &triple,
                TARGET_CPU,
                TARGET_FEATURES,
                // Code generation at O3 only swaps NVPTX's pre-selection EarlyCSE for GVN, which
                // costs a tenth of the compile time and leaves the PTX the same or within a few
                // instructions (measured over every example).
                OptimizationLevel::Default,
                RelocMode::Default,
                CodeModel::Default,
            )
            .ok_or_else(|| CodegenError::Llvm(format!("no target machine for {TARGET_TRIPLE} {TARGET_CPU}")))?;
        let module = context.create_module(name);
        module.set_triple(&triple);
        module.set_data_layout(&machine.get_target_data().get_data_layout());
        Ok(PtxModule { context, module, builder: context.create_builder(), machine })
    }

    pub fn context(&self) -> &'ctx Context {
        self.context
    }

    /// Declares a kernel entry (`.entry` in PTX) and positions the builder in its entry block.
    pub fn declare_kernel<'m>(&'m self, name: &str, params: &[ParamKind]) -> Result<KernelBuilder<'m, 'ctx>> {
        if self.module.get_function(name).is_some() {
            return unsupported(format!("kernel `{name}` declared twice"));
        }
        let global_ptr = self.context.ptr_type(AddressSpace::from(GLOBAL_ADDRESS_SPACE));
        let generic_ptr = self.context.ptr_type(AddressSpace::default());
        let i32_type = self.context.i32_type();
        let param_types: Vec<_> = params
            .iter()
            .map(|param| match param {
                ParamKind::GlobalPointer(_) => global_ptr.into(),
                ParamKind::Size(_) => i32_type.into(),
                ParamKind::TensorMap(_) => generic_ptr.into(),
            })
            .collect();
        let function_type = self.context.void_type().fn_type(&param_types, false);
        let function = self.module.add_function(name, function_type, None);
        function.set_call_conventions(PTX_KERNEL_CALLING_CONVENTION);
        for (index, (value, param)) in function.get_param_iter().zip(params).enumerate() {
            value.set_name(param.name());
            if let ParamKind::TensorMap(_) = param {
                self.mark_grid_constant_tensor_map(function, index as u32);
            }
        }
        let entry = self.context.append_basic_block(function, "entry");
        self.builder.position_at_end(entry);
        Ok(KernelBuilder { module: self, function, params: params.to_vec(), thread_index_per_use: std::cell::Cell::new(false), thread_group: std::cell::Cell::new(None) })
    }

    /// Parameter `index` of `function` becomes a by-value 128-byte `__grid_constant__` blob.
    fn mark_grid_constant_tensor_map(&self, function: FunctionValue<'ctx>, index: u32) {
        use inkwell::attributes::{Attribute, AttributeLoc};
        let location = AttributeLoc::Param(index);
        let blob = self.context.i8_type().array_type(TENSOR_MAP_BYTES);
        function.add_attribute(
            location,
            self.context.create_type_attribute(Attribute::get_named_enum_kind_id("byval"), blob.into()),
        );
        function.add_attribute(
            location,
            self.context.create_enum_attribute(Attribute::get_named_enum_kind_id("align"), TENSOR_MAP_ALIGN.into()),
        );
        function.add_attribute(location, self.context.create_string_attribute("nvvm.grid_constant", ""));
    }

    /// Dynamic shared memory: an external zero-length array whose size is given at launch.
    /// Returns its (16-byte aligned) base in address space 3.
    pub fn dynamic_shared(&self, name: &str) -> PointerValue<'ctx> {
        let array = self.context.i8_type().array_type(0);
        let global = self.module.add_global(array, Some(AddressSpace::from(SHARED_ADDRESS_SPACE)), name);
        global.set_linkage(Linkage::External);
        global.set_alignment(16);
        global.as_pointer_value()
    }

    /// Static shared memory of `bytes` bytes (address space 3, no initializer as PTX requires).
    pub fn static_shared(&self, name: &str, bytes: u32) -> PointerValue<'ctx> {
        let array = self.context.i8_type().array_type(bytes);
        let global = self.module.add_global(array, Some(AddressSpace::from(SHARED_ADDRESS_SPACE)), name);
        global.set_linkage(Linkage::Internal);
        global.set_initializer(&array.get_undef());
        global.set_alignment(16);
        global.as_pointer_value()
    }

    /// The module as LLVM IR text (before optimization unless [`PtxModule::optimize`] ran).
    pub fn llvm_ir(&self) -> String {
        self.module.print_to_string().to_string()
    }

    pub fn verify(&self) -> Result<()> {
        self.module.verify().map_err(|message| CodegenError::Llvm(format!("verifier: {message}")))
    }

    /// Runs LLVM's `default<O3>` pipeline: among others SROA turns the register-tile allocas
    /// into SSA values, which keeps accumulators in registers.
    pub fn optimize(&self) -> Result<()> {
        self.verify()?;
        self.module
            .run_passes("default<O3>", &self.machine, PassBuilderOptions::create())
            .map_err(|message| CodegenError::Llvm(format!("optimization: {message}")))
    }

    /// Marks kernel `name` `optnone` (with the `noinline` it requires): code generation then
    /// selects its instructions without optimizing. Only after [`PtxModule::optimize`]: the IR
    /// pipeline skips `optnone` functions too.
    pub fn skip_codegen_optimization(&self, name: &str) -> Result<()> {
        let function = self
            .module
            .get_function(name)
            .ok_or_else(|| CodegenError::Llvm(format!("no kernel `{name}` in the module")))?;
        for attribute in ["optnone", "noinline"] {
            let kind = inkwell::attributes::Attribute::get_named_enum_kind_id(attribute);
            function.add_attribute(inkwell::attributes::AttributeLoc::Function, self.context.create_enum_attribute(kind, 0));
        }
        Ok(())
    }

    /// Verifies, optimizes and writes the module as PTX text.
    pub fn to_ptx(&self) -> Result<String> {
        self.optimize()?;
        self.write_ptx()
    }

    /// PTX of the module as it is (run [`PtxModule::optimize`] first).
    pub fn write_ptx(&self) -> Result<String> {
        let buffer = self
            .machine
            .write_to_memory_buffer(&self.module, FileType::Assembly)
            .map_err(|message| CodegenError::Llvm(format!("PTX emission: {message}")))?;
        String::from_utf8(buffer.as_slice().to_vec())
            .map_err(|_| CodegenError::Llvm("PTX output is not UTF-8".to_string()))
    }
}

/// Builds the body of one kernel: scalar arithmetic helpers and structured control flow. The
/// per-thread instructions are in [`primitives`], the tile operations in [`tile`]. The module has
/// one builder, so kernels are built one after another. Warp- and block-wide operations
/// (barrier, shuffles, `ldmatrix`, `mma`, row reductions) must only be emitted under conditions
/// that are uniform over the block, as the loop and branch conditions of the kernels here are.
pub struct KernelBuilder<'m, 'ctx> {
    module: &'m PtxModule<'ctx>,
    function: FunctionValue<'ctx>,
    params: Vec<ParamKind>,
    thread_index_per_use: std::cell::Cell<bool>,
    thread_group: std::cell::Cell<Option<u32>>,
}

impl<'m, 'ctx> KernelBuilder<'m, 'ctx> {
    pub fn builder(&self) -> &'m Builder<'ctx> {
        &self.module.builder
    }

    pub fn context(&self) -> &'ctx Context {
        self.module.context
    }

    pub fn module(&self) -> &'m Module<'ctx> {
        &self.module.module
    }

    pub fn function(&self) -> FunctionValue<'ctx> {
        self.function
    }

    fn param(&self, name: &str) -> Result<BasicValueEnum<'ctx>> {
        let index = self
            .params
            .iter()
            .position(|param| param.name() == name)
            .ok_or_else(|| CodegenError::Unsupported(format!("kernel has no parameter `{name}`")))?;
        self.function
            .get_nth_param(index as u32)
            .ok_or_else(|| CodegenError::Llvm(format!("parameter {index} missing")))
    }

    /// A global-memory tensor parameter by name.
    pub fn pointer_param(&self, name: &str) -> Result<PointerValue<'ctx>> {
        match (self.param_kind(name), self.param(name)?) {
            (Some(ParamKind::GlobalPointer(_)), BasicValueEnum::PointerValue(pointer)) => Ok(pointer),
            _ => unsupported(format!("parameter `{name}` is not a global pointer")),
        }
    }

    /// The generic address (i64) of a [`ParamKind::TensorMap`] parameter, as
    /// `cp.async.bulk.tensor` and `prefetch.tensormap` take it.
    pub fn tensor_map_param_address(&self, name: &str) -> Result<IntValue<'ctx>> {
        match (self.param_kind(name), self.param(name)?) {
            (Some(ParamKind::TensorMap(_)), BasicValueEnum::PointerValue(pointer)) => {
                Ok(self.builder().build_ptr_to_int(pointer, self.context().i64_type(), "")?)
            }
            _ => unsupported(format!("parameter `{name}` is not a tensor map")),
        }
    }

    fn param_kind(&self, name: &str) -> Option<&ParamKind> {
        self.params.iter().find(|param| param.name() == name)
    }

    /// A runtime size parameter (i32) by name.
    pub fn size_param(&self, name: &str) -> Result<IntValue<'ctx>> {
        match self.param(name)? {
            BasicValueEnum::IntValue(value) => Ok(value),
            _ => unsupported(format!("parameter `{name}` is not a size")),
        }
    }

    /// Ends the kernel with `ret void` and checks the function.
    pub fn finish(self) -> Result<()> {
        self.builder().build_return(None)?;
        if self.function.verify(false) {
            Ok(())
        } else {
            Err(CodegenError::Llvm(format!(
                "kernel `{}` fails verification:\n{}",
                self.function.get_name().to_string_lossy(),
                self.module.llvm_ir()
            )))
        }
    }

    // ---- scalars --------------------------------------------------------------------------

    pub fn i32(&self, value: i64) -> IntValue<'ctx> {
        self.context().i32_type().const_int(value as u64, true)
    }

    pub fn f32(&self, value: f64) -> FloatValue<'ctx> {
        self.context().f32_type().const_float(value)
    }

    pub fn add(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> Result<IntValue<'ctx>> {
        Ok(self.builder().build_int_add(a, b, "")?)
    }

    pub fn sub(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> Result<IntValue<'ctx>> {
        Ok(self.builder().build_int_sub(a, b, "")?)
    }

    pub fn mul(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> Result<IntValue<'ctx>> {
        Ok(self.builder().build_int_mul(a, b, "")?)
    }

    /// Unsigned division: indices and sizes are never negative.
    pub fn div(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> Result<IntValue<'ctx>> {
        Ok(self.builder().build_int_unsigned_div(a, b, "")?)
    }

    pub fn rem(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> Result<IntValue<'ctx>> {
        Ok(self.builder().build_int_unsigned_rem(a, b, "")?)
    }

    /// `ceil(a / b)` for a non-negative `a` and a positive constant `b`.
    pub fn ceil_div(&self, a: IntValue<'ctx>, b: u32) -> Result<IntValue<'ctx>> {
        let bumped = self.add(a, self.i32(b as i64 - 1))?;
        self.div(bumped, self.i32(b as i64))
    }

    pub fn min(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> Result<IntValue<'ctx>> {
        let less = self.lt(a, b)?;
        Ok(self.builder().build_select(less, a, b, "")?.into_int_value())
    }

    /// Signed `a < b`.
    pub fn lt(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> Result<IntValue<'ctx>> {
        Ok(self.builder().build_int_compare(IntPredicate::SLT, a, b, "")?)
    }

    /// Signed `a <= b`.
    pub fn le(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> Result<IntValue<'ctx>> {
        Ok(self.builder().build_int_compare(IntPredicate::SLE, a, b, "")?)
    }

    pub fn and(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> Result<IntValue<'ctx>> {
        Ok(self.builder().build_and(a, b, "")?)
    }

    pub fn or(&self, a: IntValue<'ctx>, b: IntValue<'ctx>) -> Result<IntValue<'ctx>> {
        Ok(self.builder().build_or(a, b, "")?)
    }

    pub fn select_int(&self, cond: IntValue<'ctx>, a: IntValue<'ctx>, b: IntValue<'ctx>) -> Result<IntValue<'ctx>> {
        Ok(self.builder().build_select(cond, a, b, "")?.into_int_value())
    }

    pub fn select_f32(&self, cond: IntValue<'ctx>, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> Result<FloatValue<'ctx>> {
        Ok(self.builder().build_select(cond, a, b, "")?.into_float_value())
    }

    pub fn fadd(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> Result<FloatValue<'ctx>> {
        Ok(self.builder().build_float_add(a, b, "")?)
    }

    pub fn fsub(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> Result<FloatValue<'ctx>> {
        Ok(self.builder().build_float_sub(a, b, "")?)
    }

    pub fn fmul(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> Result<FloatValue<'ctx>> {
        Ok(self.builder().build_float_mul(a, b, "")?)
    }

    pub fn fdiv(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> Result<FloatValue<'ctx>> {
        Ok(self.builder().build_float_div(a, b, "")?)
    }

    /// `max(a, b)` that ignores NaN like PTX `max.f32`.
    pub fn fmax(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> Result<FloatValue<'ctx>> {
        self.float_intrinsic2("llvm.maxnum", a, b)
    }

    /// `a · b + c` rounded once (`fma.rn.f32`).
    pub fn fma(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>, c: FloatValue<'ctx>) -> Result<FloatValue<'ctx>> {
        let f32_type: BasicTypeEnum = self.context().f32_type().into();
        let function = primitives::intrinsic(self.module(), "llvm.fma", &[f32_type])?;
        let call = self.builder().build_call(function, &[a.into(), b.into(), c.into()], "")?;
        primitives::float_result(call)
    }

    pub fn feq(&self, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> Result<IntValue<'ctx>> {
        Ok(self.builder().build_float_compare(FloatPredicate::OEQ, a, b, "")?)
    }

    pub fn i32_to_f32(&self, value: IntValue<'ctx>) -> Result<FloatValue<'ctx>> {
        Ok(self.builder().build_signed_int_to_float(value, self.context().f32_type(), "")?)
    }

    /// An i32 widened to i64 for global-memory offsets, which may pass 2^31 elements.
    pub fn to_i64(&self, value: IntValue<'ctx>) -> Result<IntValue<'ctx>> {
        Ok(self.builder().build_int_z_extend(value, self.context().i64_type(), "")?)
    }

    /// `base + offset` elements of `elem` (offset is i32 or i64), keeping the address space. A GEP
    /// over the element type rather than over bytes, so that LLVM's address folding sees the
    /// index sum itself (its constant parts become load and store offsets) instead of a product.
    pub fn element_pointer(&self, base: PointerValue<'ctx>, elem: Elem, offset: IntValue<'ctx>) -> Result<PointerValue<'ctx>> {
        let element = match elem.bytes() {
            2 => self.context().i16_type(),
            _ => self.context().i32_type(),
        };
        // SAFETY: as in `byte_pointer`.
        let pointer = unsafe { self.builder().build_gep(element, base, &[offset], "")? };
        Ok(pointer)
    }

    pub fn byte_pointer(&self, base: PointerValue<'ctx>, byte_offset: IntValue<'ctx>) -> Result<PointerValue<'ctx>> {
        // SAFETY: the emitters only form addresses inside the tensors and shared buffers they
        // were given; inkwell marks every GEP unsafe because LLVM cannot check that.
        let pointer = unsafe { self.builder().build_gep(self.context().i8_type(), base, &[byte_offset], "")? };
        Ok(pointer)
    }

    fn float_intrinsic2(&self, name: &str, a: FloatValue<'ctx>, b: FloatValue<'ctx>) -> Result<FloatValue<'ctx>> {
        let f32_type: BasicTypeEnum = self.context().f32_type().into();
        let function = primitives::intrinsic(self.module(), name, &[f32_type])?;
        let call = self.builder().build_call(function, &[a.into(), b.into()], "")?;
        primitives::float_result(call)
    }

    /// A private f32 slot for one register-tile element. Allocas are placed in the entry block
    /// so that SROA promotes them to registers.
    pub fn register_slot(&self) -> Result<PointerValue<'ctx>> {
        let builder = self.builder();
        let current = builder.get_insert_block();
        let entry = self
            .function
            .get_first_basic_block()
            .ok_or_else(|| CodegenError::Llvm("kernel without entry block".to_string()))?;
        match entry.get_first_instruction() {
            Some(first) => builder.position_before(&first),
            None => builder.position_at_end(entry),
        }
        let slot = builder.build_alloca(self.context().f32_type(), "")?;
        if let Some(block) = current {
            builder.position_at_end(block);
        }
        Ok(slot)
    }

    pub fn load_f32(&self, slot: PointerValue<'ctx>) -> Result<FloatValue<'ctx>> {
        Ok(self.builder().build_load(self.context().f32_type(), slot, "")?.into_float_value())
    }

    pub fn store_f32(&self, slot: PointerValue<'ctx>, value: FloatValue<'ctx>) -> Result<()> {
        self.builder().build_store(slot, value)?;
        Ok(())
    }

    // ---- control flow ---------------------------------------------------------------------

    /// `for (i = start; i < end; i += 1) body(i)` with i32 bounds evaluated once.
    pub fn for_range(
        &self,
        start: IntValue<'ctx>,
        end: IntValue<'ctx>,
        body: impl FnMut(&Self, IntValue<'ctx>) -> Result<()>,
    ) -> Result<()> {
        self.emit_loop(start, end, body, false)
    }

    /// [`KernelBuilder::for_range`] that LLVM must not unroll (`llvm.loop.unroll.disable`): for
    /// loops around barriers and matrix multiplies, whose unrolled copies only raise register
    /// pressure until ptxas spills.
    pub fn for_range_rolled(
        &self,
        start: IntValue<'ctx>,
        end: IntValue<'ctx>,
        body: impl FnMut(&Self, IntValue<'ctx>) -> Result<()>,
    ) -> Result<()> {
        self.emit_loop(start, end, body, true)
    }

    fn emit_loop(
        &self,
        start: IntValue<'ctx>,
        end: IntValue<'ctx>,
        mut body: impl FnMut(&Self, IntValue<'ctx>) -> Result<()>,
        keep_rolled: bool,
    ) -> Result<()> {
        let builder = self.builder();
        let context = self.context();
        let before = builder
            .get_insert_block()
            .ok_or_else(|| CodegenError::Llvm("builder not positioned".to_string()))?;
        let header = context.append_basic_block(self.function, "loop.header");
        let body_block = context.append_basic_block(self.function, "loop.body");
        let exit = context.append_basic_block(self.function, "loop.exit");
        builder.build_unconditional_branch(header)?;
        builder.position_at_end(header);
        let index = builder.build_phi(context.i32_type(), "i")?;
        index.add_incoming(&[(&start, before)]);
        let index_value = index.as_basic_value().into_int_value();
        let more = self.lt(index_value, end)?;
        builder.build_conditional_branch(more, body_block, exit)?;
        builder.position_at_end(body_block);
        body(self, index_value)?;
        let next = builder.build_int_nsw_add(index_value, self.i32(1), "")?;
        let latch = builder
            .get_insert_block()
            .ok_or_else(|| CodegenError::Llvm("builder not positioned".to_string()))?;
        let back_edge = builder.build_unconditional_branch(header)?;
        if keep_rolled {
            self.disable_unrolling(back_edge);
        }
        index.add_incoming(&[(&next, latch)]);
        builder.position_at_end(exit);
        Ok(())
    }

    /// Attaches the loop ID `!{self, !{"llvm.loop.unroll.disable"}}` to a loop's back edge. A
    /// loop ID must refer to itself, which inkwell cannot build, hence the LLVM C API.
    fn disable_unrolling(&self, back_edge: inkwell::values::InstructionValue<'ctx>) {
        use inkwell::llvm_sys::core::{
            LLVMGetMDKindIDInContext, LLVMMDNodeInContext2, LLVMMDStringInContext2, LLVMMetadataAsValue, LLVMSetMetadata,
        };
        use inkwell::llvm_sys::debuginfo::{LLVMMetadataReplaceAllUsesWith, LLVMTemporaryMDNode};
        use inkwell::values::AsValueRef;
        const UNROLL_DISABLE: &str = "llvm.loop.unroll.disable";
        const LOOP_KIND: &str = "llvm.loop";
        let context = self.context().raw();
        // SAFETY: every reference comes from this live context; the temporary node is replaced
        // (and thereby freed) before anything else can see it.
        unsafe {
            let placeholder = LLVMTemporaryMDNode(context, std::ptr::null_mut(), 0);
            let mut disable = [LLVMMDStringInContext2(context, UNROLL_DISABLE.as_ptr().cast(), UNROLL_DISABLE.len())];
            let disable_node = LLVMMDNodeInContext2(context, disable.as_mut_ptr(), 1);
            let mut operands = [placeholder, disable_node];
            let loop_id = LLVMMDNodeInContext2(context, operands.as_mut_ptr(), 2);
            LLVMMetadataReplaceAllUsesWith(placeholder, loop_id);
            let kind = LLVMGetMDKindIDInContext(context, LOOP_KIND.as_ptr().cast(), LOOP_KIND.len() as u32);
            LLVMSetMetadata(back_edge.as_value_ref(), kind, LLVMMetadataAsValue(context, loop_id));
        }
    }

    /// `if (cond) then_body() else else_body()`.
    pub fn if_else(
        &self,
        cond: IntValue<'ctx>,
        then_body: impl FnOnce(&Self) -> Result<()>,
        else_body: impl FnOnce(&Self) -> Result<()>,
    ) -> Result<()> {
        let builder = self.builder();
        let context = self.context();
        let then_block = context.append_basic_block(self.function, "then");
        let else_block = context.append_basic_block(self.function, "else");
        let join = context.append_basic_block(self.function, "join");
        builder.build_conditional_branch(cond, then_block, else_block)?;
        builder.position_at_end(then_block);
        then_body(self)?;
        builder.build_unconditional_branch(join)?;
        builder.position_at_end(else_block);
        else_body(self)?;
        builder.build_unconditional_branch(join)?;
        builder.position_at_end(join);
        Ok(())
    }

    /// `if (cond) body()`.
    pub fn if_then(&self, cond: IntValue<'ctx>, body: impl FnOnce(&Self) -> Result<()>) -> Result<()> {
        self.if_else(cond, body, |_| Ok(()))
    }
}
