# -*- coding: utf-8 -*-
# Copyright: homelab.immich contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Filesystem type (statfs magic) and inode flags (FS_IOC_GETFLAGS/SETFLAGS), stdlib only."""

from __future__ import annotations

import array
import ctypes
import ctypes.util
import errno
import fcntl
import os
import platform
import struct

FS_COMPR_FL = 0x00000004
FS_NOCOMP_FL = 0x00000400
FS_NOCOW_FL = 0x00800000

# lsattr letters, in lsattr's order, for a readable "flags" fact.
FLAG_LETTERS = (
    (0x1, "s"), (0x2, "u"), (0x8, "S"), (0x10000, "D"), (0x10, "i"), (0x20, "a"), (0x40, "d"),
    (0x80, "A"), (0x4, "c"), (0x800, "E"), (0x1000, "I"), (0x4000, "j"), (0x8000, "t"),
    (0x20000, "T"), (0x80000, "e"), (0x400, "m"), (0x2000000, "x"), (0x800000, "C"),
    (0x40000000, "F"), (0x10000000, "N"), (0x20000000, "P"), (0x100000, "V"),
)

MAGIC = {
    0x9123683E: "btrfs",
    0xEF53: "ext4",
    0x58465342: "xfs",
    0x01021994: "tmpfs",
    0x2FC12FC1: "zfs",
    0x794C7630: "overlay",
    0x6969: "nfs",
    0xF2F52010: "f2fs",
    0xCA451A4E: "bcachefs",
    0xFF534D42: "cifs",
    0x65735546: "fuse",
    0x3153464A: "jfs",
    0x52654973: "reiserfs",
    0x4D44: "vfat",
    0x5346544E: "ntfs",
    0x858458F6: "ramfs",
    0x73717368: "squashfs",
}
BTRFS_MAGIC = 0x9123683E
BTRFS_FIRST_FREE_OBJECTID = 256  # inode number of every subvolume's root directory


def _ioc(direction, kind, nr, size):
    machine = platform.machine().lower()
    if machine.startswith(("ppc", "powerpc", "mips", "sparc")):
        dirs = {"r": 2, "w": 4}
        dir_shift, size_bits = 29, 13
    else:
        dirs = {"r": 2, "w": 1}
        dir_shift, size_bits = 30, 14
    return (dirs[direction] << dir_shift) | ((size & ((1 << size_bits) - 1)) << 16) | (ord(kind) << 8) | nr


_LONG = struct.calcsize("l")
FS_IOC_GETFLAGS = _ioc("r", "f", 1, _LONG)
FS_IOC_SETFLAGS = _ioc("w", "f", 2, _LONG)


class FsAttrError(Exception):
    """An attribute operation that failed; ``errno`` is kept."""

    def __init__(self, msg, err=None):
        super().__init__(msg)
        self.errno = err


def get_flags(fd):
    """Inode flags of an open file descriptor (the kernel reads/writes a 32-bit int)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf, True)
    return buf[0] & 0xFFFFFFFF


def set_flags(fd, flags):
    if flags >= 0x80000000:
        flags -= 1 << 32
    buf = array.array("i", [flags])
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, buf, False)


def flag_letters(flags):
    return "".join(letter for bit, letter in FLAG_LETTERS if flags & bit)


def update_flags(fd, set_bits=0, clear_bits=0):
    """Read-modify-write: OR in ``set_bits``, clear ``clear_bits``, keep every other flag.

    Returns (before, after) as re-read from the kernel after the write.
    """
    before = get_flags(fd)
    wanted = (before | set_bits) & ~clear_bits & 0xFFFFFFFF
    if wanted != before:
        set_flags(fd, wanted)
    return before, get_flags(fd)


_libc = None


def _statfs_type_ctypes(fd):
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    buf = ctypes.create_string_buffer(256)
    if _libc.fstatfs(fd, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    if struct.pack("=I", 1)[0] != 1:  # big-endian: f_type width varies by ABI (s390x: 4 bytes)
        raise OSError(errno.ENOTSUP, "big-endian statfs layout")
    return ctypes.c_long.from_buffer(buf).value & 0xFFFFFFFF


def _unescape_mount(field):
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_info(path, mountinfo="/proc/self/mountinfo"):
    """Return (mount point, fstype, super options) of the mount holding ``path`` (longest prefix)."""
    real = os.path.realpath(path)
    best = None
    try:
        with open(mountinfo) as f:
            lines = f.readlines()
    except OSError:
        return None
    for line in lines:
        left, _sep, right = line.partition(" - ")
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 3:
            continue
        point = _unescape_mount(fields[4])
        if real == point or real.startswith(point.rstrip("/") + "/") or point == "/":
            if best is None or len(point) >= len(best[0]):
                best = (point, rfields[0], rfields[2])
    return best


def fs_type(fd, path):
    """Return (name, magic or None) for the filesystem holding the open ``fd``."""
    try:
        magic = _statfs_type_ctypes(fd)
        return MAGIC.get(magic, "unknown-0x%x" % magic), magic
    except (OSError, AttributeError, ValueError):
        info = mount_info(path)
        if info:
            return info[1], next((m for m, n in MAGIC.items() if n == info[1]), None)
        return "unknown", None


def subvolume_root(path):
    """On btrfs, the root directory of the subvolume holding ``path`` (walks up while st_dev stays)."""
    cur = os.path.realpath(path)
    st = os.stat(cur)
    while True:
        if st.st_ino == BTRFS_FIRST_FREE_OBJECTID:
            return cur
        parent = os.path.dirname(cur)
        if parent == cur:
            return cur
        pst = os.stat(parent)
        if pst.st_dev != st.st_dev:
            return cur
        cur, st = parent, pst


def compression_property(path):
    """The btrfs compression property (``btrfs property get PATH compression``) or None."""
    try:
        value = os.getxattr(path, "btrfs.compression", follow_symlinks=False)
    except OSError:
        return None
    value = value.rstrip(b"\x00").decode("ascii", "replace")
    return value or None
