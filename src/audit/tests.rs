//! Tests of the module as the gateway uses it: the writer and its sync thread
//! on real files in temporary directories, the result read back and checked with `verify`.

use super::*;
use serde_json::{Value, json};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::SeqCst};
use std::sync::{Condvar, Mutex};

#[derive(Default)]
struct Counts {
    written: AtomicU64,
    fsyncs: AtomicU64,
    dropped: AtomicU64,
    torn: AtomicU64,
}

impl AuditObserver for Counts {
    fn record_written(&self, _: Event) {
        self.written.fetch_add(1, SeqCst);
    }
    fn fsync_done(&self, _: Duration) {
        self.fsyncs.fetch_add(1, SeqCst);
    }
    fn record_dropped(&self, _: Event) {
        self.dropped.fetch_add(1, SeqCst);
    }
    fn torn_line(&self) {
        self.torn.fetch_add(1, SeqCst);
    }
}

fn config(path: &Path, fsync: FsyncPolicy) -> AuditConfig {
    AuditConfig {
        fsync,
        max_bytes: 0,
        ..AuditConfig::new(path)
    }
}

fn start(cfg: AuditConfig) -> (AuditLog, AuditWriterTask, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let (log, task) = AuditLog::start(cfg, counts.clone());
    (log, task, counts)
}

/// The complete records of a file, parsed.
fn records(path: &Path) -> Vec<Value> {
    fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn seqs(recs: &[Value]) -> Vec<u64> {
    recs.iter().map(|r| r["seq"].as_u64().unwrap()).collect()
}

/// Waits for an event the writer signals only through state, with a timeout.
async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    for _ in 0..250 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn attempts(log: &AuditLog, n: u64) -> Vec<u64> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(
            log.append_durable(Record::attempt(format!("req-{i}")))
                .await
                .unwrap(),
        );
    }
    out
}

#[tokio::test]
async fn writes_every_event_gap_free_with_all_fields() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (log, task, counts) = start(config(&path, FsyncPolicy::Always));
    assert!(log.is_writable());

    let attempt = Record {
        client: Some("127.0.0.1:50000".into()),
        user_id: Some("5832d184-dd53-42a0-8ace-0bf8d660f4cc".into()),
        task_id: Some("0b3c9d2e-1111-4a2b-8c3d-123456789abc".into()),
        request: Some(json!({"maximumcall": 3, "name": "spring\ncampaign"})),
        residue: Some(5),
        note: Some("residue check disabled".into()),
        ..Record::attempt("req-1")
    };
    assert_eq!(log.append_durable(attempt).await.unwrap(), 1);
    log.append(Record {
        upstream_status: Some(200),
        upstream_code: Some(200),
        upstream_message: Some("success".into()),
        latency_ms: Some(12.5),
        ..Record::outcome("req-1")
    });
    log.append(Record::rejected("req-2", "rate_limited"));
    assert_eq!(
        log.append_durable(Record::attempt("req-3")).await.unwrap(),
        4
    );
    task.shutdown().await.unwrap();

    let recs = records(&path);
    assert_eq!(seqs(&recs), [1, 2, 3, 4]);
    let events: Vec<_> = recs.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["attempt", "outcome", "rejected", "attempt"]);
    let keys = super::record::FIELD_ORDER;
    for r in &recs {
        let obj = r.as_object().unwrap();
        assert_eq!(obj.len(), keys.len());
        for k in keys {
            assert!(obj.contains_key(k), "{k} missing in {r}");
        }
        let ts = r["ts"].as_str().unwrap();
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(
            ts.ends_with('Z') && &ts[19..20] == "." && &ts[10..11] == "T",
            "{ts}"
        );
    }
    assert_eq!(recs[0]["request"]["name"], "spring\ncampaign");
    assert_eq!(recs[0]["residue"], 5);
    // The first record of a new chain says so, after its own note.
    assert!(
        recs[0]["note"]
            .as_str()
            .unwrap()
            .starts_with("residue check disabled; new chain: no earlier audit record found"),
        "{}",
        recs[0]["note"]
    );
    assert_eq!(recs[1]["note"], Value::Null);
    assert_eq!(recs[0]["client"], "127.0.0.1:50000");
    assert_eq!(recs[0]["sub_user_id"], Value::Null);
    assert_eq!(recs[1]["upstream_status"], 200);
    assert_eq!(recs[1]["upstream_message"], "success");
    assert_eq!(recs[1]["latency_ms"], 12.5);
    assert_eq!(recs[2]["reason"], "rate_limited");
    assert_eq!(recs[0]["prev"], GENESIS_PREV);
    for pair in recs.windows(2) {
        assert_eq!(pair[1]["prev"], pair[0]["hash"]);
    }

    let report = verify(std::slice::from_ref(&path)).unwrap();
    assert_eq!((report.records, report.torn), (4, 0));
    assert_eq!(report.last_hash.as_deref(), recs[3]["hash"].as_str());
    assert_eq!(counts.written.load(SeqCst), 4);
    assert_eq!(counts.dropped.load(SeqCst), 0);

    // After shutdown nothing is accepted.
    assert!(!log.is_writable());
    assert!(matches!(
        log.append_durable(Record::attempt("late")).await,
        Err(AuditError::Closed)
    ));
}

/// Holds every fsync (after the sync itself, before its attempts are answered)
/// until the test opens it, so the test can queue records behind it.
#[derive(Default)]
struct Gate {
    counts: Counts,
    entered: AtomicU32,
    open: Mutex<bool>,
    opened: Condvar,
}

impl AuditObserver for Gate {
    fn record_written(&self, e: Event) {
        self.counts.record_written(e);
    }
    fn fsync_done(&self, d: Duration) {
        self.counts.fsync_done(d);
        self.entered.fetch_add(1, SeqCst);
        let mut open = self.open.lock().unwrap();
        while !*open {
            open = self.opened.wait(open).unwrap();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_commit_syncs_concurrent_attempts_together() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let gate = Arc::new(Gate::default());
    let (log, task) = AuditLog::start(config(&path, FsyncPolicy::Always), gate.clone());

    // The sync thread syncs the first attempt and is held in the gate.
    let first = tokio::spawn({
        let log = log.clone();
        async move { log.append_durable(Record::attempt("first")).await }
    });
    wait_until("the first fsync", || gate.entered.load(SeqCst) == 1).await;
    let callers: Vec<_> = (0..200)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move {
                log.append_durable(Record::attempt(format!("req-{i}")))
                    .await
            })
        })
        .collect();
    // All 200 are written and wait behind the held sync.
    wait_until("200 waiting attempts", || log.queue_len() == 200).await;
    *gate.open.lock().unwrap() = true;
    gate.opened.notify_all();

    assert_eq!(first.await.unwrap().unwrap(), 1);
    let mut seqs = Vec::new();
    for c in callers {
        seqs.push(c.await.unwrap().unwrap());
    }
    seqs.sort_unstable();
    assert_eq!(seqs, (2..=201).collect::<Vec<u64>>());
    // One fsync for the first record, one for the 200 written behind it.
    assert_eq!(gate.counts.fsyncs.load(SeqCst), 2);
    task.shutdown().await.unwrap();
    assert_eq!(verify(&[path]).unwrap().records, 201);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_attempts_need_fewer_fsyncs_than_records() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (log, task, counts) = start(config(&path, FsyncPolicy::Always));
    let callers: Vec<_> = (0..200)
        .map(|i| {
            let log = log.clone();
            tokio::spawn(async move {
                log.append_durable(Record::attempt(format!("req-{i}")))
                    .await
            })
        })
        .collect();
    for c in callers {
        c.await.unwrap().unwrap();
    }
    task.shutdown().await.unwrap();
    assert_eq!(counts.written.load(SeqCst), 200);
    // Typically 1-3: each fsync covers everything queued while it ran.
    assert!(counts.fsyncs.load(SeqCst) < 200);
    assert_eq!(verify(&[path]).unwrap().records, 200);
}

#[tokio::test]
async fn fsync_never_acks_after_the_write_and_syncs_at_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (log, task, counts) = start(config(&path, FsyncPolicy::Never));
    assert_eq!(attempts(&log, 10).await, (1..=10).collect::<Vec<_>>());
    assert_eq!(counts.fsyncs.load(SeqCst), 0);
    task.shutdown().await.unwrap();
    assert_eq!(counts.fsyncs.load(SeqCst), 1);
    assert_eq!(verify(&[path]).unwrap().records, 10);
}

#[tokio::test]
async fn fsync_interval_syncs_in_the_background() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (log, task, counts) = start(config(&path, FsyncPolicy::Interval));
    assert_eq!(attempts(&log, 5).await, [1, 2, 3, 4, 5]);
    wait_until("the interval fsync", || counts.fsyncs.load(SeqCst) >= 1).await;
    task.shutdown().await.unwrap();
    assert_eq!(verify(&[path]).unwrap().records, 5);
}

#[tokio::test]
async fn full_device_fails_attempts_and_acks_nothing() {
    let path = Path::new("/dev/full");
    if !path.exists() {
        return;
    }
    let (log, task, counts) = start(config(path, FsyncPolicy::Always));
    // Opening /dev/full succeeds; the real write and sync that proves the
    // log fails, so it starts not writable.
    assert!(!log.is_writable());
    let err = log.append_durable(Record::attempt("r1")).await.unwrap_err();
    assert!(matches!(err, AuditError::NotWritable), "{err:?}");
    assert!(log.append_durable(Record::attempt("r2")).await.is_err());
    log.append(Record::outcome("r1"));
    let _ = task.shutdown().await;
    assert_eq!(counts.written.load(SeqCst), 0);
    assert_eq!(counts.dropped.load(SeqCst), 1);
}

#[tokio::test]
async fn unwritable_at_start_then_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    // A directory that does not exist yet (permissions would not stop root).
    let path = dir.path().join("later").join("audit.jsonl");
    let (log, task, counts) = start(config(&path, FsyncPolicy::Always));
    assert!(!log.is_writable());
    assert!(matches!(
        log.append_durable(Record::attempt("r1")).await,
        Err(AuditError::NotWritable)
    ));
    log.append(Record::rejected("r2", "validation_failed"));
    assert_eq!(counts.dropped.load(SeqCst), 1);

    fs::create_dir(path.parent().unwrap()).unwrap();
    wait_until("the log to become writable", || log.is_writable()).await;
    assert_eq!(log.append_durable(Record::attempt("r3")).await.unwrap(), 1);
    task.shutdown().await.unwrap();
    assert_eq!(verify(&[path]).unwrap().records, 1);
}

#[tokio::test]
async fn failed_fsync_leaves_no_partial_record_and_no_gap() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let counts = Arc::new(Counts::default());
    let (log, task, fail_syncs) =
        AuditLog::start_with_failing_syncs(config(&path, FsyncPolicy::Always), counts.clone());
    assert_eq!(attempts(&log, 3).await, [1, 2, 3]);
    let good = fs::read(&path).unwrap();

    fail_syncs.store(1, SeqCst);
    let err = log
        .append_durable(Record::attempt("lost"))
        .await
        .unwrap_err();
    assert!(matches!(err, AuditError::Write(_)), "{err:?}");
    assert!(!log.is_writable());
    assert_eq!(
        fs::read(&path).unwrap(),
        good,
        "the failed record was truncated away"
    );

    wait_until("the log to become writable", || log.is_writable()).await;
    assert_eq!(
        log.append_durable(Record::attempt("next")).await.unwrap(),
        4
    );
    task.shutdown().await.unwrap();
    let report = verify(std::slice::from_ref(&path)).unwrap();
    assert_eq!((report.records, report.torn), (4, 0));
    assert_eq!(records(&path)[3]["request_id"], "next");
}

/// With `always`, a failed sync takes back everything after the last synced
/// record: an outcome written since (never synced) is dropped and counted, so
/// the file holds only what was durable and the chain has no gap.
#[tokio::test]
async fn failed_fsync_takes_back_unsynced_outcomes_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let counts = Arc::new(Counts::default());
    let (log, task, fail_syncs) =
        AuditLog::start_with_failing_syncs(config(&path, FsyncPolicy::Always), counts.clone());
    assert_eq!(attempts(&log, 2).await, [1, 2]);
    let good = fs::read(&path).unwrap();
    log.append_written(Record::outcome("req-0")).await;
    assert_ne!(
        fs::read(&path).unwrap(),
        good,
        "the outcome is written before append_written returns"
    );

    fail_syncs.store(1, SeqCst);
    assert!(log.append_durable(Record::attempt("lost")).await.is_err());
    assert_eq!(fs::read(&path).unwrap(), good);
    assert_eq!(counts.dropped.load(SeqCst), 1);

    wait_until("the log to become writable", || log.is_writable()).await;
    assert_eq!(
        log.append_durable(Record::attempt("next")).await.unwrap(),
        3
    );
    task.shutdown().await.unwrap();
    assert_eq!(verify(&[path]).unwrap().records, 3);
}

#[tokio::test]
async fn restart_continues_seq_and_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (log, task, _) = start(config(&path, FsyncPolicy::Always));
    attempts(&log, 5).await;
    task.shutdown().await.unwrap();

    let (log, task, _) = start(config(&path, FsyncPolicy::Always));
    assert_eq!(attempts(&log, 3).await, [6, 7, 8]);
    task.shutdown().await.unwrap();
    let report = verify(std::slice::from_ref(&path)).unwrap();
    assert_eq!(
        (report.records, report.first_seq, report.last_seq),
        (8, Some(1), Some(8))
    );
    assert_eq!(seqs(&records(&path)), (1..=8).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_second_writer_on_the_same_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (log1, task1, _) = start(config(&path, FsyncPolicy::Always));
    let (log2, task2, _) = start(config(&path, FsyncPolicy::Always));
    assert!(log1.is_writable());
    assert!(!log2.is_writable());
    assert_eq!(attempts(&log1, 1).await, [1]);
    task1.shutdown().await.unwrap();
    task2.shutdown().await.unwrap();
}

#[tokio::test]
async fn torn_tail_is_reported_and_the_chain_continues_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (log, task, _) = start(config(&path, FsyncPolicy::Always));
    attempts(&log, 6).await;
    task.shutdown().await.unwrap();

    // A crash in the middle of writing record 7.
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(br#"{"seq":7,"ts":"2026-11-24T06:4"#).unwrap();
    drop(f);
    let report = verify(std::slice::from_ref(&path)).unwrap();
    assert_eq!((report.records, report.torn), (6, 1));

    let (log, task, counts) = start(config(&path, FsyncPolicy::Always));
    assert_eq!(counts.torn.load(SeqCst), 1);
    assert_eq!(attempts(&log, 3).await, [7, 8, 9]);
    task.shutdown().await.unwrap();

    let report = verify(std::slice::from_ref(&path)).unwrap();
    assert_eq!((report.records, report.torn), (9, 1));
    assert_eq!(report.torn_lines[0].line, 7);
    let text = fs::read_to_string(&path).unwrap();
    let lines: Vec<_> = text.lines().collect();
    assert_eq!(lines[6], r#"{"seq":7,"ts":"2026-11-24T06:4"#);
    assert!(lines[7].starts_with(r#"{"seq":7,"#));
    assert_eq!(seqs(&records(&path)), (1..=9).collect::<Vec<_>>());
}

#[tokio::test]
async fn rotation_splits_files_and_the_chain_spans_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let cfg = AuditConfig {
        max_bytes: 2048,
        ..config(&path, FsyncPolicy::Always)
    };
    let (log, task, _) = start(cfg.clone());
    for i in 0..40 {
        if i % 3 == 0 {
            log.append(Record::rejected(format!("req-{i}"), "rate_limited"));
        } else {
            log.append_durable(Record::attempt(format!("req-{i}")))
                .await
                .unwrap();
        }
    }
    task.shutdown().await.unwrap();

    let files = audit_files(&path).unwrap();
    assert!(files.len() >= 3, "{files:?}");
    assert_eq!(files.last().unwrap(), &path);
    for f in &files[..files.len() - 1] {
        assert!(fs::metadata(f).unwrap().len() <= 2048, "{f:?} too big");
        // Named after the last seq it holds.
        let last = *seqs(&records(f)).last().unwrap();
        assert_eq!(f, &rotated_path(&path, last));
    }
    let report = verify(&files).unwrap();
    assert_eq!(
        (report.records, report.first_seq, report.last_seq),
        (40, Some(1), Some(40))
    );
    // A tail alone verifies too.
    let tail = verify(&files[files.len() - 2..]).unwrap();
    assert!(tail.first_seq.unwrap() > 1);
    // The files out of order do not.
    let mut shuffled = files.clone();
    shuffled.swap(0, 1);
    assert!(verify(&shuffled).is_err());

    let (log, task, _) = start(cfg);
    assert_eq!(attempts(&log, 1).await, [41]);
    task.shutdown().await.unwrap();
    assert_eq!(verify(&audit_files(&path).unwrap()).unwrap().records, 41);
}

#[tokio::test]
async fn restart_with_missing_or_empty_active_file_resumes_from_rotated() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (log, task, _) = start(config(&path, FsyncPolicy::Always));
    attempts(&log, 5).await;
    task.shutdown().await.unwrap();
    let last_hash = records(&path)[4]["hash"].clone();

    // As if the process died right after renaming the full file.
    fs::rename(&path, rotated_path(&path, 5)).unwrap();
    let (log, task, _) = start(config(&path, FsyncPolicy::Always));
    assert_eq!(attempts(&log, 1).await, [6]);
    task.shutdown().await.unwrap();
    assert_eq!(records(&path)[0]["prev"], last_hash);

    // ... or after creating the new, still empty, active file.
    fs::rename(&path, rotated_path(&path, 6)).unwrap();
    fs::write(&path, b"").unwrap();
    let (log, task, _) = start(config(&path, FsyncPolicy::Always));
    assert_eq!(attempts(&log, 1).await, [7]);
    task.shutdown().await.unwrap();

    let files = audit_files(&path).unwrap();
    assert_eq!(files.len(), 3);
    assert_eq!(verify(&files).unwrap().records, 7);
}

#[tokio::test]
async fn shutdown_writes_everything_queued() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (log, task, counts) = start(config(&path, FsyncPolicy::Always));
    for i in 0..100 {
        log.append(Record::rejected(format!("req-{i}"), "validation_failed"));
    }
    task.shutdown().await.unwrap();
    assert_eq!(counts.dropped.load(SeqCst), 0);
    assert_eq!(verify(&[path]).unwrap().records, 100);
}

#[tokio::test]
async fn torn_tail_then_rotation_keeps_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.jsonl");
    let (log, task, _) = start(config(&path, FsyncPolicy::Always));
    attempts(&log, 4).await;
    task.shutdown().await.unwrap();
    let mut f = OpenOptions::new().append(true).open(&path).unwrap();
    f.write_all(br#"{"seq":5,"ts":"20"#).unwrap();
    drop(f);

    let cfg = AuditConfig {
        max_bytes: fs::metadata(&path).unwrap().len() + 10,
        ..config(&path, FsyncPolicy::Interval)
    };
    let (log, task, counts) = start(cfg);
    assert_eq!(counts.torn.load(SeqCst), 1);
    assert_eq!(attempts(&log, 6).await, [5, 6, 7, 8, 9, 10]);
    task.shutdown().await.unwrap();

    let files = audit_files(&path).unwrap();
    assert!(files.len() >= 2, "{files:?}");
    assert_eq!(
        files[0],
        rotated_path(&path, 4),
        "the torn file rotated after seq 4"
    );
    let report = verify(&files).unwrap();
    assert_eq!(
        (report.records, report.torn, report.last_seq),
        (10, 1, Some(10))
    );
}
