//! The process's stop signals. Handlers are installed at start-up, before any socket is bound,
//! so a SIGTERM that arrives while we start is never lost to the default action.

use std::io;

use tokio::signal::unix::{signal, Signal, SignalKind};

/// SIGTERM (systemd's stop) and SIGINT (Ctrl-C), installed and waiting.
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Installs the handlers. Must run inside the tokio runtime.
    pub fn install() -> io::Result<Self> {
        Ok(StopSignals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Resolves with the name of the first stop signal received.
    pub async fn recv(mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
