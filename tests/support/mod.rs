//! Shared helpers for the integration tests: start the real binary and learn its ports, speak
//! raw HTTP/1.1 so the tests see exactly the bytes a client sees, and play scripted upstreams
//! that record what reached them.
#![allow(dead_code)] // each test binary uses a different subset

pub mod bed;
pub mod nspawn;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// How long any wait for a condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Path of the binary under test.
pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_imds-hop-proxy")
}

/// A running `imds-hop-proxy` process with JSON logs captured from stderr.
pub struct Daemon {
    child: Child,
    logs: Receiver<serde_json::Value>,
    seen: Vec<serde_json::Value>,
    /// Addresses from the start-up line, in the order given.
    pub addrs: Vec<SocketAddr>,
}

impl Daemon {
    /// Starts `imds-hop-proxy <args> --log-format json` and waits for its start-up line.
    pub fn start(args: &[&str]) -> Daemon {
        Self::start_with_env(args, &[])
    }

    /// As [`Daemon::start`], with extra environment variables.
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let mut command = Command::new(binary());
        command.args(args).envs(env.iter().copied());
        Daemon::spawn(command)
    }

    /// Spawns a prepared command line for the binary (for example one wrapped in
    /// `ip netns exec`), adds `--log-format json`, and waits for the start-up line.
    pub fn spawn(mut command: Command) -> Daemon {
        command
            .args(["--log-format", "json"])
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spawn imds-hop-proxy");
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, logs) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "message": line, "unparsed": true }));
                if tx.send(value).is_err() {
                    break;
                }
            }
        });
        let mut daemon = Daemon {
            child,
            logs,
            seen: Vec::new(),
            addrs: Vec::new(),
        };
        let started = daemon.wait_log(|line| {
            matches!(
                line["message"].as_str(),
                Some("started" | "simulator started")
            )
        });
        daemon.addrs = started["listen"]
            .as_str()
            .expect("start-up line has listen")
            .split(',')
            .map(|addr| addr.parse().expect("listen holds socket addresses"))
            .collect();
        daemon
    }

    /// The first address as `http://addr` (for `--upstream`).
    pub fn url(&self) -> String {
        format!("http://{}", self.addrs[0])
    }

    /// The first address.
    pub fn addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// Waits for a log line matching `pred` (lines seen before count too).
    pub fn wait_log(&mut self, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        if let Some(found) = self.seen.iter().find(|line| pred(line)) {
            return found.clone();
        }
        let deadline = Instant::now() + DEADLINE;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.logs.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if pred(&line) {
                        return line;
                    }
                }
                Err(_) => {
                    let status = self.child.try_wait().ok().flatten();
                    panic!(
                        "no matching log line within {DEADLINE:?} (exit status {status:?}); seen: {:#?}",
                        self.seen
                    );
                }
            }
        }
    }

    /// Every log line read so far, after draining what is buffered.
    pub fn logs(&mut self) -> &[serde_json::Value] {
        while let Ok(line) = self.logs.try_recv() {
            self.seen.push(line);
        }
        &self.seen
    }

    /// Sends a signal to the process.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit, failing the test after the deadline.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "process did not exit within {DEADLINE:?}"
            );
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion and returns (exit code, stdout, stderr).
pub fn run_to_exit(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let output = Command::new(binary())
        .args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .expect("run imds-hop-proxy");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// An HTTP answer as a client sees it.
#[derive(Debug)]
pub struct Answer {
    /// The status line, e.g. `HTTP/1.1 200 OK`.
    pub status_line: String,
    /// Status code.
    pub status: u16,
    /// Headers in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body bytes.
    pub body: Vec<u8>,
}

impl Answer {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == &name.to_ascii_lowercase())
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends raw request bytes and reads the answer until the server closes the connection.
pub fn raw_request(addr: SocketAddr, request: &[u8]) -> Answer {
    let mut stream = TcpStream::connect_timeout(&addr, DEADLINE).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    stream.write_all(request).expect("write request");
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).expect("read answer");
    parse_answer(&bytes)
        .unwrap_or_else(|| panic!("not an HTTP answer: {:?}", String::from_utf8_lossy(&bytes)))
}

/// Sends a request with the given method, target and headers (Host added, no body).
pub fn request(addr: SocketAddr, method: &str, target: &str, headers: &[(&str, &str)]) -> Answer {
    let mut text = format!("{method} {target} HTTP/1.1\r\nHost: 169.254.169.254\r\n");
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    if method == "PUT" || method == "POST" {
        text.push_str("Content-Length: 0\r\n");
    }
    text.push_str("\r\n");
    raw_request(addr, text.as_bytes())
}

/// PUTs for a token with a TTL of 21600 s and returns it.
pub fn token(addr: SocketAddr) -> String {
    let answer = request(
        addr,
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", "21600")],
    );
    assert_eq!(answer.status, 200, "token PUT: {answer:?}");
    answer.text()
}

fn parse_answer(bytes: &[u8]) -> Option<Answer> {
    let split = bytes.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&bytes[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next()?.to_owned();
    let status = status_line.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Some(Answer {
        status_line,
        status,
        headers,
        body: bytes[split + 4..].to_vec(),
    })
}

/// A scripted upstream: records each request head it receives and answers with fixed bytes
/// after an optional delay, or never answers at all.
pub struct ScriptedUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<(Instant, String)>>>,
}

/// What a [`ScriptedUpstream`] does with each request.
#[derive(Clone)]
pub enum Script {
    /// Waits this long after the head arrives, then writes these bytes and closes.
    Answer(Duration, &'static [u8]),
    /// Reads the head and then holds the connection open, silent.
    Stall,
}

impl ScriptedUpstream {
    /// Starts listening on an OS-chosen loopback port.
    pub fn start(script: Script) -> ScriptedUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let record = received.clone();
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { break };
                let record = record.clone();
                let script = script.clone();
                thread::spawn(move || {
                    let head = read_head(&mut stream);
                    record.lock().unwrap().push((Instant::now(), head));
                    match script {
                        Script::Answer(delay, bytes) => {
                            thread::sleep(delay);
                            let _ = stream.write_all(bytes);
                            let _ = stream.shutdown(Shutdown::Both);
                        }
                        Script::Stall => thread::sleep(Duration::from_secs(60)),
                    }
                });
            }
        });
        ScriptedUpstream { addr, received }
    }

    /// `http://addr`, for `--upstream`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The request heads received so far.
    pub fn received(&self) -> Vec<String> {
        self.received_at()
            .into_iter()
            .map(|(_, head)| head)
            .collect()
    }

    /// The request heads received so far, with the moment each arrived.
    pub fn received_at(&self) -> Vec<(Instant, String)> {
        self.received.lock().unwrap().clone()
    }

    /// Waits until `n` requests have arrived.
    pub fn wait_received(&self, n: usize) -> Vec<String> {
        wait_until("upstream requests", || {
            let seen = self.received();
            (seen.len() >= n).then_some(seen)
        })
    }
}

fn read_head(stream: &mut TcpStream) -> String {
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Polls `check` until it returns `Some`, failing the test after [`DEADLINE`].
pub fn wait_until<T>(what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(10));
    }
}

/// A loopback address where nothing listens: bound, then released.
pub fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// Starts the simulator on an OS-chosen loopback port with extra flags.
pub fn simulator(extra: &[&str]) -> Daemon {
    let mut args = vec!["simulate", "--listen", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    Daemon::start(&args)
}

/// Starts the proxy on an OS-chosen loopback port in front of `upstream`, with extra flags.
pub fn proxy(upstream: &str, extra: &[&str]) -> Daemon {
    let mut args = vec![
        "run",
        "--no-redirect",
        "--listen",
        "127.0.0.1:0",
        "--upstream",
        upstream,
    ];
    args.extend_from_slice(extra);
    Daemon::start(&args)
}
