//! imds-hop-proxy: lets containers on a Docker bridge reach EC2 IMDSv2 while the instance's
//! `HttpPutResponseHopLimit` stays at 1.
//!
//! # Layout
//!
//! Data flows one way: **listener -> policy -> upstream -> response**.
//!
//! - [`config`]: every setting, its `DEFAULT_*` const, and validation of flags, environment and
//!   TOML into one typed [`config::Config`].
//! - [`listener`]: binds sockets, accepts under a connection limit, gives each accepted socket a
//!   fresh TTL, and serves HTTP/1.1 with bounded header reads and a bounded drain.
//! - [`policy`]: pure decisions about a request: may it pass, which headers go upstream and
//!   which come back. No I/O.
//! - [`upstream`]: one bounded request to the real IMDS; failures become 502/504 reasons.
//! - [`proxy`]: the per-request service that chains policy and upstream and logs the outcome.
//! - [`redirect`]: keeps the rules installed while `run` serves: install, re-check, restore, remove.
//! - [`rules`]: the firewall rules that redirect container IMDS traffic to the proxy port and
//!   guard that port (nft, iptables-nft, iptables-legacy), honouring existing IMDS blocks.
//! - [`simulator`]: a faithful IMDS for tests, the demo and development on a laptop.
//! - [`testbed`]: a model of an EC2 instance running Docker in network namespaces (IMDS,
//!   instance, bridges, containers, VPN, neighbour) for the end-to-end tests and the demo.
//! - [`demo`]: the hop-limit failure and the fix, shown on the testbed (`imds-hop-proxy demo`).
//! - [`app`]: the composition root: start-up order, shutdown order.
//! - [`shutdown`], [`logging`], [`systemd`]: process edges (signals, tracing set-up, readiness,
//!   watchdog and socket activation).
#![forbid(unsafe_code)]

pub mod app;
pub mod cli;
pub mod config;
pub mod demo;
pub mod listener;
pub mod logging;
pub mod policy;
pub mod proxy;
pub mod redirect;
pub mod rules;
pub mod shutdown;
pub mod simulator;
pub mod systemd;
pub mod testbed;
pub mod upstream;
