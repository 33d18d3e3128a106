//! What the firewall looks like now: one snapshot of every ruleset tool present, and the
//! backend decision drawn from it.
//!
//! The snapshot reads all five views (`iptables-legacy-save`, `ip6tables-legacy-save`,
//! `iptables-nft-save`, `ip6tables-nft-save`, `nft list ruleset`) because rules hide from the
//! tool that does not look: a DOCKER-USER block in legacy tables is invisible to `nft`, and
//! still stops matching once our nft redirect rewrites the destination. The decision itself
//! ([`decide`]) is pure.

use super::blocks::{RulesetFormat, RulesetText};
use super::plan::{iptables_tools, Family, IPT_REDIRECT_CHAIN};
use super::runner::Runner;
use super::{Backend, RulesError};

/// One tool that prints a ruleset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// `iptables-save`/`ip6tables-save` of one flavour (never [`Backend::Nft`]).
    Iptables(Backend, Family),
    /// `nft list ruleset`.
    Nft,
}

impl Source {
    /// Every source, in the order they are read.
    pub const ALL: [Source; 5] = [
        Source::Iptables(Backend::IptablesLegacy, Family::V4),
        Source::Iptables(Backend::IptablesLegacy, Family::V6),
        Source::Iptables(Backend::IptablesNft, Family::V4),
        Source::Iptables(Backend::IptablesNft, Family::V6),
        Source::Nft,
    ];

    /// The program and arguments that print this ruleset.
    pub fn command(self) -> (&'static str, &'static [&'static str]) {
        match self {
            Source::Nft => ("nft", &["list", "ruleset"]),
            Source::Iptables(backend, family) => (
                iptables_tools(backend, family)
                    .expect("Source::Iptables never holds Backend::Nft")
                    .save,
                &[],
            ),
        }
    }
}

/// The rulesets as they were when read.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// What each present tool printed.
    pub texts: Vec<(Source, String)>,
    /// Tools that are not installed.
    pub absent: Vec<Source>,
    /// Tools that are installed but failed, with their error; their rules are unknown.
    pub warnings: Vec<String>,
}

impl Snapshot {
    /// Runs every ruleset tool that is installed. A missing tool is noted, a failing one is a
    /// warning; only a tool that hangs or cannot be spawned is an error.
    pub fn gather(runner: &dyn Runner) -> Result<Snapshot, RulesError> {
        let mut snapshot = Snapshot::default();
        for source in Source::ALL {
            let (program, args) = source.command();
            match runner.run(program, args, None) {
                Ok(out) if out.success() => snapshot.texts.push((source, out.stdout)),
                Ok(out) => snapshot.warnings.push(
                    RulesError::failed(program, args, &out).to_string()
                        + " (rules it would show are not checked)",
                ),
                Err(RulesError::ToolMissing { .. }) => snapshot.absent.push(source),
                Err(err) => return Err(err),
            }
        }
        Ok(snapshot)
    }

    /// What `source` printed, if it ran and succeeded.
    pub fn text(&self, source: Source) -> Option<&str> {
        self.texts
            .iter()
            .find(|(s, _)| *s == source)
            .map(|(_, t)| t.as_str())
    }

    /// Whether the tool behind `source` is installed.
    pub fn present(&self, source: Source) -> bool {
        !self.absent.contains(&source)
    }

    /// Every text, labelled for the blocking-rule parser.
    pub fn rulesets(&self) -> Vec<RulesetText> {
        self.texts
            .iter()
            .map(|(source, text)| RulesetText {
                origin: source.command().0.to_owned(),
                format: match source {
                    Source::Nft => RulesetFormat::Nft,
                    Source::Iptables(..) => RulesetFormat::IptablesSave,
                },
                text: text.clone(),
            })
            .collect()
    }

    fn iptables_texts(&self, backend: Backend) -> impl Iterator<Item = &str> {
        Family::ALL
            .into_iter()
            .filter_map(move |f| self.text(Source::Iptables(backend, f)))
    }
}

const BUILTIN_CHAINS: [&str; 5] = ["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"];

/// Whether an `iptables-save` text holds Docker's chains.
fn has_docker_chains(save: &str) -> bool {
    save.lines().any(|l| l.starts_with(":DOCKER"))
}

/// Whether an `iptables-save` text holds any rule or user chain of someone else's. Empty
/// built-in tables do not count (merely listing with `iptables-legacy -L` creates them), and
/// neither do our own chains and jumps: otherwise the backend we chose once would choose itself
/// ever after, and `rules status`/`remove` could look somewhere else than `run` installed.
fn has_content(save: &str) -> bool {
    save.lines()
        .filter(|l| !l.contains(IPT_REDIRECT_CHAIN))
        .any(|l| {
            l.starts_with("-A ")
                || l.strip_prefix(':')
                    .and_then(|rest| rest.split_whitespace().next())
                    .is_some_and(|chain| !BUILTIN_CHAINS.contains(&chain))
        })
}

/// Whether `nft list ruleset` shows Docker's own nftables tables (Docker 29's nftables mode).
fn has_native_docker_tables(ruleset: &str) -> bool {
    ruleset.lines().any(|l| {
        let words: Vec<&str> = l.split_whitespace().collect();
        matches!(words.as_slice(), ["table", _, "docker-bridges", ..])
    })
}

/// Picks the backend the host already uses, first match wins:
/// 1. Docker's native nftables tables (`docker-bridges`) -> [`Backend::Nft`];
/// 2. Docker's chains in iptables-nft -> [`Backend::IptablesNft`];
/// 3. Docker's chains in iptables-legacy -> [`Backend::IptablesLegacy`];
/// 4. any rule or user chain in legacy tables -> [`Backend::IptablesLegacy`] (the host's
///    firewall lives there, and rules there are invisible to nft);
/// 5. any in iptables-nft -> [`Backend::IptablesNft`];
/// 6. otherwise the first installed of nft, iptables-nft, iptables-legacy.
pub fn decide(snapshot: &Snapshot) -> Result<Backend, RulesError> {
    let nft_text = snapshot.text(Source::Nft).unwrap_or_default();
    let legacy = || snapshot.iptables_texts(Backend::IptablesLegacy);
    let ipt_nft = || snapshot.iptables_texts(Backend::IptablesNft);
    let installed = |b: Backend| snapshot.present(Source::Iptables(b, Family::V4));
    Ok(if has_native_docker_tables(nft_text) {
        Backend::Nft
    } else if ipt_nft().any(has_docker_chains) {
        Backend::IptablesNft
    } else if legacy().any(has_docker_chains) || legacy().any(has_content) {
        Backend::IptablesLegacy
    } else if ipt_nft().any(has_content) {
        Backend::IptablesNft
    } else if snapshot.present(Source::Nft) {
        Backend::Nft
    } else if installed(Backend::IptablesNft) {
        Backend::IptablesNft
    } else if installed(Backend::IptablesLegacy) {
        Backend::IptablesLegacy
    } else {
        return Err(RulesError::NoFirewallTool);
    })
}

/// Reads the host's rulesets and picks the backend its firewall (and Docker) already uses.
pub fn detect(runner: &dyn Runner) -> Result<Backend, RulesError> {
    decide(&Snapshot::gather(runner)?)
}

#[cfg(test)]
mod tests {
    use super::super::runner::{FakeRunner, Output};
    use super::*;

    const EMPTY_SAVE: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\nCOMMIT\n";
    const DOCKER_SAVE: &str = "*filter\n:FORWARD DROP [0:0]\n:DOCKER - [0:0]\n:DOCKER-USER - [0:0]\n-A FORWARD -j DOCKER-USER\nCOMMIT\n";
    const HOST_FIREWALL_SAVE: &str =
        "*filter\n:INPUT DROP [0:0]\n-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT\nCOMMIT\n";

    #[test]
    fn our_own_chains_are_not_the_hosts_content() {
        let ours = "*nat\n:PREROUTING ACCEPT [0:0]\n:IMDS-HOP-PROXY - [0:0]\n\
                    -A PREROUTING -j IMDS-HOP-PROXY\n\
                    -A IMDS-HOP-PROXY -d 169.254.169.254/32 -i docker0 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8169\n\
                    COMMIT\n*filter\n:IMDS-HOP-PROXY-GUARD - [0:0]\n-A INPUT -j IMDS-HOP-PROXY-GUARD\nCOMMIT\n";
        assert!(!has_content(ours));
        assert!(has_content(&format!("{ours}{HOST_FIREWALL_SAVE}")));
        assert!(!has_content(EMPTY_SAVE));
    }

    fn host(outputs: &[(&'static str, &str)]) -> FakeRunner {
        FakeRunner(
            outputs
                .iter()
                .map(|(p, out)| (*p, Output::ok(*out)))
                .collect(),
            Default::default(),
        )
    }

    fn all_tools(legacy: &str, ipt_nft: &str, nft: &str) -> FakeRunner {
        host(&[
            ("iptables-legacy-save", legacy),
            ("ip6tables-legacy-save", ""),
            ("iptables-nft-save", ipt_nft),
            ("ip6tables-nft-save", ""),
            ("nft", nft),
        ])
    }

    #[test]
    fn docker_29_nftables_mode_means_nft() {
        let nft = "table ip docker-bridges {\n\tchain filter-FORWARD {\n\t}\n}\n";
        assert_eq!(detect(&all_tools("", "", nft)).unwrap(), Backend::Nft);
        // Even with leftover legacy rules: Docker's choice wins.
        assert_eq!(
            detect(&all_tools(HOST_FIREWALL_SAVE, "", nft)).unwrap(),
            Backend::Nft
        );
    }

    #[test]
    fn docker_on_iptables_nft_means_iptables_nft() {
        let nft = "table ip filter {\n\tchain DOCKER {\n\t}\n}\n";
        assert_eq!(
            detect(&all_tools(EMPTY_SAVE, DOCKER_SAVE, nft)).unwrap(),
            Backend::IptablesNft
        );
    }

    #[test]
    fn docker_or_a_host_firewall_on_legacy_means_legacy() {
        assert_eq!(
            detect(&all_tools(DOCKER_SAVE, "", "")).unwrap(),
            Backend::IptablesLegacy
        );
        assert_eq!(
            detect(&all_tools(HOST_FIREWALL_SAVE, "", "")).unwrap(),
            Backend::IptablesLegacy
        );
        assert_eq!(
            detect(&all_tools(HOST_FIREWALL_SAVE, HOST_FIREWALL_SAVE, "")).unwrap(),
            Backend::IptablesLegacy
        );
    }

    #[test]
    fn empty_legacy_tables_do_not_count() {
        assert_eq!(
            detect(&all_tools(EMPTY_SAVE, "", "")).unwrap(),
            Backend::Nft
        );
        assert_eq!(
            detect(&all_tools(EMPTY_SAVE, HOST_FIREWALL_SAVE, "")).unwrap(),
            Backend::IptablesNft
        );
    }

    #[test]
    fn with_no_rules_the_first_installed_tool_wins() {
        assert_eq!(detect(&host(&[("nft", "")])).unwrap(), Backend::Nft);
        assert_eq!(
            detect(&host(&[
                ("iptables-nft-save", ""),
                ("iptables-legacy-save", "")
            ]))
            .unwrap(),
            Backend::IptablesNft
        );
        assert_eq!(
            detect(&host(&[("iptables-legacy-save", "")])).unwrap(),
            Backend::IptablesLegacy
        );
        let err = detect(&host(&[])).unwrap_err();
        assert!(
            err.to_string().contains("install the nftables package"),
            "{err}"
        );
    }

    #[test]
    fn a_failing_tool_is_a_warning_not_an_error() {
        let mut runner = all_tools("", HOST_FIREWALL_SAVE, "");
        runner.0.insert(
            "nft",
            Output::failed(1, "Error: Could not process rule: Operation not supported"),
        );
        let snapshot = Snapshot::gather(&runner).unwrap();
        assert_eq!(snapshot.text(Source::Nft), None);
        assert!(snapshot.present(Source::Nft));
        assert!(
            snapshot.warnings[0].starts_with(
                "`nft list ruleset` failed (exit code 1): Error: Could not process rule"
            ),
            "{:?}",
            snapshot.warnings
        );
        assert_eq!(decide(&snapshot).unwrap(), Backend::IptablesNft);
    }
}
