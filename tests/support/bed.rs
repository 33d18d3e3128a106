//! Helpers for tests on the namespace model of an EC2 host (`imds_hop_proxy::testbed`): build
//! a testbed or skip as root-less tests must, start the proxy in the host namespace, speak
//! IMDS from any namespace, and run a closure inside a namespace.

use std::fs::File;
use std::process::Command;
use std::time::Duration;

use imds_hop_proxy::testbed::{
    root_gate, HttpRequest, HttpResponse, IpFamily, RootGate, Testbed, TestbedOptions,
    SKIP_ROOT_TESTS_ENV, TOKEN_TTL_HEADER,
};

use super::{binary, Daemon};

/// A client timeout long enough for an answer on a loaded machine, short enough that the
/// expected timeouts (TTL-1 answers, dropped packets) keep the suite quick.
pub const PROBE_TIMEOUT: Duration = Duration::from_millis(1_500);

/// True (after saying so) when root tests are skipped on purpose; not being root without the
/// opt-out variable fails the test with a plain message.
pub fn testbed_gate() -> bool {
    match root_gate() {
        Ok(RootGate::Run) => false,
        Ok(RootGate::Skip) => {
            eprintln!("skipped: {SKIP_ROOT_TESTS_ENV} is set");
            true
        }
        Err(err) => panic!("{err}"),
    }
}

/// Builds a testbed tagged `<short>-<pid>`, or `None` when root tests are skipped on purpose.
pub fn testbed(short: &str, configure: impl FnOnce(&mut TestbedOptions)) -> Option<Testbed> {
    if testbed_gate() {
        return None;
    }
    let mut options = TestbedOptions::new(binary());
    configure(&mut options);
    let tag = format!("{short}-{}", std::process::id());
    Some(Testbed::start(&tag, options).unwrap_or_else(|err| panic!("testbed {tag}: {err}")))
}

/// Starts `imds-hop-proxy run` in the host namespace with the given extra flags.
pub fn proxy_in_host(bed: &Testbed, extra: &[&str]) -> Daemon {
    let mut command = command_in_host(bed);
    command.arg("run");
    if !extra.contains(&"--rules-check-interval-ms") {
        // Quick restores keep the tests short; production's default is longer.
        command.args(["--rules-check-interval-ms", "200"]);
    }
    command.args(extra);
    Daemon::spawn(command)
}

/// The binary as a command in the host namespace.
pub fn command_in_host(bed: &Testbed) -> Command {
    bed.command_in(bed.host_ns(), binary())
        .unwrap_or_else(|err| panic!("command in host namespace: {err}"))
}

/// `imds-hop-proxy rules <args>` in the host namespace: (exit code, stdout).
pub fn rules(bed: &Testbed, args: &[&str]) -> (i32, String) {
    let output = command_in_host(bed)
        .arg("rules")
        .args(args)
        .output()
        .expect("run imds-hop-proxy rules");
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// PUTs for a token from `ns` and returns it, failing the test on anything but 200.
pub fn token(bed: &Testbed, ns: &str, family: IpFamily) -> String {
    let answer = bed
        .http(ns, &HttpRequest::imds_token(family).timeout(PROBE_TIMEOUT))
        .unwrap_or_else(|err| panic!("token PUT from {ns} ({family}): {err}"));
    assert_eq!(
        answer.status, 200,
        "token PUT from {ns} ({family}): {answer:?}"
    );
    assert_eq!(answer.header(TOKEN_TTL_HEADER), Some("21600"), "{answer:?}");
    answer.text()
}

/// GETs `path` from `ns`, failing the test when no answer comes.
pub fn get(bed: &Testbed, ns: &str, family: IpFamily, path: &str, token: &str) -> HttpResponse {
    bed.http(
        ns,
        &HttpRequest::imds_get(family, path, Some(token)).timeout(PROBE_TIMEOUT),
    )
    .unwrap_or_else(|err| panic!("GET {path} from {ns} ({family}): {err}"))
}

/// The whole credential fetch an SDK makes: token, role listing, credentials document.
/// Returns the AccessKeyId.
pub fn fetch_credentials(bed: &Testbed, ns: &str, family: IpFamily) -> String {
    let token = token(bed, ns, family);
    let listing = get(
        bed,
        ns,
        family,
        "/latest/meta-data/iam/security-credentials/",
        &token,
    );
    assert_eq!(listing.status, 200, "{listing:?}");
    let role = listing.text();
    let path = format!("/latest/meta-data/iam/security-credentials/{role}");
    let document = get(bed, ns, family, &path, &token);
    assert_eq!(document.status, 200, "{document:?}");
    let json: serde_json::Value = serde_json::from_slice(&document.body).expect("JSON credentials");
    assert_eq!(json["Code"], "Success");
    json["AccessKeyId"]
        .as_str()
        .expect("AccessKeyId")
        .to_owned()
}

/// True when a token PUT from `ns` gets no answer at all, as behind a hop limit of 1.
pub fn token_put_times_out(bed: &Testbed, ns: &str, family: IpFamily) -> bool {
    match bed.http(ns, &HttpRequest::imds_token(family).timeout(PROBE_TIMEOUT)) {
        Err(err) => err.is_timeout(),
        Ok(_) => false,
    }
}

/// Runs `job` on a thread that has entered network namespace `ns`, so every socket it opens
/// lives there. For clients that are libraries (the AWS SDK), not programs.
pub fn in_netns<T: Send + 'static>(ns: &str, job: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let namespace = File::open(&path).unwrap_or_else(|err| panic!("open {path}: {err}"));
        nix::sched::setns(&namespace, nix::sched::CloneFlags::CLONE_NEWNET)
            .unwrap_or_else(|err| panic!("setns {path}: {err}"));
        job()
    })
    .join()
    .expect("the job in the namespace panicked")
}
