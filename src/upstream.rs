//! One bounded request to the real IMDS, made from the host so the hop limit is never crossed.
//!
//! Each request opens its own TCP connection: IMDS answers `Connection: close` to everything,
//! so a pool would hold nothing. Every step has a bound (connect, then the whole answer, read
//! into memory up to a size limit), and every failure becomes an [`UpstreamError`] whose
//! [`status`](UpstreamError::status) is the 502 or 504 the client receives.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::header::HeaderValue;
use http::{HeaderMap, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use crate::config::Config;

/// A request as it goes upstream: the policy has already chosen the headers.
pub struct UpstreamRequest<'a> {
    /// Method, unchanged.
    pub method: &'a Method,
    /// Path and query, byte for byte as the client sent them.
    pub path_and_query: &'a str,
    /// End-to-end headers with `Host` set to the upstream.
    pub headers: HeaderMap,
    /// The client's body, already read in full.
    pub body: Bytes,
}

/// IMDS's answer, read in full.
pub struct UpstreamResponse {
    /// Status, unchanged.
    pub status: StatusCode,
    /// Headers as IMDS sent them (hop-by-hop ones are removed later by the policy).
    pub headers: HeaderMap,
    /// Body, at most the configured size.
    pub body: Bytes,
}

/// How a request to IMDS failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The upstream host name did not resolve.
    #[error("resolving the IMDS host {host} failed: {source}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    /// Nothing listens at the address (RST to our SYN).
    #[error("IMDS at {addr} refused the connection")]
    Refused { addr: SocketAddr },
    /// The kernel has no route, or an ICMP unreachable came back.
    #[error("IMDS at {addr} is unreachable: {source}")]
    Unreachable {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// Any other failure to connect.
    #[error("connecting to IMDS at {addr} failed: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// No SYN-ACK within the connect bound.
    #[error("connecting to IMDS at {addr} timed out after {ms} ms")]
    ConnectTimeout { addr: SocketAddr, ms: u128 },
    /// Connected, but the whole answer did not arrive within the response bound.
    #[error("IMDS did not answer within {ms} ms")]
    ResponseTimeout { ms: u128 },
    /// IMDS sent more than the response size bound.
    #[error("the IMDS answer is larger than {limit} bytes")]
    TooLarge { limit: usize },
    /// IMDS closed the connection early or sent something that is not HTTP/1.
    #[error("IMDS sent no valid answer: {0}")]
    Protocol(#[source] hyper::Error),
    /// The body stream failed after the head arrived.
    #[error("reading the IMDS answer failed: {0}")]
    Body(String),
}

impl UpstreamError {
    /// 504 when IMDS was too slow, 502 for every other failure.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::ConnectTimeout { .. } | UpstreamError::ResponseTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            _ => StatusCode::BAD_GATEWAY,
        }
    }
}

/// Sends requests to one IMDS endpoint under the configured bounds.
#[derive(Clone, Debug)]
pub struct UpstreamClient {
    host: String,
    port: u16,
    /// The address when the upstream is an IP literal (the usual case), so requests need no
    /// resolution at all.
    literal: Option<SocketAddr>,
    host_header: HeaderValue,
    connect_timeout: Duration,
    response_timeout: Duration,
    max_response_body_bytes: usize,
}

impl UpstreamClient {
    /// Takes the upstream endpoint and its bounds from the validated configuration.
    pub fn new(config: &Config) -> Self {
        let (host, port) = config.upstream.host_port();
        let literal = host.parse().ok().map(|ip| SocketAddr::new(ip, port));
        UpstreamClient {
            literal,
            host,
            port,
            host_header: HeaderValue::from_str(config.upstream.authority.as_str())
                .expect("a parsed URI authority is a valid header value"),
            connect_timeout: config.upstream_connect_timeout,
            response_timeout: config.upstream_response_timeout,
            max_response_body_bytes: config.max_response_body_bytes,
        }
    }

    /// The `Host` header value requests must carry.
    pub fn host_header(&self) -> &HeaderValue {
        &self.host_header
    }

    /// Sends one request and reads the whole answer, within the bounds.
    pub async fn send(
        &self,
        request: UpstreamRequest<'_>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let stream = self.connect().await?;
        let ms = self.response_timeout.as_millis();
        tokio::time::timeout(self.response_timeout, self.exchange(stream, request))
            .await
            .map_err(|_| UpstreamError::ResponseTimeout { ms })?
    }

    async fn connect(&self) -> Result<TcpStream, UpstreamError> {
        let addr = self.resolve().await?;
        let ms = self.connect_timeout.as_millis();
        let stream = tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| UpstreamError::ConnectTimeout { addr, ms })?
            .map_err(|source| classify_connect_error(addr, source))?;
        // Requests are one small write each; do not let Nagle hold them back.
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    async fn resolve(&self) -> Result<SocketAddr, UpstreamError> {
        if let Some(addr) = self.literal {
            return Ok(addr);
        }
        let resolve_error = |source| UpstreamError::Resolve {
            host: self.host.clone(),
            source,
        };
        let lookup = tokio::net::lookup_host((self.host.as_str(), self.port));
        let mut addrs = tokio::time::timeout(self.connect_timeout, lookup)
            .await
            .map_err(|_| resolve_error(io::ErrorKind::TimedOut.into()))?
            .map_err(resolve_error)?;
        addrs
            .next()
            .ok_or_else(|| resolve_error(io::Error::new(io::ErrorKind::NotFound, "no address")))
    }

    async fn exchange(
        &self,
        stream: TcpStream,
        request: UpstreamRequest<'_>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Protocol)?;
        // The connection task ends with the answer; the guard also ends it on a timeout.
        let _connection = AbortOnDrop(tokio::spawn(async move {
            let _ = connection.await;
        }));

        let mut builder = Request::builder()
            .method(request.method.clone())
            .uri(request.path_and_query)
            .version(Version::HTTP_11);
        if let Some(headers) = builder.headers_mut() {
            *headers = request.headers;
        }
        let outgoing = builder
            .body(Full::new(request.body))
            .map_err(|err| UpstreamError::Body(err.to_string()))?;

        let response: Response<hyper::body::Incoming> = sender
            .send_request(outgoing)
            .await
            .map_err(UpstreamError::Protocol)?;
        let (parts, body) = response.into_parts();
        let limit = self.max_response_body_bytes;
        let body = Limited::new(body, limit)
            .collect()
            .await
            .map_err(|err| {
                if err.is::<http_body_util::LengthLimitError>() {
                    UpstreamError::TooLarge { limit }
                } else {
                    UpstreamError::Body(err.to_string())
                }
            })?
            .to_bytes();
        Ok(UpstreamResponse {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }
}

fn classify_connect_error(addr: SocketAddr, source: io::Error) -> UpstreamError {
    match source.kind() {
        io::ErrorKind::ConnectionRefused => UpstreamError::Refused { addr },
        io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
            UpstreamError::Unreachable { addr, source }
        }
        _ => UpstreamError::Connect { addr, source },
    }
}

/// Aborts a spawned task when dropped, so no connection task outlives its request.
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_are_504_and_everything_else_502() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        assert_eq!(
            UpstreamError::ConnectTimeout { addr, ms: 1 }.status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            UpstreamError::ResponseTimeout { ms: 1 }.status(),
            StatusCode::GATEWAY_TIMEOUT
        );
        assert_eq!(
            UpstreamError::Refused { addr }.status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            UpstreamError::TooLarge { limit: 1 }.status(),
            StatusCode::BAD_GATEWAY
        );
        let unreachable = classify_connect_error(addr, io::ErrorKind::HostUnreachable.into());
        assert_eq!(unreachable.status(), StatusCode::BAD_GATEWAY);
        assert!(matches!(
            classify_connect_error(addr, io::ErrorKind::ConnectionRefused.into()),
            UpstreamError::Refused { .. }
        ));
    }
}
