//! The audit file's integrity under operators and disks (DESIGN.md "Audit
//! log", from "The file at `audit.path` is the record" on): the live file
//! deleted, renamed or replaced underneath a running gateway, a full disk,
//! a flood of refusals, retention, and a vendor answer cut off after its
//! status. Real binary, real emulator; every wait is on an event or bounded.

mod support;

use std::collections::HashSet;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use support::*;

/// Nothing serialises or refuses the updates of a test.
const FAST: &str = "[rate_limit]\nper_second = 10000\nburst = 10000\n[residue]\nenabled = false";
/// Upper bound on any single wait of these tests.
const BOUND: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------

fn verify(files: &[&Path]) -> (Option<i32>, String) {
    let mut args = vec!["audit", "verify"];
    let owned: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    args.extend(owned.iter().map(String::as_str));
    let (code, out, err) = run_cli(&args, &[]);
    (code, format!("{out}{err}"))
}

fn assert_verifies(files: &[&Path]) {
    let (code, out) = verify(files);
    assert_eq!(code, Some(0), "verify {files:?}: {out}");
}

/// Every line of `path` as a record; a line that is not one fails the test
/// (none of these tests crashes the gateway, so none may be torn).
fn records(path: &Path) -> Vec<Value> {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| {
            serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("{}: not a record ({e}): {l:.200}", path.display()))
        })
        .collect()
}

/// The files in `dir`, sorted by name.
fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
}

/// The records of every file in `dir`.
fn dir_records(dir: &Path) -> Vec<Value> {
    files_in(dir).iter().flat_map(|f| records(f)).collect()
}

fn seq(r: &Value) -> u64 {
    r["seq"].as_u64().unwrap_or_else(|| panic!("no seq: {r}"))
}

/// The union of `recs` holds seq 1..=N exactly once each; returns N.
fn assert_seq_one_to_n(recs: &[Value]) -> u64 {
    let mut seqs: Vec<u64> = recs.iter().map(seq).collect();
    seqs.sort_unstable();
    let n = seqs.len() as u64;
    assert_eq!(
        seqs,
        (1..=n).collect::<Vec<_>>(),
        "seq is 1..=N with no repeat and no gap across the files"
    );
    n
}

fn ids_of<'a>(recs: &'a [Value], event: &str) -> HashSet<&'a str> {
    recs.iter()
        .filter(|r| r["event"] == event)
        .map(|r| r["request_id"].as_str().expect("request_id"))
        .collect()
}

/// The `x-request-id` of every update the vendor received.
fn vendor_ids(vendor: &MockVendor) -> Vec<String> {
    vendor
        .updates()
        .iter()
        .map(|u| {
            u.headers
                .get("x-request-id")
                .expect("the gateway sends X-Request-Id")
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect()
}

/// Every update the vendor received has its `attempt` in `recs`.
fn assert_every_forward_attempted(vendor: &MockVendor, recs: &[Value]) {
    let attempted = ids_of(recs, "attempt");
    let seen = vendor_ids(vendor);
    assert!(!seen.is_empty(), "updates reached the vendor");
    for id in &seen {
        assert!(
            attempted.contains(id.as_str()),
            "the vendor received {id} but no attempt record of it is in the audit directory"
        );
    }
}

/// The sum of the samples of metric `name` (any labels).
async fn metric(gw: &Gateway, name: &str) -> f64 {
    let text = gw.admin_get("/metrics").await.text();
    let mut found = false;
    let mut sum = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        let value = rest.rsplit(' ').next().unwrap();
        sum += value
            .parse::<f64>()
            .unwrap_or_else(|e| panic!("{line}: {e}"));
        found = true;
    }
    assert!(found, "metric {name} is exposed:\n{text}");
    sum
}

const REPLACED: &str = "taskgate_audit_file_replaced_total";

/// A gateway writing its audit log at `path` (in a directory the test owns).
async fn gateway_at(upstream: &str, path: &Path, extra: &str) -> Gateway {
    Gateway::builder(upstream)
        .env("TASKGATE_AUDIT_PATH", path.to_str().unwrap())
        .toml(FAST)
        .toml(extra)
        .start()
        .await
}

/// One update for a fresh user and task.
async fn fresh_update(url: String) -> Resp {
    let target = format!("{url}{}", task_path(&random_uuid(), &random_uuid()));
    tokio::time::timeout(
        BOUND,
        try_send(
            Method::PUT,
            &target,
            &[("content-type", "application/json")],
            EXAMPLE_BODY,
        ),
    )
    .await
    .expect("the update is answered in time")
    .expect("the update is answered")
}

/// Updates sent by `workers` tasks, one after the other each, until `stop`.
struct Flow {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<Resp>>>,
}

impl Flow {
    fn start(gw: &Gateway, workers: usize) -> Flow {
        let stop = Arc::new(AtomicBool::new(false));
        let url = gw.url("");
        let tasks = (0..workers)
            .map(|_| {
                let stop = stop.clone();
                let url = url.clone();
                tokio::spawn(async move {
                    let mut got = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        got.push(fresh_update(url.clone()).await);
                    }
                    got
                })
            })
            .collect();
        Flow { stop, tasks }
    }

    /// Stops the flow; every update it sent must have succeeded.
    async fn finish(self) -> Vec<Resp> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(
                tokio::time::timeout(BOUND, t)
                    .await
                    .expect("the flow ends")
                    .unwrap(),
            );
        }
        for r in &all {
            assert_eq!(
                r.status,
                200,
                "every update of the flow succeeds: {}",
                r.text()
            );
        }
        all
    }
}

async fn wait_updates(vendor: &MockVendor, n: usize) {
    tokio::time::timeout(BOUND, vendor.wait_for_updates(n))
        .await
        .unwrap_or_else(|_| panic!("{n} updates reach the vendor in time"));
}

/// Every answered update has its attempt and its outcome in `recs`.
fn assert_answered_recorded(answered: &[Resp], recs: &[Value]) {
    let attempts = ids_of(recs, "attempt");
    let outcomes = ids_of(recs, "outcome");
    for r in answered {
        let id = r.request_id();
        assert!(attempts.contains(id.as_str()), "attempt of {id}");
        assert!(outcomes.contains(id.as_str()), "outcome of {id}");
    }
}

// ---------------------------------------------------------------------------
// 1–4: the file at audit.path removed, renamed or replaced
// ---------------------------------------------------------------------------

#[tokio::test]
async fn deleting_the_live_file_while_updates_flow_loses_no_attempt() {
    let vendor = vendor().await;
    let audit = tempfile::tempdir().unwrap();
    let path = audit.path().join("audit.jsonl");
    let mut gw = gateway_at(&vendor.url(), &path, "").await;

    let flow = Flow::start(&gw, 4);
    wait_updates(&vendor, 15).await;
    std::fs::remove_file(&path).unwrap();
    gw.wait_stderr("was deleted underneath taskgate").await;
    // Updates keep flowing after the new file took over.
    let at_replacement = vendor.updates().len();
    wait_updates(&vendor, at_replacement + 15).await;
    let answered = flow.finish().await;

    assert_eq!(metric(&gw, REPLACED).await, 1.0, "one replacement counted");
    gw.stop().await;

    assert_eq!(files_in(audit.path()), vec![path.clone()]);
    let recs = dir_records(audit.path());
    let n = assert_seq_one_to_n(&recs);
    assert_eq!(
        n as usize,
        2 * answered.len(),
        "an attempt and an outcome per update"
    );
    assert_every_forward_attempted(&vendor, &recs);
    assert_answered_recorded(&answered, &recs);
    assert!(
        recs.iter()
            .any(|r| r["note"].as_str().is_some_and(|n| n.contains("deleted"))),
        "a record notes the deletion"
    );
    assert_verifies(&[&path]);
}

#[tokio::test]
async fn deleting_the_file_with_fifty_updates_in_flight_keeps_their_attempts_and_outcomes() {
    let vendor = vendor().await;
    let audit = tempfile::tempdir().unwrap();
    let path = audit.path().join("audit.jsonl");
    let mut gw = gateway_at(&vendor.url(), &path, "").await;
    vendor.set_delay(Duration::from_millis(1500));

    let url = gw.url("");
    let calls: Vec<_> = (0..50)
        .map(|_| tokio::spawn(fresh_update(url.clone())))
        .collect();
    // Each of the 50 is at the vendor: its attempt was acknowledged durable.
    wait_updates(&vendor, 50).await;
    std::fs::remove_file(&path).unwrap();
    gw.wait_stderr("was deleted underneath taskgate").await;
    let mut answered = Vec::new();
    for c in calls {
        let r = c.await.unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        answered.push(r);
    }
    assert_eq!(vendor.updates().len(), 50);
    assert_eq!(metric(&gw, REPLACED).await, 1.0);
    gw.stop().await;

    assert_eq!(files_in(audit.path()), vec![path.clone()]);
    let recs = records(&path);
    assert_eq!(assert_seq_one_to_n(&recs), 100);
    assert_every_forward_attempted(&vendor, &recs);
    assert_answered_recorded(&answered, &recs);
    assert_verifies(&[&path]);
}

#[tokio::test]
async fn renaming_the_live_file_continues_the_chain_in_a_new_one_and_across_a_restart() {
    let vendor = vendor().await;
    let audit = tempfile::tempdir().unwrap();
    let path = audit.path().join("audit.jsonl");
    let one = audit.path().join("audit.jsonl.1");
    let two = audit.path().join("audit.jsonl.2");
    let mut gw = gateway_at(&vendor.url(), &path, "").await;

    let flow = Flow::start(&gw, 4);
    wait_updates(&vendor, 15).await;
    std::fs::rename(&path, &one).unwrap();
    gw.wait_stderr("was renamed or replaced underneath taskgate")
        .await;
    let at_replacement = vendor.updates().len();
    wait_updates(&vendor, at_replacement + 15).await;
    let answered = flow.finish().await;
    assert_eq!(metric(&gw, REPLACED).await, 1.0);
    gw.stop().await;

    let old = records(&one);
    let new = records(&path);
    assert!(!old.is_empty() && !new.is_empty());
    // The record's own note (e.g. "residue rule disabled") comes first,
    // then the writer's, joined by "; ".
    let note = old[0]["note"].as_str().unwrap_or_default();
    assert!(
        note.split("; ").any(|n| n.starts_with("new chain")),
        "a brand-new log says so in its first record: {}",
        old[0]
    );
    assert_eq!(seq(&old[0]), 1);
    let last = old.last().unwrap();
    assert_eq!(seq(&new[0]), seq(last) + 1, "seq continues in the new file");
    assert_eq!(new[0]["prev"], last["hash"], "the chain continues");
    let all: Vec<Value> = old.iter().chain(&new).cloned().collect();
    assert_seq_one_to_n(&all);
    assert_every_forward_attempted(&vendor, &all);
    assert_answered_recorded(&answered, &all);
    assert_verifies(&[&one, &path]);

    // Renamed while stopped: a new gateway continues from the newest record
    // beside the path.
    std::fs::rename(&path, &two).unwrap();
    let mut again = gateway_at(&vendor.url(), &path, "").await;
    let r = fresh_update(again.url("")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        metric(&again, REPLACED).await,
        0.0,
        "a restart is no replacement"
    );
    again.stop().await;
    let before = records(&two);
    let last = before.last().unwrap();
    let after = records(&path);
    assert_eq!(after.len(), 2, "attempt and outcome of the one update");
    assert_eq!(seq(&after[0]), seq(last) + 1, "seq resumes from .2");
    assert_eq!(after[0]["prev"], last["hash"], "the chain resumes from .2");
    assert!(
        !after[0]["note"]
            .as_str()
            .unwrap_or_default()
            .starts_with("new chain"),
        "no new chain: {}",
        after[0]
    );
    assert_eq!(after[0]["request_id"], r.request_id().as_str());
    assert_verifies(&[&one, &two, &path]);
}

#[tokio::test]
async fn replacing_the_live_file_with_an_empty_one_continues_the_chain_there() {
    let vendor = vendor().await;
    let audit = tempfile::tempdir().unwrap();
    let path = audit.path().join("audit.jsonl");
    let old_path = audit.path().join("audit.jsonl.1");
    let mut gw = gateway_at(&vendor.url(), &path, "").await;

    let flow = Flow::start(&gw, 4);
    wait_updates(&vendor, 15).await;
    // logrotate's `create` mode: rename, then create the new file at once.
    std::fs::rename(&path, &old_path).unwrap();
    let created = match std::fs::File::create_new(&path) {
        // The gateway may (rarely) have noticed the gap and created it first.
        Ok(f) => Some(f.metadata().unwrap().ino()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => None,
        Err(e) => panic!("create {}: {e}", path.display()),
    };
    gw.wait_stderr("was renamed or replaced underneath taskgate")
        .await;
    let at_replacement = vendor.updates().len();
    wait_updates(&vendor, at_replacement + 15).await;
    let answered = flow.finish().await;
    assert_eq!(metric(&gw, REPLACED).await, 1.0);
    gw.stop().await;

    if let Some(ino) = created {
        assert_eq!(
            std::fs::metadata(&path).unwrap().ino(),
            ino,
            "the gateway writes into the operator's new file"
        );
    }
    let old = records(&old_path);
    let new = records(&path);
    assert!(
        new.iter().filter(|r| r["event"] == "attempt").count() >= 10,
        "updates continue in the new file"
    );
    let last = old.last().unwrap();
    assert_eq!(seq(&new[0]), seq(last) + 1);
    assert_eq!(new[0]["prev"], last["hash"]);
    let all: Vec<Value> = old.iter().chain(&new).cloned().collect();
    assert_seq_one_to_n(&all);
    assert_every_forward_attempted(&vendor, &all);
    assert_answered_recorded(&answered, &all);
    assert_verifies(&[&old_path, &path]);
}

// ---------------------------------------------------------------------------
// 5: a full disk
// ---------------------------------------------------------------------------

/// A tmpfs mounted for the test, unmounted on drop (also on panic).
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Tmpfs {
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .expect("mount runs");
        assert!(status.success(), "mount a tmpfs at {} (root)", at.display());
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

/// Appends to `filler` until the filesystem is full; returns the bytes written.
fn fill(filler: &mut std::fs::File) -> u64 {
    let mut total = 0u64;
    for chunk in [64 * 1024, 4096, 1] {
        let buf = vec![b'f'; chunk];
        loop {
            match filler.write(&buf) {
                Ok(0) => break,
                Ok(n) => total += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::StorageFull => break,
                Err(e) => panic!("filling: {e}"),
            }
        }
    }
    total
}

async fn readyz(gw: &Gateway) -> (u16, Value) {
    let r = gw.admin_get("/readyz").await;
    (r.status.as_u16(), r.json())
}

#[tokio::test]
async fn a_full_disk_refuses_updates_and_readiness_until_space_returns() {
    let vendor = vendor().await;
    let base = tempfile::tempdir().unwrap();
    let mnt = base.path().join("audit");
    std::fs::create_dir(&mnt).unwrap();
    let _mount = Tmpfs::mount(&mnt, "1m");
    let path = mnt.join("audit.jsonl");
    let mut gw = gateway_at(&vendor.url(), &path, "").await;
    let url = gw.url("");

    let first = fresh_update(url.clone()).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(readyz(&gw).await.0, 200);

    let filler_path = mnt.join("filler");
    let mut filler = std::fs::File::create(&filler_path).unwrap();
    assert!(fill(&mut filler) > 512 * 1024, "the filler took the space");

    // A small record may still fit in the audit file's last page.
    let mut refused = None;
    let mut accepted = vec![first];
    for _ in 0..100 {
        let r = fresh_update(url.clone()).await;
        match r.status.as_u16() {
            200 => accepted.push(r),
            503 => {
                refused = Some(r);
                break;
            }
            s => panic!("an update on a full disk got {s}: {}", r.text()),
        }
    }
    let refused = refused.expect("an update is refused once the disk is full");
    assert_eq!(refused.reason(), "audit_unavailable", "{}", refused.text());
    // The failed write was taken back, which may have freed a page: take it.
    fill(&mut filler);

    // Stays unready while the disk is full (the writer re-tries every second).
    let until = Instant::now() + Duration::from_secs(3);
    let mut polls = 0;
    while Instant::now() < until {
        let (status, body) = readyz(&gw).await;
        assert_eq!(status, 503, "readyz while the disk is full: {body}");
        assert_eq!(body["failing"], "audit", "{body}");
        polls += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(polls >= 10, "polled over ~3 s ({polls} polls)");
    let still = fresh_update(url.clone()).await;
    assert_eq!(still.status, 503, "{}", still.text());
    assert_eq!(still.reason(), "audit_unavailable");
    let seen: HashSet<String> = vendor_ids(&vendor).into_iter().collect();
    for r in [&refused, &still] {
        assert!(
            !seen.contains(&r.request_id()),
            "a refused update was forwarded"
        );
    }
    assert_eq!(
        seen.len(),
        accepted.len(),
        "only accepted updates forwarded"
    );

    drop(filler);
    std::fs::remove_file(&filler_path).unwrap();
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, body) = readyz(&gw).await;
        if status == 200 {
            assert_eq!(body["status"], "ready", "{body}");
            break;
        }
        assert!(
            Instant::now() < until,
            "readyz recovers within 10 s of space returning: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = fresh_update(url.clone()).await;
    assert_eq!(after.status, 200, "{}", after.text());
    assert!(vendor_ids(&vendor).contains(&after.request_id()));
    gw.stop().await;

    let recs = records(&path);
    assert_seq_one_to_n(&recs);
    let attempts = ids_of(&recs, "attempt");
    let outcomes = ids_of(&recs, "outcome");
    for r in accepted.iter().chain([&after]) {
        assert!(attempts.contains(r.request_id().as_str()));
        // The full disk refused a later write; it must not take back an
        // outcome already written and answered.
        assert!(
            outcomes.contains(r.request_id().as_str()),
            "the outcome of answered update {} was lost",
            r.request_id()
        );
    }
    for r in [&refused, &still] {
        assert!(
            !attempts.contains(r.request_id().as_str()),
            "no attempt of a refused update remains"
        );
    }
    assert_verifies(&[&path]);
}

// ---------------------------------------------------------------------------
// 6: a flood of refusals
// ---------------------------------------------------------------------------

#[tokio::test]
async fn ten_thousand_invalid_bodies_cannot_fill_the_disk() {
    const COUNT: usize = 10_000;
    const CONCURRENCY: usize = 16;
    let vendor = vendor().await;
    let audit = tempfile::tempdir().unwrap();
    let path = audit.path().join("audit.jsonl");
    let mut gw = gateway_at(&vendor.url(), &path, "").await;

    // Valid JSON, invalid update (required fields missing), 16 KiB: eight
    // times the record's cap, and quick enough that the default 100 records a
    // second stay well under the size bound.
    let body = Bytes::from(format!("{{\"remark\": \"{}\"}}", "x".repeat(16 * 1024)));
    let client = client();
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (client, next, body, url) =
                (client.clone(), next.clone(), body.clone(), gw.url(""));
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                while next.fetch_add(1, Ordering::Relaxed) < COUNT {
                    let target = format!("{url}{}", task_path(&random_uuid(), &random_uuid()));
                    let req = Request::builder()
                        .method(Method::PUT)
                        .uri(target)
                        .header("content-type", "application/json")
                        .body(Full::new(body.clone()))
                        .unwrap();
                    let resp = client.request(req).await.expect("answered");
                    let status = resp.status().as_u16();
                    resp.into_body().collect().await.expect("body read");
                    statuses.push(status);
                }
                statuses
            })
        })
        .collect();
    let mut statuses = Vec::new();
    for w in workers {
        statuses.extend(
            tokio::time::timeout(Duration::from_secs(120), w)
                .await
                .expect("the flood ends")
                .unwrap(),
        );
    }
    let elapsed = started.elapsed();
    assert_eq!(statuses.len(), COUNT);
    let not_422 = statuses.iter().filter(|s| **s != 422).count();
    assert_eq!(not_422, 0, "every invalid body gets 422");
    assert!(vendor.updates().is_empty());
    let skipped = metric(&gw, "taskgate_audit_rejected_skipped_total").await;
    assert!(skipped > 0.0, "refusals beyond the rate were skipped");
    gw.stop().await;

    let total: u64 = files_in(audit.path())
        .iter()
        .map(|f| std::fs::metadata(f).unwrap().len())
        .sum();
    let recs = dir_records(audit.path());
    eprintln!(
        "{COUNT} refusals in {elapsed:?}: {} records, {skipped} skipped, {total} bytes",
        recs.len()
    );
    assert!(
        total < 3 * 1024 * 1024,
        "the audit directory holds {total} bytes"
    );
    assert_seq_one_to_n(&recs);
    // At most the default 100 a second (burst 100), and none lost otherwise.
    let allowed = 100.0 + 100.0 * elapsed.as_secs_f64() + 2.0;
    assert!(
        (recs.len() as f64) <= allowed,
        "{} rejected records in {elapsed:?}",
        recs.len()
    );
    assert_eq!(
        recs.len() + skipped as usize,
        COUNT,
        "each refusal is written or counted as skipped"
    );
    assert!(
        recs.iter().any(|r| r["note"]
            .as_str()
            .is_some_and(|n| n.contains("not written before this one"))),
        "a written refusal tells how many were skipped"
    );
    for r in &recs {
        assert_eq!(r["event"], "rejected");
        assert_eq!(r["reason"], "validation_failed", "{r}");
        let req = &r["request"];
        assert_eq!(req["truncated"], true, "{req}");
        assert_eq!(req["bytes"], body.len());
        let head = req["head"].as_str().expect("head is a string");
        assert!(head.len() <= 2048, "head of {} bytes", head.len());
        assert!(!head.is_empty());
        assert!(
            body.starts_with(head.as_bytes()),
            "head is the body's start"
        );
        assert_eq!(
            req.as_object().unwrap().len(),
            3,
            "truncated, bytes, head only"
        );
    }
    assert_verifies(&[&path]);
}

// ---------------------------------------------------------------------------
// 7: retention
// ---------------------------------------------------------------------------

#[tokio::test]
async fn keep_files_leaves_the_live_file_and_the_newest_rotated_ones() {
    let vendor = vendor().await;
    let audit = tempfile::tempdir().unwrap();
    let path = audit.path().join("audit.jsonl");
    let mut gw = gateway_at(
        &vendor.url(),
        &path,
        "[audit]\nmax_bytes = 4096\nkeep_files = 2",
    )
    .await;
    let url = gw.url("");
    for _ in 0..25 {
        let r = fresh_update(url.clone()).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    gw.stop().await;

    let out = gw.output();
    let rotations = out.matches("audit log rotated").count();
    let deletions = out.matches("deleted the oldest rotated audit file").count();
    assert!(rotations >= 5, "at least 5 rotations, saw {rotations}");
    assert_eq!(deletions, rotations - 2, "all but 2 rotated files deleted");

    let files = files_in(audit.path());
    assert_eq!(files.len(), 3, "the live file and 2 rotated: {files:?}");
    assert!(files.contains(&path), "the live file stays");
    let mut rotated: Vec<(u64, PathBuf)> = files
        .iter()
        .filter(|f| **f != path)
        .map(|f| {
            let recs = records(f);
            let last = seq(recs.last().expect("a rotated file holds records"));
            assert_eq!(
                *f,
                taskgate::audit::rotated_path(&path, last),
                "named after its last seq"
            );
            (seq(&recs[0]), f.clone())
        })
        .collect();
    rotated.sort();
    let ordered = [&rotated[0].1, &rotated[1].1, &path];
    assert!(rotated[0].0 > 1, "the oldest files are gone");
    let all: Vec<Value> = ordered.iter().flat_map(|f| records(f)).collect();
    let seqs: Vec<u64> = all.iter().map(seq).collect();
    let first = seqs[0];
    assert_eq!(
        seqs,
        (first..first + seqs.len() as u64).collect::<Vec<_>>(),
        "the remaining files hold one contiguous stretch of the chain"
    );
    assert_eq!(*seqs.last().unwrap(), 50, "25 attempts and 25 outcomes");
    assert_verifies(&ordered.map(PathBuf::as_path));
}

// ---------------------------------------------------------------------------
// 8: a vendor answer cut off after its status
// ---------------------------------------------------------------------------

/// Reads one request (head and Content-Length body); `false` if the peer went.
async fn read_request(s: &mut TcpStream) -> bool {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 8192];
    let end = loop {
        if let Some(i) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match s.read(&mut buf).await {
            Ok(n) if n > 0 => bytes.extend_from_slice(&buf[..n]),
            _ => return false,
        }
    };
    let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
    let len = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.trim().parse::<usize>().ok())
        .unwrap_or(0);
    while bytes.len() < end + len {
        match s.read(&mut buf).await {
            Ok(n) if n > 0 => bytes.extend_from_slice(&buf[..n]),
            _ => return false,
        }
    }
    true
}

#[tokio::test]
async fn an_answer_cut_off_after_200_keeps_the_vendor_status_in_the_outcome() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = requests.clone();
    let fake = tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                if read_request(&mut s).await {
                    seen.fetch_add(1, Ordering::SeqCst);
                    let _ = s
                        .write_all(
                            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"code\":200",
                        )
                        .await;
                    let _ = s.shutdown().await;
                }
            });
        }
    });
    let mut gw = Gateway::builder(&format!("http://{addr}"))
        .toml("[residue]\nenabled = false")
        .start()
        .await;
    let r = put(&gw, example_path(), EXAMPLE_BODY).await;
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.reason(), "upstream_unreachable", "{}", r.text());
    assert_eq!(
        requests.load(Ordering::SeqCst),
        1,
        "a request the vendor may have applied is not re-sent"
    );
    gw.stop().await;
    fake.abort();

    let id = r.request_id();
    let recs = records(&gw.audit_path());
    let mine: Vec<&Value> = recs
        .iter()
        .filter(|r| r["request_id"] == id.as_str())
        .collect();
    let events: Vec<&str> = mine.iter().map(|r| r["event"].as_str().unwrap()).collect();
    assert_eq!(events, ["attempt", "outcome"]);
    let outcome = mine[1];
    assert_eq!(
        outcome["upstream_status"], 200,
        "the vendor's status stays: it may have applied the update ({outcome})"
    );
    let reason = outcome["reason"].as_str().unwrap_or_default();
    assert!(
        !reason.is_empty(),
        "the outcome says what failed: {outcome}"
    );
    assert_verifies(&[&gw.audit_path()]);
}
