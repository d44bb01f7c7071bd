//! The `ccc` command line. `src/main.rs` only calls [`run`]; tests call it in-process with
//! captured output, and through the built binary.
//!
//! Later stages plug in as new [`driver::Stage`] variants (printed by `compile --emit STAGE`) and as
//! more files written by `compile` next to `manifest.json` and `NAME.ptx`.

use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand, ValueEnum};
use codespan_reporting::term::termcolor;

use crate::driver;
use crate::explain::{DEFAULT_SEQ_LEN, explain_text};
use crate::frontend::{self, Diagnostics, MAX_DIM, MAX_SEQUENCE};
use crate::spec::AttentionSpec;

/// Exit statuses: what a script calling `ccc` can rely on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    Success = 0,
    /// The spec has errors (they were printed).
    SpecErrors = 1,
    /// Wrong usage: bad arguments, a file that cannot be read or written.
    Usage = 2,
}

#[derive(Parser, Debug)]
#[command(
    name = "ccc",
    version,
    about = "A compiler for attention kernels: .attn specs to PTX for Hopper (sm_90a)"
)]
#[command(
    after_help = "Exit status: 0 success, 1 errors in the spec, 2 wrong usage or unreadable file."
)]
pub struct Cli {
    /// When to colour diagnostics.
    #[arg(long, value_enum, default_value_t = ColorWhen::Auto, global = true)]
    pub color: ColorWhen,
    /// How to print diagnostics: `human` (rustc-style, with the source line and a caret) or
    /// `json` (one JSON object per diagnostic on stderr, as cargo prints them).
    #[arg(long, value_enum, default_value_t = MessageFormat::Human, global = true)]
    pub message_format: MessageFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check .attn files: print `ok: NAME` for every layer, or every error.
    Check {
        /// The .attn files.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// One screen per layer: heads, widths, parameters, KV cache, state and FLOPs next to MHA.
    Explain {
        /// The .attn file.
        file: PathBuf,
        /// Sequence length for per-token FLOPs [default: tune.seq_len, else 4096].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MAX_SEQUENCE))]
        seq_len: Option<u64>,
    },
    /// Compile every layer of FILE into a kernel library DIR/NAME/ (manifest.json + NAME.ptx).
    ///
    /// Compiled PTX is cached under $CCC_CACHE_DIR, else $XDG_CACHE_HOME/ccc, else ~/.cache/ccc;
    /// `--emit` prints one stage's text instead of writing files.
    Compile {
        /// The .attn file.
        file: PathBuf,
        /// Output directory; each layer gets a subdirectory named after its block.
        #[arg(short = 'o', long = "out-dir", value_name = "DIR", default_value = "out")]
        out_dir: PathBuf,
        /// Print this stage's text to stdout instead of writing files.
        #[arg(long, value_enum, value_name = "STAGE")]
        emit: Option<driver::Stage>,
        /// With `--emit STAGE`: print every stage from the spec up to STAGE, in the order the
        /// compiler runs them, the graph after every pass.
        #[arg(long)]
        print_after_all: bool,
        /// Assemble the PTX with ptxas (CCC_PTXAS, else the project's .venv) and record
        /// registers and spills per kernel in the manifest; a kernel that spills is an error.
        #[arg(long)]
        ptxas: bool,
        /// Also write what ptxas assembled, NAME.cubin (named in the manifest), which loaders
        /// take instead of compiling the PTX on the GPU at load time (implies --ptxas).
        #[arg(long)]
        cubin: bool,
        /// Do not read or write the PTX cache.
        #[arg(long)]
        no_cache: bool,
        /// Tiles measured by `ccc-run tune`: a tuning result file (applied to the layer it names,
        /// which must be this spec's: same fingerprint), or a directory holding `tuning-*.json`
        /// files directly or in a subdirectory per layer, as `ccc tune -o DIR` lays them out
        /// (each layer takes the one measured for it; every layer needs one).
        #[arg(long, value_name = "FILE|DIR")]
        tuning: Option<PathBuf>,
    },
    /// Write the `.attn` of a Hugging Face model's attention layers from its config.json (ZAYA
    /// models: one block per layer type, `NAME` for the causal layers and `NAME_sliding` for the
    /// sliding-window ones), checked like any spec.
    Spec {
        /// The model's config.json.
        #[arg(long = "from-hf", value_name = "CONFIG")]
        from_hf: PathBuf,
        /// Name of the causal layers' block (it prefixes every kernel symbol).
        #[arg(long, default_value = "zaya")]
        name: String,
        /// Write the spec to FILE instead of stdout.
        #[arg(short = 'o', long = "out", value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Tile choice of the Hopper kernels. With `--list`: every candidate configuration of each
    /// attention and projection-GEMM kernel, ranked by the resource model (shared memory,
    /// registers, estimated time), and the rejected ones with their reason. With `-o DIR`: the
    /// top K candidates of each kernel compiled into DIR/LAYER/KERNEL/RANK/ with an index
    /// DIR/LAYER/tune-index.json, for `ccc-run tune DIR/LAYER` to time on the GPU; its result
    /// goes to `ccc compile --tuning`.
    Tune {
        /// The .attn file.
        file: PathBuf,
        /// Print the ranked candidates per kernel.
        #[arg(long, conflicts_with = "out_dir")]
        list: bool,
        /// Write candidate libraries and the index here.
        #[arg(short = 'o', long = "out-dir", value_name = "DIR")]
        out_dir: Option<PathBuf>,
        /// Candidates per kernel to compile, best estimate first.
        #[arg(long, value_name = "K", default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=64))]
        top: u64,
        /// Batch size to rank for [default: tune.batch, else 1].
        #[arg(long, value_name = "B", value_parser = clap::value_parser!(u64).range(1..=MAX_DIM))]
        batch: Option<u64>,
        /// Sequence length to rank for [default: tune.seq_len, else 16384].
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=MAX_SEQUENCE))]
        seq_len: Option<u64>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MessageFormat {
    Human,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ColorWhen {
    /// Colour when stderr is a terminal and NO_COLOR is not set.
    Auto,
    Always,
    Never,
}

/// Options of `compile` beyond the stage to print.
// Without LLVM nothing is written, so the codegen options go unread.
#[cfg_attr(not(feature = "llvm"), allow(dead_code))]
struct CompileFlags {
    print_after_all: bool,
    ptxas: bool,
    cubin: bool,
    cache: bool,
    tuning: Option<PathBuf>,
}

/// What `ccc tune` was asked for.
// Without LLVM neither form runs, so the fields go unread.
#[cfg_attr(not(feature = "llvm"), allow(dead_code))]
struct TuneRequest {
    list: bool,
    out_dir: Option<PathBuf>,
    top: usize,
    batch: Option<u64>,
    seq_len: Option<u64>,
}

const NO_LLVM: &str = "this ccc was built without the `llvm` feature: it cannot emit LLVM IR or PTX";

/// Where the command writes; `stderr_is_terminal` decides `--color auto`.
pub struct Io<'a> {
    pub stdout: &'a mut dyn Write,
    pub stderr: &'a mut dyn Write,
    pub stderr_is_terminal: bool,
}

/// Runs the command line `args` (the first is the program name) and returns the exit status.
pub fn run<I, T>(args: I, io: &mut Io<'_>) -> Status
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(error) => {
            // --help and --version come through here too, with exit code 0 and for stdout.
            let text = error.render().to_string();
            let status = if error.exit_code() == 0 { Status::Success } else { Status::Usage };
            let stream: &mut dyn Write = if error.use_stderr() { io.stderr } else { io.stdout };
            let _ = stream.write_all(text.as_bytes());
            return status;
        }
    };
    let colour = match cli.color {
        ColorWhen::Always => true,
        ColorWhen::Never => false,
        ColorWhen::Auto => io.stderr_is_terminal && std::env::var_os("NO_COLOR").is_none(),
    };
    let mut session = Session { io, colour, json: cli.message_format == MessageFormat::Json, loaded: None };
    match cli.command {
        Command::Check { files } => {
            files.iter().map(|file| session.check(file)).max().unwrap_or(Status::Success)
        }
        Command::Explain { file, seq_len } => session.explain(&file, seq_len),
        Command::Compile { file, out_dir, emit, print_after_all, ptxas, cubin, no_cache, tuning } => {
            let options = CompileFlags { print_after_all, ptxas, cubin, cache: !no_cache, tuning };
            session.compile(&file, &out_dir, emit, options)
        }
        Command::Spec { from_hf, name, out } => session.spec_from_hf(&from_hf, &name, out.as_deref()),
        Command::Tune { file, list, out_dir, top, batch, seq_len } => {
            session.tune(&file, TuneRequest { list, out_dir, top: top as usize, batch, seq_len })
        }
    }
}

struct Session<'a, 'io> {
    io: &'a mut Io<'io>,
    colour: bool,
    /// Diagnostics as JSON lines.
    json: bool,
    /// The file last loaded (its name and text), where a compile error is located.
    loaded: Option<(String, String)>,
}

impl Session<'_, '_> {
    /// A spec the checker accepted that a later stage cannot compile: an error in the spec as
    /// far as this compiler goes (status 1), named by layer and stage, and shown at the item
    /// responsible in the file it came from (else at the layer's name).
    fn compile_error(&mut self, error: &driver::CompileError) -> Status {
        // A tuning file's errors are about that file, not the spec.
        let spec_error = error.stage != "tuning";
        let located = self.loaded.as_ref().filter(|_| spec_error).and_then(|(file_name, source)| {
            let file = frontend::parse(file_name, source).ok()?;
            let block = file.blocks.iter().find(|block| block.name.text == error.layer)?;
            let item = error.item.and_then(|key| block.items.iter().find(|item| item.key.text == key));
            let (span, label) = match item {
                Some(item) => (item.span, "the kernels cannot compile this"),
                None => (block.name.span, "this layer"),
            };
            let diagnostic = frontend::Error::new(span, error.to_string()).label(label);
            Some(Diagnostics::new(file_name, source, vec![diagnostic]))
        });
        match located {
            Some(diagnostics) => self.print_diagnostics(&diagnostics),
            None if self.json => {
                let line = serde_json::json!({"level": "error", "message": error.to_string()});
                let _ = writeln!(self.io.stderr, "{line}");
            }
            None => {
                let _ = writeln!(self.io.stderr, "error: {error}");
            }
        }
        Status::SpecErrors
    }

    fn usage_error(&mut self, message: &str) -> Status {
        let _ = writeln!(self.io.stderr, "error: {message}");
        Status::Usage
    }

    fn print_diagnostics(&mut self, diagnostics: &Diagnostics) {
        if self.json {
            for line in diagnostics.json_lines() {
                let _ = writeln!(self.io.stderr, "{line}");
            }
        } else if self.colour {
            diagnostics.emit(&mut termcolor::Ansi::new(&mut *self.io.stderr));
        } else {
            diagnostics.emit(&mut termcolor::NoColor::new(&mut *self.io.stderr));
        }
    }

    /// Reads and checks one file; prints its errors. `Err` is the status to exit with.
    fn load(&mut self, path: &Path) -> Result<Vec<AttentionSpec>, Status> {
        let source = match std::fs::read_to_string(path) {
            Ok(source) => source,
            Err(error) => {
                return Err(self.usage_error(&format!("cannot read {}: {error}", path.display())));
            }
        };
        let file_name = path.display().to_string();
        let checked = frontend::parse_and_check(&file_name, &source).map_err(|diagnostics| {
            self.print_diagnostics(&diagnostics);
            Status::SpecErrors
        });
        self.loaded = Some((file_name, source));
        checked
    }

    /// Every layer of the file through every stage `compile` runs short of writing files
    /// (`driver::check_compiles`): `ok: NAME`, or the located error of each that would fail.
    fn check(&mut self, path: &Path) -> Status {
        let specs = match self.load(path) {
            Ok(specs) => specs,
            Err(status) => return status,
        };
        let mut status = Status::Success;
        for spec in specs {
            match driver::check_compiles(&spec) {
                Ok(()) => {
                    let _ = writeln!(self.io.stdout, "ok: {}", spec.name);
                }
                Err(error) => status = status.max(self.compile_error(&error)),
            }
        }
        status
    }

    /// `ccc spec --from-hf CONFIG`: the layers' `.attn`, held to everything `ccc check` holds a
    /// spec to before it is written.
    fn spec_from_hf(&mut self, config: &Path, name: &str, out: Option<&Path>) -> Status {
        let json = match std::fs::read_to_string(config) {
            Ok(json) => json,
            Err(error) => return self.usage_error(&format!("cannot read {}: {error}", config.display())),
        };
        let text = match frontend::attn_from_hf_config(&json, name) {
            Ok(text) => text,
            Err(error) => {
                let _ = writeln!(self.io.stderr, "error: {}: {error}", config.display());
                return Status::SpecErrors;
            }
        };
        let generated = format!("{} (as written from it)", config.display());
        let specs = match frontend::parse_and_check(&generated, &text) {
            Ok(specs) => specs,
            Err(diagnostics) => {
                self.print_diagnostics(&diagnostics);
                return Status::SpecErrors;
            }
        };
        // What `ccc check` holds a spec to: every stage that `compile` runs.
        self.loaded = Some((generated, text.clone()));
        for spec in &specs {
            if let Err(error) = driver::check_compiles(spec) {
                return self.compile_error(&error);
            }
        }
        match out {
            Some(path) => match std::fs::write(path, &text) {
                Ok(()) => Status::Success,
                Err(error) => self.usage_error(&format!("cannot write {}: {error}", path.display())),
            },
            None => {
                let _ = write!(self.io.stdout, "{text}");
                Status::Success
            }
        }
    }

    fn explain(&mut self, path: &Path, seq_len: Option<u64>) -> Status {
        let specs = match self.load(path) {
            Ok(specs) => specs,
            Err(status) => return status,
        };
        let screens: Vec<String> = specs
            .iter()
            .map(|spec| {
                let from_spec = spec.tune.and_then(|tune| tune.seq_len).unwrap_or(DEFAULT_SEQ_LEN);
                let seq_len = seq_len.map_or(from_spec, |n| n as usize);
                explain_text(spec, seq_len)
            })
            .collect();
        let _ = write!(self.io.stdout, "{}", screens.join("\n"));
        Status::Success
    }

    fn compile(
        &mut self,
        path: &Path,
        out_dir: &Path,
        emit: Option<driver::Stage>,
        flags: CompileFlags,
    ) -> Status {
        let print_after_all = flags.print_after_all;
        let specs = match self.load(path) {
            Ok(specs) => specs,
            Err(status) => return status,
        };
        if print_after_all && emit.is_none() {
            return self.usage_error("--print-after-all needs --emit STAGE (it prints every stage up to that one)");
        }
        if emit.is_some() && flags.tuning.is_some() {
            return self.usage_error("--tuning applies to the libraries compile writes, not to --emit");
        }
        if let Some(emit) = emit {
            // With --print-after-all, every stage from the spec up to the one asked for, in the
            // order the compiler runs them, the graph after every pass.
            let stages: Vec<driver::Stage> = if print_after_all {
                driver::Stage::IN_ORDER.iter().copied().take_while(|stage| *stage != emit).chain([emit]).collect()
            } else {
                vec![emit]
            };
            let mut texts = Vec::new();
            for spec in &specs {
                let stage_texts = match driver::stage_texts(spec, &stages, print_after_all) {
                    Ok(Some(stage_texts)) => stage_texts,
                    Ok(None) => return self.usage_error(NO_LLVM),
                    Err(error) => return self.compile_error(&error),
                };
                for (stage, text) in stages.iter().zip(stage_texts) {
                    // The graph stage heads each of its passes itself.
                    if print_after_all && *stage != driver::Stage::Graph {
                        texts.push(format!("// ===== {} {}\n{text}", spec.name, stage.name()));
                    } else {
                        texts.push(text);
                    }
                }
            }
            let _ = write!(self.io.stdout, "{}", texts.join("\n"));
            return Status::Success;
        }
        self.write_libraries(&specs, out_dir, &flags)
    }

    fn tune(&mut self, path: &Path, request: TuneRequest) -> Status {
        if !request.list && request.out_dir.is_none() {
            return self.usage_error("tune needs --list or -o DIR");
        }
        let specs = match self.load(path) {
            Ok(specs) => specs,
            Err(status) => return status,
        };
        self.tune_specs(&specs, &request)
    }

    #[cfg(feature = "llvm")]
    fn tune_specs(&mut self, specs: &[AttentionSpec], request: &TuneRequest) -> Status {
        use crate::codegen::hopper::ProblemShape;
        for spec in specs {
            let mut shape = ProblemShape::of(spec);
            shape.batch = request.batch.unwrap_or(shape.batch);
            shape.seq_len = request.seq_len.unwrap_or(shape.seq_len);
            if request.list {
                match driver::tile_listing(spec, Some(shape)) {
                    Ok(text) => {
                        let _ = write!(self.io.stdout, "{text}");
                    }
                    Err(error) => return self.compile_error(&error),
                }
                continue;
            }
            let Some(out_dir) = &request.out_dir else { continue };
            let options = driver::CompileOptions {
                cache: crate::codegen::cache::PtxCache::from_env(),
                ..driver::CompileOptions::default()
            };
            let directory = out_dir.join(&spec.name);
            let written = driver::write_tuning_candidates(spec, shape, request.top, &options, &directory);
            match written {
                Ok(Ok(index)) => {
                    let libraries: usize = index.kernels.iter().map(|k| k.candidates.len()).sum();
                    let _ = writeln!(
                        self.io.stdout,
                        "wrote {} ({} kernels, {libraries} candidate libraries); time them on the GPU with \
                         `ccc-run tune {} --batch {} --seq-len {}`",
                        directory.join(crate::tuning::INDEX_FILE).display(),
                        index.kernels.len(),
                        directory.display(),
                        shape.batch,
                        shape.seq_len
                    );
                }
                Ok(Err(error)) => return self.usage_error(&format!("cannot write {}: {error}", directory.display())),
                Err(error) => return self.compile_error(&error),
            }
        }
        Status::Success
    }

    #[cfg(not(feature = "llvm"))]
    fn tune_specs(&mut self, _: &[AttentionSpec], _: &TuneRequest) -> Status {
        self.usage_error(NO_LLVM)
    }

    /// The tiles `--tuning` gives `spec`: none without the flag, or for another layer's file.
    #[cfg(feature = "llvm")]
    fn tuned_tiles(
        &mut self,
        spec: &AttentionSpec,
        tuning: Option<&Path>,
    ) -> Result<Vec<(String, crate::tuning::TileChoice)>, Status> {
        use crate::tuning::{TuningResult, find_result};
        let Some(path) = tuning else { return Ok(Vec::new()) };
        let (source, result) = if path.is_dir() {
            match find_result(path, spec) {
                Ok((file, result)) => (file.display().to_string(), result),
                Err(message) => return Err(self.usage_error(&message)),
            }
        } else {
            let text = match std::fs::read_to_string(path) {
                Ok(text) => text,
                Err(error) => return Err(self.usage_error(&format!("cannot read {}: {error}", path.display()))),
            };
            let source = path.display().to_string();
            match TuningResult::parse(&text, &source) {
                Ok(result) if result.layer != spec.name => return Ok(Vec::new()),
                Ok(result) => (source, result),
                Err(message) => return Err(self.usage_error(&message)),
            }
        };
        result.tiles_for(spec, &source).map_err(|message| self.usage_error(&message))
    }

    #[cfg(feature = "llvm")]
    fn write_libraries(
        &mut self,
        specs: &[AttentionSpec],
        out_dir: &Path,
        flags: &CompileFlags,
    ) -> Status {
        use crate::codegen::cache::PtxCache;
        if let Some(path) = flags.tuning.as_deref().filter(|path| !path.is_dir()) {
            // A result file names its layer: one of these must be it.
            let layer = std::fs::read_to_string(path)
                .map_err(|error| format!("cannot read {}: {error}", path.display()))
                .and_then(|text| crate::tuning::TuningResult::parse(&text, &path.display().to_string()))
                .map(|result| result.layer);
            match layer {
                Ok(layer) if specs.iter().any(|spec| spec.name == layer) => {}
                Ok(layer) => {
                    let names: Vec<&str> = specs.iter().map(|spec| spec.name.as_str()).collect();
                    return self.usage_error(&format!(
                        "{} holds tiles for layer `{layer}`, which this file does not define (it defines {})",
                        path.display(),
                        names.join(", ")
                    ));
                }
                Err(message) => return self.usage_error(&message),
            }
        }
        for spec in specs {
            let tiles = match self.tuned_tiles(spec, flags.tuning.as_deref()) {
                Ok(tiles) => tiles,
                Err(status) => return status,
            };
            let options = driver::CompileOptions {
                cache: if flags.cache { PtxCache::from_env() } else { None },
                ptxas: flags.ptxas,
                cubin: flags.cubin,
                tiles,
            };
            let library = match driver::compile_library(spec, &options) {
                Ok(library) => library,
                Err(error) => return self.compile_error(&error),
            };
            let directory = out_dir.join(&spec.name);
            if let Err(error) = driver::write_library(&library, &directory) {
                return self.usage_error(&format!("cannot write {}: {error}", directory.display()));
            }
            let kernels = library.manifest.entry_points.iter().map(|e| e.kernels.len()).sum::<usize>();
            let cubin = library.cubin.as_ref().map(|cubin| format!(", {} bytes of cubin", cubin.len())).unwrap_or_default();
            let _ = writeln!(
                self.io.stdout,
                "wrote {} ({kernels} kernels, {} bytes of PTX{cubin})",
                directory.display(),
                library.ptx.len()
            );
        }
        Status::Success
    }

    #[cfg(not(feature = "llvm"))]
    fn write_libraries(&mut self, _: &[AttentionSpec], _: &Path, _: &CompileFlags) -> Status {
        self.usage_error(NO_LLVM)
    }
}
