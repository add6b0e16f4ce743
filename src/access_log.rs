//! The access log: one JSON line per request on stdout. Lines are handed to
//! a writer thread so a slow terminal or pipe never holds up a request; the
//! thread writes whatever has queued in one go.

use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::thread::JoinHandle;

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

/// Lines waiting for the writer. Past this the newest lines are dropped and
/// counted rather than growing memory or blocking requests.
const QUEUE: usize = 16_384;

/// How long lines may wait for the writer; bounds the log's delay, not its
/// completeness (stop drains the queue).
const LINGER: std::time::Duration = std::time::Duration::from_millis(10);

/// The fields of DESIGN.md ("Access log and metrics").
#[derive(Debug, Serialize)]
pub struct AccessLine<'a> {
    pub ts: &'a str,
    pub request_id: &'a str,
    pub client: &'a str,
    /// The `[[access.callers]]` name, with caller control on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caller: Option<&'a str>,
    pub method: &'a str,
    pub path: &'a str,
    pub status: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// Present (`true`) only for a dry run.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub dry_run: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    pub latency_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ms: Option<f64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

enum Msg {
    Line(Vec<u8>),
    Stop,
}

pub struct AccessLog {
    tx: SyncSender<Msg>,
    /// `taskgate_access_log_dropped_lines_total`.
    dropped: Counter,
}

/// Owns the writer thread; `stop` flushes what is queued and joins it.
pub struct AccessLogTask {
    tx: SyncSender<Msg>,
    thread: JoinHandle<()>,
}

impl AccessLog {
    /// Starts the writer on `out` (stdout in production).
    pub fn start(out: Box<dyn Write + Send>, dropped: Counter) -> (AccessLog, AccessLogTask) {
        let (tx, rx) = sync_channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || writer(rx, out))
            .expect("spawning the access-log thread at start-up");
        (
            AccessLog {
                tx: tx.clone(),
                dropped,
            },
            AccessLogTask { tx, thread },
        )
    }

    pub fn write(&self, line: &AccessLine<'_>) {
        let mut buf = Vec::with_capacity(320);
        if serde_json::to_writer(&mut buf, line).is_err() {
            return;
        }
        buf.push(b'\n');
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Msg::Line(buf)) {
            self.dropped.inc();
        }
    }

    /// Lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }
}

impl AccessLogTask {
    pub fn stop(self) {
        let _ = self.tx.send(Msg::Stop);
        let _ = self.thread.join();
    }
}

fn writer(rx: Receiver<Msg>, mut out: Box<dyn Write + Send>) {
    let mut batch = Vec::with_capacity(64 * 1024);
    while let Ok(first) = rx.recv() {
        let mut stop = false;
        let mut next = Some(first);
        while let Some(msg) = next {
            match msg {
                Msg::Line(line) => batch.extend_from_slice(&line),
                Msg::Stop => {
                    stop = true;
                    break;
                }
            }
            next = if batch.len() < 256 * 1024 {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        // A closed stdout is not worth crashing the proxy over.
        let _ = out.write_all(&batch).and_then(|()| out.flush());
        batch.clear();
        if stop {
            return;
        }
        // Linger before the next blocking receive: lines sent meanwhile are
        // queued without waking this thread, so under load requests pay no
        // wake-up per line and the log is written in batches.
        std::thread::sleep(LINGER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_are_json_and_flushed_on_stop() {
        let out = Shared::default();
        let (log, task) = AccessLog::start(Box::new(out.clone()), Counter::default());
        for i in 0..100u16 {
            log.write(&AccessLine {
                ts: "2026-11-24T00:00:00.000Z",
                request_id: "r",
                client: "127.0.0.1:1",
                caller: (i == 99).then_some("billing"),
                method: "PUT",
                path: "/x\n\"y",
                status: 200 + i,
                reason: None,
                dry_run: i == 99,
                user_id: None,
                task_id: None,
                latency_ms: 1.0,
                upstream_ms: Some(0.5),
                bytes_in: 1,
                bytes_out: 2,
            });
        }
        task.stop();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<_> = text.lines().collect();
        assert_eq!(lines.len(), 100);
        let v: serde_json::Value = serde_json::from_str(lines[99]).unwrap();
        assert_eq!(v["status"], 299);
        assert_eq!(v["path"], "/x\n\"y");
        assert_eq!(v["caller"], "billing");
        assert_eq!(v["dry_run"], true);
        let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
        assert!(
            v.get("caller").is_none() && v.get("dry_run").is_none(),
            "{v}"
        );
    }
}
