//! The vendor side: the bearer token (which never prints itself) and the
//! pooled HTTP/1.1 + HTTP/2 client over rustls.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use http::HeaderValue;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::config::{ConfigError, TokenSetting, UpstreamConfig};

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

    pub fn read_file(path: &Path) -> Result<Token, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::TokenFile {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        Token::new(&text).ok_or_else(|| ConfigError::TokenFile {
            path: path.to_owned(),
            reason: "empty, or not a valid header value".into(),
        })
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

/// The token in force, and where it came from. A lock rather than a copy per
/// request so a rotated token file (or a reload) can replace it while
/// requests are running.
pub struct TokenSource {
    current: RwLock<Token>,
    /// The file to re-read, when the token comes from one; `None` for the
    /// environment. The last read error is kept so a broken file is logged
    /// once, not on every poll.
    file: Mutex<Option<(PathBuf, Option<String>)>>,
}

impl TokenSource {
    pub fn new(setting: &TokenSetting) -> TokenSource {
        let source = TokenSource {
            current: RwLock::new(setting.current().clone()),
            file: Mutex::new(None),
        };
        source.set(setting);
        source
    }

    pub fn get(&self) -> Token {
        match self.current.read() {
            Ok(t) => t.clone(),
            // A writer never panics while holding the lock; recover anyway.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Switches to a new setting (config reload).
    pub fn set(&self, setting: &TokenSetting) {
        self.replace(setting.current().clone());
        let file = match setting {
            TokenSetting::Env(_) => None,
            TokenSetting::File { path, .. } => Some((path.clone(), None)),
        };
        *self.file.lock().unwrap_or_else(|p| p.into_inner()) = file;
    }

    fn replace(&self, token: Token) {
        match self.current.write() {
            Ok(mut t) => *t = token,
            Err(poisoned) => *poisoned.into_inner() = token,
        }
    }

    /// After the vendor refused `used`: re-reads the file and returns the
    /// token in force if it differs from `used` (the file watch may have
    /// swapped it in meanwhile), `None` when there is nothing newer to try.
    pub fn newer_than(&self, used: &Token) -> Option<Token> {
        self.refresh();
        let current = self.get();
        (current.authorization() != used.authorization()).then_some(current)
    }

    /// Re-reads the token file. Returns the new token when it changed. An
    /// empty or unreadable file keeps the old token (logged once per cause).
    pub fn refresh(&self) -> Option<Token> {
        let mut file = self.file.lock().unwrap_or_else(|p| p.into_inner());
        let (path, last_error) = file.as_mut()?;
        match Token::read_file(path) {
            Ok(token) => {
                *last_error = None;
                if token.authorization() == self.get().authorization() {
                    return None;
                }
                self.replace(token.clone());
                tracing::info!(path = %path.display(), "upstream token reloaded from file");
                Some(token)
            }
            Err(e) => {
                let cause = e.to_string();
                if last_error.as_deref() != Some(cause.as_str()) {
                    tracing::warn!(cause = %cause, "token file unusable; keeping the current token");
                    *last_error = Some(cause);
                }
                None
            }
        }
    }
}

pub type UpstreamClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Start-up errors of the TLS setup.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("upstream.extra_ca_file {path}: {reason}")]
    ExtraCa { path: String, reason: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// One pooled client for every upstream call. Certificate verification and
/// SNI are always on; HTTP/2 is used when the vendor offers it through ALPN.
pub fn build_client(cfg: &UpstreamConfig) -> Result<UpstreamClient, TlsSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &cfg.extra_ca_file {
        let err = |reason: String| TlsSetupError::ExtraCa {
            path: path.display().to_string(),
            reason,
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| err(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(e.to_string()))?;
        if certs.is_empty() {
            return Err(err("holds no PEM certificate".into()));
        }
        for cert in certs {
            roots.add(cert).map_err(|e| err(e.to_string()))?;
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();

    let mut http = HttpConnector::new();
    // The scheme check is ours: the connector must accept http:// URIs when
    // the operator configured one explicitly.
    http.enforce_http(false);
    http.set_connect_timeout(Some(cfg.connect_timeout));
    http.set_nodelay(true);
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(http);

    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(std::time::Duration::from_secs(30))
        .build(https))
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
    fn empty_or_unprintable_token_is_refused() {
        assert!(Token::new("").is_none());
        assert!(Token::new(" \n\t").is_none());
        assert!(Token::new("a\u{1}b").is_none());
    }
}
