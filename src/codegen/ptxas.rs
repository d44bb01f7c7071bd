//! Runs NVIDIA's `ptxas` on emitted PTX and reads its `-v` resource report (registers, shared
//! memory, spills), so tests can hold kernels to "assembles for sm_90a with no spills".

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use super::TARGET_CPU;

/// The resources ptxas reports for one kernel.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PtxasReport {
    pub kernel: String,
    pub registers: u32,
    /// Static shared memory (dynamic shared memory is sized at launch and not counted).
    pub shared_bytes: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
    pub stack_frame: u32,
}

/// Where ptxas is: `$CCC_PTXAS`, else the project virtualenv made by scripts/setup.sh.
pub fn find_ptxas() -> Result<PathBuf, String> {
    if let Some(path) = std::env::var_os("CCC_PTXAS") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(format!("CCC_PTXAS={} is not a file; unset it or run scripts/setup.sh", path.display()))
        };
    }
    let lib = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/lib");
    let candidates = std::fs::read_dir(&lib).map_err(|_| missing_ptxas())?;
    candidates
        .filter_map(|entry| entry.ok())
        .filter(|entry| entry.file_name().to_string_lossy().starts_with("python3"))
        .map(|entry| entry.path().join("site-packages/nvidia/cu13/bin/ptxas"))
        .find(|path| path.is_file())
        .ok_or_else(missing_ptxas)
}

fn missing_ptxas() -> String {
    "ptxas not found (neither $CCC_PTXAS nor .venv/lib/python3*/site-packages/nvidia/cu13/bin/ptxas): run scripts/setup.sh".to_string()
}

/// Assembles `ptx` for sm_90a with `ptxas -v` and returns one report per kernel, in the order
/// ptxas lists them. Errors carry ptxas's own messages.
pub fn assemble(ptx: &str) -> Result<Vec<PtxasReport>, String> {
    assemble_cubin(ptx).map(|assembled| assembled.reports)
}

/// What ptxas made of a module: its report per kernel and the cubin.
pub struct Assembled {
    pub reports: Vec<PtxasReport>,
    pub cubin: Vec<u8>,
}

/// [`assemble`], keeping the cubin.
pub fn assemble_cubin(ptx: &str) -> Result<Assembled, String> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let ptxas = find_ptxas()?;
    let unique = format!("ccc-ptxas-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
    let dir = std::env::temp_dir().join(unique);
    std::fs::create_dir_all(&dir).map_err(|error| format!("cannot create {}: {error}", dir.display()))?;
    let input = dir.join("kernel.ptx");
    let output = dir.join("kernel.cubin");
    let result = std::fs::write(&input, ptx)
        .map_err(|error| format!("cannot write {}: {error}", input.display()))
        .and_then(|()| {
            Command::new(&ptxas)
                .arg(format!("-arch={TARGET_CPU}"))
                .arg("-v")
                .arg(&input)
                .arg("-o")
                .arg(&output)
                .output()
                .map_err(|error| format!("cannot run {}: {error}", ptxas.display()))
        });
    let cubin = std::fs::read(&output);
    let _ = std::fs::remove_dir_all(&dir);
    let run = result?;
    let log = format!("{}{}", String::from_utf8_lossy(&run.stdout), String::from_utf8_lossy(&run.stderr));
    if !run.status.success() {
        return Err(format!("ptxas failed ({}):\n{log}", run.status));
    }
    let cubin = cubin.map_err(|error| format!("cannot read the cubin ptxas wrote: {error}"))?;
    Ok(Assembled { reports: parse_report(&log)?, cubin })
}

/// Reads ptxas's `-v` log.
pub fn parse_report(log: &str) -> Result<Vec<PtxasReport>, String> {
    let mut reports: Vec<PtxasReport> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let kernel = rest.split('\'').next().unwrap_or_default();
            reports.push(PtxasReport { kernel: kernel.to_string(), ..PtxasReport::default() });
            continue;
        }
        let Some(current) = reports.last_mut() else { continue };
        if line.contains("bytes stack frame") {
            current.stack_frame = number_before(line, "bytes stack frame")?;
            current.spill_stores = number_before(line, "bytes spill stores")?;
            current.spill_loads = number_before(line, "bytes spill loads")?;
        } else if line.contains("Used") && line.contains("registers") {
            current.registers = number_before(line, "registers")?;
            if line.contains("bytes smem") {
                current.shared_bytes = number_before(line, "bytes smem")?;
            }
        }
    }
    if reports.is_empty() {
        return Err(format!("ptxas reported no entry functions:\n{log}"));
    }
    Ok(reports)
}

/// The integer right before `marker` in `line` ("... 12 bytes spill stores").
fn number_before(line: &str, marker: &str) -> Result<u32, String> {
    let before = line.split(marker).next().filter(|prefix| prefix.len() < line.len());
    before
        .and_then(|prefix| prefix.split(|c: char| !c.is_ascii_digit()).rfind(|word| !word.is_empty()))
        .and_then(|digits| digits.parse().ok())
        .ok_or_else(|| format!("cannot read `{marker}` from ptxas line: {line}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ptxas_verbose_report() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'gemm' for 'sm_90a'\n\
ptxas info    : Function properties for gemm\n\
    8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n\
ptxas info    : Used 126 registers, used 1 barriers, 40960 bytes smem, 400 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'attention' for 'sm_90a'\n\
ptxas info    : Function properties for attention\n\
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 167 registers, used 1 barriers, 392 bytes cmem[0]\n";
        let reports = parse_report(log).expect("parse");
        assert_eq!(
            reports,
            vec![
                PtxasReport { kernel: "gemm".into(), registers: 126, shared_bytes: 40960, spill_stores: 12, spill_loads: 16, stack_frame: 8 },
                PtxasReport { kernel: "attention".into(), registers: 167, shared_bytes: 0, spill_stores: 0, spill_loads: 0, stack_frame: 0 },
            ]
        );
    }

    #[test]
    fn a_log_without_kernels_is_an_error() {
        assert!(parse_report("ptxas info    : 0 bytes gmem\n").is_err());
    }
}
