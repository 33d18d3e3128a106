//! The whole product on a real kernel: the namespace model of an EC2 host running Docker (IMDS
//! answering token PUTs with TTL 1 and requiring tokens), with `imds-hop-proxy run` in the host
//! namespace installing its own rules. Each property is proven for every firewall backend, with
//! the model's Docker NAT written by the same tool so auto-detection is exercised too.
//!
//! Needs root; see `support::bed::testbed` for the opt-out.

mod support;

use std::time::Duration;

use imds_hop_proxy::testbed::{DockerFirewall, HttpRequest, IpFamily, Testbed};
use support::bed::*;
use support::{wait_until, Daemon};

const FAMILIES: [IpFamily; 2] = [IpFamily::V4, IpFamily::V6];

/// Stamps out one test per backend for a property `fn(DockerFirewall, &str)`.
macro_rules! per_backend {
    ($($property:ident),* $(,)?) => {$(
        mod $property {
            use imds_hop_proxy::testbed::DockerFirewall;
            #[test]
            fn nft() {
                super::$property(DockerFirewall::Nft, "nft");
            }
            #[test]
            fn iptables_nft() {
                super::$property(DockerFirewall::IptablesNft, "iptables-nft");
            }
            #[test]
            fn iptables_legacy() {
                super::$property(DockerFirewall::IptablesLegacy, "iptables-legacy");
            }
        }
    )*};
}

per_backend!(
    containers_on_both_bridges_get_tokens_and_credentials,
    outsiders_get_no_imds_data,
    a_clean_stop_leaves_no_rule_and_containers_back_at_the_default,
    rules_removed_by_someone_else_come_back,
);

/// A testbed whose Docker uses `firewall`, with the proxy running and its rules in place,
/// auto-detected to be `backend`.
fn bed_with_proxy(
    short: &str,
    firewall: DockerFirewall,
    backend: &str,
    extra: &[&str],
) -> Option<(Testbed, Daemon)> {
    let bed = testbed(
        &format!(
            "{short}{}",
            &backend[..3.min(backend.len())].replace('-', "")
        ),
        |options| {
            options.firewall = firewall;
        },
    )?;
    let mut proxy = proxy_in_host(&bed, extra);
    let started = proxy.wait_log(|line| line["message"] == "started");
    assert_eq!(
        started["redirect"], backend,
        "auto-detection follows Docker: {started}"
    );
    Some((bed, proxy))
}

fn containers_on_both_bridges_get_tokens_and_credentials(firewall: DockerFirewall, backend: &str) {
    let short = if backend == "iptables-legacy" {
        "svl"
    } else {
        "sv"
    };
    let Some((bed, mut proxy)) = bed_with_proxy(short, firewall, backend, &[]) else {
        return;
    };
    for ns in [bed.c0_ns(), bed.c1_ns()] {
        for family in FAMILIES {
            let key = fetch_credentials(&bed, ns, family);
            assert!(key.starts_with("ASIA"), "{key}");
        }
    }
    // The proxy answered them (not some other path): one PUT per container and family.
    let puts = proxy
        .logs()
        .iter()
        .filter(|line| {
            line["message"] == "request" && line["method"] == "PUT" && line["status"] == 200
        })
        .count();
    assert_eq!(puts, 4, "{:#?}", proxy.logs());
}

fn outsiders_get_no_imds_data(firewall: DockerFirewall, backend: &str) {
    let short = if backend == "iptables-legacy" {
        "oul"
    } else {
        "ou"
    };
    let Some((bed, _proxy)) = bed_with_proxy(short, firewall, backend, &[]) else {
        return;
    };
    let probe = |ns: &str, url: &str| {
        let request = HttpRequest::get(url).timeout(PROBE_TIMEOUT);
        match bed.http(ns, &request) {
            Ok(answer) => panic!("{url} from {ns} got an answer: {answer:?}"),
            Err(err) => err,
        }
    };
    // The LAN neighbour, straight at the proxy's port on the host's ENI addresses.
    probe(bed.lan_ns(), "http://10.99.0.10:8169/latest/meta-data/");
    probe(bed.lan_ns(), "http://[fd00:99::10]:8169/latest/meta-data/");
    // A VPN peer on an interface outside the allowlist: not redirected, so its token PUT dies
    // on the hop limit as before, and the port is closed to it.
    for family in FAMILIES {
        assert!(
            token_put_times_out(&bed, bed.vpn_ns(), family),
            "vpn {family}"
        );
    }
    probe(bed.vpn_ns(), "http://10.8.0.1:8169/latest/meta-data/");
    // A container connecting to the port itself instead of to IMDS.
    probe(bed.c0_ns(), "http://172.17.0.1:8169/latest/api/token");
    // The host itself.
    probe(bed.host_ns(), "http://127.0.0.1:8169/latest/meta-data/");
    probe(bed.host_ns(), "http://[::1]:8169/latest/meta-data/");
    probe(bed.host_ns(), "http://10.99.0.10:8169/latest/meta-data/");
}

fn a_clean_stop_leaves_no_rule_and_containers_back_at_the_default(
    firewall: DockerFirewall,
    backend: &str,
) {
    let short = if backend == "iptables-legacy" {
        "stl"
    } else {
        "st"
    };
    let Some((bed, mut proxy)) = bed_with_proxy(short, firewall, backend, &[]) else {
        return;
    };
    fetch_credentials(&bed, bed.c0_ns(), IpFamily::V4);
    assert_eq!(rules(&bed, &["status", "--rules-backend", backend]).0, 0);
    proxy.signal("TERM");
    assert_eq!(proxy.wait_exit().code(), Some(0));
    let (code, text) = rules(&bed, &["status", "--rules-backend", backend]);
    assert_eq!(code, 3, "{text}");
    let ours: Vec<&str> = text.lines().filter(|line| !line.starts_with('#')).collect();
    assert!(ours.is_empty(), "rules left behind: {text}");
    for family in FAMILIES {
        assert!(
            token_put_times_out(&bed, bed.c0_ns(), family),
            "after the stop, c0 ({family}) is back at the host's default"
        );
    }
}

fn rules_removed_by_someone_else_come_back(firewall: DockerFirewall, backend: &str) {
    let short = if backend == "iptables-legacy" {
        "rbl"
    } else {
        "rb"
    };
    let Some((bed, mut proxy)) = bed_with_proxy(short, firewall, backend, &[]) else {
        return;
    };
    fetch_credentials(&bed, bed.c0_ns(), IpFamily::V4);
    let wipe: &[&str] = match backend {
        "nft" => &["nft", "flush", "table", "inet", "imds_hop_proxy"],
        "iptables-nft" => &["iptables-nft", "-t", "nat", "-F"],
        _ => &["iptables-legacy", "-w", "-t", "nat", "-F"],
    };
    let wiped = bed
        .run_in(bed.host_ns(), wipe[0], &wipe[1..], Duration::from_secs(10))
        .expect("wipe the rules");
    assert!(wiped.status.success(), "{wiped:?}");
    proxy.wait_log(|line| line["message"] == "redirect rules restored");
    for family in FAMILIES {
        fetch_credentials(&bed, bed.c0_ns(), family);
    }
    assert_eq!(rules(&bed, &["status", "--rules-backend", backend]).0, 0);
}

#[test]
fn a_bridge_created_after_the_proxy_started_is_covered() {
    let Some((bed, _proxy)) =
        bed_with_proxy("nb", DockerFirewall::IptablesNft, "iptables-nft", &[])
    else {
        return;
    };
    let c2 = bed
        .add_bridge(
            "br-0123456789ab",
            "172.19.0.0/16".parse().unwrap(),
            "fd00:19::/64".parse().unwrap(),
        )
        .expect("add a bridge");
    for family in FAMILIES {
        fetch_credentials(&bed, &c2, family);
    }
}

#[test]
fn the_aws_sdk_in_a_container_gets_credentials_over_ipv4_and_ipv6() {
    let Some((bed, _proxy)) = bed_with_proxy("sdk", DockerFirewall::Nft, "nft", &[]) else {
        return;
    };
    for endpoint in ["http://169.254.169.254", "http://[fd00:ec2::254]"] {
        let key = in_netns(bed.c0_ns(), move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async move {
                use aws_config::imds::credentials::ImdsCredentialsProvider;
                use aws_config::provider_config::ProviderConfig;
                use aws_credential_types::provider::ProvideCredentials;
                let config = ProviderConfig::without_region()
                    .with_http_client(aws_smithy_http_client::Builder::new().build_http());
                let client = aws_config::imds::Client::builder()
                    .configure(&config)
                    .endpoint(endpoint)
                    .expect("endpoint")
                    .build();
                let credentials = ImdsCredentialsProvider::builder()
                    .configure(&config)
                    .imds_client(client)
                    .build()
                    .provide_credentials()
                    .await
                    .unwrap_or_else(|err| panic!("credentials via {endpoint}: {err:?}"));
                credentials.access_key_id().to_owned()
            })
        });
        assert!(key.starts_with("ASIA"), "{endpoint}: {key}");
    }
}

#[test]
fn without_the_input_guard_the_proxy_still_refuses_connections_that_were_not_redirected() {
    // A long check interval keeps the keeper from restoring the guard during the probe.
    let Some((bed, _proxy)) = bed_with_proxy(
        "gd",
        DockerFirewall::Nft,
        "nft",
        &["--rules-check-interval-ms", "5000"],
    ) else {
        return;
    };
    let flushed = bed
        .run_in(
            bed.host_ns(),
            "nft",
            &["flush", "chain", "inet", "imds_hop_proxy", "port_guard"],
            Duration::from_secs(10),
        )
        .expect("flush the guard chain");
    assert!(flushed.status.success(), "{flushed:?}");
    let answer = wait_until("an answer from the unguarded port", || {
        bed.http(
            bed.host_ns(),
            &HttpRequest::get("http://127.0.0.1:8169/latest/meta-data/").timeout(PROBE_TIMEOUT),
        )
        .ok()
    });
    assert_eq!(answer.status, 403, "{answer:?}");
    assert!(
        answer
            .text()
            .contains("did not come through the IMDS redirect rule"),
        "{answer:?}"
    );
    // Redirected container traffic is still served.
    fetch_credentials(&bed, bed.c0_ns(), IpFamily::V4);
}
