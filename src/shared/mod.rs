//! Shared state across replicas, in Redis (DESIGN.md "Shared state across
//! replicas"): one GCRA bucket per rate-limit key, a lease per caller line
//! from its residue check until its outcome is settled, and the line-list
//! cache. Every call is bounded by `shared.timeout_ms`; a failed or silent
//! call marks Redis down, after which calls fail at once (the pipeline then
//! applies `shared.on_unavailable`) until the health task sees Redis answer
//! again. Redis holds bucket state, leases and line lists only: never the
//! token, a request body or an audit record.
//!
//! # Keys
//!
//! All start with `shared.key_prefix`; a user's keys share the cluster hash
//! tag `{<user_id>}`. `<sub>` is the sub-user id or `-`.
//!
//! - `<prefix>{<user>}:rl:<sub>` — GCRA theoretical arrival time (µs).
//! - `<prefix>global:rl` — the global cap's bucket.
//! - `<prefix>{<user>}:lease:<sub>:<line>` — the line's lease (owner token),
//!   and `...:released`, the channel its release is published on.
//! - `<prefix>{<user>}:lines:<sub>` — the cached line list (line -> residue).
//! - `<prefix>{<user>}:gen:<sub>` — bumped by every invalidation of a line.

mod scripts;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{IntoConnectionInfo, RedisResult, Script};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::{SharedConfig, SharedFallback};
use crate::metrics::Metrics;

/// Redis did not answer in time, failed, or is known to be down.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("shared state (Redis) unavailable")]
pub struct Unavailable;

/// The shared URL could not be used at all (checked at start-up).
#[derive(Debug, thiserror::Error)]
#[error("shared.redis_url: {0}")]
pub struct SharedSetupError(String);

/// One rate-limit decision from the shared bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateAnswer {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Whole seconds, rounded up, at least 1 (when refused).
    pub retry_after_secs: u64,
}

/// Who an update of a line belongs to: user, sub-user, line.
pub type LineKey = (Uuid, Option<Uuid>, Uuid);

/// A held line lease.
#[derive(Debug)]
pub struct Lease {
    key: String,
    token: String,
    /// Read with the lease, in its round trip: the line's cached residue and
    /// the list's generation, for the residue check that follows.
    seen: Option<(Option<i64>, i64)>,
}

impl Lease {
    /// What was read with the lease (once).
    pub fn take_seen(&mut self) -> Option<(Option<i64>, i64)> {
        self.seen.take()
    }
}

/// How a wait for a line ended.
#[derive(Debug)]
pub enum LeaseOutcome {
    Acquired(Lease),
    /// Another replica held the line for the whole wait.
    TimedOut,
}

pub struct SharedState {
    client: redis::Client,
    manager_config: ConnectionManagerConfig,
    conn: ArcSwapOption<ConnectionManager>,
    prefix: String,
    timeout: Duration,
    fallback: SharedFallback,
    up: AtomicBool,
    /// A timeout may leave the connection half-open (the manager only
    /// reconnects on errors): the health task replaces it.
    stale: AtomicBool,
    /// Wakes the health task when a call fails.
    failed: Notify,
    /// The current outage has been logged (once per outage).
    down_logged: AtomicBool,
    metrics: Arc<Metrics>,
    gcra: Script,
    lease: Script,
    release: Script,
    fill: Script,
    settle: Script,
}

/// How often the health task looks at Redis while it is down (and, while it
/// is up, how often it pings, so `taskgate_shared_up` is true without traffic).
const HEALTH_EVERY: Duration = Duration::from_secs(1);
const PING_WHEN_UP: Duration = Duration::from_secs(5);

impl SharedState {
    /// Checks the URL; connects later (the health task), so a Redis that is
    /// down at start-up does not stop the gateway.
    pub fn new(cfg: &SharedConfig, metrics: Arc<Metrics>) -> Result<SharedState, SharedSetupError> {
        let info = cfg
            .redis_url
            .expose()
            .into_connection_info()
            .map_err(|e| SharedSetupError(e.to_string()))?;
        // Keepalive finds a peer that vanished without a FIN; the response
        // timeout finds one that stays connected and silent.
        let keepalive = redis::io::tcp::socket2::TcpKeepalive::new()
            .with_time(Duration::from_secs(10))
            .with_interval(Duration::from_secs(5));
        let info = info.set_tcp_settings(
            redis::io::tcp::TcpSettings::default()
                .set_nodelay(true)
                .set_keepalive(keepalive),
        );
        let client = redis::Client::open(info).map_err(|e| SharedSetupError(e.to_string()))?;
        // redis-rs's own response timeout sits above ours, so a silent
        // connection is always found by `call`'s timer, which replaces it.
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.timeout))
            .set_response_timeout(Some(cfg.timeout * 2))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        metrics.shared_up.set(0);
        Ok(SharedState {
            client,
            manager_config,
            conn: ArcSwapOption::empty(),
            prefix: cfg.key_prefix.clone(),
            timeout: cfg.timeout,
            fallback: cfg.on_unavailable,
            up: AtomicBool::new(false),
            stale: AtomicBool::new(false),
            failed: Notify::new(),
            down_logged: AtomicBool::new(false),
            metrics,
            gcra: Script::new(scripts::GCRA),
            lease: Script::new(scripts::LEASE),
            release: Script::new(scripts::RELEASE),
            fill: Script::new(scripts::FILL),
            settle: Script::new(scripts::SETTLE),
        })
    }

    /// Whether Redis answered the last call.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    pub fn fallback(&self) -> SharedFallback {
        self.fallback
    }

    /// The first connection, made before the gateway reports ready (bounded
    /// by twice `shared.timeout_ms`): updates right after start-up find the
    /// shared state up, or, if Redis is down, the fallback in place and said.
    pub async fn connect_now(&self) {
        self.check().await;
    }

    /// Connects, and reconnects after failures, until `stop`: pings every
    /// second while Redis is down, every five while it is up.
    pub async fn run_health(self: Arc<Self>, stop: CancellationToken) {
        loop {
            self.check().await;
            let pause = if self.is_up() {
                PING_WHEN_UP
            } else {
                HEALTH_EVERY
            };
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.failed.notified(), if self.is_up() => {},
                () = tokio::time::sleep(pause) => {},
            }
        }
    }

    async fn check(&self) {
        if self.stale.swap(false, Ordering::AcqRel) {
            self.conn.store(None);
        }
        let conn = match self.conn.load_full() {
            Some(c) => c,
            None => {
                let made = tokio::time::timeout(
                    self.timeout * 2,
                    self.client
                        .get_connection_manager_with_config(self.manager_config.clone()),
                )
                .await;
                match made {
                    Ok(Ok(c)) => {
                        let c = Arc::new(c);
                        self.conn.store(Some(c.clone()));
                        c
                    }
                    Ok(Err(e)) => {
                        self.mark_down("connect", &e.to_string());
                        return;
                    }
                    Err(_) => {
                        self.mark_down("connect", "timed out");
                        return;
                    }
                }
            }
        };
        let mut c = (*conn).clone();
        let ping = tokio::time::timeout(
            self.timeout,
            redis::cmd("PING").query_async::<String>(&mut c),
        )
        .await;
        match ping {
            Ok(Ok(_)) => {
                if !self.up.swap(true, Ordering::AcqRel) {
                    tracing::info!(
                        "shared state (Redis) answers: limits and line leases are shared"
                    );
                }
                self.down_logged.store(false, Ordering::Release);
                self.metrics.shared_up.set(1);
            }
            Ok(Err(e)) if !e.is_timeout() => self.mark_down("ping", &e.to_string()),
            Ok(Err(_)) | Err(_) => {
                self.stale.store(true, Ordering::Release);
                self.mark_down("ping", "timed out");
            }
        }
    }

    fn mark_down(&self, op: &'static str, cause: &str) {
        self.up.store(false, Ordering::Release);
        if !self.down_logged.swap(true, Ordering::AcqRel) {
            tracing::error!(
                op,
                cause,
                fallback = ?self.fallback,
                "shared state (Redis) unavailable: shared.on_unavailable applies until it answers"
            );
        }
        self.metrics.shared_up.set(0);
        self.failed.notify_one();
    }

    /// Runs one call with the timeout, the metrics and the down-marking.
    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, Unavailable>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let conn = match (self.is_up(), self.conn.load_full()) {
            (true, Some(c)) => (*c).clone(),
            _ => {
                self.metrics.count_shared(op, "skipped");
                return Err(Unavailable);
            }
        };
        let started = Instant::now();
        let result = tokio::time::timeout(self.timeout, f(conn)).await;
        self.metrics.observe_shared(op, started.elapsed());
        match result {
            Ok(Ok(v)) => {
                self.metrics.count_shared(op, "ok");
                Ok(v)
            }
            Ok(Err(e)) if !e.is_timeout() => {
                self.metrics.count_shared(op, "error");
                self.mark_down(op, &e.to_string());
                Err(Unavailable)
            }
            Ok(Err(_)) | Err(_) => {
                self.metrics.count_shared(op, "timeout");
                self.stale.store(true, Ordering::Release);
                self.mark_down(op, "no answer within shared.timeout_ms");
                Err(Unavailable)
            }
        }
    }

    fn user_key(&self, user: Uuid, kind: &str, sub: Option<Uuid>) -> String {
        let sub = sub.map_or_else(|| "-".to_owned(), |s| s.to_string());
        format!("{}{{{user}}}:{kind}:{sub}", self.prefix)
    }

    /// One GCRA decision for `user`/`sub`'s bucket (and the global cap).
    pub async fn rate(
        &self,
        user: Uuid,
        sub: Option<Uuid>,
        burst: u32,
        per_second: u32,
        global_per_second: Option<u32>,
    ) -> Result<RateAnswer, Unavailable> {
        let key = self.user_key(user, "rl", sub);
        let global = format!("{}global:rl", self.prefix);
        let g = global_per_second.unwrap_or(0);
        let (allowed, limit, remaining, retry_us): (i64, i64, i64, i64) = self
            .call("rate", |mut c| async move {
                let mut inv = self.gcra.key(&key);
                if g > 0 {
                    inv.key(&global);
                }
                inv.arg(burst).arg(per_second).arg(g);
                inv.invoke_async(&mut c).await
            })
            .await?;
        Ok(RateAnswer {
            allowed: allowed == 1,
            limit: u32::try_from(limit).unwrap_or(burst),
            remaining: u32::try_from(remaining.max(0)).unwrap_or(0),
            retry_after_secs: u64::try_from(retry_us.max(1))
                .unwrap_or(1)
                .div_ceil(1_000_000)
                .max(1),
        })
    }

    /// Takes the line's lease for `hold`, waiting at most `wait` for another
    /// replica's (woken by its release, with the lease's remaining time as
    /// the backstop; never polling).
    pub async fn acquire_line(
        &self,
        key: LineKey,
        hold: Duration,
        wait: Duration,
    ) -> Result<LeaseOutcome, Unavailable> {
        let (user, sub, line) = key;
        let lease_key = format!("{}:{line}", self.user_key(user, "lease", sub));
        let channel = format!("{lease_key}:released");
        let token = Uuid::new_v4().to_string();
        let deadline = tokio::time::Instant::now() + wait;
        let hold_ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX);
        let list = self.user_key(user, "lines", sub);
        let gen_key = self.user_key(user, "gen", sub);
        let field = line.to_string();
        // One round trip: the lease if free, with what the check reads next;
        // else how long the holder has left.
        let try_take = || {
            let (k, t) = (lease_key.clone(), token.clone());
            let (list, gen_key, field) = (list.clone(), gen_key.clone(), field.clone());
            self.call("lease", move |mut c| async move {
                let (taken, residue, generation, left): (i64, Option<i64>, i64, i64) = self
                    .lease
                    .key(&k)
                    .key(&list)
                    .key(&gen_key)
                    .arg(&t)
                    .arg(hold_ms)
                    .arg(&field)
                    .invoke_async(&mut c)
                    .await?;
                Ok((taken == 1).then_some((residue, generation)).ok_or(left))
            })
        };
        let acquired = |seen| {
            LeaseOutcome::Acquired(Lease {
                key: lease_key.clone(),
                token: token.clone(),
                seen: Some(seen),
            })
        };
        if let Ok(seen) = try_take().await? {
            return Ok(acquired(seen));
        }
        // Contended: listen for the release before looking again, so one
        // published between our look and our wait is not missed.
        let mut pubsub =
            match tokio::time::timeout(self.timeout, self.client.get_async_pubsub()).await {
                Ok(Ok(p)) => Some(p),
                _ => None,
            };
        if let Some(p) = pubsub.as_mut()
            && tokio::time::timeout(self.timeout, p.subscribe(&channel))
                .await
                .map_or(true, |r| r.is_err())
        {
            pubsub = None;
        }
        loop {
            let ttl_ms = match try_take().await? {
                Ok(seen) => return Ok(acquired(seen)),
                Err(left) => left,
            };
            let now = tokio::time::Instant::now();
            if now >= deadline {
                return Ok(LeaseOutcome::TimedOut);
            }
            // The holder's remaining time bounds the wait; without pub/sub
            // (it could not be set up) that is the only wake-up.
            let backstop = Duration::from_millis(u64::try_from(ttl_ms).unwrap_or(0).max(1));
            let until = (now + backstop).min(deadline);
            match pubsub.as_mut() {
                Some(p) => {
                    let mut messages = p.on_message();
                    let _ = tokio::time::timeout_at(
                        until,
                        futures_util::StreamExt::next(&mut messages),
                    )
                    .await;
                }
                None => tokio::time::sleep_until(until).await,
            }
        }
    }

    /// Releases the lease (if still ours) and wakes the waiters. Failures are
    /// logged by `call`; the lease then runs out by itself.
    pub async fn release_line(&self, lease: Lease) {
        let channel = format!("{}:released", lease.key);
        let _: Result<i64, _> = self
            .call("release", |mut c| async move {
                self.release
                    .key(&lease.key)
                    .key(&channel)
                    .arg(&lease.token)
                    .invoke_async(&mut c)
                    .await
            })
            .await;
    }

    /// The cached residue of `line` (if the shared cache holds it) and the
    /// list's generation (for a fill after a vendor read).
    pub async fn cached_residue(
        &self,
        user: Uuid,
        sub: Option<Uuid>,
        line: Uuid,
    ) -> Result<(Option<i64>, i64), Unavailable> {
        let list = self.user_key(user, "lines", sub);
        let gen_key = self.user_key(user, "gen", sub);
        let field = line.to_string();
        self.call("lines_get", |mut c| async move {
            let (residue, generation): (Option<i64>, Option<i64>) = redis::pipe()
                .hget(&list, &field)
                .get(&gen_key)
                .query_async(&mut c)
                .await?;
            Ok((residue, generation.unwrap_or(0)))
        })
        .await
    }

    /// Stores a list read from the vendor, unless a line was invalidated
    /// since `generation` was read.
    pub async fn fill_lines(
        &self,
        user: Uuid,
        sub: Option<Uuid>,
        lines: &[(Uuid, i64)],
        generation: i64,
        ttl: Duration,
    ) -> Result<bool, Unavailable> {
        let list = self.user_key(user, "lines", sub);
        let gen_key = self.user_key(user, "gen", sub);
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1);
        let stored: i64 = self
            .call("lines_fill", |mut c| async move {
                let mut inv = self.fill.key(&list);
                inv.key(&gen_key).arg(generation).arg(ttl_ms);
                for (line, residue) in lines {
                    inv.arg(line.to_string()).arg(*residue);
                }
                inv.invoke_async(&mut c).await
            })
            .await?;
        Ok(stored == 1)
    }

    /// After an update of `line`: lowers its cached residue by `decrement`
    /// (an accepted update with `after_update = "decrement"`), or forgets
    /// it; the other lines stay. With `release`, the lease goes in the same
    /// round trip, after the line is settled. `gen_ttl` must outlive any
    /// fill in flight.
    pub async fn settle_line(
        &self,
        user: Uuid,
        sub: Option<Uuid>,
        line: Uuid,
        decrement: Option<i64>,
        gen_ttl: Duration,
        release: Option<Lease>,
    ) -> Result<(), Unavailable> {
        let list = self.user_key(user, "lines", sub);
        let gen_key = self.user_key(user, "gen", sub);
        let ttl_ms = u64::try_from(gen_ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1);
        let _: i64 = self
            .call("lines_settle", |mut c| async move {
                let mut inv = self.settle.key(&list);
                inv.key(&gen_key)
                    .arg(line.to_string())
                    .arg(decrement.unwrap_or(0).max(0))
                    .arg(ttl_ms);
                if let Some(lease) = &release {
                    inv.key(&lease.key)
                        .key(format!("{}:released", lease.key))
                        .arg(&lease.token);
                }
                inv.invoke_async(&mut c).await
            })
            .await?;
        Ok(())
    }
}
