//! The firewall rules that send container IMDS traffic to the proxy and keep its port private.
//!
//! One file per job, decisions pure and I/O at the edge:
//! - `plan.rs`: the exact rule text per backend (an nft table, or iptables chains): a REDIRECT
//!   of TCP to IMDS port 80 arriving on allowed interfaces, and a guard on the proxy port that
//!   admits only redirected connections. Pure.
//! - `blocks.rs`: finds rules that already block IMDS for containers on the forward path, which
//!   the redirect would bypass; their interfaces are exempted, or the install refuses. Pure.
//! - `detect.rs`: reads every ruleset tool present and picks the backend the host (and Docker)
//!   already uses; the decision itself is pure.
//! - `apply.rs`: [`install`], [`remove`], [`status`], the only code that changes the firewall,
//!   through a [`Runner`] (`runner.rs`) so tests can fake it or aim it at a network namespace.
//!
//! Data flows one way: snapshot of the rulesets -> blocking rules -> exemptions -> plan ->
//! commands. Everything is synchronous: async callers run it on a blocking thread.

mod apply;
mod blocks;
mod detect;
#[cfg(test)]
mod kernel_tests;
mod plan;
mod runner;

use std::fmt;
use std::str::FromStr;

use crate::config::{DEFAULT_ALLOWED_INTERFACES, DEFAULT_PROXY_PORT};

pub use apply::{exemptions, install, remove, status, InstallReport, Status};
pub use blocks::{find_blocking_rules, BlockScope, BlockingRule, RulesetFormat, RulesetText};
pub use detect::{decide, detect, Snapshot, Source};
pub use plan::{
    conntrack_args, plan, Family, IptablesFamilyPlan, NftPlan, Plan, IMDS_PORT, IMDS_V4, IMDS_V6,
    IPTABLES_LOCK_WAIT_S, IPT_GUARD_CHAIN, IPT_REDIRECT_CHAIN, NFT_GUARD_CHAIN, NFT_REDIRECT_CHAIN,
    NFT_TABLE,
};
pub use runner::{command_line, Output, Runner, SystemRunner, DEFAULT_COMMAND_TIMEOUT_MS};

/// How the rules are written. Hosts run one of these for their own firewall and for Docker;
/// writing ours with the same tool keeps them visible to whoever looks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    /// Native nftables: a table `inet imds_hop_proxy` of our own.
    Nft,
    /// `iptables-nft`/`ip6tables-nft`: our chains in the nf_tables-backed `nat` and `filter`.
    IptablesNft,
    /// `iptables-legacy`/`ip6tables-legacy`: our chains in the legacy x_tables.
    IptablesLegacy,
}

impl Backend {
    /// Every backend.
    pub const ALL: [Backend; 3] = [Backend::Nft, Backend::IptablesNft, Backend::IptablesLegacy];

    /// The name used in configuration and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Backend::Nft => "nft",
            Backend::IptablesNft => "iptables-nft",
            Backend::IptablesLegacy => "iptables-legacy",
        }
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Backend {
    type Err = RulesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Backend::ALL
            .into_iter()
            .find(|b| b.as_str() == s)
            .ok_or_else(|| RulesError::InvalidBackend {
                value: s.to_owned(),
            })
    }
}

/// The configured backend: a fixed one, or whatever the host already uses.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BackendChoice {
    /// Decide with [`detect`] at start-up.
    #[default]
    Auto,
    /// Use this one; detection is skipped.
    Fixed(Backend),
}

impl BackendChoice {
    /// The backend to use: the fixed one, or the detected one.
    pub fn resolve(self, runner: &dyn Runner) -> Result<Backend, RulesError> {
        match self {
            BackendChoice::Auto => detect(runner),
            BackendChoice::Fixed(backend) => Ok(backend),
        }
    }
}

impl fmt::Display for BackendChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BackendChoice::Auto => f.write_str("auto"),
            BackendChoice::Fixed(backend) => backend.fmt(f),
        }
    }
}

impl FromStr for BackendChoice {
    type Err = RulesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(BackendChoice::Auto),
            other => other.parse().map(BackendChoice::Fixed),
        }
    }
}

/// An input interface in iptables syntax: an exact name, or a prefix followed by `+`
/// (`br-+` matches every `br-...`). Validated so it is safe inside an nft string and an
/// iptables argument, and so it cannot mean "every interface".
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct InterfacePattern(String);

/// Longest interface name Linux accepts (IFNAMSIZ - 1), which is also iptables' limit.
pub const MAX_INTERFACE_NAME_LEN: usize = 15;

impl InterfacePattern {
    /// The pattern in iptables syntax, as configured.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The fixed part: the name, or the prefix before `+`.
    fn prefix(&self) -> &str {
        self.0.strip_suffix('+').unwrap_or(&self.0)
    }

    /// Whether this is a `+` wildcard.
    pub fn is_wildcard(&self) -> bool {
        self.0.ends_with('+')
    }

    /// The pattern in nft syntax, for `iifname "..."`: `br-+` becomes `br-*`.
    pub fn nft(&self) -> String {
        if self.is_wildcard() {
            format!("{}*", self.prefix())
        } else {
            self.0.clone()
        }
    }

    /// Whether some interface name matches both patterns.
    pub fn overlaps(&self, other: &InterfacePattern) -> bool {
        match (self.is_wildcard(), other.is_wildcard()) {
            (false, false) => self.0 == other.0,
            (true, false) => other.0.starts_with(self.prefix()),
            (false, true) => self.0.starts_with(other.prefix()),
            (true, true) => {
                self.prefix().starts_with(other.prefix())
                    || other.prefix().starts_with(self.prefix())
            }
        }
    }
}

impl FromStr for InterfacePattern {
    type Err = RulesError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| RulesError::InvalidInterface {
            value: s.to_owned(),
            reason,
        };
        let name = s.strip_suffix('+').unwrap_or(s);
        if s.is_empty() || s.len() > MAX_INTERFACE_NAME_LEN {
            return Err(invalid("expected 1 to 15 characters"));
        }
        if name.is_empty() {
            return Err(invalid(
                "a bare `+` matches every interface, including the LAN; list the bridges instead",
            ));
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        {
            return Err(invalid(
                "expected letters, digits, `-`, `_` or `.`, with an optional trailing `+` wildcard",
            ));
        }
        if name == "." || name == ".." {
            return Err(invalid("not an interface name"));
        }
        Ok(InterfacePattern(s.to_owned()))
    }
}

impl TryFrom<String> for InterfacePattern {
    type Error = RulesError;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl fmt::Display for InterfacePattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What the rules must do: which interfaces are redirected, to which port, in which families.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    /// Interfaces whose IMDS traffic goes to the proxy.
    pub allowed: Vec<InterfacePattern>,
    /// The proxy's port; it must listen there on the bridge addresses (or the wildcard), since
    /// REDIRECT delivers to the address of the interface the packet came in on.
    pub proxy_port: u16,
    /// Redirect 169.254.169.254.
    pub ipv4: bool,
    /// Redirect fd00:ec2::254.
    pub ipv6: bool,
}

impl Default for RuleSpec {
    fn default() -> Self {
        RuleSpec {
            allowed: DEFAULT_ALLOWED_INTERFACES
                .split(',')
                .map(|p| InterfacePattern(p.to_string()))
                .collect(),
            proxy_port: DEFAULT_PROXY_PORT,
            ipv4: true,
            ipv6: true,
        }
    }
}

impl RuleSpec {
    /// Refuses a spec that would install nothing useful or something unsafe.
    pub fn validate(&self) -> Result<(), RulesError> {
        let reason = if self.allowed.is_empty() {
            "no allowed interface: list at least one bridge"
        } else if !self.ipv4 && !self.ipv6 {
            "neither IPv4 nor IPv6 is enabled"
        } else if self.proxy_port == 0 {
            "proxy port 0 is not a port"
        } else if self.proxy_port == IMDS_PORT {
            // The guard drops everything to this port that was not redirected from IMDS: on 80 it
            // would cut the host's own web server, and a redirect to 80 makes no sense.
            "proxy port 80 is IMDS's own port"
        } else {
            return Ok(());
        };
        Err(RulesError::InvalidSpec { reason })
    }
}

/// An allowed interface whose IMDS traffic is *not* redirected, because a rule already blocks
/// IMDS there and the redirect would bypass it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExemptInterface {
    /// The interface(s) the blocking rule names.
    pub pattern: InterfacePattern,
    /// The blocking rule, quoted, for logs and `--dry-run`.
    pub because: String,
}

/// Why a rules operation failed. Each variant names the command or value involved.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    /// A firewall tool is not installed.
    #[error("{program} not found: install the {package} package{alternative}")]
    ToolMissing {
        program: String,
        package: &'static str,
        alternative: &'static str,
    },
    /// A command could not be started or waited for.
    #[error("running `{command}` failed: {source}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    /// A command hung (the xtables lock held forever, a stuck netlink socket).
    #[error("`{command}` did not finish within {timeout_ms} ms and was killed")]
    Timeout { command: String, timeout_ms: u64 },
    /// A command exited non-zero.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },
    /// Detection found no firewall tool at all.
    #[error("no firewall tool found: install the nftables package (nft) or the iptables package")]
    NoFirewallTool,
    /// A rule blocks IMDS for forwarded traffic on interfaces we cannot list; redirecting would
    /// bypass it and re-open IMDS.
    #[error("{}", blocked_message(.rules))]
    ImdsBlockedForAll { rules: Vec<BlockingRule> },
    /// `rules_backend` names no backend.
    #[error(
        "invalid rules backend {value:?}: expected auto, nft, iptables-nft or iptables-legacy"
    )]
    InvalidBackend { value: String },
    /// An interface pattern is not valid.
    #[error("invalid interface pattern {value:?}: {reason}")]
    InvalidInterface { value: String, reason: &'static str },
    /// A [`RuleSpec`] cannot be installed.
    #[error("invalid firewall rule settings: {reason}")]
    InvalidSpec { reason: &'static str },
}

fn blocked_message(rules: &[BlockingRule]) -> String {
    let quoted: Vec<String> = rules.iter().map(ToString::to_string).collect();
    format!(
        "refusing to install the IMDS redirect: {} blocks IMDS for forwarded traffic without naming \
         the input interface, and the redirect would bypass it (a rule on the forward path stops \
         matching once the destination is rewritten): {}. Limit the rule to the bridges that must \
         stay blocked (`-i docker0`, or `iifname \"docker0\"` in nft) and those bridges will be left \
         unredirected, or delete it if containers may reach IMDS through the proxy",
        if rules.len() == 1 { "this rule" } else { "these rules" },
        quoted.join("; ")
    )
}

impl RulesError {
    /// True when a firewall tool failed for want of privilege (not root, no CAP_NET_ADMIN).
    pub fn is_permission_denied(&self) -> bool {
        match self {
            RulesError::CommandFailed { stderr, .. } => {
                stderr.contains("Operation not permitted") || stderr.contains("Permission denied")
            }
            RulesError::Spawn { source, .. } => {
                source.kind() == std::io::ErrorKind::PermissionDenied
            }
            _ => false,
        }
    }

    /// True when a tool the chosen backend needs is not installed.
    pub fn is_tool_missing(&self) -> bool {
        matches!(
            self,
            RulesError::ToolMissing { .. } | RulesError::NoFirewallTool
        )
    }

    /// The error for a program that is not installed, naming its package and the alternative.
    pub fn missing(program: &str) -> Self {
        let (package, alternative) = match program {
            "nft" => ("nftables", " or set rules_backend = \"iptables-nft\""),
            p if p.contains("tables") => ("iptables", " or set rules_backend = \"nft\""),
            "conntrack" => ("conntrack", ""),
            "ip" => ("iproute2", ""),
            _ => ("matching", ""),
        };
        RulesError::ToolMissing {
            program: program.to_owned(),
            package,
            alternative,
        }
    }

    /// The error for a command that exited non-zero.
    pub fn failed(program: &str, args: &[&str], out: &Output) -> Self {
        RulesError::CommandFailed {
            command: command_line(program, args),
            status: match out.code {
                Some(code) => format!("exit code {code}"),
                None => "killed by a signal".to_owned(),
            },
            stderr: out.stderr.trim().replace('\n', " / "),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_parse_and_print() {
        for backend in Backend::ALL {
            assert_eq!(backend.to_string().parse::<Backend>().unwrap(), backend);
            assert_eq!(
                backend.to_string().parse::<BackendChoice>().unwrap(),
                BackendChoice::Fixed(backend)
            );
        }
        assert_eq!(
            "auto".parse::<BackendChoice>().unwrap(),
            BackendChoice::Auto
        );
        assert_eq!(BackendChoice::Auto.to_string(), "auto");
        let err = "iptables".parse::<BackendChoice>().unwrap_err();
        assert_eq!(
            err.to_string(),
            "invalid rules backend \"iptables\": expected auto, nft, iptables-nft or iptables-legacy"
        );
    }

    #[test]
    fn interface_patterns_are_validated() {
        for ok in [
            "docker0",
            "br-+",
            "cni0",
            "veth+",
            "eth0.100",
            "a",
            "abcdefghijklmn+",
            "x_y",
        ] {
            assert_eq!(ok.parse::<InterfacePattern>().unwrap().as_str(), ok);
        }
        for bad in [
            "",
            "+",
            "abcdefghijklmnop",
            "br-*",
            "br+-",
            "eth 0",
            "a\"b",
            "a/b",
            ".",
            "..",
            "ä",
        ] {
            assert!(bad.parse::<InterfacePattern>().is_err(), "{bad:?} accepted");
        }
        let err = "+".parse::<InterfacePattern>().unwrap_err().to_string();
        assert!(err.contains("matches every interface"), "{err}");
        let from_json: Vec<InterfacePattern> =
            serde_json::from_str(r#"["docker0","br-+"]"#).unwrap();
        assert_eq!(from_json, RuleSpec::default().allowed);
        assert!(serde_json::from_str::<InterfacePattern>(r#""+""#).is_err());
    }

    #[test]
    fn interface_patterns_convert_and_overlap() {
        let p = |s: &str| s.parse::<InterfacePattern>().unwrap();
        assert_eq!(p("br-+").nft(), "br-*");
        assert_eq!(p("docker0").nft(), "docker0");
        assert!(p("br-+").overlaps(&p("br-abc")));
        assert!(p("br-abc").overlaps(&p("br-+")));
        assert!(p("br-+").overlaps(&p("b+")));
        assert!(p("docker0").overlaps(&p("docker0")));
        assert!(!p("docker0").overlaps(&p("docker1")));
        assert!(!p("br-+").overlaps(&p("docker0")));
        assert!(!p("br-+").overlaps(&p("veth+")));
    }

    #[test]
    fn specs_are_validated() {
        assert!(RuleSpec::default().validate().is_ok());
        for broken in [
            RuleSpec {
                allowed: vec![],
                ..RuleSpec::default()
            },
            RuleSpec {
                ipv4: false,
                ipv6: false,
                ..RuleSpec::default()
            },
            RuleSpec {
                proxy_port: 0,
                ..RuleSpec::default()
            },
            RuleSpec {
                proxy_port: 80,
                ..RuleSpec::default()
            },
        ] {
            assert!(broken.validate().is_err(), "{broken:?}");
        }
    }

    #[test]
    fn missing_tools_name_their_package() {
        assert_eq!(
            RulesError::missing("nft").to_string(),
            "nft not found: install the nftables package or set rules_backend = \"iptables-nft\""
        );
        assert_eq!(
            RulesError::missing("ip6tables-legacy-save").to_string(),
            "ip6tables-legacy-save not found: install the iptables package or set rules_backend = \"nft\""
        );
        assert_eq!(
            RulesError::missing("conntrack").to_string(),
            "conntrack not found: install the conntrack package"
        );
    }
}
