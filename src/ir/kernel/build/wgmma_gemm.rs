//! The projection GEMMs (`qkv_proj`, `out_proj`) as a warp-specialized Hopper kernel:
//! `dest = a · Wᵀ + bias` over the column segments of the layer's projection (each with its own
//! weight, bias, destination range and row shift), with the ABI of the tiled kernels of
//! [`super`] plus one TMA descriptor for `a` and one per weight.
//!
//! Persistent: the grid's CTAs take output tiles `blockIdx.x + i · gridDim.x` in raster order
//! (column tile fastest, then the 128-row tile, then the batch element), so that the CTAs that
//! run together share their rows of `a` in L2 while all of W stays there. In each CTA one
//! producer warpgroup's elected thread copies 64-column slices of the `a` and W tiles into a
//! ring of `stages` swizzled buffers with TMA, expecting their bytes on the slot's `full`
//! mbarrier; two consumer warpgroups run wgmma on them, one group in flight, and hand each slot
//! back on its `empty` mbarrier once the group that read it has retired. The ring runs on from
//! one output tile to the next (step = tile ordinal · k-tiles + k-tile), so the producer loads the
//! next tile while one is stored. Ping-pong: each consumer takes every other tile whole (two
//! 64-row accumulators) and the two take turns through named barriers 1 and 2, so that one's
//! mainloop runs while the other stores; cooperative: both work on each tile, 64 rows each.
//! The accumulators start at the bias; the epilogue stores them, rounded once, rows past S and
//! columns past the segment skipped.

use super::*;

/// The persistent grid: one CTA per SM of the device, whose count the loader reads when it loads
/// the library. The kernel reads its grid size (`gridDim.x`), so any count covers every tile.
pub const PERSISTENT_GRID: [SizeExpr; 3] = [SizeExpr::Var(SizeVar::SmCount), SizeExpr::Const(1), SizeExpr::Const(1)];
/// Rows of an output tile (two consumer warpgroups of 64 rows).
pub const GEMM_BLOCK_M: u32 = 128;
/// Columns of `a` and W per stage: one 128-byte swizzle panel of 16-bit elements.
pub const GEMM_BLOCK_K: u32 = 64;
/// Rows one consumer warpgroup multiplies at a time (the wgmma M).
const WARPGROUP_ROWS: u32 = 64;
/// Warps of the CTA: two consumer warpgroups and one producer.
const WARPS: u32 = 3 * WARPGROUP_THREADS / 32;
/// Registers per thread of the producer (it only computes coordinates) and of the consumers
/// (40 + 2 · 232 = 3 · 168, the allotment of a 384-thread CTA).
const PRODUCER_REGISTERS: u32 = 40;
pub const GEMM_CONSUMER_REGISTERS: u32 = 232;

/// The tiles, ring depth and consumer schedule of the wgmma projection GEMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WgmmaGemmSchedule {
    /// Output columns per tile (the wgmma N): a multiple of 8 up to 256, at most 128 ping-pong.
    pub block_n: u32,
    pub stages: u32,
    pub ping_pong: bool,
}

/// One run of output columns with its own weight, bias and destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GemmSegment {
    /// Weight [cols, K].
    pub weight: String,
    pub bias: Option<String>,
    pub cols: u32,
    /// Destination [B, S, dest_width] (channels of [B, S, heads, d] count heads · d); this
    /// segment writes columns dest_col .. dest_col + cols.
    pub dest: String,
    pub dest_width: u32,
    pub dest_col: u32,
    /// Output row t reads `a` row t − row_shift (rows before 0 read as zeros).
    pub row_shift: u32,
}

/// What the GEMM of projection kernel `base` (`{name}_qkv_proj` or `{name}_out_proj`) of
/// `spec` multiplies: the operand `a`, its width K, its head width when it is [B, S, H, d] (the
/// attention output), and the column segments.
pub fn gemm_operands(spec: &AttentionSpec, out_proj: bool) -> Option<(String, u32, Option<u32>, Vec<GemmSegment>)> {
    if out_proj {
        let e = spec.model_dim as u32;
        let segment = GemmSegment {
            weight: param_name(spec, ParamRole::OutputProj)?,
            bias: param_name(spec, ParamRole::OutputBias),
            cols: e,
            dest: "out".to_string(),
            dest_width: e,
            dest_col: 0,
            row_shift: 0,
        };
        return Some(("o".to_string(), spec.q_width() as u32, Some(spec.head_dim as u32), vec![segment]));
    }
    let width_of = |output: &str| match output {
        "q" => spec.q_width(),
        "k" | "v" => spec.kv_width(),
        _ => spec.q_width() + spec.kv_width(),
    };
    let segments = projection_segments(spec)
        .into_iter()
        .map(|s| GemmSegment {
            dest_width: width_of(&s.output) as u32,
            weight: s.weight,
            bias: s.bias,
            cols: s.width as u32,
            dest: s.output,
            dest_col: s.column0 as u32,
            row_shift: s.row_shift as u32,
        })
        .collect();
    Some(("x".to_string(), spec.model_dim as u32, None, segments))
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

/// The kernel parameter holding `buffer`'s tensor map.
pub fn tensor_map_param(buffer: &str) -> String {
    format!("{buffer}.tensor_map")
}

/// Builds the wgmma projection GEMM `which` that replaces the tiled projection kernel `base` of
/// `spec` (same name, same parameters, then the tensor maps). Errors name what the shape or the
/// schedule does not allow.
pub fn build_wgmma_projection(
    spec: &AttentionSpec,
    which: ForwardKernel,
    base: &KernelFn,
    schedule: &WgmmaGemmSchedule,
) -> Result<KernelFn, String> {
    let out_proj = match which {
        ForwardKernel::QkvProjection => false,
        ForwardKernel::OutputProjection => true,
        other => return Err(format!("{}: the wgmma GEMM builds projections, not {other:?}", base.name)),
    };
    let (a, k, a_head_dim, segments) =
        gemm_operands(spec, out_proj).ok_or_else(|| format!("{}: a projection without its weights", base.name))?;
    let elem = ElemType::from(spec.dtype);
    let WgmmaGemmSchedule { block_n, stages, ping_pong } = *schedule;
    if k == 0 || !k.is_multiple_of(8) {
        return Err(format!("the reduction width {k} is not a multiple of 8 (16-byte TMA rows)"));
    }
    if let Some(d) = a_head_dim
        && !d.is_multiple_of(GEMM_BLOCK_K)
    {
        return Err(format!("TMA boxes of {GEMM_BLOCK_K} columns of o [B, S, H, d] need d a multiple of {GEMM_BLOCK_K}, not {d}"));
    }
    if block_n == 0 || !block_n.is_multiple_of(8) || block_n > 256 || (ping_pong && block_n > 128) {
        return Err(format!("block_n {block_n}: a multiple of 8 up to 256 (128 ping-pong: a warpgroup holds a whole tile)"));
    }
    if stages < 3 {
        // The consumers hold two slots (the one read and the one its in-flight predecessor
        // group still reads): a third one loads.
        return Err("the producer needs at least 3 stages (one loading while two are read)".to_string());
    }
    if let Some(s) = segments.iter().find(|s| s.cols == 0 || s.cols % 2 != 0 || s.dest_col % 2 != 0) {
        return Err(format!("segment {} is not an even run of columns at an even offset", s.weight));
    }

    let mut params = base.params.clone();
    // The tensor maps see each buffer as the layer stores it: o as [B, S, Hq, d] (its boxes
    // address a head's columns), whatever width the tiled kernel read it with.
    if let Some(d) = a_head_dim {
        for param in params.iter_mut() {
            if let KernelParam::Tensor { name, shape, .. } = param
                && *name == a
            {
                *shape = vec![SizeExpr::batch(), SizeExpr::seq_len(), SizeExpr::c(spec.query_heads as u64), SizeExpr::c(d as u64)];
            }
        }
    }
    // Destinations [B, S, heads, d] are stored a head at a time: each accumulator holds `chunk`
    // columns, which lie in one head (chunk divides both block_n and d).
    let head_dim = spec.head_dim as u32;
    let is_4d = |name: &str| {
        base.params.iter().any(|p| matches!(p, KernelParam::Tensor { name: n, shape, .. } if n == name && shape.len() == 4))
    };
    let chunk = if segments.iter().any(|s| is_4d(&s.dest)) { gcd(block_n, head_dim) } else { block_n };
    let chunks = block_n / chunk;
    let mut maps = vec![(a.clone(), GEMM_BLOCK_M)];
    for segment in &segments {
        if !maps.iter().any(|(buffer, _)| *buffer == segment.weight) {
            maps.push((segment.weight.clone(), block_n));
        }
    }
    for (buffer, box_rows) in &maps {
        params.push(KernelParam::TensorMap { name: tensor_map_param(buffer), tensor: buffer.clone(), box_rows: *box_rows });
    }

    let shared = |name: &str, rows: u32| TileDecl {
        name: name.to_string(),
        ty: TileType { elem, rows, cols: GEMM_BLOCK_K, layout: Layout::Swizzled128B },
    };
    let accumulator = |name: &str| TileDecl {
        name: name.to_string(),
        ty: TileType { elem: ElemType::F32, rows: WARPGROUP_ROWS, cols: chunk, layout: Layout::MmaAccumulator { warps_m: 4, warps_n: 1 } },
    };
    let mut tiles = vec![shared("a_ring", stages * GEMM_BLOCK_M), shared("w_ring", stages * block_n)];
    let (a_ring, w_ring) = (TileId(0), TileId(1));
    let row_blocks: u32 = if ping_pong { 2 } else { 1 };
    // (row block, column chunk) → accumulator, row blocks outermost.
    let accumulators: Vec<(u32, u32, TileId)> = (0..row_blocks)
        .flat_map(|block| (0..chunks).map(move |chunk| (block, chunk)))
        .map(|(block, chunk_index)| {
            let name = if chunks == 1 { format!("acc{block}") } else { format!("acc{block}_{chunk_index}") };
            tiles.push(accumulator(&name));
            (block, chunk_index, TileId(tiles.len() - 1))
        })
        .collect();
    let barriers = vec![
        // The elected producer thread's `arrive.expect_tx` per use of a slot.
        BarrierDecl { name: "full".to_string(), slots: stages, arrivals: 1 },
        // Every thread of the warpgroups that read the slot.
        BarrierDecl { name: "empty".to_string(), slots: stages, arrivals: (3 - row_blocks) * WARPGROUP_THREADS },
    ];
    let (full, empty) = (BarrierId(0), BarrierId(1));

    let v = Expr::var;
    let int = |value: u32| Expr::Int(value as i64);
    let add = |a: Expr, b: Expr| Expr::binary(BinOp::Add, a, b);
    let sub = |a: Expr, b: Expr| Expr::binary(BinOp::Sub, a, b);
    let mul = |a: Expr, b: Expr| Expr::binary(BinOp::Mul, a, b);
    let div = |a: Expr, b: Expr| Expr::binary(BinOp::FloorDiv, a, b);
    let rem = |a: Expr, b: Expr| Expr::binary(BinOp::Mod, a, b);
    let lt = |a: Expr, b: Expr| Expr::binary(BinOp::Lt, a, b);
    let let_ = |var: &str, value: Expr| Stmt::Let { var: var.to_string(), value };
    let slot = |ring: BarrierId, step: Expr| BarrierRef { ring, slot: rem(step, int(stages)) };
    // Step s is use s / stages of its slot: its phase has that parity.
    let parity = |step: Expr| rem(div(step, int(stages)), int(2));
    let column_tiles: u32 = segments.iter().map(|s| s.cols.div_ceil(block_n)).sum();
    let k_tiles = k.div_ceil(GEMM_BLOCK_K);

    // Where output tile `ordinal` of this CTA lies: column tile, batch element, first row.
    let tile_position = |prefix: &str| {
        vec![
            let_(&format!("{prefix}tile"), add(Expr::BlockIdx(Axis::X), mul(v("ordinal"), Expr::GridDim(Axis::X)))),
            let_(&format!("{prefix}column_tile"), rem(v(&format!("{prefix}tile")), int(column_tiles))),
            let_(&format!("{prefix}rest"), div(v(&format!("{prefix}tile")), int(column_tiles))),
            let_(&format!("{prefix}batch"), div(v(&format!("{prefix}rest")), v("row_tiles"))),
            let_(&format!("{prefix}row_start"), mul(rem(v(&format!("{prefix}rest")), v("row_tiles")), int(GEMM_BLOCK_M))),
        ]
    };
    // The column segments with the column tile each starts at.
    let mut parts = Vec::new();
    let mut end = 0;
    for segment in &segments {
        parts.push((segment.clone(), end));
        end += segment.cols.div_ceil(block_n);
    }
    // For the stores: runs of segments that continue each other in one destination, each but the
    // last of whole tiles, store as one (ZAYA1: q0 | k0 into p0, both value halves into v), which
    // keeps the epilogue's code (and the compile) small.
    let mut store_parts: Vec<(GemmSegment, u32)> = Vec::new();
    for (segment, first_tile) in &parts {
        match store_parts.last_mut() {
            Some((run, _))
                if run.dest == segment.dest
                    && run.dest_col + run.cols == segment.dest_col
                    && run.cols.is_multiple_of(block_n) =>
            {
                run.cols += segment.cols;
            }
            _ => store_parts.push((segment.clone(), *first_tile)),
        }
    }
    // `then(part, first tile)` for the part that column tile `column_tile` falls in: an if-chain.
    let by_segment = |parts: &[(GemmSegment, u32)], column_tile: Expr, then: &dyn Fn(&GemmSegment, u32) -> Vec<Stmt>| {
        let (last, rest) = parts.split_last().expect("at least one segment");
        let mut chain = then(&last.0, last.1);
        for (segment, first_tile) in rest.iter().rev() {
            let end_tile = first_tile + segment.cols.div_ceil(block_n);
            chain = vec![Stmt::If {
                cond: lt(column_tile.clone(), int(end_tile)),
                then_body: then(segment, *first_tile),
                else_body: chain,
            }];
        }
        chain
    };

    // Producer: one thread waits for a free slot, expects both boxes' bytes and issues them.
    let step_bytes = (GEMM_BLOCK_M + block_n) * GEMM_BLOCK_K * elem.size_bytes() as u32;
    let stage_view = |tile: TileId, rows: u32, row0: Expr| TileView { tile, row0, col0: Expr::Int(0), rows, cols: GEMM_BLOCK_K };
    let issue = |segment: &GemmSegment, first_tile: u32| -> Vec<Stmt> {
        let a_row = sub(v("p_row_start"), int(segment.row_shift));
        let a_coords = match a_head_dim {
            // (column in the head, head, row, batch)
            Some(d) => vec![rem(v("k_start"), int(d)), div(v("k_start"), int(d)), a_row, v("p_batch")],
            // (column, row, batch)
            None => vec![v("k_start"), a_row, v("p_batch")],
        };
        let col_start = mul(sub(v("p_column_tile"), int(first_tile)), int(block_n));
        let stage = rem(v("step"), int(stages));
        vec![
            Stmt::ArriveExpectTx { barrier: slot(full, v("step")), bytes: int(step_bytes) },
            Stmt::TmaLoad {
                dst: stage_view(a_ring, GEMM_BLOCK_M, mul(stage.clone(), int(GEMM_BLOCK_M))),
                map: tensor_map_param(&a),
                coords: a_coords,
                barrier: slot(full, v("step")),
            },
            Stmt::TmaLoad {
                dst: stage_view(w_ring, block_n, mul(stage, int(block_n))),
                map: tensor_map_param(&segment.weight),
                coords: vec![v("k_start"), col_start],
                barrier: slot(full, v("step")),
            },
        ]
    };
    let mut producer_tile = tile_position("p_");
    producer_tile.push(Stmt::For {
        var: "k_tile".to_string(),
        start: int(0),
        end: int(k_tiles),
        body: [
            vec![
                let_("step", add(mul(v("ordinal"), int(k_tiles)), v("k_tile"))),
                let_("k_start", mul(v("k_tile"), int(GEMM_BLOCK_K))),
                Stmt::If {
                    cond: Expr::binary(BinOp::Le, int(stages), v("step")),
                    then_body: vec![Stmt::WaitParity {
                        barrier: slot(empty, sub(v("step"), int(stages))),
                        parity: parity(sub(v("step"), int(stages))),
                    }],
                    else_body: Vec::new(),
                },
            ],
            by_segment(&parts, v("p_column_tile"), &issue),
        ]
        .concat(),
    });
    let producer = vec![Stmt::Elect {
        body: vec![Stmt::For { var: "ordinal".to_string(), start: int(0), end: v("own_tiles"), body: producer_tile }],
    }];

    // Consumers. Ping-pong: warpgroup w takes the CTA's tiles w, w + 2, ... and waits for its
    // turn at named barrier w + 1 before its mainloop (256 threads: it syncs, the other arrives).
    // A full barrier's parity wait is only right within one phase of the barrier's current
    // one, so a warpgroup waits for its tile's slots only once the other has waited for all of
    // the tile before. Warpgroup 1 opens with a pass; the tile with ordinal n hands the turn on
    // only if tile n + 1 exists, so that every arrival meets a sync.
    let (first_ordinal, ordinal_step) = if ping_pong { (v("wg"), 2) } else { (int(0), 1) };
    let own_turn = add(v("wg"), int(1));
    let other_turn = sub(int(2), v("wg"));
    let pair = 2 * WARPGROUP_THREADS;
    let mma_blocks: Vec<Stmt> = accumulators
        .iter()
        .map(|(block, chunk_index, acc)| {
            // Ping-pong: row block `block` of the tile; cooperative: this warpgroup's rows.
            let row_block = if ping_pong { int(*block) } else { v("wg") };
            let a_row0 = add(mul(rem(v("step"), int(stages)), int(GEMM_BLOCK_M)), mul(row_block, int(WARPGROUP_ROWS)));
            let w_row0 = add(mul(rem(v("step"), int(stages)), int(block_n)), int(chunk_index * chunk));
            Stmt::MmaAsync {
                acc: TileView::whole(*acc, &tiles[acc.0].ty),
                a: stage_view(a_ring, WARPGROUP_ROWS, a_row0),
                b: stage_view(w_ring, chunk, w_row0),
                a_transposed: false,
                b_transposed: true,
            }
        })
        .collect();
    let mainloop_body = [
        vec![
            let_("step", add(v("first_step"), v("k_tile"))),
            Stmt::WaitParity { barrier: slot(full, v("step")), parity: parity(v("step")) },
        ],
        mma_blocks,
        vec![
            Stmt::MmaCommit,
            // The group before this one has finished reading its slot.
            Stmt::MmaWait { pending: 1, after: None },
            Stmt::If {
                cond: lt(int(0), v("k_tile")),
                then_body: vec![Stmt::Arrive { barrier: slot(empty, sub(v("step"), int(1))) }],
                else_body: Vec::new(),
            },
        ],
    ]
    .concat();
    let store = |segment: &GemmSegment, first_tile: u32| -> Vec<Stmt> {
        let col_start = mul(sub(v("c_column_tile"), int(first_tile)), int(block_n));
        accumulators
            .iter()
            .flat_map(|(block, chunk_index, acc)| {
                let acc_view = TileView::whole(*acc, &tiles[acc.0].ty);
                let row_block = if ping_pong { int(*block) } else { v("wg") };
                // First column of the chunk in the segment and in the destination.
                let segment_col = add(col_start.clone(), int(chunk_index * chunk));
                let dest_col = add(int(segment.dest_col), segment_col.clone());
                let end = int(segment.dest_col + segment.cols);
                let rows = GlobalDim::Span {
                    start: add(v("c_row_start"), mul(row_block, int(WARPGROUP_ROWS))),
                    len: WARPGROUP_ROWS,
                    valid: None,
                };
                let dims = if is_4d(&segment.dest) {
                    let head = div(dest_col.clone(), int(head_dim));
                    let head_first = mul(head.clone(), int(head_dim));
                    vec![
                        GlobalDim::At(v("c_batch")),
                        rows,
                        GlobalDim::At(head),
                        GlobalDim::Span {
                            start: sub(dest_col.clone(), head_first.clone()),
                            len: chunk,
                            valid: Some((sub(dest_col, head_first.clone()), sub(end, head_first))),
                        },
                    ]
                } else {
                    vec![
                        GlobalDim::At(v("c_batch")),
                        rows,
                        GlobalDim::Span { start: dest_col.clone(), len: chunk, valid: Some((dest_col, end)) },
                    ]
                };
                let store = Stmt::Store { src: acc_view, dst: GlobalTile { param: segment.dest.clone(), dims } };
                if chunks == 1 {
                    return vec![store];
                }
                // A chunk past the segment's end (a narrow segment in a wide tile) would address
                // a head that is not there.
                vec![Stmt::If { cond: lt(segment_col, int(segment.cols)), then_body: vec![store], else_body: Vec::new() }]
            })
            .collect()
    };
    let mut consumer_tile = vec![
        let_("ordinal", add(first_ordinal.clone(), mul(v("index"), int(ordinal_step)))),
        let_("first_step", mul(v("ordinal"), int(k_tiles))),
    ];
    // The accumulators start at the bias (or zero), so that the epilogue only stores: adding
    // it there kept the bias values live beside both accumulators, and ptxas spilled.
    consumer_tile.extend(tile_position("c_"));
    let initialize = |segment: &GemmSegment, first_tile: u32| -> Vec<Stmt> {
        let col_start = mul(sub(v("c_column_tile"), int(first_tile)), int(block_n));
        accumulators
            .iter()
            .map(|(_, chunk_index, acc)| {
                let dst = TileView::whole(*acc, &tiles[acc.0].ty);
                match &segment.bias {
                    Some(bias) => {
                        let column = add(add(col_start.clone(), int(chunk_index * chunk)), Expr::Col);
                        Stmt::Map {
                            dst,
                            expr: Expr::Select(
                                Box::new(lt(column.clone(), int(segment.cols))),
                                Box::new(Expr::global(bias, vec![column])),
                                Box::new(Expr::Float(0.0)),
                            ),
                        }
                    }
                    None => Stmt::Fill { dst, value: 0.0 },
                }
            })
            .collect()
    };
    if segments.iter().any(|segment| segment.bias.is_some()) {
        consumer_tile.extend(by_segment(&parts, v("c_column_tile"), &initialize));
    } else {
        consumer_tile.extend(initialize(&segments[0], 0));
    }
    if ping_pong {
        consumer_tile.push(Stmt::NamedBarrier { id: own_turn, threads: pair, sync: true });
    }
    consumer_tile.push(Stmt::For { var: "k_tile".to_string(), start: int(0), end: int(k_tiles), body: mainloop_body });
    if ping_pong {
        consumer_tile.push(Stmt::If {
            cond: lt(add(v("ordinal"), int(1)), v("own_tiles")),
            then_body: vec![Stmt::NamedBarrier { id: other_turn.clone(), threads: pair, sync: false }],
            else_body: Vec::new(),
        });
    }
    consumer_tile.extend([
        Stmt::MmaWait { pending: 0, after: None },
        // The tile's last slot is free once its group retired: the producer may fill it for
        // the next tile while this one is stored.
        Stmt::Arrive { barrier: slot(empty, add(v("first_step"), int(k_tiles - 1))) },
    ]);
    consumer_tile.extend(by_segment(&store_parts, v("c_column_tile"), &store));
    let mut consumer = Vec::new();
    if ping_pong {
        consumer.push(Stmt::If {
            cond: Expr::binary(BinOp::And, lt(int(0), v("wg")), lt(int(0), v("own_tiles"))),
            then_body: vec![Stmt::NamedBarrier { id: other_turn, threads: pair, sync: false }],
            else_body: Vec::new(),
        });
    }
    // ceil((own_tiles − first_ordinal) / step); the dividend is never below −1.
    consumer.push(let_(
        "my_tiles",
        div(add(sub(v("own_tiles"), first_ordinal), int(ordinal_step - 1)), int(ordinal_step)),
    ));
    consumer.push(Stmt::For { var: "index".to_string(), start: int(0), end: v("my_tiles"), body: consumer_tile });

    let body = vec![
        Stmt::Note(format!(
            "persistent: tile i of this CTA is blockIdx.x + i * gridDim.x of {column_tiles} column tiles x ceil(S / {GEMM_BLOCK_M}) row tiles x B"
        )),
        let_("row_tiles", Expr::binary(BinOp::CeilDiv, Expr::Size(SizeVar::SeqLen), int(GEMM_BLOCK_M))),
        let_("tiles", mul(mul(v("row_tiles"), Expr::Size(SizeVar::Batch)), int(column_tiles))),
        // ceil((tiles − blockIdx.x) / gridDim.x), never negative (blockIdx.x < gridDim.x).
        let_(
            "own_tiles",
            div(add(sub(v("tiles"), Expr::BlockIdx(Axis::X)), sub(Expr::GridDim(Axis::X), int(1))), Expr::GridDim(Axis::X)),
        ),
        Stmt::Roles(vec![
            Role { name: "consumer".to_string(), warpgroups: 2, index: "wg".to_string(), registers: GEMM_CONSUMER_REGISTERS, body: consumer },
            Role { name: "producer".to_string(), warpgroups: 1, index: "p".to_string(), registers: PRODUCER_REGISTERS, body: producer },
        ]),
    ];
    let kernel = KernelFn {
        name: base.name.clone(),
        params,
        grid: PERSISTENT_GRID,
        warps: WARPS,
        tiles,
        barriers,
        schedule: Schedule { block_m: GEMM_BLOCK_M, block_n, block_k: GEMM_BLOCK_K, warps: WARPS, stages },
        ctas_per_sm: 1,
        body,
    };
    kernel.verify().map_err(|errors| format!("{} does not verify:\n  {}", kernel.name, errors.join("\n  ")))?;
    Ok(kernel)
}
