//! SIGHUP: re-read the config file and swap in what may change at run time
//! (rate limits, residue settings, timeouts, validation, body limits, the
//! upstream and the token source, and `[access]`: callers, allowed users and
//! uids). Listener addresses, connection limits,
//! the runtime, logging and the audit log need a restart: a change there is
//! reported and otherwise ignored.

use std::path::Path;
use std::sync::Arc;

use crate::config::{Config, ConfigError};
use crate::pipeline::rate_limit::LocalLimiter;
use crate::pipeline::state::{Live, State};
use crate::upstream::{self, TlsSetupError};

/// Why a reload was refused; the old config stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
}

/// What a reload changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Sections now in force with new values.
    pub applied: Vec<&'static str>,
    /// Keys that differ in the file but take effect only after a restart.
    pub need_restart: Vec<&'static str>,
}

/// Re-reads `path` (defaults only, when the gateway started without a file)
/// and swaps the new live config in. On error nothing changes.
pub fn reload(state: &State, path: Option<&Path>) -> Result<Changes, ReloadError> {
    let new = Config::load(path)?;
    let old = state.live.load();
    let was = &old.config;
    let mut changes = Changes::default();
    for (key, changed) in [
        ("listen", new.listen != was.listen),
        ("admin_listen", new.admin_listen != was.admin_listen),
        (
            "limits.max_connections",
            new.limits.max_connections != was.limits.max_connections,
        ),
        (
            "limits.header_read_timeout_ms",
            new.limits.header_read_timeout != was.limits.header_read_timeout,
        ),
        (
            "runtime.worker_threads",
            new.worker_threads != was.worker_threads,
        ),
        ("log.format", new.log_format != was.log_format),
        ("audit", new.audit != was.audit),
        (
            "shutdown_grace_ms",
            new.shutdown_grace != was.shutdown_grace,
        ),
    ] {
        if changed {
            changes.need_restart.push(key);
        }
    }
    for (key, changed) in [
        ("upstream", !new.upstream.same_settings(&was.upstream)),
        (
            "limits",
            new.limits.max_body_bytes != was.limits.max_body_bytes
                || new.limits.max_inflight != was.limits.max_inflight,
        ),
        (
            "validation",
            new.validation.allow_unknown_fields != was.validation.allow_unknown_fields,
        ),
        ("rate_limit", new.rate_limit != was.rate_limit),
        ("residue", new.residue != was.residue),
        ("access", new.access != was.access),
    ] {
        if changed {
            changes.applied.push(key);
        }
    }
    // Keep the buckets when the limits did not change: a reload must not
    // hand every user a fresh burst.
    let limiter = if new.rate_limit == was.rate_limit {
        old.limiter.clone()
    } else {
        Arc::new(LocalLimiter::new(&new.rate_limit))
    };
    let client = if new.upstream.same_connection_settings(&was.upstream) {
        old.client.clone()
    } else {
        upstream::build_client(&new.upstream)?
    };
    state.token.set(&new.upstream.token);
    state.live.store(Arc::new(Live {
        config: new,
        client,
        limiter,
    }));
    Ok(changes)
}
