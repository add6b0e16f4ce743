//! Dry run (DESIGN.md "Dry run"): the `X-Taskgate-Dry-Run` header, and the
//! answer a dry run gets once every check has passed, instead of being
//! forwarded.

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, header};
use http_body_util::Full;
use serde::Serialize;

use crate::error::Error;

pub const HEADER: HeaderName = HeaderName::from_static("x-taskgate-dry-run");

/// Whether the request asks for a dry run: `true` or `1` yes, `false`, `0`
/// or no header no; any other value, or the header twice, is 400
/// `invalid_header` (a caller that meant a dry run must never get a real
/// update by a typo).
pub fn requested(headers: &HeaderMap) -> Result<bool, Error> {
    let mut values = headers.get_all(&HEADER).iter();
    let Some(value) = values.next() else {
        return Ok(false);
    };
    let invalid = Error::InvalidHeader {
        header: "X-Taskgate-Dry-Run",
        expected: "one of true, 1, false, 0 (sent once)",
    };
    if values.next().is_some() {
        return Err(invalid);
    }
    match value.as_bytes() {
        b"true" | b"1" => Ok(true),
        b"false" | b"0" => Ok(false),
        _ => Err(invalid),
    }
}

#[derive(Serialize)]
struct Envelope {
    code: u16,
    status: &'static str,
    message: &'static str,
    data: Data,
}

#[derive(Serialize)]
struct Data {
    dry_run: bool,
    /// The residue checked against; `null` with the rule off or its list
    /// unavailable under `on_unavailable = "allow"`.
    residue: Option<i64>,
    maximumcall: i64,
}

/// 200 in the vendor's envelope: the update would have been forwarded.
pub fn answer(residue: Option<i64>, maximumcall: i64) -> Response<Full<Bytes>> {
    let body = Envelope {
        code: 200,
        status: "success",
        message: "dry run: the update would be forwarded",
        data: Data {
            dry_run: true,
            residue,
            maximumcall,
        },
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(bytes)));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn with(values: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(HEADER, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_the_four_values_are_known() {
        assert!(!requested(&HeaderMap::new()).unwrap());
        assert!(requested(&with(&["true"])).unwrap());
        assert!(requested(&with(&["1"])).unwrap());
        assert!(!requested(&with(&["false"])).unwrap());
        assert!(!requested(&with(&["0"])).unwrap());
        for bad in [
            &["maybe"][..],
            &["TRUE"],
            &["yes"],
            &[""],
            &["true", "true"],
        ] {
            let err = requested(&with(bad)).unwrap_err();
            assert_eq!(err.reason(), "invalid_header", "{bad:?}");
        }
    }

    #[test]
    fn the_answer_is_the_documented_envelope() {
        let resp = answer(Some(5), 3);
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
        let body = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(resp.into_body().collect())
            .unwrap()
            .to_bytes();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"code":200,"status":"success","message":"dry run: the update would be forwarded","data":{"dry_run":true,"residue":5,"maximumcall":3}}"#
        );
        let resp = answer(None, 3);
        let body = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(resp.into_body().collect())
            .unwrap()
            .to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert!(v["data"]["residue"].is_null());
    }
}
