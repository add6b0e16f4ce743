//! Body stage: media type, size limit, one JSON object. Runs before anything
//! looks at the content, so later stages only ever see a parsed object.

use bytes::Bytes;
use http::{HeaderMap, header};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use serde_json::{Map, Value};

use crate::error::Error;

/// The caller's bytes (forwarded unchanged) and their parse.
pub struct JsonBody {
    pub bytes: Bytes,
    pub object: Map<String, Value>,
}

/// `application/json`, parameters such as `charset` allowed, any case.
pub fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"))
}

/// Reads at most `max` bytes. A declared `Content-Length` over the limit is
/// refused before a byte of the body is read; a chunked body is cut off as
/// soon as it passes the limit.
pub async fn read(headers: &HeaderMap, body: Incoming, max: usize) -> Result<JsonBody, Error> {
    if !is_json(headers) {
        return Err(Error::UnsupportedMediaType);
    }
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return Err(Error::PayloadTooLarge { limit: max });
    }
    let bytes = match Limited::new(body, max).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(Error::PayloadTooLarge { limit: max });
        }
        Err(_) => return Err(Error::BodyIncomplete),
    };
    let object = parse_object(&bytes)?;
    Ok(JsonBody { bytes, object })
}

/// Exactly one JSON object (surrounding whitespace allowed). serde_json's
/// recursion limit keeps deeply nested input from exhausting the stack.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, Error> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(Error::InvalidJson {
            detail: "the body must be a JSON object".into(),
        }),
        Err(e) => Err(Error::InvalidJson {
            detail: e.to_string(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ct(v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, http::HeaderValue::from_static(v));
        h
    }

    #[test]
    fn media_types() {
        assert!(is_json(&ct("application/json")));
        assert!(is_json(&ct("application/json; charset=utf-8")));
        assert!(is_json(&ct("Application/JSON;charset=UTF-8")));
        assert!(!is_json(&ct("text/plain")));
        assert!(!is_json(&ct("application/jsonx")));
        assert!(!is_json(&ct("application/x-www-form-urlencoded")));
        assert!(!is_json(&HeaderMap::new()));
    }

    #[test]
    fn objects_only() {
        assert!(parse_object(b" {\"a\":1} \n").is_ok());
        for bad in [
            &b"[]"[..],
            b"1",
            b"\"x\"",
            b"null",
            b"{",
            b"{} {}",
            b"",
            b"\xff",
        ] {
            assert!(matches!(parse_object(bad), Err(Error::InvalidJson { .. })));
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = "[".repeat(100_000);
        let body = format!("{{\"a\":{deep}");
        assert!(parse_object(body.as_bytes()).is_err());
    }
}
