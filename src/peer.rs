//! Who is on the other end of a data connection, and what the connection
//! layer saw of its raw bytes that hyper does not pass on. A leaf.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// One connection's peer, shared by the requests it carries.
#[derive(Debug, Clone)]
pub struct Peer {
    addr: SocketAddr,
    ambiguous: Arc<AtomicBool>,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Peer {
        Peer {
            addr,
            ambiguous: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
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

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.addr.fmt(f)
    }
}
