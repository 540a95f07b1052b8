#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: homelab.immich contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: system_files
short_description: Install (or remove) several root-owned files and the systemd unit they make, in one call
version_added: 0.1.0
description:
  - Reads every directory and file given (type, content, mode, owner, group) and writes only what
    differs, each file atomically (a temporary file in the same directory, fsync, rename, the
    directory fsynced), with its owner and mode set before it appears.
  - With O(unit), reloads systemd when a file changed, enables the unit and starts it (or restarts
    it when a file changed and O(restart) is true). Nothing is touched when everything is as asked,
    one round trip, one C(systemctl show) to read the unit.
  - Every entry is checked before anything is written (absolute paths, modes, owners and groups
    that exist, a directory for every file, nothing of another type in the way), so a bad entry
    changes nothing.
  - With O(state=absent), the opposite in one call. O(unit) is stopped and disabled, then every file
    of O(files) that exists is removed, then systemd is reloaded (and the unit's failed state reset).
    Nothing is touched when all of it is gone already.
  - For scripts, their settings and their systemd units; not for secrets (the diff shows the content).
options:
  state:
    description:
      - V(present) writes the files and runs O(unit); V(absent) stops and disables O(unit) and removes
        the files (only O(files[].dest) is read then).
    type: str
    choices: [present, absent]
    default: present
  files:
    description: The files, each with its full content.
    type: list
    elements: dict
    required: true
    suboptions:
      dest:
        description: Absolute path of the file. Its directory must exist or be one of O(directories).
        type: path
        required: true
      content:
        description: The file's content (text, written as UTF-8). Required with O(state=present).
        type: str
      mode:
        description: Octal permission as a string, such as C('0644').
        type: raw
        default: '0644'
      owner:
        description: Owning user.
        type: str
        default: root
      group:
        description: Owning group.
        type: str
        default: root
  directories:
    description:
      - Directories made (or given this mode and owner) before the files are written.
      - Not with O(state=absent) (the directories may hold what others wrote; they stay).
    type: list
    elements: dict
    default: []
    suboptions:
      path:
        description: Absolute path. Missing parents are made with the same mode and owner.
        type: path
        required: true
      mode:
        description: Octal permission as a string, such as C('0755').
        type: raw
        default: '0755'
      owner:
        description: Owning user.
        type: str
        default: root
      group:
        description: Owning group.
        type: str
        default: root
  unit:
    description:
      - A system unit (C(NAME.timer), C(NAME.service)...) to enable and keep running, or with
        O(state=absent) to stop and disable before its files go. Empty for none.
    type: str
    default: ''
  restart:
    description:
      - Restart O(unit) when a file changed (a oneshot service that applies its files, such as firewall
        rules) instead of only starting it when it is not active.
    type: bool
    default: false
attributes:
  check_mode:
    support: full
    description: Reports what would be written (or removed) and done to the unit; writes nothing and calls no systemctl verb that changes anything.
  diff_mode:
    support: full
    description: Returns a before/after for every file that changes (content, and mode or owner) or is removed.
  platform:
    platforms: posix
    support: full
    description: Needs systemd on the target only with O(unit).
notes:
  - Only the Python standard library is needed on the target.
author:
  - homelab.immich maintainers (@homelab-immich)
"""

EXAMPLES = r"""
- name: Install the backup and run its timer
  homelab.immich.system_files:
    files:
      - dest: /usr/local/sbin/homelab-immich-backup
        mode: "0755"
        content: "{{ lookup('ansible.builtin.file', 'immich-backup.py') }}"
      - dest: /etc/systemd/system/immich-backup.service
        content: "{{ lookup('ansible.builtin.template', 'immich-backup.service.j2') }}"
      - dest: /etc/systemd/system/immich-backup.timer
        content: "{{ lookup('ansible.builtin.template', 'immich-backup.timer.j2') }}"
    unit: immich-backup.timer

- name: Files another program reads, in a directory made for them
  homelab.immich.system_files:
    directories:
      - path: /etc/prometheus/immich
    files:
      - dest: /etc/prometheus/immich/immich-alerts.yml
        content: "{{ rules }}"

- name: Stop the backup timer and remove its files (uninstall)
  homelab.immich.system_files:
    state: absent
    files:
      - dest: /usr/local/sbin/homelab-immich-backup
      - dest: /etc/systemd/system/immich-backup.service
      - dest: /etc/systemd/system/immich-backup.timer
    unit: immich-backup.timer
"""

RETURN = r"""
changed_files:
  description: The files written (or that would be, in check mode).
  returned: always
  type: list
  elements: str
  sample: [/etc/systemd/system/immich-backup.timer]
removed_files:
  description: The files removed (or that would be, in check mode) with O(state=absent).
  returned: always
  type: list
  elements: str
  sample: [/etc/systemd/system/immich-backup.timer]
changed_directories:
  description: The directories made or given another mode or owner.
  returned: always
  type: list
  elements: str
unit_actions:
  description:
    - What was done to O(unit), in order (C(daemon-reload), C(enable), C(start), C(restart); with
      O(state=absent) C(stop), C(disable), C(daemon-reload), C(reset-failed)).
  returned: always
  type: list
  elements: str
  sample: [daemon-reload, enable, start]
unit_state:
  description: The unit's state as read before any change (C(UnitFileState), C(ActiveState)); empty without O(unit) or when the unit is new.
  returned: always
  type: dict
  sample: {UnitFileState: enabled, ActiveState: active}
"""

import os
import stat

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.homelab.immich.plugins.module_utils.fileops import atomic_write, makedirs, read_bytes
from ansible_collections.homelab.immich.plugins.module_utils.sysfiles import DIRECTORY_OPTIONS, FILE_OPTIONS, attrs_text, plan, unit_actions


def diff_entry(dest, data, mode, uid, gid, before):
    entry = {"before_header": dest, "after_header": dest,
             "after": "%s\n%s" % (attrs_text(mode, uid, gid), data.decode("utf-8", "replace"))}
    if before is None:
        entry["before"] = ""
    else:
        entry["before"] = "%s\n%s" % (attrs_text(before[1], before[2], before[3]), before[0].decode("utf-8", "replace"))
    return entry


def read_unit(module, systemctl, unit):
    rc, out, err = module.run_command([systemctl, "show", "-p", "UnitFileState,ActiveState,LoadState", "--", unit])
    if rc != 0:
        module.fail_json(msg="systemctl show %s failed (rc %d): %s. Is systemd running on this host?" % (unit, rc, err.strip()))
    state = {}
    for line in out.splitlines():
        key, _sep, value = line.partition("=")
        if key:
            state[key] = value
    return state


def plan_removal(files, directories):
    """The files of a state=absent call that exist: ([(dest, before)], problems), before as in plan()."""
    problems = []
    if directories:
        problems.append("directories are only for state=present (they stay with state=absent: others may have "
                        "files in them); drop them from this call")
    removals = []
    seen = set()
    for f in files:
        dest = f["dest"]
        where = "file %s" % dest
        if not os.path.isabs(dest):
            problems.append("%s: the path must be absolute" % where)
            continue
        dest = os.path.normpath(dest)
        if dest in seen:
            problems.append("%s: given twice" % where)
            continue
        seen.add(dest)
        try:
            st = os.lstat(dest)
        except FileNotFoundError:
            continue
        if stat.S_ISLNK(st.st_mode):
            removals.append((dest, (b"", stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)))
        elif not stat.S_ISREG(st.st_mode):
            problems.append("%s: it is not a regular file (a directory or a device); remove it by hand if it is "
                            "to go" % where)
        else:
            removals.append((dest, (read_bytes(dest), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)))
    return removals, problems


def removal_diff(dest, before):
    return {"before_header": dest, "after_header": "%s (absent)" % dest,
            "before": "%s\n%s" % (attrs_text(before[1], before[2], before[3]), before[0].decode("utf-8", "replace")),
            "after": ""}


def run_actions(module, systemctl, unit, actions, result, done):
    for action in actions:
        rc, _out, err = module.run_command([systemctl, action] + ([] if action == "daemon-reload" else ["--", unit]))
        if rc != 0:
            result["failed_action"] = action
            module.fail_json(msg="systemctl %s %s failed (rc %d): %s. %s; see `systemctl status %s` and "
                                 "`journalctl -u %s`, fix the cause and run again."
                                 % (action, unit if action != "daemon-reload" else "", rc, err.strip(), done, unit, unit),
                             **result)


def remove(module, p):
    """state=absent: stop and disable the unit, remove the files that exist, reload systemd."""
    removals, problems = plan_removal(p["files"], p["directories"])
    if problems:
        module.fail_json(msg="Nothing was changed: " + "; ".join(problems), problems=problems)
    unit = p["unit"]
    systemctl = module.get_bin_path("systemctl", required=True) if unit else None
    unit_state = read_unit(module, systemctl, unit) if unit else {}
    before, after = [], []
    if unit_state.get("LoadState") not in (None, "not-found"):
        if unit_state.get("ActiveState") in ("active", "reloading", "activating", "deactivating"):
            before.append("stop")
        if unit_state.get("UnitFileState") in ("enabled", "enabled-runtime", "linked", "linked-runtime"):
            before.append("disable")
    if unit and removals:
        after.append("daemon-reload")
    if unit_state.get("ActiveState") == "failed":
        after.append("reset-failed")
    result = dict(changed=bool(removals or before or after), changed_directories=[], changed_files=[],
                  removed_files=[r[0] for r in removals], unit_actions=before + after, unit_state=unit_state)
    if module._diff:
        result["diff"] = [removal_diff(*r) for r in removals]
    if module.check_mode:
        module.exit_json(**result)
    run_actions(module, systemctl, unit, before, result, "Nothing was removed")
    for dest, _before in removals:
        try:
            os.unlink(dest)
        except FileNotFoundError:
            pass
    if removals:
        fsync_dirs(sorted({os.path.dirname(r[0]) for r in removals}))
    run_actions(module, systemctl, unit, after, result, "The files were removed (%s)" % ", ".join(result["removed_files"]))
    module.exit_json(**result)


def fsync_dirs(paths):
    """The removals made durable: each directory that lost an entry fsynced."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def main():
    module = AnsibleModule(
        argument_spec=dict(
            files=dict(type="list", elements="dict", required=True, options=FILE_OPTIONS),
            directories=dict(type="list", elements="dict", default=[], options=DIRECTORY_OPTIONS),
            unit=dict(type="str", default=""),
            restart=dict(type="bool", default=False),
            state=dict(type="str", default="present", choices=["present", "absent"]),
        ),
        supports_check_mode=True,
    )
    p = module.params
    if p["state"] == "absent":
        remove(module, p)
    dirs, writes, problems = plan(p["files"], p["directories"])
    if problems:
        module.fail_json(msg="Nothing was changed: " + "; ".join(problems), problems=problems)
    unit = p["unit"]
    systemctl = None
    unit_state = {}
    unit_new = unit and any(w[0] == os.path.join("/etc/systemd/system", unit) and w[5] is None for w in writes)
    if unit:
        systemctl = module.get_bin_path("systemctl", required=True)
        if not (module.check_mode and unit_new):
            unit_state = read_unit(module, systemctl, unit)

    result = dict(changed=bool(dirs or writes), changed_directories=[d[0] for d in dirs],
                  changed_files=[w[0] for w in writes], removed_files=[], unit_actions=[], unit_state=unit_state)
    if module._diff:
        result["diff"] = [diff_entry(*w) for w in writes]

    actions = unit_actions(unit, unit_state, bool(writes), p["restart"], module.check_mode and unit_new)
    result["unit_actions"] = actions
    if actions:
        result["changed"] = True
    if module.check_mode:
        module.exit_json(**result)

    for path, mode, uid, gid, exists in dirs:
        if exists:
            os.chmod(path, mode)
            os.chown(path, uid, gid)
        else:
            makedirs(path, mode=mode, uid=uid, gid=gid)
    for dest, data, mode, uid, gid, _before in writes:
        atomic_write(dest, data, mode=mode, uid=uid, gid=gid)
    run_actions(module, systemctl, unit, actions, result,
                "The files were written (%s)" % (", ".join(result["changed_files"]) or "none changed"))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
