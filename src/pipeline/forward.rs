//! Forward stage: the upstream request built from validated parts only —
//! URI from the checked ids, the caller's body bytes, the caller's headers
//! minus credentials and hop-by-hop headers, plus our token and request id.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};

use crate::config::UpstreamConfig;
use crate::error::Error;
use crate::router::TaskRoute;
use crate::secret::Token;
use crate::upstream::UpstreamClient;

/// A vendor answer larger than this is not a task-update envelope; refusing
/// it bounds the memory one request can take.
pub const MAX_UPSTREAM_BODY: usize = 1024 * 1024;

/// What the vendor answered, buffered so the audit stage can read its
/// envelope and the caller gets it byte for byte.
#[derive(Debug)]
pub struct Forwarded {
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    /// Only when the vendor compressed although asked not to: passed on so
    /// the caller is told how to read the body, never handed it undeclared.
    pub content_encoding: Option<HeaderValue>,
    pub body: Bytes,
    pub upstream_time: Duration,
}

/// Headers that describe the caller's connection or carry the caller's
/// credentials: never passed on. (`Host` and `Content-Length` are set anew.)
const DROPPED: [HeaderName; 14] = [
    header::AUTHORIZATION,
    header::PROXY_AUTHORIZATION,
    header::COOKIE,
    header::CONNECTION,
    header::TE,
    header::UPGRADE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::PROXY_AUTHENTICATE,
    header::HOST,
    header::CONTENT_LENGTH,
    header::EXPECT,
    // We ask for `identity` ourselves: the body must stay readable to us.
    header::ACCEPT_ENCODING,
    HeaderName::from_static("x-request-id"),
];

fn is_dropped(name: &HeaderName, connection_named: &[&str]) -> bool {
    DROPPED.contains(name)
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
        // taskgate's own request headers (`X-Taskgate-Dry-Run`) are for taskgate.
        || name.as_str().starts_with("x-taskgate-")
        || connection_named
            .iter()
            .any(|n| name.as_str().eq_ignore_ascii_case(n))
}

/// Asked of the vendor on every call: taskgate parses, redacts and passes
/// back the body, so it must be the plain one.
pub const IDENTITY: HeaderValue = HeaderValue::from_static("identity");

/// The caller's headers that may travel upstream.
pub fn upstream_headers(client: &HeaderMap, token: &Token, request_id: &str) -> HeaderMap {
    let connection_named: Vec<&str> = client
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let mut out = HeaderMap::with_capacity(client.len() + 2);
    for (name, value) in client {
        if !is_dropped(name, &connection_named) {
            out.append(name.clone(), value.clone());
        }
    }
    out.insert(header::AUTHORIZATION, token.authorization().clone());
    out.insert(header::ACCEPT_ENCODING, IDENTITY);
    if let Ok(id) = HeaderValue::from_str(request_id) {
        out.insert(HeaderName::from_static("x-request-id"), id);
    }
    out
}

/// `{base}/agent-api/user/{user_id}/task/{task_id}` from the checked ids.
pub fn task_uri(cfg: &UpstreamConfig, route: &TaskRoute) -> Result<Uri, Error> {
    upstream_uri(
        cfg,
        &format!(
            "/agent-api/user/{}/task/{}",
            route.user_id.hyphenated(),
            route.task_id.hyphenated()
        ),
    )
}

/// An absolute URI on the configured vendor for a path we built ourselves.
pub fn upstream_uri(cfg: &UpstreamConfig, path_and_query: &str) -> Result<Uri, Error> {
    Uri::builder()
        .scheme(cfg.scheme.clone())
        .authority(cfg.authority.clone())
        .path_and_query(format!("{}{}", cfg.base_path, path_and_query))
        .build()
        .map_err(|_| Error::UpstreamUnreachable {
            detail: "invalid upstream URI",
        })
}

/// The detail of a failure before any byte of the request was sent.
const CONNECT_FAILED: &str = "connect or TLS handshake failed";

/// A forward that did not end in a complete answer. `status` is the
/// vendor's, when its head arrived before the body failed or the time ran
/// out: the vendor may have applied the update, and the audit says so.
#[derive(Debug)]
pub struct SendError {
    pub error: Error,
    pub status: Option<StatusCode>,
    /// False only when the request cannot have left (connect or TLS
    /// handshake failed): then the vendor surely applied nothing.
    pub maybe_seen: bool,
}

impl From<SendError> for Error {
    fn from(e: SendError) -> Error {
        e.error
    }
}

/// Sends one request and buffers the answer, within `cfg.timeout` overall.
/// Only failures before the request could have left (connect refused, TLS
/// handshake failure) are retried: the vendor never saw those. hyper's pool
/// itself re-sends a request whose pooled connection closed before it was
/// written.
pub async fn send(
    client: &UpstreamClient,
    cfg: &UpstreamConfig,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Forwarded, SendError> {
    let started = Instant::now();
    // The vendor's status once its head arrived (0: not yet).
    let seen = std::sync::atomic::AtomicU16::new(0);
    let exchange = async {
        let mut attempt = 0;
        let resp = loop {
            let mut req = Request::new(Full::new(body.clone()));
            *req.method_mut() = method.clone();
            *req.uri_mut() = uri.clone();
            *req.headers_mut() = headers.clone();
            match client.request(req).await {
                Ok(resp) => break resp,
                Err(e) if e.is_connect() && attempt < cfg.retries => {
                    attempt += 1;
                    tracing::debug!(attempt, cause = %e, "retrying upstream connect");
                }
                Err(e) => {
                    tracing::warn!(cause = %e, connect = e.is_connect(), "upstream request failed");
                    return Err(Error::UpstreamUnreachable {
                        detail: if e.is_connect() {
                            CONNECT_FAILED
                        } else {
                            "connection failed before a complete response"
                        },
                    });
                }
            }
        };
        let (parts, body) = resp.into_parts();
        seen.store(parts.status.as_u16(), std::sync::atomic::Ordering::Relaxed);
        let body = match Limited::new(body, MAX_UPSTREAM_BODY).collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(Error::UpstreamUnreachable {
                    detail: "response too large",
                });
            }
            Err(_) => {
                return Err(Error::UpstreamUnreachable {
                    detail: "response body cut off",
                });
            }
        };
        Ok(Forwarded {
            status: parts.status,
            content_type: parts.headers.get(header::CONTENT_TYPE).cloned(),
            content_encoding: parts
                .headers
                .get(header::CONTENT_ENCODING)
                .filter(|v| !v.as_bytes().eq_ignore_ascii_case(b"identity"))
                .cloned(),
            body,
            upstream_time: started.elapsed(),
        })
    };
    let result = match tokio::time::timeout(cfg.timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(Error::UpstreamTimeout),
    };
    result.map_err(|error| SendError {
        maybe_seen: !matches!(
            error,
            Error::UpstreamUnreachable {
                detail: CONNECT_FAILED
            }
        ),
        error,
        status: StatusCode::from_u16(seen.load(std::sync::atomic::Ordering::Relaxed)).ok(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_hop_by_hop_headers_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client"),
        );
        h.insert(header::COOKIE, HeaderValue::from_static("a=b"));
        h.insert(header::PROXY_AUTHORIZATION, HeaderValue::from_static("x"));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::HOST, HeaderValue::from_static("evil.example"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert("x-request-id", HeaderValue::from_static("spoofed"));
        h.insert(header::USER_AGENT, HeaderValue::from_static("svc/1"));
        h.insert("x-taskgate-dry-run", HeaderValue::from_static("false"));
        h.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip, br"),
        );
        let token = Token::new("tok").unwrap();
        let out = upstream_headers(&h, &token, "rid-1");
        assert_eq!(out[header::AUTHORIZATION], "Bearer tok");
        assert_eq!(out["x-request-id"], "rid-1");
        assert_eq!(out[header::CONTENT_TYPE], "application/json");
        assert_eq!(out[header::USER_AGENT], "svc/1");
        assert_eq!(out[header::ACCEPT_ENCODING], "identity");
        assert_eq!(out.get_all(header::ACCEPT_ENCODING).iter().count(), 1);
        for gone in [
            "cookie",
            "proxy-authorization",
            "connection",
            "x-secret-hop",
            "keep-alive",
            "transfer-encoding",
            "host",
            "x-taskgate-dry-run",
        ] {
            assert!(!out.contains_key(gone), "{gone} must be dropped");
        }
        assert_eq!(out.get_all(header::AUTHORIZATION).iter().count(), 1);
    }
}
