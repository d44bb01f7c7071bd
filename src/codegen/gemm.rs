//! A tiled GEMM `C[M, N] = A[M, K] · B[N, K]ᵀ` (16-bit inputs, f32 accumulation, 16-bit output)
//! built only from the tile emitters: it proves them together (cp.async double buffering, ldmatrix,
//! mma, bounds predicates) and is the shape of `out_proj`.
//!
//! Kernel parameters (ABI order): `a`, `b`, `c` (global pointers), `M`, `N`, `K` (i32). Grid
//! `(ceil(N / block_n), ceil(M / block_m), 1)`, `32 · warps_m · warps_n` threads, dynamic shared
//! memory of [`GemmLaunch::dynamic_shared_bytes`] (above 48 KiB the runtime must raise the
//! kernel's limit first). Any M and N work; K must be a multiple of 8 (16-byte rows for cp.async).

use inkwell::values::IntValue;

use super::tile::{
    AccumulatorShape, AccumulatorTile, GlobalTile, MmaAccumulator, OperandA, OperandB, SharedLayout, SharedTile,
    copy_global_to_shared_async, mma, store_accumulator,
};
use super::{Elem, KernelBuilder, ParamKind, PtxModule, Result, SpecialRegister, unsupported};

/// Tile sizes and warp grid of the GEMM kernel.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GemmConfig {
    pub name: String,
    /// Element type of A, B and C.
    pub elem: Elem,
    pub block_m: u32,
    pub block_n: u32,
    pub block_k: u32,
    pub warps_m: u32,
    pub warps_n: u32,
}

/// Shared-memory padding per row: 8 elements (16 bytes) keeps rows 16-byte aligned and moves
/// consecutive rows to different banks for ldmatrix.
const ROW_PADDING: SharedLayout = SharedLayout::RowMajor { pad_elems: 8 };
/// Double buffering: the next K slice is copied while the current one is multiplied.
const STAGES: u32 = 2;

/// What the runtime needs to launch an emitted GEMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GemmLaunch {
    pub threads: u32,
    pub dynamic_shared_bytes: u32,
    pub block_m: u32,
    pub block_n: u32,
}

impl GemmLaunch {
    pub fn grid(&self, m: u32, n: u32) -> [u32; 3] {
        [n.div_ceil(self.block_n), m.div_ceil(self.block_m), 1]
    }
}

impl GemmConfig {
    /// A human-readable description used as part of the cache key.
    pub fn describe(&self) -> String {
        format!(
            "gemm {} elem={} tile={}x{}x{} warps={}x{} stages={STAGES}",
            self.name,
            self.elem.name(),
            self.block_m,
            self.block_n,
            self.block_k,
            self.warps_m,
            self.warps_n
        )
    }
}

/// Emits the GEMM kernel into `module`.
pub fn emit_gemm<'ctx>(module: &PtxModule<'ctx>, config: &GemmConfig) -> Result<GemmLaunch> {
    if config.elem == Elem::F32 {
        return unsupported("the GEMM multiplies bf16 or f16 inputs");
    }
    let accumulator = AccumulatorShape {
        rows: config.block_m,
        cols: config.block_n,
        layout: MmaAccumulator { warps_m: config.warps_m, warps_n: config.warps_n },
    };
    accumulator.validate()?;
    let threads = accumulator.threads();
    let a_bytes = SharedTile::footprint_bytes(config.elem, config.block_m, config.block_k, ROW_PADDING);
    let b_bytes = SharedTile::footprint_bytes(config.elem, config.block_n, config.block_k, ROW_PADDING);
    let stage_bytes = a_bytes + b_bytes;
    let dynamic_shared_bytes = STAGES * stage_bytes;

    let params = [
        ParamKind::GlobalPointer("a".into()),
        ParamKind::GlobalPointer("b".into()),
        ParamKind::GlobalPointer("c".into()),
        ParamKind::Size("M".into()),
        ParamKind::Size("N".into()),
        ParamKind::Size("K".into()),
    ];
    let shared = module.dynamic_shared(&format!("{}_shared", config.name));
    let kb = module.declare_kernel(&config.name, &params)?;
    let (m, n, k) = (kb.size_param("M")?, kb.size_param("N")?, kb.size_param("K")?);
    let row_start = kb.mul(kb.special_register(SpecialRegister::BlockY)?, kb.i32(config.block_m as i64))?;
    let col_start = kb.mul(kb.special_register(SpecialRegister::BlockX)?, kb.i32(config.block_n as i64))?;

    let stage_tiles = |kb: &KernelBuilder<'_, 'ctx>, stage: IntValue<'ctx>| -> Result<(SharedTile<'ctx>, SharedTile<'ctx>)> {
        let stage_base = kb.byte_pointer(shared, kb.mul(stage, kb.i32(stage_bytes as i64))?)?;
        let a_tile = SharedTile { base: stage_base, elem: config.elem, rows: config.block_m, cols: config.block_k, layout: ROW_PADDING };
        let b_base = kb.byte_pointer(stage_base, kb.i32(a_bytes as i64))?;
        let b_tile = SharedTile { base: b_base, elem: config.elem, rows: config.block_n, cols: config.block_k, layout: ROW_PADDING };
        Ok((a_tile, b_tile))
    };
    let global_tiles = |kb: &KernelBuilder<'_, 'ctx>, k_start: IntValue<'ctx>| -> Result<(GlobalTile<'ctx>, GlobalTile<'ctx>)> {
        let a = GlobalTile {
            base: kb.pointer_param("a")?,
            elem: config.elem,
            row_stride: k,
            alignment_elems: 8,
            row_start,
            col_start: k_start,
            row_limit: m,
            col_limit: k,
        };
        let b = GlobalTile { base: kb.pointer_param("b")?, row_start: col_start, row_limit: n, ..a };
        Ok((a, b))
    };
    let issue_stage = |kb: &KernelBuilder<'_, 'ctx>, k_tile: IntValue<'ctx>| -> Result<()> {
        let k_start = kb.mul(k_tile, kb.i32(config.block_k as i64))?;
        let (a_global, b_global) = global_tiles(kb, k_start)?;
        let (a_shared, b_shared) = stage_tiles(kb, kb.rem(k_tile, kb.i32(STAGES as i64))?)?;
        copy_global_to_shared_async(kb, &a_global, &a_shared, threads)?;
        copy_global_to_shared_async(kb, &b_global, &b_shared, threads)
    };

    let acc = AccumulatorTile::new(&kb, accumulator)?;
    acc.fill(&kb, 0.0)?;
    let k_tiles = kb.ceil_div(k, config.block_k)?;
    issue_stage(&kb, kb.i32(0))?;
    kb.cp_async_commit()?;
    kb.for_range(kb.i32(0), k_tiles, |kb, k_tile| {
        let next = kb.add(k_tile, kb.i32(1))?;
        kb.if_then(kb.lt(next, k_tiles)?, |kb| issue_stage(kb, next))?;
        // Always commit (an empty group on the last step) so that "wait until one group is
        // pending" means "the current stage has landed".
        kb.cp_async_commit()?;
        kb.cp_async_wait(1)?;
        kb.barrier()?;
        let (a_shared, b_shared) = stage_tiles(kb, kb.rem(k_tile, kb.i32(STAGES as i64))?)?;
        mma(kb, &acc, OperandA::Shared(&a_shared), OperandB::NByK(&b_shared))?;
        // The next iteration's copy overwrites the stage just read.
        kb.barrier()
    })?;
    let c = GlobalTile {
        base: kb.pointer_param("c")?,
        elem: config.elem,
        row_stride: n,
        alignment_elems: 1,
        row_start,
        col_start,
        row_limit: m,
        col_limit: n,
    };
    store_accumulator(&kb, &acc, &c)?;
    kb.finish()?;
    Ok(GemmLaunch { threads, dynamic_shared_bytes, block_m: config.block_m, block_n: config.block_n })
}
