//! What every request shares: the swappable [`Live`] config and clients, and
//! the long-lived pieces ([`State`]) that `app` builds once and hands in.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLog;
use crate::audit::{AuditLog, Caller};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline::rate_limit::RateLimiter;
use crate::pipeline::residue::ResidueGate;
use crate::shared::SharedState;
use crate::upstream::{TokenSource, UpstreamClient};

/// What a config reload may change, swapped as one piece so a request sees
/// one consistent config from start to end.
pub struct Live {
    pub config: Config,
    pub client: UpstreamClient,
    pub limiter: Arc<dyn RateLimiter>,
}

/// Everything a request needs, shared by all connections.
pub struct State {
    pub live: ArcSwap<Live>,
    pub token: Arc<TokenSource>,
    pub access_log: AccessLog,
    pub audit: AuditLog,
    pub metrics: Arc<Metrics>,
    pub residue: ResidueGate,
    /// `[shared]`: the state every replica shares (a restart applies changes).
    pub shared: Option<Arc<SharedState>>,
    /// Requests being handled, against `limits.max_inflight`.
    pub inflight: AtomicUsize,
    /// Every request runs in a task of its own (a caller that hangs up must
    /// not cut an update off between its attempt and its outcome); shutdown
    /// waits on this tracker for them, within the grace period.
    pub requests: TaskTracker,
}

impl State {
    /// How a request waits for its audit record: the only request in
    /// flight (nothing else wants its worker) spins briefly for a write's
    /// acknowledgement rather than park (`audit::Caller`).
    pub fn audit_caller(&self) -> Caller {
        if self.inflight.load(Ordering::Acquire) <= 1 {
            Caller::Alone
        } else {
            Caller::Busy
        }
    }
}
