//! Kernel IR → LLVM IR → PTX: each verified [`KernelFn`] becomes one `.entry`, each statement
//! one of the tile emitters of [`super::tile`] or a per-thread loop.
//!
//! Mapping (statement → emitter):
//! - register tiles: `MmaAccumulator` → [`AccumulatorTile`], `RowVector` → [`RowVector`],
//!   `MmaOperandA` → [`OperandAFragments`] (made by the `Convert` that fills it);
//! - shared tiles (`RowMajor { pad }`) live in ONE dynamic shared allocation, each at a
//!   128-byte aligned offset, and are seen as [`SharedTile`] windows for mma; `Swizzled128B`
//!   tiles at 1024-byte aligned offsets from a 1024-aligned base ([`wgmma`]);
//! - `Copy` (async, whole 16-byte chunks along the innermost dimension) → `cp.async` per chunk
//!   with the box's predicates (negative row starts, `valid` ranges, tensor ends) zero-filling;
//!   any other copy → a per-element loop over the box (predicated loads, conversion);
//! - `Mma` → [`tile::mma`] (A shared or registers, B `NByK`/`KByN`, runtime view offsets); with
//!   a swizzled B → wgmma per warpgroup ([`wgmma`]);
//! - `Map`/`Fill` over register tiles → [`map_accumulator_pairs`] / [`RowVector::map`] with the
//!   expression compiler of [`expr`]; over shared tiles → a per-thread loop over 16-byte chunks
//!   of rows (or elements where chunks are not aligned); accumulator column pairs and shared
//!   chunks are [`lanes`] groups, whose reads of runs of columns are vector loads;
//! - `RowReduce` → [`row_reduce_with`]; `Convert` → [`convert_to_operand_a`] or
//!   [`store_accumulator_to_shared`]; `Store` → per-element predicated stores (paired 16-bit
//!   stores where the box allows);
//! - `For`/`If`/`Let` → structured LLVM control flow; `Barrier`/`AsyncCommit`/`AsyncWait` →
//!   `bar.sync` (after `fence.proxy.async` in kernels with swizzled tiles) /
//!   `cp.async.commit_group` / `cp.async.wait_group`.
//!
//! Register pressure is what decides whether a kernel runs (ptxas spills otherwise), so:
//! loops around barriers/mma and the per-thread window loops stay rolled; `select` evaluates
//! both arms without a branch, with the loads of its arms clamped into range (the kernel IR's
//! "only the chosen arm" promise holds for every value that is used); the thread index is read
//! per use so that lane offsets are not shared, and kept live, across the whole kernel; and the
//! entry carries `.maxntid` with `.minnctapersm 1` so ptxas may use all 255 registers.

pub(crate) mod expr;
mod hopper;
mod lanes;
mod memory;
mod wgmma;

use std::cell::RefCell;

use inkwell::attributes::AttributeLoc;
use inkwell::context::Context;
use inkwell::values::PointerValue;

use super::tile::{
    AccumulatorShape, AccumulatorTile, MmaAccumulator, OperandA, OperandAFragments, OperandB, RowReduction, RowVector, across_quad,
    AcrossWarps, SharedLayout, SharedTile, convert_to_operand_a, map_accumulator_pairs, mma, row_reduce_with, store_accumulator_to_shared,
};
use super::hopper::copy::aligned_tile_address;
use super::{CodegenError, Elem, KernelBuilder, ParamKind, PtxModule, Result, unsupported};
use crate::ir::kernel::{
    ElemType, Expr, KernelFn, KernelParam, Layout, ReduceOp, SHARED_MEMORY_LIMIT_BYTES, SHARED_TILE_ALIGNMENT, Space, Stmt,
    TileId, TileView, for_each_stmt,
};
use expr::{ElementSite, Value};
use lanes::LaneGroup;


/// What the runtime needs to launch one lowered kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoweredKernel {
    /// The `.entry` name (the kernel's `name`).
    pub symbol: String,
    pub threads: u32,
    /// Above 48 KiB the runtime raises the kernel's dynamic shared memory limit first.
    pub dynamic_shared_bytes: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoweredModule {
    /// The module after LLVM's O3 pipeline (what `--emit llvm` prints).
    pub llvm_ir: String,
    pub ptx: String,
    /// In the order of the input kernels.
    pub kernels: Vec<LoweredKernel>,
}

/// Lowers `kernels` into one PTX module named `module_name`, in order. Each kernel is verified
/// first; a kernel that does not verify, or uses a construct the lowering cannot take, is an
/// error.
pub fn lower_kernels(module_name: &str, kernels: &[KernelFn]) -> Result<LoweredModule> {
    lower_kernels_with(module_name, kernels, true)
}

/// [`lower_kernels`] without printing the LLVM IR (megabytes for a fused CCA kernel), for
/// compiles that only need the PTX; `llvm_ir` is left empty.
///
/// Kernels share nothing but the module, so each is optimized and emitted in an LLVM module of
/// its own on a thread of its own (LLVM's passes dominate a cold compile), and the PTX texts are
/// joined into the text one module would have given.
pub fn lower_kernels_to_ptx(module_name: &str, kernels: &[KernelFn]) -> Result<LoweredModule> {
    if kernels.len() < 2 {
        return lower_kernels_with(module_name, kernels, false);
    }
    let parts: Vec<Result<LoweredModule>> = std::thread::scope(|scope| {
        let threads: Vec<_> = kernels
            .iter()
            .map(|kernel| {
                std::thread::Builder::new()
                    // LLVM recurses deeply on large kernels; match a main thread's stack.
                    .stack_size(KERNEL_THREAD_STACK_BYTES)
                    .spawn_scoped(scope, move || lower_kernels_with(module_name, std::slice::from_ref(kernel), false))
            })
            .collect();
        threads
            .into_iter()
            .map(|spawned| match spawned {
                Ok(thread) => thread
                    .join()
                    .unwrap_or_else(|_| Err(CodegenError::Llvm("a kernel's emission thread panicked".to_string()))),
                Err(error) => Err(CodegenError::Llvm(format!("cannot start an emission thread: {error}"))),
            })
            .collect()
    });
    let parts = parts.into_iter().collect::<Result<Vec<_>>>()?;
    let ptx = join_ptx(parts.iter().map(|part| part.ptx.as_str()))?;
    let kernels = parts.into_iter().flat_map(|part| part.kernels).collect();
    Ok(LoweredModule { llvm_ir: String::new(), ptx, kernels })
}

const KERNEL_THREAD_STACK_BYTES: usize = 8 << 20;

/// One PTX text from the texts of single-kernel modules, exactly as LLVM prints one module with
/// all of them: the first header (up to `.address_size`), the first kernel's `.globl` note, every
/// module's declarations (shared-memory symbols), then the kernels, each after its `.globl`
/// note, with basic-block labels numbered by the kernel's place in the module.
fn join_ptx<'a>(parts: impl Iterator<Item = &'a str>) -> Result<String> {
    const HEADER_END: &str = ".address_size 64\n\n";
    const KERNEL_START: &str = "\n.visible .entry ";
    const GLOBL_NOTE: &str = "\t// .globl";
    const FIRST_KERNEL_LABELS: &str = "$L__BB0_";
    let malformed = || CodegenError::Llvm("the PTX of a kernel does not have the layout of LLVM's NVPTX printer".to_string());
    let mut header = None;
    let mut declarations = String::new();
    let mut kernels = String::new();
    for (index, ptx) in parts.enumerate() {
        let body_start = ptx.find(HEADER_END).ok_or_else(malformed)? + HEADER_END.len();
        let kernel_start = ptx[body_start..].find(KERNEL_START).ok_or_else(malformed)? + body_start + 1;
        header.get_or_insert(&ptx[..body_start]);
        let mut globl_note = "";
        for line in ptx[body_start..kernel_start].lines().filter(|line| !line.is_empty()) {
            if line.starts_with(GLOBL_NOTE) {
                globl_note = line;
            } else {
                declarations.push_str(line);
                declarations.push('\n');
            }
        }
        if globl_note.is_empty() {
            return Err(malformed());
        }
        let kernel = &ptx[kernel_start..];
        if index == 0 {
            declarations.insert_str(0, &format!("{globl_note}\n"));
            kernels.push_str(kernel);
        } else {
            kernels.push_str(globl_note);
            kernels.push('\n');
            kernels.push_str(&kernel.replace(FIRST_KERNEL_LABELS, &format!("$L__BB{index}_")));
        }
    }
    let header = header.ok_or_else(|| CodegenError::Llvm("no PTX to join".to_string()))?;
    Ok(format!("{header}{declarations}\n{kernels}"))
}

fn lower_kernels_with(module_name: &str, kernels: &[KernelFn], print_llvm_ir: bool) -> Result<LoweredModule> {
    let context = Context::create();
    let module = PtxModule::new(&context, module_name)?;
    let mut lowered = Vec::with_capacity(kernels.len());
    for kernel in kernels {
        kernel.verify().map_err(|errors| {
            CodegenError::Unsupported(format!("kernel `{}` does not verify:\n  {}", kernel.name, errors.join("\n  ")))
        })?;
        lowered.push(lower_kernel(&module, kernel)?);
    }
    module.optimize()?;
    // Kernel-IR kernels are code-generated without optimization once LLVM's IR pipeline has
    // run: their long straight-line per-element code made NVPTX's code-generation passes
    // (straight-line strength reduction above all) half of a cold compile, and ptxas optimizes
    // the PTX again anyway. Warp-specialized kernels keep optimized code generation: without it
    // the wgmma attention kernel spills.
    for (kernel, lowered) in kernels.iter().zip(&lowered) {
        if !kernel.has_roles() {
            module.skip_codegen_optimization(&lowered.symbol)?;
        }
    }
    let llvm_ir = if print_llvm_ir { module.llvm_ir() } else { String::new() };
    Ok(LoweredModule { llvm_ir, ptx: module.write_ptx()?, kernels: lowered })
}

/// Where each tile lives in the kernel's one dynamic shared allocation and its size
/// ([`KernelFn::shared_layout`]), in the u32 bytes of the launch.
pub fn shared_layout(kernel: &KernelFn) -> (Vec<Option<u32>>, u32) {
    let (offsets, bytes) = kernel.shared_layout();
    (offsets.into_iter().map(|offset| offset.map(|o| o as u32)).collect(), bytes as u32)
}

/// How `kernel` is launched once lowered: known from the kernel IR alone, so that a PTX cache
/// hit needs no LLVM.
pub fn launch_of(kernel: &KernelFn) -> LoweredKernel {
    LoweredKernel {
        symbol: kernel.name.clone(),
        threads: kernel.threads(),
        dynamic_shared_bytes: shared_layout(kernel).1,
    }
}

/// Storage of one tile while its kernel is being emitted.
enum TileStorage<'ctx> {
    /// At `offset` bytes into the dynamic shared allocation.
    Shared { offset: u32 },
    Accumulator(AccumulatorTile<'ctx>),
    Rows(RowVector<'ctx>),
    /// Filled by a `Convert`; the verifier makes sure none is read before.
    OperandA(Option<OperandAFragments<'ctx>>),
    /// An operand-A tile that asynchronous MMAs read: its registers live in slots, so that the
    /// fragments a `Convert` made survive into later loop iterations (P of one key tile is
    /// multiplied in the next) and pass through every `mma.wait` until their group retires.
    AsyncOperandA { slots: Vec<PointerValue<'ctx>> },
}

/// The kernel's parameters as PTX entry parameters, in ABI order.
pub fn param_kinds(kernel: &KernelFn) -> Vec<ParamKind> {
    kernel
        .params
        .iter()
        .map(|param| match param {
            KernelParam::Tensor { name, .. } => ParamKind::GlobalPointer(name.clone()),
            KernelParam::Size(var) => ParamKind::Size(var.symbol().to_string()),
            KernelParam::TensorMap { name, .. } => ParamKind::TensorMap(name.clone()),
        })
        .collect()
}

fn lower_kernel<'ctx>(module: &PtxModule<'ctx>, kernel: &KernelFn) -> Result<LoweredKernel> {
    let params = param_kinds(kernel);

    let (offsets, shared_bytes) = shared_layout(kernel);
    if shared_bytes as usize > SHARED_MEMORY_LIMIT_BYTES {
        return unsupported(format!(
            "kernel `{}` needs {shared_bytes} bytes of shared memory with its tiles aligned (limit {SHARED_MEMORY_LIMIT_BYTES})",
            kernel.name
        ));
    }
    let shared_base = if shared_bytes > 0 {
        let name = format!("{}_shared", kernel.name);
        let base = module.dynamic_shared(&name);
        if let Some(global) = module_global(module, &name) {
            global.set_alignment(SHARED_TILE_ALIGNMENT as u32);
        }
        Some(base)
    } else {
        None
    };

    let kb = module.declare_kernel(&kernel.name, &params)?;
    // Warp-specialized kernels keep one read: their roles are short loops, and the warpgroup
    // index must be one value that ptxas sees as uniform.
    if !kernel.has_roles() {
        kb.read_thread_index_per_use();
    }
    let shared_base = match shared_base {
        Some(raw) if kernel.has_swizzled_tiles() => {
            let raw_address = kb.shared_address(raw)?;
            let padding = kb.sub(aligned_tile_address(&kb, raw_address)?, raw_address)?;
            Some(kb.byte_pointer(raw, padding)?)
        }
        base => base,
    };
    // The block size and the kernel's occupancy goal: with .maxntid alone ptxas caps registers
    // to fit more CTAs and spills instead.
    for (name, value) in [("nvvm.maxntid", kernel.threads()), ("nvvm.minctasm", kernel.ctas_per_sm)] {
        let attribute = kb.context().create_string_attribute(name, &value.to_string());
        kb.function().add_attribute(AttributeLoc::Function, attribute);
    }

    let (_, async_operands) = async_mma_tiles(kernel, &kernel.body);
    let mut tiles = Vec::with_capacity(kernel.tiles.len());
    for (index, (decl, offset)) in kernel.tiles.iter().zip(&offsets).enumerate() {
        let ty = &decl.ty;
        tiles.push(match (ty.layout, offset) {
            (Layout::RowMajor { .. } | Layout::Swizzled128B, Some(offset)) => TileStorage::Shared { offset: *offset },
            (Layout::MmaAccumulator { warps_m, warps_n }, _) => {
                if ty.elem != ElemType::F32 {
                    return unsupported(format!("accumulator %{} is {}, not f32", decl.name, ty.elem.name()));
                }
                let shape = AccumulatorShape { rows: ty.rows, cols: ty.cols, layout: MmaAccumulator { warps_m, warps_n } };
                TileStorage::Accumulator(AccumulatorTile::new(&kb, shape)?)
            }
            (Layout::RowVector { warps_m, warps_n } | Layout::RowShares { warps_m, warps_n }, _) => {
                let shape = AccumulatorShape { rows: ty.rows, cols: 8 * warps_n, layout: MmaAccumulator { warps_m, warps_n } };
                TileStorage::Rows(RowVector::new(&kb, shape)?)
            }
            (Layout::MmaOperandA { warps_m, .. }, _) if async_operands.contains(&TileId(index)) => {
                // m16n8k16 A fragments: 4 registers per k16 step of each of the warp's 16-row bands.
                let count = ty.rows / 16 / warps_m * (ty.cols / 16) * 4;
                let slots = (0..count).map(|_| kb.register_slot()).collect::<Result<_>>()?;
                TileStorage::AsyncOperandA { slots }
            }
            (Layout::MmaOperandA { .. }, _) => TileStorage::OperandA(None),
            (Layout::RowMajor { .. } | Layout::Swizzled128B, None) => {
                return unsupported(format!("shared tile %{} without an offset", decl.name));
            }
        });
    }

    let mut lowering = Lowering { kernel, shared_base, tiles, in_flight: RefCell::new(Vec::new()), scope: Vec::new() };
    lowering.init_barriers(&kb)?;
    lowering.block(&kb, &kernel.body)?;
    kb.finish()?;
    Ok(LoweredKernel { symbol: kernel.name.clone(), threads: kernel.threads(), dynamic_shared_bytes: shared_bytes })
}

/// The tiles the asynchronous MMAs of `body` use: the accumulators they write and the register
/// tiles they read as operand a, each once, in tile order.
fn async_mma_tiles(kernel: &KernelFn, body: &[Stmt]) -> (Vec<TileId>, Vec<TileId>) {
    let (mut accumulators, mut operands) = (Vec::new(), Vec::new());
    for_each_stmt(body, &mut |stmt| {
        if let Stmt::MmaAsync { acc, a, .. } = stmt {
            accumulators.push(acc.tile);
            if kernel.tile(a.tile).ty.space() == Space::Registers {
                operands.push(a.tile);
            }
        }
    });
    for tiles in [&mut accumulators, &mut operands] {
        tiles.sort();
        tiles.dedup();
    }
    (accumulators, operands)
}

/// Whether a statement (or one nested in it) waits at a barrier or multiplies tiles.
fn synchronizes(stmt: &Stmt) -> bool {
    match stmt {
        Stmt::Barrier
        | Stmt::Mma { .. }
        | Stmt::AsyncWait { .. }
        | Stmt::MmaAsync { .. }
        | Stmt::MmaWait { .. }
        | Stmt::WaitParity { .. }
        | Stmt::NamedBarrier { .. }
        | Stmt::TmaLoad { .. } => true,
        Stmt::For { body, .. } | Stmt::Elect { body } => body.iter().any(synchronizes),
        Stmt::If { then_body, else_body, .. } => then_body.iter().chain(else_body).any(synchronizes),
        _ => false,
    }
}

fn module_global<'ctx>(module: &PtxModule<'ctx>, name: &str) -> Option<inkwell::values::GlobalValue<'ctx>> {
    module.module.get_global(name)
}

/// The state of one kernel's lowering: tiles, and the loop variables and lets in scope.
struct Lowering<'k, 'ctx> {
    kernel: &'k KernelFn,
    shared_base: Option<PointerValue<'ctx>>,
    tiles: Vec<TileStorage<'ctx>>,
    /// The accumulators and register operands of asynchronous MMAs that may be in flight at the
    /// statement being lowered (those issued since the last `mma.wait 0`, and, in a loop, those
    /// its body issues): each `mma.wait` ties them down, and only them, since ptxas inserts
    /// waits of its own before writes to registers it cannot prove free of a group in flight.
    in_flight: RefCell<Vec<TileId>>,
    scope: Vec<Binding<'ctx>>,
}

/// A loop variable, `Let` or role index in scope, with what its value is known to be a multiple
/// of (0: it is 0), for the alignment proofs of [`lanes`].
struct Binding<'ctx> {
    name: String,
    value: Value<'ctx>,
    multiple_of: u64,
}

impl<'k, 'ctx> Lowering<'k, 'ctx> {
    fn block(&mut self, kb: &KernelBuilder<'_, 'ctx>, body: &[Stmt]) -> Result<()> {
        let depth = self.scope.len();
        let mut index = 0;
        while index < body.len() {
            // Accumulators zeroed right before the asynchronous MMAs that add to them: the first
            // wgmma overwrites instead (scale-d 0), and the zeros are never written.
            let zeroed: Vec<TileId> = body[index..]
                .iter()
                .map_while(|stmt| match stmt {
                    Stmt::Fill { dst, value } if *value == 0.0 && matches!(self.tiles[dst.tile.0], TileStorage::Accumulator(_)) => {
                        Some(dst.tile)
                    }
                    _ => None,
                })
                .collect();
            // Consecutive asynchronous MMAs share one wgmma fence.
            let run: Vec<&Stmt> = body[index + zeroed.len()..]
                .iter()
                .take_while(|stmt| matches!(stmt, Stmt::MmaAsync { .. }))
                .collect();
            let overwritten = |tile: &TileId| run.iter().any(|stmt| matches!(stmt, Stmt::MmaAsync { acc, .. } if acc.tile == *tile));
            if !run.is_empty() && zeroed.iter().all(overwritten) {
                self.wgmma_async_run(kb, &run, &zeroed)?;
                index += zeroed.len() + run.len();
            } else {
                self.stmt(kb, &body[index])?;
                index += 1;
            }
        }
        self.scope.truncate(depth);
        Ok(())
    }

    /// Adds tiles to those whose asynchronous MMAs may be in flight.
    fn note_in_flight(&self, tiles: impl IntoIterator<Item = TileId>) {
        let mut in_flight = self.in_flight.borrow_mut();
        for tile in tiles {
            if !in_flight.contains(&tile) {
                in_flight.push(tile);
            }
        }
        in_flight.sort();
    }

    fn tile_name(&self, tile: TileId) -> &str {
        &self.kernel.tile(tile).name
    }

    fn stmt(&mut self, kb: &KernelBuilder<'_, 'ctx>, stmt: &Stmt) -> Result<()> {
        match stmt {
            Stmt::Let { var, value } => {
                let multiple_of = self.multiple_of(value);
                let value = self.eval(kb, value, &ElementSite::None)?;
                self.scope.push(Binding { name: var.clone(), value, multiple_of });
            }
            Stmt::For { var, start, end, body } => {
                let start = self.eval(kb, start, &ElementSite::None)?.int()?;
                let end = self.eval(kb, end, &ElementSite::None)?.int()?;
                // A group the body issues may still be in flight at its start (the iteration before
                // issued it), and any may be after the loop.
                let (issued_accumulators, issued_operands) = async_mma_tiles(self.kernel, body);
                self.note_in_flight(issued_accumulators.iter().chain(&issued_operands).copied());
                let entry = self.in_flight.borrow().clone();
                let loop_body = |kb: &KernelBuilder<'_, 'ctx>, index| {
                    self.scope.push(Binding { name: var.clone(), value: Value::Int(index), multiple_of: 1 });
                    self.block(kb, body)?;
                    self.scope.pop();
                    Ok(())
                };
                // Unrolled copies of loops around barriers and mma only add register pressure.
                if body.iter().any(synchronizes) {
                    kb.for_range_rolled(start, end, loop_body)?;
                } else {
                    kb.for_range(start, end, loop_body)?;
                }
                self.note_in_flight(entry);
            }
            Stmt::If { cond, then_body, else_body } => {
                let cond = self.eval(kb, cond, &ElementSite::None)?.bool()?;
                // Both closures need the lowering state; they run one after the other.
                let entry = self.in_flight.borrow().clone();
                let this = std::cell::RefCell::new(&mut *self);
                let mut after_then = Vec::new();
                kb.if_else(
                    cond,
                    |kb| {
                        let mut this = this.borrow_mut();
                        let lowered = this.block(kb, then_body);
                        after_then = this.in_flight.replace(entry.clone());
                        lowered
                    },
                    |kb| this.borrow_mut().block(kb, else_body),
                )?;
                self.note_in_flight(after_then);
            }
            Stmt::Copy { dst, src, is_async } => self.copy(kb, dst, src, *is_async)?,
            Stmt::AsyncCommit => kb.cp_async_commit()?,
            Stmt::AsyncWait { pending } => kb.cp_async_wait(*pending)?,
            Stmt::Barrier => {
                if self.kernel.has_swizzled_tiles() {
                    kb.fence_proxy_async_shared()?;
                }
                kb.barrier()?
            }
            Stmt::Fill { dst, value } => self.fill(kb, dst, *value)?,
            Stmt::Mma { acc, a, b, a_transposed, b_transposed } => {
                if self.kernel.tile(b.tile).ty.layout == Layout::Swizzled128B {
                    self.wgmma(kb, acc, a, b, *a_transposed, *b_transposed)?
                } else {
                    self.mma(kb, acc, a, b, *a_transposed, *b_transposed)?
                }
            }
            Stmt::Convert { dst, src } => self.convert(kb, dst, src)?,
            Stmt::Map { dst, expr } => self.map(kb, dst, expr)?,
            Stmt::RowReduce { dst, src, op, value } => self.row_reduce(kb, *dst, src, *op, value)?,
            Stmt::Store { src, dst } => self.store(kb, src, dst)?,
            Stmt::AtomicAdd { src, dst } => self.atomic_add(kb, src, dst)?,
            Stmt::Note(_) => {}
            Stmt::Roles(roles) => self.roles(kb, roles)?,
            Stmt::Elect { body } => self.elect(kb, body)?,
            Stmt::TmaLoad { dst, map, coords, barrier } => self.tma_load(kb, dst, map, coords, barrier)?,
            Stmt::ArriveExpectTx { barrier, bytes } => {
                let bytes = self.eval(kb, bytes, &ElementSite::None)?.int()?;
                kb.mbarrier_arrive_expect_tx(self.barrier_pointer(kb, barrier)?, bytes)?
            }
            Stmt::Arrive { barrier } => kb.mbarrier_arrive(self.barrier_pointer(kb, barrier)?)?,
            Stmt::WaitParity { barrier, parity } => {
                let parity = self.eval(kb, parity, &ElementSite::None)?.int()?;
                kb.mbarrier_wait_parity(self.barrier_pointer(kb, barrier)?, parity)?
            }
            Stmt::MmaAsync { .. } => self.wgmma_async_run(kb, &[stmt], &[])?,
            Stmt::MmaCommit => kb.wgmma_commit_group()?,
            Stmt::MmaWait { pending, after } => self.wgmma_wait(kb, *pending, *after)?,
            Stmt::NamedBarrier { id, threads, sync } => {
                let id = self.eval(kb, id, &ElementSite::None)?.int()?;
                if *sync { kb.named_barrier_sync(id, *threads)? } else { kb.named_barrier_arrive(id, *threads)? }
            }
        }
        Ok(())
    }

    fn accumulator(&self, tile: TileId) -> Result<&AccumulatorTile<'ctx>> {
        match &self.tiles[tile.0] {
            TileStorage::Accumulator(acc) => Ok(acc),
            _ => unsupported(format!("%{} is not an accumulator tile", self.tile_name(tile))),
        }
    }

    fn row_vector(&self, tile: TileId) -> Result<&RowVector<'ctx>> {
        match &self.tiles[tile.0] {
            TileStorage::Rows(rows) => Ok(rows),
            _ => unsupported(format!("%{} is not a row vector", self.tile_name(tile))),
        }
    }

    /// A register tile must be used whole (the verifier's rule; checked again because the
    /// emitters have no notion of a register window).
    fn whole_register_tile(&self, view: &TileView) -> Result<()> {
        if view.is_whole(&self.kernel.tile(view.tile).ty) {
            Ok(())
        } else {
            unsupported(format!("a window of register tile %{}", self.tile_name(view.tile)))
        }
    }

    /// The shared window `view` as a [`SharedTile`] whose base is its first element.
    fn shared_window(&self, kb: &KernelBuilder<'_, 'ctx>, view: &TileView) -> Result<SharedTile<'ctx>> {
        let decl = self.kernel.tile(view.tile);
        let (TileStorage::Shared { offset }, Layout::RowMajor { pad }) = (&self.tiles[view.tile.0], decl.ty.layout) else {
            return unsupported(format!("%{} is not a shared tile", decl.name));
        };
        let base = self.shared_tile_base(kb, *offset)?;
        let elem = Elem::from(decl.ty.elem);
        let pitch = decl.ty.cols + pad;
        let row0 = self.eval(kb, &view.row0, &ElementSite::None)?.int()?;
        let col0 = self.eval(kb, &view.col0, &ElementSite::None)?.int()?;
        let first = kb.add(kb.mul(row0, kb.i32(pitch as i64))?, col0)?;
        Ok(SharedTile {
            base: kb.element_pointer(base, elem, first)?,
            elem,
            rows: view.rows,
            cols: view.cols,
            layout: SharedLayout::RowMajor { pad_elems: pitch - view.cols },
        })
    }

    fn shared_tile_base(&self, kb: &KernelBuilder<'_, 'ctx>, offset: u32) -> Result<PointerValue<'ctx>> {
        let base = self.shared_base.ok_or_else(|| CodegenError::Llvm("shared tile without shared memory".into()))?;
        kb.byte_pointer(base, kb.i32(offset as i64))
    }

    fn fill(&mut self, kb: &KernelBuilder<'_, 'ctx>, dst: &TileView, value: f64) -> Result<()> {
        match &self.tiles[dst.tile.0] {
            TileStorage::Accumulator(acc) => {
                self.whole_register_tile(dst)?;
                acc.fill(kb, value)
            }
            TileStorage::Rows(rows) => {
                self.whole_register_tile(dst)?;
                rows.fill(kb, value)
            }
            TileStorage::Shared { .. } => self.map_shared(kb, dst, &Expr::Float(value)),
            TileStorage::OperandA(_) | TileStorage::AsyncOperandA { .. } => {
                unsupported(format!("fill of operand fragments %{}", self.tile_name(dst.tile)))
            }
        }
    }

    fn mma(
        &self,
        kb: &KernelBuilder<'_, 'ctx>,
        acc: &TileView,
        a: &TileView,
        b: &TileView,
        a_transposed: bool,
        b_transposed: bool,
    ) -> Result<()> {
        self.whole_register_tile(acc)?;
        let accumulator = self.accumulator(acc.tile)?;
        let b_tile = self.shared_window(kb, b)?;
        let b_operand = if b_transposed { OperandB::NByK(&b_tile) } else { OperandB::KByN(&b_tile) };
        match &self.tiles[a.tile.0] {
            TileStorage::Shared { .. } => {
                let a_tile = self.shared_window(kb, a)?;
                let a_operand = if a_transposed { OperandA::SharedKByM(&a_tile) } else { OperandA::Shared(&a_tile) };
                mma(kb, accumulator, a_operand, b_operand)
            }
            _ if a_transposed => {
                unsupported(format!("mma reads %{} transposed: only a shared A can be", self.tile_name(a.tile)))
            }
            TileStorage::OperandA(Some(fragments)) => {
                self.whole_register_tile(a)?;
                mma(kb, accumulator, OperandA::Registers(fragments), b_operand)
            }
            TileStorage::OperandA(None) => {
                unsupported(format!("mma reads operand fragments %{} before a convert fills them", self.tile_name(a.tile)))
            }
            _ => unsupported(format!("mma A operand %{} is neither shared nor operand fragments", self.tile_name(a.tile))),
        }
    }

    fn convert(&mut self, kb: &KernelBuilder<'_, 'ctx>, dst: &TileView, src: &TileView) -> Result<()> {
        self.whole_register_tile(src)?;
        let dst_decl = self.kernel.tile(dst.tile);
        match &self.tiles[dst.tile.0] {
            TileStorage::OperandA(_) => {
                self.whole_register_tile(dst)?;
                let fragments = convert_to_operand_a(kb, self.accumulator(src.tile)?, Elem::from(dst_decl.ty.elem))?;
                self.tiles[dst.tile.0] = TileStorage::OperandA(Some(fragments));
                Ok(())
            }
            TileStorage::AsyncOperandA { slots, .. } => {
                self.whole_register_tile(dst)?;
                let fragments = convert_to_operand_a(kb, self.accumulator(src.tile)?, Elem::from(dst_decl.ty.elem))?;
                if fragments.registers().len() != slots.len() {
                    return unsupported(format!("%{}: {} A registers for {} slots", dst_decl.name, fragments.registers().len(), slots.len()));
                }
                for (slot, register) in slots.iter().zip(fragments.registers()) {
                    let bits = kb.builder().build_bit_cast(*register, kb.context().f32_type(), "")?.into_float_value();
                    kb.store_f32(*slot, bits)?;
                }
                Ok(())
            }
            TileStorage::Rows(rows) => {
                // Row shares → row vector: the shares of each row added across its threads.
                let shares = self.row_vector(src.tile)?;
                for slot in 0..rows.of.row_slots() {
                    rows.set(kb, slot, across_quad(kb, shares.get(kb, slot)?, |a, b| kb.fadd(a, b))?)?;
                }
                Ok(())
            }
            TileStorage::Shared { .. } if dst_decl.ty.layout == Layout::Swizzled128B => self.convert_to_swizzled(kb, dst, src.tile),
            TileStorage::Shared { .. } => {
                let window = self.shared_window(kb, dst)?;
                // Packed 32-bit stores need every pair on a 4-byte boundary.
                let even_col0 = matches!(dst.col0, Expr::Int(c) if c % 2 == 0);
                let pairs_aligned = even_col0 && window.row_pitch().is_multiple_of(2);
                store_accumulator_to_shared(kb, self.accumulator(src.tile)?, &window, pairs_aligned)
            }
            _ => unsupported(format!(
                "convert %{} <- %{}: only accumulator → operand fragments or → shared tile",
                dst_decl.name,
                self.tile_name(src.tile)
            )),
        }
    }

    fn map(&self, kb: &KernelBuilder<'_, 'ctx>, dst: &TileView, expr: &Expr) -> Result<()> {
        match &self.tiles[dst.tile.0] {
            TileStorage::Accumulator(acc) => {
                self.whole_register_tile(dst)?;
                map_accumulator_pairs(kb, acc, |kb, positions, values| {
                    let sites = positions
                        .iter()
                        .zip(values)
                        .map(|(position, value)| ElementSite::Accumulator { tile: dst.tile, position: *position, value })
                        .collect();
                    let mapped = self.eval_lanes(kb, expr, &LaneGroup { sites }, false)?.floats(2)?;
                    Ok([mapped[0], mapped[1]])
                })
            }
            TileStorage::Rows(rows) => {
                self.whole_register_tile(dst)?;
                rows.map(kb, |kb, slot, value| {
                    let site = ElementSite::Row { row: rows.row_of_slot(kb, slot)?, row_slot: slot, value };
                    self.eval(kb, expr, &site)?.float()
                })
            }
            TileStorage::Shared { .. } => self.map_shared(kb, dst, expr),
            TileStorage::OperandA(_) | TileStorage::AsyncOperandA { .. } => {
                unsupported(format!("map over operand fragments %{}", self.tile_name(dst.tile)))
            }
        }
    }

    fn row_reduce(&self, kb: &KernelBuilder<'_, 'ctx>, dst: TileId, src: &TileView, op: ReduceOp, value: &Expr) -> Result<()> {
        self.whole_register_tile(src)?;
        let op = match op {
            ReduceOp::Max => RowReduction::Max,
            ReduceOp::Sum => RowReduction::Sum,
        };
        // Row shares keep each thread's part; a row vector adds the parts across the threads.
        let across_threads = !matches!(self.kernel.tile(dst).ty.layout, Layout::RowShares { .. });
        let across_warps = match self.kernel.tile(src.tile).ty.layout {
            Layout::MmaAccumulator { warps_n, .. } if warps_n > 1 => {
                let base = self.shared_base.ok_or_else(|| CodegenError::Llvm("a row reduction across warps without shared memory".into()))?;
                AcrossWarps::Through(kb.byte_pointer(base, kb.i32(self.kernel.row_reduce_scratch_offset() as i64))?)
            }
            _ => AcrossWarps::No,
        };
        row_reduce_with(kb, self.accumulator(src.tile)?, op, self.row_vector(dst)?, across_threads, across_warps, |kb, position, element| {
            let site = ElementSite::Accumulator { tile: src.tile, position: *position, value: element };
            self.eval(kb, value, &site)?.float()
        })
    }
}
