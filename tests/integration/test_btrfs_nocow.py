"""btrfs_nocow on REAL filesystems: a loop-mounted btrfs (plus ext4 and tmpfs) made by the fixtures.

Needs root (mount, loop devices, chown); CI runs as root, and a non-root run fails rather than
skipping.
"""

import hashlib
import os
import stat

import pytest
from localtools import sh

from ansible_collections.homelab.immich.plugins.module_utils import fsattr
from ansible_collections.homelab.immich.plugins.module_utils import nocow


@pytest.fixture(scope="module")
def mounts(loop_mount):
    return {
        "btrfs": loop_mount("btrfs", "400M", ["mkfs.btrfs", "-q", "-f"]),
        "btrfs_zstd": loop_mount("btrfs_zstd", "200M", ["mkfs.btrfs", "-q", "-f"], "compress=zstd"),
        "ext4": loop_mount("ext4", "64M", ["mkfs.ext4", "-q", "-F"]),
        "tmpfs": loop_mount("tmpfs", "16m"),
    }


@pytest.fixture
def pool(mounts, request):
    """A fresh directory on the btrfs for each test."""
    d = os.path.join(mounts["btrfs"], request.node.name.replace("[", "_").replace("]", "_"))
    os.mkdir(d)
    return d


def nocow_flag(path):
    return bool(nocow.path_flags(path) & fsattr.FS_NOCOW_FL)


def lsattr(path):
    return sh("lsattr", "-d", path).stdout.split()[0]


def checksums(top):
    out = {}
    for root, dirs, files in os.walk(top):
        for f in files:
            p = os.path.join(root, f)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            with open(p, "rb") as fh:
                out[os.path.relpath(p, top)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def test_empty_dir_is_created_nocow_and_idempotent(run_module, pool):
    path = os.path.join(pool, "db")
    rc, res, out = run_module("btrfs_nocow", {"path": path, "owner": "999", "group": "999", "mode": "0700"})
    assert rc == 0, out
    assert res["changed"] and res["supported"] and res["fstype"] == "btrfs" and res["fs_magic"] == "0x9123683e"
    assert res["nocow"] and res["effective"] and res["cow_entries"] == 0
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (999, 999, 0o700)
    assert "C" in lsattr(path)
    rc, res, out = run_module("btrfs_nocow", {"path": path, "owner": "999", "group": "999", "mode": "0700"})
    assert rc == 0 and res["changed"] is False, out


def test_new_files_and_dirs_inherit(run_module, pool):
    path = os.path.join(pool, "db")
    rc, res, out = run_module("btrfs_nocow", {"path": path})
    assert rc == 0, out
    os.makedirs(os.path.join(path, "base", "1"))
    with open(os.path.join(path, "base", "1", "16384"), "wb") as f:
        f.write(os.urandom(8192))
    for p in ("base", "base/1", "base/1/16384"):
        assert nocow_flag(os.path.join(path, p)), p
    rc, res, out = run_module("btrfs_nocow", {"path": path})
    assert res["effective"] and res["checked_entries"] == 3 and not res["changed"]


def test_existing_cow_files_are_reported_not_effective(run_module, pool):
    path = os.path.join(pool, "db")
    os.makedirs(os.path.join(path, "sub"))
    for name in ("a", "b", "sub/c"):
        with open(os.path.join(path, name), "wb") as f:
            f.write(b"x" * 4096)
    rc, res, out = run_module("btrfs_nocow", {"path": path})
    assert rc == 0, out
    assert res["changed"] and res["nocow"] and not res["effective"]
    assert res["cow_entries"] == 4  # a, b, sub, sub/c
    assert os.path.join(path, "a") in res["cow_samples"]
    assert "is not effective: 4 existing entries are copy-on-write" in out
    assert not nocow_flag(os.path.join(path, "a")), "the kernel leaves files with data copy-on-write"
    rc, res, out = run_module("btrfs_nocow", {"path": path})
    assert rc == 0 and res["changed"] is False and "is not effective" in out


def test_recurse_check_limits_the_sample(run_module, pool):
    path = os.path.join(pool, "db")
    os.makedirs(path)
    for i in range(30):
        with open(os.path.join(path, "f%02d" % i), "wb") as f:
            f.write(b"x")
    rc, res, out = run_module("btrfs_nocow", {"path": path, "recurse_check": 5})
    assert res["checked_entries"] == 5 and res["check_complete"] is False and len(res["cow_samples"]) == 5


def make_tree(path):
    os.makedirs(os.path.join(path, "base", "1"))
    files = {"PG_VERSION": b"17\n", "base/1/16384": os.urandom(300000), "base/1/empty": b"",
             "postgresql.conf": b"shared_buffers = 128MB\n" * 100}
    for rel, data in files.items():
        with open(os.path.join(path, rel), "wb") as f:
            f.write(data)
    os.symlink("base/1/16384", os.path.join(path, "link"))
    os.link(os.path.join(path, "PG_VERSION"), os.path.join(path, "hardlink"))
    os.mkfifo(os.path.join(path, "fifo"))
    os.setxattr(os.path.join(path, "postgresql.conf"), "user.origin", b"test")
    for root, dirs, fs in os.walk(path):
        for n in dirs + fs:
            os.lchown(os.path.join(root, n), 999, 999)
    os.chown(path, 999, 999)
    os.chmod(path, 0o700)
    os.chmod(os.path.join(path, "postgresql.conf"), 0o600)


def test_convert_round_trip_keeps_every_byte_and_attribute(run_module, pool):
    path = os.path.join(pool, "postgres")
    make_tree(path)
    before = checksums(path)
    manifest = nocow.tree_manifest(path)
    rc, res, out = run_module("btrfs_nocow", {"path": path, "convert": True})
    assert rc == 0, out
    assert res["converted"] and res["effective"] and res["cow_entries"] == 0
    backup = res["backup"]
    assert os.path.dirname(backup) == pool and os.path.isdir(backup)
    assert checksums(path) == before == checksums(backup)
    assert nocow.tree_manifest(path) == manifest
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (999, 999, 0o700)
    assert os.readlink(os.path.join(path, "link")) == "base/1/16384"
    assert os.stat(os.path.join(path, "hardlink")).st_ino == os.stat(os.path.join(path, "PG_VERSION")).st_ino
    assert stat.S_ISFIFO(os.lstat(os.path.join(path, "fifo")).st_mode)
    assert os.getxattr(os.path.join(path, "postgresql.conf"), "user.origin") == b"test"
    for rel in ("base", "base/1", "base/1/16384", "PG_VERSION", "postgresql.conf"):
        assert nocow_flag(os.path.join(path, rel)), rel
    assert not [n for n in os.listdir(pool) if "nocow-tmp" in n]
    rc, res, out = run_module("btrfs_nocow", {"path": path, "convert": True})
    assert rc == 0 and res["changed"] is False and res["converted"] is False


def test_convert_refuses_while_files_are_open(run_module, pool):
    path = os.path.join(pool, "postgres")
    make_tree(path)
    manifest = nocow.tree_manifest(path)
    with open(os.path.join(path, "PG_VERSION")):
        rc, res, out = run_module("btrfs_nocow", {"path": path, "convert": True})
    assert rc != 0 and "refusing to convert" in res["msg"] and "stop the service" in res["msg"]
    assert nocow.tree_manifest(path) == manifest
    assert sorted(os.listdir(pool)) == ["postgres"]


def test_convert_failure_midway_changes_nothing(pool, monkeypatch):
    path = os.path.join(pool, "postgres")
    make_tree(path)
    manifest = nocow.tree_manifest(path)
    monkeypatch.setattr(nocow, "verify_copy", lambda a, b: ["simulated mismatch"])
    with pytest.raises(nocow.NocowError, match="did not verify, nothing was swapped"):
        nocow.convert(path)
    assert nocow.tree_manifest(path) == manifest
    assert sorted(os.listdir(pool)) == ["postgres"]
    monkeypatch.undo()

    def broken_copy(src, dst):
        os.mkdir(os.path.join(dst, "partial"))
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(nocow, "copy_tree", broken_copy)
    with pytest.raises(OSError):
        nocow.convert(path)
    assert nocow.tree_manifest(path) == manifest
    assert sorted(os.listdir(pool)) == ["postgres"]


def test_convert_refuses_without_space(pool):
    path = os.path.join(pool, "postgres")
    make_tree(path)
    with pytest.raises(nocow.NocowError, match="needs about"):
        nocow.convert(path, free_bytes=1024)
    assert sorted(os.listdir(pool)) == ["postgres"]


@pytest.mark.parametrize("how", ["attribute", "property"])
def test_compression_conflict_is_explained(run_module, pool, how):
    path = os.path.join(pool, "db")
    os.mkdir(path)
    if how == "attribute":
        sh("chattr", "+c", path)
    else:
        sh("btrfs", "property", "set", path, "compression", "zstd")
    flags = lsattr(path)
    rc, res, out = run_module("btrfs_nocow", {"path": path})
    assert rc != 0 and "refuses NOCOW" in res["msg"], res
    assert "chattr -c" in res["msg"] and "btrfs property set" in res["msg"] and "nothing was changed" in res["msg"]
    assert lsattr(path) == flags


def test_mount_option_compression_is_reported(run_module, mounts):
    path = os.path.join(mounts["btrfs_zstd"], "db")
    rc, res, out = run_module("btrfs_nocow", {"path": path})
    assert rc == 0 and res["effective"], out
    assert res["compression"]["mount_option"].startswith("zstd")  # e.g. zstd:3 (the level)


def test_subvolumes(run_module, pool):
    sv = os.path.join(pool, "subvol7-containers")
    sh("btrfs", "subvolume", "create", sv)
    path = os.path.join(sv, "immich", "postgres")
    rc, res, out = run_module("btrfs_nocow", {"path": path})
    assert rc == 0 and res["fstype"] == "btrfs" and res["effective"], out
    assert res["subvolume"] == sv and res["is_subvolume"] is False
    assert os.stat(sv).st_dev != os.stat(pool).st_dev, "a subvolume has its own st_dev; statfs still says btrfs"
    # a directory that is itself a subvolume, converted, stays a subvolume
    dbsv = os.path.join(pool, "dbsv")
    sh("btrfs", "subvolume", "create", dbsv)
    make_tree(dbsv)
    before = checksums(dbsv)
    rc, res, out = run_module("btrfs_nocow", {"path": dbsv, "convert": True})
    assert rc == 0 and res["converted"] and res["is_subvolume"] and res["effective"], out
    assert os.stat(dbsv).st_ino == 256
    assert checksums(dbsv) == before


def test_symlink_is_refused(run_module, pool):
    real = os.path.join(pool, "real")
    os.mkdir(real)
    link = os.path.join(pool, "link")
    os.symlink(real, link)
    rc, res, out = run_module("btrfs_nocow", {"path": link})
    assert rc != 0 and "symbolic link" in res["msg"] and real in res["msg"]
    assert "C" not in lsattr(real)


def test_not_a_directory_is_refused(run_module, pool):
    f = os.path.join(pool, "file")
    open(f, "w").close()
    rc, res, out = run_module("btrfs_nocow", {"path": f})
    assert rc != 0 and "not a directory" in res["msg"]


@pytest.mark.parametrize("fs", ["ext4", "tmpfs"])
def test_unsupported_filesystem_skip_and_fail(run_module, mounts, fs):
    path = os.path.join(mounts[fs], "db-skip")
    rc, res, out = run_module("btrfs_nocow", {"path": path, "mode": "0700"})
    assert rc == 0 and res["changed"] and res["supported"] is False and res["fstype"] == fs, out
    assert os.path.isdir(path) and stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert "has no NOCOW attribute" in out
    rc, res, out = run_module("btrfs_nocow", {"path": path, "mode": "0700"})
    assert rc == 0 and res["changed"] is False
    failing = os.path.join(mounts[fs], "db-fail")
    rc, res, out = run_module("btrfs_nocow", {"path": failing, "on_unsupported": "fail"})
    assert rc != 0 and "nothing was changed" in res["msg"] and fs in res["msg"]
    assert not os.path.exists(failing), "fail must not create the directory first"


def test_check_mode_writes_nothing(run_module, pool):
    path = os.path.join(pool, "new")
    rc, res, out = run_module("btrfs_nocow", {"path": path, "mode": "0700"}, check=True, diff=True)
    assert rc == 0 and res["changed"] and not os.path.exists(path), out
    assert res["nocow"] and res["effective"]
    existing = os.path.join(pool, "postgres")
    make_tree(existing)
    manifest, flags = nocow.tree_manifest(existing), lsattr(existing)
    rc, res, out = run_module("btrfs_nocow", {"path": existing, "convert": True}, check=True, diff=True)
    assert rc == 0 and res["changed"] and res["converted"] and res["backup"], out
    assert nocow.tree_manifest(existing) == manifest and lsattr(existing) == flags
    assert sorted(os.listdir(pool)) == ["postgres"]
    assert "effective" in out and "nocow" in out  # the diff shows before/after


def test_other_flags_are_kept_and_absent_clears_only_nocow(run_module, pool):
    path = os.path.join(pool, "db")
    os.mkdir(path)
    sh("chattr", "+A", path)
    rc, res, out = run_module("btrfs_nocow", {"path": path})
    assert rc == 0 and "A" in res["flags"] and "C" in res["flags"], out
    rc, res, out = run_module("btrfs_nocow", {"path": path})
    assert res["changed"] is False, "no perpetual change when other flags exist"
    rc, res, out = run_module("btrfs_nocow", {"path": path, "state": "absent"})
    assert rc == 0 and res["changed"] and res["nocow"] is False
    attrs = lsattr(path)
    assert "A" in attrs and "C" not in attrs


def test_enforce_ownership_false_only_sets_owner_on_create(run_module, pool):
    path = os.path.join(pool, "db")
    args = {"path": path, "owner": "1000", "group": "1000", "mode": "0700", "enforce_ownership": False}
    rc, res, out = run_module("btrfs_nocow", args)
    assert rc == 0 and res["changed"], out
    assert (os.stat(path).st_uid, os.stat(path).st_gid) == (1000, 1000)
    os.chown(path, 100099, 100101)  # the service re-owns its directory (postgres in a user namespace)
    os.chmod(path, 0o750)
    rc, res, out = run_module("btrfs_nocow", args)
    assert rc == 0 and res["changed"] is False, out
    st = os.stat(path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (100099, 100101, 0o750)
    rc, res, out = run_module("btrfs_nocow", dict(args, enforce_ownership=True))
    assert res["changed"] is True and os.stat(path).st_uid == 1000


def test_require_effective_fails_before_changing_anything(run_module, pool):
    path = os.path.join(pool, "postgres")
    make_tree(path)
    manifest, flags = nocow.tree_manifest(path), lsattr(path)
    rc, res, out = run_module("btrfs_nocow", {"path": path, "require_effective": True})
    assert rc != 0 and "would not be effective; nothing was changed" in res["msg"] and "convert: true" in res["msg"]
    assert nocow.tree_manifest(path) == manifest and lsattr(path) == flags
    rc, res, out = run_module("btrfs_nocow", {"path": path, "require_effective": True, "convert": True})
    assert rc == 0 and res["converted"] and res["effective"], out
    empty = os.path.join(pool, "fresh")
    rc, res, out = run_module("btrfs_nocow", {"path": empty, "require_effective": True})
    assert rc == 0 and res["effective"], out


def test_directories_in_one_call_all_checked_before_any_change(run_module, pool):
    cow = os.path.join(pool, "postgres")
    make_tree(cow)
    manifest, flags = nocow.tree_manifest(cow), lsattr(cow)
    dirs = [{"path": os.path.join(pool, "redis"), "mode": "0750"},
            {"path": cow, "mode": "0700", "require_effective": True},
            {"path": os.path.join(pool, "ml-cache")}]
    rc, res, out = run_module("btrfs_nocow", {"directories": dirs, "owner": "1000", "group": "1000"})
    assert rc != 0 and "would not be effective; nothing was changed" in res["msg"]
    assert not os.path.exists(os.path.join(pool, "redis")), "an earlier entry must not be created either"
    assert nocow.tree_manifest(cow) == manifest and lsattr(cow) == flags
    dirs[1] = {"path": os.path.join(pool, "db"), "mode": "0700", "require_effective": True}
    rc, res, out = run_module("btrfs_nocow", {"directories": dirs, "owner": "1000", "group": "1000"}, diff=True)
    assert rc == 0 and res["changed"], out
    assert [d["path"] for d in res["directories"]] == [d["path"] for d in dirs]
    assert all(d["effective"] and d["nocow"] for d in res["directories"])
    assert stat.S_IMODE(os.stat(dirs[1]["path"]).st_mode) == 0o700
    assert os.stat(dirs[2]["path"]).st_uid == 1000
    rc, res, out = run_module("btrfs_nocow", {"directories": dirs, "owner": "1000", "group": "1000"})
    assert rc == 0 and res["changed"] is False
    rc, res, out = run_module("btrfs_nocow", {"directories": dirs + [dirs[0]]})
    assert rc != 0 and "listed twice" in res["msg"]
