//! The model is faithful: with no proxy at all, the namespace testbed behaves like an EC2
//! instance running Docker with the default hop limit of 1. The instance itself gets tokens and
//! credentials; containers on `docker0` and on a user-defined bridge time out on the token PUT
//! because the TTL-1 answer dies on the forward (a hop limit of 2 fixes it, so it is the TTL);
//! their TCP path works (IMDSv1 GETs pass); the neighbour on the subnet never reaches this
//! instance's IMDS; and the testbed leaves nothing behind, even when a test panics.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use imds_hop_proxy::simulator::{TokenMode, DEFAULT_SIM_ROLE};
use imds_hop_proxy::testbed::{
    plan, DockerFirewall, HttpError, HttpRequest, HttpResponse, ImdsSettings, IpFamily, Testbed,
    TestbedError, TestbedOptions, TOKEN_TTL_HEADER,
};

mod support;

use support::bed::{testbed, testbed_gate};

/// How long any wait for a condition may take.
const DEADLINE: Duration = Duration::from_secs(10);

/// Starts a testbed tagged like `support::bed::testbed` does, returning the error instead of
/// failing, for the test of a build that fails half-way.
fn start(short: &str, options: TestbedOptions) -> Result<Testbed, TestbedError> {
    Testbed::start(&tag(short), options)
}

fn tag(short: &str) -> String {
    format!("{short}-{}", std::process::id())
}

/// PUTs for a token from `ns` and returns it, failing the test on anything but 200.
fn token(bed: &Testbed, ns: &str, family: IpFamily) -> String {
    let answer = bed
        .http(ns, &HttpRequest::imds_token(family))
        .unwrap_or_else(|err| panic!("token PUT: {err}"));
    assert_eq!(
        answer.status, 200,
        "token PUT from {ns} ({family}): {answer:?}"
    );
    assert_eq!(answer.header(TOKEN_TTL_HEADER), Some("21600"), "{answer:?}");
    let token = answer.text();
    assert!(!token.is_empty(), "empty token from {ns} ({family})");
    token
}

fn get(bed: &Testbed, ns: &str, family: IpFamily, path: &str, token: Option<&str>) -> HttpResponse {
    bed.http(ns, &HttpRequest::imds_get(family, path, token))
        .unwrap_or_else(|err| panic!("GET {path}: {err}"))
}

/// The simulator's log lines about requests, parsed.
fn imds_requests(bed: &Testbed) -> Vec<serde_json::Value> {
    bed.imds_log()
        .iter()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|line| line["message"] == "request")
        .collect()
}

/// Namespaces of this process's testbed `short` that still exist.
fn leftover_namespaces(short: &str) -> Vec<String> {
    let output = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("run ip netns list");
    let prefix = format!("{}{}-", plan::NAMESPACE_PREFIX, tag(short));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| name.starts_with(&prefix))
        .map(str::to_owned)
        .collect()
}

fn pids_in(ns: &str) -> Vec<u32> {
    let output = Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .expect("run ip netns pids");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .map(|pid| pid.parse().expect("ip netns pids prints numbers"))
        .collect()
}

/// True while `pid` runs (a zombie has finished running).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !state.starts_with('Z') && !state.starts_with('X')
        })
        .unwrap_or(false)
}

fn wait_until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + DEADLINE;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_instance_gets_a_token_and_credentials_over_ipv4_and_ipv6() {
    let Some(bed) = testbed("host", |_| {}) else {
        return;
    };
    for family in IpFamily::BOTH {
        let token = token(&bed, bed.host_ns(), family);
        let listing = get(
            &bed,
            bed.host_ns(),
            family,
            "/latest/meta-data/iam/security-credentials/",
            Some(&token),
        );
        assert_eq!(listing.status, 200, "{family}: {listing:?}");
        let role = listing.text().lines().next().unwrap_or_default().to_owned();
        assert_eq!(role, DEFAULT_SIM_ROLE, "{family}");
        let credentials = get(
            &bed,
            bed.host_ns(),
            family,
            &format!("/latest/meta-data/iam/security-credentials/{role}"),
            Some(&token),
        );
        assert_eq!(credentials.status, 200, "{family}: {credentials:?}");
        let json: serde_json::Value =
            serde_json::from_slice(&credentials.body).expect("credentials are JSON");
        assert_eq!(json["Code"], "Success", "{family}");
        assert_eq!(json["Type"], "AWS-HMAC", "{family}");
        for field in ["AccessKeyId", "SecretAccessKey", "Token", "Expiration"] {
            assert!(
                json[field].as_str().is_some_and(|value| !value.is_empty()),
                "{family}: {field} missing"
            );
        }
    }
    // The instance's requests reach IMDS from its ENI address, unchanged.
    let clients: Vec<String> = imds_requests(&bed)
        .iter()
        .filter_map(|line| line["client"].as_str().map(str::to_owned))
        .collect();
    assert!(
        clients.iter().any(|c| c.starts_with("10.99.0.10:")),
        "{clients:?}"
    );
    assert!(
        clients.iter().any(|c| c.starts_with("[fd00:99::10]:")),
        "{clients:?}"
    );
}

#[test]
fn containers_time_out_on_the_token_put_at_hop_limit_1() {
    let Some(bed) = testbed("ttl1", |_| {}) else {
        return;
    };
    let cases: Vec<(&str, IpFamily)> = [bed.c0_ns(), bed.c1_ns()]
        .into_iter()
        .flat_map(|ns| IpFamily::BOTH.map(|family| (ns, family)))
        .collect();
    // In parallel: each case costs one client timeout.
    let results: Vec<_> = thread::scope(|scope| {
        let handles: Vec<_> = cases
            .iter()
            .map(|(ns, family)| {
                let bed = &bed;
                scope.spawn(move || bed.http(ns, &HttpRequest::imds_token(*family)))
            })
            .collect();
        handles
            .into_iter()
            .map(|handle| handle.join().expect("client thread"))
            .collect()
    });
    for ((ns, family), result) in cases.iter().zip(results) {
        match result {
            Err(HttpError::Timeout { .. }) => {}
            other => panic!("token PUT from {ns} ({family}): expected a timeout, got {other:?}"),
        }
    }
    // The requests did reach IMDS (masqueraded to the ENI address) and were answered with the
    // hop limit as TTL: the answers died on the way back.
    let puts: Vec<_> = imds_requests(&bed)
        .into_iter()
        .filter(|line| line["method"] == "PUT" && line["status"] == 200)
        .collect();
    assert_eq!(puts.len(), cases.len(), "{puts:#?}");
    for line in &puts {
        assert_eq!(line["hop_limited"], true, "{line}");
        let client = line["client"].as_str().unwrap_or_default();
        assert!(
            client.starts_with("10.99.0.10:") || client.starts_with("[fd00:99::10]:"),
            "{line}"
        );
    }
}

#[test]
fn a_hop_limit_of_2_lets_the_container_token_through() {
    let Some(bed) = testbed("ttl2", |_| {}) else {
        return;
    };
    bed.set_imds(ImdsSettings {
        hop_limit: 2,
        tokens: TokenMode::Required,
    })
    .expect("restart IMDS with hop limit 2");
    for ns in [bed.c0_ns(), bed.c1_ns()] {
        for family in IpFamily::BOTH {
            let token = token(&bed, ns, family);
            let answer = get(
                &bed,
                ns,
                family,
                "/latest/meta-data/instance-id",
                Some(&token),
            );
            assert_eq!(answer.status, 200, "{ns} ({family}): {answer:?}");
        }
    }
}

/// With IMDSv1 allowed, GETs (normal TTL) from every forwarded network get answers: the TCP
/// path and Docker's masquerade work, only the TTL-limited token answer is lost.
fn imdsv1_works_from_forwarded_networks(short: &str, firewall: DockerFirewall) {
    let Some(bed) = testbed(short, |options| {
        options.firewall = firewall;
        options.imds.tokens = TokenMode::Optional;
    }) else {
        return;
    };
    for ns in [bed.c0_ns(), bed.c1_ns(), bed.vpn_ns()] {
        for family in IpFamily::BOTH {
            let answer = get(&bed, ns, family, "/latest/meta-data/", None);
            assert_eq!(
                answer.status, 200,
                "{firewall:?}, {ns} ({family}): {answer:?}"
            );
            assert!(answer.text().contains("iam/"), "{answer:?}");
        }
    }
}

#[test]
fn imdsv1_works_from_containers_and_vpn_with_iptables_nft() {
    imdsv1_works_from_forwarded_networks("v1nft", DockerFirewall::IptablesNft);
}

#[test]
fn imdsv1_works_from_containers_and_vpn_with_iptables_legacy() {
    imdsv1_works_from_forwarded_networks("v1leg", DockerFirewall::IptablesLegacy);
}

#[test]
fn imdsv1_works_from_containers_and_vpn_with_docker_nftables() {
    imdsv1_works_from_forwarded_networks("v1nfd", DockerFirewall::Nft);
}

#[test]
fn a_bridge_added_later_behaves_like_dockers() {
    let Some(bed) = testbed("late", |options| {
        options.firewall = DockerFirewall::Nft;
        options.imds.tokens = TokenMode::Optional;
    }) else {
        return;
    };
    let ns = bed
        .add_bridge(
            "br-5e1f00d0cafe",
            "172.19.0.0/16".parse().unwrap(),
            "fd00:19::/64".parse().unwrap(),
        )
        .expect("add a bridge");
    let route = bed
        .run_in(&ns, "ip", &["-4", "route", "show", "default"], DEADLINE)
        .expect("ip route");
    assert!(route.stdout.contains("via 172.19.0.1"), "{route:?}");
    thread::scope(|scope| {
        for family in IpFamily::BOTH {
            let (bed, ns) = (&bed, &ns);
            scope.spawn(move || {
                let answer = get(bed, ns, family, "/latest/meta-data/", None);
                assert_eq!(answer.status, 200, "IMDSv1 GET ({family}): {answer:?}");
                let put = bed.http(ns, &HttpRequest::imds_token(family));
                assert!(
                    matches!(put, Err(HttpError::Timeout { .. })),
                    "token PUT ({family}): {put:?}"
                );
            });
        }
    });
}

#[test]
fn the_lan_neighbour_never_reaches_this_instances_imds() {
    let Some(bed) = testbed("lan", |options| options.imds.tokens = TokenMode::Optional) else {
        return;
    };
    // Its route to IMDS is its own subnet router, as on EC2: the path never crosses our host.
    for (family, target) in [("-4", "169.254.169.254"), ("-6", "fd00:ec2::254")] {
        let route = bed
            .run_in(
                bed.lan_ns(),
                "ip",
                &[family, "route", "get", target],
                DEADLINE,
            )
            .expect("ip route get");
        let router = if family == "-4" {
            "via 10.99.0.1 "
        } else {
            "via fd00:99::1 "
        };
        assert!(route.stdout.contains(router), "{route:?}");
    }
    for family in IpFamily::BOTH {
        let result = bed.http(
            bed.lan_ns(),
            &HttpRequest::imds_get(family, "/latest/meta-data/", None),
        );
        assert!(
            matches!(result, Err(HttpError::Refused { .. })),
            "GET from the neighbour ({family}): {result:?}"
        );
    }
    assert!(imds_requests(&bed).is_empty(), "{:#?}", imds_requests(&bed));
}

#[test]
fn dropping_the_testbed_kills_its_processes_and_deletes_its_namespaces() {
    let Some(bed) = testbed("drop", |_| {}) else {
        return;
    };
    let mut sleeper = bed
        .spawn_in(bed.c0_ns(), "sleep", &["600"])
        .expect("spawn sleep in c0");
    let namespaces = leftover_namespaces("drop");
    assert_eq!(namespaces.len(), 6, "{namespaces:?}");
    let simulator = pids_in(bed.imds_ns());
    assert_eq!(simulator.len(), 1, "one simulator: {simulator:?}");
    wait_until("sleep to enter c0", || pids_in(bed.c0_ns()).len() == 1);
    drop(bed);
    assert_eq!(leftover_namespaces("drop"), Vec::<String>::new());
    wait_until("the spawned process to be killed", || {
        sleeper.try_wait().expect("try_wait").is_some()
    });
    assert!(
        !running(simulator[0]),
        "simulator {} still runs",
        simulator[0]
    );
}

#[test]
fn a_panicking_test_still_removes_its_testbed() {
    if testbed_gate() {
        return;
    }
    let outcome = std::panic::catch_unwind(|| {
        let _bed = testbed("panic", |_| {});
        assert!(!leftover_namespaces("panic").is_empty());
        panic!("deliberate failure inside a test");
    });
    assert!(outcome.is_err());
    assert_eq!(leftover_namespaces("panic"), Vec::<String>::new());
}

#[test]
fn a_build_that_fails_half_way_removes_what_it_made() {
    if testbed_gate() {
        return;
    }
    // `false` is no simulator: everything is built, then IMDS fails to start.
    let options = TestbedOptions::new("/bin/false");
    let err = start("half", options).expect_err("the simulator cannot start");
    assert!(matches!(err, TestbedError::SimulatorStart { .. }), "{err}");
    assert!(err.to_string().contains("did not start"), "{err}");
    assert_eq!(leftover_namespaces("half"), Vec::<String>::new());
}
