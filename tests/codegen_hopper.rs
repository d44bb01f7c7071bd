//! The Hopper wgmma path: swizzle offsets and descriptors as numbers, the primitives as PTX that
//! ptxas accepts, and the kernel-IR wgmma attention and projection GEMM kernels assembled for sm_90a
//! without spills and without ptxas having to serialize or re-fence the wgmma (its C75xx notes),
//! their SASS with HGMMA and no local memory. `CCC_HOPPER_PTX_OUT=DIR` also writes each
//! benchmarked kernel's PTX and a JSON description for bench/hopper_attention.py and
//! bench/hopper_gemm.py (the GPU checks and benchmarks). The q/k prologue kernel for every
//! example and a set of variants: assembled without spills at its occupancy goal.
#![cfg(feature = "llvm")]

use std::collections::HashSet;
use std::process::Command;

mod common;

use ccc::codegen::hopper::primitives::Accumulate;
use ccc::codegen::hopper::{
    GemmSchedule, MatrixDescriptor, OperandMajor, ProblemShape, Swizzle128BTile, TileConfig, WgmmaA, WgmmaShape,
    attention_candidates, gemm_candidates,
};
use ccc::ir::kernel::{
    ForwardKernel, KernelFn, KernelParam, WgmmaAttentionSchedule, WgmmaGemmSchedule, build_forward, build_wgmma_attention,
    build_wgmma_projection, default_schedule, gemm_operands, wgmma_attention_footprint, TokenRows,
};
use ccc::codegen::{Elem, ParamKind, PtxModule, ptxas};
use ccc::ir::kernel::has_qk_prologue;
use ccc::ir::size::SizeExpr;
use ccc::spec::{AttentionSpec, ConvKind, ConvStage, DType, KeyTemperature, Mask, QkNorm, Rope, RopeStyle};
use inkwell::context::Context;

fn count(ptx: &str, needle: &str) -> usize {
    ptx.matches(needle).count()
}

/// Runs ptxas -v itself (the shared helper drops the log) and returns the log; fails on errors.
fn ptxas_log(ptx: &str, name: &str) -> String {
    let ptxas = ptxas::find_ptxas().unwrap_or_else(|error| panic!("{error}"));
    let dir = std::env::temp_dir().join(format!("ccc-hopper-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let input = dir.join("kernel.ptx");
    std::fs::write(&input, ptx).expect("write ptx");
    let run = Command::new(ptxas)
        .args(["-arch=sm_90a", "-v"])
        .arg(&input)
        .arg("-o")
        .arg(dir.join("kernel.cubin"))
        .output()
        .expect("run ptxas");
    let _ = std::fs::remove_dir_all(&dir);
    let log = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    assert!(run.status.success(), "ptxas failed:\n{log}");
    log
}

#[test]
fn codegen_hopper_swizzle_places_every_chunk_once_and_xors_rows() {
    let tile = Swizzle128BTile::new(Elem::Bf16, 64, 128).expect("tile");
    assert_eq!((tile.panel_cols(), tile.panels(), tile.panel_bytes(), tile.footprint_bytes()), (64, 2, 8192, 16384));
    let mut seen = HashSet::new();
    for row in 0..64 {
        for chunk in 0..16 {
            let offset = tile.chunk_offset(row, chunk);
            assert!(offset < tile.footprint_bytes() && offset.is_multiple_of(16));
            assert!(seen.insert(offset), "chunk ({row}, {chunk}) collides");
        }
    }
    // Row 3, columns 8..15 (chunk 1) sit at chunk position 1 ^ 3 = 2 of line 3 of panel 0;
    // column 64 + 17 is chunk 2 of panel 1, element 1 in it, at position 2 ^ 5 = 7 of line 5.
    assert_eq!(tile.element_offset(3, 8), 3 * 128 + 2 * 16);
    assert_eq!(tile.element_offset(5, 64 + 17), 8192 + 5 * 128 + 7 * 16 + 2);
    assert!(Swizzle128BTile::new(Elem::Bf16, 12, 64).is_err(), "rows must fill 8-row atoms");
    assert!(Swizzle128BTile::new(Elem::F16, 64, 96).is_err(), "columns must fill 128-byte lines");
    assert!(Swizzle128BTile::new(Elem::F32, 64, 64).is_err());
}

#[test]
fn codegen_hopper_descriptors_encode_the_ptx_bit_fields() {
    let tile = Swizzle128BTile::new(Elem::Bf16, 128, 128).expect("tile");
    // K-major, k16 step 5: panel 1, 32 bytes into the line; leading offset unused (1), stride 1024.
    let k_major = tile.descriptor(OperandMajor::K, 64, 80).expect("descriptor");
    assert_eq!(
        k_major,
        MatrixDescriptor { start_offset: 16384 + 64 * 128 + 32, leading_byte_offset: 16, stride_byte_offset: 1024 }
    );
    let bits = k_major.encode(0x400);
    assert_eq!(bits & 0x3fff, ((0x400 + 16384 + 8192 + 32) >> 4) as u64);
    assert_eq!((bits >> 16) & 0x3fff, 1);
    assert_eq!((bits >> 32) & 0x3fff, 64);
    assert_eq!(bits >> 62, 1, "128-byte swizzle");
    assert_eq!(k_major.constant_bits() + ((0x400 + k_major.start_offset) >> 4) as u64, bits);
    // MN-major (V in P·V): 16 key rows from row 32, N across panels 16 KiB apart.
    let mn_major = tile.descriptor(OperandMajor::MN, 32, 0).expect("descriptor");
    assert_eq!(
        mn_major,
        MatrixDescriptor { start_offset: 32 * 128, leading_byte_offset: 16384, stride_byte_offset: 1024 }
    );
    assert_eq!((mn_major.encode(0) >> 16) & 0x3fff, 1024);
    assert!(tile.descriptor(OperandMajor::K, 4, 0).is_err(), "rows start on an atom");
    assert!(tile.descriptor(OperandMajor::K, 0, 120).is_err(), "k16 step past the columns");
    assert!(tile.descriptor(OperandMajor::MN, 8, 0).is_err(), "k16 steps start on multiples of 16");
    assert!(tile.descriptor(OperandMajor::MN, 0, 32).is_err(), "N starts on a panel");
}

#[test]
fn codegen_hopper_primitives_lower_to_the_intended_ptx_and_assemble() {
    let context = Context::create();
    let module = PtxModule::new(&context, "hopper_primitives").expect("module");
    let shared = module.static_shared("hopper_staging", 3 * 8192);
    let kb = module.declare_kernel("hopper_primitives", &[ParamKind::GlobalPointer("out".into())]).expect("kernel");
    let emit = || -> ccc::codegen::Result<()> {
        let barrier = kb.byte_pointer(shared, kb.i32(0))?;
        kb.if_then(kb.lt(kb.thread_index()?, kb.i32(1))?, |kb| kb.mbarrier_init(barrier, 128))?;
        kb.fence_proxy_async_shared()?;
        kb.barrier()?;
        kb.mbarrier_arrive_expect_tx(barrier, kb.i32(0))?;
        kb.mbarrier_wait_parity(barrier, kb.i32(0))?;
        kb.mbarrier_arrive(barrier)?;
        kb.set_max_registers(true, 240)?;
        // A TMA copy of box (32, 7) of the tensor whose map is in global memory at `out`.
        let map = kb.builder().build_address_space_cast(
            kb.pointer_param("out")?,
            kb.context().ptr_type(Default::default()),
            "",
        )?;
        let map = kb.builder().build_ptr_to_int(map, kb.context().i64_type(), "")?;
        kb.cp_async_bulk_tensor(kb.byte_pointer(shared, kb.i32(1024))?, map, &[kb.i32(32), kb.i32(7)], barrier)?;
        kb.named_barrier_sync(kb.i32(1), 64)?;
        kb.named_barrier_arrive(kb.i32(2), 64)?;
        let address = kb.shared_address(kb.byte_pointer(shared, kb.i32(1024))?)?;
        let tile = Swizzle128BTile::new(Elem::F16, 64, 64)?;
        let descriptor = |major, row, col| -> ccc::codegen::Result<_> {
            let fields = tile.descriptor(major, row, col)?;
            let start = kb.builder().build_right_shift(
                kb.add(address, kb.i32(fields.start_offset as i64))?,
                kb.i32(4),
                false,
                "",
            )?;
            Ok(kb.builder().build_int_add(
                kb.to_i64(start)?,
                kb.context().i64_type().const_int(fields.constant_bits(), false),
                "",
            )?)
        };
        let shape = WgmmaShape { n: 64, elem: Elem::F16 };
        let zero = vec![kb.f32(0.0); 32];
        kb.wgmma_fence(&[])?;
        let acc = kb.wgmma(
            shape,
            WgmmaA::Shared(descriptor(OperandMajor::K, 0, 0)?, OperandMajor::K),
            descriptor(OperandMajor::K, 0, 16)?,
            OperandMajor::K,
            Accumulate::Overwrite,
            &zero,
        )?;
        let a = [kb.i32(0x3c00_3c00); 4];
        let acc = kb.wgmma(
            shape,
            WgmmaA::Registers(a),
            descriptor(OperandMajor::MN, 16, 0)?,
            OperandMajor::MN,
            Accumulate::Add,
            &acc,
        )?;
        let acc = kb.wgmma(
            shape,
            WgmmaA::Shared(descriptor(OperandMajor::MN, 16, 0)?, OperandMajor::MN),
            descriptor(OperandMajor::K, 0, 16)?,
            OperandMajor::K,
            Accumulate::Add,
            &acc,
        )?;
        kb.wgmma_commit_group()?;
        let acc = kb.wgmma_wait_accumulators(0, &acc)?;
        let mut total = kb.f32(0.0);
        for value in acc {
            total = kb.fadd(total, value)?;
        }
        kb.store_f32(kb.element_pointer(kb.pointer_param("out")?, Elem::F32, kb.thread_index()?)?, total)?;
        Ok(())
    };
    emit().expect("emit");
    kb.finish().expect("finish");
    let ptx = module.to_ptx().expect("ptx");
    for instruction in [
        "mbarrier.init.shared::cta.b64",
        "mbarrier.arrive.expect_tx.shared::cta.b64",
        "mbarrier.try_wait.parity.shared::cta.b64",
        "mbarrier.arrive.shared::cta.b64",
        "fence.proxy.async.shared::cta;",
        "setmaxnreg.inc.sync.aligned.u32 240;",
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes",
        "bar.arrive",
        "wgmma.fence.sync.aligned;",
        "wgmma.commit_group.sync.aligned;",
        "wgmma.wait_group.sync.aligned 0;",
    ] {
        assert_eq!(count(&ptx, instruction), 1, "{instruction} in\n{ptx}");
    }
    assert_eq!(count(&ptx, "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16"), 3);
    assert!(ptx.contains("p, 1, 1, 0, 0;"), "shared A, K-major B");
    assert!(ptx.contains("p, 1, 1, 1;"), "register A, MN-major (transposed) B");
    assert!(ptx.contains("p, 1, 1, 1, 0;"), "shared MN-major (transposed) A, K-major B");
    let log = ptxas_log(&ptx, "primitives");
    assert!(log.contains("Compiling entry function 'hopper_primitives'"), "{log}");
}

#[test]
fn codegen_hopper_wgmma_rejects_bad_shapes() {
    assert!(WgmmaShape { n: 136, elem: Elem::Bf16 }.validate().is_ok());
    assert!(WgmmaShape { n: 12, elem: Elem::Bf16 }.validate().is_err());
    assert!(WgmmaShape { n: 264, elem: Elem::Bf16 }.validate().is_err());
    assert!(WgmmaShape { n: 64, elem: Elem::F32 }.validate().is_err());
}

/// One attention kernel variant the GPU script checks and times: the layer it is built for and
/// the builder's schedule.
struct AttentionVariant {
    name: String,
    spec: AttentionSpec,
    schedule: WgmmaAttentionSchedule,
}

fn attention_spec(head_dim: usize, mask: Mask, q_heads: usize, kv_heads: usize, dtype: DType) -> AttentionSpec {
    let mut spec = AttentionSpec::plain("variant", head_dim * q_heads, head_dim, q_heads, kv_heads);
    spec.mask = mask;
    spec.dtype = dtype;
    spec
}

fn attention_kernel(variant: &AttentionVariant) -> KernelFn {
    let spec = &variant.spec;
    let base = build_forward(spec, ForwardKernel::Attention, &default_schedule(spec, ForwardKernel::Attention).expect("schedule"))
        .expect("tiled kernel");
    let mut kernel = build_wgmma_attention(spec, &base, &variant.schedule, TokenRows::Batch).unwrap_or_else(|e| panic!("{}: {e}", variant.name));
    kernel.name = variant.name.clone();
    kernel
}

/// The kernels the GPU script checks and times: both schedules on four shapes, the ping-pong
/// kernel with smaller L2 groups of heads (the CTA work order), head widths 192 and 256 in the
/// tiles that fit, sliding windows with edges inside a tile and shorter than one, an f16
/// kernel of one consumer warpgroup, and every candidate the tile model finds feasible for
/// head_dim 64, 128, 192 and 256 under each kind of mask (so that whichever it ranks first has
/// run on the GPU).
fn attention_variants() -> Vec<AttentionVariant> {
    let schedule = |block_m, block_n, ping_pong| WgmmaAttentionSchedule { block_m, block_n, stages: 3, ping_pong, l2_group_bytes: 16 << 20 };
    let mask_name = |mask: Mask| match mask {
        Mask::Causal => "causal".to_string(),
        Mask::None => "full".to_string(),
        Mask::SlidingWindow { window } => format!("window{window}"),
    };
    let variant = |head_dim, mask, q_heads, kv_heads, dtype: DType, schedule: WgmmaAttentionSchedule, suffix: &str| {
        let kind = if schedule.ping_pong { "pingpong" } else { "ws" };
        AttentionVariant {
            name: format!(
                "attention_d{head_dim}_{}_h{q_heads}_{kv_heads}_{}_m{}_n{}_{kind}{suffix}",
                mask_name(mask),
                dtype.name(),
                schedule.block_m,
                schedule.block_n
            ),
            spec: attention_spec(head_dim, mask, q_heads, kv_heads, dtype),
            schedule,
        }
    };
    let mut variants = Vec::new();
    let mut push = |head_dim, mask, q_heads, kv_heads, dtype: DType, schedule: WgmmaAttentionSchedule, suffix: &str| {
        variants.push(variant(head_dim, mask, q_heads, kv_heads, dtype, schedule, suffix))
    };
    for ping_pong in [true, false] {
        for (head_dim, mask, q_heads, kv_heads) in
            [(128, Mask::Causal, 16, 16), (128, Mask::Causal, 8, 2), (128, Mask::None, 8, 2), (64, Mask::Causal, 8, 2)]
        {
            push(head_dim, mask, q_heads, kv_heads, DType::Bf16, schedule(128, 128, ping_pong), "");
        }
    }
    for (q_heads, kv_heads) in [(16, 16), (8, 2)] {
        for megabytes in [4, 8] {
            let grouped = WgmmaAttentionSchedule { l2_group_bytes: megabytes << 20, ..schedule(128, 128, true) };
            push(128, Mask::Causal, q_heads, kv_heads, DType::Bf16, grouped, &format!("_l2_{megabytes}mb"));
        }
    }
    push(192, Mask::Causal, 8, 2, DType::Bf16, schedule(128, 64, true), "");
    push(256, Mask::Causal, 8, 2, DType::Bf16, schedule(64, 64, false), "");
    for (head_dim, window, ping_pong) in [(128, 300, true), (128, 7, true), (64, 129, true), (128, 64, false), (128, 1000, false)] {
        push(head_dim, Mask::SlidingWindow { window }, 8, 2, DType::Bf16, schedule(128, 128, ping_pong), "");
    }
    push(128, Mask::Causal, 8, 2, DType::F16, schedule(64, 128, false), "");
    // The ranking depends on the mask (a window's length against the key tile), so each mask
    // kind gets every feasible candidate: causal, none, a window shorter than any tile and one
    // across several.
    for head_dim in [64, 128, 192, 256] {
        for mask in [Mask::Causal, Mask::None, Mask::SlidingWindow { window: 7 }, Mask::SlidingWindow { window: 300 }] {
            let spec = attention_spec(head_dim, mask, 8, 2, DType::Bf16);
            for config in feasible_tiles(&spec).into_iter().filter_map(|tiles| match tiles {
                TileConfig::Attention(config) => Some(config),
                TileConfig::Gemm(_) => None,
            }) {
                let candidate = config.kernel_schedule();
                let covered = variants.iter().any(|v| v.spec == spec && v.schedule == candidate);
                if !covered {
                    let suffix = format!("_s{}_candidate", candidate.stages);
                    variants.push(variant(head_dim, mask, 8, 2, DType::Bf16, candidate, &suffix));
                }
            }
        }
    }
    variants
}

/// Every configuration of the spec's Hopper attention and GEMM kernels that the tile model finds
/// feasible (at its tuning shape; feasibility does not depend on the shape).
fn feasible_tiles(spec: &AttentionSpec) -> Vec<TileConfig> {
    let shape = ProblemShape::of(spec);
    let mut feasible = Vec::new();
    for kernel in ccc::driver::tile_configs(spec).expect("tile configs") {
        match kernel {
            TileConfig::Attention(base) => feasible.extend(
                attention_candidates(&base, shape).into_iter().filter(|c| c.verdict.is_ok()).map(|c| TileConfig::Attention(c.config)),
            ),
            TileConfig::Gemm(base) => feasible.extend(
                gemm_candidates(&base, shape).into_iter().filter(|c| c.verdict.is_ok()).map(|c| TileConfig::Gemm(c.config)),
            ),
        }
    }
    feasible
}

#[test]
fn codegen_hopper_attention_assembles_without_spills_or_wgmma_serialization() {
    let mut descriptions = Vec::new();
    for variant in attention_variants() {
        let kernel = attention_kernel(&variant);
        let ptx = lowered_ptx(&kernel);
        let (spec, schedule) = (&variant.spec, &variant.schedule);
        if let Some(dir) = std::env::var_os("CCC_HOPPER_PTX_OUT") {
            // For bench/hopper_attention.py (see there).
            std::fs::create_dir_all(&dir).expect("output dir");
            std::fs::write(std::path::Path::new(&dir).join(format!("{}.ptx", kernel.name)), &ptx).expect("write ptx");
        }
        let (d, kind) = (spec.head_dim as u32, spec.dtype.name());
        let consumers = schedule.block_m / 64;
        assert_eq!(kernel.threads(), 128 * (consumers + 1));
        let footprint = wgmma_attention_footprint(spec.dtype.into(), d, schedule).expect("footprint");
        assert_eq!(footprint, (kernel.threads(), kernel.shared_bytes()), "the resource model's footprint is the kernel's");
        let tile_bytes = |rows: u32| (rows * d * 2) as usize;
        let barriers = (1 + 2 * schedule.stages as usize) * 8;
        let anchors = 4 * kernel.threads() as usize;
        assert_eq!(
            kernel.shared_bytes(),
            tile_bytes(schedule.block_m) + schedule.stages as usize * 2 * tile_bytes(schedule.block_n) + barriers + anchors + 1024
        );
        assert_eq!(
            kernel.grid,
            [SizeExpr::seq_len().ceil_div(schedule.block_m as u64), SizeExpr::c(spec.query_heads as u64), SizeExpr::batch()]
        );
        // Per key tile: d/16 steps of S = Q·Kᵀ (m64n{block_n}) and block_n/16 steps of P·V
        // (m64n{d}), in the first tile (S), each steady-state loop (both) and the last P·V.
        let loops = 2 + matches!(spec.mask, Mask::SlidingWindow { .. }) as usize;
        let ss = format!("wgmma.mma_async.sync.aligned.m64n{}k16.f32.{kind}.{kind}", schedule.block_n);
        let rs = format!("wgmma.mma_async.sync.aligned.m64n{d}k16.f32.{kind}.{kind}");
        let (s_steps, pv_steps) = ((d / 16) as usize, (schedule.block_n / 16) as usize);
        if schedule.block_n == d {
            assert_eq!(count(&ptx, &ss), (loops + 1) * s_steps + (loops + 1) * pv_steps);
        } else {
            assert_eq!(count(&ptx, &ss), (loops + 1) * s_steps);
            assert_eq!(count(&ptx, &rs), (loops + 1) * pv_steps);
        }
        assert_eq!(count(&ptx, "wgmma.fence.sync.aligned;"), 2 * loops + 2);
        assert_eq!(count(&ptx, "wgmma.commit_group.sync.aligned;"), 2 * loops + 2);
        assert_eq!(count(&ptx, "st.volatile.shared.f32"), loops, "one wait anchor per steady-state loop");
        assert_eq!(count(&ptx, "wgmma.wait_group.sync.aligned 0;"), loops + 2);
        assert_eq!(count(&ptx, "wgmma.wait_group.sync.aligned 1;"), loops, "softmax waits only for S");
        // Q once and one expect_tx per key tile; one box per 64-column panel of Q, K and V; no
        // thread-issued copies and no proxy fence (TMA writes in the async proxy).
        let panels = (d / 64) as usize;
        assert_eq!(count(&ptx, "mbarrier.arrive.expect_tx.shared::cta.b64"), 2);
        assert_eq!(count(&ptx, "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"), 3 * panels);
        assert_eq!(count(&ptx, "cp.async.cg"), 0);
        assert_eq!(count(&ptx, "fence.proxy.async.shared::cta;"), 0);
        assert_eq!(count(&ptx, "mbarrier.init.shared::cta.b64"), 1 + 2 * schedule.stages as usize);
        assert_eq!(count(&ptx, "setmaxnreg.dec.sync.aligned.u32 56;"), 1);
        assert!(count(&ptx, "setmaxnreg.inc.sync.aligned.u32 224;") == 1 || consumers == 1);
        assert!(ptx.contains(&format!(".maxntid {}", kernel.threads())), "register cap at entry");
        if schedule.ping_pong {
            // A turn is taken before each GEMM issue point (first tile, each loop, last P·V) and
            // passed after it (plus warpgroup 1's opening pass); bar.sync 0 follows the mbarrier
            // set-up.
            assert_eq!(count(&ptx, "bar.sync"), 1 + loops + 2);
            assert_eq!(count(&ptx, "bar.arrive"), 1 + loops + 2);
        } else {
            assert_eq!(count(&ptx, "bar.sync"), 1, "only the barrier after the mbarrier set-up");
        }
        let log = ptxas_log(&ptx, &kernel.name);
        let report = ptxas::parse_report(&log).expect("report").remove(0);
        assert_eq!((report.spill_stores, report.spill_loads, report.stack_frame), (0, 0, 0), "{report:?}");
        assert!(!log.contains("C75"), "ptxas had to serialize or fence wgmma itself:\n{log}");
        println!("{} {report:?} smem {}", kernel.name, kernel.shared_bytes());
        descriptions.push(serde_json::json!({
            "name": kernel.name, "elem": kind, "head_dim": d, "q_heads": spec.query_heads,
            "kv_heads": spec.kv_heads, "causal": spec.mask != Mask::None,
            "window": match spec.mask { Mask::SlidingWindow { window } => Some(window), _ => None },
            "softmax_scale": spec.softmax_scale,
            "block_m": schedule.block_m, "block_n": schedule.block_n, "threads": kernel.threads(),
            "dynamic_shared_bytes": kernel.shared_bytes(), "tma": true,
        }));
    }
    if let Some(dir) = std::env::var_os("CCC_HOPPER_PTX_OUT") {
        std::fs::write(std::path::Path::new(&dir).join("kernels.json"), serde_json::to_string_pretty(&descriptions).expect("json"))
            .expect("write json");
    }
}

#[test]
fn codegen_hopper_attention_rejects_bad_schedules() {
    let spec = attention_spec(128, Mask::Causal, 8, 2, DType::Bf16);
    let base = build_forward(&spec, ForwardKernel::Attention, &default_schedule(&spec, ForwardKernel::Attention).expect("schedule"))
        .expect("tiled kernel");
    let good = WgmmaAttentionSchedule { block_m: 128, block_n: 128, stages: 3, ping_pong: true, l2_group_bytes: 16 << 20 };
    assert!(build_wgmma_attention(&spec, &base, &good, TokenRows::Batch).is_ok());
    for (bad, why) in [
        (WgmmaAttentionSchedule { block_m: 192, ..good }, "block_m must be 64 or 128"),
        (WgmmaAttentionSchedule { block_n: 72, ..good }, "block_n must be a multiple of 16"),
        (WgmmaAttentionSchedule { stages: 2, ..good }, "K/V stages"),
        (WgmmaAttentionSchedule { block_m: 64, ..good }, "ping-pong"),
        // Q + 4 stages of 256-key K and V tiles: 288 KiB.
        (WgmmaAttentionSchedule { block_n: 256, stages: 4, ..good }, "shared memory"),
    ] {
        let error = build_wgmma_attention(&spec, &base, &bad, TokenRows::Batch).expect_err("rejected");
        assert!(error.contains(why), "{bad:?}: {error}");
    }
    let wide = attention_spec(96, Mask::Causal, 8, 2, DType::Bf16);
    let base = build_forward(&wide, ForwardKernel::Attention, &default_schedule(&wide, ForwardKernel::Attention).expect("schedule"))
        .expect("tiled kernel");
    assert!(build_wgmma_attention(&wide, &base, &good, TokenRows::Batch).expect_err("d 96").contains("head_dim"));
}

/// nvdisasm from `$CCC_NVDISASM` or the project virtualenv (`nvidia-cuda-nvdisasm` wheel).
fn find_nvdisasm() -> Option<std::path::PathBuf> {
    if let Some(path) = std::env::var_os("CCC_NVDISASM") {
        return Some(path.into());
    }
    let lib = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    std::fs::read_dir(lib)
        .ok()?
        .filter_map(|entry| entry.ok())
        .map(|entry| entry.path().join("site-packages/nvidia/cu13/bin/nvdisasm"))
        .find(|path| path.is_file())
}

/// The SASS of one kernel, assembled by ptxas and disassembled by nvdisasm.
fn sass(ptx: &str, name: &str) -> String {
    let nvdisasm = find_nvdisasm().expect("nvdisasm: set CCC_NVDISASM or install nvidia-cuda-nvdisasm into .venv");
    let ptxas = ptxas::find_ptxas().unwrap_or_else(|error| panic!("{error}"));
    let dir = std::env::temp_dir().join(format!("ccc-hopper-sass-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (input, cubin) = (dir.join("kernel.ptx"), dir.join("kernel.cubin"));
    std::fs::write(&input, ptx).expect("write ptx");
    let assembled = Command::new(ptxas).arg("-arch=sm_90a").arg(&input).arg("-o").arg(&cubin).status().expect("ptxas");
    assert!(assembled.success());
    let disassembled = Command::new(nvdisasm).arg("-c").arg(&cubin).output().expect("run nvdisasm");
    let _ = std::fs::remove_dir_all(&dir);
    assert!(disassembled.status.success(), "{}", String::from_utf8_lossy(&disassembled.stderr));
    String::from_utf8_lossy(&disassembled.stdout).into_owned()
}

#[test]
fn codegen_hopper_sass_uses_hgmma_and_overlaps_the_softmax_with_p_v() {
    for variant in attention_variants() {
        let kernel = attention_kernel(&variant);
        let sass = sass(&lowered_ptx(&kernel), &kernel.name);
        let instructions: Vec<&str> = sass.lines().filter_map(|line| line.split("*/").nth(1)).map(str::trim).collect();
        let hgmma = instructions.iter().filter(|text| text.starts_with("HGMMA.")).count();
        let local = instructions.iter().filter(|text| text.starts_with("LDL") || text.starts_with("STL")).count();
        assert!(hgmma > 0 && local == 0, "{}: {hgmma} HGMMA, {local} LDL/STL", kernel.name);
        // Each wait for S alone (gsb0 ≤ 1) must be followed by the tile's exponentials before
        // the wait for P·V (gsb0 ≤ 0): ptxas must not have hoisted that wait.
        let mut exponentials_since_wait_for_s = None;
        let mut overlapped_loops = 0;
        for text in &instructions {
            if text.starts_with("WARPGROUP.DEPBAR.LE gsb0, 0x1") {
                exponentials_since_wait_for_s = Some(0);
            } else if text.starts_with("MUFU.EX2") {
                exponentials_since_wait_for_s = exponentials_since_wait_for_s.map(|count| count + 1);
            } else if text.starts_with("WARPGROUP.DEPBAR.LE gsb0, 0x0")
                && let Some(count) = exponentials_since_wait_for_s.take()
            {
                assert!(count >= variant.schedule.block_n / 2, "{}: only {count} ex2 overlap P·V", kernel.name);
                overlapped_loops += 1;
            }
        }
        let windowed = matches!(variant.spec.mask, Mask::SlidingWindow { .. });
        assert_eq!(overlapped_loops, 2 + windowed as usize, "{}: every steady-state loop", kernel.name);
    }
}

// ---- the projection GEMM (a kernel-IR builder, lowered like every kernel) ------------------

/// A layer for the GEMM checks, from its `.attn` text.
fn layer(text: &str) -> AttentionSpec {
    let mut specs = ccc::frontend::parse_and_check("gemm.attn", text).unwrap_or_else(|e| panic!("{}", e.render()));
    specs.remove(0)
}

/// The wgmma GEMM of one projection of `spec` with `schedule`, named `name`.
fn ir_gemm(spec: &AttentionSpec, out_proj: bool, schedule: WgmmaGemmSchedule, name: &str) -> KernelFn {
    let which = if out_proj { ForwardKernel::OutputProjection } else { ForwardKernel::QkvProjection };
    let base = build_forward(spec, which, &default_schedule(spec, which).expect("schedule")).expect("tiled kernel");
    let mut kernel = build_wgmma_projection(spec, which, &base, &schedule).unwrap_or_else(|e| panic!("{name}: {e}"));
    kernel.name = name.to_string();
    kernel
}

/// ZAYA1's projections, an MHA-width output projection (K = 2048), and awkward shapes for the
/// GPU check (K not a multiple of 64, segments not a multiple of the tile, f16, biases, a
/// shifted segment, d = 64 heads stored a head at a time); then every configuration the tile
/// model finds feasible for ZAYA1's and the awkward layers' projections (so that whichever it
/// ranks first has run on the GPU).
fn gemm_bench_kernels() -> Vec<(AttentionSpec, bool, KernelFn)> {
    let zaya1 = layer(include_str!("../examples/zaya1.attn"));
    let mha = layer("attention mha { model_dim = 2048, head_dim = 128, query_heads = 16, kv_heads = 16 }");
    let ragged = layer(
        "attention ragged { model_dim = 1040, head_dim = 80, query_heads = 6, kv_heads = 3\n\
         qk_norm = l2, value_shift = 1, bias = true, dtype = f16 }",
    );
    let narrow = layer("attention narrow { model_dim = 576, head_dim = 64, query_heads = 5, kv_heads = 5, bias = true }");
    let pp = |block_n, stages| WgmmaGemmSchedule { block_n, stages, ping_pong: true };
    let coop = |block_n, stages| WgmmaGemmSchedule { block_n, stages, ping_pong: false };
    let mut out = Vec::new();
    for (spec, out_proj, schedule, name) in [
        (&zaya1, false, pp(128, 4), "gemm_zaya1_qkv_n128_s4_pingpong_tma"),
        (&zaya1, false, pp(128, 6), "gemm_zaya1_qkv_n128_s6_pingpong_tma"),
        (&zaya1, false, coop(256, 4), "gemm_zaya1_qkv_n256_s4_tma"),
        (&zaya1, true, pp(128, 4), "gemm_out_k1024_n128_s4_pingpong_tma"),
        (&zaya1, true, coop(256, 4), "gemm_out_k1024_n256_s4_tma"),
        (&mha, true, pp(128, 4), "gemm_out_k2048_n128_s4_pingpong_tma"),
        (&mha, true, pp(128, 6), "gemm_out_k2048_n128_s6_pingpong_tma"),
        (&ragged, false, pp(128, 4), "gemm_ragged_qkv_n128_s4_pingpong_tma"),
        (&ragged, false, coop(64, 3), "gemm_ragged_qkv_n64_s3_tma"),
        (&narrow, false, pp(128, 4), "gemm_narrow_qkv_n128_s4_pingpong_tma"),
        (&narrow, true, pp(128, 4), "gemm_narrow_out_n128_s4_pingpong_tma"),
    ] {
        out.push((spec.clone(), out_proj, ir_gemm(spec, out_proj, schedule, name)));
    }
    for (spec, layer_name) in [(&zaya1, "zaya1"), (&ragged, "ragged"), (&narrow, "narrow")] {
        for config in feasible_tiles(spec).into_iter().filter_map(|tiles| match tiles {
            TileConfig::Gemm(config) => Some(config),
            TileConfig::Attention(_) => None,
        }) {
            let out_proj = config.name.ends_with("out_proj");
            let ping_pong = config.schedule == GemmSchedule::PingPong;
            let schedule = WgmmaGemmSchedule { block_n: config.block_n, stages: config.stages, ping_pong };
            let covered = out.iter().any(|(s, o, k)| s == spec && *o == out_proj && k.schedule.block_n == schedule.block_n
                && k.schedule.stages == schedule.stages && k.name.contains("pingpong") == ping_pong);
            if !covered {
                let kind = if ping_pong { "pingpong" } else { "coop" };
                let projection = if out_proj { "out" } else { "qkv" };
                let name = format!("gemm_{layer_name}_{projection}_n{}_s{}_{kind}_tma_candidate", config.block_n, config.stages);
                out.push((spec.clone(), out_proj, ir_gemm(spec, out_proj, schedule, &name)));
            }
        }
    }
    out
}

fn lowered_ptx(kernel: &KernelFn) -> String {
    ccc::codegen::lower::lower_kernels(&kernel.name, std::slice::from_ref(kernel)).expect("lowered").ptx
}

#[test]
fn codegen_hopper_gemm_assembles_without_spills_or_wgmma_serialization() {
    let mut specs = Vec::new();
    for (spec, out_proj, kernel) in gemm_bench_kernels() {
        let ptx = lowered_ptx(&kernel);
        let name = &kernel.name;
        assert_eq!(kernel.threads(), 384);
        assert_eq!(kernel.grid, [SizeExpr::sms(), SizeExpr::c(1), SizeExpr::c(1)], "persistent");
        let schedule = kernel.schedule;
        let stage_bytes = (128 + schedule.block_n) * 64 * 2;
        assert_eq!(kernel.shared_bytes() as u32, schedule.stages * stage_bytes + 2 * schedule.stages * 8 + 1024);
        // One k-tile of 64: four k16 steps per accumulator, one fence for all of them,
        // committed, and the previous group waited for.
        let accumulators: Vec<_> =
            kernel.tiles.iter().filter(|tile| tile.ty.space() == ccc::ir::kernel::Space::Registers).collect();
        let kind = if spec.dtype == DType::F16 { "f16" } else { "bf16" };
        let wgmmas: usize = accumulators
            .iter()
            .map(|tile| count(&ptx, &format!("wgmma.mma_async.sync.aligned.m64n{}k16.f32.{kind}.{kind}", tile.ty.cols)))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .sum();
        assert_eq!(wgmmas, 4 * accumulators.len(), "{name}");
        assert_eq!(count(&ptx, "wgmma.fence.sync.aligned;"), 1, "{name}");
        assert_eq!(count(&ptx, "wgmma.wait_group.sync.aligned 1;"), 1, "{name}");
        assert_eq!(count(&ptx, "wgmma.wait_group.sync.aligned 0;"), 1, "{name}");
        assert_eq!(count(&ptx, "mbarrier.init.shared::cta.b64"), 2 * schedule.stages as usize, "{name}");
        assert!(count(&ptx, "mbarrier.arrive.expect_tx") >= 1, "{name}");
        assert_eq!(count(&ptx, "fence.proxy.async.shared::cta;"), 0, "{name}");
        assert_eq!(count(&ptx, "cp.async.ca") + count(&ptx, "cp.async.cg") + count(&ptx, "cp.async.wait_group"), 0, "{name}");
        // One by-value (`__grid_constant__`) map for `a` and one per weight.
        let maps = kernel.params.iter().filter(|p| matches!(p, KernelParam::TensorMap { .. })).count();
        assert_eq!(count(&ptx, ".param .align 64 .b8"), maps, "{name}");
        assert!(ptx.contains("setmaxnreg.inc.sync.aligned.u32 232;"), "{name}");
        assert!(ptx.contains("setmaxnreg.dec.sync.aligned.u32 40;"), "{name}");
        assert!(ptx.contains(".maxntid 384"), "{name}");
        let log = ptxas_log(&ptx, name);
        let report = ptxas::parse_report(&log).expect("report").remove(0);
        assert_eq!((report.spill_stores, report.spill_loads, report.stack_frame), (0, 0, 0), "{name}: {report:?}");
        assert!(!log.contains("C75"), "{name}: ptxas had to serialize or fence wgmma itself:\n{log}");
        println!("{name} {report:?} smem {}", kernel.shared_bytes());
        if std::env::var_os("CCC_HOPPER_PTX_OUT").is_some() {
            specs.push(gemm_description(&spec, out_proj, &kernel, kind));
        }
        if let Some(dir) = std::env::var_os("CCC_HOPPER_PTX_OUT") {
            std::fs::create_dir_all(&dir).expect("output dir");
            std::fs::write(std::path::Path::new(&dir).join(format!("{name}.ptx")), &ptx).expect("write ptx");
        }
    }
    if let Some(dir) = std::env::var_os("CCC_HOPPER_PTX_OUT") {
        std::fs::write(std::path::Path::new(&dir).join("gemms.json"), serde_json::to_string_pretty(&specs).expect("json"))
            .expect("write json");
    }
}

/// What bench/hopper_gemm.py needs to run `kernel` standalone: its parameters, segments,
/// launch and tensor maps.
fn gemm_description(spec: &AttentionSpec, out_proj: bool, kernel: &KernelFn, kind: &str) -> serde_json::Value {
    let (a, k, a_head_dim, segments) = gemm_operands(spec, out_proj).expect("operands");
    let params: Vec<&str> =
        kernel.params.iter().filter(|p| !matches!(p, KernelParam::TensorMap { .. })).map(KernelParam::name).collect();
    let tensor_maps: Vec<_> = kernel
        .params
        .iter()
        .filter_map(|p| match p {
            KernelParam::TensorMap { tensor, box_rows, .. } => Some(serde_json::json!([tensor, box_rows])),
            _ => None,
        })
        .collect();
    let block_n = kernel.schedule.block_n;
    let segments_json: Vec<_> = segments
        .iter()
        .map(|s| {
            serde_json::json!({"weight": s.weight, "bias": s.bias, "cols": s.cols, "dest": s.dest,
                "dest_width": s.dest_width, "dest_col": s.dest_col, "row_shift": s.row_shift})
        })
        .collect();
    let column_tiles: u32 = segments.iter().map(|s| s.cols.div_ceil(block_n)).sum();
    serde_json::json!({
        "name": kernel.name, "elem": kind, "params": params, "a": a, "k": k,
        "segments": segments_json, "block_n": block_n, "column_tiles": column_tiles, "grid": kernel.grid,
        "threads": kernel.threads(), "dynamic_shared_bytes": kernel.shared_bytes(),
        "a_head_dim": a_head_dim, "tensor_maps": tensor_maps,
    })
}

#[test]
fn codegen_hopper_gemm_rejects_bad_schedules() {
    let zaya1 = layer(include_str!("../examples/zaya1.attn"));
    let base = build_forward(&zaya1, ForwardKernel::OutputProjection, &default_schedule(&zaya1, ForwardKernel::OutputProjection).unwrap())
        .unwrap();
    for (schedule, message) in [
        (WgmmaGemmSchedule { block_n: 260, stages: 4, ping_pong: false }, "block_n 260"),
        (WgmmaGemmSchedule { block_n: 256, stages: 3, ping_pong: true }, "block_n 256"),
        (WgmmaGemmSchedule { block_n: 128, stages: 2, ping_pong: true }, "at least 3 stages"),
        (WgmmaGemmSchedule { block_n: 256, stages: 6, ping_pong: false }, "shared memory"),
    ] {
        let error = build_wgmma_projection(&zaya1, ForwardKernel::OutputProjection, &base, &schedule).expect_err("rejected");
        assert!(error.contains(message), "{schedule:?}: {error}");
    }
    // An `o` whose heads are not whole 64-column boxes keeps the tiled kernel.
    let d96 = layer("attention d96 { model_dim = 768, head_dim = 96, query_heads = 8, kv_heads = 8 }");
    let base = build_forward(&d96, ForwardKernel::OutputProjection, &default_schedule(&d96, ForwardKernel::OutputProjection).unwrap())
        .unwrap();
    let error = build_wgmma_projection(&d96, ForwardKernel::OutputProjection, &base, &WgmmaGemmSchedule { block_n: 128, stages: 4, ping_pong: true })
        .expect_err("rejected");
    assert!(error.contains("d a multiple of 64"), "{error}");
}

#[test]
fn codegen_hopper_gemm_sass_uses_hgmma_without_local_memory() {
    for (_, _, kernel) in gemm_bench_kernels() {
        let ptx = lowered_ptx(&kernel);
        let sass = sass(&ptx, &kernel.name);
        let instructions: Vec<&str> = sass.lines().filter_map(|line| line.split("*/").nth(1)).map(str::trim).collect();
        let hgmma = instructions.iter().filter(|text| text.starts_with("HGMMA.")).count();
        let local = instructions.iter().filter(|text| text.starts_with("LDL") || text.starts_with("STL")).count();
        assert!(hgmma > 0 && local == 0, "{}: {hgmma} HGMMA, {local} LDL/STL", kernel.name);
    }
}

/// Prologue variants at ZAYA1's sizes (and d = 64): every stage order of up to two depthwise and
/// per-head stages of widths 1 to 4, q-k mean on and off, each key temperature, RoPE NeoX with
/// aligned and unaligned halves, interleaved with an odd number of pairs, or none; bf16 and f16.
fn prologue_variants() -> Vec<AttentionSpec> {
    let depthwise = |width| ConvStage { kind: ConvKind::Depthwise, width };
    let per_head = |width| ConvStage { kind: ConvKind::PerHead, width };
    let stage_sets = [
        vec![],
        vec![depthwise(2), per_head(2)],
        vec![per_head(4)],
        vec![per_head(3), depthwise(4)],
        vec![depthwise(1), depthwise(3)],
        vec![per_head(2), per_head(2)],
        vec![per_head(1), depthwise(2)],
    ];
    let mut specs = Vec::new();
    for (index, stages) in stage_sets.iter().enumerate() {
        for head_dim in [128, 64] {
            let mut spec = AttentionSpec::plain(&format!("variant{index}_{head_dim}"), 16 * head_dim, head_dim, 8, 2);
            spec.qk_conv = stages.clone();
            spec.qk_mean = index % 2 == 1 || stages.is_empty();
            spec.qk_norm = if index == 4 { QkNorm::None } else { QkNorm::L2 };
            spec.key_temperature = match (spec.qk_norm, index % 3) {
                (QkNorm::None, _) => KeyTemperature::None,
                (_, 0) => KeyTemperature::Learned,
                (_, 1) => KeyTemperature::LearnedExp,
                _ => KeyTemperature::None,
            };
            let (rotary_dim, style) = match index % 4 {
                0 => (head_dim / 2, RopeStyle::Neox),
                1 => (head_dim - 10, RopeStyle::Neox),
                2 => (22, RopeStyle::Interleaved),
                _ => (0, RopeStyle::Neox),
            };
            spec.rope = (rotary_dim > 0).then_some(Rope {
                fraction: rotary_dim as f64 / head_dim as f64,
                rotary_dim,
                theta: 10_000.0,
                style,
                yarn: None,
            });
            if head_dim == 64 {
                spec.dtype = DType::F16;
            }
            spec.validate().expect("a valid variant");
            specs.push(spec);
        }
    }
    specs
}

/// The prologue every example and variant ships: the kernel-IR builder's, lowered and assembled
/// without spills, at its occupancy goal, storing q and k in 16-byte chunks and nothing narrower.
#[test]
fn codegen_prologue_of_every_example_and_variant_assembles_without_spills() {
    let examples = common::specs::example_files();
    let with_prologue: Vec<_> =
        examples.iter().chain(&prologue_variants()).filter(|spec| has_qk_prologue(spec)).cloned().collect();
    assert!(with_prologue.len() >= 16);
    for spec in &with_prologue {
        let kernel = ccc::driver::kernels(spec)
            .expect("kernels")
            .into_iter()
            .find(|kernel| kernel.name.ends_with("_qk_prologue"))
            .expect("a prologue");
        let lowered = ccc::codegen::lower::lower_kernels(&kernel.name, std::slice::from_ref(&kernel)).expect("lowered");
        let ptx = lowered.ptx;
        assert!(ptx.contains(&format!(".minnctapersm {}", kernel.ctas_per_sm)), "{}", spec.name);
        let log = ptxas_log(&ptx, &kernel.name);
        let report = ptxas::parse_report(&log).expect("report").remove(0);
        println!("{} {report:?} smem {} ctas/SM {}", spec.name, kernel.shared_bytes(), kernel.ctas_per_sm);
        assert!(count(&ptx, "st.global.v4.b32") >= 2, "{}", spec.name);
        assert_eq!(count(&ptx, "st.global.b16") + count(&ptx, "st.global.u16"), 0, "{}", spec.name);
        // Element-wise maps read shared rows a column pair or a 16-byte chunk at a time
        // (codegen::lower::lanes); only RoPE partners that are not a whole pair away (odd halves,
        // interleaved pairs) are read element by element.
        let pairs_rotate = spec.rope.is_none_or(|rope| rope.style == RopeStyle::Neox && (rope.rotary_dim / 2).is_multiple_of(2));
        let narrow_shared_loads = count(&ptx, "ld.shared.b16") + count(&ptx, "ld.shared.u16");
        assert!(!pairs_rotate || narrow_shared_loads == 0, "{}: {narrow_shared_loads} 2-byte shared loads", spec.name);
        // Per-head convolution weights of 2 to 4 taps ([P, d, K], taps innermost) are staged 16
        // bytes of every tap at a time (copy_tap_chunks): 16-byte global loads, the tap picked by
        // byte permutes (one tap is contiguous already).
        let per_head = spec.qk_conv.iter().any(|stage| stage.kind == ConvKind::PerHead && (2..=4).contains(&stage.width));
        assert_eq!(ptx.contains("prmt.b32") && ptx.contains("ld.global.v4.b32"), per_head, "{}: tap chunks", spec.name);
        assert_eq!((report.spill_stores, report.spill_loads, report.stack_frame), (0, 0, 0), "{}: {report:?}", spec.name);
    }
}

/// The kernel-IR attention with swizzled Q/K/V (what head widths other than 64 and 128 run when
/// wgmma fits; built here directly for d 128 and 64) lowers its GEMMs to HGMMA, without local
/// memory.
#[test]
fn codegen_kernel_ir_attention_on_swizzled_tiles_uses_hgmma() {
    use ccc::ir::kernel::{ForwardKernel, Layout, build_forward, default_schedule};
    for (head_dim, dtype) in [(128, DType::Bf16), (64, DType::F16)] {
        let mut spec = AttentionSpec::plain("window", 16 * head_dim, head_dim, 16, 4);
        spec.mask = ccc::spec::Mask::SlidingWindow { window: 4096 };
        spec.dtype = dtype;
        let schedule = default_schedule(&spec, ForwardKernel::Attention).expect("schedule");
        let kernel = build_forward(&spec, ForwardKernel::Attention, &schedule).expect("kernel");
        assert!(kernel.tiles.iter().filter(|tile| tile.ty.layout == Layout::Swizzled128B).count() == 3, "q_s, k_s, v_s swizzled");
        let lowered = ccc::codegen::lower::lower_kernels("window", &[kernel]).expect("lowers");
        let sass = sass(&lowered.ptx, &format!("window_d{head_dim}"));
        let instructions: Vec<&str> = sass.lines().filter_map(|line| line.split("*/").nth(1)).map(str::trim).collect();
        let hgmma = instructions.iter().filter(|text| text.starts_with("HGMMA.")).count();
        let local = instructions.iter().filter(|text| text.starts_with("LDL") || text.starts_with("STL")).count();
        let mma_sync = instructions.iter().filter(|text| text.starts_with("HMMA.")).count();
        assert!(hgmma > 0 && local == 0 && mma_sync == 0, "d {head_dim}: {hgmma} HGMMA, {mma_sync} HMMA, {local} LDL/STL");
    }
}

/// `atomic_add` lowers to `red.global.add` (bounds-checked; two adjacent columns in one
/// `.v2.f32` where the box's columns are contiguous, which LLVM may prove for every pair) and
/// assembles.
#[test]
fn codegen_atomic_add_lowers_to_red() {
    let kernel = common::kernel::atomic_weight_gradient();
    let ptx = lowered_ptx(&kernel);
    assert!(ptx.contains("red.global.add.v2.f32") || ptx.contains("red.global.add.f32"), "{ptx}");
    let log = ptxas_log(&ptx, &kernel.name);
    let report = ptxas::parse_report(&log).expect("report").remove(0);
    assert_eq!((report.spill_stores, report.spill_loads, report.stack_frame), (0, 0, 0), "{report:?}");
}

/// The projection-gradient GEMMs of every example (dYᵀ read transposed: MN-major by wgmma, with
/// ldmatrix.trans where a bias keeps mma.sync) lower and assemble without spills, and so do the prologue, convolution and token-sum kernels
/// of each layer's backward. With `CCC_HOPPER_PTX_OUT=DIR`, the whole backward
/// (`backward_kernels`) of every example and of two plain layers (MHA at ZAYA1's width; GQA with
/// biases, a shifted value head and a window) is written there in launch order with
/// `layer_backward.json` (for bench/layer_backward.py: the layer's sizes, RoPE, which CCA steps
/// it has, its parameters, and each kernel's parameters, grid as size expressions, threads and
/// shared memory).
#[test]
fn codegen_each_gradient_gemm_of_every_example_assembles_without_spills() {
    use ccc::ir::kernel::{
        Access, KernelParam, backward_kernels, build_input_gradient, build_weight_gradient, projection_gradients,
        with_default_gradient_schedule,
    };
    let out = std::env::var_os("CCC_HOPPER_PTX_OUT").map(std::path::PathBuf::from);
    let mha_plain = AttentionSpec::plain("mha_plain", 2048, 128, 16, 16);
    let gqa_plain = AttentionSpec {
        bias: true,
        value_shift: 1,
        mask: Mask::SlidingWindow { window: 300 },
        ..AttentionSpec::plain("gqa_plain", 1024, 128, 8, 2)
    };
    let mut layers = Vec::new();
    for spec in common::specs::example_files().into_iter().chain([mha_plain, gqa_plain]) {
        let (inputs, weights) = projection_gradients(&spec);
        let mut gemms: Vec<_> =
            inputs.iter().map(|g| with_default_gradient_schedule(|s| build_input_gradient(g, s)).expect("input gradient")).collect();
        gemms.extend(weights.iter().map(|g| with_default_gradient_schedule(|s| build_weight_gradient(g, s)).expect("weight gradient")));
        for kernel in &gemms {
            let ptx = lowered_ptx(kernel);
            if kernel.name.contains("dweight") {
                // wgmma's operands: a and b both MN-major (the transpose bits 1, 1).
                let transposed_a = ptx.contains("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16") || ptx.contains("p, 1, 1, 1, 1;");
                assert!(transposed_a, "{}: dYᵀ not read transposed", kernel.name);
            }
            let log = ptxas_log(&ptx, &kernel.name);
            let report = ptxas::parse_report(&log).expect("report").remove(0);
            println!("{} {:?} {report:?}", kernel.name, kernel.schedule);
            assert_eq!((report.spill_stores, report.spill_loads, report.stack_frame), (0, 0, 0), "{}: {report:?}", kernel.name);
        }
        let chain = backward_kernels(&spec).expect("a backward");
        if let Some(dir) = &out {
            std::fs::create_dir_all(dir).expect("output dir");
        }
        let mut described = Vec::new();
        for kernel in &chain {
            let ptx = lowered_ptx(kernel);
            if ["qk_prologue_bwd", "conv", "temperature"].iter().any(|part| kernel.name.contains(part)) {
                let report = ptxas::parse_report(&ptxas_log(&ptx, &kernel.name)).expect("report").remove(0);
                println!("{} {:?} {report:?}", kernel.name, kernel.schedule);
                assert_eq!((report.spill_stores, report.spill_loads, report.stack_frame), (0, 0, 0), "{}: {report:?}", kernel.name);
            }
            if let Some(dir) = &out {
                std::fs::write(dir.join(format!("{}.ptx", kernel.name)), ptx).expect("write ptx");
            }
            // Each tensor with its type and shape, so that the script can allocate what a
            // kernel writes.
            let tensors: Vec<_> = kernel
                .params
                .iter()
                .filter_map(|param| match param {
                    KernelParam::Tensor { name, elem, shape, access } => Some(serde_json::json!({
                        "name": name, "elem": elem.name(), "shape": shape, "write": *access == Access::Write,
                    })),
                    _ => None,
                })
                .collect();
            described.push(serde_json::json!({
                "name": kernel.name,
                "params": kernel.params.iter().map(KernelParam::name).collect::<Vec<_>>(),
                "tensors": tensors,
                "grid": kernel.grid, "threads": kernel.threads(), "dynamic_shared_bytes": kernel.shared_bytes(),
            }));
        }
        layers.push(serde_json::json!({
            "spec": spec,
            "layer": spec.name, "model_dim": spec.model_dim, "head_dim": spec.head_dim, "q_heads": spec.query_heads,
            "kv_heads": spec.kv_heads, "value_shift": spec.value_shift, "causal": spec.mask != Mask::None,
            "window": match spec.mask { Mask::SlidingWindow { window } => Some(window), _ => None },
            "softmax_scale": spec.softmax_scale, "elem": spec.dtype.name(), "qk_norm": spec.qk_norm != QkNorm::None,
            "cca": !spec.qk_conv.is_empty() || spec.qk_mean,
            "rope": spec.rope.map(|rope| serde_json::json!({
                "rotary_dim": rope.rotary_dim, "theta": rope.theta, "neox": rope.style == RopeStyle::Neox,
            })),
            "params": spec.params().iter().map(|p| serde_json::json!({"name": p.name, "shape": p.shape, "role": format!("{:?}", p.role)})).collect::<Vec<_>>(),
            "kernels": described,
        }));
    }
    if let Some(dir) = &out {
        std::fs::write(dir.join("layer_backward.json"), serde_json::to_string_pretty(&layers).expect("json")).expect("write json");
    }
}

/// The attention backward kernels of every example, the form each launches and the two-pass
/// (deterministic) form, lower and assemble without spills. With `CCC_HOPPER_PTX_OUT=DIR` the
/// two-pass kernels are written there with `attention_backward.json` (for
/// bench/attention_backward.py, which launches raw PTX and passes no tensor maps: per kernel its
/// example, stage, parameters in ABI order, tile rows, threads and shared memory).
#[test]
fn codegen_attention_backward_of_every_example_assembles_without_spills() {
    use ccc::ir::kernel::{AttentionBackwardKernel, KernelParam, build_attention_backward, default_attention_backward_schedule};
    let out = std::env::var_os("CCC_HOPPER_PTX_OUT").map(std::path::PathBuf::from);
    let mut descriptions = Vec::new();
    for spec in common::specs::example_files() {
        let launched = AttentionBackwardKernel::launched_by(&spec);
        let two_pass = AttentionBackwardKernel::TWO_PASS.into_iter().filter(|which| !launched.contains(which));
        let kernels: Vec<_> = launched.into_iter().chain(two_pass).collect();
        for which in kernels {
            let schedule = default_attention_backward_schedule(&spec, which).expect("schedule");
            let kernel = build_attention_backward(&spec, which, &schedule).expect("kernel");
            let ptx = lowered_ptx(&kernel);
            let log = ptxas_log(&ptx, &kernel.name);
            let report = ptxas::parse_report(&log).expect("report").remove(0);
            println!("{} {schedule:?} smem {} {report:?}", kernel.name, kernel.shared_bytes());
            assert_eq!((report.spill_stores, report.spill_loads, report.stack_frame), (0, 0, 0), "{}: {report:?}", kernel.name);
            if let Some(dir) = out.as_ref().filter(|_| AttentionBackwardKernel::TWO_PASS.contains(&which)) {
                std::fs::create_dir_all(dir).expect("output dir");
                std::fs::write(dir.join(format!("{}.ptx", kernel.name)), &ptx).expect("write ptx");
                let rows = match which {
                    AttentionBackwardKernel::DkDv => schedule.block_n,
                    _ => schedule.block_m,
                };
                descriptions.push(serde_json::json!({
                    "name": kernel.name, "layer": spec.name, "stage": which.suffix(), "elem": spec.dtype.name(),
                    "head_dim": spec.head_dim, "q_heads": spec.query_heads, "kv_heads": spec.kv_heads,
                    "causal": spec.mask != Mask::None,
                    "window": match spec.mask { Mask::SlidingWindow { window } => Some(window), _ => None },
                    "softmax_scale": spec.softmax_scale,
                    "params": kernel.params.iter().map(KernelParam::name).collect::<Vec<_>>(),
                    "block_rows": rows, "threads": kernel.threads(), "dynamic_shared_bytes": kernel.shared_bytes(),
                }));
            }
        }
    }
    if let Some(dir) = &out {
        std::fs::write(dir.join("attention_backward.json"), serde_json::to_string_pretty(&descriptions).expect("json"))
            .expect("write json");
    }
}
