"""Build the offline test images from Debian trixie packages, as one docker-archive.

    build.py [--print-manifest]     build (or reuse) the archive; print its path

Images (test images only; no role uses them by default):

    localhost/homelab-immich-test/postgres:17-pgvector   PostgreSQL 17 + pgvector, official-image entrypoint contract
    localhost/homelab-immich-test/valkey:8               Valkey from Debian
    localhost/homelab-immich-test/immich-server:standin  contract stand-in for immich-server
    localhost/homelab-immich-test/immich-server:standin-next    the same, reporting v3.2.0 (an update)
    localhost/homelab-immich-test/immich-server:standin-broken  the same, never healthy (a bad update)
    localhost/homelab-immich-test/immich-machine-learning:standin  contract stand-in for immich-ml
    localhost/homelab-immich-test/postgres-exporter:0.17             Prometheus postgres_exporter from Debian
    localhost/homelab-immich-test/redis-exporter:1.69                Prometheus redis_exporter from Debian

They share one base layer (debootstrap minbase + python3, slimmed: no docs, locales, apt lists),
so a VM imports it once; each image adds one small layer, computed as the upper directory of an
overlayfs mount over the base (whiteouts become OCI ``.wh.`` entries). No container engine is
needed on the build host. The archive is cached under $HOMELAB_IMMICH_CACHE/images/<hash>, the
hash covering this file and everything under tests/images.
"""

import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
CACHE = os.environ.get("HOMELAB_IMMICH_CACHE") or os.path.join(
    os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "homelab-immich")
SUITE = "trixie"
PREFIX = "localhost/homelab-immich-test/"
BASE_PACKAGES = ["python3", "ca-certificates"]
SLIM_DIRS = ["usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian",
             "var/lib/apt/lists", "var/cache/apt", "var/cache/debconf/templates.dat-old", "var/log"]
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

IMAGES = [
    {
        "name": "postgres:17-pgvector",
        "packages": ["postgresql-17", "postgresql-17-pgvector"],
        "pre": {"etc/postgresql-common/createcluster.conf": "create_main_cluster = false\n"},
        "files": {"usr/local/bin/docker-entrypoint.sh": ("postgres/docker-entrypoint.sh", 0o755),
                  "usr/local/bin/healthcheck.sh": ("postgres/healthcheck.sh", 0o755)},
        # JIT is off, so the LLVM runtime (and its z3), the bitcode and llvmjit go; perl only runs
        # Debian's wrapper scripts (PATH puts the real binaries first); C.UTF-8 is built into glibc
        "remove": ["usr/lib/x86_64-linux-gnu/libLLVM*", "usr/lib/x86_64-linux-gnu/libz3*",
                   "usr/lib/postgresql/17/lib/llvmjit*", "usr/lib/postgresql/17/lib/bitcode",
                   "usr/share/postgresql/17/man", "usr/lib/x86_64-linux-gnu/perl", "usr/share/perl",
                   "usr/lib/x86_64-linux-gnu/libperl*", "usr/share/i18n", "usr/lib/locale/locale-archive"],
        "mkdir": {"var/lib/postgresql/data": "postgres", "var/run/postgresql": "postgres"},
        "config": {
            "Env": ["PATH=/usr/lib/postgresql/17/bin:" + PATH, "PGDATA=/var/lib/postgresql/data", "LANG=C.UTF-8"],
            "Entrypoint": ["/usr/local/bin/docker-entrypoint.sh"], "Cmd": ["postgres"],
            "ExposedPorts": {"5432/tcp": {}}, "Volumes": {"/var/lib/postgresql/data": {}},
            "StopSignal": "SIGINT",
            "Healthcheck": {"Test": ["CMD", "/usr/local/bin/healthcheck.sh"], "Interval": 30000000000,
                            "Timeout": 10000000000, "Retries": 3, "StartPeriod": 60000000000},
        },
    },
    {
        "name": "valkey:8",
        "packages": ["valkey-server", "valkey-tools"],
        "files": {"usr/local/bin/docker-entrypoint.sh": ("valkey/docker-entrypoint.sh", 0o755)},
        "mkdir": {"data": None},
        "config": {
            "Env": ["PATH=" + PATH], "Entrypoint": ["/usr/local/bin/docker-entrypoint.sh"], "Cmd": ["valkey-server"],
            "ExposedPorts": {"6379/tcp": {}}, "Volumes": {"/data": {}}, "WorkingDir": "/data",
        },
    },
    {
        "name": "immich-server:standin",
        "packages": ["python3-psycopg2", "curl"],
        "files": {"usr/src/app/server.py": ("standin/server.py", 0o644),
                  "usr/local/bin/immich-healthcheck": ("standin/immich-healthcheck", 0o755)},
        "mkdir": {"data": None},
        "config": {
            "Env": ["PATH=" + PATH, "IMMICH_MEDIA_LOCATION=/data"],
            "Entrypoint": ["python3", "/usr/src/app/server.py"], "ExposedPorts": {"2283/tcp": {}},
            "Volumes": {"/data": {}}, "WorkingDir": "/usr/src/app",
            "Healthcheck": {"Test": ["CMD", "immich-healthcheck"]},
            "Labels": {"org.opencontainers.image.title": "immich-server contract stand-in (tests only)"},
        },
        # same layers, another configuration: what update.yml is tested with
        "variants": {"immich-server:standin-next": {"Env": ["STANDIN_VERSION=3.2.0"]},
                     "immich-server:standin-broken": {"Env": ["STANDIN_NEVER_HEALTHY=1"]}},
    },
    {
        "name": "immich-machine-learning:standin",
        "packages": [],
        "files": {"usr/src/ml.py": ("standin/ml.py", 0o644), "usr/src/healthcheck.py": ("standin/healthcheck.py", 0o644)},
        "mkdir": {"cache": None},
        "config": {
            "Env": ["PATH=" + PATH, "MACHINE_LEARNING_CACHE_FOLDER=/cache"],
            "Entrypoint": ["python3", "/usr/src/ml.py"], "ExposedPorts": {"3003/tcp": {}},
            "Volumes": {"/cache": {}}, "WorkingDir": "/usr/src",
            "Healthcheck": {"Test": ["CMD", "python3", "healthcheck.py"]},
            "Labels": {"org.opencontainers.image.title": "immich-machine-learning contract stand-in (tests only)"},
        },
    },
    {
        # the upstream image (quay.io/prometheuscommunity/postgres-exporter) runs /bin/postgres_exporter as nobody
        "name": "postgres-exporter:0.17",
        "packages": ["prometheus-postgres-exporter"],
        "remove": ["etc/default/prometheus-postgres-exporter"],
        "config": {
            "Env": ["PATH=" + PATH], "Entrypoint": ["/usr/bin/prometheus-postgres-exporter"],
            "User": "65534:65534", "ExposedPorts": {"9187/tcp": {}},
        },
    },
    {
        # the upstream image (oliver006/redis_exporter) runs /redis_exporter as 59000
        "name": "redis-exporter:1.69",
        "packages": ["prometheus-redis-exporter"],
        "remove": ["etc/default/prometheus-redis-exporter"],
        "config": {
            "Env": ["PATH=" + PATH], "Entrypoint": ["/usr/bin/prometheus-redis-exporter"],
            "User": "59000:59000", "ExposedPorts": {"9121/tcp": {}},
        },
    },
]


def log(msg):
    print("images: %s" % msg, file=sys.stderr, flush=True)


def run(cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, **kw)


def inputs_hash():
    """Everything under tests/images but server.py (the real server's images, cached on their own)."""
    h = hashlib.sha256()
    for root, dirs, files in sorted(os.walk(HERE)):
        dirs.sort()
        for f in sorted(files):
            if f.endswith(".pyc") or (root == HERE and f == "server.py"):
                continue
            p = os.path.join(root, f)
            h.update(os.path.relpath(p, HERE).encode())
            with open(p, "rb") as fh:
                h.update(fh.read())
    return h.hexdigest()[:16]


def archive_path():
    return os.path.join(CACHE, "images", inputs_hash(), "homelab-immich-test-images.tar")


def mirror():
    return run([os.path.join(REPO, "tests/tools/debian-mirror.sh")], capture_output=True, text=True).stdout.strip()


def slim(root):
    for rel in SLIM_DIRS:
        path = os.path.join(root, rel)
        if os.path.isdir(path) and not os.path.islink(path):
            for entry in os.listdir(path):
                p = os.path.join(path, entry)
                shutil.rmtree(p) if os.path.isdir(p) and not os.path.islink(p) else os.unlink(p)
        elif os.path.isfile(path):
            os.unlink(path)


def build_base(work):
    base = os.path.join(work, "base")
    log("debootstrap minbase %s + %s" % (SUITE, ", ".join(BASE_PACKAGES)))
    run(["debootstrap", "--variant=minbase", "--include=" + ",".join(BASE_PACKAGES), SUITE, base, mirror()],
        stdout=subprocess.DEVNULL)
    with open(os.path.join(base, "etc/dpkg/dpkg.cfg.d/01-slim"), "w") as f:
        excluded = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "usr/share/lintian")
        f.write("".join("path-exclude=/%s/*\n" % d for d in excluded))
    with open(os.path.join(base, "etc/apt/apt.conf.d/01-slim"), "w") as f:
        f.write('APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n')
    slim(base)
    return base


def build_layer(work, base, image):
    """Install the image's packages and files over the base; return the overlay upper dir."""
    key = image["name"].replace(":", "_").replace("/", "_")
    upper, wdir, merged = (os.path.join(work, key, d) for d in ("upper", "work", "merged"))
    for d in (upper, wdir, merged):
        os.makedirs(d)
    run(["mount", "-t", "overlay", "overlay", "-o", "lowerdir=%s,upperdir=%s,workdir=%s" % (base, upper, wdir), merged])
    try:
        run(["mount", "-t", "proc", "proc", os.path.join(merged, "proc")])
        try:
            policy = os.path.join(merged, "usr/sbin/policy-rc.d")
            with open(policy, "w") as f:
                f.write("#!/bin/sh\nexit 101\n")
            os.chmod(policy, 0o755)
            for rel, content in image.get("pre", {}).items():
                path = os.path.join(merged, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "w") as f:
                    f.write(content)
            if image["packages"]:
                log("%s: apt-get install %s" % (image["name"], " ".join(image["packages"])))
                env = dict(os.environ, DEBIAN_FRONTEND="noninteractive", LC_ALL="C")
                run(["chroot", merged, "apt-get", "-qq", "update"], env=env, stdout=subprocess.DEVNULL)
                run(["chroot", merged, "apt-get", "-qq", "install", "-y"] + image["packages"], env=env,
                    stdout=subprocess.DEVNULL)
            os.unlink(policy)
            for pattern in image.get("remove", []):
                run(["sh", "-c", "rm -rf %s" % " ".join(os.path.join(merged, pattern).split())])
            for rel, (src, mode) in image.get("files", {}).items():
                path = os.path.join(merged, rel)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                shutil.copy(os.path.join(HERE, src), path)
                os.chmod(path, mode)
            for rel, owner in image.get("mkdir", {}).items():
                path = os.path.join(merged, rel)
                os.makedirs(path, exist_ok=True)
                if owner:
                    run(["chroot", merged, "chown", "%s:%s" % (owner, owner), "/" + rel])
            for script in image.get("check", []):
                # what the image must still do after its slimming (a removed library still needed)
                done = run(["chroot", merged, "/bin/sh", "-ec", script], check=False, capture_output=True, text=True)
                if done.returncode != 0:
                    output = (done.stdout + done.stderr)[-2000:]
                    raise SystemExit("image %s fails its check `%s`:\n%s" % (image["name"], script, output))
        finally:
            run(["umount", os.path.join(merged, "proc")])
    finally:
        run(["umount", merged])
    slim(upper)
    for rel in ("var/cache/ldconfig/aux-cache", "etc/resolv.conf"):
        p = os.path.join(upper, rel)
        if os.path.lexists(p) and not os.path.lexists(os.path.join(base, rel)):
            os.unlink(p)
    return upper


def _is_whiteout(st):
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(path):
    for name in ("trusted.overlay.opaque", "user.overlay.opaque"):
        try:
            if os.getxattr(path, name, follow_symlinks=False) == b"y":
                return True
        except OSError:
            pass
    return False


def layer_tar(top, out, skip_dev_contents=False):
    """Write ``top`` as an uncompressed OCI layer tar; return its sha256 (the diff id)."""
    h = hashlib.sha256()

    class Hashing(io.RawIOBase):
        def __init__(self, f):
            self.f = f

        def write(self, b):
            h.update(b)
            return self.f.write(b)

        def writable(self):
            return True

    links = {}
    with open(out, "wb") as raw:
        with tarfile.open(fileobj=Hashing(raw), mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for root, dirs, files in os.walk(top):
                dirs.sort()
                rel_root = os.path.relpath(root, top)
                if skip_dev_contents and rel_root == "dev":
                    dirs[:] = []
                    files = []
                entries = sorted(dirs + files)
                if rel_root != "." and _opaque(root):
                    ti = tarfile.TarInfo(os.path.join(rel_root, ".wh..wh..opq"))
                    tar.addfile(ti)
                for name in entries:
                    path = os.path.join(root, name)
                    rel = os.path.normpath(os.path.join(rel_root, name))
                    st = os.lstat(path)
                    if _is_whiteout(st):
                        tar.addfile(tarfile.TarInfo(os.path.join(os.path.dirname(rel), ".wh." + name)))
                        continue
                    if stat.S_ISSOCK(st.st_mode):
                        continue
                    ti = tar.gettarinfo(path, arcname=rel)
                    ti.uname = ti.gname = ""
                    if ti.isreg() and st.st_nlink > 1:
                        key = (st.st_dev, st.st_ino)
                        if key in links:
                            ti.type, ti.linkname, ti.size = tarfile.LNKTYPE, links[key], 0
                            tar.addfile(ti)
                            continue
                        links[key] = rel
                    if ti.isreg():
                        with open(path, "rb") as f:
                            tar.addfile(ti, f)
                    else:
                        tar.addfile(ti)
    return h.hexdigest()


def write_image_archive(out, images):
    """One docker-archive (podman load) of IMAGES: each a dict with tag (under PREFIX), config (the
    image's runtime configuration), layers ([(tar path, diff id)], bottom first) and history (one
    line per layer). A layer several images share is stored once. Written beside OUT, then renamed."""
    tmp = out + ".tmp"
    manifest = []
    stored = set()
    with tarfile.open(tmp, "w") as arc:
        for image in images:
            for tar_path, diff_id in image["layers"]:
                if diff_id not in stored:
                    arc.add(tar_path, arcname="%s.tar" % diff_id)
                    stored.add(diff_id)
            config = {
                "architecture": "amd64", "os": "linux", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "config": image["config"],
                "rootfs": {"type": "layers", "diff_ids": ["sha256:" + d for _p, d in image["layers"]]},
                "history": [{"created_by": line} for line in image["history"]],
            }
            data = json.dumps(config, sort_keys=True).encode()
            config_id = hashlib.sha256(data).hexdigest()
            ti = tarfile.TarInfo("%s.json" % config_id)
            ti.size = len(data)
            arc.addfile(ti, io.BytesIO(data))
            manifest.append({"Config": "%s.json" % config_id, "RepoTags": [PREFIX + image["tag"]],
                             "Layers": ["%s.tar" % d for _p, d in image["layers"]]})
        data = json.dumps(manifest, indent=1).encode()
        ti = tarfile.TarInfo("manifest.json")
        ti.size = len(data)
        arc.addfile(ti, io.BytesIO(data))
    os.rename(tmp, out)
    return manifest


def write_archive(out, base_tar, base_id, layers):
    """layers: list of (image, tar path, diff id). One docker-archive holding every image over the base."""
    entries = []
    for image, tar_path, diff_id in layers:
        for name, extra in [(image["name"], {})] + sorted(image.get("variants", {}).items()):
            cfg = dict(image["config"], **{k: v for k, v in extra.items() if k != "Env"})
            cfg["Env"] = image["config"]["Env"] + extra.get("Env", [])
            entries.append({"tag": name, "config": cfg, "layers": [(base_tar, base_id), (tar_path, diff_id)],
                            "history": ["debootstrap --variant=minbase %s + %s" % (SUITE, " ".join(BASE_PACKAGES)),
                                        "apt-get install %s; homelab.immich tests/images" % " ".join(image["packages"])]})
    return write_image_archive(out, entries)


def clear_work(work):
    """Remove WORK, first unmounting what a build killed midway left mounted there (its overlays
    and their /proc: a SIGTERM runs no finally), deepest first."""
    prefix = os.path.realpath(work) + os.sep
    with open("/proc/self/mounts") as f:
        points = [line.split()[1].replace("\\040", " ") for line in f]
    for point in sorted((p for p in points if p.startswith(prefix)), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(work, ignore_errors=True)


def build():
    out = archive_path()
    if os.path.exists(out):
        return out
    t0 = time.time()
    work = os.path.join(CACHE, "images", "work")
    clear_work(work)
    os.makedirs(work)
    try:
        base = build_base(work)
        layers = []
        for image in IMAGES:
            upper = build_layer(work, base, image)
            tar_path = os.path.join(work, image["name"].replace(":", "_") + ".tar")
            layers.append((image, tar_path, layer_tar(upper, tar_path)))
        base_tar = os.path.join(work, "base.tar")
        base_id = layer_tar(base, base_tar, skip_dev_contents=True)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        write_archive(out, base_tar, base_id, layers)
        sizes = {"base": os.path.getsize(base_tar)}
        sizes.update((i["name"], os.path.getsize(p)) for i, p, _d in layers)
        with open(os.path.join(os.path.dirname(out), "BUILD.json"), "w") as f:
            json.dump({"seconds": round(time.time() - t0, 1), "layer_bytes": sizes,
                       "images": [PREFIX + n for i in IMAGES for n in [i["name"]] + sorted(i.get("variants", {}))]}, f, indent=1)
        summary = ", ".join("%s %d MiB" % (k, v >> 20) for k, v in sizes.items())
        log("built in %.0f s: %s (%s)" % (time.time() - t0, out, summary))
    finally:
        clear_work(work)
    return out


if __name__ == "__main__":
    path = build()
    if "--print-manifest" in sys.argv:
        with tarfile.open(path) as t:
            print(t.extractfile("manifest.json").read().decode())
    print(path)
