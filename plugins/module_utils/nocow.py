# -*- coding: utf-8 -*-
# Copyright: homelab.immich contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""BTRFS No_COW directories: inspect, set/clear, and convert existing copy-on-write contents.

NOCOW (``chattr +C``) only applies to files created after it is set: a regular file keeps
copy-on-write once it has data, and the kernel silently ignores the flag on it.  So a directory
is only *effectively* NOCOW when it has the flag and so does everything below it.  Conversion
rewrites the contents into new inodes created under a NOCOW sibling in the same parent (same
subvolume), verifies them, and swaps the directories, keeping the old tree as a backup.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
import time

from ansible_collections.homelab.immich.plugins.module_utils import fsattr

SAMPLE_LIMIT = 10
SKIP_XATTR_PREFIXES = ("btrfs.",)  # properties such as btrfs.compression conflict with NOCOW


class NocowError(Exception):
    """A failure with a message that says what was wrong and what to do."""


def open_dir(path):
    """Open a directory without following a final symlink; raise NocowError for symlinks/non-dirs."""
    if os.path.islink(path):
        raise NocowError("%s is a symbolic link; refusing it: give the real directory path (%s)"
                         % (path, os.path.realpath(path)))
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            raise NocowError("%s is not a directory" % path)
        raise


def nearest_existing(path):
    cur = os.path.abspath(path)
    while not os.path.lexists(cur):
        cur = os.path.dirname(cur)
    return cur


def walk_entries(top):
    """Yield (path, lstat) for every entry below ``top`` (not ``top`` itself), depth first."""
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            with os.scandir(d) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            try:
                st = e.stat(follow_symlinks=False)
            except OSError:
                continue
            yield e.path, st
            if stat.S_ISDIR(st.st_mode):
                stack.append(e.path)


def path_flags(path):
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        return fsattr.get_flags(fd)
    finally:
        os.close(fd)


def cow_entries(top, limit):
    """Count regular files and directories below ``top`` without NOCOW, checking up to ``limit``.

    Returns dict(checked, cow, samples, complete).
    """
    checked = cow = 0
    samples = []
    complete = True
    if limit <= 0:
        return dict(checked=0, cow=0, samples=[], complete=False)
    for path, st in walk_entries(top):
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            continue
        if checked >= limit:
            complete = False
            break
        checked += 1
        try:
            flags = path_flags(path)
        except OSError:
            flags = 0
        if not flags & fsattr.FS_NOCOW_FL:
            cow += 1
            if len(samples) < SAMPLE_LIMIT:
                samples.append(path)
    return dict(checked=checked, cow=cow, samples=samples, complete=complete)


def is_empty(path):
    with os.scandir(path) as it:
        return next(it, None) is None


def inspect(path, recurse_check):
    """Facts about ``path`` (which may not exist yet); never changes anything."""
    facts = dict(path=path, exists=os.path.lexists(path), fstype=None, fs_magic=None, supported=False,
                 is_subvolume=False, subvolume=None, nocow=False, flags="", effective=False,
                 cow_entries=0, cow_samples=[], checked_entries=0, check_complete=True, empty=True,
                 compression=dict(attribute=False, property=None, mount_option=None))
    probe = path if facts["exists"] else nearest_existing(path)
    if facts["exists"] and os.path.islink(path):
        raise NocowError("%s is a symbolic link; refusing it: give the real directory path (%s)"
                         % (path, os.path.realpath(path)))
    fd = open_dir(probe) if os.path.isdir(probe) else os.open(probe, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        name, magic = fsattr.fs_type(fd, probe)
        facts["fstype"], facts["fs_magic"] = name, ("0x%08x" % magic if magic is not None else None)
        facts["supported"] = magic == fsattr.BTRFS_MAGIC
        info = fsattr.mount_info(probe)
        if info:
            opts = dict((o.split("=", 1) + [""])[:2] for o in info[2].split(","))
            comp = opts.get("compress") or opts.get("compress-force")
            facts["compression"]["mount_option"] = comp or None
        if not facts["exists"]:
            return facts
        if not os.path.isdir(path):
            raise NocowError("%s exists and is not a directory" % path)
        if facts["supported"]:
            flags = fsattr.get_flags(fd)
            facts["flags"] = fsattr.flag_letters(flags)
            facts["nocow"] = bool(flags & fsattr.FS_NOCOW_FL)
            facts["compression"]["attribute"] = bool(flags & fsattr.FS_COMPR_FL)
            facts["compression"]["property"] = fsattr.compression_property(path)
            facts["subvolume"] = fsattr.subvolume_root(path)
            facts["is_subvolume"] = os.stat(path).st_ino == fsattr.BTRFS_FIRST_FREE_OBJECTID
    finally:
        os.close(fd)
    facts["empty"] = is_empty(path)
    if facts["supported"]:
        scan = cow_entries(path, recurse_check)
        facts.update(cow_entries=scan["cow"], cow_samples=scan["samples"],
                     checked_entries=scan["checked"], check_complete=scan["complete"])
        facts["effective"] = facts["nocow"] and scan["cow"] == 0
    return facts


def compression_conflict(facts):
    """A message when the directory has compression set, which btrfs refuses together with NOCOW.

    ``chattr +c`` and ``btrfs property set ... compression`` both show up as the attribute and as
    the property, so one message names both ways to clear it.
    """
    comp = facts["compression"]
    if not (comp["property"] or comp["attribute"]):
        return None
    return ("%s has compression enabled (attribute c%s), and btrfs refuses NOCOW together with it (EINVAL): "
            "clear it first with \"btrfs property set %s compression ''\" or 'chattr -c %s'"
            % (facts["path"], ", property compression=%s" % comp["property"] if comp["property"] else "",
               facts["path"], facts["path"]))


def set_nocow(path, enable):
    """Set or clear FS_NOCOW_FL on a directory, keeping every other flag; verify by re-reading."""
    fd = open_dir(path)
    try:
        try:
            before, after = fsattr.update_flags(
                fd, set_bits=fsattr.FS_NOCOW_FL if enable else 0,
                clear_bits=0 if enable else fsattr.FS_NOCOW_FL)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise NocowError("the kernel refused to %s NOCOW on %s (EINVAL): the directory probably has "
                                 "compression set (chattr -c, or btrfs property compression)"
                                 % ("set" if enable else "clear", path))
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTTY):
                raise NocowError("the filesystem of %s does not support the NOCOW attribute" % path)
            raise
    finally:
        os.close(fd)
    if bool(after & fsattr.FS_NOCOW_FL) != enable:
        raise NocowError("the NOCOW flag on %s did not %s (flags now %s)"
                         % (path, "stick" if enable else "clear", fsattr.flag_letters(after)))
    if (before & ~fsattr.FS_NOCOW_FL) != (after & ~fsattr.FS_NOCOW_FL):
        raise NocowError("other flags of %s changed unexpectedly: %s -> %s"
                         % (path, fsattr.flag_letters(before), fsattr.flag_letters(after)))
    return before, after


def open_by(path, proc="/proc"):
    """Processes with a file, cwd or root under ``path``: list of dict(pid, comm, what)."""
    real = os.path.realpath(path)
    prefix = real.rstrip("/") + "/"
    found = []
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return found
    for pid in pids:
        base = os.path.join(proc, pid)
        hits = []
        for link in ("cwd", "root"):
            try:
                target = os.readlink(os.path.join(base, link))
            except OSError:
                continue
            if link == "root" and target == "/":
                continue
            if target == real or target.startswith(prefix):
                hits.append(link)
        try:
            fds = os.listdir(os.path.join(base, "fd"))
        except OSError:
            fds = []
        for fd in fds:
            try:
                target = os.readlink(os.path.join(base, "fd", fd))
            except OSError:
                continue
            if target == real or target.startswith(prefix):
                hits.append(target)
                break
        if hits:
            try:
                with open(os.path.join(base, "comm")) as f:
                    comm = f.read().strip()
            except OSError:
                comm = "?"
            found.append(dict(pid=int(pid), comm=comm, what=hits[0]))
    return found


def tree_size(path):
    total = 0
    for _p, st in walk_entries(path):
        if stat.S_ISREG(st.st_mode):
            total += st.st_blocks * 512 if st.st_blocks else st.st_size
    return total


def _copy_xattrs(src, dst, follow):
    try:
        names = os.listxattr(src, follow_symlinks=follow)
    except OSError:
        return
    for name in names:
        if name.startswith(SKIP_XATTR_PREFIXES):
            continue
        try:
            os.setxattr(dst, name, os.getxattr(src, name, follow_symlinks=follow), follow_symlinks=follow)
        except OSError as exc:
            if exc.errno not in (errno.ENOTSUP, errno.EPERM) or name.startswith(("security.", "system.")):
                raise


def _copy_meta(src, dst, st, is_link=False):
    os.chown(dst, st.st_uid, st.st_gid, follow_symlinks=not is_link)
    if not is_link:
        os.chmod(dst, stat.S_IMODE(st.st_mode))
    _copy_xattrs(src, dst, follow=not is_link)
    os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns), follow_symlinks=not is_link)


def _copy_file(src, dst, st):
    fdin = os.open(src, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        fdout = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            while True:
                chunk = os.read(fdin, 1 << 20)  # plain read/write: never a reflink into NOCOW
                if not chunk:
                    break
                view = memoryview(chunk)
                while view:
                    n = os.write(fdout, view)
                    view = view[n:]
            os.fsync(fdout)
        finally:
            os.close(fdout)
    finally:
        os.close(fdin)
    _copy_meta(src, dst, st)


def copy_tree(src, dst):
    """Copy the contents of ``src`` into the existing directory ``dst`` (new inodes; no reflinks).

    Keeps owners, modes, times, xattrs (SELinux labels, ACLs), symlinks, hard links and special
    files.  Returns a list of warnings (sockets cannot be copied).
    """
    warnings = []
    links = {}
    dirs = []
    for path, st in walk_entries(src):
        rel = os.path.relpath(path, src)
        target = os.path.join(dst, rel)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            os.mkdir(target, 0o700)
            dirs.append((path, target, st))
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(path), target)
            _copy_meta(path, target, st, is_link=True)
        elif stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in links:
                os.link(links[key], target)
                continue
            _copy_file(path, target, st)
            if st.st_nlink > 1:
                links[key] = target
        elif stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            os.mknod(target, mode, st.st_rdev)
            _copy_meta(path, target, st)
        else:
            warnings.append("%s is a socket and was not copied (sockets are recreated by their service)" % path)
    for path, target, st in reversed(dirs):  # directory times last, deepest first
        _copy_meta(path, target, st)
        fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return warnings


def _digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tree_manifest(top):
    """Relative path -> (type, mode, uid, gid, size, sha256 or link target) for every entry."""
    out = {}
    for path, st in walk_entries(top):
        rel = os.path.relpath(path, top)
        mode = st.st_mode
        if stat.S_ISREG(mode):
            extra = _digest(path)
        elif stat.S_ISLNK(mode):
            extra = os.readlink(path)
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            extra = st.st_rdev
        else:
            extra = None
        if stat.S_ISSOCK(mode):
            continue
        out[rel] = (stat.S_IFMT(mode), stat.S_IMODE(mode), st.st_uid, st.st_gid,
                    st.st_size if stat.S_ISREG(mode) else 0, extra)
    return out


def verify_copy(src, dst):
    """Return a list of problems: differences in content/metadata, or entries without NOCOW."""
    problems = []
    a, b = tree_manifest(src), tree_manifest(dst)
    for rel in sorted(set(a) | set(b)):
        if a.get(rel) != b.get(rel):
            problems.append("%s differs: %r != %r" % (rel, a.get(rel), b.get(rel)))
    scan = cow_entries(dst, 1 << 62)
    if scan["cow"]:
        problems.append("%d entries of the copy lack NOCOW, e.g. %s" % (scan["cow"], ", ".join(scan["samples"][:3])))
    if not path_flags(dst) & fsattr.FS_NOCOW_FL:
        problems.append("the new directory %s lacks NOCOW" % dst)
    return problems


def conversion_names(path, stamp=None):
    stamp = stamp or time.strftime("%Y%m%dT%H%M%S")
    parent, name = os.path.split(os.path.abspath(path).rstrip("/"))
    return (os.path.join(parent, ".%s.nocow-tmp-%s" % (name, stamp)),
            os.path.join(parent, "%s.cow-backup-%s" % (name, stamp)))


def convert(path, make_subvolume=None, stamp=None, free_bytes=None):
    """Rewrite ``path``'s contents as NOCOW and swap; return dict(backup, warnings).

    ``make_subvolume(new_path)`` creates a btrfs subvolume (needed when ``path`` is one).  On any
    failure before the swap the temporary copy is removed and ``path`` is untouched; a failed
    swap is rolled back.
    """
    busy = open_by(path)
    if busy:
        raise NocowError("refusing to convert %s while processes use it: %s; stop the service that owns it first"
                         % (path, ", ".join("%s[%d] (%s)" % (b["comm"], b["pid"], b["what"]) for b in busy)))
    tmp, backup = conversion_names(path, stamp)
    for p in (tmp, backup):
        if os.path.lexists(p):
            raise NocowError("%s already exists; remove or rename it and run again" % p)
    need = tree_size(path)
    if free_bytes is None:
        vfs = os.statvfs(os.path.dirname(tmp))
        free_bytes = vfs.f_bavail * vfs.f_frsize
    if need * 1.05 + (64 << 20) > free_bytes:
        raise NocowError("converting %s needs about %d MiB free on its filesystem for the copy, only %d MiB are free"
                         % (path, need >> 20, free_bytes >> 20))
    st = os.stat(path)
    is_subvol = st.st_ino == fsattr.BTRFS_FIRST_FREE_OBJECTID
    if is_subvol:
        if make_subvolume is None:
            raise NocowError("%s is a btrfs subvolume; converting it needs 'btrfs' (btrfs-progs) to create "
                             "the replacement subvolume" % path)
        make_subvolume(tmp)
    else:
        os.mkdir(tmp, 0o700)
    try:
        set_nocow(tmp, True)
        warnings = copy_tree(path, tmp)
        _copy_meta(path, tmp, st)
        problems = verify_copy(path, tmp)
        if problems:
            raise NocowError("the NOCOW copy of %s did not verify, nothing was swapped: %s"
                             % (path, "; ".join(problems[:5])))
    except BaseException:
        _remove_tree(tmp, is_subvol)
        raise
    os.rename(path, backup)
    try:
        os.rename(tmp, path)
    except OSError:
        os.rename(backup, path)
        _remove_tree(tmp, is_subvol)
        raise
    return dict(backup=backup, warnings=warnings)


def _remove_tree(top, is_subvol):
    """Remove our temporary copy (never anything else)."""
    if not os.path.lexists(top):
        return
    for path, st in sorted(walk_entries(top), key=lambda x: -len(x[0])):
        if stat.S_ISDIR(st.st_mode):
            os.rmdir(path)
        else:
            os.unlink(path)
    try:
        os.rmdir(top)
    except OSError:
        if not is_subvol:
            raise
