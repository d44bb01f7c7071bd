//! i32 index tensors in the kernel IR (what paged KV caches need: block tables, sequence
//! lengths): read element by element in scalar expressions, never as a box or a tile. A paged
//! gather through a block table runs in the interpreter, lowers, and assembles.

mod common;

use ccc::ir::kernel::interp::{Buffers, Rounding, launch_sizes, run_kernel};
use ccc::ir::kernel::*;
use ccc::ir::size::SizeExpr;
use common::rng::XorShift64Star;

const PAGE_ROWS: u32 = 8;
const WIDTH: u32 = 16;
const POOL_PAGES: usize = 5;
const SEQUENCES: usize = 2;
const BLOCKS: usize = 3;

/// CTA b copies the pages its row of `block_table` names, in order, into `out[b]`: the access
/// pattern of attention over a paged KV cache.
fn paged_gather() -> KernelFn {
    let c = |v: usize| SizeExpr::c(v as u64);
    let tensor = |name: &str, elem, shape, access| KernelParam::Tensor { name: name.into(), elem, shape, access };
    let tiles = vec![TileDecl {
        name: "page_s".into(),
        ty: TileType { elem: ElemType::Bf16, rows: PAGE_ROWS, cols: WIDTH, layout: Layout::RowMajor { pad: 0 } },
    }];
    let page = TileView::whole(TileId(0), &tiles[0].ty);
    let span = |start: Expr, len: u32| GlobalDim::Span { start, len, valid: None };
    let var = Expr::var;
    let body = vec![
        Stmt::Let { var: "b".into(), value: Expr::BlockIdx(Axis::X) },
        Stmt::For {
            var: "j".into(),
            start: Expr::Int(0),
            end: Expr::Int(BLOCKS as i64),
            body: vec![
                Stmt::Let { var: "page".into(), value: Expr::global("block_table", vec![var("b"), var("j")]) },
                Stmt::Copy {
                    dst: page.clone(),
                    src: GlobalTile { param: "pool".into(), dims: vec![GlobalDim::At(var("page")), span(Expr::Int(0), PAGE_ROWS), span(Expr::Int(0), WIDTH)] },
                    is_async: false,
                },
                Stmt::Barrier,
                Stmt::Store {
                    src: page.clone(),
                    dst: GlobalTile {
                        param: "out".into(),
                        dims: vec![GlobalDim::At(var("b")), span(var("j") * Expr::Int(PAGE_ROWS as i64), PAGE_ROWS), span(Expr::Int(0), WIDTH)],
                    },
                },
                Stmt::Barrier,
            ],
        },
    ];
    KernelFn {
        name: "paged_gather".into(),
        params: vec![
            tensor("pool", ElemType::Bf16, vec![c(POOL_PAGES), c(PAGE_ROWS as usize), c(WIDTH as usize)], Access::Read),
            tensor("block_table", ElemType::I32, vec![c(SEQUENCES), c(BLOCKS)], Access::Read),
            tensor("out", ElemType::Bf16, vec![c(SEQUENCES), c(BLOCKS * PAGE_ROWS as usize), c(WIDTH as usize)], Access::Write),
        ],
        grid: [c(SEQUENCES), c(1), c(1)],
        warps: 1,
        tiles,
        barriers: Vec::new(),
        schedule: Schedule { block_m: PAGE_ROWS, block_n: WIDTH, block_k: WIDTH, warps: 1, stages: 1 },
        ctas_per_sm: 1,
        body,
    }
}

fn errors(kernel: &KernelFn) -> Vec<String> {
    kernel.verify().expect_err("the broken kernel must not verify")
}

#[test]
fn a_paged_gather_reads_the_pages_its_block_table_names() {
    let kernel = paged_gather();
    kernel.verify().unwrap_or_else(|errors| panic!("{}", errors.join("\n")));
    let mut rng = XorShift64Star::new(7);
    let page_len = (PAGE_ROWS * WIDTH) as usize;
    // bf16-exact values, so that the copy through a bf16 tile is exact.
    let pool: Vec<f64> = (0..POOL_PAGES * page_len).map(|_| (rng.range(0, 512) as f64 - 256.0) / 64.0).collect();
    // Pages out of order, one of them shared by both sequences.
    let table = [[4, 0, 2], [1, 2, 3]];
    let mut buffers = Buffers::new();
    buffers.insert("pool".into(), pool.clone());
    buffers.insert("block_table".into(), table.iter().flatten().map(|&p| p as f64).collect());
    buffers.insert("out".into(), vec![f64::NAN; SEQUENCES * BLOCKS * page_len]);
    run_kernel(&kernel, &mut buffers, launch_sizes(1, 1), Rounding::Storage).expect("runs");
    for (b, row) in table.iter().enumerate() {
        for (j, &p) in row.iter().enumerate() {
            let got = &buffers["out"][(b * BLOCKS + j) * page_len..][..page_len];
            assert_eq!(got, &pool[p * page_len..][..page_len], "sequence {b}, block {j} (page {p})");
        }
    }
}

#[test]
fn a_block_table_entry_outside_the_pool_is_an_error_in_the_interpreter() {
    let kernel = paged_gather();
    let page_len = (PAGE_ROWS * WIDTH) as usize;
    let mut buffers = Buffers::new();
    buffers.insert("pool".into(), vec![0.0; POOL_PAGES * page_len]);
    buffers.insert("block_table".into(), vec![0.0, 1.0, POOL_PAGES as f64, 0.0, 1.0, 2.0]);
    buffers.insert("out".into(), vec![0.0; SEQUENCES * BLOCKS * page_len]);
    let error = run_kernel(&kernel, &mut buffers, launch_sizes(1, 1), Rounding::Storage).expect_err("page 5 of 5");
    assert!(error.contains("index 5 outside dimension 5 of pool"), "{error}");
}

#[test]
fn index_tensors_are_never_boxes_tiles_or_floats() {
    let mut tile = paged_gather();
    tile.tiles[0].ty.elem = ElemType::I32;
    assert!(errors(&tile).iter().any(|e| e.contains("tile %page_s: i32 is for index tensors")), "{:?}", errors(&tile));

    let mut boxed = paged_gather();
    let Stmt::For { body, .. } = &mut boxed.body[1] else { panic!("the page loop") };
    let Stmt::Copy { src, .. } = &mut body[1] else { panic!("the page copy") };
    src.param = "block_table".into();
    src.dims = vec![GlobalDim::At(Expr::Int(0)), GlobalDim::Span { start: Expr::Int(0), len: PAGE_ROWS, valid: None }];
    assert!(
        errors(&boxed).iter().any(|e| e.contains("block_table is an i32 index tensor: read it element by element")),
        "{:?}",
        errors(&boxed)
    );

    let mut as_float = paged_gather();
    let Stmt::For { body, .. } = &mut as_float.body[1] else { panic!("the page loop") };
    body.insert(0, Stmt::Let { var: "half".into(), value: Expr::global("block_table", vec![Expr::Int(0), Expr::Int(0)]) * Expr::Float(0.5) });
    assert!(errors(&as_float).iter().any(|e| e.contains("mixes I32 and F32")), "{:?}", errors(&as_float));
}

#[test]
fn a_paged_gather_lowers_to_an_i32_load_and_assembles() {
    let kernel = paged_gather();
    let lowered = ccc::codegen::lower::lower_kernels(&kernel.name, std::slice::from_ref(&kernel)).expect("lowers");
    assert!(
        lowered.ptx.lines().any(|line| line.contains("ld.global") && (line.contains(".u32") || line.contains(".b32") || line.contains(".s32"))),
        "no 32-bit global load of the block table:\n{}",
        lowered.ptx
    );
    ccc::codegen::ptxas::assemble(&lowered.ptx).unwrap_or_else(|error| panic!("{error}"));
}
