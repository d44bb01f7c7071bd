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

/// Prefill and decode from Rust (`Library::prefill`, `Library::decode`) of a library compiled
/// with `emit = [forward, decode]`, named by CCC_GPU_SERVE_LIB (the sweep's `decode` step passes
/// gpu-carry/serve/zaya1/zaya1; unset: skipped): prompts of 0, 5 and 37 tokens in two packed,
/// chunked prefills over a shuffled pool, then three decode steps, against the f64 reference's
/// `prefill_packed` and `decode_step` on the same (bf16-rounded) weights and inputs: relative L2
/// error under 2e-2 per sequence and step (bf16 storage against f64).
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn prefill_and_decode_from_rust_match_the_reference() {
    use ccc::reference::{DecodeState, Tensor, Weights, decode_step};
    let Some(dir) = std::env::var_os("CCC_GPU_SERVE_LIB") else {
        eprintln!("CCC_GPU_SERVE_LIB is not set: skipped");
        return;
    };
    let library = Library::load(&dir).unwrap();
    let spec = library.manifest().spec.clone();
    let round = |values: &[f64]| -> Vec<f64> { HostTensor::from_f64(TensorDType::from(spec.dtype), vec![values.len()], values).unwrap().to_f64() };
    let mut weights = Weights::random(&spec, 5);
    for tensor in weights.tensors.values_mut() {
        tensor.data = round(&tensor.data);
    }
    let entries: Vec<(&str, &[usize], &[f64])> = weights.tensors.iter().map(|(n, t)| (n.as_str(), t.shape.as_slice(), t.data.as_slice())).collect();
    let device_weights = library.upload_weights(&WeightSet::from_f64(library.manifest(), entries).unwrap()).unwrap();
    let (lens, steps, e) = ([0usize, 5, 37], 3usize, spec.model_dim);
    let tokens: Vec<Vec<f64>> = lens.iter().map(|&len| round(&ccc::reference::random_input(&spec, 1, len + steps, 11 + len as u64).data)).collect();
    // The pool: four 16-token pages per sequence (64 tokens), scattered (5 is prime to 14).
    let blocks = 4usize;
    let pages = lens.len() * blocks + 2;
    let table: Vec<f64> = (0..lens.len() * blocks).map(|i| ((i * 5 + 3) % pages) as f64).collect();
    let upload_i32 = |shape: Vec<usize>, values: &[f64]| library.upload(&HostTensor::from_f64(TensorDType::I32, shape, values).unwrap()).unwrap();
    let block_table = upload_i32(vec![lens.len(), blocks], &table);
    let mut cache = library.decode_cache(lens.len(), pages).unwrap();
    let mut states: Vec<DecodeState> = lens.iter().map(|_| DecodeState::new(&spec)).collect();
    let rel_l2 = |got: &[f64], want: &[f64]| {
        let err: f64 = got.iter().zip(want).map(|(g, w)| (g - w) * (g - w)).sum::<f64>().sqrt();
        err / want.iter().map(|w| w * w).sum::<f64>().sqrt().max(1e-30)
    };
    // The prompts in two packed, chunked prefills: the first part of each, then the rest.
    let mut done = vec![0usize; lens.len()];
    for chunk in [lens.map(|len| len / 2 + len % 3), lens.map(|len| len - len / 2 - len % 3)] {
        let mut cu = vec![0usize];
        let mut rows = Vec::new();
        for (b, &n) in chunk.iter().enumerate() {
            rows.extend_from_slice(&tokens[b][done[b] * e..(done[b] + n) * e]);
            cu.push(cu[b] + n);
            done[b] += n;
        }
        let x = library.upload(&HostTensor::from_f64(TensorDType::from(spec.dtype), vec![cu[lens.len()], e], &rows).unwrap()).unwrap();
        let as_f64 = |values: &[usize]| values.iter().map(|&v| v as f64).collect::<Vec<_>>();
        let outputs = library
            .prefill(&x, &device_weights, &mut cache, &upload_i32(vec![lens.len() + 1], &as_f64(&cu)), &block_table, &upload_i32(vec![lens.len()], &as_f64(&done)))
            .unwrap();
        let out = outputs.get("out").unwrap().to_host().unwrap().to_f64();
        let want = ccc::reference::prefill_packed(&spec, &weights, &mut states, &Tensor { shape: vec![cu[lens.len()], e], data: rows }, &cu).unwrap();
        for b in 0..lens.len() {
            let error = rel_l2(&out[cu[b] * e..cu[b + 1] * e], &want.data[cu[b] * e..cu[b + 1] * e]);
            assert!(cu[b] == cu[b + 1] || error < 2e-2, "prefill chunk of sequence {b}: relative L2 {error:e}");
        }
    }
    for step in 0..steps {
        let mut x_step = Vec::new();
        for (b, &len) in lens.iter().enumerate() {
            x_step.extend_from_slice(&tokens[b][(len + step) * e..][..e]);
        }
        let x_step = library.upload(&HostTensor::from_f64(TensorDType::from(spec.dtype), vec![lens.len(), 1, e], &x_step).unwrap()).unwrap();
        let seq_lens: Vec<f64> = lens.iter().map(|&l| (l + step + 1) as f64).collect();
        let outputs = library.decode(&x_step, &device_weights, &mut cache, &block_table, &upload_i32(vec![lens.len()], &seq_lens)).unwrap();
        let out = outputs.get("out").unwrap().to_host().unwrap().to_f64();
        for (b, state) in states.iter_mut().enumerate() {
            let want = decode_step(&spec, &weights, state, &tokens[b][(lens[b] + step) * e..][..e]).unwrap();
            let error = rel_l2(&out[b * e..(b + 1) * e], &want);
            assert!(error < 2e-2, "step {step}, sequence {b} (prompt {}): relative L2 {error:e}", lens[b]);
        }
    }
}
