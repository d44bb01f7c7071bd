//! `ccc-run`: runs a compiled kernel library on the GPU.
//!
//! - `ccc-run validate DIR [--batch B,..] [--seq-len S,..] [--seed N] [--weights FILE [--prefix P]]`
//!   runs the forward pass on seeded random inputs (and weights, unless a safetensors file is
//!   given: the layer's state dict, or a whole model's checkpoint with the layer under P) and
//!   compares every output the reference also computes; with a backward entry point also the
//!   backward on a seeded dout: dx against the tolerance, every weight gradient NaN-free (its
//!   error printed).
//! - `ccc-run bench DIR --batch B --seq-len S [--warmup N] [--iterations N] [--weights FILE
//!   [--prefix P]]` times it.
//! - `ccc-run tune DIR --batch B --seq-len S [--out FILE]` takes the candidate libraries `ccc tune
//!   -o` wrote for one layer (DIR holds `tune-index.json`), checks each against the reference,
//!   times each candidate's kernel and writes the fastest correct tiles per kernel to
//!   `DIR/tuning-GPU.json` (for `ccc compile --tuning`).
//! - `ccc-run plan DIR --batch B --seq-len S [--sms N]` prints what a call would allocate and
//!   launch on a GPU of N SMs; it needs no GPU, so it checks a freshly compiled library on the
//!   build machine.
//!
//! Exit codes: 0 success, 1 a result out of tolerance or NaN, 2 any other error (arguments,
//! library files, CUDA), 3 no GPU or driver on this machine, or a GPU that cannot run the
//! library's target (sm_90a needs compute capability 9.0 exactly).

/// Prints a line to stdout. A closed pipe (`ccc-run plan DIR | head`) ends the program quietly,
/// where `println!` would panic.
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(error) = writeln!(std::io::stdout(), $($arg)*) {
            if error.kind() == std::io::ErrorKind::BrokenPipe {
                std::process::exit(0);
            }
        }
    }};
}

use ccc::ir::size::SizeEnv;
use ccc::reference;
use ccc::spec::EntryPoint;
use ccc::tuning::{
    INDEX_FILE, RESULT_FORMAT, TimedCandidate, TuneIndex, TunedKernel, TuningResult, spec_fingerprint,
};
use ccc_runtime::plan::PlannedArg;
use ccc_runtime::validate::{compare_backward, compare_forward, input_for, tolerance, weights_for};
use ccc_runtime::{CallPlan, HostTensor, Library, RuntimeError, WeightSet, read_library};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

const EXIT_OUT_OF_TOLERANCE: u8 = 1;
const EXIT_ERROR: u8 = 2;
const EXIT_NO_GPU: u8 = 3;

#[derive(Parser)]
#[command(
    name = "ccc-run",
    version,
    about = "Run and check kernel libraries compiled by ccc on an NVIDIA GPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Where a command's weights come from.
#[derive(clap::Args)]
struct WeightArgs {
    /// Use these weights (safetensors, Hugging Face names) instead of seeded random ones: the
    /// layer's state dict, or a whole model's checkpoint with --prefix. Only the layer's
    /// tensors are read.
    #[arg(long)]
    weights: Option<PathBuf>,
    /// What the layer's names start with in the checkpoint, e.g. `model.layers.3.self_attn.`
    #[arg(long, default_value = "", requires = "weights")]
    prefix: String,
}

impl WeightArgs {
    fn file(&self) -> Option<(&Path, &str)> {
        self.weights.as_deref().map(|path| (path, self.prefix.as_str()))
    }
}

#[derive(Subcommand)]
enum Command {
    /// Compare the GPU forward pass with the f64 CPU reference.
    Validate {
        /// Library directory (holds manifest.json and the PTX).
        dir: PathBuf,
        /// Batch sizes to run, comma separated.
        #[arg(long, value_delimiter = ',', default_value = "2")]
        batch: Vec<u64>,
        /// Sequence lengths to run, comma separated.
        #[arg(long = "seq-len", value_delimiter = ',', default_value = "128")]
        seq_len: Vec<u64>,
        /// Seed of the random weights and inputs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        weights: WeightArgs,
    },
    /// Time the forward pass with CUDA events.
    Bench {
        dir: PathBuf,
        #[arg(long)]
        batch: u64,
        #[arg(long = "seq-len")]
        seq_len: u64,
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        #[arg(long, default_value_t = 50)]
        iterations: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        weights: WeightArgs,
    },
    /// Time the candidate libraries of `ccc tune -o` and write the fastest correct tiles per kernel.
    Tune {
        /// The layer's tuning directory (holds tune-index.json).
        dir: PathBuf,
        #[arg(long)]
        batch: u64,
        #[arg(long = "seq-len")]
        seq_len: u64,
        #[arg(long, default_value_t = 10)]
        warmup: usize,
        #[arg(long, default_value_t = 30)]
        iterations: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Where to write the result [default: DIR/tuning-GPU.json, GPU the device's name].
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the buffers and launches of a forward call (no GPU needed).
    Plan {
        dir: PathBuf,
        #[arg(long)]
        batch: u64,
        #[arg(long = "seq-len")]
        seq_len: u64,
        /// SMs of the GPU to plan for (132 on an H100 or H200 SXM): the CTAs of persistent grids.
        #[arg(long)]
        sms: Option<u64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Validate {
            dir,
            batch,
            seq_len,
            seed,
            weights,
        } => validate(&dir, &batch, &seq_len, seed, weights.file()),
        Command::Bench {
            dir,
            batch,
            seq_len,
            warmup,
            iterations,
            seed,
            weights,
        } => bench(&dir, batch, seq_len, warmup, iterations.max(1), seed, weights.file()),
        Command::Plan {
            dir,
            batch,
            seq_len,
            sms,
        } => plan(&dir, SizeEnv { batch, seq_len, sms, pages: None, blocks: None }),
        Command::Tune {
            dir,
            batch,
            seq_len,
            warmup,
            iterations,
            seed,
            out,
        } => tune(
            &dir,
            TuneRun { batch, seq_len, warmup, iterations: iterations.max(1), seed },
            out.as_deref(),
        ),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(EXIT_OUT_OF_TOLERANCE),
        Err(e) if e.is_no_gpu() => {
            eprintln!("ccc-run: {e}");
            ExitCode::from(EXIT_NO_GPU)
        }
        Err(e) => {
            eprintln!("ccc-run: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Loads the library: its files first, so that a broken library is reported even where there is
/// no GPU, then the GPU.
fn load(dir: &Path) -> Result<Library, RuntimeError> {
    read_library(dir)?;
    Library::load(dir)
}

fn validate(
    dir: &Path,
    batches: &[u64],
    seq_lens: &[u64],
    seed: u64,
    weights: Option<(&Path, &str)>,
) -> Result<bool, RuntimeError> {
    let library = load(dir)?;
    let manifest = library.manifest();
    let spec = &manifest.spec;
    let tol = tolerance(spec.dtype);
    let (reference_weights, weight_set) = weights_for(manifest, seed, weights)?;
    say!(
        "library {} ({}, {}) on {} ({} SMs); tolerance: relative L2 error < {tol:e}",
        spec.name,
        dir.display(),
        spec.dtype.name(),
        library.device_name()?,
        library.sms()
    );
    say!(
        "{:>4} {:>6}  {:<6} {:>12} {:>12} {:>9}  status",
        "B", "S", "tensor", "max abs err", "rel L2 err", "tol"
    );
    let mut all_passed = true;
    for &batch in batches {
        for &seq_len in seq_lens {
            let (b, s) = (to_usize(batch)?, to_usize(seq_len)?);
            let (x, x_host) = input_for(manifest, b, s, seed.wrapping_add(1))?;
            let gpu = library.forward_host(&x_host, &weight_set)?;
            let expected = reference::forward(spec, &reference_weights, &x)
                .map_err(|message| RuntimeError::Reference { message })?;
            let mut comparisons = compare_forward(&gpu, &expected, tol);
            if manifest.entry_point(EntryPoint::Backward).is_some() {
                // dL/dout: seeded like x, its own seed.
                let (dout, dout_host) = input_for(manifest, b, s, seed.wrapping_add(2))?;
                let gpu = library.backward_host(&x_host, &weight_set, &dout_host)?;
                let gradients = reference::backward(spec, &reference_weights, &x, &dout)
                    .map_err(|message| RuntimeError::Reference { message })?;
                comparisons.extend(compare_backward(&gpu, &gradients, tol));
            }
            for check in &comparisons {
                let tolerance = if check.tolerance.is_finite() { format!("{:.0e}", check.tolerance) } else { "-".into() };
                say!(
                    "{batch:>4} {seq_len:>6}  {:<6} {:>12} {:>12} {tolerance:>9}  {}",
                    check.tensor,
                    check.max_abs.map_or("-".into(), |v| format!("{v:.3e}")),
                    check.rel_l2.map_or("-".into(), |v| format!("{v:.3e}")),
                    check.verdict
                );
            }
            let case_passed = comparisons.iter().all(|c| c.passed);
            // NaN must survive into the summary (f64::max would drop it); weight gradients,
            // reported but not held to a tolerance, stay out of it.
            let worst = comparisons
                .iter()
                .filter(|c| c.tolerance.is_finite())
                .map(|c| c.rel_l2.unwrap_or(f64::INFINITY))
                .fold(0.0, |worst: f64, e| {
                    if worst.is_nan() || e.is_nan() {
                        f64::NAN
                    } else {
                        worst.max(e)
                    }
                });
            all_passed &= case_passed;
            // One line per case for scripts (scripts/gpu-suite.sh reads it).
            say!(
                "RESULT library={} B={batch} S={seq_len} max_rel_l2={worst:.3e} status={}",
                spec.name,
                if case_passed { "pass" } else { "FAIL" }
            );
        }
    }
    Ok(all_passed)
}

fn bench(
    dir: &Path,
    batch: u64,
    seq_len: u64,
    warmup: usize,
    iterations: usize,
    seed: u64,
    weights: Option<(&Path, &str)>,
) -> Result<bool, RuntimeError> {
    let library = load(dir)?;
    let manifest = library.manifest();
    let spec = &manifest.spec;
    let (_, weight_set) = weights_for(manifest, seed, weights)?;
    let (_, x) = input_for(
        manifest,
        to_usize(batch)?,
        to_usize(seq_len)?,
        seed.wrapping_add(1),
    )?;
    let x = library.upload(&x)?;
    let weights = library.upload_weights(&weight_set)?;
    let mut times = library.time_forward(&x, &weights, warmup, iterations)?;
    times.sort_by(f32::total_cmp);
    say!(
        "library {} on {}: B={batch} S={seq_len}: median {:.4} ms, min {:.4} ms, max {:.4} ms over {} calls ({warmup} warm-up)",
        spec.name,
        library.device_name()?,
        times[times.len() / 2],
        times[0],
        times[times.len() - 1],
        times.len()
    );
    Ok(true)
}

fn plan(dir: &Path, env: SizeEnv) -> Result<bool, RuntimeError> {
    let (manifest, _) = read_library(dir)?;
    let plan = CallPlan::for_sizes(&manifest, EntryPoint::Forward, env)?;
    let spec = &manifest.spec;
    let on = env.sms.map(|sms| format!(" on {sms} SMs")).unwrap_or_default();
    say!(
        "library {} ({}, {}, {}): forward for B={} S={}{on}",
        spec.name,
        manifest.target,
        spec.dtype.name(),
        manifest.ptx_file,
        env.batch,
        env.seq_len
    );
    say!("buffers:");
    for buffer in &plan.buffers {
        say!(
            "  {:<28} {:<12} {:<4} {:<20} {:>14} bytes",
            buffer.name,
            buffer.role.name(),
            buffer.dtype.name(),
            format!("{:?}", buffer.shape),
            buffer.bytes
        );
    }
    say!("launches, in order:");
    for launch in &plan.launches {
        let args: Vec<String> = launch
            .args
            .iter()
            .map(|arg| match arg {
                PlannedArg::Buffer(index) => plan.buffers[*index].name.clone(),
                PlannedArg::Size(value) => value.to_string(),
                PlannedArg::TensorMap { buffer, box_rows, .. } => {
                    format!("tensor_map({}, {box_rows} rows)", plan.buffers[*buffer].name)
                }
            })
            .collect();
        say!(
            "  {}<<<{:?}, {:?}, {} B>>>({})",
            launch.symbol,
            launch.grid,
            launch.block,
            launch.dynamic_shared_bytes,
            args.join(", ")
        );
    }
    Ok(true)
}

/// The shape and repetitions of `ccc-run tune`.
struct TuneRun {
    batch: u64,
    seq_len: u64,
    warmup: usize,
    iterations: usize,
    seed: u64,
}

/// Shape of the correctness check each candidate passes before it is timed: two batch elements,
/// and a sequence that ends inside a 128-row tile.
const TUNE_CHECK_BATCH: usize = 2;
const TUNE_CHECK_SEQ_LEN: usize = 257;

/// Reads the index and every candidate library's files (no GPU needed), checking that each
/// library is the indexed layer (same spec fingerprint) and has the kernel it is a candidate of.
fn read_tuning_index(dir: &Path) -> Result<(TuneIndex, Vec<Vec<PathBuf>>), RuntimeError> {
    let index_path = dir.join(INDEX_FILE);
    let text = std::fs::read_to_string(&index_path).map_err(|e| RuntimeError::Io {
        path: index_path.clone(),
        message: format!("{e} (is {} a directory written by `ccc tune -o`?)", dir.display()),
    })?;
    let index = TuneIndex::parse(&text, &index_path.display().to_string()).map_err(|message| {
        RuntimeError::Manifest { path: index_path.clone(), message }
    })?;
    let mut libraries = Vec::new();
    for kernel in &index.kernels {
        let mut paths = Vec::new();
        for candidate in &kernel.candidates {
            let path = dir.join(&candidate.library);
            let (manifest, _) = read_library(&path)?;
            let problem = |message: String| RuntimeError::Manifest { path: path.join("manifest.json"), message };
            if spec_fingerprint(&manifest.spec) != index.spec_fingerprint {
                return Err(problem(format!(
                    "this library is not layer `{}` of the index (its spec differs)",
                    index.layer
                )));
            }
            let has_kernel = manifest
                .entry_points
                .iter()
                .any(|entry| entry.kernels.iter().any(|k| k.symbol == kernel.kernel));
            if !has_kernel {
                return Err(problem(format!("this library has no kernel `{}`", kernel.kernel)));
            }
            paths.push(path);
        }
        libraries.push(paths);
    }
    Ok((index, libraries))
}

/// What the correctness check of every candidate compares against: the weights, the check's
/// input and the reference's outputs (one spec, so the same for all candidates).
type TuneCheck = (WeightSet, HostTensor, reference::ForwardOutputs);

/// How one candidate did: whether its outputs matched the reference and, if so, the median time
/// of its kernel (`None` when the forward pass did not launch it).
struct CandidateOutcome {
    device: String,
    correct: bool,
    median_ms: Option<f64>,
}

/// Loads the candidate library at `path`, checks it against the reference (computing `check`
/// on the first call) and, if correct, times `kernel` alone.
fn run_candidate(
    path: &Path,
    kernel: &str,
    run: &TuneRun,
    check: &mut Option<TuneCheck>,
) -> Result<CandidateOutcome, RuntimeError> {
    let library = load(path)?;
    let device = library.device_name()?;
    let manifest = library.manifest();
    let spec = &manifest.spec;
    let computed = match check.take() {
        Some(computed) => computed,
        None => {
            let (reference_weights, weight_set) = weights_for(manifest, run.seed, None)?;
            let (x, x_host) = input_for(manifest, TUNE_CHECK_BATCH, TUNE_CHECK_SEQ_LEN, run.seed.wrapping_add(1))?;
            let expected = reference::forward(spec, &reference_weights, &x)
                .map_err(|message| RuntimeError::Reference { message })?;
            (weight_set, x_host, expected)
        }
    };
    let (weight_set, x_host, expected) = &*check.insert(computed);
    let gpu_outputs = library.forward_host(x_host, weight_set)?;
    let correct = compare_forward(&gpu_outputs, expected, tolerance(spec.dtype)).iter().all(|c| c.passed);
    if !correct {
        return Ok(CandidateOutcome { device, correct, median_ms: None });
    }
    let (_, x) = input_for(manifest, to_usize(run.batch)?, to_usize(run.seq_len)?, run.seed.wrapping_add(1))?;
    let x = library.upload(&x)?;
    let weights = library.upload_weights(weight_set)?;
    let per_kernel = library.time_kernels(&x, &weights, run.warmup, run.iterations)?;
    let mut samples =
        per_kernel.into_iter().find(|(symbol, _)| symbol == kernel).map(|(_, samples)| samples).unwrap_or_default();
    samples.sort_by(f32::total_cmp);
    let median_ms = samples.get(samples.len() / 2).map(|&ms| f64::from(ms));
    Ok(CandidateOutcome { device, correct, median_ms })
}

fn tune(dir: &Path, run: TuneRun, out: Option<&Path>) -> Result<bool, RuntimeError> {
    let (index, libraries) = read_tuning_index(dir)?;
    let mut gpu = None;
    let mut kernels = Vec::new();
    let mut all_found = true;
    let mut check = None;
    for (kernel, paths) in index.kernels.iter().zip(&libraries) {
        let mut times = Vec::new();
        for (candidate, path) in kernel.candidates.iter().zip(paths) {
            // Candidates that never ran on a GPU are what tuning is for: one that fails to load
            // or launch is recorded as failed and the others still run. No GPU at all ends it.
            let label = format!("{} #{} ({})", kernel.kernel, candidate.rank, candidate.tiles);
            let (correct, median_ms) = match run_candidate(path, &kernel.kernel, &run, &mut check) {
                Ok(outcome) => {
                    let measured = match (outcome.correct, outcome.median_ms) {
                        (true, Some(ms)) => format!("{ms:.4} ms"),
                        (true, None) => "- (correct, but the forward pass did not launch it)".to_string(),
                        (false, _) => "- (wrong results: not timed)".to_string(),
                    };
                    say!("{label}: model {:.1} us, measured {measured}", candidate.estimate_us);
                    gpu.get_or_insert(outcome.device);
                    (outcome.correct, outcome.median_ms)
                }
                Err(error) if error.is_no_gpu() => return Err(error),
                Err(error) => {
                    say!("{label}: failed: {error}");
                    (false, None)
                }
            };
            times.push(TimedCandidate {
                tiles: candidate.tiles.clone(),
                library: candidate.library.clone(),
                estimate_us: candidate.estimate_us,
                correct,
                median_ms,
            });
        }
        times.sort_by(|a, b| match (a.median_ms, b.median_ms) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (None, None) => std::cmp::Ordering::Equal,
        });
        match times.first().filter(|t| t.median_ms.is_some()) {
            Some(fastest) => {
                let chosen = fastest.tiles.clone();
                kernels.push(TunedKernel { kernel: kernel.kernel.clone(), chosen, times });
            }
            None => {
                eprintln!("ccc-run: no candidate of {} gave correct results; it is left out of the result", kernel.kernel);
                all_found = false;
            }
        }
    }
    let gpu = gpu.unwrap_or_default();
    let result = TuningResult {
        format: RESULT_FORMAT.to_string(),
        layer: index.layer.clone(),
        spec_fingerprint: index.spec_fingerprint.clone(),
        gpu: gpu.clone(),
        batch: run.batch,
        seq_len: run.seq_len,
        kernels,
    };
    let path = out.map_or_else(|| dir.join(TuningResult::file_name(&gpu)), Path::to_path_buf);
    let text = serde_json::to_string_pretty(&result).map_err(|e| RuntimeError::Io {
        path: path.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(&path, text + "\n").map_err(|e| RuntimeError::Io { path: path.clone(), message: e.to_string() })?;
    say!("wrote {} (layer {} on {gpu}, B={} S={})", path.display(), result.layer, run.batch, run.seq_len);
    Ok(all_found)
}

fn to_usize(value: u64) -> Result<usize, RuntimeError> {
    usize::try_from(value).map_err(|_| RuntimeError::Size {
        message: format!("{value} does not fit this machine"),
    })
}
