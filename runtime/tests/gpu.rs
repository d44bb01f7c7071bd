//! GPU tests: `cargo test -p ccc-runtime -- --ignored` on a machine with an NVIDIA GPU
//! (docs/gpu-tests.md). The fixture's PTX is also assembled with ptxas here when it is available,
//! so a broken fixture is caught before it reaches the GPU.

mod common;

use ccc::manifest::{BufferRole, TensorDType};
use ccc_runtime::{HostTensor, Library, RuntimeError, WeightSet};
use common::{
    FIXTURE_PTX, WeightList, fixture_manifest, fixture_weight_list, weight_entries, write_fixture,
};
use half::bf16;
use std::process::Command;

/// Weights whose diagonal of o_proj.weight is distinct per column, all exact in bf16.
fn fixture_weights() -> (WeightList, WeightSet) {
    let list = fixture_weight_list(|i| (i % 13) as f64 * 0.125 - 0.75);
    let set = WeightSet::from_f64(&fixture_manifest(), weight_entries(&list)).unwrap();
    (list, set)
}

fn input(batch: usize, seq_len: usize) -> HostTensor {
    let values: Vec<f64> = (0..batch * seq_len * 8)
        .map(|i| ((i * 37) % 101) as f64 / 7.0 - 6.0)
        .collect();
    HostTensor::from_f64(TensorDType::Bf16, vec![batch, seq_len, 8], &values).unwrap()
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn fixture_library_runs_and_matches_host_arithmetic() {
    let library = Library::load(write_fixture("gpu-fixture")).unwrap();
    let (list, weights) = fixture_weights();
    let w_o = &list
        .iter()
        .find(|(n, _, _)| n == "o_proj.weight")
        .unwrap()
        .2;
    for (batch, seq_len) in [(1, 1), (3, 17), (2, 1000)] {
        let x = input(batch, seq_len);
        let outputs = library.forward_host(&x, &weights).unwrap();
        let (role, o) = &outputs["o"];
        assert_eq!(*role, BufferRole::Intermediate);
        let (role, out) = &outputs["out"];
        assert_eq!(*role, BufferRole::Output);
        assert_eq!(out.shape, [batch, seq_len, 8]);
        let x = x.to_f64();
        let (o, out) = (o.to_f64(), out.to_f64());
        for i in 0..x.len() {
            let doubled = bf16::from_f32(2.0 * x[i] as f32);
            assert_eq!(o[i], doubled.to_f64(), "o[{i}] for B={batch} S={seq_len}");
            let e = i % 8;
            let expected = bf16::from_f32(doubled.to_f32() + w_o[e * 9] as f32);
            assert_eq!(
                out[i],
                expected.to_f64(),
                "out[{i}] for B={batch} S={seq_len}"
            );
        }
    }
}

/// The runtime launches a persistent grid with one CTA per SM of the GPU it loaded on: the
/// persistent fixture's 64-thread CTAs write 64·SMs elements of `out` and leave the rest poisoned.
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn a_persistent_grid_launches_one_cta_per_sm_of_the_gpu() {
    let library = Library::load(common::write_library("gpu-persistent", &common::persistent_fixture())).unwrap();
    let sms = library.sms() as usize;
    assert!((1..=1024).contains(&sms), "{sms} SMs");
    let (_, weights) = fixture_weights();
    for seq_len in [8 * sms, 8 * sms + 8] {
        let outputs = library.forward_host(&input(1, seq_len), &weights).unwrap();
        let out = outputs["out"].1.to_f64();
        let written = out.iter().take_while(|v| !v.is_nan()).count();
        assert_eq!(written, 64 * sms, "S={seq_len} on {sms} SMs");
        assert!(out[written..].iter().all(|v| v.is_nan()), "S={seq_len}: writes past 64·SMs");
    }
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn device_side_checks_and_timing() {
    let library = Library::load(write_fixture("gpu-checks")).unwrap();
    let (_, weights) = fixture_weights();
    let err = library.forward_host(
        &HostTensor::from_f64(TensorDType::Bf16, vec![2, 3, 9], &[0.0; 54]).unwrap(),
        &weights,
    );
    assert_eq!(
        err.unwrap_err().to_string(),
        "tensor `x`: expected bf16 [B, S, 8], got bf16 [2, 3, 9]"
    );
    let x = library.upload(&input(2, 64)).unwrap();
    let device_weights = library.upload_weights(&weights).unwrap();
    let times = library.time_forward(&x, &device_weights, 2, 5).unwrap();
    assert_eq!(times.len(), 5);
    assert!(times.iter().all(|t| t.is_finite() && *t > 0.0), "{times:?}");
    assert!(!library.device_name().unwrap().is_empty());
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn missing_kernel_symbol_is_named() {
    let dir = write_fixture("gpu-missing-symbol");
    let ptx = FIXTURE_PTX.replace("fixture_add_diagonal", "fixture_renamed");
    std::fs::write(dir.join("fixture.ptx"), ptx).unwrap();
    let err = Library::load(&dir).err().unwrap();
    assert!(matches!(err, RuntimeError::Driver { .. }));
    assert!(
        err.to_string()
            .starts_with("CUDA error while resolving kernel `fixture_add_diagonal`"),
        "{err}"
    );
}

#[test]
#[ignore = "needs an NVIDIA GPU"]
fn ccc_run_bench_runs_the_fixture() {
    let dir = write_fixture("gpu-cli");
    let output = common::ccc_run()
        .args([
            "bench",
            "--batch",
            "2",
            "--seq-len",
            "128",
            "--iterations",
            "5",
        ])
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("B=2 S=128: median"), "{stdout}");
}

/// Assembles the fixture with ptxas for sm_90a (CCC_PTXAS, or the project's .venv).
#[test]
fn fixture_ptx_assembles_for_sm_90a() {
    let ptxas = std::env::var("CCC_PTXAS")
        .ok()
        .filter(|p| !p.is_empty())
        .or_else(|| {
            let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.venv/lib");
            std::fs::read_dir(venv)
                .ok()?
                .flatten()
                .map(|d| d.path().join("site-packages/nvidia/cu13/bin/ptxas"))
                .find(|p| p.exists())
                .map(|p| p.display().to_string())
        });
    let Some(ptxas) = ptxas else {
        eprintln!("no ptxas (set CCC_PTXAS or run scripts/setup.sh): fixture PTX not assembled");
        return;
    };
    let dir = write_fixture("ptxas-fixture");
    let output = Command::new(&ptxas)
        .args(["-arch=sm_90a", "-v", "-o"])
        .arg(dir.join("fixture.cubin"))
        .arg(dir.join("fixture.ptx"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "ptxas failed:\n{stderr}");
    assert!(
        stderr.contains("fixture_double") && stderr.contains("fixture_add_diagonal"),
        "{stderr}"
    );
}
