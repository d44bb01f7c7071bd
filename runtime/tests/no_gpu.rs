//! What a machine without an NVIDIA driver sees: clear errors and a distinct exit code, never a
//! panic. These tests assert the no-driver behaviour only where libcuda is absent (the CPU build
//! machine); on a GPU machine the GPU tests in gpu.rs cover the same calls.

mod common;

use ccc_runtime::{Library, RuntimeError, read_library};
use common::{culib_present, write_fixture};

const NO_DRIVER: &str = "no CUDA driver: libcuda could not be loaded on this machine; \
                         run on a machine with an NVIDIA GPU and its driver installed";

#[test]
fn library_files_are_read_and_checked_without_a_gpu() {
    let dir = write_fixture("no-gpu-read");
    let (manifest, ptx) = read_library(&dir).unwrap();
    assert_eq!(manifest, common::fixture_manifest());
    assert!(ptx.contains(".visible .entry fixture_add_diagonal("));
    std::fs::write(dir.join("manifest.json"), "{\"schema_version\": 7}").unwrap();
    let err = read_library(&dir).unwrap_err();
    assert!(matches!(err, RuntimeError::Manifest { .. }));
    assert!(
        err.to_string().ends_with(
            "manifest.json: unknown manifest schema version 7: this build reads version 1"
        ),
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
