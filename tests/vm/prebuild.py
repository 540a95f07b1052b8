"""Build (or find in the cache) everything the VM scenarios boot from, and say which was there.

    prebuild.py

In order: the tools fetched from Debian 13 packages (quadlet generator, promtool), the VM image
(vm.py build) and the offline test images (tests/images/build.py) side by side (two independent
debootstraps, each waiting on the package mirror much of the time), then the disk layer with those
images already loaded (vm.py preload), which needs both. Each entry's time and whether it was a cache hit go to
build/timings/prebuild.json, which `make test` (tests/suite.py) puts in its table.
"""

import json
import os
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "tests", "images"))

import build as images  # noqa: E402  (tests/images/build.py)
import vm  # noqa: E402


def timed(caches, name, hit, fn, key=""):
    t0 = time.time()
    result = fn()
    caches[name] = {"hit": hit, "seconds": round(time.time() - t0, 1), "key": key}
    print("prebuild: %-18s %-4s %6.1f s  %s" % (name, "hit" if hit else "miss", caches[name]["seconds"], result),
          flush=True)
    return result


def side_by_side(caches, entries):
    """timed() for each (name, hit, fn, key) in its own thread; the first failure is raised once all ended."""
    errors = []

    def one(name, hit, fn, key):
        try:
            timed(caches, name, hit, fn, key)
        except BaseException as e:  # SystemExit from vm.py and build.py included
            errors.append((name, e))

    threads = [threading.Thread(target=one, args=entry) for entry in entries]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        name, error = errors[0]
        print("prebuild: %s failed: %s" % (name, error), file=sys.stderr, flush=True)
        raise error


def tool(script):
    return subprocess.run([os.path.join(REPO, "tests", "tools", script)], capture_output=True, text=True,
                          check=True).stdout.strip()


def main():
    caches = {}
    for name, script, package in (("quadlet-generator", "fetch-quadlet.sh", "podman"),
                                  ("promtool", "fetch-promtool.sh", "promtool")):
        hit = os.path.exists(os.path.join(vm.CACHE, "debfile", "trixie", package, "SOURCE"))
        timed(caches, name, hit, lambda s=script: tool(s), "debfile/trixie/" + package)
    archive = images.archive_path()
    side_by_side(caches, [
        ("vm-image", os.path.exists(os.path.join(vm.image_dir(), "DONE")), vm.build, "vm/" + vm.image_key()),
        ("test-images", os.path.exists(archive), images.build, "images/" + images.inputs_hash())])
    hit = os.path.exists(vm.preload_path(archive))
    timed(caches, "preload-layer", hit, lambda: vm.preload(archive),
          "vm/%s/preload/%s" % (vm.image_key(), vm.preload_key(archive)))
    out = os.path.join(REPO, "build", "timings")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "prebuild.json"), "w") as f:
        json.dump({"caches": caches}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
