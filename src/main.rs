use std::io::IsTerminal;
use std::process::ExitCode;

fn main() -> ExitCode {
    let stderr_is_terminal = std::io::stderr().is_terminal();
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr().lock();
    let mut io = ccc::cli::Io { stdout: &mut stdout, stderr: &mut stderr, stderr_is_terminal };
    let status = ccc::cli::run(std::env::args_os(), &mut io);
    ExitCode::from(status as u8)
}
