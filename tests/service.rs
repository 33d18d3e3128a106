//! The proxy's contract with systemd, on loopback with systemd's own protocol: readiness and
//! stopping notifications, watchdog pings, and serving sockets passed by socket activation.
//! (The same under a real booted systemd is in tests/systemd.rs.)

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Instant;

use support::*;

/// Collects the datagrams the proxy sends to `NOTIFY_SOCKET`.
struct NotifySocket {
    socket: UnixDatagram,
    path: String,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    fn new() -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock").display().to_string();
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(DEADLINE)).unwrap();
        NotifySocket {
            socket,
            path,
            _dir: dir,
        }
    }

    /// Reads messages until one contains `wanted`; returns everything read.
    fn wait_for(&self, wanted: &str) -> Vec<String> {
        let mut seen = Vec::new();
        let deadline = Instant::now() + DEADLINE;
        let mut buf = [0u8; 4096];
        while Instant::now() < deadline {
            let Ok(n) = self.socket.recv(&mut buf) else {
                break;
            };
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            let done = message.lines().any(|line| line == wanted);
            seen.push(message);
            if done {
                return seen;
            }
        }
        panic!("no {wanted:?} from the proxy; got {seen:?}");
    }
}

#[test]
fn ready_comes_after_start_up_then_watchdog_pings_then_stopping() {
    let sim = simulator(&[]);
    let notify = NotifySocket::new();
    // systemd names the watched process in WATCHDOG_PID; `exec` keeps the shell's pid.
    let mut command = Command::new("sh");
    command
        .args(["-c", "WATCHDOG_PID=$$ exec \"$0\" \"$@\"", binary()])
        .args([
            "run",
            "--no-redirect",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            &sim.url(),
        ])
        .env("NOTIFY_SOCKET", &notify.path)
        .env("WATCHDOG_USEC", "200000");
    let mut proxy = Daemon::spawn(command);
    let ready = notify.wait_for("READY=1");
    // READY is the first thing said, and it carries a status line for `systemctl status`.
    assert!(
        ready[0].contains("STATUS=serving on 127.0.0.1:"),
        "{ready:?}"
    );
    notify.wait_for("WATCHDOG=1");
    notify.wait_for("WATCHDOG=1");
    assert!(!token(proxy.addr()).is_empty());
    proxy.signal("TERM");
    notify.wait_for("STOPPING=1");
    assert_eq!(proxy.wait_exit().code(), Some(0));
}

#[test]
fn sockets_passed_by_socket_activation_are_served() {
    let sim = simulator(&[]);
    let addr = closed_port();
    let mut activator = Command::new("systemd-socket-activate")
        .args(["--listen", &addr.to_string(), binary()])
        .args([
            "run",
            "--no-redirect",
            "--log-format",
            "json",
            "--upstream",
            &sim.url(),
        ])
        // A listen setting that differs on purpose: the passed socket wins.
        .args(["--listen", "127.0.0.1:1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (package systemd)");
    let stderr = activator.stderr.take().unwrap();
    // The activator listens before spawning the proxy; connecting early just waits in the
    // backlog, exactly what a restart under a .socket unit relies on.
    let answer = wait_until("the activated proxy's answer", || {
        std::net::TcpStream::connect(addr).ok()?;
        Some(token(addr))
    });
    assert!(!answer.is_empty());
    let mut lines = BufReader::new(stderr).lines();
    let passed = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|line| line.contains("using the listening sockets systemd passed"));
    assert!(passed.is_some_and(|line| line.contains(&addr.to_string())));
    // Without --accept the activator execs the proxy in its own process: one kill ends it.
    let _ = activator.kill();
    let _ = activator.wait();
}
