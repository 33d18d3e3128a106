//! The firewall rules of the model, as text: Docker's NAT for its bridges in the flavour Docker
//! is configured with, the host's own NAT for the VPN, and the IMDS side's "answer only this
//! instance" filter. Pure: it says which tool to run with which arguments; `mod.rs` runs them.

use super::plan::{Ipv4Subnet, Ipv6Subnet, HOST_ENI_V4, HOST_ENI_V6, IMDS_PORT, IMDS_V4, IMDS_V6};

/// How Docker on the modelled host installs its rules: the three set-ups seen in the field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DockerFirewall {
    /// `iptables` backed by nftables (`iptables-nft`): Debian 11+, Ubuntu 20.10+, Amazon Linux
    /// 2023. The rules land in nftables tables `ip nat` / `ip6 nat`.
    #[default]
    IptablesNft,
    /// `iptables-legacy`: older distributions and hosts switched back with
    /// `update-alternatives`; the rules are invisible to `nft list ruleset`.
    IptablesLegacy,
    /// Docker 29's `firewall-backend: nftables`: its own tables `ip docker-bridges` and
    /// `ip6 docker-bridges`, no iptables rules at all.
    Nft,
}

impl DockerFirewall {
    /// Every flavour, for tests that must hold for all of them.
    pub const ALL: [DockerFirewall; 3] = [
        DockerFirewall::IptablesNft,
        DockerFirewall::IptablesLegacy,
        DockerFirewall::Nft,
    ];

    /// The programs this flavour runs, so a missing one is reported before anything is built.
    pub fn tools(self) -> &'static [&'static str] {
        match self {
            DockerFirewall::IptablesNft => &["iptables-nft", "ip6tables-nft"],
            DockerFirewall::IptablesLegacy => &["iptables-legacy", "ip6tables-legacy"],
            DockerFirewall::Nft => &["nft"],
        }
    }

    fn iptables(self) -> Option<(&'static str, &'static str)> {
        match self {
            DockerFirewall::IptablesNft => Some(("iptables-nft", "ip6tables-nft")),
            DockerFirewall::IptablesLegacy => Some(("iptables-legacy", "ip6tables-legacy")),
            DockerFirewall::Nft => None,
        }
    }
}

/// One program run in the host namespace: a tool and its arguments, or an `nft -f -` script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Invocation {
    /// `tool args…`.
    Tool {
        tool: &'static str,
        args: Vec<String>,
    },
    /// `nft -f -` with this script on stdin (atomic: all of it or none).
    NftScript(String),
}

/// What Docker creates when it starts, before any network: nothing for iptables (the built-in
/// chains exist), the two tables with their dispatch maps for nftables.
pub(crate) fn docker_setup(firewall: DockerFirewall) -> Vec<Invocation> {
    match firewall {
        DockerFirewall::Nft => vec![Invocation::NftScript(
            ["ip", "ip6"]
                .iter()
                .map(|family| {
                    format!(
                        "table {family} docker-bridges {{\n\
                         \tmap nat-postrouting-out-jumps {{ type ifname : verdict; }}\n\
                         \tchain nat-POSTROUTING {{\n\
                         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
                         \t\tiifname vmap @nat-postrouting-out-jumps\n\
                         \t}}\n\
                         }}\n"
                    )
                })
                .collect(),
        )],
        DockerFirewall::IptablesNft | DockerFirewall::IptablesLegacy => Vec::new(),
    }
}

/// Docker's masquerade for one bridge network: traffic from the subnet leaving by any other
/// interface gets the host's address (`-s SUBNET ! -o BRIDGE -j MASQUERADE`).
pub(crate) fn docker_masquerade(
    firewall: DockerFirewall,
    bridge: &str,
    v4: Ipv4Subnet,
    v6: Ipv6Subnet,
) -> Vec<Invocation> {
    match firewall.iptables() {
        Some((iptables, ip6tables)) => vec![
            iptables_masquerade(iptables, &v4.to_string(), &["!", "-o", bridge]),
            iptables_masquerade(ip6tables, &v6.to_string(), &["!", "-o", bridge]),
        ],
        None => {
            let script = [("ip", "ip", v4.to_string()), ("ip6", "ip6", v6.to_string())]
                .iter()
                .map(|(family, match_family, subnet)| {
                    let chain = format!("nat-postrouting-out__{bridge}");
                    format!(
                        "add chain {family} docker-bridges {chain}\n\
                         add rule {family} docker-bridges {chain} oifname != \"{bridge}\" \
                         {match_family} saddr {subnet} counter masquerade comment \"MASQUERADE\"\n\
                         add element {family} docker-bridges nat-postrouting-out-jumps \
                         {{ \"{bridge}\" : jump {chain} }}\n"
                    )
                })
                .collect();
            vec![Invocation::NftScript(script)]
        }
    }
}

/// The host administrator's NAT for the VPN peers it routes out of `uplink`, written with the
/// same tool family Docker uses on that host.
pub(crate) fn vpn_masquerade(
    firewall: DockerFirewall,
    uplink: &str,
    v4: Ipv4Subnet,
    v6: Ipv6Subnet,
) -> Vec<Invocation> {
    match firewall.iptables() {
        Some((iptables, ip6tables)) => vec![
            iptables_masquerade(iptables, &v4.to_string(), &["-o", uplink]),
            iptables_masquerade(ip6tables, &v6.to_string(), &["-o", uplink]),
        ],
        None => vec![Invocation::NftScript(format!(
            "table inet vpn-nat {{\n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\toifname \"{uplink}\" ip saddr {v4} masquerade\n\
             \t\toifname \"{uplink}\" ip6 saddr {v6} masquerade\n\
             \t}}\n\
             }}\n"
        ))],
    }
}

fn iptables_masquerade(tool: &'static str, source: &str, out: &[&str]) -> Invocation {
    let mut args: Vec<String> = ["-w", "-t", "nat", "-A", "POSTROUTING", "-s", source]
        .iter()
        .map(|arg| (*arg).to_owned())
        .collect();
    args.extend(out.iter().map(|arg| (*arg).to_owned()));
    args.extend(["-j".to_owned(), "MASQUERADE".to_owned()]);
    Invocation::Tool { tool, args }
}

/// The filter in the IMDS namespace: like the real service, IMDS answers only the instance's
/// own ENI address. Others get a TCP reset, so a probe fails at once instead of hanging.
pub(crate) fn imds_access_script() -> String {
    format!(
        "table inet imds-access {{\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter; policy accept;\n\
         \t\tip daddr {IMDS_V4} tcp dport {IMDS_PORT} ip saddr != {HOST_ENI_V4} reject with tcp reset\n\
         \t\tip6 daddr {IMDS_V6} tcp dport {IMDS_PORT} ip6 saddr != {HOST_ENI_V6} reject with tcp reset\n\
         \t}}\n\
         }}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::super::plan::{DOCKER0_V4, DOCKER0_V6, VPN_V4, VPN_V6};
    use super::*;

    #[test]
    fn iptables_flavours_write_dockers_masquerade_rule() {
        let rules = docker_masquerade(
            DockerFirewall::IptablesLegacy,
            "docker0",
            DOCKER0_V4,
            DOCKER0_V6,
        );
        assert_eq!(
            rules[0],
            Invocation::Tool {
                tool: "iptables-legacy",
                args: "-w -t nat -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE"
                    .split(' ')
                    .map(str::to_owned)
                    .collect(),
            }
        );
        let Invocation::Tool { tool, args } = &rules[1] else {
            panic!("{rules:?}")
        };
        assert_eq!(*tool, "ip6tables-legacy");
        assert!(args.contains(&"fd00:17::/64".to_owned()));
        assert!(docker_setup(DockerFirewall::IptablesNft).is_empty());
    }

    #[test]
    fn nft_flavour_mirrors_docker_29_tables() {
        let setup = docker_setup(DockerFirewall::Nft);
        let [Invocation::NftScript(setup)] = setup.as_slice() else {
            panic!("{setup:?}")
        };
        assert!(setup.contains("table ip docker-bridges"));
        assert!(setup.contains("table ip6 docker-bridges"));
        let rules = docker_masquerade(
            DockerFirewall::Nft,
            "br-0123456789ab",
            DOCKER0_V4,
            DOCKER0_V6,
        );
        let [Invocation::NftScript(script)] = rules.as_slice() else {
            panic!("{rules:?}")
        };
        assert!(script.contains(
            "add rule ip docker-bridges nat-postrouting-out__br-0123456789ab \
             oifname != \"br-0123456789ab\" ip saddr 172.17.0.0/16 counter masquerade"
        ));
        assert!(script.contains("ip6 saddr fd00:17::/64"));
        assert!(
            script.contains("{ \"br-0123456789ab\" : jump nat-postrouting-out__br-0123456789ab }")
        );
    }

    #[test]
    fn vpn_masquerade_leaves_by_the_uplink_only() {
        let rules = vpn_masquerade(DockerFirewall::IptablesNft, "eth0", VPN_V4, VPN_V6);
        let Invocation::Tool { args, .. } = &rules[0] else {
            panic!("{rules:?}")
        };
        assert_eq!(
            args.join(" "),
            "-w -t nat -A POSTROUTING -s 10.8.0.0/24 -o eth0 -j MASQUERADE"
        );
        let rules = vpn_masquerade(DockerFirewall::Nft, "eth0", VPN_V4, VPN_V6);
        let [Invocation::NftScript(script)] = rules.as_slice() else {
            panic!("{rules:?}")
        };
        assert!(script.contains("oifname \"eth0\" ip saddr 10.8.0.0/24 masquerade"));
    }

    #[test]
    fn imds_answers_only_the_instance() {
        let script = imds_access_script();
        assert!(script.contains(
            "ip daddr 169.254.169.254 tcp dport 80 ip saddr != 10.99.0.10 reject with tcp reset"
        ));
        assert!(script.contains(
            "ip6 daddr fd00:ec2::254 tcp dport 80 ip6 saddr != fd00:99::10 reject with tcp reset"
        ));
    }
}
