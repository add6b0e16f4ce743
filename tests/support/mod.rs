//! Test harness: the real `taskgate` binary started as a child process on
//! 127.0.0.1:0, the vendor emulator in-process, and a small HTTP client.
//! Everything waits on events (a log line, a request arriving), never on sleeps.
#![allow(dead_code, unused_imports)]

pub mod process;
pub mod raw;
pub mod redis;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tokio::sync::watch;

pub use taskgate::mock_vendor::{
    EXAMPLE_BODY, EXAMPLE_LINE, EXAMPLE_TASK, EXAMPLE_USER, Fault, Line, MockOptions, MockVendor,
    Recorded, SUCCESS_BODY,
};

/// A token unlikely to occur by chance, so a leak is easy to spot.
pub const TOKEN: &str = "tg-test-token-7f3a9c2e51b8";

pub fn task_path(user: &str, task: &str) -> String {
    format!("/agent-api/user/{user}/task/{task}")
}

pub fn example_path() -> String {
    task_path(EXAMPLE_USER, EXAMPLE_TASK)
}

/// The emulator on an ephemeral port, requiring the test token.
pub async fn vendor() -> MockVendor {
    vendor_with(MockOptions {
        token: Some(TOKEN.into()),
        ..MockOptions::default()
    })
    .await
}

pub async fn vendor_with(opts: MockOptions) -> MockVendor {
    MockVendor::bind("127.0.0.1:0", opts)
        .await
        .expect("emulator binds")
}

/// Output of a child process, line by line, with a watch that ticks per line.
#[derive(Clone)]
struct Lines {
    lines: Arc<Mutex<Vec<String>>>,
    tick: watch::Sender<usize>,
}

impl Lines {
    fn new() -> Lines {
        Lines {
            lines: Arc::new(Mutex::new(Vec::new())),
            tick: watch::channel(0).0,
        }
    }

    fn follow(&self, stream: impl std::io::Read + Send + 'static) {
        let me = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let n = {
                    let mut all = me.lines.lock().unwrap();
                    all.push(line);
                    all.len()
                };
                me.tick.send_replace(n);
            }
        });
    }

    fn snapshot(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    /// Waits (bounded) until some line satisfies `pred`; returns it.
    async fn wait_for(&self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let mut rx = self.tick.subscribe();
        let found = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                if let Some(l) = self.snapshot().into_iter().find(|l| pred(l)) {
                    return l;
                }
                if rx.changed().await.is_err() {
                    // Stream closed: one last look.
                    return self
                        .snapshot()
                        .into_iter()
                        .find(|l| pred(l))
                        .unwrap_or_default();
                }
            }
        })
        .await;
        match found {
            Ok(l) if !l.is_empty() => l,
            _ => panic!(
                "timed out waiting for {what}; output so far:\n{}",
                self.snapshot().join("\n")
            ),
        }
    }
}

/// A running `taskgate serve`.
pub struct Gateway {
    child: Option<Child>,
    /// The data listener; `0.0.0.0:0` (which nothing answers) when it is a
    /// Unix socket, whose path is then in `socket`.
    pub addr: SocketAddr,
    pub socket: Option<PathBuf>,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    stdout: Lines,
    stderr: Lines,
}

pub struct GatewayBuilder {
    upstream: String,
    toml: String,
    env: Vec<(String, String)>,
    token_in_env: bool,
}

impl GatewayBuilder {
    /// Extra TOML appended to the generated config (tables allowed).
    pub fn toml(mut self, extra: &str) -> Self {
        self.toml.push_str(extra);
        self.toml.push('\n');
        self
    }

    pub fn env(mut self, k: &str, v: &str) -> Self {
        self.env.push((k.into(), v.into()));
        self
    }

    /// Do not set TASKGATE_UPSTREAM_TOKEN (the test provides a token file).
    pub fn no_token_env(mut self) -> Self {
        self.token_in_env = false;
        self
    }

    pub async fn start(self) -> Gateway {
        let dir = tempfile::tempdir().expect("tempdir");
        let config_path = dir.path().join("taskgate.toml");
        let toml = format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nshutdown_grace_ms = 5000\n{}\n",
            self.toml
        );
        std::fs::write(&config_path, toml).expect("write config");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_taskgate"));
        cmd.arg("serve")
            .arg("--config")
            .arg(&config_path)
            .current_dir(dir.path())
            .env_remove("TASKGATE_UPSTREAM_TOKEN")
            .env_remove("TASKGATE_UPSTREAM_TOKEN_FILE")
            .env("TASKGATE_UPSTREAM_URL", &self.upstream)
            .env("TASKGATE_AUDIT_PATH", dir.path().join("audit.jsonl"))
            .env("RUST_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if self.token_in_env {
            cmd.env("TASKGATE_UPSTREAM_TOKEN", TOKEN);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn taskgate");
        let stdout = Lines::new();
        let stderr = Lines::new();
        stdout.follow(child.stdout.take().expect("stdout piped"));
        stderr.follow(child.stderr.take().expect("stderr piped"));
        let ready = stderr
            .wait_for("the ready line", |l| l.contains("taskgate ready"))
            .await;
        let v: Value = serde_json::from_str(&ready).expect("ready line is JSON");
        let listen = v["listen"].as_str().expect("listen field");
        let socket = listen.strip_prefix("unix:").map(PathBuf::from);
        let addr = match socket {
            Some(_) => SocketAddr::from(([0, 0, 0, 0], 0)),
            None => listen.parse().expect("addr"),
        };
        let admin = v["admin_listen"]
            .as_str()
            .expect("admin field")
            .parse()
            .expect("addr");
        Gateway {
            child: Some(child),
            addr,
            socket,
            admin,
            dir,
            config_path,
            stdout,
            stderr,
        }
    }
}

impl Gateway {
    pub fn builder(upstream: &str) -> GatewayBuilder {
        GatewayBuilder {
            upstream: upstream.to_owned(),
            toml: String::new(),
            env: Vec::new(),
            token_in_env: true,
        }
    }

    pub async fn start(upstream: &str) -> Gateway {
        Gateway::builder(upstream).start().await
    }

    /// A GET on the admin listener (`/metrics`, `/healthz`, `/readyz`).
    pub async fn admin_get(&self, path: &str) -> Resp {
        send(
            Method::GET,
            &format!("http://{}{path}", self.admin),
            &[],
            "",
        )
        .await
    }

    /// A JSON PUT of the example body, spawned so it can be in flight while
    /// the test does something else.
    pub fn spawn_example_put(&self) -> tokio::task::JoinHandle<Resp> {
        let url = self.url(&example_path());
        tokio::spawn(async move {
            send(
                Method::PUT,
                &url,
                &[("content-type", "application/json")],
                EXAMPLE_BODY,
            )
            .await
        })
    }

    /// The audit log this gateway writes (in its temp dir unless overridden).
    pub fn audit_path(&self) -> PathBuf {
        self.dir.path().join("audit.jsonl")
    }

    /// The audit file's records, parsed (torn lines skipped).
    pub fn audit_records(&self, path: &std::path::Path) -> Vec<Value> {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// SIGTERM, then wait for exit 0: every log is flushed afterwards.
    pub async fn stop(&mut self) {
        self.signal("TERM");
        assert_eq!(self.wait_exit().await, Some(0), "clean exit");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("running")
    }

    /// Access-log lines (stdout) parsed as JSON.
    pub fn access_log(&self) -> Vec<Value> {
        self.stdout
            .snapshot()
            .iter()
            .map(|l| {
                serde_json::from_str(l)
                    .unwrap_or_else(|e| panic!("access line is not JSON ({e}): {l}"))
            })
            .collect()
    }

    /// Waits for the access-log line of `request_id`.
    pub async fn access_line(&self, request_id: &str) -> Value {
        let needle = format!("\"request_id\":\"{request_id}\"");
        let line = self
            .stdout
            .wait_for("an access-log line", |l| l.contains(&needle))
            .await;
        serde_json::from_str(&line).expect("access line is JSON")
    }

    /// Waits for a stderr line containing `needle`.
    pub async fn wait_stderr(&self, needle: &str) -> String {
        self.stderr.wait_for(needle, |l| l.contains(needle)).await
    }

    /// Everything the process printed so far, stdout and stderr.
    pub fn output(&self) -> String {
        let mut all = self.stdout.snapshot();
        all.extend(self.stderr.snapshot());
        all.join("\n")
    }

    pub fn assert_token_never_logged(&self) {
        let out = self.output();
        assert!(
            !out.contains(TOKEN),
            "the token leaked into the logs:\n{out}"
        );
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits (bounded) for the process to exit and returns its exit code.
    pub async fn wait_exit(&mut self) -> Option<i32> {
        let mut child = self.child.take().expect("running");
        let pid = child.id();
        let waited = tokio::time::timeout(
            Duration::from_secs(20),
            tokio::task::spawn_blocking(move || child.wait()),
        )
        .await;
        match waited {
            Ok(Ok(Ok(status))) => status.code(),
            _ => {
                let _ = Command::new("kill")
                    .arg("-KILL")
                    .arg(pid.to_string())
                    .status();
                panic!("taskgate did not exit within 20 s");
            }
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs `taskgate` with `args` to completion (for `check`, bad-config starts).
pub fn run_cli(args: &[&str], env: &[(&str, &str)]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_taskgate"));
    cmd.args(args)
        .env_remove("TASKGATE_UPSTREAM_TOKEN")
        .env_remove("TASKGATE_UPSTREAM_TOKEN_FILE")
        .stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run taskgate");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A response, fully read.
#[derive(Debug)]
pub struct Resp {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    pub fn reason(&self) -> String {
        self.json()["data"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub fn request_id(&self) -> String {
        self.headers
            .get("x-request-id")
            .expect("every response carries X-Request-Id")
            .to_str()
            .expect("ascii")
            .to_owned()
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

pub fn client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

pub async fn send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Resp {
    tokio::time::timeout(
        Duration::from_secs(30),
        try_send(method, url, headers, body),
    )
    .await
    .expect("gateway answers within 30 s")
    .expect("request succeeds")
}

/// Like `send`, but a connection failure is a value, not a panic.
pub async fn try_send(
    method: Method,
    url: &str,
    headers: &[(&str, &str)],
    body: impl Into<Bytes>,
) -> Result<Resp, String> {
    let mut req = Request::builder().method(method).uri(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(Full::new(body.into()))
        .map_err(|e| e.to_string())?;
    let resp = client().request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Resp {
        status: parts.status,
        headers: parts.headers,
        body,
    })
}

/// A JSON PUT to `path` on the gateway.
pub async fn put(gw: &Gateway, path: impl AsRef<str>, body: impl AsRef<str>) -> Resp {
    let body = body.as_ref().to_owned();
    let url = gw.url(path.as_ref());
    send(
        Method::PUT,
        &url,
        &[("content-type", "application/json")],
        body,
    )
    .await
}

/// The vendor's example body with `maximumcall` and `caller_line_id` replaced.
pub fn body_with(maximumcall: i64, line: &str) -> String {
    let mut v: Value = serde_json::from_str(EXAMPLE_BODY).expect("example parses");
    v["maximumcall"] = maximumcall.into();
    v["caller_line_id"] = line.into();
    v.to_string()
}

pub fn random_uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}
