//! `qk_prologue`: the CCA steps between the projection and attention (causal convolutions over
//! the sequence, q-k mean, L2 norm with key temperature, RoPE) on the packed `p0 = [q0 | k0]`.
//!
//! One CTA produces one head (query or key) of one batch element over `row_tiles` consecutive
//! row tiles; heads are the fastest grid dimension, `(Hq + Hk, row groups, B)`, so that the CTAs
//! running together read the same rows of `p0` and the q-k mean's reads of the other heads hit
//! L2. Per row tile of `block_m` rows (the convolutions' T halo rows first, recomputed and not
//! stored):
//! - the head's rows of `p0` are copied (cp.async, zero before token 0 and past S) below `lead`
//!   zero rows, so that a shifted convolution tap stays inside the staged tile;
//! - a depthwise stage is an element-wise map between two staged tiles; a per-head stage is one
//!   mma per tap with A the staged rows shifted by the tap (any row offset: ldmatrix takes row
//!   addresses) and B the tap's `[out, in]` weights. The weights are staged once per CTA where
//!   shared memory allows (then a CTA takes two row tiles, so that staging them is amortized),
//!   else per tap and 32-channel chunk inside the mma loop;
//! - the q-k mean adds half the raw head and half the mean of the other side (the key head of a
//!   query head; the G query heads of a key head), read straight from `p0`;
//! - the L2 norm reduces each row's squares; RoPE reads each element's partner through shared
//!   memory; the store skips the halo rows and rows past S.
//!
//! Every convolution stage's output is rounded to the storage type, as the reference does. The
//! same builder, run the other way (`build_backward`), is the backward of RoPE and the norm.

use super::*;

/// The buffer the prologue's backward writes: dL/dp0 itself when nothing but RoPE and the norm
/// sits between p0 and q/k, else `dmixed`, the gradient at the q-k mean's output, which the
/// convolution and q-k mean backward take further.
pub fn prologue_backward_output(spec: &AttentionSpec) -> &'static str {
    if spec.qk_conv.is_empty() && !spec.qk_mean { "dp0" } else { "dmixed" }
}

/// The widest convolution's K − 1: the zero rows a staged tile keeps beside its rows so that a
/// shifted tap stays inside it (before them in the forward, after them in the backward).
pub(super) fn widest_tap_reach(spec: &AttentionSpec) -> u32 {
    spec.qk_conv.iter().map(|c| c.width as u32 - 1).max().unwrap_or(0)
}

/// The tiles both prologue directions run on: one head per CTA (block_n = head_dim), `block_m`
/// rows of which the first T are the convolution halo. The halo T and the accumulator's warp grid
/// for `schedule`, or why kernel `kernel` cannot use it.
pub(super) fn head_row_tiles(spec: &AttentionSpec, s: &Schedule, kernel: &str) -> Result<(u32, (u32, u32)), String> {
    let d = spec.head_dim as u32;
    if s.block_n != d {
        return Err(format!("{kernel} works on one head at a time: block_n must be head_dim {d}"));
    }
    let halo = spec.conv_history() as u32;
    if s.block_m <= halo {
        return Err(format!("block_m {} leaves no output rows after the {halo}-row halo", s.block_m));
    }
    Ok((halo, warp_grid(s.block_m, d, s.warps)?))
}

/// The buffer holding convolution stage `stage`'s input for the backward (stage ≥ 1: the output
/// of the stage before), [B, T + S, P] with row T at token 0.
pub fn stage_input_name(stage: usize) -> String {
    format!("conv{stage}_in")
}

/// The backward's tiles beside the forward's.
struct BackwardTiles {
    /// The gradient of the head's rows, from the final q/k back to the norm's input.
    dy: TileId,
    /// ⟨x̂, dy⟩ per row (with the norm).
    dot: Option<TileId>,
    /// dL/dtemp per row (key heads with a temperature).
    dtemp: Option<TileId>,
    output: &'static str,
}

/// Which side of the q-k mean, norm and store a CTA's head is on.
#[derive(Clone, Copy, PartialEq)]
enum HeadKind {
    Query,
    Key,
}

/// Where the per-head convolution weights live.
#[derive(Clone, Copy, PartialEq, Debug)]
enum WeightStaging {
    /// All taps of every per-head stage, staged once per CTA: `[tap · d + out, in]`.
    Resident,
    /// One tap's `chunk` input channels at a time, inside the mma loop.
    Streamed,
}

/// Row tiles per CTA when the per-head weights are staged once per CTA: the staging is shared by
/// twice the rows while the grid keeps several waves at 16k tokens (more tiles per CTA would
/// leave a last wave mostly idle).
const RESIDENT_ROW_TILES: u32 = 2;

/// The prologue's occupancy goal where shared memory allows it.
const PROLOGUE_CTAS_PER_SM: u32 = 2;

pub(super) struct PrologueBuilder<'a> {
    spec: &'a AttentionSpec,
    schedule: Schedule,
    tiles: Tiles,
    /// Tile rows M (incl. the halo), halo T, output rows M − T, zero rows in front of staged
    /// tiles (the widest convolution's K − 1, so shifted taps stay inside the tile).
    m: u32,
    halo: u32,
    out_rows: u32,
    lead: u32,
    d: u32,
    row_tiles: u32,
    staging: WeightStaging,
    /// Input channels per mma of a per-head stage.
    chunk: u32,
    /// Per convolution stage: its weight tile (per-head stages).
    weights: Vec<Option<TileId>>,
    acc: TileId,
    row_sum: Option<TileId>,
    /// The head's raw rows (kept for the q-k mean), then the convolution stages' outputs.
    p0_s: TileId,
    /// Per stage: the tile it writes.
    stage_out: Vec<TileId>,
    /// The backward keeps each stage's input (after the first) for the weight gradients.
    keep_stage_inputs: bool,
    /// Whether each tile reads its head's p0 rows and runs the convolutions: always in the
    /// forward; in the backward only where something (the norm's x̂, a stage input) needs them.
    reads_p0: bool,
    /// The accumulator's warps along rows and columns.
    warp_grid: (u32, u32),
    /// Which tokens the rows are, and what comes before a sequence's first.
    rows: Rows,
    /// Where the forward's RoPE writes the rotated channels ([`Self::with_rope_tile`]); none
    /// without RoPE, or where no tile is free (the rotation then runs on the accumulator).
    rope_s: Option<TileId>,
}

/// The tokens a prologue's rows are.
#[derive(Clone, Copy)]
enum Rows {
    /// The forward's B sequences of S tokens; rows before token 0 are the zero padding.
    Dense,
    /// A decode step: one token per sequence at position seq_lens[b] − 1, its halo rows the
    /// sequence's convolution state, which the step moves on by the token.
    DecodeStep(History),
    /// A packed prefill: sequence b is rows cu_seqlens[b] .. cu_seqlens[b + 1] of one [1, S]
    /// batch, after the seq_lens[b] − n tokens it already holds; rows before its first come
    /// from its convolution state (zeros for a new sequence). The cache kernel after it moves
    /// the state on.
    Packed(History),
}

/// The head's channels of the convolution state, staged through a [d, T] tile (the state is
/// channel-major); none without a convolution.
#[derive(Clone, Copy)]
struct History {
    state_s: Option<TileId>,
}

impl<'a> PrologueBuilder<'a> {
    pub(super) fn new(spec: &'a AttentionSpec, s: &Schedule) -> Result<PrologueBuilder<'a>, String> {
        let d = spec.head_dim as u32;
        if !s.block_k.is_multiple_of(16) {
            return Err(format!("block_k {} is not a multiple of 16", s.block_k));
        }
        let (halo, (wm, wn)) = head_row_tiles(spec, s, "qk_prologue")?;
        let m = s.block_m;
        let storage: ElemType = spec.dtype.into();
        let lead = widest_tap_reach(spec);
        let mut tiles = Tiles { decls: Vec::new() };
        let rows = lead + m;
        let p0_s = tiles.shared("p0_s", storage, rows, d);
        // A per-head stage writes over its input once its mmas have read it, except over the
        // raw rows the q-k mean still needs; a depthwise stage needs another buffer.
        let mut conv: Vec<TileId> = Vec::new();
        let mut stage_out = Vec::new();
        let mut current = p0_s;
        for stage in &spec.qk_conv {
            let in_place = stage.kind == ConvKind::PerHead && !(current == p0_s && spec.qk_mean);
            let out = if in_place {
                current
            } else {
                match conv.iter().find(|t| **t != current) {
                    Some(free) => *free,
                    None => {
                        let t = tiles.shared(&format!("conv{}", conv.len()), storage, rows, d);
                        conv.push(t);
                        t
                    }
                }
            };
            stage_out.push(out);
            current = out;
        }
        let acc_layout = Layout::MmaAccumulator { warps_m: wm, warps_n: wn };
        let acc = tiles.regs("acc", ElemType::F32, m, d, acc_layout);
        let row_sum = (spec.qk_norm == QkNorm::L2)
            .then(|| tiles.regs("sum_sq", ElemType::F32, m, 1, Layout::RowVector { warps_m: wm, warps_n: wn }));
        // The per-head weights: resident where they fit beside the row buffers, else streamed.
        let per_head_taps: u32 =
            spec.qk_conv.iter().filter(|c| c.kind == ConvKind::PerHead).map(|c| c.width as u32).sum();
        let staging = if tiles.shared_fits(storage, per_head_taps * d, d) {
            WeightStaging::Resident
        } else {
            WeightStaging::Streamed
        };
        // Input channels per mma: block_k where it divides head_dim, else 16 (head_dim is a
        // multiple of 16 wherever mma tiles it).
        let chunk = if d.is_multiple_of(s.block_k) { s.block_k } else { 16 };
        let weights = spec
            .qk_conv
            .iter()
            .enumerate()
            .map(|(index, conv)| {
                (conv.kind == ConvKind::PerHead).then(|| match staging {
                    WeightStaging::Resident => {
                        tiles.shared(&format!("w{index}"), storage, conv.width as u32 * d, d)
                    }
                    WeightStaging::Streamed => tiles.shared(&format!("w{index}"), storage, d, chunk),
                })
            })
            .collect();
        let row_tiles = if staging == WeightStaging::Resident && per_head_taps > 0 { RESIDENT_ROW_TILES } else { 1 };
        Ok(PrologueBuilder {
            spec,
            schedule: *s,
            tiles,
            m,
            halo,
            out_rows: m - halo,
            lead,
            d,
            row_tiles,
            staging,
            chunk,
            weights,
            acc,
            row_sum,
            p0_s,
            stage_out,
            keep_stage_inputs: false,
            reads_p0: true,
            warp_grid: (wm, wn),
            rows: Rows::Dense,
            rope_s: None,
        })
    }

    /// The rotated channels' columns: the rotary width rounded up to whole 16-byte chunks, so
    /// that the rotation's map and the stores move whole chunks.
    fn rotated_columns(&self) -> Option<u32> {
        let rope = self.spec.rope?;
        let chunk = 16 / ElemType::from(self.spec.dtype).size_bytes() as u32;
        Some((rope.rotary_dim as u32).next_multiple_of(chunk).min(self.d))
    }

    /// A tile for the forward's RoPE to write the rotated channels into: the last convolution
    /// stage's output where that is not p0_s (free once the q-k mean has read it), else a tile
    /// of its own where it fits beside the others.
    fn with_rope_tile(mut self) -> Self {
        let Some(columns) = self.rotated_columns() else { return self };
        let last_out = self.stage_out.last().copied().filter(|tile| *tile != self.p0_s);
        self.rope_s = match last_out {
            Some(tile) => Some(tile),
            None => {
                let storage: ElemType = self.spec.dtype.into();
                let rows = self.lead + self.m;
                self.tiles.shared_fits(storage, rows, columns).then(|| self.tiles.shared("rope_s", storage, rows, columns))
            }
        };
        self
    }

    fn name(&self, role: ParamRole) -> String {
        param_name(self.spec, role).expect("roles asked for exist in spec.params()")
    }

    pub(super) fn build(self) -> KernelFn {
        let spec = self.spec;
        let d = spec.head_dim;
        let storage: ElemType = spec.dtype.into();
        let bsd = |heads: usize| vec![SizeExpr::batch(), SizeExpr::seq_len(), size(heads), size(d)];
        let mut params = vec![tensor(
            PROJECTION_BUFFER,
            storage,
            vec![SizeExpr::batch(), SizeExpr::seq_len(), size(spec.q_width() + spec.kv_width())],
            Access::Read,
        )];
        params.extend(weight_params(spec, is_prologue_param));
        params.push(tensor("q", storage, bsd(spec.query_heads), Access::Write));
        params.push(tensor("k", storage, bsd(spec.kv_heads), Access::Write));
        self.with_rope_tile().kernel_over_rows(
            format!("{}_{}", spec.name, ForwardKernel::QkPrologue.suffix()),
            params,
            "the CCA steps of each row",
            &|builder, kind, y| builder.epilogue(kind, y),
        )
    }

    /// The prologue of a decode step ([`DecodeKernel::Prologue`]): [`Self::build`]'s steps for
    /// the one new token of each sequence (S = 1), after the T raw rows of its convolution
    /// state [B, P, T] instead of zeros, with RoPE at the token's position seq_lens[b] − 1; the
    /// state moves on by the token (not for an empty slot, seq_lens[b] = 0).
    pub(super) fn build_decode(self) -> KernelFn {
        let name = format!("{}_{}", self.spec.name, DecodeKernel::Prologue.suffix());
        self.build_serving(name, Rows::DecodeStep, SizeExpr::batch(), Access::ReadWrite, Vec::new(), "the CCA steps of each sequence's new token")
            .with_sizes(&|var| if var == SizeVar::SeqLen { SizeExpr::c(1) } else { SizeExpr::Var(var) })
    }

    /// The prologue of a packed prefill ([`DecodeKernel::PrefillPrologue`]): [`Self::build`]'s
    /// steps over the sequences of p0 [1, S, P] that `cu_seqlens` [B + 1] delimits, each after the
    /// seq_lens[b] − n tokens it holds (its convolution state before its first row, RoPE from
    /// that position on). The grid covers S rows per sequence; tiles past a sequence's end exit.
    pub(super) fn build_packed(self) -> KernelFn {
        let name = format!("{}_{}", self.spec.name, DecodeKernel::PrefillPrologue.suffix());
        self.build_serving(name, Rows::Packed, SizeExpr::c(1), Access::Read, vec![cu_seqlens_param()], "the CCA steps of each packed sequence's new tokens")
    }

    /// A serving prologue: the convolution state staged through a [d, T] tile (read, or moved on
    /// with `state_access` ReadWrite), rows of batch `batch` ([B, S] or a packed [1, S]), and
    /// `offsets` before the sequences' lengths.
    fn build_serving(mut self, name: String, rows: fn(History) -> Rows, batch: SizeExpr, state_access: Access, offsets: Vec<KernelParam>, what: &str) -> KernelFn {
        let spec = self.spec;
        let d = spec.head_dim;
        let storage: ElemType = spec.dtype.into();
        let state_s = (self.halo > 0).then(|| self.tiles.add("state_s", TileType { elem: storage, rows: self.d, cols: self.halo, layout: Layout::RowMajor { pad: 0 } }));
        self.rows = rows(History { state_s });
        let token_rows = |heads: usize| vec![batch.clone(), SizeExpr::seq_len(), size(heads), size(d)];
        let mut params = vec![tensor(PROJECTION_BUFFER, storage, vec![batch.clone(), SizeExpr::seq_len(), size(spec.packed_width())], Access::Read)];
        if state_s.is_some() {
            params.push(tensor(CONV_STATE, storage, vec![SizeExpr::batch(), size(spec.packed_width()), size(self.halo as usize)], state_access));
        }
        params.extend(weight_params(spec, is_prologue_param));
        params.extend(offsets);
        params.push(tensor("seq_lens", ElemType::I32, vec![SizeExpr::batch()], Access::Read));
        params.push(tensor("q", storage, token_rows(spec.query_heads), Access::Write));
        params.push(tensor("k", storage, token_rows(spec.kv_heads), Access::Write));
        self.with_rope_tile().kernel_over_rows(name, params, what, &|builder, kind, y| builder.epilogue(kind, y))
    }

    /// A packed sequence's first tile: its halo rows before the sequence's first token from the
    /// head's channels of the convolution state (state column T + the token's offset from the
    /// first), where the sequence continues from cached tokens; a new one keeps the zeros the
    /// read left there.
    fn packed_history(&self, state_s: TileId) -> Vec<Stmt> {
        let (d, halo) = (self.d, self.halo);
        let state_box = GlobalTile {
            param: CONV_STATE.into(),
            dims: vec![GlobalDim::At(var("b")), span(var("channel0"), d), span(int(0), halo)],
        };
        let before_first = (var("top") + Expr::Row).lt(var("seq_start"));
        let column = (int(halo) + var("top") + Expr::Row - var("seq_start")).max(int(0));
        let continued = vec![
            Stmt::Note(format!("rows before the sequence's first token: its convolution state (last {halo} raw rows, channel-major)")),
            Stmt::Copy { dst: self.tiles.whole(state_s), src: state_box, is_async: false },
            Stmt::Barrier,
            Stmt::Map {
                dst: self.tiles.view(self.p0_s, int(self.lead), int(0), halo, d),
                expr: Expr::select(before_first, Expr::tile(state_s, Expr::Col, column), Expr::Elem),
            },
            Stmt::Barrier,
        ];
        vec![Stmt::If { cond: var("top").lt(var("seq_start")).and(int(0).lt(var("cached"))), then_body: continued, else_body: Vec::new() }]
    }

    /// A decode step's halo rows (rows 0..T of the one tile: tokens −T..−1) from the head's
    /// channels of the convolution state, and the state moved on by the token: its last T − 1
    /// rows and the token's raw row (staged row T).
    fn decode_history(&self, state_s: TileId) -> Vec<Stmt> {
        let (d, halo) = (self.d, self.halo);
        let state_box = || GlobalTile {
            param: CONV_STATE.into(),
            dims: vec![GlobalDim::At(var("b")), span(var("channel0"), d), span(int(0), halo)],
        };
        let state = self.tiles.whole(state_s);
        vec![
            Stmt::Note(format!("the sequence's convolution state: its last {halo} raw rows, channel-major")),
            Stmt::Copy { dst: state.clone(), src: state_box(), is_async: false },
            Stmt::Barrier,
            Stmt::Map { dst: self.tiles.view(self.p0_s, int(self.lead), int(0), halo, d), expr: Expr::tile(state_s, Expr::Col, Expr::Row) },
            Stmt::Barrier,
            Stmt::Map { dst: state.clone(), expr: Expr::tile(self.p0_s, plus(Expr::Col, self.lead as i64 + 1), Expr::Row) },
            Stmt::Barrier,
            Stmt::If {
                cond: int(0).lt(Expr::global("seq_lens", vec![var("b")])),
                then_body: vec![Stmt::Store { src: state, dst: state_box() }],
                else_body: Vec::new(),
            },
        ]
    }

    /// The kernel both directions share: per head and row tile, the head's rows staged and
    /// convolved, then `epilogue` (given the tile holding the convolution output); `params`
    /// without the runtime sizes.
    fn kernel_over_rows(
        self,
        name: String,
        params: Vec<KernelParam>,
        what: &str,
        epilogue: &dyn Fn(&Self, HeadKind, TileId) -> Vec<Stmt>,
    ) -> KernelFn {
        let spec = self.spec;
        let rows_per_cta = self.out_rows * self.row_tiles;
        let mut body = vec![
            Stmt::Note(format!(
                "CTA = head `head` (query heads first), rows of batch b in {} tile(s) of {} output rows{}: {what}",
                self.row_tiles,
                self.out_rows,
                if self.halo > 0 { format!(" (+{} halo rows re-read)", self.halo) } else { String::new() }
            )),
            let_("head", Expr::BlockIdx(Axis::X)),
            let_("b", Expr::BlockIdx(Axis::Z)),
            let_("channel0", var("head") * int(self.d)),
        ];
        // The rows this CTA's tiles may cover: a packed sequence's own, else the batch's S.
        let rows = match self.rows {
            Rows::Packed(_) => {
                body.extend(packed_rows());
                body.extend([
                    Stmt::Note("the tokens sequence b held before this chunk".into()),
                    let_("cached", Expr::global("seq_lens", vec![var("b")]) - (var("seq_end") - var("seq_start"))),
                    let_("first_row", var("seq_start") + Expr::BlockIdx(Axis::Y) * int(rows_per_cta)),
                ]);
                var("seq_end") - var("seq_start")
            }
            _ => {
                body.push(let_("first_row", Expr::BlockIdx(Axis::Y) * int(rows_per_cta)));
                seq()
            }
        };
        // The lead rows above each staged tile are the convolution taps before its first row.
        if self.lead > 0 {
            let mut zeroed = vec![self.p0_s];
            for out in &self.stage_out {
                if !zeroed.contains(out) {
                    zeroed.push(*out);
                }
            }
            body.extend(zeroed.into_iter().map(|t| Stmt::Fill {
                dst: self.tiles.view(t, int(0), int(0), self.lead, self.d),
                value: 0.0,
            }));
        }
        if self.staging == WeightStaging::Resident {
            body.extend(self.stage_resident_weights());
        }
        body.push(Stmt::Barrier);

        let mut tile_body = vec![let_("t0", var("first_row") + var("tile") * int(self.out_rows))];
        if self.halo > 0 {
            tile_body.push(let_("top", var("t0") - int(self.halo)));
        }
        let y = if self.reads_p0 {
            tile_body.extend(self.read_head());
            match self.rows {
                Rows::DecodeStep(History { state_s: Some(state_s) }) => tile_body.extend(self.decode_history(state_s)),
                Rows::Packed(History { state_s: Some(state_s) }) => tile_body.extend(self.packed_history(state_s)),
                _ => {}
            }
            self.conv_stages(&mut tile_body)
        } else {
            self.p0_s
        };
        tile_body.push(Stmt::If {
            cond: var("head").lt(int(spec.query_heads)),
            then_body: epilogue(&self, HeadKind::Query, y),
            else_body: epilogue(&self, HeadKind::Key, y),
        });
        // The next tile's copy overwrites the staged tiles this one read.
        tile_body.push(Stmt::Barrier);
        let own_tiles = int(self.row_tiles).min(rows.ceil_div(int(self.out_rows)) - Expr::BlockIdx(Axis::Y) * int(self.row_tiles));
        body.push(for_("tile", int(0), own_tiles, tile_body));

        let grid = [
            size(spec.query_heads + spec.kv_heads),
            SizeExpr::seq_len().ceil_div(rows_per_cta as u64),
            SizeExpr::batch(),
        ];
        let mut kernel = tiled_kernel(name, params, grid, &self.schedule, self.tiles, body);
        // Two CTAs per SM where shared memory allows: the steps of one CTA wait on each other
        // (copy, convolutions, epilogue), the other's fill the gaps.
        kernel.ctas_per_sm = (1..=PROLOGUE_CTAS_PER_SM).rev().find(|ctas| kernel.fits_ctas_per_sm(*ctas)).unwrap_or(1);
        kernel
    }

    /// The backward of the prologue's per-row steps (RoPE, then the L2 norm and key temperature)
    /// on the same grid: each head's rows are recomputed up to the norm's input x̂ (convolutions
    /// and q-k mean, halo included), and `dq`/`dk` (the gradients of the final q and k) go back
    /// through the transposed rotation and the norm, `dx̂ = (s/n)·(dy − x̂·⟨x̂, dy⟩/n²)`, into
    /// [`prologue_backward_output`] [B, S, P]; key heads also write dL/dtemp of each row to
    /// `dtemp_rows` [B, S, Hk] (f32), summed over tokens by a later kernel.
    pub(super) fn build_backward(mut self) -> KernelFn {
        self.keep_stage_inputs = true;
        let spec = self.spec;
        // RoPE alone needs only the gradients: no p0, so the forward need not keep it.
        self.reads_p0 = !spec.qk_conv.is_empty() || spec.qk_mean || self.row_sum.is_some();
        let d = spec.head_dim;
        let storage: ElemType = spec.dtype.into();
        let (wm, wn) = self.warp_grid;
        let dy = self.tiles.regs("dy", ElemType::F32, self.m, self.d, Layout::MmaAccumulator { warps_m: wm, warps_n: wn });
        let row_vector = Layout::RowVector { warps_m: wm, warps_n: wn };
        let dot = self.row_sum.map(|_| self.tiles.regs("dot", ElemType::F32, self.m, 1, row_vector));
        let dtemp = (self.row_sum.is_some() && spec.key_temperature != KeyTemperature::None)
            .then(|| self.tiles.regs("dtemp", ElemType::F32, self.m, 1, row_vector));
        let output = prologue_backward_output(spec);
        let bsd = |heads: usize| vec![SizeExpr::batch(), SizeExpr::seq_len(), size(heads), size(d)];
        let packed = vec![SizeExpr::batch(), SizeExpr::seq_len(), size(spec.q_width() + spec.kv_width())];
        let mut params = Vec::new();
        if self.reads_p0 {
            params.push(tensor(PROJECTION_BUFFER, storage, packed.clone(), Access::Read));
        }
        params.extend(weight_params(spec, is_prologue_param));
        params.push(tensor("dq", storage, bsd(spec.query_heads), Access::Read));
        params.push(tensor("dk", storage, bsd(spec.kv_heads), Access::Read));
        params.push(tensor(output, storage, packed, Access::Write));
        let padded = vec![SizeExpr::batch(), SizeExpr::seq_len() + size(self.halo as usize), size(spec.packed_width())];
        for stage in 1..spec.qk_conv.len() {
            params.push(tensor(&stage_input_name(stage), storage, padded.clone(), Access::Write));
        }
        if dtemp.is_some() {
            params.push(tensor(
                "dtemp_rows",
                ElemType::F32,
                vec![SizeExpr::batch(), SizeExpr::seq_len(), size(spec.kv_heads)],
                Access::Write,
            ));
        }
        let grads = BackwardTiles { dy, dot, dtemp, output };
        self.kernel_over_rows(
            format!("{}_qk_prologue_bwd", spec.name),
            params,
            "gradients of the final q/k back through RoPE and the norm",
            &|builder, kind, y| builder.backward_epilogue(kind, y, &grads),
        )
    }

    /// The backward's steps for one query or key head: x̂ recomputed into acc, dy = the
    /// transposed rotation of the head's gradient rows (staged in p0_s once the q-k mean has read
    /// the raw rows), then through the norm, stored like the forward's q and k.
    fn backward_epilogue(&self, kind: HeadKind, y: TileId, grads: &BackwardTiles) -> Vec<Stmt> {
        let spec = self.spec;
        let mut out = if self.reads_p0 { self.mixed(kind, y) } else { vec![self.kv_head(kind)] };
        let acc = self.tiles.whole(self.acc);
        let dy = self.tiles.whole(grads.dy);
        let (param, head) = match kind {
            HeadKind::Query => ("dq", var("head")),
            HeadKind::Key => ("dk", var("kv")),
        };
        out.extend([
            // Other threads may still be reading the staged raw rows for the q-k mean.
            Stmt::Barrier,
            Stmt::Copy {
                dst: self.lead_rows(self.p0_s),
                src: GlobalTile {
                    param: param.into(),
                    dims: vec![GlobalDim::At(var("b")), span(self.top(), self.m), GlobalDim::At(head), span(int(0), self.d)],
                },
                is_async: true,
            },
            Stmt::AsyncCommit,
            Stmt::AsyncWait { pending: 0 },
            Stmt::Barrier,
            Stmt::Map { dst: dy.clone(), expr: self.rotated(self.p0_s, true).unwrap_or_else(|| self.lead_read(self.p0_s)) },
        ]);
        if let (Some(sum_sq), Some(dot)) = (self.row_sum, grads.dot) {
            let at_row = |tile: TileId| Expr::tile(tile, Expr::Row, int(0));
            let inverse_norm = (at_row(sum_sq) + Expr::Float(spec.norm_eps)).rsqrt();
            out.extend([
                Stmt::RowReduce { dst: sum_sq, src: acc.clone(), op: ReduceOp::Sum, value: Expr::Elem * Expr::Elem },
                Stmt::RowReduce {
                    dst: dot,
                    src: acc.clone(),
                    op: ReduceOp::Sum,
                    value: Expr::Elem * Expr::tile(grads.dy, Expr::Row, Expr::Col),
                },
            ]);
            if let (HeadKind::Key, Some(dtemp)) = (kind, grads.dtemp) {
                // dL/dτ = ⟨dy, √d·x̂/n⟩; learned_exp: τ = exp(clamp(temp)), which passes the
                // gradient only inside the clamp.
                let temp = || Expr::global(&self.name(ParamRole::KeyTemperature), vec![var("kv")]);
                let dtau_dtemp = match spec.key_temperature {
                    KeyTemperature::LearnedExp => Expr::select(
                        Expr::Float(1e-7).le(temp()).and(temp().le(Expr::Float(2.0))),
                        temp().exp(),
                        Expr::Float(0.0),
                    ),
                    _ => Expr::Float(1.0),
                };
                let sqrt_d = Expr::Float((spec.head_dim as f64).sqrt());
                out.extend([
                    Stmt::Map { dst: self.tiles.whole(dtemp), expr: sqrt_d * at_row(dot) * inverse_norm.clone() * dtau_dtemp },
                    Stmt::Store {
                        src: self.tiles.whole(dtemp),
                        dst: GlobalTile { param: "dtemp_rows".into(), dims: vec![GlobalDim::At(var("b")), self.stored_rows(), GlobalDim::At(var("kv"))] },
                    },
                ]);
            }
            let x_hat = Expr::tile(self.acc, Expr::Row, Expr::Col);
            out.push(Stmt::Map {
                dst: dy.clone(),
                expr: self.norm_scale(kind)
                    * inverse_norm.clone()
                    * (Expr::Elem - x_hat * at_row(dot) * inverse_norm.clone() * inverse_norm),
            });
        }
        out.extend([
            Stmt::Barrier,
            Stmt::Convert { dst: self.lead_rows(self.p0_s), src: dy },
            Stmt::Barrier,
            Stmt::Store {
                src: self.lead_rows(self.p0_s),
                dst: GlobalTile {
                    param: grads.output.into(),
                    dims: vec![GlobalDim::At(var("b")), self.stored_rows(), span(var("channel0"), self.d)],
                },
            },
        ]);
        out
    }

    /// The tile's rows in a global tensor, the halo rows excluded.
    fn stored_rows(&self) -> GlobalDim {
        let end = var("t0") + int(self.out_rows);
        match self.rows {
            Rows::Packed(_) => GlobalDim::Span { start: self.top(), len: self.m, valid: Some((var("t0"), end.min(var("seq_end")))) },
            _ if self.halo == 0 => span(self.top(), self.m),
            _ => GlobalDim::Span { start: self.top(), len: self.m, valid: Some((var("t0"), end)) },
        }
    }

    /// The batch index of the rows' tensors (p0, q, k): a packed prefill's sequences are all
    /// rows of batch 0.
    fn row_batch(&self) -> Expr {
        match self.rows {
            Rows::Packed(_) => int(0),
            _ => var("b"),
        }
    }

    /// Position (token index) of tile row 0.
    fn top(&self) -> Expr {
        if self.halo == 0 { var("t0") } else { var("top") }
    }

    /// The position in its sequence of tile row 0: its token index, after the seq_lens[b] − S
    /// tokens a decode step's sequence already has.
    fn first_position(&self) -> Expr {
        match self.rows {
            Rows::DecodeStep(_) => Expr::global("seq_lens", vec![var("b")]) - seq() + self.top(),
            Rows::Packed(_) => var("cached") + self.top() - var("seq_start"),
            Rows::Dense => self.top(),
        }
    }

    /// Every tap of every per-head stage, `[channel0 + out, in, tap]` → rows `tap · d + out`.
    /// The tap is the innermost (strided) index: the lowering reads each row's interleaved taps
    /// in whole 16-byte chunks and keeps this copy's tap (`copy_tap_chunks`).
    fn stage_resident_weights(&self) -> Vec<Stmt> {
        let mut out = Vec::new();
        for (index, stage) in self.spec.qk_conv.iter().enumerate() {
            let Some(w) = self.weights[index] else { continue };
            let weight = self.name(ParamRole::ConvWeight { stage: index });
            out.push(Stmt::Note(format!("per-head weights of conv stage {index}, staged once per CTA")));
            for tap in 0..stage.width as u32 {
                out.push(Stmt::Copy {
                    dst: self.tiles.view(w, int(tap * self.d), int(0), self.d, self.d),
                    src: GlobalTile {
                        param: weight.clone(),
                        dims: vec![span(var("channel0"), self.d), span(int(0), self.d), GlobalDim::At(int(tap))],
                    },
                    is_async: false,
                });
            }
        }
        out
    }

    /// The head's rows top .. top + M of p0 into rows lead.. of p0_s; rows before token 0 (the
    /// convolution's padding) and from S on read as zero.
    fn read_head(&self) -> Vec<Stmt> {
        vec![
            Stmt::Copy {
                dst: self.lead_rows(self.p0_s),
                src: GlobalTile {
                    param: PROJECTION_BUFFER.into(),
                    dims: vec![GlobalDim::At(self.row_batch()), self.read_rows(), span(var("channel0"), self.d)],
                },
                is_async: true,
            },
            Stmt::AsyncCommit,
            Stmt::AsyncWait { pending: 0 },
            Stmt::Barrier,
        ]
    }

    /// The tile's rows of p0: rows outside the tensor, or outside a packed sequence, read zero.
    fn read_rows(&self) -> GlobalDim {
        match self.rows {
            Rows::Packed(_) => GlobalDim::Span { start: self.top(), len: self.m, valid: Some((var("seq_start"), var("seq_end"))) },
            _ => span(self.top(), self.m),
        }
    }

    fn lead_rows(&self, tile: TileId) -> TileView {
        self.tiles.view(tile, int(self.lead), int(0), self.m, self.d)
    }

    /// Reads the staged tile at the mapped element's row (shifted by the lead rows).
    fn lead_read(&self, tile: TileId) -> Expr {
        Expr::tile(tile, plus(Expr::Row, self.lead as i64), Expr::Col)
    }

    /// The convolution stages over the staged head; returns the tile holding the result.
    fn conv_stages(&self, out: &mut Vec<Stmt>) -> TileId {
        let mut src = self.p0_s;
        for (index, stage) in self.spec.qk_conv.iter().enumerate() {
            let dst = self.stage_out[index];
            let k = stage.width as i64;
            let weight = self.name(ParamRole::ConvWeight { stage: index });
            let bias_name = self.name(ParamRole::ConvBias { stage: index });
            let bias = Expr::global(&bias_name, vec![var("channel0") + Expr::Col]);
            let kind = match stage.kind {
                ConvKind::Depthwise => "depthwise",
                ConvKind::PerHead => "per_head",
            };
            out.push(Stmt::Note(format!("conv stage {index}: {kind}, width {k}, tap 0 = oldest row")));
            // Row r of the output reads input rows r - (K-1) .. r.
            let first_tap_row = self.lead as i64 - (k - 1);
            match stage.kind {
                ConvKind::Depthwise => {
                    let mut expr = bias;
                    for tap in 0..k {
                        let w = Expr::global(&weight, vec![var("channel0") + Expr::Col, int(0), int(tap)]);
                        expr = expr + w * Expr::tile(src, plus(Expr::Row, first_tap_row + tap), Expr::Col);
                    }
                    out.push(Stmt::Map { dst: self.lead_rows(dst), expr });
                }
                ConvKind::PerHead => {
                    let w = self.weights[index].expect("a per-head stage has a weight tile");
                    let acc = self.tiles.whole(self.acc);
                    let shifted = |col: Expr, cols: u32| {
                        self.tiles.view(src, plus(var("tap"), first_tap_row), col, self.m, cols)
                    };
                    // Per tap, chunk input channels per mma; streamed weights are copied per
                    // chunk first (and read by every warp before the next copy).
                    let chunk = self.chunk;
                    let col = var("kc") * int(chunk);
                    let (b, copy) = match self.staging {
                        WeightStaging::Resident => (self.tiles.view(w, var("tap") * int(self.d), col.clone(), self.d, chunk), None),
                        WeightStaging::Streamed => (
                            self.tiles.whole(w),
                            Some(Stmt::Copy {
                                dst: self.tiles.whole(w),
                                src: GlobalTile {
                                    param: weight.clone(),
                                    dims: vec![span(var("channel0"), self.d), span(col.clone(), chunk), GlobalDim::At(var("tap"))],
                                },
                                is_async: false,
                            }),
                        ),
                    };
                    let mma = Stmt::Mma { acc: acc.clone(), a: shifted(col, chunk), b, a_transposed: false, b_transposed: true };
                    let chunk_body = match copy {
                        Some(copy) => vec![copy, Stmt::Barrier, mma, Stmt::Barrier],
                        None => vec![mma],
                    };
                    let tap_body = vec![for_("kc", int(0), int(self.d / chunk), chunk_body)];
                    out.push(Stmt::Fill { dst: acc.clone(), value: 0.0 });
                    out.push(for_("tap", int(0), int(k), tap_body));
                    out.push(Stmt::Map { dst: acc.clone(), expr: Expr::Elem + bias });
                    if dst == src {
                        // Every warp's mmas have read the rows written over next.
                        out.push(Stmt::Barrier);
                    }
                    out.push(Stmt::Convert { dst: self.lead_rows(dst), src: acc });
                }
            }
            out.push(Stmt::Barrier);
            if self.keep_stage_inputs && index + 1 < self.spec.qk_conv.len() {
                out.push(self.store_stage_input(index + 1, dst));
            }
            src = dst;
        }
        src
    }

    /// The backward's copy of stage `stage`'s input (the previous stage's output, in `tile`) into
    /// [`stage_input_name`]: this tile's output rows, and for the first tile also the T rows
    /// before token 0, where the input comes from the zero padding and is not 0. (Rows before the
    /// first token the stage reads meet only zero gradients in the weight gradients' sums; they
    /// are written so that those sums read finite values.)
    fn store_stage_input(&self, stage: usize, tile: TileId) -> Stmt {
        let history = self.halo as i64;
        let first = Expr::select(var("t0").eq(int(0)), int(0), var("t0") + int(history));
        Stmt::Store {
            src: self.lead_rows(tile),
            dst: GlobalTile {
                param: stage_input_name(stage),
                dims: vec![
                    GlobalDim::At(var("b")),
                    GlobalDim::Span {
                        start: self.top() + int(history),
                        len: self.m,
                        valid: Some((first, var("t0") + int(history + self.out_rows as i64))),
                    },
                    span(var("channel0"), self.d),
                ],
            },
        }
    }

    /// Element `col` of head `head` at the mapped row's token in p0 (clamped into the sequence:
    /// halo rows before token 0 and rows past S are computed but never stored).
    fn raw(&self, head: Expr) -> Expr {
        let token = (self.top() + Expr::Row).max(int(0)).min(seq() - int(1));
        Expr::global(PROJECTION_BUFFER, vec![self.row_batch(), token, head * int(self.d) + Expr::Col])
    }

    /// q-k mean, norm, RoPE and store of a query or key head.
    fn epilogue(&self, kind: HeadKind, y: TileId) -> Vec<Stmt> {
        let mut out = self.mixed(kind, y);
        out.extend(self.normalize(kind));
        let (param, head) = match kind {
            HeadKind::Query => ("q", var("head")),
            HeadKind::Key => ("k", var("kv")),
        };
        match (self.rotated(self.p0_s, false), self.rope_s, self.rotated_columns()) {
            (Some(rotated), Some(rope_s), Some(columns)) => out.extend(self.rope_and_store(rotated, rope_s, columns, param, head)),
            (rotated, _, _) => {
                out.extend(rotated.map(|rotated| self.rope_in_registers(rotated)).into_iter().flatten());
                out.extend(self.store_rows(param, head));
            }
        }
        out
    }

    /// `kv`: the head's kv head, or its index among the key heads.
    fn kv_head(&self, kind: HeadKind) -> Stmt {
        match kind {
            HeadKind::Query => let_("kv", var("head").floor_div(int(self.spec.groups() as i64))),
            HeadKind::Key => let_("kv", var("head") - int(self.spec.query_heads as i64)),
        }
    }

    /// `kv` ([`Self::kv_head`]) and acc = the head before the norm: the convolution output `y`
    /// plus the q-k mean's terms.
    fn mixed(&self, kind: HeadKind, y: TileId) -> Vec<Stmt> {
        let spec = self.spec;
        let g = spec.groups() as i64;
        let hq = spec.query_heads as i64;
        let mut out = vec![self.kv_head(kind)];
        // acc = convolution output (+ the q-k mean terms). A key head adds its G query heads one
        // per iteration: all G reads of an element in one map would be in flight together, and
        // their registers beside the accumulator's spill.
        let mut expr = self.lead_read(y);
        let mut group_sum = None;
        if spec.qk_mean {
            let half = |e: Expr| Expr::Float(0.5) * e;
            expr = expr + half(self.lead_read(self.p0_s));
            match kind {
                HeadKind::Query => expr = expr + half(self.raw(int(hq) + var("kv"))),
                HeadKind::Key => {
                    group_sum = Some(for_(
                        "s",
                        int(0),
                        int(g),
                        vec![Stmt::Map {
                            dst: self.tiles.whole(self.acc),
                            expr: Expr::Elem + Expr::Float(0.5 / g as f64) * self.raw(var("kv") * int(g) + var("s")),
                        }],
                    ))
                }
            }
        }
        out.push(Stmt::Map { dst: self.tiles.whole(self.acc), expr });
        out.extend(group_sum);
        out
    }

    /// The norm's factor besides 1/‖x‖: √d, times τ of the key head `kv` for keys.
    fn norm_scale(&self, kind: HeadKind) -> Expr {
        let spec = self.spec;
        let mut scale = Expr::Float((spec.head_dim as f64).sqrt());
        if kind == HeadKind::Key {
            let temp = || Expr::global(&self.name(ParamRole::KeyTemperature), vec![var("kv")]);
            match spec.key_temperature {
                KeyTemperature::None => {}
                KeyTemperature::Learned => scale = scale * temp(),
                KeyTemperature::LearnedExp => {
                    scale = scale * temp().max(Expr::Float(1e-7)).min(Expr::Float(2.0)).exp()
                }
            }
        }
        scale
    }

    fn normalize(&self, kind: HeadKind) -> Vec<Stmt> {
        let Some(sum_sq) = self.row_sum else {
            return Vec::new();
        };
        let spec = self.spec;
        let acc = self.tiles.whole(self.acc);
        let scale = self.norm_scale(kind);
        let norm = (Expr::tile(sum_sq, Expr::Row, int(0)) + Expr::Float(spec.norm_eps)).rsqrt();
        vec![
            Stmt::RowReduce { dst: sum_sq, src: acc.clone(), op: ReduceOp::Sum, value: Expr::Elem * Expr::Elem },
            Stmt::Map { dst: acc, expr: Expr::Elem * scale * norm },
        ]
    }

    /// RoPE at the absolute position of each row on the accumulator (where no tile is free for
    /// [`Self::rope_and_store`]), through shared memory because each element needs its rotation
    /// partner: the normalized head, rounded to the storage type, is staged in p0_s (by then the
    /// q-k mean has read the raw rows), and every channel takes the select.
    fn rope_in_registers(&self, rotated: Expr) -> Vec<Stmt> {
        let mut out = self.stage_head().to_vec();
        out.push(Stmt::Map { dst: self.tiles.whole(self.acc), expr: rotated });
        out
    }

    /// RoPE only where it rotates, then the store: the normalized head, rounded, is staged in
    /// p0_s; the rotated channels (the first `columns`, whole 16-byte chunks; the few past the
    /// rotary width pass through) are mapped from it into `rope_s`; the head is stored from
    /// both. The same two roundings as [`Self::rope_in_registers`] and [`Self::store_rows`].
    fn rope_and_store(&self, rotated: Expr, rope_s: TileId, columns: u32, param: &str, head: Expr) -> Vec<Stmt> {
        // The staging's first barrier also keeps the map off rope_s while it may still be the
        // convolution output other threads read.
        let mut out = self.stage_head().to_vec();
        out.extend([
            Stmt::Map { dst: self.tiles.view(rope_s, int(self.lead), int(0), self.m, columns), expr: rotated },
            Stmt::Barrier,
            self.store_columns(rope_s, 0, columns, param, head.clone()),
        ]);
        if columns < self.d {
            out.push(self.store_columns(self.p0_s, columns, self.d - columns, param, head));
        }
        out
    }

    /// Each element of the head staged in `staged` (from row `lead`) after RoPE at its row's
    /// position: turned by p·θ^(−2i/r), or by its negative when `inverse` (the rotation's
    /// transpose); channels from r on pass through. None without RoPE.
    fn rotated(&self, staged: TileId, inverse: bool) -> Option<Expr> {
        let rope = self.spec.rope?;
        let (rope_s, first_row) = (staged, self.lead);
        let r = rope.rotary_dim as i64;
        let half = r / 2;
        let col = || Expr::Col;
        let (freq_index, partner, sign) = match rope.style {
            RopeStyle::Neox => (
                col().modulo(int(half)),
                Expr::select(col().lt(int(half)), col() + int(half), col() - int(half)),
                Expr::select(col().lt(int(half)), Expr::Float(-1.0), Expr::Float(1.0)),
            ),
            RopeStyle::Interleaved => (
                col().floor_div(int(2)),
                col() + int(1) - int(2) * col().modulo(int(2)),
                Expr::select(col().modulo(int(2)).eq(int(0)), Expr::Float(-1.0), Expr::Float(1.0)),
            ),
        };
        let inv_freq = Expr::Float(rope.theta).pow(freq_index.to_float() * Expr::Float(-2.0 / r as f64));
        let angle = (self.first_position() + Expr::Row).to_float() * inv_freq;
        let staged_row = || plus(Expr::Row, first_row as i64);
        let own = Expr::tile(rope_s, staged_row(), Expr::Col);
        // The transpose turns the other way: sin(−a) = −sin(a).
        let sign = if inverse { Expr::Float(-1.0) * sign } else { sign };
        let rotated = own.clone() * angle.clone().cos() + sign * Expr::tile(rope_s, staged_row(), partner) * angle.sin();
        Some(Expr::select(col().lt(int(r)), rotated, own))
    }

    /// The rounded head through p0_s (free again once every thread is past its last read), so
    /// that the store writes whole rows in 16-byte chunks.
    fn store_rows(&self, param: &str, head: Expr) -> Vec<Stmt> {
        let mut out = self.stage_head().to_vec();
        out.push(self.store_columns(self.p0_s, 0, self.d, param, head));
        out
    }

    /// The accumulator rounded into p0_s's rows once every thread is past its reads there (the
    /// q-k mean's raw rows), and visible to all of them after.
    fn stage_head(&self) -> [Stmt; 3] {
        [Stmt::Barrier, Stmt::Convert { dst: self.lead_rows(self.p0_s), src: self.tiles.whole(self.acc) }, Stmt::Barrier]
    }

    /// Columns `col0 .. col0 + cols` of the head staged in `tile` stored to head `head` of `param`
    /// (q or k), the tile's output rows only.
    fn store_columns(&self, tile: TileId, col0: u32, cols: u32, param: &str, head: Expr) -> Stmt {
        Stmt::Store {
            src: self.tiles.view(tile, int(self.lead), int(col0), self.m, cols),
            dst: GlobalTile {
                param: param.into(),
                dims: vec![GlobalDim::At(self.row_batch()), self.stored_rows(), GlobalDim::At(head), span(int(col0), cols)],
            },
        }
    }
}
