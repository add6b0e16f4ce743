//! The `taskgate` binary: parse the command line, hand over to the library, turn the result into an exit code.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = taskgate::cli::Cli::parse();
    taskgate::cli::run(cli)
}
