//! Running the programs the testbed is built from (`ip`, `nft`, `iptables`, `curl`, the
//! simulator): finding them, bounding every run by a timeout, and collecting what they print.
//! Everything that enters a namespace goes through `ip netns exec` or `ip -n`, so the test
//! process itself never changes namespace and needs no `unsafe` `setns`.

use std::ffi::{OsStr, OsString};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use super::TestbedError;

/// Bound on one set-up command (`ip`, `nft`, `iptables`): they finish in milliseconds, so
/// reaching this means the machine is stuck, not slow.
pub const DEFAULT_COMMAND_TIMEOUT_MS: u64 = 10_000;

/// How long to wait for a finished program's output pipes to close; longer means a background
/// process it started still holds them.
const PIPE_DRAIN_TIMEOUT_MS: u64 = 2_000;

/// Directories searched after `PATH`: a non-login root shell may lack the sbin directories where
/// `ip`, `nft` and `iptables` live.
const SBIN_DIRS: [&str; 3] = ["/usr/local/sbin", "/usr/sbin", "/sbin"];

/// What a finished command printed, as text.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    /// How it exited.
    pub status: ExitStatus,
    /// Standard output (invalid UTF-8 replaced).
    pub stdout: String,
    /// Standard error (invalid UTF-8 replaced).
    pub stderr: String,
}

/// What a finished command printed, as bytes (curl bodies need not be text).
pub(crate) struct RawOutput {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl RawOutput {
    pub(crate) fn into_text(self) -> CommandOutput {
        CommandOutput {
            status: self.status,
            stdout: String::from_utf8_lossy(&self.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&self.stderr).into_owned(),
        }
    }
}

/// The Debian package that ships a tool, for "install the X package" messages.
pub(crate) fn package_of(tool: &str) -> &'static str {
    match tool {
        "ip" => "iproute2",
        "nft" => "nftables",
        "iptables-nft" | "ip6tables-nft" | "iptables-legacy" | "ip6tables-legacy" => "iptables",
        "curl" => "curl",
        "conntrack" => "conntrack",
        "sh" => "dash",
        _ => "providing it",
    }
}

/// Finds a program: a path with a slash is taken as is, a bare name is looked up in `PATH` and
/// then the sbin directories.
pub(crate) fn locate(tool: &str) -> Result<PathBuf, TestbedError> {
    let missing = || TestbedError::ToolMissing {
        tool: tool.to_owned(),
        package: package_of(tool),
    };
    if tool.contains('/') {
        let path = PathBuf::from(tool);
        return if is_executable(&path) {
            Ok(path)
        } else {
            Err(missing())
        };
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path_var)
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(tool))
        .find(|candidate| is_executable(candidate))
        .ok_or_else(missing)
}

fn is_executable(path: &Path) -> bool {
    std::fs::metadata(path)
        .map(|meta| meta.is_file() && meta.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The command as a shell user would type it, for error messages.
pub(crate) fn describe(program: &Path, args: &[OsString]) -> String {
    let name = program.file_name().unwrap_or(program.as_os_str());
    std::iter::once(name)
        .chain(args.iter().map(OsString::as_os_str))
        .map(OsStr::to_string_lossy)
        .collect::<Vec<_>>()
        .join(" ")
}

fn spawn_error(program: &Path, command: String, source: std::io::Error) -> TestbedError {
    if source.kind() == std::io::ErrorKind::NotFound {
        let tool = program
            .file_name()
            .map_or_else(String::new, |name| name.to_string_lossy().into_owned());
        let package = package_of(&tool);
        TestbedError::ToolMissing { tool, package }
    } else {
        TestbedError::Spawn { command, source }
    }
}

/// Starts `program args` with stdin closed and both outputs piped, mapping "not found" to an
/// install hint.
pub(crate) fn spawn(program: &Path, args: &[OsString]) -> Result<Child, TestbedError> {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| spawn_error(program, describe(program, args), source))
}

/// Runs `program args` to completion, feeding `stdin`, killing it after `timeout`.
pub(crate) fn run(
    program: &Path,
    args: &[OsString],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<RawOutput, TestbedError> {
    let command = describe(program, args);
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| spawn_error(program, command.clone(), source))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        let input = input.to_vec();
        // A thread, so a program that prints before reading its input cannot deadlock us.
        thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let status = wait_bounded(&mut child, timeout).map_err(|source| TestbedError::Spawn {
        command: command.clone(),
        source,
    })?;
    let Some(status) = status else {
        return Err(TestbedError::Timeout { command, timeout });
    };
    let pipes = Duration::from_millis(PIPE_DRAIN_TIMEOUT_MS);
    match (stdout.recv_timeout(pipes), stderr.recv_timeout(pipes)) {
        (Ok(stdout), Ok(stderr)) => Ok(RawOutput {
            status,
            stdout,
            stderr,
        }),
        _ => Err(TestbedError::Timeout {
            command: format!("{command} (a background process kept its output open)"),
            timeout: pipes,
        }),
    }
}

/// As [`run`], and a non-zero exit is an error carrying what the program said.
pub(crate) fn run_ok(
    program: &Path,
    args: &[OsString],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<RawOutput, TestbedError> {
    let output = run(program, args, stdin, timeout)?;
    if output.status.success() {
        Ok(output)
    } else {
        Err(TestbedError::CommandFailed {
            command: describe(program, args),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        })
    }
}

fn drain(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        let _ = tx.send(bytes);
    });
    rx
}

/// Waits for `child` until `timeout`; on timeout kills and reaps it and returns `None`.
pub(crate) fn wait_bounded(
    child: &mut Child,
    timeout: Duration,
) -> std::io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let now = Instant::now();
        if now >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Ok(None);
        }
        thread::sleep(pause.min(deadline - now));
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Builds an argument list from anything string-like.
pub(crate) fn args<I, S>(items: I) -> Vec<OsString>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    items
        .into_iter()
        .map(|item| item.as_ref().to_owned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tools_name_their_package() {
        let err = locate("surely-not-a-real-tool-ihp").unwrap_err();
        assert!(err.to_string().contains("not found: install"), "{err}");
        let err = TestbedError::ToolMissing {
            tool: "ip".into(),
            package: package_of("ip"),
        };
        assert_eq!(
            err.to_string(),
            "`ip` not found: install the iproute2 package"
        );
    }

    #[test]
    fn a_command_that_overruns_is_killed_and_reported() {
        let sh = locate("sh").unwrap();
        let started = Instant::now();
        let err = run(
            &sh,
            &args(["-c", "sleep 5"]),
            None,
            Duration::from_millis(100),
        )
        .err()
        .unwrap();
        assert!(matches!(err, TestbedError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn output_and_failures_are_collected() {
        let sh = locate("sh").unwrap();
        let out = run(
            &sh,
            &args(["-c", "cat; echo err >&2"]),
            Some(b"in"),
            Duration::from_secs(5),
        )
        .unwrap()
        .into_text();
        assert!(out.status.success());
        assert_eq!(out.stdout, "in");
        assert_eq!(out.stderr, "err\n");
        let err = run_ok(
            &sh,
            &args(["-c", "echo why >&2; exit 3"]),
            None,
            Duration::from_secs(5),
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("why"), "{err}");
        assert!(err.to_string().contains("sh -c"), "{err}");
    }
}
