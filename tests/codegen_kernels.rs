#![cfg(feature = "llvm")]
//! The GEMM and flash-attention kernels, built only from the tile emitters, must assemble with
//! ptxas for sm_90a without spills; a small emitter kernel is snapshotted as LLVM IR and PTX.

use ccc::codegen::attention::{AttentionConfig, AttentionLaunch, AttentionMask, emit_attention};
use ccc::codegen::gemm::{GemmConfig, GemmLaunch, emit_gemm};
use ccc::codegen::ptxas::{self, PtxasReport};
use ccc::codegen::tile::{
    AccumulatorShape, AccumulatorTile, GlobalTile, MmaAccumulator, OperandA, OperandB, RowReduction, RowVector,
    SharedLayout, SharedTile, copy_global_to_shared_async, map_accumulator, mma, row_reduce, store_accumulator,
};
use ccc::codegen::{CodegenError, Elem, ParamKind, PtxModule};
use ccc::ir::size::SizeExpr;
use inkwell::context::Context;

/// Assembles and returns the single kernel's report; a missing ptxas fails the test.
fn assemble_one(ptx: &str) -> PtxasReport {
    let mut reports = ptxas::assemble(ptx).unwrap_or_else(|error| panic!("{error}"));
    assert_eq!(reports.len(), 1, "{reports:?}");
    reports.remove(0)
}

fn assert_no_spills(report: &PtxasReport) {
    assert_eq!((report.spill_stores, report.spill_loads, report.stack_frame), (0, 0, 0), "{report:?}");
    assert!(report.registers <= 255, "{report:?}");
}

fn count(ptx: &str, needle: &str) -> usize {
    ptx.matches(needle).count()
}

fn gemm(config: &GemmConfig) -> (String, GemmLaunch) {
    let context = Context::create();
    let module = PtxModule::new(&context, &config.name).expect("module");
    let launch = emit_gemm(&module, config).expect("emit");
    (module.to_ptx().expect("ptx"), launch)
}

#[test]
fn codegen_gemm_128x128x32_8_warps_assembles_without_spills() {
    let config = GemmConfig {
        name: "gemm_bf16_128x128x32".into(),
        elem: Elem::Bf16,
        block_m: 128,
        block_n: 128,
        block_k: 32,
        warps_m: 2,
        warps_n: 4,
    };
    let (ptx, launch) = gemm(&config);
    assert!(ptx.contains(".visible .entry gemm_bf16_128x128x32("), "not a kernel entry");
    assert!(ptx.contains(".target sm_90a"));
    // Per 32-wide K slice and warp (64×32 of C): 2 k16 steps × (4 A + 2 B) ldmatrix, 2 × 16 mma.
    assert_eq!(count(&ptx, "ldmatrix.sync.aligned.m8n8.x4.shared.b16"), 12);
    assert_eq!(count(&ptx, "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"), 32);
    // 2 tiles × 512 chunks / 256 threads, issued in the prologue and in the loop.
    assert_eq!(count(&ptx, "cp.async.cg.shared.global"), 8);
    assert_eq!(count(&ptx, "cp.async.wait_group 1"), 1);
    assert_eq!(launch, GemmLaunch { threads: 256, dynamic_shared_bytes: 2 * 2 * 128 * 40 * 2, block_m: 128, block_n: 128 });
    assert!(ptx.contains(".extern .shared .align 16 .b8 gemm_bf16_128x128x32_shared[]"), "dynamic shared memory");
    assert_eq!(launch.grid(300, 200), [2, 3, 1]);
    let report = assemble_one(&ptx);
    assert_eq!(report.kernel, "gemm_bf16_128x128x32");
    assert_eq!(report.shared_bytes, 0, "all shared memory is dynamic");
    assert_no_spills(&report);
    println!("{report:?}");
}

#[test]
fn codegen_gemm_64x128x64_4_warps_f16_assembles_without_spills() {
    let config =
        GemmConfig { name: "gemm_f16_64x128x64".into(), elem: Elem::F16, block_m: 64, block_n: 128, block_k: 64, warps_m: 2, warps_n: 2 };
    let (ptx, launch) = gemm(&config);
    assert_eq!(count(&ptx, "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"), 4 * 2 * 8);
    assert_eq!(launch.dynamic_shared_bytes, 2 * (64 + 128) * 72 * 2);
    let report = assemble_one(&ptx);
    assert_no_spills(&report);
    println!("{report:?}");
}

fn attention_config(head_dim: u32, mask: AttentionMask) -> AttentionConfig {
    AttentionConfig {
        name: format!("attention_d{head_dim}_{mask:?}").to_lowercase(),
        elem: Elem::Bf16,
        head_dim,
        q_heads: 8,
        kv_heads: 2,
        mask,
        softmax_scale: 1.0 / (head_dim as f64).sqrt(),
        block_m: 64,
        block_n: 64,
        warps: 4,
    }
}

fn attention(config: &AttentionConfig) -> (String, AttentionLaunch) {
    let context = Context::create();
    let module = PtxModule::new(&context, &config.name).expect("module");
    let launch = emit_attention(&module, config).expect("emit");
    (module.to_ptx().expect("ptx"), launch)
}

#[test]
fn codegen_attention_assembles_without_spills_for_d64_and_d128() {
    for (head_dim, mask, elem) in [
        (64, AttentionMask::Causal, Elem::Bf16),
        (128, AttentionMask::Causal, Elem::Bf16),
        (128, AttentionMask::Full, Elem::Bf16),
        (128, AttentionMask::Causal, Elem::F16),
    ] {
        let config = AttentionConfig { elem, ..attention_config(head_dim, mask) };
        let kind = elem.name();
        let (ptx, launch) = attention(&config);
        let row_bytes = (head_dim + 8) * 2;
        assert_eq!(launch.threads, 128);
        assert_eq!(launch.dynamic_shared_bytes, 64 * row_bytes * 5, "Q + 2 stages of K and V");
        assert_eq!(launch.grid, [SizeExpr::seq_len().ceil_div(64), SizeExpr::c(8), SizeExpr::batch()]);
        assert!(ptx.contains(".extern .shared .align 16 .b8"), "dynamic shared memory");
        assert!(ptx.contains("ex2.approx.ftz.f32"));
        assert!(ptx.contains("shfl.sync.bfly.b32"));
        assert!(ptx.contains(&format!("cvt.rn.{kind}x2.f32")));
        assert!(ptx.contains("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16"), "V is read transposed");
        // Per key tile and warp: S = Q·Kᵀ is (d/16) k steps × 8 n fragments; O += P·V is
        // 4 k steps × (d/8) n fragments. The masked and unmasked paths share them.
        let per_tile = (head_dim / 16) * 8 + 4 * (head_dim / 8);
        assert_eq!(count(&ptx, &format!("mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32")), per_tile as usize);
        let report = assemble_one(&ptx);
        assert_eq!(report.shared_bytes, 0, "all shared memory is dynamic");
        assert_no_spills(&report);
        println!("{} {kind} {report:?}", config.name);
    }
}

#[test]
fn codegen_attention_rejects_bad_configurations() {
    let mut config = attention_config(64, AttentionMask::Causal);
    config.kv_heads = 3;
    let context = Context::create();
    let module = PtxModule::new(&context, "bad").expect("module");
    assert!(matches!(emit_attention(&module, &config), Err(CodegenError::Unsupported(_))));
    let mut config = attention_config(64, AttentionMask::Causal);
    config.block_m = 48; // 12 rows per warp is not a whole m16 fragment
    assert!(matches!(emit_attention(&module, &config), Err(CodegenError::Unsupported(_))));
    let mut config = attention_config(64, AttentionMask::Causal);
    config.elem = Elem::F32;
    assert!(matches!(emit_attention(&module, &config), Err(CodegenError::Unsupported(_))));
}

#[test]
fn codegen_gemm_rejects_bad_configurations() {
    let context = Context::create();
    let module = PtxModule::new(&context, "bad").expect("module");
    let good = GemmConfig { name: "g".into(), elem: Elem::Bf16, block_m: 64, block_n: 64, block_k: 32, warps_m: 2, warps_n: 2 };
    let f32_inputs = GemmConfig { elem: Elem::F32, ..good.clone() };
    assert!(matches!(emit_gemm(&module, &f32_inputs), Err(CodegenError::Unsupported(_))));
    // 64 rows of A × 24 columns do not split into 16-byte chunks over 128 threads evenly.
    let odd_k = GemmConfig { name: "g2".into(), block_k: 24, ..good.clone() };
    assert!(matches!(emit_gemm(&module, &odd_k), Err(CodegenError::Unsupported(_))));
    emit_gemm(&module, &good).expect("a valid configuration");
    let duplicate = emit_gemm(&module, &good);
    assert!(matches!(duplicate, Err(CodegenError::Unsupported(message)) if message.contains("twice")));
}

/// One warp: copy 16×16 A and B tiles to shared memory, `C = A · Bᵀ`, scale every element by
/// (col < row ? 0.5 : 1), subtract each row's max, store as bf16.
fn emit_sample(module: &PtxModule<'_>) -> Result<(), CodegenError> {
    let params = [
        ParamKind::GlobalPointer("a".into()),
        ParamKind::GlobalPointer("b".into()),
        ParamKind::GlobalPointer("c".into()),
        ParamKind::Size("rows".into()),
    ];
    let layout = SharedLayout::RowMajor { pad_elems: 8 };
    let tile_bytes = SharedTile::footprint_bytes(Elem::Bf16, 16, 16, layout);
    let shared = module.static_shared("sample_shared", 2 * tile_bytes);
    let kb = module.declare_kernel("tile_sample", &params)?;
    let rows = kb.size_param("rows")?;
    let global = |name: &str| -> Result<GlobalTile<'_>, CodegenError> {
        Ok(GlobalTile {
            base: kb.pointer_param(name)?,
            elem: Elem::Bf16,
            row_stride: kb.i32(16),
            alignment_elems: 16,
            row_start: kb.i32(0),
            col_start: kb.i32(0),
            row_limit: rows,
            col_limit: kb.i32(16),
        })
    };
    let a_shared = SharedTile { base: shared, elem: Elem::Bf16, rows: 16, cols: 16, layout };
    let b_shared = SharedTile { base: kb.byte_pointer(shared, kb.i32(tile_bytes as i64))?, ..a_shared };
    copy_global_to_shared_async(&kb, &global("a")?, &a_shared, 32)?;
    copy_global_to_shared_async(&kb, &global("b")?, &b_shared, 32)?;
    kb.cp_async_commit()?;
    kb.cp_async_wait(0)?;
    kb.barrier()?;
    let shape = AccumulatorShape { rows: 16, cols: 16, layout: MmaAccumulator { warps_m: 1, warps_n: 1 } };
    let acc = AccumulatorTile::new(&kb, shape)?;
    acc.fill(&kb, 0.0)?;
    mma(&kb, &acc, OperandA::Shared(&a_shared), OperandB::NByK(&b_shared))?;
    map_accumulator(&kb, &acc, |kb, position, value| {
        let below_diagonal = kb.lt(position.col, position.row)?;
        let scale = kb.select_f32(below_diagonal, kb.f32(0.5), kb.f32(1.0))?;
        kb.fmul(value, scale)
    })?;
    let row_max = RowVector::new(&kb, shape)?;
    row_reduce(&kb, &acc, RowReduction::Max, &row_max)?;
    map_accumulator(&kb, &acc, |kb, position, value| kb.fsub(value, row_max.get(kb, position.row_slot)?))?;
    store_accumulator(&kb, &acc, &global("c")?)?;
    kb.finish()
}

#[test]
fn codegen_snapshot_small_emitter_kernel() {
    let context = Context::create();
    let module = PtxModule::new(&context, "tile_sample").expect("module");
    emit_sample(&module).expect("emit");
    let ptx = module.to_ptx().expect("ptx");
    // After to_ptx the module holds the optimized IR that the NVPTX back end consumed.
    insta::assert_snapshot!("tile_sample_llvm_ir", module.llvm_ir());
    insta::assert_snapshot!("tile_sample_ptx", ptx);
    let report = assemble_one(&ptx);
    assert_no_spills(&report);
    assert_eq!(report.shared_bytes, 2 * 16 * 24 * 2);
}

#[test]
fn codegen_attention_with_two_m_fragments_per_warp_assembles_without_spills() {
    // 128 query rows over 4 warps: 32 rows (two m16 fragments) per warp, 32-key tiles. The
    // fastest of the configurations measured on the H200 (d = 128, causal).
    let config = AttentionConfig { block_m: 128, block_n: 32, ..attention_config(128, AttentionMask::Causal) };
    let (ptx, launch) = attention(&config);
    assert_eq!(launch.dynamic_shared_bytes, (128 + 4 * 32) * 136 * 2);
    assert_eq!(launch.grid[0], SizeExpr::seq_len().ceil_div(128));
    let report = assemble_one(&ptx);
    assert_no_spills(&report);
    println!("{} {report:?}", config.name);
}
