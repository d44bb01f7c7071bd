//! Flash attention forward as a warp-specialized Hopper kernel, with the ABI of the tiled
//! attention kernel of [`super`] (q, k, v, o, lse, B, S) plus the TMA descriptors of q, k and v.
//!
//! One CTA computes `block_m` query rows of one query head of one batch element: one or two
//! consumer warpgroups own 64 rows each, one producer warpgroup's elected thread copies Q once
//! and the key tiles' K and V into a ring of `stages` swizzled buffers with TMA (rows past S
//! arrive as zeros), handing each slot over on its `full` mbarrier and taking it back on
//! `empty`. Per key tile and consumer: `S = Q·Kᵀ` (asynchronous wgmma), the mask only on tiles
//! that need it, online softmax in base 2 (`2^(s · scale · log2 e − m)`: one fma and one `ex2`
//! per score), `P` rounded to the storage type in registers and `O += P·V` with P as the register
//! operand and V read MN-major. Iteration j issues `S_j` and `P_{j-1}·V_{j-1}` back to back and
//! runs the softmax of tile j while `P·V` is on the tensor cores (FlashAttention-3's
//! intra-warpgroup overlap); with ping-pong the two consumers also take turns to issue their
//! GEMMs (named barriers 1 and 2), so that one's softmax runs beside the other's GEMMs.
//!
//! While `P·V` is in flight the softmax must not branch (ptxas waits for every wgmma at a join),
//! so after the first tile the key tiles run in three loops that mask all or nothing: a window's
//! leading tiles, the unmasked middle, the tiles that cross the diagonal or the sequence end.
//!
//! CTAs take query tiles longest first within groups of heads whose K/V fits
//! `l2_group_bytes` of L2: the hardware starts CTAs about in launch order, so the longest causal
//! rows start first and the tail stays short, while the K/V of the CTAs in flight stays in L2.

use super::*;

/// Rows of Q one consumer warpgroup owns (the wgmma M).
const WARPGROUP_ROWS: u32 = 64;
/// K/V stages the kernel takes: the tile read by `S`, the one `P·V` still reads, one loading; at
/// most what 227 KiB could hold of the smallest tiles (the bound keeps a tuning file's count from
/// overflowing the shared-memory arithmetic).
pub const MIN_STAGES: u32 = 3;
pub const MAX_STAGES: u32 = 16;
/// Registers per thread of the producer (it only computes coordinates) and of the consumers
/// (56 + 2 · 224 = 3 · 168, the allotment of a 384-thread CTA).
const PRODUCER_REGISTERS: u32 = 56;
pub const ATTENTION_CONSUMER_REGISTERS: u32 = 224;

/// The tiles, ring depth and consumer schedule of the wgmma attention kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WgmmaAttentionSchedule {
    /// Query rows per CTA: 64 per consumer warpgroup, one or two.
    pub block_m: u32,
    /// Keys per tile (the N of `S = Q·Kᵀ`, the K of `P·V`): a multiple of 16 up to 256.
    pub block_n: u32,
    /// K/V buffers: at least 3 (the tile read by `S`, the one `P·V` still reads, one loading).
    pub stages: u32,
    /// The two consumers take turns to issue their GEMMs (needs block_m 128).
    pub ping_pong: bool,
    /// K/V bytes of the heads that CTAs work on together (whole kv heads, at least one).
    pub l2_group_bytes: u32,
}

/// The shared and register tiles and the barrier rings of the kernel for one schedule.
struct Storage {
    tiles: Tiles,
    barriers: Vec<BarrierDecl>,
    warps: u32,
    consumers: u32,
    q_s: TileId,
    k_s: TileId,
    v_s: TileId,
    scores: TileId,
    probs: TileId,
    o: TileId,
    m: TileId,
    m_new: TileId,
    shift: TileId,
    alpha: TileId,
    tile_max: TileId,
    row_sum: TileId,
    l: TileId,
    tile_sum: TileId,
}

impl Storage {
    /// Checks the schedule against what the kernel takes and declares its storage.
    fn new(elem: ElemType, d: u32, schedule: &WgmmaAttentionSchedule) -> Result<Storage, String> {
        let WgmmaAttentionSchedule { block_m: bm, block_n: bn, stages, ping_pong, .. } = *schedule;
        let panel = layout::panel_cols(elem);
        if !elem.is_mma_operand() {
            return Err("attention operands are bf16 or f16".to_string());
        }
        if d == 0 || !d.is_multiple_of(panel) || d > 256 {
            return Err(format!("the wgmma attention kernel takes head_dim in whole {panel}-column panels up to 256, not {d}"));
        }
        if bm != WARPGROUP_ROWS && bm != 2 * WARPGROUP_ROWS {
            return Err(format!("block_m must be 64 or 128 (64 rows per consumer warpgroup), not {bm}"));
        }
        if bn == 0 || !bn.is_multiple_of(16) || bn > 256 {
            return Err(format!("block_n must be a multiple of 16 up to 256, not {bn}"));
        }
        if !(MIN_STAGES..=MAX_STAGES).contains(&stages) {
            return Err(format!("{stages} K/V stages: the overlapped loop needs {MIN_STAGES} to {MAX_STAGES}"));
        }
        if ping_pong && bm != 2 * WARPGROUP_ROWS {
            return Err("the ping-pong schedule alternates two consumer warpgroups: block_m must be 128".to_string());
        }
        let consumers = bm / WARPGROUP_ROWS;
        let mut t = Tiles { decls: Vec::new() };
        let q_s = t.swizzled("q_s", elem, bm, d);
        let k_s = t.swizzled("k_s", elem, stages * bn, d);
        let v_s = t.swizzled("v_s", elem, stages * bn, d);
        let acc = Layout::MmaAccumulator { warps_m: 4, warps_n: 1 };
        let rows = Layout::RowVector { warps_m: 4, warps_n: 1 };
        let scores = t.regs("scores", ElemType::F32, WARPGROUP_ROWS, bn, acc);
        let probs = t.regs("probs", elem, WARPGROUP_ROWS, bn, Layout::MmaOperandA { warps_m: 4, warps_n: 1 });
        let o = t.regs("o", ElemType::F32, WARPGROUP_ROWS, d, acc);
        // m: the running maximum in log2 units (of s · scale · log2 e); shift: m, or 0 while a
        // row has seen no key (so that 2^(−∞ − shift) is 0, not NaN); alpha: the factor O and l
        // decay by.
        let [m, m_new, shift, alpha, tile_max, row_sum] =
            ["m", "m_new", "shift", "alpha", "tile_max", "row_sum"].map(|name| t.regs(name, ElemType::F32, WARPGROUP_ROWS, 1, rows));
        // The running row sums l stay split over the threads of each row until the end: adding
        // them up at every key tile would put shuffles on the softmax's path.
        let shares = Layout::RowShares { warps_m: 4, warps_n: 1 };
        let [l, tile_sum] = ["l", "tile_sum"].map(|name| t.regs(name, ElemType::F32, WARPGROUP_ROWS, 1, shares));
        let barriers = vec![
            BarrierDecl { name: "q_full".to_string(), slots: 1, arrivals: 1 },
            // The elected producer thread's `arrive.expect_tx` per use of a slot.
            BarrierDecl { name: "full".to_string(), slots: stages, arrivals: 1 },
            // Every consumer thread, once `P·V` of the slot's tile has retired.
            BarrierDecl { name: "empty".to_string(), slots: stages, arrivals: consumers * WARPGROUP_THREADS },
        ];
        let warps = (consumers + 1) * WARPGROUP_THREADS / 32;
        Ok(Storage {
            tiles: t, barriers, warps, consumers, q_s, k_s, v_s, scores, probs, o, m, m_new, shift, alpha, tile_max, row_sum, l, tile_sum,
        })
    }
}

/// Threads and shared memory (alignment included) of the kernel `schedule` builds for heads of
/// `head_dim` elements of `elem`: what the resource model and tuning check candidates with
/// (against [`SHARED_MEMORY_LIMIT_BYTES`] too). Errors say what the schedule does not allow.
pub fn wgmma_attention_footprint(elem: ElemType, head_dim: u32, schedule: &WgmmaAttentionSchedule) -> Result<(u32, usize), String> {
    let storage = Storage::new(elem, head_dim, schedule)?;
    // The storage alone, with one ordered wait: the kernel's anchor words count too.
    let skeleton = KernelFn {
        name: String::new(),
        params: Vec::new(),
        grid: [SizeExpr::c(1), SizeExpr::c(1), SizeExpr::c(1)],
        warps: storage.warps,
        tiles: storage.tiles.decls,
        barriers: storage.barriers,
        schedule: Schedule { block_m: schedule.block_m, block_n: schedule.block_n, block_k: head_dim, warps: storage.warps, stages: schedule.stages },
        ctas_per_sm: 1,
        body: vec![Stmt::MmaWait { pending: 0, after: Some(storage.l) }],
    };
    Ok((skeleton.threads(), skeleton.shared_bytes()))
}

/// Whether `mask` is causal, and its sliding window in keys (a window longer than any sequence
/// the kernel's i32 positions reach is causal).
pub fn causal_window(mask: Mask) -> (bool, Option<u32>) {
    match mask {
        Mask::None => (false, None),
        Mask::Causal => (true, None),
        Mask::SlidingWindow { window } => (true, Some(window.min(i32::MAX as usize) as u32)),
    }
}

/// Builds the wgmma attention kernel that replaces the tiled attention kernel `base` of `spec`
/// over `rows` (same name, same parameters, then the tensor maps of q, k and v). Errors name
/// what the shape or the schedule does not allow.
pub fn build_wgmma_attention(spec: &AttentionSpec, base: &KernelFn, schedule: &WgmmaAttentionSchedule, rows: TokenRows) -> Result<KernelFn, String> {
    let WgmmaAttentionSchedule { block_m: bm, block_n: bn, stages, ping_pong, l2_group_bytes } = *schedule;
    let d = spec.head_dim as u32;
    let elem = ElemType::from(spec.dtype);
    let Storage { tiles: t, barriers, warps, consumers, q_s, k_s, v_s, scores, probs, o, m, m_new, shift, alpha, tile_max, row_sum, l, tile_sum } =
        Storage::new(elem, d, schedule)?;
    let group = spec.groups() as u32;
    let (hq, hk) = (spec.query_heads as u32, spec.kv_heads as u32);

    let mut params = base.params.clone();
    for (tensor, box_rows) in [("q", bm), ("k", bn), ("v", bn)] {
        params.push(KernelParam::TensorMap { name: tensor_map_param(tensor), tensor: tensor.to_string(), box_rows });
    }
    let (q_full, full, empty) = (BarrierId(0), BarrierId(1), BarrierId(2));
    let slot = |ring: BarrierId, tile: Expr| BarrierRef { ring, slot: tile.modulo(int(stages)) };
    // Key tile j is use j / stages of its slot: its phase has that parity.
    let parity = |tile: Expr| tile.floor_div(int(stages)).modulo(int(2));
    let kv_view = |ring: TileId, tile: Expr| t.view(ring, times(tile.modulo(int(stages)), bn), int(0), bn, d);
    let w = |id: TileId| t.whole(id);
    let at_row = |tile: TileId| Expr::tile(tile, Expr::Row, int(0));
    let neg_inf = Expr::Float(f64::NEG_INFINITY);

    // The CTA's work: which head and query tile (longest first within an L2 group of heads),
    // and its key tiles kv_first + j for j in 0..kv_count (every CTA has at least one).
    let (causal, window) = causal_window(spec.mask);
    let kv_token_bytes = 2 * d * elem.size_bytes() as u32;
    let mut body = vec![Stmt::Note(format!(
        "CTA = {bm} query rows of head h, batch b; {consumers} consumer warpgroup(s) of 64 rows, one TMA producer; key tiles of {bn} through {stages} stages"
    ))];
    match rows {
        TokenRows::Batch => body.extend([
            let_("q_tiles", seq().ceil_div(int(bm))),
            Stmt::Note(format!("longest query tiles first within groups of heads whose K/V fits {l2_group_bytes} bytes")),
            let_("group_kv_heads", int(l2_group_bytes / kv_token_bytes).floor_div(seq()).max(int(1)).min(int(hk))),
            let_("group_heads", var("group_kv_heads") * int(group)),
            let_("ordinal", Expr::BlockIdx(Axis::X) + var("q_tiles") * Expr::BlockIdx(Axis::Y)),
            let_("first_head", var("ordinal").floor_div(var("group_heads") * var("q_tiles")) * var("group_heads")),
            let_("in_group", var("ordinal") - var("first_head") * var("q_tiles")),
            let_("heads_here", var("group_heads").min(int(hq) - var("first_head"))),
            let_("rank", var("in_group").floor_div(var("heads_here"))),
            let_("h", var("first_head") + var("in_group") - var("rank") * var("heads_here")),
            let_("q_row0", (var("q_tiles") - int(1) - var("rank")) * int(bm)),
            let_("b", Expr::BlockIdx(Axis::Z)),
        ]),
        TokenRows::Packed => {
            body.push(let_("b", Expr::BlockIdx(Axis::Z)));
            body.extend(rows.sequence_lets());
            body.extend([
                Stmt::Note("the sequence's query tiles longest first; CTAs past its tiles (q_row0 < 0) exit".into()),
                let_("q_tiles", rows.len().ceil_div(int(bm))),
                let_("h", Expr::BlockIdx(Axis::Y)),
                let_("q_row0", (var("q_tiles") - int(1) - Expr::BlockIdx(Axis::X)) * int(bm)),
            ]);
        }
    }
    body.push(let_("kv_head", var("h").floor_div(int(group))));
    let kv_tiles = rows.len().ceil_div(int(bn));
    body.push(let_(
        "kv_first",
        match window {
            Some(window) => (var("q_row0") - int(window - 1)).max(int(0)).floor_div(int(bn)),
            None => int(0),
        },
    ));
    let kv_end = if causal { kv_tiles.clone().min((var("q_row0") + int(bm)).ceil_div(int(bn))) } else { kv_tiles };
    body.push(let_("kv_count", kv_end.clone() - var("kv_first")));
    // Key tiles (counted from kv_first) below `unmasked_end` end inside the sequence and, causal,
    // at or before the CTA's first row; from `window_clear` on, every key is inside the window of
    // the CTA's last row.
    let whole_tiles = rows.len().floor_div(int(bn));
    let unmasked_end = if causal {
        (var("q_row0") + int(1)).floor_div(int(bn)).min(whole_tiles).min(kv_end)
    } else {
        whole_tiles.min(kv_end)
    };
    body.push(let_("unmasked_end", (unmasked_end - var("kv_first")).max(int(0))));
    body.push(let_(
        "window_clear",
        match window {
            Some(window) => {
                ((var("q_row0") + int(bm) - int(window)).max(int(0)).ceil_div(int(bn)) - var("kv_first")).max(int(0))
            }
            None => int(0),
        },
    ));

    // Producer: Q once, then K and V of each key tile once its slot is free.
    let q_bytes = bm * d * elem.size_bytes() as u32;
    let kv_bytes = 2 * bn * d * elem.size_bytes() as u32;
    let kv_row = |tile: Expr| (var("kv_first") + tile) * int(bn);
    let producer = vec![Stmt::Elect {
        body: vec![
            Stmt::ArriveExpectTx { barrier: BarrierRef { ring: q_full, slot: int(0) }, bytes: int(q_bytes) },
            // Coordinates innermost first: (column, head, row, batch).
            Stmt::TmaLoad {
                dst: w(q_s),
                map: tensor_map_param("q"),
                coords: vec![int(0), var("h"), rows.row(var("q_row0")), rows.batch()],
                barrier: BarrierRef { ring: q_full, slot: int(0) },
            },
            for_(
                "j",
                int(0),
                var("kv_count"),
                vec![
                    Stmt::If {
                        cond: int(stages).le(var("j")),
                        then_body: vec![Stmt::WaitParity {
                            barrier: slot(empty, var("j") - int(stages)),
                            parity: parity(var("j") - int(stages)),
                        }],
                        else_body: Vec::new(),
                    },
                    Stmt::ArriveExpectTx { barrier: slot(full, var("j")), bytes: int(kv_bytes) },
                    Stmt::TmaLoad {
                        dst: kv_view(k_s, var("j")),
                        map: tensor_map_param("k"),
                        coords: vec![int(0), var("kv_head"), rows.row(kv_row(var("j"))), rows.batch()],
                        barrier: slot(full, var("j")),
                    },
                    Stmt::TmaLoad {
                        dst: kv_view(v_s, var("j")),
                        map: tensor_map_param("v"),
                        coords: vec![int(0), var("kv_head"), rows.row(kv_row(var("j"))), rows.batch()],
                        barrier: slot(full, var("j")),
                    },
                ],
            ),
        ],
    }];

    // Consumers. Ping-pong: warpgroup wg waits for its turn at named barrier wg + 1 and passes
    // it at the other's (128 syncing + 128 arriving threads). Warpgroup 1 opens with a pass so
    // that warpgroup 0 issues first, and skips its very last pass, which nobody would wait for.
    let pair = 2 * WARPGROUP_THREADS;
    let take_turn = || -> Vec<Stmt> {
        if ping_pong { vec![Stmt::NamedBarrier { id: var("wg") + int(1), threads: pair, sync: true }] } else { Vec::new() }
    };
    let pass_turn = |last: bool| -> Vec<Stmt> {
        if !ping_pong {
            return Vec::new();
        }
        let pass = Stmt::NamedBarrier { id: int(2) - var("wg"), threads: pair, sync: false };
        if last { vec![Stmt::If { cond: var("wg").lt(int(1)), then_body: vec![pass], else_body: Vec::new() }] } else { vec![pass] }
    };
    let q_band = t.view(q_s, var("wg") * int(WARPGROUP_ROWS), int(0), WARPGROUP_ROWS, d);
    let issue_scores = |tile: Expr| -> Vec<Stmt> {
        vec![
            Stmt::Fill { dst: w(scores), value: 0.0 },
            Stmt::MmaAsync { acc: w(scores), a: q_band.clone(), b: kv_view(k_s, tile), a_transposed: false, b_transposed: true },
            Stmt::MmaCommit,
        ]
    };
    // O decays by the previous tile's alpha right before that tile's P·V is added.
    let issue_output = |tile: Expr| -> Vec<Stmt> {
        vec![
            Stmt::Map { dst: w(o), expr: Expr::Elem * at_row(alpha) },
            Stmt::MmaAsync { acc: w(o), a: w(probs), b: kv_view(v_s, tile), a_transposed: false, b_transposed: false },
            Stmt::MmaCommit,
        ]
    };
    // Scores of keys a row may not see (past S, above the diagonal, before its window) become −∞.
    let mask = |tile: Expr| {
        let query = var("row0") + Expr::Row;
        let key = (var("kv_first") + tile) * int(bn) + Expr::Col;
        let mut visible = key.clone().lt(rows.len());
        if causal {
            visible = visible.and(key.clone().le(query.clone()));
        }
        if let Some(window) = window {
            visible = visible.and((query - key).lt(int(window)));
        }
        Stmt::Map { dst: w(scores), expr: Expr::select(visible, Expr::Elem, neg_inf.clone()) }
    };
    let scale_log2 = Expr::Float(spec.softmax_scale * std::f64::consts::LOG2_E);
    let softmax = vec![
        Stmt::RowReduce { dst: tile_max, src: w(scores), op: ReduceOp::Max, value: Expr::Elem },
        Stmt::Map { dst: w(m_new), expr: at_row(m).max(at_row(tile_max) * scale_log2.clone()) },
        Stmt::Map {
            dst: w(shift),
            expr: Expr::select(at_row(m_new).eq(neg_inf.clone()), Expr::Float(0.0), at_row(m_new)),
        },
        Stmt::Map { dst: w(alpha), expr: (at_row(m) - at_row(shift)).exp2() },
        Stmt::Map { dst: w(m), expr: at_row(m_new) },
        Stmt::Map { dst: w(scores), expr: (Expr::Elem * scale_log2 - at_row(shift)).exp2() },
        Stmt::RowReduce { dst: tile_sum, src: w(scores), op: ReduceOp::Sum, value: Expr::Elem },
        Stmt::Map { dst: w(l), expr: Expr::Elem * at_row(alpha) + at_row(tile_sum) },
    ];
    let acquire = |tile: Expr| Stmt::WaitParity { barrier: slot(full, tile.clone()), parity: parity(tile) };

    let mut consumer = vec![
        let_("row0", var("q_row0") + var("wg") * int(WARPGROUP_ROWS)),
        Stmt::Fill { dst: w(o), value: 0.0 },
        Stmt::Fill { dst: w(m), value: f64::NEG_INFINITY },
        Stmt::Fill { dst: w(l), value: 0.0 },
    ];
    if ping_pong {
        consumer.push(Stmt::If {
            cond: int(0).lt(var("wg")),
            then_body: vec![Stmt::NamedBarrier { id: int(1), threads: pair, sync: false }],
            else_body: Vec::new(),
        });
    }
    consumer.push(Stmt::WaitParity { barrier: BarrierRef { ring: q_full, slot: int(0) }, parity: int(0) });
    // The first tile: nothing else in flight, so its mask may branch.
    consumer.push(Stmt::Note("key tile 0".into()));
    consumer.push(acquire(int(0)));
    consumer.extend(take_turn());
    consumer.extend(issue_scores(int(0)));
    consumer.extend(pass_turn(false));
    consumer.push(Stmt::MmaWait { pending: 0, after: None });
    consumer.push(Stmt::If {
        cond: int(0).lt(var("unmasked_end")).and(var("window_clear").le(int(0))),
        then_body: Vec::new(),
        else_body: vec![mask(int(0))],
    });
    consumer.extend(softmax.clone());
    consumer.push(Stmt::Convert { dst: w(probs), src: w(scores) });
    // Tile j: S_j and P_{j-1}·V_{j-1} issued together, the softmax of j beside P·V.
    let steady = |masked: bool| -> Vec<Stmt> {
        let mut out = vec![acquire(var("j"))];
        out.extend(take_turn());
        out.extend(issue_scores(var("j")));
        out.extend(issue_output(var("j") - int(1)));
        out.extend(pass_turn(false));
        out.push(Stmt::MmaWait { pending: 1, after: None });
        if masked {
            out.push(mask(var("j")));
        }
        out.extend(softmax.clone());
        out.push(Stmt::MmaWait { pending: 0, after: Some(l) });
        out.push(Stmt::Arrive { barrier: slot(empty, var("j") - int(1)) });
        out.push(Stmt::Convert { dst: w(probs), src: w(scores) });
        out
    };
    consumer.push(Stmt::Note("a window's leading tiles (masked), the unmasked middle, the tiles at the diagonal or the sequence end (masked)".into()));
    consumer.push(let_("middle_start", var("window_clear").max(int(1)).min(var("kv_count").max(int(1)))));
    consumer.push(let_("middle_end", var("unmasked_end").max(var("middle_start"))));
    if window.is_some() {
        consumer.push(for_("j", int(1), var("middle_start"), steady(true)));
    }
    consumer.push(for_("j", var("middle_start"), var("middle_end"), steady(false)));
    consumer.push(for_("j", var("middle_end"), var("kv_count"), steady(true)));
    consumer.extend(take_turn());
    consumer.extend(issue_output(var("kv_count") - int(1)));
    consumer.extend(pass_turn(true));
    consumer.push(Stmt::MmaWait { pending: 0, after: None });
    // O / l and lse = (m + log2 l) · ln 2; rows without any key (l = 0) give O = 0, lse = −∞.
    let empty_row = at_row(row_sum).eq(Expr::Float(0.0));
    consumer.extend([
        Stmt::Convert { dst: w(row_sum), src: w(l) },
        Stmt::Map { dst: w(o), expr: Expr::Elem * Expr::select(empty_row.clone(), Expr::Float(0.0), Expr::Float(1.0) / at_row(row_sum)) },
        Stmt::Store {
            src: w(o),
            dst: GlobalTile {
                param: "o".into(),
                dims: vec![GlobalDim::At(rows.batch()), rows.rows(var("row0"), WARPGROUP_ROWS), GlobalDim::At(var("h")), span(int(0), d)],
            },
        },
        Stmt::Map {
            dst: w(m),
            expr: Expr::select(empty_row, neg_inf, (Expr::Elem + at_row(row_sum).log2()) * Expr::Float(std::f64::consts::LN_2)),
        },
        Stmt::Store {
            src: w(m),
            dst: GlobalTile {
                param: "lse".into(),
                dims: vec![GlobalDim::At(rows.batch()), GlobalDim::At(var("h")), rows.rows(var("row0"), WARPGROUP_ROWS)],
            },
        },
    ]);

    let roles = Stmt::Roles(vec![
        Role { name: "consumer".into(), warpgroups: consumers, index: "wg".into(), registers: ATTENTION_CONSUMER_REGISTERS, body: consumer },
        Role { name: "producer".into(), warpgroups: 1, index: "p".into(), registers: PRODUCER_REGISTERS, body: producer },
    ]);
    body.push(match rows {
        TokenRows::Batch => roles,
        TokenRows::Packed => Stmt::If { cond: int(0).le(var("q_row0")), then_body: vec![roles], else_body: Vec::new() },
    });
    let kernel = KernelFn {
        name: base.name.clone(),
        params,
        grid: [SizeExpr::seq_len().ceil_div(bm as u64), size(spec.query_heads), SizeExpr::batch()],
        warps,
        tiles: t.decls,
        barriers,
        schedule: Schedule { block_m: bm, block_n: bn, block_k: d, warps, stages },
        ctas_per_sm: 1,
        body,
    };
    kernel.verify().map_err(|errors| format!("{} does not verify:\n  {}", kernel.name, errors.join("\n  ")))?;
    Ok(kernel)
}
