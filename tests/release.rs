//! The release binary from `scripts/release.sh` (`cargo zigbuild` against glibc 2.26) starts on
//! Amazon Linux 2: it requires no glibc symbol version above 2.26, and it runs here. The same
//! check is shown to flag the host-built binary, so it can fail.
//!
//! The release build takes 1–3 minutes and needs the PyPI packages ziglang and cargo-zigbuild,
//! which the script installs with pip. If it cannot, the test fails and says so, unless
//! `IMDS_HOP_PROXY_SKIP_RELEASE_TEST=1` is set.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The oldest glibc the release binary must start on: Amazon Linux 2's.
const GLIBC_BASELINE: [u32; 2] = [2, 26];

/// Set to `1` to skip the release build on purpose (it needs PyPI and minutes).
const SKIP_RELEASE_TEST_ENV: &str = "IMDS_HOP_PROXY_SKIP_RELEASE_TEST";

/// Bound on the release build; from scratch on 2 cores it takes about 2 minutes.
const RELEASE_BUILD_DEADLINE: Duration = Duration::from_secs(20 * 60);

/// `scripts/release.sh` exits with this (EX_UNAVAILABLE) when a tool is missing or pip fails.
const EXIT_TOOL_UNAVAILABLE: i32 = 69;

/// One dynamic symbol the binary imports from glibc, with the version it requires.
#[derive(Debug, PartialEq)]
struct GlibcSymbol {
    name: String,
    /// The part after `GLIBC_`, e.g. `2.34`.
    version: String,
}

/// Parses `readelf --dyn-syms --wide` output: keeps the symbols bound to a `GLIBC_*` version
/// (`getrandom@GLIBC_2.25 (15)`). Unversioned weak symbols (`statx`, which std looks up at run
/// time) impose no version and are left out.
fn parse_glibc_symbols(readelf_dyn_syms: &str) -> Vec<GlibcSymbol> {
    readelf_dyn_syms
        .lines()
        .flat_map(str::split_whitespace)
        .filter_map(|token| {
            let (name, version) = token.split_once('@')?;
            let version = version.trim_start_matches('@').strip_prefix("GLIBC_")?;
            Some(GlibcSymbol {
                name: name.to_string(),
                version: version.to_string(),
            })
        })
        .collect()
}

/// The glibc symbol versions `binary` requires, read with readelf (binutils), which reads an
/// ELF of any architecture.
fn glibc_symbols(binary: &Path) -> Vec<GlibcSymbol> {
    let output = Command::new("readelf")
        .args(["--dyn-syms", "--wide"])
        .arg(binary)
        .output()
        .unwrap_or_else(|err| panic!("run readelf (install binutils): {err}"));
    assert!(
        output.status.success(),
        "readelf --dyn-syms {}: {}",
        binary.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    let symbols = parse_glibc_symbols(&String::from_utf8_lossy(&output.stdout));
    // Every dynamically linked program needs some glibc version; none means the parse failed,
    // and an empty list must not pass as "nothing above the baseline".
    assert!(
        !symbols.is_empty(),
        "no GLIBC_ symbol version found in {}: is it dynamically linked against glibc?",
        binary.display()
    );
    symbols
}

/// `2.2.5` -> `[2, 2, 5]`; `None` for a version that is not a release number (`PRIVATE`).
fn version_numbers(version: &str) -> Option<Vec<u32>> {
    version.split('.').map(|part| part.parse().ok()).collect()
}

/// `symbol@GLIBC_x.y` for every symbol that needs a glibc newer than [`GLIBC_BASELINE`] (or a
/// version that is not a release number), sorted.
fn above_baseline(symbols: &[GlibcSymbol]) -> Vec<String> {
    let mut offending: Vec<String> = symbols
        .iter()
        .filter(|symbol| {
            version_numbers(&symbol.version)
                .map_or(true, |numbers| numbers[..] > GLIBC_BASELINE[..])
        })
        .map(|symbol| format!("{}@GLIBC_{}", symbol.name, symbol.version))
        .collect();
    offending.sort();
    offending.dedup();
    offending
}

/// The glibc version of this machine, from `getconf GNU_LIBC_VERSION` ("glibc 2.36").
fn host_glibc_version() -> Vec<u32> {
    let output = Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .expect("run getconf GNU_LIBC_VERSION");
    let text = String::from_utf8_lossy(&output.stdout);
    text.trim()
        .strip_prefix("glibc ")
        .and_then(version_numbers)
        .unwrap_or_else(|| panic!("getconf GNU_LIBC_VERSION printed {text:?}"))
}

/// Runs `scripts/release.sh` (default target) within [`RELEASE_BUILD_DEADLINE`] and returns the
/// binary named on its stdout line `<sha256>  <path>`, after checking that hash.
fn run_release_script() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let logs = tempfile::tempdir().expect("temporary directory for the script's output");
    let (stdout_path, stderr_path) = (logs.path().join("stdout"), logs.path().join("stderr"));
    let mut child = Command::new("bash")
        .arg(manifest_dir.join("scripts/release.sh"))
        .current_dir(manifest_dir)
        .stdin(Stdio::null())
        .stdout(File::create(&stdout_path).expect("create stdout file"))
        .stderr(File::create(&stderr_path).expect("create stderr file"))
        // Its own process group, so that a timeout can stop cargo and rustc too.
        .process_group(0)
        .spawn()
        .expect("start bash scripts/release.sh");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for scripts/release.sh") {
            break status;
        }
        if started.elapsed() > RELEASE_BUILD_DEADLINE {
            let _ = Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
            panic!(
                "scripts/release.sh did not finish within {RELEASE_BUILD_DEADLINE:?}:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    let stdout = std::fs::read_to_string(&stdout_path).expect("read the script's stdout");
    let stderr = std::fs::read_to_string(&stderr_path).expect("read the script's stderr");
    if status.code() == Some(EXIT_TOOL_UNAVAILABLE) {
        panic!(
            "scripts/release.sh could not get its tools: the PyPI packages ziglang and \
             cargo-zigbuild (installed with pip), python3 with pip, or the Rust target. \
             Set {SKIP_RELEASE_TEST_ENV}=1 to skip this test on purpose.\n{stderr}"
        );
    }
    assert!(
        status.success(),
        "scripts/release.sh failed ({status}):\n{stderr}"
    );

    let line = stdout.lines().last().unwrap_or_default();
    let (hash, path) = line
        .split_once("  ")
        .unwrap_or_else(|| panic!("stdout should end in a sha256sum line, got {stdout:?}"));
    assert!(
        hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit()),
        "not a SHA-256 in {line:?}"
    );
    let binary = PathBuf::from(path);
    let recomputed = command_stdout(Command::new("sha256sum").arg(&binary));
    assert_eq!(
        recomputed.trim(),
        line,
        "the printed hash is not the binary's"
    );
    binary
}

fn command_stdout(command: &mut Command) -> String {
    let Output {
        status,
        stdout,
        stderr,
    } = command
        .output()
        .unwrap_or_else(|err| panic!("run {command:?}: {err}"));
    let (stdout, stderr) = (
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr),
    );
    assert!(
        status.success(),
        "{command:?} failed ({status}):\n{stdout}\n{stderr}"
    );
    stdout.into_owned()
}

#[test]
fn the_release_binary_needs_no_glibc_above_2_26_and_runs() {
    if std::env::var_os(SKIP_RELEASE_TEST_ENV).is_some_and(|value| value == "1") {
        eprintln!("skipped: {SKIP_RELEASE_TEST_ENV}=1 is set");
        return;
    }
    let binary = run_release_script();

    let offending = above_baseline(&glibc_symbols(&binary));
    assert!(
        offending.is_empty(),
        "{} requires glibc newer than 2.26 and would not start on Amazon Linux 2:\n  {}",
        binary.display(),
        offending.join("\n  ")
    );

    let version = command_stdout(Command::new(&binary).arg("--version"));
    assert!(
        version.starts_with("imds-hop-proxy ") && version.contains(env!("CARGO_PKG_VERSION")),
        "--version printed {version:?}, want imds-hop-proxy {}",
        env!("CARGO_PKG_VERSION")
    );
    let help = command_stdout(Command::new(&binary).args(["run", "--help"]));
    // clap names the program after argv[0], here imds-hop-proxy-<arch>.
    assert!(
        help.contains("Usage: imds-hop-proxy") && help.contains(" run [OPTIONS]"),
        "run --help printed:\n{help}"
    );
}

/// The check above can fail: it flags the binary that plain cargo built for these tests against
/// this machine's glibc. Since glibc 2.34 every program needs `__libc_start_main@GLIBC_2.34`.
#[test]
fn the_glibc_check_flags_a_binary_built_against_this_hosts_glibc() {
    let host = host_glibc_version();
    if host[..] < [2, 34][..] {
        eprintln!("skipped: this machine's glibc {host:?} predates 2.34, so its builds need not");
        return;
    }
    let binary = Path::new(env!("CARGO_BIN_EXE_imds-hop-proxy"));
    let offending = above_baseline(&glibc_symbols(binary));
    assert!(
        offending
            .iter()
            .any(|s| s == "__libc_start_main@GLIBC_2.34"),
        "the check did not flag {}, built against glibc {host:?}; it flagged: {offending:?}",
        binary.display()
    );
}

#[test]
fn readelf_lines_give_versioned_glibc_symbols_only() {
    let readelf = "\
Symbol table '.dynsym' contains 3 entries:
   Num:    Value          Size Type    Bind   Vis      Ndx Name
     1: 0000000000000000     0 FUNC    GLOBAL DEFAULT  UND __libc_start_main@GLIBC_2.34 (2)
   109: 0000000000000000     0 NOTYPE  WEAK   DEFAULT  UND statx
   110: 0000000000000000     0 FUNC    WEAK   DEFAULT  UND getrandom@GLIBC_2.25 (15)
   111: 0000000000000000     0 FUNC    GLOBAL DEFAULT  UND memcpy@GLIBC_2.2.5 (3)
   112: 0000000000000000     0 FUNC    GLOBAL DEFAULT  UND _Unwind_Resume@GCC_3.0 (4)
   113: 0000000000000000     0 FUNC    GLOBAL DEFAULT  UND __nss_private@GLIBC_PRIVATE (5)";
    let symbols = parse_glibc_symbols(readelf);
    let names: Vec<&str> = symbols.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["__libc_start_main", "getrandom", "memcpy", "__nss_private"]
    );
    assert_eq!(
        above_baseline(&symbols),
        [
            "__libc_start_main@GLIBC_2.34",
            "__nss_private@GLIBC_PRIVATE"
        ]
    );
}
