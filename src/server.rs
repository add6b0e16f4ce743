//! Listeners: the accept loop, the connection cap, the header read timeout,
//! HTTP/1.1 and h2c on one port, and the graceful drain at shutdown.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// Per-listener protection against slow or greedy clients.
#[derive(Debug, Clone)]
pub struct ServeLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// How long in-flight requests may take to finish once shutdown starts.
    pub grace: Duration,
}

/// A signal that flips to `true` once, when the process should stop accepting.
pub type Shutdown = watch::Receiver<bool>;

/// The HTTP/2 connection preface; anything else is HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Waits until the first bytes tell HTTP/1 from h2c, at most `deadline`.
/// Normal clients send a request line or the whole preface at once, so this
/// is one readiness wait and one peek; only a client trickling a prefix of
/// the preface makes it look again.
async fn protocol_known_in_time(stream: &tokio::net::TcpStream, deadline: Duration) -> bool {
    let until = tokio::time::Instant::now() + deadline;
    let mut buf = [0u8; 24];
    loop {
        if tokio::time::timeout_at(until, stream.readable())
            .await
            .is_err()
        {
            return false;
        }
        // `readable` may report readiness that is not there (tokio says so;
        // a freshly accepted socket does), and `peek` then waits for data:
        // it needs the deadline as much as the readiness wait does.
        let n = match tokio::time::timeout_at(until, stream.peek(&mut buf)).await {
            Ok(Ok(0) | Err(_)) | Err(_) => return false,
            Ok(Ok(n)) => n,
        };
        if n == H2_PREFACE.len() || !H2_PREFACE.starts_with(&buf[..n]) {
            return true;
        }
        // A partial preface: readiness stays set while bytes are buffered,
        // so wait a little before looking again.
        if tokio::time::timeout_at(until, tokio::time::sleep(Duration::from_millis(10)))
            .await
            .is_err()
        {
            return false;
        }
    }
}

/// Completes once shutdown has been signalled (or its sender is gone).
pub async fn fired(shutdown: &mut Shutdown) {
    // The guard `wait_for` returns is not `Send`; drop it here.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Serves `handler` on `listener` until `shutdown` fires, then lets open
/// connections finish their current request within `limits.grace`.
pub async fn serve<H, F>(
    listener: TcpListener,
    limits: ServeLimits,
    mut shutdown: Shutdown,
    handler: H,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(100)
        .max_buf_size(64 * 1024);
    // hyper has no header timeout for h2: a peer that stops answering (a
    // stalled request head, or nothing after the preface) is found by an
    // unanswered PING instead, on the same clock as the HTTP/1 timeout.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.header_read_timeout);
    let graceful = GracefulShutdown::new();
    // Past the cap we stop accepting; the kernel backlog holds the rest.
    let slots = Arc::new(Semaphore::new(limits.max_connections));

    loop {
        let permit = tokio::select! {
            biased;
            () = fired(&mut shutdown) => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (stream, peer) = tokio::select! {
            biased;
            () = fired(&mut shutdown) => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(cause = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |req| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req, peer).await) }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let deadline = limits.header_read_timeout;
        tokio::spawn(async move {
            // hyper's header timeout starts only once the protocol is known;
            // a client that sends nothing, or the h2c preface a byte at a
            // time, must not hold a connection slot for longer than it.
            if protocol_known_in_time(&stream, deadline).await {
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                // Connection errors (client went away, bad framing) are the
                // client's business; hyper has already answered what it could.
                if let Err(e) = watcher.watch(conn.into_owned()).await {
                    tracing::debug!(cause = %e, client = %peer, "connection ended with an error");
                }
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_ms = limits.grace.as_millis() as u64,
            "grace period over; closing remaining connections"
        );
    }
}
