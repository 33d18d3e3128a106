//! The IMDS simulator: an in-memory stand-in for the EC2 Instance Metadata Service that answers
//! the way the real one does (see `IMDS.md`).
//!
//! This module owns the pure logic only: given one request (method, path, headers, body) and the
//! current time, [`Simulator::respond`] returns the response IMDS would give and says whether it
//! must leave with the instance's hop limit as IP TTL. There are no sockets and no async here;
//! whoever serves it on a port sits at the edge, shares one [`Simulator`] through an `Arc`, and
//! passes the clock in, so tests control time. Tests, the demo and the benchmarks run against
//! it, and so can anyone developing against IMDS on a laptop.
//!
//! Sub-files, in the order a request meets them:
//! - this file: configuration and the router (token endpoint, authorisation, metadata tree);
//! - `tokens`: IMDSv2 session tokens, bounded in number;
//! - `tree`: the fixed metadata tree, directory listings, the identity document;
//! - `credentials`: the rotating role credentials;
//! - `reply`: status pages and the headers every IMDS answer carries;
//! - `clock`, `json`, `random`: time formatting, hand-written JSON, random secrets.

mod clock;
mod credentials;
mod json;
mod random;
mod reply;
mod tokens;
mod tree;

#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::HeaderValue;
use http::{HeaderMap, Method, Response, StatusCode};

use credentials::Rotation;
use tokens::TokenStore;
use tree::{Found, Leaf, Tree};

/// Hop limit the simulator reports for token answers unless told otherwise: EC2's default
/// `HttpPutResponseHopLimit`, the value that strands containers on a Docker bridge.
pub const DEFAULT_SIM_HOP_LIMIT: u8 = 1;

/// Largest `HttpPutResponseHopLimit` EC2 accepts; the simulator refuses more so it cannot model
/// an instance that cannot exist.
pub const MAX_SIM_HOP_LIMIT: u8 = 64;

/// Role listed under `iam/security-credentials/` by default; a name that says where the
/// credentials came from if one ever shows up in a log.
pub const DEFAULT_SIM_ROLE: &str = "imds-hop-proxy-demo";

/// How long each issued credential set lives by default: six hours, like the instance-profile
/// credentials real IMDS hands out.
pub const DEFAULT_SIM_CREDENTIAL_LIFETIME_SECS: u64 = 6 * 3600;

/// Longest credential lifetime the simulator accepts: twelve hours, the longest an STS role
/// session can last, so it never models credentials AWS would not issue.
pub const MAX_SIM_CREDENTIAL_LIFETIME_SECS: u64 = 12 * 3600;

/// User data served by default, so `/latest/user-data` answers like an instance launched with a
/// small boot script.
pub const DEFAULT_SIM_USER_DATA: &[u8] = b"#!/bin/bash\necho hello from user-data\n";

/// Largest user data EC2 accepts at launch (16 KB); larger would model an impossible instance.
pub const MAX_SIM_USER_DATA_BYTES: usize = 16 * 1024;

/// Shortest token lifetime IMDS grants, in seconds; a PUT asking for less gets 400.
pub const MIN_TOKEN_TTL_SECS: u64 = 1;

/// Longest token lifetime IMDS grants (six hours), in seconds; a PUT asking for more gets 400.
pub const MAX_TOKEN_TTL_SECS: u64 = 21600;

/// Most tokens the simulator remembers at once. Every PUT mints a token (botocore and the JS SDK
/// PUT on every fetch), so without a bound a long benchmark would grow memory without limit.
/// Expired tokens are dropped first; past this, the oldest live token is forgotten and its next
/// use gets 401, which clients already handle by fetching a new one.
pub const MAX_SIM_LIVE_TOKENS: usize = 10_000;

/// Request header that asks for a token of this many seconds, and response header that reports
/// the granted (or, on token-bearing GETs, remaining) lifetime.
pub const TOKEN_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";

/// Request header that carries an IMDSv2 session token on metadata requests.
pub const TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";

/// The only path that mints tokens; IMDS refuses the versioned spellings.
pub const TOKEN_PATH: &str = "/latest/api/token";

/// Header whose presence IMDS treats as the mark of a forwarding proxy (IMDS.md).
const FORWARDED_FOR_HEADER: &str = "x-forwarded-for";

/// Whether the simulated instance demands IMDSv2 session tokens, mirroring EC2's
/// `HttpTokens` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenMode {
    /// `http-tokens=required`: every metadata request must carry a valid token (IMDSv2 only).
    /// The default because it is the setting that breaks containers behind a hop limit of 1.
    #[default]
    Required,
    /// `http-tokens=optional`: requests without a token are served too (IMDSv1 allowed).
    Optional,
}

impl TokenMode {
    /// The spelling EC2 and the AWS CLI use, so flags and config read like `aws ec2` options.
    pub fn as_str(self) -> &'static str {
        match self {
            TokenMode::Required => "required",
            TokenMode::Optional => "optional",
        }
    }
}

impl fmt::Display for TokenMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A token mode that is neither `required` nor `optional`; carries the rejected text so the
/// message can show it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid token mode {value:?}: use \"required\" (IMDSv2 only) or \"optional\" (IMDSv1 allowed)"
)]
pub struct ParseTokenModeError {
    /// The text that was given.
    pub value: String,
}

impl FromStr for TokenMode {
    type Err = ParseTokenModeError;

    /// Accepts EC2's spellings in any ASCII case, since people copy them from consoles and docs.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("required") {
            Ok(TokenMode::Required)
        } else if s.eq_ignore_ascii_case("optional") {
            Ok(TokenMode::Optional)
        } else {
            Err(ParseTokenModeError {
                value: s.to_owned(),
            })
        }
    }
}

/// The instance the simulator pretends to be: the metadata options that change how IMDS answers.
#[derive(Clone, PartialEq, Eq)]
pub struct SimulatorConfig {
    /// IP TTL / IPv6 hop limit the server must put on token answers (1..=64, see
    /// [`MAX_SIM_HOP_LIMIT`]); it is what makes the simulator reproduce the container problem.
    pub hop_limit: u8,
    /// Whether metadata requests without a token are served.
    pub tokens: TokenMode,
    /// IAM role name listed under `iam/security-credentials/`; clients read it there and then
    /// fetch credentials by that name.
    pub role: String,
    /// How long each issued credential set lives; short values let tests and demos watch
    /// rotation happen.
    pub credential_lifetime: Duration,
    /// Bytes served at `/latest/user-data`; `None` makes that path 404, like a real instance
    /// launched without user data.
    pub user_data: Option<Bytes>,
}

impl Default for SimulatorConfig {
    fn default() -> Self {
        SimulatorConfig {
            hop_limit: DEFAULT_SIM_HOP_LIMIT,
            tokens: TokenMode::Required,
            role: DEFAULT_SIM_ROLE.to_owned(),
            credential_lifetime: Duration::from_secs(DEFAULT_SIM_CREDENTIAL_LIFETIME_SECS),
            user_data: Some(Bytes::from_static(DEFAULT_SIM_USER_DATA)),
        }
    }
}

// User data often holds secrets (IMDS.md), so Debug shows only its size.
impl fmt::Debug for SimulatorConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimulatorConfig")
            .field("hop_limit", &self.hop_limit)
            .field("tokens", &self.tokens)
            .field("role", &self.role)
            .field("credential_lifetime", &self.credential_lifetime)
            .field(
                "user_data",
                &self
                    .user_data
                    .as_ref()
                    .map(|data| format!("** redacted ({} bytes) **", data.len())),
            )
            .finish()
    }
}

/// A [`SimulatorConfig`] value that no EC2 instance could have. Each variant names the field and
/// the accepted range so the user can fix the flag or config key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SimulatorConfigError {
    /// `hop_limit` outside what EC2 accepts.
    #[error("simulator hop_limit {value} is out of range: use 1..={max} (EC2's HttpPutResponseHopLimit range)", max = MAX_SIM_HOP_LIMIT)]
    HopLimitOutOfRange {
        /// The rejected hop limit.
        value: u8,
    },
    /// `role` is not a valid IAM role name; it must also be a single path segment.
    #[error("simulator role {role:?} is not an IAM role name: use 1 to 64 characters from A-Z a-z 0-9 + = , . @ _ -")]
    InvalidRoleName {
        /// The rejected role name.
        role: String,
    },
    /// `credential_lifetime` of zero or longer than an STS session can last.
    #[error("simulator credential_lifetime {secs}s is out of range: use 1..={max} seconds", max = MAX_SIM_CREDENTIAL_LIFETIME_SECS)]
    CredentialLifetimeOutOfRange {
        /// The rejected lifetime, in whole seconds.
        secs: u64,
    },
    /// `user_data` larger than EC2 accepts.
    #[error("simulator user_data is {len} bytes: EC2 accepts at most {max} bytes", max = MAX_SIM_USER_DATA_BYTES)]
    UserDataTooLarge {
        /// The rejected size, in bytes.
        len: usize,
    },
}

impl SimulatorConfig {
    /// Checks that the configuration describes an instance EC2 could run, so a typo fails at
    /// start-up with the field name rather than producing a simulator that lies. [`Simulator::new`]
    /// does not require this (it never panics on odd values), but front ends should call it.
    pub fn validate(&self) -> Result<(), SimulatorConfigError> {
        if !(1..=MAX_SIM_HOP_LIMIT).contains(&self.hop_limit) {
            return Err(SimulatorConfigError::HopLimitOutOfRange {
                value: self.hop_limit,
            });
        }
        let role_ok = (1..=64).contains(&self.role.len())
            && self
                .role
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+=,.@_-".contains(&b));
        if !role_ok {
            return Err(SimulatorConfigError::InvalidRoleName {
                role: self.role.clone(),
            });
        }
        let lifetime = self.credential_lifetime;
        if lifetime < Duration::from_secs(1)
            || lifetime > Duration::from_secs(MAX_SIM_CREDENTIAL_LIFETIME_SECS)
        {
            return Err(SimulatorConfigError::CredentialLifetimeOutOfRange {
                secs: lifetime.as_secs(),
            });
        }
        if let Some(data) = &self.user_data {
            if data.len() > MAX_SIM_USER_DATA_BYTES {
                return Err(SimulatorConfigError::UserDataTooLarge { len: data.len() });
            }
        }
        Ok(())
    }
}

/// One simulated instance's IMDS: its configuration plus the state real IMDS keeps (issued
/// tokens, current credentials). Shared across connections through an `Arc`.
pub struct Simulator {
    config: SimulatorConfig,
    tree: Tree,
    tokens: Mutex<TokenStore>,
    credentials: Mutex<Rotation>,
}

// The listener shares one simulator across connection tasks; fail the build, not the server.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Simulator>();
};

// Tokens and credentials are secrets: Debug shows the configuration only.
impl fmt::Debug for Simulator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Simulator")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// One answer from the simulator, plus what the server must do with the socket to send it the
/// way IMDS would.
pub struct SimResponse {
    /// The complete response: status, headers (including `Content-Length`) and body.
    pub response: Response<Bytes>,
    /// True when the caller must send this response with IP TTL / hop limit =
    /// `config.hop_limit`: every answer to a `PUT` on a token path (`/<version>/api/token`),
    /// whatever its status, because the hop limit belongs to the token service, not to one
    /// status code. Everything else leaves with the normal TTL.
    pub hop_limited: bool,
}

// Bodies can hold tokens and credentials, so Debug shows the body's size only.
impl fmt::Debug for SimResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SimResponse")
            .field("status", &self.response.status())
            .field("headers", self.response.headers())
            .field(
                "body",
                &format!("** redacted ({} bytes) **", self.response.body().len()),
            )
            .field("hop_limited", &self.hop_limited)
            .finish()
    }
}

impl Simulator {
    /// Builds a fresh instance: no tokens issued yet, credentials issued on first request.
    pub fn new(config: SimulatorConfig) -> Self {
        Simulator {
            tree: Tree::new(&config),
            tokens: Mutex::new(TokenStore::new(MAX_SIM_LIVE_TOKENS)),
            credentials: Mutex::new(Rotation::new(config.credential_lifetime)),
            config,
        }
    }

    /// The configuration this simulator was built with; the server reads `hop_limit` here.
    pub fn config(&self) -> &SimulatorConfig {
        &self.config
    }

    /// Answers one request as IMDS would. `now` is passed in so tests control time.
    ///
    /// `path_and_query` is the request target as received; only the path part selects the
    /// answer. `body` is accepted and ignored, as IMDS ignores request bodies.
    pub fn respond(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> SimResponse {
        let _ = body;
        let now = clock::clamp(now);
        let path = path_and_query
            .split_once('?')
            .map_or(path_and_query, |(path, _query)| path);
        let mut answer = self.answer(method, path, headers, now);
        if method == Method::HEAD {
            // Same status and headers (Content-Length included) as GET, never a body, errors too.
            *answer.response.body_mut() = Bytes::new();
        }
        answer
    }

    /// The full answer to a request for `path`, as if it were a GET when it is a HEAD.
    fn answer(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        now: SystemTime,
    ) -> SimResponse {
        if let Some(version) = token_path_version(path) {
            if method == Method::PUT {
                return SimResponse {
                    response: self.issue_token(version, headers, now),
                    hop_limited: true,
                };
            }
            if version == "latest" {
                // One capture shows this answer; OPTIONS gets it too, because nothing is known
                // about what real IMDS says to OPTIONS.
                return not_hop_limited(reply::method_not_allowed("OPTIONS, PUT", now));
            }
            // Non-PUT on a versioned token path: versioned trees have no `api/`, so it falls
            // through to the metadata tree and ends in 401 or 404 like any unknown path.
        }

        // PUT (and POST, DELETE, ...) on a metadata path: no capture shows what IMDS answers.
        // 405 with the methods that do work is the HTTP answer, and it makes botocore fall back
        // to IMDSv1 the same way a 405 from a token path would.
        if method != Method::GET && method != Method::HEAD {
            return not_hop_limited(reply::method_not_allowed("GET, HEAD", now));
        }

        let remaining_ttl = match self.authorize(headers, now) {
            Ok(remaining_ttl) => remaining_ttl,
            Err(status) => return not_hop_limited(reply::error(status, now)),
        };

        let mut response = self.lookup(path, now);
        if let Some(secs) = remaining_ttl {
            response
                .headers_mut()
                .insert(TOKEN_TTL_HEADER, HeaderValue::from(secs));
        }
        not_hop_limited(response)
    }

    /// Answers a PUT on `/<version>/api/token`.
    fn issue_token(&self, version: &str, headers: &HeaderMap, now: SystemTime) -> Response<Bytes> {
        // IMDS refuses anything that looks forwarded: the IMDSv2 defence against open reverse
        // proxies. Checked first so a proxy that adds the header learns it from any PUT.
        if headers.contains_key(FORWARDED_FOR_HEADER) || version != "latest" {
            return reply::error(StatusCode::FORBIDDEN, now);
        }
        let Some(ttl_secs) = requested_token_ttl(headers) else {
            return reply::error(StatusCode::BAD_REQUEST, now);
        };
        let Ok(token) = random::token() else {
            // No OS randomness: refuse rather than hand out a guessable token.
            return reply::error(StatusCode::INTERNAL_SERVER_ERROR, now);
        };
        let expires_at = clock::add(now, Duration::from_secs(ttl_secs));
        let body = Bytes::from(token.clone());
        lock(&self.tokens).insert(token, expires_at, now);

        let mut response = reply::ok(body, reply::TEXT_PLAIN, now, now);
        response
            .headers_mut()
            .insert(TOKEN_TTL_HEADER, HeaderValue::from(ttl_secs));
        response
    }

    /// Decides whether a metadata request may be served. `Ok(Some(secs))` carries the token's
    /// remaining lifetime for the response header; `Ok(None)` is an IMDSv1 request.
    fn authorize(&self, headers: &HeaderMap, now: SystemTime) -> Result<Option<u64>, StatusCode> {
        let Some(token) = headers.get(TOKEN_HEADER) else {
            return match self.config.tokens {
                TokenMode::Optional => Ok(None),
                TokenMode::Required => Err(StatusCode::UNAUTHORIZED),
            };
        };
        // Inference from reports (IMDS.md), not documentation: token-bearing GETs that look
        // forwarded are refused like forwarded PUTs. IMDSv1 GETs with the header are served.
        if headers.contains_key(FORWARDED_FOR_HEADER) {
            return Err(StatusCode::FORBIDDEN);
        }
        let remaining = token
            .to_str()
            .ok()
            .and_then(|token| lock(&self.tokens).remaining(token, now));
        match remaining {
            // Rounded up so a token that still works never reports 0 seconds left.
            Some(left) => Ok(Some(left.as_secs() + u64::from(left.subsec_nanos() > 0))),
            None => Err(StatusCode::UNAUTHORIZED),
        }
    }

    /// Serves an authorised GET from the metadata tree.
    fn lookup(&self, path: &str, now: SystemTime) -> Response<Bytes> {
        let Some(found) = self.tree.find(path) else {
            return reply::error(StatusCode::NOT_FOUND, now);
        };
        let launched = self.tree.launch_time();
        match found {
            Found::Listing(listing) => reply::ok(listing.into(), reply::TEXT_PLAIN, launched, now),
            Found::Leaf(Leaf::Text(text)) => {
                reply::ok(text.clone(), reply::TEXT_PLAIN, launched, now)
            }
            Found::Leaf(Leaf::UserData(data)) => {
                reply::ok(data.clone(), reply::OCTET_STREAM, launched, now)
            }
            Found::Leaf(Leaf::Credentials) => self.credentials_reply(now, |set| set.to_json()),
            Found::Leaf(Leaf::IamInfo) => {
                let profile = self.tree.instance_profile();
                self.credentials_reply(now, |set| set.info_json(profile))
            }
        }
    }

    /// Renders a document derived from the current credential set, issuing a new set first when
    /// rotation is due. `Last-Modified` is when that set was issued.
    fn credentials_reply(
        &self,
        now: SystemTime,
        render: impl FnOnce(&credentials::CredentialSet) -> String,
    ) -> Response<Bytes> {
        let rendered = lock(&self.credentials)
            .current(now)
            .map(|set| (render(set), set.issued_at()));
        match rendered {
            Ok((json, issued_at)) => reply::ok(json.into(), reply::TEXT_PLAIN, issued_at, now),
            Err(_) => reply::error(StatusCode::INTERNAL_SERVER_ERROR, now),
        }
    }
}

/// The `<version>` of a `/<version>/api/token` path, or `None` for any other path.
fn token_path_version(path: &str) -> Option<&str> {
    let version = path.strip_prefix('/')?.strip_suffix("/api/token")?;
    (!version.is_empty() && !version.contains('/')).then_some(version)
}

/// The TTL a token PUT asks for, if it is a plain decimal number of seconds IMDS would grant.
fn requested_token_ttl(headers: &HeaderMap) -> Option<u64> {
    let text = headers.get(TOKEN_TTL_HEADER)?.to_str().ok()?;
    // Digits only: `u64::from_str` would also take "+60", which IMDS is not known to accept.
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = text.parse().ok()?;
    (MIN_TOKEN_TTL_SECS..=MAX_TOKEN_TTL_SECS)
        .contains(&secs)
        .then_some(secs)
}

fn not_hop_limited(response: Response<Bytes>) -> SimResponse {
    SimResponse {
        response,
        hop_limited: false,
    }
}

/// Locks simulator state. The locked sections only touch maps and clone strings, so a poisoned
/// lock means a bug elsewhere already panicked; the simulator keeps serving rather than turn one
/// failed request into failures for every later one.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
