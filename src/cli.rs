//! The command line: subcommands and their flags. `run` takes its settings from
//! [`RawSettings`](crate::config::RawSettings), which is also the TOML file's shape; `simulate`
//! is a development tool whose settings are flags (or `IMDS_HOP_PROXY_SIM_*` variables) only.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::{LogFormat, RawSettings, DEFAULT_LOG_LEVEL};
use crate::simulator::{
    TokenMode, DEFAULT_SIM_CREDENTIAL_LIFETIME_SECS, DEFAULT_SIM_HOP_LIMIT, DEFAULT_SIM_ROLE,
};

/// Where the simulator listens by default: loopback, on the port other IMDS mocks use.
pub const DEFAULT_SIM_LISTEN: &str = "127.0.0.1:1338";

/// imds-hop-proxy: serve EC2 instance metadata (IMDSv2) to containers while the instance's
/// hop limit stays at 1.
#[derive(Debug, Parser)]
#[command(name = "imds-hop-proxy", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve: forward container requests to the real IMDS and answer with a fresh TTL.
    Run(RunArgs),
    /// Install, remove or show the redirect rules by hand (`run` manages them itself).
    Rules(RulesArgs),
    /// Run an IMDS simulator (hop limit, tokens, credentials) for tests and development.
    Simulate(SimulateArgs),
    /// Show the hop-limit failure and the fix on a model EC2 host in network namespaces
    /// (needs root; cleans up after itself, also on Ctrl-C).
    Demo,
}

/// Flags of `rules`.
#[derive(Debug, clap::Args)]
pub struct RulesArgs {
    /// What to do with the rules.
    #[arg(value_enum)]
    pub action: RulesAction,

    /// Print what would be applied (or removed) and change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// The same settings as `run`: the rules follow listen, allowed_interfaces and
    /// rules_backend.
    #[command(flatten)]
    pub run: RunArgs,
}

/// The `rules` actions.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum RulesAction {
    /// Install (or repair) the redirect rules and the port guard; idempotent.
    Install,
    /// Remove every rule of ours; idempotent.
    Remove,
    /// Show exactly our rules; exit 0 when complete, 3 when missing or changed.
    Status,
}

/// Flags of `run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// TOML file with settings (keys as the long flags, with `_` for `-`); flags and
    /// environment variables override it.
    #[arg(long, env = "IMDS_HOP_PROXY_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Every setting of the proxy.
    #[command(flatten)]
    pub settings: RawSettings,
}

/// Flags of `simulate`.
#[derive(Debug, clap::Args)]
pub struct SimulateArgs {
    /// Address to listen on; repeat (or comma-separate) for several.
    #[arg(long, env = "IMDS_HOP_PROXY_SIM_LISTEN", value_name = "ADDR:PORT",
          value_delimiter = ',', default_value = DEFAULT_SIM_LISTEN)]
    pub listen: Vec<SocketAddr>,

    /// IP TTL / IPv6 hop limit of token responses, like the instance's
    /// HttpPutResponseHopLimit.
    #[arg(long, env = "IMDS_HOP_PROXY_SIM_HOP_LIMIT", value_name = "HOPS",
          value_parser = clap::value_parser!(u8).range(1..=64),
          default_value_t = DEFAULT_SIM_HOP_LIMIT)]
    pub hop_limit: u8,

    /// IMDSv2 only (`required`) or IMDSv1 allowed too (`optional`), like HttpTokens.
    #[arg(
        long,
        env = "IMDS_HOP_PROXY_SIM_TOKENS",
        value_name = "MODE",
        default_value = "required"
    )]
    pub tokens: TokenMode,

    /// IAM role whose credentials are served.
    #[arg(long, env = "IMDS_HOP_PROXY_SIM_ROLE", value_name = "NAME",
          default_value = DEFAULT_SIM_ROLE)]
    pub role: String,

    /// Lifetime of each issued credential set; new ones appear before the old expire.
    #[arg(long, env = "IMDS_HOP_PROXY_SIM_CREDENTIAL_LIFETIME_SECS", value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(2..=43_200),
          default_value_t = DEFAULT_SIM_CREDENTIAL_LIFETIME_SECS)]
    pub credential_lifetime_secs: u64,

    /// File served as user-data [default: a two-line shell script].
    #[arg(
        long,
        env = "IMDS_HOP_PROXY_SIM_USER_DATA",
        value_name = "FILE",
        conflicts_with = "no_user_data"
    )]
    pub user_data: Option<PathBuf>,

    /// Serve no user-data (404), like an instance launched without it.
    #[arg(long)]
    pub no_user_data: bool,

    /// Log format.
    #[arg(
        long,
        env = "IMDS_HOP_PROXY_SIM_LOG_FORMAT",
        value_name = "FORMAT",
        default_value = "text"
    )]
    pub log_format: LogFormat,

    /// Log filter.
    #[arg(long, env = "IMDS_HOP_PROXY_SIM_LOG_LEVEL", value_name = "FILTER",
          default_value = DEFAULT_LOG_LEVEL)]
    pub log_level: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
