//! The request error: every answer taskgate produces itself, and the one
//! place where an error becomes a status, a reason and the vendor's envelope.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde::Serialize;

/// One field that broke a validation rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no such route")]
    NotFound,
    #[error("method not allowed; use PUT")]
    MethodNotAllowed,
    #[error("Content-Type must be application/json")]
    UnsupportedMediaType,
    #[error("request body larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("request body is not one JSON object: {detail}")]
    InvalidJson { detail: String },
    #[error("request body could not be read completely")]
    BodyIncomplete,
    #[error("request body did not arrive in time")]
    RequestTimeout,
    #[error("ambiguous request framing: {detail}")]
    InvalidFraming { detail: &'static str },
    #[error("request body failed validation")]
    ValidationFailed(Vec<FieldError>),
    #[error("caller_line_id {line} is not one of the user's caller lines")]
    UnknownCallerLine { line: String },
    #[error("maximumcall {maximumcall} exceeds the residue {residue} of caller line {line}")]
    ResidueExceeded {
        maximumcall: i64,
        residue: i64,
        line: String,
    },
    #[error("rate limit reached; retry after {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("the caller line list could not be read from the vendor")]
    ResidueUnavailable,
    #[error("the audit record could not be made durable; nothing was forwarded")]
    AuditUnavailable,
    #[error("too many requests in flight")]
    Overloaded,
    #[error("the vendor could not be reached: {detail}")]
    UpstreamUnreachable { detail: &'static str },
    #[error("the vendor did not answer in time")]
    UpstreamTimeout,
    #[error("internal error")]
    Internal,
    #[error("the caller closed the connection before the update was forwarded")]
    ClientClosed,
    #[error(
        "the shared state (Redis) cannot be reached and shared.on_unavailable = reject; nothing was forwarded"
    )]
    SharedStateUnavailable,
    #[error("a known caller key is required (Authorization: Bearer <key>)")]
    Unauthorized,
    #[error("forbidden: {detail}")]
    Forbidden { detail: &'static str },
    #[error("header {header} must be {expected}")]
    InvalidHeader {
        header: &'static str,
        expected: &'static str,
    },
}

impl Error {
    pub fn status(&self) -> StatusCode {
        match self {
            Error::NotFound => StatusCode::NOT_FOUND,
            Error::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Error::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Error::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::InvalidJson { .. } | Error::BodyIncomplete => StatusCode::BAD_REQUEST,
            Error::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Error::InvalidFraming { .. } => StatusCode::BAD_REQUEST,
            Error::ValidationFailed(_) | Error::UnknownCallerLine { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Error::ResidueExceeded { .. } => StatusCode::CONFLICT,
            Error::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Error::ResidueUnavailable
            | Error::AuditUnavailable
            | Error::Overloaded
            | Error::SharedStateUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Error::UpstreamUnreachable { .. } => StatusCode::BAD_GATEWAY,
            Error::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Error::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            // NGINX's convention; nobody is left to read it but the logs.
            Error::ClientClosed => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
            Error::Unauthorized => StatusCode::UNAUTHORIZED,
            Error::Forbidden { .. } => StatusCode::FORBIDDEN,
            Error::InvalidHeader { .. } => StatusCode::BAD_REQUEST,
        }
    }

    /// The `data.reason` of the envelope; also the access log's `reason`.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::NotFound => "not_found",
            Error::MethodNotAllowed => "method_not_allowed",
            Error::UnsupportedMediaType => "unsupported_media_type",
            Error::PayloadTooLarge { .. } => "payload_too_large",
            Error::InvalidJson { .. } | Error::BodyIncomplete => "invalid_json",
            Error::RequestTimeout => "request_timeout",
            Error::InvalidFraming { .. } => "invalid_framing",
            Error::ValidationFailed(_) => "validation_failed",
            Error::UnknownCallerLine { .. } => "unknown_caller_line",
            Error::ResidueExceeded { .. } => "residue_exceeded",
            Error::RateLimited { .. } => "rate_limited",
            Error::ResidueUnavailable => "residue_unavailable",
            Error::AuditUnavailable => "audit_unavailable",
            Error::Overloaded => "overloaded",
            Error::UpstreamUnreachable { .. } => "upstream_unreachable",
            Error::UpstreamTimeout => "upstream_timeout",
            Error::Internal => "internal_error",
            Error::ClientClosed => "client_closed",
            Error::SharedStateUnavailable => "shared_state_unavailable",
            Error::Unauthorized => "unauthorized",
            Error::Forbidden { .. } => "forbidden",
            Error::InvalidHeader { .. } => "invalid_header",
        }
    }

    /// The response in the vendor's envelope, with the headers each error
    /// owes the caller (`Allow`, `Retry-After`, `WWW-Authenticate`). `X-Request-Id` is added by
    /// the pipeline for every response alike.
    pub fn into_response(self) -> Response<Full<Bytes>> {
        let status = self.status();
        let message = self.to_string();
        let errors = match &self {
            Error::ValidationFailed(errors) => Some(errors.as_slice()),
            _ => None,
        };
        let body = Envelope {
            code: status.as_u16(),
            status: "error",
            message: &message,
            data: Data {
                reason: self.reason(),
                errors,
            },
        };
        let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        let mut resp = Response::new(Full::new(Bytes::from(bytes)));
        *resp.status_mut() = status;
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self {
            Error::MethodNotAllowed => {
                h.insert(header::ALLOW, HeaderValue::from_static("PUT"));
            }
            Error::RateLimited { retry_after_secs } => {
                h.insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_secs.max(1)),
                );
            }
            // RFC 9110 §15.5.2: a 401 says how to authenticate.
            Error::Unauthorized => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"taskgate\""),
                );
            }
            // The rest of the request cannot be trusted (framing) or is still
            // arriving (timeout): answer, then close the connection.
            Error::InvalidFraming { .. } | Error::RequestTimeout => {
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}

#[derive(Serialize)]
struct Envelope<'a> {
    code: u16,
    status: &'static str,
    message: &'a str,
    data: Data<'a>,
}

#[derive(Serialize)]
struct Data<'a> {
    reason: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<&'a [FieldError]>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn body_of(e: Error) -> (StatusCode, http::HeaderMap, serde_json::Value) {
        let resp = e.into_response();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = futures_body(resp.into_body());
        (status, headers, serde_json::from_slice(&bytes).unwrap())
    }

    fn futures_body(b: Full<Bytes>) -> Bytes {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(async { b.collect().await.unwrap().to_bytes() })
    }

    #[test]
    fn every_variant_maps_to_its_status_and_reason() {
        let cases: Vec<(Error, u16, &str)> = vec![
            (Error::NotFound, 404, "not_found"),
            (Error::MethodNotAllowed, 405, "method_not_allowed"),
            (Error::UnsupportedMediaType, 415, "unsupported_media_type"),
            (
                Error::PayloadTooLarge { limit: 1 },
                413,
                "payload_too_large",
            ),
            (
                Error::InvalidJson { detail: "x".into() },
                400,
                "invalid_json",
            ),
            (Error::BodyIncomplete, 400, "invalid_json"),
            (Error::RequestTimeout, 408, "request_timeout"),
            (
                Error::InvalidFraming { detail: "x" },
                400,
                "invalid_framing",
            ),
            (Error::ValidationFailed(vec![]), 422, "validation_failed"),
            (
                Error::UnknownCallerLine { line: "l".into() },
                422,
                "unknown_caller_line",
            ),
            (
                Error::ResidueExceeded {
                    maximumcall: 5,
                    residue: 3,
                    line: "l".into(),
                },
                409,
                "residue_exceeded",
            ),
            (
                Error::RateLimited {
                    retry_after_secs: 2,
                },
                429,
                "rate_limited",
            ),
            (Error::ResidueUnavailable, 503, "residue_unavailable"),
            (Error::AuditUnavailable, 503, "audit_unavailable"),
            (Error::Overloaded, 503, "overloaded"),
            (
                Error::UpstreamUnreachable { detail: "x" },
                502,
                "upstream_unreachable",
            ),
            (Error::UpstreamTimeout, 504, "upstream_timeout"),
            (Error::Internal, 500, "internal_error"),
            (Error::ClientClosed, 499, "client_closed"),
            (
                Error::SharedStateUnavailable,
                503,
                "shared_state_unavailable",
            ),
            (Error::Unauthorized, 401, "unauthorized"),
            (Error::Forbidden { detail: "x" }, 403, "forbidden"),
            (
                Error::InvalidHeader {
                    header: "X-Taskgate-Dry-Run",
                    expected: "true, 1, false or 0",
                },
                400,
                "invalid_header",
            ),
        ];
        for (err, status, reason) in cases {
            let (s, _, v) = body_of(err);
            assert_eq!(s.as_u16(), status);
            assert_eq!(v["code"], status);
            assert_eq!(v["status"], "error");
            assert_eq!(v["data"]["reason"], reason);
            assert!(v["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
    }

    #[test]
    fn error_specific_headers_and_fields() {
        let (_, h, _) = body_of(Error::MethodNotAllowed);
        assert_eq!(h["allow"], "PUT");
        let (_, h, _) = body_of(Error::InvalidFraming { detail: "x" });
        assert_eq!(h["connection"], "close");
        let (_, h, _) = body_of(Error::RequestTimeout);
        assert_eq!(h["connection"], "close");
        let (_, h, _) = body_of(Error::RateLimited {
            retry_after_secs: 0,
        });
        assert_eq!(h["retry-after"], "1");
        let (_, h, _) = body_of(Error::Unauthorized);
        assert_eq!(h["www-authenticate"], "Bearer realm=\"taskgate\"");
        let (_, h, v) = body_of(Error::InvalidHeader {
            header: "X-Taskgate-Dry-Run",
            expected: "true, 1, false or 0",
        });
        assert!(h.get("www-authenticate").is_none());
        assert!(
            v["message"]
                .as_str()
                .unwrap()
                .contains("X-Taskgate-Dry-Run")
        );
        let (_, _, v) = body_of(Error::ResidueExceeded {
            maximumcall: 5,
            residue: 3,
            line: "l".into(),
        });
        let m = v["message"].as_str().unwrap();
        assert!(m.contains('5') && m.contains('3'), "{m}");
        let (_, _, v) = body_of(Error::ValidationFailed(vec![FieldError {
            field: "maximumcall".into(),
            message: "must be an integer >= 1".into(),
        }]));
        assert_eq!(v["data"]["errors"][0]["field"], "maximumcall");
    }
}
