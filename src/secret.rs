//! Sensitive values: the vendor token, kept only as a ready-made header value
//! marked sensitive; the callers' keys, of which only a SHA-256 digest is
//! kept and compared (in constant time); and other secrets (a Redis URL with
//! its password). Their `Debug` and `Display` print a placeholder. A leaf: it
//! imports nothing from the rest of the crate.

use std::fmt;
use std::path::Path;

use bytes::Bytes;
use http::HeaderValue;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The vendor token. It is kept only as the ready-made `Authorization` value,
/// marked sensitive so hyper's own debug output hides it too; `Debug` and
/// `Display` print a placeholder.
#[derive(Clone)]
pub struct Token {
    header: HeaderValue,
}

impl Token {
    /// Trims surrounding whitespace; `None` when nothing is left or the token
    /// holds characters a header cannot carry.
    pub fn new(raw: &str) -> Option<Token> {
        let t = raw.trim();
        if t.is_empty() {
            return None;
        }
        let mut header = HeaderValue::try_from(format!("Bearer {t}")).ok()?;
        header.set_sensitive(true);
        Some(Token { header })
    }

    /// Reads a token file (blocking: call it off the tokio workers). The
    /// error says why, never what the file held.
    pub fn read_file(path: &Path) -> Result<Token, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        Token::new(&text).ok_or_else(|| "empty, or not a valid header value".to_owned())
    }

    /// `body` with every occurrence of the token replaced by `<redacted>`: a
    /// vendor (or anything posing as it) that echoes our `Authorization`
    /// header must not make us hand the token to the caller.
    pub fn redact_in(&self, body: Bytes) -> Bytes {
        let secret = &self.header.as_bytes()["Bearer ".len()..];
        if secret.is_empty() || !contains(&body, secret) {
            return body;
        }
        let mut out = Vec::with_capacity(body.len());
        let mut rest: &[u8] = &body;
        while let Some(at) = find(rest, secret) {
            out.extend_from_slice(&rest[..at]);
            out.extend_from_slice(b"<redacted>");
            rest = &rest[at + secret.len()..];
        }
        out.extend_from_slice(rest);
        Bytes::from(out)
    }

    /// `Bearer <token>`, ready for the `Authorization` header.
    pub fn authorization(&self) -> &HeaderValue {
        &self.header
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    find(haystack, needle).is_some()
}

/// First index of `needle` in `haystack`. Vendor answers are small (capped at
/// 1 MiB) and the first-byte filter skips most positions.
fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    let first = *needle.first()?;
    haystack
        .iter()
        .enumerate()
        .filter(|(_, b)| **b == first)
        .map(|(i, _)| i)
        .find(|&i| haystack[i..].starts_with(needle))
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A string that must not be shown: a Redis URL that may carry a password.
/// `Debug` and `Display` print a placeholder; [`Secret::expose`] is the one
/// way in, for the code that connects.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A URL with its password (the userinfo after `:`) replaced, for logs.
    pub fn redacted_url(&self) -> String {
        redact_url_password(&self.0)
    }
}

/// `scheme://user:password@host...` → `scheme://user:<redacted>@host...`;
/// a `pass=` query parameter (unix-socket URLs) likewise.
pub fn redact_url_password(url: &str) -> String {
    let mut out = match url.split_once("://") {
        Some((scheme, rest)) => match rest.split_once('@') {
            Some((userinfo, host)) if !userinfo.contains('/') => match userinfo.split_once(':') {
                Some((user, _)) => format!("{scheme}://{user}:<redacted>@{host}"),
                None => url.to_owned(),
            },
            _ => url.to_owned(),
        },
        None => url.to_owned(),
    };
    if let Some(at) = out.find("pass=") {
        let end = out[at..].find('&').map_or(out.len(), |e| at + e);
        out.replace_range(at + 5..end, "<redacted>");
    }
    out
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A caller key as it arrived in `Authorization: Bearer <key>`, borrowed
/// from the request only long enough to be hashed: it is never copied,
/// logged, stored or forwarded.
pub struct CallerKey<'a>(&'a [u8]);

impl<'a> CallerKey<'a> {
    /// The key of a `Bearer` credential (the scheme is case-insensitive, RFC
    /// 9110 §11.1); `None` for any other scheme or an empty key.
    pub fn from_authorization(value: &'a HeaderValue) -> Option<CallerKey<'a>> {
        let v = value.as_bytes();
        let (scheme, rest) = v.split_at_checked(7)?;
        if !scheme.eq_ignore_ascii_case(b"bearer ") {
            return None;
        }
        let key = rest.trim_ascii();
        (!key.is_empty()).then_some(CallerKey(key))
    }

    pub fn digest(&self) -> KeyDigest {
        KeyDigest(Sha256::digest(self.0).into())
    }
}

impl fmt::Debug for CallerKey<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CallerKey(<redacted>)")
    }
}

/// The SHA-256 of a caller key (`access.callers.key_sha256`). Equality is
/// constant-time; `Debug` and `Display` print a placeholder, because the
/// digest of a weak key can be turned back into the key by guessing.
#[derive(Clone, Copy)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// From 64 hex digits (either case); `None` for anything else.
    pub fn from_hex(hex_digits: &str) -> Option<KeyDigest> {
        let mut out = [0u8; 32];
        if hex_digits.len() != 64 {
            return None;
        }
        hex::decode_to_slice(hex_digits, &mut out).ok()?;
        Some(KeyDigest(out))
    }

    /// The digest of `key` as a caller would send it (for tests and tools).
    pub fn of(key: &str) -> KeyDigest {
        KeyDigest(Sha256::digest(key.as_bytes()).into())
    }

    /// Lowercase hex, as `key_sha256` is written.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl ConstantTimeEq for KeyDigest {
    fn ct_eq(&self, other: &Self) -> subtle::Choice {
        self.0.ct_eq(&other.0)
    }
}

impl PartialEq for KeyDigest {
    fn eq(&self, other: &Self) -> bool {
        self.ct_eq(other).into()
    }
}

impl Eq for KeyDigest {}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyDigest(<redacted>)")
    }
}

impl fmt::Display for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caller_keys_are_read_from_bearer_credentials_and_never_print() {
        let v = HeaderValue::from_static("bEaReR  k3y-of-billing ");
        let key = CallerKey::from_authorization(&v).unwrap();
        assert!(!format!("{key:?}").contains("k3y"));
        assert!(key.digest() == KeyDigest::of("k3y-of-billing"));
        for bad in ["Basic abc", "Bearer", "Bearer   ", "Bearerabc", ""] {
            let v = HeaderValue::from_str(bad).unwrap();
            assert!(CallerKey::from_authorization(&v).is_none(), "{bad:?}");
        }
        let d = KeyDigest::of("k3y-of-billing");
        assert_eq!(format!("{d}"), "<redacted>");
        assert!(!format!("{d:?}").contains(&d.to_hex()[..8]));
    }

    #[test]
    fn key_digests_parse_from_64_hex_digits() {
        // sha256("test"), the example in DESIGN.md.
        let hex_digits = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
        let d = KeyDigest::from_hex(hex_digits).unwrap();
        assert!(d == KeyDigest::of("test"));
        assert!(KeyDigest::from_hex(&hex_digits.to_uppercase()).unwrap() == d);
        assert_eq!(d.to_hex(), hex_digits);
        assert!(d != KeyDigest::of("test2"));
        for bad in [
            "",
            "9f86",
            &hex_digits[1..],
            &format!("{hex_digits}0"),
            &hex_digits.replace('9', "g"),
        ] {
            assert!(KeyDigest::from_hex(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn token_never_prints_itself() {
        let t = Token::new("  abc-secret\n").unwrap();
        assert_eq!(format!("{t}"), "<redacted>");
        assert!(!format!("{t:?}").contains("abc-secret"));
        assert!(!format!("{:?}", t.authorization()).contains("abc-secret"));
        assert_eq!(t.authorization().to_str().unwrap(), "Bearer abc-secret");
    }

    #[test]
    fn echoed_tokens_are_redacted() {
        let t = Token::new("s3cr3t").unwrap();
        let body = Bytes::from_static(b"{\"auth\":\"Bearer s3cr3t\",\"x\":\"s3cr3ts3cr3t\"}");
        let out = t.redact_in(body);
        assert_eq!(
            &out[..],
            b"{\"auth\":\"Bearer <redacted>\",\"x\":\"<redacted><redacted>\"}"
        );
        let clean = Bytes::from_static(b"{\"code\":200}");
        assert_eq!(t.redact_in(clean.clone()), clean);
    }

    #[test]
    fn secrets_and_url_passwords_never_print() {
        let s = Secret::new("redis://:hunter2@127.0.0.1:6379/0");
        assert!(!format!("{s} {s:?}").contains("hunter2"));
        assert_eq!(s.redacted_url(), "redis://:<redacted>@127.0.0.1:6379/0");
        assert_eq!(
            redact_url_password("rediss://app:p%40ss@r.example:6380"),
            "rediss://app:<redacted>@r.example:6380"
        );
        assert_eq!(
            redact_url_password("redis://127.0.0.1:6379"),
            "redis://127.0.0.1:6379"
        );
        assert_eq!(
            redact_url_password("redis+unix:///run/redis.sock?db=1&pass=x1&user=u"),
            "redis+unix:///run/redis.sock?db=1&pass=<redacted>&user=u"
        );
    }

    #[test]
    fn empty_or_unprintable_token_is_refused() {
        assert!(Token::new("").is_none());
        assert!(Token::new(" \n\t").is_none());
        assert!(Token::new("a\u{1}b").is_none());
    }
}
