#!/usr/bin/python
# -*- coding: utf-8 -*-
# Copyright: homelab.immich contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)

from __future__ import annotations

DOCUMENTATION = r"""
---
module: podman_quadlet
short_description: Write, validate and activate podman quadlet units
version_added: 0.1.0
description:
  - Renders podman quadlet units (C(.container), C(.network), C(.volume), C(.pod), C(.kube),
    C(.image), C(.build)) from data, with systemd quoting, and writes them atomically to the
    system or a user's quadlet directory together with their drop-ins.
  - Before anything is written, the podman quadlet generator is run in dry-run mode over a copy
    of the installed units with the change applied, so a unit the generator rejects (an unknown
    key, a missing C(Network=) reference) fails the task and nothing is written. Errors that the
    installed units already had are reported as warnings, not blamed on the change.
  - One call handles one unit (O(name)) or a list (O(units)) with one validation pass and one
    C(daemon-reload), so roles pay one round trip for all their units.
  - Starting and restarting services stays with the caller; the module returns the generated
    service names and which of them changed, ready for handlers.
  - Values are quoted per key the way quadlet reads them back. C(Environment), C(Label) and
    C(Annotation) take KEY=VALUE words (a string is one word; a mapping gives one word per item).
    C(Exec), C(PodmanArgs), C(GlobalArgs) and the C(Exec*) keys of C([Service]) take a command
    line (a string is written as given; a list is one command line of separately quoted words; a
    list of lists is one line per inner list). All other keys are taken literally by quadlet, so
    their values are written as given and a list repeats the key.
options:
  name:
    description:
      - Unit name without its suffix, for example V(immich-server) for C(immich-server.container).
      - Mutually exclusive with O(units).
    type: str
  type:
    description:
      - The quadlet unit type. Required with O(name).
    type: str
    choices: [container, network, volume, pod, kube, image, build]
  state:
    description:
      - V(present) writes the unit and the given drop-ins; V(absent) removes the unit and all its
        drop-ins.
    type: str
    choices: [present, absent]
    default: present
  sections:
    description:
      - The unit as data, section name to a mapping of keys. A list value repeats the key (or, for
        command-line keys, forms one command line); V(null) values are left out.
      - Sections C([Unit]), the type's own section, C([Service]) and C([Install]) are written in that
        order, then any others; keys keep the order given.
      - Mutually exclusive with O(content).
    type: dict
  content:
    description:
      - The whole unit file as text, written as given (an escape hatch; O(sections) is preferred).
    type: str
  dropins:
    description:
      - Drop-in files for C(<unit>.d/), file name (ending in C(.conf)) to either sections (a
        mapping, as in O(sections)), file text (a string), or V(null) to remove that drop-in.
      - Drop-ins not named here are left alone while the unit is V(present).
    type: dict
  specifiers:
    description:
      - V(true) lets values use systemd specifiers (C(%h), C(%t), C(%U)...); a C(%) that does not
        start a known specifier is an error (write C(%%) for a literal percent sign).
      - V(false) makes every C(%) literal (written as C(%%)).
    type: bool
    default: true
  units:
    description:
      - Several units applied together, each with the keys O(name), O(type), O(state),
        O(sections), O(content), O(dropins) and O(specifiers) (defaulting to the top-level value).
      - Mutually exclusive with O(name).
    type: list
    elements: dict
    suboptions:
      name:
        description: Unit name without suffix.
        type: str
        required: true
      type:
        description: Quadlet unit type.
        type: str
        required: true
        choices: [container, network, volume, pod, kube, image, build]
      state:
        description: V(present) or V(absent).
        type: str
        choices: [present, absent]
        default: present
      sections:
        description: The unit as data.
        type: dict
      content:
        description: The unit as text.
        type: str
      dropins:
        description: Drop-ins, as for the top-level O(dropins).
        type: dict
      specifiers:
        description: As the top-level O(specifiers); unset means the top-level value.
        type: bool
  scope:
    description:
      - V(system) writes to C(/etc/containers/systemd) and uses the system manager.
      - V(user) writes to C(~/.config/containers/systemd) of O(user), owned by that user, and
        uses that user's manager (C(systemctl --user -M user@) from root). The user needs a
        running manager, that is linger enabled (C(loginctl enable-linger)) or a session.
    type: str
    choices: [system, user]
    default: system
  user:
    description:
      - The user whose units are managed with O(scope=user). Required when the module runs as
        root; defaults to the connecting user otherwise.
    type: str
  quadlet_dir:
    description:
      - Override the unit directory (normally derived from O(scope)).
    type: path
  mode:
    description:
      - Permissions of the unit and drop-in files, as an octal string.
    type: raw
    default: '0644'
  validate:
    description:
      - Run the quadlet generator in dry-run mode before writing and fail with its message when it
        rejects the change.
    type: bool
    default: true
  generator:
    description:
      - Path of the quadlet generator to validate with. By default the first of
        C(/usr/libexec/podman/quadlet), C(/usr/lib/podman/quadlet) and
        C(/usr/local/libexec/podman/quadlet) that exists.
    type: path
  daemon_reload:
    description:
      - Reload the systemd manager of the scope when a file changed, so the generated services
        are current before handlers start or restart them.
    type: bool
    default: true
  stop:
    description:
      - With O(state=absent), stop each removed unit's service before its files are removed, and
        reset its failed state, so that no unit stays listed as failed once its file is gone.
    type: bool
    default: false
attributes:
  check_mode:
    support: full
    description: Computes and validates the change, writes nothing and reloads nothing.
  diff_mode:
    support: full
    description: Returns a unified before/after for the unit and each drop-in that changes.
  platform:
    platforms: posix
    support: full
    description: Needs podman >= 4.4 (quadlet) and systemd on the target for validation and reload.
notes:
  - Only the Python standard library is needed on the target.
seealso:
  - name: podman-systemd.unit(5)
    description: The quadlet unit file reference.
    link: https://docs.podman.io/en/latest/markdown/podman-systemd.unit.5.html
author:
  - homelab.immich maintainers (@homelab-immich)
"""

EXAMPLES = r"""
- name: The isolated application network
  homelab.immich.podman_quadlet:
    name: photos
    type: network
    sections:
      Network:
        Subnet: 10.89.5.0/24
        Gateway: 10.89.5.1

- name: A rootless container on that network, with a health check and a memory limit
  homelab.immich.podman_quadlet:
    scope: user
    user: immich
    name: immich-redis
    type: container
    sections:
      Unit:
        Description: Immich Valkey
        After: photos-network.service
      Container:
        Image: docker.io/valkey/valkey:9
        Network: photos.network
        NetworkAlias: redis
        HealthCmd: valkey-cli ping
        Notify: healthy
        Environment:
          TZ: Europe/Berlin
      Service:
        MemoryMax: 512M
        Restart: always
      Install:
        WantedBy: default.target
  register: redis_unit
  notify: Restart immich-redis

- name: A drop-in that passes a GPU to the ML container
  homelab.immich.podman_quadlet:
    name: immich-machine-learning
    type: container
    sections:
      Container:
        Image: ghcr.io/immich-app/immich-machine-learning:v3.1.0-rocm
    dropins:
      10-gpu.conf:
        Container:
          AddDevice:
            - /dev/kfd
            - /dev/dri/renderD128
          GroupAdd: "105"

- name: Several units in one call (one validation, one daemon-reload)
  homelab.immich.podman_quadlet:
    units:
      - name: photos
        type: network
        sections: {Network: {Subnet: 10.89.5.0/24}}
      - name: old-app
        type: container
        state: absent
    stop: true

- name: Remove a unit and its drop-ins, stopping it first
  homelab.immich.podman_quadlet:
    name: immich-server
    type: container
    state: absent
    stop: true
"""

RETURN = r"""
units:
  description: One entry per unit handled.
  returned: always
  type: list
  elements: dict
  contains:
    name:
      description: Unit name.
      type: str
      sample: immich-server
    type:
      description: Unit type.
      type: str
      sample: container
    state:
      description: Requested state.
      type: str
      sample: present
    path:
      description: Path of the unit file.
      type: str
      sample: /etc/containers/systemd/immich-server.container
    service:
      description: The systemd service the generator makes from the unit.
      type: str
      sample: immich-server.service
    changed:
      description: Whether the unit's or a drop-in's content changed (or was removed).
      type: bool
    dropins:
      description: Paths of the drop-ins managed in this call.
      type: list
      elements: str
changed_services:
  description: Services whose unit or drop-in content changed; restart these (if present) after the reload.
  returned: always
  type: list
  elements: str
  sample: [immich-server.service]
removed:
  description: Paths removed.
  returned: always
  type: list
  elements: str
written:
  description: Paths written (content, owner or mode changed).
  returned: always
  type: list
  elements: str
quadlet_dir:
  description: The unit directory used.
  returned: always
  type: str
  sample: /home/immich/.config/containers/systemd
daemon_reloaded:
  description: Whether the systemd manager was reloaded.
  returned: always
  type: bool
validation:
  description: What the generator said; C(preexisting) lists errors of installed units this call did not cause.
  returned: when validation ran
  type: dict
  sample: {"ran": true, "generator": "/usr/libexec/podman/quadlet", "preexisting": {}, "warnings": []}
"""

import difflib
import os
import pwd
import subprocess

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.homelab.immich.plugins.module_utils import fileops
from ansible_collections.homelab.immich.plugins.module_utils import quadlet as q

RUNTIME_ROOT = "/run/user"
LINGER_DIR = "/var/lib/systemd/linger"

UNIT_OPTIONS = q.UNIT_OPTIONS

ARGUMENT_SPEC = dict(
    name=dict(type="str"),
    type=dict(type="str", choices=sorted(q.UNIT_TYPES)),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    sections=dict(type="dict"),
    content=dict(type="str"),
    dropins=dict(type="dict"),
    specifiers=dict(type="bool", default=True),
    units=dict(type="list", elements="dict", options=UNIT_OPTIONS),
    scope=dict(type="str", default="system", choices=["system", "user"]),
    user=dict(type="str"),
    quadlet_dir=dict(type="path"),
    mode=dict(type="raw", default="0644"),
    validate=dict(type="bool", default=True),
    generator=dict(type="path"),
    daemon_reload=dict(type="bool", default=True),
    stop=dict(type="bool", default=False),
)


def parse_mode(value):
    try:
        return fileops.parse_mode(value)
    except ValueError as exc:
        raise q.QuadletError(str(exc))


def normalise_units(params):
    if params["units"] is not None:
        return q.normalise_unit_list(params["units"], params["specifiers"])
    if not params["name"] or not params["type"]:
        raise q.QuadletError("give name and type (or a units list)")
    return q.normalise_unit_list(
        [dict((k, params[k]) for k in ("name", "type", "state", "sections", "content", "dropins", "specifiers"))])


def resolve_scope(scope, user, euid):
    """Return the passwd entry of the target user for scope=user, or None for scope=system."""
    if scope == "system":
        if user:
            raise q.QuadletError("user=%s only applies to scope=user" % user)
        return None
    if user is None:
        if euid == 0:
            raise q.QuadletError("scope=user needs user=<name> when the module runs as root")
        return pwd.getpwuid(euid)
    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise q.QuadletError(
            "user %r does not exist on the host: create it first (the homelab.immich.host role does)" % user
        )
    if euid not in (0, pw.pw_uid):
        raise q.QuadletError(
            "the module runs as uid %d and cannot manage the units of %s: connect as root or become %s"
            % (euid, user, user)
        )
    return pw


def systemctl_base(pw, euid):
    """Return (argv prefix, extra environment) that reach the right systemd manager."""
    if pw is None:
        return ["systemctl"], None
    if euid == 0:
        return ["systemctl", "--user", "-M", "%s@" % pw.pw_name], None
    runtime = os.path.join(RUNTIME_ROOT, str(pw.pw_uid))
    return ["systemctl", "--user"], {
        "XDG_RUNTIME_DIR": runtime,
        "DBUS_SESSION_BUS_ADDRESS": "unix:path=%s/bus" % runtime,
    }


def check_user_manager(pw):
    """Fail early (before writing) when the user has no running systemd manager."""
    bus = os.path.join(RUNTIME_ROOT, str(pw.pw_uid), "bus")
    if os.path.exists(bus):
        return
    if os.path.exists(os.path.join(LINGER_DIR, pw.pw_name)):
        raise q.QuadletError(
            "linger is enabled for %s but its systemd user manager is not running (%s is missing): "
            "start it with 'systemctl start user@%d.service'" % (pw.pw_name, bus, pw.pw_uid)
        )
    raise q.QuadletError(
        "user %s has no running systemd user manager (no linger, no session; %s is missing): "
        "run 'loginctl enable-linger %s' so its services run without a login, or set daemon_reload: false"
        % (pw.pw_name, bus, pw.pw_name)
    )


def unified(before, after, path):
    b = (before or b"").decode("utf-8", "replace")
    a = (after or b"").decode("utf-8", "replace")
    return {
        "before_header": path if before is not None else "%s (absent)" % path,
        "after_header": path if after is not None else "%s (absent)" % path,
        "before": b,
        "after": a,
        "prepared": "".join(difflib.unified_diff(
            b.splitlines(True), a.splitlines(True), fromfile=path, tofile=path)),
    }


class Runner:
    def __init__(self, module):
        self.module = module
        self.params = module.params
        self.euid = os.geteuid()
        self.warnings = []

    def fail(self, msg, **kw):
        self.module.fail_json(msg=msg, **kw)

    def run(self):
        p = self.params
        units = normalise_units(p)
        mode = parse_mode(p["mode"])
        pw = resolve_scope(p["scope"], p["user"], self.euid)
        if p["quadlet_dir"]:
            qdir = p["quadlet_dir"]
        else:
            qdir = q.unit_dir(p["scope"], pw.pw_dir if pw else None)
        if pw and not os.path.isdir(pw.pw_dir):
            raise q.QuadletError("home directory %s of %s does not exist" % (pw.pw_dir, pw.pw_name))
        uid, gid = (pw.pw_uid, pw.pw_gid) if pw else (-1, -1)
        want_uid = pw.pw_uid if pw else self.euid
        want_gid = pw.pw_gid if pw else None

        plan, content_changes, attr_changes = q.plan(units, qdir, mode, want_uid, want_gid)

        result = dict(changed=False, units=[], changed_services=[], removed=[], written=[],
                      quadlet_dir=qdir, daemon_reloaded=False)
        managed = set(q.file_name(u["name"], u["type"]) for u in units)

        if content_changes and p["validate"]:
            generator = q.find_generator(p["generator"])
            if not generator:
                searched = (p["generator"],) if p["generator"] else q.GENERATOR_CANDIDATES
                raise q.QuadletError(q.missing_generator_message(self.podman_version(), searched))
            val = q.validate(generator, qdir, dict((r, c[1]) for r, c in content_changes.items()),
                             managed, p["scope"] == "user")
            if val["errors"]:
                raise q.QuadletError(
                    "the quadlet generator (%s) rejected the change, nothing was written: %s"
                    % (generator, q.format_errors(val["errors"], val["tmp_prefix"])))
            for unit, msgs in val["preexisting"].items():
                self.warnings.append("installed unit %s already fails the generator (not changed here): %s"
                                     % (unit, "; ".join(msgs)))
            self.warnings.extend(val["warnings"])
            result["validation"] = dict(ran=True, generator=generator, preexisting=val["preexisting"],
                                        warnings=val["warnings"])

        changed_units = set()
        for u, rel, data in plan:
            if rel in content_changes:
                changed_units.add(q.file_name(u["name"], u["type"]))

        systemctl, env = systemctl_base(pw, self.euid)
        need_reload = bool(content_changes) and p["daemon_reload"]
        if need_reload and pw is not None:
            check_user_manager(pw)

        for u in units:
            fname = q.file_name(u["name"], u["type"])
            service = q.service_name(u["name"], u["type"], u.get("sections"))
            entry = dict(name=u["name"], type=u["type"], state=u["state"], path=os.path.join(qdir, fname),
                         service=service, changed=fname in changed_units,
                         dropins=[os.path.join(qdir, rel) for uu, rel, _d in plan if uu is u and rel != fname])
            result["units"].append(entry)
            if entry["changed"] and service not in result["changed_services"]:
                result["changed_services"].append(service)

        diffs = []
        for rel in sorted(content_changes):
            before, after = content_changes[rel]
            diffs.append(unified(before, after, os.path.join(qdir, rel)))
            if after is None:
                result["removed"].append(os.path.join(qdir, rel))
            else:
                result["written"].append(os.path.join(qdir, rel))
        result["written"].extend(os.path.join(qdir, rel) for rel in attr_changes)
        result["changed"] = bool(content_changes or attr_changes)
        if self.module._diff:
            result["diff"] = diffs

        if self.module.check_mode or not result["changed"]:
            return result

        if p["stop"]:
            stopping = [q.service_name(u["name"], u["type"]) for u in units
                        if u["state"] == "absent" and q.file_name(u["name"], u["type"]) in changed_units]
            for svc in stopping:
                rc, out, err = self.module.run_command(systemctl + ["stop", svc], environ_update=env)
                if rc not in (0, 5):  # 5: unit not loaded
                    raise q.QuadletError("could not stop %s before removing it: %s" % (svc, (err or out).strip()))
            if stopping:
                # a service that ended failed (a container exiting non-zero on SIGTERM) would stay
                # listed as 'failed' with its file gone; its state goes with it (rc 1 when one was
                # never loaded or not failed: nothing to reset)
                self.module.run_command(systemctl + ["reset-failed"] + stopping, environ_update=env)

        fileops.makedirs(qdir, 0o755, uid, gid)
        for rel in sorted(content_changes):
            path = os.path.join(qdir, rel)
            data = content_changes[rel][1]
            if data is None:
                os.unlink(path)
                parent = os.path.dirname(path)
                if parent != qdir and os.path.isdir(parent) and not os.listdir(parent):
                    os.rmdir(parent)
            else:
                fileops.makedirs(os.path.dirname(path), 0o755, uid, gid)
                fileops.atomic_write(path, data, mode, uid, gid)
        for rel in attr_changes:
            path = os.path.join(qdir, rel)
            os.chmod(path, mode)
            if pw:
                os.chown(path, uid, gid)

        if need_reload:
            rc, out, err = self.module.run_command(systemctl + ["daemon-reload"], environ_update=env)
            if rc != 0:
                raise q.QuadletError(
                    "units were written but '%s daemon-reload' failed: %s" % (" ".join(systemctl), (err or out).strip()))
            result["daemon_reloaded"] = True
        return result

    def podman_version(self):
        podman = self.module.get_bin_path("podman")
        if not podman:
            return None
        rc, out, _err = self.module.run_command([podman, "--version"])
        v = q.parse_version(out) if rc == 0 else None
        return ".".join(str(x) for x in v) if v else None


def main():
    module = AnsibleModule(
        argument_spec=ARGUMENT_SPEC,
        mutually_exclusive=[("name", "units"), ("sections", "content")],
        required_one_of=[("name", "units")],
        required_by={"name": "type"},
        supports_check_mode=True,
    )
    runner = Runner(module)
    try:
        result = runner.run()
    except q.QuadletError as exc:
        module.fail_json(msg=str(exc))
    except (OSError, subprocess.SubprocessError) as exc:
        module.fail_json(msg="%s: %s; check the path's permissions and free space" % (type(exc).__name__, exc))
    for w in runner.warnings:
        module.warn(w)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
