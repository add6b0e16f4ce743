//! Raw HTTP/1.1 responses as they came off a TCP stream, for tests that
//! write requests no well-behaved client would send.

use serde_json::Value;

/// One response as it came off the wire.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The whole body its Content-Length declared arrived.
    pub complete: bool,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// `data.reason` of a taskgate envelope; empty when the body is not one.
    pub fn reason(&self) -> String {
        serde_json::from_slice::<Value>(&self.body)
            .ok()
            .and_then(|v| v["data"]["reason"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Splits what a connection returned into responses (taskgate frames its
/// answers with Content-Length; 1xx has no body).
pub fn parse_responses(mut bytes: &[u8]) -> Vec<RawResponse> {
    let mut out = Vec::new();
    while let Some(end) = find(bytes, b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&bytes[..end]).into_owned();
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let rest = &bytes[end + 4..];
        let declared = if (100..200).contains(&status) {
            Some(0)
        } else {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.parse::<usize>().ok())
        };
        let len = declared.unwrap_or(rest.len()).min(rest.len());
        out.push(RawResponse {
            status,
            headers,
            body: rest[..len].to_vec(),
            complete: declared.is_some_and(|d| d == len),
        });
        bytes = &rest[len..];
    }
    out
}
