#!/usr/bin/env bash
# Print the path of podman's quadlet generator from Debian 13's podman package (podman 5.4 with
# quadlet), fetched once and cached (tests/tools/fetch-deb-file.sh; QUADLET_SUITE picks the suite).
set -euo pipefail
DEB_SUITE=${QUADLET_SUITE:-trixie} exec "$(dirname "$0")/fetch-deb-file.sh" podman /usr/libexec/podman/quadlet
