//! Keeps the redirect rules in place for as long as `run` serves.
//!
//! Start-up installs them before the proxy reports itself started, so no container request
//! meets a half-ready host. While serving, they are checked every `rules_check_interval_ms` and
//! restored when something else removed or changed them (a firewalld reload,
//! `iptables -t nat -F`, `nft flush ruleset`, a config-management run). After the drain they are
//! removed, unless `keep_rules_on_stop` says otherwise, so containers never point at a dead
//! port. The firewall commands are blocking; they run on tokio's blocking pool.

use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tracing::{info, warn};

use crate::config::Redirect;
use crate::rules::{self, Backend, InstallReport, RuleSpec, RulesError, SystemRunner};

/// The rules of one running proxy.
#[derive(Debug)]
pub struct RuleKeeper {
    runner: SystemRunner,
    backend: Backend,
    spec: RuleSpec,
    check_interval: Duration,
    keep_on_stop: bool,
}

impl RuleKeeper {
    /// Chooses the backend (detecting it for `auto`) and installs the rules.
    pub async fn install(redirect: &Redirect) -> Result<RuleKeeper, RulesError> {
        let runner = SystemRunner::host();
        let spec = redirect.rule_spec();
        let choice = redirect.backend;
        let (backend, report) = blocking(runner.clone(), {
            let spec = spec.clone();
            move |runner| {
                let backend = choice.resolve(runner)?;
                Ok((backend, rules::install(runner, backend, &spec)?))
            }
        })
        .await?;
        log_install(&report, "redirect rules installed");
        Ok(RuleKeeper {
            runner,
            backend,
            spec,
            check_interval: redirect.check_interval,
            keep_on_stop: redirect.keep_on_stop,
        })
    }

    /// The backend the rules were written with.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Checks the rules on the interval and restores them; runs until dropped.
    pub async fn keep(&self) -> std::convert::Infallible {
        let mut ticker = tokio::time::interval(self.check_interval);
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate; the rules were just installed
        loop {
            ticker.tick().await;
            if let Err(err) = self.check_and_restore().await {
                warn!(cause = %err, "checking or restoring the redirect rules failed; retrying");
            }
        }
    }

    async fn check_and_restore(&self) -> Result<(), RulesError> {
        let (backend, spec) = (self.backend, self.spec.clone());
        let status = blocking(self.runner.clone(), move |runner| {
            rules::status(runner, backend, &spec)
        })
        .await?;
        if status.complete {
            return Ok(());
        }
        warn!(
            backend = %self.backend,
            problems = %status.problems.join("; "),
            "the redirect rules were removed or changed by something else; restoring them"
        );
        let spec = self.spec.clone();
        let report = blocking(self.runner.clone(), move |runner| {
            rules::install(runner, backend, &spec)
        })
        .await?;
        log_install(&report, "redirect rules restored");
        Ok(())
    }

    /// Removes the rules, unless the configuration keeps them across stops.
    pub async fn finish(self) {
        if self.keep_on_stop {
            info!(backend = %self.backend, "keeping the redirect rules (keep_rules_on_stop)");
            return;
        }
        let backend = self.backend;
        match blocking(self.runner, move |runner| rules::remove(runner, backend)).await {
            Ok(()) => info!(backend = %backend, "redirect rules removed"),
            Err(err) => warn!(
                backend = %backend,
                cause = %err,
                "removing the redirect rules failed; run `imds-hop-proxy rules remove`"
            ),
        }
    }
}

fn log_install(report: &InstallReport, message: &'static str) {
    let exempted: Vec<String> = report
        .exempted
        .iter()
        .map(|exempt| format!("{} (blocked by: {})", exempt.pattern, exempt.because))
        .collect();
    info!(backend = %report.backend, exempted = %exempted.join("; "), "{message}");
    for warning in &report.warnings {
        warn!(backend = %report.backend, "{warning}");
    }
}

/// Runs firewall commands on the blocking pool.
async fn blocking<T, F>(runner: SystemRunner, job: F) -> Result<T, RulesError>
where
    T: Send + 'static,
    F: FnOnce(&SystemRunner) -> Result<T, RulesError> + Send + 'static,
{
    match tokio::task::spawn_blocking(move || job(&runner)).await {
        Ok(result) => result,
        Err(join) => Err(RulesError::Spawn {
            command: "firewall update".to_owned(),
            source: std::io::Error::other(join.to_string()),
        }),
    }
}
