//! The audit log: a durable, tamper-evident JSON Lines record of every mutation
//! (DESIGN.md "Audit log"): requests encode and chain their records into a
//! batch in memory; one sync thread writes, syncs and checks the file; checked
//! by [`verify`].
//!
//! # Layout
//!
//! - `record.rs` — [`Record`] (what the pipeline knows), the line format and the
//!   hash chain's canonical bytes, shared by the writer and `verify`;
//!   [`bounded_request`] for refusals.
//! - `writer.rs` — [`AuditLog`], the cheap handle the request path calls (memory
//!   only), and [`AuditWriterTask`], the sync thread's owner.
//! - `sync.rs` — the sync thread: one `write` per batch, group commit, the
//!   identity check before every acknowledgement, replacement of a removed or
//!   renamed file, rotation, the readiness proof, failures.
//! - `recover.rs` — open and lock the active file, find the chain head among the
//!   files beside it, skip a torn tail.
//! - `rotation.rs` — rotated names (shared with `verify`) and `keep_files`.
//! - `verify.rs` — [`verify`] for `taskgate audit verify FILE...`.
//!
//! # Using it
//!
//! [`AuditLog::start`] at start-up (it never fails: an unwritable log starts
//! "not writable" and recovers by itself); `append_durable(Record::attempt(..))`
//! before forwarding, answering 503 `audit_unavailable` on `Err`;
//! `append_written(Record::outcome(..))` before answering (written to the OS,
//! not synced); `append(Record::rejected(..))`, which never waits and is rate
//! limited; [`AuditLog::is_writable`] for readyz; and
//! [`AuditWriterTask::shutdown`] after the listeners have drained.
//!
//! # Format and hash chain
//!
//! The audit log is JSON Lines: one record per line, members always present and
//! always in this order — `seq`, `ts`, `event`, `request_id`, `client`,
//! `caller`, `user_id`, `sub_user_id`, `task_id`, `reason`, `note`, `request`,
//! `residue`, `upstream_status`, `upstream_code`, `upstream_message`,
//! `latency_ms`, `prev`, `hash` — with `null` for what does not apply.
//! `caller` (the `[[access.callers]]` name the request authenticated as) was
//! added after the others, in the place after `client`; lines written before
//! it lack the member, and `verify` checks them as before, since the hash
//! covers the line's bytes as written, not a re-serialisation. `seq` starts at 1 and
//! increases by exactly 1 per record, across restarts and rotations. `ts` is
//! RFC 3339 UTC with milliseconds (`2026-11-24T06:49:26.123Z`); `event` is
//! `attempt`, `outcome` or `rejected`; `request` is the parsed request body;
//! `latency_ms` is fractional milliseconds. Strings are JSON-escaped, so a
//! record never contains a raw newline.
//!
//! Each line ends with `,"hash":"<64 lowercase hex>"}`. The hash is
//! `hex(SHA-256(prev || line_without_hash))`, where `prev` is the 64 ASCII hex
//! digits of the previous record's `hash` (64 zeros, `GENESIS_PREV`, for
//! seq 1), and `line_without_hash` is the exact bytes of the line with the
//! trailing `,"hash":"…"` member removed — the line up to the `prev` member's
//! closing quote, then `}`. Hashing the written bytes rather than a
//! re-serialisation makes the check independent of any JSON library: to verify
//! a line, check its ending, cut the last 75 bytes (`,"hash":"`, 64 digits,
//! `"}`), append `}`, prefix the previous hash and compare the SHA-256. Since
//! every record names its predecessor's hash, editing, deleting, inserting or
//! reordering any record breaks the chain at that point. (Without a copy of
//! the newest hash kept elsewhere, nothing can show that records were cut off
//! the end, or that the chain was rewritten from some point on.)
//!
//! # Rotation
//!
//! When a write would take the active file past `audit.max_bytes` (0: never
//! rotate), the file is renamed after the last `seq` it holds, zero-padded to
//! 20 digits and placed before the extension —
//! `taskgate-audit.jsonl` becomes `taskgate-audit.00000000000000004711.jsonl` —
//! and a new active file is started. The chain simply continues: the first
//! record of the new file has the last hash of the old one as `prev`. Rotated
//! names sort (as text and as numbers) in chronological order and before the
//! active file, so `taskgate audit verify taskgate-audit*.jsonl` checks the
//! whole log in order. With `audit.keep_files = N` the oldest rotated files
//! beyond N are deleted after each rotation (0 keeps all); verifying the tail
//! that remains works (see below).
//!
//! # Durability and failures
//!
//! Requests never touch the file: a request appends its encoded line to the
//! batch under a lock that guards memory only, and the sync thread writes each
//! batch with one `write`. `fsync = "always"` (default): an `attempt` is
//! acknowledged only after one `fdatasync` covering it (group commit, with a
//! short window when attempts arrive concurrently) and after the check that
//! the file written is still the one at `audit.path`. `"interval"`/`"never"`:
//! acknowledged once written to the OS, synced about a second later / at
//! shutdown. An `outcome` waits for its write (not a sync); a `rejected` record
//! waits for nothing.
//!
//! A failed write takes back only its own batch; a failed sync (with
//! `always`) takes the file back to the last synced record (unsynced outcomes
//! go too). `seq` and `prev` go back with it, waiting attempts get an error
//! (the gateway answers 503 and forwards nothing), records queued behind are
//! dropped and counted, and the log is "not writable" (readyz fails) until a
//! re-open is proven by a real write and sync, tried every second. A log that
//! cannot be opened at start-up does not stop start-up; it is treated the same
//! way. An advisory lock (`flock`) on the active file keeps a second process
//! from writing to the same log: it stays "not writable".
//!
//! If the file at `audit.path` was removed, renamed or replaced underneath, the
//! chain continues in a new file there; a deleted file's records are re-written
//! into it from the open descriptor first.
//!
//! On start the writer resumes `seq` and the chain from the record with the
//! highest `seq` in the active file and every file beside it whose name
//! starts with its stem; with none, it starts a new chain and says so. A torn
//! final line (a crash mid-write) is reported and left in place; the next
//! write starts on a new line, and the next record's `prev` links to the last
//! complete record before the torn line.
//!
//! # Verifying
//!
//! `verify` reads the files in the order given and checks, for every record,
//! its hash, that `prev` is the previous record's hash and that `seq` is the
//! previous `seq` plus one, naming the first record that fails (file, line,
//! seq, problem). The first record is the anchor: if its `seq` is 1 its `prev`
//! must be 64 zeros; otherwise its `prev` is taken as given, so a tail of the
//! log can be verified alone — the report's `first_seq` says where the checked
//! range starts. A line that is not a complete record is counted as torn and
//! skipped, and passes only if the next record links to the record before it;
//! an unreadable last line passes only if it has no trailing newline (a torn
//! write never has one).

mod record;
mod recover;
mod rotation;
mod sync;
mod verify;
mod writer;

#[cfg(test)]
mod tests;

use std::io;
use std::sync::Arc;
use std::time::Duration;

pub use crate::config::{AuditConfig, DEFAULT_MAX_BYTES, FsyncPolicy};
pub use record::{Event, GENESIS_PREV, Record, bounded_request, now_timestamp};
pub use rotation::{audit_files, rotated_path};
pub use sync::{RETRY_INTERVAL, SYNC_INTERVAL};
pub use verify::{Location, Problem, VerifyError, VerifyReport, verify};
pub use writer::{AuditLog, AuditWriterTask, Caller};

/// Why a record was not (durably) written. Every variant means "do not forward".
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    /// The log could not be opened or its last write failed; the writer retries.
    #[error("audit log is not writable")]
    NotWritable,
    /// Writing or syncing this record failed (it was not kept).
    #[error("audit write failed: {0}")]
    Write(Arc<io::Error>),
    #[error("audit record could not be serialised: {0}")]
    Encode(String),
    /// The writer has shut down.
    #[error("audit writer has stopped")]
    Closed,
    #[error("audit sync thread panicked")]
    WriterPanicked,
}

/// Metrics hooks, called from the request path (some under the log's lock) and
/// the sync thread: keep them cheap and non-blocking.
pub trait AuditObserver: Send + Sync + 'static {
    /// A record reached the file (synced, with `fsync = "always"`).
    fn record_written(&self, _event: Event) {}
    /// One fsync finished (group commit, interval, rotation or shutdown).
    fn fsync_done(&self, _elapsed: Duration) {}
    /// A record queued with `append` was not written (log not writable, queue
    /// full, write failed). Failed `append_durable` calls are not counted here:
    /// their callers get the error.
    fn record_dropped(&self, _event: Event) {}
    /// A torn line was found at the end of the log at start-up or re-open.
    fn torn_line(&self) {}
    /// The file at `audit.path` was not the file being written (removed,
    /// renamed or replaced); the chain continues in a new file.
    fn file_replaced(&self) {}
    /// A `rejected` record was not written (`audit.rejected_per_second`).
    fn rejected_skipped(&self) {}
}

/// Observes nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoopObserver;

impl AuditObserver for NoopObserver {}
