//! The `huginn` binary: a thin command-line layer over the library.

mod cli;

fn main() -> std::process::ExitCode {
    huginn::cpu_threads::configure();
    match cli::run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
