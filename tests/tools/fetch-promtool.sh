#!/usr/bin/env bash
# Print the path of promtool from Debian 13's promtool package (Prometheus 2.53), fetched once and
# cached (tests/tools/fetch-deb-file.sh): the tests check the rules and scrape configs with it.
set -euo pipefail
exec "$(dirname "$0")/fetch-deb-file.sh" promtool /usr/bin/promtool
