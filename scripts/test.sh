#!/usr/bin/env bash
# Runs every test: unit tests, the binary on loopback, the real AWS SDK client, and the
# end-to-end tests in network namespaces (those need root; as another user they fail and say
# so, unless IMDS_HOP_PROXY_SKIP_ROOT_TESTS=1). Extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/ensure-tools.sh
if [ "$(id -u)" -eq 0 ]; then ensure_tools; fi
cargo=$(find_cargo)
exec "$cargo" test --locked "$@"
