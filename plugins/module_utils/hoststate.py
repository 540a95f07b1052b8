# -*- coding: utf-8 -*-
# Copyright: homelab.immich contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Read a host's state for a deployment without changing anything: the host's podman, systemd and
pool, the service user, directories, secrets, images, units and containers. Each reader takes a
``run(argv) -> (rc, stdout, stderr)`` callable, so the module and the tests share them."""

from __future__ import annotations

import grp
import json
import os
import pwd
import stat

from ansible_collections.homelab.immich.plugins.module_utils import nocow
from ansible_collections.homelab.immich.plugins.module_utils import quadlet as q

RUNTIME_ROOT = "/run/user"
LINGER_DIR = "/var/lib/systemd/linger"


def _first_word(run, argv, index=0):
    rc, out, _err = run(argv)
    words = out.split() if rc == 0 else []
    return words[index] if len(words) > index else ""


def host_facts(run, storage_root, library_path=None, firewall_unit=None, commands=None):
    """What the preflight checks: podman and its quadlet generator, PID 1, the cgroup hierarchy, the
    architecture, SELinux, the pool (the nearest existing directory of STORAGE_ROOT: its filesystem
    and free KiB), nft, and whether LIBRARY_PATH and the firewall unit exist."""
    commands = commands or {}
    podman = commands.get("podman")
    version = ""
    if podman:
        version = _first_word(run, [podman, "--version"], 2)
    probe = nocow.nearest_existing(storage_root)
    st = os.statvfs(probe)
    getenforce = commands.get("getenforce")
    selinux = (_first_word(run, [getenforce]) or "Disabled") if getenforce else "Disabled"
    try:
        with open("/proc/1/comm") as f:
            pid1 = f.read().strip()
    except OSError:
        pid1 = ""
    return dict(
        generator=q.find_generator() or "",
        podman=version,
        pid1=pid1,
        cgroup=fs_type(run, "/sys/fs/cgroup"),
        machine=os.uname().machine,
        pool_probe=probe,
        pool_free_kib=st.f_bavail * st.f_frsize // 1024,
        pool_fs=fs_type(run, probe),
        selinux=selinux,
        nft=os.access("/usr/sbin/nft", os.X_OK),
        library_exists=bool(library_path) and os.path.lexists(library_path),
        firewall_unit=bool(firewall_unit) and os.path.lexists(os.path.join("/etc/systemd/system", firewall_unit)),
    )


def fs_type(run, path):
    """The filesystem type name as stat -f reports it (btrfs, ext2/ext3, tmpfs, cgroup2fs)."""
    rc, out, _err = run(["stat", "-f", "-c", "%T", path])
    return out.strip() if rc == 0 else ""


def _has_entry(path, name):
    try:
        with open(path) as f:
            return any(line.split(":", 1)[0] == name for line in f)
    except OSError:
        return False


def user_facts(name):
    """The service user: whether it exists, its ids, home and shell, its subordinate id ranges,
    linger and whether its systemd manager runs (its bus socket exists)."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return dict(exists=False, name=name)
    try:
        group_gid = grp.getgrnam(name).gr_gid
    except KeyError:
        group_gid = None
    bus = os.path.join(RUNTIME_ROOT, str(pw.pw_uid), "bus")
    return dict(
        exists=True, name=name, uid=pw.pw_uid, gid=pw.pw_gid, group_gid=group_gid, home=pw.pw_dir,
        home_exists=os.path.isdir(pw.pw_dir), shell=pw.pw_shell,
        subuid=_has_entry("/etc/subuid", name), subgid=_has_entry("/etc/subgid", name),
        linger=os.path.exists(os.path.join(LINGER_DIR, name)),
        manager=os.path.exists(bus),
    )


def path_facts(path):
    """exists, type (directory, file, link, other), mode (octal text), uid, gid; lstat, not followed."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return dict(exists=False)
    if stat.S_ISDIR(st.st_mode):
        kind = "directory"
    elif stat.S_ISREG(st.st_mode):
        kind = "file"
    elif stat.S_ISLNK(st.st_mode):
        kind = "link"
    else:
        kind = "other"
    return dict(exists=True, type=kind, mode="%04o" % stat.S_IMODE(st.st_mode), uid=st.st_uid, gid=st.st_gid)


def as_user(argv, user):
    """ARGV run as USER's podman from a root process (runuser with the user's runtime directory and
    bus), or as given when USER is None (rootful, or the module already runs as that user)."""
    if user is None:
        return list(argv)
    runtime = os.path.join(RUNTIME_ROOT, str(user["uid"]))
    return ["runuser", "-u", user["name"], "--", "env", "XDG_RUNTIME_DIR=" + runtime,
            "DBUS_SESSION_BUS_ADDRESS=unix:path=%s/bus" % runtime] + list(argv)


def secrets(run, podman, names):
    """{name: value or None (no such secret)}: one `podman secret inspect --showsecret` for every name
    when all exist, one per name otherwise. Any other failure raises: a secret that exists must never
    be taken for a missing one (a new password would lock the data out)."""
    names = list(names)
    if not names:
        return {}
    found = {}
    rc, out, _err = run(podman + ["secret", "inspect", "--showsecret"] + names)
    if rc == 0:
        for entry in json.loads(out or "[]"):
            found[entry["Spec"]["Name"]] = entry.get("SecretData", "")
    for name in names:
        if name in found:
            continue
        rc, out, err = run(podman + ["secret", "inspect", "--showsecret", "--format", "{{.SecretData}}", name])
        if rc == 0:
            found[name] = out[:-1] if out.endswith("\n") else out
        elif "no such secret" not in (err + out).lower():
            raise RuntimeError("podman secret inspect %s failed (rc %d): %s" % (name, rc, (err or out).strip()))
    return dict((name, found.get(name)) for name in names)


def image_ids(run, podman, refs):
    """{reference: image ID or None}: one `podman image inspect` for every reference when all are
    there, one per reference otherwise."""
    refs = list(dict.fromkeys(r for r in refs if r))
    if not refs:
        return {}
    rc, out, _err = run(podman + ["image", "inspect", "--format", "{{.Id}}"] + refs)
    ids = out.splitlines() if rc == 0 else []
    if rc == 0 and len(ids) == len(refs):
        return dict(zip(refs, ids))
    result = {}
    for ref in refs:
        rc, out, _err = run(podman + ["image", "inspect", "--format", "{{.Id}}", ref])
        result[ref] = out.strip() if rc == 0 and out.strip() else None
    return result


def unit_states(run, systemctl, units):
    """{unit: ActiveState, UnitFileState, LoadState} for every unit, one `systemctl show`."""
    units = list(units)
    if not units:
        return {}
    rc, out, err = run(systemctl + ["show", "-p", "Id,ActiveState,UnitFileState,LoadState", "--"] + units)
    if rc != 0:
        raise RuntimeError("%s show failed (rc %d): %s" % (" ".join(systemctl), rc, (err or out).strip()))
    blocks = out.strip("\n").split("\n\n") if out.strip() else []
    states = {}
    for unit, block in zip(units, blocks):
        state = {}
        for line in block.splitlines():
            key, _sep, value = line.partition("=")
            if key:
                state[key] = value
        states[unit] = dict(active=state.get("ActiveState", "unknown"), file=state.get("UnitFileState", ""),
                            load=state.get("LoadState", ""))
    for unit in units:
        states.setdefault(unit, dict(active="unknown", file="", load=""))
    return states


def containers(run, podman):
    """{systemd unit: {id, image_id, image, state}} of the newest container of each unit
    (`podman ps -a`, which lists the newest first)."""
    rc, out, err = run(podman + ["ps", "-a", "--no-trunc", "--format", "json"])
    if rc != 0:
        raise RuntimeError("podman ps failed (rc %d): %s" % (rc, (err or out).strip()))
    result = {}
    for c in json.loads(out or "[]"):
        unit = (c.get("Labels") or {}).get("PODMAN_SYSTEMD_UNIT")
        if unit and unit not in result:
            result[unit] = dict(id=c.get("Id", ""), image_id=c.get("ImageID", ""), image=c.get("Image", ""),
                                state=c.get("State", ""))
    return result


def firewalld_missing(run, firewall_cmd, rules):
    """(running, [rules not in firewalld's permanent configuration]); (False, []) without firewalld."""
    if not firewall_cmd:
        return False, []
    rc, _out, _err = run([firewall_cmd, "--state"])
    if rc != 0:
        return False, []
    rc, out, err = run([firewall_cmd, "--permanent", "--list-rich-rules"])
    if rc != 0:
        raise RuntimeError("firewall-cmd --list-rich-rules failed (rc %d): %s" % (rc, (err or out).strip()))
    present = set(" ".join(line.split()) for line in out.splitlines())
    return True, [r for r in rules if " ".join(r.split()) not in present]
