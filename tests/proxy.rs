//! The proxy as a client sees it: the real binary on loopback in front of the real simulator
//! or a scripted upstream that records what reached it.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::*;

const HOP_BY_HOP_REQUEST: &[(&str, &str)] = &[
    ("Connection", "keep-alive, X-Custom-Hop"),
    ("X-Custom-Hop", "1"),
    ("Keep-Alive", "timeout=5"),
    ("TE", "trailers"),
    ("Upgrade", "h2c"),
    ("Proxy-Authorization", "Basic Zm9vOmJhcg=="),
    ("Proxy-Connection", "keep-alive"),
    ("X-aws-ec2-metadata-token", "AQAEAtoken"),
    ("X-aws-ec2-metadata-token-ttl-seconds", "21600"),
    ("User-Agent", "integration-test"),
];

#[test]
fn token_put_and_credentials_get_pass_through_to_the_simulator() {
    let sim = simulator(&[]);
    let proxy = proxy(&sim.url(), &[]);

    let put = request(
        proxy.addr(),
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", "300")],
    );
    assert_eq!(put.status, 200, "{put:?}");
    assert_eq!(
        put.header("x-aws-ec2-metadata-token-ttl-seconds"),
        Some("300")
    );
    assert_eq!(put.header("server"), Some("EC2ws"));
    let token = put.text();
    assert!(token.len() >= 40, "token looks real: {token:?}");

    let auth = [("X-aws-ec2-metadata-token", token.as_str())];
    let roles = request(
        proxy.addr(),
        "GET",
        "/latest/meta-data/iam/security-credentials/",
        &auth,
    );
    assert_eq!(roles.status, 200, "{roles:?}");
    let role = roles.text();
    let creds = request(
        proxy.addr(),
        "GET",
        &format!("/latest/meta-data/iam/security-credentials/{role}"),
        &auth,
    );
    assert_eq!(creds.status, 200, "{creds:?}");
    let json: serde_json::Value = serde_json::from_slice(&creds.body).unwrap();
    assert_eq!(json["Code"], "Success");
    assert!(json["AccessKeyId"].as_str().unwrap().starts_with("ASIA"));
    let remaining: u64 = creds
        .header("x-aws-ec2-metadata-token-ttl-seconds")
        .expect("token-bearing answers carry the remaining TTL")
        .parse()
        .unwrap();
    assert!((1..=300).contains(&remaining));

    // IMDS's own refusals come back unchanged.
    let no_token = request(proxy.addr(), "GET", "/latest/meta-data/", &[]);
    assert_eq!(no_token.status, 401);
    let bad_ttl = request(
        proxy.addr(),
        "PUT",
        "/latest/api/token",
        &[("X-aws-ec2-metadata-token-ttl-seconds", "21601")],
    );
    assert_eq!(bad_ttl.status, 400);
    let missing = request(proxy.addr(), "GET", "/latest/meta-data/nope", &auth);
    assert_eq!(missing.status, 404);
    assert!(missing.text().contains("404 - Not Found"));
}

#[test]
fn x_forwarded_for_is_refused_without_reaching_imds() {
    let upstream = ScriptedUpstream::start(Script::Answer(
        Duration::ZERO,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ));
    let proxy = proxy(&upstream.url(), &[]);
    for (method, target, header) in [
        ("PUT", "/latest/api/token", "X-Forwarded-For"),
        ("GET", "/latest/meta-data/", "X-Forwarded-For"),
        ("GET", "/latest/meta-data/", "Forwarded"),
        ("PUT", "/latest/api/token", "Via"),
    ] {
        let answer = request(
            proxy.addr(),
            method,
            target,
            &[
                (header, "10.1.2.3"),
                ("X-aws-ec2-metadata-token-ttl-seconds", "60"),
            ],
        );
        assert_eq!(answer.status, 403, "{method} with {header}: {answer:?}");
        assert!(answer.text().contains("X-Forwarded-For"), "{answer:?}");
    }
    // A request without the header does reach the upstream, so the zero below is meaningful.
    assert_eq!(
        request(proxy.addr(), "GET", "/latest/meta-data/", &[]).status,
        200
    );
    assert_eq!(upstream.wait_received(1).len(), 1);
}

#[test]
fn hop_by_hop_headers_are_stripped_and_nothing_is_added_upstream() {
    let upstream = ScriptedUpstream::start(Script::Answer(Duration::ZERO, b"HTTP/1.1 200 OK\r\n"));
    let proxy = proxy(&upstream.url(), &[]);
    request(
        proxy.addr(),
        "GET",
        "/latest/meta-data/",
        HOP_BY_HOP_REQUEST,
    );
    let head = upstream.wait_received(1).remove(0).to_ascii_lowercase();
    let names: Vec<&str> = head
        .lines()
        .skip(1)
        .filter_map(|line| line.split_once(':').map(|(name, _)| name))
        .collect();
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        [
            "host",
            "user-agent",
            "x-aws-ec2-metadata-token",
            "x-aws-ec2-metadata-token-ttl-seconds"
        ],
        "upstream received: {head}"
    );
    assert!(
        head.contains(&format!("host: {}\r\n", upstream.addr)),
        "{head}"
    );
    assert!(
        head.contains("x-aws-ec2-metadata-token: aqaeatoken\r\n"),
        "{head}"
    );
}

#[test]
fn hop_by_hop_headers_are_stripped_from_answers() {
    let upstream = ScriptedUpstream::start(Script::Answer(
        Duration::ZERO,
        b"HTTP/1.1 200 OK\r\nServer: EC2ws\r\nConnection: close, X-Upstream-Hop\r\n\
          X-Upstream-Hop: 1\r\nKeep-Alive: timeout=9\r\nProxy-Authenticate: Basic\r\n\
          X-aws-ec2-metadata-token-ttl-seconds: 21599\r\nContent-Type: text/plain\r\n\
          Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    ));
    let proxy = proxy(&upstream.url(), &[]);
    let answer = request(proxy.addr(), "GET", "/latest/meta-data/", &[]);
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), "hello");
    assert_eq!(answer.header("server"), Some("EC2ws"));
    assert_eq!(
        answer.header("x-aws-ec2-metadata-token-ttl-seconds"),
        Some("21599")
    );
    assert_eq!(answer.header("content-type"), Some("text/plain"));
    for gone in [
        "x-upstream-hop",
        "keep-alive",
        "proxy-authenticate",
        "transfer-encoding",
    ] {
        assert_eq!(answer.header(gone), None, "{gone} leaked: {answer:?}");
    }
    // Our own connection management: one answer per connection, like IMDS.
    assert_eq!(answer.header("connection"), Some("close"));
}

#[test]
fn method_path_and_query_pass_byte_for_byte() {
    let upstream = ScriptedUpstream::start(Script::Answer(
        Duration::ZERO,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ));
    let proxy = proxy(&upstream.url(), &[]);
    let targets = [
        ("GET", "/latest/meta-data/placement/availability-zone/"),
        ("GET", "/latest/meta-data/tags/instance/Name?x=1&y=%2F%20"),
        ("HEAD", "/latest//meta-data/"),
        ("PUT", "/latest/api/token"),
    ];
    for (method, target) in targets {
        request(proxy.addr(), method, target, &[]);
    }
    let heads = upstream.wait_received(targets.len());
    for (method, target) in targets {
        let line = format!("{method} {target} HTTP/1.1\r\n");
        assert!(
            heads.iter().any(|head| head.starts_with(&line)),
            "{line:?} not in {heads:#?}"
        );
    }
}

#[test]
fn a_missing_upstream_is_a_502_with_a_reason() {
    let proxy = proxy(&format!("http://{}", closed_port()), &[]);
    let started = Instant::now();
    let answer = request(proxy.addr(), "PUT", "/latest/api/token", &[]);
    assert_eq!(answer.status, 502, "{answer:?}");
    assert!(
        answer.text().contains("refused the connection"),
        "{answer:?}"
    );
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; charset=utf-8")
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a refusal is answered at once"
    );
}

#[test]
fn a_stalled_upstream_is_a_504_within_the_response_bound() {
    let upstream = ScriptedUpstream::start(Script::Stall);
    let proxy = proxy(&upstream.url(), &["--upstream-response-timeout-ms", "300"]);
    let started = Instant::now();
    let answer = request(proxy.addr(), "GET", "/latest/meta-data/", &[]);
    let waited = started.elapsed();
    assert_eq!(answer.status, 504, "{answer:?}");
    assert!(
        answer.text().contains("did not answer within 300 ms"),
        "{answer:?}"
    );
    // It waited for the bound, and not much longer (generous slack for a loaded machine).
    assert!(
        waited >= Duration::from_millis(300),
        "answered before the bound: {waited:?}"
    );
    assert!(
        waited < Duration::from_millis(300) + Duration::from_secs(3),
        "{waited:?}"
    );
}

#[test]
fn with_default_bounds_a_dead_imds_is_answered_before_the_sdk_timeout() {
    // The default connect + response bounds must add up to less than the SDKs' 1 s.
    let upstream = ScriptedUpstream::start(Script::Stall);
    let proxy = proxy(&upstream.url(), &[]);
    let answer = request(proxy.addr(), "GET", "/latest/meta-data/", &[]);
    assert_eq!(answer.status, 504);
    let (_, help, _) = run_to_exit(&["run", "--help"], &[]);
    let connect = default_in_help(&help, "--upstream-connect-timeout-ms");
    let response = default_in_help(&help, "--upstream-response-timeout-ms");
    assert!(connect + response < 1000, "{connect} + {response} ms");
}

fn default_in_help(help: &str, flag: &str) -> u64 {
    let start = help.find(flag).unwrap_or_else(|| panic!("{flag} in help"));
    let rest = &help[start..];
    let default = &rest[rest.find("[default: ").expect("a default") + 10..];
    default[..default.find(']').unwrap()].parse().unwrap()
}

#[test]
fn connections_beyond_the_limit_wait_for_a_free_slot() {
    let upstream = ScriptedUpstream::start(Script::Stall);
    let proxy = proxy(
        &upstream.url(),
        &[
            "--max-connections",
            "1",
            "--upstream-response-timeout-ms",
            "800",
        ],
    );
    let addr = proxy.addr();
    let first = std::thread::spawn(move || request(addr, "GET", "/first", &[]).status);
    upstream.wait_received(1);
    let second = std::thread::spawn(move || request(addr, "GET", "/second", &[]).status);
    assert_eq!(first.join().unwrap(), 504);
    assert_eq!(second.join().unwrap(), 504);
    let heads = upstream.received_at();
    let arrival = |line: &str| {
        heads
            .iter()
            .find(|(_, head)| head.starts_with(line))
            .map(|(at, _)| *at)
            .unwrap_or_else(|| panic!("{line:?} reached the upstream"))
    };
    // With one slot, the second request can reach IMDS only after the first one's 800 ms
    // upstream bound has run out; without the limit it would arrive within milliseconds.
    // Both instants are the upstream's own, so client scheduling cannot blur them.
    let gap = arrival("GET /second ") - arrival("GET /first ");
    assert!(
        gap >= Duration::from_millis(700),
        "served concurrently: {gap:?} apart"
    );
}

#[test]
fn oversized_request_heads_get_431() {
    let upstream = ScriptedUpstream::start(Script::Answer(
        Duration::ZERO,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ));
    let proxy = proxy(&upstream.url(), &["--max-header-bytes", "8192"]);
    let big = "a".repeat(10_000);
    let answer = request(
        proxy.addr(),
        "GET",
        "/latest/meta-data/",
        &[("X-Big", &big)],
    );
    assert_eq!(answer.status, 431, "{answer:?}");
    assert!(upstream.received().is_empty());
}

#[test]
fn a_slow_request_head_is_cut_off_at_the_header_bound() {
    let upstream = ScriptedUpstream::start(Script::Answer(
        Duration::ZERO,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ));
    let proxy = proxy(&upstream.url(), &["--header-read-timeout-ms", "300"]);
    let mut stream = TcpStream::connect(proxy.addr()).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let started = Instant::now();
    stream
        .write_all(b"GET /latest/meta-data/ HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest); // the proxy closes (or resets) the connection
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300),
        "closed before the bound: {waited:?}"
    );
    assert!(
        waited < Duration::from_millis(300) + Duration::from_secs(3),
        "{waited:?}"
    );
    let text = String::from_utf8_lossy(&rest);
    assert!(!text.contains(" 200 "), "no answer from IMDS: {text}");
    assert!(upstream.received().is_empty());
}

#[test]
fn an_oversized_body_gets_413() {
    let upstream = ScriptedUpstream::start(Script::Answer(
        Duration::ZERO,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ));
    let proxy = proxy(&upstream.url(), &["--max-request-body-bytes", "16"]);
    let body = "x".repeat(17);
    let request_bytes = format!(
        "PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = raw_request(proxy.addr(), request_bytes.as_bytes());
    assert_eq!(answer.status, 413, "{answer:?}");
    assert!(answer.text().contains("max_request_body_bytes"));
    let chunked = format!("PUT /latest/api/token HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n11\r\n{body}\r\n0\r\n\r\n");
    assert_eq!(raw_request(proxy.addr(), chunked.as_bytes()).status, 413);
    assert!(upstream.received().is_empty());
}

#[test]
fn malformed_requests_get_400() {
    let upstream = ScriptedUpstream::start(Script::Answer(
        Duration::ZERO,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
    ));
    let proxy = proxy(&upstream.url(), &[]);
    let absolute = raw_request(
        proxy.addr(),
        b"GET http://169.254.169.254/latest/meta-data/ HTTP/1.1\r\nHost: 169.254.169.254\r\n\r\n",
    );
    assert_eq!(absolute.status, 400, "{absolute:?}");
    let garbage = raw_request(proxy.addr(), b"NOT HTTP AT ALL\r\n\r\n");
    assert_eq!(garbage.status, 400, "{garbage:?}");
    assert!(upstream.received().is_empty());
}

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits_zero() {
    let upstream = ScriptedUpstream::start(Script::Answer(
        Duration::from_millis(400),
        b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nfinished",
    ));
    let mut proxy = proxy(&upstream.url(), &["--drain-timeout-ms", "5000"]);
    let addr = proxy.addr();
    let in_flight = std::thread::spawn(move || request(addr, "GET", "/latest/meta-data/", &[]));
    upstream.wait_received(1);
    proxy.signal("TERM");
    proxy.wait_log(|line| line["message"] == "stop requested");
    let answer = in_flight.join().unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.text(), "finished");
    let status = proxy.wait_exit();
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(
        TcpStream::connect(addr).is_err(),
        "the listener is closed after the stop"
    );
}

#[test]
fn the_drain_is_bounded() {
    let upstream = ScriptedUpstream::start(Script::Stall);
    let mut proxy = proxy(
        &upstream.url(),
        &[
            "--drain-timeout-ms",
            "200",
            "--upstream-response-timeout-ms",
            "30000",
        ],
    );
    let addr = proxy.addr();
    let _stuck = std::thread::spawn(move || {
        let mut stream = TcpStream::connect(addr).unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut sink = Vec::new();
        let _ = stream.read_to_end(&mut sink);
    });
    upstream.wait_received(1);
    proxy.signal("INT");
    let line = proxy.wait_log(|line| line["message"] == "stopped");
    assert_eq!(line["abandoned"], 1, "{line}");
    assert_eq!(proxy.wait_exit().code(), Some(0));
}

#[test]
fn the_log_has_one_line_per_request_and_never_a_token_or_body() {
    let sim = simulator(&[]);
    let mut proxy = proxy(&sim.url(), &[]);
    let token = token(proxy.addr());
    let creds = request(
        proxy.addr(),
        "GET",
        "/latest/meta-data/iam/security-credentials/imds-hop-proxy-demo",
        &[("X-aws-ec2-metadata-token", &token)],
    );
    let secret = serde_json::from_slice::<serde_json::Value>(&creds.body).unwrap()
        ["SecretAccessKey"]
        .as_str()
        .unwrap()
        .to_owned();
    let line = proxy.wait_log(|line| {
        line["message"] == "request"
            && line["path"]
                .as_str()
                .unwrap_or("")
                .ends_with("imds-hop-proxy-demo")
    });
    assert_eq!(line["status"], 200);
    assert_eq!(line["method"], "GET");
    assert!(line["client"].as_str().unwrap().starts_with("127.0.0.1:"));
    assert!(line["latency_us"].is_u64());
    let all = serde_json::to_string(proxy.logs()).unwrap();
    assert!(!all.contains(&token), "the token reached the log");
    assert!(!all.contains(&secret), "a credential reached the log");
    let started = proxy.wait_log(|line| line["message"] == "started");
    for key in [
        "upstream",
        "response_ttl",
        "max_connections",
        "upstream_response_timeout_ms",
    ] {
        assert!(
            !started[key].is_null(),
            "start-up line lacks {key}: {started}"
        );
    }
}

#[test]
fn invalid_configuration_exits_64_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out_of_range = dir.path().join("range.toml");
    std::fs::write(&out_of_range, "max_connections = 0\n").unwrap();
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "upstream_timeout = 5\n").unwrap();
    // (arguments, environment, what the message must name)
    type Case<'a> = (Vec<String>, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<Case> = vec![
        (
            vec!["run".into(), "--response-ttl".into(), "0".into()],
            vec![],
            "response_ttl",
        ),
        (
            vec!["run".into(), "--response-ttl".into(), "many".into()],
            vec![],
            "--response-ttl",
        ),
        (
            vec!["run".into(), "--upstream".into(), "https://x".into()],
            vec![],
            "upstream",
        ),
        (
            vec!["run".into()],
            vec![("IMDS_HOP_PROXY_DRAIN_TIMEOUT_MS", "700000")],
            "drain_timeout_ms",
        ),
        (
            vec![
                "run".into(),
                "--config".into(),
                out_of_range.display().to_string(),
            ],
            vec![],
            "max_connections",
        ),
        (
            vec![
                "run".into(),
                "--config".into(),
                unknown.display().to_string(),
            ],
            vec![],
            "upstream_timeout",
        ),
        (
            vec![
                "run".into(),
                "--config".into(),
                "/nonexistent/c.toml".into(),
            ],
            vec![],
            "/nonexistent/c.toml",
        ),
        (
            vec!["simulate".into(), "--hop-limit".into(), "65".into()],
            vec![],
            "--hop-limit",
        ),
        (
            vec!["run".into(), "--no-such-flag".into()],
            vec![],
            "--no-such-flag",
        ),
    ];
    for (args, env, key) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, _, stderr) = run_to_exit(&args, &env);
        assert_eq!(code, 64, "{args:?} {env:?}: {stderr}");
        assert!(
            stderr.contains(key),
            "{args:?}: {stderr:?} should name {key}"
        );
    }
}

#[test]
fn flags_override_environment_which_overrides_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(
        &file,
        "response_ttl = 11\nmax_connections = 12\ndrain_timeout_ms = 13\n",
    )
    .unwrap();
    let file = file.display().to_string();
    let mut proxy = Daemon::start_with_env(
        &[
            "run",
            "--no-redirect",
            "--listen",
            "127.0.0.1:0",
            "--config",
            &file,
            "--response-ttl",
            "21",
        ],
        &[
            ("IMDS_HOP_PROXY_RESPONSE_TTL", "31"),
            ("IMDS_HOP_PROXY_MAX_CONNECTIONS", "32"),
        ],
    );
    let started = proxy.wait_log(|line| line["message"] == "started");
    assert_eq!(started["response_ttl"], 21);
    assert_eq!(started["max_connections"], 32);
    assert_eq!(started["drain_timeout_ms"], 13);
}

#[test]
fn help_lists_every_setting_with_its_default_and_version_prints() {
    let (code, help, _) = run_to_exit(&["run", "--help"], &[]);
    assert_eq!(code, 0);
    for flag in [
        "--config",
        "--listen",
        "--upstream",
        "--response-ttl",
        "--max-connections",
        "--header-read-timeout-ms",
        "--max-header-bytes",
        "--max-request-body-bytes",
        "--max-response-body-bytes",
        "--upstream-connect-timeout-ms",
        "--upstream-response-timeout-ms",
        "--drain-timeout-ms",
        "--log-format",
        "--log-level",
    ] {
        assert!(help.contains(flag), "{flag} missing from run --help");
    }
    assert!(help.matches("[default: ").count() >= 13, "{help}");
    let (code, version, _) = run_to_exit(&["--version"], &[]);
    assert_eq!(code, 0);
    assert!(version.contains(env!("CARGO_PKG_VERSION")));
}
