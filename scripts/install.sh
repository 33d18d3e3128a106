#!/usr/bin/env bash
# Installs or upgrades imds-hop-proxy as a systemd service on an EC2 host (Amazon Linux 2023 and
# 2, Ubuntu 22.04/24.04, Debian 12), as root. Idempotent: run it again to repair or upgrade.
#
#   install.sh --binary PATH [--sha256 HEX]
#   install.sh --url URL --sha256 HEX          (EC2 user-data: see scripts/user-data.example.sh)
#
# What it does, in order:
#   1. installs missing firewall tools (nftables, iptables, conntrack) with dnf, yum or apt-get,
#      as far as the distribution has them (a warning names what could not be installed);
#   2. installs the binary as /usr/local/bin/imds-hop-proxy (copied to a temporary name beside
#      it, then renamed: a running proxy or a concurrent start never sees half a file);
#   3. writes the units to /etc/systemd/system (imds-hop-proxy.socket, .service, .target and
#      imds-hop-proxy-rules.service), /etc/tmpfiles.d/imds-hop-proxy.conf, and a default
#      /etc/imds-hop-proxy/config.toml unless one exists (an upgrade keeps the operator's);
#   4. enables and starts the socket, the rules and the service; `systemctl start` returns once
#      the proxy reported READY (rules in place, sockets served). On an upgrade (a new binary or
#      new units) it restarts the proxy instead, which drops no request: the socket unit holds
#      the listening sockets and the rules unit keeps the rules meanwhile;
#   5. checks that all four units are active and `imds-hop-proxy rules status` exits 0; if not,
#      it says what failed, shows the last 50 journal lines and exits 1.
#
# The units are embedded below (this script often runs alone, piped from curl); they are
# copies of the repository's systemd/ files, and tests/systemd.rs fails when they differ.
#
# Exit codes: 0 installed and running, 1 not running after the install (see the message),
# 64 bad usage, 69 a download or a tool failed, 77 not root.
set -euo pipefail

readonly BIN=/usr/local/bin/imds-hop-proxy
readonly UNIT_DIR=/etc/systemd/system
readonly CONFIG_DIR=/etc/imds-hop-proxy
readonly CONFIG=$CONFIG_DIR/config.toml
readonly TMPFILES=/etc/tmpfiles.d/imds-hop-proxy.conf
readonly UNITS=(imds-hop-proxy.socket imds-hop-proxy-rules.service imds-hop-proxy.service
  imds-hop-proxy.target)
readonly EX_USAGE=64 EX_UNAVAILABLE=69 EX_NOPERM=77

say() { echo "install.sh: $*" >&2; }
# True when file $2 exists with the bytes of $1 (sha256sum: coreutils is on every host, cmp
# is not).
same() { [ -f "$2" ] && [ "$(sha256sum <"$1")" = "$(sha256sum <"$2")" ]; }
die() {
  local code=$1
  shift
  say "error: $*"
  exit "$code"
}

usage() {
  sed -n '2,8p' "${BASH_SOURCE[0]}" 2>/dev/null | sed 's/^# \{0,1\}//' >&2 ||
    echo "usage: install.sh --binary PATH | --url URL --sha256 HEX" >&2
}

binary="" url="" sha256=""
while [ $# -gt 0 ]; do
  case "$1" in
    --binary) binary=${2:?--binary needs a path}; shift 2 ;;
    --url) url=${2:?--url needs a URL}; shift 2 ;;
    --sha256) sha256=${2:?--sha256 needs a hex digest}; shift 2 ;;
    -h | --help) usage; exit 0 ;;
    *) usage; die $EX_USAGE "unknown argument: $1" ;;
  esac
done
if [ -n "$binary" ] && [ -n "$url" ]; then
  die $EX_USAGE "give --binary or --url, not both"
elif [ -z "$binary" ] && [ -z "$url" ]; then
  usage
  die $EX_USAGE "give --binary PATH or --url URL --sha256 HEX"
elif [ -n "$url" ] && [ -z "$sha256" ]; then
  die $EX_USAGE "--url needs --sha256 HEX: a downloaded binary is installed only if its SHA-256 matches"
fi
sha256=$(printf '%s' "$sha256" | tr 'A-F' 'a-f')
if [ -n "$sha256" ] && ! [[ $sha256 =~ ^[0-9a-f]{64}$ ]]; then
  die $EX_USAGE "--sha256 must be 64 hex digits, got '$sha256'"
fi
[ "$(id -u)" -eq 0 ] || die $EX_NOPERM "run as root (sudo $0 ...): this installs a system service"
[ -d /run/systemd/system ] || die $EX_UNAVAILABLE "systemd is not running here: this installer sets up systemd units"

work=$(mktemp -d)
staged=""
trap 'rm -rf "$work" ${staged:+"$staged"}' EXIT

# --- 1. firewall tools ----------------------------------------------------------------------

# Installs the given packages with whichever package manager exists, one by one, so that a
# package the distribution lacks (nftables on Amazon Linux 2) does not stop the others.
install_packages() {
  local pkg manager
  if command -v dnf >/dev/null; then
    manager=dnf
  elif command -v yum >/dev/null; then
    manager=yum
  elif command -v apt-get >/dev/null; then
    manager=apt-get
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || say "warning: apt-get update failed; trying the cached package lists"
  else
    say "warning: no dnf, yum or apt-get: install $* by hand"
    return 0
  fi
  for pkg in "$@"; do
    say "installing $pkg with $manager"
    case $manager in
      apt-get) apt-get install -y -qq --no-install-recommends "$pkg" >/dev/null ;;
      *) "$manager" install -y -q "$pkg" >/dev/null ;;
    esac || say "warning: could not install $pkg with $manager"
  done
}

ensure_tools() {
  local missing=() rpm=false
  if command -v dnf >/dev/null || command -v yum >/dev/null; then rpm=true; fi
  command -v nft >/dev/null || missing+=(nftables)
  if ! command -v iptables >/dev/null; then
    # Amazon Linux 2023 splits iptables by backend; Docker there uses iptables-nft.
    if $rpm && command -v dnf >/dev/null; then missing+=(iptables-nft); else missing+=(iptables); fi
  fi
  if ! command -v conntrack >/dev/null; then
    if $rpm; then missing+=(conntrack-tools); else missing+=(conntrack); fi
  fi
  if [ -n "$url" ] && ! command -v curl >/dev/null && ! command -v wget >/dev/null; then
    missing+=(curl)
  fi
  [ ${#missing[@]} -eq 0 ] || install_packages "${missing[@]}"
  if ! command -v nft >/dev/null && ! command -v iptables >/dev/null; then
    die $EX_UNAVAILABLE "neither nft nor iptables is installed and neither could be: install nftables or iptables, then run this again"
  fi
  command -v conntrack >/dev/null ||
    say "warning: conntrack is missing: connections to IMDS opened before the rules keep their old path until they close"
}
ensure_tools

# --- 2. the binary --------------------------------------------------------------------------

fetch() {
  if command -v curl >/dev/null; then
    curl -fsSL --retry 5 --retry-delay 2 --connect-timeout 10 -o "$2" "$1"
  elif command -v wget >/dev/null; then
    wget -q --tries=5 --timeout=10 -O "$2" "$1"
  else
    die $EX_UNAVAILABLE "neither curl nor wget is installed: install one, or download the binary and use --binary"
  fi
}

# Staged beside its destination: /tmp may be mounted noexec (CIS-hardened images), and the
# final rename must not cross file systems.
staged=$BIN.new.$$
install -d -m 0755 "$(dirname "$BIN")"
if [ -n "$url" ]; then
  say "downloading $url"
  fetch "$url" "$staged" || die $EX_UNAVAILABLE "downloading $url failed"
else
  [ -f "$binary" ] || die $EX_USAGE "--binary $binary: no such file"
  cp "$binary" "$staged"
fi
if [ -n "$sha256" ]; then
  actual=$(sha256sum "$staged" | cut -d' ' -f1)
  if [ "$actual" != "$sha256" ]; then
    die $EX_UNAVAILABLE "SHA-256 mismatch for ${url:-$binary}: expected $sha256, got $actual; refusing to install it (a wrong URL, a truncated download or a tampered file)"
  fi
fi
chmod 0755 "$staged"
version=$("$staged" --version 2>&1) ||
  die $EX_UNAVAILABLE "${url:-$binary} does not run on this host: $version"

changed=false
if same "$staged" "$BIN"; then
  rm -f "$staged"
else
  mv -f "$staged" "$BIN"
  changed=true
  say "installed $BIN ($version)"
fi

# --- 3. units, tmpfiles, config -------------------------------------------------------------

# The files of the repository's systemd/ directory, byte for byte (tests/systemd.rs checks it;
# IMDS_HOP_PROXY_UPDATE_INSTALLER=1 cargo test --test systemd rewrites them from systemd/).
embedded() {
  case "$1" in
    imds-hop-proxy.socket) cat <<'IMDS_HOP_PROXY_EOF'
# The proxy's listening sockets, held by systemd while imds-hop-proxy.service restarts (an
# upgrade, a crash, a watchdog kill): container connections that arrive meanwhile wait in the
# backlog and are answered by the next process instead of being refused.
[Unit]
Description=imds-hop-proxy listening sockets
Before=docker.service containerd.service

[Socket]
# Must be the proxy's port (listen in /etc/imds-hop-proxy/config.toml, 8169 by default). On a
# kernel booted with ipv6.disable=1, drop the [::] line in a drop-in (systemctl edit).
ListenStream=0.0.0.0:8169
ListenStream=[::]:8169
BindIPv6Only=ipv6-only
# Every IMDS client on the host may connect during the few hundred milliseconds of a restart.
Backlog=4096

[Install]
WantedBy=sockets.target
IMDS_HOP_PROXY_EOF
      ;;
    imds-hop-proxy-rules.service) cat <<'IMDS_HOP_PROXY_EOF'
# Owns the redirect rules, so they outlive the proxy process: imds-hop-proxy.service runs with
# --keep-rules-on-stop, and a restart (upgrade, crash, watchdog) neither removes nor re-adds
# them. Stopping this unit removes them (imds-hop-proxy.target does so when the service is
# stopped for good).
[Unit]
Description=imds-hop-proxy redirect rules
# The socket first: the rules never send traffic to a port nobody holds. The proxy starts after
# this unit and so stops before it: the rules go only once the proxy has exited, and its
# restore loop cannot put them back. (`systemctl stop imds-hop-proxy` returns when the proxy
# has exited, a moment before the rules are gone; `systemctl stop imds-hop-proxy
# imds-hop-proxy-rules` waits for both.)
After=imds-hop-proxy.socket
Before=docker.service containerd.service

[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/bin/imds-hop-proxy rules install --config /etc/imds-hop-proxy/config.toml
ExecStop=/usr/local/bin/imds-hop-proxy rules remove --config /etc/imds-hop-proxy/config.toml
# Sandbox (identical in both services). Root, but with only the two capabilities the firewall
# tools need: CAP_NET_ADMIN for nft, iptables and conntrack, CAP_NET_RAW for iptables-legacy
# (a raw socket), which every backend runs to look for rules that block IMDS. A non-root user
# with these capabilities is not enough: the kernel lets only uid 0 read
# /proc/net/ip_tables_names, so iptables-legacy-save fails.
# /run is replaced by an empty read-only tmpfs, so the Docker and containerd sockets are out of
# reach. What stays: the notify socket, and iptables-legacy's lock, which must be the host's
# or the proxy and Docker could rewrite a legacy table at the same time
# (/etc/tmpfiles.d/imds-hop-proxy.conf creates it at boot; were it missing, iptables-legacy
# would fail on the read-only /run rather than lock a private copy).
TemporaryFileSystem=/run:ro
BindPaths=-/run/xtables.lock
BindReadOnlyPaths=-/run/systemd/notify
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_INET AF_INET6 AF_NETLINK AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
UMask=0077

[Install]
WantedBy=multi-user.target
IMDS_HOP_PROXY_EOF
      ;;
    imds-hop-proxy.service) cat <<'IMDS_HOP_PROXY_EOF'
# The proxy. Its listening sockets come from imds-hop-proxy.socket and its rules stay with
# imds-hop-proxy-rules.service, so `systemctl restart imds-hop-proxy` (an upgrade) refuses no
# container connection and never opens a window without rules; a crash or a watchdog kill
# loses only the requests the dead process held. `systemctl stop imds-hop-proxy` stops all of
# it and removes every rule (imds-hop-proxy.target).
[Unit]
Description=imds-hop-proxy: EC2 instance metadata (IMDSv2) for containers with hop limit 1
Requires=imds-hop-proxy.socket imds-hop-proxy-rules.service
Wants=imds-hop-proxy.target
After=imds-hop-proxy.socket imds-hop-proxy-rules.service
# The redirect rules must exist before any container starts.
Before=docker.service containerd.service
# A crash loop ends in "failed" rather than spinning forever.
StartLimitIntervalSec=30s
StartLimitBurst=10

[Service]
Type=notify
NotifyAccess=main
ExecStart=/usr/local/bin/imds-hop-proxy run --config /etc/imds-hop-proxy/config.toml --keep-rules-on-stop
Restart=always
# Waiting clients sit in the socket's backlog; the SDKs give up after 1 s.
RestartSec=100ms
# Exit 64 is a configuration error: restarting cannot fix it.
RestartPreventExitStatus=64
# The proxy pings every WatchdogSec/2; a stalled one is killed (SIGABRT) and restarted.
WatchdogSec=10s
# The drain (drain_timeout_ms, 3 s by default) plus the exit; raise with drain_timeout_ms.
TimeoutStopSec=30s
# Sandbox (identical in both services). Root, but with only the two capabilities the firewall
# tools need: CAP_NET_ADMIN for nft, iptables and conntrack, CAP_NET_RAW for iptables-legacy
# (a raw socket), which every backend runs to look for rules that block IMDS. A non-root user
# with these capabilities is not enough: the kernel lets only uid 0 read
# /proc/net/ip_tables_names, so iptables-legacy-save fails.
# /run is replaced by an empty read-only tmpfs, so the Docker and containerd sockets are out of
# reach. What stays: the notify socket, and iptables-legacy's lock, which must be the host's
# or the proxy and Docker could rewrite a legacy table at the same time
# (/etc/tmpfiles.d/imds-hop-proxy.conf creates it at boot; were it missing, iptables-legacy
# would fail on the read-only /run rather than lock a private copy).
TemporaryFileSystem=/run:ro
BindPaths=-/run/xtables.lock
BindReadOnlyPaths=-/run/systemd/notify
CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_RAW
NoNewPrivileges=yes
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateDevices=yes
PrivateMounts=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectClock=yes
ProtectHostname=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_INET AF_INET6 AF_NETLINK AF_UNIX
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
MemoryDenyWriteExecute=yes
RemoveIPC=yes
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @resources
SystemCallErrorNumber=EPERM
UMask=0077

[Install]
WantedBy=multi-user.target
IMDS_HOP_PROXY_EOF
      ;;
    imds-hop-proxy.target) cat <<'IMDS_HOP_PROXY_EOF'
# Turns an explicit `systemctl stop imds-hop-proxy` into a stop of everything, rules included,
# while restarts leave the socket and the rules alone. PropagatesStopTo= sits here rather than
# on the service because systemd (before 254's RestartMode=direct) also propagates it when the
# service dies and is about to be restarted (a crash, a watchdog kill): that would close the
# sockets and remove the rules for every crash. This target never dies on its own; it is
# stopped only by a stop job on the service (Requires=), and merely restarted with it.
[Unit]
Description=imds-hop-proxy (stopping imds-hop-proxy.service stops it all)
Requires=imds-hop-proxy.service
After=imds-hop-proxy.service
PropagatesStopTo=imds-hop-proxy-rules.service imds-hop-proxy.socket
IMDS_HOP_PROXY_EOF
      ;;
    imds-hop-proxy.tmpfiles.conf) cat <<'IMDS_HOP_PROXY_EOF'
# Installed as /etc/tmpfiles.d/imds-hop-proxy.conf. iptables-legacy's lock, created at boot as
# iptables itself would create it, so that imds-hop-proxy's sandbox (which sees only this file
# of /run) shares it with Docker from the first boot on.
f /run/xtables.lock 0600 root root -
IMDS_HOP_PROXY_EOF
      ;;
    config.toml) cat <<'IMDS_HOP_PROXY_EOF'
# /etc/imds-hop-proxy/config.toml: settings of `imds-hop-proxy run` and `imds-hop-proxy rules`.
# Every key is shown at its default, commented out; uncomment and change what you need, then
# `systemctl restart imds-hop-proxy` (restarts drop no request). An upgrade keeps this file.
# Flags and IMDS_HOP_PROXY_* environment variables override it; `imds-hop-proxy run --help`
# lists them all.

# Where the proxy listens. With systemd, imds-hop-proxy.socket holds the sockets: change its
# ListenStream= lines too (systemctl edit imds-hop-proxy.socket); the ports must match.
# listen = ["0.0.0.0:8169", "[::]:8169"]

# Install and keep the redirect rules. Turning this off only suits a listen address of your own.
# redirect = true

# Bridges whose IMDS traffic is redirected to the proxy; "+" is a trailing wildcard.
# allowed_interfaces = ["docker0", "br-+"]

# Firewall tool for the rules: "auto", "nft", "iptables-nft" or "iptables-legacy".
# rules_backend = "auto"

# How often the rules are checked and restored (100-5000 ms).
# rules_check_interval_ms = 2000

# Leave the rules in place when the proxy stops. The systemd unit passes --keep-rules-on-stop:
# imds-hop-proxy-rules.service owns the rules and removes them on `systemctl stop`.
# keep_rules_on_stop = false

# The real IMDS, reached from the host itself.
# upstream = "http://169.254.169.254"

# IP TTL / IPv6 hop limit of the answers to containers (1-255).
# response_ttl = 64

# Connections served at once; further clients wait in the backlog (1-65535).
# max_connections = 256

# Time a client has to send its request head, and its body (10-60000 ms).
# header_read_timeout_ms = 5000

# Largest request head (8192-1048576 bytes).
# max_header_bytes = 16384

# Largest request body (0-1048576 bytes).
# max_request_body_bytes = 4096

# Largest IMDS answer passed on (1024-67108864 bytes).
# max_response_body_bytes = 1048576

# Time to connect to IMDS (1-60000 ms).
# upstream_connect_timeout_ms = 250

# Time for IMDS's whole answer (1-60000 ms).
# upstream_response_timeout_ms = 600

# Time requests in flight get to finish on stop (0-600000 ms). Above 25000, raise
# TimeoutStopSec= of imds-hop-proxy.service as well.
# drain_timeout_ms = 3000

# Log lines: "text" or "json".
# log_format = "text"

# Log verbosity: "error", "warn", "info", "debug", "trace" or a tracing directive.
# log_level = "info"
IMDS_HOP_PROXY_EOF
      ;;
    *) die 1 "no embedded file $1" ;;
  esac
}

# Writes embedded file $1 to $2 (mode $3) when its content differs; returns 0 if it did.
place() {
  embedded "$1" >"$work/$1"
  if same "$work/$1" "$2"; then
    return 1
  fi
  install -m "$3" "$work/$1" "$2.new.$$"
  mv -f "$2.new.$$" "$2"
  say "wrote $2"
}

socket_changed=false
for unit in "${UNITS[@]}"; do
  if place "$unit" "$UNIT_DIR/$unit" 0644; then
    changed=true
    if [ "$unit" = imds-hop-proxy.socket ]; then socket_changed=true; fi
  fi
done
install -d -m 0755 /etc/tmpfiles.d
place imds-hop-proxy.tmpfiles.conf "$TMPFILES" 0644 || true
systemd-tmpfiles --create "$TMPFILES"
install -d -m 0755 "$CONFIG_DIR"
if [ -e "$CONFIG" ]; then
  say "keeping $CONFIG"
else
  place config.toml "$CONFIG" 0644 || true
fi

# --- 4. enable and start --------------------------------------------------------------------

systemctl daemon-reload
systemctl enable --quiet imds-hop-proxy.socket imds-hop-proxy-rules.service imds-hop-proxy.service
if systemctl is-active --quiet imds-hop-proxy.service && $socket_changed; then
  # systemd cannot swap a socket unit's sockets while its service runs: a full stop and start,
  # which removes and re-installs the rules (a gap of well under a second).
  say "the socket unit changed: stopping and starting imds-hop-proxy (not a zero-drop restart)"
  systemctl stop imds-hop-proxy.service
elif systemctl is-active --quiet imds-hop-proxy.service && $changed; then
  say "restarting imds-hop-proxy on the new version (the socket holds connections meanwhile)"
  systemctl restart imds-hop-proxy.service
fi
# Waits for every job: the socket's, the rules unit's, then the service's, which ends at READY.
systemctl start "${UNITS[@]}" || true # the checks below say what failed

# --- 5. check -------------------------------------------------------------------------------

failed=()
for unit in "${UNITS[@]}"; do
  state=$(systemctl is-active "$unit" 2>/dev/null) || true
  [ "$state" = active ] || failed+=("$unit is ${state:-unknown}")
done
if [ ${#failed[@]} -eq 0 ]; then
  if ! status=$("$BIN" rules status --config "$CONFIG" 2>&1); then
    failed+=("imds-hop-proxy rules status reports missing or changed rules: $status")
  fi
fi
if [ ${#failed[@]} -gt 0 ]; then
  for problem in "${failed[@]}"; do say "error: $problem"; done
  say "the last 50 lines of the journal (journalctl -u imds-hop-proxy -n 50):"
  journalctl --no-pager -n 50 -u imds-hop-proxy.service -u imds-hop-proxy-rules.service \
    -u imds-hop-proxy.socket >&2 || true
  die 1 "imds-hop-proxy is installed but not running: fix the cause above, then run install.sh again"
fi
say "imds-hop-proxy is running ($version); containers on docker0 and br-* reach IMDS through it"
