#!/usr/bin/env bash
# Removes imds-hop-proxy from a host, as root, leaving it as before scripts/install.sh: stops and
# disables the units, removes every redirect rule of ours from every firewall backend, then
# deletes the units (and their drop-ins), /etc/tmpfiles.d/imds-hop-proxy.conf, the binary and
# /etc/imds-hop-proxy, and reloads systemd. Idempotent; safe on a host where it was never
# installed. Containers on the bridges are then back at the host's default: their token
# requests time out at hop limit 1.
#
#   uninstall.sh [--keep-config]
#
# Exit codes: 0 removed, 1 something of ours is still there (named), 64 bad usage, 77 not root.
set -euo pipefail

readonly BIN=/usr/local/bin/imds-hop-proxy
readonly UNIT_DIR=/etc/systemd/system
readonly CONFIG_DIR=/etc/imds-hop-proxy
readonly TMPFILES=/etc/tmpfiles.d/imds-hop-proxy.conf
readonly UNITS=(imds-hop-proxy.target imds-hop-proxy.service imds-hop-proxy-rules.service
  imds-hop-proxy.socket)
# Our rules, as README.md's "The redirect rules" names them; used when the binary is gone.
readonly NFT_FAMILY=inet NFT_TABLE=imds_hop_proxy
readonly IPT_NAT_CHAIN=IMDS-HOP-PROXY IPT_GUARD_CHAIN=IMDS-HOP-PROXY-GUARD
readonly EX_USAGE=64 EX_NOPERM=77

say() { echo "uninstall.sh: $*" >&2; }

keep_config=false
while [ $# -gt 0 ]; do
  case "$1" in
    --keep-config) keep_config=true; shift ;;
    -h | --help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) say "error: unknown argument: $1 (usage: uninstall.sh [--keep-config])"; exit $EX_USAGE ;;
  esac
done
[ "$(id -u)" -eq 0 ] || { say "error: run as root (sudo $0)"; exit $EX_NOPERM; }

# --- units: stop (which removes the rules), disable ----------------------------------------
if [ -d /run/systemd/system ]; then
  # One systemctl call waits for all four jobs, the rules unit's `rules remove` included.
  systemctl stop "${UNITS[@]}" 2>/dev/null || true
  systemctl disable --quiet "${UNITS[@]}" 2>/dev/null || true
fi

# --- rules: every backend, whatever the units did ------------------------------------------
config_args=()
[ -f "$CONFIG_DIR/config.toml" ] && config_args=(--config "$CONFIG_DIR/config.toml")
if [ -x "$BIN" ]; then
  for backend in nft iptables-nft iptables-legacy; do
    case $backend in
      nft) tool=nft ;;
      *) tool=$backend ;;
    esac
    command -v "$tool" >/dev/null || continue
    "$BIN" rules remove --rules-backend "$backend" "${config_args[@]}" >/dev/null 2>&1 ||
      "$BIN" rules remove --rules-backend "$backend" >/dev/null 2>&1 ||
      say "warning: imds-hop-proxy rules remove --rules-backend $backend failed"
  done
fi
# By name as well (also when the binary is already gone): idempotent, touches nothing else.
if command -v nft >/dev/null; then
  nft delete table "$NFT_FAMILY" "$NFT_TABLE" 2>/dev/null || true
fi
# True when `$1 -t $2` can hold our chain without being created by looking: a legacy table
# exists only once listed in /proc/net/ip{,6}_tables_names (touching one would load its
# module and create it); iptables-nft's tables are checked with nft.
has_table() {
  case $1 in
    iptables-legacy) grep -qx "$2" /proc/net/ip_tables_names 2>/dev/null ;;
    ip6tables-legacy) grep -qx "$2" /proc/net/ip6_tables_names 2>/dev/null ;;
    iptables-nft) command -v nft >/dev/null && nft list table ip "$2" >/dev/null 2>&1 ;;
    ip6tables-nft) command -v nft >/dev/null && nft list table ip6 "$2" >/dev/null 2>&1 ;;
  esac
}
for ipt in iptables-nft ip6tables-nft iptables-legacy ip6tables-legacy; do
  command -v "$ipt" >/dev/null || continue
  for spec in "nat PREROUTING $IPT_NAT_CHAIN" "filter INPUT $IPT_GUARD_CHAIN"; do
    read -r table parent chain <<<"$spec"
    has_table "$ipt" "$table" || continue
    while "$ipt" -w 5 -t "$table" -D "$parent" -j "$chain" 2>/dev/null; do :; done
    "$ipt" -w 5 -t "$table" -F "$chain" 2>/dev/null || true
    "$ipt" -w 5 -t "$table" -X "$chain" 2>/dev/null || true
  done
done

# --- files ------------------------------------------------------------------------------------
for unit in "${UNITS[@]}"; do
  rm -f "$UNIT_DIR/$unit"
  rm -rf "$UNIT_DIR/$unit.d"
  rm -f "$UNIT_DIR"/*.wants/"$unit"
done
rm -f "$TMPFILES" "$BIN" "$BIN".new.*
$keep_config || rm -rf "$CONFIG_DIR"
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl reset-failed "${UNITS[@]}" 2>/dev/null || true
fi

# --- check ------------------------------------------------------------------------------------
left=()
for path in "$BIN" "$TMPFILES" "${UNITS[@]/#/$UNIT_DIR/}"; do
  [ -e "$path" ] && left+=("$path")
done
$keep_config || { [ -e "$CONFIG_DIR" ] && left+=("$CONFIG_DIR"); }
if command -v nft >/dev/null && nft list table "$NFT_FAMILY" "$NFT_TABLE" >/dev/null 2>&1; then
  left+=("nft table $NFT_FAMILY $NFT_TABLE")
fi
for ipt in iptables-nft ip6tables-nft iptables-legacy ip6tables-legacy; do
  command -v "$ipt" >/dev/null || continue
  for spec in "nat $IPT_NAT_CHAIN" "filter $IPT_GUARD_CHAIN"; do
    read -r table chain <<<"$spec"
    if has_table "$ipt" "$table" && "$ipt" -w 5 -t "$table" -n -L "$chain" >/dev/null 2>&1; then
      left+=("$ipt -t $table chain $chain")
    fi
  done
done
if [ ${#left[@]} -gt 0 ]; then
  say "error: still there: ${left[*]}"
  exit 1
fi
say "imds-hop-proxy removed: no unit, rule, binary or configuration of it is left"
