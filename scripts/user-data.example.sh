#!/bin/bash
# EC2 user-data (launch template, "Advanced details" > "User data"): installs imds-hop-proxy at
# first boot, on Amazon Linux 2023 and 2, Ubuntu 22.04/24.04 and Debian 12. Replace BASE with
# where you publish a release (install.sh and the binaries from scripts/release.sh) and the two
# digests with that release's (`sha256sum install.sh imds-hop-proxy-x86_64`; for Graviton use
# the aarch64 binary and its digest). The line checks install.sh before running it, and
# install.sh refuses a binary whose SHA-256 differs. It is idempotent: the same line upgrades.
#
# The one line to paste (after the #!/bin/bash line):
curl -fsSLo /tmp/ihp-install.sh BASE/install.sh && echo "INSTALL_SH_SHA256  /tmp/ihp-install.sh" | sha256sum -c --quiet - && bash /tmp/ihp-install.sh --url BASE/imds-hop-proxy-x86_64 --sha256 BINARY_SHA256
