#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: homelab.immich contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: immich_state
short_description: Read everything a deployment decides on, in one round trip, changing nothing
version_added: 0.2.0
description:
  - Reads the parts of a host's state that are asked for, in one call, and returns them as data
    for the controller to decide on; a part not asked for is not read. Nothing on the host changes.
  - The host (O(host)) as the preflight checks it; the service user (O(user)); directories as
    M(homelab.immich.btrfs_nocow) sees them (O(directories)); plain paths (O(paths)); as the
    containers' user, the podman secrets (O(secrets)), the image IDs (O(images)), the units
    (O(services)) and the newest container of each unit (O(containers)); whether the quadlet units
    (O(quadlet)) or the root-owned file sets (O(file_sets)) differ from what is installed, compared
    exactly as M(homelab.immich.podman_quadlet) and M(homelab.immich.system_files) compare them; and
    which firewalld rich rules are missing (O(firewalld_rules)).
  - The point is a run that changes nothing at the cost of one module call. The roles call the
    modules that change things only for what this read says differs.
  - Returns the secrets' values (a server on another host needs the password its database host
    keeps), so run it with C(no_log).
options:
  user:
    description:
      - The service user. Its facts are returned in RV(user); with O(rootless), podman runs as this
        user (through C(runuser), so the module runs as root) and systemd is its user manager.
    type: str
    required: true
  rootless:
    description: The containers run as O(user) (V(true)) or as root with system units (V(false)).
    type: bool
    default: true
  host:
    description: The host facts the preflight checks (RV(host)).
    type: dict
    suboptions:
      storage_root:
        description: The pool's directory; the nearest existing directory is measured.
        type: path
        required: true
      library_path:
        description: Whether it exists is reported in RV(host) (C(library_exists)).
        type: path
      firewall_unit:
        description: A unit name in C(/etc/systemd/system); whether it exists is reported in RV(host) (C(firewall_unit)).
        type: str
  directories:
    description: Directories to inspect for BTRFS NOCOW (RV(directories)).
    type: list
    elements: path
    default: []
  recurse_check:
    description: At most this many entries per directory in O(directories) are checked for copy-on-write.
    type: int
    default: 10000
  paths:
    description: Paths whose type, mode and owner are returned (RV(paths)), not followed.
    type: list
    elements: path
    default: []
  secrets:
    description: Podman secret names, as the containers' user (RV(secrets), RV(secret_values)).
    type: list
    elements: str
    default: []
  images:
    description: Image references whose local image IDs are returned (RV(images)).
    type: list
    elements: str
    default: []
  services:
    description: Systemd units of the containers' scope whose states are returned (RV(services)).
    type: list
    elements: str
    default: []
  containers:
    description: Return the newest container of each systemd unit (RV(containers)).
    type: bool
    default: false
  quadlet:
    description:
      - Quadlet units as M(homelab.immich.podman_quadlet) takes them; RV(quadlet) says whether writing
        them would change a file (content, mode or owner).
    type: dict
    suboptions:
      units:
        description: As O(homelab.immich.podman_quadlet#module:units).
        type: list
        elements: dict
        required: true
        suboptions:
          name:
            description: Unit name without the suffix.
            type: str
            required: true
          type:
            description: Quadlet unit type.
            type: str
            required: true
            choices: [build, container, image, kube, network, pod, volume]
          state:
            description: V(absent) means the unit's files must not exist.
            type: str
            default: present
            choices: [present, absent]
          sections:
            description: The unit as sections of keys.
            type: dict
          content:
            description: The unit file's full text.
            type: str
          dropins:
            description: Drop-in files by name.
            type: dict
          specifiers:
            description: Escape C(%) in values (default O(quadlet.specifiers)).
            type: bool
      mode:
        description: The unit files' mode.
        type: raw
        default: '0644'
      specifiers:
        description: Default for each unit's C(specifiers).
        type: bool
        default: true
  file_sets:
    description:
      - Named sets of root-owned files and their unit, each as M(homelab.immich.system_files) takes
        them; RV(file_sets) says for each whether that module would change anything.
    type: list
    elements: dict
    default: []
    suboptions:
      name:
        description: The set's name, the key in RV(file_sets).
        type: str
        required: true
      files:
        description: As O(homelab.immich.system_files#module:files).
        type: list
        elements: dict
        required: true
        suboptions:
          dest:
            description: Absolute path.
            type: path
            required: true
          content:
            description: The file's content.
            type: str
            required: true
          mode:
            description: Octal permission.
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
        description: As O(homelab.immich.system_files#module:directories).
        type: list
        elements: dict
        default: []
        suboptions:
          path:
            description: Absolute path.
            type: path
            required: true
          mode:
            description: Octal permission.
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
        description: The system unit the files make (enabled and running), or V('') for none.
        type: str
        default: ''
      restart:
        description: The unit restarts when a file changes.
        type: bool
        default: false
  firewalld_rules:
    description: Rich rules that must be in firewalld's permanent configuration (RV(firewalld)).
    type: list
    elements: str
    default: []
attributes:
  check_mode:
    support: full
    description: The same read as without check mode; the module never changes anything.
  diff_mode:
    support: none
    description: Nothing changes, so there is no diff.
  platform:
    platforms: posix
    support: full
    description: Needs systemd for O(services) and O(file_sets), podman for O(secrets), O(images) and O(containers).
notes:
  - Only the Python standard library is needed on the target.
author:
  - homelab.immich maintainers (@homelab-immich)
"""

EXAMPLES = r"""
- name: Read the secrets, images and units of the deployment (one round trip)
  homelab.immich.immich_state:
    user: immich
    secrets: [immich-db-password]
    images: [ghcr.io/immich-app/immich-server:v3.1.0]
    services: [immich-server.service]
    quadlet:
      units: "{{ units }}"
  register: state
  no_log: true  # the secrets' values

- name: Write the units only when they differ
  homelab.immich.podman_quadlet:
    scope: user
    user: immich
    units: "{{ units }}"
  when: state.quadlet.differs
"""

RETURN = r"""
host:
  description: With O(host) (else empty) the host's podman and its quadlet generator, PID 1, cgroup filesystem, architecture, SELinux, the pool.
  returned: always
  type: dict
  sample: {generator: /usr/libexec/podman/quadlet, podman: 5.4.2, pid1: systemd, cgroup: cgroup2fs, machine: x86_64,
           pool_probe: /mnt/btrfs-pool, pool_free_kib: 10485760, pool_fs: btrfs, selinux: Disabled, nft: true,
           library_exists: true, firewall_unit: false}
user:
  description: The service user (exists, uid, gid, group_gid, home, home_exists, shell, subuid, subgid, linger, manager).
  returned: always
  type: dict
  sample: {exists: true, name: immich, uid: 1000, gid: 1000, group_gid: 1000, home: /home/immich, home_exists: true,
           shell: /bin/bash, subuid: true, subgid: true, linger: true, manager: true}
directories:
  description: For each of O(directories), what M(homelab.immich.btrfs_nocow) sees (exists, supported, fstype, nocow, effective, cow_entries).
  returned: always
  type: dict
  sample: {/srv/immich/postgres: {exists: true, supported: true, fstype: btrfs, nocow: true, effective: true, cow_entries: 0}}
paths:
  description: For each of O(paths), exists and (when it does) type, mode, uid, gid.
  returned: always
  type: dict
  sample: {/srv/immich/library: {exists: true, type: directory, mode: '0750', uid: 1000, gid: 1000}}
secrets:
  description: For each of O(secrets), whether it exists.
  returned: always
  type: dict
  sample: {immich-db-password: {present: true}}
secret_values:
  description: The value of each secret of O(secrets) that exists.
  returned: always
  type: dict
images:
  description: For each of O(images), the local image ID, or null when there is no such image.
  returned: always
  type: dict
  sample: {"ghcr.io/immich-app/immich-server:v3.1.0": null}
services:
  description: For each of O(services), its active state, unit file state and load state.
  returned: always
  type: dict
  sample: {immich-server.service: {active: active, file: generated, load: loaded}}
containers:
  description: With O(containers), the newest container of each systemd unit (id, image_id, image, state).
  returned: always
  type: dict
quadlet:
  description: With O(quadlet), whether the units differ, which files and which services would change.
  returned: always
  type: dict
  sample: {differs: true, quadlet_dir: /home/immich/.config/containers/systemd, changed_files: [immich-server.container],
           changed_services: [immich-server.service]}
file_sets:
  description: For each of O(file_sets) by name, whether M(homelab.immich.system_files) would change anything.
  returned: always
  type: dict
  sample: {backup: {differs: false, changed_files: [], changed_directories: [], unit_actions: [], problems: []}}
firewalld:
  description: With O(firewalld_rules), whether firewalld runs and which of the rules its permanent configuration lacks.
  returned: always
  type: dict
  sample: {running: false, missing: []}
"""

import os

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.homelab.immich.plugins.module_utils import fileops
from ansible_collections.homelab.immich.plugins.module_utils import hoststate as hs
from ansible_collections.homelab.immich.plugins.module_utils import nocow
from ansible_collections.homelab.immich.plugins.module_utils import quadlet as q
from ansible_collections.homelab.immich.plugins.module_utils import sysfiles

ARGUMENT_SPEC = dict(
    user=dict(type="str", required=True),
    rootless=dict(type="bool", default=True),
    host=dict(type="dict", options=dict(
        storage_root=dict(type="path", required=True), library_path=dict(type="path"),
        firewall_unit=dict(type="str"))),
    directories=dict(type="list", elements="path", default=[]),
    recurse_check=dict(type="int", default=10000),
    paths=dict(type="list", elements="path", default=[]),
    secrets=dict(type="list", elements="str", default=[], no_log=False),
    images=dict(type="list", elements="str", default=[]),
    services=dict(type="list", elements="str", default=[]),
    containers=dict(type="bool", default=False),
    quadlet=dict(type="dict", options=dict(
        units=dict(type="list", elements="dict", required=True, options=q.UNIT_OPTIONS),
        mode=dict(type="raw", default="0644"),
        specifiers=dict(type="bool", default=True))),
    file_sets=dict(type="list", elements="dict", default=[], options=dict(
        name=dict(type="str", required=True),
        # content is required here: a set is only compared, never removed
        files=dict(type="list", elements="dict", required=True,
                   options=dict(sysfiles.FILE_OPTIONS, content=dict(type="str", required=True))),
        directories=dict(type="list", elements="dict", default=[], options=sysfiles.DIRECTORY_OPTIONS),
        unit=dict(type="str", default=""),
        restart=dict(type="bool", default=False))),
    firewalld_rules=dict(type="list", elements="str", default=[]),
)


class StateError(Exception):
    pass


def directory_view(path, recurse_check):
    facts = nocow.inspect(path, recurse_check)
    return dict((k, facts[k]) for k in ("exists", "supported", "fstype", "nocow", "effective", "cow_entries"))


def quadlet_state(spec, user, rootless):
    if rootless and not user["exists"]:
        return dict(differs=True, quadlet_dir=None, changed_files=[], changed_services=[],
                    reason="the service user does not exist yet")
    units = q.normalise_unit_list(spec["units"], spec["specifiers"])
    qdir = q.unit_dir("user" if rootless else "system", user["home"] if rootless else None)
    mode = fileops.parse_mode(spec["mode"])
    want_uid, want_gid = (user["uid"], user["gid"]) if rootless else (0, None)
    files, content_changes, attr_changes = q.plan(units, qdir, mode, want_uid, want_gid)
    return dict(differs=bool(content_changes or attr_changes), quadlet_dir=qdir,
                changed_files=sorted(set(content_changes) | set(attr_changes)),
                changed_services=q.changed_services(files, content_changes))


def file_set_states(run, sets):
    units = [s["unit"] for s in sets if s["unit"]]
    states = hs.unit_states(run, ["systemctl"], units) if units else {}
    result = {}
    for s in sets:
        dirs, writes, problems = sysfiles.plan(s["files"], s["directories"])
        unit_state = {}
        if s["unit"]:
            st = states[s["unit"]]
            unit_state = {"UnitFileState": st["file"], "ActiveState": st["active"]}
        actions = sysfiles.unit_actions(s["unit"], unit_state, bool(writes), s["restart"])
        result[s["name"]] = dict(differs=bool(dirs or writes or actions or problems),
                                 changed_files=[w[0] for w in writes], changed_directories=[d[0] for d in dirs],
                                 unit_actions=actions, problems=problems)
    return result


def read(module):
    p = module.params

    def run(argv):
        return module.run_command(argv, cwd="/")

    result = dict(changed=False, host={}, user=hs.user_facts(p["user"]), directories={}, paths={}, secrets={},
                  secret_values={}, images={}, services={}, containers={}, quadlet={}, file_sets={}, firewalld={})
    user = result["user"]
    if p["host"]:
        commands = dict((name, module.get_bin_path(name)) for name in ("podman", "getenforce"))
        result["host"] = hs.host_facts(run, p["host"]["storage_root"], p["host"]["library_path"],
                                       p["host"]["firewall_unit"], commands)
    for path in p["directories"]:
        result["directories"][path] = directory_view(path, p["recurse_check"])
    for path in p["paths"]:
        result["paths"][path] = hs.path_facts(path)

    wants_podman = p["secrets"] or p["images"] or p["containers"]
    if (wants_podman or p["services"]) and p["rootless"]:
        if not user["exists"]:
            raise StateError("the service user %s does not exist: create it before reading its podman and units "
                             "(the homelab.immich.host role does)" % p["user"])
        if not user["manager"]:
            raise StateError("the systemd user manager of %s is not running (/run/user/%d/bus is missing): "
                             "enable linger (loginctl enable-linger %s) first" % (p["user"], user["uid"], p["user"]))
        if os.geteuid() != 0:
            raise StateError("reading the podman of %s needs root: run the task with become" % p["user"])
    if wants_podman:
        podman = hs.as_user(["podman"], user if p["rootless"] else None)
        secrets = hs.secrets(run, podman, p["secrets"])
        result["secrets"] = dict((n, dict(present=v is not None)) for n, v in secrets.items())
        result["secret_values"] = dict((n, v) for n, v in secrets.items() if v is not None)
        result["images"] = hs.image_ids(run, podman, p["images"])
        if p["containers"]:
            result["containers"] = hs.containers(run, podman)
    if p["services"]:
        systemctl = ["systemctl", "--user", "-M", p["user"] + "@"] if p["rootless"] else ["systemctl"]
        result["services"] = hs.unit_states(run, systemctl, p["services"])
    if p["quadlet"]:
        result["quadlet"] = quadlet_state(p["quadlet"], user, p["rootless"])
    if p["file_sets"]:
        result["file_sets"] = file_set_states(run, p["file_sets"])
    if p["firewalld_rules"]:
        running, missing = hs.firewalld_missing(run, module.get_bin_path("firewall-cmd"), p["firewalld_rules"])
        result["firewalld"] = dict(running=running, missing=missing)
    return result


def main():
    module = AnsibleModule(argument_spec=ARGUMENT_SPEC, supports_check_mode=True)
    try:
        result = read(module)
    except (StateError, q.QuadletError, nocow.NocowError, RuntimeError, ValueError) as exc:
        module.fail_json(msg="%s. Nothing was changed." % exc)
    except OSError as exc:
        module.fail_json(msg="%s: %s (reading the host's state; nothing was changed)" % (type(exc).__name__, exc))
    module.exit_json(**result)


if __name__ == "__main__":
    main()
