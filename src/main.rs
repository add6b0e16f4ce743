//! The `taskgate` binary: catch signals (long-running subcommands), parse the
//! command line, hand over to the library, turn the result into an exit code.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;

/// glibc's malloc took ~10 % of a request's CPU (arena locking, free-list
/// consolidation); mimalloc's per-thread free lists cost a fraction of it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    // Before anything else, argument parsing included: a SIGHUP or SIGTERM
    // a millisecond after `exec` must find the handlers in place.
    let signals = taskgate::cli::catch_signals_early();
    let cli = taskgate::cli::Cli::parse();
    taskgate::cli::run(cli, signals)
}
