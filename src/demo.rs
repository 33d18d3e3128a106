//! `imds-hop-proxy demo`: the hop-limit failure and the fix, on a real kernel, in words a
//! newcomer follows.
//!
//! It builds the same namespace model of an EC2 host the end-to-end tests use (see
//! [`crate::testbed`]), shows a container's token request dying on the hop limit, starts the
//! real proxy in the host namespace, shows the same container getting a token and credentials
//! over IPv4 and IPv6, stops the proxy, and shows that no rule is left behind. Everything it
//! made is removed at the end, on any error, and on Ctrl-C. It never prints a token or a secret,
//! only their shape.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use crate::testbed::{
    require_root, HttpRequest, HttpResponse, IpFamily, Testbed, TestbedError, TestbedOptions,
    TOKEN_TTL_HEADER,
};

/// How long the demo's container waits for the token answer, like an SDK's 1 s timeout with
/// some slack for a loaded machine.
const DEMO_CLIENT_TIMEOUT_MS: u64 = 2_000;
/// How long the proxy gets to install its rules and report itself started.
const DEMO_PROXY_START_TIMEOUT_MS: u64 = 15_000;

/// Why the demo stopped early.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Building or driving the model failed (not root, a tool missing, …).
    #[error(transparent)]
    Testbed(#[from] TestbedError),
    /// The path of this very program is needed to start the simulator and the proxy.
    #[error("cannot find this program's own path: {0}")]
    OwnPath(#[source] std::io::Error),
    /// The proxy did not start; its last words are quoted.
    #[error("the proxy did not start: {0}")]
    ProxyStart(String),
    /// The model did not behave as the demo explains (it would be a bug worth reporting).
    #[error("unexpected: {0}")]
    Unexpected(String),
    /// Ctrl-C.
    #[error("interrupted")]
    Interrupted,
}

/// Runs the demo, printing each step to stdout. `interrupted` is set by the caller's Ctrl-C
/// handler; the demo checks it between steps and cleans up.
pub fn run(interrupted: Arc<AtomicBool>) -> Result<(), DemoError> {
    require_root()?;
    let binary = std::env::current_exe().map_err(DemoError::OwnPath)?;
    let step = |text: &str| -> Result<(), DemoError> {
        if interrupted.load(Ordering::SeqCst) {
            return Err(DemoError::Interrupted);
        }
        println!("\n==> {text}");
        Ok(())
    };

    step("Building a model of an EC2 instance running Docker, in network namespaces")?;
    let bed = Testbed::start(
        &format!("demo-{}", std::process::id()),
        TestbedOptions::new(&binary),
    )?;
    println!("    IMDS        169.254.169.254 and [fd00:ec2::254]: the built-in simulator, tokens");
    println!("                required, token answers sent with hop limit (IP TTL) 1, as on EC2");
    println!(
        "    the host    10.99.0.10 on the VPC, docker0 172.17.0.1/16 with forwarding and NAT"
    );
    println!(
        "    a container 172.17.0.2 on docker0 (namespace {})",
        bed.c0_ns()
    );
    let result = tour(&bed, &binary, &step);
    println!("\n==> Cleaning up: removing the namespaces and stopping the simulator");
    drop(bed);
    // Ctrl-C reaches the whole process group, so the step in flight fails for that reason.
    if interrupted.load(Ordering::SeqCst) {
        return Err(DemoError::Interrupted);
    }
    result
}

fn tour(
    bed: &Testbed,
    binary: &Path,
    step: &dyn Fn(&str) -> Result<(), DemoError>,
) -> Result<(), DemoError> {
    step("The host asks IMDS for a token (PUT /latest/api/token)")?;
    let answer = expect_token(bed, bed.host_ns(), IpFamily::V4)?;
    println!(
        "    200: a token of {} characters. The host is not forwarded, so TTL 1 is enough.",
        answer.body.len()
    );

    step("A container asks the same, with no proxy")?;
    match bed.http(bed.c0_ns(), &token_request(IpFamily::V4)) {
        Err(err) if err.is_timeout() => {
            println!("    no answer within {DEMO_CLIENT_TIMEOUT_MS} ms. IMDS did answer, with TTL 1; the host's");
            println!(
                "    forward into docker0 took it to 0 and dropped it. An SDK now times out, falls"
            );
            println!("    back to IMDSv1 or, with tokens required, gets no credentials at all.");
        }
        other => {
            return Err(DemoError::Unexpected(format!(
                "the container's token request should time out: {other:?}"
            )))
        }
    }

    step("Starting imds-hop-proxy on the host (run, with its redirect rules)")?;
    let mut proxy = start_proxy(bed, binary)?;
    println!("    {}", proxy.started);
    println!("    the rules it installed (imds-hop-proxy rules status):");
    for line in rules_status(bed, binary)?.lines() {
        println!("      {line}");
    }

    for family in [IpFamily::V4, IpFamily::V6] {
        step(&format!(
            "The container asks again, over {family}, with the proxy running"
        ))?;
        let answer = expect_token(bed, bed.c0_ns(), family)?;
        println!(
            "    200: a token of {} characters, valid {} s.",
            answer.body.len(),
            answer.header(TOKEN_TTL_HEADER).unwrap_or("?")
        );
        let token = answer.text();
        let listing = expect_ok(
            bed,
            family,
            "/latest/meta-data/iam/security-credentials/",
            &token,
        )?;
        let role = listing.text();
        let document = expect_ok(
            bed,
            family,
            &format!("/latest/meta-data/iam/security-credentials/{role}"),
            &token,
        )?;
        println!(
            "    credentials of role {role}: {}",
            describe_credentials(&document.body)
        );
    }
    println!("    the proxy's log of those requests:");
    for line in proxy.request_lines() {
        println!("      {line}");
    }

    step("Stopping the proxy (SIGTERM): it drains and removes its rules")?;
    proxy.stop()?;
    let leftover = rules_status(bed, binary)?
        .lines()
        .filter(|line| !line.starts_with('#'))
        .count();
    println!("    rules of ours left: {leftover}");
    match bed.http(bed.c0_ns(), &token_request(IpFamily::V4)) {
        Err(err) if err.is_timeout() => {
            println!("    the container's token request times out again: the host is as it was.")
        }
        other => {
            return Err(DemoError::Unexpected(format!(
                "after the stop the container should time out again: {other:?}"
            )))
        }
    }
    println!(
        "\nThe fix needs no change to the instance's hop limit: the container's answer comes from"
    );
    println!("the host's proxy over the container's own connection, with a fresh TTL.");
    Ok(())
}

/// What `imds-hop-proxy rules status` prints in the host namespace.
fn rules_status(bed: &Testbed, binary: &Path) -> Result<String, DemoError> {
    let status = bed.run_in(
        bed.host_ns(),
        &binary.to_string_lossy(),
        &["rules", "status"],
        Duration::from_secs(10),
    )?;
    Ok(status.stdout)
}

fn token_request(family: IpFamily) -> HttpRequest {
    HttpRequest::imds_token(family).timeout(Duration::from_millis(DEMO_CLIENT_TIMEOUT_MS))
}

fn expect_token(bed: &Testbed, ns: &str, family: IpFamily) -> Result<HttpResponse, DemoError> {
    match bed.http(ns, &token_request(family)) {
        Ok(answer) if answer.status == 200 => Ok(answer),
        other => Err(DemoError::Unexpected(format!(
            "token request from {ns} ({family}): {other:?}"
        ))),
    }
}

fn expect_ok(
    bed: &Testbed,
    family: IpFamily,
    path: &str,
    token: &str,
) -> Result<HttpResponse, DemoError> {
    let request = HttpRequest::imds_get(family, path, Some(token))
        .timeout(Duration::from_millis(DEMO_CLIENT_TIMEOUT_MS));
    match bed.http(bed.c0_ns(), &request) {
        Ok(answer) if answer.status == 200 => Ok(answer),
        other => Err(DemoError::Unexpected(format!(
            "GET {path} ({family}): {other:?}"
        ))),
    }
}

/// The shape of a credentials document, never its secrets.
fn describe_credentials(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let field = |name: &str| {
        let key = format!("\"{name}\"");
        text.find(&key).and_then(|at| {
            let rest = &text[at + key.len()..];
            let start = rest.find('"')? + 1;
            let end = rest[start..].find('"')?;
            Some(rest[start..start + end].to_owned())
        })
    };
    let key_id = field("AccessKeyId").unwrap_or_default();
    format!(
        "Code {}, AccessKeyId {}… ({} characters), Expiration {}",
        field("Code").unwrap_or_default(),
        key_id.chars().take(4).collect::<String>(),
        key_id.len(),
        field("Expiration").unwrap_or_default()
    )
}

/// The proxy process and its log, read as it comes.
struct ProxyProcess {
    child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    started: String,
}

fn start_proxy(bed: &Testbed, binary: &Path) -> Result<ProxyProcess, DemoError> {
    let mut command = bed.command_in(bed.host_ns(), &binary.to_string_lossy())?;
    command
        .args(["run", "--log-format", "text"])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|err| DemoError::ProxyStart(err.to_string()))?;
    let stderr = child
        .stderr
        .take()
        .ok_or_else(|| DemoError::ProxyStart("no stderr".into()))?;
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut proxy = ProxyProcess {
        child,
        lines,
        seen: Vec::new(),
        started: String::new(),
    };
    let deadline = Instant::now() + Duration::from_millis(DEMO_PROXY_START_TIMEOUT_MS);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match proxy.lines.recv_timeout(left) {
            Ok(line) if line.contains(" started ") => {
                proxy.started = shorten(&line);
                return Ok(proxy);
            }
            Ok(line) => proxy.seen.push(line),
            Err(_) => {
                let _ = proxy.child.kill();
                return Err(DemoError::ProxyStart(proxy.seen.join(" | ")));
            }
        }
    }
}

impl ProxyProcess {
    fn request_lines(&mut self) -> Vec<String> {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push(line);
        }
        self.seen
            .iter()
            .filter(|line| line.contains(" request "))
            .map(|line| shorten(line))
            .collect()
    }

    fn stop(&mut self) -> Result<(), DemoError> {
        let pid = self.child.id().to_string();
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status();
        if !killed.is_ok_and(|status| status.success()) {
            return Err(DemoError::Unexpected("could not signal the proxy".into()));
        }
        let status = self
            .child
            .wait()
            .map_err(|err| DemoError::Unexpected(err.to_string()))?;
        println!("    the proxy exited with {status}");
        Ok(())
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A log line without its timestamp, cut to a terminal's width.
fn shorten(line: &str) -> String {
    let text = line.split_once("Z ").map_or(line, |(_, rest)| rest).trim();
    if text.chars().count() > 150 {
        format!("{}…", text.chars().take(150).collect::<String>())
    } else {
        text.to_owned()
    }
}
