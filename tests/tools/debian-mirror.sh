#!/usr/bin/env bash
# Print the Debian archive URI this machine's apt is configured with (deb822 or one-line format),
# so test tooling fetches from the same mirror as apt does. Override with DEBIAN_MIRROR.
set -euo pipefail
if [ -n "${DEBIAN_MIRROR:-}" ]; then
  echo "$DEBIAN_MIRROR"
  exit 0
fi
shopt -s nullglob
for f in /etc/apt/sources.list.d/*.sources; do
  uri=$(awk '/^URIs:/ {print $2; exit}' "$f")
  case "$uri" in
    *security*|"") ;;
    *) echo "$uri"; exit 0 ;;
  esac
done
for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
  [ -f "$f" ] || continue
  uri=$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|file):/) { print $i; exit } }' "$f" | grep -v security | head -n1 || true)
  if [ -n "$uri" ]; then echo "$uri"; exit 0; fi
done
echo "debian-mirror.sh: no Debian mirror found in /etc/apt; set DEBIAN_MIRROR" >&2
exit 1
