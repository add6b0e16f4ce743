//! The running gateway: builds the shared [`State`], binds the data and admin
//! listeners, owns every background task and shuts them down in order.

use std::future::Future;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::access_log::{AccessLog, AccessLogTask};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::pipeline;
use crate::pipeline::rate_limit::{LocalLimiter, RateLimiter};
use crate::pipeline::residue::ResidueGate;
use crate::server::{self, ServeLimits};
use crate::upstream::{self, TlsSetupError, TokenSource, UpstreamClient};

/// Everything a request needs, shared by all connections.
pub struct State {
    pub config: Config,
    pub token: TokenSource,
    pub client: UpstreamClient,
    pub access_log: AccessLog,
    pub metrics: Metrics,
    pub residue: ResidueGate,
    pub limiter: Arc<dyn RateLimiter>,
    /// Requests being handled, against `limits.max_inflight`.
    pub inflight: AtomicUsize,
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

/// A started gateway. Dropping it without `shutdown` leaves its tasks running
/// until the runtime ends.
pub struct Gateway {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    stop: watch::Sender<bool>,
    servers: Vec<JoinHandle<()>>,
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
        let data = bind("listen", config.listen).await?;
        let admin = bind("admin_listen", config.admin_listen).await?;
        let listen = data.local_addr().map_err(|source| StartError::Bind {
            key: "listen",
            addr: config.listen,
            source,
        })?;
        let admin_listen = admin.local_addr().map_err(|source| StartError::Bind {
            key: "admin_listen",
            addr: config.admin_listen,
            source,
        })?;

        let (access_log, access_task) = AccessLog::start(access_out);
        let local_limiter = Arc::new(LocalLimiter::new(&config.rate_limit));
        let limiter: Arc<dyn RateLimiter> = local_limiter.clone();
        let limits = ServeLimits {
            max_connections: config.limits.max_connections,
            header_read_timeout: config.limits.header_read_timeout,
            grace: config.shutdown_grace,
        };
        let state = Arc::new(State {
            token: TokenSource::new(&config.upstream.token),
            config,
            client,
            access_log,
            metrics: Metrics::default(),
            residue: ResidueGate::default(),
            limiter: limiter.clone(),
            inflight: AtomicUsize::new(0),
        });
        let (stop, stopped) = watch::channel(false);

        let data_state = state.clone();
        let data_server = tokio::spawn(server::serve(
            data,
            limits.clone(),
            stopped.clone(),
            move |req, peer| {
                let state = data_state.clone();
                async move { pipeline::handle(&state, peer, req).await }
            },
        ));
        let admin_state = state;
        let admin_server =
            tokio::spawn(server::serve(admin, limits, stopped, move |req, _peer| {
                let state = admin_state.clone();
                async move { admin_handle(&state, req) }
            }));
        // Evicts fully refilled rate-limit buckets so the table stays small.
        let mut sweep_stop = stop.subscribe();
        let sweeper = tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
            loop {
                tokio::select! {
                    () = server::fired(&mut sweep_stop) => break,
                    _ = tick.tick() => local_limiter.sweep(),
                }
            }
        });
        Ok(Gateway {
            listen,
            admin_listen,
            stop,
            servers: vec![data_server, admin_server, sweeper],
            access_log: access_task,
        })
    }

    /// Stops accepting, lets in-flight requests finish within the grace
    /// period, then flushes the access log.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        for task in self.servers {
            let _ = task.await;
        }
        // The writer thread blocks on its channel; join it off the runtime.
        let access_log = self.access_log;
        let _ = tokio::task::spawn_blocking(move || access_log.stop()).await;
    }
}

/// Runs until `signal` completes, then shuts down in order.
pub async fn run(config: Config, signal: impl Future<Output = ()>) -> Result<(), StartError> {
    let gateway = Gateway::start(config, Box::new(std::io::stdout())).await?;
    tracing::info!(listen = %gateway.listen, admin_listen = %gateway.admin_listen, "taskgate ready");
    signal.await;
    tracing::info!("shutting down: draining in-flight requests");
    gateway.shutdown().await;
    tracing::info!("stopped");
    Ok(())
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| StartError::Bind { key, addr, source })
}

/// The admin listener: liveness and readiness for probes.
fn admin_handle(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (status, body) = match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz") => (StatusCode::OK, r#"{"status":"ok"}"#.to_owned()),
        (&Method::GET, "/metrics") => {
            let mut resp = Response::new(Full::new(Bytes::from(state.metrics.encode())));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                http::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            return resp;
        }
        (&Method::GET, "/readyz") => {
            // A token is always loaded once started (start-up fails without one).
            let _ = &state.token;
            (
                StatusCode::OK,
                r#"{"status":"ready","checks":{"token":"ok"}}"#.to_owned(),
            )
        }
        _ => (
            StatusCode::NOT_FOUND,
            r#"{"status":"not found"}"#.to_owned(),
        ),
    };
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}
