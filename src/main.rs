//! The `taskgate` binary: catch signals (long-running subcommands), parse the
//! command line, hand over to the library, turn the result into an exit code.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // Before anything else, argument parsing included: a SIGHUP or SIGTERM
    // a millisecond after `exec` must find the handlers in place.
    let signals = taskgate::cli::catch_signals_early();
    let cli = taskgate::cli::Cli::parse();
    taskgate::cli::run(cli, signals)
}
