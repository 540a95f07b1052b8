"""The backup role's immich-backup on a REAL loop-mounted btrfs (and ext4), with podman replaced
by a fake that prints SQL (or fails), so the dump, snapshot and retention logic run for real.

Needs root (mount, btrfs subvolumes), as CI has.
"""

import gzip
import json
import os
import stat
import subprocess
import sys

import pytest
from localtools import sh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "roles", "backup", "files", "immich-backup.py")


@pytest.fixture(scope="module")
def fs(loop_mount):
    return {"btrfs": loop_mount("btrfs", "200M", ["mkfs.btrfs", "-q", "-f"]),
            "ext4": loop_mount("ext4", "32M", ["mkfs.ext4", "-q", "-F"])}


@pytest.fixture
def fake_podman(tmp_path, monkeypatch):
    """A podman on PATH that records its arguments and prints SQL (FAIL_DUMP=1: fails)."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    log = tmp_path / "podman.args"
    script = bindir / "podman"
    script.write_text("#!/bin/sh\necho \"$@\" >> %s\n"
                      "if [ -n \"$FAIL_DUMP\" ]; then echo 'connection refused' >&2; exit 1; fi\n"
                      "printf 'DROP TABLE IF EXISTS public.t;\\nCREATE TABLE public.t (id int);\\n'\n" % log)
    script.chmod(0o755)
    monkeypatch.setenv("PATH", "%s:%s" % (bindir, os.environ["PATH"]))
    return log


def config(tmp_path, top, **over):
    cfg = {"container": "immich_postgres", "db_name": "immich", "db_user": "postgres", "user": None,
           "library": os.path.join(top, "library"), "dump_dir": os.path.join(top, "dumps"),
           "keep_dumps": 2, "snapshots": True, "snapshot_dir": os.path.join(top, "snaps"), "keep_snapshots": 2}
    cfg.update(over)
    path = tmp_path / "backup.json"
    path.write_text(json.dumps(cfg))
    return str(path), cfg


def run(cfg_path, *extra):
    proc = subprocess.run([sys.executable, SCRIPT, "--config", cfg_path] + list(extra),
                          capture_output=True, text=True, check=False)
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture
def top(fs, request):
    d = os.path.join(fs["btrfs"], request.node.name.replace("[", "_").replace("]", "_"))
    os.makedirs(d)
    sh("btrfs", "subvolume", "create", os.path.join(d, "library"))
    with open(os.path.join(d, "library", "photo.jpg"), "wb") as f:
        f.write(os.urandom(8192))
    return d


def test_dump_snapshot_and_metadata(fake_podman, tmp_path, top):
    cfg_path, cfg = config(tmp_path, top)
    rc, result, err = run(cfg_path)
    assert rc == 0, err
    dump = result["dump"]["path"]
    assert stat.S_IMODE(os.stat(dump).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cfg["dump_dir"]).st_mode) == 0o700
    with gzip.open(dump, "rt") as f:
        assert "CREATE TABLE public.t" in f.read()
    args = fake_podman.read_text().split()
    assert args == ["exec", "immich_postgres", "pg_dump", "--clean", "--if-exists", "--dbname=immich", "--username=postgres"]
    snap = result["snapshot"]["path"]
    assert sh("btrfs", "property", "get", "-ts", snap, "ro").stdout.strip() == "ro=true"
    with open(os.path.join(snap, "photo.jpg"), "rb") as a, open(os.path.join(cfg["library"], "photo.jpg"), "rb") as b:
        assert a.read() == b.read()
    meta = json.loads(open(snap + ".json").read())
    assert meta["library_in_snapshot"] == "." and "warning" not in result["snapshot"]
    assert not [n for n in os.listdir(cfg["dump_dir"]) if n.endswith(".tmp")]


def test_retention_keeps_the_newest(fake_podman, tmp_path, top, monkeypatch, load_script):
    cfg_path, cfg = config(tmp_path, top)
    m = load_script("immich_backup", SCRIPT)
    stamps = iter(["20260101T000000Z", "20260102T000000Z", "20260103T000000Z", "20260104T000000Z"])
    monkeypatch.setattr(m.time, "strftime", lambda fmt, t=None: next(stamps))
    results = [m.run(cfg) for _run in range(4)]
    assert sorted(os.listdir(cfg["dump_dir"])) == ["immich-db-20260103T000000Z.sql.gz", "immich-db-20260104T000000Z.sql.gz"]
    kept = ["immich-20260103T000000Z", "immich-20260103T000000Z.json", "immich-20260104T000000Z",
            "immich-20260104T000000Z.json"]
    assert sorted(os.listdir(cfg["snapshot_dir"])) == kept
    assert results[2]["pruned_dumps"] == ["immich-db-20260101T000000Z.sql.gz"]
    assert results[3]["pruned_snapshots"] == ["immich-20260102T000000Z"]
    listed = sh("btrfs", "subvolume", "list", "-o", os.path.dirname(top)).stdout + sh("btrfs", "subvolume", "list", top).stdout
    assert "immich-20260101T000000Z" not in listed and "immich-20260102T000000Z" not in listed


def test_failed_dump_deletes_nothing_and_says_why(fake_podman, tmp_path, top, monkeypatch):
    cfg_path, cfg = config(tmp_path, top, keep_dumps=1, keep_snapshots=1)
    assert run(cfg_path)[0] == 0
    before = sorted(os.listdir(cfg["dump_dir"])), sorted(os.listdir(cfg["snapshot_dir"]))
    monkeypatch.setenv("FAIL_DUMP", "1")
    rc, result, err = run(cfg_path)
    assert rc == 1 and result["failed"] and "pg_dump in immich_postgres failed" in result["msg"]
    assert "connection refused" in result["msg"] and "systemctl status immich-database" in result["msg"]
    assert (sorted(os.listdir(cfg["dump_dir"])), sorted(os.listdir(cfg["snapshot_dir"]))) == before


def test_library_inside_a_bigger_subvolume_is_snapshotted_with_a_warning(fake_podman, tmp_path, fs):
    top = os.path.join(fs["btrfs"], "plainlib")
    sh("btrfs", "subvolume", "create", top)
    os.makedirs(os.path.join(top, "immich", "library"))
    cfg_path, cfg = config(tmp_path, top, library=os.path.join(top, "immich", "library"))
    rc, result, err = run(cfg_path)
    assert rc == 0, err
    assert result["snapshot"]["source"] == top and "not its own subvolume" in result["snapshot"]["warning"]
    assert result["snapshot"]["library"] == os.path.join(result["snapshot"]["path"], "immich", "library")


def test_snapshot_on_ext4_fails_clearly(fake_podman, tmp_path, fs):
    top = os.path.join(fs["ext4"], "lib")
    os.makedirs(os.path.join(top, "library"))
    cfg_path, cfg = config(tmp_path, top, snapshot_dir=os.path.join(top, "snaps"))
    rc, result, err = run(cfg_path)
    assert rc == 1 and "not on BTRFS" in result["msg"] and "immich_backup_snapshots: false" in result["msg"]
    rc, result, err = run(config(tmp_path, top, snapshots=False)[0])
    assert rc == 0 and "snapshot" not in result


@pytest.mark.parametrize("only, parts", [("dump", {"dump"}), ("snapshot", {"snapshot"})])
def test_a_host_holding_one_part_takes_only_that_part(fake_podman, tmp_path, top, only, parts):
    """Several hosts: the database host dumps, the server's host snapshots the library (config "only")."""
    cfg_path, cfg = config(tmp_path, top, only=only)
    rc, result, err = run(cfg_path)
    assert rc == 0, err
    assert {"dump", "snapshot"} & set(result) == parts
    assert os.path.exists(fake_podman) == (only == "dump")
    assert bool(os.path.isdir(cfg["snapshot_dir"]) and os.listdir(cfg["snapshot_dir"])) == (only == "snapshot")
