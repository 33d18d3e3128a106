//! Pure request policy: whether a client request may go to IMDS, and which headers cross the
//! proxy in each direction. No I/O happens here, so every rule is unit-tested below.
//!
//! Two ideas drive it. First, the proxy must be invisible to IMDS: it forwards end-to-end
//! headers untouched, replaces only `Host`, and never adds a header that reveals a proxy
//! (`X-Forwarded-For`, `Forwarded`, `Via`), because IMDS refuses proxied token requests.
//! Second, the proxy must not weaken what IMDS protects: a request that already carries one of
//! those headers was proxied before it reached us, so it is refused here exactly as IMDS would
//! refuse it, whatever its method.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST};
use http::{Method, StatusCode, Uri};

/// IMDS's IPv4 address, the destination the redirect rule matches.
pub const IMDS_IPV4: Ipv4Addr = Ipv4Addr::new(169, 254, 169, 254);
/// IMDS's IPv6 address on Nitro instances.
pub const IMDS_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x0ec2, 0, 0, 0, 0, 0, 0x0254);
/// IMDS's port.
pub const IMDS_PORT: u16 = 80;

/// Headers that reveal a proxy. IMDS answers 403 to a token PUT carrying `X-Forwarded-For`
/// (and reportedly to token-bearing GETs); `Forwarded` and `Via` say the same thing in other
/// words, so they are treated alike.
pub const PROXY_REVEALING_HEADERS: [&str; 3] = ["x-forwarded-for", "forwarded", "via"];

/// Hop-by-hop headers (RFC 9110 section 7.6.1 and the de-facto `Proxy-Connection`), which
/// describe one connection and never cross a proxy.
const HOP_BY_HOP_HEADERS: [&str; 6] = [
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Why a request is answered by the proxy itself instead of IMDS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Status the client receives.
    pub status: StatusCode,
    /// One-line plain-text body: what was wrong, for the operator reading a client's error.
    pub reason: &'static str,
}

/// Decides whether a connection may be served at all while the redirect is on: only if the
/// kernel's NAT record says it was headed for IMDS, which only happens when our redirect rule
/// (which matches allowed interfaces only) rewrote it. A connection made straight to the proxy's
/// port (from the LAN, another interface, or the host itself) has no such record. This is the
/// second line of defence; the input guard the rules install drops those packets first.
pub fn admit_connection(original_destination: Option<SocketAddr>) -> Result<(), Refusal> {
    match original_destination {
        Some(addr)
            if addr.port() == IMDS_PORT
                && (addr.ip() == IpAddr::V4(IMDS_IPV4) || addr.ip() == IpAddr::V6(IMDS_IPV6)) =>
        {
            Ok(())
        }
        _ => Err(Refusal {
            status: StatusCode::FORBIDDEN,
            reason: "this connection did not come through the IMDS redirect rule of an \
                     allowed interface",
        }),
    }
}

/// Decides whether a request may be forwarded to IMDS.
pub fn admit(method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<(), Refusal> {
    if *method == Method::CONNECT || !uri.path().starts_with('/') || uri.authority().is_some() {
        return Err(Refusal {
            status: StatusCode::BAD_REQUEST,
            reason: "the request target must be a path such as /latest/meta-data/",
        });
    }
    if PROXY_REVEALING_HEADERS
        .iter()
        .any(|name| headers.contains_key(*name))
    {
        return Err(Refusal {
            status: StatusCode::FORBIDDEN,
            reason: "requests carrying X-Forwarded-For, Forwarded or Via are refused, \
                     as IMDS refuses them",
        });
    }
    Ok(())
}

/// The path and query exactly as the client sent them; [`admit`] guarantees origin form.
pub fn path_and_query(uri: &Uri) -> &str {
    uri.path_and_query().map_or("/", |pq| pq.as_str())
}

/// Headers to send upstream: the client's end-to-end headers unchanged, `Host` set to the
/// upstream's authority. Nothing is added.
pub fn upstream_headers(client: &HeaderMap, upstream_host: &HeaderValue) -> HeaderMap {
    let mut headers = client.clone();
    strip_hop_by_hop(&mut headers);
    headers.insert(HOST, upstream_host.clone());
    headers
}

/// Headers to send back to the client: IMDS's end-to-end headers unchanged.
pub fn downstream_headers(upstream: &HeaderMap) -> HeaderMap {
    let mut headers = upstream.clone();
    strip_hop_by_hop(&mut headers);
    headers
}

/// Removes the hop-by-hop headers, every header that `Connection` names, and every `Proxy-*`.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named_by_connection: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|list| list.split(','))
        .filter_map(|token| HeaderName::from_bytes(token.trim().as_bytes()).ok())
        .collect();
    for name in named_by_connection {
        headers.remove(name);
    }
    for name in HOP_BY_HOP_HEADERS {
        headers.remove(name);
    }
    let proxy_headers: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy_headers {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    #[test]
    fn only_connections_headed_for_imds_are_admitted() {
        for ok in ["169.254.169.254:80", "[fd00:ec2::254]:80"] {
            assert_eq!(admit_connection(Some(ok.parse().unwrap())), Ok(()), "{ok}");
        }
        for refused in [
            "169.254.169.254:8169",
            "169.254.169.253:80",
            "172.17.0.1:8169",
            "127.0.0.1:8169",
            "[fd00:ec2::253]:80",
            "[::ffff:169.254.169.254]:80",
        ] {
            let refusal = admit_connection(Some(refused.parse().unwrap())).unwrap_err();
            assert_eq!(refusal.status, StatusCode::FORBIDDEN, "{refused}");
        }
        assert!(admit_connection(None).is_err());
    }

    #[test]
    fn ordinary_imds_requests_are_admitted() {
        for (method, target) in [
            (Method::PUT, "/latest/api/token"),
            (
                Method::GET,
                "/latest/meta-data/iam/security-credentials/role",
            ),
            (Method::HEAD, "/latest/meta-data/"),
            (
                Method::GET,
                "/latest/meta-data/placement/availability-zone/?x=1",
            ),
            (Method::DELETE, "/latest/api/token"),
        ] {
            let uri: Uri = target.parse().unwrap();
            let h = headers(&[("x-aws-ec2-metadata-token", "t")]);
            assert_eq!(admit(&method, &uri, &h), Ok(()), "{method} {target}");
        }
    }

    #[test]
    fn proxy_revealing_headers_are_refused_for_every_method() {
        for name in ["X-Forwarded-For", "Forwarded", "Via", "x-forwarded-for"] {
            for method in [Method::PUT, Method::GET, Method::HEAD, Method::POST] {
                let uri: Uri = "/latest/api/token".parse().unwrap();
                let refusal = admit(&method, &uri, &headers(&[(name, "10.0.0.1")])).unwrap_err();
                assert_eq!(refusal.status, StatusCode::FORBIDDEN, "{name} {method}");
            }
        }
    }

    #[test]
    fn non_origin_form_targets_are_refused() {
        let absolute: Uri = "http://169.254.169.254/latest/".parse().unwrap();
        assert_eq!(
            admit(&Method::GET, &absolute, &HeaderMap::new())
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        let authority: Uri = "169.254.169.254:80".parse().unwrap();
        assert_eq!(
            admit(&Method::CONNECT, &authority, &HeaderMap::new())
                .unwrap_err()
                .status,
            StatusCode::BAD_REQUEST
        );
        let star: Uri = "*".parse().unwrap();
        assert!(admit(&Method::OPTIONS, &star, &HeaderMap::new()).is_err());
    }

    #[test]
    fn path_and_query_is_kept_byte_for_byte() {
        for target in [
            "/latest/meta-data/placement/availability-zone/",
            "/a//b/?q=1&r=%2F",
            "/",
        ] {
            let uri: Uri = target.parse().unwrap();
            assert_eq!(path_and_query(&uri), target);
        }
    }

    #[test]
    fn upstream_headers_strip_hop_by_hop_and_set_host_only() {
        let client = headers(&[
            ("host", "169.254.169.254"),
            ("connection", "keep-alive, x-custom-hop"),
            ("x-custom-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x-t"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("proxy-connection", "keep-alive"),
            ("x-aws-ec2-metadata-token", "secret"),
            ("x-aws-ec2-metadata-token-ttl-seconds", "21600"),
            ("user-agent", "aws-sdk"),
            ("accept", "*/*"),
        ]);
        let host = HeaderValue::from_static("127.0.0.1:1338");
        let sent = upstream_headers(&client, &host);
        let mut names: Vec<&str> = sent.keys().map(|n| n.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            [
                "accept",
                "host",
                "user-agent",
                "x-aws-ec2-metadata-token",
                "x-aws-ec2-metadata-token-ttl-seconds"
            ]
        );
        assert_eq!(sent["host"], "127.0.0.1:1338");
        assert_eq!(sent["x-aws-ec2-metadata-token"], "secret");
        assert_eq!(sent["x-aws-ec2-metadata-token-ttl-seconds"], "21600");
        for name in PROXY_REVEALING_HEADERS {
            assert!(!sent.contains_key(name));
        }
    }

    #[test]
    fn downstream_headers_keep_end_to_end_and_drop_hop_by_hop() {
        let upstream = headers(&[
            ("server", "EC2ws"),
            ("connection", "close"),
            ("content-type", "text/plain"),
            ("content-length", "56"),
            ("x-aws-ec2-metadata-token-ttl-seconds", "21600"),
            ("transfer-encoding", "chunked"),
            ("proxy-authenticate", "Basic"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
        ]);
        let back = downstream_headers(&upstream);
        assert!(!back.contains_key("connection"));
        assert!(!back.contains_key("transfer-encoding"));
        assert!(!back.contains_key("proxy-authenticate"));
        assert_eq!(back["server"], "EC2ws");
        assert_eq!(back["x-aws-ec2-metadata-token-ttl-seconds"], "21600");
        assert_eq!(back.get_all("set-cookie").iter().count(), 2);
    }
}
