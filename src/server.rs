//! Listeners: the accept loop, the connection cap, the header read timeout,
//! HTTP/1.1 and h2c on one port, lingering close, and the graceful drain at
//! shutdown, for any [`Listener`] (TCP or a Unix socket). Every connection
//! task is spawned on the caller's tracker.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::listener::Listener;
use crate::peer::Peer;

/// Per-listener protection against slow or greedy clients.
#[derive(Debug, Clone)]
pub struct ServeLimits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// How long in-flight requests may take to finish once shutdown starts.
    pub grace: Duration,
}

/// How long a closed connection keeps reading (and discarding) what the
/// client still sends, so the answer it has not read yet is not destroyed by
/// a TCP reset (NGINX's `lingering_close`; its `lingering_timeout` is 5 s).
const LINGER: Duration = Duration::from_secs(5);

/// The HTTP/2 connection preface; anything else is HTTP/1.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What the first bytes of a connection say.
enum Protocol {
    Http1,
    H2c,
}

/// The first bytes of a connection, read to tell HTTP/1 from h2c and then
/// handed to hyper ahead of the rest of the stream.
#[derive(Default)]
struct Prefix {
    buf: [u8; 24],
    len: usize,
    /// How much of it hyper has read.
    at: usize,
}

/// Reads until the first bytes tell HTTP/1 from h2c, at most `deadline`.
/// Normal clients send a request line or the whole preface at once, so this
/// is one read; only a client trickling a prefix of the preface makes it
/// read again. (Read, not peeked, so any stream will do: a Unix socket
/// cannot peek.)
async fn sniff_protocol<S: AsyncRead + Unpin>(
    stream: &mut S,
    deadline: Duration,
) -> Option<(Protocol, Prefix)> {
    let until = tokio::time::Instant::now() + deadline;
    let mut prefix = Prefix::default();
    loop {
        let n = match tokio::time::timeout_at(until, stream.read(&mut prefix.buf[prefix.len..]))
            .await
        {
            Ok(Ok(0) | Err(_)) | Err(_) => return None,
            Ok(Ok(n)) => n,
        };
        prefix.len += n;
        let seen = &prefix.buf[..prefix.len];
        if !H2_PREFACE.starts_with(seen) {
            return Some((Protocol::Http1, prefix));
        }
        if seen.len() == H2_PREFACE.len() {
            return Some((Protocol::H2c, prefix));
        }
    }
}

/// Completes once `shutdown` has been signalled (or its sender is gone). For
/// the vendor emulator, which stops on a watch channel.
pub async fn fired(shutdown: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns is not `Send`; drop it here.
    let _ = shutdown.wait_for(|stop| *stop).await;
}

/// Serves `handler` on `listener` until `shutdown` is cancelled, then lets
/// open connections finish their current request within `limits.grace`.
/// Connection tasks (and their lingering closes) run on `tasks`.
pub async fn serve<L, H, F>(
    listener: L,
    limits: ServeLimits,
    shutdown: CancellationToken,
    tasks: TaskTracker,
    handler: H,
) where
    L: Listener,
    H: Fn(Request<Incoming>, Peer) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    // The protocol is known from the sniff, so each connection goes straight
    // to its own builder (hyper-util's `auto` would read the preface again
    // behind a rewind wrapper).
    let mut h1 = http1::Builder::new();
    h1.timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_headers(100)
        .max_buf_size(64 * 1024);
    // hyper has no header timeout for h2: a peer that stops answering (a
    // stalled request head, or nothing after the preface) is found by an
    // unanswered PING instead, on the same clock as the HTTP/1 timeout.
    let mut h2 = http2::Builder::new(TokioExecutor::new());
    h2.timer(TokioTimer::new())
        .max_concurrent_streams(256)
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.header_read_timeout);
    // Shared by the connections rather than copied into each.
    let builders = Arc::new((h1, h2));
    let graceful = GracefulShutdown::new();
    // Past the cap we stop accepting; the kernel backlog holds the rest.
    let slots = Arc::new(Semaphore::new(limits.max_connections));

    loop {
        let permit = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let (mut stream, peer) = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
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
        let handler = handler.clone();
        let service = {
            let peer = peer.clone();
            service_fn(move |req| {
                let fut = handler(req, peer.clone());
                async move { Ok::<_, Infallible>(fut.await) }
            })
        };
        let builders = Arc::clone(&builders);
        let watcher = graceful.watcher();
        let deadline = limits.header_read_timeout;
        let linger = Linger {
            tasks: tasks.clone(),
            stop: shutdown.clone(),
            permit,
        };
        let conn_task = async move {
            // hyper's header timeout starts only once the protocol is known;
            // a client that sends nothing, or the h2c preface a byte at a
            // time, must not hold a connection slot for longer than it.
            let Some((protocol, prefix)) = sniff_protocol(&mut stream, deadline).await else {
                return;
            };
            let scan = matches!(protocol, Protocol::Http1).then(HeadScan::default);
            let client = peer.clone();
            let io = ConnIo {
                stream: Some(stream),
                prefix,
                scan,
                peer,
                linger: Some(linger),
            };
            let io = TokioIo::new(io);
            // Connection errors (client went away, bad framing) are the
            // client's business; hyper has already answered what it could.
            let served = match protocol {
                Protocol::Http1 => {
                    watcher
                        .watch(builders.0.serve_connection(io, service))
                        .await
                }
                // Boxed: an HTTP/1 connection (nearly all of them) then does
                // not carry room for HTTP/2's larger state.
                Protocol::H2c => {
                    Box::pin(watcher.watch(builders.1.serve_connection(io, service))).await
                }
            };
            if let Err(e) = served {
                tracing::debug!(cause = %e, client = %client, "connection ended with an error");
            }
        };
        tasks.spawn(conn_task);
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

/// What a connection needs to close politely once hyper lets go of it.
struct Linger {
    tasks: TaskTracker,
    stop: CancellationToken,
    /// The connection's slot: held until the socket is really closed.
    permit: OwnedSemaphorePermit,
}

/// The socket as hyper sees it: the sniffed prefix first, then the stream.
/// Reads are scanned for ambiguous framing (HTTP/1 only); when hyper drops
/// it, the socket gets a lingering close.
struct ConnIo<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> {
    /// `Some` until dropped.
    stream: Option<S>,
    prefix: Prefix,
    scan: Option<HeadScan>,
    peer: Peer,
    linger: Option<Linger>,
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> ConnIo<S> {
    fn stream(&mut self) -> io::Result<Pin<&mut S>> {
        match self.stream.as_mut() {
            Some(s) => Ok(Pin::new(s)),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncRead for ConnIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let p = &mut this.prefix;
        let result = if p.at < p.len {
            let n = buf.remaining().min(p.len - p.at);
            buf.put_slice(&p.buf[p.at..p.at + n]);
            p.at += n;
            Poll::Ready(Ok(()))
        } else {
            match this.stream() {
                Ok(s) => s.poll_read(cx, buf),
                Err(e) => return Poll::Ready(Err(e)),
            }
        };
        if let Some(scan) = &mut this.scan
            && scan.feed(&buf.filled()[before..])
        {
            this.peer.mark_ambiguous_framing();
        }
        result
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> AsyncWrite for ConnIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().stream() {
            Ok(s) => s.poll_write(cx, buf),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut().stream() {
            Ok(s) => s.poll_write_vectored(cx, bufs),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream() {
            Ok(s) => s.poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut().stream() {
            Ok(s) => s.poll_shutdown(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> Drop for ConnIo<S> {
    fn drop(&mut self) {
        let (Some(stream), Some(linger)) = (self.stream.take(), self.linger.take()) else {
            return;
        };
        let Linger {
            tasks,
            stop,
            permit,
        } = linger;
        tasks.spawn(async move {
            tokio::select! {
                () = lingering_close(stream) => {},
                () = stop.cancelled() => {},
            }
            drop(permit);
        });
    }
}

/// Sends FIN, then reads and discards until the client closes too (or
/// [`LINGER`] passes): closing a socket with unread input makes the kernel
/// send a reset, which can destroy an answer the client has not read yet —
/// a 408 to a client still sending its body, say.
async fn lingering_close<S: AsyncRead + AsyncWrite + Unpin>(mut stream: S) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 4096];
    let until = tokio::time::Instant::now() + LINGER;
    while let Ok(Ok(n)) = tokio::time::timeout_at(until, stream.read(&mut sink)).await {
        if n == 0 {
            break;
        }
    }
}

/// Finds a `Content-Length` and a `Transfer-Encoding` line in one header
/// block (no blank line between them), across read boundaries. Body bytes
/// pass through it too: a JSON body cannot hold such lines (raw CR/LF only
/// appear between tokens, never before a bare `name:`), and a blank line
/// ends every region, so one request's `Content-Length` never pairs with the
/// next request's `Transfer-Encoding`.
#[derive(Default)]
struct HeadScan {
    /// The current line's first bytes, lowercased (enough for the names).
    start: [u8; 18],
    /// Bytes of the current line so far, CR excluded, counted up to
    /// `start`'s length.
    len: usize,
    saw_length: bool,
    saw_coding: bool,
}

impl HeadScan {
    /// Feeds bytes read from the client; true once an ambiguous head is seen.
    /// Line by line: only a line's first bytes matter (for the names) and
    /// whether it is blank, so the rest of a line, a body's bytes mostly,
    /// is skipped with `memchr` instead of being looked at one by one.
    fn feed(&mut self, mut bytes: &[u8]) -> bool {
        let mut found = false;
        loop {
            let (part, rest) = match memchr::memchr(b'\n', bytes) {
                Some(i) => (&bytes[..i], Some(&bytes[i + 1..])),
                None => (bytes, None),
            };
            for &b in part {
                // Past the names' length, the line is simply not blank.
                let Some(slot) = self.start.get_mut(self.len) else {
                    break;
                };
                if b != b'\r' {
                    *slot = b.to_ascii_lowercase();
                    self.len += 1;
                }
            }
            let Some(rest) = rest else {
                return found;
            };
            if self.len == 0 {
                // A blank line: the end of a header block.
                self.saw_length = false;
                self.saw_coding = false;
            } else {
                let line = &self.start[..self.len];
                self.saw_length |= line.starts_with(b"content-length:");
                self.saw_coding |= line.starts_with(b"transfer-encoding:");
                found |= self.saw_length && self.saw_coding;
            }
            self.len = 0;
            bytes = rest;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::HeadScan;

    fn scan(chunks: &[&[u8]]) -> bool {
        let mut s = HeadScan::default();
        chunks.iter().fold(false, |found, c| s.feed(c) | found)
    }

    #[test]
    fn both_framing_headers_in_one_head_are_found_across_reads() {
        let head = b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(scan(&[head]));
        let (a, b) = head.split_at(40);
        assert!(scan(&[a, b]));
        let bytes: Vec<&[u8]> = head.chunks(1).collect();
        assert!(scan(&bytes));
        assert!(scan(&[
            b"PUT /x HTTP/1.1\r\ntransfer-encoding: chunked\r\nCONTENT-LENGTH: 5\r\n\r\n"
        ]));
    }

    /// The byte-at-a-time scan `feed` replaced: the two agree on any input,
    /// however it is split into reads.
    fn reference(bytes: &[u8]) -> bool {
        let (mut start, mut len) = ([0u8; 18], 0usize);
        let (mut saw_length, mut saw_coding, mut found) = (false, false, false);
        for &b in bytes {
            match b {
                b'\n' => {
                    if len == 0 {
                        (saw_length, saw_coding) = (false, false);
                    } else {
                        let line = &start[..len.min(start.len())];
                        saw_length |= line.starts_with(b"content-length:");
                        saw_coding |= line.starts_with(b"transfer-encoding:");
                        found |= saw_length && saw_coding;
                    }
                    len = 0;
                }
                b'\r' => {}
                _ => {
                    if let Some(slot) = start.get_mut(len) {
                        *slot = b.to_ascii_lowercase();
                    }
                    len += 1;
                }
            }
        }
        found
    }

    proptest::proptest! {
        #[test]
        fn agrees_with_the_byte_at_a_time_scan(
            pieces in proptest::collection::vec(proptest::sample::select(vec![
                "Content-Length: 5", "TRANSFER-ENCODING: chunked", "transfer-encoding:",
                "content-length:", "X-Content-Length: 1", "Host: a", "\r\n", "\n", "\r",
                " ", "{\"a\": 1}", "PUT /x HTTP/1.1", "content-\rlength: 1",
            ]), 0..24),
            cuts in proptest::collection::vec(0usize..400, 0..6),
        ) {
            let bytes = pieces.concat().into_bytes();
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
            cuts.sort_unstable();
            let mut s = HeadScan::default();
            let (mut found, mut at) = (false, 0);
            for cut in cuts.into_iter().chain([bytes.len()]) {
                found |= s.feed(&bytes[at..cut]);
                at = cut;
            }
            proptest::prop_assert_eq!(found, reference(&bytes));
        }
    }

    #[test]
    fn separate_requests_do_not_pair() {
        assert!(!scan(&[
            b"PUT /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
            b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n",
            b"PUT /x HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}",
        ]));
        assert!(!scan(&[
            b"PUT /x HTTP/1.1\r\nX-Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
    }
}
