//! A faithful model of an EC2 instance running Docker, built from Linux network namespaces, for
//! the end-to-end tests and the `demo`: the IMDS simulator behind a VPC segment, the instance
//! with `docker0`, a user-defined `br-…` bridge, a VPN it routes, containers, and a neighbour
//! on the same subnet. The token answer leaves IMDS with the instance's hop limit as IP TTL and
//! nothing between IMDS and the instance decrements it (L2 only), so exactly the forward into a
//! container kills it, as on a real instance.
//!
//! The address plan is drawn in [`plan`]. Every namespace is `ihp-<tag>-<role>`; interfaces are
//! created inside the namespaces (`ip -n`), none in the caller's, so testbeds with different
//! tags never collide. [`Testbed`] tears everything down when dropped, also when a test panics:
//! it kills every process left in its namespaces and deletes them (which deletes their veths).
//!
//! Sub-files: `plan` (names and addresses), `firewall` (rule text for each Docker firewall
//! flavour and the IMDS filter), `exec` (running programs with a bound), `http` (a curl client
//! inside a namespace).

mod exec;
mod firewall;
mod http;
pub mod plan;

use std::ffi::OsString;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use tracing::warn;

use crate::simulator::{TokenMode, DEFAULT_SIM_HOP_LIMIT};

pub use exec::{CommandOutput, DEFAULT_COMMAND_TIMEOUT_MS};
pub use firewall::DockerFirewall;
pub use http::{
    HttpError, HttpRequest, HttpResponse, DEFAULT_HTTP_TIMEOUT_MS, SDK_TOKEN_TTL_SECS,
    TOKEN_HEADER, TOKEN_TTL_HEADER,
};
pub use plan::{IpFamily, Ipv4Subnet, Ipv6Subnet, NameError, SubnetError};

use exec::{args, locate, run, run_ok, RawOutput};
use firewall::Invocation;
use plan::{
    check_interface, check_tag, container_veth_name, namespace, user_bridge_name, DOCKER0,
    DOCKER0_V4, DOCKER0_V6, GUEST_IFACE, HOST_ENI, HOST_ENI_V4, HOST_ENI_V6, IMDS_PORT, IMDS_V4,
    IMDS_V6, LAN_V4, LAN_V6, USER_BRIDGE_V4, USER_BRIDGE_V6, VPC_BRIDGE, VPC_PREFIX_V4,
    VPC_PREFIX_V6, VPC_ROUTER_V4, VPC_ROUTER_V6, VPN_IFACE, VPN_V4, VPN_V6,
};

/// Setting this environment variable (to anything but empty or `0`) makes end-to-end tests skip
/// instead of failing where they cannot create namespaces.
pub const SKIP_ROOT_TESTS_ENV: &str = "IMDS_HOP_PROXY_SKIP_ROOT_TESTS";

/// Bound on the simulator's start-up (bind and first log line).
pub const DEFAULT_SIMULATOR_START_TIMEOUT_MS: u64 = 10_000;

/// Bound on IPv6 addresses leaving "tentative". DAD is off, so this is a safety net only.
pub const DEFAULT_IPV6_SETTLE_TIMEOUT_MS: u64 = 5_000;

/// Where `ip netns` keeps its namespace handles.
const NETNS_RUN_DIR: &str = "/run/netns";

/// Capability bits a testbed needs: CAP_NET_ADMIN (12) for links, addresses and rules,
/// CAP_SYS_ADMIN (21) for `ip netns add` (mounts) and `ip netns exec` (setns).
const NEEDED_CAPABILITIES: [u32; 2] = [12, 21];

/// Why a testbed could not be built, used or torn down.
#[derive(Debug, thiserror::Error)]
pub enum TestbedError {
    /// The process lacks the capabilities to create namespaces.
    #[error(
        "end-to-end tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to create network namespaces; \
         run them as root or set IMDS_HOP_PROXY_SKIP_ROOT_TESTS=1 to skip them"
    )]
    NotRoot,
    /// A program the model is built with is not installed.
    #[error("`{tool}` not found: install the {package} package")]
    ToolMissing {
        /// The program's name.
        tool: String,
        /// The Debian package that ships it.
        package: &'static str,
    },
    /// A tag or interface name cannot be used.
    #[error(transparent)]
    Name(#[from] NameError),
    /// A namespace with one of our names is already there.
    #[error(
        "network namespace {name} already exists: a killed test run left it, or another testbed \
         uses the same tag; remove it with `ip netns del {name}` or choose another tag"
    )]
    NamespaceExists {
        /// The namespace.
        name: String,
    },
    /// The `imds-hop-proxy` binary to run the simulator from is not there.
    #[error("the imds-hop-proxy binary {path} does not exist: build it with `cargo build`")]
    BinaryMissing {
        /// The path given in [`TestbedOptions::binary`].
        path: PathBuf,
    },
    /// A program could not be started or waited for.
    #[error("running `{command}` failed: {source}")]
    Spawn {
        /// The command line.
        command: String,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// A program exited with an error.
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        /// The command line.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// What it said on stderr.
        stderr: String,
    },
    /// A program did not finish in time and was killed.
    #[error("`{command}` did not finish within {timeout:?}")]
    Timeout {
        /// The command line.
        command: String,
        /// The bound.
        timeout: Duration,
    },
    /// IPv6 addresses stayed tentative, so IPv6 would not work yet.
    #[error("IPv6 addresses in {namespace} still tentative after {timeout:?}: {addresses}")]
    Ipv6NotReady {
        /// The namespace.
        namespace: String,
        /// The bound.
        timeout: Duration,
        /// `ip -6 addr show tentative` output.
        addresses: String,
    },
    /// The simulator exited or never said it was listening.
    #[error("the IMDS simulator in {namespace} did not start: {reason}; its output: {output}")]
    SimulatorStart {
        /// The IMDS namespace.
        namespace: String,
        /// What happened.
        reason: String,
        /// What it printed.
        output: String,
    },
    /// Some of the clean-up failed; the rest was still done.
    #[error("testbed teardown incomplete: {}", failures.join("; "))]
    Teardown {
        /// One message per failed step.
        failures: Vec<String>,
    },
}

/// What an end-to-end test should do on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RootGate {
    /// The process may create namespaces: run.
    Run,
    /// [`SKIP_ROOT_TESTS_ENV`] is set: skip, and say so.
    Skip,
}

/// Fails with [`TestbedError::NotRoot`] unless the process holds CAP_NET_ADMIN and
/// CAP_SYS_ADMIN.
pub fn require_root() -> Result<(), TestbedError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    if has_capabilities(&status, &NEEDED_CAPABILITIES) {
        Ok(())
    } else {
        Err(TestbedError::NotRoot)
    }
}

/// The decision every end-to-end test starts with: skip when [`SKIP_ROOT_TESTS_ENV`] is set,
/// otherwise run if privileged and fail (with the [`TestbedError::NotRoot`] advice) if not, so
/// a missing privilege never passes silently.
pub fn root_gate() -> Result<RootGate, TestbedError> {
    let skip = std::env::var_os(SKIP_ROOT_TESTS_ENV)
        .is_some_and(|value| !value.is_empty() && value != "0");
    if skip {
        return Ok(RootGate::Skip);
    }
    require_root().map(|()| RootGate::Run)
}

/// Reads the `CapEff:` line of `/proc/<pid>/status`.
fn has_capabilities(status: &str, needed: &[u32]) -> bool {
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .is_some_and(|effective| needed.iter().all(|bit| effective & (1 << bit) != 0))
}

/// How the modelled instance's IMDS is configured (its `MetadataOptions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImdsSettings {
    /// `HttpPutResponseHopLimit`: the token answer's IP TTL / IPv6 hop limit.
    pub hop_limit: u8,
    /// `HttpTokens`: whether IMDSv1 (no token) is served.
    pub tokens: TokenMode,
}

impl Default for ImdsSettings {
    /// EC2's defaults for new instances: hop limit 1, tokens required.
    fn default() -> Self {
        ImdsSettings {
            hop_limit: DEFAULT_SIM_HOP_LIMIT,
            tokens: TokenMode::Required,
        }
    }
}

/// Everything that varies between testbeds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestbedOptions {
    /// The `imds-hop-proxy` binary whose `simulate` subcommand plays IMDS
    /// (`env!("CARGO_BIN_EXE_imds-hop-proxy")` in integration tests).
    pub binary: PathBuf,
    /// The IMDS the instance sees.
    pub imds: ImdsSettings,
    /// How Docker on the instance writes its NAT rules.
    pub firewall: DockerFirewall,
}

impl TestbedOptions {
    /// Default IMDS settings and the iptables-nft flavour, the most common set-up today.
    pub fn new(binary: impl Into<PathBuf>) -> TestbedOptions {
        TestbedOptions {
            binary: binary.into(),
            imds: ImdsSettings::default(),
            firewall: DockerFirewall::default(),
        }
    }
}

/// The namespace names of one testbed.
#[derive(Debug, Clone)]
struct Names {
    imds: String,
    host: String,
    c0: String,
    c1: String,
    vpn: String,
    lan: String,
    user_bridge: String,
}

/// The running IMDS simulator and what it has logged.
struct Simulator {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    settings: ImdsSettings,
}

/// What changes after start, behind one lock so `add_bridge` and `set_imds` can take `&self`.
#[derive(Default)]
struct State {
    /// Namespaces created so far, in order; teardown deletes them in reverse.
    namespaces: Vec<String>,
    simulator: Option<Simulator>,
    /// Number of the next container namespace `add_bridge` creates (`c2`, `c3`, …).
    next_container: u32,
}

/// One modelled EC2 instance with Docker, its IMDS, its neighbours. Dropping it tears it down.
pub struct Testbed {
    tag: String,
    names: Names,
    options: TestbedOptions,
    ip: PathBuf,
    state: Mutex<State>,
}

impl std::fmt::Debug for Testbed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Testbed")
            .field("tag", &self.tag)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Testbed {
    /// Builds the whole model and starts the simulator; returns when IPv4 and IPv6 work from
    /// every namespace. On any failure, what was already built is removed before the error
    /// returns. `tag` must be unique among live testbeds (a test name and the process id).
    pub fn start(tag: &str, options: TestbedOptions) -> Result<Testbed, TestbedError> {
        check_tag(tag)?;
        if !options.binary.is_file() {
            return Err(TestbedError::BinaryMissing {
                path: options.binary.clone(),
            });
        }
        let ip = locate("ip")?;
        for tool in ["sh", "nft", "curl"].iter().chain(options.firewall.tools()) {
            locate(tool)?;
        }
        let names = Names {
            imds: namespace(tag, "imds"),
            host: namespace(tag, "host"),
            c0: namespace(tag, "c0"),
            c1: namespace(tag, "c1"),
            vpn: namespace(tag, "vpn"),
            lan: namespace(tag, "lan"),
            user_bridge: user_bridge_name(tag),
        };
        let testbed = Testbed {
            tag: tag.to_owned(),
            names,
            options,
            ip,
            state: Mutex::new(State {
                next_container: 2,
                ..State::default()
            }),
        };
        // On error `testbed` is dropped here, which removes whatever was built.
        testbed.build()?;
        Ok(testbed)
    }

    /// The tag the namespace names are built from.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The options the testbed was built with (IMDS settings as at start).
    pub fn options(&self) -> &TestbedOptions {
        &self.options
    }

    /// The namespace playing IMDS and the VPC router.
    pub fn imds_ns(&self) -> &str {
        &self.names.imds
    }

    /// The namespace playing the EC2 instance (the "host network"), where the proxy runs.
    pub fn host_ns(&self) -> &str {
        &self.names.host
    }

    /// The container on `docker0`.
    pub fn c0_ns(&self) -> &str {
        &self.names.c0
    }

    /// The container on the user-defined bridge ([`Testbed::user_bridge`]).
    pub fn c1_ns(&self) -> &str {
        &self.names.c1
    }

    /// The VPN client the host routes through `vpn0` (not a Docker network).
    pub fn vpn_ns(&self) -> &str {
        &self.names.vpn
    }

    /// Another instance on the same VPC subnet.
    pub fn lan_ns(&self) -> &str {
        &self.names.lan
    }

    /// The user-defined bridge created at start, `br-` and 12 hex digits.
    pub fn user_bridge(&self) -> &str {
        &self.names.user_bridge
    }

    /// How IMDS is configured now.
    pub fn imds_settings(&self) -> Option<ImdsSettings> {
        self.lock().simulator.as_ref().map(|sim| sim.settings)
    }

    /// The simulator's JSON log lines so far (one string per line).
    pub fn imds_log(&self) -> Vec<String> {
        self.lock()
            .simulator
            .as_ref()
            .map(|sim| lock(&sim.log).clone())
            .unwrap_or_default()
    }

    /// Restarts IMDS with other settings, like `aws ec2 modify-instance-metadata-options`
    /// (new connections see the change; tokens issued before are forgotten). If the new
    /// simulator fails to start, IMDS stays down and the error says why.
    pub fn set_imds(&self, settings: ImdsSettings) -> Result<(), TestbedError> {
        let old = self.lock().simulator.take();
        if let Some(old) = old {
            stop(old);
        }
        let simulator = self.start_simulator(settings)?;
        self.lock().simulator = Some(simulator);
        Ok(())
    }

    /// Adds a user-defined bridge network with one container, as `docker network create` and
    /// `docker run --network` would, and returns the container's namespace. The bridge takes
    /// host 1 of each subnet, the container host 2; Docker's masquerade rule is added in the
    /// testbed's firewall flavour.
    pub fn add_bridge(
        &self,
        name: &str,
        v4: Ipv4Subnet,
        v6: Ipv6Subnet,
    ) -> Result<String, TestbedError> {
        check_interface(name)?;
        let container = {
            let mut state = self.lock();
            let n = state.next_container;
            state.next_container += 1;
            namespace(&self.tag, &format!("c{n}"))
        };
        self.add_namespace(&container)?;
        self.prepare_namespace(&container, false)?;
        self.add_network(name, v4, v6, &container)?;
        self.wait_ipv6_settled(&container)?;
        self.wait_ipv6_settled(&self.names.host)?;
        Ok(container)
    }

    /// Runs `program args` inside namespace `ns` and returns how it exited and what it printed;
    /// kills it after `timeout`.
    pub fn run_in(
        &self,
        ns: &str,
        program: &str,
        args: &[&str],
        timeout: Duration,
    ) -> Result<CommandOutput, TestbedError> {
        let argv = self.exec_args(ns, program, args)?;
        run(&self.ip, &argv, None, timeout).map(RawOutput::into_text)
    }

    /// A [`Command`] that runs `program` inside `ns` (`ip netns exec`), for callers that need
    /// their own arguments, environment or stdio. Whatever it starts is killed at teardown.
    pub fn command_in(&self, ns: &str, program: &str) -> Result<Command, TestbedError> {
        let mut command = Command::new(&self.ip);
        command.args(self.exec_args(ns, program, &[])?);
        Ok(command)
    }

    /// Starts `program args` inside `ns` with stdin closed and stdout and stderr piped (read
    /// them, or a chatty program blocks once a pipe is full). The process is killed at teardown
    /// if still running.
    pub fn spawn_in(&self, ns: &str, program: &str, args: &[&str]) -> Result<Child, TestbedError> {
        let argv = self.exec_args(ns, program, args)?;
        exec::spawn(&self.ip, &argv)
    }

    /// Sends one HTTP request from inside `ns` with curl.
    pub fn http(&self, ns: &str, request: &HttpRequest) -> Result<HttpResponse, HttpError> {
        let fail = |source| HttpError::Run {
            request: request.describe(ns),
            source: Box::new(source),
        };
        let mut argv = self.exec_args(ns, "curl", &[]).map_err(fail)?;
        argv.extend(args(request.curl_args()));
        // curl enforces the request's own bound; this one only catches a stuck `ip netns exec`.
        let bound = request.timeout + Duration::from_millis(DEFAULT_COMMAND_TIMEOUT_MS);
        let output = run(&self.ip, &argv, None, bound).map_err(fail)?;
        match output.status.code() {
            Some(0) => http::parse_response(&output.stdout).ok_or_else(|| HttpError::Malformed {
                request: request.describe(ns),
                output: String::from_utf8_lossy(&output.stdout)
                    .chars()
                    .take(200)
                    .collect(),
            }),
            // curl's own codes are below 100; 255 is `ip netns exec` failing to enter.
            Some(255) | None => Err(fail(TestbedError::CommandFailed {
                command: exec::describe(&self.ip, &argv),
                status: output.status,
                stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
            })),
            Some(code) => Err(http::classify(
                request,
                ns,
                code,
                &String::from_utf8_lossy(&output.stderr),
            )),
        }
    }

    /// Tears down now and reports what could not be removed (dropping does the same, silently
    /// apart from a `tracing` warning).
    pub fn teardown(mut self) -> Result<(), TestbedError> {
        let failures = self.teardown_inner();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(TestbedError::Teardown { failures })
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn build(&self) -> Result<(), TestbedError> {
        let n = self.names.clone();
        let all = [&n.imds, &n.host, &n.c0, &n.c1, &n.vpn, &n.lan];
        for ns in all {
            self.add_namespace(ns)?;
        }
        for ns in all {
            self.prepare_namespace(ns, *ns == n.host)?;
        }
        self.build_vpc()?;
        self.run_firewall(firewall::docker_setup(self.options.firewall))?;
        self.add_network(DOCKER0, DOCKER0_V4, DOCKER0_V6, &n.c0)?;
        self.add_network(&n.user_bridge, USER_BRIDGE_V4, USER_BRIDGE_V6, &n.c1)?;
        self.build_vpn()?;
        for ns in all {
            self.wait_ipv6_settled(ns)?;
        }
        let simulator = self.start_simulator(self.options.imds)?;
        self.lock().simulator = Some(simulator);
        Ok(())
    }

    /// `ip netns add`, refusing to adopt a namespace someone else made.
    fn add_namespace(&self, ns: &str) -> Result<(), TestbedError> {
        if Path::new(NETNS_RUN_DIR).join(ns).exists() {
            return Err(TestbedError::NamespaceExists {
                name: ns.to_owned(),
            });
        }
        self.ip(&["netns", "add", ns])?;
        self.lock().namespaces.push(ns.to_owned());
        Ok(())
    }

    /// Kernel settings every namespace gets before it has interfaces (so new interfaces inherit
    /// the defaults), then `lo` up. A new namespace copies IPv4 `conf/{all,default}` from the
    /// initial namespace (`net.core.devconf_inherit_init_net` = 0), so on a host with
    /// `ip_forward=1` every namespace would route: everything the model depends on is set.
    fn prepare_namespace(&self, ns: &str, router: bool) -> Result<(), TestbedError> {
        let forwarding = if router { "1" } else { "0" };
        let settings = [
            ("ipv4/ip_forward", forwarding),
            ("ipv6/conf/all/forwarding", forwarding),
            ("ipv6/conf/default/forwarding", forwarding),
            // DAD would hold IPv6 addresses "tentative" for a second or more.
            ("ipv6/conf/all/accept_dad", "0"),
            ("ipv6/conf/default/accept_dad", "0"),
            // No router advertisements here: routes are static, solicitations only add noise.
            ("ipv6/conf/all/accept_ra", "0"),
            ("ipv6/conf/default/accept_ra", "0"),
            ("ipv6/conf/all/router_solicitations", "0"),
            ("ipv6/conf/default/router_solicitations", "0"),
            // Loose reverse-path filtering, systemd's 50-default.conf (Amazon Linux 2023).
            ("ipv4/conf/all/rp_filter", "2"),
            ("ipv4/conf/default/rp_filter", "2"),
            // Off, as on a real host: a proxy must not rely on it (CVE-2020-8558).
            ("ipv4/conf/all/route_localnet", "0"),
            ("ipv4/conf/default/route_localnet", "0"),
        ];
        let script = settings
            .iter()
            .map(|(key, value)| format!("echo {value} > /proc/sys/net/{key}"))
            .collect::<Vec<_>>()
            .join(" && ");
        self.exec_ok(ns, "sh", &["-c", &script], None)?;
        self.ip_in(ns, "link set lo up")
    }

    /// The VPC segment: the router/IMDS namespace with its bridge, the instance's ENI and the
    /// neighbour's, static routes as on EC2, and IMDS's "only this instance" filter.
    fn build_vpc(&self) -> Result<(), TestbedError> {
        let n = &self.names;
        let imds = &n.imds;
        self.ip_in(imds, &format!("link add {VPC_BRIDGE} type bridge"))?;
        self.ip_in(
            imds,
            &format!("addr add {VPC_ROUTER_V4}/{VPC_PREFIX_V4} dev {VPC_BRIDGE}"),
        )?;
        self.ip_in(
            imds,
            &format!("-6 addr add {VPC_ROUTER_V6}/{VPC_PREFIX_V6} dev {VPC_BRIDGE} nodad"),
        )?;
        self.ip_in(imds, &format!("addr add {IMDS_V4}/32 dev lo"))?;
        self.ip_in(imds, &format!("-6 addr add {IMDS_V6}/128 dev lo"))?;
        self.ip_in(imds, &format!("link set {VPC_BRIDGE} up"))?;
        let script = firewall::imds_access_script();
        self.exec_ok(imds, "nft", &["-f", "-"], Some(script.as_bytes()))?;
        for (ns, port, iface, v4, v6) in [
            (&n.host, "vpc-host", HOST_ENI, HOST_ENI_V4, HOST_ENI_V6),
            (&n.lan, "vpc-lan", GUEST_IFACE, LAN_V4, LAN_V6),
        ] {
            self.ip_in(
                imds,
                &format!("link add {port} type veth peer name {iface} netns {ns}"),
            )?;
            self.ip_in(imds, &format!("link set {port} master {VPC_BRIDGE} up"))?;
            self.ip_in(ns, &format!("addr add {v4}/{VPC_PREFIX_V4} dev {iface}"))?;
            self.ip_in(
                ns,
                &format!("-6 addr add {v6}/{VPC_PREFIX_V6} dev {iface} nodad"),
            )?;
            self.ip_in(ns, &format!("link set {iface} up"))?;
            self.ip_in(ns, &format!("route add default via {VPC_ROUTER_V4}"))?;
            self.ip_in(ns, &format!("-6 route add default via {VPC_ROUTER_V6}"))?;
            // As on EC2 (and Amazon Linux's explicit route): IMDS is reached through the
            // subnet's router, so each instance reaches its own IMDS, never via a neighbour.
            self.ip_in(ns, &format!("route add {IMDS_V4}/32 via {VPC_ROUTER_V4}"))?;
            self.ip_in(
                ns,
                &format!("-6 route add {IMDS_V6}/128 via {VPC_ROUTER_V6}"),
            )?;
        }
        Ok(())
    }

    /// A bridge in the host namespace with one container behind a veth pair, and Docker's
    /// masquerade for its subnet.
    fn add_network(
        &self,
        bridge: &str,
        v4: Ipv4Subnet,
        v6: Ipv6Subnet,
        container: &str,
    ) -> Result<(), TestbedError> {
        let host = &self.names.host;
        let (len_v4, len_v6) = (v4.prefix_len(), v6.prefix_len());
        self.ip_in(host, &format!("link add {bridge} type bridge"))?;
        self.ip_in(
            host,
            &format!("addr add {}/{len_v4} dev {bridge}", v4.host(1)),
        )?;
        self.ip_in(
            host,
            &format!("-6 addr add {}/{len_v6} dev {bridge} nodad", v6.host(1)),
        )?;
        self.ip_in(host, &format!("link set {bridge} up"))?;
        let veth = container_veth_name(container);
        self.ip_in(
            host,
            &format!("link add {veth} type veth peer name {GUEST_IFACE} netns {container}"),
        )?;
        self.ip_in(host, &format!("link set {veth} master {bridge} up"))?;
        self.configure_guest(container, v4, v6)?;
        let rules = firewall::docker_masquerade(self.options.firewall, bridge, v4, v6);
        self.run_firewall(rules)
    }

    /// The VPN peer: `vpn0` on the host, the client behind it, and the host's NAT for it.
    fn build_vpn(&self) -> Result<(), TestbedError> {
        let (host, vpn) = (&self.names.host, &self.names.vpn);
        let (len_v4, len_v6) = (VPN_V4.prefix_len(), VPN_V6.prefix_len());
        self.ip_in(
            host,
            &format!("link add {VPN_IFACE} type veth peer name {GUEST_IFACE} netns {vpn}"),
        )?;
        self.ip_in(
            host,
            &format!("addr add {}/{len_v4} dev {VPN_IFACE}", VPN_V4.host(1)),
        )?;
        self.ip_in(
            host,
            &format!(
                "-6 addr add {}/{len_v6} dev {VPN_IFACE} nodad",
                VPN_V6.host(1)
            ),
        )?;
        self.ip_in(host, &format!("link set {VPN_IFACE} up"))?;
        self.configure_guest(vpn, VPN_V4, VPN_V6)?;
        let rules = firewall::vpn_masquerade(self.options.firewall, HOST_ENI, VPN_V4, VPN_V6);
        self.run_firewall(rules)
    }

    /// Host 2 of the subnets on the guest's `eth0`, default routes via host 1.
    fn configure_guest(
        &self,
        ns: &str,
        v4: Ipv4Subnet,
        v6: Ipv6Subnet,
    ) -> Result<(), TestbedError> {
        let (len_v4, len_v6) = (v4.prefix_len(), v6.prefix_len());
        self.ip_in(
            ns,
            &format!("addr add {}/{len_v4} dev {GUEST_IFACE}", v4.host(2)),
        )?;
        self.ip_in(
            ns,
            &format!(
                "-6 addr add {}/{len_v6} dev {GUEST_IFACE} nodad",
                v6.host(2)
            ),
        )?;
        self.ip_in(ns, &format!("link set {GUEST_IFACE} up"))?;
        self.ip_in(ns, &format!("route add default via {}", v4.host(1)))?;
        self.ip_in(ns, &format!("-6 route add default via {}", v6.host(1)))
    }

    fn run_firewall(&self, invocations: Vec<Invocation>) -> Result<(), TestbedError> {
        let host = &self.names.host;
        for invocation in invocations {
            match invocation {
                Invocation::Tool { tool, args } => {
                    let args: Vec<&str> = args.iter().map(String::as_str).collect();
                    self.exec_ok(host, tool, &args, None)?;
                }
                Invocation::NftScript(script) => {
                    self.exec_ok(host, "nft", &["-f", "-"], Some(script.as_bytes()))?;
                }
            }
        }
        Ok(())
    }

    /// Waits until no IPv6 address in `ns` is tentative, so IPv6 works at once.
    fn wait_ipv6_settled(&self, ns: &str) -> Result<(), TestbedError> {
        let timeout = Duration::from_millis(DEFAULT_IPV6_SETTLE_TIMEOUT_MS);
        let deadline = Instant::now() + timeout;
        loop {
            let output = run_ok(
                &self.ip,
                &args(["-n", ns, "-6", "addr", "show", "tentative"]),
                None,
                Duration::from_millis(DEFAULT_COMMAND_TIMEOUT_MS),
            )?;
            let addresses = String::from_utf8_lossy(&output.stdout).trim().to_owned();
            if addresses.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(TestbedError::Ipv6NotReady {
                    namespace: ns.to_owned(),
                    timeout,
                    addresses,
                });
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn start_simulator(&self, settings: ImdsSettings) -> Result<Simulator, TestbedError> {
        let ns = &self.names.imds;
        let binary = self.options.binary.to_string_lossy().into_owned();
        let listen_v4 = format!("{IMDS_V4}:{IMDS_PORT}");
        let listen_v6 = format!("[{IMDS_V6}]:{IMDS_PORT}");
        let hop_limit = settings.hop_limit.to_string();
        let argv = self.exec_args(
            ns,
            &binary,
            &[
                "simulate",
                "--listen",
                &listen_v4,
                "--listen",
                &listen_v6,
                "--hop-limit",
                &hop_limit,
                "--tokens",
                settings.tokens.as_str(),
                "--log-format",
                "json",
                "--log-level",
                "info",
            ],
        )?;
        let mut command = Command::new(&self.ip);
        command
            .args(&argv)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .env_remove("RUST_LOG");
        // The model's IMDS is what the flags say, whatever the caller's environment holds.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("IMDS_HOP_PROXY_SIM_") {
                command.env_remove(key);
            }
        }
        let mut child = command.spawn().map_err(|source| TestbedError::Spawn {
            command: exec::describe(&self.ip, &argv),
            source,
        })?;
        let log = Arc::new(Mutex::new(Vec::new()));
        if let Some(stderr) = child.stderr.take() {
            let log = log.clone();
            thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    lock(&log).push(line);
                }
            });
        }
        let simulator = Simulator {
            child,
            log,
            settings,
        };
        self.wait_simulator_started(simulator)
    }

    fn wait_simulator_started(&self, mut simulator: Simulator) -> Result<Simulator, TestbedError> {
        let timeout = Duration::from_millis(DEFAULT_SIMULATOR_START_TIMEOUT_MS);
        let deadline = Instant::now() + timeout;
        let started = |log: &[String]| {
            log.iter()
                .any(|line| line.contains("\"message\":\"simulator started\""))
        };
        loop {
            if started(&lock(&simulator.log)) {
                return Ok(simulator);
            }
            let exited = simulator.child.try_wait().ok().flatten();
            let reason = match exited {
                Some(status) => format!("it exited with {status}"),
                None if Instant::now() >= deadline => {
                    format!("no \"simulator started\" line within {timeout:?}")
                }
                None => {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                }
            };
            // Let the reader thread collect the last words before quoting them.
            thread::sleep(Duration::from_millis(50));
            let output = lock(&simulator.log).join("\n");
            stop(simulator);
            return Err(TestbedError::SimulatorStart {
                namespace: self.names.imds.clone(),
                reason,
                output,
            });
        }
    }

    /// `ip netns exec ns <program located on PATH> args…`.
    fn exec_args(
        &self,
        ns: &str,
        program: &str,
        rest: &[&str],
    ) -> Result<Vec<OsString>, TestbedError> {
        let path = locate(program)?;
        let mut argv = args(["netns", "exec", ns]);
        argv.push(path.into_os_string());
        argv.extend(args(rest));
        Ok(argv)
    }

    fn exec_ok(
        &self,
        ns: &str,
        program: &str,
        rest: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<RawOutput, TestbedError> {
        let argv = self.exec_args(ns, program, rest)?;
        run_ok(
            &self.ip,
            &argv,
            stdin,
            Duration::from_millis(DEFAULT_COMMAND_TIMEOUT_MS),
        )
    }

    fn ip(&self, rest: &[&str]) -> Result<(), TestbedError> {
        run_ok(
            &self.ip,
            &args(rest),
            None,
            Duration::from_millis(DEFAULT_COMMAND_TIMEOUT_MS),
        )
        .map(drop)
    }

    /// `ip -n ns <command>`, the command given as one line of words: no argument the model
    /// uses (names, addresses, keywords) contains a space.
    fn ip_in(&self, ns: &str, command: &str) -> Result<(), TestbedError> {
        let mut argv = args(["-n", ns]);
        argv.extend(args(command.split_whitespace()));
        let timeout = Duration::from_millis(DEFAULT_COMMAND_TIMEOUT_MS);
        run_ok(&self.ip, &argv, None, timeout).map(drop)
    }

    /// Stops the simulator, kills what is left in each namespace, deletes the namespaces
    /// (newest first). Returns what failed; idempotent.
    fn teardown_inner(&mut self) -> Vec<String> {
        let state = self.state.get_mut().unwrap_or_else(PoisonError::into_inner);
        if let Some(simulator) = state.simulator.take() {
            stop(simulator);
        }
        let namespaces = std::mem::take(&mut state.namespaces);
        let mut failures = Vec::new();
        for ns in namespaces.iter().rev() {
            if let Err(err) = self.kill_all_in(ns) {
                failures.push(format!("killing processes in {ns}: {err}"));
            }
            if let Err(err) = self.ip(&["netns", "del", ns]) {
                failures.push(format!("deleting {ns}: {err}"));
            }
        }
        failures
    }

    /// SIGKILLs every process in `ns`: whatever `spawn_in` or `command_in` started, and
    /// anything those started in turn.
    fn kill_all_in(&self, ns: &str) -> Result<(), TestbedError> {
        let output = run_ok(
            &self.ip,
            &args(["netns", "pids", ns]),
            None,
            Duration::from_millis(DEFAULT_COMMAND_TIMEOUT_MS),
        )?;
        let pids: Vec<String> = String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .filter(|pid| pid.bytes().all(|b| b.is_ascii_digit()))
            .map(str::to_owned)
            .collect();
        if pids.is_empty() {
            return Ok(());
        }
        let sh = locate("sh")?;
        let mut argv = args(["-c", "kill -KILL \"$@\"", "kill"]);
        argv.extend(args(&pids));
        // A process may exit between listing and killing; that is not a failure.
        run(
            &sh,
            &argv,
            None,
            Duration::from_millis(DEFAULT_COMMAND_TIMEOUT_MS),
        )
        .map(drop)
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        for failure in self.teardown_inner() {
            warn!(tag = %self.tag, failure = %failure, "testbed teardown incomplete");
        }
    }
}

fn stop(mut simulator: Simulator) {
    let _ = simulator.child.kill();
    let _ = simulator.child.wait();
}

/// Locks, ignoring poisoning: a test that panicked while holding the lock must not stop the
/// teardown that cleans up after it.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_are_read_from_cap_eff() {
        let root = "Name:\tx\nCapEff:\t000001ffffffffff\n";
        assert!(has_capabilities(root, &NEEDED_CAPABILITIES));
        let net_admin_only = format!("CapEff:\t{:016x}\n", 1u64 << 12);
        assert!(!has_capabilities(&net_admin_only, &NEEDED_CAPABILITIES));
        assert!(!has_capabilities(
            "CapEff:\t0000000000000000\n",
            &NEEDED_CAPABILITIES
        ));
        assert!(!has_capabilities("", &NEEDED_CAPABILITIES));
    }

    #[test]
    fn not_root_says_how_to_proceed() {
        let message = TestbedError::NotRoot.to_string();
        assert!(message.contains("CAP_NET_ADMIN"), "{message}");
        assert!(
            message.contains("IMDS_HOP_PROXY_SKIP_ROOT_TESTS=1"),
            "{message}"
        );
    }
}
