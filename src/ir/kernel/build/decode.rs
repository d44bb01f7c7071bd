//! The decode entry point's kernels: one new token for each of B sequences over a paged KV
//! cache. The projections are the forward's GEMMs over the B tokens as rows
//! (`decode_qkv_proj`, `decode_out_proj`), the delayed value heads' product kept for the next
//! step instead of read from the previous token; the q/k prologue runs after each sequence's
//! convolution state (`decode_qk_prologue`); `kv_append` writes the token's k and v into its
//! page (the delayed value heads from the shift state, which it moves on); `decode_attention`
//! (one CTA per key partition, kv head and sequence, the query heads of the group as the MMA
//! rows, keys gathered page by page through the block table) and `decode_merge` (its
//! partitions merged by log-sum-exp) attend over the pages.
//!
//! The prefill entry point's kernels run over a packed batch (sequence b = rows cu_seqlens[b] ..
//! cu_seqlens[b + 1] of one [1, S] batch), each sequence continuing the tokens its pages and
//! state hold: the forward's projection GEMMs over the packed rows (`prefill_qkv_proj`,
//! `prefill_out_proj`), the prologue after each sequence's convolution state
//! (`prefill_qk_prologue`), `prefill_cache` (the new k and v into the pages, the state moved on),
//! `prefill_attention` (the forward's attention over each sequence's own new tokens) and
//! `prefill_cached_attention` (the new tokens against the cached keys, merged by log-sum-exp).
//!
//! The caller's `seq_lens[b]` counts sequence b's tokens with the new ones (0: an empty slot,
//! which writes nothing into the cache or its state and gets 0).

use super::*;

/// A paged KV cache's geometry and how the decode attention splits it: k and v each
/// [pages, page_size, Hk, d]; `partition_keys` keys per CTA (a multiple of the key tile).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedKv {
    pub page_size: u32,
    pub partition_keys: u32,
}

impl PagedKv {
    /// Pages of 16 tokens (vLLM's default), 512 keys per attention CTA.
    pub const DEFAULT: PagedKv = PagedKv { page_size: 16, partition_keys: 512 };
}

/// The caller's convolution state [B, P, T]: raw P0 of each sequence's last T tokens.
pub const CONV_STATE: &str = "conv_state";
/// The caller's shift state [B, s·d]: the previous token's x·W_v2ᵀ (no bias).
pub const SHIFT_STATE: &str = "shift_state";
/// This step's x·W_v2ᵀ, the next shift state.
pub const SHIFT_NEXT: &str = "shift_next";

/// Which decode kernel to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecodeKernel {
    Projection,
    Prologue,
    Append,
    Attention,
    Merge,
    OutputProjection,
    /// The prefill entry point's kernels over a packed batch ([1, S] token rows, sequence b
    /// rows cu_seqlens[b] .. cu_seqlens[b + 1]): the forward's projection GEMMs over the rows,
    /// the prologue after each sequence's state, the new tokens' k and v into the pages with
    /// the state moved on, attention of the new tokens over their own keys, then over their
    /// sequences' cached keys in the pages, merged.
    PrefillProjection,
    PrefillPrologue,
    CacheFill,
    PrefillAttention,
    PrefillCachedAttention,
    PrefillOutputProjection,
}

impl DecodeKernel {
    pub fn suffix(self) -> &'static str {
        match self {
            DecodeKernel::Projection => "decode_qkv_proj",
            DecodeKernel::Prologue => "decode_qk_prologue",
            DecodeKernel::Append => "kv_append",
            DecodeKernel::Attention => "decode_attention",
            DecodeKernel::Merge => "decode_merge",
            DecodeKernel::OutputProjection => "decode_out_proj",
            DecodeKernel::PrefillProjection => "prefill_qkv_proj",
            DecodeKernel::PrefillPrologue => "prefill_qk_prologue",
            DecodeKernel::CacheFill => "prefill_cache",
            DecodeKernel::PrefillAttention => "prefill_attention",
            DecodeKernel::PrefillCachedAttention => "prefill_cached_attention",
            DecodeKernel::PrefillOutputProjection => "prefill_out_proj",
        }
    }

    /// The kernels of a prefill of `spec`, in launch order.
    pub fn prefill_launched_by(spec: &AttentionSpec) -> Vec<DecodeKernel> {
        use DecodeKernel::*;
        let prologue = has_qk_prologue(spec).then_some(PrefillPrologue);
        [Some(PrefillProjection), prologue, Some(CacheFill), Some(PrefillAttention), Some(PrefillCachedAttention), Some(PrefillOutputProjection)]
            .into_iter()
            .flatten()
            .collect()
    }

    /// The kernels of a decode step of `spec`, in launch order.
    pub fn launched_by(spec: &AttentionSpec) -> Vec<DecodeKernel> {
        use DecodeKernel::*;
        let prologue = has_qk_prologue(spec).then_some(Prologue);
        [Some(Projection), prologue, Some(Append), Some(Attention), Some(Merge), Some(OutputProjection)].into_iter().flatten().collect()
    }
}

/// The projection's column segments in a decode step: the forward's, but the delayed value
/// heads' product is of this token's x, without the bias, into [`SHIFT_NEXT`] (the next step's
/// shift state); this step's delayed heads come from the shift state.
pub fn decode_projection_segments(spec: &AttentionSpec) -> Vec<ProjectionSegment> {
    projection_segments(spec)
        .into_iter()
        .map(|segment| match segment.row_shift {
            0 => segment,
            _ => ProjectionSegment { bias: None, output: SHIFT_NEXT.into(), column0: 0, row_shift: 0, ..segment },
        })
        .collect()
}

/// The projections' schedules over a decode step's few token rows, best first: a GEMM of
/// B ≤ 256 rows reads each weight once per 64-row tile, so its time is the weights' bytes over
/// the CTAs streaming them. Narrow column tiles give more CTAs, and deep 128-wide K chunks keep
/// more bytes in flight per CTA, in fewer steps, than the forward's 32-wide ones.
fn token_rows_schedules(spec: &AttentionSpec) -> Vec<Schedule> {
    let d = spec.head_dim as u32;
    [32, 16]
        .into_iter()
        .filter(|block_n| d.is_multiple_of(*block_n))
        .flat_map(|block_n| {
            [(128, 4), (64, 4), (32, 2)].map(|(block_k, stages)| Schedule { block_m: 64, block_n, block_k, warps: 4, stages })
        })
        .collect()
}

/// A forward kernel over [B, S] token rows run over the B tokens of a decode step as the rows
/// of one sequence ([1, B]).
fn over_token_rows(kernel: KernelFn, which: DecodeKernel, spec: &AttentionSpec) -> KernelFn {
    let mut kernel = kernel.with_sizes(&|var| match var {
        SizeVar::Batch => SizeExpr::c(1),
        SizeVar::SeqLen => SizeExpr::batch(),
        other => SizeExpr::Var(other),
    });
    kernel.name = format!("{}_{}", spec.name, which.suffix());
    kernel
}

/// A forward kernel over [B, S] token rows run over a packed prefill's S rows ([1, S]).
fn over_packed_rows(kernel: KernelFn, which: DecodeKernel, spec: &AttentionSpec) -> KernelFn {
    let mut kernel = TokenRows::Packed.sized(kernel);
    kernel.name = format!("{}_{}", spec.name, which.suffix());
    kernel
}

/// A per-sequence kernel built over S tokens run for the one token of a decode step.
fn one_token(kernel: KernelFn) -> KernelFn {
    kernel.with_sizes(&|var| if var == SizeVar::SeqLen { SizeExpr::c(1) } else { SizeExpr::Var(var) })
}

/// Key partitions of a sequence of at most blocks · page_size tokens.
fn partitions(paged: PagedKv) -> SizeExpr {
    (SizeExpr::blocks() * size(paged.page_size as usize)).ceil_div(paged.partition_keys as u64)
}

/// The first key the new token sees (its position is len − 1).
fn first_visible_key(spec: &AttentionSpec) -> Expr {
    match spec.mask {
        Mask::SlidingWindow { window } => (var("len") - int(window)).max(int(0)),
        Mask::None | Mask::Causal => int(0),
    }
}

pub fn build_decode(spec: &AttentionSpec, which: DecodeKernel, paged: PagedKv) -> Result<KernelFn, String> {
    let PagedKv { page_size, partition_keys } = paged;
    if page_size == 0 || !page_size.is_multiple_of(8) || page_size > 256 {
        return Err(format!("page size {page_size}: a multiple of 8 up to 256"));
    }
    // A key tile is whole pages and a multiple of 16 keys (the k of P·V on mma.sync).
    let key_tile = if page_size.is_multiple_of(16) { page_size } else { 2 * page_size };
    if partition_keys == 0 || !partition_keys.is_multiple_of(key_tile) {
        return Err(format!("{partition_keys} keys per partition: a multiple of the {key_tile}-key tile"));
    }
    let kernel = match which {
        DecodeKernel::Projection => {
            let segments = decode_projection_segments(spec);
            let (_, kernel) = first_that_builds(token_rows_schedules(spec), |s| build_qkv_proj(spec, s, &segments))
                .map_err(|error| format!("no decode_qkv_proj schedule fits: {error}"))?;
            over_token_rows(kernel, which, spec)
        }
        DecodeKernel::Prologue => {
            if !has_qk_prologue(spec) {
                return Err(format!("{} has no q/k step after the projection: its decode step launches no prologue", spec.name));
            }
            PrologueBuilder::new(spec, &default_schedule(spec, ForwardKernel::QkPrologue)?)?.build_decode()
        }
        DecodeKernel::Attention => decode_attention(spec, paged, key_tile)?,
        DecodeKernel::Merge => decode_merge(spec, paged)?,
        DecodeKernel::Append => kv_append(spec, paged)?,
        DecodeKernel::OutputProjection => {
            let (_, kernel) = first_that_builds(token_rows_schedules(spec), |s| build_out_proj(spec, s))
                .map_err(|error| format!("no decode_out_proj schedule fits: {error}"))?;
            over_token_rows(kernel, which, spec)
        }
        DecodeKernel::PrefillProjection => {
            let schedule = default_schedule(spec, ForwardKernel::QkvProjection)?;
            over_packed_rows(build_qkv_proj(spec, &schedule, &projection_segments(spec))?, which, spec)
        }
        DecodeKernel::PrefillPrologue => {
            if !has_qk_prologue(spec) {
                return Err(format!("{} has no q/k step after the projection: its prefill launches no prologue", spec.name));
            }
            PrologueBuilder::new(spec, &default_schedule(spec, ForwardKernel::QkPrologue)?)?.build_packed()
        }
        DecodeKernel::CacheFill => prefill_cache(spec, paged)?,
        DecodeKernel::PrefillAttention => {
            let schedule = default_schedule(spec, ForwardKernel::Attention)?;
            let mut kernel = build_token_rows_attention(spec, &schedule, TokenRows::Packed)?;
            kernel.name = format!("{}_{}", spec.name, which.suffix());
            kernel
        }
        DecodeKernel::PrefillCachedAttention => {
            // Key tiles of 64 where pages tile them (or they tile pages), else the decode's.
            let tile = if 64 % page_size == 0 || page_size % 64 == 0 { 64 } else { key_tile };
            let candidates = [2, 1].map(|stages| Schedule { block_m: 64, block_n: tile, block_k: spec.head_dim as u32, warps: 4, stages });
            first_that_builds(candidates, |s| prefill_cached_attention(spec, paged, s).and_then(|kernel| verified(kernel, s)))
                .map_err(|error| format!("no prefill_cached_attention schedule fits: {error}"))?
                .1
        }
        DecodeKernel::PrefillOutputProjection => {
            let schedule = default_schedule(spec, ForwardKernel::OutputProjection)?;
            over_packed_rows(build_out_proj(spec, &schedule)?, which, spec)
        }
    };
    let schedule = kernel.schedule;
    verified(kernel, &schedule)
}

fn seq_lens_param() -> KernelParam {
    tensor("seq_lens", ElemType::I32, vec![SizeExpr::batch()], Access::Read)
}

/// Partial outputs of the partitions: o normalized by its own sum, and its log-sum-exp.
fn partial_params(spec: &AttentionSpec, paged: PagedKv, access: Access) -> [KernelParam; 2] {
    let (hq, d) = (spec.query_heads, spec.head_dim);
    [
        tensor("o_part", ElemType::F32, vec![SizeExpr::batch(), partitions(paged), size(hq), size(d)], access),
        tensor("lse_part", ElemType::F32, vec![SizeExpr::batch(), partitions(paged), size(hq)], access),
    ]
}

/// The cache's sizes (`tiled_kernel` appends the B and S every tiled kernel takes).
fn paged_size_params() -> [KernelParam; 2] {
    [KernelParam::Size(SizeVar::Pages), KernelParam::Size(SizeVar::Blocks)]
}

/// CTA = keys [part · partition_keys, +partition_keys) of sequence b's kv head: the group's
/// query heads (rows, padded to whole 16-row bands) against key tiles of whole pages, copied
/// through a ring by cp.async from the pages the block table names (rows past the sequence's
/// length read zero), with the forward's online softmax; writes its normalized o and lse.
fn decode_attention(spec: &AttentionSpec, paged: PagedKv, key_tile: u32) -> Result<KernelFn, String> {
    let storage: ElemType = spec.dtype.into();
    let (d, g) = (spec.head_dim as u32, spec.groups() as u32);
    let (page_size, bn) = (paged.page_size, key_tile);
    let pages_per_tile = bn / page_size;
    let rows = g.div_ceil(16) * 16;
    let warps = rows / 16;
    let stages = 2;
    let mut t = Tiles { decls: Vec::new() };
    let q_s = t.shared("q_s", storage, rows, d);
    let k_s = t.shared("k_s", storage, stages * bn, d);
    let v_s = t.shared("v_s", storage, stages * bn, d);
    let softmax = OnlineSoftmax::declare(&mut t, storage, rows, bn, d, warps, 1);
    let w = |id: TileId| t.whole(id);
    let group_heads = |len: u32| GlobalDim::Span {
        start: var("kv_head") * int(g),
        len,
        valid: Some((var("kv_head") * int(g), (var("kv_head") + int(1)) * int(g))),
    };
    let slot_view = |tile: TileId, slot: Expr| t.view(tile, times(slot, bn), int(0), bn, d);
    // Key tile kv_first + tile: its pages, each from the page the block table names. A page
    // past the sequence's last (the second page of its last tile) reads the last page's entry
    // instead, and its rows are past the length, so zeros; a page wholly before a sliding
    // window (the first page of its first tile) reads the window's first page, and its keys
    // are masked: entries outside the pages a token sees are never read and may hold anything
    // (a server may free them).
    let load = |tile: Expr, slot: Expr| -> Vec<Stmt> {
        let mut stmts = vec![let_("load_tile", var("kv_first") + tile)];
        for p in 0..pages_per_tile {
            let block = var("load_tile") * int(pages_per_tile) + int(p);
            let last_block = (var("len") - int(1)).floor_div(int(page_size));
            let first_block = var("first_key").floor_div(int(page_size));
            let page = Expr::global("block_table", vec![var("b"), block.clone().max(first_block).min(last_block)]);
            let rows_valid = var("len") - block * int(page_size);
            for (param, ring) in [("k_cache", k_s), ("v_cache", v_s)] {
                stmts.push(Stmt::Copy {
                    dst: t.view(ring, times(slot.clone(), bn) + int(p * page_size), int(0), page_size, d),
                    src: GlobalTile {
                        param: param.into(),
                        dims: vec![
                            GlobalDim::At(page.clone()),
                            GlobalDim::Span { start: int(0), len: page_size, valid: Some((int(0), rows_valid.clone())) },
                            GlobalDim::At(var("kv_head")),
                            span(int(0), d),
                        ],
                    },
                    is_async: true,
                });
            }
        }
        stmts
    };
    let key = var("k_col0") + Expr::Col;
    let mut visible = key.clone().lt(var("len"));
    let mut unmasked = (var("k_col0") + int(bn)).le(var("len"));
    if let Mask::SlidingWindow { .. } = spec.mask {
        visible = visible.and(var("first_key").le(key));
        unmasked = unmasked.and(var("first_key").le(var("k_col0")));
    }
    let scale = Expr::Float(spec.softmax_scale);
    let compute = |step: Expr, slot: Expr| -> Vec<Stmt> {
        let mut stmts = vec![let_("k_col0", (var("kv_first") + step) * int(bn))];
        stmts.extend(softmax.step(&t, w(q_s), slot_view(k_s, slot.clone()), slot_view(v_s, slot), &scale, unmasked.clone(), visible.clone()));
        stmts
    };
    let tiles_per_partition = paged.partition_keys / bn;
    let mut work = vec![
        Stmt::Copy {
            dst: w(q_s),
            src: GlobalTile { param: "q".into(), dims: vec![GlobalDim::At(var("b")), group_heads(rows), span(int(0), d)] },
            is_async: true,
        },
        Stmt::AsyncCommit,
        Stmt::AsyncWait { pending: 0 },
        Stmt::Barrier,
    ];
    work.extend(softmax.start(&t));
    work.extend(pipelined_loop("kv_step", var("kv_count"), stages, &load, &compute));
    work.extend([softmax.normalize(&t), softmax.log_sum_exp(&t)]);
    let partial = |param: &str, last: Option<u32>| GlobalTile {
        param: param.into(),
        dims: [GlobalDim::At(var("b")), GlobalDim::At(var("part")), group_heads(rows)].into_iter().chain(last.map(|d| span(int(0), d))).collect(),
    };
    work.extend([
        Stmt::Store { src: w(softmax.o), dst: partial("o_part", Some(d)) },
        Stmt::Store { src: w(softmax.m), dst: partial("lse_part", None) },
    ]);
    let body = vec![
        Stmt::Note(format!(
            "CTA = keys of partition part (of {} keys) of kv head kv_head of sequence b; rows = the group's {g} query heads; key tiles of {bn} ({pages_per_tile} page(s) of {page_size})",
            paged.partition_keys
        )),
        let_("part", Expr::BlockIdx(Axis::X)),
        let_("kv_head", Expr::BlockIdx(Axis::Y)),
        let_("b", Expr::BlockIdx(Axis::Z)),
        let_("len", Expr::global("seq_lens", vec![var("b")])),
        let_("first_key", first_visible_key(spec)),
        Stmt::Note("the key tiles of this partition the new token sees (none: nothing to write, the merge skips it)".into()),
        let_("kv_first", (var("part") * int(tiles_per_partition)).max(var("first_key").floor_div(int(bn)))),
        let_("kv_count", ((var("part") + int(1)) * int(tiles_per_partition)).min(var("len").ceil_div(int(bn))) - var("kv_first")),
        Stmt::If { cond: int(0).lt(var("kv_count")), then_body: work, else_body: Vec::new() },
    ];
    let (hq, hk) = (spec.query_heads, spec.kv_heads);
    let cache_shape = || vec![SizeExpr::pages(), size(page_size as usize), size(hk), size(spec.head_dim)];
    let mut params = vec![
        tensor("q", storage, vec![SizeExpr::batch(), size(hq), size(spec.head_dim)], Access::Read),
        tensor("k_cache", storage, cache_shape(), Access::Read),
        tensor("v_cache", storage, cache_shape(), Access::Read),
        tensor("block_table", ElemType::I32, vec![SizeExpr::batch(), SizeExpr::blocks()], Access::Read),
        seq_lens_param(),
    ];
    params.extend(partial_params(spec, paged, Access::Write));
    params.extend(paged_size_params());
    let schedule = Schedule { block_m: rows, block_n: bn, block_k: d, warps, stages };
    let name = format!("{}_{}", spec.name, DecodeKernel::Attention.suffix());
    Ok(one_token(tiled_kernel(name, params, [partitions(paged), size(hk), SizeExpr::batch()], &schedule, t, body)))
}

/// CTA = query head h of sequence b: o = Σ_p exp(lse_p − max) · o_p / Σ_p exp(lse_p − max) over
/// the partitions the attention wrote (those holding a key the new token sees), in storage type.
fn decode_merge(spec: &AttentionSpec, paged: PagedKv) -> Result<KernelFn, String> {
    let storage: ElemType = spec.dtype.into();
    let d = spec.head_dim as u32;
    let mut t = Tiles { decls: Vec::new() };
    let column = |t: &mut Tiles, name: &str, rows: u32| t.add(name, TileType { elem: ElemType::F32, rows, cols: 1, layout: Layout::RowMajor { pad: 0 } });
    let o_s = column(&mut t, "o_s", d);
    let max_s = column(&mut t, "max_s", 1);
    let sum_s = column(&mut t, "sum_s", 1);
    let w = |id: TileId| t.whole(id);
    let lse = || Expr::global("lse_part", vec![var("b"), var("p"), var("h")]);
    let weight = || (lse() - Expr::tile(max_s, int(0), int(0))).exp();
    // Each step reads what the last one wrote (the hazard rule does not track which thread
    // owns an element): a barrier closes every step.
    let parts = |mut body: Vec<Stmt>| {
        body.push(Stmt::Barrier);
        for_("p", var("first_part"), var("end_part"), body)
    };
    let body = vec![
        Stmt::Note("CTA = query head h of sequence b; the partitions holding a visible key".into()),
        let_("h", Expr::BlockIdx(Axis::X)),
        let_("b", Expr::BlockIdx(Axis::Y)),
        let_("len", Expr::global("seq_lens", vec![var("b")])),
        let_("first_key", first_visible_key(spec)),
        let_("first_part", var("first_key").floor_div(int(paged.partition_keys))),
        let_("end_part", var("len").ceil_div(int(paged.partition_keys))),
        Stmt::Fill { dst: w(max_s), value: f64::NEG_INFINITY },
        Stmt::Fill { dst: w(sum_s), value: 0.0 },
        Stmt::Fill { dst: w(o_s), value: 0.0 },
        Stmt::Barrier,
        parts(vec![Stmt::Map { dst: w(max_s), expr: Expr::Elem.max(lse()) }]),
        parts(vec![
            Stmt::Map { dst: w(sum_s), expr: Expr::Elem + weight() },
            Stmt::Map { dst: w(o_s), expr: Expr::Elem + weight() * Expr::global("o_part", vec![var("b"), var("p"), var("h"), Expr::Row]) },
        ]),
        // A sequence of length 0 (a padded slot) has no partition: its o is 0, not 0/0.
        Stmt::Map {
            dst: w(o_s),
            expr: Expr::select(Expr::Float(0.0).lt(Expr::tile(sum_s, int(0), int(0))), Expr::Elem / Expr::tile(sum_s, int(0), int(0)), Expr::Float(0.0)),
        },
        Stmt::Barrier,
        Stmt::Store { src: w(o_s), dst: GlobalTile { param: "o".into(), dims: vec![GlobalDim::At(var("b")), GlobalDim::At(int(0)), GlobalDim::At(var("h")), span(int(0), d)] } },
    ];
    let mut params = partial_params(spec, paged, Access::Read).to_vec();
    params.extend([seq_lens_param(), tensor("o", storage, vec![SizeExpr::batch(), size(1), size(spec.query_heads), size(spec.head_dim)], Access::Write)]);
    params.extend(paged_size_params());
    let schedule = Schedule { block_m: d, block_n: 1, block_k: 1, warps: 1, stages: 1 };
    let name = format!("{}_{}", spec.name, DecodeKernel::Merge.suffix());
    Ok(one_token(tiled_kernel(name, params, [size(spec.query_heads), SizeExpr::batch(), size(1)], &schedule, t, body)))
}

/// CTA = sequence b: the new token's k and v rows (all kv heads) written at position
/// seq_lens[b] − 1, into row position % page_size of the page the block table names for it (an
/// empty slot, seq_lens[b] = 0, writes nothing). The delayed value heads are the shift state
/// plus their bias, and the shift state becomes this token's product ([`SHIFT_NEXT`]).
fn kv_append(spec: &AttentionSpec, paged: PagedKv) -> Result<KernelFn, String> {
    let storage: ElemType = spec.dtype.into();
    let (hk, d) = (spec.kv_heads as u32, spec.head_dim as u32);
    let shifted = spec.value_shift as u32;
    let current = hk - shifted;
    let page_size = paged.page_size;
    let mut t = Tiles { decls: Vec::new() };
    let rows_s = t.add("rows_s", TileType { elem: storage, rows: hk, cols: d, layout: Layout::RowMajor { pad: 0 } });
    let w = |id: TileId| t.whole(id);
    let token = |tensor: &str, heads: u32| GlobalTile {
        param: tensor.into(),
        dims: vec![GlobalDim::At(var("b")), GlobalDim::At(int(0)), span(int(0), heads), span(int(0), d)],
    };
    let into_page = |cache: &str| Stmt::Store {
        src: w(rows_s),
        dst: GlobalTile {
            param: cache.into(),
            dims: vec![GlobalDim::At(var("page")), GlobalDim::At(var("position").modulo(int(page_size))), span(int(0), hk), span(int(0), d)],
        },
    };
    let mut append = vec![
        let_("page", Expr::global("block_table", vec![var("b"), var("position").floor_div(int(page_size))])),
        Stmt::Copy { dst: w(rows_s), src: token("k", hk), is_async: false },
        Stmt::Barrier,
        into_page("k_cache"),
        Stmt::Barrier,
        Stmt::Copy { dst: w(rows_s), src: token("v", hk), is_async: false },
        Stmt::Barrier,
    ];
    let state_box = || GlobalTile { param: SHIFT_STATE.into(), dims: vec![GlobalDim::At(var("b")), span(int(0), shifted), span(int(0), d)] };
    if shifted > 0 {
        let delayed = t.view(rows_s, int(current), int(0), shifted, d);
        let mut value = Expr::global(SHIFT_STATE, vec![var("b"), Expr::Row, Expr::Col]);
        if let Some(bias) = param_name(spec, ParamRole::ValueBiasDelayed) {
            value = value + Expr::global(&bias, vec![Expr::Row * int(d) + Expr::Col]);
        }
        append.extend([
            Stmt::Note(format!("the {shifted} delayed value head(s): the previous token's x·W_v2ᵀ (the shift state) + bias")),
            Stmt::Map { dst: delayed.clone(), expr: value },
            Stmt::Barrier,
            into_page("v_cache"),
            Stmt::Barrier,
            Stmt::Note("the shift state moves on to this token".into()),
            Stmt::Copy { dst: delayed.clone(), src: token(SHIFT_NEXT, shifted), is_async: false },
            Stmt::Barrier,
            Stmt::Store { src: delayed, dst: state_box() },
        ]);
    } else {
        append.push(into_page("v_cache"));
    }
    let body = vec![
        Stmt::Note(format!("CTA = sequence b: k and v of its new token's {hk} kv head(s) into their page")),
        let_("b", Expr::BlockIdx(Axis::X)),
        let_("position", Expr::global("seq_lens", vec![var("b")]) - int(1)),
        Stmt::If { cond: int(0).le(var("position")), then_body: append, else_body: Vec::new() },
    ];
    let cache_shape = || vec![SizeExpr::pages(), size(page_size as usize), size(spec.kv_heads), size(spec.head_dim)];
    let token_shape = |heads: usize| vec![SizeExpr::batch(), size(1), size(heads), size(spec.head_dim)];
    let mut params = vec![tensor("k", storage, token_shape(spec.kv_heads), Access::Read), tensor("v", storage, token_shape(spec.kv_heads), Access::Read)];
    if shifted > 0 {
        params.push(tensor(SHIFT_NEXT, storage, token_shape(spec.value_shift), Access::Read));
        params.push(tensor(SHIFT_STATE, storage, vec![SizeExpr::batch(), size(spec.value_shift), size(spec.head_dim)], Access::ReadWrite));
        params.extend(weight_params(spec, |role| role == ParamRole::ValueBiasDelayed));
    }
    params.extend([
        tensor("block_table", ElemType::I32, vec![SizeExpr::batch(), SizeExpr::blocks()], Access::Read),
        seq_lens_param(),
        tensor("k_cache", storage, cache_shape(), Access::ReadWrite),
        tensor("v_cache", storage, cache_shape(), Access::ReadWrite),
    ]);
    params.extend(paged_size_params());
    let schedule = Schedule { block_m: hk, block_n: d, block_k: d, warps: 1, stages: 1 };
    let name = format!("{}_{}", spec.name, DecodeKernel::Append.suffix());
    Ok(one_token(tiled_kernel(name, params, [SizeExpr::batch(), size(1), size(1)], &schedule, t, body)))
}

/// The lets every packed-prefill CTA of sequence b starts with: its rows seq_start .. seq_end
/// of the packed batch, its length after them (`len`, the caller's seq_lens[b]) and before
/// them (`cached`).
fn packed_sequence() -> Vec<Stmt> {
    let mut lets = packed_rows().to_vec();
    lets.extend([let_("len", Expr::global("seq_lens", vec![var("b")])), let_("cached", var("len") - (var("seq_end") - var("seq_start")))]);
    lets
}

/// CTA = query rows [q_tile · M, +M) of sequence b's new tokens, query head h, where the
/// sequence continues cached tokens: flash attention over the cached keys (positions 0 ..
/// cached, all before every new token; a sliding window masks those before a row's window), key
/// tiles gathered page by page through the block table as in the decode attention, merged by
/// log-sum-exp into what `prefill_attention` wrote for the chunk's own keys (o, lse).
fn prefill_cached_attention(spec: &AttentionSpec, paged: PagedKv, s: &Schedule) -> Result<KernelFn, String> {
    let storage: ElemType = spec.dtype.into();
    let (d, g, page_size) = (spec.head_dim as u32, spec.groups(), paged.page_size);
    let (bm, bn) = (s.block_m, s.block_n);
    let mut t = Tiles { decls: Vec::new() };
    let q_s = t.shared("q_s", storage, bm, d);
    let k_s = t.shared("k_s", storage, s.stages * bn, d);
    let v_s = t.shared("v_s", storage, s.stages * bn, d);
    let softmax = OnlineSoftmax::declare(&mut t, storage, bm, bn, d, s.warps, 1);
    let w = |id: TileId| t.whole(id);
    let slot_view = |tile: TileId, slot: Expr| t.view(tile, times(slot, bn), int(0), bn, d);
    let page_copy = |ring: TileId, param: &str, slot: &Expr, row: u32, rows: u32, page: Expr, first: Expr, rows_valid: Expr| Stmt::Copy {
        dst: t.view(ring, times(slot.clone(), bn) + int(row), int(0), rows, d),
        src: GlobalTile {
            param: param.into(),
            dims: vec![
                GlobalDim::At(page),
                GlobalDim::Span { start: first, len: rows, valid: Some((int(0), rows_valid)) },
                GlobalDim::At(var("kv_head")),
                span(int(0), d),
            ],
        },
        is_async: true,
    };
    // Key tile kv_first + tile: whole pages, or a part of one page. A page past the last one
    // the sequence holds reads the last one's entry (its rows past the length read zeros), and
    // one wholly before a sliding window the window's first page (its keys are masked): entries
    // outside the pages the new tokens see are never read.
    let windowed = matches!(spec.mask, Mask::SlidingWindow { .. });
    let load = |tile: Expr, slot: Expr| -> Vec<Stmt> {
        let mut stmts = vec![let_("load_tile", var("kv_first") + tile)];
        let last_block = (var("cached") - int(1)).floor_div(int(page_size));
        let page = |block: Expr| {
            let block = if windowed { block.max(var("first_key").floor_div(int(page_size))) } else { block };
            Expr::global("block_table", vec![var("b"), block.min(last_block.clone())])
        };
        if bn >= page_size {
            for p in 0..bn / page_size {
                let block = var("load_tile") * int(bn / page_size) + int(p);
                let rows_valid = var("cached") - block.clone() * int(page_size);
                for (param, ring) in [("k_cache", k_s), ("v_cache", v_s)] {
                    stmts.push(page_copy(ring, param, &slot, p * page_size, page_size, page(block.clone()), int(0), rows_valid.clone()));
                }
            }
        } else {
            let block = var("load_tile").floor_div(int(page_size / bn));
            let first = var("load_tile").modulo(int(page_size / bn)) * int(bn);
            let rows_valid = var("cached") - block.clone() * int(page_size);
            for (param, ring) in [("k_cache", k_s), ("v_cache", v_s)] {
                stmts.push(page_copy(ring, param, &slot, 0, bn, page(block.clone()), first.clone(), rows_valid.clone()));
            }
        }
        stmts
    };
    // Every cached key precedes every new token: only the length and a window mask.
    let key = var("k_col0") + Expr::Col;
    let mut visible = key.clone().lt(var("cached"));
    let mut unmasked = (var("k_col0") + int(bn)).le(var("cached"));
    let kv_start = match spec.mask {
        Mask::SlidingWindow { window } => {
            visible = visible.and((var("q_pos0") + Expr::Row - key).lt(int(window)));
            unmasked = unmasked.and((var("q_pos0") + int(bm - 1) - var("k_col0")).lt(int(window)));
            (var("q_pos0") - int(window - 1)).max(int(0)).floor_div(int(bn))
        }
        Mask::None | Mask::Causal => int(0),
    };
    let kv_end = var("cached").ceil_div(int(bn));
    let scale = Expr::Float(spec.softmax_scale);
    let compute = |step: Expr, slot: Expr| -> Vec<Stmt> {
        let mut stmts = vec![let_("k_col0", (var("kv_first") + step) * int(bn))];
        stmts.extend(softmax.step(&t, w(q_s), slot_view(k_s, slot.clone()), slot_view(v_s, slot), &scale, unmasked.clone(), visible.clone()));
        stmts
    };
    let rows = || GlobalDim::Span { start: var("seq_start") + var("q_local0"), len: bm, valid: Some((var("seq_start"), var("seq_end"))) };
    let token_rows = |param: &str| GlobalTile { param: param.into(), dims: vec![GlobalDim::At(int(0)), rows(), GlobalDim::At(var("h")), span(int(0), d)] };
    // The chunk's own attention at the mapped row (rows past the sequence read its last row:
    // computed, never stored).
    let chunk_row = (var("seq_start") + var("q_local0") + Expr::Row).min(var("seq_end") - int(1));
    let chunk_lse = Expr::global("lse", vec![int(0), var("h"), chunk_row.clone()]);
    let chunk_o = Expr::global("o", vec![int(0), chunk_row, var("h"), Expr::Col]);
    let at_row = |tile: TileId| Expr::tile(tile, Expr::Row, int(0));
    let mut work = vec![let_("q_pos0", var("cached") + var("q_local0"))];
    if let Mask::SlidingWindow { window } = spec.mask {
        work.push(let_("first_key", (var("q_pos0") - int(window - 1)).max(int(0))));
    }
    let mut attend = vec![
        Stmt::Copy { dst: w(q_s), src: token_rows("q"), is_async: true },
        Stmt::AsyncCommit,
        Stmt::AsyncWait { pending: 0 },
        Stmt::Barrier,
    ];
    attend.extend(softmax.start(&t));
    attend.extend(pipelined_loop("kv_step", var("kv_count"), s.stages, &load, &compute));
    attend.extend([
        Stmt::Note("merged with the chunk's own: weights exp(m − M) (0 for a row that saw no cached key) and exp(lse − M)".into()),
        Stmt::Map { dst: w(softmax.m_new), expr: at_row(softmax.m).max(chunk_lse.clone()) },
        Stmt::Map { dst: w(softmax.alpha), expr: (at_row(softmax.m) - at_row(softmax.m_new)).exp() },
        Stmt::Map { dst: w(softmax.tile_max), expr: (chunk_lse - at_row(softmax.m_new)).exp() },
        Stmt::Map { dst: w(softmax.l), expr: Expr::Elem * at_row(softmax.alpha) + at_row(softmax.tile_max) },
        Stmt::Map { dst: w(softmax.o), expr: (Expr::Elem * at_row(softmax.alpha) + chunk_o * at_row(softmax.tile_max)) / at_row(softmax.l) },
        Stmt::Store { src: w(softmax.o), dst: token_rows("o") },
    ]);
    // Under a window, no cached key is visible once the tile's first row's window starts past
    // them (the page clamps below assume one is).
    let mut any_visible = int(0).lt(var("kv_count"));
    if windowed {
        any_visible = any_visible.and(var("first_key").lt(var("cached")));
    }
    work.extend([
        Stmt::Note("only key tiles some row of this tile can see; none: the chunk's own attention stands".into()),
        let_("kv_first", kv_start),
        let_("kv_count", kv_end - var("kv_first")),
        Stmt::If { cond: any_visible, then_body: attend, else_body: Vec::new() },
    ]);
    let mut body = vec![
        Stmt::Note(format!("CTA = {bm} new tokens of sequence b, query head h, against its cached keys; key tiles of {bn} from pages of {page_size}")),
        let_("q_tile", Expr::BlockIdx(Axis::X)),
        let_("h", Expr::BlockIdx(Axis::Y)),
        let_("b", Expr::BlockIdx(Axis::Z)),
        let_("kv_head", var("h").floor_div(int(g as i64))),
    ];
    body.extend(packed_sequence());
    body.extend([
        let_("q_local0", var("q_tile") * int(bm)),
        Stmt::If { cond: var("q_local0").lt(var("seq_end") - var("seq_start")), then_body: work, else_body: Vec::new() },
    ]);
    let (hq, hk) = (spec.query_heads, spec.kv_heads);
    let cache_shape = || vec![SizeExpr::pages(), size(page_size as usize), size(hk), size(spec.head_dim)];
    let token_shape = |heads: usize| vec![size(1), SizeExpr::seq_len(), size(heads), size(spec.head_dim)];
    let mut params = vec![
        tensor("q", storage, token_shape(hq), Access::Read),
        tensor("k_cache", storage, cache_shape(), Access::Read),
        tensor("v_cache", storage, cache_shape(), Access::Read),
        tensor("block_table", ElemType::I32, vec![SizeExpr::batch(), SizeExpr::blocks()], Access::Read),
        cu_seqlens_param(),
        seq_lens_param(),
        tensor("lse", ElemType::F32, vec![size(1), size(hq), SizeExpr::seq_len()], Access::Read),
        tensor("o", storage, token_shape(hq), Access::ReadWrite),
    ];
    params.extend(paged_size_params());
    let name = format!("{}_{}", spec.name, DecodeKernel::PrefillCachedAttention.suffix());
    Ok(tiled_kernel(name, params, [SizeExpr::seq_len().ceil_div(bm as u64), size(hq), SizeExpr::batch()], s, t, body))
}

/// CTA = the j-th page sequence b's new tokens (rows seq_start .. seq_end of the packed batch,
/// positions cached .. len) reach into: their k and v (the prologue's or projection's) into
/// the rows of that page they occupy, through the block table (the page's other rows keep what
/// the pool holds). The delayed value heads of the first new token are the shift state plus
/// their bias (the projection read the previous packed row there, another sequence's). CTA 0 of
/// each sequence also moves the state on: the convolution state to the raw p0 of the last T
/// tokens (the old state's where the chunk is shorter), the shift state to the last token's
/// x·W_v2ᵀ, one delayed head at a time (a 16-row mma tile whose first row is that token). A
/// sequence without new tokens writes nothing.
fn prefill_cache(spec: &AttentionSpec, paged: PagedKv) -> Result<KernelFn, String> {
    let storage: ElemType = spec.dtype.into();
    let (d, kv, page) = (spec.head_dim as u32, spec.kv_width() as u32, paged.page_size);
    let (history, packed, shifted) = (spec.conv_history() as u32, spec.packed_width() as u32, spec.value_shift as u32);
    let current_columns = kv - shifted * d;
    let gemm_schedule = Schedule { block_m: 16, block_n: d, block_k: 32, warps: (d / 64).max(1), stages: 2 };
    let gemm = GemmTiles::new(spec, &gemm_schedule, "x_s")?;
    let mut t = Tiles { decls: gemm.tiles.decls.clone() };
    let page_s = t.add("page_s", TileType { elem: storage, rows: page, cols: kv, layout: Layout::RowMajor { pad: 0 } });
    let rows_s = (history > 0).then(|| t.add("rows_s", TileType { elem: storage, rows: history, cols: packed, layout: Layout::RowMajor { pad: 0 } }));
    let state_s = (history > 0).then(|| t.add("state_s", TileType { elem: storage, rows: packed, cols: history, layout: Layout::RowMajor { pad: 0 } }));
    let w = |id: TileId| t.whole(id);
    // Page position0 / page of the sequence; its rows from position0 hold packed rows from `row0`.
    let position0 = var("page_index") * int(page);
    let row0 = var("seq_start") + position0.clone() - var("cached");
    let new_rows = GlobalDim::Span { start: row0.clone(), len: page, valid: Some((var("seq_start"), var("seq_end"))) };
    let into_page = |cache: &str| Stmt::Store {
        src: w(page_s),
        dst: GlobalTile {
            param: cache.into(),
            dims: vec![
                GlobalDim::At(Expr::global("block_table", vec![var("b"), var("page_index")])),
                GlobalDim::Span { start: int(0), len: page, valid: Some((var("cached") - position0.clone(), var("len") - position0.clone())) },
                span(int(0), kv),
            ],
        },
    };
    let read_rows = |tensor: &str| Stmt::Copy {
        dst: w(page_s),
        src: GlobalTile { param: tensor.into(), dims: vec![GlobalDim::At(int(0)), new_rows.clone(), span(int(0), kv)] },
        is_async: false,
    };
    let mut pages = vec![read_rows("k"), Stmt::Barrier, into_page("k_cache"), Stmt::Barrier, read_rows("v"), Stmt::Barrier];
    if shifted > 0 {
        // Columns of the delayed heads' view: head Col / d, channel Col % d.
        let state = Expr::global(SHIFT_STATE, vec![var("b"), Expr::Col.floor_div(int(d)), Expr::Col.modulo(int(d))]);
        let mut value = Expr::select(int(0).lt(var("cached")), state, Expr::Float(0.0));
        if let Some(bias) = param_name(spec, ParamRole::ValueBiasDelayed) {
            value = value + Expr::global(&bias, vec![Expr::Col]);
        }
        // CTA 0 holds the first new token; only it reads the shift state (CTA 0 writes it later).
        let first_token = vec![
            Stmt::Map {
                dst: t.view(page_s, int(0), int(current_columns), page, shifted * d),
                expr: Expr::select((position0.clone() + Expr::Row).eq(var("cached")), value, Expr::Elem),
            },
            Stmt::Barrier,
            Stmt::Note("and into v, which the attention over the chunk reads".into()),
            Stmt::Store {
                src: t.view(page_s, var("cached") - position0.clone(), int(current_columns), 1, shifted * d),
                dst: GlobalTile { param: "v".into(), dims: vec![GlobalDim::At(int(0)), span(var("seq_start"), 1), span(int(current_columns), shifted * d)] },
            },
        ];
        pages.extend([
            Stmt::Note("the first new token's delayed value heads: the shift state (zero for a new sequence) + bias".into()),
            Stmt::If { cond: var("j").eq(int(0)), then_body: first_token, else_body: Vec::new() },
        ]);
    }
    pages.push(into_page("v_cache"));
    let mut state = Vec::new();
    if let (Some(rows_s), Some(state_s)) = (rows_s, state_s) {
        let state_box = GlobalTile { param: CONV_STATE.into(), dims: vec![GlobalDim::At(var("b")), span(int(0), packed), span(int(0), history)] };
        // Row i of the new state is the token n − T + i of the chunk, or the old state's row n + i.
        let from_old_state = (var("seq_end") - var("seq_start") - int(history) + Expr::Row).lt(int(0)).and(int(0).lt(var("cached")));
        let old_row = (var("seq_end") - var("seq_start") + Expr::Row).min(int(history - 1));
        state.extend([
            Stmt::Note(format!("the convolution state: raw p0 of the last {history} tokens, channel-major")),
            Stmt::Copy { dst: w(state_s), src: state_box.clone(), is_async: false },
            Stmt::Copy {
                dst: w(rows_s),
                src: GlobalTile {
                    param: PROJECTION_BUFFER.into(),
                    dims: vec![
                        GlobalDim::At(int(0)),
                        GlobalDim::Span { start: var("seq_end") - int(history), len: history, valid: Some((var("seq_start"), var("seq_end"))) },
                        span(int(0), packed),
                    ],
                },
                is_async: false,
            },
            Stmt::Barrier,
            Stmt::Map { dst: w(rows_s), expr: Expr::select(from_old_state, Expr::tile(state_s, Expr::Col, old_row), Expr::Elem) },
            Stmt::Barrier,
            Stmt::Map { dst: w(state_s), expr: Expr::tile(rows_s, Expr::Col, Expr::Row) },
            Stmt::Barrier,
            Stmt::Store { src: w(state_s), dst: state_box },
        ]);
    }
    let delayed = param_name(spec, ParamRole::ValueProjDelayed);
    if let Some(weight) = &delayed {
        let tile = GemmTile {
            a_s: gemm.a_s,
            w_s: gemm.w_s,
            acc: gemm.acc,
            tiles: &t,
            a_param: "x",
            a_batch: int(0),
            depth: spec.model_dim,
            rows: 16,
            cols: d,
            block_k: gemm_schedule.block_k,
            stages: gemm_schedule.stages,
        };
        // Its reads of the shift state (the first token's row, above) are behind a barrier.
        let mut head = vec![Stmt::Note("the shift state: the last token's x·W_v2ᵀ (no bias) of delayed head h".into())];
        head.extend(tile.stmts(weight, var("h") * int(d), var("seq_end") - int(1)));
        head.push(Stmt::Store {
            src: t.whole(gemm.acc),
            dst: GlobalTile {
                param: SHIFT_STATE.into(),
                dims: vec![GlobalDim::Span { start: var("b"), len: 16, valid: Some((var("b"), var("b") + int(1))) }, GlobalDim::At(var("h")), span(int(0), d)],
            },
        });
        head.push(Stmt::Barrier);
        state.push(Stmt::Barrier);
        state.push(for_("h", int(0), int(shifted), head));
    }
    let mut body = vec![
        Stmt::Note(format!("CTA = the j-th page ({page} tokens) sequence b's new tokens reach into; CTA 0 of each sequence also moves its state on")),
        let_("j", Expr::BlockIdx(Axis::X)),
        let_("b", Expr::BlockIdx(Axis::Z)),
    ];
    body.extend(packed_sequence());
    body.extend([
        let_("page_index", var("cached").floor_div(int(page)) + var("j")),
        Stmt::If { cond: (var("page_index") * int(page)).lt(var("len")).and(var("cached").lt(var("len"))), then_body: pages, else_body: Vec::new() },
        Stmt::If { cond: var("j").eq(int(0)).and(var("cached").lt(var("len"))), then_body: state, else_body: Vec::new() },
    ]);
    let rows = |width: u32| vec![size(1), SizeExpr::seq_len(), size(width as usize)];
    let pool = || vec![SizeExpr::pages(), size(page as usize), size(kv as usize)];
    let v_access = if shifted > 0 { Access::ReadWrite } else { Access::Read };
    let mut params = vec![tensor("k", storage, rows(kv), Access::Read), tensor("v", storage, rows(kv), v_access)];
    if history > 0 {
        params.push(tensor(PROJECTION_BUFFER, storage, rows(packed), Access::Read));
    }
    if delayed.is_some() {
        params.push(tensor("x", storage, rows(spec.model_dim as u32), Access::Read));
        params.extend(weight_params(spec, |role| role == ParamRole::ValueProjDelayed || role == ParamRole::ValueBiasDelayed));
    }
    params.extend([
        tensor("block_table", ElemType::I32, vec![SizeExpr::batch(), SizeExpr::blocks()], Access::Read),
        cu_seqlens_param(),
        seq_lens_param(),
        tensor("k_cache", storage, pool(), Access::ReadWrite),
        tensor("v_cache", storage, pool(), Access::ReadWrite),
    ]);
    if history > 0 {
        params.push(tensor(CONV_STATE, storage, vec![SizeExpr::batch(), size(packed as usize), size(history as usize)], Access::ReadWrite));
    }
    if delayed.is_some() {
        params.push(tensor(SHIFT_STATE, storage, vec![SizeExpr::batch(), size(shifted as usize), size(d as usize)], Access::ReadWrite));
    }
    params.extend(paged_size_params());
    let schedule = Schedule { block_m: page, block_n: kv, block_k: gemm_schedule.block_k, warps: gemm_schedule.warps, stages: gemm_schedule.stages };
    let name = format!("{}_{}", spec.name, DecodeKernel::CacheFill.suffix());
    // A chunk of n ≤ S tokens reaches into at most ⌈S / page⌉ + 1 pages.
    Ok(tiled_kernel(name, params, [SizeExpr::seq_len().ceil_div(page as u64) + SizeExpr::c(1), size(1), SizeExpr::batch()], &schedule, t, body))
}
