//! What `ccc compile FILE --emit STAGE` prints for every example layer, as insta snapshots named
//! `<example>_<stage>`, run in-process through `ccc::cli::run` so the snapshots hold exactly the
//! command's stdout. A change to any stage's printer or lowering shows up here as a reviewed diff.

use ccc::cli::{Io, Status, run};

/// Runs `ccc ARGS` in-process and returns its stdout; fails on any other status or on stderr.
fn ccc_stdout(args: &[&str]) -> String {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut io = Io {
        stdout: &mut stdout,
        stderr: &mut stderr,
        stderr_is_terminal: false,
    };
    let status = run(std::iter::once("ccc").chain(args.iter().copied()), &mut io);
    let stderr = String::from_utf8(stderr).unwrap();
    assert_eq!(status, Status::Success, "ccc {args:?}: {stderr}");
    assert_eq!(stderr, "", "ccc {args:?}");
    String::from_utf8(stdout).unwrap()
}

/// Every `examples/*.attn` as (file stem, path), sorted by name.
fn examples() -> Vec<(String, String)> {
    let directory = format!("{}/examples", env!("CARGO_MANIFEST_DIR"));
    let mut examples: Vec<(String, String)> = std::fs::read_dir(&directory)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "attn"))
        .map(|path| {
            let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
            (stem, path.display().to_string())
        })
        .collect();
    examples.sort();
    assert!(
        examples.len() >= 7,
        "examples/*.attn: found only {examples:?}"
    );
    examples
}

#[test]
fn emitted_stages_of_every_example() {
    for (name, path) in examples() {
        for stage in ["graph", "plan", "kernel"] {
            let text = ccc_stdout(&["compile", &path, "--emit", stage]);
            insta::assert_snapshot!(format!("{name}_{stage}"), text);
        }
    }
}

#[test]
fn zaya1_graph_after_every_pass() {
    let path = format!("{}/examples/zaya1.attn", env!("CARGO_MANIFEST_DIR"));
    let text = ccc_stdout(&["compile", &path, "--emit", "graph", "--print-after-all"]);
    insta::assert_snapshot!("zaya1_graph_print_after_all", text);
}
