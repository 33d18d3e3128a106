//! The per-request service: policy, then upstream, then the answer, with one log line each.
//!
//! Every outcome is an answer: IMDS's own (passed through), a refusal by the policy (4xx), or a
//! plain-text 502/504 naming what went wrong upstream. The client never waits longer than the
//! configured bounds. The log line carries the client, method, path (never the query), status
//! and latency: never a header value or a body, so no token or credential reaches the log.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_LENGTH, CONTENT_TYPE};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tracing::{info, warn};

use crate::config::Config;
use crate::listener::ConnInfo;
use crate::policy;
use crate::upstream::{UpstreamClient, UpstreamRequest};

/// The proxy's request handler; one is shared by every connection.
#[derive(Debug)]
pub struct Proxy {
    upstream: UpstreamClient,
    max_request_body_bytes: usize,
    body_read_timeout: Duration,
    /// With the redirect on, only redirected connections are served.
    require_redirect: bool,
}

impl Proxy {
    /// Builds the handler from the validated configuration.
    pub fn new(config: &Config) -> Self {
        Proxy {
            upstream: UpstreamClient::new(config),
            max_request_body_bytes: config.max_request_body_bytes,
            // A client that sent its head in time gets the same bound again for its body.
            body_read_timeout: config.header_read_timeout,
            require_redirect: config.redirect.is_some(),
        }
    }

    /// Answers one client request.
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        conn: Arc<ConnInfo>,
    ) -> Response<Full<Bytes>> {
        let started = Instant::now();
        let method = request.method().clone();
        let path = request.uri().path().to_owned();
        let admitted = if self.require_redirect {
            policy::admit_connection(conn.original_dst)
        } else {
            Ok(())
        };
        let response = match admitted {
            Ok(()) => self.answer(request, conn.peer).await,
            Err(refusal) => {
                warn!(client = %conn.peer, local = %conn.local, "refused a connection that was not redirected");
                plain_text(refusal.status, refusal.reason)
            }
        };
        info!(
            client = %conn.peer,
            method = %method,
            path = %path,
            status = response.status().as_u16(),
            latency_us = started.elapsed().as_micros() as u64,
            "request"
        );
        response
    }

    async fn answer(&self, request: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        if let Err(refusal) = policy::admit(request.method(), request.uri(), request.headers()) {
            return plain_text(refusal.status, refusal.reason);
        }
        let (parts, body) = request.into_parts();
        if declared_length(&parts.headers)
            .is_some_and(|len| len > self.max_request_body_bytes as u64)
        {
            return plain_text(StatusCode::PAYLOAD_TOO_LARGE, &self.body_too_large());
        }
        let body = match tokio::time::timeout(
            self.body_read_timeout,
            Limited::new(body, self.max_request_body_bytes).collect(),
        )
        .await
        {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(err)) if err.is::<http_body_util::LengthLimitError>() => {
                return plain_text(StatusCode::PAYLOAD_TOO_LARGE, &self.body_too_large());
            }
            Ok(Err(_)) => {
                return plain_text(
                    StatusCode::BAD_REQUEST,
                    "the request body could not be read",
                );
            }
            Err(_) => {
                return plain_text(
                    StatusCode::REQUEST_TIMEOUT,
                    "the request body did not arrive in time",
                );
            }
        };

        let upstream_request = UpstreamRequest {
            method: &parts.method,
            path_and_query: policy::path_and_query(&parts.uri),
            headers: policy::upstream_headers(&parts.headers, self.upstream.host_header()),
            body,
        };
        match self.upstream.send(upstream_request).await {
            Ok(answer) => {
                let mut response = Response::new(Full::new(answer.body));
                *response.status_mut() = answer.status;
                *response.headers_mut() = policy::downstream_headers(&answer.headers);
                response
            }
            Err(err) => {
                let status = err.status();
                warn!(client = %peer, status = status.as_u16(), cause = %err, "upstream failed");
                plain_text(status, &err.to_string())
            }
        }
    }

    fn body_too_large(&self) -> String {
        format!(
            "the request body is larger than {} bytes (max_request_body_bytes)",
            self.max_request_body_bytes
        )
    }
}

fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// An answer written by the proxy itself: one line of text saying what happened.
pub fn plain_text(status: StatusCode, reason: &str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!(
        "imds-hop-proxy: {reason}\n"
    ))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}
