//! The product as an operator runs it: `scripts/install.sh` on a Debian 12 host booted under a
//! real systemd (`support::nspawn`), whose network is the host namespace of a testbed (Docker
//! bridges, containers, the IMDS simulator with hop limit 1). Proves what the units promise:
//! the install returns with the proxy ready, restarts and upgrades drop no request, crashes and
//! stalls are recovered, a stop for good (and uninstall.sh) leaves no rule, the sandbox works
//! with every firewall backend. Also checks the unit files themselves (`systemd-analyze verify`
//! and `security`) and that install.sh embeds them unchanged.
//!
//! The machine tests need root; see `support::bed::testbed_gate` for the opt-out.

mod support;

use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use imds_hop_proxy::testbed::{IpFamily, Testbed};
use support::bed::{fetch_credentials, testbed, token_put_times_out};
use support::nspawn::{repo_dir, Machine, Run, BINARY_IN_MACHINE, REPO_IN_MACHINE};
use support::{wait_until, Daemon};

/// The units install.sh installs, in the order `systemd-analyze verify` gets them.
const UNITS: [&str; 4] = [
    "imds-hop-proxy.socket",
    "imds-hop-proxy-rules.service",
    "imds-hop-proxy.service",
    "imds-hop-proxy.target",
];
/// Files of `systemd/` that install.sh carries embedded, by their name there.
const EMBEDDED: [&str; 6] = [
    "imds-hop-proxy.socket",
    "imds-hop-proxy-rules.service",
    "imds-hop-proxy.service",
    "imds-hop-proxy.target",
    "imds-hop-proxy.tmpfiles.conf",
    "config.toml",
];
/// Setting this rewrites install.sh's embedded copies from `systemd/` instead of failing.
const UPDATE_ENV: &str = "IMDS_HOP_PROXY_UPDATE_INSTALLER";
/// The heredoc terminator install.sh uses for embedded files.
const HEREDOC_END: &str = "IMDS_HOP_PROXY_EOF";
/// Highest `systemd-analyze security` exposure accepted ("OK" ends at 3.9; we keep to 3.0).
const MAX_EXPOSURE: f64 = 3.0;
/// Bound on a recovery (restart after a crash or a watchdog kill) until containers are served.
const RECOVERY_DEADLINE: Duration = Duration::from_secs(20);
/// The per-request timeout of the client loop: realistic (SDKs use 1 s), with room for a
/// debug build on a loaded two-core machine.
const CLIENT_TIMEOUT_SECS: u32 = 2;

/// A booted host with its testbed. Fields drop in order: the machine first, then the namespaces.
struct Host {
    machine: Machine,
    bed: Testbed,
}

/// A testbed, a machine booted in its host namespace, and install.sh run on it; `None` when
/// root tests are skipped on purpose.
fn installed_host(short: &str) -> Option<Host> {
    let host = booted_host(short)?;
    let run = install(&host.machine, BINARY_IN_MACHINE);
    assert!(
        run.stderr.contains("imds-hop-proxy is running"),
        "install.sh: {run:#?}"
    );
    Some(host)
}

fn booted_host(short: &str) -> Option<Host> {
    let bed = testbed(short, |_| {})?;
    let machine = Machine::boot(&bed);
    Some(Host { machine, bed })
}

/// `bash scripts/install.sh --binary PATH` inside the machine; fails the test unless it exits 0.
fn install(machine: &Machine, binary: &str) -> Run {
    machine
        .exec(&[
            "bash",
            &format!("{REPO_IN_MACHINE}/scripts/install.sh"),
            "--binary",
            binary,
        ])
        .ok("install.sh")
}

/// `systemctl ARGS` inside the machine; on failure the test fails with the units' journal.
fn systemctl(machine: &Machine, args: &[&str]) {
    let mut argv = vec!["systemctl"];
    argv.extend_from_slice(args);
    let run = machine.exec(&argv);
    assert_eq!(
        run.code,
        0,
        "systemctl {}: {run:#?}\n{}",
        args.join(" "),
        machine.journal(&[
            "imds-hop-proxy.service",
            "imds-hop-proxy-rules.service",
            "imds-hop-proxy.socket"
        ])
    );
}

/// MainPID of the proxy.
fn main_pid(machine: &Machine) -> String {
    machine.property("imds-hop-proxy.service", "MainPID")
}

/// InvocationID of the socket and the rules unit: they change only if the unit was restarted.
fn holders(machine: &Machine) -> (String, String) {
    (
        machine.property("imds-hop-proxy.socket", "InvocationID"),
        machine.property("imds-hop-proxy-rules.service", "InvocationID"),
    )
}

/// Waits until the proxy runs under a new main PID (after a crash or a watchdog kill).
fn wait_restarted(machine: &Machine, old_pid: &str) -> String {
    let deadline = Instant::now() + RECOVERY_DEADLINE;
    loop {
        let pid = main_pid(machine);
        if pid != "0" && pid != old_pid && machine.is_active("imds-hop-proxy.service") == "active" {
            return pid;
        }
        assert!(
            Instant::now() < deadline,
            "imds-hop-proxy not back within {RECOVERY_DEADLINE:?}: {}",
            machine.journal(&["imds-hop-proxy.service"])
        );
        thread::sleep(Duration::from_millis(50));
    }
}

/// Containers on both bridges get credentials over both families.
fn containers_get_credentials(bed: &Testbed) {
    for ns in [bed.c0_ns(), bed.c1_ns()] {
        for family in [IpFamily::V4, IpFamily::V6] {
            let key = fetch_credentials(bed, ns, family);
            assert!(key.starts_with("ASIA"), "{key}");
        }
    }
}

/// Our rules as each firewall tool shows them; empty when none is left.
fn our_rules(machine: &Machine) -> String {
    machine
        .sh("nft list ruleset | grep -n imds_hop_proxy; \
             for t in iptables-nft ip6tables-nft iptables-legacy ip6tables-legacy; do \
               $t-save 2>/dev/null | grep -n IMDS-HOP-PROXY | sed \"s/^/$t: /\"; \
             done; true")
        .stdout
}

#[test]
fn install_returns_with_the_proxy_ready_and_containers_get_credentials() {
    let started = Instant::now();
    let Some(host) = booted_host("sdin") else {
        return;
    };
    let (machine, bed) = (&host.machine, &host.bed);
    assert!(
        token_put_times_out(bed, bed.c0_ns(), IpFamily::V4),
        "without the proxy, the hop limit of 1 drops the token answer"
    );
    // user-data's form: --url and --sha256 (curl reads file:// URLs as it reads https://).
    let url = format!("file://{BINARY_IN_MACHINE}");
    let script = format!("{REPO_IN_MACHINE}/scripts/install.sh");
    let wrong = machine.exec(&["bash", &script, "--url", &url, "--sha256", &"0".repeat(64)]);
    assert_eq!(wrong.code, 69, "{wrong:#?}");
    assert!(wrong.stderr.contains("SHA-256 mismatch"), "{wrong:#?}");
    assert_eq!(
        machine.sh("ls /usr/local/bin").stdout,
        "",
        "nothing installed"
    );
    let sha256 = machine
        .exec(&["sha256sum", BINARY_IN_MACHINE])
        .ok("sha256sum")
        .stdout
        .split_whitespace()
        .next()
        .expect("a digest")
        .to_owned();
    let run = machine
        .exec(&["bash", &script, "--url", &url, "--sha256", &sha256])
        .ok("install.sh --url");
    // No waiting: install.sh returns after `systemctl start`, which for Type=notify returns at
    // READY, which the proxy sends once its rules are in and its sockets served.
    containers_get_credentials(bed);
    for unit in UNITS {
        assert_eq!(machine.is_active(unit), "active", "{unit}: {run:#?}");
    }
    let status = machine.property("imds-hop-proxy.service", "StatusText");
    assert!(status.contains("redirect rules in place"), "{status}");
    let journal = machine.journal(&["imds-hop-proxy.service"]);
    let ready = journal.find(" started ").expect("the started line");
    let started_unit = journal
        .find("Started imds-hop-proxy.service")
        .expect("systemd's line");
    assert!(
        ready < started_unit,
        "READY after the start-up line: {journal}"
    );
    machine
        .exec(&[
            "imds-hop-proxy",
            "rules",
            "status",
            "--config",
            "/etc/imds-hop-proxy/config.toml",
        ])
        .ok("rules status");

    // Least privilege: two capabilities, and no Docker socket in the proxy's view of /run.
    let pid = main_pid(machine);
    let caps = machine
        .sh(&format!("grep CapEff /proc/{pid}/status"))
        .stdout;
    assert_eq!(
        caps.split_whitespace().nth(1),
        Some("0000000000003000"),
        "{caps}"
    );
    let run_dir = machine
        .sh(&format!("ls -A /proc/{pid}/root/run"))
        .ok("ls")
        .stdout;
    assert_eq!(
        run_dir.split_whitespace().collect::<Vec<_>>(),
        ["systemd", "xtables.lock"]
    );

    // Idempotent: a second run changes nothing and keeps the running proxy.
    let again = install(machine, BINARY_IN_MACHINE);
    assert!(!again.stderr.contains("restarting"), "{again:#?}");
    assert_eq!(main_pid(machine), pid);
    let config = machine
        .sh("cat /etc/imds-hop-proxy/config.toml")
        .ok("cat")
        .stdout;
    assert_eq!(config, read_repo("systemd/config.toml"));
    eprintln!("install test took {:?}", started.elapsed());
}

#[test]
fn a_killed_proxy_is_restarted_with_its_socket_and_rules_kept() {
    let Some(host) = installed_host("sdkl") else {
        return;
    };
    let (machine, bed) = (&host.machine, &host.bed);
    let before = holders(machine);
    let pid = main_pid(machine);
    let killed = Instant::now();
    machine.sh(&format!("kill -KILL {pid}")).ok("kill -9");
    wait_restarted(machine, &pid);
    containers_get_credentials(bed);
    eprintln!("served again {:?} after kill -9", killed.elapsed());
    assert_eq!(machine.property("imds-hop-proxy.service", "NRestarts"), "1");
    assert_eq!(
        holders(machine),
        before,
        "a crash must not restart the socket or the rules unit"
    );
}

#[test]
fn a_stalled_proxy_is_killed_by_the_watchdog_and_restarted() {
    let Some(host) = installed_host("sdwd") else {
        return;
    };
    let (machine, bed) = (&host.machine, &host.bed);
    machine.write(
        "/etc/systemd/system/imds-hop-proxy.service.d/watchdog.conf",
        "[Service]\nWatchdogSec=2s\n",
    );
    systemctl(machine, &["daemon-reload"]);
    systemctl(machine, &["restart", "imds-hop-proxy"]);
    let before = holders(machine);
    let pid = main_pid(machine);
    // Longer than the watchdog interval: a proxy that pings keeps running.
    thread::sleep(Duration::from_secs(3));
    assert_eq!(main_pid(machine), pid, "a healthy proxy keeps pinging");
    let stalled = Instant::now();
    machine.sh(&format!("kill -STOP {pid}")).ok("kill -STOP");
    wait_restarted(machine, &pid);
    eprintln!("restarted {:?} after SIGSTOP", stalled.elapsed());
    let journal = machine.journal(&["imds-hop-proxy.service"]);
    assert!(journal.contains("Watchdog timeout"), "{journal}");
    assert!(
        journal.contains("Failed with result 'watchdog'"),
        "{journal}"
    );
    containers_get_credentials(bed);
    assert_eq!(holders(machine), before);
}

/// One client loop's line: iteration, PUT status, GET status, start and end (epoch seconds).
#[derive(Debug)]
struct Exchange {
    put: String,
    get: String,
    start: f64,
    end: f64,
}

/// A container asking for a token and the role listing in a loop until `stop` exists, each
/// request with [`CLIENT_TIMEOUT_SECS`]; bounded in count and time.
const CLIENT_LOOP: &str = r#"
url=$1 stop=$2 timeout=$3 tok=$(mktemp)
i=0
while [ ! -e "$stop" ] && [ $i -lt 5000 ] && [ $SECONDS -lt 240 ]; do
  i=$((i + 1))
  start=$(date +%s.%N)
  put=$(curl -s -o "$tok" -w '%{http_code}' --max-time "$timeout" -X PUT \
        -H 'X-aws-ec2-metadata-token-ttl-seconds: 21600' "$url/latest/api/token")
  get=$(curl -s -o /dev/null -w '%{http_code}' --max-time "$timeout" \
        -H "X-aws-ec2-metadata-token: $(cat "$tok")" "$url/latest/meta-data/iam/security-credentials/")
  echo "$i $put $get $start $(date +%s.%N)"
done
rm -f "$tok"
"#;

fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
}

#[test]
fn restarts_and_an_upgrade_drop_no_request() {
    let Some(host) = installed_host("sdzd") else {
        return;
    };
    let (machine, bed) = (&host.machine, &host.bed);
    let dir = tempfile::tempdir().expect("tempdir");
    let script = dir.path().join("client.sh");
    fs::write(&script, CLIENT_LOOP).expect("write the client loop");
    let stop = dir.path().join("stop");
    let clients: Vec<_> = [(bed.c0_ns(), IpFamily::V4), (bed.c1_ns(), IpFamily::V6)]
        .into_iter()
        .map(|(ns, family)| {
            let mut child = bed
                .spawn_in(
                    ns,
                    "bash",
                    &[
                        script.to_str().expect("utf-8 path"),
                        family.imds_url(),
                        stop.to_str().expect("utf-8 path"),
                        &CLIENT_TIMEOUT_SECS.to_string(),
                    ],
                )
                .expect("start a client loop");
            let stdout = child.stdout.take().expect("piped");
            let lines = thread::spawn(move || {
                BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                    .collect::<Vec<String>>()
            });
            (format!("{ns} {family}"), child, lines)
        })
        .collect();

    let mut windows = Vec::new();
    thread::sleep(Duration::from_secs(1));
    for round in 1..=3 {
        let pid = main_pid(machine);
        let begin = now_epoch();
        systemctl(machine, &["restart", "imds-hop-proxy"]);
        windows.push((format!("restart {round}"), begin, now_epoch()));
        assert_ne!(
            main_pid(machine),
            pid,
            "restart {round} replaced the process"
        );
        thread::sleep(Duration::from_secs(1));
    }
    // An upgrade: another binary (the same program with bytes appended) through install.sh.
    machine
        .sh(&format!(
            "cp {BINARY_IN_MACHINE} /tmp/next && printf upgrade >>/tmp/next"
        ))
        .ok("prepare the new binary");
    let pid = main_pid(machine);
    let begin = now_epoch();
    let upgrade = install(machine, "/tmp/next");
    windows.push(("upgrade".to_owned(), begin, now_epoch()));
    assert!(
        upgrade.stderr.contains("restarting imds-hop-proxy"),
        "{upgrade:#?}"
    );
    assert_ne!(main_pid(machine), pid, "the upgrade restarted the proxy");
    machine
        .exec(&["cmp", "/tmp/next", "/usr/local/bin/imds-hop-proxy"])
        .ok("the new binary is installed");
    thread::sleep(Duration::from_secs(1));
    fs::write(&stop, "").expect("stop the client loops");

    let mut total = 0;
    let mut all = Vec::new();
    for (name, mut child, lines) in clients {
        let _ = child.wait();
        let exchanges: Vec<Exchange> = lines
            .join()
            .expect("the reader thread")
            .iter()
            .map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                Exchange {
                    put: f[1].to_owned(),
                    get: f[2].to_owned(),
                    start: f[3].parse().expect("start"),
                    end: f[4].parse().expect("end"),
                }
            })
            .collect();
        let failed: Vec<&Exchange> = exchanges
            .iter()
            .filter(|e| e.put != "200" || e.get != "200")
            .collect();
        assert!(
            failed.is_empty(),
            "{name}: {} of {} exchanges failed (000 = no answer within {CLIENT_TIMEOUT_SECS} s): {failed:#?}\n{}",
            failed.len(),
            exchanges.len(),
            machine.journal(&["imds-hop-proxy.service"])
        );
        assert!(
            exchanges.len() >= 20,
            "{name}: only {} exchanges",
            exchanges.len()
        );
        total += exchanges.len();
        all.extend(exchanges);
    }
    // Every restart happened while requests were under way, so none of them was spared.
    for (what, begin, end) in &windows {
        let during = all
            .iter()
            .filter(|e| e.start < *end && e.end > *begin)
            .count();
        assert!(during > 0, "no request overlapped {what}");
        eprintln!(
            "{what}: {:.0} ms, {during} exchanges overlapped it",
            (end - begin) * 1000.0
        );
    }
    // Each PUT was answered 200, impossible at hop limit 1 without the proxy; its journal
    // shows them too (no request slipped past it).
    let journal = machine.journal(&["imds-hop-proxy.service"]);
    let puts = journal
        .lines()
        .filter(|line| line.contains("method=PUT") && line.contains("status=200"))
        .count();
    assert!(
        puts >= total,
        "{puts} PUTs in the proxy's journal, {total} made"
    );
    eprintln!("{total} exchanges, none failed, across 3 restarts and an upgrade");
}

#[test]
fn stopping_the_service_for_good_removes_every_rule() {
    let Some(host) = installed_host("sdst") else {
        return;
    };
    let (machine, bed) = (&host.machine, &host.bed);
    assert!(!our_rules(machine).is_empty(), "rules before the stop");
    let stopped = Instant::now();
    systemctl(machine, &["stop", "imds-hop-proxy"]);
    // The rules unit stops right after the proxy has exited (`systemctl stop` returns then).
    wait_until("the rules to go", || {
        our_rules(machine).is_empty().then_some(())
    });
    eprintln!(
        "rules gone {:?} after systemctl stop began",
        stopped.elapsed()
    );
    let rules = machine.exec(&["imds-hop-proxy", "rules", "status"]);
    assert_eq!(rules.code, 3, "{rules:#?}");
    wait_until("the socket unit to stop", || {
        (machine.is_active("imds-hop-proxy.socket") == "inactive").then_some(())
    });
    for unit in UNITS {
        assert_eq!(machine.is_active(unit), "inactive", "{unit}");
    }
    assert!(
        token_put_times_out(bed, bed.c0_ns(), IpFamily::V4),
        "containers are back at the hop limit"
    );
    // And a start brings everything back.
    systemctl(machine, &["start", "imds-hop-proxy"]);
    containers_get_credentials(bed);
    for unit in UNITS {
        wait_until(unit, || (machine.is_active(unit) == "active").then_some(()));
    }
}

/// What of the host install.sh may touch: files under /etc and /usr/local (names, kinds, link
/// targets), every nftables rule and user chain (iptables-nft's included), and the legacy
/// iptables tables with their rules.
fn host_state(machine: &Machine) -> String {
    let files = machine
        .sh("find /etc /usr/local -xdev -printf '%p %y %l\\n' | sort")
        .ok("list files")
        .stdout;
    let ruleset = machine
        .sh("nft -s list ruleset")
        .ok("nft list ruleset")
        .stdout;
    let legacy = machine
        .sh(
            "cat /proc/net/ip_tables_names /proc/net/ip6_tables_names 2>/dev/null; \
             iptables-legacy-save 2>/dev/null | grep -v '^#'; \
             ip6tables-legacy-save 2>/dev/null | grep -v '^#'; true",
        )
        .stdout;
    let rules: Vec<String> = nft_rules(&ruleset).into_iter().collect();
    format!("{files}{}\n{legacy}", rules.join("\n"))
}

/// Every rule of an `nft -s list ruleset` as `table/chain: rule`, every user chain (empty or
/// not) and every base chain whose policy is not accept. Empty base chains and empty tables are
/// left out: iptables-nft creates them on first use and never deletes them (an empty `ip filter`
/// INPUT chain with policy accept filters nothing, and on a Docker host it exists already).
fn nft_rules(ruleset: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let (mut table, mut chain) = (String::new(), String::new());
    let (mut depth, mut base) = (0, false);
    for line in ruleset.lines().map(str::trim) {
        if let Some(name) = line
            .strip_prefix("table ")
            .and_then(|l| l.strip_suffix(" {"))
        {
            (table, depth) = (name.to_owned(), 1);
        } else if let Some(name) = line
            .strip_prefix("chain ")
            .and_then(|l| l.strip_suffix(" {"))
        {
            (chain, depth, base) = (name.to_owned(), 2, false);
        } else if line == "}" {
            if depth == 2 && !base {
                found.insert(format!("{table}/{chain} (chain)"));
            }
            depth -= 1;
        } else if depth == 2 && line.starts_with("type ") {
            base = true;
            if !line.ends_with("policy accept;") {
                found.insert(format!("{table}/{chain}: {line}"));
            }
        } else if depth == 2 && !line.is_empty() {
            found.insert(format!("{table}/{chain}: {line}"));
        }
    }
    found
}

#[test]
fn uninstall_leaves_the_host_as_before() {
    let Some(host) = booted_host("sdun") else {
        return;
    };
    let (machine, bed) = (&host.machine, &host.bed);
    let before = host_state(machine);
    install(machine, BINARY_IN_MACHINE);
    fetch_credentials(bed, bed.c0_ns(), IpFamily::V4);
    let run = machine
        .exec(&["bash", &format!("{REPO_IN_MACHINE}/scripts/uninstall.sh")])
        .ok("uninstall.sh");
    let after = host_state(machine);
    assert_eq!(diff(&before, &after), "", "{run:#?}");
    let files = machine
        .sh("systemctl list-unit-files 'imds-hop-proxy*' --no-legend")
        .stdout;
    assert_eq!(files.trim(), "", "units left");
    assert!(token_put_times_out(bed, bed.c0_ns(), IpFamily::V4));
    // Idempotent, also on a host without the product.
    machine
        .exec(&["bash", &format!("{REPO_IN_MACHINE}/scripts/uninstall.sh")])
        .ok("uninstall.sh again");
}

/// Lines only in `a` (prefixed `-`) or only in `b` (`+`).
fn diff(a: &str, b: &str) -> String {
    let (a, b): (BTreeSet<&str>, BTreeSet<&str>) = (a.lines().collect(), b.lines().collect());
    a.difference(&b)
        .map(|line| format!("-{line}\n"))
        .chain(b.difference(&a).map(|line| format!("+{line}\n")))
        .collect()
}

#[test]
fn the_sandboxed_units_work_with_every_backend() {
    let Some(host) = installed_host("sdbk") else {
        return;
    };
    let (machine, bed) = (&host.machine, &host.bed);
    for backend in ["nft", "iptables-nft", "iptables-legacy"] {
        systemctl(
            machine,
            &["stop", "imds-hop-proxy", "imds-hop-proxy-rules.service"],
        );
        assert_eq!(our_rules(machine), "", "before {backend}");
        machine.write(
            "/etc/imds-hop-proxy/config.toml",
            &format!("rules_backend = \"{backend}\"\n"),
        );
        let cursor = machine.journal_cursor();
        systemctl(
            machine,
            &["start", "imds-hop-proxy", "imds-hop-proxy-rules.service"],
        );
        containers_get_credentials(bed);
        let journal = machine.journal_after(
            &cursor,
            &["imds-hop-proxy.service", "imds-hop-proxy-rules.service"],
        );
        assert!(journal.contains(&format!("with {backend}")), "{journal}");
        assert!(
            journal.contains(&format!("redirect={backend}")),
            "{journal}"
        );
        for trouble in [
            "warning",
            "WARN",
            "ERROR",
            "denied",
            "Read-only",
            "not permitted",
        ] {
            assert!(
                !journal.contains(trouble),
                "{backend}: {trouble}: {journal}"
            );
        }
        machine
            .exec(&[
                "imds-hop-proxy",
                "rules",
                "status",
                "--rules-backend",
                backend,
            ])
            .ok("rules status");
    }
    systemctl(
        machine,
        &["stop", "imds-hop-proxy", "imds-hop-proxy-rules.service"],
    );
    assert_eq!(our_rules(machine), "");
}

/// The units with ExecStart= pointing at the binary under test, in a fresh directory.
fn units_for_this_binary(dir: &Path) -> Vec<String> {
    UNITS
        .iter()
        .map(|unit| {
            let text = read_repo(&format!("systemd/{unit}"))
                .replace("/usr/local/bin/imds-hop-proxy", support::binary());
            let path = dir.join(unit);
            fs::write(&path, text).expect("write unit");
            path.to_string_lossy().into_owned()
        })
        .collect()
}

fn systemd_analyze(args: &[&str]) -> (i32, String, String) {
    let output = Command::new("systemd-analyze")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|err| panic!("systemd-analyze (package systemd): {err}"));
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[test]
fn the_units_pass_systemd_analyze_verify_without_a_warning() {
    let dir = tempfile::tempdir().expect("tempdir");
    let units = units_for_this_binary(dir.path());
    let mut args = vec!["verify", "--man=no"];
    args.extend(units.iter().map(String::as_str));
    let (code, stdout, stderr) = systemd_analyze(&args);
    assert_eq!((code, stdout.as_str(), stderr.as_str()), (0, "", ""));
}

#[test]
fn the_services_are_exposed_at_most_3_0() {
    let dir = tempfile::tempdir().expect("tempdir");
    let units = units_for_this_binary(dir.path());
    for unit in units.iter().filter(|unit| unit.ends_with(".service")) {
        let (code, stdout, stderr) =
            systemd_analyze(&["security", "--offline=yes", "--no-pager", unit]);
        assert_eq!(code, 0, "{stdout}{stderr}");
        let line = stdout
            .lines()
            .chain(stderr.lines())
            .find(|line| line.contains("Overall exposure level"))
            .unwrap_or_else(|| panic!("no exposure line: {stdout}{stderr}"));
        let level: f64 = line
            .split(':')
            .nth(1)
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|number| number.parse().ok())
            .unwrap_or_else(|| panic!("unreadable: {line}"));
        eprintln!("{line}");
        assert!(level <= MAX_EXPOSURE, "{unit}: {line}\n{stdout}");
    }
}

fn read_repo(path: &str) -> String {
    fs::read_to_string(repo_dir().join(path)).unwrap_or_else(|err| panic!("{path}: {err}"))
}

/// The body of install.sh's heredoc for `name`, and where it sits in the script.
fn embedded_span(script: &str, name: &str) -> std::ops::Range<usize> {
    let opener = format!("    {name}) cat <<'{HEREDOC_END}'\n");
    let start = script
        .find(&opener)
        .unwrap_or_else(|| panic!("install.sh embeds no {name}"))
        + opener.len();
    let end = start
        + script[start..]
            .find(&format!("{HEREDOC_END}\n"))
            .unwrap_or_else(|| panic!("the heredoc of {name} does not end"));
    start..end
}

#[test]
fn install_sh_embeds_the_systemd_files_unchanged() {
    let path = repo_dir().join("scripts/install.sh");
    let mut script = read_repo("scripts/install.sh");
    let update = std::env::var_os(UPDATE_ENV).is_some_and(|v| !v.is_empty() && v != "0");
    let mut stale = Vec::new();
    for name in EMBEDDED {
        let file = read_repo(&format!("systemd/{name}"));
        assert!(
            file.ends_with('\n') && !file.contains(HEREDOC_END),
            "systemd/{name}"
        );
        let span = embedded_span(&script, name);
        if script[span.clone()] != file {
            stale.push(name);
            script.replace_range(span, &file);
        }
    }
    if update && !stale.is_empty() {
        fs::write(&path, &script).expect("rewrite install.sh");
        eprintln!("install.sh: updated {}", stale.join(", "));
    } else {
        assert!(
            stale.is_empty(),
            "install.sh embeds old copies of {}: run `{UPDATE_ENV}=1 cargo test --test systemd install_sh_embeds`",
            stale.join(", ")
        );
    }
}

/// The keys of README's settings table.
fn readme_settings() -> BTreeSet<String> {
    let readme = read_repo("README.md");
    let table = readme
        .split("## Settings of `imds-hop-proxy run`")
        .nth(1)
        .expect("README has the settings section");
    table
        .lines()
        .skip_while(|line| !line.starts_with("| key"))
        .skip(2)
        .take_while(|line| line.starts_with('|'))
        .filter_map(|line| line.split('`').nth(1).map(str::to_owned))
        .collect()
}

#[test]
fn the_default_config_shows_every_setting_at_its_default() {
    let config = read_repo("systemd/config.toml");
    let settings: Vec<&str> = config
        .lines()
        .filter_map(|line| line.strip_prefix("# "))
        .filter(|line| {
            line.split_once(" = ")
                .is_some_and(|(key, _)| key.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        })
        .collect();
    let keys: BTreeSet<String> = settings
        .iter()
        .map(|line| line.split(" = ").next().expect("key").to_owned())
        .collect();
    assert_eq!(
        keys,
        readme_settings(),
        "config.toml and README's table list the same keys"
    );
    assert!(
        !config
            .lines()
            .any(|line| !line.is_empty() && !line.starts_with('#')),
        "every setting stays commented out, so defaults follow the binary"
    );
    // Uncommented, the file is accepted (no unknown key, every value valid) and gives the
    // defaults: the start-up line shows the effective settings.
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("config.toml");
    fs::write(&file, settings.join("\n") + "\n").expect("write the uncommented config");
    let mut proxy = Daemon::start(&[
        "run",
        "--config",
        file.to_str().expect("utf-8"),
        "--no-redirect",
        "--listen",
        "127.0.0.1:0",
    ]);
    let started = proxy.wait_log(|line| line["message"] == "started");
    let defaults = [
        ("upstream", "169.254.169.254"),
        ("response_ttl", "64"),
        ("max_connections", "256"),
        ("header_read_timeout_ms", "5000"),
        ("max_header_bytes", "16384"),
        ("max_request_body_bytes", "4096"),
        ("max_response_body_bytes", "1048576"),
        ("upstream_connect_timeout_ms", "250"),
        ("upstream_response_timeout_ms", "600"),
        ("drain_timeout_ms", "3000"),
    ];
    for (key, value) in defaults {
        let shown = match &started[key] {
            serde_json::Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        assert_eq!(shown, value, "{key}: {started}");
    }
}
