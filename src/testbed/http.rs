//! A plain HTTP/1.1 client that runs inside a namespace: `curl` started with `ip netns exec`.
//! It reports what a client there sees (status, headers, body) and, when there is no answer,
//! why: a timeout (the token answer died on the way back) is a different failure from a refused
//! or unreachable connection (the path does not exist), and tests tell them apart.

use std::time::Duration;

use super::plan::IpFamily;

/// How long a request waits for its whole answer unless told otherwise. Above the SDKs' 1 s so a
/// slow-but-working path passes, low enough that an expected timeout costs little.
pub const DEFAULT_HTTP_TIMEOUT_MS: u64 = 2_000;

/// The request header carrying the wanted token lifetime on `PUT /latest/api/token`.
pub const TOKEN_TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
/// The request header carrying the session token on metadata requests.
pub const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";
/// Token lifetime the SDKs ask for (six hours), in seconds.
pub const SDK_TOKEN_TTL_SECS: u32 = 21_600;

/// curl's exit code when `--max-time` ran out.
const CURL_TIMEOUT: i32 = 28;
/// curl's exit code when the connection could not be made.
const CURL_COULDNT_CONNECT: i32 = 7;
/// curl's exit code for a connection closed before any answer.
const CURL_EMPTY_REPLY: i32 = 52;
/// curl's exit code for a connection broken while receiving.
const CURL_RECV_ERROR: i32 = 56;

/// One request to send from a namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRequest {
    /// `GET`, `PUT`, `HEAD`, …
    pub method: String,
    /// Absolute URL; IPv6 literals in brackets.
    pub url: String,
    /// Headers to add (curl adds `Host`, `User-Agent` and `Accept`).
    pub headers: Vec<(String, String)>,
    /// Bound on the whole exchange, connect included.
    pub timeout: Duration,
}

impl HttpRequest {
    /// A request with no extra headers and the default timeout
    /// ([`DEFAULT_HTTP_TIMEOUT_MS`]).
    pub fn new(method: &str, url: impl Into<String>) -> HttpRequest {
        HttpRequest {
            method: method.to_owned(),
            url: url.into(),
            headers: Vec::new(),
            timeout: Duration::from_millis(DEFAULT_HTTP_TIMEOUT_MS),
        }
    }

    /// A `GET`.
    pub fn get(url: impl Into<String>) -> HttpRequest {
        HttpRequest::new("GET", url)
    }

    /// A `PUT` without a body.
    pub fn put(url: impl Into<String>) -> HttpRequest {
        HttpRequest::new("PUT", url)
    }

    /// Adds a header.
    pub fn header(mut self, name: &str, value: &str) -> HttpRequest {
        self.headers.push((name.to_owned(), value.to_owned()));
        self
    }

    /// Sets the bound on the whole exchange.
    pub fn timeout(mut self, timeout: Duration) -> HttpRequest {
        self.timeout = timeout;
        self
    }

    /// The token request every SDK makes first: `PUT /latest/api/token` asking for six hours.
    pub fn imds_token(family: IpFamily) -> HttpRequest {
        HttpRequest::put(format!("{}/latest/api/token", family.imds_url()))
            .header(TOKEN_TTL_HEADER, &SDK_TOKEN_TTL_SECS.to_string())
    }

    /// A metadata `GET` of `path` (starting with `/`), with a token (IMDSv2) or without (IMDSv1).
    pub fn imds_get(family: IpFamily, path: &str, token: Option<&str>) -> HttpRequest {
        let request = HttpRequest::get(format!("{}{path}", family.imds_url()));
        match token {
            Some(token) => request.header(TOKEN_HEADER, token),
            None => request,
        }
    }

    /// curl's arguments for this request. `-g` keeps `[fd00:ec2::254]` from being read as a
    /// glob; `--noproxy` keeps a proxy from the environment out of the path under test; `-v`
    /// because only its trace names the socket error ("Connection refused" vs "Network is
    /// unreachable"): curl 7.88's own message says "Couldn't connect to server" for both.
    pub(crate) fn curl_args(&self) -> Vec<String> {
        let mut args: Vec<String> = ["-sS", "-v", "-g", "--noproxy", "*", "--http1.1", "-m"]
            .iter()
            .map(|arg| (*arg).to_owned())
            .collect();
        args.push(format!("{:.3}", self.timeout.as_secs_f64()));
        if self.method.eq_ignore_ascii_case("HEAD") {
            // `-X HEAD` would make curl wait for a body that never comes.
            args.push("-I".to_owned());
        } else {
            args.extend(["-i".to_owned(), "-X".to_owned(), self.method.clone()]);
        }
        for (name, value) in &self.headers {
            args.push("-H".to_owned());
            // `Name;` is curl's spelling of a header with an empty value.
            args.push(if value.is_empty() {
                format!("{name};")
            } else {
                format!("{name}: {value}")
            });
        }
        args.push(self.url.clone());
        args
    }

    /// `PUT http://… from ns`, for messages.
    pub(crate) fn describe(&self, namespace: &str) -> String {
        format!("{} {} from {namespace}", self.method, self.url)
    }
}

/// An answer as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpResponse {
    /// The status line, e.g. `HTTP/1.1 200 OK`.
    pub status_line: String,
    /// The status code.
    pub status: u16,
    /// Headers in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body bytes.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first value of a header, by case-insensitive name.
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (invalid UTF-8 replaced).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Nothing (or not all) came back within the bound: what a container sees when the token
    /// answer's TTL runs out on the way.
    #[error("{request}: no answer within {timeout:?}")]
    Timeout {
        /// Method, URL and namespace.
        request: String,
        /// The bound that ran out.
        timeout: Duration,
    },
    /// The peer (or a firewall) answered the connection attempt with a reset.
    #[error("{request}: connection refused ({message})")]
    Refused {
        /// Method, URL and namespace.
        request: String,
        /// curl's words.
        message: String,
    },
    /// No route, or an ICMP error, before a connection existed.
    #[error("{request}: destination unreachable ({message})")]
    Unreachable {
        /// Method, URL and namespace.
        request: String,
        /// curl's words.
        message: String,
    },
    /// The connection was closed or reset before a whole answer arrived.
    #[error("{request}: connection closed before an answer ({message})")]
    Closed {
        /// Method, URL and namespace.
        request: String,
        /// curl's words.
        message: String,
    },
    /// Any other curl failure.
    #[error("{request}: curl failed with exit code {code}: {message}")]
    Curl {
        /// Method, URL and namespace.
        request: String,
        /// curl's exit code.
        code: i32,
        /// curl's words.
        message: String,
    },
    /// curl succeeded but printed no HTTP answer.
    #[error("{request}: not an HTTP answer: {output:?}")]
    Malformed {
        /// Method, URL and namespace.
        request: String,
        /// The start of what curl printed.
        output: String,
    },
    /// curl could not be run in the namespace at all.
    #[error("{request}: {source}")]
    Run {
        /// Method, URL and namespace.
        request: String,
        /// What went wrong.
        #[source]
        source: Box<super::TestbedError>,
    },
}

impl HttpError {
    /// True when the failure is a timeout (as opposed to a refused or broken connection).
    pub fn is_timeout(&self) -> bool {
        matches!(self, HttpError::Timeout { .. })
    }
}

/// Maps curl's exit code and `-v` trace to the failure a client would report.
pub(crate) fn classify(
    request: &HttpRequest,
    namespace: &str,
    code: i32,
    stderr: &str,
) -> HttpError {
    let described = request.describe(namespace);
    let message = summarize(stderr);
    match code {
        CURL_TIMEOUT => HttpError::Timeout {
            request: described,
            timeout: request.timeout,
        },
        CURL_COULDNT_CONNECT if message.contains("Connection refused") => HttpError::Refused {
            request: described,
            message,
        },
        CURL_COULDNT_CONNECT => HttpError::Unreachable {
            request: described,
            message,
        },
        CURL_EMPTY_REPLY | CURL_RECV_ERROR => HttpError::Closed {
            request: described,
            message,
        },
        code => HttpError::Curl {
            request: described,
            code,
            message,
        },
    }
}

/// The lines of curl's `-v` trace that say why the connection failed, then curl's own error
/// line. Header lines are left out: they carry tokens.
fn summarize(stderr: &str) -> String {
    let mut parts: Vec<&str> = stderr
        .lines()
        .filter_map(|line| line.strip_prefix("* "))
        .filter(|line| {
            let lower = line.to_ascii_lowercase();
            lower.contains("connect") && lower.contains("fail") && !lower.starts_with("failed to")
        })
        .collect();
    if let Some(last) = stderr
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix("curl: "))
    {
        parts.push(last);
    }
    parts.join("; ")
}

/// Parses what `curl -i` printed: one header block per answer (interim `1xx` ones skipped), a
/// blank line, then the body.
pub(crate) fn parse_response(mut bytes: &[u8]) -> Option<HttpResponse> {
    loop {
        let split = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = std::str::from_utf8(&bytes[..split]).ok()?;
        let body = &bytes[split + 4..];
        let mut lines = head.split("\r\n");
        let status_line = lines.next()?.to_owned();
        if !status_line.starts_with("HTTP/") {
            return None;
        }
        let status: u16 = status_line.split(' ').nth(1)?.parse().ok()?;
        if (100..200).contains(&status) {
            bytes = body;
            continue;
        }
        let headers = lines
            .filter_map(|line| line.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        return Some(HttpResponse {
            status_line,
            status,
            headers,
            body: body.to_vec(),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_request_is_what_sdks_send() {
        let args = HttpRequest::imds_token(IpFamily::V6).curl_args();
        assert_eq!(
            args.join(" "),
            "-sS -v -g --noproxy * --http1.1 -m 2.000 -i -X PUT \
             -H X-aws-ec2-metadata-token-ttl-seconds: 21600 http://[fd00:ec2::254]/latest/api/token"
        );
        let get = HttpRequest::imds_get(IpFamily::V4, "/latest/meta-data/", Some("tok"))
            .timeout(Duration::from_millis(1500));
        let args = get.curl_args();
        assert!(args.contains(&"1.500".to_owned()));
        assert!(args.contains(&"X-aws-ec2-metadata-token: tok".to_owned()));
        assert_eq!(
            args.last().unwrap(),
            "http://169.254.169.254/latest/meta-data/"
        );
        let head = HttpRequest::new("HEAD", "http://x/").header("Empty", "");
        let args = head.curl_args();
        assert!(args.contains(&"-I".to_owned()) && !args.contains(&"-X".to_owned()));
        assert!(args.contains(&"Empty;".to_owned()));
    }

    #[test]
    fn curl_output_becomes_a_response() {
        let raw = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nServer: EC2ws\r\n\
                    X-Aws-Ec2-Metadata-Token-Ttl-Seconds: 21600\r\n\r\nAQAE\r\n\r\nx";
        let response = parse_response(raw).unwrap();
        assert_eq!(response.status, 200);
        assert_eq!(response.status_line, "HTTP/1.1 200 OK");
        assert_eq!(response.header("server"), Some("EC2ws"));
        assert_eq!(response.header(TOKEN_TTL_HEADER), Some("21600"));
        assert_eq!(response.body, b"AQAE\r\n\r\nx");
        assert!(parse_response(b"garbage").is_none());
        assert!(parse_response(b"SSH-2.0\r\n\r\n").is_none());
    }

    #[test]
    fn curl_failures_keep_their_cause() {
        let request = HttpRequest::imds_token(IpFamily::V4);
        assert!(classify(&request, "ns", 28, "curl: (28) Operation timed out").is_timeout());
        let refused = "*   Trying 127.0.0.1:9...\n\
                       * connect to 127.0.0.1 port 9 failed: Connection refused\n\
                       * Failed to connect to 127.0.0.1 port 9 after 0 ms: Couldn't connect to server\n\
                       * Closing connection 0\n\
                       curl: (7) Failed to connect to 127.0.0.1 port 9 after 0 ms: Couldn't connect to server\n";
        let err = classify(&request, "ns", 7, refused);
        assert!(matches!(err, HttpError::Refused { .. }), "{err:?}");
        assert_eq!(
            err.to_string(),
            "PUT http://169.254.169.254/latest/api/token from ns: connection refused \
             (connect to 127.0.0.1 port 9 failed: Connection refused; (7) Failed to connect to \
             127.0.0.1 port 9 after 0 ms: Couldn't connect to server)"
        );
        let unreachable = "* Immediate connect fail for 10.1.2.3: Network is unreachable\n\
                           curl: (7) Failed to connect to 10.1.2.3 port 80 after 0 ms: x\n";
        assert!(matches!(
            classify(&request, "ns", 7, unreachable),
            HttpError::Unreachable { .. }
        ));
        let with_headers = "> X-aws-ec2-metadata-token: secret\ncurl: (28) Operation timed out\n";
        assert!(!classify(&request, "ns", 56, with_headers)
            .to_string()
            .contains("secret"));
        assert!(matches!(
            classify(&request, "ns", 56, "curl: (56) Recv failure"),
            HttpError::Closed { .. }
        ));
        let err = classify(&request, "ihp-x-c0", 6, "curl: (6) x");
        assert_eq!(
            err.to_string(),
            "PUT http://169.254.169.254/latest/api/token from ihp-x-c0: \
             curl failed with exit code 6: (6) x"
        );
    }
}
