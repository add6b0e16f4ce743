//! The handle the request path calls. A request encodes, chains and hashes
//! its own record and appends it to the next batch, under one lock that
//! guards memory only: no request ever touches the file, so a slow disk slows
//! audited mutations (they wait for their acknowledgement) but never blocks a
//! tokio worker. The sync thread (`sync.rs`) writes each batch with one
//! `write`, syncs it and answers the waiting callers.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use tracing::warn;

use super::record::{Event, GENESIS, HexHash, Record, encode_line, now_timestamp};
use super::sync::{Faults, sync_thread};
use super::{AuditConfig, AuditError, AuditObserver, FsyncPolicy};

/// The encode buffer is shrunk back after a batch larger than this.
const KEEP_BUF: usize = 1 << 20;
/// How long a caller that is alone on its worker ([`Caller::Alone`]) spins
/// for the acknowledgement of a write (not a sync) while the sync thread is
/// awake, before it parks. A write takes a few µs; parking costs the worker
/// a sleep and the sync thread a wake-up through the runtime, which on an
/// idle VM CPU is tens of µs each way (bench/README.md).
const ACK_SPIN: Duration = Duration::from_micros(30);

pub(super) type Ack = oneshot::Sender<Result<u64, AuditError>>;

/// How far a caller waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Until {
    /// Written to the OS (outcomes; attempts with `never`/`interval`).
    Written,
    /// Written and synced (attempts with `always`).
    Synced,
}

pub(super) struct Waiter {
    pub seq: u64,
    pub until: Until,
    pub ack: Ack,
}

/// Shared by the handles and the sync thread.
pub(super) struct Shared {
    /// Whether the log is open and healthy. Read by every `append*` (fail
    /// fast) and by readyz without taking the lock.
    pub writable: AtomicBool,
    pub observer: Arc<dyn AuditObserver>,
    pub queue: Mutex<Queue>,
    /// Wakes the sync thread: a batch is waiting, or shutdown.
    pub wake: Condvar,
    /// A record was pushed since the sync thread last found the batch empty:
    /// what the thread watches while it spins. Set under the queue lock.
    pub pending: AtomicBool,
    /// The sync thread is awake for the next batch (spinning for it, or
    /// writing the one it caught), so a caller alone on its worker spins for
    /// its acknowledgement instead of parking.
    pub awake: AtomicBool,
}

impl Shared {
    pub fn lock(&self) -> MutexGuard<'_, Queue> {
        // Every step under this lock leaves the queue consistent (the file is
        // the truth, and a re-open re-reads it), so a panic elsewhere does
        // not make the log unusable.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What the request path and the sync thread share: the chain head and the
/// batch being filled. Memory only.
pub(super) struct Queue {
    /// `seq` and `prev` of the next record.
    pub next_seq: u64,
    pub prev: HexHash,
    /// Encoded lines of the records since the last batch was taken.
    pub batch: Vec<u8>,
    /// `(seq, event, whether a caller waits for it)` of each record in `batch`.
    pub records: Vec<(u64, Event, bool)>,
    pub waiters: Vec<Waiter>,
    /// When the first caller waiting for a sync joined `waiters`.
    pub first_waiting_at: Instant,
    /// When the first record of the current batch was pushed.
    pub first_record_at: Instant,
    /// Said once in the next record's `note` (a new chain, a replaced file,
    /// skipped refusals).
    pub note: Option<String>,
    /// The sync thread waits for work; a notify is needed to wake it.
    pub thread_idle: bool,
    pub closed: bool,
    /// `rejected` records still allowed this second, and when it was refilled.
    rejected_tokens: f64,
    rejected_refilled: Instant,
    rejected_per_second: f64,
    /// `rejected` records not written since the last one that was.
    pub rejected_skipped: u64,
}

impl Queue {
    fn new(cfg: &AuditConfig) -> Queue {
        let now = Instant::now();
        Queue {
            next_seq: 1,
            prev: GENESIS,
            batch: Vec::with_capacity(16 * 1024),
            records: Vec::new(),
            waiters: Vec::new(),
            first_waiting_at: now,
            first_record_at: now,
            note: None,
            thread_idle: false,
            closed: false,
            rejected_tokens: f64::from(cfg.rejected_per_second),
            rejected_refilled: now,
            rejected_per_second: f64::from(cfg.rejected_per_second),
            rejected_skipped: 0,
        }
    }

    /// One token of the `rejected` budget (a bucket of `rejected_per_second`
    /// with a burst of the same size), if there is one.
    fn take_rejected_token(&mut self) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.rejected_refilled).as_secs_f64();
        self.rejected_refilled = now;
        self.rejected_tokens = (self.rejected_tokens + elapsed * self.rejected_per_second)
            .min(self.rejected_per_second);
        if self.rejected_tokens >= 1.0 {
            self.rejected_tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Encodes and chains `rec` into the batch; returns its `seq`.
    fn push(&mut self, rec: &Record, waited: bool) -> Result<u64, AuditError> {
        let note = self.note.take();
        let with_note;
        let rec = match (&note, &rec.note) {
            (None, _) => rec,
            (Some(n), own) => {
                with_note = Record {
                    note: Some(match own {
                        Some(own) => format!("{own}; {n}"),
                        None => n.clone(),
                    }),
                    ..rec.clone()
                };
                &with_note
            }
        };
        let ts = now_timestamp();
        let start = self.batch.len();
        match encode_line(&mut self.batch, self.next_seq, &ts, rec, &self.prev) {
            Ok(hash) => {
                if self.records.is_empty() {
                    self.first_record_at = Instant::now();
                }
                let seq = self.next_seq;
                self.next_seq += 1;
                self.prev = hash;
                self.records.push((seq, rec.event, waited));
                Ok(seq)
            }
            Err(e) => {
                self.batch.truncate(start);
                self.note = note;
                warn!(request_id = %rec.request_id, cause = %e, "audit record could not be serialised");
                Err(AuditError::Encode(e.to_string()))
            }
        }
    }

    /// Hands the batch to the sync thread (swapping in `spare`, an empty
    /// buffer, so the allocation is reused).
    pub fn take_batch(&mut self, spare: &mut Vec<u8>) -> (Vec<(u64, Event, bool)>, Vec<Waiter>) {
        spare.clear();
        if spare.capacity() > KEEP_BUF {
            *spare = Vec::with_capacity(16 * 1024);
        }
        std::mem::swap(&mut self.batch, spare);
        (
            std::mem::take(&mut self.records),
            std::mem::take(&mut self.waiters),
        )
    }
}

/// Who waits for an acknowledgement, as far as the caller can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Caller {
    /// Other work may be waiting for this worker: park at once.
    Busy,
    /// The only request in flight: nothing else needs the worker, so a
    /// short, bounded spin for a write's acknowledgement costs nobody and
    /// saves two wake-ups.
    Alone,
}

/// A cheap, cloneable handle to the audit log.
#[derive(Clone)]
pub struct AuditLog {
    shared: Arc<Shared>,
    policy: FsyncPolicy,
    /// `audit.rejected_request_max_bytes`, for the pipeline's truncation.
    rejected_request_max_bytes: usize,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("writable", &self.is_writable())
            .finish_non_exhaustive()
    }
}

/// The sync thread, owned by the application and stopped with
/// [`AuditWriterTask::shutdown`] after the listeners have drained. Dropping it
/// without `shutdown` leaves the thread running until every [`AuditLog`] handle
/// is gone; it then writes and syncs what is queued and exits.
#[must_use = "await `shutdown()` at exit so queued records are written and synced"]
pub struct AuditWriterTask {
    shared: Arc<Shared>,
    thread: thread::JoinHandle<Result<(), AuditError>>,
}

impl fmt::Debug for AuditWriterTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditWriterTask").finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens (or creates) `cfg.path`, resumes `seq` and the chain from the
    /// newest record beside it, and starts the sync thread.
    ///
    /// Never fails because the log is unwritable: the handle then starts "not
    /// writable" ([`AuditLog::is_writable`] is false, attempts fail fast) and
    /// the sync thread retries every second until a real write and sync
    /// succeed. The first open happens on the sync thread before this
    /// returns, so a healthy log is writable when it does. Needs no runtime;
    /// `shutdown` does.
    pub fn start(
        cfg: AuditConfig,
        observer: Arc<dyn AuditObserver>,
    ) -> (AuditLog, AuditWriterTask) {
        Self::start_with(cfg, observer, Faults::default())
    }

    pub(super) fn start_with(
        cfg: AuditConfig,
        observer: Arc<dyn AuditObserver>,
        faults: Faults,
    ) -> (AuditLog, AuditWriterTask) {
        let shared = Arc::new(Shared {
            writable: AtomicBool::new(false),
            observer,
            queue: Mutex::new(Queue::new(&cfg)),
            wake: Condvar::new(),
            pending: AtomicBool::new(false),
            awake: AtomicBool::new(false),
        });
        let rejected_request_max_bytes = cfg.rejected_request_max_bytes;
        let policy = cfg.fsync;
        let (opened_tx, opened_rx) = std::sync::mpsc::channel();
        let thread = thread::Builder::new()
            .name("taskgate-audit".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || sync_thread(&shared, cfg, faults, opened_tx)
            })
            .expect("the OS starts the audit sync thread (start-up)");
        // The first open (or its failure) is done before we return.
        let _ = opened_rx.recv();
        (
            AuditLog {
                shared: Arc::clone(&shared),
                policy,
                rejected_request_max_bytes,
            },
            AuditWriterTask { shared, thread },
        )
    }

    /// Appends `rec` and waits until it is durable per the fsync policy
    /// (synced for `always`; written to the OS for `interval`/`never`);
    /// returns its `seq`. For `attempt` records: on `Err` the request must not
    /// be forwarded (503 audit_unavailable). Fails at once when the log is not
    /// writable. If the caller's future is dropped while it waits, the record
    /// is still written.
    pub async fn append_durable(&self, rec: Record) -> Result<u64, AuditError> {
        self.append_durable_as(rec, Caller::Busy).await
    }

    /// [`append_durable`](Self::append_durable), told whether the caller is
    /// alone on its worker.
    pub async fn append_durable_as(&self, rec: Record, caller: Caller) -> Result<u64, AuditError> {
        let until = match self.policy {
            FsyncPolicy::Always => Until::Synced,
            FsyncPolicy::Interval | FsyncPolicy::Never => Until::Written,
        };
        let done = self.enqueue(&rec, Some(until))?;
        match done {
            Some(mut done) => {
                // A sync takes far longer than a spin is worth.
                if until == Until::Written
                    && caller == Caller::Alone
                    && let Some(acked) = self.spin_for(&mut done)
                {
                    return acked;
                }
                done.await.map_err(|_| AuditError::Closed)?
            }
            None => Err(AuditError::Closed),
        }
    }

    /// Appends an `outcome` and waits until it is written to the OS (not
    /// synced), so a crash after the caller's answer does not lose it. When
    /// the log is not writable or the write fails, the record is dropped and
    /// counted through [`AuditObserver::record_dropped`].
    pub async fn append_written(&self, rec: Record) {
        self.append_written_as(rec, Caller::Busy).await;
    }

    /// [`append_written`](Self::append_written), told whether the caller is
    /// alone on its worker.
    pub async fn append_written_as(&self, rec: Record, caller: Caller) {
        let event = rec.event;
        match self.enqueue(&rec, Some(Until::Written)) {
            Ok(Some(mut done)) => {
                if caller == Caller::Alone && self.spin_for(&mut done).is_some() {
                    return;
                }
                // A failed write was counted as a drop by the sync thread.
                let _ = done.await;
            }
            Ok(None) | Err(_) => self.shared.observer.record_dropped(event),
        }
    }

    /// Appends a `rejected` record without waiting for the disk, at most
    /// `audit.rejected_per_second` of them (those skipped are counted, and
    /// the next one written says how many). Dropped and counted when the log
    /// is not writable.
    pub fn append(&self, rec: Record) {
        let event = rec.event;
        if !self.is_writable() {
            self.shared.observer.record_dropped(event);
            return;
        }
        let pushed = {
            let mut q = self.shared.lock();
            if event == Event::Rejected && !q.take_rejected_token() {
                q.rejected_skipped += 1;
                drop(q);
                self.shared.observer.rejected_skipped();
                return;
            }
            if q.closed {
                false
            } else {
                let skipped = std::mem::take(&mut q.rejected_skipped);
                let rec = if event == Event::Rejected && skipped > 0 {
                    Record {
                        note: Some(format!(
                            "{skipped} rejected record(s) not written before this one (audit.rejected_per_second)"
                        )),
                        ..rec
                    }
                } else {
                    rec
                };
                let ok = q.push(&rec, false).is_ok();
                self.shared.pending.store(ok, Ordering::Release);
                let notify = ok && claim_wake(&mut q);
                drop(q);
                if notify {
                    self.shared.wake.notify_one();
                }
                ok
            }
        };
        if !pushed {
            self.shared.observer.record_dropped(event);
        }
    }

    /// Pushes `rec`; with `until`, returns the receiver of its acknowledgement.
    fn enqueue(
        &self,
        rec: &Record,
        until: Option<Until>,
    ) -> Result<Option<oneshot::Receiver<Result<u64, AuditError>>>, AuditError> {
        if !self.is_writable() {
            return Err(self.unavailable());
        }
        let mut q = self.shared.lock();
        if q.closed {
            return Err(AuditError::Closed);
        }
        let seq = q.push(rec, until.is_some())?;
        self.shared.pending.store(true, Ordering::Release);
        let done = until.map(|until| {
            let (ack, done) = oneshot::channel();
            if until == Until::Synced && !q.waiters.iter().any(|w| w.until == Until::Synced) {
                q.first_waiting_at = Instant::now();
            }
            q.waiters.push(Waiter { seq, until, ack });
            done
        });
        let notify = claim_wake(&mut q);
        drop(q);
        if notify {
            self.shared.wake.notify_one();
        }
        Ok(done)
    }

    /// Spins up to [`ACK_SPIN`] for the acknowledgement while the sync thread
    /// is awake; `None` if it did not come (the caller then parks as usual).
    fn spin_for(
        &self,
        done: &mut oneshot::Receiver<Result<u64, AuditError>>,
    ) -> Option<Result<u64, AuditError>> {
        let started = Instant::now();
        while self.shared.awake.load(Ordering::Acquire) && started.elapsed() < ACK_SPIN {
            match done.try_recv() {
                Ok(acked) => return Some(acked),
                Err(oneshot::error::TryRecvError::Closed) => return Some(Err(AuditError::Closed)),
                Err(oneshot::error::TryRecvError::Empty) => std::hint::spin_loop(),
            }
        }
        None
    }

    /// Whether the log is open and a real write and sync last succeeded (readyz).
    pub fn is_writable(&self) -> bool {
        self.shared.writable.load(Ordering::Acquire)
    }

    /// `audit.rejected_request_max_bytes`.
    pub fn rejected_request_max_bytes(&self) -> usize {
        self.rejected_request_max_bytes
    }

    /// Callers waiting for the next write or sync.
    pub fn queue_len(&self) -> usize {
        self.shared.lock().waiters.len()
    }

    fn unavailable(&self) -> AuditError {
        if self.shared.lock().closed {
            AuditError::Closed
        } else {
            AuditError::NotWritable
        }
    }
}

/// Whether the sync thread sleeps and must be woken; the caller notifies
/// after unlocking the queue, or the woken thread (often on the same CPU)
/// would preempt it only to block on the lock it still holds.
fn claim_wake(q: &mut Queue) -> bool {
    std::mem::take(&mut q.thread_idle)
}

impl AuditWriterTask {
    /// Stops the log: appends from now on fail with [`AuditError::Closed`] (or
    /// are dropped), what is queued is written and synced (whatever the fsync
    /// policy), waiting callers are answered and the thread is joined. Waits
    /// for as long as a hung disk blocks the last fsync: wrap it in the
    /// shutdown grace timeout.
    pub async fn shutdown(self) -> Result<(), AuditError> {
        {
            let mut q = self.shared.lock();
            q.closed = true;
            self.shared.wake.notify_one();
        }
        let thread = self.thread;
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) | Err(_) => Err(AuditError::WriterPanicked),
        }
    }
}

#[cfg(test)]
impl AuditLog {
    /// `start` with fault injection; returns the handle to arm it.
    pub(super) fn start_with_failing_syncs(
        cfg: AuditConfig,
        observer: Arc<dyn AuditObserver>,
    ) -> (AuditLog, AuditWriterTask, Arc<std::sync::atomic::AtomicU32>) {
        let faults = Faults::default();
        let arm = faults.arm();
        let (log, task) = Self::start_with(cfg, observer, faults);
        (log, task, arm)
    }
}
