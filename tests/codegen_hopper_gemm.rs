//! The wgmma projection GEMM (codegen::hopper::gemm): the kernels of ZAYA1's and MHA's
//! projections assemble for sm_90a without spills or ptxas-inserted wgmma fences, with the
//! instruction counts the schedule implies, and bad configurations are refused.
//! `CCC_HOPPER_PTX_OUT=DIR` also writes each kernel's PTX and `gemms.json` for
//! bench/hopper_gemm.py (the GPU check and benchmark).
#![cfg(feature = "llvm")]

use std::process::Command;

use ccc::codegen::hopper::gemm::{GemmSegment, HopperGemmConfig, emit_gemm_wgmma};
use ccc::codegen::{CodegenError, Elem, ParamKind, PtxModule, ptxas};
use ccc::ir::size::SizeExpr;
use inkwell::context::Context;

fn segment(weight: &str, bias: Option<&str>, cols: u32, dest: &str, dest_width: u32, dest_col: u32, row_shift: u32) -> GemmSegment {
    GemmSegment {
        weight: weight.into(),
        bias: bias.map(Into::into),
        cols,
        dest: dest.into(),
        dest_width,
        dest_col,
        row_shift,
    }
}

fn pointers(names: &[&str]) -> Vec<ParamKind> {
    let mut params: Vec<ParamKind> = names.iter().map(|name| ParamKind::GlobalPointer(name.to_string())).collect();
    params.push(ParamKind::Size("B".into()));
    params.push(ParamKind::Size("S".into()));
    params
}

/// ZAYA1's qkv_proj: q0 | k0 into p0, current and delayed value heads into v.
fn zaya1_qkv(block_n: u32, stages: u32) -> HopperGemmConfig {
    HopperGemmConfig {
        name: format!("gemm_zaya1_qkv_n{block_n}_s{stages}"),
        elem: Elem::Bf16,
        params: pointers(&["x", "wq", "wk", "wv1", "wv2", "p0", "v"]),
        a: "x".into(),
        k: 2048,
        segments: vec![
            segment("wq", None, 1024, "p0", 1280, 0, 0),
            segment("wk", None, 256, "p0", 1280, 1024, 0),
            segment("wv1", None, 128, "v", 256, 0, 0),
            segment("wv2", None, 128, "v", 256, 128, 1),
        ],
        block_n,
        stages,
    }
}

/// An output projection [S, k] · [cols, k]ᵀ with a bias.
fn out_proj(k: u32, cols: u32, block_n: u32, stages: u32) -> HopperGemmConfig {
    HopperGemmConfig {
        name: format!("gemm_out_k{k}_c{cols}_n{block_n}_s{stages}"),
        elem: Elem::Bf16,
        params: pointers(&["o", "w", "bias", "out"]),
        a: "o".into(),
        k,
        segments: vec![segment("w", Some("bias"), cols, "out", cols, 0, 0)],
        block_n,
        stages,
    }
}

/// Awkward shapes for the GPU check: K not a multiple of 64, segments not a multiple of the
/// tile, f16, biases on some segments, a shifted segment.
fn ragged() -> HopperGemmConfig {
    HopperGemmConfig {
        name: "gemm_ragged_f16".into(),
        elem: Elem::F16,
        params: pointers(&["x", "w0", "b0", "w1", "w2", "b2", "y", "z"]),
        a: "x".into(),
        k: 200,
        segments: vec![
            segment("w0", Some("b0"), 96, "y", 160, 0, 0),
            segment("w1", None, 64, "y", 160, 96, 1),
            segment("w2", Some("b2"), 136, "z", 136, 0, 0),
        ],
        block_n: 128,
        stages: 3,
    }
}

fn bench_configs() -> Vec<HopperGemmConfig> {
    vec![
        zaya1_qkv(128, 4),
        zaya1_qkv(128, 5),
        zaya1_qkv(256, 4),
        out_proj(1024, 2048, 128, 4),
        out_proj(1024, 2048, 128, 5),
        out_proj(1024, 2048, 256, 4),
        out_proj(2048, 2048, 256, 4),
        ragged(),
    ]
}

fn emit(config: &HopperGemmConfig) -> (String, ccc::codegen::hopper::gemm::HopperGemmLaunch) {
    let context = Context::create();
    let module = PtxModule::new(&context, &config.name).expect("module");
    let launch = emit_gemm_wgmma(&module, config).expect("emit");
    (module.to_ptx().expect("ptx"), launch)
}

fn ptxas_log(ptx: &str, name: &str) -> String {
    let ptxas = ptxas::find_ptxas().unwrap_or_else(|error| panic!("{error}"));
    let dir = std::env::temp_dir().join(format!("ccc-hopper-gemm-{}-{name}", std::process::id()));
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
fn codegen_hopper_gemm_assembles_without_spills_or_wgmma_serialization() {
    let configs = bench_configs();
    let mut specs = Vec::new();
    for config in &configs {
        let (ptx, launch) = emit(config);
        let tiles = config.column_tiles();
        assert_eq!(launch.threads, 384);
        assert_eq!(launch.grid, [SizeExpr::c(tiles as u64), SizeExpr::seq_len().ceil_div(128), SizeExpr::batch()]);
        let stage_bytes = (128 + config.block_n) * 64 * 2;
        assert_eq!(launch.dynamic_shared_bytes, config.stages * stage_bytes + 2 * config.stages * 8 + 1024);
        // One k-tile of 64: four k16 steps, fenced, committed, and the previous group waited for.
        let kind = config.elem.name();
        let mma = format!("wgmma.mma_async.sync.aligned.m64n{}k16.f32.{kind}.{kind}", config.block_n);
        assert_eq!(ptx.matches(&mma).count(), 4, "{}", config.name);
        assert_eq!(ptx.matches("wgmma.fence.sync.aligned;").count(), 1);
        assert_eq!(ptx.matches("wgmma.wait_group.sync.aligned 1;").count(), 1);
        assert_eq!(ptx.matches("wgmma.wait_group.sync.aligned 0;").count(), 1);
        assert_eq!(ptx.matches("mbarrier.init.shared::cta.b64").count(), 2 * config.stages as usize);
        assert!(ptx.contains("setmaxnreg.inc.sync.aligned.u32 232;"), "{}", config.name);
        assert!(ptx.contains(".maxntid 384"), "{}", config.name);
        let log = ptxas_log(&ptx, &config.name);
        let report = ptxas::parse_report(&log).expect("report").remove(0);
        assert_eq!((report.spill_stores, report.spill_loads, report.stack_frame), (0, 0, 0), "{}: {report:?}", config.name);
        assert!(!log.contains("C75"), "{}: ptxas had to serialize or fence wgmma itself:\n{log}", config.name);
        println!("{} {report:?} smem {} tiles {tiles}", config.name, launch.dynamic_shared_bytes);
        if let Some(dir) = std::env::var_os("CCC_HOPPER_PTX_OUT") {
            std::fs::create_dir_all(&dir).expect("output dir");
            std::fs::write(std::path::Path::new(&dir).join(format!("{}.ptx", config.name)), &ptx).expect("write ptx");
            let params: Vec<String> = config
                .params
                .iter()
                .map(|param| match param {
                    ParamKind::GlobalPointer(name) | ParamKind::Size(name) => name.clone(),
                })
                .collect();
            let segments: Vec<_> = config
                .segments
                .iter()
                .map(|s| {
                    serde_json::json!({"weight": s.weight, "bias": s.bias, "cols": s.cols, "dest": s.dest,
                        "dest_width": s.dest_width, "dest_col": s.dest_col, "row_shift": s.row_shift})
                })
                .collect();
            specs.push(serde_json::json!({
                "name": config.name, "elem": kind, "params": params, "a": config.a, "k": config.k,
                "segments": segments, "block_n": config.block_n, "column_tiles": tiles,
                "threads": launch.threads, "dynamic_shared_bytes": launch.dynamic_shared_bytes,
            }));
        }
    }
    if let Some(dir) = std::env::var_os("CCC_HOPPER_PTX_OUT") {
        std::fs::write(std::path::Path::new(&dir).join("gemms.json"), serde_json::to_string_pretty(&specs).expect("json"))
            .expect("write json");
    }
}

#[test]
fn codegen_hopper_gemm_rejects_bad_configurations() {
    let good = out_proj(1024, 2048, 128, 4);
    let bad = [
        HopperGemmConfig { elem: Elem::F32, ..good.clone() },
        HopperGemmConfig { k: 1020, ..good.clone() },
        HopperGemmConfig { block_n: 260, ..good.clone() },
        HopperGemmConfig { stages: 2, ..good.clone() },
        HopperGemmConfig { stages: 6, block_n: 256, ..good.clone() },
        HopperGemmConfig { a: "x".into(), ..good.clone() },
        HopperGemmConfig { segments: vec![segment("w", None, 2048, "out", 2000, 0, 0)], ..good.clone() },
        HopperGemmConfig { segments: Vec::new(), ..good.clone() },
        HopperGemmConfig { params: pointers(&["o", "w", "bias", "out"])[..4].to_vec(), ..good.clone() },
    ];
    for config in bad {
        let context = Context::create();
        let module = PtxModule::new(&context, "bad").expect("module");
        assert!(matches!(emit_gemm_wgmma(&module, &config), Err(CodegenError::Unsupported(_))), "{config:?}");
    }
}
