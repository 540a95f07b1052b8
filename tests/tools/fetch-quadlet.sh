#!/usr/bin/env bash
# Fetch podman's quadlet generator from Debian's podman package of a newer suite (trixie by
# default: podman 5.4 with quadlet) and print its path. The binary only needs libc, so it runs on
# Debian 12 too. Cached under $HOMELAB_IMMICH_CACHE/quadlet/<suite>; REFRESH=1 fetches again.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${HOMELAB_IMMICH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/homelab-immich}
suite=${QUADLET_SUITE:-trixie}
dest=$cache/quadlet/$suite
if [ -x "$dest/quadlet" ] && [ -z "${REFRESH:-}" ]; then
  echo "$dest/quadlet"
  exit 0
fi
mirror=$("$here/debian-mirror.sh")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$dest"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $suite main" >"$work/sources.list"
opts=(-o "Dir::State::Lists=$work/lists" -o "Dir::Etc::SourceList=$work/sources.list"
      -o "Dir::Etc::SourceParts=/nonexistent" -o "Dir::Cache=$work/cache"
      -o "Dir::State::status=/dev/null" -o "APT::Sandbox::User=root" -o "Debug::NoLocking=1")
apt-get "${opts[@]}" -qq update >&2
(cd "$work" && apt-get "${opts[@]}" -qq download podman >&2)
dpkg -x "$work"/podman_*.deb "$work/root"
install -m 0755 "$work/root/usr/libexec/podman/quadlet" "$dest/quadlet.new"
mv "$dest/quadlet.new" "$dest/quadlet"
basename "$work"/podman_*.deb >"$dest/SOURCE"
echo "$dest/quadlet"
