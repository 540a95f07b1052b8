"""Pure checks of the filesystem helpers (the real-btrfs behaviour is in tests/integration)."""

import pytest

from ansible_collections.homelab.immich.plugins.module_utils import fsattr
from ansible_collections.homelab.immich.plugins.module_utils import nocow


@pytest.mark.parametrize("machine, get, setf", [
    ("x86_64", 0x80086601, 0x40086602),
    ("aarch64", 0x80086601, 0x40086602),
    ("ppc64le", 0x40086601, 0x80086602),
])
def test_ioctl_numbers(monkeypatch, machine, get, setf):
    monkeypatch.setattr(fsattr.platform, "machine", lambda: machine)
    assert fsattr._ioc("r", "f", 1, 8) == get
    assert fsattr._ioc("w", "f", 2, 8) == setf


def test_ioctl_numbers_32bit():
    assert fsattr._ioc("r", "f", 1, 4) & 0xFFFF0000 in (0x80040000, 0x40040000)


@pytest.mark.parametrize("flags, letters", [
    (0, ""),
    (fsattr.FS_NOCOW_FL, "C"),
    (fsattr.FS_NOCOW_FL | 0x80, "AC"),
    (0x80000, "e"),
    (fsattr.FS_COMPR_FL | 0x80, "Ac"),
])
def test_flag_letters(flags, letters):
    assert fsattr.flag_letters(flags) == letters


def test_mount_info_longest_prefix_and_escapes(tmp_path):
    mi = tmp_path / "mountinfo"
    mi.write_text(
        "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n"
        "40 22 0:40 / /mnt/btrfs\\040pool rw,relatime shared:2 - btrfs /dev/sdb rw,compress=zstd:3,space_cache=v2\n"
        "41 40 0:41 / /mnt/btrfs\\040pool/sub/tmp rw shared:3 - tmpfs tmpfs rw\n"
    )
    assert fsattr.mount_info("/mnt/btrfs pool/sub/db", str(mi))[:2] == ("/mnt/btrfs pool", "btrfs")
    assert fsattr.mount_info("/mnt/btrfs pool/sub/tmp/x", str(mi))[1] == "tmpfs"
    assert fsattr.mount_info("/srv", str(mi))[1] == "ext4"
    assert "compress=zstd:3" in fsattr.mount_info("/mnt/btrfs pool", str(mi))[2]
    assert fsattr.mount_info("/x", str(tmp_path / "missing")) is None


def test_conversion_names_stay_in_the_same_parent():
    tmp, backup = nocow.conversion_names("/pool/immich/postgres/", "20260101T000000")
    assert tmp == "/pool/immich/.postgres.nocow-tmp-20260101T000000"
    assert backup == "/pool/immich/postgres.cow-backup-20260101T000000"


@pytest.mark.parametrize("comp, conflict", [
    ({"attribute": False, "property": None}, False),
    ({"attribute": True, "property": None}, True),
    ({"attribute": True, "property": "zstd"}, True),
])
def test_compression_conflict(comp, conflict):
    facts = {"path": "/p", "compression": dict(comp, mount_option="zstd")}
    msg = nocow.compression_conflict(facts)
    assert bool(msg) is conflict
    if conflict:
        assert "chattr -c /p" in msg and "btrfs property set /p compression" in msg
