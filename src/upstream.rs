//! The vendor side: the token in force (re-read from its file on rotation)
//! and the pooled HTTP/1.1 + HTTP/2 client over rustls.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::{TokenSetting, UpstreamConfig};
use crate::secret::Token;

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
    /// Blocking file I/O: call it from a blocking thread, not a tokio worker.
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
            Err(reason) => {
                let cause = format!("{}: {reason}", path.display());
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

/// The TLS setup failed (the CA file was checked with the config already).
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// One pooled client for every upstream call. Certificate verification and
/// SNI are always on; HTTP/2 is used when the vendor offers it through ALPN.
pub fn build_client(cfg: &UpstreamConfig) -> Result<UpstreamClient, TlsSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = &cfg.extra_ca {
        for cert in &ca.certs {
            roots.add(cert.clone())?;
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
