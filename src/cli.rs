//! The command line: `serve`, `check`, `mock-upstream`, `demo`. Each
//! subcommand loads what it needs, runs, and returns the process exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::app::{self, Stopped};
use crate::config::{Config, Listen, LogFormat, RawConfig};
use crate::mock_vendor::{self, MockOptions, MockVendor};
use crate::signals::Signals;
use crate::telemetry;

#[derive(Debug, Parser)]
#[command(
    name = "taskgate",
    version,
    about = "Sidecar gateway for the vendor's task-update API"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gateway.
    Serve {
        /// TOML config file; without one every key takes its default.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config and print the effective settings (token redacted).
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Audit-log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Run the vendor emulator (for local trials, tests and benchmarks).
    MockUpstream {
        #[arg(long, default_value = "127.0.0.1:9080")]
        listen: String,
        /// JSON file of caller lines: {"<user_id>[/<sub_user_id>]" | "*": [{name, value, residue, call_line}]}.
        #[arg(long)]
        lines: Option<PathBuf>,
        /// Require this bearer token (default: accept any).
        #[arg(long, env = "MOCK_UPSTREAM_TOKEN")]
        token: Option<String>,
        /// A successful update consumes its line's residue.
        #[arg(long)]
        consume: bool,
    },
    /// The emulator and the gateway together, on the default ports, ready for curl.
    Demo {
        /// Optional gateway config; the upstream and token are the emulator's.
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long, default_value = "127.0.0.1:9080")]
        upstream_listen: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check the hash chain of audit files, given oldest first (rotated files,
    /// then the active one: `taskgate audit verify taskgate-audit*.jsonl`).
    Verify {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
}

/// Exit code for a configuration error (EX_CONFIG in sysexits.h).
const EXIT_CONFIG: u8 = 78;

/// The subcommands that run until stopped, and so catch signals.
const LONG_RUNNING: [&str; 3] = ["serve", "demo", "mock-upstream"];

/// Installs the signal handlers when the first argument names a long-running
/// subcommand (`check` and `audit verify` keep the default actions). Called
/// by `main` before the arguments are parsed, the earliest point there is.
pub fn catch_signals_early() -> Option<std::io::Result<Signals>> {
    let first = std::env::args_os().nth(1)?;
    LONG_RUNNING
        .iter()
        .any(|c| first == *c)
        .then(Signals::install)
}

/// Runs the parsed command; `signals` are those [`catch_signals_early`]
/// installed (installed now when `None` and the command needs them).
pub fn run(cli: Cli, signals: Option<std::io::Result<Signals>>) -> ExitCode {
    let mut early = Some(signals);
    let mut signals = move || match early.take().flatten() {
        Some(Ok(s)) => Ok(s),
        Some(Err(e)) => Err(fail(1, format!("cannot install signal handlers: {e}"))),
        None => install_signals(),
    };
    match cli.command {
        Command::Serve { config } => match signals() {
            Ok(s) => serve(config, s),
            Err(code) => code,
        },
        Command::Check { config } => check(config),
        Command::Audit {
            command: AuditCommand::Verify { files },
        } => audit_verify(&files),
        Command::MockUpstream {
            listen,
            lines,
            token,
            consume,
        } => match signals() {
            Ok(s) => mock_upstream(listen, lines, token, consume, s),
            Err(code) => code,
        },
        Command::Demo {
            config,
            upstream_listen,
        } => match signals() {
            Ok(s) => demo(config, upstream_listen, s),
            Err(code) => code,
        },
    }
}

fn fail(code: u8, msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("taskgate: {msg}");
    ExitCode::from(code)
}

fn runtime(workers: usize) -> std::io::Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if workers > 0 {
        b.worker_threads(workers);
    }
    b.enable_all().build()
}

/// Exit code after a second stop signal cut the drain short (128 + SIGINT).
const EXIT_HURRIED: u8 = 130;

/// Catches SIGTERM/SIGINT/SIGHUP before anything else happens, so no signal
/// during start-up takes its default action.
fn install_signals() -> Result<Signals, ExitCode> {
    Signals::install().map_err(|e| fail(1, format!("cannot install signal handlers: {e}")))
}

fn exit_code(stopped: Stopped) -> ExitCode {
    match stopped {
        Stopped::Clean => ExitCode::SUCCESS,
        Stopped::Hurried => ExitCode::from(EXIT_HURRIED),
    }
}

fn serve(path: Option<PathBuf>, mut signals: Signals) -> ExitCode {
    let config = match Config::load(path.as_deref()) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    telemetry::init(config.log_format);
    let rt = match runtime(config.worker_threads) {
        Ok(rt) => rt,
        Err(e) => return fail(1, format!("cannot start the runtime: {e}")),
    };
    let result = rt.block_on(app::run(config, path, &mut signals));
    signals.close();
    match result {
        Ok(stopped) => exit_code(stopped),
        Err(e) => fail(1, e),
    }
}

fn check(path: PathBuf) -> ExitCode {
    let raw = match RawConfig::read(Some(&path)) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    match Config::from_raw(raw.clone(), |k| std::env::var(k).ok()) {
        Ok(config) => {
            print!("{}", config.to_redacted_toml(&raw));
            eprintln!("taskgate: {} is valid", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => fail(EXIT_CONFIG, e),
    }
}

/// Exit 0 with the count verified, 1 naming the first bad record, 2 when a
/// file cannot be read.
fn audit_verify(files: &[PathBuf]) -> ExitCode {
    match crate::audit::verify(files) {
        Ok(report) => {
            println!(
                "ok: {} records verified (seq {}..={}){}; last hash {}",
                report.records,
                report.first_seq.unwrap_or(0),
                report.last_seq.unwrap_or(0),
                if report.torn > 0 {
                    format!(
                        ", {} torn line(s) skipped at {}",
                        report.torn,
                        report
                            .torn_lines
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                } else {
                    String::new()
                },
                report.last_hash.as_deref().unwrap_or("-"),
            );
            ExitCode::SUCCESS
        }
        Err(e @ crate::audit::VerifyError::Io { .. }) => fail(2, e),
        Err(e) => {
            println!("broken: {e}");
            ExitCode::from(1)
        }
    }
}

fn mock_upstream(
    listen: String,
    lines: Option<PathBuf>,
    token: Option<String>,
    consume: bool,
    mut signals: Signals,
) -> ExitCode {
    telemetry::init(LogFormat::Text);
    let lines = match lines.map(|p| mock_vendor::read_lines(&p)).transpose() {
        Ok(l) => l.unwrap_or_else(mock_vendor::sample_lines),
        Err(e) => return fail(EXIT_CONFIG, format!("--lines {e}")),
    };
    let rt = match runtime(0) {
        Ok(rt) => rt,
        Err(e) => return fail(1, e),
    };
    rt.block_on(async {
        let opts = MockOptions {
            token,
            lines,
            consume,
        };
        let vendor = match MockVendor::bind(&listen, opts).await {
            Ok(v) => v,
            Err(e) => return fail(1, format!("cannot listen on {listen}: {e}")),
        };
        vendor.set_recording(false);
        tracing::info!(listen = %vendor.addr, "vendor emulator ready");
        signals.stop().await;
        vendor.stop().await;
        ExitCode::SUCCESS
    })
}

/// What `demo` prints: the vendor page's curl aimed at the gateway, a dry run
/// of it, how caller keys work, and the example user's rate limit.
fn demo_banner(config: &Config, vendor: std::net::SocketAddr) -> String {
    let (socket, host) = match &config.listen {
        Listen::Tcp(addr) => (String::new(), addr.to_string()),
        Listen::Unix(path) => (
            format!("--unix-socket {} ", path.display()),
            "localhost".into(),
        ),
    };
    let url = format!(
        "http://{host}/agent-api/user/{}/task/{}",
        mock_vendor::EXAMPLE_USER,
        mock_vendor::EXAMPLE_TASK
    );
    let body = mock_vendor::EXAMPLE_BODY;
    // With callers configured (demo --config FILE) every curl needs a key.
    let key = match config.access.callers.first() {
        Some(c) => format!("-H \"Authorization: Bearer <key of caller {}>\" ", c.name),
        None => String::new(),
    };
    let callers = if config.access.callers.is_empty() {
        format!(
            "Caller keys are off in the demo (any local process may call). To require one, \
             pass --config FILE holding\n  [[access.callers]]\n  name = \"billing\"\n  \
             key_sha256 = \"<printf %s KEY | sha256sum>\"\n\
             and send the key:\n\
             curl {socket}-X PUT \"{url}\" -H \"Authorization: Bearer KEY\" \
             -H \"Content-Type: application/json\" -d '{body}'\n"
        )
    } else {
        format!(
            "Caller keys are on ({} configured): replace <key of caller …> with the key \
             whose SHA-256 is that caller's key_sha256; without it the answer is 401.\n",
            config.access.callers.len()
        )
    };
    let quota = config.rate_limit.quota_for(mock_vendor::EXAMPLE_USER);
    format!(
        "\ntaskgate demo: vendor emulator on {vendor}, gateway on {}. Try:\n\n\
         curl {socket}-X PUT \"{url}\" \\\n  {key}\
         -H \"Content-Type: application/json\" \\\n  \
         -d '{body}'\n\n\
         A dry run (every check, nothing forwarded, no audit record):\n\
         curl {socket}-X PUT \"{url}\" {key}-H \"X-Taskgate-Dry-Run: true\" \
         -H \"Content-Type: application/json\" -d '{body}'\n\n\
         {callers}\n\
         The example user may send a burst of {} updates, then {} per second \
         (rate_limit.burst / per_second; dry runs count too): past that the answer is \
         429 with Retry-After.\n",
        config.listen, quota.burst, quota.per_second,
    )
}

fn demo(path: Option<PathBuf>, upstream_listen: String, mut signals: Signals) -> ExitCode {
    const DEMO_TOKEN: &str = "demo-token-not-secret";
    let raw = match RawConfig::read(path.as_deref()) {
        Ok(r) => r,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    let upstream_url = format!("http://{upstream_listen}");
    let config = match Config::from_raw(raw, |k| match k {
        "TASKGATE_UPSTREAM_URL" => Some(upstream_url.clone()),
        "TASKGATE_UPSTREAM_TOKEN" => Some(DEMO_TOKEN.to_owned()),
        _ => std::env::var(k).ok(),
    }) {
        Ok(c) => c,
        Err(e) => return fail(EXIT_CONFIG, e),
    };
    telemetry::init(config.log_format);
    let rt = match runtime(config.worker_threads) {
        Ok(rt) => rt,
        Err(e) => return fail(1, e),
    };
    rt.block_on(async {
        let opts = MockOptions {
            token: Some(DEMO_TOKEN.to_owned()),
            ..MockOptions::default()
        };
        let vendor = match MockVendor::bind(&upstream_listen, opts).await {
            Ok(v) => v,
            Err(e) => {
                return fail(
                    1,
                    format!("emulator cannot listen on {upstream_listen}: {e}"),
                );
            }
        };
        vendor.set_recording(false);
        eprint!("{}", demo_banner(&config, vendor.addr));
        let result = app::run(config, path, &mut signals).await;
        vendor.stop().await;
        match result {
            Ok(stopped) => exit_code(stopped),
            Err(e) => fail(1, e),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> Config {
        let raw = RawConfig::parse(toml).unwrap();
        Config::from_raw(raw, |k| {
            (k == "TASKGATE_UPSTREAM_TOKEN").then(|| "t".into())
        })
        .unwrap()
    }

    #[test]
    fn demo_banner_shows_a_dry_run_and_how_caller_keys_work() {
        let vendor = "127.0.0.1:9080".parse().unwrap();
        let text = demo_banner(&config(""), vendor);
        let dry = text
            .lines()
            .find(|l| l.contains("X-Taskgate-Dry-Run: true"))
            .expect("a dry-run line");
        assert!(dry.starts_with("curl -X PUT \"http://127.0.0.1:8080/agent-api/user/"));
        assert!(dry.contains(mock_vendor::EXAMPLE_BODY));
        assert!(text.contains("[[access.callers]]"), "{text}");
        let keyed = text
            .lines()
            .find(|l| l.contains("Authorization: Bearer KEY"))
            .expect("a caller-key line");
        assert!(keyed.starts_with("curl "), "{keyed}");
        // The plain curl carries no key: callers are off in the demo.
        let lines: Vec<_> = text.lines().collect();
        assert!(lines[3].starts_with("curl -X PUT"), "{text}");
        assert!(!lines[4].contains("Authorization"), "{text}");

        let text = demo_banner(
            &config(
                "listen = \"unix:/tmp/tg.sock\"\n[[access.callers]]\nname = \"billing\"\n\
                 key_sha256 = \"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\"\n",
            ),
            vendor,
        );
        assert!(text.contains("curl --unix-socket /tmp/tg.sock -X PUT \"http://localhost/"));
        assert!(text.contains("Authorization: Bearer <key of caller billing>"));
        assert!(!text.contains("Bearer KEY"), "{text}");
    }
}
