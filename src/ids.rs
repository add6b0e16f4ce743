//! Identifiers taken from the request: canonical UUIDs and the request id.

use http::HeaderMap;
use uuid::Uuid;

/// Accepts exactly the canonical 8-4-4-4-12 form (either case). `Uuid::parse_str`
/// alone is too lenient: it also takes braces, `urn:uuid:` and the 32-digit form.
pub fn parse_canonical_uuid(s: &str) -> Option<Uuid> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    for (i, c) in b.iter().enumerate() {
        let ok = match i {
            8 | 13 | 18 | 23 => *c == b'-',
            _ => c.is_ascii_hexdigit(),
        };
        if !ok {
            return None;
        }
    }
    Uuid::parse_str(s).ok()
}

/// The caller's `X-Request-Id` when it is a sane token (1..=128 visible ASCII
/// characters), otherwise a fresh UUID. Control characters never pass, so the
/// id can be echoed in headers and logs without injection.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 128 && s.bytes().all(|c| c.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| Uuid::new_v4().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_uuid_forms() {
        assert!(parse_canonical_uuid("5832d184-dd53-42a0-8ace-0bf8d660f4cc").is_some());
        assert!(parse_canonical_uuid("5832D184-DD53-42A0-8ACE-0BF8D660F4CC").is_some());
        assert!(parse_canonical_uuid("5832d184dd5342a08ace0bf8d660f4cc").is_none());
        assert!(parse_canonical_uuid("{5832d184-dd53-42a0-8ace-0bf8d660f4cc}").is_none());
        assert!(parse_canonical_uuid("5832d184-dd53-42a0-8ace-0bf8d660f4c").is_none());
        assert!(parse_canonical_uuid("5832d184-dd53-42a0-8ace-0bf8d660f4cg").is_none());
        assert!(parse_canonical_uuid("5832d184+dd53-42a0-8ace-0bf8d660f4cc").is_none());
        assert!(parse_canonical_uuid("").is_none());
    }

    #[test]
    fn request_id_is_kept_only_when_sane() {
        let mut h = HeaderMap::new();
        h.insert("x-request-id", "abc-123".parse().unwrap());
        assert_eq!(request_id(&h), "abc-123");
        h.insert("x-request-id", "has space".parse().unwrap());
        assert_ne!(request_id(&h), "has space");
        h.insert("x-request-id", "x".repeat(129).parse().unwrap());
        assert_eq!(request_id(&h).len(), 36);
        assert_eq!(request_id(&HeaderMap::new()).len(), 36);
    }
}
