//! The audit writer. The request path encodes, chains and writes its own record
//! into the active file, under one lock: no hand-off to another thread, so an
//! `attempt` with `fsync = "never"`/`"interval"` costs one `write` and no wake-up.
//! One background thread does what must not hold up a request: the
//! group-commit `fdatasync` that `fsync = "always"` attempts wait for (every
//! attempt written while one sync runs shares the next), the once-a-second
//! sync, re-opening an unwritable log, and the final sync at shutdown. Also here:
//! resuming the chain at start-up, and rotation.

use std::ffi::OsString;
use std::fmt;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio::sync::oneshot;
use tracing::{error, info, warn};

use super::record::{Event, GENESIS, HexHash, Parsed, Record, encode_line, parse_line, timestamp};
use super::{AuditConfig, AuditError, AuditObserver, FsyncPolicy};

/// How often an unwritable log is re-opened.
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How often `fsync = "interval"` syncs (when something was written), and how
/// long `outcome`/`rejected` records wait for a sync with `"always"` (give or
/// take [`IDLE_CHECK`]).
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// With `always`, when attempts arrive concurrently (the last sync covered
/// more than one), the sync thread waits this long after the first waiting
/// attempt for others to join. An fsync costs ~50 µs of CPU on the bench VM
/// (virtio exits) whatever it covers; at 32 connections this roughly halves
/// the fsyncs, for ≤ 250 µs more latency. A lone caller never waits.
const GROUP_COMMIT_WINDOW: Duration = Duration::from_micros(250);
/// The sync thread looks at least this often for an interval sync that is due
/// (writes do not wake it for that) and whether every handle is gone.
const IDLE_CHECK: Duration = Duration::from_millis(250);
/// The line buffer is shrunk back after a record larger than this.
const KEEP_BUF: usize = 1 << 20;
/// Chunk size of the backwards scan for the last record at start-up.
const SCAN_CHUNK: usize = 64 * 1024;
/// A line longer than this is never a record (request bodies are limited to a
/// few KiB to MiB): skipped as torn at start-up without reading it into memory.
const MAX_LINE: u64 = 64 << 20;

type Ack = oneshot::Sender<Result<u64, AuditError>>;

/// Shared by the handles and the sync thread.
struct Shared {
    /// Whether the log is open and healthy. Read by every `append*` (fail fast)
    /// and by readyz without taking the lock.
    writable: AtomicBool,
    observer: Arc<dyn AuditObserver>,
    state: Mutex<Writer>,
    /// Wakes the sync thread: an attempt waits for its fsync, the log became
    /// dirty, or shutdown.
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Writer> {
        // A panic while holding the lock leaves the writer's fields consistent
        // at every await-free step that matters (the file is the truth, and the
        // next open re-reads it), so the log stays usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A cheap, cloneable handle to the audit log.
#[derive(Clone)]
pub struct AuditLog {
    shared: Arc<Shared>,
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
/// is gone; it then syncs what was written and exits.
#[must_use = "await `shutdown()` at exit so written records are synced"]
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
    /// Opens (or creates) `cfg.path`, resumes `seq` and the chain from the last
    /// record on disk, and starts the sync thread.
    ///
    /// Never fails because the log is unwritable: the handle then starts "not
    /// writable" ([`AuditLog::is_writable`] is false, attempts fail fast) and the
    /// sync thread retries every [`RETRY_INTERVAL`] until it can open the file.
    /// The first open happens here, synchronously, so a healthy log is writable
    /// when this returns. Needs no runtime; `shutdown` does.
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
        let shared = Arc::new(Shared {
            writable: AtomicBool::new(false),
            observer: Arc::clone(&observer),
            state: Mutex::new(Writer::new(cfg, observer, faults)),
            wake: Condvar::new(),
        });
        shared.lock().try_open(&shared.writable);
        let thread = thread::Builder::new()
            .name("taskgate-audit".into())
            .spawn({
                let shared = Arc::clone(&shared);
                move || sync_thread(&shared)
            })
            .expect("the OS starts the audit sync thread (start-up)");
        (
            AuditLog {
                shared: Arc::clone(&shared),
            },
            AuditWriterTask { shared, thread },
        )
    }

    /// Appends `rec` and waits until it is durable per the fsync policy (synced
    /// for `always`; written to the OS for `interval`/`never`, which return
    /// without waiting); returns its `seq`. For `attempt` records: on `Err` the
    /// request must not be forwarded (503 audit_unavailable). Fails at once when
    /// the log is not writable. If the caller's future is dropped while it waits
    /// for the sync, the record is still in the log.
    pub async fn append_durable(&self, rec: Record) -> Result<u64, AuditError> {
        if !self.is_writable() {
            return Err(self.unavailable());
        }
        let done = {
            let mut w = self.shared.lock();
            let seq = w.write(&rec, true, &self.shared.writable)?;
            if w.policy != FsyncPolicy::Always {
                return Ok(seq);
            }
            let (ack, done) = oneshot::channel();
            if w.waiting.is_empty() {
                w.first_waiting_at = Instant::now();
            }
            w.waiting.push((seq, ack));
            if w.thread_idle {
                w.thread_idle = false;
                self.shared.wake.notify_one();
            }
            done
        };
        done.await.map_err(|_| AuditError::Closed)?
    }

    /// Writes `rec` (`outcome`, `rejected`) without waiting for the disk. When the
    /// log is not writable or the write fails, the record is dropped and counted
    /// through [`AuditObserver::record_dropped`].
    pub fn append(&self, rec: Record) {
        if self.is_writable() {
            let mut w = self.shared.lock();
            if w.write(&rec, false, &self.shared.writable).is_ok() {
                return;
            }
        }
        self.shared.observer.record_dropped(rec.event);
    }

    /// Whether the log is open and its last write and sync succeeded (readyz).
    pub fn is_writable(&self) -> bool {
        self.shared.writable.load(Ordering::Acquire)
    }

    /// Attempts written and waiting for the next fsync to start (`always`).
    pub fn queue_len(&self) -> usize {
        self.shared.lock().waiting.len()
    }

    fn unavailable(&self) -> AuditError {
        if self.shared.lock().closed {
            AuditError::Closed
        } else {
            AuditError::NotWritable
        }
    }
}

impl AuditWriterTask {
    /// Stops the log: appends from now on fail with [`AuditError::Closed`] (or
    /// are dropped), what was written is synced (whatever the fsync policy),
    /// waiting attempts are answered and the thread is joined. Waits for as
    /// long as a hung disk blocks the last fsync: wrap it in the shutdown grace
    /// timeout.
    pub async fn shutdown(self) -> Result<(), AuditError> {
        {
            let mut w = self.shared.lock();
            w.closed = true;
            self.shared.wake.notify_one();
        }
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
    /// Shared with the sync thread, which syncs it without holding the lock.
    file: Arc<File>,
    /// Bytes in the file; a failed write is truncated back to this.
    len: u64,
    /// The file ends in a torn line without `\n`: the next write starts with one.
    need_newline: bool,
    /// The file holds at least one record (a file is rotated only then, so every
    /// rotated file is named after a record it holds).
    has_records: bool,
}

/// A point in the log: the active file's length and the chain head there.
#[derive(Clone, Copy)]
struct Mark {
    len: u64,
    next_seq: u64,
    prev: HexHash,
}

/// The log's state, behind [`Shared::state`].
struct Writer {
    path: PathBuf,
    policy: FsyncPolicy,
    max_bytes: u64,
    observer: Arc<dyn AuditObserver>,
    faults: Faults,
    active: Option<Active>,
    /// The chain head: `seq` and `prev` of the next record.
    next_seq: u64,
    prev: HexHash,
    /// Whether `next_seq`/`prev` come from the log (false before the first open).
    chain_known: bool,
    /// Reused line buffer; byte 0 is room for the `\n` that ends a torn line.
    buf: Vec<u8>,
    /// The last formatted `ts` and the millisecond it stands for.
    ts: (i128, String),
    /// `always`: attempts written, waiting for the next fsync.
    waiting: Vec<(u64, Ack)>,
    /// `always`: attempts covered by the fsync running now.
    syncing: Vec<(u64, Ack)>,
    /// `always`: when the first of `waiting` was written.
    first_waiting_at: Instant,
    /// `always`: attempts covered by the last fsync.
    last_batch: usize,
    /// `always`: records written since `synced` — (seq, event, someone waits).
    /// Counted as written once synced; dropped if a failure takes them back.
    unsynced: Vec<(u64, Event, bool)>,
    /// `always`: the last point known durable, where a failed write or sync
    /// takes the file and the chain back to.
    synced: Mark,
    /// Bumped whenever the active file is replaced or dropped, so a sync that
    /// ran on the old file does not move the new one's durable point.
    epoch: u64,
    /// Written but not synced.
    dirty: bool,
    /// The sync thread waits for work; a notify is needed to wake it.
    thread_idle: bool,
    closed: bool,
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
    fn new(cfg: AuditConfig, observer: Arc<dyn AuditObserver>, faults: Faults) -> Self {
        let now = Instant::now();
        Writer {
            path: cfg.path,
            policy: cfg.fsync,
            max_bytes: cfg.max_bytes,
            observer,
            faults,
            active: None,
            next_seq: 1,
            prev: GENESIS,
            chain_known: false,
            buf: Vec::with_capacity(4096),
            ts: (i128::MIN, String::new()),
            waiting: Vec::new(),
            syncing: Vec::new(),
            first_waiting_at: now,
            last_batch: 0,
            unsynced: Vec::new(),
            synced: Mark {
                len: 0,
                next_seq: 1,
                prev: GENESIS,
            },
            epoch: 0,
            dirty: false,
            thread_idle: false,
            closed: false,
            last_sync: now,
            retry_at: now,
            last_error: None,
            reported_torn: Vec::new(),
            rotation_blocked: false,
        }
    }

    /// The current `ts`, formatted at most once per millisecond.
    fn timestamp(&mut self) -> String {
        let now = OffsetDateTime::now_utc();
        let ms = now.unix_timestamp_nanos() / 1_000_000;
        if self.ts.0 != ms {
            self.ts = (ms, timestamp(now));
        }
        self.ts.1.clone()
    }

    /// Encodes, chains and writes one record; returns its `seq`. On failure the
    /// record is not in the file and the log is unwritable (with `always`, the
    /// file and chain are taken back to the last durable point).
    fn write(
        &mut self,
        rec: &Record,
        waited: bool,
        writable: &AtomicBool,
    ) -> Result<u64, AuditError> {
        if self.closed {
            return Err(AuditError::Closed);
        }
        if self.active.is_none() {
            return Err(AuditError::NotWritable);
        }
        let ts = self.timestamp();
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        buf.push(b'\n');
        let encoded = encode_line(&mut buf, self.next_seq, &ts, rec, &self.prev);
        let result = match encoded {
            Ok(hash) => self.commit(&buf, hash, rec.event, waited, writable),
            Err(e) => {
                warn!(request_id = %rec.request_id, cause = %e, "audit record could not be serialised");
                Err(AuditError::Encode(e.to_string()))
            }
        };
        if buf.capacity() > KEEP_BUF {
            buf = Vec::with_capacity(4096);
        }
        self.buf = buf;
        result
    }

    /// Writes the encoded line (`buf[1..]`, or all of `buf` after a torn line).
    fn commit(
        &mut self,
        buf: &[u8],
        hash: HexHash,
        event: Event,
        waited: bool,
        writable: &AtomicBool,
    ) -> Result<u64, AuditError> {
        if self.must_rotate(buf.len() as u64 - 1)
            && let Err(e) = self.rotate()
        {
            self.fail(&e, "rotate", writable);
            return Err(write_error(&e));
        }
        let Some(active) = self.active.as_mut() else {
            return Err(AuditError::NotWritable);
        };
        let bytes = if active.need_newline { buf } else { &buf[1..] };
        let before = active.len;
        if let Err(e) = (&*active.file).write_all(bytes) {
            if let Err(te) = active.file.set_len(before) {
                warn!(
                    file = %self.path.display(),
                    cause = %te,
                    "could not truncate a failed audit write; the next open skips the partial line"
                );
            }
            self.fail(&e, "write", writable);
            return Err(write_error(&e));
        }
        active.len += bytes.len() as u64;
        active.need_newline = false;
        active.has_records = true;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.prev = hash;
        self.dirty = true;
        if self.policy == FsyncPolicy::Always {
            self.unsynced.push((seq, event, waited));
        } else {
            self.observer.record_written(event);
        }
        Ok(seq)
    }

    /// Whether a file holding records would grow past `max_bytes` with `pending`
    /// more bytes (a record larger than `max_bytes` still gets a file of its own).
    fn must_rotate(&self, pending: u64) -> bool {
        match &self.active {
            Some(a) => {
                self.max_bytes > 0
                    && !self.rotation_blocked
                    && a.has_records
                    && a.len + pending > self.max_bytes
            }
            None => false,
        }
    }

    /// A write or sync failed: with `always`, the file and the chain go back to
    /// the last durable point and everything after it is refused or dropped
    /// (nobody was told those records were kept); otherwise written records
    /// stay. Then the log is unwritable until re-opened.
    fn fail(&mut self, err: &io::Error, op: &'static str, writable: &AtomicBool) {
        if self.policy == FsyncPolicy::Always {
            if let Some(active) = &self.active
                && let Err(te) = active.file.set_len(self.synced.len)
            {
                warn!(
                    file = %self.path.display(),
                    cause = %te,
                    "could not truncate unsynced audit records; the next open resumes after them"
                );
            }
            self.next_seq = self.synced.next_seq;
            self.prev = self.synced.prev;
        }
        // Unwritable first, so a caller that sees the error also sees
        // `is_writable() == false`.
        self.set_unwritable(err, op, writable);
        self.fail_pending(&write_error(err));
    }

    /// Refuses the attempts waiting for a sync and counts the other unsynced
    /// records as dropped.
    fn fail_pending(&mut self, err: &AuditError) {
        for (_, ack) in self.waiting.drain(..).chain(self.syncing.drain(..)) {
            let _ = ack.send(Err(err.clone()));
        }
        for (_, event, waited) in self.unsynced.drain(..) {
            if !waited {
                self.observer.record_dropped(event);
            }
        }
    }

    /// Everything up to `upto` (a [`Mark`] of the current file) is durable.
    fn synced_to(&mut self, upto: Mark) {
        self.synced = upto;
        self.covered(upto.next_seq);
    }

    /// The records before `next_seq` are durable: count them, answer the
    /// attempts among them.
    fn covered(&mut self, next_seq: u64) {
        let done = self
            .unsynced
            .iter()
            .take_while(|(seq, _, _)| *seq < next_seq)
            .count();
        for (_, event, _) in self.unsynced.drain(..done) {
            self.observer.record_written(event);
        }
        for (seq, ack) in self.syncing.drain(..) {
            // The caller may have gone away; the record is kept anyway.
            let _ = ack.send(Ok(seq));
        }
        let done = self
            .waiting
            .iter()
            .take_while(|(seq, _)| *seq < next_seq)
            .count();
        for (seq, ack) in self.waiting.drain(..done) {
            let _ = ack.send(Ok(seq));
        }
    }

    /// The current end of the log.
    fn mark(&self) -> Option<Mark> {
        self.active.as_ref().map(|a| Mark {
            len: a.len,
            next_seq: self.next_seq,
            prev: self.prev,
        })
    }

    /// When the sync thread must look again without being woken: to retry
    /// opening, or for the once-a-second sync.
    fn deadline(&self) -> Option<Instant> {
        if self.active.is_none() {
            Some(self.retry_at)
        } else if self.policy != FsyncPolicy::Never && self.dirty {
            Some(self.last_sync + SYNC_INTERVAL)
        } else {
            None
        }
    }

    /// Whether the sync thread has a sync to run now.
    fn sync_due(&self) -> bool {
        self.active.is_some()
            && (!self.waiting.is_empty()
                || (self.policy != FsyncPolicy::Never
                    && self.dirty
                    && self.last_sync.elapsed() >= SYNC_INTERVAL))
    }

    fn try_open(&mut self, writable: &AtomicBool) -> bool {
        match resume(&self.path, self.policy) {
            Ok(found) => {
                self.adopt(found, writable);
                true
            }
            Err(e) => {
                self.set_unwritable(&e, "open", writable);
                false
            }
        }
    }

    fn adopt(&mut self, found: Resumed, writable: &AtomicBool) {
        for &offset in &found.torn {
            if !self.reported_torn.contains(&offset) {
                warn!(
                    file = %self.path.display(),
                    offset,
                    "torn line in the audit log (crash mid-write?): skipped, the chain continues from the last complete record"
                );
                self.observer.torn_line();
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
        self.synced = Mark {
            len: found.active.len,
            next_seq: self.next_seq,
            prev: self.prev,
        };
        self.active = Some(found.active);
        self.epoch += 1;
        self.dirty = false;
        self.last_sync = Instant::now();
        writable.store(true, Ordering::Release);
        if self.last_error.take().is_some() {
            info!(file = %self.path.display(), next_seq = self.next_seq, "audit log writable again");
        }
    }

    /// Drops the file and refuses records until a re-open succeeds.
    fn set_unwritable(&mut self, err: &io::Error, op: &'static str, writable: &AtomicBool) {
        self.active = None;
        self.epoch += 1;
        self.dirty = false;
        writable.store(false, Ordering::Release);
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

    /// Renames the active file to its rotated name and opens a fresh one. The
    /// old file is synced first, which answers every attempt waiting in it.
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
            self.observer.fsync_done(started.elapsed());
            if let Some(end) = self.mark() {
                self.synced_to(end);
            }
        }
        self.dirty = false;
        fs::rename(&self.path, &target)?;
        self.active = None;
        self.epoch += 1;
        let (file, _) = open_active(&self.path)?;
        if self.policy != FsyncPolicy::Never {
            // Makes the rename and the new file's entry durable.
            sync_dir(&self.path)?;
        }
        self.active = Some(Active {
            file: Arc::new(file),
            len: 0,
            need_newline: false,
            has_records: false,
        });
        self.synced = Mark {
            len: 0,
            next_seq: self.next_seq,
            prev: self.prev,
        };
        self.reported_torn.clear();
        self.last_sync = Instant::now();
        info!(rotated = %target.display(), last_seq, "audit log rotated");
        Ok(())
    }
}

/// The sync thread: runs each due sync without holding the lock (records keep
/// being written meanwhile, and share the next sync), re-opens an unwritable
/// log, and syncs once more at shutdown.
fn sync_thread(shared: &Arc<Shared>) -> Result<(), AuditError> {
    // However the thread ends (even by a panic), handles must stop reporting
    // the log writable.
    let writable = &shared.writable;
    let _not_writable_on_exit = NotWritableOnExit(writable);
    let mut w = shared.lock();
    loop {
        if w.closed || Arc::strong_count(shared) == 1 {
            break;
        }
        if w.active.is_none() && Instant::now() >= w.retry_at {
            w.try_open(writable);
        }
        if !w.sync_due() {
            let wait = w
                .deadline()
                .map_or(IDLE_CHECK, |d| d.saturating_duration_since(Instant::now()))
                .min(IDLE_CHECK);
            w.thread_idle = true;
            w = shared
                .wake
                .wait_timeout(w, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            w.thread_idle = false;
            continue;
        }
        // Group commit window: when attempts arrive concurrently (the last
        // sync covered several), let more join before syncing. An fsync costs
        // tens of µs of CPU here whatever it covers; a lone caller never waits.
        if w.last_batch > 1 {
            let until = w.first_waiting_at + GROUP_COMMIT_WINDOW;
            while !w.closed && w.active.is_some() {
                let now = Instant::now();
                if now >= until {
                    break;
                }
                w = shared
                    .wake
                    .wait_timeout(w, until - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        // One sync covers everything written so far.
        let (Some(end), Some(file)) = (w.mark(), w.active.as_ref().map(|a| Arc::clone(&a.file)))
        else {
            continue;
        };
        let epoch = w.epoch;
        let waiting = std::mem::take(&mut w.waiting);
        w.last_batch = waiting.len();
        w.syncing.extend(waiting);
        w.dirty = false;
        let inject_failure = w.faults.take_sync_failure();
        drop(w);
        let started = Instant::now();
        let result = if inject_failure {
            Err(io::Error::other("injected fsync failure"))
        } else {
            file.sync_data()
        };
        if result.is_ok() {
            // Before re-taking the lock: an observer that blocks (a test) must
            // not stop the writers.
            shared.observer.fsync_done(started.elapsed());
        }
        w = shared.lock();
        match result {
            Ok(()) if w.epoch == epoch => {
                w.last_sync = Instant::now();
                w.synced_to(end);
            }
            // The file was rotated meanwhile (a failure would have refused
            // the attempts already): what this sync covered is durable.
            Ok(()) => w.covered(end.next_seq),
            Err(e) if w.epoch == epoch => w.fail(&e, "fsync", writable),
            Err(e) => {
                let err = write_error(&e);
                for (_, ack) in w.syncing.drain(..) {
                    let _ = ack.send(Err(err.clone()));
                }
            }
        }
    }
    w.closed = true;
    let result = finish(&mut w, shared);
    // Closes the file and releases its lock, even while handles remain.
    w.active = None;
    result
}

/// Graceful stop: what was written is synced, whatever the policy, and every
/// waiting attempt is answered.
fn finish(w: &mut Writer, shared: &Shared) -> Result<(), AuditError> {
    let Some(end) = w.mark() else {
        w.fail_pending(&AuditError::Closed);
        return Ok(());
    };
    if !w.dirty {
        w.synced_to(end);
        return Ok(());
    }
    let started = Instant::now();
    let result = w.active.as_ref().map_or(Ok(()), |a| a.file.sync_data());
    match result {
        Ok(()) => {
            shared.observer.fsync_done(started.elapsed());
            w.dirty = false;
            w.synced_to(end);
            Ok(())
        }
        Err(e) => {
            error!(file = %w.path.display(), cause = %e, "final audit fsync failed");
            let err = write_error(&e);
            w.fail_pending(&err);
            Err(err)
        }
    }
}

fn write_error(e: &io::Error) -> AuditError {
    AuditError::Write(Arc::new(io::Error::new(e.kind(), e.to_string())))
}

struct NotWritableOnExit<'a>(&'a AtomicBool);

impl Drop for NotWritableOnExit<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
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
            file: Arc::new(file),
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
