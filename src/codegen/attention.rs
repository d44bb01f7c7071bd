//! Flash-attention forward (the plan's `attention` kernel) built only from the tile emitters.
//!
//! One CTA computes `block_m` query rows of one query head of one batch element: Q is copied to
//! shared memory once, then K/V tiles of `block_n` keys stream through two cp.async stages.
//! Per tile: `S = Q · Kᵀ`, the mask (only on tiles that cross the causal diagonal or the end
//! of the sequence), online softmax in f32 with exp2 (log2(e) folded into the scale), `P` rounded
//! to the storage type in registers, `O += P · V`. At the end `O / l` and `lse = m + ln(l)` (natural
//! log) are stored. GQA: query head `h` reads kv head `h / (q_heads / kv_heads)`.
//!
//! Parameters (ABI order): `q [B, S, Hq, d]`, `k [B, S, Hk, d]`, `v [B, S, Hk, d]`,
//! `o [B, S, Hq, d]` in the storage type, `lse [B, Hq, S]` f32, then `B`, `S` (i32).
//! Grid `(ceil(S / block_m), Hq, B)`; dynamic shared memory of [`AttentionLaunch::dynamic_shared_bytes`].

use inkwell::values::IntValue;

use super::tile::{
    AccumulatorShape, AccumulatorTile, GlobalTile, MmaAccumulator, OperandA, OperandB, RowReduction, RowVector,
    SharedLayout, SharedTile, convert_to_operand_a, copy_global_to_shared_async, map_accumulator, mma, row_reduce,
    store_accumulator, store_row_vector,
};
use super::{Elem, KernelBuilder, ParamKind, PtxModule, Result, SpecialRegister, unsupported};
use crate::ir::size::SizeExpr;

/// Which (query, key) pairs take part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttentionMask {
    /// Every key of the sequence.
    Full,
    /// Key position ≤ query position.
    Causal,
}

/// The inputs that shape the attention kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct AttentionConfig {
    pub name: String,
    /// Storage type of q, k, v, o (bf16 or f16).
    pub elem: Elem,
    pub head_dim: u32,
    pub q_heads: u32,
    pub kv_heads: u32,
    pub mask: AttentionMask,
    /// Multiplies q·k before the softmax (usually 1/√d).
    pub softmax_scale: f64,
    /// Query rows per CTA; split over `warps` warps of 16·k rows each.
    pub block_m: u32,
    /// Keys per K/V tile.
    pub block_n: u32,
    pub warps: u32,
}

impl AttentionConfig {
    /// A human-readable description used as part of the cache key.
    pub fn describe(&self) -> String {
        format!(
            "attention {} elem={} d={} hq={} hk={} mask={:?} scale={:e} tile={}x{} warps={} stages={STAGES}",
            self.name,
            self.elem.name(),
            self.head_dim,
            self.q_heads,
            self.kv_heads,
            self.mask,
            self.softmax_scale,
            self.block_m,
            self.block_n,
            self.warps
        )
    }
}

const ROW_PADDING: SharedLayout = SharedLayout::RowMajor { pad_elems: 8 };
const STAGES: u32 = 2;

/// What the runtime needs to launch an emitted attention kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionLaunch {
    pub threads: u32,
    /// Above 48 KiB the runtime must raise the kernel's dynamic shared memory limit first.
    pub dynamic_shared_bytes: u32,
    /// `[ceil(S / block_m), Hq, B]`.
    pub grid: [SizeExpr; 3],
}

/// Emits the attention forward kernel into `module`.
pub fn emit_attention<'ctx>(module: &PtxModule<'ctx>, config: &AttentionConfig) -> Result<AttentionLaunch> {
    if config.elem == Elem::F32 {
        return unsupported("attention operands are bf16 or f16");
    }
    if config.kv_heads == 0 || !config.q_heads.is_multiple_of(config.kv_heads) {
        return unsupported(format!("{} query heads do not group over {} kv heads", config.q_heads, config.kv_heads));
    }
    if !config.head_dim.is_multiple_of(16) || !config.block_n.is_multiple_of(16) {
        return unsupported("head_dim and block_n must be multiples of 16");
    }
    let group = config.q_heads / config.kv_heads;
    let layout = MmaAccumulator { warps_m: config.warps, warps_n: 1 };
    let scores_shape = AccumulatorShape { rows: config.block_m, cols: config.block_n, layout };
    let output_shape = AccumulatorShape { rows: config.block_m, cols: config.head_dim, layout };
    scores_shape.validate()?;
    output_shape.validate()?;
    let threads = scores_shape.threads();
    let q_bytes = SharedTile::footprint_bytes(config.elem, config.block_m, config.head_dim, ROW_PADDING);
    let kv_bytes = SharedTile::footprint_bytes(config.elem, config.block_n, config.head_dim, ROW_PADDING);
    let stage_bytes = 2 * kv_bytes;
    let dynamic_shared_bytes = q_bytes + STAGES * stage_bytes;

    let params = [
        ParamKind::GlobalPointer("q".into()),
        ParamKind::GlobalPointer("k".into()),
        ParamKind::GlobalPointer("v".into()),
        ParamKind::GlobalPointer("o".into()),
        ParamKind::GlobalPointer("lse".into()),
        ParamKind::Size("B".into()),
        ParamKind::Size("S".into()),
    ];
    let shared = module.dynamic_shared(&format!("{}_shared", config.name));
    let kb = module.declare_kernel(&config.name, &params)?;
    let seq_len = kb.size_param("S")?;
    let query_start = kb.mul(kb.special_register(SpecialRegister::BlockX)?, kb.i32(config.block_m as i64))?;
    let head = kb.special_register(SpecialRegister::BlockY)?;
    let batch = kb.special_register(SpecialRegister::BlockZ)?;
    let kv_head = kb.div(head, kb.i32(group as i64))?;

    // Views of one (batch, head) as [S, d] row-major matrices with a row stride of heads · d.
    let head_view = |kb: &KernelBuilder<'_, 'ctx>, name: &str, heads: u32, head: IntValue<'ctx>, row_start| {
        let first = kb.builder().build_int_add(
            kb.builder().build_int_mul(kb.to_i64(kb.mul(batch, seq_len)?)?, kb.context().i64_type().const_int(heads as u64, false), "")?,
            kb.to_i64(head)?,
            "",
        )?;
        let base_offset = kb.builder().build_int_mul(first, kb.context().i64_type().const_int(config.head_dim as u64, false), "")?;
        Ok::<_, super::CodegenError>(GlobalTile {
            base: kb.element_pointer(kb.pointer_param(name)?, config.elem, base_offset)?,
            elem: config.elem,
            row_stride: kb.i32((heads * config.head_dim) as i64),
            alignment_elems: config.head_dim,
            row_start,
            col_start: kb.i32(0),
            row_limit: seq_len,
            col_limit: kb.i32(config.head_dim as i64),
        })
    };
    let shared_tile = |base, rows| SharedTile { base, elem: config.elem, rows, cols: config.head_dim, layout: ROW_PADDING };
    let q_shared = shared_tile(shared, config.block_m);
    let stage_tiles = |kb: &KernelBuilder<'_, 'ctx>, stage: IntValue<'ctx>| -> Result<(SharedTile<'ctx>, SharedTile<'ctx>)> {
        let stage_offset = kb.add(kb.i32(q_bytes as i64), kb.mul(stage, kb.i32(stage_bytes as i64))?)?;
        let k_base = kb.byte_pointer(shared, stage_offset)?;
        let v_base = kb.byte_pointer(k_base, kb.i32(kv_bytes as i64))?;
        Ok((shared_tile(k_base, config.block_n), shared_tile(v_base, config.block_n)))
    };
    let issue_kv = |kb: &KernelBuilder<'_, 'ctx>, tile: IntValue<'ctx>| -> Result<()> {
        let key_start = kb.mul(tile, kb.i32(config.block_n as i64))?;
        let (k_shared, v_shared) = stage_tiles(kb, kb.rem(tile, kb.i32(STAGES as i64))?)?;
        copy_global_to_shared_async(kb, &head_view(kb, "k", config.kv_heads, kv_head, key_start)?, &k_shared, threads)?;
        copy_global_to_shared_async(kb, &head_view(kb, "v", config.kv_heads, kv_head, key_start)?, &v_shared, threads)
    };

    let output = AccumulatorTile::new(&kb, output_shape)?;
    let scores = AccumulatorTile::new(&kb, scores_shape)?;
    let running_max = RowVector::new(&kb, scores_shape)?;
    let running_sum = RowVector::new(&kb, scores_shape)?;
    let tile_stat = RowVector::new(&kb, scores_shape)?;
    let shift = RowVector::new(&kb, scores_shape)?;
    let rescale = RowVector::new(&kb, scores_shape)?;
    output.fill(&kb, 0.0)?;
    running_max.fill(&kb, f64::NEG_INFINITY)?;
    running_sum.fill(&kb, 0.0)?;

    // Causal: key tiles past this query tile's last row are skipped entirely.
    let key_tiles_in_sequence = kb.ceil_div(seq_len, config.block_n)?;
    let key_tiles = match config.mask {
        AttentionMask::Full => key_tiles_in_sequence,
        AttentionMask::Causal => {
            let query_end = kb.add(query_start, kb.i32(config.block_m as i64))?;
            kb.min(kb.ceil_div(query_end, config.block_n)?, key_tiles_in_sequence)?
        }
    };
    let scale_log2 = config.softmax_scale * std::f64::consts::LOG2_E;

    copy_global_to_shared_async(&kb, &head_view(&kb, "q", config.q_heads, head, query_start)?, &q_shared, threads)?;
    issue_kv(&kb, kb.i32(0))?;
    kb.cp_async_commit()?;
    kb.for_range(kb.i32(0), key_tiles, |kb, tile| {
        let next = kb.add(tile, kb.i32(1))?;
        kb.if_then(kb.lt(next, key_tiles)?, |kb| issue_kv(kb, next))?;
        kb.cp_async_commit()?;
        kb.cp_async_wait(1)?;
        kb.barrier()?;
        let (k_shared, v_shared) = stage_tiles(kb, kb.rem(tile, kb.i32(STAGES as i64))?)?;

        scores.fill(kb, 0.0)?;
        mma(kb, &scores, OperandA::Shared(&q_shared), OperandB::NByK(&k_shared))?;

        // Only tiles reaching past the sequence end or (causal) past the first query row need
        // the per-element mask; all others just scale.
        let key_start = kb.mul(tile, kb.i32(config.block_n as i64))?;
        let key_end = kb.add(key_start, kb.i32(config.block_n as i64))?;
        let past_sequence = kb.lt(seq_len, key_end)?;
        let needs_mask = match config.mask {
            AttentionMask::Full => past_sequence,
            AttentionMask::Causal => kb.or(past_sequence, kb.lt(query_start, key_end)?)?,
        };
        kb.if_else(
            needs_mask,
            |kb| {
                map_accumulator(kb, &scores, |kb, position, value| {
                    let key = kb.add(key_start, position.col)?;
                    let mut allowed = kb.lt(key, seq_len)?;
                    if config.mask == AttentionMask::Causal {
                        let query = kb.add(query_start, position.row)?;
                        allowed = kb.and(allowed, kb.le(key, query)?)?;
                    }
                    let scaled = kb.fmul(value, kb.f32(scale_log2))?;
                    kb.select_f32(allowed, scaled, kb.f32(f64::NEG_INFINITY))
                })
            },
            |kb| map_accumulator(kb, &scores, |kb, _, value| kb.fmul(value, kb.f32(scale_log2))),
        )?;

        // Online softmax, all in log2 units.
        row_reduce(kb, &scores, RowReduction::Max, &tile_stat)?;
        for slot in 0..running_max.slot_count() {
            let previous = running_max.get(kb, slot)?;
            let new_max = kb.fmax(previous, tile_stat.get(kb, slot)?)?;
            // A row with no allowed key so far keeps max -inf; subtract 0 so exp2 gives 0, not NaN.
            let no_keys = kb.feq(new_max, kb.f32(f64::NEG_INFINITY))?;
            let used = kb.select_f32(no_keys, kb.f32(0.0), new_max)?;
            running_max.set(kb, slot, new_max)?;
            shift.set(kb, slot, used)?;
            rescale.set(kb, slot, kb.exp2_approx(kb.fsub(previous, used)?)?)?;
        }
        map_accumulator(kb, &scores, |kb, position, value| kb.exp2_approx(kb.fsub(value, shift.get(kb, position.row_slot)?)?))?;
        row_reduce(kb, &scores, RowReduction::Sum, &tile_stat)?;
        for slot in 0..running_sum.slot_count() {
            let decayed = kb.fmul(running_sum.get(kb, slot)?, rescale.get(kb, slot)?)?;
            running_sum.set(kb, slot, kb.fadd(decayed, tile_stat.get(kb, slot)?)?)?;
        }
        map_accumulator(kb, &output, |kb, position, value| kb.fmul(value, rescale.get(kb, position.row_slot)?))?;

        let probabilities = convert_to_operand_a(kb, &scores, config.elem)?;
        mma(kb, &output, OperandA::Registers(&probabilities), OperandB::KByN(&v_shared))?;
        // The next iteration's copy overwrites the stage just read.
        kb.barrier()
    })?;

    // O / l, and lse = (m + log2 l) · ln 2; rows without any key (l = 0) give O = 0, lse = -inf.
    // From here on `running_sum` holds 1 / l.
    running_sum.map(&kb, |kb, _, sum| {
        let empty = kb.feq(sum, kb.f32(0.0))?;
        let inverse = kb.fdiv(kb.f32(1.0), sum)?;
        kb.select_f32(empty, kb.f32(0.0), inverse)
    })?;
    map_accumulator(&kb, &output, |kb, position, value| kb.fmul(value, running_sum.get(kb, position.row_slot)?))?;
    store_accumulator(&kb, &output, &head_view(&kb, "o", config.q_heads, head, query_start)?)?;
    let log_sum_exp = RowVector::new(&kb, scores_shape)?;
    for slot in 0..log_sum_exp.slot_count() {
        let inverse_sum = running_sum.get(&kb, slot)?;
        let empty = kb.feq(inverse_sum, kb.f32(0.0))?;
        // log2(l) = -log2(1/l).
        let log2_sum = kb.fsub(kb.f32(0.0), kb.log2_approx(inverse_sum)?)?;
        let lse = kb.fmul(kb.fadd(running_max.get(&kb, slot)?, log2_sum)?, kb.f32(std::f64::consts::LN_2))?;
        log_sum_exp.set(&kb, slot, kb.select_f32(empty, kb.f32(f64::NEG_INFINITY), lse)?)?;
    }
    let lse_row_base = {
        let rows = kb.builder().build_int_mul(
            kb.to_i64(kb.add(kb.mul(batch, kb.i32(config.q_heads as i64))?, head)?)?,
            kb.to_i64(seq_len)?,
            "",
        )?;
        kb.element_pointer(kb.pointer_param("lse")?, Elem::F32, rows)?
    };
    store_row_vector(&kb, &log_sum_exp, lse_row_base, query_start, seq_len)?;
    kb.finish()?;
    Ok(AttentionLaunch {
        threads,
        dynamic_shared_bytes,
        grid: [SizeExpr::seq_len().ceil_div(config.block_m as u64), SizeExpr::c(config.q_heads as u64), SizeExpr::batch()],
    })
}
