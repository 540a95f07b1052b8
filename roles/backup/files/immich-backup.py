"""Back up Immich: a database dump the upstream way and a read-only BTRFS snapshot of the library.

    immich-backup --config /etc/homelab-immich/backup.json [--only dump|snapshot]

The config's "only" (dump or snapshot) limits a host to its part when the database and the
library are on different hosts.

Runs as root (immich-backup.service, or backup.yml). The dump is
`pg_dump --clean --if-exists --dbname=DB --username=USER` run inside the database container (as
the service user for rootless deployments), gzip-compressed into <dump_dir>/immich-db-<time>.sql.gz
with mode 0600 (written to a temporary name first, renamed when complete). The snapshot is a
read-only snapshot of the BTRFS subvolume that holds the library, <snapshot_dir>/immich-<time>;
the library's path inside it is recorded in the result. Then the oldest dumps and snapshots
beyond the retention counts are deleted. Prints one JSON object; exits non-zero, having deleted
nothing, when the dump or the snapshot fails. Python standard library only.
"""

import argparse
import gzip
import json
import os
import pwd
import re
import subprocess
import sys
import time

DUMP_RE = re.compile(r"^immich-db-\d{8}T\d{6}Z\.sql\.gz$")
SNAP_RE = re.compile(r"^immich-\d{8}T\d{6}Z$")
BTRFS_SUPER_MAGIC = 0x9123683E


class BackupError(Exception):
    pass


def as_user(name):
    """subprocess keyword arguments and environment to run podman as a rootless user."""
    if not name:
        return {}, dict(os.environ)
    pw = pwd.getpwnam(name)
    # the user's systemd manager (linger) places `podman exec` in the container's cgroup
    env = dict(os.environ, HOME=pw.pw_dir, USER=name, LOGNAME=name, XDG_RUNTIME_DIR="/run/user/%d" % pw.pw_uid,
               DBUS_SESSION_BUS_ADDRESS="unix:path=/run/user/%d/bus" % pw.pw_uid)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": os.getgrouplist(name, pw.pw_gid)}, env


def dump(cfg, stamp):
    os.makedirs(cfg["dump_dir"], mode=0o700, exist_ok=True)
    final = os.path.join(cfg["dump_dir"], "immich-db-%s.sql.gz" % stamp)
    tmp = final + ".tmp"
    kw, env = as_user(cfg.get("user"))
    cmd = ["podman", "exec", cfg["container"], "pg_dump", "--clean", "--if-exists",
           "--dbname=%s" % cfg["db_name"], "--username=%s" % cfg["db_user"]]
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as gz:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd="/", **kw)
            size = 0
            for chunk in iter(lambda: proc.stdout.read(1 << 16), b""):
                gz.write(chunk)
                size += len(chunk)
            err = proc.stderr.read().decode(errors="replace")
            if proc.wait() != 0:
                raise BackupError("pg_dump in %s failed (%d): %s. Is the database running? "
                                  "(systemctl status immich-database)" % (cfg["container"], proc.returncode, err.strip()))
            if size == 0:
                raise BackupError("pg_dump produced no output")
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o600)
        os.rename(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {"path": final, "sql_bytes": size, "bytes": os.path.getsize(final)}


def subvolume_of(path):
    """The BTRFS subvolume root holding path (inode 256 marks a subvolume root)."""
    if not is_btrfs(path):
        raise BackupError("%s is not on BTRFS: no snapshot possible (set immich_backup_snapshots: false)" % path)
    cur = os.path.realpath(path)
    while True:
        if os.stat(cur).st_ino == 256:
            return cur
        parent = os.path.dirname(cur)
        if parent == cur or os.stat(parent).st_dev != os.stat(cur).st_dev:
            return cur
        cur = parent


def is_btrfs(path):
    out = subprocess.run(["stat", "-f", "-c", "%t", path], capture_output=True, text=True, check=False)
    return out.returncode == 0 and int(out.stdout.strip() or "0", 16) == BTRFS_SUPER_MAGIC


def snapshot(cfg, stamp):
    library = os.path.realpath(cfg["library"])
    source = subvolume_of(library)
    os.makedirs(cfg["snapshot_dir"], mode=0o700, exist_ok=True)
    target = os.path.join(cfg["snapshot_dir"], "immich-%s" % stamp)
    proc = subprocess.run(["btrfs", "subvolume", "snapshot", "-r", source, target],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BackupError("btrfs subvolume snapshot %s failed: %s (the snapshot directory must be on the "
                          "same BTRFS filesystem)" % (source, proc.stderr.strip()))
    rel = os.path.relpath(library, source)
    meta = {"source": source, "library_in_snapshot": rel, "library": library}
    with open(target + ".json", "w") as f:  # next to the read-only snapshot, for restore.yml
        json.dump(meta, f)
    snap = {"path": target, "source": source, "library": os.path.join(target, rel) if rel != "." else target}
    if rel != ".":
        snap["warning"] = ("the library is not its own subvolume: this snapshot holds all of %s, and snapshots of a "
                           "subvolume with the NOCOW database make its next writes copy-on-write once" % source)
    return snap


def prune(directory, pattern, keep, remove):
    names = sorted(n for n in os.listdir(directory) if pattern.match(n)) if os.path.isdir(directory) else []
    gone = names[:-keep] if keep > 0 else []
    for name in gone:
        remove(os.path.join(directory, name))
    return gone


def delete_snapshot(path):
    proc = subprocess.run(["btrfs", "subvolume", "delete", path], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BackupError("btrfs subvolume delete %s failed: %s" % (path, proc.stderr.strip()))
    if os.path.exists(path + ".json"):
        os.unlink(path + ".json")


def run(cfg, only=None):
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    result = {"time": stamp}
    if only in (None, "dump"):
        result["dump"] = dump(cfg, stamp)
    if only in (None, "snapshot") and cfg.get("snapshots", True):
        result["snapshot"] = snapshot(cfg, stamp)
    # retention only after everything above succeeded
    result["pruned_dumps"] = prune(cfg["dump_dir"], DUMP_RE, int(cfg["keep_dumps"]), os.unlink)
    if cfg.get("snapshots", True):
        result["pruned_snapshots"] = prune(cfg["snapshot_dir"], SNAP_RE, int(cfg["keep_snapshots"]), delete_snapshot)
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--only", choices=["dump", "snapshot"])
    args = ap.parse_args(argv)
    with open(args.config) as f:
        cfg = json.load(f)
    os.umask(0o077)
    try:
        # several hosts: the config says which part this host holds (the dump on the database host,
        # the snapshot on the server's); --only narrows it further
        result = run(cfg, args.only or cfg.get("only"))
    except (BackupError, OSError, KeyError) as exc:
        print(json.dumps({"failed": True, "msg": str(exc)}))
        print("immich-backup: %s" % exc, file=sys.stderr)
        return 1
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
