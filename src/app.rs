//! The running gateway: composes the shared [`State`], binds the data and
//! admin listeners, owns every task it starts (listeners, connections,
//! requests, housekeeping: each on a tracker, stopped by one cancellation
//! token) and shuts them down in order.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::{AccessLog, AccessLogTask};
use crate::audit::{AuditLog, AuditObserver, AuditWriterTask, Event};
use crate::config::{Config, Listen};
use crate::listener::UnixSocket;
use crate::metrics::{EventLabel, Metrics};
use crate::pipeline::rate_limit::LocalLimiter;
use crate::pipeline::residue::ResidueGate;
use crate::pipeline::state::{Live, State};
use crate::server::{self, ServeLimits};
use crate::shared::{SharedSetupError, SharedState};
use crate::signals::{Signal, Signals};
use crate::upstream::{self, TlsSetupError, TokenSource};
use crate::{admin, pipeline, reload};

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        key: &'static str,
        /// A TCP address or `unix:<path>`.
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error(transparent)]
    Shared(#[from] SharedSetupError),
}

/// How the gateway stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// Drained within the grace period (or the grace period ran out).
    Clean,
    /// A second stop signal cut the drain short.
    Hurried,
}

/// A started gateway. Dropping it without `shutdown` leaves its tasks running
/// until the runtime ends.
pub struct Gateway {
    /// The data listener as bound (a TCP port of 0 resolved).
    pub listen: Listen,
    pub admin_listen: SocketAddr,
    pub state: Arc<State>,
    stop: CancellationToken,
    /// Listeners, their connections (and lingering closes), housekeeping.
    tasks: TaskTracker,
    grace: Duration,
    audit: AuditWriterTask,
    access_log: AccessLogTask,
}

impl Gateway {
    /// Binds both listeners and starts serving. The access log goes to
    /// `access_out` (stdout in production).
    pub async fn start(
        config: Config,
        access_out: Box<dyn Write + Send>,
    ) -> Result<Gateway, StartError> {
        let client = upstream::build_client(&config.upstream)?;
        let data = match &config.listen {
            Listen::Tcp(addr) => DataListener::Tcp(bind("listen", *addr).await?),
            Listen::Unix(path) => {
                DataListener::Unix(UnixSocket::bind(path).await.map_err(|source| {
                    StartError::Bind {
                        key: "listen",
                        addr: config.listen.to_string(),
                        source,
                    }
                })?)
            }
        };
        let admin = bind("admin_listen", config.admin_listen).await?;
        let local = |l: &TcpListener, key, addr: SocketAddr| {
            l.local_addr().map_err(|source| StartError::Bind {
                key,
                addr: addr.to_string(),
                source,
            })
        };
        let listen = match (&data, &config.listen) {
            (DataListener::Tcp(l), Listen::Tcp(addr)) => Listen::Tcp(local(l, "listen", *addr)?),
            (_, configured) => configured.clone(),
        };
        let admin_listen = local(&admin, "admin_listen", config.admin_listen)?;

        let metrics = Arc::new(Metrics::default());
        let (access_log, access_task) =
            AccessLog::start(access_out, metrics.access_log_dropped.clone());
        // Never fails: an unwritable log starts "not ready" and recovers.
        let (audit, audit_task) = AuditLog::start(
            config.audit.clone(),
            Arc::new(AuditMetrics(metrics.clone())),
        );
        // redis-rs's TLS (rediss://) asks rustls for the process default.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let shared = config
            .shared
            .as_ref()
            .map(|cfg| SharedState::new(cfg, metrics.clone()).map(Arc::new))
            .transpose()?;
        if let Some(shared) = &shared {
            shared.connect_now().await;
        }
        let grace = config.shutdown_grace;
        let limits = ServeLimits {
            max_connections: config.limits.max_connections,
            header_read_timeout: config.limits.header_read_timeout,
            grace,
        };
        let state = Arc::new(State {
            token: Arc::new(TokenSource::new(&config.upstream.token)),
            live: ArcSwap::from_pointee(Live {
                limiter: Arc::new(LocalLimiter::new(&config.rate_limit)),
                config,
                client,
            }),
            access_log,
            audit,
            metrics,
            residue: ResidueGate::default(),
            shared: shared.clone(),
            inflight: AtomicUsize::new(0),
            requests: TaskTracker::new(),
        });
        let stop = CancellationToken::new();
        let tasks = TaskTracker::new();

        let data_state = state.clone();
        let data_handler = move |req, peer| pipeline::handle(data_state.clone(), peer, req);
        // One accept loop, for either kind of socket; a Unix socket's file
        // goes when the loop drops the listener, as the drain begins.
        match data {
            DataListener::Tcp(l) => tasks.spawn(server::serve(
                l,
                limits.clone(),
                stop.clone(),
                tasks.clone(),
                data_handler,
            )),
            DataListener::Unix(l) => tasks.spawn(server::serve(
                l,
                limits.clone(),
                stop.clone(),
                tasks.clone(),
                data_handler,
            )),
        };
        let admin_state = state.clone();
        tasks.spawn(server::serve(
            admin,
            limits,
            stop.clone(),
            tasks.clone(),
            move |req, _peer| {
                let resp = admin::handle(&admin_state, &req);
                async move { resp }
            },
        ));
        // Connects to Redis and watches it: marks it down and back up.
        if let Some(shared) = shared {
            tasks.spawn(shared.run_health(stop.clone()));
        }
        // Evicts fully refilled rate-limit buckets so the table stays small.
        tasks.spawn(every(Duration::from_secs(5), stop.clone(), {
            let state = state.clone();
            move || {
                state.live.load().limiter.sweep();
                async {}
            }
        }));
        // Token rotation without restart: the file is re-read every second,
        // on a blocking thread (a slow disk must not stall a worker).
        tasks.spawn(every(Duration::from_secs(1), stop.clone(), {
            let token = state.token.clone();
            move || {
                let token = token.clone();
                async move {
                    let _ = tokio::task::spawn_blocking(move || token.refresh()).await;
                }
            }
        }));
        Ok(Gateway {
            listen,
            admin_listen,
            state,
            stop,
            tasks,
            grace,
            audit: audit_task,
            access_log: access_task,
        })
    }

    /// Stops accepting, lets in-flight requests finish within the grace
    /// period (or until `hurry` fires), stops the background tasks, flushes
    /// and fsyncs the audit log, then flushes the access log.
    pub async fn shutdown(self, hurry: impl Future<Output = ()>) -> Stopped {
        self.stop.cancel();
        self.tasks.close();
        self.state.requests.close();
        // The start-up value, as the listeners' drain uses (a restart applies a new one).
        let deadline = tokio::time::Instant::now() + self.grace;
        let drained = async {
            // Listeners drain their connections within the grace period;
            // requests whose callers hung up still run, so wait for those too.
            self.tasks.wait().await;
            self.state.requests.wait().await;
        };
        let stopped = tokio::select! {
            r = tokio::time::timeout_at(deadline, drained) => {
                if r.is_err() {
                    tracing::warn!("grace period over with requests still running");
                }
                Stopped::Clean
            }
            () = hurry => {
                tracing::warn!("second stop signal: not waiting for the rest of the drain");
                Stopped::Hurried
            }
        };
        // Bounded: a hung disk must not keep the process from exiting.
        match tokio::time::timeout(self.grace, self.audit.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(cause = %e, "audit log flush at shutdown failed"),
            Err(_) => tracing::error!("audit log flush at shutdown timed out"),
        }
        // The writer thread blocks on its channel; join it off the runtime.
        let access_log = self.access_log;
        let _ = tokio::task::spawn_blocking(move || access_log.stop()).await;
        stopped
    }
}

/// Runs `tick` every `period` until `stop` is cancelled.
async fn every<F, Fut>(period: Duration, stop: CancellationToken, mut tick: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            _ = interval.tick() => tick().await,
        }
    }
}

/// Serves until a stop signal, reloading on SIGHUP (one that arrived during
/// start-up is handled now), then shuts down in order; a second stop signal
/// during the drain cuts it short.
pub async fn run(
    config: Config,
    config_path: Option<PathBuf>,
    signals: &mut Signals,
) -> Result<Stopped, StartError> {
    let gateway = Gateway::start(config, Box::new(std::io::stdout())).await?;
    tracing::info!(listen = %gateway.listen, admin_listen = %gateway.admin_listen, "taskgate ready");
    while let Some(Signal::Reload) = signals.recv().await {
        apply_reload(&gateway.state, config_path.clone()).await;
    }
    tracing::info!("shutting down: draining in-flight requests");
    let stopped = gateway.shutdown(signals.stop()).await;
    tracing::info!("stopped");
    Ok(stopped)
}

/// One SIGHUP: the file is read on a blocking thread; the outcome is logged.
async fn apply_reload(state: &Arc<State>, path: Option<PathBuf>) {
    let state = state.clone();
    let done = tokio::task::spawn_blocking(move || reload::reload(&state, path.as_deref())).await;
    match done {
        Ok(Ok(changes)) => {
            for key in &changes.need_restart {
                tracing::warn!(
                    key,
                    "changed in the config file; takes effect after a restart"
                );
            }
            tracing::info!(applied = ?changes.applied, "configuration reloaded");
        }
        Ok(Err(e)) => {
            tracing::error!(cause = %e, "reload failed; keeping the running configuration");
        }
        Err(e) => tracing::error!(cause = %e, "reload task failed"),
    }
}

/// The data listener, bound.
enum DataListener {
    Tcp(TcpListener),
    Unix(UnixSocket),
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind {
            key,
            addr: addr.to_string(),
            source,
        })
}

fn count_event(family: &Family<EventLabel, Counter>, event: Event) {
    family
        .get_or_create(&EventLabel {
            event: event.as_str(),
        })
        .inc();
}

/// The audit writer reports through these hooks (some from its own thread).
struct AuditMetrics(Arc<Metrics>);

impl AuditObserver for AuditMetrics {
    fn record_written(&self, event: Event) {
        count_event(&self.0.audit_records, event);
    }

    fn fsync_done(&self, elapsed: Duration) {
        self.0.audit_fsync.observe(elapsed.as_secs_f64());
    }

    fn record_dropped(&self, event: Event) {
        count_event(&self.0.audit_dropped, event);
    }

    fn torn_line(&self) {
        self.0.audit_torn_lines.inc();
    }

    fn file_replaced(&self) {
        self.0.audit_file_replaced.inc();
    }

    fn rejected_skipped(&self) {
        self.0.audit_rejected_skipped.inc();
    }
}
