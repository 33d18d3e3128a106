//! The exact rules each backend needs, as text. Pure: no I/O, so every line is unit-tested.
//!
//! Two pieces per backend, and why they look the way they do:
//! - **redirect** (nat, prerouting): TCP to IMDS port 80 arriving on an allowed interface goes
//!   to the proxy port with REDIRECT, which rewrites the destination to the address of the
//!   *incoming* interface (e.g. docker0's 172.17.0.1). Never DNAT to 127.0.0.1: that needs
//!   `route_localnet=1` (CVE-2020-8558). Exempted interfaces `return` first, so their packets
//!   continue unchanged down the forward path and meet the rule that blocks them there.
//! - **guard** (filter, input): the proxy port accepts only connections whose conntrack entry
//!   says they were NATed from IMDS port 80, and drops the rest: from the LAN, from other
//!   interfaces, from the host itself. The proxy must listen on an address the redirect reaches
//!   (a bridge address or the wildcard), and the guard is what makes that safe.
//!
//! Everything lives in a table (nft) or chains (iptables) of our own, so replacing it is
//! idempotent and nobody else's rules are touched.

use std::fmt;

use super::{Backend, ExemptInterface, InterfacePattern, RuleSpec};

/// IMDS's addresses and port: one definition for the whole crate, in the request policy.
pub use crate::policy::{IMDS_IPV4 as IMDS_V4, IMDS_IPV6 as IMDS_V6, IMDS_PORT};

/// Our nft table (family `inet`, so one table carries both address families).
pub const NFT_TABLE: &str = "imds_hop_proxy";
/// Our nat chain in [`NFT_TABLE`]. (`redirect` alone is an nft keyword and cannot be a name.)
pub const NFT_REDIRECT_CHAIN: &str = "imds_redirect";
/// Our input filter chain in [`NFT_TABLE`].
pub const NFT_GUARD_CHAIN: &str = "port_guard";
/// Hook line of [`NFT_REDIRECT_CHAIN`]: before Docker's DNAT chains (priority dstnat), so a
/// connection to IMDS is bound to our REDIRECT first.
pub const NFT_REDIRECT_HOOK: &str = "type nat hook prerouting priority dstnat - 10; policy accept;";
/// Hook line of [`NFT_GUARD_CHAIN`]: before the usual filter chains. Our drop is final wherever
/// it runs; our accept only ends our chain, so other tables still get their say (never widens).
pub const NFT_GUARD_HOOK: &str = "type filter hook input priority filter - 10; policy accept;";

/// Our iptables chain in the nat table, jumped to from the first rule of PREROUTING.
pub const IPT_REDIRECT_CHAIN: &str = "IMDS-HOP-PROXY";
/// Our iptables chain in the filter table, jumped to from the first rule of INPUT.
pub const IPT_GUARD_CHAIN: &str = "IMDS-HOP-PROXY-GUARD";
/// Seconds `iptables -w` waits for the xtables lock held by another tool (Docker, firewalld).
pub const IPTABLES_LOCK_WAIT_S: u32 = 5;

/// IPv4 or IPv6: which IMDS address, which iptables binaries, which conntrack family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    /// IPv4 (`iptables`, 169.254.169.254).
    V4,
    /// IPv6 (`ip6tables`, fd00:ec2::254).
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// IMDS's address in this family.
    pub fn imds(self) -> std::net::IpAddr {
        match self {
            Family::V4 => IMDS_V4.into(),
            Family::V6 => IMDS_V6.into(),
        }
    }

    /// The nft payload keyword for this family's header (`ip` / `ip6`).
    fn nft_keyword(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    /// IMDS as a host prefix, the way `iptables-save` prints a `-d` match.
    fn imds_host_prefix(self) -> String {
        match self {
            Family::V4 => format!("{IMDS_V4}/32"),
            Family::V6 => format!("{IMDS_V6}/128"),
        }
    }

    /// The enabled families of `spec`, IPv4 first.
    pub fn enabled(spec: &RuleSpec) -> Vec<Family> {
        Family::ALL
            .into_iter()
            .filter(|f| match f {
                Family::V4 => spec.ipv4,
                Family::V6 => spec.ipv6,
            })
            .collect()
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// The binaries of one iptables flavour for one family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IptablesTools {
    /// `iptables-nft`, `ip6tables-legacy`, ...
    pub cli: &'static str,
    /// The matching `-save`.
    pub save: &'static str,
    /// The matching `-restore`.
    pub restore: &'static str,
}

/// The binaries of `backend` (an iptables flavour) for `family`; `None` for [`Backend::Nft`].
pub fn iptables_tools(backend: Backend, family: Family) -> Option<IptablesTools> {
    let tools = match (backend, family) {
        (Backend::Nft, _) => return None,
        (Backend::IptablesNft, Family::V4) => {
            ("iptables-nft", "iptables-nft-save", "iptables-nft-restore")
        }
        (Backend::IptablesNft, Family::V6) => (
            "ip6tables-nft",
            "ip6tables-nft-save",
            "ip6tables-nft-restore",
        ),
        (Backend::IptablesLegacy, Family::V4) => (
            "iptables-legacy",
            "iptables-legacy-save",
            "iptables-legacy-restore",
        ),
        (Backend::IptablesLegacy, Family::V6) => (
            "ip6tables-legacy",
            "ip6tables-legacy-save",
            "ip6tables-legacy-restore",
        ),
    };
    Some(IptablesTools {
        cli: tools.0,
        save: tools.1,
        restore: tools.2,
    })
}

/// The chains of one iptables family, as `iptables-save` prints their rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IptablesFamilyPlan {
    /// Which family.
    pub family: Family,
    /// `-A IMDS-HOP-PROXY ...` lines of the nat table, in order.
    pub redirect_rules: Vec<String>,
    /// `-A IMDS-HOP-PROXY-GUARD ...` lines of the filter table, in order.
    pub guard_rules: Vec<String>,
}

/// The jump from a built-in chain to ours, exactly as `iptables-save` prints it.
pub fn jump_rule(builtin: &str, ours: &str) -> String {
    format!("-A {builtin} -j {ours}")
}

impl IptablesFamilyPlan {
    /// The `iptables-restore --noflush` input that replaces our chains and puts each jump first,
    /// in one transaction per table. Declaring a chain (`:NAME - [0:0]`) under `--noflush`
    /// creates it or flushes it, so no rule is ever doubled. `existing_*_jumps` copies of the
    /// jump found by the caller are deleted in the same transaction, so there is no moment
    /// without a jump and never two.
    pub fn restore_script(
        &self,
        existing_redirect_jumps: usize,
        existing_guard_jumps: usize,
    ) -> String {
        let mut s = String::new();
        for (table, builtin, chain, rules, existing) in [
            (
                "nat",
                "PREROUTING",
                IPT_REDIRECT_CHAIN,
                &self.redirect_rules,
                existing_redirect_jumps,
            ),
            (
                "filter",
                "INPUT",
                IPT_GUARD_CHAIN,
                &self.guard_rules,
                existing_guard_jumps,
            ),
        ] {
            s.push_str(&format!("*{table}\n:{chain} - [0:0]\n"));
            for _ in 0..existing {
                s.push_str(&format!("-D {builtin} -j {chain}\n"));
            }
            s.push_str(&format!("-I {builtin} 1 -j {chain}\n"));
            for rule in rules {
                s.push_str(rule);
                s.push('\n');
            }
            s.push_str("COMMIT\n");
        }
        s
    }
}

/// Our nft table's rules, as `nft list table` prints them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NftPlan {
    /// Rules of [`NFT_REDIRECT_CHAIN`], in order.
    pub redirect_rules: Vec<String>,
    /// Rules of [`NFT_GUARD_CHAIN`], in order.
    pub guard_rules: Vec<String>,
}

impl NftPlan {
    /// The `nft -f -` input. Creating the table empty and deleting it before declaring it again
    /// makes one atomic transaction that replaces whatever version of our table is there.
    pub fn script(&self) -> String {
        let mut s = format!(
            "table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\ntable inet {NFT_TABLE} {{\n"
        );
        for (i, (chain, hook, rules)) in [
            (NFT_REDIRECT_CHAIN, NFT_REDIRECT_HOOK, &self.redirect_rules),
            (NFT_GUARD_CHAIN, NFT_GUARD_HOOK, &self.guard_rules),
        ]
        .into_iter()
        .enumerate()
        {
            if i > 0 {
                s.push('\n');
            }
            s.push_str(&format!("\tchain {chain} {{\n\t\t{hook}\n"));
            for rule in rules {
                s.push_str(&format!("\t\t{rule}\n"));
            }
            s.push_str("\t}\n");
        }
        s.push_str("}\n");
        s
    }
}

/// The `nft -f -` input that removes our table, and succeeds whether or not it exists.
pub fn nft_remove_script() -> String {
    format!("table inet {NFT_TABLE} {{}}\ndelete table inet {NFT_TABLE}\n")
}

/// Everything `install` does for one backend and spec: the firewall change, then the conntrack
/// flush. `Display` renders it as the commands a human would type (`--dry-run`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// The backend the rules are written for.
    pub backend: Backend,
    /// Interfaces that keep their IMDS block, with the rule that blocks them.
    pub exempt: Vec<ExemptInterface>,
    /// The nft table, for [`Backend::Nft`].
    pub nft: Option<NftPlan>,
    /// One entry per enabled family, for the iptables backends.
    pub iptables: Vec<IptablesFamilyPlan>,
    /// Families whose rules must be absent (an earlier install may have left them).
    pub iptables_absent: Vec<Family>,
    /// `conntrack` argument lists, one per enabled family.
    pub conntrack: Vec<Vec<String>>,
}

/// Builds the plan. Pure: the same inputs always give the same text.
///
/// `exempt` interfaces get a `return` before the redirects (only those that overlap an allowed
/// pattern matter; the others are dropped from the plan).
pub fn plan(backend: Backend, spec: &RuleSpec, exempt: &[ExemptInterface]) -> Plan {
    let families = Family::enabled(spec);
    let exempt: Vec<ExemptInterface> = exempt
        .iter()
        .filter(|e| spec.allowed.iter().any(|a| a.overlaps(&e.pattern)))
        .cloned()
        .collect();
    let port = spec.proxy_port;
    let (nft, iptables, iptables_absent) = match backend {
        Backend::Nft => (
            Some(nft_plan(&families, spec, &exempt)),
            Vec::new(),
            Vec::new(),
        ),
        Backend::IptablesNft | Backend::IptablesLegacy => {
            let plans = families
                .iter()
                .map(|&family| IptablesFamilyPlan {
                    family,
                    redirect_rules: exempt
                        .iter()
                        .map(|e| ipt_redirect_rule(family, &e.pattern, "RETURN".to_owned()))
                        .chain(spec.allowed.iter().map(|a| {
                            ipt_redirect_rule(family, a, format!("REDIRECT --to-ports {port}"))
                        }))
                        .collect(),
                    guard_rules: vec![
                        format!(
                            "-A {IPT_GUARD_CHAIN} -p tcp -m tcp --dport {port} -m conntrack --ctstate DNAT --ctorigdst {} --ctorigdstport {IMDS_PORT} -j RETURN",
                            family.imds()
                        ),
                        format!("-A {IPT_GUARD_CHAIN} -p tcp -m tcp --dport {port} -j DROP"),
                    ],
                })
                .collect();
            let absent = Family::ALL
                .into_iter()
                .filter(|f| !families.contains(f))
                .collect();
            (None, plans, absent)
        }
    };
    let conntrack = families.iter().map(|&f| conntrack_args(f)).collect();
    Plan {
        backend,
        exempt,
        nft,
        iptables,
        iptables_absent,
        conntrack,
    }
}

fn nft_plan(families: &[Family], spec: &RuleSpec, exempt: &[ExemptInterface]) -> NftPlan {
    let port = spec.proxy_port;
    let mut redirect_rules = Vec::new();
    let mut guard_rules = Vec::new();
    for &family in families {
        let matches = |pattern: &InterfacePattern| {
            format!(
                "iifname \"{}\" {} daddr {} tcp dport {IMDS_PORT}",
                pattern.nft(),
                family.nft_keyword(),
                family.imds()
            )
        };
        // One rule per pattern rather than an anonymous set: wildcards inside sets need a
        // newer nft and kernel than plain wildcard matches.
        redirect_rules.extend(
            exempt
                .iter()
                .map(|e| format!("{} return", matches(&e.pattern))),
        );
        redirect_rules.extend(
            spec.allowed
                .iter()
                .map(|a| format!("{} redirect to :{port}", matches(a))),
        );
        guard_rules.push(format!(
            "tcp dport {port} ct status dnat ct original {} daddr {} ct original proto-dst {IMDS_PORT} accept",
            family.nft_keyword(),
            family.imds()
        ));
    }
    // In an inet table this drop covers both families, even one without a redirect: the guard
    // only ever narrows access.
    guard_rules.push(format!("tcp dport {port} drop"));
    NftPlan {
        redirect_rules,
        guard_rules,
    }
}

fn ipt_redirect_rule(family: Family, pattern: &InterfacePattern, target: String) -> String {
    // Option order is the one `iptables-save` prints, so status can compare text for text.
    format!(
        "-A {IPT_REDIRECT_CHAIN} -d {} -i {} -p tcp -m tcp --dport {IMDS_PORT} -j {target}",
        family.imds_host_prefix(),
        pattern.as_str()
    )
}

/// Arguments of the `conntrack` call that forgets connections to IMDS made before our rules.
/// Only flows whose reply comes from IMDS's own port 80 are deleted: those went straight to
/// IMDS. Redirected flows reply from the proxy's port and are left alone, so reinstalling the
/// rules (every start and restart) never cuts a request the proxy is serving.
pub fn conntrack_args(family: Family) -> Vec<String> {
    let mut args = vec!["-D".to_owned()];
    if family == Family::V6 {
        args.extend(["-f".to_owned(), "ipv6".to_owned()]);
    }
    args.extend(
        [
            "-p",
            "tcp",
            "--orig-dst",
            &family.imds().to_string(),
            "--orig-port-dst",
        ]
        .map(str::to_owned),
    );
    args.push(IMDS_PORT.to_string());
    args.extend(["--reply-port-src".to_owned(), IMDS_PORT.to_string()]);
    args
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "# backend: {}", self.backend)?;
        for e in &self.exempt {
            writeln!(
                f,
                "# {} stays blocked for IMDS because of: {}",
                e.pattern, e.because
            )?;
        }
        if let Some(nft) = &self.nft {
            writeln!(f, "nft -f - <<'EOF'\n{}EOF", nft.script())?;
        }
        for p in &self.iptables {
            let tools = iptables_tools(self.backend, p.family)
                .expect("iptables plans exist only for iptables backends");
            writeln!(
                f,
                "# {}: replaces our chains; existing jumps to them are deleted in the same transaction",
                p.family
            )?;
            writeln!(
                f,
                "{} --noflush -w {IPTABLES_LOCK_WAIT_S} <<'EOF'\n{}EOF",
                tools.restore,
                p.restore_script(0, 0)
            )?;
        }
        for family in &self.iptables_absent {
            writeln!(f, "# {family}: our chains are removed if present")?;
        }
        for args in &self.conntrack {
            writeln!(f, "conntrack {}", args.join(" "))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(allowed: &[&str], ipv4: bool, ipv6: bool) -> RuleSpec {
        RuleSpec {
            allowed: allowed.iter().map(|a| a.parse().unwrap()).collect(),
            proxy_port: 8169,
            ipv4,
            ipv6,
        }
    }

    fn exempt(pattern: &str) -> ExemptInterface {
        ExemptInterface {
            pattern: pattern.parse().unwrap(),
            because: "-A DOCKER-USER -d 169.254.169.254/32 -i docker0 -j DROP".to_owned(),
        }
    }

    #[test]
    fn nft_default_plan_is_one_inet_table() {
        let p = plan(Backend::Nft, &RuleSpec::default(), &[]);
        assert_eq!(
            p.nft.unwrap().script(),
            "table inet imds_hop_proxy {}
delete table inet imds_hop_proxy
table inet imds_hop_proxy {
\tchain imds_redirect {
\t\ttype nat hook prerouting priority dstnat - 10; policy accept;
\t\tiifname \"docker0\" ip daddr 169.254.169.254 tcp dport 80 redirect to :8169
\t\tiifname \"br-*\" ip daddr 169.254.169.254 tcp dport 80 redirect to :8169
\t\tiifname \"docker0\" ip6 daddr fd00:ec2::254 tcp dport 80 redirect to :8169
\t\tiifname \"br-*\" ip6 daddr fd00:ec2::254 tcp dport 80 redirect to :8169
\t}

\tchain port_guard {
\t\ttype filter hook input priority filter - 10; policy accept;
\t\ttcp dport 8169 ct status dnat ct original ip daddr 169.254.169.254 ct original proto-dst 80 accept
\t\ttcp dport 8169 ct status dnat ct original ip6 daddr fd00:ec2::254 ct original proto-dst 80 accept
\t\ttcp dport 8169 drop
\t}
}
"
        );
        assert!(p.iptables.is_empty());
        assert_eq!(
            p.conntrack,
            vec![conntrack_args(Family::V4), conntrack_args(Family::V6)]
        );
    }

    #[test]
    fn nft_v4_only_with_custom_interfaces_and_an_exemption() {
        let mut s = spec(&["docker0", "cni+"], true, false);
        s.proxy_port = 9000;
        let p = plan(Backend::Nft, &s, &[exempt("docker0"), exempt("eth0")]);
        let nft = p.nft.unwrap();
        assert_eq!(
            nft.redirect_rules,
            vec![
                "iifname \"docker0\" ip daddr 169.254.169.254 tcp dport 80 return",
                "iifname \"docker0\" ip daddr 169.254.169.254 tcp dport 80 redirect to :9000",
                "iifname \"cni*\" ip daddr 169.254.169.254 tcp dport 80 redirect to :9000",
            ]
        );
        assert_eq!(
            nft.guard_rules,
            vec![
                "tcp dport 9000 ct status dnat ct original ip daddr 169.254.169.254 ct original proto-dst 80 accept",
                "tcp dport 9000 drop",
            ]
        );
        // eth0 overlaps no allowed pattern, so it needs no exemption.
        assert_eq!(p.exempt, vec![exempt("docker0")]);
        assert_eq!(p.conntrack, vec![conntrack_args(Family::V4)]);
    }

    #[test]
    fn nft_v6_only() {
        let p = plan(Backend::Nft, &spec(&["docker0"], false, true), &[]);
        let nft = p.nft.unwrap();
        assert_eq!(
            nft.redirect_rules,
            vec!["iifname \"docker0\" ip6 daddr fd00:ec2::254 tcp dport 80 redirect to :8169"]
        );
        assert_eq!(nft.guard_rules.len(), 2);
        assert_eq!(
            p.conntrack,
            vec![vec![
                "-D",
                "-f",
                "ipv6",
                "-p",
                "tcp",
                "--orig-dst",
                "fd00:ec2::254",
                "--orig-port-dst",
                "80",
                "--reply-port-src",
                "80"
            ]]
        );
    }

    #[test]
    fn iptables_default_plan_restore_scripts() {
        for backend in [Backend::IptablesNft, Backend::IptablesLegacy] {
            let p = plan(backend, &RuleSpec::default(), &[]);
            assert!(p.nft.is_none());
            assert!(p.iptables_absent.is_empty());
            assert_eq!(p.iptables.len(), 2);
            assert_eq!(
                p.iptables[0].restore_script(0, 0),
                "*nat
:IMDS-HOP-PROXY - [0:0]
-I PREROUTING 1 -j IMDS-HOP-PROXY
-A IMDS-HOP-PROXY -d 169.254.169.254/32 -i docker0 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8169
-A IMDS-HOP-PROXY -d 169.254.169.254/32 -i br-+ -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8169
COMMIT
*filter
:IMDS-HOP-PROXY-GUARD - [0:0]
-I INPUT 1 -j IMDS-HOP-PROXY-GUARD
-A IMDS-HOP-PROXY-GUARD -p tcp -m tcp --dport 8169 -m conntrack --ctstate DNAT --ctorigdst 169.254.169.254 --ctorigdstport 80 -j RETURN
-A IMDS-HOP-PROXY-GUARD -p tcp -m tcp --dport 8169 -j DROP
COMMIT
"
            );
            assert_eq!(
                p.iptables[1].redirect_rules[0],
                "-A IMDS-HOP-PROXY -d fd00:ec2::254/128 -i docker0 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8169"
            );
            assert!(p.iptables[1].guard_rules[0].contains("--ctorigdst fd00:ec2::254 "));
        }
    }

    #[test]
    fn iptables_script_deletes_existing_jumps_in_the_same_transaction() {
        let p = plan(
            Backend::IptablesLegacy,
            &spec(&["docker0"], true, false),
            &[exempt("docker0")],
        );
        assert_eq!(p.iptables_absent, vec![Family::V6]);
        let script = p.iptables[0].restore_script(2, 1);
        let nat: Vec<&str> = script.lines().take(7).collect();
        assert_eq!(
            nat,
            vec![
                "*nat",
                ":IMDS-HOP-PROXY - [0:0]",
                "-D PREROUTING -j IMDS-HOP-PROXY",
                "-D PREROUTING -j IMDS-HOP-PROXY",
                "-I PREROUTING 1 -j IMDS-HOP-PROXY",
                "-A IMDS-HOP-PROXY -d 169.254.169.254/32 -i docker0 -p tcp -m tcp --dport 80 -j RETURN",
                "-A IMDS-HOP-PROXY -d 169.254.169.254/32 -i docker0 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8169",
            ]
        );
        assert_eq!(
            script.matches("-D INPUT -j IMDS-HOP-PROXY-GUARD").count(),
            1
        );
    }

    #[test]
    fn dry_run_text_names_every_command() {
        let text = plan(
            Backend::IptablesNft,
            &spec(&["docker0"], false, true),
            &[exempt("docker0")],
        )
        .to_string();
        assert!(text.starts_with("# backend: iptables-nft\n# docker0 stays blocked for IMDS because of: -A DOCKER-USER"), "{text}");
        assert!(
            text.contains("ip6tables-nft-restore --noflush -w 5 <<'EOF'\n*nat\n"),
            "{text}"
        );
        assert!(
            text.contains("# IPv4: our chains are removed if present"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "conntrack -D -f ipv6 -p tcp --orig-dst fd00:ec2::254 --orig-port-dst 80 --reply-port-src 80\n"
            ),
            "{text}"
        );
        let nft = plan(Backend::Nft, &RuleSpec::default(), &[]).to_string();
        assert!(
            nft.contains("nft -f - <<'EOF'\ntable inet imds_hop_proxy {}\n"),
            "{nft}"
        );
    }
}
