//! One task update, stage by stage, in the order of DESIGN.md. `handle` is
//! the outer handler (request id, error mapping, access log); `update` is the
//! straight line of stages, each a `?`.

pub mod body;
pub mod forward;

use std::net::SocketAddr;
use std::time::Instant;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, header};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::access_log::AccessLine;
use crate::app::State;
use crate::error::Error;
use crate::ids;
use crate::router::{self, TaskRoute};
use crate::telemetry::now_rfc3339;

/// What one request accumulates on its way through, for the access log.
pub struct Exchange {
    pub request_id: String,
    pub client: SocketAddr,
    pub route: Option<TaskRoute>,
    pub upstream_ms: Option<f64>,
    pub bytes_in: u64,
}

/// The outer handler: every response, success or error, leaves here with
/// `X-Request-Id` and one access-log line.
pub async fn handle(
    state: &State,
    client: SocketAddr,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let mut ex = Exchange {
        request_id: ids::request_id(req.headers()),
        client,
        route: None,
        upstream_ms: None,
        bytes_in: 0,
    };
    let method = req.method().clone();
    let path = req.uri().path().to_owned();

    let (mut resp, reason) = match update(state, &mut ex, req).await {
        Ok(resp) => (resp, None),
        Err(err) => {
            let reason = err.reason();
            (err.into_response(), Some(reason))
        }
    };
    if let Ok(v) = HeaderValue::from_str(&ex.request_id) {
        resp.headers_mut().insert("x-request-id", v);
    }

    let bytes_out = hyper::body::Body::size_hint(resp.body())
        .exact()
        .unwrap_or(0);
    state.access_log.write(&AccessLine {
        ts: &now_rfc3339(),
        request_id: &ex.request_id,
        client: ex.client.to_string(),
        method: method.as_str(),
        // Bounded so a hostile path cannot bloat the log.
        path: truncate(&path, 512),
        status: resp.status().as_u16(),
        reason,
        user_id: ex.route.map(|r| r.user_id.to_string()),
        task_id: ex.route.map(|r| r.task_id.to_string()),
        latency_ms: ms(started.elapsed()),
        upstream_ms: ex.upstream_ms,
        bytes_in: ex.bytes_in,
        bytes_out,
    });
    resp
}

/// The stages. Nothing reaches `forward` that was not routed, read and
/// checked first.
async fn update(
    state: &State,
    ex: &mut Exchange,
    req: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Error> {
    // Only the one known route with canonical ids; 404/405 otherwise.
    let route = router::route(req.method(), req.uri())?;
    ex.route = Some(route);
    let (parts, incoming) = req.into_parts();

    // Media type, size, one JSON object: 415/413/400. The body must arrive
    // within the header timeout too, or a slow sender holds a slot forever.
    let limits = &state.config.limits;
    let body = tokio::time::timeout(
        limits.header_read_timeout,
        body::read(&parts.headers, incoming, limits.max_body_bytes),
    )
    .await
    .map_err(|_| Error::RequestTimeout)??;
    ex.bytes_in = body.bytes.len() as u64;

    // Token, header hygiene, URI from the checked ids, timeouts, retry.
    let upstream = &state.config.upstream;
    let headers = forward::upstream_headers(&parts.headers, &state.token.get(), &ex.request_id);
    let uri = forward::task_uri(upstream, &route)?;
    let answer = forward::send(
        &state.client,
        upstream,
        http::Method::PUT,
        uri,
        headers,
        body.bytes,
    )
    .await?;
    ex.upstream_ms = Some(ms(answer.upstream_time));

    // The vendor's status, Content-Type and body, unchanged.
    let mut resp = Response::new(Full::new(answer.body));
    *resp.status_mut() = answer.status;
    if let Some(ct) = answer.content_type {
        resp.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    Ok(resp)
}

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}
