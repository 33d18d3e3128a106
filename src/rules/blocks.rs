//! Finding rules that already block IMDS for containers, so the redirect does not undo them.
//!
//! A rule such as `iptables -I DOCKER-USER -i docker0 -d 169.254.169.254 -j DROP` sits on the
//! forward path and matches the *original* destination. Once our REDIRECT rewrites that
//! destination in prerouting, the packet goes to the input path instead and the DROP never sees
//! it: installing the proxy would silently re-open IMDS. This module reads `iptables-save`
//! output (either flavour, either family) and `nft list ruleset` text, walks every chain a
//! forwarded packet can reach, and reports each DROP/REJECT whose destination match covers IMDS,
//! with the input interfaces it is limited to. Pure: text in, findings out.
//!
//! What counts, and why it errs towards "blocking" (a false positive narrows access, a false
//! negative widens it):
//! - iptables: the `FORWARD` chains of `filter` and `mangle`, and every user chain reached from
//!   them by `-j`/`-g` (DOCKER-USER, DOCKER-ISOLATION-*, ...). nft: base chains on the forward
//!   hook, base chains on prerouting that run after our redirect (priority above dstnat - 10),
//!   and every chain reached from them by `jump`/`goto`, including `iifname vmap` verdict maps.
//! - The rule must name a destination that covers IMDS: `-d 169.254.169.254`, a prefix holding
//!   it (`169.254.0.0/16`), or a negated one that excludes it (Docker's internal networks:
//!   `! -d 172.18.0.0/16 -i br-x -j DROP`). Rules without a destination match are general
//!   forward policy and are not ours to honour. A protocol or port match that excludes TCP
//!   port 80 makes the rule irrelevant; any other match (source, state, mark) is ignored, which
//!   can only make us keep more blocked.
//! - The interface is the rule's own `-i`/`iifname`, else the one on the jump that led to its
//!   chain. A negated interface, a named set we cannot read, or none at all means the rule
//!   blocks IMDS on interfaces we cannot list: [`BlockScope::AnyInterface`].

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt;
use std::net::IpAddr;

use super::plan::{IMDS_PORT, IMDS_V4, IMDS_V6, NFT_TABLE};
use super::InterfacePattern;

/// Which text format a ruleset is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RulesetFormat {
    /// `iptables-save` / `ip6tables-save` output, either flavour.
    IptablesSave,
    /// `nft list ruleset` output.
    Nft,
}

/// One ruleset as printed by one tool.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RulesetText {
    /// The command that printed it, for messages (`iptables-nft-save`).
    pub origin: String,
    /// Its format.
    pub format: RulesetFormat,
    /// What it printed.
    pub text: String,
}

/// Which input interfaces a blocking rule covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlockScope {
    /// Only these (iptables syntax); each can be exempted from the redirect.
    Interfaces(Vec<InterfacePattern>),
    /// Interfaces we cannot list (none named, negated, or a set): the install must refuse.
    AnyInterface,
}

/// A rule that blocks IMDS on the forward path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockingRule {
    /// The command whose output showed it (`iptables-legacy-save`, `nft list ruleset`).
    pub origin: String,
    /// Where it lives: `filter DOCKER-USER` or `inet fw forward`.
    pub chain: String,
    /// The rule as its tool prints it, for quoting back to the operator.
    pub rule: String,
    /// The interfaces it blocks.
    pub scope: BlockScope,
}

impl fmt::Display for BlockingRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "`{}` (chain {}, from {})",
            self.rule, self.chain, self.origin
        )
    }
}

/// Every rule in `rulesets` that blocks forwarded TCP to IMDS port 80, in order of appearance.
/// The same rule seen through two tools (iptables-nft rules also show in `nft list ruleset`)
/// appears twice; callers only derive interfaces from the list, so that is harmless.
pub fn find_blocking_rules(rulesets: &[RulesetText]) -> Vec<BlockingRule> {
    rulesets
        .iter()
        .flat_map(|r| match r.format {
            RulesetFormat::IptablesSave => iptables_blocks(&r.origin, &r.text),
            RulesetFormat::Nft => nft_blocks(&r.origin, &r.text),
        })
        .collect()
}

/// The interface a chain was entered with.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Ctx {
    Any,
    Named(Vec<InterfacePattern>),
}

/// A rule's own input-interface match.
#[derive(Clone, Debug, PartialEq, Eq)]
enum IfaceMatch {
    Named(Vec<InterfacePattern>),
    /// Negated, a set reference, a concatenation: not something we can list.
    Unnameable,
}

fn effective(own: &Option<IfaceMatch>, ctx: &Ctx) -> Ctx {
    match (own, ctx) {
        (Some(IfaceMatch::Named(v)), _) => Ctx::Named(v.clone()),
        // `! -i docker0` inside a chain entered from `-i br-x` still only sees br-x.
        (Some(IfaceMatch::Unnameable), Ctx::Named(v)) => Ctx::Named(v.clone()),
        (Some(IfaceMatch::Unnameable), Ctx::Any) => Ctx::Any,
        (None, ctx) => ctx.clone(),
    }
}

fn scope(ctx: Ctx) -> BlockScope {
    match ctx {
        Ctx::Any => BlockScope::AnyInterface,
        Ctx::Named(v) => BlockScope::Interfaces(v),
    }
}

/// Whether an address match covers IMDS: `Some(true)` it does, `Some(false)` it excludes
/// IMDS, `None` when the value is not an address we understand (treated as covering).
fn addr_covers_imds(value: &str) -> Option<bool> {
    let imds_v4 = IpAddr::V4(IMDS_V4);
    let imds_v6 = IpAddr::V6(IMDS_V6);
    if let Some((lo, hi)) = value.split_once('-') {
        let (lo, hi): (IpAddr, IpAddr) = (lo.parse().ok()?, hi.parse().ok()?);
        let target = if lo.is_ipv4() { imds_v4 } else { imds_v6 };
        return Some(lo <= target && target <= hi);
    }
    let (addr, len) = match value.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (value, None),
    };
    let addr: IpAddr = addr.parse().ok()?;
    let bits = if addr.is_ipv4() { 32 } else { 128 };
    let len: u32 = match len {
        None => bits,
        Some(l) if l.contains('.') => {
            let mask: std::net::Ipv4Addr = l.parse().ok()?;
            u32::from(mask).count_ones()
        }
        Some(l) => l.parse().ok().filter(|&l| l <= bits)?,
    };
    Some(match addr {
        IpAddr::V4(a) => {
            let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
            let IpAddr::V4(t) = imds_v4 else {
                unreachable!()
            };
            u32::from(a) & mask == u32::from(t) & mask
        }
        IpAddr::V6(a) => {
            let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
            let IpAddr::V6(t) = imds_v6 else {
                unreachable!()
            };
            u128::from(a) & mask == u128::from(t) & mask
        }
    })
}

/// Whether a destination match (any of `values`, or none of them when `negated`) covers IMDS.
/// A value we cannot read counts as covering when positive and as excluding when negated,
/// which in both cases reads the rule as a block: the safe side.
fn addrs_cover_imds(values: &[String], negated: bool) -> bool {
    let readings: Vec<Option<bool>> = values.iter().map(|v| addr_covers_imds(v)).collect();
    if negated {
        readings.iter().any(Option::is_none) || readings.iter().all(|r| *r == Some(false))
    } else {
        readings.iter().any(|r| r.unwrap_or(true))
    }
}

/// Whether a port value (`80`, `1:1024`, `1-1024`, `80,443`, `http`) includes port 80.
fn port_value_has_80(value: &str) -> bool {
    value.split(',').any(|part| {
        let part = part.trim();
        if let Some((lo, hi)) = part.split_once([':', '-']) {
            match (lo.parse::<u16>(), hi.parse::<u16>()) {
                (Ok(lo), Ok(hi)) => lo <= IMDS_PORT && IMDS_PORT <= hi,
                _ => true,
            }
        } else {
            match part {
                "http" | "www" | "www-http" => true,
                p => p.parse::<u16>().map(|p| p == IMDS_PORT).unwrap_or(true),
            }
        }
    })
}

fn pattern_from_name(name: &str, wildcard: char) -> Option<InterfacePattern> {
    let name = match name.strip_suffix(wildcard) {
        Some(prefix) => format!("{prefix}+"),
        None => name.to_owned(),
    };
    name.parse().ok()
}

// ---------------------------------------------------------------------------------------------
// iptables-save

struct IptRule {
    line: String,
    iface: Option<IfaceMatch>,
    dst: Option<(bool, String)>,
    proto: Option<(bool, String)>,
    dport: Option<(bool, String)>,
    target: Option<String>,
}

/// Splits an `iptables-save` line into words, honouring the double quotes it puts around
/// comments and strings.
fn shell_words(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quoted = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            '\\' if quoted => {
                if let Some(next) = chars.next() {
                    word.push(next);
                }
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            c => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(word);
    }
    words
}

fn parse_ipt_rule(line: &str) -> Option<(String, IptRule)> {
    let words = shell_words(line);
    if words.first().map(String::as_str) != Some("-A") {
        return None;
    }
    let chain = words.get(1)?.clone();
    let mut rule = IptRule {
        line: line.to_owned(),
        iface: None,
        dst: None,
        proto: None,
        dport: None,
        target: None,
    };
    let mut negate = false;
    let mut i = 2;
    while i < words.len() {
        let word = words[i].as_str();
        let value = words.get(i + 1).cloned().unwrap_or_default();
        match word {
            "!" => {
                negate = true;
                i += 1;
                continue;
            }
            "-i" | "--in-interface" => {
                rule.iface = Some(match pattern_from_name(&value, '+') {
                    Some(p) if !negate => IfaceMatch::Named(vec![p]),
                    _ => IfaceMatch::Unnameable,
                });
            }
            "-d" | "--destination" | "--dst" => rule.dst = Some((negate, value)),
            "-p" | "--protocol" => rule.proto = Some((negate, value)),
            "--dport" | "--destination-port" | "--dports" | "--destination-ports" => {
                rule.dport = Some((negate, value))
            }
            "-j" | "--jump" | "-g" | "--goto" => rule.target = Some(value),
            _ => {
                i += 1;
                negate = false;
                continue;
            }
        }
        negate = false;
        i += 2;
    }
    Some((chain, rule))
}

impl IptRule {
    /// Whether TCP to IMDS port 80 can match, given an absent destination match is allowed.
    fn may_match_imds_tcp80(&self) -> bool {
        let proto_ok = match &self.proto {
            None => true,
            Some((neg, p)) => {
                // `all` (or 0) includes TCP, so `! -p all` matches nothing.
                let tcp = matches!(p.as_str(), "tcp" | "6" | "all" | "0");
                tcp != *neg
            }
        };
        let port_ok = match &self.dport {
            None => true,
            Some((neg, v)) => port_value_has_80(v) != *neg,
        };
        let dst_ok = match &self.dst {
            None => true,
            Some((neg, v)) => addrs_cover_imds(std::slice::from_ref(v), *neg),
        };
        proto_ok && port_ok && dst_ok
    }
}

fn iptables_blocks(origin: &str, text: &str) -> Vec<BlockingRule> {
    // Tables in order, each with its chains' rules in order.
    let mut tables: Vec<(String, BTreeMap<String, Vec<IptRule>>)> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('*') {
            tables.push((name.to_owned(), BTreeMap::new()));
        } else if let Some((chain, rule)) = parse_ipt_rule(line) {
            if let Some((_, chains)) = tables.last_mut() {
                chains.entry(chain).or_default().push(rule);
            }
        }
    }
    let mut found = Vec::new();
    // mangle FORWARD runs after prerouting NAT just like filter FORWARD; raw and mangle
    // PREROUTING run before it and still see the original destination.
    for (table, chains) in tables
        .iter()
        .filter(|(t, _)| t == "filter" || t == "mangle")
    {
        let mut queue = VecDeque::from([("FORWARD".to_owned(), Ctx::Any)]);
        let mut seen = HashSet::new();
        while let Some((chain, ctx)) = queue.pop_front() {
            if !seen.insert((chain.clone(), ctx.clone())) {
                continue;
            }
            for rule in chains.get(&chain).into_iter().flatten() {
                if !rule.may_match_imds_tcp80() {
                    continue;
                }
                let here = effective(&rule.iface, &ctx);
                match rule.target.as_deref() {
                    Some("DROP" | "REJECT") if rule.dst.is_some() => found.push(BlockingRule {
                        origin: origin.to_owned(),
                        chain: format!("{table} {chain}"),
                        rule: rule.line.clone(),
                        scope: scope(here),
                    }),
                    Some(target) if chains.contains_key(target) => {
                        queue.push_back((target.to_owned(), here))
                    }
                    _ => {}
                }
            }
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// nft list ruleset

#[derive(Clone, Debug, PartialEq, Eq)]
enum Tok {
    Str(String),
    Word(String),
    Open,
    Close,
    Comma,
    Semi,
}

impl Tok {
    fn is_word(&self, w: &str) -> bool {
        matches!(self, Tok::Word(x) if x == w)
    }

    fn text(&self) -> Option<&str> {
        match self {
            Tok::Str(s) | Tok::Word(s) => Some(s),
            _ => None,
        }
    }
}

fn tokenize(line: &str) -> Vec<Tok> {
    let mut toks = Vec::new();
    let mut chars = line.chars().peekable();
    while let Some(&c) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '#' => break, // `# handle 12` and other comments
            '"' => {
                chars.next();
                let mut s = String::new();
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => s.extend(chars.next()),
                        '"' => break,
                        c => s.push(c),
                    }
                }
                toks.push(Tok::Str(s));
            }
            '{' | '}' | ',' | ';' => {
                chars.next();
                toks.push(match c {
                    '{' => Tok::Open,
                    '}' => Tok::Close,
                    ',' => Tok::Comma,
                    _ => Tok::Semi,
                });
            }
            _ => {
                let mut w = String::new();
                while let Some(&c) = chars.peek() {
                    if c.is_whitespace() || "{},;\"".contains(c) {
                        break;
                    }
                    w.push(c);
                    chars.next();
                }
                toks.push(Tok::Word(w));
            }
        }
    }
    toks
}

/// nft's named priorities for the ip, ip6 and inet families.
fn priority_value(toks: &[Tok]) -> Option<i32> {
    let mut words = toks.iter().map_while(Tok::text);
    let base = words.next()?;
    let mut value = match base {
        "raw" => -300,
        "mangle" => -150,
        "dstnat" => -100,
        "filter" => 0,
        "security" => 50,
        "srcnat" => 100,
        n => n.parse().ok()?,
    };
    while let (Some(op), Some(n)) = (words.next(), words.next()) {
        let n: i32 = n.parse().ok()?;
        value = if op == "-" { value - n } else { value + n };
    }
    Some(value)
}

/// The priority of our own nft redirect chain; prerouting chains after it see the rewritten
/// destination, like the forward path does.
const OUR_REDIRECT_PRIORITY: i32 = -110;

#[derive(Default)]
struct NftChain {
    root: bool,
    rules: Vec<(String, Vec<Tok>)>,
}

#[derive(Default)]
struct NftTable {
    family: String,
    name: String,
    chains: BTreeMap<String, NftChain>,
    sets: BTreeMap<String, Vec<String>>,
}

fn parse_nft(text: &str) -> Vec<NftTable> {
    enum State {
        Top,
        Table,
        Chain(String),
        /// A set or map (elements collected when named) or another block, with brace depth.
        Block(Option<String>, i32),
    }
    let mut tables: Vec<NftTable> = Vec::new();
    let mut state = State::Top;
    for line in text.lines() {
        let toks = tokenize(line);
        if toks.is_empty() {
            continue;
        }
        let opens = toks.iter().filter(|t| **t == Tok::Open).count() as i32;
        let closes = toks.iter().filter(|t| **t == Tok::Close).count() as i32;
        state = match state {
            State::Top => match toks.as_slice() {
                [Tok::Word(t), Tok::Word(family), name, Tok::Open, ..] if t == "table" => {
                    tables.push(NftTable {
                        family: family.clone(),
                        name: name.text().unwrap_or_default().to_owned(),
                        ..NftTable::default()
                    });
                    if closes > 0 {
                        State::Top // `table ip x { }` on one line
                    } else {
                        State::Table
                    }
                }
                _ => State::Top,
            },
            State::Table => match toks.as_slice() {
                [Tok::Close] => State::Top,
                [Tok::Word(kind), name, Tok::Open] if kind == "chain" => {
                    let name = name.text().unwrap_or_default().to_owned();
                    if let Some(t) = tables.last_mut() {
                        t.chains.entry(name.clone()).or_default();
                    }
                    State::Chain(name)
                }
                [Tok::Word(kind), name, Tok::Open, ..] if kind == "set" || kind == "map" => {
                    State::Block(name.text().map(str::to_owned), opens - closes)
                }
                _ if opens > closes => State::Block(None, opens - closes),
                _ => State::Table,
            },
            State::Chain(name) => {
                if toks == [Tok::Close] {
                    State::Table
                } else {
                    if let Some(chain) = tables.last_mut().and_then(|t| t.chains.get_mut(&name)) {
                        if toks[0].is_word("type") {
                            let at = |w: &str| toks.iter().position(|t| t.is_word(w));
                            let hook = at("hook").and_then(|i| toks.get(i + 1)).and_then(Tok::text);
                            let priority =
                                at("priority").and_then(|i| priority_value(&toks[i + 1..]));
                            chain.root = match hook {
                                Some("forward") => true,
                                Some("prerouting") => {
                                    priority.map_or(true, |p| p > OUR_REDIRECT_PRIORITY)
                                }
                                _ => false,
                            };
                        } else if !toks[0].is_word("policy") && !toks[0].is_word("comment") {
                            chain.rules.push((line.trim().to_owned(), toks));
                        }
                    }
                    State::Chain(name)
                }
            }
            State::Block(set, depth) => {
                if let (Some(set), Some(t)) = (&set, tables.last_mut()) {
                    let elements = t.sets.entry(set.clone()).or_default();
                    let start = toks
                        .iter()
                        .position(|t| t.is_word("="))
                        .map_or(0, |i| i + 1);
                    if toks.iter().any(|t| t.is_word("elements")) || !elements.is_empty() {
                        elements.extend(
                            toks[start..]
                                .iter()
                                .filter_map(Tok::text)
                                .map(str::to_owned),
                        );
                    }
                }
                let depth = depth + opens - closes;
                if depth <= 0 {
                    State::Table
                } else {
                    State::Block(set, depth)
                }
            }
        };
    }
    tables
}

/// Reads the value after a match keyword at `toks[i..]`: `!=`, then a word, a string, an
/// anonymous set, or `@named_set`. `None` when the value cannot be listed.
fn nft_value(
    toks: &[Tok],
    mut i: usize,
    sets: &BTreeMap<String, Vec<String>>,
) -> (bool, Option<Vec<String>>) {
    let mut negated = false;
    match toks.get(i) {
        Some(t) if t.is_word("!=") => {
            negated = true;
            i += 1;
        }
        Some(t) if t.is_word("==") => i += 1,
        _ => {}
    }
    let values = match toks.get(i) {
        Some(Tok::Open) => Some(
            toks[i + 1..]
                .iter()
                .take_while(|t| **t != Tok::Close)
                .filter_map(Tok::text)
                .map(str::to_owned)
                .collect(),
        ),
        Some(Tok::Word(w)) if w.starts_with('@') => sets.get(&w[1..]).cloned(),
        Some(Tok::Word(w)) if w == "vmap" || w == "map" || w == "." => None,
        Some(t) => t.text().map(|s| vec![s.to_owned()]),
        None => None,
    };
    (negated, values)
}

struct NftFacts {
    iface: Option<IfaceMatch>,
    has_dst: bool,
    may_match: bool,
    drops: bool,
    /// Chains this rule jumps to, with the interface each jump is limited to.
    jumps: Vec<(Option<IfaceMatch>, String)>,
}

fn nft_facts(toks: &[Tok], sets: &BTreeMap<String, Vec<String>>) -> NftFacts {
    let mut facts = NftFacts {
        iface: None,
        has_dst: false,
        may_match: true,
        drops: false,
        jumps: Vec::new(),
    };
    let word = |i: usize| toks.get(i).and_then(Tok::text).unwrap_or("");
    let mut iifname_vmap = false;
    for (i, tok) in toks.iter().enumerate() {
        let Tok::Word(w) = tok else { continue };
        match w.as_str() {
            "iifname" | "iif" => {
                if word(i + 1) == "vmap" {
                    iifname_vmap = true;
                    continue;
                }
                let (negated, values) = nft_value(toks, i + 1, sets);
                let patterns: Option<Vec<InterfacePattern>> = values
                    .filter(|_| !negated)
                    .and_then(|v| v.iter().map(|n| pattern_from_name(n, '*')).collect());
                facts.iface = Some(match patterns {
                    Some(p) if !p.is_empty() => IfaceMatch::Named(p),
                    _ => IfaceMatch::Unnameable,
                });
            }
            "daddr" if matches!(word(i.wrapping_sub(1)), "ip" | "ip6") => {
                // `ct original ip daddr` describes conntrack state, not this packet's header.
                if word(i.wrapping_sub(2)) == "original" || word(i.wrapping_sub(2)) == "reply" {
                    continue;
                }
                let (negated, values) = nft_value(toks, i + 1, sets);
                facts.has_dst = true;
                if let Some(values) = values {
                    facts.may_match &= addrs_cover_imds(&values, negated);
                }
            }
            "l4proto" | "protocol" | "nexthdr" => {
                let (negated, values) = nft_value(toks, i + 1, sets);
                if let Some(values) = values {
                    let tcp = values.iter().any(|v| v == "tcp" || v == "6");
                    facts.may_match &= tcp != negated;
                }
            }
            "udp" | "udplite" | "sctp" | "dccp" | "icmp" | "icmpv6"
                // Not `meta l4proto udp` (a value) nor `reject with icmp port-unreachable`.
                if !matches!(word(i.wrapping_sub(1)), "l4proto" | "protocol" | "nexthdr" | "with")
                    && matches!(toks.get(i + 1), Some(Tok::Word(_))) =>
            {
                facts.may_match = false;
            }
            "dport" if matches!(word(i.wrapping_sub(1)), "tcp" | "th") => {
                let (negated, values) = nft_value(toks, i + 1, sets);
                if let Some(values) = values {
                    let has_80 = values.iter().any(|v| port_value_has_80(v));
                    facts.may_match &= has_80 != negated;
                }
            }
            "drop" | "reject" => facts.drops = true,
            "jump" | "goto" => {
                let Some(target) = toks.get(i + 1).and_then(Tok::text) else { continue };
                let iface = if iifname_vmap {
                    // The key before ` : jump X` in `iifname vmap { "br-x" : jump X, ... }`.
                    let key: Vec<&Tok> = toks[..i]
                        .iter()
                        .rev()
                        .skip_while(|t| t.is_word(":"))
                        .take_while(|t| !matches!(t, Tok::Comma | Tok::Open))
                        .collect();
                    Some(match key.as_slice() {
                        [t] => match t.text().and_then(|n| pattern_from_name(n, '*')) {
                            Some(p) => IfaceMatch::Named(vec![p]),
                            None => IfaceMatch::Unnameable,
                        },
                        _ => IfaceMatch::Unnameable,
                    })
                } else {
                    None
                };
                facts.jumps.push((iface, target.to_owned()));
            }
            _ => {}
        }
    }
    facts
}

fn nft_blocks(origin: &str, text: &str) -> Vec<BlockingRule> {
    let mut found = Vec::new();
    let tables = parse_nft(text);
    for table in tables
        .iter()
        .filter(|t| matches!(t.family.as_str(), "ip" | "ip6" | "inet"))
        .filter(|t| !(t.family == "inet" && t.name == NFT_TABLE))
    {
        let mut queue: VecDeque<(String, Ctx)> = table
            .chains
            .iter()
            .filter(|(_, c)| c.root)
            .map(|(name, _)| (name.clone(), Ctx::Any))
            .collect();
        let mut seen = HashSet::new();
        while let Some((chain_name, ctx)) = queue.pop_front() {
            if !seen.insert((chain_name.clone(), ctx.clone())) {
                continue;
            }
            let Some(chain) = table.chains.get(&chain_name) else {
                continue;
            };
            for (line, toks) in &chain.rules {
                let facts = nft_facts(toks, &table.sets);
                if !facts.may_match {
                    continue;
                }
                let here = effective(&facts.iface, &ctx);
                if facts.drops && facts.has_dst {
                    found.push(BlockingRule {
                        origin: origin.to_owned(),
                        chain: format!("{} {} {}", table.family, table.name, chain_name),
                        rule: line.clone(),
                        scope: scope(here.clone()),
                    });
                }
                for (iface, target) in facts.jumps {
                    if table.chains.contains_key(&target) {
                        queue.push_back((target, effective(&iface, &here)));
                    }
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipt(text: &str) -> Vec<BlockingRule> {
        find_blocking_rules(&[RulesetText {
            origin: "iptables-legacy-save".into(),
            format: RulesetFormat::IptablesSave,
            text: text.into(),
        }])
    }

    fn nft(text: &str) -> Vec<BlockingRule> {
        find_blocking_rules(&[RulesetText {
            origin: "nft list ruleset".into(),
            format: RulesetFormat::Nft,
            text: text.into(),
        }])
    }

    fn ifaces(names: &[&str]) -> BlockScope {
        BlockScope::Interfaces(names.iter().map(|n| n.parse().unwrap()).collect())
    }

    /// Docker 28's filter table (iptables), with a user's DOCKER-USER rule spliced in.
    fn docker_filter(user_rules: &str) -> String {
        format!(
            "# Generated by iptables-save v1.8.9 on Mon Nov 23 06:56:41 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
:DOCKER - [0:0]
:DOCKER-FORWARD - [0:0]
:DOCKER-ISOLATION-STAGE-1 - [0:0]
:DOCKER-ISOLATION-STAGE-2 - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A FORWARD -j DOCKER-FORWARD
-A DOCKER ! -i docker0 -o docker0 -j DROP
-A DOCKER-FORWARD -j DOCKER-ISOLATION-STAGE-1
-A DOCKER-FORWARD -o docker0 -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT
-A DOCKER-FORWARD -o docker0 -j DOCKER
-A DOCKER-FORWARD -i docker0 -j ACCEPT
-A DOCKER-ISOLATION-STAGE-1 -i docker0 ! -o docker0 -j DOCKER-ISOLATION-STAGE-2
-A DOCKER-ISOLATION-STAGE-2 -o docker0 -j DROP
{user_rules}COMMIT
# Completed on Mon Nov 23 06:56:41 2026
*nat
:PREROUTING ACCEPT [0:0]
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A DOCKER -d 169.254.169.254/32 -j DROP
COMMIT
"
        )
    }

    #[test]
    fn plain_docker_rules_block_nothing() {
        assert_eq!(ipt(&docker_filter("")), vec![]);
    }

    #[test]
    fn docker_user_drop_with_interface_is_found_through_the_forward_jump() {
        let found = ipt(&docker_filter(
            "-A DOCKER-USER -d 169.254.169.254/32 -i docker0 -j DROP\n",
        ));
        assert_eq!(
            found,
            vec![BlockingRule {
                origin: "iptables-legacy-save".into(),
                chain: "filter DOCKER-USER".into(),
                rule: "-A DOCKER-USER -d 169.254.169.254/32 -i docker0 -j DROP".into(),
                scope: ifaces(&["docker0"]),
            }]
        );
    }

    #[test]
    fn forward_reject_without_interface_blocks_every_interface() {
        let found = ipt(&docker_filter(
            "-A FORWARD -d 169.254.169.254/32 -p tcp -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable\n",
        ));
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].scope, BlockScope::AnyInterface);
        assert_eq!(found[0].chain, "filter FORWARD");
    }

    #[test]
    fn wildcard_interfaces_prefixes_and_docker_internal_networks_count() {
        let found = ipt(&docker_filter(
            "-A DOCKER-USER -d 169.254.0.0/16 -i br-+ -j DROP
-A DOCKER-ISOLATION-STAGE-1 ! -d 172.18.0.0/16 -i br-0123456789ab -j DROP
-A DOCKER-USER -d 169.254.169.254/32 ! -i docker0 -j DROP
",
        ));
        let scopes: Vec<BlockScope> = found.into_iter().map(|b| b.scope).collect();
        assert_eq!(
            scopes,
            vec![
                ifaces(&["br-+"]),
                BlockScope::AnyInterface,
                ifaces(&["br-0123456789ab"])
            ]
        );
    }

    #[test]
    fn the_interface_of_the_jump_carries_into_the_chain() {
        let found = ipt("*filter
:FORWARD ACCEPT [0:0]
:IMDS-BLOCK - [0:0]
-A FORWARD -i docker0 -j IMDS-BLOCK
-A IMDS-BLOCK -d 169.254.169.254/32 -j DROP
COMMIT
");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].scope, ifaces(&["docker0"]));
    }

    #[test]
    fn rules_that_do_not_block_imds_tcp_80_are_ignored() {
        let found = ipt(&docker_filter(
            "-A DOCKER-USER -d 169.254.169.254/32 -p udp -j DROP
-A DOCKER-USER -d 169.254.169.254/32 -p tcp -m tcp --dport 443 -j DROP
-A DOCKER-USER -d 169.254.169.254/32 -i docker0 -j ACCEPT
-A DOCKER-USER -d 10.0.0.0/8 -j DROP
-A DOCKER-USER -d 169.254.169.123/32 -j DROP
-A DOCKER-USER ! -d 169.254.0.0/16 -i docker0 -j DROP
-A DOCKER-USER -i docker0 -j DROP
-A DOCKER-USER -j RETURN
",
        ));
        assert_eq!(found, vec![]);
        // Not on the forward path: INPUT, and a user chain nobody jumps to.
        let found = ipt("*filter
:INPUT ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
:ORPHAN - [0:0]
-A INPUT -d 169.254.169.254/32 -j DROP
-A ORPHAN -d 169.254.169.254/32 -j DROP
COMMIT
");
        assert_eq!(found, vec![]);
    }

    #[test]
    fn ip6tables_rules_and_port_ranges() {
        let found = ipt("*filter
:FORWARD ACCEPT [0:0]
-A FORWARD -d fd00:ec2::254/128 -i docker0 -p tcp -m multiport --dports 22,80:90 -j DROP
-A FORWARD -d fd00:ec2::/64 -i br-x -p tcp -m tcp --dport 81:90 -j DROP
COMMIT
");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].scope, ifaces(&["docker0"]));
    }

    #[test]
    fn mangle_forward_counts_too() {
        let found = ipt("*mangle
:PREROUTING ACCEPT [0:0]
:FORWARD ACCEPT [0:0]
-A PREROUTING -d 169.254.169.254/32 -j DROP
-A FORWARD -d 169.254.169.254/32 -i cni0 -j DROP
COMMIT
");
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].chain, "mangle FORWARD");
    }

    /// What `nft list ruleset` prints for iptables-nft's Docker tables plus a user table.
    const NFT_RULESET: &str = r#"table ip filter {
	chain DOCKER-USER {
		iifname "docker0" ip daddr 169.254.169.254 counter packets 0 bytes 0 drop
	}

	chain FORWARD {
		type filter hook forward priority filter; policy drop;
		counter packets 0 bytes 0 jump DOCKER-USER
	}
}
table inet fw {
	set metadata {
		type ipv4_addr
		flags interval
		elements = { 169.254.169.123,
			     169.254.169.254 }
	}

	chain forward {
		type filter hook forward priority filter + 5; policy accept;
		ct state established,related accept
		iifname "br-*" ip daddr @metadata reject with icmp port-unreachable # handle 7
		ip daddr 169.254.169.254 tcp dport { 443, 8443 } drop
		ip daddr 169.254.169.254 udp dport 53 drop
		ip daddr 169.254.169.254 log prefix "drop " accept
		oifname "eth0" ip daddr 10.0.0.0/8 drop
	}

	chain early {
		type filter hook prerouting priority raw; policy accept;
		ip daddr 169.254.169.254 drop
	}
}
"#;

    #[test]
    fn nft_blocks_by_interface_set_and_jump() {
        let found = nft(NFT_RULESET);
        assert_eq!(
            found,
            vec![
                BlockingRule {
                    origin: "nft list ruleset".into(),
                    chain: "ip filter DOCKER-USER".into(),
                    rule: r#"iifname "docker0" ip daddr 169.254.169.254 counter packets 0 bytes 0 drop"#.into(),
                    scope: ifaces(&["docker0"]),
                },
                BlockingRule {
                    origin: "nft list ruleset".into(),
                    chain: "inet fw forward".into(),
                    rule: r#"iifname "br-*" ip daddr @metadata reject with icmp port-unreachable # handle 7"#.into(),
                    scope: ifaces(&["br-+"]),
                },
            ]
        );
    }

    #[test]
    fn nft_drop_without_interface_and_late_prerouting_chains() {
        let found = nft(r#"table ip6 guard {
	chain pre {
		type filter hook prerouting priority 0; policy accept;
		ip6 daddr fd00:ec2::254 drop
	}
}
table ip raw {
	chain pre {
		type filter hook prerouting priority -300; policy accept;
		ip daddr 169.254.169.254 drop
	}
}
"#);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].chain, "ip6 guard pre");
        assert_eq!(found[0].scope, BlockScope::AnyInterface);
    }

    #[test]
    fn docker_29_nftables_vmaps_carry_the_interface() {
        let found = nft(r#"table ip docker-bridges {
	chain filter-FORWARD {
		type filter hook forward priority filter; policy accept;
		oifname vmap { "docker0" : jump filter-forward-in__docker0, "br-1" : jump filter-forward-in__br-1 }
		iifname vmap { "docker0" : jump filter-forward-out__docker0, "br-1" : jump filter-forward-out__br-1 }
	}

	chain filter-forward-in__docker0 {
		ct state established,related counter packets 0 bytes 0 accept
		drop
	}

	chain filter-forward-out__docker0 {
		accept
	}

	chain filter-forward-in__br-1 {
		drop
	}

	chain filter-forward-out__br-1 {
		ip daddr != 172.19.0.0/16 counter packets 0 bytes 0 drop
	}
}
"#);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].scope, ifaces(&["br-1"]));
    }

    #[test]
    fn our_own_table_and_negated_nft_interfaces() {
        let found = nft(r#"table inet imds_hop_proxy {
	chain f {
		type filter hook forward priority 0; policy accept;
		ip daddr 169.254.169.254 drop
	}
}
table inet other {
	chain f {
		type filter hook forward priority 0; policy accept;
		iifname != "eth0" ip daddr 169.254.169.254 drop
	}
}
"#);
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].chain, "inet other f");
        assert_eq!(found[0].scope, BlockScope::AnyInterface);
    }

    #[test]
    fn address_and_port_matching() {
        assert_eq!(addr_covers_imds("169.254.169.254"), Some(true));
        assert_eq!(addr_covers_imds("169.254.0.0/255.255.0.0"), Some(true));
        assert_eq!(addr_covers_imds("0.0.0.0/0"), Some(true));
        assert_eq!(
            addr_covers_imds("169.254.169.0-169.254.169.255"),
            Some(true)
        );
        assert_eq!(addr_covers_imds("169.254.170.0/24"), Some(false));
        assert_eq!(addr_covers_imds("fd00:ec2::254"), Some(true));
        assert_eq!(addr_covers_imds("fd00::/8"), Some(true));
        assert_eq!(addr_covers_imds("fe80::/10"), Some(false));
        assert_eq!(addr_covers_imds("imds.example"), None);
        assert!(port_value_has_80("80"));
        assert!(port_value_has_80("1:1024"));
        assert!(port_value_has_80("22,80"));
        assert!(port_value_has_80("http"));
        assert!(!port_value_has_80("443"));
        assert!(!port_value_has_80("81-90"));
    }
}
