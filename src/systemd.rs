//! What the process tells systemd, and what it takes from it: the edge to the service manager.
//!
//! - Readiness: `READY=1` only once the listeners are open and the redirect rules are in
//!   place, so `systemctl start` (and `enable --now`) return when containers are served.
//! - `STOPPING=1` as soon as a stop signal arrives, so systemd does not mistake the drain for a
//!   hang.
//! - The watchdog: `WATCHDOG=1` every half `WatchdogSec`, from the async runtime that serves
//!   requests, so a stalled runtime (deadlock, starved executor, SIGSTOP) stops the pings and
//!   systemd restarts the process.
//! - Socket activation: listening sockets handed over by a `.socket` unit (`LISTEN_FDS`), which
//!   outlive the process, so connections that arrive during a restart wait in the kernel's
//!   backlog for the next process instead of being refused.
//!
//! Outside systemd (no `NOTIFY_SOCKET`, no `LISTEN_FDS`) every function here does nothing.

use std::io;
use std::time::Duration;

use sd_notify::NotifyState;
use tracing::{debug, warn};

/// Why inherited sockets could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// A file descriptor systemd passed is not a listening TCP socket.
    #[error("socket activation: file descriptor {index} from systemd is not a TCP listener: {source} (the .socket unit must use ListenStream= with IP addresses)")]
    NotTcp {
        index: usize,
        #[source]
        source: io::Error,
    },
}

/// Takes the listening sockets systemd passed (`LISTEN_FDS`), in order; empty when the process
/// was not socket-activated. Must run before any other thread exists: it removes the
/// `LISTEN_*` variables from the environment so children do not inherit them.
pub fn inherited_listeners() -> Result<Vec<std::net::TcpListener>, ActivationError> {
    let mut fds = listenfd::ListenFd::from_env();
    let mut listeners = Vec::with_capacity(fds.len());
    for index in 0..fds.len() {
        match fds.take_tcp_listener(index) {
            Ok(Some(listener)) => {
                listener
                    .set_nonblocking(true)
                    .map_err(|source| ActivationError::NotTcp { index, source })?;
                listeners.push(listener);
            }
            Ok(None) => {}
            Err(source) => return Err(ActivationError::NotTcp { index, source }),
        }
    }
    Ok(listeners)
}

/// Tells systemd the service is ready, with a one-line status for `systemctl status`.
pub fn ready(status: &str) {
    send(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Tells systemd the service is stopping (draining).
pub fn stopping() {
    send(&[NotifyState::Stopping, NotifyState::Status("draining")]);
}

/// The interval at which to ping the watchdog: half of `WatchdogSec`, or `None` without one.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2))
}

/// Pings the watchdog every `interval`; runs until dropped.
pub async fn watchdog(interval: Duration) -> std::convert::Infallible {
    let mut ticker = tokio::time::interval(interval);
    loop {
        ticker.tick().await;
        send(&[NotifyState::Watchdog]);
    }
}

fn send(states: &[NotifyState<'_>]) {
    match sd_notify::notify(false, states) {
        Ok(()) => debug!(?states, "told systemd"),
        Err(err) => warn!(cause = %err, "could not notify systemd"),
    }
}
