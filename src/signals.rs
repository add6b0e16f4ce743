//! Process signals, caught from the first moment `serve` runs: SIGTERM and
//! SIGINT (stop), SIGHUP (reload). Handlers are installed before the config
//! is read or a listener bound, so a signal at any point of start-up is
//! queued for the running gateway instead of taking its default action
//! (which would kill the process silently). Installation needs no runtime:
//! signal-hook's handler only writes to a pipe, and one owned thread turns
//! that into a channel the gateway reads.

use std::io;
use std::thread::JoinHandle;

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals as Registered};
use tokio::sync::mpsc;

/// What the gateway is asked to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// SIGTERM or SIGINT: drain and exit.
    Stop,
    /// SIGHUP: re-read the config file.
    Reload,
}

/// The caught signals, in order of arrival. Dropping it (or `close`) stops
/// the forwarding thread; the handlers stay installed, so a late signal is
/// ignored rather than fatal.
pub struct Signals {
    rx: mpsc::UnboundedReceiver<Signal>,
    handle: Handle,
    thread: Option<JoinHandle<()>>,
}

impl Signals {
    /// Installs the handlers. Call before anything else in a long-running
    /// subcommand.
    pub fn install() -> io::Result<Signals> {
        let mut registered = Registered::new([SIGTERM, SIGINT, SIGHUP])?;
        let handle = registered.handle();
        let (tx, rx) = mpsc::unbounded_channel();
        let thread = std::thread::Builder::new()
            .name("taskgate-signals".into())
            .spawn(move || {
                for sig in registered.forever() {
                    let signal = if sig == SIGHUP {
                        Signal::Reload
                    } else {
                        Signal::Stop
                    };
                    if tx.send(signal).is_err() {
                        break;
                    }
                }
            })?;
        Ok(Signals {
            rx,
            handle,
            thread: Some(thread),
        })
    }

    /// The next signal; `None` only once closed.
    pub async fn recv(&mut self) -> Option<Signal> {
        self.rx.recv().await
    }

    /// The next stop signal, skipping reloads (used during the drain).
    pub async fn stop(&mut self) {
        while let Some(signal) = self.recv().await {
            if signal == Signal::Stop {
                return;
            }
        }
        // Closed: never fires.
        std::future::pending::<()>().await;
    }

    /// Stops the forwarding thread and joins it.
    pub fn close(mut self) {
        self.shut();
    }

    fn shut(&mut self) {
        self.handle.close();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Signals {
    fn drop(&mut self) {
        self.shut();
    }
}
