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
    ambiguous: Arc<AtomicBool>,
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
        Peer {
            addr,
            ambiguous: Arc::new(AtomicBool::new(false)),
        }
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
        self.ambiguous.load(Ordering::Acquire)
    }

    pub fn mark_ambiguous_framing(&self) {
        self.ambiguous.store(true, Ordering::Release);
    }
}

/// `127.0.0.1:41616`, or `unix:uid=1000`: the `client` of the access log
/// and the audit records.
impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            PeerAddr::Tcp(addr) => addr.fmt(f),
            PeerAddr::Unix { uid } => write!(f, "unix:uid={uid}"),
        }
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
