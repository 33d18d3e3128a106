//! A real systemd as the "EC2 host" of a testbed: a Debian 12 root (built once per target
//! directory with debootstrap and shared by every test) booted with `systemd-nspawn` inside the
//! testbed's host network namespace, so its units see `docker0`, the containers and the IMDS
//! simulator exactly as the proxy does in the other end-to-end tests.
//!
//! The root is booted with `--volatile=overlay`: each machine writes to a tmpfs over the shared
//! root, so machines never see each other's files and the root stays clean. The repository's
//! `scripts/` and `systemd/` and the binary under test are bound read-only at `/opt/ihp/`.
//! [`Machine`] powers the container off hard (SIGKILL to its init) when dropped, also when a
//! test panics.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use imds_hop_proxy::testbed::Testbed;

use super::binary;

/// Debian release of the root: the distribution this machine runs, so `apt` reaches it.
const SUITE: &str = "bookworm";
/// What the root holds besides `minbase`: systemd as init, every firewall tool a backend uses,
/// and what install.sh needs.
const PACKAGES: &str =
    "systemd,systemd-sysv,dbus,nftables,iptables,conntrack,curl,iproute2,ca-certificates";
/// Written last into a finished root, with the package list: a root without it (a killed
/// debootstrap) or with another list is rebuilt.
const COMPLETE_MARKER: &str = "imds-hop-proxy-test-root";
/// Bound on building the root (about 70 s on an idle machine, more with a build alongside).
const DEBOOTSTRAP_TIMEOUT: Duration = Duration::from_secs(600);
/// Bound on a boot until `systemctl is-system-running --wait` answers.
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on one command inside the machine.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(120);
/// Where the repository and the binary appear inside the machine.
pub const REPO_IN_MACHINE: &str = "/opt/ihp";
/// The binary under test inside the machine.
pub const BINARY_IN_MACHINE: &str = "/opt/ihp-bin/imds-hop-proxy";

/// The target directory the binary under test was built in; the shared root lives there.
fn target_dir() -> PathBuf {
    Path::new(binary())
        .parent()
        .and_then(Path::parent)
        .expect("the binary sits in <target>/<profile>/")
        .to_path_buf()
}

/// The repository root.
pub fn repo_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Debian mirror this machine's apt uses (the registry that is reachable), or Debian's
/// default.
fn debian_mirror() -> String {
    let mut sources = Vec::new();
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        sources.push(text);
    }
    if let Ok(entries) = fs::read_dir("/etc/apt/sources.list.d") {
        for entry in entries.flatten() {
            let path = entry.path();
            if path
                .extension()
                .is_some_and(|ext| ext == "sources" || ext == "list")
            {
                sources.push(fs::read_to_string(&path).unwrap_or_default());
            }
        }
    }
    for text in &sources {
        for line in text.lines().map(str::trim) {
            let uri = if let Some(rest) = line.strip_prefix("URIs:") {
                rest.split_whitespace().next()
            } else if let Some(rest) = line.strip_prefix("deb ") {
                rest.split_whitespace().find(|word| word.contains("://"))
            } else {
                None
            };
            if let Some(uri) = uri {
                if uri.contains("debian") && !uri.contains("security") {
                    return uri.trim_end_matches('/').to_owned();
                }
            }
        }
    }
    "http://deb.debian.org/debian".to_owned()
}

/// Installs `debootstrap` and `systemd-nspawn` (packages `debootstrap`, `systemd-container`)
/// when missing, as `scripts/ensure-tools.sh` does for the other tools.
fn ensure_host_tools() {
    let missing: Vec<&str> = [
        ("debootstrap", "debootstrap"),
        ("systemd-nspawn", "systemd-container"),
        ("nsenter", "util-linux"),
        ("flock", "util-linux"),
    ]
    .into_iter()
    .filter(|(tool, _)| !on_path(tool))
    .map(|(_, package)| package)
    .collect();
    if missing.is_empty() {
        return;
    }
    assert!(
        on_path("apt-get"),
        "the systemd tests need {}: install them",
        missing.join(" ")
    );
    let status = Command::new("sh")
        .args([
            "-c",
            "apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \"$@\" >/dev/null",
            "sh",
        ])
        .args(&missing)
        .status()
        .expect("run apt-get");
    assert!(
        status.success(),
        "apt-get install {} failed",
        missing.join(" ")
    );
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
}

/// The shared Debian 12 root, built on first use. Concurrent tests (threads or processes)
/// serialise on a lock file; the first builds into a temporary directory and renames it into
/// place only when debootstrap succeeded, the others find it complete.
pub fn bookworm_root() -> PathBuf {
    ensure_host_tools();
    let target = target_dir();
    let root = target.join(format!("nspawn-root-{SUITE}"));
    let marker = format!("{SUITE} {PACKAGES}\n");
    let is_complete =
        |root: &Path| fs::read_to_string(root.join(COMPLETE_MARKER)).is_ok_and(|m| m == marker);
    if is_complete(&root) {
        return root;
    }
    let lock = target.join(format!("nspawn-root-{SUITE}.lock"));
    let building = target.join(format!("nspawn-root-{SUITE}.building"));
    let mirror = debian_mirror();
    // `flock` holds the lock for the whole build and releases it if this process dies.
    let script = r#"
        set -e
        root=$1 building=$2 suite=$3 packages=$4 mirror=$5 marker=$6
        if [ -f "$root/imds-hop-proxy-test-root" ] && [ "$(cat "$root/imds-hop-proxy-test-root")" = "$marker" ]; then
          exit 0
        fi
        rm -rf "$building" "$root"
        debootstrap --variant=minbase --include="$packages" "$suite" "$building" "$mirror" >&2
        printf '%s\n' "$marker" >"$building/imds-hop-proxy-test-root"
        mv "$building" "$root"
    "#;
    eprintln!(
        "building the {SUITE} root for the systemd tests in {} from {mirror} (about a minute) ...",
        root.display()
    );
    let started = Instant::now();
    let mut child = Command::new("flock")
        .arg(&lock)
        .args(["sh", "-c", script, "sh"])
        .arg(&root)
        .arg(&building)
        .args([SUITE, PACKAGES, &mirror, marker.trim_end()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run flock debootstrap");
    let stderr = child.stderr.take().expect("piped");
    let reader = thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut std::io::BufReader::new(stderr), &mut text);
        text
    });
    let status = wait_child(&mut child, DEBOOTSTRAP_TIMEOUT);
    let log = reader.join().unwrap_or_default();
    let tail: Vec<&str> = log.lines().rev().take(20).collect();
    assert!(
        status.is_some_and(|status| status.success()) && is_complete(&root),
        "debootstrap of {SUITE} from {mirror} failed or took over {DEBOOTSTRAP_TIMEOUT:?}; last lines:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    eprintln!("root ready after {:?}", started.elapsed());
    root
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// What a command inside the machine did.
#[derive(Debug)]
pub struct Run {
    /// Exit code (-1 when killed by a signal).
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl Run {
    fn from(output: Output) -> Run {
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Panics with the whole output unless the command exited 0.
    pub fn ok(self, what: &str) -> Run {
        assert_eq!(self.code, 0, "{what} failed: {self:#?}");
        self
    }
}

/// A booted Debian 12 machine whose network is the testbed's host namespace.
pub struct Machine {
    nspawn: Child,
    leader: u32,
    name: String,
    console_log: PathBuf,
    cgroups: Vec<PathBuf>,
}

impl Machine {
    /// Boots the shared root in `bed`'s host namespace and waits until systemd has finished
    /// starting up. `degraded` is accepted, with the failed units printed: under load a stock
    /// Debian unit the tests do not use (seen: systemd-user-sessions) occasionally fails, and
    /// every test checks the states of our own units itself.
    pub fn boot(bed: &Testbed) -> Machine {
        let root = bookworm_root();
        let name = format!("ihp-{}", bed.tag());
        let logs = target_dir().join("nspawn-logs");
        fs::create_dir_all(&logs).expect("create nspawn-logs");
        let console_log = logs.join(format!("{name}.log"));
        let console = File::create(&console_log).expect("create the console log");
        let repo = repo_dir();
        let cgroups = own_cgroups(&name);
        let procs: Vec<String> = cgroups
            .iter()
            .map(|dir| dir.join("cgroup.procs").to_string_lossy().into_owned())
            .collect();
        // nspawn (with --keep-unit, no systemd on the host to ask for a scope) puts the machine
        // under its own cgroup: each machine gets one of its own, or two machines booted from
        // the same test process share `.../payload/system.slice/...` and kill each other's
        // services (seen as status=219/CGROUP).
        let mut command = Command::new("sh");
        command
            .args([
                "-c",
                r#"for procs in $IHP_CGROUP_PROCS; do echo $$ >"$procs"; done; exec systemd-nspawn "$@""#,
                "sh",
            ])
            .env("IHP_CGROUP_PROCS", procs.join(" "))
            .args([
                "--boot",
                "--register=no",
                "--keep-unit",
                "--volatile=overlay",
                "--quiet",
            ])
            .arg(format!("--machine={name}"))
            .arg("--directory")
            .arg(&root)
            .arg(format!(
                "--network-namespace-path=/run/netns/{}",
                bed.host_ns()
            ))
            // The units install rules in that namespace; nspawn keeps CAP_NET_ADMIN only for
            // networking it set up itself.
            .arg("--capability=CAP_NET_ADMIN")
            .arg(bind_ro(
                &repo.join("scripts"),
                &format!("{REPO_IN_MACHINE}/scripts"),
            ))
            .arg(bind_ro(
                &repo.join("systemd"),
                &format!("{REPO_IN_MACHINE}/systemd"),
            ))
            .arg(bind_ro(Path::new(binary()), BINARY_IN_MACHINE))
            .stdin(Stdio::null())
            .stdout(console.try_clone().expect("dup console log"))
            .stderr(console);
        let nspawn = command.spawn().expect("run systemd-nspawn");
        let mut machine = Machine {
            nspawn,
            leader: 0,
            name,
            console_log,
            cgroups,
        };
        machine.leader = machine.find_leader();
        machine.wait_booted();
        machine
    }

    /// The container's PID 1 (nspawn's child once it runs systemd).
    fn find_leader(&mut self) -> u32 {
        let pid = self.nspawn.id();
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let children =
                fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
            for child in children.split_whitespace() {
                let comm = fs::read_to_string(format!("/proc/{child}/comm")).unwrap_or_default();
                if comm.trim() == "systemd" {
                    return child.parse().expect("a pid");
                }
            }
            if let Ok(Some(status)) = self.nspawn.try_wait() {
                panic!("systemd-nspawn exited with {status}: {}", self.console());
            }
            assert!(
                Instant::now() < deadline,
                "no systemd in {} within {BOOT_TIMEOUT:?}: {}",
                self.name,
                self.console()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_booted(&self) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            // Before systemd listens on its bus, systemctl fails or says "offline".
            let run = self.exec(&["systemctl", "is-system-running", "--wait"]);
            match run.stdout.trim() {
                "running" => return,
                "degraded" => {
                    let failed = self.exec(&["systemctl", "--failed", "--no-pager", "--no-legend"]);
                    let status = self.exec(&["systemctl", "status", "--failed", "--no-pager"]);
                    eprintln!(
                        "{} booted degraded, continuing: {}\n{}",
                        self.name, failed.stdout, status.stdout
                    );
                    return;
                }
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "{} did not finish booting within {BOOT_TIMEOUT:?} (last: {run:?}): {}",
                self.name,
                self.console()
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The machine's PID 1, as the host sees it (for `nsenter -t`).
    pub fn leader_pid(&self) -> u32 {
        self.leader
    }

    /// What the machine printed on its console so far.
    pub fn console(&self) -> String {
        fs::read_to_string(&self.console_log).unwrap_or_default()
    }

    /// Runs a program inside the machine (all its namespaces, a clean environment) and waits
    /// for it.
    pub fn exec(&self, argv: &[&str]) -> Run {
        let mut command = Command::new("nsenter");
        command
            .args([
                "--target",
                &self.leader.to_string(),
                "--mount",
                "--uts",
                "--ipc",
                "--net",
                "--pid",
                "--cgroup",
            ])
            .arg("--")
            .args(argv)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LANG", "C.UTF-8")
            .env("SYSTEMD_PAGER", "")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = command.spawn().expect("run nsenter");
        Run::from(wait_output(child, COMMAND_TIMEOUT, argv))
    }

    /// Runs a shell script inside the machine.
    pub fn sh(&self, script: &str) -> Run {
        self.exec(&["sh", "-c", script])
    }

    /// `systemctl show -p NAME --value unit`.
    pub fn property(&self, unit: &str, name: &str) -> String {
        self.exec(&["systemctl", "show", "-p", name, "--value", unit])
            .ok("systemctl show")
            .stdout
            .trim()
            .to_owned()
    }

    /// `systemctl is-active unit`.
    pub fn is_active(&self, unit: &str) -> String {
        self.exec(&["systemctl", "is-active", unit])
            .stdout
            .trim()
            .to_owned()
    }

    /// The journal of the given units, message text only.
    pub fn journal(&self, units: &[&str]) -> String {
        let mut argv = vec!["journalctl", "--no-pager", "-o", "cat"];
        for unit in units {
            argv.extend(["-u", unit]);
        }
        self.exec(&argv).stdout
    }

    /// The journal's current end, for [`Machine::journal_after`].
    pub fn journal_cursor(&self) -> String {
        let run = self
            .exec(&["journalctl", "--no-pager", "-n", "0", "--show-cursor"])
            .ok("journalctl --show-cursor");
        run.stdout
            .lines()
            .find_map(|line| line.strip_prefix("-- cursor: "))
            .unwrap_or_else(|| panic!("no cursor: {run:?}"))
            .to_owned()
    }

    /// The journal of the given units after `cursor`, message text only.
    pub fn journal_after(&self, cursor: &str, units: &[&str]) -> String {
        let after = format!("--after-cursor={cursor}");
        let mut argv = vec!["journalctl", "--no-pager", "-o", "cat", after.as_str()];
        for unit in units {
            argv.extend(["-u", unit]);
        }
        self.exec(&argv).stdout
    }

    /// Writes `contents` to `path` inside the machine (its overlay).
    pub fn write(&self, path: &str, contents: &str) {
        let host_path = format!("/proc/{}/root{path}", self.leader);
        if let Some(dir) = Path::new(&host_path).parent() {
            fs::create_dir_all(dir).unwrap_or_else(|err| panic!("mkdir for {path}: {err}"));
        }
        fs::write(&host_path, contents).unwrap_or_else(|err| panic!("write {path}: {err}"));
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // SIGKILL to PID 1 of a PID namespace ends every process in it; nspawn then exits and
        // its mount namespace, with the overlay's tmpfs, goes away.
        if self.leader != 0 {
            let _ = Command::new("kill")
                .args(["-KILL", &self.leader.to_string()])
                .status();
        }
        if wait_child(&mut self.nspawn, Duration::from_secs(10)).is_none() {
            eprintln!("systemd-nspawn for {} did not exit; killed", self.name);
        }
        for dir in &self.cgroups {
            remove_cgroup(dir);
        }
    }
}

/// A fresh cgroup for a machine in each hierarchy nspawn places it in (cgroup2, and the
/// named `systemd` v1 hierarchy on hybrid hosts), below this process's own.
fn own_cgroups(name: &str) -> Vec<PathBuf> {
    let own = fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
    let mounts = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    let mut dirs = Vec::new();
    for mount in mounts.lines() {
        let fields: Vec<&str> = mount.split_whitespace().collect();
        let Some(dash) = fields.iter().position(|field| *field == "-") else {
            continue;
        };
        let (root, point) = (fields[3], fields[4]);
        let fstype = fields.get(dash + 1).copied().unwrap_or("");
        let options = fields.get(dash + 3).copied().unwrap_or("");
        // "0::/path" for cgroup2, "N:name=systemd:/path" for the named hierarchy.
        let key = match fstype {
            "cgroup2" => "",
            "cgroup" if options.split(',').any(|o| o == "name=systemd") => "name=systemd",
            _ => continue,
        };
        let Some(current) = own.lines().find_map(|line| {
            let mut parts = line.splitn(3, ':');
            let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
            (controllers == key).then_some(path)
        }) else {
            continue;
        };
        let relative = current.strip_prefix(root).unwrap_or(current);
        let dir = Path::new(point)
            .join(relative.trim_start_matches('/'))
            .join(format!("{name}.nspawn"));
        fs::create_dir_all(&dir)
            .unwrap_or_else(|err| panic!("create cgroup {}: {err}", dir.display()));
        dirs.push(dir);
    }
    dirs
}

/// Removes a cgroup and what nspawn and the machine's systemd left below it, deepest first.
fn remove_cgroup(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                remove_cgroup(&entry.path());
            }
        }
    }
    let _ = fs::remove_dir(dir);
}

fn bind_ro(source: &Path, target: &str) -> String {
    format!("--bind-ro={}:{target}", source.display())
}

/// Waits for `child` with a bound, collecting its output; kills it when the bound passes.
fn wait_output(mut child: Child, timeout: Duration, argv: &[&str]) -> Output {
    let mut stdout = child.stdout.take().expect("piped");
    let mut stderr = child.stderr.take().expect("piped");
    let out = thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stdout, &mut bytes);
        bytes
    });
    let err = thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = std::io::Read::read_to_end(&mut stderr, &mut bytes);
        bytes
    });
    let status = wait_child(&mut child, timeout)
        .unwrap_or_else(|| panic!("`{}` did not finish within {timeout:?}", argv.join(" ")));
    Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}
