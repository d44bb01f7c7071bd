//! What a machine without an NVIDIA driver sees: clear errors and a distinct exit code, never a
//! panic. These tests assert the no-driver behaviour only where libcuda is absent (the CPU build
//! machine); on a GPU machine the GPU tests in gpu.rs cover the same calls.

mod common;

use ccc::manifest::SCHEMA_VERSION;
use ccc_runtime::{Library, RuntimeError, read_library};
use common::{culib_present, write_fixture};

const NO_DRIVER: &str = "no CUDA driver: libcuda could not be loaded on this machine; \
                         run on a machine with an NVIDIA GPU and its driver installed";

#[test]
fn library_files_are_read_and_checked_without_a_gpu() {
    let dir = write_fixture("no-gpu-read");
    let (manifest, code) = read_library(&dir).unwrap();
    assert_eq!(manifest, common::fixture_manifest());
    assert!(code.ptx.contains(".visible .entry fixture_add_diagonal("));
    assert!(code.cubin.is_none());
    // A cubin the manifest names is read with it; a missing one, or one outside the library's
    // directory, is an error naming it.
    let mut with_cubin = manifest.clone();
    with_cubin.cubin_file = Some("fixture.cubin".into());
    std::fs::write(dir.join("manifest.json"), with_cubin.to_json()).unwrap();
    let err = read_library(&dir).unwrap_err().to_string();
    assert!(err.contains("fixture.cubin: "), "{err}");
    std::fs::write(dir.join("fixture.cubin"), b"\x7fELF").unwrap();
    assert_eq!(read_library(&dir).unwrap().1.cubin.as_deref(), Some(&b"\x7fELF"[..]));
    with_cubin.cubin_file = Some("../fixture.cubin".into());
    std::fs::write(dir.join("manifest.json"), with_cubin.to_json()).unwrap();
    let err = read_library(&dir).unwrap_err().to_string();
    assert!(err.ends_with("cubin_file `../fixture.cubin` must be a relative path inside the library directory"), "{err}");
    std::fs::write(dir.join("manifest.json"), "{\"schema_version\": 7}").unwrap();
    let err = read_library(&dir).unwrap_err();
    assert!(matches!(err, RuntimeError::Manifest { .. }));
    assert!(
        err.to_string().ends_with(&format!(
            "manifest.json: unknown manifest schema version 7: this build reads version {SCHEMA_VERSION}"
        )),
        "{err}"
    );
    let err = read_library(&dir.join("absent")).unwrap_err().to_string();
    assert!(err.contains("absent/manifest.json: "), "{err}");
}

#[test]
fn load_without_driver_says_so() {
    if culib_present() {
        eprintln!("libcuda is present: the no-driver path is not reachable here");
        return;
    }
    let dir = write_fixture("no-gpu-load");
    let err = Library::load(&dir).err().expect("no driver, so no library");
    assert!(err.is_no_gpu());
    assert_eq!(err.to_string(), NO_DRIVER);
}

#[test]
fn ccc_run_without_driver_exits_with_code_3() {
    if culib_present() {
        eprintln!("libcuda is present: the no-driver path is not reachable here");
        return;
    }
    let dir = write_fixture("no-gpu-cli");
    for args in [
        vec!["validate", "--batch", "1,3", "--seq-len", "17"],
        vec!["bench", "--batch", "1", "--seq-len", "8"],
    ] {
        let output = common::ccc_run().args(&args).arg(&dir).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(3), "{args:?}: {stderr}");
        assert_eq!(stderr.trim_end(), format!("ccc-run: {NO_DRIVER}"));
    }
}

#[test]
fn ccc_run_reports_a_broken_library_before_looking_for_a_gpu() {
    let dir = write_fixture("no-gpu-broken");
    std::fs::remove_file(dir.join("fixture.ptx")).unwrap();
    let output = common::ccc_run()
        .arg("validate")
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.starts_with("ccc-run: ") && stderr.contains("fixture.ptx: No such file"),
        "{stderr}"
    );
}

#[test]
fn ccc_run_plan_shows_a_call_without_a_gpu() {
    let dir = write_fixture("no-gpu-plan");
    let output = common::ccc_run()
        .args(["plan", "--batch", "3", "--seq-len", "17"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    insta::assert_snapshot!(String::from_utf8_lossy(&output.stdout));
}

#[test]
fn ccc_run_plan_of_a_persistent_grid_takes_the_sm_count() {
    let dir = common::write_library("no-gpu-persistent", &common::persistent_fixture());
    let plan = |sms: &[&str]| {
        common::ccc_run().args(["plan", "--batch", "3", "--seq-len", "17"]).args(sms).arg(&dir).output().unwrap()
    };
    let output = plan(&["--sms", "5"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("forward for B=3 S=17 on 5 SMs"), "{stdout}");
    assert!(stdout.contains("fixture_add_diagonal<<<(5, 1, 1), (64, 1, 1), 65536 B>>>(o, o_proj.weight, out, 3, 17)"), "{stdout}");
    let output = plan(&[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("kernel `fixture_add_diagonal`: grid dimension 0 = SMs needs SMs, the device's SM count, which is not given"),
        "{stderr}"
    );
}

#[test]
fn ccc_run_plan_into_a_closed_pipe_ends_quietly() {
    let dir = write_fixture("no-gpu-pipe");
    let mut child = common::ccc_run()
        .args(["plan", "--batch", "3", "--seq-len", "17"])
        .arg(&dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Close the reading end before the first line is written, as `| head -0` would.
    drop(child.stdout.take());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// A tuning directory as `ccc tune -o` writes it, with the fixture library as the one candidate
/// of `kernel`, and the index's fingerprint `fingerprint`.
fn write_tuning_dir(name: &str, kernel: &str, fingerprint: &str) -> std::path::PathBuf {
    use ccc::tuning::{INDEX_FILE, INDEX_FORMAT, IndexCandidate, IndexKernel, TileChoice, TuneIndex};
    let dir = common::scratch_dir(name);
    let library = write_fixture(&format!("{name}-library"));
    let candidate_dir = dir.join(kernel).join("1");
    std::fs::create_dir_all(&candidate_dir).unwrap();
    for file in ["manifest.json", "fixture.ptx"] {
        std::fs::copy(library.join(file), candidate_dir.join(file)).unwrap();
    }
    let index = TuneIndex {
        format: INDEX_FORMAT.to_string(),
        layer: "fixture".to_string(),
        spec_fingerprint: fingerprint.to_string(),
        batch: 1,
        seq_len: 8,
        kernels: vec![IndexKernel {
            kernel: kernel.to_string(),
            candidates: vec![IndexCandidate {
                rank: 1,
                library: format!("{kernel}/1"),
                tiles: TileChoice::Gemm { block_n: 128, stages: 4, schedule: "PingPong".to_string(), loads: "Tma".to_string() },
                estimate_us: 1.0,
            }],
        }],
    };
    std::fs::write(dir.join(INDEX_FILE), serde_json::to_string_pretty(&index).unwrap()).unwrap();
    dir
}

fn ccc_run_tune(dir: &std::path::Path) -> (Option<i32>, String) {
    let output = common::ccc_run()
        .args(["tune", "--batch", "1", "--seq-len", "8"])
        .arg(dir)
        .output()
        .unwrap();
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn ccc_run_tune_checks_the_candidates_before_looking_for_a_gpu() {
    let fingerprint = ccc::tuning::spec_fingerprint(&common::fixture_spec());
    // A sound tuning directory gets as far as the GPU.
    let dir = write_tuning_dir("tune-sound", "fixture_add_diagonal", &fingerprint);
    let (code, stderr) = ccc_run_tune(&dir);
    if !culib_present() {
        assert_eq!(code, Some(3), "{stderr}");
        assert_eq!(stderr.trim_end(), format!("ccc-run: {NO_DRIVER}"));
    }
    // A library of another spec than the index's.
    let dir = write_tuning_dir("tune-other-spec", "fixture_add_diagonal", "0123abcd");
    let (code, stderr) = ccc_run_tune(&dir);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.trim_end().ends_with("manifest.json: this library is not layer `fixture` of the index (its spec differs)"),
        "{stderr}"
    );
    // A kernel the candidate library does not have.
    let dir = write_tuning_dir("tune-unknown-kernel", "fixture_attention", &fingerprint);
    let (code, stderr) = ccc_run_tune(&dir);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.trim_end().ends_with("manifest.json: this library has no kernel `fixture_attention`"), "{stderr}");
    // No index, or not one.
    let empty = common::scratch_dir("tune-empty");
    let (code, stderr) = ccc_run_tune(&empty);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("tune-index.json: No such file"), "{stderr}");
    assert!(stderr.contains("a directory written by `ccc tune -o`?"), "{stderr}");
    std::fs::write(empty.join("tune-index.json"), "{\"format\": \"ccc-tune-index/9\"}").unwrap();
    let (code, stderr) = ccc_run_tune(&empty);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("is not a tuning index"), "{stderr}");
}

#[test]
fn ccc_run_says_its_version() {
    let output = common::ccc_run().arg("--version").output().unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim_end(), format!("ccc-run {}", env!("CARGO_PKG_VERSION")));
}
