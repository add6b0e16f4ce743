//! Body stage: framing, media type (and charset), size limit, one JSON
//! object. Runs before anything looks at the content, so later stages only
//! ever see a parsed object.

use std::fmt;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, header};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

use crate::error::Error;

/// Refuses a request whose body framing is ambiguous (RFC 9112 §6.3): both
/// `Content-Length` and `Transfer-Encoding`, or a transfer coding other than
/// a lone `chunked`. hyper would pick one reading; the vendor (or a proxy on
/// the way) might pick the other, so nothing of it becomes a mutation.
/// `raw_head_ambiguous`: the connection saw both headers in the raw head
/// (hyper drops the `Content-Length` of such a request before we see it).
pub fn check_head(headers: &HeaderMap, raw_head_ambiguous: bool) -> Result<(), Error> {
    if raw_head_ambiguous {
        return Err(Error::InvalidFraming {
            detail: "both Content-Length and Transfer-Encoding",
        });
    }
    let mut codings = headers.get_all(header::TRANSFER_ENCODING).iter().peekable();
    if codings.peek().is_none() {
        return Ok(());
    }
    if headers.contains_key(header::CONTENT_LENGTH) {
        return Err(Error::InvalidFraming {
            detail: "both Content-Length and Transfer-Encoding",
        });
    }
    let mut tokens = codings
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty());
    match (tokens.next(), tokens.next()) {
        (Some(only), None) if only.eq_ignore_ascii_case(b"chunked") => Ok(()),
        _ => Err(Error::InvalidFraming {
            detail: "Transfer-Encoding other than chunked",
        }),
    }
}

/// `application/json`, any case, with no `charset` or a UTF-8 one: the
/// vendor reads JSON as UTF-8, so the bytes checked here must be read that
/// way too. Other parameters are ignored.
pub fn is_json(headers: &HeaderMap) -> bool {
    let Some(value) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let mut parts = value.split(';');
    let mime_ok = parts
        .next()
        .is_some_and(|mime| mime.trim().eq_ignore_ascii_case("application/json"));
    mime_ok
        && parts.all(|param| {
            let (name, value) = param.split_once('=').unwrap_or((param, ""));
            if !name.trim().eq_ignore_ascii_case("charset") {
                return true;
            }
            let value = value.trim();
            let value = value
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(value);
            value.eq_ignore_ascii_case("utf-8") || value.eq_ignore_ascii_case("utf8")
        })
}

/// A JSON-typed body whose declared `Content-Length` (if any) is within
/// `max`: refused before a byte of the body is read (415/413).
pub fn check_declared(headers: &HeaderMap, max: usize) -> Result<(), Error> {
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
    Ok(())
}

/// Reads at most `max` bytes of the body; a chunked body is cut off as soon
/// as it passes the limit (413). A body that comes in one piece (the usual
/// case) is kept as it came; pieces after the first are copied into one
/// buffer as they arrive, so a body trickled a byte at a time holds neither
/// a list of tiny chunks nor the read buffers they point into.
pub async fn read(mut body: Incoming, max: usize) -> Result<Bytes, Error> {
    let mut first: Option<Bytes> = None;
    let mut rest: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|_| Error::BodyIncomplete)?;
        // Trailers carry nothing a task update needs.
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let held = first.as_ref().map_or(0, Bytes::len) + rest.len();
        if held + data.len() > max {
            return Err(Error::PayloadTooLarge { limit: max });
        }
        if held == 0 {
            first = Some(data);
            continue;
        }
        if let Some(f) = first.take() {
            rest.extend_from_slice(&f);
        }
        rest.extend_from_slice(&data);
    }
    Ok(match first {
        Some(f) => f,
        None => Bytes::from(rest),
    })
}

/// `headers` copied into memory of their own. hyper's header values are
/// slices of the connection's read buffer; while a request holds them,
/// the body's next read cannot reuse that buffer and takes a new one, so a
/// slow sender would hold both (~24 KiB instead of ~16).
pub fn detach(headers: &HeaderMap) -> HeaderMap {
    let mut out = HeaderMap::with_capacity(headers.len());
    for (name, value) in headers {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_str().as_bytes()),
            HeaderValue::from_bytes(value.as_bytes()),
        ) {
            out.append(name, value);
        }
    }
    out
}

/// Exactly one JSON object (surrounding whitespace allowed) with no repeated
/// top-level key: we forward the caller's bytes, so `{"maximumcall":1,
/// "maximumcall":900}` would have us check one value while the vendor might
/// act on the other. serde_json's recursion limit (128) keeps deeply nested
/// input from exhausting the stack.
pub fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, Error> {
    serde_json::from_slice::<UniqueKeyObject>(bytes)
        .map(|object| object.0)
        .map_err(|e| Error::InvalidJson {
            detail: e.to_string(),
        })
}

/// A top-level JSON object whose keys are pairwise distinct (after unescaping).
struct UniqueKeyObject(Map<String, Value>);

impl<'de> Deserialize<'de> for UniqueKeyObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(UniqueKeyVisitor)
    }
}

struct UniqueKeyVisitor;

impl<'de> Visitor<'de> for UniqueKeyVisitor {
    type Value = UniqueKeyObject;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object without duplicate keys")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                return Err(de::Error::custom("duplicate key"));
            }
            let value: Value = access.next_value()?;
            map.insert(key, value);
        }
        Ok(UniqueKeyObject(map))
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

    fn with(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, http::HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn ambiguous_framing_is_refused() {
        assert!(check_head(&HeaderMap::new(), false).is_ok());
        assert!(matches!(
            check_head(&HeaderMap::new(), true),
            Err(Error::InvalidFraming { .. })
        ));
        assert!(check_head(&with(&[("content-length", "3")]), false).is_ok());
        assert!(check_head(&with(&[("transfer-encoding", "chunked")]), false).is_ok());
        assert!(check_head(&with(&[("transfer-encoding", " Chunked ")]), false).is_ok());
        for bad in [
            &[("content-length", "3"), ("transfer-encoding", "chunked")][..],
            &[("transfer-encoding", "gzip, chunked")],
            &[
                ("transfer-encoding", "gzip"),
                ("transfer-encoding", "chunked"),
            ],
            &[("transfer-encoding", "chunked, chunked")],
            &[("transfer-encoding", "identity")],
            &[("transfer-encoding", "")],
        ] {
            assert!(
                matches!(
                    check_head(&with(bad), false),
                    Err(Error::InvalidFraming { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn media_types() {
        assert!(is_json(&ct("application/json")));
        assert!(is_json(&ct("application/json; charset=utf-8")));
        assert!(is_json(&ct("Application/JSON;charset=UTF-8")));
        assert!(is_json(&ct("application/json; charset=\"utf-8\"")));
        assert!(is_json(&ct("application/json; foo=bar")));
        assert!(!is_json(&ct("application/json; charset=gbk")));
        assert!(!is_json(&ct("application/json; charset=iso-8859-1")));
        assert!(!is_json(&ct("application/json; charset=")));
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
    fn duplicate_keys_are_refused_even_when_escaped() {
        assert!(parse_object(br#"{"maximumcall":1,"maximumcall":900}"#).is_err());
        assert!(parse_object(br#"{"maximumcall":1,"maximumcal\u006c":900}"#).is_err());
        assert!(
            parse_object(br#"{"x":{"a":1,"a":2}}"#).is_ok(),
            "nested objects are not the contract's concern"
        );
        for bad in [
            &b"\xef\xbb\xbf{}"[..],
            b"{\"a\":\"\xff\"}",
            b"{\"a\":\"\\ud800\"}",
            b"{\"a\":NaN}",
            b"{}x",
        ] {
            assert!(
                parse_object(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let objects = "{\"a\":".repeat(100_000);
        assert!(parse_object(objects.as_bytes()).is_err());
        let deep = "[".repeat(100_000);
        let body = format!("{{\"a\":{deep}");
        assert!(parse_object(body.as_bytes()).is_err());
    }
}
