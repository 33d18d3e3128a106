//! The one edge of the rules module: running a firewall tool and collecting what it printed.
//!
//! Everything else in [`crate::rules`] talks to the system through the [`Runner`] trait, so the
//! decisions are tested with a fake that returns canned `iptables-save`/`nft` output. The real
//! [`SystemRunner`] spawns the program (optionally inside a network namespace, for tests),
//! feeds it stdin, and bounds the wait by [`DEFAULT_COMMAND_TIMEOUT_MS`].

use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::RulesError;

/// Longest a single firewall command may run before it is killed. `iptables -w` waits at most
/// [`IPTABLES_LOCK_WAIT_S`](super::IPTABLES_LOCK_WAIT_S) for the xtables lock, well inside this bound.
pub const DEFAULT_COMMAND_TIMEOUT_MS: u64 = 10_000;

/// What a finished command printed, and how it exited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Output {
    /// Exit code; `None` when a signal ended the process.
    pub code: Option<i32>,
    /// Standard output, decoded lossily (rulesets are ASCII in practice).
    pub stdout: String,
    /// Standard error, decoded lossily.
    pub stderr: String,
}

impl Output {
    /// A successful run that printed `stdout` (for fakes in tests).
    pub fn ok(stdout: impl Into<String>) -> Self {
        Output {
            code: Some(0),
            stdout: stdout.into(),
            stderr: String::new(),
        }
    }

    /// A failed run with exit code `code` that printed `stderr` (for fakes in tests).
    pub fn failed(code: i32, stderr: impl Into<String>) -> Self {
        Output {
            code: Some(code),
            stdout: String::new(),
            stderr: stderr.into(),
        }
    }

    /// Whether the command exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Runs one program to completion. `Err` means it could not be run at all (not installed, could
/// not be spawned, timed out); a non-zero exit is an `Ok` [`Output`] the caller judges.
pub trait Runner {
    /// Runs `program` with `args`, writing `stdin` to it when given.
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<Output, RulesError>;
}

/// Renders a command line for error messages and `--dry-run`, quoting what a shell would need.
pub fn command_line(program: &str, args: &[&str]) -> String {
    let mut line = program.to_owned();
    for arg in args {
        line.push(' ');
        if !arg.is_empty()
            && arg
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.:/=+@,".contains(c))
        {
            line.push_str(arg);
        } else {
            line.push('\'');
            line.push_str(&arg.replace('\'', r"'\''"));
            line.push('\'');
        }
    }
    line
}

/// Spawns real processes. On the host by default; [`SystemRunner::in_netns`] runs every
/// command through `ip netns exec`, which is how the real-kernel tests stay off the host's
/// firewall.
#[derive(Clone, Debug, Default)]
pub struct SystemRunner {
    netns: Option<String>,
    timeout: Option<Duration>,
}

impl SystemRunner {
    /// Runs commands in the current network namespace (the host's).
    pub fn host() -> Self {
        SystemRunner::default()
    }

    /// Runs every command inside the named network namespace (`ip netns exec <name> ...`).
    pub fn in_netns(name: impl Into<String>) -> Self {
        SystemRunner {
            netns: Some(name.into()),
            timeout: None,
        }
    }

    fn timeout(&self) -> Duration {
        self.timeout
            .unwrap_or(Duration::from_millis(DEFAULT_COMMAND_TIMEOUT_MS))
    }
}

impl fmt::Display for SystemRunner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.netns {
            Some(ns) => write!(f, "network namespace {ns}"),
            None => f.write_str("host"),
        }
    }
}

/// Finds `program` in `PATH`, then in the sbin directories a root login has but a service
/// manager's or cargo's `PATH` may lack.
fn find_program(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|dir| dir.join(program))
        .find(|candidate| is_executable(candidate))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

impl Runner for SystemRunner {
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<Output, RulesError> {
        let shown = command_line(program, args);
        let resolved = find_program(program).ok_or_else(|| RulesError::missing(program))?;
        let mut command = match &self.netns {
            Some(ns) => {
                let ip = find_program("ip").ok_or_else(|| RulesError::missing("ip"))?;
                let mut c = Command::new(ip);
                c.args(["netns", "exec", ns]).arg(&resolved);
                c
            }
            None => Command::new(&resolved),
        };
        // The C locale keeps messages such as "0 flow entries have been deleted" parseable.
        command
            .args(args)
            .env("LC_ALL", "C")
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command.spawn().map_err(|source| RulesError::Spawn {
            command: shown.clone(),
            source,
        })?;

        // Readers on their own threads so a chatty tool never blocks on a full pipe.
        let mut stdout_pipe = child.stdout.take();
        let mut stderr_pipe = child.stderr.take();
        let stdout_reader = thread::spawn(move || read_all(stdout_pipe.as_mut()));
        let stderr_reader = thread::spawn(move || read_all(stderr_pipe.as_mut()));
        if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
            // A tool that exits early closes the pipe; its exit status tells the story.
            let _ = pipe.write_all(text.as_bytes());
        }

        let deadline = Instant::now() + self.timeout();
        let mut pause = Duration::from_millis(1);
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(RulesError::Timeout {
                        command: shown,
                        timeout_ms: self.timeout().as_millis() as u64,
                    });
                }
                Ok(None) => {
                    thread::sleep(pause);
                    pause = (pause * 2).min(Duration::from_millis(20));
                }
                Err(source) => {
                    return Err(RulesError::Spawn {
                        command: shown,
                        source,
                    })
                }
            }
        };
        Ok(Output {
            code: status.code(),
            stdout: stdout_reader.join().unwrap_or_default(),
            stderr: stderr_reader.join().unwrap_or_default(),
        })
    }
}

fn read_all(pipe: Option<&mut impl Read>) -> String {
    let mut bytes = Vec::new();
    if let Some(pipe) = pipe {
        let _ = pipe.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Answers each program with a canned output; programs not listed are "not installed". Records
/// every call so tests can assert what would have run.
#[cfg(test)]
#[derive(Default)]
pub(crate) struct FakeRunner(
    pub std::collections::HashMap<&'static str, Output>,
    pub std::cell::RefCell<Vec<(String, Option<String>)>>,
);

#[cfg(test)]
impl Runner for FakeRunner {
    fn run(&self, program: &str, args: &[&str], stdin: Option<&str>) -> Result<Output, RulesError> {
        self.1
            .borrow_mut()
            .push((command_line(program, args), stdin.map(str::to_owned)));
        self.0
            .get(program)
            .cloned()
            .ok_or_else(|| RulesError::missing(program))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_quote_only_what_a_shell_needs() {
        assert_eq!(
            command_line("iptables-nft", &["-t", "nat", "-S", "PREROUTING"]),
            "iptables-nft -t nat -S PREROUTING"
        );
        assert_eq!(
            command_line("nft", &["list table", "it's"]),
            r"nft 'list table' 'it'\''s'"
        );
    }

    #[test]
    fn a_missing_program_names_its_package() {
        let err = SystemRunner::host()
            .run("nft-definitely-not-installed", &[], None)
            .unwrap_err();
        assert!(matches!(err, RulesError::ToolMissing { .. }), "{err}");
    }

    #[test]
    fn output_and_exit_code_are_collected() {
        let out = SystemRunner::host()
            .run("sh", &["-c", "cat; echo oops >&2; exit 3"], Some("hello"))
            .unwrap();
        assert_eq!(out.code, Some(3));
        assert_eq!(out.stdout, "hello");
        assert_eq!(out.stderr, "oops\n");
    }

    #[test]
    fn a_hung_command_is_killed_at_the_deadline() {
        let runner = SystemRunner {
            netns: None,
            timeout: Some(Duration::from_millis(100)),
        };
        let started = Instant::now();
        let err = runner.run("sleep", &["5"], None).unwrap_err();
        assert!(matches!(err, RulesError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
