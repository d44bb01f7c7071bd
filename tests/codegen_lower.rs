//! Kernel IR → PTX: the forward kernels of every example and of random specs lower, assemble
//! with ptxas for sm_90a and spill nothing; a tiny spec's kernels are snapshotted.
#![cfg(feature = "llvm")]

mod common;

use ccc::codegen::lower::{LoweredModule, lower_kernels};
use ccc::codegen::ptxas::{self, PtxasReport};
use ccc::codegen::CodegenError;
use ccc::ir::kernel::{ForwardKernel, KernelFn, Schedule, Stmt, build_forward, forward_kernels};
use ccc::spec::*;
use common::rng::XorShift64Star;
use common::specs::example_files;

fn lower_spec(spec: &AttentionSpec) -> (Vec<KernelFn>, LoweredModule) {
    let kernels = forward_kernels(spec).unwrap_or_else(|error| panic!("{}: {error}", spec.name));
    let lowered = lower_kernels(&spec.name, &kernels).unwrap_or_else(|error| panic!("{}: {error}", spec.name));
    (kernels, lowered)
}

/// Assembles the module (a ptxas error fails the test); returns the reports in kernel order.
fn assemble(spec: &AttentionSpec, lowered: &LoweredModule) -> Vec<PtxasReport> {
    let reports = ptxas::assemble(&lowered.ptx).unwrap_or_else(|error| panic!("{}: ptxas: {error}", spec.name));
    lowered
        .kernels
        .iter()
        .map(|kernel| {
            reports
                .iter()
                .find(|r| r.kernel == kernel.symbol)
                .unwrap_or_else(|| panic!("ptxas reported nothing for {}", kernel.symbol))
                .clone()
        })
        .collect()
}

fn spills(report: &PtxasReport) -> bool {
    report.spill_stores > 0 || report.spill_loads > 0 || report.stack_frame > 0
}

/// [`assemble`], failing on any spill.
fn assemble_clean(spec: &AttentionSpec, lowered: &LoweredModule) -> Vec<PtxasReport> {
    let reports = assemble(spec, lowered);
    for report in &reports {
        assert!(!spills(report), "{} spills: {report:?}", report.kernel);
    }
    reports
}

#[test]
fn codegen_lower_examples_assemble_without_spills() {
    let mut table = String::from("kernel                          threads  dyn smem B  registers  spills\n");
    let mut spilling = Vec::new();
    for spec in example_files() {
        let (_, lowered) = lower_spec(&spec);
        assert_eq!(lowered.kernels.len(), ForwardKernel::launched_by(&spec).len());
        let reports = assemble(&spec, &lowered);
        spilling.extend(reports.iter().filter(|r| spills(r)).cloned());
        for (kernel, report) in lowered.kernels.iter().zip(&reports) {
            table.push_str(&format!(
                "{:<32}{:>7}{:>12}{:>11}{:>8}\n",
                kernel.symbol,
                kernel.threads,
                kernel.dynamic_shared_bytes,
                report.registers,
                report.spill_stores + report.spill_loads
            ));
            assert!(kernel.dynamic_shared_bytes as usize <= ccc::ir::kernel::SHARED_MEMORY_LIMIT_BYTES);
        }
    }
    println!("{table}");
    assert!(spilling.is_empty(), "kernels spill: {spilling:#?}");
}

/// The PTX of each `.entry` of a module, by symbol.
fn entries(ptx: &str) -> Vec<(String, String)> {
    ptx.split(".entry ")
        .skip(1)
        .map(|text| (text.split('(').next().unwrap_or_default().trim().to_string(), text.to_string()))
        .collect()
}

#[test]
fn codegen_libraries_take_projections_and_attention_from_the_hopper_path() {
    for spec in example_files() {
        let lowered = ccc::driver::lowered(&spec).unwrap_or_else(|error| panic!("{error}"));
        for (symbol, text) in entries(&lowered.ptx) {
            let wgmma = text.contains("wgmma.mma_async");
            let kernel = ccc::driver::kernels(&spec).unwrap().into_iter().find(|k| k.name == symbol).unwrap();
            let expected = if symbol.ends_with("_attention") {
                // The warp-specialized kernel, or the tiled one with swizzled operands.
                let swizzled = kernel.tiles.iter().any(|tile| tile.ty.layout == ccc::ir::kernel::Layout::Swizzled128B);
                ccc::driver::uses_wgmma_attention(&spec) || swizzled
            } else if symbol.ends_with("_qkv_proj") || symbol.ends_with("_out_proj") {
                ccc::driver::uses_wgmma_projection(&spec)
            } else {
                // The prologue's per-head convolutions are mma.sync (its GEMMs are small).
                false
            };
            assert_eq!(wgmma, expected, "{symbol}: wgmma {wgmma}");
        }
        assemble_clean(&spec, &lowered);
    }
}

/// A random valid spec over the whole language: d in {16, 32, 64, 128}, conv stages, masks
/// (sliding windows too), q-k mean, value shift, norms, rope styles, bias, f16/bf16.
fn random_spec(rng: &mut XorShift64Star, index: usize) -> AttentionSpec {
    let d = rng.pick(&[16, 32, 64, 128]);
    let kv_heads = rng.range(1, 3);
    let groups = rng.range(1, 3);
    let model_dim = d * rng.range(1, 4);
    let mut spec = AttentionSpec::plain(&format!("random{index}"), model_dim, d, kv_heads * groups, kv_heads);
    spec.qk_conv = (0..rng.range(0, 2))
        .map(|_| ConvStage {
            kind: if rng.coin() { ConvKind::Depthwise } else { ConvKind::PerHead },
            width: rng.range(1, 4),
        })
        .collect();
    spec.qk_mean = rng.coin();
    spec.value_shift = rng.range(0, kv_heads);
    if rng.coin() {
        spec.qk_norm = QkNorm::L2;
        spec.key_temperature =
            rng.pick(&[KeyTemperature::None, KeyTemperature::Learned, KeyTemperature::LearnedExp]);
    }
    if rng.range(0, 3) > 0 {
        let rotary_dim = 2 * rng.range(1, d / 2);
        spec.rope = Some(Rope {
            fraction: rotary_dim as f64 / d as f64,
            rotary_dim,
            theta: rng.pick(&[100.0, 10_000.0, 5e6]),
            style: if rng.coin() { RopeStyle::Neox } else { RopeStyle::Interleaved },
            yarn: None,
        });
    }
    spec.mask = match rng.range(0, 3) {
        0 => Mask::None,
        1 => Mask::Causal,
        _ => Mask::SlidingWindow { window: rng.pick(&[1, 7, 64, 100, 4096]) },
    };
    spec.dtype = if rng.coin() { DType::Bf16 } else { DType::F16 };
    spec.bias = rng.coin();
    spec.validate().expect("the generator only builds valid specs");
    spec
}

#[test]
fn codegen_lower_random_specs_assemble_without_spills() {
    let mut rng = XorShift64Star::new(4);
    let mut lowered_count = 0;
    for index in 0..32 {
        let spec = random_spec(&mut rng, index);
        let Ok(kernels) = forward_kernels(&spec) else {
            // The kernel IR builders reject a few schedules (reported by their own tests).
            continue;
        };
        let lowered = lower_kernels(&spec.name, &kernels).unwrap_or_else(|error| panic!("{spec:?}: {error}"));
        assemble_clean(&spec, &lowered);
        lowered_count += 1;
    }
    assert!(lowered_count >= 30, "only {lowered_count} of 32 random specs built kernels");
}

/// The libraries of random specs (the Hopper kernels included: projection GEMMs with segments of
/// every width, biases and row shifts; the wgmma attention) assemble without spills: ptxas as
/// `ccc compile --ptxas` runs it, which fails on any spill.
#[test]
fn codegen_random_spec_libraries_assemble_without_spills() {
    let mut rng = XorShift64Star::new(11);
    let options = ccc::driver::CompileOptions { cache: None, ptxas: true, ..Default::default() };
    let mut compiled = 0;
    for index in 0..24 {
        let mut spec = random_spec(&mut rng, index);
        // Wider layers too, where every projection segment is a multiple of 256 columns.
        if index % 2 == 1 {
            spec.model_dim = spec.head_dim * 8;
            spec.validate().expect("a wider layer is still valid");
        }
        if ccc::driver::kernels(&spec).is_err() {
            // The kernel IR builders reject a few schedules (reported by their own tests).
            continue;
        }
        ccc::driver::compile_library(&spec, &options).unwrap_or_else(|error| panic!("{spec:?}: {error}"));
        compiled += 1;
    }
    assert!(compiled >= 22, "only {compiled} of 24 random specs compiled");
}

fn tiny_spec() -> AttentionSpec {
    let mut spec = AttentionSpec::plain("tiny", 32, 16, 2, 1);
    spec.rope = Some(Rope { fraction: 1.0, rotary_dim: 16, theta: 10_000.0, style: RopeStyle::Neox, yarn: None });
    spec.qk_norm = QkNorm::L2;
    spec.mask = Mask::SlidingWindow { window: 8 };
    spec.validate().unwrap();
    spec
}

/// The LLVM IR and PTX of one kernel of a plain causal spec with d = 16, E = 32, with one warp
/// on 16×16 tiles: the smallest kernels of each kind, to keep the snapshots reviewable.
fn lowered_alone(which: ForwardKernel) -> LoweredModule {
    let spec = AttentionSpec::plain("tiny", 32, 16, 2, 1);
    let schedule = Schedule { block_m: 16, block_n: 16, block_k: 16, warps: 1, stages: 2 };
    let kernel = build_forward(&spec, which, &schedule).unwrap();
    let lowered = lower_kernels("tiny", &[kernel]).unwrap();
    assemble_clean(&spec, &lowered);
    lowered
}

#[test]
fn codegen_lower_snapshot_qkv_proj() {
    let lowered = lowered_alone(ForwardKernel::QkvProjection);
    insta::assert_snapshot!("tiny_qkv_proj_llvm_ir", lowered.llvm_ir);
    insta::assert_snapshot!("tiny_qkv_proj_ptx", lowered.ptx);
}

#[test]
fn codegen_lower_snapshot_attention() {
    let lowered = lowered_alone(ForwardKernel::Attention);
    insta::assert_snapshot!("tiny_attention_llvm_ir", lowered.llvm_ir);
    insta::assert_snapshot!("tiny_attention_ptx", lowered.ptx);
}

#[test]
fn codegen_lower_snapshot_out_proj() {
    let lowered = lowered_alone(ForwardKernel::OutputProjection);
    insta::assert_snapshot!("tiny_out_proj_llvm_ir", lowered.llvm_ir);
    insta::assert_snapshot!("tiny_out_proj_ptx", lowered.ptx);
}

#[test]
fn codegen_lower_reports_launch_facts_in_abi_order() {
    let spec = tiny_spec();
    let (kernels, lowered) = lower_spec(&spec);
    for (kernel, fact) in kernels.iter().zip(&lowered.kernels) {
        assert_eq!(fact.symbol, kernel.name);
        assert_eq!(fact.threads, kernel.threads());
        // The launch asks for the kernel IR's placement of its tiles (alignment included), which
        // is at least their sum and less than 128 B more each (the tiny spec has no swizzled ones),
        // plus the words where row reductions across warps meet.
        let sum: usize =
            kernel.tiles.iter().map(|tile| tile.ty.shared_bytes()).sum::<usize>() + kernel.row_reduce_scratch_bytes();
        assert_eq!(fact.dynamic_shared_bytes as usize, kernel.shared_bytes());
        assert!(kernel.shared_bytes() >= sum && kernel.shared_bytes() < sum + 128 * kernel.tiles.len());
        // Parameters appear in the PTX entry in ABI order.
        let entry = lowered.ptx.find(&format!(".entry {}(", kernel.name)).unwrap();
        let params_end = entry + lowered.ptx[entry..].find(')').unwrap();
        let declared = lowered.ptx[entry..params_end].matches(".param").count();
        assert_eq!(declared, kernel.params.len());
    }
}

#[test]
fn codegen_lower_rejects_a_kernel_that_does_not_verify() {
    let spec = tiny_spec();
    let mut kernels = forward_kernels(&spec).unwrap();
    // A cp.async wait without the barrier after it breaks a rule the lowering relies on.
    let index = kernels.iter().position(|k| k.name.ends_with("_attention")).unwrap();
    kernels[index].body.insert(0, Stmt::AsyncWait { pending: 0 });
    match lower_kernels("broken", &kernels[index..index + 1]) {
        Err(CodegenError::Unsupported(message)) => assert!(message.contains("does not verify"), "{message}"),
        other => panic!("expected a verification error, got {other:?}"),
    }
}

/// A compile emits each kernel in an LLVM module of its own, in parallel, and joins the PTX
/// texts: the result must be the one-module text (what `--emit ptx` prints) byte for byte,
/// the Hopper wgmma kernel of an example included.
#[test]
fn codegen_lower_kernels_emitted_apart_join_to_the_one_module_ptx() {
    let zaya1 = example_files().into_iter().find(|spec| spec.name == "zaya1").expect("examples/zaya1.attn");
    for spec in [tiny_spec(), zaya1] {
        let one_module = ccc::driver::lowered(&spec).unwrap_or_else(|error| panic!("{}: {error}", spec.name));
        let library = ccc::driver::compile_library(&spec, &ccc::driver::CompileOptions::default())
            .unwrap_or_else(|error| panic!("{}: {error}", spec.name));
        assert!(library.ptx.matches(".visible .entry ").count() >= 3, "{}", spec.name);
        assert_eq!(library.ptx, one_module.ptx, "{}", spec.name);
    }
}
