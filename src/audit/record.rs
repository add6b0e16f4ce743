//! One audit record: what the pipeline supplies ([`Record`]), the line the writer
//! makes of it, and the hash chain's canonical bytes. This is the only file that
//! knows the line format; the writer and `verify` both go through it.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// `prev` of the first record of a log (seq 1): 64 zeros.
pub const GENESIS_PREV: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// The members of every line, in the order they are written (tests check it).
/// `caller` came later than the others, right after `client` (who called:
/// the peer, then the caller it authenticated as); files written before it
/// lack the member and still verify, since the hash covers the bytes as written.
#[cfg(test)]
pub(crate) const FIELD_ORDER: [&str; 19] = [
    "seq",
    "ts",
    "event",
    "request_id",
    "client",
    "caller",
    "user_id",
    "sub_user_id",
    "task_id",
    "reason",
    "note",
    "request",
    "residue",
    "upstream_status",
    "upstream_code",
    "upstream_message",
    "latency_ms",
    "prev",
    "hash",
];

/// A SHA-256 digest as 64 lowercase ASCII hex digits, the form it takes in the
/// line and in the hash input.
pub(crate) type HexHash = [u8; 64];
pub(crate) const GENESIS: HexHash = [b'0'; 64];

/// The member every line ends with: `,"hash":"<64 hex>"}`.
const HASH_MEMBER: &[u8] = b",\"hash\":\"";
const SUFFIX_LEN: usize = HASH_MEMBER.len() + 64 + 2;

/// `ts` for a clock outside the years 0 to 9999: an obviously wrong time
/// rather than a lost record.
const TS_OUT_OF_RANGE: &str = "0000-01-01T00:00:00.000Z";

/// What a record is about. Serialised lower-case (`"attempt"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Event {
    /// Written and made durable before the request is forwarded.
    Attempt,
    /// After the vendor answered or the forward failed.
    Outcome,
    /// A mutation refused before forwarding (validation, rate limit, residue, ...).
    Rejected,
}

impl Event {
    /// The serialised name, also handy as a metrics label.
    pub const fn as_str(self) -> &'static str {
        match self {
            Event::Attempt => "attempt",
            Event::Outcome => "outcome",
            Event::Rejected => "rejected",
        }
    }
}

/// What the pipeline knows about one event; the writer adds `seq`, `ts`, `prev`
/// and `hash`. Build one with [`Record::attempt`], [`Record::outcome`] or
/// [`Record::rejected`] and struct-update syntax:
/// `Record { user_id: Some(id), ..Record::attempt(request_id) }`.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub event: Event,
    pub request_id: String,
    /// Peer address of the caller (`unix:uid=N` on a Unix socket).
    pub client: Option<String>,
    /// The `name` of the `[[access.callers]]` entry whose key the request
    /// carried, with caller control on.
    pub caller: Option<String>,
    pub user_id: Option<String>,
    pub sub_user_id: Option<String>,
    pub task_id: Option<String>,
    /// Why a mutation was rejected (`rejected`), or why a forward failed (`outcome`).
    pub reason: Option<String>,
    /// Anything else the operator should know, e.g. `"residue check disabled"` or
    /// `"residue unavailable, allowed by config"` on an `attempt`.
    pub note: Option<String>,
    /// The parsed request body, when it parsed.
    pub request: Option<Value>,
    /// The `residue` the request was checked against, when it was checked.
    pub residue: Option<i64>,
    pub upstream_status: Option<u16>,
    /// `code` of the vendor's envelope, when the body was one.
    pub upstream_code: Option<i64>,
    /// `message` of the vendor's envelope, when the body was one.
    pub upstream_message: Option<String>,
    /// Time spent forwarding, in milliseconds (fractional: the budget is in µs).
    pub latency_ms: Option<f64>,
}

impl Record {
    /// A record of `event` with every optional field absent.
    pub fn new(event: Event, request_id: impl Into<String>) -> Self {
        Record {
            event,
            request_id: request_id.into(),
            client: None,
            caller: None,
            user_id: None,
            sub_user_id: None,
            task_id: None,
            reason: None,
            note: None,
            request: None,
            residue: None,
            upstream_status: None,
            upstream_code: None,
            upstream_message: None,
            latency_ms: None,
        }
    }

    pub fn attempt(request_id: impl Into<String>) -> Self {
        Self::new(Event::Attempt, request_id)
    }

    pub fn outcome(request_id: impl Into<String>) -> Self {
        Self::new(Event::Outcome, request_id)
    }

    pub fn rejected(request_id: impl Into<String>, reason: impl Into<String>) -> Self {
        Record {
            reason: Some(reason.into()),
            ..Self::new(Event::Rejected, request_id)
        }
    }
}

/// What a `rejected` record keeps of a body (`audit.rejected_request_max_bytes`):
/// the parsed body when the body is at most `max` bytes, else
/// `{"truncated": true, "bytes": <body size>, "head": "<the first bytes>"}`, so
/// a flood of large refused bodies cannot fill the disk. `head` is cut at a
/// character boundary; bytes that are not UTF-8 show as U+FFFD.
pub fn bounded_request(body: &[u8], parsed: Option<Value>, max: usize) -> Option<Value> {
    if body.len() <= max {
        return parsed;
    }
    let mut head = &body[..max];
    if let Err(e) = std::str::from_utf8(head)
        && e.error_len().is_none()
    {
        // A character cut in two at the end: leave it out.
        head = &head[..e.valid_up_to()];
    }
    Some(serde_json::json!({
        "truncated": true,
        "bytes": body.len(),
        "head": String::from_utf8_lossy(head),
    }))
}

/// The line without its `hash` member as serde would write it, in the
/// documented field order (serde serialises struct fields in declaration
/// order), absent values `null`: what [`encode_line`] must write, byte for
/// byte (a test holds it to this).
#[cfg(test)]
#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    ts: &'a str,
    event: Event,
    request_id: &'a str,
    client: Option<&'a str>,
    caller: Option<&'a str>,
    user_id: Option<&'a str>,
    sub_user_id: Option<&'a str>,
    task_id: Option<&'a str>,
    reason: Option<&'a str>,
    note: Option<&'a str>,
    request: Option<&'a Value>,
    residue: Option<i64>,
    upstream_status: Option<u16>,
    upstream_code: Option<i64>,
    upstream_message: Option<&'a str>,
    latency_ms: Option<f64>,
    prev: &'a str,
}

pub(crate) fn hex_str(h: &HexHash) -> &str {
    std::str::from_utf8(h).expect("a HexHash holds only ASCII hex digits")
}

/// `ts` for `unix_ms` (milliseconds since 1970-01-01T00:00:00Z): RFC 3339,
/// UTC, milliseconds, e.g. `2026-11-24T06:49:26.123Z`. Written by hand: the
/// `time` crate's general formatter cost ~2,700 instructions a call, this
/// a tenth of it (callgrind).
pub(crate) fn timestamp(unix_ms: i64) -> String {
    let (date, in_day) = (
        unix_ms.div_euclid(86_400_000),
        unix_ms.rem_euclid(86_400_000),
    );
    let (year, month, day) = civil_from_days(date);
    if !(0..=9999).contains(&year) {
        return TS_OUT_OF_RANGE.to_owned();
    }
    let mut out = *b"0000-00-00T00:00:00.000Z";
    let mut put = |at: usize, width: usize, mut value: i64| {
        for slot in out[at..at + width].iter_mut().rev() {
            *slot = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year);
    put(5, 2, month);
    put(8, 2, day);
    put(11, 2, in_day / 3_600_000);
    put(14, 2, in_day / 60_000 % 60);
    put(17, 2, in_day / 1000 % 60);
    put(20, 3, in_day % 1000);
    String::from_utf8_lossy(&out).into_owned()
}

/// (year, month, day) of the proleptic Gregorian calendar for a count of
/// days since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `ts` for now: formatted at most once per millisecond on each thread (under
/// load many records and access-log lines share one). The access log's `ts`
/// too, so both logs read the same clock the same way.
pub fn now_timestamp() -> String {
    thread_local! {
        // `i64::MIN` is never a time below: `ms` stays within ±i64::MAX.
        static LAST: std::cell::RefCell<(i64, String)> =
            const { std::cell::RefCell::new((i64::MIN, String::new())) };
    }
    // Before the epoch only with a clock set decades wrong; written as such,
    // rounded down to the millisecond like any other time.
    let ms = match std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        Ok(since) => i64::try_from(since.as_millis()).unwrap_or(i64::MAX),
        Err(before) => {
            let ms = before.duration().as_nanos().div_ceil(1_000_000);
            -i64::try_from(ms).unwrap_or(i64::MAX)
        }
    };
    LAST.with_borrow_mut(|(at, text)| {
        if *at != ms {
            *text = timestamp(ms);
            *at = ms;
        }
        text.clone()
    })
}

/// Appends the line for `rec` (with its trailing `\n`) to `buf` and returns its
/// hash, the next record's `prev`. On error `buf` is left as it was.
pub(crate) fn encode_line(
    buf: &mut Vec<u8>,
    seq: u64,
    ts: &str,
    rec: &Record,
    prev: &HexHash,
) -> Result<HexHash, serde_json::Error> {
    let start = buf.len();
    if let Err(e) = write_members(buf, seq, ts, rec, prev) {
        buf.truncate(start);
        return Err(e);
    }
    let hash = chain_hash(prev, &buf[start..], b"");
    // The object ends with `}`; the hash member goes in front of it, last.
    let closing = buf.pop();
    debug_assert_eq!(closing, Some(b'}'));
    buf.extend_from_slice(HASH_MEMBER);
    buf.extend_from_slice(&hash);
    buf.extend_from_slice(b"\"}\n");
    Ok(hash)
}

/// The line without its `hash` member: every member in the documented order
/// (`FIELD_ORDER`), absent values `null`, so every line has the same members
/// in the same order. Written member by member rather than through serde's
/// struct serialiser (a fifth of a request's own instructions went there);
/// strings and numbers come out exactly as serde_json writes them.
fn write_members(
    buf: &mut Vec<u8>,
    seq: u64,
    ts: &str,
    rec: &Record,
    prev: &HexHash,
) -> Result<(), serde_json::Error> {
    buf.extend_from_slice(b"{\"seq\":");
    buf.extend_from_slice(itoa::Buffer::new().format(seq).as_bytes());
    buf.extend_from_slice(b",\"ts\":");
    json_str(buf, ts)?;
    buf.extend_from_slice(b",\"event\":\"");
    buf.extend_from_slice(rec.event.as_str().as_bytes());
    buf.extend_from_slice(b"\",\"request_id\":");
    json_str(buf, &rec.request_id)?;
    for (key, value) in [
        (&b",\"client\":"[..], &rec.client),
        (b",\"caller\":", &rec.caller),
        (b",\"user_id\":", &rec.user_id),
        (b",\"sub_user_id\":", &rec.sub_user_id),
        (b",\"task_id\":", &rec.task_id),
        (b",\"reason\":", &rec.reason),
        (b",\"note\":", &rec.note),
    ] {
        buf.extend_from_slice(key);
        match value {
            Some(v) => json_str(buf, v)?,
            None => buf.extend_from_slice(b"null"),
        }
    }
    buf.extend_from_slice(b",\"request\":");
    match &rec.request {
        Some(v) => serde_json::to_writer(&mut *buf, v)?,
        None => buf.extend_from_slice(b"null"),
    }
    json_int(buf, b",\"residue\":", rec.residue);
    json_int(
        buf,
        b",\"upstream_status\":",
        rec.upstream_status.map(i64::from),
    );
    json_int(buf, b",\"upstream_code\":", rec.upstream_code);
    buf.extend_from_slice(b",\"upstream_message\":");
    match &rec.upstream_message {
        Some(v) => json_str(buf, v)?,
        None => buf.extend_from_slice(b"null"),
    }
    buf.extend_from_slice(b",\"latency_ms\":");
    match rec.latency_ms {
        // serde_json's float formatting (and `null` for a non-finite value).
        Some(ms) => serde_json::to_writer(&mut *buf, &ms)?,
        None => buf.extend_from_slice(b"null"),
    }
    buf.extend_from_slice(b",\"prev\":\"");
    buf.extend_from_slice(prev);
    buf.extend_from_slice(b"\"}");
    Ok(())
}

/// `s` as a JSON string. Most strings need no escape and are copied as they
/// are; any other goes through serde_json, so escapes read as they always did.
/// The bytes that need one are serde_json's rule (0x00–0x1F, `"`, `\`; not
/// 0x7F, `/` or any non-ASCII), which the property test below holds us to.
fn json_str(buf: &mut Vec<u8>, s: &str) -> Result<(), serde_json::Error> {
    // In chunks, each looked at whole (no early exit), which vectorises.
    let escape = s.as_bytes().chunks(16).any(|chunk| {
        chunk.iter().fold(false, |any, &b| {
            any | (b < 0x20) | (b == b'"') | (b == b'\\')
        })
    });
    if escape {
        return serde_json::to_writer(&mut *buf, s);
    }
    buf.push(b'"');
    buf.extend_from_slice(s.as_bytes());
    buf.push(b'"');
    Ok(())
}

fn json_int(buf: &mut Vec<u8>, key: &[u8], value: Option<i64>) {
    buf.extend_from_slice(key);
    match value {
        Some(n) => buf.extend_from_slice(itoa::Buffer::new().format(n).as_bytes()),
        None => buf.extend_from_slice(b"null"),
    }
}

/// hex(SHA-256(prev_hex || body || tail)); `body || tail` is the line without its
/// hash member (the verifier passes the closing `}` as `tail` to avoid a copy).
fn chain_hash(prev: &[u8], body: &[u8], tail: &[u8]) -> HexHash {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(body);
    h.update(tail);
    let mut out = [0u8; 64];
    hex::encode_to_slice(h.finalize(), &mut out)
        .expect("a 32-byte digest is exactly 64 hex digits");
    out
}

/// What one line (without its `\n`) turned out to be.
#[derive(Debug)]
pub(crate) enum Parsed {
    Record(LineInfo),
    /// Not a complete record: a torn write, or something else; says why.
    Unreadable(String),
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct LineInfo {
    pub seq: u64,
    pub prev: HexHash,
    pub hash: HexHash,
    /// Whether `hash` matches the line's contents.
    pub hash_ok: bool,
}

fn is_lower_hex(b: &u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'f')
}

pub(crate) fn parse_line(line: &[u8]) -> Parsed {
    if line.len() <= SUFFIX_LEN {
        return Parsed::Unreadable("too short to be a record".into());
    }
    let (body, suffix) = line.split_at(line.len() - SUFFIX_LEN);
    let (member, rest) = suffix.split_at(HASH_MEMBER.len());
    let (digits, close) = rest.split_at(64);
    if member != HASH_MEMBER || close != b"\"}" || !digits.iter().all(is_lower_hex) {
        return Parsed::Unreadable("does not end with the `hash` member".into());
    }

    // The whole line must be one JSON object; serde rejects duplicate `seq`/`prev`.
    #[derive(Deserialize)]
    struct Head {
        seq: u64,
        prev: String,
    }
    let head: Head = match serde_json::from_slice(line) {
        Ok(h) => h,
        Err(e) => return Parsed::Unreadable(format!("not JSON: {e}")),
    };
    let prev: HexHash = match <HexHash>::try_from(head.prev.as_bytes()) {
        Ok(p) if p.iter().all(is_lower_hex) => p,
        _ => return Parsed::Unreadable("`prev` is not 64 lowercase hex digits".into()),
    };
    let hash: HexHash = digits.try_into().expect("split_at(64) gave 64 bytes");
    let hash_ok = chain_hash(&prev, body, b"}") == hash;
    Parsed::Record(LineInfo {
        seq: head.seq,
        prev,
        hash,
        hash_ok,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn line_for(rec: &Record, seq: u64, prev: &HexHash) -> (Vec<u8>, HexHash) {
        let mut buf = Vec::new();
        let hash = encode_line(&mut buf, seq, "2026-11-24T06:49:26.123Z", rec, prev).unwrap();
        (buf, hash)
    }

    #[test]
    fn line_has_fixed_member_order_nulls_and_hash_last() {
        let rec = Record {
            user_id: Some("u1".into()),
            request: Some(json!({"name": "x\ny", "maximumcall": 3})),
            latency_ms: Some(1.5),
            ..Record::attempt("req-1")
        };
        let (line, hash) = line_for(&rec, 1, &GENESIS);
        let text = std::str::from_utf8(&line).unwrap();
        assert!(text.ends_with(&format!(",\"hash\":\"{}\"}}\n", hex_str(&hash))));
        assert_eq!(text.matches('\n').count(), 1, "control chars are escaped");
        let keys = FIELD_ORDER;
        let mut at = 0;
        for k in keys {
            let pos = text[at..]
                .find(&format!("\"{k}\":"))
                .unwrap_or_else(|| panic!("{k}"));
            at += pos;
        }
        assert!(
            text.starts_with(
                "{\"seq\":1,\"ts\":\"2026-11-24T06:49:26.123Z\",\"event\":\"attempt\""
            )
        );
        assert!(text.contains("\"client\":null,\"caller\":null,"));
        assert!(text.contains(&format!("\"prev\":\"{GENESIS_PREV}\"")));
    }

    /// What serde writes for the same record, the line format as it always was.
    fn serde_line(rec: &Record, seq: u64, ts: &str, prev: &HexHash) -> Vec<u8> {
        serde_json::to_vec(&Line {
            seq,
            ts,
            event: rec.event,
            request_id: &rec.request_id,
            client: rec.client.as_deref(),
            caller: rec.caller.as_deref(),
            user_id: rec.user_id.as_deref(),
            sub_user_id: rec.sub_user_id.as_deref(),
            task_id: rec.task_id.as_deref(),
            reason: rec.reason.as_deref(),
            note: rec.note.as_deref(),
            request: rec.request.as_ref(),
            residue: rec.residue,
            upstream_status: rec.upstream_status,
            upstream_code: rec.upstream_code,
            upstream_message: rec.upstream_message.as_deref(),
            latency_ms: rec.latency_ms,
            prev: hex_str(prev),
        })
        .unwrap()
    }

    fn any_text() -> impl proptest::strategy::Strategy<Value = Option<String>> {
        proptest::option::of(
            proptest::string::string_regex("(.|[\\x00-\\x1f\"\\\\/é任\u{2028}])*").unwrap(),
        )
    }

    proptest::proptest! {
        #[test]
        fn lines_are_byte_for_byte_what_serde_wrote(
            event in proptest::sample::select(vec![Event::Attempt, Event::Outcome, Event::Rejected]),
            seq in proptest::prelude::any::<u64>(),
            request_id in any_text(),
            texts in proptest::collection::vec(any_text(), 8),
            numbers in proptest::collection::vec(proptest::option::of(proptest::prelude::any::<i64>()), 2),
            status in proptest::option::of(proptest::prelude::any::<u16>()),
            latency in proptest::option::of(proptest::prelude::any::<f64>()),
            with_request in proptest::prelude::any::<bool>(),
        ) {
            let rec = Record {
                client: texts[0].clone(),
                caller: texts[1].clone(),
                user_id: texts[2].clone(),
                sub_user_id: texts[3].clone(),
                task_id: texts[4].clone(),
                reason: texts[5].clone(),
                note: texts[6].clone(),
                request: with_request.then(|| json!({"name": texts[7], "maximumcall": numbers[0]})),
                residue: numbers[0],
                upstream_status: status,
                upstream_code: numbers[1],
                upstream_message: texts[7].clone(),
                latency_ms: latency,
                ..Record::new(event, request_id.unwrap_or_default())
            };
            let prev = [b'7'; 64];
            let ts = "2026-11-24T06:49:26.123Z";
            let mut line = Vec::new();
            let hash = encode_line(&mut line, seq, ts, &rec, &prev).unwrap();
            let expected = serde_line(&rec, seq, ts, &prev);
            let body = &line[..line.len() - 1 - SUFFIX_LEN];
            proptest::prop_assert_eq!(
                [body, b"}"].concat(),
                expected.clone(),
                "{}", String::from_utf8_lossy(&line)
            );
            proptest::prop_assert_eq!(hash, chain_hash(&prev, &expected, b""));
        }
    }

    #[test]
    fn hash_is_sha256_of_prev_and_line_without_hash_member() {
        let (line, hash) = line_for(&Record::outcome("r"), 7, &[b'a'; 64]);
        let line = &line[..line.len() - 1];
        let without = [&line[..line.len() - SUFFIX_LEN], b"}"].concat();
        let mut input = vec![b'a'; 64];
        input.extend_from_slice(&without);
        assert_eq!(hex::encode(Sha256::digest(&input)).as_bytes(), &hash);
        match parse_line(line) {
            Parsed::Record(info) => {
                assert_eq!(info.seq, 7);
                assert!(info.hash_ok);
                assert_eq!(info.hash, hash);
                assert_eq!(info.prev, [b'a'; 64]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn parse_classifies_torn_and_edited_lines() {
        let (line, _) = line_for(&Record::rejected("r", "rate_limited"), 2, &GENESIS);
        let line = &line[..line.len() - 1];
        assert!(matches!(parse_line(&line[..40]), Parsed::Unreadable(_)));
        assert!(matches!(parse_line(b""), Parsed::Unreadable(_)));
        let edited = String::from_utf8(line.to_vec())
            .unwrap()
            .replace("rate_limited", "rate_limitex");
        match parse_line(edited.as_bytes()) {
            Parsed::Record(info) => assert!(!info.hash_ok),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn large_refused_bodies_keep_only_their_head() {
        let small = json!({"a": 1});
        assert_eq!(
            bounded_request(b"{\"a\": 1}", Some(small.clone()), 64),
            Some(small)
        );
        assert_eq!(bounded_request(b"nope", None, 64), None);
        let big = format!("{{\"name\": \"{}\"}}", "é".repeat(100));
        let kept = bounded_request(big.as_bytes(), Some(json!({})), 64).unwrap();
        assert_eq!(kept["truncated"], true);
        assert_eq!(kept["bytes"], big.len());
        let head = kept["head"].as_str().unwrap();
        assert!(head.len() <= 64 && big.starts_with(head), "{head}");
        assert!(!head.contains('\u{fffd}'), "a split character is left out");
    }

    proptest::proptest! {
        /// The hand-written `ts` is what the `time` crate's formatter wrote.
        #[test]
        fn timestamps_are_what_the_time_crate_wrote(ms in -62_167_219_200_000i64..253_402_300_800_000) {
            use time::macros::format_description;
            let at = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000).unwrap();
            let expected = at
                .format(format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"))
                .unwrap();
            proptest::prop_assert_eq!(timestamp(ms), expected);
        }
    }

    #[test]
    fn timestamp_is_rfc3339_utc_millis() {
        let t = time::macros::datetime!(2026-11-24 06:49:26.123456 UTC);
        let ms = (t.unix_timestamp_nanos() / 1_000_000) as i64;
        assert_eq!(timestamp(ms), "2026-11-24T06:49:26.123Z");
        assert_eq!(timestamp(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(
            timestamp(253_402_300_800_000),
            TS_OUT_OF_RANGE,
            "year 10000"
        );
        assert_eq!(
            timestamp(-62_167_219_200_001),
            TS_OUT_OF_RANGE,
            "before year 0"
        );
        let ts = now_timestamp();
        assert_eq!(ts.len(), 24, "{ts}");
        assert!(ts.ends_with('Z') && ts.as_bytes()[10] == b'T' && ts.as_bytes()[19] == b'.');
    }
}
