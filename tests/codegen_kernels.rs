#![cfg(feature = "llvm")]
//! A small kernel built directly from the tile emitters, snapshotted as LLVM IR and PTX and
//! assembled by ptxas; the kernels of real libraries are lowered from kernel IR
//! (tests/codegen_lower.rs) or come from the Hopper path (tests/codegen_hopper.rs).

use ccc::codegen::ptxas::{self, PtxasReport};
use ccc::codegen::tile::{
    AccumulatorShape, AccumulatorTile, GlobalTile, MmaAccumulator, OperandA, OperandB, RowReduction, RowVector,
    SharedLayout, SharedTile, copy_global_to_shared_async, map_accumulator, mma, row_reduce, store_accumulator,
};
use ccc::codegen::{CodegenError, Elem, ParamKind, PtxModule};
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
