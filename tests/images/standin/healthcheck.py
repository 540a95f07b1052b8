"""The ML image's health check, as upstream's machine-learning/scripts/healthcheck.py: 200 on /ping."""

import os
import sys
import urllib.request

try:
    with urllib.request.urlopen("http://localhost:%s/ping" % os.environ.get("IMMICH_PORT", "3003"), timeout=2) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:  # any failure is unhealthy
    sys.exit(1)
