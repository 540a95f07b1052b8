#!/bin/sh
# Valkey from Debian with the defaults of the official valkey image: listen on all addresses,
# no protected mode (the container network is the boundary), data in /data.
set -eu
if [ "${1:-valkey-server}" = valkey-server ]; then
  [ $# -gt 0 ] && shift
  exec valkey-server --bind '* -::*' --protected-mode no --dir /data "$@"
fi
exec "$@"
