//! A private `redis-server` per test: a free loopback port, no persistence,
//! its files in the test's temp dir. It can be stopped (SIGTERM, waited for),
//! restarted on the same port, frozen (SIGSTOP) and thawed; dropping it kills
//! and reaps it. A tiny RESP client (raw TCP, no extra crates) reads what it
//! holds and watches what it is sent (MONITOR).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long a start or a stop may take before the test fails.
const BOUND: Duration = Duration::from_secs(10);

pub struct Redis {
    pub port: u16,
    child: Option<Child>,
    dir: tempfile::TempDir,
}

impl Redis {
    /// Starts a private server on a free port and waits until it answers PING.
    pub async fn start() -> Redis {
        // The kernel picks a free port; redis binds it right after (with
        // SO_REUSEADDR), so the window for another process to take it is tiny.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut redis = Redis {
            port,
            child: None,
            dir: tempfile::tempdir().expect("tempdir"),
        };
        redis.spawn().await;
        redis
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// A `[shared]` table pointing at this server, with `extra` lines
    /// (`on_unavailable = ...`, `timeout_ms = ...`).
    pub fn shared_toml(&self, extra: &str) -> String {
        format!("[shared]\nredis_url = \"{}\"\n{extra}\n", self.url())
    }

    pub fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .expect("redis is running")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    async fn spawn(&mut self) {
        assert!(self.child.is_none(), "redis is already running");
        // Logs to stdout, which a thread copies to the log file and watches
        // for the line redis writes once it accepts connections.
        let mut child = Command::new("redis-server")
            .arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--logfile", ""])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (is it installed?)");
        let stdout = child.stdout.take().expect("stdout piped");
        self.child = Some(child);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
        let log_path = self.log_path();
        std::thread::spawn(move || {
            let mut log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log_path)
                .ok();
            let mut ready = Some(ready_tx);
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(f) = log.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                if line.contains("Ready to accept connections")
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(());
                }
            }
        });
        // Ready, or the process ended (the sender dropped without sending).
        let outcome = tokio::time::timeout(BOUND, ready_rx).await;
        let exited = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        match (outcome, exited) {
            (Ok(Ok(())), None) => assert!(ping(self.port).await, "ready but no PONG"),
            (_, Some(status)) => {
                self.child = None;
                panic!("redis-server exited ({status}):\n{}", self.log());
            }
            (Ok(Err(_)), None) => panic!("redis-server closed its output:\n{}", self.log()),
            (Err(_), None) => panic!(
                "redis-server was not ready within {BOUND:?}:\n{}",
                self.log()
            ),
        }
    }

    /// SIGTERM, then waits (bounded) for it to exit. The port is free again.
    pub async fn stop(&mut self) {
        self.signal("TERM");
        let mut child = self.child.take().expect("redis is running");
        let pid = child.id();
        let waited =
            tokio::time::timeout(BOUND, tokio::task::spawn_blocking(move || child.wait())).await;
        if !matches!(waited, Ok(Ok(Ok(_)))) {
            let _ = Command::new("kill")
                .arg("-KILL")
                .arg(pid.to_string())
                .status();
            panic!("redis-server did not stop within {BOUND:?}");
        }
        assert!(!ping(self.port).await, "nothing answers once stopped");
    }

    /// Starts it again on the same port (empty: nothing was persisted).
    pub async fn restart(&mut self) {
        self.spawn().await;
    }

    /// Sends a signal ("TERM", "STOP", "CONT") to the server.
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{sig} redis-server");
    }

    /// One command, its reply.
    pub async fn command(&self, args: &[&str]) -> Reply {
        let port = self.port;
        let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
        tokio::task::spawn_blocking(move || {
            let mut conn = Conn::open(port).expect("connect to redis");
            conn.send(&args).expect("send to redis");
            conn.read().expect("redis replies")
        })
        .await
        .expect("command thread")
    }

    /// Every key with its type and its value rendered as text (strings as
    /// they are, hashes as `field=value` pairs, other types their members).
    pub async fn dump(&self) -> Vec<(String, String, String)> {
        let port = self.port;
        tokio::task::spawn_blocking(move || {
            let mut conn = Conn::open(port).expect("connect to redis");
            let mut query = |args: &[&str]| {
                let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
                conn.send(&args).expect("send to redis");
                conn.read().expect("redis replies")
            };
            let keys = query(&["KEYS", "*"]).strings();
            let mut all = Vec::new();
            for key in keys {
                let kind = query(&["TYPE", &key]).text();
                let value = match kind.as_str() {
                    "string" => query(&["GET", &key]).text(),
                    "hash" => query(&["HGETALL", &key])
                        .strings()
                        .chunks(2)
                        .map(|p| p.join("="))
                        .collect::<Vec<_>>()
                        .join(","),
                    "list" => query(&["LRANGE", &key, "0", "-1"]).strings().join(","),
                    "set" => query(&["SMEMBERS", &key]).strings().join(","),
                    "zset" => query(&["ZRANGE", &key, "0", "-1"]).strings().join(","),
                    "none" => continue, // expired meanwhile
                    other => format!("<{other}>"),
                };
                all.push((key, kind, value));
            }
            all
        })
        .await
        .expect("dump thread")
    }

    /// Starts `MONITOR`: every command the server runs from now on, one line
    /// each, until the returned handle is stopped.
    pub async fn monitor(&self) -> Monitor {
        let port = self.port;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let done = Arc::new(AtomicBool::new(false));
        // Ticks once per line seen, so a waiter wakes on arrival.
        let (tick, seen) = tokio::sync::watch::channel(0usize);
        let mut conn = tokio::task::spawn_blocking(move || {
            let mut conn = Conn::open(port).expect("connect to redis");
            conn.send(&["MONITOR".to_owned()]).expect("send MONITOR");
            assert_eq!(conn.read().expect("MONITOR replies").text(), "OK");
            conn
        })
        .await
        .expect("monitor thread");
        let thread = {
            let (lines, done) = (lines.clone(), done.clone());
            std::thread::spawn(move || {
                // Short reads so a stop is noticed; a timeout is not the end.
                let _ = conn
                    .reader
                    .get_ref()
                    .set_read_timeout(Some(Duration::from_millis(100)));
                let mut line = String::new();
                while !done.load(Ordering::Acquire) {
                    match conn.reader.read_line(&mut line) {
                        Ok(0) => break,
                        Ok(_) => {
                            lines.lock().unwrap().push(line.trim_end().to_owned());
                            tick.send_modify(|n| *n += 1);
                            line.clear();
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(_) => break,
                    }
                }
            })
        };
        Monitor {
            lines,
            done,
            seen,
            thread: Some(thread),
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SIGKILL ends a SIGSTOPped server too.
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// What the server was sent while a `MONITOR` ran.
pub struct Monitor {
    lines: Arc<Mutex<Vec<String>>>,
    done: Arc<AtomicBool>,
    seen: tokio::sync::watch::Receiver<usize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Monitor {
    /// Stops watching once everything sent to `redis` before this call has
    /// been seen (a marker command is sent last and waited for, bounded) and
    /// returns every line seen.
    pub async fn finish(mut self, redis: &Redis) -> Vec<String> {
        let marker = format!("monitor-end-{}", std::process::id());
        redis.command(&["ECHO", &marker]).await;
        let has_marker = |lines: &Arc<Mutex<Vec<String>>>| {
            lines.lock().unwrap().iter().any(|l| l.contains(&marker))
        };
        let lines = self.lines.clone();
        let arrived = tokio::time::timeout(BOUND, async {
            while !has_marker(&lines) {
                if self.seen.changed().await.is_err() {
                    break;
                }
            }
        })
        .await;
        assert!(
            arrived.is_ok() && has_marker(&self.lines),
            "MONITOR never showed the marker command"
        );
        self.done.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        self.lines.lock().unwrap().clone()
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        self.done.store(true, Ordering::Release);
    }
}

/// A RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// The reply as text (bulk strings lossily decoded).
    pub fn text(&self) -> String {
        match self {
            Reply::Simple(s) | Reply::Error(s) => s.clone(),
            Reply::Int(n) => n.to_string(),
            Reply::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            Reply::Bulk(None) | Reply::Array(None) => String::new(),
            Reply::Array(Some(items)) => {
                items.iter().map(Reply::text).collect::<Vec<_>>().join(",")
            }
        }
    }

    /// An array reply's items as text.
    pub fn strings(&self) -> Vec<String> {
        match self {
            Reply::Array(Some(items)) => items.iter().map(Reply::text).collect(),
            other => panic!("not an array reply: {other:?}"),
        }
    }
}

/// True when something on `port` answers `PING` with `+PONG` (bounded).
pub async fn ping(port: u16) -> bool {
    tokio::task::spawn_blocking(move || {
        let Ok(mut conn) = Conn::open(port) else {
            return false;
        };
        conn.reader.get_mut().write_all(b"PING\r\n").is_ok()
            && matches!(conn.read(), Ok(Reply::Simple(s)) if s == "PONG")
    })
    .await
    .unwrap_or(false)
}

/// A blocking RESP connection with bounded connect and reads.
struct Conn {
    reader: BufReader<TcpStream>,
}

impl Conn {
    fn open(port: u16) -> std::io::Result<Conn> {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(Conn {
            reader: BufReader::new(stream),
        })
    }

    fn send(&mut self, args: &[String]) -> std::io::Result<()> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        self.reader.get_mut().write_all(&out)
    }

    fn line(&mut self) -> std::io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }

    fn read(&mut self) -> std::io::Result<Reply> {
        let line = self.line()?;
        let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "bad RESP");
        let (tag, rest) = line.split_at_checked(1).ok_or_else(bad)?;
        let n = || rest.parse::<i64>().map_err(|_| bad());
        Ok(match tag {
            "+" => Reply::Simple(rest.to_owned()),
            "-" => Reply::Error(rest.to_owned()),
            ":" => Reply::Int(n()?),
            "$" => match usize::try_from(n()?) {
                Err(_) => Reply::Bulk(None),
                Ok(len) => {
                    let mut buf = vec![0; len + 2];
                    self.reader.read_exact(&mut buf)?;
                    buf.truncate(len);
                    Reply::Bulk(Some(buf))
                }
            },
            "*" => match usize::try_from(n()?) {
                Err(_) => Reply::Array(None),
                Ok(len) => Reply::Array(Some(
                    (0..len)
                        .map(|_| self.read())
                        .collect::<std::io::Result<_>>()?,
                )),
            },
            _ => return Err(bad()),
        })
    }
}
