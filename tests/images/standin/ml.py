"""Contract stand-in for immich-machine-learning, for tests only (never a default of any role).

Answers GET /ping with "pong" (and GET / with {"message":"Immich ML"}) like the real service,
and proves its cache volume is writable: at start it writes under MACHINE_LEARNING_CACHE_FOLDER
(/cache) and exits if it cannot. Creating <cache>/standin/fail makes /ping answer 500, so tests
can make the health check fail on purpose.
"""

import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CACHE = os.environ.get("MACHINE_LEARNING_CACHE_FOLDER", "/cache")
STATE = os.path.join(CACHE, "standin")


class Handler(BaseHTTPRequestHandler):
    server_version = "immich-ml-standin"

    def reply(self, code, body, ctype):
        data = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802 (http.server naming)
        path = self.path.split("?")[0]
        if path == "/ping":
            if os.path.exists(os.path.join(STATE, "fail")):
                return self.reply(500, "failing on purpose (%s/fail exists)" % STATE, "text/plain")
            return self.reply(200, "pong", "text/plain")
        if path == "/":
            return self.reply(200, json.dumps({"message": "Immich ML"}), "application/json")
        return self.reply(404, json.dumps({"detail": "Not Found"}), "application/json")

    def log_message(self, fmt, *args):
        pass


def main():
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        os.makedirs(STATE, exist_ok=True)
        with open(os.path.join(STATE, "started"), "w") as f:
            f.write("%d\n" % time.time())
    except OSError as exc:
        print("ml-standin: the cache folder %s is not writable: %s" % (CACHE, exc), file=sys.stderr)
        sys.exit(1)
    host = os.environ.get("IMMICH_HOST", "0.0.0.0")
    port = int(os.environ.get("IMMICH_PORT", "3003"))
    print("ml-standin: listening on %s:%d, cache %s" % (host, port, CACHE), flush=True)
    ThreadingHTTPServer((host, port), Handler).serve_forever()


if __name__ == "__main__":
    main()
