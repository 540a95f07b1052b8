#!/usr/bin/env bash
# fetch-deb-file.sh PACKAGE PATH-IN-PACKAGE
# Fetch one executable from a Debian package of a newer suite (trixie by default) through this
# machine's apt mirror, and print where it is cached: podman's quadlet generator and promtool
# only need libc, so they run on Debian 12 too. Cached under
# $HOMELAB_IMMICH_CACHE/debfile/<suite>/<package>/; REFRESH=1 fetches again.
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 PACKAGE PATH-IN-PACKAGE" >&2; exit 2; }
package=$1
inside=${2#/}
here=$(cd "$(dirname "$0")" && pwd)
cache=${HOMELAB_IMMICH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/homelab-immich}
suite=${DEB_SUITE:-trixie}
dest=$cache/debfile/$suite/$package
name=$(basename "$inside")
if [ -x "$dest/$name" ] && [ -z "${REFRESH:-}" ]; then
  echo "$dest/$name"
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
(cd "$work" && apt-get "${opts[@]}" -qq download "$package" >&2)
dpkg -x "$work/${package}"_*.deb "$work/root"
install -m 0755 "$work/root/$inside" "$dest/$name.new"
mv "$dest/$name.new" "$dest/$name"
basename "$work/${package}"_*.deb >"$dest/SOURCE"
echo "$dest/$name"
