#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: homelab.immich contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: btrfs_nocow
short_description: Make BTRFS directories NOCOW and tell whether NOCOW is really effective
version_added: 0.1.0
description:
  - Creates a directory if needed and sets the BTRFS No_COW attribute (C(chattr +C)) on it with a
    read-modify-write of the inode flags that keeps every other flag, then re-reads it to verify.
  - NOCOW only applies to files created after it is set; files that already hold data stay
    copy-on-write and the kernel silently ignores the flag on them. The module therefore reports
    whether NOCOW is I(effective) (the directory and every entry below it have it), with a count
    and sample of the entries that do not, and warns when it is not.
  - With O(convert=true), a directory whose existing contents are copy-on-write is rewritten into a
    fresh NOCOW sibling in the same parent (same subvolume), with owners, modes, times, xattrs
    (SELinux labels, ACLs), symlinks, hard links and special files kept, verified entry by entry
    (type, metadata, SHA-256 of contents, NOCOW on every entry), and swapped in. The old tree is
    kept as a backup whose path is returned. Conversion refuses while any process has files open
    there. On any failure the original directory is left as it was.
  - On filesystems without NOCOW (ext4, xfs, tmpfs...) the directory is still created and owned as
    asked, the attribute is skipped with a warning, or the task fails before changing anything
    with O(on_unsupported=fail).
options:
  path:
    description:
      - The directory. Symbolic links are refused.
      - Mutually exclusive with O(directories); one of them is required.
    type: path
  directories:
    description:
      - Several directories in one call (one round trip). Each entry takes O(path) and optionally
        O(owner), O(group), O(mode), O(enforce_ownership) and O(require_effective); the other options
        apply to all. Every entry is checked before any is changed, so a failing entry leaves all
        of them unchanged.
    type: list
    elements: dict
    suboptions:
      path:
        description: The directory.
        type: path
        required: true
      owner:
        description: As O(owner).
        type: str
      group:
        description: As O(group).
        type: str
      mode:
        description: As O(mode).
        type: raw
      enforce_ownership:
        description: As O(enforce_ownership); unset means the top-level value.
        type: bool
      require_effective:
        description: As O(require_effective); unset means the top-level value.
        type: bool
  state:
    description:
      - V(present) sets NOCOW (creating the directory if missing); V(absent) clears the flag on the
        directory (files already created keep theirs). The directory itself is never removed.
    type: str
    choices: [present, absent]
    default: present
  owner:
    description: Owner (name or UID) of the directory.
    type: str
  group:
    description: Group (name or GID) of the directory.
    type: str
  mode:
    description: Permissions of the directory, as an octal string such as V('0700').
    type: raw
  enforce_ownership:
    description:
      - V(true) keeps O(owner), O(group) and O(mode) on the directory on every run.
      - V(false) applies them only when the module creates the directory, for data directories
        whose service re-owns them (PostgreSQL chowns its data directory to its own user).
    type: bool
    default: true
  require_effective:
    description:
      - Fail, changing nothing, when NOCOW would not be effective because existing entries are
        copy-on-write and O(convert) is false (instead of setting the flag and warning).
    type: bool
    default: false
  recurse_check:
    description:
      - How many existing entries below the directory to check for NOCOW (0 skips the check).
    type: int
    default: 10000
  on_unsupported:
    description:
      - What to do when the filesystem cannot do NOCOW. V(skip) creates and owns the directory and
        warns; V(fail) fails before changing anything.
    type: str
    choices: [skip, fail]
    default: skip
  convert:
    description:
      - Rewrite existing copy-on-write contents as NOCOW (see description). Stop the services using
        the directory first.
    type: bool
    default: false
attributes:
  check_mode:
    support: full
    description: Reports what would change, including a conversion, without changing anything.
  diff_mode:
    support: full
    description: Shows the attribute and effectiveness before and after.
  platform:
    platforms: posix
    support: full
    description: Linux; the attribute exists on BTRFS only.
notes:
  - Only the Python standard library is needed on the target. Converting a directory that is
    itself a subvolume needs the C(btrfs) command to create the replacement subvolume.
  - NOCOW turns off BTRFS data checksums for those files; PostgreSQL's own page checksums
    (C(initdb --data-checksums)) take their place.
  - Snapshots of the subvolume make the next write to each shared extent copy-on-write once; keep
    databases in a subvolume that is not snapshotted often.
author:
  - homelab.immich maintainers (@homelab-immich)
"""

EXAMPLES = r"""
- name: PostgreSQL data directory, NOCOW before first use
  homelab.immich.btrfs_nocow:
    path: /mnt/btrfs-pool/subvol7-containers/immich/postgres
    owner: immich
    group: immich
    mode: "0700"
  register: pgdata

- name: Refuse to go on when the database directory is not effectively NOCOW
  ansible.builtin.assert:
    that: pgdata.effective or not pgdata.supported
    fail_msg: "{{ pgdata.cow_entries }} existing files are copy-on-write, e.g. {{ pgdata.cow_samples }}"

- name: Convert an existing database directory (the database must be stopped)
  homelab.immich.btrfs_nocow:
    path: /mnt/btrfs-pool/subvol7-containers/immich/postgres
    convert: true
  register: converted

- name: Database, Redis and ML cache directories in one round trip
  homelab.immich.btrfs_nocow:
    directories:
      - {path: /srv/immich/postgres, mode: "0700", require_effective: true}
      - {path: /srv/immich/redis, mode: "0750"}
      - {path: /srv/immich/ml-cache, mode: "0750"}
    owner: immich
    group: immich
    enforce_ownership: false

- name: Require BTRFS (fail on ext4/xfs/tmpfs instead of skipping)
  homelab.immich.btrfs_nocow:
    path: /srv/redis
    on_unsupported: fail
"""

RETURN = r"""
directories:
  description: With O(directories), one entry per directory holding the facts below.
  returned: when O(directories) is given
  type: list
  elements: dict
path:
  description: The directory.
  returned: always
  type: str
exists:
  description: Whether the directory exists (after the task; predicted in check mode).
  returned: always
  type: bool
fstype:
  description: Filesystem type from the statfs magic of the path (or its nearest existing parent).
  returned: always
  type: str
  sample: btrfs
fs_magic:
  description: The statfs magic number.
  returned: always
  type: str
  sample: "0x9123683e"
supported:
  description: Whether the filesystem supports NOCOW (BTRFS).
  returned: always
  type: bool
nocow:
  description: Whether the directory has the NOCOW attribute.
  returned: always
  type: bool
effective:
  description: Whether the directory and every checked entry below it are NOCOW.
  returned: always
  type: bool
cow_entries:
  description: Number of checked regular files and directories below the path without NOCOW.
  returned: always
  type: int
cow_samples:
  description: Up to 10 paths of such entries.
  returned: always
  type: list
  elements: str
checked_entries:
  description: Number of entries checked.
  returned: always
  type: int
check_complete:
  description: False when O(recurse_check) stopped the walk before every entry was checked.
  returned: always
  type: bool
flags:
  description: The directory's attribute letters as lsattr shows them.
  returned: always
  type: str
  sample: C
is_subvolume:
  description: Whether the path is the root of a BTRFS subvolume.
  returned: always
  type: bool
subvolume:
  description: Root directory of the subvolume holding the path.
  returned: always
  type: str
compression:
  description: Compression settings that matter for NOCOW.
  returned: always
  type: dict
  contains:
    attribute:
      description: The directory has the C(c) attribute (conflicts with NOCOW).
      type: bool
    property:
      description: The BTRFS compression property (conflicts with NOCOW).
      type: str
    mount_option:
      description: The C(compress)/C(compress-force) mount option (NOCOW files are not compressed).
      type: str
converted:
  description: Whether the contents were rewritten as NOCOW (or would be, in check mode).
  returned: always
  type: bool
backup:
  description: Where the old copy-on-write tree was kept after a conversion.
  returned: when converted
  type: str
  sample: /mnt/pool/immich/postgres.cow-backup-20261125T120000
"""

import grp
import os
import pwd
import stat

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.homelab.immich.plugins.module_utils import fileops
from ansible_collections.homelab.immich.plugins.module_utils import nocow

DIRECTORY_OPTIONS = dict(
    path=dict(type="path", required=True),
    owner=dict(type="str"),
    group=dict(type="str"),
    mode=dict(type="raw"),
    enforce_ownership=dict(type="bool"),
    require_effective=dict(type="bool"),
)

ARGUMENT_SPEC = dict(
    path=dict(type="path"),
    directories=dict(type="list", elements="dict", options=DIRECTORY_OPTIONS),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    owner=dict(type="str"),
    group=dict(type="str"),
    mode=dict(type="raw"),
    enforce_ownership=dict(type="bool", default=True),
    require_effective=dict(type="bool", default=False),
    recurse_check=dict(type="int", default=10000),
    on_unsupported=dict(type="str", default="skip", choices=["skip", "fail"]),
    convert=dict(type="bool", default=False),
)


def resolve_ids(owner, group):
    uid = gid = -1
    if owner is not None:
        if owner.isdigit():
            uid = int(owner)
        else:
            try:
                uid = pwd.getpwnam(owner).pw_uid
            except KeyError:
                raise nocow.NocowError("owner %r does not exist on the host; create the user first" % owner)
    if group is not None:
        if group.isdigit():
            gid = int(group)
        else:
            try:
                gid = grp.getgrnam(group).gr_gid
            except KeyError:
                raise nocow.NocowError("group %r does not exist on the host; create the group first" % group)
    return uid, gid


def parse_mode(mode):
    if mode is None:
        return None
    try:
        return fileops.parse_mode(mode)
    except ValueError as exc:
        raise nocow.NocowError(str(exc))


def state_view(facts):
    return dict(exists=facts["exists"], nocow=facts["nocow"], effective=facts["effective"],
                cow_entries=facts["cow_entries"])


def make_subvolume_with(module):
    def make(path):
        btrfs = module.get_bin_path("btrfs")
        if not btrfs:
            raise nocow.NocowError("%s must be created as a btrfs subvolume but the btrfs command is missing: "
                                   "install btrfs-progs" % path)
        rc, out, err = module.run_command([btrfs, "subvolume", "create", path])
        if rc != 0:
            raise nocow.NocowError("btrfs subvolume create %s failed: %s" % (path, (err or out).strip()))
    return make


def run_one(module, p, check):
    """Make one directory right (or, with check, say what would change); returns facts."""
    path = p["path"].rstrip("/") or "/"
    uid, gid = resolve_ids(p["owner"], p["group"])
    mode = parse_mode(p["mode"])
    enable = p["state"] == "present"
    warnings = []

    before = nocow.inspect(path, p["recurse_check"])
    after = dict(before)
    result = dict(changed=False, converted=False)

    if not before["supported"] and p["on_unsupported"] == "fail" and enable:
        raise nocow.NocowError("%s is on %s, which has no NOCOW attribute (BTRFS only); nothing was changed. "
                               "Put it on a BTRFS filesystem, or set on_unsupported: skip" % (path, before["fstype"]))
    if (p["require_effective"] and enable and before["supported"] and before["cow_entries"] > 0
            and not p["convert"]):
        raise nocow.NocowError(
            "%s holds %d copy-on-write entries (e.g. %s), so NOCOW would not be effective; nothing was changed. "
            "Stop the service and set convert: true to rewrite them as NOCOW, or move them away"
            % (path, before["cow_entries"], ", ".join(before["cow_samples"][:3])))
    if before["supported"] and enable and not before["nocow"]:
        conflict = nocow.compression_conflict(before)
        if conflict:
            raise nocow.NocowError(conflict + "; nothing was changed")

    # 1. the directory itself
    if not before["exists"]:
        if not enable:
            result.update(before)
            return result, warnings, before, after
        result["changed"] = True
        after["exists"] = True
        if not check:
            os.makedirs(path, mode=0o755)
            if mode is None:
                os.chmod(path, 0o755)
    if before["supported"] and before["nocow"] != enable:
        result["changed"] = True
        after["nocow"] = enable
        if not check:
            nocow.set_nocow(path, enable)

    # 2. owner and mode (after the flag, so nothing is handed over before it is NOCOW)
    if after["exists"] and (p["enforce_ownership"] or not before["exists"]):
        st = os.stat(path) if os.path.exists(path) else None
        cur_mode = stat.S_IMODE(st.st_mode) if st else None
        if mode is not None and cur_mode != mode:
            result["changed"] = True
            if not check:
                os.chmod(path, mode)
        if (uid != -1 and (st is None or st.st_uid != uid)) or (gid != -1 and (st is None or st.st_gid != gid)):
            result["changed"] = True
            if not check:
                os.chown(path, uid, gid)

    if not before["supported"]:
        if enable:
            warnings.append("%s is on %s, which has no NOCOW attribute (BTRFS only): directory handled, NOCOW skipped"
                            % (path, before["fstype"]))
        if not check:
            after = nocow.inspect(path, p["recurse_check"])
        result.update(after)
        return result, warnings, before, after

    # 3. effectiveness and conversion
    needs_conversion = enable and before["exists"] and before["cow_entries"] > 0
    if needs_conversion and p["convert"]:
        result["changed"] = True
        result["converted"] = True
        if check:
            busy = nocow.open_by(path)
            if busy:
                warnings.append("conversion would be refused now: %s use %s"
                                % (", ".join("%s[%d]" % (b["comm"], b["pid"]) for b in busy), path))
            result["backup"] = nocow.conversion_names(path)[1]
            after.update(effective=True, cow_entries=0, nocow=True)
        else:
            done = nocow.convert(path, make_subvolume=make_subvolume_with(module))
            result["backup"] = done["backup"]
            warnings.extend(done["warnings"])
    elif check:
        after["effective"] = after["nocow"] and before["cow_entries"] == 0 and enable

    if not check:
        after = nocow.inspect(path, p["recurse_check"])
    result.update(after)
    if enable and result["exists"] and not result["effective"]:
        warnings.append(
            "NOCOW on %s is not effective: %d existing entries are copy-on-write (e.g. %s); new files get "
            "NOCOW but these stay copy-on-write. Stop the service and run with convert: true to rewrite them"
            % (path, result["cow_entries"], ", ".join(result["cow_samples"][:3])))
    return result, warnings, before, after


def entry_params(params, entry):
    merged = dict(params)
    for key, value in entry.items():
        if value is not None:
            merged[key] = value
    return merged


def run(module):
    """Returns (result, warnings, diffs)."""
    p = module.params
    if not p["directories"]:
        result, warnings, before, after = run_one(module, p, module.check_mode)
        return result, warnings, [dict(before=state_view(before), after=state_view(after))]
    entries = [entry_params(p, e) for e in p["directories"]]
    paths = [e["path"].rstrip("/") for e in entries]
    if len(set(paths)) != len(paths):
        raise nocow.NocowError("a directory is listed twice in directories: %s" % ", ".join(paths))
    if not module.check_mode:
        for e in entries:  # every check first: a failing entry leaves all of them unchanged
            run_one(module, e, True)
    results, warnings, diffs = [], [], []
    for e in entries:
        result, w, before, after = run_one(module, e, module.check_mode)
        results.append(result)
        warnings.extend(w)
        diffs.append(dict(before_header=e["path"], after_header=e["path"],
                          before=state_view(before), after=state_view(after)))
    return dict(changed=any(r["changed"] for r in results), directories=results), warnings, diffs


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, mutually_exclusive=[("path", "directories")],
                           required_one_of=[("path", "directories")], supports_check_mode=True)
    try:
        result, warnings, diffs = run(module)
    except nocow.NocowError as exc:
        module.fail_json(msg=str(exc))
    except OSError as exc:
        module.fail_json(msg="%s: %s" % (type(exc).__name__, exc))
    for w in warnings:
        module.warn(w)
    if module._diff:
        result["diff"] = diffs if module.params["directories"] else diffs[0]
    module.exit_json(**result)


if __name__ == "__main__":
    main()
