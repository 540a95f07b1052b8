# -*- coding: utf-8 -*-
# Copyright: homelab.immich contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Small file helpers: read, atomic write with owner and mode, directory creation."""

from __future__ import annotations

import os
import stat
import tempfile


def parse_mode(value):
    """An octal permission given as a string ('0644') or an int; ValueError says what is wrong."""
    try:
        mode = int(value, 8) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ValueError("mode %r is not an octal permission string such as '0644'" % (value,))
    if not 0 <= mode <= 0o7777:
        raise ValueError("mode %r is out of range" % (value,))
    return mode


def read_bytes(path):
    """Return the file's bytes, or None if it does not exist."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def file_attrs(path):
    """Return (mode, uid, gid) of an existing path, or None."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid


def atomic_write(path, data, mode=0o644, uid=-1, gid=-1):
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, rename.

    Owner and mode are set on the temporary file before the rename, so the final path never
    exists with the wrong permissions or partial content.
    """
    directory = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=".%s." % os.path.basename(path), suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if uid != -1 or gid != -1:
            os.chown(tmp, uid, gid)
        os.rename(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def makedirs(path, mode=0o755, uid=-1, gid=-1):
    """Create ``path`` and missing parents; return the list of directories created."""
    created = []
    path = os.path.abspath(path)
    todo = []
    while not os.path.isdir(path):
        todo.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    for d in reversed(todo):
        os.mkdir(d, mode)
        os.chmod(d, mode)
        if uid != -1 or gid != -1:
            os.chown(d, uid, gid)
        created.append(d)
    return created
