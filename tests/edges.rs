//! Edges a user or operator hits sooner or later (signals during start-up
//! are in `startup.rs`): a vendor behind a compressing CDN, ambiguous message
//! framing, a non-UTF-8 charset, the residue cache of one line surviving an
//! update of another, a CA file that does not parse, a body that trickles in
//! past the timeout, and `bytes_in` of a refused body.

mod support;

use std::io::Read;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use http::Method;
use serde_json::Value;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use support::process::{STARTUP_CONFIG, STEP, describe, silent_upstream, spawn_serve};
use support::raw::{Until, raw, read_back};
use support::*;

/// The example user's second caller line (residue 1 in the emulator's sample).
const LINE_TWO: &str = "37d73edf-4628-4cf1-8beb-758433fd0aab";

// ---------------------------------------------------------------------------
// Raw HTTP/1.1 on a TCP stream
// ---------------------------------------------------------------------------

/// A PUT head for `target` with `extra` header lines (each ending in CRLF),
/// then the blank line.
fn put_head(target: &str, extra: &str) -> String {
    format!(
        "PUT {target} HTTP/1.1\r\nHost: taskgate\r\nContent-Type: application/json\r\n{extra}\r\n"
    )
}

/// `body` as one chunk and the last chunk.
fn chunked(body: &str) -> String {
    format!("{:x}\r\n{body}\r\n0\r\n\r\n", body.len())
}

fn assert_vendor_got_nothing(vendor: &MockVendor, what: &str) {
    let seen: Vec<String> = vendor
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.target))
        .collect();
    assert!(seen.is_empty(), "{what}: the vendor received {seen:?}");
}

// ---------------------------------------------------------------------------
// Compression
// ---------------------------------------------------------------------------

fn gunzip(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_end(&mut out)
        .expect("valid gzip");
    out
}

/// The knob the next test relies on: the emulator gzips exactly when asked.
#[tokio::test]
async fn the_emulator_gzips_answers_when_the_request_accepts_gzip() {
    let vendor = vendor().await;
    let url = format!("{}{}", vendor.url(), example_path());
    let auth = format!("Bearer {TOKEN}");
    let put = |accept: Option<&'static str>| {
        let url = url.clone();
        let auth = auth.clone();
        async move {
            let mut headers = vec![
                ("content-type", "application/json"),
                ("authorization", auth.as_str()),
            ];
            if let Some(a) = accept {
                headers.push(("accept-encoding", a));
            }
            send(Method::PUT, &url, &headers, EXAMPLE_BODY).await
        }
    };
    let success: Value = serde_json::from_str(SUCCESS_BODY).unwrap();

    let off = put(Some("gzip")).await;
    assert!(
        off.headers.get("content-encoding").is_none(),
        "off by default"
    );
    assert_eq!(off.json(), success);

    vendor.set_compress(true);
    for accept in ["gzip", "deflate, GZIP;q=0.5", "br, *"] {
        let r = put(Some(accept)).await;
        assert_eq!(r.status, 200, "{accept}");
        assert_eq!(r.headers["content-encoding"], "gzip", "{accept}");
        assert_eq!(gunzip(&r.body), SUCCESS_BODY.as_bytes(), "{accept}");
    }
    for accept in [
        None,
        Some("identity"),
        Some("gzip;q=0"),
        Some("*, gzip;q=0"),
    ] {
        let r = put(accept).await;
        assert!(
            r.headers.get("content-encoding").is_none(),
            "{accept:?}: {:?}",
            r.headers
        );
        assert_eq!(r.json(), success, "{accept:?}");
    }
    // The line list is compressed too, and what was recorded is the request.
    let init = send(
        Method::GET,
        &format!("{}{}", vendor.url(), task_path(EXAMPLE_USER, "create")),
        &[
            ("authorization", auth.as_str()),
            ("accept-encoding", "gzip"),
        ],
        "",
    )
    .await;
    assert_eq!(init.headers["content-encoding"], "gzip");
    let list: Value = serde_json::from_slice(&gunzip(&init.body)).expect("list is JSON");
    assert_eq!(
        list["data"]["caller_line_list"][0]["value"], EXAMPLE_LINE,
        "{list}"
    );
    let last_put = vendor.updates().pop().unwrap();
    assert_eq!(last_put.body, EXAMPLE_BODY.as_bytes());
}

#[tokio::test]
async fn a_compressing_vendor_still_gives_the_caller_plain_json() {
    let vendor = vendor().await;
    vendor.set_compress(true);
    let gw = Gateway::start(&vendor.url()).await;
    let resp = send(
        Method::PUT,
        &gw.url(&example_path()),
        &[
            ("content-type", "application/json"),
            ("accept-encoding", "gzip"),
        ],
        EXAMPLE_BODY,
    )
    .await;
    assert_eq!(resp.status, 200, "{:?}", resp.body);
    let encoding = resp
        .headers
        .get("content-encoding")
        .map(|v| v.to_str().unwrap_or("?").to_owned());
    assert!(
        encoding.is_none() || encoding.as_deref() == Some("identity"),
        "the caller got Content-Encoding {encoding:?}"
    );
    let got: Value = serde_json::from_slice(&resp.body).unwrap_or_else(|e| {
        panic!(
            "the caller's body is not JSON ({e}): {:?}",
            String::from_utf8_lossy(&resp.body)
        )
    });
    assert_eq!(got, serde_json::from_str::<Value>(SUCCESS_BODY).unwrap());

    let (updates, inits) = (vendor.updates(), vendor.inits());
    assert_eq!((updates.len(), inits.len()), (1, 1));
    for (what, r) in [
        ("the update", &updates[0]),
        ("the line-list read", &inits[0]),
    ] {
        let asked: Vec<&str> = r
            .headers
            .get_all("accept-encoding")
            .iter()
            .map(|v| v.to_str().unwrap_or("?"))
            .collect();
        assert_eq!(
            asked,
            ["identity"],
            "{what}: the vendor was asked for Accept-Encoding {asked:?}"
        );
    }
    gw.assert_token_never_logged();
}

// ---------------------------------------------------------------------------
// Framing
// ---------------------------------------------------------------------------

/// Long enough for a gateway that keeps the connection open to be caught,
/// shorter than the header timeout that would close it anyway.
const CLOSE_WITHIN: Duration = Duration::from_secs(3);

#[tokio::test]
async fn ambiguous_framing_is_400_invalid_framing_and_closes() {
    let vendor = vendor().await;
    let gw = Gateway::builder(&vendor.url())
        .toml("[limits]\nheader_read_timeout_ms = 10000")
        .start()
        .await;
    let body = chunked(EXAMPLE_BODY);
    let cases = [
        (
            "Content-Length and chunked",
            format!(
                "{}{body}",
                put_head(
                    &example_path(),
                    &format!(
                        "Content-Length: {}\r\nTransfer-Encoding: chunked\r\n",
                        body.len()
                    )
                )
            ),
        ),
        (
            "gzip, chunked",
            format!(
                "{}{body}",
                put_head(&example_path(), "Transfer-Encoding: gzip, chunked\r\n")
            ),
        ),
    ];
    for (name, request) in &cases {
        let ex = raw(gw.addr, request.as_bytes(), Until::Closed, CLOSE_WITHIN).await;
        let r = ex.one();
        assert_eq!(r.status, 400, "{name}: {ex:?}");
        assert_eq!(r.reason(), "invalid_framing", "{name}: {ex:?}");
        assert_eq!(r.json()["code"], 400, "{name}");
        assert_eq!(
            r.header("connection")
                .map(str::to_ascii_lowercase)
                .as_deref(),
            Some("close"),
            "{name}: {ex:?}"
        );
        assert!(
            ex.closed,
            "{name}: the connection was still open after {CLOSE_WITHIN:?}"
        );
        assert_vendor_got_nothing(&vendor, name);
    }
}

#[tokio::test]
async fn a_plain_chunked_request_is_still_served() {
    let vendor = vendor().await;
    let gw = Gateway::start(&vendor.url()).await;
    let request = format!(
        "{}{}",
        put_head(&example_path(), "Transfer-Encoding: chunked\r\n"),
        chunked(EXAMPLE_BODY)
    );
    let ex = raw(
        gw.addr,
        request.as_bytes(),
        Until::Responses(1),
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(ex.one().status, 200, "{ex:?}");
    let updates = vendor.updates();
    assert_eq!(updates.len(), 1);
    assert_eq!(updates[0].body, EXAMPLE_BODY.as_bytes());
}

/// A chunked PUT of the example path: `body` in chunks of `size` bytes,
/// then the last chunk.
fn chunked_in_pieces(body: &[u8], size: usize) -> Vec<u8> {
    let mut out = put_head(&example_path(), "Transfer-Encoding: chunked\r\n").into_bytes();
    for piece in body.chunks(size) {
        out.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
        out.extend_from_slice(piece);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

#[tokio::test]
async fn a_body_in_many_pieces_reaches_the_vendor_whole_and_is_bounded() {
    let vendor = vendor().await;
    let gw = Gateway::builder(&vendor.url())
        .toml("[limits]\nmax_body_bytes = 1024")
        .start()
        .await;
    // Chunks of 3 bytes: the body is assembled piece by piece.
    let request = chunked_in_pieces(EXAMPLE_BODY.as_bytes(), 3);
    let ex = raw(
        gw.addr,
        &request,
        Until::Responses(1),
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(ex.one().status, 200, "{ex:?}");
    let updates = vendor.updates();
    assert_eq!(updates.len(), 1);
    assert_eq!(
        updates[0].body,
        EXAMPLE_BODY.as_bytes(),
        "the vendor got the body byte for byte"
    );

    // The same in pieces, padded past the limit: 413, nothing forwarded.
    let mut big = EXAMPLE_BODY.as_bytes().to_vec();
    big.extend(std::iter::repeat_n(b' ', 1100));
    let request = chunked_in_pieces(&big, 100);
    let ex = raw(
        gw.addr,
        &request,
        Until::Responses(1),
        Duration::from_secs(15),
    )
    .await;
    assert_eq!(ex.one().status, 413, "{ex:?}");
    assert_eq!(
        vendor.updates().len(),
        1,
        "the oversized body was not forwarded"
    );
}

// ---------------------------------------------------------------------------
// Charset
// ---------------------------------------------------------------------------

async fn put_typed(gw: &Gateway, content_type: &str) -> Resp {
    send(
        Method::PUT,
        &gw.url(&example_path()),
        &[("content-type", content_type)],
        EXAMPLE_BODY,
    )
    .await
}

#[tokio::test]
async fn a_charset_other_than_utf8_is_415() {
    let vendor = vendor().await;
    let gw = Gateway::start(&vendor.url()).await;
    for ct in [
        "application/json; charset=gbk",
        "application/json; charset=ISO-8859-1",
    ] {
        let resp = put_typed(&gw, ct).await;
        assert_eq!(resp.status, 415, "{ct}: {}", resp.text());
        assert_eq!(resp.reason(), "unsupported_media_type", "{ct}");
        assert_vendor_got_nothing(&vendor, ct);
    }
}

#[tokio::test]
async fn a_utf8_charset_in_any_spelling_is_accepted() {
    let vendor = vendor().await;
    let gw = Gateway::start(&vendor.url()).await;
    for ct in [
        "application/json; charset=UTF-8",
        "application/json;charset=\"utf-8\"",
    ] {
        let resp = put_typed(&gw, ct).await;
        assert_eq!(resp.status, 200, "{ct}: {}", resp.text());
    }
    assert_eq!(vendor.updates().len(), 2);
}

// ---------------------------------------------------------------------------
// Residue cache per caller line
// ---------------------------------------------------------------------------

#[tokio::test]
async fn updating_one_line_keeps_the_other_lines_cached_residue() {
    let vendor = vendor().await;
    // A TTL far beyond the test, so only invalidation can cause a re-read.
    let gw = Gateway::builder(&vendor.url())
        .toml("[residue]\ncache_ttl_ms = 600000")
        .start()
        .await;
    let resp = put(&gw, example_path(), EXAMPLE_BODY).await;
    assert_eq!(resp.status, 200, "line one: {}", resp.text());
    assert_eq!(vendor.inits().len(), 1, "the first update reads the list");

    let resp = put(&gw, example_path(), body_with(1, LINE_TWO)).await;
    assert_eq!(resp.status, 200, "line two: {}", resp.text());
    assert_eq!(
        vendor.inits().len(),
        1,
        "the accepted update of line one cost the next update of line two a vendor read"
    );

    let resp = put(&gw, example_path(), EXAMPLE_BODY).await;
    assert_eq!(resp.status, 200, "line one again: {}", resp.text());
    assert_eq!(
        vendor.inits().len(),
        2,
        "line one's own residue must be read again after its update"
    );
}

// ---------------------------------------------------------------------------
// Bad CA file
// ---------------------------------------------------------------------------

#[test]
fn a_ca_file_that_does_not_parse_is_a_config_error_for_check_and_serve() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "bad base64",
            "-----BEGIN CERTIFICATE-----\nnot base64 at all!\n-----END CERTIFICATE-----\n",
        ),
        ("no PEM at all", "this file holds no certificate\n"),
        ("empty", ""),
    ];
    let (_vendor, upstream) = silent_upstream();
    let mut problems = Vec::new();
    for (i, (name, pem)) in cases.iter().enumerate() {
        let ca: PathBuf = dir.path().join(format!("ca{i}.pem"));
        std::fs::write(&ca, pem).unwrap();
        let toml = format!("{STARTUP_CONFIG}[upstream]\nextra_ca_file = {ca:?}\n");
        let config = dir.path().join(format!("c{i}.toml"));
        std::fs::write(&config, &toml).unwrap();

        let audit = dir.path().join("check-audit.jsonl");
        let (code, _, err) = run_cli(
            &["check", "--config", config.to_str().unwrap()],
            &[
                ("TASKGATE_UPSTREAM_TOKEN", TOKEN),
                ("TASKGATE_AUDIT_PATH", audit.to_str().unwrap()),
            ],
        );
        if code != Some(78) || !err.contains("upstream.extra_ca_file") {
            problems.push(format!(
                "{name}: check exited {code:?} (want 78 naming upstream.extra_ca_file): {}",
                err.trim()
            ));
        }

        // Bounded: a `serve` that accepts the file becomes ready, and is stopped.
        let mut p = spawn_serve(&toml, &upstream);
        if p.wait_ready(STEP) {
            p.signal("TERM");
            let _ = p.wait_exit(STEP);
            problems.push(format!("{name}: serve started with it"));
            continue;
        }
        let status = p.wait_exit(STEP);
        let err = p.stderr_text();
        if status.code() != Some(78) || !err.contains("upstream.extra_ca_file") {
            problems.push(format!(
                "{name}: serve ended with {} (want exit 78 naming upstream.extra_ca_file): {}",
                describe(status),
                err.trim()
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------
// A body that trickles in past the timeout
// ---------------------------------------------------------------------------

#[tokio::test]
async fn a_trickled_body_gets_a_complete_408_not_a_reset() {
    let vendor = vendor().await;
    let gw = Gateway::builder(&vendor.url())
        .toml("[limits]\nheader_read_timeout_ms = 300")
        .start()
        .await;
    let head = put_head(&example_path(), "Content-Length: 60000\r\n");
    for round in 0..5 {
        let s = TcpStream::connect(gw.addr).await.expect("connect");
        let (mut rd, mut wr) = s.into_split();
        wr.write_all(head.as_bytes()).await.expect("write the head");
        let sent = Instant::now();
        // The slow client under test: one byte every 20 ms, for about 3 s
        // at most, while we read. (A pace, not a wait for an event.)
        let writer = tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_millis(20));
            pace.tick().await;
            for _ in 0..150 {
                pace.tick().await;
                if wr.write_all(b" ").await.is_err() {
                    break;
                }
            }
        });
        let ex = read_back(
            &mut rd,
            Until::Responses(1),
            tokio::time::Instant::now(),
            Duration::from_secs(10),
        )
        .await;
        let waited = sent.elapsed();
        writer.abort();
        let _ = writer.await;
        let r = ex.responses.first().unwrap_or_else(|| {
            panic!("round {round}: no response before the stream ended: {ex:?}")
        });
        assert!(
            ex.bytes.starts_with(b"HTTP/1.1 408"),
            "round {round}: {ex:?}"
        );
        assert!(
            r.complete,
            "round {round}: the 408 was cut short (error: {:?}): {ex:?}",
            ex.error
        );
        assert_eq!(r.reason(), "request_timeout", "round {round}");
        assert_eq!(r.json()["code"], 408, "round {round}");
        // Near the 300 ms timeout, not once the trickle (3 s) is over.
        assert!(
            waited < Duration::from_millis(2_500),
            "round {round}: the 408 took {waited:?}"
        );
    }
    assert_vendor_got_nothing(&vendor, "trickled bodies");
}

// ---------------------------------------------------------------------------
// bytes_in of a refused body
// ---------------------------------------------------------------------------

#[tokio::test]
async fn bytes_in_counts_a_body_that_was_refused() {
    let vendor = vendor().await;
    let gw = Gateway::start(&vendor.url()).await;
    let ok = put(&gw, example_path(), EXAMPLE_BODY).await;
    assert_eq!(ok.status, 200);
    let line = gw.access_line(&ok.request_id()).await;
    assert_eq!(line["bytes_in"], EXAMPLE_BODY.len(), "{line}");

    let bad = put(&gw, example_path(), "{not json").await;
    assert_eq!(bad.status, 400, "{}", bad.text());
    assert_eq!(bad.reason(), "invalid_json");
    let line = gw.access_line(&bad.request_id()).await;
    assert_eq!(line["bytes_in"], 9, "{line}");
}
