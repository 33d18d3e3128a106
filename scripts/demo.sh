#!/usr/bin/env bash
# The main job, end to end on this machine: builds a model EC2 host in network namespaces
# (IMDS with hop limit 1, a Docker bridge, a container), shows the container's token request
# failing, starts imds-hop-proxy, shows the container getting a token and credentials, stops
# it, and removes everything (also on Ctrl-C). Needs root for the namespaces.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-tools.sh
if [ "$(id -u)" -ne 0 ]; then
  echo "the demo builds network namespaces and firewall rules: run it as root (sudo $0)" >&2
  exit 77
fi
ensure_tools
cargo=$(find_cargo)
echo "building imds-hop-proxy ..." >&2
"$cargo" build --quiet --locked --bin imds-hop-proxy
exec target/debug/imds-hop-proxy demo
