//! Who may call, over which socket, and a dry run that changes nothing
//! (DESIGN.md "Caller control" and "Dry run"), through the real binary.

mod support;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use support::process::{STEP, spawn_serve};
use support::*;
use taskgate::secret::KeyDigest;
use tokio::net::UnixStream;

/// Keys unlikely to occur by chance, so a leak is easy to spot.
const BILLING_KEY: &str = "tg-caller-key-billing-3b9f1e77c2d4";
const OPS_KEY: &str = "tg-caller-key-ops-a41c07d9e3f5";

const JSON: (&str, &str) = ("content-type", "application/json");

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

async fn put_with(gw: &Gateway, path: &str, headers: &[(&str, &str)], body: &str) -> Resp {
    let mut all = vec![JSON];
    all.extend_from_slice(headers);
    send(Method::PUT, &gw.url(path), &all, body.to_owned()).await
}

/// This test process's uid (the owner of its `/proc/self`), which the
/// gateway, a child of it, sees as the socket peer's.
fn my_uid() -> u32 {
    std::fs::metadata("/proc/self").expect("procfs").uid()
}

/// One request over the Unix socket at `path`, in HTTP/1.1 or h2c (prior
/// knowledge), on a connection of its own.
async fn send_unix(
    path: &Path,
    version: Version,
    target: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Resp {
    let exchange = async {
        let io = TokioIo::new(
            UnixStream::connect(path)
                .await
                .expect("connect to the socket"),
        );
        let mut req = Request::builder().method(Method::PUT).version(version);
        req = if version == Version::HTTP_2 {
            req.uri(format!("http://localhost{target}"))
        } else {
            req.uri(target).header("host", "localhost")
        };
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(Full::new(Bytes::from(body.to_owned())))
            .expect("request");
        let resp = if version == Version::HTTP_2 {
            let (mut tx, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                .await
                .expect("h2c handshake");
            tokio::spawn(conn);
            tx.send_request(req).await.expect("h2c answer")
        } else {
            let (mut tx, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .expect("HTTP/1.1 handshake");
            tokio::spawn(conn);
            tx.send_request(req).await.expect("HTTP/1.1 answer")
        };
        assert_eq!(resp.version(), version);
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("body").to_bytes();
        Resp {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    };
    tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .expect("the gateway answers over the socket within 30 s")
}

fn records_of<'a>(records: &'a [Value], request_id: &str) -> Vec<&'a Value> {
    records
        .iter()
        .filter(|r| r["request_id"] == request_id)
        .collect()
}

// ---------------------------------------------------------------------------
// allowed_users

#[tokio::test]
async fn allowed_users_refuse_another_user_before_anything_reaches_the_vendor() {
    let vendor = vendor().await;
    let mut gw = Gateway::builder(&vendor.url())
        .toml(&format!("[access]\nallowed_users = [\"{EXAMPLE_USER}\"]"))
        .start()
        .await;
    let other = random_uuid();

    let refused = put(&gw, task_path(&other, EXAMPLE_TASK), EXAMPLE_BODY).await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.reason(), "forbidden");
    assert!(
        vendor.requests().is_empty(),
        "a refused user reaches nothing, not even the line list: {:?}",
        vendor.requests()
    );

    let allowed = put(&gw, example_path(), EXAMPLE_BODY).await;
    assert_eq!(allowed.status, 200, "{}", allowed.text());
    assert_eq!(vendor.updates().len(), 1);
    assert!(
        vendor.requests().iter().all(|r| !r.target.contains(&other)),
        "{:?}",
        vendor.requests()
    );

    let m = gw.admin_get("/metrics").await.text();
    assert_eq!(
        metric(
            &m,
            "taskgate_requests_total{status=\"403\",reason=\"forbidden\"}"
        ),
        1.0,
        "{m}"
    );
    let line = gw.access_line(&refused.request_id()).await;
    assert_eq!(line["status"], 403);
    assert_eq!(line["reason"], "forbidden");

    gw.stop().await;
    let records = gw.audit_records(&gw.audit_path());
    let rejected = records_of(&records, &refused.request_id());
    assert_eq!(rejected.len(), 1, "{records:?}");
    assert_eq!(rejected[0]["event"], "rejected");
    assert_eq!(rejected[0]["reason"], "forbidden");
    assert_eq!(rejected[0]["user_id"], other.as_str());
    assert!(rejected[0]["request"].is_null(), "the body was never read");
}

// ---------------------------------------------------------------------------
// Callers

fn callers_toml() -> String {
    format!(
        "[[access.callers]]\nname = \"billing\"\nkey_sha256 = \"{}\"\nusers = [\"{EXAMPLE_USER}\"]\n\
         [[access.callers]]\nname = \"ops\"\nkey_sha256 = \"{}\"\n",
        KeyDigest::of(BILLING_KEY).to_hex(),
        KeyDigest::of(OPS_KEY).to_hex(),
    )
}

#[tokio::test]
async fn callers_need_a_known_key_and_act_only_for_their_users() {
    let vendor = vendor().await;
    let mut gw = Gateway::builder(&vendor.url())
        .toml(&callers_toml())
        .start()
        .await;
    let billing = format!("Bearer {BILLING_KEY}");
    let other_user = random_uuid();
    let other_path = task_path(&other_user, EXAMPLE_TASK);

    let no_key = put_with(&gw, &example_path(), &[], EXAMPLE_BODY).await;
    assert_eq!(no_key.status, 401);
    assert_eq!(no_key.reason(), "unauthorized");
    assert_eq!(
        no_key.headers["www-authenticate"],
        "Bearer realm=\"taskgate\""
    );
    let wrong_key = put_with(
        &gw,
        &example_path(),
        &[("authorization", "Bearer tg-not-a-known-key")],
        EXAMPLE_BODY,
    )
    .await;
    assert_eq!(wrong_key.status, 401);
    assert_eq!(wrong_key.reason(), "unauthorized");
    assert!(wrong_key.headers.contains_key("www-authenticate"));
    // The vendor's own scheme with a known key is not a caller key either.
    let basic = put_with(
        &gw,
        &example_path(),
        &[("authorization", &format!("Basic {BILLING_KEY}"))],
        EXAMPLE_BODY,
    )
    .await;
    assert_eq!(basic.status, 401);

    // Refused before the dry run could be answered: still no audit record.
    let dry_no_key = put_with(
        &gw,
        &example_path(),
        &[("x-taskgate-dry-run", "true")],
        EXAMPLE_BODY,
    )
    .await;
    assert_eq!(dry_no_key.status, 401);

    let outside = put_with(
        &gw,
        &other_path,
        &[("authorization", &billing)],
        EXAMPLE_BODY,
    )
    .await;
    assert_eq!(outside.status, 403);
    assert_eq!(outside.reason(), "forbidden");
    assert!(vendor.requests().is_empty(), "{:?}", vendor.requests());

    let within = put_with(
        &gw,
        &example_path(),
        &[("authorization", &billing)],
        EXAMPLE_BODY,
    )
    .await;
    assert_eq!(within.status, 200, "{}", within.text());
    // A caller without `users` may act for any user.
    let ops = put_with(
        &gw,
        &other_path,
        &[("authorization", &format!("bearer {OPS_KEY}"))],
        EXAMPLE_BODY,
    )
    .await;
    assert_eq!(ops.status, 200, "{}", ops.text());

    // The vendor saw the two admitted updates, with our token and never a caller key.
    let updates = vendor.updates();
    assert_eq!(updates.len(), 2);
    for r in vendor.requests() {
        let auth: Vec<_> = r.headers.get_all("authorization").iter().collect();
        assert_eq!(auth, [format!("Bearer {TOKEN}").as_str()], "{r:?}");
        let seen = format!("{:?} {:?} {:?}", r.target, r.headers, r.body);
        assert!(
            !seen.contains(BILLING_KEY) && !seen.contains(OPS_KEY),
            "{seen}"
        );
    }

    // Refusals count in the metrics like any other.
    let m = gw.admin_get("/metrics").await.text();
    assert_eq!(
        metric(
            &m,
            "taskgate_requests_total{status=\"401\",reason=\"unauthorized\"}"
        ),
        4.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "taskgate_requests_total{status=\"403\",reason=\"forbidden\"}"
        ),
        1.0
    );

    // The access log names the caller once it is known.
    let line = gw.access_line(&within.request_id()).await;
    assert_eq!(line["caller"], "billing");
    assert_eq!(line["status"], 200);
    let line = gw.access_line(&outside.request_id()).await;
    assert_eq!(line["caller"], "billing");
    assert_eq!(line["reason"], "forbidden");
    assert_eq!(gw.access_line(&ops.request_id()).await["caller"], "ops");
    let line = gw.access_line(&wrong_key.request_id()).await;
    assert!(line.get("caller").is_none(), "{line}");
    assert_eq!(line["reason"], "unauthorized");

    gw.stop().await;
    let records = gw.audit_records(&gw.audit_path());
    let admitted = records_of(&records, &within.request_id());
    let events: Vec<_> = admitted.iter().map(|r| r["event"].as_str()).collect();
    assert_eq!(events, [Some("attempt"), Some("outcome")]);
    assert!(
        admitted.iter().all(|r| r["caller"] == "billing"),
        "{admitted:?}"
    );
    let refused = records_of(&records, &outside.request_id());
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0]["event"], "rejected");
    assert_eq!(refused[0]["caller"], "billing");
    assert!(refused[0]["request"].is_null());
    for id in [no_key.request_id(), wrong_key.request_id()] {
        let r = records_of(&records, &id);
        assert_eq!(r.len(), 1, "{id}: {records:?}");
        assert_eq!(r[0]["reason"], "unauthorized");
        assert!(r[0]["caller"].is_null() && r[0]["request"].is_null());
    }
    assert!(records_of(&records, &dry_no_key.request_id()).is_empty());

    // The keys are nowhere: not in the logs, the answers or the audit file.
    let out = gw.output();
    for key in [BILLING_KEY, OPS_KEY] {
        assert!(!out.contains(key), "a caller key in the logs:\n{out}");
        for resp in [&no_key, &wrong_key, &basic, &outside, &within, &ops] {
            assert!(!format!("{:?} {}", resp.headers, resp.text()).contains(key));
        }
        let audit = std::fs::read_to_string(gw.audit_path()).unwrap();
        assert!(!audit.contains(key), "a caller key in the audit log");
    }
    gw.assert_token_never_logged();
}

#[tokio::test]
async fn callers_and_allowed_users_change_on_sighup() {
    let vendor = vendor().await;
    let gw = Gateway::builder(&vendor.url())
        .toml(&callers_toml())
        .start()
        .await;
    let ops = format!("Bearer {OPS_KEY}");
    let user = random_uuid();
    let path = task_path(&user, EXAMPLE_TASK);
    assert_eq!(
        put_with(&gw, &path, &[("authorization", &ops)], EXAMPLE_BODY)
            .await
            .status,
        200
    );

    // ops loses its key to a new one, and the gateway its other users.
    let original = std::fs::read_to_string(&gw.config_path).unwrap();
    let new_key = "tg-caller-key-ops-rotated-77d0";
    let changed = original
        .replace(
            &KeyDigest::of(OPS_KEY).to_hex(),
            &KeyDigest::of(new_key).to_hex(),
        )
        .replacen(
            "[[access.callers]]",
            &format!("[access]\nallowed_users = [\"{EXAMPLE_USER}\"]\n[[access.callers]]"),
            1,
        );
    std::fs::write(&gw.config_path, changed).unwrap();
    gw.signal("HUP");
    let line = gw.wait_stderr("configuration reloaded").await;
    assert!(line.contains("access"), "{line}");

    let old = put_with(&gw, &path, &[("authorization", &ops)], EXAMPLE_BODY).await;
    assert_eq!(old.status, 401, "the old key is gone");
    let rotated = format!("Bearer {new_key}");
    let other = put_with(&gw, &path, &[("authorization", &rotated)], EXAMPLE_BODY).await;
    assert_eq!(other.status, 403, "the user is no longer allowed");
    let example = put_with(
        &gw,
        &example_path(),
        &[("authorization", &rotated)],
        EXAMPLE_BODY,
    )
    .await;
    assert_eq!(example.status, 200, "{}", example.text());
}

// ---------------------------------------------------------------------------
// The Unix socket

#[tokio::test]
async fn updates_over_a_unix_socket_reach_the_vendor_and_name_the_uid() {
    let vendor = vendor().await;
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("taskgate.sock");
    let uid = my_uid();
    let mut gw = Gateway::builder(&vendor.url())
        .env("TASKGATE_LISTEN", &format!("unix:{}", sock.display()))
        .toml(&format!("[access]\nallowed_uids = [{uid}]"))
        .start()
        .await;
    assert_eq!(gw.socket.as_deref(), Some(sock.as_path()));
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "{mode:o}");

    let h1 = send_unix(
        &sock,
        Version::HTTP_11,
        &example_path(),
        &[JSON],
        EXAMPLE_BODY,
    )
    .await;
    assert_eq!(h1.status, 200, "{}", h1.text());
    assert_eq!(h1.text(), SUCCESS_BODY);
    let h2 = send_unix(
        &sock,
        Version::HTTP_2,
        &example_path(),
        &[JSON],
        EXAMPLE_BODY,
    )
    .await;
    assert_eq!(h2.status, 200, "{}", h2.text());
    assert_eq!(vendor.updates().len(), 2);

    let client = format!("unix:uid={uid}");
    for resp in [&h1, &h2] {
        assert_eq!(
            gw.access_line(&resp.request_id()).await["client"],
            client.as_str()
        );
    }

    gw.stop().await;
    assert!(!sock.exists(), "the socket file is removed at shutdown");
    let records = gw.audit_records(&gw.audit_path());
    let mine = records_of(&records, &h1.request_id());
    assert_eq!(mine.len(), 2);
    assert!(
        mine.iter().all(|r| r["client"] == client.as_str()),
        "{mine:?}"
    );
}

#[tokio::test]
async fn allowed_uids_without_the_callers_uid_refuse_it() {
    let vendor = vendor().await;
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("taskgate.sock");
    let someone_else = my_uid().wrapping_add(1);
    let gw = Gateway::builder(&vendor.url())
        .env("TASKGATE_LISTEN", &format!("unix:{}", sock.display()))
        .toml(&format!("[access]\nallowed_uids = [{someone_else}]"))
        .start()
        .await;
    let resp = send_unix(
        &sock,
        Version::HTTP_11,
        &example_path(),
        &[JSON],
        EXAMPLE_BODY,
    )
    .await;
    assert_eq!(resp.status, 403);
    assert_eq!(resp.reason(), "forbidden");
    assert!(vendor.requests().is_empty());
    let line = gw.access_line(&resp.request_id()).await;
    assert_eq!(line["client"], format!("unix:uid={}", my_uid()).as_str());
}

#[tokio::test]
async fn a_stale_socket_file_is_replaced_but_never_another_file() {
    let vendor = vendor().await;
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("taskgate.sock");
    // What a killed gateway leaves behind: a socket nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let mut gw = Gateway::builder(&vendor.url())
        .env("TASKGATE_LISTEN", &format!("unix:{}", sock.display()))
        .start()
        .await;
    let resp = send_unix(
        &sock,
        Version::HTTP_11,
        &example_path(),
        &[JSON],
        EXAMPLE_BODY,
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.text());
    gw.stop().await;
    assert!(!sock.exists());

    // A regular file where the socket should go is not ours to remove.
    let file: PathBuf = sock_dir.path().join("precious");
    std::fs::write(&file, "keep me").unwrap();
    let toml = format!(
        "listen = \"unix:{}\"\nadmin_listen = \"127.0.0.1:0\"\n",
        file.display()
    );
    let mut proc = spawn_serve(&toml, &vendor.url());
    assert!(!proc.wait_ready(STEP), "it must not start");
    let status = proc.wait_exit(STEP);
    assert_eq!(status.code(), Some(1));
    let err = proc.stderr_text();
    assert!(err.contains("not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
}

// ---------------------------------------------------------------------------
// Dry run

#[tokio::test]
async fn a_dry_run_checks_everything_and_changes_nothing() {
    let vendor = vendor().await;
    let mut gw = Gateway::start(&vendor.url()).await;
    let dry = [("x-taskgate-dry-run", "true")];

    // The example line has residue 5.
    let ok = put_with(&gw, &example_path(), &dry, &body_with(3, EXAMPLE_LINE)).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let v = ok.json();
    assert_eq!(v["code"], 200);
    assert_eq!(v["status"], "success");
    assert_eq!(v["message"], "dry run: the update would be forwarded");
    assert_eq!(v["data"]["dry_run"], true);
    assert_eq!(v["data"]["residue"], 5);
    assert_eq!(v["data"]["maximumcall"], 3);
    assert!(ok.headers.contains_key("ratelimit-remaining"));
    assert_eq!(vendor.inits().len(), 1, "the residue was read");
    assert!(vendor.updates().is_empty(), "nothing forwarded");

    let one = put_with(
        &gw,
        &example_path(),
        &[("x-taskgate-dry-run", "1")],
        &body_with(5, EXAMPLE_LINE),
    )
    .await;
    assert_eq!(one.status, 200);
    assert_eq!(one.json()["data"]["dry_run"], true);

    // Refused as a real update would be.
    let over = put_with(&gw, &example_path(), &dry, &body_with(6, EXAMPLE_LINE)).await;
    assert_eq!(over.status, 409);
    assert_eq!(over.reason(), "residue_exceeded");
    let invalid = put_with(&gw, &example_path(), &dry, "{\"maximumcall\": 0}").await;
    assert_eq!(invalid.status, 422);
    let maybe = put_with(
        &gw,
        &example_path(),
        &[("x-taskgate-dry-run", "maybe")],
        EXAMPLE_BODY,
    )
    .await;
    assert_eq!(maybe.status, 400);
    assert_eq!(maybe.reason(), "invalid_header");
    assert!(vendor.updates().is_empty());

    // `false` is a real update, and the header never travels upstream.
    let real = put_with(
        &gw,
        &example_path(),
        &[("x-taskgate-dry-run", "false")],
        EXAMPLE_BODY,
    )
    .await;
    assert_eq!(real.status, 200, "{}", real.text());
    assert_eq!(real.text(), SUCCESS_BODY);
    let updates = vendor.updates();
    assert_eq!(updates.len(), 1);
    assert!(vendor.requests().iter().all(|r| {
        r.headers
            .keys()
            .all(|k| !k.as_str().starts_with("x-taskgate"))
    }));

    for resp in [&ok, &one, &over, &invalid] {
        let line = gw.access_line(&resp.request_id()).await;
        assert_eq!(line["dry_run"], true, "{line}");
    }
    for resp in [&real, &maybe] {
        let line = gw.access_line(&resp.request_id()).await;
        assert!(line.get("dry_run").is_none(), "{line}");
    }

    gw.stop().await;
    let records = gw.audit_records(&gw.audit_path());
    let ids: Vec<_> = records.iter().map(|r| r["request_id"].clone()).collect();
    let real_id = real.request_id();
    assert_eq!(ids, [real_id.as_str(), real_id.as_str()], "{records:?}");
}

#[tokio::test]
async fn dry_runs_count_against_the_rate_limit() {
    let vendor = vendor().await;
    let gw = Gateway::builder(&vendor.url())
        .toml("[rate_limit]\nper_second = 1\nburst = 2")
        .start()
        .await;
    let path = task_path(&random_uuid(), EXAMPLE_TASK);
    let dry = [("x-taskgate-dry-run", "true")];
    let first = put_with(&gw, &path, &dry, EXAMPLE_BODY).await;
    assert_eq!(first.status, 200, "{}", first.text());
    assert_eq!(first.headers["ratelimit-remaining"], "1");
    let second = put_with(&gw, &path, &dry, EXAMPLE_BODY).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.headers["ratelimit-remaining"], "0");
    let real = put_with(&gw, &path, &[], EXAMPLE_BODY).await;
    assert_eq!(real.status, 429, "{}", real.text());
    assert!(real.headers.contains_key("retry-after"));
    assert!(vendor.updates().is_empty());
}

#[tokio::test]
async fn a_silent_client_on_the_socket_is_closed_after_the_header_timeout() {
    use tokio::io::AsyncReadExt;
    let vendor = vendor().await;
    let sock_dir = tempfile::tempdir().unwrap();
    let sock = sock_dir.path().join("taskgate.sock");
    let _gw = Gateway::builder(&vendor.url())
        .env("TASKGATE_LISTEN", &format!("unix:{}", sock.display()))
        .toml("[limits]\nheader_read_timeout_ms = 300")
        .start()
        .await;
    let mut silent = UnixStream::connect(&sock).await.unwrap();
    let mut buf = [0u8; 64];
    let started = std::time::Instant::now();
    // Well below the default header timeout (5 s): the configured one applies.
    let closed = tokio::time::timeout(Duration::from_secs(3), silent.read(&mut buf))
        .await
        .expect("closed within 3 s");
    assert!(matches!(closed, Ok(0) | Err(_)), "{closed:?}");
    assert!(started.elapsed() >= Duration::from_millis(250));
}

#[test]
fn check_refuses_bad_caller_keys_and_users_with_78() {
    let dir = tempfile::tempdir().unwrap();
    for (toml, key) in [
        (
            "[[access.callers]]\nname = \"billing\"\nkey_sha256 = \"9f86d081\"\n",
            "access.callers.key_sha256",
        ),
        (
            &format!(
                "[[access.callers]]\nname = \"billing\"\nkey_sha256 = \"{}\"\nusers = [\"42\"]\n",
                KeyDigest::of(BILLING_KEY).to_hex()
            ),
            "access.callers.users",
        ),
    ] {
        let cfg = dir.path().join("c.toml");
        std::fs::write(&cfg, toml).unwrap();
        let (code, _, err) = run_cli(
            &["check", "--config", cfg.to_str().unwrap()],
            &[("TASKGATE_UPSTREAM_TOKEN", TOKEN)],
        );
        assert_eq!(code, Some(78), "{err}");
        assert!(err.contains(key), "{err}");
    }
}
