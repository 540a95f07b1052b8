"""Build (or find in the cache) everything the VM scenarios boot from, and say which was there.

    prebuild.py

In order: the tools fetched from Debian 13 packages (quadlet generator, promtool), the VM image
(vm.py build), the offline test images (tests/images/build.py), and the disk layer with those
images already loaded (vm.py preload). Each entry's time and whether it was a cache hit go to
build/timings/prebuild.json, which `make test` (tests/suite.py) puts in its table.
"""

import json
import os
import subprocess
import sys
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


def tool(script):
    return subprocess.run([os.path.join(REPO, "tests", "tools", script)], capture_output=True, text=True,
                          check=True).stdout.strip()


def main():
    caches = {}
    for name, script, package in (("quadlet-generator", "fetch-quadlet.sh", "podman"),
                                  ("promtool", "fetch-promtool.sh", "promtool")):
        hit = os.path.exists(os.path.join(vm.CACHE, "debfile", "trixie", package, "SOURCE"))
        timed(caches, name, hit, lambda s=script: tool(s), "debfile/trixie/" + package)
    hit = os.path.exists(os.path.join(vm.image_dir(), "DONE"))
    timed(caches, "vm-image", hit, vm.build, "vm/" + vm.image_key())
    archive = images.archive_path()
    hit = os.path.exists(archive)
    timed(caches, "test-images", hit, images.build, "images/" + images.inputs_hash())
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
