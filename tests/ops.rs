//! Running it like production: metrics, drain on SIGTERM, reload on SIGHUP,
//! token rotation, abuse limits.

mod support;

use std::time::{Duration, Instant};

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn metrics(gw: &Gateway) -> String {
    gw.admin_get("/metrics").await.text()
}

/// The value of one sample line, 0 when absent.
/// The value of one sample line; the line must exist.
fn sample(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("no sample {name} in\n{text}"))
}

#[tokio::test]
async fn metrics_move_as_requests_pass_and_fail() {
    let vendor = vendor().await;
    let gw = Gateway::start(&vendor.url()).await;
    let before = metrics(&gw).await;
    assert_eq!(sample(&before, "taskgate_inflight_requests"), 0.0);

    assert_eq!(put(&gw, example_path(), EXAMPLE_BODY).await.status, 200);
    assert_eq!(put(&gw, "/nope", EXAMPLE_BODY).await.status, 404);
    assert_eq!(
        put(&gw, example_path(), body_with(99, EXAMPLE_LINE))
            .await
            .status,
        409
    );

    let after = metrics(&gw).await;
    assert_eq!(
        sample(
            &after,
            "taskgate_requests_total{status=\"200\",reason=\"\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            "taskgate_requests_total{status=\"404\",reason=\"not_found\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(
            &after,
            "taskgate_requests_total{status=\"409\",reason=\"residue_exceeded\"}"
        ),
        1.0
    );
    assert_eq!(
        sample(&after, "taskgate_upstream_requests_total{status=\"200\"}"),
        1.0
    );
    assert_eq!(
        sample(&after, "taskgate_residue_lookups_total{result=\"miss\"}"),
        2.0
    );
    assert_eq!(
        sample(&after, "taskgate_request_duration_seconds_count"),
        3.0
    );
    assert!(!after.contains(TOKEN));
}

#[tokio::test]
async fn sigterm_lets_the_request_in_flight_finish_then_exits_0() {
    let vendor = vendor().await;
    let mut gw = Gateway::builder(&vendor.url())
        .toml("[residue]\nenabled = false")
        .start()
        .await;
    vendor.set_delay(Duration::from_millis(1500));
    let in_flight = gw.spawn_example_put();
    // The update has reached the vendor: it is in flight now.
    tokio::time::timeout(Duration::from_secs(10), vendor.wait_for_requests(1))
        .await
        .expect("the update reaches the vendor");
    gw.signal("TERM");
    let resp = in_flight.await.unwrap();
    assert_eq!(resp.status, 200, "the request in flight completes");
    assert_eq!(gw.wait_exit().await, Some(0));
}

#[tokio::test]
async fn sighup_applies_a_new_rate_limit_and_survives_a_broken_file() {
    let vendor = vendor().await;
    let gw = Gateway::builder(&vendor.url())
        .toml("[rate_limit]\nper_second = 1\nburst = 1")
        .start()
        .await;
    let user = random_uuid();
    let path = || task_path(&user, &random_uuid());
    assert_eq!(
        put(&gw, path(), body_with(1, EXAMPLE_LINE)).await.status,
        200
    );
    assert_eq!(
        put(&gw, path(), body_with(1, EXAMPLE_LINE)).await.status,
        429
    );

    let original = std::fs::read_to_string(&gw.config_path).unwrap();
    let raised = original.replace("burst = 1", "burst = 50");
    std::fs::write(&gw.config_path, raised).unwrap();
    gw.signal("HUP");
    gw.wait_stderr("configuration reloaded").await;
    let resp = put(&gw, path(), body_with(1, EXAMPLE_LINE)).await;
    assert_eq!(resp.status, 200, "the new limit applies");
    assert_eq!(resp.headers["ratelimit-limit"], "50");

    std::fs::write(&gw.config_path, "[rate_limit]\nburts = 3\n").unwrap();
    gw.signal("HUP");
    let line = gw.wait_stderr("reload failed").await;
    assert!(line.contains("burts"), "the log names the bad key: {line}");
    let resp = put(&gw, path(), body_with(1, EXAMPLE_LINE)).await;
    assert_eq!(resp.status, 200, "still serving with the previous config");
    assert_eq!(resp.headers["ratelimit-limit"], "50");
}

#[tokio::test]
async fn rotating_the_token_file_changes_the_token_without_restart() {
    let vendor = vendor_with(MockOptions::default()).await;
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), "first-token-aaaa\n").unwrap();
    let gw = Gateway::builder(&vendor.url())
        .no_token_env()
        .toml(&format!("[upstream]\ntoken_file = {:?}", token_file.path()))
        .start()
        .await;
    assert_eq!(put(&gw, example_path(), EXAMPLE_BODY).await.status, 200);
    assert_eq!(
        vendor.updates()[0].headers["authorization"],
        "Bearer first-token-aaaa"
    );

    let staged = token_file.path().with_extension("new");
    std::fs::write(&staged, "second-token-bbbb\n").unwrap();
    std::fs::rename(&staged, token_file.path()).unwrap();
    gw.wait_stderr("upstream token reloaded from file").await;
    assert_eq!(put(&gw, example_path(), EXAMPLE_BODY).await.status, 200);
    let last = vendor.updates().pop().unwrap();
    assert_eq!(last.headers["authorization"], "Bearer second-token-bbbb");

    // An empty file keeps the current token.
    std::fs::write(token_file.path(), "   \n").unwrap();
    gw.wait_stderr("token file unusable").await;
    assert_eq!(put(&gw, example_path(), EXAMPLE_BODY).await.status, 200);
    let last = vendor.updates().pop().unwrap();
    assert_eq!(last.headers["authorization"], "Bearer second-token-bbbb");
    let out = gw.output();
    assert!(!out.contains("second-token-bbbb") && !out.contains("first-token-aaaa"));
}

#[tokio::test]
async fn a_vendor_401_rereads_the_token_file_and_retries_once() {
    let vendor = vendor_with(MockOptions {
        token: Some("old-token".into()),
        ..MockOptions::default()
    })
    .await;
    let token_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token_file.path(), "old-token").unwrap();
    let gw = Gateway::builder(&vendor.url())
        .no_token_env()
        .toml("[residue]\nenabled = false")
        .toml(&format!("[upstream]\ntoken_file = {:?}", token_file.path()))
        .start()
        .await;
    // The vendor rotates while our update is on its way: it already wants the
    // new token, and the file is replaced (atomically, as Kubernetes and
    // secret tools do) just as the first attempt arrives, so only the 401
    // re-read can get the update through.
    vendor.set_token(Some("new-token"));
    let path = token_file.path().to_owned();
    vendor.set_on_update(Some(std::sync::Arc::new(move |r: &Recorded| {
        if r.headers["authorization"] == "Bearer old-token" {
            let staged = path.with_extension("new");
            std::fs::write(&staged, "new-token").unwrap();
            std::fs::rename(&staged, &path).unwrap();
        }
    })));
    let resp = put(&gw, example_path(), EXAMPLE_BODY).await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    let seen: Vec<String> = vendor
        .updates()
        .iter()
        .map(|r| r.headers["authorization"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        seen,
        ["Bearer old-token", "Bearer new-token"],
        "refused once, retried once"
    );
    vendor.set_on_update(None);

    // A 401 with an unchanged file is passed back as is, not retried.
    vendor.set_token(Some("something-else"));
    let before = vendor.updates().len();
    let resp = put(&gw, example_path(), EXAMPLE_BODY).await;
    assert_eq!(resp.status, 401);
    assert_eq!(vendor.updates().len(), before + 1);
}

#[tokio::test]
async fn a_slow_header_client_is_cut_off_while_others_are_served() {
    let vendor = vendor().await;
    let gw = Gateway::builder(&vendor.url())
        .toml("[limits]\nheader_read_timeout_ms = 1000")
        .start()
        .await;
    for opening in ["PUT /agent-api/user/", "PRI * HTTP/2.0\r\n"] {
        let mut slow = TcpStream::connect(gw.addr).await.unwrap();
        let started = Instant::now();
        let mut closed = false;
        // One byte every 200 ms: the whole head would take many seconds.
        for (i, b) in opening
            .bytes()
            .chain(std::iter::repeat(b'x'))
            .take(60)
            .enumerate()
        {
            if slow.write_all(&[b]).await.is_err() {
                closed = true;
                break;
            }
            // Meanwhile, with the trickle under way, a normal client is served.
            if i == 1 {
                assert_eq!(put(&gw, example_path(), EXAMPLE_BODY).await.status, 200);
            }
            let mut buf = [0u8; 256];
            match tokio::time::timeout(Duration::from_millis(200), slow.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed = true;
                    break;
                }
                Ok(Ok(_)) => {} // an error answer (408/400) may precede the close
                Err(_) => {}
            }
        }
        assert!(closed, "{opening:?}: the trickling client was disconnected");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{opening:?}: cut off near the 1 s timeout, not after {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn past_max_inflight_is_503_overloaded() {
    let vendor = vendor().await;
    let gw = Gateway::builder(&vendor.url())
        .toml("[limits]\nmax_inflight = 2\n[residue]\nenabled = false")
        .start()
        .await;
    vendor.set_delay(Duration::from_secs(2));
    let slow: Vec<_> = (0..2).map(|_| gw.spawn_example_put()).collect();
    tokio::time::timeout(Duration::from_secs(10), vendor.wait_for_requests(2))
        .await
        .expect("both slow updates are in flight");
    let resp = put(&gw, example_path(), EXAMPLE_BODY).await;
    assert_eq!(resp.status, 503);
    assert_eq!(resp.reason(), "overloaded");
    for s in slow {
        assert_eq!(s.await.unwrap().status, 200);
    }
}
