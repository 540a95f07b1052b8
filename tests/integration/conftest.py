"""Helpers for tests that run the modules for real through Ansible on this machine."""

import json
import os
import subprocess
import sys

import pytest
from localtools import fetched_tool, sh

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="session")
def generator():
    """The real podman quadlet generator (Debian 13's), fetched and cached by tests/tools."""
    path = fetched_tool("QUADLET_GENERATOR", "fetch-quadlet.sh")
    if not os.access(path, os.X_OK):
        pytest.fail("quadlet generator %s is not executable; run 'make quadlet-generator'" % path)
    return path


@pytest.fixture(scope="session")
def promtool():
    """Debian 13's promtool, fetched and cached by tests/tools."""
    return fetched_tool("PROMTOOL", "fetch-promtool.sh")


@pytest.fixture(scope="module")
def loop_mount(tmp_path_factory):
    """loop_mount(kind, size, mkfs=None, opts=None): a loop-mounted filesystem made with the mkfs
    command (a tmpfs when mkfs is None), unmounted when the module's tests are done. Needs root."""
    if os.geteuid() != 0:
        pytest.fail("these tests mount loop filesystems and need root (CI runs as root)")
    base = tmp_path_factory.mktemp("fs")
    made = []

    def mount(kind, size, mkfs=None, opts=None):
        mnt = base / kind
        mnt.mkdir()
        if mkfs is None:
            sh("mount", "-t", "tmpfs", "-o", "size=%s" % size, "tmpfs", str(mnt))
        else:
            img = base / ("%s.img" % kind)
            sh("truncate", "-s", size, str(img))
            sh(*(mkfs + [str(img)]))
            sh(*(["mount", "-o", "loop" + ("," + opts if opts else ""), str(img), str(mnt)]))
        made.append(str(mnt))
        return str(mnt)

    yield mount
    for mnt in reversed(made):
        if sh("umount", mnt, check=False).returncode != 0:
            sh("umount", "-l", mnt, check=False)


def ansible_module(module, args, tmp_path, check=False, diff=False):
    """Run one module through `ansible` (ad hoc, local connection); return (rc, result, stdout)."""
    tree = tmp_path / ("tree-%d" % len(list(tmp_path.glob("tree-*"))))
    cmd = [os.path.join(BIN, "ansible"), "localhost", "-c", "local", "-i", "localhost,",
           "-e", "ansible_python_interpreter=%s" % sys.executable,
           "-m", "homelab.immich.%s" % module, "-a", json.dumps(args), "-t", str(tree)]
    if check:
        cmd.append("--check")
    if diff:
        cmd.append("--diff")
    env = dict(os.environ, ANSIBLE_CONFIG=os.path.join(ROOT, "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               ANSIBLE_CALLBACK_RESULT_FORMAT="json")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    result_file = tree / "localhost"
    result = json.loads(result_file.read_text()) if result_file.exists() else None
    return proc.returncode, result, proc.stdout + proc.stderr


@pytest.fixture
def run_module(tmp_path):
    def _run(module, args, **kw):
        return ansible_module(module, args, tmp_path, **kw)
    return _run
