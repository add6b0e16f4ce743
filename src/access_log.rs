//! The access log: one JSON line per request on stdout. Requests append
//! their lines to a shared buffer, and a writer thread takes the buffer and
//! writes it in one go, so a slow terminal or pipe never holds up a request.

use std::io::Write;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

/// Bytes waiting for the writer (some 12,000 lines). Past this the newest
/// lines are dropped and counted rather than growing memory or blocking
/// requests. Memory is taken as lines come, not reserved up front.
const QUEUE_BYTES: usize = 4 * 1024 * 1024;

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

/// What requests and the writer share.
struct Pending {
    lines: Vec<u8>,
    stop: bool,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the writer early: stop.
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        // Appending bytes cannot leave the buffer inconsistent.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The handle requests write through.
pub struct AccessLog {
    shared: Arc<Shared>,
    dropped: Counter,
}

/// The writer thread; [`AccessLogTask::stop`] writes what is pending and joins it.
pub struct AccessLogTask {
    shared: Arc<Shared>,
    thread: JoinHandle<()>,
}

impl AccessLog {
    pub fn start(out: Box<dyn Write + Send>, dropped: Counter) -> (AccessLog, AccessLogTask) {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                lines: Vec::with_capacity(64 * 1024),
                stop: false,
            }),
            wake: Condvar::new(),
        });
        let thread = std::thread::Builder::new()
            .name("access-log".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || writer(&shared, out)
            })
            .expect("spawning the access-log thread at start-up");
        (
            AccessLog {
                shared: Arc::clone(&shared),
                dropped,
            },
            AccessLogTask { shared, thread },
        )
    }

    /// Appends `line`; never waits for the writer, which picks it up within
    /// [`LINGER`].
    pub fn write(&self, line: &AccessLine<'_>) {
        // Encoded before the lock, which other workers may be waiting for.
        let mut buf = Vec::with_capacity(320);
        if serde_json::to_writer(&mut buf, line).is_err() {
            return;
        }
        buf.push(b'\n');
        let mut pending = self.shared.lock();
        if pending.lines.len() >= QUEUE_BYTES {
            drop(pending);
            self.dropped.inc();
            return;
        }
        pending.lines.extend_from_slice(&buf);
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }
}

impl AccessLogTask {
    pub fn stop(self) {
        self.shared.lock().stop = true;
        self.shared.wake.notify_one();
        let _ = self.thread.join();
    }
}

/// Every [`LINGER`] (or at stop): takes what is pending, writes it, flushes.
fn writer(shared: &Shared, mut out: Box<dyn Write + Send>) {
    let mut batch = Vec::with_capacity(64 * 1024);
    loop {
        let stop = {
            let mut pending = shared.lock();
            if !pending.stop {
                pending = shared
                    .wake
                    .wait_timeout(pending, LINGER)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            std::mem::swap(&mut pending.lines, &mut batch);
            pending.stop
        };
        if !batch.is_empty() {
            let _ = out.write_all(&batch).and_then(|()| out.flush());
            batch.clear();
            // A burst does not keep its buffer for good.
            batch.shrink_to(256 * 1024);
        }
        if stop {
            return;
        }
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

    /// A writer held until the test lets it go.
    struct Held {
        out: Shared,
        open: Arc<(Mutex<bool>, std::sync::Condvar)>,
    }
    impl Write for Held {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            let (open, opened) = &*self.open;
            let mut o = open.lock().unwrap();
            while !*o {
                o = opened.wait(o).unwrap();
            }
            self.out.write(b)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stuck_output_drops_and_counts_lines_past_the_bound_and_loses_no_other() {
        let out = Shared::default();
        let open = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let dropped = Counter::default();
        let (log, task) = AccessLog::start(
            Box::new(Held {
                out: out.clone(),
                open: open.clone(),
            }),
            dropped.clone(),
        );
        let line = AccessLine {
            ts: "2026-11-24T00:00:00.000Z",
            request_id: "r",
            client: "127.0.0.1:1",
            caller: None,
            method: "PUT",
            path: "/x",
            status: 200,
            reason: None,
            dry_run: false,
            user_id: None,
            task_id: None,
            latency_ms: 1.0,
            upstream_ms: None,
            bytes_in: 1,
            bytes_out: 2,
        };
        // Far more than the bound (~150 bytes a line), while the output is stuck.
        let n = 2 * QUEUE_BYTES / 100;
        for _ in 0..n {
            log.write(&line);
        }
        assert!(dropped.get() > 0, "lines past the bound are counted");
        *open.0.lock().unwrap() = true;
        open.1.notify_all();
        task.stop();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let written = text.lines().count() as u64;
        assert_eq!(
            written + dropped.get(),
            n as u64,
            "every line is written or counted"
        );
        assert!(
            text.lines()
                .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        );
    }
}
