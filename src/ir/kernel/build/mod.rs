//! Builders of the forward kernels of a layer: `qkv_proj` (the projection GEMM, column segments
//! for q, k and the current and delayed value heads), `qk_prologue` (the CCA steps on the packed
//! [q0 | k0], when the spec has any), `attention` (flash attention, online softmax) and
//! `out_proj` (tiled GEMM).

mod backward;
mod decode;
mod qk_prologue;
use qk_prologue::PrologueBuilder;
mod wgmma_attention;
mod wgmma_gemm;

pub use backward::{
    AttentionBackwardKernel, BackwardKernel, GradientTerm, InputGradient, SplitGradient, SummedRows, TokenSum, WeightGradient, backward_kernels, build_attention_backward, build_input_gradient,
    build_prologue_backward, build_prologue_conv_backward, build_token_sum, build_weight_gradient, default_attention_backward_schedule, gradient_name,
    parts_name, projection_gradients, prologue_backward_output, stage_gradient_name, stage_input_name, with_default_gradient_schedule,
};
pub use decode::{CONV_STATE, DecodeKernel, PagedKv, SHIFT_NEXT, SHIFT_STATE, build_decode, decode_projection_segments};
pub use wgmma_attention::{
    ATTENTION_CONSUMER_REGISTERS, WgmmaAttentionSchedule, build_wgmma_attention, causal_window, wgmma_attention_footprint,
};
pub use wgmma_gemm::{
    GEMM_BLOCK_K, GEMM_BLOCK_M, GEMM_CONSUMER_REGISTERS, GemmSegment, PERSISTENT_GRID, WgmmaGemmSchedule, build_wgmma_projection, gemm_operands,
    tensor_map_param,
};

use super::*;
use crate::spec::{AttentionSpec, ConvKind, KeyTemperature, Mask, ParamRole, QkNorm, RopeStyle};

/// Which forward kernel to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ForwardKernel {
    QkvProjection,
    QkPrologue,
    Attention,
    OutputProjection,
}

impl ForwardKernel {
    /// The kernels one forward call of `spec` launches, in launch order: `qk_prologue` only
    /// when q or k have a step after the projection.
    pub fn launched_by(spec: &AttentionSpec) -> Vec<ForwardKernel> {
        let mut kernels = vec![ForwardKernel::QkvProjection];
        if has_qk_prologue(spec) {
            kernels.push(ForwardKernel::QkPrologue);
        }
        kernels.extend([ForwardKernel::Attention, ForwardKernel::OutputProjection]);
        kernels
    }

    /// Suffix of the kernel symbol `{spec.name}_{suffix}`.
    pub fn suffix(self) -> &'static str {
        match self {
            ForwardKernel::QkvProjection => "qkv_proj",
            ForwardKernel::QkPrologue => "qk_prologue",
            ForwardKernel::Attention => "attention",
            ForwardKernel::OutputProjection => "out_proj",
        }
    }
}

/// Whether q or k have a step between the projection and attention (convolutions, q-k mean, L2
/// norm, RoPE): then the projection writes the packed [q0 | k0] as `p0` and `qk_prologue`
/// turns it into q and k.
pub fn has_qk_prologue(spec: &AttentionSpec) -> bool {
    !spec.qk_conv.is_empty() || spec.qk_mean || spec.qk_norm == QkNorm::L2 || spec.rope.is_some()
}

/// The buffer `qkv_proj` writes for `qk_prologue`: [B, S, lq + lk], q0 then k0 of each token.
pub const PROJECTION_BUFFER: &str = "p0";

/// One column range of the projection GEMM: `output`[b, t, column0 .. column0 + width] =
/// x[b, t − row_shift]·weightᵀ + bias, with x of rows before token 0 read as zero. Channels of
/// a [B, S, heads, d] output count heads·d.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProjectionSegment {
    pub weight: String,
    pub bias: Option<String>,
    /// `p0`, or `q`, `k`, `v`.
    pub output: String,
    pub column0: usize,
    pub width: usize,
    /// 1 for the delayed value heads (the previous token's x), else 0.
    pub row_shift: usize,
}

/// The segments of `qkv_proj` in column order: q, k (into `p0` when the spec has a q/k
/// prologue), the current value heads, the delayed value heads; none of zero width.
pub fn projection_segments(spec: &AttentionSpec) -> Vec<ProjectionSegment> {
    let name = |role| param_name(spec, role);
    let packed = has_qk_prologue(spec);
    let (lq, lk) = (spec.q_width(), spec.kv_width());
    let current = spec.current_value_heads() * spec.head_dim;
    let segment = |weight: ParamRole, bias, output: &str, column0, width, row_shift| {
        name(weight).map(|weight| ProjectionSegment {
            weight,
            bias: name(bias),
            output: output.to_string(),
            column0,
            width,
            row_shift,
        })
    };
    let (q_out, k_out, k0) = if packed {
        (PROJECTION_BUFFER, PROJECTION_BUFFER, lq)
    } else {
        ("q", "k", 0)
    };
    [
        segment(ParamRole::QueryProj, ParamRole::QueryBias, q_out, 0, lq, 0),
        segment(ParamRole::KeyProj, ParamRole::KeyBias, k_out, k0, lk, 0),
        segment(
            ParamRole::ValueProjCurrent,
            ParamRole::ValueBiasCurrent,
            "v",
            0,
            current,
            0,
        ),
        segment(
            ParamRole::ValueProjDelayed,
            ParamRole::ValueBiasDelayed,
            "v",
            current,
            spec.kv_width() - current,
            1,
        ),
    ]
    .into_iter()
    .flatten()
    .filter(|s| s.width > 0)
    .collect()
}

/// The schedule a kernel gets unless told otherwise: the largest tiles (and most warps) whose
/// kernel verifies, shared memory included, for mma.sync on sm_90a.
pub fn default_schedule(spec: &AttentionSpec, which: ForwardKernel) -> Result<Schedule, String> {
    let d = spec.head_dim as u32;
    // Two stages (copy one tile ahead) where shared memory allows, else one.
    let gemm = |block_n: u32| {
        [2, 1].map(|stages| Schedule {
            block_m: 64,
            block_n,
            block_k: 32,
            warps: 4,
            stages,
        })
    };
    let candidates: Vec<Schedule> = match which {
        // Column tiles must not straddle a head (the v segments are stored per head).
        ForwardKernel::QkvProjection => [64, 32, 16]
            .into_iter()
            .filter(|block_n| d.is_multiple_of(*block_n))
            .flat_map(gemm)
            .collect(),
        // 64-row tiles on 8 warps first: 8 warps for the element-wise work, and shared memory
        // left for a second CTA per SM; taller tiles where the halo leaves 64 rows too few.
        ForwardKernel::QkPrologue => [64, 128, 32, 16]
            .into_iter()
            .flat_map(|block_m| {
                [8, 4, 2, 1].map(|warps| Schedule {
                    block_m,
                    block_n: d,
                    // 16 input channels per mma of a per-head stage: what the prologue's
                    // occupancy goal (128 registers) was assembled without spills with.
                    block_k: 16,
                    warps,
                    stages: 1,
                })
            })
            .collect(),
        ForwardKernel::Attention => [(64, 4), (32, 2), (16, 1)]
            .into_iter()
            .flat_map(|(block_m, warps)| {
                [2, 1].map(|stages| Schedule {
                    block_m,
                    block_n: 64,
                    block_k: d,
                    warps,
                    stages,
                })
            })
            .collect(),
        ForwardKernel::OutputProjection => gemm(64).to_vec(),
    };
    first_that_builds(candidates, |schedule| build_forward(spec, which, schedule))
        .map(|(schedule, _)| schedule)
        .map_err(|last_error| format!("no default {} schedule fits: {last_error}", which.suffix()))
}

/// The first of `candidates` that `build` accepts, with what it built; else the last error.
fn first_that_builds<T>(
    candidates: impl IntoIterator<Item = Schedule>,
    build: impl Fn(&Schedule) -> Result<T, String>,
) -> Result<(Schedule, T), String> {
    let mut last_error = String::from("no candidate schedule");
    for schedule in candidates {
        match build(&schedule) {
            Ok(built) => return Ok((schedule, built)),
            Err(error) => last_error = error,
        }
    }
    Err(last_error)
}

/// A kernel of `schedule`'s warps with the runtime sizes closing its parameter list, no
/// mbarriers and one CTA per SM asked for: what every tiled builder returns.
fn tiled_kernel(
    name: String,
    mut params: Vec<KernelParam>,
    grid: [SizeExpr; 3],
    schedule: &Schedule,
    tiles: Tiles,
    body: Vec<Stmt>,
) -> KernelFn {
    params.extend(size_params());
    KernelFn {
        name,
        params,
        grid,
        warps: schedule.warps,
        tiles: tiles.decls,
        barriers: Vec::new(),
        schedule: *schedule,
        ctas_per_sm: 1,
        body,
    }
}

/// `kernel` once its verifier passes.
fn verified(kernel: KernelFn, s: &Schedule) -> Result<KernelFn, String> {
    kernel.verify().map_err(|errors| format!("{} with {s:?} does not verify:\n  {}", kernel.name, errors.join("\n  ")))?;
    Ok(kernel)
}

/// The forward kernels of `spec` in launch order, each with its default schedule: what
/// `ccc compile --emit kernel` prints.
pub fn forward_kernels(spec: &AttentionSpec) -> Result<Vec<KernelFn>, String> {
    ForwardKernel::launched_by(spec)
        .into_iter()
        .map(|which| build_forward(spec, which, &default_schedule(spec, which)?))
        .collect()
}

/// Builds one forward kernel of `spec` with `schedule`, verified.
pub fn build_forward(
    spec: &AttentionSpec,
    which: ForwardKernel,
    schedule: &Schedule,
) -> Result<KernelFn, String> {
    spec.validate()?;
    let s = schedule;
    if s.block_m == 0 || s.block_n == 0 || s.block_k == 0 || s.warps == 0 || s.stages == 0 {
        return Err(format!("schedule {s:?} has a zero size"));
    }
    let kernel = match which {
        ForwardKernel::QkvProjection => build_qkv_proj(spec, s, &projection_segments(spec))?,
        ForwardKernel::QkPrologue => {
            if !has_qk_prologue(spec) {
                return Err(format!(
                    "{} has no q/k step after the projection: it launches no qk_prologue",
                    spec.name
                ));
            }
            PrologueBuilder::new(spec, s)?.build()
        }
        ForwardKernel::Attention => build_attention(spec, s)?,
        ForwardKernel::OutputProjection => build_out_proj(spec, s)?,
    };
    verified(kernel, s)
}

/// Splits `warps` into a warps_m × warps_n grid whose per-warp share of a rows × cols
/// accumulator is made of whole 16×8 fragments, preferring warps along rows.
fn warp_grid(rows: u32, cols: u32, warps: u32) -> Result<(u32, u32), String> {
    (1..=warps)
        .rev()
        .filter(|wm| warps.is_multiple_of(*wm))
        .map(|wm| (wm, warps / wm))
        .find(|&(wm, wn)| rows.is_multiple_of(16 * wm) && cols.is_multiple_of(8 * wn))
        .ok_or_else(|| {
            format!("{rows}x{cols} cannot be split over {warps} warps in 16x8 fragments")
        })
}

/// Tiles declared while building, plus view helpers.
struct Tiles {
    decls: Vec<TileDecl>,
}

impl Tiles {
    fn shared(&mut self, name: &str, elem: ElemType, rows: u32, cols: u32) -> TileId {
        // 16 bytes of padding per row keeps ldmatrix rows on distinct banks.
        let pad = 16 / elem.size_bytes() as u32;
        self.add(
            name,
            TileType {
                elem,
                rows,
                cols,
                layout: Layout::RowMajor { pad },
            },
        )
    }
    /// Whether a padded shared tile of `rows × cols` ([`Tiles::shared`]) would fit in shared
    /// memory beside the tiles declared so far.
    fn shared_fits(&self, elem: ElemType, rows: u32, cols: u32) -> bool {
        let mut with = Tiles { decls: self.decls.clone() };
        with.shared("", elem, rows, cols);
        let bytes: usize = with.decls.iter().map(|t| t.ty.shared_bytes().next_multiple_of(SHARED_TILE_ALIGNMENT)).sum();
        bytes <= SHARED_MEMORY_LIMIT_BYTES
    }
    /// A shared tile in the 128-byte-swizzled layout that wgmma reads.
    fn swizzled(&mut self, name: &str, elem: ElemType, rows: u32, cols: u32) -> TileId {
        self.add(
            name,
            TileType {
                elem,
                rows,
                cols,
                layout: Layout::Swizzled128B,
            },
        )
    }
    fn regs(&mut self, name: &str, elem: ElemType, rows: u32, cols: u32, layout: Layout) -> TileId {
        self.add(
            name,
            TileType {
                elem,
                rows,
                cols,
                layout,
            },
        )
    }
    fn add(&mut self, name: &str, ty: TileType) -> TileId {
        self.decls.push(TileDecl {
            name: name.to_string(),
            ty,
        });
        TileId(self.decls.len() - 1)
    }
    fn whole(&self, id: TileId) -> TileView {
        TileView::whole(id, &self.decls[id.0].ty)
    }
    fn view(&self, id: TileId, row0: Expr, col0: Expr, rows: u32, cols: u32) -> TileView {
        TileView {
            tile: id,
            row0,
            col0,
            rows,
            cols,
        }
    }
}

fn int(v: impl TryInto<i64>) -> Expr {
    Expr::Int(v.try_into().unwrap_or(i64::MAX))
}
fn var(name: &str) -> Expr {
    Expr::var(name)
}
fn let_(name: &str, value: Expr) -> Stmt {
    Stmt::Let {
        var: name.to_string(),
        value,
    }
}
fn for_(name: &str, start: Expr, end: Expr, body: Vec<Stmt>) -> Stmt {
    Stmt::For {
        var: name.to_string(),
        start,
        end,
        body,
    }
}
fn span(start: Expr, len: u32) -> GlobalDim {
    GlobalDim::Span {
        start,
        len,
        valid: None,
    }
}
fn size(v: usize) -> SizeExpr {
    SizeExpr::from(v)
}
fn seq() -> Expr {
    Expr::Size(SizeVar::SeqLen)
}
/// `e + k` printed as `e - |k|` for negative k, and as `e` for 0.
fn plus(e: Expr, k: i64) -> Expr {
    match k {
        0 => e,
        k if k < 0 => e - int(-k),
        k => e + int(k),
    }
}

/// `e · k`, folded when e is a constant.
fn times(e: Expr, k: u32) -> Expr {
    match e {
        Expr::Int(v) => int(v * k as i64),
        e => e * int(k),
    }
}

/// A loop over `count` tiles whose cp.async copies run `stages − 1` tiles ahead of the compute,
/// through a ring of `stages` shared buffers (one commit group per tile, so that
/// `cp.async.wait stages-1` means "the tile about to be used has landed").
/// `load(tile, slot)` copies tile `tile` into ring slot `slot`; `compute(tile, slot)` uses it.
fn pipelined_loop(
    var_name: &str,
    count: Expr,
    stages: u32,
    load: &dyn Fn(Expr, Expr) -> Vec<Stmt>,
    compute: &dyn Fn(Expr, Expr) -> Vec<Stmt>,
) -> Vec<Stmt> {
    let step = var(var_name);
    let ahead = stages as i64 - 1;
    let mut out = Vec::new();
    let mut body = Vec::new();
    if ahead == 0 {
        body.extend(load(step.clone(), int(0)));
    } else {
        for tile in 0..ahead {
            match count {
                // A constant trip count decides the prologue's copies here.
                Expr::Int(tiles) if tile < tiles => out.extend(load(int(tile), int(tile))),
                Expr::Int(_) => {}
                _ => out.push(Stmt::If {
                    cond: int(tile).lt(count.clone()),
                    then_body: load(int(tile), int(tile)),
                    else_body: Vec::new(),
                }),
            }
            out.push(Stmt::AsyncCommit);
        }
        let next = plus(step.clone(), ahead);
        body.push(Stmt::If {
            cond: next.clone().lt(count.clone()),
            then_body: load(next.clone(), next.modulo(int(stages))),
            else_body: Vec::new(),
        });
    }
    body.push(Stmt::AsyncCommit);
    body.push(Stmt::AsyncWait {
        pending: ahead as u32,
    });
    body.push(Stmt::Barrier);
    let slot = if ahead == 0 {
        int(0)
    } else {
        step.clone().modulo(int(stages))
    };
    body.extend(compute(step, slot));
    // The next copies overwrite buffers this iteration read.
    body.push(Stmt::Barrier);
    out.push(for_(var_name, int(0), count, body));
    if ahead > 0 {
        // Copies issued ahead for tiles past the end were never issued, but the groups
        // committed for them are still counted: drain them so that nothing is in flight after
        // the loop and the next loop's group count starts from zero.
        out.push(Stmt::AsyncWait { pending: 0 });
        out.push(Stmt::Barrier);
    }
    out
}

fn tensor(name: &str, elem: ElemType, shape: Vec<SizeExpr>, access: Access) -> KernelParam {
    KernelParam::Tensor {
        name: name.to_string(),
        elem,
        shape,
        access,
    }
}

fn weight_params(spec: &AttentionSpec, keep: impl Fn(ParamRole) -> bool) -> Vec<KernelParam> {
    spec.params()
        .into_iter()
        .filter(|p| keep(p.role))
        .map(|p| {
            tensor(
                &p.name,
                spec.dtype.into(),
                p.shape.into_iter().map(size).collect(),
                Access::Read,
            )
        })
        .collect()
}

fn param_name(spec: &AttentionSpec, role: ParamRole) -> Option<String> {
    spec.params()
        .into_iter()
        .find(|p| p.role == role)
        .map(|p| p.name)
}

/// The runtime sizes close every parameter list.
fn size_params() -> [KernelParam; 2] {
    [
        KernelParam::Size(SizeVar::Batch),
        KernelParam::Size(SizeVar::SeqLen),
    ]
}

/// One GEMM tile: acc = a[b, a_row0 .. +rows, :] · W[w_row0 .. +cols, :]ᵀ over the `depth`
/// columns of a in block_k chunks, through a ring of `stages` shared buffers.
struct GemmTile<'a> {
    a_s: TileId,
    w_s: TileId,
    acc: TileId,
    tiles: &'a Tiles,
    /// The [B, S, depth] activation read, at batch `a_batch`.
    a_param: &'a str,
    a_batch: Expr,
    depth: usize,
    rows: u32,
    cols: u32,
    block_k: u32,
    stages: u32,
}

impl GemmTile<'_> {
    fn stmts(&self, weight: &str, w_row0: Expr, a_row0: Expr) -> Vec<Stmt> {
        let t = self.tiles;
        let (m, n, bk) = (self.rows, self.cols, self.block_k);
        let load = |chunk: Expr, slot: Expr| {
            let col = times(chunk, bk);
            vec![
                Stmt::Copy {
                    dst: t.view(self.a_s, times(slot.clone(), m), int(0), m, bk),
                    src: GlobalTile {
                        param: self.a_param.into(),
                        dims: vec![
                            GlobalDim::At(self.a_batch.clone()),
                            span(a_row0.clone(), m),
                            span(col.clone(), bk),
                        ],
                    },
                    is_async: true,
                },
                Stmt::Copy {
                    dst: t.view(self.w_s, times(slot, n), int(0), n, bk),
                    src: GlobalTile {
                        param: weight.into(),
                        dims: vec![span(w_row0.clone(), n), span(col, bk)],
                    },
                    is_async: true,
                },
            ]
        };
        let compute = |_: Expr, slot: Expr| {
            vec![Stmt::Mma {
                acc: t.whole(self.acc),
                a: t.view(self.a_s, times(slot.clone(), m), int(0), m, bk),
                b: t.view(self.w_s, times(slot, n), int(0), n, bk),
                a_transposed: false,
                b_transposed: true,
            }]
        };
        let mut out = vec![Stmt::Fill {
            dst: t.whole(self.acc),
            value: 0.0,
        }];
        let chunks = int(self.depth.div_ceil(bk as usize));
        out.extend(pipelined_loop("kc", chunks, self.stages, &load, &compute));
        out
    }
}

/// The tiles of a GEMM kernel: the streamed a and W rings and the accumulator.
struct GemmTiles {
    tiles: Tiles,
    a_s: TileId,
    w_s: TileId,
    acc: TileId,
}

impl GemmTiles {
    fn new(spec: &AttentionSpec, s: &Schedule, a_name: &str) -> Result<GemmTiles, String> {
        let (bm, bn, bk) = (s.block_m, s.block_n, s.block_k);
        if bk % 16 != 0 {
            return Err(format!("block_k {bk} is not a multiple of 16"));
        }
        let (wm, wn) = warp_grid(bm, bn, s.warps)?;
        let storage: ElemType = spec.dtype.into();
        let mut tiles = Tiles { decls: Vec::new() };
        let a_s = tiles.shared(a_name, storage, s.stages * bm, bk);
        let w_s = tiles.shared("w_s", storage, s.stages * bn, bk);
        let acc = tiles.regs(
            "acc",
            ElemType::F32,
            bm,
            bn,
            Layout::MmaAccumulator {
                warps_m: wm,
                warps_n: wn,
            },
        );
        Ok(GemmTiles {
            tiles,
            a_s,
            w_s,
            acc,
        })
    }

    fn tile<'a>(&'a self, s: &Schedule, a_param: &'a str, depth: usize) -> GemmTile<'a> {
        GemmTile {
            a_s: self.a_s,
            w_s: self.w_s,
            acc: self.acc,
            tiles: &self.tiles,
            a_param,
            a_batch: var("b"),
            depth,
            rows: s.block_m,
            cols: s.block_n,
            block_k: s.block_k,
            stages: s.stages,
        }
    }
}

/// `qkv_proj`: x·Wᵀ + bias over column `segments` (`projection_segments`, or a decode step's);
/// CTA (column tile, row tile, batch), column tiles fastest so that the CTAs running together
/// share x rows.
fn build_qkv_proj(spec: &AttentionSpec, s: &Schedule, segments: &[ProjectionSegment]) -> Result<KernelFn, String> {
    let (bm, bn) = (s.block_m, s.block_n);
    let d = spec.head_dim;
    // Every column tile then lies inside one head, so a per-head store covers it.
    if !d.is_multiple_of(bn as usize) {
        return Err(format!(
            "qkv_proj column tiles of {bn} straddle heads of {d}: block_n must divide head_dim"
        ));
    }
    let gemm = GemmTiles::new(spec, s, "x_s")?;
    let storage: ElemType = spec.dtype.into();
    let tile = gemm.tile(s, "x", spec.model_dim);
    let t = &gemm.tiles;
    // Segment i owns column tiles first_tiles[i] .. first_tiles[i + 1].
    let mut first_tiles = Vec::new();
    let mut column_tiles = 0;
    for segment in segments {
        first_tiles.push(column_tiles);
        column_tiles += segment.width / bn as usize;
    }
    // Built from the last segment outwards: if col_tile < first_tiles[1] { q } else if ...
    let mut chain: Vec<Stmt> = Vec::new();
    for (index, segment) in segments.iter().enumerate().rev() {
        let w_row0 = times(plus(var("col_tile"), -(first_tiles[index] as i64)), bn);
        let mut body = vec![Stmt::Note(format!(
            "{}[.., {}..{}] = x{}·{}ᵀ{}",
            segment.output,
            segment.column0,
            segment.column0 + segment.width,
            if segment.row_shift == 0 {
                String::new()
            } else {
                format!("[t - {}]", segment.row_shift)
            },
            segment.weight,
            segment
                .bias
                .as_ref()
                .map_or(String::new(), |bias| format!(" + {bias}")),
        ))];
        body.extend(tile.stmts(
            &segment.weight,
            w_row0.clone(),
            plus(var("row0"), -(segment.row_shift as i64)),
        ));
        if let Some(bias) = &segment.bias {
            body.push(Stmt::Map {
                dst: t.whole(gemm.acc),
                expr: Expr::Elem + Expr::global(bias, vec![w_row0.clone() + Expr::Col]),
            });
        }
        let channel0 = plus(w_row0, segment.column0 as i64);
        let columns = if segment.output == PROJECTION_BUFFER {
            vec![span(channel0, bn)]
        } else {
            vec![
                GlobalDim::At(channel0.clone().floor_div(int(d))),
                span(channel0.modulo(int(d)), bn),
            ]
        };
        let mut dims = vec![GlobalDim::At(var("b")), span(var("row0"), bm)];
        dims.extend(columns);
        body.push(Stmt::Store {
            src: t.whole(gemm.acc),
            dst: GlobalTile {
                param: segment.output.clone(),
                dims,
            },
        });
        chain = if chain.is_empty() {
            body
        } else {
            vec![Stmt::If {
                cond: var("col_tile").lt(int(first_tiles[index + 1])),
                then_body: body,
                else_body: chain,
            }]
        };
    }
    let mut body = vec![
        Stmt::Note(format!(
            "CTA = rows {bm} x columns {bn} of one projection segment for batch b"
        )),
        let_("col_tile", Expr::BlockIdx(Axis::X)),
        let_("row_tile", Expr::BlockIdx(Axis::Y)),
        let_("b", Expr::BlockIdx(Axis::Z)),
        let_("row0", var("row_tile") * int(bm)),
    ];
    body.extend(chain);

    let bsd = |heads: usize| vec![SizeExpr::batch(), SizeExpr::seq_len(), size(heads), size(d)];
    let mut params = vec![tensor(
        "x",
        storage,
        vec![SizeExpr::batch(), SizeExpr::seq_len(), size(spec.model_dim)],
        Access::Read,
    )];
    params.extend(weight_params(spec, is_projection_param));
    if has_qk_prologue(spec) {
        params.push(tensor(
            PROJECTION_BUFFER,
            storage,
            vec![
                SizeExpr::batch(),
                SizeExpr::seq_len(),
                size(spec.q_width() + spec.kv_width()),
            ],
            Access::Write,
        ));
    } else {
        params.push(tensor("q", storage, bsd(spec.query_heads), Access::Write));
        params.push(tensor("k", storage, bsd(spec.kv_heads), Access::Write));
    }
    params.push(tensor("v", storage, bsd(spec.kv_heads), Access::Write));
    if segments.iter().any(|segment| segment.output == SHIFT_NEXT) {
        params.push(tensor(SHIFT_NEXT, storage, bsd(spec.value_shift), Access::Write));
    }
    let grid = [size(column_tiles), SizeExpr::seq_len().ceil_div(bm as u64), SizeExpr::batch()];
    let name = format!("{}_{}", spec.name, ForwardKernel::QkvProjection.suffix());
    Ok(tiled_kernel(name, params, grid, s, gemm.tiles, body))
}

/// The q, k and v projection weights and biases (what `qkv_proj` reads).
fn is_projection_param(role: ParamRole) -> bool {
    matches!(
        role,
        ParamRole::QueryProj
            | ParamRole::QueryBias
            | ParamRole::KeyProj
            | ParamRole::KeyBias
            | ParamRole::ValueProjCurrent
            | ParamRole::ValueBiasCurrent
            | ParamRole::ValueProjDelayed
            | ParamRole::ValueBiasDelayed
    )
}

/// The convolution weights and biases and the key temperature (what `qk_prologue` reads).
fn is_prologue_param(role: ParamRole) -> bool {
    matches!(
        role,
        ParamRole::ConvWeight { .. } | ParamRole::ConvBias { .. } | ParamRole::KeyTemperature
    )
}

/// Whether a tiled kernel's GEMMs over head_dim-wide shared operands run on wgmma: accumulators
/// of `rows` rows in whole warpgroups of one 16-row band per warp (`warps` along M), head_dim in
/// whole 128-byte panels up to 256, and the streamed tiles (`step_rows`: ring slots, the other
/// GEMM's N) whole 8-row swizzle atoms up to 256 rows. Its operands are then swizzled.
fn wgmma_fits(elem: ElemType, warps: u32, rows: u32, head_dim: u32, step_rows: u32) -> bool {
    layout::wgmma_accumulator_fits(warps, 1, rows, step_rows)
        && layout::wgmma_accumulator_fits(warps, 1, rows, head_dim)
        && head_dim.is_multiple_of(layout::panel_cols(elem))
        && step_rows.is_multiple_of(layout::ATOM_ROWS)
}

/// Whether an accumulator of `rows` × `cols` on `warps_m` × `warps_n` warps is a wgmma's (the
/// verifier's rule): whole warpgroups along M with one 16-row band per warp, N in whole 8-column
/// steps up to 256.

/// The mask alone: whether it lets query `query` see key `key` (None: every key).
fn mask_allows(mask: Mask, query: Expr, key: Expr) -> Option<Expr> {
    match mask {
        Mask::None => None,
        Mask::Causal => Some(key.le(query)),
        Mask::SlidingWindow { window } => Some(key.clone().le(query.clone()).and((query - key).lt(int(window)))),
    }
}

/// FlashAttention-2's online softmax over key tiles, in registers: scores and probabilities of
/// one key tile, the output accumulator and the per-row running max and sum. The forward
/// attention and the decode attention over a paged cache run the same steps.
struct OnlineSoftmax {
    scores: TileId,
    probs: TileId,
    o: TileId,
    m: TileId,
    l: TileId,
    m_new: TileId,
    alpha: TileId,
    tile_max: TileId,
    tile_sum: TileId,
}

impl OnlineSoftmax {
    /// The state of `rows` query rows against key tiles of `keys` on a wm × wn warp grid.
    fn declare(t: &mut Tiles, storage: ElemType, rows: u32, keys: u32, d: u32, wm: u32, wn: u32) -> OnlineSoftmax {
        let acc = Layout::MmaAccumulator { warps_m: wm, warps_n: wn };
        let row_vec = Layout::RowVector { warps_m: wm, warps_n: wn };
        let scores = t.regs("scores", ElemType::F32, rows, keys, acc);
        let probs = t.regs("probs", storage, rows, keys, Layout::MmaOperandA { warps_m: wm, warps_n: wn });
        let o = t.regs("o", ElemType::F32, rows, d, acc);
        let [m, l, m_new, alpha, tile_max, tile_sum] =
            ["m", "l", "m_new", "alpha", "tile_max", "tile_sum"].map(|n| t.regs(n, ElemType::F32, rows, 1, row_vec));
        OnlineSoftmax { scores, probs, o, m, l, m_new, alpha, tile_max, tile_sum }
    }

    /// o = 0, m = −∞, l = 0.
    fn start(&self, t: &Tiles) -> Vec<Stmt> {
        vec![
            Stmt::Fill { dst: t.whole(self.o), value: 0.0 },
            Stmt::Fill { dst: t.whole(self.m), value: f64::NEG_INFINITY },
            Stmt::Fill { dst: t.whole(self.l), value: 0.0 },
        ]
    }

    /// One key tile: S = scale·q·kᵀ (−∞ where `visible` is false, unless `unmasked` says no key
    /// of the tile needs the mask), the running max and sum rescaled, o += P·v.
    #[allow(clippy::too_many_arguments)]
    fn step(&self, t: &Tiles, q: TileView, k: TileView, v: TileView, scale: &Expr, unmasked: Expr, visible: Expr) -> Vec<Stmt> {
        let w = |id: TileId| t.whole(id);
        let at_row = |tile: TileId| Expr::tile(tile, Expr::Row, int(0));
        // exp(x - m) with m = -inf (a row with nothing visible yet) taken as exp(x - 0) = 0.
        let finite_max = Expr::select(at_row(self.m_new).eq(Expr::Float(f64::NEG_INFINITY)), Expr::Float(0.0), at_row(self.m_new));
        vec![
            Stmt::Fill { dst: w(self.scores), value: 0.0 },
            Stmt::Mma { acc: w(self.scores), a: q, b: k, a_transposed: false, b_transposed: true },
            Stmt::If {
                cond: unmasked,
                then_body: vec![Stmt::Map { dst: w(self.scores), expr: Expr::Elem * scale.clone() }],
                else_body: vec![Stmt::Map {
                    dst: w(self.scores),
                    expr: Expr::select(visible, Expr::Elem * scale.clone(), Expr::Float(f64::NEG_INFINITY)),
                }],
            },
            Stmt::RowReduce { dst: self.tile_max, src: w(self.scores), op: ReduceOp::Max, value: Expr::Elem },
            Stmt::Map { dst: w(self.m_new), expr: at_row(self.m).max(at_row(self.tile_max)) },
            Stmt::Map { dst: w(self.alpha), expr: (at_row(self.m) - finite_max.clone()).exp() },
            Stmt::Map { dst: w(self.scores), expr: (Expr::Elem - finite_max).exp() },
            Stmt::RowReduce { dst: self.tile_sum, src: w(self.scores), op: ReduceOp::Sum, value: Expr::Elem },
            Stmt::Map { dst: w(self.l), expr: Expr::Elem * at_row(self.alpha) + at_row(self.tile_sum) },
            Stmt::Map { dst: w(self.o), expr: Expr::Elem * at_row(self.alpha) },
            Stmt::Convert { dst: w(self.probs), src: w(self.scores) },
            Stmt::Mma { acc: w(self.o), a: w(self.probs), b: v, a_transposed: false, b_transposed: false },
            Stmt::Map { dst: w(self.m), expr: at_row(self.m_new) },
        ]
    }

    /// o = o / l.
    fn normalize(&self, t: &Tiles) -> Stmt {
        Stmt::Map { dst: t.whole(self.o), expr: Expr::Elem / Expr::tile(self.l, Expr::Row, int(0)) }
    }

    /// m becomes the log-sum-exp m + ln(l).
    fn log_sum_exp(&self, t: &Tiles) -> Stmt {
        Stmt::Map { dst: t.whole(self.m), expr: Expr::Elem + Expr::tile(self.l, Expr::Row, int(0)).log() }
    }
}

/// Which token rows an attention kernel's q, k, v and o are: the forward's B sequences of S
/// tokens each, or a packed prefill's B sequences, sequence b rows cu_seqlens[b] ..
/// cu_seqlens[b + 1] of one [1, S] batch (the chunk's own keys, at positions counted from its
/// first token: the cached ones before it are the paged kernel's).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenRows {
    Batch,
    Packed,
}

/// A packed batch's offsets: sequence b is rows cu_seqlens[b] .. cu_seqlens[b + 1].
fn cu_seqlens_param() -> KernelParam {
    tensor("cu_seqlens", ElemType::I32, vec![SizeExpr::batch() + SizeExpr::c(1)], Access::Read)
}

/// The lets every CTA of packed sequence b (`b` bound) starts with: its rows `seq_start` ..
/// `seq_end` of the packed batch.
fn packed_rows() -> [Stmt; 2] {
    [
        let_("seq_start", Expr::global("cu_seqlens", vec![var("b")])),
        let_("seq_end", Expr::global("cu_seqlens", vec![var("b") + int(1)])),
    ]
}

impl TokenRows {
    /// The lets a CTA of sequence b (`b` bound) starts with.
    fn sequence_lets(self) -> Vec<Stmt> {
        match self {
            TokenRows::Batch => Vec::new(),
            TokenRows::Packed => packed_rows().to_vec(),
        }
    }

    /// Tokens of sequence b.
    fn len(self) -> Expr {
        match self {
            TokenRows::Batch => seq(),
            TokenRows::Packed => var("seq_end") - var("seq_start"),
        }
    }

    /// The batch index of sequence b's rows.
    fn batch(self) -> Expr {
        match self {
            TokenRows::Batch => var("b"),
            TokenRows::Packed => int(0),
        }
    }

    /// Row `local` of sequence b.
    fn row(self, local: Expr) -> Expr {
        match self {
            TokenRows::Batch => local,
            TokenRows::Packed => var("seq_start") + local,
        }
    }

    /// `count` rows of sequence b from its row `local`: rows past the sequence are neither read
    /// (zeros) nor stored.
    fn rows(self, local: Expr, count: u32) -> GlobalDim {
        match self {
            TokenRows::Batch => span(local, count),
            TokenRows::Packed => GlobalDim::Span { start: self.row(local), len: count, valid: Some((var("seq_start"), var("seq_end"))) },
        }
    }

    /// A tensor's leading [B, S] (or [1, S] packed).
    fn leading(self) -> [SizeExpr; 2] {
        match self {
            TokenRows::Batch => [SizeExpr::batch(), SizeExpr::seq_len()],
            TokenRows::Packed => [SizeExpr::c(1), SizeExpr::seq_len()],
        }
    }

    /// The parameters besides the tensors' (a packed batch's offsets).
    fn offsets_param(self) -> Option<KernelParam> {
        (self == TokenRows::Packed).then(cu_seqlens_param)
    }

    /// A kernel built over [B, S] token rows run over these: a packed batch's S rows are [1, S].
    pub fn sized(self, kernel: KernelFn) -> KernelFn {
        match self {
            TokenRows::Batch => kernel,
            TokenRows::Packed => kernel.with_sizes(&|var| if var == SizeVar::Batch { SizeExpr::c(1) } else { SizeExpr::Var(var) }),
        }
    }

    /// `body` for the CTAs whose query tile starts at `q_row0` inside sequence b (a packed
    /// batch's grid covers S rows for every sequence).
    fn inside(self, body: Vec<Stmt>) -> Vec<Stmt> {
        match self {
            TokenRows::Batch => body,
            TokenRows::Packed => vec![Stmt::If { cond: var("q_row0").lt(self.len()), then_body: body, else_body: Vec::new() }],
        }
    }
}

fn build_attention(spec: &AttentionSpec, s: &Schedule) -> Result<KernelFn, String> {
    build_token_rows_attention(spec, s, TokenRows::Batch)
}

/// Flash attention over `rows` (the forward's, or a packed prefill's chunk).
pub(super) fn build_token_rows_attention(spec: &AttentionSpec, s: &Schedule, rows: TokenRows) -> Result<KernelFn, String> {
    let d = spec.head_dim as u32;
    let (bm, bn) = (s.block_m, s.block_n);
    if s.block_k != d {
        return Err(format!(
            "attention reduces over the whole head: block_k must be head_dim {d}"
        ));
    }
    // One warp row-band per warp: row statistics then stay inside a warp (quad shuffles).
    let (wm, wn) = (s.warps, 1);
    if bm % (16 * wm) != 0 || bn % 16 != 0 {
        return Err(format!(
            "attention tiles {bm}x{bn} do not split into 16-row bands over {wm} warps"
        ));
    }
    let storage: ElemType = spec.dtype.into();
    let mut t = Tiles { decls: Vec::new() };
    // Q, K and V in the swizzled layout make both GEMMs wgmma where its shapes allow.
    let wgmma = wgmma_fits(storage, wm, bm, d, bn);
    let mut operand = |name: &str, rows: u32| {
        if wgmma {
            t.swizzled(name, storage, rows, d)
        } else {
            t.shared(name, storage, rows, d)
        }
    };
    let q_s = operand("q_s", bm);
    let k_s = operand("k_s", s.stages * bn);
    let v_s = operand("v_s", s.stages * bn);
    let softmax = OnlineSoftmax::declare(&mut t, storage, bm, bn, d, wm, wn);
    let q_row = var("q_row0") + Expr::Row;
    let k_col = var("k_col0") + Expr::Col;
    let in_sequence = k_col.clone().lt(rows.len());
    let visible = match mask_allows(spec.mask, q_row, k_col) {
        Some(a) => a.and(in_sequence),
        None => in_sequence,
    };
    let scale = Expr::Float(spec.softmax_scale);
    // The tile needs no mask when every key is in the sequence and visible to every query row.
    let last_key = var("k_col0") + int(bn - 1);
    let mut unmasked = (var("k_col0") + int(bn)).le(rows.len());
    if spec.mask != Mask::None {
        unmasked = unmasked.and(last_key.le(var("q_row0")));
    }
    if let Mask::SlidingWindow { window } = spec.mask {
        unmasked = unmasked.and((var("q_row0") + int(bm - 1) - var("k_col0")).lt(int(window)));
    }
    let kv_tiles = rows.len().ceil_div(int(bn));
    let (kv_start, kv_end) = match spec.mask {
        Mask::None => (int(0), kv_tiles),
        Mask::Causal => (
            int(0),
            kv_tiles.min((var("q_row0") + int(bm)).ceil_div(int(bn))),
        ),
        Mask::SlidingWindow { window } => (
            (var("q_row0") - int(window - 1))
                .max(int(0))
                .floor_div(int(bn)),
            kv_tiles.min((var("q_row0") + int(bm)).ceil_div(int(bn))),
        ),
    };
    let w = |id: TileId| t.whole(id);
    let slot_view = |tile: TileId, slot: Expr| t.view(tile, times(slot, bn), int(0), bn, d);
    let load = |tile: Expr, slot: Expr| {
        let tile = match tile {
            Expr::Int(k) => plus(var("kv_first"), k),
            tile => var("kv_first") + tile,
        };
        let key0 = times(tile, bn);
        ["k", "v"]
            .into_iter()
            .zip([k_s, v_s])
            .map(|(param, dst)| Stmt::Copy {
                dst: slot_view(dst, slot.clone()),
                src: GlobalTile {
                    param: param.into(),
                    dims: vec![
                        GlobalDim::At(rows.batch()),
                        span(rows.row(key0.clone()), bn),
                        GlobalDim::At(var("kv_head")),
                        span(int(0), d),
                    ],
                },
                is_async: true,
            })
            .collect()
    };
    let compute = |step: Expr, slot: Expr| {
        let mut stmts = vec![let_("k_col0", (var("kv_first") + step) * int(bn))];
        stmts.extend(softmax.step(&t, w(q_s), slot_view(k_s, slot.clone()), slot_view(v_s, slot), &scale, unmasked.clone(), visible.clone()));
        stmts
    };
    let kv_loop = pipelined_loop("kv_step", var("kv_count"), s.stages, &load, &compute);
    let g = spec.groups();
    let mut body = vec![
        Stmt::Note(format!(
            "CTA = {bm} query rows of head h, batch b; online softmax over key tiles of {bn}"
        )),
        let_("q_tile", Expr::BlockIdx(Axis::X)),
        let_("h", Expr::BlockIdx(Axis::Y)),
        let_("b", Expr::BlockIdx(Axis::Z)),
    ];
    body.extend(rows.sequence_lets());
    body.extend([
        let_("kv_head", var("h").floor_div(int(g))),
        let_("q_row0", var("q_tile") * int(bm)),
    ]);
    let mut work = vec![
        Stmt::Copy {
            dst: w(q_s),
            src: GlobalTile {
                param: "q".into(),
                dims: vec![
                    GlobalDim::At(rows.batch()),
                    rows.rows(var("q_row0"), bm),
                    GlobalDim::At(var("h")),
                    span(int(0), d),
                ],
            },
            is_async: true,
        },
        Stmt::AsyncCommit,
        Stmt::AsyncWait { pending: 0 },
        Stmt::Barrier,
    ];
    work.extend(softmax.start(&t));
    work.extend([
        Stmt::Note("only key tiles some row of this tile can see".into()),
        let_("kv_first", kv_start),
        let_("kv_count", kv_end - var("kv_first")),
    ]);
    work.extend(kv_loop);
    work.extend([
        softmax.normalize(&t),
        Stmt::Store {
            src: w(softmax.o),
            dst: GlobalTile {
                param: "o".into(),
                dims: vec![
                    GlobalDim::At(rows.batch()),
                    rows.rows(var("q_row0"), bm),
                    GlobalDim::At(var("h")),
                    span(int(0), d),
                ],
            },
        },
        Stmt::Note("lse = m + ln(l), kept for the backward pass".into()),
        softmax.log_sum_exp(&t),
        Stmt::Store {
            src: w(softmax.m),
            dst: GlobalTile {
                param: "lse".into(),
                dims: vec![
                    GlobalDim::At(rows.batch()),
                    GlobalDim::At(var("h")),
                    rows.rows(var("q_row0"), bm),
                ],
            },
        },
    ]);
    body.extend(rows.inside(work));
    let [lead_batch, lead_seq] = rows.leading();
    let bsd = |heads: usize| vec![lead_batch.clone(), lead_seq.clone(), size(heads), size(spec.head_dim)];
    let mut params = vec![
        tensor("q", storage, bsd(spec.query_heads), Access::Read),
        tensor("k", storage, bsd(spec.kv_heads), Access::Read),
        tensor("v", storage, bsd(spec.kv_heads), Access::Read),
        tensor("o", storage, bsd(spec.query_heads), Access::Write),
        tensor(
            "lse",
            ElemType::F32,
            vec![lead_batch.clone(), size(spec.query_heads), lead_seq.clone()],
            Access::Write,
        ),
    ];
    params.extend(rows.offsets_param());
    let grid = [SizeExpr::seq_len().ceil_div(bm as u64), size(spec.query_heads), SizeExpr::batch()];
    let name = format!("{}_{}", spec.name, ForwardKernel::Attention.suffix());
    Ok(tiled_kernel(name, params, grid, s, t, body))
}

fn build_out_proj(spec: &AttentionSpec, s: &Schedule) -> Result<KernelFn, String> {
    let (bm, bn) = (s.block_m, s.block_n);
    let storage: ElemType = spec.dtype.into();
    let (e, lq) = (spec.model_dim, spec.q_width());
    let gemm = GemmTiles::new(spec, s, "o_s")?;
    let t = &gemm.tiles;
    let weight =
        param_name(spec, ParamRole::OutputProj).expect("every spec has an output projection");
    let mut body = vec![
        Stmt::Note(format!("CTA = rows {bm} x columns {bn} of out for batch b")),
        let_("col_tile", Expr::BlockIdx(Axis::X)),
        let_("row_tile", Expr::BlockIdx(Axis::Y)),
        let_("b", Expr::BlockIdx(Axis::Z)),
        let_("row0", var("row_tile") * int(bm)),
        let_("col0", var("col_tile") * int(bn)),
    ];
    body.extend(gemm.tile(s, "o", lq).stmts(&weight, var("col0"), var("row0")));
    if let Some(bias) = param_name(spec, ParamRole::OutputBias) {
        // Clamped so that columns past E (never stored) still read inside the bias.
        let column = (var("col0") + Expr::Col).min(int(e - 1));
        body.push(Stmt::Map {
            dst: t.whole(gemm.acc),
            expr: Expr::Elem + Expr::global(&bias, vec![column]),
        });
    }
    body.push(Stmt::Store {
        src: t.whole(gemm.acc),
        dst: GlobalTile {
            param: "out".into(),
            dims: vec![
                GlobalDim::At(var("b")),
                span(var("row0"), bm),
                span(var("col0"), bn),
            ],
        },
    });
    let mut params = vec![tensor(
        "o",
        storage,
        vec![SizeExpr::batch(), SizeExpr::seq_len(), size(lq)],
        Access::Read,
    )];
    params.extend(weight_params(spec, |r| {
        matches!(r, ParamRole::OutputProj | ParamRole::OutputBias)
    }));
    params.push(tensor(
        "out",
        storage,
        vec![SizeExpr::batch(), SizeExpr::seq_len(), size(e)],
        Access::Write,
    ));
    let grid = [size(e.div_ceil(bn as usize)), SizeExpr::seq_len().ceil_div(bm as u64), SizeExpr::batch()];
    let name = format!("{}_{}", spec.name, ForwardKernel::OutputProjection.suffix());
    Ok(tiled_kernel(name, params, grid, s, gemm.tiles, body))
}
