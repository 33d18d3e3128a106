#!/usr/bin/env bash
# Installs the system tools the demo and the end-to-end tests drive, if any is missing:
#   iproute2  - ip netns, veth pairs, bridges (the model of an EC2 host)
#   nftables  - the nft backend
#   iptables  - the iptables-nft and iptables-legacy backends (both ship in this package)
#   conntrack - clearing IMDS flows that predate the redirect rules
#   curl      - HTTP clients inside the namespaces
#   debootstrap, systemd-container - a Debian 12 root booted with systemd-nspawn for the tests
#               under a real systemd (tests/systemd.rs)
#   binutils, python3, python3-pip - scripts/release.sh and its test (pip installs ziglang and
#               cargo-zigbuild; readelf reads the binary's glibc symbol versions)
# Sourced by scripts/demo.sh and scripts/test.sh; needs root to install (apt-get or dnf).
ensure_tools() {
  local missing=()
  command -v ip >/dev/null || missing+=(iproute2)
  command -v nft >/dev/null || missing+=(nftables)
  { command -v iptables-nft >/dev/null && command -v iptables-legacy >/dev/null; } || missing+=(iptables)
  command -v conntrack >/dev/null || missing+=(conntrack)
  command -v curl >/dev/null || missing+=(curl)
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  command -v systemd-nspawn >/dev/null || missing+=(systemd-container)
  command -v readelf >/dev/null || missing+=(binutils)
  command -v python3 >/dev/null || missing+=(python3)
  python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
  [ ${#missing[@]} -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing tools: ${missing[*]}; run this script as root (sudo) to install them" >&2
    return 1
  fi
  echo "installing ${missing[*]} ..." >&2
  if command -v apt-get >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  elif command -v dnf >/dev/null; then
    # Fedora and Amazon Linux name some of them differently.
    local rpm=() name
    for name in "${missing[@]}"; do
      case "$name" in
        iproute2) rpm+=(iproute) ;;
        iptables) rpm+=(iptables-nft iptables-legacy) ;;
        conntrack) rpm+=(conntrack-tools) ;;
        *) rpm+=("$name") ;;
      esac
    done
    dnf install -y -q "${rpm[@]}"
  else
    echo "no apt-get or dnf: install ${missing[*]} by hand" >&2
    return 1
  fi
}

# Finds cargo also under sudo, where root's PATH lacks the invoking user's ~/.cargo/bin.
find_cargo() {
  local candidate
  for candidate in "$(command -v cargo || true)" "${CARGO_HOME:-$HOME/.cargo}/bin/cargo" \
                   "$(getent passwd "${SUDO_USER:-}" | cut -d: -f6)/.cargo/bin/cargo"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  done
  echo "cargo not found: install the Rust toolchain (https://rustup.rs) or put cargo on PATH" >&2
  return 1
}
