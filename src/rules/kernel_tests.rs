//! The rules against a real kernel, each test in fresh network namespaces so the host's own
//! firewall is never touched.
//!
//! These need root. Without it they fail with a message saying so, unless
//! `IMDS_HOP_PROXY_SKIP_ROOT_TESTS=1` is set, in which case they print a skip line and pass.
//! A backend whose tools are not installed is skipped with a printed line.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

use super::plan::iptables_tools;
use super::*;

const SKIP_ENV: &str = "IMDS_HOP_PROXY_SKIP_ROOT_TESTS";

/// Whether the test may run: true as root; false (after a skip line) when skipping is asked
/// for; otherwise the test fails, naming what it needs.
fn have_root(test: &str) -> bool {
    let root = std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0);
    if root {
        return true;
    }
    if std::env::var(SKIP_ENV).as_deref() == Ok("1") {
        eprintln!("skipping {test}: it needs root ({SKIP_ENV}=1)");
        return false;
    }
    panic!(
        "{test} needs root to create network namespaces and firewall rules: run the tests as \
         root, or set {SKIP_ENV}=1 to skip the real-kernel tests"
    );
}

/// A network namespace of our own, deleted on drop (also when the test panics).
struct Netns {
    name: String,
}

impl Netns {
    fn new(tag: &str) -> Netns {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "ihp-rules-{}-{tag}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let out = SystemRunner::host()
            .run("ip", &["netns", "add", &name], None)
            .expect("ip netns add runs");
        assert!(out.success(), "ip netns add {name}: {}", out.stderr);
        let ns = Netns { name };
        ns.sh(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    fn runner(&self) -> SystemRunner {
        SystemRunner::in_netns(&self.name)
    }

    /// Runs a command inside the namespace and insists it succeeds.
    fn sh(&self, argv: &[&str]) -> String {
        let out = self
            .runner()
            .run(argv[0], &argv[1..], None)
            .expect("command runs");
        assert!(
            out.success(),
            "`{}` in {}: {}",
            argv.join(" "),
            self.name,
            out.stderr
        );
        out.stdout
    }

    fn feed(&self, argv: &[&str], stdin: &str) {
        let out = self
            .runner()
            .run(argv[0], &argv[1..], Some(stdin))
            .expect("command runs");
        assert!(
            out.success(),
            "`{}` in {}: {}",
            argv.join(" "),
            self.name,
            out.stderr
        );
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = SystemRunner::host().run("ip", &["netns", "del", &self.name], None);
    }
}

/// Whether `backend`'s tools are installed; prints a skip line when not.
fn backend_present(backend: Backend, test: &str) -> bool {
    let program = match iptables_tools(backend, Family::V4) {
        Some(tools) => tools.save,
        None => "nft",
    };
    match SystemRunner::host().run(program, &["--version"], None) {
        Err(RulesError::ToolMissing { .. }) => {
            eprintln!("skipping {test}: {program} is not installed");
            false
        }
        _ => true,
    }
}

/// The full ruleset of every tool, for "no trace of ours" and "foreign rule untouched".
fn everything(ns: &Netns) -> String {
    let mut all = String::new();
    for source in Source::ALL {
        let (program, args) = source.command();
        if let Ok(out) = ns.runner().run(program, args, None) {
            all.push_str(&out.stdout);
        }
    }
    all
}

/// A rule someone else owns, added with the backend's own tool.
fn add_foreign_rule(ns: &Netns, backend: Backend) -> &'static str {
    match iptables_tools(backend, Family::V4) {
        Some(tools) => {
            ns.sh(&[
                tools.cli,
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                "eth9",
                "-j",
                "MASQUERADE",
            ]);
            "-A POSTROUTING -o eth9 -j MASQUERADE"
        }
        None => {
            ns.feed(
                &["nft", "-f", "-"],
                "table inet someone_else {\n\tchain input {\n\t\ttype filter hook input priority filter; policy accept;\n\t\ttcp dport 22 accept\n\t}\n}\n",
            );
            "tcp dport 22 accept"
        }
    }
}

fn lifecycle(backend: Backend) {
    let test = &format!("rules lifecycle ({backend})");
    if !have_root(test) || !backend_present(backend, test) {
        return;
    }
    let ns = Netns::new("life");
    let runner = ns.runner();
    let spec = RuleSpec::default();
    let foreign = add_foreign_rule(&ns, backend);

    let report = install(&runner, backend, &spec).expect("install");
    assert_eq!(report.exempted, vec![]);
    assert_eq!(
        report.warnings,
        Vec::<String>::new(),
        "conntrack is installed here"
    );
    let first = status(&runner, backend, &spec).expect("status");
    assert!(first.complete, "{first:#?}");
    assert!(
        first.text.contains("docker0") && first.text.contains("br-"),
        "{}",
        first.text
    );
    assert!(first.text.contains("8169"), "{}", first.text);
    assert!(
        !first.text.contains(foreign),
        "status shows only ours: {}",
        first.text
    );

    // Idempotent: the second install changes nothing, doubles nothing.
    install(&runner, backend, &spec).expect("second install");
    let second = status(&runner, backend, &spec).expect("status");
    assert!(second.complete, "{second:#?}");
    assert_eq!(second.text, first.text);

    // Someone wipes the rules; status notices; install repairs.
    match iptables_tools(backend, Family::V4) {
        Some(tools) => {
            ns.sh(&[tools.cli, "-t", "nat", "-F", "PREROUTING"]);
        }
        None => {
            ns.sh(&["nft", "flush", "ruleset"]);
            add_foreign_rule(&ns, backend);
        }
    }
    let wiped = status(&runner, backend, &spec).expect("status");
    assert!(!wiped.complete, "{wiped:#?}");
    assert!(!wiped.problems.is_empty());
    install(&runner, backend, &spec).expect("repair");
    let repaired = status(&runner, backend, &spec).expect("status");
    assert!(repaired.complete, "{repaired:#?}");
    assert_eq!(repaired.text, first.text);

    remove(&runner, backend).expect("remove");
    remove(&runner, backend).expect("second remove");
    let gone = status(&runner, backend, &spec).expect("status");
    assert!(!gone.complete);
    assert_eq!(gone.text, "");
    let all = everything(&ns);
    assert!(
        !all.contains("IMDS-HOP-PROXY") && !all.contains(NFT_TABLE),
        "{all}"
    );
    assert!(all.contains(foreign), "the foreign rule survived: {all}");
}

#[test]
fn lifecycle_nft() {
    lifecycle(Backend::Nft);
}

#[test]
fn lifecycle_iptables_nft() {
    lifecycle(Backend::IptablesNft);
}

#[test]
fn lifecycle_iptables_legacy() {
    lifecycle(Backend::IptablesLegacy);
}

/// Adds a rule that blocks IMDS on the forward path, in `flavour`'s own syntax, limited to
/// `iface` or to nothing.
fn add_block(ns: &Netns, flavour: Backend, iface: Option<&str>) {
    match iptables_tools(flavour, Family::V4) {
        Some(tools) => {
            let (chain, jump) = if iface.is_some() {
                ("DOCKER-USER", true)
            } else {
                ("FORWARD", false)
            };
            if jump {
                ns.sh(&[tools.cli, "-N", "DOCKER-USER"]);
                ns.sh(&[tools.cli, "-A", "FORWARD", "-j", "DOCKER-USER"]);
            }
            let mut argv = vec![tools.cli, "-I", chain];
            if let Some(iface) = iface {
                argv.extend(["-i", iface]);
            }
            argv.extend(["-d", "169.254.169.254", "-j", "DROP"]);
            ns.sh(&argv);
        }
        None => {
            let iif = iface
                .map(|i| format!("iifname \"{i}\" "))
                .unwrap_or_default();
            ns.feed(
                &["nft", "-f", "-"],
                &format!(
                    "table inet user_fw {{\n\tchain fwd_{n} {{\n\t\ttype filter hook forward priority filter; policy accept;\n\t\t{iif}ip daddr {IMDS_V4} drop\n\t}}\n}}\n",
                    n = if iface.is_some() { "iface" } else { "all" }
                ),
            );
        }
    }
}

fn honours_blocks(backend: Backend, block_flavour: Backend) {
    let test = &format!("rules honour existing IMDS blocks ({backend}, block in {block_flavour})");
    if !have_root(test) || !backend_present(backend, test) || !backend_present(block_flavour, test)
    {
        return;
    }
    let ns = Netns::new("block");
    let runner = ns.runner();
    let spec = RuleSpec::default();

    add_block(&ns, block_flavour, Some("docker0"));
    let report = install(&runner, backend, &spec).expect("install with docker0 exempted");
    let exempted: Vec<&str> = report.exempted.iter().map(|e| e.pattern.as_str()).collect();
    assert_eq!(exempted, ["docker0"]);
    let st = status(&runner, backend, &spec).expect("status");
    assert!(st.complete, "{st:#?}");
    let exempt_line = match backend {
        Backend::Nft => "iifname \"docker0\" ip daddr 169.254.169.254 tcp dport 80 return",
        _ => {
            "-A IMDS-HOP-PROXY -d 169.254.169.254/32 -i docker0 -p tcp -m tcp --dport 80 -j RETURN"
        }
    };
    assert!(st.text.contains(exempt_line), "{}", st.text);

    // A block for every interface: install refuses, quoting it, and our redirect is emptied.
    add_block(&ns, block_flavour, None);
    let err = install(&runner, backend, &spec).expect_err("install must refuse");
    let msg = err.to_string();
    assert!(
        msg.starts_with("refusing to install the IMDS redirect"),
        "{msg}"
    );
    assert!(msg.contains("169.254.169.254"), "{msg}");
    let st = status(&runner, backend, &spec).expect("status");
    assert!(!st.complete);
    assert!(
        !st.text.contains("8169 redirect") && !st.text.contains("REDIRECT"),
        "{}",
        st.text
    );
    assert!(st.text.contains("8169"), "the guard stays: {}", st.text);
}

#[test]
fn blocks_nft() {
    honours_blocks(Backend::Nft, Backend::Nft);
}

#[test]
fn blocks_iptables_nft() {
    honours_blocks(Backend::IptablesNft, Backend::IptablesNft);
}

#[test]
fn blocks_iptables_legacy() {
    honours_blocks(Backend::IptablesLegacy, Backend::IptablesLegacy);
}

/// Split brain: Docker's DOCKER-USER block lives in legacy tables, our rules in nft.
#[test]
fn blocks_in_legacy_tables_are_honoured_by_the_nft_backend() {
    honours_blocks(Backend::Nft, Backend::IptablesLegacy);
}

/// A listener on `[::]:8169` (dual stack) inside a namespace, killed on drop.
struct Listener(Child);

const LISTENER: &str = "
import socket
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
s.bind(('::', 8169))
s.listen(16)
print('ready', flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b'proxy\\n')
    c.close()
";

const CLIENT: &str = "
import socket, sys
try:
    c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    print(c.recv(16).decode().strip())
except OSError as e:
    print('failed:', e)
";

impl Listener {
    fn start(ns: &Netns) -> Listener {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "python3", "-c", LISTENER])
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 is needed to run a listener inside the namespace");
        let mut line = String::new();
        let stdout = child.stdout.take().expect("stdout is piped");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("listener output");
        assert_eq!(line.trim(), "ready", "the listener did not start");
        Listener(child)
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects from inside `ns`; returns what the server said, or "failed: ...".
fn connect(ns: &Netns, host: &str, port: u16, timeout_s: &str) -> String {
    ns.sh(&["python3", "-c", CLIENT, host, &port.to_string(), timeout_s])
        .trim()
        .to_owned()
}

fn datapath(backend: Backend) {
    let test = &format!("redirect and guard on a real kernel ({backend})");
    if !have_root(test) || !backend_present(backend, test) {
        return;
    }
    // "host" has docker0; "container" sits behind it with a default route through it.
    let host = Netns::new("host");
    let container = Netns::new("ctr");
    host.sh(&[
        "ip",
        "link",
        "add",
        "docker0",
        "type",
        "veth",
        "peer",
        "name",
        "eth0",
        "netns",
        &container.name,
    ]);
    host.sh(&["ip", "addr", "add", "172.31.0.1/24", "dev", "docker0"]);
    host.sh(&["ip", "addr", "add", "fd31::1/64", "dev", "docker0", "nodad"]);
    host.sh(&["ip", "link", "set", "docker0", "up"]);
    container.sh(&["ip", "addr", "add", "172.31.0.2/24", "dev", "eth0"]);
    container.sh(&["ip", "addr", "add", "fd31::2/64", "dev", "eth0", "nodad"]);
    container.sh(&["ip", "link", "set", "eth0", "up"]);
    container.sh(&["ip", "route", "add", "default", "via", "172.31.0.1"]);
    container.sh(&["ip", "-6", "route", "add", "default", "via", "fd31::1"]);
    let _listener = Listener::start(&host);

    // Without rules, the port is open to the container and to the host itself.
    assert_eq!(connect(&container, "172.31.0.1", 8169, "2"), "proxy");
    assert_eq!(connect(&host, "127.0.0.1", 8169, "2"), "proxy");

    let spec = RuleSpec {
        allowed: vec!["docker0".parse().expect("valid")],
        ..RuleSpec::default()
    };
    install(&host.runner(), backend, &spec).expect("install");

    // IMDS traffic from the container reaches the proxy, in both families...
    assert_eq!(connect(&container, &IMDS_V4.to_string(), 80, "2"), "proxy");
    assert_eq!(connect(&container, &IMDS_V6.to_string(), 80, "2"), "proxy");
    // ...while the port itself is closed to everyone, the host's loopback included.
    for (ns, addr) in [
        (&container, "172.31.0.1"),
        (&container, "fd31::1"),
        (&host, "127.0.0.1"),
        (&host, "::1"),
    ] {
        let answer = connect(ns, addr, 8169, "0.3");
        assert!(
            answer.starts_with("failed: timed out"),
            "{addr}:8169 answered {answer:?}"
        );
    }
}

#[test]
fn datapath_nft() {
    datapath(Backend::Nft);
}

#[test]
fn datapath_iptables_nft() {
    datapath(Backend::IptablesNft);
}

#[test]
fn datapath_iptables_legacy() {
    datapath(Backend::IptablesLegacy);
}
