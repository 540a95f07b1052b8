#!/usr/bin/env bash
# Install the Debian packages the tests, the VM harness and `make demo` need, when missing.
# Quick when everything is there; needs root (apt) otherwise.
set -euo pipefail
#   host-deps.sh          what make test needs
#   host-deps.sh demo     and what make demo needs besides (headless Chromium for its web UI check)
packages=(make git shellcheck btrfs-progs e2fsprogs util-linux dpkg apt debian-archive-keyring
          debootstrap qemu-system-x86 qemu-utils openssh-client nftables)
[ "${1:-}" != demo ] || packages+=(chromium)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# npm fetches node and pnpm for the real server's test image (tests/images/server.py, make demo);
# any npm serves (the machine's own, e.g. NodeSource's nodejs, or Debian's package)
command -v npm >/dev/null || missing+=(npm)
[ "${#missing[@]}" -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "host-deps: missing Debian packages: ${missing[*]} (run as root, or install them)" >&2
  exit 1
fi
echo "host-deps: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
