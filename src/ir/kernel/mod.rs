//! Kernel IR: one function per GPU kernel, at tile level.
//!
//! A `KernelFn` names its parameters (the ABI: global tensors with symbolic shapes, then the
//! runtime sizes B and S), its launch grid, its tiles (each with an element type, a shape, a memory
//! space and a layout) and a body of tile statements: loops, async copies global → shared,
//! barriers, matrix multiply-accumulate on tiles, elementwise maps, row reductions and stores.
//! Layouts are part of the tile types so that the LLVM lowering can turn each tile op into
//! per-thread code without guessing (mma.sync fragments and ldmatrix for row-major shared tiles;
//! wgmma with matrix descriptors for 128-byte-swizzled ones, [`layout`]). The same function runs
//! on the CPU in [`interp`] with whole-tile semantics.
//!
//! Rules a lowering may rely on once `KernelFn::verify` passes:
//! - register tiles are only used whole; a `Map` into a register tile reads other register tiles
//!   only at the element it writes (same shape and layout) or a row vector at its row, so every
//!   thread touches only what it holds; shared tiles may be read at any position;
//! - `Mma`: f32 `mma_acc` accumulator, A shared or `mma_a` with the same warp grid, B shared,
//!   A/B of one 16-bit type, M/N per warp in 16×8 fragments and K a multiple of 16; with a
//!   `swizzled128b` B (wgmma): A `swizzled128b` or `mma_a`, warps in whole warpgroups along M
//!   (warps_m a multiple of 4, warps_n 1), one 16-row band per warp, N 8 to 256;
//! - a `swizzled128b` tile is only written by `Copy`, TMA and `Convert` from an accumulator
//!   (16-bit elements), and read by `Mma`, through windows of whole
//!   8-row atoms (row offset a multiple of 8) and whole 128-byte panels (column offset a
//!   multiple of the panel);
//! - every `AsyncWait` is followed by a `Barrier`; no shared tile is read before its cp.async was
//!   waited for, read after another op's write without a barrier in between, or overwritten
//!   while an earlier op may still read it (checked across loop iterations and branches);
//! - cp.async boxes are whole 16-byte chunks along the tensor's innermost dimension;
//! - global boxes read zero and skip stores outside the tensor and outside a span's `valid`
//!   range (row starts may be negative: the convolution halo and the shifted value rows);
//! - `select` evaluates only the chosen arm (a predicated load), so an arm may index out of
//!   range where its condition is false;
//! - shared memory fits in 227 KB; loop variables and lets are in scope and never shadowed.

mod build;
mod expr;
mod hazard;
pub mod interp;
pub mod layout;
mod print;
mod verify;

pub use build::{
    ATTENTION_CONSUMER_REGISTERS, AttentionBackwardKernel, BackwardKernel, CONV_STATE, DecodeKernel, PagedKv, SHIFT_NEXT, SHIFT_STATE, build_decode, decode_projection_segments, GradientTerm, InputGradient, SplitGradient, SummedRows, TokenSum, WeightGradient, backward_kernels,
    build_attention_backward,
    build_input_gradient, build_prologue_backward, build_prologue_conv_backward, build_token_sum, build_weight_gradient, default_attention_backward_schedule,
    gradient_name, parts_name, projection_gradients, prologue_backward_output, stage_gradient_name, stage_input_name, with_default_gradient_schedule, ForwardKernel, GEMM_BLOCK_K, GEMM_BLOCK_M, GEMM_CONSUMER_REGISTERS, GemmSegment,
    PERSISTENT_GRID, PROJECTION_BUFFER, ProjectionSegment, WgmmaAttentionSchedule, WgmmaGemmSchedule, build_forward,
    build_wgmma_attention, build_wgmma_projection, causal_window, default_schedule, forward_kernels, gemm_operands,
    has_qk_prologue, projection_segments, tensor_map_param, wgmma_attention_footprint, TokenRows,
};
pub use expr::{Axis, BinOp, Expr, ScalarType, UnOp};

use crate::ir::size::{SizeExpr, SizeVar};
use crate::spec::DType;

/// Shared memory one CTA may use on sm_90 (227 KB of the SM's 228 KB).
pub const SHARED_MEMORY_LIMIT_BYTES: usize = 227 * 1024;
/// Every shared tile starts at a multiple of this many bytes of the kernel's allocation.
pub const SHARED_TILE_ALIGNMENT: usize = 128;
/// Bytes of one mbarrier.
pub const MBARRIER_BYTES: usize = 8;
/// Bytes of the word each thread stores to before an ordered `mma.wait` (one per thread: a word
/// all of them stored to would be a write-write race to the race checker).
pub const ANCHOR_BYTES: usize = 4;
/// Shared memory of one SM (sm_90), which its resident CTAs share, and what the hardware keeps
/// of it per CTA.
pub const SM_SHARED_MEMORY_BYTES: usize = 228 * 1024;
pub const SHARED_MEMORY_RESERVED_PER_CTA: usize = 1024;
/// The unit an SM hands out shared memory in, per CTA.
pub const SHARED_MEMORY_ALLOCATION_UNIT: usize = 128;
/// Threads one SM holds.
pub const SM_THREADS: u32 = 2048;
/// Threads of a warpgroup (the unit of wgmma and of warp-specialized roles).
pub const WARPGROUP_THREADS: u32 = 128;
/// Registers one SM holds per CTA (65536 32-bit registers).
pub const REGISTERS_PER_CTA: u32 = 65536;
/// SMs of the H100 / H200 SXM: what sizes fixed at compile time aim to fill (the cost model's
/// tile times, the number of parts a reduction over tokens is split into). Launches that can
/// follow the device use `SizeVar::SmCount`, which the loader reads.
pub const TARGET_SMS: u32 = 132;

/// Element type of a tile or a global tensor. `I32` is only for index tensors (block tables,
/// sequence lengths), read element by element as integers: no tile holds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ElemType {
    F32,
    Bf16,
    F16,
    I32,
}

impl ElemType {
    pub fn size_bytes(self) -> usize {
        match self {
            ElemType::F32 | ElemType::I32 => 4,
            ElemType::Bf16 | ElemType::F16 => 2,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            ElemType::F32 => "f32",
            ElemType::Bf16 => "bf16",
            ElemType::F16 => "f16",
            ElemType::I32 => "i32",
        }
    }
    /// Whether mma.sync m16n8k16 takes this type as an A/B operand.
    pub fn is_mma_operand(self) -> bool {
        matches!(self, ElemType::Bf16 | ElemType::F16)
    }
}

impl From<DType> for ElemType {
    fn from(dtype: DType) -> ElemType {
        match dtype {
            DType::Bf16 => ElemType::Bf16,
            DType::F16 => ElemType::F16,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Space {
    Shared,
    Registers,
}

/// How a tile's elements are placed in its memory space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Shared memory, row-major, each row padded by `pad` elements against bank conflicts
    /// (what ldmatrix and cp.async use).
    RowMajor { pad: u32 },
    /// Shared memory in 128-byte column panels with the 128-byte swizzle
    /// ([`layout::Swizzle128BTile`]), 1024-byte aligned: what wgmma reads through matrix
    /// descriptors ([`layout::MatrixDescriptor`]) and TMA writes. An `Mma` whose B operand has
    /// this layout is a warpgroup MMA (wgmma).
    Swizzled128B,
    /// Registers: the m16n8k16 C fragment of a tile spread over a warps_m × warps_n grid of warps,
    /// each warp owning (rows / warps_m) × (cols / warps_n).
    MmaAccumulator { warps_m: u32, warps_n: u32 },
    /// Registers: the m16n8k16 A fragment (P of P·V kept in registers), same warp grid.
    MmaOperandA { warps_m: u32, warps_n: u32 },
    /// Registers: one value per row of an accumulator with this warp grid (a [rows, 1] tile),
    /// replicated over the threads that hold the row.
    RowVector { warps_m: u32, warps_n: u32 },
    /// Registers: a row vector whose rows are split into shares over the threads that hold the
    /// row, the value being their sum (a softmax's running row sums, added up across threads
    /// once at the end instead of at every key tile). Only sums reach it: `RowReduce` with
    /// `Sum`, maps linear in shares (each term a share times a row-uniform factor, no constant
    /// term), `Fill` with 0; it is read only by such maps, by `Convert` into a row vector (which
    /// adds the shares) and as the anchor of an ordered `mma.wait`.
    RowShares { warps_m: u32, warps_n: u32 },
}

impl Layout {
    pub fn space(self) -> Space {
        match self {
            Layout::RowMajor { .. } | Layout::Swizzled128B => Space::Shared,
            _ => Space::Registers,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TileType {
    pub elem: ElemType,
    pub rows: u32,
    pub cols: u32,
    pub layout: Layout,
}

impl TileType {
    pub fn space(&self) -> Space {
        self.layout.space()
    }
    /// Bytes the tile takes in shared memory (0 for register tiles).
    pub fn shared_bytes(&self) -> usize {
        match self.layout {
            Layout::RowMajor { pad } => {
                self.rows as usize * (self.cols + pad) as usize * self.elem.size_bytes()
            }
            Layout::Swizzled128B => self.rows as usize * self.cols as usize * self.elem.size_bytes(),
            _ => 0,
        }
    }
    /// Where a shared tile must start, in bytes from a 1024-aligned base.
    pub fn shared_alignment(&self) -> usize {
        match self.layout {
            Layout::Swizzled128B => layout::TILE_ALIGNMENT as usize,
            _ => SHARED_TILE_ALIGNMENT,
        }
    }
    /// The swizzled geometry of a [`Layout::Swizzled128B`] tile (`None` for other layouts).
    pub fn swizzled(&self) -> Option<Result<layout::Swizzle128BTile, layout::LayoutError>> {
        match self.layout {
            Layout::Swizzled128B => Some(layout::Swizzle128BTile::new(self.elem, self.rows, self.cols)),
            _ => None,
        }
    }
}

/// Index of a tile in `KernelFn::tiles`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TileId(pub usize);

#[derive(Clone, Debug, PartialEq)]
pub struct TileDecl {
    pub name: String,
    pub ty: TileType,
}

/// A rectangular window of a tile: rows [row0, row0 + rows), cols [col0, col0 + cols).
/// Offsets may depend on loop variables (a shifted conv tap, a column chunk); register tiles are
/// only ever used whole.
#[derive(Clone, Debug, PartialEq)]
pub struct TileView {
    pub tile: TileId,
    pub row0: Expr,
    pub col0: Expr,
    pub rows: u32,
    pub cols: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read,
    Write,
    /// Read and written by the same kernel: state the caller keeps from call to call (a decode
    /// step's convolution and shift state, its KV pages), each element read before it is
    /// written by the thread block that owns it.
    ReadWrite,
}

impl Access {
    pub fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }
    pub fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

/// One kernel argument, in ABI order.
#[derive(Clone, Debug, PartialEq)]
pub enum KernelParam {
    /// A dense row-major global tensor.
    Tensor {
        name: String,
        elem: ElemType,
        shape: Vec<SizeExpr>,
        access: Access,
    },
    /// A runtime size (u32 in the ABI).
    Size(SizeVar),
    /// The TMA descriptor of tensor parameter `tensor`, passed by value (`__grid_constant__`)
    /// after every tensor and size; the loaders encode it per call ([`TensorMapBox`]).
    TensorMap { name: String, tensor: String, box_rows: u32 },
}

/// The box a tensor map copies, as the manifest, the runtime and the Python loader encode it:
/// the tensor's dimensions innermost first (`[B, S, H, d]` → (d, H, S, B), `[B, S, C]` →
/// (C, S, B), a weight `[N, K]` → (K, N)); the box is one 128-byte swizzle panel wide
/// (`panel_cols` elements) and `box_rows` long along the row dimension ([`Self::row_dim`]: S,
/// or N for a weight), one element along the others. Elements outside the tensor arrive as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TensorMapBox {
    pub rank: usize,
    pub panel_cols: u32,
    pub box_rows: u32,
}

impl TensorMapBox {
    /// The coordinate (innermost first) along which the box is `box_rows` long.
    pub fn row_dim(&self) -> usize {
        if self.rank == 4 { 2 } else { 1 }
    }
    /// The box's extent along coordinate `dim` (innermost first).
    pub fn extent(&self, dim: usize) -> u32 {
        match dim {
            0 => self.panel_cols,
            d if d == self.row_dim() => self.box_rows,
            _ => 1,
        }
    }
}

impl KernelParam {
    pub fn name(&self) -> &str {
        match self {
            KernelParam::Tensor { name, .. } => name,
            KernelParam::Size(var) => var.symbol(),
            KernelParam::TensorMap { name, .. } => name,
        }
    }
}

/// One dimension of a box in a global tensor.
#[derive(Clone, Debug, PartialEq)]
pub enum GlobalDim {
    /// A single index.
    At(Expr),
    /// `len` consecutive indices from `start`. Elements outside the tensor, or outside
    /// `valid = [lo, hi)` when given, read as zero and are not stored.
    Span {
        start: Expr,
        len: u32,
        valid: Option<(Expr, Expr)>,
    },
}

/// A box of a global tensor seen as a tile: the first `Span` dimension gives the tile's rows,
/// the second (if any) its columns.
#[derive(Clone, Debug, PartialEq)]
pub struct GlobalTile {
    pub param: String,
    pub dims: Vec<GlobalDim>,
}

impl GlobalTile {
    /// (rows, cols) of the box: spans in order, a missing second span counting as 1 column.
    pub fn box_shape(&self) -> Option<(u32, u32)> {
        let spans: Vec<u32> = self
            .dims
            .iter()
            .filter_map(|d| match d {
                GlobalDim::Span { len, .. } => Some(*len),
                GlobalDim::At(_) => None,
            })
            .collect();
        match spans.as_slice() {
            [rows] => Some((*rows, 1)),
            [rows, cols] => Some((*rows, *cols)),
            _ => None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReduceOp {
    Max,
    Sum,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Stmt {
    /// A scalar (i32 or f32) named for the rest of the enclosing block.
    Let {
        var: String,
        value: Expr,
    },
    /// `var` runs over start..end (step 1); bounds may be runtime expressions.
    For {
        var: String,
        start: Expr,
        end: Expr,
        body: Vec<Stmt>,
    },
    If {
        cond: Expr,
        then_body: Vec<Stmt>,
        else_body: Vec<Stmt>,
    },
    /// Global box → shared tile. `is_async`: cp.async (complete after AsyncCommit + AsyncWait +
    /// Barrier); otherwise a plain cooperative copy (visible after a Barrier).
    Copy {
        dst: TileView,
        src: GlobalTile,
        is_async: bool,
    },
    AsyncCommit,
    /// Wait until at most `pending` committed async copy groups are in flight.
    AsyncWait {
        pending: u32,
    },
    /// bar.sync over the whole block.
    Barrier,
    Fill {
        dst: TileView,
        value: f64,
    },
    /// acc += op(a) · op(b): a is [M, K], or [K, M] read transposed when `a_transposed` (a
    /// row-major shared tile: a weight gradient's dYᵀ, whose rows are tokens); b is [K, N], or
    /// [N, K] read transposed when `b_transposed`.
    Mma {
        acc: TileView,
        a: TileView,
        b: TileView,
        a_transposed: bool,
        b_transposed: bool,
    },
    /// Elementwise copy with a change of layout/space/type (accumulator → operand A fragment,
    /// registers → shared).
    Convert {
        dst: TileView,
        src: TileView,
    },
    /// dst[r, c] = expr for every element; `Expr::Row`/`Expr::Col` are r, c within the view and
    /// `Expr::Elem` is the old dst[r, c].
    Map {
        dst: TileView,
        expr: Expr,
    },
    /// dst[r] = op over c of value, `Expr::Elem` = src[r, c].
    RowReduce {
        dst: TileId,
        src: TileView,
        op: ReduceOp,
        value: Expr,
    },
    /// Tile → global box (elements outside the box's valid range are skipped), rounding to the
    /// tensor's element type.
    Store {
        src: TileView,
        dst: GlobalTile,
    },
    /// Accumulator tile → f32 global box, each element added to what is there
    /// (`red.global.add.f32`; elements outside the box's valid range are skipped). CTAs adding
    /// to one element land in no fixed order, so a sum may differ in its last bits from run to
    /// run: for a reduction across CTAs where determinism is not asked for (FlashAttention's dQ).
    AtomicAdd {
        src: TileView,
        dst: GlobalTile,
    },
    /// A line of explanation kept in the printed IR.
    Note(String),
    /// Warp specialization: the CTA's warpgroups split into roles, each running its own body
    /// (its warpgroups in order of the list, 128 threads each). Inside a role, tile statements
    /// are collective over one warpgroup (register tiles are that warpgroup's own) and the
    /// warpgroups synchronize only through mbarriers and named barriers.
    Roles(Vec<Role>),
    /// The body runs on one thread of the enclosing role's warpgroup (TMA issue, expect-tx):
    /// only scalar, TMA and mbarrier statements.
    Elect { body: Vec<Stmt> },
    /// A TMA box copy global → shared: `dst` (whole 128-byte panels of a swizzled tile) from
    /// tensor map `map` at `coords` (innermost first, the box's first element; one box per
    /// panel, the panel's columns added to coordinate 0). Completes asynchronously, counting its
    /// bytes on `barrier`; elements outside the tensor arrive as zeros.
    TmaLoad { dst: TileView, map: String, coords: Vec<Expr>, barrier: BarrierRef },
    /// `mbarrier.arrive.expect_tx`: one arrival that also expects `bytes` more copied bytes in
    /// the current phase (inside `Elect`).
    ArriveExpectTx { barrier: BarrierRef, bytes: Expr },
    /// `mbarrier.arrive` by every thread that runs it.
    Arrive { barrier: BarrierRef },
    /// Waits until the barrier's phase of parity `parity` (0 or 1) has completed.
    WaitParity { barrier: BarrierRef, parity: Expr },
    /// `acc += op(a) · op(b)` issued on the tensor cores without waiting (wgmma, b swizzled; a
    /// transposed a is a swizzled [K, M] tile read MN-major, as in `Mma`): part of the open group until `MmaCommit`; `acc` may be read, and the shared
    /// operands overwritten, only once an `MmaWait` has retired the group.
    MmaAsync { acc: TileView, a: TileView, b: TileView, a_transposed: bool, b_transposed: bool },
    /// Closes the open group of asynchronous MMAs.
    MmaCommit,
    /// Waits until at most `pending` committed groups of this warpgroup are in flight; with
    /// `after`, only once every element of that register tile has been computed. ptxas hoists
    /// the wait as far up as it may, which would put it above math meant to overlap the group
    /// (the softmax beside `P·V`); it does not move it above a shared-memory store, so the
    /// lowering stores a value computed from the tile to a word of the thread's first.
    MmaWait { pending: u32, after: Option<TileId> },
    /// Named barrier `id` (1..16; 0 is `Barrier`) for `threads` threads: `sync` arrives and
    /// waits for the barrier to complete, otherwise it only arrives.
    NamedBarrier { id: Expr, threads: u32, sync: bool },
}

/// Calls `f` on every statement of `body` and of the blocks nested in it (loops, branches,
/// `elect`, role bodies), outer statements first.
pub fn for_each_stmt(body: &[Stmt], f: &mut dyn FnMut(&Stmt)) {
    for stmt in body {
        f(stmt);
        match stmt {
            Stmt::For { body, .. } | Stmt::Elect { body } => for_each_stmt(body, f),
            Stmt::If { then_body, else_body, .. } => {
                for_each_stmt(then_body, f);
                for_each_stmt(else_body, f);
            }
            Stmt::Roles(roles) => roles.iter().for_each(|role| for_each_stmt(&role.body, f)),
            _ => {}
        }
    }
}

/// Replaces every expression of `body` and of the blocks nested in it by `f` of it: the
/// statements' scalars, view offsets, global boxes' indices and barrier slots.
pub fn rewrite_exprs(body: &mut [Stmt], f: &dyn Fn(&Expr) -> Expr) {
    let view = |v: &mut TileView| {
        v.row0 = f(&v.row0);
        v.col0 = f(&v.col0);
    };
    let global = |g: &mut GlobalTile| {
        for dim in &mut g.dims {
            match dim {
                GlobalDim::At(e) => *e = f(e),
                GlobalDim::Span { start, valid, .. } => {
                    *start = f(start);
                    if let Some((lo, hi)) = valid {
                        *lo = f(lo);
                        *hi = f(hi);
                    }
                }
            }
        }
    };
    let slot = |b: &mut BarrierRef| b.slot = f(&b.slot);
    for stmt in body {
        match stmt {
            Stmt::Let { value, .. } => *value = f(value),
            Stmt::For { start, end, body, .. } => {
                *start = f(start);
                *end = f(end);
                rewrite_exprs(body, f);
            }
            Stmt::If { cond, then_body, else_body } => {
                *cond = f(cond);
                rewrite_exprs(then_body, f);
                rewrite_exprs(else_body, f);
            }
            Stmt::Copy { dst, src, .. } => {
                view(dst);
                global(src);
            }
            Stmt::Fill { dst, .. } => view(dst),
            Stmt::Mma { acc, a, b, .. } | Stmt::MmaAsync { acc, a, b, .. } => {
                view(acc);
                view(a);
                view(b);
            }
            Stmt::Convert { dst, src } => {
                view(dst);
                view(src);
            }
            Stmt::Map { dst, expr } => {
                view(dst);
                *expr = f(expr);
            }
            Stmt::RowReduce { src, value, .. } => {
                view(src);
                *value = f(value);
            }
            Stmt::Store { src, dst } | Stmt::AtomicAdd { src, dst } => {
                view(src);
                global(dst);
            }
            Stmt::Roles(roles) => roles.iter_mut().for_each(|role| rewrite_exprs(&mut role.body, f)),
            Stmt::Elect { body } => rewrite_exprs(body, f),
            Stmt::TmaLoad { dst, coords, barrier, .. } => {
                view(dst);
                coords.iter_mut().for_each(|c| *c = f(c));
                slot(barrier);
            }
            Stmt::ArriveExpectTx { barrier, bytes } => {
                slot(barrier);
                *bytes = f(bytes);
            }
            Stmt::Arrive { barrier } => slot(barrier),
            Stmt::WaitParity { barrier, parity } => {
                slot(barrier);
                *parity = f(parity);
            }
            Stmt::NamedBarrier { id, .. } => *id = f(id),
            Stmt::AsyncCommit | Stmt::AsyncWait { .. } | Stmt::Barrier | Stmt::Note(_) | Stmt::MmaCommit | Stmt::MmaWait { .. } => {}
        }
    }
}

/// One role of a warp-specialized kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct Role {
    pub name: String,
    /// Warpgroups (128 threads each) that run the body; `index` is bound to 0..warpgroups.
    pub warpgroups: u32,
    pub index: String,
    /// Registers per thread after `setmaxnreg` (a multiple of 8 in 24..=256); the roles'
    /// budgets must fit the CTA's allotment.
    pub registers: u32,
    pub body: Vec<Stmt>,
}

/// A ring of mbarriers in shared memory, initialized before the body runs.
#[derive(Clone, Debug, PartialEq)]
pub struct BarrierDecl {
    pub name: String,
    pub slots: u32,
    /// Arrivals that complete a phase (threads that arrive; `ArriveExpectTx` counts one).
    pub arrivals: u32,
}

/// Index of a ring in `KernelFn::barriers`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BarrierId(pub usize);

/// Slot `slot` (taken modulo the ring's size) of a barrier ring.
#[derive(Clone, Debug, PartialEq)]
pub struct BarrierRef {
    pub ring: BarrierId,
    pub slot: Expr,
}

/// Tile sizes and warps of one kernel. What each size means depends on the kernel:
/// qkv_proj and out_proj: block_m rows × block_n output columns, block_k = reduction chunk;
/// qk_prologue: block_m = rows of the tile incl. the convolution halo, block_n = head_dim,
/// block_k = channels of a per-head convolution's weights staged at once; attention: block_m
/// query rows, block_n keys per tile, block_k = head_dim. A ring of `stages` buffers holds the
/// streamed tiles.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub block_m: u32,
    pub block_n: u32,
    pub block_k: u32,
    pub warps: u32,
    /// Shared buffers of each streamed operand: copies run `stages - 1` tiles ahead of the
    /// matrix multiplies (1 = copy, wait, compute).
    pub stages: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct KernelFn {
    pub name: String,
    pub params: Vec<KernelParam>,
    /// CTAs along x, y, z.
    pub grid: [SizeExpr; 3],
    /// Threads per CTA = 32 · warps.
    pub warps: u32,
    pub tiles: Vec<TileDecl>,
    /// mbarrier rings, placed after the tiles (8 bytes per slot).
    pub barriers: Vec<BarrierDecl>,
    pub schedule: Schedule,
    /// The occupancy goal given to ptxas (`.minnctapersm`): it keeps registers to what this many
    /// resident CTAs per SM leave each thread. 1 lets a thread take all 255.
    pub ctas_per_sm: u32,
    pub body: Vec<Stmt>,
}

impl KernelFn {
    /// The same kernel with its runtime sizes replaced by `value` of them, in its tensors'
    /// shapes, its grid and its body, and without the size parameters it no longer reads: a
    /// kernel written over [B, S] rows run over another shape of the same rows (a decode step's
    /// projection over [1, B] rows, one per sequence).
    pub fn with_sizes(mut self, value: &dyn Fn(SizeVar) -> SizeExpr) -> KernelFn {
        for param in &mut self.params {
            if let KernelParam::Tensor { shape, .. } = param {
                *shape = shape.iter().map(|dim| dim.substitute(value)).collect();
            }
        }
        self.grid = self.grid.map(|axis| axis.substitute(value));
        let size = |e: &Expr| match e {
            Expr::Size(var) => Some(Expr::of_size(&value(*var))),
            _ => None,
        };
        let read = std::cell::RefCell::new(Vec::new());
        rewrite_exprs(&mut self.body, &|e| {
            let rewritten = e.rewritten(&size);
            rewritten.visit(&mut |leaf| {
                if let Expr::Size(var) = leaf {
                    read.borrow_mut().push(*var);
                }
            });
            rewritten
        });
        let mut read = read.into_inner();
        for param in &self.params {
            if let KernelParam::Tensor { shape, .. } = param {
                read.extend(SizeVar::ALL.into_iter().filter(|var| shape.iter().any(|dim| dim.uses(*var))));
            }
        }
        self.params.retain(|p| !matches!(p, KernelParam::Size(var) if !read.contains(var)));
        self
    }

    pub fn threads(&self) -> u32 {
        self.warps * 32
    }
    pub fn tile(&self, id: TileId) -> &TileDecl {
        &self.tiles[id.0]
    }
    pub fn param(&self, name: &str) -> Option<&KernelParam> {
        self.params.iter().find(|p| p.name() == name)
    }
    /// Where each tile lives in the kernel's one shared allocation (offsets in declaration
    /// order, each a multiple of its layout's alignment ([`TileType::shared_alignment`]); `None`
    /// for register tiles) and the allocation's size. With swizzled tiles the offsets count from
    /// the first 1024-byte boundary of the allocation, which holds up to 1 KiB more for it.
    pub fn shared_layout(&self) -> (Vec<Option<usize>>, usize) {
        let (offsets, tiles_end) = self.tile_offsets();
        let mut bytes = self.after_barriers(tiles_end);
        if self.has_ordered_waits() {
            bytes += self.threads() as usize * ANCHOR_BYTES;
        }
        bytes += self.row_reduce_scratch_bytes();
        if self.has_swizzled_tiles() {
            bytes += layout::TILE_ALIGNMENT as usize;
        }
        (offsets, bytes)
    }
    /// Each tile's offset (shared tiles in declaration order, each aligned for its layout) and
    /// where the last one ends.
    fn tile_offsets(&self) -> (Vec<Option<usize>>, usize) {
        let mut offsets = Vec::with_capacity(self.tiles.len());
        let mut bytes: usize = 0;
        for decl in &self.tiles {
            if decl.ty.space() == Space::Shared {
                let offset = bytes.next_multiple_of(decl.ty.shared_alignment());
                offsets.push(Some(offset));
                bytes = offset + decl.ty.shared_bytes();
            } else {
                offsets.push(None);
            }
        }
        (offsets, bytes)
    }
    /// Where barrier ring `ring` starts in the shared allocation (after the tiles).
    pub fn barrier_offset(&self, ring: BarrierId) -> usize {
        let before: u32 = self.barriers[..ring.0].iter().map(|b| b.slots).sum();
        self.tile_offsets().1.next_multiple_of(MBARRIER_BYTES) + before as usize * MBARRIER_BYTES
    }
    /// Where the threads' anchor words of ordered `mma.wait`s start (after the barriers).
    pub fn anchor_offset(&self) -> usize {
        self.after_barriers(self.tile_offsets().1)
    }
    /// Where the barrier rings end, for tiles that end at `tiles_end`.
    fn after_barriers(&self, tiles_end: usize) -> usize {
        if self.barriers.is_empty() {
            return tiles_end;
        }
        tiles_end.next_multiple_of(MBARRIER_BYTES) + self.barrier_slots() * MBARRIER_BYTES
    }
    /// Whether `ctas` CTAs of this kernel fit on one SM at once (shared memory and threads).
    pub fn fits_ctas_per_sm(&self, ctas: u32) -> bool {
        let ctas = ctas as usize;
        ctas > 0
            && ctas * (self.shared_bytes().next_multiple_of(SHARED_MEMORY_ALLOCATION_UNIT) + SHARED_MEMORY_RESERVED_PER_CTA)
                <= SM_SHARED_MEMORY_BYTES
            && ctas as u32 * self.threads() <= SM_THREADS
    }
    /// Where the partial row results of row reductions across warps go: after the anchor words.
    pub fn row_reduce_scratch_offset(&self) -> usize {
        let anchors = if self.has_ordered_waits() { self.threads() as usize * ANCHOR_BYTES } else { 0 };
        (self.anchor_offset() + anchors).next_multiple_of(4)
    }
    /// Bytes of the partial row results (f32 per row and warp column) of the widest row
    /// reduction whose rows are split over several warps; 0 when every reduction has whole rows
    /// per warp (combined with shuffles alone).
    pub fn row_reduce_scratch_bytes(&self) -> usize {
        let mut bytes = 0;
        for_each_stmt(&self.body, &mut |stmt| {
            if let Stmt::RowReduce { src, .. } = stmt
                && let Some(decl) = self.tiles.get(src.tile.0)
                && let Layout::MmaAccumulator { warps_n, .. } = decl.ty.layout
                && warps_n > 1
            {
                bytes = bytes.max(decl.ty.rows as usize * warps_n as usize * 4);
            }
        });
        bytes
    }
    /// Whether some `mma.wait` is ordered after a tile (and so needs the anchor words).
    pub fn has_ordered_waits(&self) -> bool {
        let mut found = false;
        for_each_stmt(&self.body, &mut |stmt| found |= matches!(stmt, Stmt::MmaWait { after: Some(_), .. }));
        found
    }
    fn barrier_slots(&self) -> usize {
        self.barriers.iter().map(|b| b.slots as usize).sum()
    }
    pub fn barrier(&self, id: BarrierId) -> &BarrierDecl {
        &self.barriers[id.0]
    }
    /// Whether the body splits into warp-specialized roles.
    pub fn has_roles(&self) -> bool {
        let mut found = false;
        for_each_stmt(&self.body, &mut |stmt| found |= matches!(stmt, Stmt::Roles(_)));
        found
    }
    /// Shared memory of one CTA, alignment included (what the launch asks for).
    pub fn shared_bytes(&self) -> usize {
        self.shared_layout().1
    }
    /// Whether the kernel holds 128-byte-swizzled tiles (wgmma operands).
    pub fn has_swizzled_tiles(&self) -> bool {
        self.tiles.iter().any(|decl| decl.ty.layout == Layout::Swizzled128B)
    }
}

impl TileView {
    /// The whole tile.
    pub fn whole(tile: TileId, ty: &TileType) -> TileView {
        TileView {
            tile,
            row0: Expr::Int(0),
            col0: Expr::Int(0),
            rows: ty.rows,
            cols: ty.cols,
        }
    }
    pub fn is_whole(&self, ty: &TileType) -> bool {
        self.row0 == Expr::Int(0)
            && self.col0 == Expr::Int(0)
            && self.rows == ty.rows
            && self.cols == ty.cols
    }
}
