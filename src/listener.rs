//! The data listener's sockets behind one trait, so that `server`'s accept
//! loop serves TCP and Unix sockets alike; and the life of a Unix socket's
//! file: a stale one replaced at start (never a path that is not a socket,
//! nor one another process still answers on), mode 0660, removed when the
//! listener is dropped at shutdown.

use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};

use crate::peer::Peer;

/// Something that accepts connections and says who is on the other end.
pub trait Listener: Send + Sync + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    fn accept(&self) -> impl Future<Output = io::Result<(Self::Io, Peer)>> + Send;
}

impl Listener for TcpListener {
    type Io = TcpStream;

    async fn accept(&self) -> io::Result<(TcpStream, Peer)> {
        let (stream, addr) = TcpListener::accept(self).await?;
        let _ = stream.set_nodelay(true);
        Ok((stream, Peer::new(addr)))
    }
}

/// Who may connect: the socket's owner and group (`listen`'s directory
/// decides who can reach it at all).
const SOCKET_MODE: u32 = 0o660;

/// A Unix-socket listener that owns its file: dropping it removes the file,
/// unless another socket has been put in its place meanwhile.
pub struct UnixSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of the socket file we bound.
    identity: (u64, u64),
}

impl UnixSocket {
    /// Binds `path`, replacing a stale socket file left by a process that is
    /// gone (a crash, a `kill -9`). Refuses to remove anything that is not a
    /// socket, and a socket that still accepts connections.
    pub async fn bind(path: &Path) -> io::Result<UnixSocket> {
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                // A refused connection means nobody listens: stale.
                let probe =
                    tokio::time::timeout(Duration::from_secs(1), UnixStream::connect(path)).await;
                match probe {
                    Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
                        std::fs::remove_file(path)?;
                        tracing::info!(path = %path.display(), "replaced a stale socket file");
                    }
                    Ok(Ok(_)) | Err(_) => {
                        return Err(io::Error::new(
                            io::ErrorKind::AddrInUse,
                            "another process is listening on this socket",
                        ));
                    }
                    Ok(Err(e)) => return Err(e),
                }
            }
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    "the path exists and is not a socket; not removing it",
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        let listener = UnixListener::bind(path)?;
        // Before the first accept; bind created it under the umask, which
        // for the usual 022 or 077 is stricter than this for connecting
        // (a connect needs write permission).
        let set_up = std::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
            .and_then(|()| std::fs::symlink_metadata(path));
        let meta = match set_up {
            Ok(m) => m,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(e);
            }
        };
        Ok(UnixSocket {
            listener,
            path: path.to_owned(),
            identity: (meta.dev(), meta.ino()),
        })
    }
}

impl Listener for UnixSocket {
    type Io = UnixStream;

    async fn accept(&self) -> io::Result<(UnixStream, Peer)> {
        let (stream, _) = self.listener.accept().await?;
        // The uid the peer had when it connected; without it the peer cannot
        // be told apart, so the connection is not served.
        let cred = stream.peer_cred()?;
        Ok((stream, Peer::unix(cred.uid())))
    }
}

impl Drop for UnixSocket {
    fn drop(&mut self) {
        // A new process may already have replaced our file with its own.
        let ours = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == self.identity);
        if ours && let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!(path = %self.path.display(), cause = %e, "cannot remove the socket file");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stale_socket_is_replaced_and_removed_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sock");
        // A socket file nobody listens on any more.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let sock = UnixSocket::bind(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o660);
        // While it listens, a second bind must not take it over.
        let err = UnixSocket::bind(&path).await.err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
        assert!(path.exists());
        drop(sock);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn a_path_that_is_not_a_socket_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("not-a-socket");
        std::fs::write(&path, "keep me").unwrap();
        let err = UnixSocket::bind(&path).await.err().unwrap();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "keep me");
    }

    #[tokio::test]
    async fn a_replaced_socket_file_is_not_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.sock");
        let sock = UnixSocket::bind(&path).await.unwrap();
        std::fs::remove_file(&path).unwrap();
        let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(sock);
        assert!(path.exists(), "the newer socket stays");
        drop(other);
    }
}
