# -*- coding: utf-8 -*-
# Copyright: homelab.immich contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Root-owned files and the unit they make: what differs from the host (system_files applies it,
immich_state only reports it)."""

from __future__ import annotations

import grp
import os
import pwd
import stat

from ansible_collections.homelab.immich.plugins.module_utils.fileops import parse_mode, read_bytes

# the options of one file and of one directory, shared by system_files (files=, directories=) and
# immich_state (file_sets[].files, file_sets[].directories)
_OWNER = dict(owner=dict(type="str", default="root"), group=dict(type="str", default="root"))
FILE_OPTIONS = dict(dest=dict(type="path", required=True), content=dict(type="str"),
                    mode=dict(type="raw", default="0644"), **_OWNER)
DIRECTORY_OPTIONS = dict(path=dict(type="path", required=True), mode=dict(type="raw", default="0755"), **_OWNER)

# unit file states that need no `systemctl enable` (enabled-runtime does: it ends at reboot)
ENABLED = ("enabled", "static", "alias", "indirect", "generated", "transient")


def resolve_ids(owner, group, where):
    """(uid, gid) for names or numbers; ValueError says which name does not exist."""
    try:
        uid = int(owner) if str(owner).isdigit() else pwd.getpwnam(owner).pw_uid
    except KeyError:
        raise ValueError("%s: user %r does not exist on this host" % (where, owner))
    try:
        gid = int(group) if str(group).isdigit() else grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError("%s: group %r does not exist on this host" % (where, group))
    return uid, gid


def attrs_text(mode, uid, gid):
    return "mode %04o, owner %d:%d" % (mode, uid, gid)


def plan(files, directories):
    """Check every entry and compare it with the host; return (dirs_to_make, files_to_write, problems).

    dirs_to_make: [(path, mode, uid, gid, exists)]; files_to_write: [(dest, data, mode, uid, gid, before)]
    where before is None (new) or (bytes, mode, uid, gid).
    """
    problems = []
    dirs = []
    planned_dirs = set()
    for d in directories:
        path = d["path"]
        where = "directory %s" % path
        try:
            if not os.path.isabs(path):
                raise ValueError("%s: the path must be absolute" % where)
            mode = parse_mode(d["mode"])
            uid, gid = resolve_ids(d["owner"], d["group"], where)
        except ValueError as e:
            problems.append(str(e))
            continue
        path = os.path.normpath(path)
        planned_dirs.add(path)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            dirs.append((path, mode, uid, gid, False))
            continue
        if not stat.S_ISDIR(st.st_mode):
            problems.append("%s: something that is not a directory is in the way (remove it, or choose another path)" % where)
        elif (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) != (mode, uid, gid):
            dirs.append((path, mode, uid, gid, True))
    writes = []
    seen = set()
    for f in files:
        dest = f["dest"]
        where = "file %s" % dest
        try:
            if not os.path.isabs(dest):
                raise ValueError("%s: the path must be absolute" % where)
            dest = os.path.normpath(dest)
            if dest in seen:
                raise ValueError("%s: given twice" % where)
            seen.add(dest)
            mode = parse_mode(f["mode"])
            uid, gid = resolve_ids(f["owner"], f["group"], where)
        except ValueError as e:
            problems.append(str(e))
            continue
        parent = os.path.dirname(dest)
        if not os.path.isdir(parent) and not any(d == parent or d.startswith(parent + "/") for d in planned_dirs):
            problems.append("%s: its directory %s does not exist (make it first, or list it in directories)" % (where, parent))
            continue
        if f["content"] is None:
            problems.append("%s: no content (it is required with state=present)" % where)
            continue
        data = f["content"].encode("utf-8")
        try:
            st = os.lstat(dest)
        except FileNotFoundError:
            writes.append((dest, data, mode, uid, gid, None))
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append("%s: something that is not a regular file is in the way (remove it, or choose another path)" % where)
            continue
        current = read_bytes(dest)
        before = (current, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
        if before != (data, mode, uid, gid):
            writes.append((dest, data, mode, uid, gid, before))
    return dirs, writes, problems


def unit_actions(unit, unit_state, files_changed, restart, unit_new_in_check=False):
    """The systemctl verbs that make UNIT right after the files: daemon-reload when a file changed,
    enable when not enabled, restart (a file changed and RESTART) or start when not running.
    unit_state is `systemctl show -p UnitFileState,ActiveState` as a dict."""
    actions = []
    if not unit:
        return actions
    if files_changed:
        actions.append("daemon-reload")
    if unit_new_in_check:
        return actions + ["enable", "start"]
    if unit_state.get("UnitFileState") not in ENABLED:
        actions.append("enable")
    if files_changed and restart:
        actions.append("restart")
    elif unit_state.get("ActiveState") not in ("active", "reloading", "activating"):
        actions.append("start")
    return actions
