//! Shared state across replicas (DESIGN.md "Shared state across replicas
//! (Redis)"): two or three real gateways, one emulator, one private
//! redis-server per test. Rate limits and the residue rule hold for the
//! gateways together; Redis down is `local` or `reject` as configured, and
//! never holds a request longer than `shared.timeout_ms` plus its own work.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::Method;
use serde_json::Value;
use support::redis::Redis;
use support::*;

const LINE_TWO: &str = "37d73edf-4628-4cf1-8beb-758433fd0aab";
const HIGH_RATE: &str = "[rate_limit]\nper_second = 1000\nburst = 1000\n";
const DEGRADED_NOTE: &str = "shared state (Redis) unavailable";

fn line(value: &str, residue: i64) -> Line {
    Line {
        name: "line".into(),
        value: value.into(),
        residue,
        call_line: residue,
    }
}

/// A gateway on `vendor` with `[shared]` = `shared` and `extra` TOML. Waits
/// for `"shared":"<want>"` in its readyz, so a test starts from a known state.
async fn gateway_with(vendor: &MockVendor, shared: &str, extra: &str, want: &str) -> Gateway {
    let gw = Gateway::builder(&vendor.url())
        .toml(extra)
        .toml(shared)
        .start()
        .await;
    wait_shared(&gw, want).await;
    gw
}

async fn gateway(vendor: &MockVendor, redis: &Redis, extra: &str) -> Gateway {
    gateway_with(vendor, &redis.shared_toml(""), extra, "ok").await
}

/// Polls readyz (for at most 10 s) until its `shared` check reads `want`.
async fn wait_shared(gw: &Gateway, want: &str) -> Resp {
    wait_shared_within(gw, want, Duration::from_secs(10)).await
}

async fn wait_shared_within(gw: &Gateway, want: &str, bound: Duration) -> Resp {
    let needle = format!("\"shared\":\"{want}\"");
    let started = Instant::now();
    loop {
        let ready = gw.admin_get("/readyz").await;
        if ready.text().contains(&needle) {
            return ready;
        }
        assert!(
            started.elapsed() < bound,
            "readyz did not show {needle} within {bound:?}: {} {}\n{}",
            ready.status,
            ready.text(),
            shared_log(gw)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The gateway's log lines about the shared state.
fn shared_log(gw: &Gateway) -> String {
    gw.output()
        .lines()
        .filter(|l| l.contains("shared") || l.contains("edis"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The value of the metric line that starts with `name` followed by a space.
async fn metric(gw: &Gateway, name: &str) -> Option<f64> {
    let text = gw.admin_get("/metrics").await.text();
    let prefix = format!("{name} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// A fresh task of `user`.
fn task_of(user: &str) -> String {
    task_path(user, &random_uuid())
}

fn retry_after(resp: &Resp) -> String {
    resp.headers
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

fn attempt_of(gw: &Gateway, request_id: &str) -> Value {
    gw.audit_records(&gw.audit_path())
        .into_iter()
        .find(|r| r["event"] == "attempt" && r["request_id"] == request_id)
        .unwrap_or_else(|| panic!("no attempt record for {request_id}"))
}

/// A timed JSON PUT; a failed exchange is a value.
async fn timed_put(gw: &Gateway, path: &str, body: &str) -> (Result<Resp, String>, Duration) {
    let started = Instant::now();
    let resp = tokio::time::timeout(
        Duration::from_secs(30),
        try_send(
            Method::PUT,
            &gw.url(path),
            &[("content-type", "application/json")],
            body.to_owned(),
        ),
    )
    .await
    .unwrap_or_else(|_| Err("no answer within 30 s".into()));
    (resp, started.elapsed())
}

#[tokio::test]
async fn two_gateways_share_one_bucket_per_user() {
    let redis = Redis::start().await;
    let vendor = vendor().await;
    let limits = "[rate_limit]\nburst = 4\nper_second = 1\n";
    let a = gateway(&vendor, &redis, limits).await;
    let b = gateway(&vendor, &redis, limits).await;
    let user = random_uuid();
    let body = body_with(1, EXAMPLE_LINE);

    // Alternating A, B, A, ...: 4 between them, not 4 each.
    let started = Instant::now();
    let mut answers = Vec::new();
    for i in 0..6 {
        let gw = if i % 2 == 0 { &a } else { &b };
        answers.push(put(gw, task_of(&user), &body).await);
    }
    let elapsed = started.elapsed();
    let statuses: Vec<u16> = answers.iter().map(|r| r.status.as_u16()).collect();
    assert_eq!(
        statuses,
        [200, 200, 200, 200, 429, 429],
        "6 updates in {elapsed:?}: {:?}",
        answers.iter().map(Resp::text).collect::<Vec<_>>()
    );
    // One bucket drains across both: remaining 3, 2, 1, 0 (separate buckets
    // would say 3, 3, 2, 2).
    let remaining: Vec<&str> = answers[..4]
        .iter()
        .map(|r| r.headers["ratelimit-remaining"].to_str().unwrap())
        .collect();
    assert_eq!(remaining, ["3", "2", "1", "0"]);
    for r in &answers[..4] {
        assert_eq!(r.headers["ratelimit-limit"], "4");
    }
    for r in &answers[4..] {
        assert_eq!(r.reason(), "rate_limited");
        // per_second = 1: the next cell is at most 1 s away, so exactly 1.
        assert_eq!(retry_after(r), "1", "{:?}", r.headers);
    }
    assert_eq!(vendor.updates().len(), 4, "refusals never reach the vendor");

    // Another user has a bucket of its own, through either gateway.
    let other = random_uuid();
    for gw in [&a, &b] {
        let resp = put(gw, task_of(&other), &body).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
    // And the limited user is still limited through both.
    for gw in [&a, &b] {
        assert_eq!(put(gw, task_of(&user), &body).await.status, 429);
    }
}

#[tokio::test]
async fn the_global_cap_is_shared() {
    let redis = Redis::start().await;
    let vendor = vendor().await;
    // Per-user limits out of the way; no residue reads, so four updates
    // take well under the cap's 333 ms interval.
    let limits = "[rate_limit]\nburst = 10\nper_second = 10\nglobal_per_second = 3\n[residue]\nenabled = false\n";
    let a = gateway(&vendor, &redis, limits).await;
    let b = gateway(&vendor, &redis, limits).await;
    let body = body_with(1, EXAMPLE_LINE);
    let started = Instant::now();
    let mut statuses = Vec::new();
    let mut last = None;
    for gw in [&a, &b, &a, &b] {
        let resp = put(gw, task_of(&random_uuid()), &body).await;
        statuses.push(resp.status.as_u16());
        last = Some(resp);
    }
    let elapsed = started.elapsed();
    assert_eq!(
        statuses,
        [200, 200, 200, 429],
        "3 users through A and B, then a 4th, in {elapsed:?}"
    );
    let last = last.unwrap();
    assert_eq!(last.reason(), "rate_limited");
    assert_eq!(retry_after(&last), "1");
    assert_eq!(vendor.updates().len(), 3);
}

#[tokio::test]
async fn concurrent_updates_through_two_gateways_admit_one_against_a_residue() {
    let redis = Redis::start().await;
    let vendor = vendor_with(MockOptions {
        consume: true,
        token: Some(TOKEN.into()),
        ..Default::default()
    })
    .await;
    let a = gateway(&vendor, &redis, HIGH_RATE).await;
    let b = gateway(&vendor, &redis, HIGH_RATE).await;
    let body = body_with(4, EXAMPLE_LINE);
    for round in 0..20 {
        // A fresh account per round (nothing cached for it anywhere), its
        // line at residue 5: 4 + 4 does not fit.
        let user = random_uuid();
        vendor.set_lines(&user, vec![line(EXAMPLE_LINE, 5), line(LINE_TWO, 1)]);
        let (x, y) = tokio::join!(
            put(&a, task_of(&user), &body),
            put(&b, task_of(&user), &body)
        );
        let mut answers = [
            (x.status.as_u16(), x.reason()),
            (y.status.as_u16(), y.reason()),
        ];
        answers.sort();
        assert_eq!(
            answers,
            [(200, String::new()), (409, "residue_exceeded".to_owned())],
            "round {round}: A {} / B {}",
            x.text(),
            y.text()
        );
        assert_eq!(
            vendor.lines(&user).unwrap()[0].residue,
            1,
            "round {round}: the vendor applied exactly one"
        );
        assert_eq!(vendor.updates().len(), round + 1, "round {round}");
    }
}

#[tokio::test]
async fn one_gateways_line_list_serves_the_other() {
    let redis = Redis::start().await;
    let vendor = vendor_with(MockOptions {
        consume: true,
        token: Some(TOKEN.into()),
        ..Default::default()
    })
    .await;
    let a = gateway(&vendor, &redis, HIGH_RATE).await;
    let b = gateway(&vendor, &redis, HIGH_RATE).await;
    let user = random_uuid();
    vendor.set_lines(&user, vec![line(EXAMPLE_LINE, 5), line(LINE_TWO, 1)]);

    // A reads the list (one vendor read) and takes 3 of line X's 5.
    let resp = put(&a, task_of(&user), body_with(3, EXAMPLE_LINE)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(vendor.inits().len(), 1);

    // B updates line Y of the same user: A's read serves it.
    let resp = put(&b, task_of(&user), body_with(1, LINE_TWO)).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    assert_eq!(
        vendor.inits().len(),
        1,
        "B's update of another line is answered from the shared list"
    );

    // B updates line X: A's accepted update dropped X for every replica, so
    // B reads it again and sees the fresh residue 2.
    let resp = put(&b, task_of(&user), body_with(3, EXAMPLE_LINE)).await;
    assert_eq!(resp.status, 409, "{}", resp.text());
    assert_eq!(resp.reason(), "residue_exceeded");
    let msg = resp.json()["message"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(msg.contains("residue 2"), "{msg}");
    assert_eq!(vendor.inits().len(), 2, "line X was read again");
    assert_eq!(vendor.updates().len(), 2);
    assert_eq!(vendor.lines(&user).unwrap()[0].residue, 2);
}

#[tokio::test]
async fn a_gateway_killed_holding_a_line_delays_it_by_at_most_the_lease() {
    let redis = Redis::start().await;
    let vendor = vendor().await;
    // Lease = max(3 × 1 s + 1 s, cache TTL 2 s + 1 s) = 4 s.
    let lease = Duration::from_secs(4);
    let cfg = format!("{HIGH_RATE}[upstream]\ntimeout_ms = 1000\n[residue]\ncache_ttl_ms = 2000\n");
    let a = gateway(&vendor, &redis, &cfg).await;
    let b = gateway(&vendor, &redis, &cfg).await;
    let user = random_uuid();

    // A refusal on line Y caches the user's list, so A's update of line X
    // needs no read and only its PUT meets the slow vendor.
    let resp = put(&a, task_of(&user), body_with(2, LINE_TWO)).await;
    assert_eq!(resp.status, 409, "{}", resp.text());
    assert_eq!(vendor.inits().len(), 1);
    vendor.set_delay(Duration::from_secs(30));
    let url = a.url(&task_of(&user));
    let held = tokio::spawn(async move {
        try_send(
            Method::PUT,
            &url,
            &[("content-type", "application/json")],
            body_with(1, EXAMPLE_LINE),
        )
        .await
    });
    tokio::time::timeout(Duration::from_secs(10), vendor.wait_for_updates(1))
        .await
        .expect("A's update reaches the vendor");
    assert_eq!(
        vendor.inits().len(),
        1,
        "A's check was answered from the cache"
    );
    // A dies holding the line's lease.
    a.signal("KILL");
    let killed = Instant::now();
    vendor.set_delay(Duration::ZERO);
    let held = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("A's caller sees the connection go")
        .unwrap();
    assert!(held.is_err(), "A answered after SIGKILL: {held:?}");

    // B waits (each try bounded by upstream.timeout_ms, then 503 overloaded)
    // until the lease runs out, then goes through.
    let mut overloaded = 0;
    let first_ok = loop {
        let (resp, took) = timed_put(&b, &task_of(&user), &body_with(1, EXAMPLE_LINE)).await;
        let resp = resp.expect("B answers");
        if resp.status == 200 {
            break killed.elapsed();
        }
        assert_eq!(
            (resp.status.as_u16(), resp.reason()),
            (503, "overloaded".to_owned()),
            "{}",
            resp.text()
        );
        assert!(took < Duration::from_secs(3), "a wait took {took:?}");
        overloaded += 1;
        assert!(
            killed.elapsed() < Duration::from_secs(12),
            "B still waits {:?} after the kill",
            killed.elapsed()
        );
    };
    assert!(
        overloaded >= 2,
        "B waited for the lease ({overloaded} refusals)"
    );
    assert!(
        first_ok >= lease - Duration::from_millis(1000),
        "B went through {first_ok:?} after the kill: the lease did not hold"
    );
    assert!(
        first_ok <= lease + Duration::from_secs(2),
        "B went through {first_ok:?} after the kill: more than the lease ({lease:?})"
    );
    assert_eq!(vendor.updates().len(), 2);
}

#[tokio::test]
async fn redis_down_falls_back_to_local_limits_and_says_so_then_recovers() {
    let mut redis = Redis::start().await;
    let vendor = vendor().await;
    let limits = "[rate_limit]\nburst = 2\nper_second = 1\n";
    let a = gateway(&vendor, &redis, limits).await;
    let b = gateway(&vendor, &redis, limits).await;
    let body = body_with(1, EXAMPLE_LINE);
    redis.stop().await;

    // Each gateway applies its own bucket with the same numbers: 2 each.
    let user = random_uuid();
    let mut statuses = Vec::new();
    let mut first = None;
    for gw in [&a, &a, &a, &b, &b, &b] {
        let resp = put(gw, task_of(&user), &body).await;
        statuses.push(resp.status.as_u16());
        first.get_or_insert(resp.request_id());
    }
    assert_eq!(statuses, [200, 200, 429, 200, 200, 429]);
    assert_eq!(vendor.updates().len(), 4);
    let note = attempt_of(&a, &first.unwrap())["note"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(
        note.contains(DEGRADED_NOTE) && note.contains("on_unavailable = local"),
        "{note}"
    );
    for gw in [&a, &b] {
        assert_eq!(metric(gw, "taskgate_shared_up").await, Some(0.0));
        let ready = gw.admin_get("/readyz").await;
        assert_eq!(ready.status, 200, "{}", ready.text());
        assert!(
            ready.text().contains("\"shared\":\"degraded\""),
            "{}",
            ready.text()
        );
    }

    // Redis back: both return to the shared state by themselves.
    redis.restart().await;
    for gw in [&a, &b] {
        wait_shared(gw, "ok").await;
        assert_eq!(metric(gw, "taskgate_shared_up").await, Some(1.0));
    }
    let user = random_uuid();
    let mut statuses = Vec::new();
    let mut first = None;
    for gw in [&a, &b, &a, &b] {
        let resp = put(gw, task_of(&user), &body).await;
        statuses.push(resp.status.as_u16());
        first.get_or_insert(resp.request_id());
    }
    assert_eq!(statuses, [200, 200, 429, 429], "2 between both, not 2 each");
    let attempt = attempt_of(&a, &first.unwrap());
    assert!(attempt["note"].is_null(), "shared again: {attempt}");
}

#[tokio::test]
async fn redis_down_with_reject_answers_503_and_forwards_nothing() {
    let mut redis = Redis::start().await;
    let vendor = vendor().await;
    let shared = redis.shared_toml("on_unavailable = \"reject\"");
    let gw = gateway_with(&vendor, &shared, HIGH_RATE, "ok").await;
    redis.stop().await;

    for _ in 0..2 {
        let resp = put(&gw, task_of(&random_uuid()), body_with(1, EXAMPLE_LINE)).await;
        assert_eq!(resp.status, 503, "{}", resp.text());
        assert_eq!(resp.reason(), "shared_state_unavailable");
    }
    assert!(
        vendor.requests().is_empty(),
        "nothing reached the vendor, not even a line-list read"
    );
    let ready = gw.admin_get("/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    let v = ready.json();
    assert_eq!(v["failing"], "shared", "{v}");
    assert_eq!(v["checks"]["shared"], "unavailable", "{v}");
    let records = gw.audit_records(&gw.audit_path());
    assert!(
        !records.iter().any(|r| r["event"] == "attempt"),
        "no attempt: {records:?}"
    );
    assert!(
        records
            .iter()
            .any(|r| r["event"] == "rejected" && r["reason"] == "shared_state_unavailable"),
        "{records:?}"
    );

    // A gateway started while Redis is down is not ready and refuses too.
    let late = gateway_with(&vendor, &shared, HIGH_RATE, "unavailable").await;
    assert_eq!(late.admin_get("/readyz").await.status, 503);
    let resp = put(&late, task_of(&random_uuid()), body_with(1, EXAMPLE_LINE)).await;
    assert_eq!(resp.reason(), "shared_state_unavailable");
    assert!(vendor.requests().is_empty());

    // Redis back: ready again and forwarding.
    redis.restart().await;
    for g in [&gw, &late] {
        let ready = wait_shared(g, "ok").await;
        assert_eq!(ready.status, 200, "{}", ready.text());
        let resp = put(g, task_of(&random_uuid()), body_with(1, EXAMPLE_LINE)).await;
        assert_eq!(resp.status, 200, "{}", resp.text());
    }
}

/// `shared.timeout_ms` = 200: an update may spend that on Redis, plus its own
/// work (a debug build, a vendor read, an fsync).
const SHARED_TIMEOUT: &str = "timeout_ms = 200";
const BOUND: Duration = Duration::from_millis(200 * 3 + 1000);

/// Sends `n` updates of one user through `gw`; each must be admitted within
/// [`BOUND`]. Returns the request id of the first.
async fn updates_within_bound(gw: &Gateway, n: usize) -> String {
    let user = random_uuid();
    let mut first = None;
    for i in 0..n {
        let (resp, took) = timed_put(gw, &task_of(&user), &body_with(1, EXAMPLE_LINE)).await;
        let resp = resp.unwrap_or_else(|e| panic!("update {i}: {e}"));
        assert_eq!(resp.status, 200, "update {i}: {}", resp.text());
        assert!(took < BOUND, "update {i} took {took:?}, bound {BOUND:?}");
        first.get_or_insert(resp.request_id());
    }
    first.unwrap()
}

#[tokio::test]
async fn a_redis_that_accepts_and_never_answers_holds_no_request() {
    let vendor = vendor().await;
    // Accepts every connection and keeps it open, never writing a byte.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = silent.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let holder = {
        let accepted = accepted.clone();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((conn, _)) = silent.accept().await {
                accepted.fetch_add(1, Ordering::SeqCst);
                held.push(conn);
            }
        })
    };
    let shared =
        format!("[shared]\nredis_url = \"redis://127.0.0.1:{port}/0\"\n{SHARED_TIMEOUT}\n");
    let started = Instant::now();
    let gw = gateway_with(&vendor, &shared, HIGH_RATE, "degraded").await;
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "start-up took {:?}",
        started.elapsed()
    );
    assert!(
        accepted.load(Ordering::SeqCst) >= 1,
        "the gateway did connect to the silent server"
    );
    let first = updates_within_bound(&gw, 5).await;
    let note = attempt_of(&gw, &first)["note"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(note.contains(DEGRADED_NOTE), "{note}");
    assert_eq!(metric(&gw, "taskgate_shared_up").await, Some(0.0));
    let ready = gw.admin_get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    holder.abort();
}

#[tokio::test]
async fn a_frozen_redis_holds_no_request_and_is_used_again_once_thawed() {
    let redis = Redis::start().await;
    let vendor = vendor().await;
    let a = gateway_with(&vendor, &redis.shared_toml(SHARED_TIMEOUT), HIGH_RATE, "ok").await;
    // Warm: the connection and the scripts are in place.
    assert_eq!(
        put(&a, task_of(&random_uuid()), body_with(1, EXAMPLE_LINE))
            .await
            .status,
        200
    );
    redis.signal("STOP");
    let first = updates_within_bound(&a, 5).await;
    let note = attempt_of(&a, &first)["note"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(note.contains(DEGRADED_NOTE), "{note}");
    let ready = a.admin_get("/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert!(
        ready.text().contains("\"shared\":\"degraded\""),
        "{}",
        ready.text()
    );
    assert_eq!(metric(&a, "taskgate_shared_up").await, Some(0.0));
    // The call that met the frozen server failed (not "ok", not "skipped").
    let text = a.admin_get("/metrics").await.text();
    assert!(
        text.lines().any(
            |l| l.starts_with("taskgate_shared_requests_total{op=\"rate\"")
                && (l.contains("result=\"timeout\"") || l.contains("result=\"error\""))
        ),
        "a call failed:\n{text}"
    );

    // Thawed: the gateway replaces the silent connection and is shared again.
    redis.signal("CONT");
    wait_shared(&a, "ok").await;
    let first = updates_within_bound(&a, 2).await;
    assert!(attempt_of(&a, &first)["note"].is_null());
}

#[tokio::test]
async fn redis_never_holds_the_token_or_a_request_body() {
    let redis = Redis::start().await;
    let monitor = redis.monitor().await;
    let vendor = vendor().await;
    let limits = "[rate_limit]\nburst = 3\nper_second = 1\n";
    let a = gateway(&vendor, &redis, limits).await;
    let b = gateway(&vendor, &redis, limits).await;
    let user = random_uuid();
    let mut with_sub: Value = serde_json::from_str(&body_with(1, EXAMPLE_LINE)).unwrap();
    with_sub["sub_user_id"] = random_uuid().into();
    let with_sub = with_sub.to_string();
    let mut statuses = Vec::new();
    // Accepted, refused by the residue rule, a sub-user, then rate limited.
    for (gw, body) in [
        (&a, body_with(1, EXAMPLE_LINE)),
        (&b, body_with(2, LINE_TWO)),
        (&a, with_sub.clone()),
        (&b, body_with(1, EXAMPLE_LINE)),
    ] {
        statuses.push(put(gw, task_of(&user), body).await.status.as_u16());
    }
    assert_eq!(statuses, [200, 409, 200, 429]);

    let dump = redis.dump().await;
    let sent = monitor.finish(&redis).await;
    assert!(
        dump.iter().any(|(k, ..)| k.contains(":rl:"))
            && dump.iter().any(|(k, ..)| k.contains(":lines:")),
        "the buckets and line lists are there: {dump:?}"
    );
    for (key, _, _) in &dump {
        assert!(key.starts_with("taskgate:"), "key_prefix: {key}");
        if key.contains(&user) {
            assert!(key.contains(&format!("{{{user}}}")), "hash tag: {key}");
        }
    }
    let forbidden = [
        TOKEN,
        "Bearer",
        "API任务创建测试",
        "API-test",
        "destination_extension",
        "maximumcall",
        "request_id",
    ];
    for (key, kind, value) in &dump {
        for f in forbidden {
            assert!(
                !key.contains(f) && !value.contains(f),
                "Redis holds {f:?}: {key} ({kind}) = {value}"
            );
        }
    }
    // Nor was it ever sent there (MONITOR escapes non-ASCII bytes).
    assert!(
        sent.iter()
            .any(|l| l.contains("EVALSHA") || l.contains("\"SET\"")),
        "MONITOR saw the gateways' calls: {sent:?}"
    );
    for l in &sent {
        for f in forbidden.iter().filter(|f| f.is_ascii()) {
            assert!(!l.contains(f), "sent to Redis: {l}");
        }
    }
}

/// A TCP relay to `target` whose connections can be silenced: after
/// [`Relay::silence_existing`], every connection open at that moment stays
/// open but carries nothing either way (a half-open path: a dropped NAT
/// entry, a failed-over address), while new connections work.
struct Relay {
    port: u16,
    opened: Arc<AtomicUsize>,
    silent_below: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(target: u16) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let opened = Arc::new(AtomicUsize::new(0));
        let silent_below = Arc::new(AtomicUsize::new(0));
        let task = {
            let (opened, silent_below) = (opened.clone(), silent_below.clone());
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let n = opened.fetch_add(1, Ordering::SeqCst);
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        continue;
                    };
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    tokio::spawn(pump(cr, sw, n, silent_below.clone()));
                    tokio::spawn(pump(sr, cw, n, silent_below.clone()));
                }
            })
        };
        Relay {
            port,
            opened,
            silent_below,
            task,
        }
    }

    fn silence_existing(&self) {
        self.silent_below
            .store(self.opened.load(Ordering::SeqCst), Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` until EOF, dropping the bytes once connection `n`
/// is silenced (the sockets stay open).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    n: usize,
    silent_below: Arc<AtomicUsize>,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0; 16 * 1024];
    loop {
        let read = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(r) => r,
        };
        if n < silent_below.load(Ordering::SeqCst) {
            continue;
        }
        if to.write_all(&buf[..read]).await.is_err() {
            return;
        }
    }
}

#[tokio::test]
async fn a_connection_gone_silent_is_replaced_while_redis_answers_new_ones() {
    let redis = Redis::start().await;
    let relay = Relay::start(redis.port).await;
    let vendor = vendor().await;
    let shared = format!(
        "[shared]\nredis_url = \"redis://127.0.0.1:{}/0\"\n{SHARED_TIMEOUT}\n",
        relay.port
    );
    let gw = gateway_with(&vendor, &shared, HIGH_RATE, "ok").await;
    assert_eq!(
        put(&gw, task_of(&random_uuid()), body_with(1, EXAMPLE_LINE))
            .await
            .status,
        200
    );
    // The gateway's connection goes silent; Redis itself is fine.
    relay.silence_existing();
    let first = updates_within_bound(&gw, 3).await;
    let note = attempt_of(&gw, &first)["note"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    assert!(note.contains(DEGRADED_NOTE), "{note}");
    // The call that got no answer in time is a timeout, the connection it
    // was on is suspect: a timeout does not make redis-rs's manager
    // reconnect, so the gateway must replace the connection itself, and be
    // shared again within a health check or two (1 s apart).
    let text = gw.admin_get("/metrics").await.text();
    assert!(
        text.contains("taskgate_shared_requests_total{op=\"rate\",result=\"timeout\"} 1"),
        "the unanswered call counts as a timeout:\n{}",
        text.lines()
            .filter(|l| l.starts_with("taskgate_shared_requests_total"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    wait_shared_within(&gw, "ok", Duration::from_secs(4)).await;
    let first = updates_within_bound(&gw, 2).await;
    assert!(attempt_of(&gw, &first)["note"].is_null());
}

#[tokio::test]
async fn a_waiting_gateway_is_woken_by_the_release_not_the_lease_running_out() {
    let redis = Redis::start().await;
    let vendor = vendor().await;
    // Defaults: upstream timeout 10 s, so the lease is 31 s and B's own wait
    // is bounded by 10 s; only a wake-up on release lets B through in time.
    let a = gateway(&vendor, &redis, HIGH_RATE).await;
    let b = gateway(&vendor, &redis, HIGH_RATE).await;
    let user = random_uuid();
    let resp = put(&a, task_of(&user), body_with(2, LINE_TWO)).await;
    assert_eq!(resp.status, 409, "the list is cached: {}", resp.text());
    let hold = Duration::from_millis(1500);
    vendor.set_delay(hold);
    let url = a.url(&task_of(&user));
    let held = tokio::spawn(async move {
        try_send(
            Method::PUT,
            &url,
            &[("content-type", "application/json")],
            body_with(1, EXAMPLE_LINE),
        )
        .await
    });
    tokio::time::timeout(Duration::from_secs(10), vendor.wait_for_updates(1))
        .await
        .expect("A's update reaches the vendor");
    let arrived = Instant::now();
    vendor.set_delay(Duration::ZERO);
    let monitor = redis.monitor().await;

    let (resp, _) = timed_put(&b, &task_of(&user), &body_with(1, EXAMPLE_LINE)).await;
    let b_done = arrived.elapsed();
    let resp = resp.expect("B answers");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let a_resp = held.await.unwrap().expect("A answers");
    assert_eq!(a_resp.status, 200, "{}", a_resp.text());
    assert!(
        b_done >= hold - Duration::from_millis(100),
        "B went through {b_done:?} after A's update reached the vendor: it did not wait for A"
    );
    assert!(
        b_done < hold + Duration::from_secs(2),
        "B went through {b_done:?} after A's update reached the vendor (A held it {hold:?})"
    );
    // Woken, not polling: a handful of calls on the lease while B waited.
    let sent = monitor.finish(&redis).await;
    let on_lease: Vec<&String> = sent.iter().filter(|l| l.contains(":lease:")).collect();
    assert!(
        on_lease.len() <= 20,
        "{} calls on the lease in {b_done:?}:\n{}",
        on_lease.len(),
        on_lease
            .iter()
            .map(|l| l.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[tokio::test]
async fn a_refused_update_lets_the_line_go_at_once() {
    let redis = Redis::start().await;
    let vendor = vendor().await;
    // upstream timeout 2 s: a line still held would answer 503 overloaded
    // after 2 s (the lease, 7 s, outlives that).
    let cfg = format!("{HIGH_RATE}[upstream]\ntimeout_ms = 2000\n");
    let a = gateway(&vendor, &redis, &cfg).await;
    let b = gateway(&vendor, &redis, &cfg).await;
    let user = random_uuid();
    let quick = Duration::from_millis(1000);

    // Refused by the rule (line two has residue 1): nothing was sent, so the
    // next update of the line, through either gateway, need not wait.
    for gw in [&b, &a] {
        let resp = put(&a, task_of(&user), body_with(2, LINE_TWO)).await;
        assert_eq!(resp.status, 409, "{}", resp.text());
        let (resp, took) = timed_put(gw, &task_of(&user), &body_with(1, LINE_TWO)).await;
        let resp = resp.expect("answers");
        assert_eq!(
            resp.status,
            200,
            "after a 409, in {took:?}: {}",
            resp.text()
        );
        assert!(took < quick, "after a 409 the line was held {took:?}");
    }

    // The line list could not be read (vendor hiccup): 503, nothing sent;
    // once the vendor answers again the line is free. A user whose list is
    // not cached yet (the first user's other lines still are: an update
    // invalidates only its own line).
    let user = random_uuid();
    vendor.set_init_fault(Fault::Status(500));
    let resp = put(&a, task_of(&user), body_with(1, EXAMPLE_LINE)).await;
    assert_eq!(resp.reason(), "residue_unavailable", "{}", resp.text());
    vendor.set_init_fault(Fault::None);
    let (resp, took) = timed_put(&b, &task_of(&user), &body_with(1, EXAMPLE_LINE)).await;
    let resp = resp.expect("answers");
    assert_eq!(
        resp.status,
        200,
        "after a 503, in {took:?}: {}",
        resp.text()
    );
    assert!(
        took < quick,
        "after a failed read the line was held {took:?}"
    );
}
