//! Sensitive values: the vendor token, kept only as a ready-made header value
//! marked sensitive, and other secrets (a Redis URL with its password), whose
//! `Debug` and `Display` print a placeholder. A leaf: it imports nothing from
//! the rest of the crate.

use std::fmt;
use std::path::Path;

use bytes::Bytes;
use http::HeaderValue;

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

#[cfg(test)]
mod tests {
    use super::*;

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
