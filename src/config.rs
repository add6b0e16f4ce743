//! Configuration: the TOML file and `TASKGATE_*` overrides, checked once at
//! start-up into typed fields. Every error names the key it is about, and
//! every problem `serve` would refuse to start with is found here, so `check`
//! finds it too (a leaf: nothing above it is imported).

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::ids::parse_canonical_uuid;
use crate::secret::{KeyDigest, Secret, Token};

/// Start-up errors: a bad config never gets as far as serving.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid value for `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
    #[error(
        "no upstream token: set TASKGATE_UPSTREAM_TOKEN, or upstream.token_file / TASKGATE_UPSTREAM_TOKEN_FILE"
    )]
    MissingToken,
    #[error("upstream token file {path}: {reason}")]
    TokenFile { path: PathBuf, reason: String },
}

fn invalid(key: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        reason: reason.into(),
    }
}

// ---------------------------------------------------------------------------
// The file as written. `deny_unknown_fields` makes a typo a start-up error
// instead of a silent fall-back to the default.

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawConfig {
    pub listen: String,
    pub admin_listen: String,
    pub shutdown_grace_ms: u64,
    pub upstream: RawUpstream,
    pub limits: RawLimits,
    pub validation: RawValidation,
    pub rate_limit: RawRateLimit,
    pub residue: RawResidue,
    pub audit: RawAudit,
    pub log: RawLog,
    pub runtime: RawRuntime,
    /// Absent: every replica keeps its own state.
    pub shared: Option<RawShared>,
    pub access: RawAccess,
}

impl Default for RawConfig {
    fn default() -> Self {
        RawConfig {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9901".into(),
            shutdown_grace_ms: 10_000,
            upstream: RawUpstream::default(),
            limits: RawLimits::default(),
            validation: RawValidation::default(),
            rate_limit: RawRateLimit::default(),
            residue: RawResidue::default(),
            audit: RawAudit::default(),
            log: RawLog::default(),
            runtime: RawRuntime::default(),
            shared: None,
            access: RawAccess::default(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUpstream {
    pub url: String,
    pub token_file: Option<PathBuf>,
    pub extra_ca_file: Option<PathBuf>,
    pub connect_timeout_ms: u64,
    pub timeout_ms: u64,
    pub retries: u32,
}

impl Default for RawUpstream {
    fn default() -> Self {
        RawUpstream {
            url: "https://ai.api.longlonglong.cn".into(),
            token_file: None,
            extra_ca_file: None,
            connect_timeout_ms: 2_000,
            timeout_ms: 10_000,
            retries: 1,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    pub max_body_bytes: u64,
    pub max_connections: u64,
    pub max_inflight: u64,
    pub header_read_timeout_ms: u64,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_body_bytes: 65_536,
            max_connections: 4_096,
            max_inflight: 1_024,
            header_read_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawValidation {
    pub allow_unknown_fields: bool,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRateLimit {
    pub per_second: u32,
    pub burst: u32,
    pub key: String,
    pub global_per_second: u32,
    pub overrides: HashMap<String, RawQuota>,
}

impl Default for RawRateLimit {
    fn default() -> Self {
        RawRateLimit {
            per_second: 5,
            burst: 10,
            key: "user".into(),
            global_per_second: 0,
            overrides: HashMap::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawQuota {
    pub per_second: u32,
    pub burst: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawResidue {
    pub enabled: bool,
    pub path: String,
    pub cache_ttl_ms: u64,
    pub on_unavailable: String,
    pub after_update: String,
}

impl Default for RawResidue {
    fn default() -> Self {
        RawResidue {
            enabled: true,
            path: "/agent-api/user/{user_id}/task/create".into(),
            cache_ttl_ms: 5_000,
            on_unavailable: "reject".into(),
            after_update: "drop".into(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAudit {
    pub path: PathBuf,
    pub fsync: String,
    pub max_bytes: u64,
    pub rejected_request_max_bytes: u64,
    pub rejected_per_second: u32,
    pub keep_files: u64,
}

impl Default for RawAudit {
    fn default() -> Self {
        RawAudit {
            path: "./taskgate-audit.jsonl".into(),
            fsync: "always".into(),
            max_bytes: 104_857_600,
            rejected_request_max_bytes: 2048,
            rejected_per_second: 100,
            keep_files: 0,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLog {
    pub format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            format: "json".into(),
        }
    }
}

/// `[shared]`: Redis for the state every replica must share.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawShared {
    pub redis_url: String,
    /// The password, read from a file (whitespace trimmed) instead of the URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
    #[serde(default = "default_shared_timeout")]
    pub timeout_ms: u64,
    #[serde(default = "default_shared_on_unavailable")]
    pub on_unavailable: String,
}

fn default_key_prefix() -> String {
    "taskgate:".into()
}

fn default_shared_timeout() -> u64 {
    200
}

fn default_shared_on_unavailable() -> String {
    "local".into()
}

/// Not in DESIGN.md's list: the tokio worker count, chosen by measurement
/// (bench/README.md): one worker needs no cross-worker wake-ups, which at one
/// connection cost ~20 µs of CPU per request, and at 32 connections it kept
/// the throughput of two with a lower p99. 0 means one worker per core.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawRuntime {
    pub worker_threads: usize,
}

impl Default for RawRuntime {
    fn default() -> Self {
        RawRuntime { worker_threads: 1 }
    }
}

/// `[access]`: who may call (DESIGN.md "Caller control").
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawAccess {
    pub allowed_users: Vec<String>,
    pub allowed_uids: Vec<u32>,
    pub callers: Vec<RawCaller>,
}

/// One `[[access.callers]]` entry.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RawCaller {
    pub name: String,
    pub key_sha256: String,
    #[serde(default)]
    pub users: Vec<String>,
}

// ---------------------------------------------------------------------------
// The validated config the rest of the program reads.

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: Listen,
    pub admin_listen: SocketAddr,
    pub shutdown_grace: Duration,
    pub upstream: UpstreamConfig,
    pub limits: Limits,
    pub validation: ValidationConfig,
    pub rate_limit: RateLimitConfig,
    pub residue: ResidueConfig,
    pub audit: AuditConfig,
    pub log_format: LogFormat,
    pub worker_threads: usize,
    pub shared: Option<SharedConfig>,
    pub access: AccessConfig,
}

/// `[shared]`, validated. The URL (with any password) is a [`Secret`]: the
/// config's `Debug` and `check` never show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedConfig {
    pub redis_url: Secret,
    pub key_prefix: String,
    pub timeout: Duration,
    pub on_unavailable: SharedFallback,
}

/// What to do while Redis does not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedFallback {
    /// This process's own limiter and line locks, with the same numbers.
    Local,
    /// 503 `shared_state_unavailable`; nothing forwarded.
    Reject,
}

/// Where the data listener is: a TCP address, or a Unix socket's path
/// (`listen = "unix:/path/to.sock"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
}

/// The longest path a Unix socket address holds (`sun_path` is 108 bytes
/// with its terminating NUL on Linux).
const MAX_SOCKET_PATH: usize = 107;

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Listen::Tcp(addr) => addr.fmt(f),
            Listen::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// `[access]`, validated. Empty sets mean "any".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AccessConfig {
    /// User ids this gateway may act for.
    pub allowed_users: HashSet<Uuid>,
    /// Unix-socket peers' uids that may call.
    pub allowed_uids: HashSet<u32>,
    /// With at least one, every request must carry a known caller's key.
    pub callers: Vec<Caller>,
}

/// One known caller: its name (in the access log and audit records), the
/// digest of its key, and the user ids it may act for (empty: any allowed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub name: String,
    pub key: KeyDigest,
    pub users: HashSet<Uuid>,
}

#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    pub scheme: Scheme,
    pub authority: Authority,
    /// Path prefix of the base URL without a trailing slash ("" for none).
    pub base_path: String,
    pub token: TokenSetting,
    pub extra_ca: Option<ExtraCa>,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub retries: u32,
}

/// `upstream.extra_ca_file`, read and parsed at start-up (and on reload): a
/// file that does not hold certificates rustls accepts is a config error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraCa {
    pub path: PathBuf,
    pub certs: Vec<CertificateDer<'static>>,
}

fn read_extra_ca(path: &Path) -> Result<ExtraCa, ConfigError> {
    let err = |reason: String| {
        invalid(
            "upstream.extra_ca_file",
            format!("{}: {reason}", path.display()),
        )
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| err(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| err(e.to_string()))?;
    if certs.is_empty() {
        return Err(err("holds no PEM certificate".into()));
    }
    // The same check the client's root store makes: a PEM block whose DER
    // is not a certificate fails here, not when `serve` builds the client.
    let mut roots = rustls::RootCertStore::empty();
    for cert in &certs {
        roots.add(cert.clone()).map_err(|e| err(e.to_string()))?;
    }
    Ok(ExtraCa {
        path: path.to_owned(),
        certs,
    })
}

/// Where the bearer token comes from. The environment wins over the file.
#[derive(Clone)]
pub enum TokenSetting {
    Env(Token),
    File { path: PathBuf, initial: Token },
}

impl UpstreamConfig {
    /// Whether a client built for `other` serves this config as well (the
    /// token and request timeout are applied per request, not in the client).
    pub fn same_connection_settings(&self, other: &UpstreamConfig) -> bool {
        self.scheme == other.scheme
            && self.authority == other.authority
            && self.extra_ca == other.extra_ca
            && self.connect_timeout == other.connect_timeout
    }

    /// Whether nothing of the section changed (for the reload report).
    pub fn same_settings(&self, other: &UpstreamConfig) -> bool {
        self.same_connection_settings(other)
            && self.base_path == other.base_path
            && self.timeout == other.timeout
            && self.retries == other.retries
            && self.token.same(&other.token)
    }
}

impl TokenSetting {
    /// Same source and same token.
    fn same(&self, other: &TokenSetting) -> bool {
        let same_source = match (self, other) {
            (TokenSetting::Env(_), TokenSetting::Env(_)) => true,
            (TokenSetting::File { path: a, .. }, TokenSetting::File { path: b, .. }) => a == b,
            _ => false,
        };
        same_source && self.current().authorization() == other.current().authorization()
    }

    pub fn current(&self) -> &Token {
        match self {
            TokenSetting::Env(t) => t,
            TokenSetting::File { initial, .. } => initial,
        }
    }
}

impl fmt::Debug for TokenSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenSetting::Env(t) => write!(f, "env TASKGATE_UPSTREAM_TOKEN ({t})"),
            TokenSetting::File { path, initial } => {
                write!(f, "file {} ({initial})", path.display())
            }
        }
    }
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_connections: usize,
    pub max_inflight: usize,
    pub header_read_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ValidationConfig {
    pub allow_unknown_fields: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub per_second: NonZeroU32,
    pub burst: NonZeroU32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateKeyKind {
    User,
    UserAndSubUser,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitConfig {
    pub default: Quota,
    pub key: RateKeyKind,
    /// Cap on the sum of requests sent to the vendor; its burst equals the rate.
    pub global_per_second: Option<NonZeroU32>,
    pub overrides: HashMap<Uuid, Quota>,
}

impl RateLimitConfig {
    /// The quota of `user_id` (its override, else the default).
    pub fn quota_for(&self, user_id: &str) -> Quota {
        parse_canonical_uuid(user_id)
            .and_then(|id| self.overrides.get(&id).copied())
            .unwrap_or(self.default)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUnavailable {
    Reject,
    Allow,
}

/// What an accepted update does to the cached line list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterUpdate {
    /// Lower the line's cached residue by the update's `maximumcall`.
    Decrement,
    /// Drop the list; the next update of that user reads it again.
    Drop,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResidueConfig {
    pub enabled: bool,
    /// Path template holding `{user_id}`.
    pub path: String,
    pub cache_ttl: Duration,
    pub on_unavailable: OnUnavailable,
    pub after_update: AfterUpdate,
}

/// `audit.max_bytes` default: 100 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 104_857_600;

/// `audit.fsync`. Deserialises from `"always"`, `"interval"`, `"never"`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsyncPolicy {
    /// Attempts wait for `fdatasync` (group commit).
    #[default]
    Always,
    /// Attempts wait for the write; the writer syncs once a second.
    Interval,
    /// Attempts wait for the write; synced only at shutdown.
    Never,
}

/// The `[audit]` section, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditConfig {
    /// The active file; rotated files go next to it. Its directory is not created.
    pub path: PathBuf,
    pub fsync: FsyncPolicy,
    /// Rotate before the active file would grow past this; 0 disables rotation.
    pub max_bytes: u64,
    /// A `rejected` record keeps at most this much of the body.
    pub rejected_request_max_bytes: usize,
    /// At most this many `rejected` records per second (a bucket with a burst
    /// of the same size); the rest are counted, not written.
    pub rejected_per_second: u32,
    /// Rotated files kept beyond the active one; 0 keeps all.
    pub keep_files: usize,
}

impl AuditConfig {
    /// `path` with every other key at its default.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        AuditConfig {
            path: path.into(),
            fsync: FsyncPolicy::Always,
            max_bytes: DEFAULT_MAX_BYTES,
            rejected_request_max_bytes: 2048,
            rejected_per_second: 100,
            keep_files: 0,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Text,
}

/// The environment variables that override the file.
pub const ENV_KEYS: [&str; 6] = [
    "TASKGATE_LISTEN",
    "TASKGATE_ADMIN_LISTEN",
    "TASKGATE_UPSTREAM_URL",
    "TASKGATE_UPSTREAM_TOKEN",
    "TASKGATE_UPSTREAM_TOKEN_FILE",
    "TASKGATE_AUDIT_PATH",
];

impl Config {
    /// Reads the file (if any), applies the process environment and validates.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let raw = RawConfig::read(path)?;
        Config::from_raw(raw, |k| std::env::var(k).ok())
    }

    /// Applies environment overrides (`env` is a lookup so tests need not touch
    /// the process environment) and validates every key.
    pub fn from_raw(
        mut raw: RawConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        if let Some(v) = env("TASKGATE_LISTEN") {
            raw.listen = v;
        }
        if let Some(v) = env("TASKGATE_ADMIN_LISTEN") {
            raw.admin_listen = v;
        }
        if let Some(v) = env("TASKGATE_UPSTREAM_URL") {
            raw.upstream.url = v;
        }
        if let Some(v) = env("TASKGATE_UPSTREAM_TOKEN_FILE") {
            raw.upstream.token_file = Some(v.into());
        }
        if let Some(v) = env("TASKGATE_AUDIT_PATH") {
            raw.audit.path = v.into();
        }
        let env_token = env("TASKGATE_UPSTREAM_TOKEN");

        let listen = parse_listen(&raw.listen)?;
        let admin_listen = parse_addr("admin_listen", &raw.admin_listen)?;
        if listen == Listen::Tcp(admin_listen) && admin_listen.port() != 0 {
            return Err(invalid("admin_listen", "must differ from `listen`"));
        }
        let access = access_config(&raw.access)?;
        if !access.allowed_uids.is_empty() && !matches!(listen, Listen::Unix(_)) {
            // A TCP peer has no uid: the operator meant a socket.
            return Err(invalid(
                "access.allowed_uids",
                "applies only to a Unix-socket listener (`listen = \"unix:/path\"`)",
            ));
        }

        let upstream = upstream_config(&raw.upstream, env_token)?;
        let limits = Limits {
            max_body_bytes: positive_usize("limits.max_body_bytes", raw.limits.max_body_bytes)?,
            max_connections: positive_usize("limits.max_connections", raw.limits.max_connections)?,
            max_inflight: positive_usize("limits.max_inflight", raw.limits.max_inflight)?,
            header_read_timeout: millis(
                "limits.header_read_timeout_ms",
                raw.limits.header_read_timeout_ms,
            )?,
        };
        let rate_limit = rate_limit_config(&raw.rate_limit)?;
        let residue = residue_config(&raw.residue)?;
        let audit = AuditConfig {
            path: if raw.audit.path.as_os_str().is_empty() {
                return Err(invalid("audit.path", "must not be empty"));
            } else {
                raw.audit.path.clone()
            },
            fsync: match raw.audit.fsync.as_str() {
                "always" => FsyncPolicy::Always,
                "interval" => FsyncPolicy::Interval,
                "never" => FsyncPolicy::Never,
                other => {
                    return Err(invalid(
                        "audit.fsync",
                        format!("`{other}` is not one of \"always\", \"interval\", \"never\""),
                    ));
                }
            },
            max_bytes: if raw.audit.max_bytes != 0 && raw.audit.max_bytes < 4096 {
                return Err(invalid(
                    "audit.max_bytes",
                    "must be 0 (never rotate) or at least 4096",
                ));
            } else {
                raw.audit.max_bytes
            },
            rejected_request_max_bytes: match raw.audit.rejected_request_max_bytes {
                n @ 64..=1_048_576 => n as usize,
                _ => {
                    return Err(invalid(
                        "audit.rejected_request_max_bytes",
                        "must be between 64 and 1048576",
                    ));
                }
            },
            rejected_per_second: if raw.audit.rejected_per_second == 0 {
                return Err(invalid(
                    "audit.rejected_per_second",
                    "must be greater than 0",
                ));
            } else {
                raw.audit.rejected_per_second
            },
            keep_files: usize::try_from(raw.audit.keep_files)
                .map_err(|_| invalid("audit.keep_files", "too large"))?,
        };
        let log_format = match raw.log.format.as_str() {
            "json" => LogFormat::Json,
            "text" => LogFormat::Text,
            other => {
                return Err(invalid(
                    "log.format",
                    format!("`{other}` is not one of \"json\", \"text\""),
                ));
            }
        };
        if raw.runtime.worker_threads > 256 {
            return Err(invalid("runtime.worker_threads", "must be at most 256"));
        }
        Ok(Config {
            listen,
            admin_listen,
            shutdown_grace: Duration::from_millis(raw.shutdown_grace_ms),
            upstream,
            limits,
            validation: ValidationConfig {
                allow_unknown_fields: raw.validation.allow_unknown_fields,
            },
            rate_limit,
            residue,
            audit,
            log_format,
            worker_threads: raw.runtime.worker_threads,
            shared: raw.shared.as_ref().map(shared_config).transpose()?,
            access,
        })
    }

    /// The effective config as TOML, with the token shown only as its source.
    pub fn to_redacted_toml(&self, raw: &RawConfig) -> String {
        let mut shown = raw.clone();
        shown.listen = self.listen.to_string();
        shown.admin_listen = self.admin_listen.to_string();
        shown.upstream.url = format!(
            "{}://{}{}",
            self.upstream.scheme, self.upstream.authority, self.upstream.base_path
        );
        if let TokenSetting::File { path, .. } = &self.upstream.token {
            shown.upstream.token_file = Some(path.clone());
        }
        shown.audit.path = self.audit.path.clone();
        if let Some(shared) = &mut shown.shared {
            shared.redis_url = crate::secret::redact_url_password(&shared.redis_url);
        }
        // A digest of a weak key gives the key away to a guesser.
        for caller in &mut shown.access.callers {
            caller.key_sha256 = "<redacted>".into();
        }
        let body =
            toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot render: {e}\n"));
        format!(
            "# effective configuration (token: {})\n{body}",
            match &self.upstream.token {
                TokenSetting::Env(_) => "from TASKGATE_UPSTREAM_TOKEN, redacted",
                TokenSetting::File { .. } => "from upstream.token_file, redacted",
            }
        )
    }
}

impl RawConfig {
    /// Reads the file; no file means all defaults.
    pub fn read(path: Option<&Path>) -> Result<RawConfig, ConfigError> {
        let Some(path) = path else {
            return Ok(RawConfig::default());
        };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        RawConfig::parse(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<RawConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }
}

fn parse_listen(v: &str) -> Result<Listen, ConfigError> {
    let Some(path) = v.strip_prefix("unix:") else {
        return parse_addr("listen", v).map(Listen::Tcp);
    };
    if path.is_empty() || path.contains('\0') {
        return Err(invalid(
            "listen",
            "`unix:` must be followed by a socket path",
        ));
    }
    if path.len() > MAX_SOCKET_PATH {
        return Err(invalid(
            "listen",
            format!("socket path longer than {MAX_SOCKET_PATH} bytes"),
        ));
    }
    Ok(Listen::Unix(PathBuf::from(path)))
}

fn parse_addr(key: &'static str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse().map_err(|_| {
        invalid(
            key,
            format!("`{v}` is not an address such as 127.0.0.1:8080"),
        )
    })
}

fn millis(key: &'static str, ms: u64) -> Result<Duration, ConfigError> {
    if ms == 0 {
        return Err(invalid(key, "must be greater than 0"));
    }
    Ok(Duration::from_millis(ms))
}

fn positive_usize(key: &'static str, v: u64) -> Result<usize, ConfigError> {
    match usize::try_from(v) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(invalid(key, "must be a positive integer")),
    }
}

fn nonzero(key: &'static str, v: u32) -> Result<NonZeroU32, ConfigError> {
    NonZeroU32::new(v).ok_or_else(|| invalid(key, "must be greater than 0"))
}

fn upstream_config(
    raw: &RawUpstream,
    env_token: Option<String>,
) -> Result<UpstreamConfig, ConfigError> {
    let uri: http::Uri = raw
        .url
        .parse()
        .map_err(|e| invalid("upstream.url", format!("`{}`: {e}", raw.url)))?;
    let scheme = match uri.scheme_str() {
        Some("https") => Scheme::HTTPS,
        // Plain HTTP only because the operator wrote it out.
        Some("http") => Scheme::HTTP,
        _ => {
            return Err(invalid(
                "upstream.url",
                "must start with https:// (or http://)",
            ));
        }
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| invalid("upstream.url", "has no host"))?;
    if authority.as_str().contains('@') {
        return Err(invalid("upstream.url", "must not carry credentials"));
    }
    if uri.query().is_some() {
        return Err(invalid("upstream.url", "must not have a query"));
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();

    let token = match env_token {
        Some(t) => TokenSetting::Env(Token::new(&t).ok_or(ConfigError::MissingToken)?),
        None => match &raw.token_file {
            Some(path) => TokenSetting::File {
                path: path.clone(),
                initial: Token::read_file(path).map_err(|reason| ConfigError::TokenFile {
                    path: path.clone(),
                    reason,
                })?,
            },
            None => return Err(ConfigError::MissingToken),
        },
    };
    let extra_ca = raw
        .extra_ca_file
        .as_deref()
        .map(read_extra_ca)
        .transpose()?;
    Ok(UpstreamConfig {
        scheme,
        authority,
        base_path,
        token,
        extra_ca,
        connect_timeout: millis("upstream.connect_timeout_ms", raw.connect_timeout_ms)?,
        timeout: millis("upstream.timeout_ms", raw.timeout_ms)?,
        retries: if raw.retries > 10 {
            return Err(invalid("upstream.retries", "must be at most 10"));
        } else {
            raw.retries
        },
    })
}

fn rate_limit_config(raw: &RawRateLimit) -> Result<RateLimitConfig, ConfigError> {
    let mut overrides = HashMap::new();
    for (user, q) in &raw.overrides {
        let id = parse_canonical_uuid(user).ok_or_else(|| {
            invalid(
                "rate_limit.overrides",
                format!("`{user}` is not a canonical UUID"),
            )
        })?;
        overrides.insert(
            id,
            Quota {
                per_second: nonzero("rate_limit.overrides.per_second", q.per_second)?,
                burst: nonzero("rate_limit.overrides.burst", q.burst)?,
            },
        );
    }
    Ok(RateLimitConfig {
        default: Quota {
            per_second: nonzero("rate_limit.per_second", raw.per_second)?,
            burst: nonzero("rate_limit.burst", raw.burst)?,
        },
        key: match raw.key.as_str() {
            "user" => RateKeyKind::User,
            "user_and_sub_user" => RateKeyKind::UserAndSubUser,
            other => {
                return Err(invalid(
                    "rate_limit.key",
                    format!("`{other}` is not one of \"user\", \"user_and_sub_user\""),
                ));
            }
        },
        global_per_second: NonZeroU32::new(raw.global_per_second),
        overrides,
    })
}

fn shared_config(raw: &RawShared) -> Result<SharedConfig, ConfigError> {
    let key = "shared.redis_url";
    let mut url = url_parts(&raw.redis_url).ok_or_else(|| {
        invalid(
            key,
            "must be redis://host[:port][/db], rediss://host[:port][/db] or redis+unix:///path",
        )
    })?;
    if let Some(path) = &raw.password_file {
        let password = std::fs::read_to_string(path)
            .map_err(|e| invalid("shared.password_file", format!("{}: {e}", path.display())))?;
        let password = password.trim();
        if password.is_empty() {
            return Err(invalid(
                "shared.password_file",
                format!("{} is empty", path.display()),
            ));
        }
        if url.has_password {
            return Err(invalid(
                "shared.password_file",
                "the password is in shared.redis_url already; give it in one place",
            ));
        }
        url.with_password(password);
    }
    // redis-rs parses it the way it will when connecting (nothing connects here).
    if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url.text.as_str()) {
        return Err(invalid(
            key,
            crate::secret::redact_url_password(&e.to_string()),
        ));
    }
    if raw.key_prefix.is_empty() || raw.key_prefix.contains(['{', '}', ' ']) {
        return Err(invalid(
            "shared.key_prefix",
            "must be non-empty, without spaces or braces (braces are the keys' cluster hash tags)",
        ));
    }
    let timeout = millis("shared.timeout_ms", raw.timeout_ms)?;
    let on_unavailable = match raw.on_unavailable.as_str() {
        "local" => SharedFallback::Local,
        "reject" => SharedFallback::Reject,
        other => {
            return Err(invalid(
                "shared.on_unavailable",
                format!("`{other}` is not one of \"local\", \"reject\""),
            ));
        }
    };
    Ok(SharedConfig {
        redis_url: Secret::new(url.text),
        key_prefix: raw.key_prefix.clone(),
        timeout,
        on_unavailable,
    })
}

/// A Redis URL checked just enough to refuse a typo at start-up (redis-rs
/// parses it fully when connecting).
struct RedisUrl {
    text: String,
    has_password: bool,
}

impl RedisUrl {
    /// Puts `password` into the URL's userinfo (percent-encoded).
    fn with_password(&mut self, password: &str) {
        let encoded: String = password
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        if let Some((scheme, rest)) = self.text.split_once("://") {
            let rest = rest.strip_prefix('@').unwrap_or(rest);
            let (user, rest) = match rest.split_once('@') {
                Some((user, rest)) if !user.contains('/') => (user.to_owned(), rest.to_owned()),
                _ => (String::new(), rest.to_owned()),
            };
            self.text = format!("{scheme}://{user}:{encoded}@{rest}");
            self.has_password = true;
        }
    }
}

fn url_parts(url: &str) -> Option<RedisUrl> {
    let (scheme, rest) = url.split_once("://")?;
    let host_part = match scheme {
        "redis" | "rediss" => rest.split('/').next()?,
        "redis+unix" | "unix" => {
            return rest.starts_with('/').then(|| RedisUrl {
                text: url.to_owned(),
                has_password: url.contains("pass="),
            });
        }
        _ => return None,
    };
    let (userinfo, host) = match host_part.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, host_part),
    };
    if host.is_empty() {
        return None;
    }
    Some(RedisUrl {
        text: url.to_owned(),
        has_password: userinfo.is_some_and(|u| u.contains(':')),
    })
}

fn uuid_set(key: &'static str, ids: &[String]) -> Result<HashSet<Uuid>, ConfigError> {
    ids.iter()
        .map(|id| {
            parse_canonical_uuid(id)
                .ok_or_else(|| invalid(key, format!("`{id}` is not a canonical UUID")))
        })
        .collect()
}

/// A caller's name goes into every log line and audit record of its
/// requests: short, and nothing that could be read as another field.
fn valid_caller_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn access_config(raw: &RawAccess) -> Result<AccessConfig, ConfigError> {
    let mut callers: Vec<Caller> = Vec::with_capacity(raw.callers.len());
    for (i, c) in raw.callers.iter().enumerate() {
        let which = format!("caller {} (`{}`)", i + 1, c.name);
        if !valid_caller_name(&c.name) {
            return Err(invalid(
                "access.callers.name",
                format!("{which}: 1 to 64 letters, digits, `-`, `_` or `.`"),
            ));
        }
        let key = KeyDigest::from_hex(&c.key_sha256).ok_or_else(|| {
            invalid(
                "access.callers.key_sha256",
                format!("{which}: must be 64 hex digits (the SHA-256 of the key)"),
            )
        })?;
        if let Some(other) = callers.iter().find(|o| o.name == c.name) {
            return Err(invalid(
                "access.callers.name",
                format!("{which}: `{}` is named twice", other.name),
            ));
        }
        if let Some(other) = callers.iter().find(|o| o.key == key) {
            return Err(invalid(
                "access.callers.key_sha256",
                format!("{which}: the same key as `{}`", other.name),
            ));
        }
        let users = uuid_set("access.callers.users", &c.users)?;
        callers.push(Caller {
            name: c.name.clone(),
            key,
            users,
        });
    }
    Ok(AccessConfig {
        allowed_users: uuid_set("access.allowed_users", &raw.allowed_users)?,
        allowed_uids: raw.allowed_uids.iter().copied().collect(),
        callers,
    })
}

fn residue_config(raw: &RawResidue) -> Result<ResidueConfig, ConfigError> {
    if !raw.path.starts_with('/') || !raw.path.contains("{user_id}") {
        return Err(invalid(
            "residue.path",
            "must start with `/` and contain `{user_id}`",
        ));
    }
    let probe = raw.path.replace("{user_id}", "x");
    if probe.parse::<http::uri::PathAndQuery>().is_err() || probe.contains(['?', '#', '{', '}']) {
        return Err(invalid("residue.path", "is not a valid URL path"));
    }
    Ok(ResidueConfig {
        enabled: raw.enabled,
        path: raw.path.clone(),
        cache_ttl: millis("residue.cache_ttl_ms", raw.cache_ttl_ms)?,
        on_unavailable: match raw.on_unavailable.as_str() {
            "reject" => OnUnavailable::Reject,
            "allow" => OnUnavailable::Allow,
            other => {
                return Err(invalid(
                    "residue.on_unavailable",
                    format!("`{other}` is not one of \"reject\", \"allow\""),
                ));
            }
        },
        after_update: match raw.after_update.as_str() {
            "decrement" => AfterUpdate::Decrement,
            "drop" => AfterUpdate::Drop,
            other => {
                return Err(invalid(
                    "residue.after_update",
                    format!("`{other}` is not one of \"decrement\", \"drop\""),
                ));
            }
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_with_token(k: &str) -> Option<String> {
        (k == "TASKGATE_UPSTREAM_TOKEN").then(|| "s3cret-token".to_owned())
    }

    #[test]
    fn defaults_match_design() {
        let c = Config::from_raw(RawConfig::default(), env_with_token).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.access, AccessConfig::default());
        assert_eq!(c.admin_listen.to_string(), "127.0.0.1:9901");
        assert_eq!(c.upstream.scheme, Scheme::HTTPS);
        assert_eq!(c.upstream.authority.as_str(), "ai.api.longlonglong.cn");
        assert_eq!(c.upstream.timeout, Duration::from_millis(10_000));
        assert_eq!(c.upstream.connect_timeout, Duration::from_millis(2_000));
        assert_eq!(c.upstream.retries, 1);
        assert_eq!(c.limits.max_body_bytes, 65_536);
        assert_eq!(c.rate_limit.default.per_second.get(), 5);
        assert_eq!(c.rate_limit.default.burst.get(), 10);
        assert_eq!(c.residue.cache_ttl, Duration::from_millis(5_000));
        assert_eq!(c.residue.on_unavailable, OnUnavailable::Reject);
        assert_eq!(c.audit.fsync, FsyncPolicy::Always);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = RawConfig::parse("[upstream]\ntimeout_msec = 5\n").unwrap_err();
        assert!(err.contains("timeout_msec"), "{err}");
        let err = RawConfig::parse("listn = \"x\"\n").unwrap_err();
        assert!(err.contains("listn"), "{err}");
    }

    #[test]
    fn bad_values_name_their_key() {
        let raw = RawConfig::parse("[rate_limit]\nburst = 0\n").unwrap();
        let err = Config::from_raw(raw, env_with_token)
            .unwrap_err()
            .to_string();
        assert!(err.contains("rate_limit.burst"), "{err}");
        let raw = RawConfig::parse("[upstream]\nurl = \"ftp://x\"\n").unwrap();
        let err = Config::from_raw(raw, env_with_token)
            .unwrap_err()
            .to_string();
        assert!(err.contains("upstream.url"), "{err}");
        let raw = RawConfig::parse("[audit]\nfsync = \"sometimes\"\n").unwrap();
        let err = Config::from_raw(raw, env_with_token)
            .unwrap_err()
            .to_string();
        assert!(err.contains("audit.fsync"), "{err}");
    }

    #[test]
    fn missing_or_empty_token_fails() {
        let err = Config::from_raw(RawConfig::default(), |_| None).unwrap_err();
        assert!(matches!(err, ConfigError::MissingToken));
        let err = Config::from_raw(RawConfig::default(), |k| {
            (k == "TASKGATE_UPSTREAM_TOKEN").then(|| "  ".to_owned())
        })
        .unwrap_err();
        assert!(matches!(err, ConfigError::MissingToken));
    }

    #[test]
    fn env_overrides_file() {
        let raw = RawConfig::parse("listen = \"127.0.0.1:1\"\n").unwrap();
        let c = Config::from_raw(raw, |k| match k {
            "TASKGATE_LISTEN" => Some("127.0.0.1:2".into()),
            "TASKGATE_UPSTREAM_URL" => Some("http://127.0.0.1:3/base/".into()),
            "TASKGATE_UPSTREAM_TOKEN" => Some("t".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.listen, Listen::Tcp("127.0.0.1:2".parse().unwrap()));
        assert_eq!(c.upstream.scheme, Scheme::HTTP);
        assert_eq!(c.upstream.base_path, "/base");
    }

    #[test]
    fn redacted_output_never_holds_the_token() {
        let raw = RawConfig::default();
        let c = Config::from_raw(raw.clone(), env_with_token).unwrap();
        let shown = c.to_redacted_toml(&raw);
        assert!(!shown.contains("s3cret-token"));
        assert!(!format!("{c:?}").contains("s3cret-token"));
        assert!(shown.contains("listen"));
    }

    fn load(text: &str) -> Result<Config, String> {
        Config::from_raw(RawConfig::parse(text)?, env_with_token).map_err(|e| e.to_string())
    }

    #[test]
    fn unix_listen_and_its_limits() {
        let c = load("listen = \"unix:/run/taskgate/taskgate.sock\"\n").unwrap();
        assert_eq!(c.listen, Listen::Unix("/run/taskgate/taskgate.sock".into()));
        assert_eq!(c.listen.to_string(), "unix:/run/taskgate/taskgate.sock");
        let env = |k: &str| match k {
            "TASKGATE_LISTEN" => Some("unix:./t.sock".into()),
            _ => env_with_token(k),
        };
        let c = Config::from_raw(RawConfig::default(), env).unwrap();
        assert_eq!(c.listen, Listen::Unix("./t.sock".into()));
        for bad in ["unix:", &format!("unix:/{}", "a".repeat(107))] {
            let err = load(&format!("listen = \"{bad}\"\n")).unwrap_err();
            assert!(err.contains("`listen`"), "{err}");
        }
        let err = load("[access]\nallowed_uids = [1000]\n").unwrap_err();
        assert!(err.contains("access.allowed_uids"), "{err}");
        let c = load("listen = \"unix:/t.sock\"\n[access]\nallowed_uids = [1000, 0]\n").unwrap();
        assert_eq!(c.access.allowed_uids, HashSet::from([0, 1000]));
    }

    const KEY_HEX: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    #[test]
    fn access_section_is_checked_key_by_key() {
        let c = load(&format!(
            "[access]\nallowed_users = [\"5832D184-dd53-42a0-8ace-0bf8d660f4cc\"]\n\
             [[access.callers]]\nname = \"billing\"\nkey_sha256 = \"{KEY_HEX}\"\n\
             users = [\"f232d184-dd54-42a0-8ace-0bf8d660f4cc\"]\n"
        ))
        .unwrap();
        assert_eq!(c.access.allowed_users.len(), 1);
        assert_eq!(c.access.callers[0].name, "billing");
        assert!(c.access.callers[0].key == KeyDigest::of("test"));
        assert_eq!(c.access.callers[0].users.len(), 1);

        let caller = |name: &str, key: &str, users: &str| {
            format!(
                "[[access.callers]]\nname = \"{name}\"\nkey_sha256 = \"{key}\"\nusers = [{users}]\n"
            )
        };
        let two_keys = "1111111111111111111111111111111111111111111111111111111111111111";
        for (text, key) in [
            (caller("b", &KEY_HEX[1..], ""), "access.callers.key_sha256"),
            (
                caller("b", &KEY_HEX.replace('f', "x"), ""),
                "access.callers.key_sha256",
            ),
            (caller("b", KEY_HEX, "\"nope\""), "access.callers.users"),
            (caller("", KEY_HEX, ""), "access.callers.name"),
            (caller("a b", KEY_HEX, ""), "access.callers.name"),
            (
                caller("b", KEY_HEX, "") + &caller("b", two_keys, ""),
                "access.callers.name",
            ),
            (
                caller("a", KEY_HEX, "") + &caller("b", KEY_HEX, ""),
                "access.callers.key_sha256",
            ),
            (
                "[access]\nallowed_users = [\"x\"]\n".to_owned(),
                "access.allowed_users",
            ),
        ] {
            let err = load(&text).unwrap_err();
            assert!(err.contains(key), "{key}: {err}");
        }
        let err = RawConfig::parse("[[access.callers]]\nname = \"b\"\nkey = \"k\"\n").unwrap_err();
        assert!(err.contains("key"), "{err}");
    }

    #[test]
    fn redacted_output_hides_caller_key_digests() {
        let raw = RawConfig::parse(&format!(
            "[[access.callers]]\nname = \"billing\"\nkey_sha256 = \"{KEY_HEX}\"\n"
        ))
        .unwrap();
        let c = Config::from_raw(raw.clone(), env_with_token).unwrap();
        let shown = c.to_redacted_toml(&raw);
        assert!(shown.contains("billing"), "{shown}");
        assert!(!shown.contains(&KEY_HEX[..16]), "{shown}");
        assert!(!format!("{c:?}").contains(&KEY_HEX[..16]));
    }

    #[test]
    fn shared_section_is_checked_and_its_password_redacted() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cr3t/pw\n").unwrap();
        let text = format!(
            "[shared]\nredis_url = \"redis://10.0.0.9:6379/2\"\npassword_file = {:?}\non_unavailable = \"reject\"\n",
            pw.display().to_string()
        );
        let raw = RawConfig::parse(&text).unwrap();
        let c = Config::from_raw(raw.clone(), env_with_token).unwrap();
        let shared = c.shared.as_ref().unwrap();
        assert_eq!(
            shared.redis_url.expose(),
            "redis://:s3cr3t%2Fpw@10.0.0.9:6379/2"
        );
        assert_eq!(shared.on_unavailable, SharedFallback::Reject);
        assert_eq!(shared.timeout, Duration::from_millis(200));
        assert_eq!(shared.key_prefix, "taskgate:");
        assert!(!format!("{c:?}").contains("s3cr3t"));

        let raw = RawConfig::parse("[shared]\nredis_url = \"redis://:hunter2@127.0.0.1:6379\"\n")
            .unwrap();
        let c = Config::from_raw(raw.clone(), env_with_token).unwrap();
        let shown = c.to_redacted_toml(&raw);
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(
            shown.contains("redis://:<redacted>@127.0.0.1:6379"),
            "{shown}"
        );

        for (bad, key) in [
            ("[shared]\nredis_url = \"http://x\"\n", "shared.redis_url"),
            ("[shared]\nredis_url = \"redis://\"\n", "shared.redis_url"),
            (
                "[shared]\nredis_url = \"redis://x\"\non_unavailable = \"maybe\"\n",
                "shared.on_unavailable",
            ),
            (
                "[shared]\nredis_url = \"redis://x\"\ntimeout_ms = 0\n",
                "shared.timeout_ms",
            ),
            (
                "[shared]\nredis_url = \"redis://x\"\nkey_prefix = \"a{b}\"\n",
                "shared.key_prefix",
            ),
        ] {
            let raw = RawConfig::parse(bad).unwrap();
            let err = Config::from_raw(raw, env_with_token)
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{bad}: {err}");
        }
        assert!(RawConfig::parse("[shared]\nredis_ur = \"redis://x\"\n").is_err());
    }

    #[test]
    fn shipped_example_config_parses() {
        let text = include_str!("../config/taskgate.toml");
        let raw = RawConfig::parse(text).unwrap();
        Config::from_raw(raw, env_with_token).unwrap();
    }
}
