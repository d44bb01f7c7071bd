//! The `ccc` command line: output and exit statuses (0 success, 1 spec errors, 2 usage), in-process
//! through `ccc::cli::run` and through the built binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use ccc::cli::{Io, Status, run};

fn example(name: &str) -> String {
    format!("{}/examples/{name}.attn", env!("CARGO_MANIFEST_DIR"))
}

/// Runs `ccc ARGS` in-process; returns the status, stdout and stderr.
fn ccc(args: &[&str]) -> (Status, String, String) {
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    let mut io = Io { stdout: &mut stdout, stderr: &mut stderr, stderr_is_terminal: false };
    let status = run(std::iter::once("ccc").chain(args.iter().copied()), &mut io);
    (status, String::from_utf8(stdout).unwrap(), String::from_utf8(stderr).unwrap())
}

/// A fresh directory under the system's temporary directory.
fn scratch(name: &str) -> PathBuf {
    let directory =
        std::env::temp_dir().join(format!("ccc-cli-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).unwrap();
    directory
}

fn write_file(directory: &Path, name: &str, text: &str) -> String {
    let path = directory.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn check_prints_ok_for_every_layer() {
    let (status, stdout, stderr) =
        ccc(&["check", &example("zaya1"), &example("mha"), &example("gqa")]);
    assert_eq!(
        (status, stdout.as_str(), stderr.as_str()),
        (Status::Success, "ok: zaya1\nok: mha\nok: gqa\n", "")
    );
}

#[test]
fn check_reports_every_error_and_exits_1() {
    let directory = scratch("check-errors");
    let bad = write_file(
        &directory,
        "bad.attn",
        "attention a {\n    model_dim = 2048\n    head_dim = 128\n    kv_head = 2\n    mask = causl\n}\n",
    );
    let (status, stdout, stderr) = ccc(&["check", &bad, &example("mha")]);
    assert_eq!(status, Status::SpecErrors);
    assert_eq!(stdout, "ok: mha\n");
    insta::assert_snapshot!("check_errors", stderr.replace(&bad, "bad.attn"));
}

#[test]
fn usage_errors_exit_2() {
    let (status, _, stderr) = ccc(&["check", "/nonexistent/x.attn"]);
    assert_eq!(status, Status::Usage);
    assert!(stderr.starts_with("error: cannot read /nonexistent/x.attn"), "{stderr}");
    // The worst status of the files wins.
    assert_eq!(ccc(&["check", &example("mha"), "/nonexistent/x.attn"]).0, Status::Usage);
    assert_eq!(ccc(&["frobnicate"]).0, Status::Usage);
    assert_eq!(ccc(&["check"]).0, Status::Usage);
    assert_eq!(ccc(&["explain", &example("zaya1"), "--seq-len", "0"]).0, Status::Usage);
    let (status, _, stderr) = ccc(&["compile", &example("zaya1"), "--emit", "sass"]);
    assert_eq!(status, Status::Usage);
    assert!(stderr.contains("possible values: spec, graph, plan, kernel, llvm, ptx"), "{stderr}");
}

#[test]
fn help_goes_to_stdout_and_exits_0() {
    let (status, stdout, _) = ccc(&["--help"]);
    assert_eq!(status, Status::Success);
    for command in ["check", "explain", "compile"] {
        assert!(stdout.contains(command), "{stdout}");
    }
    let (status, stdout, _) = ccc(&["compile", "--help"]);
    assert_eq!(status, Status::Success);
    assert!(stdout.contains("manifest.json + NAME.ptx"), "{stdout}");
}

#[test]
fn explain_zaya1_compares_with_mha() {
    let (status, stdout, stderr) = ccc(&["explain", &example("zaya1")]);
    assert_eq!((status, stderr.as_str()), (Status::Success, ""));
    // language.md's acceptance numbers: 8/2 heads of 128, ~5.6M vs 16.8M parameters,
    // 1024 vs 8192 KV bytes per token (8×).
    assert!(stdout.contains("Hq = 8, Hk = 2, G = 4, d = 128"), "{stdout}");
    let line = |name: &str| {
        stdout
            .lines()
            .find(|line| line.contains(name))
            .unwrap()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(line("parameters").ends_with("5.58M 16.8M 3.01×"), "{stdout}");
    assert!(line("KV cache").ends_with("1024 8192 8.00×"), "{stdout}");
    assert!(line("FLOPs").contains("(S = 16384)"), "tune.seq_len is the default: {stdout}");
    insta::assert_snapshot!("explain_zaya1", stdout);
}

#[test]
fn explain_takes_the_sequence_length_from_the_command_line() {
    let (status, stdout, _) = ccc(&["explain", &example("sliding_window"), "--seq-len", "8192"]);
    assert_eq!(status, Status::Success);
    insta::assert_snapshot!("explain_sliding_window_8192", stdout);
    let (_, stdout, _) = ccc(&["explain", &example("mha")]);
    assert!(stdout.contains("(S = 4096)"), "4096 without tune.seq_len: {stdout}");
}

#[cfg(feature = "llvm")]
#[test]
fn compile_writes_one_library_per_layer() {
    let directory = scratch("compile");
    let source = write_file(
        &directory,
        "two.attn",
        "attention first { model_dim = 256, head_dim = 64 }\nattention second { model_dim = 512, head_dim = 64, kv_heads = 2 }\n",
    );
    let out = directory.join("out");
    let (status, stdout, stderr) =
        ccc(&["compile", &source, "-o", &out.display().to_string(), "--no-cache"]);
    assert_eq!((status, stderr.as_str()), (Status::Success, ""));
    assert_eq!(stdout.lines().count(), 2, "{stdout}");
    let expected =
        ccc::frontend::parse_and_check("two.attn", &std::fs::read_to_string(&source).unwrap())
            .unwrap();
    for spec in expected {
        let library = out.join(&spec.name);
        let json = std::fs::read_to_string(library.join("manifest.json")).unwrap();
        let manifest = ccc::manifest::Manifest::from_json(&json).unwrap();
        let symbols: Vec<String> =
            manifest.entry_points[0].kernels.iter().map(|k| k.symbol.clone()).collect();
        let ptx = std::fs::read_to_string(library.join(&manifest.ptx_file)).unwrap();
        for symbol in &symbols {
            assert!(ptx.contains(&format!(".entry {symbol}(")), "{symbol} missing from the PTX");
        }
        assert_eq!(manifest.spec, spec);
        let launched = ccc::ir::kernel::ForwardKernel::launched_by(&spec);
        assert_eq!(symbols.len(), launched.len());
        // The projections' persistent grids are written as the device's SM count.
        let sms = [ccc::ir::size::SizeExpr::sms(), 1u64.into(), 1u64.into()];
        let persistent: Vec<&str> = manifest.entry_points[0]
            .kernels
            .iter()
            .filter(|k| k.grid == sms)
            .map(|k| k.symbol.as_str())
            .collect();
        assert_eq!(persistent, [format!("{}_qkv_proj", spec.name), format!("{}_out_proj", spec.name)]);
    }
}

/// `--cubin` keeps what ptxas assembled: an sm_90 ELF beside the PTX, named in the manifest,
/// with ptxas's report per kernel; without it no cubin is written or named.
#[cfg(feature = "llvm")]
#[test]
fn compile_with_cubin_writes_the_assembled_library() {
    let directory = scratch("cubin");
    let out = directory.join("out");
    let (status, stdout, stderr) = ccc(&["compile", &example("mha"), "-o", &out.display().to_string(), "--cubin"]);
    assert_eq!((status, stderr.as_str()), (Status::Success, ""));
    assert!(stdout.contains("bytes of cubin)"), "{stdout}");
    let manifest = ccc::manifest::Manifest::from_json(&std::fs::read_to_string(out.join("mha/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest.cubin_file.as_deref(), Some("mha.cubin"));
    assert!(manifest.entry_points.iter().flat_map(|entry| &entry.kernels).all(|kernel| kernel.ptxas.is_some()));
    let cubin = std::fs::read(out.join("mha/mha.cubin")).unwrap();
    assert_eq!(&cubin[..4], b"\x7fELF");
    // e_machine 190: EM_CUDA.
    assert_eq!(u16::from_le_bytes([cubin[18], cubin[19]]), 190);
    let plain = directory.join("plain");
    assert_eq!(ccc(&["compile", &example("mha"), "-o", &plain.display().to_string()]).0, Status::Success);
    let manifest = ccc::manifest::Manifest::from_json(&std::fs::read_to_string(plain.join("mha/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest.cubin_file, None);
    assert!(!plain.join("mha/mha.cubin").exists());
}

#[cfg(feature = "llvm")]
#[test]
fn a_second_compile_reads_the_ptx_cache() {
    let directory = scratch("cache");
    let cache = directory.join("cache");
    let out = directory.join("out").display().to_string();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_ccc"))
            .args(["compile", &example("zaya1"), "-o", &out])
            .env("CCC_CACHE_DIR", &cache)
            .output()
            .unwrap()
    };
    assert!(run().status.success());
    let entries = std::fs::read_dir(&cache).unwrap().count();
    assert_eq!(entries, 1, "one cached module");
    let started = std::time::Instant::now();
    assert!(run().status.success());
    // A hit skips LLVM: the whole second compile is a parse, a few IR builds and two writes.
    assert!(started.elapsed() < std::time::Duration::from_secs(1), "{:?}", started.elapsed());
    assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 1);
}

#[test]
fn compile_emit_spec_prints_the_resolved_spec() {
    let (status, stdout, _) = ccc(&["compile", &example("cca4x"), "--emit", "spec"]);
    assert_eq!(status, Status::Success);
    insta::assert_snapshot!("emit_spec_cca4x", stdout);
}

#[test]
fn colour_is_used_only_when_asked_or_on_a_terminal() {
    let directory = scratch("colour");
    let bad = write_file(&directory, "bad.attn", "attention a { model_dim = 0, head_dim = 128 }");
    let (_, _, plain) = ccc(&["check", &bad]);
    assert!(!plain.contains('\u{1b}'));
    let (_, _, coloured) = ccc(&["--color", "always", "check", &bad]);
    assert!(coloured.contains('\u{1b}'));
}

#[test]
fn the_binary_exits_0_1_and_2() {
    let binary = env!("CARGO_BIN_EXE_ccc");
    let directory = scratch("binary");
    let bad =
        write_file(&directory, "bad.attn", "attention a { model_dim = 2048, head_dim = 100 }");
    let status = |args: &[&str]| Command::new(binary).args(args).output().unwrap();
    let ok = status(&["check", &example("zaya1")]);
    assert_eq!(ok.status.code(), Some(0));
    assert_eq!(String::from_utf8_lossy(&ok.stdout), "ok: zaya1\n");
    let errors = status(&["check", &bad]);
    assert_eq!(errors.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&errors.stderr).contains("not a multiple of head_dim"));
    assert_eq!(status(&["check", "/nonexistent/x.attn"]).status.code(), Some(2));
    assert_eq!(status(&["--no-such-flag"]).status.code(), Some(2));
}

#[test]
fn emit_prints_every_stage_of_every_example() {
    for name in ["zaya1", "mha", "gqa", "mqa", "cca4x", "sliding_window", "encoder"] {
        for stage in ["spec", "graph", "plan", "kernel"] {
            let (status, stdout, stderr) = ccc(&["compile", &example(name), "--emit", stage]);
            assert_eq!((status, stderr.as_str()), (Status::Success, ""), "{name} {stage}");
            assert!(!stdout.is_empty(), "{name} {stage}");
        }
    }
    let (_, plan, _) = ccc(&["compile", &example("zaya1"), "--emit", "plan"]);
    assert!(plan.starts_with("plan @zaya1.forward: 4 kernels\n"), "{plan}");
    let kernels: Vec<&str> = plan.lines().filter(|l| l.starts_with("kernel ")).collect();
    assert_eq!(kernels.len(), 4);
    assert!(kernels[0].starts_with("kernel 0 @zaya1_qkv_proj = qkv_projection"));
    assert!(kernels[1].starts_with("kernel 1 @zaya1_qk_prologue = qk_prologue"));
    assert!(kernels[2].starts_with("kernel 2 @zaya1_attention = attention"));
    assert!(kernels[3].starts_with("kernel 3 @zaya1_out_proj = output_projection"));
    let persistent = plan.lines().filter(|l| *l == "  grid (SMs, 1, 1) = SMs blocks").count();
    assert_eq!(persistent, 2, "both projections run one CTA per SM:\n{plan}");
}

#[test]
fn print_after_all_shows_the_graph_after_every_pass() {
    let (status, stdout, _) =
        ccc(&["compile", &example("zaya1"), "--emit", "graph", "--print-after-all"]);
    assert_eq!(status, Status::Success);
    let headers: Vec<&str> = stdout.lines().filter(|l| l.starts_with("// -----")).collect();
    assert_eq!(
        headers,
        [
            "// ----- forward before any pass",
            "// ----- forward after canonicalize",
            "// ----- forward after dead-code-elimination",
            "// ----- forward after materialize-projection-output",
            "// ----- forward after fuse-qkv-projection",
            "// ----- forward after fuse-qk-prologue",
            "// ----- forward after fuse-attention",
            "// ----- forward after fuse-output-projection",
        ]
    );
    let (status, _, stderr) = ccc(&["compile", &example("zaya1"), "--print-after-all"]);
    assert_eq!(
        (status, stderr.as_str()),
        (Status::Usage, "error: --print-after-all needs --emit STAGE (it prints every stage up to that one)\n")
    );
}

#[test]
fn print_after_all_shows_every_stage_up_to_the_one_emitted() {
    let (status, stdout, _) = ccc(&["compile", &example("zaya1"), "--emit", "kernel", "--print-after-all"]);
    assert_eq!(status, Status::Success);
    let headers: Vec<&str> = stdout.lines().filter(|l| l.starts_with("// =====")).collect();
    assert_eq!(headers, ["// ===== zaya1 spec", "// ===== zaya1 plan", "// ===== zaya1 kernel"]);
    assert_eq!(stdout.lines().filter(|l| l.starts_with("// ----- forward after")).count(), 7);
    // The kernel stage is the kernel IR that ships: warp roles, TMA and asynchronous wgmma.
    for statement in ["roles {", "tma %a_ring", "mma.async", "wait @full", "named_barrier.sync"] {
        assert!(stdout.contains(statement), "no `{statement}` in the kernel stage");
    }
}

#[test]
fn a_decode_entry_point_plans_the_step_with_the_callers_state() {
    let directory = scratch("decode-entry");
    let spec = write_file(
        &directory,
        "decode.attn",
        "attention d {\n    model_dim = 256\n    head_dim = 64\n    emit = [forward, decode]\n}\n",
    );
    let (status, stdout, stderr) = ccc(&["compile", &spec, "--emit", "plan"]);
    assert_eq!(status, Status::Success, "{stderr}");
    for line in [
        "plan @d.decode: 5 kernels",
        "  input x : [B,1,256]xbf16",
        "  input block_table : [B,blocks]xi32",
        "  output out : [B,1,256]xbf16",
        "  state k_cache : [pages,16,4,64]xbf16",
        "  updates v_cache : [pages,16,4,64]xbf16",
    ] {
        assert!(stdout.lines().any(|l| l == line), "no `{line}` in:\n{stdout}");
    }
}

#[test]
fn a_head_dim_the_kernels_cannot_tile_is_a_located_error_of_check_and_compile() {
    let directory = scratch("head-dim");
    let spec = write_file(&directory, "d40.attn", "attention narrow {\n    model_dim = 160\n    head_dim = 40\n}\n");
    let message = "error: cannot compile `narrow` (kernel): head_dim 40 is not supported by the sm_90a kernels yet: \
                   it must be a multiple of 16 (the k-step of the tensor-core instructions)\n";
    // `check` runs every stage `compile` would, so it rejects the spec the same way.
    for args in [vec!["check", spec.as_str()], vec!["compile", spec.as_str(), "--emit", "kernel"]] {
        let (status, stdout, stderr) = ccc(&args);
        assert_eq!((status, stdout.as_str()), (Status::SpecErrors, ""), "{args:?}: {stderr}");
        assert!(stderr.starts_with(message), "{args:?}: {stderr}");
        assert!(stderr.contains("d40.attn:3:5\n"), "{args:?}: not located at head_dim: {stderr}");
        assert!(stderr.contains("3 │     head_dim = 40\n  │     ^^^^^^^^^^^^^ the kernels cannot compile this"), "{args:?}: {stderr}");
    }
}

#[test]
fn an_mla_layer_is_explained_and_a_located_error_of_check_and_compile() {
    let directory = scratch("mla");
    let spec = write_file(
        &directory,
        "mla.attn",
        "attention latent {\n    model_dim = 1024\n    query_heads = 8\n    mla { kv_rank = 128, rope_dim = 32, nope_dim = 64, v_dim = 64 }\n    rope { theta = 10000 }\n}\n",
    );
    let (status, stdout, stderr) = ccc(&["explain", spec.as_str()]);
    assert_eq!(status, Status::Success, "{stderr}");
    assert!(stdout.starts_with("latent (MLA)"), "{stdout}");
    assert!(stdout.contains("c_kv + k_pe = 128 + 32 = 160 values per token"), "{stdout}");
    for args in [vec!["check", spec.as_str()], vec!["compile", spec.as_str(), "--emit", "plan"]] {
        let (status, stdout, stderr) = ccc(&args);
        assert_eq!((status, stdout.as_str()), (Status::SpecErrors, ""), "{args:?}: {stderr}");
        assert!(stderr.starts_with("error: cannot compile `latent` (graph): MLA layers have no kernels yet"), "{args:?}: {stderr}");
        assert!(stderr.contains("mla.attn:4:5\n"), "{args:?}: not located at `mla`: {stderr}");
    }
    // Said before any rule of the kernels, such as head widths in multiples of 16.
    let narrow = write_file(
        &directory,
        "narrow.attn",
        "attention narrow {\n    model_dim = 64\n    query_heads = 2\n    mla { kv_rank = 7, rope_dim = 2, nope_dim = 1, v_dim = 33 }\n    rope { theta = 100 }\n}\n",
    );
    let (status, _, stderr) = ccc(&["check", narrow.as_str()]);
    assert_eq!(status, Status::SpecErrors, "{stderr}");
    assert!(stderr.contains("MLA layers have no kernels yet") && stderr.contains("narrow.attn:4:5\n"), "{stderr}");
    // YaRN is in the reference, not the kernels: a located error on `rope` for other layers.
    let yarn = write_file(
        &directory,
        "yarn.attn",
        "attention long {\n    model_dim = 1024\n    head_dim = 64\n    rope { theta = 10000, yarn(factor = 4, original_positions = 4096) }\n}\n",
    );
    let (status, _, stderr) = ccc(&["check", yarn.as_str()]);
    assert_eq!(status, Status::SpecErrors, "{stderr}");
    assert!(stderr.starts_with("error: cannot compile `long` (graph): YaRN-scaled RoPE is in the f64 reference only"), "{stderr}");
    assert!(stderr.contains("yarn.attn:4:5\n"), "not located at `rope`: {stderr}");
}

#[test]
#[cfg(feature = "llvm")]
fn tune_list_ranks_the_tile_candidates_of_every_hopper_kernel() {
    let (status, stdout, stderr) = ccc(&["tune", "--list", &example("zaya1")]);
    assert_eq!(status, Status::Success, "{stderr}");
    insta::assert_snapshot!("tune_list_zaya1", stdout);
    // The command line's shape overrides the spec's `tune` block.
    let (status, stdout, _) = ccc(&["tune", "--list", &example("zaya1"), "--batch", "8", "--seq-len", "4096"]);
    assert_eq!(status, Status::Success);
    assert!(stdout.starts_with("zaya1_qkv_proj: projection GEMM, estimated at B = 8, S = 4096\n"), "{stdout}");
}

#[test]
fn tune_usage_errors_exit_2() {
    let (status, _, stderr) = ccc(&["tune", &example("zaya1")]);
    assert_eq!(status, Status::Usage);
    assert_eq!(stderr, "error: tune needs --list or -o DIR\n");
    assert_eq!(ccc(&["tune", "--list", &example("zaya1"), "--seq-len", "0"]).0, Status::Usage);
    // Batches past the language's own bound on `tune { batch }` (2^20).
    let (status, _, stderr) = ccc(&["tune", "--list", &example("zaya1"), "--batch", "1073741824"]);
    assert_eq!(status, Status::Usage);
    assert!(stderr.contains("1073741824 is not in 1..=1048576"), "{stderr}");
    let (status, _, stderr) = ccc(&["tune", "--list", "/nonexistent/x.attn"]);
    assert_eq!(status, Status::Usage);
    assert!(stderr.starts_with("error: cannot read /nonexistent/x.attn"), "{stderr}");
}

/// A tuning result for ZAYA1 as `ccc-run tune` writes it, choosing `tiles` for `kernel`.
#[cfg(feature = "llvm")]
fn zaya1_tuning(fingerprint: &str, kernel: &str, tiles: ccc::tuning::TileChoice) -> String {
    use ccc::tuning::{RESULT_FORMAT, TimedCandidate, TunedKernel, TuningResult};
    let result = TuningResult {
        format: RESULT_FORMAT.to_string(),
        layer: "zaya1".to_string(),
        spec_fingerprint: fingerprint.to_string(),
        gpu: "NVIDIA H200".to_string(),
        batch: 1,
        seq_len: 16384,
        kernels: vec![TunedKernel {
            kernel: kernel.to_string(),
            chosen: tiles.clone(),
            times: vec![TimedCandidate {
                tiles,
                library: format!("{kernel}/2"),
                estimate_us: 219.7,
                correct: true,
                median_ms: Some(0.2),
            }],
        }],
    };
    serde_json::to_string_pretty(&result).unwrap()
}

#[cfg(feature = "llvm")]
fn zaya1_fingerprint() -> String {
    let spec = common_example_spec("zaya1");
    ccc::tuning::spec_fingerprint(&spec)
}

#[cfg(feature = "llvm")]
fn common_example_spec(name: &str) -> ccc::spec::AttentionSpec {
    let path = example(name);
    let text = std::fs::read_to_string(&path).unwrap();
    ccc::frontend::parse_and_check(&path, &text).unwrap().remove(0)
}

#[cfg(feature = "llvm")]
fn manifest_kernel(directory: &Path, symbol: &str) -> serde_json::Value {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(directory.join("manifest.json")).unwrap()).unwrap();
    manifest["entry_points"][0]["kernels"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["symbol"] == symbol)
        .cloned()
        .unwrap()
}

#[test]
#[cfg(feature = "llvm")]
fn tune_writes_candidate_libraries_and_their_index() {
    use ccc::tuning::{INDEX_FILE, TileChoice, TuneIndex};
    let out = scratch("tune-out");
    let (status, stdout, stderr) = ccc(&["tune", &example("zaya1"), "-o", out.to_str().unwrap(), "--top", "2"]);
    assert_eq!(status, Status::Success, "{stderr}");
    let layer = out.join("zaya1");
    assert_eq!(
        stdout,
        format!(
            "wrote {} (3 kernels, 6 candidate libraries); time them on the GPU with `ccc-run tune {} --batch 1 --seq-len 16384`\n",
            layer.join(INDEX_FILE).display(),
            layer.display()
        )
    );
    let index_path = layer.join(INDEX_FILE);
    let index = TuneIndex::parse(&std::fs::read_to_string(&index_path).unwrap(), "index").unwrap();
    assert_eq!(index.layer, "zaya1");
    assert_eq!(index.spec_fingerprint, zaya1_fingerprint());
    let kernels: Vec<&str> = index.kernels.iter().map(|k| k.kernel.as_str()).collect();
    assert_eq!(kernels, ["zaya1_qkv_proj", "zaya1_attention", "zaya1_out_proj"]);
    let attention = &index.kernels[1];
    assert_eq!(
        attention.candidates[0].tiles,
        TileChoice::Attention { block_m: 128, block_n: 128, stages: 3, schedule: "PingPong".into(), loads: "Tma".into() }
    );
    assert_eq!(
        attention.candidates[1].tiles,
        TileChoice::Attention { block_m: 128, block_n: 128, stages: 3, schedule: "WarpSpecialized".into(), loads: "Tma".into() }
    );
    // Each candidate library differs from the default one in its kernel only.
    let default = scratch("tune-default");
    assert_eq!(ccc(&["compile", &example("zaya1"), "-o", default.to_str().unwrap()]).0, Status::Success);
    let default_ptx = std::fs::read_to_string(default.join("zaya1/zaya1.ptx")).unwrap();
    for kernel in &index.kernels {
        let first = std::fs::read_to_string(layer.join(&kernel.candidates[0].library).join("zaya1.ptx")).unwrap();
        assert_eq!(first, default_ptx, "{}: rank 1 is the default", kernel.kernel);
        let second_dir = layer.join(&kernel.candidates[1].library);
        assert_ne!(std::fs::read_to_string(second_dir.join("zaya1.ptx")).unwrap(), default_ptx);
    }
    // The qkv projection's second candidate has 5 stages: more shared memory than the default.
    let second = manifest_kernel(&layer.join("zaya1_qkv_proj/2"), "zaya1_qkv_proj");
    assert_eq!(second["dynamic_shared_bytes"], 164944);
    assert_eq!(manifest_kernel(&default.join("zaya1"), "zaya1_qkv_proj")["dynamic_shared_bytes"], 132160);
}

#[test]
#[cfg(feature = "llvm")]
fn compile_applies_a_tuning_result_for_its_spec() {
    use ccc::tuning::{TileChoice, TuningResult};
    let directory = scratch("tuning-apply");
    let six_stages = TileChoice::Gemm { block_n: 128, stages: 6, schedule: "PingPong".into(), loads: "Tma".into() };
    let file = write_file(
        &directory,
        &TuningResult::file_name("NVIDIA H200"),
        &zaya1_tuning(&zaya1_fingerprint(), "zaya1_qkv_proj", six_stages),
    );
    assert!(file.ends_with("tuning-NVIDIA-H200.json"), "{file}");
    // The layout `ccc tune -o OUT` and `ccc-run tune OUT/zaya1` leave: OUT/zaya1/tuning-GPU.json.
    let tune_out = scratch("tuning-apply-tune-out");
    std::fs::create_dir_all(tune_out.join("zaya1")).unwrap();
    std::fs::copy(&file, tune_out.join("zaya1").join(TuningResult::file_name("NVIDIA H200"))).unwrap();
    // From the file, from the directory that holds it, and from the tune output above it.
    for tuning in [file.as_str(), directory.to_str().unwrap(), tune_out.to_str().unwrap()] {
        let out = scratch("tuning-apply-out");
        let (status, _, stderr) = ccc(&["compile", &example("zaya1"), "-o", out.to_str().unwrap(), "--tuning", tuning]);
        assert_eq!(status, Status::Success, "{stderr}");
        assert_eq!(manifest_kernel(&out.join("zaya1"), "zaya1_qkv_proj")["dynamic_shared_bytes"], 197728);
        assert_eq!(manifest_kernel(&out.join("zaya1"), "zaya1_out_proj")["dynamic_shared_bytes"], 132160);
    }
}

#[test]
#[cfg(feature = "llvm")]
fn bad_tuning_files_are_reported_not_applied() {
    use ccc::tuning::TileChoice;
    let directory = scratch("tuning-bad");
    let out = scratch("tuning-bad-out");
    let out = out.to_str().unwrap();
    let gemm = |block_n, schedule: &str| TileChoice::Gemm { block_n, stages: 4, schedule: schedule.into(), loads: "Tma".into() };
    let compile = |tuning: &str| ccc(&["compile", &example("zaya1"), "-o", out, "--tuning", tuning]);

    let wrong_spec = write_file(&directory, "wrong-spec.json", &zaya1_tuning("feedface0000ffff", "zaya1_qkv_proj", gemm(128, "PingPong")));
    let (status, _, stderr) = compile(&wrong_spec);
    assert_eq!(status, Status::Usage);
    let fingerprint = zaya1_fingerprint();
    assert_eq!(
        stderr,
        format!(
            "error: {wrong_spec} was measured for a different spec (layer `zaya1`, fingerprint feedface0000), \
             not for layer `zaya1` (fingerprint {}); run `ccc tune` again for this spec\n",
            &fingerprint[..12]
        )
    );

    let unknown = write_file(&directory, "unknown.json", &zaya1_tuning(&fingerprint, "zaya1_qk_prologue", gemm(128, "PingPong")));
    let (status, _, stderr) = compile(&unknown);
    assert_eq!(status, Status::SpecErrors);
    assert_eq!(
        stderr,
        "error: cannot compile `zaya1` (tuning): the tuning names kernel `zaya1_qk_prologue`, which is not a Hopper \
         attention or GEMM kernel of this layer (those are: zaya1_qkv_proj, zaya1_attention, zaya1_out_proj)\n"
    );

    let rejected = write_file(&directory, "rejected.json", &zaya1_tuning(&fingerprint, "zaya1_qkv_proj", gemm(256, "PingPong")));
    let (status, _, stderr) = compile(&rejected);
    assert_eq!(status, Status::SpecErrors);
    assert_eq!(
        stderr,
        "error: cannot compile `zaya1` (tuning): the tiles 128x256, 4 stages, PingPong, Tma of zaya1_qkv_proj are rejected: \
         registers: 304 per consumer thread, budget 232\n"
    );

    let stages = TileChoice::Gemm { block_n: 128, stages: 1 << 28, schedule: "PingPong".into(), loads: "Tma".into() };
    let stages = write_file(&directory, "stages.json", &zaya1_tuning(&fingerprint, "zaya1_qkv_proj", stages));
    let (status, _, stderr) = compile(&stages);
    assert_eq!(status, Status::SpecErrors);
    assert!(stderr.ends_with("268435456 stages: at most 16\n"), "{stderr}");
    let stages = TileChoice::Attention {
        block_m: 128,
        block_n: 128,
        stages: 1 << 28,
        schedule: "PingPong".into(),
        loads: "Tma".into(),
    };
    let stages = write_file(&directory, "attention-stages.json", &zaya1_tuning(&fingerprint, "zaya1_attention", stages));
    let (status, _, stderr) = compile(&stages);
    assert_eq!(status, Status::SpecErrors);
    assert!(stderr.ends_with("268435456 K/V stages: the overlapped loop needs 3 to 16\n"), "{stderr}");

    let loads = TileChoice::Gemm { block_n: 128, stages: 4, schedule: "PingPong".into(), loads: "Bulk".into() };
    let loads = write_file(&directory, "loads.json", &zaya1_tuning(&fingerprint, "zaya1_qkv_proj", loads));
    let (status, _, stderr) = compile(&loads);
    assert_eq!(status, Status::SpecErrors);
    assert!(stderr.ends_with("unknown loads `Bulk` for zaya1_qkv_proj (one of Tma)\n"), "{stderr}");

    let schedule = write_file(&directory, "schedule.json", &zaya1_tuning(&fingerprint, "zaya1_qkv_proj", gemm(128, "Zigzag")));
    let (status, _, stderr) = compile(&schedule);
    assert_eq!(status, Status::SpecErrors);
    assert!(stderr.ends_with("unknown GEMM schedule `Zigzag` for zaya1_qkv_proj (one of PingPong, Cooperative)\n"), "{stderr}");

    let kind = write_file(&directory, "kind.json", &zaya1_tuning(&fingerprint, "zaya1_attention", gemm(128, "PingPong")));
    let (status, _, stderr) = compile(&kind);
    assert_eq!(status, Status::SpecErrors);
    assert!(stderr.ends_with("zaya1_attention is an attention kernel; the tuning gives it GEMM tiles (128x128, 4 stages, PingPong, Tma)\n"), "{stderr}");

    let garbage = write_file(&directory, "garbage.json", "{\"layer\": 3}");
    let (status, _, stderr) = compile(&garbage);
    assert_eq!(status, Status::Usage);
    assert!(stderr.starts_with(&format!("error: {garbage} is not a tuning result: ")), "{stderr}");

    let other_format = zaya1_tuning(&fingerprint, "zaya1_qkv_proj", gemm(128, "PingPong")).replace("ccc-tuning/1", "ccc-tuning/0");
    let other_format = write_file(&directory, "format.json", &other_format);
    let (status, _, stderr) = compile(&other_format);
    assert_eq!(status, Status::Usage);
    assert_eq!(stderr, format!("error: {other_format} has format `ccc-tuning/0`, expected `ccc-tuning/1`\n"));

    let (status, _, stderr) = ccc(&["compile", &example("mha"), "-o", out, "--tuning", &unknown]);
    assert_eq!(status, Status::Usage);
    assert_eq!(stderr, format!("error: {unknown} holds tiles for layer `zaya1`, which this file does not define (it defines mha)\n"));

    let (status, _, stderr) = compile("/nonexistent/tuning.json");
    assert_eq!(status, Status::Usage);
    assert!(stderr.starts_with("error: cannot read /nonexistent/tuning.json"), "{stderr}");

    let (status, _, stderr) = ccc(&["compile", &example("zaya1"), "--emit", "ptx", "--tuning", &unknown]);
    assert_eq!(status, Status::Usage);
    assert_eq!(stderr, "error: --tuning applies to the libraries compile writes, not to --emit\n");

    // Directories: none for this spec, or one per GPU.
    let empty = scratch("tuning-empty");
    let (status, _, stderr) = compile(empty.to_str().unwrap());
    assert_eq!(status, Status::Usage);
    assert_eq!(
        stderr,
        format!("error: {} holds no tuning result for layer `zaya1` (fingerprint {})\n", empty.display(), &fingerprint[..12])
    );
    let two_gpus = scratch("tuning-two-gpus");
    for gpu in ["NVIDIA H200", "NVIDIA H100 80GB HBM3"] {
        let text = zaya1_tuning(&fingerprint, "zaya1_qkv_proj", gemm(128, "PingPong")).replace("NVIDIA H200", gpu);
        write_file(&two_gpus, &ccc::tuning::TuningResult::file_name(gpu), &text);
    }
    let (status, _, stderr) = compile(two_gpus.to_str().unwrap());
    assert_eq!(status, Status::Usage);
    assert_eq!(
        stderr,
        format!(
            "error: {} holds tuning results for layer `zaya1` from several GPUs (NVIDIA H100 80GB HBM3, NVIDIA H200): \
             pass one file to --tuning\n",
            two_gpus.display()
        )
    );
}

/// `--message-format json`: one JSON object per diagnostic on stderr, located (1-based line and
/// column of the span's start and end), for the language's errors and a compile stage's alike.
#[test]
fn diagnostics_print_as_json_lines() {
    let directory = scratch("json-diagnostics");
    let bad = write_file(&directory, "bad.attn", "attention bad {\n    model_dim = 2048\n    head_dim = 128\n    qk_norm = l3\n}\n");
    let narrow = write_file(&directory, "d40.attn", "attention narrow {\n    model_dim = 160\n    head_dim = 40\n}\n");
    for (file, line, column, end_column, message) in [
        (&bad, 4, 15, 17, "unknown value `l3` for `qk_norm`"),
        (&narrow, 3, 5, 18, "cannot compile `narrow` (kernel): head_dim 40 is not supported by the sm_90a kernels yet"),
    ] {
        let (status, stdout, stderr) = ccc(&["check", "--message-format", "json", file]);
        assert_eq!((status, stdout.as_str()), (Status::SpecErrors, ""), "{stderr}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one diagnostic, one line: {stderr}");
        let value: serde_json::Value = serde_json::from_str(lines[0]).expect("a JSON object");
        assert_eq!(value["level"], "error");
        assert_eq!(value["file"], file.as_str());
        assert_eq!((value["line"].as_u64(), value["column"].as_u64()), (Some(line), Some(column)), "{value}");
        assert_eq!((value["end_line"].as_u64(), value["end_column"].as_u64()), (Some(line), Some(end_column)), "{value}");
        assert!(value["message"].as_str().unwrap().starts_with(message), "{value}");
    }
    let (status, stdout, stderr) = ccc(&["check", "--message-format", "json", &narrow.replace("d40", "missing")]);
    assert_eq!((status, stdout.as_str()), (Status::Usage, ""), "{stderr}");
}

/// ZAYA1-8B's config as transformers writes it (two layer types; the hub's stray top-level
/// `rope_type` inside `rope_parameters` included).
const ZAYA_CONFIG: &str = r#"{"architectures": ["ZayaForCausalLM"], "model_type": "zaya", "hidden_size": 2048,
 "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 128, "num_hidden_layers": 5,
 "cca_time0": 2, "cca_time1": 2, "attention_bias": false, "dtype": "bfloat16", "sliding_window": 1024,
 "rope_parameters": {"rope_type": "default",
   "hybrid": {"rope_type": "default", "rope_theta": 5000000.0, "partial_rotary_factor": 0.5},
   "hybrid_sliding": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}},
 "layer_types": ["hybrid", "hybrid_sliding", "hybrid", "hybrid", "hybrid_sliding"]}"#;

#[test]
fn spec_from_hf_writes_a_block_per_layer_type_that_checks() {
    let directory = scratch("spec-from-hf");
    let config = write_file(&directory, "config.json", ZAYA_CONFIG);
    let (status, stdout, stderr) = ccc(&["spec", "--from-hf", &config, "--name", "zaya1"]);
    assert_eq!((status, stderr.as_str()), (Status::Success, ""));
    assert!(stdout.contains("// Layers 0, 2-3 (`hybrid`)") && stdout.contains("// Layers 1, 4 (`hybrid_sliding`)"), "{stdout}");
    let specs = ccc::frontend::parse_and_check("generated.attn", &stdout).expect("the written spec checks");
    // The causal block is the bundled ZAYA1 example's layer; the sliding one differs only in its
    // mask and RoPE base.
    let example = ccc::frontend::parse_and_check("zaya1.attn", &std::fs::read_to_string(example("zaya1")).unwrap()).unwrap().remove(0);
    let same_layer = |mut spec: ccc::AttentionSpec| {
        spec.name = example.name.clone();
        spec.tune = example.tune;
        spec
    };
    assert_eq!(same_layer(specs[0].clone()), example);
    let mut sliding = example.clone();
    sliding.mask = ccc::spec::Mask::SlidingWindow { window: 1024 };
    sliding.rope.as_mut().unwrap().theta = 10_000.0;
    assert_eq!((specs.len(), specs[1].name.as_str()), (2, "zaya1_sliding"));
    assert_eq!(same_layer(specs[1].clone()), sliding);
    // -o writes the same text; `ccc check` accepts it.
    let out = directory.join("zaya1.attn");
    let (status, _, _) = ccc(&["spec", "--from-hf", &config, "--name", "zaya1", "-o", out.to_str().unwrap()]);
    assert_eq!((status, std::fs::read_to_string(&out).unwrap()), (Status::Success, stdout));
    assert_eq!(ccc(&["check", out.to_str().unwrap()]).1, "ok: zaya1\nok: zaya1_sliding\n");
}

/// RoPE as transformers' ZAYA reads it: a layer type's entry without `partial_rotary_factor`
/// rotates the whole head; a config without `rope_parameters` takes ZayaConfig's per-type
/// defaults, whatever top-level RoPE keys it has.
#[test]
fn spec_from_hf_reads_rope_as_transformers_does() {
    let directory = scratch("spec-from-hf-rope");
    let rope_of = |config: &str, name: &str| {
        let path = write_file(&directory, name, config);
        let (status, stdout, stderr) = ccc(&["spec", "--from-hf", &path]);
        assert_eq!(status, Status::Success, "{stderr}");
        let specs = ccc::frontend::parse_and_check("generated.attn", &stdout).expect("checks");
        specs.iter().map(|spec| spec.rope.map(|rope| (rope.rotary_dim, rope.theta))).collect::<Vec<_>>()
    };
    let whole_head = ZAYA_CONFIG.replace("\"rope_theta\": 5000000.0, \"partial_rotary_factor\": 0.5", "\"rope_theta\": 5000000.0");
    assert_eq!(rope_of(&whole_head, "whole.json"), [Some((128, 5e6)), Some((64, 1e4))]);
    let start = ZAYA_CONFIG.find("\"rope_parameters\"").unwrap();
    let end = ZAYA_CONFIG.find("\"layer_types\"").unwrap();
    let defaults = format!("{}\"rope_theta\": 1.0, \"partial_rotary_factor\": 1.0, {}", &ZAYA_CONFIG[..start], &ZAYA_CONFIG[end..]);
    assert_eq!(rope_of(&defaults, "defaults.json"), [Some((64, 5e6)), Some((64, 1e4))]);
}

#[test]
fn spec_from_hf_says_what_it_cannot_write() {
    let directory = scratch("spec-from-hf-errors");
    let cases = [
        (ZAYA_CONFIG.replace("\"zaya\"", "\"llama\""), "model_type is `llama`, not `zaya`"),
        (ZAYA_CONFIG.replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 1"), "num_key_value_heads is 1"),
        (ZAYA_CONFIG.replace("\"sliding_window\": 1024", "\"sliding_window\": null"), "sliding_window is not a positive integer"),
        (ZAYA_CONFIG.replace("\"rope_type\": \"default\", \"rope_theta\": 10000.0", "\"rope_type\": \"yarn\", \"rope_theta\": 10000.0"),
         "the `hybrid_sliding` layers' rope_type is `yarn`"),
        (ZAYA_CONFIG.replace("\"head_dim\": 128", "\"head_dim\": \"128\""), "head_dim is \"128\", not a non-negative integer"),
        ("{".to_string(), "not valid JSON"),
        (ZAYA_CONFIG.replace("\"hybrid\": {\"rope_type\": \"default\", \"rope_theta\": 5000000.0, \"partial_rotary_factor\": 0.5},", ""),
         "rope_parameters has no `hybrid` entry"),
    ];
    for (index, (config, message)) in cases.iter().enumerate() {
        let path = write_file(&directory, &format!("config{index}.json"), config);
        let (status, stdout, stderr) = ccc(&["spec", "--from-hf", &path]);
        assert_eq!((status, stdout.as_str()), (Status::SpecErrors, ""), "{stderr}");
        assert!(stderr.starts_with(&format!("error: {path}: ")) && stderr.contains(message), "{stderr}");
    }
    // What the language rejects is located in the text as written: query heads not a multiple of
    // the kv heads.
    let path = write_file(&directory, "uneven.json", &ZAYA_CONFIG.replace("\"num_attention_heads\": 8", "\"num_attention_heads\": 6").replace("\"num_key_value_heads\": 2", "\"num_key_value_heads\": 4"));
    let (status, _, stderr) = ccc(&["spec", "--from-hf", &path]);
    assert_eq!(status, Status::SpecErrors);
    assert!(stderr.contains("(as written from it)") && stderr.contains('^'), "{stderr}");
    // What only a later stage rejects, as `ccc check` reports it: head_dim 40.
    let path = write_file(&directory, "narrow.json", &ZAYA_CONFIG.replace("\"head_dim\": 128", "\"head_dim\": 40").replace("\"hidden_size\": 2048", "\"hidden_size\": 2040"));
    let (status, _, stderr) = ccc(&["spec", "--from-hf", &path]);
    assert_eq!(status, Status::SpecErrors);
    assert!(stderr.contains("head_dim 40 is not supported") && stderr.contains("head_dim        = 40"), "{stderr}");
    let (status, _, stderr) = ccc(&["spec", "--from-hf", &directory.join("missing.json").display().to_string()]);
    assert_eq!(status, Status::Usage, "{stderr}");
}
