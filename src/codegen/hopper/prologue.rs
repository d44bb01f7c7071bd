//! The q/k prologue on Hopper: the CCA steps between the projection and attention (causal
//! convolutions, q-k mean, L2 norm with key temperature, RoPE), with the ABI and numerics of the
//! kernel-IR `qk_prologue` (`ir::kernel::build_forward(.., QkPrologue, ..)`) so that it can
//! replace it.
//!
//! Parameters (ABI order): `p0 [B, S, (Hq + Hk)·d]` (q0 of every query head, then k0 of every
//! key head), the convolution weights `[channels, d or 1, K]` and biases and the key temperature
//! in `AttentionSpec::params` order, `q [B, S, Hq, d]`, `k [B, S, Hk, d]`, then `B`, `S`.
//!
//! One CTA of two warpgroups works on one head (query or key) of one batch element, over
//! `tiles_per_cta` consecutive row tiles of `out_rows` tokens. The loop order is chosen so that
//! what is staged is reused:
//! - The per-head convolution weights (`[out, in, tap]`, tap innermost) are staged once per CTA:
//!   each thread loads the K 16-byte chunks that hold 8 input channels × K taps of one output
//!   channel and stores one 16-byte chunk per tap, de-interleaved, into a 128-byte-swizzled
//!   `d × d` tile per tap (K-major wgmma B operands).
//! - Per row tile, the head's rows of `p0` (with the convolutions' T halo rows before them, zero
//!   before token 0 and past the tile) come in with 16-byte cp.async into a swizzled tile.
//! - Depthwise stages and the epilogue work on 16-byte chunks (8 channels of one row per thread,
//!   `d / 8` consecutive lanes per row), reading and writing shared tiles as 16-byte vectors.
//! - A per-head stage is one `m64n(D/2)k16` wgmma chain per tap and warpgroup (each computes
//!   half of the output columns, so that the CTA has 8 warps for the element-wise work with 64
//!   accumulator registers or fewer): A (64 rows, shifted by the tap) comes from the staged rows
//!   through `ldmatrix` into registers (a shift by any row is just another row address, which a
//!   shared-memory descriptor could not take), B is the warpgroup's half of the tap's weight
//!   tile. Bias, rounding to the storage type and the store back to shared memory happen on the
//!   accumulator fragments.
//! - The epilogue adds the q-k mean terms (the other heads' raw projections read straight from
//!   `p0` in global memory: the CTAs of all heads of the same rows run together, so those reads
//!   hit L2), reduces the squared norm across the row's lanes with shuffles, rounds, applies
//!   RoPE (the partner half of a NeoX pair comes from the rounded row written back to shared
//!   memory, interleaved partners are in the thread's own chunk) and stores 16 bytes per thread.
//!
//! Heads are the fastest grid dimension (`(Hq + Hk, row groups, B)`) so that the CTAs running
//! together read the same rows of `p0`.
//!
//! Numerics follow the kernel IR's rounding steps but one: f32 arithmetic (with fused
//! multiply-adds where the kernel IR rounds the product and the sum separately, and the norm's
//! scale folded into one factor: differences of an f32 ulp); every convolution stage's output is
//! rounded to the storage type; with RoPE the normalized head is rounded before the rotation and
//! again at the store; the kernel-IR prologue rounds it before the rotation only when the spec has
//! a convolution (its RoPE staging reuses a convolution buffer), so specs with RoPE and no
//! convolution differ by one rounding (python/validate.py's storage-rounded reference takes
//! either); sin/cos reduce their argument to [−π, π] before the approximations.

use inkwell::attributes::AttributeLoc;
use inkwell::values::{BasicValueEnum, FloatValue, IntValue, PointerValue};

use super::HopperLaunch;
use super::copy::{Bounds, RowSource, aligned_tile_address, copy_tile_async, descriptor};
use crate::ir::kernel::layout::{OperandMajor, SWIZZLE_BYTES, Swizzle128BTile, TILE_ALIGNMENT, WGMMA_K};
use super::primitives::{Accumulate, WgmmaA, WgmmaShape};
use crate::codegen::lower::expr::reduce_angle;
use crate::codegen::primitives::{float_result, intrinsic};
use crate::codegen::{CodegenError, Elem, KernelBuilder, ParamKind, PtxModule, Result, SpecialRegister, unsupported};
use crate::ir::size::SizeExpr;
use crate::spec::{ConvKind, RopeStyle};

/// Two warpgroups: each computes half of the per-head GEMM's columns, and the element-wise
/// work is spread over both.
const WARPGROUPS: u32 = 2;
const WARPGROUP_THREADS: u32 = 128;
const THREADS: u32 = WARPGROUPS * WARPGROUP_THREADS;
/// Rows of one per-head convolution GEMM: the wgmma M.
const GEMM_ROWS: u32 = 64;
/// Shared memory one CTA may use on sm_90 (227 KiB).
const MAX_SHARED_BYTES: u32 = crate::ir::kernel::SHARED_MEMORY_LIMIT_BYTES as u32;
/// Shared memory of one SM (sm_90), which the CTAs resident on it share.
const SM_SHARED_BYTES: u32 = 228 * 1024;
/// Elements of one 16-byte chunk.
const CHUNK_ELEMS: u32 = 8;

/// One convolution stage with its parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrologueConvStage {
    pub kind: ConvKind,
    /// Taps K.
    pub width: u32,
    /// `[channels, 1, K]` (depthwise) or `[channels, d, K]` (per head).
    pub weight: String,
    /// `[channels]`.
    pub bias: String,
}

/// The key scale τ of the L2 norm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PrologueTemperature {
    None,
    /// τ_j = temp[j] (the parameter `[Hk]`).
    Learned(String),
    /// τ_j = exp(clamp(temp[j], 1e-7, 2)).
    LearnedExp(String),
}

/// L2 normalisation: `sqrt(d)·τ·x·rsqrt(‖x‖² + eps)`.
#[derive(Debug, Clone, PartialEq)]
pub struct PrologueNorm {
    pub eps: f64,
    pub temperature: PrologueTemperature,
}

/// RoPE on the first `rotary_dim` channels of every head.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrologueRope {
    pub rotary_dim: u32,
    pub theta: f64,
    pub style: RopeStyle,
}

/// The inputs that shape the Hopper prologue kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct HopperPrologueConfig {
    pub name: String,
    /// Storage type of p0, q, k and the parameters (bf16 or f16).
    pub elem: Elem,
    /// Kernel parameters in ABI order (those of the kernel-IR kernel it replaces).
    pub params: Vec<ParamKind>,
    /// 64 or 128.
    pub head_dim: u32,
    pub q_heads: u32,
    pub kv_heads: u32,
    pub stages: Vec<PrologueConvStage>,
    pub qk_mean: bool,
    pub norm: Option<PrologueNorm>,
    pub rope: Option<PrologueRope>,
    /// Consecutive row tiles one CTA works through (its per-head weights are staged once).
    pub tiles_per_cta: u32,
}

/// Which head a CTA produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadKind {
    Query,
    Key,
}

/// Where each stage reads and writes, and the shared layout.
struct Plan {
    d: u32,
    /// T: history rows before a tile's first output row.
    halo: u32,
    /// Output rows per row tile.
    out_rows: u32,
    /// Every row buffer: `rows × d`, swizzled.
    rows: Swizzle128BTile,
    /// Per stage: its first valid output row (`Σ_{j ≤ i} (K_j − 1)`), input and output buffer,
    /// and for per-head stages the offset of its weight tiles (one `d × d` tile per tap).
    first_valid_rows: Vec<u32>,
    stage_io: Vec<(u32, u32)>,
    weight_offsets: Vec<Option<u32>>,
    weight_tile: Swizzle128BTile,
    /// Offset of row buffer 0 (after all weight tiles).
    buffers_offset: u32,
    total_bytes: u32,
}

impl Plan {
    fn new(config: &HopperPrologueConfig) -> Result<Plan> {
        config.validate()?;
        let d = config.head_dim;
        let halo: u32 = config.stages.iter().map(|s| s.width - 1).sum();
        let mut first_valid_rows = Vec::new();
        let mut first = 0;
        for stage in &config.stages {
            first += stage.width - 1;
            first_valid_rows.push(first);
        }
        // A per-head GEMM computes 64 rows from its first valid one; the rows after it that the
        // later stages still consume as history must fit in them.
        let out_rows = config
            .stages
            .iter()
            .zip(&first_valid_rows)
            .filter(|(stage, _)| stage.kind == ConvKind::PerHead)
            // More history after a per-head stage than its 64 rows leaves none.
            .map(|(_, first)| (GEMM_ROWS + first).saturating_sub(halo))
            .min()
            .unwrap_or(GEMM_ROWS);
        if out_rows < 16 {
            return unsupported(format!("convolution history of {halo} rows leaves too few output rows"));
        }
        let lanes_per_row = d / CHUNK_ELEMS;
        let rows_per_pass = THREADS / lanes_per_row;
        let needed = config
            .stages
            .iter()
            .zip(&first_valid_rows)
            .filter(|(stage, _)| stage.kind == ConvKind::PerHead)
            .map(|(_, first)| first + GEMM_ROWS)
            .fold(halo + out_rows.next_multiple_of(rows_per_pass), u32::max);
        // Whole copy rounds (`copy_tile_async`) of 8-row swizzle atoms.
        let rows = Swizzle128BTile::new(config.elem, needed.next_multiple_of(rows_per_pass.max(8)), d)?;
        // Row buffers; buffer 0 keeps p0 while the q-k mean still needs it; a per-head stage writes over its
        // input (after a barrier), a depthwise stage needs another buffer.
        let mut stage_io = Vec::new();
        let mut current = 0;
        let mut buffers = 1;
        for stage in &config.stages {
            let output = if stage.kind == ConvKind::PerHead && !(current == 0 && config.qk_mean) {
                current
            } else if current == 1 {
                2
            } else {
                1
            };
            buffers = buffers.max(output + 1);
            stage_io.push((current, output));
            current = output;
        }
        let weight_tile = Swizzle128BTile::new(config.elem, d, d)?;
        let mut offset = 0;
        let weight_offsets = config
            .stages
            .iter()
            .map(|stage| {
                (stage.kind == ConvKind::PerHead).then(|| {
                    let at = offset;
                    offset += stage.width * weight_tile.footprint_bytes();
                    at
                })
            })
            .collect();
        let buffers_offset = offset;
        let total_bytes = buffers_offset + buffers * rows.footprint_bytes();
        if total_bytes + TILE_ALIGNMENT > MAX_SHARED_BYTES {
            return unsupported(format!(
                "the prologue's weights and row tiles take {} bytes of shared memory, more than {MAX_SHARED_BYTES}",
                total_bytes + TILE_ALIGNMENT
            ));
        }
        Ok(Plan {
            d,
            halo,
            out_rows,
            rows,
            first_valid_rows,
            stage_io,
            weight_offsets,
            weight_tile,
            buffers_offset,
            total_bytes,
        })
    }

    /// CTAs that fit on one SM by shared memory (228 KiB, 1 KiB of it reserved per CTA), at most 2.
    fn ctas_per_sm(&self) -> u32 {
        let per_cta = self.total_bytes + TILE_ALIGNMENT + 1024;
        (SM_SHARED_BYTES / per_cta).clamp(1, 2)
    }

    fn buffer_offset(&self, buffer: u32) -> u32 {
        self.buffers_offset + buffer * self.rows.footprint_bytes()
    }
}

impl HopperPrologueConfig {
    /// A human-readable description used as part of a cache key.
    pub fn describe(&self) -> String {
        let stages: Vec<String> = self
            .stages
            .iter()
            .map(|s| format!("{:?}({})[{}+{}]", s.kind, s.width, s.weight, s.bias))
            .collect();
        format!(
            "prologue-wgmma {} elem={} params={:?} d={} heads={}/{} stages=[{}] qk_mean={} norm={:?} rope={:?} tiles_per_cta={}",
            self.name,
            self.elem.name(),
            self.params,
            self.head_dim,
            self.q_heads,
            self.kv_heads,
            stages.join(", "),
            self.qk_mean,
            self.norm,
            self.rope,
            self.tiles_per_cta
        )
    }

    /// Output rows of one row tile: 64, less the history that follows the first per-head stage.
    pub fn out_rows(&self) -> Result<u32> {
        Ok(Plan::new(self)?.out_rows)
    }

    /// Threads, shared memory and grid (`(Hq + Hk, ceil(S / (out_rows · tiles_per_cta)), B)`) of
    /// the kernel this config emits, without emitting it; an error for a config it cannot emit.
    /// Output rows one CTA computes (`tiles_per_cta` row tiles).
    pub fn rows_per_cta(&self) -> Result<u32> {
        let plan = Plan::new(self)?;
        match plan.out_rows.checked_mul(self.tiles_per_cta) {
            Some(rows) => Ok(rows),
            None => unsupported(format!("{} row tiles per CTA are too many", self.tiles_per_cta)),
        }
    }

    pub fn launch(&self) -> Result<HopperLaunch> {
        let plan = Plan::new(self)?;
        let Some(rows_per_cta) = plan.out_rows.checked_mul(self.tiles_per_cta) else {
            return unsupported(format!("{} row tiles per CTA are too many", self.tiles_per_cta));
        };
        Ok(HopperLaunch {
            threads: THREADS,
            dynamic_shared_bytes: plan.total_bytes + TILE_ALIGNMENT,
            grid: [
                SizeExpr::c((self.q_heads + self.kv_heads) as u64),
                SizeExpr::seq_len().ceil_div(rows_per_cta as u64),
                SizeExpr::batch(),
            ],
            extra_params: Vec::new(),
        })
    }

    fn validate(&self) -> Result<()> {
        if self.elem == Elem::F32 {
            return unsupported("the prologue's tensors are bf16 or f16");
        }
        if !matches!(self.head_dim, 64 | 128) {
            return unsupported(format!(
                "the Hopper prologue takes head_dim 64 or 128, not {}",
                self.head_dim
            ));
        }
        if self.q_heads == 0 || self.kv_heads == 0 || !self.q_heads.is_multiple_of(self.kv_heads) {
            return unsupported("query heads must be a non-zero multiple of kv heads");
        }
        if self.tiles_per_cta == 0 {
            return unsupported("a CTA needs at least one row tile");
        }
        if let Some(stage) = self.stages.iter().find(|s| !(1..=4).contains(&s.width)) {
            return unsupported(format!("convolution width {} is outside 1..=4", stage.width));
        }
        if let Some(rope) = self.rope
            && (rope.rotary_dim == 0 || !rope.rotary_dim.is_multiple_of(2) || rope.rotary_dim > self.head_dim)
        {
            return unsupported(format!("rotary width {} is not even inside the head", rope.rotary_dim));
        }
        let temperature = self.norm.as_ref().and_then(|norm| match &norm.temperature {
            PrologueTemperature::None => None,
            PrologueTemperature::Learned(name) | PrologueTemperature::LearnedExp(name) => Some(name),
        });
        let tensors = ["p0", "q", "k"]
            .into_iter()
            .chain(self.stages.iter().flat_map(|s| [s.weight.as_str(), s.bias.as_str()]))
            .chain(temperature.map(String::as_str));
        super::require_params(&self.params, "prologue", tensors)
    }
}

/// Values every part of the kernel needs.
#[derive(Clone, Copy)]
struct KernelEnv<'a, 'ctx> {
    config: &'a HopperPrologueConfig,
    plan: &'a Plan,
    seq_len: IntValue<'ctx>,
    batch: IntValue<'ctx>,
    /// This CTA's head among all Hq + Hk (its p0 channels start at head · d).
    head: IntValue<'ctx>,
    thread: IntValue<'ctx>,
    /// The 1024-aligned shared base, as a pointer and as a shared-window address.
    base: PointerValue<'ctx>,
    base_address: IntValue<'ctx>,
    /// The dynamic shared array and its address.
    shared: PointerValue<'ctx>,
    raw_address: IntValue<'ctx>,
}

impl<'a, 'ctx> KernelEnv<'a, 'ctx> {
    /// This context with the thread index and the shared base read afresh, opaque to LLVM:
    /// otherwise every address and wgmma descriptor derived from them is loop-invariant, and
    /// LLVM hoists them all out of the row-tile loop where they stay live until ptxas spills.
    fn fresh(&self, kb: &KernelBuilder<'_, 'ctx>) -> Result<KernelEnv<'a, 'ctx>> {
        let i32_type = kb.context().i32_type().into();
        let call = kb.inline_ptx(
            Some(i32_type),
            "mov.b32 $0, $1;",
            "=r,r",
            &[self.raw_address.into()],
            true,
        )?;
        let raw_address = call
            .try_as_basic_value()
            .basic()
            .ok_or_else(|| CodegenError::Llvm("inline PTX returned nothing".to_string()))?
            .into_int_value();
        let base_address = aligned_tile_address(kb, raw_address)?;
        Ok(KernelEnv {
            thread: kb.thread_index()?,
            base: kb.byte_pointer(self.shared, kb.sub(base_address, self.raw_address)?)?,
            base_address,
            ..*self
        })
    }

    fn channel0(&self, kb: &KernelBuilder<'_, 'ctx>) -> Result<IntValue<'ctx>> {
        kb.mul(self.head, kb.i32(self.plan.d as i64))
    }

    /// The chunk (8 channels) and first row of the calling thread in the row-chunk layout.
    fn chunk_and_row(&self, kb: &KernelBuilder<'_, 'ctx>) -> Result<(IntValue<'ctx>, IntValue<'ctx>)> {
        let lanes = kb.i32((self.plan.d / CHUNK_ELEMS) as i64);
        Ok((kb.rem(self.thread, lanes)?, kb.div(self.thread, lanes)?))
    }

    fn rows_per_pass(&self) -> u32 {
        THREADS / (self.plan.d / CHUNK_ELEMS)
    }

    /// Pointer to chunk `chunk` of row `row` of a swizzled tile at `tile_offset`.
    fn chunk_pointer(
        &self,
        kb: &KernelBuilder<'_, 'ctx>,
        tile: &Swizzle128BTile,
        tile_offset: u32,
        row: IntValue<'ctx>,
        chunk: IntValue<'ctx>,
    ) -> Result<PointerValue<'ctx>> {
        let offset = swizzled_chunk_offset(kb, tile, row, chunk)?;
        kb.byte_pointer(self.base, kb.add(offset, kb.i32(tile_offset as i64))?)
    }

    /// Element offset of (batch, token, channel) in p0.
    fn p0_offset(
        &self,
        kb: &KernelBuilder<'_, 'ctx>,
        token: IntValue<'ctx>,
        channel: IntValue<'ctx>,
    ) -> Result<IntValue<'ctx>> {
        let width = (self.config.q_heads + self.config.kv_heads) * self.plan.d;
        row_major_offset(kb, self.batch, self.seq_len, token, width, channel)
    }
}

/// `((batch · S + token) · width + column)` in i64.
fn row_major_offset<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    batch: IntValue<'ctx>,
    seq_len: IntValue<'ctx>,
    token: IntValue<'ctx>,
    width: u32,
    column: IntValue<'ctx>,
) -> Result<IntValue<'ctx>> {
    let builder = kb.builder();
    let i64_type = kb.context().i64_type();
    let flat_row = builder.build_int_add(
        builder.build_int_mul(kb.to_i64(batch)?, kb.to_i64(seq_len)?, "")?,
        kb.to_i64(token)?,
        "",
    )?;
    Ok(builder.build_int_add(
        builder.build_int_mul(flat_row, i64_type.const_int(width as u64, false), "")?,
        kb.to_i64(column)?,
        "",
    )?)
}

/// Byte offset of 16-byte chunk `chunk` of row `row` in a swizzled tile (runtime form of
/// [`Swizzle128BTile::chunk_offset`]).
fn swizzled_chunk_offset<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    tile: &Swizzle128BTile,
    row: IntValue<'ctx>,
    chunk: IntValue<'ctx>,
) -> Result<IntValue<'ctx>> {
    let chunks_per_line = SWIZZLE_BYTES / 16;
    let in_line = kb.builder().build_xor(
        kb.and(chunk, kb.i32(chunks_per_line as i64 - 1))?,
        kb.and(row, kb.i32(7))?,
        "",
    )?;
    let line = kb.add(kb.mul(row, kb.i32(SWIZZLE_BYTES as i64))?, kb.mul(in_line, kb.i32(16))?)?;
    if tile.panels() == 1 {
        return Ok(line);
    }
    let panel = kb.div(chunk, kb.i32(chunks_per_line as i64))?;
    kb.add(kb.mul(panel, kb.i32(tile.panel_bytes() as i64))?, line)
}

/// The 8 elements of a 16-byte chunk (4 b16x2 words, element 0 in the low half of word 0)
/// widened to f32.
fn widen_chunk<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    elem: Elem,
    words: &[IntValue<'ctx>],
) -> Result<Vec<FloatValue<'ctx>>> {
    let i16_type = kb.context().i16_type();
    let mut values = Vec::with_capacity(2 * words.len());
    if elem == Elem::Bf16 {
        // A bf16 is the high half of the f32 with the same value: one shift or mask each.
        let f32_type = kb.context().f32_type();
        for word in words {
            let low = kb.builder().build_left_shift(*word, kb.i32(16), "")?;
            let high = kb.and(*word, kb.i32(0xffff_0000))?;
            values.push(kb.builder().build_bit_cast(low, f32_type, "")?.into_float_value());
            values.push(kb.builder().build_bit_cast(high, f32_type, "")?.into_float_value());
        }
        return Ok(values);
    }
    for word in words {
        let low = kb.builder().build_int_truncate(*word, i16_type, "")?;
        let high = kb.builder().build_int_truncate(
            kb.builder().build_right_shift(*word, kb.i32(16), false, "")?,
            i16_type,
            "",
        )?;
        values.push(kb.widen_half(elem, low)?);
        values.push(kb.widen_half(elem, high)?);
    }
    Ok(values)
}

/// Rounds 8 f32 to the storage type, packed as 4 b16x2 words.
fn round_chunk<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    elem: Elem,
    values: &[FloatValue<'ctx>],
) -> Result<[IntValue<'ctx>; 4]> {
    let mut words = [kb.i32(0); 4];
    for (index, word) in words.iter_mut().enumerate() {
        *word = kb.pack_half2(elem, values[2 * index], values[2 * index + 1])?;
    }
    Ok(words)
}

/// Element `index` (16 bits) of `words`, in the low half of an i32.
fn half_of<'ctx>(kb: &KernelBuilder<'_, 'ctx>, words: &[IntValue<'ctx>], index: usize) -> Result<IntValue<'ctx>> {
    let word = words[index / 2];
    if index.is_multiple_of(2) {
        kb.and(word, kb.i32(0xffff))
    } else {
        Ok(kb.builder().build_right_shift(word, kb.i32(16), false, "")?)
    }
}

/// Emits the Hopper prologue kernel into `module`.
pub fn emit_prologue_wgmma<'ctx>(module: &PtxModule<'ctx>, config: &HopperPrologueConfig) -> Result<HopperLaunch> {
    let plan = Plan::new(config)?;
    let shared = module.dynamic_shared(&format!("{}_shared", config.name));
    let kb = module.declare_kernel(&config.name, &config.params)?;
    for (key, value) in [
        ("nvvm.maxntid", THREADS.to_string()),
        // As many CTAs per SM as shared memory allows, up to two (ZAYA1's plan: two): ptxas then
        // keeps registers to what they leave (128 per thread for two).
        ("nvvm.minctasm", plan.ctas_per_sm().to_string()),
    ] {
        kb.function().add_attribute(
            AttributeLoc::Function,
            kb.context().create_string_attribute(key, &value),
        );
    }
    let raw_address = kb.shared_address(shared)?;
    let base_address = aligned_tile_address(&kb, raw_address)?;
    let cx = KernelEnv {
        config,
        plan: &plan,
        seq_len: kb.size_param("S")?,
        batch: kb.special_register(SpecialRegister::BlockZ)?,
        head: kb.special_register(SpecialRegister::BlockX)?,
        thread: kb.thread_index()?,
        base: kb.byte_pointer(shared, kb.sub(base_address, raw_address)?)?,
        base_address,
        shared,
        raw_address,
    };
    kb.read_thread_index_per_use();

    for (index, stage) in config.stages.iter().enumerate() {
        if let Some(offset) = plan.weight_offsets[index] {
            stage_per_head_weights(&kb, &cx, stage, offset)?;
        }
    }
    if plan.weight_offsets.iter().any(Option::is_some) {
        // The wgmma read the weight tiles through the async proxy (the barrier after the first
        // tile's copy publishes them).
        kb.fence_proxy_async_shared()?;
    }

    let row_tiles = kb.ceil_div(cx.seq_len, plan.out_rows)?;
    let first_tile = kb.mul(
        kb.special_register(SpecialRegister::BlockY)?,
        kb.i32(config.tiles_per_cta as i64),
    )?;
    let own_tiles = kb.min(kb.i32(config.tiles_per_cta as i64), kb.sub(row_tiles, first_tile)?)?;
    let is_key = kb.le(kb.i32(config.q_heads as i64), cx.head)?;
    kb.for_range_rolled(kb.i32(0), own_tiles, |kb, ordinal| {
        let t0 = kb.mul(kb.add(first_tile, ordinal)?, kb.i32(plan.out_rows as i64))?;
        copy_rows(kb, &cx, t0)?;
        kb.cp_async_commit()?;
        kb.cp_async_wait(0)?;
        kb.barrier()?;
        for (index, stage) in config.stages.iter().enumerate() {
            match stage.kind {
                ConvKind::Depthwise => depthwise_stage(kb, &cx, index)?,
                ConvKind::PerHead => per_head_stage(kb, &cx, index)?,
            }
            kb.barrier()?;
        }
        kb.if_else(
            is_key,
            |kb| epilogue(kb, &cx, t0, HeadKind::Key),
            |kb| epilogue(kb, &cx, t0, HeadKind::Query),
        )?;
        // The next tile's copy overwrites the rows this one read.
        kb.barrier()
    })?;
    kb.finish()?;
    config.launch()
}

/// cp.async of the head's p0 rows `t0 − T ..` into buffer 0: zeros before token 0 (the
/// convolutions' padding) and from `t0 + out_rows` or S on (never read for an output row).
fn copy_rows<'ctx>(kb: &KernelBuilder<'_, 'ctx>, cx: &KernelEnv<'_, 'ctx>, t0: IntValue<'ctx>) -> Result<()> {
    let cx = &cx.fresh(kb)?;
    let plan = cx.plan;
    let width = (cx.config.q_heads + cx.config.kv_heads) * plan.d;
    let source = RowSource {
        base: kb.element_pointer(
            kb.pointer_param("p0")?,
            cx.config.elem,
            cx.p0_offset(kb, kb.i32(0), cx.channel0(kb)?)?,
        )?,
        row_stride: width,
    };
    let bounds = Bounds {
        first_row: (plan.halo > 0).then(|| kb.i32(0)),
        row_limit: kb.min(cx.seq_len, kb.add(t0, kb.i32(plan.out_rows as i64))?)?,
        columns: None,
    };
    let row_start = kb.sub(t0, kb.i32(plan.halo as i64))?;
    copy_tile_async(
        kb,
        &source,
        row_start,
        &bounds,
        &plan.rows,
        cx.base,
        plan.buffer_offset(0),
        cx.thread,
        THREADS,
    )
}

/// Stages a per-head stage's weights `[h·d + out, in, tap]` as one K-major `d × d` tile
/// `[out, in]` per tap: each work item is one output channel and 8 input channels, K 16-byte
/// loads (8 channels × K taps, tap innermost) de-interleaved into one 16-byte store per tap.
/// Loads are issued in batches before their stores so that several are in flight.
fn stage_per_head_weights<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    cx: &KernelEnv<'_, 'ctx>,
    stage: &PrologueConvStage,
    offset: u32,
) -> Result<()> {
    let d = cx.plan.d;
    let taps = stage.width;
    let tile = cx.plan.weight_tile;
    let (chunk, first_out) = cx.chunk_and_row(kb)?;
    let out_step = cx.rows_per_pass();
    let items = d / out_step;
    // 64 registers of loads in flight per batch.
    let batch = (16 / taps).max(1);
    let weight = kb.pointer_param(&stage.weight)?;
    let channel0 = cx.channel0(kb)?;
    for batch_start in (0..items).step_by(batch as usize) {
        let batch_items: Vec<u32> = (batch_start..(batch_start + batch).min(items)).collect();
        let mut loaded = Vec::new();
        for item in &batch_items {
            let out = kb.add(first_out, kb.i32((item * out_step) as i64))?;
            // ((channel0 + out) · d + 8 · chunk) · K elements.
            let element = kb.mul(
                kb.add(
                    kb.mul(kb.add(channel0, out)?, kb.i32(d as i64))?,
                    kb.mul(chunk, kb.i32(CHUNK_ELEMS as i64))?,
                )?,
                kb.i32(taps as i64),
            )?;
            let pointer = kb.element_pointer(weight, cx.config.elem, kb.to_i64(element)?)?;
            let mut words = Vec::new();
            for part in 0..taps {
                words.extend(kb.load_v4(kb.byte_pointer(pointer, kb.i32((16 * part) as i64))?)?);
            }
            loaded.push((out, words));
        }
        for (out, words) in loaded {
            for tap in 0..taps {
                let mut chunk_words = [kb.i32(0); 4];
                for (index, word) in chunk_words.iter_mut().enumerate() {
                    let low = half_of(kb, &words, (2 * index as u32 * taps + tap) as usize)?;
                    let high = half_of(kb, &words, ((2 * index as u32 + 1) * taps + tap) as usize)?;
                    *word = kb.or(low, kb.builder().build_left_shift(high, kb.i32(16), "")?)?;
                }
                let destination = cx.chunk_pointer(kb, &tile, offset + tap * tile.footprint_bytes(), out, chunk)?;
                kb.store_v4(destination, chunk_words)?;
            }
        }
    }
    Ok(())
}

/// One depthwise stage on 16-byte chunks: output row ρ (from the stage's first valid row to the
/// last row an output needs) = bias + Σ_tap w_tap · input row ρ − (K − 1) + tap, rounded.
fn depthwise_stage<'ctx>(kb: &KernelBuilder<'_, 'ctx>, cx: &KernelEnv<'_, 'ctx>, index: usize) -> Result<()> {
    let cx = &cx.fresh(kb)?;
    let plan = cx.plan;
    let stage = &cx.config.stages[index];
    let elem = cx.config.elem;
    let taps = stage.width;
    let (chunk, first_row) = cx.chunk_and_row(kb)?;
    let channel = kb.add(cx.channel0(kb)?, kb.mul(chunk, kb.i32(CHUNK_ELEMS as i64))?)?;
    // Weights [channel, 1, K]: 8 channels × K taps in K chunks; w[e][tap] = element e·K + tap.
    let weight_pointer = kb.element_pointer(
        kb.pointer_param(&stage.weight)?,
        elem,
        kb.to_i64(kb.mul(channel, kb.i32(taps as i64))?)?,
    )?;
    let mut weight_words = Vec::new();
    for part in 0..taps {
        weight_words.extend(kb.load_v4(kb.byte_pointer(weight_pointer, kb.i32((16 * part) as i64))?)?);
    }
    let weights = widen_chunk(kb, elem, &weight_words)?;
    let bias_words = kb.load_v4(kb.element_pointer(kb.pointer_param(&stage.bias)?, elem, kb.to_i64(channel)?)?)?;
    let bias = widen_chunk(kb, elem, &bias_words)?;
    let (input, output) = plan.stage_io[index];
    let first_valid = plan.first_valid_rows[index];
    let end = plan.halo + plan.out_rows;
    let step = cx.rows_per_pass();
    // Rolled over pairs of rows, like the epilogue; rows past `end` are skipped.
    kb.for_range_rolled(kb.i32(0), kb.i32(end.div_ceil(2 * step) as i64), |kb, iteration| {
        for part in 0..2 {
            let row = kb.add(
                first_row,
                kb.mul(
                    kb.add(kb.mul(iteration, kb.i32(2))?, kb.i32(part))?,
                    kb.i32(step as i64),
                )?,
            )?;
            let inside = kb.and(kb.le(kb.i32(first_valid as i64), row)?, kb.lt(row, kb.i32(end as i64))?)?;
            kb.if_then(inside, |kb| {
                let mut sums = bias.clone();
                for tap in 0..taps {
                    let source_row = kb.sub(row, kb.i32((taps - 1 - tap) as i64))?;
                    let words =
                        kb.load_v4(cx.chunk_pointer(kb, &plan.rows, plan.buffer_offset(input), source_row, chunk)?)?;
                    let values = widen_chunk(kb, elem, &words)?;
                    for (e, sum) in sums.iter_mut().enumerate() {
                        *sum = kb.fma(weights[e * taps as usize + tap as usize], values[e], *sum)?;
                    }
                }
                let words = round_chunk(kb, elem, &sums)?;
                kb.store_v4(
                    cx.chunk_pointer(kb, &plan.rows, plan.buffer_offset(output), row, chunk)?,
                    words,
                )
            })?;
        }
        Ok(())
    })
}

/// One per-head stage: for the 64 rows from the stage's first valid one, acc = Σ_tap
/// rows(ρ − (K − 1) + tap) · W_tapᵀ on wgmma (A from `ldmatrix`, one group per tap), then bias,
/// rounding and the store into the output buffer.
fn per_head_stage<'ctx>(kb: &KernelBuilder<'_, 'ctx>, cx: &KernelEnv<'_, 'ctx>, index: usize) -> Result<()> {
    let cx = &cx.fresh(kb)?;
    let plan = cx.plan;
    let config = cx.config;
    let stage = &config.stages[index];
    let elem = config.elem;
    let d = plan.d;
    let taps = stage.width;
    // Warpgroup w computes the output columns w·d/2 .. (w + 1)·d/2: rows w·d/2.. of each
    // weight tile.
    let columns = d / WARPGROUPS;
    let shape = WgmmaShape { n: columns, elem };
    let Some(weights_offset) = plan.weight_offsets[index] else {
        return unsupported(format!("conv stage {index} is per-head but has no weight tiles in the plan"));
    };
    let (input, output) = plan.stage_io[index];
    let first_valid = plan.first_valid_rows[index];
    let lane = kb.and(cx.thread, kb.i32(31))?;
    let warp = kb.and(kb.div(cx.thread, kb.i32(32))?, kb.i32(3))?;
    let warpgroup = kb.div(cx.thread, kb.i32(WARPGROUP_THREADS as i64))?;
    let first_col = kb.mul(warpgroup, kb.i32(columns as i64))?;
    // ldmatrix.x4 of a 16×16 A block: lane L gives row L % 16, columns 8 · (L / 16) ...
    let block_row = kb.add(kb.mul(warp, kb.i32(16))?, kb.and(lane, kb.i32(15))?)?;
    let high_chunk = kb.div(lane, kb.i32(16))?;
    let undefined = kb.context().f32_type().get_undef();
    let mut acc: Vec<FloatValue<'ctx>> = vec![undefined; shape.accumulator_registers() as usize];
    for tap in 0..taps {
        let row = kb.add(block_row, kb.i32((first_valid + tap) as i64 - (taps - 1) as i64))?;
        let mut fragments: Vec<BasicValueEnum<'ctx>> = Vec::new();
        for k_step in 0..d / WGMMA_K {
            let chunk = kb.add(high_chunk, kb.i32((2 * k_step) as i64))?;
            let pointer = cx.chunk_pointer(kb, &plan.rows, plan.buffer_offset(input), row, chunk)?;
            fragments.extend(kb.ldmatrix_x4(pointer, false)?.map(BasicValueEnum::from));
        }
        let mut fenced: Vec<BasicValueEnum<'ctx>> = if tap == 0 {
            Vec::new()
        } else {
            acc.iter().map(|value| (*value).into()).collect()
        };
        fenced.extend(fragments);
        let fenced = kb.wgmma_fence(&fenced)?;
        let (acc_fenced, fragments) = fenced.split_at(if tap == 0 { 0 } else { acc.len() });
        if tap > 0 {
            acc = acc_fenced.iter().map(|value| value.into_float_value()).collect();
        }
        let tile_address = kb.add(
            kb.add(cx.base_address, kb.mul(first_col, kb.i32(SWIZZLE_BYTES as i64))?)?,
            kb.i32((weights_offset + tap * plan.weight_tile.footprint_bytes()) as i64),
        )?;
        for (k_step, a) in fragments.chunks(4).enumerate() {
            let a = [
                a[0].into_int_value(),
                a[1].into_int_value(),
                a[2].into_int_value(),
                a[3].into_int_value(),
            ];
            let b_desc = plan.weight_tile.k_major_descriptor(0, k_step as u32 * WGMMA_K)?;
            let b = descriptor(kb, tile_address, b_desc.constant_bits(), b_desc.start_offset)?;
            let accumulate = if tap == 0 && k_step == 0 {
                Accumulate::Overwrite
            } else {
                Accumulate::Add
            };
            acc = kb.wgmma(shape, WgmmaA::Registers(a), b, OperandMajor::K, accumulate, &acc)?;
        }
        kb.wgmma_commit_group()?;
        // The fragments stay live until the group has read them.
        let mut pending: Vec<BasicValueEnum<'ctx>> = acc.iter().map(|value| (*value).into()).collect();
        pending.extend_from_slice(fragments);
        let waited = kb.wgmma_wait(0, &pending)?;
        acc = waited[..acc.len()]
            .iter()
            .map(|value| value.into_float_value())
            .collect();
    }
    if input == output {
        // Other warps still read this buffer's rows (their taps reach into ours).
        kb.barrier()?;
    }
    // Register i of thread t: row 16·warp + lane / 4 + 8·((i / 2) % 2), column
    // 8·(i / 4) + 2·(lane % 4) + i % 2 (see `KernelBuilder::wgmma`) after the warpgroup's first.
    let bias = kb.pointer_param(&stage.bias)?;
    let pair_col = kb.mul(kb.and(lane, kb.i32(3))?, kb.i32(2))?;
    let fragment_row = kb.add(
        kb.add(kb.mul(warp, kb.i32(16))?, kb.div(lane, kb.i32(4))?)?,
        kb.i32(first_valid as i64),
    )?;
    let channel0 = kb.add(cx.channel0(kb)?, first_col)?;
    let first_chunk = kb.div(first_col, kb.i32(CHUNK_ELEMS as i64))?;
    for group in 0..columns / 8 {
        let col = kb.add(pair_col, kb.i32((8 * group) as i64))?;
        let bias_word = kb.builder().build_load(
            kb.context().i32_type(),
            kb.element_pointer(bias, elem, kb.to_i64(kb.add(channel0, col)?)?)?,
            "",
        )?;
        let bias_pair = widen_chunk(kb, elem, &[bias_word.into_int_value()])?;
        for half in 0..2u32 {
            let first = (4 * group + 2 * half) as usize;
            let word = kb.pack_half2(
                elem,
                kb.fadd(acc[first], bias_pair[0])?,
                kb.fadd(acc[first + 1], bias_pair[1])?,
            )?;
            let row = kb.add(fragment_row, kb.i32((8 * half) as i64))?;
            let chunk_pointer = cx.chunk_pointer(
                kb,
                &plan.rows,
                plan.buffer_offset(output),
                row,
                kb.add(first_chunk, kb.i32(group as i64))?,
            )?;
            let pointer = kb.byte_pointer(chunk_pointer, kb.mul(pair_col, kb.i32(elem.bytes() as i64))?)?;
            kb.store_int(pointer, word)?;
        }
    }
    Ok(())
}

/// The RoPE constants of one thread's chunk: per element, whether it rotates, its frequency
/// (θ^(−2i/r), as the kernel IR computes it), the sign of its partner term and the partner's
/// column.
struct RopeChunk<'ctx> {
    rotates: Vec<IntValue<'ctx>>,
    inverse_frequency: Vec<FloatValue<'ctx>>,
    sign: Vec<FloatValue<'ctx>>,
    partner_col: Vec<IntValue<'ctx>>,
    /// Whether any element of the chunk rotates.
    any: IntValue<'ctx>,
}

fn rope_chunk<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    rope: &PrologueRope,
    chunk: IntValue<'ctx>,
) -> Result<RopeChunk<'ctx>> {
    let r = rope.rotary_dim as i64;
    let half = r / 2;
    let first_col = kb.mul(chunk, kb.i32(CHUNK_ELEMS as i64))?;
    let mut out = RopeChunk {
        rotates: Vec::new(),
        inverse_frequency: Vec::new(),
        sign: Vec::new(),
        partner_col: Vec::new(),
        any: kb.lt(first_col, kb.i32(r))?,
    };
    for e in 0..CHUNK_ELEMS {
        let col = kb.add(first_col, kb.i32(e as i64))?;
        let (frequency_index, partner, negative) = match rope.style {
            RopeStyle::Neox => {
                let low_half = kb.lt(col, kb.i32(half))?;
                (
                    kb.rem(col, kb.i32(half))?,
                    kb.select_int(low_half, kb.add(col, kb.i32(half))?, kb.sub(col, kb.i32(half))?)?,
                    low_half,
                )
            }
            RopeStyle::Interleaved => (
                kb.div(col, kb.i32(2))?,
                kb.builder().build_xor(col, kb.i32(1), "")?,
                kb.builder()
                    .build_int_compare(inkwell::IntPredicate::EQ, kb.and(col, kb.i32(1))?, kb.i32(0), "")?,
            ),
        };
        let exponent = kb.fmul(kb.i32_to_f32(frequency_index)?, kb.f32(-2.0 / r as f64))?;
        out.inverse_frequency
            .push(kb.exp2_approx(kb.fmul(exponent, kb.f32(rope.theta.log2()))?)?);
        out.sign.push(kb.select_f32(negative, kb.f32(-1.0), kb.f32(1.0))?);
        out.rotates.push(kb.lt(col, kb.i32(r))?);
        out.partner_col.push(partner);
    }
    Ok(out)
}

/// `cos` and `sin` of `angle`, reduced to [−π, π] first (as the kernel IR does).
fn cos_sin<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    angle: FloatValue<'ctx>,
) -> Result<(FloatValue<'ctx>, FloatValue<'ctx>)> {
    let reduced = reduce_angle(kb, angle)?;
    let call = |name: &str| -> Result<FloatValue<'ctx>> {
        let function = intrinsic(kb.module(), name, &[])?;
        float_result(kb.builder().build_call(function, &[reduced.into()], "")?)
    };
    Ok((call("llvm.nvvm.cos.approx.ftz.f")?, call("llvm.nvvm.sin.approx.ftz.f")?))
}

/// q-k mean, L2 norm, RoPE and the 16-byte stores of the tile's output rows, one chunk per
/// thread and row; the `d / 8` lanes of a row are consecutive in one warp.
fn epilogue<'ctx>(
    kb: &KernelBuilder<'_, 'ctx>,
    cx: &KernelEnv<'_, 'ctx>,
    t0: IntValue<'ctx>,
    kind: HeadKind,
) -> Result<()> {
    let cx = &cx.fresh(kb)?;
    let plan = cx.plan;
    let config = cx.config;
    let elem = config.elem;
    let d = plan.d;
    let (chunk, first_row) = cx.chunk_and_row(kb)?;
    let chunk_col = kb.mul(chunk, kb.i32(CHUNK_ELEMS as i64))?;
    let result_buffer = plan.stage_io.last().map_or(0, |(_, output)| *output);
    let groups = config.q_heads / config.kv_heads;
    let kv_head = match kind {
        HeadKind::Query => kb.div(cx.head, kb.i32(groups as i64))?,
        HeadKind::Key => kb.sub(cx.head, kb.i32(config.q_heads as i64))?,
    };
    let p0 = kb.pointer_param("p0")?;
    let scale = match &config.norm {
        None => None,
        Some(norm) => {
            let mut scale = kb.f32((d as f64).sqrt());
            if kind == HeadKind::Key {
                let temperature = |name: &str| -> Result<FloatValue<'ctx>> {
                    let pointer = kb.element_pointer(kb.pointer_param(name)?, elem, kb.to_i64(kv_head)?)?;
                    let bits = kb
                        .builder()
                        .build_load(kb.context().i16_type(), pointer, "")?
                        .into_int_value();
                    kb.widen_half(elem, bits)
                };
                match &norm.temperature {
                    PrologueTemperature::None => {}
                    PrologueTemperature::Learned(name) => scale = kb.fmul(scale, temperature(name)?)?,
                    PrologueTemperature::LearnedExp(name) => {
                        let f32_type = kb.context().f32_type().into();
                        let minnum = intrinsic(kb.module(), "llvm.minnum", &[f32_type])?;
                        let clamped = kb.fmax(temperature(name)?, kb.f32(1e-7))?;
                        let clamped = float_result(kb.builder().build_call(
                            minnum,
                            &[clamped.into(), kb.f32(2.0).into()],
                            "",
                        )?)?;
                        let exp = kb.exp2_approx(kb.fmul(clamped, kb.f32(std::f64::consts::LOG2_E))?)?;
                        scale = kb.fmul(scale, exp)?;
                    }
                }
            }
            Some((scale, kb.f32(norm.eps)))
        }
    };
    let rope = config
        .rope
        .map(|rope| rope_chunk(kb, &rope, chunk).map(|constants| (rope, constants)))
        .transpose()?;
    let step = cx.rows_per_pass();
    let last_token = kb.sub(cx.seq_len, kb.i32(1))?;
    // A rolled loop over pairs of rows: fully unrolled, the scheduler hoists the loads of
    // later rows until the registers run out.
    let passes = plan.out_rows.div_ceil(step);
    let unroll = if passes.is_multiple_of(2) { 2 } else { 1 };
    kb.for_range_rolled(kb.i32(0), kb.i32((passes / unroll) as i64), |kb, iteration| {
        for part in 0..unroll {
            let pass = kb.add(kb.mul(iteration, kb.i32(unroll as i64))?, kb.i32(part as i64))?;
            let row = kb.add(first_row, kb.mul(pass, kb.i32(step as i64))?)?;
            let staged_row = kb.add(row, kb.i32(plan.halo as i64))?;
            let token = kb.add(t0, row)?;
            let valid = kb.and(kb.lt(token, cx.seq_len)?, kb.lt(row, kb.i32(plan.out_rows as i64))?)?;
            // Rows past the tile or S still take part in the row reductions (the shuffles need the
            // whole warp); their global reads use the last token and they store nothing.
            let read_token = kb.min(token, last_token)?;
            let staged = |buffer: u32| -> Result<PointerValue<'ctx>> {
                cx.chunk_pointer(kb, &plan.rows, plan.buffer_offset(buffer), staged_row, chunk)
            };
            let global_chunk = |channel0: IntValue<'ctx>| -> Result<Vec<FloatValue<'ctx>>> {
                let offset = cx.p0_offset(kb, read_token, kb.add(channel0, chunk_col)?)?;
                widen_chunk(kb, elem, &kb.load_v4(kb.element_pointer(p0, elem, offset)?)?)
            };
            let mut values = widen_chunk(kb, elem, &kb.load_v4(staged(result_buffer)?)?)?;
            if config.qk_mean {
                let raw = widen_chunk(kb, elem, &kb.load_v4(staged(0)?)?)?;
                let (other, factor) = match kind {
                    // q̂ = y + ½·q0 + ½·k0 of its kv head.
                    HeadKind::Query => {
                        let key_channel = kb.mul(kb.add(kv_head, kb.i32(config.q_heads as i64))?, kb.i32(d as i64))?;
                        (global_chunk(key_channel)?, 0.5)
                    }
                    // k̂ = y + ½·k0 + ½·mean of its group's q0.
                    HeadKind::Key => {
                        let mut sum = vec![kb.f32(0.0); CHUNK_ELEMS as usize];
                        for member in 0..groups {
                            let query = kb.add(kb.mul(kv_head, kb.i32(groups as i64))?, kb.i32(member as i64))?;
                            let q0 = global_chunk(kb.mul(query, kb.i32(d as i64))?)?;
                            for (total, value) in sum.iter_mut().zip(q0) {
                                *total = kb.fadd(*total, value)?;
                            }
                        }
                        (sum, 0.5 / groups as f64)
                    }
                };
                for ((value, raw), other) in values.iter_mut().zip(raw).zip(other) {
                    let with_raw = kb.fma(kb.f32(0.5), raw, *value)?;
                    *value = kb.fma(kb.f32(factor), other, with_raw)?;
                }
            }
            if let Some((scale, eps)) = scale {
                let mut sum = kb.fmul(values[0], values[0])?;
                for value in &values[1..] {
                    sum = kb.fma(*value, *value, sum)?;
                }
                let mut mask = 1;
                while mask < d / CHUNK_ELEMS {
                    sum = kb.fadd(sum, kb.shuffle_xor_f32(sum, mask)?)?;
                    mask *= 2;
                }
                let factor = kb.fmul(scale, kb.rsqrt_approx(kb.fadd(sum, eps)?)?)?;
                for value in values.iter_mut() {
                    *value = kb.fmul(*value, factor)?;
                }
            }
            let words = round_chunk(kb, elem, &values)?;
            let head_in_output = match kind {
                HeadKind::Query => cx.head,
                HeadKind::Key => kv_head,
            };
            let (output, heads) = match kind {
                HeadKind::Query => ("q", config.q_heads),
                HeadKind::Key => ("k", config.kv_heads),
            };
            let destination = kb.element_pointer(
                kb.pointer_param(output)?,
                elem,
                row_major_offset(
                    kb,
                    cx.batch,
                    cx.seq_len,
                    read_token,
                    heads * d,
                    kb.add(kb.mul(head_in_output, kb.i32(d as i64))?, chunk_col)?,
                )?,
            )?;
            let Some((rope, constants)) = &rope else {
                kb.if_then(valid, |kb| kb.store_v4(destination, words))?;
                continue;
            };
            // The rotation reads the rounded values (the kernel IR rounds before RoPE).
            let own = widen_chunk(kb, elem, &words)?;
            let partners: Vec<FloatValue<'ctx>> = match rope.style {
                RopeStyle::Interleaved => (0..CHUNK_ELEMS as usize).map(|e| own[e ^ 1]).collect(),
                RopeStyle::Neox => {
                    // Partners live in other lanes' chunks of the same row: through shared memory,
                    // written over this row's (already read) chunk of the result buffer.
                    let slot = staged(result_buffer)?;
                    kb.store_v4(slot, words)?;
                    kb.warp_sync()?;
                    // The staged chunk that holds column `col` of this row.
                    let chunk_holding = |col: IntValue<'ctx>| -> Result<PointerValue<'ctx>> {
                        let chunk = kb.div(col, kb.i32(CHUNK_ELEMS as i64))?;
                        cx.chunk_pointer(kb, &plan.rows, plan.buffer_offset(result_buffer), staged_row, chunk)
                    };
                    let half = rope.rotary_dim / 2;
                    if half.is_multiple_of(CHUNK_ELEMS) {
                        widen_chunk(kb, elem, &kb.load_v4(chunk_holding(constants.partner_col[0])?)?)?
                    } else {
                        let mut partners = Vec::new();
                        for partner_col in &constants.partner_col {
                            let chunk_pointer = chunk_holding(*partner_col)?;
                            let in_chunk = kb.and(*partner_col, kb.i32(CHUNK_ELEMS as i64 - 1))?;
                            let pointer =
                                kb.byte_pointer(chunk_pointer, kb.mul(in_chunk, kb.i32(elem.bytes() as i64))?)?;
                            let bits = kb
                                .builder()
                                .build_load(kb.context().i16_type(), pointer, "")?
                                .into_int_value();
                            partners.push(kb.widen_half(elem, bits)?);
                        }
                        partners
                    }
                }
            };
            let position = kb.i32_to_f32(token)?;
            kb.if_then(valid, |kb| {
                kb.if_else(
                    constants.any,
                    |kb| {
                        let mut rotated = Vec::with_capacity(CHUNK_ELEMS as usize);
                        for e in 0..CHUNK_ELEMS as usize {
                            let (cos, sin) = cos_sin(kb, kb.fmul(position, constants.inverse_frequency[e])?)?;
                            let turned = kb.fma(kb.fmul(constants.sign[e], partners[e])?, sin, kb.fmul(own[e], cos)?)?;
                            rotated.push(kb.select_f32(constants.rotates[e], turned, own[e])?);
                        }
                        kb.store_v4(destination, round_chunk(kb, elem, &rotated)?)
                    },
                    |kb| kb.store_v4(destination, words),
                )
            })?;
        }
        Ok(())
    })
}
