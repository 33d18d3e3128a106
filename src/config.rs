//! Every setting of `imds-hop-proxy run`: its default, where it comes from, and its validation.
//!
//! A setting can be given three ways, highest precedence first: a command-line flag, an
//! `IMDS_HOP_PROXY_*` environment variable, a key in the TOML file named by `--config`. All three
//! land in one [`RawSettings`] (the same struct is the clap argument group and the TOML table, so
//! a setting is declared once), the layers are merged, and [`RawSettings::validate`] turns the
//! result into a typed [`Config`] or a [`ConfigError`] that names the key and the accepted range.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::{Authority, Scheme, Uri};
use serde::Deserialize;

use crate::rules::{BackendChoice, InterfacePattern, RuleSpec};

/// The port redirected container traffic is sent to.
pub const DEFAULT_PROXY_PORT: u16 = 8169;
/// Where the proxy listens with the redirect on: every address, IPv4 and IPv6, because the
/// kernel's REDIRECT delivers to the address of whichever bridge the packet arrived on, and
/// bridges come and go. Only redirected connections are served (see `policy::admit_connection`
/// and the input guard the rules install).
pub const DEFAULT_LISTEN: &str = "0.0.0.0:8169,[::]:8169";
/// Where the proxy listens with `--no-redirect`: loopback only, so a proxy without its rules
/// and guard never hands IMDS data to the network.
pub const DEFAULT_LISTEN_NO_REDIRECT: &str = "127.0.0.1:8169";
/// Whether `run` installs and maintains the redirect rules.
pub const DEFAULT_REDIRECT: bool = true;
/// Interfaces whose IMDS traffic is redirected: Docker's default bridge and its user-defined
/// bridges (`+` is a trailing wildcard, as in iptables).
pub const DEFAULT_ALLOWED_INTERFACES: &str = "docker0,br-+";
/// Firewall backend: `auto` follows what the host and Docker use.
pub const DEFAULT_RULES_BACKEND: &str = "auto";
/// How often `run` checks that its rules are still in place and restores them.
pub const DEFAULT_RULES_CHECK_INTERVAL_MS: u64 = 2_000;
/// Whether the rules stay after a clean stop (for restarts that must not drop a request).
pub const DEFAULT_KEEP_RULES_ON_STOP: bool = false;
/// The real IMDS, reached from the host itself, so the hop limit of 1 is never crossed.
pub const DEFAULT_UPSTREAM: &str = "http://169.254.169.254";
/// IP TTL and IPv6 hop limit of every accepted socket: the "fresh TTL" that survives the
/// docker0 forward. 64 is Linux's own default.
pub const DEFAULT_RESPONSE_TTL: u8 = 64;
/// Connections served at once; further clients wait in the kernel's accept backlog.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 256;
/// Time a client has to send its request line and headers.
pub const DEFAULT_HEADER_READ_TIMEOUT_MS: u64 = 5_000;
/// Largest request head (request line plus headers). hyper's floor is 8 KiB.
pub const DEFAULT_MAX_HEADER_BYTES: u32 = 16_384;
/// Largest request body. IMDS requests have none; a token PUT is empty.
pub const DEFAULT_MAX_REQUEST_BODY_BYTES: u32 = 4_096;
/// Largest upstream response body. User-data, the largest IMDS document, is at most 16 KiB.
pub const DEFAULT_MAX_RESPONSE_BODY_BYTES: u32 = 1_048_576;
/// Time to open the TCP connection to IMDS.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS: u64 = 250;
/// Time from sending the request upstream to holding the whole response.
/// With [`DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS`] it keeps a client's worst wait under the 1 s
/// timeout every AWS SDK uses for IMDS, so the client sees our 502/504 rather than its own timeout.
pub const DEFAULT_UPSTREAM_RESPONSE_TIMEOUT_MS: u64 = 600;
/// Time in-flight requests get to finish after SIGTERM/SIGINT before the process exits anyway.
pub const DEFAULT_DRAIN_TIMEOUT_MS: u64 = 3_000;
/// Log verbosity, as a tracing `EnvFilter` directive.
pub const DEFAULT_LOG_LEVEL: &str = "info";

/// The SDKs' IMDS timeout; a configuration whose upstream bounds add up to more is warned about.
pub const SDK_IMDS_TIMEOUT_MS: u64 = 1_000;

/// Log line format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines, for a terminal or the journal.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// One layer of settings as given, before defaults and validation. Every field is optional so
/// that layers can be merged; the same struct is parsed from flags/environment and from TOML.
#[derive(Clone, Debug, Default, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct RawSettings {
    /// Address to listen on; repeat the flag (or comma-separate) for several.
    #[arg(long, env = "IMDS_HOP_PROXY_LISTEN", value_name = "ADDR:PORT", value_delimiter = ',',
          help = format!("Address to listen on; repeat for several [default: {DEFAULT_LISTEN}]"))]
    pub listen: Option<Vec<SocketAddr>>,

    /// Whether to install and maintain the redirect rules (`--no-redirect` turns them off).
    #[arg(long = "no-redirect", env = "IMDS_HOP_PROXY_REDIRECT", num_args = 0,
          default_missing_value = "false", value_name = "BOOL",
          help = format!("Do not install the redirect rules and listener guard; IMDS_HOP_PROXY_REDIRECT=true|false [default: redirect={DEFAULT_REDIRECT}]"))]
    pub redirect: Option<bool>,

    /// Interfaces whose IMDS traffic is redirected.
    #[arg(long = "allow-interface", env = "IMDS_HOP_PROXY_ALLOWED_INTERFACES", value_name = "NAME",
          value_delimiter = ',',
          help = format!("Interface whose IMDS traffic is redirected; repeat for several; a trailing + is a wildcard [default: {DEFAULT_ALLOWED_INTERFACES}]"))]
    pub allowed_interfaces: Option<Vec<String>>,

    /// Firewall backend for the redirect rules.
    #[arg(long, env = "IMDS_HOP_PROXY_RULES_BACKEND", value_name = "BACKEND",
          help = format!("Firewall backend: auto, nft, iptables-nft or iptables-legacy [default: {DEFAULT_RULES_BACKEND}]"))]
    pub rules_backend: Option<String>,

    /// How often the rules are checked and restored.
    #[arg(long, env = "IMDS_HOP_PROXY_RULES_CHECK_INTERVAL_MS", value_name = "MS",
          help = format!("How often the rules are checked and restored, 100-5000 [default: {DEFAULT_RULES_CHECK_INTERVAL_MS}]"))]
    pub rules_check_interval_ms: Option<u64>,

    /// Whether the rules stay after a clean stop.
    #[arg(long, env = "IMDS_HOP_PROXY_KEEP_RULES_ON_STOP", num_args = 0,
          default_missing_value = "true", value_name = "BOOL",
          help = format!("Leave the redirect rules in place after a clean stop [default: {DEFAULT_KEEP_RULES_ON_STOP}]"))]
    pub keep_rules_on_stop: Option<bool>,

    /// Base URL of the real IMDS.
    #[arg(long, env = "IMDS_HOP_PROXY_UPSTREAM", value_name = "URL",
          help = format!("Base URL of the real IMDS [default: {DEFAULT_UPSTREAM}]"))]
    pub upstream: Option<String>,

    /// IP TTL / IPv6 hop limit of accepted sockets.
    #[arg(long, env = "IMDS_HOP_PROXY_RESPONSE_TTL", value_name = "HOPS",
          help = format!("IP TTL and IPv6 hop limit of answers to clients, 1-255 [default: {DEFAULT_RESPONSE_TTL}]"))]
    pub response_ttl: Option<u64>,

    /// Connections served at once.
    #[arg(long, env = "IMDS_HOP_PROXY_MAX_CONNECTIONS", value_name = "N",
          help = format!("Connections served at once, 1-65535 [default: {DEFAULT_MAX_CONNECTIONS}]"))]
    pub max_connections: Option<u64>,

    /// Time a client has to send its request head.
    #[arg(long, env = "IMDS_HOP_PROXY_HEADER_READ_TIMEOUT_MS", value_name = "MS",
          help = format!("Time a client has to send its request head, 10-60000 [default: {DEFAULT_HEADER_READ_TIMEOUT_MS}]"))]
    pub header_read_timeout_ms: Option<u64>,

    /// Largest request head in bytes.
    #[arg(long, env = "IMDS_HOP_PROXY_MAX_HEADER_BYTES", value_name = "BYTES",
          help = format!("Largest request head, 8192-1048576 [default: {DEFAULT_MAX_HEADER_BYTES}]"))]
    pub max_header_bytes: Option<u64>,

    /// Largest request body in bytes.
    #[arg(long, env = "IMDS_HOP_PROXY_MAX_REQUEST_BODY_BYTES", value_name = "BYTES",
          help = format!("Largest request body, 0-1048576 [default: {DEFAULT_MAX_REQUEST_BODY_BYTES}]"))]
    pub max_request_body_bytes: Option<u64>,

    /// Largest upstream response body in bytes.
    #[arg(long, env = "IMDS_HOP_PROXY_MAX_RESPONSE_BODY_BYTES", value_name = "BYTES",
          help = format!("Largest upstream response body, 1024-67108864 [default: {DEFAULT_MAX_RESPONSE_BODY_BYTES}]"))]
    pub max_response_body_bytes: Option<u64>,

    /// Time to connect to IMDS.
    #[arg(long, env = "IMDS_HOP_PROXY_UPSTREAM_CONNECT_TIMEOUT_MS", value_name = "MS",
          help = format!("Time to connect to IMDS, 1-60000 [default: {DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS}]"))]
    pub upstream_connect_timeout_ms: Option<u64>,

    /// Time for IMDS to answer in full.
    #[arg(long, env = "IMDS_HOP_PROXY_UPSTREAM_RESPONSE_TIMEOUT_MS", value_name = "MS",
          help = format!("Time for IMDS to answer in full, 1-60000 [default: {DEFAULT_UPSTREAM_RESPONSE_TIMEOUT_MS}]"))]
    pub upstream_response_timeout_ms: Option<u64>,

    /// Time in-flight requests get after SIGTERM/SIGINT.
    #[arg(long, env = "IMDS_HOP_PROXY_DRAIN_TIMEOUT_MS", value_name = "MS",
          help = format!("Time in-flight requests get after SIGTERM/SIGINT, 0-600000 [default: {DEFAULT_DRAIN_TIMEOUT_MS}]"))]
    pub drain_timeout_ms: Option<u64>,

    /// Log format.
    #[arg(
        long,
        env = "IMDS_HOP_PROXY_LOG_FORMAT",
        value_name = "FORMAT",
        help = "Log format: text or json [default: text]"
    )]
    pub log_format: Option<LogFormat>,

    /// Log level filter.
    #[arg(long, env = "IMDS_HOP_PROXY_LOG_LEVEL", value_name = "FILTER",
          help = format!("Log filter: error, warn, info, debug, or a tracing directive [default: {DEFAULT_LOG_LEVEL}]"))]
    pub log_level: Option<String>,
}

/// The validated settings `run` works with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Addresses the proxy accepts clients on.
    pub listen: Vec<SocketAddr>,
    /// The redirect rules and what they cover, or `None` with `--no-redirect`.
    pub redirect: Option<Redirect>,
    /// The real IMDS: `http` only, authority only.
    pub upstream: Upstream,
    /// TTL / hop limit set on every accepted socket.
    pub response_ttl: u8,
    /// Connections served at once.
    pub max_connections: usize,
    /// Bound on reading a request head.
    pub header_read_timeout: Duration,
    /// Bound on the size of a request head.
    pub max_header_bytes: usize,
    /// Bound on the size of a request body.
    pub max_request_body_bytes: usize,
    /// Bound on the size of an upstream response body.
    pub max_response_body_bytes: usize,
    /// Bound on connecting to IMDS.
    pub upstream_connect_timeout: Duration,
    /// Bound on IMDS answering in full.
    pub upstream_response_timeout: Duration,
    /// Bound on the shutdown drain.
    pub drain_timeout: Duration,
    /// Log line format.
    pub log_format: LogFormat,
    /// Log filter directive.
    pub log_level: String,
}

/// What the redirect rules cover and how they are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// The port every listener shares; the rules send traffic there.
    pub port: u16,
    /// Interface names or `name+` wildcards whose IMDS traffic is redirected.
    pub allowed_interfaces: Vec<InterfacePattern>,
    /// A fixed firewall backend, or `auto` to follow what the host uses.
    pub backend: BackendChoice,
    /// Redirect IPv4 IMDS traffic (some listener is IPv4).
    pub ipv4: bool,
    /// Redirect IPv6 IMDS traffic (some listener is IPv6).
    pub ipv6: bool,
    /// How often the rules are checked and restored.
    pub check_interval: Duration,
    /// Whether the rules stay after a clean stop.
    pub keep_on_stop: bool,
}

/// The upstream IMDS endpoint, reduced to what a request needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upstream {
    /// `host[:port]`, sent as `Host` and used to connect.
    pub authority: Authority,
}

impl Upstream {
    /// Host and port to connect to (port 80 when the URL names none).
    pub fn host_port(&self) -> (String, u16) {
        let host = self.authority.host();
        // `Authority::host` keeps the brackets of an IPv6 literal; the resolver wants them off.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        (host.to_owned(), self.authority.port_u16().unwrap_or(80))
    }
}

/// Why a configuration was refused. Every variant names the key, so the operator knows which
/// line (or flag, or variable) to fix. The process exits 64 (EX_USAGE) on any of them.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named by `--config` could not be read.
    #[error("config: cannot read {path}: {source}")]
    ReadFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or has an unknown key or a value of the wrong type.
    #[error("config: {path} is not a valid configuration file: {message}")]
    ParseFile { path: PathBuf, message: String },
    /// A value is of the right type but outside what the key accepts.
    #[error(
        "{key}: {value} is not accepted: expected {expected} (flag --{flag}, environment {env})"
    )]
    Invalid {
        key: &'static str,
        flag: String,
        env: String,
        value: String,
        expected: &'static str,
    },
}

impl ConfigError {
    fn invalid(key: &'static str, value: impl ToString, expected: &'static str) -> Self {
        ConfigError::Invalid {
            key,
            flag: key.replace('_', "-"),
            env: format!("IMDS_HOP_PROXY_{}", key.to_ascii_uppercase()),
            value: value.to_string(),
            expected,
        }
    }
}

impl RawSettings {
    /// Reads a TOML file whose keys are the setting names (`upstream_response_timeout_ms = 600`).
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|err| ConfigError::ParseFile {
            path: path.to_owned(),
            // toml's message names the key and the line; keep it on one line for the journal.
            message: err.to_string().trim().replace('\n', " "),
        })
    }

    /// Fills every setting this layer leaves unset from `lower`.
    pub fn or(self, lower: RawSettings) -> RawSettings {
        RawSettings {
            listen: self.listen.or(lower.listen),
            redirect: self.redirect.or(lower.redirect),
            allowed_interfaces: self.allowed_interfaces.or(lower.allowed_interfaces),
            rules_backend: self.rules_backend.or(lower.rules_backend),
            rules_check_interval_ms: self
                .rules_check_interval_ms
                .or(lower.rules_check_interval_ms),
            keep_rules_on_stop: self.keep_rules_on_stop.or(lower.keep_rules_on_stop),
            upstream: self.upstream.or(lower.upstream),
            response_ttl: self.response_ttl.or(lower.response_ttl),
            max_connections: self.max_connections.or(lower.max_connections),
            header_read_timeout_ms: self.header_read_timeout_ms.or(lower.header_read_timeout_ms),
            max_header_bytes: self.max_header_bytes.or(lower.max_header_bytes),
            max_request_body_bytes: self.max_request_body_bytes.or(lower.max_request_body_bytes),
            max_response_body_bytes: self
                .max_response_body_bytes
                .or(lower.max_response_body_bytes),
            upstream_connect_timeout_ms: self
                .upstream_connect_timeout_ms
                .or(lower.upstream_connect_timeout_ms),
            upstream_response_timeout_ms: self
                .upstream_response_timeout_ms
                .or(lower.upstream_response_timeout_ms),
            drain_timeout_ms: self.drain_timeout_ms.or(lower.drain_timeout_ms),
            log_format: self.log_format.or(lower.log_format),
            log_level: self.log_level.or(lower.log_level),
        }
    }

    /// Applies defaults and checks every value against its range.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let redirect_on = self.redirect.unwrap_or(DEFAULT_REDIRECT);
        let listen = match self.listen {
            Some(addrs) if addrs.is_empty() => {
                return Err(ConfigError::invalid(
                    "listen",
                    "[]",
                    "at least one ADDR:PORT",
                ))
            }
            Some(addrs) => addrs,
            None if redirect_on => parse_addrs(DEFAULT_LISTEN),
            None => parse_addrs(DEFAULT_LISTEN_NO_REDIRECT),
        };
        let redirect = if redirect_on {
            Some(Redirect {
                port: shared_port(&listen)?,
                allowed_interfaces: interfaces(self.allowed_interfaces)?,
                backend: backend(self.rules_backend)?,
                check_interval: millis(
                    "rules_check_interval_ms",
                    self.rules_check_interval_ms,
                    DEFAULT_RULES_CHECK_INTERVAL_MS,
                    100,
                    5_000,
                    "milliseconds from 100 to 5000",
                )?,
                keep_on_stop: self
                    .keep_rules_on_stop
                    .unwrap_or(DEFAULT_KEEP_RULES_ON_STOP),
                ipv4: listen.iter().any(SocketAddr::is_ipv4),
                ipv6: listen.iter().any(SocketAddr::is_ipv6),
            })
        } else {
            None
        };
        let upstream = parse_upstream(self.upstream.as_deref().unwrap_or(DEFAULT_UPSTREAM))?;
        let log_level = self
            .log_level
            .unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned());
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return Err(ConfigError::invalid(
                "log_level",
                &log_level,
                "error, warn, info, debug, trace or a tracing filter directive",
            ));
        }
        Ok(Config {
            listen,
            redirect,
            upstream,
            response_ttl: ranged(
                "response_ttl",
                self.response_ttl,
                DEFAULT_RESPONSE_TTL.into(),
                1,
                255,
                "a hop count from 1 to 255",
            )? as u8,
            max_connections: ranged(
                "max_connections",
                self.max_connections,
                DEFAULT_MAX_CONNECTIONS.into(),
                1,
                65_535,
                "a count from 1 to 65535",
            )? as usize,
            header_read_timeout: millis(
                "header_read_timeout_ms",
                self.header_read_timeout_ms,
                DEFAULT_HEADER_READ_TIMEOUT_MS,
                10,
                60_000,
                "milliseconds from 10 to 60000",
            )?,
            max_header_bytes: ranged(
                "max_header_bytes",
                self.max_header_bytes,
                DEFAULT_MAX_HEADER_BYTES.into(),
                8_192,
                1_048_576,
                "bytes from 8192 to 1048576",
            )? as usize,
            max_request_body_bytes: ranged(
                "max_request_body_bytes",
                self.max_request_body_bytes,
                DEFAULT_MAX_REQUEST_BODY_BYTES.into(),
                0,
                1_048_576,
                "bytes from 0 to 1048576",
            )? as usize,
            max_response_body_bytes: ranged(
                "max_response_body_bytes",
                self.max_response_body_bytes,
                DEFAULT_MAX_RESPONSE_BODY_BYTES.into(),
                1_024,
                67_108_864,
                "bytes from 1024 to 67108864",
            )? as usize,
            upstream_connect_timeout: millis(
                "upstream_connect_timeout_ms",
                self.upstream_connect_timeout_ms,
                DEFAULT_UPSTREAM_CONNECT_TIMEOUT_MS,
                1,
                60_000,
                "milliseconds from 1 to 60000",
            )?,
            upstream_response_timeout: millis(
                "upstream_response_timeout_ms",
                self.upstream_response_timeout_ms,
                DEFAULT_UPSTREAM_RESPONSE_TIMEOUT_MS,
                1,
                60_000,
                "milliseconds from 1 to 60000",
            )?,
            drain_timeout: millis(
                "drain_timeout_ms",
                self.drain_timeout_ms,
                DEFAULT_DRAIN_TIMEOUT_MS,
                0,
                600_000,
                "milliseconds from 0 to 600000",
            )?,
            log_format: self.log_format.unwrap_or_default(),
            log_level,
        })
    }
}

impl Config {
    /// True when a dead IMDS could keep a client waiting past the SDKs' own timeout, so the
    /// client would see a timeout instead of our 502/504. Worth a warning, not a refusal.
    pub fn upstream_budget_exceeds_sdk_timeout(&self) -> bool {
        (self.upstream_connect_timeout + self.upstream_response_timeout)
            >= Duration::from_millis(SDK_IMDS_TIMEOUT_MS)
    }
}

fn ranged(
    key: &'static str,
    value: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
    expected: &'static str,
) -> Result<u64, ConfigError> {
    let value = value.unwrap_or(default);
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::invalid(key, value, expected))
    }
}

fn millis(
    key: &'static str,
    value: Option<u64>,
    default: u64,
    min: u64,
    max: u64,
    expected: &'static str,
) -> Result<Duration, ConfigError> {
    ranged(key, value, default, min, max, expected).map(Duration::from_millis)
}

fn parse_addrs(list: &str) -> Vec<SocketAddr> {
    list.split(',')
        .map(|addr| {
            addr.parse()
                .expect("default listen addresses are socket addresses")
        })
        .collect()
}

/// The rules redirect to one port, so every listener must use the same, known one.
fn shared_port(listen: &[SocketAddr]) -> Result<u16, ConfigError> {
    let port = listen[0].port();
    if port == 0 || listen.iter().any(|addr| addr.port() != port) {
        let value = listen
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(",");
        return Err(ConfigError::invalid(
            "listen",
            value,
            "addresses that share one non-zero port while the redirect is on",
        ));
    }
    Ok(port)
}

fn interfaces(given: Option<Vec<String>>) -> Result<Vec<InterfacePattern>, ConfigError> {
    const EXPECTED: &str = "interface names of 1 to 15 characters (letters, digits, . _ -), \
                            a trailing + as wildcard but not + alone, at least one";
    let names = given.unwrap_or_else(|| {
        DEFAULT_ALLOWED_INTERFACES
            .split(',')
            .map(str::to_owned)
            .collect()
    });
    if names.is_empty() {
        return Err(ConfigError::invalid("allowed_interfaces", "[]", EXPECTED));
    }
    names
        .iter()
        .map(|name| {
            name.parse().map_err(|_| {
                ConfigError::invalid("allowed_interfaces", format!("{name:?}"), EXPECTED)
            })
        })
        .collect()
}

fn backend(given: Option<String>) -> Result<BackendChoice, ConfigError> {
    let name = given.unwrap_or_else(|| DEFAULT_RULES_BACKEND.to_owned());
    name.parse().map_err(|_| {
        ConfigError::invalid(
            "rules_backend",
            format!("{name:?}"),
            "auto, nft, iptables-nft or iptables-legacy",
        )
    })
}

impl Redirect {
    /// What the firewall rules must do for this configuration.
    pub fn rule_spec(&self) -> RuleSpec {
        RuleSpec {
            allowed: self.allowed_interfaces.clone(),
            proxy_port: self.port,
            ipv4: self.ipv4,
            ipv6: self.ipv6,
        }
    }
}

fn parse_upstream(text: &str) -> Result<Upstream, ConfigError> {
    const EXPECTED: &str = "an http:// URL with a host and optional port and no path, \
                            like http://169.254.169.254 or http://[fd00:ec2::254]";
    let invalid = || ConfigError::invalid("upstream", format!("{text:?}"), EXPECTED);
    let uri: Uri = text.parse().map_err(|_| invalid())?;
    let plain_path = matches!(uri.path(), "" | "/") && uri.query().is_none();
    match (uri.scheme(), uri.authority()) {
        (Some(scheme), Some(authority))
            if *scheme == Scheme::HTTP && plain_path && !authority.as_str().contains('@') =>
        {
            Ok(Upstream {
                authority: authority.clone(),
            })
        }
        _ => Err(invalid()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(err: ConfigError) -> &'static str {
        match err {
            ConfigError::Invalid { key, .. } => key,
            other => panic!("expected an Invalid error, got {other}"),
        }
    }

    #[test]
    fn defaults_validate_to_the_documented_consts() {
        let config = RawSettings::default().validate().unwrap();
        assert_eq!(config.listen, parse_addrs(DEFAULT_LISTEN));
        let redirect = config
            .redirect
            .clone()
            .expect("the redirect is on by default");
        assert_eq!(redirect.port, DEFAULT_PROXY_PORT);
        let names: Vec<&str> = redirect
            .allowed_interfaces
            .iter()
            .map(|p| p.as_str())
            .collect();
        assert_eq!(names, ["docker0", "br-+"]);
        assert_eq!(redirect.backend, BackendChoice::Auto);
        assert!(redirect.ipv4 && redirect.ipv6);
        assert!(!redirect.keep_on_stop);
        assert_eq!(config.upstream.host_port(), ("169.254.169.254".into(), 80));
        assert_eq!(config.response_ttl, DEFAULT_RESPONSE_TTL);
        assert_eq!(config.max_connections, DEFAULT_MAX_CONNECTIONS as usize);
        assert_eq!(
            config.upstream_response_timeout,
            Duration::from_millis(DEFAULT_UPSTREAM_RESPONSE_TIMEOUT_MS)
        );
        assert!(!config.upstream_budget_exceeds_sdk_timeout());
    }

    #[test]
    fn without_redirect_the_default_listener_is_loopback_only() {
        let raw = RawSettings {
            redirect: Some(false),
            ..Default::default()
        };
        let config = raw.validate().unwrap();
        assert_eq!(config.redirect, None);
        assert_eq!(config.listen, parse_addrs(DEFAULT_LISTEN_NO_REDIRECT));
        assert!(config.listen.iter().all(|addr| addr.ip().is_loopback()));
    }

    #[test]
    fn redirect_settings_are_checked() {
        let ports = RawSettings {
            listen: Some(parse_addrs("0.0.0.0:8169,[::]:8170")),
            ..Default::default()
        };
        assert_eq!(key_of(ports.validate().unwrap_err()), "listen");
        let zero = RawSettings {
            listen: Some(parse_addrs("0.0.0.0:0")),
            ..Default::default()
        };
        assert_eq!(key_of(zero.validate().unwrap_err()), "listen");
        for bad in ["", "+", "much-too-long-name0", "eth 0", "br-*"] {
            let raw = RawSettings {
                allowed_interfaces: Some(vec![bad.into()]),
                ..Default::default()
            };
            assert_eq!(
                key_of(raw.validate().unwrap_err()),
                "allowed_interfaces",
                "{bad:?}"
            );
        }
        let backend = RawSettings {
            rules_backend: Some("ipfw".into()),
            ..Default::default()
        };
        assert_eq!(key_of(backend.validate().unwrap_err()), "rules_backend");
        let interval = RawSettings {
            rules_check_interval_ms: Some(6_000),
            ..Default::default()
        };
        assert_eq!(
            key_of(interval.validate().unwrap_err()),
            "rules_check_interval_ms"
        );
    }

    #[test]
    fn higher_layer_wins_and_lower_fills_gaps() {
        let flags = RawSettings {
            response_ttl: Some(10),
            ..Default::default()
        };
        let file = RawSettings {
            response_ttl: Some(20),
            drain_timeout_ms: Some(7),
            ..Default::default()
        };
        let config = flags.or(file).validate().unwrap();
        assert_eq!(config.response_ttl, 10);
        assert_eq!(config.drain_timeout, Duration::from_millis(7));
    }

    #[test]
    fn out_of_range_values_name_their_key() {
        let cases: Vec<(RawSettings, &str)> = vec![
            (
                RawSettings {
                    response_ttl: Some(0),
                    ..Default::default()
                },
                "response_ttl",
            ),
            (
                RawSettings {
                    response_ttl: Some(256),
                    ..Default::default()
                },
                "response_ttl",
            ),
            (
                RawSettings {
                    max_connections: Some(0),
                    ..Default::default()
                },
                "max_connections",
            ),
            (
                RawSettings {
                    max_header_bytes: Some(8191),
                    ..Default::default()
                },
                "max_header_bytes",
            ),
            (
                RawSettings {
                    upstream_connect_timeout_ms: Some(0),
                    ..Default::default()
                },
                "upstream_connect_timeout_ms",
            ),
            (
                RawSettings {
                    listen: Some(vec![]),
                    ..Default::default()
                },
                "listen",
            ),
            (
                RawSettings {
                    log_level: Some("[[".into()),
                    ..Default::default()
                },
                "log_level",
            ),
        ];
        for (raw, key) in cases {
            assert_eq!(key_of(raw.validate().unwrap_err()), key);
        }
    }

    #[test]
    fn upstream_accepts_only_plain_http_authorities() {
        for good in [
            "http://169.254.169.254",
            "http://127.0.0.1:1338/",
            "http://[fd00:ec2::254]",
        ] {
            let raw = RawSettings {
                upstream: Some(good.into()),
                ..Default::default()
            };
            assert!(raw.validate().is_ok(), "{good} should be accepted");
        }
        for bad in [
            "https://169.254.169.254",
            "169.254.169.254",
            "http://169.254.169.254/latest",
            "http://u:p@169.254.169.254",
            "http://host/?q",
            "",
        ] {
            let raw = RawSettings {
                upstream: Some(bad.into()),
                ..Default::default()
            };
            assert_eq!(key_of(raw.validate().unwrap_err()), "upstream", "{bad:?}");
        }
        let ipv6 = parse_upstream("http://[fd00:ec2::254]:8080").unwrap();
        assert_eq!(ipv6.host_port(), ("fd00:ec2::254".into(), 8080));
    }

    #[test]
    fn error_message_names_flag_environment_and_range() {
        let raw = RawSettings {
            response_ttl: Some(0),
            ..Default::default()
        };
        let text = raw.validate().unwrap_err().to_string();
        assert!(text.contains("response_ttl"), "{text}");
        assert!(text.contains("--response-ttl"), "{text}");
        assert!(text.contains("IMDS_HOP_PROXY_RESPONSE_TTL"), "{text}");
        assert!(text.contains("1 to 255"), "{text}");
    }

    #[test]
    fn file_rejects_unknown_keys_and_wrong_types() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "respnse_ttl = 3\n").unwrap();
        let err = RawSettings::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("respnse_ttl"), "{err}");
        std::fs::write(&path, "response_ttl = \"high\"\n").unwrap();
        let err = RawSettings::from_file(&path).unwrap_err().to_string();
        assert!(err.contains("response_ttl"), "{err}");
        std::fs::write(&path, "response_ttl = 9\nlog_format = \"json\"\n").unwrap();
        let raw = RawSettings::from_file(&path).unwrap();
        assert_eq!(raw.response_ttl, Some(9));
        assert_eq!(raw.log_format, Some(LogFormat::Json));
    }
}
