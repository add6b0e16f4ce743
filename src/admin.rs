//! The admin listener: `/metrics`, `/healthz` (alive) and `/readyz` (ready
//! to take updates). Kept off the data port so it is never exposed with it.

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::config::SharedFallback;
use crate::pipeline::state::State;

/// Answers one admin request. Cheap and non-blocking: it reads counters and
/// flags, never the disk, so a stuck disk cannot take health checks down.
pub fn handle(state: &State, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
        ),
        (&Method::GET, "/healthz") => (
            StatusCode::OK,
            "application/json",
            r#"{"status":"ok"}"#.to_owned(),
        ),
        (&Method::GET, "/readyz") => readyz(state),
        _ => (
            StatusCode::NOT_FOUND,
            "application/json",
            r#"{"status":"not found"}"#.to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// 200 when every check passes, else 503 naming the first that fails; the
/// body lists them all.
fn readyz(state: &State) -> (StatusCode, &'static str, String) {
    // A token is always held once started (start-up fails without one); the
    // audit log can become unwritable at any time.
    // With `[shared]`, Redis down is "degraded" (still ready) under
    // `on_unavailable = "local"` and a failure under `"reject"`.
    let mut checks: Vec<(&str, Result<&str, &str>)> = vec![
        ("token", Ok("ok")),
        (
            "audit",
            if state.audit.is_writable() {
                Ok("ok")
            } else {
                Err("not writable")
            },
        ),
    ];
    if let Some(shared) = &state.shared {
        checks.push((
            "shared",
            match (shared.is_up(), shared.fallback()) {
                (true, _) => Ok("ok"),
                (false, SharedFallback::Local) => Ok("degraded"),
                (false, SharedFallback::Reject) => Err("unavailable"),
            },
        ));
    }
    let failing = checks.iter().find(|(_, c)| c.is_err()).map(|(n, _)| *n);
    let listed = checks
        .iter()
        .map(|(name, c)| format!("\"{name}\":\"{}\"", c.unwrap_or_else(|e| e)))
        .collect::<Vec<_>>()
        .join(",");
    match failing {
        None => (
            StatusCode::OK,
            "application/json",
            format!(r#"{{"status":"ready","checks":{{{listed}}}}}"#),
        ),
        Some(name) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "application/json",
            format!(r#"{{"status":"not ready","failing":"{name}","checks":{{{listed}}}}}"#),
        ),
    }
}
