//! The running gateway: builds the shared [`State`], binds the data and admin
//! listeners, owns every background task (limiter sweep, token-file watch,
//! SIGHUP reload) and shuts them down in order.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::access_log::{AccessLog, AccessLogTask};
use crate::audit::{AuditLog, AuditWriterTask};
use crate::config::{Config, ConfigError};
use crate::metrics::Metrics;
use crate::pipeline;
use crate::pipeline::rate_limit::{LocalLimiter, RateLimiter};
use crate::pipeline::residue::ResidueGate;
use crate::server::{self, ServeLimits};
use crate::upstream::{self, TlsSetupError, TokenSource, UpstreamClient};

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
    pub token: TokenSource,
    pub access_log: AccessLog,
    pub audit: AuditLog,
    pub metrics: Arc<Metrics>,
    pub residue: ResidueGate,
    /// Requests being handled, against `limits.max_inflight`. Requests run
    /// in their own tasks, so shutdown waits for this to reach 0 (`idle`)
    /// rather than only for connections to close.
    pub inflight: AtomicUsize,
    pub idle: tokio::sync::Notify,
    /// The file SIGHUP re-reads; `None` when started without one.
    pub config_path: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({key}): {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
}

/// Why a reload was refused; the old config stays in force.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
}

/// A started gateway. Dropping it without `shutdown` leaves its tasks running
/// until the runtime ends.
pub struct Gateway {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub state: Arc<State>,
    stop: watch::Sender<bool>,
    grace: Duration,
    servers: Vec<JoinHandle<()>>,
    housekeeping: Vec<JoinHandle<()>>,
    audit: AuditWriterTask,
    access_log: AccessLogTask,
}

impl Gateway {
    /// Binds both listeners and starts serving. The access log goes to
    /// `access_out` (stdout in production).
    pub async fn start(
        config: Config,
        config_path: Option<PathBuf>,
        access_out: Box<dyn Write + Send>,
    ) -> Result<Gateway, StartError> {
        let client = upstream::build_client(&config.upstream)?;
        let data = bind("listen", config.listen).await?;
        let admin = bind("admin_listen", config.admin_listen).await?;
        let local = |l: &TcpListener, key, addr| {
            l.local_addr()
                .map_err(|source| StartError::Bind { key, addr, source })
        };
        let listen = local(&data, "listen", config.listen)?;
        let admin_listen = local(&admin, "admin_listen", config.admin_listen)?;

        let metrics = Arc::new(Metrics::default());
        let (access_log, access_task) =
            AccessLog::start(access_out, metrics.access_log_dropped.clone());
        // Never fails: an unwritable log starts "not ready" and recovers.
        let (audit, audit_task) = AuditLog::start(config.audit.clone(), metrics.clone());
        let limits_grace = config.shutdown_grace;
        let limits = ServeLimits {
            max_connections: config.limits.max_connections,
            header_read_timeout: config.limits.header_read_timeout,
            grace: config.shutdown_grace,
        };
        let state = Arc::new(State {
            token: TokenSource::new(&config.upstream.token),
            live: ArcSwap::from_pointee(Live {
                limiter: Arc::new(LocalLimiter::new(&config.rate_limit)),
                config,
                client,
            }),
            access_log,
            audit,
            metrics,
            residue: ResidueGate::default(),
            inflight: AtomicUsize::new(0),
            idle: tokio::sync::Notify::new(),
            config_path,
        });
        let (stop, stopped) = watch::channel(false);

        let data_state = state.clone();
        let data_server = tokio::spawn(server::serve(
            data,
            limits.clone(),
            stopped.clone(),
            move |req, peer| pipeline::handle(data_state.clone(), peer, req),
        ));
        let admin_state = state.clone();
        let admin_server = tokio::spawn(server::serve(
            admin,
            limits,
            stopped.clone(),
            move |req, _peer| {
                let state = admin_state.clone();
                async move { admin_handle(&state, req) }
            },
        ));
        let housekeeping = vec![
            // Evicts fully refilled rate-limit buckets so the table stays small.
            every(Duration::from_secs(5), stopped.clone(), {
                let state = state.clone();
                move || state.live.load().limiter.sweep()
            }),
            // Token rotation without restart: the file is re-read every second.
            every(Duration::from_secs(1), stopped, {
                let state = state.clone();
                move || {
                    state.token.refresh();
                }
            }),
        ];
        Ok(Gateway {
            listen,
            admin_listen,
            state,
            stop,
            grace: limits_grace,
            servers: vec![data_server, admin_server],
            housekeeping,
            audit: audit_task,
            access_log: access_task,
        })
    }

    /// Stops accepting, lets in-flight requests finish within the grace
    /// period, stops the background tasks, flushes and fsyncs the audit log,
    /// then flushes the access log.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        // The start-up value, as the listeners' drain uses (a restart applies a new one).
        let grace = self.grace;
        let deadline = tokio::time::Instant::now() + grace;
        for task in self.servers.into_iter().chain(self.housekeeping) {
            let _ = task.await;
        }
        // Requests whose callers hung up still run; let them finish too.
        let drained = tokio::time::timeout_at(deadline, async {
            loop {
                let idle = self.state.idle.notified();
                if self.state.inflight.load(Ordering::Acquire) == 0 {
                    break;
                }
                idle.await;
            }
        });
        if drained.await.is_err() {
            tracing::warn!("grace period over with requests still running");
        }
        // Bounded: a hung disk must not keep the process from exiting.
        match tokio::time::timeout(grace, self.audit.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(cause = %e, "audit log flush at shutdown failed"),
            Err(_) => tracing::error!("audit log flush at shutdown timed out"),
        }
        // The writer thread blocks on its channel; join it off the runtime.
        let access_log = self.access_log;
        let _ = tokio::task::spawn_blocking(move || access_log.stop()).await;
    }
}

/// Runs `tick` every `period` until shutdown.
fn every(
    period: Duration,
    mut stop: server::Shutdown,
    tick: impl Fn() + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = server::fired(&mut stop) => break,
                _ = interval.tick() => tick(),
            }
        }
    })
}

/// Re-reads the config file and swaps in what may change at run time: rate
/// limits, residue settings, timeouts, validation, body limits, the upstream
/// and the token source. Listener addresses, the runtime and the audit path
/// need a restart; a change there is logged and otherwise ignored.
pub fn reload(state: &State) -> Result<(), ReloadError> {
    let new = Config::load(state.config_path.as_deref())?;
    let old = state.live.load();
    let old_cfg = &old.config;
    for (key, changed) in [
        ("listen", new.listen != old_cfg.listen),
        ("admin_listen", new.admin_listen != old_cfg.admin_listen),
        (
            "limits.max_connections",
            new.limits.max_connections != old_cfg.limits.max_connections,
        ),
        (
            "limits.header_read_timeout_ms",
            new.limits.header_read_timeout != old_cfg.limits.header_read_timeout,
        ),
        (
            "runtime.worker_threads",
            new.worker_threads != old_cfg.worker_threads,
        ),
        ("log.format", new.log_format != old_cfg.log_format),
        ("audit", new.audit != old_cfg.audit),
    ] {
        if changed {
            tracing::warn!(
                key,
                "changed in the config file; takes effect after a restart"
            );
        }
    }
    // Keep the buckets when the limits did not change: a reload must not
    // hand every user a fresh burst.
    let limiter = if new.rate_limit == old_cfg.rate_limit {
        old.limiter.clone()
    } else {
        Arc::new(LocalLimiter::new(&new.rate_limit))
    };
    let client = if new.upstream.same_connection_settings(&old_cfg.upstream) {
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
    tracing::info!("configuration reloaded");
    Ok(())
}

/// Runs until `signal()` completes, then shuts down in order. SIGHUP reloads
/// the config; a second stop signal during the drain exits at once.
pub async fn run<F>(
    config: Config,
    config_path: Option<PathBuf>,
    signal: impl Fn() -> F,
) -> Result<(), StartError>
where
    F: Future<Output = ()> + Send + 'static,
{
    let gateway = Gateway::start(config, config_path, Box::new(std::io::stdout())).await?;
    tracing::info!(listen = %gateway.listen, admin_listen = %gateway.admin_listen, "taskgate ready");
    let reloader = spawn_reloader(gateway.state.clone());
    signal().await;
    tracing::info!("shutting down: draining in-flight requests");
    let second = signal();
    let _impatient = tokio::spawn(async move {
        second.await;
        tracing::warn!("second stop signal: exiting without waiting");
        std::process::exit(130);
    });
    if let Some(r) = reloader {
        r.abort();
    }
    gateway.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

fn spawn_reloader(state: Arc<State>) -> Option<JoinHandle<()>> {
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(cause = %e, "cannot listen for SIGHUP; reload disabled");
            return None;
        }
    };
    Some(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if let Err(e) = reload(&state) {
                tracing::error!(cause = %e, "reload failed; keeping the running configuration");
            }
        }
    }))
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { key, addr, source })
}

/// The admin listener: metrics, liveness and readiness.
fn admin_handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            state.metrics.encode(),
        ),
        (&Method::GET, "/healthz") => (
            StatusCode::OK,
            "application/json",
            r#"{"status":"ok"}"#.to_owned(),
        ),
        (&Method::GET, "/readyz") => {
            // A token is always held once started (start-up fails without
            // one); the audit log can become unwritable at any time.
            if state.audit.is_writable() {
                (
                    StatusCode::OK,
                    "application/json",
                    r#"{"status":"ready","checks":{"token":"ok","audit":"ok"}}"#.to_owned(),
                )
            } else {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "application/json",
                    r#"{"status":"not ready","failing":"audit","checks":{"token":"ok","audit":"not writable"}}"#
                        .to_owned(),
                )
            }
        }
        _ => (
            StatusCode::NOT_FOUND,
            "application/json",
            r#"{"status":"not found"}"#.to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    resp
}
