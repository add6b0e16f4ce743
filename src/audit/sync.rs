//! The sync thread: the only code that touches the audit file. It takes each
//! batch the requests filled, writes it with one `write`, answers who waits
//! for the write, syncs (group commit: one `fdatasync` for every attempt
//! queued meanwhile), checks that the file it wrote is still the file at
//! `audit.path` before it answers who waits for the sync, rotates, enforces
//! retention, re-opens an unwritable log (proving it with a real write and
//! sync), and probes an idle one so readiness tells the truth.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, mpsc};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::record::{Event, HexHash};
use super::recover::{self, open_active, read_byte, resume, sync_dir};
use super::rotation::{enforce_retention, rotated_path};
use super::writer::{Queue, Shared, Until, Waiter};
use super::{AuditConfig, AuditError, FsyncPolicy};

/// How often an unwritable log is re-opened (and proven).
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// How often `fsync = "interval"` syncs (when something was written), and how
/// long records nobody waits for wait for a sync with `"always"`.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// With `always`, when attempts arrive concurrently (the last sync covered
/// more than one), the thread waits this long after the first waiting attempt
/// for others to join. Short: at 32 connections the sync itself (~250 µs of
/// wall time on the bench VM) gathers the next batch, and every microsecond
/// of window is a microsecond each waiting request is not being served —
/// the closed loop then leaves the CPU idle (bench/run.sh's `idle %`). 500 µs
/// left the machine 41 % idle at 19k req/s; 100 µs, 21 % idle at 24–26k
/// req/s, with fewer µs of CPU per request, not more. A lone caller never
/// waits.
const GROUP_COMMIT_WINDOW: Duration = Duration::from_micros(100);
/// Likewise for writes nobody syncs (`never`, `interval`, outcomes): when the
/// last batch held several records, wait this long after the first record of
/// the next one before writing it, so one write and one wake-up of this
/// thread serve several requests (50 µs: 34–35k req/s with `never` at 32
/// connections, against 28.5k with 250 µs).
const WRITE_WINDOW: Duration = Duration::from_micros(50);
/// When records have been coming one at a time and close together (one
/// request at a time: its attempt, the vendor's answer, its outcome, the
/// caller's next request), the thread spins up to this long for the next one
/// instead of sleeping: a sleep costs the next record a futex wake-up and this
/// thread a wake-up of an idle CPU, tens of µs on the bench VM. Only when the
/// last gap between batches was shorter than this, so a quiet log, or one
/// fed at 100 requests a second, never spins; under load the windows above
/// pace the thread instead.
const SPIN_FOR_NEXT: Duration = Duration::from_micros(100);
/// How often an idle log checks that its file is still the one at
/// `audit.path` (with `always` it is also checked after every sync).
const CHECK_EVERY: Duration = Duration::from_millis(250);
/// An idle log proves it can still write and sync (a full disk, a read-only
/// remount) when nothing has proven it for this long.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// What a probe appends and takes back: a whole page, so it needs a new
/// block on any filesystem (a byte could land in the last block's slack).
const PROBE_LEN: usize = 4096;
/// Copy chunk when a deleted file's records are re-written.
const COPY_CHUNK: usize = 256 * 1024;

/// Test-only fault injection; an empty struct otherwise.
#[derive(Default, Clone)]
pub(super) struct Faults {
    /// How many upcoming syncs that someone waits on fail.
    #[cfg(test)]
    fail_syncs: Arc<std::sync::atomic::AtomicU32>,
}

impl Faults {
    #[cfg(test)]
    pub fn arm(&self) -> Arc<std::sync::atomic::AtomicU32> {
        Arc::clone(&self.fail_syncs)
    }

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

/// Everything the thread owns; the file is nobody else's.
struct Syncer<'a> {
    shared: &'a Shared,
    cfg: AuditConfig,
    faults: Faults,
    active: Option<Active>,
    /// After the last successful write, and the last successful sync.
    written: Mark,
    synced: Mark,
    /// `always`: records written since the last sync, `(seq, event, waited)`;
    /// counted as written once synced, dropped if a failure takes them back.
    unsynced: Vec<(u64, Event, bool)>,
    /// Written but not synced.
    dirty: bool,
    /// Whether the chain head comes from the log (false before the first open).
    chain_known: bool,
    /// Synced-waiters of the last batch (the group-commit window's hint).
    last_batch: usize,
    /// Records of the last batch (the write window's hint).
    last_batch_records: usize,
    /// When the last batch was done, and how long the queue then stayed
    /// empty before the next record (the spin's hint).
    last_done: Instant,
    last_gap: Duration,
    last_sync: Instant,
    last_check: Instant,
    /// The last successful write (`never`) or sync that showed the log works.
    last_proven: Instant,
    retry_at: Instant,
    /// The error that made the log unwritable, logged once per distinct error.
    last_error: Option<String>,
    /// Offsets of torn lines of the active file already reported.
    reported_torn: Vec<u64>,
    /// A file already has the rotated name: rotation stays off until restart
    /// rather than overwrite it or refuse records.
    rotation_blocked: bool,
    /// The batch buffer handed back and forth with the queue.
    spare: Vec<u8>,
}

/// Runs until shutdown (or until every handle is gone). `opened` is told once
/// the first open has been tried, so `AuditLog::start` returns a writable log
/// when the disk is healthy.
pub(super) fn sync_thread(
    shared: &Arc<Shared>,
    cfg: AuditConfig,
    faults: Faults,
    opened: mpsc::Sender<()>,
) -> Result<(), AuditError> {
    // However the thread ends (even by a panic), handles must stop reporting
    // the log writable.
    let _not_writable_on_exit = NotWritableOnExit(&shared.writable);
    let now = Instant::now();
    let start = Mark {
        len: 0,
        next_seq: 1,
        prev: super::record::GENESIS,
    };
    let mut s = Syncer {
        shared,
        cfg,
        faults,
        active: None,
        written: start,
        synced: start,
        unsynced: Vec::new(),
        dirty: false,
        chain_known: false,
        last_batch: 0,
        last_batch_records: 0,
        last_done: now,
        last_gap: Duration::MAX,
        last_sync: now,
        last_check: now,
        last_proven: now,
        retry_at: now,
        last_error: None,
        reported_torn: Vec::new(),
        rotation_blocked: false,
        spare: Vec::with_capacity(16 * 1024),
    };
    s.open();
    let _ = opened.send(());
    // Slept once since the last batch, so the next one goes without a window.
    let mut paced = false;
    loop {
        let mut q = shared.lock();
        let stopping = q.closed || Arc::strong_count(shared) == 1;
        let busy = s.last_batch > 1 || s.last_batch_records > 1;
        if !stopping && q.records.is_empty() && !s.timer_due() {
            if busy && !paced && s.active.is_some() {
                // Under load, sleep the window without being woken: the next
                // batch gathers meanwhile, and neither the requests (a
                // futex wake each) nor this thread (a second sleep) pay for
                // waking it early.
                let window = if s.policy() == FsyncPolicy::Always {
                    GROUP_COMMIT_WINDOW
                } else {
                    WRITE_WINDOW
                };
                shared.awake.store(false, Ordering::Release);
                q = shared
                    .wake
                    .wait_timeout(q, window)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
                paced = true;
                drop(q);
                continue;
            }
            if !busy && s.last_gap < SPIN_FOR_NEXT && s.active.is_some() {
                drop(q);
                spin_for_record(shared);
                q = shared.lock();
                if !q.records.is_empty() {
                    continue;
                }
            }
            shared.awake.store(false, Ordering::Release);
            // Pushes set it under this lock; the batch is empty now.
            shared.pending.store(false, Ordering::Release);
            q.thread_idle = true;
            let wait = s.until_next_timer().min(CHECK_EVERY);
            q = shared
                .wake
                .wait_timeout(q, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            q.thread_idle = false;
            // Woken for a new batch after a quiet spell: a lone caller never
            // waits for a window it cannot share.
            continue;
        }
        // Group commit window: when attempts arrive concurrently (the last
        // sync covered several), let more join before syncing.
        let window = if paced || s.active.is_none() || q.records.is_empty() {
            None
        } else if waits_for_sync(&q) {
            (s.last_batch > 1).then_some(q.first_waiting_at + GROUP_COMMIT_WINDOW)
        } else {
            (s.last_batch_records > 1).then_some(q.first_record_at + WRITE_WINDOW)
        };
        if let Some(until) = window {
            loop {
                let now = Instant::now();
                if q.closed || now >= until {
                    break;
                }
                q = shared
                    .wake
                    .wait_timeout(q, until - now)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
        }
        let mut bytes = std::mem::take(&mut s.spare);
        if !q.records.is_empty() {
            s.last_gap = q.first_record_at.saturating_duration_since(s.last_done);
        }
        let (records, waiters) = q.take_batch(&mut bytes);
        shared.pending.store(false, Ordering::Release);
        let head = Mark {
            len: 0,
            next_seq: q.next_seq,
            prev: q.prev,
        };
        drop(q);
        if !records.is_empty() || !waiters.is_empty() {
            s.last_batch_records = records.len();
            s.process(&bytes, records, waiters, head);
            s.last_done = Instant::now();
            paced = false;
        } else if paced {
            // A window passed with nothing new: the load is gone.
            s.last_batch = 0;
            s.last_batch_records = 0;
        }
        s.spare = bytes;
        if stopping {
            let result = s.finish();
            shared.lock().closed = true;
            // Closes the file and releases its lock, even while handles remain.
            s.active = None;
            return result;
        }
        s.tick();
    }
}

/// Spins up to [`SPIN_FOR_NEXT`] for a record to be pushed, with
/// [`Shared::awake`] set so that callers alone on their worker spin for their
/// acknowledgement too. `awake` stays set for the batch caught.
fn spin_for_record(shared: &Shared) {
    shared.awake.store(true, Ordering::Release);
    let started = Instant::now();
    while !shared.pending.load(Ordering::Acquire) && started.elapsed() < SPIN_FOR_NEXT {
        std::hint::spin_loop();
    }
}

fn waits_for_sync(q: &Queue) -> bool {
    q.waiters.iter().any(|w| w.until == Until::Synced)
}

impl Syncer<'_> {
    fn policy(&self) -> FsyncPolicy {
        self.cfg.fsync
    }

    fn path(&self) -> &Path {
        &self.cfg.path
    }

    /// Writes one batch, answers its callers, syncs when someone waits for it.
    fn process(
        &mut self,
        bytes: &[u8],
        records: Vec<(u64, Event, bool)>,
        waiters: Vec<Waiter>,
        head: Mark,
    ) {
        if self.active.is_none() {
            // Pushed in the instant the log became unwritable.
            self.refuse(records, waiters, &AuditError::NotWritable);
            return;
        }
        if self.must_rotate(bytes.len() as u64)
            && let Err(e) = self.rotate()
        {
            self.fail(&e, "rotate", records, waiters);
            return;
        }
        if let Err(e) = self.write(bytes) {
            self.fail(&e, "write", records, waiters);
            return;
        }
        let len = self.active.as_ref().map_or(0, |a| a.len);
        self.written = Mark { len, ..head };
        self.dirty = true;
        if self.policy() == FsyncPolicy::Never {
            self.last_proven = Instant::now();
        }
        let (sync_waiters, write_waiters): (Vec<_>, Vec<_>) =
            waiters.into_iter().partition(|w| w.until == Until::Synced);
        for w in write_waiters {
            // The caller may have gone away; the record is kept anyway.
            let _ = w.ack.send(Ok(w.seq));
        }
        match self.policy() {
            FsyncPolicy::Always => self.unsynced.extend(records),
            FsyncPolicy::Interval | FsyncPolicy::Never => {
                for (_, event, _) in records {
                    self.shared.observer.record_written(event);
                }
            }
        }
        // Batches of outcomes alone say nothing about how attempts arrive.
        if !sync_waiters.is_empty() {
            self.last_batch = sync_waiters.len();
            self.sync(sync_waiters);
        }
    }

    /// Appends `bytes` to the active file; on failure the file is cut back.
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        let Some(active) = self.active.as_mut() else {
            return Err(io::Error::other("audit file not open"));
        };
        if bytes.is_empty() {
            return Ok(());
        }
        let before = active.len;
        let mut result = Ok(());
        if active.need_newline {
            result = (&active.file).write_all(b"\n");
        }
        if result.is_ok() {
            result = (&active.file).write_all(bytes);
        }
        match result {
            Ok(()) => {
                active.len += bytes.len() as u64 + u64::from(active.need_newline);
                active.need_newline = false;
                active.has_records = true;
                Ok(())
            }
            Err(e) => {
                if let Err(te) = active.file.set_len(before) {
                    warn!(file = %self.cfg.path.display(), cause = %te, "could not truncate a failed audit write; the next open skips the partial line");
                }
                Err(e)
            }
        }
    }

    /// One sync for everything written so far; then, before anyone is told
    /// their record is durable, that the file is still the one at the path.
    fn sync(&mut self, waiters: Vec<Waiter>) {
        let Some(active) = self.active.as_ref() else {
            self.refuse(Vec::new(), waiters, &AuditError::NotWritable);
            return;
        };
        let started = Instant::now();
        let result = if self.faults.take_sync_failure() {
            Err(io::Error::other("injected fsync failure"))
        } else {
            active.file.sync_data()
        };
        if let Err(e) = result {
            self.fail(&e, "fsync", Vec::new(), waiters);
            return;
        }
        self.shared.observer.fsync_done(started.elapsed());
        if let Err(e) = self.check_identity() {
            self.fail(&e, "identity check", Vec::new(), waiters);
            return;
        }
        let now = Instant::now();
        self.synced = self.written;
        self.dirty = false;
        self.last_sync = now;
        self.last_proven = now;
        for (_, event, _) in self.unsynced.drain(..) {
            self.shared.observer.record_written(event);
        }
        for w in waiters {
            let _ = w.ack.send(Ok(w.seq));
        }
    }

    /// Timers: re-open, interval sync, identity check, probe.
    fn timer_due(&self) -> bool {
        self.until_next_timer().is_zero()
    }

    fn until_next_timer(&self) -> Duration {
        let now = Instant::now();
        let at = match &self.active {
            None => self.retry_at,
            Some(_) => {
                let mut at = (self.last_check + CHECK_EVERY).min(self.last_proven + PROBE_EVERY);
                if self.dirty && self.policy() != FsyncPolicy::Never {
                    at = at.min(self.last_sync + SYNC_INTERVAL);
                }
                at
            }
        };
        at.saturating_duration_since(now)
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if self.active.is_none() {
            if now >= self.retry_at {
                self.open();
            }
            return;
        }
        if self.dirty
            && self.policy() != FsyncPolicy::Never
            && now >= self.last_sync + SYNC_INTERVAL
        {
            self.sync(Vec::new());
        }
        if self.active.is_some()
            && now >= self.last_check + CHECK_EVERY
            && let Err(e) = self.check_identity()
        {
            self.fail(&e, "identity check", Vec::new(), Vec::new());
        }
        if self.active.is_some() && now >= self.last_proven + PROBE_EVERY {
            match self.active.as_ref().map(|a| prove(&a.file)) {
                Some(Ok(())) => self.last_proven = Instant::now(),
                Some(Err(e)) => self.fail(&e, "probe", Vec::new(), Vec::new()),
                None => {}
            }
        }
    }

    /// Whether the file written is still the file at `audit.path`; if it was
    /// removed, renamed or replaced, continues the chain in a new file there
    /// (re-writing a deleted file's records into it) before returning.
    fn check_identity(&mut self) -> io::Result<()> {
        self.last_check = Instant::now();
        let Some(active) = self.active.as_ref() else {
            return Ok(());
        };
        let ours = active.file.metadata()?;
        let deleted = ours.nlink() == 0;
        let same = match std::fs::symlink_metadata(self.path()) {
            Ok(there) => there.dev() == ours.dev() && there.ino() == ours.ino(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(e),
        };
        if same && !deleted {
            return Ok(());
        }
        self.replace(deleted)
    }

    fn replace(&mut self, deleted: bool) -> io::Result<()> {
        let Some(old) = self.active.take() else {
            return Ok(());
        };
        let policy = self.policy();
        // What the old file holds is durable where it now is (renamed), or
        // at least readable through our descriptor (deleted).
        if policy != FsyncPolicy::Never {
            old.file.sync_data()?;
        }
        let (new, created) = open_active(self.path())?;
        let mut len = new.metadata()?.len();
        let mut need_newline = len > 0 && read_byte(&new, len - 1)? != b'\n';
        let mut copied = 0u64;
        if deleted {
            // Nowhere else holds these records: re-write them, byte for byte,
            // so the chain in the new file is whole.
            if need_newline {
                (&new).write_all(b"\n")?;
                len += 1;
                need_newline = false;
            }
            let mut chunk = vec![0u8; COPY_CHUNK];
            while copied < old.len {
                let n = old.file.read_at(&mut chunk, copied)?;
                if n == 0 {
                    break;
                }
                let n = n.min((old.len - copied) as usize);
                (&new).write_all(&chunk[..n])?;
                copied += n as u64;
            }
            len += copied;
        }
        if policy != FsyncPolicy::Never {
            new.sync_data()?;
            if created {
                sync_dir(self.path())?;
            }
        }
        let what = if deleted {
            "deleted"
        } else {
            "renamed or replaced"
        };
        error!(
            file = %self.path().display(),
            copied_bytes = copied,
            next_seq = self.written.next_seq,
            "the audit file was {what} underneath taskgate; the chain continues in a new file at the configured path"
        );
        self.shared.observer.file_replaced();
        let note = if deleted {
            format!(
                "the audit file was deleted while in use; its records ({copied} bytes) were re-written above from the open descriptor"
            )
        } else {
            "the audit file was renamed or replaced while in use; the records before this one are in the file it was renamed to".to_owned()
        };
        self.shared.lock().note = Some(note);
        self.active = Some(Active {
            file: new,
            len,
            need_newline,
            has_records: old.has_records && deleted,
        });
        self.written.len = len;
        if policy != FsyncPolicy::Never {
            // Both files were synced: everything written so far is durable.
            self.synced = self.written;
            self.dirty = false;
            for (_, event, _) in self.unsynced.drain(..) {
                self.shared.observer.record_written(event);
            }
        } else {
            self.synced.len = len;
        }
        self.reported_torn.clear();
        Ok(())
    }

    /// Whether a file holding records would grow past `max_bytes` with
    /// `pending` more bytes (a batch larger than `max_bytes` still gets a file
    /// of its own).
    fn must_rotate(&self, pending: u64) -> bool {
        match &self.active {
            Some(a) => {
                self.cfg.max_bytes > 0
                    && !self.rotation_blocked
                    && a.has_records
                    && a.len + pending > self.cfg.max_bytes
            }
            None => false,
        }
    }

    /// Renames the active file to its rotated name and opens a fresh one,
    /// then deletes rotated files beyond `audit.keep_files`. The old file is
    /// synced first, which answers nobody (callers are answered after the
    /// batch that follows is synced in the new file).
    fn rotate(&mut self) -> io::Result<()> {
        let last_seq = self.written.next_seq.saturating_sub(1);
        let target = rotated_path(self.path(), last_seq);
        if std::fs::symlink_metadata(&target).is_ok() {
            warn!(
                target = %target.display(),
                "rotated audit file already exists; rotation is off until restart"
            );
            self.rotation_blocked = true;
            return Ok(());
        }
        // The file must be ours before it is renamed as ours.
        self.check_identity()?;
        let Some(active) = self.active.as_ref() else {
            return Ok(());
        };
        if self.policy() != FsyncPolicy::Never && self.dirty {
            let started = Instant::now();
            active.file.sync_data()?;
            self.shared.observer.fsync_done(started.elapsed());
            self.synced = self.written;
            self.dirty = false;
            for (_, event, _) in self.unsynced.drain(..) {
                self.shared.observer.record_written(event);
            }
        }
        std::fs::rename(self.path(), &target)?;
        let (file, _) = open_active(self.path())?;
        if self.policy() != FsyncPolicy::Never {
            // Makes the rename and the new file's entry durable.
            sync_dir(self.path())?;
        }
        self.active = Some(Active {
            file,
            len: 0,
            need_newline: false,
            has_records: false,
        });
        self.written.len = 0;
        self.synced.len = 0;
        self.reported_torn.clear();
        info!(rotated = %target.display(), last_seq, "audit log rotated");
        enforce_retention(self.path(), self.cfg.keep_files);
        Ok(())
    }

    /// Opens (or re-opens) the log, proves it with a real write and sync,
    /// and adopts the chain head found on disk.
    fn open(&mut self) {
        let found = match resume(self.path(), self.policy()) {
            Ok(found) => found,
            Err(e) => {
                self.set_unwritable(&e, "open");
                return;
            }
        };
        if let Err(e) = prove(&found.file) {
            self.set_unwritable(&e, "write and sync");
            return;
        }
        self.adopt(found);
    }

    fn adopt(&mut self, found: recover::Resumed) {
        for &offset in &found.torn {
            if !self.reported_torn.contains(&offset) {
                warn!(
                    file = %self.path().display(),
                    offset,
                    "torn line in the audit log (crash mid-write?): skipped, the chain continues from the last complete record"
                );
                self.shared.observer.torn_line();
                self.reported_torn.push(offset);
            }
        }
        let (mut next_seq, mut prev) = (self.written.next_seq, self.written.prev);
        let mut note = None;
        match &found.last {
            Some(last) => {
                if !last.hash_ok {
                    error!(
                        file = %last.file.display(),
                        seq = last.seq,
                        "the last audit record does not match its hash; the chain continues from it, run `taskgate audit verify`"
                    );
                }
                let disk_next = last.seq.saturating_add(1);
                if self.chain_known && (disk_next != next_seq || last.hash != prev) {
                    warn!(
                        file = %last.file.display(),
                        disk_seq = last.seq,
                        writer_seq = next_seq - 1,
                        "the audit log on disk differs from the writer's last record; continuing from disk"
                    );
                }
                if last.file != self.path() {
                    info!(
                        file = %last.file.display(),
                        seq = last.seq,
                        "the audit chain continues from the newest record beside the active file"
                    );
                }
                (next_seq, prev) = (disk_next, last.hash);
            }
            None if self.chain_known && next_seq > 1 => {
                warn!(
                    file = %self.path().display(),
                    next_seq,
                    "no audit records found on disk any more; the chain continues in a new file"
                );
                note = Some(format!(
                    "no earlier audit record found on disk any more; the chain continues from seq {next_seq} of this process"
                ));
            }
            None => {
                next_seq = 1;
                prev = super::record::GENESIS;
                let dir = recover::parent_dir(self.path()).display().to_string();
                warn!(
                    file = %self.path().display(),
                    "starting a new audit chain at seq 1: no earlier audit record found in {dir}"
                );
                note = Some(format!(
                    "new chain: no earlier audit record found beside {}",
                    self.path().display()
                ));
            }
        }
        let mark = Mark {
            len: found.len,
            next_seq,
            prev,
        };
        self.written = mark;
        self.synced = mark;
        self.unsynced.clear();
        self.dirty = false;
        self.chain_known = true;
        self.active = Some(Active {
            file: found.file,
            len: found.len,
            need_newline: found.need_newline,
            has_records: found.has_records,
        });
        let now = Instant::now();
        self.last_sync = now;
        self.last_check = now;
        self.last_proven = now;
        {
            let mut q = self.shared.lock();
            // Nothing can have been queued while unwritable but by a race.
            let (records, waiters) = q.take_batch(&mut Vec::new());
            q.next_seq = next_seq;
            q.prev = prev;
            if note.is_some() {
                q.note = note;
            }
            self.shared.writable.store(true, Ordering::Release);
            drop(q);
            self.refuse(records, waiters, &AuditError::NotWritable);
        }
        if self.last_error.take().is_some() {
            info!(file = %self.path().display(), next_seq, "audit log writable again");
        }
    }

    /// A write, sync or check failed. After a failed sync (with `always`)
    /// the file and the chain go back to the last durable point and what was
    /// written since is dropped: nobody can say it reached the disk. After
    /// anything else the records written before stay (an outcome answered
    /// to its caller is not taken back because the next write hit a full
    /// disk); only the failed batch goes. Everything queued meanwhile chained
    /// from the lost records, so it goes too. Then the log is unwritable until
    /// a re-open proves it.
    fn fail(
        &mut self,
        err: &io::Error,
        op: &'static str,
        records: Vec<(u64, Event, bool)>,
        waiters: Vec<Waiter>,
    ) {
        let sync_failed = op == "fsync" && self.policy() == FsyncPolicy::Always;
        let back = if sync_failed {
            self.synced
        } else {
            self.written
        };
        if let Some(active) = &self.active
            && active.len > back.len
            && let Err(te) = active.file.set_len(back.len)
        {
            warn!(file = %self.path().display(), cause = %te, "could not truncate unsynced audit records; the next open resumes after them");
        }
        self.written = back;
        self.synced = back;
        self.set_unwritable(err, op);
        let e = write_error(err);
        let mut taken_back = std::mem::take(&mut self.unsynced);
        if !sync_failed {
            // Still in the file (written to the OS); the re-open resumes after them.
            for (_, event, _) in taken_back.drain(..) {
                self.shared.observer.record_written(event);
            }
        }
        let (queued, queued_waiters) = {
            let mut q = self.shared.lock();
            let taken = q.take_batch(&mut Vec::new());
            q.next_seq = back.next_seq;
            q.prev = back.prev;
            taken
        };
        self.refuse(taken_back, Vec::new(), &e);
        self.refuse(records, waiters, &e);
        self.refuse(queued, queued_waiters, &e);
    }

    /// Answers `waiters` with `err` and counts the records nobody is told
    /// about (outcomes, refusals) as dropped.
    fn refuse(&self, records: Vec<(u64, Event, bool)>, waiters: Vec<Waiter>, err: &AuditError) {
        for w in waiters {
            let _ = w.ack.send(Err(err.clone()));
        }
        for (_, event, waited) in records {
            // A refused attempt's caller answers 503; the rest were lost.
            if !(waited && event == Event::Attempt) {
                self.shared.observer.record_dropped(event);
            }
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
                file = %self.path().display(),
                op,
                cause = %err,
                "audit log not writable: attempts are refused until a write and sync succeed again"
            );
            self.last_error = Some(text);
        }
    }

    /// Graceful stop: what was written is synced, whatever the policy.
    fn finish(&mut self) -> Result<(), AuditError> {
        let Some(active) = self.active.as_ref() else {
            return Ok(());
        };
        if !self.dirty {
            return Ok(());
        }
        let started = Instant::now();
        match active.file.sync_data() {
            Ok(()) => {
                self.shared.observer.fsync_done(started.elapsed());
                self.dirty = false;
                for (_, event, _) in self.unsynced.drain(..) {
                    self.shared.observer.record_written(event);
                }
                Ok(())
            }
            Err(e) => {
                error!(file = %self.path().display(), cause = %e, "final audit fsync failed");
                Err(write_error(&e))
            }
        }
    }
}

/// A real write and sync on the audit file itself, taken back at once: what
/// readiness rests on (re-opening a file on a full disk proves nothing).
fn prove(file: &File) -> io::Result<()> {
    let len = file.metadata()?.len();
    // Spaces and a newline: should a crash leave it, it reads as one torn
    // line, which recovery and `verify` skip.
    let mut probe = [b' '; PROBE_LEN];
    probe[PROBE_LEN - 1] = b'\n';
    let written = (|| {
        let mut f = file;
        f.write_all(&probe)?;
        file.sync_data()
    })();
    let restored = file.set_len(len).and_then(|()| file.sync_data());
    written.and(restored)
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
