//! The audit writer: one OS thread owns the active file and turns queued records
//! into lines — one `write` and (with `fsync = "always"`) one `fsync` per batch of
//! whatever was queued meanwhile (group commit) — plus resuming the chain at
//! start-up, rotation, and recovery from an unwritable log.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::thread;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot};
use tracing::{error, info, warn};

use super::record::{Event, GENESIS, HexHash, Parsed, Record, encode_line, parse_line, timestamp};
use super::{AuditConfig, AuditError, AuditObserver, FsyncPolicy};

/// Records queued for the writer at most. Past it `append_durable` waits for room
/// (backpressure) and `append` drops the record (counted). Bounded so a stalled
/// disk costs at most a few MiB of queued records, not the process.
pub const QUEUE_CAPACITY: usize = 16_384;
/// How often an unwritable log is re-opened.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How often `fsync = "interval"` syncs (when something was written).
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// Records per write at most; keeps one write (and the buffer) bounded.
const MAX_BATCH: usize = 1024;
/// The write buffer is shrunk back after a batch larger than this.
const KEEP_BUF: usize = 1 << 20;
/// Chunk size of the backwards scan for the last record at start-up.
const SCAN_CHUNK: usize = 64 * 1024;
/// A line longer than this is never a record (request bodies are limited to a
/// few KiB to MiB): skipped as torn at start-up without reading it into memory.
const MAX_LINE: u64 = 64 << 20;

type Ack = oneshot::Sender<Result<u64, AuditError>>;

// Records travel by value: boxing them would add an allocation per request
// to save a copy; `Shutdown` is sent once.
#[allow(clippy::large_enum_variant)]
enum Msg {
    /// `Some(ack)` for `append_durable`: answered once the record is durable.
    Append(Record, Option<Ack>),
    /// Stop taking records, write what is queued, sync, exit.
    Shutdown,
}

/// Shared by the handles and the writer thread.
struct Shared {
    /// Whether the writer has the file open and healthy. Read by every
    /// `append*` (fail fast) and by readyz.
    writable: AtomicBool,
    observer: Arc<dyn AuditObserver>,
}

/// A cheap, cloneable handle to the audit log.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Msg>,
    shared: Arc<Shared>,
}

impl fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditLog")
            .field("writable", &self.is_writable())
            .field("queued", &self.queue_len())
            .finish()
    }
}

/// The writer thread, owned by the application and stopped with
/// [`AuditWriterTask::shutdown`] after the listeners have drained. Dropping it
/// without `shutdown` leaves the thread running until every [`AuditLog`] handle
/// is gone; it then writes what is queued, syncs and exits.
#[must_use = "await `shutdown()` at exit so queued records are written and synced"]
pub struct AuditWriterTask {
    tx: mpsc::Sender<Msg>,
    thread: thread::JoinHandle<Result<(), AuditError>>,
}

impl fmt::Debug for AuditWriterTask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditWriterTask").finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens (or creates) `cfg.path`, resumes `seq` and the chain from the last
    /// record on disk, and starts the writer thread.
    ///
    /// Never fails because the log is unwritable: the handle then starts "not
    /// writable" ([`AuditLog::is_writable`] is false, attempts fail fast) and the
    /// writer retries every [`RETRY_INTERVAL`] until it can open the file. The
    /// first open happens here, synchronously, so a healthy log is writable when
    /// this returns. Needs no runtime; `shutdown` does.
    pub fn start(
        cfg: AuditConfig,
        observer: Arc<dyn AuditObserver>,
    ) -> (AuditLog, AuditWriterTask) {
        Self::start_with(cfg, observer, Faults::default())
    }

    fn start_with(
        cfg: AuditConfig,
        observer: Arc<dyn AuditObserver>,
        faults: Faults,
    ) -> (AuditLog, AuditWriterTask) {
        let (tx, rx) = mpsc::channel(QUEUE_CAPACITY);
        let shared = Arc::new(Shared {
            writable: AtomicBool::new(false),
            observer,
        });
        let mut writer = Writer::new(cfg, Arc::clone(&shared), faults);
        writer.try_open();
        let thread = thread::Builder::new()
            .name("taskgate-audit".into())
            .spawn(move || writer.run(rx))
            .expect("the OS starts the audit writer thread (start-up)");
        (
            AuditLog {
                tx: tx.clone(),
                shared,
            },
            AuditWriterTask { tx, thread },
        )
    }

    /// Appends `rec` and waits until it is durable (per the fsync policy: synced
    /// for `always`, handed to the OS for `interval`/`never`); returns its `seq`.
    /// For `attempt` records: on `Err` the request must not be forwarded (503
    /// audit_unavailable). Fails at once when the log is not writable; waits for
    /// room when the queue is full. If the caller's future is dropped after the
    /// record was queued, the record is still written.
    pub async fn append_durable(&self, rec: Record) -> Result<u64, AuditError> {
        if !self.is_writable() {
            return Err(if self.tx.is_closed() {
                AuditError::Closed
            } else {
                AuditError::NotWritable
            });
        }
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Msg::Append(rec, Some(ack)))
            .await
            .map_err(|_| AuditError::Closed)?;
        done.await.map_err(|_| AuditError::Closed)?
    }

    /// Queues `rec` (`outcome`, `rejected`) without waiting for the disk. When the
    /// log is not writable, the queue is full, or the write later fails, the
    /// record is dropped and counted through [`AuditObserver::record_dropped`].
    pub fn append(&self, rec: Record) {
        let event = rec.event;
        if !self.is_writable() || self.tx.try_send(Msg::Append(rec, None)).is_err() {
            self.shared.observer.record_dropped(event);
        }
    }

    /// Whether the writer has the log open and its last write succeeded (readyz).
    pub fn is_writable(&self) -> bool {
        self.shared.writable.load(Ordering::Acquire)
    }

    /// Records queued and not yet taken by the writer (a gauge for metrics).
    pub fn queue_len(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

impl AuditWriterTask {
    /// Stops the writer: records queued before this call are written, the file is
    /// synced (whatever the fsync policy) and the thread is joined. Appends after
    /// this fail with [`AuditError::Closed`] (or are dropped). Waits while the
    /// queue is full, and for as long as a hung disk blocks the last fsync: wrap
    /// it in the shutdown grace timeout.
    pub async fn shutdown(self) -> Result<(), AuditError> {
        // An error means the writer is already gone; joining says why.
        let _ = self.tx.send(Msg::Shutdown).await;
        drop(self.tx);
        let thread = self.thread;
        match tokio::task::spawn_blocking(move || thread.join()).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) | Err(_) => Err(AuditError::WriterPanicked),
        }
    }
}

/// Test-only fault injection; an empty struct otherwise.
#[derive(Default, Clone)]
struct Faults {
    /// How many upcoming group-commit fsyncs fail.
    #[cfg(test)]
    fail_syncs: Arc<std::sync::atomic::AtomicU32>,
}

impl Faults {
    #[cfg(test)]
    fn take_sync_failure(&self) -> bool {
        self.fail_syncs
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    #[cfg(not(test))]
    fn take_sync_failure(&self) -> bool {
        false
    }
}

/// The open active file.
struct Active {
    file: File,
    /// Bytes in the file; a failed write is truncated back to this.
    len: u64,
    /// The file ends in a torn line without `\n`: the next write starts with one.
    need_newline: bool,
    /// The file holds at least one record (a file is rotated only then, so every
    /// rotated file is named after a record it holds).
    has_records: bool,
}

struct Writer {
    path: PathBuf,
    policy: FsyncPolicy,
    max_bytes: u64,
    shared: Arc<Shared>,
    faults: Faults,
    active: Option<Active>,
    /// The chain head: `seq` and `prev` of the next record. Advanced only once a
    /// record is written (and synced, with `always`), so a failed batch leaves
    /// no gap.
    next_seq: u64,
    prev: HexHash,
    /// Whether `next_seq`/`prev` come from the log (false before the first open).
    chain_known: bool,
    /// Reused serialisation buffer: one batch, written with one `write_all`.
    buf: Vec<u8>,
    /// Records in `buf` not yet committed: (seq, event, ack).
    inflight: Vec<(u64, Event, Option<Ack>)>,
    /// Written but not synced (`interval`/`never`).
    dirty: bool,
    last_sync: Instant,
    retry_at: Instant,
    /// The error that made the log unwritable, logged once per distinct error.
    last_error: Option<String>,
    /// Offsets of torn lines of the active file already reported.
    reported_torn: Vec<u64>,
    /// A file already has the rotated name: rotation stays off until restart
    /// rather than overwrite it or refuse records.
    rotation_blocked: bool,
}

impl Writer {
    fn new(cfg: AuditConfig, shared: Arc<Shared>, faults: Faults) -> Self {
        let now = Instant::now();
        Writer {
            path: cfg.path,
            policy: cfg.fsync,
            max_bytes: cfg.max_bytes,
            shared,
            faults,
            active: None,
            next_seq: 1,
            prev: GENESIS,
            chain_known: false,
            buf: Vec::with_capacity(64 * 1024),
            inflight: Vec::new(),
            dirty: false,
            last_sync: now,
            retry_at: now,
            last_error: None,
            reported_torn: Vec::new(),
            rotation_blocked: false,
        }
    }

    fn run(mut self, mut rx: mpsc::Receiver<Msg>) -> Result<(), AuditError> {
        // However the thread ends (even by a panic), handles must stop reporting
        // the log writable.
        let _not_writable_on_exit = NotWritableOnExit(Arc::clone(&self.shared));
        let waker = Waker::from(Arc::new(ThreadWaker(thread::current())));
        let mut cx = Context::from_waker(&waker);
        let mut batch: Vec<(Record, Option<Ack>)> = Vec::new();
        loop {
            match recv_until(&mut rx, self.deadline(), &mut cx) {
                Recv::Msg(first) => {
                    // Group commit: everything queued meanwhile joins this batch.
                    push(first, &mut batch, &mut rx);
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(msg) => push(msg, &mut batch, &mut rx),
                            Err(_) => break,
                        }
                    }
                }
                Recv::Timeout => {}
                Recv::Closed => break,
            }
            if self.active.is_none() && Instant::now() >= self.retry_at {
                self.try_open();
            }
            if !batch.is_empty() {
                self.write_batch(&mut batch);
            }
            if self.policy != FsyncPolicy::Never
                && self.dirty
                && self.last_sync.elapsed() >= SYNC_INTERVAL
            {
                self.sync();
            }
        }
        self.finish()
    }

    /// When the loop must wake up without a record: to retry opening, or for the
    /// once-a-second sync.
    fn deadline(&self) -> Option<Instant> {
        if self.active.is_none() {
            Some(self.retry_at)
        } else if self.policy != FsyncPolicy::Never && self.dirty {
            Some(self.last_sync + SYNC_INTERVAL)
        } else {
            None
        }
    }

    fn try_open(&mut self) -> bool {
        match resume(&self.path, self.policy) {
            Ok(found) => {
                self.adopt(found);
                true
            }
            Err(e) => {
                self.set_unwritable(&e, "open");
                false
            }
        }
    }

    fn adopt(&mut self, found: Resumed) {
        for &offset in &found.torn {
            if !self.reported_torn.contains(&offset) {
                warn!(
                    file = %self.path.display(),
                    offset,
                    "torn line in the audit log (crash mid-write?): skipped, the chain continues from the last complete record"
                );
                self.shared.observer.torn_line();
                self.reported_torn.push(offset);
            }
        }
        match found.last {
            Some(last) => {
                if !last.hash_ok {
                    error!(
                        file = %last.file.display(),
                        seq = last.seq,
                        "the last audit record does not match its hash; the chain continues from it, run `taskgate audit verify`"
                    );
                }
                let next_seq = last.seq.saturating_add(1);
                if self.chain_known && (next_seq != self.next_seq || last.hash != self.prev) {
                    warn!(
                        file = %last.file.display(),
                        disk_seq = last.seq,
                        writer_seq = self.next_seq - 1,
                        "the audit log on disk differs from the writer's last record; continuing from disk"
                    );
                }
                self.next_seq = next_seq;
                self.prev = last.hash;
            }
            None if self.chain_known && self.next_seq > 1 => {
                warn!(
                    file = %self.path.display(),
                    next_seq = self.next_seq,
                    "no audit records found on disk any more; the chain continues in a new file"
                );
            }
            None => {
                self.next_seq = 1;
                self.prev = GENESIS;
            }
        }
        self.chain_known = true;
        self.active = Some(found.active);
        self.dirty = false;
        self.last_sync = Instant::now();
        self.shared.writable.store(true, Ordering::Release);
        if self.last_error.take().is_some() {
            info!(file = %self.path.display(), next_seq = self.next_seq, "audit log writable again");
        }
    }

    /// Drops the file and refuses records until a re-open succeeds.
    fn set_unwritable(&mut self, err: &io::Error, op: &'static str) {
        self.active = None;
        self.dirty = false;
        self.shared.writable.store(false, Ordering::Release);
        self.retry_at = Instant::now() + RETRY_INTERVAL;
        let text = format!("{op}: {err}");
        if self.last_error.as_deref() != Some(&text) {
            error!(
                file = %self.path.display(),
                op,
                cause = %err,
                "audit log not writable: attempts are refused until it recovers"
            );
            self.last_error = Some(text);
        }
    }

    fn write_batch(&mut self, batch: &mut Vec<(Record, Option<Ack>)>) {
        if self.active.is_none() {
            for (rec, ack) in batch.drain(..) {
                self.fail(rec.event, ack, &AuditError::NotWritable);
            }
            return;
        }
        // One timestamp per batch: the records are written at the same instant.
        let ts = timestamp(OffsetDateTime::now_utc());
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let mut seq = self.next_seq;
        let mut prev = self.prev;
        if self.active.as_ref().is_some_and(|a| a.need_newline) {
            buf.push(b'\n');
        }
        let mut failure = None;
        let mut rest = batch.drain(..);
        for (rec, ack) in rest.by_ref() {
            let start = buf.len();
            let hash = match encode_line(&mut buf, seq, &ts, &rec, &prev) {
                Ok(hash) => hash,
                Err(e) => {
                    warn!(request_id = %rec.request_id, cause = %e, "audit record could not be serialised");
                    self.fail(rec.event, ack, &AuditError::Encode(e.to_string()));
                    continue;
                }
            };
            if self.must_rotate(buf.len() as u64) {
                // The records before this one close the current file; this one
                // opens the next.
                if let Err(e) = self.commit(&buf[..start]) {
                    failure = Some((e, "write", Some((rec.event, ack))));
                    break;
                }
                self.complete_inflight(seq, prev);
                if let Err(e) = self.rotate() {
                    failure = Some((e, "rotate", Some((rec.event, ack))));
                    break;
                }
                buf.drain(..start);
            }
            self.inflight.push((seq, rec.event, ack));
            prev = hash;
            seq += 1;
        }
        if failure.is_none() {
            match self.commit(&buf) {
                Ok(()) => self.complete_inflight(seq, prev),
                Err(e) => failure = Some((e, "write", None)),
            }
        }
        if let Some((e, op, current)) = failure {
            // Unwritable first, so a caller that sees the error also sees
            // `is_writable() == false`.
            self.set_unwritable(&e, op);
            let err = write_error(&e);
            if let Some((event, ack)) = current {
                self.fail(event, ack, &err);
            }
            for (_, event, ack) in std::mem::take(&mut self.inflight) {
                self.fail(event, ack, &err);
            }
            for (rec, ack) in rest {
                self.fail(rec.event, ack, &err);
            }
        }
        if buf.capacity() > KEEP_BUF {
            buf = Vec::with_capacity(64 * 1024);
        }
        self.buf = buf;
    }

    /// Whether a file holding records would grow past `max_bytes` with `pending`
    /// more bytes (a record larger than `max_bytes` still gets a file of its own).
    fn must_rotate(&self, pending: u64) -> bool {
        match &self.active {
            Some(a) => {
                self.max_bytes > 0
                    && !self.rotation_blocked
                    && (a.has_records || !self.inflight.is_empty())
                    && a.len + pending > self.max_bytes
            }
            None => false,
        }
    }

    /// Writes `bytes` (the lines of `self.inflight`) and, for `always`, syncs.
    /// On failure the file is truncated back so no partial record stays behind.
    fn commit(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let Some(active) = self.active.as_mut() else {
            return Err(io::Error::other("the audit log is not open"));
        };
        let before = active.len;
        let mut result = active.file.write_all(bytes);
        // `always` syncs batches that someone waits on (attempts). Outcome and
        // rejected records alone are synced a second later at most, so an
        // outcome's fsync never queues in front of the next attempt's.
        let waited_on = self.inflight.iter().any(|(_, _, ack)| ack.is_some());
        let sync_now = self.policy == FsyncPolicy::Always && waited_on;
        if result.is_ok() && sync_now {
            let started = Instant::now();
            result = if self.faults.take_sync_failure() {
                Err(io::Error::other("injected fsync failure"))
            } else {
                active.file.sync_data()
            };
            if result.is_ok() {
                self.shared.observer.fsync_done(started.elapsed());
            }
        }
        match result {
            Ok(()) => {
                active.len += bytes.len() as u64;
                active.need_newline = false;
                active.has_records |= !self.inflight.is_empty();
                // A sync of this batch covers everything written before it.
                self.dirty = !sync_now;
                if sync_now {
                    self.last_sync = Instant::now();
                }
                Ok(())
            }
            Err(e) => {
                if let Err(te) = active.file.set_len(before) {
                    warn!(
                        file = %self.path.display(),
                        cause = %te,
                        "could not truncate a failed audit write; the next open skips the partial line"
                    );
                }
                Err(e)
            }
        }
    }

    /// The records in flight are in the file: advance the chain head, answer.
    fn complete_inflight(&mut self, next_seq: u64, prev: HexHash) {
        self.next_seq = next_seq;
        self.prev = prev;
        for (seq, event, ack) in self.inflight.drain(..) {
            if let Some(ack) = ack {
                // The caller may have gone away; the record is written anyway.
                let _ = ack.send(Ok(seq));
            }
            self.shared.observer.record_written(event);
        }
    }

    fn fail(&self, event: Event, ack: Option<Ack>, err: &AuditError) {
        match ack {
            Some(ack) => {
                let _ = ack.send(Err(err.clone()));
            }
            None => self.shared.observer.record_dropped(event),
        }
    }

    /// Renames the active file to its rotated name and opens a fresh one.
    fn rotate(&mut self) -> io::Result<()> {
        let last_seq = self.next_seq.saturating_sub(1);
        let target = rotated_path(&self.path, last_seq);
        if fs::symlink_metadata(&target).is_ok() {
            warn!(
                target = %target.display(),
                "rotated audit file already exists; rotation is off until restart"
            );
            self.rotation_blocked = true;
            return Ok(());
        }
        if self.policy != FsyncPolicy::Never
            && self.dirty
            && let Some(active) = &self.active
        {
            let started = Instant::now();
            active.file.sync_data()?;
            self.shared.observer.fsync_done(started.elapsed());
        }
        self.dirty = false;
        fs::rename(&self.path, &target)?;
        self.active = None;
        let (file, _) = open_active(&self.path)?;
        if self.policy != FsyncPolicy::Never {
            // Makes the rename and the new file's entry durable.
            sync_dir(&self.path)?;
        }
        self.active = Some(Active {
            file,
            len: 0,
            need_newline: false,
            has_records: false,
        });
        self.reported_torn.clear();
        self.last_sync = Instant::now();
        info!(rotated = %target.display(), last_seq, "audit log rotated");
        Ok(())
    }

    /// The once-a-second sync of `fsync = "interval"`.
    fn sync(&mut self) {
        let Some(active) = &self.active else { return };
        let started = Instant::now();
        match active.file.sync_data() {
            Ok(()) => {
                self.shared.observer.fsync_done(started.elapsed());
                self.dirty = false;
                self.last_sync = Instant::now();
            }
            // Written records stay (they were acknowledged); the re-open resumes
            // from whatever the file holds.
            Err(e) => self.set_unwritable(&e, "fsync"),
        }
    }

    /// Graceful stop: what was written is synced, whatever the policy.
    fn finish(&mut self) -> Result<(), AuditError> {
        if !self.dirty {
            return Ok(());
        }
        let Some(active) = &self.active else {
            return Ok(());
        };
        let started = Instant::now();
        match active.file.sync_data() {
            Ok(()) => {
                self.shared.observer.fsync_done(started.elapsed());
                self.dirty = false;
                Ok(())
            }
            Err(e) => {
                error!(file = %self.path.display(), cause = %e, "final audit fsync failed");
                Err(write_error(&e))
            }
        }
    }
}

fn write_error(e: &io::Error) -> AuditError {
    AuditError::Write(Arc::new(io::Error::new(e.kind(), e.to_string())))
}

fn push(msg: Msg, batch: &mut Vec<(Record, Option<Ack>)>, rx: &mut mpsc::Receiver<Msg>) {
    match msg {
        Msg::Append(rec, ack) => batch.push((rec, ack)),
        // Refuse new records; those already queued are still received and written.
        Msg::Shutdown => rx.close(),
    }
}

struct NotWritableOnExit(Arc<Shared>);

impl Drop for NotWritableOnExit {
    fn drop(&mut self) {
        self.0.writable.store(false, Ordering::Release);
    }
}

#[allow(clippy::large_enum_variant)] // a stack value, see `Msg`
enum Recv {
    Msg(Msg),
    Timeout,
    Closed,
}

/// Wakes the writer thread parked in `recv_until`.
struct ThreadWaker(thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

/// `blocking_recv` with an optional deadline: polls the receiver and parks the
/// thread until the channel wakes it or the deadline passes.
fn recv_until(
    rx: &mut mpsc::Receiver<Msg>,
    deadline: Option<Instant>,
    cx: &mut Context<'_>,
) -> Recv {
    loop {
        match rx.poll_recv(cx) {
            Poll::Ready(Some(msg)) => return Recv::Msg(msg),
            Poll::Ready(None) => return Recv::Closed,
            Poll::Pending => {}
        }
        match deadline {
            None => thread::park(),
            Some(deadline) => {
                let now = Instant::now();
                if now >= deadline {
                    return Recv::Timeout;
                }
                thread::park_timeout(deadline - now);
            }
        }
    }
}

/// Opens the active file for reading (the tail scan) and appending, and takes
/// an advisory lock so a second process cannot interleave its own chain.
/// Returns whether the file was created.
fn open_active(path: &Path) -> io::Result<(File, bool)> {
    let existed = fs::symlink_metadata(path).is_ok();
    let file = OpenOptions::new()
        .read(true)
        .append(true)
        .create(true)
        .open(path)?;
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                "locked by another process (two gateways on one audit file?)",
            ));
        }
        // Filesystems without locks: carry on unlocked.
        Err(TryLockError::Error(e)) => {
            tracing::debug!(file = %path.display(), cause = %e, "audit file lock unavailable");
        }
    }
    Ok((file, !existed))
}

fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(parent_dir(path))?.sync_all()
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

struct LastRecord {
    file: PathBuf,
    seq: u64,
    hash: HexHash,
    hash_ok: bool,
}

struct Resumed {
    active: Active,
    /// The newest complete record, in the active file or else the newest rotated one.
    last: Option<LastRecord>,
    /// Byte offsets of the torn lines after the last record of the active file.
    torn: Vec<u64>,
}

/// Opens the active file and finds where the chain stands.
fn resume(path: &Path, policy: FsyncPolicy) -> io::Result<Resumed> {
    let (mut file, created) = open_active(path)?;
    if created && policy != FsyncPolicy::Never {
        sync_dir(path)?;
    }
    let len = file.metadata()?.len();
    let need_newline = len > 0 && read_byte(&mut file, len - 1)? != b'\n';
    let tail = scan_tail(&mut file, len)?;
    let has_records = tail.last.is_some();
    let mut last = tail.last.map(|info| LastRecord {
        file: path.to_path_buf(),
        seq: info.seq,
        hash: info.hash,
        hash_ok: info.hash_ok,
    });
    if last.is_none() {
        // Empty or new active file (e.g. right after a rotation): the chain
        // continues from the newest rotated file that holds a record.
        for rotated in rotated_files(path)?.iter().rev() {
            let mut f = File::open(rotated)?;
            let len = f.metadata()?.len();
            if let Some(info) = scan_tail(&mut f, len)?.last {
                last = Some(LastRecord {
                    file: rotated.clone(),
                    seq: info.seq,
                    hash: info.hash,
                    hash_ok: info.hash_ok,
                });
                break;
            }
        }
    }
    Ok(Resumed {
        active: Active {
            file,
            len,
            need_newline,
            has_records,
        },
        last,
        torn: tail.torn,
    })
}

struct TailScan {
    last: Option<super::record::LineInfo>,
    torn: Vec<u64>,
}

/// Walks the file's lines backwards from the end to the last complete record,
/// collecting the offsets of the unreadable lines after it. Reads in chunks, so
/// memory stays bounded whatever the file holds.
fn scan_tail(file: &mut File, len: u64) -> io::Result<TailScan> {
    let mut scan = TailScan {
        last: None,
        torn: Vec::new(),
    };
    if len == 0 {
        return Ok(scan);
    }
    let mut chunk = vec![0u8; SCAN_CHUNK];
    let mut line_end = if read_byte(file, len - 1)? == b'\n' {
        len - 1
    } else {
        len
    };
    let mut line = Vec::new();
    loop {
        let line_start = match prev_newline(file, line_end, &mut chunk)? {
            Some(nl) => nl + 1,
            None => 0,
        };
        let line_len = line_end - line_start;
        if line_len <= MAX_LINE {
            line.resize(line_len as usize, 0);
            file.seek(SeekFrom::Start(line_start))?;
            file.read_exact(&mut line)?;
            if let Parsed::Record(info) = parse_line(&line) {
                scan.last = Some(info);
                return Ok(scan);
            }
        }
        scan.torn.push(line_start);
        if line_start == 0 {
            return Ok(scan);
        }
        line_end = line_start - 1;
    }
}

/// Offset of the last `\n` before `before`, if any.
fn prev_newline(file: &mut File, before: u64, chunk: &mut [u8]) -> io::Result<Option<u64>> {
    let mut end = before;
    while end > 0 {
        let start = end.saturating_sub(chunk.len() as u64);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut chunk[..n])?;
        if let Some(i) = chunk[..n].iter().rposition(|&b| b == b'\n') {
            return Ok(Some(start + i as u64));
        }
        end = start;
    }
    Ok(None)
}

fn read_byte(file: &mut File, at: u64) -> io::Result<u8> {
    let mut b = [0u8; 1];
    file.seek(SeekFrom::Start(at))?;
    file.read_exact(&mut b)?;
    Ok(b[0])
}

/// The name a full active file is renamed to: the last `seq` it holds, zero-padded
/// to 20 digits, before the extension: `taskgate-audit.jsonl` holding records up
/// to seq 4711 becomes `taskgate-audit.00000000000000004711.jsonl` (a name
/// without an extension gets `.<20 digits>` appended). Name order is
/// chronological order, and the active file sorts after its rotated files.
pub fn rotated_path(active: &Path, last_seq: u64) -> PathBuf {
    let digits = format!("{last_seq:020}");
    let mut name = OsString::new();
    match (active.file_stem(), active.extension()) {
        (Some(stem), Some(ext)) => {
            name.push(stem);
            name.push(".");
            name.push(&digits);
            name.push(".");
            name.push(ext);
        }
        _ => {
            name.push(active.file_name().unwrap_or_default());
            name.push(".");
            name.push(&digits);
        }
    }
    active.with_file_name(name)
}

/// The `seq` in `name` if it is a rotated name of `active`.
fn rotated_seq(active: &Path, name: &std::ffi::OsStr) -> Option<u64> {
    let (prefix, suffix) = match (active.file_stem(), active.extension()) {
        (Some(stem), Some(ext)) => (
            [stem.as_encoded_bytes(), b"."].concat(),
            [b".", ext.as_encoded_bytes()].concat(),
        ),
        _ => (
            [active.file_name()?.as_encoded_bytes(), b"."].concat(),
            Vec::new(),
        ),
    };
    let digits = name
        .as_encoded_bytes()
        .strip_prefix(prefix.as_slice())?
        .strip_suffix(suffix.as_slice())?;
    if digits.len() != 20 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The rotated files of `active`, oldest first.
fn rotated_files(active: &Path) -> io::Result<Vec<PathBuf>> {
    let dir = parent_dir(active);
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Some(seq) = rotated_seq(active, &entry.file_name()) {
            found.push((seq, dir.join(entry.file_name())));
        }
    }
    found.sort();
    Ok(found.into_iter().map(|(_, path)| path).collect())
}

/// Every file of the log at `active`, in chain order: its rotated files oldest
/// first, then `active` itself if it exists. What `verify` wants when given
/// only the configured path.
pub fn audit_files(active: &Path) -> io::Result<Vec<PathBuf>> {
    let mut files = rotated_files(active)?;
    if fs::symlink_metadata(active).is_ok() {
        files.push(active.to_path_buf());
    }
    Ok(files)
}

#[cfg(test)]
impl AuditLog {
    /// `start` with fault injection; returns the handle to arm it.
    pub(super) fn start_with_failing_syncs(
        cfg: AuditConfig,
        observer: Arc<dyn AuditObserver>,
    ) -> (AuditLog, AuditWriterTask, Arc<std::sync::atomic::AtomicU32>) {
        let faults = Faults::default();
        let arm = Arc::clone(&faults.fail_syncs);
        let (log, task) = Self::start_with(cfg, observer, faults);
        (log, task, arm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_names_sort_chronologically_and_parse_back() {
        let active = Path::new("/var/log/taskgate-audit.jsonl");
        let a = rotated_path(active, 9);
        let b = rotated_path(active, 10);
        assert_eq!(
            a,
            Path::new("/var/log/taskgate-audit.00000000000000000009.jsonl")
        );
        assert!(a.file_name() < b.file_name());
        assert!(b.file_name().unwrap() < active.file_name().unwrap());
        assert_eq!(rotated_seq(active, b.file_name().unwrap()), Some(10));
        assert_eq!(rotated_seq(active, active.file_name().unwrap()), None);
        assert_eq!(
            rotated_seq(active, "taskgate-audit.123.jsonl".as_ref()),
            None
        );

        let bare = Path::new("audit");
        assert_eq!(
            rotated_path(bare, u64::MAX),
            Path::new("audit.18446744073709551615")
        );
        assert_eq!(
            rotated_seq(bare, "audit.00000000000000000042".as_ref()),
            Some(42)
        );
        assert_eq!(
            rotated_seq(bare, "audit.99999999999999999999".as_ref()),
            None
        );
    }

    #[test]
    fn tail_scan_skips_torn_lines_back_to_the_last_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.jsonl");
        let mut bytes = Vec::new();
        let mut prev = GENESIS;
        for seq in 1..=3 {
            prev = encode_line(
                &mut bytes,
                seq,
                "2026-01-01T00:00:00.000Z",
                &Record::attempt("r"),
                &prev,
            )
            .unwrap();
        }
        bytes.extend_from_slice(b"{\"seq\":4,\"ts\"\n");
        let second_torn = bytes.len() as u64;
        bytes.extend_from_slice(&vec![0u8; 200_000]);
        fs::write(&path, &bytes).unwrap();

        let mut f = File::open(&path).unwrap();
        let scan = scan_tail(&mut f, bytes.len() as u64).unwrap();
        let last = scan.last.unwrap();
        assert_eq!((last.seq, last.hash), (3, prev));
        assert_eq!(scan.torn.len(), 2);
        assert_eq!(scan.torn[0], second_torn);
    }
}
