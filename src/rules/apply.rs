//! `install`, `remove` and `status`: the only code here that changes the firewall.
//!
//! Each reads a fresh [`Snapshot`] first, so it acts on the firewall as it is now (someone may
//! have flushed it, `iptables-restore`d over it, or added a block since the last call). Every
//! change is one transaction per table (`nft -f -`, `iptables-restore --noflush`) that replaces
//! our own table or chains whole, which is what makes install and remove idempotent.

use tracing::{info, warn};

use super::blocks::{find_blocking_rules, BlockScope, BlockingRule};
use super::detect::{Snapshot, Source};
use super::plan::{
    iptables_tools, jump_rule, nft_remove_script, plan, Family, IptablesTools, Plan,
    IPTABLES_LOCK_WAIT_S, IPT_GUARD_CHAIN, IPT_REDIRECT_CHAIN, NFT_TABLE,
};
use super::runner::{command_line, Output, Runner};
use super::{Backend, ExemptInterface, InterfacePattern, RuleSpec, RulesError};

/// What an install did beyond the plan's rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstallReport {
    /// The backend the rules were written with.
    pub backend: Backend,
    /// Allowed interfaces left unredirected because a rule blocks IMDS there.
    pub exempted: Vec<ExemptInterface>,
    /// Things that did not stop the install but need a human: a missing `conntrack`, a ruleset
    /// tool that failed so its rules were not checked for blocks.
    pub warnings: Vec<String>,
}

/// Our rules as the firewall shows them now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// The backend looked at.
    pub backend: Backend,
    /// Every rule of ours that should be there is there, in order, and nothing else of ours.
    pub complete: bool,
    /// Exactly our rules as the backend's tool prints them; empty when none are installed.
    pub text: String,
    /// Why `complete` is false; also notes copies of our rules under another backend.
    pub problems: Vec<String>,
}

/// Turns blocking rules into exemptions for the allowed interfaces, or refuses when a rule
/// blocks IMDS on interfaces that cannot be listed. Pure.
pub fn exemptions(
    blocks: &[BlockingRule],
    allowed: &[InterfacePattern],
) -> Result<Vec<ExemptInterface>, RulesError> {
    let everywhere: Vec<BlockingRule> = blocks
        .iter()
        .filter(|b| b.scope == BlockScope::AnyInterface)
        .cloned()
        .collect();
    if !everywhere.is_empty() {
        return Err(RulesError::ImdsBlockedForAll { rules: everywhere });
    }
    let mut exempt: Vec<ExemptInterface> = Vec::new();
    for block in blocks {
        let BlockScope::Interfaces(patterns) = &block.scope else {
            continue;
        };
        for pattern in patterns {
            let relevant = allowed.iter().any(|a| a.overlaps(pattern));
            if relevant && !exempt.iter().any(|e| e.pattern == *pattern) {
                exempt.push(ExemptInterface {
                    pattern: pattern.clone(),
                    because: block.to_string(),
                });
            }
        }
    }
    Ok(exempt)
}

/// Runs a command and turns a non-zero exit into [`RulesError::CommandFailed`].
fn run_ok(
    runner: &dyn Runner,
    program: &str,
    args: &[&str],
    stdin: Option<&str>,
) -> Result<Output, RulesError> {
    let out = runner.run(program, args, stdin)?;
    if out.success() {
        Ok(out)
    } else {
        Err(RulesError::failed(program, args, &out))
    }
}

fn require(snapshot: &Snapshot, source: Source) -> Result<(), RulesError> {
    if snapshot.present(source) {
        Ok(())
    } else {
        Err(RulesError::missing(source.command().0))
    }
}

/// Installs (or repairs) our rules for `spec`. Idempotent: running it again replaces our table
/// or chains with identical ones and never doubles a jump. Afterwards it deletes the conntrack
/// entries of connections to IMDS opened before the rules, which would otherwise keep their
/// old path.
///
/// Refuses with [`RulesError::ImdsBlockedForAll`] when a rule blocks IMDS for every forwarded
/// packet. A fresh host is left untouched; if our rules are already installed (the block came
/// later), the redirect is emptied and only the port guard stays, so the new block holds.
pub fn install(
    runner: &dyn Runner,
    backend: Backend,
    spec: &RuleSpec,
) -> Result<InstallReport, RulesError> {
    spec.validate()?;
    let snapshot = Snapshot::gather(runner)?;
    match backend {
        Backend::Nft => require(&snapshot, Source::Nft)?,
        _ => {
            for family in Family::enabled(spec) {
                require(&snapshot, Source::Iptables(backend, family))?;
            }
        }
    }
    let blocks = find_blocking_rules(&snapshot.rulesets());
    let exempt = match exemptions(&blocks, &spec.allowed) {
        Ok(exempt) => exempt,
        Err(refusal) => {
            // A block added after an earlier install is being bypassed by our redirect right
            // now. Keep the guard (the proxy may still listen) but redirect nothing.
            if installed_under(&snapshot, backend) {
                let closed = RuleSpec {
                    allowed: Vec::new(),
                    ..spec.clone()
                };
                apply(runner, &plan(backend, &closed, &[]), &snapshot)?;
                warn!(backend = %backend, "IMDS is blocked for all containers: our redirect is emptied, the port guard stays");
            }
            return Err(refusal);
        }
    };
    let plan = plan(backend, spec, &exempt);
    apply(runner, &plan, &snapshot)?;

    let mut warnings = snapshot.warnings.clone();
    warnings.extend(flush_conntrack(runner, &plan));
    for w in &warnings {
        warn!(backend = %backend, warning = %w, "firewall rules installed with a warning");
    }
    for e in &plan.exempt {
        info!(interface = %e.pattern, blocked_by = %e.because, "IMDS stays blocked on this interface; not redirected");
    }
    info!(backend = %backend, port = spec.proxy_port, "firewall rules installed");
    Ok(InstallReport {
        backend,
        exempted: plan.exempt,
        warnings,
    })
}

fn apply(runner: &dyn Runner, plan: &Plan, snapshot: &Snapshot) -> Result<(), RulesError> {
    if let Some(nft) = &plan.nft {
        run_ok(runner, "nft", &["-f", "-"], Some(&nft.script()))?;
    }
    for family_plan in &plan.iptables {
        let source = Source::Iptables(plan.backend, family_plan.family);
        let ours = OurIptables::read(snapshot.text(source).unwrap_or_default());
        let tools = tools(plan.backend, family_plan.family);
        let script = family_plan.restore_script(ours.redirect_jumps, ours.guard_jumps);
        restore(runner, tools, &script)?;
    }
    for &family in &plan.iptables_absent {
        let source = Source::Iptables(plan.backend, family);
        if let Some(text) = snapshot.text(source) {
            remove_iptables_family(runner, tools(plan.backend, family), text)?;
        }
    }
    Ok(())
}

fn tools(backend: Backend, family: Family) -> IptablesTools {
    iptables_tools(backend, family).expect("iptables plans exist only for iptables backends")
}

fn restore(runner: &dyn Runner, tools: IptablesTools, script: &str) -> Result<(), RulesError> {
    let wait = IPTABLES_LOCK_WAIT_S.to_string();
    run_ok(
        runner,
        tools.restore,
        &["--noflush", "-w", &wait],
        Some(script),
    )?;
    Ok(())
}

/// Deletes the conntrack entries of TCP connections to IMDS. Never fails the install: the rules
/// are in, and stale connections only live until they close.
fn flush_conntrack(runner: &dyn Runner, plan: &Plan) -> Vec<String> {
    let mut warnings = Vec::new();
    for args in &plan.conntrack {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match runner.run("conntrack", &args, None) {
            // conntrack exits 1 when nothing matched; that is the usual, successful case.
            Ok(out) if out.success() || out.stderr.contains(" 0 flow entries") => {}
            Ok(out) => warnings.push(RulesError::failed("conntrack", &args, &out).to_string()),
            Err(err @ RulesError::ToolMissing { .. }) => {
                warnings.push(format!(
                    "{err}: connections to IMDS opened before the rules keep bypassing the proxy until they close"
                ));
                break;
            }
            Err(err) => warnings.push(format!("{}: {err}", command_line("conntrack", &args))),
        }
    }
    warnings
}

/// Removes every rule of ours from `backend`, in both families. Idempotent: nothing of ours,
/// nothing done.
pub fn remove(runner: &dyn Runner, backend: Backend) -> Result<(), RulesError> {
    match backend {
        Backend::Nft => {
            run_ok(runner, "nft", &["-f", "-"], Some(&nft_remove_script()))?;
        }
        Backend::IptablesNft | Backend::IptablesLegacy => {
            for family in Family::ALL {
                let tools = tools(backend, family);
                let save = run_ok(runner, tools.save, &[], None)?;
                remove_iptables_family(runner, tools, &save.stdout)?;
            }
        }
    }
    info!(backend = %backend, "firewall rules removed");
    Ok(())
}

fn remove_iptables_family(
    runner: &dyn Runner,
    tools: IptablesTools,
    save: &str,
) -> Result<(), RulesError> {
    let ours = OurIptables::read(save);
    let mut script = String::new();
    for (table, builtin, chain, exists, jumps) in [
        (
            "nat",
            "PREROUTING",
            IPT_REDIRECT_CHAIN,
            ours.redirect_chain,
            ours.redirect_jumps,
        ),
        (
            "filter",
            "INPUT",
            IPT_GUARD_CHAIN,
            ours.guard_chain,
            ours.guard_jumps,
        ),
    ] {
        if !exists && jumps == 0 {
            continue;
        }
        script.push_str(&format!("*{table}\n"));
        for _ in 0..jumps {
            script.push_str(&format!("-D {builtin} -j {chain}\n"));
        }
        if exists {
            script.push_str(&format!("-F {chain}\n-X {chain}\n"));
        }
        script.push_str("COMMIT\n");
    }
    if script.is_empty() {
        return Ok(());
    }
    restore(runner, tools, &script)
}

/// Our parts of one `iptables-save` text.
#[derive(Debug, Default, PartialEq, Eq)]
struct OurIptables {
    redirect_chain: bool,
    guard_chain: bool,
    redirect_jumps: usize,
    guard_jumps: usize,
    /// Whether each jump is the first rule of its built-in chain.
    redirect_jump_first: bool,
    guard_jump_first: bool,
    redirect_rules: Vec<String>,
    guard_rules: Vec<String>,
}

impl OurIptables {
    fn read(save: &str) -> Self {
        let mut ours = OurIptables::default();
        let mut table = "";
        let (redirect_jump, guard_jump) = (
            jump_rule("PREROUTING", IPT_REDIRECT_CHAIN),
            jump_rule("INPUT", IPT_GUARD_CHAIN),
        );
        let (mut seen_prerouting, mut seen_input) = (false, false);
        for line in save.lines().map(str::trim) {
            if let Some(name) = line.strip_prefix('*') {
                table = name;
                continue;
            }
            let first_word = line.split_whitespace().nth(1).unwrap_or_default();
            match table {
                "nat" => {
                    if line.starts_with(&format!(":{IPT_REDIRECT_CHAIN} ")) {
                        ours.redirect_chain = true;
                    } else if line.starts_with("-A PREROUTING ") {
                        if line == redirect_jump {
                            ours.redirect_jumps += 1;
                            ours.redirect_jump_first |= !seen_prerouting;
                        }
                        seen_prerouting = true;
                    } else if line.starts_with("-A ") && first_word == IPT_REDIRECT_CHAIN {
                        ours.redirect_rules.push(line.to_owned());
                    }
                }
                "filter" => {
                    if line.starts_with(&format!(":{IPT_GUARD_CHAIN} ")) {
                        ours.guard_chain = true;
                    } else if line.starts_with("-A INPUT ") {
                        if line == guard_jump {
                            ours.guard_jumps += 1;
                            ours.guard_jump_first |= !seen_input;
                        }
                        seen_input = true;
                    } else if line.starts_with("-A ") && first_word == IPT_GUARD_CHAIN {
                        ours.guard_rules.push(line.to_owned());
                    }
                }
                _ => {}
            }
        }
        ours
    }

    fn is_empty(&self) -> bool {
        *self == OurIptables::default()
    }

    /// Our rules as `iptables-save` lines, table by table.
    fn text(&self) -> String {
        let mut text = String::new();
        if self.redirect_chain || self.redirect_jumps > 0 {
            text.push_str("*nat\n");
            for _ in 0..self.redirect_jumps {
                text.push_str(&jump_rule("PREROUTING", IPT_REDIRECT_CHAIN));
                text.push('\n');
            }
            text.extend(self.redirect_rules.iter().map(|r| format!("{r}\n")));
        }
        if self.guard_chain || self.guard_jumps > 0 {
            text.push_str("*filter\n");
            for _ in 0..self.guard_jumps {
                text.push_str(&jump_rule("INPUT", IPT_GUARD_CHAIN));
                text.push('\n');
            }
            text.extend(self.guard_rules.iter().map(|r| format!("{r}\n")));
        }
        text
    }
}

/// Our nft table as `nft list ruleset` prints it, if present.
fn nft_table_text(ruleset: &str) -> Option<String> {
    let header = format!("table inet {NFT_TABLE} {{");
    let mut lines = ruleset.lines().skip_while(|l| l.trim() != header);
    let mut text = format!("{}\n", lines.next()?);
    for line in lines {
        text.push_str(line);
        text.push('\n');
        if line == "}" {
            break;
        }
    }
    Some(text)
}

fn normalized(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect()
}

/// Shows our rules under `backend` and whether they are all there. `spec` (and the blocking
/// rules present now) say what "all" means.
pub fn status(
    runner: &dyn Runner,
    backend: Backend,
    spec: &RuleSpec,
) -> Result<Status, RulesError> {
    let snapshot = Snapshot::gather(runner)?;
    let mut problems: Vec<String> = snapshot.warnings.clone();
    let blocks = find_blocking_rules(&snapshot.rulesets());
    let exempt = exemptions(&blocks, &spec.allowed).unwrap_or_else(|refusal| {
        problems.push(refusal.to_string());
        Vec::new()
    });
    let plan = plan(backend, spec, &exempt);
    let mut text = String::new();

    if let Some(nft) = &plan.nft {
        require(&snapshot, Source::Nft)?;
        match nft_table_text(snapshot.text(Source::Nft).unwrap_or_default()) {
            None => problems.push(format!("table inet {NFT_TABLE} is missing")),
            Some(found) => {
                let script = nft.script();
                let expected = normalized(&script);
                // The script's first two lines create and delete the table; the rest is the table.
                if normalized(&found) != expected[2..] {
                    let found_lines = normalized(&found);
                    let missing: Vec<&str> = expected[2..]
                        .iter()
                        .filter(|l| !found_lines.contains(l))
                        .copied()
                        .collect();
                    let extra: Vec<&str> = found_lines
                        .iter()
                        .filter(|l| !expected.contains(l))
                        .copied()
                        .collect();
                    problems.push(format!(
                        "table inet {NFT_TABLE} differs from the plan: missing [{}], unexpected [{}]",
                        missing.join("; "),
                        extra.join("; ")
                    ));
                }
                text = found;
            }
        }
    } else {
        for family in Family::ALL {
            let source = Source::Iptables(backend, family);
            let wanted = plan.iptables.iter().find(|p| p.family == family);
            if wanted.is_some() {
                require(&snapshot, source)?;
            }
            let ours = OurIptables::read(snapshot.text(source).unwrap_or_default());
            if !ours.is_empty() {
                text.push_str(&format!(
                    "# {} ({family})\n{}",
                    source.command().0,
                    ours.text()
                ));
            }
            match wanted {
                None if !ours.is_empty() => problems.push(format!(
                    "{family} rules are installed although {family} is disabled"
                )),
                None => {}
                Some(want) => {
                    for (what, jumps, first, rules, want_rules) in [
                        (
                            "PREROUTING -> IMDS-HOP-PROXY",
                            ours.redirect_jumps,
                            ours.redirect_jump_first,
                            &ours.redirect_rules,
                            &want.redirect_rules,
                        ),
                        (
                            "INPUT -> IMDS-HOP-PROXY-GUARD",
                            ours.guard_jumps,
                            ours.guard_jump_first,
                            &ours.guard_rules,
                            &want.guard_rules,
                        ),
                    ] {
                        if jumps != 1 || !first {
                            problems.push(format!(
                                "{family}: the jump {what} should be the first rule exactly once; found {jumps}{}",
                                if jumps > 0 && !first { ", not first" } else { "" }
                            ));
                        }
                        if rules != want_rules {
                            problems.push(format!(
                                "{family}: chain {} has [{}], expected [{}]",
                                what.rsplit(' ').next().unwrap_or_default(),
                                rules.join("; "),
                                want_rules.join("; ")
                            ));
                        }
                    }
                }
            }
        }
    }

    let complete = problems.is_empty();
    for other in Backend::ALL.into_iter().filter(|b| *b != backend) {
        if installed_under(&snapshot, other) {
            problems.push(format!(
                "our rules are also installed with the {other} backend; remove them with that backend"
            ));
        }
    }
    Ok(Status {
        backend,
        complete,
        text,
        problems,
    })
}

/// Whether any rule of ours shows under `backend`.
fn installed_under(snapshot: &Snapshot, backend: Backend) -> bool {
    match backend {
        Backend::Nft => snapshot
            .text(Source::Nft)
            .and_then(nft_table_text)
            .is_some(),
        _ => Family::ALL.into_iter().any(|f| {
            snapshot
                .text(Source::Iptables(backend, f))
                .is_some_and(|t| !OurIptables::read(t).is_empty())
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::runner::FakeRunner;
    use super::*;

    fn pattern(s: &str) -> InterfacePattern {
        s.parse().unwrap()
    }

    fn block(scope: BlockScope) -> BlockingRule {
        BlockingRule {
            origin: "iptables-nft-save".into(),
            chain: "filter DOCKER-USER".into(),
            rule: "-A DOCKER-USER -d 169.254.169.254/32 -j DROP".into(),
            scope,
        }
    }

    #[test]
    fn blocks_with_interfaces_become_exemptions_for_allowed_interfaces_only() {
        let allowed = RuleSpec::default().allowed;
        let blocks = [
            block(BlockScope::Interfaces(vec![pattern("docker0")])),
            block(BlockScope::Interfaces(vec![
                pattern("docker0"),
                pattern("eth1"),
            ])),
            block(BlockScope::Interfaces(vec![pattern("br-abc")])),
        ];
        let exempt = exemptions(&blocks, &allowed).unwrap();
        let names: Vec<&str> = exempt.iter().map(|e| e.pattern.as_str()).collect();
        assert_eq!(names, ["docker0", "br-abc"]);
        assert_eq!(
            exempt[0].because,
            "`-A DOCKER-USER -d 169.254.169.254/32 -j DROP` (chain filter DOCKER-USER, from iptables-nft-save)"
        );
    }

    #[test]
    fn a_block_without_interface_refuses_and_quotes_the_rule() {
        let err = exemptions(
            &[block(BlockScope::AnyInterface)],
            &RuleSpec::default().allowed,
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with("refusing to install the IMDS redirect: this rule blocks IMDS"),
            "{msg}"
        );
        assert!(msg.contains("`-A DOCKER-USER -d 169.254.169.254/32 -j DROP` (chain filter DOCKER-USER, from iptables-nft-save)"), "{msg}");
        assert!(msg.contains("`-i docker0`"), "{msg}");
    }

    const SAVE_WITH_OURS: &str = "*nat
:PREROUTING ACCEPT [0:0]
:IMDS-HOP-PROXY - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A PREROUTING -j IMDS-HOP-PROXY
-A IMDS-HOP-PROXY -d 169.254.169.254/32 -i docker0 -p tcp -m tcp --dport 80 -j REDIRECT --to-ports 8169
COMMIT
*filter
:INPUT ACCEPT [0:0]
:IMDS-HOP-PROXY-GUARD - [0:0]
-A INPUT -j IMDS-HOP-PROXY-GUARD
-A INPUT -j IMDS-HOP-PROXY-GUARD
-A IMDS-HOP-PROXY-GUARD -p tcp -m tcp --dport 8169 -j DROP
COMMIT
";

    #[test]
    fn our_iptables_parts_are_found_and_nothing_else() {
        let ours = OurIptables::read(SAVE_WITH_OURS);
        assert!(ours.redirect_chain && ours.guard_chain);
        assert_eq!((ours.redirect_jumps, ours.redirect_jump_first), (1, false));
        assert_eq!((ours.guard_jumps, ours.guard_jump_first), (2, true));
        assert_eq!(ours.redirect_rules.len(), 1);
        assert!(!ours.text().contains("DOCKER"));
        assert!(OurIptables::read(
            "*nat\n:PREROUTING ACCEPT [0:0]\n-A PREROUTING -j DOCKER\nCOMMIT\n"
        )
        .is_empty());
    }

    #[test]
    fn install_on_iptables_moves_jumps_first_in_one_transaction_and_flushes_conntrack() {
        let runner = FakeRunner(
            [
                ("iptables-legacy-save", Output::ok(SAVE_WITH_OURS)),
                ("iptables-legacy-restore", Output::ok("")),
                (
                    "conntrack",
                    Output::failed(
                        1,
                        "conntrack v1.4.7 (conntrack-tools): 0 flow entries have been deleted.\n",
                    ),
                ),
            ]
            .into(),
            Default::default(),
        );
        let spec = RuleSpec {
            ipv6: false,
            ..RuleSpec::default()
        };
        let report = install(&runner, Backend::IptablesLegacy, &spec).unwrap();
        assert_eq!(report.warnings, Vec::<String>::new());
        let calls = runner.1.borrow();
        let restore = calls
            .iter()
            .find(|(c, _)| c.starts_with("iptables-legacy-restore"))
            .unwrap();
        assert_eq!(restore.0, "iptables-legacy-restore --noflush -w 5");
        let script = restore.1.as_deref().unwrap();
        assert_eq!(
            script.matches("-D PREROUTING -j IMDS-HOP-PROXY\n").count(),
            1
        );
        assert_eq!(
            script.matches("-D INPUT -j IMDS-HOP-PROXY-GUARD\n").count(),
            2
        );
        assert_eq!(
            calls.last().unwrap().0,
            "conntrack -D -p tcp --orig-dst 169.254.169.254 --orig-port-dst 80 --reply-port-src 80"
        );
    }

    #[test]
    fn install_refuses_without_touching_anything_when_imds_is_blocked_for_all() {
        let save =
            "*filter\n:FORWARD ACCEPT [0:0]\n-A FORWARD -d 169.254.169.254/32 -j DROP\nCOMMIT\n";
        let runner = FakeRunner(
            [
                ("nft", Output::ok("")),
                ("iptables-nft-save", Output::ok(save)),
            ]
            .into(),
            Default::default(),
        );
        let err = install(&runner, Backend::Nft, &RuleSpec::default()).unwrap_err();
        assert!(matches!(err, RulesError::ImdsBlockedForAll { .. }), "{err}");
        assert!(runner
            .1
            .borrow()
            .iter()
            .all(|(c, _)| !c.starts_with("nft -f")));
    }

    #[test]
    fn missing_tools_are_named() {
        let runner = FakeRunner(
            [("iptables-nft-save", Output::ok(""))].into(),
            Default::default(),
        );
        let err = install(&runner, Backend::Nft, &RuleSpec::default()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "nft not found: install the nftables package or set rules_backend = \"iptables-nft\""
        );
        let runner = FakeRunner(
            [("nft", Output::ok("")), ("conntrack", Output::ok(""))].into(),
            Default::default(),
        );
        // The install itself works; only conntrack is missing → a warning naming the package.
        let runner_no_ct = FakeRunner([("nft", Output::ok(""))].into(), Default::default());
        assert!(install(&runner, Backend::Nft, &RuleSpec::default())
            .unwrap()
            .warnings
            .is_empty());
        let report = install(&runner_no_ct, Backend::Nft, &RuleSpec::default()).unwrap();
        assert_eq!(report.warnings.len(), 1);
        assert!(
            report.warnings[0].starts_with("conntrack not found: install the conntrack package"),
            "{:?}",
            report.warnings
        );
    }
}
