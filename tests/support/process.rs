//! `taskgate serve` as a bare child process: the harness's `Gateway` waits
//! for "ready", which is exactly what start-up and bad-config tests must not
//! assume. Every wait is bounded; dropping a `Proc` kills and reaps it.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::TOKEN;

/// A `taskgate serve` child. Dropping it kills and reaps a child still running.
pub struct Proc {
    child: Option<Child>,
    pid: u32,
    stderr: mpsc::Receiver<String>,
    seen: Vec<String>,
    _dir: tempfile::TempDir,
}

/// Writes `toml` to a fresh directory and starts `taskgate serve` on it, with
/// the token in the environment, the audit log in that directory and
/// `upstream` as the vendor URL.
pub fn spawn_serve(toml: &str, upstream: &str) -> Proc {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("taskgate.toml");
    std::fs::write(&config, toml).expect("write config");
    let mut child = Command::new(env!("CARGO_BIN_EXE_taskgate"))
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .current_dir(dir.path())
        .env_remove("TASKGATE_UPSTREAM_TOKEN_FILE")
        .env_remove("TASKGATE_LISTEN")
        .env_remove("TASKGATE_ADMIN_LISTEN")
        .env_remove("RUST_LOG")
        .env("TASKGATE_UPSTREAM_TOKEN", TOKEN)
        .env("TASKGATE_UPSTREAM_URL", upstream)
        .env("TASKGATE_AUDIT_PATH", dir.path().join("audit.jsonl"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn taskgate");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let stream = child.stderr.take().expect("stderr piped");
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    Proc {
        child: Some(child),
        pid,
        stderr: rx,
        seen: Vec::new(),
        _dir: dir,
    }
}

impl Proc {
    /// Whether the process has a handler installed for signal number `signo`
    /// (the `SigCgt` mask in `/proc/<pid>/status`). Once true it stays true:
    /// taskgate never restores a default action.
    pub fn catches(&self, signo: u32) -> bool {
        let Ok(status) = std::fs::read_to_string(format!("/proc/{}/status", self.pid)) else {
            return false;
        };
        status
            .lines()
            .find_map(|l| l.strip_prefix("SigCgt:"))
            .and_then(|mask| u64::from_str_radix(mask.trim(), 16).ok())
            .is_some_and(|mask| mask & (1 << (signo - 1)) != 0)
    }

    /// Sends `sig` (e.g. "TERM"). Only called while the child is unreaped,
    /// so the pid is still ours even if the process has died.
    pub fn signal(&self, sig: &str) {
        assert!(self.child.is_some(), "signal after the child was reaped");
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid.to_string())
            .stderr(Stdio::null())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{sig} {} failed", self.pid);
    }

    /// Waits for the "taskgate ready" line: true when it came, false when
    /// stderr closed without it (the process is gone). Panics after `within`.
    pub fn wait_ready(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    let ready = line.contains("taskgate ready");
                    self.seen.push(line);
                    if ready {
                        return true;
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return false,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "no ready line and no exit within {within:?}; stderr:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits (bounded) for the child to exit; SIGKILLs it and panics if it
    /// does not within `within`.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("child not yet reaped");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(within) {
            Ok(status) => status.expect("wait for taskgate"),
            Err(_) => {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(self.pid.to_string())
                    .status();
                let _ = rx.recv_timeout(Duration::from_secs(5));
                panic!(
                    "taskgate did not exit within {within:?}; stderr:\n{}",
                    self.stderr_text()
                );
            }
        }
    }

    /// Everything read from stderr so far (the rest drained without waiting).
    pub fn stderr_text(&mut self) -> String {
        let rest: Vec<String> = self.stderr.try_iter().collect();
        self.seen.extend(rest);
        self.seen.join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// How a process ended, for messages: "exit 0", "killed by signal 15".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(sig)) => format!("killed by signal {sig}"),
        _ => format!("{status:?}"),
    }
}

/// A vendor URL nobody answers on: a bound port that never accepts. Nothing
/// is asked of the vendor during start-up.
pub fn silent_upstream() -> (std::net::TcpListener, String) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", l.local_addr().expect("addr"));
    (l, url)
}

/// A config with both listeners on free ports and every other key at its default.
pub const STARTUP_CONFIG: &str = "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n";
/// One bounded wait (ready line, exit) for a debug build on a busy 2-core machine.
pub const STEP: Duration = Duration::from_secs(15);
