"""Contract stand-in for immich-server, for tests only (never a default of any role).

It reads the configuration the real server reads and answers GET /api/server/ping with
{"res":"pong"} only while it really can: connect to PostgreSQL and use the vector extension,
SET/GET in Valkey, reach the ML service's /ping, and write to the upload directory.

Configuration (as upstream v3.1.0): DB_HOSTNAME, DB_PORT, DB_USERNAME, DB_PASSWORD (or
DB_PASSWORD_FILE, or $CREDENTIALS_DIRECTORY/DB_PASSWORD), DB_DATABASE_NAME, DB_VECTOR_EXTENSION,
REDIS_HOSTNAME, REDIS_PORT, REDIS_PASSWORD(_FILE), IMMICH_MACHINE_LEARNING_URL, IMMICH_HOST,
IMMICH_PORT, IMMICH_MEDIA_LOCATION (/data), IMMICH_TELEMETRY_INCLUDE (metrics on 8081/8082).

Test variants of the image set, in the image's own environment: STANDIN_VERSION (the version
/api/server/version reports, default 3.1.0) and STANDIN_NEVER_HEALTHY=1 (an update that never
becomes healthy: the ping answers 503 whatever the checks say).
"""

import ipaddress
import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_major, _minor, _patch = (int(x) for x in os.environ.get("STANDIN_VERSION", "3.1.0").split("."))
VERSION = {"major": _major, "minor": _minor, "patch": _patch, "prerelease": None}
NEVER_HEALTHY = os.environ.get("STANDIN_NEVER_HEALTHY") == "1"
STARTED = time.time()


def setting(name, default=None):
    """VAR, VAR_FILE, or $CREDENTIALS_DIRECTORY/VAR, as the real start.sh resolves them."""
    path = os.environ.get(name + "_FILE")
    if path:
        with open(path) as f:
            return f.read().strip()
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if creds and os.path.isfile(os.path.join(creds, name)):
        with open(os.path.join(creds, name)) as f:
            return f.read().strip()
    return os.environ.get(name, default)


def check_database():
    import psycopg2  # Debian's python3-psycopg2, in the stand-in image

    ext = (setting("DB_VECTOR_EXTENSION") or "pgvector").lower()
    name = {"pgvector": "vector", "vectorchord": "vchord"}.get(ext)
    if name is None:
        raise RuntimeError("DB_VECTOR_EXTENSION=%s is not supported (pgvector or vectorchord)" % ext)
    conn = psycopg2.connect(host=setting("DB_HOSTNAME", "database"), port=int(setting("DB_PORT", "5432")),
                            user=setting("DB_USERNAME", "postgres"), password=setting("DB_PASSWORD", "postgres"),
                            dbname=setting("DB_DATABASE_NAME", "immich"), connect_timeout=3)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute("CREATE EXTENSION IF NOT EXISTS %s CASCADE" % name)
            cur.execute("SELECT '[1,2,3]'::vector <-> '[1,2,5]'::vector")
            distance = cur.fetchone()[0]
            if abs(distance - 2.0) > 1e-6:
                raise RuntimeError("vector distance %r, expected 2.0" % distance)
            cur.execute("CREATE TABLE IF NOT EXISTS standin_checks (at timestamptz DEFAULT now())")
            cur.execute("INSERT INTO standin_checks DEFAULT VALUES")
            cur.execute("SELECT version()")
            return cur.fetchone()[0].split(" on ")[0]
    finally:
        conn.close()


def resp_command(sock, *args):
    words = [x.encode() if isinstance(x, str) else x for x in args]
    payload = b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)
    sock.sendall(payload)
    data = sock.recv(65536)
    if data.startswith(b"-"):
        raise RuntimeError(data.decode().strip())
    return data


def check_redis():
    with socket.create_connection((setting("REDIS_HOSTNAME", "redis"), int(setting("REDIS_PORT", "6379"))),
                                  timeout=3) as s:
        password = setting("REDIS_PASSWORD")
        if password:
            resp_command(s, "AUTH", password)
        token = "%d-%f" % (os.getpid(), time.time())
        resp_command(s, "SET", "immich-standin:check", token)
        got = resp_command(s, "GET", "immich-standin:check")
        if token.encode() not in got:
            raise RuntimeError("GET returned %r" % got)
        return "SET/GET ok"


def check_ml():
    url = (setting("IMMICH_MACHINE_LEARNING_URL") or "http://immich-machine-learning:3003").rstrip("/")
    with urllib.request.urlopen(url + "/ping", timeout=3) as r:
        body = r.read().decode().strip()
    if body != "pong":
        raise RuntimeError("%s/ping answered %r" % (url, body))
    return url


def check_media():
    media = setting("IMMICH_MEDIA_LOCATION", "/data")
    path = os.path.join(media, ".immich-standin-check")
    token = str(time.time())
    with open(path, "w") as f:
        f.write(token)
    with open(path) as f:
        if f.read() != token:
            raise RuntimeError("read back a different value")
    return media


def check_config():
    """IMMICH_TRUSTED_PROXIES and IMMICH_TELEMETRY_INCLUDE as the real server parses them."""
    proxies = [p.strip() for p in (setting("IMMICH_TRUSTED_PROXIES") or "").split(",") if p.strip()]
    for proxy in proxies:
        if proxy not in ("linklocal", "uniquelocal", "loopback"):
            ipaddress.ip_network(proxy, strict=False)
    groups = [g.strip() for g in (setting("IMMICH_TELEMETRY_INCLUDE") or "").split(",") if g.strip()]
    unknown = set(groups) - {"all", "host", "api", "io", "repo", "job"}
    if unknown:
        raise ValueError("unknown telemetry groups %s" % sorted(unknown))
    return {"trusted_proxies": proxies, "telemetry": groups}


CHECKS = {"config": check_config, "database": check_database, "redis": check_redis, "machine_learning": check_ml, "media": check_media}
_cache = {"at": 0.0, "result": None}
_lock = threading.Lock()


def run_checks():
    with _lock:
        if time.time() - _cache["at"] < 1.0:
            return _cache["result"]
        result = {}
        for name, fn in CHECKS.items():
            try:
                result[name] = {"ok": True, "detail": fn()}
            except Exception as exc:  # every failure is reported, none is fatal
                result[name] = {"ok": False, "detail": "%s: %s" % (type(exc).__name__, exc)}
        _cache.update(at=time.time(), result=result)
        return result


class Handler(BaseHTTPRequestHandler):
    server_version = "immich-server-standin"

    def reply(self, code, body, ctype="application/json"):
        data = body if isinstance(body, bytes) else json.dumps(body, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server naming)
        path = self.path.split("?")[0]
        if path == "/api/server/ping":
            checks = run_checks()
            if NEVER_HEALTHY:
                return self.reply(503, {"res": "unavailable", "checks": checks, "standin": "never healthy"})
            if all(c["ok"] for c in checks.values()):
                return self.reply(200, {"res": "pong"})
            return self.reply(503, {"res": "unavailable", "checks": checks})
        if path == "/api/server/version":
            return self.reply(200, VERSION)
        if path == "/api/server/standin-checks":
            return self.reply(200, run_checks())
        if path == "/api/server/config":
            return self.reply(200, {"isInitialized": False, "isOnboarded": False, "maintenanceMode": False})
        return self.reply(404, {"message": "Not found (stand-in)"})

    def log_message(self, fmt, *args):
        sys.stderr.write("server-standin: %s\n" % (fmt % args))


class Metrics(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802
        checks = run_checks() if self.server.server_port == 8081 else {}
        lines = ["# HELP immich_standin_up The stand-in serves metrics.", "# TYPE immich_standin_up gauge",
                 "immich_standin_up 1", "# HELP process_start_time_seconds Start time of the process.",
                 "# TYPE process_start_time_seconds gauge", "process_start_time_seconds %d" % STARTED]
        if checks:
            lines += ["# HELP immich_standin_check_ok 1 when the stand-in's contract check passes.",
                      "# TYPE immich_standin_check_ok gauge"]
        for name, c in checks.items():
            lines.append('immich_standin_check_ok{check="%s"} %d' % (name, 1 if c["ok"] else 0))
        data = ("\n".join(lines) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, fmt, *args):
        pass


def main():
    # as upstream's server under tini: node ends on SIGTERM by the signal, tini exits 128 + 15
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    host = setting("IMMICH_HOST", "0.0.0.0")
    port = int(setting("IMMICH_PORT", "2283"))
    if setting("IMMICH_TELEMETRY_INCLUDE"):
        for mport in (int(setting("IMMICH_API_METRICS_PORT", "8081")),
                      int(setting("IMMICH_MICROSERVICES_METRICS_PORT", "8082"))):
            srv = ThreadingHTTPServer((host, mport), Metrics)
            threading.Thread(target=srv.serve_forever, daemon=True).start()
    print("server-standin: listening on %s:%d" % (host, port), flush=True)
    ThreadingHTTPServer((host, port), Handler).serve_forever()


if __name__ == "__main__":
    main()
