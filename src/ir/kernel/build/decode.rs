//! Serving kernels over a paged KV cache: the attention of one new token per sequence
//! (`decode_attention`: one CTA per key partition, kv head and sequence, the query heads of the
//! group as the MMA rows, keys gathered page by page through the block table) and the merge of
//! its partitions by log-sum-exp (`decode_merge`), and the append of new tokens' k and v into
//! their pages (`kv_append`). Not launched by an entry point yet.

use super::*;

/// A paged KV cache's geometry and how the decode attention splits it: k and v each
/// [pages, page_size, Hk, d]; `partition_keys` keys per CTA (a multiple of the key tile).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagedKv {
    pub page_size: u32,
    pub partition_keys: u32,
}

/// Which decode kernel to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DecodeKernel {
    Attention,
    Merge,
    Append,
}

impl DecodeKernel {
    pub fn suffix(self) -> &'static str {
        match self {
            DecodeKernel::Attention => "decode_attention",
            DecodeKernel::Merge => "decode_merge",
            DecodeKernel::Append => "kv_append",
        }
    }
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
        DecodeKernel::Attention => decode_attention(spec, paged, key_tile)?,
        DecodeKernel::Merge => decode_merge(spec, paged)?,
        DecodeKernel::Append => kv_append(spec, paged)?,
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
    Ok(tiled_kernel(name, params, [partitions(paged), size(hk), SizeExpr::batch()], &schedule, t, body))
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
        Stmt::Store { src: w(o_s), dst: GlobalTile { param: "o".into(), dims: vec![GlobalDim::At(var("b")), GlobalDim::At(var("h")), span(int(0), d)] } },
    ];
    let mut params = partial_params(spec, paged, Access::Read).to_vec();
    params.extend([seq_lens_param(), tensor("o", storage, vec![SizeExpr::batch(), size(spec.query_heads), size(spec.head_dim)], Access::Write)]);
    params.extend(paged_size_params());
    let schedule = Schedule { block_m: d, block_n: 1, block_k: 1, warps: 1, stages: 1 };
    let name = format!("{}_{}", spec.name, DecodeKernel::Merge.suffix());
    Ok(tiled_kernel(name, params, [size(spec.query_heads), SizeExpr::batch(), size(1)], &schedule, t, body))
}

/// CTA = token s of sequence b: its k and v rows (all kv heads) written at position
/// start[b] + s, into row (start + s) % page_size of the page the block table names for it.
/// Decode appends one token (S = 1, start = the length before it); a chunk of a prefill
/// appends S tokens after the cached ones.
fn kv_append(spec: &AttentionSpec, paged: PagedKv) -> Result<KernelFn, String> {
    let storage: ElemType = spec.dtype.into();
    let (hk, d) = (spec.kv_heads as u32, spec.head_dim as u32);
    let page_size = paged.page_size;
    let mut t = Tiles { decls: Vec::new() };
    let rows_s = t.add("rows_s", TileType { elem: storage, rows: hk, cols: d, layout: Layout::RowMajor { pad: 0 } });
    let w = |id: TileId| t.whole(id);
    let heads = || [span(int(0), hk), span(int(0), d)];
    let mut body = vec![
        Stmt::Note(format!("CTA = token s of sequence b: k and v of its {hk} kv head(s) into their page")),
        let_("s", Expr::BlockIdx(Axis::X)),
        let_("b", Expr::BlockIdx(Axis::Z)),
        let_("position", Expr::global("start", vec![var("b")]) + var("s")),
        let_("page", Expr::global("block_table", vec![var("b"), var("position").floor_div(int(page_size))])),
    ];
    for (tensor, cache) in [("k", "k_cache"), ("v", "v_cache")] {
        body.extend([
            Stmt::Copy {
                dst: w(rows_s),
                src: GlobalTile { param: tensor.into(), dims: [GlobalDim::At(var("b")), GlobalDim::At(var("s"))].into_iter().chain(heads()).collect() },
                is_async: false,
            },
            Stmt::Barrier,
            Stmt::Store {
                src: w(rows_s),
                dst: GlobalTile {
                    param: cache.into(),
                    dims: [GlobalDim::At(var("page")), GlobalDim::At(var("position").modulo(int(page_size)))].into_iter().chain(heads()).collect(),
                },
            },
            Stmt::Barrier,
        ]);
    }
    let cache_shape = || vec![SizeExpr::pages(), size(page_size as usize), size(spec.kv_heads), size(spec.head_dim)];
    let token_shape = || vec![SizeExpr::batch(), SizeExpr::seq_len(), size(spec.kv_heads), size(spec.head_dim)];
    let mut params = vec![
        tensor("k", storage, token_shape(), Access::Read),
        tensor("v", storage, token_shape(), Access::Read),
        tensor("block_table", ElemType::I32, vec![SizeExpr::batch(), SizeExpr::blocks()], Access::Read),
        tensor("start", ElemType::I32, vec![SizeExpr::batch()], Access::Read),
        tensor("k_cache", storage, cache_shape(), Access::Write),
        tensor("v_cache", storage, cache_shape(), Access::Write),
    ];
    params.extend(paged_size_params());
    let schedule = Schedule { block_m: hk, block_n: d, block_k: d, warps: 1, stages: 1 };
    let name = format!("{}_{}", spec.name, DecodeKernel::Append.suffix());
    Ok(tiled_kernel(name, params, [SizeExpr::seq_len(), size(1), SizeExpr::batch()], &schedule, t, body))
}
