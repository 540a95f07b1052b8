# -*- coding: utf-8 -*-
# Copyright: homelab.immich contributors
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Podman quadlet knowledge: unit types, key kinds, directories, service names, dry-run validation."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

from ansible_collections.homelab.immich.plugins.module_utils import fileops
from ansible_collections.homelab.immich.plugins.module_utils import systemd_unit as su

# type -> (main section, generated service name pattern)
UNIT_TYPES = {
    "container": ("Container", "{name}.service"),
    "network": ("Network", "{name}-network.service"),
    "volume": ("Volume", "{name}-volume.service"),
    "pod": ("Pod", "{name}-pod.service"),
    "kube": ("Kube", "{name}.service"),
    "image": ("Image", "{name}-image.service"),
    "build": ("Build", "{name}-build.service"),
}

# Keys whose values quadlet/systemd split into KEY=VALUE words (checked against quadlet 5.4).
PAIR_KEYS = frozenset(["Environment", "Label", "Annotation"])
# Keys whose values are command lines (words with systemd quoting).
ARGS_KEYS = frozenset([
    "Exec", "PodmanArgs", "GlobalArgs",
    "ExecStart", "ExecStartPre", "ExecStartPost", "ExecStop", "ExecStopPost",
    "ExecReload", "ExecCondition",
])

SYSTEM_DIR = "/etc/containers/systemd"
USER_SUBDIR = ".config/containers/systemd"
GENERATOR_CANDIDATES = (
    "/usr/libexec/podman/quadlet",
    "/usr/lib/podman/quadlet",
    "/usr/local/libexec/podman/quadlet",
)
MIN_PODMAN = (4, 4)
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.:@-]*$")
DROPIN_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.@-]*\.conf$")
_CONVERTING_RE = re.compile(r'converting "([^"]+)": (.*)$')
_WARNING_RE = re.compile(r"Warning: (\S+?) (.*)$")
_PREFIX_RE = re.compile(r"^quadlet-generator\[\d+\]: ")


class QuadletError(Exception):
    """A request that cannot be carried out; the message says what to do."""


def key_kind(section, key):
    if key in PAIR_KEYS:
        return su.PAIRS
    if key in ARGS_KEYS:
        return su.ARGS
    return su.RAW


def check_name(name, unit_type):
    if unit_type not in UNIT_TYPES:
        raise QuadletError(
            "unknown quadlet type %r: use one of %s" % (unit_type, ", ".join(sorted(UNIT_TYPES)))
        )
    if not isinstance(name, str) or not NAME_RE.match(name) or len(name) > 200:
        raise QuadletError(
            "%r is not a valid unit name: use letters, digits and _ . : @ - (not starting with . or -), "
            "without the .%s suffix" % (name, unit_type)
        )
    if name.endswith("." + unit_type):
        raise QuadletError("give the unit name without its suffix: %r, not %r" % (name[: -len(unit_type) - 1], name))


def file_name(name, unit_type):
    return "%s.%s" % (name, unit_type)


def service_name(name, unit_type, sections=None):
    """The systemd service quadlet generates for this unit (honours ServiceName=)."""
    main, pattern = UNIT_TYPES[unit_type]
    if sections and isinstance(sections.get(main), dict):
        custom = sections[main].get("ServiceName")
        if isinstance(custom, str) and custom:
            return custom if custom.endswith(".service") else custom + ".service"
    return pattern.format(name=name)


def render_unit(unit_type, sections, specifiers=True, header=None):
    main = UNIT_TYPES[unit_type][0]
    return su.render(
        sections, key_kind, section_order=("Unit", main, "Service", "Install"),
        header=header, specifiers=specifiers,
    )


def render_dropin(unit_type, sections, specifiers=True, header=None):
    return render_unit(unit_type, sections, specifiers=specifiers, header=header)


def unit_dir(scope, home=None):
    if scope == "system":
        return SYSTEM_DIR
    if not home:
        raise QuadletError("scope=user needs the user's home directory")
    return os.path.join(home, USER_SUBDIR)


def parse_version(text):
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    if not m:
        return None
    return tuple(int(x or 0) for x in m.groups())


def find_generator(explicit=None, candidates=GENERATOR_CANDIDATES):
    """Return the quadlet generator path, or None."""
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    return None


def missing_generator_message(podman_version=None, searched=GENERATOR_CANDIDATES):
    have = "podman %s is installed" % podman_version if podman_version else "podman was not found"
    return (
        "the podman quadlet generator was not found (looked in %s); %s. Quadlet needs podman >= %d.%d: "
        "install a newer podman (Debian 13, Ubuntu 24.04, Fedora and RHEL 9.3+ ship one), or set "
        "validate: false to write units without checking them" % (", ".join(searched), have, MIN_PODMAN[0], MIN_PODMAN[1])
    )


def _clean(line):
    return _PREFIX_RE.sub("", line.strip())


def parse_generator_output(stderr):
    """Return (errors, warnings): errors as {unit_file: [messages]}, warnings as list of (file, msg)."""
    errors = {}
    warnings = []
    for raw in (stderr or "").splitlines():
        line = _clean(raw)
        if not line or line.startswith("Loading source unit file"):
            continue
        m = _CONVERTING_RE.search(line)
        if m:
            errors.setdefault(m.group(1), []).append(m.group(2))
            continue
        w = _WARNING_RE.search(line)
        if w:
            warnings.append((w.group(1), line))
    return errors, warnings


def run_generator(generator, tree, user_scope, timeout=60):
    """Run the generator in dry-run mode over ``tree``; return (rc, stdout, stderr)."""
    cmd = [generator, "-dryrun"]
    if user_scope:
        cmd.append("-user")
    env = dict(os.environ, QUADLET_UNIT_DIRS=tree)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    return proc.returncode, proc.stdout, proc.stderr


def _copy_tree(src, dst):
    if os.path.isdir(src):
        shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
    else:
        os.makedirs(dst, exist_ok=True)


def _apply(tree, changes):
    for rel, data in changes.items():
        path = os.path.join(tree, rel)
        if data is None:
            if os.path.lexists(path):
                os.unlink(path)
            continue
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.lexists(path):
            os.unlink(path)
        with open(path, "wb") as f:
            f.write(data)


def validate(generator, current_dir, changes, managed_files, user_scope):
    """Dry-run the generator over the installed units with ``changes`` applied.

    ``changes`` maps paths relative to the unit directory to new bytes (None = removed).
    Errors that the installed tree already had are tolerated (returned as ``preexisting``); any
    error that the change introduces, in our units or in others it breaks, is returned in
    ``errors``.  Returns a dict with errors, preexisting, warnings (for managed files) and the
    generated output.
    """
    work = tempfile.mkdtemp(prefix="quadlet-validate-")
    try:
        before = os.path.join(work, "before")
        after = os.path.join(work, "after")
        _copy_tree(current_dir, before)
        _copy_tree(current_dir, after)
        _apply(after, changes)
        rc_b, _out_b, err_b = run_generator(generator, before, user_scope)
        rc_a, out_a, err_a = run_generator(generator, after, user_scope)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    errors_b = parse_generator_output(err_b)[0] if rc_b != 0 else {}
    errors_a, warnings_a = parse_generator_output(err_a)
    new_errors = {}
    for unit, msgs in errors_a.items():
        old = set(m.replace(before, "") for m in errors_b.get(unit, []))
        fresh = [m for m in msgs if m.replace(after, "") not in old or unit in managed_files]
        if fresh:
            new_errors[unit] = fresh
    if rc_a != 0 and not errors_a:
        new_errors["(generator)"] = [_clean(x) for x in err_a.splitlines() if x.strip()] or ["exit code %d" % rc_a]
    preexisting = {u: m for u, m in errors_b.items() if u not in new_errors}
    warnings = [msg for unit, msg in warnings_a if unit in managed_files]
    return {
        "errors": new_errors,
        "preexisting": preexisting,
        "warnings": warnings,
        "output": out_a,
        "tmp_prefix": after,
    }


def format_errors(errors, tmp_prefix=None):
    parts = []
    for unit, msgs in sorted(errors.items()):
        for m in msgs:
            if tmp_prefix:
                m = m.replace(tmp_prefix + "/", "")
            parts.append("%s: %s" % (unit, m))
    return "; ".join(parts)


HEADER = ("Managed by Ansible (homelab.immich.podman_quadlet): local changes will be overwritten.",)


def _content_bytes(text):
    if not isinstance(text, str):
        raise QuadletError("content must be a string")
    su.check_text(text.replace("\n", ""), "content")
    return (text if text.endswith("\n") else text + "\n").encode("utf-8")


def unit_files(unit, current_dir):
    """Return ``[(relative path, bytes or None)]`` that make ``unit`` true in ``current_dir``.

    ``unit`` is a normalised spec: name, type, state, sections, content, dropins, specifiers.
    None means the file must not exist.
    """
    name, utype, state = unit["name"], unit["type"], unit.get("state") or "present"
    check_name(name, utype)
    main = file_name(name, utype)
    dropin_dir = main + ".d"
    specifiers = unit.get("specifiers", True)
    out = []
    if state == "absent":
        out.append((main, None))
        existing = os.path.join(current_dir, dropin_dir)
        if os.path.isdir(existing):
            for entry in sorted(os.listdir(existing)):
                out.append((os.path.join(dropin_dir, entry), None))
        return out
    sections, content = unit.get("sections"), unit.get("content")
    if (sections is None) == (content is None):
        raise QuadletError("unit %s: give exactly one of sections or content" % main)
    try:
        if sections is not None:
            if UNIT_TYPES[utype][0] not in sections:
                raise QuadletError(
                    "unit %s: sections has no [%s] section; every %s unit needs one"
                    % (main, UNIT_TYPES[utype][0], utype)
                )
            data = render_unit(utype, sections, specifiers, HEADER).encode("utf-8")
        else:
            data = _content_bytes(content)
        out.append((main, data))
        for fname, body in (unit.get("dropins") or {}).items():
            if not isinstance(fname, str) or not DROPIN_RE.match(fname):
                raise QuadletError(
                    "unit %s: drop-in name %r must be a plain file name ending in .conf, e.g. 10-memory.conf"
                    % (main, fname)
                )
            rel = os.path.join(dropin_dir, fname)
            if body is None:
                out.append((rel, None))
            elif isinstance(body, dict):
                out.append((rel, render_dropin(utype, body, specifiers, HEADER).encode("utf-8")))
            else:
                out.append((rel, _content_bytes(body)))
    except su.UnitValueError as exc:
        raise QuadletError("unit %s: %s" % (main, exc))
    return out


# the options of one unit, shared by podman_quadlet (units=) and immich_state (quadlet.units=)
UNIT_OPTIONS = dict(
    name=dict(type="str", required=True),
    type=dict(type="str", required=True, choices=sorted(UNIT_TYPES)),
    state=dict(type="str", default="present", choices=["present", "absent"]),
    sections=dict(type="dict"),
    content=dict(type="str"),
    dropins=dict(type="dict"),
    specifiers=dict(type="bool"),
)


def normalise_unit_list(units, specifiers=True):
    """Units as given (UNIT_OPTIONS dicts) with their specifiers default; QuadletError on an empty
    list or a unit given twice."""
    out = []
    seen = set()
    for u in units:
        u = dict(u)
        if u.get("specifiers") is None:
            u["specifiers"] = specifiers
        key = file_name(u["name"], u["type"])
        if key in seen:
            raise QuadletError("unit %s is given twice" % key)
        seen.add(key)
        out.append(u)
    if not out:
        raise QuadletError("units is empty: give at least one unit")
    return out


def plan(units, qdir, mode, want_uid, want_gid=None):
    """Compare the files that make ``units`` true with ``qdir``; changes nothing.

    Returns (files, content_changes, attr_changes): files is [(unit, relpath, bytes or None)],
    content_changes {relpath: (current bytes or None, wanted bytes or None)}, attr_changes the
    relpaths whose content is right but whose mode or owner is not.
    """
    files = []
    for u in units:
        for rel, data in unit_files(u, qdir):
            files.append((u, rel, data))
    content_changes = {}
    attr_changes = []
    for _u, rel, data in files:
        path = os.path.join(qdir, rel)
        if os.path.islink(path):
            raise QuadletError("%s is a symbolic link; refusing to replace it" % path)
        current = fileops.read_bytes(path)
        if current != data:
            content_changes[rel] = (current, data)
        elif data is not None:
            attrs = fileops.file_attrs(path)
            if attrs and (attrs[0] != mode or attrs[1] != want_uid or (want_gid is not None and attrs[2] != want_gid)):
                attr_changes.append(rel)
    return files, content_changes, attr_changes


def changed_services(files, content_changes):
    """The generated service names of the units whose files change, in the units' order."""
    out = []
    for u, rel, _data in files:
        if rel in content_changes:
            service = service_name(u["name"], u["type"], u.get("sections"))
            if service not in out:
                out.append(service)
    return out
