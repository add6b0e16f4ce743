//! Raw HTTP/1.1 responses as they came off a TCP stream, for tests that
//! write requests no well-behaved client would send.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

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

/// What one raw connection got back.
pub struct Exchange {
    pub bytes: Vec<u8>,
    pub responses: Vec<RawResponse>,
    /// The read side ended (EOF or an error) before the deadline.
    pub closed: bool,
    /// The error that ended the read side, if it was not a clean EOF.
    pub error: Option<std::io::Error>,
    /// From `started` (see [`read_back`]) to the end of reading.
    pub elapsed: Duration,
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("text", &String::from_utf8_lossy(&self.bytes))
            .field("closed", &self.closed)
            .field("error", &self.error)
            .field("elapsed", &self.elapsed)
            .finish()
    }
}

impl Exchange {
    /// The only response; panics with the whole exchange otherwise.
    pub fn one(&self) -> &RawResponse {
        assert_eq!(self.responses.len(), 1, "expected one response: {self:?}");
        &self.responses[0]
    }

    pub fn statuses(&self) -> Vec<u16> {
        self.responses.iter().map(|r| r.status).collect()
    }
}

/// When to stop reading.
#[derive(Debug, Clone, Copy)]
pub enum Until {
    /// This many complete final (non-1xx) responses, or the end of the stream.
    Responses(usize),
    /// The end of the stream (EOF or an error).
    Closed,
}

/// Reads until `until`, or for at most `within` from `started` (then returns
/// what it has, `closed` false).
pub async fn read_back(
    r: &mut (impl AsyncRead + Unpin),
    until: Until,
    started: Instant,
    within: Duration,
) -> Exchange {
    let deadline = started + within;
    let mut bytes = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut error = None;
    let closed = loop {
        if let Until::Responses(n) = until
            && parse_responses(&bytes)
                .iter()
                .filter(|r| r.complete && r.status >= 200)
                .count()
                >= n
        {
            break false;
        }
        match tokio::time::timeout_at(deadline, r.read(&mut buf)).await {
            Err(_) => break false,
            Ok(Ok(0)) => break true,
            Ok(Err(e)) => {
                error = Some(e);
                break true;
            }
            Ok(Ok(n)) => bytes.extend_from_slice(&buf[..n]),
        }
    };
    Exchange {
        responses: parse_responses(&bytes),
        bytes,
        closed,
        error,
        elapsed: started.elapsed(),
    }
}

/// Writes `request` on a fresh connection and reads what comes back, for at
/// most `within` from the connect.
pub async fn raw(addr: SocketAddr, request: &[u8], until: Until, within: Duration) -> Exchange {
    let started = Instant::now();
    let mut s = TcpStream::connect(addr).await.expect("connect to gateway");
    // The gateway may answer and close before it has read everything; what
    // it answered is what counts.
    let _ = s.write_all(request).await;
    read_back(&mut s, until, started, within).await
}
