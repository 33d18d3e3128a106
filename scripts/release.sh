#!/usr/bin/env bash
# Builds the release binary that runs on every supported EC2 host: Amazon Linux 2 (glibc 2.26),
# AL2023, Ubuntu 22.04/24.04 and Debian 12.
#
# Why: a plain `cargo build --release` links against the build machine's glibc and requires its
# symbol versions (on Debian 12, GLIBC_2.34 for __libc_start_main and pthread_*), so the binary
# fails to start on Amazon Linux 2 with "version `GLIBC_2.34' not found". `cargo zigbuild` links
# against glibc 2.26 stubs instead (the `.2.26` suffix of the target), and zig is the C compiler
# and linker, also for cross builds.
#
# Usage: scripts/release.sh [--target TRIPLE]
#   TRIPLE defaults to <this machine's arch>-unknown-linux-gnu.2.26, e.g.
#   x86_64-unknown-linux-gnu.2.26; aarch64-unknown-linux-gnu.2.26 is for Graviton and needs the
#   Rust target (`rustup target add aarch64-unknown-linux-gnu`) unless built on a Graviton host.
#
# Installs the PyPI packages ziglang and cargo-zigbuild (pinned below) into python3 with pip if
# they are missing. Writes target/release-glibc/imds-hop-proxy-<arch> (under $CARGO_TARGET_DIR
# when that is set) and a .sha256 file beside it. Progress goes to stderr; stdout is one
# `sha256sum` line, "<hash>  <absolute path>", which the installer requires.
#
# Exit codes: 1 build failed, 64 bad usage, 69 a tool could not be found or installed.
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned so that a release is rebuilt with the toolchain it was tested with.
ZIGLANG_VERSION=${ZIGLANG_VERSION:-0.17.1}
CARGO_ZIGBUILD_VERSION=${CARGO_ZIGBUILD_VERSION:-0.24.0}
readonly EX_USAGE=64 EX_UNAVAILABLE=69

say() { echo "release.sh: $*" >&2; }
die() {
  local code=$1
  shift
  say "error: $*"
  exit "$code"
}

target="$(uname -m)-unknown-linux-gnu.2.26"
while [ $# -gt 0 ]; do
  case "$1" in
    --target)
      [ $# -ge 2 ] ||
        die $EX_USAGE "--target needs a value, e.g. --target aarch64-unknown-linux-gnu.2.26"
      target=$2
      shift 2
      ;;
    --target=*)
      target=${1#--target=}
      shift
      ;;
    -h | --help)
      sed -n '2,/^set -euo/{/^#/s/^# \{0,1\}//p}' "$0"
      exit 0
      ;;
    *) die $EX_USAGE "unknown argument '$1'; usage: scripts/release.sh [--target TRIPLE]" ;;
  esac
done

# The Rust target is the triple without cargo-zigbuild's glibc suffix.
rust_target=$(sed -E 's/\.[0-9]+\.[0-9]+$//' <<<"$target")
arch=${rust_target%%-*}
# Without the glibc suffix zig would pick its own default glibc, not our baseline.
[[ "$target" =~ ^(x86_64|aarch64)-unknown-linux-gnu\.2\.[0-9]+$ ]] ||
  die $EX_USAGE "unsupported target '$target': use x86_64-unknown-linux-gnu.2.26 or
  aarch64-unknown-linux-gnu.2.26 (the .2.26 suffix is the glibc baseline)"

. scripts/ensure-tools.sh
cargo=$(find_cargo) || exit $EX_UNAVAILABLE
# `cargo zigbuild` runs cargo-zigbuild from PATH, which in turn runs cargo and rustc from PATH.
PATH="$(dirname "$cargo"):$PATH"

# The Rust standard library for the target must be installed; rustup cannot fetch it offline.
sysroot=$(rustc --print sysroot) || die $EX_UNAVAILABLE "rustc not found next to $cargo"
if [ ! -d "$sysroot/lib/rustlib/$rust_target/lib" ]; then
  die $EX_UNAVAILABLE "Rust target $rust_target is not installed in $sysroot.
  Install it with: rustup target add $rust_target   (needs network access to the Rust
  distribution server; where that is unreachable, build on a host of that architecture
  instead, e.g. on a Graviton instance for aarch64, where it is the native target)."
fi

command -v python3 >/dev/null ||
  die $EX_UNAVAILABLE "python3 not found: install python3 and python3-pip (apt-get or dnf);
  pip installs zig (PyPI package ziglang) and cargo-zigbuild into it"
python3 -m pip --version >/dev/null 2>&1 ||
  die $EX_UNAVAILABLE "pip not found for $(command -v python3): install python3-pip (apt-get or
  dnf) or run python3 -m ensurepip; pip installs ziglang and cargo-zigbuild"

installed_version() {
  python3 - "$1" <<'EOF' 2>/dev/null
import importlib.metadata, sys
print(importlib.metadata.version(sys.argv[1]))
EOF
}
wanted=()
for spec in "ziglang==$ZIGLANG_VERSION" "cargo-zigbuild==$CARGO_ZIGBUILD_VERSION"; do
  have=$(installed_version "${spec%%==*}" || true)
  if [ "$have" != "${spec##*==}" ]; then
    say "${spec%%==*} ${have:-not installed}, want ${spec##*==}"
    wanted+=("$spec")
  fi
done
if [ ${#wanted[@]} -gt 0 ]; then
  say "running: python3 -m pip install ${wanted[*]}"
  if ! python3 -m pip install --disable-pip-version-check "${wanted[@]}" >&2; then
    die $EX_UNAVAILABLE "pip could not install ${wanted[*]} (see pip's message above).
  If the registry is unreachable, install them where it is reachable; if pip refuses with
  'externally-managed-environment', run this script from a virtualenv (python3 -m venv) or
  with PIP_BREAK_SYSTEM_PACKAGES=1."
  fi
fi
say "using ziglang $ZIGLANG_VERSION and cargo-zigbuild $CARGO_ZIGBUILD_VERSION"

# pip puts cargo-zigbuild in this Python's scripts directory, which may not be on PATH (pip
# --user, sudo). Pin zig to the one from the ziglang package rather than any zig on PATH.
scripts_dir=$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')
user_scripts_dir=$(python3 -c 'import sysconfig as s; print(s.get_path("scripts", "posix_user"))')
PATH="$scripts_dir:$user_scripts_dir:$PATH"
ziglang_dir=$(python3 -c 'import os, ziglang; print(os.path.dirname(ziglang.__file__))')
CARGO_ZIGBUILD_ZIG_PATH="$ziglang_dir/zig"
export PATH CARGO_ZIGBUILD_ZIG_PATH
command -v cargo-zigbuild >/dev/null ||
  die $EX_UNAVAILABLE "cargo-zigbuild was installed but is not in $scripts_dir or $user_scripts_dir"

say "running: cargo zigbuild --release --locked --bin imds-hop-proxy --target $target"
"$cargo" zigbuild --release --locked --bin imds-hop-proxy --target "$target" ||
  die 1 "cargo zigbuild failed for $target (see above)"

target_dir=${CARGO_TARGET_DIR:-target}
built="$target_dir/$rust_target/release/imds-hop-proxy"
[ -x "$built" ] || die 1 "the build succeeded but $built is missing"
out_dir="$target_dir/release-glibc"
mkdir -p "$out_dir"
out_dir=$(cd "$out_dir" && pwd)
name="imds-hop-proxy-$arch"
cp "$built" "$out_dir/$name"
(cd "$out_dir" && sha256sum "$name" >"$name.sha256")
say "wrote $out_dir/$name and $out_dir/$name.sha256"
sha256sum "$out_dir/$name"
