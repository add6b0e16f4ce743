//! The audit log through the real gateway: attempt before forwarding,
//! outcome and rejected records, tamper evidence, fail-closed, crash safety.

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use support::*;

fn verify(files: &[&Path]) -> (Option<i32>, String) {
    let mut args = vec!["audit", "verify"];
    let owned: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
    args.extend(owned.iter().map(String::as_str));
    let (code, out, err) = run_cli(&args, &[]);
    (code, format!("{out}{err}"))
}

fn by_event<'a>(records: &'a [Value], event: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["event"] == event).collect()
}

#[tokio::test]
async fn forwarded_and_refused_updates_leave_their_records() {
    let vendor = vendor().await;
    // A burst of 3: the accepted update, the 409 and the unknown line use it up.
    let mut gw = Gateway::builder(&vendor.url())
        .toml("[limits]\nmax_body_bytes = 1024\n[rate_limit]\nper_second = 1\nburst = 3")
        .start()
        .await;
    let ok = put(&gw, example_path(), EXAMPLE_BODY).await;
    assert_eq!(ok.status, 200);
    let bad = put(&gw, example_path(), r#"{"maximumcall": 0}"#).await;
    assert_eq!(bad.status, 422);
    let over = put(&gw, example_path(), body_with(99, EXAMPLE_LINE)).await;
    assert_eq!(over.status, 409);
    let not_json = put(&gw, example_path(), "{").await;
    assert_eq!(not_json.status, 400);
    let text = send(
        http::Method::PUT,
        &gw.url(&example_path()),
        &[("content-type", "text/plain")],
        EXAMPLE_BODY,
    )
    .await;
    assert_eq!(text.status, 415);
    let big = put(
        &gw,
        example_path(),
        format!("{{\"name\":\"{}\"}}", "x".repeat(2000)),
    )
    .await;
    assert_eq!(big.status, 413);
    let no_line = put(&gw, example_path(), body_with(1, &random_uuid())).await;
    assert_eq!(no_line.status, 422);
    let limited = put(&gw, example_path(), EXAMPLE_BODY).await;
    assert_eq!(limited.status, 429);
    let unknown = put(&gw, "/elsewhere", EXAMPLE_BODY).await;
    assert_eq!(unknown.status, 404);
    gw.stop().await;

    let records = gw.audit_records(&gw.audit_path());
    let seqs: Vec<u64> = records.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
    assert_eq!(
        seqs,
        (1..=seqs.len() as u64).collect::<Vec<_>>(),
        "gap-free seq"
    );

    let rid = ok.request_id();
    let attempt = by_event(&records, "attempt");
    assert_eq!(attempt.len(), 1);
    assert_eq!(attempt[0]["request_id"], rid.as_str());
    assert_eq!(attempt[0]["user_id"], EXAMPLE_USER);
    assert_eq!(attempt[0]["task_id"], EXAMPLE_TASK);
    assert_eq!(
        attempt[0]["residue"], 5,
        "the residue it was checked against"
    );
    assert_eq!(attempt[0]["request"]["maximumcall"], 3, "the parsed body");
    let outcome = by_event(&records, "outcome");
    assert_eq!(outcome.len(), 1);
    assert_eq!(outcome[0]["request_id"], rid.as_str());
    assert_eq!(outcome[0]["upstream_status"], 200);
    assert_eq!(outcome[0]["upstream_code"], 200);
    assert_eq!(outcome[0]["upstream_message"], "修改成功");
    assert!(outcome[0]["latency_ms"].as_f64().is_some());
    let attempt_pos = records
        .iter()
        .position(|r| r["event"] == "attempt")
        .unwrap();
    let outcome_pos = records
        .iter()
        .position(|r| r["event"] == "outcome")
        .unwrap();
    assert!(attempt_pos < outcome_pos);

    let rejected = by_event(&records, "rejected");
    let reasons: HashSet<(&str, &str)> = rejected
        .iter()
        .map(|r| {
            (
                r["request_id"].as_str().unwrap(),
                r["reason"].as_str().unwrap(),
            )
        })
        .collect();
    let ids = [&bad, &over, &not_json, &text, &big, &no_line, &limited].map(|r| r.request_id());
    let want: HashSet<(&str, &str)> = [
        (ids[0].as_str(), "validation_failed"),
        (ids[1].as_str(), "residue_exceeded"),
        (ids[2].as_str(), "invalid_json"),
        (ids[3].as_str(), "unsupported_media_type"),
        (ids[4].as_str(), "payload_too_large"),
        (ids[5].as_str(), "unknown_caller_line"),
        (ids[6].as_str(), "rate_limited"),
    ]
    .into_iter()
    .collect();
    assert_eq!(
        reasons, want,
        "each rejection has its reason; 404s are not mutations"
    );
    let over_rec = rejected
        .iter()
        .find(|r| r["reason"] == "residue_exceeded")
        .unwrap();
    assert_eq!(over_rec["request"]["maximumcall"], 99);
    assert_eq!(over_rec["residue"], 5, "the residue it was refused against");
    assert!(
        !std::fs::read_to_string(gw.audit_path())
            .unwrap()
            .contains(TOKEN)
    );

    let (code, out) = verify(&[&gw.audit_path()]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains(&format!("{} records verified", records.len())),
        "{out}"
    );
}

/// Copies of a real log with one record edited, deleted, or two swapped.
#[tokio::test]
async fn verify_detects_edits_deletions_and_swaps() {
    let vendor = vendor().await;
    let mut gw = Gateway::builder(&vendor.url())
        .toml("[residue]\nenabled = false")
        .start()
        .await;
    for _ in 0..3 {
        assert_eq!(put(&gw, example_path(), EXAMPLE_BODY).await.status, 200);
    }
    gw.stop().await;
    let original = std::fs::read_to_string(gw.audit_path()).unwrap();
    let lines: Vec<&str> = original.lines().collect();
    assert_eq!(lines.len(), 6);
    let (code, out) = verify(&[&gw.audit_path()]);
    assert_eq!(code, Some(0), "{out}");

    let write = |name: &str, lines: &[String]| -> PathBuf {
        let p = gw.dir.path().join(name);
        std::fs::write(&p, lines.join("\n") + "\n").unwrap();
        p
    };
    let owned: Vec<String> = lines.iter().map(|l| l.to_string()).collect();

    let mut edited = owned.clone();
    edited[2] = edited[2].replacen("\"maximumcall\":3", "\"maximumcall\":4", 1);
    assert_ne!(edited[2], owned[2]);
    let (code, out) = verify(&[&write("edited.jsonl", &edited)]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("edited.jsonl:3"),
        "names the edited record: {out}"
    );

    let mut deleted = owned.clone();
    deleted.remove(3);
    let (code, out) = verify(&[&write("deleted.jsonl", &deleted)]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("deleted.jsonl:4"),
        "names the record after the gap: {out}"
    );

    let mut swapped = owned.clone();
    swapped.swap(1, 2);
    let (code, out) = verify(&[&write("swapped.jsonl", &swapped)]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("swapped.jsonl:2"), "{out}");
}

#[tokio::test]
async fn an_unwritable_audit_log_fails_closed() {
    let vendor = vendor().await;
    let gw = Gateway::builder(&vendor.url())
        .env("TASKGATE_AUDIT_PATH", "/dev/full")
        .start()
        .await;
    let resp = put(&gw, example_path(), EXAMPLE_BODY).await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.reason(), "audit_unavailable");
    assert!(
        vendor.updates().is_empty(),
        "nothing forwarded without a durable record"
    );
    let ready = gw.admin_get("/readyz").await;
    assert_eq!(ready.status, 503);
    assert!(ready.text().contains("audit"), "{}", ready.text());

    // A directory that appears later: the gateway recovers by itself.
    let dir = tempfile::tempdir().unwrap();
    let later = dir.path().join("not-yet");
    let gw = Gateway::builder(&vendor.url())
        .env(
            "TASKGATE_AUDIT_PATH",
            later.join("audit.jsonl").to_str().unwrap(),
        )
        .start()
        .await;
    assert_eq!(put(&gw, example_path(), EXAMPLE_BODY).await.status, 503);
    std::fs::create_dir(&later).unwrap();
    // The writer re-opens the log once a second and says so.
    gw.wait_stderr("audit log writable again").await;
    let ready = gw.admin_get("/readyz").await;
    assert_eq!(ready.status, 200, "readyz recovers with the log");
    assert_eq!(put(&gw, example_path(), EXAMPLE_BODY).await.status, 200);
}

#[tokio::test]
async fn kill_9_during_updates_loses_no_attempt_and_the_chain_resumes() {
    let vendor = vendor().await;
    let audit = tempfile::tempdir().unwrap();
    let path = audit.path().join("audit.jsonl");
    let path_s = path.to_str().unwrap().to_owned();
    let mut gw = Gateway::builder(&vendor.url())
        .env("TASKGATE_AUDIT_PATH", &path_s)
        .toml("[rate_limit]\nper_second = 10000\nburst = 10000")
        .start()
        .await;
    // Distinct users: nothing serialises the 50 updates.
    let url = |p: String| gw.url(&p);
    let calls: Vec<_> = (0..50)
        .map(|_| {
            let target = url(task_path(&random_uuid(), &random_uuid()));
            async move {
                let json = [("content-type", "application/json")];
                try_send(http::Method::PUT, &target, &json, EXAMPLE_BODY).await
            }
        })
        .collect();
    let killer = async {
        // Some updates have reached the vendor: the others are in flight.
        vendor.wait_for_updates(10).await;
        gw.signal("KILL");
    };
    let (_, _) = tokio::join!(
        tokio::time::timeout(Duration::from_secs(20), killer),
        futures::future::join_all(
            calls
                .into_iter()
                .map(|c| tokio::time::timeout(Duration::from_secs(20), c))
        )
    );
    assert_eq!(gw.wait_exit().await, None, "killed by the signal");

    let records = gw.audit_records(&path);
    let attempted: HashSet<&str> = by_event(&records, "attempt")
        .iter()
        .map(|r| r["request_id"].as_str().unwrap())
        .collect();
    let updates = vendor.updates();
    assert!(
        updates.len() >= 10,
        "the kill came after updates reached the vendor"
    );
    for u in &updates {
        let id = u.headers["x-request-id"].to_str().unwrap();
        assert!(
            attempted.contains(id),
            "the vendor saw {id} without a durable attempt record"
        );
    }
    let last_seq = records
        .iter()
        .filter_map(|r| r["seq"].as_u64())
        .max()
        .unwrap();

    // Restart on the same file: seq and the chain continue.
    let mut again = Gateway::builder(&vendor.url())
        .env("TASKGATE_AUDIT_PATH", &path_s)
        .start()
        .await;
    assert_eq!(put(&again, example_path(), EXAMPLE_BODY).await.status, 200);
    again.stop().await;
    let after = again.audit_records(&path);
    let new_seqs: Vec<u64> = after
        .iter()
        .filter_map(|r| r["seq"].as_u64())
        .filter(|s| *s > last_seq)
        .collect();
    assert_eq!(
        new_seqs,
        vec![last_seq + 1, last_seq + 2],
        "attempt and outcome continue the sequence"
    );
    let (code, out) = verify(&[&path]);
    assert_eq!(code, Some(0), "{out}");
}

#[tokio::test]
async fn a_caller_hanging_up_mid_update_still_gets_its_outcome_recorded() {
    use tokio::io::AsyncWriteExt;
    let vendor = vendor().await;
    let mut gw = Gateway::start(&vendor.url()).await;
    vendor.set_delay(Duration::from_millis(800));
    let mut raw = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    let head = format!(
        "PUT {} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\nx-request-id: hangs-up-1\r\n\r\n",
        example_path(),
        EXAMPLE_BODY.len()
    );
    raw.write_all(head.as_bytes()).await.unwrap();
    raw.write_all(EXAMPLE_BODY.as_bytes()).await.unwrap();
    // Once the update is at the vendor, the caller goes away.
    tokio::time::timeout(Duration::from_secs(10), vendor.wait_for_updates(1))
        .await
        .expect("the update reaches the vendor");
    drop(raw);
    gw.stop().await;

    let records = gw.audit_records(&gw.audit_path());
    let mine: Vec<&str> = records
        .iter()
        .filter(|r| r["request_id"] == "hangs-up-1")
        .map(|r| r["event"].as_str().unwrap())
        .collect();
    assert_eq!(mine, ["attempt", "outcome"]);
    let line = gw.access_line("hangs-up-1").await;
    assert_eq!(line["status"], 200);
}
