//! Entry point: parse the command line, run, map the outcome to an exit code.

use std::process::ExitCode;

use clap::Parser;
use imds_hop_proxy::app::{self, EXIT_USAGE};
use imds_hop_proxy::cli::Cli;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // --help and --version print to stdout and succeed; every real usage error,
            // including an out-of-range flag value, is EX_USAGE like an invalid config file.
            let code = if err.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    match app::main_inner(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("imds-hop-proxy: {err}");
            ExitCode::from(err.exit_code())
        }
    }
}
