//! Who is on the other end of a data connection, and what the connection
//! layer saw of its raw bytes that hyper does not pass on. A leaf.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// The far end of a connection: a TCP address, or a Unix-socket peer's uid
/// (from `SO_PEERCRED`, which the kernel fills in at `connect`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerAddr {
    Tcp(SocketAddr),
    Unix { uid: u32 },
}

/// One connection's peer, shared by the requests it carries.
#[derive(Debug, Clone)]
pub struct Peer {
    addr: PeerAddr,
    conn: Arc<Conn>,
}

/// What the requests of one connection share.
#[derive(Debug)]
struct Conn {
    ambiguous: AtomicBool,
    /// The `client` field, formatted once per connection rather than for
    /// every record and access-log line.
    label: Box<str>,
}

impl Peer {
    /// A TCP peer.
    pub fn new(addr: SocketAddr) -> Peer {
        Peer::from_addr(PeerAddr::Tcp(addr))
    }

    /// A Unix-socket peer running as `uid`.
    pub fn unix(uid: u32) -> Peer {
        Peer::from_addr(PeerAddr::Unix { uid })
    }

    fn from_addr(addr: PeerAddr) -> Peer {
        let label = match addr {
            PeerAddr::Tcp(addr) => addr.to_string(),
            PeerAddr::Unix { uid } => format!("unix:uid={uid}"),
        };
        Peer {
            addr,
            conn: Arc::new(Conn {
                ambiguous: AtomicBool::new(false),
                label: label.into_boxed_str(),
            }),
        }
    }

    /// `127.0.0.1:41616`, or `unix:uid=1000` (see `Display`).
    pub fn label(&self) -> &str {
        &self.conn.label
    }

    pub fn addr(&self) -> PeerAddr {
        self.addr
    }

    /// The peer's uid, on a Unix socket.
    pub fn uid(&self) -> Option<u32> {
        match self.addr {
            PeerAddr::Unix { uid } => Some(uid),
            PeerAddr::Tcp(_) => None,
        }
    }

    /// A request head on this connection carried both `Content-Length` and
    /// `Transfer-Encoding`. hyper drops the `Content-Length` before the
    /// request reaches us (and closes the connection after it), so only the
    /// connection's byte stream can tell.
    pub fn saw_ambiguous_framing(&self) -> bool {
        self.conn.ambiguous.load(Ordering::Acquire)
    }

    pub fn mark_ambiguous_framing(&self) {
        self.conn.ambiguous.store(true, Ordering::Release);
    }
}

/// `127.0.0.1:41616`, or `unix:uid=1000`: the `client` of the access log
/// and the audit records.
impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_print_as_the_client_field() {
        assert_eq!(
            Peer::new("127.0.0.1:41616".parse().unwrap()).to_string(),
            "127.0.0.1:41616"
        );
        let p = Peer::unix(1000);
        assert_eq!(p.to_string(), "unix:uid=1000");
        assert_eq!(p.uid(), Some(1000));
        assert_eq!(Peer::new("[::1]:1".parse().unwrap()).uid(), None);
    }
}
