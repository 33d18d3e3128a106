//! Accepting clients: binding, the connection limit, the fresh TTL, HTTP/1.1 serving under
//! bounds, and the drain on shutdown. Shared by the proxy and the simulator, which differ only in
//! the handler they pass in and the [`ServeOptions`] they choose.
//!
//! A permit from a semaphore is taken *before* `accept`, so at the limit new clients wait in
//! the kernel's backlog instead of costing us memory. On shutdown every listener is closed at
//! once and every accepted connection gets to finish its one request (keep-alive is off, so
//! each connection carries exactly one); whatever is still open when the drain bound passes is
//! closed. hyper's graceful shutdown is deliberately not used: it closes connections whose
//! request has not arrived yet, which would drop clients that connected just before a restart.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use tracing::{debug, info, warn, Instrument};

/// Pending connections the kernel queues for us while every permit is taken.
const LISTEN_BACKLOG: i32 = 1024;
/// Pause after an `accept` error such as EMFILE, so a full fd table does not spin a core.
const ACCEPT_ERROR_BACKOFF_MS: u64 = 50;

/// How connections are served.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// Connections served at once.
    pub max_connections: usize,
    /// Bound on reading a request head.
    pub header_read_timeout: Duration,
    /// Bound on the size of a request head (hyper's read buffer; at least 8192).
    pub max_header_bytes: usize,
    /// TTL / hop limit to give every accepted socket, or `None` to leave the kernel's.
    pub response_ttl: Option<u8>,
    /// Bound on the drain after shutdown.
    pub drain_timeout: Duration,
    /// Whether handlers get a handle on the socket (the simulator changes the TTL per answer).
    pub socket_handle: bool,
    /// Whether to read each connection's pre-NAT destination (the proxy's listener guard).
    pub original_destination: bool,
}

/// What a handler knows about the connection its request came on.
#[derive(Debug)]
pub struct ConnInfo {
    /// The client's address.
    pub peer: SocketAddr,
    /// The address the client connected to.
    pub local: SocketAddr,
    /// A duplicate of the socket, when [`ServeOptions::socket_handle`] asked for one.
    pub socket: Option<Socket>,
    /// Where the client was headed before the kernel's NAT rewrote the destination, when
    /// [`ServeOptions::original_destination`] asked for it and the kernel has a NAT record.
    pub original_dst: Option<SocketAddr>,
}

/// How the drain after shutdown ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DrainReport {
    /// Connections still open when the drain bound passed, closed without an answer.
    pub abandoned: usize,
}

/// Why a listener could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    /// The address is in use, not local, or needs a privilege.
    #[error("binding {addr} failed: {source}{hint}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
        hint: &'static str,
    },
}

/// Opens a listening socket. IPv6 sockets are IPv6-only, so an IPv4 and an IPv6 listener on
/// the same port never collide and each family's TTL option is the one that applies.
pub fn bind(addr: SocketAddr) -> Result<TcpListener, ListenError> {
    let socket = open(addr).map_err(|source| {
        let hint = match source.kind() {
            io::ErrorKind::PermissionDenied => {
                " (ports below 1024 need root or the CAP_NET_BIND_SERVICE capability)"
            }
            io::ErrorKind::AddrInUse => " (another process listens there: choose another port)",
            io::ErrorKind::AddrNotAvailable => " (no interface of this host has that address)",
            _ => "",
        };
        ListenError::Bind { addr, source, hint }
    })?;
    TcpListener::from_std(socket.into()).map_err(|source| ListenError::Bind {
        addr,
        source,
        hint: "",
    })
}

fn open(addr: SocketAddr) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    Ok(socket)
}

/// Serves every listener until `shutdown` resolves, then drains.
pub async fn serve<H, F>(
    listeners: Vec<TcpListener>,
    options: ServeOptions,
    handler: H,
    shutdown: impl Future<Output = ()>,
) -> DrainReport
where
    H: Fn(Request<Incoming>, Arc<ConnInfo>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let (stop_tx, stop_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(options.max_connections));
    let mut acceptors = JoinSet::new();
    for listener in listeners {
        acceptors.spawn(accept_loop(
            listener,
            options.clone(),
            handler.clone(),
            permits.clone(),
            stop_rx.clone(),
        ));
    }
    shutdown.await;
    let _ = stop_tx.send(true);
    info!(
        drain_timeout_ms = options.drain_timeout.as_millis() as u64,
        "stopped accepting; draining connections"
    );
    let mut report = DrainReport { abandoned: 0 };
    while let Some(done) = acceptors.join_next().await {
        if let Ok(abandoned) = done {
            report.abandoned += abandoned;
        }
    }
    report
}

/// Accepts on one listener; after the stop signal, drains its own connections and returns how
/// many it had to abandon.
async fn accept_loop<H, F>(
    listener: TcpListener,
    options: ServeOptions,
    handler: H,
    permits: Arc<Semaphore>,
    mut stop: watch::Receiver<bool>,
) -> usize
where
    H: Fn(Request<Incoming>, Arc<ConnInfo>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let mut connections = JoinSet::new();
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break, // the semaphore is never closed; treat it as a stop
            },
            _ = stopped(&mut stop) => break,
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stopped(&mut stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(err) => {
                warn!(cause = %err, "accept failed");
                tokio::time::sleep(Duration::from_millis(ACCEPT_ERROR_BACKOFF_MS)).await;
                continue;
            }
        };
        let info = match prepare(&stream, peer, &options) {
            Ok(info) => Arc::new(info),
            Err(err) => {
                warn!(client = %peer, cause = %err, "could not set up the accepted socket; closing it");
                continue;
            }
        };
        let span = tracing::info_span!("conn", client = %peer);
        let connection = serve_connection(stream, info, options.clone(), handler.clone());
        connections.spawn(
            async move {
                connection.await;
                drop(permit);
            }
            .instrument(span),
        );
        // Reap finished connections so the set does not grow with every client served.
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let drained = tokio::time::timeout(options.drain_timeout, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    match drained {
        Ok(()) => 0,
        Err(_) => {
            let abandoned = connections.len();
            warn!(
                abandoned,
                "drain bound reached; closing the remaining connections"
            );
            connections.abort_all();
            abandoned
        }
    }
}

/// Resolves once the stop signal is set (at once if it already is). The guard `wait_for`
/// returns is not `Send`, so it is dropped here rather than held across the caller's awaits.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Sets the socket options every accepted client gets.
fn prepare(stream: &TcpStream, peer: SocketAddr, options: &ServeOptions) -> io::Result<ConnInfo> {
    let socket = SockRef::from(stream);
    if let Some(ttl) = options.response_ttl {
        // The point of the product: our answers leave with a TTL that survives the forward
        // back into the container, whatever IMDS's hop limit is.
        if peer.is_ipv6() {
            socket.set_unicast_hops_v6(ttl.into())?;
        } else {
            socket.set_ttl_v4(ttl.into())?;
        }
    }
    socket.set_tcp_nodelay(true)?;
    let socket_handle = if options.socket_handle {
        Some(socket.try_clone()?)
    } else {
        None
    };
    let original_dst = if options.original_destination {
        original_destination(&socket, peer)
    } else {
        None
    };
    Ok(ConnInfo {
        peer,
        local: stream.local_addr()?,
        socket: socket_handle,
        original_dst,
    })
}

/// The destination conntrack recorded before NAT (SO_ORIGINAL_DST). Without a NAT record the
/// kernel answers with the socket's own address or an error; both mean "not redirected".
fn original_destination(socket: &SockRef<'_>, peer: SocketAddr) -> Option<SocketAddr> {
    let addr = if peer.is_ipv6() {
        socket.original_dst_v6()
    } else {
        socket.original_dst_v4()
    };
    match addr {
        Ok(addr) => addr.as_socket(),
        Err(err) => {
            debug!(client = %peer, cause = %err, "no original destination for this connection");
            None
        }
    }
}

async fn serve_connection<H, F>(
    stream: TcpStream,
    info: Arc<ConnInfo>,
    options: ServeOptions,
    handler: H,
) where
    H: Fn(Request<Incoming>, Arc<ConnInfo>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let service = service_fn(move |request| {
        let response = handler(request, info.clone());
        async move { Ok::<_, Infallible>(response.await) }
    });
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(options.header_read_timeout)
        .max_buf_size(options.max_header_bytes)
        // IMDS closes every connection after one answer; so do we. It also means no idle
        // keep-alive connection ever holds a permit, and a drain only waits for one request.
        .keep_alive(false);
    if let Err(err) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
        // Slow or oversized heads, clients that hang up: the client already has its answer
        // (hyper sends 431 for an oversized head) or is gone.
        debug!(cause = %err, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_get_the_configured_ttl() {
        for (bind_addr, ttl) in [("127.0.0.1:0", 77u8), ("[::1]:0", 99u8)] {
            let listener = bind(bind_addr.parse().unwrap()).unwrap();
            let addr = listener.local_addr().unwrap();
            let options = ServeOptions {
                max_connections: 1,
                header_read_timeout: Duration::from_secs(1),
                max_header_bytes: 8192,
                response_ttl: Some(ttl),
                drain_timeout: Duration::from_secs(1),
                socket_handle: true,
                original_destination: true,
            };
            let _client = TcpStream::connect(addr).await.unwrap();
            let (stream, peer) = listener.accept().await.unwrap();
            let info = prepare(&stream, peer, &options).unwrap();
            // No NAT happened, so the connection must not look redirected.
            assert_ne!(
                info.original_dst
                    .map(|dst| crate::policy::admit_connection(Some(dst))),
                Some(Ok(()))
            );
            let socket = info.socket.expect("socket_handle was asked for");
            let seen = if addr.is_ipv6() {
                socket.unicast_hops_v6().unwrap()
            } else {
                socket.ttl_v4().unwrap()
            };
            assert_eq!(seen, u32::from(ttl), "{bind_addr}");
        }
    }

    #[test]
    fn bind_errors_name_the_address_and_what_to_do() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = taken.local_addr().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let _guard = runtime.enter();
        // SO_REUSEADDR does not let two sockets listen on one port.
        let err = bind(addr).unwrap_err().to_string();
        assert!(err.contains(&addr.to_string()), "{err}");
        assert!(err.contains("another process"), "{err}");
    }
}
